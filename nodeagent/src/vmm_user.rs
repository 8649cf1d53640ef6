//! The user the VMMs run as. It also owns each VM's TAP devices: the kernel lets a process
//! without CAP_NET_ADMIN attach to a persistent TAP (TUNSETIFF) only when its euid is the
//! TAP's owner or it is in the TAP's group, so a sandboxed VMM can open only TAPs made for
//! its user.
//!
//! * systemd runner: `User=`/`Group=` of `thvc-vm@.service` (`thvc-vm`); the agent must be
//!   told the same user (`--vmm-user`, default `thvc-vm`).
//! * direct runner: the VMM runs as the agent's own user, or, with `--vmm-user`, is started
//!   with `thvc-vmm --user UID:GID` and switches to it once its files are open.

use thiserror::Error;

/// The user of the VMMs in the image (systemd/thvc.sysusers, thvc-vm@.service).
pub const DEFAULT_SYSTEMD_VMM_USER: &str = "thvc-vm";

#[derive(Debug, Error)]
pub enum VmmUserError {
    #[error("VMM user {0:?} does not exist (the image creates thvc-vm from thvc.sysusers)")]
    NoSuchUser(String),
    #[error("VMM user {spec:?}: {reason}")]
    Invalid { spec: String, reason: String },
    #[error("looking up the VMM user {spec:?}: {source}")]
    Lookup {
        spec: String,
        #[source]
        source: std::io::Error,
    },
}

/// A numeric user and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for VmmUser {
    /// `UID:GID`, the form `thvc-vmm --user` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

impl VmmUser {
    /// The effective user and group of this process.
    pub fn current() -> VmmUser {
        // SAFETY: geteuid/getegid cannot fail.
        unsafe {
            VmmUser {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }

    /// `NAME` (its uid and primary group, through NSS) or numeric `UID:GID`. Root is
    /// refused: omit `--vmm-user` to run VMMs as the agent's own user. -1 is refused too
    /// (it means "unchanged" to setresuid and "no owner" to TUNSETOWNER).
    pub fn resolve(spec: &str) -> Result<VmmUser, VmmUserError> {
        let invalid = |reason: &str| VmmUserError::Invalid {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let user = match spec.split_once(':') {
            Some((uid, gid)) => {
                let number = |v: &str| {
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(invalid("UID:GID must be two decimal numbers"));
                    }
                    v.parse::<u32>()
                        .map_err(|_| invalid("UID:GID must be two decimal numbers"))
                };
                VmmUser {
                    uid: number(uid)?,
                    gid: number(gid)?,
                }
            }
            None => lookup_user(spec)?.ok_or_else(|| VmmUserError::NoSuchUser(spec.to_owned()))?,
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(invalid(
                "VMMs must not run as root (uid or gid 0); omit --vmm-user to run them as the agent's own user",
            ));
        }
        if user.uid == u32::MAX || user.gid == u32::MAX {
            return Err(invalid("uid and gid 4294967295 (-1) are not real ids"));
        }
        Ok(user)
    }
}

/// uid and primary gid of the user called `name`.
fn lookup_user(name: &str) -> Result<Option<VmmUser>, VmmUserError> {
    if name.contains('\0') {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(name).map_err(|errno| VmmUserError::Lookup {
        spec: name.to_owned(),
        source: std::io::Error::from(errno),
    })?;
    Ok(user.map(|u| VmmUser {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_and_named_users() {
        assert_eq!(
            VmmUser::resolve("1000:1001").unwrap(),
            VmmUser {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(
            VmmUser::resolve("1000:1001").unwrap().to_string(),
            "1000:1001"
        );
        // Debian's nobody:nogroup.
        assert_eq!(
            VmmUser::resolve("nobody").unwrap(),
            VmmUser {
                uid: 65534,
                gid: 65534
            }
        );
    }

    #[test]
    fn refuses_root_unknown_users_and_garbage() {
        for bad in [
            "root",
            "0:0",
            "1000:0",
            "0:1000",
            "4294967295:5",
            "1:4294967295",
        ] {
            assert!(
                matches!(VmmUser::resolve(bad), Err(VmmUserError::Invalid { .. })),
                "{bad}"
            );
        }
        for bad in ["1000:", ":5", "a:b", "1:2:3", "-1:5", "99999999999:1"] {
            let e = VmmUser::resolve(bad).unwrap_err();
            assert!(e.to_string().contains("two decimal numbers"), "{bad}: {e}");
        }
        assert!(matches!(
            VmmUser::resolve("no-such-user-thvc"),
            Err(VmmUserError::NoSuchUser(_))
        ));
        assert!(matches!(
            VmmUser::resolve("nul\0byte"),
            Err(VmmUserError::NoSuchUser(_))
        ));
    }
}
