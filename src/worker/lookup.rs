//! From a request's key to its answer: key folding, the shared cache in
//! process ([`crate::cache`]), a fetch from the servers, and the
//! completions that store results and answer every waiting request.

use super::session::{encode_answer, AnswerRef, Slot};
use super::*;

impl Worker {
    pub(super) fn lookup(&mut self, sid: usize, map: u16, key: &[u8], now: Instant) {
        self.shared
            .stats
            .counters
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let Some(mcfg) = self.shared.map(map) else {
            self.answer_now(
                sid,
                AnswerRef::Temp(b"map removed by a configuration reload"),
            );
            return;
        };
        fold_key(key, mcfg.fold_case, &mut self.fold_buf);
        cache::make_key(
            map,
            self.shared.gen(map),
            &self.fold_buf,
            &mut self.ckey_buf,
        );
        let cache = &self.shared.cache;
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let waiter = s.next_waiter(self.id, sid);
        let proto = s.proto;
        let counters = &self.shared.stats.maps[map as usize];
        let r = cache.lookup(&self.ckey_buf, cache.ms_at(now), waiter, |v| {
            let a = match v {
                Some(v) => {
                    counters.found.fetch_add(1, Ordering::Relaxed);
                    AnswerRef::Found(v)
                }
                None => {
                    counters.not_found.fetch_add(1, Ordering::Relaxed);
                    AnswerRef::NotFound
                }
            };
            s.emit(|out| encode_answer(proto, a, out, &mcfg.name));
        });
        match r {
            Lookup::Hit { .. } => counters.cache_hits.fetch_add(1, Ordering::Relaxed),
            _ => counters.cache_misses.fetch_add(1, Ordering::Relaxed),
        };
        match r {
            Lookup::Hit { refresh } => {
                if refresh {
                    let registry = self.poll.registry();
                    self.backend
                        .start(registry, map, &self.fold_buf, &self.ckey_buf, now);
                }
            }
            Lookup::Joined => s.pending.push_back(Slot::Waiting),
            Lookup::Fetch => {
                s.pending.push_back(Slot::Waiting);
                self.fetch(map, now);
            }
        }
        if crate::log::enabled(crate::log::Level::Debug) {
            let what = match r {
                Lookup::Hit { refresh: false } => "cache hit",
                Lookup::Hit { refresh: true } => "cache hit, refreshing in the background",
                Lookup::Joined => "miss, joined a fetch in flight",
                Lookup::Fetch => "miss, fetching",
            };
            crate::debug!(
                "map {}: lookup {:?}: {what}",
                self.shared.map_name(map),
                String::from_utf8_lossy(&self.fold_buf)
            );
        }
    }

    /// Stores finished fetches in the cache and answers their waiters.
    pub(super) fn handle_completions(&mut self, now: Instant) {
        self.handle_l2(now);
        let mut done: Vec<Completion> = self.backend.completions().collect();
        for b in &mut self.old_backends {
            done.extend(b.completions());
        }
        for c in done {
            let cache = &self.shared.cache;
            let now_ms = cache.ms_at(now);
            let ttls = &self.shared.ttls(c.map);
            let map_name = self.shared.map_name(c.map);
            let counters = &self.shared.stats.maps[c.map as usize];
            counters.fetch_latency.observe(c.elapsed);
            if crate::log::enabled(crate::log::Level::Debug) {
                let key = String::from_utf8_lossy(cache::lookup_key(&c.cache_key));
                let what = match &c.outcome {
                    Outcome::Found(v) => format!("found {:?}", String::from_utf8_lossy(v)),
                    Outcome::NotFound => "not found".to_string(),
                    Outcome::Temp(m) => format!("temporary error: {m}"),
                };
                crate::debug!(
                    "map {map_name}: fetched {key:?} in {}us: {what}",
                    c.elapsed.as_micros()
                );
            }
            let is_policy = self
                .shared
                .map(c.map)
                .is_some_and(|m| m.kind != crate::config::MapKind::Table);
            let (waiters, answer) = match c.outcome {
                Outcome::Found(v) => {
                    let w = cache.complete_ok(&c.cache_key, Some(&v), ttls, now_ms);
                    counters.found.fetch_add(w.len() as u64, Ordering::Relaxed);
                    if is_policy {
                        let class = crate::metrics::policy_action_class(&v);
                        counters.policy_actions[class].fetch_add(w.len() as u64, Ordering::Relaxed);
                    } else {
                        self.l2_write(c.map, &c.cache_key, Some(&v), now);
                    }
                    (w, Answer::Found(v.into()))
                }
                Outcome::NotFound => {
                    let w = cache.complete_ok(&c.cache_key, None, ttls, now_ms);
                    counters
                        .not_found
                        .fetch_add(w.len() as u64, Ordering::Relaxed);
                    if is_policy {
                        let class = crate::metrics::policy_action_class(b"DUNNO");
                        counters.policy_actions[class].fetch_add(w.len() as u64, Ordering::Relaxed);
                    } else {
                        self.l2_write(c.map, &c.cache_key, None, now);
                    }
                    (w, Answer::NotFound)
                }
                Outcome::Temp(msg) if is_policy => {
                    let (w, _) = cache.complete_err(&c.cache_key, now_ms, false);
                    let Some(answer) = self.policy_default(c.map, &msg) else {
                        continue;
                    };
                    self.shared.stats.maps[c.map as usize]
                        .policy_defaults
                        .fetch_add(w.len().saturating_sub(1) as u64, Ordering::Relaxed);
                    (w, answer)
                }
                Outcome::Temp(msg) => {
                    let (w, stale) = cache.complete_err(&c.cache_key, now_ms, ttls.stale_negative);
                    if w.is_empty() {
                        // A background refresh failed: the entry keeps serving
                        // until it expires; nobody waits for an answer.
                        crate::debug!("map {map_name}: background refresh failed: {msg}");
                        continue;
                    }
                    match stale {
                        Some(v) => {
                            if let Some(n) = LOG_STALE.check() {
                                crate::warn!("map {map_name}: every server failed ({msg}); answering from stale cache entries ({n} more not logged)");
                            }
                            counters.stale.fetch_add(w.len() as u64, Ordering::Relaxed);
                            (w, v.map_or(Answer::NotFound, |v| Answer::Found(v.into())))
                        }
                        None => {
                            if let Some(n) = LOG_TEMP.check() {
                                crate::warn!("map {map_name}: lookup failed, answered a temporary error: {msg} ({n} similar not logged)");
                            }
                            counters
                                .temporary
                                .fetch_add(w.len() as u64, Ordering::Relaxed);
                            (w, Answer::Temp(msg.into()))
                        }
                    }
                }
            };
            self.l2_release(&c.cache_key, now);
            self.answer_waiters(waiters, &answer, now);
        }
    }

    /// Gives `answer` to every request waiting for it, on this worker or
    /// another (over its channel).
    pub(super) fn answer_waiters(&mut self, waiters: Vec<Waiter>, answer: &Answer, now: Instant) {
        for w in waiters {
            if w.worker == self.id {
                self.deliver(w.session as usize, w.gen, w.seq, answer, now);
            } else if let Some((tx, waker)) = self.shared.mailboxes.get(w.worker as usize) {
                let _ = tx.send(Msg::Answer {
                    session: w.session,
                    gen: w.gen,
                    seq: w.seq,
                    answer: answer.clone(),
                });
                let _ = waker.wake();
            }
        }
    }
}

/// Lower-cases `key` into `out` when `fold` (ASCII fast path; UTF-8 keys by
/// Unicode lower case, as Postfix folds SMTPUTF8 keys).
pub fn fold_key(key: &[u8], fold: bool, out: &mut Vec<u8>) {
    out.clear();
    if !fold {
        out.extend_from_slice(key);
    } else if key.is_ascii() {
        out.extend(key.iter().map(u8::to_ascii_lowercase));
    } else if let Ok(s) = std::str::from_utf8(key) {
        out.extend_from_slice(s.to_lowercase().as_bytes());
    } else {
        out.extend(key.iter().map(u8::to_ascii_lowercase));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn folding() {
        let mut out = Vec::new();
        for (k, fold, want) in [
            ("Alice@Example.COM", true, "alice@example.com"),
            ("Alice@Example.COM", false, "Alice@Example.COM"),
            ("ÅSA@Exämple.com", true, "åsa@exämple.com"),
        ] {
            fold_key(k.as_bytes(), fold, &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }
}
