//! Hostile peers against the real `httpmapd` binary (issue #7): clients that
//! send over-long lines, junk and broken netstrings; ten thousand
//! connections; `max_clients` and `allow_from`; HTTP servers that break every
//! limit of the response parser, trickle, or send bytes Postfix must get
//! `%XX`-encoded. Raw sockets on loopback only; every test runs its own
//! daemon and servers on free ports.
//!
//! What the daemon must do, in short: a client's bad request costs that
//! client a `400` (tcp_table) or its connection, never the daemon's memory or
//! other clients' service; a server's bad reply is a temporary error (`400`,
//! mail deferred), never `500` (not found: bounced) nor `200`; and every
//! repeated problem is logged once per interval, not once per event.

mod common;

use common::{
    assert_temp, client_sockets, count_lines, cpu_ticks, free_port, open_fds, proc_status_kib,
    quoted_list, rss_kib, show, socket_inodes, Acceptor, Daemon, LineClient, Reply, Request,
    TestServer,
};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{RwLock, RwLockReadGuard};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The ten-thousand-connection test runs alone (write lock); every other
/// test holds a read lock. Its 10,000 connects take as many ephemeral
/// ports: a port another test got from `free_port()` could be taken as a
/// connection's local port before that test's daemon binds it.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared_slot() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

/// One `[maps.NAME]` section on tcp port `port`, short timeouts; `extra`
/// is more TOML for the section (later keys may not repeat earlier ones,
/// so timeouts given in `extra` replace the defaults here).
fn map_section(name: &str, port: u16, servers: &[String], extra: &str) -> String {
    let mut s = format!(
        "\n[maps.{name}]\ntcp_listen = \"127.0.0.1:{port}\"\nservers = [{}]\n",
        quoted_list(servers)
    );
    for (key, default) in [
        ("connect_timeout", "\"500ms\""),
        ("http_timeout", "\"3s\""),
        ("lookup_timeout", "\"5s\""),
        ("retry_interval", "\"1s\""),
    ] {
        if !extra.contains(&format!("{key} =")) {
            s += &format!("{key} = {default}\n");
        }
    }
    s + extra + "\n"
}

/// `[daemon]` with two workers plus `extra`.
fn daemon_section(extra: &str) -> String {
    format!("[daemon]\nworkers = 2\n{extra}\n")
}

/// A server answering `v-KEY` for every key up to 100 bytes, `long-N` for
/// a key of N bytes over that (found), keep-alive.
fn echo_server() -> TestServer {
    TestServer::start(|req: &Request| {
        let key = req.key.as_deref().unwrap_or_default();
        if key.len() > 100 {
            return Reply::found(format!("long-{}", key.len()).as_bytes());
        }
        let mut v = b"v-".to_vec();
        v.extend_from_slice(key);
        Reply::found(&v)
    })
}

/// Peak RSS of PID (/proc/PID/status VmHWM), in KiB.
fn hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

/// Resets PID's peak RSS to its current RSS (clear_refs "5"). Fails the
/// test when not permitted: the peak would be an older, higher one, and
/// the peak is what the test checks.
fn reset_hwm(pid: u32) {
    let path = format!("/proc/{pid}/clear_refs");
    if let Err(e) = std::fs::write(&path, "5") {
        panic!(
            "\n{}: FAILED: cannot reset the daemon's peak RSS (write \"5\" to {path}: {e}), \
             so its peak cannot be measured: run the tests where /proc/PID/clear_refs \
             is writable (a kernel with CONFIG_PROC_PAGE_MONITOR; ptrace access to \
             one's own child).\n",
            common::test_name()
        );
    }
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Raises this process's open-files soft limit to its hard limit; returns
/// the soft limit now in force.
fn raise_nofile_limit() -> u64 {
    httpmapd::daemon::raise_nofile_limit()
}

/// Raises RLIMIT_NOFILE to at least `want`: the soft limit to the hard one
/// and, when the hard one is lower and this process may raise it (root,
/// CAP_SYS_RESOURCE), both to `want`. Returns the soft limit now in force.
fn raise_nofile_limit_to(want: u64) -> u64 {
    let limit = raise_nofile_limit();
    if limit >= want {
        return limit;
    }
    let rl = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit with a valid, initialised struct; on failure (not
    // permitted) nothing changes.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    raise_nofile_limit()
}

/// How a raw read ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The peer closed (EOF) or reset the connection.
    Closed,
    /// Nothing for the whole timeout, connection still open.
    Silent,
}

/// A raw client socket that never panics on EOF, reset or silence.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = s.set_nodelay(true);
        Raw { s, buf: Vec::new() }
    }

    fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    /// Reads once; Ok(false) on EOF/reset, Err(End::Silent) on timeout.
    fn fill(&mut self, timeout: Duration) -> Result<bool, End> {
        self.s
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut chunk = [0u8; 16384];
        match self.s.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(End::Silent)
            }
            Err(_) => Ok(false),
        }
    }

    /// One line (with its '\n'), or how the connection ended first.
    fn line(&mut self, timeout: Duration) -> Result<Vec<u8>, End> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(End::Silent);
            }
            if !self.fill(left)? {
                return Err(End::Closed);
            }
        }
    }

    /// Everything until the peer closes; `Err` with what came if it stays
    /// open for `timeout`.
    fn until_closed(&mut self, timeout: Duration) -> Result<Vec<u8>, Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::mem::take(&mut self.buf));
            }
            match self.fill(left) {
                Ok(true) => {}
                Ok(false) => return Ok(std::mem::take(&mut self.buf)),
                Err(_) => return Err(std::mem::take(&mut self.buf)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Client side
// ---------------------------------------------------------------------------

/// A tcp_table daemon for one map served by `server`.
fn tcp_daemon(server: &TestServer, daemon_extra: &str, map_extra: &str) -> (Daemon, u16) {
    let port = free_port();
    let cfg = daemon_section(daemon_extra)
        + &map_section("virtual", port, &[server.url("/virtual")], map_extra);
    (Daemon::start(&cfg, port), port)
}

#[test]
fn over_long_request_line_gets_400_then_close() {
    let _slot = shared_slot();
    let server = echo_server();
    for limit in [4096usize, 100] {
        let extra = if limit == 4096 {
            String::new() // the default
        } else {
            format!("max_request_bytes = {limit}")
        };
        let (_d, port) = tcp_daemon(&server, &extra, "");
        // A line of exactly `limit` bytes (newline included) is served.
        let key = "k".repeat(limit - 5);
        let mut c = Raw::connect(port);
        c.send(format!("get {key}\n").as_bytes()).unwrap();
        let reply = c.line(Duration::from_secs(10)).expect("a reply");
        let want = if key.len() > 100 {
            format!("200 long-{}\n", key.len())
        } else {
            format!("200 v-{key}\n")
        };
        assert_eq!(show(&reply), want, "limit {limit}");
        // One byte more: 400 with the reason, then the connection closes.
        c.send(format!("get {key}k\nget next\n").as_bytes())
            .unwrap();
        let reply = c.line(Duration::from_secs(10)).expect("a reply");
        assert_eq!(
            show(&reply),
            format!("400 request%20line%20longer%20than%20{limit}%20bytes\n"),
            "limit {limit}"
        );
        let rest = c
            .until_closed(Duration::from_secs(5))
            .unwrap_or_else(|got| panic!("limit {limit}: still open after the 400 (got {got:?})"));
        assert_eq!(rest, b"", "nothing after the 400 (limit {limit})");
        // The next line was never looked up.
        assert!(
            !server.keys().iter().any(|k| k == b"next"),
            "limit {limit}: a line after the over-long one was served"
        );
    }
}

#[test]
fn a_mebibyte_without_newline_is_not_buffered() {
    let _slot = shared_slot();
    const CONNS: usize = 4;
    const TOTAL: usize = 1 << 20;
    let server = echo_server();
    let (d, port) = tcp_daemon(&server, "", "");
    let pid = d.pid();
    // Warm up (first lookups allocate pools, cache shards, buffers).
    let mut warm = LineClient::connect(port);
    for i in 0..20 {
        assert_eq!(warm.get(&format!("w{i}")), format!("200 v-w{i}\n"));
    }
    reset_hwm(pid);
    let before = rss_kib(pid);
    let writers: Vec<_> = (0..CONNS)
        .map(|_| {
            let c = Raw::connect(port);
            let mut w = c.s.try_clone().unwrap();
            w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let h = thread::spawn(move || {
                let chunk = vec![b'x'; 16 * 1024];
                let mut written = 0;
                let mut first = true;
                while written < TOTAL {
                    let piece: &[u8] = if first { b"get " } else { &chunk };
                    first = false;
                    match w.write(piece) {
                        Ok(n) => written += n,
                        Err(e) => return (written, Some(e.kind())),
                    }
                }
                (written, None)
            });
            (c, h)
        })
        .collect();
    let started = Instant::now();
    let mut results = Vec::new();
    for (mut c, h) in writers {
        let reply = c
            .line(Duration::from_secs(10))
            .expect("a 400 before the close");
        assert_eq!(
            show(&reply),
            "400 request%20line%20longer%20than%204096%20bytes\n"
        );
        let rest = c
            .until_closed(Duration::from_secs(10))
            .unwrap_or_else(|got| panic!("still open after the 400 (got {got:?})"));
        assert_eq!(rest, b"");
        results.push(h.join().unwrap());
    }
    let elapsed = started.elapsed();
    let after = rss_kib(pid);
    let peak = hwm_kib(pid);
    eprintln!(
        "1 MiB without newline x{CONNS}: replies+close in {elapsed:?}; written (bytes, error) {results:?}; daemon RSS {before} -> {after} KiB, peak {peak} KiB"
    );
    // The daemon reads at most max_request_bytes of a line: holding even one
    // of these MiBs, even for a moment, would show in its peak RSS (the
    // kernel's buffers are not the daemon's). What the writers got through
    // before the reset varies with loopback autotuning; it sat in kernel
    // buffers.
    assert!(
        after <= before + 1024,
        "daemon RSS grew from {before} to {after} KiB: it kept the over-long lines"
    );
    assert!(
        peak <= before + 1024,
        "daemon peak RSS went from {before} to {peak} KiB: it buffered the over-long lines"
    );
    // And it still serves.
    assert_eq!(warm.get("after"), "200 v-after\n");
}

#[test]
fn lines_that_are_not_requests_get_400_and_the_next_line_is_served() {
    let _slot = shared_slot();
    let server = echo_server();
    let (d, port) = tcp_daemon(&server, "", "");
    let not_get = "400 unsupported%20request%20(only%20\"get%20KEY\")\n";
    let cases: &[(&[u8], &str)] = &[
        (b"put alice x\n", not_get),
        (b"junk\n", not_get),
        (b"\0\0\0\n", not_get),
        (b"\0get alice\n", not_get),
        (b"GET alice\n", not_get),
        (b"getalice\n", not_get),
        (b"\xff\xfe\x00\n", not_get),
        (b"\r\n", not_get),
        (b"get\n", "400 empty%20key\n"),
        (b"get \t \r\n", "400 empty%20key\n"),
        (
            b"get %zz\n",
            "400 malformed%20%25XX%20escape%20at%20byte%204\n",
        ),
    ];
    // One at a time, each followed by a good lookup on the same connection.
    let mut c = Raw::connect(port);
    for (i, (bad, want)) in cases.iter().enumerate() {
        c.send(bad).unwrap();
        let reply = c.line(Duration::from_secs(10)).expect("a reply");
        assert_eq!(show(&reply), *want, "for {:?}", show(bad));
        c.send(format!("get ok{i}\n").as_bytes()).unwrap();
        let reply = c.line(Duration::from_secs(10)).expect("a reply");
        assert_eq!(
            show(&reply),
            format!("200 v-ok{i}\n"),
            "after {:?}",
            show(bad)
        );
    }
    // All pipelined in one write, good and bad interleaved: answers in order.
    let mut all = Vec::new();
    let mut want = Vec::new();
    for (i, (bad, w)) in cases.iter().enumerate() {
        all.extend_from_slice(bad);
        want.push(w.to_string());
        all.extend_from_slice(format!("get p{i}\n").as_bytes());
        want.push(format!("200 v-p{i}\n"));
    }
    let mut c = Raw::connect(port);
    c.send(&all).unwrap();
    for w in &want {
        let reply = c.line(Duration::from_secs(10)).expect("a reply");
        assert_eq!(show(&reply), *w);
    }
    // 22 bad requests within seconds: one log line (rate-limited), naming
    // the client and its map.
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["bad tcp_table request from 127.0.0.1:"]),
        1,
        "stderr:\n{log}"
    );
    assert_eq!(count_lines(&log, &["bad "]), 1, "stderr:\n{log}");
    assert!(log.contains("(map virtual): "), "stderr:\n{log}");
}

/// A daemon with a socketmap listener; returns (daemon, socketmap port).
fn socketmap_daemon(server: &TestServer) -> (Daemon, u16) {
    let sm_port = free_port();
    let tcp_port = free_port();
    let cfg = daemon_section(&format!("socketmap_listen = \"127.0.0.1:{sm_port}\""))
        + &map_section("virtual", tcp_port, &[server.url("/virtual")], "");
    (Daemon::start(&cfg, sm_port), sm_port)
}

#[test]
fn socketmap_malformed_or_absurd_netstrings_close_the_connection() {
    let _slot = shared_slot();
    let server = echo_server();
    let (d, port) = socketmap_daemon(&server);
    // Malformed: closed without a reply (the stream cannot be resynchronised).
    let malformed: &[&[u8]] = &[
        b"abc:",
        b":",
        b"-1:x,",
        b"+5:virtual,",
        b" 9:virtual a,",
        b"3 :abc,",
        b"9:virtual a;",
        b"9:virtual abc",
        b"\0\0\0\0",
        b"000000000000000000000000001:x,",
    ];
    for bad in malformed {
        let mut c = Raw::connect(port);
        c.send(bad).unwrap();
        let got = c
            .until_closed(Duration::from_secs(5))
            .unwrap_or_else(|got| panic!("{:?}: still open (got {:?})", show(bad), show(&got)));
        assert_eq!(show(&got), "", "for {:?}", show(bad));
    }
    // Absurd lengths: answered with a PERM saying why, then closed; the
    // daemon does not wait for (nor buffer) the announced bytes.
    for bad in [
        &b"99999999999999999999999:"[..],
        b"10001:",
        b"18446744073709551616:virtual a,",
    ] {
        let mut c = Raw::connect(port);
        c.send(bad).unwrap();
        let _ = c.send(&vec![b'z'; 64 * 1024]);
        let got = c
            .until_closed(Duration::from_secs(5))
            .unwrap_or_else(|got| panic!("{:?}: still open (got {:?})", show(bad), show(&got)));
        let got = show(&got);
        let payload = got
            .split_once(':')
            .map(|(_, p)| p.trim_end_matches(','))
            .unwrap_or("");
        assert!(
            payload.starts_with("PERM query too long: netstring length "),
            "for {:?}: got {got:?}",
            show(bad)
        );
    }
    // Others are still served.
    let mut c = LineClient::connect(port);
    assert_eq!(c.socketmap_query("virtual", b"alice"), b"OK v-alice");
    // Thirteen bad connections within seconds: one log line, naming the client.
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["bad socketmap request from 127.0.0.1:"]),
        1,
        "stderr:\n{log}"
    );
    assert!(
        log.contains("malformed netstring"),
        "the log line says why; stderr:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 2. Connections
// ---------------------------------------------------------------------------

#[test]
fn ten_thousand_connections_are_held_and_served() {
    const N: usize = 10_000;
    let _alone = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    // This process holds N client sockets (plus the test server's and other
    // tests'); the daemon, a child, inherits the raised limit and holds N
    // accepted sockets of its own.
    let need = (N + 600) as u64;
    let limit = raise_nofile_limit_to(need);
    assert!(
        limit >= need,
        "\n{}: FAILED: {N} connections need {need} open files, but RLIMIT_NOFILE \
         is {limit} and this process may not raise it (that needs CAP_SYS_RESOURCE): \
         raise the hard limit before running the tests (ulimit -Hn {need}).\n",
        common::test_name()
    );
    let server = echo_server();
    let (d, port) = tcp_daemon(&server, "", "");
    let pid = d.pid();
    let t0 = Instant::now();
    let mut conns: Vec<TcpStream> = Vec::with_capacity(N);
    for i in 0..N {
        let s = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        conns.push(s);
    }
    let connected = t0.elapsed();
    // The daemon accepted them all (it holds a socket for each).
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < N && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let fds = open_fds(pid);
    assert!(fds >= N, "the daemon holds {fds} fds for {N} clients");

    fn read_line(s: &mut TcpStream, what: &str) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => line.push(b[0]),
                Ok(_) => panic!("{what}: closed (have {:?})", show(&line)),
                Err(e) => panic!("{what}: {e} (have {:?})", show(&line)),
            }
        }
        show(&line)
    }

    // Every 100th connection asks its own key, all at once: exact answers.
    for i in (0..N).step_by(100) {
        conns[i]
            .write_all(format!("get k{i}\n").as_bytes())
            .unwrap();
    }
    for i in (0..N).step_by(100) {
        assert_eq!(
            read_line(&mut conns[i], &format!("conn {i}")),
            format!("200 v-k{i}")
        );
    }
    // Every connection asks one shared key, all at once.
    for s in conns.iter_mut() {
        s.write_all(b"get shared\n").unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(read_line(s, &format!("conn {i}")), "200 v-shared");
    }
    // The first connection, idle the longest, still works.
    conns[0].write_all(b"get first\n").unwrap();
    assert_eq!(read_line(&mut conns[0], "conn 0"), "200 v-first");
    eprintln!(
        "{N} connections: connected in {connected:?}, daemon fds {fds}, RSS {} KiB, all served in {:?}",
        rss_kib(pid),
        t0.elapsed()
    );
    drop(conns);
    // They are all released.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > 100 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        open_fds(pid) <= 100,
        "daemon still holds {} fds",
        open_fds(pid)
    );
}

#[test]
fn max_clients_waits_without_spinning_then_serves_the_waiting() {
    let _slot = shared_slot();
    let server = echo_server();
    // One worker: one listener, so the kernel hands connections over in
    // the order they came.
    let port = free_port();
    let cfg = "[daemon]\nworkers = 1\nmax_clients = 50\n".to_string()
        + &map_section("virtual", port, &[server.url("/virtual")], "");
    let d = Daemon::start(&cfg, port);
    let pid = d.pid();
    // Let the daemon see the readiness probe's connection close: until then
    // it counts towards max_clients.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client_sockets(port, &socket_inodes(pid)) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let mut conns: Vec<Raw> = (0..60).map(|_| Raw::connect(port)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(format!("get k{i}\n").as_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate().take(50) {
        let reply = c.line(Duration::from_secs(10));
        assert_eq!(
            reply.map(|r| show(&r)),
            Ok(format!("200 v-k{i}\n")),
            "connection {i}"
        );
    }
    // The daemon holds exactly 50 of them.
    assert_eq!(
        client_sockets(port, &socket_inodes(pid)),
        50,
        "connections the daemon holds"
    );
    // The other 10 wait in the kernel's backlog: no answer, and the daemon
    // does not spin while they wait.
    let ticks_before = cpu_ticks(pid);
    let t = Instant::now();
    for (i, c) in conns.iter_mut().enumerate().skip(50) {
        assert_eq!(
            c.line(Duration::from_millis(100)),
            Err(End::Silent),
            "connection {i} beyond max_clients was served"
        );
    }
    thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    let used = cpu_ticks(pid) - ticks_before;
    let hz = clock_ticks_per_second();
    assert!(
        used * 1000 / hz < 250,
        "the daemon used {} ms of CPU in ~1 s while at max_clients",
        used * 1000 / hz
    );
    let log = d.stderr();
    assert_eq!(
        count_lines(&log, &["max_clients (50) reached"]),
        1,
        "stderr:\n{log}"
    );
    // 20 leave: the 10 waiting ones get in and are answered.
    for c in conns.iter_mut().take(20) {
        let _ = c.s.shutdown(Shutdown::Both);
    }
    for (i, c) in conns.iter_mut().enumerate().skip(50) {
        let reply = c.line(Duration::from_secs(5));
        assert_eq!(
            reply.map(|r| show(&r)),
            Ok(format!("200 v-k{i}\n")),
            "waiting connection {i}"
        );
    }
    // Those still open keep working.
    let c = &mut conns[30];
    c.send(b"get again\n").unwrap();
    assert_eq!(
        c.line(Duration::from_secs(5)).map(|r| show(&r)),
        Ok("200 v-again\n".to_string())
    );
    assert_eq!(count_lines(&d.stderr(), &["max_clients"]), 1);
}

#[test]
fn allow_from_refuses_other_networks_and_says_so() {
    let _slot = shared_slot();
    let server = echo_server();
    let sm_port = free_port();
    let refused = free_port();
    let served = free_port();
    // The daemon-wide rule lets loopback in (the socketmap listener is the
    // readiness probe's); map "outside" only takes 10.0.0.0/8 (no traffic
    // is ever sent there: it is only a rule loopback does not match).
    let cfg = daemon_section(&format!(
        "socketmap_listen = \"127.0.0.1:{sm_port}\"\nallow_from = [\"127.0.0.0/8\"]"
    )) + &map_section(
        "outside",
        refused,
        &[server.url("/outside")],
        "allow_from = [\"10.0.0.0/8\"]",
    ) + &map_section(
        "inside",
        served,
        &[server.url("/inside")],
        "allow_from = [\"127.0.0.0/8\"]",
    );
    let d = Daemon::start(&cfg, sm_port);
    let mut c = Raw::connect(refused);
    let _ = c.send(b"get alice\n");
    let got = c
        .until_closed(Duration::from_secs(5))
        .unwrap_or_else(|got| panic!("refused client still connected (got {got:?})"));
    assert_eq!(show(&got), "", "a refused client gets no reply");
    // Allowed: served.
    let mut ok = LineClient::connect(served);
    assert_eq!(ok.get("alice"), "200 v-alice\n");
    // Socketmap follows [daemon] allow_from (loopback allowed).
    let mut sm = LineClient::connect(sm_port);
    assert_eq!(sm.socketmap_query("outside", b"bob"), b"OK v-bob");
    assert_eq!(
        server.paths(),
        ["/inside", "/outside"],
        "the refused client's lookup never reached a server"
    );
    let log = d.stderr();
    assert_eq!(
        count_lines(
            &log,
            &["refused a connection from 127.0.0.1: not in allow_from"]
        ),
        1,
        "stderr:\n{log}"
    );
}

#[test]
fn daemon_wide_allow_from_refuses_loopback() {
    let _slot = shared_slot();
    let server = echo_server();
    let sm_port = free_port();
    let tcp = free_port();
    // Only the map's own rule lets loopback in; the daemon-wide rule (for
    // socketmap and maps without their own) does not.
    let cfg = daemon_section(&format!(
        "socketmap_listen = \"127.0.0.1:{sm_port}\"\nallow_from = [\"10.0.0.0/8\"]"
    )) + &map_section(
        "virtual",
        tcp,
        &[server.url("/virtual")],
        "allow_from = [\"127.0.0.0/8\", \"::1\"]",
    );
    let d = Daemon::start(&cfg, tcp);
    let mut c = Raw::connect(sm_port);
    let _ = c.send(b"13:virtual alice,");
    let got = c
        .until_closed(Duration::from_secs(5))
        .unwrap_or_else(|got| panic!("refused client still connected (got {got:?})"));
    assert_eq!(show(&got), "");
    let mut ok = LineClient::connect(tcp);
    assert_eq!(ok.get("alice"), "200 v-alice\n");
    assert_eq!(server.requests(), 1);
    assert!(
        d.stderr()
            .contains("refused a connection from 127.0.0.1: not in allow_from"),
        "stderr:\n{}",
        d.stderr()
    );
}

#[test]
fn a_second_daemon_on_a_served_address_fails_to_start() {
    let _slot = shared_slot();
    let server = echo_server();
    let port = free_port();
    let cfg = daemon_section("") + &map_section("virtual", port, &[server.url("/v")], "");
    let _first = Daemon::start(&cfg, port);
    let dir = common::unique_temp_dir("httpmapd-second");
    let path = dir.join("httpmapd.toml");
    std::fs::write(&path, &cfg).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_httpmapd"))
        .arg("-c")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let _ = second.kill();
    let _ = second.wait();
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Some(s) => assert!(!s.success(), "the second daemon exited 0; stderr:\n{log}"),
        None => panic!(
            "a second daemon is serving 127.0.0.1:{port} next to the first (clients are split between them); stderr:\n{log}"
        ),
    }
}

// ---------------------------------------------------------------------------
// 3. Server side limits
// ---------------------------------------------------------------------------

/// Raw bytes of a reply head or more, kept open (the connection is not
/// closed: only the daemon's limit can end the wait early).
fn raw_open(bytes: Vec<u8>) -> TestServer {
    TestServer::start(move |_: &Request| Reply::raw(&bytes))
}

#[test]
fn replies_over_the_parser_limits_are_temporary_errors() {
    let _slot = shared_slot();
    let results = "POSTFIX-DICT-RESULTS: v\r\n";
    let headers = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };
    // (name, reply bytes, what the daemon must answer). Each hostile reply
    // carries a result, so taking it would show as "200 v".
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "head_over_16k_unfinished",
            format!("HTTP/1.1 200 OK\r\n{results}X-Filler: {}\r\n", "a".repeat(17 * 1024)).into_bytes(),
            false,
        ),
        (
            "head_over_16k_finished",
            format!(
                "HTTP/1.1 200 OK\r\n{results}X-Filler: {}\r\nContent-Length: 0\r\n\r\n",
                "a".repeat(16 * 1024)
            )
            .into_bytes(),
            false,
        ),
        (
            "headers_65",
            format!("HTTP/1.1 200 OK\r\n{}{results}Content-Length: 0\r\n\r\n", headers(63)).into_bytes(),
            false,
        ),
        (
            "headers_64_fine",
            format!("HTTP/1.1 200 OK\r\n{}{results}Content-Length: 0\r\n\r\n", headers(62)).into_bytes(),
            true,
        ),
        (
            "chunk_size_line_too_long",
            format!(
                "HTTP/1.1 200 OK\r\n{results}Transfer-Encoding: chunked\r\n\r\n1;{}",
                "e".repeat(2000)
            )
            .into_bytes(),
            false,
        ),
        (
            "content_length_overflow",
            format!("HTTP/1.1 200 OK\r\n{results}Content-Length: 99999999999999999999999\r\n\r\n").into_bytes(),
            false,
        ),
        (
            "content_length_u64_max",
            format!("HTTP/1.1 200 OK\r\n{results}Content-Length: 18446744073709551615\r\n\r\n").into_bytes(),
            false,
        ),
        (
            "content_length_duplicates_differ",
            format!("HTTP/1.1 200 OK\r\n{results}Content-Length: 0\r\nContent-Length: 1\r\n\r\nx").into_bytes(),
            false,
        ),
        (
            "content_length_list_differs",
            format!("HTTP/1.1 200 OK\r\n{results}Content-Length: 0, 1\r\n\r\nx").into_bytes(),
            false,
        ),
        (
            "transfer_encoding_and_content_length",
            format!(
                "HTTP/1.1 200 OK\r\n{results}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            false,
        ),
        (
            "transfer_encoding_gzip",
            format!("HTTP/1.1 200 OK\r\n{results}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n").into_bytes(),
            false,
        ),
        (
            "chunk_size_overflow",
            format!("HTTP/1.1 200 OK\r\n{results}Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n").into_bytes(),
            false,
        ),
    ];
    let good = echo_server();
    let good_port = free_port();
    let mut cfg = daemon_section("")
        + &map_section(
            "good",
            good_port,
            &[good.url("/good")],
            "http_timeout = \"5s\"\nlookup_timeout = \"8s\"",
        );
    let mut servers = Vec::new();
    for (name, bytes, _) in &cases {
        let server = raw_open(bytes.clone());
        let port = free_port();
        cfg += &map_section(
            name,
            port,
            &[server.url("/x")],
            "http_timeout = \"5s\"\nlookup_timeout = \"8s\"",
        );
        servers.push((server, port));
    }
    let d = Daemon::start(&cfg, good_port);
    let mut good_client = LineClient::connect(good_port);
    for ((name, _, fine), (server, port)) in cases.iter().zip(&servers) {
        let mut c = LineClient::connect(*port);
        let t = Instant::now();
        let reply = c.get("alice");
        let took = t.elapsed();
        if *fine {
            assert_eq!(reply, "200 v\n", "{name}");
        } else {
            assert_temp(&reply, name);
            // The limit ended it, not a timeout (http_timeout is 5 s).
            assert!(
                took < Duration::from_secs(3),
                "{name}: the answer took {took:?}: the limit did not trigger"
            );
            // Asked again (the server rests now): still temporary.
            assert_temp(&c.get("bob"), name);
        }
        assert!(server.requests() >= 1, "{name}: the server was never asked");
        // Others are still served.
        assert_eq!(
            good_client.get(&format!("after-{name}")),
            format!("200 v-after-{name}\n")
        );
    }
    assert!(!d.stderr().contains("panicked"), "stderr:\n{}", d.stderr());
}

/// A server that answers every request one byte per second, holding the
/// connection, until dropped.
struct Trickle(Acceptor);

impl Trickle {
    fn start() -> Trickle {
        Trickle(Acceptor::start(|mut s, _| {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let reply =
                b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: trickled\r\nContent-Length: 0\r\n\r\n";
            for byte in reply {
                // Fails once the server is dropped (the connection shut down).
                if s.write_all(&[*byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_secs(1));
            }
        }))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/trickle", self.0.port())
    }
}

#[test]
fn a_trickling_server_is_cut_off_by_the_deadlines() {
    let _slot = shared_slot();
    let by_lookup = Trickle::start();
    let by_http = Trickle::start();
    let good = echo_server();
    let (p1, p2, pg) = (free_port(), free_port(), free_port());
    // p1: one attempt could take 30 s, the lookup may take 2 s.
    // p2: http_timeout bounds one attempt as a whole, not the idle time
    //     between bytes (a byte arrives every second).
    let cfg = daemon_section("")
        + &map_section(
            "by_lookup",
            p1,
            &[by_lookup.url()],
            "http_timeout = \"30s\"\nlookup_timeout = \"2s\"",
        )
        + &map_section(
            "by_http",
            p2,
            &[by_http.url()],
            "http_timeout = \"1500ms\"\nlookup_timeout = \"20s\"\nmax_attempts = 1",
        )
        + &map_section("good", pg, &[good.url("/good")], "");
    let _d = Daemon::start(&cfg, pg);
    let run = |port: u16| {
        thread::spawn(move || {
            let mut c = LineClient::connect(port);
            let t = Instant::now();
            let reply = c.get("alice");
            (reply, t.elapsed())
        })
    };
    let (h1, h2) = (run(p1), run(p2));
    // Meanwhile others are served at once.
    let mut g = LineClient::connect(pg);
    let t = Instant::now();
    assert_eq!(g.get("bob"), "200 v-bob\n");
    assert!(t.elapsed() < Duration::from_secs(1));
    let (r1, t1) = h1.join().unwrap();
    let (r2, t2) = h2.join().unwrap();
    assert_temp(&r1, "trickle vs lookup_timeout");
    assert_temp(&r2, "trickle vs http_timeout");
    let margin = Duration::from_millis(1500);
    assert!(
        t1 >= Duration::from_millis(1900) && t1 < Duration::from_secs(2) + margin,
        "lookup_timeout 2s: answered after {t1:?} ({r1:?})"
    );
    assert!(
        t2 >= Duration::from_millis(1400) && t2 < Duration::from_millis(1500) + margin,
        "http_timeout 1.5s: answered after {t2:?} ({r2:?})"
    );
}

#[test]
fn result_bytes_reach_postfix_percent_encoded() {
    let _slot = shared_slot();
    let header = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "nonutf8" => Reply::found(b"\xff\xfe\x80ok\xc3"),
        "percent" => Reply::found(b"100%"),
        "escaped" => Reply::found(b"50%25"),
        "blanks" => Reply::found(b"a b\tc"),
        "latin" => Reply::found("jörg@bücher.de".as_bytes()),
        _ => Reply::not_found(),
    });
    let body = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "cr" => Reply::body(200, b"a\rb\r\n"),
        "lines" => Reply::body(200, b"x@y\r\n\r\n z@w \n"),
        "nul" => Reply::body(200, b"a\0b"),
        "nonutf8" => Reply::body(200, b"\xff\x80"),
        "percent" => Reply::body(200, b"%41\n"),
        _ => Reply::body(404, b""),
    });
    let (ph, pb, pn) = (free_port(), free_port(), free_port());
    let cfg = daemon_section("")
        + &map_section("header", ph, &[header.url("/h")], "")
        + &map_section("body", pb, &[body.url("/b")], "result = \"body\"")
        + &map_section(
            "bodynl",
            pn,
            &[body.url("/b")],
            "result = \"body\"\nseparator = \"\\r\\n\"",
        );
    let _d = Daemon::start(&cfg, ph);
    let cases: &[(u16, &str, &str)] = &[
        // Header values: bytes as sent (obs-text passes), %XX-encoded.
        (ph, "nonutf8", "200 %FF%FE%80ok%C3\n"),
        (ph, "percent", "200 100%25\n"),
        (ph, "escaped", "200 50%2525\n"),
        (ph, "blanks", "200 a%20b%09c\n"),
        (ph, "latin", "200 j%C3%B6rg@b%C3%BCcher.de\n"),
        // Bodies: lines split at LF, each trimmed, joined with the
        // separator (the operator's, so a CRLF separator passes).
        (pb, "lines", "200 x@y,%20z@w\n"),
        (pb, "nonutf8", "200 %FF%80\n"),
        (pb, "percent", "200 %2541\n"),
        (pn, "lines", "200 x@y%0D%0Az@w\n"),
    ];
    for (port, key, want) in cases {
        let mut c = LineClient::connect(*port);
        assert_eq!(c.get(key), *want, "key {key} on port {port}");
        // Answered from the cache: the same bytes.
        assert_eq!(c.get(key), *want, "key {key} (cached)");
    }
    // A control byte inside a server's line (a CR, a NUL that would cut the
    // value in Postfix) makes the reply a server error: temporary, never a
    // shortened or altered value, never cached.
    let before = body.requests();
    for (port, key) in [(pb, "cr"), (pb, "nul"), (pn, "cr")] {
        let mut c = LineClient::connect(port);
        let r = c.get(key);
        assert!(
            r.starts_with("400 ") && r.contains("control%20byte"),
            "key {key} on port {port}: {r:?}"
        );
    }
    // Each lookup reached the server (max_attempts tries, nothing cached).
    assert!(
        body.requests() >= before + 3,
        "{} requests",
        body.requests() - before
    );
}

#[test]
fn results_too_long_for_tcp_table_are_400_and_logged_once() {
    let _slot = shared_slot();
    let server = TestServer::start(|req: &Request| {
        let key = req.key_str();
        match key.split_once('-') {
            Some(("a", n)) => Reply::found(&vec![b'a'; n.parse().unwrap()]),
            Some(("sp", n)) => {
                Reply::found(&[b"x".repeat(n.parse().unwrap()), b"y".to_vec()].join(&b' '))
            }
            _ => Reply::not_found(),
        }
    });
    let (d, port) = tcp_daemon(&server, "", "");
    let mut c = LineClient::connect(port);
    // 4091 encoded bytes: "200 " + value + "\n" is exactly 4096 bytes.
    let fits = c.get("a-4091");
    assert_eq!(fits.len(), 4096);
    assert_eq!(fits, format!("200 {}\n", "a".repeat(4091)));
    // "x"*4088 + %20 + "y" = 4092 encoded bytes: one too many.
    let over_keys = ["a-4092", "a-5000", "a-16000", "sp-4088", "a-4093"];
    let t = Instant::now();
    for key in over_keys {
        let reply = c.get(key);
        assert_temp(&reply, key);
        assert!(reply.len() <= 4096);
        assert!(
            reply.starts_with("400 result%20too%20long%20for%20tcp_table"),
            "{key}: {reply:?}"
        );
        // The connection stays usable.
        assert_eq!(c.get("a-3"), "200 aaa\n");
    }
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "the rate-limit window is 10 s"
    );
    let log = d.stderr();
    assert_eq!(count_lines(&log, &["too long"]), 1, "stderr:\n{log}");
}

#[test]
fn body_over_max_result_bytes_is_400() {
    let _slot = shared_slot();
    let server = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "fits" => Reply::body(200, &[b'f'; 100]),
        "over" => Reply::body(200, &[b'o'; 101]),
        "huge" => Reply::body(200, &vec![b'h'; 1 << 20]),
        _ => Reply::body(404, b""),
    });
    let (_d, port) = tcp_daemon(&server, "", "result = \"body\"\nmax_result_bytes = 100");
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("fits"), format!("200 {}\n", "f".repeat(100)));
    assert_temp(&c.get("over"), "101-byte body");
    assert_temp(&c.get("huge"), "1 MiB body");
    let nf = c.get("missing");
    assert!(nf.starts_with("500 "), "404 is not found: {nf:?}");
}

#[test]
fn header_result_over_max_result_bytes_is_400() {
    let _slot = shared_slot();
    let server = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "fits" => Reply::found(&[b'f'; 100]),
        _ => Reply::found(&[b'o'; 200]),
    });
    let (_d, port) = tcp_daemon(&server, "", "max_result_bytes = 100");
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("fits"), format!("200 {}\n", "f".repeat(100)));
    assert_temp(&c.get("over"), "200-byte header result");
}
