//! Giving up privileges once every resource is open: switch to the configured user, drop all
//! capabilities (effective, permitted, inheritable, ambient and, when allowed, the bounding
//! set), set no_new_privs, and make the process non-dumpable so that guest memory never ends
//! up in a core file and no same-user process can ptrace it.
//!
//! Capabilities and credentials are per thread in the kernel, so this must run while the
//! process has a single thread: [`drop_privileges`] checks that.

use std::io;

use crate::config::UserIds;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user needs the VMM to start as root, but it runs as uid {0}")]
    NotRoot(u32),
    #[error("privileges must be dropped while the VMM has one thread, it has {0}")]
    Threads(usize),
    #[error("cannot {what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "TAP {tap} belongs to {owner}; the VMM's user {uid}:{gid} could not attach it \
         (make it with `ip tuntap add {tap} mode tap user {uid}` or `group {gid}`)"
    )]
    TapNotOwned {
        tap: String,
        owner: String,
        uid: u32,
        gid: u32,
    },
    #[error("still uid {uid}/gid {gid} after switching to {want_uid}:{want_gid}")]
    SwitchFailed {
        uid: u32,
        gid: u32,
        want_uid: u32,
        want_gid: u32,
    },
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Sys {
            what,
            source: io::Error::last_os_error(),
        })
    }
}

fn thread_count() -> Result<usize, PrivilegeError> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|source| PrivilegeError::Sys {
        what: "list /proc/self/task",
        source,
    })?;
    Ok(tasks.count())
}

/// Highest capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Empties the bounding set (needs CAP_SETPCAP; without it there is nothing we could regain
/// anyway, as no_new_privs and the seccomp filters forbid execve).
fn drop_bounding_set() -> Result<(), PrivilegeError> {
    for cap in 0..=last_cap() {
        // SAFETY: plain prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EPERM) => return Ok(()),
                Some(libc::EINVAL) => break,
                _ => {
                    return Err(PrivilegeError::Sys {
                        what: "drop the capability bounding set",
                        source: err,
                    })
                }
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Clears the effective, permitted and inheritable sets of the calling thread.
fn clear_capabilities() -> Result<(), PrivilegeError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, both valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(rc as libc::c_int, "clear the capability sets")
}

fn switch_user(user: UserIds) -> Result<(), PrivilegeError> {
    // SAFETY: credential syscalls with plain integer arguments; results are checked.
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()),
            "clear supplementary groups",
        )?;
        check(
            libc::setresgid(user.gid, user.gid, user.gid),
            "switch group",
        )?;
        check(libc::setresuid(user.uid, user.uid, user.uid), "switch user")?;
        let (uid, gid) = (libc::getuid(), libc::getgid());
        if uid != user.uid || gid != user.gid || libc::geteuid() != user.uid {
            return Err(PrivilegeError::SwitchFailed {
                uid,
                gid,
                want_uid: user.uid,
                want_gid: user.gid,
            });
        }
    }
    Ok(())
}

/// With `--user`, a TAP given by name must be one that user could attach without privileges:
/// owned by its uid or its gid (root with CAP_NET_ADMIN could attach any TAP, another VM's too).
pub fn check_tap_owner(tap: &str, user: Option<UserIds>) -> Result<(), PrivilegeError> {
    let Some(user) = user else { return Ok(()) };
    let read = |what: &str| -> Option<i64> {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/{what}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
    };
    // -1: no owner (only CAP_NET_ADMIN attaches); missing: the TAP does not exist yet, which
    // the open reports.
    let (owner, group) = (read("owner"), read("group"));
    if owner.is_none() && group.is_none() {
        return Ok(());
    }
    if owner == Some(i64::from(user.uid)) || group == Some(i64::from(user.gid)) {
        return Ok(());
    }
    let describe = |v: Option<i64>| {
        v.filter(|v| *v >= 0)
            .map_or("nobody".to_string(), |v| v.to_string())
    };
    Err(PrivilegeError::TapNotOwned {
        tap: tap.to_string(),
        owner: format!("uid {} / gid {}", describe(owner), describe(group)),
        uid: user.uid,
        gid: user.gid,
    })
}

/// Drops everything the VMM does not need once its resources are open. Call before spawning
/// any thread.
pub fn drop_privileges(user: Option<UserIds>) -> Result<(), PrivilegeError> {
    // A guard against a start-up order bug; skipped where /proc is not mounted (a jail).
    match thread_count() {
        Ok(1) => {}
        Ok(threads) => return Err(PrivilegeError::Threads(threads)),
        Err(e) => tracing::debug!("cannot count threads: {e}"),
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if user.is_some() && euid != 0 {
        return Err(PrivilegeError::NotRoot(euid));
    }
    // Before switching users: emptying the bounding set needs CAP_SETPCAP.
    drop_bounding_set()?;
    if let Some(user) = user {
        switch_user(user)?;
    }
    // SAFETY: prctl/setrlimit with plain integer arguments or a valid struct.
    unsafe {
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ),
            "clear ambient capabilities",
        )?;
    }
    clear_capabilities()?;
    // SAFETY: as above.
    unsafe {
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "set no_new_privs",
        )?;
        check(
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
            "make the process non-dumpable",
        )?;
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(
            libc::setrlimit(libc::RLIMIT_CORE, &no_core),
            "disable core dumps",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<CapHeader>(), 8);
        assert_eq!(std::mem::size_of::<CapData>(), 12);
    }

    #[test]
    fn last_cap_is_plausible() {
        // CAP_CHECKPOINT_RESTORE (40) exists since 5.9.
        assert!((40..64).contains(&last_cap()));
    }

    #[test]
    fn refuses_to_run_with_several_threads() {
        // The test harness itself runs tests on threads, so this process has more than one.
        let err = drop_privileges(None).expect_err("multi-threaded");
        assert!(matches!(err, PrivilegeError::Threads(n) if n > 1), "{err}");
    }
}
