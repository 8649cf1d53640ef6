//! Guest RAM in a snapshot's memory file: each RAM region at its own offset, pages of zeros
//! left as holes (a sparse file: an idle 1 GiB guest takes what it touched, not 1 GiB), read
//! back data range by data range (`SEEK_DATA`/`SEEK_HOLE`) so that the restored VM's memory
//! stays as sparse as the snapshot.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write the memory file: {0}")]
    Write(io::Error),
    #[error("cannot read the memory file: {0}")]
    Read(io::Error),
    #[error("guest memory at {0:#x} is not readable or writable by the VMM")]
    Guest(u64),
    #[error(
        "the snapshot's memory ({snapshot}) is not this VM's ({here}): restore with the \
         memory size the VM had"
    )]
    Layout { snapshot: String, here: String },
    #[error("the memory file has {size} bytes; the snapshot's RAM needs {needed}")]
    Short { size: u64, needed: u64 },
}

/// One RAM region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub guest_addr: u64,
    pub size: u64,
    pub offset: u64,
}

const PAGE: usize = 4096;
/// Guest memory is copied out through a buffer of this size.
const CHUNK: usize = 1 << 20;

/// The RAM regions of `mem`, each at the offset it has in a memory file.
pub fn ranges_of(mem: &GuestMemoryMmap) -> Vec<Range> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let range = Range {
                guest_addr: region.start_addr().0,
                size: region.len(),
                offset,
            };
            offset += region.len();
            range
        })
        .collect()
}

fn describe(ranges: &[Range]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} MiB at {:#x}", r.size >> 20, r.guest_addr))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Writes the guest's RAM into `file` (empty, or truncated here); returns the ranges and the
/// bytes of data written (the rest are holes). The guest must not run meanwhile.
pub fn save(mem: &GuestMemoryMmap, file: &File) -> Result<(Vec<Range>, u64), MemoryFileError> {
    let ranges = ranges_of(mem);
    file.set_len(0).map_err(MemoryFileError::Write)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    for range in &ranges {
        let mut done = 0;
        while done < range.size {
            let len = (range.size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            let addr = range.guest_addr + done;
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(|_| MemoryFileError::Guest(addr))?;
            // Runs of pages that are not all zeros, written as one pwrite each.
            let mut page = 0;
            while page < len {
                let is_zero = |p: usize| chunk[p..(p + PAGE).min(len)].iter().all(|b| *b == 0);
                if is_zero(page) {
                    page += PAGE;
                    continue;
                }
                let start = page;
                while page < len && !is_zero(page) {
                    page += PAGE;
                }
                let end = page.min(len);
                file.write_all_at(&chunk[start..end], range.offset + done + start as u64)
                    .map_err(MemoryFileError::Write)?;
                written += (end - start) as u64;
            }
            done += len as u64;
        }
    }
    // The file's size covers every range, trailing zeros included.
    let total = ranges.last().map_or(0, |r| r.offset + r.size);
    file.set_len(total).map_err(MemoryFileError::Write)?;
    Ok((ranges, written))
}

/// The next data range at or after `from` in `file`, as (start, end); None past the last.
/// Where the file system cannot tell (no SEEK_DATA), everything is data.
fn next_data(file: &File, from: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; the offsets are checked below.
    let start = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) => Ok(Some((from, end))),
            _ => Err(e),
        };
    }
    let start = start as u64;
    if start >= end {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((start, (hole as u64).min(end))))
}

/// Reads the memory file into a new VM's RAM, which must have the snapshot's layout.
pub fn load(mem: &GuestMemoryMmap, file: &File, ranges: &[Range]) -> Result<(), MemoryFileError> {
    let here = ranges_of(mem);
    if here != ranges {
        return Err(MemoryFileError::Layout {
            snapshot: describe(ranges),
            here: describe(&here),
        });
    }
    let needed = ranges.last().map_or(0, |r| r.offset + r.size);
    let size = file.metadata().map_err(MemoryFileError::Read)?.len();
    if size < needed {
        return Err(MemoryFileError::Short { size, needed });
    }
    let mut buf = vec![0u8; CHUNK];
    for range in ranges {
        let end = range.offset + range.size;
        let mut at = range.offset;
        while let Some((start, stop)) = next_data(file, at, end).map_err(MemoryFileError::Read)? {
            let mut pos = start;
            while pos < stop {
                let len = (stop - pos).min(CHUNK as u64) as usize;
                file.read_exact_at(&mut buf[..len], pos)
                    .map_err(MemoryFileError::Read)?;
                let addr = range.guest_addr + (pos - range.offset);
                mem.write_slice(&buf[..len], GuestAddress(addr))
                    .map_err(|_| MemoryFileError::Guest(addr))?;
                pos += len as u64;
            }
            at = stop;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        crate::vstate::memory::create(&ranges).expect("guest memory")
    }

    /// A fresh file in a directory of its own; the directory goes when the guard drops.
    fn temp_file(name: &str) -> (tempfile::TempDir, File) {
        let dir = tempfile::Builder::new()
            .prefix("thvc-mem-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        (dir, file)
    }

    #[test]
    fn memory_comes_back_byte_for_byte_and_zero_pages_are_holes() {
        let layout = [(0, 8 << 20), (1 << 32, 4 << 20)];
        let mem = memory(&layout);
        mem.write_slice(b"first page", GuestAddress(0)).expect("w");
        mem.write_slice(&[0xab; 3 * PAGE], GuestAddress((3 << 20) + 100))
            .expect("w");
        mem.write_slice(b"high", GuestAddress((1 << 32) + (4 << 20) - 4))
            .expect("w");
        let (_dir, file) = temp_file("roundtrip");
        let (ranges, written) = save(&mem, &file).expect("save");
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[1].offset, 8 << 20);
        // Page 0, four pages touched by the unaligned run, the last page of the high range.
        assert_eq!(written, 6 * PAGE as u64);
        assert_eq!(file.metadata().expect("stat").len(), 12 << 20);

        let restored = memory(&layout);
        load(&restored, &file, &ranges).expect("load");
        let mut a = vec![0u8; 8 << 20];
        let mut b = vec![0u8; 8 << 20];
        mem.read_slice(&mut a, GuestAddress(0)).expect("r");
        restored.read_slice(&mut b, GuestAddress(0)).expect("r");
        assert!(a == b, "low RAM differs");
        let mut tail = [0u8; 4];
        restored
            .read_slice(&mut tail, GuestAddress((1 << 32) + (4 << 20) - 4))
            .expect("r");
        assert_eq!(&tail, b"high");
    }

    #[test]
    fn another_layout_or_a_short_file_is_refused() {
        let mem = memory(&[(0, 4 << 20)]);
        let (_dir, file) = temp_file("refused");
        let (ranges, _) = save(&mem, &file).expect("save");
        let bigger = memory(&[(0, 8 << 20)]);
        let e = load(&bigger, &file, &ranges).expect_err("layout");
        assert!(e.to_string().contains("4 MiB at 0x0"), "{e}");
        file.set_len(1 << 20).expect("truncate");
        let e = load(&mem, &file, &ranges).expect_err("short");
        assert!(matches!(e, MemoryFileError::Short { .. }), "{e}");
    }
}
