//! The tcp_table protocol (`tcp:host:port`, Postfix's `dict_tcp.c`): this
//! module owns parsing request lines (`get SP key LF`, key `%XX`-encoded) and
//! writing reply lines (`200 value`, `500 text`, `400 text`, each `%XX`-encoded
//! and at most [`MAX_REPLY_BYTES`] including the newline). It works on byte
//! slices and caller-provided output buffers only and touches no IO.

use std::fmt;

use super::hex;

/// A reply line, newline included, is at most this many bytes (Postfix's client limit).
pub const MAX_REPLY_BYTES: usize = 4096;
/// Default limit on a request line, newline included.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4096;

/// Length of a reply's "NNN " status prefix.
const STATUS_PREFIX_BYTES: usize = 4;
/// Room left for the encoded text of a reply: limit minus "NNN " and "\n".
const MAX_REPLY_TEXT_BYTES: usize = MAX_REPLY_BYTES - STATUS_PREFIX_BYTES - 1;

/// Why a complete request line was refused (answered with `400`, connection kept).
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The line does not start with `get` followed by a space or tab.
    NotGet,
    /// `get` with nothing (or only blanks) after it.
    MissingKey,
    /// The key holds a `%` not followed by two hex digits. The offset counts
    /// from the start of the request line.
    BadEscape(hex::MalformedEscape),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NotGet => f.write_str("unsupported request (only \"get KEY\")"),
            RequestError::MissingKey => f.write_str("empty key"),
            RequestError::BadEscape(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RequestError {}

/// Outcome of looking for one request line at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No newline yet and the buffer is within the limit: read more.
    Incomplete,
    /// No newline within `max_line` bytes: the caller answers 400 and closes.
    TooLong,
    /// One line of `consumed` bytes (newline included). `Ok(())`: the decoded
    /// key was written to `key_out` (cleared first). `Err`: answer 400 with the
    /// reason, keep the connection (`key_out` is then left empty).
    Line {
        consumed: usize,
        result: Result<(), RequestError>,
    },
}

/// Looks at the front of `buf` for one request line. A request is
/// "get" SP key LF.
///
/// Leniency, as a server should be:
/// - `get` may be followed by one or more spaces or tabs;
/// - one `\r` right before the `\n` is stripped (Postfix itself never sends
///   one: it encodes a CR in a key as `%0D`);
/// - the key is the rest of the line, `%XX`-decoded in either hex case; raw
///   bytes Postfix would have quoted (inner spaces, control bytes) are kept.
///
/// Strictness:
/// - `get` is matched case-sensitively (Postfix sends lower case only), so
///   `GET x` is [`RequestError::NotGet`], as is anything else not starting
///   with `get` plus a blank (`put a b`, `getx`, junk, NUL bytes);
/// - `get` alone or followed only by blanks is [`RequestError::MissingKey`].
///
/// [`Parsed::TooLong`] when there is no `\n` in the first `max_line` bytes (a
/// line of exactly `max_line` bytes including its `\n` is fine).
pub fn parse_request(buf: &[u8], max_line: usize, key_out: &mut Vec<u8>) -> Parsed {
    key_out.clear();
    let window = &buf[..buf.len().min(max_line)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= max_line {
            Parsed::TooLong
        } else {
            Parsed::Incomplete
        };
    };
    let consumed = newline + 1;
    let line = &buf[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let result = parse_line(line, key_out);
    if result.is_err() {
        key_out.clear();
    }
    Parsed::Line { consumed, result }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn parse_line(line: &[u8], key_out: &mut Vec<u8>) -> Result<(), RequestError> {
    let rest = line.strip_prefix(b"get").ok_or(RequestError::NotGet)?;
    match rest.first() {
        None => return Err(RequestError::MissingKey),
        Some(&b) if !is_blank(b) => return Err(RequestError::NotGet),
        Some(_) => {}
    }
    let blanks = rest.iter().take_while(|&&b| is_blank(b)).count();
    let key = &rest[blanks..];
    if key.is_empty() {
        return Err(RequestError::MissingKey);
    }
    let key_start = line.len() - key.len();
    hex::decode(key, key_out).map_err(|e| {
        RequestError::BadEscape(hex::MalformedEscape {
            offset: key_start + e.offset,
        })
    })
}

/// A `200` reply whose value, once encoded, does not fit in [`MAX_REPLY_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueTooLong {
    /// Length of the `%XX`-encoded value alone (without "200 " and "\n").
    pub encoded_len: usize,
}

impl fmt::Display for ValueTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "value of {} bytes encoded exceeds tcp_table's {MAX_REPLY_BYTES}-byte reply limit",
            self.encoded_len
        )
    }
}

impl std::error::Error for ValueTooLong {}

/// Appends "200 <value %XX-encoded>\n" to `out` if it fits in
/// [`MAX_REPLY_BYTES`] (newline included); otherwise appends nothing and
/// returns `Err`.
///
/// Precondition: `value` is non-empty (Postfix treats an empty result as a
/// configuration error; not found is a `500`). Debug builds assert it; release
/// builds write the `500 not found` reply instead and return `Ok`.
pub fn encode_found(value: &[u8], out: &mut Vec<u8>) -> Result<(), ValueTooLong> {
    debug_assert!(!value.is_empty(), "empty tcp_table value: answer 500");
    if value.is_empty() {
        encode_not_found(b"", out);
        return Ok(());
    }
    let encoded_len = hex::encoded_len(value);
    if encoded_len > MAX_REPLY_TEXT_BYTES {
        return Err(ValueTooLong { encoded_len });
    }
    out.reserve(STATUS_PREFIX_BYTES + encoded_len + 1);
    out.extend_from_slice(b"200 ");
    hex::encode_reserved(value, out);
    out.push(b'\n');
    Ok(())
}

/// Appends `500 <text>\n`: not found (the client keeps the connection).
/// `text` is `%XX`-encoded and cut so the line fits [`MAX_REPLY_BYTES`]: the cut
/// never splits a `%XX` escape, nor a UTF-8 character when `text` is valid
/// UTF-8. Empty `text` gives exactly "500 not found\n" (the default text is
/// written as is: Postfix's decoder accepts the raw space).
pub fn encode_not_found(text: &[u8], out: &mut Vec<u8>) {
    encode_status_line(b"500 ", text, b"not found", out);
}

/// Appends `400 <text>\n`: temporary error (the client disconnects after it).
/// `text` is encoded and cut as in [`encode_not_found`]; empty `text` gives
/// exactly "400 temporary error\n".
pub fn encode_temp_error(text: &[u8], out: &mut Vec<u8>) {
    encode_status_line(b"400 ", text, b"temporary error", out);
}

fn encode_status_line(prefix: &[u8], text: &[u8], default: &[u8], out: &mut Vec<u8>) {
    if text.is_empty() {
        // Written as is: Postfix's decoder takes the raw space literally.
        out.extend_from_slice(prefix);
        out.extend_from_slice(default);
        out.push(b'\n');
        return;
    }
    let text = &text[..fitting_prefix_len(text, MAX_REPLY_TEXT_BYTES)];
    out.reserve(prefix.len() + hex::encoded_len(text) + 1);
    out.extend_from_slice(prefix);
    hex::encode(text, out);
    out.push(b'\n');
}

/// Number of leading bytes of `text` whose encoded form fits in `budget`,
/// backed off to a character boundary when `text` is valid UTF-8.
fn fitting_prefix_len(text: &[u8], budget: usize) -> usize {
    let mut used = 0;
    let mut n = 0;
    for &b in text {
        let len = hex::byte_encoded_len(b);
        if used + len > budget {
            break;
        }
        used += len;
        n += 1;
    }
    if n < text.len() {
        if let Ok(s) = std::str::from_utf8(text) {
            while n > 0 && !s.is_char_boundary(n) {
                n -= 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    type ParseCase = (&'static [u8], usize, Parsed, &'static [u8]);

    fn line(consumed: usize, result: Result<(), RequestError>) -> Parsed {
        Parsed::Line { consumed, result }
    }

    fn bad_escape(offset: usize) -> Result<(), RequestError> {
        Err(RequestError::BadEscape(hex::MalformedEscape { offset }))
    }

    #[test]
    fn parse_cases() {
        use RequestError::*;
        let m = DEFAULT_MAX_REQUEST_BYTES;
        let cases: Vec<ParseCase> = vec![
            (b"", m, Parsed::Incomplete, b""),
            (b"get", m, Parsed::Incomplete, b""),
            (b"get alice", m, Parsed::Incomplete, b""),
            (b"get alice\n", m, line(10, Ok(())), b"alice"),
            (
                b"get Alice@Example.COM\n",
                m,
                line(22, Ok(())),
                b"Alice@Example.COM",
            ),
            (b"get john%20doe\n", m, line(15, Ok(())), b"john doe"),
            (
                b"get %c3%A9t%C3%a9\n",
                m,
                line(18, Ok(())),
                "été".as_bytes(),
            ),
            (b"get 100%25\n", m, line(11, Ok(())), b"100%"),
            (b"get a%0Db\n", m, line(10, Ok(())), b"a\rb"),
            (b"get alice\r\n", m, line(11, Ok(())), b"alice"),
            (b"get alice\r\r\n", m, line(12, Ok(())), b"alice\r"),
            (b"get   \t alice\n", m, line(14, Ok(())), b"alice"),
            (b"get\talice\n", m, line(10, Ok(())), b"alice"),
            (b"get a b \n", m, line(9, Ok(())), b"a b "),
            (b"get a\0b\n", m, line(8, Ok(())), b"a\0b"),
            (b"get %00\n", m, line(8, Ok(())), b"\0"),
            (b"get\n", m, line(4, Err(MissingKey)), b""),
            (b"get\r\n", m, line(5, Err(MissingKey)), b""),
            (b"get \n", m, line(5, Err(MissingKey)), b""),
            (b"get \t \r\n", m, line(8, Err(MissingKey)), b""),
            (b"GET x\n", m, line(6, Err(NotGet)), b""),
            (b"Get x\n", m, line(6, Err(NotGet)), b""),
            (b"getx\n", m, line(5, Err(NotGet)), b""),
            (b"put a b\n", m, line(8, Err(NotGet)), b""),
            (b" get a\n", m, line(7, Err(NotGet)), b""),
            (b"\n", m, line(1, Err(NotGet)), b""),
            (b"\r\n", m, line(2, Err(NotGet)), b""),
            (b"\0\0\0\n", m, line(4, Err(NotGet)), b""),
            (b"\xff\xfe junk\n", m, line(8, Err(NotGet)), b""),
            (b"get abc%zz\n", m, line(11, bad_escape(7)), b""),
            (b"get %\n", m, line(6, bad_escape(4)), b""),
            (b"get  a%4\n", m, line(9, bad_escape(6)), b""),
            (b"get a%G0\r\n", m, line(10, bad_escape(5)), b""),
            // Limit: newline must appear within the first max_line bytes.
            (b"get abcd\n", 9, line(9, Ok(())), b"abcd"),
            (b"get abcd\n", 8, Parsed::TooLong, b""),
            (b"get abcd", 8, Parsed::TooLong, b""),
            (b"get abc", 8, Parsed::Incomplete, b""),
            (b"get abcde\n", 9, Parsed::TooLong, b""),
            (b"", 0, Parsed::TooLong, b""),
        ];
        for (input, max, expected, key) in cases {
            let mut key_out = b"stale".to_vec();
            let got = parse_request(input, max, &mut key_out);
            assert_eq!(got, expected, "input {input:?} max {max}");
            assert_eq!(key_out, key, "input {input:?} max {max}");
        }
    }

    #[test]
    fn too_long_at_default_boundary() {
        let m = DEFAULT_MAX_REQUEST_BYTES;
        let mut key = Vec::new();
        // "get " + key + "\n" == 4096 bytes exactly: accepted.
        let mut req = b"get ".to_vec();
        req.resize(m - 1, b'k');
        req.push(b'\n');
        assert_eq!(req.len(), m);
        assert_eq!(parse_request(&req, m, &mut key), line(m, Ok(())));
        assert_eq!(key.len(), m - 5);
        // One byte more: the newline is at index 4096, outside the window.
        let mut req = b"get ".to_vec();
        req.resize(m, b'k');
        assert_eq!(parse_request(&req, m, &mut key), Parsed::TooLong);
        req.push(b'\n');
        assert_eq!(parse_request(&req, m, &mut key), Parsed::TooLong);
        // A buffer one short of the limit with no newline: read more.
        req.truncate(m - 1);
        assert_eq!(parse_request(&req, m, &mut key), Parsed::Incomplete);
    }

    #[test]
    fn several_lines_in_one_buffer() {
        let buf: &[u8] = b"get a\nput x\nget b%20c\r\nget\nget d";
        let expected: &[(Parsed, &[u8])] = &[
            (line(6, Ok(())), b"a"),
            (line(6, Err(RequestError::NotGet)), b""),
            (line(11, Ok(())), b"b c"),
            (line(4, Err(RequestError::MissingKey)), b""),
            (Parsed::Incomplete, b""),
        ];
        let mut pos = 0;
        let mut key = Vec::new();
        for (want, want_key) in expected {
            let got = parse_request(&buf[pos..], DEFAULT_MAX_REQUEST_BYTES, &mut key);
            assert_eq!(&got, want, "at {pos}");
            assert_eq!(&key, want_key, "at {pos}");
            if let Parsed::Line { consumed, .. } = got {
                pos += consumed;
            }
        }
        assert_eq!(&buf[pos..], b"get d");
    }

    #[test]
    fn found_replies() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"bob@example.com", b"200 bob@example.com\n"),
            (b"a b, c", b"200 a%20b,%20c\n"),
            (b"100%", b"200 100%25\n"),
            (b"x\r\ny", b"200 x%0D%0Ay\n"),
            (b"tab\there", b"200 tab%09here\n"),
            ("jörg".as_bytes(), b"200 j%C3%B6rg\n"),
            (b"\0", b"200 %00\n"),
        ];
        for &(value, expected) in cases {
            let mut out = b"prev".to_vec();
            assert_eq!(encode_found(value, &mut out), Ok(()), "value {value:?}");
            assert_eq!(&out[4..], expected, "value {value:?}");
        }
    }

    #[test]
    fn found_reply_limit() {
        let fit = MAX_REPLY_TEXT_BYTES; // 4091 encoded bytes fit
                                        // (value, whether it fits, encoded length)
        let cases: Vec<(Vec<u8>, bool, usize)> = vec![
            (vec![b'a'; fit], true, fit),
            (vec![b'a'; fit + 1], false, fit + 1),
            // 4088 plain + one escape = 4091: fits exactly.
            ([vec![b'a'; fit - 3], b" ".to_vec()].concat(), true, fit),
            // 4089 plain + one escape = 4092: the limit falls inside the escape.
            (
                [vec![b'a'; fit - 2], b" ".to_vec()].concat(),
                false,
                fit + 1,
            ),
            (
                [vec![b'a'; fit - 1], b"%".to_vec()].concat(),
                false,
                fit + 2,
            ),
            (vec![b'%'; fit / 3], true, fit / 3 * 3),
            (vec![b'%'; fit / 3 + 1], false, (fit / 3 + 1) * 3),
        ];
        for (value, fits, encoded_len) in cases {
            let mut out = Vec::new();
            let got = encode_found(&value, &mut out);
            if fits {
                assert_eq!(got, Ok(()), "len {}", value.len());
                assert_eq!(out.len(), encoded_len + 5);
                assert!(out.len() <= MAX_REPLY_BYTES);
                assert_eq!(out.last(), Some(&b'\n'));
            } else {
                assert_eq!(
                    got,
                    Err(ValueTooLong { encoded_len }),
                    "len {}",
                    value.len()
                );
                assert!(out.is_empty());
            }
        }
        assert_eq!(
            ValueTooLong { encoded_len: 5000 }.to_string(),
            "value of 5000 bytes encoded exceeds tcp_table's 4096-byte reply limit"
        );
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn found_empty_value_in_release_is_not_found() {
        let mut out = Vec::new();
        assert_eq!(encode_found(b"", &mut out), Ok(()));
        assert_eq!(out, b"500 not found\n");
    }

    #[test]
    fn status_replies() {
        type F = fn(&[u8], &mut Vec<u8>);
        let nf: F = encode_not_found;
        let te: F = encode_temp_error;
        let cases: &[(F, &[u8], &[u8])] = &[
            (nf, b"", b"500 not found\n"),
            (nf, b"no such user", b"500 no%20such%20user\n"),
            (nf, b"x\ny%", b"500 x%0Ay%25\n"),
            (te, b"", b"400 temporary error\n"),
            (te, b"backend down", b"400 backend%20down\n"),
            (te, "écho".as_bytes(), b"400 %C3%A9cho\n"),
        ];
        for &(f, text, expected) in cases {
            let mut out = Vec::new();
            f(text, &mut out);
            assert_eq!(out, expected, "text {text:?}");
        }
    }

    #[test]
    fn status_reply_cut() {
        let fit = MAX_REPLY_TEXT_BYTES;
        // (text, expected encoded text)
        let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (vec![b'a'; fit], vec![b'a'; fit]),
            (vec![b'a'; fit + 10], vec![b'a'; fit]),
            // The escape for ' ' would end at 4092: it is dropped whole.
            (
                [vec![b'a'; fit - 2], b" b".to_vec()].concat(),
                vec![b'a'; fit - 2],
            ),
            (
                [vec![b'a'; fit - 3], b" b".to_vec()].concat(),
                [vec![b'a'; fit - 3], b"%20".to_vec()].concat(),
            ),
            // UTF-8: "é" is 6 encoded bytes; only its first byte would fit.
            (
                [vec![b'a'; fit - 4], "éé".as_bytes().to_vec()].concat(),
                vec![b'a'; fit - 4],
            ),
            // Not UTF-8: cut at the last whole escape.
            (
                [vec![b'a'; fit - 4], b"\xc3\xff\xff".to_vec()].concat(),
                [vec![b'a'; fit - 4], b"%C3".to_vec()].concat(),
            ),
        ];
        for (text, expected_text) in cases {
            for (f, prefix) in [
                (encode_not_found as fn(&[u8], &mut Vec<u8>), b"500 "),
                (encode_temp_error, b"400 "),
            ] {
                let mut out = Vec::new();
                f(&text, &mut out);
                let expected = [prefix.as_slice(), &expected_text, b"\n"].concat();
                assert_eq!(out, expected, "text len {}", text.len());
                assert!(out.len() <= MAX_REPLY_BYTES);
                let mut decoded = Vec::new();
                assert_eq!(hex::decode(&out[4..out.len() - 1], &mut decoded), Ok(()));
            }
        }
    }

    #[test]
    fn request_error_display() {
        let cases: &[(RequestError, &str)] = &[
            (
                RequestError::NotGet,
                "unsupported request (only \"get KEY\")",
            ),
            (RequestError::MissingKey, "empty key"),
            (
                RequestError::BadEscape(hex::MalformedEscape { offset: 7 }),
                "malformed %XX escape at byte 7",
            ),
        ];
        for (e, s) in cases {
            assert_eq!(e.to_string(), *s);
        }
    }
}
