//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT, IDT
//! 0x0000_6000  PVH start info and memory map (firmware boot)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  initial stack
//! 0x0000_9000  PML4, PDPT, PD: identity map of the first GiB
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  EBDA: end of low RAM in the E820 map
//! 0x000e_0000  ACPI tables (RSDP first, where the kernel scans for it)
//! 0x000f_0000  SMBIOS 3.0 entry point and tables (where Linux and edk2's CloudHv look)
//! 0x000f_fff0  reset vector: a stub that resets the VM when a guest reboots through the BIOS
//! 0x0010_0000  kernel, then initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole, which holds:
//!   0xc000_0000    PCI 32-bit memory window (256 MiB): BARs of PCI devices
//!   0xd000_0000    virtio-mmio devices, 4 KiB each
//!   0xe000_0000    PCI ECAM (1 MiB: bus 0), reserved in the E820 map
//!   0xfeb0_0000    GED, then IOAPIC, LAPIC, KVM identity map and TSS
//! 0x1_0000_0000 RAM above the hole when the guest has more than 3 GiB
//! then         PCI 64-bit memory window: the first GiB boundary above RAM, up to 64 GiB and
//!              below the guest's physical address width
//! ```
//!
//! The PCI windows are what the host bridge in the DSDT offers its devices (its `_CRS`): Linux
//! keeps BARs found inside them and assigns new ones only there. ECAM, the memory-mapped
//! configuration space, is announced in the MCFG table; Linux uses it only if the range is also
//! reserved in the E820 map (or by a motherboard-resources device in the DSDT), hence the
//! reserved entry.

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The most memory map entries the start info carries (they must end below the zero page).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 16;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// First byte past the usable low memory below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
/// The SMBIOS entry point; the ACPI tables must end below it.
pub const SMBIOS_START: u64 = 0xf0000;
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

/// PCI 32-bit memory window: BARs below 4 GiB, from the start of the MMIO hole up to the
/// virtio-mmio devices.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// PCI Express enhanced configuration space (ECAM): 4 KiB per function, 8 functions per
/// device, 32 devices per bus, buses 0 to `PCI_BUS_END`.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The last PCI bus number: the platform has bus 0 only.
pub const PCI_BUS_END: u8 = 0;
/// The 64-bit memory window's alignment (also its smallest size) and its largest size.
const PCI_MMIO64_ALIGN: u64 = 1 << 30;
const PCI_MMIO64_MAX_SIZE: u64 = 64 << 30;

// The stack sits between the zero page and the page tables; the command line below the EBDA.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(CMDLINE_START + 2048 < EBDA_START);
const _: () = assert!(PVH_MEMMAP_START >= PVH_INFO_START + 56);
const _: () = assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START);
const _: () = assert!(ACPI_START < SMBIOS_START && SMBIOS_START < RESET_VECTOR);

/// Whether [a, a + a_size) and [b, b + b_size) are disjoint.
const fn disjoint(a: u64, a_size: u64, b: u64, b_size: u64) -> bool {
    a + a_size <= b || b + b_size <= a
}

// The PCI windows and ECAM live in the MMIO hole, clear of each other and of every fixed device.
const _: () = assert!(PCI_MMIO32_START >= MMIO_GAP_START);
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= VIRTIO_MMIO_START);
const _: () = assert!(PCI_ECAM_SIZE == (PCI_BUS_END as u64 + 1) << 20);
const _: () = assert!(PCI_ECAM_START.is_multiple_of(PCI_ECAM_SIZE));
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= MMIO_GAP_END);
const _: () = {
    let others = [
        (PCI_MMIO32_START, PCI_MMIO32_SIZE),
        (
            VIRTIO_MMIO_START,
            crate::config::MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE,
        ),
        (GED_MMIO_BASE, 0x1000),
        (IOAPIC_ADDR as u64, 0x1000),
        (LAPIC_ADDR as u64, 0x1000),
        (KVM_IDENTITY_MAP_ADDR, 0x1000),
        (KVM_TSS_ADDR, 0x3000),
    ];
    let mut i = 0;
    while i < others.len() {
        assert!(disjoint(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            others[i].0,
            others[i].1
        ));
        i += 1;
    }
};

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

/// The PCI 64-bit memory window `(start, size)` of a guest with `mem_size` bytes of RAM and
/// `phys_bits` bits of guest physical address: from the first GiB boundary at or above both
/// 4 GiB and the end of RAM, 64 GiB or as much of it as stays below `1 << phys_bits` (the guest
/// ignores windows it cannot address). None if not even 1 GiB fits.
pub fn pci_mmio64_window(mem_size: u64, phys_bits: u8) -> Option<(u64, u64)> {
    let ram_end = match mem_size.checked_sub(MMIO_GAP_START) {
        Some(high) => MMIO_GAP_END.checked_add(high)?,
        None => MMIO_GAP_END,
    };
    let start = ram_end.checked_next_multiple_of(PCI_MMIO64_ALIGN)?;
    let limit = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
    let size = limit.checked_sub(start)?.min(PCI_MMIO64_MAX_SIZE) & !(PCI_MMIO64_ALIGN - 1);
    (size >= PCI_MMIO64_ALIGN).then_some((start, size))
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
    fn mmio64_window_starts_at_4_gib_for_small_guests() {
        assert_eq!(pci_mmio64_window(512 << 20, 46), Some((4 << 30, 64 << 30)));
        assert_eq!(
            pci_mmio64_window(MMIO_GAP_START, 46),
            Some((4 << 30, 64 << 30))
        );
    }

    #[test]
    fn mmio64_window_starts_on_the_gib_after_ram() {
        // 3.5 GiB: RAM above the hole ends at 4.5 GiB, the window starts at 5 GiB.
        assert_eq!(pci_mmio64_window(3584 << 20, 46), Some((5 << 30, 64 << 30)));
        // 4 GiB: RAM ends exactly at 5 GiB, already aligned.
        assert_eq!(pci_mmio64_window(4 << 30, 46), Some((5 << 30, 64 << 30)));
        let (start, _) = pci_mmio64_window(3584 << 20, 46).expect("fits");
        let regions = ram_regions(3584 << 20);
        let last = regions.last().expect("RAM");
        assert!(last.0 .0 + last.1 as u64 <= start, "above all RAM");
    }

    #[test]
    fn mmio64_window_is_clipped_to_the_physical_address_width() {
        // 36 bits = 64 GiB: from 4 GiB only 60 GiB remain.
        assert_eq!(pci_mmio64_window(1 << 30, 36), Some((4 << 30, 60 << 30)));
        // 33 bits = 8 GiB, but RAM above the hole already ends at 9 GiB.
        assert_eq!(pci_mmio64_window(8 << 30, 33), None);
        // RAM ends at 7 GiB: exactly one GiB left below 8 GiB.
        assert_eq!(pci_mmio64_window(6 << 30, 33), Some((7 << 30, 1 << 30)));
        // 32 bits: nothing above 4 GiB is addressable.
        assert_eq!(pci_mmio64_window(1 << 30, 32), None);
        assert_eq!(pci_mmio64_window(1 << 30, 0), None);
    }

    #[test]
    fn mmio64_window_never_overflows() {
        assert_eq!(pci_mmio64_window(u64::MAX, 64), None);
        assert_eq!(pci_mmio64_window(u64::MAX - (1 << 30), 255), None);
        assert_eq!(pci_mmio64_window(1 << 30, 64), Some((4 << 30, 64 << 30)));
        assert_eq!(pci_mmio64_window(1 << 30, 255), Some((4 << 30, 64 << 30)));
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
