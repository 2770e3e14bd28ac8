//! The `[daemon]` section: threads, listeners, client limits, Unix socket
//! permissions, logging. Values are checked here and errors reported with
//! their line; nothing is bound or opened.

use super::raw::{Ctx, OneOrMany, RawDaemon};
use super::values::{lookup_id, parse_listen};
use super::{Daemon, Listen, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_REQUEST_BYTES};
use toml::Spanned;

/// The `[daemon]` section, and where its `socketmap_listen` is (for errors
/// about the addresses it lists).
pub(super) fn daemon(cx: &mut Ctx<'_>, d: Option<RawDaemon>) -> (Daemon, usize) {
    let d = d.unwrap_or_default();
    let mut workers = cx.count("workers", d.workers, 0, 1024, 0);
    if workers == 0 {
        workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    let mut socketmap_listen = Vec::new();
    let mut socketmap_at = 0;
    if let Some(v) = d.socketmap_listen {
        let at = v.span().start;
        socketmap_at = at;
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
    let unix_socket_mode = mode(cx, "unix_socket_mode", d.unix_socket_mode, 0o666);
    let unix_socket_owner = id(cx, "unix_socket_owner", d.unix_socket_owner, false);
    let unix_socket_group = id(cx, "unix_socket_group", d.unix_socket_group, true);
    let admin_socket = d.admin_socket.and_then(|v| {
        let p = std::path::PathBuf::from(v.get_ref());
        if p.is_absolute() {
            Some(p)
        } else {
            cx.err(
                v.span().start,
                "admin_socket: an absolute path, e.g. \"/run/httpmapd/admin.sock\"",
            );
            None
        }
    });
    let admin = crate::config::AdminSocket {
        path: admin_socket,
        mode: mode(cx, "admin_socket_mode", d.admin_socket_mode, 0o600),
        owner: id(cx, "admin_socket_owner", d.admin_socket_owner, false),
        group: id(cx, "admin_socket_group", d.admin_socket_group, true),
    };
    (
        Daemon {
            workers,
            socketmap_listen,
            stats_listen,
            max_request_bytes,
            log_level,
            log_timestamps: d.log_timestamps.unwrap_or(false),
            unix_socket_mode,
            unix_socket_owner,
            unix_socket_group,
            max_clients,
            max_query_size,
            max_reply_size,
            allow_from,
            admin,
        },
        socketmap_at,
    )
}

/// Octal permissions such as `"0660"`.
fn mode(cx: &mut Ctx<'_>, key: &str, v: Option<Spanned<String>>, default: u32) -> u32 {
    let Some(v) = v else { return default };
    match u32::from_str_radix(v.get_ref().trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 => m,
        _ => {
            cx.err(
                v.span().start,
                format!("{key}: expected octal permissions such as \"0660\""),
            );
            default
        }
    }
}

/// A user (`group`: a group) name or number, resolved now.
fn id(cx: &mut Ctx<'_>, key: &str, v: Option<Spanned<String>>, group: bool) -> Option<u32> {
    let v = v?;
    match lookup_id(v.get_ref(), group) {
        Ok(id) => Some(id),
        Err(e) => {
            cx.err(v.span().start, format!("{key}: {e}"));
            None
        }
    }
}
