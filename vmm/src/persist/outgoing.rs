//! The migration thread: an outgoing migration runs here, not on the API thread, so the API
//! goes on answering while memory streams out (`info` shows the progress, `migrate-cancel`
//! stops it before the switch, `stop` still ends the VMM). Started with the VM, as the device
//! workers are, with its own seccomp filter: the dirty log, the memory slots' logging flag,
//! the VM's interrupt controllers and clocks, and the stream's timeouts are allowed here and
//! nowhere else.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;
use serde_json::{json, Value};

use super::migration::{MigrateOptions, MigrationError, MigrationReport};
use super::Persist;
use crate::sandbox::{self, ThreadKind};
use crate::vstate::control::VcpuControl;

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Machine description sent, waiting for the target's READY.
    Connecting,
    /// Memory rounds while the guest runs.
    Precopy,
    /// Guest paused: the last pages and the device state.
    StopAndCopy,
    /// The state is out; waiting for the target's RESUMED. Too late to cancel.
    Switching,
    Completed,
    Failed,
    Canceled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Precopy => "precopy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Switching => "switching",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Canceled => "canceled",
        }
    }

    fn running(self) -> bool {
        matches!(
            self,
            Phase::Connecting | Phase::Precopy | Phase::StopAndCopy | Phase::Switching
        )
    }
}

#[derive(Debug)]
struct Progress {
    phase: Phase,
    started: Instant,
    ended: Option<Duration>,
    rounds: u32,
    bytes: u64,
    /// What the last look at the dirty log found still to send.
    dirty_bytes: u64,
    /// Bytes per second the link took so far.
    rate: u64,
    error: Option<String>,
    /// The stream while the migration thread uses it: a cancel shuts it down, so a write
    /// blocked on a target that stopped reading returns at once.
    stream: Option<RawFd>,
}

/// A migration's progress and its cancel flag, shared by the migration thread (which
/// updates them) and the API (which reads and cancels).
#[derive(Debug, Default)]
pub struct MigrationControl {
    progress: Mutex<Option<Progress>>,
    cancel: AtomicBool,
}

impl MigrationControl {
    fn progress(&self) -> std::sync::MutexGuard<'_, Option<Progress>> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Some(p) = self.progress().as_mut() {
            f(p);
        }
    }

    /// Whether a migration runs now.
    pub fn is_running(&self) -> bool {
        self.progress().as_ref().is_some_and(|p| p.phase.running())
    }

    /// Claims the control for a new migration; refused while one runs.
    fn begin(&self) -> Result<(), String> {
        let mut progress = self.progress();
        if progress.as_ref().is_some_and(|p| p.phase.running()) {
            return Err("a migration is already running".into());
        }
        self.cancel.store(false, Ordering::SeqCst);
        *progress = Some(Progress {
            phase: Phase::Connecting,
            started: Instant::now(),
            ended: None,
            rounds: 0,
            bytes: 0,
            dirty_bytes: 0,
            rate: 0,
            error: None,
            stream: None,
        });
        Ok(())
    }

    /// The stream of the migration that runs now (until [`Self::end`]).
    fn attach(&self, stream: RawFd) {
        self.update(|p| p.stream = Some(stream));
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.update(|p| p.phase = phase);
    }

    /// Moves to [`Phase::Switching`] unless a cancel came first: past this point the target
    /// may run the guest, and only its answer decides.
    pub(super) fn switch(&self) -> Result<(), MigrationError> {
        let mut progress = self.progress();
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Canceled);
        }
        if let Some(p) = progress.as_mut() {
            p.phase = Phase::Switching;
        }
        Ok(())
    }

    pub(super) fn add_bytes(&self, n: u64) {
        self.update(|p| p.bytes += n);
    }

    pub(super) fn round(&self, rounds: u32, dirty_bytes: u64, rate: u64) {
        self.update(|p| {
            p.rounds = rounds;
            p.dirty_bytes = dirty_bytes;
            p.rate = rate;
        });
    }

    /// Err once `migrate-cancel` asked to stop.
    pub(super) fn check(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(MigrationError::Canceled)
        } else {
            Ok(())
        }
    }

    /// Records the outcome: a failure after a cancel counts as canceled.
    fn end(&self, result: &Result<MigrationReport, String>) {
        let canceled = self.cancel.load(Ordering::SeqCst);
        self.update(|p| {
            p.stream = None;
            p.ended = Some(p.started.elapsed());
            match result {
                Ok(report) => {
                    p.phase = Phase::Completed;
                    p.bytes = report.bytes;
                    p.rounds = report.rounds;
                    p.dirty_bytes = 0;
                }
                Err(e) => {
                    p.phase = if canceled {
                        Phase::Canceled
                    } else {
                        Phase::Failed
                    };
                    p.error = Some(e.clone());
                }
            }
        });
    }

    /// `migrate-cancel`: stops the migration before the switch, at its next message or, if
    /// it waits for the target, at once (the stream is shut down).
    pub fn cancel(&self) -> Result<Value, String> {
        let progress = self.progress();
        match progress.as_ref().map(|p| (p.phase, p.stream)) {
            Some((Phase::Connecting | Phase::Precopy | Phase::StopAndCopy, stream)) => {
                self.cancel.store(true, Ordering::SeqCst);
                if let Some(fd) = stream {
                    // SAFETY: shutdown on a descriptor the migration thread keeps open until
                    // end() has cleared it under this same lock; it changes no memory.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
                Ok(json!({ "migration": "canceling" }))
            }
            Some((Phase::Switching, _)) => Err("too late to cancel: the device state went to the \
                                            target, whose answer decides where the guest runs"
                .into()),
            _ => Err("no migration is running".into()),
        }
    }

    /// The progress for `info`; `None` before the first migration.
    pub fn json(&self) -> Option<Value> {
        let progress = self.progress();
        let p = progress.as_ref()?;
        let elapsed = p.ended.unwrap_or_else(|| p.started.elapsed());
        let expected_downtime_ms =
            (p.rate > 0 && p.phase.running()).then(|| p.dirty_bytes.saturating_mul(1000) / p.rate);
        Some(json!({
            "state": p.phase.as_str(),
            "rounds": p.rounds,
            "bytes": p.bytes,
            "dirty_bytes": p.dirty_bytes,
            "rate_bytes_per_s": p.rate,
            "expected_downtime_ms": expected_downtime_ms,
            "elapsed_ms": elapsed.as_millis() as u64,
            "error": p.error,
        }))
    }
}

/// What the migration thread tells the one who asked, when it ends.
pub type Done = Box<dyn FnOnce(Result<MigrationReport, String>) + Send>;

struct Job {
    stream: File,
    options: MigrateOptions,
    done: Done,
}

/// The API's handle on the migration thread.
pub struct Outgoing {
    jobs: Mutex<mpsc::Sender<Job>>,
    control: Arc<MigrationControl>,
}

impl Outgoing {
    /// Starts the thread; it installs `filter` before it waits for work.
    pub fn spawn(
        persist: Arc<Persist>,
        vcpus: Arc<VcpuControl>,
        filter: Option<BpfProgram>,
    ) -> std::io::Result<Outgoing> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let control = Arc::new(MigrationControl::default());
        let ours = control.clone();
        std::thread::Builder::new()
            .name("migration".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                if let Err(e) = sandbox::seccomp::apply(ThreadKind::Migration, filter.as_ref()) {
                    // Migrating without a filter is not an option: every request is refused.
                    tracing::error!("{e}; migrations are disabled");
                    for job in queue {
                        (job.done)(Err(format!("migrations are disabled: {e}")));
                    }
                    return;
                }
                sandbox::test_forbidden_syscall(ThreadKind::Migration);
                for job in queue {
                    let mut stream = job.stream;
                    ours.attach(stream.as_raw_fd());
                    let mut result = persist.migrate(&vcpus, &mut stream, job.options, &ours);
                    // A cancel may show up as the shut-down stream's error: say what it was.
                    let canceled = ours.cancel.load(Ordering::SeqCst) && result.is_err();
                    if canceled {
                        tracing::info!("migration canceled: {:?}", result.as_ref().err());
                        result =
                            Err("migration canceled (migrate-cancel); the VM runs on here".into());
                    }
                    ours.end(&result);
                    drop(stream);
                    (job.done)(result);
                }
            })?;
        Ok(Outgoing {
            jobs: Mutex::new(jobs),
            control,
        })
    }

    pub fn control(&self) -> &MigrationControl {
        &self.control
    }

    /// Hands a migration to the thread; refused while one runs. `done` gets its result.
    pub fn start(&self, stream: File, options: MigrateOptions, done: Done) -> Result<(), String> {
        self.control.begin()?;
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        jobs.send(Job {
            stream,
            options,
            done,
        })
        .map_err(|e| {
            let message = "the migration thread is gone".to_string();
            self.control.end(&Err(message.clone()));
            (e.0.done)(Err(message.clone()));
            message
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_is_taken_until_the_switch_and_refused_after() {
        let control = MigrationControl::default();
        assert!(control.json().is_none(), "no migration yet");
        assert!(control.cancel().is_err(), "nothing to cancel");
        control.begin().expect("first");
        assert!(control.begin().is_err(), "one at a time");
        control.set_phase(Phase::Precopy);
        control.round(2, 4096 * 100, 4096 * 1000);
        let shown = control.json().expect("progress");
        assert_eq!(shown["state"], "precopy");
        assert_eq!(shown["rounds"], 2);
        assert_eq!(shown["expected_downtime_ms"], 100);
        control.cancel().expect("cancel in precopy");
        assert!(matches!(control.check(), Err(MigrationError::Canceled)));
        assert!(
            matches!(control.switch(), Err(MigrationError::Canceled)),
            "a cancel before the switch wins"
        );
        control.end(&Err("canceled".into()));
        assert_eq!(control.json().expect("ended")["state"], "canceled");
        assert!(!control.is_running());

        control.begin().expect("again after the end");
        assert!(control.check().is_ok(), "the old cancel is gone");
        control.switch().expect("switching");
        let e = control.cancel().expect_err("too late");
        assert!(e.contains("too late"), "{e}");
        control.end(&Ok(MigrationReport {
            rounds: 3,
            bytes: 10,
            ..Default::default()
        }));
        let shown = control.json().expect("ended");
        assert_eq!(shown["state"], "completed");
        assert_eq!(shown["bytes"], 10);
        assert_eq!(shown["expected_downtime_ms"], Value::Null);
    }
}
