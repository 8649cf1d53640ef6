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
