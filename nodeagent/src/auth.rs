//! Who may change state: root, and members of the control group (`thvc-control` by default).
//! The daemon asks the bus for the caller's uid (GetConnectionUnixUser, which the bus daemon
//! takes from SO_PEERCRED, so it cannot be forged) and resolves the user's groups through
//! NSS, like polkit's "unix-group" identities do.

use std::ffi::{CStr, CString};

use thiserror::Error;

pub const DEFAULT_CONTROL_GROUP: &str = "thvc-control";

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("looking up {what}: {source}")]
    Lookup {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// (user name, primary gid) of `uid`.
fn passwd_entry(uid: u32) -> Result<Option<(CString, u32)>, AuthError> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain old data; getpwuid_r writes into it and buf.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the given lengths.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(AuthError::Lookup {
                what: format!("uid {uid}"),
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: pw_name points into buf, NUL-terminated, valid while buf lives.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned();
        return Ok(Some((name, pwd.pw_gid)));
    }
}

/// gid of the group called `name`.
pub fn group_id(name: &str) -> Result<Option<u32>, AuthError> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: group is plain old data.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the given lengths.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 22) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(AuthError::Lookup {
                what: format!("group {name}"),
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(grp.gr_gid));
    }
}

/// All groups (primary and supplementary) of user `name` with primary group `gid`.
fn group_list(name: &CStr, gid: u32) -> Vec<u32> {
    let mut n: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: groups has room for `count` entries.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        if count <= n || n > 65536 {
            return vec![gid];
        }
        n = count;
    }
}

/// May `uid` change state? Root always; others if they are in `control_group`.
pub fn may_control(uid: u32, control_group: &str) -> Result<bool, AuthError> {
    if uid == 0 {
        return Ok(true);
    }
    let Some(group) = group_id(control_group)? else {
        return Ok(false);
    };
    let Some((name, primary)) = passwd_entry(uid)? else {
        return Ok(false);
    };
    Ok(primary == group || group_list(&name, primary).contains(&group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_allowed_and_unknown_group_denies() {
        assert!(may_control(0, "no-such-group-xyz").unwrap());
        assert!(!may_control(65534, "no-such-group-xyz").unwrap());
        // nobody's primary group on Debian is nogroup.
        let nogroup = group_id("nogroup").unwrap();
        if nogroup.is_some() {
            assert!(may_control(65534, "nogroup").unwrap());
        }
    }
}
