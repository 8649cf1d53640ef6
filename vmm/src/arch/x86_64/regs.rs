//! Initial vCPU register state: for the Linux 64-bit boot protocol long mode with an identity
//! map of the first GiB, flat segments, RSI pointing at the zero page; for firmware entered
//! through PVH 32-bit protected mode without paging, flat segments, EBX pointing at the
//! start info.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot page tables or GDT to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM rejected the initial {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT descriptor from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register a GDT descriptor at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let granularity = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granularity,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // gdt_entry(0xa09b, 0, 0xfffff)
    0x00cf_9300_0000_ffff, // gdt_entry(0xc093, 0, 0xfffff)
    0x008f_8b00_0000_ffff, // gdt_entry(0x808b, 0, 0xfffff)
];

/// The PVH GDT: null, 32-bit code, data, TSS (the PVH ABI's flat 32-bit segments).
pub const PVH_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff, // gdt_entry(0xc09b, 0, 0xfffff)
    0x00cf_9300_0000_ffff, // gdt_entry(0xc093, 0, 0xfffff)
    0x008f_8b00_0000_ffff, // gdt_entry(0x808b, 0, 0xfffff)
];

/// Where and in which state vCPU 0 starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// A Linux kernel's 64-bit entry point.
    Linux64(GuestAddress),
    /// A PVH entry point (firmware), with the address of its start info.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
}

impl BootEntry {
    fn gdt(&self) -> &'static [u64; 4] {
        match self {
            BootEntry::Linux64(_) => &BOOT_GDT,
            BootEntry::Pvh { .. } => &PVH_GDT,
        }
    }
}

/// Writes the identity-mapping page tables (first GiB, 2 MiB pages) into guest memory.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    // PML4[0] -> PDPT, PDPT[0] -> PD; present + writable.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        // present + writable + page size (2 MiB).
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

fn write_gdt_and_idt(mem: &GuestMemoryMmap, gdt: &[u64; 4]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(
            *entry,
            GuestAddress(BOOT_GDT_START).unchecked_add(i as u64 * 8),
        )?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    Ok(())
}

/// Flat segments from `gdt` and the GDT/IDT registers pointing at the boot tables.
fn flat_segments(mut sregs: kvm_sregs, gdt: &[u64; 4]) -> kvm_sregs {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs
}

/// Special registers for the PVH entry: protected mode, no paging, flat 32-bit segments.
pub fn pvh_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat_segments(sregs, &PVH_GDT);
    sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// Special registers for long mode, given the vCPU's current ones.
pub fn long_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat_segments(sregs, &BOOT_GDT);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// MSRs Linux expects a boot loader to have set: syscall MSRs cleared, fast strings on, and
/// write-back as the default memory type (without it the guest runs uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WRBACK: u64 = 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes the boot GDT (and for Linux the page tables) into guest memory. Done once per VM.
pub fn setup_boot_memory(mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), RegsError> {
    if let BootEntry::Linux64(_) = entry {
        write_page_tables(mem)?;
    }
    write_gdt_and_idt(mem, entry.gdt())
}

/// Puts a vCPU into the state its boot protocol requires.
pub fn setup_vcpu_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { what, source };
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let (sregs, regs) = match entry {
        BootEntry::Linux64(entry) => (
            long_mode_sregs(sregs),
            kvm_regs {
                rflags: 0x2,
                rip: entry.raw_value(),
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: ZERO_PAGE_START,
                ..Default::default()
            },
        ),
        BootEntry::Pvh { entry, start_info } => (
            pvh_sregs(sregs),
            kvm_regs {
                rflags: 0x2,
                rip: entry.raw_value(),
                rbx: start_info.raw_value(),
                ..Default::default()
            },
        ),
    };
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm("general registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_constants_match_their_descriptions() {
        assert_eq!(BOOT_GDT[1], gdt_entry(0xa09b, 0, 0xfffff));
        assert_eq!(BOOT_GDT[2], gdt_entry(0xc093, 0, 0xfffff));
        assert_eq!(BOOT_GDT[3], gdt_entry(0x808b, 0, 0xfffff));
    }

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.selector, 8);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.g), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb, "execute/read, accessed");
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (16, 0x3, 1, 0));
        let tr = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (24, 0xb, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_bits() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode() {
        let s = pvh_sregs(kvm_sregs {
            cr0: X86_CR0_PG | 0x10,
            cr4: X86_CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            ..Default::default()
        });
        assert_eq!(
            s.cr0,
            X86_CR0_PE | 0x10,
            "PE on, paging off, other bits kept"
        );
        assert_eq!((s.cr4, s.efer), (0, 0));
        let cs = s.cs;
        assert_eq!((cs.l, cs.db, cs.type_, cs.base), (0, 1, 0xb, 0));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(PVH_GDT[1], gdt_entry(0xc09b, 0, 0xfffff));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let pvh = BootEntry::Pvh {
            entry: GuestAddress(0x1000),
            start_info: GuestAddress(0x6000),
        };
        setup_boot_memory(&mem, &pvh).expect("fits");
        let code: u64 = mem
            .read_obj(GuestAddress(BOOT_GDT_START + 8))
            .expect("read");
        assert_eq!(
            code, PVH_GDT[1],
            "the GDT in memory matches the loaded segments"
        );
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, 0, "no page tables for a 32-bit entry");
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        setup_boot_memory(&mem, &BootEntry::Linux64(GuestAddress(0))).expect("fits");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).expect("read");
        assert_eq!(pdpte, PDE_START | 3);
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 511 * 8))
            .expect("read");
        assert_eq!(last, (511 << 21) | 0x83);
        let gdt1: u64 = mem
            .read_obj(GuestAddress(BOOT_GDT_START + 8))
            .expect("read");
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn boot_msrs_enable_write_back_mtrr() {
        let msrs = boot_msrs();
        let mtrr = msrs
            .iter()
            .find(|m| m.index == 0x2ff)
            .expect("MTRR default type");
        assert_eq!(mtrr.data, (1 << 11) | 6);
    }
}
