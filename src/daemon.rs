//! Start-up and shutdown: from a validated [`Config`] to running workers, and
//! the signal thread. This module owns the order of things at start (raise the
//! open-files limit, bind every listener before any thread starts so a bad
//! address is one clear error, start the workers) and at stop (SIGTERM or
//! SIGINT: workers stop accepting, finish their lookups, flush, exit 0).

use crate::backend::{health::Health, MapServers, SharedServer};
use crate::cache::{Cache, Ttls};
use crate::config::{Config, Listen, MAX_RETRY_INTERVAL_FACTOR};
use crate::net::Bound;
use crate::worker::{Counters, Msg, Proto, Shared, Worker};
use hashbrown::HashMap;
use mio::{Poll, Token, Waker};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Raises the soft open-files limit to the hard limit (10,000 Postfix
/// connections need 10,000 descriptors). Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur as u64;
            }
        }
        rl.rlim_cur as u64
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Errors are start-up failures.
pub fn run(cfg: Config) -> Result<(), String> {
    crate::log::set_level(cfg.daemon.log_level);
    let nofile = raise_nofile_limit();
    let cfg = Arc::new(cfg);
    let workers = cfg.daemon.workers;

    // Every listener: (address, protocol), bound once per worker.
    let mut listens: Vec<(Listen, Proto)> = Vec::new();
    for l in &cfg.daemon.socketmap_listen {
        listens.push((l.clone(), Proto::Socketmap));
    }
    for (i, m) in cfg.maps.iter().enumerate() {
        if let Some(l) = &m.tcp_listen {
            listens.push((l.clone(), Proto::TcpTable { map: i as u16 }));
        }
    }
    let mut first: Vec<Option<Bound>> = Vec::new();
    for (l, _) in &listens {
        first.push(Some(
            Bound::bind(l, &cfg.daemon).map_err(|e| format!("cannot listen on {l}: {e}"))?,
        ));
    }
    // Worker 0 takes the sockets just bound; the others get their own
    // (SO_REUSEPORT for TCP, a clone for Unix).
    let mut per_worker: Vec<Vec<(crate::net::Listener, Proto)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for (i, (l, proto)) in listens.iter().enumerate() {
        let b0 = first[i].take().expect("bound above");
        for w in per_worker.iter_mut().skip(1) {
            let b = b0
                .for_worker(l)
                .map_err(|e| format!("cannot listen on {l}: {e}"))?;
            w.push((b.into_mio(), *proto));
        }
        per_worker[0].push((b0.into_mio(), *proto));
    }

    let maps: Vec<MapServers> = cfg
        .maps
        .iter()
        .map(|m| MapServers {
            cfg: Arc::new(m.clone()),
            servers: m
                .servers
                .iter()
                .map(|s| {
                    Arc::new(SharedServer {
                        cfg: s.clone(),
                        map_name: m.name.clone(),
                        health: Health::new(m.retry_interval, MAX_RETRY_INTERVAL_FACTOR),
                    })
                })
                .collect(),
        })
        .collect();
    let ttls = cfg
        .maps
        .iter()
        .map(|m| Ttls {
            ttl: m.ttl,
            negative_ttl: m.negative_ttl,
            stale_ttl: m.stale_ttl,
            refresh_ahead_percent: cfg.cache.refresh_ahead_percent,
        })
        .collect();
    let map_by_name = cfg
        .maps
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_bytes().to_vec(), i as u16))
        .collect::<HashMap<_, _>>();

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
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        cache: Arc::new(Cache::new(cfg.cache.max_entries)),
        maps,
        map_by_name,
        ttls,
        mailboxes,
        counters: Counters::default(),
    });

    let mut handles = Vec::new();
    for (id, ((poll, rx), listeners)) in
        polls.into_iter().zip(receivers).zip(per_worker).enumerate()
    {
        let w = Worker::new(id as u32, poll, shared.clone(), rx, listeners)
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        let h = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || w.run())
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        handles.push(h);
    }

    let listen_list: Vec<String> = listens
        .iter()
        .map(|(l, p)| match p {
            Proto::Socketmap => format!("socketmap {l}"),
            Proto::TcpTable { map } => format!("tcp {l} (map {})", cfg.maps[*map as usize].name),
        })
        .collect();
    crate::info!(
        "httpmapd {} started: {} worker(s), {} map(s), listening on {}; open files limit {}",
        env!("CARGO_PKG_VERSION"),
        workers,
        cfg.maps.len(),
        listen_list.join(", "),
        nofile
    );

    spawn_signal_thread(shared.clone())?;
    for h in handles {
        let _ = h.join();
    }
    crate::info!("stopped");
    Ok(())
}

/// One line with the main counters (SIGUSR1).
pub fn counters_line(shared: &Shared) -> String {
    let c: &Counters = &shared.counters;
    let s = &shared.cache.stats;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "counters: connections_open={} connections_total={} requests={} found={} not_found={} temp_errors={} bad_requests={} cache_entries={} cache_hits={} cache_misses={} coalesced={} evictions={} stale_answers={} refreshes={}",
        l(&c.connections_open),
        l(&c.connections_total),
        l(&c.requests),
        l(&c.found),
        l(&c.not_found),
        l(&c.temp_errors),
        l(&c.bad_requests),
        shared.cache.len(),
        l(&s.hits),
        l(&s.misses),
        l(&s.joined),
        l(&s.evictions),
        l(&s.stale_answers),
        l(&s.refreshes),
    )
}

fn spawn_signal_thread(shared: Arc<Shared>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match sig {
                    SIGTERM | SIGINT => {
                        crate::info!("signal {sig}: stopping: no new connections, finishing lookups in flight");
                        for (tx, waker) in &shared.mailboxes {
                            let _ = tx.send(Msg::Shutdown);
                            let _ = waker.wake();
                        }
                    }
                    SIGHUP => crate::warn!(
                        "SIGHUP: configuration reload is not implemented yet; the running configuration stays (restart to apply changes)"
                    ),
                    SIGUSR1 => crate::info!("{}", counters_line(&shared)),
                    _ => {}
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}
