//! Counters and histograms, and the `stats_listen` HTTP endpoint that shows
//! them: `GET /metrics` (Prometheus text exposition) and `GET /health`.
//!
//! Everything here is atomics written by the workers without locks; this
//! module only adds them up and renders them. The endpoint accepts on its own
//! thread (a scrape every few seconds needs no event loop) and serves each
//! client on a short-lived thread of its own with a deadline, so one slow or
//! silent client cannot hold `/metrics` and `/health` from the others; at
//! most [`MAX_STATS_CLIENTS`] are served at once, and what is read from a
//! request is bounded.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in seconds.
/// Upper bounds of the latency buckets, in seconds: from 100 µs (a loopback
/// miss) to 100 s, past the largest `lookup_timeout` a map may have (it must
/// stay under Postfix's 100 s), so a slow lookup never hides in `+Inf`.
pub const LATENCY_BUCKETS_SECONDS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 100.0,
];
/// Largest request head the endpoint reads.
const MAX_REQUEST_BYTES: usize = 8192;
/// Bound on reading a request and on writing the answer, each.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Stats clients served at once; more are answered `503` at once.
pub const MAX_STATS_CLIENTS: usize = 16;

/// A fixed-bucket latency histogram.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS_SECONDS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`k="v",...` or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS_SECONDS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Reloads (SIGHUP) and how the last one went.
pub struct ReloadStats {
    /// The last reload took effect (true at start).
    pub last_ok: std::sync::atomic::AtomicBool,
    /// When the configuration in force was loaded (start or reload), Unix seconds.
    pub last_success_unix: AtomicU64,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
}

impl Default for ReloadStats {
    fn default() -> ReloadStats {
        ReloadStats {
            last_ok: std::sync::atomic::AtomicBool::new(true),
            last_success_unix: AtomicU64::new(unix_now()),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

impl ReloadStats {
    pub fn record(&self, ok: bool) {
        self.last_ok.store(ok, Ordering::Relaxed);
        if ok {
            self.successes.fetch_add(1, Ordering::Relaxed);
            self.last_success_unix.store(unix_now(), Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The first words of policy actions counted apart (SMTPD_POLICY_README and
/// access(5)); any other is `other`, `4xx`/`5xx` are numeric replies.
pub const POLICY_ACTIONS: [&str; 17] = [
    "OK",
    "DUNNO",
    "REJECT",
    "DEFER",
    "DEFER_IF_PERMIT",
    "DEFER_IF_REJECT",
    "HOLD",
    "DISCARD",
    "FILTER",
    "PREPEND",
    "REDIRECT",
    "WARN",
    "BCC",
    "INFO",
    "4xx",
    "5xx",
    "other",
];

/// Which of [`POLICY_ACTIONS`] an action counts as.
pub fn policy_action_class(action: &[u8]) -> usize {
    let word = action
        .split(|b| b.is_ascii_whitespace())
        .next()
        .unwrap_or_default();
    match word {
        [d, _, _] if d.is_ascii_digit() && word.iter().all(u8::is_ascii_digit) => {
            if *d == b'4' {
                14
            } else if *d == b'5' {
                15
            } else {
                16
            }
        }
        _ => POLICY_ACTIONS[..14]
            .iter()
            .position(|a| a.as_bytes().eq_ignore_ascii_case(word))
            .unwrap_or(16),
    }
}

/// Lookups of one map by outcome.
#[derive(Default)]
pub struct MapCounters {
    pub found: AtomicU64,
    pub not_found: AtomicU64,
    pub temporary: AtomicU64,
    pub stale: AtomicU64,
    /// Lookups answered from a fresh cache entry, and the others.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// A policy service: requests, actions answered by their first word
    /// ([`POLICY_ACTIONS`]), and the default action given.
    pub policy_requests: AtomicU64,
    pub policy_actions: [AtomicU64; POLICY_ACTIONS.len()],
    pub policy_defaults: AtomicU64,
    /// Time from a fetch's start to its end (misses only).
    pub fetch_latency: Histogram,
}

/// One server's requests by outcome.
#[derive(Default)]
pub struct ServerCounters {
    /// A reply that gave a result (found or not found).
    pub ok: AtomicU64,
    /// A reply with an error status (5xx...).
    pub http_error: AtomicU64,
    /// Refused, reset, timed out, unparseable, rejected (protocol errors).
    pub failure: AtomicU64,
    /// Protocol errors by kind: bytes on an idle connection (or behind a
    /// reply), a key echo that differs, a missing echo (`require_key_echo`).
    pub stray_bytes: AtomicU64,
    pub echo_mismatch: AtomicU64,
    pub echo_missing: AtomicU64,
    /// Connections opened (TCP connects started).
    pub connects: AtomicU64,
    /// TLS handshakes completed: full ones, and resumed sessions.
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
    pub latency: Histogram,
}

/// The standard `process_*` metrics of this process (Linux `/proc`):
/// resident and virtual memory, CPU seconds, open and maximum file
/// descriptors, start time.
pub fn render_process(out: &mut String) {
    let page = page_size_bytes();
    // SAFETY: sysconf with a valid name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // /proc/PID/stat fields, counted from 1: utime 14, stime 15, starttime 22,
    // vsize 23, rss 24; `fields` starts at field 3.
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let max_fds = nofile_limit().map_or(0.0, |rl| rl.rlim_cur as f64);
    for (name, kind, help, v) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (field(14) + field(15)) / ticks,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            field(24) * page as f64,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            field(23),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            open_fds as f64,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot_time + field(22) / ticks,
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
}

fn page_size_bytes() -> usize {
    // SAFETY: sysconf with a valid name.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Escapes a Prometheus label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` for a metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

type Render = dyn Fn() -> String + Send + Sync;
type HealthFn = dyn Fn() -> (bool, String) + Send + Sync;

/// Serves `/metrics` and `/health` on `listener` forever; `render` builds
/// the metrics page, `health` gives (healthy, text).
pub fn serve(
    listener: std::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    health: impl Fn() -> (bool, String) + Send + Sync + 'static,
) {
    let render: Arc<Render> = Arc::new(render);
    let health: Arc<HealthFn> = Arc::new(health);
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_STATS_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            continue;
        }
        let (render, health, done) = (render.clone(), health.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("stats-client".into())
            .spawn(move || {
                serve_one(s, &*render, &*health);
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One stats client: one request (read within [`IO_TIMEOUT`] in all), one answer.
fn serve_one(mut s: std::net::TcpStream, render: &Render, health: &HealthFn) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let path = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break None;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break Some((
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                ))
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_BYTES => {}
            _ => break None,
        }
    };
    let (status, ctype, body) = match path.as_ref().map(|(m, p)| (m.as_str(), p.as_str())) {
        // HEAD is answered like GET, without the body (below).
        Some(("GET" | "HEAD", "/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        Some(("GET" | "HEAD", "/health")) => {
            let (ok, text) = health();
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "text/plain; charset=utf-8",
                text,
            )
        }
        Some(_) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_string(),
        ),
        None => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    if path.as_ref().is_none_or(|(m, _)| m != "HEAD") {
        let _ = s.write_all(body.as_bytes());
    }
}

/// The open-files limit (soft and hard); `None` if it cannot be read.
pub fn nofile_limit() -> Option<libc::rlimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid, initialised struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0).then_some(rl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "map=\"v\"");
        assert!(
            out.contains("x_bucket{map=\"v\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{map=\"v\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{map=\"v\",le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{map=\"v\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{map=\"v\"} 3\n"), "{out}");
    }
}
