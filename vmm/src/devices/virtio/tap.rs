//! TAP devices: the host end of a virtio-net NIC, opened by name with the vnet header so that
//! checksum and segmentation offloads pass between guest and host untouched.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// struct virtio_net_hdr_v1: what precedes every frame on the TAP and in the rings.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name '{0}': 1-15 bytes, no '/' or whitespace")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("TAP {name}: cannot {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains('/')
        && !name.chars().any(|c| c.is_whitespace() || c == '\0')
}

impl Tap {
    /// Attaches to the TAP `name` (creating it if it does not exist and we may).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.ioctl_int(
            TUNSETVNETHDRSZ,
            VNET_HDR_LEN as libc::c_int,
            "set the vnet header size",
        )?;
        // No offloads until the guest's driver says which it can take.
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl_int(
        &self,
        request: libc::c_ulong,
        value: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: these TUN ioctls read an int through the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value) };
        if rc < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Which offloaded frames the TAP may hand to the guest (TUN_F_*).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "set offloads",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// readv from the TAP: one frame (with its vnet header) per call.
    pub fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs describe writable memory (checked guest buffers).
        let n = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// writev to the TAP: one frame (with its vnet header) per call.
    pub fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs describe readable memory (checked guest buffers).
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name("vm-web01-n0abcd"));
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", "a\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open("a/b"), Err(TapError::Name(_))));
    }
}
