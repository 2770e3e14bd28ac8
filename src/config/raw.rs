//! The raw shapes of the TOML file (every value with its span, for line
//! numbers) and the context that turns spans into `FILE:LINE: message`
//! errors while the sections are read.

use super::values::{parse_duration, parse_size, Cidr};
use super::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) daemon: Option<RawDaemon>,
    pub(super) cache: Option<RawCache>,
    pub(super) maps: Option<BTreeMap<String, Spanned<RawMap>>>,
    pub(super) shared_cache: Option<Spanned<RawSharedCache>>,
    pub(super) policies: Option<BTreeMap<String, Spanned<RawPolicy>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSharedCache {
    pub(super) url: Option<Spanned<String>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<toml::Value>>,
    pub(super) claim_wait: Option<Spanned<toml::Value>>,
    pub(super) tls_ca_file: Option<Spanned<String>>,
    pub(super) tls_server_name: Option<Spanned<String>>,
    pub(super) tls_client_cert: Option<Spanned<String>>,
    pub(super) tls_client_key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) socketmap_listen: Option<Spanned<OneOrMany>>,
    pub(super) stats_listen: Option<Spanned<String>>,
    pub(super) max_request_bytes: Option<Spanned<i64>>,
    pub(super) log_level: Option<Spanned<String>>,
    pub(super) log_timestamps: Option<bool>,
    pub(super) unix_socket_mode: Option<Spanned<String>>,
    pub(super) unix_socket_owner: Option<Spanned<String>>,
    pub(super) unix_socket_group: Option<Spanned<String>>,
    pub(super) max_clients: Option<Spanned<i64>>,
    pub(super) max_query_size: Option<Spanned<i64>>,
    pub(super) max_reply_size: Option<Spanned<i64>>,
    pub(super) allow_from: Option<Spanned<Vec<String>>>,
    pub(super) admin_socket: Option<Spanned<String>>,
    pub(super) admin_socket_mode: Option<Spanned<String>>,
    pub(super) admin_socket_owner: Option<Spanned<String>>,
    pub(super) admin_socket_group: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) max_entries: Option<Spanned<i64>>,
    pub(super) max_memory: Option<Spanned<toml::Value>>,
    pub(super) stale_negative: Option<bool>,
    pub(super) ttl: Option<Spanned<toml::Value>>,
    pub(super) negative_ttl: Option<Spanned<toml::Value>>,
    pub(super) stale_ttl: Option<Spanned<toml::Value>>,
    pub(super) refresh_ahead: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMap {
    pub(super) tcp_listen: Option<Spanned<String>>,
    pub(super) servers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) result: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<toml::Value>>,
    pub(super) http_timeout: Option<Spanned<toml::Value>>,
    pub(super) lookup_timeout: Option<Spanned<toml::Value>>,
    pub(super) retry_interval: Option<Spanned<toml::Value>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_attempts: Option<Spanned<i64>>,
    pub(super) max_queue: Option<Spanned<i64>>,
    pub(super) max_result_bytes: Option<Spanned<i64>>,
    pub(super) fold_case: Option<bool>,
    pub(super) ttl: Option<Spanned<toml::Value>>,
    pub(super) negative_ttl: Option<Spanned<toml::Value>>,
    pub(super) stale_ttl: Option<Spanned<toml::Value>>,
    pub(super) stale_negative: Option<bool>,
    pub(super) require_key_echo: Option<bool>,
    pub(super) headers: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) header_files: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) tls_ca_file: Option<Spanned<String>>,
    pub(super) tls_server_name: Option<Spanned<String>>,
    pub(super) tls_client_cert: Option<Spanned<String>>,
    pub(super) tls_client_key: Option<Spanned<String>>,
    pub(super) resolve_interval: Option<Spanned<toml::Value>>,
    pub(super) separator: Option<String>,
    pub(super) allow_from: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) servers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) request: Option<Spanned<String>>,
    pub(super) result: Option<Spanned<String>>,
    pub(super) default_action: Option<Spanned<String>>,
    pub(super) cache_key: Option<Spanned<Vec<String>>>,
    pub(super) ttl: Option<Spanned<toml::Value>>,
    pub(super) max_request_bytes: Option<Spanned<i64>>,
    pub(super) connect_timeout: Option<Spanned<toml::Value>>,
    pub(super) http_timeout: Option<Spanned<toml::Value>>,
    pub(super) lookup_timeout: Option<Spanned<toml::Value>>,
    pub(super) retry_interval: Option<Spanned<toml::Value>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_attempts: Option<Spanned<i64>>,
    pub(super) max_queue: Option<Spanned<i64>>,
    pub(super) require_key_echo: Option<bool>,
    pub(super) headers: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) header_files: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) tls_ca_file: Option<Spanned<String>>,
    pub(super) tls_server_name: Option<Spanned<String>>,
    pub(super) tls_client_cert: Option<Spanned<String>>,
    pub(super) tls_client_key: Option<Spanned<String>>,
    pub(super) resolve_interval: Option<Spanned<toml::Value>>,
    pub(super) allow_from: Option<Spanned<Vec<String>>>,
}

/// Most problems one file reports before the rest is left unread.
pub(super) const MAX_REPORTED_ERRORS: usize = 100;

pub(super) struct Ctx<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(super) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
    /// An error about the file as a whole (reported without a line).
    pub(super) fn err_file(&mut self, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: 0,
            message: message.into(),
        });
    }
    pub(super) fn err(&mut self, offset: usize, message: impl Into<String>) {
        let line = self.line_of(offset);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            message: message.into(),
        });
    }
    pub(super) fn duration(
        &mut self,
        key: &str,
        v: Option<Spanned<toml::Value>>,
        default: Duration,
    ) -> Duration {
        self.quantity(
            key,
            v,
            default,
            parse_duration,
            Duration::from_secs,
            "a duration such as \"3s\"",
        )
    }
    pub(super) fn size(
        &mut self,
        key: &str,
        v: Option<Spanned<toml::Value>>,
        default: usize,
    ) -> usize {
        self.quantity(
            key,
            v,
            default,
            parse_size,
            |n| n as usize,
            "a size such as \"256MiB\"",
        )
    }
    /// A duration or a size: a string `parse` reads, or a bare integer
    /// `from_int` takes (seconds, bytes); `expected` says what a value of
    /// another type should be. `default` when it is not set or is invalid
    /// (reported on its line).
    fn quantity<T>(
        &mut self,
        key: &str,
        v: Option<Spanned<toml::Value>>,
        default: T,
        parse: fn(&str) -> Result<T, String>,
        from_int: fn(u64) -> T,
        expected: &str,
    ) -> T {
        let Some(v) = v else { return default };
        let at = v.span().start;
        let r = match v.get_ref() {
            toml::Value::String(s) => parse(s),
            toml::Value::Integer(i) if *i >= 0 => Ok(from_int(*i as u64)),
            _ => Err(format!("expected {expected}")),
        };
        match r {
            Ok(n) => n,
            Err(e) => {
                self.err(at, format!("{key}: {e}"));
                default
            }
        }
    }
    pub(super) fn cidrs(&mut self, v: Spanned<Vec<String>>) -> Vec<Cidr> {
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
    pub(super) fn count(
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
