//! HTTPS to the servers (issue 12), against the real binary and a real
//! nginx with TLS: verified lookups through Postfix's `postmap`, mutual TLS,
//! every TLS failure a temporary error with its reason in the log (and a
//! good mirror taking over), keep-alive and session resumption over TLS, a
//! reload rotating the client certificate, `header_files` secrets kept out
//! of logs, metrics and `--check`, `--check` on bad TLS files, and host
//! names whose addresses change (a private mount namespace with its own
//! /etc/hosts).
//!
//! Certificates are made with rcgen (`common::pki`): a CA, server
//! certificates (valid, expired, not yet valid, for another name, from
//! another CA), a client CA and client certificates. Each test runs its own
//! nginx (its own prefix directory, pid file and logs, on free ports) whose
//! access log has one line per request with `$connection`,
//! `$ssl_session_reused`, `$ssl_client_s_dn` and the key, so requests and
//! connections are counted exactly.

mod common;

use common::pki::{write_leaf, Ca, Leaf, TempDir, Validity};
use common::{
    assert_temp, free_port, log_lines, metric, metrics, postmap_q, run_check, show, stats_body,
    wait_until, Acceptor, Daemon, LineClient, NginxProcess, Reply, TestServer,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_httpmapd");

/// Bound on every poll below (generous for a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A private nginx with TLS sites
// ---------------------------------------------------------------------------

/// One `server {}` block of the test nginx.
#[derive(Clone, Default)]
struct Site {
    /// The address to listen on (port chosen at start); "127.0.0.1" if empty.
    ip: &'static str,
    /// Certificate and key: `listen ... ssl`. None: plain HTTP.
    tls: Option<(PathBuf, PathBuf)>,
    /// `ssl_verify_client on` with this CA file.
    client_ca: Option<PathBuf>,
    /// More directives for the block (e.g. `keepalive_requests 1;`).
    extra: String,
}

impl Site {
    fn tls(cert: &(PathBuf, PathBuf)) -> Site {
        Site {
            tls: Some(cert.clone()),
            ..Site::default()
        }
    }

    fn plain() -> Site {
        Site::default()
    }

    /// The address to listen on.
    fn ip(&self) -> &'static str {
        if self.ip.is_empty() {
            "127.0.0.1"
        } else {
            self.ip
        }
    }

    fn on(mut self, ip: &'static str) -> Site {
        self.ip = ip;
        self
    }

    fn verify_clients(mut self, ca: &Path) -> Site {
        self.client_ca = Some(ca.to_path_buf());
        self
    }

    fn with(mut self, directives: &str) -> Site {
        self.extra.push_str(directives);
        self.extra.push('\n');
        self
    }
}

/// One request in the test nginx's access log.
#[derive(Debug, Clone)]
struct Hit {
    port: u16,
    connection: u64,
    connection_requests: u64,
    status: u16,
    /// `$ssl_protocol` ("-" on plain HTTP).
    protocol: String,
    /// `$ssl_session_reused`: "r" resumed, "." full handshake.
    reused: String,
    /// `$ssl_client_s_dn` ("-" without a client certificate).
    client_dn: String,
    /// The `POSTFIX-DICT-EMAIL` request header ("-" if none).
    key: String,
    /// The `Authorization` request header ("-" if none).
    authorization: String,
}

/// A private nginx serving dict_http on one or more sites:
/// - `/echo...`: every key found, value `v-KEY`;
/// - anything else: the keys of `pairs` found, others not found;
///
/// each reply echoes the key (`POSTFIX-DICT-EMAIL`). One worker; the access
/// log is unbuffered, so it counts requests exactly. Dropped: stopped and
/// its directory removed (see `common::NginxProcess`).
struct TlsNginx {
    nginx: NginxProcess,
}

/// A free port on `ip` (bind port 0 there).
fn free_port_on(ip: &str) -> u16 {
    if ip == "127.0.0.1" {
        return free_port();
    }
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
        .port()
}

impl TlsNginx {
    /// Starts nginx with `sites`, each on a free port; fails the test when
    /// nginx is not installed.
    fn start(sites: &[Site], pairs: &[(&str, &str)]) -> TlsNginx {
        let listen = || {
            sites
                .iter()
                .map(|s| {
                    let ip = s.ip();
                    SocketAddr::new(ip.parse().unwrap(), free_port_on(ip))
                })
                .collect()
        };
        let http = |dir: &Path, addrs: &[SocketAddr]| {
            let ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
            TlsNginx::http_block(dir, sites, &ports, pairs)
        };
        let nginx = NginxProcess::start("httpmapd-tls-nginx", listen, http);
        TlsNginx { nginx }
    }

    /// The inside of nginx.conf's `http {}` block.
    fn http_block(dir: &Path, sites: &[Site], ports: &[u16], pairs: &[(&str, &str)]) -> String {
        let d = dir.display();
        let mut map = String::new();
        for (k, v) in pairs {
            assert!(
                !k.contains(['"', '\\', '$']) && !v.contains(['"', '\\', '$']),
                "keep test keys and values plain"
            );
            map.push_str(&format!("        \"\\{k}\" \"{v}\";\n"));
        }
        let mut servers = String::new();
        for (s, port) in sites.iter().zip(ports) {
            let ip = s.ip();
            let mut block = String::new();
            match &s.tls {
                Some((cert, key)) => {
                    block.push_str(&format!(
                        "        listen {ip}:{port} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
                        cert.display(),
                        key.display()
                    ));
                }
                None => block.push_str(&format!("        listen {ip}:{port};\n")),
            }
            if let Some(ca) = &s.client_ca {
                block.push_str(&format!(
                    "        ssl_verify_client on;\n        ssl_client_certificate {};\n",
                    ca.display()
                ));
            }
            block.push_str(&s.extra);
            servers.push_str(&format!(
                r#"    server {{
{block}
        location / {{
            add_header POSTFIX-DICT-RESULTS $dict_result always;
            add_header POSTFIX-DICT-EMAIL $http_postfix_dict_email always;
            return 200 "";
        }}
        location /echo {{
            add_header POSTFIX-DICT-RESULTS "v-$http_postfix_dict_email" always;
            add_header POSTFIX-DICT-EMAIL $http_postfix_dict_email always;
            return 200 "";
        }}
    }}
"#
            ));
        }
        format!(
            r#"    # Written by tests/tls.rs.
    log_format tls '$server_port $connection $connection_requests $status "$ssl_protocol" "$ssl_session_reused" "$ssl_client_s_dn" "$http_postfix_dict_email" "$http_authorization"';
    access_log {d}/access.log tls;
    keepalive_timeout 60s;
    keepalive_requests 10000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:1m;
    ssl_session_tickets on;
    map $http_postfix_dict_email $dict_result {{
        default "";
{map}    }}
{servers}"#
        )
    }

    /// The port of site `i`.
    fn port(&self, i: usize) -> u16 {
        self.nginx.addrs[i].port()
    }

    /// Every request so far, in order.
    fn hits(&self) -> Vec<Hit> {
        self.nginx
            .access_log()
            .lines()
            .map(|line| {
                let parse = || -> Option<Hit> {
                    let mut it = line.splitn(5, ' ');
                    let port = it.next()?.parse().ok()?;
                    let connection = it.next()?.parse().ok()?;
                    let connection_requests = it.next()?.parse().ok()?;
                    let status = it.next()?.parse().ok()?;
                    let rest = it.next()?.strip_prefix('"')?.strip_suffix('"')?;
                    let f: Vec<&str> = rest.split("\" \"").collect();
                    let [protocol, reused, client_dn, key, authorization] = f[..] else {
                        return None;
                    };
                    Some(Hit {
                        port,
                        connection,
                        connection_requests,
                        status,
                        protocol: protocol.into(),
                        reused: reused.into(),
                        client_dn: client_dn.into(),
                        key: key.into(),
                        authorization: authorization.into(),
                    })
                };
                parse().unwrap_or_else(|| panic!("unexpected access log line {line:?}"))
            })
            .collect()
    }

    /// The requests site `i` served, once the log has been still for 100 ms
    /// (nginx writes a line right after its response).
    fn hits_on(&self, i: usize) -> Vec<Hit> {
        let mut last = self.hits().len();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = self.hits().len();
            if now == last || Instant::now() >= deadline {
                break;
            }
            last = now;
        }
        let port = self.port(i);
        self.hits().into_iter().filter(|h| h.port == port).collect()
    }
}

/// Distinct `$connection` values, in order of first appearance.
fn connections(hits: &[Hit]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for h in hits {
        if !out.contains(&h.connection) {
            out.push(h.connection);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// A server that accepts TCP and never answers the handshake
// ---------------------------------------------------------------------------

/// Accepts connections on 127.0.0.1, reads what comes and never writes.
struct Stall(Acceptor);

impl Stall {
    fn start() -> Stall {
        Stall(Acceptor::start(|mut conn, _| {
            let mut sink = [0u8; 4096];
            while let Ok(n) = conn.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }))
    }

    fn port(&self) -> u16 {
        self.0.port()
    }

    fn accepted(&self) -> usize {
        self.0.accepted()
    }
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// Starts the daemon on `config` with the command `make(config_path)`
/// (stdio and readiness done by `Daemon::start_command`): ready when
/// 127.0.0.1:`ready_port` accepts and it handles SIGHUP.
fn start_with(config: &str, ready_port: u16, make: impl FnOnce(&Path) -> Command) -> Daemon {
    let d = Daemon::start_command(config, ready_port, make);
    d.wait_handling(&[libc::SIGHUP]);
    d
}

/// The daemon on `config`, with these extra environment variables.
fn start(config: &str, ready_port: u16, env: &[(&str, &Path)]) -> Daemon {
    start_with(config, ready_port, |path| {
        let mut c = Command::new(BIN);
        c.arg("-c").arg(path);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    })
}

/// SIGHUP, then waits for the next "reloaded" line (panics on "reload refused").
fn reload(d: &Daemon) {
    d.reload_ok();
    // The workers take the new configuration from their mailboxes.
    thread::sleep(Duration::from_millis(100));
}

/// The "is down" line for `url` in map `map`, with this reason (exact).
fn down_line(url: &str, map: &str, reason: &str) -> String {
    format!("httpmapd: warning: server {url} (map {map}) is down: {reason}; resting 10000ms")
}

/// Asserts `log` has exactly one "is down" line for (`url`, `map`), and
/// that it starts with `down_line(url, map, reason_prefix)` without its
/// "; resting..." tail when `exact` is false.
fn assert_down_once(log: &str, url: &str, map: &str, reason: &str, exact: bool) {
    let prefix = format!("server {url} (map {map}) is down: ");
    let lines = log_lines(log, &prefix);
    assert_eq!(
        lines.len(),
        1,
        "one down line for {url} in map {map}:\n{log}"
    );
    if exact {
        assert_eq!(lines[0], down_line(url, map, reason), "{log}");
    } else {
        let want = format!("httpmapd: warning: {prefix}{reason}");
        assert!(
            lines[0].starts_with(&want) && lines[0].ends_with("; resting 10000ms"),
            "down line {:?} does not start with {want:?}",
            lines[0]
        );
    }
}

/// `{map="M",server="URL"}` labels plus more.
fn labels(map: &str, url: &str, more: &str) -> String {
    if more.is_empty() {
        format!("{{map=\"{map}\",server=\"{url}\"}}")
    } else {
        format!("{{map=\"{map}\",server=\"{url}\",{more}}}")
    }
}

/// The 1-based line of `text` holding `needle` (which must be on one line only).
fn line_of(text: &str, needle: &str) -> usize {
    let found: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(found.len(), 1, "{needle:?} on exactly one line of:\n{text}");
    found[0]
}

// ---------------------------------------------------------------------------
// 1. A verified lookup through postmap
// ---------------------------------------------------------------------------

/// Postfix's own client over tcp_table, httpmapd over HTTPS to nginx with a
/// private CA: the exact value, not-found, and exactly one request to nginx
/// per lookup. The same server named by IP with `tls_server_name`, and a
/// map mixing `https://` and `http://` servers.
#[test]
fn postmap_lookup_over_verified_https() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let cert = write_leaf(&pki, "dir", &ca.server(&["dir.example.test", "127.0.0.1"]));
    let pairs = [("alice@example.com", "alice@mail.example")];
    let nginx = TlsNginx::start(&[Site::tls(&cert), Site::plain()], &pairs);
    let (tls_port, plain_port) = (nginx.port(0), nginx.port(1));
    let (p_ip, p_name, p_mixed) = (free_port(), free_port(), free_port());
    let url = format!("https://127.0.0.1:{tls_port}/virtual");
    let config = format!(
        r#"[maps.virtual]
tcp_listen = "127.0.0.1:{p_ip}"
servers = ["{url}"]
tls_ca_file = "{ca}"

[maps.byname]
tcp_listen = "127.0.0.1:{p_name}"
servers = ["https://127.0.0.1:{tls_port}/byname"]
tls_ca_file = "{ca}"
tls_server_name = "dir.example.test"

[maps.mixed]
tcp_listen = "127.0.0.1:{p_mixed}"
servers = ["https://127.0.0.1:{tls_port}/echo", "http://127.0.0.1:{plain_port}/echo"]
tls_ca_file = "{ca}"
ttl = "0s"
"#,
        ca = ca_file.display()
    );
    let d = start(&config, p_mixed, &[]);

    let table = format!("tcp:127.0.0.1:{p_ip}");
    let (code, out, err) = postmap_q("alice@example.com", &table);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "alice@mail.example\n", "")
    );
    let (code, out, err) = postmap_q("nobody@example.com", &table);
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", ""));
    let hits = nginx.hits_on(0);
    assert_eq!(hits.len(), 2, "{hits:?}");
    let keys: Vec<&str> = hits.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(keys, ["alice@example.com", "nobody@example.com"]);
    assert!(hits
        .iter()
        .all(|h| h.protocol == "TLSv1.3" && h.status == 200));

    // By IP, verifying tls_server_name (the certificate names both).
    let (code, out, _) = postmap_q("alice@example.com", &format!("tcp:127.0.0.1:{p_name}"));
    assert_eq!((code, out.as_str()), (0, "alice@mail.example\n"));
    assert_eq!(nginx.hits_on(0).len(), 3);

    // https and http mirrors in one map: every lookup answered by one of them.
    let mut c = LineClient::connect(p_mixed);
    for i in 0..20 {
        let key = format!("m{i}@example.com");
        assert_eq!(c.get(&key), format!("200 v-{key}\n"));
    }
    let tls_mixed = nginx
        .hits_on(0)
        .iter()
        .filter(|h| h.key.starts_with('m'))
        .count();
    let plain_mixed = nginx.hits_on(1).len();
    assert_eq!(tls_mixed + plain_mixed, 20);
    assert!(
        tls_mixed > 0 && plain_mixed > 0,
        "both mirrors used: https {tls_mixed}, http {plain_mixed}"
    );
    assert!(!d.stderr().contains("is down"), "{}", d.stderr());
}

// ---------------------------------------------------------------------------
// 2. Mutual TLS
// ---------------------------------------------------------------------------

/// nginx requiring client certificates from a client CA: the map with
/// `tls_client_cert`/`tls_client_key` gets its answer (and nginx logs the
/// client's DN); without a certificate, or with one from another CA, the
/// lookup is a temporary error.
#[test]
fn mutual_tls_accepted_with_the_client_certificate_refused_without() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Server CA");
    let client_ca = Ca::new("Client CA");
    let rogue_ca = Ca::new("Rogue CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let client_ca_file = pki.write("client-ca.pem", &client_ca.pem);
    let cert = write_leaf(&pki, "server", &ca.server(&["127.0.0.1"]));
    let (ccert, ckey) = write_leaf(&pki, "client", &client_ca.client("mailhost"));
    let (rcert, rkey) = write_leaf(&pki, "rogue", &rogue_ca.client("intruder"));
    let nginx = TlsNginx::start(
        &[Site::tls(&cert).verify_clients(&client_ca_file)],
        &[("alice@example.com", "alice@mail.example")],
    );
    let port = free_port();
    let url = format!("https://127.0.0.1:{}/v", nginx.port(0));
    let config = format!(
        r#"[daemon]
socketmap_listen = "127.0.0.1:{port}"

[maps.mtls]
servers = ["{url}"]
tls_ca_file = "{ca}"
tls_client_cert = "{ccert}"
tls_client_key = "{ckey}"

[maps.nocert]
servers = ["{url}"]
tls_ca_file = "{ca}"

[maps.rogue]
servers = ["{url}"]
tls_ca_file = "{ca}"
tls_client_cert = "{rcert}"
tls_client_key = "{rkey}"
"#,
        ca = ca_file.display(),
        ccert = ccert.display(),
        ckey = ckey.display(),
        rcert = rcert.display(),
        rkey = rkey.display(),
    );
    let d = start(&config, port, &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.socketmap_query("mtls", b"alice@example.com")),
        "OK alice@mail.example"
    );
    let hits = nginx.hits_on(0);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].client_dn, "CN=mailhost");
    assert_eq!(hits[0].status, 200);

    for map in ["nocert", "rogue"] {
        let reply = show(&c.socketmap_query(map, b"alice@example.com"));
        assert!(reply.starts_with("TEMP "), "{map}: {reply:?}");
    }
    // nginx completes the handshake and answers 400 ("No required SSL
    // certificate was sent", "The SSL certificate error"): one request per
    // lookup, not retried on the same server.
    let hits = nginx.hits_on(0);
    let refused: Vec<(u16, &str)> = hits[1..]
        .iter()
        .map(|h| (h.status, h.client_dn.as_str()))
        .collect();
    assert_eq!(refused.len(), 2, "{hits:?}");
    assert!(refused.iter().all(|&(s, _)| s == 400), "{hits:?}");
    assert_eq!(refused[0].1, "-", "no client certificate: {hits:?}");
    assert_eq!(refused[1].1, "CN=intruder", "{hits:?}");
    // The accepted identity still works.
    assert_eq!(
        show(&c.socketmap_query("mtls", b"alice@example.com")),
        "OK alice@mail.example"
    );
    drop(d);
}

// ---------------------------------------------------------------------------
// 3. TLS failures: temporary errors, reasons, failover
// ---------------------------------------------------------------------------

/// Every kind of TLS failure is a temporary error with its reason in the
/// server's "is down" line; a map with a good mirror answers through it.
/// The daemon's system store (`SSL_CERT_FILE`) holds another CA than the
/// servers' own: a map without `tls_ca_file` sees "unknown CA" from the
/// good server, and succeeds against a server of that other CA.
#[test]
fn tls_failures_are_temporary_with_their_reason_and_fail_over() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let other = Ca::new("Other CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let system_store = pki.write("system.pem", &other.pem);
    let names = ["dir.example.test", "127.0.0.1"];
    let good = write_leaf(&pki, "good", &ca.server(&names));
    let expired = write_leaf(
        &pki,
        "expired",
        &ca.issue(&names, "expired", Validity::Expired, false),
    );
    let notyet = write_leaf(
        &pki,
        "notyet",
        &ca.issue(&names, "notyet", Validity::NotYetValid, false),
    );
    let wrongname = write_leaf(&pki, "wrongname", &ca.server(&["other.example.test"]));
    let unknown = write_leaf(&pki, "unknown", &other.server(&names));
    let nginx = TlsNginx::start(
        &[
            Site::tls(&good),
            Site::tls(&expired),
            Site::tls(&notyet),
            Site::tls(&wrongname),
            Site::tls(&unknown),
            Site::plain(),
        ],
        &[],
    );
    let url = |i: usize| format!("https://127.0.0.1:{}/echo", nginx.port(i));
    let good_url = url(0);
    // (map, bad server's URL, reason, whether the reason is the whole text)
    let cases: Vec<(&str, String, String, bool)> = vec![
        ("expired", url(1), "certificate expired".into(), true),
        ("notyet", url(2), "certificate not yet valid".into(), true),
        (
            "wrongname",
            url(3),
            "name mismatch: wanted dir.example.test".into(),
            true,
        ),
        ("unknownca", url(4), "unknown CA: ".into(), false),
        ("sysstore", good_url.clone(), "unknown CA: ".into(), false),
        (
            "plain",
            url(5),
            "not TLS (a plain HTTP server on a TLS port?): ".into(),
            false,
        ),
    ];
    let port = free_port();
    let tcp_port = free_port();
    let stats = free_port();
    let mut config = format!(
        r#"[daemon]
socketmap_listen = "127.0.0.1:{port}"
stats_listen = "127.0.0.1:{stats}"

[maps.sysstore_ok]
servers = ["{}"]
"#,
        url(4)
    );
    for (map, bad, _, _) in &cases {
        let ca_line = if *map == "sysstore" {
            String::new()
        } else {
            format!("tls_ca_file = \"{}\"\n", ca_file.display())
        };
        let name_line = if *map == "wrongname" {
            "tls_server_name = \"dir.example.test\"\n"
        } else {
            ""
        };
        let listen = if *map == "expired" {
            format!("tcp_listen = \"127.0.0.1:{tcp_port}\"\n")
        } else {
            String::new()
        };
        let mirror = if *map == "sysstore" {
            // The mirror must be trusted by the system store.
            url(4)
        } else {
            good_url.clone()
        };
        config.push_str(&format!(
            "\n[maps.{map}]\n{listen}servers = [\"{bad}\"]\n{ca_line}{name_line}connect_timeout = \"500ms\"\n\
             \n[maps.{map}_m]\nservers = [\"{bad}\", \"{mirror}\"]\n{ca_line}{name_line}connect_timeout = \"500ms\"\nttl = \"0s\"\n"
        ));
    }
    let d = start(&config, port, &[("SSL_CERT_FILE", &system_store)]);
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.socketmap_query("sysstore_ok", b"k@example.com")),
        "OK v-k@example.com",
        "SSL_CERT_FILE is the system store"
    );

    // Alone: a temporary error, and the reason in the log.
    for (map, bad, reason, exact) in &cases {
        let t0 = Instant::now();
        let reply = show(&c.socketmap_query(map, b"alone@example.com"));
        let took = t0.elapsed();
        assert!(reply.starts_with("TEMP "), "{map}: {reply:?}");
        let log = d.stderr();
        assert_down_once(&log, bad, map, reason, *exact);
        assert!(took < Duration::from_millis(450), "{map}: took {took:?}");
    }
    // tcp_table: 400.
    let mut t = LineClient::connect(tcp_port);
    assert_temp(&t.get("again@example.com"), "expired over tcp_table");

    // With a good mirror: every lookup succeeds. Look up until the bad
    // server has been tried once (it then rests 10 s).
    let mut served = std::collections::HashMap::new();
    for (map, bad, reason, exact) in &cases {
        let m = format!("{map}_m");
        let mut n = 0;
        let down = format!("server {bad} (map {m}) is down: ");
        while n < 40 && !d.stderr().contains(&down) {
            let key = format!("{m}-{n}@example.com");
            assert_eq!(
                show(&c.socketmap_query(&m, key.as_bytes())),
                format!("OK v-{key}"),
                "{m}"
            );
            n += 1;
        }
        assert_down_once(&d.stderr(), bad, &m, reason, *exact);
        // Resting: the next lookups all go to the mirror.
        for i in n..n + 5 {
            let key = format!("{m}-{i}@example.com");
            assert_eq!(
                show(&c.socketmap_query(&m, key.as_bytes())),
                format!("OK v-{key}")
            );
        }
        served.insert(m, n + 5);
    }

    // Exact counts: the mirrors served every lookup of their map once; the
    // failing TLS servers saw no request at all; the plain HTTP server saw
    // one (unparseable) request per handshake attempt.
    let hits = nginx.hits();
    for (m, n) in &served {
        let mirror_port = if m == "sysstore_m" {
            nginx.port(4)
        } else {
            nginx.port(0)
        };
        let got = hits
            .iter()
            .filter(|h| h.key.starts_with(&format!("{m}-")))
            .collect::<Vec<_>>();
        assert_eq!(got.len(), *n, "{m}: {got:?}");
        assert!(got.iter().all(|h| h.port == mirror_port && h.status == 200));
    }
    for i in 1..=4 {
        // (Site 4 is also sysstore_m's mirror, counted above.)
        let on_site: Vec<&Hit> = hits
            .iter()
            .filter(|h| h.port == nginx.port(i) && !h.key.starts_with("sysstore_m-"))
            .collect();
        let want = if i == 4 { 1 } else { 0 }; // sysstore_ok's lookup
        assert_eq!(on_site.len(), want, "site {i}: {on_site:?}");
    }
    let plain: Vec<Hit> = nginx.hits_on(5);
    assert_eq!(plain.len(), 2, "plain site: {plain:?}");
    assert!(plain.iter().all(|h| h.status == 400), "{plain:?}");

    // Metrics: the failed servers are down, each with one failure per
    // lookup that tried it (the expired one was asked twice: with every
    // server of its map resting, one is probed anyway).
    let metrics = metrics(stats);
    for (map, bad, _, _) in &cases {
        let failures = if *map == "expired" { 2.0 } else { 1.0 };
        assert_eq!(
            metric(
                &metrics,
                &format!("httpmapd_server_up{}", labels(map, bad, ""))
            ),
            0.0
        );
        assert_eq!(
            metric(
                &metrics,
                &format!(
                    "httpmapd_server_requests_total{}",
                    labels(map, bad, "outcome=\"failure\"")
                )
            ),
            failures,
            "{map}"
        );
    }
    assert_eq!(
        metric(
            &metrics,
            &format!("httpmapd_server_up{}", labels("expired_m", &good_url, ""))
        ),
        1.0
    );
}

/// A server that accepts the TCP connection and never answers the TLS
/// handshake: the handshake counts within `connect_timeout` (500ms here,
/// http_timeout 5s), the lookup is a temporary error after about that long,
/// the server's down line says "connect timed out", and a good mirror takes
/// over.
#[test]
fn a_stalled_handshake_is_bounded_by_connect_timeout() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let good = write_leaf(&pki, "good", &ca.server(&["127.0.0.1"]));
    let nginx = TlsNginx::start(&[Site::tls(&good)], &[]);
    let stall = Stall::start();
    let stall_url = format!("https://127.0.0.1:{}/echo", stall.port());
    let good_url = format!("https://127.0.0.1:{}/echo", nginx.port(0));
    let port = free_port();
    let config = format!(
        r#"[daemon]
socketmap_listen = "127.0.0.1:{port}"

[maps.stall]
servers = ["{stall_url}"]
tls_ca_file = "{ca}"
connect_timeout = "500ms"
http_timeout = "5s"

[maps.stall_m]
servers = ["{stall_url}", "{good_url}"]
tls_ca_file = "{ca}"
connect_timeout = "500ms"
http_timeout = "5s"
ttl = "0s"
"#,
        ca = ca_file.display()
    );
    let d = start(&config, port, &[]);
    let mut c = LineClient::connect(port);
    let t0 = Instant::now();
    let reply = show(&c.socketmap_query("stall", b"alone@example.com"));
    let took = t0.elapsed();
    eprintln!("stalled handshake: answered {reply:?} after {took:?}");
    assert!(reply.starts_with("TEMP "), "{reply:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "the stalled handshake took {took:?} (connect_timeout 500ms)"
    );
    assert_eq!(stall.accepted(), 1);

    // With a mirror: every lookup answered; the stalled server tried once.
    let mut n = 0;
    let down = format!("server {stall_url} (map stall_m) is down: ");
    while n < 40 && !d.stderr().contains(&down) {
        let key = format!("m-{n}@example.com");
        let t0 = Instant::now();
        assert_eq!(
            show(&c.socketmap_query("stall_m", key.as_bytes())),
            format!("OK v-{key}")
        );
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
        n += 1;
    }
    for i in n..n + 5 {
        let key = format!("m-{i}@example.com");
        assert_eq!(
            show(&c.socketmap_query("stall_m", key.as_bytes())),
            format!("OK v-{key}")
        );
    }
    assert_eq!(nginx.hits_on(0).len(), n + 5);
    assert_eq!(stall.accepted(), 2, "one connection per attempt");

    // The reason: a handshake that did not finish in time is a connect
    // that timed out.
    let log = d.stderr();
    assert_down_once(&log, &stall_url, "stall", "connect timed out", true);
    assert_down_once(&log, &stall_url, "stall_m", "connect timed out", true);
}

// ---------------------------------------------------------------------------
// 4. Keep-alive over TLS
// ---------------------------------------------------------------------------

/// 300 lookups of distinct keys over one tcp_table client, one worker, one
/// connection allowed: nginx sees 300 requests on one TLS connection (one
/// full handshake).
#[test]
fn keep_alive_over_tls_one_connection_for_300_lookups() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let cert = write_leaf(&pki, "server", &ca.server(&["127.0.0.1"]));
    let nginx = TlsNginx::start(&[Site::tls(&cert)], &[]);
    let token = pki.write("token", "Bearer over-tls\n");
    let (port, stats) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{}/echo", nginx.port(0));
    let config = format!(
        r#"[daemon]
workers = 1
stats_listen = "127.0.0.1:{stats}"

[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
tls_ca_file = "{ca}"
max_connections = 1
require_key_echo = true
header_files = {{ Authorization = "{token}" }}
"#,
        ca = ca_file.display(),
        token = token.display()
    );
    let d = start(&config, port, &[]);
    let mut c = LineClient::connect(port);
    for i in 0..300 {
        let key = format!("user{i}@example.com");
        assert_eq!(c.get(&key), format!("200 v-{key}\n"));
    }
    let hits = nginx.hits_on(0);
    assert_eq!(hits.len(), 300);
    let conns = connections(&hits);
    eprintln!(
        "keep-alive over TLS: {} connection(s) for 300 lookups",
        conns.len()
    );
    assert_eq!(conns.len(), 1, "{conns:?}");
    let seq: Vec<u64> = hits.iter().map(|h| h.connection_requests).collect();
    assert_eq!(seq, (1..=300).collect::<Vec<u64>>());
    assert!(hits.iter().all(|h| h.reused == "."), "one full handshake");
    assert!(hits.iter().all(|h| h.authorization == "Bearer over-tls"));
    let metrics = metrics(stats);
    let l = |more: &str| labels("virtual", &url, more);
    assert_eq!(
        metric(
            &metrics,
            &format!("httpmapd_server_requests_total{}", l("outcome=\"ok\""))
        ),
        300.0
    );
    assert_eq!(
        metric(&metrics, &format!("httpmapd_server_connections{}", l(""))),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("httpmapd_server_connects_total{}", l(""))
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "httpmapd_server_tls_handshakes_total{}",
                l("resumed=\"false\"")
            )
        ),
        1.0
    );
    assert!(!d.stderr().contains("warning"), "{}", d.stderr());
}

// ---------------------------------------------------------------------------
// 5. Session resumption
// ---------------------------------------------------------------------------

/// nginx closing every connection after one request (`keepalive_requests
/// 1`): each lookup is a new connection, and every one after the first
/// resumes the TLS session, over TLS 1.3 (tickets) and TLS 1.2. A reload
/// that leaves the TLS files alone keeps the sessions; one that changes the
/// CA file starts afresh.
#[test]
fn new_connections_resume_tls_sessions_across_reloads() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let other = Ca::new("Other CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let ca13 = pki.write("ca13.pem", &ca.pem);
    let cert = write_leaf(&pki, "server", &ca.server(&["127.0.0.1"]));
    let nginx = TlsNginx::start(
        &[
            Site::tls(&cert).with("ssl_protocols TLSv1.3;\nkeepalive_requests 1;"),
            Site::tls(&cert).with("ssl_protocols TLSv1.2;\nkeepalive_requests 1;"),
        ],
        &[],
    );
    let (port, stats) = (free_port(), free_port());
    let url13 = format!("https://127.0.0.1:{}/echo", nginx.port(0));
    let url12 = format!("https://127.0.0.1:{}/echo", nginx.port(1));
    let config = format!(
        r#"[daemon]
workers = 1
socketmap_listen = "127.0.0.1:{port}"
stats_listen = "127.0.0.1:{stats}"

[maps.r13]
servers = ["{url13}"]
tls_ca_file = "{ca13}"
ttl = "0s"

[maps.r12]
servers = ["{url12}"]
tls_ca_file = "{ca}"
ttl = "0s"
"#,
        ca = ca_file.display(),
        ca13 = ca13.display()
    );
    let d = start(&config, port, &[]);
    let lookups = |c: &mut LineClient, n: usize, tag: &str| {
        for map in ["r13", "r12"] {
            for i in 0..n {
                let key = format!("{tag}-{i}@example.com");
                assert_eq!(
                    show(&c.socketmap_query(map, key.as_bytes())),
                    format!("OK v-{key}")
                );
            }
        }
    };
    let flags = |site: usize| -> String {
        let hits = nginx.hits_on(site);
        assert_eq!(
            connections(&hits).len(),
            hits.len(),
            "one request per connection"
        );
        hits.iter().map(|h| h.reused.as_str()).collect()
    };
    let mut c = LineClient::connect(port);
    lookups(&mut c, 5, "a");
    let (f13, f12) = (flags(0), flags(1));
    eprintln!("resumption: TLS 1.3 {f13}, TLS 1.2 {f12}");
    assert_eq!(f13, ".rrrr");
    assert_eq!(f12, ".rrrr");
    let protocols: Vec<String> = [0, 1]
        .iter()
        .map(|&i| nginx.hits_on(i)[0].protocol.clone())
        .collect();
    assert_eq!(protocols, ["TLSv1.3", "TLSv1.2"]);

    // A reload with the same files: the sessions are kept.
    reload(&d);
    lookups(&mut c, 2, "b");
    assert_eq!((flags(0), flags(1)), (".rrrrrr".into(), ".rrrrrr".into()));

    // The r13 CA file changes (another CA added): a new TLS client, a full
    // handshake, then resumption again; r12 keeps its sessions.
    std::fs::write(&ca13, format!("{}{}", ca.pem, other.pem)).unwrap();
    reload(&d);
    lookups(&mut c, 2, "c");
    let (f13, f12) = (flags(0), flags(1));
    eprintln!("resumption after reloads: TLS 1.3 {f13}, TLS 1.2 {f12}");
    assert_eq!((f13.as_str(), f12.as_str()), (".rrrrrr.r", ".rrrrrrrr"));

    let metrics = metrics(stats);
    let hs = |url: &str, resumed: &str| {
        metric(
            &metrics,
            &format!(
                "httpmapd_server_tls_handshakes_total{}",
                labels("r12", url, &format!("resumed=\"{resumed}\""))
            ),
        )
    };
    assert_eq!((hs(&url12, "false"), hs(&url12, "true")), (1.0, 8.0));
}

// ---------------------------------------------------------------------------
// 6. Client certificate rotation
// ---------------------------------------------------------------------------

/// The client certificate and key files replaced, then SIGHUP: the next
/// lookup goes over a new connection presenting the new certificate.
#[test]
fn reload_rotates_the_client_certificate() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Server CA");
    let client_ca = Ca::new("Client CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let client_ca_file = pki.write("client-ca.pem", &client_ca.pem);
    let cert = write_leaf(&pki, "server", &ca.server(&["127.0.0.1"]));
    let (ccert, ckey) = write_leaf(&pki, "client", &client_ca.client("a"));
    let nginx = TlsNginx::start(&[Site::tls(&cert).verify_clients(&client_ca_file)], &[]);
    let port = free_port();
    let config = format!(
        r#"[maps.virtual]
tcp_listen = "127.0.0.1:{port}"
servers = ["https://127.0.0.1:{}/echo"]
tls_ca_file = "{}"
tls_client_cert = "{}"
tls_client_key = "{}"
"#,
        nginx.port(0),
        ca_file.display(),
        ccert.display(),
        ckey.display()
    );
    let d = start(&config, port, &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("one@example.com"), "200 v-one@example.com\n");
    assert_eq!(c.get("two@example.com"), "200 v-two@example.com\n");
    let b = client_ca.client("b");
    std::fs::write(&ccert, &b.cert).unwrap();
    std::fs::write(&ckey, &b.key).unwrap();
    reload(&d);
    assert_eq!(c.get("three@example.com"), "200 v-three@example.com\n");
    assert_eq!(c.get("four@example.com"), "200 v-four@example.com\n");
    let hits = nginx.hits_on(0);
    let seen: Vec<(&str, &str)> = hits
        .iter()
        .map(|h| (h.key.as_str(), h.client_dn.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("one@example.com", "CN=a"),
            ("two@example.com", "CN=a"),
            ("three@example.com", "CN=b"),
            ("four@example.com", "CN=b"),
        ]
    );
    let conns: Vec<u64> = hits.iter().map(|h| h.connection).collect();
    assert_eq!(conns[0], conns[1], "kept alive before the reload");
    assert_eq!(conns[2], conns[3], "kept alive after the reload");
    assert_ne!(conns[1], conns[2], "a new connection after the reload");
}

// ---------------------------------------------------------------------------
// 7. header_files
// ---------------------------------------------------------------------------

/// A secret header from a file: sent (trimmed) to the server, re-read at
/// reload, and never in the log (debug level, failures, a refused reload),
/// in /metrics or in `--check` output. A missing, an empty and a two-line
/// secret file are `--check` errors on the `header_files` line.
#[test]
fn header_files_sent_and_never_shown() {
    const SECRET: &str = "Bearer s3cr3t-T0KEN-one";
    const SECRET2: &str = "Bearer s3cr3t-T0KEN-two";
    let files = TempDir::new("httpmapd-tls-secrets");
    let token = files.write("token", &format!("  {SECRET}\n\n"));
    let ok = TestServer::with_map(&[("alice@example.com", "alice@mail.example")]);
    let failing = TestServer::start(|_| Reply::status(503, "down for maintenance"));
    let (port, stats, dead) = (free_port(), free_port(), free_port());
    let body = |extra: &str| {
        format!(
            r#"[daemon]
log_level = "debug"
socketmap_listen = "127.0.0.1:{port}"
stats_listen = "127.0.0.1:{stats}"

[maps.api]
servers = ["{ok}"]
header_files = {{ Authorization = "{token}" }}
ttl = "0s"
{extra}
[maps.failing]
servers = ["{failing}", "http://127.0.0.1:{dead}/x"]
header_files = {{ Authorization = "{token}" }}
"#,
            ok = ok.url("/api"),
            failing = failing.url("/f"),
            token = token.display()
        )
    };
    let d = start(&body(""), port, &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(
        show(&c.socketmap_query("api", b"alice@example.com")),
        "OK alice@mail.example"
    );
    let reply = show(&c.socketmap_query("failing", b"alice@example.com"));
    assert!(reply.starts_with("TEMP "), "{reply:?}");
    let log = d.stderr();
    assert!(log.contains("is down"), "the dead server failed:\n{log}");
    assert_eq!(failing.requests(), 1);
    let auth: Vec<Vec<u8>> = ok
        .request_log()
        .iter()
        .chain(failing.request_log().iter())
        .map(|r| r.header("Authorization").unwrap_or_default().to_vec())
        .collect();
    assert_eq!(auth, [SECRET.as_bytes(), SECRET.as_bytes()]);

    // A refused reload (an unknown key), then a reload with a new secret.
    std::fs::write(&d.config_path, body("bogus_key = 1\n")).unwrap();
    d.reload().expect_err("the reload is refused");
    assert_eq!(
        show(&c.socketmap_query("api", b"alice@example.com")),
        "OK alice@mail.example"
    );
    std::fs::write(&token, format!("{SECRET2}\n")).unwrap();
    std::fs::write(&d.config_path, body("")).unwrap();
    reload(&d);
    assert_eq!(
        show(&c.socketmap_query("api", b"alice@example.com")),
        "OK alice@mail.example"
    );
    let auth: Vec<String> = ok
        .request_log()
        .iter()
        .map(|r| show(r.header("Authorization").unwrap_or_default()))
        .collect();
    assert_eq!(auth, [SECRET, SECRET, SECRET2]);

    let metrics = metrics(stats);
    let health = stats_body(stats, "/health");
    let log = d.stderr();
    assert!(log.contains("debug: "), "debug lines are logged:\n{log}");
    for secret in ["s3cr3t", "T0KEN"] {
        assert!(!log.contains(secret), "secret in the log:\n{log}");
        assert!(!metrics.contains(secret), "secret in /metrics");
        assert!(!health.contains(secret), "secret in /health");
    }

    // --check: a valid file, an invalid one, bad secret files.
    let (code, out, err) = run_check(&d.config_path, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "");
    let bad = files.write("bad.toml", &body("bogus_key = 1\n"));
    let (code, out2, err2) = run_check(&bad, &[]);
    assert_eq!((code, out2.as_str()), (1, ""), "{err2}");
    let want = format!(
        "{}:{}: unknown field `bogus_key`",
        bad.display(),
        line_of(&body("bogus_key = 1\n"), "bogus_key")
    );
    assert!(
        err2.lines().count() == 1 && err2.starts_with(&want),
        "{err2:?} is not one line starting with {want:?}"
    );
    for o in [&out, &err, &out2, &err2] {
        assert!(!o.contains("s3cr3t") && !o.contains("T0KEN"), "{o}");
    }
    let missing = files.path("missing-token");
    let empty = files.write("empty-token", " \n\t\n");
    let twolines = files.write("twolines-token", "Bearer s3cr3t\nT0KEN\n");
    for (file, what) in [
        (&missing, format!("cannot read {}: ", missing.display())),
        (&empty, format!("{} is empty", empty.display())),
        (&twolines, "holds a line break or NUL".to_string()),
    ] {
        let cfg = format!(
            "[maps.api]\ntcp_listen = \"127.0.0.1:{port}\"\nservers = [\"{}\"]\n\
             header_files = {{ Authorization = \"{}\" }}\n",
            ok.url("/api"),
            file.display()
        );
        let path = files.write("secret.toml", &cfg);
        let (code, out, err) = run_check(&path, &[]);
        assert_eq!((code, out.as_str()), (1, ""), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        let prefix = format!("{}:4: header_files: ", path.display());
        assert!(
            lines[0].starts_with(&prefix) && lines[0].contains(&what),
            "{:?} does not start with {prefix:?} and hold {what:?}",
            lines[0]
        );
        assert!(!err.contains("s3cr3t") && !err.contains("T0KEN"), "{err}");
    }
}

// ---------------------------------------------------------------------------
// 8. --check on TLS files
// ---------------------------------------------------------------------------

/// Each bad TLS file (or pair) reported on the line of the key naming it,
/// exit 1; a missing or empty system store on the map's line.
#[test]
fn check_reports_bad_tls_files_on_their_lines() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let (ccert, ckey) = write_leaf(&pki, "client", &ca.client("a"));
    let (_, other_key) = write_leaf(&pki, "other", &ca.client("b"));
    let notpem = pki.write("notpem.pem", "this is not a certificate\n");
    let badpem = pki.write(
        "badpem.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let missing = pki.path("missing.pem");
    let empty = pki.write("empty.pem", "");
    let (ca, ccert, ckey, other_key, notpem, badpem, missing) = (
        ca_file.display().to_string(),
        ccert.display().to_string(),
        ckey.display().to_string(),
        other_key.display().to_string(),
        notpem.display().to_string(),
        badpem.display().to_string(),
        missing.display().to_string(),
    );
    let srv = "servers = [\"https://127.0.0.1:1/v\"]";
    let config = format!(
        r#"[maps.a_missing_ca]
{srv}
tls_ca_file = "{missing}"

[maps.b_notpem_ca]
{srv}
tls_ca_file = "{notpem}"

[maps.c_badpem_ca]
{srv}
tls_ca_file = "{badpem}"

[maps.d_cert_no_key]
{srv}
tls_ca_file = "{ca}"
tls_client_cert = "{ccert}"

[maps.e_key_no_cert]
{srv}
tls_ca_file = "{ca}"
tls_client_key = "{ckey}"

[maps.f_mismatch]
{srv}
tls_ca_file = "{ca}"
tls_client_cert = "{ccert}"
tls_client_key = "{other_key}"

[maps.g_missing_cert]
{srv}
tls_ca_file = "{ca}"
tls_client_cert = "{missing}"
tls_client_key = "{ckey}"

[maps.h_notpem_key]
{srv}
tls_ca_file = "{ca}"
tls_client_cert = "{ccert}"
tls_client_key = "{notpem}"

[maps.i_bad_name]
{srv}
tls_ca_file = "{ca}"
tls_server_name = "not a name!"

[maps.j_system_store]
{srv}
"#
    );
    let dir = TempDir::new("httpmapd-tls-check");
    let path = dir.write("httpmapd.toml", &config);
    let p = path.display();
    // The line of `needle` inside map `map`'s section.
    let at = |map: &str, needle: &str| -> usize {
        let start = line_of(&config, &format!("[maps.{map}]"));
        config
            .lines()
            .enumerate()
            .skip(start)
            .find(|(_, l)| l.starts_with(needle))
            .map(|(i, _)| i + 1)
            .unwrap_or_else(|| panic!("no {needle} in map {map}"))
    };
    let expected = [
        (
            at("a_missing_ca", "tls_ca_file"),
            format!("tls_ca_file: cannot read {missing}: "),
        ),
        (
            at("b_notpem_ca", "tls_ca_file"),
            format!("tls_ca_file: {notpem}: "),
        ),
        (
            at("c_badpem_ca", "tls_ca_file"),
            format!("tls_ca_file: {badpem}: "),
        ),
        (
            at("d_cert_no_key", "tls_client_cert"),
            "tls_client_cert: tls_client_cert needs tls_client_key".into(),
        ),
        (
            at("e_key_no_cert", "tls_client_key"),
            "tls_client_key: tls_client_key needs tls_client_cert".into(),
        ),
        (
            at("f_mismatch", "tls_client_key"),
            format!("tls_client_key: {ccert} and {other_key} do not make a client identity: "),
        ),
        (
            at("g_missing_cert", "tls_client_cert"),
            format!("tls_client_cert: cannot read {missing}: "),
        ),
        (
            at("h_notpem_key", "tls_client_key"),
            format!("tls_client_key: {notpem}: "),
        ),
        (
            at("i_bad_name", "tls_server_name"),
            "tls_server_name: \"not a name!\" is not a host name or IP address".into(),
        ),
        (
            line_of(&config, "[maps.j_system_store]"),
            format!("maps.j_system_store: the system trust store: cannot read {missing}: "),
        ),
    ];
    let (code, out, err) = run_check(&path, &[("SSL_CERT_FILE", Path::new(&missing))]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    for (line, msg) in &expected {
        let want = format!("{p}:{line}: {msg}");
        assert!(
            lines.iter().any(|l| l.starts_with(&want)),
            "no line starting with {want:?} in:\n{err}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "one line per problem:\n{err}");

    // An empty system store, reported on the map's line too.
    let (code, _, err) = run_check(&path, &[("SSL_CERT_FILE", &empty)]);
    assert_eq!(code, 1);
    let want = format!(
        "{p}:{}: maps.j_system_store: the system trust store: {}: no usable CA certificate in it",
        line_of(&config, "[maps.j_system_store]"),
        empty.display()
    );
    assert!(err.lines().any(|l| l == want), "no {want:?} in:\n{err}");

    // Good files pass: a client identity, a server name, the system store.
    let fixed = format!(
        "[daemon]\nsocketmap_listen = \"127.0.0.1:1\"\n\n[maps.a]\n{srv}\ntls_ca_file = \"{ca}\"\ntls_client_cert = \"{ccert}\"\n\
         tls_client_key = \"{ckey}\"\ntls_server_name = \"dir.example.test\"\n\n[maps.b]\n{srv}\n"
    );
    let fixed_path = dir.write("fixed.toml", &fixed);
    let (code, out, err) = run_check(&fixed_path, &[("SSL_CERT_FILE", Path::new(&ca))]);
    assert_eq!((code, err.as_str()), (0, ""), "{fixed}");
    assert_eq!(out, format!("{}: ok (2 map(s))\n", fixed_path.display()));
}

// ---------------------------------------------------------------------------
// 9. Host names whose addresses change
// ---------------------------------------------------------------------------

/// Fails the test unless this process may run the daemon in a private
/// mount namespace with `hosts` bind-mounted over /etc/hosts: these tests
/// move a host name under the daemon by rewriting that file, and cannot
/// test anything without it (so not being permitted is a failure, not a
/// pass).
fn require_namespaces(hosts: &Path) {
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!("mount --bind {} /etc/hosts", hosts.display()))
        .stdin(Stdio::null())
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return,
        Ok(o) => format!("{}: {}", o.status, show(&o.stderr).trim_end()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => common::missing(
            "unshare",
            "the Debian package util-linux (apt-get install util-linux)",
        ),
        Err(e) => format!("cannot run unshare: {e}"),
    };
    panic!(
        "\n{}: FAILED: this test runs the daemon in a private mount namespace \
         (`unshare -m`, then `mount --bind` over /etc/hosts), which is not permitted here: \
         {why}. Run the tests as root (with CAP_SYS_ADMIN; in a container, one allowed to mount).\n",
        common::test_name()
    );
}

/// Rewrites `path` in place (same inode: the bind mount keeps showing it).
fn rewrite_in_place(path: &Path, content: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

/// The daemon in its own mount namespace, with `hosts` over /etc/hosts.
fn start_in_namespace(config: &str, ready_port: u16, hosts: &Path) -> Daemon {
    start_with(config, ready_port, |path| {
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c"]).arg(format!(
            "mount --bind '{}' /etc/hosts && exec '{BIN}' -c '{}'",
            hosts.display(),
            path.display()
        ));
        c
    })
}

/// Two TestServers on one port, at 127.0.0.2 answering "a" and at
/// 127.0.0.3 answering "b" (`close`: closing every connection after its
/// reply); and that port.
fn servers_a_b(close: bool) -> (TestServer, TestServer, u16) {
    let on = |ip: &str, port: u16, value: &'static str| {
        TestServer::start_on(&format!("{ip}:{port}"), move |_| {
            let r = Reply::found(value.as_bytes());
            if close {
                r.closing()
            } else {
                r
            }
        })
        .ok()
    };
    (0..20)
        .find_map(|_| {
            let p = free_port_on("127.0.0.2");
            Some((on("127.0.0.2", p, "a")?, on("127.0.0.3", p, "b")?, p))
        })
        .expect("a port free on 127.0.0.2 and 127.0.0.3")
}

/// The daemon in a namespace where backend.test is 127.0.0.2, with map
/// `moving` on it (`resolve_interval = "1s"`, no caching): the daemon, the
/// hosts file, the URL and the tcp_table port.
fn moving_daemon(dir: &TempDir, sport: u16) -> (Daemon, PathBuf, String, u16) {
    let hosts = dir.path("hosts");
    let port = free_port();
    let url = format!("http://backend.test:{sport}/v");
    let config = format!(
        r#"[maps.moving]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
resolve_interval = "1s"
ttl = "0s"
"#
    );
    (start_in_namespace(&config, port, &hosts), hosts, url, port)
}

/// Looks up distinct keys until one is answered `want` (at most `within`):
/// the time it took, or None.
fn until_answer(c: &mut LineClient, want: &str, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut n = 0;
    wait_until(within, || {
        n += 1;
        let r = c.get(&format!("s{n}@example.com"));
        assert!(r == "200 a\n" || r == "200 b\n", "{r:?}");
        thread::sleep(Duration::from_millis(50));
        r == want
    })
    .then(|| t0.elapsed())
}

/// `backend.test` resolves to 127.0.0.2 (answering "a", keeping its
/// connections alive), then the hosts file moves it to 127.0.0.3 ("b"):
/// within a few seconds the resolver logs the change and lookups are
/// answered by the new address, not by the connection kept to the old one.
#[test]
fn a_host_name_that_moves_is_followed() {
    let dir = TempDir::new("httpmapd-tls-hosts");
    let hosts = dir.write("hosts", "127.0.0.1 localhost\n127.0.0.2 backend.test\n");
    require_namespaces(&hosts);
    let (a, b, sport) = servers_a_b(false);
    let (d, hosts, url, port) = moving_daemon(&dir, sport);
    let mut c = LineClient::connect(port);
    for i in 0..3 {
        assert_eq!(c.get(&format!("k{i}@example.com")), "200 a\n");
    }
    rewrite_in_place(&hosts, "127.0.0.1 localhost\n127.0.0.3 backend.test\n");
    let want = format!(
        "httpmapd: info: server {url} (map moving): backend.test now resolves to 127.0.0.3"
    );
    let log = d.wait_log(&want, WAIT);
    assert_eq!(
        log_lines(&log, "now resolves to"),
        std::slice::from_ref(&want),
        "{log}"
    );
    let switched = until_answer(&mut c, "200 b\n", Duration::from_secs(5));
    assert!(
        switched.is_some(),
        "still answered by 127.0.0.2 (its pooled connection) 5 s after the daemon \
         logged {want:?}: 127.0.0.2 served {}, 127.0.0.3 served {}",
        a.requests(),
        b.requests()
    );
    let before = a.requests();
    for i in 0..5 {
        assert_eq!(c.get(&format!("b{i}@example.com")), "200 b\n");
    }
    assert_eq!(a.requests(), before, "nothing more to the old address");
}

/// As above with servers closing every connection (so each lookup
/// connects anew): lookups follow the name within a few seconds; a name
/// that stops resolving keeps its last address (one warning line, however
/// long it lasts) and the name resolving again is one info line.
#[test]
fn new_connections_follow_a_moved_name_a_failed_resolution_keeps_it() {
    let dir = TempDir::new("httpmapd-tls-hosts");
    let hosts = dir.write("hosts", "127.0.0.1 localhost\n127.0.0.2 backend.test\n");
    require_namespaces(&hosts);
    let (a, b, sport) = servers_a_b(true);
    let (d, hosts, url, port) = moving_daemon(&dir, sport);
    let mut c = LineClient::connect(port);
    for i in 0..3 {
        assert_eq!(c.get(&format!("k{i}@example.com")), "200 a\n");
    }
    rewrite_in_place(&hosts, "127.0.0.1 localhost\n127.0.0.3 backend.test\n");
    let took = until_answer(&mut c, "200 b\n", Duration::from_secs(5));
    let log = d.stderr();
    let took = took.unwrap_or_else(|| panic!("lookups did not move to 127.0.0.3:\n{log}"));
    eprintln!("moved to 127.0.0.3 after {took:?}");
    let want = format!(
        "httpmapd: info: server {url} (map moving): backend.test now resolves to 127.0.0.3"
    );
    assert_eq!(log_lines(&log, "now resolves to"), [want], "{log}");
    let before = a.requests();
    for i in 0..5 {
        assert_eq!(c.get(&format!("b{i}@example.com")), "200 b\n");
    }
    assert_eq!(a.requests(), before, "nothing more to the old address");

    // The name stops resolving: the last address is kept, one warning.
    rewrite_in_place(&hosts, "127.0.0.1 localhost\n");
    let keeping = format!("server {url} (map moving): ");
    let log = d.wait_log("keeping its last addresses", WAIT);
    let warned = log_lines(&log, "keeping its last addresses");
    assert!(
        warned[0].starts_with(&format!("httpmapd: warning: {keeping}")),
        "{warned:?}"
    );
    let b_before = b.requests();
    for i in 0..3 {
        assert_eq!(c.get(&format!("c{i}@example.com")), "200 b\n");
    }
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.get("c9@example.com"), "200 b\n");
    assert_eq!(b.requests(), b_before + 4);
    assert_eq!(
        log_lines(&d.stderr(), "keeping its last addresses").len(),
        1,
        "logged once"
    );
    // It resolves again (to the same address): one info line.
    rewrite_in_place(&hosts, "127.0.0.1 localhost\n127.0.0.3 backend.test\n");
    let again = format!("httpmapd: info: server {url} (map moving): backend.test resolves again");
    let log = d.wait_log(&again, WAIT);
    assert_eq!(log_lines(&log, "resolves again"), [again]);
    assert_eq!(log_lines(&log, "now resolves to").len(), 1, "{log}");
}

/// `multi.test` has two addresses, 127.0.0.2 (nginx with TLS, a
/// certificate for the name) and 127.0.0.4 (nothing listens): every lookup
/// succeeds, the dead address is tried once and rests, and TLS verifies the
/// name whatever address it connects to.
#[test]
fn every_address_of_a_name_is_used_a_dead_one_rests() {
    let dir = TempDir::new("httpmapd-tls-hosts");
    let hosts = dir.write("hosts", "127.0.0.1 localhost\n");
    require_namespaces(&hosts);
    let ca = Ca::new("Test CA");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let cert = write_leaf(&dir, "server", &ca.server(&["multi.test"]));
    let nginx = TlsNginx::start(
        &[Site::tls(&cert)
            .on("127.0.0.2")
            .with("keepalive_requests 1;")],
        &[],
    );
    let sport = nginx.port(0);
    rewrite_in_place(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.2 multi.test\n127.0.0.4 multi.test\n",
    );
    let port = free_port();
    let url = format!("https://multi.test:{sport}/echo");
    let config = format!(
        r#"[daemon]
log_level = "debug"

[maps.multi]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
tls_ca_file = "{}"
ttl = "0s"
"#,
        ca_file.display()
    );
    let d = start_in_namespace(&config, port, &hosts);
    let mut c = LineClient::connect(port);
    for i in 0..10 {
        let key = format!("k{i}@example.com");
        assert_eq!(c.get(&key), format!("200 v-{key}\n"));
    }
    let hits = nginx.hits_on(0);
    assert_eq!(hits.len(), 10);
    assert_eq!(connections(&hits).len(), 10, "keepalive_requests 1");
    let log = d.stderr();
    let tried = log_lines(&log, &format!("127.0.0.4:{sport}: connect: "));
    assert_eq!(
        tried.len(),
        1,
        "the dead address tried once, then rests:\n{log}"
    );
    assert!(tried[0].contains("trying its next address"), "{}", tried[0]);
    assert!(!log.contains("is down"), "{log}");
}

// ---------------------------------------------------------------------------
// A stray reply already decrypted: in rustls' buffer, not on the socket
// ---------------------------------------------------------------------------

/// The stray reply: a valid dict_http answer nobody asked for.
const STRAY: &[u8] =
    b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: evil@x\r\nContent-Length: 0\r\n\r\n";

/// The daemon's read size (`READ_CHUNK_BYTES`) and the largest TLS record.
const RECORD: usize = 16 * 1024;

/// A dict_http server over TLS (rustls, a thread per connection) answering
/// `v-KEY`, with no key echo. The reply to `a@x` is padded to exactly
/// [`RECORD`] bytes (one full TLS record, and one whole read of the
/// daemon's) and followed by [`STRAY`] in the same write to the socket: the
/// daemon's last read of the reply decrypts the stray record too, so the
/// stray reply waits in rustls' buffer while the socket is empty.
struct StrayTlsServer {
    acceptor: Acceptor,
    requests: Arc<AtomicUsize>,
}

impl StrayTlsServer {
    fn start(leaf: &Leaf) -> StrayTlsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        );
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        let acceptor = Acceptor::start(move |sock, _| {
            let _ = serve_stray_tls(sock, config.clone(), &r);
        });
        StrayTlsServer { acceptor, requests }
    }
}

/// A `200` reply with `POSTFIX-DICT-RESULTS: value` and a body of `pad` bytes.
fn padded_reply(value: &str, pad: usize) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: {value}\r\nContent-Length: {pad}\r\n\r\n"
    )
    .into_bytes();
    out.resize(out.len() + pad, b'.');
    out
}

/// One connection of [`StrayTlsServer`].
fn serve_stray_tls(
    mut sock: TcpStream,
    config: Arc<rustls::ServerConfig>,
    requests: &AtomicUsize,
) -> std::io::Result<()> {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    let mut conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = rustls::Stream::new(&mut conn, &mut sock).read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        requests.fetch_add(1, Ordering::SeqCst);
        let key = show(&head)
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("POSTFIX-DICT-EMAIL")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let value = format!("v-{key}");
        let mut out = padded_reply(&value, 0);
        if key == "a@x" {
            // Padded to RECORD bytes (the length's own digits included).
            let mut pad = RECORD - out.len();
            while padded_reply(&value, pad).len() > RECORD {
                pad -= 1;
            }
            out = padded_reply(&value, pad);
            assert_eq!(out.len(), RECORD, "the reply fills one record exactly");
            out.extend_from_slice(STRAY);
        }
        conn.writer().write_all(&out)?;
        // Every record in one write: they reach the daemon together.
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire)?;
        }
        sock.write_all(&wire)?;
    }
}

/// A reply that ends exactly where the daemon's read ends, with a stray
/// reply behind it that came in the same TLS read: the stray reply is
/// already decrypted, held in rustls' buffer, and the socket is empty. The
/// pooled connection must not be reused (a socket peek cannot see the
/// stray reply): the next key gets its own value on a new connection, and
/// the stray reply counts as one `stray_bytes` protocol error.
#[test]
fn a_stray_reply_decrypted_with_the_last_one_is_not_taken_for_the_next_key() {
    let pki = TempDir::new("httpmapd-tls-pki");
    let ca = Ca::new("Test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let server = StrayTlsServer::start(&ca.server(&["127.0.0.1"]));
    let (port, stats) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{}/m", server.acceptor.port());
    let config = format!(
        r#"[daemon]
workers = 1
stats_listen = "127.0.0.1:{stats}"

[maps.m]
tcp_listen = "127.0.0.1:{port}"
servers = ["{url}"]
tls_ca_file = "{}"
max_connections = 1
ttl = "0s"
negative_ttl = "0s"
"#,
        ca_file.display()
    );
    let d = start(&config, port, &[]);
    let mut c = LineClient::connect(port);
    assert_eq!(c.get("a@x"), "200 v-a@x\n");
    assert_eq!(
        c.get("b@x"),
        "200 v-b@x\n",
        "b@x got b's value, not the stray reply; log:\n{}",
        d.stderr()
    );
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    assert_eq!(
        server.acceptor.accepted(),
        2,
        "b@x went on a new connection"
    );
    let m = metrics(stats);
    assert_eq!(
        metric(
            &m,
            &format!(
                "httpmapd_server_protocol_errors_total{}",
                labels("m", &url, "kind=\"stray_bytes\"")
            )
        ),
        1.0,
        "the stray reply is one protocol error"
    );
    let log = d.stderr();
    assert_eq!(
        log_lines(&log, "unexpected byte").len(),
        1,
        "one \"unexpected byte\" warning:\n{log}"
    );
}
