//! TAP devices: the host end of a virtio-net NIC, opened by name with the vnet header so that
//! checksum and segmentation offloads pass between guest and host untouched.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
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
    #[error("cannot create the rate limit timer: {0}")]
    Timer(io::Error),
    #[error("invalid TAP name '{0}': 1-15 bytes, no '/' or whitespace")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("TAP descriptor {fd}: {why}")]
    Fd { fd: RawFd, why: String },
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

/// How many queues of a TAP to attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapQueues {
    /// One, as a plain (single-queue) TAP: works with any TAP.
    Single,
    /// This many, each its own descriptor (IFF_MULTI_QUEUE): the TAP must have been created
    /// multi_queue, or not exist yet.
    Multi(u16),
}

impl Tap {
    /// Attaches to one queue of the TAP `name` (creating it if it does not exist and we
    /// may): a plain TAP, or one created multi_queue (which refuses a plain attach).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        match Tap::attach(name, 0) {
            Err(TapError::Attach { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Tap::attach(name, IFF_MULTI_QUEUE)
            }
            other => other,
        }
    }

    /// Attaches to `queues` queues of the TAP `name`; never an empty list.
    pub fn open_queues(name: &str, queues: TapQueues) -> Result<Vec<Tap>, TapError> {
        let (count, extra) = match queues {
            TapQueues::Single => (1, 0),
            TapQueues::Multi(n) => (n.max(1), IFF_MULTI_QUEUE),
        };
        (0..count).map(|_| Tap::attach(name, extra)).collect()
    }

    fn attach(name: &str, extra_flags: libc::c_short) -> Result<Tap, TapError> {
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
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra_flags,
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
        Tap::configure(file, name.to_string())
    }

    /// Takes over an inherited descriptor already attached to a TAP (by a supervisor that may
    /// create and attach TAPs, when the VMM itself may not).
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |why: String| TapError::Fd { fd, why };
        // SAFETY: F_GETFL only reads the flags of `fd`.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(bad("not an open file descriptor".into()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a struct ifreq, which IfReq lays out; on a descriptor that
        // is not an attached TUN/TAP it fails (EBADFD/ENOTTY/EINVAL) and writes nothing.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(bad(format!(
                "not attached to a TAP device: {}",
                io::Error::last_os_error()
            )));
        }
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & wanted != wanted {
            return Err(bad(format!(
                "attached with flags {:#x}; needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
                req.flags
            )));
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        // SAFETY: setting O_NONBLOCK and FD_CLOEXEC on the descriptor we now own.
        unsafe {
            if libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
                || libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0
            {
                return Err(bad(format!(
                    "cannot make it non-blocking: {}",
                    io::Error::last_os_error()
                )));
            }
        }
        // SAFETY: `fd` is an open TAP descriptor handed to us; from now on we own it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Tap::configure(file, name)
    }

    fn configure(file: File, name: String) -> Result<Tap, TapError> {
        let tap = Tap { file, name };
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
    use crate::devices::virtio::testing::in_private_netns;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name("vm-web01-n0abcd"));
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", "a\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open("a/b"), Err(TapError::Name(_))));
    }

    /// A TAP attached by "someone else" (this test) with `flags`, in a private network
    /// namespace; returns the attached descriptor.
    fn attach(name: &str, flags: libc::c_short) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF with a valid ifreq.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", io::Error::last_os_error());
        file
    }

    #[test]
    fn takes_over_a_handed_tap_descriptor_and_refuses_anything_else() {
        in_private_netns(|| {
            let handed = attach("thvcfd0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
            let fd = std::os::fd::IntoRawFd::into_raw_fd(handed);
            let tap = Tap::from_fd(fd).expect("a proper TAP descriptor");
            assert_eq!(tap.name(), "thvcfd0");
            // SAFETY: F_GETFL/F_GETFD only read flags.
            let (fl, fdfl) = unsafe {
                (
                    libc::fcntl(fd, libc::F_GETFL),
                    libc::fcntl(fd, libc::F_GETFD),
                )
            };
            assert_ne!(fl & libc::O_NONBLOCK, 0, "made non-blocking");
            assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "made close-on-exec");

            let no_vnet = attach("thvcfd1", IFF_TAP | IFF_NO_PI);
            let err = Tap::from_fd(std::os::fd::IntoRawFd::into_raw_fd(no_vnet))
                .err()
                .expect("no vnet header");
            assert!(
                err.to_string()
                    .contains("needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"),
                "{err}"
            );
            let null = File::open("/dev/null").expect("/dev/null");
            let err = Tap::from_fd(std::os::fd::IntoRawFd::into_raw_fd(null))
                .err()
                .expect("not a TAP");
            assert!(err.to_string().contains("not attached to a TAP"), "{err}");
            let err = Tap::from_fd(100_000).err().expect("closed");
            assert!(
                err.to_string().contains("not an open file descriptor"),
                "{err}"
            );
        });
    }
}
