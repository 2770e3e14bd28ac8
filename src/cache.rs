//! The result cache shared by every worker: sharded LRU with TTLs, negative
//! and stale entries, and the table of lookups in flight (coalescing).
//!
//! A key is the map id (2 bytes, big-endian), the map's generation (4 bytes,
//! big-endian) and the folded lookup key, so a map reached over `tcp:` and
//! over `socketmap:` shares its entries. The generation changes when a reload
//! changes where a map's answers come from (its servers, result mode...): a
//! lookup under the new generation never joins a fetch started under the old
//! one, and a completion of an old generation is answered to its own waiters
//! but never stored ([`Cache::set_gen`]). Each
//! shard is one `Mutex` over an [`lru::LruCache`] and a hashbrown map of
//! in-flight keys with the clients waiting on them. The LRU is keyed by the
//! key's 64-bit hash; its entry holds the key itself (checked on every hit,
//! so a hash collision is a miss, never a wrong answer) and the value in one
//! allocation (see `Stored`), and three compact timestamps: about 100 bytes
//! beyond key and value. A hit reads the entry without moving it in the LRU
//! list (one hit in [`PROMOTE_ONE_IN`] moves it to the front): at a million
//! entries every pointer followed is a likely cache miss, and moving a node
//! touches its two neighbours. This module owns no
//! sockets and no clocks: callers pass `now` in milliseconds since
//! [`Cache::epoch`], so every rule here is testable without sleeping.
//!
//! The cache is bounded twice: `max_entries` and `max_bytes` (key, value and
//! [`ENTRY_OVERHEAD_BYTES`] per entry); storing evicts least recently used
//! entries until both hold, and a value that cannot fit is not stored.
//!
//! Rules: a found result lives `ttl`, a not-found one `negative_ttl`, both
//! stay a further `stale_ttl` to answer when every server fails (a not-found
//! one only with `stale_negative`); temporary errors are never stored. A TTL of zero stores nothing (the cache is off for
//! that kind of result). A hit in the last part of its TTL asks the caller to
//! refresh it in the background, once.

use hashbrown::{DefaultHashBuilder, HashMap};
use lru::LruCache;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Least shards: enough that workers rarely wait on one another's lock.
const MIN_SHARDS: usize = 32;
/// Most shards tried when fitting the hash tables to `max_entries`.
const MAX_SHARDS: usize = 128;
/// Room each shard has beyond its even share, so an uneven spread of keys
/// still fills the cache to `max_entries` (the global bound is exact).
const SHARD_SLACK_PERCENT: usize = 10;
/// A hit moves its entry to the front of the LRU list with this odds (1 in
/// N), so hot entries stay and a hit costs no list update most of the time.
pub const PROMOTE_ONE_IN: u32 = 8;
/// Bytes before the key in a [`Stored`] allocation: key length (u32 LE), found flag.
const STORED_HEADER: usize = 5;
/// Bytes a cache key carries before the lookup key: map id (u16) and generation (u32).
pub const KEY_PREFIX_BYTES: usize = 6;
/// Bytes an entry costs beyond its key and value, as the byte budget counts
/// it: the LRU node and times, the hash table slot, the [`Stored`] header and
/// malloc's per-block overhead. `benches/memory.rs` and `benches/compare.sh`
/// measured 139-144 B at a million entries; rounded up.
pub const ENTRY_OVERHEAD_BYTES: usize = 160;

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

/// A cached key with its value in one allocation:
/// `[key_len: u32 LE][found: u8][key][value]`. It hashes and compares as
/// its key alone, so the LRU map can be searched with a `&[u8]` key.
struct Stored(Box<[u8]>);

impl Stored {
    fn new(key: &[u8], value: Option<&[u8]>) -> Stored {
        let v = value.unwrap_or_default();
        let mut b = Vec::with_capacity(STORED_HEADER + key.len() + v.len());
        b.extend_from_slice(&(key.len() as u32).to_le_bytes());
        b.push(u8::from(value.is_some()));
        b.extend_from_slice(key);
        b.extend_from_slice(v);
        Stored(b.into_boxed_slice())
    }
    fn key_len(&self) -> usize {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]) as usize
    }
    fn key(&self) -> &[u8] {
        &self.0[STORED_HEADER..STORED_HEADER + self.key_len()]
    }
    /// `None`: a cached not-found.
    fn value(&self) -> Option<&[u8]> {
        (self.0[4] == 1).then(|| &self.0[STORED_HEADER + self.key_len()..])
    }
    /// What the entry counts against the byte budget.
    fn cost(&self) -> usize {
        entry_cost(
            self.key_len(),
            self.0.len() - STORED_HEADER - self.key_len(),
        )
    }
}

/// Bytes an entry of this key and value length counts against `max_bytes`.
pub fn entry_cost(key_len: usize, value_len: usize) -> usize {
    STORED_HEADER + key_len + value_len + ENTRY_OVERHEAD_BYTES
}

impl std::borrow::Borrow<[u8]> for Stored {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

impl std::hash::Hash for Stored {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key().hash(h) // exactly as the borrowed `[u8]` hashes
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Stored) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Stored {}

/// An entry's times, in milliseconds since the cache's epoch.
struct Times {
    /// Until here the entry answers normally.
    fresh_until_ms: u64,
    /// From `fresh_until_ms - refresh_ms` on, a hit also asks for a background refresh.
    refresh_ms: u32,
    /// Until `fresh_until_ms + stale_ms` the entry may answer when every server fails.
    stale_ms: u32,
}

impl Times {
    fn refresh_from_ms(&self) -> u64 {
        if self.refresh_ms == 0 {
            u64::MAX
        } else {
            self.fresh_until_ms - u64::from(self.refresh_ms)
        }
    }
    fn stale_until_ms(&self) -> u64 {
        self.fresh_until_ms + u64::from(self.stale_ms)
    }
}

/// What the LRU holds for a key hash.
struct Entry {
    stored: Stored,
    times: Times,
}

/// The LRU's hasher: its keys are already 64-bit hashes.
#[derive(Default, Clone, Copy)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in, to be safe.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PreHashedBuilder = std::hash::BuildHasherDefault<PreHashed>;

struct Shard {
    lru: LruCache<u64, Entry, PreHashedBuilder>,
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

/// One entry's lifetime, in milliseconds: fresh, then stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Life {
    pub fresh_ms: u64,
    pub stale_ms: u64,
    /// Percent of `fresh_ms`, at its end, in which a hit triggers a refresh.
    pub refresh_percent: u32,
}

/// Lifetimes for storing a result (per map).
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_ttl: Duration,
    /// Percent of the TTL, at its end, in which a hit triggers a refresh.
    pub refresh_ahead_percent: u32,
    /// An expired not-found entry may answer while every server fails
    /// (else that is a temporary error: a user added meanwhile is deferred,
    /// not bounced). Read by the caller of [`Cache::complete_err`].
    pub stale_negative: bool,
}

impl Ttls {
    /// Nothing is stored (a removed map).
    pub const OFF: Ttls = Ttls {
        ttl: Duration::ZERO,
        negative_ttl: Duration::ZERO,
        stale_ttl: Duration::ZERO,
        refresh_ahead_percent: 0,
        stale_negative: false,
    };

    /// How long an answer is fresh: `ttl` for a value, `negative_ttl` for
    /// not found.
    pub fn fresh_for(&self, found: bool) -> Duration {
        if found {
            self.ttl
        } else {
            self.negative_ttl
        }
    }
}

/// Counters, read by the metrics page and the SIGUSR1 line. (Hits and
/// misses are counted per map by the caller: one atomic add per lookup.)
#[derive(Default)]
pub struct CacheStats {
    pub joined: AtomicU64,
    pub evictions: AtomicU64,
    pub stale_answers: AtomicU64,
    pub refreshes: AtomicU64,
    /// Results not stored: larger than the byte budget, or of an old generation.
    pub not_stored: AtomicU64,
}

pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    /// The bound on entries, all shards together.
    max_entries: AtomicUsize,
    /// Entries held, all shards together.
    total: AtomicUsize,
    /// The bound on bytes (see [`entry_cost`]), all shards together.
    max_bytes: AtomicUsize,
    /// Bytes held, all shards together.
    bytes: AtomicUsize,
    /// The current generation of each map id (see the module doc).
    map_gens: Box<[AtomicU32]>,
    /// Entries held per map id (the first two bytes of a key).
    map_entries: Box<[AtomicU64]>,
    hasher: DefaultHashBuilder,
    epoch: Instant,
    pub stats: CacheStats,
}

/// Buckets hashbrown gives a table sized for `cap` entries.
fn table_buckets(cap: usize) -> usize {
    if cap < 8 {
        return if cap < 4 { 4 } else { 8 };
    }
    (cap * 8 / 7).next_power_of_two()
}

/// The shard count (within bounds) whose hash tables waste the least room
/// for `max_entries`: tables grow in powers of two, so 64 shards of a million
/// entries would leave about half of every table empty.
fn shard_count(max_entries: usize) -> usize {
    let per = |n: usize| {
        (max_entries.div_ceil(n) * (100 + SHARD_SLACK_PERCENT))
            .div_ceil(100)
            .max(1)
    };
    (MIN_SHARDS..=MAX_SHARDS)
        .min_by_key(|&n| (n * table_buckets(per(n)), n))
        .unwrap_or(MIN_SHARDS)
}

impl Cache {
    /// A cache holding at most `max_entries` results in at most `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: usize) -> Cache {
        let max_entries = max_entries.max(1);
        let n = shard_count(max_entries);
        let cap = Self::shard_cap(max_entries, n);
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::with_hasher(cap, PreHashedBuilder::default()),
                    inflight: HashMap::new(),
                })
            })
            .collect();
        Cache {
            shards,
            max_entries: AtomicUsize::new(max_entries),
            total: AtomicUsize::new(0),
            max_bytes: AtomicUsize::new(max_bytes),
            bytes: AtomicUsize::new(0),
            map_gens: (0..crate::config::MAX_MAPS)
                .map(|_| AtomicU32::new(0))
                .collect(),
            map_entries: (0..crate::config::MAX_MAPS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            epoch: Instant::now(),
            stats: CacheStats::default(),
        }
    }

    fn shard_cap(max_entries: usize, shards: usize) -> std::num::NonZeroUsize {
        let per = (max_entries.div_ceil(shards) * (100 + SHARD_SLACK_PERCENT)).div_ceil(100);
        std::num::NonZeroUsize::new(per.max(1)).unwrap_or(std::num::NonZeroUsize::MIN)
    }

    /// The instant that `now_ms` values count from.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// `at` in milliseconds since the epoch: the `now_ms` every other
    /// method takes.
    pub fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The key's hash and its shard (chosen by the hash's high half; the
    /// table inside uses the low bits).
    fn shard(&self, key: &[u8]) -> (u64, &Mutex<Shard>) {
        let h = self.hasher.hash_one(key);
        (h, &self.shards[((h >> 32) as usize) % self.shards.len()])
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
        let (h, shard) = self.shard(key);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *shard;
        if let Some(e) = shard.lru.peek(&h).filter(|e| e.stored.key() == key) {
            let t = &e.times;
            if now_ms < t.fresh_until_ms {
                on_hit(e.stored.value());
                let refresh = now_ms >= t.refresh_from_ms() && !shard.inflight.contains_key(key);
                if fastrand::u32(..PROMOTE_ONE_IN) == 0 {
                    shard.lru.promote(&h);
                }
                if refresh {
                    shard.inflight.insert(key.into(), Vec::new());
                    self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                }
                return Lookup::Hit { refresh };
            }
        }
        if let Some(waiters) = shard.inflight.get_mut(key) {
            waiters.push(waiter);
            self.stats.joined.fetch_add(1, Ordering::Relaxed);
            return Lookup::Joined;
        }
        shard.inflight.insert(key.into(), vec![waiter]);
        Lookup::Fetch
    }

    /// Removes the entry at hash `h` from `shard` (`key`'s, or a colliding
    /// key's), keeping the counts right.
    fn remove(&self, shard: &mut Shard, h: u64) {
        if let Some(e) = shard.lru.pop(&h) {
            self.forget(&e.stored);
        }
    }

    fn forget(&self, stored: &Stored) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(stored.cost(), Ordering::Relaxed);
        self.count(stored.key(), false);
    }

    /// The current generation of map `map`.
    pub fn gen(&self, map: u16) -> u32 {
        self.map_gens
            .get(map as usize)
            .map_or(0, |g| g.load(Ordering::Acquire))
    }

    /// Makes `gen` map `map`'s current generation: results of fetches
    /// started under another one are no longer stored. Call before
    /// [`Cache::purge_prefix`] when a reload changes the map's answers.
    pub fn set_gen(&self, map: u16, gen: u32) {
        if let Some(g) = self.map_gens.get(map as usize) {
            g.store(gen, Ordering::Release);
        }
    }

    /// Whether `key` (a cache key) is of its map's current generation.
    pub fn current(&self, key: &[u8]) -> bool {
        match key {
            [a, b, g0, g1, g2, g3, ..] => {
                self.gen(u16::from_be_bytes([*a, *b])) == u32::from_be_bytes([*g0, *g1, *g2, *g3])
            }
            _ => true,
        }
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
        let life = Life {
            fresh_ms: ttls.fresh_for(value.is_some()).as_millis() as u64,
            stale_ms: ttls.stale_ttl.as_millis() as u64,
            refresh_percent: ttls.refresh_ahead_percent,
        };
        self.store(key, value, life, now_ms, true)
    }

    /// An answer from the shared cache, with the lifetime it has left
    /// (`life.fresh_ms`, then `life.stale_ms` more): stored and its waiters
    /// returned, as [`Cache::complete_ok`] does (with a `fresh_ms` of zero
    /// it is answered and only kept for stale answers).
    pub fn complete_with(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        life: Life,
        now_ms: u64,
    ) -> Vec<Waiter> {
        self.store(key, value, life, now_ms, true)
    }

    /// A value past its freshness (from the shared cache), kept `stale_ms`
    /// for a stale answer should the servers fail; the lookup stays in
    /// flight (a fetch from the servers follows).
    pub fn keep_stale(&self, key: &[u8], value: Option<&[u8]>, stale_ms: u64, now_ms: u64) {
        let life = Life {
            fresh_ms: 0,
            stale_ms,
            refresh_percent: 0,
        };
        self.store(key, value, life, now_ms, false);
    }

    fn store(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        life: Life,
        now_ms: u64,
        finish: bool,
    ) -> Vec<Waiter> {
        let (h, shard) = self.shard(key);
        let mut guard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *guard;
        let waiters = if finish {
            shard.inflight.remove(key).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.remove(shard, h);
        if life.fresh_ms == 0 && (finish || life.stale_ms == 0) {
            return waiters;
        }
        let cost = entry_cost(key.len(), value.map_or(0, <[u8]>::len));
        if !self.current(key) || cost > self.max_bytes.load(Ordering::Relaxed) {
            // Fetched under a configuration a reload replaced, or larger
            // than the whole budget: answered, never stored.
            self.stats.not_stored.fetch_add(1, Ordering::Relaxed);
            return waiters;
        }
        // Both bounds: past either, this shard gives up its least recently
        // used entries (an empty shard has others give up theirs: try_lock,
        // never waiting on a second lock while holding one).
        while self.total.load(Ordering::Relaxed) >= self.max_entries.load(Ordering::Relaxed)
            || self.bytes.load(Ordering::Relaxed) + cost > self.max_bytes.load(Ordering::Relaxed)
        {
            if !self.evict_lru(shard) && !self.evict_elsewhere() {
                self.stats.not_stored.fetch_add(1, Ordering::Relaxed);
                return waiters;
            }
        }
        let clamp = |ms: u128| ms.min(u128::from(u32::MAX)) as u32;
        let times = Times {
            fresh_until_ms: now_ms + life.fresh_ms,
            refresh_ms: clamp(u128::from(life.fresh_ms) * u128::from(life.refresh_percent) / 100),
            stale_ms: clamp(u128::from(life.stale_ms)),
        };
        let entry = Entry {
            stored: Stored::new(key, value),
            times,
        };
        if let Some((_, old)) = shard.lru.push(h, entry) {
            // Not this key (removed above): the shard was full.
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            self.forget(&old.stored);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        self.count(key, true);
        waiters
    }

    /// Drops `key`'s entry (a purge, an invalidation); lookups in flight stay.
    /// True if there was one.
    pub fn drop_key(&self, key: &[u8]) -> bool {
        let (h, shard) = self.shard(key);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        match shard.lru.peek(&h) {
            Some(e) if e.stored.key() == key => {
                self.remove(&mut shard, h);
                true
            }
            _ => false,
        }
    }

    /// What the cache holds for `key`: the value (`None`: not found) and
    /// the milliseconds it stays fresh (negative: expired that long ago).
    pub fn peek(&self, key: &[u8], now_ms: u64) -> Option<(Option<Vec<u8>>, i64)> {
        let (h, shard) = self.shard(key);
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let e = shard.lru.peek(&h).filter(|e| e.stored.key() == key)?;
        Some((
            e.stored.value().map(<[u8]>::to_vec),
            e.times.fresh_until_ms as i64 - now_ms as i64,
        ))
    }

    /// Calls `f` with the entries of each shard in turn whose key starts
    /// with `prefix` (key, value, milliseconds left fresh), copied out of
    /// the shard so no lock is held while `f` runs: memory stays one
    /// shard's share. `f` returning false stops.
    #[allow(clippy::type_complexity)]
    pub fn for_each(
        &self,
        prefix: &[u8],
        now_ms: u64,
        mut f: impl FnMut(&[(Vec<u8>, Option<Vec<u8>>, i64)]) -> bool,
    ) {
        for s in self.shards.iter() {
            let batch: Vec<(Vec<u8>, Option<Vec<u8>>, i64)> = {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.lru
                    .iter()
                    .filter(|(_, e)| e.stored.key().starts_with(prefix))
                    .map(|(_, e)| {
                        (
                            e.stored.key().to_vec(),
                            e.stored.value().map(<[u8]>::to_vec),
                            e.times.fresh_until_ms as i64 - now_ms as i64,
                        )
                    })
                    .collect()
            };
            if !batch.is_empty() && !f(&batch) {
                return;
            }
        }
    }

    /// A fetch failed (every server): returns the waiters and, when an
    /// expired entry is still within its stale time, its value to answer with
    /// (`Some(None)` = stale not-found, only with `stale_negative`).
    #[allow(clippy::type_complexity)]
    pub fn complete_err(
        &self,
        key: &[u8],
        now_ms: u64,
        stale_negative: bool,
    ) -> (Vec<Waiter>, Option<Option<Box<[u8]>>>) {
        let (h, shard) = self.shard(key);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let waiters = shard.inflight.remove(key).unwrap_or_default();
        let stale = match shard.lru.peek(&h) {
            Some(e)
                if e.stored.key() == key
                    && now_ms < e.times.stale_until_ms()
                    && (stale_negative || e.stored.value().is_some()) =>
            {
                Some(e.stored.value().map(Box::from))
            }
            _ => None,
        };
        if stale.is_some() && !waiters.is_empty() {
            self.stats.stale_answers.fetch_add(1, Ordering::Relaxed);
        }
        (waiters, stale)
    }

    /// Evicts one least recently used entry of another shard; false if
    /// none could be (all empty or busy).
    fn evict_elsewhere(&self) -> bool {
        let start = fastrand::usize(..self.shards.len());
        let n = self.shards.len();
        (0..n).any(|i| {
            self.shards[(start + i) % n]
                .try_lock()
                .is_ok_and(|mut o| self.evict_lru(&mut o))
        })
    }

    /// Evicts `shard`'s least recently used entry; false if it is empty.
    fn evict_lru(&self, shard: &mut Shard) -> bool {
        match shard.lru.pop_lru() {
            Some((_, old)) => {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                self.forget(&old.stored);
                true
            }
            None => false,
        }
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

    /// Changes the bounds, evicting the least recently used entries if they
    /// shrink. (The shard count stays as it was at start.)
    pub fn resize(&self, max_entries: usize, max_bytes: usize) {
        let max_entries = max_entries.max(1);
        self.max_entries.store(max_entries, Ordering::Relaxed);
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        let cap = Self::shard_cap(max_entries, self.shards.len());
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            while s.lru.len() > cap.get() && self.evict_lru(&mut s) {}
            s.lru.resize(cap);
        }
        let over = || {
            self.total.load(Ordering::Relaxed) > max_entries
                || self.bytes.load(Ordering::Relaxed) > max_bytes
        };
        for s in self.shards.iter() {
            if !over() {
                break;
            }
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            while over() && self.evict_lru(&mut s) {}
        }
    }

    /// Bytes held now, as the budget counts them (see [`entry_cost`]).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The bound on entries.
    pub fn max_entries(&self) -> usize {
        self.max_entries.load(Ordering::Relaxed)
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// Entries held now for map id `map`.
    pub fn map_len(&self, map: u16) -> u64 {
        self.map_entries
            .get(map as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Entries held now (fresh, expired or stale), over all shards.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry whose key starts with `prefix` (a map's id, e.g.
    /// when a reload changed that map's servers; empty: every entry).
    /// Lookups in flight stay.
    pub fn purge_prefix(&self, prefix: &[u8]) {
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let doomed: Vec<u64> = s
                .lru
                .iter()
                .filter(|(_, e)| e.stored.key().starts_with(prefix))
                .map(|(h, _)| *h)
                .collect();
            for h in doomed {
                self.remove(&mut s, h);
            }
        }
    }
}

/// Builds the cache key for `map` at generation `gen` and an already folded
/// `key` into `out`.
pub fn make_key(map: u16, gen: u32, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&map.to_be_bytes());
    out.extend_from_slice(&gen.to_be_bytes());
    out.extend_from_slice(key);
}

/// The lookup key inside a cache key.
pub fn lookup_key(cache_key: &[u8]) -> &[u8] {
    cache_key.get(KEY_PREFIX_BYTES..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTLS: Ttls = Ttls {
        ttl: Duration::from_secs(100),
        negative_ttl: Duration::from_secs(10),
        stale_ttl: Duration::from_secs(50),
        refresh_ahead_percent: 10,
        stale_negative: true,
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
        let c = Cache::new(100, usize::MAX);
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
        let c = Cache::new(100, usize::MAX);
        get(&c, b"k", 0, 1);
        c.complete_ok(b"k", None, &TTLS, 0);
        assert_eq!(
            get(&c, b"k", 5_000, 2),
            (Lookup::Hit { refresh: false }, Some(None))
        );
        assert_eq!(get(&c, b"k", 10_000, 3).0, Lookup::Fetch);
        let (ws, stale) = c.complete_err(b"k", 10_001, true);
        assert_eq!(ws, vec![w(3)]);
        assert_eq!(stale, Some(None));
        // past stale_ttl: nothing
        assert_eq!(get(&c, b"k", 60_000, 4).0, Lookup::Fetch);
        assert_eq!(c.complete_err(b"k", 60_000, true).1, None);
    }

    #[test]
    fn stale_negative_only_when_asked() {
        let c = Cache::new(100, usize::MAX);
        get(&c, b"k", 0, 1);
        c.complete_ok(b"k", None, &TTLS, 0);
        get(&c, b"f", 0, 2);
        c.complete_ok(b"f", Some(b"v"), &TTLS, 0);
        assert_eq!(get(&c, b"k", 10_000, 3).0, Lookup::Fetch);
        assert_eq!(c.complete_err(b"k", 10_001, false), (vec![w(3)], None));
        assert_eq!(get(&c, b"f", 100_000, 4).0, Lookup::Fetch);
        let stale = c.complete_err(b"f", 100_001, false).1;
        assert_eq!(stale, Some(Some(b"v".to_vec().into_boxed_slice())));
    }

    #[test]
    fn generations_cut_cleanly() {
        let c = Cache::new(100, usize::MAX);
        let (mut old, mut new) = (Vec::new(), Vec::new());
        make_key(3, 0, b"k", &mut old);
        make_key(3, 1, b"k", &mut new);
        assert_eq!(lookup_key(&new), b"k");
        assert_eq!(get(&c, &old, 0, 1).0, Lookup::Fetch);
        // a reload changes map 3's servers: generation 1
        c.set_gen(3, 1);
        c.purge_prefix(&3u16.to_be_bytes());
        // a lookup after it does not join the old fetch
        assert_eq!(get(&c, &new, 0, 2).0, Lookup::Fetch);
        // the old fetch answers its own waiter, and is not stored
        assert_eq!(c.complete_ok(&old, Some(b"old"), &TTLS, 1), vec![w(1)]);
        assert_eq!(c.len(), 0);
        assert_eq!(c.stats.not_stored.load(Ordering::Relaxed), 1);
        assert_eq!(c.complete_ok(&new, Some(b"new"), &TTLS, 1), vec![w(2)]);
        assert_eq!(
            get(&c, &new, 2, 3),
            (Lookup::Hit { refresh: false }, Some(Some(b"new".to_vec())))
        );
    }

    #[test]
    fn shared_cache_lifetimes_peek_drop_and_walk() {
        let c = Cache::new(100, usize::MAX);
        let life = Life {
            fresh_ms: 500,
            stale_ms: 1000,
            refresh_percent: 0,
        };
        assert_eq!(get(&c, b"\0\0\0\0\0\0a", 0, 1).0, Lookup::Fetch);
        // From L2 with 500 ms left: answers its waiter, fresh for 500 ms.
        assert_eq!(
            c.complete_with(b"\0\0\0\0\0\0a", Some(b"v"), life, 10),
            vec![w(1)]
        );
        assert_eq!(
            c.peek(b"\0\0\0\0\0\0a", 110),
            Some((Some(b"v".to_vec()), 400))
        );
        assert_eq!(
            get(&c, b"\0\0\0\0\0\0a", 509, 2).0,
            Lookup::Hit { refresh: false }
        );
        assert_eq!(get(&c, b"\0\0\0\0\0\0a", 510, 3).0, Lookup::Fetch);
        // A stale value from L2: stored expired, the lookup stays in flight,
        // and it answers if the servers fail.
        c.keep_stale(b"\0\0\0\0\0\0a", Some(b"old"), 1000, 600);
        assert_eq!(get(&c, b"\0\0\0\0\0\0a", 601, 4).0, Lookup::Joined);
        let (ws, v) = c.complete_err(b"\0\0\0\0\0\0a", 700, false);
        assert_eq!(
            (ws, v),
            (
                vec![w(3), w(4)],
                Some(Some(b"old".to_vec().into_boxed_slice()))
            )
        );
        let mut seen = Vec::new();
        c.for_each(&[0, 0], 700, |b| {
            seen.extend(b.iter().map(|(k, v, _)| (k.clone(), v.clone())));
            true
        });
        assert_eq!(
            seen,
            vec![(b"\0\0\0\0\0\0a".to_vec(), Some(b"old".to_vec()))]
        );
        assert!(c.drop_key(b"\0\0\0\0\0\0a"));
        assert!(!c.drop_key(b"\0\0\0\0\0\0a"));
        assert_eq!((c.len(), c.bytes()), (0, 0));
        // A value from L2 with no freshness left here (a map ttl of zero)
        // still answers its waiters: nothing stays in flight.
        assert_eq!(get(&c, b"\0\0\0\0\0\0b", 800, 5).0, Lookup::Fetch);
        let none_left = Life {
            fresh_ms: 0,
            stale_ms: 0,
            refresh_percent: 0,
        };
        assert_eq!(
            c.complete_with(b"\0\0\0\0\0\0b", Some(b"v"), none_left, 800),
            vec![w(5)]
        );
        assert_eq!(get(&c, b"\0\0\0\0\0\0b", 801, 6).0, Lookup::Fetch);
    }

    #[test]
    fn byte_budget() {
        let value = vec![b'v'; 1000];
        let one = entry_cost(8, value.len());
        let c = Cache::new(1000, one * 10);
        let mut k = Vec::new();
        for i in 0..100u16 {
            make_key(0, 0, &i.to_be_bytes(), &mut k);
            c.complete_ok(&k, Some(&value), &TTLS, 0);
            assert!(c.bytes() <= c.max_bytes());
        }
        assert_eq!((c.len(), c.bytes()), (10, one * 10));
        // a value larger than the whole budget is answered, not stored
        let huge = vec![b'h'; one * 10];
        make_key(0, 0, b"huge", &mut k);
        c.complete_ok(&k, Some(&huge), &TTLS, 0);
        assert_eq!(c.len(), 10);
        // shrinking the budget evicts
        c.resize(1000, one * 4);
        assert_eq!((c.len(), c.bytes()), (4, one * 4));
        c.purge_prefix(&[0, 0]);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn zero_ttl_stores_nothing_and_lru_evicts() {
        let c = Cache::new(100, usize::MAX);
        let off = Ttls {
            ttl: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            ..TTLS
        };
        get(&c, b"k", 0, 1);
        c.complete_ok(b"k", Some(b"v"), &off, 0);
        assert_eq!(get(&c, b"k", 1, 2).0, Lookup::Fetch);
        let small = Cache::new(100, usize::MAX);
        for i in 0..1000u32 {
            small.complete_ok(&i.to_be_bytes(), Some(b"v"), &TTLS, 0);
        }
        assert_eq!(small.len(), 100);
        // keys are 4 bytes: the map id is their first two
        let by_map: u64 = (0..1000u32)
            .map(|i| (i >> 16) as u16)
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .map(|&m| small.map_len(m))
            .sum();
        assert_eq!(by_map, 100);
        assert_eq!(small.stats.evictions.load(Ordering::Relaxed), 900);
        // replacing a key neither grows the cache nor counts an eviction
        small.complete_ok(&999u32.to_be_bytes(), Some(b"w"), &TTLS, 0);
        assert_eq!(small.len(), 100);
        assert_eq!(small.stats.evictions.load(Ordering::Relaxed), 900);
        small.resize(10, usize::MAX);
        assert_eq!(small.len(), 10);
        small.purge_prefix(&[0, 0]);
        assert_eq!(small.len(), 0);
        assert_eq!(small.map_len(0), 0);
    }

    #[test]
    fn stored_layout_and_shard_fit() {
        let s = Stored::new(b"key", Some(b"value"));
        assert_eq!((s.key(), s.value()), (&b"key"[..], Some(&b"value"[..])));
        let n = Stored::new(b"k", None);
        assert_eq!((n.key(), n.value()), (&b"k"[..], None));
        let e = Stored::new(b"k", Some(b""));
        assert_eq!(e.value(), Some(&b""[..]));
        for max in [1, 1000, 100_000, 1_000_000] {
            let n = shard_count(max);
            assert!((MIN_SHARDS..=MAX_SHARDS).contains(&n));
        }
        // a million entries: tables at least 60% full
        let n = shard_count(1_000_000);
        let cap = Cache::shard_cap(1_000_000, n).get();
        assert!(
            n * table_buckets(cap) * 6 / 10 <= 1_100_000,
            "{n} shards of {cap}"
        );
    }
}
