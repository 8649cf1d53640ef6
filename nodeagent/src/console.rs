//! The guest's serial console log, bounded without ever moving bytes.
//!
//! The VMM appends the console to `<log>/<name>/console.log`. Offsets into that file are the
//! client-visible console offsets: they only grow over the VM's life, across restarts of the
//! VMM and of the agent. To bound disk use the agent periodically punches a hole over
//! everything but the newest [`KEEP_BYTES`] (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): the file
//! keeps its apparent size, the blocks are freed, and a VMM writing to it needs no signal,
//! reopen or O_APPEND, so nothing is lost to a copy/truncate race. Readers find the start of
//! the retained window with `lseek(SEEK_DATA)`; a read below it resumes at the window start,
//! and the returned next offset tells the client how much it skipped.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use thiserror::Error;

/// Bytes of console kept on disk per VM.
pub const KEEP_BYTES: u64 = 1 << 20;
/// Trimming happens once the retained window exceeds KEEP_BYTES by this much, so the hole
/// punching runs rarely.
pub const TRIM_SLACK: u64 = 1 << 20;
/// Largest chunk one ReadConsole call returns.
pub const MAX_READ: usize = 64 << 10;

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("console log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> ConsoleError + '_ {
    move |source| ConsoleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Offset of the first retained byte (the end of the punched hole).
fn window_start(file: &File, size: u64) -> u64 {
    // SAFETY: lseek on a valid fd; the result is checked.
    let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if off < 0 {
        // ENXIO: no data at all (only a hole) -> nothing retained.
        size
    } else {
        off as u64
    }
}

/// Reads up to [`MAX_READ`] bytes starting at `offset` (or at the retained window's start if
/// `offset` lies before it). Returns the data and the offset to ask for next. A missing log
/// (VM never started) reads as empty.
pub fn read(path: &Path, offset: u64) -> Result<(Vec<u8>, u64), ConsoleError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let size = file.metadata().map_err(io_err(path))?.len();
    if offset >= size {
        // Past the end: nothing new yet (or the log was recreated and is shorter).
        return Ok((Vec::new(), offset.min(size)));
    }
    let start = offset.max(window_start(&file, size));
    if start >= size {
        return Ok((Vec::new(), size));
    }
    file.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
    let want = ((size - start) as usize).min(MAX_READ);
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        let n = file.read(&mut buf[got..]).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok((buf, start + got as u64))
}

/// Frees everything but the newest `keep` bytes once the retained window exceeds
/// `keep + slack`. Returns true if it punched.
pub fn trim(path: &Path, keep: u64, slack: u64) -> Result<bool, ConsoleError> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    let size = file.metadata().map_err(io_err(path))?.len();
    let start = window_start(&file, size);
    if size.saturating_sub(start) <= keep + slack {
        return Ok(false);
    }
    // Punch whole 4 KiB blocks only, so SEEK_DATA lands exactly on the window start.
    let end = (size - keep) & !4095;
    if end <= start {
        return Ok(false);
    }
    // SAFETY: fallocate on a valid fd with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            end as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io_err(path)(io::Error::last_os_error()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_with_offsets_and_trims_without_moving_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert_eq!(read(&path, 0).unwrap(), (vec![], 0));
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"hello ").unwrap();
        let (d, next) = read(&path, 0).unwrap();
        assert_eq!((&d[..], next), (&b"hello "[..], 6));
        assert_eq!(read(&path, next).unwrap(), (vec![], 6));
        // Write 3 MiB of numbered lines, then trim to the last 64 KiB.
        let mut total = 6u64;
        let mut line_no = 0u64;
        while total < 3 << 20 {
            let line = format!("line {line_no:08}\n");
            w.write_all(line.as_bytes()).unwrap();
            total += line.len() as u64;
            line_no += 1;
        }
        assert!(trim(&path, 64 << 10, 0).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), total);
        // A read from 0 now starts in the retained window, and its data is the file's tail.
        let (d, next) = read(&path, 0).unwrap();
        let start = next - d.len() as u64;
        assert!(start >= total - (64 << 10) - 4096 && start <= total - (64 << 10));
        assert!(d.iter().all(|&b| b != 0), "no hole bytes are served");
        // Appending after the trim continues at the same offsets.
        w.write_all(b"tail\n").unwrap();
        let mut off = start;
        let mut all = Vec::new();
        loop {
            let (d, n) = read(&path, off).unwrap();
            if d.is_empty() {
                break;
            }
            all.extend_from_slice(&d);
            off = n;
        }
        assert_eq!(off, total + 5);
        assert!(all.ends_with(b"tail\n"));
        assert!(!trim(&path, 64 << 10, 1 << 20).unwrap());
    }
}
