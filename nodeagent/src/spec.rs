//! The VM specification: the JSON document a client hands to `CreateVm`, its validation and
//! its translation into a `thvc-vmm` command line.
//!
//! Files a spec references must resolve (after following every symlink) to regular files
//! inside the node's stores: kernels and initrds in the image store, disks in the disk store
//! (read-only disks may also come from the image store). Anything else is refused, so a
//! client that may define VMs cannot make a VMM read or write arbitrary host files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names;
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
    /// Kernel image: absolute path, or relative to the image store.
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// How the VM's devices attach (thvc-vmm's `--transport`); absent: the VMM's default
    /// (virtio-mmio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
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

impl Transport {
    fn as_arg(self) -> &'static str {
        match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        }
    }
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
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub disks: Vec<ResolvedDisk>,
    pub nics: Vec<ResolvedNic>,
    pub transport: Option<Transport>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDisk {
    pub path: PathBuf,
    pub readonly: bool,
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNic {
    pub bridge: String,
    pub vlan: Option<u16>,
    pub mac: String,
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

    /// Validates every field and resolves the referenced files against `stores`.
    pub fn resolve(&self, stores: &Stores) -> Result<ResolvedSpec, SpecError> {
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
        let kernel = resolve_file("kernel", &self.kernel, &stores.images, &[&stores.images])?;
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
        if self.disks.len() > MAX_DISKS {
            return Err(invalid(format!("at most {MAX_DISKS} disks are allowed")));
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
            disks.push(ResolvedDisk {
                path,
                readonly: d.readonly,
                serial: d.serial.clone(),
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
            nics.push(ResolvedNic {
                bridge: n.bridge.clone(),
                vlan: n.vlan,
                mac,
            });
        }
        Ok(ResolvedSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel,
            initrd,
            cmdline: self.cmdline.clone(),
            disks,
            nics,
            transport: self.transport,
        })
    }
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
}

/// The `thvc-vmm` arguments (without the program name) for `spec`.
pub fn vmm_args(spec: &ResolvedSpec, params: &VmmRunParams) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_owned(),
        spec.kernel.display().to_string(),
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
    ];
    if let Some(initrd) = &spec.initrd {
        args.push("--initrd".to_owned());
        args.push(initrd.display().to_string());
    }
    if let Some(cmdline) = &spec.cmdline {
        args.push("--cmdline".to_owned());
        args.push(cmdline.clone());
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
        args.push("--disk".to_owned());
        args.push(v);
    }
    for (nic, tap) in spec.nics.iter().zip(&params.taps) {
        args.push("--net".to_owned());
        args.push(format!("tap={tap},mac={}", nic.mac));
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

    fn stores() -> (tempfile::TempDir, Stores) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("images")).unwrap();
        fs::create_dir(dir.path().join("disks")).unwrap();
        fs::write(dir.path().join("images/vmlinuz"), b"k").unwrap();
        fs::write(dir.path().join("disks/root.img"), b"d").unwrap();
        fs::write(dir.path().join("secret"), b"s").unwrap();
        let s = Stores::new(&dir.path().join("images"), &dir.path().join("disks")).unwrap();
        (dir, s)
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","cpus":2}"#).is_err());
        let (_d, s) = stores();
        let mut spec = parse(r#"{"vcpus":0,"memory_mib":128,"kernel":"vmlinuz"}"#).unwrap();
        assert!(spec.resolve(&s).is_err());
        spec.vcpus = 1;
        assert!(spec.resolve(&s).is_ok());
        spec.memory_mib = 1;
        assert!(spec.resolve(&s).is_err());
    }

    #[test]
    fn refuses_files_outside_stores_and_symlink_escapes() {
        let (d, s) = stores();
        let base = r#""vcpus":1,"memory_mib":128"#;
        let outside = d.path().join("secret");
        let spec = parse(&format!(r#"{{{base},"kernel":"{}"}}"#, outside.display())).unwrap();
        assert!(spec.resolve(&s).is_err());
        let spec = parse(&format!(r#"{{{base},"kernel":"../secret"}}"#)).unwrap();
        assert!(spec.resolve(&s).is_err());
        std::os::unix::fs::symlink(&outside, d.path().join("images/link")).unwrap();
        let spec = parse(&format!(r#"{{{base},"kernel":"link"}}"#)).unwrap();
        let err = spec.resolve(&s).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        // A writable disk must not come from the image store.
        let spec = parse(&format!(
            r#"{{{base},"kernel":"vmlinuz","disks":[{{"path":"{}"}}]}}"#,
            d.path().join("images/vmlinuz").display()
        ))
        .unwrap();
        assert!(spec.resolve(&s).is_err());
    }

    #[test]
    fn builds_vmm_command_line() {
        let (_d, s) = stores();
        let mut spec = parse(
            r#"{"vcpus":2,"memory_mib":256,"kernel":"vmlinuz","cmdline":"console=ttyS0",
                "disks":[{"path":"root.img","serial":"root"}],"nics":[{"bridge":"br0","vlan":10}]}"#,
        )
        .unwrap();
        spec.fill_macs("node", "vm");
        let r = spec.resolve(&s).unwrap();
        let args = vmm_args(
            &r,
            &VmmRunParams {
                console_log: "/log/c".into(),
                api_socket: "/run/a.sock".into(),
                taps: vec!["tap0".into()],
                switch_to_user: None,
            },
        );
        let joined = args.join(" ");
        assert!(joined.contains("--cpus 2 --memory 256"), "{joined}");
        assert!(joined.contains("--disk path="), "{joined}");
        assert!(joined.contains(",serial=root"), "{joined}");
        assert!(joined.contains("--net tap=tap0,mac="), "{joined}");
        assert!(joined.contains("--serial file:/log/c"), "{joined}");
        assert!(!joined.contains("--user"), "{joined}");
        let args = vmm_args(
            &r,
            &VmmRunParams {
                console_log: "/log/c".into(),
                api_socket: "/run/a.sock".into(),
                taps: vec!["tap0".into()],
                switch_to_user: Some(VmmUser {
                    uid: 64000,
                    gid: 64001,
                }),
            },
        );
        assert!(args.join(" ").ends_with("--user 64000:64001"), "{args:?}");
        assert!(
            !args.contains(&"--transport".to_owned()),
            "the VMM's default"
        );
        let mut pci = spec.clone();
        pci.transport = Some(Transport::Pci);
        let r = pci.resolve(&s).unwrap();
        let params = VmmRunParams {
            console_log: "/log/c".into(),
            api_socket: "/run/a.sock".into(),
            taps: vec!["tap0".into()],
            switch_to_user: None,
        };
        assert!(vmm_args(&r, &params).join(" ").contains("--transport pci"));
        assert!(parse(r#"{"vcpus":1,"memory_mib":128,"kernel":"k","transport":"isa"}"#).is_err());
        let back = parse(&serde_json::to_string(&pci).unwrap()).unwrap();
        assert_eq!(back.transport, Some(Transport::Pci), "round trip");
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
