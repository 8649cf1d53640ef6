//! The stable identity of a VM: a UUID stored with its spec and handed to the guest as the
//! SMBIOS system UUID (`thvc-vmm --platform uuid=...`), which cloud-init, licensing and
//! inventory tools read. It never changes for the VM's lifetime, so it is fixed at
//! `CreateVm` (given by the client, or a random version 4 UUID) and written into the spec.
//!
//! Random bytes come from the kernel (getrandom(2) through libc, already a dependency),
//! so no UUID or RNG crate is needed for 16 bytes.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum UuidError {
    #[error("reading random bytes for a VM UUID: {0}")]
    Random(#[source] std::io::Error),
}

/// A random (version 4, RFC 9562 variant) UUID in lower-case 8-4-4-4-12 form.
pub fn generate() -> Result<String, UuidError> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the pointer and length describe the writable rest of `bytes`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(UuidError::Random(e));
        }
        filled += n as usize;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(format(&bytes))
}

fn format(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `s` in lower-case 8-4-4-4-12 form, or `None` unless it is a UUID in that form (any
/// case). The nil and the all-ones UUID are refused: SMBIOS reads them as "no UUID set".
pub fn normalize(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lengths != [8, 4, 4, 4, 12] {
        return None;
    }
    if !groups
        .iter()
        .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    let lower = s.to_ascii_lowercase();
    let digits: String = lower.chars().filter(|c| *c != '-').collect();
    if digits.bytes().all(|b| b == b'0') || digits.bytes().all(|b| b == b'f') {
        return None;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_uuids_are_v4_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(normalize(&a).as_deref(), Some(a.as_str()), "{a}");
        assert_eq!(&a[14..15], "4", "version 4: {a}");
        assert!("89ab".contains(&a[19..20]), "RFC variant: {a}");
    }

    #[test]
    fn normalizes_and_refuses() {
        assert_eq!(
            normalize("0F3C1B2A-9D4E-4F6A-8B7C-1D2E3F4A5B6C").as_deref(),
            Some("0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c")
        );
        for bad in [
            "",
            "0f3c1b2a9d4e4f6a8b7c1d2e3f4a5b6c",
            "{0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c}",
            "0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6",
            "0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6g",
            "0f3c1b2a-9d4e-4f6a-8b7c1-d2e3f4a5b6c",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "+f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c",
        ] {
            assert_eq!(normalize(bad), None, "{bad:?}");
        }
    }
}
