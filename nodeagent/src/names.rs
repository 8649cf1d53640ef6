//! Names of VMs and the identifiers derived from them (D-Bus object paths, systemd unit
//! instances, TAP interface names).
//!
//! A VM name ends up in file names, a D-Bus object path, a systemd unit name and a kernel
//! interface name, so it is restricted up front to a set that is safe in all of them.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Root object path of the agent; the manager lives here, VMs below `vm/`.
pub const MANAGER_PATH: &str = "/de/thueringen/thvc/node1";
/// Prefix of VM object paths.
pub const VM_PATH_PREFIX: &str = "/de/thueringen/thvc/node1/vm/";
/// Longest accepted VM name.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("VM name is empty")]
    Empty,
    #[error("VM name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error(
        "VM name {0:?} contains {1:?}: allowed are letters, digits, '.', '_' and '-' \
         (not as the first character)"
    )]
    BadChar(String, char),
}

/// Checks that `name` is a valid VM name: 1..=64 characters of `[A-Za-z0-9._-]`, starting
/// with a letter, digit or underscore (a leading '.' or '-' confuses file tools and CLIs).
pub fn validate_vm_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for (i, c) in name.chars().enumerate() {
        let ok = c.is_ascii_alphanumeric() || c == '_' || (i > 0 && (c == '.' || c == '-'));
        if !ok {
            return Err(NameError::BadChar(name.to_owned(), c));
        }
    }
    Ok(())
}

/// Encodes `label` as one object path element the way `sd_bus_path_encode()` does:
/// `[A-Za-z0-9]` stay, everything else (and a leading digit) becomes `_xx` (lower-case hex);
/// the empty string becomes `_`.
pub fn bus_label_escape(label: &str) -> String {
    if label.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(label.len() * 3);
    for (i, b) in label.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            out.push(b as char);
        } else {
            out.push('_');
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// Inverse of [`bus_label_escape`]; `None` if `s` is not a valid encoding.
pub fn bus_label_unescape(s: &str) -> Option<String> {
    if s == "_" {
        return Some(String::new());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Object path of the VM called `name`.
pub fn vm_object_path(name: &str) -> String {
    format!("{VM_PATH_PREFIX}{}", bus_label_escape(name))
}

/// Escapes `s` as a systemd unit name component the way `systemd-escape` does (without
/// `--path`): `[A-Za-z0-9:_.]` stay (a leading '.' is escaped), '/' becomes '-', everything
/// else `\xNN`.
pub fn systemd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => {
                out.push(b as char)
            }
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Name of the systemd unit that runs VM `name`.
pub fn vm_unit_name(name: &str) -> String {
    format!("thvc-vm@{}.service", systemd_escape(name))
}

/// Stable TAP interface name for NIC `index` of VM `name`: `thvc` + 8 hex digits of a hash of
/// the VM name + `n` + index. Fits IFNAMSIZ (15 characters) for indexes below 100.
pub fn tap_name(vm: &str, index: usize) -> String {
    let digest = Sha256::digest(vm.as_bytes());
    format!("thvc{}n{index}", hex::encode(&digest[..4]))
}

/// Locally administered, unicast MAC address derived from the node's name, the VM's name and
/// the NIC's index, so a VM keeps its address across restarts and re-creation on this node
/// while the same VM name on another node gets a different one.
pub fn stable_mac(node: &str, vm: &str, index: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"thvc-mac\0");
    hasher.update(node.as_bytes());
    hasher.update(b"\0");
    hasher.update(vm.as_bytes());
    hasher.update(b"\0");
    hasher.update(index.to_le_bytes());
    let digest = hasher.finalize();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    // Clear the multicast bit, set the locally-administered bit.
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_matches_sd_bus() {
        // Values checked against `busctl` / sd_bus_path_encode behaviour.
        assert_eq!(bus_label_escape("web"), "web");
        assert_eq!(bus_label_escape("web-1"), "web_2d1");
        assert_eq!(bus_label_escape("1vm"), "_31vm");
        assert_eq!(bus_label_escape("a.b_c"), "a_2eb_5fc");
        assert_eq!(bus_label_escape(""), "_");
        for n in ["web-1", "1vm", "a.b_c", "x", "_"] {
            assert_eq!(bus_label_unescape(&bus_label_escape(n)).as_deref(), Some(n));
        }
    }

    #[test]
    fn names() {
        assert!(validate_vm_name("web-01.prod_a").is_ok());
        assert!(validate_vm_name("_x").is_ok());
        assert_eq!(validate_vm_name(""), Err(NameError::Empty));
        assert!(validate_vm_name("-x").is_err());
        assert!(validate_vm_name(".x").is_err());
        assert!(validate_vm_name("a/b").is_err());
        assert!(validate_vm_name("a b").is_err());
        assert!(validate_vm_name("Ã¤").is_err());
        assert!(validate_vm_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn unit_and_tap_names() {
        assert_eq!(vm_unit_name("web-1"), "thvc-vm@web\\x2d1.service");
        assert_eq!(vm_unit_name("a.b"), "thvc-vm@a.b.service");
        let tap = tap_name("web-1", 7);
        assert!(tap.len() <= 15, "{tap}");
        assert_eq!(tap, tap_name("web-1", 7));
        assert_ne!(tap, tap_name("web-2", 7));
    }

    #[test]
    fn macs_are_stable_local_unicast() {
        let a = stable_mac("node1", "web", 0);
        assert_eq!(a, stable_mac("node1", "web", 0));
        assert_ne!(a, stable_mac("node2", "web", 0));
        assert_ne!(a, stable_mac("node1", "web", 1));
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02);
    }
}
