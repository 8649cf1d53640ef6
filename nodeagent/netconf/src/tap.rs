//! Persistent TAP devices for VMs, made with the TUN driver's ioctls on /dev/net/tun.
//!
//! The TAP outlives the fd used to make it (TUNSETPERSIST) and belongs to the VM's uid/gid
//! (TUNSETOWNER/TUNSETGROUP), so the unprivileged VMM can open it later by name.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

/// A TAP for one VM network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapSpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Bridge to plug it into.
    pub bridge: Option<String>,
    /// On a VLAN-filtering bridge: the VLAN the VM is in (pvid, untagged on the TAP).
    pub vlan: Option<u16>,
    pub mtu: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP request: {0}")]
    Invalid(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("{op} on TAP {name} failed: {source}")]
    Ioctl {
        op: &'static str,
        name: String,
        source: nix::Error,
    },
    #[error("{0} exists but was not created by create_tap; refusing to touch it")]
    NotOurs(String),
    #[error("{0}")]
    Conflict(String),
}

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_group, libc::TUNSETGROUP);

/// Creates (or attaches to) the persistent TAP `name`, owned by `uid`:`gid`, with a
/// virtio-net header and no packet-info prefix, as the VMM expects.
pub fn create_persistent_tap(name: &str, uid: u32, gid: u32) -> Result<(), TapError> {
    let mut request: libc::ifreq = unsafe {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        std::mem::zeroed()
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= request.ifr_name.len() {
        return Err(TapError::Invalid(format!(
            "TAP name {name:?} must be 1 to {} bytes",
            request.ifr_name.len() - 1
        )));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let fd = tun.as_raw_fd();
    let ioctl_error = |op: &'static str| {
        move |source| TapError::Ioctl {
            op,
            name: name.to_string(),
            source,
        }
    };
    // SAFETY: fd is an open /dev/net/tun descriptor and `request` a valid, NUL-terminated
    // ifreq that outlives the call; the int ioctls take their argument by value.
    unsafe {
        tun_set_iff(fd, &request).map_err(ioctl_error("TUNSETIFF"))?;
        tun_set_owner(fd, uid as libc::c_int).map_err(ioctl_error("TUNSETOWNER"))?;
        tun_set_group(fd, gid as libc::c_int).map_err(ioctl_error("TUNSETGROUP"))?;
        tun_set_persist(fd, 1).map_err(ioctl_error("TUNSETPERSIST"))?;
    }
    // Closing the fd detaches us; the device stays because it is persistent.
    drop(tun);
    Ok(())
}
