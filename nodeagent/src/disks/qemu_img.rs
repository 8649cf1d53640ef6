//! `qemu-img` on images that may be hostile: a downloaded cloud image is whatever its
//! publisher (or whoever sits between) made it, and qcow2 is a format with pointers to
//! other files (backing files, external data files) and plenty of parser surface.
//!
//! So qcow2 is parsed by `qemu-img`, a separate short-lived process, never by the agent and
//! never by the VMM a guest attacks: disks are converted to raw once, at import. Each run
//! gets a wall-clock timeout (then its whole process group is killed), rlimits on address
//! space, CPU time, output file size and core dumps, an empty environment, no stdin, and no
//! file descriptors of the agent (all marked close-on-exec before exec). Its output is read
//! up to a limit. The image's format is detected by `qemu-img info` (its content, never its
//! name); only raw and qcow2 are accepted, and qcow2 images with a backing file, an
//! external data file or encryption are refused before anything reads their data. Later
//! runs name the format explicitly (`-f qcow2`), so nothing is probed twice.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// `info` and `measure` read headers and tables only.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// A conversion copies the whole image (tens of GiB at disk speed).
pub const CONVERT_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Address space of one qemu-img run; it needs ~64 MiB for these jobs.
pub const ADDRESS_SPACE: u64 = 1 << 30;
/// Most stdout kept from one run (`info` of a qcow2 with thousands of snapshots is large).
const MAX_STDOUT: usize = 1 << 20;
const MAX_STDERR: usize = 16 << 10;

#[derive(Debug, Error)]
pub enum QemuImgError {
    #[error("cannot run {program}: {source} (qemu-img comes with Debian's qemu-utils)")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {what} did not finish within {} s and was killed", .timeout.as_secs())]
    Timeout { what: String, timeout: Duration },
    #[error("qemu-img {what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("qemu-img {what} printed more than {MAX_STDOUT} bytes")]
    TooMuchOutput { what: String },
    #[error("qemu-img {what} printed output this agent does not understand: {reason}")]
    BadOutput { what: String, reason: String },
    #[error("waiting for qemu-img {what}: {source}")]
    Wait {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Resource limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    /// RLIMIT_FSIZE: no file it writes grows beyond this.
    pub file_size: Option<u64>,
}

impl Limits {
    pub fn probe() -> Limits {
        Limits {
            timeout: PROBE_TIMEOUT,
            file_size: Some(0),
        }
    }
}

/// What `qemu-img info` says about an image that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    pub format: Format,
    pub virtual_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Why an image is refused (the image's fault, not the node's).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Refused(pub String);

/// Runs `program args`, confined as the module docs say; returns stdout.
pub async fn run(
    program: &Path,
    what: &str,
    args: &[OsString],
    limits: Limits,
) -> Result<Vec<u8>, QemuImgError> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills whatever it started too.
        .process_group(0);
    let cpu = limits.timeout.as_secs().max(1);
    let fsize = limits.file_size;
    // SAFETY: only async-signal-safe calls (setrlimit, syscall, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let set = |res, value: u64| {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(res, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_AS, ADDRESS_SPACE)?;
            set(libc::RLIMIT_CPU, cpu)?;
            set(libc::RLIMIT_CORE, 0)?;
            if let Some(max) = fsize {
                set(libc::RLIMIT_FSIZE, max)?;
            }
            mark_fds_cloexec();
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| QemuImgError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let pid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(QemuImgError::Wait {
            what: what.to_owned(),
            source: std::io::Error::other("no pipes to the child"),
        });
    };
    let finished = async {
        let (out, err) = tokio::join!(
            read_limited(stdout, MAX_STDOUT),
            read_limited(stderr, MAX_STDERR)
        );
        (out, err, child.wait().await)
    };
    let (out, err, status) = match tokio::time::timeout(limits.timeout, finished).await {
        Ok(r) => r,
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: kill(2) on the process group this child leads.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            // Reaped by kill_on_drop's orphan handling once `child` goes.
            return Err(QemuImgError::Timeout {
                what: what.to_owned(),
                timeout: limits.timeout,
            });
        }
    };
    let status = status.map_err(|source| QemuImgError::Wait {
        what: what.to_owned(),
        source,
    })?;
    let (stderr_bytes, _) = err.unwrap_or_default();
    if !status.success() {
        use std::os::unix::process::ExitStatusExt as _;
        let status = match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(libc::SIGXCPU)) => "CPU time limit reached".to_owned(),
            (None, Some(libc::SIGXFSZ)) => "output file size limit reached".to_owned(),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "unknown status".to_owned(),
        };
        let stderr = String::from_utf8_lossy(&stderr_bytes)
            .trim()
            .replace('\n', "; ");
        return Err(QemuImgError::Failed {
            what: what.to_owned(),
            status,
            stderr,
        });
    }
    match out {
        Ok((bytes, false)) => Ok(bytes),
        Ok((_, true)) => Err(QemuImgError::TooMuchOutput {
            what: what.to_owned(),
        }),
        Err(source) => Err(QemuImgError::Wait {
            what: what.to_owned(),
            source,
        }),
    }
}

/// Marks every descriptor from 3 up close-on-exec (close_range(2), else one by one), so the
/// child inherits none of the agent's (its bus connection, VM files). Marking instead of
/// closing keeps the exec-error pipe of std's spawn working.
fn mark_fds_cloexec() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: plain syscalls on descriptor numbers.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 16) as libc::c_int
        } else {
            1024
        };
        for fd in 3..max {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// Reads up to `limit` bytes; drains (and drops) the rest. The flag says whether there was
/// more.
async fn read_limited(
    mut r: impl AsyncRead + Unpin,
    limit: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    (&mut r).take(limit as u64).read_to_end(&mut buf).await?;
    let rest = tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
    Ok((buf, rest > 0))
}

/// `qemu-img info` with format detection, and the checks of the module docs.
pub async fn probe(qemu_img: &Path, image: &Path) -> Result<Result<Probed, Refused>, QemuImgError> {
    let args = [
        OsString::from("info"),
        "--output=json".into(),
        "--".into(),
        image.into(),
    ];
    let out = run(qemu_img, "info", &args, Limits::probe()).await?;
    let v: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| QemuImgError::BadOutput {
            what: "info".to_owned(),
            reason: e.to_string(),
        })?;
    Ok(check_info(&v))
}

/// The decision on `qemu-img info --output=json` output.
pub fn check_info(v: &serde_json::Value) -> Result<Probed, Refused> {
    let refused = |m: String| Err(Refused(m));
    let format = match v.get("format").and_then(|f| f.as_str()) {
        Some("raw") => Format::Raw,
        Some("qcow2") => Format::Qcow2,
        Some(other) => {
            return refused(format!(
                "the image is in format {other:?}; only raw and qcow2 images are accepted"
            ))
        }
        None => return refused("qemu-img found no format for the image".to_owned()),
    };
    for key in [
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ] {
        if let Some(b) = v.get(key) {
            return refused(format!(
                "the image has a backing file ({b}); images referring to other files are refused"
            ));
        }
    }
    let data = v.get("format-specific").and_then(|f| f.get("data"));
    if let Some(d) = data.and_then(|d| d.get("data-file")) {
        return refused(format!(
            "the image has an external data file ({d}); images referring to other files are refused"
        ));
    }
    if data
        .and_then(|d| d.get("corrupt"))
        .and_then(|c| c.as_bool())
        == Some(true)
    {
        return refused("the image is marked corrupt".to_owned());
    }
    if v.get("encrypted").and_then(|e| e.as_bool()) == Some(true)
        || data.and_then(|d| d.get("encrypt")).is_some()
    {
        return refused("the image is encrypted".to_owned());
    }
    let Some(virtual_size) = v.get("virtual-size").and_then(|s| s.as_u64()) else {
        return refused("qemu-img reported no virtual size".to_owned());
    };
    Ok(Probed {
        format,
        virtual_size,
    })
}

/// Bytes a raw conversion of the qcow2 `image` allocates at most: what `qemu-img measure`
/// needs for a qcow2 copy of its allocated clusters (data plus a little metadata), since a
/// sparse raw target allocates no more than the source's data.
pub async fn measure_qcow2(qemu_img: &Path, image: &Path) -> Result<u64, QemuImgError> {
    let args = [
        OsString::from("measure"),
        "--output=json".into(),
        "-f".into(),
        "qcow2".into(),
        "-O".into(),
        "qcow2".into(),
        "--".into(),
        image.into(),
    ];
    let out = run(qemu_img, "measure", &args, Limits::probe()).await?;
    let bad = |reason: String| QemuImgError::BadOutput {
        what: "measure".to_owned(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| bad(e.to_string()))?;
    v.get("required")
        .and_then(|r| r.as_u64())
        .ok_or_else(|| bad(format!("no \"required\" in {v}")))
}

/// Converts the qcow2 `image` into the existing, zero-filled (sparse) raw file `target` of
/// the image's virtual size: zero and unallocated ranges stay holes.
pub async fn convert_qcow2_to_raw(
    qemu_img: &Path,
    image: &Path,
    target: &Path,
    virtual_size: u64,
) -> Result<(), QemuImgError> {
    let args = [
        OsString::from("convert"),
        // Write into the file we created (mode, O_EXCL), which is all zeros.
        "-n".into(),
        "--target-is-zero".into(),
        "-f".into(),
        "qcow2".into(),
        "-O".into(),
        "raw".into(),
        "--".into(),
        image.into(),
        target.into(),
    ];
    let limits = Limits {
        timeout: CONVERT_TIMEOUT,
        file_size: Some(virtual_size),
    };
    run(qemu_img, "convert", &args, limits).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refuses_references_to_other_files_and_other_formats() {
        let ok = json!({"format": "qcow2", "virtual-size": 1024,
                        "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}});
        assert_eq!(
            check_info(&ok),
            Ok(Probed {
                format: Format::Qcow2,
                virtual_size: 1024
            })
        );
        let cases = [
            (
                json!({"format": "vmdk", "virtual-size": 1}),
                "only raw and qcow2",
            ),
            (json!({"virtual-size": 1}), "no format"),
            (
                json!({"format": "qcow2", "virtual-size": 1, "backing-filename": "/etc/shadow"}),
                "backing file",
            ),
            (
                json!({"format": "qcow2", "virtual-size": 1, "full-backing-filename": "x"}),
                "backing file",
            ),
            (
                json!({"format": "qcow2", "virtual-size": 1,
                       "format-specific": {"data": {"data-file": "/dev/sda"}}}),
                "external data file",
            ),
            (
                json!({"format": "qcow2", "virtual-size": 1,
                       "format-specific": {"data": {"corrupt": true}}}),
                "corrupt",
            ),
            (
                json!({"format": "qcow2", "virtual-size": 1, "encrypted": true}),
                "encrypted",
            ),
            (json!({"format": "raw"}), "no virtual size"),
        ];
        for (info, want) in cases {
            let e = check_info(&info).unwrap_err();
            assert!(e.0.contains(want), "{info}: {e}");
        }
    }

    #[tokio::test]
    async fn a_run_that_hangs_is_killed_with_its_group() {
        let marker = tempfile::tempdir().unwrap();
        let pidfile = marker.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let e = run(
            Path::new("/bin/sh"),
            "test",
            &["-c".into(), script.into()],
            Limits {
                timeout: Duration::from_millis(300),
                file_size: None,
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, QemuImgError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // The grandchild (sleep) went with the group.
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(pid, 0) } == 0 {
            // A zombie until its parent is reaped: check the state.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "sleep {pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn runs_without_the_agents_fds_and_within_limits() {
        // An fd of ours without CLOEXEC would show up in the child's /proc/self/fd.
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: clearing FD_CLOEXEC on our own descriptor.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) };
        let out = run(
            Path::new("/bin/sh"),
            "test",
            &[
                "-c".into(),
                "ls /proc/self/fd; echo --; ulimit -v; ulimit -c; env".into(),
            ],
            Limits::probe(),
        )
        .await
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        // 0, 1, 2 and the fd ls itself opens for /proc/self/fd.
        let fds: Vec<&str> = lines.iter().take_while(|l| **l != "--").copied().collect();
        assert!(fds.len() <= 4, "inherited descriptors: {fds:?}");
        assert!(
            out.contains(&format!("--\n{}\n0\n", ADDRESS_SPACE / 1024)),
            "{out}"
        );
        assert!(!out.contains("RUST_"), "environment cleared: {out}");
        // A failure carries its status and stderr.
        let e = run(
            Path::new("/bin/sh"),
            "test",
            &["-c".into(), "echo broken >&2; exit 3".into()],
            Limits::probe(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("exit status 3") && e.contains("broken"), "{e}");
        let e = run(
            Path::new("/nonexistent/qemu-img"),
            "info",
            &[],
            Limits::probe(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("qemu-utils"), "{e}");
    }
}
