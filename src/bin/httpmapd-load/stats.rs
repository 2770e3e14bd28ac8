//! What a phase counts: the answer and error counters ([`Counts`]), the
//! latency histogram (HDR, nanoseconds, 3 significant digits), and what the
//! threads share while they run ([`Shared`]) so the progress line can read
//! answers, errors and the p99 so far without stopping them. Each thread
//! keeps its own counts and a histogram of its latest latencies, and hands
//! them over ([`Publisher`]) every 100 ms and at its end; the merged
//! histogram is the one reported.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Counters of one thread or a whole phase. Outcomes and errors count only
/// what falls in the measured window (after warm-up).
#[derive(Default, Clone, Copy, Debug)]
pub struct Counts {
    pub found: u64,
    pub not_found: u64,
    pub stored: u64,
    /// tcp_table 400, socketmap TEMP/TIMEOUT, HTTP non-2xx, memcached
    /// SERVER_ERROR/NOT_STORED, policy DEFER, DEFER_IF_PERMIT,
    /// DEFER_IF_REJECT and 4xx.
    pub temp: u64,
    /// socketmap PERM.
    pub perm: u64,
    pub connect_errors: u64,
    /// Requests unanswered `--timeout` after their write.
    pub timeouts: u64,
    /// Unparseable replies, or a reply with no request in flight.
    pub protocol_errors: u64,
    /// The server closed or reset a connection with requests in flight.
    pub closed: u64,
    pub connects: u64,
    /// Open loop: measured requests written.
    pub sent: u64,
    /// Open loop: of those, written later than `--late` after their due time.
    pub late: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.found += o.found;
        self.not_found += o.not_found;
        self.stored += o.stored;
        self.temp += o.temp;
        self.perm += o.perm;
        self.connect_errors += o.connect_errors;
        self.timeouts += o.timeouts;
        self.protocol_errors += o.protocol_errors;
        self.closed += o.closed;
        self.connects += o.connects;
        self.sent += o.sent;
        self.late += o.late;
    }

    /// Requests answered (whatever the answer).
    pub fn answered(&self) -> u64 {
        self.found + self.not_found + self.stored + self.temp + self.perm
    }

    /// Every error kind of the report's `errors` together.
    pub fn errors(&self) -> u64 {
        self.connect_errors
            + self.timeouts
            + self.protocol_errors
            + self.closed
            + self.temp
            + self.perm
    }
}

/// An empty latency histogram: 1 ns to 120 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds")
}

/// What a phase's threads share while they run.
pub struct Shared {
    /// When the load started (after every connection was up); set once by
    /// the first thread past the start barrier.
    pub start: OnceLock<Instant>,
    /// Every answer so far, warm-up included (for requests per second).
    pub answers: AtomicU64,
    /// Errors so far ([`Counts::errors`]).
    pub errors: AtomicU64,
    /// Latencies recorded so far (measured window only).
    pub hist: Mutex<Histogram<u64>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            start: OnceLock::new(),
            answers: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hist: Mutex::new(new_hist()),
        }
    }

    /// p99 so far, in nanoseconds (0 before the first measured answer).
    pub fn p99(&self) -> u64 {
        let h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        h.value_at_quantile(0.99)
    }
}

const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// One thread's side of [`Shared`]: latencies and answers not yet handed over.
pub struct Publisher {
    pub hist: Histogram<u64>,
    answers: u64,
    published_errors: u64,
    last: Instant,
}

impl Publisher {
    pub fn new() -> Publisher {
        Publisher {
            hist: new_hist(),
            answers: 0,
            published_errors: 0,
            last: Instant::now(),
        }
    }

    /// Counts one answer (measured or warm-up).
    pub fn answer(&mut self) {
        self.answers += 1;
    }

    /// Hands over the answer and error counts at once (two relaxed atomic
    /// adds), and the histogram every 100 ms or when `force`d.
    pub fn publish(&mut self, shared: &Shared, counts: &Counts, now: Instant, force: bool) {
        if self.answers > 0 {
            shared.answers.fetch_add(self.answers, Ordering::Relaxed);
            self.answers = 0;
        }
        let errors = counts.errors();
        if errors != self.published_errors {
            shared
                .errors
                .fetch_add(errors - self.published_errors, Ordering::Relaxed);
            self.published_errors = errors;
        }
        if force || now.duration_since(self.last) >= PUBLISH_EVERY {
            self.last = now;
            if !self.hist.is_empty() {
                let mut h = shared.hist.lock().unwrap_or_else(|e| e.into_inner());
                let _ = h.add(&self.hist);
                drop(h);
                self.hist.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_hands_over_everything_once() {
        let shared = Shared::new();
        let mut p = Publisher::new();
        let mut c = Counts::default();
        let now = Instant::now();
        for ns in [1_000, 2_000, 3_000] {
            p.hist.record(ns).unwrap();
            p.answer();
        }
        c.timeouts = 2;
        p.publish(&shared, &c, now, false);
        assert_eq!(shared.answers.load(Ordering::Relaxed), 3);
        assert_eq!(shared.errors.load(Ordering::Relaxed), 2);
        c.closed = 1;
        p.publish(&shared, &c, now, true);
        p.publish(&shared, &c, now, true);
        assert_eq!(shared.errors.load(Ordering::Relaxed), 3);
        assert_eq!(shared.answers.load(Ordering::Relaxed), 3);
        let h = shared.hist.lock().unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h.max(), h.highest_equivalent(3_000));
    }
}
