//! The open-loop schedule behind `--rate N`, as plain arithmetic. Request m
//! of the run (m = 0, 1, 2, ... counted from the start of the load, warm-up
//! included) is due at start + m/N seconds and belongs to connection
//! m mod C (C: connections over every thread), so each connection sends
//! every C-th request, the connections staggered by 1/N: together exactly N
//! per second. A request is measured when it is due at or after the end of
//! warm-up; the schedule ends after `-n` measured requests, or with the
//! last request due before the end of `--duration`. Latency runs from the
//! due time, so a request that waits (its connection has `--depth` requests
//! in flight, is reconnecting, or the load generator is behind) shows the
//! wait in its latency, and a slow server's queueing is not hidden
//! (coordinated omission).

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Schedule {
    /// Nanoseconds between two consecutive requests of the run (1e9 / N).
    interval_ns: f64,
    /// Connections over every thread.
    conns: u64,
    /// The first measured request.
    first: u64,
    /// Requests from this one on are never due.
    limit: u64,
}

impl Schedule {
    /// `rate` requests per second over `conns` connections; `count`
    /// measured requests, or as many as fall due within `duration`, after
    /// `warmup`.
    pub fn new(
        rate: f64,
        conns: usize,
        warmup: Duration,
        duration: Duration,
        count: Option<u64>,
    ) -> Schedule {
        let first = (warmup.as_secs_f64() * rate).ceil() as u64;
        let limit = match count {
            Some(n) => first + n,
            None => ((warmup + duration).as_secs_f64() * rate).ceil() as u64,
        };
        Schedule {
            interval_ns: 1e9 / rate,
            conns: conns as u64,
            first,
            limit,
        }
    }

    /// The run's index of connection `gid`'s `k`-th request.
    pub fn index(&self, gid: u64, k: u64) -> u64 {
        k * self.conns + gid
    }

    /// When request `m` is due.
    pub fn due(&self, start: Instant, m: u64) -> Instant {
        start + Duration::from_nanos((m as f64 * self.interval_ns) as u64)
    }

    /// Whether request `m` is measured (not warm-up).
    pub fn measured(&self, m: u64) -> bool {
        m >= self.first
    }

    /// Whether the schedule ends before request `m`.
    pub fn over(&self, m: u64) -> bool {
        m >= self.limit
    }

    /// Measured requests of connection `gid` from its `next_k`-th on: at
    /// the end of a run, those never sent.
    pub fn remaining(&self, gid: u64, next_k: u64) -> u64 {
        // The smallest k with index(gid, k) >= m.
        let k_from = |m: u64| {
            if m <= gid {
                0
            } else {
                (m - gid).div_ceil(self.conns)
            }
        };
        k_from(self.limit).saturating_sub(next_k.max(k_from(self.first)))
    }

    /// The target rate, requests per second.
    pub fn rate(&self) -> f64 {
        1e9 / self.interval_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_once_at_the_rate() {
        // 100/s for 2 s over 3 connections: requests 0..200, due 10 ms apart.
        let s = Schedule::new(100.0, 3, Duration::ZERO, Duration::from_secs(2), None);
        let start = Instant::now();
        let s = &s;
        let mut all: Vec<u64> = (0..3)
            .flat_map(|gid| {
                (0..)
                    .map(move |k| s.index(gid, k))
                    .take_while(|&m| !s.over(m))
            })
            .collect();
        all.sort();
        assert_eq!(all, (0..200).collect::<Vec<u64>>());
        assert_eq!(s.due(start, 0), start);
        assert_eq!(s.due(start, 1) - start, Duration::from_millis(10));
        assert_eq!(s.due(start, 199) - start, Duration::from_millis(1990));
        assert_eq!((0..3).map(|g| s.remaining(g, 0)).sum::<u64>(), 200);
        // Connection 1 sent its first 10 (requests 1, 4, ..., 28).
        assert_eq!(s.remaining(1, 10), 67 - 10);
    }

    #[test]
    fn warm_up_and_count() {
        // 1000/s, 0.5 s warm-up: requests 0..500 are warm-up; -n 1000 ends at 1500.
        let s = Schedule::new(
            1000.0,
            4,
            Duration::from_millis(500),
            Duration::ZERO,
            Some(1000),
        );
        assert!(!s.measured(499) && s.measured(500));
        assert!(!s.over(1499) && s.over(1500));
        assert_eq!((0..4).map(|g| s.remaining(g, 0)).sum::<u64>(), 1000);
        // A connection that sent everything has nothing left.
        assert_eq!(s.remaining(3, 375), 0);
        // Connection 0's requests 500, 504, ...: k from 125.
        assert_eq!(s.remaining(0, 0), 250);
        assert_eq!(s.remaining(0, 200), 175);
        assert!((s.rate() - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn fractional_rates() {
        let s = Schedule::new(0.5, 1, Duration::ZERO, Duration::from_secs(5), None);
        let start = Instant::now();
        // Due at 0, 2 and 4 s.
        assert_eq!(s.remaining(0, 0), 3);
        assert_eq!(s.due(start, 2) - start, Duration::from_secs(4));
    }
}
