//! Rate-limited logging for things a guest can make happen, like the kernel's
//! `printk_ratelimit`: a hostile or broken guest that repeats a bad request thousands of times
//! a second must not be able to flood the host's journal (or fill its disk) through the VMM.
//!
//! Each device keeps one [`LogLimit`]: at most `burst` lines per `interval`; what is dropped
//! is counted, and the first line of the next interval says how many were suppressed. The
//! clock is a parameter of [`LogLimit::check_at`], so tests need no sleeps.
//!
//! ```text
//! guest_log!(Level::WARN, counters.guest_log, "{name}: disk I/O failed: {e}");
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per interval a device may log about its guest, by default.
pub const DEFAULT_BURST: u32 = 10;
/// The default interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// What the caller may do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` messages were dropped since the last one logged.
    Log { suppressed: u64 },
    /// Drop it (it is counted).
    Suppress,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// At most `burst` messages per `interval`, shared by a device's threads.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    interval: Duration,
    window: Mutex<Window>,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(DEFAULT_BURST, DEFAULT_INTERVAL)
    }
}

impl LogLimit {
    /// Const, so a module can keep a `static` one for lines not tied to one device.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        LogLimit {
            burst,
            interval,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a message may be logged now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Whether a message may be logged at `now`. A new interval starts with the first message
    /// after the previous one ended.
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let expired = match w.start {
            None => true,
            Some(start) => now.saturating_duration_since(start) >= self.interval,
        };
        if expired {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            Verdict::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed = w.suppressed.saturating_add(1);
            Verdict::Suppress
        }
    }
}

/// Logs at `level` (a `tracing::Level`) through `limit`, adding how many earlier messages were
/// suppressed. Messages at a level that is not enabled do not count against the limit, so
/// debug noise cannot crowd out the warnings.
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $limit:expr, $($arg:tt)+) => {
        if tracing::enabled!($level) {
            match $limit.check() {
                $crate::devices::log_limit::Verdict::Log { suppressed: 0 } => {
                    tracing::event!($level, $($arg)+)
                }
                $crate::devices::log_limit::Verdict::Log { suppressed } => {
                    tracing::event!(
                        $level,
                        "{} ({suppressed} similar messages suppressed)",
                        format_args!($($arg)+)
                    )
                }
                $crate::devices::log_limit::Verdict::Suppress => {}
            }
        }
    };
}

/// Everything a `tracing` subscriber at `max` writes while `f` runs, one line per event: for
/// tests of what devices log about their guest.
#[cfg(test)]
pub fn logged_lines(max: tracing::Level, f: impl FnOnce()) -> Vec<String> {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(max)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = sink.0.lock().expect("sink").clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(v: Verdict) -> Option<u64> {
        match v {
            Verdict::Log { suppressed } => Some(suppressed),
            Verdict::Suppress => None,
        }
    }

    #[test]
    fn a_burst_per_interval_then_a_summary() {
        let limit = LogLimit::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first: Vec<_> = (0..1000).map(|i| logged(limit.check_at(at(i)))).collect();
        assert_eq!(&first[..3], &[Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none), "the rest dropped");
        // Still inside the first interval.
        assert_eq!(logged(limit.check_at(at(4999))), None);
        // The next interval's first line carries the count of everything dropped.
        assert_eq!(logged(limit.check_at(at(5000))), Some(998));
        assert_eq!(logged(limit.check_at(at(5001))), Some(0));
        assert_eq!(logged(limit.check_at(at(5002))), Some(0));
        assert_eq!(logged(limit.check_at(at(5003))), None);
        // A quiet spell: the interval restarts at the next message.
        assert_eq!(logged(limit.check_at(at(60_000))), Some(1));
        assert_eq!(logged(limit.check_at(at(64_999))), Some(0));
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        // One message per millisecond for a minute: at most burst lines per interval.
        let limit = LogLimit::new(10, Duration::from_secs(5));
        let t0 = Instant::now();
        let lines = (0..60_000u64)
            .filter(|i| logged(limit.check_at(t0 + Duration::from_millis(*i))).is_some())
            .count();
        assert_eq!(lines, 12 * 10);
    }

    #[test]
    fn the_macro_logs_a_burst_and_ignores_levels_that_are_off() {
        // 1000 warnings at once (well within one 5 s interval): 10 lines.
        let limit = LogLimit::default();
        let lines = logged_lines(tracing::Level::WARN, || {
            for i in 0..1000 {
                crate::guest_log!(tracing::Level::WARN, limit, "bad request {i}");
            }
        });
        assert_eq!(lines.len(), DEFAULT_BURST as usize, "{lines:?}");
        assert!(lines[0].ends_with("bad request 0"), "{lines:?}");
        // Debug lines while only warnings are on are not counted: the warning still shows.
        let limit = LogLimit::new(1, Duration::from_secs(5));
        let lines = logged_lines(tracing::Level::WARN, || {
            for _ in 0..100 {
                crate::guest_log!(tracing::Level::DEBUG, limit, "noise");
            }
            crate::guest_log!(tracing::Level::WARN, limit, "disk failed");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("disk failed"), "{lines:?}");
    }

    #[test]
    fn a_clock_going_backwards_does_not_open_a_new_interval() {
        let limit = LogLimit::new(1, Duration::from_secs(5));
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(logged(limit.check_at(t0)), Some(0));
        assert_eq!(logged(limit.check_at(t0 - Duration::from_secs(50))), None);
    }
}
