//! Who may change state: root, and members of the control group (`thvc-control` by default).
//! The daemon asks the bus for the caller's uid (GetConnectionUnixUser, which the bus daemon
//! takes from SO_PEERCRED, so it cannot be forged) and resolves the user's groups through
//! NSS, like polkit's "unix-group" identities do.

use std::ffi::{CStr, CString};

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};

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

fn lookup_error(what: String) -> impl FnOnce(nix::Error) -> AuthError {
    move |errno| AuthError::Lookup {
        what,
        source: std::io::Error::from(errno),
    }
}

/// gid of the group called `name`.
pub fn group_id(name: &str) -> Result<Option<u32>, AuthError> {
    if name.contains('\0') {
        return Ok(None);
    }
    let group = Group::from_name(name).map_err(lookup_error(format!("group {name}")))?;
    Ok(group.map(|g| g.gid.as_raw()))
}

/// All groups (primary and supplementary) of user `name` with primary group `gid`.
fn group_list(name: &CStr, gid: Gid) -> Vec<Gid> {
    getgrouplist(name, gid).unwrap_or_else(|_| vec![gid])
}

/// May `uid` change state? Root always; others if they are in `control_group`.
pub fn may_control(uid: u32, control_group: &str) -> Result<bool, AuthError> {
    if uid == 0 {
        return Ok(true);
    }
    let Some(group) = group_id(control_group)? else {
        return Ok(false);
    };
    let user = User::from_uid(Uid::from_raw(uid)).map_err(lookup_error(format!("uid {uid}")))?;
    let Some(user) = user else {
        return Ok(false);
    };
    let Ok(name) = CString::new(user.name) else {
        return Ok(false);
    };
    let group = Gid::from_raw(group);
    Ok(user.gid == group || group_list(&name, user.gid).contains(&group))
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
