//! The health of one HTTP server, shared by every worker (atomics, no lock).
//!
//! A server is up until a request to it fails at the transport level
//! (refused, reset, timed out, garbage). It then rests `retry_interval`,
//! doubling with each further failure up to a cap. When its rest is over, one
//! lookup at a time may probe it (half-open); success makes it up again. This
//! module only keeps the state and says what changed, so the caller logs one
//! line when a server goes down and one when it comes back. It owns no socket.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// What a lookup may do with a server right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Healthy: use it.
    Up,
    /// Its rest is over: one lookup may probe it (see [`Health::try_probe`]).
    Probe,
    /// Resting: no lookup waits on it.
    Resting,
}

#[derive(Debug)]
pub struct Health {
    retry_interval_ms: u64,
    max_factor: u32,
    /// Consecutive failures; 0 = up.
    failures: AtomicU32,
    /// Milliseconds (on the cache's clock) until which the server rests.
    rest_until_ms: AtomicU64,
    /// A probe request is in flight.
    probing: AtomicBool,
    /// When the current run of failures began (µs: a lookup answered by a
    /// server restarted within the same millisecond must still count);
    /// requests started before it do not count as a recovery.
    down_since_us: AtomicU64,
}

impl Health {
    pub fn new(retry_interval: Duration, max_factor: u32) -> Health {
        Health {
            retry_interval_ms: retry_interval.as_millis() as u64,
            max_factor: max_factor.max(1),
            failures: AtomicU32::new(0),
            rest_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            down_since_us: AtomicU64::new(0),
        }
    }

    pub fn availability(&self, now_ms: u64) -> Availability {
        if self.failures.load(Ordering::Acquire) == 0 {
            Availability::Up
        } else if now_ms >= self.rest_until_ms.load(Ordering::Acquire) {
            Availability::Probe
        } else {
            Availability::Resting
        }
    }

    pub fn is_up(&self) -> bool {
        self.failures.load(Ordering::Acquire) == 0
    }

    /// Claims the single probe slot; false if a probe is already in flight.
    pub fn try_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Releases the probe slot without a verdict (the lookup ended otherwise).
    pub fn end_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// A request succeeded. Returns the number of failures it ends (> 0: the
    /// server just came back). The probe slot is its holder's to free.
    /// `started_us`: when the request was sent. A request sent before the
    /// server went down proves nothing about it now and changes nothing.
    pub fn success(&self, started_us: u64) -> u32 {
        if self.failures.load(Ordering::Acquire) == 0
            || started_us <= self.down_since_us.load(Ordering::Acquire)
        {
            return 0;
        }
        self.failures.swap(0, Ordering::AcqRel)
    }

    /// A request failed at the transport level (at `now_us`). Returns the
    /// rest imposed and whether the server was up until now (the caller
    /// logs that once).
    pub fn failure(&self, now_us: u64) -> (Duration, bool) {
        let now_ms = now_us / 1000;
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let shift = (n - 1).min(31);
        let factor = (1u64 << shift).min(u64::from(self.max_factor));
        let rest_ms = self.retry_interval_ms.saturating_mul(factor);
        self.rest_until_ms
            .store(now_ms.saturating_add(rest_ms), Ordering::Release);
        if n == 1 {
            self.down_since_us.store(now_us, Ordering::Release);
        }
        (Duration::from_millis(rest_ms), n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_doubles_and_probe_is_single() {
        let h = Health::new(Duration::from_millis(100), 4);
        assert_eq!(h.availability(0), Availability::Up);
        assert_eq!(h.failure(0), (Duration::from_millis(100), true));
        assert_eq!(h.success(0), 0, "sent in the same µs: proves nothing");
        assert_eq!(h.availability(99), Availability::Resting);
        assert_eq!(h.availability(100), Availability::Probe);
        assert!(h.try_probe());
        assert!(!h.try_probe());
        assert_eq!(h.failure(100_000), (Duration::from_millis(200), false));
        assert!(!h.try_probe(), "only the holder frees the probe slot");
        h.end_probe();
        assert_eq!(h.failure(300_000), (Duration::from_millis(400), false));
        assert_eq!(h.failure(700_000), (Duration::from_millis(400), false)); // capped at 4x
        assert!(h.try_probe());
        assert_eq!(h.success(0), 0, "sent when the server went down (at 0)");
        assert_eq!(h.success(1), 4, "sent 1 µs after it went down");
        h.end_probe();
        assert_eq!(h.availability(0), Availability::Up);
        assert_eq!(h.success(800_000), 0);
    }
}
