//! socketmap (`socketmap:inet:host:port:name`, `socketmap:unix:/path:name`)
//! end to end: Postfix's own `postmap` and raw sockets against the real
//! `httpmapd` binary, with two maps answered by two scriptable HTTP servers.

mod common;

use common::{
    free_port, netstring, postmap_q, postmap_q_stdin, show, unique_temp_dir, Daemon, LineClient,
    Reply, TestServer,
};
use std::path::PathBuf;

/// One daemon with two maps: "virtual" (also on tcp_table) and "access",
/// socketmap on a TCP port and on a Unix socket.
struct Setup {
    virt: TestServer,
    access: TestServer,
    #[allow(dead_code)]
    daemon: Daemon,
    sm_port: u16,
    tcp_port: u16,
    sock_path: PathBuf,
    sock_dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.sock_dir);
    }
}

impl Setup {
    fn start(virt: TestServer, access: TestServer) -> Setup {
        let sm_port = free_port();
        let tcp_port = free_port();
        let sock_dir = unique_temp_dir("httpmapd-sm");
        let sock_path = sock_dir.join("s.sock");
        let config = format!(
            r#"
[daemon]
workers = 2
socketmap_listen = ["127.0.0.1:{sm_port}", "unix:{sock}"]

[maps.virtual]
tcp_listen = "127.0.0.1:{tcp_port}"
servers = ["{virt_url}"]
connect_timeout = "500ms"
http_timeout = "1s"
lookup_timeout = "3s"
retry_interval = "1s"

[maps.access]
servers = ["{access_url}"]
connect_timeout = "500ms"
http_timeout = "1s"
lookup_timeout = "3s"
retry_interval = "1s"
"#,
            sock = sock_path.display(),
            virt_url = virt.url("/virtual"),
            access_url = access.url("/access"),
        );
        let daemon = Daemon::start(&config, sm_port);
        // The Unix socket is bound with the TCP one, but wait for it anyway.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&sock_path).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "no Unix socket at {}; stderr:\n{}",
                sock_path.display(),
                daemon.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Setup {
            virt,
            access,
            daemon,
            sm_port,
            tcp_port,
            sock_path,
            sock_dir,
        }
    }

    /// The usual two maps.
    fn standard() -> Setup {
        Setup::start(
            TestServer::with_map(&[
                ("alice@example.com", "alice@mail.example.com"),
                ("team@example.com", "alice@example.com, bob@example.com"),
            ]),
            TestServer::with_map(&[("spammer@example.net", "REJECT go away")]),
        )
    }

    fn inet(&self, map: &str) -> String {
        format!("socketmap:inet:127.0.0.1:{}:{map}", self.sm_port)
    }

    fn unix(&self, map: &str) -> String {
        format!("socketmap:unix:{}:{map}", self.sock_path.display())
    }

    fn tcp(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.tcp_port)
    }
}

// ---------------------------------------------------------------------------
// Through Postfix's postmap
// ---------------------------------------------------------------------------

#[test]
fn postmap_found_in_each_map_over_inet_and_unix() {
    let s = Setup::standard();
    for table in [s.inet("virtual"), s.unix("virtual")] {
        let (code, out, err) = postmap_q("alice@example.com", &table);
        assert_eq!(code, 0, "{table}: {err}");
        assert_eq!(out, "alice@mail.example.com\n", "{table}");
        assert_eq!(err, "", "{table}");
        let (code, out, err) = postmap_q("team@example.com", &table);
        assert_eq!(code, 0, "{table}: {err}");
        assert_eq!(out, "alice@example.com, bob@example.com\n", "{table}");
    }
    for table in [s.inet("access"), s.unix("access")] {
        let (code, out, err) = postmap_q("spammer@example.net", &table);
        assert_eq!(code, 0, "{table}: {err}");
        assert_eq!(out, "REJECT go away\n", "{table}");
    }
    // Each map asked its own server, once per key (the Unix socket shares
    // the cache with the TCP one).
    assert_eq!(s.virt.requests(), 2);
    assert_eq!(s.access.requests(), 1);
    assert_eq!(s.access.keys(), vec![b"spammer@example.net".to_vec()]);
    // "spammer@example.net" in map virtual is a different lookup.
    let (code, out, _) = postmap_q("spammer@example.net", &s.inet("virtual"));
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(s.virt.requests(), 3);
    assert_eq!(s.access.requests(), 1);
}

#[test]
fn postmap_not_found_over_inet_and_unix() {
    let s = Setup::standard();
    for table in [
        s.inet("virtual"),
        s.unix("virtual"),
        s.inet("access"),
        s.unix("access"),
    ] {
        let (code, out, err) = postmap_q("nobody@example.com", &table);
        assert_eq!(code, 1, "{table}: {err}");
        assert_eq!(out, "", "{table}");
        assert!(!err.contains("error"), "{table}: {err}");
        assert!(!err.contains("fatal"), "{table}: {err}");
    }
    // Negative results are cached: one request per map.
    assert_eq!(s.virt.requests(), 1);
    assert_eq!(s.access.requests(), 1);
}

#[test]
fn postmap_unknown_map_name_fails() {
    let s = Setup::standard();
    let (code, out, err) = postmap_q("alice@example.com", &s.inet("nosuchmap"));
    assert_ne!(code, 0, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "");
    assert!(err.contains("nosuchmap"), "stderr: {err}");
    // PERM: Postfix reports a permanent (configuration) error.
    assert!(err.contains("permanent error"), "stderr: {err}");
    assert_eq!(s.virt.requests() + s.access.requests(), 0);
}

#[test]
fn postmap_temporary_error_on_503() {
    let s = Setup::start(
        TestServer::start(|_| Reply::status(503, "database down")),
        TestServer::with_map(&[]),
    );
    let (code, out, err) = postmap_q("alice@example.com", &s.inet("virtual"));
    assert_ne!(code, 0, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "");
    assert!(err.contains("database down"), "stderr: {err}");
    let asked = s.virt.requests();
    assert_eq!(asked, 1, "postmap gives up after one TEMP");
    // The raw reply, and it is not cached.
    let mut c = LineClient::connect(s.sm_port);
    assert_eq!(
        show(&c.socketmap_query("virtual", b"alice@example.com")),
        "TEMP database down"
    );
    assert_eq!(s.virt.requests(), asked + 1);
}

#[test]
fn postmap_keys_with_spaces_and_utf8_reach_the_server_raw() {
    let s = Setup::start(
        TestServer::with_map(&[
            ("john doe@example.com", "john.doe@mail.example.com"),
            ("jürgen@example.com", "jürgen.müller@example.net"),
            ("100%@example.com", "100% sure, really"),
        ]),
        TestServer::with_map(&[]),
    );
    let table = s.inet("virtual");
    let (code, out, err) = postmap_q("John Doe@Example.com", &table);
    assert_eq!(
        (code, out.as_str()),
        (0, "john.doe@mail.example.com\n"),
        "{err}"
    );
    let (code, out, err) = postmap_q("JÜRGEN@example.com", &s.unix("virtual"));
    assert_eq!(
        (code, out.as_str()),
        (0, "jürgen.müller@example.net\n"),
        "{err}"
    );
    let (code, out, err) = postmap_q("100%@example.com", &table);
    assert_eq!((code, out.as_str()), (0, "100% sure, really\n"), "{err}");
    assert_eq!(
        s.virt.keys(),
        vec![
            b"john doe@example.com".to_vec(),
            "jürgen@example.com".as_bytes().to_vec(),
            b"100%@example.com".to_vec(),
        ]
    );
}

#[test]
fn postmap_200_keys_over_one_connection() {
    let pairs: Vec<(String, String)> = (0..200)
        .filter(|i| i % 4 != 1)
        .map(|i| (format!("user{i}@example.com"), format!("box {i}")))
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let s = Setup::start(TestServer::with_map(&refs), TestServer::with_map(&[]));
    let input: String = (0..200).map(|i| format!("user{i}@example.com\n")).collect();
    let expected: String = (0..200)
        .filter(|i| i % 4 != 1)
        .map(|i| format!("user{i}@example.com\tbox {i}\n"))
        .collect();

    let (code, out, err) = postmap_q_stdin(&input, &s.inet("virtual"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "");
    assert_eq!(out, expected);
    let mut seen: Vec<String> = s.virt.keys().iter().map(|k| show(k)).collect();
    seen.sort();
    let mut want: Vec<String> = (0..200).map(|i| format!("user{i}@example.com")).collect();
    want.sort();
    assert_eq!(seen, want, "each key once");

    // The same keys over the Unix socket: all answered from the cache.
    let (code, out, err) = postmap_q_stdin(&input, &s.unix("virtual"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, expected);
    assert_eq!(s.virt.requests(), 200);
}

#[test]
fn tcp_and_socketmap_share_one_cache_entry() {
    let s = Setup::standard();
    let (code, out, err) = postmap_q("Alice@Example.com", &s.tcp());
    assert_eq!(
        (code, out.as_str()),
        (0, "alice@mail.example.com\n"),
        "{err}"
    );
    let (code, out, err) = postmap_q("alice@example.com", &s.inet("virtual"));
    assert_eq!(
        (code, out.as_str()),
        (0, "alice@mail.example.com\n"),
        "{err}"
    );
    assert_eq!(s.virt.requests(), 1);

    // The other way round, with raw clients and a not-found key.
    let mut sm = LineClient::connect(s.sm_port);
    assert_eq!(
        show(&sm.socketmap_query("virtual", b"nobody@example.com")),
        "NOTFOUND "
    );
    let mut tcp = LineClient::connect(s.tcp_port);
    let reply = tcp.query(b"get nobody@example.com\n");
    assert!(reply.starts_with(b"500 "), "{:?}", show(&reply));
    assert_eq!(s.virt.requests(), 2);
}

// ---------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------

/// The daemon must close the connection, after at most one reply, which can
/// only be a PERM netstring (the client can then tell why).
fn assert_closed_after_optional_perm(c: &mut LineClient, what: &str) {
    if c.is_closed_by_peer() {
        return;
    }
    let reply = c.read_netstring();
    assert!(
        reply.starts_with(b"PERM "),
        "after {what}: reply {:?}",
        show(&reply)
    );
    assert!(c.is_closed_by_peer(), "not closed after {what}");
}

#[test]
fn raw_replies_are_exact() {
    let s = Setup::start(
        TestServer::start(|req| match req.key_str().as_str() {
            "alice@example.com" => Reply::found(b"alice@mail.example.com"),
            "pct@example.com" => Reply::found(b"100% a b"),
            "empty@example.com" => Reply::not_found(),
            "down@example.com" => Reply::status(503, "db down"),
            _ => Reply::not_found(),
        }),
        TestServer::with_map(&[("1.2.3.4", "REJECT")]),
    );
    let mut c = LineClient::connect(s.sm_port);
    let cases: &[(&str, &[u8], &str)] = &[
        ("virtual", b"alice@example.com", "OK alice@mail.example.com"),
        ("virtual", b"ALICE@example.com", "OK alice@mail.example.com"),
        ("virtual", b"pct@example.com", "OK 100% a b"),
        ("virtual", b"empty@example.com", "NOTFOUND "),
        ("virtual", b"nobody@example.com", "NOTFOUND "),
        ("virtual", b"down@example.com", "TEMP db down"),
        ("access", b"1.2.3.4", "OK REJECT"),
        ("access", b"alice@example.com", "NOTFOUND "),
    ];
    for (map, key, want) in cases {
        assert_eq!(
            show(&c.socketmap_query(map, key)),
            *want,
            "{map} {:?}",
            show(key)
        );
    }
    assert!(!c.is_closed_by_peer());
}

#[test]
fn raw_pipelined_queries_answered_in_order() {
    let s = Setup::start(
        TestServer::start(|req| match req.key_str().as_str() {
            "slow@example.com" => {
                Reply::found(b"slow").delayed(std::time::Duration::from_millis(300))
            }
            "alice@example.com" => Reply::found(b"alice"),
            _ => Reply::not_found(),
        }),
        TestServer::with_map(&[("x", "y")]),
    );
    let mut c = LineClient::connect(s.sm_port);
    assert_eq!(
        show(&c.socketmap_query("virtual", b"alice@example.com")),
        "OK alice"
    );
    let mut all = Vec::new();
    for (map, key) in [
        ("virtual", "slow@example.com"),
        ("virtual", "alice@example.com"),
        ("nosuchmap", "x"),
        ("access", "x"),
        ("virtual", "nobody@example.com"),
    ] {
        all.extend_from_slice(&netstring(format!("{map} {key}").as_bytes()));
    }
    c.send(&all);
    assert_eq!(show(&c.read_netstring()), "OK slow");
    assert_eq!(show(&c.read_netstring()), "OK alice");
    let perm = c.read_netstring();
    assert!(
        perm.starts_with(b"PERM ") && show(&perm).contains("nosuchmap"),
        "{:?}",
        show(&perm)
    );
    assert_eq!(show(&c.read_netstring()), "OK y");
    assert_eq!(show(&c.read_netstring()), "NOTFOUND ");
}

#[test]
fn raw_unknown_map_is_perm_and_connection_kept() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    let reply = c.socketmap_query("nosuchmap", b"alice@example.com");
    assert!(reply.starts_with(b"PERM "), "{:?}", show(&reply));
    assert!(show(&reply).contains("nosuchmap"), "{:?}", show(&reply));
    // Map names are exact: no case folding of the name.
    let reply = c.socketmap_query("Virtual", b"alice@example.com");
    assert!(reply.starts_with(b"PERM "), "{:?}", show(&reply));
    assert!(show(&reply).contains("Virtual"), "{:?}", show(&reply));
    assert_eq!(
        show(&c.socketmap_query("virtual", b"alice@example.com")),
        "OK alice@mail.example.com"
    );
    assert_eq!(s.virt.requests(), 1);
}

#[test]
fn raw_request_without_a_key_is_perm_and_connection_kept() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    c.send(&netstring(b"virtual"));
    let reply = c.read_netstring();
    assert!(reply.starts_with(b"PERM "), "{:?}", show(&reply));
    assert_eq!(
        show(&c.socketmap_query("virtual", b"alice@example.com")),
        "OK alice@mail.example.com"
    );
}

#[test]
fn raw_keys_with_spaces_and_utf8_are_not_decoded() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    for key in [
        &b"John Doe@Example.com"[..],
        "JÜRGEN@example.com".as_bytes(),
        b"a%20b@example.com",
    ] {
        assert_eq!(show(&c.socketmap_query("virtual", key)), "NOTFOUND ");
    }
    assert_eq!(
        s.virt.keys(),
        vec![
            b"john doe@example.com".to_vec(),
            "jürgen@example.com".as_bytes().to_vec(),
            b"a%20b@example.com".to_vec(),
        ]
    );
}

#[test]
fn raw_unix_socket_serves_both_maps() {
    let s = Setup::standard();
    let mut sock = std::os::unix::net::UnixStream::connect(&s.sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    use std::io::{Read, Write};
    let mut req = netstring(b"virtual alice@example.com");
    req.extend_from_slice(&netstring(b"access spammer@example.net"));
    req.extend_from_slice(&netstring(b"access alice@example.com"));
    sock.write_all(&req).unwrap();
    let mut want = netstring(b"OK alice@mail.example.com");
    want.extend_from_slice(&netstring(b"OK REJECT go away"));
    want.extend_from_slice(b"9:NOTFOUND ,");
    let mut got = vec![0u8; want.len()];
    sock.read_exact(&mut got).unwrap();
    assert_eq!(show(&got), show(&want));
}

#[test]
fn raw_malformed_netstring_closes_the_connection() {
    let s = Setup::standard();
    for junk in [&b"abc"[..], b"-5:hello,", b":x,", b"5:hello!"] {
        let mut c = LineClient::connect(s.sm_port);
        c.send(junk);
        assert_closed_after_optional_perm(&mut c, &show(junk));
    }
    assert_eq!(s.virt.requests(), 0);
}

#[test]
fn raw_absurd_length_closes_without_waiting_for_the_payload() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    let started = std::time::Instant::now();
    c.send(b"99999999999:");
    assert_closed_after_optional_perm(&mut c, "99999999999:");
    assert!(started.elapsed() < std::time::Duration::from_millis(900));
    // Even a length that overflows 64 bits.
    let mut c = LineClient::connect(s.sm_port);
    c.send(b"999999999999999999999999999999");
    assert_closed_after_optional_perm(&mut c, "30 nines");
}

#[test]
fn raw_query_of_10001_bytes_closes_but_10000_is_served() {
    let s = Setup::standard();
    // "virtual " + key = 10000 bytes: Postfix's own query limit, accepted.
    let key = vec![b'k'; 10000 - "virtual ".len()];
    let mut c = LineClient::connect(s.sm_port);
    assert_eq!(show(&c.socketmap_query("virtual", &key)), "NOTFOUND ");
    assert_eq!(s.virt.keys(), vec![key.clone()]);

    let mut c = LineClient::connect(s.sm_port);
    let mut payload = b"virtual ".to_vec();
    payload.extend_from_slice(&key);
    payload.push(b'k');
    assert_eq!(payload.len(), 10001);
    c.send(&netstring(&payload));
    assert_closed_after_optional_perm(&mut c, "a 10001-byte query");
    assert_eq!(s.virt.requests(), 1);
}

#[test]
fn raw_idle_connection_is_not_closed() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    assert_eq!(
        show(&c.socketmap_query("virtual", b"alice@example.com")),
        "OK alice@mail.example.com"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(!c.is_closed_by_peer());
    assert_eq!(
        show(&c.socketmap_query("access", b"spammer@example.net")),
        "OK REJECT go away"
    );
}

#[test]
fn raw_netstring_split_across_writes() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    let req = netstring(b"virtual alice@example.com");
    for part in req.chunks(4) {
        c.send(part);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(show(&c.read_netstring()), "OK alice@mail.example.com");
}

#[test]
fn raw_half_closed_client_still_gets_its_answers() {
    // Queries then FIN at once: every answer, then the daemon closes.
    // Repeated, as the FIN may or may not arrive with the data.
    let s = Setup::standard();
    for i in 0..10 {
        let mut c = LineClient::connect(s.sm_port);
        let mut req = netstring(format!("virtual user{i}@example.com").as_bytes());
        req.extend_from_slice(&netstring(b"access spammer@example.net"));
        c.send(&req);
        c.stream().shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(show(&c.read_netstring()), "NOTFOUND ", "round {i}");
        assert_eq!(show(&c.read_netstring()), "OK REJECT go away", "round {i}");
        assert!(c.is_closed_by_peer(), "round {i}: not closed");
    }
}

#[test]
fn raw_client_eof_after_its_answers_closes_the_session() {
    let s = Setup::standard();
    let mut c = LineClient::connect(s.sm_port);
    assert_eq!(
        show(&c.socketmap_query("virtual", b"alice@example.com")),
        "OK alice@mail.example.com"
    );
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.is_closed_by_peer());
}
