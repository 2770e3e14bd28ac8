//! A miss's way through the shared cache (with `[shared_cache]`): `GET`
//! on this worker's connection; a fresh value answers and goes to L1 with
//! the lifetime it has left; a stale one is kept in L1 for a stale answer
//! while the servers are asked; a miss takes a claim on the cold key (`SET
//! NX`) so one node fetches it while the others read what it writes, for up
//! to `claim_wait`. Values fetched from the servers are written back. Worker
//! 0 also receives the invalidations and drops what changed from L1.
//! Without a shared cache, or while it is down, a miss goes straight to the
//! servers.

use super::*;
use crate::cache::Life;
use crate::shared_cache::client::Done;
use crate::shared_cache::value::{self, unix_ms};

/// How often a lookup waiting on another node's claim reads the key again.
const CLAIM_POLL: Duration = Duration::from_millis(10);

/// A lookup on its way through the shared cache.
pub(super) struct L2Lookup {
    map: u16,
    /// The L1 key (the folded key is its tail, [`L2Lookup::key`]), the
    /// shared cache's key.
    cache_key: Vec<u8>,
    redis_key: Vec<u8>,
    /// After losing a claim: read the value again until then.
    wait_until: Option<Instant>,
    /// The claim key, once a claim was asked for.
    claim_key: Vec<u8>,
}

impl L2Lookup {
    /// The folded key.
    fn key(&self) -> &[u8] {
        cache::lookup_key(&self.cache_key)
    }
}

impl Worker {
    /// A miss of the key in `fold_buf` (L1 key in `ckey_buf`) for `map`:
    /// the shared cache first when there is one and it is up, else the
    /// servers.
    pub(super) fn fetch(&mut self, map: u16, now: Instant) {
        let registry = self.poll.registry();
        let Some(l2) = self.l2.as_mut() else {
            self.backend
                .start(registry, map, &self.fold_buf, &self.ckey_buf, now);
            return;
        };
        if !l2.is_ready() {
            self.shared
                .stats
                .l2
                .err_unavailable
                .fetch_add(1, Ordering::Relaxed);
            self.backend
                .start(registry, map, &self.fold_buf, &self.ckey_buf, now);
            return;
        }
        let mut redis_key = Vec::new();
        value::value_key(
            &l2.config().prefix,
            self.shared.map_name(map),
            &self.fold_buf,
            &mut redis_key,
        );
        let tag = self.next_l2_tag;
        self.next_l2_tag += 1;
        l2.get(registry, &redis_key, tag, now);
        self.l2_lookups.insert(
            tag,
            L2Lookup {
                map,
                cache_key: self.ckey_buf.clone(),
                redis_key,
                wait_until: None,
                claim_key: Vec::new(),
            },
        );
    }

    /// To the servers, after the shared cache.
    fn fetch_from_servers(&mut self, lk: &L2Lookup, now: Instant) {
        let registry = self.poll.registry();
        self.backend
            .start(registry, lk.map, lk.key(), &lk.cache_key, now);
    }

    /// What the shared cache said since the last turn: answers, claims,
    /// and (worker 0) invalidations.
    pub(super) fn handle_l2(&mut self, now: Instant) {
        let Some(l2) = self.l2.as_mut() else { return };
        let done: Vec<Done> = l2.completions().collect();
        let (changed, flush_all) = l2.take_invalidated();
        for d in done {
            match d {
                Done::Get { tag, entry } => {
                    let Some(lk) = self.l2_lookups.remove(&tag) else {
                        continue;
                    };
                    self.l2_answer(tag, lk, entry, now);
                }
                Done::Claim { tag, won } => {
                    let Some(mut lk) = self.l2_lookups.remove(&tag) else {
                        continue;
                    };
                    let stats = &self.shared.stats.l2;
                    if won {
                        stats.claims_won.fetch_add(1, Ordering::Relaxed);
                        // Released when the fetch ends (see l2_release).
                        self.l2_claims
                            .insert(lk.cache_key.clone(), std::mem::take(&mut lk.claim_key));
                        self.fetch_from_servers(&lk, now);
                    } else {
                        // Another node is fetching it: read what it writes.
                        stats.claims_lost.fetch_add(1, Ordering::Relaxed);
                        let wait = self
                            .l2
                            .as_ref()
                            .map_or(Duration::ZERO, |l| l.config().claim_wait);
                        lk.wait_until = Some(now + wait);
                        if let Some(l2) = self.l2.as_mut() {
                            l2.get_at(&lk.redis_key, tag, now + CLAIM_POLL);
                        }
                        self.l2_lookups.insert(tag, lk);
                    }
                }
            }
        }
        if flush_all || !changed.is_empty() {
            self.invalidate(changed, flush_all);
        }
    }

    /// A `GET`'s answer for lookup `lk`.
    fn l2_answer(&mut self, tag: u64, mut lk: L2Lookup, entry: Option<value::Entry>, now: Instant) {
        let ttls = self.shared.ttls(lk.map);
        let stats = &self.shared.stats.l2;
        let now_unix = unix_ms();
        let now_ms = self.shared.cache.ms_at(now);
        // Fetched by a node whose map differs (other servers, other
        // reading of their replies): not an answer here, not even stale.
        let entry = entry.filter(|e| e.fingerprint == self.shared.fingerprint(lk.map));
        let stale = if let Some(e) = entry {
            let own_ttl = ttls.fresh_for(e.value.is_some());
            let stale_ms = ttls.stale_ttl.as_millis() as u64;
            // The lifetime it has left, never more than this map's own: a
            // map whose ttl is zero here takes no fresh value from others.
            let fresh_ms = e
                .fresh_until_unix_ms
                .saturating_sub(now_unix)
                .min(own_ttl.as_millis() as u64);
            if fresh_ms > 0 {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                let life = Life {
                    fresh_ms,
                    stale_ms,
                    refresh_percent: ttls.refresh_ahead_percent,
                };
                let waiters = self.shared.cache.complete_with(
                    &lk.cache_key,
                    e.value.as_deref(),
                    life,
                    now_ms,
                );
                let counters = &self.shared.stats.maps[lk.map as usize];
                let answer = match e.value {
                    Some(v) => {
                        counters
                            .found
                            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                        Answer::Found(v.into())
                    }
                    None => {
                        counters
                            .not_found
                            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                        Answer::NotFound
                    }
                };
                return self.answer_waiters(waiters, &answer, now);
            }
            // Not fresh here: kept for a stale answer if the servers fail
            // (its stale window runs from the end of its freshness, or from
            // now when it is fresh only on nodes with a longer ttl).
            let stale_left =
                (e.fresh_until_unix_ms.min(now_unix) + stale_ms).saturating_sub(now_unix);
            if stale_left > 0 {
                self.shared
                    .cache
                    .keep_stale(&lk.cache_key, e.value.as_deref(), stale_left, now_ms);
            }
            stale_left > 0
        } else {
            false
        };
        // One stale hit or miss per lookup: a poll while another node
        // fetches reads the same key again.
        if lk.wait_until.is_none() {
            let counter = if stale {
                &stats.stale_hits
            } else {
                &stats.misses
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        match lk.wait_until {
            // Waiting for another node's value: read again, or give up waiting.
            Some(t) if now + CLAIM_POLL < t => {
                if let Some(l2) = self.l2.as_mut() {
                    l2.get_at(&lk.redis_key, tag, now + CLAIM_POLL);
                    self.l2_lookups.insert(tag, lk);
                    return;
                }
                self.fetch_from_servers(&lk, now)
            }
            Some(_) => self.fetch_from_servers(&lk, now),
            None => {
                let claim = self
                    .l2
                    .as_ref()
                    .map_or(Duration::ZERO, |l| l.config().claim_wait);
                if claim.is_zero() {
                    return self.fetch_from_servers(&lk, now);
                }
                // Claim it for as long as its fetch may take.
                let px = self
                    .shared
                    .map(lk.map)
                    .map_or(Duration::from_secs(10), |m| m.lookup_timeout);
                let prefix = self
                    .l2
                    .as_ref()
                    .map(|l| l.config().prefix.clone())
                    .unwrap_or_default();
                value::claim_key(
                    &prefix,
                    self.shared.map_name(lk.map),
                    cache::lookup_key(&lk.cache_key),
                    &mut lk.claim_key,
                );
                lk.wait_until = None;
                let registry = self.poll.registry();
                if let Some(l2) = self.l2.as_mut() {
                    l2.claim(registry, &lk.claim_key, px, tag, now);
                    self.l2_lookups.insert(tag, lk);
                }
            }
        }
    }

    /// Writes a result fetched from the servers to the shared cache:
    /// fresh for the map's `ttl` (`negative_ttl`), kept `stale_ttl` more.
    pub(super) fn l2_write(
        &mut self,
        map: u16,
        cache_key: &[u8],
        value: Option<&[u8]>,
        now: Instant,
    ) {
        let Some(l2) = self.l2.as_mut() else { return };
        if !self.shared.cache.current(cache_key) {
            // Fetched under a configuration a reload replaced: every node
            // would take it for the new servers' answer.
            return;
        }
        let ttls = self.shared.ttls(map);
        let ttl = ttls.fresh_for(value.is_some());
        if ttl.is_zero() || !l2.is_ready() {
            return;
        }
        let mut redis_key = Vec::new();
        value::value_key(
            &l2.config().prefix,
            self.shared.map_name(map),
            cache::lookup_key(cache_key),
            &mut redis_key,
        );
        let mut stored = Vec::new();
        value::encode(
            value,
            unix_ms() + ttl.as_millis() as u64,
            self.shared.fingerprint(map),
            &mut stored,
        );
        // Worker 0 will hear of this write: tell it the write is ours.
        let counted = self.id != 0 && self.shared.own_writes.add(&redis_key);
        let registry = self.poll.registry();
        if !l2.set(
            registry,
            &redis_key,
            &stored,
            ttl + ttls.stale_ttl,
            counted,
            now,
        ) && counted
        {
            self.shared.own_writes.take(&redis_key);
        }
    }

    /// A fetch of `cache_key` ended: if this node held the claim on it,
    /// release it (after the value's `SET`, in the same pipeline), so a
    /// later miss of the key does not wait for a fetch nobody makes.
    pub(super) fn l2_release(&mut self, cache_key: &[u8], now: Instant) {
        if self.l2_claims.is_empty() {
            return;
        }
        if let Some(claim) = self.l2_claims.remove(cache_key) {
            if let Some(l2) = self.l2.as_mut() {
                l2.unlink(&claim, now);
            }
        }
    }

    /// Keys changed in the shared cache by others (worker 0): dropped from
    /// L1 unless the change was this node's own write. `flush_all`: every
    /// key may have changed (the connection came back, or the server was
    /// flushed): L1 is dropped for every map.
    fn invalidate(&mut self, changed: Vec<Vec<u8>>, flush_all: bool) {
        let cache = &self.shared.cache;
        if flush_all {
            self.shared.own_writes.clear();
            cache.purge_prefix(&[]);
            crate::debug!("shared cache: every key may have changed; dropped the in-process cache");
            return;
        }
        let Some(prefix) = self.l2.as_ref().map(|l| l.config().prefix.clone()) else {
            return;
        };
        let mut ckey = Vec::new();
        for k in &changed {
            let names = self
                .shared
                .map_by_name
                .keys()
                .filter_map(|n| std::str::from_utf8(n).ok());
            let Some((name, key)) = value::parse_value_key(&prefix, k, names) else {
                continue;
            };
            if self.shared.own_writes.take(k) {
                continue;
            }
            self.shared
                .stats
                .l2
                .invalidations
                .fetch_add(1, Ordering::Relaxed);
            let Some(&id) = self.shared.map_by_name.get(name.as_bytes()) else {
                continue;
            };
            cache::make_key(id, self.shared.gen(id), key, &mut ckey);
            cache.drop_key(&ckey);
        }
    }

    /// The shared cache's connection is replaced (a reload changed it) or
    /// gone: lookups waiting on it go to the servers.
    pub(super) fn l2_abandon(&mut self, now: Instant) {
        self.l2_claims.clear();
        let waiting: Vec<L2Lookup> = self.l2_lookups.drain().map(|(_, lk)| lk).collect();
        for lk in waiting {
            self.fetch_from_servers(&lk, now);
        }
    }
}
