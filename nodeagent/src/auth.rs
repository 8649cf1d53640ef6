//! Who may do what. Every D-Bus method belongs to one [`Role`] (an action class: read,
//! vm-control, console, network, images, host); a caller may use it if it is root, a member of
//! the control group (`thvc-control` by default, which keeps meaning "everything" for
//! compatibility), or a member of that role's group (`thvc-vmctl`, `thvc-console`,
//! `thvc-network`, `thvc-images`, `thvc-host` by default; `--role-group ROLE=GROUP` renames
//! one). Plain reads are open to everyone (the D-Bus policy says so as well); the reads that can
//! reveal secrets (a VM's `Spec` and `Info`: kernel command line, cloud-init user data) need
//! the vm-control role.
//!
//! Unix groups rather than polkit: the image has no polkitd (one more daemon and a JavaScript
//! engine on every node for six fixed classes), the control plane calls non-interactively
//! (no authentication agent to answer polkit's "auth_admin"), and groups are what the D-Bus
//! policy file can express too, so the bus enforces the same split as defence in depth.
//!
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

/// An action class: what a D-Bus method does, and so which group may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Listing and non-secret properties: everyone.
    Read,
    /// Create, delete, start, stop, pause, resume, autostart; reading `Spec` and `Info`.
    VmControl,
    /// Reading a VM's serial console.
    Console,
    /// ApplyNetwork.
    Network,
    /// Pulling and deleting images; creating, resizing and deleting disks.
    Images,
    /// Node-wide operations (drain and the like).
    Host,
    /// Receiving a VM another node migrates here (ReceiveVm): the account the source
    /// nodes' SSH connections run as (thvc-migrate), which may do nothing else.
    Migrate,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Read,
        Role::VmControl,
        Role::Console,
        Role::Network,
        Role::Images,
        Role::Host,
        Role::Migrate,
    ];

    /// The name used on the command line and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::VmControl => "vm-control",
            Role::Console => "console",
            Role::Network => "network",
            Role::Images => "images",
            Role::Host => "host",
            Role::Migrate => "migrate",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The role's group unless configured otherwise (`thvc-vm` is taken: the VMM user).
    pub fn default_group(self) -> &'static str {
        match self {
            Role::Read => "thvc-read",
            Role::VmControl => "thvc-vmctl",
            Role::Console => "thvc-console",
            Role::Network => "thvc-network",
            Role::Images => "thvc-images",
            Role::Host => "thvc-host",
            Role::Migrate => "thvc-migrate",
        }
    }
}

/// Which group grants which role, plus the control group that grants all of them.
#[derive(Debug, Clone)]
pub struct RoleGroups {
    pub control: String,
    groups: Vec<(Role, String)>,
}

impl RoleGroups {
    /// The default groups, with `control` as the all-roles group.
    pub fn new(control: String) -> Self {
        RoleGroups {
            control,
            groups: Role::ALL
                .into_iter()
                .map(|r| (r, r.default_group().to_owned()))
                .collect(),
        }
    }

    /// Applies one `ROLE=GROUP` setting.
    pub fn set(&mut self, setting: &str) -> Result<(), String> {
        let (role, group) = setting
            .split_once('=')
            .ok_or_else(|| format!("{setting:?}: expected ROLE=GROUP"))?;
        let role = Role::from_name(role).ok_or_else(|| {
            let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown role {role:?} (roles: {})", names.join(", "))
        })?;
        if group.is_empty() || group.contains('\0') {
            return Err(format!("{setting:?}: invalid group name"));
        }
        for (r, g) in &mut self.groups {
            if *r == role {
                *g = group.to_owned();
            }
        }
        Ok(())
    }

    pub fn group(&self, role: Role) -> &str {
        self.groups
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, g)| g.as_str())
            .unwrap_or(role.default_group())
    }

    /// May `uid` act in `role`? Root always; everyone reads; others if they are in the
    /// control group or the role's group.
    pub fn may(&self, uid: u32, role: Role) -> Result<bool, AuthError> {
        if uid == 0 || role == Role::Read {
            return Ok(true);
        }
        let wanted = [self.control.as_str(), self.group(role)];
        let mut gids = Vec::new();
        for name in wanted {
            if let Some(gid) = group_id(name)? {
                gids.push(Gid::from_raw(gid));
            }
        }
        if gids.is_empty() {
            return Ok(false);
        }
        let user =
            User::from_uid(Uid::from_raw(uid)).map_err(lookup_error(format!("uid {uid}")))?;
        let Some(user) = user else {
            return Ok(false);
        };
        let Ok(name) = CString::new(user.name) else {
            return Ok(false);
        };
        let member_of = group_list(&name, user.gid);
        Ok(gids.iter().any(|g| user.gid == *g || member_of.contains(g)))
    }
}

/// May `uid` do everything? Root always; others if they are in `control_group`.
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

    #[test]
    fn a_role_group_grants_only_its_role() {
        let mut groups = RoleGroups::new("no-such-group-xyz".to_owned());
        assert!(groups.set("console").is_err());
        assert!(groups.set("nonsense=nogroup").is_err());
        assert!(groups.set("console=").is_err());
        if group_id("nogroup").unwrap().is_none() {
            return;
        }
        groups.set("console=nogroup").unwrap();
        assert!(groups.may(65534, Role::Console).unwrap());
        assert!(groups.may(65534, Role::Read).unwrap());
        assert!(!groups.may(65534, Role::VmControl).unwrap());
        assert!(!groups.may(65534, Role::Host).unwrap());
        assert!(groups.may(0, Role::Host).unwrap());
        let all = RoleGroups::new("nogroup".to_owned());
        for role in Role::ALL {
            assert!(all.may(65534, role).unwrap(), "{role:?}");
        }
    }
}
