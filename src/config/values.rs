//! Parsers for single values: durations (humantime: `"250ms"`, `"1m30s"`; a
//! bare integer is seconds), sizes (`"256MiB"`), listen addresses, server
//! URLs (resolved here, never in an event loop), address ranges (ipnet),
//! user and group names. Each returns a message without a line: the caller
//! knows where the value is.

use super::{Listen, ServerConfig};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// An address range, `10.0.0.0/8` or a single address (an [`ipnet::IpNet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let t = s.trim();
        t.parse::<ipnet::IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(Cidr)
            .map_err(|_| format!("{s:?} is not an address or address/prefix"))
    }

    /// Whether `ip` is in the range; an IPv4-mapped IPv6 address
    /// (`::ffff:127.0.0.1`, as a dual-stack socket reports IPv4 clients)
    /// counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.0, ip) {
            (ipnet::IpNet::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        self.0.contains(&ip)
    }
}

/// Whether `ip` may connect given `allow` (empty: anyone).
pub fn allowed(allow: &[Cidr], ip: IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|c| c.contains(ip))
}

/// Parses a duration: `"250ms"`, `"3s"`, `"5m"`, `"1h"`, `"2d"`, compound
/// `"1m30s"` (humantime's syntax), or a bare integer (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // A bare integer is seconds, as in Postfix's main.cf.
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("invalid duration {s:?}: number too large"));
    }
    humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } => format!(
            "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d, e.g. \"1m30s\")"
        ),
        humantime::DurationError::NumberOverflow => format!("invalid duration {s:?}: too large"),
        e => format!(
            "invalid duration {s:?}: {e} (a number with a unit: \"250ms\", \"3s\", \"5m\", \"1h\", \"1m30s\")"
        ),
    })
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
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => {
            return Err(format!(
                "{url:?}: server URL must start with http:// or https://"
            ))
        }
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
    let default_port = if tls { 443 } else { 80 };
    let (host_name, port) = split_authority(authority, default_port)
        .ok_or_else(|| format!("{url:?}: bad host or port in {authority:?}"))?;
    let addrs = resolve(&host_name, port).map_err(|e| format!("{url:?}: {e}"))?;
    Ok(ServerConfig {
        url: url.to_string(),
        tls,
        host_name,
        port,
        addrs,
        host: authority.to_string(),
        target_parts: target.split("{key}").map(str::to_string).collect(),
    })
}

/// `host[:port]` or `[v6][:port]` → (host without brackets, port).
pub(super) fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), default_port)),
    }
}

/// Every address `host` resolves to (an IP literal is itself), at port
/// `port`, in the resolver's order without repeats. Blocking: never called
/// on an event loop.
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
    {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(format!("{host:?} resolves to no address"));
    }
    Ok(out)
}

/// A user (or with `group`, a group) name or number → its id.
pub(super) fn lookup_id(name: &str, group: bool) -> Result<u32, String> {
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
