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
//!
//! A call that starts a job says `ok` when the job was created, which is not what happened:
//! so a job's end is a record too, under the same caller, action and object ([`Origin`]),
//! with `THVC_JOB` (the job's id, also on the call's record) and `THVC_RESULT` `done`,
//! `failed` or `canceled` as JobRemoved says, its message in `THVC_ERROR` (failed, canceled)
//! or `THVC_JOB_MESSAGE` (done). Each action an ApplyVms job carries out (a VM created,
//! updated, started, shut down, resumed or deleted) is one more record, `THVC_ACTION`
//! `ApplyVms.<action>` with that VM, as if the caller had made that call.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// Where journald listens for native-protocol records.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// How a call (or a job) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Denied,
    Failed,
    /// A job that succeeded.
    Done,
    /// A job that was canceled.
    Canceled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
            Outcome::Done => "done",
            Outcome::Canceled => "canceled",
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
    /// The job the call started, or whose end (or action) this is.
    pub job: Option<u32>,
    /// A done job's message (a pulled image's path, an update's version, an apply's report).
    pub message: Option<&'a str>,
}

/// Who started a job, with which call, on what: a job's end and its actions are recorded
/// under these.
#[derive(Debug, Clone)]
pub struct Origin {
    pub uid: u32,
    pub action: &'static str,
    pub object: String,
}

/// Longest message kept in a job's record (an apply's report lists every action, which
/// have records of their own): datagrams stay well below the socket's limit.
pub const MAX_MESSAGE: usize = 4096;

/// `text` cut to at most [`MAX_MESSAGE`] bytes at a character boundary, marked when cut.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE {
        return text.into();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
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
    let job = r.job.map(|id| format!(" job {id}")).unwrap_or_default();
    let message = match r.error {
        Some(e) => format!(
            "{} {} by uid {}:{job} {} ({e})",
            r.action,
            r.object,
            r.uid,
            r.outcome.as_str()
        ),
        None => format!(
            "{} {} by uid {}:{job} {}",
            r.action,
            r.object,
            r.uid,
            r.outcome.as_str()
        ),
    };
    let priority = match r.outcome {
        Outcome::Ok | Outcome::Done => "6",
        Outcome::Denied | Outcome::Failed | Outcome::Canceled => "5",
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
    if let Some(id) = r.job {
        field(&mut buf, "THVC_JOB", &id.to_string());
    }
    if let Some(m) = r.message {
        field(&mut buf, "THVC_JOB_MESSAGE", m);
    }
    buf
}

/// Records `r`: to the journal at `socket` if there is one, else (or if that fails) as a
/// stderr log line. This runs on the caller's thread, often one of the runtime's, so the
/// send never waits: a journald that stopped reading (its queue full) gets the record as a
/// stderr line instead of stalling every call of the agent.
pub fn record(socket: Option<&Path>, r: &Record<'_>) {
    if let Some(path) = socket {
        let sent = UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            s.send_to(&encode(r), path)
        });
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
        thvc_job = r.job,
        thvc_job_message = r.message.unwrap_or(""),
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
            job: Some(12),
            message: None,
        });
        let needle = b"THVC_JOB\n\x02\0\0\0\0\0\0\x0012\n";
        assert!(buf.windows(needle.len()).any(|w| w == needle));
        assert!(!buf.windows(16).any(|w| w == b"THVC_JOB_MESSAGE"));
        let needle = b"THVC_ERROR\n\x09\0\0\0\0\0\0\0two\nlines\n";
        assert!(buf.windows(needle.len()).any(|w| w == needle));
        let needle = b"THVC_CALLER_UID\n\x04\0\0\0\0\0\0\x001000\n";
        assert!(buf.windows(needle.len()).any(|w| w == needle));
    }

    /// A journal that stopped reading: once its socket's queue is full, records go to
    /// stderr and `record` returns at once instead of waiting for journald.
    #[test]
    fn a_journal_that_stops_reading_never_blocks_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let _journal = UnixDatagram::bind(&path).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let socket = path.clone();
        std::thread::spawn(move || {
            // More than any queue length (net.unix.max_dgram_qlen is 512 by default).
            for _ in 0..5000 {
                record(
                    Some(&socket),
                    &Record {
                        action: "Stop",
                        uid: 0,
                        object: "web1",
                        outcome: Outcome::Ok,
                        error: None,
                        job: None,
                        message: None,
                    },
                );
            }
            let _ = done.send(());
        });
        // A blocking send would wait here for ever: the journal never reads.
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("record() blocked on a journal that does not read");
    }

    #[test]
    fn long_messages_are_clipped_at_a_character() {
        assert_eq!(clip("short"), "short");
        let long = "ä".repeat(MAX_MESSAGE);
        let clipped = clip(&long);
        assert!(clipped.len() < MAX_MESSAGE + 32, "{}", clipped.len());
        assert!(clipped.ends_with(&format!("… ({} bytes)", long.len())));
    }
}
