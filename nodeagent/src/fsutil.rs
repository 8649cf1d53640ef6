//! Crash-safe file updates: every piece of persistent state is written to a temporary file
//! in the same directory, fsynced, renamed over the target and the directory fsynced, so a
//! crash (or SIGKILL) at any point leaves either the old or the new content, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no parent directory")]
    NoParent { path: PathBuf },
}

impl FsError {
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        FsError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name for a temporary sibling of `target` that no other writer (thread or process) uses.
pub fn temp_sibling(target: &Path) -> Result<PathBuf, FsError> {
    let dir = target.parent().ok_or_else(|| FsError::NoParent {
        path: target.to_owned(),
    })?;
    let base = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{base}.tmp.{}.{n}", std::process::id())))
}

/// fsyncs a directory so a rename or unlink in it is durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    let f = File::open(dir).map_err(|e| FsError::io("open directory", dir, e))?;
    f.sync_all()
        .map_err(|e| FsError::io("fsync directory", dir, e))
}

/// Atomically replaces `target` with `data` (temp file, fsync, rename, fsync directory).
pub fn write_atomic(target: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let tmp = temp_sibling(target)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| FsError::io("create", &tmp, e))?;
        f.write_all(data)
            .map_err(|e| FsError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| FsError::io("fsync", &tmp, e))?;
        fs::rename(&tmp, target).map_err(|e| FsError::io("rename into place", target, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(target.parent().unwrap_or(Path::new("/")))
}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists` then): publishing a file
/// never replaces one placed meanwhile.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let f = CString::new(from.as_os_str().as_bytes())?;
    let t = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes `path` (if present) and makes the removal durable.
pub fn remove_durable(path: &Path) -> Result<(), FsError> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(path.parent().unwrap_or(Path::new("/"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::io("remove", path, e)),
    }
}

/// Creates `dir` and its parents with `mode` for the directories it creates.
pub fn create_dir_all(dir: &Path, mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| FsError::io("create directory", dir, e))
}

/// Removes leftovers of interrupted [`write_atomic`] calls in `dir`: temporary files whose
/// writer is gone. A live writer's are left alone: VM supervisors outlive the agent and write
/// their records into the run directories at any time (an agent starting while one recorded
/// its VMM's exit removed its temporary file, and the exit status was lost).
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".tmp.") && !writer_alive(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether the process that names a temporary file (see [`temp_sibling`]: `.NAME.tmp.PID.N`)
/// still runs. A reused PID keeps a stale file until a later start: harmless.
fn writer_alive(temp_name: &str) -> bool {
    let mut parts = temp_name.rsplit('.');
    let (Some(_n), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    pid.parse::<u32>()
        .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_temporary_files_of_writers_that_are_gone_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let live = temp_sibling(&dir.path().join("exit.json")).unwrap();
        let dead = dir.path().join(format!(".exit.json.tmp.{gone_pid}.0"));
        let odd = dir.path().join(".exit.json.tmp.x");
        let kept = dir.path().join("exit.json");
        for f in [&live, &dead, &odd, &kept] {
            std::fs::write(f, b"{}").unwrap();
        }
        remove_stale_temps(dir.path());
        assert!(live.exists(), "a live writer's file is its own");
        assert!(!dead.exists() && !odd.exists());
        assert!(kept.exists());
    }

    #[test]
    fn atomic_write_replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.json");
        write_atomic(&target, b"one", 0o600).unwrap();
        write_atomic(&target, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        remove_durable(&target).unwrap();
        remove_durable(&target).unwrap();
        assert!(!target.exists());
    }
}
