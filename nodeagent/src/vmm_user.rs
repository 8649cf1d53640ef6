//! The user the VMMs run as. It also owns each VM's TAP devices: the kernel lets a process
//! without CAP_NET_ADMIN attach to a persistent TAP (TUNSETIFF) only when its euid is the
//! TAP's owner or it is in the TAP's group, so a sandboxed VMM can open only TAPs made for
//! its user.
//!
//! * per-VM uids (`--vmm-uids FIRST-LAST`, required by the systemd runner): each VM has a
//!   uid of its own ([`UidRange`]); its launcher (`thvc-vm@.service`'s `exec-vm`, or the
//!   direct runner's supervisor) becomes that user ([`RunAs`]) before it execs the VMM, so
//!   the VMM opens everything as its VM's user (see `node::access`).
//! * otherwise (direct runner): the VMM runs as the agent's own user, or, with `--vmm-user`,
//!   is started with `thvc-vmm --user UID:GID` and switches to it once its files are open.

use thiserror::Error;

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

/// The uids VMMs run as when each VM has its own (`--vmm-uids FIRST-LAST`): the agent gives
/// every VM one of them for its whole life (persisted beside its spec), with the same number
/// as its private primary group. No user database entries are needed: the ids are only
/// numbers on processes, TAPs and ACL entries. Pick a range no other software uses (the
/// image: 400000-409999, below systemd-nspawn's container ranges and above DynamicUser's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub fn parse(s: &str) -> Result<UidRange, VmmUserError> {
        let invalid = |reason: &str| VmmUserError::Invalid {
            spec: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| invalid("expected FIRST-LAST, e.g. 400000-409999"))?;
        let number = |v: &str| {
            if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
                return Err(invalid("FIRST and LAST must be decimal numbers"));
            }
            v.parse::<u32>()
                .map_err(|_| invalid("FIRST and LAST must be decimal numbers"))
        };
        let (first, last) = (number(a)?, number(b)?);
        if first < 1000 || last < first || last >= 0x7fff_ffff {
            return Err(invalid(
                "the range must lie within 1000-2147483646 and not be empty (FIRST <= LAST)",
            ));
        }
        if [65534, 65535].iter().any(|id| (first..=last).contains(id)) {
            return Err(invalid(
                "the range must not include nobody (65534) or 65535",
            ));
        }
        Ok(UidRange { first, last })
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    /// The lowest uid of the range not in `used`.
    pub fn free(&self, used: &std::collections::HashSet<u32>) -> Option<u32> {
        (self.first..=self.last).find(|u| !used.contains(u))
    }
}

/// Who a VMM runs as when its launcher switches before exec (per-VM uids): uid, primary gid
/// and supplementary groups (none today: the launcher hands the VMM /dev/kvm).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub groups: Vec<u32>,
}

impl RunAs {
    /// `UID:GID[:G1,G2...]`, the form `supervise-vm --run-as` takes.
    pub fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    pub fn parse_arg(s: &str) -> Result<RunAs, VmmUserError> {
        let invalid = || VmmUserError::Invalid {
            spec: s.to_owned(),
            reason: "expected UID:GID:GROUPS (GROUPS comma-separated, may be empty)".into(),
        };
        let mut parts = s.splitn(3, ':');
        let mut next = || parts.next().ok_or_else(invalid);
        let uid = next()?.parse().map_err(|_| invalid())?;
        let gid = next()?.parse().map_err(|_| invalid())?;
        let groups = next()?;
        let groups = if groups.is_empty() {
            Vec::new()
        } else {
            groups
                .split(',')
                .map(|g| g.parse().map_err(|_| invalid()))
                .collect::<Result<_, _>>()?
        };
        let run_as = RunAs { uid, gid, groups };
        if run_as.uid == 0 || run_as.gid == 0 {
            return Err(VmmUserError::Invalid {
                spec: s.to_owned(),
                reason: "a VMM never runs as root".into(),
            });
        }
        Ok(run_as)
    }

    /// Sets the groups, then the gids, then the uids (real, effective and saved): from
    /// root that drops every capability. Only system calls: safe between fork and exec.
    pub fn switch(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls with a valid pointer and length.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setresgid(self.gid, self.gid, self.gid) != 0
                || libc::setresuid(self.uid, self.uid, self.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
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
    fn uid_ranges_and_run_as() {
        let r = UidRange::parse("400000-400002").unwrap();
        assert_eq!(r.free(&[400000, 400001].into()), Some(400002));
        assert_eq!(r.free(&[400000, 400001, 400002].into()), None);
        for bad in [
            "",
            "5",
            "400000",
            "0-10",
            "999-2000",
            "5000-4000",
            "60000-70000",
            "a-b",
            "1000-4294967295",
        ] {
            assert!(UidRange::parse(bad).is_err(), "{bad}");
        }
        let a = RunAs {
            uid: 400000,
            gid: 400000,
            groups: vec![107, 5],
        };
        assert_eq!(a.to_arg(), "400000:400000:107,5");
        assert_eq!(RunAs::parse_arg(&a.to_arg()).unwrap(), a);
        let b = RunAs {
            uid: 1,
            gid: 2,
            groups: vec![],
        };
        assert_eq!(RunAs::parse_arg(&b.to_arg()).unwrap(), b);
        for bad in ["0:1:", "1:0:", "1:2", "x:1:", "1:2:a"] {
            assert!(RunAs::parse_arg(bad).is_err(), "{bad}");
        }
    }

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
