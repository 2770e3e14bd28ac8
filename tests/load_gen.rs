//! The load generator, `httpmapd-load`, as a user runs it: the real binary
//! against real loopback sockets. Its command line (help, version, usage
//! errors and their exit statuses, a closed stdout or stderr), the `--json`
//! fields `benches/compare.sh` reads, the open loop (`--rate`) against a
//! deliberately slow tcp_table server written here (its queueing shows in
//! the percentiles, where the closed loop hides it), `--zipf` as the server
//! sees it, the progress line, and `--keys conf/demo.map` getting hits
//! through the daemon where generated keys get misses.

mod common;

use common::{free_port, load_output, run_load, show, spawn_load, Acceptor, Daemon, TestServer};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// The one JSON object a `--json` run prints on stdout.
fn json_of(o: &Output) -> Value {
    let s = show(&o.stdout);
    assert_eq!(s.lines().count(), 1, "one line on stdout: {s:?}");
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A tcp_table server: answers each `get KEY\n` with `200 v\n` after
/// `delay`, one request at a time per connection (a thread each), counting
/// the keys it was asked.
struct TableServer {
    acceptor: Acceptor,
    requests: Arc<AtomicU64>,
    keys: Arc<Mutex<HashMap<String, u64>>>,
}

impl TableServer {
    fn start(delay: Duration) -> TableServer {
        let requests = Arc::new(AtomicU64::new(0));
        let keys = Arc::new(Mutex::new(HashMap::new()));
        let (r, k) = (requests.clone(), keys.clone());
        let acceptor = Acceptor::start(move |conn, _| serve(conn, delay, &r, &k));
        TableServer {
            acceptor,
            requests,
            keys,
        }
    }

    fn target(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.acceptor.port())
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn count(&self, key: &str) -> u64 {
        self.keys.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

fn serve(
    conn: TcpStream,
    delay: Duration,
    requests: &AtomicU64,
    keys: &Mutex<HashMap<String, u64>>,
) {
    let _ = conn.set_nodelay(true);
    let mut w = conn.try_clone().expect("clone");
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let Some(key) = line.strip_prefix("get ") else {
            let _ = w.write_all(b"400 bad request\n");
            continue;
        };
        requests.fetch_add(1, Ordering::SeqCst);
        *keys.lock().unwrap().entry(key.to_string()).or_insert(0) += 1;
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        if w.write_all(b"200 v\n").is_err() {
            return;
        }
    }
}

const SHORT: Duration = Duration::from_secs(20);

#[test]
fn help_and_version_go_to_stdout_with_status_0() {
    for flag in ["--help", "-h"] {
        let o = run_load(&[flag], SHORT);
        assert_eq!(o.status.code(), Some(0), "{flag}");
        assert_eq!(show(&o.stderr), "", "{flag}");
        let help = show(&o.stdout);
        assert!(
            help.starts_with("Load generator for Postfix lookup tables"),
            "{help}"
        );
        assert!(
            help.contains("Usage: httpmapd-load [OPTIONS] [TARGET]"),
            "{help}"
        );
        for opt in [
            "--connections",
            "--depth",
            "--duration",
            "--requests",
            "--warmup",
            "--threads",
            "--timeout",
            "--rate",
            "--late",
            "--keys",
            "--keyspace",
            "--prefix",
            "--domain",
            "--miss-ratio",
            "--sequential",
            "--zipf",
            "--populate",
            "--populate-only",
            "--write-map",
            "--idle",
            "--json",
            "--quiet",
            "--version",
        ] {
            assert!(help.contains(opt), "{flag} lacks {opt}:\n{help}");
        }
        assert!(help.contains("--keys conf/demo.map"), "{help}");
    }
    for flag in ["--version", "-V"] {
        let o = run_load(&[flag], SHORT);
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(show(&o.stderr), "");
        assert_eq!(
            show(&o.stdout),
            format!("httpmapd-load {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn usage_errors_go_to_stderr_with_status_2() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["tcp:127.0.0.1:1", "--bogus"],
            "unexpected argument '--bogus'",
        ),
        (&[], "required arguments were not provided"),
        (&["tcp:127.0.0.1:1", "-c", "0"], "invalid value '0'"),
        (&["tcp:127.0.0.1:1", "-d", "soon"], "bad duration"),
        (&["tcp:127.0.0.1:1", "--rate", "0"], "above 0"),
        (&["tcp:127.0.0.1:1", "--zipf", "0"], "above 0"),
        (
            &["tcp:127.0.0.1:1", "--zipf", "1", "--sequential"],
            "cannot be used with",
        ),
        (&["tcp:127.0.0.1:1", "--late", "2ms"], "--rate"),
        (&["nowhere:1"], "unknown target"),
        (
            &["tcp:127.0.0.1:1", "--populate"],
            "--populate is for memcached",
        ),
        (
            &["tcp:127.0.0.1:1", "--keys", "/nonexistent/keys.map"],
            "/nonexistent/keys.map",
        ),
    ];
    for (args, says) in cases {
        let o = run_load(args, SHORT);
        let err = show(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(show(&o.stdout), "", "{args:?}");
        assert!(err.contains(says), "{args:?}: {err:?} lacks {says:?}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_closed_stdout_or_stderr_ends_quietly() {
    let server = TableServer::start(Duration::ZERO);
    let target = server.target();
    // stdout closed at once: the report's write fails (EPIPE).
    for args in [
        vec![target.as_str(), "-n", "50", "-c", "1", "-q"],
        vec![target.as_str(), "-n", "50", "-c", "1", "-q", "--json"],
        vec!["--help"],
    ] {
        let mut child = spawn_load(&args);
        drop(child.stdout.take());
        let o = load_output(child, SHORT, &args);
        let err = show(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
    // stderr closed at once: the progress lines' writes fail.
    let args = [target.as_str(), "-d", "1300ms", "-c", "1"];
    let mut child = spawn_load(&args);
    drop(child.stderr.take());
    let o = load_output(child, SHORT, &args);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        show(&o.stdout).contains(" requests in 1.30s: "),
        "{}",
        show(&o.stdout)
    );
}

#[test]
fn json_has_the_fields_compare_sh_reads() {
    let server = TableServer::start(Duration::ZERO);
    let o = run_load(
        &[&server.target(), "-n", "200", "-c", "2", "--json", "-q"],
        SHORT,
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o.stderr));
    assert_eq!(show(&o.stderr), "");
    let j = json_of(&o);
    assert_eq!(u(&j["requests"]), 200);
    assert_eq!(u(&j["found"]), 200);
    assert_eq!(u(&j["not_found"]), 0);
    assert_eq!(server.requests(), 200);
    assert!(f(&j["throughput_rps"]) > 0.0);
    assert!(
        (f(&j["throughput_rps"]) * f(&j["seconds"]) - 200.0).abs() < 1e-6,
        "{j}"
    );
    let l = &j["latency_us"];
    let p: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| f(&l[k]))
        .collect();
    assert!(p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]), "{l}");
    let errors = j["errors"].as_object().expect("errors object");
    let kinds: Vec<&str> = errors.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "closed",
            "connect",
            "permanent",
            "protocol",
            "temporary",
            "timeout"
        ]
    );
    assert!(errors.values().all(|v| u(v) == 0), "{j}");
    assert_eq!(j["mode"], "closed");
    assert!(j["rate"].is_null());
    assert_eq!(j["target"], server.target().as_str());
    assert_eq!((u(&j["connections"]), u(&j["open_connections"])), (2, 2));
    assert_eq!(
        (u(&j["depth"]), u(&j["threads"]), u(&j["keys"])),
        (1, 1, 10_000)
    );
    assert_eq!(j["key_order"], "uniform");
}

/// What the slow server (20 ms a request, so at most 50 a second on one
/// connection) does to a closed and an open loop of 2 s each, run side by
/// side against two such servers.
#[test]
fn open_loop_shows_the_queueing_that_closed_loop_hides() {
    let slow_closed = TableServer::start(Duration::from_millis(20));
    let slow_open = TableServer::start(Duration::from_millis(20));
    let (tc, to) = (slow_closed.target(), slow_open.target());
    let closed =
        thread::spawn(move || run_load(&[&tc, "-c", "1", "-d", "2s", "--json", "-q"], SHORT));
    let open = run_load(
        &[&to, "-c", "1", "-d", "2s", "--rate", "100", "--json", "-q"],
        SHORT,
    );
    let closed = closed.join().unwrap();

    // Closed loop: one request at a time, each answered after 20 ms; at most
    // 2 s / 20 ms = 100 of them; the percentiles are the server's 20 ms.
    let c = json_of(&closed);
    let n = u(&c["requests"]);
    assert!((60..=100).contains(&n), "closed loop answered {n}");
    let received = slow_closed.requests();
    assert!(
        received == n || received == n + 1,
        "server got {received}, answered {n}"
    );
    let (p50, p99) = (f(&c["latency_us"]["p50"]), f(&c["latency_us"]["p99"]));
    assert!(p50 >= 20_000.0 && p99 >= 20_000.0, "{c}");
    assert!(
        p99 < 50_000.0,
        "closed-loop p99 {p99} us: should be about 20 ms"
    );
    assert!((f(&c["throughput_rps"]) - n as f64 / 2.0).abs() < 1e-6);

    // Open loop at 100/s: 200 requests due in 2 s, but only ~100 can be
    // answered; each waits for the ones before it, and its latency, counted
    // from its due time, grows by ~10 ms per request: p99 near 1 s.
    let o = json_of(&open);
    assert_eq!(o["mode"], "open");
    let r = &o["rate"];
    assert_eq!(f(&r["target_rps"]), 100.0);
    let n = u(&o["requests"]);
    let (sent, never_sent, unanswered) = (u(&r["sent"]), u(&r["never_sent"]), u(&r["unanswered"]));
    assert_eq!(sent + never_sent, 200, "{r}");
    assert_eq!(n + unanswered, sent, "{o}");
    assert!(unanswered <= 1, "depth 1: {r}");
    assert!((60..=100).contains(&n), "open loop answered {n}");
    assert!(never_sent >= 99, "{r}");
    let received = slow_open.requests();
    assert!(
        received >= n && received <= sent,
        "server got {received}: {r}"
    );
    // All but the first request or two were written well after their due time.
    assert!(u(&r["late"]) + 2 >= sent, "{r}");
    assert!((f(&r["sent_rps"]) - sent as f64 / 2.0).abs() < 1e-6);
    let (p50, p99) = (f(&o["latency_us"]["p50"]), f(&o["latency_us"]["p99"]));
    assert!(p99 > 200_000.0, "open-loop p99 {p99} us shows no queueing");
    assert!(p50 > 100_000.0, "open-loop p50 {p50} us");
    assert!(p99 > 5.0 * f(&c["latency_us"]["p99"]));
    assert!(f(&o["latency_us"]["max"]) < 2_100_000.0);
    assert!(o["errors"].as_object().unwrap().values().all(|v| u(v) == 0));
}

/// Below the server's capacity the open loop sends exactly on schedule and
/// sees the server's own latency.
#[test]
fn open_loop_below_capacity_keeps_the_schedule() {
    let slow = TableServer::start(Duration::from_millis(20));
    let o = run_load(
        &[
            &slow.target(),
            "-c",
            "1",
            "-d",
            "2s",
            "--rate",
            "20",
            "--json",
            "-q",
        ],
        SHORT,
    );
    let j = json_of(&o);
    let r = &j["rate"];
    assert_eq!((u(&r["sent"]), u(&r["never_sent"])), (40, 0), "{r}");
    assert_eq!(u(&j["requests"]) + u(&r["unanswered"]), 40, "{j}");
    assert!(u(&j["requests"]) >= 39, "{j}");
    let p99 = f(&j["latency_us"]["p99"]);
    assert!((20_000.0..50_000.0).contains(&p99), "p99 {p99} us");
    // Written on time (within --late, 1 ms), but for a few scheduling hiccups
    // of this shared machine.
    assert!(u(&r["late"]) <= 8, "{r}");
}

/// With `-n`, requests spaced further apart than `--timeout` are still all
/// sent: waiting for a request that is not due yet is no stall.
#[test]
fn open_loop_with_a_count_sends_every_request_however_slow_the_rate() {
    let fast = TableServer::start(Duration::ZERO);
    let started = std::time::Instant::now();
    let o = run_load(
        &[
            &fast.target(),
            "-c",
            "1",
            "-n",
            "3",
            "--rate",
            "2",
            "--timeout",
            "200ms",
            "--json",
            "-q",
        ],
        SHORT,
    );
    let j = json_of(&o);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o.stderr));
    assert_eq!(u(&j["requests"]), 3, "{j}");
    assert_eq!(u(&j["rate"]["sent"]), 3, "{j}");
    assert_eq!(fast.requests(), 3);
    // Three requests 500 ms apart: at least a second.
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn zipf_makes_the_first_key_the_most_asked() {
    // s = 1 over 20 keys: P(rank r) = 1 / (r * H20), H20 = 3.5977;
    // user0 (rank 1) 27.8%, user1 13.9%, user2 9.3%, user3 6.9%.
    let server = TableServer::start(Duration::ZERO);
    let o = run_load(
        &[
            &server.target(),
            "--keyspace",
            "20",
            "--zipf",
            "1",
            "-n",
            "4000",
            "-c",
            "2",
            "-q",
        ],
        SHORT,
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o.stderr));
    assert_eq!(server.requests(), 4000);
    let counts: Vec<u64> = (0..20)
        .map(|i| server.count(&format!("user{i}@example.com")))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 4000, "{counts:?}");
    let h20: f64 = (1..=20).map(|r| 1.0 / r as f64).sum();
    for (rank, &c) in counts.iter().enumerate().take(4) {
        let p = 1.0 / ((rank + 1) as f64 * h20);
        let (mean, sd) = (4000.0 * p, (4000.0 * p * (1.0 - p)).sqrt());
        assert!(
            (c as f64 - mean).abs() < 5.0 * sd,
            "rank {}: {c}, expected {mean:.0} ± {sd:.0}; {counts:?}",
            rank + 1
        );
    }
    assert!(counts[..4].windows(2).all(|w| w[0] > w[1]), "{counts:?}");
    assert_eq!(counts.iter().max(), Some(&counts[0]));

    // Uniform, the default: every key about 200 times.
    let server = TableServer::start(Duration::ZERO);
    let o = run_load(
        &[
            &server.target(),
            "--keyspace",
            "20",
            "-n",
            "4000",
            "-c",
            "2",
            "-q",
        ],
        SHORT,
    );
    assert_eq!(o.status.code(), Some(0));
    let counts: Vec<u64> = (0..20)
        .map(|i| server.count(&format!("user{i}@example.com")))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 4000);
    assert!(
        counts.iter().all(|&c| (130..=270).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn progress_once_a_second_on_stderr_unless_quiet() {
    let slow = TableServer::start(Duration::from_millis(20));
    let o = run_load(
        &[&slow.target(), "-c", "1", "-d", "2500ms", "--json"],
        SHORT,
    );
    assert_eq!(o.status.code(), Some(0));
    let j = json_of(&o);
    let err = show(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    for (i, line) in lines.iter().enumerate() {
        // "httpmapd-load:    1s        49 req/s  p99 20479.0 us  errors 0"
        let rest = line
            .strip_prefix(&format!("httpmapd-load: {:>4}s ", i + 1))
            .unwrap_or_else(|| panic!("{line:?}"));
        let words: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!(words.len(), 7, "{line:?}");
        assert_eq!(
            (words[1], words[2], words[4], words[5], words[6]),
            ("req/s", "p99", "us", "errors", "0")
        );
        let rps: u64 = words[0].parse().unwrap();
        assert!((30..=50).contains(&rps), "{line:?}");
        let p99: f64 = words[3].parse().unwrap();
        assert!((20_000.0..60_000.0).contains(&p99), "{line:?}");
    }
    assert!(u(&j["requests"]) <= 125);

    let o = run_load(
        &[&slow.target(), "-c", "1", "-d", "1200ms", "--quiet"],
        SHORT,
    );
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(show(&o.stderr), "");
    assert!(show(&o.stdout).contains(" requests in 1.20s: "));
}

/// The keys of conf/demo.map, as the demo backend serves them.
fn demo_map() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.map"))
        .expect("conf/demo.map");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, l));
            (k.to_string(), v.trim().to_string())
        })
        .collect()
}

/// The README's advice: against the demo's map, `--keys conf/demo.map` gets
/// hits; generated keys (`--keyspace`) are all "not found".
#[test]
fn demo_keys_are_hits_and_generated_keys_are_misses() {
    let pairs = demo_map();
    assert!(pairs.len() >= 5);
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let backend = TestServer::with_map(&refs);
    let (tcp, sm) = (free_port(), free_port());
    let _daemon = Daemon::start(
        &format!(
            "[daemon]\nworkers = 1\nsocketmap_listen = \"127.0.0.1:{sm}\"\n\
             [maps.virtual]\ntcp_listen = \"127.0.0.1:{tcp}\"\nservers = [\"{}\"]\n",
            backend.url("/virtual")
        ),
        tcp,
    );
    let demo_keys = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.map");
    let targets = [
        format!("tcp:127.0.0.1:{tcp}"),
        format!("socketmap:inet:127.0.0.1:{sm}:virtual"),
        format!("http:127.0.0.1:{}/virtual", backend.port()),
    ];
    for target in &targets {
        let o = run_load(
            &[
                target, "--keys", demo_keys, "-n", "300", "-c", "2", "--json", "-q",
            ],
            SHORT,
        );
        let j = json_of(&o);
        assert_eq!(
            (u(&j["found"]), u(&j["not_found"])),
            (300, 0),
            "{target}: {j}"
        );
        assert_eq!(u(&j["keys"]), pairs.len() as u64);
        let o = run_load(
            &[
                target,
                "--keyspace",
                "1000",
                "-n",
                "300",
                "-c",
                "2",
                "--json",
                "-q",
            ],
            SHORT,
        );
        let j = json_of(&o);
        assert_eq!(
            (u(&j["found"]), u(&j["not_found"])),
            (0, 300),
            "{target}: {j}"
        );
    }
    // Each demo key reached the backend (through the daemon's cache: once
    // per key and protocol family at most, plus the direct http: run).
    let asked: std::collections::HashSet<Vec<u8>> = backend.keys().into_iter().collect();
    for (k, _) in &pairs {
        assert!(asked.contains(k.as_bytes()), "{k} never asked");
    }
}
