//! httpmapd: a Postfix lookup table (`tcp:` and `socketmap:`) answered by
//! HTTP servers speaking the dict_http protocol, through an in-memory cache.
//!
//! # Threads
//! ```text
//!  main ── parses config, binds listeners, starts threads, joins them
//!   ├─ signals   signal-hook: HUP → reload, TERM/INT → drain & stop, USR1 → counters
//!   ├─ stats     optional: GET /metrics (Prometheus text) and /health
//!   │            sends Msg::{Reload, Shutdown} over crossbeam-channel, wakes each worker
//!   └─ worker×N  one mio Poll each: its own listeners (SO_REUSEPORT), client
//!                sessions, its own keep-alive pools to every server, timers
//!  cache         shared by all workers: sharded LRU + in-flight table (coalescing)
//! ```
//!
//! # A lookup's way
//! client bytes → [`codec::tcp_table`] / [`codec::netstring`] → `(map, key)` →
//! key folded → [`cache::Cache`]: fresh → answer at once (refresh in the
//! background near expiry); in flight → wait for it; else → a fetch in
//! [`backend`]: a random healthy server, a pooled or new connection, `GET` with
//! `POSTFIX-DICT-EMAIL`, the reply parsed by [`codec::http`]; on failure the
//! other servers in random order within the lookup's budget. The result goes to
//! the cache (found: `ttl`, not found: `negative_ttl`, errors never) and to
//! every waiting request, in order on each connection. When every server
//! fails, a stale entry answers if there is one; otherwise Postfix gets a
//! temporary error (mail is deferred, never bounced).
//!
//! # Layout
//! - [`config`]: TOML → typed config, `FILE:LINE: message` errors.
//! - [`codec`]: pure codecs: `%XX`, tcp_table, netstring, HTTP/1.1 client.
//! - [`cache`]: the shared cache. [`backend`]: pools, fetches, failover, health.
//! - [`worker`]: one event loop. [`net`]: listeners and streams.
//! - [`daemon`]: start-up, reload, signals, shutdown. [`metrics`]: counters, /metrics.
//!   [`notify`]: sd_notify to systemd.
//! - [`client`]: the query client.
//! - [`demo_backend`]: the bundled sample HTTP backend. [`log`]: log lines.

pub mod admin;
pub mod backend;
pub mod cache;
pub mod client;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod demo_backend;
pub mod log;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod resolver;
pub mod shared_cache;
pub mod tls;
pub mod transport;
pub mod worker;
