//! Client of the VMM's API socket: a Unix stream socket speaking line-delimited JSON.
//!
//! Request `{"request":"ping"|"info"|"pause"|"resume"|"shutdown"|"stop"}\n`, response
//! `{"ok":true,"result":...}\n` or `{"ok":false,"error":"..."}\n`. One connection per request
//! keeps the client stateless; the socket is local so the cost is small.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one request may take before the VMM is considered unresponsive.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum VmmApiError {
    #[error(
        "the VMM has no API socket at {0} (it is not running, or this VMM version does not serve the API)"
    )]
    NoSocket(String),
    #[error("talking to the VMM API at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM API at {0} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    #[error("the VMM API at {path} sent an invalid response: {detail}")]
    Protocol { path: String, detail: String },
    #[error("the VMM refused {request}: {message}")]
    Refused { request: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Ping,
    Info,
    Pause,
    Resume,
    Shutdown,
    Stop,
    /// Ends a migration in progress; the guest keeps running here.
    MigrateCancel,
}

impl Request {
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Info => "info",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Shutdown => "shutdown",
            Request::Stop => "stop",
            Request::MigrateCancel => "migrate-cancel",
        }
    }
}

#[derive(Deserialize)]
struct Response {
    ok: bool,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    error: Option<String>,
}

/// Sends one request and returns its `result`.
pub async fn call(socket: &Path, request: Request) -> Result<serde_json::Value, VmmApiError> {
    let path = socket.display().to_string();
    match tokio::time::timeout(REQUEST_TIMEOUT, call_inner(socket, &path, request)).await {
        Ok(r) => r,
        Err(_) => Err(VmmApiError::Timeout(path)),
    }
}

async fn call_inner(
    socket: &Path,
    path: &str,
    request: Request,
) -> Result<serde_json::Value, VmmApiError> {
    let io_err = |source| VmmApiError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            return Err(VmmApiError::NoSocket(path.to_owned()));
        }
        Err(e) => return Err(io_err(e)),
    };
    let (read, mut write) = stream.into_split();
    let line = format!("{{\"request\":\"{}\"}}\n", request.as_str());
    write.write_all(line.as_bytes()).await.map_err(io_err)?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    // Bound the response so a confused peer cannot make us buffer without limit.
    let n = (&mut reader)
        .take(1 << 20)
        .read_line(&mut answer)
        .await
        .map_err(io_err)?;
    if n == 0 {
        return Err(VmmApiError::Protocol {
            path: path.to_owned(),
            detail: "connection closed without a response".to_owned(),
        });
    }
    parse_answer(path, request.as_str(), &answer)
}

/// The `result` of a response line, or the VMM's refusal.
fn parse_answer(path: &str, request: &str, answer: &str) -> Result<serde_json::Value, VmmApiError> {
    let resp: Response =
        serde_json::from_str(answer.trim_end()).map_err(|e| VmmApiError::Protocol {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if resp.ok {
        Ok(resp.result)
    } else {
        Err(VmmApiError::Refused {
            request: request.to_owned(),
            message: resp.error.unwrap_or_else(|| "no reason given".to_owned()),
        })
    }
}

use tokio::io::AsyncReadExt as _;

/// Asks the VMM to live-migrate its guest over `stream` (a connected stream socket, passed
/// with the request: SCM_RIGHTS), with at most `downtime_ms` of pause. The VMM answers
/// when the migration ended: no timeout here (a large guest takes minutes; the VMM bounds
/// its rounds and its waits for the peer, and `migrate-cancel` ends it). Its result is
/// the VMM's report (bytes, rounds, downtime_ms, ...).
pub async fn migrate(
    socket: &Path,
    stream: std::os::fd::OwnedFd,
    downtime_ms: Option<u64>,
) -> Result<serde_json::Value, VmmApiError> {
    let path = socket.display().to_string();
    let socket = socket.to_path_buf();
    let mut request = serde_json::json!({ "request": "migrate" });
    if let Some(ms) = downtime_ms {
        request["downtime_ms"] = serde_json::json!(ms);
    }
    let line = format!("{request}\n");
    let io_err = {
        let path = path.clone();
        move |source| VmmApiError::Io {
            path: path.clone(),
            source,
        }
    };
    let answer = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::{BufRead as _, Read as _};
        use std::os::fd::AsRawFd as _;
        let conn = std::os::unix::net::UnixStream::connect(&socket)?;
        let fds = [stream.as_raw_fd()];
        let iov = [std::io::IoSlice::new(line.as_bytes())];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let sent = nix::sys::socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        if sent != line.len() {
            return Err(std::io::Error::other("the request was sent only in part"));
        }
        // The VMM has its own copy now; ours must not keep the stream open.
        drop(stream);
        let mut answer = String::new();
        std::io::BufReader::new(conn)
            .take(1 << 20)
            .read_line(&mut answer)?;
        Ok(answer)
    })
    .await
    .map_err(|e| io_err(std::io::Error::other(e.to_string())))?
    .map_err(io_err)?;
    if answer.is_empty() {
        return Err(VmmApiError::Protocol {
            path,
            detail: "the VMM closed the connection without an answer (did it exit?)".to_owned(),
        });
    }
    parse_answer(&path, "migrate", &answer)
}
