//! Per-vCPU CPUID: what KVM supports, with each vCPU's APIC ID and a topology of `n` cores in
//! one socket, one thread per core, and the hypervisor bit set.
//!
//! Hardware virtualization (VMX, SVM) is hidden from every guest, whatever KVM would allow:
//! a tenant gets no nested virtualization, whose emulation in the host kernel is a large
//! attack surface; and stock kernels (Linux 6.12) turn it on as soon as udev loads
//! kvm_intel/kvm_amd for the CPU, in every VM that sees the flag.
//!
//! AMX is hidden as well: its tile data (8 KiB of XSAVE state per vCPU) would not fit the
//! 4 KiB XSAVE area that KVM_GET_XSAVE saves for a snapshot or a migration, and the VMM never
//! asks for the guest permission (ARCH_REQ_XCOMP_GUEST_PERM) that KVM needs to enable it.
//! KVM itself leaves AMX out without that permission; clearing it here keeps that true
//! whatever a later kernel reports. So a guest's whole CPU state is what `vstate::state`
//! saves: no nested virtualization state, no XSAVE state beyond 4 KiB.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX.VMX
const ECX_VMX: u32 = 1 << 5;
/// CPUID.80000001H:ECX.SVM
const ECX_SVM: u32 = 1 << 2;
const EDX_HTT: u32 = 1 << 28;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_XSAVE: u32 = 0xd;
/// AMX's own leaves (tile information, TMUL information).
const LEAF_AMX_TILE: u32 = 0x1d;
const LEAF_AMX_TMUL: u32 = 0x1e;
/// CPUID.7.0:EDX AMX-BF16, AMX-TILE, AMX-INT8.
const EDX7_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
/// CPUID.7.1:EAX AMX-FP16; CPUID.7.1:EDX AMX-COMPLEX.
const EAX7_1_AMX_FP16: u32 = 1 << 21;
const EDX7_1_AMX_COMPLEX: u32 = 1 << 8;
/// CPUID.0DH.0:EAX XTILECFG and XTILEDATA: the XCR0 bits of AMX's state.
const XCR0_AMX: u32 = (1 << 17) | (1 << 18);
/// CPUID.0BH level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adapts one CPUID entry for vCPU `vcpu_id` of `vcpu_count`.
pub fn adapt_entry(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, vcpu_count: u8) {
    let apic_id = u32::from(vcpu_id);
    let count = u32::from(vcpu_count);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in quadwords.
            entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            entry.ecx &= !ECX_VMX;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1
            // (caches above L2 are shared by the package, the rest are per core).
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(count);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        LEAF_AMD_FEATURES => entry.ecx &= !ECX_SVM,
        LEAF_EXT_FEATURES if entry.index == 0 => entry.edx &= !EDX7_AMX,
        LEAF_EXT_FEATURES if entry.index == 1 => {
            entry.eax &= !EAX7_1_AMX_FP16;
            entry.edx &= !EDX7_1_AMX_COMPLEX;
        }
        LEAF_XSAVE if entry.index == 0 => entry.eax &= !XCR0_AMX,
        LEAF_XSAVE if entry.index == 17 || entry.index == 18 => {
            // The sizes and offsets of AMX's XSAVE components: there are none.
            (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
        }
        LEAF_AMX_TILE | LEAF_AMX_TMUL => {
            (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[15:12]: APIC ID size; [7:0]: number of cores - 1.
            entry.ecx = (id_bits(count).max(1) << 12) | (count - 1);
        }
        LEAF_AMD_EXT_APIC_ID => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff; // compute unit id, one thread per unit
            entry.ecx = 0; // one node
        }
        _ => {}
    }
}

/// Physical address bits the guest's CPUs report (CPUID.80000008H:EAX[7:0]); 36, the
/// architectural minimum, when the leaf is missing. Nothing may be mapped above.
pub fn phys_address_bits(supported: &CpuId) -> u8 {
    supported
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_AMD_SIZE_IDS)
        .map(|e| e.eax as u8)
        .filter(|bits| *bits >= 32)
        .unwrap_or(36)
}

/// The CPUID table of vCPU `vcpu_id`, derived from KVM's supported table.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, vcpu_count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        adapt_entry(entry, vcpu_id, vcpu_count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_address_bits_come_from_the_size_leaf() {
        let mut leaf = entry(LEAF_AMD_SIZE_IDS, 0);
        leaf.eax = 0x3028; // 48 linear, 40 physical
        let cpuid = CpuId::from_entries(&[entry(1, 0), leaf]).expect("cpuid");
        assert_eq!(phys_address_bits(&cpuid), 40);
        let none = CpuId::from_entries(&[entry(1, 0)]).expect("cpuid");
        assert_eq!(phys_address_bits(&none), 36);
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_count_in_leaf_1() {
        let mut e = entry(1, 0);
        adapt_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        let mut single = entry(1, 0);
        single.edx = EDX_HTT;
        adapt_entry(&mut single, 0, 1);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn no_nested_virtualization() {
        let mut leaf1 = entry(LEAF_FEATURES, 0);
        leaf1.ecx = ECX_VMX | 1; // SSE3 stays
        adapt_entry(&mut leaf1, 0, 2);
        assert_eq!(leaf1.ecx & ECX_VMX, 0);
        assert_eq!(leaf1.ecx & 1, 1);
        let mut amd = entry(LEAF_AMD_FEATURES, 0);
        amd.ecx = ECX_SVM | 1; // LAHF/SAHF stays
        adapt_entry(&mut amd, 0, 2);
        assert_eq!(amd.ecx, 1);
    }

    #[test]
    fn no_amx() {
        let mut leaf7 = entry(LEAF_EXT_FEATURES, 0);
        leaf7.edx = EDX7_AMX | 1 << 26; // IBRS/IBPB stays
        adapt_entry(&mut leaf7, 0, 2);
        assert_eq!(leaf7.edx, 1 << 26);
        let mut leaf7_1 = entry(LEAF_EXT_FEATURES, 1);
        (leaf7_1.eax, leaf7_1.edx) = (EAX7_1_AMX_FP16 | 1 << 4, EDX7_1_AMX_COMPLEX);
        adapt_entry(&mut leaf7_1, 0, 2);
        assert_eq!((leaf7_1.eax, leaf7_1.edx), (1 << 4, 0), "AVX-VNNI stays");
        let mut xsave = entry(LEAF_XSAVE, 0);
        xsave.eax = XCR0_AMX | 0b111; // x87, SSE, AVX stay
        adapt_entry(&mut xsave, 0, 2);
        assert_eq!(xsave.eax, 0b111);
        for (function, index) in [
            (LEAF_XSAVE, 17),
            (LEAF_XSAVE, 18),
            (LEAF_AMX_TILE, 0),
            (LEAF_AMX_TMUL, 0),
        ] {
            let mut e = entry(function, index);
            (e.eax, e.ebx, e.ecx, e.edx) = (1, 2, 3, 4);
            adapt_entry(&mut e, 0, 2);
            assert_eq!(
                (e.eax, e.ebx, e.ecx, e.edx),
                (0, 0, 0, 0),
                "{function:#x}.{index}"
            );
        }
        // AVX's own XSAVE component leaf is untouched.
        let mut avx = entry(LEAF_XSAVE, 2);
        avx.eax = 256;
        adapt_entry(&mut avx, 0, 2);
        assert_eq!(avx.eax, 256);
    }

    #[test]
    fn extended_topology_levels() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        let mut end = entry(0xb, 2);
        for e in [&mut smt, &mut core, &mut end] {
            adapt_entry(e, 5, 6);
            assert_eq!(e.edx, 5, "x2APIC id on every subleaf");
        }
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8), (0, 1, LEVEL_TYPE_SMT));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (3, 6, LEVEL_TYPE_CORE));
        assert_eq!(
            (end.ebx, end.ecx >> 8),
            (0, 0),
            "invalid level ends the list"
        );
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(
            [1, 2, 3, 4, 5, 32].map(id_bits),
            [0, 1, 2, 2, 3, 5],
            "bits for 1, 2, 3, 4, 5, 32 ids"
        );
    }

    #[test]
    fn amd_core_count() {
        let mut e = entry(0x8000_0008, 0);
        adapt_entry(&mut e, 0, 32);
        assert_eq!(e.ecx & 0xff, 31);
        assert_eq!((e.ecx >> 12) & 0xf, 5);
    }
}
