//! Guest RAM: anonymous mappings placed so that the host can back them with 2 MiB pages.
//!
//! KVM maps guest memory with a huge page in its second-level page tables only where the host
//! virtual address and the guest physical address have the same offset within 2 MiB and the
//! host page is a transparent huge page. A plain `mmap` returns 4 KiB-aligned addresses (Linux
//! aligns large anonymous mappings only since 6.7), so every guest access would fault and be
//! mapped 4 KiB at a time: 512 times the faults, and each fault is a VM exit. So each region is
//! mapped 2 MiB-aligned, with MADV_HUGEPAGE (for hosts whose THP mode is `madvise`), and with
//! MADV_DONTDUMP: a core dump of the VMM must not carry the guest's memory.

use std::io;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestAddress;

/// Guest RAM as the whole VMM uses it: every write the VMM makes through it (used rings,
/// device data, see also `mark_written`) is recorded in a dirty bitmap, 1 bit per 4 KiB page,
/// which live migration reads besides KVM's dirty log of the guest's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
type MmapRegion = vm_memory::MmapRegion<AtomicBitmap>;

const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mmap of {size} bytes failed: {source}")]
    Mmap { size: usize, source: io::Error },
    #[error("guest memory region at {addr:#x} ({size} bytes): {reason}")]
    Region {
        addr: u64,
        size: usize,
        reason: String,
    },
}

/// Guest memory for `ranges` (sorted, non-overlapping guest-physical ranges), each region
/// 2 MiB-aligned in the host's address space.
///
/// The mappings live as long as the process: a thvc-vmm process runs exactly one VM, and the
/// kernel takes the memory back when it exits.
pub fn create(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, size) in ranges {
        let region_error = |reason: String| MemoryError::Region {
            addr: addr.0,
            size,
            reason,
        };
        let host = map_aligned(size)?;
        // SAFETY: `host` is the start of a live private anonymous mapping of `size` bytes with
        // exactly this protection and these flags (map_aligned), never unmapped (see above).
        let mapping = unsafe { MmapRegion::build_raw(host, size, PROT, FLAGS) }
            .map_err(|e| region_error(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| region_error("ends beyond the guest address space".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region {
        addr: ranges.first().map_or(0, |r| r.0 .0),
        size: ranges.iter().map(|r| r.1).sum(),
        reason: e.to_string(),
    })
}

/// Records that the VMM wrote `len` bytes at `addr` behind vm-memory's back (a readv or
/// preadv into iovecs taken from guest memory), so that live migration sends them again.
pub fn mark_written(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    if let Ok(slice) = mem.get_slice(addr, len) {
        slice.bitmap().mark_dirty(0, len);
    }
}

const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `size` bytes at a 2 MiB-aligned address: maps 2 MiB more than needed and gives back
/// the unaligned head and the tail.
fn map_aligned(size: usize) -> Result<*mut u8, MemoryError> {
    let mmap_error = |size| MemoryError::Mmap {
        size,
        source: io::Error::last_os_error(),
    };
    let padded = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| MemoryError::Mmap {
            size,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing touches nothing
    // that exists.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), padded, PROT, FLAGS, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(mmap_error(padded));
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = padded - head - size;
    // SAFETY: both ranges lie inside the mapping made above and outside [start, start + size),
    // and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    let ptr = start as *mut libc::c_void;
    // Advice only: a host without THP or an old kernel still runs the guest, on 4 KiB pages.
    for (advice, name) in [
        (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
        (libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
    ] {
        // SAFETY: madvise on our own mapping changes no memory contents.
        if unsafe { libc::madvise(ptr, size, advice) } != 0 {
            tracing::debug!("{name} on guest memory: {}", io::Error::last_os_error());
        }
    }
    Ok(start as *mut u8)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn regions_are_huge_page_aligned_and_usable() {
        let mem = create(&[(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 4 << 20)])
            .expect("guest memory");
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let host = region.as_ptr() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "region at {:?}", region.start_addr());
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress((6 << 20) - 4))
            .expect("last word of the first region");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((6 << 20) - 4))
                .expect("read"),
            0xdead_beef
        );
        mem.write_obj(7u64, GuestAddress((1 << 32) + (4 << 20) - 8))
            .expect("last word of the second region");
        assert!(mem.read_obj::<u8>(GuestAddress(6 << 20)).is_err(), "hole");
    }

    #[test]
    fn absurd_sizes_fail_cleanly() {
        assert!(create(&[(GuestAddress(0), usize::MAX - 4096)]).is_err());
    }
}
