//! Properties of httpmapd's pure codecs (`httpmapd::codec::{hex, tcp_table,
//! netstring, http, policy}` and `httpmapd::client::parse_table`), written once and
//! run two ways:
//!
//! - by the cargo-fuzz targets in `tests/fuzz/fuzz_targets/` (nightly,
//!   libFuzzer), through the `fuzz_*` entry points that take raw bytes;
//! - by `tests/proptest_codecs.rs` on stable in every `cargo test`, which
//!   includes this file as a module (`#[path = "fuzz/src/lib.rs"]`) and calls
//!   both the structured checks with generated arguments and the same
//!   `fuzz_*` entry points with random bytes.
//!
//! Every check panics (assert) when a property fails; none may panic
//! otherwise, whatever the input.

use httpmapd::codec::http::{self, BodyDecoder, Framing, HttpError};
use httpmapd::codec::{hex, netstring, policy, tcp_table};

// ---------------------------------------------------------------------------
// Deriving structured arguments from fuzz bytes
// ---------------------------------------------------------------------------

/// Reads small integers and slices off the front of fuzz input; runs out
/// gracefully (zeros, empty slices).
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A slice whose length is the next byte (0..=255).
    pub fn short_slice(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.take(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// Pieces `(start, end)` for feeding `len` bytes: piece lengths taken from
/// `sizes` in turn (0 = an empty feed), the whole input at once when
/// `sizes` is empty or all zeros. At least one piece, even for no input.
fn pieces(len: usize, sizes: &[usize]) -> Vec<(usize, usize)> {
    if sizes.iter().all(|&s| s == 0) {
        return vec![(0, len)];
    }
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    loop {
        let end = (pos + sizes[i % sizes.len()]).min(len);
        out.push((pos, end));
        pos = end;
        i += 1;
        if pos >= len {
            return out;
        }
    }
}

// ---------------------------------------------------------------------------
// hex (%XX)
// ---------------------------------------------------------------------------

/// encode → decode is the identity; the encoding is printable ASCII without
/// spaces, as long as `encoded_len` says, and upper-case; lower-case hex
/// decodes the same.
pub fn hex_round_trip(x: &[u8]) {
    let mut enc = b"prefix".to_vec();
    hex::encode(x, &mut enc);
    assert_eq!(&enc[..6], b"prefix", "encode appends");
    let enc = &enc[6..];
    assert_eq!(enc.len(), hex::encoded_len(x));
    assert!(
        enc.iter().all(|&b| (0x21..=0x7e).contains(&b)),
        "encoded form has a byte Postfix would quote: {enc:?}"
    );
    let mut i = 0;
    while i < enc.len() {
        if enc[i] == b'%' {
            let esc = &enc[i + 1..i + 3];
            assert!(
                esc.iter()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
                "escape {esc:?} is not upper-case hex"
            );
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut dec = b"k".to_vec();
    hex::decode(enc, &mut dec).expect("own encoding decodes");
    assert_eq!(&dec[1..], x, "decode appends and round-trips");
    // The same escapes in lower case decode to the same bytes.
    let mut lower = enc.to_vec();
    let mut i = 0;
    while i < lower.len() {
        if lower[i] == b'%' {
            lower[i + 1].make_ascii_lowercase();
            lower[i + 2].make_ascii_lowercase();
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut dec2 = Vec::new();
    hex::decode(&lower, &mut dec2).expect("lower-case escapes decode");
    assert_eq!(dec2, x);
}

/// decode never panics; on success it never grows the text and
/// encode(decoded) decodes to the same; on error the offset points at a '%'
/// not followed by two hex digits, and the bytes before it were decoded.
pub fn hex_decode_any(input: &[u8]) {
    let mut out = Vec::new();
    match hex::decode(input, &mut out) {
        Ok(()) => {
            assert!(out.len() <= input.len());
            let mut again = Vec::new();
            hex::encode(&out, &mut again);
            let mut back = Vec::new();
            hex::decode(&again, &mut back).unwrap();
            assert_eq!(back, out);
        }
        Err(e) => {
            assert!(e.offset < input.len());
            assert_eq!(input[e.offset], b'%');
            let h = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_hexdigit());
            assert!(
                !(h(input.get(e.offset + 1)) && h(input.get(e.offset + 2))),
                "a good escape was reported bad at {}",
                e.offset
            );
            let mut prefix = Vec::new();
            hex::decode(&input[..e.offset], &mut prefix).expect("the prefix decodes");
            assert_eq!(out, prefix, "bytes before the bad escape are decoded");
        }
    }
}

pub fn fuzz_hex(data: &[u8]) {
    hex_round_trip(data);
    hex_decode_any(data);
}

// ---------------------------------------------------------------------------
// tcp_table
// ---------------------------------------------------------------------------

/// `get <encoded key>\n` (or `\r\n`) parses back to the key when the line
/// fits `max_line`, else `TooLong`; bytes after the line are not consumed.
pub fn tcp_request_round_trip(key: &[u8], max_line: usize, crlf: bool, trailing: &[u8]) {
    let mut line = b"get ".to_vec();
    hex::encode(key, &mut line);
    if crlf {
        line.push(b'\r');
    }
    line.push(b'\n');
    let mut buf = line.clone();
    buf.extend_from_slice(trailing);
    let mut out = b"stale".to_vec();
    let got = tcp_table::parse_request(&buf, max_line, &mut out);
    if line.len() > max_line {
        assert_eq!(got, tcp_table::Parsed::TooLong, "line of {}", line.len());
        return;
    }
    if key.is_empty() {
        assert_eq!(
            got,
            tcp_table::Parsed::Line {
                consumed: line.len(),
                result: Err(tcp_table::RequestError::MissingKey)
            }
        );
        assert!(out.is_empty());
        return;
    }
    assert_eq!(
        got,
        tcp_table::Parsed::Line {
            consumed: line.len(),
            result: Ok(())
        }
    );
    assert_eq!(out, key);
    // Every strict prefix of the line is incomplete (it fits the limit).
    for cut in [0, 1, 3, 4, line.len() / 2, line.len() - 1] {
        if cut < line.len() {
            assert_eq!(
                tcp_table::parse_request(&line[..cut], max_line, &mut out),
                tcp_table::Parsed::Incomplete,
                "cut at {cut}"
            );
        }
    }
}

/// parse_request never panics, never returns a line longer than `max_line`,
/// says `TooLong` exactly when no newline is within the first `max_line`
/// bytes of a buffer that long, and a key never outgrows its line. Walks the
/// buffer as the daemon does, request after request.
pub fn tcp_parse_request_any(buf: &[u8], max_line: usize) {
    let mut key = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let nl = rest.iter().take(max_line).position(|&b| b == b'\n');
        match tcp_table::parse_request(rest, max_line, &mut key) {
            tcp_table::Parsed::Incomplete => {
                assert!(nl.is_none());
                assert!(rest.len() < max_line, "Incomplete at {} bytes", rest.len());
                assert!(key.is_empty());
                return;
            }
            tcp_table::Parsed::TooLong => {
                assert!(nl.is_none());
                assert!(rest.len() >= max_line);
                return;
            }
            tcp_table::Parsed::Line { consumed, result } => {
                assert!(consumed >= 1 && consumed <= max_line, "line of {consumed}");
                assert_eq!(Some(consumed - 1), nl, "the line ends at the first newline");
                match result {
                    Ok(()) => {
                        assert!(rest.starts_with(b"get ") || rest.starts_with(b"get\t"));
                        assert!(!key.is_empty());
                        assert!(key.len() + 5 <= consumed, "key outgrew its line");
                    }
                    Err(_) => assert!(key.is_empty(), "key left behind on error"),
                }
                pos += consumed;
            }
        }
    }
}

/// A found reply is at most 4096 bytes, one line, and decodes to the value;
/// if it does not fit, nothing is written and the encoded length says why.
pub fn tcp_reply_found(value: &[u8]) {
    if value.is_empty() {
        return; // a precondition (debug-asserted): not found is a 500
    }
    let mut out = Vec::new();
    match tcp_table::encode_found(value, &mut out) {
        Ok(()) => {
            assert!(
                out.len() <= tcp_table::MAX_REPLY_BYTES,
                "{} bytes",
                out.len()
            );
            assert!(out.starts_with(b"200 "));
            assert_eq!(out.iter().position(|&b| b == b'\n'), Some(out.len() - 1));
            let mut dec = Vec::new();
            hex::decode(&out[4..out.len() - 1], &mut dec).unwrap();
            assert_eq!(dec, value);
        }
        Err(e) => {
            assert!(out.is_empty());
            assert_eq!(e.encoded_len, hex::encoded_len(value));
            assert!(e.encoded_len + 5 > tcp_table::MAX_REPLY_BYTES);
        }
    }
}

/// 400 and 500 replies are one line of at most 4096 bytes whose decoded
/// text is the text, or its longest prefix that fits.
pub fn tcp_reply_status(text: &[u8]) {
    type Encoder = fn(&[u8], &mut Vec<u8>);
    let encoders: [(Encoder, &[u8], &[u8]); 2] = [
        (tcp_table::encode_not_found, b"500 ", b"not found"),
        (tcp_table::encode_temp_error, b"400 ", b"temporary error"),
    ];
    for (encode, prefix, default) in encoders {
        let mut out = Vec::new();
        encode(text, &mut out);
        assert!(
            out.len() <= tcp_table::MAX_REPLY_BYTES,
            "{} bytes",
            out.len()
        );
        assert!(out.starts_with(prefix));
        assert_eq!(out.iter().position(|&b| b == b'\n'), Some(out.len() - 1));
        let mut dec = Vec::new();
        hex::decode(&out[4..out.len() - 1], &mut dec).unwrap();
        if text.is_empty() {
            assert_eq!(dec, default);
            continue;
        }
        assert!(text.starts_with(&dec), "decoded text is a prefix");
        if hex::encoded_len(text) + 5 <= tcp_table::MAX_REPLY_BYTES {
            assert_eq!(dec, text, "a text that fits is not cut");
        } else {
            // Cut, but not by more than one escape plus a UTF-8 character.
            assert!(out.len() + 3 * 4 > tcp_table::MAX_REPLY_BYTES);
            if std::str::from_utf8(text).is_ok() {
                assert!(std::str::from_utf8(&dec).is_ok(), "cut inside a character");
            }
        }
    }
}

pub fn fuzz_tcp_table(data: &[u8]) {
    let mut inp = Input::new(data);
    let max_line = usize::from(inp.u16() % 5000);
    let crlf = inp.bool();
    let key = inp.short_slice();
    tcp_request_round_trip(key, max_line, crlf, inp.short_slice());
    let rest = inp.rest();
    tcp_parse_request_any(rest, max_line);
    tcp_parse_request_any(rest, tcp_table::DEFAULT_MAX_REQUEST_BYTES);
    tcp_reply_found(rest);
    tcp_reply_status(rest);
}

// ---------------------------------------------------------------------------
// netstring / socketmap
// ---------------------------------------------------------------------------

/// encode(parts) parses back to the concatenated payload when it is within
/// `max`, else TooLong; every strict prefix is incomplete; trailing bytes
/// are not consumed.
pub fn netstring_round_trip(parts: &[&[u8]], max: usize, trailing: &[u8]) {
    let payload: Vec<u8> = parts.concat();
    let mut wire = b"x".to_vec();
    netstring::encode(parts, &mut wire);
    let wire = &wire[1..];
    assert_eq!(
        wire,
        [format!("{}:", payload.len()).as_bytes(), &payload, b","].concat()
    );
    let mut buf = wire.to_vec();
    buf.extend_from_slice(trailing);
    let got = netstring::parse(&buf, max);
    if payload.len() > max {
        assert!(
            matches!(got, Err(netstring::NetstringError::TooLong { .. })),
            "{got:?}"
        );
        return;
    }
    let (s, e, c) = got.unwrap().unwrap();
    assert_eq!(&buf[s..e], &payload[..]);
    assert_eq!(c, wire.len());
    let step = (wire.len() / 16).max(1);
    for cut in (0..wire.len()).step_by(step) {
        assert_eq!(
            netstring::parse(&wire[..cut], max),
            Ok(None),
            "cut at {cut}"
        );
    }
}

/// parse never panics; a netstring found is well-formed and within `max`;
/// "incomplete" never asks the caller to hold more than 21 + max bytes.
pub fn netstring_parse_any(buf: &[u8], max: usize) {
    match netstring::parse(buf, max) {
        Ok(None) => assert!(
            buf.len() <= max.saturating_add(21),
            "incomplete after {} bytes (max {max})",
            buf.len()
        ),
        Ok(Some((s, e, c))) => {
            assert!(s >= 2 && s <= e && e < c && c <= buf.len());
            assert_eq!(buf[s - 1], b':');
            assert!(buf[..s - 1].iter().all(u8::is_ascii_digit));
            assert_eq!(buf[c - 1], b',');
            assert_eq!(c, e + 1);
            assert!(e - s <= max);
            socketmap_split_any(&buf[s..e]);
        }
        Err(netstring::NetstringError::TooLong { len, max: m }) => {
            assert_eq!(m, max);
            // (len <= max only when the end offset overflows: max near usize::MAX)
            assert!(len > max || max > usize::MAX / 2, "TooLong {len} <= {max}");
        }
        Err(_) => {}
    }
}

/// split_request never panics; a split is at the first space, both halves
/// non-empty.
pub fn socketmap_split_any(payload: &[u8]) {
    if let Ok((name, key)) = netstring::split_request(payload) {
        assert!(!name.is_empty() && !key.is_empty());
        assert!(!name.contains(&b' '));
        assert_eq!([name, b" ", key].concat(), payload);
    }
}

/// Replies fit `max_reply` (the `OK` one, or it is refused), and parse back.
pub fn socketmap_replies(value: &[u8], max_reply: usize) {
    if !value.is_empty() {
        let mut out = Vec::new();
        match netstring::encode_ok(value, max_reply, &mut out) {
            Ok(()) => {
                let (s, e, c) = netstring::parse(&out, max_reply).unwrap().unwrap();
                assert_eq!(c, out.len());
                assert_eq!(&out[s..e], [b"OK ", value].concat());
            }
            Err(e) => {
                assert!(out.is_empty());
                assert!(value.len() + 3 > max_reply);
                assert_eq!(e.len, value.len() + 3);
            }
        }
    }
    for (encode, prefix) in [
        (
            netstring::encode_temp as fn(&[u8], usize, &mut Vec<u8>),
            b"TEMP ",
        ),
        (netstring::encode_perm, b"PERM "),
    ] {
        let mut out = Vec::new();
        encode(value, max_reply, &mut out);
        let (s, e, c) = netstring::parse(&out, usize::MAX).unwrap().unwrap();
        assert_eq!(c, out.len());
        let payload = &out[s..e];
        assert!(payload.starts_with(prefix));
        assert!(
            payload.len() <= max_reply.max(5),
            "{} > {max_reply}",
            payload.len()
        );
        assert!(value.starts_with(&payload[5..]));
    }
}

pub fn fuzz_netstring(data: &[u8]) {
    let mut inp = Input::new(data);
    let max = usize::from(inp.u16());
    let a = inp.short_slice();
    let b = inp.short_slice();
    netstring_round_trip(&[a, b], max, inp.short_slice());
    let rest = inp.rest();
    netstring_parse_any(rest, max);
    netstring_parse_any(rest, netstring::DEFAULT_MAX_QUERY_BYTES);
    socketmap_split_any(rest);
    socketmap_replies(rest, max);
}

// ---------------------------------------------------------------------------
// HTTP: heads
// ---------------------------------------------------------------------------

/// parse_head never panics; a head found is within the limits and within
/// the buffer; "incomplete" never asks for more than MAX_HEAD_BYTES; the
/// answer depends only on the head's own bytes.
pub fn http_parse_head_any(buf: &[u8]) {
    match http::parse_head(buf) {
        Ok(None) => assert!(buf.len() <= http::MAX_HEAD_BYTES, "{} bytes", buf.len()),
        Ok(Some(h)) => {
            assert!(h.consumed <= buf.len() && h.consumed <= http::MAX_HEAD_BYTES);
            assert!((200..=999).contains(&h.status), "status {}", h.status);
            assert!(h.minor_version <= 1);
            if h.framing == Framing::CloseDelimited {
                assert!(!h.keep_alive);
            }
            for v in [&h.results, &h.retmsg].into_iter().flatten() {
                let ows = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
                assert!(!ows(v.first()) && !ows(v.last()), "untrimmed {v:?}");
                assert!(!v.contains(&b'\r') && !v.contains(&b'\n'));
            }
            assert_eq!(http::parse_head(&buf[..h.consumed]), Ok(Some(h.clone())));
            let _ = http::reuse(&h, buf.len() - h.consumed);
        }
        Err(_) => {}
    }
}

/// A head we write ourselves parses to what we wrote.
pub fn http_head_round_trip(status: u16, results: &[u8], length: u64, filler: usize) {
    assert!((200..=599).contains(&status) && status != 204 && status != 304);
    let results: Vec<u8> = results
        .iter()
        .copied()
        .filter(|&b| (0x21..=0x7e).contains(&b))
        .collect();
    let mut head = format!("HTTP/1.1 {status} Whatever\r\n").into_bytes();
    for i in 0..filler {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(i)).as_bytes());
    }
    head.extend_from_slice(b"POSTFIX-DICT-RESULTS:  ");
    head.extend_from_slice(&results);
    head.extend_from_slice(format!(" \r\nContent-Length: {length}\r\n\r\n").as_bytes());
    let got = http::parse_head(&head);
    if filler + 2 > http::MAX_HEADERS {
        assert_eq!(got, Err(HttpError::TooManyHeaders));
        return;
    }
    let h = got.unwrap().unwrap();
    assert_eq!(h.status, status);
    assert_eq!(h.consumed, head.len());
    assert_eq!(h.results.as_deref(), Some(&results[..]));
    assert_eq!(h.framing, Framing::ContentLength(length));
    assert!(h.keep_alive);
    for cut in [0, head.len() / 3, head.len() - 1] {
        assert_eq!(http::parse_head(&head[..cut]), Ok(None));
    }
}

// ---------------------------------------------------------------------------
// HTTP: bodies
// ---------------------------------------------------------------------------

/// What feeding a decoder produced.
#[derive(Debug, PartialEq)]
struct Fed {
    /// The body, only compared when there was no error.
    body: Vec<u8>,
    consumed: usize,
    done: bool,
    error: Option<HttpError>,
    eof: Option<Result<(), HttpError>>,
}

/// Feeds `input` in `pieces` the way the daemon does (leftovers stay in its
/// buffer once the body is done), checking the per-call contract.
fn feed_all(framing: Framing, max_body: usize, input: &[u8], sizes: &[usize], eof: bool) -> Fed {
    let mut d = BodyDecoder::new(framing, max_body);
    let mut body = Vec::new();
    let mut consumed = 0;
    let mut error = None;
    for (_, end) in pieces(input.len(), sizes) {
        // The daemon's buffer: whatever was not consumed yet, up to `end`.
        let window = &input[consumed..end];
        match d.feed(window, &mut body) {
            Ok((n, done)) => {
                assert!(n <= window.len());
                assert_eq!(done, d.is_done());
                if !done {
                    assert_eq!(n, window.len(), "not done must consume everything");
                }
                consumed += n;
                if done {
                    // Once done, nothing more is ever consumed.
                    assert_eq!(d.feed(b"more", &mut body), Ok((0, true)));
                    break;
                }
            }
            Err(e) => {
                assert_eq!(d.feed(b"0\r\n\r\n", &mut body), Err(e.clone()), "sticky");
                error = Some(e);
                break;
            }
        }
        assert!(
            body.len() <= max_body,
            "{} > max_body {max_body}",
            body.len()
        );
    }
    assert!(
        body.len() <= max_body,
        "{} > max_body {max_body}",
        body.len()
    );
    if let Some(HttpError::BodyTooLarge { max }) = &error {
        assert_eq!(*max, max_body);
    }
    let eof = eof.then(|| d.eof());
    // After an error, what was consumed and appended before it depends on
    // how the input was cut: only the error itself is compared.
    let ok = error.is_none();
    Fed {
        body: if ok { body } else { Vec::new() },
        consumed: if ok { consumed } else { 0 },
        done: d.is_done(),
        error,
        eof,
    }
}

/// Any framing, any limit, any bytes, any feed split: no panic, the body
/// never exceeds the limit, and the outcome does not depend on the split.
pub fn http_body_any(framing: Framing, max_body: usize, input: &[u8], sizes: &[usize], eof: bool) {
    let whole = feed_all(framing, max_body, input, &[], eof);
    let split = feed_all(framing, max_body, input, sizes, eof);
    let bytewise = feed_all(framing, max_body, input, &[1], eof);
    assert_eq!(whole, split, "whole vs split {sizes:?}");
    assert_eq!(whole, bytewise, "whole vs byte by byte");
}

/// Our own chunked encoder: `body` cut in chunks of `chunk_sizes` (cycled,
/// each at least 1), sizes in either hex case with optional leading zeros
/// and extensions, then the last chunk and optional trailers.
pub fn encode_chunked(body: &[u8], chunk_sizes: &[usize], style: u8, trailers: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < body.len() {
        let size = chunk_sizes
            .get(i % chunk_sizes.len().max(1))
            .copied()
            .unwrap_or(body.len())
            .max(1)
            .min(body.len() - pos);
        let mut line = if (style >> (i % 8)) & 1 == 1 {
            format!("{size:X}")
        } else {
            format!("{size:x}")
        };
        if style & 0x10 != 0 {
            line.insert_str(0, "00");
        }
        if style & 0x20 != 0 {
            line.push_str(" ;name=\"a;b\\\" c\"; x");
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body[pos..pos + size]);
        out.extend_from_slice(b"\r\n");
        pos += size;
        i += 1;
    }
    out.extend_from_slice(if style & 0x40 != 0 {
        b"000;last\r\n"
    } else {
        b"0\r\n"
    });
    if trailers {
        out.extend_from_slice(b"Expires: never\r\nX-Checksum: abc\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// chunked encode → decode is the identity whatever the chunk split and the
/// feed split; bytes after the body are left alone; a body over the limit
/// is BodyTooLarge without ever appending more than the limit.
pub fn http_chunked_round_trip(
    body: &[u8],
    chunk_sizes: &[usize],
    style: u8,
    trailers: bool,
    feed_sizes: &[usize],
    max_body: usize,
) {
    let wire = encode_chunked(body, chunk_sizes, style, trailers);
    let mut input = wire.clone();
    input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    let fed = feed_all(Framing::Chunked, max_body, &input, feed_sizes, false);
    if body.len() <= max_body {
        assert_eq!(fed.error, None);
        assert!(fed.done);
        assert_eq!(fed.body, body);
        assert_eq!(fed.consumed, wire.len());
    } else {
        assert_eq!(fed.error, Some(HttpError::BodyTooLarge { max: max_body }));
    }
    // The whole chunked body cut short is never done, and EOF says so.
    if !wire.is_empty() {
        let short = feed_all(
            Framing::Chunked,
            max_body,
            &wire[..wire.len() - 1],
            feed_sizes,
            true,
        );
        assert!(!short.done);
        if short.error.is_none() {
            assert_eq!(short.eof, Some(Err(HttpError::UnexpectedEof)));
        }
    }
    http_body_any(Framing::Chunked, max_body, &input, feed_sizes, true);
}

/// Content-Length framing: exactly that many bytes, whatever the split.
pub fn http_length_round_trip(body: &[u8], extra: &[u8], feed_sizes: &[usize], max_body: usize) {
    let mut input = body.to_vec();
    input.extend_from_slice(extra);
    let fed = feed_all(
        Framing::ContentLength(body.len() as u64),
        max_body,
        &input,
        feed_sizes,
        true,
    );
    if body.len() <= max_body {
        assert_eq!(fed.error, None);
        assert!(fed.done);
        assert_eq!(fed.body, body);
        assert_eq!(fed.consumed, body.len());
        assert_eq!(fed.eof, Some(Ok(())));
    } else {
        assert_eq!(fed.error, Some(HttpError::BodyTooLarge { max: max_body }));
        assert_eq!(fed.consumed, 0, "too large is known before any byte");
    }
}

fn framing_from(b: u8, n: u64) -> Framing {
    match b % 4 {
        0 => Framing::NoBody,
        1 => Framing::ContentLength(n),
        2 => Framing::Chunked,
        _ => Framing::CloseDelimited,
    }
}

pub fn fuzz_http_head(data: &[u8]) {
    http_parse_head_any(data);
    // The same bytes behind a valid status line, to reach the header code.
    let mut buf = b"HTTP/1.1 200 OK\r\n".to_vec();
    buf.extend_from_slice(data);
    http_parse_head_any(&buf);
}

pub fn fuzz_http_body(data: &[u8]) {
    let mut inp = Input::new(data);
    let framing = framing_from(inp.u8(), u64::from(inp.u16()));
    let max_body = usize::from(inp.u16());
    let eof = inp.bool();
    let sizes: Vec<usize> = inp.take(8).iter().map(|&b| usize::from(b)).collect();
    let rest = inp.rest();
    http_body_any(framing, max_body, rest, &sizes, eof);
}

pub fn fuzz_chunked_round_trip(data: &[u8]) {
    let mut inp = Input::new(data);
    let style = inp.u8();
    let trailers = inp.bool();
    let max_body = usize::from(inp.u16());
    let chunk_sizes: Vec<usize> = inp.take(4).iter().map(|&b| usize::from(b)).collect();
    let feed_sizes: Vec<usize> = inp.take(4).iter().map(|&b| usize::from(b)).collect();
    let body = inp.rest();
    http_chunked_round_trip(body, &chunk_sizes, style, trailers, &feed_sizes, max_body);
    http_length_round_trip(body, b"NEXT", &feed_sizes, max_body);
}

// ---------------------------------------------------------------------------
// HTTP: the request we write
// ---------------------------------------------------------------------------

/// write_get refuses keys that could break the request (CR, LF, NUL) and
/// leaves the buffer as it was; otherwise the request is exactly the lines
/// it documents: no key can add a header or end the head early.
pub fn http_write_get(key: &[u8], extra_value: &[u8]) {
    let extra_value = String::from_utf8_lossy(extra_value).into_owned();
    let extra = vec![("X-Extra".to_string(), extra_value.clone())];
    let mut out = b"PREV".to_vec();
    let got = http::write_get(&mut out, b"/lookup?k=1", "h.test:80", key, &extra);
    let breaks = |b: &[u8]| b.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0);
    if breaks(key) || breaks(extra_value.as_bytes()) {
        assert_eq!(got, Err(()));
        assert_eq!(out, b"PREV");
        return;
    }
    assert_eq!(got, Ok(()));
    let req = &out[4..];
    assert!(req.ends_with(b"\r\n\r\n"));
    let lines: Vec<&[u8]> = req[..req.len() - 4].split(|&b| b == b'\n').collect();
    assert_eq!(lines.len(), 5, "{:?}", String::from_utf8_lossy(req));
    let want: [&[u8]; 5] = [
        b"GET /lookup?k=1 HTTP/1.1\r",
        b"Host: h.test:80\r",
        &[b"POSTFIX-DICT-EMAIL: ", key, b"\r"].concat(),
        b"Connection: keep-alive\r",
        &[b"X-Extra: ", extra_value.as_bytes()].concat(),
    ];
    for (got, want) in lines.iter().zip(want) {
        assert_eq!(*got, want);
    }
}

/// percent_encode_into keeps only URL-safe bytes and decodes back.
pub fn http_percent_encode(key: &[u8]) {
    let mut out = b"/p/".to_vec();
    http::percent_encode_into(key, &mut out);
    let enc = &out[3..];
    let mut dec = Vec::new();
    let mut i = 0;
    while i < enc.len() {
        let b = enc[i];
        if b == b'%' {
            let hexd = &enc[i + 1..i + 3];
            assert!(hexd
                .iter()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)));
            dec.push(u8::from_str_radix(std::str::from_utf8(hexd).unwrap(), 16).unwrap());
            i += 3;
        } else {
            assert!(
                b.is_ascii_alphanumeric() || b"-._~@+".contains(&b),
                "unsafe byte {b:#04x} in a URL"
            );
            dec.push(b);
            i += 1;
        }
    }
    assert_eq!(dec, key);
}

pub fn fuzz_http_request(data: &[u8]) {
    let mut inp = Input::new(data);
    let extra = inp.short_slice();
    let key = inp.rest();
    http_write_get(key, extra);
    http_percent_encode(key);
}

// ---------------------------------------------------------------------------
// The query client's table names
// ---------------------------------------------------------------------------

/// parse_table never panics on any text; tcp: and socketmap: names parse to
/// their parts.
pub fn client_parse_table(s: &str) {
    use httpmapd::client::{parse_table, SocketmapAddr, Table};
    let got = parse_table(s);
    if let Some(rest) = s.strip_prefix("tcp:") {
        assert_eq!(got, Ok(Table::Tcp(rest.to_string())));
    } else if let Ok(Table::Socketmap { addr, name }) = &got {
        let a = match addr {
            SocketmapAddr::Inet(a) => format!("socketmap:inet:{a}"),
            SocketmapAddr::Unix(p) => format!("socketmap:unix:{p}"),
        };
        assert_eq!(format!("{a}:{name}"), s);
        assert!(!name.contains(':'));
    } else if let Ok(t) = &got {
        panic!("{s:?} parsed as {t:?}");
    }
}

pub fn fuzz_client_table(data: &[u8]) {
    client_parse_table(&String::from_utf8_lossy(data));
}

// ---------------------------------------------------------------------------
// Policy delegation
// ---------------------------------------------------------------------------

/// Any bytes: parse never panics; a request it takes is at most `max` bytes,
/// ends with its empty line and has 1..=MAX_ATTRIBUTES attributes, the
/// lines before it; every shorter prefix of it is incomplete (whatever way
/// the bytes arrive, the answer is the same); the JSON and form bodies made
/// from it decode back to its attributes.
pub fn policy_parse_any(buf: &[u8], max: usize) {
    match policy::parse(buf, max) {
        Ok(Some((attrs, n))) => {
            assert!(n <= buf.len() && n <= max, "took {n} of {}", buf.len());
            let request = &buf[..n];
            assert!(request.ends_with(b"\n\n") || request.ends_with(b"\n\r\n"));
            assert!(!attrs.is_empty() && attrs.len() <= policy::MAX_ATTRIBUTES);
            let lines: Vec<&[u8]> = request[..request.len() - 1]
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty() && *l != b"\r")
                .collect();
            assert_eq!(lines.len(), attrs.len());
            for (line, (name, value)) in lines.iter().zip(attrs.iter()) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                assert_eq!(line, [name, &b"="[..], value].concat().as_slice());
                assert!(!name.is_empty() && !name.contains(&b'='));
            }
            for cut in 0..n {
                assert_eq!(policy::parse(&buf[..cut], max), Ok(None), "cut at {cut}");
            }
            policy_bodies(&attrs);
        }
        Ok(None) => assert!(buf.len() <= max),
        Err(_) => {}
    }
}

/// The JSON body is an object of strings in which each name (as UTF-8,
/// lossy) has the value of its last attribute; the form body decodes to the
/// attributes, byte for byte, in order.
fn policy_bodies(attrs: &policy::Attributes) {
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut json = Vec::new();
    policy::json_body(attrs, &mut json);
    let v: serde_json::Value = serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&json)));
    let obj = v.as_object().expect("a JSON object");
    let mut want = std::collections::BTreeMap::new();
    for (n, val) in attrs.iter() {
        want.insert(lossy(n), lossy(val));
    }
    assert_eq!(obj.len(), want.len());
    for (n, val) in &want {
        assert_eq!(obj[n].as_str(), Some(val.as_str()), "{n:?}");
    }
    let mut form = Vec::new();
    policy::form_body(attrs, &mut form);
    let got: Vec<(Vec<u8>, Vec<u8>)> = form
        .split(|&b| b == b'&')
        .map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=').expect("name=value");
            (form_decode(&pair[..eq]), form_decode(&pair[eq + 1..]))
        })
        .collect();
    let want: Vec<(Vec<u8>, Vec<u8>)> = attrs
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(got, want);
}

fn form_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b'&' | b'=' => panic!("unencoded {:?} in a form", s[i] as char),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Fuzz bytes: a limit, then the request.
pub fn fuzz_policy(data: &[u8]) {
    let mut inp = Input::new(data);
    let max = match inp.u8() {
        0 => policy::DEFAULT_MAX_REQUEST_BYTES,
        b => usize::from(b) * 8,
    };
    policy_parse_any(inp.rest(), max);
}
