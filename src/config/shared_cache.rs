//! The `[shared_cache]` section: the Redis or Valkey server a fleet shares
//! as a second-level cache (`redis://[user:password@]host:port[/db]`,
//! `rediss://...` for TLS, `unix:/path[?db=N]`), the key prefix, the round
//! trip bound and the cold-key claim wait. The password is kept out of every
//! message.

use super::maps::{load_tls, tls_settings};
use super::raw::{Ctx, RawSharedCache};
use super::values::split_authority;
use super::{RedisAddr, RedisTarget, SharedCache};
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// Default bound on one round trip to the shared cache.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default wait for a cold key another node is fetching.
pub const DEFAULT_CLAIM_WAIT: Duration = Duration::from_millis(200);
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "httpmapd:";

pub(super) fn shared_cache(cx: &mut Ctx<'_>, s: Spanned<RawSharedCache>) -> Option<SharedCache> {
    let at = s.span().start;
    let s = s.into_inner();
    let Some(url) = s.url else {
        cx.err(
            at,
            "shared_cache: url is required (redis://host:port, rediss://..., unix:/path)",
        );
        return None;
    };
    let url_at = url.span().start;
    let (target, tls) = match parse_url(url.get_ref()) {
        Ok(t) => t,
        Err(e) => {
            cx.err(url_at, format!("shared_cache: url: {e}"));
            return None;
        }
    };
    let prefix = s
        .prefix
        .map_or(DEFAULT_PREFIX.to_string(), |p| p.into_inner());
    let timeout = cx.duration("timeout", s.timeout, DEFAULT_TIMEOUT);
    if timeout.is_zero() {
        cx.err(at, "shared_cache: timeout must be more than 0");
    }
    let claim_wait = cx.duration("claim_wait", s.claim_wait, DEFAULT_CLAIM_WAIT);
    let keys = [
        &s.tls_ca_file,
        &s.tls_server_name,
        &s.tls_client_cert,
        &s.tls_client_key,
    ];
    let settings = tls_settings(keys);
    let tls = if tls {
        match load_tls(&settings, keys) {
            Ok(c) => Some(c),
            Err(e) => {
                cx.err(
                    e.at.unwrap_or(url_at),
                    format!("shared_cache: {}: {}", e.key, e.message),
                );
                None
            }
        }
    } else {
        if settings != crate::tls::TlsSettings::default() {
            let first = keys
                .into_iter()
                .flatten()
                .map(|v| v.span().start)
                .min()
                .unwrap_or(at);
            cx.err(first, "shared_cache: tls_* settings need a rediss:// url");
        }
        None
    };
    let addrs = match &target.addr {
        RedisAddr::Tcp { host, port } => match crate::config::resolve(host, *port) {
            Ok(a) => a,
            Err(e) => {
                cx.err(url_at, format!("shared_cache: url: {e}"));
                return None;
            }
        },
        RedisAddr::Unix(_) => Vec::new(),
    };
    Some(SharedCache {
        target,
        prefix,
        timeout,
        claim_wait,
        tls,
        addrs,
    })
}

/// `redis://[user[:password]@]host[:port][/db]`, `rediss://...`,
/// `unix:/path[?db=N]` → the target and whether it is TLS. Errors never
/// quote the password.
pub fn parse_url(url: &str) -> Result<(RedisTarget, bool), String> {
    if let Some(rest) = url.strip_prefix("unix:") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err("unix: needs an absolute path".into());
        }
        let db = match query.strip_prefix("db=") {
            Some(n) => n.parse().map_err(|_| "unix:...?db=N: N is a number")?,
            None if query.is_empty() => 0,
            None => return Err("unix:/path takes only ?db=N".into()),
        };
        return Ok((
            RedisTarget {
                addr: RedisAddr::Unix(PathBuf::from(path)),
                user: None,
                password: None,
                db,
            },
            false,
        ));
    }
    let (tls, rest) = match (url.strip_prefix("redis://"), url.strip_prefix("rediss://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err("expected redis://host:port, rediss://host:port or unix:/path".into()),
    };
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (name, pass) = match u.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (u, None),
            };
            let name = (!name.is_empty()).then(|| percent_decode(name));
            (name, pass.map(percent_decode))
        }
    };
    let (authority, db) = match hostpart.split_once('/') {
        Some((a, "")) => (a, 0),
        Some((a, d)) => (
            a,
            d.parse()
                .map_err(|_| "the /db after the host is a number")?,
        ),
        None => (hostpart, 0),
    };
    let (host, port) = split_authority(authority, 6379).ok_or_else(|| {
        // split_authority refuses `:PORT` as it refuses a bad port.
        match authority.strip_prefix(':') {
            Some(p) if p.parse::<u16>().is_ok() => "no host",
            _ => "bad port",
        }
    })?;
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok((
        RedisTarget {
            addr: RedisAddr::Tcp { host, port },
            user,
            password,
            db,
        },
        tls,
    ))
}

/// `%XX` in the user or password of a URL (leniently, as a URL path's
/// `%XX`: a `%` that starts no escape is kept as written).
fn percent_decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    crate::codec::hex::decode_lenient(s.as_bytes(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (t, tls) = parse_url("redis://127.0.0.1:6380/2").unwrap();
        assert!(!tls);
        assert_eq!(
            t.addr,
            RedisAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 6380
            }
        );
        assert_eq!(t.db, 2);
        let (t, tls) = parse_url("rediss://app:s%40cret@cache.example:6379").unwrap();
        assert!(tls);
        assert_eq!(
            (t.user.as_deref(), t.password.as_deref()),
            (Some("app"), Some("s@cret"))
        );
        assert_eq!(t.describe(), "redis://app:***@cache.example:6379/0");
        assert!(!format!("{t:?}").contains("cret"));
        let (t, _) = parse_url("redis://:pw@h").unwrap();
        assert_eq!((t.user, t.password.as_deref(), t.db), (None, Some("pw"), 0));
        let (t, _) = parse_url("unix:/run/redis.sock?db=3").unwrap();
        assert_eq!(
            (t.addr, t.db),
            (RedisAddr::Unix("/run/redis.sock".into()), 3)
        );
        for bad in [
            "http://x",
            "redis://",
            "redis://h:port",
            "redis://h/x",
            "unix:rel",
            "unix:/p?x=1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        // An error never quotes the password.
        let e = parse_url("redis://u:topsecret@h:notaport").unwrap_err();
        assert!(!e.contains("topsecret"), "{e}");
    }

    #[test]
    fn hosts_and_ports() {
        let tcp = |url: &str| parse_url(url).map(|(t, _)| t.addr);
        let at = |host: &str, port| {
            Ok(RedisAddr::Tcp {
                host: host.into(),
                port,
            })
        };
        assert_eq!(tcp("redis://[::1]"), at("::1", 6379));
        assert_eq!(tcp("redis://[::1]:6380"), at("::1", 6380));
        assert_eq!(tcp("redis://[::1]/2"), at("::1", 6379));
        assert_eq!(
            tcp("rediss://u:p@[2001:db8::5]:7000/1"),
            at("2001:db8::5", 7000)
        );
        assert_eq!(tcp("redis://h"), at("h", 6379));
        assert_eq!(tcp("redis://h:1"), at("h", 1));
        assert_eq!(tcp("redis://h:1/"), at("h", 1));
        for (bad, why) in [
            ("redis://", "no host"),
            ("redis://:6379", "no host"),
            ("redis://[]", "no host"),
            ("redis://[]:6379", "no host"),
            ("redis://:", "bad port"),
            ("redis://:x", "bad port"),
            ("redis://h:", "bad port"),
            ("redis://h:port", "bad port"),
            ("redis://h:70000", "bad port"),
            ("redis://[::1]x", "bad port"),
            ("redis://[::1", "bad port"),
            ("redis://[::1]:", "bad port"),
        ] {
            assert_eq!(tcp(bad), Err(why.to_string()), "{bad}");
        }
    }

    #[test]
    fn user_and_password_escapes() {
        let login = |url: &str| {
            let (t, _) = parse_url(url).unwrap();
            (t.user, t.password)
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(login("redis://a%3Ab:c%40d%25@h"), (s("a:b"), s("c@d%")));
        // A '%' that starts no escape is kept as written: `%+1` is not 0x01,
        // and a '%' before a character that is not ASCII is no panic.
        assert_eq!(login("redis://u:%+1@h"), (s("u"), s("%+1")));
        assert_eq!(login("redis://u:%a\u{e9}@h"), (s("u"), s("%a\u{e9}")));
        assert_eq!(login("redis://u:%\u{e9}@h"), (s("u"), s("%\u{e9}")));
        assert_eq!(login("redis://%zz:100%@h"), (s("%zz"), s("100%")));
    }
}
