//! The VM specification: the JSON document a client hands to `CreateVm`, its validation and
//! its translation into a `thvc-vmm` command line.
//!
//! A VM boots either a Linux kernel directly (`kernel`, optional `initrd` and `cmdline`) or
//! UEFI firmware (`firmware: "uefi"`) that boots from the VM's first disk, as cloud disk
//! images expect. The firmware file is the agent's setting (`--firmware`), not the
//! client's: a client picks the kind of boot, the node decides which binary runs as the
//! guest's firmware. Firmware boot needs virtio-pci (the firmware drives no virtio-mmio).
//!
//! Files a spec references must resolve (after following every symlink) to regular files
//! inside the node's stores: kernels and initrds in the image store, disks in the disk store
//! (read-only disks may also come from the image store). Anything else is refused, so a
//! client that may define VMs cannot make a VMM read or write arbitrary host files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cloudinit::{self, Metadata, SeedFiles};
use crate::names;
use crate::vm_uuid;
use crate::vmm_user::VmmUser;

// The limits of thvc-vmm (vmm/src/config.rs), so a spec it would refuse is refused here,
// at creation, instead of failing at start.
pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 4 << 20; // 4 TiB
pub const MAX_CMDLINE: usize = 4096;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("the spec is not valid JSON for a VM: {0}")]
    Json(String),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The SMBIOS system UUID the guest sees; generated at creation when absent, then
    /// fixed (see [`crate::vm_uuid`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Kernel image: absolute path, or relative to the image store. Exactly one of
    /// `kernel` and `firmware`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Boot firmware instead of a kernel: the guest boots from its first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// The entropy device (virtio-rng, which every VM has): its rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngSpec>,
    /// How the VM's devices attach (thvc-vmm's `--transport`); absent: the VMM's default
    /// (virtio-mmio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The CPU model (thvc-vmm's `--cpu-template`); absent: `host`. A fleet that moves VMs
    /// between nodes gives every VM the baseline its nodes share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// cloud-init metadata: the agent attaches a NoCloud seed built from it as the last disk
    /// (see [`crate::cloudinit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub autostart: bool,
}

/// virtio-mmio (Linux guests, fewest exits) or virtio-pci with MSI-X (firmware, other
/// operating systems, multiqueue devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Mmio,
    Pci,
}

/// thvc-vmm's CPU templates (vmm/README.md, "CPU model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    #[serde(rename = "host")]
    Host,
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
    #[serde(rename = "x86-64-v3")]
    X86_64V3,
    #[serde(rename = "x86-64-v4")]
    X86_64V4,
}

impl CpuTemplate {
    fn as_arg(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::X86_64V2 => "x86-64-v2",
            CpuTemplate::X86_64V3 => "x86-64-v3",
            CpuTemplate::X86_64V4 => "x86-64-v4",
        }
    }
}

impl Transport {
    fn as_arg(self) -> &'static str {
        match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        }
    }
}

/// Which firmware boots the guest. Only UEFI (edk2's CloudHv build, the file the agent's
/// `--firmware` names) for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Uefi,
}

/// The VM's entropy device: getrandom(2) of the host, so its rate is worth limiting on a
/// shared node (the host's entropy pool and CPU time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngSpec {
    /// thvc-vmm's `--rng bandwidth=,ops=` (bytes asked for per second, requests per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Disk image: absolute path, or relative to the disk store.
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The disk's rate limit (thvc-vmm's `--disk ...,bandwidth=,ops=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<RateLimit>,
}

/// A device's rate limit, as thvc-vmm takes it: `bandwidth` in bytes per second with an
/// optional K/M/G suffix (powers of 1024), `ops` requests per second, each with an optional
/// burst (default: 100 ms worth). Changeable at run time through the VMM's `update-device`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_burst: Option<u64>,
}

impl RateLimit {
    /// Bytes per second, checked as thvc-vmm parses it (digits, an optional K/M/G suffix,
    /// no overflow); None without a bandwidth.
    fn bandwidth_rate(&self, what: &str) -> Result<Option<u64>, SpecError> {
        let Some(b) = &self.bandwidth else {
            return Ok(None);
        };
        let (digits, shift) = match b.strip_suffix(['K', 'M', 'G']) {
            Some(d) if b.ends_with('K') => (d, 10),
            Some(d) if b.ends_with('M') => (d, 20),
            Some(d) => (d, 30),
            None => (b.as_str(), 0),
        };
        let rate = (!digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .and_then(|n| n.checked_mul(1 << shift));
        match rate {
            Some(rate) => Ok(Some(rate)),
            None => Err(invalid(format!(
                "{what}.bandwidth {b:?} must be bytes per second, optionally with K, M or G \
                 (powers of 1024), e.g. \"10M\", below 16 EiB"
            ))),
        }
    }

    /// Checks the values and returns the VMM's `,key=value` suffix. For one direction of a
    /// NIC (`prefix` `rx_` or `tx_`), `shared` is the NIC's `limit`, whose keys these replace
    /// key by key in the VMM: a burst then needs a rate here or there.
    fn vmm_keys(
        &self,
        what: &str,
        prefix: &str,
        shared: Option<&RateLimit>,
    ) -> Result<String, SpecError> {
        let mut out = String::new();
        let bandwidth = self.bandwidth_rate(what)?;
        if let Some(b) = &self.bandwidth {
            out.push_str(&format!(",{prefix}bandwidth={b}"));
        }
        let shared_bandwidth = match shared {
            Some(s) => s.bandwidth_rate(what)?,
            None => None,
        };
        let needs = |rate: Option<u64>, shared_rate: Option<u64>, key: &str| {
            if rate.or(shared_rate).unwrap_or(0) > 0 {
                Ok(())
            } else if shared.is_some() {
                Err(invalid(format!(
                    "{what}.{key}_burst needs {key} above 0, here or in the NIC's limit"
                )))
            } else {
                Err(invalid(format!("{what}.{key}_burst needs {key} above 0")))
            }
        };
        if let Some(n) = self.bandwidth_burst {
            needs(bandwidth, shared_bandwidth, "bandwidth")?;
            if n == 0 {
                return Err(invalid(format!(
                    "{what}.bandwidth_burst must be at least 1"
                )));
            }
            out.push_str(&format!(",{prefix}bandwidth-burst={n}"));
        }
        if let Some(n) = self.ops {
            out.push_str(&format!(",{prefix}ops={n}"));
        }
        if let Some(n) = self.ops_burst {
            needs(self.ops, shared.and_then(|s| s.ops), "ops")?;
            if n == 0 {
                return Err(invalid(format!("{what}.ops_burst must be at least 1")));
            }
            out.push_str(&format!(",{prefix}ops-burst={n}"));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub bridge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Generated from node and VM name when absent (see [`names::stable_mac`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The NIC's rate limit, for each direction (receive and transmit separately).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<RateLimit>,
    /// Receiving's own settings: each key given replaces `limit`'s for receiving
    /// (thvc-vmm's `rx_bandwidth=`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_limit: Option<RateLimit>,
    /// Transmitting's own settings, the same way (`tx_bandwidth=`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_limit: Option<RateLimit>,
}

/// The two file stores a spec may reference, canonicalized.
#[derive(Debug, Clone)]
pub struct Stores {
    pub images: PathBuf,
    pub disks: PathBuf,
}

impl Stores {
    /// Canonicalizes both store directories (they must exist).
    pub fn new(images: &Path, disks: &Path) -> std::io::Result<Self> {
        Ok(Stores {
            images: images.canonicalize()?,
            disks: disks.canonicalize()?,
        })
    }
}

/// A validated spec with every file resolved to its canonical path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Normalized (lower case).
    pub uuid: String,
    pub boot: Boot,
    pub disks: Vec<ResolvedDisk>,
    pub nics: Vec<ResolvedNic>,
    /// The entropy device's `bandwidth=...` keys for the VMM ("" without a limit).
    pub rng_limit: String,
    /// Always `Some(Pci)` for firmware boot.
    pub transport: Option<Transport>,
    pub cpu_template: Option<CpuTemplate>,
    /// The NoCloud seed's documents when the spec has `metadata`.
    pub seed: Option<SeedFiles>,
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct Linux boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
    },
    /// Firmware that boots the first disk; the file is the agent's setting
    /// ([`VmmRunParams::firmware`]).
    Firmware(Firmware),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDisk {
    pub path: PathBuf,
    pub readonly: bool,
    pub serial: Option<String>,
    /// `,bandwidth=...` keys for the VMM ("" without a limit).
    pub limit: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNic {
    pub bridge: String,
    pub vlan: Option<u16>,
    pub mac: String,
    /// `,bandwidth=...` keys for the VMM ("" without a limit).
    pub limit: String,
}

/// Parses a spec document (unknown fields are errors, so typos do not pass silently).
pub fn parse(json: &str) -> Result<VmSpec, SpecError> {
    serde_json::from_str(json).map_err(|e| SpecError::Json(e.to_string()))
}

impl VmSpec {
    /// Fills in MAC addresses that the client left out, stably derived from node and VM name.
    pub fn fill_macs(&mut self, node: &str, vm: &str) {
        for (i, nic) in self.nics.iter_mut().enumerate() {
            if nic.mac.is_none() {
                nic.mac = Some(names::stable_mac(node, vm, i));
            }
        }
    }

    /// Fixes the VM's UUID at creation: the client's, normalized, or a new random one.
    pub fn fill_uuid(&mut self) -> Result<(), SpecError> {
        self.uuid = Some(match &self.uuid {
            Some(u) => normalize_uuid(u)?,
            None => vm_uuid::generate().map_err(|e| invalid(e.to_string()))?,
        });
        Ok(())
    }

    /// Validates every field of VM `vm`'s spec and resolves the referenced files against
    /// `stores`.
    pub fn resolve(&self, vm: &str, stores: &Stores) -> Result<ResolvedSpec, SpecError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, not {}",
                self.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(format!(
                "memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, not {}",
                self.memory_mib
            )));
        }
        let uuid = match &self.uuid {
            Some(u) => normalize_uuid(u)?,
            None => {
                return Err(invalid(
                    "uuid is missing (the agent fills it in at creation)",
                ))
            }
        };
        let boot = self.resolve_boot(stores)?;
        let transport = match (&boot, self.transport) {
            (Boot::Firmware(_), None | Some(Transport::Pci)) => Some(Transport::Pci),
            (Boot::Firmware(_), Some(Transport::Mmio)) => {
                return Err(invalid(
                    "firmware boot needs transport \"pci\" (or none): the firmware drives \
                     virtio-pci devices only",
                ))
            }
            (Boot::Kernel { .. }, t) => t,
        };
        if matches!(boot, Boot::Firmware(_)) && self.disks.is_empty() {
            return Err(invalid(
                "firmware boot needs at least one disk: the guest boots from the first disk",
            ));
        }
        // The seed takes a disk slot of the VMM's.
        let max_disks = MAX_DISKS - usize::from(self.metadata.is_some());
        if self.disks.len() > max_disks {
            return Err(invalid(format!(
                "at most {max_disks} disks are allowed{}",
                if self.metadata.is_some() {
                    " (the cloud-init seed from metadata is one more)"
                } else {
                    ""
                }
            )));
        }
        let mut disks: Vec<ResolvedDisk> = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let what = format!("disks[{i}].path");
            let allowed: &[&Path] = if d.readonly {
                &[&stores.disks, &stores.images]
            } else {
                &[&stores.disks]
            };
            let path = resolve_file(&what, &d.path, &stores.disks, allowed)?;
            if disks.iter().any(|o| o.path == path) {
                return Err(invalid(format!(
                    "{what}: {} is already attached as another disk of this VM",
                    path.display()
                )));
            }
            if let Some(s) = &d.serial {
                let ok = !s.is_empty()
                    && s.len() <= 20
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err(invalid(format!(
                        "disks[{i}].serial {s:?} must be 1 to 20 characters of letters, digits, '.', '_', '-'"
                    )));
                }
            }
            let limit = match &d.limit {
                Some(l) => l.vmm_keys(&format!("disks[{i}].limit"), "", None)?,
                None => String::new(),
            };
            disks.push(ResolvedDisk {
                path,
                readonly: d.readonly,
                serial: d.serial.clone(),
                limit,
            });
        }
        if self.nics.len() > MAX_NICS {
            return Err(invalid(format!("at most {MAX_NICS} nics are allowed")));
        }
        let mut nics = Vec::new();
        for (i, n) in self.nics.iter().enumerate() {
            validate_ifname(&format!("nics[{i}].bridge"), &n.bridge)?;
            if let Some(v) = n.vlan {
                if !(1..=4094).contains(&v) {
                    return Err(invalid(format!(
                        "nics[{i}].vlan must be between 1 and 4094, not {v}"
                    )));
                }
            }
            let mac = match &n.mac {
                Some(m) => normalize_mac(m).ok_or_else(|| {
                    invalid(format!(
                        "nics[{i}].mac {m:?} is not a unicast MAC address like 52:54:00:12:34:56"
                    ))
                })?,
                None => {
                    return Err(invalid(format!(
                        "nics[{i}].mac is missing (the agent fills it in at creation)"
                    )))
                }
            };
            let mut limit = match &n.limit {
                Some(l) => l.vmm_keys(&format!("nics[{i}].limit"), "", None)?,
                None => String::new(),
            };
            let shared = n.limit.clone().unwrap_or_default();
            for (direction, own) in [("rx", &n.rx_limit), ("tx", &n.tx_limit)] {
                if let Some(own) = own {
                    let what = format!("nics[{i}].{direction}_limit");
                    limit.push_str(&own.vmm_keys(
                        &what,
                        &format!("{direction}_"),
                        Some(&shared),
                    )?);
                }
            }
            nics.push(ResolvedNic {
                bridge: n.bridge.clone(),
                vlan: n.vlan,
                mac,
                limit,
            });
        }
        let rng_limit = match self.rng.as_ref().and_then(|r| r.limit.as_ref()) {
            Some(l) => l.vmm_keys("rng.limit", "", None)?,
            None => String::new(),
        };
        let seed = match &self.metadata {
            Some(md) => {
                let macs: Vec<String> = nics.iter().map(|n| n.mac.clone()).collect();
                Some(cloudinit::render(md, vm, &uuid, &macs).map_err(|e| invalid(e.to_string()))?)
            }
            None => None,
        };
        Ok(ResolvedSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            uuid,
            boot,
            disks,
            nics,
            rng_limit,
            transport,
            cpu_template: self.cpu_template,
            seed,
        })
    }

    /// The files this spec's disks name, for "which VMs use this disk": each as written
    /// (made absolute against the disk store) and, where it resolves, canonical. Never an
    /// error: a spec whose disk is gone references nothing there.
    pub fn referenced_disk_paths(&self, stores: &Stores) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in &self.disks {
            let given = Path::new(&d.path);
            let lexical = if given.is_absolute() {
                given.to_owned()
            } else {
                stores.disks.join(given)
            };
            if let Ok(c) = lexical.canonicalize() {
                out.push(c);
            }
            out.push(lexical);
        }
        out
    }

    /// Exactly one of `kernel` and `firmware`, and what goes with it.
    fn resolve_boot(&self, stores: &Stores) -> Result<Boot, SpecError> {
        let firmware = match (&self.kernel, self.firmware) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give either kernel (direct Linux boot) or firmware, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "either kernel (direct Linux boot) or firmware: \"uefi\" (boot from the \
                     first disk) is required",
                ))
            }
            (None, Some(f)) => f,
            (Some(kernel), None) => return self.resolve_kernel_boot(kernel, stores),
        };
        for (field, given) in [
            ("initrd", self.initrd.is_some()),
            ("cmdline", self.cmdline.is_some()),
        ] {
            if given {
                return Err(invalid(format!(
                    "{field} belongs to direct kernel boot; with firmware the guest's boot \
                     loader on its first disk chooses kernel and command line"
                )));
            }
        }
        Ok(Boot::Firmware(firmware))
    }

    fn resolve_kernel_boot(&self, kernel: &str, stores: &Stores) -> Result<Boot, SpecError> {
        let kernel = resolve_file("kernel", kernel, &stores.images, &[&stores.images])?;
        let initrd = match &self.initrd {
            Some(p) => Some(resolve_file(
                "initrd",
                p,
                &stores.images,
                &[&stores.images],
            )?),
            None => None,
        };
        if let Some(c) = &self.cmdline {
            if c.len() > MAX_CMDLINE {
                return Err(invalid(format!(
                    "cmdline is {} bytes long, at most {MAX_CMDLINE} are allowed",
                    c.len()
                )));
            }
            if c.chars().any(|ch| ch == '\0' || ch == '\n') {
                return Err(invalid(
                    "cmdline must not contain NUL or newline characters",
                ));
            }
        }
        Ok(Boot::Kernel {
            kernel,
            initrd,
            cmdline: self.cmdline.clone(),
        })
    }
}

fn normalize_uuid(u: &str) -> Result<String, SpecError> {
    vm_uuid::normalize(u).ok_or_else(|| {
        invalid(format!(
            "uuid {u:?} is not a UUID like 0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c (8-4-4-4-12 \
             hexadecimal digits, not all zero or all f)"
        ))
    })
}

/// Resolves `value` (absolute, or relative to `base`) to a canonical regular file that lies
/// inside one of `allowed`.
fn resolve_file(
    what: &str,
    value: &str,
    base: &Path,
    allowed: &[&Path],
) -> Result<PathBuf, SpecError> {
    if value.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    // The VMM's --disk option separates its parameters with commas.
    if value.contains(',') || value.contains('\0') {
        return Err(invalid(format!(
            "{what} {value:?} must not contain ',' or NUL characters"
        )));
    }
    let given = Path::new(value);
    let candidate = if given.is_absolute() {
        given.to_owned()
    } else {
        base.join(given)
    };
    let canonical = candidate.canonicalize().map_err(|e| {
        invalid(format!(
            "{what} {value:?} cannot be used: {} ({e})",
            candidate.display()
        ))
    })?;
    if !allowed.iter().any(|store| canonical.starts_with(store)) {
        let stores: Vec<String> = allowed.iter().map(|p| p.display().to_string()).collect();
        return Err(invalid(format!(
            "{what} {value:?} resolves to {}, which is outside the allowed store(s) {}",
            canonical.display(),
            stores.join(", ")
        )));
    }
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| invalid(format!("{what} {}: {e}", canonical.display())))?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "{what} {} is not a regular file",
            canonical.display()
        )));
    }
    Ok(canonical)
}

fn validate_ifname(what: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {name:?} is not an interface name (1 to 15 characters of letters, digits, '.', '_', '-')"
        )))
    }
}

/// Normalizes a MAC to lower-case colon form; `None` unless it is a valid unicast address.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut bytes = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        bytes[i] = u8::from_str_radix(p, 16).ok()?;
    }
    if bytes[0] & 1 == 1 || bytes == [0; 6] {
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Everything the VMM needs beyond the spec to run one VM.
#[derive(Debug, Clone)]
pub struct VmmRunParams {
    pub console_log: PathBuf,
    pub api_socket: PathBuf,
    /// TAP device per NIC, in NIC order.
    pub taps: Vec<String>,
    /// Passed as `--user UID:GID`: the VMM starts as root and switches to it.
    pub switch_to_user: Option<VmmUser>,
    /// The UEFI firmware file (the agent's `--firmware`), used for firmware boot.
    pub firmware: PathBuf,
    /// The NoCloud seed volume, attached read-only after the spec's disks.
    pub seed_disk: Option<PathBuf>,
    /// A migration's target: the VMM waits on this socket for the source's guest
    /// (`--incoming unix:PATH`) instead of booting one; the devices stay as the spec says.
    pub incoming: Option<PathBuf>,
}

/// The `thvc-vmm` arguments (without the program name) for `spec`.
pub fn vmm_args(spec: &ResolvedSpec, params: &VmmRunParams) -> Vec<String> {
    let mut args = match (&spec.boot, &params.incoming) {
        // The guest's kernel or firmware comes with its memory.
        (_, Some(socket)) => vec![
            "--incoming".to_owned(),
            format!("unix:{}", socket.display()),
        ],
        (Boot::Kernel { kernel, .. }, None) => {
            vec!["--kernel".to_owned(), kernel.display().to_string()]
        }
        (Boot::Firmware(Firmware::Uefi), None) => {
            vec![
                "--firmware".to_owned(),
                params.firmware.display().to_string(),
            ]
        }
    };
    args.extend([
        "--cpus".to_owned(),
        spec.vcpus.to_string(),
        "--memory".to_owned(),
        spec.memory_mib.to_string(),
        "--serial".to_owned(),
        format!("file:{}", params.console_log.display()),
        "--api-socket".to_owned(),
        params.api_socket.display().to_string(),
        // The agent shares the VMM's group, not its user: under systemd the VMM runs as
        // thvc-vm and the agent has no right to override file permissions.
        "--api-socket-group".to_owned(),
        // SMBIOS system UUID, for every VM: cloud-init and licensing read it.
        "--platform".to_owned(),
        format!("uuid={}", spec.uuid),
    ]);
    if let (
        Boot::Kernel {
            initrd, cmdline, ..
        },
        None,
    ) = (&spec.boot, &params.incoming)
    {
        if let Some(initrd) = initrd {
            args.push("--initrd".to_owned());
            args.push(initrd.display().to_string());
        }
        if let Some(cmdline) = cmdline {
            args.push("--cmdline".to_owned());
            args.push(cmdline.clone());
        }
    }
    if let Some(template) = spec.cpu_template {
        args.push("--cpu-template".to_owned());
        args.push(template.as_arg().to_owned());
    }
    if let Some(transport) = spec.transport {
        args.push("--transport".to_owned());
        args.push(transport.as_arg().to_owned());
    }
    for d in &spec.disks {
        let mut v = format!("path={}", d.path.display());
        if d.readonly {
            v.push_str(",readonly=on");
        }
        if let Some(s) = &d.serial {
            v.push_str(&format!(",serial={s}"));
        }
        v.push_str(&d.limit);
        args.push("--disk".to_owned());
        args.push(v);
    }
    if let Some(seed) = &params.seed_disk {
        args.push("--disk".to_owned());
        args.push(format!("path={},readonly=on", seed.display()));
    }
    for (nic, tap) in spec.nics.iter().zip(&params.taps) {
        args.push("--net".to_owned());
        args.push(format!("tap={tap},mac={}{}", nic.mac, nic.limit));
    }
    if let Some(keys) = spec.rng_limit.strip_prefix(',') {
        args.push("--rng".to_owned());
        args.push(keys.to_owned());
    }
    if let Some(user) = params.switch_to_user {
        args.push("--user".to_owned());
        args.push(user.to_string());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Parses `json` and fills in the UUID as CreateVm does.
    fn parsed(json: &str) -> VmSpec {
        let mut spec = parse(json).unwrap();
        spec.fill_uuid().unwrap();
        spec
    }

    fn params() -> VmmRunParams {
        VmmRunParams {
            console_log: "/log/c".into(),
            api_socket: "/run/a.sock".into(),
            taps: vec!["tap0".into()],
            switch_to_user: None,
            firmware: "/fw/CLOUDHV.fd".into(),
            seed_disk: None,
            incoming: None,
        }
    }

    fn stores() -> (tempfile::TempDir, Stores) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("images")).unwrap();
        fs::create_dir(dir.path().join("disks")).unwrap();
        fs::write(dir.path().join("images/vmlinuz"), b"k").unwrap();
        fs::write(dir.path().join("disks/root.img"), b"d").unwrap();
        fs::write(dir.path().join("disks/data.img"), b"d").unwrap();
        fs::write(dir.path().join("secret"), b"s").unwrap();
        let s = Stores::new(&dir.path().join("images"), &dir.path().join("disks")).unwrap();
        (dir, s)
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","cpus":2}"#).is_err());
        let (_d, s) = stores();
        let mut spec = parsed(r#"{"vcpus":0,"memory_mib":128,"kernel":"vmlinuz"}"#);
        assert!(spec.resolve("vm", &s).is_err());
        spec.vcpus = 1;
        assert!(spec.resolve("vm", &s).is_ok());
        spec.memory_mib = 1;
        assert!(spec.resolve("vm", &s).is_err());
    }

    #[test]
    fn refuses_files_outside_stores_and_symlink_escapes() {
        let (d, s) = stores();
        let base = r#""vcpus":1,"memory_mib":128"#;
        let outside = d.path().join("secret");
        let spec = parsed(&format!(r#"{{{base},"kernel":"{}"}}"#, outside.display()));
        assert!(spec.resolve("vm", &s).is_err());
        let spec = parsed(&format!(r#"{{{base},"kernel":"../secret"}}"#));
        assert!(spec.resolve("vm", &s).is_err());
        std::os::unix::fs::symlink(&outside, d.path().join("images/link")).unwrap();
        let spec = parsed(&format!(r#"{{{base},"kernel":"link"}}"#));
        let err = spec.resolve("vm", &s).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        // A writable disk must not come from the image store.
        let spec = parsed(&format!(
            r#"{{{base},"kernel":"vmlinuz","disks":[{{"path":"{}"}}]}}"#,
            d.path().join("images/vmlinuz").display()
        ));
        let err = spec.resolve("vm", &s).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn builds_vmm_command_line() {
        let (_d, s) = stores();
        let mut spec = parsed(
            r#"{"vcpus":2,"memory_mib":256,"kernel":"vmlinuz","cmdline":"console=ttyS0",
                "disks":[{"path":"root.img","serial":"root"}],"nics":[{"bridge":"br0","vlan":10}]}"#,
        );
        spec.fill_macs("node", "vm");
        let r = spec.resolve("vm", &s).unwrap();
        let args = vmm_args(&r, &params());
        let joined = args.join(" ");
        assert!(joined.contains("--cpus 2 --memory 256"), "{joined}");
        assert!(joined.contains("--disk path="), "{joined}");
        assert!(joined.contains(",serial=root"), "{joined}");
        assert!(joined.contains("--net tap=tap0,mac="), "{joined}");
        assert!(joined.contains("--serial file:/log/c"), "{joined}");
        assert!(!joined.contains("--user"), "{joined}");
        assert!(joined.starts_with("--kernel /"), "{joined}");
        assert!(joined.contains("--cmdline console=ttyS0"), "{joined}");
        let platform = format!("--platform uuid={}", spec.uuid.as_deref().unwrap());
        assert!(
            joined.contains(&platform),
            "kernel boot has the UUID too: {joined}"
        );
        assert!(!joined.contains("--firmware"), "{joined}");
        let args = vmm_args(
            &r,
            &VmmRunParams {
                switch_to_user: Some(VmmUser {
                    uid: 64000,
                    gid: 64001,
                }),
                ..params()
            },
        );
        assert!(args.join(" ").ends_with("--user 64000:64001"), "{args:?}");
        assert!(
            !args.contains(&"--transport".to_owned()),
            "the VMM's default"
        );
        let mut v2 = spec.clone();
        v2.cpu_template = Some(CpuTemplate::X86_64V2);
        let r2 = v2.resolve("vm", &s).unwrap();
        assert!(vmm_args(&r2, &params())
            .join(" ")
            .contains("--cpu-template x86-64-v2"));
        let mut pci = spec.clone();
        pci.transport = Some(Transport::Pci);
        let r = pci.resolve("vm", &s).unwrap();
        assert!(vmm_args(&r, &params())
            .join(" ")
            .contains("--transport pci"));
        assert!(parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","transport":"isa"}"#).is_err());
        let mut limited = parsed(
            r#"{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz",
                "disks":[{"path":"root.img","limit":{"bandwidth":"10M","ops":2000}}],
                "nics":[{"bridge":"br0","limit":{"bandwidth":"1G","bandwidth_burst":65536}}]}"#,
        );
        limited.fill_macs("node", "vm");
        let r = limited.resolve("vm", &s).unwrap();
        let joined = vmm_args(&r, &params()).join(" ");
        assert!(
            joined.contains("root.img,bandwidth=10M,ops=2000 "),
            "{joined}"
        );
        assert!(
            joined.contains(",bandwidth=1G,bandwidth-burst=65536"),
            "{joined}"
        );
        for (limit, why) in [
            (r#"{"bandwidth":"10X"}"#, "bytes per second"),
            (r#"{"bandwidth":""}"#, "bytes per second"),
            (r#"{"ops_burst":5}"#, "needs ops"),
            (r#"{"bandwidth_burst":5}"#, "needs bandwidth"),
            (
                r#"{"bandwidth":"0","bandwidth_burst":5}"#,
                "needs bandwidth",
            ),
            (r#"{"bandwidth":"99999999999G"}"#, "below 16 EiB"),
            (r#"{"ops":10,"ops_burst":0}"#, "at least 1"),
        ] {
            let bad = parsed(&format!(
                r#"{{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz","disks":[{{"path":"root.img","limit":{limit}}}]}}"#
            ));
            let e = bad.resolve("vm", &s).expect_err(limit).to_string();
            assert!(e.contains("disks[0].limit") && e.contains(why), "{e}");
        }
        assert!(parse(
            r#"{"vcpus":1,"memory_mib":128,"kernel":"k","disks":[{"path":"r","limit":{"rate":1}}]}"#
        )
        .is_err());
        let v3 = parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","cpu_template":"x86-64-v3"}"#)
            .expect("template");
        assert_eq!(v3.cpu_template, Some(CpuTemplate::X86_64V3));
        let bad = r#"{"vcpus":1,"memory_mib":128,"kernel":"k","cpu_template":"skylake"}"#;
        let e = parse(bad).expect_err("unknown template").to_string();
        assert!(e.contains("x86-64-v3"), "{e}");
        let back = parse(&serde_json::to_string(&pci).unwrap()).unwrap();
        assert_eq!(back.transport, Some(Transport::Pci), "round trip");
    }

    #[test]
    fn a_nics_rx_and_tx_limits_become_the_vmms_direction_keys() {
        let (_d, s) = stores();
        let nic = |nic: &str| {
            let mut spec = parsed(&format!(
                r#"{{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz","nics":[{nic}]}}"#
            ));
            spec.fill_macs("node", "vm");
            spec.resolve("vm", &s).map(|r| {
                let args = vmm_args(&r, &params());
                let at = args.iter().position(|a| a == "--net").expect("--net");
                args[at + 1].clone()
            })
        };
        let net = nic(r#"{"bridge":"br0","limit":{"bandwidth":"100M"},
                          "rx_limit":{"bandwidth":"10M","bandwidth_burst":4096},
                          "tx_limit":{"ops":5000,"ops_burst":100}}"#)
        .expect("valid");
        assert!(
            net.ends_with(
                ",bandwidth=100M,rx_bandwidth=10M,rx_bandwidth-burst=4096,tx_ops=5000,tx_ops-burst=100"
            ),
            "{net}"
        );
        // A direction's burst over the NIC's rate, and one direction limited alone.
        let net = nic(r#"{"bridge":"br0","limit":{"ops":100},"rx_limit":{"ops_burst":3}}"#)
            .expect("valid");
        assert!(net.ends_with(",ops=100,rx_ops-burst=3"), "{net}");
        let net = nic(r#"{"bridge":"br0","tx_limit":{"bandwidth":"1G"}}"#).expect("valid");
        assert!(net.ends_with(",tx_bandwidth=1G"), "{net}");
        for (bad, why) in [
            (
                r#"{"bridge":"br0","rx_limit":{"bandwidth_burst":5}}"#,
                "nics[0].rx_limit.bandwidth_burst needs bandwidth",
            ),
            (
                r#"{"bridge":"br0","limit":{"ops":5},"tx_limit":{"ops":0,"ops_burst":2}}"#,
                "nics[0].tx_limit.ops_burst needs ops",
            ),
            (
                r#"{"bridge":"br0","tx_limit":{"bandwidth":"fast"}}"#,
                "nics[0].tx_limit.bandwidth",
            ),
            (
                r#"{"bridge":"br0","limit":{"bandwidth":"1X"},"rx_limit":{"ops":1}}"#,
                "nics[0].limit.bandwidth",
            ),
        ] {
            let e = nic(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(parse(
            r#"{"vcpus":1,"memory_mib":128,"kernel":"k","nics":[{"bridge":"b","rx_limit":{"rate":1}}]}"#
        )
        .is_err());
        let spec = parse(
            r#"{"vcpus":1,"memory_mib":128,"kernel":"k","nics":[{"bridge":"b","rx_limit":{"ops":1}}]}"#,
        )
        .expect("valid");
        let back = parse(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec, "round trip");
    }

    #[test]
    fn the_rng_limit_becomes_the_vmms_rng_option() {
        let (_d, s) = stores();
        let args = |rng: &str| {
            let spec = parsed(&format!(
                r#"{{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz"{rng}}}"#
            ));
            spec.resolve("vm", &s).map(|r| vmm_args(&r, &params()))
        };
        let limited =
            args(r#","rng":{"limit":{"bandwidth":"64K","bandwidth_burst":4096,"ops":100}}"#)
                .expect("valid");
        let at = limited.iter().position(|a| a == "--rng").expect("--rng");
        assert_eq!(
            limited[at + 1],
            "bandwidth=64K,bandwidth-burst=4096,ops=100"
        );
        assert_eq!(limited.iter().filter(|a| *a == "--rng").count(), 1);
        // No limit: no option, the VMM's unlimited entropy device.
        for unlimited in ["", r#","rng":{}"#, r#","rng":{"limit":{}}"#] {
            let a = args(unlimited).expect("valid");
            assert!(!a.contains(&"--rng".to_owned()), "{unlimited}: {a:?}");
            assert!(!a.contains(&"--no-rng".to_owned()), "{unlimited}: {a:?}");
        }
        for (bad, why) in [
            (
                r#","rng":{"limit":{"bandwidth":"1T"}}"#,
                "rng.limit.bandwidth",
            ),
            (
                r#","rng":{"limit":{"ops_burst":3}}"#,
                "rng.limit.ops_burst needs ops",
            ),
        ] {
            let e = args(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","rng":{"off":true}}"#).is_err());
        let spec = parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","rng":{"limit":{"ops":5}}}"#)
            .expect("valid");
        let back = parse(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec, "round trip");
    }

    #[test]
    fn firmware_boot_is_an_alternative_to_kernel() {
        let (_d, s) = stores();
        let base = r#""vcpus":1,"memory_mib":128"#;
        let err_of = |extra: &str| {
            parsed(&format!("{{{base}{extra}}}"))
                .resolve("vm", &s)
                .unwrap_err()
                .to_string()
        };
        let disk = r#","disks":[{"path":"root.img"}]"#;
        assert!(err_of("").contains("either kernel"), "neither");
        let both = err_of(&format!(r#","kernel":"vmlinuz","firmware":"uefi"{disk}"#));
        assert!(both.contains("not both"), "{both}");
        let e = err_of(&format!(r#","firmware":"uefi","initrd":"vmlinuz"{disk}"#));
        assert!(e.contains("initrd belongs to direct kernel boot"), "{e}");
        let e = err_of(&format!(r#","firmware":"uefi","cmdline":"quiet"{disk}"#));
        assert!(e.contains("cmdline belongs to direct kernel boot"), "{e}");
        let e = err_of(&format!(r#","firmware":"uefi","transport":"mmio"{disk}"#));
        assert!(e.contains("transport \"pci\""), "{e}");
        let e = err_of(r#","firmware":"uefi""#);
        assert!(e.contains("at least one disk"), "{e}");
        assert!(parse(&format!(r#"{{{base},"firmware":"bios"{disk}}}"#)).is_err());

        // Transport absent or pci: both run on virtio-pci.
        for transport in ["", r#","transport":"pci""#] {
            let spec = parsed(&format!(
                r#"{{{base},"firmware":"uefi"{transport},"disks":[{{"path":"root.img"}},
                    {{"path":"data.img","readonly":true}}]}}"#
            ));
            let r = spec.resolve("vm", &s).unwrap();
            assert_eq!(r.boot, Boot::Firmware(Firmware::Uefi));
            assert_eq!(r.transport, Some(Transport::Pci));
            let args = vmm_args(&r, &params());
            let joined = args.join(" ");
            assert!(joined.starts_with("--firmware /fw/CLOUDHV.fd "), "{joined}");
            assert!(joined.contains("--transport pci"), "{joined}");
            let uuid = spec.uuid.as_deref().unwrap();
            assert!(
                joined.contains(&format!("--platform uuid={uuid}")),
                "{joined}"
            );
            for absent in ["--kernel", "--initrd", "--cmdline"] {
                assert!(!args.contains(&absent.to_owned()), "{joined}");
            }
            // The first disk of the spec is the first --disk: the one the firmware boots.
            let first = args.iter().position(|a| a == "--disk").unwrap();
            assert!(args[first + 1].ends_with("/root.img"), "{joined}");
            // Serialized form: lowercase, round trip.
            let json = serde_json::to_value(&spec).unwrap();
            assert_eq!(json["firmware"], "uefi");
            assert!(json.get("kernel").is_none(), "{json}");
            assert_eq!(parse(&json.to_string()).unwrap(), spec);
        }
    }

    #[test]
    fn uuid_is_kept_normalized_or_generated() {
        let (_d, s) = stores();
        let mut spec = parse(
            r#"{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz",
                "uuid":"0F3C1B2A-9D4E-4F6A-8B7C-1D2E3F4A5B6C"}"#,
        )
        .unwrap();
        spec.fill_uuid().unwrap();
        assert_eq!(
            spec.uuid.as_deref(),
            Some("0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c")
        );
        let again = spec.clone();
        spec.fill_uuid().unwrap();
        assert_eq!(spec, again, "filling twice changes nothing");
        assert_eq!(
            spec.resolve("vm", &s).unwrap().uuid,
            "0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c"
        );

        let mut a = parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz"}"#).unwrap();
        let e = a.resolve("vm", &s).unwrap_err().to_string();
        assert!(e.contains("uuid is missing"), "{e}");
        let mut b = a.clone();
        a.fill_uuid().unwrap();
        b.fill_uuid().unwrap();
        assert_ne!(a.uuid, b.uuid, "generated per VM");
        assert!(a.resolve("vm", &s).is_ok());

        for bad in ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"] {
            let mut c = parse(&format!(
                r#"{{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz","uuid":"{bad}"}}"#
            ))
            .unwrap();
            let e = c.fill_uuid().unwrap_err().to_string();
            assert!(e.contains("is not a UUID"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_migration_target_waits_for_the_guest_with_the_same_devices() {
        let (_d, s) = stores();
        let mut spec = parsed(
            r#"{"vcpus":2,"memory_mib":256,"kernel":"vmlinuz","cmdline":"console=ttyS0",
                "disks":[{"path":"root.img"}],"nics":[{"bridge":"br0"}]}"#,
        );
        spec.fill_macs("node", "web");
        let r = spec.resolve("web", &s).unwrap();
        let booted = vmm_args(&r, &params());
        let incoming = vmm_args(
            &r,
            &VmmRunParams {
                incoming: Some("/run/thvc/vms/web/incoming.sock".into()),
                ..params()
            },
        );
        assert_eq!(
            &incoming[..2],
            ["--incoming", "unix:/run/thvc/vms/web/incoming.sock"]
        );
        for boot_only in ["--kernel", "--initrd", "--cmdline", "--firmware"] {
            assert!(!incoming.iter().any(|a| a == boot_only), "{incoming:?}");
        }
        // Everything else (CPUs, memory, devices, UUID) as a boot would have it.
        let without_boot: Vec<&String> = booted
            .iter()
            .skip(2)
            .filter(|a| !a.starts_with("console="))
            .filter(|a| *a != "--cmdline")
            .collect();
        assert_eq!(without_boot, incoming.iter().skip(2).collect::<Vec<_>>());
    }

    #[test]
    fn metadata_becomes_a_read_only_seed_disk_after_the_others() {
        let (_d, s) = stores();
        let mut spec = parsed(
            r#"{"vcpus":1,"memory_mib":128,"firmware":"uefi",
                "disks":[{"path":"root.img"},{"path":"data.img"}],
                "nics":[{"bridge":"br0"}],
                "metadata":{"hostname":"web","network":[{"addresses":["10.0.0.5/24"],
                    "gateway":"10.0.0.1"}]}}"#,
        );
        spec.fill_macs("node", "web");
        let r = spec.resolve("web", &s).unwrap();
        let seed = r.seed.clone().expect("seed documents");
        let meta: serde_json::Value = serde_json::from_str(&seed.meta_data).unwrap();
        assert_eq!(
            meta["instance-id"],
            r.uuid.as_str(),
            "instance-id is the UUID"
        );
        let net = seed.network_config.unwrap();
        assert!(
            net.contains(&r.nics[0].mac),
            "matched by the NIC's MAC: {net}"
        );
        let args = vmm_args(
            &r,
            &VmmRunParams {
                seed_disk: Some("/run/thvc/vms/web/seed.img".into()),
                incoming: None,
                ..params()
            },
        );
        let disks: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(a, _)| *a == "--disk")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(disks.len(), 3, "{args:?}");
        assert!(disks[0].ends_with("/root.img"), "{args:?}");
        assert_eq!(disks[2], "path=/run/thvc/vms/web/seed.img,readonly=on");
        // The metadata round-trips through the stored spec.
        let back = parse(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);

        // Metadata problems are spec problems; the seed takes one of the VMM's disk slots.
        let mut bad = spec.clone();
        bad.metadata
            .as_mut()
            .unwrap()
            .network
            .push(Default::default());
        let e = bad.resolve("web", &s).unwrap_err().to_string();
        assert!(e.contains("metadata.network"), "{e}");
        let mut full = spec.clone();
        full.disks = (0..MAX_DISKS)
            .map(|i| DiskSpec {
                path: "data.img".into(),
                readonly: true,
                serial: Some(format!("d{i}")),
                limit: None,
            })
            .collect();
        let e = full.resolve("web", &s).unwrap_err().to_string();
        assert!(e.contains("at most 15 disks") && e.contains("seed"), "{e}");
        let mut no_md = spec;
        no_md.metadata = None;
        assert_eq!(no_md.resolve("web", &s).unwrap().seed, None);
    }

    #[test]
    fn macs() {
        assert_eq!(
            normalize_mac("52:54:00:AB:cd:01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert!(normalize_mac("01:00:5e:00:00:01").is_none());
        assert!(normalize_mac("52:54:00:ab:cd").is_none());
        assert!(normalize_mac("zz:54:00:ab:cd:01").is_none());
    }
}
