//! One event-loop thread: its listeners, its client sessions, its backend.
//!
//! A worker owns a `mio::Poll`, the client connections it accepted (in a
//! `Slab`), and a [`Backend`] with its own keep-alive pools. A request goes:
//! bytes → codec → fold the key → shared [`Cache`] → answer now, or wait for
//! a fetch (this worker's or another's: the cache coalesces across workers).
//! Answers for sessions of another worker travel over that worker's channel
//! with a `mio::Waker`. Per connection, answers leave in request order. The
//! worker never closes an idle client connection: Postfix pays a one-second
//! stall for each close.

use crate::backend::{self as backend_mod, Backend, Completion, MapServers, Outcome};
use crate::cache::{self, Cache, Lookup, Ttls, Waiter};
use crate::codec::{netstring, tcp_table};
use crate::config::{Config, Listen};
use crate::log::RateLimit;
use crate::metrics::MapCounters;
use crate::net::{Listener, Stream};
use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens: sessions from 0, backend connections from here, listeners and the
/// waker at the very top.
const BACKEND_TOKEN_BASE: usize = 1 << 40;
const WAKER_TOKEN: Token = Token(usize::MAX);
const LISTENER_TOKEN_TOP: usize = usize::MAX - 1;
/// Requests one connection may have waiting for answers before we stop reading it.
const MAX_PENDING_PER_SESSION: usize = 256;
/// Bytes of answers owed to one connection (written or waiting in order
/// behind a slower lookup) before we stop reading it; reading resumes once
/// they drain below half of it, whatever made it stop.
const MAX_WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// Connections accepted per listener event before other work gets a turn.
const ACCEPT_BATCH: usize = 256;
/// Readiness events handled per poll.
const EVENTS_CAPACITY: usize = 1024;
/// After EMFILE/ENFILE (or `max_clients`), accepting pauses this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Overhead of a netstring around a query: up to 20 digits, ':' and ','.
const NETSTRING_OVERHEAD_BYTES: usize = 22;

static LOG_TOO_LONG: RateLimit = RateLimit::new(Duration::from_secs(10));
static LOG_TEMP: RateLimit = RateLimit::new(Duration::from_secs(10));
static LOG_STALE: RateLimit = RateLimit::new(Duration::from_secs(60));
/// Malformed requests, one limiter per protocol (a noisy tcp_table client
/// does not hide a broken socketmap one).
static LOG_BAD_TCP_TABLE: RateLimit = RateLimit::new(Duration::from_secs(10));
static LOG_BAD_SOCKETMAP: RateLimit = RateLimit::new(Duration::from_secs(10));
static LOG_ACCEPT: RateLimit = RateLimit::new(Duration::from_secs(60));
static LOG_MAX_CLIENTS: RateLimit = RateLimit::new(Duration::from_secs(60));
static LOG_DENIED: RateLimit = RateLimit::new(Duration::from_secs(10));

/// An answer on its way to a client.
#[derive(Debug, Clone)]
pub enum Answer {
    Found(Arc<[u8]>),
    NotFound,
    Temp(Arc<str>),
}

/// What a worker receives from the others and from the control thread.
pub enum Msg {
    Answer {
        session: u32,
        gen: u64,
        seq: u64,
        answer: Answer,
    },
    /// Stop accepting, finish what is in flight, then return.
    Shutdown,
    /// A new configuration: swap the shared state, the listeners and the backend.
    Reload {
        shared: Arc<Shared>,
        listeners: Vec<ListenerUpdate>,
    },
}

/// How a listener's clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    TcpTable {
        map: u16,
    },
    /// Limits in bytes: a query's netstring payload, a reply's payload.
    Socketmap {
        max_query: u32,
        max_reply: u32,
    },
}

/// Counters shared by every worker (the metrics page reads them).
#[derive(Default)]
pub struct Counters {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
}

/// Counters that outlive reloads.
pub struct Stats {
    pub counters: Counters,
    /// By map id (ids are stable across reloads).
    pub maps: Box<[MapCounters]>,
    pub reloads: crate::metrics::ReloadStats,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            counters: Counters::default(),
            maps: (0..crate::config::MAX_MAPS)
                .map(|_| MapCounters::default())
                .collect(),
            reloads: crate::metrics::ReloadStats::default(),
        }
    }
}

/// What every worker shares; replaced as a whole on reload.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub cache: Arc<Cache>,
    pub stats: Arc<Stats>,
    /// By map id; `None`: a map removed by a reload.
    pub maps: Vec<Option<MapServers>>,
    /// By map id (zero TTLs for removed maps: nothing is stored).
    pub ttls: Vec<Ttls>,
    /// By map id: the generation in this configuration's cache keys (see
    /// [`crate::cache`]); it changes when a reload changes a map's answers.
    pub gens: Vec<u32>,
    pub map_by_name: HashMap<Vec<u8>, u16>,
    pub mailboxes: Arc<Vec<(Sender<Msg>, Arc<Waker>)>>,
}

impl Shared {
    /// The config of map `id`, if it still exists.
    pub fn map(&self, id: u16) -> Option<&Arc<crate::config::MapConfig>> {
        self.maps
            .get(id as usize)
            .and_then(|m| m.as_ref())
            .map(|m| &m.cfg)
    }

    fn map_name(&self, id: u16) -> &str {
        self.map(id).map_or("(removed)", |m| m.name.as_str())
    }

    fn ttls(&self, id: u16) -> Ttls {
        self.ttls.get(id as usize).copied().unwrap_or(Ttls::OFF)
    }

    fn gen(&self, id: u16) -> u32 {
        self.gens.get(id as usize).copied().unwrap_or_default()
    }
}

/// A listener for a worker after a reload: its address and protocol, and a
/// new socket when the address is new (else the worker keeps its own).
pub struct ListenerUpdate {
    pub listen: Listen,
    pub proto: Proto,
    pub socket: Option<Listener>,
}

enum Slot {
    Waiting,
    Ready(Vec<u8>),
}

#[derive(PartialEq, Eq)]
enum SessionState {
    Open,
    /// Answer what is owed, flush, then close (bad framing, over-long line).
    Closing,
}

struct Session {
    stream: Stream,
    proto: Proto,
    /// The client's address (None: a Unix socket client), for log lines.
    peer: Option<std::net::SocketAddr>,
    gen: u64,
    state: SessionState,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Answers owed, in request order: `pending[i]` is request `first_seq + i`.
    pending: VecDeque<Slot>,
    /// Bytes of the `Slot::Ready` answers in `pending`.
    queued_bytes: usize,
    first_seq: u64,
    next_seq: u64,
    /// Reading stopped for backpressure; resume when answers drain.
    paused: bool,
    /// The client closed its side.
    eof: bool,
    /// An event said the client closed its side: read until EOF.
    drain_to_eof: bool,
}

impl Session {
    /// Bytes of answers owed: unsent in the write buffer, and ready behind
    /// a lookup still awaited.
    fn owed_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos + self.queued_bytes
    }

    /// Whether reading must stop until answers drain.
    fn over_mark(&self) -> bool {
        self.pending.len() >= MAX_PENDING_PER_SESSION || self.owed_bytes() >= MAX_WRITE_BUFFER_BYTES
    }

    /// Whether a paused session has drained enough to read again.
    fn under_resume_mark(&self) -> bool {
        self.pending.len() < MAX_PENDING_PER_SESSION / 2
            && self.owed_bytes() < MAX_WRITE_BUFFER_BYTES / 2
    }

    /// Answers the session's newest request (its sequence number already
    /// taken) at once: straight into the write buffer when nothing is owed
    /// before it, else queued behind the answers still awaited.
    fn emit(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.pending.is_empty() {
            self.first_seq = self.next_seq;
            encode(&mut self.wbuf);
        } else {
            let mut v = Vec::new();
            encode(&mut v);
            self.queued_bytes += v.len();
            self.pending.push_back(Slot::Ready(v));
        }
    }
}

pub struct Worker {
    id: u32,
    poll: Poll,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    listeners: Vec<(Listener, Proto, Listen)>,
    sessions: Slab<Session>,
    backend: Backend,
    /// Backends of earlier configurations, finishing their fetches.
    old_backends: Vec<Backend>,
    next_gen: u64,
    stopping: bool,
    accept_paused_until: Option<Instant>,
    read_buf: Box<[u8]>,
    key_buf: Vec<u8>,
    fold_buf: Vec<u8>,
    ckey_buf: Vec<u8>,
}

impl Worker {
    pub fn new(
        id: u32,
        poll: Poll,
        shared: Arc<Shared>,
        rx: Receiver<Msg>,
        listeners: Vec<(Listener, Proto, Listen)>,
    ) -> io::Result<Worker> {
        let backend = Backend::new(
            BACKEND_TOKEN_BASE,
            &shared.maps,
            (id as usize, shared.cfg.daemon.workers),
            shared.cache.epoch(),
        );
        let mut w = Worker {
            id,
            poll,
            shared,
            rx,
            listeners,
            sessions: Slab::new(),
            backend,
            old_backends: Vec::new(),
            next_gen: 1,
            stopping: false,
            accept_paused_until: None,
            read_buf: vec![0; 64 * 1024].into_boxed_slice(),
            key_buf: Vec::new(),
            fold_buf: Vec::new(),
            ckey_buf: Vec::new(),
        };
        for (i, (l, _, _)) in w.listeners.iter_mut().enumerate() {
            w.poll
                .registry()
                .register(l, Token(LISTENER_TOKEN_TOP - i), Interest::READABLE)?;
        }
        Ok(w)
    }

    fn max_line(&self) -> usize {
        self.shared.cfg.daemon.max_request_bytes
    }

    /// Runs until shut down and drained.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut timeout = std::iter::once(&self.backend)
                .chain(self.old_backends.iter())
                .filter_map(Backend::next_deadline)
                .min()
                .map(|t| t.saturating_duration_since(now));
            if let Some(t) = self.accept_paused_until {
                let d = t.saturating_duration_since(now);
                timeout = Some(timeout.map_or(d, |x| x.min(d)));
            }
            if self.stopping {
                timeout = Some(timeout.map_or(Duration::from_millis(50), |x| {
                    x.min(Duration::from_millis(50))
                }));
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::error!("worker {}: poll failed: {e}", self.id);
                    return;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER_TOKEN {
                    self.drain_mailbox(now);
                } else if t.0 > LISTENER_TOKEN_TOP - self.listeners.len()
                    && t.0 <= LISTENER_TOKEN_TOP
                {
                    self.accept(LISTENER_TOKEN_TOP - t.0);
                } else if t.0 >= BACKEND_TOKEN_BASE {
                    let registry = self.poll.registry();
                    if self.backend.owns(t) {
                        self.backend.event(registry, ev, now);
                    } else if let Some(b) = self.old_backends.iter_mut().find(|b| b.owns(t)) {
                        b.event(registry, ev, now);
                    }
                } else {
                    self.session_event(t.0, ev.is_read_closed() || ev.is_error(), now);
                }
                self.handle_completions(now);
            }
            if let Some(t) = self.accept_paused_until {
                if now >= t {
                    self.accept_paused_until = None;
                    for i in 0..self.listeners.len() {
                        self.accept(i);
                    }
                }
            }
            let registry = self.poll.registry();
            self.backend.expire(registry, now);
            for b in &mut self.old_backends {
                b.expire(registry, now);
            }
            self.handle_completions(now);
            // An earlier configuration's backend goes once its fetches are done
            // (dropping it closes its pooled connections).
            self.old_backends.retain(|b| b.in_flight() > 0);
            if self.stopping {
                let deadline = *drain_deadline.get_or_insert_with(|| {
                    let longest = self
                        .shared
                        .cfg
                        .maps
                        .iter()
                        .map(|m| m.lookup_timeout)
                        .max()
                        .unwrap_or_default();
                    now + longest + Duration::from_secs(1)
                });
                let owed = self
                    .sessions
                    .iter()
                    .any(|(_, s)| !s.pending.is_empty() || s.wpos < s.wbuf.len());
                if (self.backend.in_flight() == 0 && self.old_backends.is_empty() && !owed)
                    || now >= deadline
                {
                    return;
                }
            }
        }
    }

    fn drain_mailbox(&mut self, now: Instant) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Answer {
                    session,
                    gen,
                    seq,
                    answer,
                } => self.deliver(session as usize, gen, seq, &answer, now),
                Msg::Shutdown => {
                    self.stopping = true;
                    for (mut l, _, _) in self.listeners.drain(..) {
                        let _ = self.poll.registry().deregister(&mut l);
                    }
                }
                Msg::Reload { shared, listeners } => self.reload(shared, listeners),
            }
        }
    }

    /// Takes a new configuration: listeners kept, added and removed as the
    /// update says; a new backend (the old one finishes its fetches); client
    /// connections untouched.
    fn reload(&mut self, shared: Arc<Shared>, updates: Vec<ListenerUpdate>) {
        if self.stopping {
            return;
        }
        let registry = self.poll.registry();
        let mut old: Vec<(Listener, Proto, Listen)> = std::mem::take(&mut self.listeners);
        for u in updates {
            let listener = match u.socket {
                Some(mut l) => {
                    let _ = registry.register(&mut l, Token(0), Interest::READABLE);
                    l
                }
                None => match old.iter().position(|(_, _, a)| *a == u.listen) {
                    Some(i) => old.swap_remove(i).0,
                    None => continue,
                },
            };
            self.listeners.push((listener, u.proto, u.listen));
        }
        for (mut l, _, _) in old {
            let _ = registry.deregister(&mut l);
        }
        for (i, (l, _, _)) in self.listeners.iter_mut().enumerate() {
            let _ = registry.reregister(l, Token(LISTENER_TOKEN_TOP - i), Interest::READABLE);
        }
        // A token span no live backend uses: however many reloads, a token
        // never names two connections.
        let used: Vec<usize> = std::iter::once(&self.backend)
            .chain(&self.old_backends)
            .map(Backend::token_base)
            .collect();
        let base = (0..)
            .map(|slot| BACKEND_TOKEN_BASE + slot * backend_mod::TOKEN_SPAN)
            .find(|b| !used.contains(b))
            .unwrap_or(BACKEND_TOKEN_BASE);
        let new = Backend::new(
            base,
            &shared.maps,
            (self.id as usize, shared.cfg.daemon.workers),
            shared.cache.epoch(),
        );
        let old_backend = std::mem::replace(&mut self.backend, new);
        if old_backend.in_flight() > 0 {
            self.old_backends.push(old_backend);
        }
        self.shared = shared;
        // Connections accepted meanwhile on new listeners.
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
    }

    fn accept(&mut self, li: usize) {
        if self.accept_paused_until.is_some() || li >= self.listeners.len() {
            return;
        }
        let max_clients = self.shared.cfg.daemon.max_clients as u64;
        for _ in 0..ACCEPT_BATCH {
            let open = self
                .shared
                .stats
                .counters
                .connections_open
                .load(Ordering::Relaxed);
            if open >= max_clients {
                // Keep serving who we have; new clients wait in the kernel's backlog.
                if let Some(n) = LOG_MAX_CLIENTS.check() {
                    crate::warn!("max_clients ({max_clients}) reached: not accepting for now ({n} similar not logged)");
                }
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                return;
            }
            let (listener, proto, _) = &self.listeners[li];
            let proto = *proto;
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Some(ip) = peer.map(|p| p.ip()) {
                        let allow = match proto {
                            Proto::TcpTable { map } => self
                                .shared
                                .map(map)
                                .and_then(|m| m.allow_from.as_deref())
                                .unwrap_or(&self.shared.cfg.daemon.allow_from),
                            Proto::Socketmap { .. } => &self.shared.cfg.daemon.allow_from,
                        };
                        if !crate::config::allowed(allow, ip) {
                            if let Some(n) = LOG_DENIED.check() {
                                crate::warn!("refused a connection from {ip}: not in allow_from ({n} similar not logged)");
                            }
                            continue; // dropping the stream closes it
                        }
                    }
                    self.add_session(stream, proto, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS...: keep serving what we have; do not spin.
                    if let Some(n) = LOG_ACCEPT.check() {
                        crate::warn!(
                            "accept failed: {e}; pausing accepts for {}ms ({n} similar not logged)",
                            ACCEPT_PAUSE.as_millis()
                        );
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
        // More may be waiting: edge-triggered, so come back on the next turn.
        self.accept_paused_until = Some(Instant::now());
    }

    fn add_session(
        &mut self,
        mut stream: Stream,
        proto: Proto,
        peer: Option<std::net::SocketAddr>,
    ) {
        let entry = self.sessions.vacant_entry();
        let token = Token(entry.key());
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            crate::error!("cannot register a client connection: {e}");
            return;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        entry.insert(Session {
            stream,
            proto,
            peer,
            gen,
            state: SessionState::Open,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            pending: VecDeque::new(),
            queued_bytes: 0,
            first_seq: 0,
            next_seq: 0,
            paused: false,
            eof: false,
            drain_to_eof: false,
        });
        let c = &self.shared.stats.counters;
        c.connections_open.fetch_add(1, Ordering::Relaxed);
        c.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    fn close_session(&mut self, sid: usize) {
        if let Some(mut s) = self.sessions.try_remove(sid) {
            let _ = self.poll.registry().deregister(&mut s.stream);
            self.shared
                .stats
                .counters
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn read_limit(&self, proto: Proto) -> usize {
        match proto {
            Proto::TcpTable { .. } => self.max_line(),
            Proto::Socketmap { max_query, .. } => max_query as usize + NETSTRING_OVERHEAD_BYTES,
        }
    }

    fn session_event(&mut self, sid: usize, read_closed: bool, now: Instant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        // The client's FIN is queued behind its data: read to the end, or
        // the short-read shortcut below would never see the EOF (no new
        // edge comes for it).
        s.drain_to_eof |= read_closed;
        if !self.flush(sid) {
            return;
        }
        self.resume_if_drained(sid, now);
        self.read_session(sid, now);
    }

    /// A session paused for backpressure reads again once its answers
    /// drained below the resume mark (whatever made it pause: a slow
    /// lookup, a client slow to read, a burst of large cache hits).
    fn resume_if_drained(&mut self, sid: usize, now: Instant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        if s.paused && s.under_resume_mark() {
            s.paused = false;
            // Requests already read wait in the buffer: serve them first
            // (no new edge will come for them).
            self.serve(sid, now);
        }
    }

    /// Reads and serves requests until the socket is drained, the session
    /// is paused for backpressure, or it closes.
    fn read_session(&mut self, sid: usize, now: Instant) {
        let Some(proto) = self.sessions.get(sid).map(|s| s.proto) else {
            return;
        };
        let limit = self.read_limit(proto);
        loop {
            let Some(s) = self.sessions.get_mut(sid) else {
                return;
            };
            if s.eof || s.state != SessionState::Open {
                break;
            }
            if s.paused {
                // The answers that made it pause may be written by now (no
                // writable edge comes when the kernel took them all): resume
                // at once if they drained, else wait for that edge.
                if !self.flush(sid) {
                    return;
                }
                let Some(s) = self.sessions.get_mut(sid) else {
                    return;
                };
                if !s.under_resume_mark() {
                    break;
                }
                s.paused = false;
                self.serve(sid, now);
                continue;
            }
            let space = limit.saturating_sub(s.rbuf.len());
            if space == 0 {
                // A full buffer without one complete request: the codec says so.
                self.serve(sid, now);
                continue;
            }
            match s.stream.read(&mut self.read_buf[..space]) {
                Ok(0) => {
                    s.eof = true;
                    break;
                }
                Ok(n) => {
                    s.rbuf.extend_from_slice(&self.read_buf[..n]);
                    self.serve(sid, now);
                    let more = self
                        .sessions
                        .get(sid)
                        .is_some_and(|s| s.drain_to_eof || s.paused);
                    if n < space && !more {
                        break; // a short read drained the socket
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_session(sid);
                    return;
                }
            }
        }
        if !self.flush(sid) {
            return;
        }
        if let Some(s) = self.sessions.get(sid) {
            if s.eof && s.pending.is_empty() && s.wpos >= s.wbuf.len() {
                self.close_session(sid);
            }
        }
    }

    /// Serves every complete request in the session's read buffer.
    fn serve(&mut self, sid: usize, now: Instant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let proto = s.proto;
        let mut rbuf = std::mem::take(&mut s.rbuf);
        let mut pos = 0;
        let max_line = self.max_line();
        loop {
            let Some(s) = self.sessions.get_mut(sid) else {
                return;
            };
            if s.state != SessionState::Open {
                break;
            }
            if s.over_mark() {
                s.paused = true;
                break;
            }
            match proto {
                Proto::TcpTable { map } => {
                    let mut key = std::mem::take(&mut self.key_buf);
                    let parsed = tcp_table::parse_request(&rbuf[pos..], max_line, &mut key);
                    match parsed {
                        tcp_table::Parsed::Incomplete => {
                            self.key_buf = key;
                            break;
                        }
                        tcp_table::Parsed::TooLong => {
                            self.key_buf = key;
                            self.bad_request(
                                sid,
                                &format!("request line longer than {max_line} bytes"),
                                true,
                            );
                            pos = rbuf.len();
                            break;
                        }
                        tcp_table::Parsed::Line { consumed, result } => {
                            pos += consumed;
                            match result {
                                Ok(()) => self.lookup(sid, map, &key, now),
                                Err(e) => self.bad_request(sid, &e.to_string(), false),
                            }
                            self.key_buf = key;
                        }
                    }
                }
                Proto::Socketmap { max_query, .. } => {
                    match netstring::parse(&rbuf[pos..], max_query as usize) {
                        Ok(None) => break,
                        Err(e @ netstring::NetstringError::TooLong { .. }) => {
                            // Answer (the client can tell why), then close: the
                            // rest of the query is never read.
                            self.bad_request(sid, &format!("query too long: {e}"), false);
                            self.bad_request_close(sid);
                            pos = rbuf.len();
                            break;
                        }
                        Err(e) => {
                            self.bad_request(sid, &format!("malformed netstring: {e}"), true);
                            pos = rbuf.len();
                            break;
                        }
                        Ok(Some((start, end, consumed))) => {
                            let payload = &rbuf[pos + start..pos + end];
                            match netstring::split_request(payload) {
                                Err(e) => {
                                    let msg = format!("malformed socketmap request: {e}");
                                    self.answer_now(sid, AnswerRef::Perm(msg.as_bytes()));
                                }
                                Ok((name, key)) => match self.shared.map_by_name.get(name).copied()
                                {
                                    Some(map) => {
                                        self.lookup(sid, map, key, now);
                                    }
                                    None => {
                                        let msg = format!(
                                            "unknown map {:?}",
                                            String::from_utf8_lossy(name)
                                        );
                                        self.answer_now(sid, AnswerRef::Perm(msg.as_bytes()));
                                    }
                                },
                            }
                            pos += consumed;
                        }
                    }
                }
            }
        }
        rbuf.drain(..pos.min(rbuf.len()));
        if let Some(s) = self.sessions.get_mut(sid) {
            s.rbuf = rbuf;
        }
    }

    /// A request that cannot be served: answer an error; `fatal` closes the
    /// connection after the answer (the stream cannot be resynchronised).
    fn bad_request(&mut self, sid: usize, why: &str, fatal: bool) {
        self.shared
            .stats
            .counters
            .bad_requests
            .fetch_add(1, Ordering::Relaxed);
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let (limit, what) = match s.proto {
            Proto::TcpTable { .. } => (&LOG_BAD_TCP_TABLE, "tcp_table"),
            Proto::Socketmap { .. } => (&LOG_BAD_SOCKETMAP, "socketmap"),
        };
        if let Some(n) = limit.check() {
            let from = s
                .peer
                .map_or_else(|| "a Unix socket client".to_string(), |p| p.to_string());
            crate::warn!(
                "bad {what} request from {from}{}: {why}{} ({n} similar not logged)",
                match s.proto {
                    Proto::TcpTable { map } => format!(" (map {})", self.shared.map_name(map)),
                    Proto::Socketmap { .. } => String::new(),
                },
                if fatal {
                    "; closing the connection"
                } else {
                    ""
                }
            );
        }
        match s.proto {
            Proto::TcpTable { .. } => self.answer_now(sid, AnswerRef::Temp(why.as_bytes())),
            Proto::Socketmap { .. } if !fatal => {
                self.answer_now(sid, AnswerRef::Perm(why.as_bytes()))
            }
            Proto::Socketmap { .. } => {}
        }
        if fatal {
            if let Some(s) = self.sessions.get_mut(sid) {
                s.state = SessionState::Closing;
            }
        }
    }

    fn bad_request_close(&mut self, sid: usize) {
        if let Some(s) = self.sessions.get_mut(sid) {
            s.state = SessionState::Closing;
        }
    }

    /// Answers the next request of `sid` at once (in order behind any owed answers).
    fn answer_now(&mut self, sid: usize, a: AnswerRef<'_>) {
        let shared = &self.shared;
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let map_name = map_name_of(shared, s.proto);
        s.next_seq += 1;
        let proto = s.proto;
        s.emit(|out| encode_answer(proto, a, out, map_name));
    }

    fn lookup(&mut self, sid: usize, map: u16, key: &[u8], now: Instant) {
        self.shared
            .stats
            .counters
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let Some(mcfg) = self.shared.map(map) else {
            self.answer_now(
                sid,
                AnswerRef::Temp(b"map removed by a configuration reload"),
            );
            return;
        };
        fold_key(key, mcfg.fold_case, &mut self.fold_buf);
        cache::make_key(
            map,
            self.shared.gen(map),
            &self.fold_buf,
            &mut self.ckey_buf,
        );
        let cache = &self.shared.cache;
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        let waiter = Waiter {
            worker: self.id,
            session: sid as u32,
            gen: s.gen,
            seq,
        };
        let proto = s.proto;
        let counters = &self.shared.stats.maps[map as usize];
        let r = cache.lookup(&self.ckey_buf, cache.ms_at(now), waiter, |v| {
            let a = match v {
                Some(v) => {
                    counters.found.fetch_add(1, Ordering::Relaxed);
                    AnswerRef::Found(v)
                }
                None => {
                    counters.not_found.fetch_add(1, Ordering::Relaxed);
                    AnswerRef::NotFound
                }
            };
            s.emit(|out| encode_answer(proto, a, out, &mcfg.name));
        });
        match r {
            Lookup::Hit { .. } => counters.cache_hits.fetch_add(1, Ordering::Relaxed),
            _ => counters.cache_misses.fetch_add(1, Ordering::Relaxed),
        };
        match r {
            Lookup::Hit { refresh } => {
                if refresh {
                    let registry = self.poll.registry();
                    self.backend
                        .start(registry, map, &self.fold_buf, &self.ckey_buf, now);
                }
            }
            Lookup::Joined => s.pending.push_back(Slot::Waiting),
            Lookup::Fetch => {
                s.pending.push_back(Slot::Waiting);
                let registry = self.poll.registry();
                self.backend
                    .start(registry, map, &self.fold_buf, &self.ckey_buf, now);
            }
        }
        if crate::log::enabled(crate::log::Level::Debug) {
            let what = match r {
                Lookup::Hit { refresh: false } => "cache hit",
                Lookup::Hit { refresh: true } => "cache hit, refreshing in the background",
                Lookup::Joined => "miss, joined a fetch in flight",
                Lookup::Fetch => "miss, fetching",
            };
            crate::debug!(
                "map {}: lookup {:?}: {what}",
                self.shared.map_name(map),
                String::from_utf8_lossy(&self.fold_buf)
            );
        }
    }

    /// Stores finished fetches in the cache and answers their waiters.
    fn handle_completions(&mut self, now: Instant) {
        let mut done: Vec<Completion> = self.backend.completions().collect();
        for b in &mut self.old_backends {
            done.extend(b.completions());
        }
        for c in done {
            let cache = &self.shared.cache;
            let now_ms = cache.ms_at(now);
            let ttls = &self.shared.ttls(c.map);
            let map_name = self.shared.map_name(c.map);
            let counters = &self.shared.stats.maps[c.map as usize];
            counters.fetch_latency.observe(c.elapsed);
            if crate::log::enabled(crate::log::Level::Debug) {
                let key = String::from_utf8_lossy(cache::lookup_key(&c.cache_key));
                let what = match &c.outcome {
                    Outcome::Found(v) => format!("found {:?}", String::from_utf8_lossy(v)),
                    Outcome::NotFound => "not found".to_string(),
                    Outcome::Temp(m) => format!("temporary error: {m}"),
                };
                crate::debug!(
                    "map {map_name}: fetched {key:?} in {}us: {what}",
                    c.elapsed.as_micros()
                );
            }
            let (waiters, answer) = match c.outcome {
                Outcome::Found(v) => {
                    let w = cache.complete_ok(&c.cache_key, Some(&v), ttls, now_ms);
                    counters.found.fetch_add(w.len() as u64, Ordering::Relaxed);
                    (w, Answer::Found(v.into()))
                }
                Outcome::NotFound => {
                    let w = cache.complete_ok(&c.cache_key, None, ttls, now_ms);
                    counters
                        .not_found
                        .fetch_add(w.len() as u64, Ordering::Relaxed);
                    (w, Answer::NotFound)
                }
                Outcome::Temp(msg) => {
                    let (w, stale) = cache.complete_err(&c.cache_key, now_ms, ttls.stale_negative);
                    if w.is_empty() {
                        // A background refresh failed: the entry keeps serving
                        // until it expires; nobody waits for an answer.
                        crate::debug!("map {map_name}: background refresh failed: {msg}");
                        continue;
                    }
                    match stale {
                        Some(v) => {
                            if let Some(n) = LOG_STALE.check() {
                                crate::warn!("map {map_name}: every server failed ({msg}); answering from stale cache entries ({n} more not logged)");
                            }
                            counters.stale.fetch_add(w.len() as u64, Ordering::Relaxed);
                            (w, v.map_or(Answer::NotFound, |v| Answer::Found(v.into())))
                        }
                        None => {
                            if let Some(n) = LOG_TEMP.check() {
                                crate::warn!("map {map_name}: lookup failed, answered a temporary error: {msg} ({n} similar not logged)");
                            }
                            counters
                                .temporary
                                .fetch_add(w.len() as u64, Ordering::Relaxed);
                            (w, Answer::Temp(msg.into()))
                        }
                    }
                }
            };
            for w in waiters {
                if w.worker == self.id {
                    self.deliver(w.session as usize, w.gen, w.seq, &answer, now);
                } else if let Some((tx, waker)) = self.shared.mailboxes.get(w.worker as usize) {
                    let _ = tx.send(Msg::Answer {
                        session: w.session,
                        gen: w.gen,
                        seq: w.seq,
                        answer: answer.clone(),
                    });
                    let _ = waker.wake();
                }
            }
        }
    }

    /// Puts an answer in its place on session `sid` and sends what is in order.
    fn deliver(&mut self, sid: usize, gen: u64, seq: u64, answer: &Answer, now: Instant) {
        let shared = &self.shared;
        let Some(s) = self.sessions.get_mut(sid).filter(|s| s.gen == gen) else {
            return;
        };
        let map_name = map_name_of(shared, s.proto);
        let Some(i) = seq.checked_sub(s.first_seq).map(|i| i as usize) else {
            return;
        };
        if !matches!(s.pending.get(i), Some(Slot::Waiting)) {
            return;
        }
        let a = match answer {
            Answer::Found(v) => AnswerRef::Found(v),
            Answer::NotFound => AnswerRef::NotFound,
            Answer::Temp(m) => AnswerRef::Temp(m.as_bytes()),
        };
        if i == 0 {
            encode_answer(s.proto, a, &mut s.wbuf, map_name);
            s.pending.pop_front();
            s.first_seq += 1;
        } else {
            let mut v = Vec::new();
            encode_answer(s.proto, a, &mut v, map_name);
            s.queued_bytes += v.len();
            s.pending[i] = Slot::Ready(v);
        }
        while let Some(Slot::Ready(_)) = s.pending.front() {
            if let Some(Slot::Ready(v)) = s.pending.pop_front() {
                s.queued_bytes -= v.len();
                s.wbuf.extend_from_slice(&v);
            }
            s.first_seq += 1;
        }
        if !self.flush(sid) {
            return;
        }
        let was_paused = self.sessions.get(sid).is_some_and(|s| s.paused);
        self.resume_if_drained(sid, now);
        if was_paused {
            self.read_session(sid, now);
        } else if let Some(s) = self.sessions.get(sid) {
            if s.eof && s.pending.is_empty() && s.wpos >= s.wbuf.len() {
                self.close_session(sid);
            }
        }
    }

    /// Writes what the session owes. False if the session is gone.
    fn flush(&mut self, sid: usize) -> bool {
        let Some(s) = self.sessions.get_mut(sid) else {
            return false;
        };
        while s.wpos < s.wbuf.len() {
            match s.stream.write(&s.wbuf[s.wpos..]) {
                Ok(0) => {
                    self.close_session(sid);
                    return false;
                }
                Ok(n) => s.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_session(sid);
                    return false;
                }
            }
        }
        if s.wpos >= s.wbuf.len() {
            s.wbuf.clear();
            s.wpos = 0;
            if s.state == SessionState::Closing && s.pending.is_empty() {
                self.close_session(sid);
                return false;
            }
        }
        true
    }
}

/// The map name for log lines about a session of protocol `proto`.
fn map_name_of(shared: &Shared, proto: Proto) -> &str {
    match proto {
        Proto::TcpTable { map } => shared.map_name(map),
        Proto::Socketmap { .. } => "",
    }
}

/// An answer borrowed for encoding.
#[derive(Clone, Copy)]
enum AnswerRef<'a> {
    Found(&'a [u8]),
    NotFound,
    Temp(&'a [u8]),
    /// A configuration error (socketmap only; tcp_table has no such reply).
    Perm(&'a [u8]),
}

/// Encodes one answer in the session's protocol.
fn encode_answer(proto: Proto, a: AnswerRef<'_>, out: &mut Vec<u8>, map_name: &str) {
    match proto {
        Proto::TcpTable { .. } => match a {
            AnswerRef::Found(v) if !v.is_empty() => {
                if let Err(e) = tcp_table::encode_found(v, out) {
                    if let Some(n) = LOG_TOO_LONG.check() {
                        crate::warn!("map {map_name}: a result is too long for tcp_table ({e}); answered 400 ({n} similar not logged)");
                    }
                    tcp_table::encode_temp_error(
                        format!("result too long for tcp_table: {e}").as_bytes(),
                        out,
                    );
                }
            }
            AnswerRef::Found(_) | AnswerRef::NotFound => tcp_table::encode_not_found(b"", out),
            AnswerRef::Temp(m) | AnswerRef::Perm(m) => tcp_table::encode_temp_error(m, out),
        },
        Proto::Socketmap { max_reply, .. } => {
            let max = max_reply as usize;
            match a {
                AnswerRef::Found(v) if !v.is_empty() => {
                    if let Err(e) = netstring::encode_ok(v, max, out) {
                        if let Some(n) = LOG_TOO_LONG.check() {
                            crate::warn!("a result is too long for socketmap ({e}); answered TEMP ({n} similar not logged)");
                        }
                        netstring::encode_temp(
                            format!("result too long: {e}").as_bytes(),
                            max,
                            out,
                        );
                    }
                }
                AnswerRef::Found(_) | AnswerRef::NotFound => netstring::encode_notfound(out),
                AnswerRef::Temp(m) => netstring::encode_temp(m, max, out),
                AnswerRef::Perm(m) => netstring::encode_perm(m, max, out),
            }
        }
    }
}

/// Lower-cases `key` into `out` when `fold` (ASCII fast path; UTF-8 keys by
/// Unicode lower case, as Postfix folds SMTPUTF8 keys).
pub fn fold_key(key: &[u8], fold: bool, out: &mut Vec<u8>) {
    out.clear();
    if !fold {
        out.extend_from_slice(key);
    } else if key.is_ascii() {
        out.extend(key.iter().map(u8::to_ascii_lowercase));
    } else if let Ok(s) = std::str::from_utf8(key) {
        out.extend_from_slice(s.to_lowercase().as_bytes());
    } else {
        out.extend(key.iter().map(u8::to_ascii_lowercase));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding() {
        let mut out = Vec::new();
        for (k, fold, want) in [
            ("Alice@Example.COM", true, "alice@example.com"),
            ("Alice@Example.COM", false, "Alice@Example.COM"),
            ("ÅSA@Exämple.com", true, "åsa@exämple.com"),
        ] {
            fold_key(k.as_bytes(), fold, &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }
}
