//! Server host names resolved again, off the event loops: a thread that
//! every [`RESOLVER_TICK`] looks at the configuration in force and, for each
//! server named by a host name (not an IP), resolves it when its map's
//! `resolve_interval` has passed, handing the new addresses to the server
//! ([`crate::backend::SharedServer::set_addrs`]), which the workers read for
//! their next connections. All addresses of a name are used; TLS still
//! verifies the URL's host name (or `tls_server_name`), whatever address a
//! connection goes to.
//!
//! A failed resolution keeps the last good addresses and is logged once (and
//! once more when the name resolves again); a change of addresses is one
//! info line. The lookups block this thread only (getaddrinfo has no
//! timeout of ours), never a worker.

use crate::worker::Shared;
use hashbrown::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the thread looks for names due.
pub const RESOLVER_TICK: Duration = Duration::from_secs(1);

/// What the thread remembers of a server (by URL).
struct Seen {
    last: Instant,
    failing: bool,
}

/// Starts the thread; it runs until the process ends.
pub fn spawn(current: Arc<Mutex<Arc<Shared>>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            let mut seen: HashMap<String, Seen> = HashMap::new();
            loop {
                std::thread::sleep(RESOLVER_TICK);
                let shared = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                round(&shared, &mut seen, Instant::now());
            }
        })
        .map(|_| ())
}

/// Resolves every name that is due.
fn round(shared: &Shared, seen: &mut HashMap<String, Seen>, now: Instant) {
    for m in shared.maps.iter().flatten() {
        for s in &m.servers {
            let cfg = &s.cfg;
            if cfg.host_name.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let entry = seen.entry(cfg.url.clone()).or_insert(Seen {
                last: now,
                failing: false,
            });
            if now.duration_since(entry.last) < m.cfg.resolve_interval {
                continue;
            }
            entry.last = now;
            match crate::config::resolve(&cfg.host_name, cfg.port) {
                Ok(addrs) => {
                    let list = addrs
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    if entry.failing {
                        entry.failing = false;
                        crate::info!(
                            "server {} (map {}): {} resolves again",
                            cfg.url,
                            m.cfg.name,
                            cfg.host_name
                        );
                    }
                    if s.set_addrs(addrs) {
                        crate::info!(
                            "server {} (map {}): {} now resolves to {list}",
                            cfg.url,
                            m.cfg.name,
                            cfg.host_name
                        );
                    }
                }
                Err(e) => {
                    if !entry.failing {
                        entry.failing = true;
                        crate::warn!(
                            "server {} (map {}): {e}; keeping its last addresses",
                            cfg.url,
                            m.cfg.name
                        );
                    }
                }
            }
        }
    }
}
