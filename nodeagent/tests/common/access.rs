//! Who may open what: the checks of the per-VM-user tests (host tests with the fake VMM,
//! guest tests with the real one), each as the VMM's user would try it.

use std::path::Path;
use std::process::Command;

use super::require_tool;

/// `cat FILE` inside the agent's network and mount namespaces (its own sysfs), with the
/// agent's root directory (`-r`: setns to a mount namespace resets it, which matters in
/// the test VM's chroot).
pub fn cat_in(pid: i32, file: &str) -> String {
    let out = Command::new(require_tool("nsenter", "util-linux"))
        .args(["-t", &pid.to_string(), "-n", "-m", "-r", "cat", file])
        .output()
        .expect("run nsenter cat");
    assert!(
        out.status.success(),
        "cat {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Attaches to the TAP `tap` in the network namespace of `ns_pid` as an unprivileged VMM
/// does: as `uid:gid` with no capabilities (setresuid away from root clears them),
/// TUNSETIFF with the VMM's flags. The child exits right after, which
/// detaches again. The error is the one the kernel gave (EPERM: not the TAP's owner).
pub fn attach_tap_as(ns_pid: i32, uid: u32, gid: u32, tap: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let netns = std::fs::File::open(format!("/proc/{ns_pid}/ns/net"))?;
    let netns_fd = netns.as_raw_fd();
    /// An ifreq moved into the child (it holds a pointer variant, so it is not Send).
    struct Request(libc::ifreq);
    // SAFETY: only ever read, by the forked child.
    unsafe impl Send for Request {}
    // SAFETY: as above.
    unsafe impl Sync for Request {}
    impl Request {
        fn ptr(&self) -> *const libc::ifreq {
            &self.0
        }
    }
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut request = Request(unsafe { std::mem::zeroed() });
    assert!(tap.len() < request.0.ifr_name.len());
    for (slot, byte) in request.0.ifr_name.iter_mut().zip(tap.as_bytes()) {
        *slot = *byte as libc::c_char;
    }
    request.0.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    let tun = c"/dev/net/tun";
    let mut cmd = Command::new("/bin/true");
    // SAFETY: only raw syscalls between fork and exec; everything they use was prepared
    // before the fork and is captured by value.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(rc)
                }
            };
            check(libc::setns(netns_fd, libc::CLONE_NEWNET))?;
            // Opened while still root: /dev/net/tun is 0666 where udev runs (the image),
            // 0600 on hosts without it. Opening it is not the point; attaching is, and
            // TUNSETIFF checks the caller's credentials when it is called.
            let fd = check(libc::open(tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))?;
            check(libc::ioctl(fd, libc::TUNSETIFF, request.ptr()))?;
            Ok(())
        });
    }
    // A failure in pre_exec comes back as the spawn error.
    let status = cmd.status()?;
    assert!(status.success(), "/bin/true after attaching: {status}");
    drop(netns);
    Ok(())
}

/// `Uid:` or `Gid:` of /proc/PID/status: real, effective, saved, filesystem.
pub fn proc_ids(pid: i32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .expect("id line")
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect()
}

/// What a process running as `uid:gid` (no supplementary groups, no capabilities) gets
/// when it opens `path` (`op`: "read", "rw", "connect" to a unix socket, or "unlink"): Ok,
/// or the
/// errno.
pub fn try_as(uid: u32, gid: u32, op: &str, path: &Path) -> Result<(), i32> {
    use std::os::unix::process::CommandExt;
    // Debian's, by its path: one under root's home (pyenv) is out of the test user's reach.
    let python = Path::new("/usr/bin/python3");
    assert!(
        python.exists(),
        "/usr/bin/python3 missing: apt-get install python3"
    );
    let script = r#"
import errno, os, socket, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "connect":
        socket.socket(socket.AF_UNIX).connect(path)
    elif op == "unlink":
        os.unlink(path)
    else:
        os.close(os.open(path, os.O_RDWR if op == "rw" else os.O_RDONLY))
except OSError as e:
    sys.exit(e.errno)
"#;
    let who = thvc_nodeagent::vmm_user::RunAs {
        uid,
        gid,
        groups: Vec::new(),
    };
    let mut cmd = Command::new(python);
    cmd.args(["-c", script, op]).arg(path);
    // SAFETY: RunAs::switch makes only system calls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || who.switch());
    }
    let status = cmd.status().expect("run python3");
    match status.code() {
        Some(0) => Ok(()),
        Some(errno) => Err(errno),
        None => panic!("python3 {op} {}: {status}", path.display()),
    }
}
