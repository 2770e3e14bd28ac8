//! Criterion benches of httpmapd's hot path, each iteration one request
//! (`Throughput::Elements(1)`), so criterion prints requests per second.
//!
//! - `tcp_table`: request decode, reply encode.
//! - `netstring`: socketmap request parse + split, reply encode.
//! - `http`: reply head parsing (dict_http), chunked body decoding.
//! - `cache`: a hit and a miss (the cache-off miss: lookup → Fetch, then
//!   `complete_ok` with zero TTLs, as the daemon does with `ttl = "0s"`) with
//!   1k, 100k and 1M entries, keys visited in a random order.
//! - `hit_path`: request bytes in → reply bytes out, in process: parse_request
//!   → fold_key → make_key → Cache::lookup whose on_hit encodes the reply with
//!   encode_found (tcp_table) or encode_ok (socketmap).
//!
//! - `miss_path`: what a miss costs beyond the codecs, on real loopback
//!   sockets: the idle check before a pooled connection is reused
//!   (`Transport::idle` on plain TCP: one non-blocking `recv(MSG_PEEK)`
//!   that finds nothing), next to one whole
//!   keep-alive request/reply round trip with a server thread (write the
//!   `GET`, read and parse the dict_http reply), so the check's share of a
//!   miss is read off one run.
//!
//! - `policy`: a 31-attribute policy request (what Postfix 3.8 sends at
//!   RCPT) parsed, then turned into the JSON or form body POSTed to the
//!   policy server.
//!
//! Kept short (`sample_size(20)`, 0.5 s warm-up, 2 s measurement) so that
//! `cargo bench --bench hot_path` finishes in a few minutes. Filter with e.g.
//! `cargo bench --bench hot_path -- hit_path`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use httpmapd::cache::{self, Cache, Lookup, Ttls, Waiter};
use httpmapd::codec::{http, netstring, policy, tcp_table};
use httpmapd::transport::{Idle, Transport};
use httpmapd::worker::fold_key;
use std::time::Duration;

const MAP: u16 = 0;
const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")];
const TTLS: Ttls = Ttls {
    ttl: Duration::from_secs(3600),
    negative_ttl: Duration::from_secs(60),
    stale_ttl: Duration::from_secs(3600),
    refresh_ahead_percent: 10,
    stale_negative: false,
};
const OFF: Ttls = Ttls {
    ttl: Duration::ZERO,
    negative_ttl: Duration::ZERO,
    stale_ttl: Duration::ZERO,
    refresh_ahead_percent: 0,
    stale_negative: false,
};
const WAITER: Waiter = Waiter {
    worker: 0,
    session: 1,
    gen: 1,
    seq: 0,
};

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// Key `i` as Postfix would send it (mixed case: folding has work to do).
fn key(i: usize) -> String {
    format!("User{i}@Example.com")
}

/// Writes key `i` (as [`key`] spells it) into `out`, without allocating:
/// the hit-path benches build each request in a hot buffer, as the daemon
/// finds it in its read buffer, so the bench's own input does not add a
/// cache miss per request at 1M keys.
fn write_key(i: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(b"User");
    let mut digits = [0u8; 20];
    let mut n = i;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"@Example.com");
}

fn value(i: usize) -> String {
    format!("user{i}@mail.example.com")
}

/// Many byte strings in one buffer (no per-string allocation to chase).
struct Strings {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Strings {
    fn new(n: usize, f: impl Fn(usize) -> Vec<u8>) -> Strings {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            bytes.extend_from_slice(&f(i));
            ends.push(bytes.len() as u32);
        }
        Strings { bytes, ends }
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }
}

/// A random visiting order of `n` indices.
fn order(n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    fastrand::Rng::with_seed(7).shuffle(&mut v);
    v
}

/// A cache holding keys 0..n (folded, with the map prefix), every one found.
/// Sized with headroom: shards fill unevenly and must not evict.
fn filled_cache(n: usize) -> Cache {
    let c = Cache::new(n + n / 4 + 64 * 32, usize::MAX);
    let mut folded = Vec::new();
    let mut ck = Vec::new();
    for i in 0..n {
        fold_key(key(i).as_bytes(), true, &mut folded);
        cache::make_key(MAP, 0, &folded, &mut ck);
        c.complete_ok(&ck, Some(value(i).as_bytes()), &TTLS, 0);
    }
    assert_eq!(c.len(), n, "the bench cache evicted entries");
    c
}

fn bench_tcp_table(c: &mut Criterion) {
    let mut g = c.benchmark_group("tcp_table");
    g.throughput(Throughput::Elements(1));
    let plain = b"get alice@example.com\n".to_vec();
    let quoted = b"get Alice%20Smith%2Bext@Example.com\n".to_vec();
    let mut key = Vec::with_capacity(256);
    g.bench_function("parse_request/plain", |b| {
        b.iter(|| {
            black_box(tcp_table::parse_request(black_box(&plain), 4096, &mut key));
        })
    });
    g.bench_function("parse_request/escaped", |b| {
        b.iter(|| {
            black_box(tcp_table::parse_request(black_box(&quoted), 4096, &mut key));
        })
    });
    let mut out = Vec::with_capacity(4096);
    g.bench_function("encode_found/plain", |b| {
        b.iter(|| {
            out.clear();
            tcp_table::encode_found(black_box(b"alice@mail.example.com"), &mut out).unwrap();
            black_box(&out);
        })
    });
    g.bench_function("encode_found/list_with_spaces", |b| {
        b.iter(|| {
            out.clear();
            tcp_table::encode_found(
                black_box(b"alice@example.com, bob@example.com, carol@example.com"),
                &mut out,
            )
            .unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

fn bench_netstring(c: &mut Criterion) {
    let mut g = c.benchmark_group("netstring");
    g.throughput(Throughput::Elements(1));
    let req = b"25:virtual alice@example.com,".to_vec();
    g.bench_function("parse+split_request", |b| {
        b.iter(|| {
            let buf = black_box(&req[..]);
            let (s, e, _) = netstring::parse(buf, netstring::DEFAULT_MAX_QUERY_BYTES)
                .unwrap()
                .unwrap();
            black_box(netstring::split_request(&buf[s..e]).unwrap());
        })
    });
    let mut out = Vec::with_capacity(4096);
    g.bench_function("encode_ok", |b| {
        b.iter(|| {
            out.clear();
            netstring::encode_ok(
                black_box(b"alice@mail.example.com"),
                netstring::DEFAULT_MAX_REPLY_BYTES,
                &mut out,
            )
            .unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

fn bench_http(c: &mut Criterion) {
    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Elements(1));
    // What nginx sends for a dict_http hit.
    let head =
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 24 Nov 2025 20:00:00 GMT\r\n\
Content-Type: application/octet-stream\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\
POSTFIX-DICT-RESULTS: alice@mail.example.com\r\n\r\n"
            .to_vec();
    g.bench_function("parse_head/dict_http_reply", |b| {
        b.iter(|| black_box(http::parse_head(black_box(&head)).unwrap().unwrap()))
    });
    let mut chunked_reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let body_start = chunked_reply.len();
    chunked_reply.extend_from_slice(b"10\r\nalice@mail.examp\r\n7;ext=1\r\nle.com\n\r\n0\r\n\r\n");
    g.bench_function("parse_head+chunked_body", |b| {
        let mut body = Vec::with_capacity(256);
        b.iter(|| {
            let h = http::parse_head(black_box(&chunked_reply))
                .unwrap()
                .unwrap();
            body.clear();
            let mut d = http::BodyDecoder::new(h.framing, 65536);
            let (_, done) = d.feed(&chunked_reply[h.consumed..], &mut body).unwrap();
            assert!(done);
            black_box(&body);
        })
    });
    let chunked_body = chunked_reply[body_start..].to_vec();
    g.bench_function("chunked_body_only", |b| {
        let mut body = Vec::with_capacity(256);
        b.iter(|| {
            body.clear();
            let mut d = http::BodyDecoder::new(http::Framing::Chunked, 65536);
            black_box(d.feed(black_box(&chunked_body), &mut body).unwrap());
        })
    });
    g.finish();
}

fn bench_cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(1));
    for (n, label) in SIZES {
        let cache = filled_cache(n);
        let ord = order(n);
        let keys = Strings::new(n, |i| {
            let mut k = Vec::new();
            cache::make_key(MAP, 0, key(i).to_lowercase().as_bytes(), &mut k);
            k
        });
        let mut i = 0usize;
        g.bench_function(format!("hit/{label}"), |b| {
            b.iter(|| {
                let k = keys.get(ord[i] as usize);
                i = if i + 1 == n { 0 } else { i + 1 };
                let mut len = 0;
                let r = cache.lookup(k, 1, WAITER, |v| len = v.map_or(0, <[u8]>::len));
                debug_assert!(matches!(r, Lookup::Hit { .. }));
                black_box((r, len));
            })
        });
        // Keys never stored: the daemon's path with the cache turned off.
        let absent = Strings::new(n.min(100_000), |i| {
            let mut k = Vec::new();
            cache::make_key(MAP, 0, format!("nobody{i}@example.com").as_bytes(), &mut k);
            k
        });
        let m = n.min(100_000);
        let mut j = 0usize;
        g.bench_function(format!("miss_lookup+complete/{label}"), |b| {
            b.iter(|| {
                let k = absent.get(j);
                j = if j + 1 == m { 0 } else { j + 1 };
                let r = cache.lookup(k, 1, WAITER, |_| unreachable!());
                debug_assert_eq!(r, Lookup::Fetch);
                black_box(cache.complete_ok(k, Some(b"v"), &OFF, 1));
            })
        });
    }
    g.finish();
}

/// The in-process hit path: request bytes in, reply bytes out.
fn bench_hit_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit_path");
    g.throughput(Throughput::Elements(1));
    for (n, label) in SIZES {
        let cache = filled_cache(n);
        let ord = order(n);
        let mut req_buf: Vec<u8> = Vec::with_capacity(256);
        let mut key_scratch: Vec<u8> = Vec::with_capacity(64);
        let mut key_buf = Vec::with_capacity(256);
        let mut fold_buf = Vec::with_capacity(256);
        let mut ckey = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut i = 0usize;
        g.bench_function(format!("tcp_table/{label}"), |b| {
            b.iter(|| {
                req_buf.clear();
                req_buf.extend_from_slice(b"get ");
                write_key(ord[i] as usize, &mut req_buf);
                req_buf.push(b'\n');
                let req = &req_buf[..];
                i = if i + 1 == n { 0 } else { i + 1 };
                let tcp_table::Parsed::Line { result: Ok(()), .. } =
                    tcp_table::parse_request(req, 4096, &mut key_buf)
                else {
                    panic!("bad request")
                };
                fold_key(&key_buf, true, &mut fold_buf);
                cache::make_key(MAP, 0, &fold_buf, &mut ckey);
                out.clear();
                let r = cache.lookup(&ckey, 1, WAITER, |v| match v {
                    Some(v) => tcp_table::encode_found(v, &mut out).unwrap(),
                    None => tcp_table::encode_not_found(b"not found", &mut out),
                });
                debug_assert!(matches!(r, Lookup::Hit { .. }));
                black_box((&out, r));
            })
        });
        g.bench_function(format!("socketmap/{label}"), |b| {
            b.iter(|| {
                key_scratch.clear();
                write_key(ord[i] as usize, &mut key_scratch);
                req_buf.clear();
                netstring::encode(&[b"virtual ", &key_scratch], &mut req_buf);
                let req = &req_buf[..];
                i = if i + 1 == n { 0 } else { i + 1 };
                let (s, e, _) = netstring::parse(req, netstring::DEFAULT_MAX_QUERY_BYTES)
                    .unwrap()
                    .unwrap();
                let (_name, k) = netstring::split_request(&req[s..e]).unwrap();
                fold_key(k, true, &mut fold_buf);
                cache::make_key(MAP, 0, &fold_buf, &mut ckey);
                out.clear();
                let r = cache.lookup(&ckey, 1, WAITER, |v| match v {
                    Some(v) => {
                        netstring::encode_ok(v, netstring::DEFAULT_MAX_REPLY_BYTES, &mut out)
                            .unwrap()
                    }
                    None => netstring::encode_notfound(&mut out),
                });
                debug_assert!(matches!(r, Lookup::Hit { .. }));
                black_box((&out, r));
            })
        });
    }
    g.finish();
}

fn bench_miss_path(c: &mut Criterion) {
    use std::io::{Read, Write};
    let mut g = c.benchmark_group("miss_path");
    g.throughput(Throughput::Elements(1));
    // A server thread answering every request head with one dict_http reply.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let reply = b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-EMAIL: user1@example.com\r\nPOSTFIX-DICT-RESULTS: user1@mail.example.com\r\nContent-Length: 0\r\n\r\n";
        let mut buf = [0u8; 4096];
        let mut have = Vec::new();
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            have.extend_from_slice(&buf[..n]);
            while let Some(end) = http::find_head_end(&have, 0) {
                have.drain(..end);
                if s.write_all(reply).is_err() {
                    return;
                }
            }
        }
    });
    let std_stream = std::net::TcpStream::connect(addr).unwrap();
    std_stream.set_nodelay(true).unwrap();
    // The daemon's own check on a pooled plain-HTTP connection.
    let mut pooled = Transport::Plain(mio::net::TcpStream::from_std(
        std_stream.try_clone().unwrap(),
    ));
    std_stream.set_nonblocking(true).unwrap();
    let mut scratch = vec![0u8; 4096];
    assert_eq!(
        pooled.idle(&mut scratch, 4096),
        Idle::Clean,
        "the bench's idle connection holds data"
    );
    g.bench_function("idle_check_peek", |b| {
        b.iter(|| black_box(pooled.idle(&mut scratch, 4096)))
    });
    // The round trip runs blocking (the bench has no event loop).
    std_stream.set_nonblocking(false).unwrap();
    let mut rt = std_stream;
    let mut req = Vec::new();
    http::write_get(
        &mut req,
        b"/virtual",
        "127.0.0.1",
        b"user1@example.com",
        &[],
    )
    .unwrap();
    g.bench_function("round_trip_get+parse", |b| {
        let mut buf = vec![0u8; 4096];
        b.iter(|| {
            rt.write_all(&req).unwrap();
            let mut got = 0;
            loop {
                got += rt.read(&mut buf[got..]).unwrap();
                if let Ok(Some(h)) = http::parse_head(&buf[..got]) {
                    black_box(h.results);
                    break;
                }
            }
        })
    });
    g.finish();
}

/// A policy request as Postfix 3.8 sends it at RCPT time: 31 attributes,
/// the empty ones too.
const POLICY_REQUEST: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\n\
protocol_name=ESMTP\nhelo_name=mx-10-1-2-3.example.net\nqueue_id=\n\
sender=alice@example.com\nrecipient=postmaster@example.org\nrecipient_count=0\n\
client_address=10.1.2.3\nclient_name=mx-10-1-2-3.example.net\n\
reverse_client_name=mx-10-1-2-3.example.net\ninstance=1a2b.3c4d5e6f.7a8b.0\n\
sasl_method=\nsasl_username=\nsasl_sender=\nsize=12345\nccert_subject=\n\
ccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n\
encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n\
encryption_keysize=256\netrn_domain=\nstress=\nclient_port=40123\n\
policy_context=\nserver_address=192.0.2.25\nserver_port=25\n\
compatibility_level=3.6\nmail_version=3.8.6\n\n";

fn bench_policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(1));
    let max = policy::DEFAULT_MAX_REQUEST_BYTES;
    g.bench_function("parse", |b| {
        b.iter(|| {
            black_box(
                policy::parse(black_box(POLICY_REQUEST), max)
                    .unwrap()
                    .unwrap(),
            )
        })
    });
    let mut body = Vec::with_capacity(2048);
    g.bench_function("parse+json_body", |b| {
        b.iter(|| {
            let (a, _) = policy::parse(black_box(POLICY_REQUEST), max)
                .unwrap()
                .unwrap();
            body.clear();
            policy::json_body(&a, &mut body);
            black_box(&body);
        })
    });
    g.bench_function("parse+form_body", |b| {
        b.iter(|| {
            let (a, _) = policy::parse(black_box(POLICY_REQUEST), max)
                .unwrap()
                .unwrap();
            body.clear();
            policy::form_body(&a, &mut body);
            black_box(&body);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_tcp_table, bench_netstring, bench_http, bench_cache, bench_hit_path, bench_miss_path, bench_policy
}
criterion_main!(benches);
