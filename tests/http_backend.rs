//! The HTTP side of httpmapd, end to end: the real binary, answering
//! tcp_table lookups (`get KEY\n`) from real HTTP servers: a private nginx
//! (what operators run) and the scriptable `TestServer` (for framings,
//! connection handling and failures nginx will not produce on demand).
//!
//! Every test starts its own servers and daemon on free ports, asserts the
//! exact reply bytes and the exact number of requests that reached the
//! server.

mod common;

use common::{
    assert_temp, free_port, postmap_q, quoted_list, Daemon, Framing, LineClient, Nginx, Reply,
    Request, TestServer, NGINX_RETMSG,
};
use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

/// A config with one map, "virtual", on `port`: two workers, short timeouts.
/// `extra` is more TOML for the map's table.
fn config(port: u16, servers: &[String], extra: &str) -> String {
    format!(
        r#"[daemon]
workers = 2

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = [{servers}]
connect_timeout = "500ms"
http_timeout = "2s"
lookup_timeout = "4s"
{extra}
"#,
        servers = quoted_list(servers)
    )
}

/// Another map section, to append to `config`'s text.
fn map_section(name: &str, port: u16, servers: &[String], extra: &str) -> String {
    format!(
        r#"
[maps.{name}]
tcp_listen = "127.0.0.1:{port}"
servers = [{servers}]
connect_timeout = "500ms"
http_timeout = "2s"
lookup_timeout = "4s"
{extra}
"#,
        servers = quoted_list(servers)
    )
}

/// Asserts the daemon never declared a server down.
fn assert_no_server_down(d: &Daemon) {
    let log = d.stderr();
    assert!(
        !log.contains("is down"),
        "the daemon counted a server failure:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// Against nginx
// ---------------------------------------------------------------------------

const NGINX_PAIRS: &[(&str, &str)] = &[
    ("alice@example.com", "alice@mail.example.com"),
    ("bob@example.com", "bob@mail.example.com"),
    ("carol@example.com", "carol@mail.example.com"),
];

#[test]
fn nginx_found_not_found_and_unavailable() {
    let nginx = Nginx::start(NGINX_PAIRS);
    let port = free_port();
    let down_port = free_port();
    let cfg = config(port, &[nginx.url("/virtual")], "")
        + &map_section("down", down_port, &[nginx.url("/unavailable")], "");
    let d = Daemon::start(&cfg, port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("alice@example.com"), "200 alice@mail.example.com\n");
    assert_eq!(c.get("nobody@example.com"), "500 not found\n");
    let mut down = LineClient::connect(down_port);
    let want = format!("400 {}\n", NGINX_RETMSG.replace(' ', "%20"));
    assert_eq!(down.get("alice@example.com"), want);
    assert_eq!(nginx.requests(), 3);
    let log = nginx.log();
    let seen: Vec<(&str, &str, u16)> = log
        .iter()
        .map(|l| (l.uri.as_str(), l.key.as_str(), l.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("/virtual", "alice@example.com", 200),
            ("/virtual", "nobody@example.com", 200),
            ("/unavailable", "alice@example.com", 503),
        ]
    );
    // A 503 with a reason is the server's answer, not its failure.
    assert_no_server_down(&d);
}

#[test]
fn nginx_body_mode() {
    let nginx = Nginx::start(NGINX_PAIRS);
    let port = free_port();
    let down_port = free_port();
    let cfg = config(port, &[nginx.url("/body/virtual")], r#"result = "body""#)
        + &map_section(
            "down",
            down_port,
            &[nginx.url("/unavailable")],
            r#"result = "body""#,
        );
    let d = Daemon::start(&cfg, port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("bob@example.com"), "200 bob@mail.example.com\n");
    // nginx's 404 comes with an HTML body: still just "not found".
    assert_eq!(c.get("nobody@example.com"), "500 not found\n");
    let mut down = LineClient::connect(down_port);
    let want = format!("400 {}\n", NGINX_RETMSG.replace(' ', "%20"));
    assert_eq!(down.get("bob@example.com"), want);
    assert_eq!(nginx.requests(), 3);
    let statuses: Vec<u16> = nginx.log().iter().map(|l| l.status).collect();
    assert_eq!(statuses, vec![200, 404, 503]);
    assert_no_server_down(&d);
}

#[test]
fn nginx_sees_one_request_per_key_within_ttl() {
    let nginx = Nginx::start(NGINX_PAIRS);
    let port = free_port();
    let d = Daemon::start(&config(port, &[nginx.url("/virtual")], ""), port);
    // Two client connections, so both workers (sharing one cache) are likely used.
    let mut clients = [LineClient::connect(port), LineClient::connect(port)];
    let found = [
        ("alice@example.com", "200 alice@mail.example.com\n"),
        ("bob@example.com", "200 bob@mail.example.com\n"),
        ("carol@example.com", "200 carol@mail.example.com\n"),
    ];
    let not_found = ["x@example.com", "y@example.com", "z@example.com"];
    for round in 0..3 {
        for (i, (key, want)) in found.iter().enumerate() {
            let c = &mut clients[(round + i) % 2];
            assert_eq!(c.get(key), *want, "round {round}, key {key}");
        }
        for (i, key) in not_found.iter().enumerate() {
            let c = &mut clients[(round + i + 1) % 2];
            assert_eq!(c.get(key), "500 not found\n", "round {round}, key {key}");
        }
    }
    assert_eq!(nginx.requests(), 6);
    let mut keys: Vec<String> = nginx.log().into_iter().map(|l| l.key).collect();
    keys.sort();
    let mut want: Vec<String> = found
        .iter()
        .map(|(k, _)| k.to_string())
        .chain(not_found.iter().map(|k| k.to_string()))
        .collect();
    want.sort();
    assert_eq!(keys, want);
    drop(d);
}

#[test]
fn nginx_connections_are_kept_alive() {
    let nginx = Nginx::start(NGINX_PAIRS);
    let port = free_port();
    let d = Daemon::start(&config(port, &[nginx.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    for i in 0..50 {
        let key = format!("user{i}@example.com");
        assert_eq!(c.get(&key), "500 not found\n");
    }
    assert_eq!(c.get("carol@example.com"), "200 carol@mail.example.com\n");
    assert_eq!(nginx.requests(), 51);
    let log = nginx.log();
    // One client connection: one worker, one pooled connection, reused.
    assert!(
        nginx.connections() <= 2,
        "51 sequential lookups used {} connections to nginx: {:?}",
        nginx.connections(),
        log.iter()
            .map(|l| (l.connection, l.connection_requests))
            .collect::<Vec<_>>()
    );
    let most = log.iter().map(|l| l.connection_requests).max().unwrap();
    assert!(most >= 26, "at most {most} requests on one connection");
    assert_no_server_down(&d);
}

#[test]
fn postmap_through_daemon_and_nginx() {
    let nginx = Nginx::start(NGINX_PAIRS);
    let port = free_port();
    let _d = Daemon::start(&config(port, &[nginx.url("/virtual")], ""), port);
    let table = format!("tcp:127.0.0.1:{port}");
    let (code, out, err) = postmap_q("Alice@Example.com", &table);
    assert_eq!(
        (code, out.as_str()),
        (0, "alice@mail.example.com\n"),
        "{err}"
    );
    let (code, out, err) = postmap_q("nobody@example.com", &table);
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", ""));
    assert_eq!(nginx.requests(), 2);
}

#[test]
fn nginx_map_takes_keys_and_values_literally() {
    // Keys nginx's map would otherwise read as its own keywords or as a
    // regex, quotes, and a value with a `$` (not a variable).
    let nginx = Nginx::start(&[
        ("default", "key-named-default"),
        ("~^regex", "tilde"),
        ("quote\"d@example.com", "quoted"),
        ("back\\slash@example.com", "slashed"),
        ("dollar@example.com", "pay$5;{x}"),
    ]);
    let port = free_port();
    let d = Daemon::start(&config(port, &[nginx.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("default"), "200 key-named-default\n");
    assert_eq!(c.get("~^regex"), "200 tilde\n");
    assert_eq!(c.get("regex"), "500 not found\n");
    assert_eq!(c.get("quote\"d@example.com"), "200 quoted\n");
    assert_eq!(c.get("back\\slash@example.com"), "200 slashed\n");
    assert_eq!(c.get("dollar@example.com"), "200 pay$5;{x}\n");
    assert_eq!(c.get("other@example.com"), "500 not found\n");
    assert_eq!(nginx.requests(), 7);
    drop(d);
}

// ---------------------------------------------------------------------------
// Body framings, connection handling (TestServer)
// ---------------------------------------------------------------------------

/// The chunked reply with chunk extensions and a trailer section.
const CHUNKED_WITH_EXTENSIONS: &[u8] = b"HTTP/1.1 200 OK\r\n\
Transfer-Encoding: chunked\r\n\
Trailer: X-Checksum\r\n\
\r\n\
5;name=value;flag\r\n\
chunk\r\n\
A ; spaced = \"quoted ext\"\r\n\
ed@x.test \r\n\
0;last\r\n\
X-Checksum: 1234\r\n\
X-Other: more\r\n\
\r\n";

#[test]
fn body_mode_framings() {
    let server = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "length@x.test" => Reply::body(200, b"by-length@x.test"),
        "chunked@x.test" => Reply::body(200, b"by-chunks@x.test\n").with_framing(Framing::Chunked),
        "extensions@x.test" => Reply::raw(CHUNKED_WITH_EXTENSIONS),
        "close@x.test" => {
            Reply::body(200, b"  by-close@x.test\r\n").with_framing(Framing::CloseDelimited)
        }
        "empty@x.test" => Reply::body(200, b""),
        _ => Reply::body(404, b"no such key"),
    });
    let port = free_port();
    let d = Daemon::start(
        &config(port, &[server.url("/body")], r#"result = "body""#),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("length@x.test"), "200 by-length@x.test\n");
    assert_eq!(c.get("chunked@x.test"), "200 by-chunks@x.test\n");
    assert_eq!(c.get("extensions@x.test"), "200 chunked@x.test\n");
    assert_eq!(c.get("nobody@x.test"), "500 not found\n");
    assert_eq!(c.get("empty@x.test"), "500 not found\n");
    assert_eq!(c.get("close@x.test"), "200 by-close@x.test\n");
    // The close-delimited reply ended its connection; this one opens another.
    assert_eq!(c.get("length2@x.test"), "500 not found\n");
    assert_eq!(server.requests(), 7);
    // Every framing kept the keep-alive connection in step: one connection
    // until the close-delimited reply, one after.
    assert_eq!(server.connections(), 2);
    assert_no_server_down(&d);
}

#[test]
fn header_mode_skips_bodies_of_every_framing() {
    let server = TestServer::start(|req: &Request| {
        let found = |v: &[u8]| match Reply::found(v) {
            Reply::Http { headers, .. } => Reply::Http {
                status: 200,
                headers,
                body: b"a body to skip\r\n\r\n0\r\n".to_vec(),
                framing: Framing::ContentLength,
                close: false,
            },
            _ => unreachable!(),
        };
        match req.key_str().as_str() {
            "length@x.test" => found(b"v-length"),
            "chunked@x.test" => found(b"v-chunked").with_framing(Framing::Chunked),
            "extensions@x.test" => {
                let mut raw = CHUNKED_WITH_EXTENSIONS.to_vec();
                let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                raw.splice(at + 2..at + 2, b"POSTFIX-DICT-RESULTS: v-ext\r\n".to_vec());
                Reply::Raw(raw)
            }
            // Interim 1xx heads are skipped; the final head counts.
            "continue@x.test" => Reply::raw(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-A: b\r\n\r\n\
HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: v-final\r\nContent-Length: 3\r\n\r\nabc",
            ),
            // Any 2XX carries a result; 204 has no body whatever it says.
            "nocontent@x.test" => {
                Reply::raw(b"HTTP/1.1 204 No Content\r\nPOSTFIX-DICT-RESULTS: v-204\r\n\r\n")
            }
            _ => Reply::not_found(),
        }
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    for _ in 0..2 {
        assert_eq!(c.get("length@x.test"), "200 v-length\n");
        assert_eq!(c.get("chunked@x.test"), "200 v-chunked\n");
        assert_eq!(c.get("extensions@x.test"), "200 v-ext\n");
        assert_eq!(c.get("continue@x.test"), "200 v-final\n");
        assert_eq!(c.get("nocontent@x.test"), "200 v-204\n");
        assert_eq!(c.get("none@x.test"), "500 not found\n");
    }
    // The second round came from the cache.
    assert_eq!(server.requests(), 6);
    assert_eq!(server.connections(), 1);
    assert_no_server_down(&d);
}

#[test]
fn connection_close_replies_work_repeatedly() {
    let server = TestServer::start(|req: &Request| {
        let v = format!("v-{}", req.key_str());
        Reply::found(v.as_bytes()).closing()
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    for i in 0..6 {
        let key = format!("k{i}@x.test");
        assert_eq!(c.get(&key), format!("200 v-{key}\n"));
    }
    assert_eq!(server.requests(), 6);
    assert_eq!(server.connections(), 6);
    assert_no_server_down(&d);
}

#[test]
fn http10_responses() {
    // HTTP/1.0 without keep-alive: the server closes after each reply.
    let plain = TestServer::start(|req: &Request| {
        let v = format!("v10-{}", req.key_str());
        Reply::http10(200, &[("POSTFIX-DICT-RESULTS", &v)], b"", false)
    });
    // HTTP/1.0 with Connection: keep-alive and a length: reusable.
    let kept = TestServer::start(|req: &Request| {
        let v = format!("ka-{}", req.key_str());
        Reply::http10(200, &[("POSTFIX-DICT-RESULTS", &v)], b"ignored", true)
    });
    // HTTP/1.0 body mode, close-delimited: the body is everything until EOF.
    let body = TestServer::start(|req: &Request| {
        let raw = format!("HTTP/1.0 200 OK\r\n\r\nbody-{}\n", req.key_str());
        Reply::raw_then_close(raw.as_bytes())
    });
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let cfg = config(p1, &[plain.url("/virtual")], "")
        + &map_section("kept", p2, &[kept.url("/virtual")], "")
        + &map_section("body", p3, &[body.url("/virtual")], r#"result = "body""#);
    let d = Daemon::start(&cfg, p1);
    let mut c1 = LineClient::connect(p1);
    let mut c2 = LineClient::connect(p2);
    let mut c3 = LineClient::connect(p3);
    for i in 0..3 {
        let key = format!("k{i}@x.test");
        assert_eq!(c1.get(&key), format!("200 v10-{key}\n"));
        assert_eq!(c2.get(&key), format!("200 ka-{key}\n"));
        assert_eq!(c3.get(&key), format!("200 body-{key}\n"));
    }
    assert_eq!((plain.requests(), plain.connections()), (3, 3));
    assert_eq!((kept.requests(), kept.connections()), (3, 1));
    assert_eq!((body.requests(), body.connections()), (3, 3));
    assert_no_server_down(&d);
}

#[test]
fn idle_pooled_connection_closed_by_server() {
    let server =
        TestServer::start(|req: &Request| Reply::found(format!("v-{}", req.key_str()).as_bytes()));
    server.close_idle_after(Some(Duration::from_millis(150)));
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x.test"), "200 v-a@x.test\n");
    // The server closes the pooled connection silently while it is idle.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(c.get("b@x.test"), "200 v-b@x.test\n");
    assert_eq!(server.requests(), 2);
    assert_eq!(server.connections(), 2);
    assert_no_server_down(&d);
}

#[test]
fn silent_close_right_after_each_reply() {
    // Keep-alive promised (HTTP/1.1, no Connection: close), then closed.
    let server = TestServer::start(|req: &Request| {
        Reply::found(format!("v-{}", req.key_str()).as_bytes()).then_close_silently()
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    for i in 0..5 {
        let key = format!("k{i}@x.test");
        assert_eq!(c.get(&key), format!("200 v-{key}\n"));
    }
    assert_eq!(server.requests(), 5);
    assert_eq!(server.connections(), 5);
    assert_no_server_down(&d);
}

#[test]
fn bytes_after_a_reply_are_never_taken_as_the_next_reply() {
    // The first reply is followed by an unsolicited second one: a
    // connection with bytes left over is out of step and must not be reused.
    let server = TestServer::start(|req: &Request| {
        let key = req.key_str();
        if req.connection == 1 && req.seq_on_connection == 1 {
            let mut raw = format!(
                "HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: v-{key}\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes();
            raw.extend_from_slice(
                b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: WRONG\r\nContent-Length: 0\r\n\r\n",
            );
            Reply::Raw(raw)
        } else {
            Reply::found(format!("v-{key}").as_bytes())
        }
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x.test"), "200 v-a@x.test\n");
    assert_eq!(c.get("b@x.test"), "200 v-b@x.test\n");
    assert_eq!(c.get("c@x.test"), "200 v-c@x.test\n");
    assert_eq!(server.requests(), 3);
    assert_eq!(server.connections(), 2);
    drop(d);
}

#[test]
fn pooled_connection_closed_as_the_request_arrives_is_retried_fresh() {
    // Every connection answers its first request and closes without a word
    // on the second: what the daemon sees when the server's keep-alive
    // timer fires just as a request goes out on a pooled connection.
    let server = TestServer::start(|req: &Request| {
        if req.seq_on_connection >= 2 {
            Reply::close_without_reply()
        } else {
            Reply::found(format!("v-{}", req.key_str()).as_bytes())
        }
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x.test"), "200 v-a@x.test\n");
    assert_eq!(c.get("b@x.test"), "200 v-b@x.test\n");
    assert_eq!(c.get("c@x.test"), "200 v-c@x.test\n");
    // a (conn 1); b on conn 1 dropped, b again on conn 2; c likewise, conn 3.
    assert_eq!(server.connections(), 3);
    assert_eq!(server.requests(), 5);
    let seen: Vec<(String, usize, usize)> = server
        .request_log()
        .iter()
        .map(|r| (r.key_str(), r.connection, r.seq_on_connection))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a@x.test".to_string(), 1, 1),
            ("b@x.test".to_string(), 1, 2),
            ("b@x.test".to_string(), 2, 1),
            ("c@x.test".to_string(), 2, 2),
            ("c@x.test".to_string(), 3, 1),
        ]
    );
    assert_no_server_down(&d);
}

#[test]
fn fresh_retry_after_a_stale_pooled_connection_happens_once() {
    // Only the very first request is answered; every later one is met with
    // a silent close, on a pooled connection and on a fresh one alike.
    let server = TestServer::start(|req: &Request| {
        if req.connection == 1 && req.seq_on_connection == 1 {
            Reply::found(b"first")
        } else {
            Reply::close_without_reply()
        }
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x.test"), "200 first\n");
    // b: the pooled connection fails (stale: retried), then the fresh one
    // fails too: that is the server's failure, and the lookup's end.
    assert_temp(&c.get("b@x.test"), "b@x.test");
    assert_eq!(server.requests(), 3);
    assert_eq!(server.connections(), 2);
    assert!(d.stderr().contains("is down"), "{}", d.stderr());
}

// ---------------------------------------------------------------------------
// The request: URL, key header, case folding
// ---------------------------------------------------------------------------

/// Decodes `%XX` escapes (and, if `plus_is_space`, `+` as a space, as
/// application/x-www-form-urlencoded query parsers in PHP, Python, Go, Java do).
fn url_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).expect("bad %XX"));
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[test]
fn key_goes_percent_encoded_into_url_and_raw_into_header() {
    let server = TestServer::start(|_: &Request| Reply::found(b"v"));
    let port = free_port();
    let d = Daemon::start(
        &config(
            port,
            &[server.url("/lookup/{key}?k={key}&x=1")],
            r#"fold_case = false
headers = { Authorization = "Bearer s3cret", X-Tenant = "t1" }"#,
        ),
        port,
    );
    let mut c = LineClient::connect(port);
    // tcp_table quoting: the key is "Ann O'Hara/x?&=#%;@exämple.com".
    let reply = c.query(b"get Ann%20O'Hara/x?&=#%25;@ex%C3%A4mple.com\n");
    assert_eq!(reply, b"200 v\n");
    let key = "Ann O'Hara/x?&=#%;@exämple.com";
    let enc = "Ann%20O%27Hara%2Fx%3F%26%3D%23%25%3B@ex%C3%A4mple.com";
    assert_eq!(server.paths(), vec![format!("/lookup/{enc}?k={enc}&x=1")]);
    let req = &server.request_log()[0];
    assert_eq!(req.method, "GET");
    // The header carries the key's bytes untouched (UTF-8, not re-encoded).
    assert_eq!(req.header("POSTFIX-DICT-EMAIL"), Some(key.as_bytes()));
    assert_eq!(
        req.header("Host")
            .map(|h| String::from_utf8_lossy(h).into_owned()),
        Some(format!("127.0.0.1:{}", server.port()))
    );
    // Configured extra headers go with every request.
    assert_eq!(req.header("Authorization"), Some(&b"Bearer s3cret"[..]));
    assert_eq!(req.header("X-Tenant"), Some(&b"t1"[..]));
    // A key with CR, LF or NUL cannot go into a header: a temporary error,
    // and nothing reaches the server.
    for bad in [
        "get a%0Db@x.test\n",
        "get a%0Ab@x.test\n",
        "get a%00b@x.test\n",
    ] {
        let reply = String::from_utf8(c.query(bad.as_bytes())).unwrap();
        assert_temp(&reply, bad);
    }
    assert_eq!(server.requests(), 1);
    drop(d);
}

#[test]
fn plus_in_key_survives_query_decoding() {
    // Address extensions (user+ext@domain) are common in Postfix lookups.
    let server = TestServer::start(|_: &Request| Reply::found(b"v"));
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/q?k={key}")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("user+ext@example.com"), "200 v\n");
    let path = server.paths()[0].clone();
    let value = path.strip_prefix("/q?k=").expect("path shape");
    // Both a path-style and a form-style decoder must give back the key.
    let decoded = |plus_is_space| String::from_utf8(url_decode(value, plus_is_space)).unwrap();
    assert_eq!(decoded(false), "user+ext@example.com", "path {path}");
    assert_eq!(decoded(true), "user+ext@example.com", "path {path}");
    drop(d);
}

fn case_map_server() -> TestServer {
    TestServer::with_map(&[
        ("alice@example.com", "lower"),
        ("Alice@Example.COM", "upper"),
        ("åsa@exämple.com", "åsa"),
    ])
}

#[test]
fn fold_case_true_lowercases_before_server_and_cache() {
    let server = case_map_server();
    let port = free_port();
    let d = Daemon::start(
        &config(port, &[server.url("/virtual")], "fold_case = true"),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("Alice@Example.COM"), "200 lower\n");
    assert_eq!(c.get("alice@example.com"), "200 lower\n");
    assert_eq!(c.get("ALICE@EXAMPLE.COM"), "200 lower\n");
    // UTF-8 keys fold too (as Postfix folds SMTPUTF8 keys); the value is %XX-quoted.
    assert_eq!(
        c.query(b"get %C3%85SA@Ex%C3%A4mple.com\n"),
        b"200 %C3%A5sa\n"
    );
    assert_eq!(server.requests(), 2);
    assert_eq!(
        server.keys(),
        vec![
            b"alice@example.com".to_vec(),
            "åsa@exämple.com".as_bytes().to_vec()
        ]
    );
    drop(d);
}

#[test]
fn fold_case_false_keeps_case() {
    let server = case_map_server();
    let port = free_port();
    let d = Daemon::start(
        &config(port, &[server.url("/virtual")], "fold_case = false"),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("Alice@Example.COM"), "200 upper\n");
    assert_eq!(c.get("alice@example.com"), "200 lower\n");
    assert_eq!(c.get("Alice@Example.COM"), "200 upper\n");
    assert_eq!(server.requests(), 2);
    assert_eq!(
        server.keys(),
        vec![b"Alice@Example.COM".to_vec(), b"alice@example.com".to_vec()]
    );
    drop(d);
}

// ---------------------------------------------------------------------------
// Coalescing, temporary errors, connection limits
// ---------------------------------------------------------------------------

/// `n` clients, each on its own connection, send `get key\n` at once;
/// returns their replies.
fn concurrent_gets(port: u16, keys: Vec<String>) -> Vec<String> {
    let barrier = Arc::new(Barrier::new(keys.len()));
    let handles: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut c = LineClient::connect(port);
                barrier.wait();
                c.get(&key)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn concurrent_lookups_of_one_key_make_one_request() {
    let server = TestServer::start(|req: &Request| {
        let reply = match req.key_str().as_str() {
            "hot@example.com" => Reply::found(b"hot-value"),
            "busy@example.com" => Reply::status(503, "try later"),
            _ => Reply::not_found(),
        };
        reply.delayed(Duration::from_millis(300))
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);

    let replies = concurrent_gets(port, vec!["hot@example.com".to_string(); 20]);
    assert_eq!(replies, vec!["200 hot-value\n".to_string(); 20]);
    assert_eq!(server.requests(), 1);

    let replies = concurrent_gets(port, vec!["cold@example.com".to_string(); 20]);
    assert_eq!(replies, vec!["500 not found\n".to_string(); 20]);
    assert_eq!(server.requests(), 2);

    // Waiters share a temporary error too, but it is not cached.
    let replies = concurrent_gets(port, vec!["busy@example.com".to_string(); 20]);
    assert_eq!(replies, vec!["400 try%20later\n".to_string(); 20]);
    assert_eq!(server.requests(), 3);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("busy@example.com"), "400 try%20later\n");
    assert_eq!(server.requests(), 4);
    assert_eq!(
        server.keys(),
        vec![
            b"hot@example.com".to_vec(),
            b"cold@example.com".to_vec(),
            b"busy@example.com".to_vec(),
            b"busy@example.com".to_vec()
        ]
    );
    drop(d);
}

#[test]
fn temporary_errors_are_not_cached() {
    let server = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "underscore@x.test" => Reply::Http {
            status: 200,
            headers: vec![("POSTFIX_DICT_RESULTS".into(), b"under-value".to_vec())],
            body: Vec::new(),
            framing: Framing::ContentLength,
            close: false,
        },
        _ => Reply::status(503, "db down"),
    });
    let port = free_port();
    let d = Daemon::start(&config(port, &[server.url("/virtual")], ""), port);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x.test"), "400 db%20down\n");
    assert_eq!(c.get("a@x.test"), "400 db%20down\n");
    assert_eq!(server.requests(), 2);
    // The `_` spelling of the result header is accepted (and cached).
    assert_eq!(c.get("underscore@x.test"), "200 under-value\n");
    assert_eq!(c.get("underscore@x.test"), "200 under-value\n");
    assert_eq!(server.requests(), 3);
    // 503 is an answer: the server is not rested.
    assert_eq!(c.get("a@x.test"), "400 db%20down\n");
    assert_eq!(server.requests(), 4);
    assert_eq!(server.connections(), 1);
    assert_no_server_down(&d);
}

#[test]
fn max_connections_bounds_connections_per_server() {
    let server = TestServer::start(|req: &Request| {
        Reply::found(format!("v-{}", req.key_str()).as_bytes()).delayed(Duration::from_millis(200))
    });
    let port = free_port();
    let cfg = config(port, &[server.url("/virtual")], "max_connections = 2")
        .replace("workers = 2", "workers = 1");
    let d = Daemon::start(&cfg, port);
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}@x.test")).collect();
    let replies = concurrent_gets(port, keys.clone());
    let want: Vec<String> = keys.iter().map(|k| format!("200 v-{k}\n")).collect();
    assert_eq!(replies, want);
    assert_eq!(server.requests(), 10);
    assert!(
        server.connections() <= 2,
        "{} connections with max_connections = 2",
        server.connections()
    );
    let distinct: HashSet<usize> = server.request_log().iter().map(|r| r.connection).collect();
    assert_eq!(distinct.len(), server.connections());
    assert_no_server_down(&d);
}

#[test]
fn max_connections_is_for_the_whole_daemon() {
    let server = TestServer::start(|req: &Request| {
        Reply::found(format!("v-{}", req.key_str()).as_bytes()).delayed(Duration::from_millis(300))
    });
    let port = free_port();
    // Each worker keeps its share of max_connections (2 + 1 here), so the
    // worker with one connection may queue up to all 20 lookups behind it
    // (20 x 300 ms): the lookup deadline leaves room for that.
    let cfg = config(port, &[server.url("/virtual")], "max_connections = 3")
        .replace("lookup_timeout = \"4s\"", "lookup_timeout = \"9s\"");
    let d = Daemon::start(&cfg, port);
    // 20 client connections: both workers get several of them.
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}@x.test")).collect();
    let replies = concurrent_gets(port, keys.clone());
    let want: Vec<String> = keys.iter().map(|k| format!("200 v-{k}\n")).collect();
    assert_eq!(replies, want);
    assert_eq!(server.requests(), 20);
    assert!(
        server.connections() <= 3,
        "{} connections with max_connections = 3 (2 workers)",
        server.connections()
    );
    drop(d);
}

#[test]
fn body_over_max_result_bytes_is_a_temporary_error() {
    let server = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "big@x.test" => Reply::body(200, &[b'x'; 101]),
        "chunked@x.test" => Reply::body(200, &[b'y'; 101]).with_framing(Framing::Chunked),
        _ => Reply::body(200, &[b'z'; 100]),
    });
    let port = free_port();
    let d = Daemon::start(
        &config(
            port,
            &[server.url("/body")],
            "result = \"body\"\nmax_result_bytes = 100",
        ),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("fits@x.test"), format!("200 {}\n", "z".repeat(100)));
    assert_temp(&c.get("big@x.test"), "big@x.test");
    assert_temp(&c.get("chunked@x.test"), "chunked@x.test");
    // Too big is the server's answer, not its failure.
    assert_eq!(c.get("fits2@x.test"), format!("200 {}\n", "z".repeat(100)));
    assert_eq!(server.requests(), 4);
    assert_no_server_down(&d);
}

#[test]
fn garbage_and_oversized_heads_are_temporary_errors() {
    let garbage = TestServer::start(|_: &Request| {
        Reply::Garbage(b"SSH-2.0-OpenSSH_9.2\r\nthis is not http\r\n\r\n".to_vec())
    });
    let huge = TestServer::start(|_: &Request| {
        let filler = "a".repeat(17 * 1024);
        let raw = format!(
            "HTTP/1.1 200 OK\r\nX-Filler: {filler}\r\nPOSTFIX-DICT-RESULTS: v\r\nContent-Length: 0\r\n\r\n"
        );
        Reply::raw(raw.as_bytes())
    });
    let mid = TestServer::start(|_: &Request| Reply::CloseMidReply);
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let cfg = config(p1, &[garbage.url("/virtual")], "")
        + &map_section("huge", p2, &[huge.url("/virtual")], "")
        + &map_section("mid", p3, &[mid.url("/virtual")], "");
    let d = Daemon::start(&cfg, p1);
    for (p, server) in [(p1, &garbage), (p2, &huge), (p3, &mid)] {
        let mut c = LineClient::connect(p);
        let reply = c.get("alice@example.com");
        assert_temp(&reply, &server.url("/virtual"));
        assert!(!reply.starts_with("500"), "{reply:?}");
        assert_eq!(server.requests(), 1, "{reply:?}");
    }
    drop(d);
}

/// `result = "json:/pointer"` against a real HTTP server: strings, numbers,
/// arrays joined with the separator, null/""/missing/404 as not found, and a
/// body that is not JSON as a temporary error.
#[test]
fn json_mode_results() {
    let server = TestServer::start(|req: &Request| match req.key_str().as_str() {
        "alice@x.test" => Reply::body(200, br#"{"result": "alice@mail.x.test", "n": 1}"#),
        "team@x.test" => Reply::body(200, br#"{"result": ["a@x.test", "b@x.test", ""]}"#),
        "uid@x.test" => Reply::body(200, br#"{"result": 1042}"#),
        "null@x.test" => Reply::body(200, br#"{"result": null}"#),
        "blank@x.test" => Reply::body(200, br#"{"result": ""}"#),
        "missing@x.test" => Reply::body(200, br#"{"other": "x"}"#),
        "gone@x.test" => Reply::body(404, br#"{"error": "no such user"}"#),
        "broken@x.test" => Reply::body(200, b"{not json"),
        "object@x.test" => Reply::body(200, br#"{"result": {"a": 1}}"#),
        _ => Reply::body(503, b"{}"),
    });
    let port = free_port();
    let d = Daemon::start(
        &config(
            port,
            &[server.url("/v1/lookup?address={key}")],
            "result = \"json:/result\"",
        ),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("alice@x.test"), "200 alice@mail.x.test\n");
    assert_eq!(c.get("team@x.test"), "200 a@x.test,%20b@x.test\n");
    assert_eq!(c.get("uid@x.test"), "200 1042\n");
    for k in [
        "null@x.test",
        "blank@x.test",
        "missing@x.test",
        "gone@x.test",
    ] {
        assert_eq!(c.get(k), "500 not found\n", "{k}");
    }
    for k in ["broken@x.test", "object@x.test", "other@x.test"] {
        let r = c.get(k);
        assert_temp(&r, k);
        c = LineClient::connect(port); // Postfix reconnects after a 400
    }
    assert_eq!(
        server.paths()[0],
        "/v1/lookup?address=alice@x.test",
        "the key goes into the query"
    );
    assert_eq!(server.requests(), 10);
    // JSON errors are the server's answers, not its failures: it does not rest.
    assert_no_server_down(&d);
}

/// Body mode: several non-empty lines are several results, joined with the
/// map's separator.
#[test]
fn body_mode_joins_lines_with_the_separator() {
    let server = TestServer::start(|_req: &Request| {
        Reply::body(
            200,
            b"  first@x.test\r\n\r\nsecond@x.test  \nthird@x.test\n",
        )
    });
    let port = free_port();
    let d = Daemon::start(
        &config(
            port,
            &[server.url("/list/{key}")],
            "result = \"body\"\nseparator = \" \"",
        ),
        port,
    );
    let mut c = LineClient::connect(port);
    assert_eq!(
        c.get("list@x.test"),
        "200 first@x.test%20second@x.test%20third@x.test\n"
    );
    assert_eq!(server.paths(), vec!["/list/list@x.test".to_string()]);
    drop(d);
}
