//! POSIX access control lists, for per-VM access: each VM's VMM runs under its own uid (see
//! [`crate::vmm_user::UidRange`]), and the agent grants that uid exactly the files the VM
//! uses (its writable disks read-write, its run and log directories) with a named-user ACL
//! entry, and takes it back when the files are no longer the VM's. The files stay the
//! agent's (owner root), so the agent needs no capability to set or read them: only the
//! owner may change a file's ACL, and that is the agent.
//!
//! The ACL is the kernel's `system.posix_acl_access` (and `system.posix_acl_default` for
//! what a directory hands to new files) extended attribute, in its documented binary form
//! (`include/uapi/linux/posix_acl_xattr.h`): a version word, then (tag, permissions, id)
//! entries in the kernel's order. Setting it does what `setfacl -m u:UID:PERM` does: the
//! mask becomes the union of the group class, so the new entry takes effect.
//!
//! A change is a read, an edit and a write of the whole attribute, and VMs share files (every
//! VM of an image reads the same kernel; ApplyVms starts several at once): two grants at
//! the same time would each write the list it read, and one VM's entry would be lost (its
//! VMM then fails with "Permission denied"). So every change in this process holds one lock
//! from the read to the write; the agent is the only writer of these ACLs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use thiserror::Error;

/// Held from reading an ACL to writing it back (see the module docs).
static CHANGING: Mutex<()> = Mutex::new(());

const ACCESS: &str = "system.posix_acl_access";
const DEFAULT: &str = "system.posix_acl_default";
const VERSION: u32 = 2;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

pub const READ: u16 = 4;
pub const WRITE: u16 = 2;
pub const EXECUTE: u16 = 1;

#[derive(Debug, Error)]
pub enum AclError {
    #[error("{op} the ACL of {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the ACL of {path} is malformed")]
    Malformed { path: String },
}

/// Which ACL of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Who may access the file.
    Access,
    /// What a directory hands to the files created in it.
    Default,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Access => ACCESS,
            Which::Default => DEFAULT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u16,
    id: u32,
    perm: u16,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> AclError {
    AclError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn c_path(path: &Path) -> Result<CString, AclError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| AclError::Malformed {
        path: path.display().to_string(),
    })
}

/// The entries of `which`; for an access ACL without the attribute, those the mode bits
/// mean; for a default ACL without it, none.
fn read(path: &Path, which: Which) -> Result<Vec<Entry>, AclError> {
    let c = c_path(path)?;
    let name = CString::new(which.name()).unwrap_or_default();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length; the strings are NUL-terminated.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(io_err("reading", path, e));
        }
        if which == Which::Default {
            return Ok(Vec::new());
        }
        let mode = std::fs::symlink_metadata(path)
            .map_err(|e| io_err("reading", path, e))?
            .mode();
        let bits = |shift: u32| ((mode >> shift) & 7) as u16;
        return Ok(vec![
            Entry {
                tag: USER_OBJ,
                id: UNDEFINED_ID,
                perm: bits(6),
            },
            Entry {
                tag: GROUP_OBJ,
                id: UNDEFINED_ID,
                perm: bits(3),
            },
            Entry {
                tag: OTHER,
                id: UNDEFINED_ID,
                perm: bits(0),
            },
        ]);
    }
    let data = &buf[..n as usize];
    let malformed = || AclError::Malformed {
        path: path.display().to_string(),
    };
    if data.len() < 4 || !(data.len() - 4).is_multiple_of(8) {
        return Err(malformed());
    }
    if u32::from_le_bytes([data[0], data[1], data[2], data[3]]) != VERSION {
        return Err(malformed());
    }
    Ok(data[4..]
        .chunks_exact(8)
        .map(|c| Entry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

fn write(path: &Path, which: Which, mut entries: Vec<Entry>) -> Result<(), AclError> {
    entries.sort();
    let mut data = VERSION.to_le_bytes().to_vec();
    for e in &entries {
        data.extend_from_slice(&e.tag.to_le_bytes());
        data.extend_from_slice(&e.perm.to_le_bytes());
        data.extend_from_slice(&e.id.to_le_bytes());
    }
    let c = c_path(path)?;
    let name = CString::new(which.name()).unwrap_or_default();
    // SAFETY: the buffer is valid for its length; the strings are NUL-terminated.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            data.as_ptr().cast(),
            data.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io_err("setting", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The mask an ACL needs: the union of the group class (named users, owning group, named
/// groups), as setfacl computes it.
fn with_mask(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.retain(|e| e.tag != MASK);
    let named = entries.iter().any(|e| e.tag == USER || e.tag == GROUP);
    if named {
        let perm = entries
            .iter()
            .filter(|e| matches!(e.tag, USER | GROUP_OBJ | GROUP))
            .fold(0, |p, e| p | e.perm);
        entries.push(Entry {
            tag: MASK,
            id: UNDEFINED_ID,
            perm,
        });
    }
    entries
}

/// Grants user `uid` `perm` (READ | WRITE | EXECUTE) on `path` (replacing what it had).
/// A default ACL starts from the directory's access ACL's base entries.
pub fn grant(path: &Path, which: Which, uid: u32, perm: u16) -> Result<(), AclError> {
    let _one_at_a_time = CHANGING.lock().unwrap_or_else(|p| p.into_inner());
    let mut entries = read(path, which)?;
    if entries.is_empty() {
        entries = read(path, Which::Access)?
            .into_iter()
            .filter(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
            .collect();
    }
    let mut before = entries.clone();
    before.sort();
    entries.retain(|e| !(e.tag == USER && e.id == uid));
    entries.push(Entry {
        tag: USER,
        id: uid,
        perm,
    });
    let mut after = with_mask(entries);
    after.sort();
    // Unchanged only if the mask is still right too: a chmod since narrowed it (the group
    // bits of the mode are the mask), which would mask the entry.
    if after == before {
        return Ok(());
    }
    write(path, which, after)
}

/// Takes back every right user `uid` has on `path` by name; true if it had any.
pub fn revoke(path: &Path, uid: u32) -> Result<bool, AclError> {
    let _one_at_a_time = CHANGING.lock().unwrap_or_else(|p| p.into_inner());
    let mut entries = read(path, Which::Access)?;
    let before = entries.len();
    entries.retain(|e| !(e.tag == USER && e.id == uid));
    if entries.len() == before {
        return Ok(false);
    }
    write(path, Which::Access, with_mask(entries))?;
    Ok(true)
}

/// The users named in `path`'s access ACL with their permissions.
pub fn named_users(path: &Path) -> Result<Vec<(u32, u16)>, AclError> {
    Ok(read(path, Which::Access)?
        .into_iter()
        .filter(|e| e.tag == USER)
        .map(|e| (e.id, e.perm))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn grants_and_revokes_named_users_like_setfacl() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(named_users(&f).unwrap().is_empty());
        grant(&f, Which::Access, 500_001, READ | WRITE).unwrap();
        grant(&f, Which::Access, 500_002, READ).unwrap();
        assert_eq!(
            named_users(&f).unwrap(),
            [(500_001, READ | WRITE), (500_002, READ)]
        );
        // The mask is the group class's union: the group bits of the mode show it.
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{mode:o}");
        // A chmod narrows the mask (the group bits); granting again widens it back.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        grant(&f, Which::Access, 500_001, READ | WRITE).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{mode:o}");
        assert!(revoke(&f, 500_001).unwrap());
        assert!(!revoke(&f, 500_001).unwrap());
        assert_eq!(named_users(&f).unwrap(), [(500_002, READ)]);
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{mode:o}");
        // A default ACL on a directory is inherited by new files.
        grant(dir.path(), Which::Default, 500_003, READ | WRITE | EXECUTE).unwrap();
        let g = dir.path().join("new");
        std::fs::write(&g, b"y").unwrap();
        assert!(named_users(&g)
            .unwrap()
            .contains(&(500_003, READ | WRITE | EXECUTE)));
    }

    /// Many VMs' starts grant on one shared file at once (the kernel every VM boots): no
    /// grant may be lost, and revokes at the same time take back only their own.
    #[test]
    fn concurrent_grants_on_one_file_all_stay() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vmlinuz");
        std::fs::write(&f, b"k").unwrap();
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for i in 0..25u32 {
                        let uid = 600_000 + t * 100 + i;
                        grant(&f, Which::Access, uid, READ).unwrap();
                        // Every other one goes again, as a deleted VM's would.
                        if i % 2 == 1 {
                            assert!(revoke(&f, uid).unwrap(), "uid {uid} was granted");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let users = named_users(&f).unwrap();
        let want: Vec<(u32, u16)> = (0..8u32)
            .flat_map(|t| {
                (0..25u32)
                    .step_by(2)
                    .map(move |i| (600_000 + t * 100 + i, READ))
            })
            .collect();
        assert_eq!(users, want);
    }
}
