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

/// IMAGE_VERSION from an os-release file (empty if absent), unquoted as os-release(5) says.
pub fn image_version(os_release: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(os_release) else {
        return String::new();
    };
    text.lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
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
}
