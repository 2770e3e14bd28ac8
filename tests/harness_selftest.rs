//! Tests of the test harness itself (tests/common): the scriptable HTTP
//! server, the postmap wrapper and the daemon launcher's failure path. None of
//! these need a working httpmapd.

mod common;

use common::{Acceptor, Framing, LineClient, Reply, TestServer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn connect(server: &TestServer) -> TcpStream {
    let s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads exactly as many bytes as `expected` has and compares them.
fn expect_bytes(s: &mut TcpStream, expected: &[u8]) {
    let mut got = vec![0u8; expected.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

fn expect_eof(s: &mut TcpStream) {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "", "expected EOF");
}

fn get(key: &str) -> Vec<u8> {
    format!("GET /virtual HTTP/1.1\r\nHost: t\r\nPOSTFIX-DICT-EMAIL: {key}\r\n\r\n").into_bytes()
}

#[test]
fn map_server_keeps_alive_and_counts() {
    let server = TestServer::with_map(&[("alice@example.com", "alice@mail.example.com")]);
    assert!(server.url("/virtual").starts_with("http://127.0.0.1:"));
    let mut s = connect(&server);
    // Two requests pipelined in one write, plus one with a body to discard.
    let mut both = get("alice@example.com");
    both.extend_from_slice(&get("nobody@example.com"));
    s.write_all(&both).unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: alice@mail.example.com\r\nContent-Length: 0\r\n\r\n",
    );
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS:\r\nContent-Length: 0\r\n\r\n",
    );
    s.write_all(b"GET / HTTP/1.1\r\nPOSTFIX_DICT_EMAIL: x\r\nContent-Length: 2\r\n\r\nab")
        .unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS:\r\nContent-Length: 0\r\n\r\n",
    );
    // Connection: close from the client is honoured.
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS:\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    expect_eof(&mut s);
    assert_eq!(server.requests(), 4);
    assert_eq!(server.connections(), 1);
    assert_eq!(
        server.keys(),
        vec![
            b"alice@example.com".to_vec(),
            b"nobody@example.com".to_vec(),
            b"x".to_vec()
        ]
    );
}

#[test]
fn chunked_and_close_delimited_bodies() {
    let server = TestServer::start(|req| {
        let framing = if req.path == "/chunked" {
            Framing::Chunked
        } else {
            Framing::CloseDelimited
        };
        Reply::Http {
            status: 200,
            headers: vec![],
            body: b"hello world".to_vec(),
            framing,
            close: false,
        }
    });
    let mut s = connect(&server);
    s.write_all(b"GET /chunked HTTP/1.1\r\n\r\n").unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    // Still open after a chunked reply.
    s.write_all(b"GET /close HTTP/1.1\r\n\r\n").unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world",
    );
    expect_eof(&mut s);
    assert_eq!(server.requests(), 2);
    assert_eq!(server.connections(), 1);
}

#[test]
fn status_garbage_mid_reply_and_delay() {
    let server = TestServer::start(|req| match req.key_str().as_str() {
        "status" => Reply::status(503, "db down"),
        "garbage" => Reply::Garbage(b"NOT HTTP\r\n".to_vec()),
        "mid" => Reply::CloseMidReply,
        _ => Reply::found(b"late").delayed(Duration::from_millis(200)),
    });
    let mut s = connect(&server);
    s.write_all(&get("status")).unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 503 Service Unavailable\r\nPOSTFIX-DICT-RETMSG: db down\r\nContent-Length: 0\r\n\r\n",
    );
    s.write_all(&get("garbage")).unwrap();
    expect_bytes(&mut s, b"NOT HTTP\r\n");
    expect_eof(&mut s);

    let mut s = connect(&server);
    s.write_all(&get("mid")).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n") && !got.ends_with(b"\r\n\r\n"));

    let mut s = connect(&server);
    let t = Instant::now();
    s.write_all(&get("slow")).unwrap();
    expect_bytes(
        &mut s,
        b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: late\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(server.connections(), 3);
    assert_eq!(server.requests(), 4);
}

#[test]
fn never_answer_ends_when_server_dropped() {
    let server = TestServer::start(|_| Reply::NeverAnswer);
    let mut s = connect(&server);
    s.write_all(&get("k")).unwrap();
    assert!(server.wait_for_requests(1, Duration::from_secs(10)));
    // Nothing arrives while the server holds the connection.
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let err = s.read(&mut byte).unwrap_err();
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    let t = Instant::now();
    drop(server);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        t.elapsed()
    );
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    expect_eof(&mut s);
}

#[test]
fn restart_on_same_port() {
    let server = TestServer::with_map(&[]);
    let addr = server.addr().to_string();
    drop(server);
    let again = TestServer::start_on(&addr, |_| Reply::not_found()).unwrap();
    assert_eq!(again.addr().to_string(), addr);
}

/// A fake tcp_table server: answers `200 v-KEY` for keys starting with "a",
/// `500 not found` otherwise, over keep-alive connections.
fn fake_tcp_table() -> Acceptor {
    Acceptor::start(|stream, _| {
        let mut w = stream.try_clone().unwrap();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)) {
            let Ok(line) = line else { return };
            let key = line.strip_prefix("get ").unwrap_or("");
            let reply = if key.starts_with('a') {
                format!("200 v-{key}\n")
            } else {
                "500 not found\n".to_string()
            };
            w.write_all(reply.as_bytes()).unwrap();
        }
    })
}

#[test]
fn postmap_against_fake_tcp_table() {
    let server = fake_tcp_table();
    let table = format!("tcp:127.0.0.1:{}", server.port());
    let (code, out, err) = common::postmap_q("alice", &table);
    assert_eq!((code, out.as_str()), (0, "v-alice\n"), "stderr: {err}");
    let (code, out, _) = common::postmap_q("bob", &table);
    assert_eq!((code, out.as_str()), (1, ""));
    let (code, out, err) = common::postmap_q_stdin("alice\nbob\nann\n", &table);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "alice\tv-alice\nann\tv-ann\n");
}

#[test]
fn postmap_against_closed_port_fails() {
    let table = format!("tcp:127.0.0.1:{}", common::free_port());
    let (code, _, err) = common::postmap_q("alice@example.com", &table);
    assert_ne!(code, 0);
    assert!(err.contains("query error"), "stderr: {err}");
}

#[test]
fn line_client_reads_lines_netstrings_and_eof() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"500 no\n13:OK some value,").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    });
    let mut c = LineClient::connect(port);
    assert_eq!(c.query(b"get x\n"), b"500 no\n");
    assert!(!c.is_closed_by_peer());
    assert_eq!(c.read_netstring(), b"OK some value");
    t.join().unwrap();
    assert!(c.is_closed_by_peer());
}

#[test]
#[should_panic(expected = "httpmapd")]
fn daemon_start_panics_when_binary_cannot_serve() {
    // An invalid config: the daemon must exit (or at least not listen on a
    // port nobody configured), and start() must panic rather than hang.
    let _d = common::Daemon::start("this is [not valid toml", common::free_port());
}
