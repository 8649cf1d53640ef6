//! A virtio device's rate limit as its worker threads use it: the limiter, shared by the
//! device's workers and changeable at run time (the API's `update-device`), and per worker a
//! timerfd that wakes the worker when the tokens a waiting request needs are back.
//!
//! Without a limit the hot path costs one relaxed atomic load per request: no lock, no
//! clock read, no timer.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use crate::rate_limiter::{monotonic_now, LimitConfig, RateLimiter};

/// The clock the limiter reads; tests inject a fake one.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// One device's limit (one direction of a NIC), shared by its workers.
pub struct SharedLimit {
    limited: AtomicBool,
    limiter: Mutex<RateLimiter>,
    config: Mutex<LimitConfig>,
    clock: Clock,
}

impl SharedLimit {
    pub fn new(config: LimitConfig) -> Arc<Self> {
        Self::with_clock(config, Arc::new(monotonic_now))
    }

    pub fn with_clock(config: LimitConfig, clock: Clock) -> Arc<Self> {
        let limiter = RateLimiter::new(&config, clock());
        Arc::new(SharedLimit {
            limited: AtomicBool::new(!limiter.is_unlimited()),
            limiter: Mutex::new(limiter),
            config: Mutex::new(config),
            clock,
        })
    }

    /// Replaces the limit (buckets start full); takes effect at the next request.
    pub fn update(&self, config: LimitConfig) {
        let limiter = RateLimiter::new(&config, (self.clock)());
        let mut current = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        self.limited
            .store(!limiter.is_unlimited(), Ordering::SeqCst);
        *current = limiter;
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn config(&self) -> LimitConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_limiter<T>(&self, f: impl FnOnce(&mut RateLimiter, Duration) -> T) -> T {
        let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut l, (self.clock)())
    }
}

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Leave it queued: the worker's timer fires when it may go.
    Wait,
}

/// A worker's view of a shared limit, with its own wake-up timer.
pub struct Throttle {
    shared: Arc<SharedLimit>,
    timer: TimerFd,
    /// A request waits for the timer: kicks meanwhile change nothing.
    blocked: bool,
}

impl Throttle {
    pub fn new(shared: Arc<SharedLimit>) -> std::io::Result<Self> {
        let timer = TimerFd::new()?;
        // Non-blocking, so reading a timer that a later event of the same wakeup re-armed
        // cannot block the worker.
        // SAFETY: F_SETFL on a descriptor we own.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Throttle {
            shared,
            timer,
            blocked: false,
        })
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// True while a request waits for the timer: the queue is not looked at before.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired (or the limit changed): requests may be tried again.
    pub fn unblock(&mut self) {
        // Clears the expiration count; EAGAIN when woken by a limit change.
        let _ = self.timer.wait();
        self.blocked = false;
    }

    fn admit_with(
        &mut self,
        f: impl FnOnce(&mut RateLimiter, Duration) -> Result<(), Duration>,
    ) -> Admit {
        if !self.shared.limited.load(Ordering::Relaxed) {
            return Admit::Go;
        }
        match self.shared.with_limiter(f) {
            Ok(()) => Admit::Go,
            Err(wait) => {
                self.blocked = true;
                // At least a microsecond: a zero duration would disarm the timer.
                let wait = wait.max(Duration::from_micros(1));
                if let Err(e) = self.timer.reset(wait, None) {
                    // Cannot wait: let it through rather than stall the device forever.
                    tracing::error!("cannot arm a rate limit timer: {e}");
                    self.blocked = false;
                    return Admit::Go;
                }
                Admit::Wait
            }
        }
    }

    /// A request of `bytes` (and one operation).
    pub fn admit(&mut self, bytes: u64) -> Admit {
        self.admit_with(|l, now| l.consume(bytes, now))
    }

    /// Input of a size known once read: is there any budget? Charge it with [`charge`].
    pub fn admit_unsized(&mut self) -> Admit {
        self.admit_with(|l, now| l.ready(now))
    }

    pub fn charge(&mut self, bytes: u64) {
        if self.shared.limited.load(Ordering::Relaxed) {
            self.shared.with_limiter(|l, _| l.charge(bytes));
        }
    }
}

/// A device's shared limits: one for a disk or the entropy device, one per direction for a
/// NIC (receiving and transmitting are limited separately, as in Firecracker).
#[derive(Clone)]
pub enum DeviceLimits {
    One(Arc<SharedLimit>),
    RxTx {
        rx: Arc<SharedLimit>,
        tx: Arc<SharedLimit>,
    },
}

/// Which of a NIC's limits; None where a device has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Rx,
    Tx,
}

/// The settings of a device's limits, shaped as its [`DeviceLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSetting {
    One(LimitConfig),
    RxTx { rx: LimitConfig, tx: LimitConfig },
}

/// A device's limits as the control API changes them: its shared limits and the workers to
/// wake so that waiting requests see the change.
#[derive(Clone)]
pub struct LimitHandle {
    pub device: String,
    pub limits: DeviceLimits,
    pub workers: Vec<Arc<super::worker::WorkerControl>>,
}

impl LimitHandle {
    /// The current settings.
    pub fn setting(&self) -> LimitSetting {
        match &self.limits {
            DeviceLimits::One(l) => LimitSetting::One(l.config()),
            DeviceLimits::RxTx { rx, tx } => LimitSetting::RxTx {
                rx: rx.config(),
                tx: tx.config(),
            },
        }
    }

    /// Computes every new setting with `change` (given the direction, None for a device with
    /// one limit, and the current setting) and, only if all succeed, applies them and wakes
    /// the workers: a refused change changes nothing.
    pub fn update<E>(
        &self,
        mut change: impl FnMut(Option<Direction>, LimitConfig) -> Result<LimitConfig, E>,
    ) -> Result<LimitSetting, E> {
        let setting = match &self.limits {
            DeviceLimits::One(l) => {
                let new = change(None, l.config())?;
                l.update(new);
                LimitSetting::One(new)
            }
            DeviceLimits::RxTx { rx, tx } => {
                let new_rx = change(Some(Direction::Rx), rx.config())?;
                let new_tx = change(Some(Direction::Tx), tx.config())?;
                rx.update(new_rx);
                tx.update(new_tx);
                LimitSetting::RxTx {
                    rx: new_rx,
                    tx: new_tx,
                }
            }
        };
        for w in &self.workers {
            w.limits_changed();
        }
        Ok(setting)
    }
}

/// The rate-limited devices of the VM, filled in as they are set up.
#[derive(Clone, Default)]
pub struct LimitRegistry(Arc<Mutex<Vec<LimitHandle>>>);

impl LimitRegistry {
    /// The worker threads of every device (each registers its limits when it starts).
    pub fn workers(&self) -> Vec<Arc<super::worker::WorkerControl>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|h| h.workers.iter().cloned())
            .collect()
    }

    pub fn add(&self, handle: LimitHandle) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    pub fn find(&self, device: &str) -> Option<LimitHandle> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|h| h.device == device)
            .cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|h| h.device.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn a_throttled_request_arms_the_timer_and_an_update_lifts_the_limit() {
        let now = Arc::new(AtomicU64::new(0));
        let clock_now = now.clone();
        let clock: Clock =
            Arc::new(move || Duration::from_millis(clock_now.load(Ordering::SeqCst)));
        let shared = SharedLimit::with_clock(
            LimitConfig {
                ops: Some(10),
                ops_burst: Some(1),
                ..Default::default()
            },
            clock,
        );
        let mut t = Throttle::new(shared.clone()).expect("timerfd");
        assert_eq!(t.admit(0), Admit::Go);
        assert_eq!(t.admit(0), Admit::Wait);
        assert!(t.is_blocked());
        now.store(100, Ordering::SeqCst);
        t.unblock();
        assert_eq!(t.admit(0), Admit::Go, "one op back after 100 ms");
        shared.update(LimitConfig::default());
        for _ in 0..1000 {
            assert_eq!(t.admit(0), Admit::Go, "unlimited");
        }
    }
}
