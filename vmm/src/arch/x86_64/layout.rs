//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT, IDT
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  initial stack
//! 0x0000_9000  PML4, PDPT, PD: identity map of the first GiB
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  EBDA: end of low RAM in the E820 map
//! 0x000e_0000  ACPI tables (RSDP first, where the kernel scans for it)
//! 0x000f_fff0  reset vector: a stub that resets the VM when a guest reboots through the BIOS
//! 0x0010_0000  kernel, then initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices, GED, IOAPIC, LAPIC, KVM TSS
//! 0x1_0000_0000 RAM above the hole when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// First byte past the usable low memory below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const HIMEM_START: u64 = 0x100000;
/// Where an x86 CPU starts after reset (F000:FFF0): a stub there resets the VM.
pub const RESET_VECTOR: u64 = 0xffff0;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed inside the MMIO hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The Generic Event Device's register (power button events), below the IOAPIC.
pub const GED_MMIO_BASE: u64 = 0xfeb0_0000;
/// The GED's interrupt: the last IOAPIC pin, clear of the legacy ISA IRQs and of the
/// virtio-mmio devices, which are numbered upwards from 5.
pub const GED_GSI: u32 = 23;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map on Intel; both live in the
/// MMIO hole where they cannot collide with RAM.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

// The stack sits between the zero page and the page tables; the command line below the EBDA.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(CMDLINE_START + 2048 < EBDA_START);

/// The RAM regions of a guest with `size` bytes of memory: low RAM up to the MMIO hole, the
/// rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_GAP_START {
        regions.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    regions
}

/// End (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let size = 3500u64 << 20;
        let regions = ram_regions(size);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(regions[1].0, GuestAddress(MMIO_GAP_END));
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, size, "no RAM is lost to the hole");
    }

    #[test]
    fn exactly_three_gib_needs_no_high_region() {
        assert_eq!(ram_regions(MMIO_GAP_START).len(), 1);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, BOOT_IDT_START),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, PDE_START + 0x1000),
            (CMDLINE_START, CMDLINE_START + 2048),
            (ACPI_START, RESET_VECTOR),
            (RESET_VECTOR, RESET_VECTOR + 16),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 < a.1);
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
