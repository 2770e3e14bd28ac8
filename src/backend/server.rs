//! One HTTP server as every worker sees it: its configuration, health,
//! counters, the connections open to it, the addresses its host name
//! resolves to (kept current by the resolver thread, [`crate::resolver`]),
//! and the TLS client its `https://` connections use.
//!
//! A host name may resolve to several addresses: new connections take them
//! in turn, and one that fails to connect rests (like a mirror) while the
//! others are used; only when every address fails does the server itself
//! count as failed. Everything here is shared, atomics and one `RwLock`
//! read per new connection; nothing blocks an event loop.

use super::health::Health;
use crate::config::{MapConfig, ServerConfig};
use crate::metrics::ServerCounters;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// The addresses of a server, each with how long it rests after a failed
/// connect (milliseconds on the backend's clock; 0: never failed).
pub struct Addrs {
    pub list: Vec<SocketAddr>,
    resting_until_ms: Vec<AtomicU64>,
}

impl Addrs {
    fn new(list: Vec<SocketAddr>) -> Addrs {
        let resting_until_ms = list.iter().map(|_| AtomicU64::new(0)).collect();
        Addrs {
            list,
            resting_until_ms,
        }
    }
}

/// TLS for an `https://` server: the map's rustls configuration and the
/// name verified (and sent as SNI).
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

pub struct SharedServer {
    pub cfg: ServerConfig,
    pub map_name: String,
    pub health: Health,
    pub counters: ServerCounters,
    /// Connections open to this server, all workers together (a gauge).
    pub open: AtomicUsize,
    /// `Some` for `https://`.
    pub tls: Option<ServerTls>,
    addrs: RwLock<Arc<Addrs>>,
    /// Bumped when the addresses change: a pooled connection made under an
    /// older generation checks that its address is still one of them.
    addrs_gen: AtomicU64,
    /// Round-robin position over the addresses.
    next: AtomicUsize,
}

impl SharedServer {
    pub fn new(cfg: ServerConfig, map: &MapConfig) -> SharedServer {
        let tls = map.tls.as_ref().filter(|_| cfg.tls).map(|t| ServerTls {
            config: t.config.clone(),
            name: t.name_for(&cfg.host_name),
        });
        SharedServer {
            addrs: RwLock::new(Arc::new(Addrs::new(cfg.addrs.clone()))),
            cfg,
            // Log lines and metrics name a policy's servers `policy:NAME`.
            map_name: map.id_name(),
            health: Health::new(map.retry_interval, crate::config::MAX_RETRY_INTERVAL_FACTOR),
            counters: ServerCounters::default(),
            open: AtomicUsize::new(0),
            tls,
            addrs_gen: AtomicU64::new(0),
            next: AtomicUsize::new(0),
        }
    }

    /// The addresses in force.
    pub fn addrs(&self) -> Arc<Addrs> {
        self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a new resolution; false (nothing done) when it is the same set.
    pub fn set_addrs(&self, list: Vec<SocketAddr>) -> bool {
        let mut cur = self.addrs.write().unwrap_or_else(|e| e.into_inner());
        let mut a = cur.list.clone();
        let mut b = list.clone();
        a.sort();
        b.sort();
        if a == b || list.is_empty() {
            return false;
        }
        *cur = Arc::new(Addrs::new(list));
        self.addrs_gen.fetch_add(1, Ordering::Release);
        true
    }

    /// The generation of the addresses (see [`SharedServer::still_serves`]).
    pub fn addrs_gen(&self) -> u64 {
        self.addrs_gen.load(Ordering::Acquire)
    }

    /// Whether `addr` is still one of the server's addresses; `gen` is the
    /// generation the caller last checked, updated. Cheap when nothing
    /// changed (one atomic load).
    pub fn still_serves(&self, addr: SocketAddr, gen: &mut u64) -> bool {
        let now = self.addrs_gen();
        if now == *gen {
            return true;
        }
        *gen = now;
        self.addrs().list.contains(&addr)
    }

    /// The address for a new connection: the next in turn that is not
    /// resting and not in `skip` (tried already by this attempt); when all
    /// rest, the next not in `skip`. `None`: every address was tried.
    pub fn pick_addr(&self, now_ms: u64, skip: &[SocketAddr]) -> Option<SocketAddr> {
        let a = self.addrs();
        let n = a.list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| !skip.contains(&a.list[i]));
        let mut fallback = None;
        for i in candidates {
            if a.resting_until_ms[i].load(Ordering::Relaxed) <= now_ms {
                return Some(a.list[i]);
            }
            fallback.get_or_insert(a.list[i]);
        }
        fallback
    }

    /// A connect to `addr` failed: it rests `rest_ms`.
    pub fn addr_failed(&self, addr: SocketAddr, now_ms: u64, rest_ms: u64) {
        let a = self.addrs();
        if let Some(i) = a.list.iter().position(|&x| x == addr) {
            a.resting_until_ms[i].store(now_ms.saturating_add(rest_ms), Ordering::Relaxed);
        }
    }

    /// How many addresses the server has now.
    pub fn addr_count(&self) -> usize {
        self.addrs().list.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(addrs: &[&str]) -> SharedServer {
        let cfg = crate::config::parse(
            "t.toml",
            "[maps.m]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:9/\"]\n",
        )
        .unwrap();
        let mut s = cfg.maps[0].servers[0].clone();
        s.addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        SharedServer::new(s, &cfg.maps[0])
    }

    #[test]
    fn addresses_in_turn_a_failed_one_rests() {
        let s = server(&["10.0.0.1:80", "10.0.0.2:80"]);
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let first = s.pick_addr(0, &[]).unwrap();
        let second = s.pick_addr(0, &[]).unwrap();
        assert_ne!(first, second, "in turn");
        s.addr_failed(a, 0, 1000);
        for _ in 0..4 {
            assert_eq!(s.pick_addr(10, &[]), Some(b), "a rests");
        }
        assert_eq!(
            s.pick_addr(10, &[b]),
            Some(a),
            "only a left: tried though resting"
        );
        assert_eq!(s.pick_addr(10, &[a, b]), None);
        assert_eq!(s.pick_addr(1000, &[b]), Some(a), "rested");
        assert!(!s.set_addrs(vec![b, a]), "the same set");
        assert!(s.set_addrs(vec![b]));
        assert_eq!(s.pick_addr(0, &[]), Some(b));
    }
}
