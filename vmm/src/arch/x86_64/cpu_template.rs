//! The CPU model a guest sees: KVM's supported CPUID, normalised for every VM, and optionally
//! reduced to a named template so that the guest sees the same CPU on every node of a fleet.
//!
//! Every VM (whatever the template):
//! * **no PMU**: leaf 0xA (architectural performance monitoring) zeroed, AMD's core/NB/LLC
//!   counter extensions (0x8000_0001 ECX 23/24/28) and PerfMonV2 (0x8000_0022) hidden, PDCM
//!   cleared; [`crate::vstate::vm`] also disables KVM's PMU for the VM. Performance counters
//!   are a side channel between tenants and a large emulation surface in the host kernel.
//! * **no WAITPKG** (UMWAIT/TPAUSE would let a guest park a physical core in a low-power state
//!   the host does not see), no Intel PT (0x14) or SGX (0x12) leaves;
//! * **no host brand string**: 0x8000_0002..4 say "thvc virtual CPU" (and the template), so a
//!   guest does not learn the exact host model from it (family/model/stepping stay, guests
//!   need them for errata workarounds).
//!
//! A template (`--cpu-template`) is an allow-list: the features of an x86-64 psABI
//! micro-architecture level plus what every server CPU of the last decade has, nothing else.
//! Everything a template names is promised: a host lacking one of its features refuses to
//! start the VM, naming the missing features, instead of showing a smaller CPU. Bits that
//! report the host's speculative-execution mitigations (CPUID 7 EDX, 0x8000_0008 EBX) always
//! pass through: hiding them would make guests unsafe, not portable. The vendor, family and
//! model stay the host's: a template makes CPUs of one vendor look alike, VMs move between
//! nodes of the same vendor.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    #[error("unknown CPU template {0:?} (host, x86-64-v2, x86-64-v3, x86-64-v4)")]
    Unknown(String),
    #[error("this host's CPU lacks what CPU template {template} promises: {missing}")]
    Missing {
        template: CpuTemplate,
        missing: String,
    },
    #[error("cannot build the CPUID table: {0:?}")]
    Table(vmm_sys_util::fam::Error),
}

/// The CPU model of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host, normalised (no PMU, no WAITPKG, no brand).
    #[default]
    Host,
    /// x86-64-v2: SSE3..SSE4.2, SSSE3, POPCNT, CX16, LAHF (Nehalem, Bulldozer and later).
    X86_64V2,
    /// x86-64-v3: v2 + AVX, AVX2, BMI1/2, FMA, F16C, LZCNT, MOVBE, XSAVE, and the server
    /// baseline of Intel Skylake-SP / AMD Zen 2 and later (AES, PCLMULQDQ, RDRAND, RDSEED,
    /// ADX, SHA is not included: Skylake-SP lacks it).
    X86_64V3,
    /// x86-64-v4: v3 + AVX-512 F/BW/CD/DQ/VL (Intel Skylake-SP, AMD Zen 4 and later).
    X86_64V4,
}

impl CpuTemplate {
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::X86_64V2 => "x86-64-v2",
            CpuTemplate::X86_64V3 => "x86-64-v3",
            CpuTemplate::X86_64V4 => "x86-64-v4",
        }
    }

    /// The features the template promises (and the only ones it shows); None for `host`.
    fn features(self) -> Option<Vec<&'static Feature>> {
        let level = match self {
            CpuTemplate::Host => return None,
            CpuTemplate::X86_64V2 => 2,
            CpuTemplate::X86_64V3 => 3,
            CpuTemplate::X86_64V4 => 4,
        };
        Some(FEATURES.iter().filter(|f| f.level <= level).collect())
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = CpuTemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            CpuTemplate::Host,
            CpuTemplate::X86_64V2,
            CpuTemplate::X86_64V3,
            CpuTemplate::X86_64V4,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| CpuTemplateError::Unknown(s.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One CPUID feature bit: its name as Linux shows it in /proc/cpuinfo, where it lives, and
/// the lowest template level that has it (1: every template).
struct Feature {
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
    level: u8,
}

const fn feat(
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
    level: u8,
) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
        level,
    }
}

use Reg::{Eax, Ebx, Ecx, Edx};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_SGX: u32 = 0x12;
const LEAF_PT: u32 = 0x14;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_BRAND: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
const LEAF_AMD_POWER: u32 = 0x8000_0007;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_PERFMON_V2: u32 = 0x8000_0022;

/// CPUID.1:ECX.PDCM (perfmon and debug capability MSR).
const ECX_PDCM: u32 = 1 << 15;
/// CPUID.(EAX=7,ECX=0):ECX.WAITPKG.
const ECX7_WAITPKG: u32 = 1 << 5;
/// CPUID.80000001H:ECX PerfCtrExtCore, PerfCtrExtNB (DF), PerfCtrExtLLC.
const ECX_AMD_PERFCTR: u32 = (1 << 23) | (1 << 24) | (1 << 28);

/// What the templates show. Level 1 is the base every template has: x86-64 itself and the
/// system features an OS relies on (all present on every 64-bit server CPU).
const FEATURES: &[Feature] = &[
    // Leaf 1 EDX.
    feat("fpu", 1, 0, Edx, 0, 1),
    feat("de", 1, 0, Edx, 2, 1),
    feat("pse", 1, 0, Edx, 3, 1),
    feat("tsc", 1, 0, Edx, 4, 1),
    feat("msr", 1, 0, Edx, 5, 1),
    feat("pae", 1, 0, Edx, 6, 1),
    feat("mce", 1, 0, Edx, 7, 1),
    feat("cx8", 1, 0, Edx, 8, 1),
    feat("apic", 1, 0, Edx, 9, 1),
    feat("sep", 1, 0, Edx, 11, 1),
    feat("mtrr", 1, 0, Edx, 12, 1),
    feat("pge", 1, 0, Edx, 13, 1),
    feat("mca", 1, 0, Edx, 14, 1),
    feat("cmov", 1, 0, Edx, 15, 1),
    feat("pat", 1, 0, Edx, 16, 1),
    feat("pse36", 1, 0, Edx, 17, 1),
    feat("clflush", 1, 0, Edx, 19, 1),
    feat("mmx", 1, 0, Edx, 23, 1),
    feat("fxsr", 1, 0, Edx, 24, 1),
    feat("sse", 1, 0, Edx, 25, 1),
    feat("sse2", 1, 0, Edx, 26, 1),
    // Leaf 1 ECX.
    feat("pni", 1, 0, Ecx, 0, 2),
    feat("ssse3", 1, 0, Ecx, 9, 2),
    feat("cx16", 1, 0, Ecx, 13, 2),
    feat("sse4_1", 1, 0, Ecx, 19, 2),
    feat("sse4_2", 1, 0, Ecx, 20, 2),
    feat("x2apic", 1, 0, Ecx, 21, 1),
    feat("popcnt", 1, 0, Ecx, 23, 2),
    feat("pclmulqdq", 1, 0, Ecx, 1, 3),
    feat("fma", 1, 0, Ecx, 12, 3),
    feat("movbe", 1, 0, Ecx, 22, 3),
    feat("aes", 1, 0, Ecx, 25, 3),
    feat("xsave", 1, 0, Ecx, 26, 3),
    feat("avx", 1, 0, Ecx, 28, 3),
    feat("f16c", 1, 0, Ecx, 29, 3),
    feat("rdrand", 1, 0, Ecx, 30, 3),
    // Leaf 7 EBX.
    feat("fsgsbase", 7, 0, Ebx, 0, 3),
    feat("bmi1", 7, 0, Ebx, 3, 3),
    feat("avx2", 7, 0, Ebx, 5, 3),
    feat("smep", 7, 0, Ebx, 7, 3),
    feat("bmi2", 7, 0, Ebx, 8, 3),
    feat("rdseed", 7, 0, Ebx, 18, 3),
    feat("adx", 7, 0, Ebx, 19, 3),
    feat("smap", 7, 0, Ebx, 20, 3),
    feat("clflushopt", 7, 0, Ebx, 23, 3),
    feat("avx512f", 7, 0, Ebx, 16, 4),
    feat("avx512dq", 7, 0, Ebx, 17, 4),
    feat("avx512cd", 7, 0, Ebx, 28, 4),
    feat("avx512bw", 7, 0, Ebx, 30, 4),
    feat("avx512vl", 7, 0, Ebx, 31, 4),
    // XSAVE extensions (leaf 0xD subleaf 1).
    feat("xsaveopt", 0xd, 1, Eax, 0, 3),
    feat("xsavec", 0xd, 1, Eax, 1, 3),
    feat("xgetbv1", 0xd, 1, Eax, 2, 3),
    // Leaf 0x8000_0001.
    feat("lahf_lm", 0x8000_0001, 0, Ecx, 0, 2),
    feat("abm", 0x8000_0001, 0, Ecx, 5, 3),
    feat("syscall", 0x8000_0001, 0, Edx, 11, 1),
    feat("nx", 0x8000_0001, 0, Edx, 20, 1),
    feat("pdpe1gb", 0x8000_0001, 0, Edx, 26, 1),
    feat("rdtscp", 0x8000_0001, 0, Edx, 27, 1),
    feat("lm", 0x8000_0001, 0, Edx, 29, 1),
];

/// Bits a template never touches: the hypervisor bit and topology (set per vCPU by
/// `cpuid::adapt_entry`), TSC-deadline (emulated by KVM's LAPIC), and the mitigation bits.
fn passthrough_mask(leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    match (leaf, subleaf, reg) {
        // HTT (topology) and, in ECX, TSC-deadline and the hypervisor bit; OSXSAVE mirrors
        // CR4 and KVM maintains it.
        (LEAF_FEATURES, 0, Edx) => 1 << 28,
        (LEAF_FEATURES, 0, Ecx) => (1 << 24) | (1 << 27) | (1 << 31),
        // MD_CLEAR(10), SRBDS_CTRL(9), TSX_FORCE_ABORT(13), SERIALIZE stays hidden,
        // HYBRID no, IBRS/IBPB(26), STIBP(27), L1D_FLUSH(28), ARCH_CAPABILITIES(29),
        // CORE_CAPABILITIES(30), SSBD(31).
        (LEAF_EXT_FEATURES, 0, Edx) => (1 << 9) | (1 << 10) | (0x3f << 26),
        // OSPKE mirrors CR4.
        (LEAF_EXT_FEATURES, 0, Ecx) => 1 << 4,
        // Subleaf 2: PSFD, IPRED/RRSBA/BHI controls, MCDT_NO.
        (LEAF_EXT_FEATURES, 2, Edx) => 0x3f,
        // Invariant TSC: a property of the host's clock, shown when it has one (a guest
        // that moves must then find it on the target too: the migration check's job).
        (LEAF_AMD_POWER, 0, Edx) => 1 << 8,
        // AMD: IBPB, IBRS, STIBP, SSBD, VIRT_SSBD, SSB_NO, PSFD, ... (EBX of 0x8000_0008).
        (LEAF_AMD_SIZE_IDS, 0, Ebx) => 0xffff_ffff,
        _ => 0,
    }
}

fn reg(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Eax => &mut entry.eax,
        Ebx => &mut entry.ebx,
        Ecx => &mut entry.ecx,
        Edx => &mut entry.edx,
    }
}

/// Leaves whose registers are feature bit sets a template filters; everything else in these
/// leaves' other registers is information (counts, sizes, IDs) and stays.
fn filtered_regs(leaf: u32, subleaf: u32) -> &'static [Reg] {
    match (leaf, subleaf) {
        (LEAF_FEATURES, 0) => &[Ecx, Edx],
        (LEAF_EXT_FEATURES, 0) => &[Ebx, Ecx, Edx],
        (LEAF_EXT_FEATURES, _) => &[Eax, Ebx, Ecx, Edx],
        (LEAF_XSAVE, 1) => &[Eax],
        (LEAF_AMD_FEATURES, 0) => &[Ecx, Edx],
        (LEAF_AMD_POWER, 0) => &[Edx],
        (LEAF_AMD_SIZE_IDS, 0) => &[Ebx],
        _ => &[],
    }
}

/// Leaves a template removes entirely (feature leaves of extensions no template has: SGX, PT,
/// Key Locker, AMX, AVX10, AMD's SEV/SME, PerfMonV2, ...). Leaves 0..0xD and the basic
/// 0x8000_000x leaves stay; hypervisor leaves (0x4000_0000) stay.
fn template_drops_leaf(leaf: u32) -> bool {
    matches!(leaf, 0x12 | 0x14 | 0x19 | 0x1d | 0x1e | 0x24)
        || (0x8000_0019..0x8000_0100).contains(&leaf)
}

/// The XSAVE state components a feature set may enable: x87 and SSE always, AVX with avx,
/// the three AVX-512 components with avx512f.
fn xsave_components(has: impl Fn(&str) -> bool) -> u64 {
    let mut mask = 0b11;
    if has("avx") {
        mask |= 1 << 2;
    }
    if has("avx512f") {
        mask |= 0b111 << 5;
    }
    mask
}

fn brand(template: CpuTemplate) -> [u8; 48] {
    let text = match template {
        CpuTemplate::Host => "thvc virtual CPU".to_string(),
        t => format!("thvc virtual CPU ({t})"),
    };
    let mut out = [0u8; 48];
    let n = text.len().min(47);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

/// What every VM gets: no PMU, no WAITPKG, no PT/SGX, the thvc brand string.
fn normalise(entries: &mut Vec<kvm_cpuid_entry2>, template: CpuTemplate) {
    entries.retain(|e| !matches!(e.function, LEAF_PT | LEAF_SGX | LEAF_AMD_PERFMON_V2));
    let brand = brand(template);
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (LEAF_FEATURES, _) => e.ecx &= !ECX_PDCM,
            (LEAF_PMU, _) => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            (LEAF_EXT_FEATURES, 0) => e.ecx &= !ECX7_WAITPKG,
            (LEAF_AMD_FEATURES, _) => e.ecx &= !ECX_AMD_PERFCTR,
            (leaf, _) if LEAF_BRAND.contains(&leaf) => {
                let start = (leaf - LEAF_BRAND[0]) as usize * 16;
                let word = |i: usize| {
                    let b = &brand[start + i * 4..start + i * 4 + 4];
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                };
                (e.eax, e.ebx, e.ecx, e.edx) = (word(0), word(1), word(2), word(3));
            }
            _ => {}
        }
    }
    // A brand string needs its leaves, which every x86-64 CPU has; KVM passes them through.
    let max_ext = entries
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map_or(0, |e| e.eax);
    if max_ext < LEAF_BRAND[2] {
        tracing::debug!("host CPUID has no brand string leaves; none shown");
    }
}

/// Reduces `entries` to `template`'s features; the names of promised features the host
/// lacks are returned (nothing is changed then).
fn apply_template(
    entries: &mut Vec<kvm_cpuid_entry2>,
    features: &[&'static Feature],
) -> Result<(), Vec<&'static str>> {
    let host_has = |f: &Feature, entries: &[kvm_cpuid_entry2]| {
        entries
            .iter()
            .find(|e| e.function == f.leaf && e.index == f.subleaf)
            .map(|e| {
                let mut e = *e;
                *reg(&mut e, f.reg) & (1 << f.bit) != 0
            })
            .unwrap_or(false)
    };
    let missing: Vec<&'static str> = features
        .iter()
        .filter(|f| !host_has(f, entries))
        .map(|f| f.name)
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    entries.retain(|e| !template_drops_leaf(e.function));
    for e in entries.iter_mut() {
        let (leaf, subleaf) = (e.function, e.index);
        for r in filtered_regs(leaf, subleaf) {
            let allowed = features
                .iter()
                .filter(|f| f.leaf == leaf && f.subleaf == subleaf && f.reg == *r)
                .fold(passthrough_mask(leaf, subleaf, *r), |m, f| m | (1 << f.bit));
            *reg(e, *r) &= allowed;
        }
    }
    let has = |name: &str| features.iter().any(|f| f.name == name);
    let components = xsave_components(has);
    // XSAVE: only the state components of the features shown; their sizes stay KVM's.
    let mut max_end = 512 + 64; // legacy area + XSAVE header
    for e in entries.iter_mut().filter(|e| e.function == LEAF_XSAVE) {
        match e.index {
            0 => {
                e.eax &= components as u32;
                e.edx = 0;
            }
            1 => (e.ecx, e.edx) = (0, 0), // no supervisor states (XSAVES is hidden)
            i if i < 64 && components & (1 << i) != 0 => max_end = max_end.max(e.ebx + e.eax),
            _ => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
        }
    }
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)
    {
        // ECX: the size of an XSAVE area for every component the guest may enable.
        e.ecx = max_end;
    }
    Ok(())
}

/// The VM-wide CPUID table for `template`, from KVM's supported table (per-vCPU topology is
/// added by `cpuid::vcpu_cpuid`).
pub fn guest_cpuid(supported: &CpuId, template: CpuTemplate) -> Result<CpuId, CpuTemplateError> {
    let mut entries = supported.as_slice().to_vec();
    if let Some(features) = template.features() {
        apply_template(&mut entries, &features).map_err(|missing| CpuTemplateError::Missing {
            template,
            missing: missing.join(" "),
        })?;
    }
    normalise(&mut entries, template);
    CpuId::from_entries(&entries).map_err(CpuTemplateError::Table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A host with every bit set in every feature register, plus PMU, PT and XSAVE leaves.
    fn rich_host() -> CpuId {
        let all = 0xffff_ffff;
        CpuId::from_entries(&[
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(1, 0, [0x806f8, 0, all, all]),
            entry(7, 0, [1, all, all, all]),
            entry(7, 1, [all, 0, 0, 0]),
            entry(0xa, 0, [0x0804_0602, 0, 0, 0x603]),
            entry(0xd, 0, [0x2e7, 0, 2696, 0]),
            entry(0xd, 1, [0xf, 0, 0x100, 0]),
            entry(0xd, 2, [256, 576, 0, 0]),
            entry(0xd, 5, [64, 1088, 0, 0]),
            entry(0xd, 6, [512, 1152, 0, 0]),
            entry(0xd, 7, [1024, 1664, 0, 0]),
            entry(0xd, 9, [8, 2688, 0, 0]),
            entry(0x14, 0, [1, all, all, 0]),
            entry(0x8000_0000, 0, [0x8000_0022, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, all, all]),
            entry(0x8000_0002, 0, [0x41414141; 4]),
            entry(0x8000_0003, 0, [0x41414141; 4]),
            entry(0x8000_0004, 0, [0x41414141; 4]),
            entry(0x8000_0008, 0, [0x3030, all, 0, 0]),
            entry(0x8000_0022, 0, [all, 6, 0, 0]),
        ])
        .expect("cpuid")
    }

    fn find(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == subleaf)
            .copied()
    }

    fn has(cpuid: &CpuId, name: &str) -> bool {
        let f = FEATURES.iter().find(|f| f.name == name).expect("known");
        find(cpuid, f.leaf, f.subleaf)
            .map(|mut e| *reg(&mut e, f.reg) & (1 << f.bit) != 0)
            .unwrap_or(false)
    }

    fn brand_of(cpuid: &CpuId) -> String {
        let mut bytes = Vec::new();
        for leaf in LEAF_BRAND {
            let e = find(cpuid, leaf, 0).expect("brand leaf");
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                bytes.extend_from_slice(&r.to_le_bytes());
            }
        }
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string()
    }

    #[test]
    fn every_template_hides_the_pmu_waitpkg_and_the_brand() {
        for t in ["host", "x86-64-v2", "x86-64-v3", "x86-64-v4"] {
            let template: CpuTemplate = t.parse().expect("template");
            let cpuid = guest_cpuid(&rich_host(), template).expect(t);
            let pmu = find(&cpuid, 0xa, 0).expect("leaf 0xA");
            assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0), "{t}");
            assert_eq!(
                find(&cpuid, 7, 0).expect("leaf 7").ecx & ECX7_WAITPKG,
                0,
                "{t}"
            );
            assert_eq!(find(&cpuid, 1, 0).expect("leaf 1").ecx & ECX_PDCM, 0, "{t}");
            let amd = find(&cpuid, 0x8000_0001, 0).expect("ext");
            assert_eq!(amd.ecx & ECX_AMD_PERFCTR, 0, "{t}");
            assert!(find(&cpuid, 0x8000_0022, 0).is_none(), "{t}: PerfMonV2");
            assert!(find(&cpuid, 0x14, 0).is_none(), "{t}: Intel PT");
            let brand = brand_of(&cpuid);
            assert!(brand.starts_with("thvc virtual CPU"), "{t}: {brand}");
            assert!(!brand.contains('A'), "{t}: host brand left: {brand}");
        }
        assert_eq!(
            brand_of(&guest_cpuid(&rich_host(), CpuTemplate::X86_64V3).expect("v3")),
            "thvc virtual CPU (x86-64-v3)"
        );
    }

    #[test]
    fn host_keeps_everything_else() {
        let cpuid = guest_cpuid(&rich_host(), CpuTemplate::Host).expect("host");
        for f in FEATURES {
            assert!(
                has(&cpuid, f.name),
                "{} hidden by the host template",
                f.name
            );
        }
        assert_eq!(find(&cpuid, 7, 1).expect("7.1").eax, 0xffff_ffff);
    }

    #[test]
    fn templates_show_exactly_their_level() {
        let v2 = guest_cpuid(&rich_host(), CpuTemplate::X86_64V2).expect("v2");
        for name in ["sse4_2", "popcnt", "cx16", "ssse3", "lahf_lm", "lm", "nx"] {
            assert!(has(&v2, name), "v2 lacks {name}");
        }
        for name in ["avx", "avx2", "bmi2", "fma", "xsave", "aes", "avx512f"] {
            assert!(!has(&v2, name), "v2 shows {name}");
        }
        let v3 = guest_cpuid(&rich_host(), CpuTemplate::X86_64V3).expect("v3");
        for name in [
            "avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm", "xsave",
        ] {
            assert!(has(&v3, name), "v3 lacks {name}");
        }
        assert!(!has(&v3, "avx512f"));
        let v4 = guest_cpuid(&rich_host(), CpuTemplate::X86_64V4).expect("v4");
        assert!(has(&v4, "avx512vl") && has(&v4, "avx512bw"));
        // Bits no template names are cleared: leaf 7 subleaf 1 (AVX-VNNI, ...), leaf 7 EBX
        // bit 29 (SHA), VMX-like leftovers in leaf 1 ECX bit 5.
        assert_eq!(find(&v4, 7, 1).expect("7.1").eax, 0);
        assert_eq!(find(&v4, 7, 0).expect("7.0").ebx & (1 << 29), 0);
        assert_eq!(find(&v4, 1, 0).expect("1").ecx & (1 << 5), 0);
        // Mitigation bits pass through; TSC-deadline and the hypervisor bit too.
        assert_eq!(find(&v2, 7, 0).expect("7.0").edx & (1 << 26), 1 << 26);
        assert_eq!(find(&v2, 0x8000_0008, 0).expect("ids").ebx, 0xffff_ffff);
        assert_ne!(find(&v2, 1, 0).expect("1").ecx & (1 << 24), 0);
    }

    #[test]
    fn xsave_follows_the_features() {
        let v2 = guest_cpuid(&rich_host(), CpuTemplate::X86_64V2).expect("v2");
        let leaf = find(&v2, 0xd, 0).expect("0xd");
        assert_eq!(leaf.eax, 0b11, "x87 and SSE only");
        assert_eq!(leaf.ecx, 576);
        assert_eq!(find(&v2, 0xd, 2).expect("ymm").eax, 0, "no AVX state");
        let v3 = guest_cpuid(&rich_host(), CpuTemplate::X86_64V3).expect("v3");
        let leaf = find(&v3, 0xd, 0).expect("0xd");
        assert_eq!(leaf.eax, 0b111, "x87, SSE, AVX; no PKRU, no AVX-512");
        assert_eq!(leaf.ecx, 576 + 256);
        assert_eq!(find(&v3, 0xd, 1).expect("0xd.1").eax, 0b111, "no XSAVES");
        assert_eq!(find(&v3, 0xd, 9).expect("pkru").eax, 0);
        let v4 = guest_cpuid(&rich_host(), CpuTemplate::X86_64V4).expect("v4");
        let leaf = find(&v4, 0xd, 0).expect("0xd");
        assert_eq!(leaf.eax, 0b1110_0111);
        assert_eq!(leaf.ecx, 1664 + 1024);
    }

    #[test]
    fn a_host_without_a_promised_feature_is_refused() {
        let mut entries = rich_host().as_slice().to_vec();
        for e in &mut entries {
            if e.function == 7 && e.index == 0 {
                e.ebx &= !((1 << 5) | (1 << 8)); // no AVX2, no BMI2
            }
        }
        let host = CpuId::from_entries(&entries).expect("cpuid");
        let err = guest_cpuid(&host, CpuTemplate::X86_64V3).expect_err("lacks avx2");
        let msg = err.to_string();
        assert!(
            msg.contains("x86-64-v3") && msg.contains("avx2 bmi2"),
            "{msg}"
        );
        assert!(guest_cpuid(&host, CpuTemplate::X86_64V2).is_ok());
    }

    #[test]
    fn names_parse_and_print() {
        for t in ["host", "x86-64-v2", "x86-64-v3", "x86-64-v4"] {
            assert_eq!(t.parse::<CpuTemplate>().expect(t).to_string(), t);
        }
        let err = "skylake".parse::<CpuTemplate>().expect_err("unknown");
        assert!(err.to_string().contains("x86-64-v2"), "{err}");
    }
}
