//! The result cache shared by every worker: sharded LRU with TTLs, negative
//! and stale entries, and the table of lookups in flight (coalescing).
//!
//! A key is the map id (2 bytes, big-endian) followed by the folded lookup key,
//! so a map reached over `tcp:` and over `socketmap:` shares its entries. Each
//! shard is one `Mutex` over an [`lru::LruCache`] and a hashbrown map of
//! in-flight keys with the clients waiting on them. This module owns no
//! sockets and no clocks: callers pass `now` in milliseconds since
//! [`Cache::epoch`], so every rule here is testable without sleeping.
//!
//! Rules: a found result lives `ttl`, a not-found one `negative_ttl`, both
//! stay a further `stale_ttl` to answer when every server fails; temporary
//! errors are never stored. A TTL of zero stores nothing (the cache is off for
//! that kind of result). A hit in the last part of its TTL asks the caller to
//! refresh it in the background, once.

use hashbrown::{DefaultHashBuilder, HashMap};
use lru::LruCache;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shards: enough that workers rarely wait on one another's lock.
const SHARDS: usize = 64;

/// Who waits for an in-flight lookup: a request on one client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub worker: u32,
    pub session: u32,
    /// Session generation: a reused slab slot never gets another's answer.
    pub gen: u64,
    /// Request sequence number on that session (answers go out in order).
    pub seq: u64,
}

/// One cached result.
struct Entry {
    /// `None`: the server said not found.
    value: Option<Box<[u8]>>,
    /// Milliseconds since the epoch until which the entry answers normally.
    fresh_until_ms: u64,
    /// From here on a hit also asks for a background refresh.
    refresh_from_ms: u64,
    /// Until here the entry may answer when every server fails.
    stale_until_ms: u64,
}

struct Shard {
    lru: LruCache<Box<[u8]>, Entry, DefaultHashBuilder>,
    inflight: HashMap<Box<[u8]>, Vec<Waiter>>,
}

/// What [`Cache::lookup`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Answered from the cache (the callback ran). `refresh`: the caller
    /// must start a background fetch and later call `complete_*` for it.
    Hit { refresh: bool },
    /// Another fetch of this key is in flight; the waiter was added to it.
    Joined,
    /// Nothing usable: the caller must fetch (the waiter is registered).
    Fetch,
}

/// Lifetimes for storing a result (per map).
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_ttl: Duration,
    /// Percent of the TTL, at its end, in which a hit triggers a refresh.
    pub refresh_ahead_percent: u32,
}

/// Counters, read by the metrics page and the SIGUSR1 line.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub joined: AtomicU64,
    pub evictions: AtomicU64,
    pub stale_answers: AtomicU64,
    pub refreshes: AtomicU64,
}

pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    /// Entries held per map id (the first two bytes of a key).
    map_entries: Box<[AtomicU64]>,
    hasher: DefaultHashBuilder,
    epoch: Instant,
    pub stats: CacheStats,
}

impl Cache {
    /// A cache holding at most about `max_entries` results (split evenly over
    /// the shards; at least one per shard when `max_entries > 0`).
    pub fn new(max_entries: usize) -> Cache {
        let per_shard = max_entries.div_ceil(SHARDS).max(1);
        let cap = std::num::NonZeroUsize::new(per_shard).unwrap_or(std::num::NonZeroUsize::MIN);
        let shards = (0..SHARDS)
            .map(|_| {
                let lru = LruCache::with_hasher(cap, DefaultHashBuilder::default());
                Mutex::new(Shard {
                    lru,
                    inflight: HashMap::new(),
                })
            })
            .collect();
        Cache {
            shards,
            map_entries: (0..crate::config::MAX_MAPS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            epoch: Instant::now(),
            stats: CacheStats::default(),
        }
    }

    /// The instant that `now_ms` values count from.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Milliseconds since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key);
        &self.shards[(h as usize) % SHARDS]
    }

    /// Looks `key` up. On a fresh entry calls `on_hit` with the value (`None`
    /// = not found) while holding the shard lock, so the reply is encoded
    /// without copying the value. Otherwise registers `waiter`.
    pub fn lookup(
        &self,
        key: &[u8],
        now_ms: u64,
        waiter: Waiter,
        on_hit: impl FnOnce(Option<&[u8]>),
    ) -> Lookup {
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *shard;
        if let Some(e) = shard.lru.get(key) {
            if now_ms < e.fresh_until_ms {
                on_hit(e.value.as_deref());
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                let refresh = now_ms >= e.refresh_from_ms && !shard.inflight.contains_key(key);
                if refresh {
                    shard.inflight.insert(key.into(), Vec::new());
                    self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                }
                return Lookup::Hit { refresh };
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(waiters) = shard.inflight.get_mut(key) {
            waiters.push(waiter);
            self.stats.joined.fetch_add(1, Ordering::Relaxed);
            return Lookup::Joined;
        }
        shard.inflight.insert(key.into(), vec![waiter]);
        Lookup::Fetch
    }

    /// A fetch ended with an answer (`None` = not found): stores it per
    /// `ttls` and returns the waiters to answer.
    pub fn complete_ok(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        ttls: &Ttls,
        now_ms: u64,
    ) -> Vec<Waiter> {
        let ttl = if value.is_some() {
            ttls.ttl
        } else {
            ttls.negative_ttl
        };
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let waiters = shard.inflight.remove(key).unwrap_or_default();
        if ttl.is_zero() {
            if shard.lru.pop(key).is_some() {
                self.count(key, false);
            }
        } else {
            let ttl_ms = ttl.as_millis() as u64;
            let ahead_ms = ttl_ms * u64::from(ttls.refresh_ahead_percent) / 100;
            let fresh_until_ms = now_ms + ttl_ms;
            let entry = Entry {
                value: value.map(Box::from),
                fresh_until_ms,
                refresh_from_ms: if ahead_ms == 0 {
                    u64::MAX
                } else {
                    fresh_until_ms - ahead_ms
                },
                stale_until_ms: fresh_until_ms + ttls.stale_ttl.as_millis() as u64,
            };
            match shard.lru.push(key.into(), entry) {
                None => self.count(key, true),
                Some((old_key, _)) if *old_key != *key => {
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    self.count(key, true);
                    self.count(&old_key, false);
                }
                Some(_) => {} // replaced in place
            }
        }
        waiters
    }

    /// A fetch failed (every server): returns the waiters and, when an
    /// expired entry is still within its stale time, its value to answer with
    /// (`Some(None)` = stale not-found).
    #[allow(clippy::type_complexity)]
    pub fn complete_err(
        &self,
        key: &[u8],
        now_ms: u64,
    ) -> (Vec<Waiter>, Option<Option<Box<[u8]>>>) {
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let waiters = shard.inflight.remove(key).unwrap_or_default();
        let stale = match shard.lru.peek(key) {
            Some(e) if now_ms < e.stale_until_ms => Some(e.value.clone()),
            _ => None,
        };
        if stale.is_some() && !waiters.is_empty() {
            self.stats.stale_answers.fetch_add(1, Ordering::Relaxed);
        }
        (waiters, stale)
    }

    fn count(&self, key: &[u8], up: bool) {
        let map = match key {
            [a, b, ..] => u16::from_be_bytes([*a, *b]) as usize,
            _ => return,
        };
        if let Some(c) = self.map_entries.get(map) {
            if up {
                c.fetch_add(1, Ordering::Relaxed);
            } else {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Changes the capacity to about `max_entries` (evicting the least
    /// recently used entries if it shrinks).
    pub fn resize(&self, max_entries: usize) {
        let per_shard = max_entries.div_ceil(SHARDS).max(1);
        let cap = std::num::NonZeroUsize::new(per_shard).unwrap_or(std::num::NonZeroUsize::MIN);
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            while s.lru.len() > per_shard {
                match s.lru.pop_lru() {
                    Some((k, _)) => {
                        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                        self.count(&k, false);
                    }
                    None => break,
                }
            }
            s.lru.resize(cap);
        }
    }

    /// Entries held now for map id `map`.
    pub fn map_len(&self, map: u16) -> u64 {
        self.map_entries
            .get(map as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Entries held now (fresh, expired or stale), over all shards.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).lru.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry whose key starts with `prefix` (a map's id), e.g.
    /// when a reload changed that map's servers. Lookups in flight stay.
    pub fn purge_prefix(&self, prefix: &[u8]) {
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let doomed: Vec<Box<[u8]>> = s
                .lru
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                if s.lru.pop(&k).is_some() {
                    self.count(&k, false);
                }
            }
        }
    }
}

/// Builds the cache key for `map` and an already folded `key` into `out`.
pub fn make_key(map: u16, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&map.to_be_bytes());
    out.extend_from_slice(key);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTLS: Ttls = Ttls {
        ttl: Duration::from_secs(100),
        negative_ttl: Duration::from_secs(10),
        stale_ttl: Duration::from_secs(50),
        refresh_ahead_percent: 10,
    };

    fn w(seq: u64) -> Waiter {
        Waiter {
            worker: 0,
            session: 1,
            gen: 1,
            seq,
        }
    }

    fn get(c: &Cache, k: &[u8], now: u64, seq: u64) -> (Lookup, Option<Option<Vec<u8>>>) {
        let mut seen = None;
        let r = c.lookup(k, now, w(seq), |v| seen = Some(v.map(<[u8]>::to_vec)));
        (r, seen)
    }

    #[test]
    fn miss_join_complete_hit() {
        let c = Cache::new(100);
        assert_eq!(get(&c, b"\0\0a", 0, 1).0, Lookup::Fetch);
        assert_eq!(get(&c, b"\0\0a", 0, 2).0, Lookup::Joined);
        let ws = c.complete_ok(b"\0\0a", Some(b"v"), &TTLS, 5);
        assert_eq!(ws, vec![w(1), w(2)]);
        assert_eq!(
            get(&c, b"\0\0a", 6, 3),
            (Lookup::Hit { refresh: false }, Some(Some(b"v".to_vec())))
        );
        // in the last 10% of the ttl: one refresh, then plain hits
        assert_eq!(
            get(&c, b"\0\0a", 95_000, 4).0,
            Lookup::Hit { refresh: true }
        );
        assert_eq!(
            get(&c, b"\0\0a", 95_001, 5).0,
            Lookup::Hit { refresh: false }
        );
        // expired: fetch again (the refresh is still in flight: join it)
        assert_eq!(get(&c, b"\0\0a", 105_005, 6).0, Lookup::Joined);
    }

    #[test]
    fn negative_and_stale() {
        let c = Cache::new(100);
        get(&c, b"k", 0, 1);
        c.complete_ok(b"k", None, &TTLS, 0);
        assert_eq!(
            get(&c, b"k", 5_000, 2),
            (Lookup::Hit { refresh: false }, Some(None))
        );
        assert_eq!(get(&c, b"k", 10_000, 3).0, Lookup::Fetch);
        let (ws, stale) = c.complete_err(b"k", 10_001);
        assert_eq!(ws, vec![w(3)]);
        assert_eq!(stale, Some(None));
        // past stale_ttl: nothing
        assert_eq!(get(&c, b"k", 60_000, 4).0, Lookup::Fetch);
        assert_eq!(c.complete_err(b"k", 60_000).1, None);
    }

    #[test]
    fn zero_ttl_stores_nothing_and_lru_evicts() {
        let c = Cache::new(100);
        let off = Ttls {
            ttl: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            ..TTLS
        };
        get(&c, b"k", 0, 1);
        c.complete_ok(b"k", Some(b"v"), &off, 0);
        assert_eq!(get(&c, b"k", 1, 2).0, Lookup::Fetch);
        let small = Cache::new(SHARDS); // one entry per shard
        for i in 0..1000u32 {
            small.complete_ok(&i.to_be_bytes(), Some(b"v"), &TTLS, 0);
        }
        assert_eq!(small.len(), SHARDS);
        // keys are 4 bytes: the map id is their first two
        let by_map: u64 = (0..1000u32)
            .map(|i| (i >> 16) as u16)
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .map(|&m| small.map_len(m))
            .sum();
        assert_eq!(by_map, SHARDS as u64);
        assert_eq!(
            small.stats.evictions.load(Ordering::Relaxed),
            1000 - SHARDS as u64
        );
    }
}
