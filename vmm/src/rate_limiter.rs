//! Rate limiting for virtio devices, after Firecracker's `rate_limiter` crate: two token
//! buckets per limiter (bytes and operations), each with a rate per second and a capacity
//! (the burst), refilled continuously.
//!
//! A request that does not fit waits (the device leaves it on its queue and arms a timer for
//! when the tokens will be back); nothing is dropped. A request larger than a bucket's
//! capacity could never fit: it waits for a full bucket, then runs and leaves the bucket in
//! debt for the excess, which refill pays back before anything else runs. So the long-term
//! rate is exact whatever the request sizes.
//!
//! Time is passed in (`now`, a monotonic [`Duration`]), so the buckets are tested with a fake
//! clock; devices use [`monotonic_now`].
//!
//! Units: bandwidth in bytes per second with optional K, M, G suffixes that are powers of
//! 1024 (`10M` = 10 MiB/s); operations per second as a plain number. Without an explicit
//! burst, a bucket holds 100 ms worth of its rate (at least 1).

use std::time::Duration;

const NANOS_PER_SEC: i128 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("'{0}' is not a number with an optional K, M or G suffix")]
    NotAnAmount(String),
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parses `10M`, `512K`, `1G`, `2000` (K/M/G are powers of 1024); `0` means no limit.
pub fn parse_bytes(text: &str) -> Result<u64, RateError> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RateError::NotAnAmount(text.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| RateError::TooLarge(text.to_string()))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| RateError::TooLarge(text.to_string()))
}

/// Parses a plain count of operations per second; `0` means no limit.
pub fn parse_ops(text: &str) -> Result<u64, RateError> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RateError::NotAnAmount(text.to_string()));
    }
    t.parse().map_err(|_| RateError::TooLarge(text.to_string()))
}

/// The time on the monotonic clock, as the buckets want it.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One bucket: `rate` tokens per second up to `capacity`, starting full. The budget is kept in
/// token-nanoseconds (tokens times 10^9), so no fraction of a token is ever lost to rounding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    budget: i128,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket; `capacity` None: 100 ms worth of `rate` (at least 1). `rate` must not be 0.
    pub fn new(rate: u64, capacity: Option<u64>, now: Duration) -> Self {
        let capacity = capacity.unwrap_or(rate / 10).max(1);
        TokenBucket {
            rate: rate.max(1),
            capacity,
            budget: i128::from(capacity) * NANOS_PER_SEC,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_nanos() as i128;
        self.last = now.max(self.last);
        let full = i128::from(self.capacity) * NANOS_PER_SEC;
        self.budget = (self.budget + elapsed * i128::from(self.rate)).min(full);
    }

    /// How long until `tokens` may be taken (zero: now). A request over the capacity needs a
    /// full bucket.
    pub fn wait_for(&mut self, tokens: u64, now: Duration) -> Duration {
        self.refill(now);
        let need = i128::from(tokens.min(self.capacity)) * NANOS_PER_SEC;
        if self.budget >= need {
            return Duration::ZERO;
        }
        let missing = need - self.budget;
        let rate = i128::from(self.rate);
        // Rounded up, so the timer never fires a nanosecond too early.
        let nanos = (missing + rate - 1) / rate;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Takes `tokens` (after [`wait_for`](Self::wait_for) said zero), possibly into debt.
    pub fn take(&mut self, tokens: u64) {
        self.budget -= i128::from(tokens) * NANOS_PER_SEC;
    }
}

/// What a device's limit is set to: a rate and an optional burst per bucket; a rate of None
/// (or 0) means that bucket is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitConfig {
    pub bandwidth: Option<u64>,
    pub bandwidth_burst: Option<u64>,
    pub ops: Option<u64>,
    pub ops_burst: Option<u64>,
}

impl LimitConfig {
    /// A burst needs its rate, and is at least 1.
    pub fn check(&self) -> Result<(), String> {
        if self.bandwidth_burst.is_some() && self.bandwidth.unwrap_or(0) == 0 {
            return Err("bandwidth-burst needs a bandwidth".into());
        }
        if self.ops_burst.is_some() && self.ops.unwrap_or(0) == 0 {
            return Err("ops-burst needs ops".into());
        }
        if self.bandwidth_burst == Some(0) || self.ops_burst == Some(0) {
            return Err("a burst must be at least 1".into());
        }
        Ok(())
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.unwrap_or(0) == 0 && self.ops.unwrap_or(0) == 0
    }
}

/// A bytes bucket and an operations bucket, each optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(config: &LimitConfig, now: Duration) -> Self {
        let bucket = |rate: Option<u64>, burst| {
            rate.filter(|r| *r > 0)
                .map(|r| TokenBucket::new(r, burst, now))
        };
        RateLimiter {
            bytes: bucket(config.bandwidth, config.bandwidth_burst),
            ops: bucket(config.ops, config.ops_burst),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Takes `bytes` and one operation if both buckets have them; else takes nothing and
    /// says how long to wait.
    pub fn consume(&mut self, bytes: u64, now: Duration) -> Result<(), Duration> {
        let wait_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait = wait_bytes.max(wait_ops);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
        Ok(())
    }

    /// For input whose size is known only once it is read (a received frame): waits until
    /// both buckets have at least one token, takes nothing yet.
    pub fn ready(&mut self, now: Duration) -> Result<(), Duration> {
        let wait_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        match wait_bytes.max(wait_ops) {
            w if w.is_zero() => Ok(()),
            w => Err(w),
        }
    }

    /// Charges what [`ready`](Self::ready) let through, possibly into debt.
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn amounts_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("10M"), Ok(10 << 20));
        assert_eq!(parse_bytes("512k"), Ok(512 << 10));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("1234"), Ok(1234));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in ["", "M", "10MB", "-1", "1.5M", "ten", "99999999999999999999"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_bytes("99999999999G"),
            Err(RateError::TooLarge(_))
        ));
        assert_eq!(parse_ops("2000"), Ok(2000));
        assert!(parse_ops("2K").is_err(), "operations take no suffix");
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_capacity() {
        // 1000 tokens/s, capacity 100.
        let mut b = TokenBucket::new(1000, None, ms(0));
        assert_eq!(b.capacity(), 100);
        assert_eq!(b.wait_for(100, ms(0)), Duration::ZERO);
        b.take(100);
        assert_eq!(b.wait_for(50, ms(0)), ms(50), "50 tokens take 50 ms");
        assert_eq!(b.wait_for(50, ms(20)), ms(30));
        assert_eq!(b.wait_for(50, ms(50)), Duration::ZERO);
        // Idle for a long time: still only the capacity.
        assert_eq!(b.wait_for(100, ms(10_000)), Duration::ZERO);
        b.take(100);
        assert_eq!(b.wait_for(1, ms(10_000)), ms(1));
    }

    #[test]
    fn a_request_over_the_capacity_waits_for_a_full_bucket_then_leaves_a_debt() {
        let mut b = TokenBucket::new(1000, Some(100), ms(0));
        b.take(40);
        assert_eq!(b.wait_for(1000, ms(0)), ms(40), "needs a full bucket");
        assert_eq!(b.wait_for(1000, ms(40)), Duration::ZERO);
        b.take(1000);
        // 900 tokens of debt plus one token: 901 ms.
        assert_eq!(b.wait_for(1, ms(40)), ms(901));
    }

    #[test]
    fn the_long_term_rate_is_exact_with_a_fake_clock() {
        // 10 MiB/s, 1 MiB requests: 100 requests take 10 s minus the first burst.
        let mut l = RateLimiter::new(
            &LimitConfig {
                bandwidth: Some(10 << 20),
                ..Default::default()
            },
            ms(0),
        );
        let mut now = ms(0);
        let mut done = 0u64;
        while done < 100 {
            match l.consume(1 << 20, now) {
                Ok(()) => done += 1,
                Err(wait) => now += wait,
            }
        }
        // The bucket held 1 MiB (100 ms) at the start.
        let expected = Duration::from_millis(9_900);
        assert!(now.abs_diff(expected) < ms(1), "{now:?}");
    }

    #[test]
    fn both_buckets_must_allow_and_nothing_is_taken_otherwise() {
        let mut l = RateLimiter::new(
            &LimitConfig {
                bandwidth: Some(1000),
                bandwidth_burst: Some(1000),
                ops: Some(10),
                ops_burst: Some(2),
            },
            ms(0),
        );
        assert_eq!(l.consume(100, ms(0)), Ok(()));
        assert_eq!(l.consume(100, ms(0)), Ok(()));
        assert_eq!(l.consume(100, ms(0)), Err(ms(100)), "out of operations");
        // The bytes were not taken by the refused request: 800 remain, then 1 op comes.
        assert_eq!(l.consume(800, ms(100)), Ok(()));
        assert!(RateLimiter::new(&LimitConfig::default(), ms(0)).is_unlimited());
        let mut rx = RateLimiter::new(
            &LimitConfig {
                bandwidth: Some(1000),
                bandwidth_burst: Some(100),
                ..Default::default()
            },
            ms(0),
        );
        assert_eq!(rx.ready(ms(0)), Ok(()));
        rx.charge(1500);
        assert_eq!(rx.ready(ms(0)), Err(ms(1401)), "pays back the frame first");
    }
}
