//! tcp_table (`tcp:host:port`) end to end: Postfix's own `postmap` and raw
//! sockets against the real `httpmapd` binary, answered by scriptable HTTP
//! servers. Each test runs its own servers and daemon on free ports.

mod common;

use common::{
    free_port, open_fds, postmap_q, postmap_q_stdin, show, Daemon, LineClient, Reply, TestServer,
};
use std::time::Duration;

/// A daemon serving one map, "virtual", from `server` over tcp_table on the
/// returned port (and socketmap on another port). `extra` is appended to the
/// map's section (e.g. `result = "body"`).
fn start_daemon(server: &TestServer, extra: &str) -> (Daemon, u16) {
    let tcp_port = free_port();
    let sm_port = free_port();
    let config = format!(
        r#"
[daemon]
workers = 2
socketmap_listen = "127.0.0.1:{sm_port}"

[maps.virtual]
tcp_listen = "127.0.0.1:{tcp_port}"
servers = ["{url}"]
connect_timeout = "500ms"
http_timeout = "1s"
lookup_timeout = "3s"
retry_interval = "1s"
{extra}
"#,
        url = server.url("/virtual"),
    );
    let daemon = Daemon::start(&config, tcp_port);
    (daemon, tcp_port)
}

fn table(port: u16) -> String {
    format!("tcp:127.0.0.1:{port}")
}

/// `postmap -q key table` for the daemon's tcp_table on `port`.
fn q(key: &str, port: u16) -> (i32, String, String) {
    postmap_q(key, &table(port))
}

fn keys_as_strings(server: &TestServer) -> Vec<String> {
    server.keys().iter().map(|k| show(k)).collect()
}

/// Postfix's `%XX` decoding of a reply's text (panics on a malformed escape).
fn unquote(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            let hex = std::str::from_utf8(&text[i + 1..i + 3]).expect("escape");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

/// Asserts one reply line. `200` and `400` replies must match byte for byte;
/// a `500` reply's text is only informative, so it is compared as Postfix
/// reads it (decoded). The exact "500 not found\n" bytes are checked by
/// `raw_empty_results_header_is_exactly_500_not_found`.
fn assert_reply(got: &[u8], want: &str) {
    if let (Some(g), Some(w)) = (got.strip_prefix(b"500 "), want.strip_prefix("500 ")) {
        let g = g
            .strip_suffix(b"\n")
            .unwrap_or_else(|| panic!("no newline: {:?}", show(got)));
        let w = w.strip_suffix('\n').expect("want ends in a newline");
        assert_eq!(
            show(&unquote(g)),
            show(&unquote(w.as_bytes())),
            "got {:?}",
            show(got)
        );
    } else {
        assert_eq!(show(got), want);
    }
}

// ---------------------------------------------------------------------------
// Through Postfix's postmap
// ---------------------------------------------------------------------------

#[test]
fn postmap_found() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let (code, out, err) = q("alice@example.com", port);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "alice@mail.example.com\n");
    assert_eq!(err, "");
    assert_eq!(server.requests(), 1);
    assert_eq!(keys_as_strings(&server), ["alice@example.com"]);
}

#[test]
fn postmap_not_found() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let (code, out, err) = q("nobody@example.com", port);
    assert_eq!(code, 1, "stderr: {err}");
    assert_eq!(out, "");
    assert!(!err.contains("query error"), "stderr: {err}");
    assert!(!err.contains("fatal"), "stderr: {err}");
    assert_eq!(server.requests(), 1);
}

#[test]
fn postmap_temporary_error_on_503_and_raw_400() {
    let retmsg = "database down: 100% busy";
    let server = TestServer::start(move |_| Reply::status(503, retmsg));
    let (_daemon, port) = start_daemon(&server, "");

    let (code, out, err) = q("alice@example.com", port);
    assert_ne!(code, 0, "stdout: {out} stderr: {err}");
    assert_eq!(out, "");
    assert!(err.contains("query error"), "stderr: {err}");
    let after_postmap = server.requests();
    assert_eq!(after_postmap, 1, "postmap gives up after one 400");

    // The raw reply: 400 with the server's POSTFIX-DICT-RETMSG, %XX-encoded.
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "400 database%20down:%20100%25%20busy\n"
    );
    // Errors are never cached: that lookup went to the server again.
    assert_eq!(server.requests(), after_postmap + 1);
}

#[test]
fn postmap_keys_with_space_percent_and_utf8() {
    let server = TestServer::with_map(&[
        ("a b@example.com", "value with spaces"),
        ("100%@example.com", "100% sure"),
        ("jürgen@example.com", "jürgen.müller@example.net"),
    ]);
    let (_daemon, port) = start_daemon(&server, "");

    let (code, out, err) = q("A B@Example.com", port);
    assert_eq!((code, out.as_str()), (0, "value with spaces\n"), "{err}");
    let (code, out, err) = q("100%@example.com", port);
    assert_eq!((code, out.as_str()), (0, "100% sure\n"), "{err}");
    let (code, out, err) = q("JÜRGEN@example.com", port);
    assert_eq!(
        (code, out.as_str()),
        (0, "jürgen.müller@example.net\n"),
        "{err}"
    );

    // What reached the server: the decoded raw bytes, lower-cased
    // (fold_case defaults to true), UTF-8 by Unicode lower case.
    assert_eq!(
        server.keys(),
        vec![
            b"a b@example.com".to_vec(),
            b"100%@example.com".to_vec(),
            "jürgen@example.com".as_bytes().to_vec(),
        ]
    );
}

#[test]
fn postmap_multi_word_result() {
    let server =
        TestServer::with_map(&[("team@example.com", "alice@example.com, bob@example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let (code, out, err) = q("team@example.com", port);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "alice@example.com, bob@example.com\n");

    // On the wire, the space is encoded.
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get team@example.com\n")),
        "200 alice@example.com,%20bob@example.com\n"
    );
    assert_eq!(server.requests(), 1, "the second lookup is a cache hit");
}

#[test]
fn postmap_longest_value_that_fits() {
    // "200 " + 4091 bytes + "\n" = 4096 bytes: the most a reply may hold.
    let value = "v".repeat(4091);
    let server = TestServer::with_map(&[("big@example.com", value.as_str())]);
    let (_daemon, port) = start_daemon(&server, "");
    let (code, out, err) = q("big@example.com", port);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{value}\n"));
}

#[test]
fn postmap_300_keys_over_one_connection() {
    // Every third key is not found.
    let pairs: Vec<(String, String)> = (0..300)
        .filter(|i| i % 3 != 0)
        .map(|i| {
            (
                format!("user{i}@example.com"),
                format!("mbox{i}@mail.example.net"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let server = TestServer::with_map(&refs);
    let (_daemon, port) = start_daemon(&server, "");

    let input: String = (0..300).map(|i| format!("user{i}@example.com\n")).collect();
    let (code, out, err) = postmap_q_stdin(&input, &table(port));
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(err, "");
    let expected: String = (0..300)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("user{i}@example.com\tmbox{i}@mail.example.net\n"))
        .collect();
    assert_eq!(out, expected);

    // Each distinct key reached the server exactly once.
    let mut seen = keys_as_strings(&server);
    seen.sort();
    let mut want: Vec<String> = (0..300).map(|i| format!("user{i}@example.com")).collect();
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(server.requests(), 300);
}

// ---------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------

#[test]
fn raw_pipelined_requests_answered_in_order() {
    // "slow" takes 300 ms; cached hits queued behind it must wait for it.
    let server = TestServer::start(|req| match req.key_str().as_str() {
        "slow@example.com" => {
            Reply::found(b"slow@mail.example.com").delayed(Duration::from_millis(300))
        }
        "hit1@example.com" => Reply::found(b"hit1@mail.example.com"),
        "hit2@example.com" => Reply::found(b"hit2 value"),
        "new@example.com" => Reply::found(b"new@mail.example.com"),
        _ => Reply::not_found(),
    });
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    // Prime the cache.
    assert_eq!(
        show(&c.query(b"get hit1@example.com\n")),
        "200 hit1@mail.example.com\n"
    );
    assert_eq!(
        show(&c.query(b"get hit2@example.com\n")),
        "200 hit2%20value\n"
    );
    assert_eq!(server.requests(), 2);

    c.send(
        b"get slow@example.com\n\
          get hit1@example.com\n\
          get missing@example.com\n\
          get hit2@example.com\n\
          get new@example.com\n\
          get hit1@example.com\n",
    );
    let want = [
        "200 slow@mail.example.com\n",
        "200 hit1@mail.example.com\n",
        "500 not found\n",
        "200 hit2%20value\n",
        "200 new@mail.example.com\n",
        "200 hit1@mail.example.com\n",
    ];
    for w in want {
        assert_reply(&c.read_line(), w);
    }
    // slow, missing and new were fetched; the hits were not.
    assert_eq!(server.requests(), 5);
    assert!(!c.is_closed_by_peer());
}

#[test]
fn raw_malformed_escape_answers_400_and_keeps_serving() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    for bad in [&b"get a%zz\n"[..], b"get abc%4\n", b"get %\n"] {
        let reply = c.query(bad);
        assert!(
            reply.starts_with(b"400 ") && reply.ends_with(b"\n") && reply.len() > 5,
            "for {:?} got {:?}",
            show(bad),
            show(&reply)
        );
        assert_eq!(
            show(&c.query(b"get alice@example.com\n")),
            "200 alice@mail.example.com\n",
            "after {:?}",
            show(bad)
        );
    }
    assert_eq!(server.requests(), 1, "bad requests never reach the server");
}

#[test]
fn raw_unsupported_requests_and_junk_answer_400_and_keep_serving() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    for bad in [
        &b"put x y\n"[..],
        b"\0\0junk\0with NULs\n",
        b"GET alice@example.com\n",
        b"get\n",
        b"\xff\xfe\n",
    ] {
        let reply = c.query(bad);
        assert!(
            reply.starts_with(b"400 ") && reply.ends_with(b"\n"),
            "for {:?} got {:?}",
            show(bad),
            show(&reply)
        );
        assert_eq!(
            reply.iter().filter(|&&b| b == b'\n').count(),
            1,
            "one line for {:?}",
            show(bad)
        );
        assert_eq!(
            show(&c.query(b"get alice@example.com\n")),
            "200 alice@mail.example.com\n",
            "after {:?}",
            show(bad)
        );
    }
    assert!(!c.is_closed_by_peer());
    assert_eq!(server.requests(), 1);
}

#[test]
fn raw_line_over_4096_bytes_gets_400_then_close() {
    let server = TestServer::with_map(&[]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    let mut line = b"get ".to_vec();
    line.resize(5000, b'k');
    line.push(b'\n');
    c.send(&line);
    let reply = c.read_line();
    assert!(reply.starts_with(b"400 "), "got {:?}", show(&reply));
    assert!(reply.len() <= 4096);
    assert!(c.is_closed_by_peer(), "the connection should be closed");
    assert_eq!(server.requests(), 0);
}

#[test]
fn raw_line_of_exactly_4096_bytes_is_served() {
    let key = "k".repeat(4096 - "get \n".len());
    let server = TestServer::with_map(&[(key.as_str(), "long key found")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    let line = format!("get {key}\n");
    assert_eq!(line.len(), 4096);
    assert_eq!(show(&c.query(line.as_bytes())), "200 long%20key%20found\n");
    assert_eq!(server.keys(), vec![key.into_bytes()]);
    // Still open and serving.
    assert_reply(&c.query(b"get other\n"), "500 not found\n");
}

#[test]
fn raw_lower_case_hex_escapes_decode() {
    let server = TestServer::with_map(&[
        ("star*@example.com", "star"),
        ("jürgen@example.com", "juergen"),
        ("a b@example.com", "ab"),
    ]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    assert_eq!(show(&c.query(b"get star%2a@example.com\n")), "200 star\n");
    assert_eq!(
        show(&c.query(b"get j%c3%bcrgen@example.com\n")),
        "200 juergen\n"
    );
    // Mixed case and upper case give the same key (a cache hit).
    assert_eq!(
        show(&c.query(b"get j%C3%bCrgen@example.com\n")),
        "200 juergen\n"
    );
    assert_eq!(show(&c.query(b"get a%20b@example.com\n")), "200 ab\n");
    assert_eq!(
        server.keys(),
        vec![
            b"star*@example.com".to_vec(),
            "jürgen@example.com".as_bytes().to_vec(),
            b"a b@example.com".to_vec(),
        ]
    );
}

#[test]
fn raw_idle_connection_is_not_closed() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "200 alice@mail.example.com\n"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !c.is_closed_by_peer(),
        "the daemon closed an idle connection"
    );
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "200 alice@mail.example.com\n"
    );
    assert_reply(&c.query(b"get bob@example.com\n"), "500 not found\n");
}

#[test]
fn raw_value_too_long_for_a_reply_is_400_and_logged_once() {
    // 4092 plain bytes encode to 4092: one more than "200 " + v + "\n" can hold.
    let too_long = "x".repeat(4092);
    // 1364 '%' bytes encode to 4092 bytes too.
    let too_long_encoded = "%".repeat(1364);
    let server = TestServer::with_map(&[
        ("big@example.com", too_long.as_str()),
        ("pct@example.com", too_long_encoded.as_str()),
        ("ok@example.com", "fine"),
    ]);
    let (daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    for key in ["big@example.com", "pct@example.com"] {
        let reply = c.query(format!("get {key}\n").as_bytes());
        assert!(
            reply.starts_with(b"400 "),
            "for {key}: {:?}",
            show(&reply[..reply.len().min(80)])
        );
        assert!(reply.len() <= 4096, "for {key}: {} bytes", reply.len());
        // A 400 makes Postfix disconnect; reconnect like it does.
        c = LineClient::connect(port);
    }
    assert_eq!(show(&c.query(b"get ok@example.com\n")), "200 fine\n");
    // Give the log a moment to reach the file.
    std::thread::sleep(Duration::from_millis(100));
    let log = daemon.stderr();
    let lines = log.lines().filter(|l| l.contains("too long")).count();
    assert_eq!(lines, 1, "want one 'too long' line, log:\n{log}");
}

#[test]
fn raw_body_mode_value_bytes_are_encoded() {
    let server = TestServer::start(|req| match req.key_str().as_str() {
        "tab@example.com" => Reply::body(200, b"a%b c\td"),
        "ctl@example.com" => Reply::body(200, b"x\ry\x01z\x7f"),
        // Several lines are several results, joined with ", " (the default separator).
        "lines@example.com" => Reply::body(200, b"a@example.com\r\nb@example.com\n\n"),
        "utf8@example.com" => Reply::body(200, "müller".as_bytes()),
        "empty@example.com" => Reply::body(200, b""),
        _ => Reply::body(404, b"no such key"),
    });
    let (_daemon, port) = start_daemon(&server, r#"result = "body""#);
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get tab@example.com\n")),
        "200 a%25b%20c%09d\n"
    );
    // Control bytes from the server (NUL would cut the value in Postfix):
    // a server error, so a temporary error, never an altered value.
    let ctl = show(&c.query(b"get ctl@example.com\n"));
    assert!(
        ctl.starts_with("400 ") && ctl.contains("control%20byte%200x0d"),
        "{ctl}"
    );
    assert_eq!(
        show(&c.query(b"get lines@example.com\n")),
        "200 a@example.com,%20b@example.com\n"
    );
    assert_eq!(
        show(&c.query(b"get utf8@example.com\n")),
        "200 m%C3%BCller\n"
    );
    assert_reply(&c.query(b"get empty@example.com\n"), "500 not found\n");
    assert_reply(&c.query(b"get nobody@example.com\n"), "500 not found\n");
}

#[test]
fn raw_empty_results_header_is_not_found() {
    let server = TestServer::start(|req| match req.key_str().as_str() {
        "empty@example.com" => Reply::not_found(),
        "missing@example.com" => Reply::Http {
            status: 200,
            headers: vec![],
            body: Vec::new(),
            framing: common::Framing::ContentLength,
            close: false,
        },
        "nocontent@example.com" => Reply::Http {
            status: 204,
            headers: vec![("POSTFIX-DICT-RESULTS".into(), Vec::new())],
            body: Vec::new(),
            framing: common::Framing::ContentLength,
            close: false,
        },
        _ => Reply::found(b"x"),
    });
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    for key in [
        "empty@example.com",
        "missing@example.com",
        "nocontent@example.com",
    ] {
        let reply = c.query(format!("get {key}\n").as_bytes());
        assert!(!reply.starts_with(b"200"), "for {key}: {:?}", show(&reply));
        assert_reply(&reply, "500 not found\n");
    }
    assert_eq!(server.requests(), 3);
}

#[test]
fn raw_empty_results_header_is_exactly_500_not_found() {
    let server = TestServer::start(|_| Reply::not_found());
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    // Fetched from the server, then from the cache: the same bytes.
    for _ in 0..2 {
        assert_eq!(
            show(&c.query(b"get empty@example.com\n")),
            "500 not found\n"
        );
    }
    assert_eq!(server.requests(), 1);
}

// ---------------------------------------------------------------------------
// The cache, seen from outside
// ---------------------------------------------------------------------------

#[test]
fn found_result_is_cached() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "200 alice@mail.example.com\n"
    );
    assert_eq!(server.requests(), 1);
    // Same key on another connection, and in another case (folded first).
    let mut c2 = LineClient::connect(port);
    assert_eq!(
        show(&c2.query(b"get Alice@Example.COM\n")),
        "200 alice@mail.example.com\n"
    );
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "200 alice@mail.example.com\n"
    );
    assert_eq!(server.requests(), 1);
}

#[test]
fn not_found_result_is_cached() {
    let server = TestServer::with_map(&[]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    assert_reply(&c.query(b"get nobody@example.com\n"), "500 not found\n");
    assert_reply(&c.query(b"get nobody@example.com\n"), "500 not found\n");
    let mut c2 = LineClient::connect(port);
    assert_reply(&c2.query(b"get nobody@example.com\n"), "500 not found\n");
    assert_eq!(server.requests(), 1);
}

#[test]
fn temporary_error_is_not_cached() {
    let server = TestServer::start(|_| Reply::status(503, "try later"));
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "400 try%20later\n"
    );
    assert_eq!(server.requests(), 1);
    // Postfix reconnects after a 400; do the same.
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "400 try%20later\n"
    );
    assert_eq!(server.requests(), 2);
}

#[test]
fn postmap_sees_cached_result_without_a_second_request() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    for _ in 0..2 {
        let (code, out, err) = q("alice@example.com", port);
        assert_eq!(
            (code, out.as_str()),
            (0, "alice@mail.example.com\n"),
            "{err}"
        );
        let (code, out, err) = q("nobody@example.com", port);
        assert_eq!((code, out.as_str()), (1, ""), "{err}");
    }
    assert_eq!(server.requests(), 2);
    let mut ks = keys_as_strings(&server);
    ks.sort();
    assert_eq!(ks, ["alice@example.com", "nobody@example.com"]);
}

// ---------------------------------------------------------------------------
// Framing and flow edge cases
// ---------------------------------------------------------------------------

#[test]
fn raw_request_split_across_writes() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    for part in [&b"g"[..], b"et al", b"ice@exa", b"mple.com"] {
        c.send(part);
        std::thread::sleep(Duration::from_millis(30));
    }
    c.send(b"\nget bob@exa");
    assert_eq!(show(&c.read_line()), "200 alice@mail.example.com\n");
    c.send(b"mple.com\n");
    assert_reply(&c.read_line(), "500 not found\n");
    assert_eq!(
        keys_as_strings(&server),
        ["alice@example.com", "bob@example.com"]
    );
}

#[test]
fn raw_half_closed_client_still_gets_its_answers() {
    // Requests then FIN at once (printf ... | nc -N): every answer, then the
    // daemon closes. Repeated, as the FIN may or may not arrive with the data.
    let server = TestServer::start(|req| {
        if req.key_str().starts_with("slow") {
            Reply::found(b"slow").delayed(Duration::from_millis(50))
        } else {
            Reply::not_found()
        }
    });
    let (_daemon, port) = start_daemon(&server, "");
    for i in 0..10 {
        let mut c = LineClient::connect(port);
        c.send(format!("get slow{i}@example.com\nget other@example.com\n").as_bytes());
        c.stream().shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(show(&c.read_line()), "200 slow\n", "round {i}");
        assert_reply(&c.read_line(), "500 not found\n");
        assert!(
            c.is_closed_by_peer(),
            "round {i}: not closed once everything is answered"
        );
    }
}

#[test]
fn raw_client_eof_after_its_answers_closes_the_session() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "200 alice@mail.example.com\n"
    );
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.is_closed_by_peer(), "the daemon keeps a finished session");
}

#[test]
fn raw_clients_that_send_and_close_at_once_leak_nothing() {
    use std::io::{Read, Write};
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (daemon, port) = start_daemon(&server, "");
    // Prime the cache (and the backend pool) on a connection closed cleanly.
    {
        let mut c = LineClient::connect(port);
        assert_eq!(
            show(&c.query(b"get alice@example.com\n")),
            "200 alice@mail.example.com\n"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = open_fds(daemon.pid());
    for _ in 0..50 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"get alice@example.com\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "EOF before the answer");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(show(&got), "200 alice@mail.example.com\n");
        // Dropped: fully closed.
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = open_fds(daemon.pid());
    assert!(
        after <= before + 2,
        "descriptors grew from {before} to {after} after 50 closed clients"
    );
}

#[test]
fn raw_key_with_cr_or_lf_is_a_temporary_error_and_never_sent() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    let (_daemon, port) = start_daemon(&server, "");
    for bad in [
        &b"get a%0Db@example.com\n"[..],
        b"get a%0Ab@example.com\n",
        b"get a%00b@example.com\n",
    ] {
        let mut c = LineClient::connect(port);
        let reply = c.query(bad);
        assert!(
            reply.starts_with(b"400 "),
            "for {:?}: {:?}",
            show(bad),
            show(&reply)
        );
    }
    assert_eq!(
        server.requests(),
        0,
        "no header injection reached the server"
    );
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.query(b"get alice@example.com\n")),
        "200 alice@mail.example.com\n"
    );
}

#[test]
fn raw_long_retmsg_is_cut_to_fit_a_reply() {
    let retmsg = "x".repeat(5000);
    let server = TestServer::start(move |_| Reply::status(503, &retmsg));
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    let reply = c.query(b"get alice@example.com\n");
    assert!(reply.starts_with(b"400 x"), "{:?}", show(&reply[..20]));
    assert!(reply.len() <= 4096, "{} bytes", reply.len());
    assert_eq!(reply.last(), Some(&b'\n'));
}

#[test]
fn raw_600_pipelined_requests_in_one_write() {
    // More than the daemon keeps pending per connection (256): it must stop
    // reading, then resume, and still answer everything in order.
    let server = TestServer::start(|req| {
        let k = req.key_str();
        let n: usize = k
            .trim_start_matches('k')
            .trim_end_matches("@example.com")
            .parse()
            .unwrap_or(1);
        if n.is_multiple_of(2) {
            Reply::found(format!("v{n}").as_bytes())
        } else {
            Reply::not_found()
        }
    });
    let (_daemon, port) = start_daemon(&server, "");
    let mut c = LineClient::connect(port);
    let all: String = (0..600)
        .map(|i| format!("get k{i}@example.com\n"))
        .collect();
    c.send(all.as_bytes());
    for i in 0..600 {
        let line = c.read_line();
        if i % 2 == 0 {
            assert_eq!(show(&line), format!("200 v{i}\n"), "answer {i}");
        } else {
            assert_reply(&line, "500 not found\n");
        }
    }
    assert_eq!(server.requests(), 600);
    assert!(!c.is_closed_by_peer());
}

#[test]
fn concurrent_lookups_of_one_key_share_one_request() {
    let server =
        TestServer::start(|_| Reply::found(b"shared value").delayed(Duration::from_millis(400)));
    let (_daemon, port) = start_daemon(&server, "");
    // Several connections (spread over both workers) ask at once.
    let mut clients: Vec<LineClient> = (0..6).map(|_| LineClient::connect(port)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let key = if i % 2 == 0 {
            "Same@Example.com"
        } else {
            "same@example.com"
        };
        c.send(format!("get {key}\n").as_bytes());
    }
    for c in clients.iter_mut() {
        assert_eq!(show(&c.read_line()), "200 shared%20value\n");
    }
    assert_eq!(server.requests(), 1);
}
