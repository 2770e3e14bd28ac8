//! One server connection's state machine: connect, write the `GET`, read
//! the head and the body, hand the reply to the fetch that wrote the
//! request, then go idle (back to the keep-alive pool, `super::pool`) or
//! close.
//!
//! A reply belongs to the request written on the connection, never to the
//! stream position: a pooled connection must hold no unread byte. Bytes (or
//! EOF) arriving on an idle connection close it at once, and before a pooled
//! connection is reused a non-blocking check sees that nothing waits on it
//! (on TLS, nothing rustls already decrypted; then one `recv(MSG_PEEK)`). A
//! reply that echoes a key (`POSTFIX-DICT-EMAIL`) other than the one sent is
//! rejected, as is a reply on a reused connection followed by more bytes
//! when nothing proves whose it is. A rejected reply closes the connection
//! and the lookup goes on (a fresh connection to the same server once, then
//! the other servers), counted as a protocol error of the server but not a
//! reason to rest it.
//!
//! The bytes travel over a [`Transport`]: plain TCP, or TLS on the same
//! socket (the handshake is a state of its own, within `connect_timeout`).
//! A connect or handshake that fails on one of the server's addresses rests
//! that address and tries the next; the server fails only when all did.
//! A retry on a fresh connection (or the next address) takes the slot the
//! failed connection left; no other fetch gets it in between, so the
//! server's connection limit holds and nothing connects to the failed
//! address before it rests.
//!
//! Everything here is `impl Backend`: the connections live in the backend's
//! slab, and an attempt's end is reported to its fetch ([`super`]).

use super::result::evaluate;
use super::{Backend, FetchRef, Outcome};
use crate::codec::http::{self, BodyDecoder, Head, HttpError, NoReuse, MAX_HEAD_BYTES};
use crate::config::{MapKind, PolicyRequest, ResultMode};
use crate::log::RateLimit;
use crate::transport::{self, Transport};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

static LOG_PROTOCOL: RateLimit = RateLimit::new(Duration::from_secs(10));
/// Bytes of a stray reply quoted in its log line.
const STRAY_QUOTE_BYTES: usize = 40;

// The connection lives in the backend's slab: a boxed head would cost an
// allocation per reply for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum ConnState {
    /// The TCP connect is in progress.
    Connecting,
    /// TLS: the handshake is in progress (still within `connect_timeout`).
    Handshaking,
    Sending,
    Head,
    Body {
        head: Head,
        dec: BodyDecoder,
    },
    Idle,
}

pub(super) struct Conn {
    pub(super) io: Transport,
    /// The id of the policy request on it, in 16 hex digits as sent (and
    /// echoed) in `POSTFIX-POLICY-ID`.
    request_id: [u8; 16],
    /// The server address this connection went to, and the generation of
    /// the server's addresses it was last checked against.
    pub(super) addr: SocketAddr,
    pub(super) addrs_gen: u64,
    pub(super) server: usize,
    pub(super) state: ConnState,
    /// Served a request before: an early EOF may just be the server's idle close.
    reused: bool,
    rbuf: Vec<u8>,
    /// How far `rbuf` was searched for the end of the head (so a trickled
    /// head is scanned once, not once per read).
    head_scanned: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    body: Vec<u8>,
    pub(super) fetch: Option<FetchRef>,
    /// When the current request was handed to this connection.
    started: Instant,
    /// An event said the server closed its side (its FIN may be queued
    /// behind the reply, and no new edge will come for it).
    pub(super) peer_closed: bool,
}

/// A server breaking the protocol in a way that could put one key's answer
/// on another key's lookup (the metric's `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// Bytes on an idle connection, or after a reply on a reused one.
    StrayBytes,
    /// The reply echoes another key than the one sent.
    EchoMismatch,
    /// No echo, with `require_key_echo`.
    EchoMissing,
}

/// How an attempt on a connection failed.
pub(super) enum Failure {
    /// A pooled connection was closed by the server before it answered.
    StalePooled,
    /// Counts against the server: it rests.
    Server(String),
    /// The server answered, but not with a result (e.g. 503): fail over, no rest.
    Answer(String),
    /// The reply cannot be trusted to be this request's: rejected, the
    /// connection closed, the lookup tried again (fresh connection once).
    Protocol(ProtocolError, String),
    /// The whole lookup's deadline passed first: not the server's fault.
    Deadline,
}

/// A key as log lines quote it: lossy UTF-8, at most a few dozen bytes.
pub(super) fn quote(b: &[u8]) -> String {
    let cut = &b[..b.len().min(STRAY_QUOTE_BYTES)];
    let more = if b.len() > cut.len() { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(cut))
}

/// The header by which a reply proves which request it answers.
#[derive(Clone, Copy)]
enum Echo {
    /// `POSTFIX-DICT-EMAIL`: a table's key.
    Key,
    /// `POSTFIX-POLICY-ID`: a policy request's id.
    PolicyId,
}

impl Echo {
    /// Why a reply echoing `echo` is rejected when `sent` was sent.
    fn mismatch(self, echo: &[u8], sent: &[u8]) -> String {
        match self {
            Echo::Key => format!(
                "reply rejected: it echoes key {} but {} was asked; closed the connection",
                quote(echo),
                quote(sent)
            ),
            Echo::PolicyId => format!(
                "reply rejected: it echoes policy request id {} but {} was sent; closed the connection",
                quote(echo),
                String::from_utf8_lossy(sent)
            ),
        }
    }

    /// Why a reply without the echo is rejected (`require_key_echo`).
    fn missing(self) -> &'static str {
        match self {
            Echo::Key => "reply rejected: no POSTFIX-DICT-EMAIL key echo (require_key_echo); closed the connection",
            Echo::PolicyId => "reply rejected: no POSTFIX-POLICY-ID echo (require_key_echo); closed the connection",
        }
    }
}

/// A policy request id in 16 lower-case hex digits (as `{:016x}`).
fn hex_id(id: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0; 16];
    for (i, d) in out.iter_mut().enumerate() {
        *d = HEX[(id >> (60 - 4 * i)) as usize & 0xf];
    }
    out
}

impl Conn {
    /// Back to idle after a reply: no fetch, nothing read.
    pub(super) fn park(&mut self) {
        self.state = ConnState::Idle;
        self.reused = true;
        self.fetch = None;
        self.rbuf.clear();
        self.head_scanned = 0;
    }
}

impl Backend {
    /// Opens a connection to `server` for fetch `f` (on the next address
    /// not tried in this attempt). The caller has checked that `server` has
    /// a free slot (`assign`, [`Backend::slot_freed`]).
    pub(super) fn connect(
        &mut self,
        registry: &Registry,
        f: FetchRef,
        server: usize,
        now: Instant,
    ) {
        let now_ms = self.ms_at(now);
        let shared = self.servers[server].shared.clone();
        let tried = self
            .fetch_mut(f)
            .map(|x| x.addrs_tried.clone())
            .unwrap_or_default();
        let Some(addr) = shared.pick_addr(now_ms, &tried) else {
            // Every address failed in this attempt.
            self.server_failed(server, "no address left to try", now);
            self.retry_elsewhere(f, format!("{}: every address failed", shared.cfg.url));
            return;
        };
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                self.connect_failed(registry, f, server, addr, format!("connect: {e}"), now);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut io = match &shared.tls {
            None => Transport::Plain(stream),
            Some(t) => match Transport::tls(stream, t.config.clone(), t.name.clone()) {
                Ok(io) => io,
                Err(e) => {
                    self.connect_failed(registry, f, server, addr, format!("TLS: {e}"), now);
                    return;
                }
            },
        };
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        if let Err(e) = registry.register(
            io.socket(),
            Token(self.token_base + idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            crate::error!("cannot register a server connection: {e}");
            self.retry_elsewhere(f, format!("internal error: {e}"));
            return;
        }
        entry.insert(Conn {
            io,
            request_id: [b'0'; 16],
            addr,
            addrs_gen: shared.addrs_gen(),
            server,
            state: ConnState::Connecting,
            reused: false,
            rbuf: Vec::new(),
            head_scanned: 0,
            wbuf: Vec::new(),
            wpos: 0,
            body: Vec::new(),
            fetch: Some(f),
            started: now,
            peer_closed: false,
        });
        self.servers[server].open += 1;
        shared.counters.connects.fetch_add(1, Ordering::Relaxed);
        shared.open.fetch_add(1, Ordering::Relaxed);
        let connect_timeout = self.map_of(server).connect_timeout;
        self.activate(f, idx, now + connect_timeout);
        if !self.fill_request(idx, f, now) {
            self.close_conn(registry, idx, now);
        }
    }

    /// Writes the request of fetch `f` into `conn`'s write buffer. False if
    /// the key cannot go into a header (the fetch is finished with a reason).
    fn fill_request(&mut self, conn: usize, f: FetchRef, now: Instant) -> bool {
        // The fields, not `self.fetch(f)`: the connection and buffers are
        // written while the key is read.
        let Some(fetch) = self.fetches.get(f.idx).filter(|x| x.gen == f.gen) else {
            return false;
        };
        let c = &mut self.conns[conn];
        let srv = &self.servers[c.server];
        let map = &self.maps[srv.map as usize].cfg;
        let cfg = &srv.shared.cfg;
        let target = &mut self.target_buf;
        target.clear();
        let policy = match &map.kind {
            MapKind::Policy(p) => Some(p.request),
            MapKind::Table => None,
        };
        for (i, part) in cfg.target_parts.iter().enumerate() {
            if i > 0 && policy.is_none() {
                http::percent_encode_into(&fetch.key, target);
            }
            target.extend_from_slice(part.as_bytes());
        }
        c.wbuf.clear();
        c.wpos = 0;
        c.rbuf.clear();
        c.head_scanned = 0;
        c.body.clear();
        c.fetch = Some(f);
        c.started = now;
        let written = match policy {
            None => http::write_get(&mut c.wbuf, target, &cfg.host, &fetch.key, &map.headers),
            Some(request) => {
                // A fresh id per request: the echo proves whose reply it is.
                c.request_id = hex_id(fastrand::u64(..));
                let content_type = match request {
                    PolicyRequest::Json => "application/json",
                    PolicyRequest::Form => "application/x-www-form-urlencoded",
                };
                http::write_post(
                    &mut c.wbuf,
                    target,
                    &cfg.host,
                    content_type,
                    std::str::from_utf8(&c.request_id).expect("hex digits"),
                    &fetch.key,
                    &map.headers,
                )
            }
        };
        if written.is_err() {
            c.fetch = None;
            self.finish(
                f,
                Outcome::Temp(
                    "key contains CR, LF or NUL: it cannot be sent in an HTTP header".into(),
                ),
            );
            return false;
        }
        true
    }

    /// Starts fetch `f` on the idle pooled connection `conn` (checked clean).
    pub(super) fn send(&mut self, registry: &Registry, conn: usize, f: FetchRef, now: Instant) {
        let http_timeout = self.map_of(self.conns[conn].server).http_timeout;
        self.activate(f, conn, now + http_timeout);
        if !self.fill_request(conn, f, now) {
            self.make_idle(registry, conn, now);
            return;
        }
        self.conns[conn].state = ConnState::Sending;
        self.drive(registry, conn, now);
    }

    /// Counts and logs a protocol error of `server`.
    pub(super) fn protocol_error(&self, server: usize, kind: ProtocolError, why: &str) {
        let shared = &self.servers[server].shared;
        let c = &shared.counters;
        match kind {
            ProtocolError::StrayBytes => &c.stray_bytes,
            ProtocolError::EchoMismatch => &c.echo_mismatch,
            ProtocolError::EchoMissing => &c.echo_missing,
        }
        .fetch_add(1, Ordering::Relaxed);
        if let Some(n) = LOG_PROTOCOL.check() {
            crate::warn!(
                "server {} (map {}): {why} ({n} similar not logged)",
                shared.cfg.url,
                shared.map_name
            );
        }
    }

    /// A readiness event for one of this backend's connections.
    pub(super) fn conn_event(
        &mut self,
        registry: &Registry,
        idx: usize,
        closed: bool,
        now: Instant,
    ) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        c.peer_closed |= closed;
        self.drive(registry, idx, now);
    }

    /// Advances `conn` as far as its socket allows.
    fn drive(&mut self, registry: &Registry, idx: usize, now: Instant) {
        loop {
            let c = &mut self.conns[idx];
            match c.state {
                ConnState::Connecting => match c.io.connected() {
                    Ok(true) if c.io.is_tls() => c.state = ConnState::Handshaking,
                    Ok(true) => self.connected(idx, now),
                    Ok(false) => return,
                    Err(e) => {
                        let why = Failure::Server(format!("connect: {e}"));
                        return self.fail(registry, idx, why, now);
                    }
                },
                ConnState::Handshaking => match c.io.handshake() {
                    Ok(true) => {
                        let counters = &self.servers[c.server].shared.counters;
                        match c.io.resumed() {
                            Some(true) => &counters.tls_resumed,
                            _ => &counters.tls_full,
                        }
                        .fetch_add(1, Ordering::Relaxed);
                        self.connected(idx, now)
                    }
                    Ok(false) => return,
                    Err(e) => {
                        let why = Failure::Server(self.tls_failure(idx, &e));
                        return self.fail(registry, idx, why, now);
                    }
                },
                ConnState::Sending => {
                    while c.wpos < c.wbuf.len() {
                        match c.io.write(&c.wbuf[c.wpos..]) {
                            Ok(0) => {
                                let why = self.early_failure(idx, "write: connection closed");
                                return self.fail(registry, idx, why, now);
                            }
                            Ok(n) => c.wpos += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                let why = self.early_failure(idx, &format!("write: {e}"));
                                return self.fail(registry, idx, why, now);
                            }
                        }
                    }
                    c.state = ConnState::Head;
                }
                ConnState::Head | ConnState::Body { .. } => {
                    // TLS: what rustls still holds of the request goes first.
                    if let Err(e) = c.io.flush() {
                        let why = self.early_failure(idx, &format!("write: {e}"));
                        return self.fail(registry, idx, why, now);
                    }
                    return self.read_reply(registry, idx, now);
                }
                ConnState::Idle => {
                    // Readable while idle: a spurious wake-up or a TLS record
                    // without data keeps it pooled; anything else ends it.
                    self.idle_is_clean(registry, idx, now);
                    return;
                }
            }
        }
    }

    /// The connection (and its TLS handshake) is up: the request's own
    /// `http_timeout` starts.
    fn connected(&mut self, idx: usize, now: Instant) {
        let c = &mut self.conns[idx];
        c.state = ConnState::Sending;
        let server = c.server;
        let http_timeout = self.map_of(server).http_timeout;
        if let Some(f) = self.conns[idx].fetch {
            self.activate(f, idx, now + http_timeout);
        }
    }

    /// Why a TLS handshake failed, in words (certificate expired, name
    /// mismatch...).
    fn tls_failure(&self, idx: usize, e: &io::Error) -> String {
        let c = &self.conns[idx];
        match (transport::tls_error(e), &self.servers[c.server].shared.tls) {
            (Some(t), Some(tls)) => crate::tls::describe(t, &tls.name),
            _ if e.kind() == io::ErrorKind::UnexpectedEof => {
                "TLS: the server closed the connection during the handshake".into()
            }
            _ => format!("TLS handshake: {e}"),
        }
    }

    /// A failure before any byte of the reply: on a reused connection that is
    /// the server having closed it while idle (retry once, fresh).
    fn early_failure(&self, idx: usize, why: &str) -> Failure {
        let c = &self.conns[idx];
        let fresh_retry_used = c
            .fetch
            .and_then(|f| self.fetch(f))
            .is_some_and(|x| x.fresh_retry_used);
        if c.reused && c.rbuf.is_empty() && !fresh_retry_used {
            Failure::StalePooled
        } else {
            Failure::Server(why.to_string())
        }
    }

    fn read_reply(&mut self, registry: &Registry, idx: usize, now: Instant) {
        loop {
            let c = &mut self.conns[idx];
            let n = match c.io.read(&mut self.read_buf) {
                Ok(0) => {
                    // EOF.
                    return match &mut c.state {
                        ConnState::Body { dec, .. } => match dec.eof() {
                            Ok(()) => self.reply_done(registry, idx, now),
                            Err(e) => {
                                let why = Failure::Server(format!("reply: {e}"));
                                self.fail(registry, idx, why, now)
                            }
                        },
                        _ => {
                            let f = self.early_failure(idx, "connection closed before a reply");
                            self.fail(registry, idx, f, now)
                        }
                    };
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let f = self.early_failure(idx, &format!("read: {e}"));
                    return self.fail(registry, idx, f, now);
                }
            };
            c.rbuf.extend_from_slice(&self.read_buf[..n]);
            if let ConnState::Head = c.state {
                // Parse only once the head's end is there (or it is too long).
                if c.rbuf.len() <= MAX_HEAD_BYTES {
                    match http::find_head_end(&c.rbuf, c.head_scanned) {
                        None => {
                            c.head_scanned = c.rbuf.len().saturating_sub(2);
                            continue;
                        }
                        Some(end) => c.head_scanned = end,
                    }
                }
                match http::parse_head(&c.rbuf) {
                    // Only 1xx heads so far: look for the next end.
                    Ok(None) => continue,
                    Ok(Some(head)) => {
                        c.rbuf.drain(..head.consumed);
                        let max = self.maps[self.servers[c.server].map as usize]
                            .cfg
                            .max_result_bytes;
                        let dec = BodyDecoder::new(head.framing, max);
                        c.state = ConnState::Body { head, dec };
                    }
                    Err(e) => {
                        let why = Failure::Server(format!("unparseable reply: {e}"));
                        return self.fail(registry, idx, why, now);
                    }
                }
            }
            let server = c.server;
            let keep_body = self.map_of(server).result != ResultMode::Header;
            let c = &mut self.conns[idx];
            if let ConnState::Body { dec, .. } = &mut c.state {
                match dec.feed(&c.rbuf, &mut c.body) {
                    Ok((used, done)) => {
                        c.rbuf.drain(..used);
                        if !keep_body {
                            c.body.clear();
                        }
                        if done {
                            return self.reply_done(registry, idx, now);
                        }
                    }
                    Err(e @ HttpError::BodyTooLarge { .. }) => {
                        let why = Failure::Answer(format!("reply: {e}"));
                        return self.fail(registry, idx, why, now);
                    }
                    Err(e) => {
                        let why = Failure::Server(format!("reply: {e}"));
                        return self.fail(registry, idx, why, now);
                    }
                }
            }
        }
    }

    /// Whether the reply on `idx` can be trusted to answer the request that
    /// was written (its echo of the key, or of a policy request's id, is
    /// what was sent): `Err` with the protocol error if not.
    fn check_echo(&self, idx: usize, head: &Head) -> Result<(), Failure> {
        let c = &self.conns[idx];
        let map = self.map_of(c.server);
        let (header, echo, sent) = match map.kind {
            MapKind::Policy(_) => (Echo::PolicyId, &head.policy_id, Some(&c.request_id[..])),
            MapKind::Table => (
                Echo::Key,
                &head.echo,
                c.fetch
                    .and_then(|f| self.fetch(f))
                    .map(|x| x.key.trim_ascii()),
            ),
        };
        let extra = !c.rbuf.is_empty();
        match (echo, sent) {
            (Some(echo), Some(sent)) if echo.as_slice() != sent => Err(Failure::Protocol(
                ProtocolError::EchoMismatch,
                header.mismatch(echo, sent),
            )),
            (None, Some(_)) if map.require_key_echo => Err(Failure::Protocol(
                ProtocolError::EchoMissing,
                header.missing().into(),
            )),
            // More bytes behind the reply on a reused connection: this reply
            // may be a stray one that came first. Without an echo to prove
            // whose it is, it is not taken (a fresh connection will be).
            (None, Some(_)) if extra && c.reused => Err(Failure::Protocol(
                ProtocolError::StrayBytes,
                format!(
                    "reply rejected: {} more byte(s) came behind it on a reused connection; closed it",
                    c.rbuf.len()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A whole reply was read on `idx`.
    fn reply_done(&mut self, registry: &Registry, idx: usize, now: Instant) {
        let c = &mut self.conns[idx];
        let state = std::mem::replace(&mut c.state, ConnState::Idle);
        let ConnState::Body { mut head, .. } = state else {
            return;
        };
        if let Err(failure) = self.check_echo(idx, &head) {
            return self.fail(registry, idx, failure, now);
        }
        let c = &mut self.conns[idx];
        let server = c.server;
        let reuse = http::reuse(&head, c.rbuf.len());
        if reuse == Err(NoReuse::ExtraBytes) {
            // The reply itself is this request's (a fresh connection, or
            // its echo matched); what came behind it is not anybody's.
            let extra = c.rbuf.len();
            self.protocol_error(
                server,
                ProtocolError::StrayBytes,
                &format!("{extra} unexpected byte(s) after a reply; closed the connection"),
            );
        }
        let c = &mut self.conns[idx];
        let verdict = evaluate(
            &self.maps[self.servers[server].map as usize].cfg,
            &mut head,
            &c.body,
            &self.servers[server].shared.cfg.url,
        );
        let f = c.fetch.take();
        c.body.clear();
        let counters = &self.servers[server].shared.counters;
        counters.latency.observe(c.started.elapsed());
        let kind = if verdict.is_ok() {
            &counters.ok
        } else {
            &counters.http_error
        };
        kind.fetch_add(1, Ordering::Relaxed);
        let started = c.started;
        self.server_answered(server, started);
        if reuse.is_ok() {
            self.make_idle(registry, idx, now);
        } else {
            self.close_conn(registry, idx, now);
        }
        let Some(f) = f else { return };
        self.release_probe(f, server);
        match verdict {
            Ok(outcome) => self.finish(f, outcome),
            Err(msg) => self.retry_elsewhere(f, msg),
        }
    }

    /// The attempt on `idx` failed: close it and move its fetch on.
    pub(super) fn fail(&mut self, registry: &Registry, idx: usize, failure: Failure, now: Instant) {
        let server = self.conns[idx].server;
        let f = self.conns[idx].fetch.take();
        let started = self.conns[idx].started;
        let addr = self.conns[idx].addr;
        let connecting = matches!(
            self.conns[idx].state,
            ConnState::Connecting | ConnState::Handshaking
        );
        if let (Failure::Server(why), true, Some(f)) = (&failure, connecting, f) {
            // A connect or handshake: another address of the server may do.
            // The slot stays this fetch's until connect_failed knows
            // (after the address is marked resting).
            let why = why.clone();
            self.drop_conn(registry, idx);
            return self.connect_failed(registry, f, server, addr, why, now);
        }
        if let Failure::Server(why) = &failure {
            // Rest it first, so the slot freed below goes to no one queued here.
            self.server_failed(server, why, now);
        }
        self.drop_conn(registry, idx);
        let url = self.servers[server].shared.cfg.url.clone();
        // The retry on a fresh connection takes the slot just freed;
        // otherwise it is handed on, before the fetch goes elsewhere.
        let fetch = f.and_then(|f| self.fetch(f));
        let retry_fresh = match &failure {
            Failure::StalePooled => fetch.is_some(),
            Failure::Protocol(..) => fetch.is_some_and(|x| !x.fresh_retry_used),
            _ => false,
        };
        if !retry_fresh {
            self.slot_freed(registry, server, now);
        }
        match failure {
            Failure::StalePooled => {
                if let (true, Some(f)) = (retry_fresh, f) {
                    self.retry_fresh(registry, f, server, now);
                }
            }
            Failure::Server(why) => {
                if let Some(f) = f {
                    self.release_probe(f, server);
                    self.retry_elsewhere(f, format!("{url}: {why}"));
                }
            }
            Failure::Deadline => {
                // The lookup ran out of time; the server did not fail its own
                // http_timeout, so it does not rest.
                if let Some(f) = f {
                    self.release_probe(f, server);
                }
            }
            Failure::Answer(why) => {
                self.server_answered(server, started);
                if let Some(f) = f {
                    self.release_probe(f, server);
                    self.retry_elsewhere(f, format!("{url}: {why}"));
                }
            }
            Failure::Protocol(kind, why) => {
                let counters = &self.servers[server].shared.counters;
                counters.failure.fetch_add(1, Ordering::Relaxed);
                self.protocol_error(server, kind, &why);
                let Some(f) = f else { return };
                if retry_fresh {
                    self.retry_fresh(registry, f, server, now);
                } else {
                    self.release_probe(f, server);
                    self.retry_elsewhere(f, format!("{url}: {why}"));
                }
            }
        }
    }

    /// Fetch `f`'s attempt goes on at `server` on a new connection, once
    /// (in the slot its failed connection left).
    fn retry_fresh(&mut self, registry: &Registry, f: FetchRef, server: usize, now: Instant) {
        if let Some(fetch) = self.fetch_mut(f) {
            fetch.fresh_retry_used = true;
        }
        self.assign(registry, f, server, now, true);
    }

    /// A connect (or TLS handshake) of fetch `f` to `addr` of `server`
    /// failed: the address rests `retry_interval`; the next address is
    /// tried at once, and when every address failed in this attempt the
    /// server fails (it rests, the lookup goes to another server).
    fn connect_failed(
        &mut self,
        registry: &Registry,
        f: FetchRef,
        server: usize,
        addr: SocketAddr,
        why: String,
        now: Instant,
    ) {
        let shared = self.servers[server].shared.clone();
        let rest_ms = self.map_of(server).retry_interval.as_millis() as u64;
        shared.addr_failed(addr, self.ms_at(now), rest_ms);
        let more = match self.fetch_mut(f) {
            Some(fetch) if now < fetch.deadline => {
                fetch.addrs_tried.push(addr);
                fetch.addrs_tried.len() < shared.addr_count()
            }
            _ => false,
        };
        if more {
            crate::debug!(
                "server {} (map {}): {addr}: {why}; trying its next address",
                shared.cfg.url,
                shared.map_name
            );
            // The slot the failed connect left, if any (the limit checked).
            return self.assign(registry, f, server, now, true);
        }
        self.server_failed(server, &why, now);
        self.release_probe(f, server);
        // A slot the failed connect left goes to whoever waits for one.
        self.slot_freed(registry, server, now);
        self.retry_elsewhere(f, format!("{}: {why}", shared.cfg.url));
    }
}

#[cfg(test)]
mod tests {
    use super::hex_id;

    #[test]
    fn hex_id_is_016x() {
        for id in [0, 1, 0xabc, 0x0123_4567_89ab_cdef, u64::MAX, 1 << 63] {
            assert_eq!(hex_id(id), format!("{id:016x}").as_bytes(), "{id:#x}");
        }
    }
}
