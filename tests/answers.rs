//! Regression tests for issue 10, "Every answer belongs to its key": a
//! server's reply must only ever answer the request it was read for. Covered
//! here, through the real binary and real sockets, with exact counts: servers
//! that write a reply twice (at once or later), unsolicited replies on idle
//! pooled connections (just before a lookup, in the same poll wake-up, and
//! just after it), key echo (`POSTFIX-DICT-EMAIL` or `POSTFIX_DICT_EMAIL` in
//! the reply) and `require_key_echo`; pipelining clients whose answers are
//! large cache hits (no parked session) and answers queued behind a slow
//! lookup (bounded in bytes); a reload racing a fetch in flight and 300
//! reloads in a row; a slow mirror beside a fast one; stale not-found
//! entries during an outage (`stale_negative`); the cache's byte budget
//! (`max_memory`, RSS measured); NUL and control bytes, JSON booleans and
//! numbers; a response head trickled byte by byte; a slow client on
//! `stats_listen`.
//!
//! The adversarial servers (`RawServer`) are scripted here with std::net, a
//! thread per connection, writing raw HTTP/1.1 bytes when and as the test
//! says. To put a stray reply and a lookup in one poll wake-up, the daemon
//! is stopped (SIGSTOP) while both are written. Every wait is a poll with a
//! deadline, except where a delay is the scenario itself (a reply written
//! 20 ms late, a lookup made 150 ms after, 300 ms for the daemon to queue
//! answers behind a slow lookup).

mod common;

use common::{
    assert_temp, count_lines, free_port, is_temp, metric_value, metrics, netstring, postmap_q,
    quoted_list, rss_kib, show, sleep_until, try_stats_request, wait_until, Acceptor, Daemon,
    LineClient, Reply, StatsResponse, TestServer,
};
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers: configuration, clients, metrics, log
// ---------------------------------------------------------------------------

/// Bound on polls (generous for a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(5);

/// `[daemon]` with `workers` and extra lines.
fn daemon_toml(workers: usize, extra: &[&str]) -> String {
    let mut s = format!("[daemon]\nworkers = {workers}\nlog_level = \"info\"\n");
    for l in extra {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// `[cache]` with these lines ("" when there are none).
fn cache_toml(lines: &[&str]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n[cache]\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// `[maps.NAME]` with its tcp_listen (if any), servers and extra lines.
fn map_toml(name: &str, tcp: Option<u16>, urls: &[String], extra: &[&str]) -> String {
    let list = quoted_list(urls);
    let mut s = format!("\n[maps.{name}]\n");
    if let Some(p) = tcp {
        s.push_str(&format!("tcp_listen = \"127.0.0.1:{p}\"\n"));
    }
    s.push_str(&format!("servers = [{list}]\n"));
    for l in extra {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Short timeouts for a map whose servers answer at once.
const QUICK: &[&str] = &[
    "connect_timeout = \"500ms\"",
    "http_timeout = \"2s\"",
    "lookup_timeout = \"4s\"",
    "retry_interval = \"1s\"",
];

/// The value the test servers give key `k`: "v-" + k.
fn value_of(key: &[u8]) -> Vec<u8> {
    [b"v-".as_slice(), key].concat()
}

/// The tcp_table reply for a key found with [`value_of`].
fn want(key: &str) -> String {
    format!("200 v-{key}\n")
}

/// As [`metric_value`], panicking (with the family's lines and the
/// server request counts) when it is missing.
fn must_sample(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or_else(|| {
        let family = series.split('{').next().unwrap();
        let related: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(family) || l.starts_with("httpmapd_server_requests_total"))
            .collect();
        panic!(
            "no sample {series} in /metrics; related lines:\n{}",
            related.join("\n")
        )
    })
}

/// `httpmapd_server_protocol_errors_total` of one server and kind.
fn protocol_errors(text: &str, map: &str, url: &str, kind: &str) -> f64 {
    must_sample(
        text,
        &format!(
            "httpmapd_server_protocol_errors_total{{map=\"{map}\",server=\"{url}\",kind=\"{kind}\"}}"
        ),
    )
}

/// `Daemon::start`, then (for tests that signal it) waits until SIGHUP is handled.
fn start_for_reload(config: &str, ready_port: u16) -> Daemon {
    let d = Daemon::start(config, ready_port);
    d.wait_handling(&[libc::SIGHUP]);
    d
}

/// Writes `config`, sends SIGHUP and waits until it is reloaded (panics
/// on "reload refused" or after 10 s).
fn reload(d: &Daemon, config: &str) {
    std::fs::write(&d.config_path, config).expect("write the config");
    d.reload_ok();
}

/// What many sequential lookups got.
#[derive(Default, Debug)]
struct Tally {
    asked: usize,
    ok: usize,
    temp: usize,
    /// "key: reply" for every reply that is neither the key's value nor a
    /// temporary error.
    wrong: Vec<String>,
}

impl Tally {
    fn add(&mut self, key: &str, reply: &str) {
        self.asked += 1;
        if reply == want(key) {
            self.ok += 1;
        } else if is_temp(reply) {
            self.temp += 1;
        } else {
            self.wrong.push(format!("{key}: {reply:?}"));
        }
    }

    fn merge(&mut self, o: Tally) {
        self.asked += o.asked;
        self.ok += o.ok;
        self.temp += o.temp;
        self.wrong.extend(o.wrong);
    }

    fn assert_no_wrong(&self, what: &str) {
        assert!(
            self.wrong.is_empty(),
            "{what}: {} wrong answer(s) of {} asked ({} right, {} temporary); first: {:?}",
            self.wrong.len(),
            self.asked,
            self.ok,
            self.temp,
            &self.wrong[..self.wrong.len().min(5)]
        );
    }
}

/// `clients` connections at once, each making `per_client` sequential
/// tcp_table lookups of its own keys "{prefix}{client}-{i}@x".
fn drive(port: u16, clients: usize, per_client: usize, prefix: &str) -> Tally {
    let handles: Vec<JoinHandle<Tally>> = (0..clients)
        .map(|t| {
            let prefix = prefix.to_string();
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                let mut tally = Tally::default();
                for i in 0..per_client {
                    let key = format!("{prefix}{t}-{i}@x");
                    let r = c.get(&key);
                    tally.add(&key, &r);
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for h in handles {
        all.merge(h.join().expect("client thread"));
    }
    all
}

// ---------------------------------------------------------------------------
// The adversarial server: raw HTTP/1.1 bytes, scripted per request
// ---------------------------------------------------------------------------

/// One request as [`RawServer`] read it.
struct RawReq {
    /// `POSTFIX-DICT-EMAIL` (or `POSTFIX_DICT_EMAIL`) exactly as sent; empty if none.
    key: Vec<u8>,
    /// Its place on the connection: 1 for the first request.
    seq: usize,
}

/// What the server does with a request: writes to the stream (any bytes, at
/// any pace); false closes the connection.
type Script = dyn Fn(&RawReq, &mut TcpStream) -> bool + Send + Sync;

struct RawShared {
    script: Box<Script>,
    stop: AtomicBool,
    requests: AtomicUsize,
    /// Connections the daemon closed while the server waited for a request.
    peer_closed: AtomicUsize,
}

/// A thread-per-connection HTTP/1.1 server on 127.0.0.1 that reads request
/// heads (the daemon sends GETs without a body) and runs a script for each.
struct RawServer {
    shared: Arc<RawShared>,
    acceptor: Acceptor,
}

impl RawServer {
    fn start(script: impl Fn(&RawReq, &mut TcpStream) -> bool + Send + Sync + 'static) -> Self {
        let shared = Arc::new(RawShared {
            script: Box::new(script),
            stop: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
            peer_closed: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        let acceptor = Acceptor::start(move |stream, _| raw_serve(stream, &sh));
        RawServer { shared, acceptor }
    }

    fn url(&self) -> String {
        format!("http://{}/m", self.acceptor.addr())
    }

    fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.acceptor.accepted()
    }

    fn peer_closed(&self) -> usize {
        self.shared.peer_closed.load(Ordering::SeqCst)
    }
}

/// Then the acceptor stops, shutting the connections down (not counted as
/// closed by the daemon).
impl Drop for RawServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// The value of header `name` (case-insensitive) in a request head.
fn head_value(head: &[u8], name: &str) -> Option<Vec<u8>> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (n, v) = line.split_at(colon);
        std::str::from_utf8(n)
            .ok()
            .filter(|n| n.eq_ignore_ascii_case(name))
            .map(|_| v[1..].trim_ascii().to_vec())
    })
}

fn raw_serve(mut s: TcpStream, sh: &RawShared) {
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut seq = 0;
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    if buf.is_empty() && !sh.stop.load(Ordering::SeqCst) {
                        sh.peer_closed.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let key = head_value(&head, "POSTFIX-DICT-EMAIL")
            .or_else(|| head_value(&head, "POSTFIX_DICT_EMAIL"))
            .unwrap_or_default();
        seq += 1;
        sh.requests.fetch_add(1, Ordering::SeqCst);
        let req = RawReq { key, seq };
        if !(sh.script)(&req, &mut s) || sh.stop.load(Ordering::SeqCst) {
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// A dict_http "found" reply, `Content-Length: 0`, keep-alive; with the key
/// echoed in `POSTFIX-DICT-EMAIL` when `echo` is given.
fn found_reply(value: &[u8], echo: Option<&[u8]>) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
    if let Some(k) = echo {
        out.extend_from_slice(b"POSTFIX-DICT-EMAIL: ");
        out.extend_from_slice(k);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"POSTFIX-DICT-RESULTS: ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    out
}

/// Writes `bytes`; false if the daemon has gone.
fn send(s: &mut TcpStream, bytes: &[u8]) -> bool {
    s.write_all(bytes).is_ok()
}

/// A server that writes each reply (the key's [`value_of`], echoing the key
/// when `echo`) twice: in one write (`gap` None) or the copy `gap` later.
/// `copies` counts the duplicates written.
fn duplicating_server(echo: bool, gap: Option<Duration>, copies: Arc<AtomicUsize>) -> RawServer {
    RawServer::start(move |req, s| {
        let one = found_reply(&value_of(&req.key), echo.then_some(req.key.as_slice()));
        let ok = match gap {
            None => send(s, &[one.as_slice(), one.as_slice()].concat()),
            Some(d) => {
                if !send(s, &one) {
                    return false;
                }
                thread::sleep(d);
                send(s, &one)
            }
        };
        copies.fetch_add(1, Ordering::SeqCst);
        ok
    })
}

/// One daemon, one map "m" on tcp_table (and stats), over `urls`.
fn start_m(urls: &[String], workers: usize, extra: &[&str]) -> (Daemon, u16, u16) {
    let (port, stats) = (free_port(), free_port());
    let mut lines: Vec<&str> = QUICK.to_vec();
    lines.extend_from_slice(extra);
    let stats_line = format!("stats_listen = \"127.0.0.1:{stats}\"");
    let cfg = daemon_toml(workers, &[&stats_line]) + &map_toml("m", Some(port), urls, &lines);
    (Daemon::start(&cfg, port), port, stats)
}

// ---------------------------------------------------------------------------
// 1. Duplicate replies from a server that echoes the key
// ---------------------------------------------------------------------------

#[test]
fn duplicate_reply_in_the_same_write_with_echo_gives_no_wrong_answer() {
    let copies = Arc::new(AtomicUsize::new(0));
    let server = duplicating_server(true, None, copies.clone());
    let (_d, port, _stats) = start_m(&[server.url()], 1, &[]);
    let t = drive(port, 2, 100, "a");
    eprintln!(
        "duplicate in the same write, echo: {t:?}; \
         server: {} requests on {} connections",
        server.requests(),
        server.connections()
    );
    t.assert_no_wrong("duplicate reply in the same write, with echo");
    assert_eq!((t.ok, t.temp), (200, 0), "every lookup answered");
    assert_eq!(server.requests(), 200, "each key reached the server once");
    assert_eq!(
        server.connections(),
        200,
        "the extra bytes after each reply close its connection"
    );
}

#[test]
fn duplicate_reply_written_20ms_later_with_echo_gives_no_wrong_answer() {
    let copies = Arc::new(AtomicUsize::new(0));
    let server = duplicating_server(true, Some(Duration::from_millis(20)), copies.clone());
    let (d, port, stats) = start_m(&[server.url()], 1, &[]);
    let t = drive(port, 2, 100, "b");
    let m = metrics(stats);
    let mismatch = metric_value(
        &m,
        &format!(
            "httpmapd_server_protocol_errors_total{{map=\"m\",server=\"{}\",kind=\"echo_mismatch\"}}",
            server.url()
        ),
    );
    eprintln!(
        "duplicate 20 ms later, echo: answered {}/{} ({} temporary, {} wrong); server: {} \
         requests on {} connections; echo_mismatch {:?}; \"is down\" lines: {}",
        t.ok,
        t.asked,
        t.temp,
        t.wrong.len(),
        server.requests(),
        server.connections(),
        mismatch,
        count_lines(&d.stderr(), &["is down"])
    );
    t.assert_no_wrong("duplicate reply written 20 ms later, with echo");
    assert_eq!(t.ok + t.temp, 200, "every lookup got an answer");
    assert!(
        server.requests() >= 200,
        "each key reached the server at least once"
    );
}

// ---------------------------------------------------------------------------
// 2. Duplicate replies without echo
// ---------------------------------------------------------------------------

#[test]
fn duplicate_reply_in_the_same_write_without_echo_closes_the_connection() {
    let copies = Arc::new(AtomicUsize::new(0));
    let server = duplicating_server(false, None, copies.clone());
    let (_d, port, stats) = start_m(&[server.url()], 1, &[]);
    let t = drive(port, 1, 100, "c");
    t.assert_no_wrong("duplicate reply in the same write, no echo");
    assert_eq!((t.ok, t.temp), (100, 0), "every lookup answered");
    assert_eq!(server.requests(), 100);
    assert_eq!(
        server.connections(),
        100,
        "the extra bytes after each reply close its connection"
    );
    let m = metrics(stats);
    assert_eq!(
        protocol_errors(&m, "m", &server.url(), "stray_bytes"),
        100.0,
        "one stray_bytes per reply followed by extra bytes"
    );
}

#[test]
fn duplicate_reply_arriving_on_the_idle_connection_closes_it() {
    const N: usize = 30;
    let copies = Arc::new(AtomicUsize::new(0));
    let server = duplicating_server(false, Some(Duration::from_millis(20)), copies.clone());
    let (d, port, stats) = start_m(&[server.url()], 1, &[]);
    let mut c = LineClient::connect(port);
    let mut t = Tally::default();
    let mut waited_out = 0;
    for i in 0..N {
        let key = format!("d{i}@x");
        let r = c.get(&key);
        t.add(&key, &r);
        // The next lookup only once the duplicate is on the idle connection
        // and (at most 300 ms) the daemon has closed that connection.
        assert!(
            wait_until(WAIT, || copies.load(Ordering::SeqCst) > i),
            "the server never wrote duplicate {i}"
        );
        if !wait_until(Duration::from_millis(300), || server.peer_closed() > i) {
            waited_out += 1;
        }
    }
    let m = metrics(stats);
    let log = d.stderr();
    eprintln!(
        "duplicate on the idle connection: {t:?}; {} connections; {waited_out} idle \
         connection(s) not closed within 300 ms",
        server.connections()
    );
    t.assert_no_wrong("duplicate reply arriving on an idle connection, no echo");
    assert_eq!((t.ok, t.temp), (N, 0), "every lookup answered");
    assert_eq!(
        waited_out, 0,
        "idle connections with stray bytes left open for 300 ms"
    );
    assert_eq!(server.requests(), N);
    assert_eq!(
        server.connections(),
        N,
        "a fresh connection after each stray reply"
    );
    assert_eq!(
        protocol_errors(&m, "m", &server.url(), "stray_bytes"),
        N as f64,
        "one stray_bytes per duplicate"
    );
    assert!(
        count_lines(&log, &["unexpected byte"]) >= 1,
        "no \"unexpected byte\" warning:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 3. Unsolicited replies on an idle connection
// ---------------------------------------------------------------------------

/// The unsolicited reply: a valid dict_http answer nobody asked for.
const EVIL: &[u8] = b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: evil@x\r\nContent-Length: 0\r\n\r\n";

#[test]
fn unsolicited_reply_on_an_idle_connection_before_the_next_lookup() {
    let stray_written = Arc::new(AtomicUsize::new(0));
    let sw = stray_written.clone();
    let server = RawServer::start(move |req, s| {
        if !send(s, &found_reply(&value_of(&req.key), None)) {
            return false;
        }
        if req.key == b"a@x" {
            thread::sleep(Duration::from_millis(50));
            let ok = send(s, EVIL);
            sw.fetch_add(1, Ordering::SeqCst);
            return ok;
        }
        true
    });
    let (d, port, stats) = start_m(&[server.url()], 1, &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x"), want("a@x"));
    let answered = Instant::now();
    assert!(wait_until(WAIT, || stray_written.load(Ordering::SeqCst) == 1));
    // Lookup B ~150 ms after A's answer (~100 ms after the stray reply).
    sleep_until(answered + Duration::from_millis(150));
    assert!(
        wait_until(Duration::from_secs(1), || server.peer_closed() == 1),
        "the idle connection that got the stray reply is still open"
    );
    assert_eq!(c.get("b@x"), want("b@x"), "B got B's value");
    assert_eq!(server.requests(), 2);
    assert_eq!(server.connections(), 2, "B went on a new connection");
    let m = metrics(stats);
    assert_eq!(protocol_errors(&m, "m", &server.url(), "stray_bytes"), 1.0);
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["unexpected byte"]),
        1,
        "one \"unexpected byte\" warning:\n{log}"
    );
}

/// The state letters of every thread of process `pid` (from /proc).
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter_map(|stat| stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .collect()
}

/// Runs `f` while the daemon is stopped (SIGSTOP, every thread seen
/// stopped), then continues it (SIGCONT): whatever `f` writes to the
/// daemon's sockets is all waiting, in that order, when it wakes, so it
/// meets it in one poll wake-up.
fn while_stopped(d: &Daemon, f: impl FnOnce()) {
    d.signal(libc::SIGSTOP);
    let pid = d.pid();
    assert!(
        wait_until(WAIT, || {
            let states = thread_states(pid);
            !states.is_empty() && states.iter().all(|&c| c == 'T' || c == 't')
        }),
        "httpmapd did not stop: {:?}",
        thread_states(pid)
    );
    f();
    d.signal(libc::SIGCONT);
}

/// The stray reply and the next lookup reach the daemon in the same poll
/// wake-up (the daemon is stopped while both are written): the lookup
/// first, then the stray reply on its pooled connection (even rounds), or
/// the other way round (odd rounds). Either way the stray bytes are in the
/// socket before the daemon can send the lookup on that connection.
#[test]
fn unsolicited_reply_in_the_same_wake_up_as_the_next_lookup_is_never_its_answer() {
    const N: usize = 20;
    let last: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
    let l = last.clone();
    let server = RawServer::start(move |req, s| {
        *l.lock().unwrap() = s.try_clone().ok();
        send(s, &found_reply(&value_of(&req.key), None))
    });
    let (d, port, stats) = start_m(&[server.url()], 1, &[]);
    let mut c = LineClient::connect(port);
    let mut t = Tally::default();
    let mut order = Vec::new();
    for i in 0..N {
        let a = format!("a{i}@x");
        let r = c.get(&a);
        t.add(&a, &r);
        // The server's side of the connection that carried a<i>, now idle.
        let pooled = last.lock().unwrap().take().expect("the server's stream");
        let b = format!("b{i}@x");
        let lookup_first = i % 2 == 0;
        while_stopped(&d, || {
            let mut stray = &pooled;
            if lookup_first {
                c.send(format!("get {b}\n").as_bytes());
                stray.write_all(EVIL).expect("write the stray reply");
            } else {
                stray.write_all(EVIL).expect("write the stray reply");
                c.send(format!("get {b}\n").as_bytes());
            }
        });
        let r = show(&c.read_line());
        if r != want(&b) {
            order.push(if lookup_first {
                "lookup first"
            } else {
                "stray first"
            });
        }
        t.add(&b, &r);
    }
    eprintln!(
        "stray reply in the lookup's wake-up: {t:?}; wrong when: {order:?}; server {} \
         requests on {} connections",
        server.requests(),
        server.connections()
    );
    t.assert_no_wrong("stray reply in the same wake-up as the next lookup");
    assert_eq!((t.ok, t.temp), (2 * N, 0), "every lookup answered");
    assert_eq!(server.requests(), 2 * N);
    assert_eq!(
        server.connections(),
        N + 1,
        "each b<i> on a new connection, each a<i> on the pooled one"
    );
    let m = metrics(stats);
    assert_eq!(
        protocol_errors(&m, "m", &server.url(), "stray_bytes"),
        N as f64
    );
}

/// Just after a lookup arrives: the server answers the second request of
/// each connection with an unsolicited reply for another key first, then
/// the real one. With the key echoed, the first is rejected.
#[test]
fn unsolicited_reply_just_after_the_lookup_is_rejected_by_the_echo() {
    const N: usize = 100;
    let bogus_sent = Arc::new(AtomicUsize::new(0));
    let bs = bogus_sent.clone();
    let server = RawServer::start(move |req, s| {
        let real = found_reply(&value_of(&req.key), Some(&req.key));
        if req.seq == 2 {
            bs.fetch_add(1, Ordering::SeqCst);
            let bogus = found_reply(b"evil@x", Some(b"other@x"));
            return send(s, &[bogus, real].concat());
        }
        send(s, &real)
    });
    let (d, port, stats) = start_m(&[server.url()], 1, &[]);
    let t = drive(port, 1, N, "e");
    let m = metrics(stats);
    let bogus = bogus_sent.load(Ordering::SeqCst);
    eprintln!(
        "bogus reply before the real one: {t:?}; {bogus} bogus replies; server {} requests \
         on {} connections",
        server.requests(),
        server.connections()
    );
    t.assert_no_wrong("unsolicited reply just after the lookup, with echo");
    assert_eq!((t.ok, t.temp), (N, 0), "every lookup answered");
    // With the connection kept after each good reply, every lookup after
    // the first meets the bogus reply once (N - 1); at least half must.
    assert!(
        bogus >= N / 2,
        "only {bogus} bogus replies: the scenario did not happen"
    );
    assert_eq!(server.requests(), N + bogus, "one retry per bogus reply");
    let log = d.stderr();
    assert!(
        count_lines(&log, &["reply rejected"]) >= 1,
        "no \"reply rejected\" warning:\n{log}"
    );
    assert_eq!(
        protocol_errors(&m, "m", &server.url(), "echo_mismatch"),
        bogus as f64
    );
}

/// A dict_http reply echoing `echo` in the underscore spelling
/// `POSTFIX_DICT_EMAIL`.
fn underscore_echo(echo: &[u8], value: &[u8]) -> Reply {
    Reply::Http {
        status: 200,
        headers: vec![
            ("POSTFIX_DICT_EMAIL".to_string(), echo.to_vec()),
            ("POSTFIX-DICT-RESULTS".to_string(), value.to_vec()),
        ],
        body: Vec::new(),
        framing: common::Framing::ContentLength,
        close: false,
    }
}

/// A server answering every key with its [`value_of`], echoing the key in
/// the underscore spelling, except under `/mismatch`, where every reply
/// echoes another key (and the value "evil@x").
fn underscore_server() -> TestServer {
    TestServer::start(|req| {
        let key = req.key.clone().unwrap_or_default();
        if req.path == "/mismatch" {
            underscore_echo(b"someone-else@x", b"evil@x")
        } else {
            underscore_echo(&key, &value_of(&key))
        }
    })
}

/// The echo spelled `POSTFIX_DICT_EMAIL` is checked too; a server whose
/// every reply echoes another key gives a temporary error (never its value,
/// never not-found), and nothing is cached.
#[test]
fn a_server_whose_every_echo_mismatches_gives_a_temporary_error() {
    let server = underscore_server();
    let (port, sm, stats) = (free_port(), free_port(), free_port());
    let sm_line = format!("socketmap_listen = \"127.0.0.1:{sm}\"");
    let stats_line = format!("stats_listen = \"127.0.0.1:{stats}\"");
    let url = server.url("/mismatch");
    let cfg = daemon_toml(1, &[&sm_line, &stats_line])
        + &map_toml("bad", Some(port), std::slice::from_ref(&url), QUICK);
    let _d = Daemon::start(&cfg, sm);

    let mut c = LineClient::connect(port);
    assert_temp(&c.get("k@x"), "every reply echoes another key");
    let first = server.requests();
    assert!(first >= 1, "the lookup reached the server");
    assert_temp(&c.get("k@x"), "again");
    assert!(server.requests() > first, "a rejected reply was cached");
    let mut s = LineClient::connect(sm);
    let r = show(&s.socketmap_query("bad", b"k2@x"));
    assert!(r.starts_with("TEMP "), "socketmap: {r:?}");
    let m = metrics(stats);
    assert_eq!(
        protocol_errors(&m, "bad", &url, "echo_mismatch"),
        server.requests() as f64,
        "every reply was rejected and counted"
    );
}

/// The echo is compared with the folded key that was sent (not the key as
/// the client wrote it), and the underscore spelling satisfies
/// `require_key_echo`.
#[test]
fn require_key_echo_accepts_the_underscore_echo_of_the_folded_key() {
    let server = underscore_server();
    let (port, sm, stats) = (free_port(), free_port(), free_port());
    let sm_line = format!("socketmap_listen = \"127.0.0.1:{sm}\"");
    let stats_line = format!("stats_listen = \"127.0.0.1:{stats}\"");
    let url = server.url("/good");
    let mut lines = QUICK.to_vec();
    lines.push("require_key_echo = true");
    let cfg = daemon_toml(1, &[&sm_line, &stats_line])
        + &map_toml("good", Some(port), std::slice::from_ref(&url), &lines);
    let _d = Daemon::start(&cfg, sm);
    let mut g = LineClient::connect(port);
    assert_eq!(g.get("MiXeD@X"), want("mixed@x"));
    let mut s = LineClient::connect(sm);
    assert_eq!(show(&s.socketmap_query("good", b"Other@X")), "OK v-other@x");
    assert_eq!(server.requests(), 2);
    let m = metrics(stats);
    for kind in ["echo_mismatch", "echo_missing"] {
        assert_eq!(protocol_errors(&m, "good", &url, kind), 0.0, "{kind}");
    }
}

// ---------------------------------------------------------------------------
// 4. require_key_echo
// ---------------------------------------------------------------------------

#[test]
fn require_key_echo_rejects_a_reply_without_echo() {
    let server = TestServer::start(|_| Reply::found(b"v@x"));
    let (strict_port, lax_port, sm, stats) = (free_port(), free_port(), free_port(), free_port());
    let sm_line = format!("socketmap_listen = \"127.0.0.1:{sm}\"");
    let stats_line = format!("stats_listen = \"127.0.0.1:{stats}\"");
    let strict_url = server.url("/strict");
    let lax_url = server.url("/lax");
    let mut strict_lines = QUICK.to_vec();
    strict_lines.push("require_key_echo = true");
    // "lax" keeps the default (require_key_echo = false), not written out.
    let cfg = daemon_toml(1, &[&sm_line, &stats_line])
        + &map_toml(
            "strict",
            Some(strict_port),
            std::slice::from_ref(&strict_url),
            &strict_lines,
        )
        + &map_toml("lax", Some(lax_port), std::slice::from_ref(&lax_url), QUICK);
    let d = Daemon::start(&cfg, sm);
    let strict_requests = || {
        server
            .request_log()
            .iter()
            .filter(|r| r.path == "/strict")
            .count()
    };

    let mut c = LineClient::connect(strict_port);
    assert_temp(&c.get("k1@x"), "strict map, no echo");
    let after_first = strict_requests();
    assert!(after_first >= 1, "the lookup reached the server");
    assert_temp(&c.get("k1@x"), "strict map, no echo, again");
    assert!(
        strict_requests() > after_first,
        "the rejected reply was cached: the second lookup did not reach the server"
    );
    let mut s = LineClient::connect(sm);
    let r = show(&s.socketmap_query("strict", b"k2@x"));
    assert!(r.starts_with("TEMP "), "socketmap, strict map: {r:?}");

    // The same server, require_key_echo = false: the value.
    let mut l = LineClient::connect(lax_port);
    assert_eq!(l.get("k1@x"), "200 v@x\n");
    let lax_before = server.requests();
    assert_eq!(show(&s.socketmap_query("lax", b"k1@x")), "OK v@x");
    assert_eq!(server.requests(), lax_before, "the lax answer was cached");

    let m = metrics(stats);
    assert_eq!(
        protocol_errors(&m, "strict", &strict_url, "echo_missing"),
        strict_requests() as f64,
        "every strict request was rejected and counted"
    );
    let log = d.stderr();
    assert!(
        count_lines(&log, &["reply rejected"]) >= 1,
        "no \"reply rejected\" warning:\n{log}"
    );
    assert_eq!(
        protocol_errors(&m, "lax", &lax_url, "echo_missing"),
        0.0,
        "lax map echo_missing"
    );
}

// ---------------------------------------------------------------------------
// 5. Pipelining clients, answers from the cache, large values
// ---------------------------------------------------------------------------

/// A thread reading from `stream` until `n` bytes arrived, EOF, or `within`.
fn read_up_to(stream: &TcpStream, n: usize, within: Duration) -> JoinHandle<Vec<u8>> {
    let mut r = stream.try_clone().unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + within;
        let mut got = Vec::with_capacity(n);
        let mut chunk = vec![0u8; 65536];
        r.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        while got.len() < n && Instant::now() < deadline {
            match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(k) => got.extend_from_slice(&chunk[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        got
    })
}

/// Ok if `got` is exactly `expect`, else what differs.
fn same_bytes(got: &[u8], expect: &[u8], within: Duration) -> Result<(), String> {
    let n = expect.len();
    if got.len() < n {
        return Err(format!(
            "only {} of {} bytes arrived within {within:?}",
            got.len(),
            n
        ));
    }
    if got != expect {
        let at = got
            .iter()
            .zip(expect)
            .position(|(a, b)| a != b)
            .unwrap_or(n);
        return Err(format!(
            "the answers differ from byte {at} (got {} bytes)",
            got.len()
        ));
    }
    Ok(())
}

/// Sends `request` in one write on a new connection to `port` while another
/// thread reads; Ok if exactly `expect` arrives within `within`.
fn pipelined(port: u16, request: &[u8], expect: &[u8], within: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let t0 = Instant::now();
    let reader = read_up_to(&s, expect.len(), within);
    s.set_write_timeout(Some(within)).unwrap();
    s.write_all(request).map_err(|e| format!("write: {e}"))?;
    let got = reader.join().unwrap();
    eprintln!(
        "pipelined: {} of {} bytes in {:?}",
        got.len(),
        expect.len(),
        t0.elapsed()
    );
    same_bytes(&got, expect, within)
}

#[test]
fn pipelined_socketmap_cache_hits_of_a_60kb_value_all_arrive() {
    let value: Vec<u8> = (0..60_000).map(|i| b'a' + (i % 26) as u8).collect();
    let v = value.clone();
    let server = TestServer::start(move |_| Reply::body(200, &v));
    let sm = free_port();
    let cfg = daemon_toml(1, &[&format!("socketmap_listen = \"127.0.0.1:{sm}\"")])
        + &map_toml("m", None, &[server.url("/m")], &["result = \"body\""]);
    let _d = Daemon::start(&cfg, sm);
    let mut warm = LineClient::connect(sm);
    let ok = [b"OK ".as_slice(), &value].concat();
    assert_eq!(warm.socketmap_query("m", b"k"), ok, "warm-up lookup");
    let one_query = netstring(b"m k");
    let request = one_query.repeat(64);
    let expect = netstring(&ok).repeat(64);
    pipelined(sm, &request, &expect, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("64 pipelined socketmap queries of a cached 60 KB value: {e}"));
    assert_eq!(server.requests(), 1, "every answer came from the cache");
}

#[test]
fn pipelined_tcp_table_cache_hits_of_a_3kb_value_all_arrive() {
    const N: usize = 4000;
    let value: Vec<u8> = (0..3000).map(|i| b'A' + (i % 26) as u8).collect();
    let v = value.clone();
    let server = TestServer::start(move |_| Reply::found(&v));
    let (d, port, _stats) = start_m(&[server.url("/m")], 1, &[]);
    let mut warm = LineClient::connect(port);
    let line = format!("200 {}\n", show(&value));
    assert_eq!(warm.get("k@x"), line, "warm-up lookup");
    let request = b"get k@x\n".repeat(N);
    let expect = line.as_bytes().repeat(N);
    pipelined(port, &request, &expect, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{N} pipelined tcp_table lookups of a cached 3 KB value: {e}"));
    assert_eq!(server.requests(), 1, "every answer came from the cache");
    drop(d);
}

/// A slow lookup, then 300 cache hits of a 60 KB value pipelined behind it:
/// the answers waiting for the slow one are bounded in bytes (the daemon
/// stops reading), not held by the hundred (about 15 MB at 256 slots).
#[test]
fn answers_queued_behind_a_slow_lookup_are_bounded_in_bytes() {
    const HITS: usize = 300;
    let value: Vec<u8> = (0..60_000).map(|i| b'a' + (i % 26) as u8).collect();
    let release = Arc::new(AtomicBool::new(false));
    let (v, rel) = (value.clone(), release.clone());
    let server = TestServer::start(move |req| {
        if req.key_str() == "slow" {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !rel.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            return Reply::body(200, b"slow-value");
        }
        Reply::body(200, &v)
    });
    let sm = free_port();
    let cfg = daemon_toml(1, &[&format!("socketmap_listen = \"127.0.0.1:{sm}\"")])
        + &map_toml(
            "m",
            None,
            &[server.url("/m")],
            &[
                "result = \"body\"",
                "http_timeout = \"10s\"",
                "lookup_timeout = \"10s\"",
            ],
        );
    let d = Daemon::start(&cfg, sm);
    let ok = [b"OK ".as_slice(), &value].concat();
    assert_eq!(
        LineClient::connect(sm).socketmap_query("m", b"big"),
        ok,
        "warm-up lookup"
    );
    let rss_before = rss_kib(d.pid());
    let request = [netstring(b"m slow"), netstring(b"m big").repeat(HITS)].concat();
    let expect = [netstring(b"OK slow-value"), netstring(&ok).repeat(HITS)].concat();
    let mut s = TcpStream::connect(("127.0.0.1", sm)).expect("connect");
    s.set_write_timeout(Some(WAIT)).unwrap();
    s.write_all(&request).expect("write the queries");
    assert!(
        server.wait_for_requests(2, WAIT),
        "the slow lookup never reached the server"
    );
    // Time to read and queue whatever the daemon will (nothing to poll for).
    thread::sleep(Duration::from_millis(300));
    let rss_queued = rss_kib(d.pid());
    release.store(true, Ordering::SeqCst);
    let within = Duration::from_secs(5);
    let got = read_up_to(&s, expect.len(), within).join().unwrap();
    let growth = rss_queued.saturating_sub(rss_before);
    eprintln!(
        "behind a slow lookup: RSS {rss_before} KiB before, {rss_queued} KiB with {HITS} \
         answers of 60 KB queued (+{growth} KiB); {} of {} bytes answered",
        got.len(),
        expect.len()
    );
    assert!(
        growth < 8 * 1024,
        "RSS grew {growth} KiB while answers waited behind the slow lookup"
    );
    same_bytes(&got, &expect, within)
        .unwrap_or_else(|e| panic!("{HITS} cache hits behind a slow lookup: {e}"));
    assert_eq!(server.requests(), 2, "big once (the warm-up), slow once");
}

// ---------------------------------------------------------------------------
// 6-7. Reload
// ---------------------------------------------------------------------------

#[test]
fn lookup_after_a_reload_never_joins_a_fetch_to_the_old_server() {
    let old = TestServer::start(|_| Reply::found(b"old@x").delayed(Duration::from_secs(1)));
    let new = TestServer::start(|_| Reply::found(b"new@x"));
    let port = free_port();
    let cfg = |url: String| daemon_toml(2, &[]) + &map_toml("m", Some(port), &[url], QUICK);
    let d = start_for_reload(&cfg(old.url("/m")), port);

    let l1 = thread::spawn(move || {
        let mut c = LineClient::connect(port);
        c.get("k@x")
    });
    assert!(
        old.wait_for_requests(1, WAIT),
        "L1 never reached the old server"
    );
    reload(&d, &cfg(new.url("/m")));
    let mut c = LineClient::connect(port);
    let t = Instant::now();
    let l2 = c.get("k@x");
    let l2_took = t.elapsed();
    let l1 = l1.join().unwrap();
    eprintln!("L1 (before the reload): {l1:?}; L2 (after): {l2:?} in {l2_took:?}");
    assert_eq!(l2, "200 new@x\n", "L2, made after the reload");
    assert!(
        l1 == "200 old@x\n" || l1 == "200 new@x\n",
        "L1, made before the reload: {l1:?}"
    );
    let l3 = c.get("k@x");
    assert_eq!(l3, "200 new@x\n", "L3, after L1 finished");
    assert_eq!(new.requests(), 1, "L3 came from the cache (L2's answer)");
    assert_eq!(old.requests(), 1);
}

#[test]
fn three_hundred_reloads_with_lookups_in_flight() {
    const RELOADS: usize = 300;
    /// Slow lookup i is answered once this many reloads are done.
    const RELEASE_AT: [usize; 4] = [100, 256, 257, 300];
    let reloads_done = Arc::new(AtomicUsize::new(0));
    let handler = {
        let reloads_done = reloads_done.clone();
        move |req: &common::Request| {
            let key = req.key_str();
            if let Some(i) = key
                .strip_prefix("slow")
                .and_then(|r| r.split('@').next())
                .and_then(|i| i.parse::<usize>().ok())
            {
                let deadline = Instant::now() + Duration::from_secs(15);
                while reloads_done.load(Ordering::SeqCst) < RELEASE_AT[i]
                    && Instant::now() < deadline
                {
                    thread::sleep(Duration::from_millis(1));
                }
                return Reply::found(&value_of(key.as_bytes()));
            }
            // 5 to 20 ms, by key.
            let ms = 5 + key.bytes().map(u64::from).sum::<u64>() % 16;
            Reply::found(&value_of(key.as_bytes())).delayed(Duration::from_millis(ms))
        }
    };
    let a = TestServer::start(handler.clone());
    let b = TestServer::start(handler);
    let port = free_port();
    let cfg = |url: String| {
        daemon_toml(2, &[])
            + &map_toml(
                "m",
                Some(port),
                &[url],
                &[
                    "connect_timeout = \"1s\"",
                    "http_timeout = \"10s\"",
                    "lookup_timeout = \"12s\"",
                    "retry_interval = \"1s\"",
                ],
            )
    };
    let d = start_for_reload(&cfg(a.url("/m")), port);

    // Slow lookups, in flight before the first reload.
    let slow: Vec<JoinHandle<(String, String)>> = (0..RELEASE_AT.len())
        .map(|i| {
            thread::spawn(move || {
                let key = format!("slow{i}@x");
                let mut c = LineClient::connect(port);
                let r = c.get(&key);
                (key, r)
            })
        })
        .collect();
    assert!(
        a.wait_for_requests(RELEASE_AT.len(), WAIT),
        "the slow lookups never reached the server"
    );
    // Fast lookups, continuously.
    let stop = Arc::new(AtomicBool::new(false));
    let fast: Vec<JoinHandle<Tally>> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                let mut tally = Tally::default();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("f{t}-{i}@x");
                    let r = c.get(&key);
                    tally.add(&key, &r);
                    i += 1;
                }
                tally
            })
        })
        .collect();

    let t0 = Instant::now();
    let mut stalled = Vec::new();
    for r in 1..=RELOADS {
        let url = if r % 2 == 1 { b.url("/m") } else { a.url("/m") };
        reload(&d, &cfg(url));
        reloads_done.store(r, Ordering::SeqCst);
        // Let the slow lookups released now be answered before the next
        // reload (bounded: a lost reply only shows later, as a failure).
        let released = RELEASE_AT.iter().filter(|&&x| x <= r).count();
        if RELEASE_AT.contains(&r) {
            let t = Instant::now();
            let done = wait_until(Duration::from_secs(2), || {
                slow.iter().take(released).all(|h| h.is_finished())
            });
            if !done {
                stalled.push(r);
            }
            eprintln!(
                "reload {r}: slow lookups released so far answered: {done} ({:?})",
                t.elapsed()
            );
        }
    }
    let reload_time = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut tally = Tally::default();
    for h in fast {
        tally.merge(h.join().unwrap());
    }
    let slow: Vec<(String, String)> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    let log = d.stderr();
    eprintln!(
        "{RELOADS} reloads in {reload_time:?}; fast lookups {tally:?}; slow {slow:?}; \
         stalled after reloads {stalled:?}; requests a={} b={}",
        a.requests(),
        b.requests()
    );
    let mut problems = Vec::new();
    if !stalled.is_empty() {
        problems.push(format!(
            "slow lookups released at reloads {stalled:?} not answered within 2 s (reply not read)"
        ));
    }
    if !tally.wrong.is_empty() || tally.temp > 0 || tally.ok == 0 {
        problems.push(format!(
            "fast lookups: {} right, {} temporary, wrong: {:?}",
            tally.ok,
            tally.temp,
            &tally.wrong[..tally.wrong.len().min(5)]
        ));
    }
    for (key, r) in &slow {
        if r != &want(key) {
            problems.push(format!("slow lookup {key}: {r:?}"));
        }
    }
    let down: Vec<&str> = log.lines().filter(|l| l.contains("is down")).collect();
    if !down.is_empty() {
        problems.push(format!("a healthy server logged down: {down:?}"));
    }
    let reloaded = count_lines(&log, &["reloaded"]);
    if reloaded != RELOADS {
        problems.push(format!("{reloaded} \"reloaded\" lines"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("after@x"), want("after@x"), "still answering");
}

// ---------------------------------------------------------------------------
// 8. A slow mirror beside a fast one
// ---------------------------------------------------------------------------

#[test]
fn lookups_queued_on_a_slow_mirror_move_to_the_fast_one() {
    const N: usize = 20;
    let slow = TestServer::start(|req| {
        Reply::found(&value_of(req.key.as_deref().unwrap_or_default()))
            .delayed(Duration::from_secs(2))
    });
    let fast =
        TestServer::start(|req| Reply::found(&value_of(req.key.as_deref().unwrap_or_default())));
    let port = free_port();
    let cfg = daemon_toml(1, &[])
        + &map_toml(
            "m",
            Some(port),
            &[slow.url("/m"), fast.url("/m")],
            &[
                "connect_timeout = \"500ms\"",
                "lookup_timeout = \"3s\"",
                "max_connections = 1",
            ],
        );
    let _d = Daemon::start(&cfg, port);
    let barrier = Arc::new(Barrier::new(N));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                barrier.wait();
                let key = format!("q{i}@x");
                let t = Instant::now();
                let r = c.get(&key);
                (key, r, t.elapsed())
            })
        })
        .collect();
    let results: Vec<(String, String, Duration)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let total = t0.elapsed();
    let slow_keys: HashSet<String> = slow.keys().iter().map(|k| show(k)).collect();
    let fast_keys: HashSet<String> = fast.keys().iter().map(|k| show(k)).collect();
    eprintln!(
        "slow mirror: {N} lookups in {total:?}; slow server {} requests, fast {}; {:?}",
        slow.requests(),
        fast.requests(),
        results
            .iter()
            .map(|(k, r, l)| format!("{k} {} {l:?}", r.trim_end()))
            .collect::<Vec<_>>()
    );
    let mut late = Vec::new();
    for (key, r, lat) in &results {
        assert_eq!(r, &want(key), "lookup {key} after {lat:?}");
        // Only a lookup the slow server alone held may wait for it.
        let only_slow = slow_keys.contains(key) && !fast_keys.contains(key);
        let bound = if only_slow {
            Duration::from_millis(2600)
        } else {
            Duration::from_millis(1500)
        };
        if *lat >= bound {
            late.push(format!("{key}: {lat:?}"));
        }
    }
    assert!(late.is_empty(), "lookups answered late: {late:?}");
    let only_slow = slow_keys.difference(&fast_keys).count();
    assert!(
        only_slow <= 1,
        "{only_slow} lookups waited for the slow server's one connection"
    );
}

// ---------------------------------------------------------------------------
// 9. An outage with expired negative entries
// ---------------------------------------------------------------------------

/// Caches f@x (found) and k@x (not found) with 1 s lifetimes, lets them
/// expire, stops the only server; returns the daemon, its port, and k's
/// not-found reply.
fn expired_entries_then_outage(cache_extra: &[&str], map_extra: &[&str]) -> (Daemon, u16, String) {
    let server = TestServer::with_map(&[("f@x", "fval@x")]);
    let port = free_port();
    let mut cache = vec![
        "ttl = \"1s\"",
        "negative_ttl = \"1s\"",
        "stale_ttl = \"1h\"",
    ];
    cache.extend_from_slice(cache_extra);
    let mut map_lines = vec![
        "connect_timeout = \"300ms\"",
        "http_timeout = \"500ms\"",
        "lookup_timeout = \"2s\"",
        "retry_interval = \"1s\"",
    ];
    map_lines.extend_from_slice(map_extra);
    let cfg = daemon_toml(1, &[])
        + &cache_toml(&cache)
        + &map_toml("m", Some(port), &[server.url("/m")], &map_lines);
    let d = Daemon::start(&cfg, port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("f@x"), "200 fval@x\n");
    let not_found = c.get("k@x");
    assert!(not_found.starts_with("500 "), "{not_found:?}");
    let stored = Instant::now();
    assert_eq!(server.requests(), 2);
    // Still fresh: answered from the cache.
    assert_eq!(c.get("k@x"), not_found);
    assert_eq!(server.requests(), 2);
    sleep_until(stored + Duration::from_millis(1200));
    drop(server); // connections refused from now on
    (d, port, not_found)
}

#[test]
fn outage_expired_not_found_is_a_temporary_error_by_default() {
    let (d, port, _) = expired_entries_then_outage(&[], &[]);
    let mut c = LineClient::connect(port);
    assert_temp(
        &c.get("k@x"),
        "expired not-found entry while every server fails",
    );
    assert_eq!(
        c.get("f@x"),
        "200 fval@x\n",
        "expired found entry: its stale value"
    );
    assert_temp(&c.get("k@x"), "again");
    let (code, out, err) = postmap_q("k@x", &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(
        (code, out.as_str()),
        (1, ""),
        "postmap on the expired not-found entry; stderr: {err}"
    );
    assert!(err.contains("query error"), "postmap stderr: {err}");
    drop(d);
}

#[test]
fn outage_expired_not_found_with_stale_negative_is_not_found() {
    let (d, port, not_found) = expired_entries_then_outage(&["stale_negative = true"], &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("k@x"), not_found, "stale not-found answer");
    assert_eq!(c.get("f@x"), "200 fval@x\n", "stale found answer");
    let (code, out, err) = postmap_q("k@x", &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", ""),
        "postmap: not found"
    );
    drop(d);
}

/// `stale_negative` set on the map, over the `[cache]` default.
#[test]
fn outage_expired_not_found_with_stale_negative_set_on_the_map() {
    let (d, port, not_found) = expired_entries_then_outage(&[], &["stale_negative = true"]);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("k@x"), not_found, "stale not-found answer");
    assert_eq!(c.get("f@x"), "200 fval@x\n", "stale found answer");
    drop(d);
}

// ---------------------------------------------------------------------------
// 10. The cache's memory budget
// ---------------------------------------------------------------------------

#[test]
fn cache_memory_budget_holds_with_large_values() {
    const KEYS: usize = 500;
    const VALUE: usize = 60_000;
    const BUDGET: f64 = 4_194_304.0;
    let value = |key: &str| -> Vec<u8> {
        let mut v = format!("{key}=").into_bytes();
        v.resize(VALUE, b'x');
        v
    };
    let server = TestServer::start(move |req| Reply::body(200, &value(&req.key_str())));
    let (sm, stats) = (free_port(), free_port());
    let cfg = daemon_toml(
        1,
        &[
            &format!("socketmap_listen = \"127.0.0.1:{sm}\""),
            &format!("stats_listen = \"127.0.0.1:{stats}\""),
        ],
    ) + &cache_toml(&["max_memory = \"4MiB\""])
        + &map_toml("m", None, &[server.url("/m")], &["result = \"body\""]);
    let d = Daemon::start(&cfg, sm);
    let rss_start = rss_kib(d.pid());
    let mut c = LineClient::connect(sm);
    for i in 0..KEYS {
        let key = format!("key{i}@x");
        let r = c.socketmap_query("m", key.as_bytes());
        assert_eq!(r.len(), 3 + VALUE, "answer size for {key}");
        assert!(
            r.starts_with(format!("OK {key}=x").as_bytes()),
            "answer for {key}"
        );
    }
    assert_eq!(server.requests(), KEYS);
    let m = metrics(stats);
    let bytes = must_sample(&m, "httpmapd_cache_bytes");
    let max = must_sample(&m, "httpmapd_cache_max_bytes");
    let entries = must_sample(&m, "httpmapd_cache_entries{map=\"m\"}");
    let rss = rss_kib(d.pid());
    eprintln!(
        "memory budget: cache_bytes {bytes}, max_bytes {max}, entries {entries}; \
         RSS {rss_start} KiB at start, {rss} KiB after {KEYS} x {VALUE} B"
    );
    assert_eq!(max, BUDGET, "httpmapd_cache_max_bytes");
    assert!(bytes <= BUDGET, "cache bytes {bytes} over the budget");
    assert!(
        (50.0..=70.0).contains(&entries),
        "{entries} entries held (4 MiB / 60 KB is about 68)"
    );
    assert!(rss < 64 * 1024, "RSS {rss} KiB");
}

/// `[cache] max_memory` in each unit (and as plain bytes), and its default,
/// as `/metrics` reports the budget.
#[test]
fn max_memory_units_and_default() {
    let server = TestServer::start(|_| Reply::found(b"v@x"));
    for (line, want) in [
        (None, 268_435_456.0),
        (Some("max_memory = 4194304"), 4_194_304.0),
        (Some("max_memory = \"1048576B\""), 1_048_576.0),
        (Some("max_memory = \"2048KiB\""), 2_097_152.0),
        (Some("max_memory = \"8MiB\""), 8_388_608.0),
        (Some("max_memory = \"1GiB\""), 1_073_741_824.0),
    ] {
        let (port, stats) = (free_port(), free_port());
        let cfg = daemon_toml(1, &[&format!("stats_listen = \"127.0.0.1:{stats}\"")])
            + &cache_toml(line.as_slice())
            + &map_toml("m", Some(port), &[server.url("/m")], QUICK);
        let d = Daemon::start(&cfg, port);
        let mut c = LineClient::connect(port);
        assert_eq!(c.get("k@x"), "200 v@x\n", "{line:?}");
        let m = metrics(stats);
        assert_eq!(
            must_sample(&m, "httpmapd_cache_max_bytes"),
            want,
            "budget for {line:?}"
        );
        let bytes = must_sample(&m, "httpmapd_cache_bytes");
        assert!(
            bytes >= 6.0 && bytes <= want,
            "one entry (\"k@x\" -> \"v@x\") held: {bytes} bytes"
        );
        drop(d);
    }
}

// ---------------------------------------------------------------------------
// 11. Values Postfix cannot carry; JSON booleans and numbers
// ---------------------------------------------------------------------------

#[test]
fn nul_and_control_bytes_and_json_scalars() {
    let server = TestServer::start(|req| {
        let key = req.key_str();
        if req.path == "/body" {
            let body: &[u8] = match key.as_str() {
                "nul@x" => b"a\0b",
                "ctl@x" => b"a\x01b",
                "tab@x" => b"a\tb",
                _ => b"plain@x",
            };
            return Reply::body(200, body);
        }
        let doc: &[u8] = match key.as_str() {
            "true@x" => br#"{"v": true}"#,
            "false@x" => br#"{"v": false}"#,
            "big@x" => br#"{"v": 12345678901234567890123}"#,
            "dec@x" => br#"{"v": 1.50}"#,
            "nul@x" => br#"{"v": "a\u0000b"}"#,
            _ => br#"{"v": "plain@x"}"#,
        };
        Reply::body(200, doc)
    });
    let (tcp, sm) = (free_port(), free_port());
    let cfg = daemon_toml(1, &[&format!("socketmap_listen = \"127.0.0.1:{sm}\"")])
        + &map_toml(
            "body",
            Some(tcp),
            &[server.url("/body")],
            &["result = \"body\""],
        )
        + &map_toml(
            "json",
            None,
            &[server.url("/json")],
            &["result = \"json:/v\""],
        );
    let _d = Daemon::start(&cfg, sm);
    let mut s = LineClient::connect(sm);
    let mut q = |map: &str, key: &str| show(&s.socketmap_query(map, key.as_bytes()));
    let mut failures = Vec::new();
    let mut check = |what: &str, got: String, ok: bool| {
        if !ok {
            failures.push(format!("{what}: got {got:?}"));
        }
    };
    let r = q("body", "plain@x");
    check("body plain", r.clone(), r == "OK plain@x");
    let r = q("body", "nul@x");
    check("body with NUL -> TEMP", r.clone(), r.starts_with("TEMP "));
    let r = q("body", "ctl@x");
    check("body with \\x01 -> TEMP", r.clone(), r.starts_with("TEMP "));
    let r = q("body", "tab@x");
    check("body with TAB -> the value", r.clone(), r == "OK a\tb");
    let r = q("json", "plain@x");
    check("json string", r.clone(), r == "OK plain@x");
    let r = q("json", "true@x");
    check("json true -> TEMP", r.clone(), r.starts_with("TEMP "));
    let r = q("json", "false@x");
    check("json false -> TEMP", r.clone(), r.starts_with("TEMP "));
    let r = q("json", "big@x");
    check(
        "json big integer, every digit",
        r.clone(),
        r == "OK 12345678901234567890123",
    );
    let r = q("json", "dec@x");
    check("json 1.50 as written", r.clone(), r == "OK 1.50");
    let r = q("json", "nul@x");
    check(
        "json string with NUL -> TEMP",
        r.clone(),
        r.starts_with("TEMP "),
    );
    let mut c = LineClient::connect(tcp);
    let r = c.get("nul@x");
    check("tcp_table body with NUL -> 400", r.clone(), is_temp(&r));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// 12. A response head trickled one byte at a time
// ---------------------------------------------------------------------------

#[test]
fn response_head_trickled_one_byte_per_ms() {
    let server = RawServer::start(|_req, s| {
        let mut head = found_reply(b"trickled@example.com", None);
        // Pad the head to over 100 bytes, before the blank line.
        let end = head.len() - 2;
        head.splice(end..end, b"X-Pad: 0123456789abcdef\r\n".iter().copied());
        for b in head {
            if !send(s, &[b]) {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        true
    });
    let (_d, port, _stats) = start_m(&[server.url()], 1, &[]);
    let mut c = LineClient::connect(port);
    let t = Instant::now();
    assert_eq!(c.get("t@x"), "200 trickled@example.com\n");
    let took = t.elapsed();
    eprintln!("trickled head answered in {took:?}");
    assert!(
        took >= Duration::from_millis(100),
        "the head was not trickled ({took:?})"
    );
    assert_eq!(c.get("u@x"), "200 trickled@example.com\n");
    assert_eq!(server.requests(), 2);
    assert_eq!(server.connections(), 1, "the connection was reused");
}

// ---------------------------------------------------------------------------
// 13. A slow client on stats_listen
// ---------------------------------------------------------------------------

#[test]
fn a_slow_stats_client_does_not_block_metrics_or_health() {
    let server = TestServer::start(|_| Reply::found(b"v@x"));
    let (_d, port, stats) = start_m(&[server.url("/m")], 1, &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("k@x"), "200 v@x\n");
    let mut silent = TcpStream::connect(("127.0.0.1", stats)).expect("connect to stats");
    silent.write_all(b"GET /met").unwrap();
    let idle = TcpStream::connect(("127.0.0.1", stats)).expect("connect to stats");
    for path in ["/metrics", "/health"] {
        let t = Instant::now();
        let r = try_stats_request(stats, "GET", path, Duration::from_secs(1));
        let took = t.elapsed();
        match r {
            Ok(StatsResponse { status, body, .. }) => {
                assert_eq!(status, 200, "{path}: {body}");
                if path == "/metrics" {
                    assert!(body.contains("httpmapd_lookups_total"), "{body}");
                }
                eprintln!("{path} answered in {took:?} beside two silent clients");
            }
            Err(e) => panic!("{path} with a slow stats client connected: {e} (after {took:?})"),
        }
    }
    // The slow clients were connected throughout.
    drop((silent, idle));
}
