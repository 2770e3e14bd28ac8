//! Issue 13, a relay fleet: several daemons sharing one Redis as a
//! second-level cache (`[shared_cache]`), purge that reaches every node, and
//! the admin socket (`purge`, `show`, `dump`). Everything runs the real
//! binary against a real `redis-server` (Debian's, started here on a private
//! free port with a password, no persistence, a private directory, killed on
//! drop) and counting test HTTP servers, with exact counts:
//!
//! - a key fetched by one node is served by the others with no further
//!   server request (one key, then 100), and the way it is stored in Redis
//!   (key names, value bytes, `PX`);
//! - purge on one node reaches every node within 1 s;
//! - Redis killed mid-load, restarted empty, stalled (SIGSTOP), replaced by
//!   something that is not Redis: no lost, wrong or temporary answer, one
//!   log line per change of state, sharing resumes;
//! - the password in no log, `--check` output, error or metric;
//! - Redis commands per lookup (`INFO commandstats`) and the cold-key
//!   fan-out (claims);
//! - the admin commands through the real socket, its permissions included;
//! - stale answers from Redis during an outage, on a node that never saw
//!   the key.
//!
//! Without `redis-server` (the Debian package redis-server) a test fails,
//! saying so; so does the admin-socket test when it cannot run a command as
//! another user (it needs root and setpriv or runuser).

mod common;

use common::pki::{write_leaf, Ca, TempDir};
use common::{
    count_lines, free_port, log_lines, metric, metrics, output_within, show, stats_get,
    unique_temp_dir, wait_until, Acceptor, Daemon, LineClient, Reply, TestServer,
};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------
// Helpers: a private redis-server and a small RESP client
// ---------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_httpmapd");

/// Redis's password in every test; it must never show anywhere.
const PASSWORD: &str = "pw-Zq81-Topsecret";

/// Bound on polls (generous for a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(5);

/// Where `redis-server` is; fails the test when it is not installed.
fn redis_server_path() -> PathBuf {
    common::find_program("redis-server", &["$PATH", "/usr/bin", "/usr/sbin"]).unwrap_or_else(|| {
        common::missing(
            "redis-server",
            "the Debian package redis-server (apt-get install redis-server)",
        )
    })
}

/// A private `redis-server`: 127.0.0.1 on a free port (and a Unix socket in
/// its directory), `--requirepass` (unless started without), no RDB, no
/// AOF; optionally a TLS port beside the plain one ([`RedisTls`]). Killed
/// (SIGKILL) on drop; its log is printed if the test panics.
struct Redis {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    password: Option<&'static str>,
    tls: Option<RedisTls>,
}

/// redis-server's TLS listener: `--tls-port` (on 127.0.0.1, beside the
/// plain port the tests' own [`RespConn`] keeps using), its certificate and
/// key, the CA client certificates must come from, and
/// `--tls-auth-clients` (`optional`: a client certificate is checked when
/// one is sent; `yes`: one is required).
#[derive(Clone)]
struct RedisTls {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    auth_clients: &'static str,
}

impl Redis {
    /// With [`PASSWORD`]. Fails the test when redis-server is not
    /// installed.
    fn start() -> Redis {
        Redis::start_with(Some(PASSWORD))
    }

    fn start_with(password: Option<&'static str>) -> Redis {
        Redis::start_opts(password, None)
    }

    /// With [`PASSWORD`] and a TLS port: the server certificate of `pki`
    /// (for 127.0.0.1, from its CA), client certificates checked against
    /// its CA, `--tls-auth-clients auth_clients`. `pki` must outlive it.
    fn start_tls(pki: &RedisPki, auth_clients: &'static str) -> Redis {
        Redis::start_opts(
            Some(PASSWORD),
            Some(RedisTls {
                port: 0,
                cert: pki.server.0.clone(),
                key: pki.server.1.clone(),
                ca: pki.ca_file.clone(),
                auth_clients,
            }),
        )
    }

    fn start_opts(password: Option<&'static str>, tls: Option<RedisTls>) -> Redis {
        let bin = redis_server_path();
        let dir = unique_temp_dir("httpmapd-redis");
        let mut r = Redis {
            bin,
            child: None,
            port: 0,
            dir,
            password,
            tls,
        };
        // A free port can be taken before redis-server binds it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            r.port = free_port();
            if let Some(t) = r.tls.as_mut() {
                t.port = loop {
                    let p = free_port();
                    if p != r.port {
                        break p;
                    }
                };
            }
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// Starts redis-server on `self.port`; waits until it answers PING.
    fn spawn(&mut self) -> Result<(), String> {
        let log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("redis.log"))
                .expect("open redis.log")
        };
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"]);
        if let Some(p) = self.password {
            cmd.args(["--requirepass", p]);
        }
        if let Some(t) = &self.tls {
            cmd.args(["--tls-port", &t.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args(["--tls-auth-clients", t.auth_clients]);
        }
        cmd.args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .arg("--unixsocket")
            .arg(self.socket_path())
            .args(["--unixsocketperm", "700", "--daemonize", "no"])
            .args(["--logfile", ""])
            .stdin(Stdio::null())
            .stdout(log())
            .stderr(log());
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("redis-server exited ({st}):\n{}", self.log()));
            }
            if let Ok(mut c) = self.try_conn() {
                if c.cmd(&[b"PING"]).ok() == Some(Resp::Simple("PONG".into())) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("redis-server not ready:\n{}", self.log()));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT`
    fn url(&self) -> String {
        match self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Exactly `n` daemon connections (`CLIENT LIST` through `c`, on the
    /// plain port), every one of them on the TLS port.
    fn assert_daemon_clients_on_tls(&self, c: &mut RespConn, n: usize, what: &str) {
        let clients = c.daemon_clients();
        assert_eq!(clients.len(), n, "{what}: {clients:?}");
        assert!(
            clients.iter().all(|(_, port)| *port == self.tls_port()),
            "every daemon connection on the TLS port {}: {clients:?}",
            self.tls_port()
        );
    }

    /// How the daemon names it in logs and errors.
    fn described(&self) -> String {
        format!("redis://:***@127.0.0.1:{}/0", self.port)
    }

    /// The TLS port (panics without one).
    fn tls_port(&self) -> u16 {
        self.tls.as_ref().expect("redis-server with TLS").port
    }

    /// `rediss://:PASSWORD@127.0.0.1:TLSPORT`
    fn tls_url(&self) -> String {
        format!(
            "rediss://:{}@127.0.0.1:{}",
            self.password.expect("a password"),
            self.tls_port()
        )
    }

    /// How the daemon names the TLS URL in logs and errors (the scheme is
    /// not said).
    fn tls_described(&self) -> String {
        format!("redis://:***@127.0.0.1:{}/0", self.tls_port())
    }

    fn try_conn(&self) -> io::Result<RespConn> {
        RespConn::connect(self.port, self.password)
    }

    /// A client for checks (authenticated).
    fn conn(&self) -> RespConn {
        self.try_conn().expect("connect to redis-server")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server running").id()
    }

    /// SIGKILL, and wait for it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again, empty, on the same port.
    fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("redis-server restart: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill redis-server with {sig}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- redis-server log ----\n{}---- end ----", self.log());
        }
        // A test that stopped it (SIGSTOP) may have panicked before SIGCONT.
        if let Some(c) = &self.child {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Resp>),
}

/// A blocking RESP2 client for the tests' own checks.
struct RespConn {
    r: BufReader<TcpStream>,
}

impl RespConn {
    fn connect(port: u16, password: Option<&str>) -> io::Result<RespConn> {
        let s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut c = RespConn {
            r: BufReader::new(s),
        };
        if let Some(p) = password {
            match c.cmd(&[b"AUTH", p.as_bytes()])? {
                Resp::Simple(ok) if ok == "OK" => {}
                other => return Err(io::Error::other(format!("AUTH: {other:?}"))),
            }
        }
        Ok(c)
    }

    fn cmd(&mut self, args: &[&[u8]]) -> io::Result<Resp> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.r.get_mut().write_all(&out)?;
        self.read()
    }

    fn read(&mut self) -> io::Result<Resp> {
        let mut line = Vec::new();
        self.r.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(io::Error::other(format!("cut short: {line:?}")));
        }
        line.truncate(line.len() - 2);
        let text = String::from_utf8_lossy(&line[1..]).into_owned();
        let n = || -> io::Result<i64> { text.parse().map_err(io::Error::other) };
        Ok(match line.first() {
            Some(b'+') => Resp::Simple(text),
            Some(b'-') => Resp::Error(text),
            Some(b':') => Resp::Int(n()?),
            Some(b'$') if n()? < 0 => Resp::Nil,
            Some(b'$') => {
                let mut b = vec![0; n()? as usize + 2];
                self.r.read_exact(&mut b)?;
                b.truncate(b.len() - 2);
                Resp::Bulk(b)
            }
            Some(b'*') if n()? < 0 => Resp::Nil,
            Some(b'*') => {
                let mut v = Vec::new();
                for _ in 0..n()? {
                    v.push(self.read()?);
                }
                Resp::Array(v)
            }
            _ => return Err(io::Error::other(format!("not RESP2: {line:?}"))),
        })
    }

    fn ok(&mut self, args: &[&[u8]]) {
        let r = self.cmd(args).expect("redis command");
        assert_eq!(r, Resp::Simple("OK".into()), "{:?}", show_args(args));
    }

    /// `GET`: the value, or None.
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        match self.cmd(&[b"GET", key]).expect("GET") {
            Resp::Bulk(b) => Some(b),
            Resp::Nil => None,
            other => panic!("GET {:?}: {other:?}", show(key)),
        }
    }

    fn pttl(&mut self, key: &[u8]) -> i64 {
        match self.cmd(&[b"PTTL", key]).expect("PTTL") {
            Resp::Int(n) => n,
            other => panic!("PTTL: {other:?}"),
        }
    }

    /// `KEYS pattern`, sorted, as text.
    fn keys(&mut self, pattern: &str) -> Vec<String> {
        let Resp::Array(items) = self.cmd(&[b"KEYS", pattern.as_bytes()]).expect("KEYS") else {
            panic!("KEYS: not an array");
        };
        let mut v: Vec<String> = items
            .into_iter()
            .map(|i| match i {
                Resp::Bulk(b) => show(&b),
                other => panic!("KEYS item {other:?}"),
            })
            .collect();
        v.sort();
        v
    }

    /// `INFO commandstats` as command → calls (without this client's own
    /// `info`, `config|resetstat` and `auth`).
    fn commandstats(&mut self) -> BTreeMap<String, u64> {
        let Resp::Bulk(text) = self.cmd(&[b"INFO", b"commandstats"]).expect("INFO") else {
            panic!("INFO: not a bulk string");
        };
        let mut m = BTreeMap::new();
        for line in show(&text).lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if matches!(name, "info" | "config|resetstat" | "auth") {
                continue;
            }
            let calls = rest
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no calls= in {line:?}"));
            m.insert(name.to_string(), calls);
        }
        m
    }

    fn reset_stats(&mut self) {
        self.ok(&[b"CONFIG", b"RESETSTAT"]);
    }

    /// The daemons' connections (`CLIENT LIST`, clients named
    /// `httpmapd-...`) as (name, the port they reached: `laddr`), sorted.
    fn daemon_clients(&mut self) -> Vec<(String, u16)> {
        let Resp::Bulk(text) = self.cmd(&[b"CLIENT", b"LIST"]).expect("CLIENT LIST") else {
            panic!("CLIENT LIST: not a bulk string");
        };
        let mut v: Vec<(String, u16)> = show(&text)
            .lines()
            .filter_map(|line| {
                let field = |name: &str| {
                    line.split(' ')
                        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
                };
                let name = field("name");
                let port = field("laddr").rsplit(':').next().unwrap().parse().unwrap();
                name.starts_with("httpmapd-")
                    .then(|| (name.to_string(), port))
            })
            .collect();
        v.sort();
        v
    }
}

/// A test PKI for a Redis with TLS, as files in a directory of its own: a
/// CA, Redis's server certificate for 127.0.0.1 and a client certificate
/// (both from the CA), and another CA that signed neither.
struct RedisPki {
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    /// (certificate, key)
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    _dir: TempDir,
}

impl RedisPki {
    fn new() -> RedisPki {
        let dir = TempDir::new("httpmapd-redis-pki");
        let ca = Ca::new("Redis test CA");
        let other = Ca::new("Another test CA");
        RedisPki {
            ca_file: dir.write("ca.pem", &ca.pem),
            other_ca_file: dir.write("other-ca.pem", &other.pem),
            server: write_leaf(&dir, "redis", &ca.server(&["127.0.0.1"])),
            client: write_leaf(&dir, "client", &ca.client("httpmapd-node")),
            _dir: dir,
        }
    }

    /// The `[shared_cache]` line trusting the CA.
    fn trust(&self) -> String {
        setting("tls_ca_file", &self.ca_file)
    }

    /// The `[shared_cache]` lines of the client certificate and key.
    fn identity(&self) -> [String; 2] {
        [
            setting("tls_client_cert", &self.client.0),
            setting("tls_client_key", &self.client.1),
        ]
    }
}

/// `name = "PATH"`, a configuration line.
fn setting(name: &str, path: &Path) -> String {
    format!("{name} = {:?}", path.display().to_string())
}

fn show_args(args: &[&[u8]]) -> Vec<String> {
    args.iter().map(|a| show(a)).collect()
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The Redis key of `key` in `map` under the default prefix.
fn vkey(map: &str, key: &str) -> Vec<u8> {
    format!("httpmapd:v:{map}:{key}").into_bytes()
}

/// Waits until Redis holds `n` keys matching `pattern`: a value is written
/// to Redis at the end of the event-loop turn that answered the client, so
/// a test that asks another node right after an answer waits for it.
fn wait_keys(c: &mut RespConn, pattern: &str, n: usize) {
    let mut last = Vec::new();
    let ok = wait_until(WAIT, || {
        last = c.keys(pattern);
        last.len() == n
    });
    assert!(ok, "{} keys {pattern}, not {n}: {last:?}", last.len());
}

/// The stored form of a result, as the daemon writes it: version 2, found
/// flag, fresh-until Unix ms and the map's configuration fingerprint
/// (big-endian, see [`Node::fingerprint`]), the value.
fn encode_value(value: Option<&[u8]>, fresh_until_ms: u64, fingerprint: u64) -> Vec<u8> {
    let mut out = vec![2, u8::from(value.is_some())];
    out.extend_from_slice(&fresh_until_ms.to_be_bytes());
    out.extend_from_slice(&fingerprint.to_be_bytes());
    out.extend_from_slice(value.unwrap_or_default());
    out
}

/// The counts of a map (command → calls) as `{"get": 1, ...}`.
fn stats_of(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------------
// Helpers: the HTTP server behind the maps
// ---------------------------------------------------------------------------

/// A counting dict_http server: key `nobody...` is not found, any other key
/// is found as `v{VERSION}-{key}` (VERSION starts at 1), optionally after a
/// delay.
struct Backend {
    server: TestServer,
    version: Arc<AtomicUsize>,
}

impl Backend {
    fn start(delay: Duration) -> Backend {
        let version = Arc::new(AtomicUsize::new(1));
        let v = version.clone();
        let server = TestServer::start(move |req| {
            let key = req.key_str();
            let reply = if key.starts_with("nobody") {
                Reply::not_found()
            } else {
                Reply::found(format!("v{}-{key}", v.load(Ordering::SeqCst)).as_bytes())
            };
            if delay.is_zero() {
                reply
            } else {
                reply.delayed(delay)
            }
        });
        Backend { server, version }
    }

    fn set_version(&self, v: usize) {
        self.version.store(v, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.server.requests()
    }

    fn url(&self) -> String {
        self.server.url("/")
    }
}

/// The tcp_table reply for `key` (lower case) from a [`Backend`] at `version`.
fn want(key: &str, version: usize) -> String {
    if key.starts_with("nobody") {
        "500 not found\n".to_string()
    } else {
        format!("200 v{version}-{}\n", encode_key(key))
    }
}

/// `%XX` quoting as the daemon writes tcp_table values and dump fields.
fn encode_key(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b == b'%' || !(0x21..=0x7e).contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// `n` keys, every tenth one not found.
fn key_set(tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 10 == 9 {
                format!("nobody{i:03}-{tag}@example.com")
            } else {
                format!("user{i:03}-{tag}@example.com")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Helpers: nodes (daemons) and their configuration
// ---------------------------------------------------------------------------

/// A node's configuration, before ports are chosen.
#[derive(Clone)]
struct Cfg {
    workers: usize,
    daemon: Vec<String>,
    /// The `[shared_cache]` section's lines; `None`: no section.
    shared: Option<Vec<String>>,
    cache: Vec<String>,
    /// (name, server URL, extra lines); each map gets a tcp_listen.
    maps: Vec<(String, String, Vec<String>)>,
}

impl Cfg {
    /// Two workers, one map `virtual` on `server`, and with `redis` a
    /// `[shared_cache]` on it (`timeout = "1s"`: counts must not depend on
    /// how busy the test machine is).
    fn new(redis: Option<&str>, server: &str) -> Cfg {
        Cfg {
            workers: 2,
            daemon: Vec::new(),
            shared: redis.map(|u| vec![format!("url = {u:?}"), "timeout = \"1s\"".into()]),
            cache: Vec::new(),
            maps: vec![("virtual".into(), server.into(), Vec::new())],
        }
    }

    /// Adds (or replaces) a `[shared_cache]` line.
    fn shared(mut self, line: &str) -> Cfg {
        let lines = self.shared.as_mut().expect("a [shared_cache]");
        let key = line.split('=').next().unwrap().trim();
        lines.retain(|l| l.split('=').next().unwrap().trim() != key);
        lines.push(line.into());
        self
    }

    fn cache(mut self, line: &str) -> Cfg {
        self.cache.push(line.into());
        self
    }

    fn daemon(mut self, line: &str) -> Cfg {
        self.daemon.push(line.into());
        self
    }

    fn map(mut self, name: &str, server: &str, extra: &[&str]) -> Cfg {
        self.maps.push((
            name.into(),
            server.into(),
            extra.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }
}

/// One daemon of the fleet: a tcp_table listener per map, `stats_listen`
/// and an admin socket in a directory of its own.
struct Node {
    daemon: Daemon,
    tcp: Vec<(String, u16)>,
    stats: u16,
    admin: PathBuf,
    admin_dir: PathBuf,
    workers: usize,
}

impl Node {
    fn start(cfg: &Cfg) -> Node {
        let admin_dir = unique_temp_dir("httpmapd-admin");
        let admin = admin_dir.join("admin.sock");
        let stats = free_port();
        let mut text = format!(
            "[daemon]\nworkers = {}\nlog_level = \"info\"\nstats_listen = \"127.0.0.1:{stats}\"\nadmin_socket = {:?}\n",
            cfg.workers,
            admin.display().to_string()
        );
        for l in &cfg.daemon {
            text.push_str(&format!("{l}\n"));
        }
        if let Some(lines) = &cfg.shared {
            text.push_str("\n[shared_cache]\n");
            for l in lines {
                text.push_str(&format!("{l}\n"));
            }
        }
        if !cfg.cache.is_empty() {
            text.push_str("\n[cache]\n");
            for l in &cfg.cache {
                text.push_str(&format!("{l}\n"));
            }
        }
        let mut tcp = Vec::new();
        for (name, url, extra) in &cfg.maps {
            let port = free_port();
            text.push_str(&format!(
                "\n[maps.{name}]\ntcp_listen = \"127.0.0.1:{port}\"\nservers = [{url:?}]\n"
            ));
            for l in extra {
                text.push_str(&format!("{l}\n"));
            }
            tcp.push((name.clone(), port));
        }
        let daemon = Daemon::start(&text, tcp[0].1);
        Node {
            daemon,
            tcp,
            stats,
            admin,
            admin_dir,
            workers: cfg.workers,
        }
    }

    fn port(&self, map: &str) -> u16 {
        self.tcp
            .iter()
            .find(|(n, _)| n == map)
            .unwrap_or_else(|| panic!("no map {map}"))
            .1
    }

    /// One lookup in `virtual` on a new connection (so lookups spread over
    /// the workers): the reply line.
    fn get(&self, key: &str) -> String {
        self.get_in("virtual", key)
    }

    fn get_in(&self, map: &str, key: &str) -> String {
        LineClient::connect(self.port(map)).get(&encode_key(key))
    }

    fn client(&self) -> LineClient {
        LineClient::connect(self.port("virtual"))
    }

    fn metrics(&self) -> String {
        metrics(self.stats)
    }

    /// One series of /metrics (panics if absent).
    fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics(), series)
    }

    /// Waits until every worker is connected to the shared cache.
    fn wait_connected(&self) {
        self.wait_connections(self.workers, Duration::from_secs(15));
    }

    /// Waits up to `within` until `n` workers are connected to the shared
    /// cache (`httpmapd_shared_cache_connections`).
    fn wait_connections(&self, n: usize, within: Duration) {
        let want = n as f64;
        let mut last = -1.0;
        let ok = wait_until(within, || {
            last = self.metric("httpmapd_shared_cache_connections");
            last == want
        });
        assert!(
            ok,
            "{last} workers, not {want}, connected to the shared cache; log:\n{}",
            self.log()
        );
    }

    fn config(&self) -> &Path {
        &self.daemon.config_path
    }

    fn config_str(&self) -> &str {
        self.config().to_str().unwrap()
    }

    /// The fingerprint this node stores with (and wants on) the values of
    /// `map`, from its configuration file as the daemon reads it.
    fn fingerprint(&self, map: &str) -> u64 {
        let cfg = httpmapd::config::load(self.config()).expect("the node's configuration");
        cfg.maps
            .iter()
            .find(|m| m.name == map)
            .expect("the map")
            .answers_fingerprint()
    }

    fn log(&self) -> String {
        self.daemon.stderr()
    }

    /// Log lines saying the shared cache went down.
    fn down_lines(&self) -> usize {
        count_lines(&self.log(), &["is down"])
    }

    /// Log lines saying the shared cache is back.
    fn up_lines(&self) -> usize {
        count_lines(&self.log(), &["is up again"])
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.admin_dir);
    }
}

/// Lines of `log` containing `needle`, for messages.
fn lines_with(log: &str, needle: &str) -> String {
    log_lines(log, needle).join("\n")
}

/// A command's outcome.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs a command to its end (killed, and the test failed, after 30 s).
fn run(mut cmd: Command) -> Out {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let out = output_within(child, Duration::from_secs(30), &what);
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: show(&out.stdout),
        stderr: show(&out.stderr),
    }
}

/// `httpmapd ARGS...`
fn httpmapd(args: &[&str]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args);
    run(c)
}

/// How to run a command as another user (`nobody`): setpriv or runuser,
/// as root. Fails the test when this process cannot (not root, or neither
/// program installed).
fn as_nobody() -> Vec<String> {
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "\n{}: FAILED: this test connects to the admin socket as another user (nobody), \
             which needs root: run the tests as root.\n",
            common::test_name()
        );
    }
    let exists = |p: &str| Path::new(p).is_file();
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let setpriv = format!("{dir}/setpriv");
        if exists(&setpriv) {
            return vec![
                setpriv,
                "--reuid=nobody".into(),
                "--regid=nogroup".into(),
                "--clear-groups".into(),
            ];
        }
    }
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let runuser = format!("{dir}/runuser");
        if exists(&runuser) {
            return vec![runuser, "-u".into(), "nobody".into(), "--".into()];
        }
    }
    common::missing(
        "setpriv or runuser",
        "the Debian package util-linux (apt-get install util-linux)",
    )
}

/// `httpmapd ARGS...` as user nobody (`prefix` from [`as_nobody`]).
fn httpmapd_as(prefix: &[String], args: &[&str]) -> Out {
    let mut c = Command::new(&prefix[0]);
    c.args(&prefix[1..]).arg(BIN).args(args);
    run(c)
}

/// The lines of `show`'s output, split at tabs: `SOURCE STATE SECONDS KIND
/// VALUE`, or `SOURCE absent`.
fn parse_show(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// Checks a `show` line: `SOURCE STATE SECONDS KIND VALUE` with seconds in
/// `lo..=hi`.
fn assert_show_line(
    line: &[String],
    source: &str,
    state: &str,
    lo: f64,
    hi: f64,
    kind: &str,
    value: &str,
) {
    assert_eq!(line.len(), 5, "show line {line:?}");
    assert_eq!(
        (
            line[0].as_str(),
            line[1].as_str(),
            line[3].as_str(),
            line[4].as_str()
        ),
        (source, state, kind, value),
        "show line {line:?}"
    );
    let secs: f64 = line[2].parse().expect("seconds");
    assert!(
        (lo..=hi).contains(&secs),
        "show line {line:?}: seconds {secs} not in {lo}..={hi}"
    );
    assert_eq!(
        line[2].split('.').nth(1).map(str::len),
        Some(3),
        "seconds with 3 decimals: {line:?}"
    );
}

/// Sums one series over the nodes.
fn total(nodes: &[Node], series: &str) -> f64 {
    nodes.iter().map(|n| n.metric(series)).sum()
}

/// The password appears nowhere in `text`.
fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "the Redis password appears in {what}:\n{}",
        lines_with(text, PASSWORD)
    );
}

// ---------------------------------------------------------------------------
// 1. Three nodes, one Redis: a key fetched once is served everywhere
// ---------------------------------------------------------------------------

#[test]
fn three_nodes_share_what_one_fetched() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).cache("ttl = \"1h\"");
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&cfg)).collect();
    for n in &nodes {
        n.wait_connected();
    }

    // One key: node 1 fetches it, nodes 2 and 3 read it from Redis (asked
    // in upper case: folded as node 1 folded it).
    assert_eq!(
        nodes[0].get("alice@example.com"),
        want("alice@example.com", 1)
    );
    assert_eq!(backend.requests(), 1);
    let mut c = redis.conn();
    wait_keys(&mut c, "httpmapd:v:*", 1);
    for n in &nodes[1..] {
        assert_eq!(n.get("Alice@EXAMPLE.com"), want("alice@example.com", 1));
    }
    assert_eq!(backend.requests(), 1, "nodes 2 and 3 asked the server");

    // 100 keys (10 not found): fetched once, by node 1.
    let keys = key_set("t1", 100);
    for k in &keys {
        assert_eq!(nodes[0].get(k), want(k, 1));
    }
    assert_eq!(backend.requests(), 101);
    wait_keys(&mut c, "httpmapd:v:*", 101);
    for n in &nodes[1..] {
        for k in &keys {
            assert_eq!(n.get(k), want(k, 1), "{k}");
        }
    }
    assert_eq!(backend.requests(), 101, "nodes 2 and 3 asked the server");
    let mut seen: Vec<String> = backend.server.keys().iter().map(|k| show(k)).collect();
    seen.sort();
    let mut expected: Vec<String> = keys.clone();
    expected.push("alice@example.com".into());
    expected.sort();
    assert_eq!(seen, expected, "each key asked exactly once");

    // The counters say the same, node by node.
    let m = nodes[0].metrics();
    assert_eq!(metric(&m, "httpmapd_shared_cache_misses_total"), 101.0);
    assert_eq!(metric(&m, "httpmapd_shared_cache_hits_total"), 0.0);
    assert_eq!(metric(&m, "httpmapd_shared_cache_writes_total"), 101.0);
    assert_eq!(
        metric(&m, "httpmapd_shared_cache_claims_total{result=\"won\"}"),
        101.0
    );
    for n in &nodes[1..] {
        let m = n.metrics();
        assert_eq!(metric(&m, "httpmapd_shared_cache_hits_total"), 101.0);
        assert_eq!(metric(&m, "httpmapd_shared_cache_misses_total"), 0.0);
        assert_eq!(
            metric(&m, "httpmapd_shared_cache_claims_total{result=\"lost\"}"),
            0.0
        );
        assert_eq!(metric(&m, "httpmapd_shared_cache_writes_total"), 0.0);
        assert_eq!(
            metric(&m, "httpmapd_shared_cache_claims_total{result=\"won\"}"),
            0.0
        );
    }
    for n in &nodes {
        let m = n.metrics();
        for kind in ["unavailable", "timeout", "reply", "protocol"] {
            assert_eq!(
                metric(
                    &m,
                    &format!("httpmapd_shared_cache_errors_total{{kind=\"{kind}\"}}")
                ),
                0.0,
                "errors of kind {kind}"
            );
        }
        assert_eq!(metric(&m, "httpmapd_shared_cache_connections"), 2.0);
    }

    // Redis holds exactly those 101 values, under the default prefix.
    assert_eq!(c.keys("httpmapd:v:*").len(), 101);
    assert!(c.get(&vkey("virtual", "alice@example.com")).is_some());
    for n in &nodes {
        assert_eq!(n.down_lines(), 0, "{}", n.log());
        assert_no_password("the log", &n.log());
    }
}

/// A value read from Redis lives in L1 only for the time it has left.
#[test]
fn a_value_from_redis_keeps_the_lifetime_it_has_left() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).cache("ttl = \"10s\"");
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    assert_eq!(a.get("carol@example.com"), want("carol@example.com", 1));
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(b.get("carol@example.com"), want("carol@example.com", 1));
    assert_eq!(backend.requests(), 1);
    let out = httpmapd(&["show", "-c", b.config_str(), "virtual", "carol@example.com"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines = parse_show(&out.stdout);
    assert_eq!(lines.len(), 2, "{out:?}");
    // 10 s from node 1's fetch, 1.5 s ago: at most 8.5 s left, not 10.
    assert_show_line(
        &lines[0],
        "in-process",
        "fresh",
        6.0,
        8.6,
        "found",
        "v1-carol@example.com",
    );
    assert_show_line(
        &lines[1],
        "shared",
        "fresh",
        6.0,
        8.6,
        "found",
        "v1-carol@example.com",
    );
}

// ---------------------------------------------------------------------------
// 2. Purge on one node reaches every node within 1 s
// ---------------------------------------------------------------------------

#[test]
fn purge_on_one_node_reaches_every_node_within_a_second() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).cache("ttl = \"1h\"");
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&cfg)).collect();
    for n in &nodes {
        n.wait_connected();
    }
    let k = "dave@example.com";
    let mut c = redis.conn();
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.get(k), want(k, 1));
        assert_eq!(n.get(k), want(k, 1));
        if i == 0 {
            wait_keys(&mut c, "httpmapd:v:*", 1);
        }
    }
    assert_eq!(backend.requests(), 1);

    // The directory changes; node 1 is told (the key in upper case: purge
    // folds as the map does).
    backend.set_version(2);
    let out = httpmapd(&[
        "purge",
        "-c",
        nodes[0].config_str(),
        "virtual",
        "DAVE@example.com",
    ]);
    let purged = Instant::now();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "dropped 1 entries from the in-process cache and 1 from the shared cache\n"
    );
    assert_eq!(out.stderr, "");
    for (i, n) in nodes.iter().enumerate() {
        let left = Duration::from_secs(1).saturating_sub(purged.elapsed());
        let mut last = String::new();
        let ok = wait_until(left, || {
            last = n.get(k);
            last == want(k, 2)
        });
        assert!(
            ok,
            "node {} still answers {last:?} 1 s after the purge",
            i + 1
        );
    }
    eprintln!(
        "purge reached all 3 nodes in {} ms",
        purged.elapsed().as_millis()
    );
    assert_eq!(
        backend.requests(),
        2,
        "the new value fetched once for the fleet"
    );

    // Counts: a key nobody holds; two keys held by node 1 and Redis.
    let out = httpmapd(&[
        "purge",
        "-c",
        nodes[1].config_str(),
        "virtual",
        "nobody-ever@example.com",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "dropped 0 entries from the in-process cache and 0 from the shared cache\n"
    );
    assert_eq!(
        nodes[0].get("erin@example.com"),
        want("erin@example.com", 2)
    );
    assert_eq!(
        nodes[0].get("nobody1@example.com"),
        want("nobody1@example.com", 2)
    );
    wait_keys(&mut c, "httpmapd:v:*", 3);
    let out = httpmapd(&[
        "purge",
        "-c",
        nodes[0].config_str(),
        "virtual",
        "erin@example.com",
        "nobody1@example.com",
        "frank@example.com",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "dropped 2 entries from the in-process cache and 2 from the shared cache\n"
    );
    assert_eq!(nodes[0].metric("httpmapd_shared_cache_purges_total"), 2.0);
    assert_eq!(nodes[1].metric("httpmapd_shared_cache_purges_total"), 1.0);
    assert_eq!(nodes[2].metric("httpmapd_shared_cache_purges_total"), 0.0);
    // Every node heard the purges (invalidations).
    for n in &nodes[1..] {
        assert!(n.metric("httpmapd_shared_cache_invalidations_total") >= 1.0);
    }
}

// ---------------------------------------------------------------------------
// 3. Redis killed mid-load
// ---------------------------------------------------------------------------

/// What a load thread saw.
#[derive(Default, Debug)]
struct LoadCount {
    answers: usize,
    after_kill: usize,
    wrong: Vec<String>,
    temporary: usize,
}

#[test]
fn redis_killed_mid_load_loses_and_falsifies_nothing() {
    let mut redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    // Short lifetimes: known keys keep going back to Redis and the servers.
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .shared("timeout = \"50ms\"")
        .cache("ttl = \"300ms\"")
        .cache("negative_ttl = \"300ms\"");
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&cfg)).collect();
    for n in &nodes {
        n.wait_connected();
    }
    let keys = Arc::new(key_set("t3", 100));
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for t in 0..2 {
            let port = n.port("virtual");
            let (keys, stop, killed) = (keys.clone(), stop.clone(), killed.clone());
            threads.push(thread::spawn(move || {
                let mut c = LineClient::connect(port);
                let mut count = LoadCount::default();
                let mut j = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    // Three known keys, then one never asked before.
                    let key = if j % 4 == 3 {
                        format!("fresh-{i}-{t}-{j}@example.com")
                    } else {
                        keys[(j * 7 + i * 13 + t) % keys.len()].clone()
                    };
                    j += 1;
                    let was_killed = killed.load(Ordering::SeqCst);
                    let got = c.get(&key);
                    count.answers += 1;
                    if was_killed {
                        count.after_kill += 1;
                    }
                    if got.starts_with("400 ") {
                        count.temporary += 1;
                    }
                    if got != want(&key, 1) && count.wrong.len() < 10 {
                        count.wrong.push(format!("{key}: {got:?}"));
                    }
                }
                count
            }));
        }
    }
    thread::sleep(Duration::from_millis(500));
    redis.kill();
    killed.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::SeqCst);
    let counts: Vec<LoadCount> = threads
        .into_iter()
        .map(|t| t.join().expect("a load thread lost an answer (panicked)"))
        .collect();
    eprintln!("load per thread: {counts:?}");
    for (i, c) in counts.iter().enumerate() {
        assert!(
            c.wrong.is_empty(),
            "thread {i}: wrong answers {:?}",
            c.wrong
        );
        assert_eq!(c.temporary, 0, "thread {i}: temporary errors");
        assert!(
            c.after_kill >= 50,
            "thread {i}: only {} lookups in 1.2 s after Redis died",
            c.after_kill
        );
    }
    for n in &nodes {
        n.wait_connections(0, WAIT);
        let log = n.log();
        assert!(
            log.contains(&format!("shared cache {} is down", redis.described())),
            "{}",
            lines_with(&log, "shared cache")
        );
        assert_no_password("the log", &log);
    }
    // One line per worker connection: its state changed once (up to down),
    // whatever the reasons it meets while down (reset, then refused).
    for n in &nodes {
        let log = n.log();
        let down = n.down_lines();
        assert!(
            (1..=n.workers).contains(&down),
            "{down} 'is down' lines for {} worker connections (one per change of state):\n{}",
            n.workers,
            lines_with(&log, "shared cache")
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Redis restarted empty: sharing resumes, L1 dropped on reconnect
// ---------------------------------------------------------------------------

#[test]
fn redis_restarted_empty_sharing_resumes() {
    let mut redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).cache("ttl = \"1h\"");
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    // Before: j cached on both nodes (one fetch).
    assert_eq!(a.get("judy@example.com"), want("judy@example.com", 1));
    assert_eq!(b.get("judy@example.com"), want("judy@example.com", 1));
    assert_eq!(backend.requests(), 1);

    redis.restart();
    for n in [&a, &b] {
        n.wait_connected();
        assert!(
            wait_until(WAIT, || n.up_lines() == n.workers),
            "one 'is up again' line per worker:\n{}",
            lines_with(&n.log(), "shared cache")
        );
    }
    assert_eq!(
        redis.conn().keys("*"),
        Vec::<String>::new(),
        "restarted empty"
    );

    // A new key: fetched by node 1, served to node 2 by Redis.
    assert_eq!(a.get("kim@example.com"), want("kim@example.com", 1));
    assert_eq!(backend.requests(), 2);
    wait_keys(&mut redis.conn(), "httpmapd:v:*", 1);
    assert_eq!(b.get("kim@example.com"), want("kim@example.com", 1));
    assert_eq!(
        backend.requests(),
        2,
        "node 2 asked the server after the restart"
    );

    // The tracking connection came back: what L1 held before is dropped
    // (changes made meanwhile are unknown). Node 2 fetches j again, node 1
    // reads it from Redis.
    assert_eq!(b.get("judy@example.com"), want("judy@example.com", 1));
    assert_eq!(
        backend.requests(),
        3,
        "node 2 still served j from L1 kept across the outage"
    );
    assert_eq!(a.get("judy@example.com"), want("judy@example.com", 1));
    assert_eq!(backend.requests(), 3);
    for n in [&a, &b] {
        assert!(
            n.down_lines() <= n.workers,
            "{}",
            lines_with(&n.log(), "shared cache")
        );
        assert_no_password("the log", &n.log());
    }
}

// ---------------------------------------------------------------------------
// 5. Something else than Redis on the port
// ---------------------------------------------------------------------------

/// How a fake Redis misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fake {
    /// Bytes that are not RESP at all, after reading the greeting.
    NotResp,
    /// A RESP bulk string header far over any limit.
    HugeBulk,
    /// `-ERR` to everything (HELLO included).
    Errors,
    /// Accepts and closes at once.
    Close,
}

/// A listener that plays `fake` on every connection; counts connections.
struct FakeRedis(Acceptor);

impl FakeRedis {
    fn start(fake: Fake) -> FakeRedis {
        FakeRedis(Acceptor::start(move |mut s, _| {
            if let Fake::Close = fake {
                return;
            }
            let mut buf = [0u8; 4096];
            // Until the daemon closes, or the fake is dropped (shut down).
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let junk: &[u8] = match fake {
                    Fake::NotResp => b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xff",
                    Fake::HugeBulk => b"$99999999999\r\n",
                    Fake::Errors => b"-ERR unknown command, with args beginning with: \r\n",
                    Fake::Close => b"",
                };
                if s.write_all(junk).is_err() {
                    return;
                }
            }
        }))
    }

    fn port(&self) -> u16 {
        self.0.port()
    }

    fn connections(&self) -> usize {
        self.0.accepted()
    }
}

#[test]
fn a_server_speaking_garbage_in_place_of_redis_is_only_misses() {
    for fake in [Fake::NotResp, Fake::HugeBulk, Fake::Errors, Fake::Close] {
        let f = FakeRedis::start(fake);
        let backend = Backend::start(Duration::ZERO);
        let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", f.port());
        let cfg = Cfg::new(Some(&url), &backend.url()).shared("timeout = \"50ms\"");
        let started = Instant::now();
        let node = Node::start(&cfg);
        // Let it try (and fail) a few times.
        assert!(
            wait_until(WAIT, || f.connections() >= 2),
            "{fake:?}: the daemon never connected"
        );
        let keys = key_set("t5", 30);
        for k in &keys {
            assert_eq!(node.get(k), want(k, 1), "{fake:?}");
        }
        assert_eq!(backend.requests(), 30, "{fake:?}");
        // Asked again: L1 answers (still no Redis).
        for k in &keys {
            assert_eq!(node.get(k), want(k, 1), "{fake:?}");
        }
        assert_eq!(backend.requests(), 30, "{fake:?}");
        thread::sleep(Duration::from_millis(700));
        let m = node.metrics();
        let log = node.log();
        let protocol = metric(&m, "httpmapd_shared_cache_errors_total{kind=\"protocol\"}");
        let reply = metric(&m, "httpmapd_shared_cache_errors_total{kind=\"reply\"}");
        let unavailable = metric(
            &m,
            "httpmapd_shared_cache_errors_total{kind=\"unavailable\"}",
        );
        eprintln!(
            "{fake:?}: {} connections in {:?}; errors protocol {protocol} reply {reply} unavailable {unavailable}; log:\n{}",
            f.connections(),
            started.elapsed(),
            lines_with(&log, "shared cache")
        );
        assert_eq!(
            metric(&m, "httpmapd_shared_cache_connections"),
            0.0,
            "{fake:?}"
        );
        assert_eq!(
            metric(&m, "httpmapd_shared_cache_hits_total"),
            0.0,
            "{fake:?}"
        );
        assert!(
            unavailable >= 30.0,
            "{fake:?}: every miss counted unavailable"
        );
        match fake {
            Fake::NotResp | Fake::HugeBulk => assert!(protocol > 0.0, "{fake:?}"),
            Fake::Errors => assert!(reply > 0.0, "{fake:?}"),
            Fake::Close => {}
        }
        // One line per worker at most (its state changed once), never one
        // per lookup or per reconnect.
        let down = node.down_lines();
        assert!(
            (1..=node.workers).contains(&down),
            "{fake:?}: {down} 'is down' lines:\n{}",
            lines_with(&log, "shared cache")
        );
        assert!(
            log.contains(&format!("redis://:***@127.0.0.1:{}/0 is down", f.port())),
            "{log}"
        );
        assert_no_password("the log", &log);
        // Reconnects back off: each worker tries at 0, 100, 300, 700,
        // 1500 ms... (the wait doubles from 100 ms): in T ms at most
        // 2 + log2(T / 100 + 1) tries per worker.
        let conns = f.connections();
        let ms = started.elapsed().as_millis() as f64;
        let bound = 2 * (2 + (ms / 100.0 + 1.0).log2().floor() as usize);
        assert!(
            conns <= bound,
            "{fake:?}: {conns} connections in {ms} ms (at most {bound} with the backoff)"
        );
    }
}

// ---------------------------------------------------------------------------
// 6. The password: in no log, --check output, error or metric
// ---------------------------------------------------------------------------

#[test]
fn the_password_shows_nowhere() {
    let mut redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let good = Node::start(&Cfg::new(Some(&redis.url()), &backend.url()));
    good.wait_connected();
    assert_eq!(good.get("x@example.com"), want("x@example.com", 1));

    // A wrong password (WRONGPASS), none at all (NOAUTH), a user that
    // does not exist.
    const WRONG: &str = "Wrong-Secret-4417";
    let wrong_url = format!("redis://:{WRONG}@127.0.0.1:{}", redis.port);
    let wrong = Node::start(&Cfg::new(Some(&wrong_url), &backend.url()));
    let none_url = format!("redis://127.0.0.1:{}", redis.port);
    let none = Node::start(&Cfg::new(Some(&none_url), &backend.url()));
    let user_url = format!("redis://ghost:{PASSWORD}@127.0.0.1:{}", redis.port);
    let user = Node::start(&Cfg::new(Some(&user_url), &backend.url()));
    for (n, needle) in [
        (&wrong, "WRONGPASS"),
        (&none, "NOAUTH"),
        (&user, "WRONGPASS"),
    ] {
        n.daemon.wait_log(needle, WAIT);
        assert_eq!(n.get("y@example.com"), want("y@example.com", 1));
    }
    assert!(wrong
        .log()
        .contains(&format!("redis://:***@127.0.0.1:{}/0 is down", redis.port)));
    assert!(user.log().contains(&format!(
        "redis://ghost:***@127.0.0.1:{}/0 is down",
        redis.port
    )));

    // Down and up again, with the password in the URL.
    redis.restart();
    good.wait_connected();
    assert!(wait_until(WAIT, || good.up_lines() == good.workers));

    // /metrics and /health.
    for n in [&good, &wrong, &none, &user] {
        assert_no_password("/metrics", &n.metrics());
        assert_no_password("/metrics", &stats_get(n.stats, "/health").body);
    }

    // An admin command's error (Redis down) names Redis without the password.
    redis.kill();
    let out = httpmapd(&["purge", "-c", good.config_str(), "virtual", "x@example.com"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&redis.described()), "{out:?}");
    assert_no_password("purge's error", &format!("{}{}", out.stdout, out.stderr));
    let out = httpmapd(&["show", "-c", good.config_str(), "virtual", "x@example.com"]);
    assert_no_password("show's output", &format!("{}{}", out.stdout, out.stderr));

    for n in [&good, &wrong, &none, &user] {
        assert_no_password("the log", &n.log());
        assert!(
            !n.log().contains(WRONG),
            "the wrong password is logged:\n{}",
            n.log()
        );
    }

    // --check of bad [shared_cache] sections holding the password.
    let dir = unique_temp_dir("httpmapd-check");
    let bad = [
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:notaport\""),
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:99999\""),
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:6379/nodb\""),
        format!("url = \"http://:{PASSWORD}@127.0.0.1:6379\""),
        format!("url = \"redis://:{PASSWORD}@\""),
        format!(
            "url = \"rediss://:{PASSWORD}@127.0.0.1:6379\"\ntls_ca_file = \"/nonexistent/ca.pem\""
        ),
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:6379\"\ntls_ca_file = \"/etc/hostname\""),
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:6379\"\ntimeout = \"0s\""),
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:6379\"\nbogus = \"{PASSWORD}\""),
        format!("url = \"redis://:{PASSWORD}@no-such-host.invalid:6379\""),
        format!("url = \"redis://:{PASSWORD}@127.0.0.1:6379"),
    ];
    for (i, section) in bad.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(
            &path,
            format!(
                "[shared_cache]\n{section}\n\n[maps.virtual]\nservers = [\"http://127.0.0.1:1/\"]\n"
            ),
        )
        .unwrap();
        let out = httpmapd(&["-c", path.to_str().unwrap(), "--check"]);
        eprintln!("--check {section:?}: {}", out.stderr.trim_end());
        assert_eq!(out.code, 1, "{section}: {out:?}");
        assert!(
            out.stderr.contains("bad"),
            "{section}: names the file: {out:?}"
        );
        assert_no_password(
            &format!("--check of {section:?}"),
            &format!("{}{}", out.stdout, out.stderr),
        );
    }
    // A good one.
    let out = httpmapd(&["-c", good.config_str(), "--check"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_no_password("--check", &format!("{}{}", out.stdout, out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// 7. Redis commands per lookup, and how a value is stored
// ---------------------------------------------------------------------------

#[test]
fn redis_commands_per_lookup() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .shared("prefix = \"fleet7:\"")
        .cache("ttl = \"1h\"")
        .cache("negative_ttl = \"1m\"")
        .cache("stale_ttl = \"1h\"");
    let node = Node::start(&cfg);
    node.wait_connected();
    let mut c = redis.conn();
    let keys = key_set("t7", 10);

    // Misses: GET, SET NX (the claim), SET (the value), UNLINK (the claim
    // released once the value is written), nothing else.
    c.reset_stats();
    for k in &keys {
        assert_eq!(node.get(k), want(k, 1));
    }
    // (The value's SET leaves at the end of the turn that answered.)
    let mut miss = BTreeMap::new();
    wait_until(WAIT, || {
        miss = c.commandstats();
        miss == stats_of(&[("get", 10), ("set", 20), ("unlink", 10)])
    });
    eprintln!("10 misses: {miss:?}");
    assert_eq!(miss, stats_of(&[("get", 10), ("set", 20), ("unlink", 10)]));
    assert_eq!(backend.requests(), 10);

    // How it is stored.
    let now = unix_ms();
    let found = c
        .get(b"fleet7:v:virtual:user000-t7@example.com")
        .expect("stored");
    assert_eq!(&found[..2], &[2, 1], "version 2, found");
    let fingerprint = node.fingerprint("virtual").to_be_bytes();
    assert_eq!(&found[10..18], &fingerprint, "the map's fingerprint");
    assert_eq!(&found[18..], b"v1-user000-t7@example.com");
    let fresh = u64::from_be_bytes(found[2..10].try_into().unwrap());
    assert!(
        fresh.abs_diff(now + 3_600_000) < 5_000,
        "fresh until {fresh}, now {now}"
    );
    let pttl = c.pttl(b"fleet7:v:virtual:user000-t7@example.com");
    assert!(
        (7_190_000..=7_200_000).contains(&pttl),
        "PX ttl + stale_ttl: {pttl}"
    );
    let nf = c
        .get(b"fleet7:v:virtual:nobody009-t7@example.com")
        .expect("stored");
    assert_eq!(nf.len(), 18);
    assert_eq!(&nf[..2], &[2, 0], "version 2, not found");
    assert_eq!(&nf[10..18], &fingerprint, "the map's fingerprint");
    let fresh = u64::from_be_bytes(nf[2..10].try_into().unwrap());
    assert!(fresh.abs_diff(now + 60_000) < 5_000);
    let pttl = c.pttl(b"fleet7:v:virtual:nobody009-t7@example.com");
    assert!(
        (3_650_000..=3_660_000).contains(&pttl),
        "PX negative_ttl + stale_ttl: {pttl}"
    );
    // The claims are released once their values are written.
    let claims = c.keys("fleet7:l:*");
    assert_eq!(claims, Vec::<String>::new(), "claims left behind");
    assert_eq!(
        c.keys("httpmapd:*"),
        Vec::<String>::new(),
        "the prefix is used"
    );

    // L1 hits, this node's own writes notwithstanding: no command.
    thread::sleep(Duration::from_millis(300));
    c.reset_stats();
    for k in &keys {
        assert_eq!(node.get(k), want(k, 1));
    }
    let l1 = c.commandstats();
    eprintln!("10 L1 hits: {l1:?}");
    assert_eq!(l1, BTreeMap::new(), "L1 hits after this node's own writes");

    // L2 hits (a new process: L1 empty): one GET each.
    drop(node);
    let node = Node::start(&cfg);
    node.wait_connected();
    c.reset_stats();
    for k in &keys {
        assert_eq!(node.get(k), want(k, 1));
    }
    let hit = c.commandstats();
    eprintln!("10 L2 hits: {hit:?}");
    assert_eq!(hit, stats_of(&[("get", 10)]));
    assert_eq!(backend.requests(), 10);
}

// ---------------------------------------------------------------------------
// 8. Cold-key fan-out
// ---------------------------------------------------------------------------

/// Three nodes ask `rounds` new keys, each at the same moment (a barrier);
/// the server answers after 100 ms. Returns the server's request count and
/// the nodes (for their metrics).
fn fan_out(redis: &Redis, claim_wait: &str, prefix: &str, rounds: usize) -> (usize, Vec<Node>) {
    let backend = Backend::start(Duration::from_millis(100));
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .shared(&format!("claim_wait = {claim_wait:?}"))
        .shared(&format!("prefix = {prefix:?}"));
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&cfg)).collect();
    for n in &nodes {
        n.wait_connected();
    }
    for r in 0..rounds {
        let key = format!("cold{r}-{prefix}@example.com");
        let barrier = Arc::new(Barrier::new(nodes.len()));
        let threads: Vec<_> = nodes
            .iter()
            .map(|n| {
                let mut c = n.client();
                let (b, key) = (barrier.clone(), key.clone());
                thread::spawn(move || {
                    b.wait();
                    c.get(&key)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), want(&key, 1));
        }
    }
    (backend.requests(), nodes)
}

#[test]
fn a_cold_key_asked_by_every_node_at_once_is_fetched_once() {
    let redis = Redis::start();
    let rounds = 5;
    let (requests, nodes) = fan_out(&redis, "1s", "fan1:", rounds);
    eprintln!("fan-out with claims: {requests} server requests for {rounds} keys x 3 nodes");
    assert_eq!(requests, rounds, "one server request per key for the fleet");
    assert_eq!(
        total(&nodes, "httpmapd_shared_cache_claims_total{result=\"won\"}"),
        rounds as f64
    );
    assert_eq!(
        total(&nodes, "httpmapd_shared_cache_hits_total"),
        2.0 * rounds as f64
    );
    let lost = total(
        &nodes,
        "httpmapd_shared_cache_claims_total{result=\"lost\"}",
    );
    let misses = total(&nodes, "httpmapd_shared_cache_misses_total");
    eprintln!("fan-out with claims: claims lost {lost}, shared-cache misses {misses}");
    drop(nodes);

    let (requests, nodes) = fan_out(&redis, "0s", "fan0:", rounds);
    eprintln!("fan-out without claims (claim_wait = 0s): {requests} server requests for {rounds} keys x 3 nodes");
    assert!((rounds..=3 * rounds).contains(&requests));
    assert_eq!(
        total(&nodes, "httpmapd_shared_cache_claims_total{result=\"won\"}"),
        0.0
    );
    assert_eq!(
        total(
            &nodes,
            "httpmapd_shared_cache_claims_total{result=\"lost\"}"
        ),
        0.0
    );
    assert_eq!(
        redis.conn().keys("fan0:l:*"),
        Vec::<String>::new(),
        "no claim keys"
    );
}

// ---------------------------------------------------------------------------
// 9. The admin commands through the real socket
// ---------------------------------------------------------------------------

#[test]
fn admin_commands_show_dump_purge() {
    let mut redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .cache("ttl = \"1h\"")
        .cache("negative_ttl = \"1m\"")
        .map(
            "access",
            &backend.url(),
            &["ttl = \"1s\"", "stale_ttl = \"1h\""],
        );
    let node = Node::start(&cfg);
    node.wait_connected();
    let f = node.config_str().to_string();
    let admin = |args: &[&str]| {
        let mut a = vec![args[0], "-c", &f];
        a.extend_from_slice(&args[1..]);
        httpmapd(&a)
    };

    // Nothing yet.
    let out = admin(&["show", "virtual", "a@x.org"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "in-process\tabsent\nshared\tabsent\n"),
        "{out:?}"
    );
    let out = admin(&["dump"]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (0, "", "")
    );

    let spaced = "sp ace%@x.org";
    assert_eq!(node.get("a@x.org"), want("a@x.org", 1));
    assert_eq!(node.get("nobody1@x.org"), want("nobody1@x.org", 1));
    assert_eq!(node.get(spaced), want(spaced, 1));
    assert_eq!(node.get_in("access", "b@x.org"), want("b@x.org", 1));
    assert_eq!(backend.requests(), 4);
    wait_keys(&mut redis.conn(), "httpmapd:v:*", 4);

    // show: fresh, found and not found, from both caches; the key folded.
    let out = admin(&["show", "virtual", "A@X.org"]);
    assert_eq!(out.code, 0, "{out:?}");
    let l = parse_show(&out.stdout);
    assert_eq!(l.len(), 2, "{out:?}");
    assert_show_line(
        &l[0],
        "in-process",
        "fresh",
        3590.0,
        3600.0,
        "found",
        "v1-a@x.org",
    );
    assert_show_line(
        &l[1],
        "shared",
        "fresh",
        3590.0,
        3600.0,
        "found",
        "v1-a@x.org",
    );
    let out = admin(&["show", "virtual", "nobody1@x.org"]);
    let l = parse_show(&out.stdout);
    assert_eq!(l.len(), 2, "{out:?}");
    assert_show_line(&l[0], "in-process", "fresh", 50.0, 60.0, "not-found", "");
    assert_show_line(&l[1], "shared", "fresh", 50.0, 60.0, "not-found", "");
    let out = admin(&["show", "virtual", spaced]);
    let l = parse_show(&out.stdout);
    assert_show_line(
        &l[0],
        "in-process",
        "fresh",
        3590.0,
        3600.0,
        "found",
        "v1-sp%20ace%25@x.org",
    );

    // dump: every map, then one; fields %XX-encoded, not found empty.
    let dump_lines = |out: &Out| -> Vec<(String, String, String)> {
        assert_eq!(out.code, 0, "{out:?}");
        let mut v: Vec<(String, String, String)> = out
            .stdout
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                assert_eq!(f.len(), 4, "dump line {l:?}");
                let secs: f64 = f[3].parse().expect("seconds");
                assert!(secs > -10.0 && secs <= 3600.0, "{l:?}");
                (f[0].into(), f[1].into(), f[2].into())
            })
            .collect();
        v.sort();
        v
    };
    let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    let out = admin(&["dump"]);
    assert_eq!(
        dump_lines(&out),
        vec![
            t("access", "b@x.org", "v1-b@x.org"),
            t("virtual", "a@x.org", "v1-a@x.org"),
            t("virtual", "nobody1@x.org", ""),
            t("virtual", "sp%20ace%25@x.org", "v1-sp%20ace%25@x.org"),
        ]
    );
    let out = admin(&["dump", "access"]);
    assert_eq!(dump_lines(&out), vec![t("access", "b@x.org", "v1-b@x.org")]);
    let out = admin(&["dump", "nope"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no map"), "{out:?}");

    // Stale: access has ttl 1s, stale_ttl 1h.
    thread::sleep(Duration::from_millis(1200));
    let out = admin(&["show", "access", "b@x.org"]);
    let l = parse_show(&out.stdout);
    assert_eq!(l.len(), 2, "{out:?}");
    assert_show_line(
        &l[0],
        "in-process",
        "stale",
        -5.0,
        -0.001,
        "found",
        "v1-b@x.org",
    );
    assert_show_line(
        &l[1],
        "shared",
        "stale",
        -5.0,
        -0.001,
        "found",
        "v1-b@x.org",
    );

    // purge: keys, a map, everything; exact counts.
    let out = admin(&["purge", "virtual", "a@x.org", "NOBODY1@x.org", "zed@x.org"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "dropped 2 entries from the in-process cache and 2 from the shared cache\n"
        ),
        "{out:?}"
    );
    let out = admin(&["show", "virtual", "a@x.org"]);
    assert_eq!(out.stdout, "in-process\tabsent\nshared\tabsent\n");
    let out = admin(&["purge", "access", "--all"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "dropped 1 entries from the in-process cache and 1 from the shared cache\n"
        ),
        "{out:?}"
    );
    assert_eq!(node.get("c@x.org"), want("c@x.org", 1));
    assert_eq!(node.get_in("access", "d@x.org"), want("d@x.org", 1));
    let out = admin(&["purge", "--all"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "dropped 3 entries from the in-process cache and 3 from the shared cache\n"
        ),
        "{out:?}"
    );
    assert_eq!(admin(&["dump"]).stdout, "");
    assert_eq!(redis.conn().keys("httpmapd:v:*"), Vec::<String>::new());
    // Usage errors (keys and --all together: see `purge_refuses_keys_and_all_together`).
    for args in [&["purge", "virtual"][..], &["purge"]] {
        let out = admin(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
    let out = admin(&["purge", "nope", "k"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no map"), "{out:?}");

    // The socket: mode 0600, another user cannot open it.
    let meta = std::fs::metadata(&node.admin).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let prefix = as_nobody();
    let out = httpmapd_as(&prefix, &["show", "-c", &f, "virtual", "a@x.org"]);
    assert_eq!(out.code, 1, "as nobody: {out:?}");
    assert!(
        out.stderr.contains("cannot reach the daemon") && out.stderr.contains("Permission denied"),
        "as nobody: {out:?}"
    );
    // The same as nobody with mode 0666: it is the mode that refused.
    let open = Node::start(&cfg.clone().daemon("admin_socket_mode = \"0666\""));
    let meta = std::fs::metadata(&open.admin).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
    let out = httpmapd_as(&prefix, &["dump", "-c", open.config_str()]);
    assert_eq!(
        (out.code, out.stderr.as_str()),
        (0, ""),
        "as nobody, mode 0666: {out:?}"
    );
    drop(open);

    // Redis down: purge fails (exit 1, a clear message); dump needs no Redis.
    redis.kill();
    let out = admin(&["purge", "virtual", "c@x.org"]);
    eprintln!("purge with Redis down: {out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.starts_with("httpmapd: "), "{out:?}");
    assert!(out.stderr.contains(&redis.described()), "{out:?}");
    assert!(out.stderr.contains("refused"), "{out:?}");
    let out = admin(&["show", "virtual", "c@x.org"]);
    eprintln!("show with Redis down: {out:?}");
    let out = admin(&["dump"]);
    assert_eq!(out.code, 0, "{out:?}");

    // The daemon not running: a socket file nobody listens on, then none.
    let admin_path = node.admin.clone();
    let config = node.config().to_path_buf();
    let kept = unique_temp_dir("httpmapd-kept");
    let kept_config = kept.join("httpmapd.toml");
    std::fs::copy(&config, &kept_config).unwrap();
    let kc = kept_config.to_str().unwrap().to_string();
    let mut node = node;
    let _ = node.daemon.child.kill();
    let _ = node.daemon.child.wait();
    assert!(admin_path.exists(), "the socket file stays after SIGKILL");
    let out = httpmapd(&["purge", "-c", &kc, "virtual", "c@x.org"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "cannot reach the daemon at {}",
            admin_path.display()
        )),
        "{out:?}"
    );
    drop(node);
    assert!(!admin_path.exists());
    for args in [
        &["purge", "-c", &kc, "--all"][..],
        &["show", "-c", &kc, "virtual", "k"],
        &["dump", "-c", &kc],
    ] {
        let out = httpmapd(args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(&format!(
                "cannot reach the daemon at {}",
                admin_path.display()
            )),
            "{out:?}"
        );
        assert_eq!(out.stdout, "");
    }
    let _ = std::fs::remove_dir_all(&kept);
}

/// Without `[shared_cache]` purge speaks only of the in-process cache.
#[test]
fn admin_purge_without_a_shared_cache() {
    let backend = Backend::start(Duration::ZERO);
    let node = Node::start(&Cfg::new(None, &backend.url()));
    assert_eq!(node.get("a@x.org"), want("a@x.org", 1));
    let out = httpmapd(&["purge", "-c", node.config_str(), "virtual", "a@x.org"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "dropped 1 entries from the in-process cache\n"),
        "{out:?}"
    );
    let out = httpmapd(&["show", "-c", node.config_str(), "virtual", "a@x.org"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "in-process\tabsent\n"),
        "{out:?}"
    );
    assert!(!node.metrics().contains("httpmapd_shared_cache_"));
}

// ---------------------------------------------------------------------------
// 10. Stale across nodes during an outage
// ---------------------------------------------------------------------------

#[test]
fn a_node_that_never_saw_a_key_answers_it_stale_from_redis_during_an_outage() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .cache("ttl = \"1s\"")
        .cache("stale_ttl = \"1h\"");
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    assert_eq!(a.get("kate@example.com"), want("kate@example.com", 1));
    assert_eq!(backend.requests(), 1);
    drop(backend); // every server gone: refused
    thread::sleep(Duration::from_millis(1200));
    let t = Instant::now();
    assert_eq!(
        b.get("kate@example.com"),
        want("kate@example.com", 1),
        "node 2 never saw the key: its stale value is in Redis"
    );
    eprintln!(
        "stale answer from Redis on node 2 in {:?}; stale_total {}",
        t.elapsed(),
        b.metric("httpmapd_shared_cache_stale_total")
    );
    assert!(b.metric("httpmapd_shared_cache_stale_total") >= 1.0);
    assert_eq!(b.metric("httpmapd_shared_cache_hits_total"), 0.0);
    // Node 1 answers stale from its own L1, as before.
    assert_eq!(a.get("kate@example.com"), want("kate@example.com", 1));
    // A key nobody has: a temporary error, as ever.
    assert!(b.get("new@example.com").starts_with("400 "));
}

// ---------------------------------------------------------------------------
// More Redis trouble: stalled, full
// ---------------------------------------------------------------------------

/// Redis stopped (SIGSTOP): each lookup waits at most `timeout` for it,
/// the hung connection is closed after a while, and everything resumes
/// after SIGCONT.
#[test]
fn a_stalled_redis_costs_a_timeout_not_an_answer() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).shared("timeout = \"50ms\"");
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    redis.signal(libc::SIGSTOP);
    let mut slowest = Duration::ZERO;
    let stalled = Instant::now();
    let mut i = 0;
    while stalled.elapsed() < Duration::from_millis(1500) {
        let k = format!("stall{i}@example.com");
        i += 1;
        let t = Instant::now();
        assert_eq!(a.get(&k), want(&k, 1));
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("{i} lookups while Redis was stopped; slowest {slowest:?}");
    assert_eq!(backend.requests(), i);
    assert!(
        slowest < Duration::from_millis(500),
        "a lookup took {slowest:?}"
    );
    assert!(a.metric("httpmapd_shared_cache_errors_total{kind=\"timeout\"}") >= 1.0);
    redis.signal(libc::SIGCONT);
    a.wait_connected();
    b.wait_connected();
    // Sharing resumes.
    let before = backend.requests();
    assert_eq!(
        a.get("after-stall@example.com"),
        want("after-stall@example.com", 1)
    );
    assert_eq!(
        b.get("after-stall@example.com"),
        want("after-stall@example.com", 1)
    );
    assert_eq!(backend.requests(), before + 1);
    for n in [&a, &b] {
        let log = n.log();
        eprintln!("stall log:\n{}", lines_with(&log, "shared cache"));
        assert!(
            n.down_lines() <= n.workers,
            "{}",
            lines_with(&log, "shared cache")
        );
        assert_no_password("the log", &log);
    }
}

/// Writes refused by Redis (`OOM`, maxmemory reached) are skipped writes
/// only: answers still come from the servers, and a later change of those
/// keys by someone else (another node's value, a purge) still reaches this
/// node's L1.
#[test]
fn refused_writes_do_not_swallow_later_invalidations() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).cache("ttl = \"1h\"");
    let a = Node::start(&cfg);
    a.wait_connected();
    let mut c = redis.conn();
    c.ok(&[b"CONFIG", b"SET", b"maxmemory-policy", b"noeviction"]);
    c.ok(&[b"CONFIG", b"SET", b"maxmemory", b"1"]);
    // 20 keys over 20 connections: both workers take some.
    let keys = key_set("oom", 20);
    for k in &keys {
        assert_eq!(a.get(k), want(k, 1));
    }
    assert_eq!(backend.requests(), 20);
    assert!(a.metric("httpmapd_shared_cache_errors_total{kind=\"reply\"}") >= 20.0);
    assert_eq!(
        c.keys("httpmapd:v:*"),
        Vec::<String>::new(),
        "every write refused"
    );
    c.ok(&[b"CONFIG", b"SET", b"maxmemory", b"0"]);
    // Another node stores newer values.
    let fresh = unix_ms() + 3_600_000;
    let fingerprint = a.fingerprint("virtual");
    for k in &keys {
        let v = if k.starts_with("nobody") {
            None
        } else {
            Some(format!("v2-{k}"))
        };
        let stored = encode_value(v.as_deref().map(str::as_bytes), fresh, fingerprint);
        c.ok(&[b"SET", &vkey("virtual", k), &stored, b"PX", b"7200000"]);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut stale = Vec::new();
    for k in keys.iter().filter(|k| !k.starts_with("nobody")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut last = String::new();
        if !wait_until(left, || {
            last = a.get(k);
            last == want(k, 2)
        }) {
            stale.push(format!("{k}: {last:?}"));
        }
    }
    assert!(
        stale.is_empty(),
        "{} of 18 keys still answer the old value 1 s after another node changed them \
         (their own refused write swallowed the invalidation):\n{}",
        stale.len(),
        stale.join("\n")
    );
    assert_eq!(backend.requests(), 20);
}

// ---------------------------------------------------------------------------
// A Unix socket and a database number
// ---------------------------------------------------------------------------

#[test]
fn unix_socket_and_database_number() {
    let redis = Redis::start_with(None);
    let backend = Backend::start(Duration::ZERO);
    let url = format!("unix:{}?db=3", redis.socket_path().display());
    let cfg = Cfg::new(Some(&url), &backend.url());
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    assert_eq!(a.get("uma@example.com"), want("uma@example.com", 1));
    let mut c = redis.conn();
    c.ok(&[b"SELECT", b"3"]);
    wait_keys(&mut c, "httpmapd:v:*", 1);
    c.ok(&[b"SELECT", b"0"]);
    assert_eq!(b.get("uma@example.com"), want("uma@example.com", 1));
    assert_eq!(backend.requests(), 1);
    assert_eq!(c.keys("httpmapd:v:*"), Vec::<String>::new(), "not in db 0");
    c.ok(&[b"SELECT", b"3"]);
    assert_eq!(
        c.keys("httpmapd:v:*"),
        vec!["httpmapd:v:virtual:uma@example.com".to_string()]
    );
    // Purge reaches the other node over the Unix socket too.
    backend.set_version(2);
    let out = httpmapd(&["purge", "-c", a.config_str(), "virtual", "uma@example.com"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "dropped 1 entries from the in-process cache and 1 from the shared cache\n"
        ),
        "{out:?}"
    );
    assert!(wait_until(Duration::from_secs(1), || b
        .get("uma@example.com")
        == want("uma@example.com", 2)));
}

/// `purge MAP KEY... --all` is refused (exit 2, "give KEYs or --all, not
/// both"), wherever `--all` is written; it is not purged as a key named
/// "--all".
#[test]
fn purge_refuses_keys_and_all_together() {
    let backend = Backend::start(Duration::ZERO);
    let node = Node::start(&Cfg::new(None, &backend.url()));
    assert_eq!(node.get("a@x.org"), want("a@x.org", 1));
    let f = node.config_str();
    for args in [
        &["purge", "-c", f, "virtual", "--all", "a@x.org"][..],
        &["purge", "-c", f, "virtual", "a@x.org", "--all"],
    ] {
        let out = httpmapd(args);
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (2, ""),
            "{args:?}: {out:?}"
        );
        assert!(out.stderr.contains("not both"), "{args:?}: {out:?}");
    }
    // Nothing was purged.
    let out = httpmapd(&["dump", "-c", f]);
    assert_eq!(out.stdout.lines().count(), 1, "{out:?}");
}

// ---------------------------------------------------------------------------
// Claims end with their fetch
// ---------------------------------------------------------------------------

/// A claim is held while its fetch runs, no longer: once the value is
/// written, a node that misses the key again (after a purge, or when the
/// value went stale) fetches at once instead of waiting `claim_wait` for a
/// fetch nobody is making.
#[test]
fn a_lookup_after_a_purge_does_not_wait_for_a_finished_claim() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url()).shared("claim_wait = \"1s\"");
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    assert_eq!(a.get("liz@example.com"), want("liz@example.com", 1));
    wait_keys(&mut redis.conn(), "httpmapd:v:*", 1);
    backend.set_version(2);
    let out = httpmapd(&["purge", "-c", a.config_str(), "virtual", "liz@example.com"]);
    assert_eq!(out.code, 0, "{out:?}");
    let mut c = redis.conn();
    let claims = c.keys("httpmapd:l:*");
    let t = Instant::now();
    assert_eq!(b.get("liz@example.com"), want("liz@example.com", 2));
    let took = t.elapsed();
    eprintln!(
        "first lookup after the purge: {took:?}; claim keys left after the fetch: {claims:?}"
    );
    assert_eq!(backend.requests(), 2);
    assert!(
        took < Duration::from_millis(500),
        "the first lookup after a purge took {took:?}: it waited claim_wait (1s) on the claim \
         of a fetch that ended before the purge (claim keys still held: {claims:?})"
    );
}

// ---------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------

/// SIGHUP with `[shared_cache]` unchanged keeps the connections and L1; a
/// changed prefix is a new connection, and L1 is dropped.
#[test]
fn reload_keeps_or_renews_the_shared_cache() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url());
    let a = Node::start(&cfg);
    a.wait_connected();
    assert_eq!(a.get("max@example.com"), want("max@example.com", 1));
    let mut c = redis.conn();
    // The ids of the daemon's connections.
    let clients = |c: &mut RespConn| -> Vec<String> {
        match c.cmd(&[b"CLIENT", b"LIST"]).unwrap() {
            Resp::Bulk(b) => {
                let mut ids: Vec<String> = show(&b)
                    .lines()
                    .filter(|l| l.contains("name=httpmapd-"))
                    .filter_map(|l| l.split(' ').next().map(str::to_string))
                    .collect();
                ids.sort();
                ids
            }
            other => panic!("CLIENT LIST: {other:?}"),
        }
    };
    let before = clients(&mut c);
    assert_eq!(before.len(), 2, "{before:?}");

    // Unchanged: same connections, L1 kept (no command for a hit).
    a.daemon.reload_ok();
    assert_eq!(count_lines(&a.log(), &["reloaded"]), 1, "{}", a.log());
    thread::sleep(Duration::from_millis(300));
    c.reset_stats();
    assert_eq!(a.get("max@example.com"), want("max@example.com", 1));
    assert_eq!(c.commandstats(), BTreeMap::new());
    assert_eq!(clients(&mut c), before);
    assert_eq!(a.up_lines() + a.down_lines(), 0, "{}", a.log());

    // A new prefix: new connections; L1 dropped, the key fetched again
    // and stored under the new prefix.
    let text = std::fs::read_to_string(a.config()).unwrap();
    std::fs::write(
        a.config(),
        text.replace(
            "[shared_cache]\n",
            "[shared_cache]\nprefix = \"renewed:\"\n",
        ),
    )
    .unwrap();
    a.daemon.reload_ok();
    assert!(
        wait_until(WAIT, || {
            let now = clients(&mut c);
            now.len() == 2
                && now.iter().all(|id| !before.contains(id))
                && a.metric("httpmapd_shared_cache_connections") == 2.0
        }),
        "no new connections after the reload: {:?}\n{}",
        clients(&mut c),
        a.log()
    );
    assert_eq!(a.get("max@example.com"), want("max@example.com", 1));
    assert_eq!(backend.requests(), 2, "L1 kept across a change of prefix");
    wait_keys(&mut c, "renewed:v:*", 1);
    assert_eq!(
        c.keys("renewed:v:*"),
        vec!["renewed:v:virtual:max@example.com".to_string()]
    );
}

// ---------------------------------------------------------------------------
// Review fixes: a zero TTL, a reload mid-fetch, stale hits while waiting
// ---------------------------------------------------------------------------

/// One tcp_table lookup of `key` on port `port` on a new connection: the
/// reply line, or an error when none comes within `within` (a hung lookup
/// is reported, not waited out).
fn get_within(port: u16, key: &str, within: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("get {}\n", encode_key(key)).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(_) if line.ends_with('\n') => Ok(line),
        Ok(_) => Err(format!("connection closed after {line:?}")),
        Err(e) => Err(format!("no answer within {within:?} ({e}); have {line:?}")),
    }
}

/// A node whose TTLs are zero (a reload set them so, or another node of
/// the fleet keeps values longer) finds a value Redis still holds as fresh:
/// that value is fresh for no time on this node, so the lookup goes on to
/// the servers and is answered; it never hangs.
#[test]
fn a_fresh_value_from_redis_with_a_zero_ttl_is_answered_from_the_servers() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .cache("ttl = \"0s\"")
        .cache("negative_ttl = \"0s\"")
        .cache("stale_ttl = \"0s\"");
    let a = Node::start(&cfg);
    a.wait_connected();
    let mut c = redis.conn();
    let fresh = unix_ms() + 3_600_000;
    let found = encode_value(Some(b"from-another-node"), fresh, a.fingerprint("virtual"));
    c.ok(&[b"SET", &vkey("virtual", "alice"), &found, b"PX", b"7200000"]);
    let none = encode_value(None, fresh, a.fingerprint("virtual"));
    c.ok(&[
        b"SET",
        &vkey("virtual", "nobody-x"),
        &none,
        b"PX",
        b"7200000",
    ]);
    let port = a.port("virtual");
    for round in 0..2 {
        for key in ["alice", "nobody-x"] {
            let got = get_within(port, key, Duration::from_secs(3));
            assert_eq!(
                got,
                Ok(want(key, 1)),
                "round {round}, key {key}; log:\n{}",
                a.log()
            );
        }
    }
    // Nothing cached anywhere with zero TTLs: every lookup asked the servers.
    assert_eq!(backend.requests(), 4);
    assert_eq!(a.metric("httpmapd_shared_cache_hits_total"), 0.0);
}

/// A fetch that was under way when a reload gave the map other servers
/// answers its own request, and is stored nowhere: neither in this node's
/// cache nor in Redis, where every node would take it as the new servers'
/// answer.
#[test]
fn a_result_fetched_under_the_old_configuration_is_not_written_to_redis() {
    let redis = Redis::start();
    let old = Backend::start(Duration::from_millis(1500));
    let new = Backend::start(Duration::ZERO);
    new.set_version(2);
    let mut cfg = Cfg::new(Some(&redis.url()), &old.url());
    // One worker: the old fetch's write (if any) and the next lookup's GET
    // share one connection, so they reach Redis in that order.
    cfg.workers = 1;
    let a = Node::start(&cfg);
    a.wait_connected();
    let key = "kim@example.com";
    let mut client = a.client();
    client.send(format!("get {key}\n").as_bytes());
    assert!(
        wait_until(WAIT, || old.requests() == 1),
        "the fetch did not start"
    );
    let text = std::fs::read_to_string(a.config()).unwrap();
    assert!(text.contains(&old.url()));
    std::fs::write(a.config(), text.replace(&old.url(), &new.url())).unwrap();
    a.daemon.reload_ok();
    assert_eq!(
        show(&client.read_line()),
        want(key, 1),
        "the old fetch answers its own request"
    );
    let mut c = redis.conn();
    assert_eq!(
        a.get(key),
        want(key, 2),
        "the old servers' answer was taken from Redis after the reload; Redis holds {:?}",
        c.get(&vkey("virtual", key)).map(|v| show(&v))
    );
    assert_eq!((old.requests(), new.requests()), (1, 1));
    wait_keys(&mut c, "httpmapd:v:*", 1);
    let stored = c.get(&vkey("virtual", key)).expect("the new value");
    assert!(
        stored.ends_with(format!("v2-{key}").as_bytes()),
        "{}",
        show(&stored)
    );
}

/// A lookup that waits for another node's fetch reads the key every 10 ms:
/// a stale value it finds is one stale hit, however many times it reads it.
#[test]
fn waiting_on_another_nodes_claim_counts_one_stale_hit() {
    let redis = Redis::start();
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.url()), &backend.url())
        .shared("claim_wait = \"300ms\"")
        .cache("stale_ttl = \"1h\"");
    let a = Node::start(&cfg);
    a.wait_connected();
    let key = "sam@example.com";
    let mut c = redis.conn();
    let stale = encode_value(Some(b"old"), unix_ms() - 1000, a.fingerprint("virtual"));
    c.ok(&[b"SET", &vkey("virtual", key), &stale, b"PX", b"3600000"]);
    // Another node holds the claim (and never writes).
    let claim = format!("httpmapd:l:virtual:{key}").into_bytes();
    c.ok(&[b"SET", &claim, b"another-node", b"PX", b"5000"]);
    assert_eq!(a.get(key), want(key, 1));
    assert_eq!(backend.requests(), 1);
    assert_eq!(
        a.metric("httpmapd_shared_cache_claims_total{result=\"lost\"}"),
        1.0
    );
    assert_eq!(a.metric("httpmapd_shared_cache_stale_total"), 1.0);
    assert_eq!(a.metric("httpmapd_shared_cache_misses_total"), 0.0);
    assert_eq!(a.metric("httpmapd_shared_cache_hits_total"), 0.0);
}

// ---------------------------------------------------------------------------
// Every value carries its map's configuration
// ---------------------------------------------------------------------------

/// Two nodes whose map `virtual` asks different servers (a fleet half way
/// through a change) share one Redis: neither answers with what the other's
/// servers said, fresh or stale, and `show` says whose the value is. A
/// reload that gives a node the other's servers makes their values its own.
#[test]
fn a_value_fetched_under_another_configuration_is_never_an_answer() {
    let redis = Redis::start();
    let old = Backend::start(Duration::ZERO);
    let new = Backend::start(Duration::ZERO);
    new.set_version(2);
    let cfg = |server: &Backend| {
        Cfg::new(Some(&redis.url()), &server.url())
            .cache("ttl = \"1h\"")
            .cache("stale_ttl = \"1h\"")
    };
    let a = Node::start(&cfg(&old));
    let b = Node::start(&cfg(&new));
    a.wait_connected();
    b.wait_connected();
    assert_ne!(a.fingerprint("virtual"), b.fingerprint("virtual"));
    let mut c = redis.conn();
    let key = "lee@example.com";
    assert_eq!(a.get(key), want(key, 1));
    wait_keys(&mut c, "httpmapd:v:*", 1);
    // Node b: the key is in Redis, but fetched from other servers.
    assert_eq!(b.get(key), want(key, 2));
    assert_eq!((old.requests(), new.requests()), (1, 1));
    assert_eq!(b.metric("httpmapd_shared_cache_hits_total"), 0.0);
    assert_eq!(b.metric("httpmapd_shared_cache_stale_total"), 0.0);
    assert_eq!(b.metric("httpmapd_shared_cache_misses_total"), 1.0);
    // b wrote its own value over a's: a's next miss of the key is b's
    // servers' answer for b only; a (L1 dropped by the invalidation, or
    // purged here) asks its own servers again.
    let stored = c.get(&vkey("virtual", key)).expect("b's value");
    assert!(stored.ends_with(format!("v2-{key}").as_bytes()));
    assert_eq!(
        &stored[10..18],
        &b.fingerprint("virtual").to_be_bytes(),
        "b's fingerprint"
    );
    let out = httpmapd(&["show", "-c", a.config_str(), "virtual", key]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.ends_with("shared\tother-configuration\n"),
        "{out:?}"
    );
    // A reload gives a b's servers: b's value in Redis is now a's answer.
    let text = std::fs::read_to_string(a.config()).unwrap();
    std::fs::write(a.config(), text.replace(&old.url(), &new.url())).unwrap();
    a.daemon.reload_ok();
    assert_eq!(a.fingerprint("virtual"), b.fingerprint("virtual"));
    assert_eq!(a.get(key), want(key, 2));
    assert_eq!((old.requests(), new.requests()), (1, 1), "from Redis");
    assert_eq!(a.metric("httpmapd_shared_cache_hits_total"), 1.0);
}

// ---------------------------------------------------------------------------
// 11. rediss://: the shared cache over TLS, against redis-server with TLS
// ---------------------------------------------------------------------------

/// `rediss://` with the test CA in `tls_ca_file`: every worker's connection
/// reaches the TLS port; two nodes share a value over it (the second node's
/// lookup is a shared-cache hit); `show` reads the shared value and `purge`
/// deletes it over the admin commands' own (blocking) TLS connection; the
/// purge reaches the other node through its TLS tracking connection; after
/// Redis restarts, every worker reconnects over TLS and sharing resumes.
#[test]
fn rediss_two_nodes_share_show_and_purge_over_tls() {
    let pki = RedisPki::new();
    let mut redis = Redis::start_tls(&pki, "optional");
    let backend = Backend::start(Duration::ZERO);
    let cfg = Cfg::new(Some(&redis.tls_url()), &backend.url())
        .shared(&pki.trust())
        .cache("ttl = \"1h\"");
    let a = Node::start(&cfg);
    let b = Node::start(&cfg);
    a.wait_connected();
    b.wait_connected();
    let mut c = redis.conn();
    redis.assert_daemon_clients_on_tls(&mut c, 4, "two workers per node");
    c.reset_stats();

    // Node a fetches the key; node b reads it from Redis.
    let k = "tess@example.com";
    assert_eq!(a.get(k), want(k, 1));
    assert_eq!(backend.requests(), 1);
    wait_keys(&mut c, "httpmapd:v:*", 1);
    assert_eq!(b.get("Tess@EXAMPLE.com"), want(k, 1));
    assert_eq!(backend.requests(), 1, "node b asked the server");
    // a's miss: GET, the claim, the value, the claim released; b's hit: GET
    // (the test's own KEYS aside).
    let daemons_commands = |c: &mut RespConn| {
        let mut stats = c.commandstats();
        stats.remove("keys");
        stats
    };
    let expected = stats_of(&[("get", 2), ("set", 2), ("unlink", 1)]);
    let mut stats = BTreeMap::new();
    wait_until(WAIT, || {
        stats = daemons_commands(&mut c);
        stats == expected
    });
    assert_eq!(stats, expected);
    let (ma, mb) = (a.metrics(), b.metrics());
    for (m, what, hits, misses, writes, won) in [
        (&ma, "node a", 0.0, 1.0, 1.0, 1.0),
        (&mb, "node b", 1.0, 0.0, 0.0, 0.0),
    ] {
        assert_eq!(
            (
                metric(m, "httpmapd_shared_cache_hits_total"),
                metric(m, "httpmapd_shared_cache_misses_total"),
                metric(m, "httpmapd_shared_cache_writes_total"),
                metric(m, "httpmapd_shared_cache_claims_total{result=\"won\"}"),
                metric(m, "httpmapd_shared_cache_connections"),
            ),
            (hits, misses, writes, won, 2.0),
            "{what}: hits, misses, writes, claims won, connections"
        );
        for kind in ["unavailable", "timeout", "reply", "protocol"] {
            let series = format!("httpmapd_shared_cache_errors_total{{kind=\"{kind}\"}}");
            assert_eq!(metric(m, &series), 0.0, "{what}: {series}");
        }
    }

    // show: the shared value, read over TLS (one HELLO, one GET).
    let show_b = |key: &str| httpmapd(&["show", "-c", b.config_str(), "virtual", key]);
    let out = show_b(k);
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:?}");
    let l = parse_show(&out.stdout);
    assert_eq!(l.len(), 2, "{out:?}");
    let value = "v1-tess@example.com";
    assert_show_line(&l[0], "in-process", "fresh", 3590.0, 3600.0, "found", value);
    assert_show_line(&l[1], "shared", "fresh", 3590.0, 3600.0, "found", value);
    let expected = stats_of(&[("get", 3), ("hello", 1), ("set", 2), ("unlink", 1)]);
    assert_eq!(daemons_commands(&mut c), expected, "show's commands");

    // purge on node a, over TLS: gone from a's L1 and from Redis, and (the
    // invalidation on b's TLS tracking connection) from b's L1.
    let out = httpmapd(&["purge", "-c", a.config_str(), "virtual", k]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (
            0,
            "dropped 1 entries from the in-process cache and 1 from the shared cache\n",
            ""
        ),
        "{out:?}"
    );
    assert_eq!(c.keys("httpmapd:*"), Vec::<String>::new());
    let mut last = None;
    let dropped = wait_until(WAIT, || {
        let out = show_b(k);
        let gone = out.stdout == "in-process\tabsent\nshared\tabsent\n";
        last = Some(out);
        gone
    });
    assert!(dropped, "node b still holds the purged key: {last:?}");
    assert!(b.metric("httpmapd_shared_cache_invalidations_total") >= 1.0);
    backend.set_version(2);
    assert_eq!(b.get(k), want(k, 2));
    assert_eq!(backend.requests(), 2);
    wait_keys(&mut c, "httpmapd:v:*", 1);
    assert_eq!(a.get(k), want(k, 2));
    assert_eq!(backend.requests(), 2, "node a asked the server");
    assert_eq!(a.metric("httpmapd_shared_cache_hits_total"), 1.0);

    // 100 more keys (10 not found): fetched by a, read by b over TLS.
    let keys = key_set("tls", 100);
    for key in &keys {
        assert_eq!(a.get(key), want(key, 2));
    }
    assert_eq!(backend.requests(), 102);
    wait_keys(&mut c, "httpmapd:v:*", 101);
    for key in &keys {
        assert_eq!(b.get(key), want(key, 2), "{key}");
    }
    assert_eq!(backend.requests(), 102, "node b asked the server");
    assert_eq!(b.metric("httpmapd_shared_cache_hits_total"), 101.0);
    for (n, what) in [(&a, "node a"), (&b, "node b")] {
        assert_eq!(n.down_lines(), 0, "{what}:\n{}", n.log());
    }

    // Redis restarted (empty, a new process: the TLS sessions the nodes
    // remember are unknown to it): every worker reconnects over TLS, one
    // line down and one up each, and sharing resumes.
    drop(c);
    redis.restart();
    for (n, what) in [(&a, "node a"), (&b, "node b")] {
        n.wait_connected();
        let up = wait_until(WAIT, || n.up_lines() == n.workers);
        assert!(up, "{what}:\n{}", n.log());
        assert_eq!(n.down_lines(), n.workers, "{what}:\n{}", n.log());
    }
    let mut c = redis.conn();
    redis.assert_daemon_clients_on_tls(&mut c, 4, "two workers per node");
    let k = "uma@example.com";
    assert_eq!(a.get(k), want(k, 2));
    assert_eq!(backend.requests(), 103);
    wait_keys(&mut c, "httpmapd:v:*", 1);
    assert_eq!(b.get(k), want(k, 2));
    assert_eq!(backend.requests(), 103, "node b asked the server");
    assert_eq!(b.metric("httpmapd_shared_cache_hits_total"), 102.0);

    for (n, what) in [(&a, "node a"), (&b, "node b")] {
        assert_no_password(&format!("{what}'s log"), &n.log());
    }
}

/// A node on `rediss://` whose TLS check of Redis fails (`tls`: its
/// `[shared_cache]` TLS lines): Redis trouble is only a miss. Every lookup
/// is answered from the servers (then L1), no connection is ever up, no
/// command reaches Redis, each worker logs one "is down" line with `reason`
/// (and no more as it retries), the admin commands fail naming Redis, and
/// the password shows nowhere; Redis hears the TLS alert `redis_hears`.
fn refused_over_tls(redis: &Redis, tls: &[String], reason: &str, redis_hears: &str) {
    let backend = Backend::start(Duration::ZERO);
    let mut cfg = Cfg::new(Some(&redis.tls_url()), &backend.url()).cache("ttl = \"1h\"");
    for l in tls {
        cfg = cfg.shared(l);
    }
    let mut c = redis.conn();
    c.reset_stats();
    let node = Node::start(&cfg);
    let line = format!(
        "httpmapd: warning: shared cache {} is down: TLS handshake: {reason}",
        redis.tls_described()
    );
    let logged = wait_until(WAIT, || count_lines(&node.log(), &[&line]) == node.workers);
    assert!(
        logged,
        "not one line per worker containing {line:?}:\n{}",
        lines_with(&node.log(), "shared cache")
    );
    // The workers told Redis why (the TLS alert), not just hung up (before
    // any admin command connects).
    assert!(
        wait_until(WAIT, || redis.log().contains(redis_hears)),
        "no {redis_hears:?} in the Redis log:\n{}",
        redis.log()
    );
    let keys = key_set("tls", 20);
    for k in &keys {
        assert_eq!(node.get(k), want(k, 1));
    }
    assert_eq!(backend.requests(), 20);
    for k in &keys {
        assert_eq!(node.get(k), want(k, 1));
    }
    assert_eq!(backend.requests(), 20, "asked again: L1 answers");
    // Retries (after 100, 300, 700 ms...) add no line.
    thread::sleep(Duration::from_millis(1000));
    let log = node.log();
    assert_eq!(node.down_lines(), node.workers, "{log}");
    assert_eq!(count_lines(&log, &[&line]), node.workers, "{log}");
    assert_eq!(node.up_lines(), 0, "{log}");
    let m = node.metrics();
    for (series, want) in [
        ("httpmapd_shared_cache_connections", 0.0),
        ("httpmapd_shared_cache_hits_total", 0.0),
        ("httpmapd_shared_cache_misses_total", 0.0),
        ("httpmapd_shared_cache_writes_total", 0.0),
        (
            "httpmapd_shared_cache_errors_total{kind=\"unavailable\"}",
            20.0,
        ),
    ] {
        assert_eq!(metric(&m, series), want, "{series}");
    }
    assert_eq!(c.commandstats(), BTreeMap::new(), "commands reached Redis");
    assert_eq!(c.daemon_clients(), Vec::new());

    // The admin commands' own connection fails the same way.
    let out = httpmapd(&["purge", "-c", node.config_str(), "virtual", &keys[0]]);
    eprintln!("purge: {out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("purged from this node's cache, but not from the shared cache")
            && out.stderr.contains(&redis.tls_described()),
        "{out:?}"
    );
    assert_no_password("purge's output", &format!("{}{}", out.stdout, out.stderr));
    let out = httpmapd(&["show", "-c", node.config_str(), "virtual", &keys[1]]);
    eprintln!("show: {out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&redis.tls_described()), "{out:?}");
    assert_no_password("show's output", &format!("{}{}", out.stdout, out.stderr));
    assert_no_password("the log", &node.log());
}

/// Redis's certificate is from a CA the node does not trust.
#[test]
fn rediss_with_an_unknown_ca_is_only_misses() {
    let pki = RedisPki::new();
    let redis = Redis::start_tls(&pki, "optional");
    refused_over_tls(
        &redis,
        &[setting("tls_ca_file", &pki.other_ca_file)],
        "unknown CA: the certificate is not signed by a trusted authority (tls_ca_file)",
        "alert unknown ca",
    );
}

/// Redis's certificate (for 127.0.0.1) does not name `tls_server_name`.
#[test]
fn rediss_with_a_name_mismatch_is_only_misses() {
    let pki = RedisPki::new();
    let redis = Redis::start_tls(&pki, "optional");
    refused_over_tls(
        &redis,
        &[pki.trust(), "tls_server_name = \"other.example\"".into()],
        "name mismatch: wanted other.example",
        "alert bad certificate",
    );
}

/// Redis with `--tls-auth-clients yes`: nodes with a client certificate
/// from the CA connect and share; a node without one is down (one line per
/// worker), its lookups answered from the servers.
#[test]
fn rediss_mutual_tls_with_and_without_a_client_certificate() {
    let pki = RedisPki::new();
    let redis = Redis::start_tls(&pki, "yes");
    let backend = Backend::start(Duration::ZERO);
    let anonymous = Cfg::new(Some(&redis.tls_url()), &backend.url())
        .shared(&pki.trust())
        .cache("ttl = \"1h\"");
    let [cert, key] = pki.identity();
    let identified = anonymous.clone().shared(&cert).shared(&key);
    let a = Node::start(&identified);
    let b = Node::start(&identified);
    let anon = Node::start(&anonymous);
    a.wait_connected();
    b.wait_connected();
    let ok = wait_until(WAIT, || anon.down_lines() == anon.workers);
    assert!(
        ok,
        "the node without a certificate is not down:\n{}",
        anon.log()
    );
    let mut c = redis.conn();
    redis.assert_daemon_clients_on_tls(&mut c, 4, "nodes a and b only");

    let k = "una@example.com";
    assert_eq!(a.get(k), want(k, 1));
    assert_eq!(backend.requests(), 1);
    wait_keys(&mut c, "httpmapd:v:*", 1);
    assert_eq!(b.get(k), want(k, 1));
    assert_eq!(backend.requests(), 1, "node b asked the server");
    assert_eq!(b.metric("httpmapd_shared_cache_hits_total"), 1.0);
    // The node without a certificate: from the servers.
    assert_eq!(anon.get(k), want(k, 1));
    assert_eq!(backend.requests(), 2);
    let keys = key_set("mtls", 10);
    for key in &keys {
        assert_eq!(anon.get(key), want(key, 1));
    }
    assert_eq!(backend.requests(), 12);
    let m = anon.metrics();
    for (series, want) in [
        ("httpmapd_shared_cache_connections", 0.0),
        ("httpmapd_shared_cache_hits_total", 0.0),
        ("httpmapd_shared_cache_writes_total", 0.0),
        (
            "httpmapd_shared_cache_errors_total{kind=\"unavailable\"}",
            11.0,
        ),
    ] {
        assert_eq!(metric(&m, series), want, "{series}");
    }
    assert_eq!(c.keys("httpmapd:v:*").len(), 1, "only node a wrote");

    // The admin connection presents the certificate too.
    let out = httpmapd(&["purge", "-c", a.config_str(), "virtual", k]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (
            0,
            "dropped 1 entries from the in-process cache and 1 from the shared cache\n"
        ),
        "{out:?}"
    );
    assert_eq!(c.keys("httpmapd:*"), Vec::<String>::new());
    // Without a certificate: Redis asks for one (the TLS 1.3 handshake
    // ends on the client's side first, so the alert comes with the answer
    // to HELLO).
    let out = httpmapd(&["purge", "-c", anon.config_str(), "virtual", k]);
    eprintln!("purge without a certificate: {out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("purged from this node's cache, but not from the shared cache")
            && out.stderr.contains(&redis.tls_described())
            && out
                .stderr
                .contains("the server requires a client certificate (tls_client_cert)"),
        "{out:?}"
    );
    assert_no_password("purge's output", &format!("{}{}", out.stdout, out.stderr));

    let log = anon.log();
    eprintln!("{}", lines_with(&log, "shared cache"));
    let line = format!("shared cache {} is down: ", redis.tls_described());
    assert_eq!(
        count_lines(
            &log,
            &[
                &line,
                "the server requires a client certificate (tls_client_cert)"
            ]
        ),
        anon.workers,
        "one line per worker naming the reason:\n{log}"
    );
    assert_eq!(anon.down_lines(), anon.workers, "{log}");
    for (n, what) in [(&a, "node a"), (&b, "node b"), (&anon, "anon")] {
        if what != "anon" {
            assert_eq!(n.down_lines(), 0, "{what}:\n{}", n.log());
        }
        assert_no_password(&format!("{what}'s log"), &n.log());
    }
}
