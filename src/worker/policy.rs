//! A policy service's request (Postfix's `check_policy_service`): its
//! attributes become the body of a `POST` to the policy's servers (JSON or a
//! form), through the same fetches, pools and failover as lookups. With
//! `cache_key`, the action is cached per tuple of those attributes for the
//! policy's `ttl`; without it every request reaches a server (the cache only
//! carries it to its session). The answer is the server's action, `DUNNO`
//! for an empty one, or the policy's `default_action` when no server gives
//! one (counted and logged).

use super::session::{encode_answer, Slot};
use super::*;
use crate::codec::policy::Attributes;
use crate::config::{MapKind, PolicyRequest};

impl Worker {
    pub(super) fn policy_lookup(&mut self, sid: usize, map: u16, attrs: &Attributes, now: Instant) {
        let counters = &self.shared.stats.maps[map as usize];
        counters.policy_requests.fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .counters
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let Some(mcfg) = self.shared.map(map).cloned() else {
            self.answer_now(
                sid,
                session::AnswerRef::Temp(b"policy removed by a configuration reload"),
            );
            return;
        };
        let MapKind::Policy(p) = &mcfg.kind else {
            return;
        };
        // The cache key: the tuple of cache_key attributes, or a key no
        // other request has (never stored: the policy's ttl is 0 then).
        self.fold_buf.clear();
        if p.cache_key.is_empty() {
            // The in-flight table is shared by every worker: the worker's
            // id makes the key unique daemon-wide.
            self.fold_buf.push(0xff);
            self.fold_buf.extend_from_slice(&self.id.to_be_bytes());
            self.fold_buf
                .extend_from_slice(&self.next_policy_id.to_be_bytes());
            self.next_policy_id += 1;
        } else {
            for (i, name) in p.cache_key.iter().enumerate() {
                if i > 0 {
                    self.fold_buf.push(0);
                }
                let v = crate::codec::policy::get(attrs, name.as_bytes()).unwrap_or_default();
                self.fold_buf.extend_from_slice(v);
            }
        }
        cache::make_key(
            map,
            self.shared.gen(map),
            &self.fold_buf,
            &mut self.ckey_buf,
        );
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let waiter = s.next_waiter(self.id, sid);
        let proto = s.proto;
        let cache = &self.shared.cache;
        let r = cache.lookup(&self.ckey_buf, cache.ms_at(now), waiter, |v| {
            let action = v.unwrap_or(b"DUNNO");
            let class = crate::metrics::policy_action_class(action);
            counters.policy_actions[class].fetch_add(1, Ordering::Relaxed);
            s.emit(|out| encode_answer(proto, session::AnswerRef::Found(action), out, &mcfg.name));
        });
        match r {
            Lookup::Hit { .. } => {
                counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            }
            Lookup::Joined => {
                counters.cache_misses.fetch_add(1, Ordering::Relaxed);
                s.pending.push_back(Slot::Waiting);
            }
            Lookup::Fetch => {
                counters.cache_misses.fetch_add(1, Ordering::Relaxed);
                s.pending.push_back(Slot::Waiting);
                let mut body = Vec::new();
                match p.request {
                    PolicyRequest::Json => crate::codec::policy::json_body(attrs, &mut body),
                    PolicyRequest::Form => crate::codec::policy::form_body(attrs, &mut body),
                }
                let registry = self.poll.registry();
                self.backend
                    .start(registry, map, &body, &self.ckey_buf, now);
            }
        }
    }

    /// A policy's fetch ended without an action from any server: its
    /// default action, counted and logged (rate-limited).
    pub(super) fn policy_default(&self, map: u16, why: &str) -> Option<Answer> {
        let mcfg = self.shared.map(map)?;
        let MapKind::Policy(p) = &mcfg.kind else {
            return None;
        };
        let counters = &self.shared.stats.maps[map as usize];
        counters.policy_defaults.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = LOG_DEFAULT_ACTION.check() {
            crate::warn!(
                "policy {}: no server gave an action ({why}); answered the default action {:?} ({n} similar not logged)",
                mcfg.name,
                p.default_action
            );
        }
        Some(Answer::Found(p.default_action.as_bytes().into()))
    }
}
