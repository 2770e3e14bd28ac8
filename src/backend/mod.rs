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
//! server in random order within `max_attempts` and `lookup_timeout`. A
//! lookup waiting for a busy server's connection moves to another healthy
//! server of the map as soon as one has a free connection. Each fetch ends
//! in exactly one [`Completion`], which the worker turns into answers; this
//! module never touches clients or the cache. The connections themselves,
//! and the rule that a reply belongs to the request written on its
//! connection, are [`conn`]'s; the keep-alive pool and the connection slots
//! (never more than a worker's share of `max_connections` per server) are
//! `pool`'s.

pub mod conn;
pub mod health;
mod pool;
pub mod result;
pub mod server;

pub use server::SharedServer;

use crate::config::MapConfig;
use conn::{Conn, ConnState, Failure};
use health::Availability;
use mio::event::Event;
use mio::{Registry, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Tokens one backend may use, from its base (its connections are slab
/// indexes). The worker gives each backend (one per configuration still
/// finishing fetches) its own span, never one in use.
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
    /// Addresses of the current attempt's server that failed to connect
    /// (the next one is tried, like another mirror).
    addrs_tried: Vec<std::net::SocketAddr>,
    /// This fetch holds `server`'s probe slot.
    probing: Option<usize>,
    last_error: String,
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

    /// The first token of this backend's span.
    pub fn token_base(&self) -> usize {
        self.token_base
    }

    /// A readiness event for one of this backend's connections.
    pub fn event(&mut self, registry: &Registry, event: &Event, now: Instant) {
        let idx = event.token().0 - self.token_base;
        self.conn_event(
            registry,
            idx,
            event.is_read_closed() || event.is_error(),
            now,
        );
        self.run_ready(registry, now);
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

    /// `at` in milliseconds on the backend's clock (since its epoch).
    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// `at` in microseconds on the backend's clock.
    fn us_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
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
            addrs_tried: Vec::new(),
            stage: Stage::Choosing,
            fresh_retry_used: false,
            probing: None,
            last_error: String::new(),
        });
        self.timers.push(Reverse((deadline, idx, gen)));
        self.ready.push(FetchRef { idx, gen });
        self.run_ready(registry, now);
    }

    /// Fetch `f`, unless it ended (its slot empty or another fetch's).
    fn fetch(&self, f: FetchRef) -> Option<&Fetch> {
        self.fetches.get(f.idx).filter(|x| x.gen == f.gen)
    }

    fn fetch_mut(&mut self, f: FetchRef) -> Option<&mut Fetch> {
        self.fetches.get_mut(f.idx).filter(|x| x.gen == f.gen)
    }

    /// The map of a server, by server index.
    fn map_of(&self, server: usize) -> &MapConfig {
        &self.maps[self.servers[server].map as usize].cfg
    }

    /// Gives every fetch between attempts its next attempt.
    fn run_ready(&mut self, registry: &Registry, now: Instant) {
        while let Some(f) = self.ready.pop() {
            self.next_attempt(registry, f, now);
        }
    }

    fn finish(&mut self, f: FetchRef, outcome: Outcome) {
        let Some(fetch) = self.fetch(f) else {
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
    fn choose(&self, map: u16, tried: &[usize], now: Instant) -> Option<(usize, bool)> {
        let now_ms = self.ms_at(now);
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
        let choice = self.choose(map, &tried, now);
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
        fetch.addrs_tried.clear();
        if let Some(old) = fetch.probing.take() {
            self.servers[old].shared.health.end_probe();
        }
        let fetch = self.fetch_mut(f).expect("fetch checked above");
        if probe {
            fetch.probing = Some(server);
        }
        self.assign(registry, f, server, now, false);
    }

    /// Puts fetch `f` on a connection to `server`: an idle pooled one (checked
    /// clean), a new one while `server` has a free slot, or, when its
    /// connections are all busy, another healthy server of the map with a
    /// free one, else `server`'s wait queue. `fresh`: not a pooled
    /// connection (a retry after one failed); a new one is within the limit
    /// like any other (the caller dropped the failed connection without
    /// handing its slot on, so the slot is there).
    fn assign(
        &mut self,
        registry: &Registry,
        f: FetchRef,
        server: usize,
        now: Instant,
        fresh: bool,
    ) {
        if !fresh {
            if let Some(conn) = self.take_idle(registry, server, now) {
                self.send(registry, conn, f, now);
                return;
            }
        }
        let srv = &self.servers[server];
        if srv.open < srv.max_open {
            self.connect(registry, f, server, now);
            return;
        }
        if let Some(other) = self.free_mirror(f, server, now) {
            self.move_fetch(f, server, other);
            return self.assign(registry, f, other, now, false);
        }
        let srv = &mut self.servers[server];
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
        self.retry_elsewhere(f, msg);
    }

    /// Another server of `server`'s map, healthy, not yet tried by `f`, with
    /// an idle connection or room for a new one.
    fn free_mirror(&self, f: FetchRef, server: usize, now: Instant) -> Option<usize> {
        let fetch = self.fetch(f)?;
        let now_ms = self.ms_at(now);
        self.maps[self.servers[server].map as usize]
            .servers
            .iter()
            .copied()
            .filter(|&s| s != server && !fetch.tried.contains(&s))
            .find(|&s| {
                let rt = &self.servers[s];
                rt.shared.health.availability(now_ms) == Availability::Up
                    && (!rt.idle.is_empty() || rt.open < rt.max_open)
            })
    }

    /// Fetch `f`'s attempt moves from `from` (where it waited for a
    /// connection, not yet tried) to `to`.
    fn move_fetch(&mut self, f: FetchRef, from: usize, to: usize) {
        let Some(fetch) = self.fetch_mut(f) else {
            return;
        };
        fetch.tried.retain(|&s| s != from);
        fetch.tried.push(to);
        fetch.stage = Stage::Choosing;
        // Addresses that failed were `from`'s.
        fetch.addrs_tried.clear();
        let probe = fetch.probing == Some(from);
        if probe {
            fetch.probing = None;
            self.servers[from].shared.health.end_probe();
        }
    }

    /// A fetch for a connection of `server` that just came free: one
    /// waiting in `server`'s own queue, else one waiting at a busier mirror
    /// of the same map that has not tried `server` (so one slow mirror
    /// cannot hold lookups while another idles). None while `server` is not
    /// healthy: what waits for it then goes back to choosing.
    fn take_queued(&mut self, server: usize, now: Instant) -> Option<FetchRef> {
        let now_ms = self.ms_at(now);
        if self.servers[server].shared.health.availability(now_ms) != Availability::Up {
            self.requeue_all(server);
            return None;
        }
        while let Some(f) = self.servers[server].queue.pop_front() {
            if self.fetch_mut(f).is_some() {
                return Some(f);
            }
        }
        let map = self.servers[server].map as usize;
        for k in 0..self.maps[map].servers.len() {
            let other = self.maps[map].servers[k];
            if other == server || self.servers[other].queue.is_empty() {
                continue;
            }
            let pos = self.servers[other]
                .queue
                .iter()
                .position(|&q| self.fetch(q).is_some_and(|x| !x.tried.contains(&server)));
            if let Some(p) = pos {
                let f = self.servers[other].queue.remove(p)?;
                self.move_fetch(f, other, server);
                return Some(f);
            }
        }
        None
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

    /// The fetch's attempt failed for a reason that is not the server's
    /// health (or already recorded): try the next server.
    fn retry_elsewhere(&mut self, f: FetchRef, reason: String) {
        if let Some(fetch) = self.fetch_mut(f) {
            fetch.last_error = reason;
            fetch.stage = Stage::Choosing;
            self.ready.push(f);
        }
    }

    fn server_failed(&mut self, server: usize, reason: &str, now: Instant) {
        let shared = &self.servers[server].shared;
        shared.counters.failure.fetch_add(1, Ordering::Relaxed);
        let (rest, went_down) = shared.health.failure(self.us_at(now));
        // Lookups queued for this server's connections go elsewhere now.
        self.requeue_all(server);
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
        let failures = shared.health.success(self.us_at(started));
        if failures > 0 {
            crate::info!(
                "server {} (map {}) is up again after {} failure(s)",
                shared.cfg.url,
                shared.map_name,
                failures
            );
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

    /// Every fetch queued for `server`'s connections goes back to choosing
    /// ([`Backend::ready_on`]), in queue order.
    fn requeue_all(&mut self, server: usize) {
        while let Some(f) = self.servers[server].queue.pop_front() {
            self.ready_on(f, server);
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
                let msg = timeout_text(self.fetch(f).expect("checked above"));
                self.fail(registry, conn, Failure::Deadline, now);
                self.finish(f, Outcome::Temp(msg));
                continue;
            }
            let why = match self.conns[conn].state {
                // The TLS handshake counts within connect_timeout.
                ConnState::Connecting | ConnState::Handshaking => "connect timed out",
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
