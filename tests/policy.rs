//! Policy delegation (issue 14): `[policies.NAME]` answers Postfix's
//! `check_policy_service` from HTTP servers.
//!
//! - Through a real Postfix smtpd (a private instance,
//!   `common::postfix::PrivatePostfix`) with
//!   `check_policy_service { inet:127.0.0.1:PORT, timeout=10s, default_action=DUNNO }`
//!   after `reject_unauth_destination`: REJECT, DUNNO and DEFER_IF_PERMIT
//!   from the policy server reach the SMTP session as 554, 250 and 450;
//!   with the servers down httpmapd's `default_action` does; smtpd keeps one
//!   policy connection for all of it; with httpmapd gone Postfix applies
//!   its own `default_action`.
//! - On raw sockets: pipelining, malformed and oversized requests, a Unix
//!   socket listener, allow_from.
//! - The HTTP side: the JSON and form bodies, their headers, the request id
//!   and its echo, the answers (body and JSON), caching, metrics.
//!
//! The policy servers are the harness's `TestServer` (which keeps each
//! request with its body) answering with an [`Answer`] (see
//! [`policy_server`]).

mod common;

use common::postfix::{self, PrivatePostfix, SmtpClient};
use common::{
    cpu_ticks, free_port, log_lines, metric, metric_samples, metrics, quoted_list, run_check,
    stats_body, unique_temp_dir, wait_until, Daemon, Framing, Reply, Request, TestServer,
};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The default `default_action` (README, issue 14).
const DEFAULT_ACTION: &str = "DEFER_IF_PERMIT Policy service unavailable";

/// How long a test waits for an answer that should come.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The policy server: the harness's TestServer, answering with an Answer
// ---------------------------------------------------------------------------

/// What the tests read in a request the policy server received: its
/// headers, its id and the attributes in its body.
trait PolicyRequest {
    fn headers_named(&self, name: &str) -> Vec<String>;
    fn only_header(&self, name: &str) -> String;
    fn id(&self) -> Option<String>;
    fn attrs(&self) -> Vec<(String, String)>;
    fn attr(&self, name: &str) -> String;
}

impl PolicyRequest for Request {
    /// Every value of header `name` (case-insensitive), as text.
    fn headers_named(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The one value of header `name`; panics if it is missing or repeated.
    fn only_header(&self, name: &str) -> String {
        let v = self.headers_named(name);
        assert_eq!(v.len(), 1, "header {name} in {:?}", self.headers);
        v[0].clone()
    }

    /// The `POSTFIX-POLICY-ID` header, if any.
    fn id(&self) -> Option<String> {
        self.headers_named("POSTFIX-POLICY-ID").into_iter().next()
    }

    /// The attributes in the body, as (name, value) pairs in body order:
    /// a JSON object or a form, by Content-Type.
    fn attrs(&self) -> Vec<(String, String)> {
        let ct = self.headers_named("Content-Type");
        match ct.first().map(String::as_str) {
            Some("application/json") => {
                let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                    panic!(
                        "the body is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&self.body)
                    )
                });
                let serde_json::Value::Object(map) = v else {
                    panic!("the JSON body is not an object: {v}");
                };
                map.into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => (k, s),
                        other => panic!("attribute {k} is not a JSON string: {other}"),
                    })
                    .collect()
            }
            Some("application/x-www-form-urlencoded") => form_decode(&self.body),
            other => panic!("unexpected Content-Type {other:?}"),
        }
    }

    /// Attribute `name` from the body ("" if absent).
    fn attr(&self, name: &str) -> String {
        self.attrs()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }
}

/// Decodes `application/x-www-form-urlencoded` (`+` is a space, `%XX` a
/// byte) into pairs, in order. Panics on a malformed escape.
fn form_decode(body: &[u8]) -> Vec<(String, String)> {
    fn unescape(s: &[u8]) -> String {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&s[i + 1..i + 3]).expect("a %XX escape");
                    out.push(u8::from_str_radix(hex, 16).expect("a %XX escape"));
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).expect("UTF-8 in the form")
    }
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == b'&')
        .map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=').expect("name=value");
            (unescape(&pair[..eq]), unescape(&pair[eq + 1..]))
        })
        .collect()
}

/// How a reply treats the request's `POSTFIX-POLICY-ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Echo {
    /// Echo it back (what a well-behaved server does).
    Same,
    /// No `POSTFIX-POLICY-ID` in the reply.
    Missing,
    /// Another id than the one sent.
    Wrong,
}

/// What the policy server does with one request.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Vec<u8>,
    echo: Echo,
    delay: Duration,
}

impl Answer {
    /// `200` with `action` as the body.
    fn action(action: &str) -> Answer {
        Answer::body(200, action.as_bytes())
    }

    fn body(status: u16, body: &[u8]) -> Answer {
        Answer {
            status,
            body: body.to_vec(),
            echo: Echo::Same,
            delay: Duration::ZERO,
        }
    }

    fn echo(mut self, echo: Echo) -> Answer {
        self.echo = echo;
        self
    }

    fn delayed(mut self, d: Duration) -> Answer {
        self.delay = d;
        self
    }

    /// The HTTP reply to `req`: the status, `POSTFIX-POLICY-ID` as
    /// [`Answer::echo`] says, the body (`Content-Length`), after the delay.
    fn reply(self, req: &Request) -> Reply {
        let id = req.id().unwrap_or_default();
        let echoed = match self.echo {
            Echo::Same => Some(id),
            Echo::Missing => None,
            Echo::Wrong if id == "0123456789abcdef" => Some("fedcba9876543210".to_string()),
            Echo::Wrong => Some("0123456789abcdef".to_string()),
        };
        let reply = Reply::Http {
            status: self.status,
            headers: echoed
                .map(|v| ("POSTFIX-POLICY-ID".to_string(), v.into_bytes()))
                .into_iter()
                .collect(),
            body: self.body,
            framing: Framing::ContentLength,
            close: false,
        };
        reply.delayed(self.delay)
    }
}

/// A policy server on 127.0.0.1: the harness's [`TestServer`] (a thread per
/// connection, keep-alive, every request kept with its body) answering
/// each request with `handler`'s [`Answer`].
fn policy_server(handler: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> TestServer {
    policy_server_on("127.0.0.1:0", handler).expect("bind the policy server")
}

/// As [`policy_server`], on a given address (to come back on the port it had).
fn policy_server_on(
    addr: &str,
    handler: impl Fn(&Request) -> Answer + Send + Sync + 'static,
) -> io::Result<TestServer> {
    TestServer::start_on(addr, move |req| handler(req).reply(req))
}

// ---------------------------------------------------------------------------
// The Postfix side on raw sockets
// ---------------------------------------------------------------------------

/// A policy request: `name=value` lines and the empty line.
fn request(attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in attrs {
        out.extend_from_slice(format!("{n}={v}\n").as_bytes());
    }
    out.push(b'\n');
    out
}

/// A request as smtpd sends it at RCPT time (the 29 attributes Postfix
/// 3.7's smtpd sends).
fn smtpd_request(client: &str, sender: &str, recipient: &str) -> Vec<u8> {
    request(&smtpd_attrs(client, sender, recipient))
}

fn smtpd_attrs<'a>(
    client: &'a str,
    sender: &'a str,
    recipient: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", client),
        ("client_name", "mail.client.test"),
        ("client_port", "40000"),
        ("reverse_client_name", "mail.client.test"),
        ("server_address", "192.0.2.25"),
        ("server_port", "25"),
        ("helo_name", "mail.client.test"),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", "1a2b.6650ac1e.7c1d0.0"),
        ("size", "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", ""),
        ("encryption_cipher", ""),
        ("encryption_keysize", "0"),
        ("policy_context", ""),
    ]
}

/// A raw policy client.
struct PolicyClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl PolicyClient {
    fn connect(port: u16) -> PolicyClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        let _ = stream.set_nodelay(true);
        PolicyClient {
            stream,
            buf: Vec::new(),
        }
    }

    fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to httpmapd");
    }

    /// Reads until `n` bytes are buffered: Err on EOF or timeout (with
    /// what came).
    fn fill_to(&mut self, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {timeout:?} with {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "connection closed with {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(())
    }

    /// One whole reply (`...\n\n`), as bytes; Err on EOF or timeout.
    fn read_reply(&mut self, timeout: Duration) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                return Ok(self.buf.drain(..i + 2).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.fill_to(self.buf.len() + 1, left)?;
        }
    }

    /// Exactly `n` bytes.
    fn read_exact(&mut self, n: usize, timeout: Duration) -> Result<Vec<u8>, String> {
        self.fill_to(n, timeout)?;
        Ok(self.buf.drain(..n).collect())
    }

    /// Sends `req` and returns the action of the reply (panics unless the
    /// reply is exactly `action=TEXT\n\n`).
    fn ask(&mut self, req: &[u8]) -> String {
        self.send(req);
        self.read_action()
    }

    fn read_action(&mut self) -> String {
        let reply = self
            .read_reply(ANSWER_TIMEOUT)
            .unwrap_or_else(|e| panic!("no policy reply: {e}"));
        let text = String::from_utf8(reply).expect("UTF-8 reply");
        let action = text
            .strip_prefix("action=")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("malformed policy reply {text:?}"));
        assert!(!action.contains('\n'), "malformed policy reply {text:?}");
        action.to_string()
    }

    /// Ok when the peer closes (EOF or reset) within `timeout` without
    /// sending a byte; Err saying what happened instead.
    fn closed_without_answer(&mut self, timeout: Duration) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "got {:?} before the close",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the connection is still open after {timeout:?}"));
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    return Err(format!(
                        "got {:?} instead of a close",
                        String::from_utf8_lossy(&chunk[..n])
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon and its metrics
// ---------------------------------------------------------------------------

/// httpmapd with `[daemon] workers` and a stats listener, and `sections`
/// (the `[policies.NAME]` etc.). Ready once the stats port listens (the
/// policy listeners are bound before it, and no client connection is made).
fn start_daemon(workers: usize, sections: &str) -> (Daemon, u16) {
    let stats = free_port();
    let cfg = format!(
        "[daemon]\nworkers = {workers}\nstats_listen = \"127.0.0.1:{stats}\"\n\n{sections}"
    );
    (Daemon::start(&cfg, stats), stats)
}

/// httpmapd with one worker and one policy, NAME (see [`policy_section`]),
/// listening on a free port: (the daemon, the policy port, the stats port).
fn start_policy(name: &str, servers: &[String], extra: &str) -> (Daemon, u16, u16) {
    let port = free_port();
    let (daemon, stats) = start_daemon(1, &policy_section(name, port, servers, extra));
    (daemon, port, stats)
}

/// A policy section with short timeouts (unless `extra` sets them); the
/// `extra` lines are added.
fn policy_section(name: &str, port: u16, servers: &[String], extra: &str) -> String {
    let mut out = format!(
        "\n[policies.{name}]\nlisten = \"127.0.0.1:{port}\"\nservers = [{}]\n",
        quoted_list(servers)
    );
    for (key, value) in [
        ("connect_timeout", "\"300ms\""),
        ("http_timeout", "\"1s\""),
        ("lookup_timeout", "\"3s\""),
        ("retry_interval", "\"200ms\""),
    ] {
        if !extra.lines().any(|l| l.starts_with(&format!("{key} "))) {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    out.push_str(extra);
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// `httpmapd -c FILE --check` on `text`: (exit code, stderr).
fn check_config(text: &str) -> (i32, String) {
    let dir = unique_temp_dir("httpmapd-policy-check");
    let path = dir.join("httpmapd.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = run_check(&path, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    (code, stderr.replace(&path.display().to_string(), "FILE"))
}

#[test]
fn policy_configuration_is_checked() {
    // Every key of a policy section, a policy service alone (no maps).
    let full = r#"
[policies.all]
listen = "127.0.0.1:10040"
servers = ["http://127.0.0.1:9000/check", "https://127.0.0.1:9443/check"]
tls_server_name = "policy.example.net"
request = "form"
result = "json:/action"
default_action = "DUNNO"
cache_key = ["client_address", "sender"]
ttl = "30s"
max_request_bytes = 65536
connect_timeout = "1s"
http_timeout = "3s"
lookup_timeout = "10s"
retry_interval = "10s"
max_attempts = 3
max_connections = 32
max_queue = 1024
headers = { Authorization = "Bearer x" }
require_key_echo = true
allow_from = ["127.0.0.0/8"]

[policies.unix]
listen = "unix:/run/httpmapd/policy.sock"
servers = ["http://127.0.0.1:9000/check"]
"#;
    assert_eq!(check_config(full), (0, String::new()));
    let cases: &[(&str, &str)] = &[
        (
            "[policies.p]\nservers = [\"http://127.0.0.1:9/\"]\n",
            "policies.p: listen is required",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\nrequest = \"xml\"\n",
            "request: \"xml\": expected \"json\" or \"form\"",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\nresult = \"header\"\n",
            "result: a policy's action is its reply body",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\ndefault_action = \"\"\n",
            "default_action: one line of printable text",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\ndefault_action = \"DUNNO\\nOK\"\n",
            "default_action: one line of printable text",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\nmax_request_bytes = 100\n",
            "max_request_bytes: 100 is out of range (256..=1048576)",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\ntcp_listen = \"127.0.0.1:1\"\n",
            "tcp_listen",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\n",
            "policies.p: servers is required",
        ),
        (
            "[policies.p]\nlisten = \"127.0.0.1:10040\"\nservers = [\"http://127.0.0.1:9/\"]\nttl = \"30s\"\n",
            "ttl without cache_key caches nothing",
        ),
    ];
    for (text, want) in cases {
        let (code, err) = check_config(text);
        assert_eq!(code, 1, "{text}: {err}");
        assert!(
            err.starts_with("FILE:") && err.contains(want),
            "{text}: wanted {want:?} in {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Raw sockets: pipelining, malformed and oversized requests
// ---------------------------------------------------------------------------

#[test]
fn pipelined_requests_are_answered_in_order_with_exact_bytes() {
    // The first request is answered last by the server: the replies must
    // still come in request order.
    let server = policy_server(|req| {
        let n: u64 = req.attr("n").parse().unwrap();
        Answer::action(&format!("OK request {n}")).delayed(Duration::from_millis((5 - n) * 60))
    });
    let (_daemon, port, _stats) = start_policy("order", &[server.url("/check")], "");
    let mut c = PolicyClient::connect(port);
    let mut all = Vec::new();
    for n in 0..5 {
        all.extend_from_slice(&request(&[
            ("request", "smtpd_access_policy"),
            ("n", &n.to_string()),
        ]));
    }
    c.send(&all);
    let want: Vec<u8> = (0..5)
        .flat_map(|n| format!("action=OK request {n}\n\n").into_bytes())
        .collect();
    let got = c.read_exact(want.len(), ANSWER_TIMEOUT).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "pipelined replies"
    );
    assert_eq!(server.requests(), 5);
    // A request split across writes (mid-line, between the lines, before
    // the empty line) is one request.
    let req = request(&[("request", "smtpd_access_policy"), ("n", "4")]);
    for part in [
        &req[..5],
        &req[5..27],
        &req[27..req.len() - 1],
        &req[req.len() - 1..],
    ] {
        c.send(part);
        thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(
        c.read_exact(b"action=OK request 4\n\n".len(), ANSWER_TIMEOUT)
            .unwrap(),
        b"action=OK request 4\n\n"
    );
    // Nothing more came, and the connection stays open for more.
    assert_eq!(c.ask(&req), "OK request 4");
    assert_eq!(server.requests(), 7);
}

/// One malformed request on a fresh daemon: the connection closes without a
/// byte, one warning line names the client and the reason, and clients
/// connected before and after are served.
fn check_malformed(kind: &str, bad: &[u8], why: &str) {
    let server = policy_server(|_| Answer::action("DUNNO"));
    let (daemon, port, stats) = start_policy("strict", &[server.url("/")], "");
    let mut before = PolicyClient::connect(port);
    assert_eq!(
        before.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        "DUNNO"
    );
    let mut bad_client = PolicyClient::connect(port);
    bad_client.send(bad);
    if let Err(e) = bad_client.closed_without_answer(Duration::from_secs(3)) {
        panic!("{kind}: {e}");
    }
    let want = format!(
        "httpmapd: warning: bad policy request from 127.0.0.1:{} (policy strict): {why}; closing the connection (0 similar not logged)",
        bad_client.local_port()
    );
    assert!(
        wait_until(Duration::from_secs(2), || !log_lines(
            &daemon.stderr(),
            "bad policy request"
        )
        .is_empty()),
        "{kind}: no warning line"
    );
    assert_eq!(
        log_lines(&daemon.stderr(), "bad policy request"),
        vec![want],
        "{kind}: the warning lines"
    );
    // The others keep being served.
    assert_eq!(
        before.ask(&smtpd_request("192.0.2.1", "a@x.test", "c@y.test")),
        "DUNNO",
        "{kind}"
    );
    let mut after = PolicyClient::connect(port);
    assert_eq!(
        after.ask(&smtpd_request("192.0.2.2", "a@x.test", "b@y.test")),
        "DUNNO",
        "{kind}"
    );
    // The bad request never reached a server.
    assert_eq!(server.requests(), 3, "{kind}");
    let m = metrics(stats);
    assert_eq!(metric(&m, "httpmapd_bad_requests_total"), 1.0, "{kind}");
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"strict\"}"),
        3.0,
        "{kind}"
    );
}

#[test]
fn a_line_without_equals_closes_the_connection_without_an_answer() {
    check_malformed(
        "a line without '='",
        b"request=smtpd_access_policy\nsender\n\n",
        "malformed policy request: a line without '='",
    );
}

#[test]
fn an_empty_request_closes_the_connection_without_an_answer() {
    check_malformed(
        "an empty request",
        b"\n",
        "malformed policy request: an empty request",
    );
}

#[test]
fn a_9000_byte_line_closes_the_connection_without_an_answer() {
    let mut bad = b"request=smtpd_access_policy\nsender=".to_vec();
    bad.extend(std::iter::repeat_n(b'a', 9000 - "sender=".len()));
    bad.extend_from_slice(b"\n\n");
    check_malformed(
        "a 9000-byte line",
        &bad,
        "policy request too large: a line over 8192 bytes",
    );
}

#[test]
fn three_hundred_attributes_close_the_connection_without_an_answer() {
    let attrs: Vec<(String, String)> = (0..300)
        .map(|i| (format!("attr{i}"), "x".to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = attrs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    check_malformed(
        "300 attributes",
        &request(&refs),
        "policy request too large: too many attributes",
    );
}

#[test]
fn a_bad_request_after_a_good_one_on_the_same_connection() {
    // The good request pipelined before it is answered, then the close.
    let server = policy_server(|_| Answer::action("OK first").delayed(Duration::from_millis(200)));
    let (_daemon, port, _stats) = start_policy("strict", &[server.url("/")], "");
    let mut c = PolicyClient::connect(port);
    let mut both = smtpd_request("192.0.2.1", "a@x.test", "b@y.test");
    both.extend_from_slice(b"sender=a@x.test\nno equals sign here\n\n");
    c.send(&both);
    assert_eq!(
        c.read_reply(ANSWER_TIMEOUT).unwrap(),
        b"action=OK first\n\n"
    );
    c.closed_without_answer(Duration::from_secs(3)).unwrap();
    assert_eq!(server.requests(), 1);
}

#[test]
fn bad_request_warnings_are_rate_limited() {
    // Four bad requests of four kinds within the 10 s window: one line,
    // for the first; every connection is closed all the same.
    let server = policy_server(|_| Answer::action("DUNNO"));
    let (daemon, port, stats) = start_policy("strict", &[server.url("/")], "");
    let mut long_line = b"sender=".to_vec();
    long_line.extend(std::iter::repeat_n(b'b', 9000));
    long_line.extend_from_slice(b"\n\n");
    let bads: [&[u8]; 4] = [b"sender\n\n", b"\n", &long_line, b"=x\n\n"];
    let mut first_port = 0;
    for (i, bad) in bads.iter().enumerate() {
        let mut c = PolicyClient::connect(port);
        if i == 0 {
            first_port = c.local_port();
        }
        c.send(bad);
        c.closed_without_answer(Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("bad request {i}: {e}"));
    }
    assert_eq!(
        log_lines(&daemon.stderr(), "bad policy request"),
        vec![format!(
            "httpmapd: warning: bad policy request from 127.0.0.1:{first_port} (policy strict): malformed policy request: a line without '='; closing the connection (0 similar not logged)"
        )]
    );
    assert_eq!(metric(&metrics(stats), "httpmapd_bad_requests_total"), 4.0);
    let mut c = PolicyClient::connect(port);
    assert_eq!(
        c.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        "DUNNO"
    );
}

#[test]
fn a_request_of_exactly_max_request_bytes_is_answered() {
    let server = policy_server(|_| Answer::action("OK fits"));
    let (_daemon, port, _stats) =
        start_policy("small", &[server.url("/")], "max_request_bytes = 1024");
    // 10 lines of 100 bytes, one of 23, the empty line: 1024 bytes.
    let mut req = Vec::new();
    for i in 0..10 {
        req.extend_from_slice(format!("a{i}=").as_bytes());
        req.extend(std::iter::repeat_n(b'x', 100 - 4));
        req.push(b'\n');
    }
    req.extend_from_slice(b"b=");
    req.extend(std::iter::repeat_n(b'y', 20));
    req.extend_from_slice(b"\n\n");
    assert_eq!(req.len(), 1024);
    let mut c = PolicyClient::connect(port);
    assert_eq!(c.ask(&req), "OK fits");
    assert_eq!(server.requests(), 1);
}

#[test]
fn a_request_over_max_request_bytes_closes_the_connection_without_an_answer() {
    let server = policy_server(|_| Answer::action("OK"));
    let (daemon, port, _stats) =
        start_policy("small", &[server.url("/")], "max_request_bytes = 1024");
    // 11 lines of 100 bytes (short lines, few attributes): 1100 bytes
    // before the empty line.
    let mut req = Vec::new();
    for i in 0..11 {
        req.extend_from_slice(format!("a{i:02}=").as_bytes());
        req.extend(std::iter::repeat_n(b'x', 100 - 5));
        req.push(b'\n');
    }
    req.push(b'\n');
    let mut c = PolicyClient::connect(port);
    c.send(&req);
    if let Err(e) = c.closed_without_answer(Duration::from_secs(3)) {
        // Say what the worker is doing meanwhile.
        let t0 = cpu_ticks(daemon.pid());
        thread::sleep(Duration::from_secs(1));
        let busy = cpu_ticks(daemon.pid()) - t0;
        let mut other = PolicyClient::connect(port);
        other.send(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test"));
        let served = other.read_reply(Duration::from_secs(2));
        panic!(
            "a request over max_request_bytes: {e}; the daemon used {busy} CPU ticks in the \
             next second (100 = one core busy); another client on the same (only) worker \
             got {served:?}; warnings: {:?}",
            log_lines(&daemon.stderr(), "bad policy request")
        );
    }
    assert_eq!(
        log_lines(&daemon.stderr(), "bad policy request"),
        vec![format!(
            "httpmapd: warning: bad policy request from 127.0.0.1:{} (policy small): policy request too large: the request is over its limit; closing the connection (0 similar not logged)",
            c.local_port()
        )]
    );
    let mut other = PolicyClient::connect(port);
    assert_eq!(
        other.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        "OK"
    );
    assert_eq!(server.requests(), 1);
}

#[test]
fn a_max_request_bytes_over_64_kib_is_honoured() {
    // max_request_bytes may be up to 1 MiB: a request of 90,000 bytes (in
    // lines under 8192 bytes) fits a 100,000-byte limit.
    let server = policy_server(|req| Answer::action(&format!("OK {}", req.body.len())));
    let (daemon, port, _stats) =
        start_policy("big", &[server.url("/")], "max_request_bytes = 100000");
    let mut c = PolicyClient::connect(port);
    c.send(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test"));
    match c.read_reply(ANSWER_TIMEOUT) {
        Ok(reply) => assert!(reply.starts_with(b"action=OK "), "{reply:?}"),
        Err(e) => panic!(
            "no answer to a small request with max_request_bytes = 100000: {e}; stderr:\n{}",
            daemon.stderr()
        ),
    }
    let mut req = Vec::new();
    for i in 0..12 {
        req.extend_from_slice(format!("attr{i:02}=").as_bytes());
        req.extend(std::iter::repeat_n(b'v', 7500 - 8));
        req.push(b'\n');
    }
    req.push(b'\n');
    assert_eq!(req.len(), 90_001);
    let mut c = PolicyClient::connect(port);
    let action = c.ask(&req);
    assert!(action.starts_with("OK "), "{action}");
    assert_eq!(server.requests(), 2);
}

#[test]
fn a_unix_socket_listener_answers() {
    let server = policy_server(|req| Answer::action(&format!("OK {}", req.attr("sender"))));
    let dir = unique_temp_dir("httpmapd-policy-unix");
    let path = dir.join("policy.sock");
    let (_daemon, _stats) = start_daemon(
        1,
        &format!(
            "[policies.local]\nlisten = \"unix:{}\"\nservers = [\"{}\"]\n",
            path.display(),
            server.url("/")
        ),
    );
    let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect to the socket");
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let mut two = smtpd_request("192.0.2.1", "one@x.test", "b@y.test");
    two.extend_from_slice(&smtpd_request("192.0.2.1", "two@x.test", "b@y.test"));
    s.write_all(&two).unwrap();
    let want = b"action=OK one@x.test\n\naction=OK two@x.test\n\n";
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).expect("two replies");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    drop(s);
    // The socket file goes with the daemon, as a table's does.
    let mut daemon = _daemon;
    daemon.wait_handling(&[libc::SIGTERM]);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0));
    assert!(!path.exists(), "{} left behind", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn allow_from_refuses_other_clients() {
    let server = policy_server(|_| Answer::action("OK"));
    let (port, open_port) = (free_port(), free_port());
    let (_daemon, _stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section(
                "fenced",
                port,
                &[server.url("/")],
                "allow_from = [\"10.0.0.0/8\"]"
            ),
            policy_section(
                "open",
                open_port,
                &[server.url("/")],
                "allow_from = [\"127.0.0.0/8\"]"
            )
        ),
    );
    let mut c = PolicyClient::connect(port);
    c.send(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test"));
    c.closed_without_answer(Duration::from_secs(3)).unwrap();
    let mut c = PolicyClient::connect(open_port);
    assert_eq!(
        c.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        "OK"
    );
    assert_eq!(server.requests(), 1);
}

// ---------------------------------------------------------------------------
// 3. What reaches the server
// ---------------------------------------------------------------------------

#[test]
fn json_and_form_bodies_reach_the_server_exactly() {
    let server = policy_server(|_| Answer::action("DUNNO"));
    let (json_port, form_port) = (free_port(), free_port());
    let headers = "headers = { Authorization = \"Bearer s3cret\", X-Policy-Client = \"mx1\" }";
    let (_daemon, _stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section("j", json_port, &[server.url("/v1/json?x=1")], headers),
            policy_section(
                "f",
                form_port,
                &[server.url("/v1/form")],
                &format!("request = \"form\"\n{headers}")
            )
        ),
    );
    // Values with every kind of byte a form must escape, UTF-8, '=' in a
    // value, an empty value, an attribute httpmapd does not know.
    let attrs: Vec<(&str, &str)> = vec![
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("sender", "a b&c=d+e%f@x.test"),
        ("recipient", "j\u{fc}rgen@b\u{fc}cher.example"),
        ("client_address", "192.0.2.1"),
        ("queue_id", ""),
        ("x_custom", "k=v;q=\"1\"/?#[]"),
        ("size", "12345"),
    ];
    let req = request(&attrs);
    let want: Vec<(String, String)> = attrs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let mut j = PolicyClient::connect(json_port);
    let mut f = PolicyClient::connect(form_port);
    assert_eq!(j.ask(&req), "DUNNO");
    assert_eq!(f.ask(&req), "DUNNO");
    assert_eq!(j.ask(&req), "DUNNO");
    assert_eq!(f.ask(&req), "DUNNO");
    let log = server.request_log();
    assert_eq!(log.len(), 4);
    let mut ids = Vec::new();
    for (i, r) in log.iter().enumerate() {
        let (path, ct) = if i % 2 == 0 {
            ("/v1/json?x=1", "application/json")
        } else {
            ("/v1/form", "application/x-www-form-urlencoded")
        };
        assert_eq!(r.method, "POST", "request {i}");
        assert_eq!(r.path, path, "request {i}");
        assert_eq!(r.version, 1, "request {i}: HTTP/1.1");
        assert_eq!(
            r.only_header("Host"),
            server.addr().to_string(),
            "request {i}"
        );
        assert_eq!(r.only_header("Content-Type"), ct, "request {i}");
        assert_eq!(
            r.only_header("Content-Length"),
            r.body.len().to_string(),
            "request {i}"
        );
        assert!(
            r.headers_named("Transfer-Encoding").is_empty(),
            "request {i}: {:?}",
            r.headers
        );
        assert_eq!(
            r.only_header("Authorization"),
            "Bearer s3cret",
            "request {i}"
        );
        assert_eq!(r.only_header("X-Policy-Client"), "mx1", "request {i}");
        let id = r.only_header("POSTFIX-POLICY-ID");
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "request {i}: POSTFIX-POLICY-ID {id:?}"
        );
        ids.push(id);
        // Keep-alive: one server connection per policy, reused.
        assert_eq!(r.seq_on_connection, 1 + i / 2, "request {i}");
        if i % 2 == 0 {
            // JSON: an object of strings, every attribute once.
            let mut got = r.attrs();
            got.sort();
            let mut w = want.clone();
            w.sort();
            assert_eq!(
                got,
                w,
                "request {i}: the JSON body {:?}",
                String::from_utf8_lossy(&r.body)
            );
        } else {
            // A form: every attribute, in request order.
            assert_eq!(
                r.attrs(),
                want,
                "request {i}: the form {:?}",
                String::from_utf8_lossy(&r.body)
            );
            assert!(
                !r.body.contains(&b' '),
                "request {i}: a raw space in the form"
            );
        }
    }
    assert_eq!(log[0].connection, log[2].connection);
    assert_eq!(log[1].connection, log[3].connection);
    assert_ne!(log[0].connection, log[1].connection);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "a fresh POSTFIX-POLICY-ID per request");
    assert_eq!(server.connections(), 2);
}

// ---------------------------------------------------------------------------
// 4. What the server's reply means
// ---------------------------------------------------------------------------

/// The reply the test server gives for `case`.
fn answer_for(case: &str) -> Answer {
    let long_ok = format!("OK {}", "a".repeat(4093));
    let too_long = format!("OK {}", "a".repeat(4094));
    match case {
        "ok" => Answer::action("OK"),
        "reject" => Answer::action("REJECT 5.7.1 go away"),
        "padded" => Answer::action("  \r\n\tREJECT 5.7.1 trimmed \r\n\r\n"),
        "empty" => Answer::action(""),
        "blank" => Answer::action(" \r\n "),
        "utf8" => Answer::action("REJECT 5.7.1 f\u{fc}r dich nicht"),
        "tab" => Answer::action("PREPEND X-Policy:\tyes"),
        "4096" => Answer::action(&long_ok),
        "4097" => Answer::action(&too_long),
        "two-lines" => Answer::action("REJECT one\nREJECT two"),
        "cr-inside" => Answer::action("REJECT one\rREJECT two"),
        "nul" => Answer::action("REJECT a\0b"),
        "escape" => Answer::action("REJECT \x1b[31mred"),
        "400" => Answer::body(400, b"REJECT bad request"),
        "403" => Answer::body(403, b"REJECT forbidden"),
        "404" => Answer::body(404, b"DUNNO"),
        "500" => Answer::body(500, b"REJECT oops"),
        "503" => Answer::body(503, b""),
        "204" => Answer::body(204, b""),
        "201" => Answer::body(201, b"OK created"),
        "json-ok" => Answer::action(r#"{"action":"REJECT x"}"#),
        "json-spaces" => {
            Answer::action(r#"  { "action" : " HOLD held ", "other": [1, {"a": null}] } "#)
        }
        "json-nested" => Answer::action(r#"{"result":{"action":"OK nested"}}"#),
        "json-missing" => Answer::action("{}"),
        "json-null" => Answer::action(r#"{"action":null}"#),
        "json-empty" => Answer::action(r#"{"action":""}"#),
        "json-number" => Answer::action(r#"{"action":550}"#),
        "json-bool" => Answer::action(r#"{"action":true}"#),
        "json-object" => Answer::action(r#"{"action":{"a":"OK"}}"#),
        "json-newline" => Answer::action(r#"{"action":"REJECT a\nb"}"#),
        "json-nul" => Answer::action(r#"{"action":"REJECT a\u0000b"}"#),
        "json-bad" => Answer::action("REJECT not json"),
        "json-404" => Answer::body(404, br#"{"action":"OK"}"#),
        "slow" => Answer::action("OK too late").delayed(Duration::from_secs(3)),
        other => panic!("no case {other}"),
    }
}

#[test]
fn the_action_is_the_reply_body_or_the_default_action() {
    let server = policy_server(|req| answer_for(&req.attr("case")));
    let (port, custom_port) = (free_port(), free_port());
    let (daemon, _stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section("body", port, &[server.url("/")], "http_timeout = \"500ms\""),
            policy_section(
                "custom",
                custom_port,
                &[server.url("/")],
                "default_action = \"DUNNO\""
            )
        ),
    );
    let long_ok = format!("OK {}", "a".repeat(4093));
    let d = DEFAULT_ACTION;
    let cases: &[(&str, &str)] = &[
        ("ok", "OK"),
        ("reject", "REJECT 5.7.1 go away"),
        ("padded", "REJECT 5.7.1 trimmed"),
        ("empty", "DUNNO"),
        ("blank", "DUNNO"),
        ("utf8", "REJECT 5.7.1 f\u{fc}r dich nicht"),
        ("tab", "PREPEND X-Policy:\tyes"),
        ("4096", &long_ok),
        ("two-lines", d),
        ("4097", d),
        ("cr-inside", d),
        ("nul", d),
        ("escape", d),
        ("400", d),
        ("403", d),
        ("404", d),
        ("500", d),
        ("503", d),
        ("204", d),
        ("201", d),
        ("slow", d),
        ("ok", "OK"),
    ];
    let mut c = PolicyClient::connect(port);
    let mut expected_requests = 0;
    for (case, want) in cases {
        let req = request(&[("request", "smtpd_access_policy"), ("case", case)]);
        let got = c.ask(&req);
        assert_eq!(got, *want, "case {case}");
        expected_requests += 1;
        assert_eq!(
            server.requests(),
            expected_requests,
            "case {case}: one server request"
        );
    }
    // default_action is the policy's own.
    let mut c = PolicyClient::connect(custom_port);
    assert_eq!(
        c.ask(&request(&[
            ("request", "smtpd_access_policy"),
            ("case", "500")
        ])),
        "DUNNO"
    );
    // Counted and logged (rate-limited: one line so far).
    let lines = log_lines(&daemon.stderr(), "no server gave an action");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(
        lines[0],
        format!(
            "httpmapd: warning: policy body: no server gave an action ({}: the action is not one line of printable text of at most 4096 bytes); answered the default action \"{d}\" (0 similar not logged)",
            server.url("/")
        )
    );
}

#[test]
fn a_json_pointer_gives_the_action() {
    let server = policy_server(|req| answer_for(&req.attr("case")));
    let (port, nested_port) = (free_port(), free_port());
    let (_daemon, _stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section("j", port, &[server.url("/")], "result = \"json:/action\""),
            policy_section(
                "nested",
                nested_port,
                &[server.url("/")],
                "result = \"json:/result/action\""
            )
        ),
    );
    let d = DEFAULT_ACTION;
    let cases: &[(&str, &str)] = &[
        ("json-ok", "REJECT x"),
        ("json-spaces", "HOLD held"),
        ("json-missing", d),
        ("json-null", d),
        ("json-empty", "DUNNO"),
        ("json-number", d),
        ("json-bool", d),
        ("json-object", d),
        ("json-newline", d),
        ("json-nul", d),
        ("json-bad", d),
        ("json-404", d),
        ("json-ok", "REJECT x"),
    ];
    let mut c = PolicyClient::connect(port);
    for (case, want) in cases {
        let got = c.ask(&request(&[
            ("request", "smtpd_access_policy"),
            ("case", case),
        ]));
        assert_eq!(got, *want, "case {case}");
    }
    let mut c = PolicyClient::connect(nested_port);
    assert_eq!(c.ask(&request(&[("case", "json-nested")])), "OK nested");
    assert_eq!(c.ask(&request(&[("case", "json-ok")])), d);
    assert_eq!(server.requests(), cases.len() + 2);
}

#[test]
fn a_4096_byte_action_with_a_trailing_newline_is_the_action() {
    // The body is trimmed before the 4096-byte bound applies: a server that
    // ends its action with a newline (echo, print) gives the action.
    let action = format!("OK {}", "a".repeat(4093));
    let body = format!("{action}\n");
    let server = policy_server(move |_| Answer::action(&body));
    let (_daemon, port, _stats) = start_policy("p", &[server.url("/")], "");
    let mut c = PolicyClient::connect(port);
    let got = c.ask(&request(&[("sender", "a@x.test")]));
    assert!(
        got == action,
        "got {:?}... ({} bytes) instead of the 4096-byte action",
        &got[..got.len().min(50)],
        got.len()
    );
}

#[test]
fn a_json_reply_larger_than_4096_bytes_gives_its_action() {
    // The bound is on the action, not on the JSON document around it.
    let body = format!(
        r#"{{"action":"REJECT 5.7.1 listed","detail":"{}"}}"#,
        "x".repeat(5000)
    );
    let server = policy_server(move |_| Answer::action(&body));
    let (_daemon, port, _stats) =
        start_policy("p", &[server.url("/")], "result = \"json:/action\"");
    let mut c = PolicyClient::connect(port);
    assert_eq!(
        c.ask(&request(&[("sender", "a@x.test")])),
        "REJECT 5.7.1 listed"
    );
}

#[test]
fn all_servers_down_gives_the_default_action_and_a_mirror_is_used() {
    let up = policy_server(|_| Answer::action("OK from the mirror"));
    let down1 = format!("http://127.0.0.1:{}/", free_port());
    let down2 = format!("http://127.0.0.1:{}/", free_port());
    let (port, mirror_port) = (free_port(), free_port());
    let (_daemon, stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section("down", port, &[down1.clone(), down2.clone()], ""),
            policy_section(
                "mirror",
                mirror_port,
                &[down1.clone(), up.url("/")],
                "max_attempts = 2"
            )
        ),
    );
    let mut c = PolicyClient::connect(port);
    for _ in 0..3 {
        assert_eq!(
            c.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
            DEFAULT_ACTION
        );
    }
    let mut c = PolicyClient::connect(mirror_port);
    for _ in 0..3 {
        assert_eq!(
            c.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
            "OK from the mirror"
        );
    }
    assert_eq!(up.requests(), 3);
    let m = metrics(stats);
    assert_eq!(
        metric(&m, "httpmapd_policy_default_actions_total{policy=\"down\"}"),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_default_actions_total{policy=\"mirror\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("httpmapd_server_up{{map=\"policy:down\",server=\"{down1}\"}}")
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                "httpmapd_server_up{{map=\"policy:mirror\",server=\"{}\"}}",
                up.url("/")
            )
        ),
        1.0
    );
}

// ---------------------------------------------------------------------------
// 5. Caching
// ---------------------------------------------------------------------------

#[test]
fn cache_key_caches_the_action_per_tuple_but_never_the_default_action() {
    // The server numbers its answers: a cached one repeats the number.
    let counter = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let handler = {
        let (counter, fail) = (counter.clone(), fail.clone());
        move |req: &Request| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            if fail.load(Ordering::SeqCst) {
                return Answer::body(503, b"");
            }
            match req.attr("sender").as_str() {
                "quiet@x.test" => Answer::action(""),
                s => Answer::action(&format!("OK {n} {s}")),
            }
        }
    };
    let server = policy_server(handler.clone());
    let addr = server.addr().to_string();
    let (port, short_port) = (free_port(), free_port());
    let key = "cache_key = [\"client_address\", \"sender\"]";
    let (_daemon, stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section(
                "cached",
                port,
                &[server.url("/")],
                &format!("{key}\nttl = \"30s\"")
            ),
            policy_section(
                "short",
                short_port,
                &[server.url("/")],
                &format!("{key}\nttl = \"500ms\"")
            )
        ),
    );
    let mut c = PolicyClient::connect(port);
    let ask = |c: &mut PolicyClient, client: &str, sender: &str, rcpt: &str| {
        c.ask(&smtpd_request(client, sender, rcpt))
    };
    assert_eq!(
        ask(&mut c, "192.0.2.1", "a@x.test", "r1@y.test"),
        "OK 1 a@x.test"
    );
    assert_eq!(server.requests(), 1);
    // The same tuple (another recipient, other connection): the cache.
    assert_eq!(
        ask(&mut c, "192.0.2.1", "a@x.test", "r2@y.test"),
        "OK 1 a@x.test"
    );
    let mut c2 = PolicyClient::connect(port);
    assert_eq!(
        ask(&mut c2, "192.0.2.1", "a@x.test", "r3@y.test"),
        "OK 1 a@x.test"
    );
    assert_eq!(server.requests(), 1);
    // Another sender, another client: new tuples.
    assert_eq!(
        ask(&mut c, "192.0.2.1", "b@x.test", "r1@y.test"),
        "OK 2 b@x.test"
    );
    assert_eq!(
        ask(&mut c, "192.0.2.2", "a@x.test", "r1@y.test"),
        "OK 3 a@x.test"
    );
    assert_eq!(server.requests(), 3);
    // An empty action (DUNNO) is an action: cached too.
    assert_eq!(
        ask(&mut c, "192.0.2.1", "quiet@x.test", "r1@y.test"),
        "DUNNO"
    );
    assert_eq!(
        ask(&mut c, "192.0.2.1", "quiet@x.test", "r2@y.test"),
        "DUNNO"
    );
    assert_eq!(server.requests(), 4);
    // A 503 gives the default action, not cached: the next request asks.
    fail.store(true, Ordering::SeqCst);
    assert_eq!(
        ask(&mut c, "192.0.2.9", "e@x.test", "r1@y.test"),
        DEFAULT_ACTION
    );
    assert_eq!(server.requests(), 5);
    fail.store(false, Ordering::SeqCst);
    assert_eq!(
        ask(&mut c, "192.0.2.9", "e@x.test", "r1@y.test"),
        "OK 6 e@x.test"
    );
    assert_eq!(server.requests(), 6);
    // The server down: the default action, not cached; back on its port:
    // the next request with that tuple reaches it.
    drop(server);
    assert_eq!(
        ask(&mut c, "192.0.2.8", "d@x.test", "r1@y.test"),
        DEFAULT_ACTION
    );
    assert_eq!(
        ask(&mut c, "192.0.2.8", "d@x.test", "r2@y.test"),
        DEFAULT_ACTION
    );
    let server = policy_server_on(&addr, handler).expect("the server back on its port");
    assert_eq!(
        ask(&mut c, "192.0.2.8", "d@x.test", "r3@y.test"),
        "OK 7 d@x.test"
    );
    assert_eq!(server.requests(), 1);
    // Cached entries are still there (not purged by the outage).
    assert_eq!(
        ask(&mut c, "192.0.2.1", "a@x.test", "r9@y.test"),
        "OK 1 a@x.test"
    );
    assert_eq!(server.requests(), 1);
    // ttl: a 500 ms entry is asked again once it expired.
    let mut s = PolicyClient::connect(short_port);
    assert_eq!(
        ask(&mut s, "192.0.2.1", "t@x.test", "r1@y.test"),
        "OK 8 t@x.test"
    );
    assert_eq!(
        ask(&mut s, "192.0.2.1", "t@x.test", "r2@y.test"),
        "OK 8 t@x.test"
    );
    thread::sleep(Duration::from_millis(700));
    assert_eq!(
        ask(&mut s, "192.0.2.1", "t@x.test", "r3@y.test"),
        "OK 9 t@x.test"
    );
    assert_eq!(server.requests(), 3);
    let m = metrics(stats);
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"cached\"}"),
        13.0
    );
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"short\"}"),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_default_actions_total{policy=\"cached\"}"
        ),
        3.0
    );
}

#[test]
fn without_cache_key_every_request_reaches_a_server() {
    let server = policy_server(|_| Answer::action("OK"));
    // (A ttl without cache_key is refused: see policy_configuration_is_checked.)
    let (_daemon, port, stats) = start_policy("nocache", &[server.url("/")], "");
    // Identical requests: pipelined on one connection, then on three.
    let req = smtpd_request("192.0.2.1", "a@x.test", "b@y.test");
    let mut c = PolicyClient::connect(port);
    c.send(&req.repeat(10));
    for _ in 0..10 {
        assert_eq!(c.read_action(), "OK");
    }
    assert_eq!(server.requests(), 10);
    let mut clients: Vec<PolicyClient> = (0..3).map(|_| PolicyClient::connect(port)).collect();
    for round in 0..2 {
        for c in &mut clients {
            c.send(&req);
        }
        for c in &mut clients {
            assert_eq!(c.read_action(), "OK", "round {round}");
        }
    }
    assert_eq!(server.requests(), 16);
    let m = metrics(stats);
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"nocache\"}"),
        16.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_duration_seconds_count{policy=\"nocache\"}"
        ),
        16.0
    );
}

#[test]
fn concurrent_requests_on_two_workers_each_get_their_own_answer() {
    // Without cache_key, requests on different connections must never share
    // a fetch, whichever worker serves them. 16 connections spread over two
    // workers (SO_REUSEPORT); every request is in flight at once.
    let server = policy_server(|req| {
        Answer::action(&format!("OK {}", req.attr("sender"))).delayed(Duration::from_millis(400))
    });
    let port = free_port();
    let (_daemon, stats) = start_daemon(2, &policy_section("busy", port, &[server.url("/")], ""));
    let mut clients: Vec<PolicyClient> = (0..16).map(|_| PolicyClient::connect(port)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&smtpd_request(
            "192.0.2.1",
            &format!("s{i}@x.test"),
            "b@y.test",
        ));
    }
    let got: Vec<String> = clients.iter_mut().map(|c| c.read_action()).collect();
    let want: Vec<String> = (0..16).map(|i| format!("OK s{i}@x.test")).collect();
    assert_eq!(
        got,
        want,
        "each request's own action (the server saw {} requests; httpmapd_cache_coalesced_total {})",
        server.requests(),
        metric(&metrics(stats), "httpmapd_cache_coalesced_total")
    );
    assert_eq!(server.requests(), 16);
}

#[test]
fn a_cached_tuple_hit_near_its_expiry_is_still_answered_after_it() {
    // refresh_ahead (here 50% of a 1 s ttl): a hit in the last half of the
    // entry's life; once it expired, the next request must be answered (by
    // a server: the refreshed or a new fetch), not left waiting.
    let counter = Arc::new(AtomicUsize::new(0));
    let c2 = counter.clone();
    let server = policy_server(move |_| {
        Answer::action(&format!("OK {}", c2.fetch_add(1, Ordering::SeqCst) + 1))
    });
    let port = free_port();
    let (_daemon, _stats) = start_daemon(
        1,
        &format!(
            "[cache]\nrefresh_ahead = \"50%\"\n{}",
            policy_section(
                "fresh",
                port,
                &[server.url("/")],
                "cache_key = [\"sender\"]\nttl = \"1s\""
            )
        ),
    );
    let mut c = PolicyClient::connect(port);
    let req = smtpd_request("192.0.2.1", "a@x.test", "b@y.test");
    let t0 = Instant::now();
    assert_eq!(c.ask(&req), "OK 1");
    thread::sleep(Duration::from_millis(700).saturating_sub(t0.elapsed()));
    assert_eq!(c.ask(&req), "OK 1", "a hit within the ttl");
    thread::sleep(Duration::from_millis(1300).saturating_sub(t0.elapsed()));
    c.send(&req);
    match c.read_reply(Duration::from_secs(3)) {
        Ok(reply) => assert_eq!(String::from_utf8_lossy(&reply), "action=OK 2\n\n"),
        Err(e) => panic!(
            "no answer after the entry expired ({e}); the server saw {} request(s)",
            server.requests()
        ),
    }
    // 2 without background refreshes for policies (a fetch at 1.3 s); 3
    // with them (a refresh at 0.7 s answers the 1.3 s request, which
    // starts another).
    thread::sleep(Duration::from_millis(200));
    let n = server.requests();
    assert!(n == 2 || n == 3, "the server saw {n} requests");
}

#[test]
fn concurrent_requests_for_one_cached_tuple_share_one_fetch() {
    // With cache_key, requests for one tuple in flight together are one
    // fetch: its action (or the default action) answers each of them, and
    // each default action is counted.
    let fail = Arc::new(AtomicBool::new(false));
    let f2 = fail.clone();
    let server = policy_server(move |req| {
        let a = if f2.load(Ordering::SeqCst) {
            Answer::body(503, b"")
        } else {
            Answer::action(&format!("OK {}", req.attr("recipient")))
        };
        a.delayed(Duration::from_millis(300))
    });
    let (_daemon, port, stats) = start_policy(
        "shared",
        &[server.url("/")],
        "cache_key = [\"sender\"]\nttl = \"30s\"",
    );
    let mut clients: Vec<PolicyClient> = (0..4).map(|_| PolicyClient::connect(port)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&smtpd_request(
            "192.0.2.1",
            "one@x.test",
            &format!("r{i}@y.test"),
        ));
        thread::sleep(Duration::from_millis(20));
    }
    let got: Vec<String> = clients.iter_mut().map(|c| c.read_action()).collect();
    assert_eq!(got, vec!["OK r0@y.test"; 4]);
    assert_eq!(server.requests(), 1);
    fail.store(true, Ordering::SeqCst);
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&smtpd_request(
            "192.0.2.1",
            "two@x.test",
            &format!("r{i}@y.test"),
        ));
        thread::sleep(Duration::from_millis(20));
    }
    let got: Vec<String> = clients.iter_mut().map(|c| c.read_action()).collect();
    assert_eq!(got, vec![DEFAULT_ACTION; 4]);
    assert_eq!(server.requests(), 2);
    let m = metrics(stats);
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"shared\"}"),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_actions_total{policy=\"shared\",action=\"OK\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_default_actions_total{policy=\"shared\"}"
        ),
        4.0
    );
    assert_eq!(metric(&m, "httpmapd_cache_coalesced_total"), 6.0);
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_duration_seconds_count{policy=\"shared\"}"
        ),
        2.0
    );
}

// ---------------------------------------------------------------------------
// 6. The request id echo
// ---------------------------------------------------------------------------

#[test]
fn a_wrong_policy_id_echo_is_never_delivered() {
    // The first reply on each request echoes another id (and a REJECT that
    // must never reach Postfix); the retry on a fresh connection is right.
    let counter = Arc::new(AtomicUsize::new(0));
    let c2 = counter.clone();
    let server = policy_server(move |_| {
        if c2.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            Answer::action("REJECT not yours").echo(Echo::Wrong)
        } else {
            Answer::action("OK yours")
        }
    });
    let always_wrong = policy_server(|_| Answer::action("REJECT not yours").echo(Echo::Wrong));
    let (port, wrong_port) = (free_port(), free_port());
    let (daemon, stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section("echo", port, &[server.url("/")], ""),
            policy_section("wrong", wrong_port, &[always_wrong.url("/")], "")
        ),
    );
    let mut c = PolicyClient::connect(port);
    for _ in 0..3 {
        assert_eq!(
            c.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
            "OK yours"
        );
    }
    assert_eq!(server.requests(), 6);
    // Each rejected reply closed its connection.
    assert_eq!(server.connections(), 4);
    let mut w = PolicyClient::connect(wrong_port);
    assert_eq!(
        w.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        DEFAULT_ACTION
    );
    // One server: the request and its retry on a fresh connection.
    assert_eq!(always_wrong.requests(), 2);
    let m = metrics(stats);
    let errors = |map: &str, url: &str, kind: &str| {
        metric(
            &m,
            &format!(
                "httpmapd_server_protocol_errors_total{{map=\"policy:{map}\",server=\"{url}\",kind=\"{kind}\"}}"
            ),
        )
    };
    assert_eq!(errors("echo", &server.url("/"), "echo_mismatch"), 3.0);
    assert_eq!(errors("echo", &server.url("/"), "echo_missing"), 0.0);
    assert_eq!(
        errors("wrong", &always_wrong.url("/"), "echo_mismatch"),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_actions_total{policy=\"echo\",action=\"OK\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_actions_total{policy=\"echo\",action=\"REJECT\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_default_actions_total{policy=\"wrong\"}"
        ),
        1.0
    );
    // One line (rate-limited) for the first rejected reply.
    let lines = log_lines(&daemon.stderr(), "): reply rejected");
    let prefix = format!(
        "httpmapd: warning: server {} (map policy:echo): reply rejected: it echoes policy request id \"0123456789abcdef\" but ",
        server.url("/")
    );
    assert!(
        lines.len() == 1
            && lines[0].starts_with(&prefix)
            && lines[0].ends_with(" was sent; closed the connection (0 similar not logged)"),
        "{lines:#?}"
    );
}

#[test]
fn require_key_echo_refuses_a_reply_without_the_policy_id() {
    let silent = policy_server(|_| Answer::action("OK unproven").echo(Echo::Missing));
    let (strict_port, lax_port) = (free_port(), free_port());
    let (_daemon, stats) = start_daemon(
        1,
        &format!(
            "{}{}",
            policy_section(
                "strict",
                strict_port,
                &[silent.url("/strict")],
                "require_key_echo = true"
            ),
            policy_section("lax", lax_port, &[silent.url("/lax")], "")
        ),
    );
    let mut s = PolicyClient::connect(strict_port);
    assert_eq!(
        s.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        DEFAULT_ACTION
    );
    let mut l = PolicyClient::connect(lax_port);
    assert_eq!(
        l.ask(&smtpd_request("192.0.2.1", "a@x.test", "b@y.test")),
        "OK unproven"
    );
    let m = metrics(stats);
    assert_eq!(
        metric(
            &m,
            &format!(
                "httpmapd_server_protocol_errors_total{{map=\"policy:strict\",server=\"{}\",kind=\"echo_missing\"}}",
                silent.url("/strict")
            )
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                "httpmapd_server_protocol_errors_total{{map=\"policy:lax\",server=\"{}\",kind=\"echo_missing\"}}",
                silent.url("/lax")
            )
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_default_actions_total{policy=\"strict\"}"
        ),
        1.0
    );
}

// ---------------------------------------------------------------------------
// 7. Metrics
// ---------------------------------------------------------------------------

#[test]
fn policy_metrics_count_exactly() {
    let server = policy_server(|req| match req.attr("sender").as_str() {
        "ok@x.test" => Answer::action("OK"),
        "dunno@x.test" => Answer::action(""),
        "reject@x.test" => Answer::action("REJECT 5.7.1 no"),
        "num5@x.test" => Answer::action("554 5.7.1 no"),
        "num4@x.test" => Answer::action("450 4.7.1 later"),
        "dip@x.test" => Answer::action("defer_if_permit maybe"),
        "prepend@x.test" => Answer::action("PREPEND X-Policy: yes"),
        "odd@x.test" => Answer::action("FOOBAR x"),
        "err@x.test" => Answer::body(500, b""),
        s => panic!("unexpected sender {s}"),
    });
    let (_daemon, port, stats) = start_policy(
        "m",
        &[server.url("/")],
        "cache_key = [\"sender\"]\nttl = \"30s\"",
    );
    let before = metrics(stats);
    assert_eq!(
        metric(&before, "httpmapd_policy_requests_total{policy=\"m\"}"),
        0.0
    );
    let mut c = PolicyClient::connect(port);
    let script: &[(&str, &str)] = &[
        ("ok@x.test", "OK"),
        ("ok@x.test", "OK"), // a cache hit
        ("dunno@x.test", "DUNNO"),
        ("reject@x.test", "REJECT 5.7.1 no"),
        ("num5@x.test", "554 5.7.1 no"),
        ("num4@x.test", "450 4.7.1 later"),
        ("dip@x.test", "defer_if_permit maybe"),
        ("prepend@x.test", "PREPEND X-Policy: yes"),
        ("odd@x.test", "FOOBAR x"),
        ("err@x.test", DEFAULT_ACTION),
        ("err@x.test", DEFAULT_ACTION), // never cached: fetched again
        ("dunno@x.test", "DUNNO"),      // a cache hit
    ];
    for (sender, want) in script {
        assert_eq!(
            c.ask(&smtpd_request("192.0.2.1", sender, "r@y.test")),
            *want,
            "{sender}"
        );
    }
    let m = metrics(stats);
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"m\"}"),
        12.0
    );
    let want_actions: &[(&str, f64)] = &[
        ("OK", 2.0),
        ("DUNNO", 2.0),
        ("REJECT", 1.0),
        ("DEFER", 0.0),
        ("DEFER_IF_PERMIT", 1.0),
        ("DEFER_IF_REJECT", 0.0),
        ("HOLD", 0.0),
        ("DISCARD", 0.0),
        ("FILTER", 0.0),
        ("PREPEND", 1.0),
        ("REDIRECT", 0.0),
        ("WARN", 0.0),
        ("BCC", 0.0),
        ("INFO", 0.0),
        ("4xx", 1.0),
        ("5xx", 1.0),
        ("other", 1.0),
    ];
    // Exactly these series, in this order; default actions are not among
    // the actions the servers gave.
    let got = metric_samples(&m, "httpmapd_policy_actions_total", "policy=\"m\"");
    let want: Vec<(String, f64)> = want_actions
        .iter()
        .map(|(a, v)| {
            (
                format!("httpmapd_policy_actions_total{{policy=\"m\",action=\"{a}\"}}"),
                *v,
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        metric(&m, "httpmapd_policy_default_actions_total{policy=\"m\"}"),
        2.0
    );
    // The histogram: one observation per fetch (10; the two hits fetch nothing).
    assert_eq!(
        metric(&m, "httpmapd_policy_duration_seconds_count{policy=\"m\"}"),
        10.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_duration_seconds_bucket{policy=\"m\",le=\"+Inf\"}"
        ),
        10.0
    );
    for family in [
        "httpmapd_policy_requests_total counter",
        "httpmapd_policy_actions_total counter",
        "httpmapd_policy_default_actions_total counter",
        "httpmapd_policy_duration_seconds histogram",
    ] {
        assert!(
            m.lines().any(|l| l == format!("# TYPE {family}")),
            "# TYPE {family}"
        );
    }
    // The server families name the policy's server with map="policy:m".
    let lb = format!("map=\"policy:m\",server=\"{}\"", server.url("/"));
    assert_eq!(
        metric(
            &m,
            &format!("httpmapd_server_requests_total{{{lb},outcome=\"ok\"}}")
        ),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("httpmapd_server_requests_total{{{lb},outcome=\"http_error\"}}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("httpmapd_server_requests_total{{{lb},outcome=\"failure\"}}")
        ),
        0.0
    );
    assert_eq!(
        metric(&m, &format!("httpmapd_server_connects_total{{{lb}}}")),
        1.0
    );
    assert_eq!(metric(&m, &format!("httpmapd_server_up{{{lb}}}")), 1.0);
    assert_eq!(metric(&m, "httpmapd_client_connections_total"), 1.0);
    assert_eq!(server.requests(), 10);
    // /health names the policy.
    let health = stats_body(stats, "/health");
    assert!(health.contains("policy m: 1/1 servers up"), "{health}");
}

// ---------------------------------------------------------------------------
// 1. A real Postfix smtpd asking httpmapd
// ---------------------------------------------------------------------------

/// The restriction as the README gives it (the `{ ... }` form with
/// per-service settings, Postfix 3.0 and later).
fn policy_restriction(policy_port: u16) -> String {
    format!("check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=10s, default_action=DUNNO }}")
}

/// main.cf, after the settings of every private instance.
fn policy_main_cf(policy_port: u16) -> String {
    let restriction = policy_restriction(policy_port);
    format!(
        r#"# Written by tests/policy.rs.
myhostname = policy.test
mydomain = policy.test
myorigin = policy.test
relay_domains = example.com
relay_recipient_maps =
smtpd_recipient_restrictions =
    reject_unauth_destination,
    {restriction}
relayhost = [127.0.0.1]:9
"#
    )
}

fn policy_master_cf(smtp: u16) -> String {
    format!(
        r#"# Written by tests/policy.rs. chroot (5th column) is n everywhere.
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{smtp} inet n - n - - smtpd
{}"#,
        postfix::standard_services(&[])
    )
}

/// An SMTP session with smtpd; replies as text, their codes included.
struct Smtp(SmtpClient);

impl Smtp {
    fn connect(port: u16) -> Smtp {
        Smtp(SmtpClient::connect(port))
    }

    /// One command's reply, lines joined with '\n'.
    fn cmd(&mut self, line: &str) -> String {
        self.0.cmd(line).1
    }

    /// MAIL FROM, then RCPT TO: the RCPT reply (MAIL must be accepted).
    fn rcpt(&mut self, sender: &str, rcpt: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{sender}>"));
        assert_eq!(r, "250 2.1.0 Ok", "MAIL FROM:<{sender}>");
        let r = self.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(self.cmd("RSET"), "250 2.0.0 Ok");
        r
    }

    fn quit(mut self) {
        assert_eq!(self.cmd("QUIT"), "221 2.0.0 Bye");
    }
}

#[test]
fn postfix_smtpd_asks_httpmapd_over_one_policy_connection() {
    let version = Command::new(postfix::program("postconf"))
        .args(["-d", "-h", "mail_version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let t0 = Instant::now();
    // The policy server: REJECT for one sender, DUNNO for the others,
    // DEFER_IF_PERMIT when told.
    let defer = Arc::new(AtomicBool::new(false));
    let handler = {
        let defer = defer.clone();
        move |req: &Request| {
            if defer.load(Ordering::SeqCst) {
                return Answer::action("DEFER_IF_PERMIT try later");
            }
            match req.attr("sender").as_str() {
                "spammer@client.test" => Answer::action("REJECT 5.7.1 go away"),
                _ => Answer::action("DUNNO"),
            }
        }
    };
    let server = policy_server(handler.clone());
    let server_addr = server.addr().to_string();
    let policy_port = free_port();
    let (daemon, stats) = start_daemon(
        1,
        &policy_section("postfix", policy_port, &[server.url("/policy")], ""),
    );
    let pf = PrivatePostfix::start(
        "httpmapd-policy-postfix",
        &policy_main_cf(policy_port),
        1,
        |ports| policy_master_cf(ports[0]),
    );
    let smtpd = pf.smtpd[0];
    eprintln!(
        "Postfix {version} in {} (smtpd on {}), httpmapd policy on {policy_port}, setup {:?}",
        pf.dir.display(),
        smtpd,
        t0.elapsed()
    );
    let connections_before = metric(&metrics(stats), "httpmapd_client_connections_total");

    let mut smtp = Smtp::connect(smtpd);
    let ehlo = smtp.cmd("EHLO client.test");
    assert!(ehlo.starts_with("250-policy.test"), "EHLO: {ehlo}");
    // reject_unauth_destination comes first: no policy request for it.
    assert_eq!(
        smtp.rcpt("friend@client.test", "someone@elsewhere.test"),
        "554 5.7.1 <someone@elsewhere.test>: Relay access denied"
    );
    assert_eq!(server.requests(), 0);
    // REJECT for the spammer, DUNNO (accepted) for a friend.
    assert_eq!(
        smtp.rcpt("spammer@client.test", "a1@example.com"),
        "554 5.7.1 <a1@example.com>: Recipient address rejected: go away"
    );
    assert_eq!(
        smtp.rcpt("friend@client.test", "b1@example.com"),
        "250 2.1.5 Ok"
    );
    // Two recipients in one transaction: two requests.
    assert_eq!(smtp.cmd("MAIL FROM:<friend@client.test>"), "250 2.1.0 Ok");
    assert_eq!(smtp.cmd("RCPT TO:<b2@example.com>"), "250 2.1.5 Ok");
    assert_eq!(smtp.cmd("RCPT TO:<b3@example.com>"), "250 2.1.5 Ok");
    assert_eq!(smtp.cmd("RSET"), "250 2.0.0 Ok");
    // DEFER_IF_PERMIT when told.
    defer.store(true, Ordering::SeqCst);
    assert_eq!(
        smtp.rcpt("friend@client.test", "c1@example.com"),
        "450 4.7.1 <c1@example.com>: Recipient address rejected: try later"
    );
    defer.store(false, Ordering::SeqCst);
    assert_eq!(server.requests(), 5);
    // What smtpd sent, as the server received it.
    let log = server.request_log();
    let senders: Vec<(String, String)> = log
        .iter()
        .map(|r| (r.attr("sender"), r.attr("recipient")))
        .collect();
    let want: Vec<(String, String)> = [
        ("spammer@client.test", "a1@example.com"),
        ("friend@client.test", "b1@example.com"),
        ("friend@client.test", "b2@example.com"),
        ("friend@client.test", "b3@example.com"),
        ("friend@client.test", "c1@example.com"),
    ]
    .iter()
    .map(|(s, r)| (s.to_string(), r.to_string()))
    .collect();
    assert_eq!(senders, want);
    for r in &log {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/policy");
        assert_eq!(r.only_header("Content-Type"), "application/json");
        assert_eq!(r.attr("request"), "smtpd_access_policy");
        assert_eq!(r.attr("protocol_state"), "RCPT");
        assert_eq!(r.attr("protocol_name"), "ESMTP");
        assert_eq!(r.attr("helo_name"), "client.test");
        assert_eq!(r.attr("client_address"), "127.0.0.1");
        assert_eq!(r.attr("server_address"), "127.0.0.1");
        assert_eq!(r.attr("server_port"), smtpd.to_string());
        // Every attribute smtpd 3.7 sends is there, as a string.
        let names: Vec<String> = r.attrs().into_iter().map(|(n, _)| n).collect();
        for (name, _) in smtpd_attrs("", "", "") {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
    // The policy server down: httpmapd's default_action reaches the session.
    drop(server);
    assert_eq!(
        smtp.rcpt("friend@client.test", "d1@example.com"),
        "450 4.7.1 <d1@example.com>: Recipient address rejected: Policy service unavailable"
    );
    // Back on its port: answered again.
    let server = policy_server_on(&server_addr, handler).expect("the server back");
    assert_eq!(
        smtp.rcpt("friend@client.test", "e1@example.com"),
        "250 2.1.5 Ok"
    );
    assert_eq!(
        smtp.rcpt("spammer@client.test", "e2@example.com"),
        "554 5.7.1 <e2@example.com>: Recipient address rejected: go away"
    );
    assert_eq!(server.requests(), 2);
    // smtpd kept one policy connection for all eight requests.
    let m = metrics(stats);
    assert_eq!(
        metric(&m, "httpmapd_client_connections_total") - connections_before,
        1.0,
        "policy connections from smtpd"
    );
    assert_eq!(metric(&m, "httpmapd_client_connections_open"), 1.0);
    assert_eq!(
        metric(&m, "httpmapd_policy_requests_total{policy=\"postfix\"}"),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            "httpmapd_policy_default_actions_total{policy=\"postfix\"}"
        ),
        1.0
    );
    smtp.quit();
    // httpmapd gone: Postfix gives up after its tries and applies its own
    // default_action (DUNNO, from the restriction): the mail is accepted.
    drop(daemon);
    let started = Instant::now();
    let mut smtp = Smtp::connect(smtpd);
    smtp.cmd("EHLO client.test");
    assert_eq!(
        smtp.rcpt("friend@client.test", "f1@example.com"),
        "250 2.1.5 Ok"
    );
    smtp.quit();
    eprintln!("with httpmapd gone, RCPT took {:?}", started.elapsed());
    assert!(
        pf.maillog().contains(&format!(
            "warning: problem talking to server 127.0.0.1:{policy_port}: "
        )),
        "maillog:\n{}",
        pf.maillog()
    );
    eprintln!("done in {:?}", t0.elapsed());
}
