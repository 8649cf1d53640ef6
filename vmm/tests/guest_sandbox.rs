//! The sandbox around a running guest (run in the test VM, see guest_boot.rs): every thread
//! has its seccomp filter, a forbidden syscall in any kind of thread kills the VMM, and it
//! boots as an unprivileged user with nothing but what it was handed, holding no capabilities.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use common::{tempdir, Guest};

const NOBODY: u32 = 65534;

/// `key:` lines of /proc/<pid>/status (or a task's).
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .trim()
        .to_string()
}

/// (thread name, whole status) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        out.push((status_field(&status, "Name"), status));
    }
    out.sort();
    out
}

/// Asserts every thread is filtered, no thread holds a capability, and no thread can gain
/// privileges; returns the thread names.
fn assert_sandboxed(pid: u32) -> Vec<String> {
    let threads = threads(pid);
    for (name, status) in &threads {
        assert_eq!(status_field(status, "Seccomp"), "2", "thread {name}");
        assert_eq!(status_field(status, "NoNewPrivs"), "1", "thread {name}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(
                status_field(status, set),
                "0000000000000000",
                "{set} of thread {name}"
            );
        }
    }
    threads.into_iter().map(|(name, _)| name).collect()
}

/// Every regular file the VMM holds open, with whether it is writable.
fn open_files(pid: u32) -> Vec<(PathBuf, bool)> {
    let mut files = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if !target.is_absolute() || !std::fs::metadata(&target).is_ok_and(|m| m.is_file()) {
            continue; // sockets, pipes, eventfds, anon inodes, /dev nodes
        }
        let fdinfo = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .expect("fdinfo");
        let flags = u32::from_str_radix(&status_field(&fdinfo, "flags"), 8).expect("octal");
        let writable = flags & (libc::O_ACCMODE as u32) != libc::O_RDONLY as u32;
        files.push((target, writable));
    }
    files
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn every_thread_of_a_running_vm_is_filtered() {
    let tmp = tempdir("sandbox-threads");
    let dir = tmp.path();
    let (_, disk_arg) = common::blank_disk(dir);
    let mut guest = Guest::boot("tick", &["--cpus", "2", "--disk", &disk_arg]);
    guest.wait_for("THVC-TICK=3");
    let names = assert_sandboxed(guest.child.id());
    for expected in ["thvc-vmm", "vcpu0", "vcpu1", "virtio-blk0", "virtio-rng0"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} in {names:?}"
        );
    }
    // The guest still runs under the filters.
    guest.wait_for("THVC-TICK=10");
    let _ = guest.child.kill();
}

/// Debug builds (what `cargo test` builds) only: THVC_TEST_FORBIDDEN_SYSCALL makes a thread
/// open a file once its filter is on. The API thread is covered by the host tests.
#[cfg(debug_assertions)]
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_forbidden_syscall_in_any_thread_kills_the_vmm() {
    for kind in ["main", "vcpu", "device-worker", "migration"] {
        let guest = Guest::boot_with("poweroff", &[], |cmd| {
            cmd.env("THVC_TEST_FORBIDDEN_SYSCALL", kind);
        });
        let (status, console, stderr) = guest.finish();
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {status}\nstderr:\n{stderr}\nconsole:\n{console}"
        );
        assert!(stderr.contains("test hook"), "{kind}: {stderr}");
        assert!(
            stderr.contains("made the forbidden syscall"),
            "{kind}: {stderr}"
        );
        assert!(!stderr.contains("was allowed"), "{kind}: {stderr}");
    }
}

/// A directory the unprivileged user can create its socket in; removed when the guard drops.
fn dir_for(name: &str, uid: u32) -> tempfile::TempDir {
    let dir = tempdir(name);
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).expect("chown");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// A copy of `src` in `dir` that only `uid` may read: the images a supervisor hands the VMM.
fn image_for(src: &Path, dir: &Path, uid: u32) -> PathBuf {
    let dst = dir.join(src.file_name().expect("file name"));
    std::fs::copy(src, &dst).expect("copy image");
    std::os::unix::fs::chown(&dst, Some(uid), Some(uid)).expect("chown");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    dst
}

fn api_ping(socket: &Path) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.write_all(b"{\"request\":\"ping\"}\n").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("answer");
    assert!(line.contains("pong"), "{line}");
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn boots_as_nobody_with_a_handed_kvm_fd_and_no_capabilities() {
    let tmp = dir_for("sandbox-nobody", NOBODY);
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let kernel = image_for(&common::kernel(), dir, NOBODY);
    let initrd = image_for(&common::initramfs(), dir, NOBODY);
    let cmdline = format!("{} thvc.action=tick", common::BASE_CMDLINE);
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("/dev/kvm");
    let kvm_fd = kvm.as_raw_fd();
    let mut guest = Guest::start_with(
        &[
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--cmdline",
            &cmdline,
            "--kvm-fd",
            "3",
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
        |cmd| {
            cmd.uid(NOBODY).gid(NOBODY);
            // SAFETY: dup2 and fcntl are async-signal-safe. The descriptor must reach the
            // VMM as fd 3 without close-on-exec: dup2 gives that, except when it already is 3
            // (dup2 then does nothing), so clear the flag explicitly.
            unsafe {
                cmd.pre_exec(move || {
                    if kvm_fd != 3 && libc::dup2(kvm_fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    guest.wait_for("THVC-TICK=3");
    let pid = guest.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Gid"), "65534\t65534\t65534\t65534");
    assert_sandboxed(pid);
    let files = open_files(pid);
    assert!(files.iter().all(|(_, writable)| !writable), "{files:?}");
    api_ping(&socket);
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&socket).expect("socket"));
    assert_eq!(owner, NOBODY);
    let _ = guest.child.kill();
    drop(kvm);
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn started_as_root_it_drops_to_the_given_user() {
    let tmp = tempdir("sandbox-user");
    let dir = tmp.path();
    let log = dir.join("console.log");
    let socket = dir.join("vm.sock");
    let serial = format!("file:{}", log.display());
    let user = format!("{NOBODY}:{NOBODY}");
    let mut guest = Guest::boot(
        "hang",
        &[
            "--user",
            &user,
            "--serial",
            &serial,
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    // The console goes to the file: wait for the guest through it.
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("THVC-ACTION=hang")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "guest did not boot; {}",
            common::stuck_report(guest.child.id())
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let pid = guest.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "Groups"), "");
    assert_eq!(status_field(&status, "CapBnd"), "0000000000000000");
    assert_sandboxed(pid);
    // The only writable file is the console log it was given.
    let files = open_files(pid);
    let writable: Vec<&PathBuf> = files.iter().filter(|(_, w)| *w).map(|(p, _)| p).collect();
    assert_eq!(writable, [&log], "{files:?}");
    // Root made the socket before dropping privileges; root (the supervisor) uses it.
    api_ping(&socket);
    let _ = guest.child.kill();
}
