//! Identifying processes across agent restarts: a pid alone can be reused, so every
//! recorded process carries its start time (field 22 of `/proc/PID/stat`, in clock ticks
//! since boot) and is only trusted while both still match.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::unix::AsyncFd;

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("process {pid}: {source}")]
    Io {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("process {pid}: unexpected /proc/{pid}/stat format")]
    Format { pid: i32 },
}

/// A process identity that survives pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

/// Start time of `pid` in clock ticks since boot.
pub fn start_time(pid: i32) -> Result<u64, ProcError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| ProcError::Io { pid, source })?;
    parse_start_time(&stat).ok_or(ProcError::Format { pid })
}

/// The comm field may contain spaces and parentheses, so fields are counted after the
/// last ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ')': field 3 (state) is index 0, so field 22 (starttime) is index 19.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// What a process has used: CPU time (user and system) and resident memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// The CPU time (utime + stime of `/proc/PID/stat`) and `VmRSS` (`/proc/PID/status`) of
/// `pid`. Blocking (two small /proc reads).
pub fn usage(pid: i32) -> Result<Usage, ProcError> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|source| ProcError::Io { pid, source })
    };
    let ticks = parse_cpu_ticks(&read("stat")?).ok_or(ProcError::Format { pid })?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    // A kernel thread or a zombie has no VmRSS: nothing resident.
    let rss_bytes = parse_vm_rss(&read("status")?).unwrap_or(0);
    Ok(Usage {
        cpu_seconds: ticks as f64 / hz,
        rss_bytes,
    })
}

/// utime + stime (fields 14 and 15) in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// `VmRSS:   1234 kB` in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let kib: u64 = l
            .strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    })
}

/// State letter of `pid` (R, S, Z, ...), or `None` if it does not exist.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

impl ProcessId {
    /// Identity of the running process `pid`.
    pub fn of(pid: i32) -> Result<Self, ProcError> {
        Ok(ProcessId {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// True while this exact process is alive (zombies count as dead).
    pub fn is_alive(&self) -> bool {
        match start_time(self.pid) {
            Ok(t) if t == self.start_time => !matches!(state(self.pid), Some('Z') | Some('X')),
            _ => false,
        }
    }

    /// Sends `signal` if (and only if) the process is still this one.
    pub fn signal(&self, signal: i32) -> Result<bool, ProcError> {
        if !self.is_alive() {
            return Ok(false);
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid, signal) };
        if rc == 0 {
            Ok(true)
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(ProcError::Io {
                    pid: self.pid,
                    source: e,
                })
            }
        }
    }

    /// Waits until the process exits, whether or not it is our child (pidfd becomes
    /// readable on exit). Returns at once if it is already gone.
    pub async fn wait_exit(&self) -> Result<(), ProcError> {
        // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(ProcError::Io {
                pid: self.pid,
                source: e,
            });
        }
        // SAFETY: fd is a freshly opened descriptor that we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The pid may have been reused between recording and opening the pidfd.
        if !self.is_alive() {
            return Ok(());
        }
        // SAFETY: `owned` keeps the pidfd open for as long as the AsyncFd lives.
        let afd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| ProcError::Io {
                pid: self.pid,
                source: std::io::Error::other(e.to_string()),
            })?;
        let _guard = afd.readable().await.map_err(|source| ProcError::Io {
            pid: self.pid,
            source,
        })?;
        let _ = afd.get_ref().as_raw_fd();
        Ok(())
    }
}

/// Reads a JSON record of a process identity, `None` if the file does not exist.
pub fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
    }

    #[test]
    fn parses_cpu_ticks_and_rss() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 17 25 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
        let status = "Name:\tthvc-vmm\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
        let me = usage(std::process::id() as i32).unwrap();
        assert!(me.rss_bytes > 0 && me.cpu_seconds >= 0.0, "{me:?}");
    }

    #[test]
    fn own_process_is_alive_and_changed_start_time_is_not() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let other = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!other.is_alive());
    }
}
