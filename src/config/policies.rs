//! The `[policies.NAME]` sections: Postfix policy services
//! (`check_policy_service`) answered by HTTP servers. A policy service is a
//! map of its own kind ([`MapKind::Policy`]): the same servers, timeouts,
//! failover, headers and TLS settings as a map, read by the same code, plus
//! its listener, how the request is sent (`request`), how the action is read
//! (`result`), the `default_action` when no server gives one, and the
//! optional `cache_key`.

use super::maps::map;
use super::raw::{Ctx, RawMap, RawPolicy};
use super::*;
use std::collections::BTreeMap;
use toml::Spanned;

/// Largest reply body taken from a policy server.
pub const POLICY_MAX_REPLY_BYTES: usize = 64 * 1024;

/// The action when no server gives one, unless `default_action` says.
pub const DEFAULT_POLICY_ACTION: &str = "DEFER_IF_PERMIT Policy service unavailable";

/// Every `[policies.NAME]`, in name order, each with where its listener is.
pub(super) fn policies(
    cx: &mut Ctx<'_>,
    raw: BTreeMap<String, Spanned<RawPolicy>>,
    cache: &Cache,
) -> Vec<(MapConfig, Option<usize>)> {
    raw.into_iter()
        .map(|(name, p)| policy(cx, name, p, cache))
        .collect()
}

fn policy(
    cx: &mut Ctx<'_>,
    name: String,
    p: Spanned<RawPolicy>,
    cache: &Cache,
) -> (MapConfig, Option<usize>) {
    let span = p.span();
    let at = span.start;
    let p = p.into_inner();
    if p.listen.is_none() {
        cx.err(at, format!("policies.{name}: listen is required"));
    }
    let request = match p
        .request
        .as_ref()
        .map(|v| (v.get_ref().as_str(), v.span().start))
    {
        None | Some(("json", _)) => PolicyRequest::Json,
        Some(("form", _)) => PolicyRequest::Form,
        Some((other, at)) => {
            cx.err(
                at,
                format!("request: {other:?}: expected \"json\" or \"form\""),
            );
            PolicyRequest::Json
        }
    };
    let default_action = match &p.default_action {
        None => DEFAULT_POLICY_ACTION.to_string(),
        Some(v) => {
            if v.get_ref().is_empty() || !crate::codec::policy::valid_action(v.get_ref().as_bytes())
            {
                cx.err(
                    v.span().start,
                    "default_action: one line of printable text, e.g. \"DEFER_IF_PERMIT Service unavailable\"",
                );
            }
            v.get_ref().clone()
        }
    };
    if let Some(r) = &p.result {
        if r.get_ref() == "header" {
            cx.err(
                r.span().start,
                "result: a policy's action is its reply body (\"body\") or a JSON value (\"json:/pointer\")",
            );
        }
    }
    let max_request_bytes = cx.count(
        "max_request_bytes",
        p.max_request_bytes,
        256,
        1 << 20,
        crate::codec::policy::DEFAULT_MAX_REQUEST_BYTES,
    );
    let cache_key = p.cache_key.map(|v| v.into_inner()).unwrap_or_default();
    // Without cache_key every request is a key of its own: a ttl would fill
    // the cache with entries no request ever finds. (An invalid ttl is
    // reported as such by the map's reading below.)
    if let Some(t) = p.ttl.as_ref().filter(|_| cache_key.is_empty()) {
        let caches = match t.get_ref() {
            toml::Value::Integer(i) => *i > 0,
            toml::Value::String(s) => parse_duration(s).is_ok_and(|d| !d.is_zero()),
            _ => false,
        };
        if caches {
            cx.err(
                t.span().start,
                "ttl without cache_key caches nothing: set cache_key or remove ttl",
            );
        }
    }
    let zero = || Some(Spanned::new(at..at, toml::Value::String("0s".into())));
    let ttl = p.ttl.or_else(zero);
    // The rest is read as a map's (without the table-only keys).
    let raw = RawMap {
        tcp_listen: p.listen,
        servers: p.servers,
        result: p
            .result
            .or_else(|| Some(Spanned::new(at..at, "body".to_string()))),
        connect_timeout: p.connect_timeout,
        http_timeout: p.http_timeout,
        lookup_timeout: p.lookup_timeout,
        retry_interval: p.retry_interval,
        max_connections: p.max_connections,
        max_attempts: p.max_attempts,
        max_queue: p.max_queue,
        // The body may be larger than the action (JSON around it, a
        // trailing newline); the action itself is held to 4096 bytes.
        max_result_bytes: Some(Spanned::new(at..at, POLICY_MAX_REPLY_BYTES as i64)),
        fold_case: Some(false),
        negative_ttl: ttl.clone(),
        ttl,
        stale_ttl: zero(),
        stale_negative: None,
        require_key_echo: p.require_key_echo,
        headers: p.headers,
        header_files: p.header_files,
        tls_ca_file: p.tls_ca_file,
        tls_server_name: p.tls_server_name,
        tls_client_cert: p.tls_client_cert,
        tls_client_key: p.tls_client_key,
        resolve_interval: p.resolve_interval,
        separator: None,
        allow_from: p.allow_from,
    };
    let (mut m, listen_at) = map(cx, "policies", name, Spanned::new(span, raw), cache);
    m.kind = MapKind::Policy(PolicySettings {
        request,
        default_action,
        cache_key,
        max_request_bytes,
    });
    (m, listen_at)
}
