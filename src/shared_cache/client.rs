//! One worker's connection to the shared cache (Redis or Valkey): owned by
//! the worker, registered on its `Poll`, driven by events, ending in
//! [`Done`] completions the worker turns into answers and cache writes — the
//! same shape as the HTTP backend.
//!
//! Commands are pipelined (RESP answers come back in order): they are
//! buffered as lookups ask, and leave together at the end of the event
//! loop's turn ([`L2::send_queued`]); each waits in `pending` with its
//! deadline (`timeout`, one round trip). A command whose
//! answer is late completes as a miss at once, and its answer is dropped
//! when it comes; a connection that stays silent well past that is closed.
//! While the connection is down (refused, reset, garbage, `-ERR` to
//! `HELLO`...) every command completes as a miss at once and the connection
//! is retried with a capped backoff; one log line per change of state.
//!
//! On connect: `HELLO 3` (with `AUTH` when the URL has a password, and a
//! client name), `SELECT` when the URL names a database, and on the worker
//! that watches for changes `CLIENT TRACKING ON BCAST PREFIX <prefix>
//! NOLOOP`: Redis then pushes an `invalidate` message for every key under
//! the prefix that another connection changes, which [`L2::take_invalidated`]
//! hands to the worker. The password is never logged.

use super::value::{self, Entry};
use super::OwnWrites;
use crate::codec::resp::{self, Value};
use crate::config::{RedisAddr, SharedCache};
use crate::transport::Transport;
use mio::{Interest, Registry, Token};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound on connecting, the TLS handshake and the greeting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait before a reconnect; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Commands in flight on one connection; past it a command is a miss at once.
const MAX_PENDING: usize = 4096;
/// A connection silent this many times `timeout` (and at least
/// [`MIN_SILENCE`]) with commands pending is closed.
const SILENCE_FACTOR: u32 = 20;
const MIN_SILENCE: Duration = Duration::from_secs(1);
/// Largest bulk reply accepted (a value, a push).
const MAX_REPLY_BYTES: usize = 16 << 20;
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Counters shared by the workers (the metrics page reads them).
#[derive(Default)]
pub struct L2Stats {
    pub hits: AtomicU64,
    pub stale_hits: AtomicU64,
    pub misses: AtomicU64,
    pub writes: AtomicU64,
    pub invalidations: AtomicU64,
    pub claims_won: AtomicU64,
    pub claims_lost: AtomicU64,
    /// Errors by kind: no connection, late answer, error reply, garbage.
    pub err_unavailable: AtomicU64,
    pub err_timeout: AtomicU64,
    pub err_reply: AtomicU64,
    pub err_protocol: AtomicU64,
    /// Workers whose connection is up (a gauge).
    pub connected: AtomicU64,
    /// Purges received on the admin socket.
    pub purges: AtomicU64,
}

/// A finished command.
#[derive(Debug)]
pub enum Done {
    /// `GET`: the entry, or `None` (a miss, or an error: counted, not said).
    Get { tag: u64, entry: Option<Entry> },
    /// `SET ... NX` on a claim: whether this node may fetch the key.
    Claim { tag: u64, won: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello,
    Select,
    Tracking,
    Get(u64),
    Claim(u64),
    Set,
}

struct Pending {
    kind: Kind,
    /// A `SET` counted in [`OwnWrites`]: its key, to take back if the write
    /// fails (no invalidation will come for it).
    undo: Option<Vec<u8>>,
    deadline: Instant,
    /// Completed already as a miss (late): its answer is dropped.
    abandoned: bool,
}

enum State {
    /// Not connected; try again at `retry_at`.
    Down {
        retry_at: Instant,
    },
    /// TCP (or Unix) connect, then TLS, in progress.
    Connecting {
        since: Instant,
    },
    /// Greeting sent (HELLO, SELECT, TRACKING), answers awaited.
    Greeting {
        since: Instant,
    },
    Ready,
}

pub struct L2 {
    cfg: Arc<SharedCache>,
    token: Token,
    name: String,
    /// This connection receives invalidations (one worker per node).
    tracking: bool,
    state: State,
    io: Option<Transport>,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    pending: VecDeque<Pending>,
    /// GETs to send later (a claim's wait), by time.
    delayed: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    done: Vec<Done>,
    invalidated: Vec<Vec<u8>>,
    /// Every key may have changed (the tracking connection came back, or
    /// the server flushed): the worker drops what the first-level cache holds.
    flush_all: bool,
    backoff: Duration,
    /// Connects tried (the next address each time).
    attempts: usize,
    /// The last problem logged (one line per change).
    down_reason: Option<String>,
    stats: Arc<L2Stats>,
    /// This node's writes that worker 0 will hear of (see [`OwnWrites`]).
    own_writes: Arc<OwnWrites>,
    read_buf: Box<[u8]>,
}

impl L2 {
    pub fn new(
        cfg: Arc<SharedCache>,
        token: Token,
        worker: usize,
        tracking: bool,
        stats: Arc<L2Stats>,
        own_writes: Arc<OwnWrites>,
        now: Instant,
    ) -> L2 {
        L2 {
            cfg,
            token,
            name: format!("httpmapd-{}-w{worker}", std::process::id()),
            tracking,
            state: State::Down { retry_at: now },
            io: None,
            wbuf: Vec::new(),
            wpos: 0,
            rbuf: Vec::new(),
            pending: VecDeque::new(),
            delayed: BinaryHeap::new(),
            done: Vec::new(),
            invalidated: Vec::new(),
            flush_all: false,
            backoff: MIN_BACKOFF,
            attempts: 0,
            down_reason: None,
            stats,
            own_writes,
            read_buf: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
        }
    }

    /// An IO error in words: a TLS failure as the HTTPS servers' are
    /// worded ([`crate::tls::describe`]: "unknown CA", "name mismatch"...).
    fn io_text(&self, e: &io::Error) -> String {
        match self.cfg.tls_name() {
            Some(name) => crate::tls::io_text(e, &name),
            None => e.to_string(),
        }
    }

    /// Closes the connection (a reload replaced it).
    pub fn close(&mut self, registry: &Registry) {
        if let Some(mut io) = self.io.take() {
            let _ = registry.deregister(io.socket());
        }
        if self.is_ready() {
            self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.fail_pending();
        self.state = State::Down {
            retry_at: Instant::now() + MAX_BACKOFF,
        };
    }

    pub fn config(&self) -> &Arc<SharedCache> {
        &self.cfg
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Completions since the last call.
    pub fn completions(&mut self) -> std::vec::Drain<'_, Done> {
        self.done.drain(..)
    }

    /// Keys another connection changed (raw Redis keys), and whether every
    /// key must be taken as changed.
    pub fn take_invalidated(&mut self) -> (Vec<Vec<u8>>, bool) {
        (
            std::mem::take(&mut self.invalidated),
            std::mem::replace(&mut self.flush_all, false),
        )
    }

    /// The earliest time something is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let state = match self.state {
            State::Down { retry_at } => Some(retry_at),
            State::Connecting { since } | State::Greeting { since } => {
                Some(since + CONNECT_TIMEOUT)
            }
            State::Ready => None,
        };
        let pending = self
            .pending
            .iter()
            .find(|p| !p.abandoned)
            .map(|p| p.deadline);
        let delayed = self.delayed.peek().map(|Reverse((t, _, _))| *t);
        [state, pending, delayed].into_iter().flatten().min()
    }

    /// `GET key`; completes with [`Done::Get`].
    pub fn get(&mut self, registry: &Registry, key: &[u8], tag: u64, now: Instant) {
        if !self.can_send() {
            self.stats.err_unavailable.fetch_add(1, Ordering::Relaxed);
            self.done.push(Done::Get { tag, entry: None });
            return;
        }
        resp::write_command(&mut self.wbuf, &[b"GET", key]);
        self.push(Kind::Get(tag), now);
        let _ = registry;
    }

    /// `GET key` at `at` (a claim's wait).
    pub fn get_at(&mut self, key: &[u8], tag: u64, at: Instant) {
        self.delayed.push(Reverse((at, tag, key.to_vec())));
    }

    /// `SET claim node NX PX ms`; completes with [`Done::Claim`] (won when
    /// the shared cache cannot be asked: this node fetches).
    pub fn claim(&mut self, registry: &Registry, key: &[u8], px: Duration, tag: u64, now: Instant) {
        if !self.can_send() {
            self.done.push(Done::Claim { tag, won: true });
            return;
        }
        let ms = px.as_millis().max(1).to_string();
        resp::write_command(
            &mut self.wbuf,
            &[
                b"SET",
                key,
                self.name.as_bytes(),
                b"NX",
                b"PX",
                ms.as_bytes(),
            ],
        );
        self.push(Kind::Claim(tag), now);
        let _ = registry;
    }

    /// `SET key value PX ms`, nothing waits for it. False when not sent.
    /// `own`: the write is counted in [`OwnWrites`] (taken back if it fails).
    pub fn set(
        &mut self,
        registry: &Registry,
        key: &[u8],
        val: &[u8],
        px: Duration,
        own: bool,
        now: Instant,
    ) -> bool {
        if !self.can_send() || px.is_zero() {
            return false;
        }
        let ms = px.as_millis().max(1).to_string();
        resp::write_command(&mut self.wbuf, &[b"SET", key, val, b"PX", ms.as_bytes()]);
        self.push(Kind::Set, now);
        if own {
            if let Some(p) = self.pending.back_mut() {
                p.undo = Some(key.to_vec());
            }
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let _ = registry;
        true
    }

    /// `UNLINK key`, nothing waits for it (a claim released).
    pub fn unlink(&mut self, key: &[u8], now: Instant) {
        if self.can_send() {
            resp::write_command(&mut self.wbuf, &[b"UNLINK", key]);
            self.push(Kind::Set, now);
        }
    }

    /// Sends what this turn of the event loop queued: commands are only
    /// buffered as lookups ask for them, and leave together in one write
    /// (the pipelining that lets one connection carry many lookups).
    pub fn send_queued(&mut self, registry: &Registry, now: Instant) {
        if self.wpos < self.wbuf.len() && !matches!(self.state, State::Connecting { .. }) {
            self.flush(registry, now);
        }
    }

    fn can_send(&self) -> bool {
        self.is_ready() && self.pending.len() < MAX_PENDING
    }

    fn push(&mut self, kind: Kind, now: Instant) {
        self.pending.push_back(Pending {
            kind,
            undo: None,
            deadline: now + self.cfg.timeout,
            abandoned: false,
        });
    }

    /// A pending `SET` failed or will never be answered: if it was counted
    /// as this node's own write, take the count back.
    fn undo(&self, p: &Pending) {
        if let Some(k) = &p.undo {
            self.own_writes.take(k);
        }
    }

    /// The connection is gone with commands unanswered: each completes as
    /// a miss (a claim as won: the servers are asked), and a `SET` counted
    /// as this node's own write is taken back (worker 0 will never hear of
    /// it, and a count left behind would hide another node's change).
    fn fail_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            self.undo(&p);
            if p.abandoned {
                continue;
            }
            match p.kind {
                Kind::Get(tag) => self.done.push(Done::Get { tag, entry: None }),
                Kind::Claim(tag) => self.done.push(Done::Claim { tag, won: true }),
                _ => {}
            }
        }
    }

    /// Timers: reconnects, late answers, a claim's delayed GETs.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        match self.state {
            State::Down { retry_at } if now >= retry_at => self.connect(registry, now),
            State::Connecting { since } | State::Greeting { since }
                if now >= since + CONNECT_TIMEOUT =>
            {
                self.down(registry, "no answer within 2s of connecting".into(), now)
            }
            _ => {}
        }
        for p in self.pending.iter_mut() {
            if p.abandoned || p.deadline > now {
                continue;
            }
            p.abandoned = true;
            self.stats.err_timeout.fetch_add(1, Ordering::Relaxed);
            match p.kind {
                Kind::Get(tag) => self.done.push(Done::Get { tag, entry: None }),
                Kind::Claim(tag) => self.done.push(Done::Claim { tag, won: true }),
                _ => {}
            }
        }
        // Silent far too long with commands waiting: a hung server.
        let silence = (self.cfg.timeout * SILENCE_FACTOR).max(MIN_SILENCE);
        if let Some(p) = self.pending.front() {
            if now >= p.deadline + silence {
                self.down(
                    registry,
                    format!("no answer for {}ms", silence.as_millis()),
                    now,
                );
            }
        }
        while let Some(Reverse((t, _, _))) = self.delayed.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, tag, key))) = self.delayed.pop() else {
                break;
            };
            self.get(registry, &key, tag, now);
        }
    }

    fn connect(&mut self, registry: &Registry, now: Instant) {
        let t = &self.cfg.target;
        let io = match &t.addr {
            RedisAddr::Tcp { host, .. } => {
                // Resolved when the file was loaded; each reconnect takes
                // the next address.
                let n = self.cfg.addrs.len().max(1);
                let Some(&addr) = self.cfg.addrs.get(self.attempts % n) else {
                    return self.down(registry, format!("{host} has no address"), now);
                };
                self.attempts += 1;
                match mio::net::TcpStream::connect(addr) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        match &self.cfg.tls {
                            None => Transport::Plain(s),
                            Some(tls) => {
                                match Transport::tls(s, tls.config.clone(), tls.name_for(host)) {
                                    Ok(io) => io,
                                    Err(e) => return self.down(registry, format!("TLS: {e}"), now),
                                }
                            }
                        }
                    }
                    Err(e) => return self.down(registry, format!("connect: {e}"), now),
                }
            }
            RedisAddr::Unix(p) => match mio::net::UnixStream::connect(p) {
                Ok(s) => Transport::Unix(s),
                Err(e) => return self.down(registry, format!("connect: {e}"), now),
            },
        };
        let mut io = io;
        if let Err(e) = registry.register(
            io.socket(),
            self.token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return self.down(registry, format!("register: {e}"), now);
        }
        self.io = Some(io);
        self.state = State::Connecting { since: now };
    }

    /// The greeting: HELLO 3 (AUTH, SETNAME), SELECT, CLIENT TRACKING.
    fn greet(&mut self, registry: &Registry, now: Instant) {
        let cfg = self.cfg.clone();
        let t = &cfg.target;
        resp::write_command(&mut self.wbuf, &super::hello_args(t, &self.name));
        self.push(Kind::Hello, now);
        if t.db != 0 {
            let db = t.db.to_string();
            resp::write_command(&mut self.wbuf, &[b"SELECT", db.as_bytes()]);
            self.push(Kind::Select, now);
        }
        if self.tracking {
            let prefix = self.cfg.prefix.clone();
            resp::write_command(
                &mut self.wbuf,
                &[
                    b"CLIENT",
                    b"TRACKING",
                    b"ON",
                    b"BCAST",
                    b"PREFIX",
                    prefix.as_bytes(),
                    b"NOLOOP",
                ],
            );
            self.push(Kind::Tracking, now);
        }
        // The greeting's own deadlines: the connect timeout, not `timeout`.
        for p in self.pending.iter_mut() {
            p.deadline = now + CONNECT_TIMEOUT;
        }
        self.state = State::Greeting { since: now };
        self.flush(registry, now);
    }

    /// The connection is lost or refused: every command waiting completes
    /// as a miss, and a reconnect is scheduled.
    fn down(&mut self, registry: &Registry, why: String, now: Instant) {
        if let Some(mut io) = self.io.take() {
            let _ = registry.deregister(io.socket());
        }
        if self.is_ready() {
            self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.fail_pending();
        self.wbuf.clear();
        self.wpos = 0;
        self.rbuf.clear();
        // One line when it goes down; the reasons of the retries that follow
        // (refused, reset...) only at debug.
        if self.down_reason.is_none() {
            crate::warn!(
                "shared cache {} is down: {why}; lookups go on without it, retrying in {}ms",
                self.cfg.target.describe(),
                self.backoff.as_millis()
            );
            self.down_reason = Some(why);
        } else {
            crate::debug!(
                "shared cache {}: still down: {why}",
                self.cfg.target.describe()
            );
        }
        self.state = State::Down {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// A readiness event for the connection.
    pub fn event(&mut self, registry: &Registry, now: Instant) {
        loop {
            let Some(io) = self.io.as_mut() else { return };
            match self.state {
                State::Connecting { .. } => match io.connected() {
                    Ok(true) => match io.handshake() {
                        Ok(true) => self.greet(registry, now),
                        Ok(false) => return,
                        Err(e) => {
                            return self.down(
                                registry,
                                format!("TLS handshake: {}", self.io_text(&e)),
                                now,
                            )
                        }
                    },
                    Ok(false) => return,
                    Err(e) => return self.down(registry, format!("connect: {e}"), now),
                },
                State::Greeting { .. } | State::Ready => {
                    if !self.flush(registry, now) {
                        return;
                    }
                    return self.read(registry, now);
                }
                State::Down { .. } => return,
            }
        }
    }

    /// Writes what is buffered; false if the connection went down.
    fn flush(&mut self, registry: &Registry, now: Instant) -> bool {
        let Some(io) = self.io.as_mut() else {
            return false;
        };
        if matches!(self.state, State::Connecting { .. }) {
            return true;
        }
        while self.wpos < self.wbuf.len() {
            match io.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    self.down(registry, "write: connection closed".into(), now);
                    return false;
                }
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.down(registry, format!("write: {e}"), now);
                    return false;
                }
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        match io.flush() {
            Ok(_) => true,
            Err(e) => {
                self.down(registry, format!("write: {e}"), now);
                false
            }
        }
    }

    fn read(&mut self, registry: &Registry, now: Instant) {
        loop {
            let Some(io) = self.io.as_mut() else { return };
            match io.read(&mut self.read_buf) {
                Ok(0) => {
                    return self.down(registry, "the server closed the connection".into(), now)
                }
                Ok(n) => self.rbuf.extend_from_slice(&self.read_buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = format!("read: {}", self.io_text(&e));
                    return self.down(registry, why, now);
                }
            }
            let mut used = 0;
            loop {
                match resp::parse(&self.rbuf[used..], MAX_REPLY_BYTES) {
                    Ok(Some((v, n))) => {
                        used += n;
                        if !self.answer(registry, v, now) {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.err_protocol.fetch_add(1, Ordering::Relaxed);
                        return self.down(registry, format!("not the Redis protocol: {e}"), now);
                    }
                }
            }
            self.rbuf.drain(..used);
        }
    }

    /// One reply (or push). False if the connection went down.
    fn answer(&mut self, registry: &Registry, v: Value, now: Instant) -> bool {
        if let Value::Push(items) = &v {
            self.push_message(items);
            return true;
        }
        let Some(p) = self.pending.pop_front() else {
            self.stats.err_protocol.fetch_add(1, Ordering::Relaxed);
            self.down(registry, "an answer nothing asked for".into(), now);
            return false;
        };
        let err = |v: &Value| match v {
            Value::Error(e) => Some(String::from_utf8_lossy(e).into_owned()),
            _ => None,
        };
        match p.kind {
            Kind::Hello | Kind::Select | Kind::Tracking => {
                if let Some(e) = err(&v) {
                    let what = match p.kind {
                        Kind::Hello => {
                            "HELLO 3 (Redis 6 or later, or Valkey, is needed; AUTH rides on it)"
                        }
                        Kind::Select => "SELECT",
                        _ => "CLIENT TRACKING",
                    };
                    self.stats.err_reply.fetch_add(1, Ordering::Relaxed);
                    self.down(registry, format!("{what} refused: {e}"), now);
                    return false;
                }
                if self
                    .pending
                    .iter()
                    .all(|q| !matches!(q.kind, Kind::Hello | Kind::Select | Kind::Tracking))
                {
                    self.state = State::Ready;
                    self.backoff = MIN_BACKOFF;
                    self.stats.connected.fetch_add(1, Ordering::Relaxed);
                    if self.down_reason.take().is_some() {
                        crate::info!("shared cache {} is up again", self.cfg.target.describe());
                    }
                    if self.tracking {
                        // Changes made while we were not listening are unknown.
                        self.flush_all = true;
                    }
                }
            }
            // A write (or an unlink): answered late or not, an error means
            // no invalidation will come for it.
            Kind::Set => {
                if err(&v).is_some() {
                    self.stats.err_reply.fetch_add(1, Ordering::Relaxed);
                    self.undo(&p);
                }
            }
            _ if p.abandoned => {}
            Kind::Get(tag) => {
                let entry = match &v {
                    Value::Bulk(b) => value::decode(b),
                    Value::Null => None,
                    other => {
                        if err(other).is_some() {
                            self.stats.err_reply.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                };
                self.done.push(Done::Get { tag, entry });
            }
            Kind::Claim(tag) => {
                let won = match &v {
                    Value::Simple(s) => s == b"OK",
                    Value::Null => false,
                    // An error: nobody holds it for us; fetch.
                    _ => {
                        self.stats.err_reply.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                };
                self.done.push(Done::Claim { tag, won });
            }
        }
        true
    }

    /// `>invalidate [keys]` (or `null`: everything).
    fn push_message(&mut self, items: &[Value]) {
        let [kind, keys, ..] = items else { return };
        if kind.as_bytes() != Some(b"invalidate") {
            return;
        }
        match keys {
            Value::Array(keys) => {
                for k in keys {
                    if let Some(k) = k.as_bytes() {
                        self.invalidated.push(k.to_vec());
                    }
                }
            }
            Value::Null => self.flush_all = true,
            _ => {}
        }
    }
}
