//! Server host names resolved again, off the event loops: a thread that
//! every [`RESOLVER_TICK`] looks at the configuration in force and, for each
//! server named by a host name (not an IP), resolves it when its map's
//! `resolve_interval` has passed, handing the new addresses to the server
//! ([`crate::backend::SharedServer::set_addrs`]), which the workers read for
//! their next connections. All addresses of a name are used; TLS still
//! verifies the URL's host name (or `tls_server_name`), whatever address a
//! connection goes to. Each map's servers are resolved on their own: two
//! maps naming the same URL have a server each, and both follow the name.
//!
//! A failed resolution keeps the last good addresses and is logged once (and
//! once more when the name resolves again); a change of addresses is one
//! info line. The lookups block this thread only (getaddrinfo has no
//! timeout of ours), never a worker.

use crate::backend::MapServers;
use crate::worker::Shared;
use hashbrown::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the thread looks for names due.
pub const RESOLVER_TICK: Duration = Duration::from_secs(1);

/// Which server a [`Seen`] is: its map (`policy:NAME` for a policy's), its
/// URL, and how many servers before it in that map have the same URL. Each
/// map has its own [`crate::backend::SharedServer`] for a URL, so each is
/// resolved on its own; the key outlives a reload that keeps the server.
type SeenKey = (String, String, usize);

/// What the thread remembers of a server.
struct Seen {
    last: Instant,
    failing: bool,
}

/// Starts the thread; it runs until the process ends.
pub fn spawn(current: Arc<Mutex<Arc<Shared>>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            let mut seen: HashMap<SeenKey, Seen> = HashMap::new();
            loop {
                std::thread::sleep(RESOLVER_TICK);
                let shared = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                round(
                    &shared.maps,
                    &mut seen,
                    Instant::now(),
                    crate::config::resolve,
                );
            }
        })
        .map(|_| ())
}

/// Resolves (with `resolve`) every name that is due among `maps`' servers.
fn round(
    maps: &[Option<MapServers>],
    seen: &mut HashMap<SeenKey, Seen>,
    now: Instant,
    mut resolve: impl FnMut(&str, u16) -> Result<Vec<SocketAddr>, String>,
) {
    for m in maps.iter().flatten() {
        for (i, s) in m.servers.iter().enumerate() {
            let cfg = &s.cfg;
            if cfg.host_name.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let nth = m.servers[..i]
                .iter()
                .filter(|o| o.cfg.url == cfg.url)
                .count();
            let key = (s.map_name.clone(), cfg.url.clone(), nth);
            let entry = seen.entry(key).or_insert(Seen {
                last: now,
                failing: false,
            });
            if now.duration_since(entry.last) < m.cfg.resolve_interval {
                continue;
            }
            entry.last = now;
            match resolve(&cfg.host_name, cfg.port) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SharedServer;

    /// Maps `a` and `b` with the same server URL, resolved every second.
    fn two_maps() -> Vec<Option<MapServers>> {
        let cfg = crate::config::parse(
            "t.toml",
            "[maps.a]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://localhost:8080/\"]\n\
             resolve_interval = \"1s\"\n\
             [maps.b]\ntcp_listen = \"127.0.0.1:2\"\nservers = [\"http://localhost:8080/\"]\n\
             resolve_interval = \"1s\"\n",
        )
        .unwrap();
        cfg.maps
            .iter()
            .map(|m| {
                Some(MapServers {
                    cfg: Arc::new(m.clone()),
                    servers: m
                        .servers
                        .iter()
                        .map(|s| Arc::new(SharedServer::new(s.clone(), m)))
                        .collect(),
                })
            })
            .collect()
    }

    #[test]
    fn every_map_with_the_same_server_url_is_resolved_again() {
        let maps = two_maps();
        let moved: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        let mut seen = HashMap::new();
        let mut asked = Vec::new();
        let mut resolve = |host: &str, port: u16| {
            asked.push(format!("{host}:{port}"));
            Ok(vec![moved])
        };
        let t0 = Instant::now();
        round(&maps, &mut seen, t0, &mut resolve);
        round(
            &maps,
            &mut seen,
            t0 + Duration::from_millis(500),
            &mut resolve,
        );
        round(&maps, &mut seen, t0 + Duration::from_secs(1), &mut resolve);
        assert_eq!(
            asked,
            ["localhost:8080", "localhost:8080"],
            "once per map, when due"
        );
        for (name, m) in ["a", "b"].iter().zip(maps.iter().flatten()) {
            assert_eq!(m.servers[0].addrs().list, [moved], "map {name}'s server");
        }
    }
}
