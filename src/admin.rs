//! The admin socket (`[daemon] admin_socket`, a Unix socket; its file
//! permissions are the only authorization, nothing of this listens on TCP)
//! and the commands served on it: purge keys or whole maps from the cache
//! (and from the shared cache, so every node of a fleet drops them), show
//! what the caches hold for a key, dump every entry.
//!
//! One thread accepts and serves one client at a time (an operator's
//! command; each bounded by [`IO_TIMEOUT`]), blocking, off the event loops;
//! the shared cache is reached over a connection of its own
//! ([`crate::shared_cache::blocking`]).
//!
//! The protocol is lines. A request is one line of tab-separated fields,
//! each `%XX`-encoded as tcp_table keys are: `purge MAP KEY...`, `purge-map
//! MAP`, `purge-all`, `show MAP KEY`, `dump [MAP]`. The answer is data lines
//! starting with `d` and a tab, then one `ok` line (with counts) or one
//! `error` line with a message.

use crate::cache;
use crate::codec::hex;
use crate::codec::resp::Value;
use crate::shared_cache::blocking::Blocking;
use crate::shared_cache::value;
use crate::worker::Shared;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bound on reading a request and on each write of the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each exchange with the shared cache.
const SHARED_CACHE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request line.
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Keys deleted per `UNLINK` when a whole map goes.
const UNLINK_BATCH: usize = 500;

/// Serves the admin socket until the process ends.
pub fn spawn(listener: UnixListener, current: Arc<Mutex<Arc<Shared>>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(s) = conn else { continue };
                let shared = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Err(e) = serve(s, &shared) {
                    crate::warn!("admin socket: {e}");
                }
            }
        })
        .map(|_| ())
}

/// Splits a request line into its decoded fields.
pub fn decode_fields(line: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    line.split(|&b| b == b'\t')
        .map(|f| {
            let mut out = Vec::new();
            hex::decode(f, &mut out)
                .map(|()| out)
                .map_err(|e| format!("bad field: {e}"))
        })
        .collect()
}

/// Encodes fields into one request line (newline included).
pub fn encode_fields(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        hex::encode(f, &mut out);
    }
    out.push(b'\n');
    out
}

/// Data lines are written as they come (a dump streams).
type Emit<'a> = dyn FnMut(&[u8]) -> Result<(), String> + 'a;

fn serve(s: UnixStream, shared: &Shared) -> Result<(), String> {
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut line = Vec::new();
    r.by_ref()
        .take(MAX_REQUEST_BYTES as u64)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("read: {e}"))?;
    let mut w = std::io::BufWriter::new(&s);
    let result = if line.last() != Some(&b'\n') {
        Err("request too long or cut short".to_string())
    } else {
        line.pop();
        let mut emit = |d: &[u8]| -> Result<(), String> {
            w.write_all(b"d\t")
                .and_then(|()| w.write_all(d))
                .and_then(|()| w.write_all(b"\n"))
                .map_err(|e| format!("write: {e}"))
        };
        match decode_fields(&line) {
            Ok(fields) => run(shared, &fields, &mut emit),
            Err(e) => Err(e),
        }
    };
    let last = match result {
        Ok(t) => format!("ok\t{t}\n"),
        Err(e) => format!("error\t{}\n", e.replace(['\n', '\t'], " ")),
    };
    w.write_all(last.as_bytes()).map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())
}

/// The map id of `name`.
fn map_id(shared: &Shared, name: &[u8]) -> Result<u16, String> {
    shared
        .map_by_name
        .get(name)
        .copied()
        .ok_or_else(|| format!("no map {:?}", String::from_utf8_lossy(name)))
}

/// The shared cache's part of a purge, when there is a shared cache:
/// `purge` runs on a connection of its own, with the key prefix. Its
/// failure says that this node's part is done.
fn purge_shared(
    shared: &Shared,
    purge: impl FnOnce(&mut Blocking, &str) -> Result<usize, String>,
) -> Result<Option<usize>, String> {
    let Some(sc) = shared.cfg.shared_cache.as_ref() else {
        return Ok(None);
    };
    let unreachable =
        |e: String| format!("purged from this node's cache, but not from the shared cache: {e}");
    let mut c = Blocking::connect(sc, SHARED_CACHE_TIMEOUT).map_err(unreachable)?;
    purge(&mut c, &sc.prefix).map(Some).map_err(unreachable)
}

/// Runs one command; data lines go to `out`.
fn run(shared: &Shared, f: &[Vec<u8>], out: &mut Emit<'_>) -> Result<String, String> {
    let cmd = f.first().map(Vec::as_slice).unwrap_or_default();
    match cmd {
        b"purge" if f.len() >= 3 => {
            let id = map_id(shared, &f[1])?;
            let name = String::from_utf8_lossy(&f[1]).into_owned();
            let mcfg = shared.map(id).ok_or("map removed")?;
            let mut ckey = Vec::new();
            let mut fold = Vec::new();
            let mut l1 = 0;
            let mut keys = Vec::new();
            for k in &f[2..] {
                crate::worker::fold_key(k, mcfg.fold_case, &mut fold);
                cache::make_key(id, shared.gen(id), &fold, &mut ckey);
                l1 += usize::from(shared.cache.drop_key(&ckey));
                keys.push(fold.clone());
            }
            shared.stats.l2.purges.fetch_add(1, Ordering::Relaxed);
            let l2 = purge_shared(shared, |c, prefix| purge_keys(c, prefix, &name, &keys))?;
            Ok(counts(l1, l2))
        }
        b"purge-map" if f.len() == 2 => {
            let id = map_id(shared, &f[1])?;
            let name = String::from_utf8_lossy(&f[1]).into_owned();
            let l1 = shared.cache.map_len(id) as usize;
            shared.cache.purge_prefix(&id.to_be_bytes());
            shared.stats.l2.purges.fetch_add(1, Ordering::Relaxed);
            let l2 = purge_shared(shared, |c, prefix| purge_map(c, prefix, Some(&name)))?;
            Ok(counts(l1, l2))
        }
        b"purge-all" if f.len() == 1 => {
            let l1 = shared.cache.len();
            shared.cache.purge_prefix(&[]);
            shared.stats.l2.purges.fetch_add(1, Ordering::Relaxed);
            let l2 = purge_shared(shared, |c, prefix| purge_map(c, prefix, None))?;
            Ok(counts(l1, l2))
        }
        b"show" if f.len() == 3 => show(shared, &f[1], &f[2], out),
        b"dump" if f.len() <= 2 => dump(shared, f.get(1).map(Vec::as_slice), out),
        _ => Err(format!(
            "unknown request {:?} (purge, purge-map, purge-all, show, dump)",
            String::from_utf8_lossy(cmd)
        )),
    }
}

/// "in-process N" and, with a shared cache, "shared M".
fn counts(l1: usize, l2: Option<usize>) -> String {
    match l2 {
        Some(n) => format!("{l1}\t{n}"),
        None => format!("{l1}"),
    }
}

/// Deletes the value keys of `keys` (folded) in `map`, and their claims.
fn purge_keys(
    c: &mut Blocking,
    prefix: &str,
    map: &str,
    keys: &[Vec<u8>],
) -> Result<usize, String> {
    // `DEL` of the Redis key each of `keys` has under `key_of`.
    let del = |key_of: fn(&str, &str, &[u8], &mut Vec<u8>)| -> Vec<Vec<u8>> {
        let mut args = vec![b"DEL".to_vec()];
        for k in keys {
            let mut rk = Vec::new();
            key_of(prefix, map, k, &mut rk);
            args.push(rk);
        }
        args
    };
    // Their claims too: a later miss must not wait for a fetch in no one's hands.
    let claims = del(value::claim_key);
    let refs: Vec<&[u8]> = claims.iter().map(Vec::as_slice).collect();
    c.ok(&refs).map_err(|e| format!("shared cache: {e}"))?;
    let values = del(value::value_key);
    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    match c.ok(&refs).map_err(|e| format!("shared cache: {e}"))? {
        Value::Integer(n) => Ok(n.max(0) as usize),
        other => Err(format!("shared cache: unexpected answer to DEL: {other:?}")),
    }
}

/// Deletes every value key of `map` (every map: `None`) under the prefix.
fn purge_map(c: &mut Blocking, prefix: &str, map: Option<&str>) -> Result<usize, String> {
    let mut pattern = Vec::new();
    value::glob_escape(prefix.as_bytes(), &mut pattern);
    pattern.extend_from_slice(b"v:");
    if let Some(m) = map {
        value::glob_escape(m.as_bytes(), &mut pattern);
        pattern.push(b':');
    }
    pattern.push(b'*');
    let mut cursor = b"0".to_vec();
    let mut deleted = 0;
    loop {
        let answer = c
            .ok(&[b"SCAN", &cursor, b"MATCH", &pattern, b"COUNT", b"1000"])
            .map_err(|e| format!("shared cache: {e}"))?;
        let Value::Array(parts) = answer else {
            return Err("shared cache: unexpected answer to SCAN".into());
        };
        let (Some(next), Some(Value::Array(keys))) = (parts.first(), parts.get(1)) else {
            return Err("shared cache: unexpected answer to SCAN".into());
        };
        cursor = next.as_bytes().unwrap_or(b"0").to_vec();
        for chunk in keys.chunks(UNLINK_BATCH) {
            let mut args: Vec<&[u8]> = vec![b"UNLINK"];
            args.extend(chunk.iter().filter_map(Value::as_bytes));
            if args.len() > 1 {
                if let Value::Integer(n) = c.ok(&args).map_err(|e| format!("shared cache: {e}"))? {
                    deleted += n.max(0) as usize;
                }
            }
        }
        if cursor == b"0" {
            return Ok(deleted);
        }
    }
}

fn describe(value: Option<&[u8]>) -> (String, String) {
    match value {
        Some(v) => {
            let mut e = Vec::new();
            hex::encode(v, &mut e);
            ("found".into(), String::from_utf8_lossy(&e).into_owned())
        }
        None => ("not-found".into(), String::new()),
    }
}

/// `d` lines: `in-process STATE SECONDS_LEFT KIND VALUE` and `shared ...`
/// (STATE: fresh, stale, expired, absent).
fn show(shared: &Shared, map: &[u8], key: &[u8], out: &mut Emit<'_>) -> Result<String, String> {
    let id = map_id(shared, map)?;
    let mcfg = shared.map(id).ok_or("map removed")?;
    let ttls = shared.ttls(id);
    let mut fold = Vec::new();
    crate::worker::fold_key(key, mcfg.fold_case, &mut fold);
    let mut ckey = Vec::new();
    cache::make_key(id, shared.gen(id), &fold, &mut ckey);
    let now_ms = shared.cache.ms_at(std::time::Instant::now());
    let state = |left_ms: i64| {
        if left_ms > 0 {
            "fresh"
        } else if -left_ms < ttls.stale_ttl.as_millis() as i64 {
            "stale"
        } else {
            "expired"
        }
    };
    match shared.cache.peek(&ckey, now_ms) {
        Some((v, left)) => {
            let (kind, val) = describe(v.as_deref());
            out(format!(
                "in-process\t{}\t{:.3}\t{kind}\t{val}",
                state(left),
                left as f64 / 1000.0
            )
            .as_bytes())?;
        }
        None => out(b"in-process\tabsent")?,
    }
    if let Some(sc) = shared.cfg.shared_cache.as_ref() {
        let mut c = Blocking::connect(sc, SHARED_CACHE_TIMEOUT)?;
        let mut rk = Vec::new();
        value::value_key(&sc.prefix, &String::from_utf8_lossy(map), &fold, &mut rk);
        match c
            .ok(&[b"GET", &rk])
            .map_err(|e| format!("shared cache: {e}"))?
        {
            Value::Bulk(b) => match value::decode(&b) {
                Some(e) if e.fingerprint != shared.fingerprint(id) => {
                    out(b"shared\tother-configuration")?
                }
                Some(e) => {
                    let now_unix = value::unix_ms() as i64;
                    let left = e.fresh_until_unix_ms as i64 - now_unix;
                    let (kind, val) = describe(e.value.as_deref());
                    out(format!(
                        "shared\t{}\t{:.3}\t{kind}\t{val}",
                        state(left),
                        left as f64 / 1000.0
                    )
                    .as_bytes())?;
                }
                None => out(b"shared\tnot-ours")?,
            },
            _ => out(b"shared\tabsent")?,
        }
    }
    Ok(String::new())
}

/// `d` lines `MAP KEY VALUE SECONDS_LEFT` (value empty: not found), one
/// shard of the cache at a time.
fn dump(shared: &Shared, map: Option<&[u8]>, out: &mut Emit<'_>) -> Result<String, String> {
    let ids: Vec<u16> = match map {
        Some(m) => vec![map_id(shared, m)?],
        None => {
            let mut v: Vec<u16> = shared.map_by_name.values().copied().collect();
            v.sort_unstable();
            v
        }
    };
    let now_ms = shared.cache.ms_at(std::time::Instant::now());
    let mut n = 0;
    for id in ids {
        let name = shared.map(id).map_or_else(String::new, |m| m.name.clone());
        let mut failed = None;
        shared.cache.for_each(&id.to_be_bytes(), now_ms, |batch| {
            for (k, v, left) in batch {
                let mut line = Vec::new();
                line.extend_from_slice(name.as_bytes());
                line.push(b'\t');
                hex::encode(cache::lookup_key(k), &mut line);
                line.push(b'\t');
                if let Some(v) = v {
                    hex::encode(v, &mut line);
                }
                line.extend_from_slice(format!("\t{:.3}", *left as f64 / 1000.0).as_bytes());
                if let Err(e) = out(&line) {
                    failed = Some(e);
                    return false;
                }
                n += 1;
            }
            true
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(n.to_string())
}
