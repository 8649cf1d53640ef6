//! Facts about the host for the Manager's properties.

use std::path::Path;

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

/// True if /dev/kvm can be opened for reading and writing (what a VMM needs).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
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

/// Compares versions as systemd-sysupdate does in the common case: runs of digits by
/// value, everything else by character; a version that extends another is newer.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(v: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = v;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest
                .find(|x: char| x.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
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
    fn versions_sort_as_releases_follow() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("20261205.103412", "20261205.103412.1"), Less);
        assert_eq!(version_cmp("20261205.9", "20261205.10"), Less);
        assert_eq!(version_cmp("20261206.000000", "20261205.235959"), Greater);
        assert_eq!(version_cmp("1.02", "1.2"), Equal);
        assert_eq!(version_cmp("1.2a", "1.2b"), Less);
    }
}
