//! The configuration file: TOML text → a typed, validated [`Config`].
//!
//! This module owns parsing, defaults and validation, and the `FILE:LINE:
//! message` form of every error (so `httpmapd --check` and a refused reload
//! point at the line to fix). It resolves server host names once, here, so the
//! event loops never block on DNS. It never opens a listening socket.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

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
/// Default limit on a result taken from a server (header or body), in bytes.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;
/// Default byte budget of the cache (keys, values and per-entry overhead).
pub const DEFAULT_MAX_MEMORY_BYTES: usize = 256 << 20;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: Daemon,
    pub cache: Cache,
    /// Maps in name order; a map's index here is its id.
    pub maps: Vec<MapConfig>,
}

#[derive(Debug, Clone)]
pub struct Daemon {
    /// Event-loop threads (resolved: never 0).
    pub workers: usize,
    pub socketmap_listen: Vec<Listen>,
    pub stats_listen: Option<SocketAddr>,
    pub max_request_bytes: usize,
    pub log_level: crate::log::Level,
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
}

/// An address range, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or address/prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether `ip` may connect given `allow` (empty: anyone).
pub fn allowed(allow: &[Cidr], ip: std::net::IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|c| c.contains(ip))
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

#[derive(Debug, Clone)]
pub struct MapConfig {
    pub name: String,
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
    /// Client addresses allowed on `tcp_listen` (None: `[daemon] allow_from`).
    pub allow_from: Option<Vec<Cidr>>,
}

/// One HTTP server of a map, its address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The URL as written, for logs.
    pub url: String,
    pub addr: SocketAddr,
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
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
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

// ---- raw TOML shapes (spans kept for line numbers) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Option<RawDaemon>,
    cache: Option<RawCache>,
    maps: Option<BTreeMap<String, Spanned<RawMap>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    workers: Option<Spanned<i64>>,
    socketmap_listen: Option<Spanned<OneOrMany>>,
    stats_listen: Option<Spanned<String>>,
    max_request_bytes: Option<Spanned<i64>>,
    log_level: Option<Spanned<String>>,
    unix_socket_mode: Option<Spanned<String>>,
    unix_socket_owner: Option<Spanned<String>>,
    unix_socket_group: Option<Spanned<String>>,
    max_clients: Option<Spanned<i64>>,
    max_query_size: Option<Spanned<i64>>,
    max_reply_size: Option<Spanned<i64>>,
    allow_from: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entries: Option<Spanned<i64>>,
    max_memory: Option<Spanned<toml::Value>>,
    stale_negative: Option<bool>,
    ttl: Option<Spanned<toml::Value>>,
    negative_ttl: Option<Spanned<toml::Value>>,
    stale_ttl: Option<Spanned<toml::Value>>,
    refresh_ahead: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    tcp_listen: Option<Spanned<String>>,
    servers: Option<Spanned<Vec<Spanned<String>>>>,
    result: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<toml::Value>>,
    http_timeout: Option<Spanned<toml::Value>>,
    lookup_timeout: Option<Spanned<toml::Value>>,
    retry_interval: Option<Spanned<toml::Value>>,
    max_connections: Option<Spanned<i64>>,
    max_attempts: Option<Spanned<i64>>,
    max_queue: Option<Spanned<i64>>,
    max_result_bytes: Option<Spanned<i64>>,
    fold_case: Option<bool>,
    ttl: Option<Spanned<toml::Value>>,
    negative_ttl: Option<Spanned<toml::Value>>,
    stale_ttl: Option<Spanned<toml::Value>>,
    stale_negative: Option<bool>,
    require_key_echo: Option<bool>,
    headers: Option<Spanned<BTreeMap<String, String>>>,
    separator: Option<String>,
    allow_from: Option<Spanned<Vec<String>>>,
}

/// Parses a duration: "250ms", "3s", "5m", "1h", "2d", or a bare integer (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: expected a number with a unit such as \"250ms\", \"3s\", \"5m\", \"1h\""
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
    let ms_per_unit: u64 = match unit.trim() {
        "" | "s" => 1000,
        "ms" => 1,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {s:?}: too large"))
}

/// Parses a size in bytes: `"256MiB"`, `"64KiB"`, `"1GiB"`, `"1000000"` (bytes),
/// also `K`/`M`/`G` (binary, like `KiB`) and `KB`/`MB`/`GB` (decimal).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    let bad = || format!("invalid size {s:?}: expected a number with a unit such as \"256MiB\"");
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses a listen address: `host:port`, `[v6]:port`, or `unix:/path`.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("unix socket path must be absolute: {s:?}"));
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let s2 = s.strip_prefix("inet:").unwrap_or(s);
    s2.parse::<SocketAddr>()
        .map(Listen::Tcp)
        .map_err(|_| format!("invalid listen address {s:?}: expected IP:PORT (e.g. \"127.0.0.1:10021\") or unix:/path"))
}

/// Parses an `http://host[:port]/path` server URL and resolves its host.
pub fn parse_server_url(url: &str) -> Result<ServerConfig, String> {
    let rest = match url.strip_prefix("http://") {
        Some(r) => r,
        None if url.starts_with("https://") => {
            return Err(format!(
                "{url:?}: https is not supported; put a TLS-terminating proxy on the loopback"
            ))
        }
        None => return Err(format!("{url:?}: server URL must start with http://")),
    };
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?}: missing or unsupported host"));
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{url:?}: spaces or control characters in the path"));
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: cannot resolve {authority:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url:?}: {authority:?} resolves to no address"))?;
    Ok(ServerConfig {
        url: url.to_string(),
        addr,
        host: authority.to_string(),
        target_parts: target.split("{key}").map(str::to_string).collect(),
    })
}

/// A user (or with `group`, a group) name or number → its id.
fn lookup_id(name: &str, group: bool) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("{name:?}: invalid name"))?;
    // SAFETY: getpwnam/getgrnam take a valid C string; the result is read at once.
    unsafe {
        if group {
            let g = libc::getgrnam(c.as_ptr());
            if g.is_null() {
                return Err(format!("no group {name:?}"));
            }
            Ok((*g).gr_gid)
        } else {
            let p = libc::getpwnam(c.as_ptr());
            if p.is_null() {
                return Err(format!("no user {name:?}"));
            }
            Ok((*p).pw_uid)
        }
    }
}

/// Most problems one file reports before the rest is left unread.
const MAX_REPORTED_ERRORS: usize = 100;

/// Most maps one daemon serves (map ids are 16 bits in cache keys).
pub const MAX_MAPS: usize = 1024;

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
    fn err(&mut self, offset: usize, message: impl Into<String>) {
        let line = self.line_of(offset);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            message: message.into(),
        });
    }
    fn duration(
        &mut self,
        key: &str,
        v: Option<Spanned<toml::Value>>,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        let at = v.span().start;
        let r = match v.get_ref() {
            toml::Value::String(s) => parse_duration(s),
            toml::Value::Integer(i) if *i >= 0 => Ok(Duration::from_secs(*i as u64)),
            _ => Err("expected a duration such as \"3s\"".to_string()),
        };
        match r {
            Ok(d) => d,
            Err(e) => {
                self.err(at, format!("{key}: {e}"));
                default
            }
        }
    }
    fn size(&mut self, key: &str, v: Option<Spanned<toml::Value>>, default: usize) -> usize {
        let Some(v) = v else { return default };
        let at = v.span().start;
        let r = match v.get_ref() {
            toml::Value::String(s) => parse_size(s),
            toml::Value::Integer(i) if *i >= 0 => Ok(*i as usize),
            _ => Err("expected a size such as \"256MiB\"".to_string()),
        };
        match r {
            Ok(n) => n,
            Err(e) => {
                self.err(at, format!("{key}: {e}"));
                default
            }
        }
    }
    fn cidrs(&mut self, v: Spanned<Vec<String>>) -> Vec<Cidr> {
        let at = v.span().start;
        let mut out = Vec::new();
        for s in v.into_inner() {
            match Cidr::parse(&s) {
                Ok(c) => out.push(c),
                Err(e) => self.err(at, format!("allow_from: {e}")),
            }
        }
        out
    }
    fn count(
        &mut self,
        key: &str,
        v: Option<Spanned<i64>>,
        min: i64,
        max: i64,
        default: usize,
    ) -> usize {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            self.err(
                v.span().start,
                format!("{key}: {n} is out of range ({min}..={max})"),
            );
            return default;
        }
        n as usize
    }
}

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

    let d = raw.daemon.unwrap_or(RawDaemon {
        workers: None,
        socketmap_listen: None,
        stats_listen: None,
        max_request_bytes: None,
        log_level: None,
        unix_socket_mode: None,
        unix_socket_owner: None,
        unix_socket_group: None,
        max_clients: None,
        max_query_size: None,
        max_reply_size: None,
        allow_from: None,
    });
    let mut workers = cx.count("workers", d.workers, 0, 1024, 0);
    if workers == 0 {
        workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    let mut socketmap_listen = Vec::new();
    if let Some(v) = d.socketmap_listen {
        let at = v.span().start;
        let list = match v.into_inner() {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(l) => l,
        };
        for s in list {
            match parse_listen(&s) {
                Ok(l) => socketmap_listen.push(l),
                Err(e) => cx.err(at, format!("socketmap_listen: {e}")),
            }
        }
    }
    let stats_listen = d.stats_listen.and_then(|v| {
        let at = v.span().start;
        match parse_listen(v.get_ref()) {
            Ok(Listen::Tcp(a)) => Some(a),
            Ok(Listen::Unix(_)) => {
                cx.err(at, "stats_listen: must be IP:PORT");
                None
            }
            Err(e) => {
                cx.err(at, format!("stats_listen: {e}"));
                None
            }
        }
    });
    let max_request_bytes = cx.count(
        "max_request_bytes",
        d.max_request_bytes,
        64,
        1 << 20,
        DEFAULT_MAX_REQUEST_BYTES,
    );
    let log_level = match d.log_level {
        None => crate::log::Level::Info,
        Some(v) => match crate::log::Level::parse(v.get_ref()) {
            Some(l) => l,
            None => {
                cx.err(
                    v.span().start,
                    "log_level: expected \"error\", \"warn\", \"info\" or \"debug\"",
                );
                crate::log::Level::Info
            }
        },
    };

    let max_clients = cx.count(
        "max_clients",
        d.max_clients,
        1,
        10_000_000,
        DEFAULT_MAX_CLIENTS,
    );
    let allow_from = d.allow_from.map(|v| cx.cidrs(v)).unwrap_or_default();
    let max_query_size = cx.count(
        "max_query_size",
        d.max_query_size,
        16,
        1 << 20,
        crate::codec::netstring::DEFAULT_MAX_QUERY_BYTES,
    );
    let max_reply_size = cx.count(
        "max_reply_size",
        d.max_reply_size,
        16,
        1 << 24,
        crate::codec::netstring::DEFAULT_MAX_REPLY_BYTES,
    );
    let unix_socket_mode = match d.unix_socket_mode {
        None => 0o666,
        Some(v) => match u32::from_str_radix(v.get_ref().trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o7777 => m,
            _ => {
                cx.err(
                    v.span().start,
                    "unix_socket_mode: expected octal permissions such as \"0660\"",
                );
                0o666
            }
        },
    };
    let unix_socket_owner = d
        .unix_socket_owner
        .and_then(|v| match lookup_id(v.get_ref(), false) {
            Ok(id) => Some(id),
            Err(e) => {
                cx.err(v.span().start, format!("unix_socket_owner: {e}"));
                None
            }
        });
    let unix_socket_group = d
        .unix_socket_group
        .and_then(|v| match lookup_id(v.get_ref(), true) {
            Ok(id) => Some(id),
            Err(e) => {
                cx.err(v.span().start, format!("unix_socket_group: {e}"));
                None
            }
        });

    let c = raw.cache.unwrap_or(RawCache {
        max_entries: None,
        max_memory: None,
        stale_negative: None,
        ttl: None,
        negative_ttl: None,
        stale_ttl: None,
        refresh_ahead: None,
    });
    let refresh_ahead_percent = match c.refresh_ahead {
        None => 10,
        Some(v) => match v
            .get_ref()
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u32>().ok())
        {
            Some(p) if p < 100 => p,
            _ => {
                cx.err(
                    v.span().start,
                    "refresh_ahead: expected a percentage such as \"10%\" (0% = off)",
                );
                10
            }
        },
    };
    let max_memory_at = c.max_memory.as_ref().map_or(0, |v| v.span().start);
    let max_memory = cx.size("max_memory", c.max_memory, DEFAULT_MAX_MEMORY_BYTES);
    if max_memory < 1 << 20 {
        cx.err(max_memory_at, "max_memory: at least 1MiB");
    }
    let cache = Cache {
        max_memory,
        stale_negative: c.stale_negative.unwrap_or(false),
        max_entries: cx.count(
            "max_entries",
            c.max_entries,
            1,
            1 << 32,
            DEFAULT_MAX_ENTRIES,
        ),
        ttl: cx.duration("ttl", c.ttl, DEFAULT_TTL),
        negative_ttl: cx.duration("negative_ttl", c.negative_ttl, DEFAULT_NEGATIVE_TTL),
        stale_ttl: cx.duration("stale_ttl", c.stale_ttl, DEFAULT_STALE_TTL),
        refresh_ahead_percent,
    };

    let mut maps = Vec::new();
    let raw_maps = raw.maps.unwrap_or_default();
    if raw_maps.len() > MAX_MAPS {
        cx.err(0, format!("more than {MAX_MAPS} maps"));
    }
    if raw_maps.is_empty() {
        cx.err(
            text.len(),
            "no maps: add a [maps.NAME] section with servers = [...]",
        );
    }
    for (name, m) in raw_maps {
        let map_at = m.span().start;
        let m = m.into_inner();
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            cx.err(map_at, format!("map name {name:?}: must be printable ASCII without spaces (it is the socketmap name)"));
        }
        let tcp_listen = m.tcp_listen.and_then(|v| match parse_listen(v.get_ref()) {
            Ok(l) => Some(l),
            Err(e) => {
                cx.err(v.span().start, format!("tcp_listen: {e}"));
                None
            }
        });
        let mut servers = Vec::new();
        match m.servers {
            None => cx.err(map_at, format!("maps.{name}: servers is required")),
            Some(list) => {
                if list.get_ref().is_empty() {
                    cx.err(list.span().start, format!("maps.{name}: servers is empty"));
                }
                for s in list.into_inner() {
                    match parse_server_url(s.get_ref()) {
                        Ok(sc) => servers.push(sc),
                        Err(e) => cx.err(s.span().start, format!("servers: {e}")),
                    }
                }
            }
        }
        let result = match m.result {
            None => ResultMode::Header,
            Some(v) => match v.get_ref().as_str() {
                "header" => ResultMode::Header,
                "body" => ResultMode::Body,
                other if other.starts_with("json:") => {
                    let ptr = &other["json:".len()..];
                    if !(ptr.is_empty() || ptr.starts_with('/')) {
                        cx.err(
                            v.span().start,
                            format!("result: {other:?}: a JSON pointer is empty or starts with '/' (e.g. \"json:/result\")"),
                        );
                    }
                    ResultMode::Json(ptr.to_string())
                }
                other => {
                    cx.err(
                        v.span().start,
                        format!("result: unknown mode {other:?} (use \"header\", \"body\" or \"json:/pointer\")"),
                    );
                    ResultMode::Header
                }
            },
        };
        let mut headers = Vec::new();
        if let Some(h) = m.headers {
            let at = h.span().start;
            for (k, v) in h.into_inner() {
                let bad_name = k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                let bad_value = v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
                let reserved = [
                    "host",
                    "connection",
                    "postfix-dict-email",
                    "content-length",
                    "transfer-encoding",
                ]
                .contains(&k.to_ascii_lowercase().as_str());
                if bad_name || bad_value || reserved {
                    cx.err(
                        at,
                        format!("headers: {k:?} is not an allowed request header"),
                    );
                } else {
                    headers.push((k, v));
                }
            }
        }
        let connect_timeout = cx.duration(
            "connect_timeout",
            m.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let http_timeout = cx.duration("http_timeout", m.http_timeout, DEFAULT_HTTP_TIMEOUT);
        let lookup_timeout =
            cx.duration("lookup_timeout", m.lookup_timeout, DEFAULT_LOOKUP_TIMEOUT);
        for (k, d) in [
            ("connect_timeout", connect_timeout),
            ("http_timeout", http_timeout),
            ("lookup_timeout", lookup_timeout),
        ] {
            if d.is_zero() {
                cx.err(map_at, format!("maps.{name}: {k} must be more than 0"));
            }
        }
        if lookup_timeout >= Duration::from_secs(100) {
            cx.err(
                map_at,
                format!(
                    "maps.{name}: lookup_timeout must stay under Postfix's 100s client timeout"
                ),
            );
        }
        let map = MapConfig {
            tcp_listen,
            servers,
            result,
            connect_timeout,
            http_timeout,
            lookup_timeout,
            retry_interval: cx.duration("retry_interval", m.retry_interval, DEFAULT_RETRY_INTERVAL),
            max_connections: cx.count(
                "max_connections",
                m.max_connections,
                1,
                65536,
                DEFAULT_MAX_CONNECTIONS,
            ),
            max_attempts: cx.count(
                "max_attempts",
                m.max_attempts,
                1,
                100,
                DEFAULT_MAX_ATTEMPTS as usize,
            ) as u32,
            max_queue: cx.count("max_queue", m.max_queue, 0, 1 << 20, DEFAULT_MAX_QUEUE),
            max_result_bytes: cx.count(
                "max_result_bytes",
                m.max_result_bytes,
                1,
                16 << 20,
                DEFAULT_MAX_RESULT_BYTES,
            ),
            fold_case: m.fold_case.unwrap_or(true),
            ttl: cx.duration("ttl", m.ttl, cache.ttl),
            negative_ttl: cx.duration("negative_ttl", m.negative_ttl, cache.negative_ttl),
            stale_ttl: cx.duration("stale_ttl", m.stale_ttl, cache.stale_ttl),
            stale_negative: m.stale_negative.unwrap_or(cache.stale_negative),
            require_key_echo: m.require_key_echo.unwrap_or(false),
            headers,
            separator: m.separator.unwrap_or_else(|| ", ".to_string()),
            allow_from: m.allow_from.map(|v| cx.cidrs(v)),
            name,
        };
        maps.push(map);
    }

    // Listener addresses must be distinct.
    let mut seen: Vec<&Listen> = Vec::new();
    let all = socketmap_listen
        .iter()
        .chain(maps.iter().filter_map(|m| m.tcp_listen.as_ref()));
    let mut dups = Vec::new();
    for l in all {
        if seen.contains(&l) {
            dups.push(l.to_string());
        }
        seen.push(l);
    }
    for d in dups {
        cx.err(0, format!("listen address {d} is used twice"));
    }
    if cx.errors.is_empty()
        && socketmap_listen.is_empty()
        && maps.iter().all(|m| m.tcp_listen.is_none())
        && !maps.is_empty()
    {
        cx.err(
            0,
            "nothing to listen on: set tcp_listen in a map or socketmap_listen in [daemon]",
        );
    }

    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| e.line);
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        daemon: Daemon {
            workers,
            socketmap_listen,
            stats_listen,
            max_request_bytes,
            log_level,
            unix_socket_mode,
            unix_socket_owner,
            unix_socket_group,
            max_clients,
            max_query_size,
            max_reply_size,
            allow_from,
        },
        cache,
        maps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(m.servers[1].addr.port(), 8081);
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
        for s in ["", "s", "3x", "-1s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}
