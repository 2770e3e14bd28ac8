//! The HTTP/1.1 client side of dict_http, as pure functions over byte slices:
//! writing the `GET` request that carries a lookup key in the
//! `POSTFIX-DICT-EMAIL` header ([`write_get`], [`percent_encode_into`]),
//! parsing a response head and pulling out `POSTFIX-DICT-RESULTS` /
//! `POSTFIX-DICT-RETMSG` ([`parse_head`]), deciding the body framing by
//! RFC 9112 §6.3 ([`Framing`]), decoding the body incrementally
//! ([`BodyDecoder`]) and deciding whether the connection may be reused
//! ([`reuse`], [`NoReuse`]). It owns no sockets and no clocks, never panics
//! on any input, and every decoder has an explicit limit.
//!
//! Strictness choices, since we only talk to servers the operator configured
//! and a desynchronised keep-alive connection is worse than a failed lookup:
//! `Content-Length` together with `Transfer-Encoding` is an error; the only
//! transfer coding accepted is a lone `chunked`; `Transfer-Encoding` in an
//! HTTP/1.0 response is an error (RFC 9112 §6.1: "faulty framing"); chunked
//! framing requires CRLF everywhere (size lines, after data, trailers) and a
//! bare LF there is [`HttpError::BadChunk`]. Only the dict_http header names
//! may be spelled with `_` for `-`; `Content_Length` and friends are not
//! recognised as framing headers.

use std::fmt;

/// A response head (all 1xx heads plus the final one) larger than this is an error.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// More header lines than this in one head is an error.
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line, including extensions, excluding the CRLF.
pub const MAX_CHUNK_LINE_BYTES: usize = 1024;
/// Largest trailer section (all trailer lines and the final CRLF).
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a response could not be parsed or framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The head did not end within [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header lines.
    TooManyHeaders,
    /// The httparse error text, or ours.
    Malformed(&'static str),
    /// A `Content-Length` value that is not a plain decimal `u64`.
    BadContentLength,
    /// `Content-Length` duplicates that differ, or `Transfer-Encoding` with `Content-Length`.
    ConflictingLength,
    /// A transfer coding other than a lone `chunked`.
    UnsupportedTransferEncoding,
    /// Invalid chunked framing (size line, CRLF, trailers, limits).
    BadChunk,
    /// The body is longer than the caller's limit.
    BodyTooLarge {
        /// The limit that was exceeded.
        max: usize,
    },
    /// The connection closed before the framing said the body was complete.
    UnexpectedEof,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::HeadTooLarge => f.write_str("response head too large"),
            HttpError::TooManyHeaders => f.write_str("too many response headers"),
            HttpError::Malformed(what) => write!(f, "malformed response: {what}"),
            HttpError::BadContentLength => f.write_str("invalid content-length"),
            HttpError::ConflictingLength => f.write_str("conflicting body length headers"),
            HttpError::UnsupportedTransferEncoding => f.write_str("unsupported transfer-encoding"),
            HttpError::BadChunk => f.write_str("invalid chunked body"),
            HttpError::BodyTooLarge { max } => write!(f, "response body larger than {max} bytes"),
            HttpError::UnexpectedEof => f.write_str("connection closed before end of body"),
        }
    }
}

impl std::error::Error for HttpError {}

fn has_ctl_break(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
}

/// Appends a GET request for `key` to `out`. `target` is the request-target
/// (path + query, already percent-encoded by the caller). Writes exactly:
///
/// ```text
/// GET {target} HTTP/1.1\r\n
/// Host: {host}\r\n
/// POSTFIX-DICT-EMAIL: {key raw bytes}\r\n
/// Connection: keep-alive\r\n
/// {name}: {value}\r\n        (for each extra header, in order)
/// \r\n
/// ```
///
/// The key bytes go raw (UTF-8 passes through). A key containing CR, LF or
/// NUL could inject headers or split the request, so it is refused with
/// `Err(())` and the caller answers the lookup with an error. The same
/// check is applied to `target`, `host` and the extra headers (these come
/// from configuration and should already be clean). On `Err`, `out` is left
/// exactly as it was.
#[allow(clippy::result_unit_err)]
pub fn write_get(
    out: &mut Vec<u8>,
    target: &[u8],
    host: &str,
    key: &[u8],
    extra: &[(String, String)],
) -> Result<(), ()> {
    write_head(
        out,
        b"GET",
        target,
        host,
        &[(b"POSTFIX-DICT-EMAIL", key)],
        extra,
    )
}

/// Writes a `POST` carrying a policy request: `body` with its
/// `Content-Length` (never chunked), `content_type`, and the request id in
/// `POSTFIX-POLICY-ID` (a server may echo it back, proving whose reply it
/// is). Like [`write_get`], refuses CR, LF and NUL in the header fields.
#[allow(clippy::result_unit_err)]
pub fn write_post(
    out: &mut Vec<u8>,
    target: &[u8],
    host: &str,
    content_type: &str,
    id: &str,
    body: &[u8],
    extra: &[(String, String)],
) -> Result<(), ()> {
    let length = body.len().to_string();
    let fields: [(&[u8], &[u8]); 3] = [
        (b"POSTFIX-POLICY-ID", id.as_bytes()),
        (b"Content-Type", content_type.as_bytes()),
        (b"Content-Length", length.as_bytes()),
    ];
    write_head(out, b"POST", target, host, &fields, extra)?;
    out.extend_from_slice(body);
    Ok(())
}

/// The head of a request: the request line, `Host`, `fields`, `Connection:
/// keep-alive`, the `extra` headers, the empty line. Refuses (`Err`, `out`
/// untouched) CR, LF or NUL in the target, the host and every header value
/// or name.
fn write_head(
    out: &mut Vec<u8>,
    method: &[u8],
    target: &[u8],
    host: &str,
    fields: &[(&[u8], &[u8])],
    extra: &[(String, String)],
) -> Result<(), ()> {
    if has_ctl_break(target)
        || has_ctl_break(host.as_bytes())
        || fields.iter().any(|(_, v)| has_ctl_break(v))
        || extra
            .iter()
            .any(|(n, v)| has_ctl_break(n.as_bytes()) || has_ctl_break(v.as_bytes()))
    {
        return Err(());
    }
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in fields {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: keep-alive\r\n");
    for (name, value) in extra {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Percent-encodes a key for use inside a URL path or query (`{key}`
/// substitution): unreserved bytes (ALPHA DIGIT `-` `.` `_` `~`) and `@` are
/// kept, everything else becomes `%XX` with upper-case hex. `+` is encoded
/// (`%2B`): query-string parsers read a raw `+` as a space, and `user+ext@`
/// keys are common in mail.
pub fn percent_encode_into(key: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in key {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// A parsed final response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Status code of the final (non-1xx) response.
    pub status: u16,
    /// 0 or 1 (HTTP/1.0 or HTTP/1.1).
    pub minor_version: u8,
    /// Bytes of the head, including any skipped 1xx heads before it.
    pub consumed: usize,
    /// `POSTFIX-DICT-RESULTS` (or `_` spelling) value, first one wins, OWS-trimmed.
    pub results: Option<Vec<u8>>,
    /// `POSTFIX-DICT-RETMSG` (or `_` spelling) value, first one wins, OWS-trimmed.
    pub retmsg: Option<Vec<u8>>,
    /// `POSTFIX-DICT-EMAIL` (or `_` spelling): the key the server says it
    /// answers (the key echo), first one wins, OWS-trimmed.
    pub echo: Option<Vec<u8>>,
    /// `POSTFIX-POLICY-ID`: the policy request id the server says it
    /// answers, first one wins, OWS-trimmed.
    pub policy_id: Option<Vec<u8>>,
    /// How the body is delimited.
    pub framing: Framing,
    /// HTTP/1.1 without `Connection: close`, or HTTP/1.0 with
    /// `Connection: keep-alive` (and without `close`); always false if the
    /// framing is [`Framing::CloseDelimited`].
    pub keep_alive: bool,
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// 1xx/204/304: no body, whatever the headers say.
    NoBody,
    /// Exactly this many bytes.
    ContentLength(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// The body runs until the server closes the connection.
    CloseDelimited,
}

/// Trims optional whitespace (SP / HTAB) at both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Non-empty, OWS-trimmed elements of a comma-separated list value.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|s| !s.is_empty())
}

/// Case-insensitive name match where `_` and `-` are the same (dict_http only).
fn dict_name_is(name: &str, want: &str) -> bool {
    let norm = |b: u8| {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    };
    name.len() == want.len()
        && name
            .bytes()
            .zip(want.bytes())
            .all(|(a, b)| norm(a) == norm(b))
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn map_httparse(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders,
        httparse::Error::HeaderName => HttpError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HttpError::Malformed("invalid header value"),
        httparse::Error::NewLine => HttpError::Malformed("invalid new line"),
        httparse::Error::Status => HttpError::Malformed("invalid response status"),
        httparse::Error::Token => HttpError::Malformed("invalid token"),
        httparse::Error::Version => HttpError::Malformed("invalid http version"),
    }
}

/// Parses a response head at the front of `buf`.
///
/// `Ok(None)` means incomplete: read more and call again with the grown
/// buffer. If the head (1xx heads included) does not end within
/// [`MAX_HEAD_BYTES`] and `buf` is longer than that, the answer is
/// [`HttpError::HeadTooLarge`]. 1xx responses are skipped (their bytes count
/// in `consumed`); 101 is [`HttpError::Malformed`] since we never ask to
/// upgrade. See `framing` below for how the body is delimited.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut offset = 0;
    loop {
        let rest = window.get(offset..).unwrap_or_default();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(rest).map_err(map_httparse)? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial if buf.len() > MAX_HEAD_BYTES => {
                return Err(HttpError::HeadTooLarge)
            }
            httparse::Status::Partial => return Ok(None),
        };
        let (Some(status), Some(minor_version)) = (resp.code, resp.version) else {
            return Err(HttpError::Malformed("incomplete status line"));
        };
        offset += n;
        match status {
            101 => return Err(HttpError::Malformed("unexpected 101 switching protocols")),
            100..=199 => continue,
            200..=999 => {}
            _ => return Err(HttpError::Malformed("invalid response status")),
        }
        return finish_head(status, minor_version, offset, resp.headers).map(Some);
    }
}

fn finish_head(
    status: u16,
    minor_version: u8,
    consumed: usize,
    headers: &[httparse::Header<'_>],
) -> Result<Head, HttpError> {
    let mut results = None;
    let mut retmsg = None;
    let mut echo = None;
    let mut policy_id = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in headers {
        if results.is_none() && dict_name_is(h.name, "postfix-dict-results") {
            results = Some(trim_ows(h.value).to_vec());
        } else if retmsg.is_none() && dict_name_is(h.name, "postfix-dict-retmsg") {
            retmsg = Some(trim_ows(h.value).to_vec());
        } else if echo.is_none() && dict_name_is(h.name, "postfix-dict-email") {
            echo = Some(trim_ows(h.value).to_vec());
        } else if policy_id.is_none() && dict_name_is(h.name, "postfix-policy-id") {
            policy_id = Some(trim_ows(h.value).to_vec());
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in list_items(h.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let framing = framing(status, minor_version, headers)?;
    let keep_alive =
        framing != Framing::CloseDelimited && !close && (minor_version >= 1 || keep_alive_token);
    Ok(Head {
        status,
        minor_version,
        consumed,
        results,
        retmsg,
        echo,
        policy_id,
        framing,
        keep_alive,
    })
}

/// Where a head ends: the index just past the first empty line (`\n\n` or
/// `\n\r\n`) found at or after `from`, or `None`. A caller reading a head
/// in pieces remembers how far it looked (`buf.len()` less 2, so a line end
/// split across reads is still seen) and calls [`parse_head`] only once an
/// end is there: the head is scanned once, not once per read, however the
/// server trickles it.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Decides body framing for a response to GET, following RFC 9112 §6.3 in
/// order (items 2 and 6 do not apply: we never send CONNECT and this is a
/// response):
///
/// 1. 1xx, 204 and 304 have no body, regardless of header fields.
/// 3. `Transfer-Encoding` present: with `Content-Length` too we refuse
///    ([`HttpError::ConflictingLength`]; the RFC allows treating it as
///    smuggling); in an HTTP/1.0 response it is faulty framing
///    ([`HttpError::Malformed`]); a lone `chunked` is [`Framing::Chunked`];
///    anything else (`gzip, chunked`, `identity`, an empty list, `chunked`
///    twice) is [`HttpError::UnsupportedTransferEncoding`] since we cannot
///    decode it.
/// 4. `Content-Length` values (several headers and/or comma lists) must each
///    be plain decimal digits fitting a `u64` ([`HttpError::BadContentLength`])
///    and all equal ([`HttpError::ConflictingLength`]).
/// 5. A valid `Content-Length` gives [`Framing::ContentLength`].
/// 7. Otherwise the body runs to connection close.
fn framing(
    status: u16,
    minor_version: u8,
    headers: &[httparse::Header<'_>],
) -> Result<Framing, HttpError> {
    // 1.
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::NoBody);
    }
    let mut te_seen = false;
    let mut codings = 0usize;
    let mut last_is_chunked = false;
    let mut length: Option<u64> = None;
    let mut cl_seen = false;
    let mut cl_conflict = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_seen = true;
            for coding in list_items(h.value) {
                codings += 1;
                last_is_chunked = coding.eq_ignore_ascii_case(b"chunked");
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            cl_seen = true;
            // An empty value or empty list element is not a length.
            for item in h.value.split(|&b| b == b',').map(trim_ows) {
                let n = parse_decimal(item).ok_or(HttpError::BadContentLength)?;
                match length {
                    Some(prev) if prev != n => cl_conflict = true,
                    _ => length = Some(n),
                }
            }
        }
    }
    // 3.
    if te_seen {
        if cl_seen {
            return Err(HttpError::ConflictingLength);
        }
        if minor_version == 0 {
            return Err(HttpError::Malformed(
                "transfer-encoding in http/1.0 response",
            ));
        }
        return if codings == 1 && last_is_chunked {
            Ok(Framing::Chunked)
        } else {
            Err(HttpError::UnsupportedTransferEncoding)
        };
    }
    // 4. and 5.
    if cl_conflict {
        return Err(HttpError::ConflictingLength);
    }
    if let Some(n) = length {
        return Ok(Framing::ContentLength(n));
    }
    // 7.
    Ok(Framing::CloseDelimited)
}

/// Decoder state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `remaining` > 0 bytes of a Content-Length body left.
    Length { remaining: u64 },
    /// Everything until EOF is body.
    Close,
    /// Start of a chunk-size line: a hex digit must come.
    SizeStart,
    /// Inside the chunk-size hex digits.
    SizeDigits,
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    /// Inside chunk extensions, ignored until CR. Quoted strings cannot
    /// contain CR or LF, so no quote tracking is needed to find the line end.
    Ext,
    /// Saw CR ending the size line; LF must follow.
    SizeLf,
    /// Inside chunk data.
    Data { remaining: u64 },
    /// After chunk data: CR must come.
    DataCr,
    /// After chunk data CR: LF must come.
    DataLf,
    /// Start of a trailer line or of the final empty line.
    TrailerStart,
    /// Inside a trailer line (discarded).
    TrailerLine,
    /// Saw CR ending a trailer line; LF must follow.
    TrailerLf,
    /// Saw CR of the final empty line; LF must follow.
    FinalLf,
    /// Body complete.
    Done,
}

/// Incremental body decoder for one response.
///
/// Body bytes are appended to the `body_out` the caller passes to
/// [`feed`](Self::feed) (the caller may clear or ignore it when it does not
/// need the body); at most `max_body` bytes in total, beyond which
/// [`HttpError::BodyTooLarge`] (raised as early as the framing reveals it:
/// a too large Content-Length or chunk size fails before its data arrives).
///
/// Chunked decoding is strict about CRLF: the chunk-size line, the CRLF after
/// each chunk's data, trailer lines and the final empty line must all end in
/// CRLF; a bare LF is [`HttpError::BadChunk`]. Chunk sizes are hex, overflow
/// checked, with optional whitespace before `;`-extensions; the size line
/// (extensions included) is limited to [`MAX_CHUNK_LINE_BYTES`]. Trailers are
/// read and discarded, limited to [`MAX_TRAILER_BYTES`] (over is `BadChunk`).
/// Errors are sticky: after one, every call returns it again.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    max_body: usize,
    body_len: usize,
    chunk_size: u64,
    line_len: usize,
    trailer_len: usize,
    failed: Option<HttpError>,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`, keeping at most `max_body` bytes.
    pub fn new(framing: Framing, max_body: usize) -> Self {
        let state = match framing {
            Framing::NoBody | Framing::ContentLength(0) => State::Done,
            Framing::ContentLength(n) => State::Length { remaining: n },
            Framing::Chunked => State::SizeStart,
            Framing::CloseDelimited => State::Close,
        };
        BodyDecoder {
            state,
            max_body,
            body_len: 0,
            chunk_size: 0,
            line_len: 0,
            trailer_len: 0,
            failed: None,
        }
    }

    /// Consumes as much of `input` as it can; returns `(consumed, done)`.
    /// Once done, bytes after the body are not consumed: on a keep-alive
    /// connection they would be garbage, and the caller treats leftover
    /// bytes as a reason not to reuse it ([`NoReuse::ExtraBytes`]).
    pub fn feed(
        &mut self,
        input: &[u8],
        body_out: &mut Vec<u8>,
    ) -> Result<(usize, bool), HttpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.step(input, body_out) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The connection hit EOF. `Ok(())` if that completes the body
    /// (close-delimited, or already done), else [`HttpError::UnexpectedEof`].
    pub fn eof(&mut self) -> Result<(), HttpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => {
                self.failed = Some(HttpError::UnexpectedEof);
                Err(HttpError::UnexpectedEof)
            }
        }
    }

    /// True once the whole body (and for chunked, the trailers) has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn budget(&self) -> u64 {
        (self.max_body - self.body_len) as u64
    }

    fn too_large(&self) -> HttpError {
        HttpError::BodyTooLarge { max: self.max_body }
    }

    /// Appends at most `remaining` bytes from `input` to the body; returns how many.
    fn take(
        &mut self,
        input: &[u8],
        remaining: u64,
        body_out: &mut Vec<u8>,
    ) -> Result<usize, HttpError> {
        let n = remaining.min(input.len() as u64) as usize;
        if n > self.max_body - self.body_len {
            return Err(self.too_large());
        }
        body_out.extend_from_slice(&input[..n]);
        self.body_len += n;
        Ok(n)
    }

    fn step(&mut self, input: &[u8], body_out: &mut Vec<u8>) -> Result<(usize, bool), HttpError> {
        let mut i = 0;
        loop {
            let rest = &input[i..];
            match self.state {
                State::Done => return Ok((i, true)),
                State::Length { remaining } => {
                    if remaining > self.budget() {
                        return Err(self.too_large());
                    }
                    let n = self.take(rest, remaining, body_out)?;
                    i += n;
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        State::Done
                    } else {
                        State::Length { remaining }
                    };
                    if remaining != 0 {
                        return Ok((i, false));
                    }
                }
                State::Close => {
                    let n = self.take(rest, u64::MAX, body_out)?;
                    return Ok((i + n, false));
                }
                State::Data { remaining } => {
                    if rest.is_empty() {
                        return Ok((i, false));
                    }
                    let n = self.take(rest, remaining, body_out)?;
                    i += n;
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining }
                    };
                }
                _ => {
                    let Some(&b) = rest.first() else {
                        return Ok((i, false));
                    };
                    i += 1;
                    self.chunk_byte(b)?;
                }
            }
        }
    }

    /// One byte of chunked framing outside chunk data.
    fn chunk_byte(&mut self, b: u8) -> Result<(), HttpError> {
        let bad = Err(HttpError::BadChunk);
        match self.state {
            State::SizeStart | State::SizeDigits | State::SizeWs | State::Ext if b != b'\r' => {
                self.line_len += 1;
                if self.line_len > MAX_CHUNK_LINE_BYTES {
                    return bad;
                }
            }
            State::TrailerStart | State::TrailerLine | State::TrailerLf | State::FinalLf => {
                self.trailer_len += 1;
                if self.trailer_len > MAX_TRAILER_BYTES {
                    return bad;
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (State::SizeStart | State::SizeDigits, _) if b.is_ascii_hexdigit() => {
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    _ => (b | 0x20) - b'a' + 10,
                };
                self.chunk_size = match self
                    .chunk_size
                    .checked_mul(16)
                    .and_then(|v| v.checked_add(u64::from(digit)))
                {
                    Some(v) => v,
                    None => return bad,
                };
                State::SizeDigits
            }
            (State::SizeDigits | State::SizeWs, b' ' | b'\t') => State::SizeWs,
            (State::SizeDigits | State::SizeWs | State::Ext, b';') => State::Ext,
            (State::SizeDigits | State::SizeWs | State::Ext, b'\r') => State::SizeLf,
            (State::Ext, _) if b == b'\t' || !(b.is_ascii_control()) => State::Ext,
            (State::SizeLf, b'\n') => {
                let size = self.chunk_size;
                self.chunk_size = 0;
                self.line_len = 0;
                if size == 0 {
                    State::TrailerStart
                } else if size > self.budget() {
                    return Err(self.too_large());
                } else {
                    State::Data { remaining: size }
                }
            }
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::SizeStart,
            (State::TrailerStart, b'\r') => State::FinalLf,
            (State::TrailerLine, b'\r') => State::TrailerLf,
            (State::TrailerStart | State::TrailerLine, b'\n' | 0) => return bad,
            (State::TrailerStart | State::TrailerLine, _) => State::TrailerLine,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::FinalLf, b'\n') => State::Done,
            _ => return bad,
        };
        Ok(())
    }
}

/// Why a connection cannot go back to the pool after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReuse {
    /// HTTP/1.1 response with `Connection: close`.
    ServerSaidClose,
    /// The body ran to connection close.
    CloseDelimited,
    /// HTTP/1.0 response without `Connection: keep-alive` (or with `close`).
    Http10,
    /// Bytes arrived after the end of the response.
    ExtraBytes,
    /// The response could not be parsed or framed (set by the caller).
    Error,
}

impl fmt::Display for NoReuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoReuse::ServerSaidClose => "server said connection: close",
            NoReuse::CloseDelimited => "close-delimited body",
            NoReuse::Http10 => "http/1.0 without keep-alive",
            NoReuse::ExtraBytes => "extra bytes after response",
            NoReuse::Error => "response error",
        })
    }
}

/// Decides reuse after the body is done: `Ok(())` means the connection may go
/// back to the pool. `leftover_bytes` is what was read past the end of the
/// body. Checked in order: close-delimited framing, `keep_alive` false
/// (reported as [`NoReuse::Http10`] for HTTP/1.0, else
/// [`NoReuse::ServerSaidClose`]), leftover bytes.
pub fn reuse(head: &Head, leftover_bytes: usize) -> Result<(), NoReuse> {
    if head.framing == Framing::CloseDelimited {
        Err(NoReuse::CloseDelimited)
    } else if !head.keep_alive {
        Err(if head.minor_version == 0 {
            NoReuse::Http10
        } else {
            NoReuse::ServerSaidClose
        })
    } else if leftover_bytes > 0 {
        Err(NoReuse::ExtraBytes)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, HttpError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn framing_table() {
        use Framing::*;
        use HttpError::*;
        let ok = |f: Framing| Ok::<_, HttpError>(f);
        let cases: &[(&str, Result<Framing, HttpError>)] = &[
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                ok(ContentLength(5)),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length:   0  \r\n\r\n",
                ok(ContentLength(0)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                ok(Chunked),
            ),
            (
                "HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Chunked\r\n\r\n",
                ok(Chunked),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Err(ConflictingLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(ConflictingLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err(UnsupportedTransferEncoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(UnsupportedTransferEncoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                Err(UnsupportedTransferEncoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Err(UnsupportedTransferEncoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n",
                Err(UnsupportedTransferEncoding),
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(Malformed("transfer-encoding in http/1.0 response")),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                ok(ContentLength(5)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                ok(ContentLength(5)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(ConflictingLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5,6\r\n\r\n",
                Err(ConflictingLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
                ok(ContentLength(u64::MAX)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent_Length: 5\r\n\r\n",
                ok(CloseDelimited),
            ),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                ok(NoBody),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                ok(NoBody),
            ),
            ("HTTP/1.1 404 Not Found\r\n\r\n", ok(CloseDelimited)),
            ("HTTP/1.0 200 OK\r\n\r\n", ok(CloseDelimited)),
        ];
        for (input, want) in cases {
            let got = head(input).map(|h| h.expect("complete").framing);
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn head_fields_table() {
        // (input, status, minor, keep_alive, results, retmsg)
        type Row = (
            &'static str,
            u16,
            u8,
            bool,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: &[Row] = &[
            ("HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: a@b\r\nContent-Length: 0\r\n\r\n", 200, 1, true, Some("a@b"), None),
            ("HTTP/1.1 200 OK\r\npostfix_dict_results:  x y \t\r\nContent-Length: 0\r\n\r\n", 200, 1, true, Some("x y"), None),
            ("HTTP/1.1 200 OK\r\nPostfix-Dict_Results: m\r\nPOSTFIX-DICT-RESULTS: second\r\nContent-Length: 0\r\n\r\n", 200, 1, true, Some("m"), None),
            ("HTTP/1.1 200 OK\r\nPOSTFIX_DICT_RESULTS: u\r\nPOSTFIX-DICT-RESULTS: h\r\nContent-Length: 0\r\n\r\n", 200, 1, true, Some("u"), None),
            ("HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS:\r\nContent-Length: 0\r\n\r\n", 200, 1, true, Some(""), None),
            ("HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS:   \r\nContent-Length: 0\r\n\r\n", 200, 1, true, Some(""), None),
            ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404, 1, true, None, None),
            ("HTTP/1.1 500 Oops\r\npostfix-dict-retmsg: db down \r\nContent-Length: 0\r\n\r\n", 500, 1, true, None, Some("db down")),
            ("HTTP/1.1 500 Oops\r\nPOSTFIX_DICT_RETMSG: x\r\nContent-Length: 0\r\n\r\n", 500, 1, true, None, Some("x")),
            ("HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTSX: no\r\nContent-Length: 0\r\n\r\n", 200, 1, true, None, None),
            ("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 200, 1, false, None, None),
            ("HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\nContent-Length: 0\r\n\r\n", 200, 1, false, None, None),
            ("HTTP/1.1 200 OK\r\nConnection: closed\r\nContent-Length: 0\r\n\r\n", 200, 1, true, None, None),
            ("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", 200, 0, false, None, None),
            ("HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", 200, 0, true, None, None),
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", 200, 0, false, None, None),
            ("HTTP/1.1 200 OK\r\n\r\n", 200, 1, false, None, None),
            ("HTTP/1.1 204 No Content\r\n\r\n", 204, 1, true, None, None),
        ];
        for &(input, status, minor, ka, results, retmsg) in cases {
            let h = head(input).unwrap().unwrap();
            assert_eq!(h.status, status, "{input:?}");
            assert_eq!(h.minor_version, minor, "{input:?}");
            assert_eq!(h.keep_alive, ka, "{input:?}");
            assert_eq!(
                h.results.as_deref(),
                results.map(str::as_bytes),
                "{input:?}"
            );
            assert_eq!(h.retmsg.as_deref(), retmsg.map(str::as_bytes), "{input:?}");
            assert_eq!(h.consumed, input.len(), "{input:?}");
        }
    }

    #[test]
    fn informational_heads() {
        let cases: &[(&str, Result<u16, HttpError>)] = &[
            ("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Ok(200)),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n",
                Ok(404),
            ),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", Err(HttpError::Malformed("unexpected 101 switching protocols"))),
            ("HTTP/1.1 099 Odd\r\n\r\n", Err(HttpError::Malformed("invalid response status"))),
            ("HTTP/2.0 200 OK\r\n\r\n", Err(HttpError::Malformed("invalid http version"))),
            ("garbage\r\n\r\n", Err(HttpError::Malformed("invalid http version"))),
        ];
        for (input, want) in cases {
            let got = head(input).map(|h| {
                let h = h.expect("complete");
                assert_eq!(h.consumed, input.len());
                h.status
            });
            assert_eq!(&got, want, "{input:?}");
        }
        // Bytes after the head are not consumed.
        let h = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            .unwrap()
            .unwrap();
        assert_eq!(h.consumed, 63);
    }

    #[test]
    fn head_split_at_every_byte() {
        let inputs = [
            "HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: a,b\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.0 500 X\r\nPOSTFIX_DICT_RETMSG: no\r\n\r\n",
        ];
        for input in inputs {
            let full = head(input).unwrap().unwrap();
            assert_eq!(full.consumed, input.len());
            for i in 0..input.len() {
                assert_eq!(
                    parse_head(&input.as_bytes()[..i]),
                    Ok(None),
                    "{input:?} cut at {i}"
                );
            }
            let mut more = input.as_bytes().to_vec();
            more.extend_from_slice(b"body");
            assert_eq!(parse_head(&more), Ok(Some(full)));
        }
    }

    #[test]
    fn head_limits() {
        let filler = "X-Filler: ".to_string() + &"a".repeat(1000) + "\r\n";
        let big =
            "HTTP/1.1 200 OK\r\n".to_string() + &filler.repeat(MAX_HEAD_BYTES / filler.len() + 1);
        // Incomplete and already past the limit.
        assert_eq!(parse_head(big.as_bytes()), Err(HttpError::HeadTooLarge));
        // Complete but too large.
        let complete = big.clone() + "\r\n";
        assert_eq!(
            parse_head(complete.as_bytes()),
            Err(HttpError::HeadTooLarge)
        );
        // Incomplete, at the limit exactly: still "read more".
        assert_eq!(parse_head(&big.as_bytes()[..MAX_HEAD_BYTES]), Ok(None));
        // Many 1xx heads count towards the limit too.
        let many_1xx = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_HEAD_BYTES / 25 + 1);
        assert_eq!(
            parse_head(many_1xx.as_bytes()),
            Err(HttpError::HeadTooLarge)
        );

        let headers = |n: usize| {
            let mut s = "HTTP/1.1 200 OK\r\n".to_string();
            for i in 0..n {
                s += &format!("X-H{i}: v\r\n");
            }
            s + "\r\n"
        };
        assert!(parse_head(headers(MAX_HEADERS).as_bytes())
            .unwrap()
            .is_some());
        assert_eq!(
            parse_head(headers(MAX_HEADERS + 1).as_bytes()),
            Err(HttpError::TooManyHeaders)
        );
    }

    /// Feeds `input` all at once and one byte at a time; both must agree.
    /// Returns (body, consumed) or the error.
    fn decode(
        framing: Framing,
        max: usize,
        input: &[u8],
        eof: bool,
    ) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let run = |step: usize| -> Result<(Vec<u8>, usize, bool), HttpError> {
            let mut d = BodyDecoder::new(framing, max);
            let mut body = Vec::new();
            let mut pos = 0;
            while pos < input.len() {
                let end = (pos + step).min(input.len());
                let (n, done) = d.feed(&input[pos..end], &mut body)?;
                assert_eq!(done, d.is_done());
                if !done {
                    assert_eq!(n, end - pos, "not done yet must consume all");
                }
                assert!(n <= end - pos);
                pos += n;
                if done {
                    break;
                }
            }
            if eof {
                d.eof()?;
            }
            Ok((body, pos, d.is_done()))
        };
        let whole = run(input.len().max(1));
        let bytewise = run(1);
        assert_eq!(whole, bytewise, "whole vs bytewise for {input:?}");
        whole
    }

    #[test]
    fn body_table() {
        use Framing::*;
        use HttpError::*;
        type Row = (
            Framing,
            usize,
            &'static str,
            bool,
            Result<(&'static str, usize, bool), HttpError>,
        );
        let cases: &[Row] = &[
            (
                ContentLength(5),
                100,
                "hello",
                false,
                Ok(("hello", 5, true)),
            ),
            (
                ContentLength(5),
                100,
                "helloEXTRA",
                false,
                Ok(("hello", 5, true)),
            ),
            (ContentLength(5), 100, "hel", false, Ok(("hel", 3, false))),
            (ContentLength(5), 100, "hel", true, Err(UnexpectedEof)),
            (ContentLength(5), 100, "hello", true, Ok(("hello", 5, true))),
            (ContentLength(0), 100, "", true, Ok(("", 0, true))),
            (
                ContentLength(5),
                4,
                "hello",
                false,
                Err(BodyTooLarge { max: 4 }),
            ),
            (
                ContentLength(u64::MAX),
                4,
                "h",
                false,
                Err(BodyTooLarge { max: 4 }),
            ),
            (NoBody, 100, "junk", false, Ok(("", 0, true))),
            (NoBody, 100, "", true, Ok(("", 0, true))),
            (
                CloseDelimited,
                100,
                "all of it",
                false,
                Ok(("all of it", 9, false)),
            ),
            (
                CloseDelimited,
                100,
                "all of it",
                true,
                Ok(("all of it", 9, true)),
            ),
            (
                CloseDelimited,
                5,
                "too long",
                false,
                Err(BodyTooLarge { max: 5 }),
            ),
            (
                Chunked,
                100,
                "5\r\nhello\r\n0\r\n\r\n",
                false,
                Ok(("hello", 15, true)),
            ),
            (
                Chunked,
                100,
                "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT",
                false,
                Ok(("hello world", 26, true)),
            ),
            (
                Chunked,
                100,
                "A\r\n0123456789\r\n0\r\n\r\n",
                false,
                Ok(("0123456789", 20, true)),
            ),
            (
                Chunked,
                100,
                "a\r\n0123456789\r\n000\r\n\r\n",
                false,
                Ok(("0123456789", 22, true)),
            ),
            (
                Chunked,
                100,
                "5 ;ext=1; q=\"a;b\\\"\r\"\r\nhello\r\n0;last\r\nExpires: never\r\nX-T: 1\r\n\r\nX",
                false,
                Err(BadChunk),
            ),
            (
                Chunked,
                100,
                "5 ;ext=1; q=\"a;b\\\" c\"\r\nhello\r\n0;last\r\nExpires: never\r\nX-T: 1\r\n\r\nX",
                false,
                Ok(("hello", 64, true)),
            ),
            (
                Chunked,
                100,
                "5\t; x\r\nhello\r\n0\r\n\r\n",
                false,
                Ok(("hello", 19, true)),
            ),
            (Chunked, 100, "ffffffffffffffffff\r\n", false, Err(BadChunk)),
            (Chunked, 100, "10000000000000000\r\n", false, Err(BadChunk)),
            (
                Chunked,
                100,
                "ffffffffffffffff\r\n",
                false,
                Err(BodyTooLarge { max: 100 }),
            ),
            (
                Chunked,
                4,
                "5\r\nhello\r\n0\r\n\r\n",
                false,
                Err(BodyTooLarge { max: 4 }),
            ),
            (
                Chunked,
                8,
                "4\r\nhell\r\n4\r\no wo\r\n4\r\nrld!\r\n0\r\n\r\n",
                false,
                Err(BodyTooLarge { max: 8 }),
            ),
            (Chunked, 100, "5\r\nhelloXY0\r\n\r\n", false, Err(BadChunk)),
            (Chunked, 100, "5\r\nhello\n0\r\n\r\n", false, Err(BadChunk)),
            (Chunked, 100, "5\r\nhello\r0\r\n\r\n", false, Err(BadChunk)),
            (Chunked, 100, "5\nhello\r\n0\r\n\r\n", false, Err(BadChunk)),
            (Chunked, 100, "0\r\n\n", false, Err(BadChunk)),
            (Chunked, 100, "0\r\nX: y\n\r\n", false, Err(BadChunk)),
            (Chunked, 100, "\r\n", false, Err(BadChunk)),
            (Chunked, 100, "-5\r\n", false, Err(BadChunk)),
            (Chunked, 100, "5 5\r\n", false, Err(BadChunk)),
            (Chunked, 100, "5;\x01\r\n", false, Err(BadChunk)),
            (Chunked, 100, "0x5\r\n", false, Err(BadChunk)),
            (Chunked, 100, "5\r\nhel", false, Ok(("hel", 6, false))),
            (Chunked, 100, "5\r\nhel", true, Err(UnexpectedEof)),
            (
                Chunked,
                100,
                "5\r\nhello\r\n0\r\n",
                true,
                Err(UnexpectedEof),
            ),
            (
                Chunked,
                100,
                "5\r\nhello\r\n0\r\n\r\n",
                true,
                Ok(("hello", 15, true)),
            ),
        ];
        for (framing, max, input, eof, want) in cases {
            let got = decode(*framing, *max, input.as_bytes(), *eof);
            let want = want
                .clone()
                .map(|(b, n, done)| (b.as_bytes().to_vec(), n, done));
            assert_eq!(got, want, "{framing:?} {input:?}");
        }
    }

    #[test]
    fn chunk_limits() {
        let long_ext = format!(
            "1;{}\r\nx\r\n0\r\n\r\n",
            "e".repeat(MAX_CHUNK_LINE_BYTES - 2)
        );
        assert_eq!(
            decode(Framing::Chunked, 10, long_ext.as_bytes(), false)
                .unwrap()
                .0,
            b"x"
        );
        let too_long = format!(
            "1;{}\r\nx\r\n0\r\n\r\n",
            "e".repeat(MAX_CHUNK_LINE_BYTES - 1)
        );
        assert_eq!(
            decode(Framing::Chunked, 10, too_long.as_bytes(), false),
            Err(HttpError::BadChunk)
        );
        let zeros = format!("{}1\r\nx\r\n0\r\n\r\n", "0".repeat(100));
        assert_eq!(
            decode(Framing::Chunked, 10, zeros.as_bytes(), false)
                .unwrap()
                .0,
            b"x"
        );

        let trailer = "X-T: ".to_string() + &"v".repeat(100) + "\r\n";
        let fits =
            "0\r\n".to_string() + &trailer.repeat((MAX_TRAILER_BYTES - 2) / trailer.len()) + "\r\n";
        assert!(
            decode(Framing::Chunked, 10, fits.as_bytes(), false)
                .unwrap()
                .2
        );
        let over =
            "0\r\n".to_string() + &trailer.repeat(MAX_TRAILER_BYTES / trailer.len() + 1) + "\r\n";
        assert_eq!(
            decode(Framing::Chunked, 10, over.as_bytes(), false),
            Err(HttpError::BadChunk)
        );
    }

    #[test]
    fn errors_are_sticky_and_done_consumes_nothing() {
        let mut d = BodyDecoder::new(Framing::Chunked, 10);
        let mut body = Vec::new();
        assert_eq!(d.feed(b"zz", &mut body), Err(HttpError::BadChunk));
        assert_eq!(d.feed(b"0\r\n\r\n", &mut body), Err(HttpError::BadChunk));
        assert_eq!(d.eof(), Err(HttpError::BadChunk));

        let mut d = BodyDecoder::new(Framing::ContentLength(2), 10);
        assert_eq!(d.feed(b"ab", &mut body), Ok((2, true)));
        assert_eq!(d.feed(b"cd", &mut body), Ok((0, true)));
        assert_eq!(d.eof(), Ok(()));
        assert_eq!(body, b"ab");
    }

    #[test]
    fn head_end_and_echo() {
        for (buf, from, want) in [
            (&b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"[..], 0, Some(25)),
            (b"HTTP/1.1 200 OK\nA: b\n\nbody", 0, Some(22)),
            (b"HTTP/1.1 200 OK\r\nA: b\r\n", 0, None),
            (b"HTTP/1.1 200 OK\r\nA: b\r\n\r", 0, None),
            (b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", 22, Some(25)),
            (b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", 25, None),
            (b"", 0, None),
            (b"\n", 5, None),
        ] {
            assert_eq!(
                find_head_end(buf, from),
                want,
                "{:?} from {from}",
                String::from_utf8_lossy(buf)
            );
        }
        // A head trickled one byte at a time is found once, where it ends.
        let full = b"HTTP/1.1 200 OK\r\nPOSTFIX_DICT_EMAIL:  a@b \r\nContent-Length: 0\r\n\r\n";
        let mut scanned = 0;
        for n in 1..=full.len() {
            match find_head_end(&full[..n], scanned) {
                Some(end) => {
                    assert_eq!((n, end), (full.len(), full.len()));
                    let h = parse_head(&full[..n]).unwrap().unwrap();
                    assert_eq!(h.echo.as_deref(), Some(&b"a@b"[..]));
                }
                None => scanned = n.saturating_sub(2),
            }
        }
    }

    #[test]
    fn reuse_table() {
        let base = Head {
            status: 200,
            minor_version: 1,
            consumed: 0,
            results: None,
            retmsg: None,
            echo: None,
            policy_id: None,
            framing: Framing::ContentLength(0),
            keep_alive: true,
        };
        let with = |minor: u8, framing: Framing, ka: bool| Head {
            minor_version: minor,
            framing,
            keep_alive: ka,
            ..base.clone()
        };
        let cases = [
            (with(1, Framing::ContentLength(3), true), 0, Ok(())),
            (with(1, Framing::Chunked, true), 0, Ok(())),
            (with(1, Framing::NoBody, true), 0, Ok(())),
            (
                with(1, Framing::ContentLength(3), true),
                1,
                Err(NoReuse::ExtraBytes),
            ),
            (
                with(1, Framing::ContentLength(3), false),
                0,
                Err(NoReuse::ServerSaidClose),
            ),
            (
                with(0, Framing::ContentLength(3), false),
                0,
                Err(NoReuse::Http10),
            ),
            (with(0, Framing::ContentLength(3), true), 0, Ok(())),
            (
                with(1, Framing::CloseDelimited, false),
                0,
                Err(NoReuse::CloseDelimited),
            ),
        ];
        for (h, left, want) in cases {
            assert_eq!(reuse(&h, left), want, "{h:?} {left}");
        }
        // End to end from parsed heads.
        let parsed = |s: &str| parse_head(s.as_bytes()).unwrap().unwrap();
        assert_eq!(
            reuse(&parsed("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"), 0),
            Err(NoReuse::Http10)
        );
        assert_eq!(
            reuse(&parsed("HTTP/1.1 200 OK\r\n\r\n"), 0),
            Err(NoReuse::CloseDelimited)
        );
        assert_eq!(
            reuse(
                &parsed("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
                0
            ),
            Err(NoReuse::ServerSaidClose)
        );
    }

    #[test]
    fn write_get_table() {
        let extra = vec![("X-Api-Key".to_string(), "s3cret".to_string())];
        type Row<'a> = (&'a [u8], &'a [(String, String)], Result<&'a str, ()>);
        let cases: &[Row] = &[
            (
                b"user@example.com",
                &[],
                Ok("GET /lookup?k=1 HTTP/1.1\r\nHost: h.example:8080\r\nPOSTFIX-DICT-EMAIL: user@example.com\r\nConnection: keep-alive\r\n\r\n"),
            ),
            (
                "j\u{f6}rg@b\u{fc}cher.de".as_bytes(),
                &extra,
                Ok("GET /lookup?k=1 HTTP/1.1\r\nHost: h.example:8080\r\nPOSTFIX-DICT-EMAIL: j\u{f6}rg@b\u{fc}cher.de\r\nConnection: keep-alive\r\nX-Api-Key: s3cret\r\n\r\n"),
            ),
            (b"a\r\nX-Evil: 1", &[], Err(())),
            (b"a\nb", &[], Err(())),
            (b"a\rb", &[], Err(())),
            (b"a\0b", &[], Err(())),
        ];
        for (key, extra, want) in cases {
            let mut out = b"PREV".to_vec();
            let got = write_get(&mut out, b"/lookup?k=1", "h.example:8080", key, extra);
            match want {
                Ok(text) => {
                    assert_eq!(got, Ok(()));
                    assert_eq!(&out[..4], b"PREV");
                    assert_eq!(String::from_utf8_lossy(&out[4..]), *text);
                }
                Err(()) => {
                    assert_eq!(got, Err(()), "{key:?}");
                    assert_eq!(out, b"PREV", "output untouched on error");
                }
            }
        }
        let bad_extra = vec![("X".to_string(), "a\r\nb".to_string())];
        assert_eq!(
            write_get(&mut Vec::new(), b"/", "h", b"k", &bad_extra),
            Err(())
        );
        assert_eq!(
            write_get(&mut Vec::new(), b"/\r\n", "h", b"k", &[]),
            Err(())
        );
    }

    #[test]
    fn write_post_bytes() {
        let extra = vec![("X-Api-Key".to_string(), "s3cret".to_string())];
        let mut out = b"PREV".to_vec();
        let body = br#"{"sender":"a@b"}"#;
        let got = write_post(
            &mut out,
            b"/check",
            "p.example",
            "application/json",
            "00000000000000ff",
            body,
            &extra,
        );
        assert_eq!(got, Ok(()));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "PREVPOST /check HTTP/1.1\r\nHost: p.example\r\nPOSTFIX-POLICY-ID: 00000000000000ff\r\n\
             Content-Type: application/json\r\nContent-Length: 16\r\nConnection: keep-alive\r\n\
             X-Api-Key: s3cret\r\n\r\n{\"sender\":\"a@b\"}"
        );
        let mut out = b"PREV".to_vec();
        for (target, id) in [(&b"/\r\n"[..], "1"), (b"/", "1\n2"), (b"/", "1\x002")] {
            let got = write_post(&mut out, target, "h", "text/plain", id, b"x", &[]);
            assert_eq!(got, Err(()), "{target:?} {id:?}");
            assert_eq!(out, b"PREV", "output untouched on error");
        }
    }

    #[test]
    fn percent_encode_table() {
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (b"user+tag@example.com", "user%2Btag@example.com"),
            (b"AZaz09-._~", "AZaz09-._~"),
            (b"a b/c?d&e=f%", "a%20b%2Fc%3Fd%26e%3Df%25"),
            ("\u{e9}".as_bytes(), "%C3%A9"),
            (b"\x00\r\n\xff", "%00%0D%0A%FF"),
        ];
        for (key, want) in cases {
            let mut out = b"/p/".to_vec();
            percent_encode_into(key, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), format!("/p/{want}"));
        }
    }

    #[test]
    fn display_is_short_lowercase() {
        let all = [
            HttpError::HeadTooLarge,
            HttpError::TooManyHeaders,
            HttpError::Malformed("invalid token"),
            HttpError::BadContentLength,
            HttpError::ConflictingLength,
            HttpError::UnsupportedTransferEncoding,
            HttpError::BadChunk,
            HttpError::BodyTooLarge { max: 10 },
            HttpError::UnexpectedEof,
        ];
        for e in all {
            let s = e.to_string();
            assert!(!s.is_empty() && s.len() < 60, "{s}");
            assert_eq!(s, s.to_lowercase());
        }
    }
}
