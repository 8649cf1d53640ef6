//! The audit trail: every state-changing call (and every refusal) becomes one journal record
//! with structured fields, so `journalctl THVC_ACTION=Stop THVC_VM=web1` answers "who stopped
//! web1". Records go to journald over its native protocol (a datagram of `KEY=value` fields on
//! `/run/systemd/journal/socket`, or the socket given with `--journal-socket`); without a
//! journal, or if sending fails, the record is a log line on stderr instead, so nothing is lost
//! silently.
//!
//! Fields: `THVC_ACTION` (the D-Bus method, e.g. `Stop`), `THVC_CALLER_UID`, `THVC_VM` (the VM
//! or other object acted on; empty for node-wide calls), `THVC_RESULT` (`ok`, `denied` or
//! `failed`), `THVC_ERROR` (the error message, if any), plus `MESSAGE`, `PRIORITY` and
//! `SYSLOG_IDENTIFIER=thvc-nodeagent`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// Where journald listens for native-protocol records.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One audit record.
pub struct Record<'a> {
    pub action: &'a str,
    pub uid: u32,
    pub object: &'a str,
    pub outcome: Outcome,
    pub error: Option<&'a str>,
}

/// The journal socket to use: the configured one, else journald's if it exists.
pub fn default_socket() -> Option<PathBuf> {
    let p = Path::new(JOURNAL_SOCKET);
    p.exists().then(|| p.to_path_buf())
}

/// Appends one field in the native protocol's binary-safe form (`KEY\n`, 64-bit LE length,
/// value, `\n`), which allows newlines in values.
fn field(buf: &mut Vec<u8>, key: &str, value: &str) {
    buf.extend_from_slice(key.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// The datagram journald gets for `r`.
pub fn encode(r: &Record<'_>) -> Vec<u8> {
    let message = match r.error {
        Some(e) => format!(
            "{} {} by uid {}: {} ({e})",
            r.action,
            r.object,
            r.uid,
            r.outcome.as_str()
        ),
        None => format!(
            "{} {} by uid {}: {}",
            r.action,
            r.object,
            r.uid,
            r.outcome.as_str()
        ),
    };
    let priority = match r.outcome {
        Outcome::Ok => "6",
        Outcome::Denied | Outcome::Failed => "5",
    };
    let mut buf = Vec::with_capacity(256);
    field(&mut buf, "MESSAGE", &message);
    field(&mut buf, "PRIORITY", priority);
    field(&mut buf, "SYSLOG_IDENTIFIER", "thvc-nodeagent");
    field(&mut buf, "THVC_ACTION", r.action);
    field(&mut buf, "THVC_CALLER_UID", &r.uid.to_string());
    field(&mut buf, "THVC_VM", r.object);
    field(&mut buf, "THVC_RESULT", r.outcome.as_str());
    if let Some(e) = r.error {
        field(&mut buf, "THVC_ERROR", e);
    }
    buf
}

/// Records `r`: to the journal at `socket` if there is one, else (or if that fails) as a
/// stderr log line. A local datagram send does not block for long (journald's socket has a
/// large buffer), so this runs on the caller's thread.
pub fn record(socket: Option<&Path>, r: &Record<'_>) {
    if let Some(path) = socket {
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to(&encode(r), path));
        match sent {
            Ok(_) => return,
            Err(e) => tracing::warn!("audit record not sent to {}: {e}", path.display()),
        }
    }
    tracing::info!(
        target: "audit",
        thvc_action = r.action,
        thvc_caller_uid = r.uid,
        thvc_vm = r.object,
        thvc_result = r.outcome.as_str(),
        thvc_error = r.error.unwrap_or(""),
        "audit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed() {
        let buf = encode(&Record {
            action: "Stop",
            uid: 1000,
            object: "web1",
            outcome: Outcome::Failed,
            error: Some("two\nlines"),
        });
        let needle = b"THVC_ERROR\n\x09\0\0\0\0\0\0\0two\nlines\n";
        assert!(buf.windows(needle.len()).any(|w| w == needle));
        let needle = b"THVC_CALLER_UID\n\x04\0\0\0\0\0\0\x001000\n";
        assert!(buf.windows(needle.len()).any(|w| w == needle));
    }
}
