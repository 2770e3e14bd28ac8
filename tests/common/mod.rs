//! Shared harness for the integration tests: a scriptable HTTP/1.1 backend
//! (`TestServer`) and the raw TCP server under it and the tests' own
//! servers (`Acceptor`), the real `httpmapd` binary under test (`Daemon`:
//! start, signals, reload, its log; `run_check`), clients for the Postfix
//! side (`postmap_q`, `LineClient`), a private real nginx (`NginxProcess`,
//! and `Nginx` serving dict_http from it), the daemon's stats listener
//! (`stats_get`, `metrics`, `metric`), small helpers (log lines, replies,
//! netstrings, programs, /proc), a private real Postfix instance (the
//! `postfix` submodule) and a test PKI (the `pki` submodule: CAs and the
//! certificates they issue, written to a temporary directory).
//!
//! Everything talks over real loopback sockets; nothing here knows the
//! daemon's internals. Most `tests/*.rs` do `mod common;`; not every test
//! uses every item, hence the `dead_code` allowances.
//!
//! A test that needs a component that is not installed (postmap, nginx,
//! redis-server, promtool, ...) fails, with [`missing`] saying which and how
//! to get it: in CI or not, it never passes without having tested.

#![allow(dead_code)]

pub mod pki;
pub mod postfix;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The running test's name (its thread's name, which cargo test sets).
pub fn test_name() -> String {
    thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string()
}

/// Fails the running test because `component` is not installed here: a
/// test that needs a missing component fails, in CI or not (it never
/// passes without having tested). `how` says how to get it, e.g. "the
/// Debian package nginx-light (apt-get install nginx-light)".
#[track_caller]
pub fn missing(component: &str, how: &str) -> ! {
    panic!(
        "\n{}: FAILED: this test needs {component}, which is not installed. \
         Get it: {how}. (`.ci/run` installs everything the tests need.)\n",
        test_name()
    )
}

// ---------------------------------------------------------------------------
// (a) The scriptable HTTP backend
// ---------------------------------------------------------------------------

/// Largest request head the test server reads before giving up on a client.
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// One request as the test server parsed it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    /// The HTTP version's minor number: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body (`Content-Length` bytes; empty without one).
    pub body: Vec<u8>,
    /// The `POSTFIX-DICT-EMAIL` header (or `POSTFIX_DICT_EMAIL`), if any.
    pub key: Option<Vec<u8>>,
    /// Which TCP connection carried it: 1 for the first one the server
    /// accepted, 2 for the second, ...
    pub connection: usize,
    /// Its place on that connection: 1 for the first request, 2 for the
    /// second (a reused keep-alive connection), ...
    pub seq_on_connection: usize,
}

impl Request {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The key as text (lossy), or "" if none.
    pub fn key_str(&self) -> String {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default()
    }
}

/// How a `Reply::Http` body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: N` (added by the server).
    ContentLength,
    /// `Transfer-Encoding: chunked`; the body is sent in two chunks when it
    /// has two bytes or more, to exercise chunk boundaries.
    Chunked,
    /// No length: the body ends when the server closes the connection.
    CloseDelimited,
}

/// What the test server does with one request.
// `CloseMidReply` is the name the tests use, though it ends in "Reply".
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone)]
pub enum Reply {
    /// A normal response. `close`: send Connection: close and close after.
    /// The server adds the framing headers (`Content-Length`,
    /// `Transfer-Encoding`, `Connection: close`) itself.
    Http {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        framing: Framing,
        close: bool,
    },
    /// Write these raw bytes then close.
    Garbage(Vec<u8>),
    /// Read the request, then hold the connection open without answering
    /// (until the server is dropped).
    NeverAnswer,
    /// Write half of a valid head then close.
    CloseMidReply,
    /// Wait, then do the inner reply.
    Delay(Duration, Box<Reply>),
    /// Write these raw bytes and keep the connection open for the next
    /// request (the bytes must frame themselves, e.g. a chunked body or an
    /// HTTP/1.0 head with `Connection: keep-alive` and `Content-Length`).
    Raw(Vec<u8>),
    /// Do the inner reply, then close the connection silently: no
    /// `Connection: close` header is added, as when a server's idle
    /// keep-alive timer fires right after it answered.
    SilentClose(Box<Reply>),
}

impl Reply {
    /// `200` with `POSTFIX-DICT-RESULTS: v`, Content-Length framing, keep-alive.
    pub fn found(v: &[u8]) -> Reply {
        Reply::header_reply(200, "POSTFIX-DICT-RESULTS", v)
    }

    /// `200` with an empty `POSTFIX-DICT-RESULTS:` header.
    pub fn not_found() -> Reply {
        Reply::header_reply(200, "POSTFIX-DICT-RESULTS", b"")
    }

    /// Status `code` with `POSTFIX-DICT-RETMSG: retmsg`.
    pub fn status(code: u16, retmsg: &str) -> Reply {
        Reply::header_reply(code, "POSTFIX-DICT-RETMSG", retmsg.as_bytes())
    }

    /// A response with only a body (for `result = "body"` maps).
    pub fn body(status: u16, body: &[u8]) -> Reply {
        Reply::Http {
            status,
            headers: Vec::new(),
            body: body.to_vec(),
            framing: Framing::ContentLength,
            close: false,
        }
    }

    /// This reply, after `d`.
    pub fn delayed(self, d: Duration) -> Reply {
        Reply::Delay(d, Box::new(self))
    }

    /// This reply, then a silent close (see [`Reply::SilentClose`]).
    pub fn then_close_silently(self) -> Reply {
        Reply::SilentClose(Box::new(self))
    }

    /// Raw bytes on a connection that stays open (see [`Reply::Raw`]).
    pub fn raw(bytes: &[u8]) -> Reply {
        Reply::Raw(bytes.to_vec())
    }

    /// Raw bytes, then close (the same as [`Reply::Garbage`], named for
    /// valid replies such as an HTTP/1.0 response without keep-alive).
    pub fn raw_then_close(bytes: &[u8]) -> Reply {
        Reply::Garbage(bytes.to_vec())
    }

    /// Read the request, then close the connection without a byte of reply:
    /// what a client sees when the server closed its idle keep-alive
    /// connection just as the request was sent.
    pub fn close_without_reply() -> Reply {
        Reply::Garbage(Vec::new())
    }

    /// A `Reply::Http` with this framing instead (other variants unchanged).
    pub fn with_framing(self, framing: Framing) -> Reply {
        match self {
            Reply::Http {
                status,
                headers,
                body,
                close,
                ..
            } => Reply::Http {
                status,
                headers,
                body,
                framing,
                close,
            },
            other => other,
        }
    }

    /// A `Reply::Http` that sends `Connection: close` and closes (other variants unchanged).
    pub fn closing(self) -> Reply {
        match self {
            Reply::Http {
                status,
                headers,
                body,
                framing,
                ..
            } => Reply::Http {
                status,
                headers,
                body,
                framing,
                close: true,
            },
            other => other,
        }
    }

    /// A complete HTTP/1.0 response with `Content-Length` and these headers.
    /// `keep_alive`: send `Connection: keep-alive` and keep the connection
    /// open ([`Reply::Raw`]); otherwise close after it, as HTTP/1.0 does.
    pub fn http10(status: u16, headers: &[(&str, &str)], body: &[u8], keep_alive: bool) -> Reply {
        let mut out = format!("HTTP/1.0 {} {}\r\n", status, reason(status)).into_bytes();
        for (name, value) in headers {
            out.extend_from_slice(format!("{}: {}\r\n", name, value).as_bytes());
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        if keep_alive {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        if keep_alive {
            Reply::Raw(out)
        } else {
            Reply::Garbage(out)
        }
    }

    fn header_reply(status: u16, name: &str, value: &[u8]) -> Reply {
        Reply::Http {
            status,
            headers: vec![(name.to_string(), value.to_vec())],
            body: Vec::new(),
            framing: Framing::ContentLength,
            close: false,
        }
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync + 'static;

/// State shared by the connection threads and the owner.
struct Shared {
    handler: Box<Handler>,
    stop: AtomicBool,
    requests: AtomicUsize,
    /// Keys and requests in arrival order: the first [`MAX_LOGGED_REQUESTS`]
    /// (a soak sends millions; the counts stay exact).
    keys: Mutex<Vec<Vec<u8>>>,
    log: Mutex<Vec<Request>>,
    /// Close a keep-alive connection silently after this long without a request.
    idle_close: Mutex<Option<Duration>>,
}

/// Requests a test server keeps in its log (see [`TestServer::request_log`]).
pub const MAX_LOGGED_REQUESTS: usize = 100_000;

/// A scriptable HTTP/1.1 server on 127.0.0.1: one thread per connection
/// (an [`Acceptor`]), keep-alive, request bodies (`Content-Length`) read and
/// kept. Dropping it stops accepting and shuts down every connection.
pub struct TestServer {
    shared: Arc<Shared>,
    acceptor: Acceptor,
}

impl TestServer {
    /// Starts on 127.0.0.1:0 with a handler called for each request (from several threads).
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> TestServer {
        TestServer::start_on("127.0.0.1:0", handler).expect("bind test server")
    }

    /// Starts on a given address (e.g. to bring a "failed" server back on
    /// the port it had).
    pub fn start_on(
        addr: &str,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> io::Result<TestServer> {
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            stop: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
            keys: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            idle_close: Mutex::new(None),
        });
        let conn_shared = Arc::clone(&shared);
        let acceptor = Acceptor::start_on(addr, move |stream, serial| {
            let _ = serve_connection(stream, &conn_shared, serial);
        })?;
        Ok(TestServer { shared, acceptor })
    }

    /// A map-backed handler: found for keys in the map, not found otherwise.
    /// Keys match exactly (no case folding: the test sees what was sent).
    pub fn with_map(pairs: &[(&str, &str)]) -> TestServer {
        let map: std::collections::HashMap<Vec<u8>, Vec<u8>> = pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        TestServer::start(move |req| match req.key.as_ref().and_then(|k| map.get(k)) {
            Some(v) => Reply::found(v),
            None => Reply::not_found(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    pub fn port(&self) -> u16 {
        self.acceptor.port()
    }

    /// "http://127.0.0.1:PORT{path}"
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    /// How many requests reached the server (counted when the head is parsed,
    /// before the handler runs).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Keys seen (requests without a key are skipped), in arrival order.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.shared.keys.lock().unwrap().clone()
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.acceptor.accepted()
    }

    /// Every request so far (with or without a key), in arrival order.
    pub fn request_log(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The request targets (path and query) so far, in arrival order.
    pub fn paths(&self) -> Vec<String> {
        self.request_log().into_iter().map(|r| r.path).collect()
    }

    /// From now on, a connection that waits this long for its next request
    /// is closed silently (no `Connection: close` was ever sent), like a
    /// server's keep-alive timeout. `None` (the default): never.
    pub fn close_idle_after(&self, idle: Option<Duration>) {
        *self.shared.idle_close.lock().unwrap() = idle;
    }

    /// Polls (every 10 ms) until at least `n` requests arrived; false on timeout.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.requests() < n {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Stops accepting and shuts every connection down (the acceptor's drop,
/// after this): blocked reads (NeverAnswer, idle keep-alive) return EOF and
/// their threads end; clients see EOF.
impl Drop for TestServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// A raw TCP server on 127.0.0.1, for the tests' own protocols and
/// misbehaving peers: each connection it accepts goes to `serve` with its
/// serial number (1 for the first) on a thread of its own, and is closed
/// when `serve` returns. Dropping it stops accepting and shuts down the
/// connections still open (their reads see EOF, their writes fail).
pub struct Acceptor {
    addr: SocketAddr,
    shared: Arc<AcceptorShared>,
    thread: Option<JoinHandle<()>>,
}

struct AcceptorShared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    /// Clones of the connections still open (by serial), so `drop` can shut
    /// them all down; a connection's thread removes its own when it ends.
    streams: Mutex<std::collections::HashMap<usize, TcpStream>>,
}

impl Acceptor {
    /// On a free port of 127.0.0.1.
    pub fn start(serve: impl Fn(TcpStream, usize) + Send + Sync + 'static) -> Acceptor {
        Acceptor::start_on("127.0.0.1:0", serve).expect("bind 127.0.0.1:0")
    }

    /// On a given address (e.g. to come back on the port a server had).
    pub fn start_on(
        addr: &str,
        serve: impl Fn(TcpStream, usize) + Send + Sync + 'static,
    ) -> io::Result<Acceptor> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(AcceptorShared {
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            streams: Mutex::new(std::collections::HashMap::new()),
        });
        let sh = Arc::clone(&shared);
        let serve = Arc::new(serve);
        let thread = thread::Builder::new()
            .name(format!("acceptor-{}", addr.port()))
            .spawn(move || {
                for stream in listener.incoming() {
                    if sh.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let stream = match stream {
                        Ok(s) => s,
                        // EMFILE and friends: do not spin.
                        Err(_) => {
                            thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let serial = sh.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                    {
                        let mut streams = sh.streams.lock().unwrap();
                        // Checked under the lock so drop cannot miss this stream.
                        if sh.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Ok(clone) = stream.try_clone() {
                            streams.insert(serial, clone);
                        }
                    }
                    let (sh, serve) = (Arc::clone(&sh), Arc::clone(&serve));
                    thread::spawn(move || {
                        serve(stream, serial);
                        sh.streams.lock().unwrap().remove(&serial);
                    });
                }
            })?;
        Ok(Acceptor {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections it accepted.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so it sees the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (_, s) in self.shared.streams.lock().unwrap().drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Outcome of parsing a request head at the start of a buffer.
enum Parsed {
    Incomplete,
    Complete {
        request: Request,
        head_len: usize,
        body_len: usize,
        client_wants_close: bool,
    },
}

fn parse_request(buf: &[u8]) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf).map_err(|e| e.to_string())? {
        httparse::Status::Partial => return Ok(Parsed::Incomplete),
        httparse::Status::Complete(n) => n,
    };
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let key = find("POSTFIX-DICT-EMAIL").or_else(|| find("POSTFIX_DICT_EMAIL"));
    let body_len = match find("Content-Length") {
        Some(v) => String::from_utf8_lossy(&v)
            .trim()
            .parse()
            .map_err(|_| "bad Content-Length".to_string())?,
        None => 0,
    };
    let connection_close = find("Connection")
        .map(|v| {
            String::from_utf8_lossy(&v)
                .to_ascii_lowercase()
                .contains("close")
        })
        .unwrap_or(false);
    let client_wants_close = connection_close || req.version == Some(0);
    Ok(Parsed::Complete {
        request: Request {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
            version: req.version.unwrap_or(0),
            headers,
            body: Vec::new(),
            key,
            connection: 0,
            seq_on_connection: 0,
        },
        head_len,
        body_len,
        client_wants_close,
    })
}

fn serve_connection(mut stream: TcpStream, shared: &Shared, serial: usize) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut seq = 0;
    loop {
        // Waiting for the next request: close silently if idle too long.
        if buf.is_empty() {
            let idle = *shared.idle_close.lock().unwrap();
            if let Some(idle) = idle {
                stream.set_read_timeout(Some(idle))?;
                match read_more(&mut stream, &mut buf) {
                    Ok(true) => {}
                    Ok(false) => return close(stream),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        return close(stream)
                    }
                    Err(e) => return Err(e),
                }
                stream.set_read_timeout(None)?;
            }
        }
        // Read one request head (and its body) from the buffer and the socket.
        let (mut request, client_wants_close) = loop {
            match parse_request(&buf) {
                Ok(Parsed::Complete {
                    mut request,
                    head_len,
                    body_len,
                    client_wants_close,
                }) => {
                    while buf.len() < head_len + body_len {
                        if !read_more(&mut stream, &mut buf)? {
                            return Ok(());
                        }
                    }
                    request.body = buf[head_len..head_len + body_len].to_vec();
                    buf.drain(..head_len + body_len);
                    break (request, client_wants_close);
                }
                Ok(Parsed::Incomplete) if buf.len() < MAX_REQUEST_HEAD_BYTES => {
                    if !read_more(&mut stream, &mut buf)? {
                        return Ok(());
                    }
                }
                _ => {
                    stream.write_all(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )?;
                    return close(stream);
                }
            }
        };
        seq += 1;
        request.connection = serial;
        request.seq_on_connection = seq;
        {
            let mut log = shared.log.lock().unwrap();
            if log.len() < MAX_LOGGED_REQUESTS {
                log.push(request.clone());
                if let Some(key) = &request.key {
                    shared.keys.lock().unwrap().push(key.clone());
                }
            }
        }
        // Counted last, so a test that saw the count also sees the logs.
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let reply = (shared.handler)(&request);
        if !perform(&mut stream, reply, client_wants_close, shared)? {
            return close(stream);
        }
    }
}

/// Reads more bytes into `buf`; false on EOF.
fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn close(stream: TcpStream) -> io::Result<()> {
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// Carries out one reply; returns whether the connection stays open.
fn perform(
    stream: &mut TcpStream,
    reply: Reply,
    client_wants_close: bool,
    shared: &Shared,
) -> io::Result<bool> {
    match reply {
        Reply::Http {
            status,
            headers,
            body,
            framing,
            close,
        } => {
            let close = close || client_wants_close || framing == Framing::CloseDelimited;
            let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason(status)).into_bytes();
            for (name, value) in &headers {
                out.extend_from_slice(name.as_bytes());
                out.push(b':');
                if !value.is_empty() {
                    out.push(b' ');
                    out.extend_from_slice(value);
                }
                out.extend_from_slice(b"\r\n");
            }
            match framing {
                Framing::ContentLength => {
                    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes())
                }
                Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
                Framing::CloseDelimited => {}
            }
            if close {
                out.extend_from_slice(b"Connection: close\r\n");
            }
            out.extend_from_slice(b"\r\n");
            match framing {
                Framing::Chunked => {
                    let (a, b) = body.split_at(body.len() / 2);
                    for chunk in [a, b] {
                        if !chunk.is_empty() {
                            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                            out.extend_from_slice(chunk);
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                _ => out.extend_from_slice(&body),
            }
            stream.write_all(&out)?;
            Ok(!close)
        }
        Reply::Garbage(bytes) => {
            stream.write_all(&bytes)?;
            Ok(false)
        }
        Reply::NeverAnswer => {
            // Hold the connection: wait until the peer closes or `drop`
            // shuts the socket down (read returns 0 or an error).
            let mut sink = [0u8; 1024];
            while let Ok(n) = stream.read(&mut sink) {
                if n == 0 || shared.stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            Ok(false)
        }
        Reply::CloseMidReply => {
            stream.write_all(b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESU")?;
            Ok(false)
        }
        Reply::Delay(d, inner) => {
            // Sleep in slices so a dropped server does not wait out long delays.
            let deadline = Instant::now() + d;
            while Instant::now() < deadline {
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                thread::sleep(left.min(Duration::from_millis(20)));
            }
            perform(stream, *inner, client_wants_close, shared)
        }
        Reply::Raw(bytes) => {
            stream.write_all(&bytes)?;
            Ok(!client_wants_close)
        }
        Reply::SilentClose(inner) => {
            perform(stream, *inner, client_wants_close, shared)?;
            Ok(false)
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Whatever",
    }
}

// ---------------------------------------------------------------------------
// (b) The daemon under test
// ---------------------------------------------------------------------------

/// A free loopback port for a daemon or server to listen on, taken below the
/// kernel's ephemeral range when there is room: the many outgoing
/// connections the tests make come from that range and could take a port
/// between this pick and the bind ("Address already in use"). Ports are
/// handed out in turn from a per-process start, each checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let lo: usize = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    const SPAN: usize = 10_000;
    if lo >= SPAN + 1024 {
        let base = lo - SPAN;
        let start = std::process::id() as usize * 7_919;
        for _ in 0..SPAN {
            let p = (base + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % SPAN) as u16;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return p;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A fresh, empty directory under the system temp dir, unique per process,
/// call and instant.
pub fn unique_temp_dir(prefix: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "{}-{}-{}-{}",
        prefix,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        nanos
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The real `httpmapd` binary, running with a config written for the test.
/// Dropping it kills the process and removes its temp dir (printing its
/// stderr first if the test is panicking).
pub struct Daemon {
    pub child: Child,
    /// The temp dir holding `httpmapd.toml`, `stderr.log` and `stdout.log`.
    pub dir: PathBuf,
    pub config_path: PathBuf,
}

impl Daemon {
    /// Writes `config` (TOML text) to a fresh temp dir as httpmapd.toml,
    /// starts the binary with ["-c", path], stderr captured to a file in the
    /// temp dir, and waits (up to 10 s, polling every 20 ms) until TCP connect
    /// to `ready_port` on 127.0.0.1 succeeds; panics with the daemon's stderr
    /// if it exits or never becomes ready.
    pub fn start(config: &str, ready_port: u16) -> Daemon {
        Daemon::start_command(config, ready_port, |config_path| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_httpmapd"));
            c.arg("-c").arg(config_path);
            c
        })
    }

    /// As `start`, running the command `make(CONFIG_PATH)` (e.g. with more
    /// environment variables, or inside another program); its stdio is
    /// set here.
    pub fn start_command(
        config: &str,
        ready_port: u16,
        make: impl FnOnce(&Path) -> Command,
    ) -> Daemon {
        let dir = unique_temp_dir("httpmapd-test");
        let config_path = dir.join("httpmapd.toml");
        std::fs::write(&config_path, config).expect("write config");
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("create stderr.log");
        let stdout = std::fs::File::create(dir.join("stdout.log")).expect("create stdout.log");
        let child = make(&config_path)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn httpmapd");
        let mut daemon = Daemon {
            child,
            dir,
            config_path,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready_addr = SocketAddr::from(([127, 0, 0, 1], ready_port));
        loop {
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                panic!(
                    "httpmapd exited before becoming ready ({}); stderr:\n{}",
                    status,
                    daemon.stderr()
                );
            }
            if TcpStream::connect_timeout(&ready_addr, Duration::from_millis(200)).is_ok() {
                return daemon;
            }
            if Instant::now() >= deadline {
                panic!(
                    "httpmapd not listening on {} after 10 s; stderr:\n{}",
                    ready_addr,
                    daemon.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it logged to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`, `libc::SIGHUP`) to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {})", self.pid(), sig);
    }

    /// Waits up to `timeout` for the daemon to exit; None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 10 s) until the daemon catches every one of `signals`
    /// (e.g. `libc::SIGHUP`): its handlers are installed a moment after its
    /// listeners accept, so `start` may return before them, and a signal
    /// sent then would meet the default action. Panics if they are not.
    pub fn wait_handling(&self, signals: &[i32]) {
        let pid = self.pid();
        assert!(
            wait_until(Duration::from_secs(10), || {
                signals.iter().all(|&s| catches(pid, s))
            }),
            "httpmapd does not handle the signals {signals:?}:\n{}",
            self.stderr()
        );
    }

    /// Waits up to `within` until its stderr has a line containing
    /// `needle`; returns the stderr (panics with it if there is none).
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let mut text = String::new();
        let found = wait_until(within, || {
            text = self.stderr();
            text.contains(needle)
        });
        assert!(found, "no {needle:?} in the log within {within:?}:\n{text}");
        text
    }

    /// Sends SIGHUP and waits (up to 10 s) for its outcome in the log:
    /// Ok(the new "reloaded" line) or Err(the new "reload refused" line).
    /// Panics if neither comes.
    pub fn reload(&self) -> Result<String, String> {
        let before = self.stderr();
        let done = log_lines(&before, "reloaded ").len();
        let refused = log_lines(&before, "reload refused").len();
        self.signal(libc::SIGHUP);
        let mut text = String::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                text = self.stderr();
                log_lines(&text, "reloaded ").len() > done
                    || log_lines(&text, "reload refused").len() > refused
            }),
            "neither reloaded nor refused after 10 s:\n{text}"
        );
        match log_lines(&text, "reloaded ").get(done) {
            Some(line) => Ok(line.clone()),
            None => Err(log_lines(&text, "reload refused").swap_remove(refused)),
        }
    }

    /// As [`Daemon::reload`], which must succeed: the new "reloaded" line
    /// (panics, with the log, on "reload refused").
    pub fn reload_ok(&self) -> String {
        self.reload()
            .unwrap_or_else(|refused| panic!("reload refused: {refused}\n{}", self.stderr()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- httpmapd stderr ({}) ----\n{}---- end ----",
                self.dir.display(),
                self.stderr()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `httpmapd -c PATH --check` (stdin closed) with these extra
/// environment variables: (exit code, stdout, stderr). Panics if it could
/// not run or was killed.
pub fn run_check(path: &Path, env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_httpmapd"));
    c.arg("-c").arg(path).arg("--check").stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run httpmapd --check");
    (
        out.status.code().expect("exited, not killed"),
        show(&out.stdout),
        show(&out.stderr),
    )
}

// ---------------------------------------------------------------------------
// (c) Clients: Postfix's postmap, and a raw line client
// ---------------------------------------------------------------------------

/// How long a postmap run may take before the harness kills it. Postfix's own
/// timeouts are 100 s; a reconnect loop against a dead port takes ~11 s.
const POSTMAP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs Postfix's own `postmap -q KEY TABLE` with MAIL_CONFIG pointing at a
/// temp dir holding an empty main.cf; fails the test when postmap is not
/// installed. Returns (exit code, stdout, stderr). Note postmap exits 1
/// both for "not found" and for a fatal query error; tell them apart by
/// stderr.
pub fn postmap_q(key: &str, table: &str) -> (i32, String, String) {
    run_postmap(&["-q", key, table], None)
}

/// `postmap -q - TABLE` with `input` on stdin (many keys over one connection).
/// stdout has one "key<TAB>value" line per key found.
pub fn postmap_q_stdin(input: &str, table: &str) -> (i32, String, String) {
    run_postmap(&["-q", "-", table], Some(input))
}

fn run_postmap(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let postmap = postfix::program("postmap");
    let config_dir = unique_temp_dir("httpmapd-postmap");
    // An empty main.cf, dated back (see `postfix::write_old_file`).
    postfix::write_old_file(&config_dir.join("main.cf"), "");
    let out_path = config_dir.join("stdout");
    let err_path = config_dir.join("stderr");
    let path = format!(
        "/usr/sbin:/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(&postmap)
        .args(args)
        .env("MAIL_CONFIG", &config_dir)
        .env("PATH", path)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(std::fs::File::create(&out_path).expect("create stdout"))
        .stderr(std::fs::File::create(&err_path).expect("create stderr"))
        .spawn()
        .expect("spawn postmap");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // Postmap may exit early (fatal error) and close its stdin.
        let _ = pipe.write_all(input.as_bytes());
    }
    let deadline = Instant::now() + POSTMAP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait postmap") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "postmap {:?} did not finish within {:?}; stderr:\n{}",
                args,
                POSTMAP_TIMEOUT,
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&config_dir);
    (status.code().unwrap_or(-1), stdout, stderr)
}

/// How long `LineClient` waits for a reply before failing the test.
const LINE_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw client for line (tcp_table) and netstring (socketmap) protocols.
pub struct LineClient {
    stream: TcpStream,
    /// Bytes received but not yet returned.
    buf: Vec<u8>,
}

impl LineClient {
    /// Connects to 127.0.0.1:port (panics on failure).
    pub fn connect(port: u16) -> LineClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{}: {}", port, e));
        let _ = stream.set_nodelay(true);
        LineClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("LineClient send");
    }

    /// Reads more bytes; panics on timeout; returns false on EOF.
    fn fill(&mut self, timeout: Duration) -> bool {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "no reply within {:?} (have {:?})",
                    timeout,
                    String::from_utf8_lossy(&self.buf)
                )
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("LineClient read: {}", e),
        }
    }

    /// One reply line including its '\n'. Panics after 10 s without one, or
    /// on EOF before a complete line.
    pub fn read_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return self.buf.drain(..=i).collect();
            }
            if !self.fill(LINE_CLIENT_TIMEOUT) {
                panic!(
                    "connection closed before a complete line (have {:?})",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// Sends `req` and reads one reply line.
    pub fn query(&mut self, req: &[u8]) -> Vec<u8> {
        self.send(req);
        self.read_line()
    }

    /// One netstring `LEN:payload,`; returns the payload (panics if it is
    /// malformed, after 10 s without a byte, or on EOF before its end).
    pub fn read_netstring(&mut self) -> Vec<u8> {
        read_netstring(self)
    }

    /// Sends a socketmap request `name key` as a netstring and reads the reply payload.
    pub fn socketmap_query(&mut self, name: &str, key: &[u8]) -> Vec<u8> {
        self.send(&netstring(&[format!("{name} ").as_bytes(), key].concat()));
        self.read_netstring()
    }

    /// A tcp_table lookup: sends `get KEY\n` (the key as given, no `%XX`
    /// quoting) and returns the reply line as text, byte for byte (it must
    /// be UTF-8).
    pub fn get(&mut self, key: &str) -> String {
        let reply = self.query(format!("get {key}\n").as_bytes());
        String::from_utf8(reply)
            .unwrap_or_else(|e| panic!("the reply to get {key} is not UTF-8: {e}"))
    }

    /// Whether the peer has closed the connection: waits up to 1 s for EOF
    /// (or a reset). Unread data is kept for later reads and means "open".
    pub fn is_closed_by_peer(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        }
    }

    /// The underlying stream (e.g. to shut down the write side).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// The bytes received: those already buffered first. Panics after 10 s
/// without any; 0 at EOF.
impl Read for LineClient {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buf.is_empty() && !self.fill(LINE_CLIENT_TIMEOUT) {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        Ok(n)
    }
}

/// Reads a file relative to the crate root (for checking shipped configs).
pub fn crate_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// ---------------------------------------------------------------------------
// (d) A private real nginx, and one speaking dict_http
// ---------------------------------------------------------------------------

/// The `POSTFIX-DICT-RETMSG` the nginx of [`Nginx`] sends with its 503s.
pub const NGINX_RETMSG: &str = "service in maintenance";

/// The nginx binary, looked up on PATH and then in /usr/sbin; fails the
/// test (see [`missing`]) when nginx is not installed.
pub fn nginx_path() -> PathBuf {
    find_program("nginx", &["$PATH", "/usr/sbin"]).unwrap_or_else(|| {
        missing(
            "nginx",
            "the Debian package nginx-light (apt-get install nginx-light)",
        )
    })
}

/// One line of the private nginx's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxLogLine {
    /// nginx's serial number of the TCP connection (`$connection`).
    pub connection: u64,
    /// The request's place on that connection, from 1 (`$connection_requests`).
    pub connection_requests: u64,
    pub status: u16,
    /// `$request_uri`: the path and query as sent.
    pub uri: String,
    /// The `POSTFIX-DICT-EMAIL` header as nginx logged it (`-` if none;
    /// bytes outside printable ASCII appear as `\xHH`).
    pub key: String,
}

/// A private nginx (its own prefix directory, pid file, logs and temp dirs;
/// one worker; on a free 127.0.0.1 port) serving dict_http from a fixed map:
///
/// - any path but those below: `200` with `POSTFIX-DICT-RESULTS: value`
///   for a known key, no such header (not found) otherwise;
/// - `/body/...`: `200` with the value as the body, `404` for an unknown key
///   (for `result = "body"`);
/// - `/unavailable...`: `503` with `POSTFIX-DICT-RETMSG:` [`NGINX_RETMSG`].
///
/// The key is the `POSTFIX-DICT-EMAIL` request header; nginx `map` keys
/// match case-insensitively. Every request is one line in the access log
/// (unbuffered), so [`Nginx::requests`] counts exactly. Dropping it stops
/// nginx and removes its directory (see [`NginxProcess`]).
pub struct Nginx {
    process: NginxProcess,
    port: u16,
}

/// Quotes `s` as an nginx configuration string ("..." with `\` escapes).
fn nginx_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => panic!("nginx config strings cannot hold line breaks: {s:?}"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether this nginx takes `-e FILE` (the startup error log; 1.19.5+).
fn nginx_has_e_flag(nginx: &Path) -> bool {
    Command::new(nginx)
        .arg("-h")
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).contains("-e filename")
        })
        .unwrap_or(false)
}

impl Nginx {
    /// Starts nginx serving `pairs` (key → value) on a free port; fails the
    /// test when nginx is not installed (see [`NginxProcess::start`]).
    pub fn start(pairs: &[(&str, &str)]) -> Nginx {
        let process = NginxProcess::start(
            "httpmapd-nginx",
            || vec![SocketAddr::from(([127, 0, 0, 1], free_port()))],
            |dir, addrs| Nginx::http_block(dir, addrs[0].port(), pairs),
        );
        let port = process.addrs[0].port();
        Nginx { process, port }
    }

    /// The inside of nginx.conf's `http {}` block.
    fn http_block(dir: &Path, port: u16, pairs: &[(&str, &str)]) -> String {
        let d = dir.display();
        let mut map = String::new();
        for (key, value) in pairs {
            assert!(!key.is_empty(), "nginx map keys cannot be empty");
            // The leading `\` makes any key literal in an nginx map (even
            // `default`, `hostnames`, `include` or one starting with `~`);
            // a `$` in a value would start a variable: write it as ${dollar}.
            let value = value.replace('$', "${dollar}");
            map.push_str(&format!(
                "        {} {};\n",
                nginx_quote(&format!("\\{key}")),
                nginx_quote(&value)
            ));
        }
        let retmsg = nginx_quote(NGINX_RETMSG);
        format!(
            r#"    log_format dict '$connection $connection_requests $status "$request_uri" "$http_postfix_dict_email"';
    access_log {d}/access.log dict;
    keepalive_timeout 60s;
    keepalive_requests 10000;
    geo $dollar {{
        default "$";
    }}
    map $http_postfix_dict_email $dict_result {{
        default "";
{map}    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            add_header POSTFIX-DICT-RESULTS $dict_result always;
            return 200 "";
        }}
        location /body/ {{
            if ($dict_result = "") {{
                return 404;
            }}
            return 200 "$dict_result";
        }}
        location /unavailable {{
            add_header POSTFIX-DICT-RETMSG {retmsg} always;
            return 503;
        }}
    }}
"#
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http://127.0.0.1:PORT{path}"
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The access log, parsed (one entry per request, in order).
    pub fn log(&self) -> Vec<NginxLogLine> {
        self.process
            .access_log()
            .lines()
            .map(|line| {
                let parse = || -> Option<NginxLogLine> {
                    let mut it = line.splitn(4, ' ');
                    let connection = it.next()?.parse().ok()?;
                    let connection_requests = it.next()?.parse().ok()?;
                    let status = it.next()?.parse().ok()?;
                    let rest = it.next()?;
                    let (uri, key) = rest.strip_prefix('"')?.split_once("\" \"")?;
                    Some(NginxLogLine {
                        connection,
                        connection_requests,
                        status,
                        uri: uri.to_string(),
                        key: key.strip_suffix('"')?.to_string(),
                    })
                };
                parse().unwrap_or_else(|| panic!("unexpected nginx access log line {line:?}"))
            })
            .collect()
    }

    /// How many requests nginx served. nginx writes a request's log line
    /// right after its response, so this waits until the count has not
    /// changed for 50 ms (at most 2 s) before answering.
    pub fn requests(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = self.log().len();
        loop {
            thread::sleep(Duration::from_millis(50));
            let now = self.log().len();
            if now == last || Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }

    /// Distinct TCP connections seen in the access log.
    pub fn connections(&self) -> usize {
        let mut ids: Vec<u64> = self.log().iter().map(|l| l.connection).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
}

/// A private nginx process, for [`Nginx`] and for tests that write their
/// own nginx.conf: a prefix directory of its own (the config, pid file,
/// logs and temp dirs) and the master process (`daemon off`). Dropping it
/// stops nginx (TERM, then KILL after 5 s) and removes the directory,
/// printing the error and access logs first if the test is panicking.
pub struct NginxProcess {
    child: Child,
    /// The prefix directory; the config must keep nginx's files in it
    /// (`error_log DIR/error.log`, `access_log DIR/access.log`, ...).
    pub dir: PathBuf,
    /// The addresses it listens on, as `listen` gave them.
    pub addrs: Vec<SocketAddr>,
}

impl NginxProcess {
    /// Starts nginx in a fresh temp dir named after `prefix`: `listen()`
    /// picks the addresses to listen on, `http(DIR, ADDRS)` gives the inside
    /// of nginx.conf's `http {}` block (both called again on each try); the
    /// rest of nginx.conf (one worker, the pid file, the error log, the
    /// temp dirs, all in DIR) is written here. Ready when every
    /// address accepts and the worker has started (error.log, at `info`,
    /// says "start worker process"). Fails the test (see [`missing`]) when
    /// nginx is not installed. Tries three times (a free port can be taken
    /// by someone else before nginx binds it), then panics with the last
    /// failure.
    pub fn start(
        prefix: &str,
        listen: impl Fn() -> Vec<SocketAddr>,
        http: impl Fn(&Path, &[SocketAddr]) -> String,
    ) -> NginxProcess {
        let nginx = nginx_path();
        let mut last_error = String::new();
        for _ in 0..3 {
            match NginxProcess::try_start(&nginx, prefix, listen(), &http) {
                Ok(n) => return n,
                Err(e) => last_error = e,
            }
        }
        panic!("nginx did not start:\n{last_error}");
    }

    fn try_start(
        nginx: &Path,
        prefix: &str,
        addrs: Vec<SocketAddr>,
        http: impl Fn(&Path, &[SocketAddr]) -> String,
    ) -> Result<NginxProcess, String> {
        let dir = unique_temp_dir(prefix);
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, NginxProcess::config(&dir, &http(&dir, &addrs)))
            .expect("write nginx.conf");
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]);
        if nginx_has_e_flag(nginx) {
            cmd.arg("-e").arg(dir.join("error.log"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log")).expect("create stdout.log"))
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("create stderr.log"))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", nginx.display()))?;
        let mut n = NginxProcess { child, dir, addrs };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = n.child.try_wait().expect("try_wait nginx") {
                return Err(format!(
                    "nginx exited ({status}); stderr:\n{}\nerror.log:\n{}",
                    std::fs::read_to_string(n.dir.join("stderr.log")).unwrap_or_default(),
                    n.error_log()
                ));
            }
            // Listening and the worker started (it logs "start worker process").
            let up = n
                .addrs
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok());
            if up && n.error_log().contains("start worker process") {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                panic!(
                    "nginx not ready on {:?} after 10 s; error.log:\n{}",
                    n.addrs,
                    n.error_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// nginx.conf around `http`, the inside of its `http {}` block: one
    /// worker, and the pid file, the error log (at `info`, where the
    /// worker's start shows) and the temp dirs in `dir`.
    fn config(dir: &Path, http: &str) -> String {
        let d = dir.display();
        format!(
            r#"# Written by the httpmapd test harness (tests/common/mod.rs).
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    client_body_temp_path {d}/client_body_temp;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    default_type text/plain;
{http}}}
"#
        )
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// The access log so far (`DIR/access.log`).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- nginx error.log ({}) ----\n{}---- access.log ----\n{}---- end ----",
                self.dir.display(),
                self.error_log(),
                self.access_log()
            );
        }
        // TERM: the master stops its worker and exits. A KILLed master would
        // leave the worker running, holding the port.
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// (e) Small shared helpers
// ---------------------------------------------------------------------------

/// Polls `cond` every 2 ms until it holds; false after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Sleeps until `t` (not at all if it has passed).
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `"a", "b"`: each item as a quoted string, comma-separated (for a TOML
/// list such as `servers = [...]`).
pub fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lines of `text` (a log) containing `needle`.
pub fn log_lines(text: &str, needle: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// How many lines of `text` (a log) contain every one of `needles`.
pub fn count_lines(text: &str, needles: &[&str]) -> usize {
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Whether a tcp_table reply is a temporary error: `400 `, a reason, and
/// one `\n` that ends it (no CR).
pub fn is_temp(reply: &str) -> bool {
    reply.starts_with("400 ")
        && reply.len() > 5
        && reply.ends_with('\n')
        && reply.matches('\n').count() == 1
        && !reply.contains('\r')
}

/// Asserts [`is_temp`]: a temporary error (mail deferred), never `500`
/// (not found: bounced) nor `200`.
#[track_caller]
pub fn assert_temp(reply: &str, what: &str) {
    assert!(
        is_temp(reply),
        "{what}: expected a temporary error \"400 ...\\n\", got {reply:?}"
    );
}

/// `payload` as a netstring, `LEN:payload,`.
pub fn netstring(payload: &[u8]) -> Vec<u8> {
    [format!("{}:", payload.len()).as_bytes(), payload, b","].concat()
}

/// Reads one netstring `LEN:payload,` from `r`; returns the payload
/// (panics if it is malformed or the stream fails or ends first).
pub fn read_netstring(r: &mut impl Read) -> Vec<u8> {
    let mut len = 0usize;
    loop {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).expect("netstring length");
        match b[0] {
            b'0'..=b'9' => len = len * 10 + usize::from(b[0] - b'0'),
            b':' => break,
            other => panic!("malformed netstring length byte {:?}", other as char),
        }
    }
    let mut payload = vec![0u8; len + 1];
    r.read_exact(&mut payload).expect("netstring payload");
    assert_eq!(payload.pop(), Some(b','), "netstring not ended by ','");
    payload
}

/// Program `name`: the first executable file of that name in `dirs`, in
/// order, where `"$PATH"` stands for the directories of PATH; None when
/// there is none.
pub fn find_program(name: &str, dirs: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    dirs.iter()
        .flat_map(|&d| match d {
            "$PATH" => std::env::split_paths(&path).collect(),
            _ => vec![PathBuf::from(d)],
        })
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// User + system CPU time of process `pid`, in clock ticks (/proc/PID/stat
/// fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The command name (field 2) may hold spaces: count from the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    utime + stime
}

/// How many descriptors process `pid` has open (0 if /proc does not say).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Inodes of the sockets process `pid` has open.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// TCP sockets other than the listener whose local port is `port` (a
/// daemon's accepted client connections, in any state: established, or
/// close-wait once the client closed), from /proc/net/tcp, among `inodes`
/// (see [`socket_inodes`]).
pub fn client_sockets(port: u16, inodes: &[u64]) -> usize {
    // /proc/net/tcp is no snapshot (a line can appear twice while sockets
    // come and go): count distinct inodes.
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let found: std::collections::HashSet<&str> = table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 {
                return false;
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let listening = f[3] == "0A";
            let inode: u64 = f[9].parse().unwrap_or(0);
            local_port == Some(port) && !listening && inodes.contains(&inode)
        })
        .filter_map(|l| l.split_whitespace().nth(9))
        .collect();
    found.len()
}

/// VmRSS of process `pid` (from /proc/PID/status), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// The `field` (e.g. `VmRSS`, `VmHWM`) of /proc/`pid`/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Whether process `pid` catches `sig` (its `SigCgt` mask in /proc).
pub fn catches(pid: u32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
}

/// Waits for `child` (spawned with stdout and stderr piped, or not) and
/// collects its output, reading both pipes as it runs so that it cannot
/// block on a full one. Kills it and panics with "`what` still running
/// after `limit`" if it has not exited by then.
pub fn output_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Starts the load generator (`httpmapd-load`) with `args`, stdin closed,
/// stdout and stderr piped.
pub fn spawn_load(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_httpmapd-load"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn httpmapd-load")
}

/// The output of the load generator `child` (from [`spawn_load`] with
/// `args`) once it exits; kills it and panics after `limit`.
pub fn load_output(child: Child, limit: Duration, args: &[&str]) -> std::process::Output {
    output_within(child, limit, &format!("httpmapd-load {args:?}"))
}

/// Runs the load generator with `args` to its end (see [`spawn_load`],
/// [`load_output`]).
pub fn run_load(args: &[&str], limit: Duration) -> std::process::Output {
    load_output(spawn_load(args), limit, args)
}

// ---------------------------------------------------------------------------
// (f) The daemon's stats listener: GET and /metrics samples
// ---------------------------------------------------------------------------

/// How long [`stats_get`] gives the stats listener to accept and answer.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// One response of the stats listener (`stats_listen`), which answers one
/// request per connection and then closes it.
#[derive(Debug, Clone)]
pub struct StatsResponse {
    pub status: u16,
    /// The status line and the header lines, CRLF between them, without
    /// the empty line that ends the head.
    pub head: String,
    /// Everything after the head.
    pub body: String,
}

impl StatsResponse {
    /// The header lines as (name, value), trimmed, in order (panics on a
    /// line without ':').
    pub fn headers(&self) -> Vec<(&str, &str)> {
        self.head
            .split("\r\n")
            .skip(1)
            .map(|l| {
                let (n, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("malformed header line {l:?}"));
                (n.trim(), v.trim())
            })
            .collect()
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// `METHOD path HTTP/1.1` (with `Connection: close`) to 127.0.0.1:`port`,
/// the whole response read until the server closes, all within `within`.
/// A refused connect is retried until then: `stats_listen` is bound a
/// moment after the tcp_table listeners [`Daemon::start`] may have waited
/// for. Err says what went wrong: the connect, the write or a read failed,
/// no complete response in time, not UTF-8, no end of head, no status.
pub fn try_stats_request(
    port: u16,
    method: &str,
    path: &str,
    within: Duration,
) -> Result<StatsResponse, String> {
    let deadline = Instant::now() + within;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && !left.is_zero() => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("connect to {addr}: {e}")),
        }
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete response within {within:?} (have {:?})",
                String::from_utf8_lossy(&raw)
            ));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8(raw).map_err(|e| format!("the response is not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok(StatsResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// `GET path` from the stats listener on `port`, within [`STATS_TIMEOUT`]
/// (panics if there is no complete response; any status is returned).
pub fn stats_get(port: u16, path: &str) -> StatsResponse {
    try_stats_request(port, "GET", path, STATS_TIMEOUT)
        .unwrap_or_else(|e| panic!("GET {path} on 127.0.0.1:{port}: {e}"))
}

/// The body of `GET path`, which must be answered `HTTP/1.1 200`.
pub fn stats_body(port: u16, path: &str) -> String {
    let r = stats_get(port, path);
    assert!(
        r.head.starts_with("HTTP/1.1 200 "),
        "GET {path}: {}\n\n{}",
        r.head,
        r.body
    );
    r.body
}

/// The `/metrics` page (which must be answered `HTTP/1.1 200`).
pub fn metrics(port: u16) -> String {
    stats_body(port, "/metrics")
}

/// The value of the sample `series` (the name and labels exactly as
/// written, e.g. `httpmapd_server_up{map="m",server="URL"}`) in the
/// /metrics text, if there is one; panics if its value is not a number.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|e| panic!("sample {series}: value {v:?}: {e}"))
        })
}

/// As [`metric_value`], panicking (with the family's lines) when the
/// sample is missing.
pub fn metric(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or_else(|| {
        let family = series.split('{').next().unwrap();
        let related: Vec<&str> = text.lines().filter(|l| l.contains(family)).collect();
        panic!(
            "no sample {series} in /metrics; related lines:\n{}",
            related.join("\n")
        )
    })
}

/// The samples of the family `name` whose labels include the text
/// `labels`, as (series, value), in page order.
pub fn metric_samples(text: &str, name: &str, labels: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            (series.to_string(), v.parse().unwrap())
        })
        .collect()
}
