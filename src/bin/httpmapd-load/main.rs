//! httpmapd-load: a closed-loop load generator for Postfix lookup tables, so
//! httpmapd and its peers are measured with the same client.
//!
//! Targets (written like postmap's tables):
//!   tcp:HOST:PORT                     tcp_table (`get KEY\n`)
//!   socketmap:inet:HOST:PORT:NAME     socketmap netstrings
//!   socketmap:unix:PATH:NAME
//!   memcached:HOST:PORT               memcached text protocol `get KEY\r\n`
//!   http:HOST:PORT/PATH               dict_http straight to an HTTP server:
//!                                     `GET /PATH` + `POSTFIX-DICT-EMAIL: KEY`, keep-alive
//!
//! Each connection keeps `--depth` requests in flight (default 1, like one
//! Postfix process); `--threads` mio event loops (default 1) drive all of
//! them. Latencies go to an HDR histogram from the moment a request is
//! handed to `write` to the moment its whole reply is parsed.

use hdrhistogram::Histogram;
use httpmapd::codec::{hex, http, netstring};
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: httpmapd-load TARGET [options]

TARGET: tcp:HOST:PORT | socketmap:inet:HOST:PORT:NAME | socketmap:unix:PATH:NAME
        memcached:HOST:PORT | http:HOST:PORT[/PATH]

  -c, --connections N   connections (default 10)
      --depth N         requests in flight per connection (default 1)
  -d, --duration DUR    measure this long (default 10s; e.g. 500ms, 10s, 1m)
  -n, --requests N      or measure exactly N requests
      --warmup DUR      run this long first, not recorded (default 0s)
  -t, --threads N       event-loop threads (default 1)
      --timeout DUR     a request unanswered this long is a timeout; the
                        connection is closed and reopened (default 5s)
      --keys FILE       keys from FILE, one per line (\"KEY [VALUE]\", map file
                        syntax; # comments and blank lines skipped)
      --keyspace N      or generated keys PREFIX{0..N-1}@DOMAIN (default 10000)
      --prefix P        (default user)
      --domain D        (default example.com)
      --miss-ratio F    this share of requests use keys outside the key set
                        (never repeated, so never cached) (default 0)
      --sequential      keys in order 0,1,2,... instead of uniformly random
                        (with -n N = keyspace: each key once; to fill a cache)
      --populate        memcached: first `set` every key (value: the file's
                        VALUE, or PREFIX{i}@mail.DOMAIN), then run the load
      --populate-only   populate, print what was stored, exit
      --write-map FILE  write the generated keyspace as a map file
                        (\"KEY VALUE\" lines, for `httpmapd backend --map`), exit
      --idle            open the connections, send nothing, hold them for
                        --duration, print how many were open, exit
      --json            print the result as one JSON object
";

#[derive(Clone, Debug)]
enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Clone, Debug)]
enum Proto {
    TcpTable,
    Socketmap { name: Vec<u8> },
    Memcached,
    Http { host: String, path: Vec<u8> },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Get,
    Set,
}

#[derive(Clone, Debug)]
struct Opts {
    target: String,
    addr: Addr,
    proto: Proto,
    conns: usize,
    depth: usize,
    duration: Duration,
    count: Option<u64>,
    warmup: Duration,
    threads: usize,
    timeout: Duration,
    keys_file: Option<PathBuf>,
    keyspace: usize,
    prefix: String,
    domain: String,
    miss_ratio: f64,
    sequential: bool,
    populate: bool,
    populate_only: bool,
    write_map: Option<PathBuf>,
    idle: bool,
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn resolve(hostport: &str) -> Result<SocketAddr, String> {
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))
}

fn parse_target(t: &str) -> Result<(Addr, Proto), String> {
    if let Some(rest) = t.strip_prefix("tcp:") {
        return Ok((Addr::Tcp(resolve(rest)?), Proto::TcpTable));
    }
    if let Some(rest) = t.strip_prefix("memcached:") {
        return Ok((Addr::Tcp(resolve(rest)?), Proto::Memcached));
    }
    if let Some(rest) = t.strip_prefix("socketmap:") {
        let (addr_part, name) = rest
            .rsplit_once(':')
            .ok_or("socketmap target needs :NAME at the end")?;
        let name = name.as_bytes().to_vec();
        if let Some(hp) = addr_part.strip_prefix("inet:") {
            return Ok((Addr::Tcp(resolve(hp)?), Proto::Socketmap { name }));
        }
        if let Some(p) = addr_part.strip_prefix("unix:") {
            return Ok((Addr::Unix(PathBuf::from(p)), Proto::Socketmap { name }));
        }
        return Err(format!(
            "{t}: expected socketmap:inet:... or socketmap:unix:..."
        ));
    }
    if let Some(rest) = t.strip_prefix("http:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (hp, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        return Ok((
            Addr::Tcp(resolve(hp)?),
            Proto::Http {
                host: hp.to_string(),
                path: path.as_bytes().to_vec(),
            },
        ));
    }
    Err(format!(
        "{t}: unknown target (tcp:, socketmap:, memcached:, http:)"
    ))
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut target = None;
    let mut o = Opts {
        target: String::new(),
        addr: Addr::Unix(PathBuf::new()),
        proto: Proto::TcpTable,
        conns: 10,
        depth: 1,
        duration: Duration::from_secs(10),
        count: None,
        warmup: Duration::ZERO,
        threads: 1,
        timeout: Duration::from_secs(5),
        keys_file: None,
        keyspace: 10_000,
        prefix: "user".into(),
        domain: "example.com".into(),
        miss_ratio: 0.0,
        sequential: false,
        populate: false,
        populate_only: false,
        write_map: None,
        idle: false,
        json: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        let num = |s: String| {
            s.parse::<u64>()
                .map_err(|_| format!("{a}: bad number {s:?}"))
        };
        match a.as_str() {
            "-c" | "--connections" => o.conns = num(val()?)?.max(1) as usize,
            "--depth" => o.depth = num(val()?)?.max(1) as usize,
            "-d" | "--duration" => o.duration = parse_duration(&val()?)?,
            "-n" | "--requests" => o.count = Some(num(val()?)?),
            "--warmup" => o.warmup = parse_duration(&val()?)?,
            "-t" | "--threads" => o.threads = num(val()?)?.max(1) as usize,
            "--timeout" => o.timeout = parse_duration(&val()?)?,
            "--keys" => o.keys_file = Some(PathBuf::from(val()?)),
            "--keyspace" => o.keyspace = num(val()?)?.max(1) as usize,
            "--prefix" => o.prefix = val()?,
            "--domain" => o.domain = val()?,
            "--miss-ratio" => {
                o.miss_ratio = val()?
                    .parse::<f64>()
                    .map_err(|_| "--miss-ratio: bad number".to_string())?
                    .clamp(0.0, 1.0)
            }
            "--sequential" => o.sequential = true,
            "--populate" => o.populate = true,
            "--populate-only" => {
                o.populate = true;
                o.populate_only = true
            }
            "--write-map" => o.write_map = Some(PathBuf::from(val()?)),
            "--idle" => o.idle = true,
            "--json" => o.json = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            s if target.is_none() => target = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s}\n{USAGE}")),
        }
    }
    if o.write_map.is_some() && target.is_none() {
        return Ok(o);
    }
    let t = target.ok_or_else(|| USAGE.to_string())?;
    let (addr, proto) = parse_target(&t)?;
    if o.populate && !matches!(proto, Proto::Memcached) {
        return Err(
            "--populate is for memcached: targets (fill httpmapd with --sequential -n KEYSPACE)"
                .into(),
        );
    }
    o.target = t;
    o.addr = addr;
    o.proto = proto;
    o.threads = o.threads.min(o.conns);
    Ok(o)
}

/// The key set (and values for --populate / --write-map), in one buffer.
struct Keys {
    bytes: Vec<u8>,
    /// (key end, value end) per key; a key starts at the previous value end.
    ends: Vec<(u32, u32)>,
}

impl Keys {
    fn len(&self) -> usize {
        self.ends.len()
    }
    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            self.ends[i - 1].1 as usize
        };
        &self.bytes[start..self.ends[i].0 as usize]
    }
    fn value(&self, i: usize) -> &[u8] {
        &self.bytes[self.ends[i].0 as usize..self.ends[i].1 as usize]
    }
    fn push(&mut self, k: &[u8], v: &[u8]) {
        self.bytes.extend_from_slice(k);
        let ke = self.bytes.len() as u32;
        self.bytes.extend_from_slice(v);
        self.ends.push((ke, self.bytes.len() as u32));
    }
}

fn load_keys(o: &Opts) -> Result<Keys, String> {
    let mut keys = Keys {
        bytes: Vec::new(),
        ends: Vec::new(),
    };
    if let Some(f) = &o.keys_file {
        let text = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for line in text.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = line.trim_ascii();
            if line.is_empty() || line[0] == b'#' {
                continue;
            }
            match line.iter().position(|b| b.is_ascii_whitespace()) {
                Some(i) => keys.push(&line[..i], line[i..].trim_ascii()),
                None => keys.push(line, line),
            }
        }
        if keys.len() == 0 {
            return Err(format!("{}: no keys", f.display()));
        }
    } else {
        for i in 0..o.keyspace {
            let k = format!("{}{i}@{}", o.prefix, o.domain);
            let v = format!("{}{i}@mail.{}", o.prefix, o.domain);
            keys.push(k.as_bytes(), v.as_bytes());
        }
    }
    Ok(keys)
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Found,
    NotFound,
    /// 400 / TEMP / TIMEOUT / non-2xx / SERVER_ERROR / NOT_STORED.
    Temp,
    /// socketmap PERM.
    Perm,
    Stored,
}

/// Parses one reply at the front of `buf`: `Ok(None)` incomplete,
/// `Ok(Some((consumed, outcome)))`, `Err(())` a protocol error.
fn parse_reply(
    proto: &Proto,
    buf: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Option<(usize, Outcome)>, ()> {
    match proto {
        Proto::TcpTable => {
            let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                return if buf.len() > 8192 { Err(()) } else { Ok(None) };
            };
            let o = match buf.get(..4) {
                Some(b"200 ") => Outcome::Found,
                Some(b"500 ") => Outcome::NotFound,
                Some(b"400 ") => Outcome::Temp,
                _ => return Err(()),
            };
            Ok(Some((nl + 1, o)))
        }
        Proto::Socketmap { .. } => match netstring::parse(buf, 1 << 20) {
            Ok(None) => Ok(None),
            Err(_) => Err(()),
            Ok(Some((s, e, consumed))) => {
                let p = &buf[s..e];
                let o = if p.starts_with(b"OK ") {
                    Outcome::Found
                } else if p.starts_with(b"NOTFOUND") {
                    Outcome::NotFound
                } else if p.starts_with(b"TEMP") || p.starts_with(b"TIMEOUT") {
                    Outcome::Temp
                } else if p.starts_with(b"PERM") {
                    Outcome::Perm
                } else {
                    return Err(());
                };
                Ok(Some((consumed, o)))
            }
        },
        Proto::Memcached => {
            let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else {
                return if buf.len() > 4096 { Err(()) } else { Ok(None) };
            };
            let line = &buf[..nl];
            let after = nl + 2;
            if line == b"END" {
                Ok(Some((after, Outcome::NotFound)))
            } else if line == b"STORED" {
                Ok(Some((after, Outcome::Stored)))
            } else if line == b"NOT_STORED" || line.starts_with(b"SERVER_ERROR") {
                Ok(Some((after, Outcome::Temp)))
            } else if let Some(rest) = line.strip_prefix(b"VALUE ") {
                let bytes: usize = rest
                    .split(|&b| b == b' ')
                    .nth(2)
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(|n| n.parse().ok())
                    .ok_or(())?;
                let end = after + bytes + 2 + 5;
                if buf.len() < end {
                    return Ok(None);
                }
                if &buf[after + bytes..end] != b"\r\nEND\r\n" {
                    return Err(());
                }
                Ok(Some((end, Outcome::Found)))
            } else {
                Err(())
            }
        }
        Proto::Http { .. } => {
            let Some(head) = http::parse_head(buf).map_err(|_| ())? else {
                return Ok(None);
            };
            let consumed = match head.framing {
                http::Framing::NoBody => head.consumed,
                http::Framing::ContentLength(n) => {
                    let end = head.consumed + n as usize;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    end
                }
                http::Framing::Chunked => {
                    scratch.clear();
                    let mut d = http::BodyDecoder::new(http::Framing::Chunked, 1 << 20);
                    let (n, done) = d.feed(&buf[head.consumed..], scratch).map_err(|_| ())?;
                    if !done {
                        return Ok(None);
                    }
                    head.consumed + n
                }
                http::Framing::CloseDelimited => return Err(()),
            };
            let o = if !(200..300).contains(&head.status) {
                Outcome::Temp
            } else if head.results.as_deref().is_some_and(|r| !r.is_empty()) {
                Outcome::Found
            } else {
                Outcome::NotFound
            };
            Ok(Some((consumed, o)))
        }
    }
}

fn encode_request(proto: &Proto, op: Op, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    match (proto, op) {
        (Proto::TcpTable, _) => {
            out.extend_from_slice(b"get ");
            hex::encode(key, out);
            out.push(b'\n');
        }
        (Proto::Socketmap { name }, _) => {
            netstring::encode(&[name, b" ", key], out);
        }
        (Proto::Memcached, Op::Get) => {
            out.extend_from_slice(b"get ");
            out.extend_from_slice(key);
            out.extend_from_slice(b"\r\n");
        }
        (Proto::Memcached, Op::Set) => {
            out.extend_from_slice(b"set ");
            out.extend_from_slice(key);
            out.extend_from_slice(format!(" 0 0 {}\r\n", value.len()).as_bytes());
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        (Proto::Http { host, path }, _) => {
            let _ = http::write_get(out, path, host, key, &[]);
        }
    }
}

// ---------------------------------------------------------------------------
// Connections and the event loop
// ---------------------------------------------------------------------------

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(a: &Addr) -> io::Result<Stream> {
        match a {
            Addr::Tcp(sa) => {
                let s = TcpStream::connect(*sa)?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Addr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
        }
    }
    /// Ok(true): connected; Ok(false): still connecting.
    fn connected(&self) -> io::Result<bool> {
        match self {
            Stream::Tcp(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                match s.peer_addr() {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Stream::Unix(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                Ok(true)
            }
        }
    }
    fn register(&mut self, r: &Registry, t: Token) -> io::Result<()> {
        let i = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(s) => r.register(s, t, i),
            Stream::Unix(s) => r.register(s, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) {
        let _ = match self {
            Stream::Tcp(s) => r.deregister(s),
            Stream::Unix(s) => r.deregister(s),
        };
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    /// Not started, or closed and waiting to reconnect at `retry_at`.
    Down,
    Connecting,
    Up,
}

struct Conn {
    stream: Option<Stream>,
    state: State,
    retry_at: Instant,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Send times of the requests in flight, oldest first.
    inflight: VecDeque<Instant>,
}

#[derive(Default, Clone, Copy, Debug)]
struct Counts {
    found: u64,
    not_found: u64,
    stored: u64,
    temp: u64,
    perm: u64,
    connect_errors: u64,
    timeouts: u64,
    protocol_errors: u64,
    /// The server closed or reset a connection with requests in flight.
    closed: u64,
    connects: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.found += o.found;
        self.not_found += o.not_found;
        self.stored += o.stored;
        self.temp += o.temp;
        self.perm += o.perm;
        self.connect_errors += o.connect_errors;
        self.timeouts += o.timeouts;
        self.protocol_errors += o.protocol_errors;
        self.closed += o.closed;
        self.connects += o.connects;
    }
    fn answered(&self) -> u64 {
        self.found + self.not_found + self.stored + self.temp + self.perm
    }
}

/// What every thread shares for one phase.
struct Plan {
    opts: Opts,
    op: Op,
    keys: Arc<Keys>,
    /// Requests still to issue once recording starts (None: run for a duration).
    budget: Option<AtomicI64>,
    /// --sequential: the next key index.
    next_key: AtomicUsize,
    barrier: Barrier,
}

struct ThreadResult {
    hist: Histogram<u64>,
    counts: Counts,
    /// First and last recorded completion.
    first: Option<Instant>,
    last: Option<Instant>,
    open_conns: usize,
    start: Instant,
    end: Instant,
}

const CONNECT_BURST: usize = 256;
const TICK: Duration = Duration::from_millis(20);
const RECONNECT_DELAY: Duration = Duration::from_millis(50);

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds")
}

struct Loop<'a> {
    plan: &'a Plan,
    poll: Poll,
    conns: Vec<Conn>,
    rng: fastrand::Rng,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    counts: Counts,
    hist: Histogram<u64>,
    /// Requests sent before this are warm-up and not recorded.
    record_from: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    miss_serial: u64,
    issuing: bool,
    /// Last answer or connect (count mode stops after `timeout` without either).
    progress: Instant,
}

impl<'a> Loop<'a> {
    fn start_connect(&mut self, i: usize) {
        let c = &mut self.conns[i];
        match Stream::connect(&self.plan.opts.addr) {
            Ok(mut s) => {
                if s.register(self.poll.registry(), Token(i)).is_err() {
                    self.counts.connect_errors += 1;
                    c.state = State::Down;
                    c.retry_at = Instant::now() + RECONNECT_DELAY;
                    return;
                }
                c.stream = Some(s);
                c.state = State::Connecting;
            }
            Err(_) => {
                self.counts.connect_errors += 1;
                c.state = State::Down;
                c.retry_at = Instant::now() + RECONNECT_DELAY;
            }
        }
    }

    fn close(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if let Some(mut s) = c.stream.take() {
            s.deregister(self.poll.registry());
        }
        c.state = State::Down;
        c.retry_at = Instant::now() + RECONNECT_DELAY;
        c.rbuf.clear();
        c.wbuf.clear();
        c.wpos = 0;
        c.inflight.clear();
    }

    /// Starts connections that are down, at most CONNECT_BURST connecting at once.
    fn connect_some(&mut self, now: Instant) {
        let mut connecting = self
            .conns
            .iter()
            .filter(|c| c.state == State::Connecting)
            .count();
        for i in 0..self.conns.len() {
            if connecting >= CONNECT_BURST {
                break;
            }
            if self.conns[i].state == State::Down && self.conns[i].retry_at <= now {
                self.start_connect(i);
                if self.conns[i].state == State::Connecting {
                    connecting += 1;
                }
            }
        }
    }

    fn pick_key(&mut self) -> (Vec<u8>, usize) {
        let keys = &self.plan.keys;
        let o = &self.plan.opts;
        if o.miss_ratio > 0.0 && self.rng.f64() < o.miss_ratio {
            self.miss_serial += 1;
            let k = format!(
                "{}-miss{}x{}@{}",
                o.prefix,
                self.rng.u64(..),
                self.miss_serial,
                o.domain
            );
            return (k.into_bytes(), usize::MAX);
        }
        let i = if o.sequential {
            self.plan.next_key.fetch_add(1, Ordering::Relaxed) % keys.len()
        } else {
            self.rng.usize(..keys.len())
        };
        (Vec::new(), i)
    }

    /// Fills connection `i` up to `depth` requests in flight and writes.
    fn top_up(&mut self, i: usize, now: Instant) {
        if self.plan.opts.idle {
            return;
        }
        while self.issuing
            && self.conns[i].state == State::Up
            && self.conns[i].inflight.len() < self.plan.opts.depth
        {
            if now >= self.record_from {
                if let Some(b) = &self.plan.budget {
                    if b.fetch_sub(1, Ordering::Relaxed) <= 0 {
                        self.issuing = false;
                        break;
                    }
                }
            }
            let (miss_key, idx) = self.pick_key();
            let keys = &self.plan.keys;
            let (k, v): (&[u8], &[u8]) = if idx == usize::MAX {
                (&miss_key, &miss_key)
            } else {
                (keys.key(idx), keys.value(idx))
            };
            let c = &mut self.conns[i];
            encode_request(&self.plan.opts.proto, self.plan.op, k, v, &mut c.wbuf);
            c.inflight.push_back(now);
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(s) = c.stream.as_mut() else { return };
        while c.wpos < c.wbuf.len() {
            match s.write(&c.wbuf[c.wpos..]) {
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    if !c.inflight.is_empty() {
                        self.counts.closed += 1;
                    }
                    self.close(i);
                    return;
                }
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
    }

    fn readable(&mut self, i: usize) {
        loop {
            let Some(s) = self.conns[i].stream.as_mut() else {
                return;
            };
            match s.read(&mut self.rbuf) {
                Ok(0) => {
                    let clean = self.conns[i].inflight.is_empty() && !self.plan.opts.idle;
                    if !clean {
                        self.counts.closed += 1;
                    }
                    self.close(i);
                    if clean {
                        // e.g. an HTTP server's keep-alive limit: reconnect at once.
                        self.conns[i].retry_at = Instant::now();
                    }
                    return;
                }
                Ok(n) => {
                    let c = &mut self.conns[i];
                    c.rbuf.extend_from_slice(&self.rbuf[..n]);
                    if n < self.rbuf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    if !self.conns[i].inflight.is_empty() {
                        self.counts.closed += 1;
                    }
                    self.close(i);
                    return;
                }
            }
        }
        let now = Instant::now();
        let mut pos = 0;
        loop {
            let c = &mut self.conns[i];
            if pos >= c.rbuf.len() {
                break;
            }
            match parse_reply(&self.plan.opts.proto, &c.rbuf[pos..], &mut self.scratch) {
                Ok(None) => break,
                Ok(Some((n, o))) => {
                    pos += n;
                    self.progress = now;
                    let Some(sent) = c.inflight.pop_front() else {
                        self.counts.protocol_errors += 1;
                        self.close(i);
                        return;
                    };
                    if sent >= self.record_from && self.issuing_window(now) {
                        let ns = now.duration_since(sent).as_nanos() as u64;
                        self.hist.saturating_record(ns.max(1));
                        match o {
                            Outcome::Found => self.counts.found += 1,
                            Outcome::NotFound => self.counts.not_found += 1,
                            Outcome::Temp => self.counts.temp += 1,
                            Outcome::Perm => self.counts.perm += 1,
                            Outcome::Stored => self.counts.stored += 1,
                        }
                        self.first.get_or_insert(now);
                        self.last = Some(now);
                    }
                }
                Err(()) => {
                    if now >= self.record_from {
                        self.counts.protocol_errors += 1;
                    }
                    self.close(i);
                    return;
                }
            }
        }
        self.conns[i].rbuf.drain(..pos);
        self.top_up(i, now);
    }

    /// In duration mode, completions after the end are not counted.
    fn issuing_window(&self, now: Instant) -> bool {
        self.plan.budget.is_some() || now <= self.record_from + self.plan.opts.duration
    }

    fn event(&mut self, i: usize, now: Instant) {
        if self.conns[i].state == State::Connecting {
            let r = self.conns[i].stream.as_ref().map(Stream::connected);
            match r {
                Some(Ok(true)) => {
                    self.conns[i].state = State::Up;
                    self.counts.connects += 1;
                }
                Some(Ok(false)) => return,
                _ => {
                    self.counts.connect_errors += 1;
                    self.close(i);
                    return;
                }
            }
        }
        if self.conns[i].state != State::Up {
            return;
        }
        self.flush(i);
        self.readable(i);
        if self.conns[i].state == State::Up && self.conns[i].inflight.is_empty() {
            self.top_up(i, now);
        }
    }

    fn check_timeouts(&mut self, now: Instant) {
        let t = self.plan.opts.timeout;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            let late = match c.state {
                State::Up => c
                    .inflight
                    .front()
                    .is_some_and(|&s| now.duration_since(s) > t),
                _ => false,
            };
            if late {
                if now >= self.record_from {
                    self.counts.timeouts += c.inflight.len() as u64;
                }
                self.close(i);
            }
        }
    }

    fn run_until(&mut self, events: &mut Events, until: impl Fn(&Self, Instant) -> bool) {
        loop {
            let now = Instant::now();
            if until(self, now) {
                return;
            }
            self.connect_some(now);
            if let Err(e) = self.poll.poll(events, Some(TICK)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("poll: {e}");
                    return;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                self.event(ev.token().0, now);
            }
            self.check_timeouts(now);
            // Connections that came up without requests (e.g. after a reconnect).
            if self.issuing && !self.plan.opts.idle {
                for i in 0..self.conns.len() {
                    if self.conns[i].state == State::Up && self.conns[i].inflight.is_empty() {
                        self.top_up(i, now);
                    }
                }
            }
        }
    }
}

fn run_thread(plan: &Plan, nconns: usize, seed: u64) -> ThreadResult {
    let o = &plan.opts;
    let mut l = Loop {
        plan,
        poll: Poll::new().expect("mio poll"),
        conns: (0..nconns)
            .map(|_| Conn {
                stream: None,
                state: State::Down,
                retry_at: Instant::now(),
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                wpos: 0,
                inflight: VecDeque::new(),
            })
            .collect(),
        rng: fastrand::Rng::with_seed(seed),
        rbuf: vec![0; 64 * 1024],
        scratch: Vec::new(),
        counts: Counts::default(),
        hist: new_hist(),
        record_from: Instant::now() + Duration::from_secs(1 << 30),
        first: None,
        last: None,
        miss_serial: 0,
        issuing: false,
        progress: Instant::now(),
    };
    let mut events = Events::with_capacity(1024);
    // Connect everything first (bounded: 30 s at most).
    let deadline = Instant::now() + Duration::from_secs(30);
    l.run_until(&mut events, |l, now| {
        now >= deadline || l.conns.iter().all(|c| c.state == State::Up)
    });
    plan.barrier.wait();
    let start = Instant::now();
    l.record_from = start + o.warmup;
    l.issuing = true;
    for i in 0..l.conns.len() {
        l.top_up(i, start);
    }
    match &plan.budget {
        Some(b) => {
            // Bounded: warm-up + timeout-per-request safety.
            l.run_until(&mut events, |l, now| {
                let drained = l.conns.iter().all(|c| c.inflight.is_empty());
                (now >= l.record_from && b.load(Ordering::Relaxed) <= 0 && drained)
                    || (!l.issuing && drained)
                    || now.duration_since(l.progress.max(l.record_from)) > o.timeout
            });
        }
        None => {
            let end = l.record_from + o.duration;
            l.run_until(&mut events, |_, now| now >= end);
        }
    }
    let end = Instant::now();
    let open_conns = l.conns.iter().filter(|c| c.state == State::Up).count();
    ThreadResult {
        hist: l.hist,
        counts: l.counts,
        first: l.first,
        last: l.last,
        open_conns,
        start,
        end,
    }
}

struct Report {
    target: String,
    op: Op,
    conns: usize,
    depth: usize,
    threads: usize,
    elapsed: Duration,
    hist: Histogram<u64>,
    counts: Counts,
    open_conns: usize,
}

fn run_phase(opts: &Opts, op: Op, keys: Arc<Keys>, count: Option<u64>) -> Report {
    let plan = Plan {
        opts: opts.clone(),
        op,
        keys,
        budget: count.map(|n| AtomicI64::new(n as i64)),
        next_key: AtomicUsize::new(0),
        barrier: Barrier::new(opts.threads),
    };
    let per = opts.conns / opts.threads;
    let extra = opts.conns % opts.threads;
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..opts.threads)
            .map(|t| {
                let n = per + usize::from(t < extra);
                let plan = &plan;
                s.spawn(move || run_thread(plan, n, 0x5eed + t as u64))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut hist = new_hist();
    let mut counts = Counts::default();
    let mut open = 0;
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let mut start = None::<Instant>;
    let mut end = None::<Instant>;
    for r in &results {
        let _ = hist.add(&r.hist);
        counts.add(&r.counts);
        open += r.open_conns;
        first = match (first, r.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = last.max(r.last);
        start = Some(start.map_or(r.start, |s| s.min(r.start)));
        end = Some(end.map_or(r.end, |e| e.max(r.end)));
    }
    let elapsed = if count.is_some() {
        // From the end of warm-up to the last answer.
        let from = start.unwrap() + opts.warmup;
        last.map_or(Duration::ZERO, |l| l.saturating_duration_since(from))
    } else {
        opts.duration
    };
    let _ = (first, end);
    Report {
        target: opts.target.clone(),
        op,
        conns: opts.conns,
        depth: opts.depth,
        threads: opts.threads,
        elapsed,
        hist,
        counts,
        open_conns: open,
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn print_report(r: &Report, json: bool) {
    let n = r.counts.answered();
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let q = |p: f64| us(r.hist.value_at_quantile(p));
    let c = &r.counts;
    if json {
        let v = serde_json::json!({
            "target": r.target,
            "op": if r.op == Op::Get { "get" } else { "set" },
            "connections": r.conns,
            "open_connections": r.open_conns,
            "depth": r.depth,
            "threads": r.threads,
            "seconds": secs,
            "requests": n,
            "throughput_rps": n as f64 / secs,
            "latency_us": {
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                "max": us(r.hist.max()), "mean": r.hist.mean() / 1000.0,
            },
            "found": c.found,
            "not_found": c.not_found,
            "stored": c.stored,
            "errors": {
                "connect": c.connect_errors,
                "timeout": c.timeouts,
                "protocol": c.protocol_errors,
                "closed": c.closed,
                "temporary": c.temp,
                "permanent": c.perm,
            },
        });
        println!("{v}");
        return;
    }
    println!(
        "{}  op={} connections={} (open {}) depth={} threads={}",
        r.target,
        if r.op == Op::Get { "get" } else { "set" },
        r.conns,
        r.open_conns,
        r.depth,
        r.threads
    );
    println!(
        "  {n} requests in {secs:.2}s: {:.0} req/s  (found {}, not found {}{})",
        n as f64 / secs,
        c.found,
        c.not_found,
        if c.stored > 0 {
            format!(", stored {}", c.stored)
        } else {
            String::new()
        }
    );
    println!(
        "  latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        us(r.hist.max())
    );
    println!(
        "  errors: connect {}  timeout {}  protocol {}  closed {}  temporary {}  permanent {}",
        c.connect_errors, c.timeouts, c.protocol_errors, c.closed, c.temp, c.perm
    );
}

fn run_idle(opts: &Opts) -> Report {
    let mut o = opts.clone();
    o.idle = true;
    o.count = None;
    let plan = Plan {
        opts: o.clone(),
        op: Op::Get,
        keys: Arc::new(Keys {
            bytes: Vec::new(),
            ends: Vec::new(),
        }),
        budget: None,
        next_key: AtomicUsize::new(0),
        barrier: Barrier::new(o.threads),
    };
    let per = o.conns / o.threads;
    let extra = o.conns % o.threads;
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..o.threads)
            .map(|t| {
                let n = per + usize::from(t < extra);
                let plan = &plan;
                s.spawn(move || run_thread(plan, n, t as u64))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut counts = Counts::default();
    let mut open = 0;
    for r in &results {
        counts.add(&r.counts);
        open += r.open_conns;
    }
    Report {
        target: o.target.clone(),
        op: Op::Get,
        conns: o.conns,
        depth: 0,
        threads: o.threads,
        elapsed: o.duration,
        hist: new_hist(),
        counts,
        open_conns: open,
    }
}

fn raise_nofile(want: u64) {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let keys = match load_keys(&opts) {
        Ok(k) => Arc::new(k),
        Err(e) => {
            eprintln!("httpmapd-load: {e}");
            std::process::exit(2);
        }
    };
    if let Some(path) = &opts.write_map {
        let mut out = Vec::with_capacity(keys.bytes.len() + 2 * keys.len());
        for i in 0..keys.len() {
            out.extend_from_slice(keys.key(i));
            out.push(b' ');
            out.extend_from_slice(keys.value(i));
            out.push(b'\n');
        }
        if let Err(e) = std::fs::write(path, out) {
            eprintln!("httpmapd-load: {}: {e}", path.display());
            std::process::exit(2);
        }
        eprintln!("wrote {} keys to {}", keys.len(), path.display());
        return;
    }
    raise_nofile(opts.conns as u64 + 64);
    if opts.idle {
        let r = run_idle(&opts);
        print_report(&r, opts.json);
        return;
    }
    if opts.populate {
        let mut p = opts.clone();
        p.conns = opts.conns.clamp(1, 8);
        p.threads = 1;
        p.depth = 64;
        p.warmup = Duration::ZERO;
        p.sequential = true;
        p.miss_ratio = 0.0;
        let r = run_phase(&p, Op::Set, keys.clone(), Some(keys.len() as u64));
        if opts.populate_only || !opts.json {
            print_report(&r, opts.json);
        }
        if opts.populate_only {
            return;
        }
    }
    let r = run_phase(&opts, Op::Get, keys, opts.count);
    print_report(&r, opts.json);
    let c = &r.counts;
    if c.connect_errors + c.timeouts + c.protocol_errors + c.closed > 0 && c.answered() == 0 {
        std::process::exit(1);
    }
}
