//! The `[maps.NAME]` sections: each map's servers, result mode, timeouts,
//! limits and cache lifetimes (defaults from `[cache]`), and the check that
//! no two listeners share an address.

use super::raw::{Ctx, RawMap};
use super::values::{parse_listen, parse_server_url};
use super::*;
use std::collections::BTreeMap;
use toml::Spanned;

/// Every `[maps.NAME]`, in name order, each with where its `tcp_listen` is.
pub(super) fn maps(
    cx: &mut Ctx<'_>,
    raw_maps: BTreeMap<String, Spanned<RawMap>>,
    cache: &Cache,
) -> Vec<(MapConfig, Option<usize>)> {
    raw_maps
        .into_iter()
        .map(|(name, m)| map(cx, "maps", name, m, cache))
        .collect()
}

/// One map, or a policy read as a map: `section` is the table it is in
/// (`maps`, `policies`), which errors name it by (`maps.NAME: ...`).
pub(super) fn map(
    cx: &mut Ctx<'_>,
    section: &str,
    name: String,
    m: Spanned<RawMap>,
    cache: &Cache,
) -> (MapConfig, Option<usize>) {
    let map_at = m.span().start;
    let m = m.into_inner();
    let label = format!("{section}.{name}");
    if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        cx.err(map_at, format!("map name {name:?}: must be printable ASCII without spaces (it is the socketmap name)"));
    }
    let tcp_listen_at = m.tcp_listen.as_ref().map(|v| v.span().start);
    let tcp_listen = m.tcp_listen.and_then(|v| match parse_listen(v.get_ref()) {
        Ok(l) => Some(l),
        Err(e) => {
            cx.err(v.span().start, format!("tcp_listen: {e}"));
            None
        }
    });
    let mut servers = Vec::new();
    match m.servers {
        None => cx.err(map_at, format!("{label}: servers is required")),
        Some(list) => {
            if list.get_ref().is_empty() {
                cx.err(list.span().start, format!("{label}: servers is empty"));
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
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(h) = m.headers {
        let at = h.span().start;
        for (k, v) in h.into_inner() {
            if let Err(e) = check_header("headers", &k, &v, &headers) {
                cx.err(at, e);
            } else {
                headers.push((k, v));
            }
        }
    }
    // Secrets kept out of this file: each value is a file's content,
    // trimmed (systemd's LoadCredential= puts them in such files).
    if let Some(h) = m.header_files {
        let at = h.span().start;
        for (k, path) in h.into_inner() {
            let value = match std::fs::read_to_string(&path) {
                Ok(v) => v.trim().to_string(),
                Err(e) => {
                    cx.err(at, format!("header_files: {k}: cannot read {path}: {e}"));
                    continue;
                }
            };
            if value.is_empty() {
                cx.err(at, format!("header_files: {k}: {path} is empty"));
            } else if let Err(e) = check_header("header_files", &k, &value, &headers) {
                // The message names the header, never its value.
                cx.err(at, e);
            } else {
                headers.push((k, value));
            }
        }
    }
    let tls = tls_client(
        cx,
        &label,
        map_at,
        [
            &m.tls_ca_file,
            &m.tls_server_name,
            &m.tls_client_cert,
            &m.tls_client_key,
        ],
        servers.iter().any(|s| s.tls),
    );
    // Where each timeout is written (the map's header when it is not).
    let span_of = |v: &Option<Spanned<toml::Value>>| v.as_ref().map_or(map_at, |v| v.span().start);
    let timeout_at = [
        span_of(&m.connect_timeout),
        span_of(&m.http_timeout),
        span_of(&m.lookup_timeout),
    ];
    let connect_timeout = cx.duration(
        "connect_timeout",
        m.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let http_timeout = cx.duration("http_timeout", m.http_timeout, DEFAULT_HTTP_TIMEOUT);
    let lookup_timeout = cx.duration("lookup_timeout", m.lookup_timeout, DEFAULT_LOOKUP_TIMEOUT);
    for ((k, d), at) in [
        ("connect_timeout", connect_timeout),
        ("http_timeout", http_timeout),
        ("lookup_timeout", lookup_timeout),
    ]
    .into_iter()
    .zip(timeout_at)
    {
        if d.is_zero() {
            cx.err(at, format!("{label}: {k} must be more than 0"));
        }
    }
    if lookup_timeout >= Duration::from_secs(100) {
        cx.err(
            timeout_at[2],
            format!("{label}: lookup_timeout must stay under Postfix's 100s client timeout"),
        );
    }
    let map = MapConfig {
        kind: MapKind::Table,
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
        tls,
        resolve_interval: cx.duration(
            "resolve_interval",
            m.resolve_interval,
            DEFAULT_RESOLVE_INTERVAL,
        ),
        require_key_echo: m.require_key_echo.unwrap_or(false),
        headers,
        separator: m.separator.unwrap_or_else(|| ", ".to_string()),
        allow_from: m.allow_from.map(|v| cx.cidrs(v)),
        name,
    };
    (map, tcp_listen_at)
}

/// Whether `name: value` may be sent as an extra request header. The error
/// names the header and the key it came from, never the value (a secret).
fn check_header(
    key: &str,
    name: &str,
    value: &str,
    so_far: &[(String, String)],
) -> Result<(), String> {
    let bad_name = name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let bad_value = value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
    let reserved = [
        "host",
        "connection",
        "postfix-dict-email",
        "content-length",
        "transfer-encoding",
    ]
    .contains(&name.to_ascii_lowercase().as_str());
    if bad_name || reserved {
        Err(format!("{key}: {name:?} is not an allowed request header"))
    } else if bad_value {
        Err(format!(
            "{key}: the value of {name:?} holds a line break or NUL"
        ))
    } else if so_far.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Err(format!("{key}: {name:?} is set twice"))
    } else {
        Ok(())
    }
}

/// A section's `tls_ca_file`, `tls_server_name`, `tls_client_cert` and
/// `tls_client_key`, as written (a map's, a policy's, `[shared_cache]`).
pub(super) type TlsKeys<'a> = [&'a Option<Spanned<String>>; 4];

/// The TLS settings `keys` give.
pub(super) fn tls_settings(keys: TlsKeys<'_>) -> crate::tls::TlsSettings {
    let [ca, server_name, cert, key] = keys;
    let path = |v: &Option<Spanned<String>>| v.as_ref().map(|v| PathBuf::from(v.get_ref()));
    crate::tls::TlsSettings {
        ca_file: path(ca),
        server_name: server_name.as_ref().map(|v| v.get_ref().clone()),
        client_cert: path(cert),
        client_key: path(key),
    }
}

/// Why the TLS settings of a section do not load, and which key it is about.
pub(super) struct TlsError {
    /// Where the key is written (`None`: it is not set).
    pub(super) at: Option<usize>,
    /// The key's name (`tls_ca_file`...).
    pub(super) key: &'static str,
    pub(super) setting: crate::tls::Setting,
    pub(super) message: String,
}

impl TlsError {
    /// The trust store in force is the system's (no `tls_ca_file`).
    pub(super) fn system_trust_store(&self) -> bool {
        self.at.is_none() && self.setting == crate::tls::Setting::CaFile
    }
}

/// Loads `settings`, read from `keys` by [`tls_settings`].
pub(super) fn load_tls(
    settings: &crate::tls::TlsSettings,
    keys: TlsKeys<'_>,
) -> Result<crate::tls::TlsClient, TlsError> {
    use crate::tls::Setting;
    crate::tls::load(settings).map_err(|(setting, message)| {
        let [ca, server_name, cert, key] = keys;
        let (v, key) = match setting {
            Setting::CaFile => (ca, "tls_ca_file"),
            Setting::ServerName => (server_name, "tls_server_name"),
            Setting::ClientCert => (cert, "tls_client_cert"),
            Setting::ClientKey => (key, "tls_client_key"),
        };
        TlsError {
            at: v.as_ref().map(|v| v.span().start),
            key,
            setting,
            message,
        }
    })
}

/// The map's TLS client, loaded when a server is `https://` or a `tls_*`
/// key is set; problems are reported on the key's line (`label`: the
/// section, `maps.NAME` or `policies.NAME`).
fn tls_client(
    cx: &mut Ctx<'_>,
    label: &str,
    map_at: usize,
    keys: TlsKeys<'_>,
    any_https: bool,
) -> Option<crate::tls::TlsClient> {
    let settings = tls_settings(keys);
    if !any_https && settings == crate::tls::TlsSettings::default() {
        return None;
    }
    match load_tls(&settings, keys) {
        Ok(c) => Some(c),
        Err(e) => {
            let what = if e.system_trust_store() {
                format!("{label}: the system trust store")
            } else {
                e.key.to_string()
            };
            cx.err(e.at.unwrap_or(map_at), format!("{what}: {}", e.message));
            None
        }
    }
}

/// Listener addresses must be distinct: each repeat is reported on its own
/// line. `listens`: every address with where it is written.
pub(super) fn check_listens(cx: &mut Ctx<'_>, listens: &[(&Listen, usize)]) {
    for (i, (l, at)) in listens.iter().enumerate() {
        if listens[..i].iter().any(|(o, _)| o == l) {
            cx.err(*at, format!("listen address {l} is used twice"));
        }
    }
}
