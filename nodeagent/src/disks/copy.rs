//! Copying a raw image into the disk store without spending space on what it does not hold:
//! a reflink (FICLONE: the new file shares the image's blocks until either is written) where
//! the file system offers it, else a copy of the data ranges only (SEEK_DATA/SEEK_HOLE,
//! all-zero blocks skipped), so holes stay holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// `FICLONE` = `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;
const CHUNK: usize = 1 << 20;

/// Makes `dst` share `src`'s blocks. An error for which [`is_unsupported`] holds means the
/// file system cannot (another file system, or none of its kind can): copy instead.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: ioctl on two open descriptors; FICLONE takes the source fd as its argument.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The errors with which file systems say "no reflink here".
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS)
    )
}

/// Copies the first `len` bytes of `src` into the empty file `dst`, writing only data that
/// is not zero; `dst` ends up `len` bytes long. Returns the bytes written.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = match data_range(src, pos, len)? {
            Some(r) => r,
            None => break,
        };
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            src.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..n], off)?;
                written += n as u64;
            }
            off += n as u64;
        }
        pos = end;
    }
    dst.set_len(len)?;
    Ok(written)
}

/// The next range of data at or after `pos` (below `len`), or `None` if only holes follow.
/// Without SEEK_DATA support, everything is data.
fn data_range(f: &File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let seek = |whence, at: u64| -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor; offsets fit off_t (files below 8 EiB).
        let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let start = match seek(libc::SEEK_DATA, pos) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((pos, len))),
        Err(e) => return Err(e),
    };
    if start >= len {
        return Ok(None);
    }
    let end = seek(libc::SEEK_HOLE, start)?.unwrap_or(len).min(len);
    Ok(Some((start, end)))
}

/// Bytes a file occupies on disk.
pub fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_copy_keeps_holes_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let mut src = File::create(&src_path).unwrap();
        let len = 64u64 << 20;
        src.set_len(len).unwrap();
        src.write_all_at(&[0xab; 3 << 20], 1 << 20).unwrap();
        // Allocated, but zeros: skipped as well.
        src.write_all_at(&vec![0u8; 2 << 20], 10 << 20).unwrap();
        src.write_all_at(b"tail", len - 4).unwrap();
        src.flush().unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        let written = sparse_copy(&src, &dst, len).unwrap();
        assert!(written < 5 << 20, "{written}");
        assert_eq!(
            std::fs::read(&src_path).unwrap(),
            std::fs::read(&dst_path).unwrap()
        );
        let alloc = allocated(&std::fs::metadata(&dst_path).unwrap());
        assert!(alloc < 6 << 20, "holes stayed holes: {alloc}");
    }

    #[test]
    fn reflink_works_or_says_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, vec![7u8; 1 << 16]).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        match reflink(&src, &dst) {
            Ok(()) => assert_eq!(std::fs::read(&dst_path).unwrap(), vec![7u8; 1 << 16]),
            Err(e) => assert!(is_unsupported(&e), "{e}"),
        }
    }
}
