//! The configuration file: TOML text → a typed, validated [`Config`].
//!
//! This module owns parsing, defaults and validation, and the `FILE:LINE:
//! message` form of every error (so `httpmapd --check` and a refused reload
//! point at the line to fix). It resolves server host names once, here, so the
//! event loops never block on DNS. It never opens a listening socket.

mod cache;
mod daemon;
mod maps;
mod policies;
mod raw;
mod shared_cache;
mod values;

pub use values::{
    allowed, parse_duration, parse_listen, parse_server_url, parse_size, resolve, Cidr,
};

use raw::{Ctx, RawConfig, MAX_REPORTED_ERRORS};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default number of cached entries for the whole daemon.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Default lifetime of a found result.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Default lifetime of a not-found result.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Default time past expiry during which an entry still answers when every server fails.
pub const DEFAULT_STALE_TTL: Duration = Duration::from_secs(3600);
/// Default bound on a TCP connect to a server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default bound on one HTTP request (one attempt at one server).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Default deadline for a whole lookup, all attempts included. Well under
/// Postfix's 100 s client timeout, so Postfix always gets our answer.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default rest of a failed server before it is tried again (doubles on
/// repeated failure, up to [`MAX_RETRY_INTERVAL_FACTOR`] times).
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Cap on the doubling of a failing server's rest, as a multiple of `retry_interval`.
pub const MAX_RETRY_INTERVAL_FACTOR: u32 = 8;
/// Default connections per server (for the whole daemon, shared among workers).
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;
/// Default number of server attempts per lookup.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default bound on lookups waiting for a connection to one server, per worker.
pub const DEFAULT_MAX_QUEUE: usize = 1024;
/// Default limit on a tcp_table request line, newline included.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4096;
/// Default interval between resolutions of a server's host name.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// Default limit on a result taken from a server (header or body), in bytes.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;
/// Default byte budget of the cache (keys, values and per-entry overhead).
pub const DEFAULT_MAX_MEMORY_BYTES: usize = 256 << 20;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: Daemon,
    pub cache: Cache,
    pub shared_cache: Option<SharedCache>,
    /// Maps in name order; a map's index here is its id.
    pub maps: Vec<MapConfig>,
    /// Policy services in name order.
    pub policies: Vec<MapConfig>,
}

#[derive(Debug, Clone)]
pub struct Daemon {
    /// Event-loop threads (resolved: never 0).
    pub workers: usize,
    pub socketmap_listen: Vec<Listen>,
    pub stats_listen: Option<SocketAddr>,
    pub max_request_bytes: usize,
    pub log_level: crate::log::Level,
    /// Start each log line with the time (off: journald and syslog add their own).
    pub log_timestamps: bool,
    /// Permissions of Unix listening sockets.
    pub unix_socket_mode: u32,
    /// Owner and group given to Unix listening sockets (resolved at load).
    pub unix_socket_owner: Option<u32>,
    pub unix_socket_group: Option<u32>,
    /// Client connections held at most (daemon-wide); past it, accepting pauses.
    pub max_clients: usize,
    /// socketmap: longest query payload accepted (Postfix's client sends at most 10000).
    pub max_query_size: usize,
    /// socketmap: longest reply payload sent (Postfix's client takes at most 100000).
    pub max_reply_size: usize,
    /// Client addresses allowed on TCP listeners (empty = any); a map's own
    /// `allow_from` overrides it for its `tcp_listen`.
    pub allow_from: Vec<Cidr>,
    pub admin: AdminSocket,
}

/// `admin_socket` and its permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSocket {
    pub path: Option<PathBuf>,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

/// `[shared_cache]`: the second-level cache shared by a fleet.
#[derive(Clone, PartialEq)]
pub struct SharedCache {
    pub target: RedisTarget,
    /// Prepended to every key (fleets and maps on one server never collide).
    pub prefix: String,
    /// One round trip; past it the shared cache counts as a miss.
    pub timeout: Duration,
    /// A cold key another node is already fetching is waited for this long
    /// (its value read from the shared cache) before this node fetches it
    /// too; zero: never wait (and take no claim).
    pub claim_wait: Duration,
    /// `rediss://`: TLS with these settings.
    pub tls: Option<crate::tls::TlsClient>,
    /// The server's addresses, resolved when the file was loaded (a TCP
    /// target; the workers never resolve).
    pub addrs: Vec<SocketAddr>,
}

/// Where the shared cache is and how to log in. The password is never
/// printed (see the `Debug` impl and [`RedisTarget::describe`]).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub addr: RedisAddr,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl SharedCache {
    /// The name TLS verifies (`rediss://` to a host): `tls_server_name`,
    /// else the URL's host. `None` without TLS.
    pub fn tls_name(&self) -> Option<rustls::pki_types::ServerName<'static>> {
        match (&self.tls, &self.target.addr) {
            (Some(tls), RedisAddr::Tcp { host, .. }) => Some(tls.name_for(host)),
            _ => None,
        }
    }
}

impl RedisTarget {
    /// The URL without the password, for logs and errors.
    pub fn describe(&self) -> String {
        let user = match (&self.user, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (Some(u), None) => format!("{u}@"),
            (None, Some(_)) => ":***@".to_string(),
            (None, None) => String::new(),
        };
        match &self.addr {
            RedisAddr::Tcp { host, port } => format!("redis://{user}{host}:{port}/{}", self.db),
            RedisAddr::Unix(p) => format!("unix:{} (db {})", p.display(), self.db),
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SharedCache({}, prefix {:?}, timeout {:?}, tls {})",
            self.target.describe(),
            self.prefix,
            self.timeout,
            self.tls.is_some()
        )
    }
}

/// Default bound on client connections.
pub const DEFAULT_MAX_CLIENTS: usize = 20_000;

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub max_entries: usize,
    /// Bytes the cache may hold: keys, values and per-entry overhead.
    pub max_memory: usize,
    /// Expired not-found entries answer during an outage (else: temporary error).
    pub stale_negative: bool,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_ttl: Duration,
    /// Percent of the TTL at its end during which a hit triggers a background refresh (0 = off).
    pub refresh_ahead_percent: u32,
}

/// How a server's reply carries the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultMode {
    /// dict_http: 2XX with `POSTFIX-DICT-RESULTS` (empty or missing = not found).
    Header,
    /// 200 body (trimmed) = value; empty body or 404 = not found. Several
    /// non-empty lines are several results, joined with the map's separator.
    Body,
    /// 200 body is JSON; the value at this JSON pointer (RFC 6901) is the
    /// result: a string, a number, or an array of them (joined with the
    /// separator). Missing, null, "" or [] = not found; 404 = not found.
    Json(String),
}

/// What a map answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapKind {
    /// A lookup table (tcp_table, socketmap): a key in, a value out.
    Table,
    /// A policy service (`[policies.NAME]`): Postfix's policy requests in,
    /// an action out.
    Policy(PolicySettings),
}

/// How a policy service asks its servers and answers Postfix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    pub request: PolicyRequest,
    /// The action when no server gives one (all down, errors, bad answers).
    pub default_action: String,
    /// Attributes whose values make the cache key (empty: never cached).
    pub cache_key: Vec<String>,
    /// Longest request accepted from Postfix.
    pub max_request_bytes: usize,
}

/// The body of a policy request to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyRequest {
    /// `application/json`: the attributes as an object of strings.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

#[derive(Debug, Clone)]
pub struct MapConfig {
    pub name: String,
    /// A lookup table or a policy service (a policy's listener is `tcp_listen`).
    pub kind: MapKind,
    pub tcp_listen: Option<Listen>,
    pub servers: Vec<ServerConfig>,
    pub result: ResultMode,
    pub connect_timeout: Duration,
    pub http_timeout: Duration,
    pub lookup_timeout: Duration,
    pub retry_interval: Duration,
    pub max_connections: usize,
    pub max_attempts: u32,
    pub max_queue: usize,
    pub max_result_bytes: usize,
    pub fold_case: bool,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_ttl: Duration,
    /// Expired not-found entries answer during an outage (else: temporary error).
    pub stale_negative: bool,
    /// A reply must echo the key in `POSTFIX-DICT-EMAIL` (an echo that differs
    /// is rejected either way).
    pub require_key_echo: bool,
    /// Extra request headers (e.g. Authorization). Never logged.
    pub headers: Vec<(String, String)>,
    /// Joins several results into one value (Postfix lists use ", ").
    pub separator: String,
    /// The TLS client for the map's `https://` servers (loaded when any
    /// server is `https://` or a `tls_*` key is set).
    pub tls: Option<crate::tls::TlsClient>,
    /// How often host names of servers are resolved again.
    pub resolve_interval: Duration,
    /// Client addresses allowed on `tcp_listen` (None: `[daemon] allow_from`).
    pub allow_from: Option<Vec<Cidr>>,
}

impl MapConfig {
    /// The name its ids, log lines and server metrics know it by: a
    /// table's own name, `policy:NAME` for a policy service (policies live
    /// apart from tables).
    pub fn id_name(&self) -> String {
        match self.kind {
            MapKind::Table => self.name.clone(),
            MapKind::Policy(_) => format!("policy:{}", self.name),
        }
    }

    /// A fingerprint of what makes this map's answers (its servers' URLs,
    /// in any order, how their replies are read, key folding): stored with
    /// every value in the shared cache, so a node whose map differs (a
    /// reload gave it other servers, a fleet half way through a change)
    /// never takes another configuration's answer. Stable across builds and
    /// nodes (FNV-1a over a fixed text); header values (secrets) are not in
    /// it.
    pub fn answers_fingerprint(&self) -> u64 {
        let mut urls: Vec<&str> = self.servers.iter().map(|s| s.url.as_str()).collect();
        urls.sort_unstable();
        let result = match &self.result {
            ResultMode::Header => "header".to_string(),
            ResultMode::Body => "body".to_string(),
            ResultMode::Json(p) => format!("json:{p}"),
        };
        let kind = match self.kind {
            MapKind::Table => "table",
            MapKind::Policy(_) => "policy",
        };
        let text = format!(
            "{kind}\n{}\n{result}\n{:?}\n{}",
            urls.join("\n"),
            self.separator,
            self.fold_case
        );
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
}

/// One HTTP server of a map, its address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The URL as written, for logs.
    pub url: String,
    /// `https://`: TLS to the server.
    pub tls: bool,
    /// The URL's host (a name or an IP, no brackets, no port): what is
    /// resolved, and what TLS verifies unless `tls_server_name` says otherwise.
    pub host_name: String,
    pub port: u16,
    /// Every address the host resolved to when the file was loaded (the
    /// resolver thread keeps them current: [`crate::backend::SharedServer`]).
    pub addrs: Vec<SocketAddr>,
    /// `Host` header value.
    pub host: String,
    /// Request target split at each `{key}`: the key goes between the parts.
    pub target_parts: Vec<String>,
}

/// A configuration error, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // About the file as a whole (it cannot be read, it has no maps...).
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one file (at least one).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Most maps and policy services together one daemon serves (map ids are
/// 16 bits in cache keys).
pub const MAX_MAPS: usize = 1024;

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&file, &text)
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx {
        file,
        text,
        errors: Vec::new(),
    };
    // Unknown keys are reported one by one: each is blanked out (same
    // offsets, so line numbers stay right) and the text parsed again, so
    // one typo does not hide the file's other problems.
    let mut work = text.to_string();
    let raw: RawConfig = loop {
        match toml::from_str(&work) {
            Ok(r) => break r,
            Err(e) => {
                let at = e.span().map(|s| s.start).unwrap_or(0);
                let msg = e.message().trim().to_string();
                let unknown = msg.starts_with("unknown field");
                cx.err(at, msg);
                if !unknown || cx.errors.len() >= MAX_REPORTED_ERRORS {
                    return Err(ConfigErrors(cx.errors));
                }
                let start = work[..at.min(work.len())].rfind('\n').map_or(0, |i| i + 1);
                let end = work[start..].find('\n').map_or(work.len(), |i| start + i);
                let blank = " ".repeat(end - start);
                work.replace_range(start..end, &blank);
            }
        }
    };

    let (daemon, socketmap_at) = daemon::daemon(&mut cx, raw.daemon);
    let cache = cache::cache(&mut cx, raw.cache);
    let shared_cache = raw
        .shared_cache
        .and_then(|s| shared_cache::shared_cache(&mut cx, s));
    let raw_maps = raw.maps.unwrap_or_default();
    let raw_policies = raw.policies.unwrap_or_default();
    if raw_maps.is_empty() && raw_policies.is_empty() {
        cx.err_file("no maps: add a [maps.NAME] section with servers = [...]");
    }
    // Maps and policy services share the ids (the daemon numbers both).
    if raw_maps.len() + raw_policies.len() > MAX_MAPS {
        cx.err_file(if raw_policies.is_empty() {
            format!("more than {MAX_MAPS} maps")
        } else {
            format!("more than {MAX_MAPS} maps and policy services together")
        });
    }
    let (maps, tcp_at): (Vec<MapConfig>, Vec<Option<usize>>) =
        maps::maps(&mut cx, raw_maps, &cache).into_iter().unzip();
    let (policies, policy_at): (Vec<MapConfig>, Vec<Option<usize>>) =
        policies::policies(&mut cx, raw_policies, &cache)
            .into_iter()
            .unzip();
    let listens: Vec<(&Listen, usize)> = daemon
        .socketmap_listen
        .iter()
        .map(|l| (l, socketmap_at))
        .chain(
            maps.iter()
                .chain(&policies)
                .zip(tcp_at.iter().chain(&policy_at))
                .filter_map(|(m, at)| Some((m.tcp_listen.as_ref()?, at.unwrap_or(0)))),
        )
        .collect();
    maps::check_listens(&mut cx, &listens);
    if cx.errors.is_empty()
        && daemon.socketmap_listen.is_empty()
        && maps.iter().chain(&policies).all(|m| m.tcp_listen.is_none())
    {
        cx.err_file(
            "nothing to listen on: set tcp_listen in a map or socketmap_listen in [daemon]",
        );
    }
    if !cx.errors.is_empty() {
        // Line by line, then what is about the whole file.
        cx.errors.sort_by_key(|e| (e.line == 0, e.line));
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        daemon,
        cache,
        shared_cache,
        maps,
        policies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fingerprint_follows_what_makes_answers() {
        let fp = |extra: &str| {
            let text =
                format!("[maps.m]\ntcp_listen = \"127.0.0.1:10099\"\nservers = [\"http://127.0.0.1:1/x\", \"http://127.0.0.2:2/x\"]\n{extra}\n");
            parse("f", &text).unwrap().maps[0].answers_fingerprint()
        };
        let base = fp("");
        // Stable: the same text gives the same number on every node.
        assert_eq!(base, fp(""));
        assert_eq!(base, fp("headers = { Authorization = \"Bearer secret\" }"));
        assert_eq!(base, fp("ttl = \"1h\""));
        for other in [
            "result = \"body\"",
            "result = \"json:/v\"",
            "separator = \";\"",
            "fold_case = false",
        ] {
            assert_ne!(base, fp(other), "{other}");
        }
        let servers = |list: &str| {
            let text = format!("[maps.m]\ntcp_listen = \"127.0.0.1:10099\"\nservers = [{list}]\n");
            parse("f", &text).unwrap().maps[0].answers_fingerprint()
        };
        assert_eq!(
            base,
            servers("\"http://127.0.0.2:2/x\", \"http://127.0.0.1:1/x\"")
        );
        assert_ne!(base, servers("\"http://127.0.0.1:1/x\""));
        assert_ne!(
            base,
            servers("\"http://127.0.0.1:1/x\", \"http://127.0.0.3:2/x\"")
        );
    }

    #[test]
    fn maps_and_policies_share_the_id_budget() {
        let sections = |maps: usize, policies: usize| {
            let mut t = String::new();
            for i in 0..maps {
                t += &format!("[maps.m{i}]\nservers = [\"http://127.0.0.1:9/\"]\n");
            }
            for i in 0..policies {
                t += &format!(
                    "[policies.p{i}]\nlisten = \"127.0.0.1:{}\"\nservers = [\"http://127.0.0.1:9/\"]\n",
                    20000 + i
                );
            }
            t
        };
        let half = MAX_MAPS / 2;
        assert!(parse("f", &sections(half, MAX_MAPS - half)).is_ok());
        let e = parse("f", &sections(half, MAX_MAPS - half + 1)).unwrap_err();
        assert_eq!(
            e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            [format!(
                "f: more than {MAX_MAPS} maps and policy services together"
            )]
        );
        let e = parse("f", &sections(MAX_MAPS + 1, 0)).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0]
            .to_string()
            .ends_with(&format!("more than {MAX_MAPS} maps")));
    }

    const GOOD: &str = r#"
[daemon]
workers = 2
socketmap_listen = "127.0.0.1:10020"

[cache]
max_entries = 1000
ttl = "5m"
negative_ttl = 60

[maps.virtual]
tcp_listen = "127.0.0.1:10021"
servers = ["http://127.0.0.1:8080/virtual", "http://localhost:8081/q?k={key}"]
result = "body"
connect_timeout = "250ms"
fold_case = false
"#;

    #[test]
    fn good_config() {
        let c = parse("t.toml", GOOD).unwrap();
        assert_eq!(c.daemon.workers, 2);
        assert_eq!(c.cache.negative_ttl, Duration::from_secs(60));
        let m = &c.maps[0];
        assert_eq!(m.name, "virtual");
        assert_eq!(m.result, ResultMode::Body);
        assert_eq!(m.connect_timeout, Duration::from_millis(250));
        assert_eq!(m.ttl, Duration::from_secs(300));
        assert!(!m.fold_case);
        assert_eq!(m.servers[0].target_parts, vec!["/virtual"]);
        assert_eq!(m.servers[0].host, "127.0.0.1:8080");
        assert_eq!(m.servers[1].target_parts, vec!["/q?k=", ""]);
        assert_eq!(m.servers[1].port, 8081);
        assert!(m.servers[1].addrs.iter().all(|a| a.port() == 8081));
        assert_eq!(m.servers[1].host_name, "localhost");
        assert!(!m.servers[1].tls);
    }

    fn first_error(text: &str) -> String {
        parse("t.toml", text).unwrap_err().0[0].to_string()
    }

    #[test]
    fn errors_have_lines() {
        let cases: &[(&str, &str)] = &[
            ("[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\nbogus = 1\n", "t.toml:4: unknown field `bogus`"),
            ("[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\nttl = \"5 parsecs\"\n", "t.toml:4: ttl: invalid duration"),
            ("[maps.v]\ntcp_listen = \"127.0.0.1:1\"\n\nservers = [\"ftp://x/\"]\n", "t.toml:4: servers: \"ftp://x/\""),
            ("[maps.v]\ntcp_listen = \"nowhere\"\nservers = [\"http://127.0.0.1:1/\"]\n", "t.toml:2: tcp_listen: invalid listen"),
            ("[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\nresult = \"xml\"\n", "t.toml:4: result: unknown mode"),
            ("[daemon]\nworkers = -1\n", "t.toml:2: workers: -1 is out of range"),
            ("[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\n\nlookup_timeout = \"0s\"\n", "t.toml:5: maps.v: lookup_timeout must be more than 0"),
            ("[maps.a]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\n[maps.b]\nservers = [\"http://127.0.0.1:1/\"]\ntcp_listen = \"127.0.0.1:1\"\n", "t.toml:6: listen address 127.0.0.1:1 is used twice"),
            ("[maps.v]\ntcp_listen = \"127.0.0.1:1\"\n", "t.toml:1: maps.v: servers is required"),
        ];
        for (text, want) in cases {
            let got = first_error(text);
            assert!(
                got.starts_with(want),
                "for {text:?}\n got {got}\nwant {want}"
            );
        }
    }

    #[test]
    fn cidrs() {
        use std::net::IpAddr;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (c, a, want) in [
            ("127.0.0.0/8", "127.1.2.3", true),
            ("127.0.0.0/8", "128.0.0.1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("::1", "::1", true),
            ("2001:db8::/32", "2001:db8:1::5", true),
            ("2001:db8::/32", "2001:db9::5", false),
            ("127.0.0.0/8", "::ffff:127.0.0.1", true),
        ] {
            assert_eq!(Cidr::parse(c).unwrap().contains(ip(a)), want, "{c} {a}");
        }
        for bad in ["", "10.0.0.0/33", "x/8", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "[daemon]\nwrkers = 2\n[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\nttl = \"5 parsecs\"\nbogus = 1\n";
        let errs: Vec<String> = parse("t.toml", text)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("t.toml:2: unknown field `wrkers`"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:6: ttl: invalid duration"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("t.toml:7: unknown field `bogus`"),
            "{errs:?}"
        );
    }

    #[test]
    fn result_modes() {
        let base = "[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\n";
        for (line, want) in [
            ("result = \"header\"", ResultMode::Header),
            ("result = \"body\"", ResultMode::Body),
            ("result = \"json:/a/0\"", ResultMode::Json("/a/0".into())),
            ("result = \"json:\"", ResultMode::Json(String::new())),
        ] {
            let c = parse("t.toml", &format!("{base}{line}\n")).unwrap();
            assert_eq!(c.maps[0].result, want, "{line}");
        }
        let e = parse("t.toml", &format!("{base}result = \"json:a\"\n")).unwrap_err();
        assert!(e.0[0].to_string().starts_with("t.toml:4: result:"), "{e}");
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("256MiB", 256 << 20),
            ("64KiB", 64 << 10),
            ("1GiB", 1 << 30),
            ("2M", 2 << 20),
            ("10MB", 10_000_000),
            ("1000", 1000),
            ("512 MiB", 512 << 20),
        ] {
            assert_eq!(parse_size(s).unwrap(), n, "{s}");
        }
        for s in [
            "",
            "MiB",
            "1.5GiB",
            "3 parsecs",
            "-1",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
        let base = "[maps.v]\ntcp_listen = \"127.0.0.1:1\"\nservers = [\"http://127.0.0.1:1/\"]\n";
        let c = parse("t.toml", &format!("[cache]\nmax_memory = \"8MiB\"\nstale_negative = true\n{base}require_key_echo = true\n")).unwrap();
        assert_eq!(c.cache.max_memory, 8 << 20);
        assert!(c.maps[0].stale_negative && c.maps[0].require_key_echo);
        let c = parse("t.toml", base).unwrap();
        assert_eq!(c.cache.max_memory, DEFAULT_MAX_MEMORY_BYTES);
        assert!(!c.maps[0].stale_negative && !c.maps[0].require_key_echo);
        let e = parse("t.toml", &format!("[cache]\nmax_memory = \"lots\"\n{base}")).unwrap_err();
        assert!(
            e.0[0]
                .to_string()
                .starts_with("t.toml:2: max_memory: invalid size"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("250ms", 250),
            ("3s", 3000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("7", 7000),
            ("0s", 0),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        for s in ["", "s", "3x", "-1s", "99999999999999999999d", "5 parsecs"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}
