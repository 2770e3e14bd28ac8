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
//!
//! - [`shared`]: what every worker shares (configuration, cache, counters)
//!   and the messages between workers.
//! - `session`: a client connection: reading, framing, answers in order,
//!   backpressure.
//! - `lookup`: from a key to an answer: the cache, the shared cache, the
//!   servers, and the completions that answer waiting requests.

use crate::backend::{self as backend_mod, Backend, Completion, MapServers, Outcome};
use crate::cache::{self, Cache, Lookup, Ttls, Waiter};
use crate::codec::{netstring, policy as policy_codec, tcp_table};
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
/// The shared cache's connection (just below the backends).
const L2_TOKEN: Token = Token(BACKEND_TOKEN_BASE - 1);
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
static LOG_BAD_POLICY: RateLimit = RateLimit::new(Duration::from_secs(10));
/// Policy requests answered with the default action.
static LOG_DEFAULT_ACTION: RateLimit = RateLimit::new(Duration::from_secs(10));
static LOG_ACCEPT: RateLimit = RateLimit::new(Duration::from_secs(60));
static LOG_MAX_CLIENTS: RateLimit = RateLimit::new(Duration::from_secs(60));
static LOG_DENIED: RateLimit = RateLimit::new(Duration::from_secs(10));

mod l2;
mod lookup;
mod policy;
mod session;
pub mod shared;

pub use lookup::fold_key;
use session::{Session, SessionState};
pub use shared::*;

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
    /// This worker's connection to the shared cache, if there is one.
    l2: Option<crate::shared_cache::client::L2>,
    /// Lookups waiting for the shared cache, by command tag.
    l2_lookups: HashMap<u64, l2::L2Lookup>,
    /// Cold-key claims this worker holds while it fetches (L1 key → claim key).
    l2_claims: HashMap<Vec<u8>, Vec<u8>>,
    next_l2_tag: u64,
    /// Policy requests without a cache key get keys of their own.
    next_policy_id: u64,
}

/// This worker's shared-cache connection for `cfg` (worker 0 listens for
/// invalidations).
fn new_l2(
    cfg: &Config,
    id: u32,
    stats: &Stats,
    own_writes: &Arc<crate::shared_cache::OwnWrites>,
    now: Instant,
) -> Option<crate::shared_cache::client::L2> {
    let sc = cfg.shared_cache.as_ref()?;
    Some(crate::shared_cache::client::L2::new(
        Arc::new(sc.clone()),
        L2_TOKEN,
        id as usize,
        id == 0,
        stats.l2.clone(),
        own_writes.clone(),
        now,
    ))
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
        let l2 = new_l2(
            &shared.cfg,
            id,
            &shared.stats,
            &shared.own_writes,
            Instant::now(),
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
            l2,
            l2_lookups: HashMap::new(),
            l2_claims: HashMap::new(),
            next_l2_tag: 1,
            next_policy_id: 0,
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
                .chain(self.l2.as_ref().and_then(|l| l.next_deadline()))
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
                } else if t == L2_TOKEN {
                    let registry = self.poll.registry();
                    if let Some(l2) = self.l2.as_mut() {
                        l2.event(registry, now);
                    }
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
            if let Some(l2) = self.l2.as_mut() {
                l2.expire(registry, now);
            }
            self.backend.expire(registry, now);
            for b in &mut self.old_backends {
                b.expire(registry, now);
            }
            self.handle_completions(now);
            // What this turn asked of the shared cache leaves in one write.
            if let Some(l2) = self.l2.as_mut() {
                l2.send_queued(self.poll.registry(), now);
            }
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
        // A changed shared cache: a new connection (what waited on the old
        // one goes to the servers, under the new configuration).
        let now = Instant::now();
        if shared.cfg.shared_cache != self.shared.cfg.shared_cache {
            self.shared = shared;
            self.l2_abandon(now);
            if let Some(mut old) = self.l2.take() {
                old.close(self.poll.registry());
            }
            self.l2 = new_l2(
                &self.shared.cfg,
                self.id,
                &self.shared.stats,
                &self.shared.own_writes,
                now,
            );
        } else {
            self.shared = shared;
        }
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
                            Proto::TcpTable { map } | Proto::Policy { map, .. } => self
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
}
