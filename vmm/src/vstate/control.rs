//! Starting, pausing and resuming the vCPU threads, and what they count.
//!
//! A vCPU thread checks the gate before every KVM_RUN and parks on a condition variable while
//! the VM is not yet released (so the seccomp filters are all in place before the first guest
//! instruction) or paused. To pause a vCPU that is inside KVM_RUN (a halted vCPU sleeps there
//! indefinitely), the pauser sends its thread [`kick_signal`], as Firecracker does: the no-op
//! handler sets `kvm_run.immediate_exit`, so KVM_RUN returns EINTR at once whether the signal
//! arrived during the ioctl or just before it, and the thread then sees the gate closed.

use std::cell::Cell;
use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use serde::Serialize;

use super::state::VcpuState;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(io::Error),
    #[error("the VM must be paused first")]
    NotPaused,
    #[error("{missing} of {total} vCPUs did not save their state within {timeout:?}")]
    SaveTimeout {
        missing: usize,
        total: usize,
        timeout: Duration,
    },
    #[error("{stuck} of {total} vCPUs did not stop within {timeout:?}")]
    PauseTimeout {
        stuck: usize,
        total: usize,
        timeout: Duration,
    },
}

/// How long `pause` waits for every vCPU to stop; under the node agent's 5 s request timeout.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's kvm_run, for the kick signal handler; null on non-vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local without destructor is a plain TLS
    // access, and the write is a single volatile byte store into the vCPU's own kvm_run page.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: set by `set_current_kvm_run` to the kvm_run mapping of the vCPU this thread
        // owns; the mapping lives as long as the VcpuFd, which outlives the thread's loop.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Installs the kick handler once per process. SA_RESTART: other syscalls the vCPU thread
/// makes (console writes, futex waits) are transparently restarted; KVM_RUN never is.
pub fn install_kick_handler() -> Result<(), ControlError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handle_kick as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
                result = Err(ControlError::SignalHandler(io::Error::last_os_error()));
            }
        }
    });
    result
}

/// Tells the kick handler which kvm_run belongs to the calling (vCPU) thread.
pub fn set_current_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

/// Exits of one vCPU, by kind.
#[derive(Debug, Default)]
pub struct VcpuStats {
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub hlt: AtomicU64,
    /// KVM_RUN returned EINTR: a kick (pause) or another signal.
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VcpuStatsSnapshot {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub interrupted: u64,
    pub other: u64,
    pub total: u64,
}

impl VcpuStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> VcpuStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (io, mmio, hlt, interrupted, other) = (
            get(&self.io),
            get(&self.mmio),
            get(&self.hlt),
            get(&self.interrupted),
            get(&self.other),
        );
        VcpuStatsSnapshot {
            io,
            mmio,
            hlt,
            interrupted,
            other,
            total: io + mmio + hlt + interrupted + other,
        }
    }
}

#[derive(Debug, Default)]
struct Gate {
    /// False until the VMM has finished setting up (seccomp filters installed everywhere).
    released: bool,
    paused: bool,
    /// vCPU threads started and not yet finished.
    alive: usize,
    /// vCPU threads waiting at the gate.
    parked: usize,
    /// Raised for each snapshot: every parked vCPU thread saves its state once per value.
    save_round: u64,
    /// What the vCPU threads saved in the current round.
    saved: Vec<Result<VcpuState, String>>,
}

impl Gate {
    fn open(&self) -> bool {
        self.released && !self.paused
    }
}

/// What a vCPU thread does when it leaves the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Run,
    SaveState,
}

/// The gate all vCPU threads pass before each KVM_RUN, and their thread handles for kicks.
#[derive(Default)]
pub struct VcpuControl {
    gate: Mutex<Gate>,
    changed: Condvar,
    /// Fast path for the vCPU loop: true whenever the gate may be closed.
    closed: AtomicBool,
    /// Kept (never detached) so that their pthread_t stays valid for pthread_kill.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl VcpuControl {
    pub fn new() -> Self {
        VcpuControl {
            closed: AtomicBool::new(true),
            ..Default::default()
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a vCPU thread about to start; call before spawning it.
    pub fn thread_starting(&self) {
        self.gate().alive += 1;
    }

    /// Keeps a started vCPU thread's handle for kicking.
    pub fn add_thread(&self, handle: JoinHandle<()>) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// Called by a vCPU thread when it stops running for good.
    pub fn thread_finished(&self) {
        let mut gate = self.gate();
        gate.alive = gate.alive.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread before KVM_RUN: returns [`Wake::Run`] at once when the gate
    /// is open, else parks until it opens again, or until a snapshot asks for the vCPU's
    /// state ([`Wake::SaveState`]: the thread saves it, hands it to [`Self::deliver_state`]
    /// and comes back here). `round` is the thread's own record of the last save it served.
    pub fn wait_until_runnable(&self, round: &mut u64) -> Wake {
        if !self.closed.load(Ordering::Acquire) {
            return Wake::Run;
        }
        let mut gate = self.gate();
        if gate.open() {
            return Wake::Run;
        }
        gate.parked += 1;
        self.changed.notify_all();
        while !gate.open() {
            if gate.save_round != *round {
                *round = gate.save_round;
                gate.parked -= 1;
                return Wake::SaveState;
            }
            gate = self.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
        gate.parked -= 1;
        Wake::Run
    }

    /// A vCPU thread's answer to [`Wake::SaveState`].
    pub fn deliver_state(&self, state: Result<VcpuState, String>) {
        self.gate().saved.push(state);
        self.changed.notify_all();
    }

    /// The state of every vCPU of a paused VM, in vCPU order; each thread reads its own
    /// (KVM wants a vCPU's ioctls from the thread that runs it).
    pub fn save_vcpus(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let mut gate = self.gate();
        if !gate.paused || gate.parked < gate.alive {
            return Err(ControlError::NotPaused.to_string());
        }
        gate.save_round += 1;
        gate.saved.clear();
        self.changed.notify_all();
        let deadline = Instant::now() + timeout;
        while gate.saved.len() < gate.alive {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControlError::SaveTimeout {
                    missing: gate.alive - gate.saved.len(),
                    total: gate.alive,
                    timeout,
                }
                .to_string());
            }
            gate = self
                .changed
                .wait_timeout(gate, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut states = std::mem::take(&mut gate.saved)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Lets the vCPUs run for the first time (unless paused meanwhile).
    pub fn release(&self) {
        let mut gate = self.gate();
        gate.released = true;
        self.closed.store(!gate.open(), Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.gate().paused
    }

    /// Stops every vCPU and waits until all are parked. On timeout the vCPUs are let go again
    /// and the error says how many did not stop.
    pub fn pause(&self, timeout: Duration) -> Result<(), ControlError> {
        {
            let mut gate = self.gate();
            gate.paused = true;
            self.closed.store(true, Ordering::Release);
        }
        self.kick_all();
        let deadline = Instant::now() + timeout;
        let mut gate = self.gate();
        while gate.parked < gate.alive {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (stuck, total) = (gate.alive - gate.parked, gate.alive);
                gate.paused = false;
                self.closed.store(!gate.open(), Ordering::Release);
                self.changed.notify_all();
                return Err(ControlError::PauseTimeout {
                    stuck,
                    total,
                    timeout,
                });
            }
            gate = self
                .changed
                .wait_timeout(gate, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        let mut gate = self.gate();
        gate.paused = false;
        self.closed.store(!gate.open(), Ordering::Release);
        self.changed.notify_all();
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for thread in threads.iter() {
            // SAFETY: the handle is kept, never joined or detached, so the pthread_t is valid
            // even if the thread has finished. ESRCH for a finished thread is harmless.
            let rc = unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            if rc != 0 && rc != libc::ESRCH {
                tracing::warn!(
                    "cannot kick a vCPU thread: {}",
                    io::Error::from_raw_os_error(rc)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A fake vCPU loop: counts "guest progress" whenever the gate lets it through.
    fn spawn_fake_vcpu(
        control: &Arc<VcpuControl>,
        progress: &Arc<AtomicUsize>,
        stop: &Arc<AtomicBool>,
    ) {
        control.thread_starting();
        let (c, p, stop) = (control.clone(), progress.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::SeqCst) {
                if c.wait_until_runnable(&mut round) == Wake::SaveState {
                    c.deliver_state(Err("a fake vCPU has no state".into()));
                    continue;
                }
                p.fetch_add(1, Ordering::SeqCst);
                std::thread::yield_now();
            }
            c.thread_finished();
        });
        control.add_thread(handle);
    }

    #[test]
    fn vcpus_wait_for_release_then_pause_stops_progress_and_resume_continues() {
        install_kick_handler().expect("handler");
        let control = Arc::new(VcpuControl::new());
        let progress = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..2 {
            spawn_fake_vcpu(&control, &progress, &stop);
        }
        // Not released: a pause completes once both threads are parked at the gate...
        control.pause(Duration::from_secs(10)).expect("parks");
        assert_eq!(
            progress.load(Ordering::SeqCst),
            0,
            "no progress before release"
        );
        // ...and releasing while paused keeps them parked.
        control.release();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            progress.load(Ordering::SeqCst),
            0,
            "paused before boot stays paused"
        );
        control.resume();
        while progress.load(Ordering::SeqCst) < 1000 {
            std::thread::yield_now();
        }
        control.pause(Duration::from_secs(10)).expect("pauses");
        assert!(control.is_paused());
        let frozen = progress.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            progress.load(Ordering::SeqCst),
            frozen,
            "no progress while paused"
        );
        control.resume();
        while progress.load(Ordering::SeqCst) < frozen + 1000 {
            std::thread::yield_now();
        }
        assert!(!control.is_paused());
        stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *control.threads.lock().expect("lock"));
        for t in threads {
            t.join().expect("fake vCPU");
        }
    }

    #[test]
    fn pause_gives_up_on_a_stuck_vcpu_and_lets_the_others_go() {
        let control = VcpuControl::new();
        control.release();
        control.thread_starting(); // a "vCPU" that never reaches the gate
        let err = control
            .pause(Duration::from_millis(50))
            .expect_err("cannot stop");
        assert!(
            err.to_string().contains("1 of 1 vCPUs did not stop"),
            "{err}"
        );
        assert!(!control.is_paused(), "rolled back");
        control.thread_finished();
        control
            .pause(Duration::from_millis(50))
            .expect("nothing left to stop");
    }

    #[test]
    fn stats_total_all_kinds() {
        let stats = VcpuStats::default();
        VcpuStats::count(&stats.io);
        VcpuStats::count(&stats.io);
        VcpuStats::count(&stats.hlt);
        VcpuStats::count(&stats.interrupted);
        let s = stats.snapshot();
        assert_eq!(
            (s.io, s.hlt, s.interrupted, s.mmio, s.total),
            (2, 1, 1, 0, 4)
        );
    }
}
