//! Facts about the host for the Manager's properties.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// The kernel's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Online CPUs.
pub fn cpus() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as u32
    } else {
        1
    }
}

/// A field of /proc/meminfo in bytes.
/// A /proc/meminfo field in bytes; 0 (and a warning) when it cannot be read, since the D-Bus
/// property has no "unknown".
fn meminfo(field: &str) -> u64 {
    let text = match std::fs::read_to_string("/proc/meminfo") {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!("cannot read /proc/meminfo ({e}); reporting {field} as 0");
            return 0;
        }
    };
    let value = text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    });
    value.unwrap_or_else(|| {
        tracing::warn!("/proc/meminfo has no {field}; reporting it as 0");
        0
    })
}

pub fn memory_bytes() -> u64 {
    meminfo("MemTotal")
}

pub fn memory_available_bytes() -> u64 {
    meminfo("MemAvailable")
}

/// True if the kernel offers KVM: /dev/kvm exists as a character device (the vendor module,
/// kvm_amd or kvm_intel, is loaded). The agent does not open it: the VMMs do, each in its
/// own unit. (Opening it from the agent's sandbox said "no" on nodes whose /dev/kvm
/// appeared after the agent started: DeviceAllow= resolves a path when the unit starts.)
pub fn kvm_available() -> bool {
    is_char_device(Path::new("/dev/kvm"))
}

fn is_char_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

/// The EFI global variables' vendor GUID (UEFI spec), the suffix of their names in efivarfs.
const EFI_GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// A one-byte boolean EFI variable from efivarfs (4 bytes of attributes, then the value);
/// None when absent or not one byte.
fn efi_bool(efivars: &Path, name: &str) -> Option<bool> {
    let data = std::fs::read(efivars.join(format!("{name}-{EFI_GLOBAL}"))).ok()?;
    match data.as_slice() {
        [_, _, _, _, v] => Some(*v != 0),
        _ => None,
    }
}

/// The firmware's Secure Boot state in bootctl's words: "enabled (user)", "enabled
/// (deployed)", "disabled (setup)", "disabled (audit)", "disabled", or "unsupported" (no
/// SecureBoot variable: not booted through UEFI, or a firmware without Secure Boot). From
/// the variables under `efivars` (/sys/firmware/efi/efivars) as systemd decodes them.
pub fn secure_boot(efivars: &Path) -> String {
    let Some(secure) = efi_bool(efivars, "SecureBoot") else {
        return "unsupported".to_owned();
    };
    let flag = |name| efi_bool(efivars, name).unwrap_or(false);
    let (setup, audit, deployed) = (flag("SetupMode"), flag("AuditMode"), flag("DeployedMode"));
    let mode = match (secure, setup, audit, deployed) {
        (true, _, _, true) => "enabled (deployed)",
        (true, false, false, false) => "enabled (user)",
        (true, _, _, _) => "enabled",
        (false, true, true, _) => "disabled (audit)",
        (false, true, false, false) => "disabled (setup)",
        (false, _, _, _) => "disabled",
    };
    mode.to_owned()
}

/// The public half of the node's TPM2 storage root key (PEM) as systemd-tpm2-setup left it
/// in `path` (/run/systemd/tpm2-srk-public-key.pem): the TPM2's identity. (Sealing a node's
/// credentials offline to it is what systemd-creds 257 cannot do: image/README.md.) Empty
/// without a TPM2 (or before systemd set it up), and when the file is not one PEM public
/// key of a sane size.
pub fn tpm2_srk_public_key(path: &Path) -> String {
    one_pem(path, "PUBLIC KEY")
}

/// /var's recovery key as the node keeps it: a CMS envelope (PEM) only the operator's
/// escrow certificate opens, written once per /var by /usr/lib/thvc/var-recovery-key to
/// `path` (/var/lib/thvc/var-recovery-key.p7m). Empty when there is none (no escrow
/// certificate given) and when the file is not one PEM CMS message of a sane size.
pub fn var_recovery_key(path: &Path) -> String {
    one_pem(path, "CMS")
}

/// The PCR signing key /var and the node's credentials are sealed to: the SHA-256 of its
/// public key in PKCS#1 DER form, the "pkfp" of a UKI's PCR signature, in 64 hex digits, as
/// thvc-pcr-key-rollover.service writes it to `path` (/var/lib/thvc/pcr-key) once both are
/// sealed to the image's key (image/README.md, "Rotating the PCR signing key"). Empty before
/// it ran (missing silently) and when the file says anything else (with a warning).
pub fn pcr_key(path: &Path) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    match std::str::from_utf8(&text).map(str::trim) {
        Ok(fp)
            if fp.len() == 64
                && fp
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            fp.to_owned()
        }
        _ => {
            tracing::warn!("{}: not one SHA-256 fingerprint in hex", path.display());
            String::new()
        }
    }
}

/// Whether this is a provisioning boot: Secure Boot off and no /var on the disk yet, so /var
/// is in memory and nothing of this boot is kept (thvc-provisioning-generator marks it with
/// `path`; image/README.md, "Writing it to a server").
pub fn provisioning(path: &Path) -> bool {
    path.exists()
}

/// The text of `path` when it is exactly one PEM block of type `label` (at most 16 KiB);
/// otherwise empty (a missing file silently, anything else with a warning).
fn one_pem(path: &Path, label: &str) -> String {
    const MAX: u64 = 16 * 1024;
    let Ok(f) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut text = String::new();
    if std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX + 1), &mut text).is_err()
        || text.len() as u64 > MAX
    {
        tracing::warn!("{}: not a PEM file of at most {MAX} bytes", path.display());
        return String::new();
    }
    let body = text.trim();
    if !(body.starts_with(&format!("-----BEGIN {label}-----"))
        && body.ends_with(&format!("-----END {label}-----"))
        && body.matches("-----BEGIN").count() == 1)
    {
        tracing::warn!("{}: not one PEM {label}", path.display());
        return String::new();
    }
    format!("{body}\n")
}

/// A field of an os-release file (empty if absent), unquoted as os-release(5) says.
fn os_release_field(os_release: &Path, key: &str) -> String {
    let Ok(text) = std::fs::read_to_string(os_release) else {
        return String::new();
    };
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| {
            let v = v.trim();
            let unquoted = v
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                .unwrap_or(v);
            unquoted.replace("\\\"", "\"").replace("\\\\", "\\")
        })
        .unwrap_or_default()
}

/// IMAGE_VERSION from an os-release file (empty if absent).
pub fn image_version(os_release: &Path) -> String {
    os_release_field(os_release, "IMAGE_VERSION")
}

/// The image versions installed on this node's disks: a slot's root and verity partitions
/// are both labelled `<IMAGE_ID>_<version>` (image/README.md, "Updates"), read from the
/// kernel's `PARTNAME` of each block device under `sys_block` (/sys/class/block). A
/// version with only one of the two (an update being written) is not installed. Sorted
/// oldest first (versions sort as releases follow each other); empty off the image.
pub fn installed_versions(os_release: &Path, sys_block: &Path) -> Vec<String> {
    let image_id = os_release_field(os_release, "IMAGE_ID");
    if image_id.is_empty() {
        return Vec::new();
    }
    let prefix = format!("{image_id}_");
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut count: std::collections::BTreeMap<String, u32> = Default::default();
    for e in entries.flatten() {
        let Ok(uevent) = std::fs::read_to_string(e.path().join("uevent")) else {
            continue;
        };
        if let Some(v) = uevent
            .lines()
            .find_map(|l| l.strip_prefix("PARTNAME=")?.strip_prefix(prefix.as_str()))
        {
            *count.entry(v.to_owned()).or_default() += 1;
        }
    }
    let mut versions: Vec<String> = count
        .into_iter()
        .filter(|&(_, n)| n >= 2)
        .map(|(v, _)| v)
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    versions
}

/// A Unified Kernel Image of this image on the ESP that systemd-boot's boot counting gave
/// up on: it has no tries left (`<IMAGE_ID>_<version>+0-<done>.efi` or `+0.efi`), so
/// systemd-boot boots the previous version instead (a rollback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedUki {
    pub version: String,
    /// Boot attempts made (the `-<done>` of the counter; 0 when it has none).
    pub tries_done: u64,
}

/// The versions that failed their boot attempts, from the names in the ESP's `EFI/Linux`
/// directory: `<image_id>_<version>[+<left>[-<done>]].efi`, boot counting as systemd-boot
/// does it (its suffix `.efi` in any case). A version with a bootable UKI beside the failed
/// one (blessed, or tries left) is not failed. Names of other images and anything else are
/// ignored. Sorted oldest first.
pub fn failed_ukis<'a>(image_id: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<FailedUki> {
    if image_id.is_empty() {
        return Vec::new();
    }
    let prefix = format!("{image_id}_");
    // Per version: the most attempts among its failed UKIs, and whether one is bootable.
    let mut seen: BTreeMap<String, (Option<u64>, bool)> = BTreeMap::new();
    for name in names {
        let Some((version, left, done)) = parse_uki_name(&prefix, name) else {
            continue;
        };
        let entry = seen.entry(version.to_owned()).or_default();
        match left {
            Some(0) => entry.0 = Some(entry.0.unwrap_or(0).max(done.unwrap_or(0))),
            _ => entry.1 = true,
        }
    }
    let mut failed: Vec<FailedUki> = seen
        .into_iter()
        .filter_map(|(version, (tries, bootable))| match (tries, bootable) {
            (Some(tries_done), false) => Some(FailedUki {
                version,
                tries_done,
            }),
            _ => None,
        })
        .collect();
    failed.sort_by(|a, b| version_cmp(&a.version, &b.version));
    failed
}

/// Splits `<prefix><version>[+<left>[-<done>]].efi` into the version and the counter (as
/// systemd-boot reads it: a `+` suffix that is not a well-formed counter is part of the
/// version). None for other names or an empty version.
fn parse_uki_name<'a>(prefix: &str, name: &'a str) -> Option<(&'a str, Option<u64>, Option<u64>)> {
    let stem_len = name.len().checked_sub(4)?;
    // The last four bytes are ASCII if they spell .efi, so stem_len is a char boundary.
    if !name.is_char_boundary(stem_len) || !name[stem_len..].eq_ignore_ascii_case(".efi") {
        return None;
    }
    let rest = name[..stem_len].strip_prefix(prefix)?;
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let counter = rest.rsplit_once('+').and_then(|(version, counter)| {
        let (left, done) = match counter.split_once('-') {
            Some((left, done)) => (number(left)?, Some(number(done)?)),
            None => (number(counter)?, None),
        };
        Some((version, left, done))
    });
    let (version, left, done) = match counter {
        Some((version, left, done)) => (version, Some(left), done),
        None => (rest, None, None),
    };
    if version.is_empty() {
        return None;
    }
    Some((version, left, done))
}

/// A failed version as the Manager's `FailedVersions` reports it: the version, its boot
/// attempts, and the boot (µs since the Unix epoch) on which the node came back without it.
pub type FailedVersion = (String, u64, u64);

/// The first boot on which the agent saw each failed version (µs since the epoch), by
/// version: `<state>/failed-versions.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FailedRecords {
    versions: BTreeMap<String, FailedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FailedRecord {
    since_usec: u64,
}

/// The records for `failed` (what the ESP shows now): kept times for versions already
/// recorded, `boot_usec` for new ones (returned second), none for versions gone from the ESP.
fn merge_failed(
    records: &FailedRecords,
    failed: &[FailedUki],
    boot_usec: u64,
) -> (FailedRecords, Vec<FailedUki>) {
    let mut merged = FailedRecords::default();
    let mut new = Vec::new();
    for f in failed {
        let record = match records.versions.get(&f.version) {
            Some(r) => r.clone(),
            None => {
                new.push(f.clone());
                FailedRecord {
                    since_usec: boot_usec,
                }
            }
        };
        merged.versions.insert(f.version.clone(), record);
    }
    (merged, new)
}

/// This boot's start, µs since the epoch: `btime` of /proc/stat, else now minus the uptime,
/// else now.
pub fn boot_time_usec() -> u64 {
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    if let Some(secs) = btime {
        return secs.saturating_mul(1_000_000);
    }
    let uptime = std::fs::read_to_string("/proc/uptime").ok().and_then(|s| {
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
    });
    match uptime {
        Some(up) if up.is_finite() && up >= 0.0 => now.saturating_sub((up * 1e6) as u64),
        _ => now,
    }
}

/// The image versions systemd-boot rolled back from, with when (see [`FailedUki`]): the ESP
/// is read at every [`FailedVersions::read`], and the boot on which the agent first saw a
/// version failed is kept in `<state>/failed-versions.json` (FAT keeps no useful change
/// time), so agent restarts and later boots report the original time.
///
/// The records are updated on read, under a mutex, rather than once at agent start: the
/// ESP may be mounted (an automount) or change (a failed UKI removed, another update tried
/// by hand) while the agent runs, and the property must always match the directory; the
/// mutex keeps concurrent reads (Get, GetAll) from both recording and warning about the
/// same version. The agent also reads once at start ([`FailedVersions::read`] from the bus
/// setup), so the warning about a rollback is logged at boot even if nobody asks.
pub struct FailedVersions {
    esp: PathBuf,
    os_release: PathBuf,
    file: PathBuf,
    /// The records as last read or written; None until first loaded from `file`.
    records: Mutex<Option<FailedRecords>>,
}

impl FailedVersions {
    /// Failed versions of the image named by `os_release` on the ESP mounted at `esp`,
    /// recorded in `records` (the agent's `Layout::failed_versions_file`).
    pub fn new(esp: &Path, os_release: &Path, records: &Path) -> Self {
        FailedVersions {
            esp: esp.to_owned(),
            os_release: os_release.to_owned(),
            file: records.to_owned(),
            records: Mutex::new(None),
        }
    }

    /// The failed versions on the ESP now, oldest first (empty without an ESP or an
    /// IMAGE_ID); records new ones (warning about each) and forgets those gone. Blocking
    /// (file I/O, an fsync when the records change).
    pub fn read(&self) -> Vec<FailedVersion> {
        let image_id = os_release_field(&self.os_release, "IMAGE_ID");
        let dir = self.esp.join("EFI").join("Linux");
        let names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        let failed = failed_ukis(&image_id, names.iter().map(String::as_str));
        let mut guard = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let records = guard.get_or_insert_with(|| self.load());
        let (merged, new) = merge_failed(records, &failed, boot_time_usec());
        if !new.is_empty() {
            let booted = image_version(&self.os_release);
            for f in &new {
                tracing::warn!(
                    "version {} failed its {} boot attempts; the node came back on {}",
                    f.version,
                    f.tries_done,
                    if booted.is_empty() {
                        "an unknown version"
                    } else {
                        &booted
                    }
                );
            }
        }
        if merged != *records {
            self.store(&merged);
            *records = merged;
        }
        failed
            .into_iter()
            .map(|f| {
                let since = records
                    .versions
                    .get(&f.version)
                    .map(|r| r.since_usec)
                    .unwrap_or(0);
                (f.version, f.tries_done, since)
            })
            .collect()
    }

    fn load(&self) -> FailedRecords {
        match std::fs::read(&self.file) {
            Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
                tracing::warn!(
                    "ignoring {} ({e}): failed versions count from this boot",
                    self.file.display()
                );
                FailedRecords::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FailedRecords::default(),
            Err(e) => {
                tracing::warn!(
                    "cannot read {} ({e}): failed versions count from this boot",
                    self.file.display()
                );
                FailedRecords::default()
            }
        }
    }

    /// Writes the records (removes the file when there are none); a failure is a warning,
    /// the records then last as long as the agent.
    fn store(&self, records: &FailedRecords) {
        let result = if records.versions.is_empty() {
            fsutil::remove_durable(&self.file)
        } else {
            match serde_json::to_vec_pretty(records) {
                Ok(data) => fsutil::write_atomic(&self.file, &data, 0o644),
                Err(e) => {
                    tracing::warn!("cannot encode the failed versions: {e}");
                    return;
                }
            }
        };
        if let Err(e) = result {
            tracing::warn!("cannot record the failed versions: {e}");
        }
    }
}

/// Compares versions as systemd (sysupdate, systemd-boot) does: the UAPI Version Format
/// Specification (`systemd-analyze compare-versions`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let special = |c: u8| c.is_ascii_alphanumeric() || b"~-^.".contains(&c);
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        // 1. Skip separators (anything but letters, digits and ~ - ^ .).
        while let Some((&c, rest)) = a.split_first() {
            if special(c) {
                break;
            }
            a = rest;
        }
        while let Some((&c, rest)) = b.split_first() {
            if special(c) {
                break;
            }
            b = rest;
        }
        // 2. A tilde sorts lower than anything, even the end.
        match (a.first() == Some(&b'~'), b.first() == Some(&b'~')) {
            (true, false) => return Less,
            (false, true) => return Greater,
            (true, true) => {
                (a, b) = (&a[1..], &b[1..]);
                continue;
            }
            _ => {}
        }
        // 3. The longer string is newer.
        match (a.is_empty(), b.is_empty()) {
            (true, true) => return Equal,
            (true, false) => return Less,
            (false, true) => return Greater,
            _ => {}
        }
        // 4.-6. "-", then "^", then "." each sort lower than what the other string has there.
        let mut skipped = false;
        for sep in [b'-', b'^', b'.'] {
            match (a[0] == sep, b[0] == sep) {
                (true, false) => return Less,
                (false, true) => return Greater,
                (true, true) => {
                    (a, b) = (&a[1..], &b[1..]);
                    skipped = true;
                    break;
                }
                _ => {}
            }
        }
        if skipped {
            continue;
        }
        // 7. Numbers by value (an absent number is 0).
        if a[0].is_ascii_digit() || b[0].is_ascii_digit() {
            let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
            let (na, nb) = (digits(a), digits(b));
            let strip = |s: &[u8]| {
                s.iter()
                    .copied()
                    .skip_while(|&c| c == b'0')
                    .collect::<Vec<u8>>()
            };
            let (da, db) = (strip(&a[..na]), strip(&b[..nb]));
            let o = da.len().cmp(&db.len()).then_with(|| da.cmp(&db));
            if o != Equal {
                return o;
            }
            (a, b) = (&a[na..], &b[nb..]);
            continue;
        }
        // 8. Letters one by one (capitals before lower case); a longer run is newer.
        let letters = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_alphabetic()).count();
        let (la, lb) = (letters(a), letters(b));
        let o = a[..la].cmp(&b[..lb]);
        if o != Equal {
            return o;
        }
        (a, b) = (&a[la..], &b[lb..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_image_version() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("os-release");
        std::fs::write(&f, "ID=thvc\nIMAGE_VERSION=\"2026.11.3\"\n").unwrap();
        assert_eq!(image_version(&f), "2026.11.3");
        std::fs::write(&f, "ID=thvc\n").unwrap();
        assert_eq!(image_version(&f), "");
        assert!(memory_bytes() > 0);
        assert!(memory_available_bytes() <= memory_bytes());
    }

    #[test]
    fn secure_boot_state_from_efi_variables() {
        let dir = tempfile::tempdir().unwrap();
        let vars = dir.path();
        assert_eq!(secure_boot(vars), "unsupported");
        let set = |name: &str, v: u8| {
            std::fs::write(vars.join(format!("{name}-{EFI_GLOBAL}")), [6, 0, 0, 0, v]).unwrap()
        };
        set("SecureBoot", 0);
        set("SetupMode", 1);
        assert_eq!(secure_boot(vars), "disabled (setup)");
        set("SecureBoot", 1);
        set("SetupMode", 0);
        assert_eq!(secure_boot(vars), "enabled (user)");
        set("DeployedMode", 1);
        assert_eq!(secure_boot(vars), "enabled (deployed)");
        // A variable of the wrong size is no answer.
        std::fs::write(
            vars.join(format!("SecureBoot-{EFI_GLOBAL}")),
            [6, 0, 0, 0, 1, 1],
        )
        .unwrap();
        assert_eq!(secure_boot(vars), "unsupported");
    }

    #[test]
    fn tpm2_srk_public_key_only_when_one_pem_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("srk.pem");
        assert_eq!(tpm2_srk_public_key(&f), "", "no TPM2: empty");
        let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
        std::fs::write(&f, pem).unwrap();
        assert_eq!(tpm2_srk_public_key(&f), pem);
        std::fs::write(&f, format!("{pem}{pem}")).unwrap();
        assert_eq!(tpm2_srk_public_key(&f), "", "two keys");
        std::fs::write(
            &f,
            "-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert_eq!(tpm2_srk_public_key(&f), "", "not a public key");
        std::fs::write(&f, "x".repeat(20_000)).unwrap();
        assert_eq!(tpm2_srk_public_key(&f), "", "too large");
    }

    #[test]
    fn var_recovery_key_only_when_one_cms_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("var-recovery-key.p7m");
        assert_eq!(var_recovery_key(&f), "", "none made: empty");
        let pem =
            "-----BEGIN CMS-----\nMIIBxgYJKoZIhvcNAQcDoIIBtzCCAbMCAQAxggFu\n-----END CMS-----\n";
        std::fs::write(&f, pem).unwrap();
        assert_eq!(var_recovery_key(&f), pem);
        std::fs::write(&f, pem.replace("CMS", "PKCS7")).unwrap();
        assert_eq!(var_recovery_key(&f), "", "another PEM type");
        std::fs::write(&f, "kbdcgvbh-ddhjfcue-unrhulle-hbfnitcn\n").unwrap();
        assert_eq!(var_recovery_key(&f), "", "a key in clear is never served");
    }

    #[test]
    fn pcr_key_only_when_one_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pcr-key");
        assert_eq!(pcr_key(&f), "", "not rolled over yet: empty");
        let fp = "3f".repeat(32);
        std::fs::write(&f, format!("{fp}\n")).unwrap();
        assert_eq!(pcr_key(&f), fp);
        std::fs::write(&f, fp.to_uppercase()).unwrap();
        assert_eq!(pcr_key(&f), "", "the rollover writes lower case");
        std::fs::write(&f, &fp[..63]).unwrap();
        assert_eq!(pcr_key(&f), "", "too short");
        std::fs::write(&f, format!("{fp}\n{fp}\n")).unwrap();
        assert_eq!(pcr_key(&f), "", "two of them");
        std::fs::write(&f, [0xffu8; 64]).unwrap();
        assert_eq!(pcr_key(&f), "", "not text");
    }

    #[test]
    fn kvm_is_a_character_device() {
        assert!(is_char_device(Path::new("/dev/null")));
        assert!(!is_char_device(Path::new("/")));
        assert!(!is_char_device(Path::new("/nonexistent/kvm")));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kvm");
        std::fs::write(&f, b"").unwrap();
        assert!(!is_char_device(&f));
    }

    #[test]
    fn installed_versions_from_partition_labels() {
        let dir = tempfile::tempdir().unwrap();
        let os = dir.path().join("os-release");
        std::fs::write(&os, "ID=debian\nIMAGE_ID=thvc-host\n").unwrap();
        let sys = dir.path().join("block");
        for (dev, label) in [
            ("vda", ""),
            ("vda1", "esp"),
            ("vda2", "thvc-host_20261205.103412"),
            ("vda3", "thvc-host_20261205.103412"),
            ("vda4", "thvc-host_20261205.103412.1"),
            ("vda5", "thvc-host_20261205.103412.1"),
            ("vda6", "thvc-host_20261206.000000"), // verity not written yet
            ("vda7", "_empty"),
            ("vdb1", "other-os_1"),
        ] {
            std::fs::create_dir_all(sys.join(dev)).unwrap();
            let name = if label.is_empty() {
                String::new()
            } else {
                format!("PARTNAME={label}\n")
            };
            std::fs::write(
                sys.join(dev).join("uevent"),
                format!("MAJOR=254\nDEVNAME={dev}\n{name}"),
            )
            .unwrap();
        }
        assert_eq!(
            installed_versions(&os, &sys),
            ["20261205.103412", "20261205.103412.1"]
        );
        std::fs::write(&os, "ID=debian\n").unwrap();
        assert!(installed_versions(&os, &sys).is_empty());
    }

    #[test]
    fn failed_ukis_from_esp_names() {
        let names = [
            "thvc-host_20261205.170000.efi",                      // blessed
            "thvc-host_20261206.000000+2-1.efi",                  // counting
            "thvc-host_20261205.180000+0-3.efi",                  // failed
            "thvc-host_20261204.1+0.EFI",                         // failed, no attempts counted
            "thvc-host_20261203.1+3.efi",                         // fresh
            "other-os_20261205.190000+0-3.efi",                   // another image
            "thvc-host_+0-3.efi",                                 // no version
            "thvc-host_20261207.1+0-3.efi.extra",                 // not a UKI
            "thvc-host_20261208.1+0-3",                           // not a UKI
            "thvc-host_20261209.1+0-x.efi", // bad counter: part of the version
            "thvc-host_20261210.1+0-99999999999999999999999.efi", // overflow: not a counter
            "thvc-host_20261211.1+0-3.efi", // failed, but
            "thvc-host_20261211.1.efi",     // ... blessed again
            "thvc-host_2026+1+0-2.efi",     // the last + is the counter
            "thvc-host_x+0-1.efi",
            "thvc-host_x+0-2.efi", // the most attempts count
            "",
            ".efi",
            "+0-3.efi",
            "thvc-host_",
            "thvc-host_.efi",
            "é.efi",
            "aé",
            "thvc-host_é+0-1.efi",
            "thvc-host_1+0--1.efi",
            "thvc-host_1+-1.efi",
            "thvc-host_1+0-.efi",
            "thvc-host_1+.efi",
        ];
        let got: Vec<(String, u64)> = failed_ukis("thvc-host", names)
            .into_iter()
            .map(|f| (f.version, f.tries_done))
            .collect();
        let want: Vec<(String, u64)> = [
            // Sorted as systemd sorts versions: é is a separator, letters before digits.
            ("é", 1),
            ("x", 2),
            ("2026+1", 2),
            ("20261204.1", 0),
            ("20261205.180000", 3),
        ]
        .iter()
        .map(|&(v, n)| (v.to_owned(), n))
        .collect();
        assert_eq!(got, want);
        assert!(
            failed_ukis("", names).is_empty(),
            "no IMAGE_ID, no versions"
        );
        assert_eq!(failed_ukis("other-os", names).len(), 1);
    }

    #[test]
    fn failed_records_keep_the_first_boot_and_drop_versions_gone() {
        let f = |v: &str, n| FailedUki {
            version: v.to_owned(),
            tries_done: n,
        };
        let (r1, new) = merge_failed(&FailedRecords::default(), &[f("2", 3)], 100);
        assert_eq!(new, [f("2", 3)]);
        assert_eq!(r1.versions["2"].since_usec, 100);
        let (r2, new) = merge_failed(&r1, &[f("2", 3), f("3", 3)], 200);
        assert_eq!(new, [f("3", 3)]);
        assert_eq!(r2.versions["2"].since_usec, 100, "kept from the first boot");
        assert_eq!(r2.versions["3"].since_usec, 200);
        let (r3, new) = merge_failed(&r2, &[f("3", 3)], 300);
        assert!(new.is_empty());
        assert_eq!(r3.versions.keys().collect::<Vec<_>>(), ["3"]);
        let (r4, _) = merge_failed(&r3, &[], 400);
        assert!(r4.versions.is_empty());
    }

    #[test]
    fn failed_versions_persist_and_tolerate_a_missing_esp() {
        let dir = tempfile::tempdir().unwrap();
        let os = dir.path().join("os-release");
        std::fs::write(&os, "IMAGE_ID=thvc-host\nIMAGE_VERSION=1\n").unwrap();
        let esp = dir.path().join("esp");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let fv = FailedVersions::new(&esp, &os, &state.join("failed-versions.json"));
        assert!(fv.read().is_empty(), "no ESP");
        assert!(!state.join("failed-versions.json").exists());
        let linux = esp.join("EFI/Linux");
        std::fs::create_dir_all(&linux).unwrap();
        std::fs::write(linux.join("thvc-host_1.efi"), "").unwrap();
        std::fs::write(linux.join("thvc-host_2+0-3.efi"), "").unwrap();
        let boot = boot_time_usec();
        assert!(boot > 0);
        assert_eq!(fv.read(), [("2".to_owned(), 3, boot)]);
        // A record from an earlier boot wins, in a new agent.
        std::fs::write(
            state.join("failed-versions.json"),
            r#"{"versions":{"2":{"since_usec":42}}}"#,
        )
        .unwrap();
        let fv = FailedVersions::new(&esp, &os, &state.join("failed-versions.json"));
        assert_eq!(fv.read(), [("2".to_owned(), 3, 42)]);
        std::fs::remove_file(linux.join("thvc-host_2+0-3.efi")).unwrap();
        assert!(fv.read().is_empty());
        assert!(
            !state.join("failed-versions.json").exists(),
            "record dropped"
        );
        // A corrupt record file is ignored.
        std::fs::write(state.join("failed-versions.json"), "{").unwrap();
        std::fs::write(linux.join("thvc-host_2+0-3.efi"), "").unwrap();
        let fv = FailedVersions::new(&esp, &os, &state.join("failed-versions.json"));
        assert_eq!(fv.read(), [("2".to_owned(), 3, boot)]);
    }

    #[test]
    fn versions_sort_as_systemd_sorts_them() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("20261205.103412", "20261205.103412.1"), Less);
        assert_eq!(
            version_cmp("20261205.103412.dirty", "20261205.103412.1"),
            Less
        );
        assert_eq!(version_cmp("20261205.9", "20261205.10"), Less);
        assert_eq!(version_cmp("20261206.000000", "20261205.235959"), Greater);
        // The examples of the UAPI Version Format Specification.
        for (a, b, o) in [
            ("11", "11", Equal),
            ("systemd-123", "systemd-123", Equal),
            ("bar-123", "foo-123", Less),
            ("123a", "123", Greater),
            ("123.a", "123", Greater),
            ("123.a", "123.b", Less),
            ("123a", "123.a", Greater),
            ("B", "a", Less),
            ("", "0", Less),
            ("0.", "0", Greater),
            ("0.0", "0", Greater),
            ("0", "~", Greater),
            ("", "~", Greater),
            ("1_", "1", Equal),
            ("_1", "1", Equal),
            ("1_", "1.2", Less),
            ("1_2_3", "1.3.3", Greater),
            ("1+", "1", Equal),
            ("1+2+3", "1.3.3", Greater),
        ] {
            assert_eq!(version_cmp(a, b), o, "{a} vs {b}");
            assert_eq!(version_cmp(b, a), o.reverse(), "{b} vs {a}");
        }
        let chain = [
            "122.1",
            "123~rc1-1",
            "123",
            "123-a",
            "123-a.1",
            "123-1",
            "123-1.1",
            "123^post1",
            "123.a-1",
            "123.1-1",
            "123a-1",
            "124-1",
        ];
        for (i, a) in chain.iter().enumerate() {
            for (j, b) in chain.iter().enumerate() {
                assert_eq!(version_cmp(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
    }
}
