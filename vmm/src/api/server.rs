//! The control socket: binding it safely, and the thread that serves it.
//!
//! Why a dedicated thread rather than the main event loop: the socket is bound first thing and
//! must answer (`ping`, `info`, even `pause` before boot) while the main thread is still busy
//! loading a possibly large kernel and initrd; and every request acts on state that is already
//! thread-safe (the vCPU gate, the exit latch, the power button, atomic counters), so the
//! thread needs nothing from the main loop. It has its own seccomp filter.
//!
//! It never blocks on a client: all sockets are non-blocking in one epoll set; each connection
//! has a bounded input (one line of at most 64 KiB) and a bounded output buffer (a client that
//! does not read its answers is not read from either); at most [`MAX_CONNECTIONS`] clients are
//! served (fewer while the VMM is still starting, so that clients cannot use up the file
//! descriptors it needs), idle ones are evicted for new ones, the rest are told so and closed.
//! Running out of descriptors (RLIMIT_NOFILE) pauses accepting briefly instead of spinning.
//!
//! A request that takes long (`migrate`) is carried out on another thread and answered later
//! ([`Reply::Later`]): its connection waits for that answer (its next requests stay unread),
//! the others are served meanwhile, so `info` shows the migration's progress and
//! `migrate-cancel` reaches it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{
    error_line, ok_line, parse_request, Frame, LineFramer, ProtocolError, Request,
};
use crate::sandbox::{self, ThreadKind};

/// What the server asks of the VMM.
pub trait ApiHandler: Send + Sync {
    /// Carries out a request; `Err` is the message of an error response.
    fn handle(&self, request: Request) -> Result<serde_json::Value, String>;

    /// Carries out a request that came with open files (SCM_RIGHTS in the same message as
    /// its first bytes). Only requests that take files accept any. A request that takes long
    /// answers [`Reply::Later`].
    fn handle_with_files(&self, request: Request, files: Vec<File>) -> Reply {
        Reply::Now(if files.is_empty() {
            self.handle(request)
        } else {
            Err(format!("{} takes no files", request.as_str()))
        })
    }

    /// Runs after the response to a successful `request` was written to the socket (for
    /// `stop`, which must answer before the process ends).
    fn after_response(&self, _request: Request) {}

    /// How many clients may be connected now (at most [`MAX_CONNECTIONS`]).
    fn connection_limit(&self) -> usize {
        MAX_CONNECTIONS
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path}: another process is listening on it")]
    InUse { path: PathBuf },
    #[error("API socket {path}: exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("API socket {path}: cannot {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Spawn(io::Error),
}

/// What a request gets: its answer, or the promise of one from the thread doing the work.
pub enum Reply {
    Now(Result<serde_json::Value, String>),
    Later(Deferred),
}

impl From<Result<serde_json::Value, String>> for Reply {
    fn from(result: Result<serde_json::Value, String>) -> Self {
        Reply::Now(result)
    }
}

#[derive(Default)]
struct DeferredSlot {
    result: Option<Result<serde_json::Value, String>>,
    /// The connection that waits for it closed: nobody writes the answer.
    abandoned: bool,
    /// The server's wake-up, once it holds the request (the API thread's filter allows no
    /// new eventfd, so the server's one is shared).
    waker: Option<Arc<EventFd>>,
}

/// The server's end of an answer that comes later: the server is woken once the
/// [`Answerer`] has put the result in.
pub struct Deferred {
    slot: Arc<Mutex<DeferredSlot>>,
}

/// The worker's end: [`Answerer::answer`] exactly once (dropping it unanswered answers with
/// an error, so no connection waits forever).
pub struct Answerer {
    slot: Arc<Mutex<DeferredSlot>>,
    answered: bool,
}

/// A pair for one request answered later (no syscall: made on the API thread).
pub fn deferred() -> (Deferred, Answerer) {
    let slot = Arc::new(Mutex::new(DeferredSlot::default()));
    let answerer = Answerer {
        slot: slot.clone(),
        answered: false,
    };
    (Deferred { slot }, answerer)
}

fn lock_slot(slot: &Mutex<DeferredSlot>) -> std::sync::MutexGuard<'_, DeferredSlot> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Puts `result` in unless the connection is gone; false if it is.
fn fill_slot(slot: &Mutex<DeferredSlot>, result: Result<serde_json::Value, String>) -> bool {
    let mut slot = lock_slot(slot);
    if slot.abandoned {
        return false;
    }
    slot.result = Some(result);
    if let Some(waker) = &slot.waker {
        let _ = waker.write(1);
    }
    true
}

impl Answerer {
    /// Hands the result to the server; false when the client is gone (nobody will write it,
    /// and so no after_response hook runs for it).
    pub fn answer(mut self, result: Result<serde_json::Value, String>) -> bool {
        self.answered = true;
        fill_slot(&self.slot, result)
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        if !self.answered {
            fill_slot(
                &self.slot,
                Err("the request ended without an answer".into()),
            );
        }
    }
}

impl Deferred {
    /// From now on the answer wakes `waker` (and does at once if it is already there).
    fn attach(&self, waker: &Arc<EventFd>) {
        let mut slot = lock_slot(&self.slot);
        if slot.result.is_some() {
            let _ = waker.write(1);
        }
        slot.waker = Some(waker.clone());
    }

    /// Whether the answer is there.
    fn is_ready(&self) -> bool {
        lock_slot(&self.slot).result.is_some()
    }

    /// The result once it is there.
    fn take(&self) -> Option<Result<serde_json::Value, String>> {
        lock_slot(&self.slot).result.take()
    }

    /// The connection closes: from now on the answer has nowhere to go. Returns it if it
    /// came meanwhile.
    fn abandon(&self) -> Option<Result<serde_json::Value, String>> {
        let mut slot = lock_slot(&self.slot);
        slot.abandoned = true;
        slot.waker = None;
        slot.result.take()
    }
}

pub const MAX_CONNECTIONS: usize = 32;
/// A connection with no traffic for this long may be closed to make room for a new one.
pub const EVICT_IDLE_AFTER: Duration = Duration::from_secs(10);
/// Responses buffered for one client before we stop reading its requests.
const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// How long to stop accepting when out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const READ_CHUNK: usize = 16 * 1024;
/// The most files one message may carry; more are closed by the kernel (MSG_CTRUNC) and the
/// request that came with them is refused.
const MAX_FILES_PER_MESSAGE: usize = 4;

/// A bound API socket, not yet served.
pub struct ApiListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiListener {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes `path` if it is a socket nobody listens on (left by a VMM that died).
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    let io_err = |what| {
        move |source| ApiError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect the existing file")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(io_err("remove the stale socket"))
        }
        Err(e) => Err(io_err("probe the existing socket")(e)),
    }
}

/// Binds the API socket with mode 0600. Must be called while the process is single-threaded:
/// the mode comes from the umask during bind(), so the socket is never reachable by others,
/// not even briefly (chmod after bind would race, and fchmod does not apply to sockets).
pub fn bind(path: &Path, group_access: bool) -> Result<ApiListener, ApiError> {
    remove_stale_socket(path)?;
    // The mode comes from the umask at bind time (no window with a wider mode): 0600, or
    // 0660 with group access.
    let mask = if group_access { 0o117 } else { 0o177 };
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(mask) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ApiError::Io {
        path: path.to_path_buf(),
        what: "bind",
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ApiError::Io {
            path: path.to_path_buf(),
            what: "make it non-blocking",
            source,
        })?;
    Ok(ApiListener {
        listener,
        path: path.to_path_buf(),
    })
}

/// Starts the API thread; it installs `filter` before serving.
pub fn spawn(
    listener: ApiListener,
    handler: Arc<dyn ApiHandler>,
    filter: Option<BpfProgram>,
) -> Result<JoinHandle<()>, ApiError> {
    let epoll = Epoll::new().map_err(ApiError::Spawn)?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(ApiError::Spawn)?;
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(crate::THREAD_STACK_SIZE)
        .spawn(move || {
            if let Err(e) = sandbox::seccomp::apply(ThreadKind::Api, filter.as_ref()) {
                // Serving without a filter is not an option: leave the socket unserved.
                tracing::error!("{e}; the control API is disabled");
                return;
            }
            sandbox::test_forbidden_syscall(ThreadKind::Api);
            let mut server = Server::new(listener, handler, epoll, wake);
            if let Err(e) = server.run() {
                tracing::error!("control API stopped: {e}");
            }
        })
        .map_err(ApiError::Spawn)
}

struct Connection {
    stream: UnixStream,
    framer: LineFramer,
    output: Vec<u8>,
    /// Requests answered whose after_response hook runs once the answer was written.
    after: Vec<Request>,
    /// The peer finished sending (EOF) or sent something we cannot continue after.
    input_done: bool,
    last_activity: Instant,
    /// The events currently registered in epoll.
    registered: EventSet,
    /// Files received with the request line being read; the line takes them.
    files: Vec<File>,
    /// A message came with more files than allowed: its request is refused.
    files_truncated: bool,
    /// The request whose answer comes later, and whether the server's wake-up is attached.
    pending: Option<(Request, Deferred, bool)>,
}

const LISTENER_TOKEN: u64 = u64::MAX;
/// The wake-up of deferred answers.
const WAKE_TOKEN: u64 = u64::MAX - 1;

pub struct Server {
    listener: ApiListener,
    handler: Arc<dyn ApiHandler>,
    epoll: Epoll,
    connections: Vec<Option<Connection>>,
    /// Set while accepting is paused after EMFILE/ENFILE.
    accept_paused_until: Option<Instant>,
    /// Written when a deferred answer is ready (made before the thread's filter goes on).
    wake: Arc<EventFd>,
}

impl Server {
    pub fn new(
        listener: ApiListener,
        handler: Arc<dyn ApiHandler>,
        epoll: Epoll,
        wake: EventFd,
    ) -> Self {
        Server {
            listener,
            handler,
            epoll,
            connections: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            accept_paused_until: None,
            wake: Arc::new(wake),
        }
    }

    fn listener_fd(&self) -> RawFd {
        self.listener.listener.as_raw_fd()
    }

    pub fn run(&mut self) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            self.listener_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        self.epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        let mut events = vec![EpollEvent::default(); MAX_CONNECTIONS + 2];
        loop {
            let timeout = match self.accept_paused_until {
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
                }
                None => -1,
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(until) = self.accept_paused_until {
                if Instant::now() >= until {
                    self.accept_paused_until = None;
                    self.epoll.ctl(
                        ControlOperation::Add,
                        self.listener_fd(),
                        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
                    )?;
                }
            }
            for event in &events[..n] {
                match event.data() {
                    LISTENER_TOKEN => self.accept_all()?,
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        for slot in 0..self.connections.len() {
                            self.complete(slot);
                        }
                    }
                    token => {
                        let slot = token as usize;
                        // A connection waiting for a later answer reads nothing (its next
                        // requests wait), so only a hang-up tells that its client is gone;
                        // a client that only closed its sending side still gets the answer.
                        let gone = event
                            .event_set()
                            .intersects(EventSet::HANG_UP | EventSet::ERROR);
                        let waiting = self
                            .connections
                            .get(slot)
                            .and_then(Option::as_ref)
                            .is_some_and(|c| c.pending.is_some());
                        if gone && waiting {
                            self.close(slot);
                        } else {
                            self.service(slot);
                        }
                    }
                }
            }
        }
    }

    fn accept_all(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: accept4 on our listening socket; the returned fd is checked and owned.
            let fd = unsafe {
                libc::accept4(
                    self.listener_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    // Out of descriptors or memory (or anything unexpected): back off
                    // instead of spinning on a listener that stays readable.
                    _ => {
                        tracing::warn!(
                            "control API: cannot accept a connection ({err}); \
                             pausing for {ACCEPT_BACKOFF:?}"
                        );
                        self.evict_idle(Instant::now());
                        self.epoll.ctl(
                            ControlOperation::Delete,
                            self.listener_fd(),
                            EpollEvent::default(),
                        )?;
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                        return Ok(());
                    }
                }
            }
            // SAFETY: fd is a fresh socket we own.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            self.add_connection(stream);
        }
    }

    /// Closes connections idle for [`EVICT_IDLE_AFTER`]; returns how many.
    fn evict_idle(&mut self, now: Instant) -> usize {
        let mut evicted = 0;
        for slot in 0..self.connections.len() {
            let idle = self.connections[slot]
                .as_ref()
                // One waiting for a later answer (a migration) is not idle.
                .is_some_and(|c| {
                    c.pending.is_none() && now.duration_since(c.last_activity) >= EVICT_IDLE_AFTER
                });
            if idle {
                tracing::debug!("control API: closing idle connection {slot}");
                self.close(slot);
                evicted += 1;
            }
        }
        evicted
    }

    fn add_connection(&mut self, mut stream: UnixStream) {
        let limit = self.handler.connection_limit().min(MAX_CONNECTIONS);
        let connected = |conns: &[Option<Connection>]| conns.iter().flatten().count();
        if connected(&self.connections) >= limit {
            // Full: first finish off connections whose clients already left (their hang-up
            // may not have been seen yet), then the idle ones.
            for slot in 0..self.connections.len() {
                self.service(slot);
            }
            if connected(&self.connections) >= limit {
                self.evict_idle(Instant::now());
            }
        }
        let free = if connected(&self.connections) < limit {
            self.connections.iter().position(Option::is_none)
        } else {
            None
        };
        let Some(slot) = free else {
            tracing::warn!("control API: {limit} clients connected; refusing another");
            // A fresh socket's send buffer has room for one short line.
            let _ = stream.write(&error_line("too many connections; try again later"));
            return;
        };
        let registered = EventSet::IN;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(registered, slot as u64),
        ) {
            tracing::warn!("control API: cannot watch a new connection: {e}");
            return;
        }
        self.connections[slot] = Some(Connection {
            stream,
            framer: LineFramer::default(),
            output: Vec::new(),
            after: Vec::new(),
            input_done: false,
            last_activity: Instant::now(),
            registered,
            files: Vec::new(),
            files_truncated: false,
            pending: None,
        });
    }

    fn close(&mut self, slot: usize) {
        if let Some(conn) = self.connections.get_mut(slot).and_then(Option::take) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if let Some((request, deferred, _)) = conn.pending {
                // The client left before its answer: what follows a successful request
                // (a migrated VMM's end) must not depend on it being there.
                if let Some(Ok(_)) = deferred.abandon() {
                    self.handler.after_response(request);
                }
            }
        }
    }

    /// If connection `slot` waits for a deferred answer that is there: it goes out, and the
    /// connection's next requests are read again.
    fn complete(&mut self, slot: usize) {
        let Some(conn) = self.connections.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !conn.pending.as_ref().is_some_and(|(_, d, _)| d.is_ready()) {
            return;
        }
        if let Some((request, deferred, _)) = conn.pending.take() {
            if let Some(result) = deferred.take() {
                conn.push_answer(request, result);
            }
        }
        self.service(slot);
    }

    /// Reads, answers and writes as far as possible without blocking, then re-arms epoll or
    /// closes the connection.
    fn service(&mut self, slot: usize) {
        let handler = self.handler.clone();
        let Some(conn) = self.connections.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let keep = pump(conn, handler.as_ref());
        if !keep {
            self.close(slot);
            return;
        }
        if let Some((_, deferred, attached @ false)) = conn.pending.as_mut() {
            *attached = true;
            deferred.attach(&self.wake);
        }
        let wanted = conn.wanted_events();
        if wanted != conn.registered {
            let fd = conn.stream.as_raw_fd();
            conn.registered = wanted;
            if self
                .epoll
                .ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(wanted, slot as u64),
                )
                .is_err()
            {
                self.close(slot);
            }
        }
    }
}

impl Connection {
    fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if !self.input_done && self.pending.is_none() && self.output.len() < OUTPUT_HIGH_WATER {
            events |= EventSet::IN;
        }
        if !self.output.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Answers complete request lines while the output buffer has room.
    fn answer(&mut self, handler: &dyn ApiHandler) {
        while self.pending.is_none() && self.output.len() < OUTPUT_HIGH_WATER {
            let frame = match self.framer.next_frame() {
                Some(frame) => frame,
                None if self.input_done => match self.framer.finish() {
                    Some(frame) => frame,
                    None => return,
                },
                None => return,
            };
            match frame {
                Frame::Line(line) => {
                    // The files that came with this line go with it, whatever it is.
                    let files = std::mem::take(&mut self.files);
                    let truncated = std::mem::take(&mut self.files_truncated);
                    match parse_request(&line) {
                        Ok(_) if truncated => {
                            self.output.extend_from_slice(&error_line(&format!(
                                "more than {MAX_FILES_PER_MESSAGE} files sent with a request"
                            )));
                        }
                        Ok(request) => match handler.handle_with_files(request.clone(), files) {
                            Reply::Now(result) => self.push_answer(request, result),
                            Reply::Later(deferred) => {
                                self.pending = Some((request, deferred, false));
                            }
                        },
                        Err(e) => self.output.extend_from_slice(&error_line(&e.to_string())),
                    }
                }
                Frame::TooLong => {
                    self.output
                        .extend_from_slice(&error_line(&ProtocolError::TooLong.to_string()));
                    // No way to find the next request boundary: answer, then hang up.
                    self.input_done = true;
                    self.framer = LineFramer::default();
                    return;
                }
            }
        }
    }

    fn push_answer(&mut self, request: Request, result: Result<serde_json::Value, String>) {
        match result {
            Ok(result) => {
                self.output.extend_from_slice(&ok_line(result));
                self.after.push(request);
            }
            Err(message) => self.output.extend_from_slice(&error_line(&message)),
        }
    }

    /// Writes buffered output; false when the peer is gone.
    fn flush(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                    self.last_activity = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// One read, keeping the files that came with the data; false when the connection failed.
    fn read_some(&mut self) -> ReadOutcome {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            return match recv_with_files(&self.stream, &mut chunk) {
                Ok((0, _, _)) => ReadOutcome::Eof,
                Ok((n, files, truncated)) => {
                    if !files.is_empty() || truncated {
                        // Files belong to the line these bytes start; a line that already
                        // had some would get a second set: refuse rather than guess.
                        self.files_truncated |= truncated || !self.files.is_empty();
                        self.files = files;
                    }
                    self.framer.push(&chunk[..n]);
                    self.last_activity = Instant::now();
                    ReadOutcome::Data
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => ReadOutcome::Failed,
            };
        }
    }
}

/// The client's side of a request with files: sends `bytes` (the request line) and `files` in
/// one message (SCM_RIGHTS), as `snapshot` wants them.
pub fn send_with_files(
    stream: &UnixStream,
    bytes: &[u8],
    files: &[&dyn AsRawFd],
) -> io::Result<usize> {
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(fds.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one header and `payload` bytes of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: sendmsg reads the buffers described above.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// recvmsg(2) into `buf`: the bytes, the files that came with them (close-on-exec), and
/// whether the kernel dropped files that did not fit.
fn recv_with_files(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<File>, bool)> {
    // Room for the control message of MAX_FILES_PER_MESSAGE descriptors, u64-aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FILES_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) }
            as usize;
    msg.msg_controllen = space.min(std::mem::size_of_val(&control));
    // SAFETY: recvmsg writes at most iov_len bytes into buf and msg_controllen into control.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut files = Vec::new();
    // SAFETY: the CMSG macros walk the control buffer the kernel filled in, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    files.push(File::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok((n as usize, files, truncated))
}

enum ReadOutcome {
    Data,
    Eof,
    WouldBlock,
    Failed,
}

/// Reads, answers and writes as far as possible without blocking; false when the connection
/// is finished (peer gone, or all its requests answered after it stopped sending).
fn pump(conn: &mut Connection, handler: &dyn ApiHandler) -> bool {
    loop {
        // Answer line by line as data comes in, so the framer never holds more than one
        // (possibly too long) line.
        loop {
            conn.answer(handler);
            if conn.input_done || conn.pending.is_some() || conn.output.len() >= OUTPUT_HIGH_WATER {
                break;
            }
            match conn.read_some() {
                ReadOutcome::Data => {}
                ReadOutcome::Eof => conn.input_done = true,
                ReadOutcome::WouldBlock => break,
                ReadOutcome::Failed => return false,
            }
        }
        let stopped_for_room = conn.output.len() >= OUTPUT_HIGH_WATER;
        if !conn.flush() {
            return false;
        }
        // After the answer went out, or at least was offered to a client that is not reading:
        // `stop` must not wait for a client.
        for request in conn.after.drain(..) {
            handler.after_response(request);
        }
        // Output drained after we had stopped for lack of room: more lines may be waiting.
        if !(stopped_for_room && conn.output.len() < OUTPUT_HIGH_WATER) {
            break;
        }
    }
    !(conn.input_done
        && conn.pending.is_none()
        && conn.output.is_empty()
        && conn.framer.pending() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::io::{BufRead, BufReader};
    use std::net::Shutdown;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    use crate::api::protocol::MAX_REQUEST_LEN;

    /// Answers ping and info, refuses the rest; answers migrate later (its answerer kept for
    /// the test); records after_response calls.
    #[derive(Default)]
    struct Mock {
        after: Mutex<Vec<Request>>,
        later: Mutex<Vec<Answerer>>,
    }

    impl ApiHandler for Mock {
        fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
            match request {
                Request::Ping => Ok("pong".into()),
                Request::Info => Ok(serde_json::json!({"state": "running"})),
                Request::Stop => Ok(serde_json::json!({"state": "stopping"})),
                other => Err(format!("{} refused", other.as_str())),
            }
        }

        fn handle_with_files(&self, request: Request, files: Vec<File>) -> Reply {
            match request {
                Request::Migrate(_) => {
                    let (deferred, answerer) = deferred();
                    self.later.lock().expect("lock").push(answerer);
                    Reply::Later(deferred)
                }
                other if files.is_empty() => Reply::Now(self.handle(other)),
                other => Reply::Now(Err(format!("{} takes no files", other.as_str()))),
            }
        }

        fn after_response(&self, request: Request) {
            self.after.lock().expect("lock").push(request);
        }
    }

    impl Mock {
        /// The answerer of the request answered later, once the server has it.
        fn take_answerer(&self) -> Answerer {
            for _ in 0..500 {
                if let Some(a) = self.later.lock().expect("lock").pop() {
                    return a;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("the server did not pass the request on within 5 s");
        }

        fn after(&self) -> Vec<Request> {
            self.after.lock().expect("lock").clone()
        }

        /// The after hooks once `n` ran (they run after the answer is written, so a client
        /// may read it first).
        fn after_n(&self, n: usize) -> Vec<Request> {
            for _ in 0..500 {
                let after = self.after();
                if after.len() >= n {
                    return after;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            self.after()
        }
    }

    fn temp_dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("thvc-api-{name}-"))
            .tempdir()
            .expect("temp dir")
    }

    /// Serves `Mock` on a fresh socket; returns the directory guard (the socket goes with it),
    /// the socket's path and the handler.
    fn serve(name: &str) -> (tempfile::TempDir, PathBuf, Arc<Mock>) {
        let dir = temp_dir(name);
        let path = dir.path().join("api.sock");
        let listener = bind(&path, false).expect("bind");
        let mock = Arc::new(Mock::default());
        let handler: Arc<dyn ApiHandler> = mock.clone();
        let epoll = Epoll::new().expect("epoll");
        let wake = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        std::thread::spawn(move || Server::new(listener, handler, epoll, wake).run());
        (dir, path, mock)
    }

    struct Client {
        stream: UnixStream,
        reader: BufReader<UnixStream>,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let stream = UnixStream::connect(path).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let reader = BufReader::new(stream.try_clone().expect("clone"));
            Client { stream, reader }
        }

        fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).expect("send");
        }

        fn response(&mut self) -> serde_json::Value {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("response");
            assert!(n > 0 && line.ends_with('\n'), "a whole line, got {line:?}");
            serde_json::from_str(&line).expect("response is JSON")
        }

        fn error(&mut self) -> String {
            let v = self.response();
            assert_eq!(v["ok"], false, "{v}");
            v["error"].as_str().expect("error string").to_string()
        }

        /// EOF, or a reset when the server closed with our unread bytes still queued.
        fn assert_closed(&mut self) {
            let mut rest = Vec::new();
            match self.reader.read_to_end(&mut rest) {
                Ok(_) => assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest)),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            }
        }
    }

    #[test]
    fn a_later_answer_holds_its_connection_only() {
        let (_dir, path, mock) = serve("later");
        let mut waiting = Client::connect(&path);
        // The ping after migrate is read only once migrate has its answer.
        waiting.send(b"{\"request\":\"migrate\"}\n{\"request\":\"ping\"}\n");
        let answerer = mock.take_answerer();
        let mut other = Client::connect(&path);
        other.send(b"{\"request\":\"info\"}\n");
        assert_eq!(other.response()["result"]["state"], "running");
        assert_eq!(
            mock.after_n(1),
            [Request::Info],
            "nothing on the waiting one"
        );
        assert!(answerer.answer(Ok(serde_json::json!({"downtime_ms": 5}))));
        let v = waiting.response();
        assert_eq!(v["result"]["downtime_ms"], 5, "{v}");
        assert_eq!(
            waiting.response()["result"],
            "pong",
            "then the next request"
        );
        let migrate = Request::Migrate(Default::default());
        assert_eq!(mock.after_n(3), [Request::Info, migrate, Request::Ping]);

        // A client that half-closes keeps its answer coming; an error has no after hook.
        let mut closing = Client::connect(&path);
        closing.send(b"{\"request\":\"migrate\"}\n");
        closing
            .stream
            .shutdown(Shutdown::Write)
            .expect("half close");
        let answerer = mock.take_answerer();
        drop(answerer);
        assert!(closing.error().contains("without an answer"));
        closing.assert_closed();
        assert_eq!(
            mock.after().len(),
            3,
            "no hook for an error: {:?}",
            mock.after()
        );

        // A client gone before the answer: the worker learns nobody will write it.
        let mut gone = Client::connect(&path);
        gone.send(b"{\"request\":\"migrate\"}\n");
        let answerer = mock.take_answerer();
        drop(gone);
        let mut probe = Client::connect(&path);
        // Once the server saw the hang-up (it serves connections in order of events), the
        // answer has nowhere to go.
        let mut abandoned = false;
        let mut answerer = Some(answerer);
        for _ in 0..500 {
            probe.send(b"{\"request\":\"ping\"}\n");
            assert_eq!(probe.response()["result"], "pong");
            let a = answerer.take().expect("answerer");
            if lock_slot(&a.slot).abandoned {
                abandoned = !a.answer(Ok(serde_json::json!({})));
                break;
            }
            answerer = Some(a);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(abandoned, "the answer to a closed connection is refused");
    }

    #[test]
    fn socket_is_private_and_stale_sockets_are_replaced() {
        let tmp = temp_dir("bind");
        let dir = tmp.path();
        let path = dir.join("api.sock");
        let listener = bind(&path, false).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

        let err = bind(&path, false).err().expect("in use");
        assert!(matches!(err, ApiError::InUse { .. }), "{err}");
        drop(listener); // leaves the socket file behind, like a crashed VMM
        assert!(path.exists());
        let _again = bind(&path, false).expect("stale socket replaced");

        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"precious").expect("write");
        let err = bind(&file, false).err().expect("not a socket");
        assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).expect("kept"), b"precious");

        let err = bind(&dir.join("missing-dir").join("api.sock"), false)
            .err()
            .expect("no dir");
        assert!(err.to_string().contains("cannot bind"), "{err}");

        // Group access: 0660, and the process's umask is left as it was.
        // SAFETY: reading the umask means setting it; it is put back at once.
        let before = unsafe { libc::umask(0o022) };
        unsafe { libc::umask(before) };
        let shared = dir.join("shared.sock");
        let _shared = bind(&shared, true).expect("bind with group access");
        let mode = std::fs::metadata(&shared)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660, "mode {mode:o}");
        let after = unsafe { libc::umask(before) };
        assert_eq!(after, before, "umask restored");
    }

    #[test]
    fn several_requests_per_connection_answered_in_order() {
        let (_dir, path, mock) = serve("order");
        let mut c = Client::connect(&path);
        c.send(b"{\"request\":\"ping\"}\n{\"request\":\"info\"}\r\n{\"request\":\"pause\"}\n");
        c.send(b"{\"request\":\"nope\"}\n{\"request\":\"stop\"}\n");
        assert_eq!(
            c.response(),
            serde_json::json!({"ok": true, "result": "pong"})
        );
        assert_eq!(c.response()["result"]["state"], "running");
        assert_eq!(c.error(), "pause refused");
        assert!(c.error().contains("unknown request \"nope\""));
        assert_eq!(c.response()["result"]["state"], "stopping");
        // One more round trip: the server handles a connection's requests in order, so the
        // hook of `stop` has run by the time this is answered.
        c.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(c.response()["result"], "pong");
        // Only successful requests get the after-response hook.
        let after = mock.after.lock().expect("lock").clone();
        assert_eq!(after[..3], [Request::Ping, Request::Info, Request::Stop]);
    }

    #[test]
    fn garbage_gets_errors_and_the_connection_stays_usable() {
        let (_dir, path, _) = serve("garbage");
        let mut c = Client::connect(&path);
        c.send(b"\xff\xfe\x00garbage\n");
        assert!(c.error().contains("not valid UTF-8"));
        c.send(b"\n");
        assert_eq!(c.error(), "empty request");
        c.send(b"{\"request\":\"ping\",\"extra\":1}\n");
        assert!(c.error().contains("unknown field \"extra\""));
        c.send(b"[1,2,3]\n");
        assert!(c.error().contains("not a JSON object"));
        c.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(c.response()["result"], "pong");
    }

    #[test]
    fn files_go_with_their_own_request_only_and_too_many_are_refused() {
        let (_dir, path, _) = serve("files");
        let mut c = Client::connect(&path);
        let file = File::open("/dev/null").expect("a file");
        send_with_files(&c.stream, b"{\"request\":\"ping\"}\n", &[&file, &file]).expect("send");
        assert_eq!(c.error(), "ping takes no files");
        // The files were the first request's: the next one comes without any.
        c.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(c.response()["result"], "pong");
        let many: Vec<&dyn AsRawFd> = (0..6).map(|_| &file as &dyn AsRawFd).collect();
        send_with_files(&c.stream, b"{\"request\":\"ping\"}\n", &many).expect("send");
        assert_eq!(c.error(), "more than 4 files sent with a request");
        c.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(c.response()["result"], "pong");
    }

    #[test]
    fn huge_line_is_answered_then_the_connection_closed() {
        let (_dir, path, _) = serve("huge");
        let mut c = Client::connect(&path);
        let writer = {
            let mut stream = c.stream.try_clone().expect("clone");
            // Sent from another thread: the server stops reading once it gave up on the line.
            std::thread::spawn(move || {
                let _ = stream.write_all(&vec![b'x'; 4 * MAX_REQUEST_LEN]);
            })
        };
        assert!(c.error().contains("longer than 65536 bytes"));
        c.assert_closed();
        writer.join().expect("writer");
        // Other clients are unaffected.
        let mut other = Client::connect(&path);
        other.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(other.response()["result"], "pong");
    }

    #[test]
    fn half_closed_connection_gets_its_answers_then_eof() {
        let (_dir, path, _) = serve("half");
        let mut c = Client::connect(&path);
        // No trailing newline: the end of input ends the last request.
        c.send(b"{\"request\":\"ping\"}\n{\"request\":\"info\"}");
        c.stream.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(c.response()["result"], "pong");
        assert_eq!(c.response()["result"]["state"], "running");
        c.assert_closed();
        // A client that connects and hangs up at once costs nothing.
        drop(UnixStream::connect(&path).expect("connect"));
        let mut c = Client::connect(&path);
        c.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(c.response()["result"], "pong");
    }

    #[test]
    fn too_many_connections_are_refused_and_then_served_again() {
        let (_dir, path, _) = serve("many");
        let mut held: Vec<Client> = (0..MAX_CONNECTIONS)
            .map(|_| Client::connect(&path))
            .collect();
        // All slots in use by fresh (not idle) clients: the next one is told and closed.
        let mut extra = Client::connect(&path);
        assert!(extra.error().contains("too many connections"));
        extra.assert_closed();
        for c in &mut held {
            c.send(b"{\"request\":\"ping\"}\n");
            assert_eq!(c.response()["result"], "pong");
        }
        held.truncate(MAX_CONNECTIONS - 1);
        // The server notices the hang-up when it next looks at that socket; retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = Client::connect(&path);
            c.send(b"{\"request\":\"ping\"}\n");
            let v = c.response();
            if v["ok"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "slot never freed: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_client_that_never_reads_does_not_block_others() {
        let (_dir, path, _) = serve("noread");
        let greedy = UnixStream::connect(&path).expect("connect");
        greedy.set_nonblocking(true).expect("nonblocking");
        let request = b"{\"request\":\"info\"}\n".repeat(1024);
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        // Keep sending until the server stops reading from us (our send buffer stays full).
        let mut stalls = 0;
        while stalls < 50 && Instant::now() < deadline {
            match (&greedy).write(&request) {
                Ok(n) => {
                    sent += n;
                    stalls = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stalls += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("send failed: {e}"),
            }
        }
        assert!(stalls >= 50, "the server kept reading without bound");
        assert!(sent > OUTPUT_HIGH_WATER, "sent only {sent} bytes");
        let mut c = Client::connect(&path);
        c.send(b"{\"request\":\"ping\"}\n");
        assert_eq!(c.response()["result"], "pong");
    }
}
