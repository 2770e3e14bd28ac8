//! Start-up, reload and shutdown: from a validated [`Config`] to running
//! workers, and the thread that turns signals into messages for them.
//!
//! This module owns the order of things. At start: raise the open-files
//! limit, bind every listener before any thread starts (so a bad address is
//! one clear error), start the workers and the stats endpoint. On SIGHUP:
//! load the file again; if it is invalid, log its `FILE:LINE` errors and keep
//! serving; else bind the new listeners, keep map ids, server health and cache
//! entries where a map's servers did not change, and hand each worker its new
//! state (it keeps every client connection). On SIGTERM or SIGINT: workers stop
//! accepting, finish their lookups, flush, and the process exits 0.

use crate::backend::{MapServers, SharedServer};
use crate::cache::{Cache, Ttls};
use crate::config::{Config, Listen, MapConfig, MAX_MAPS};
use crate::metrics::{self, header, label};
use crate::net::{Bound, Listener};
use crate::worker::{ListenerUpdate, Msg, Proto, Shared, Stats, Worker};
use crossbeam_channel::Sender;
use hashbrown::HashMap;
use mio::{Poll, Token, Waker};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Raises the soft open-files limit to the hard limit (10,000 Postfix
/// connections need 10,000 descriptors). Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let Some(rl) = metrics::nofile_limit() else {
        return 0;
    };
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: setrlimit with a valid, initialised struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    rl.rlim_cur
}

type Mailboxes = Arc<Vec<(Sender<Msg>, Arc<Waker>)>>;

/// The daemon's state between reloads (owned by the signal thread).
struct State {
    cfg_path: PathBuf,
    /// The shared state the workers run on now (the stats endpoint reads it).
    current: Arc<Mutex<Arc<Shared>>>,
    /// Stable map ids by name: cache keys and counters survive reloads.
    ids: HashMap<String, u16>,
    /// The listeners in force (their Unix socket files go when they do,
    /// and at exit).
    listens: Vec<(Listen, Proto)>,
    /// The demo's `--backend`, applied to every load of the file.
    backend: Option<SocketAddr>,
}

/// Map ids for `cfg`'s maps and then its policies (in that order), adding
/// new names to `ids` (a policy is named `policy:NAME` there).
fn assign_ids(cfg: &Config, ids: &mut HashMap<String, u16>) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for m in cfg.maps.iter().chain(&cfg.policies) {
        let name = m.id_name();
        let next = ids.len();
        let id = match ids.get(&name) {
            Some(&id) => id,
            None if next < MAX_MAPS => {
                ids.insert(name, next as u16);
                next as u16
            }
            None => {
                return Err(format!(
                    "more than {MAX_MAPS} distinct map names since start; restart httpmapd"
                ))
            }
        };
        out.push(id);
    }
    Ok(out)
}

/// Points every plain-HTTP server at the sample backend's default address
/// ([`crate::demo_backend::DEFAULT_ADDR`]) to `addr` instead: the demo's
/// `--backend`, applied at start and after each reload.
pub fn point_servers_at(cfg: &mut Config, addr: SocketAddr) {
    let default_addr = crate::demo_backend::DEFAULT_ADDR;
    let default: SocketAddr = default_addr.parse().expect("a valid address");
    if addr == default {
        return;
    }
    for s in cfg.maps.iter_mut().flat_map(|m| m.servers.iter_mut()) {
        if !s.tls && s.addrs == [default] {
            s.addrs = vec![addr];
            s.host_name = addr.ip().to_string();
            s.port = addr.port();
            s.host = addr.to_string();
            s.url = s.url.replacen(default_addr, &s.host, 1);
        }
    }
}

/// The listeners `cfg` asks for, with their protocols.
fn listens_of(cfg: &Config, ids: &[u16]) -> Vec<(Listen, Proto)> {
    let mut v: Vec<(Listen, Proto)> = cfg
        .daemon
        .socketmap_listen
        .iter()
        .map(|l| {
            (
                l.clone(),
                Proto::Socketmap {
                    max_query: cfg.daemon.max_query_size as u32,
                    max_reply: cfg.daemon.max_reply_size as u32,
                },
            )
        })
        .collect();
    for (m, &id) in cfg.maps.iter().chain(&cfg.policies).zip(ids) {
        if let Some(l) = &m.tcp_listen {
            let proto = match &m.kind {
                crate::config::MapKind::Table => Proto::TcpTable { map: id },
                crate::config::MapKind::Policy(p) => Proto::Policy {
                    map: id,
                    max_request: p.max_request_bytes as u32,
                },
            };
            v.push((l.clone(), proto));
        }
    }
    v
}

/// Whether a map's cached answers stay valid under a new config of it.
fn same_answers(a: &MapConfig, b: &MapConfig) -> bool {
    let urls = |m: &MapConfig| m.servers.iter().map(|s| s.url.clone()).collect::<Vec<_>>();
    urls(a) == urls(b)
        && a.result == b.result
        && a.separator == b.separator
        && a.fold_case == b.fold_case
        && a.headers == b.headers
        && a.require_key_echo == b.require_key_echo
        && a.kind == b.kind
}

/// Builds the shared state for `cfg`; reuses `prev`'s server health where a
/// server did not change. Returns it and the map ids whose cache must go.
fn build_shared(
    cfg: Arc<Config>,
    ids: &[u16],
    cache: Arc<Cache>,
    stats: Arc<Stats>,
    mailboxes: Mailboxes,
    prev: Option<&Shared>,
) -> (Shared, Vec<u16>) {
    let len = ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
    let len = len.max(prev.map_or(0, |p| p.maps.len()));
    let mut maps: Vec<Option<MapServers>> = (0..len).map(|_| None).collect();
    let mut ttls: Vec<Ttls> = vec![Ttls::OFF; len];
    let mut purge = Vec::new();
    let mut map_by_name = HashMap::new();
    for (m, &id) in cfg.maps.iter().chain(&cfg.policies).zip(ids) {
        let old = prev
            .and_then(|p| p.maps.get(id as usize))
            .and_then(|o| o.as_ref());
        if let Some(old) = old {
            if !same_answers(&old.cfg, m) {
                purge.push(id);
            }
        }
        // The same TLS inputs: keep the old client, and with it the TLS
        // sessions new connections resume.
        let mut m = m.clone();
        let same_tls = match (old.and_then(|o| o.cfg.tls.as_ref()), &m.tls) {
            (Some(o), Some(n)) if o.fingerprint == n.fingerprint => {
                m.tls = Some(o.clone());
                true
            }
            (None, None) => true,
            _ => false,
        };
        let m = Arc::new(m);
        let servers = m
            .servers
            .iter()
            .map(|s| {
                let reuse = old
                    .filter(|o| {
                        same_tls
                            && o.cfg.retry_interval == m.retry_interval
                            && o.cfg.max_connections == m.max_connections
                    })
                    .and_then(|o| {
                        // `tls` follows from the URL's scheme; `host` does
                        // not always: the demo's --backend rewrites it, and
                        // the URL only when it spells the backend's address.
                        o.servers
                            .iter()
                            .find(|x| x.cfg.url == s.url && x.cfg.host == s.host)
                    });
                match reuse {
                    Some(x) => {
                        // Health and counters kept; the addresses of this load.
                        x.set_addrs(s.addrs.clone());
                        x.clone()
                    }
                    None => Arc::new(SharedServer::new(s.clone(), &m)),
                }
            })
            .collect();
        maps[id as usize] = Some(MapServers {
            cfg: m.clone(),
            servers,
        });
        ttls[id as usize] = Ttls {
            ttl: m.ttl,
            negative_ttl: m.negative_ttl,
            stale_ttl: m.stale_ttl,
            // A policy's cached action is never refreshed in the background:
            // the hit that would start it has no request body to send.
            refresh_ahead_percent: match m.kind {
                crate::config::MapKind::Table => cfg.cache.refresh_ahead_percent,
                crate::config::MapKind::Policy(_) => 0,
            },
            stale_negative: m.stale_negative,
        };
        if m.kind == crate::config::MapKind::Table {
            map_by_name.insert(m.name.as_bytes().to_vec(), id);
        }
    }
    if let Some(p) = prev {
        for (id, m) in p.maps.iter().enumerate() {
            if m.is_some() && maps.get(id).is_none_or(|x| x.is_none()) {
                purge.push(id as u16);
            }
        }
    }
    // A map whose answers change gets a new generation: its lookups under
    // the new configuration never join (or store) a fetch of the old one.
    let gens = (0..len as u16)
        .map(|id| cache.gen(id).wrapping_add(u32::from(purge.contains(&id))))
        .collect();
    let own_writes = prev.map_or_else(Arc::default, |p| p.own_writes.clone());
    let fingerprints = maps
        .iter()
        .map(|m| m.as_ref().map_or(0, |m| m.cfg.answers_fingerprint()))
        .collect();
    let shared = Shared {
        cfg,
        gens,
        fingerprints,
        cache,
        stats,
        maps,
        ttls,
        map_by_name,
        mailboxes,
        own_writes,
    };
    (shared, purge)
}

/// Binds `listens` for `workers` workers: one socket each per address.
fn bind_all(
    listens: &[(Listen, Proto)],
    cfg: &Config,
    workers: usize,
) -> Result<Vec<Vec<Listener>>, String> {
    let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    for (l, _) in listens {
        let b0 = Bound::bind(l, &cfg.daemon).map_err(|e| format!("cannot listen on {l}: {e}"))?;
        for w in per_worker.iter_mut().skip(1) {
            let b = b0
                .for_worker(l)
                .map_err(|e| format!("cannot listen on {l}: {e}"))?;
            w.push(b.into_mio());
        }
        per_worker[0].push(b0.into_mio());
    }
    Ok(per_worker)
}

/// Binds the admin socket (blocking; created with no permission beyond
/// `mode`, then owner and group set).
fn bind_admin(
    path: &std::path::Path,
    a: &crate::config::AdminSocket,
) -> Result<std::os::unix::net::UnixListener, String> {
    let l = crate::net::bind_unix(path, a.mode, a.owner, a.group)
        .map_err(|e| format!("cannot listen on {} (admin_socket): {e}", path.display()))?;
    l.set_nonblocking(false)
        .map_err(|e| format!("admin_socket: {e}"))?;
    Ok(l)
}

/// Runs the daemon until SIGTERM/SIGINT. Errors are start-up failures.
/// `backend`: the demo's `--backend` (see [`point_servers_at`]).
pub fn run(mut cfg: Config, cfg_path: PathBuf, backend: Option<SocketAddr>) -> Result<(), String> {
    if let Some(addr) = backend {
        point_servers_at(&mut cfg, addr);
    }
    crate::log::set_level(cfg.daemon.log_level);
    crate::log::init(cfg.daemon.log_timestamps);
    let signals = install_signals()?;
    let nofile = raise_nofile_limit();
    let cfg = Arc::new(cfg);
    let workers = cfg.daemon.workers;
    let mut ids = HashMap::new();
    let map_ids = assign_ids(&cfg, &mut ids)?;
    let listens = listens_of(&cfg, &map_ids);
    let per_worker = bind_all(&listens, &cfg, workers)?;
    for m in &cfg.maps {
        if m.max_connections < workers {
            crate::warn!(
                "map {}: max_connections = {} is below workers = {workers}: each worker keeps one connection per server, {workers} in all",
                m.name,
                m.max_connections
            );
        }
    }
    let admin_listener = match &cfg.daemon.admin.path {
        Some(p) => Some(bind_admin(p, &cfg.daemon.admin)?),
        None => None,
    };
    let stats_listener = match cfg.daemon.stats_listen {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .map_err(|e| format!("cannot listen on {a} (stats_listen): {e}"))?,
        ),
        None => None,
    };

    let mut polls = Vec::new();
    let mut mailboxes = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..workers {
        let poll = Poll::new().map_err(|e| format!("cannot create a poll: {e}"))?;
        let waker = Waker::new(poll.registry(), Token(usize::MAX))
            .map_err(|e| format!("cannot create a waker: {e}"))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        polls.push(poll);
        mailboxes.push((tx, Arc::new(waker)));
        receivers.push(rx);
    }
    let (shared, _) = build_shared(
        cfg.clone(),
        &map_ids,
        Arc::new(Cache::new(cfg.cache.max_entries, cfg.cache.max_memory)),
        Arc::new(Stats::default()),
        Arc::new(mailboxes),
        None,
    );
    let shared = Arc::new(shared);

    let mut handles = Vec::new();
    for (id, ((poll, rx), sockets)) in polls.into_iter().zip(receivers).zip(per_worker).enumerate()
    {
        let listeners = sockets
            .into_iter()
            .zip(&listens)
            .map(|(s, (l, p))| (s, *p, l.clone()))
            .collect();
        let w = Worker::new(id as u32, poll, shared.clone(), rx, listeners)
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        let h = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || w.run())
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        handles.push(h);
    }

    let current = Arc::new(Mutex::new(shared.clone()));
    if let Some(l) = stats_listener {
        let (c1, c2) = (current.clone(), current.clone());
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                metrics::serve(
                    l,
                    move || render_metrics(&c1.lock().unwrap_or_else(|e| e.into_inner())),
                    move || health(&c2.lock().unwrap_or_else(|e| e.into_inner())),
                )
            })
            .map_err(|e| format!("cannot start the stats thread: {e}"))?;
    }
    crate::info!(
        "httpmapd {} started: {} worker(s), {} map(s){}, listening on {}{}; open files limit {}",
        env!("CARGO_PKG_VERSION"),
        workers,
        cfg.maps.len(),
        match cfg.policies.len() {
            0 => String::new(),
            n => format!(", {n} policy service(s)"),
        },
        describe(&listens, &shared),
        cfg.daemon
            .stats_listen
            .map(|a| format!(", stats on {a}"))
            .unwrap_or_default(),
        nofile
    );

    crate::resolver::spawn(current.clone())
        .map_err(|e| format!("cannot start the resolver thread: {e}"))?;
    if let Some(l) = admin_listener {
        crate::admin::spawn(l, current.clone())
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    }
    crate::notify::ready(&format_status(&shared, true));
    let state = State {
        cfg_path,
        current: current.clone(),
        ids,
        listens,
        backend,
    };
    spawn_signal_thread(state, signals)?;
    for h in handles {
        let _ = h.join();
    }
    // Unix socket files of the configuration in force at the end.
    let last = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(p) = &cfg.daemon.admin.path {
        let _ = std::fs::remove_file(p);
    }
    for l in last.cfg.daemon.socketmap_listen.iter().chain(
        last.cfg
            .maps
            .iter()
            .chain(&last.cfg.policies)
            .filter_map(|m| m.tcp_listen.as_ref()),
    ) {
        if let Listen::Unix(p) = l {
            let _ = std::fs::remove_file(p);
        }
    }
    crate::info!("stopped");
    Ok(())
}

fn describe(listens: &[(Listen, Proto)], shared: &Shared) -> String {
    listens
        .iter()
        .map(|(l, p)| match p {
            Proto::Socketmap { .. } => format!("socketmap {l}"),
            Proto::Policy { map, .. } => format!(
                "policy {l} ({})",
                shared.map(*map).map_or("?", |m| m.name.as_str())
            ),
            Proto::TcpTable { map } => {
                format!(
                    "tcp {l} (map {})",
                    shared.map(*map).map_or("?", |m| m.name.as_str())
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// SIGHUP: load the config again and hand it to the workers, or refuse it;
/// systemd hears `RELOADING=1` then `READY=1` either way.
fn reload(state: &mut State) {
    crate::notify::reloading();
    let ok = try_reload(state);
    let shared = state
        .current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    shared.stats.reloads.record(ok);
    crate::notify::ready(&format_status(&shared, ok));
}

/// The `STATUS=` line systemd shows.
fn format_status(shared: &Shared, last_reload_ok: bool) -> String {
    format!(
        "serving {} map(s){}",
        shared.cfg.maps.len(),
        if last_reload_ok {
            ""
        } else {
            "; the last reload was refused (see the log)"
        }
    )
}

/// Loads and applies the file; false (logged) when it is refused.
fn try_reload(state: &mut State) -> bool {
    let path = state.cfg_path.display().to_string();
    let mut cfg = match crate::config::load(&state.cfg_path) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.0 {
                crate::error!("reload refused, the old configuration keeps serving: {e}");
            }
            return false;
        }
    };
    if let Some(addr) = state.backend {
        point_servers_at(&mut cfg, addr);
    }
    let prev = state
        .current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let workers = prev.cfg.daemon.workers;
    if cfg.daemon.workers != workers {
        crate::warn!(
            "reload: workers changed from {workers} to {}; that takes a restart",
            cfg.daemon.workers
        );
        cfg.daemon.workers = workers;
    }
    if cfg.daemon.stats_listen != prev.cfg.daemon.stats_listen {
        crate::warn!("reload: stats_listen changed; that takes a restart");
    }
    if cfg.daemon.admin != prev.cfg.daemon.admin {
        crate::warn!("reload: admin_socket changed; that takes a restart");
        cfg.daemon.admin = prev.cfg.daemon.admin.clone();
    }
    let mut ids = state.ids.clone();
    let map_ids = match assign_ids(&cfg, &mut ids) {
        Ok(v) => v,
        Err(e) => {
            crate::error!("reload refused: {e}");
            return false;
        }
    };
    let listens = listens_of(&cfg, &map_ids);
    let new_listens: Vec<(Listen, Proto)> = listens
        .iter()
        .filter(|(l, _)| !state.listens.iter().any(|(o, _)| o == l))
        .cloned()
        .collect();
    let mut sockets = match bind_all(&new_listens, &cfg, workers) {
        Ok(s) => s,
        Err(e) => {
            crate::error!("reload refused, the old configuration keeps serving: {e}");
            return false;
        }
    };
    crate::log::set_level(cfg.daemon.log_level);
    crate::log::set_timestamps(cfg.daemon.log_timestamps);
    let cfg = Arc::new(cfg);
    let (shared, purge) = build_shared(
        cfg.clone(),
        &map_ids,
        prev.cache.clone(),
        prev.stats.clone(),
        prev.mailboxes.clone(),
        Some(&prev),
    );
    for &id in &purge {
        prev.cache.set_gen(id, shared.gens[id as usize]);
        prev.cache.purge_prefix(&id.to_be_bytes());
    }
    prev.cache
        .resize(cfg.cache.max_entries, cfg.cache.max_memory);
    let shared = Arc::new(shared);
    for (w, (tx, waker)) in prev.mailboxes.iter().enumerate() {
        let mut fresh = std::mem::take(&mut sockets[w]).into_iter();
        let updates = listens
            .iter()
            .map(|(l, p)| ListenerUpdate {
                listen: l.clone(),
                proto: *p,
                socket: if new_listens.iter().any(|(n, _)| n == l) {
                    fresh.next()
                } else {
                    None
                },
            })
            .collect();
        let _ = tx.send(Msg::Reload {
            shared: shared.clone(),
            listeners: updates,
        });
        let _ = waker.wake();
    }
    for (l, _) in &state.listens {
        if let Listen::Unix(p) = l {
            if !listens.iter().any(|(n, _)| n == l) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let removed = state
        .listens
        .iter()
        .filter(|(l, _)| !listens.iter().any(|(n, _)| n == l))
        .count();
    crate::info!(
        "reloaded {path}: {} map(s), listening on {} ({} listener(s) added, {removed} removed; cache dropped for {} map(s))",
        cfg.maps.len(),
        describe(&listens, &shared),
        new_listens.len(),
        purge.len()
    );
    *state.current.lock().unwrap_or_else(|e| e.into_inner()) = shared;
    state.ids = ids;
    state.listens = listens;
    true
}

fn sum(
    shared: &Shared,
    f: impl Fn(&crate::metrics::MapCounters) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    shared
        .stats
        .maps
        .iter()
        .map(|m| f(m).load(Ordering::Relaxed))
        .sum()
}

/// One line with the main counters (SIGUSR1).
pub fn counters_line(shared: &Shared) -> String {
    let c = &shared.stats.counters;
    let s = &shared.cache.stats;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "counters: connections_open={} connections_total={} requests={} found={} not_found={} temporary={} stale={} bad_requests={} cache_entries={} cache_bytes={} cache_hits={} cache_misses={} coalesced={} evictions={} refreshes={}",
        l(&c.connections_open),
        l(&c.connections_total),
        l(&c.requests),
        sum(shared, |m| &m.found),
        sum(shared, |m| &m.not_found),
        sum(shared, |m| &m.temporary),
        sum(shared, |m| &m.stale),
        l(&c.bad_requests),
        shared.cache.len(),
        shared.cache.bytes(),
        sum(shared, |m| &m.cache_hits),
        sum(shared, |m| &m.cache_misses),
        l(&s.joined),
        l(&s.evictions),
        l(&s.refreshes),
    )
}

/// The `/metrics` page.
pub fn render_metrics(shared: &Shared) -> String {
    let mut o = String::with_capacity(8192);
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let all: Vec<(u16, &MapServers)> = shared
        .maps
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.as_ref().map(|m| (i as u16, m)))
        .collect();
    let is_table = |m: &MapServers| m.cfg.kind == crate::config::MapKind::Table;
    let maps: Vec<(u16, &MapServers)> = all.iter().copied().filter(|(_, m)| is_table(m)).collect();
    let policies: Vec<(u16, &MapServers)> =
        all.iter().copied().filter(|(_, m)| !is_table(m)).collect();
    render_policies(&mut o, shared, &policies);

    header(
        &mut o,
        "httpmapd_build_info",
        "gauge",
        "The running httpmapd's version (always 1).",
    );
    let _ = writeln!(
        o,
        "httpmapd_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let r = &shared.stats.reloads;
    header(
        &mut o,
        "httpmapd_config_last_reload_successful",
        "gauge",
        "1 if the last reload (SIGHUP) took effect, or none was tried; 0 if it was refused (the previous configuration keeps serving).",
    );
    let _ = writeln!(
        o,
        "httpmapd_config_last_reload_successful {}",
        u8::from(r.last_ok.load(Ordering::Relaxed))
    );
    header(
        &mut o,
        "httpmapd_config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the configuration in force was loaded (start or reload), Unix time.",
    );
    let _ = writeln!(
        o,
        "httpmapd_config_last_reload_success_timestamp_seconds {}",
        l(&r.last_success_unix)
    );
    header(
        &mut o,
        "httpmapd_config_reloads_total",
        "counter",
        "Reloads by result (success, failure).",
    );
    for (result, v) in [("success", &r.successes), ("failure", &r.failures)] {
        let _ = writeln!(
            o,
            "httpmapd_config_reloads_total{{result=\"{result}\"}} {}",
            l(v)
        );
    }
    header(
        &mut o,
        "httpmapd_lookups_total",
        "counter",
        "Lookups answered, by map and outcome (found, not_found, temporary, stale).",
    );
    for (id, m) in &maps {
        let c = &shared.stats.maps[*id as usize];
        let name = label(&m.cfg.name);
        for (outcome, v) in [
            ("found", &c.found),
            ("not_found", &c.not_found),
            ("temporary", &c.temporary),
            ("stale", &c.stale),
        ] {
            let _ = writeln!(
                o,
                "httpmapd_lookups_total{{map=\"{name}\",outcome=\"{outcome}\"}} {}",
                l(v)
            );
        }
    }
    header(
        &mut o,
        "httpmapd_fetch_duration_seconds",
        "histogram",
        "Time from a cache miss to the servers' answer, by map.",
    );
    for (id, m) in &maps {
        shared.stats.maps[*id as usize].fetch_latency.render(
            &mut o,
            "httpmapd_fetch_duration_seconds",
            &format!("map=\"{}\"", label(&m.cfg.name)),
        );
    }
    for (name, help, f) in [
        (
            "httpmapd_cache_hits_total",
            "Lookups answered from a fresh cache entry, by map.",
            (|c| &c.cache_hits)
                as fn(&crate::metrics::MapCounters) -> &std::sync::atomic::AtomicU64,
        ),
        (
            "httpmapd_cache_misses_total",
            "Lookups not answered from the cache (fetched, joined a fetch, or refused), by map.",
            |c| &c.cache_misses,
        ),
    ] {
        header(&mut o, name, "counter", help);
        for (id, m) in &maps {
            let _ = writeln!(
                o,
                "{name}{{map=\"{}\"}} {}",
                label(&m.cfg.name),
                l(f(&shared.stats.maps[*id as usize]))
            );
        }
    }
    let cs = &shared.cache.stats;
    for (name, help, v) in [
        (
            "httpmapd_cache_coalesced_total",
            "Misses that joined a fetch already in flight.",
            &cs.joined,
        ),
        (
            "httpmapd_cache_evictions_total",
            "Entries evicted to make room.",
            &cs.evictions,
        ),
        (
            "httpmapd_cache_refreshes_total",
            "Background refreshes of entries near expiry.",
            &cs.refreshes,
        ),
        (
            "httpmapd_cache_not_stored_total",
            "Results answered but not stored: larger than max_memory, or fetched under a configuration a reload replaced.",
            &cs.not_stored,
        ),
        (
            "httpmapd_requests_total",
            "Requests received from clients.",
            &shared.stats.counters.requests,
        ),
        (
            "httpmapd_bad_requests_total",
            "Malformed or oversized client requests.",
            &shared.stats.counters.bad_requests,
        ),
        (
            "httpmapd_client_connections_total",
            "Client connections accepted.",
            &shared.stats.counters.connections_total,
        ),
    ] {
        header(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", l(v));
    }
    header(
        &mut o,
        "httpmapd_client_connections_open",
        "gauge",
        "Client connections open.",
    );
    let _ = writeln!(
        o,
        "httpmapd_client_connections_open {}",
        l(&shared.stats.counters.connections_open)
    );
    header(
        &mut o,
        "httpmapd_cache_entries",
        "gauge",
        "Entries in the cache, by map.",
    );
    for (id, m) in &maps {
        let _ = writeln!(
            o,
            "httpmapd_cache_entries{{map=\"{}\"}} {}",
            label(&m.cfg.name),
            shared.cache.map_len(*id)
        );
    }
    for (name, help, v) in [
        (
            "httpmapd_cache_max_entries",
            "The cache's bound on entries ([cache] max_entries).",
            shared.cache.max_entries(),
        ),
        (
            "httpmapd_cache_bytes",
            "Bytes the cache holds: keys, values and per-entry overhead.",
            shared.cache.bytes(),
        ),
        (
            "httpmapd_cache_max_bytes",
            "The cache's byte budget ([cache] max_memory).",
            shared.cache.max_bytes(),
        ),
    ] {
        header(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    // Every server once, with its labels (a policy's map label is
    // `policy:NAME`).
    let servers: Vec<(String, &SharedServer)> = all
        .iter()
        .flat_map(|(_, m)| {
            let name = m.cfg.id_name();
            m.servers.iter().map(move |s| {
                let lb = format!("map=\"{}\",server=\"{}\"", label(&name), label(&s.cfg.url));
                (lb, &**s)
            })
        })
        .collect();
    header(
        &mut o,
        "httpmapd_server_requests_total",
        "counter",
        "Requests to servers, by outcome (ok, http_error, failure).",
    );
    for (lb, s) in &servers {
        for (outcome, v) in [
            ("ok", &s.counters.ok),
            ("http_error", &s.counters.http_error),
            ("failure", &s.counters.failure),
        ] {
            let _ = writeln!(
                o,
                "httpmapd_server_requests_total{{{lb},outcome=\"{outcome}\"}} {}",
                l(v)
            );
        }
    }
    header(
        &mut o,
        "httpmapd_server_protocol_errors_total",
        "counter",
        "Replies and bytes a server sent that could not be trusted to answer their request: stray_bytes (on an idle connection or behind a reply), echo_mismatch (the key echo differs), echo_missing (require_key_echo).",
    );
    for (lb, s) in &servers {
        for (kind, v) in [
            ("stray_bytes", &s.counters.stray_bytes),
            ("echo_mismatch", &s.counters.echo_mismatch),
            ("echo_missing", &s.counters.echo_missing),
        ] {
            let _ = writeln!(
                o,
                "httpmapd_server_protocol_errors_total{{{lb},kind=\"{kind}\"}} {}",
                l(v)
            );
        }
    }
    header(
        &mut o,
        "httpmapd_server_connects_total",
        "counter",
        "Connections opened to the server.",
    );
    for (lb, s) in &servers {
        let _ = writeln!(
            o,
            "httpmapd_server_connects_total{{{lb}}} {}",
            l(&s.counters.connects)
        );
    }
    header(
        &mut o,
        "httpmapd_server_tls_handshakes_total",
        "counter",
        "TLS handshakes completed with the server, by whether they resumed an earlier session (resumed=\"true\") or were full.",
    );
    for (lb, s) in &servers {
        for (resumed, v) in [
            ("false", &s.counters.tls_full),
            ("true", &s.counters.tls_resumed),
        ] {
            let _ = writeln!(
                o,
                "httpmapd_server_tls_handshakes_total{{{lb},resumed=\"{resumed}\"}} {}",
                l(v)
            );
        }
    }
    header(
        &mut o,
        "httpmapd_server_up",
        "gauge",
        "1 if the server is healthy, 0 while it rests after failures.",
    );
    for (lb, s) in &servers {
        let _ = writeln!(
            o,
            "httpmapd_server_up{{{lb}}} {}",
            u8::from(s.health.is_up())
        );
    }
    header(
        &mut o,
        "httpmapd_server_connections",
        "gauge",
        "Connections open to the server, all workers together.",
    );
    for (lb, s) in &servers {
        let _ = writeln!(
            o,
            "httpmapd_server_connections{{{lb}}} {}",
            s.open.load(Ordering::Relaxed)
        );
    }
    header(
        &mut o,
        "httpmapd_server_request_duration_seconds",
        "histogram",
        "Duration of answered server requests.",
    );
    for (lb, s) in &servers {
        s.counters
            .latency
            .render(&mut o, "httpmapd_server_request_duration_seconds", lb);
    }
    if shared.cfg.shared_cache.is_some() {
        render_shared_cache(&mut o, shared);
    }
    crate::metrics::render_process(&mut o);
    o
}

/// The policy services' families (only when there are some).
fn render_policies(o: &mut String, shared: &Shared, policies: &[(u16, &MapServers)]) {
    if policies.is_empty() {
        return;
    }
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    header(
        o,
        "httpmapd_policy_requests_total",
        "counter",
        "Policy requests received from Postfix, by policy service.",
    );
    for (id, m) in policies {
        let c = &shared.stats.maps[*id as usize];
        let _ = writeln!(
            o,
            "httpmapd_policy_requests_total{{policy=\"{}\"}} {}",
            label(&m.cfg.name),
            l(&c.policy_requests)
        );
    }
    header(
        o,
        "httpmapd_policy_actions_total",
        "counter",
        "Actions a policy's servers gave (from a server or the cache), by first word (4xx/5xx: numeric replies).",
    );
    for (id, m) in policies {
        let c = &shared.stats.maps[*id as usize];
        for (i, a) in crate::metrics::POLICY_ACTIONS.iter().enumerate() {
            let _ = writeln!(
                o,
                "httpmapd_policy_actions_total{{policy=\"{}\",action=\"{a}\"}} {}",
                label(&m.cfg.name),
                l(&c.policy_actions[i])
            );
        }
    }
    header(
        o,
        "httpmapd_policy_default_actions_total",
        "counter",
        "Policy requests answered with default_action: no server gave an action.",
    );
    for (id, m) in policies {
        let c = &shared.stats.maps[*id as usize];
        let _ = writeln!(
            o,
            "httpmapd_policy_default_actions_total{{policy=\"{}\"}} {}",
            label(&m.cfg.name),
            l(&c.policy_defaults)
        );
    }
    header(
        o,
        "httpmapd_policy_duration_seconds",
        "histogram",
        "Time from a policy request's fetch to its servers' answer, by policy service.",
    );
    for (id, m) in policies {
        shared.stats.maps[*id as usize].fetch_latency.render(
            o,
            "httpmapd_policy_duration_seconds",
            &format!("policy=\"{}\"", label(&m.cfg.name)),
        );
    }
}

/// The shared cache's counters (only with `[shared_cache]`).
fn render_shared_cache(o: &mut String, shared: &Shared) {
    let s = &shared.stats.l2;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, v) in [
        (
            "httpmapd_shared_cache_hits_total",
            "Lookups answered by the shared cache (a fresh value).",
            &s.hits,
        ),
        (
            "httpmapd_shared_cache_stale_total",
            "Shared-cache values past their freshness, kept for a stale answer while the servers were asked.",
            &s.stale_hits,
        ),
        (
            "httpmapd_shared_cache_misses_total",
            "Lookups the shared cache had no value for.",
            &s.misses,
        ),
        (
            "httpmapd_shared_cache_writes_total",
            "Values written to the shared cache.",
            &s.writes,
        ),
        (
            "httpmapd_shared_cache_invalidations_total",
            "Keys the shared cache said another connection changed.",
            &s.invalidations,
        ),
        (
            "httpmapd_shared_cache_purges_total",
            "Purges received on the admin socket.",
            &s.purges,
        ),
    ] {
        header(o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", l(v));
    }
    header(
        o,
        "httpmapd_shared_cache_claims_total",
        "counter",
        "Claims on cold keys, by result: won (this node fetched), lost (another node was fetching).",
    );
    for (r, v) in [("won", &s.claims_won), ("lost", &s.claims_lost)] {
        let _ = writeln!(
            o,
            "httpmapd_shared_cache_claims_total{{result=\"{r}\"}} {}",
            l(v)
        );
    }
    header(
        o,
        "httpmapd_shared_cache_errors_total",
        "counter",
        "Shared-cache trouble, each a miss or a skipped write: unavailable (no connection), timeout, reply (an error reply), protocol (not RESP).",
    );
    for (k, v) in [
        ("unavailable", &s.err_unavailable),
        ("timeout", &s.err_timeout),
        ("reply", &s.err_reply),
        ("protocol", &s.err_protocol),
    ] {
        let _ = writeln!(
            o,
            "httpmapd_shared_cache_errors_total{{kind=\"{k}\"}} {}",
            l(v)
        );
    }
    header(
        o,
        "httpmapd_shared_cache_connections",
        "gauge",
        "Workers whose connection to the shared cache is up.",
    );
    let _ = writeln!(o, "httpmapd_shared_cache_connections {}", l(&s.connected));
}

/// `/health`: healthy while every map has a server up.
pub fn health(shared: &Shared) -> (bool, String) {
    let mut ok = true;
    let mut text = String::new();
    for m in shared.maps.iter().flatten() {
        let up = m.servers.iter().filter(|s| s.health.is_up()).count();
        ok &= up > 0;
        let what = match m.cfg.kind {
            crate::config::MapKind::Table => "map",
            crate::config::MapKind::Policy(_) => "policy",
        };
        let _ = writeln!(
            text,
            "{what} {}: {up}/{} servers up",
            m.cfg.name,
            m.servers.len()
        );
    }
    (
        ok,
        if ok {
            format!("ok\n{text}")
        } else {
            format!("degraded\n{text}")
        },
    )
}

/// Takes over SIGTERM, SIGINT, SIGHUP and SIGUSR1 (queued until the signal
/// thread runs). Done first thing, so a signal that arrives while the daemon
/// starts is handled, not fatal.
fn install_signals() -> Result<signal_hook::iterator::Signals, String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot install signal handlers: {e}"))
}

fn spawn_signal_thread(
    mut state: State,
    mut signals: signal_hook::iterator::Signals,
) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let shared = state.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match sig {
                    SIGTERM | SIGINT => {
                        crate::notify::stopping();
                        crate::info!("signal {sig}: stopping: no new connections, finishing lookups in flight");
                        for (tx, waker) in shared.mailboxes.iter() {
                            let _ = tx.send(Msg::Shutdown);
                            let _ = waker.wake();
                        }
                    }
                    SIGHUP => reload(&mut state),
                    SIGUSR1 => crate::info!("{}", counters_line(&shared)),
                    _ => {}
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}
