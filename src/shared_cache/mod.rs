//! The second-level cache a fleet shares: Redis or Valkey behind every
//! node's own in-process cache ([`crate::cache`]).
//!
//! A lookup's way with `[shared_cache]`: L1 (this process) → L2 (`GET` on
//! this worker's own pipelined connection, [`client::L2`]) → servers. A
//! value from L2 goes to L1 with the lifetime it has left; a value from the
//! servers goes to both (`SET ... PX`, found for `ttl`, not found for
//! `negative_ttl`, plus `stale_ttl` so any node can answer stale during an
//! outage). Temporary errors are stored nowhere. A cold key asked on several
//! nodes at once is fetched by one: the first takes a short claim (`SET
//! ... NX PX`), the others read the value it writes for up to `claim_wait`.
//!
//! Invalidation: one worker per node (worker 0) turns on client-side-caching
//! tracking (`CLIENT TRACKING ON BCAST PREFIX ... NOLOOP`) and drops from L1
//! every key another connection changes (another node's newer value, a
//! purge). This node's other workers change keys too; [`OwnWrites`] counts
//! those writes so their invalidations do not drop what this node just
//! stored. When the tracking connection breaks, what L1 holds is dropped
//! once it is back: while Redis is unreachable an entry can be stale for at
//! most its `ttl`. Redis trouble is only ever a miss (or a skipped write).
//!
//! - [`value`]: keys and the stored value (pure).
//! - [`client`]: one worker's connection.
//! - [`blocking`]: a blocking connection for the admin commands.

pub mod blocking;
pub mod client;
pub mod value;

use crate::config::RedisTarget;
use hashbrown::HashMap;
use std::sync::Mutex;

/// The greeting every connection opens with: `HELLO 3` (RESP3, which
/// tracking's invalidations need), `AUTH` when the URL has a password (user
/// `default` unless it names one), and `SETNAME name`.
pub fn hello_args<'a>(t: &'a RedisTarget, name: &'a str) -> Vec<&'a [u8]> {
    let mut args: Vec<&[u8]> = vec![b"HELLO", b"3"];
    if let Some(p) = &t.password {
        let user = t.user.as_deref().unwrap_or("default");
        args.extend_from_slice(&[b"AUTH", user.as_bytes(), p.as_bytes()]);
    }
    args.extend_from_slice(&[b"SETNAME", name.as_bytes()]);
    args
}

/// Most keys [`OwnWrites`] tracks; past it, it forgets them all and asks for
/// L1 to be dropped (an invalidation can be wasted, never lost).
const MAX_OWN_WRITES: usize = 100_000;

/// Writes to the shared cache made by this node's workers other than the
/// one that receives invalidations: each makes exactly one invalidation
/// arrive there, which is this node's own and must not drop the value it
/// just stored.
#[derive(Default)]
pub struct OwnWrites(Mutex<HashMap<Vec<u8>, u32>>);

impl OwnWrites {
    /// A write of `key` is about to be sent. False: the table is full and
    /// was cleared (the caller drops L1).
    pub fn add(&self, key: &[u8]) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_OWN_WRITES {
            m.clear();
            return false;
        }
        *m.entry(key.to_vec()).or_insert(0) += 1;
        true
    }

    /// An invalidation of `key` arrived: true if it was one of ours (it is
    /// consumed), false if another connection changed the key.
    pub fn take(&self, key: &[u8]) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                m.remove(key);
                true
            }
            None => false,
        }
    }

    /// Forgets everything (the tracking connection came back: L1 is dropped).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_writes_are_consumed_once_each() {
        let o = OwnWrites::default();
        assert!(o.add(b"k"));
        assert!(o.add(b"k"));
        assert!(o.take(b"k"));
        assert!(o.take(b"k"));
        assert!(!o.take(b"k"), "a third invalidation is someone else's");
        assert!(!o.take(b"other"));
    }
}
