//! What every worker shares, replaced as a whole on reload ([`Shared`]),
//! the counters that outlive reloads ([`Stats`]), and the messages workers
//! and the control thread send each other ([`Msg`], [`Answer`]).

use super::*;

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
    /// Postfix's policy delegation, answered by policy service `map`;
    /// `max_request`: its longest request in bytes.
    Policy {
        map: u16,
        max_request: u32,
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
    /// The shared cache (all workers together).
    pub l2: Arc<crate::shared_cache::client::L2Stats>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            counters: Counters::default(),
            maps: (0..crate::config::MAX_MAPS)
                .map(|_| MapCounters::default())
                .collect(),
            reloads: crate::metrics::ReloadStats::default(),
            l2: Arc::default(),
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
    /// By map id: [`crate::config::MapConfig::answers_fingerprint`], stored
    /// with (and checked on) every value in the shared cache.
    pub fingerprints: Vec<u64>,
    pub map_by_name: HashMap<Vec<u8>, u16>,
    pub mailboxes: Arc<Vec<(Sender<Msg>, Arc<Waker>)>>,
    /// This node's writes to the shared cache that worker 0 will hear of
    /// (outlives reloads).
    pub own_writes: Arc<crate::shared_cache::OwnWrites>,
}

impl Shared {
    /// The config of map `id`, if it still exists.
    pub fn map(&self, id: u16) -> Option<&Arc<crate::config::MapConfig>> {
        self.maps
            .get(id as usize)
            .and_then(|m| m.as_ref())
            .map(|m| &m.cfg)
    }

    pub(crate) fn map_name(&self, id: u16) -> &str {
        self.map(id).map_or("(removed)", |m| m.name.as_str())
    }

    pub(crate) fn ttls(&self, id: u16) -> Ttls {
        self.ttls.get(id as usize).copied().unwrap_or(Ttls::OFF)
    }

    pub(crate) fn gen(&self, id: u16) -> u32 {
        self.gens.get(id as usize).copied().unwrap_or_default()
    }

    pub(crate) fn fingerprint(&self, id: u16) -> u64 {
        self.fingerprints
            .get(id as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// A listener for a worker after a reload: its address and protocol, and a
/// new socket when the address is new (else the worker keeps its own).
pub struct ListenerUpdate {
    pub listen: Listen,
    pub proto: Proto,
    pub socket: Option<Listener>,
}
