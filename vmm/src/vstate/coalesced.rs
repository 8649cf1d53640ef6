//! Coalesced port writes: KVM's ring of buffered guest writes, for the PCI address port.
//!
//! Every PCI configuration access through mechanism #1 is two port accesses: the guest
//! writes the address to 0xCF8, then reads or writes the data at 0xCFC. x86 Linux uses it
//! for the first 256 bytes of every function even when ECAM is announced, and in a nested or
//! busy host each exit costs tens of microseconds. With the address port registered as a
//! coalesced zone (`KVM_CAP_COALESCED_PIO`), KVM appends the 0xCF8 write to a ring in shared
//! memory and returns to the guest at once; only the data access exits. Before the VMM
//! handles any port exit it replays the ring in order, so the address register holds what
//! the guest wrote last, as QEMU does for its q35 and i440fx machines.
//!
//! The ring is one page per VM, shared by all vCPUs; the kernel is its only producer and the
//! VMM drains it under a lock. A guest that writes the port faster than the VMM drains gets
//! ordinary exits once the ring is full (KVM falls back to them), so order is kept and
//! nothing is lost or queued without bound.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};

use crate::devices::Bus;

#[derive(Debug, thiserror::Error)]
pub enum CoalescedError {
    #[error("cannot map KVM's coalesced write ring: {0}")]
    Map(std::io::Error),
    #[error("KVM cannot coalesce writes to port {port:#x}: {source}")]
    Register {
        port: u16,
        source: kvm_ioctls::Error,
    },
}

/// The VM's ring of coalesced writes, mapped from a vCPU fd.
pub struct CoalescedRing {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// Entries in the ring (what fits in the page after its two indices).
    entries: u32,
    /// One vCPU drains at a time: `first` belongs to the consumer.
    drain: Mutex<()>,
}

// SAFETY: the mapping is only accessed through `drain`, which serialises the consumer side
// under its mutex and reads the kernel's side with atomic loads; the pointer stays valid
// for the life of the value (unmapped in Drop).
unsafe impl Send for CoalescedRing {}
// SAFETY: see Send: all access goes through `drain`'s mutex.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring and registers `ports` (start, length) as coalesced; None when KVM
    /// cannot coalesce port writes (older kernels: every write then exits, as before).
    pub fn for_ports(
        kvm: &Kvm,
        vm: &VmFd,
        vcpu: &impl AsRawFd,
        ports: &[(u16, u32)],
    ) -> Result<Option<CoalescedRing>, CoalescedError> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return Ok(None);
        }
        let ring = Self::map(vcpu)?;
        for &(port, len) in ports {
            vm.register_coalesced_mmio(IoEventAddress::Pio(port.into()), len)
                .map_err(|source| CoalescedError::Register { port, source })?;
        }
        Ok(Some(ring))
    }

    fn map(vcpu: &impl AsRawFd) -> Result<CoalescedRing, CoalescedError> {
        // SAFETY: sysconf has no preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(CoalescedError::Map(std::io::Error::last_os_error())),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a shared mapping of one page of the vCPU fd at the offset where KVM keeps
        // the VM's coalesced ring (KVM_CAP_COALESCED_MMIO/PIO, checked by the caller); the
        // result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(CoalescedError::Map(std::io::Error::last_os_error()));
        }
        let ring = NonNull::new(addr.cast::<kvm_coalesced_mmio_ring>())
            .ok_or_else(|| CoalescedError::Map(std::io::Error::other("mmap returned null")))?;
        let entries = (page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>();
        Ok(CoalescedRing {
            ring,
            page_size,
            entries: entries as u32,
            drain: Mutex::new(()),
        })
    }

    /// Replays the buffered port writes, oldest first, on `pio`. Cheap when the ring is
    /// empty (two loads); called before every port exit is handled.
    pub fn drain(&self, pio: &Bus) {
        let _consumer = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let base = self.ring.as_ptr();
        // SAFETY: `first` and `last` are two aligned u32 at the start of the mapped page;
        // the kernel writes `last` (after the entry, with a write barrier), we write
        // `first`: atomic accesses on both sides.
        let (first, last) = unsafe {
            (
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*base).first)),
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*base).last)),
            )
        };
        loop {
            let head = first.load(Ordering::Relaxed);
            let tail = last.load(Ordering::Acquire);
            if head == tail {
                return;
            }
            if head >= self.entries || tail >= self.entries {
                // Never from KVM; if it happens, drop the ring's content rather than read
                // outside the page.
                tracing::error!("coalesced write ring indices out of range ({head}, {tail})");
                first.store(tail.min(self.entries - 1), Ordering::Release);
                return;
            }
            // SAFETY: `head` < entries, so the entry lies inside the mapped page; it is the
            // kernel's to write only after we advance `first` past it.
            let entry = unsafe {
                let entries =
                    std::ptr::addr_of!((*base).coalesced_mmio).cast::<kvm_coalesced_mmio>();
                std::ptr::read_volatile(entries.add(head as usize))
            };
            // SAFETY: both union members are a u32.
            let is_pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            let len = (entry.len as usize).min(entry.data.len());
            if is_pio {
                pio.write(entry.phys_addr, &entry.data[..len]);
            }
            first.store((head + 1) % self.entries, Ordering::Release);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page mapped in `map`, unmapped once.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.page_size) };
    }
}
