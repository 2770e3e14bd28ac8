//! The load generator's `policy:` target: the real `httpmapd-load` against a
//! small policy server written here (Postfix's policy delegation protocol:
//! `name=value` lines ended by an empty line, answered `action=TEXT` and an
//! empty line). The server checks every request (31 attributes, each a
//! `name=value` line, `request=smtpd_access_policy`, the sender from the key
//! set, the client address following the sender) and counts requests per
//! sender; the tests check exact counts with `-n`, the found / not found /
//! temporary tallies in `--json`, pipelining with `--depth`, `--miss-ratio`,
//! `policy:unix:PATH`, and a reply without an action as a protocol error.

mod common;

use common::run_load;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// The attributes Postfix 3.8 sends in every smtpd policy request.
const ATTRIBUTES: [&str; 31] = [
    "request",
    "protocol_state",
    "protocol_name",
    "helo_name",
    "queue_id",
    "sender",
    "recipient",
    "recipient_count",
    "client_address",
    "client_name",
    "reverse_client_name",
    "instance",
    "sasl_method",
    "sasl_username",
    "sasl_sender",
    "size",
    "ccert_subject",
    "ccert_issuer",
    "ccert_fingerprint",
    "ccert_pubkey_fingerprint",
    "encryption_protocol",
    "encryption_cipher",
    "encryption_keysize",
    "etrn_domain",
    "stress",
    "client_port",
    "policy_context",
    "server_address",
    "server_port",
    "compatibility_level",
    "mail_version",
];

/// How the server answers.
#[derive(Clone, Copy)]
enum Mode {
    /// By the sender's local part (see [`action_for`]).
    BySender,
    /// `result=ok` and an empty line: no action.
    NoAction,
}

/// The action for a sender: `reject*` REJECT, `deny*` a 554, `later*`
/// DEFER_IF_PERMIT, `slow*` a 450, anything else DUNNO.
fn action_for(sender: &str) -> &'static str {
    let local = sender.split('@').next().unwrap_or_default();
    if local.starts_with("reject") {
        "REJECT Not welcome here"
    } else if local.starts_with("deny") {
        "554 5.7.1 Sender address rejected"
    } else if local.starts_with("later") {
        "DEFER_IF_PERMIT Service temporarily unavailable"
    } else if local.starts_with("slow") {
        "450 4.7.1 Try again later"
    } else {
        "DUNNO"
    }
}

/// What the server saw, over every connection.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    /// Most complete requests read at once on one connection.
    max_batch: AtomicU64,
    senders: Mutex<HashMap<String, u64>>,
    /// client_address per sender (the same sender must always come from
    /// the same address).
    clients: Mutex<HashMap<String, String>>,
    /// What was wrong with requests, if anything.
    bad: Mutex<Vec<String>>,
}

impl Seen {
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    fn senders(&self) -> HashMap<String, u64> {
        self.senders.lock().unwrap().clone()
    }
    fn bad(&self) -> Vec<String> {
        self.bad.lock().unwrap().clone()
    }
}

/// Checks one request (its lines, the empty line excluded); returns its
/// sender and client address.
fn check(req: &[u8], seen: &Seen) -> Option<(String, String)> {
    let text = match std::str::from_utf8(req) {
        Ok(t) => t,
        Err(_) => {
            seen.bad.lock().unwrap().push("not UTF-8".into());
            return None;
        }
    };
    let mut attrs = HashMap::new();
    let mut names = Vec::new();
    for line in text.split('\n') {
        let Some((n, v)) = line.split_once('=') else {
            seen.bad
                .lock()
                .unwrap()
                .push(format!("a line without '=': {line:?}"));
            return None;
        };
        names.push(n.to_string());
        attrs.insert(n.to_string(), v.to_string());
    }
    let mut problems = Vec::new();
    if names.len() != ATTRIBUTES.len() {
        problems.push(format!("{} attributes", names.len()));
    }
    let want: HashSet<&str> = ATTRIBUTES.into_iter().collect();
    let got: HashSet<&str> = names.iter().map(String::as_str).collect();
    if got != want {
        problems.push(format!("attribute names {names:?}"));
    }
    if attrs.get("request").map(String::as_str) != Some("smtpd_access_policy") {
        problems.push("request is not smtpd_access_policy".into());
    }
    if attrs.get("protocol_state").map(String::as_str) != Some("RCPT") {
        problems.push("protocol_state is not RCPT".into());
    }
    let sender = attrs.get("sender").cloned().unwrap_or_default();
    if !sender.contains('@') {
        problems.push(format!("sender {sender:?}"));
    }
    let client = attrs.get("client_address").cloned().unwrap_or_default();
    if client.parse::<std::net::Ipv4Addr>().is_err() {
        problems.push(format!("client_address {client:?}"));
    }
    if !problems.is_empty() {
        seen.bad
            .lock()
            .unwrap()
            .push(format!("{}: {text:?}", problems.join(", ")));
        return None;
    }
    Some((sender, client))
}

/// Serves one connection: reads what comes, answers every complete request
/// in it with one write. With `hold`, waits that long before the first read
/// (so pipelined requests pile up in the socket).
fn serve<S: Read + Write>(mut s: S, seen: &Seen, mode: Mode, hold: Duration) {
    if !hold.is_zero() {
        thread::sleep(hold);
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        let mut batch = 0;
        while let Some(i) = buf[pos..].windows(2).position(|w| w == b"\n\n") {
            let req = &buf[pos..pos + i];
            pos += i + 2;
            batch += 1;
            seen.requests.fetch_add(1, Ordering::SeqCst);
            let action = match check(req, seen) {
                Some((sender, client)) => {
                    *seen
                        .senders
                        .lock()
                        .unwrap()
                        .entry(sender.clone())
                        .or_insert(0) += 1;
                    let mut c = seen.clients.lock().unwrap();
                    let was = c.entry(sender.clone()).or_insert_with(|| client.clone());
                    if *was != client {
                        seen.bad
                            .lock()
                            .unwrap()
                            .push(format!("{sender} from {was} and {client}"));
                    }
                    action_for(&sender)
                }
                None => "DUNNO",
            };
            match mode {
                Mode::BySender => {
                    out.extend_from_slice(format!("action={action}\n\n").as_bytes());
                }
                Mode::NoAction => out.extend_from_slice(b"result=ok\n\n"),
            }
        }
        buf.drain(..pos);
        seen.max_batch.fetch_max(batch, Ordering::SeqCst);
        if !out.is_empty() {
            if s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

/// A policy server on 127.0.0.1 (a thread per connection); runs until the
/// test process ends.
fn tcp_server(mode: Mode, hold: Duration) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            let s = s.clone();
            thread::spawn(move || serve(conn, &s, mode, hold));
        }
    });
    (format!("policy:127.0.0.1:{port}"), seen)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "httpmapd-load-policy-{}-{name}",
        std::process::id()
    ))
}

/// Runs with `--json -q`; the report (status checked: 0).
fn run_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--json", "-q"]);
    let o = run_load(&a, LIMIT);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{a:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// found, not found, temporary, and every other error kind together.
fn tallies(j: &Value) -> (u64, u64, u64, u64) {
    let e = &j["errors"];
    let other = ["connect", "timeout", "protocol", "closed", "permanent"]
        .iter()
        .map(|k| u(&e[k]))
        .sum();
    (
        u(&j["found"]),
        u(&j["not_found"]),
        u(&e["temporary"]),
        other,
    )
}

#[test]
fn actions_are_tallied_and_counts_are_exact() {
    let (target, seen) = tcp_server(Mode::BySender, Duration::ZERO);
    let keys = tmp("keys.map");
    std::fs::write(
        &keys,
        "alice@example.com\nreject@example.com\ndeny@example.com\nlater@example.com\nslow@example.com\n",
    )
    .unwrap();
    let j = run_json(&[
        &target,
        "--keys",
        keys.to_str().unwrap(),
        "--sequential",
        "-c",
        "3",
        "-n",
        "500",
    ]);
    let _ = std::fs::remove_file(&keys);
    assert_eq!(seen.bad(), Vec::<String>::new());
    assert_eq!(seen.requests(), 500);
    assert_eq!(u(&j["requests"]), 500);
    assert_eq!(j["target"], target.as_str());
    // Each key asked 100 times (in order over the connections).
    let senders = seen.senders();
    assert_eq!(senders.len(), 5, "{senders:?}");
    assert!(senders.values().all(|&n| n == 100), "{senders:?}");
    // REJECT and 554 found; DUNNO not found; DEFER_IF_PERMIT and 450 temporary.
    assert_eq!(tallies(&j), (200, 100, 200, 0), "{j}");
}

#[test]
fn pipelined_requests_with_depth() {
    // The server waits before its first read on each connection, so the
    // --depth requests written at once arrive together.
    let (target, seen) = tcp_server(Mode::BySender, Duration::from_millis(200));
    let j = run_json(&[
        &target,
        "-c",
        "2",
        "--depth",
        "8",
        "-n",
        "2000",
        "--keyspace",
        "50",
    ]);
    assert_eq!(seen.bad(), Vec::<String>::new());
    assert_eq!(seen.requests(), 2000);
    assert_eq!(u(&j["requests"]), 2000);
    assert_eq!(u(&j["depth"]), 8);
    assert_eq!(seen.max_batch.load(Ordering::SeqCst), 8);
    assert_eq!(tallies(&j), (0, 2000, 0, 0), "{j}");
    // Generated keys: user{0..49}@example.com, each from its own client.
    let senders = seen.senders();
    assert!(senders.len() > 40, "{senders:?}");
    assert!(senders.keys().all(|s| {
        s.strip_prefix("user")
            .and_then(|r| r.strip_suffix("@example.com"))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n < 50)
    }));
    let clients: HashSet<String> = seen.clients.lock().unwrap().values().cloned().collect();
    assert_eq!(
        clients.len(),
        senders.len(),
        "one client address per sender"
    );
}

#[test]
fn miss_ratio_sends_senders_outside_the_key_set() {
    let (target, seen) = tcp_server(Mode::BySender, Duration::ZERO);
    let j = run_json(&[
        &target,
        "-c",
        "4",
        "-n",
        "400",
        "--keyspace",
        "10",
        "--prefix",
        "later",
        "--miss-ratio",
        "0.5",
    ]);
    assert_eq!(seen.bad(), Vec::<String>::new());
    assert_eq!(seen.requests(), 400);
    let senders = seen.senders();
    let misses: u64 = senders
        .iter()
        .filter(|(s, _)| s.contains("-miss"))
        .map(|(_, &n)| n)
        .sum();
    assert!(
        senders
            .iter()
            .filter(|(s, _)| s.contains("-miss"))
            .all(|(_, &n)| n == 1),
        "a miss key is never repeated"
    );
    assert!((120..=280).contains(&misses), "{misses} of 400");
    // Every sender starts with "later": all DEFER_IF_PERMIT.
    assert_eq!(tallies(&j), (0, 0, 400, 0), "{j}");
}

#[test]
fn a_unix_socket_target() {
    let path = tmp("policy.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind unix");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let s = s.clone();
            thread::spawn(move || serve(conn, &s, Mode::BySender, Duration::ZERO));
        }
    });
    let target = format!("policy:unix:{}", path.display());
    let j = run_json(&[
        &target, "-c", "2", "--depth", "2", "-n", "300", "--prefix", "reject",
    ]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(seen.bad(), Vec::<String>::new());
    assert_eq!(seen.requests(), 300);
    assert_eq!(tallies(&j), (300, 0, 0, 0), "{j}");
}

#[test]
fn a_reply_without_an_action_is_a_protocol_error() {
    let (target, seen) = tcp_server(Mode::NoAction, Duration::ZERO);
    let o = run_load(
        &[
            &target,
            "-c",
            "1",
            "-n",
            "5",
            "--timeout",
            "2s",
            "--json",
            "-q",
        ],
        LIMIT,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    // Nothing answered, errors: status 1.
    assert_eq!(o.status.code(), Some(1), "{out}");
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(u(&j["requests"]), 0);
    assert!(u(&j["errors"]["protocol"]) >= 1, "{j}");
    assert!(seen.requests() >= 1);
}

#[test]
fn duration_mode_counts_what_the_server_answered() {
    let (target, seen) = tcp_server(Mode::BySender, Duration::ZERO);
    let j = run_json(&[&target, "-c", "2", "-d", "1s", "--prefix", "deny"]);
    let n = u(&j["requests"]);
    assert!(n > 50, "{j}");
    // Not counted: the request in flight on each connection at the end, or
    // one answered in the loop's last turn and the one sent after it: at
    // most 2 per connection.
    let served = seen.requests();
    assert!(
        (n..=n + 4).contains(&served),
        "{served} served, {n} counted"
    );
    assert_eq!(tallies(&j), (n, 0, 0, 0), "{j}");
}
