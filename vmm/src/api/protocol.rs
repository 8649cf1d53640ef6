//! The wire format of the control API: line-delimited JSON.
//!
//! Request: `{"request":"ping"|"info"|"pause"|"resume"|"shutdown"|"stop"|"snapshot"}\n`
//! (`snapshot` carries two open files in the same message, SCM_RIGHTS: see `api::vm`),
//! `{"request":"migrate","downtime_ms":300,"max_rounds":30}` (both optional; with the
//! connected stream to the target, SCM_RIGHTS; answered when the migration ended, its
//! progress in other connections' `info`), `{"request":"migrate-cancel"}`, or
//! `{"request":"update-device","device":"virtio-blk0","bandwidth":"50M","ops":null}\n` (rate
//! limit keys bandwidth, bandwidth-burst, ops, ops-burst; absent: unchanged; null or "0":
//! removed; for a NIC each also with rx_ or tx_ before it, for one direction). Response:
//! `{"ok":true,"result":...}\n` or `{"ok":false,"error":"..."}\n`. Lines are at most
//! [`MAX_REQUEST_LEN`] bytes; a trailing `\r` is ignored.

use serde_json::{json, Value};

use crate::persist::migration::MigrateOptions;

/// The longest request line accepted, without its newline.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Info,
    Pause,
    Resume,
    Shutdown,
    Stop,
    /// Write the paused VM into the two files sent with the request.
    Snapshot,
    /// Move the VM to the target at the other end of the stream sent with the request.
    Migrate(MigrateOptions),
    /// Stop a running migration before the switch; the VM runs on here.
    MigrateCancel,
    /// Boxed: the other requests carry nothing.
    UpdateDevice(Box<DeviceUpdate>),
}

/// One rate limit setting of `update-device`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Change {
    #[default]
    Keep,
    Remove,
    /// As given: a number, or a string with an optional K/M/G suffix (checked by the VM).
    Set(String),
}

/// The four settings of one rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LimitChanges {
    pub bandwidth: Change,
    pub bandwidth_burst: Change,
    pub ops: Change,
    pub ops_burst: Change,
}

impl LimitChanges {
    pub fn is_empty(&self) -> bool {
        *self == LimitChanges::default()
    }
}

/// `update-device`: a device's new rate limit settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceUpdate {
    pub device: String,
    /// The plain keys: the device's limit, both directions of a NIC.
    pub all: LimitChanges,
    /// A NIC's `rx_*` and `tx_*` keys, which win over the plain ones for their direction.
    pub rx: LimitChanges,
    pub tx: LimitChanges,
}

fn parse_update(mut fields: serde_json::Map<String, Value>) -> Result<DeviceUpdate, ProtocolError> {
    let device = match fields.remove("device") {
        Some(Value::String(d)) => d,
        Some(_) => return Err(ProtocolError::Json("\"device\" is not a string".into())),
        None => return Err(ProtocolError::Json("missing field \"device\"".into())),
    };
    let mut change = |key: &str| match fields.remove(key) {
        None => Ok(Change::Keep),
        Some(Value::Null) => Ok(Change::Remove),
        Some(Value::String(s)) => Ok(Change::Set(s)),
        Some(Value::Number(n)) => Ok(Change::Set(n.to_string())),
        Some(_) => Err(ProtocolError::Json(format!(
            "\"{key}\" is not a string, number or null"
        ))),
    };
    let mut limit = |prefix: &str| -> Result<LimitChanges, ProtocolError> {
        Ok(LimitChanges {
            bandwidth: change(&format!("{prefix}bandwidth"))?,
            bandwidth_burst: change(&format!("{prefix}bandwidth-burst"))?,
            ops: change(&format!("{prefix}ops"))?,
            ops_burst: change(&format!("{prefix}ops-burst"))?,
        })
    };
    let update = DeviceUpdate {
        device,
        all: limit("")?,
        rx: limit("rx_")?,
        tx: limit("tx_")?,
    };
    if let Some(unknown) = fields.keys().next() {
        let unknown: String = unknown.chars().take(MAX_ECHO).collect();
        return Err(ProtocolError::Json(format!(
            "unknown field \"{unknown}\" (device, bandwidth, bandwidth-burst, ops, ops-burst, \
             and for a NIC each of these four with rx_ or tx_ before it)"
        )));
    }
    Ok(update)
}

/// `migrate`'s optional settings: `downtime_ms` (10-60000), `max_rounds` (1-1000).
fn parse_migrate(
    mut fields: serde_json::Map<String, Value>,
) -> Result<MigrateOptions, ProtocolError> {
    let mut options = MigrateOptions::default();
    let mut number = |key: &str, range: std::ops::RangeInclusive<u64>| match fields.remove(key) {
        None => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| range.contains(&v)) => Ok(n.as_u64()),
        Some(_) => Err(ProtocolError::Json(format!(
            "\"{key}\" must be a number from {} to {}",
            range.start(),
            range.end()
        ))),
    };
    if let Some(ms) = number("downtime_ms", 10..=60_000)? {
        options.downtime = std::time::Duration::from_millis(ms);
    }
    if let Some(rounds) = number("max_rounds", 1..=1000)? {
        options.max_rounds = rounds as u32;
    }
    if let Some(unknown) = fields.keys().next() {
        let unknown: String = unknown.chars().take(MAX_ECHO).collect();
        return Err(ProtocolError::Json(format!(
            "unknown field \"{unknown}\" (downtime_ms, max_rounds)"
        )));
    }
    Ok(options)
}

impl Request {
    /// The requests without arguments.
    pub const ALL: [Request; 8] = [
        Request::Ping,
        Request::Info,
        Request::Pause,
        Request::Resume,
        Request::Shutdown,
        Request::Stop,
        Request::Snapshot,
        Request::MigrateCancel,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Info => "info",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Shutdown => "shutdown",
            Request::Stop => "stop",
            Request::Snapshot => "snapshot",
            Request::Migrate(_) => "migrate",
            Request::MigrateCancel => "migrate-cancel",
            Request::UpdateDevice(_) => "update-device",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty request")]
    Empty,
    #[error("request is not valid UTF-8")]
    NotUtf8,
    #[error("invalid request: {0}; expected {{\"request\":\"<name>\"}}")]
    Json(String),
    #[error("unknown request \"{0}\"; expected one of ping, info, pause, resume, shutdown, stop, snapshot, migrate, migrate-cancel, update-device")]
    Unknown(String),
    #[error("request longer than {MAX_REQUEST_LEN} bytes")]
    TooLong,
}

/// Longest part of an unknown request name echoed back in the error.
const MAX_ECHO: usize = 64;

/// Parses one request line (without its `\n`).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_REQUEST_LEN {
        return Err(ProtocolError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    if text.trim().is_empty() {
        return Err(ProtocolError::Empty);
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::Json(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(ProtocolError::Json("not a JSON object".into()));
    };
    let name = match fields.remove("request") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(ProtocolError::Json("\"request\" is not a string".into())),
        None => return Err(ProtocolError::Json("missing field \"request\"".into())),
    };
    if name == "update-device" {
        return parse_update(fields).map(|u| Request::UpdateDevice(Box::new(u)));
    }
    if name == "migrate" {
        return parse_migrate(fields).map(Request::Migrate);
    }
    if let Some(unknown) = fields.keys().next() {
        let unknown: String = unknown.chars().take(MAX_ECHO).collect();
        return Err(ProtocolError::Json(format!("unknown field \"{unknown}\"")));
    }
    Request::ALL
        .into_iter()
        .find(|r| r.as_str() == name)
        .ok_or_else(|| {
            let mut name = name;
            if name.len() > MAX_ECHO {
                let mut cut = MAX_ECHO;
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                name.truncate(cut);
                name.push_str("...");
            }
            ProtocolError::Unknown(name)
        })
}

/// `{"ok":true,"result":...}\n`
pub fn ok_line(result: Value) -> Vec<u8> {
    line(json!({"ok": true, "result": result}))
}

/// `{"ok":false,"error":"..."}\n`
pub fn error_line(message: &str) -> Vec<u8> {
    line(json!({"ok": false, "error": message}))
}

fn line(value: Value) -> Vec<u8> {
    // Serialising a Value built from strings and numbers cannot fail.
    let mut out = serde_json::to_vec(&value).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    out
}

/// Splits a byte stream into request lines of at most [`MAX_REQUEST_LEN`] bytes.
#[derive(Default)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// How far `buf` is known to contain no newline.
    scanned: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Line(Vec<u8>),
    /// More than [`MAX_REQUEST_LEN`] bytes without a newline: the stream cannot be resynced.
    TooLong,
}

impl LineFramer {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held, waiting for a newline.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete line, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let end = self.scanned + pos;
                if end > MAX_REQUEST_LEN + 1 {
                    return Some(Frame::TooLong);
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                Some(Frame::Line(line))
            }
            None => {
                self.scanned = self.buf.len();
                // +1: room for a '\r' before the newline.
                (self.buf.len() > MAX_REQUEST_LEN + 1).then_some(Frame::TooLong)
            }
        }
    }

    /// At end of input: what is left, as a last line without newline.
    pub fn finish(&mut self) -> Option<Frame> {
        if self.buf.is_empty() {
            return None;
        }
        if self.buf.len() > MAX_REQUEST_LEN + 1 {
            return Some(Frame::TooLong);
        }
        self.scanned = 0;
        Some(Frame::Line(std::mem::take(&mut self.buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_parses() {
        for r in Request::ALL {
            let line = format!("{{\"request\":\"{}\"}}", r.as_str());
            assert_eq!(parse_request(line.as_bytes()), Ok(r));
        }
        assert_eq!(
            parse_request(b" { \"request\" : \"info\" } \r"),
            Ok(Request::Info),
            "whitespace and CRLF"
        );
    }

    #[test]
    fn update_device_parses_and_rejects_bad_fields() {
        let r = parse_request(
            br#"{"request":"update-device","device":"virtio-blk0","bandwidth":"50M","ops":null,"ops-burst":7}"#,
        );
        assert_eq!(
            r,
            Ok(Request::UpdateDevice(Box::new(DeviceUpdate {
                device: "virtio-blk0".into(),
                all: LimitChanges {
                    bandwidth: Change::Set("50M".into()),
                    bandwidth_burst: Change::Keep,
                    ops: Change::Remove,
                    ops_burst: Change::Set("7".into()),
                },
                ..Default::default()
            })))
        );
        let r = parse_request(
            br#"{"request":"update-device","device":"virtio-net0","rx_bandwidth":"5M","tx_ops-burst":3,"tx_ops":null,"ops":9}"#,
        );
        assert_eq!(
            r,
            Ok(Request::UpdateDevice(Box::new(DeviceUpdate {
                device: "virtio-net0".into(),
                all: LimitChanges {
                    ops: Change::Set("9".into()),
                    ..Default::default()
                },
                rx: LimitChanges {
                    bandwidth: Change::Set("5M".into()),
                    ..Default::default()
                },
                tx: LimitChanges {
                    ops: Change::Remove,
                    ops_burst: Change::Set("3".into()),
                    ..Default::default()
                },
            })))
        );
        for bad in [
            &br#"{"request":"update-device"}"#[..],
            br#"{"request":"update-device","device":1}"#,
            br#"{"request":"update-device","device":"d","bandwidth":true}"#,
            br#"{"request":"update-device","device":"d","speed":"1M"}"#,
            br#"{"request":"update-device","device":"d","rx_speed":"1M"}"#,
            br#"{"request":"update-device","device":"d","up_bandwidth":"1M"}"#,
            br#"{"request":"update-device","device":"d","rx_bandwidth":[1]}"#,
        ] {
            assert!(
                matches!(parse_request(bad), Err(ProtocolError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn bad_requests_get_specific_errors() {
        assert_eq!(parse_request(b""), Err(ProtocolError::Empty));
        assert_eq!(parse_request(b"  \r"), Err(ProtocolError::Empty));
        assert_eq!(
            parse_request(b"{\"request\":\"\xff\xfe\"}"),
            Err(ProtocolError::NotUtf8)
        );
        for garbage in [
            &b"ping"[..],
            b"\x00\x01\x02",
            b"{\"request\":\"ping\"",
            b"{\"request\":1}",
            b"{\"request\":null}",
            b"[\"ping\"]",
            b"{}",
            b"{\"request\":\"ping\",\"force\":true}",
            b"{\"request\":\"ping\"} trailing",
        ] {
            let err = parse_request(garbage).expect_err("rejected");
            assert!(
                matches!(err, ProtocolError::Json(_)),
                "{:?}: {err:?}",
                String::from_utf8_lossy(garbage)
            );
        }
        assert_eq!(
            parse_request(b"{\"request\":\"reboot\"}"),
            Err(ProtocolError::Unknown("reboot".into()))
        );
        assert_eq!(
            parse_request(b"{\"request\":\"PING\"}"),
            Err(ProtocolError::Unknown("PING".into())),
            "names are case-sensitive"
        );
        let long_name = format!("{{\"request\":\"{}\"}}", "é".repeat(100));
        let err = parse_request(long_name.as_bytes()).expect_err("unknown");
        assert!(err.to_string().len() < 200, "echo is cut: {err}");
        let huge = vec![b' '; MAX_REQUEST_LEN + 1];
        assert_eq!(parse_request(&huge), Err(ProtocolError::TooLong));
    }

    #[test]
    fn responses_are_single_json_lines() {
        let ok = ok_line(json!({"state": "paused"}));
        assert_eq!(ok, b"{\"ok\":true,\"result\":{\"state\":\"paused\"}}\n");
        let err = error_line("bad \"thing\"\nhere");
        assert_eq!(err.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&err).expect("json");
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "bad \"thing\"\nhere");
    }

    #[test]
    fn framer_splits_lines_across_pushes() {
        let mut f = LineFramer::default();
        f.push(b"{\"request\":\"pi");
        assert_eq!(f.next_frame(), None);
        f.push(b"ng\"}\n{\"request\":\"info\"}\nxy");
        assert_eq!(
            f.next_frame(),
            Some(Frame::Line(b"{\"request\":\"ping\"}".to_vec()))
        );
        assert_eq!(
            f.next_frame(),
            Some(Frame::Line(b"{\"request\":\"info\"}".to_vec()))
        );
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.pending(), 2);
        assert_eq!(f.finish(), Some(Frame::Line(b"xy".to_vec())));
        assert_eq!(f.finish(), None);
    }

    #[test]
    fn framer_caps_line_length() {
        let mut f = LineFramer::default();
        f.push(&vec![b'a'; MAX_REQUEST_LEN]);
        f.push(b"\r\n");
        assert!(matches!(f.next_frame(), Some(Frame::Line(l)) if l.len() == MAX_REQUEST_LEN + 1));
        f.push(&vec![b'a'; MAX_REQUEST_LEN + 2]);
        assert_eq!(f.next_frame(), Some(Frame::TooLong));
        let mut f = LineFramer::default();
        f.push(&vec![b'a'; MAX_REQUEST_LEN + 10]);
        f.push(b"\n");
        assert_eq!(
            f.next_frame(),
            Some(Frame::TooLong),
            "even once the newline came"
        );
        let mut f = LineFramer::default();
        f.push(&vec![b'a'; MAX_REQUEST_LEN + 2]);
        assert_eq!(f.finish(), Some(Frame::TooLong));
    }
}
