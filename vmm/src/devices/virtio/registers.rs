//! The register window of a virtio-mmio device as one page of host memory that KVM maps
//! read-only into the guest at the window's address.
//!
//! Every register read of the driver is then an ordinary memory load: no VM exit. That
//! matters most for InterruptStatus, which the driver reads on every interrupt: a trapped
//! read is a round trip out of KVM_RUN to the vCPU thread and back, per interrupt.
//! Writes to a read-only slot still exit, so the transport sees every write and re-publishes
//! the registers it affects before the vCPU runs again (QueueSel, then QueueNumMax, is
//! consistent). The worker thread sets interrupt and needs-reset bits here directly.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// One page: the virtio-mmio register block (0x000-0x0ff) and the device config space.
pub struct RegisterPage {
    base: NonNull<u8>,
}

// SAFETY: the page is plain memory owned by this value; every access goes through atomics or
// bounds-checked byte copies, and the mapping lives until drop.
unsafe impl Send for RegisterPage {}
// SAFETY: as above; concurrent users (vCPU threads, the worker, the guest) only use atomics
// on the 32-bit registers.
unsafe impl Sync for RegisterPage {}

impl RegisterPage {
    pub const SIZE: usize = 4096;

    pub fn new() -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping, no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        let page = RegisterPage { base };
        // Touch the page now: KVM must map our own page, not the shared zero page that a
        // later first write would replace.
        page.word(0).store(0, Ordering::SeqCst);
        Ok(page)
    }

    /// Where the page is in this process, for the KVM memory slot.
    pub fn host_address(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// The 32-bit register at `offset`. Offsets are the transport's constants, never guest
    /// input (guest accesses go through `read`).
    fn word(&self, offset: u64) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset as usize + 4 <= Self::SIZE,
            "register offset {offset:#x}"
        );
        // SAFETY: in bounds and 4-byte aligned (the page is page-aligned); the memory lives as
        // long as `self`, and is only accessed atomically as 32-bit words by this process.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset as usize).cast()) }
    }

    pub fn load(&self, offset: u64) -> u32 {
        self.word(offset).load(Ordering::SeqCst)
    }

    pub fn store(&self, offset: u64, value: u32) {
        self.word(offset).store(value, Ordering::SeqCst);
    }

    pub fn fetch_or(&self, offset: u64, bits: u32) {
        self.word(offset).fetch_or(bits, Ordering::SeqCst);
    }

    pub fn fetch_and(&self, offset: u64, bits: u32) {
        self.word(offset).fetch_and(bits, Ordering::SeqCst);
    }

    /// Sets the bits in `mask` to those of `value`, leaving the others as they are.
    pub fn store_masked(&self, offset: u64, mask: u32, value: u32) {
        let word = self.word(offset);
        let _ = word.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
            Some((old & !mask) | (value & mask))
        });
    }

    /// Copies `bytes` to `offset` (the config space, written once at creation).
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        let end = offset.checked_add(bytes.len());
        assert!(
            end.is_some_and(|end| end <= Self::SIZE),
            "config space fits the page"
        );
        // SAFETY: in bounds (checked above); byte writes to plain memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(offset),
                bytes.len(),
            )
        };
    }

    /// What the guest reads at `offset` (any width, any alignment); zeroes past the page.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                // SAFETY: in bounds; a volatile byte load, as the guest would do it.
                Some(at) if at < Self::SIZE as u64 => unsafe {
                    self.base.as_ptr().add(at as usize).read_volatile()
                },
                _ => 0,
            };
        }
    }
}

impl Drop for RegisterPage {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once. The devices live as long as the VM; should
        // a vCPU still run, KVM's MMU notifier drops its mapping of the page with ours, and
        // the guest's next access fails KVM_RUN instead of reading freed memory.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_bytes_and_reads_past_the_end() {
        let page = RegisterPage::new().expect("page");
        page.store(0x10, 0x1122_3344);
        page.fetch_or(0x10, 0x8000_0000);
        page.fetch_and(0x10, !0x44);
        assert_eq!(page.load(0x10), 0x9122_3300);
        page.store_masked(0x10, 0xff, 0x1234_56aa);
        assert_eq!(page.load(0x10), 0x9122_33aa);
        page.write_bytes(0x100, &[1, 2, 3]);
        let mut d = [0xffu8; 6];
        page.read(0x100, &mut d);
        assert_eq!(d, [1, 2, 3, 0, 0, 0]);
        let mut odd = [0u8; 2];
        page.read(0x11, &mut odd);
        assert_eq!(odd, [0x33, 0x22], "any width and alignment, little endian");
        let mut tail = [0xffu8; 4];
        page.read(RegisterPage::SIZE as u64 - 2, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0], "nothing past the page");
        page.read(u64::MAX - 1, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0], "no overflow at the top");
    }
}
