//! The operational side of httpmapd, against the real binary: `--check`,
//! SIGHUP reload (valid, cache-keeping, refused), SIGTERM/SIGINT drain,
//! the SIGUSR1 counters line, the `stats_listen` endpoint (`/metrics`,
//! `/health`), secrets kept out of logs and metrics, and Unix socket files.
//!
//! Each test runs its own daemon and HTTP servers on free loopback ports and
//! waits by polling with deadlines, never by fixed sleeps alone.

mod common;

use common::{
    free_port, log_lines, metric, netstring, read_netstring, rss_kib, run_check, show,
    socket_inodes, stats_get, try_stats_request, unique_temp_dir, wait_until, Daemon, LineClient,
    Reply, StatsResponse, TestServer,
};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_httpmapd");

/// Bound on every poll below (generous for a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(5);

/// Waits until the daemon handles SIGHUP, SIGINT, SIGTERM and SIGUSR1, so a
/// test's signal never meets a default action even if the daemon's
/// listeners accept (and `Daemon::start` returns) before its handlers are
/// in place (as at 3728e72; see
/// `signal_right_after_the_port_accepts_does_not_kill_it`).
fn wait_signals_handled(d: &Daemon) {
    d.wait_handling(&[libc::SIGHUP, libc::SIGINT, libc::SIGTERM, libc::SIGUSR1]);
}

/// `Daemon::start`, then waits until the daemon handles its signals.
fn start(config: &str, ready_port: u16) -> Daemon {
    let d = Daemon::start(config, ready_port);
    wait_signals_handled(&d);
    let (ours, all) = (socket_inodes(d.pid()), listening_inodes(ready_port));
    assert!(
        all.iter().all(|i| ours.contains(i)),
        "another process listens on 127.0.0.1:{ready_port} too (SO_REUSEPORT): \
         this test's clients could reach it"
    );
    d
}

/// Whether a TCP connect to 127.0.0.1:port is refused (nobody listens).
fn refused(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

/// Inodes of the TCP sockets listening on `port` (any local address), from
/// /proc/net/tcp and /proc/net/tcp6.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue; // not LISTEN
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if local_port == Some(port) {
                out.extend(f[9].parse::<u64>().ok());
            }
        }
    }
    out
}

/// Whether process `pid` holds a TCP socket listening on `port`. (Asked of
/// /proc rather than by connecting: free ports are shared with the test
/// binaries running alongside, and SO_REUSEPORT lets another httpmapd of
/// the same user listen on the same port.)
fn listens(pid: u32, port: u16) -> bool {
    let mine = socket_inodes(pid);
    listening_inodes(port).iter().any(|i| mine.contains(i))
}

/// Asserts that the daemon does not listen on `port` and that a client's
/// connect is refused (unless another process has taken the port since).
fn assert_not_listening(pid: u32, port: u16) {
    assert!(!listens(pid, port), "httpmapd still listens on {port}");
    if !refused(port) {
        assert!(
            !listening_inodes(port).is_empty(),
            "127.0.0.1:{port} accepts a connection but nobody listens"
        );
        assert!(!listens(pid, port), "httpmapd listens on {port} again");
    }
}

/// Waits until the daemon stops listening on `port`, then as above.
fn wait_not_listening(d: &Daemon, port: u16) {
    let pid = d.pid();
    assert!(
        wait_until(WAIT, || !listens(pid, port)),
        "httpmapd still listens on 127.0.0.1:{port} after {WAIT:?}"
    );
    assert_not_listening(pid, port);
}

/// Reloads with the config `make(port)` for a fresh free port. If another
/// process took that port meanwhile (free ports are shared with every test
/// running alongside), the reload is refused with "cannot listen on
/// 127.0.0.1:PORT" and the old configuration keeps serving: then it tries
/// again with another port. Returns the port and the "reloaded" log line.
fn reload_on_fresh_port(d: &Daemon, make: impl Fn(u16) -> String) -> (u16, String) {
    for _ in 0..5 {
        let port = free_port();
        std::fs::write(&d.config_path, make(port)).unwrap();
        let refused = match d.reload() {
            Ok(line) => return (port, line),
            Err(refused) => refused,
        };
        assert!(
            refused.contains(&format!("cannot listen on 127.0.0.1:{port}: ")),
            "{refused}"
        );
    }
    panic!("no free port for the reload in 5 tries:\n{}", d.stderr());
}

/// A `HEAD` request's whole answer, as text.
fn http_head(port: u16, path: &str) -> String {
    let r = try_stats_request(port, "HEAD", path, WAIT)
        .unwrap_or_else(|e| panic!("HEAD {path} on the stats port: {e}"));
    format!("{}\r\n\r\n{}", r.head, r.body)
}

/// `GET path` on the stats port: the response, whose status line must be
/// HTTP/1.1 and whose `Content-Length` must match its body.
fn http_get(port: u16, path: &str) -> StatsResponse {
    let r = stats_get(port, path);
    assert!(
        r.head.starts_with("HTTP/1.1 "),
        "status line of {:?}",
        r.head
    );
    let len: usize = r
        .header("Content-Length")
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, r.body.len(), "Content-Length matches the body");
    r
}

/// Asserts that `text` has exactly this line.
fn assert_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing line {line:?} in:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// 1. --check
// ---------------------------------------------------------------------------

#[test]
fn check_accepts_a_valid_file_and_the_shipped_one() {
    let dir = unique_temp_dir("httpmapd-ops-check");
    let path = dir.join("good.toml");
    std::fs::write(
        &path,
        r#"[daemon]
workers = 2
socketmap_listen = ["127.0.0.1:10020", "unix:/run/httpmapd.sock"]
stats_listen = "127.0.0.1:10030"
unix_socket_mode = "0660"

[cache]
ttl = "5m"
negative_ttl = 60

[maps.virtual]
tcp_listen = "127.0.0.1:10021"
servers = ["http://127.0.0.1:8080/virtual", "http://127.0.0.1:8081/q?k={key}"]
http_timeout = "250ms"
headers = { Authorization = "Bearer s3cr3t-token" }

[maps.access]
servers = ["http://127.0.0.1:9000/access"]
result = "body"
"#,
    )
    .unwrap();
    let (code, out, err) = run_check(&path, &[]);
    assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, format!("{}: ok (2 map(s))\n", path.display()));
    assert_eq!(err, "", "nothing on stderr for a valid file");

    let shipped = common::crate_file("conf/httpmapd.toml");
    let (code, out, err) = run_check(&shipped, &[]);
    assert_eq!(code, 0, "conf/httpmapd.toml: stdout {out:?} stderr {err:?}");
    assert_eq!(out, format!("{}: ok (1 map(s))\n", shipped.display()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_prints_each_problem_with_its_line() {
    let dir = unique_temp_dir("httpmapd-ops-check");
    let path = dir.join("bad.toml");
    // Line 6: a bad server URL; line 7: a bad duration.
    std::fs::write(
        &path,
        "[daemon]\nworkers = 1\n\n[maps.virtual]\ntcp_listen = \"127.0.0.1:10021\"\n\
         servers = [\"http://127.0.0.1:8080/virtual\", \"ftp://x/\"]\n\
         http_timeout = \"3 parsecs\"\n",
    )
    .unwrap();
    let p = path.display().to_string();
    let (code, out, err) = run_check(&path, &[]);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "", "nothing on stdout for an invalid file");
    assert_eq!(
        err,
        format!(
            "{p}:6: servers: \"ftp://x/\": server URL must start with http:// or https://\n\
             {p}:7: http_timeout: invalid duration \"3 parsecs\": unknown unit \"parsecs\" (use ms, s, m, h or d, e.g. \"1m30s\")\n"
        )
    );

    // An unknown key, in [daemon] and in a map section: its own line.
    let unknown = dir.join("unknown.toml");
    std::fs::write(
        &unknown,
        "[daemon]\nworkers = 1\n\n[maps.virtual]\ntcp_listen = \"127.0.0.1:10021\"\n\
         servers = [\"http://127.0.0.1:8080/virtual\"]\nhttp_timeout = \"3s\"\nbogus_key = 1\n",
    )
    .unwrap();
    let (code, out, err) = run_check(&unknown, &[]);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:8: unknown field `bogus_key`",
            unknown.display()
        )),
        "{err}"
    );
    std::fs::write(
        &unknown,
        "[daemon]\nworkers = 1\nlog_levle = \"debug\"\n\n[maps.virtual]\n\
         tcp_listen = \"127.0.0.1:10021\"\nservers = [\"http://127.0.0.1:8080/virtual\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_check(&unknown, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "{}:3: unknown field `log_levle`",
            unknown.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// README: `--check` "prints each problem as FILE:LINE: message". An
/// unknown key must not hide the file's other problems (here a bad server
/// URL on line 6 and a bad duration on line 7). Regression: at 3728e72 only
/// the unknown key was printed.
#[test]
fn check_prints_every_problem_even_with_an_unknown_key() {
    let dir = unique_temp_dir("httpmapd-ops-check");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[daemon]\nworkers = 1\n\n[maps.virtual]\ntcp_listen = \"127.0.0.1:10021\"\n\
         servers = [\"ftp://x/\"]\nhttp_timeout = \"3 parsecs\"\nbogus_key = 1\n",
    )
    .unwrap();
    let p = path.display().to_string();
    let (code, _, err) = run_check(&path, &[]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "one line per problem:\n{err}");
    assert!(lines[0].starts_with(&format!("{p}:6: servers:")), "{err}");
    assert!(
        lines[1].starts_with(&format!("{p}:7: http_timeout:")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{p}:8: unknown field `bogus_key`")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_missing_file_exits_1_with_a_clear_message() {
    let dir = unique_temp_dir("httpmapd-ops-check");
    let path = dir.join("does-not-exist.toml");
    let (code, out, err) = run_check(&path, &[]);
    assert_eq!(code, 1, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    // The file and why, without a line number (there is no line to point at).
    assert_eq!(
        lines[0],
        format!(
            "{}: cannot read: No such file or directory (os error 2)",
            path.display()
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// 2-4. SIGHUP reload
// ---------------------------------------------------------------------------

#[test]
fn sighup_reload_keeps_client_connections_and_swaps_listeners_and_servers() {
    let s1 = TestServer::with_map(&[
        ("alice@example.com", "alice@one.example"),
        ("bob@example.com", "bob@one.example"),
    ]);
    let s2 = TestServer::start(|req| match (req.path.as_str(), req.key_str().as_str()) {
        ("/virtual", "alice@example.com") => Reply::found(b"alice@two.example"),
        ("/virtual", "carol@example.com") => Reply::found(b"carol@two.example"),
        ("/extra", "dave@example.com") => Reply::found(b"dave@extra.example"),
        _ => Reply::not_found(),
    });
    let (p_sm, p_virtual) = (free_port(), free_port());
    let before = format!(
        r#"[daemon]
workers = 2
socketmap_listen = "127.0.0.1:{p_sm}"

[maps.virtual]
tcp_listen = "127.0.0.1:{p_virtual}"
servers = ["{s1}"]
"#,
        s1 = s1.url("/virtual"),
    );
    let d = start(&before, p_virtual);
    d.wait_log("started:", WAIT);

    let mut c = LineClient::connect(p_virtual);
    assert_eq!(c.get("alice@example.com"), "200 alice@one.example\n",);
    let mut sm = LineClient::connect(p_sm);
    assert_eq!(
        show(&sm.socketmap_query("virtual", b"bob@example.com")),
        "OK bob@one.example"
    );
    assert_eq!(s1.requests(), 2);

    // New config: the socketmap listener goes, a map "extra" with its own
    // listener comes, and "virtual" moves to another server.
    let (p_extra, line) = reload_on_fresh_port(&d, |p_extra| {
        format!(
            r#"[daemon]
workers = 2

[maps.virtual]
tcp_listen = "127.0.0.1:{p_virtual}"
servers = ["{s2v}"]

[maps.extra]
tcp_listen = "127.0.0.1:{p_extra}"
servers = ["{s2e}"]
"#,
            s2v = s2.url("/virtual"),
            s2e = s2.url("/extra"),
        )
    });
    assert!(
        line.starts_with(&format!(
            "httpmapd: info: reloaded {}: 2 map(s), listening on ",
            d.config_path.display()
        )),
        "{line}"
    );
    assert!(
        line.ends_with("(1 listener(s) added, 1 removed; cache dropped for 1 map(s))"),
        "{line}"
    );

    // The removed listener stops accepting once every worker took the new
    // configuration (each worker had its own SO_REUSEPORT socket).
    wait_not_listening(&d, p_sm);

    // The same connection still works, now answered by the new server: the
    // cached answer of the old servers was dropped.
    assert_eq!(c.get("alice@example.com"), "200 alice@two.example\n",);
    assert_eq!(c.get("carol@example.com"), "200 carol@two.example\n",);
    assert_eq!(s1.requests(), 2, "the old server is not asked any more");
    assert_eq!(
        s2.keys(),
        vec![b"alice@example.com".to_vec(), b"carol@example.com".to_vec()]
    );

    // The new listener answers for its map.
    let mut e = LineClient::connect(p_extra);
    assert_eq!(e.get("dave@example.com"), "200 dave@extra.example\n",);
    assert_eq!(s2.paths().last().map(String::as_str), Some("/extra"));

    // A connection accepted on the removed listener before the reload stays
    // open and keeps being served (with the new configuration).
    assert_eq!(
        show(&sm.socketmap_query("virtual", b"carol@example.com")),
        "OK carol@two.example",
        "cached from the lookup above"
    );
    assert_eq!(
        show(&sm.socketmap_query("extra", b"dave@example.com")),
        "OK dave@extra.example"
    );
    assert_eq!(
        s2.requests(),
        3,
        "both socketmap answers came from the cache"
    );
    assert_not_listening(d.pid(), p_sm);
    // No error but a reload retried for a port taken by someone else.
    assert!(
        d.stderr()
            .lines()
            .all(|l| !l.contains("error:") || l.contains("Address already in use")),
        "{}",
        d.stderr()
    );
}

#[test]
fn sighup_reload_that_keeps_the_servers_keeps_the_cache() {
    let s = TestServer::with_map(&[
        ("alice@example.com", "alice@mail.example"),
        ("bob@example.com", "bob@mail.example"),
    ]);
    let port = free_port();
    let config = |timeout: &str| {
        format!(
            r#"[daemon]
workers = 2

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
http_timeout = "{timeout}"
"#,
            url = s.url("/virtual"),
        )
    };
    let d = start(&config("3s"), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example\n",);
    assert_eq!(c.get("nobody@example.com"), "500 not found\n");
    assert_eq!(s.requests(), 2);

    std::fs::write(&d.config_path, config("2s")).unwrap();
    let line = d.reload_ok();
    assert!(
        line.ends_with("(0 listener(s) added, 0 removed; cache dropped for 0 map(s))"),
        "{line}"
    );

    // Cached answers (found and not found) still come from the cache.
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example\n",);
    assert_eq!(c.get("nobody@example.com"), "500 not found\n");
    let mut c2 = LineClient::connect(port);
    assert_eq!(c2.get("Alice@Example.com"), "200 alice@mail.example\n",);
    assert_eq!(s.requests(), 2, "no new server request for cached keys");
    // A new key still reaches the (unchanged) server.
    assert_eq!(c.get("bob@example.com"), "200 bob@mail.example\n");
    assert_eq!(s.requests(), 3);
}

#[test]
fn sighup_with_an_invalid_file_is_refused_and_the_old_config_keeps_serving() {
    let s1 = TestServer::with_map(&[
        ("alice@example.com", "alice@one.example"),
        ("bob@example.com", "bob@one.example"),
    ]);
    let s2 = TestServer::with_map(&[("alice@example.com", "alice@two.example")]);
    let (port, other_port) = (free_port(), free_port());
    let d = start(
        &format!(
            r#"[daemon]
workers = 2

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
"#,
            url = s1.url("/virtual")
        ),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("alice@example.com"), "200 alice@one.example\n",);

    // Line 7 has an unknown key; the rest would move the map elsewhere.
    let bad = format!(
        "[daemon]\nworkers = 2\n\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{other_port}\"\n\
         servers = [\"{url}\"]\nhttp_timeuot = \"2s\"\n",
        url = s2.url("/virtual")
    );
    std::fs::write(&d.config_path, &bad).unwrap();
    d.reload().expect_err("the reload is refused");
    let log = d.stderr();
    let refused_lines = log_lines(&log, "reload refused");
    assert_eq!(refused_lines.len(), 1, "{log}");
    assert!(
        refused_lines[0].starts_with(&format!(
            "httpmapd: error: reload refused, the old configuration keeps serving: {}:7: unknown field `http_timeuot`",
            d.config_path.display()
        )),
        "{log}"
    );
    assert!(!log.contains("reloaded"), "{log}");

    // Old listener, old server, old cache.
    assert_eq!(c.get("alice@example.com"), "200 alice@one.example\n",);
    let mut c2 = LineClient::connect(port);
    assert_eq!(c2.get("bob@example.com"), "200 bob@one.example\n");
    assert_eq!(s1.requests(), 2);
    assert_eq!(s2.requests(), 0);
    assert_not_listening(d.pid(), other_port); // the refused config's listener

    // Fixing the file and reloading again works.
    let (other_port, _) = reload_on_fresh_port(&d, |p| {
        bad.replace("http_timeuot", "http_timeout")
            .replace(&format!(":{other_port}\""), &format!(":{p}\""))
    });
    assert!(
        wait_until(WAIT, || listens(d.pid(), other_port)),
        "new listener not opened"
    );
    wait_not_listening(&d, port);
    let mut c3 = LineClient::connect(other_port);
    assert_eq!(c3.get("alice@example.com"), "200 alice@two.example\n",);
    // The connection on the removed listener is still served.
    assert_eq!(c.get("alice@example.com"), "200 alice@two.example\n",);
    assert_eq!(s2.requests(), 1);
}

// ---------------------------------------------------------------------------
// 5. SIGTERM / SIGINT
// ---------------------------------------------------------------------------

#[test]
fn sigterm_finishes_lookups_in_flight_then_exits_0() {
    let s = TestServer::start(|req| {
        if req.key_str() == "slow@example.com" {
            Reply::found(b"slow@mail.example").delayed(Duration::from_millis(800))
        } else {
            Reply::found(b"quick@mail.example")
        }
    });
    let port = free_port();
    let mut d = start(
        &format!(
            r#"[daemon]
workers = 2

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
"#,
            url = s.url("/virtual")
        ),
        port,
    );
    let mut idle = LineClient::connect(port);
    assert_eq!(idle.get("quick@example.com"), "200 quick@mail.example\n",);

    let mut c = LineClient::connect(port);
    c.send(b"get slow@example.com\n");
    assert!(
        s.wait_for_requests(2, WAIT),
        "the slow lookup reached the server"
    );
    thread::sleep(Duration::from_millis(100));
    d.signal(libc::SIGTERM);

    // No new connections while draining.
    let pid = d.pid();
    wait_not_listening(&d, port);
    // The lookup in flight is answered, byte for byte.
    assert_eq!(show(&c.read_line()), "200 slow@mail.example\n");
    let status = d.wait_exit(WAIT).expect("httpmapd exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let log = d.stderr();
    assert_line(
        &log,
        "httpmapd: info: signal 15: stopping: no new connections, finishing lookups in flight",
    );
    assert!(log.ends_with("httpmapd: info: stopped\n"), "{log}");
    assert!(c.is_closed_by_peer(), "connections close at exit");
    assert!(idle.is_closed_by_peer(), "idle connections close at exit");
    assert_not_listening(pid, port);
    assert_eq!(s.requests(), 2);
}

#[test]
fn sigint_with_nothing_in_flight_exits_0_promptly() {
    let s = TestServer::with_map(&[("alice@example.com", "alice@mail.example")]);
    let (port, sm_port) = (free_port(), free_port());
    let mut d = start(
        &format!(
            r#"[daemon]
workers = 2
socketmap_listen = "127.0.0.1:{sm_port}"

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
"#,
            url = s.url("/virtual")
        ),
        port,
    );
    // Idle client connections do not hold the shutdown up.
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example\n",);
    let _sm = LineClient::connect(sm_port);
    let pid = d.pid();
    let t = Instant::now();
    d.signal(libc::SIGINT);
    let status = d
        .wait_exit(Duration::from_secs(2))
        .expect("httpmapd exits within 2 s of SIGINT");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let log = d.stderr();
    assert_line(
        &log,
        "httpmapd: info: signal 2: stopping: no new connections, finishing lookups in flight",
    );
    assert!(log.ends_with("httpmapd: info: stopped\n"), "{log}");
    assert_not_listening(pid, port);
    assert_not_listening(pid, sm_port);
}

// ---------------------------------------------------------------------------
// 6. SIGUSR1
// ---------------------------------------------------------------------------

#[test]
fn sigusr1_logs_one_counters_line() {
    let s = TestServer::start(|req| match req.key_str().as_str() {
        "alice@example.com" => Reply::found(b"alice@mail.example"),
        "busy@example.com" => Reply::status(503, "maintenance"),
        _ => Reply::not_found(),
    });
    let (port, stats) = (free_port(), free_port());
    // Ready on the stats port: no probe connection on the tcp_table listener.
    let d = start(
        &format!(
            r#"[daemon]
workers = 2
stats_listen = "127.0.0.1:{stats}"

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
"#,
            url = s.url("/virtual")
        ),
        stats,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example\n",);
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example\n",);
    assert_eq!(c.get("nobody@example.com"), "500 not found\n");
    assert_eq!(c.get("busy@example.com"), "400 maintenance\n");
    assert_eq!(s.requests(), 3);
    assert!(!d.stderr().contains("counters:"));

    d.signal(libc::SIGUSR1);
    let log = d.wait_log("counters:", WAIT);
    // Give a duplicate line (if any) a chance to show up.
    thread::sleep(Duration::from_millis(200));
    let log = if d.stderr().len() > log.len() {
        d.stderr()
    } else {
        log
    };
    let lines = log_lines(&log, "counters:");
    assert_eq!(lines.len(), 1, "{log}");
    assert_eq!(
        lines[0],
        "httpmapd: info: counters: connections_open=1 connections_total=1 requests=4 \
         found=2 not_found=1 temporary=1 stale=0 bad_requests=0 cache_entries=2 \
         cache_bytes=395 cache_hits=1 cache_misses=3 coalesced=0 evictions=0 refreshes=0"
    );
    // The daemon goes on serving.
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example\n",);
    d.signal(libc::SIGUSR1);
    assert!(
        wait_until(WAIT, || log_lines(&d.stderr(), "counters:").len() == 2),
        "{}",
        d.stderr()
    );
    let second = log_lines(&d.stderr(), "counters:").pop().unwrap();
    assert!(second.contains(" requests=5 found=3 "), "{second}");
    assert!(second.contains(" cache_hits=2 "), "{second}");
}

// ---------------------------------------------------------------------------
// 7. stats_listen: /metrics, /health, and secrets
// ---------------------------------------------------------------------------

/// Every sample's metric family has `# HELP` and `# TYPE` lines, in that
/// order, before its samples.
fn assert_families_documented(text: &str) {
    let mut help: Vec<String> = Vec::new();
    let mut types: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(!help.contains(&name), "HELP twice for {name}");
            assert!(
                rest.len() > name.len() + 1,
                "HELP for {name} has no text: {line:?}"
            );
            help.push(name);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap_or("").to_string();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind.as_str()),
                "{line:?}"
            );
            assert_eq!(
                help.last(),
                Some(&name),
                "# HELP {name} right before # TYPE"
            );
            types.push((name, kind));
        } else if line.starts_with('#') {
            panic!("unexpected comment line {line:?}");
        } else if !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = types.iter().find(|(n, k)| {
                n == name
                    || (k == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suf| name.strip_suffix(suf) == Some(n.as_str())))
            });
            let (fam, _) = family.unwrap_or_else(|| panic!("no # TYPE for sample {line:?}"));
            assert!(help.contains(fam), "no # HELP for {fam}");
            assert_eq!(
                &types.last().unwrap().0,
                fam,
                "sample {line:?} is not under its family's header"
            );
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        }
    }
    assert_eq!(help.len(), types.len(), "every HELP has a TYPE");
    // OpenMetrics names: a counter family is NAME_total, and no other
    // family may take NAME (a gauge `x` beside a counter `x_total` clashes).
    for (name, kind) in &types {
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name} without _total");
            let base = name.strip_suffix("_total").unwrap();
            assert!(
                !types.iter().any(|(n, _)| n == base),
                "family {base} clashes with counter {name}"
            );
        }
    }
    for want in [
        "httpmapd_build_info",
        "httpmapd_config_last_reload_successful",
        "httpmapd_config_last_reload_success_timestamp_seconds",
        "httpmapd_config_reloads_total",
        "httpmapd_cache_bytes",
        "httpmapd_cache_max_bytes",
        "httpmapd_cache_max_entries",
        "httpmapd_server_protocol_errors_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "httpmapd_lookups_total",
        "httpmapd_cache_hits_total",
        "httpmapd_cache_misses_total",
        "httpmapd_cache_coalesced_total",
        "httpmapd_cache_evictions_total",
        "httpmapd_cache_refreshes_total",
        "httpmapd_cache_entries",
        "httpmapd_server_requests_total",
        "httpmapd_server_up",
        "httpmapd_fetch_duration_seconds",
        "httpmapd_server_request_duration_seconds",
        "httpmapd_client_connections_open",
        "httpmapd_client_connections_total",
        "httpmapd_requests_total",
        "httpmapd_bad_requests_total",
    ] {
        assert!(help.iter().any(|h| h == want), "family {want} missing");
    }
}

/// A histogram's `_bucket` lines are cumulative and end at `_count`.
fn assert_histogram(text: &str, name: &str, labels: &str, count: u64) {
    let prefix = format!("{name}_bucket{{{labels},le=\"");
    let buckets: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, v) = rest.split_once("\"} ").unwrap();
            (le.to_string(), v.parse().unwrap())
        })
        .collect();
    // 18 bounds up to 100 s (past any lookup_timeout, which stays under
    // Postfix's 100 s) and +Inf.
    assert_eq!(buckets.len(), 19, "{name}{{{labels}}} buckets:\n{text}");
    assert_eq!(buckets[17].0, "100", "the top bound: {buckets:?}");
    assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), count));
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "not cumulative: {buckets:?}"
    );
    assert_line(text, &format!("{name}_count{{{labels}}} {count}"));
    assert!(metric(text, &format!("{name}_sum{{{labels}}}")) >= 0.0);
}

#[test]
fn stats_endpoint_metrics_health_and_secret_headers() {
    const SECRET: &str = "s3cr3t-token";
    let s = TestServer::start(|req| match req.key_str().as_str() {
        "a@example.com" => Reply::found(b"alice@mail.example"),
        "b@example.com" => Reply::found(b"bob@mail.example"),
        "c@example.com" => Reply::found(b"carol@mail.example"),
        "busy@example.com" => Reply::status(503, "maintenance"),
        _ => Reply::not_found(),
    });
    let url = s.url("/virtual");
    let (port, stats) = (free_port(), free_port());
    let mut d = start(
        &format!(
            r#"[daemon]
workers = 2
stats_listen = "127.0.0.1:{stats}"
log_level = "debug"

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
connect_timeout = "500ms"
http_timeout = "1s"
lookup_timeout = "3s"
retry_interval = "10s"
headers = {{ Authorization = "Bearer {SECRET}" }}
"#
        ),
        stats,
    );

    // Before any lookup.
    let h = http_get(stats, "/health");
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.body, "ok\nmap virtual: 1/1 servers up\n");
    let m = http_get(stats, "/metrics");
    assert_eq!(m.status, 200);
    assert_families_documented(&m.body);
    assert_line(
        &m.body,
        "httpmapd_lookups_total{map=\"virtual\",outcome=\"found\"} 0",
    );

    let mut c = LineClient::connect(port);
    for (key, want) in [
        ("a@example.com", "200 alice@mail.example\n"),
        ("b@example.com", "200 bob@mail.example\n"),
        ("c@example.com", "200 carol@mail.example\n"),
        ("x@example.com", "500 not found\n"),
        ("y@example.com", "500 not found\n"),
        ("busy@example.com", "400 maintenance\n"),
        ("a@example.com", "200 alice@mail.example\n"), // a cache hit
    ] {
        assert_eq!(c.get(key), want);
    }
    assert_eq!(s.requests(), 6);
    for r in s.request_log() {
        assert_eq!(
            r.header("Authorization"),
            Some(format!("Bearer {SECRET}").as_bytes()),
            "the configured header reached the server"
        );
    }

    let m = http_get(stats, "/metrics");
    assert_eq!(m.status, 200);
    let ctype = m.header("Content-Type").expect("Content-Type");
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "Content-Type {ctype:?}"
    );
    let t = &m.body;
    assert_families_documented(t);
    let srv = format!("map=\"virtual\",server=\"{url}\"");
    for line in [
        // Cache hits are found lookups too: 3 fetched + 1 hit.
        "httpmapd_lookups_total{map=\"virtual\",outcome=\"found\"} 4".to_string(),
        "httpmapd_lookups_total{map=\"virtual\",outcome=\"not_found\"} 2".to_string(),
        "httpmapd_lookups_total{map=\"virtual\",outcome=\"temporary\"} 1".to_string(),
        "httpmapd_lookups_total{map=\"virtual\",outcome=\"stale\"} 0".to_string(),
        "httpmapd_cache_hits_total{map=\"virtual\"} 1".to_string(),
        "httpmapd_cache_misses_total{map=\"virtual\"} 6".to_string(),
        "httpmapd_cache_coalesced_total 0".to_string(),
        "httpmapd_cache_evictions_total 0".to_string(),
        "httpmapd_cache_refreshes_total 0".to_string(),
        "httpmapd_requests_total 7".to_string(),
        "httpmapd_bad_requests_total 0".to_string(),
        "httpmapd_client_connections_open 1".to_string(),
        "httpmapd_client_connections_total 1".to_string(),
        format!(
            "httpmapd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "httpmapd_config_last_reload_successful 1".to_string(),
        "httpmapd_config_reloads_total{result=\"success\"} 0".to_string(),
        "httpmapd_config_reloads_total{result=\"failure\"} 0".to_string(),
        // 3 found + 2 not found; a temporary error is not cached.
        "httpmapd_cache_entries{map=\"virtual\"} 5".to_string(),
        format!("httpmapd_server_requests_total{{{srv},outcome=\"ok\"}} 5"),
        format!("httpmapd_server_requests_total{{{srv},outcome=\"http_error\"}} 1"),
        format!("httpmapd_server_requests_total{{{srv},outcome=\"failure\"}} 0"),
        format!("httpmapd_server_up{{{srv}}} 1"),
    ] {
        assert_line(t, &line);
    }
    // The process: this daemon's pid, started within the last minutes.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = metric(t, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "started {started}, now {now}"
    );
    let rss = metric(t, "process_resident_memory_bytes");
    let vm_rss_kib = rss_kib(d.pid()) as f64;
    assert!(
        (rss / 1024.0 - vm_rss_kib).abs() < vm_rss_kib / 2.0,
        "process_resident_memory_bytes {rss} vs VmRSS {vm_rss_kib} KiB"
    );
    let fds = metric(t, "process_open_fds");
    let open_now = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count() as f64;
    assert!(
        (fds - open_now).abs() <= 4.0,
        "process_open_fds {fds}, /proc says {open_now}"
    );
    assert!(metric(t, "process_max_fds") >= fds);
    // HEAD: the same head, no body.
    let head = http_head(stats, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head:?}");
    assert!(head.ends_with("\r\n\r\n"), "no body after a HEAD: {head:?}");
    // One fetch per miss (the 503 included); one server request each.
    assert_histogram(t, "httpmapd_fetch_duration_seconds", "map=\"virtual\"", 6);
    assert_histogram(t, "httpmapd_server_request_duration_seconds", &srv, 6);

    let h = http_get(stats, "/health");
    assert_eq!(h.status, 200, "{}", h.body);
    assert!(h.body.starts_with("ok"), "{}", h.body);
    assert_eq!(h.body, "ok\nmap virtual: 1/1 servers up\n");
    let nope = http_get(stats, "/nope");
    assert_eq!(nope.status, 404);

    // The only server goes away; a lookup fails and the server rests.
    drop(s);
    let reply = c.query(b"get down@example.com\n");
    assert!(
        reply.starts_with(b"400 ") && reply.ends_with(b"\n"),
        "a temporary error, got {:?}",
        show(&reply)
    );
    assert!(d
        .wait_log("is down", WAIT)
        .contains(&format!("server {url} (map virtual) is down: ")));
    let h = http_get(stats, "/health");
    assert_eq!(h.status, 503, "{}", h.body);
    assert_eq!(h.body, "degraded\nmap virtual: 0/1 servers up\n");
    let m = http_get(stats, "/metrics");
    let t = &m.body;
    assert_families_documented(t);
    for line in [
        format!("httpmapd_server_up{{{srv}}} 0"),
        format!("httpmapd_server_requests_total{{{srv},outcome=\"failure\"}} 1"),
        format!("httpmapd_server_requests_total{{{srv},outcome=\"ok\"}} 5"),
        "httpmapd_lookups_total{map=\"virtual\",outcome=\"temporary\"} 2".to_string(),
        "httpmapd_cache_entries{map=\"virtual\"} 5".to_string(),
    ] {
        assert_line(t, &line);
    }

    // The secret is nowhere: not in the log (debug level, after failures),
    // not in /metrics or /health.
    let log = d.stderr();
    for (what, text) in [
        ("stderr", log.as_str()),
        ("/metrics", t.as_str()),
        ("/health", h.body.as_str()),
    ] {
        assert!(!text.contains(SECRET), "{what} shows the secret:\n{text}");
        assert!(!text.contains("Bearer"), "{what} shows the header:\n{text}");
    }
    // SIGUSR1 and a refused reload do not show it either.
    d.signal(libc::SIGUSR1);
    d.wait_log("counters:", WAIT);
    let cfg = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(&d.config_path, format!("{cfg}bogus = 1\n")).unwrap();
    d.reload().expect_err("the reload is refused");
    let log = d.stderr();
    assert!(!log.contains(SECRET), "{log}");
    // The refused reload shows in the metrics (recorded right after its log line).
    let deadline = std::time::Instant::now() + WAIT;
    let t = loop {
        let t = http_get(stats, "/metrics").body;
        if t.contains("httpmapd_config_last_reload_successful 0")
            || std::time::Instant::now() > deadline
        {
            break t;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_line(&t, "httpmapd_config_last_reload_successful 0");
    assert_line(&t, "httpmapd_config_reloads_total{result=\"failure\"} 1");
    assert!(d.child.try_wait().unwrap().is_none(), "still running");
}

// ---------------------------------------------------------------------------
// 8. Unix socketmap listener files
// ---------------------------------------------------------------------------

fn unix_config(sock: &Path, port: u16, url: &str) -> String {
    format!(
        r#"[daemon]
workers = 2
socketmap_listen = "unix:{}"
unix_socket_mode = "0660"

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
"#,
        sock.display()
    )
}

#[test]
fn unix_socket_has_its_mode_and_goes_away_at_exit() {
    let s = TestServer::with_map(&[("alice@example.com", "alice@mail.example")]);
    let dir = unique_temp_dir("httpmapd-ops-unix");
    let sock = dir.join("httpmapd.sock");
    let port = free_port();
    let mut d = start(&unix_config(&sock, port, &s.url("/virtual")), port);
    let meta = std::fs::symlink_metadata(&sock).expect("socket file exists");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);

    let mut u = UnixStream::connect(&sock).expect("connect to the Unix socket");
    u.set_read_timeout(Some(WAIT)).unwrap();
    u.write_all(&netstring(b"virtual alice@example.com"))
        .unwrap();
    assert_eq!(show(&read_netstring(&mut u)), "OK alice@mail.example");
    u.write_all(&netstring(b"virtual nobody@example.com"))
        .unwrap();
    assert_eq!(show(&read_netstring(&mut u)), "NOTFOUND ");

    d.signal(libc::SIGTERM);
    let status = d.wait_exit(WAIT).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.stderr());
    assert!(
        std::fs::symlink_metadata(&sock).is_err(),
        "socket file removed at exit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unix_socket_stale_file_is_replaced() {
    let s = TestServer::with_map(&[("alice@example.com", "alice@mail.example")]);
    let dir = unique_temp_dir("httpmapd-ops-unix");
    let sock = dir.join("httpmapd.sock");
    // A socket file nobody listens on any more (a crashed daemon's).
    drop(UnixListener::bind(&sock).unwrap());
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    // Stale: nobody accepts. (A process forked meanwhile by another test
    // holds the listener until its exec closes it: wait for that.)
    assert!(
        wait_until(WAIT, || UnixStream::connect(&sock).is_err()),
        "the socket file is not stale"
    );

    let port = free_port();
    let d = start(&unix_config(&sock, port, &s.url("/virtual")), port);
    let mut u = UnixStream::connect(&sock).expect("the daemon listens on the path");
    u.set_read_timeout(Some(WAIT)).unwrap();
    u.write_all(&netstring(b"virtual alice@example.com"))
        .unwrap();
    assert_eq!(show(&read_netstring(&mut u)), "OK alice@mail.example");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777,
        0o660
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unix_socket_in_use_by_a_live_listener_prevents_start_with_exit_2() {
    let s = TestServer::with_map(&[("alice@example.com", "alice@mail.example")]);
    let dir = unique_temp_dir("httpmapd-ops-unix");
    let sock = dir.join("httpmapd.sock");
    let live = UnixListener::bind(&sock).unwrap();
    let port = free_port();
    let cfg = dir.join("httpmapd.toml");
    std::fs::write(&cfg, unix_config(&sock, port, &s.url("/virtual"))).unwrap();
    let err_path = dir.join("stderr.log");
    let mut child = Command::new(BIN)
        .arg("-c")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn httpmapd");
    let mut status = None;
    wait_until(WAIT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("httpmapd started on a live socket:\n{err}"));
    assert_eq!(status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "httpmapd: cannot listen on unix:{}: ",
            sock.display()
        )),
        "{err}"
    );
    assert!(lines[0].contains("in use"), "{err}");
    // The other process's socket is left alone, and nothing else was opened.
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    UnixStream::connect(&sock).expect("still the live listener's socket");
    assert!(live.accept().is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Start-up: signals
// ---------------------------------------------------------------------------

/// Once a listener accepts connections (all a client, a readiness probe or
/// systemd's `Type=simple` can see of "started"), a SIGHUP (`systemctl
/// reload`) or SIGTERM must be handled, not take its default action and kill
/// the daemon. Regression: at 3728e72 the handlers were installed after
/// every listener, poll and worker thread was set up, and this killed the
/// daemon every time. Many workers widen that window.
#[test]
fn signal_right_after_the_port_accepts_does_not_kill_it() {
    let s = TestServer::with_map(&[("alice@example.com", "alice@mail.example")]);
    let dir = unique_temp_dir("httpmapd-ops-early");
    for round in 0..5 {
        let port = free_port();
        let cfg = dir.join(format!("httpmapd-{round}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[daemon]\nworkers = 128\n\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{port}\"\n\
                 servers = [\"{}\"]\nmax_connections = 128\n",
                s.url("/virtual")
            ),
        )
        .unwrap();
        let err_path = dir.join(format!("stderr-{round}.log"));
        let mut child = Command::new(BIN)
            .arg("-c")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("spawn httpmapd");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < deadline, "never listened");
            if child.try_wait().unwrap().is_some() {
                panic!(
                    "exited before listening: {}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
        }
        // Ready as far as any client can tell: reload it.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
        let mut died = None;
        let reloaded = wait_until(WAIT, || {
            if let Some(st) = child.try_wait().unwrap() {
                died = Some(st);
                return true;
            }
            std::fs::read_to_string(&err_path)
                .unwrap_or_default()
                .contains("reloaded")
        });
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            died.is_none(),
            "round {round}: SIGHUP right after the port accepted killed httpmapd ({}); stderr:\n{log}",
            died.unwrap()
        );
        assert!(reloaded, "round {round}: no reload logged:\n{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second httpmapd given a TCP address the first one listens on must
/// fail with "cannot listen" and exit 2, as it does for a live Unix socket
/// (`unix_socket_in_use_by_a_live_listener_prevents_start_with_exit_2`).
/// Regression: at 3728e72 it started and silently shared the address
/// (listeners are bound with SO_REUSEPORT, which any process of the same
/// user may join), Postfix's connections spread over two daemons.
#[test]
fn second_daemon_on_the_same_tcp_port_fails_to_start() {
    let s1 = TestServer::with_map(&[("alice@example.com", "alice@one.example")]);
    let s2 = TestServer::with_map(&[("alice@example.com", "alice@two.example")]);
    let port = free_port();
    let config = |url: String| {
        format!(
            "[daemon]\nworkers = 2\n\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{port}\"\n\
             servers = [\"{url}\"]\n"
        )
    };
    let first = start(&config(s1.url("/virtual")), port);
    let dir = unique_temp_dir("httpmapd-ops-second");
    let cfg = dir.join("httpmapd.toml");
    std::fs::write(&cfg, config(s2.url("/virtual"))).unwrap();
    let err_path = dir.join("stderr.log");
    let mut child = Command::new(BIN)
        .arg("-c")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn the second httpmapd");
    let mut status = None;
    // A failed start is immediate; a started daemon would run on.
    wait_until(Duration::from_secs(2), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let second_listens = listens(child.id(), port);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.unwrap_or_else(|| {
        panic!(
            "a second httpmapd started on 127.0.0.1:{port} (listening there too: \
             {second_listens}); its stderr:\n{err}"
        )
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.starts_with(&format!("httpmapd: cannot listen on 127.0.0.1:{port}: ")),
        "{err}"
    );
    assert!(
        listens(first.pid(), port),
        "the first daemon keeps its port"
    );
}
