//! Fault-injection tests for failover, server rest and probes, stale answers,
//! refresh ahead and coalescing (issue 3).
//!
//! Each test runs its own HTTP servers and its own `httpmapd` (2 workers,
//! short timeouts) on free loopback ports and talks tcp_table to it with
//! `LineClient`. The rule checked throughout: backend trouble is always a
//! temporary error (`400 ...`), never not-found (`500 ...`).

mod common;

use common::{
    assert_temp, count_lines, free_port, quoted_list, sleep_until, Acceptor, Daemon, LineClient,
    Reply, TestServer,
};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The per-map settings the tests vary. Defaults: the short timeouts of the
/// brief and the cache off (ttl = negative_ttl = 0), so every lookup reaches
/// the servers.
#[derive(Clone)]
struct Setup {
    connect_timeout: &'static str,
    http_timeout: &'static str,
    lookup_timeout: &'static str,
    retry_interval: &'static str,
    max_attempts: u32,
    ttl: &'static str,
    negative_ttl: &'static str,
    stale_ttl: &'static str,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            connect_timeout: "300ms",
            http_timeout: "500ms",
            lookup_timeout: "2s",
            retry_interval: "1s",
            max_attempts: 3,
            ttl: "0s",
            negative_ttl: "0s",
            stale_ttl: "0s",
        }
    }
}

const HTTP_TIMEOUT: Duration = Duration::from_millis(500);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

fn config(port: u16, servers: &[String], s: &Setup) -> String {
    let servers = quoted_list(servers);
    format!(
        r#"[daemon]
workers = 2
log_level = "info"

[maps.m]
tcp_listen = "127.0.0.1:{port}"
servers = [{servers}]
connect_timeout = "{}"
http_timeout = "{}"
lookup_timeout = "{}"
retry_interval = "{}"
max_attempts = {}
ttl = "{}"
negative_ttl = "{}"
stale_ttl = "{}"
"#,
        s.connect_timeout,
        s.http_timeout,
        s.lookup_timeout,
        s.retry_interval,
        s.max_attempts,
        s.ttl,
        s.negative_ttl,
        s.stale_ttl
    )
}

/// Starts httpmapd for map `m` over `servers`; returns it and its tcp_table port.
fn start(servers: &[String], s: &Setup) -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::start(&config(port, servers, s), port);
    (d, port)
}

/// The URL of a server on `port` (as it appears in the daemon's log lines).
fn url_of(port: u16) -> String {
    format!("http://127.0.0.1:{port}/m")
}

/// A port nobody listens on: connections are refused.
fn dead_url() -> String {
    url_of(free_port())
}

fn good_server() -> TestServer {
    TestServer::start(|_| Reply::found(b"v"))
}

/// One lookup and how long its reply took.
fn timed_get(c: &mut LineClient, key: &str) -> (String, Duration) {
    let t = Instant::now();
    let r = c.get(key);
    (r, t.elapsed())
}

/// A server that accepts, reads the request, then resets the connection
/// (SO_LINGER 0 then close: the daemon reads ECONNRESET).
struct ResetServer(Acceptor);

impl ResetServer {
    fn start() -> ResetServer {
        ResetServer(Acceptor::start(|mut stream, _| {
            // Read the request head (or give up after a while).
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let lg = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on a socket we own, with a valid linger struct.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &lg as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            // Closed when this returns (the acceptor drops its copy then):
            // with SO_LINGER 0, a RST.
        }))
    }

    fn url(&self) -> String {
        url_of(self.0.port())
    }

    fn connections(&self) -> usize {
        self.0.accepted()
    }
}

/// A listener whose accept queue is full (backlog 0, filled by us): further
/// SYNs are dropped, so a connect to it hangs until the connector gives up.
/// Fails the test when the kernel does not behave so here: without a
/// connect that hangs there is no connect timeout to test.
struct Blackhole {
    listener: TcpListener,
    _fill: Vec<TcpStream>,
}

impl Blackhole {
    fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        // SAFETY: listen(2) again on our own listening socket only changes its backlog.
        if unsafe { libc::listen(listener.as_raw_fd(), 0) } != 0 {
            panic!("listen(backlog 0): {}", std::io::Error::last_os_error());
        }
        let addr = listener.local_addr().expect("local_addr");
        let mut fill = Vec::new();
        for _ in 0..4 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                Ok(s) => fill.push(s),
                Err(_) => break,
            }
        }
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Blackhole {
                listener,
                _fill: fill,
            },
            other => panic!(
                "\n{}: FAILED: cannot make a listener that lets connects hang here \
                 (a connect to a full accept queue, after {} filling connects, \
                 gave {other:?} instead of timing out), so there is no connect \
                 timeout to test.\n",
                common::test_name(),
                fill.len()
            ),
        }
    }

    fn url(&self) -> String {
        url_of(self.listener.local_addr().unwrap().port())
    }
}

/// A failing server paired with a good one: lookups go on until the bad one
/// has been tried (it is picked at random), then 20 more in quick succession
/// (well within its 1 s rest). Every lookup must be found. `hits` counts
/// what reached the bad server; `rests`: whether it must then rest (and be
/// logged down exactly once) or keep being used (and never be logged down).
fn check_paired(name: &str, bad_url: &str, hits: &dyn Fn() -> usize, rests: bool) {
    let good = good_server();
    let (d, port) = start(&[bad_url.to_string(), good.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    let mut n = 0;
    while hits() == 0 {
        assert!(
            n < 60,
            "{name}: the bad server was never picked in 60 lookups"
        );
        let (r, lat) = timed_get(&mut c, &format!("a{n}"));
        assert_eq!(r, "200 v\n", "{name}: lookup {n}");
        assert!(
            lat < HTTP_TIMEOUT + Duration::from_millis(400),
            "{name}: lookup {n} took {lat:?}"
        );
        n += 1;
    }
    let first_hits = hits();
    let t = Instant::now();
    for i in 0..20 {
        let (r, lat) = timed_get(&mut c, &format!("b{i}"));
        assert_eq!(
            r, "200 v\n",
            "{name}: lookup b{i} after the bad server was hit"
        );
        assert!(
            lat < Duration::from_millis(300),
            "{name}: lookup b{i} took {lat:?}"
        );
        n += 1;
    }
    assert!(t.elapsed() < RETRY_INTERVAL, "20 lookups took too long");
    assert_eq!(
        good.requests(),
        n,
        "{name}: every lookup ended at the good server"
    );
    let log = d.stderr();
    let down = count_lines(&log, &["is down", bad_url]);
    if rests {
        assert_eq!(first_hits, 1, "{name}: one failed request");
        assert_eq!(
            hits(),
            1,
            "{name}: while it rests no lookup may reach the bad server"
        );
        assert_eq!(down, 1, "{name}: one \"is down\" line; log:\n{log}");
    } else {
        assert!(
            hits() >= 2,
            "{name}: a server answering 5xx must not rest, yet it got {} request(s) in {n} lookups",
            hits()
        );
        assert_eq!(down, 0, "{name}: a 5xx is not \"down\"; log:\n{log}");
    }
}

// ---------------------------------------------------------------------------
// Failover between servers
// ---------------------------------------------------------------------------

#[test]
fn healthy_servers_are_picked_at_random() {
    let a = good_server();
    let b = good_server();
    let (_d, port) = start(&[a.url("/m"), b.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    for i in 0..40 {
        assert_eq!(c.get(&format!("k{i}")), "200 v\n");
    }
    assert_eq!(a.requests() + b.requests(), 40);
    // P(one server gets fewer than 5 of 40 fair picks) is about 2e-7.
    assert!(
        a.requests() >= 5 && b.requests() >= 5,
        "not spread at random: {} / {}",
        a.requests(),
        b.requests()
    );
}

#[test]
fn refused_server_rests_and_is_logged_down_once() {
    let dead = dead_url();
    let good = good_server();
    let (d, port) = start(&[dead.clone(), good.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    let t0 = Instant::now();
    for i in 0..50 {
        assert_eq!(c.get(&format!("k{i}")), "200 v\n", "lookup {i}");
    }
    let wall = t0.elapsed();
    assert!(wall < Duration::from_secs(3), "50 lookups took {wall:?}");
    assert_eq!(good.requests(), 50);
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["is down", &dead]),
        1,
        "exactly one \"is down\" line for {dead}; log:\n{log}"
    );
    assert_eq!(count_lines(&log, &["is up again"]), 0, "log:\n{log}");
}

#[test]
fn never_answering_server_costs_one_http_timeout_then_rests() {
    let hang = TestServer::start(|_| Reply::NeverAnswer);
    let good = good_server();
    let (d, port) = start(&[hang.url("/m"), good.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    let mut slow = None;
    let mut n = 0;
    while hang.requests() == 0 {
        assert!(n < 60, "the hanging server was never picked in 60 lookups");
        let (r, lat) = timed_get(&mut c, &format!("a{n}"));
        assert_eq!(r, "200 v\n", "lookup a{n}");
        assert!(
            lat < HTTP_TIMEOUT + Duration::from_millis(400),
            "lookup a{n} took {lat:?}: more than http_timeout + margin"
        );
        if hang.requests() == 1 {
            slow = Some(lat);
        } else {
            assert!(lat < Duration::from_millis(300), "lookup a{n} took {lat:?}");
        }
        n += 1;
    }
    let slow = slow.unwrap();
    assert!(
        slow >= HTTP_TIMEOUT - Duration::from_millis(50),
        "the lookup that met the hanging server took {slow:?}: it should have waited http_timeout"
    );
    // It rests now: later lookups do not wait on it.
    for i in 0..20 {
        let (r, lat) = timed_get(&mut c, &format!("b{i}"));
        assert_eq!(r, "200 v\n");
        assert!(
            lat < Duration::from_millis(300),
            "lookup b{i} took {lat:?} while the hanging server rests"
        );
    }
    assert_eq!(hang.requests(), 1);
    assert_eq!(hang.connections(), 1);
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["is down", &hang.url("/m")]),
        1,
        "log:\n{log}"
    );
}

#[test]
fn garbage_reply_fails_over_and_rests() {
    let bad = TestServer::start(|_| Reply::Garbage(b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()));
    check_paired("garbage", &bad.url("/m"), &|| bad.requests(), true);
}

#[test]
fn close_mid_reply_fails_over_and_rests() {
    let bad = TestServer::start(|_| Reply::CloseMidReply);
    check_paired("close mid reply", &bad.url("/m"), &|| bad.requests(), true);
}

#[test]
fn reset_connection_fails_over_and_rests() {
    let bad = ResetServer::start();
    check_paired("reset", &bad.url(), &|| bad.connections(), true);
}

#[test]
fn connect_timeout_fails_over_and_rests() {
    let hole = Blackhole::start();
    let hole_url = hole.url();
    let good = good_server();
    let (d, port) = start(&[hole_url.clone(), good.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    let mut n = 0;
    let mut slow = None;
    while count_lines(&d.stderr(), &["is down", &hole_url]) == 0 {
        assert!(
            n < 60,
            "the unreachable server was never picked in 60 lookups"
        );
        let (r, lat) = timed_get(&mut c, &format!("a{n}"));
        assert_eq!(r, "200 v\n", "lookup a{n}");
        assert!(
            lat < Duration::from_millis(300 + 400),
            "lookup a{n} took {lat:?}: more than connect_timeout + margin"
        );
        if lat >= Duration::from_millis(250) {
            slow = Some(lat);
        }
        n += 1;
    }
    assert!(
        slow.is_some(),
        "the lookup that met the unreachable server should have waited connect_timeout"
    );
    for i in 0..20 {
        let (r, lat) = timed_get(&mut c, &format!("b{i}"));
        assert_eq!(r, "200 v\n");
        assert!(lat < Duration::from_millis(200), "lookup b{i} took {lat:?}");
    }
    let log = d.stderr();
    assert_eq!(count_lines(&log, &["is down", &hole_url]), 1, "log:\n{log}");
    assert_eq!(
        count_lines(&log, &["is down", &hole_url, "connect timed out"]),
        1,
        "log:\n{log}"
    );
    drop(d);

    // Alone: a temporary error once connect_timeout is over.
    let (_d, port) = start(std::slice::from_ref(&hole_url), &Setup::default());
    let mut c = LineClient::connect(port);
    let (r, lat) = timed_get(&mut c, "k");
    assert_temp(&r, "unreachable server alone");
    assert!(
        lat >= Duration::from_millis(250) && lat < Duration::from_secs(1),
        "lookup took {lat:?} (connect_timeout 300ms)"
    );
}

#[test]
fn status_503_fails_over_without_rest() {
    let bad = TestServer::start(|_| Reply::status(503, "backend overloaded"));
    check_paired("503", &bad.url("/m"), &|| bad.requests(), false);
}

#[test]
fn lone_broken_server_gives_temporary_errors_never_not_found() {
    type Make = fn() -> TestServer;
    let cases: &[(&str, Make)] = &[
        ("garbage", || {
            TestServer::start(|_| Reply::Garbage(b"hello there\r\n\r\n".to_vec()))
        }),
        ("close mid reply", || {
            TestServer::start(|_| Reply::CloseMidReply)
        }),
        ("truncated body", || {
            TestServer::start(|_| {
                Reply::Garbage(
                    b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: v\r\nContent-Length: 10\r\n\r\nabc"
                        .to_vec(),
                )
            })
        }),
        ("500 without RETMSG", || {
            TestServer::start(|_| Reply::body(500, b""))
        }),
        ("502 without RETMSG", || {
            TestServer::start(|_| Reply::body(502, b""))
        }),
        ("504 with RETMSG", || {
            TestServer::start(|_| Reply::status(504, "upstream timeout"))
        }),
    ];
    for (name, make) in cases {
        let bad = make();
        let (_d, port) = start(&[bad.url("/m")], &Setup::default());
        let mut c = LineClient::connect(port);
        for i in 0..3 {
            let (r, lat) = timed_get(&mut c, &format!("k{i}"));
            assert_temp(&r, &format!("{name}, lookup {i}"));
            assert!(
                lat < Duration::from_secs(1),
                "{name}: lookup {i} took {lat:?}"
            );
        }
    }
    // A reset connection too.
    let bad = ResetServer::start();
    let (_d, port) = start(&[bad.url()], &Setup::default());
    let mut c = LineClient::connect(port);
    for i in 0..3 {
        assert_temp(&c.get(&format!("k{i}")), &format!("reset, lookup {i}"));
    }
}

#[test]
fn lone_503_answers_its_retmsg_and_is_asked_every_time() {
    let bad = TestServer::start(|_| Reply::status(503, "backend overloaded"));
    let (d, port) = start(&[bad.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    for i in 0..5 {
        assert_eq!(
            c.get(&format!("k{i}")),
            "400 backend%20overloaded\n",
            "lookup {i}"
        );
        assert_eq!(bad.requests(), i + 1, "a 503 server is not rested");
    }
    let log = d.stderr();
    assert_eq!(count_lines(&log, &["is down"]), 0, "log:\n{log}");
}

#[test]
fn max_attempts_bounds_the_servers_tried() {
    let servers: Vec<TestServer> = (0..3)
        .map(|i| {
            let msg = format!("busy {i}");
            TestServer::start(move |_| Reply::status(503, &msg))
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url("/m")).collect();
    let setup = Setup {
        max_attempts: 2,
        ..Setup::default()
    };
    let (_d, port) = start(&urls, &setup);
    let mut c = LineClient::connect(port);
    let total = || servers.iter().map(|s| s.requests()).sum::<usize>();
    for i in 0..6 {
        let r = c.get(&format!("k{i}"));
        assert!(
            ["400 busy%200\n", "400 busy%201\n", "400 busy%202\n"].contains(&r.as_str()),
            "lookup {i}: {r:?}"
        );
        assert_eq!(
            total(),
            2 * (i + 1),
            "max_attempts = 2: two servers per lookup"
        );
    }
}

#[test]
fn lookup_timeout_bounds_the_whole_lookup() {
    let servers: Vec<TestServer> = (0..3)
        .map(|_| TestServer::start(|_| Reply::NeverAnswer))
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url("/m")).collect();
    let setup = Setup {
        lookup_timeout: "700ms",
        ..Setup::default()
    };
    let (_d, port) = start(&urls, &setup);
    let mut c = LineClient::connect(port);
    let (r, lat) = timed_get(&mut c, "k");
    assert_temp(&r, "three hanging servers");
    assert!(
        lat >= Duration::from_millis(650) && lat < Duration::from_millis(1100),
        "lookup_timeout is 700ms, the lookup took {lat:?}"
    );
    // 500 ms on the first, then the second until the 700 ms deadline.
    assert_eq!(servers.iter().map(|s| s.requests()).sum::<usize>(), 2);
}

/// A server cut off by the lookup's own deadline has not failed its
/// http_timeout: it must not be rested or logged down.
#[test]
fn lookup_deadline_does_not_count_against_the_last_server() {
    let hang = TestServer::start(|_| Reply::NeverAnswer);
    let slowish = TestServer::start(|_| Reply::found(b"v").delayed(Duration::from_millis(400)));
    let setup = Setup {
        lookup_timeout: "700ms",
        ..Setup::default()
    };
    let (d, port) = start(&[hang.url("/m"), slowish.url("/m")], &setup);
    let mut c = LineClient::connect(port);
    // Until a lookup tries the hanging server first: 500 ms there, then the
    // 400 ms server is cut off at 700 ms.
    let mut n = 0;
    while hang.requests() == 0 {
        assert!(n < 40, "the hanging server was never picked");
        let r = c.get(&format!("k{n}"));
        if hang.requests() == 0 {
            assert_eq!(r, "200 v\n");
        } else {
            assert_temp(&r, "hanging server then cut off by lookup_timeout");
        }
        n += 1;
    }
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["is down", &slowish.url("/m")]),
        0,
        "the 400 ms server answered within http_timeout whenever it had the time; log:\n{log}"
    );
    // And it still serves the next lookup (the hanging one rests).
    assert_eq!(c.get("after"), "200 v\n");
}

// ---------------------------------------------------------------------------
// Every server failing: rests, probes, recovery
// ---------------------------------------------------------------------------

#[test]
fn all_servers_dead_answers_400_without_waiting() {
    let a = dead_url();
    let b = dead_url();
    let (d, port) = start(&[a.clone(), b.clone()], &Setup::default());
    let mut c = LineClient::connect(port);
    let (r, lat) = timed_get(&mut c, "k0");
    assert_temp(&r, "first lookup, both servers refuse");
    assert!(lat < LOOKUP_TIMEOUT, "first lookup took {lat:?}");
    for i in 1..6 {
        let (r, lat) = timed_get(&mut c, &format!("k{i}"));
        assert_temp(&r, &format!("lookup {i}, both servers rest"));
        assert!(lat < Duration::from_secs(1), "lookup {i} took {lat:?}");
    }
    let log = d.stderr();
    assert_eq!(count_lines(&log, &["is down", &a]), 1, "log:\n{log}");
    assert_eq!(count_lines(&log, &["is down", &b]), 1, "log:\n{log}");
}

#[test]
fn only_one_probe_in_flight_when_every_server_rests() {
    let hang = TestServer::start(|_| Reply::NeverAnswer);
    let (d, port) = start(&[hang.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    let (r, lat) = timed_get(&mut c, "first");
    assert_temp(&r, "hanging server alone");
    assert!(
        lat >= HTTP_TIMEOUT - Duration::from_millis(50) && lat < LOOKUP_TIMEOUT,
        "first lookup took {lat:?}"
    );
    assert_eq!(hang.requests(), 1);
    // It rests now. Six concurrent lookups of distinct keys: one probes it
    // (waits http_timeout), the others get a temporary error at once.
    let n = 6;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                barrier.wait();
                timed_get(&mut c, &format!("k{i}"))
            })
        })
        .collect();
    let results: Vec<(String, Duration)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, _) in &results {
        assert_temp(r, "concurrent lookup while the only server rests");
    }
    let slow = results
        .iter()
        .filter(|(_, l)| *l >= Duration::from_millis(300))
        .count();
    assert_eq!(slow, 1, "exactly one lookup probes; latencies: {results:?}");
    for (_, l) in &results {
        assert!(
            *l < Duration::from_millis(200) || *l >= HTTP_TIMEOUT - Duration::from_millis(50),
            "latencies: {results:?}"
        );
    }
    assert_eq!(hang.requests(), 2, "one probe request");
    let log = d.stderr();
    assert_eq!(count_lines(&log, &["is down"]), 1, "log:\n{log}");
}

/// A request that was already on its way to a server when the server went
/// down, failing later, must not free the probe slot of the probe in flight:
/// a further lookup must get its temporary error at once, not probe again.
#[test]
fn a_late_failure_does_not_free_the_probe_slot() {
    let hang = TestServer::start(|_| Reply::NeverAnswer);
    let (_d, port) = start(&[hang.url("/m")], &Setup::default());
    let t0 = Instant::now();
    let at = |ms: u64, key: &'static str| {
        thread::spawn(move || {
            let mut c = LineClient::connect(port);
            sleep_until(t0 + Duration::from_millis(ms));
            timed_get(&mut c, key)
        })
    };
    // a: on the server from 0 ms, fails at 500 ms (the server rests from then).
    // b: on the server from 200 ms (still up then), fails at 700 ms.
    // c: at 600 ms every server rests: c probes, until 1100 ms.
    // d: at 850 ms c's probe is in flight: d gets a temporary error at once.
    let a = at(0, "a");
    let b = at(200, "b");
    let c = at(600, "c");
    let d = at(850, "d");
    let results: Vec<(&str, (String, Duration))> = [("a", a), ("b", b), ("c", c), ("d", d)]
        .into_iter()
        .map(|(k, h)| (k, h.join().unwrap()))
        .collect();
    for (k, (r, _)) in &results {
        assert_temp(r, &format!("lookup {k}"));
    }
    for (k, (_, lat)) in &results[..3] {
        assert!(
            *lat >= HTTP_TIMEOUT - Duration::from_millis(50),
            "lookup {k} should have waited http_timeout: {results:?}"
        );
    }
    let d_lat = results[3].1 .1;
    assert!(
        d_lat < Duration::from_millis(200),
        "lookup d ran a second probe while c's was in flight (took {d_lat:?}); {} requests",
        hang.requests()
    );
    assert_eq!(hang.requests(), 3, "a, b and c's probe");
}

#[test]
fn recovery_after_restart_on_the_same_port() {
    let server = good_server();
    let addr = server.addr().to_string();
    let url = server.url("/m");
    let (d, port) = start(std::slice::from_ref(&url), &Setup::default());
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("k0"), "200 v\n");
    drop(server);
    for i in 1..4 {
        let (r, lat) = timed_get(&mut c, &format!("k{i}"));
        assert_temp(&r, &format!("lookup {i} with the server gone"));
        assert!(lat < Duration::from_secs(1), "lookup {i} took {lat:?}");
    }
    let server = TestServer::start_on(&addr, |_| Reply::found(b"v")).expect("rebind same port");
    let t = Instant::now();
    let mut i = 0;
    loop {
        let r = c.get(&format!("r{i}"));
        if r == "200 v\n" {
            break;
        }
        assert_temp(&r, "lookup while the server comes back");
        assert!(
            t.elapsed() < RETRY_INTERVAL + Duration::from_millis(500),
            "no success within retry_interval + margin after the restart"
        );
        thread::sleep(Duration::from_millis(50));
        i += 1;
    }
    eprintln!(
        "recovered {:?} after the restart ({} failed lookup(s) before)",
        t.elapsed(),
        i
    );
    for i in 0..5 {
        assert_eq!(c.get(&format!("s{i}")), "200 v\n");
    }
    assert!(server.requests() >= 6);
    let log = d.stderr();
    assert_eq!(count_lines(&log, &["is down", &url]), 1, "log:\n{log}");
    assert_eq!(count_lines(&log, &["is up again", &url]), 1, "log:\n{log}");
}

/// After its rest a server is probed by one lookup even while another server
/// of the map is healthy, and comes back into use.
#[test]
fn rested_server_is_probed_after_its_rest_while_others_are_up() {
    let good = good_server();
    let b_port = free_port();
    let b_url = url_of(b_port);
    let (d, port) = start(&[b_url.clone(), good.url("/m")], &Setup::default());
    let mut c = LineClient::connect(port);
    // Until a lookup has met the dead server (it is picked at random).
    let mut n = 0;
    while count_lines(&d.stderr(), &["is down", &b_url]) == 0 {
        assert!(n < 60, "the dead server was never picked in 60 lookups");
        assert_eq!(c.get(&format!("a{n}")), "200 v\n");
        n += 1;
    }
    let down_at = Instant::now();
    let b = TestServer::start_on(&format!("127.0.0.1:{b_port}"), |_| Reply::found(b"v"))
        .expect("bind the revived server");
    sleep_until(down_at + RETRY_INTERVAL + Duration::from_millis(200));
    for i in 0..40 {
        assert_eq!(c.get(&format!("b{i}")), "200 v\n");
        if b.requests() > 0 && i >= 10 {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let log = d.stderr();
    assert!(
        b.requests() >= 1,
        "the revived server was never probed after its {RETRY_INTERVAL:?} rest; log:\n{log}"
    );
    assert_eq!(
        count_lines(&log, &["is up again", &b_url]),
        1,
        "log:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// The cache under failure: stale answers, refresh ahead, coalescing
// ---------------------------------------------------------------------------

#[test]
fn stale_entries_answer_when_every_server_fails() {
    let server = TestServer::with_map(&[("known", "v")]);
    let setup = Setup {
        ttl: "1s",
        negative_ttl: "1s",
        stale_ttl: "1h",
        ..Setup::default()
    };
    let (d, port) = start(&[server.url("/m")], &setup);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("known"), "200 v\n");
    let not_found = c.get("unknown");
    assert!(not_found.starts_with("500 "), "{not_found:?}");
    assert_eq!(server.requests(), 2);
    drop(server);
    thread::sleep(Duration::from_millis(1300));
    for i in 0..3 {
        let (r, lat) = timed_get(&mut c, "known");
        assert_eq!(r, "200 v\n", "stale found answer, round {i}");
        assert!(lat < Duration::from_secs(1), "round {i}: {lat:?}");
        // An expired not-found is not answered during an outage (the key
        // may have been added meanwhile: defer, never bounce) unless
        // stale_negative = true (tests/answers.rs).
        let (r, lat) = timed_get(&mut c, "unknown");
        assert_temp(&r, "expired not-found, servers gone");
        assert!(lat < Duration::from_secs(1), "round {i}: {lat:?}");
    }
    // A key never cached has nothing stale: temporary error.
    assert_temp(&c.get("never-seen"), "uncached key, server gone");
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["stale"]),
        1,
        "one \"stale\" line, not one per lookup; log:\n{log}"
    );
}

#[test]
fn refresh_ahead_answers_at_once_and_refreshes_in_the_background() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let server = TestServer::start(move |_| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::found(format!("v{i}").as_bytes()).delayed(Duration::from_millis(300))
    });
    let setup = Setup {
        ttl: "2s",
        negative_ttl: "2s",
        ..Setup::default()
    };
    let (_d, port) = start(&[server.url("/m")], &setup);
    let mut c = LineClient::connect(port);
    let (r, lat) = timed_get(&mut c, "k");
    assert_eq!(r, "200 v1\n");
    assert!(lat >= Duration::from_millis(280), "first lookup {lat:?}");
    let stored = Instant::now();
    assert_eq!(server.requests(), 1);
    // In the last 10% of the 2 s TTL: answered from the cache at once...
    sleep_until(stored + Duration::from_millis(1850));
    let (r, lat) = timed_get(&mut c, "k");
    assert_eq!(r, "200 v1\n", "hit near expiry");
    assert!(
        lat < Duration::from_millis(200),
        "hit near expiry took {lat:?}: it must not wait for the refresh"
    );
    // ...and refreshed in the background.
    assert!(
        server.wait_for_requests(2, Duration::from_millis(400)),
        "no background refresh"
    );
    // Past the old expiry the refreshed entry answers, fresh.
    sleep_until(stored + Duration::from_millis(2300));
    let (r, lat) = timed_get(&mut c, "k");
    assert_eq!(r, "200 v2\n", "the refreshed value");
    assert!(
        lat < Duration::from_millis(200),
        "refreshed hit took {lat:?}"
    );
    thread::sleep(Duration::from_millis(200));
    assert_eq!(server.requests(), 2, "no third request");
}

#[test]
fn coalesced_lookups_all_get_the_temporary_error() {
    let hang = TestServer::start(|_| Reply::NeverAnswer);
    let (_d, port) = start(&[hang.url("/m")], &Setup::default());
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                barrier.wait();
                timed_get(&mut c, "same@example.com")
            })
        })
        .collect();
    let results: Vec<(String, Duration)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.len(), n, "none lost");
    for (r, lat) in &results {
        assert_temp(r, "coalesced lookup of a hanging server");
        assert_eq!(r, &results[0].0, "every waiter gets the same answer");
        assert!(
            *lat < LOOKUP_TIMEOUT + Duration::from_millis(500),
            "a waiter took {lat:?}"
        );
    }
    assert_eq!(hang.requests(), 1, "20 lookups of one key: one fetch");
}

// ---------------------------------------------------------------------------
// The fault run: a burst while a server is dropped and restarted
// ---------------------------------------------------------------------------

#[test]
fn fault_run_burst_with_a_server_dropped_and_restarted() {
    let handler = |req: &common::Request| Reply::found(format!("v-{}", req.key_str()).as_bytes());
    let a = TestServer::start(handler);
    let b = TestServer::start(handler);
    let c0 = TestServer::start(handler);
    let c_addr = c0.addr().to_string();
    let urls = [a.url("/m"), b.url("/m"), c0.url("/m")];
    let (d, port) = start(&urls, &Setup::default());
    let victim = Arc::new(Mutex::new(Some(c0)));

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 100;
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}@example.com")).collect();
    let done = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));

    let control = {
        let (victim, done, barrier) = (victim.clone(), done.clone(), barrier.clone());
        thread::spawn(move || {
            barrier.wait();
            thread::sleep(Duration::from_millis(150));
            let at_drop = done.load(Ordering::SeqCst);
            let victim_before = victim.lock().unwrap().as_ref().unwrap().requests();
            drop(victim.lock().unwrap().take());
            thread::sleep(Duration::from_millis(200));
            let at_restart = done.load(Ordering::SeqCst);
            let revived = TestServer::start_on(&c_addr, handler).expect("rebind");
            *victim.lock().unwrap() = Some(revived);
            (at_drop, at_restart, victim_before)
        })
    };

    #[derive(Default, Debug)]
    struct Tally {
        ok: usize,
        temp: usize,
        not_found: usize,
        other: Vec<String>,
        worst: Duration,
    }
    let clients: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (keys, done, barrier) = (keys.clone(), done.clone(), barrier.clone());
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                let mut tally = Tally::default();
                barrier.wait();
                for i in 0..PER_CLIENT {
                    let key = &keys[(t * 3 + i) % keys.len()];
                    let (r, lat) = timed_get(&mut c, key);
                    tally.worst = tally.worst.max(lat);
                    if r == format!("200 v-{key}\n") {
                        tally.ok += 1;
                    } else if r.starts_with("400 ") && r.matches('\n').count() == 1 {
                        tally.temp += 1;
                    } else if r.starts_with("500 ") {
                        tally.not_found += 1;
                    } else {
                        tally.other.push(format!("{key}: {r:?}"));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(5));
                }
                tally
            })
        })
        .collect();
    let t0 = Instant::now();
    let tallies: Vec<Tally> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = t0.elapsed();
    let (at_drop, at_restart, victim_before) = control.join().unwrap();
    let ok: usize = tallies.iter().map(|t| t.ok).sum();
    let temp: usize = tallies.iter().map(|t| t.temp).sum();
    let not_found: usize = tallies.iter().map(|t| t.not_found).sum();
    let other: Vec<&String> = tallies.iter().flat_map(|t| t.other.iter()).collect();
    let worst = tallies.iter().map(|t| t.worst).max().unwrap();
    let victim_requests = victim.lock().unwrap().as_ref().map_or(0, |s| s.requests());
    eprintln!(
        "fault run: {} lookups in {:?}: {} \"200\", {} \"400\", {} \"500\", {} other; \
         worst latency {:?}; server dropped after {} and restarted after {} lookups; \
         requests: a={} b={} c={} before the drop, {} after the restart",
        CLIENTS * PER_CLIENT,
        elapsed,
        ok,
        temp,
        not_found,
        other.len(),
        worst,
        at_drop,
        at_restart,
        a.requests(),
        b.requests(),
        victim_before,
        victim_requests
    );
    assert!(
        at_drop > 0 && at_restart < CLIENTS * PER_CLIENT,
        "the fault did not happen mid-burst ({at_drop} / {at_restart})"
    );
    assert_eq!(not_found, 0, "backend trouble answered as not found");
    assert!(other.is_empty(), "wrong replies: {other:?}");
    assert_eq!(ok + temp, CLIENTS * PER_CLIENT, "a reply was lost");
    assert!(
        worst < LOOKUP_TIMEOUT + Duration::from_millis(500),
        "worst latency {worst:?}"
    );
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["is down", &urls[2]]),
        1,
        "one \"is down\" line for the dropped server; log:\n{log}"
    );
    assert_eq!(count_lines(&log, &["is down"]), 1, "log:\n{log}");
}

// ---------------------------------------------------------------------------
// max_connections holds while attempts are retried on a fresh connection
// ---------------------------------------------------------------------------

/// How [`SecondRequestServer`] breaks the second request on a connection.
#[derive(Clone, Copy, Debug)]
enum Second {
    /// Closes without a byte of reply: the daemon sees a pooled connection
    /// closed under its request (it retries once on a fresh connection).
    Close,
    /// A wrong reply with more bytes behind it, then closes: the daemon
    /// rejects it as stray (it retries once on a fresh connection).
    StrayReply,
}

/// A dict_http server that answers the first request on each connection
/// (`v-KEY`) and breaks the second one (`Second`), closing the connection
/// itself. Counts the connections accepted, the requests read and the most
/// connections open at once (a connection counts as closed before the
/// server closes it, so the daemon can never see it closed while it still
/// counts here).
struct SecondRequestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    most_open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SecondRequestServer {
    fn start(second: Second) -> SecondRequestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let most_open = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, m, s) = (
            accepted.clone(),
            requests.clone(),
            most_open.clone(),
            stop.clone(),
        );
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now_open, Ordering::SeqCst);
                let (r, open) = (r.clone(), open.clone());
                thread::spawn(move || serve_two(stream, second, &r, &open));
            }
        });
        SecondRequestServer {
            addr,
            accepted,
            requests,
            most_open,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        url_of(self.addr.port())
    }
}

impl Drop for SecondRequestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection of [`SecondRequestServer`]: `open` is decremented before
/// the server closes it (and when the daemon closed it first).
fn serve_two(mut stream: TcpStream, second: Second, requests: &AtomicUsize, open: &AtomicUsize) {
    use std::io::Write;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for seq in 1.. {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    open.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        requests.fetch_add(1, Ordering::SeqCst);
        let key = String::from_utf8_lossy(&head)
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("POSTFIX-DICT-EMAIL")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let reply = |v: &str| {
            format!("HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: {v}\r\nContent-Length: 0\r\n\r\n")
        };
        if seq == 1 {
            if stream
                .write_all(reply(&format!("v-{key}")).as_bytes())
                .is_err()
            {
                open.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            continue;
        }
        // Counted closed before the daemon can see a byte of the end (it
        // may close and reconnect as soon as it reads the stray reply).
        open.fetch_sub(1, Ordering::SeqCst);
        if let Second::StrayReply = second {
            let mut out = reply("wrong");
            out.push_str("HTTP/1.1 200 OK\r\n");
            let _ = stream.write_all(out.as_bytes());
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
}

/// With `max_connections = 1` (one worker), a server breaking the second
/// request on each connection makes every lookup after the first retry on
/// a fresh connection while the other lookups wait for the one connection.
/// The retry must take the slot its failed connection freed, never a
/// second one: the server never sees two connections at once, each key is
/// answered with its own value, and the counts are exact (one connection
/// per key; two requests per key but the first).
#[test]
fn retries_on_a_fresh_connection_keep_max_connections() {
    for second in [Second::Close, Second::StrayReply] {
        let server = SecondRequestServer::start(second);
        let port = free_port();
        let config = format!(
            r#"[daemon]
workers = 1
log_level = "info"

[maps.m]
tcp_listen = "127.0.0.1:{port}"
servers = ["{}"]
max_connections = 1
connect_timeout = "1s"
http_timeout = "2s"
lookup_timeout = "8s"
ttl = "0s"
negative_ttl = "0s"
stale_ttl = "0s"
"#,
            server.url()
        );
        let d = Daemon::start(&config, port);
        const N: usize = 20;
        let barrier = Arc::new(Barrier::new(N));
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut c = LineClient::connect(port);
                    barrier.wait();
                    let key = format!("k{i}@x");
                    let r = c.get(&key);
                    (key, r)
                })
            })
            .collect();
        let results: Vec<(String, String)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wrong: Vec<&(String, String)> = results
            .iter()
            .filter(|(k, r)| *r != format!("200 v-{k}\n"))
            .collect();
        let (accepted, requests, most) = (
            server.accepted.load(Ordering::SeqCst),
            server.requests.load(Ordering::SeqCst),
            server.most_open.load(Ordering::SeqCst),
        );
        eprintln!(
            "{second:?}: {N} lookups, {accepted} connections, {requests} requests, \
             at most {most} open at once; wrong: {wrong:?}"
        );
        assert!(wrong.is_empty(), "{second:?}: wrong answers {wrong:?}");
        assert_eq!(
            most,
            1,
            "{second:?}: max_connections = 1 but the server saw {most} connections at once; log:\n{}",
            d.stderr()
        );
        assert_eq!(accepted, N, "{second:?}: one connection per key");
        assert_eq!(
            requests,
            2 * N - 1,
            "{second:?}: every key but the first tried on the pooled connection, then a fresh one"
        );
    }
}
