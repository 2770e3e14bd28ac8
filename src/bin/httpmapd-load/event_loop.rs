//! One thread of the load: a mio event loop driving its share of the
//! connections. Owns opening them (at most 256 connecting at once,
//! reconnecting 50 ms after a failure), sending requests (closed loop:
//! `--depth` in flight per connection, the next one as soon as an answer
//! comes back; open loop: each when `schedule.rs` says it is due, up to
//! `--depth` in flight, the others waiting with their latency running),
//! parsing answers, timeouts, and counting and timing what is measured.

use crate::conn::{self, Conn, Sent, State};
use crate::proto::{encode_request, parse_reply, Outcome};
use crate::report;
use crate::run::{Plan, ThreadResult};
use crate::stats::{Counts, Publisher};
use crate::timer;
use httpmapd::transport::Transport;
use mio::{Events, Interest, Poll, Token};
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CONNECT_BURST: usize = 256;
const TICK: Duration = Duration::from_millis(20);
const RECONNECT_DELAY: Duration = Duration::from_millis(50);
/// A due time this close is waited for by polling without blocking.
const SPIN: Duration = Duration::from_micros(2);

struct Loop<'a> {
    plan: &'a Plan<'a>,
    poll: Poll,
    conns: Vec<Conn>,
    rng: fastrand::Rng,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    counts: Counts,
    publisher: Publisher,
    /// When the load started (the same instant in every thread).
    start: Instant,
    /// Requests sent before this are warm-up and not recorded.
    record_from: Instant,
    /// Duration mode: answers after this are not counted.
    end: Option<Instant>,
    last: Option<Instant>,
    miss_serial: u64,
    /// Requests may be sent: not before the start, never with `--idle`,
    /// no more once the `-n` budget is spent.
    issuing: bool,
    /// The last answer or send, or the last wait for an open-loop request
    /// not due yet (count mode stops after `--timeout` without any).
    progress: Instant,
    /// Measured requests answered after the end (duration mode): unanswered.
    answered_after_end: u64,
}

impl Loop<'_> {
    fn start_connect(&mut self, i: usize) {
        let c = &mut self.conns[i];
        match conn::connect(&self.plan.opts.target.addr) {
            Ok(mut s) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if self
                    .poll
                    .registry()
                    .register(s.socket(), Token(i), interest)
                    .is_err()
                {
                    self.counts.connect_errors += 1;
                    c.state = State::Down;
                    c.retry_at = Instant::now() + RECONNECT_DELAY;
                    return;
                }
                c.stream = Some(s);
                c.state = State::Connecting;
            }
            Err(_) => {
                self.counts.connect_errors += 1;
                c.state = State::Down;
                c.retry_at = Instant::now() + RECONNECT_DELAY;
            }
        }
    }

    fn close(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(s.socket());
        }
        c.state = State::Down;
        c.retry_at = Instant::now() + RECONNECT_DELAY;
        c.rbuf.clear();
        c.wbuf.clear();
        c.wpos = 0;
        c.inflight.clear();
    }

    /// Starts connections that are down, at most CONNECT_BURST connecting at once.
    fn connect_some(&mut self, now: Instant) {
        let mut connecting = self
            .conns
            .iter()
            .filter(|c| c.state == State::Connecting)
            .count();
        for i in 0..self.conns.len() {
            if connecting >= CONNECT_BURST {
                break;
            }
            if self.conns[i].state == State::Down && self.conns[i].retry_at <= now {
                self.start_connect(i);
                if self.conns[i].state == State::Connecting {
                    connecting += 1;
                }
            }
        }
    }

    /// Appends one request to connection `i`'s write buffer and records it in flight.
    fn push_request(&mut self, i: usize, sent: Sent) {
        let o = self.plan.opts;
        let keys = self.plan.keys;
        let c = &mut self.conns[i];
        if o.miss_ratio > 0.0 && self.rng.f64() < o.miss_ratio {
            // A key outside the key set, never repeated.
            self.miss_serial += 1;
            let k = format!(
                "{}-miss{}x{}@{}",
                o.keys.prefix,
                self.rng.u64(..),
                self.miss_serial,
                o.keys.domain
            );
            encode_request(
                &o.target.proto,
                self.plan.op,
                k.as_bytes(),
                k.as_bytes(),
                &mut c.wbuf,
            );
        } else {
            let idx = self.plan.chooser.pick(&mut self.rng);
            encode_request(
                &o.target.proto,
                self.plan.op,
                keys.key(idx),
                keys.value(idx),
                &mut c.wbuf,
            );
        }
        c.inflight.push_back(sent);
    }

    /// Sends what connection `i` may send now (closed loop: up to `depth`
    /// in flight; open loop: its due requests, up to `depth` in flight).
    fn top_up(&mut self, i: usize, now: Instant) {
        let depth = self.plan.opts.depth;
        match &self.plan.schedule {
            None => {
                while self.issuing
                    && self.conns[i].state == State::Up
                    && self.conns[i].inflight.len() < depth
                {
                    let measured = now >= self.record_from;
                    if measured {
                        if let Some(b) = &self.plan.budget {
                            if b.fetch_sub(1, Ordering::Relaxed) <= 0 {
                                self.issuing = false;
                                break;
                            }
                        }
                    }
                    let sent = Sent {
                        due: now,
                        sent: now,
                        measured,
                    };
                    self.push_request(i, sent);
                }
            }
            Some(s) => {
                while self.issuing
                    && self.conns[i].state == State::Up
                    && self.conns[i].inflight.len() < depth
                {
                    let c = &self.conns[i];
                    let m = s.index(c.gid, c.next_k);
                    if s.over(m) {
                        break;
                    }
                    let due = s.due(self.start, m);
                    if due > now {
                        break;
                    }
                    let measured = s.measured(m);
                    if measured {
                        self.counts.sent += 1;
                        if now.duration_since(due) > self.plan.opts.late {
                            self.counts.late += 1;
                        }
                    }
                    self.push_request(
                        i,
                        Sent {
                            due,
                            sent: now,
                            measured,
                        },
                    );
                    self.conns[i].next_k += 1;
                    self.progress = now;
                }
            }
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(s) = c.stream.as_mut() else { return };
        while c.wpos < c.wbuf.len() {
            match s.write(&c.wbuf[c.wpos..]) {
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    if !c.inflight.is_empty() {
                        self.counts.closed += 1;
                    }
                    self.close(i);
                    return;
                }
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
    }

    fn readable(&mut self, i: usize) {
        loop {
            let Some(s) = self.conns[i].stream.as_mut() else {
                return;
            };
            match s.read(&mut self.rbuf) {
                Ok(0) => {
                    let clean = self.conns[i].inflight.is_empty() && !self.plan.opts.idle;
                    if !clean {
                        self.counts.closed += 1;
                    }
                    self.close(i);
                    if clean {
                        // e.g. an HTTP server's keep-alive limit: reconnect at once.
                        self.conns[i].retry_at = Instant::now();
                    }
                    return;
                }
                Ok(n) => {
                    self.conns[i].rbuf.extend_from_slice(&self.rbuf[..n]);
                    if n < self.rbuf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    if !self.conns[i].inflight.is_empty() {
                        self.counts.closed += 1;
                    }
                    self.close(i);
                    return;
                }
            }
        }
        let now = Instant::now();
        let mut pos = 0;
        loop {
            let c = &mut self.conns[i];
            if pos >= c.rbuf.len() {
                break;
            }
            match parse_reply(
                &self.plan.opts.target.proto,
                &c.rbuf[pos..],
                &mut self.scratch,
            ) {
                Ok(None) => break,
                Ok(Some((n, o))) => {
                    pos += n;
                    self.progress = now;
                    let Some(sent) = c.inflight.pop_front() else {
                        self.counts.protocol_errors += 1;
                        self.close(i);
                        return;
                    };
                    self.publisher.answer();
                    if sent.measured && self.end.is_some_and(|end| now > end) {
                        // Read in the loop's last turn: it came after the end.
                        self.answered_after_end += 1;
                    } else if sent.measured {
                        let ns = now.duration_since(sent.due).as_nanos() as u64;
                        self.publisher.hist.saturating_record(ns.max(1));
                        match o {
                            Outcome::Found => self.counts.found += 1,
                            Outcome::NotFound => self.counts.not_found += 1,
                            Outcome::Temp => self.counts.temp += 1,
                            Outcome::Perm => self.counts.perm += 1,
                            Outcome::Stored => self.counts.stored += 1,
                        }
                        self.last = Some(now);
                    }
                }
                Err(()) => {
                    if now >= self.record_from {
                        self.counts.protocol_errors += 1;
                    }
                    self.close(i);
                    return;
                }
            }
        }
        self.conns[i].rbuf.drain(..pos);
        self.top_up(i, now);
    }

    fn event(&mut self, i: usize, now: Instant) {
        if self.conns[i].state == State::Connecting {
            let r = self.conns[i].stream.as_ref().map(Transport::connected);
            match r {
                Some(Ok(true)) => {
                    self.conns[i].state = State::Up;
                    self.counts.connects += 1;
                }
                Some(Ok(false)) => return,
                _ => {
                    self.counts.connect_errors += 1;
                    self.close(i);
                    return;
                }
            }
        }
        if self.conns[i].state != State::Up {
            return;
        }
        self.flush(i);
        self.readable(i);
        if self.conns[i].state == State::Up && self.conns[i].inflight.is_empty() {
            self.top_up(i, now);
        }
    }

    fn check_timeouts(&mut self, now: Instant) {
        let t = self.plan.opts.timeout;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            let late = c.state == State::Up
                && c.inflight
                    .front()
                    .is_some_and(|s| now.duration_since(s.sent) > t);
            if late {
                self.counts.timeouts += c.measured_in_flight();
                self.close(i);
            }
        }
    }

    /// How long the next poll may wait: until the next due request of a
    /// connection with room for it (open loop: `true`, wait precisely), at
    /// most TICK.
    fn poll_timeout(&self, now: Instant) -> (Duration, bool) {
        let mut longest = TICK;
        if let Some(end) = self.end {
            longest = longest.min(end.saturating_duration_since(now));
        }
        let Some(s) = &self.plan.schedule else {
            return (longest, false);
        };
        if !self.issuing {
            return (longest, false);
        }
        let depth = self.plan.opts.depth;
        let next = self
            .conns
            .iter()
            .filter(|c| c.state == State::Up && c.inflight.len() < depth)
            .map(|c| s.index(c.gid, c.next_k))
            .filter(|&m| !s.over(m))
            .map(|m| s.due(self.start, m))
            .min();
        match next {
            None => (longest, false),
            Some(at) if at <= now + SPIN => (Duration::ZERO, false),
            Some(at) => (at.saturating_duration_since(now).min(longest), true),
        }
    }

    fn run_until(&mut self, events: &mut Events, until: impl Fn(&Self, Instant) -> bool) {
        loop {
            let now = Instant::now();
            if until(self, now) {
                return;
            }
            self.connect_some(now);
            let (timeout, precise) = self.poll_timeout(now);
            if precise {
                // Waiting for a request that is not due yet (a connection
                // is up with room for it) is no stall: count mode's
                // `--timeout` without progress runs from here.
                self.progress = now;
            }
            let waited = if precise {
                timer::precise_wait(&self.poll, timeout)
            } else {
                None
            };
            let result = match waited {
                // Timed out with nothing ready: no need to ask epoll.
                Some(false) => {
                    events.clear();
                    Ok(())
                }
                Some(true) => self.poll.poll(events, Some(Duration::ZERO)),
                None => self.poll.poll(events, Some(timeout)),
            };
            if let Err(e) = result {
                if e.kind() != io::ErrorKind::Interrupted {
                    report::warn(&format!("poll: {e}"));
                    return;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                self.event(ev.token().0, now);
            }
            self.check_timeouts(now);
            // Connections with room: due requests (open loop), or those that
            // came up without requests (e.g. after a reconnect).
            if self.issuing {
                let open = self.plan.schedule.is_some();
                for i in 0..self.conns.len() {
                    let c = &self.conns[i];
                    if c.state == State::Up && (c.inflight.is_empty() || open) {
                        self.top_up(i, now);
                    }
                }
            }
            self.publisher
                .publish(&self.plan.shared, &self.counts, now, false);
        }
    }

    /// Count mode: every request sent (budget spent or schedule over) and answered.
    fn all_done(&self) -> bool {
        let drained = self.conns.iter().all(|c| c.inflight.is_empty());
        if !drained {
            return false;
        }
        match (&self.plan.schedule, &self.plan.budget) {
            (Some(s), _) => self.conns.iter().all(|c| s.over(s.index(c.gid, c.next_k))),
            (None, Some(b)) => !self.issuing || b.load(Ordering::Relaxed) <= 0,
            (None, None) => false,
        }
    }
}

/// One thread: its `nconns` connections, numbered from `gid_base` over every thread.
pub fn run_thread(plan: &Plan, nconns: usize, gid_base: usize, seed: u64) -> ThreadResult {
    let o = plan.opts;
    let poll = Poll::new().expect("mio poll");
    if plan.schedule.is_some() {
        timer::fine_slack();
    }
    let far = Instant::now() + Duration::from_secs(1 << 30);
    let mut l = Loop {
        plan,
        poll,
        conns: (0..nconns)
            .map(|i| Conn::new((gid_base + i) as u64))
            .collect(),
        rng: fastrand::Rng::with_seed(seed),
        rbuf: vec![0; 64 * 1024],
        scratch: Vec::new(),
        counts: Counts::default(),
        publisher: Publisher::new(),
        start: far,
        record_from: far,
        end: None,
        last: None,
        miss_serial: 0,
        issuing: false,
        progress: Instant::now(),
        answered_after_end: 0,
    };
    let mut events = Events::with_capacity(1024);
    // Connect everything first (bounded: 30 s at most).
    let deadline = Instant::now() + Duration::from_secs(30);
    l.run_until(&mut events, |l, now| {
        now >= deadline || l.conns.iter().all(|c| c.state == State::Up)
    });
    plan.barrier.wait();
    let start = *plan.shared.start.get_or_init(Instant::now);
    l.start = start;
    l.record_from = start + o.warmup;
    if o.count.is_none() {
        l.end = Some(l.record_from + o.duration);
    }
    // `--idle` never issues: nothing is sent, nothing is waited for.
    l.issuing = !o.idle;
    l.progress = start;
    for i in 0..l.conns.len() {
        l.top_up(i, start);
    }
    match l.end {
        Some(end) => l.run_until(&mut events, |_, now| now >= end),
        None => l.run_until(&mut events, |l, now| {
            (now >= l.record_from && l.all_done())
                || now.duration_since(l.progress.max(l.record_from)) > o.timeout
        }),
    }
    l.publisher
        .publish(&plan.shared, &l.counts, Instant::now(), true);
    let (mut never_sent, mut unanswered) = (0, l.answered_after_end);
    if let Some(s) = &plan.schedule {
        for c in &l.conns {
            never_sent += s.remaining(c.gid, c.next_k);
            unanswered += c.measured_in_flight();
        }
    }
    ThreadResult {
        counts: l.counts,
        last: l.last,
        open_conns: l.conns.iter().filter(|c| c.state == State::Up).count(),
        never_sent,
        unanswered,
    }
}
