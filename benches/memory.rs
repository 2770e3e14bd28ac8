//! Exact counts, not timings: a counting global allocator measures
//!
//! - heap allocations per request on the in-process hit path (tcp_table and
//!   socketmap, as `benches/hot_path.rs` runs it), and on the cache-off miss
//!   path (lookup → Fetch → complete_ok with zero TTLs);
//! - heap bytes held per cached entry at 1M entries, beyond key and value
//!   (requested bytes; malloc's own per-block overhead, typically 8–16 bytes
//!   per block, comes on top: `benches/compare.sh` measures RSS on the daemon).
//!
//! `cargo bench --bench memory` (a few seconds; prints one line per figure).

use httpmapd::cache::{self, Cache, Ttls, Waiter};
use httpmapd::codec::{netstring, tcp_table};
use httpmapd::worker::fold_key;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static BLOCKS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

const TTLS: Ttls = Ttls {
    ttl: Duration::from_secs(3600),
    negative_ttl: Duration::from_secs(60),
    stale_ttl: Duration::from_secs(3600),
    refresh_ahead_percent: 10,
    stale_negative: false,
};
const OFF: Ttls = Ttls {
    ttl: Duration::ZERO,
    negative_ttl: Duration::ZERO,
    stale_ttl: Duration::ZERO,
    refresh_ahead_percent: 0,
    stale_negative: false,
};
const W: Waiter = Waiter {
    worker: 0,
    session: 1,
    gen: 1,
    seq: 0,
};

fn key(i: usize) -> String {
    format!("user{i}@example.com")
}
fn value(i: usize) -> String {
    format!("user{i}@mail.example.com")
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let n = 1_000_000;
    let (live0, blocks0) = (LIVE.load(Ordering::Relaxed), BLOCKS.load(Ordering::Relaxed));
    // As the daemon would be configured for 1M entries; a few land beyond a
    // full shard and evict, which is counted below.
    let c = Cache::new(n, usize::MAX);
    let mut ck = Vec::new();
    let mut kv_bytes = 0usize;
    for i in 0..n {
        cache::make_key(0, 0, key(i).as_bytes(), &mut ck);
        let v = value(i);
        c.complete_ok(&ck, Some(v.as_bytes()), &TTLS, 0);
        kv_bytes += ck.len() + v.len();
    }
    drop(ck);
    let held = c.len();
    let live = LIVE.load(Ordering::Relaxed) - live0;
    let blocks = BLOCKS.load(Ordering::Relaxed) - blocks0;
    let kv_per = kv_bytes as f64 / n as f64;
    println!(
        "cache with {n} inserts: {held} entries held ({} evicted by uneven shards)",
        n - held
    );
    println!(
        "heap: {:.1} bytes/entry requested, key+value {:.1} bytes/entry, overhead {:.1} bytes/entry \
         in {:.2} heap blocks/entry (+ malloc's per-block header, ~8-16 B each)",
        live as f64 / held as f64,
        kv_per,
        live as f64 / held as f64 - kv_per,
        blocks as f64 / held as f64
    );

    // Allocations per request.
    let reqs = 100_000;
    let mut key_buf = Vec::with_capacity(256);
    let mut fold_buf = Vec::with_capacity(256);
    let mut ckey = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(4096);
    let lines: Vec<Vec<u8>> = (0..reqs)
        .map(|i| format!("get User{}@Example.com\n", i * 7 % held).into_bytes())
        .collect();
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut hits = 0;
    for l in &lines {
        if let tcp_table::Parsed::Line { result: Ok(()), .. } =
            tcp_table::parse_request(l, 4096, &mut key_buf)
        {
            fold_key(&key_buf, true, &mut fold_buf);
            cache::make_key(0, 0, &fold_buf, &mut ckey);
            out.clear();
            if let cache::Lookup::Hit { .. } = c.lookup(&ckey, 1, W, |v| {
                tcp_table::encode_found(v.unwrap(), &mut out).unwrap()
            }) {
                hits += 1;
            }
        }
    }
    let a = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "tcp_table hit path: {:.3} allocations/request ({hits} hits of {reqs})",
        a as f64 / reqs as f64
    );

    let sm: Vec<Vec<u8>> = (0..reqs)
        .map(|i| {
            let mut v = Vec::new();
            netstring::encode(
                &[
                    b"virtual ",
                    format!("User{}@Example.com", i * 7 % held).as_bytes(),
                ],
                &mut v,
            );
            v
        })
        .collect();
    let before = ALLOCS.load(Ordering::Relaxed);
    for r in &sm {
        let (s, e, _) = netstring::parse(r, 10_000).unwrap().unwrap();
        let (_, k) = netstring::split_request(&r[s..e]).unwrap();
        fold_key(k, true, &mut fold_buf);
        cache::make_key(0, 0, &fold_buf, &mut ckey);
        out.clear();
        c.lookup(&ckey, 1, W, |v| {
            netstring::encode_ok(v.unwrap(), 100_000, &mut out).unwrap()
        });
    }
    let a = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "socketmap hit path: {:.3} allocations/request",
        a as f64 / reqs as f64
    );

    let absent: Vec<Vec<u8>> = (0..reqs)
        .map(|i| {
            let mut k = Vec::new();
            cache::make_key(0, 0, format!("nobody{i}@example.com").as_bytes(), &mut k);
            k
        })
        .collect();
    let before = ALLOCS.load(Ordering::Relaxed);
    for k in &absent {
        c.lookup(k, 1, W, |_| {});
        c.complete_ok(k, Some(b"v"), &OFF, 1);
    }
    let a = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "cache-off miss (lookup→Fetch + complete_ok): {:.3} allocations/request (inflight key box + waiter vec, before any HTTP work)",
        a as f64 / reqs as f64
    );
}
