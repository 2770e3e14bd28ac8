//! One worker's side of the HTTP servers: keep-alive pools, the fetches in
//! flight, their timers, and failover between a map's servers.
//!
//! A [`Backend`] belongs to one event loop (it registers its sockets with that
//! loop's `mio::Registry` and is driven by it): nothing here blocks. Server
//! health is shared with the other workers ([`health::Health`]); everything
//! else is this worker's own. A fetch is one lookup's way through the servers:
//! pick one at random among the healthy ones (or probe a rested one), take an
//! idle pooled connection or open one, write the `GET`, read the reply with
//! the pure codec in [`crate::codec::http`], and on failure try the next
//! server in random order within `max_attempts` and `lookup_timeout`. Each
//! fetch ends in exactly one [`Completion`], which the worker turns into
//! answers; this module never touches clients or the cache.

pub mod health;
pub mod result;

use crate::codec::http::{self, BodyDecoder, Head, HttpError};
use crate::config::{MapConfig, ResultMode, ServerConfig};
use crate::metrics::ServerCounters;
use health::{Availability, Health};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use result::evaluate;
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Tokens one backend may use, from its base (its connections are slab indexes).
pub const TOKEN_SPAN: usize = 1 << 32;
/// Bytes read from a server per `read` call.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// How a lookup ended at the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Found(Vec<u8>),
    NotFound,
    /// Every try failed: the text says why (for the client and the log).
    Temp(String),
}

/// A finished fetch, for the worker to store and answer.
#[derive(Debug)]
pub struct Completion {
    pub map: u16,
    pub cache_key: Box<[u8]>,
    pub outcome: Outcome,
    /// From the fetch's start to its end.
    pub elapsed: std::time::Duration,
}

/// One server as every worker sees it.
pub struct SharedServer {
    pub cfg: ServerConfig,
    pub map_name: String,
    pub health: Health,
    pub counters: ServerCounters,
    /// Connections open to this server, all workers together (a gauge).
    pub open: AtomicUsize,
}

impl SharedServer {
    pub fn new(cfg: ServerConfig, map: &MapConfig) -> SharedServer {
        SharedServer {
            cfg,
            map_name: map.name.clone(),
            health: Health::new(map.retry_interval, crate::config::MAX_RETRY_INTERVAL_FACTOR),
            counters: ServerCounters::default(),
            open: AtomicUsize::new(0),
        }
    }
}

/// Worker `worker`'s share of a daemon-wide `max_connections` among
/// `workers`: the shares add up to `max` (never above it while `max >=
/// workers`), and every worker may open at least one connection.
pub fn connection_share(max: usize, workers: usize, worker: usize) -> usize {
    let workers = workers.max(1);
    (max / workers + usize::from(worker < max % workers)).max(1)
}

/// A map as the backend needs it: its config and its servers' shared state.
pub struct MapServers {
    pub cfg: Arc<MapConfig>,
    pub servers: Vec<Arc<SharedServer>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FetchRef {
    idx: usize,
    gen: u64,
}

struct ServerRt {
    shared: Arc<SharedServer>,
    map: u16,
    idle: Vec<usize>,
    /// This worker's connections to the server, at most `max_open`.
    open: usize,
    /// This worker's share of `max_connections`.
    max_open: usize,
    queue: VecDeque<FetchRef>,
    max_queue: usize,
}

struct MapRt {
    cfg: Arc<MapConfig>,
    servers: Vec<usize>,
}

enum Stage {
    /// Between attempts (in `ready`).
    Choosing,
    /// Waiting for a connection to `server`.
    Queued { server: usize },
    /// A request is on `conn`.
    Active {
        conn: usize,
        attempt_deadline: Instant,
    },
}

struct Fetch {
    gen: u64,
    started: Instant,
    map: u16,
    key: Box<[u8]>,
    cache_key: Box<[u8]>,
    deadline: Instant,
    attempts: u32,
    tried: Vec<usize>,
    stage: Stage,
    /// The once-per-attempt retry on a fresh connection (a pooled one the server had closed) is used.
    fresh_retry_used: bool,
    /// This fetch holds `server`'s probe slot.
    probing: Option<usize>,
    last_error: String,
}

enum ConnState {
    Connecting,
    Sending,
    Head,
    Body { head: Head, dec: BodyDecoder },
    Idle,
}

struct Conn {
    stream: TcpStream,
    server: usize,
    state: ConnState,
    /// Served a request before: an early EOF may just be the server's idle close.
    reused: bool,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    body: Vec<u8>,
    fetch: Option<FetchRef>,
    /// When the current request was handed to this connection.
    started: Instant,
    /// An event said the server closed its side (its FIN may be queued
    /// behind the reply, and no new edge will come for it).
    peer_closed: bool,
}

/// How an attempt on a connection failed.
enum Failure {
    /// A pooled connection was closed by the server before it answered.
    StalePooled,
    /// Counts against the server: it rests.
    Server(String),
    /// The server answered, but not with a result (e.g. 503): fail over, no rest.
    Answer(String),
    /// The whole lookup's deadline passed first: not the server's fault.
    Deadline,
}

pub struct Backend {
    token_base: usize,
    maps: Vec<MapRt>,
    servers: Vec<ServerRt>,
    conns: Slab<Conn>,
    fetches: Slab<Fetch>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    ready: Vec<FetchRef>,
    done: Vec<Completion>,
    next_gen: u64,
    epoch: Instant,
    read_buf: Box<[u8]>,
    /// Scratch for a request's target (path and query with the key in it).
    target_buf: Vec<u8>,
}

impl Backend {
    /// `token_base`: this backend's connections use tokens from here up.
    /// Worker `worker` of `workers` opens its [`connection_share`] of each
    /// server's `max_connections`.
    /// `maps` is indexed by map id; `None` is a removed map's slot (no
    /// servers; the worker refuses its lookups before they get here).
    pub fn new(
        token_base: usize,
        maps: &[Option<MapServers>],
        (worker, workers): (usize, usize),
        epoch: Instant,
    ) -> Backend {
        let mut b = Backend {
            token_base,
            maps: Vec::new(),
            servers: Vec::new(),
            conns: Slab::new(),
            fetches: Slab::new(),
            timers: BinaryHeap::new(),
            ready: Vec::new(),
            done: Vec::new(),
            next_gen: 1,
            epoch,
            read_buf: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            target_buf: Vec::with_capacity(256),
        };
        let placeholder = maps.iter().flatten().next().map(|m| m.cfg.clone());
        for (i, m) in maps.iter().enumerate() {
            let Some(m) = m else {
                if let Some(cfg) = &placeholder {
                    b.maps.push(MapRt {
                        cfg: cfg.clone(),
                        servers: Vec::new(),
                    });
                }
                continue;
            };
            let mut idxs = Vec::new();
            for s in &m.servers {
                idxs.push(b.servers.len());
                b.servers.push(ServerRt {
                    shared: s.clone(),
                    map: i as u16,
                    idle: Vec::new(),
                    open: 0,
                    max_open: connection_share(m.cfg.max_connections, workers, worker),
                    queue: VecDeque::new(),
                    max_queue: m.cfg.max_queue,
                });
            }
            b.maps.push(MapRt {
                cfg: m.cfg.clone(),
                servers: idxs,
            });
        }
        b
    }

    /// Whether `token` is one of this backend's connections.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.token_base && token.0 - self.token_base < TOKEN_SPAN
    }

    /// Fetches in flight.
    pub fn in_flight(&self) -> usize {
        self.fetches.len()
    }

    /// Takes the fetches that ended since the last call.
    pub fn completions(&mut self) -> std::vec::Drain<'_, Completion> {
        self.done.drain(..)
    }

    /// The earliest timer, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _, _))| *t)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Starts fetching `key` (already folded) of map `map`.
    pub fn start(
        &mut self,
        registry: &Registry,
        map: u16,
        key: &[u8],
        cache_key: &[u8],
        now: Instant,
    ) {
        let cfg = &self.maps[map as usize].cfg;
        let gen = self.next_gen;
        self.next_gen += 1;
        let deadline = now + cfg.lookup_timeout;
        let idx = self.fetches.insert(Fetch {
            gen,
            started: now,
            map,
            key: key.into(),
            cache_key: cache_key.into(),
            deadline,
            attempts: 0,
            tried: Vec::new(),
            stage: Stage::Choosing,
            fresh_retry_used: false,
            probing: None,
            last_error: String::new(),
        });
        self.timers.push(Reverse((deadline, idx, gen)));
        self.ready.push(FetchRef { idx, gen });
        self.run_ready(registry, now);
    }

    fn fetch_mut(&mut self, f: FetchRef) -> Option<&mut Fetch> {
        self.fetches.get_mut(f.idx).filter(|x| x.gen == f.gen)
    }

    /// Gives every fetch between attempts its next attempt.
    fn run_ready(&mut self, registry: &Registry, now: Instant) {
        while let Some(f) = self.ready.pop() {
            self.next_attempt(registry, f, now);
        }
    }

    fn finish(&mut self, f: FetchRef, outcome: Outcome) {
        let Some(fetch) = self.fetches.get(f.idx).filter(|x| x.gen == f.gen) else {
            return;
        };
        if let Some(s) = fetch.probing {
            self.servers[s].shared.health.end_probe();
        }
        if let Stage::Queued { server } = fetch.stage {
            self.servers[server].queue.retain(|q| *q != f);
        }
        let fetch = self.fetches.remove(f.idx);
        self.done.push(Completion {
            map: fetch.map,
            cache_key: fetch.cache_key,
            outcome,
            elapsed: fetch.started.elapsed(),
        });
    }

    /// Picks a server not yet tried by this fetch: a random healthy one, else a
    /// rested one to probe, else (when every server of the map rests) any one
    /// whose probe slot is free. `None`: nothing to try now.
    fn choose(&self, map: u16, tried: &[usize]) -> Option<(usize, bool)> {
        let now_ms = self.now_ms();
        let servers = &self.maps[map as usize].servers;
        let n = servers.len();
        if n == 0 {
            return None;
        }
        let avail = |s: usize| self.servers[s].shared.health.availability(now_ms);
        let untried = |s: &usize| !tried.contains(s);
        // The servers in a random rotation: a random order to try them in,
        // without allocating.
        let start = fastrand::usize(..n);
        let rotation = || (0..n).map(move |k| servers[(start + k) % n]);
        // A server whose rest is over is probed first (one lookup at a
        // time), even while others are up: otherwise it would never return.
        for s in rotation().filter(untried) {
            if avail(s) == Availability::Probe && self.servers[s].shared.health.try_probe() {
                return Some((s, true));
            }
        }
        let up = rotation()
            .filter(untried)
            .filter(|&s| avail(s) == Availability::Up)
            .count();
        if up > 0 {
            let pick = fastrand::usize(..up);
            return rotation()
                .filter(untried)
                .filter(|&s| avail(s) == Availability::Up)
                .nth(pick)
                .map(|s| (s, false));
        }
        if servers.iter().all(|&s| avail(s) != Availability::Up) {
            for s in rotation().filter(untried) {
                if self.servers[s].shared.health.try_probe() {
                    return Some((s, true));
                }
            }
        }
        None
    }

    fn next_attempt(&mut self, registry: &Registry, f: FetchRef, now: Instant) {
        let Some(fetch) = self.fetch_mut(f) else {
            return;
        };
        if now >= fetch.deadline {
            let msg = timeout_text(fetch);
            self.finish(f, Outcome::Temp(msg));
            return;
        }
        let map = fetch.map;
        let attempts = fetch.attempts;
        let max_attempts = self.maps[map as usize].cfg.max_attempts;
        let fetch = self.fetch_mut(f).expect("fetch checked above");
        if attempts >= max_attempts {
            let msg = std::mem::take(&mut fetch.last_error);
            self.finish(f, Outcome::Temp(msg));
            return;
        }
        let tried = std::mem::take(&mut fetch.tried);
        let choice = self.choose(map, &tried);
        let fetch = self.fetch_mut(f).expect("fetch checked above");
        fetch.tried = tried;
        let Some((server, probe)) = choice else {
            let msg = if fetch.last_error.is_empty() {
                format!(
                    "map {}: every server is resting after failures",
                    self.maps[map as usize].cfg.name
                )
            } else {
                std::mem::take(&mut fetch.last_error)
            };
            self.finish(f, Outcome::Temp(msg));
            return;
        };
        fetch.attempts += 1;
        fetch.tried.push(server);
        fetch.fresh_retry_used = false;
        if let Some(old) = fetch.probing.take() {
            self.servers[old].shared.health.end_probe();
        }
        let fetch = self.fetch_mut(f).expect("fetch checked above");
        if probe {
            fetch.probing = Some(server);
        }
        self.assign(registry, f, server, now, false);
    }

    /// Puts fetch `f` on a connection to `server`: an idle pooled one, a new
    /// one, or the server's wait queue. `fresh`: a new connection only.
    fn assign(
        &mut self,
        registry: &Registry,
        f: FetchRef,
        server: usize,
        now: Instant,
        fresh: bool,
    ) {
        if !fresh {
            if let Some(conn) = self.servers[server].idle.pop() {
                self.send(registry, conn, f, now);
                return;
            }
        }
        let srv = &mut self.servers[server];
        // `fresh`: the retry of a pooled connection the server had closed;
        // its slot was just freed.
        if srv.open < srv.max_open || fresh {
            self.connect(registry, f, server, now);
            return;
        }
        if srv.queue.len() < srv.max_queue {
            srv.queue.push_back(f);
            if let Some(fetch) = self.fetch_mut(f) {
                fetch.stage = Stage::Queued { server };
            }
            return;
        }
        let msg = format!(
            "{}: all {} connections of this worker busy and {} lookups waiting",
            self.servers[server].shared.cfg.url,
            self.servers[server].max_open,
            self.servers[server].max_queue
        );
        if let Some(fetch) = self.fetch_mut(f) {
            fetch.last_error = msg;
            fetch.stage = Stage::Choosing;
        }
        self.ready.push(f);
    }

    fn connect(&mut self, registry: &Registry, f: FetchRef, server: usize, now: Instant) {
        let addr = self.servers[server].shared.cfg.addr;
        let mut stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                self.server_failed(server, &format!("connect: {e}"));
                self.retry_elsewhere(
                    f,
                    format!("{}: connect: {e}", self.servers[server].shared.cfg.url),
                );
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let token = Token(self.token_base + entry.key());
        if let Err(e) =
            registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
        {
            crate::error!("cannot register a server connection: {e}");
            self.retry_elsewhere(f, format!("internal error: {e}"));
            return;
        }
        let conn = entry.insert(Conn {
            stream,
            server,
            state: ConnState::Connecting,
            reused: false,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            body: Vec::new(),
            fetch: Some(f),
            started: now,
            peer_closed: false,
        });
        let _ = conn;
        let idx = self.token_idx(token);
        self.servers[server].open += 1;
        self.servers[server]
            .shared
            .open
            .fetch_add(1, Ordering::Relaxed);
        let connect_timeout = self.maps[self.servers[server].map as usize]
            .cfg
            .connect_timeout;
        self.activate(f, idx, now + connect_timeout);
        if !self.fill_request(idx, f) {
            self.close_conn(registry, idx);
        }
    }

    fn token_idx(&self, token: Token) -> usize {
        token.0 - self.token_base
    }

    /// Marks fetch `f` active on `conn` until `attempt_deadline`.
    fn activate(&mut self, f: FetchRef, conn: usize, attempt_deadline: Instant) {
        if let Some(fetch) = self.fetch_mut(f) {
            fetch.stage = Stage::Active {
                conn,
                attempt_deadline,
            };
            let gen = fetch.gen;
            self.timers.push(Reverse((attempt_deadline, f.idx, gen)));
        }
    }

    /// Writes the request of fetch `f` into `conn`'s write buffer. False if
    /// the key cannot go into a header (the fetch is finished with a reason).
    fn fill_request(&mut self, conn: usize, f: FetchRef) -> bool {
        let Some(fetch) = self.fetches.get(f.idx).filter(|x| x.gen == f.gen) else {
            return false;
        };
        let c = &mut self.conns[conn];
        let srv = &self.servers[c.server];
        let map = &self.maps[srv.map as usize].cfg;
        let cfg = &srv.shared.cfg;
        let target = &mut self.target_buf;
        target.clear();
        for (i, part) in cfg.target_parts.iter().enumerate() {
            if i > 0 {
                http::percent_encode_into(&fetch.key, target);
            }
            target.extend_from_slice(part.as_bytes());
        }
        c.wbuf.clear();
        c.wpos = 0;
        c.rbuf.clear();
        c.body.clear();
        c.fetch = Some(f);
        c.started = Instant::now();
        if http::write_get(&mut c.wbuf, target, &cfg.host, &fetch.key, &map.headers).is_err() {
            c.fetch = None;
            self.finish(
                f,
                Outcome::Temp(
                    "key contains CR, LF or NUL: it cannot be sent in an HTTP header".into(),
                ),
            );
            return false;
        }
        true
    }

    /// Starts fetch `f` on the idle pooled connection `conn`.
    fn send(&mut self, registry: &Registry, conn: usize, f: FetchRef, now: Instant) {
        let server = self.conns[conn].server;
        let http_timeout = self.maps[self.servers[server].map as usize]
            .cfg
            .http_timeout;
        self.activate(f, conn, now + http_timeout);
        if !self.fill_request(conn, f) {
            self.make_idle(registry, conn, now);
            return;
        }
        self.conns[conn].state = ConnState::Sending;
        self.drive(registry, conn, now);
    }

    /// The fetch's attempt failed for a reason that is not the server's
    /// health (or already recorded): try the next server.
    fn retry_elsewhere(&mut self, f: FetchRef, reason: String) {
        if let Some(fetch) = self.fetch_mut(f) {
            fetch.last_error = reason;
            fetch.stage = Stage::Choosing;
            self.ready.push(f);
        }
    }

    fn server_failed(&mut self, server: usize, reason: &str) {
        self.servers[server]
            .shared
            .counters
            .failure
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now_ms = self.now_ms();
        let shared = &self.servers[server].shared;
        let (rest, went_down) = shared.health.failure(now_ms);
        // Lookups queued for this server's connections go elsewhere now.
        let queued: Vec<FetchRef> = self.servers[server].queue.drain(..).collect();
        for f in queued {
            self.ready_on(f, server);
        }
        let shared = &self.servers[server].shared;
        if went_down {
            crate::warn!(
                "server {} (map {}) is down: {}; resting {}ms",
                shared.cfg.url,
                shared.map_name,
                reason,
                rest.as_millis()
            );
        }
    }

    /// The server answered a request sent at `started`.
    fn server_answered(&mut self, server: usize, started: Instant) {
        let shared = &self.servers[server].shared;
        let started_ms = started.saturating_duration_since(self.epoch).as_millis() as u64;
        let failures = shared.health.success(started_ms);
        if failures > 0 {
            crate::info!(
                "server {} (map {}) is up again after {} failure(s)",
                shared.cfg.url,
                shared.map_name,
                failures
            );
        }
    }

    /// A readiness event for one of this backend's connections.
    pub fn event(&mut self, registry: &Registry, event: &Event, now: Instant) {
        let idx = self.token_idx(event.token());
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        c.peer_closed |= event.is_read_closed() || event.is_error();
        self.drive(registry, idx, now);
        self.run_ready(registry, now);
    }

    /// Advances `conn` as far as its socket allows.
    fn drive(&mut self, registry: &Registry, idx: usize, now: Instant) {
        loop {
            let c = &mut self.conns[idx];
            match c.state {
                ConnState::Connecting => {
                    match c.stream.take_error() {
                        Ok(Some(e)) | Err(e) => {
                            return self.fail(
                                registry,
                                idx,
                                Failure::Server(format!("connect: {e}")),
                                now,
                            )
                        }
                        Ok(None) => {}
                    }
                    match c.stream.peer_addr() {
                        Ok(_) => {
                            c.state = ConnState::Sending;
                            let server = c.server;
                            let http_timeout = self.maps[self.servers[server].map as usize]
                                .cfg
                                .http_timeout;
                            if let Some(f) = self.conns[idx].fetch {
                                self.activate(f, idx, now + http_timeout);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                        Err(e) => {
                            return self.fail(
                                registry,
                                idx,
                                Failure::Server(format!("connect: {e}")),
                                now,
                            )
                        }
                    }
                }
                ConnState::Sending => {
                    while c.wpos < c.wbuf.len() {
                        match c.stream.write(&c.wbuf[c.wpos..]) {
                            Ok(0) => {
                                return self.fail(
                                    registry,
                                    idx,
                                    self.early_failure(idx, "write: connection closed"),
                                    now,
                                )
                            }
                            Ok(n) => c.wpos += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                let why = format!("write: {e}");
                                return self.fail(
                                    registry,
                                    idx,
                                    self.early_failure(idx, &why),
                                    now,
                                );
                            }
                        }
                    }
                    c.state = ConnState::Head;
                }
                ConnState::Head | ConnState::Body { .. } => {
                    return self.read_reply(registry, idx, now)
                }
                ConnState::Idle => {
                    // A pooled connection has nothing to say: EOF or junk both end it.
                    match c.stream.read(&mut self.read_buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        _ => return self.close_conn(registry, idx),
                    }
                }
            }
        }
    }

    /// A failure before any byte of the reply: on a reused connection that is
    /// the server having closed it while idle (retry once, fresh).
    fn early_failure(&self, idx: usize, why: &str) -> Failure {
        let c = &self.conns[idx];
        let fresh_retry_used = c
            .fetch
            .and_then(|f| self.fetches.get(f.idx).filter(|x| x.gen == f.gen))
            .is_some_and(|x| x.fresh_retry_used);
        if c.reused && c.rbuf.is_empty() && !fresh_retry_used {
            Failure::StalePooled
        } else {
            Failure::Server(why.to_string())
        }
    }

    fn read_reply(&mut self, registry: &Registry, idx: usize, now: Instant) {
        loop {
            let c = &mut self.conns[idx];
            let n = match c.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    // EOF.
                    return match &mut c.state {
                        ConnState::Body { dec, .. } => match dec.eof() {
                            Ok(()) => self.reply_done(registry, idx, now),
                            Err(e) => self.fail(
                                registry,
                                idx,
                                Failure::Server(format!("reply: {e}")),
                                now,
                            ),
                        },
                        _ => {
                            let f = self.early_failure(idx, "connection closed before a reply");
                            self.fail(registry, idx, f, now)
                        }
                    };
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let f = self.early_failure(idx, &format!("read: {e}"));
                    return self.fail(registry, idx, f, now);
                }
            };
            c.rbuf.extend_from_slice(&self.read_buf[..n]);
            if let ConnState::Head = c.state {
                match http::parse_head(&c.rbuf) {
                    Ok(None) => continue,
                    Ok(Some(head)) => {
                        c.rbuf.drain(..head.consumed);
                        let max = self.maps[self.servers[c.server].map as usize]
                            .cfg
                            .max_result_bytes;
                        let dec = BodyDecoder::new(head.framing, max);
                        c.state = ConnState::Body { head, dec };
                    }
                    Err(e) => {
                        return self.fail(
                            registry,
                            idx,
                            Failure::Server(format!("unparseable reply: {e}")),
                            now,
                        )
                    }
                }
            }
            let keep_body =
                self.maps[self.servers[c.server].map as usize].cfg.result != ResultMode::Header;
            if let ConnState::Body { dec, .. } = &mut c.state {
                match dec.feed(&c.rbuf, &mut c.body) {
                    Ok((used, done)) => {
                        c.rbuf.drain(..used);
                        if !keep_body {
                            c.body.clear();
                        }
                        if done {
                            return self.reply_done(registry, idx, now);
                        }
                    }
                    Err(e @ HttpError::BodyTooLarge { .. }) => {
                        return self.fail(
                            registry,
                            idx,
                            Failure::Answer(format!("reply: {e}")),
                            now,
                        )
                    }
                    Err(e) => {
                        return self.fail(
                            registry,
                            idx,
                            Failure::Server(format!("reply: {e}")),
                            now,
                        )
                    }
                }
            }
        }
    }

    /// A whole reply was read on `idx`.
    fn reply_done(&mut self, registry: &Registry, idx: usize, now: Instant) {
        let c = &mut self.conns[idx];
        let state = std::mem::replace(&mut c.state, ConnState::Idle);
        let ConnState::Body { mut head, .. } = state else {
            return;
        };
        let server = c.server;
        let verdict = evaluate(
            &self.maps[self.servers[server].map as usize].cfg,
            &mut head,
            &c.body,
            &self.servers[server].shared.cfg.url,
        );
        let reusable = http::reuse(&head, c.rbuf.len()).is_ok();
        let f = c.fetch.take();
        c.body.clear();
        let counters = &self.servers[server].shared.counters;
        counters.latency.observe(c.started.elapsed());
        let kind = if verdict.is_ok() {
            &counters.ok
        } else {
            &counters.http_error
        };
        kind.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = c.started;
        self.server_answered(server, started);
        if reusable {
            self.make_idle(registry, idx, now);
        } else {
            self.close_conn(registry, idx);
        }
        let Some(f) = f else { return };
        self.release_probe(f, server);
        match verdict {
            Ok(outcome) => self.finish(f, outcome),
            Err(msg) => self.retry_elsewhere(f, msg),
        }
        self.run_ready(registry, now);
    }

    /// The attempt on `idx` failed: close it and move its fetch on.
    fn fail(&mut self, registry: &Registry, idx: usize, failure: Failure, now: Instant) {
        let server = self.conns[idx].server;
        let f = self.conns[idx].fetch.take();
        let started = self.conns[idx].started;
        self.close_conn(registry, idx);
        let url = self.servers[server].shared.cfg.url.clone();
        match failure {
            Failure::StalePooled => {
                if let Some(f) = f {
                    if let Some(fetch) = self.fetch_mut(f) {
                        fetch.fresh_retry_used = true;
                    }
                    self.assign(registry, f, server, now, true);
                }
            }
            Failure::Server(why) => {
                self.server_failed(server, &why);
                if let Some(f) = f {
                    self.release_probe(f, server);
                    self.retry_elsewhere(f, format!("{url}: {why}"));
                }
            }
            Failure::Deadline => {
                // The lookup ran out of time; the server did not fail its own
                // http_timeout, so it does not rest.
                if let Some(f) = f {
                    self.release_probe(f, server);
                }
            }
            Failure::Answer(why) => {
                self.server_answered(server, started);
                if let Some(f) = f {
                    self.release_probe(f, server);
                    self.retry_elsewhere(f, format!("{url}: {why}"));
                }
            }
        }
    }

    /// Fetch `f`'s attempt on `server` ended: if it was the server's probe,
    /// free the probe slot (only the probe's holder ever frees it).
    fn release_probe(&mut self, f: FetchRef, server: usize) {
        if let Some(fetch) = self.fetch_mut(f) {
            if fetch.probing == Some(server) {
                fetch.probing = None;
                self.servers[server].shared.health.end_probe();
            }
        }
    }

    /// Returns `idx` to its server's pool, or hands it to a queued fetch.
    fn make_idle(&mut self, registry: &Registry, idx: usize, now: Instant) {
        if self.conns[idx].peer_closed {
            // The server closed right after its reply: not reusable (a
            // fetch queued for a connection moves on through `close_conn`).
            self.close_conn(registry, idx);
            return;
        }
        let c = &mut self.conns[idx];
        c.state = ConnState::Idle;
        c.reused = true;
        c.fetch = None;
        c.rbuf.clear();
        let server = c.server;
        while let Some(f) = self.servers[server].queue.pop_front() {
            if self.fetch_mut(f).is_some() {
                self.send(registry, idx, f, now);
                return;
            }
        }
        self.servers[server].idle.push(idx);
    }

    fn close_conn(&mut self, registry: &Registry, idx: usize) {
        let mut c = self.conns.remove(idx);
        let _ = registry.deregister(&mut c.stream);
        let srv = &mut self.servers[c.server];
        srv.open = srv.open.saturating_sub(1);
        srv.shared.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = srv.idle.iter().position(|&i| i == idx) {
            srv.idle.swap_remove(p);
        }
        // A slot freed: a queued fetch may connect now.
        let server = c.server;
        while let Some(f) = self.servers[server].queue.pop_front() {
            if self.fetch_mut(f).is_some() {
                self.ready_on(f, server);
                break;
            }
        }
    }

    /// Moves a queued fetch to a fresh connection on `server` (from the ready list).
    fn ready_on(&mut self, f: FetchRef, server: usize) {
        if let Some(fetch) = self.fetch_mut(f) {
            fetch.stage = Stage::Choosing;
            // Undo the attempt bookkeeping so next_attempt does not count it twice.
            fetch.attempts = fetch.attempts.saturating_sub(1);
            fetch.tried.retain(|&s| s != server);
            self.ready.push(f);
        }
    }

    /// Handles timers that are due.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        while let Some(Reverse((t, idx, gen))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let f = FetchRef { idx, gen };
            let Some(fetch) = self.fetch_mut(f) else {
                continue;
            };
            let (conn, server_late) = match fetch.stage {
                Stage::Active {
                    conn,
                    attempt_deadline,
                } if now >= attempt_deadline || now >= fetch.deadline => {
                    (conn, now >= attempt_deadline)
                }
                _ if now >= fetch.deadline => {
                    let msg = timeout_text(fetch);
                    self.finish(f, Outcome::Temp(msg));
                    continue;
                }

                _ => continue,
            };
            if self.conns.get(conn).and_then(|c| c.fetch) != Some(f) {
                continue;
            }
            if !server_late {
                let msg = timeout_text(self.fetch_mut(f).expect("checked above"));
                self.fail(registry, conn, Failure::Deadline, now);
                self.finish(f, Outcome::Temp(msg));
                continue;
            }
            let why = match self.conns[conn].state {
                ConnState::Connecting => "connect timed out",
                _ => "no reply within http_timeout",
            };
            self.fail(registry, conn, Failure::Server(why.to_string()), now);
        }
        self.run_ready(registry, now);
    }
}

fn timeout_text(f: &Fetch) -> String {
    if f.last_error.is_empty() {
        "lookup timed out".to_string()
    } else {
        format!("lookup timed out; last error: {}", f.last_error)
    }
}
