//! The socketmap protocol (`socketmap:inet:host:port:name`, Postfix's
//! `dict_sockmap.c`): this module owns netstring framing (`LEN:bytes,`),
//! splitting a request payload into map name and key, and writing the replies
//! (`OK value`, `NOTFOUND `, `TEMP reason`, `PERM reason`) within the client's
//! reply limit. It works on byte slices and caller-provided output buffers
//! only and touches no IO.

use std::fmt;

/// Postfix's client query limit (payload length).
pub const DEFAULT_MAX_QUERY_BYTES: usize = 10_000;
/// Postfix's client reply limit (payload length).
pub const DEFAULT_MAX_REPLY_BYTES: usize = 100_000;

/// Most length digits accepted (leading zeros included) when the declared
/// length is within the limit: bounds the buffer a peer can make us hold.
const MAX_LENGTH_DIGITS: usize = 20;

/// Why a buffer does not start with an acceptable netstring.
#[derive(Debug, PartialEq, Eq)]
pub enum NetstringError {
    /// The length is not decimal digits followed by ':' (empty, leading junk,
    /// sign, or an absurd number of leading zeros).
    BadLength,
    /// The declared length is over `max`. Detected as soon as the digits show
    /// it, before the ':' arrives. `len` is `usize::MAX` if it overflowed.
    TooLong { len: usize, max: usize },
    /// The byte after the payload is not ','.
    MissingComma,
}

impl fmt::Display for NetstringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetstringError::BadLength => f.write_str("malformed netstring length"),
            NetstringError::TooLong { len, max } => {
                write!(f, "netstring length {len} exceeds limit {max}")
            }
            NetstringError::MissingComma => f.write_str("netstring not terminated by ','"),
        }
    }
}

impl std::error::Error for NetstringError {}

/// Looks for one netstring at the front of `buf`, whose payload may be at most
/// `max_payload` bytes.
///
/// `Ok(None)`: incomplete, read more. The caller never needs to buffer more
/// than `20 + 1 + max_payload + 1` bytes: anything longer has already failed
/// (`TooLong` or `BadLength`). `Ok(Some((payload_start, payload_end, consumed)))`:
/// the payload is `buf[payload_start..payload_end]` and the netstring, comma
/// included, is `buf[..consumed]`. Leading zeros in the length are accepted.
pub fn parse(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(usize, usize, usize)>, NetstringError> {
    let mut len: usize = 0;
    let mut digits = 0;
    for &b in buf {
        if !b.is_ascii_digit() {
            break;
        }
        len = match len
            .checked_mul(10)
            .and_then(|l| l.checked_add(usize::from(b - b'0')))
        {
            Some(l) => l,
            None => {
                return Err(NetstringError::TooLong {
                    len: usize::MAX,
                    max: max_payload,
                })
            }
        };
        if len > max_payload {
            return Err(NetstringError::TooLong {
                len,
                max: max_payload,
            });
        }
        digits += 1;
        if digits > MAX_LENGTH_DIGITS {
            return Err(NetstringError::BadLength);
        }
    }
    match buf.get(digits) {
        None => return Ok(None),
        Some(b':') if digits > 0 => {}
        Some(_) => return Err(NetstringError::BadLength),
    }
    let payload_start = digits + 1;
    // Checked: only overflows when max_payload is close to usize::MAX.
    let Some(payload_end) = payload_start.checked_add(len) else {
        return Err(NetstringError::TooLong {
            len,
            max: max_payload,
        });
    };
    match buf.get(payload_end) {
        None => Ok(None),
        Some(b',') => Ok(Some((payload_start, payload_end, payload_end + 1))),
        Some(_) => Err(NetstringError::MissingComma),
    }
}

/// Appends the decimal form of `n` to `out`, without allocating.
pub fn push_decimal(mut n: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; MAX_LENGTH_DIGITS];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends "LEN:" + parts concatenated + "," to out.
pub fn encode(parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(MAX_LENGTH_DIGITS + len + 2);
    push_decimal(len, out);
    out.push(b':');
    for part in parts {
        out.extend_from_slice(part);
    }
    out.push(b',');
}

/// Why a socketmap request payload is not "name SP key".
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// No space in the payload.
    NoSpace,
    /// The payload starts with a space.
    EmptyName,
    /// Nothing after the first space.
    EmptyKey,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestError::NoSpace => "malformed request (expected \"name key\")",
            RequestError::EmptyName => "empty map name",
            RequestError::EmptyKey => "empty key",
        })
    }
}

impl std::error::Error for RequestError {}

/// Splits a socketmap request payload "name SP key" at the FIRST space:
/// (name, key). The key is raw bytes (not `%`-encoded; may contain spaces,
/// UTF-8, anything).
pub fn split_request(payload: &[u8]) -> Result<(&[u8], &[u8]), RequestError> {
    let space = payload
        .iter()
        .position(|&b| b == b' ')
        .ok_or(RequestError::NoSpace)?;
    let (name, key) = (&payload[..space], &payload[space + 1..]);
    if name.is_empty() {
        return Err(RequestError::EmptyName);
    }
    if key.is_empty() {
        return Err(RequestError::EmptyKey);
    }
    Ok((name, key))
}

/// An `OK` reply payload longer than the client's reply limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTooLong {
    /// Payload length ("OK " + value).
    pub len: usize,
    pub max: usize,
}

impl fmt::Display for ReplyTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socketmap reply of {} bytes exceeds the {}-byte reply limit",
            self.len, self.max
        )
    }
}

impl std::error::Error for ReplyTooLong {}

/// Appends the netstring "OK value". `value` must be non-empty (a bare `OK`
/// is an error to Postfix): debug builds assert it, release builds write
/// `NOTFOUND ` instead and return `Ok`. If "OK " + value is longer than
/// `max_reply`, appends nothing and returns `Err`.
pub fn encode_ok(value: &[u8], max_reply: usize, out: &mut Vec<u8>) -> Result<(), ReplyTooLong> {
    debug_assert!(!value.is_empty(), "empty socketmap value: answer NOTFOUND");
    if value.is_empty() {
        encode_notfound(out);
        return Ok(());
    }
    let len = value.len().saturating_add(3);
    if len > max_reply {
        return Err(ReplyTooLong {
            len,
            max: max_reply,
        });
    }
    encode(&[b"OK ", value], out);
    Ok(())
}

/// Appends "9:NOTFOUND ,".
pub fn encode_notfound(out: &mut Vec<u8>) {
    encode(&[b"NOTFOUND "], out);
}

/// Appends the netstring "TEMP reason" (temporary error), the reason cut so
/// the payload fits `max_reply` (see [`encode_perm`] for the cut).
pub fn encode_temp(reason: &[u8], max_reply: usize, out: &mut Vec<u8>) {
    encode_with_reason(b"TEMP ", reason, max_reply, out);
}

/// Appends the netstring "PERM reason" (configuration error), the reason cut
/// so the payload fits `max_reply`. The cut does not split a UTF-8 character
/// when `reason` is valid UTF-8. The 5-byte prefix is always written, even if
/// `max_reply` is smaller than it.
pub fn encode_perm(reason: &[u8], max_reply: usize, out: &mut Vec<u8>) {
    encode_with_reason(b"PERM ", reason, max_reply, out);
}

fn encode_with_reason(prefix: &[u8], reason: &[u8], max_reply: usize, out: &mut Vec<u8>) {
    let room = max_reply.saturating_sub(prefix.len());
    let mut n = reason.len().min(room);
    if n < reason.len() {
        if let Ok(s) = std::str::from_utf8(reason) {
            while n > 0 && !s.is_char_boundary(n) {
                n -= 1;
            }
        }
    }
    encode(&[prefix, &reason[..n]], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    type ParseResult = Result<Option<(usize, usize, usize)>, NetstringError>;

    #[test]
    fn parse_cases() {
        use NetstringError::*;
        let m = DEFAULT_MAX_QUERY_BYTES;
        let cases: &[(&[u8], usize, ParseResult)] = &[
            (b"", m, Ok(None)),
            (b"3", m, Ok(None)),
            (b"3:", m, Ok(None)),
            (b"3:ab", m, Ok(None)),
            (b"3:abc", m, Ok(None)),
            (b"3:abc,", m, Ok(Some((2, 5, 6)))),
            (b"3:abc,rest", m, Ok(Some((2, 5, 6)))),
            (b"0:,", m, Ok(Some((2, 2, 3)))),
            (b"03:abc,", m, Ok(Some((3, 6, 7)))),
            (b"0003:abc,", m, Ok(Some((5, 8, 9)))),
            (b"5:abc,", m, Ok(None)),
            (b"3:abcd", m, Err(MissingComma)),
            (b"3:abc;", m, Err(MissingComma)),
            (b"abc:", m, Err(BadLength)),
            (b":", m, Err(BadLength)),
            (b":abc,", m, Err(BadLength)),
            (b" 3:abc,", m, Err(BadLength)),
            (b"-3:abc,", m, Err(BadLength)),
            (b"+3:abc,", m, Err(BadLength)),
            (b"3x", m, Err(BadLength)),
            (b"3 :abc,", m, Err(BadLength)),
            (b"000000000000000000000", m, Err(BadLength)),
            (b"00000000000000000003:abc,", m, Ok(Some((21, 24, 25)))),
            (b"10000", m, Ok(None)),
            (b"10001", m, Err(TooLong { len: 10001, max: m })),
            (
                b"99999999999999999999999:",
                m,
                Err(TooLong { len: 99999, max: m }),
            ),
            (b"4:abc,", 3, Err(TooLong { len: 4, max: 3 })),
            (b"3:abc,", 3, Ok(Some((2, 5, 6)))),
            (b"1:a,", 0, Err(TooLong { len: 1, max: 0 })),
            (b"0:,", 0, Ok(Some((2, 2, 3)))),
            (
                b"99999999999999999999999",
                usize::MAX,
                Err(TooLong {
                    len: usize::MAX,
                    max: usize::MAX,
                }),
            ),
        ];
        for &(input, max, ref expected) in cases {
            assert_eq!(&parse(input, max), expected, "input {input:?} max {max}");
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let wire: &[u8] = b"25:virtual alice@example.com,";
        assert_eq!(parse(wire, DEFAULT_MAX_QUERY_BYTES), Ok(Some((3, 28, 29))));
        for cut in 0..wire.len() {
            assert_eq!(
                parse(&wire[..cut], DEFAULT_MAX_QUERY_BYTES),
                Ok(None),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn two_requests_in_one_buffer() {
        let buf: &[u8] = b"9:virtual a,14:access b c@d.e,1";
        let expected: &[&[u8]] = &[b"virtual a", b"access b c@d.e"];
        let mut pos = 0;
        for want in expected {
            let (start, end, consumed) = parse(&buf[pos..], DEFAULT_MAX_QUERY_BYTES)
                .unwrap()
                .unwrap();
            assert_eq!(&&buf[pos + start..pos + end], want);
            pos += consumed;
        }
        assert_eq!(parse(&buf[pos..], DEFAULT_MAX_QUERY_BYTES), Ok(None));
    }

    #[test]
    fn encode_cases() {
        let cases: &[(&[&[u8]], &[u8])] = &[
            (&[], b"0:,"),
            (&[b""], b"0:,"),
            (&[b"abc"], b"3:abc,"),
            (&[b"OK ", b"bob@x"], b"8:OK bob@x,"),
            (&[b"a", b"", b"bc", b"d"], b"4:abcd,"),
        ];
        for &(parts, expected) in cases {
            let mut out = b"x".to_vec();
            encode(parts, &mut out);
            assert_eq!(&out[1..], expected, "parts {parts:?}");
        }
        let big = vec![b'z'; 12345];
        let mut out = Vec::new();
        encode(&[&big], &mut out);
        assert!(out.starts_with(b"12345:zz"));
        assert_eq!(parse(&out, big.len()), Ok(Some((6, 12351, 12352))));
    }

    #[test]
    fn split_request_cases() {
        use RequestError::*;
        type Case = (
            &'static [u8],
            Result<(&'static [u8], &'static [u8]), RequestError>,
        );
        let cases: &[Case] = &[
            (
                b"virtual alice@example.com",
                Ok((b"virtual", b"alice@example.com")),
            ),
            (
                b"access \"john doe\"@x.org",
                Ok((b"access", b"\"john doe\"@x.org")),
            ),
            (b"m  two spaces ", Ok((b"m", b" two spaces "))),
            (
                "m jörg@exämple.de".as_bytes(),
                Ok((b"m", "jörg@exämple.de".as_bytes())),
            ),
            (b"m <>", Ok((b"m", b"<>"))),
            (b"m\ttab", Err(NoSpace)),
            (b"virtual", Err(NoSpace)),
            (b"", Err(NoSpace)),
            (b" key", Err(EmptyName)),
            (b" ", Err(EmptyName)),
            (b"virtual ", Err(EmptyKey)),
        ];
        for (payload, expected) in cases {
            assert_eq!(&split_request(payload), expected, "payload {payload:?}");
        }
    }

    #[test]
    fn reply_cases() {
        let m = DEFAULT_MAX_REPLY_BYTES;
        let run = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            f(&mut out);
            out
        };
        let cases: &[(Vec<u8>, &[u8])] = &[
            (run(&|o| encode_notfound(o)), b"9:NOTFOUND ,"),
            (
                run(&|o| encode_ok(b"bob@example.com", m, o).unwrap()),
                b"18:OK bob@example.com,",
            ),
            (
                run(&|o| encode_ok(b"a, b c", m, o).unwrap()),
                b"9:OK a, b c,",
            ),
            (
                run(&|o| encode_ok("jörg".as_bytes(), m, o).unwrap()),
                b"8:OK j\xc3\xb6rg,",
            ),
            (run(&|o| encode_ok(b"abc", 6, o).unwrap()), b"6:OK abc,"),
            (
                run(&|o| encode_temp(b"backend down", m, o)),
                b"17:TEMP backend down,",
            ),
            (run(&|o| encode_temp(b"", m, o)), b"5:TEMP ,"),
            (
                run(&|o| encode_perm(b"no such map", m, o)),
                b"16:PERM no such map,",
            ),
            (run(&|o| encode_temp(b"abcdef", 8, o)), b"8:TEMP abc,"),
            (run(&|o| encode_perm(b"abcdef", 11, o)), b"11:PERM abcdef,"),
            (run(&|o| encode_perm(b"abcdef", 3, o)), b"5:PERM ,"),
            (run(&|o| encode_temp("aé".as_bytes(), 7, o)), b"6:TEMP a,"),
            (
                run(&|o| encode_temp("aé".as_bytes(), 8, o)),
                b"8:TEMP a\xc3\xa9,",
            ),
            (run(&|o| encode_temp(b"a\xc3\xff", 7, o)), b"7:TEMP a\xc3,"),
        ];
        for (got, expected) in cases {
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn ok_reply_limit() {
        let cases: &[(usize, usize, Result<(), ReplyTooLong>)] = &[
            (3, 6, Ok(())),
            (4, 6, Err(ReplyTooLong { len: 7, max: 6 })),
            (DEFAULT_MAX_REPLY_BYTES - 3, DEFAULT_MAX_REPLY_BYTES, Ok(())),
            (
                DEFAULT_MAX_REPLY_BYTES - 2,
                DEFAULT_MAX_REPLY_BYTES,
                Err(ReplyTooLong {
                    len: DEFAULT_MAX_REPLY_BYTES + 1,
                    max: DEFAULT_MAX_REPLY_BYTES,
                }),
            ),
        ];
        for &(value_len, max, expected) in cases {
            let value = vec![b'v'; value_len];
            let mut out = Vec::new();
            assert_eq!(
                encode_ok(&value, max, &mut out),
                expected,
                "len {value_len} max {max}"
            );
            match expected {
                Ok(()) => assert_eq!(
                    parse(&out, max),
                    Ok(Some((out.len() - value_len - 4, out.len() - 1, out.len())))
                ),
                Err(_) => assert!(out.is_empty()),
            }
        }
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn ok_empty_value_in_release_is_notfound() {
        let mut out = Vec::new();
        assert_eq!(encode_ok(b"", DEFAULT_MAX_REPLY_BYTES, &mut out), Ok(()));
        assert_eq!(out, b"9:NOTFOUND ,");
    }

    #[test]
    fn error_display() {
        let cases: &[(&dyn fmt::Display, &str)] = &[
            (&NetstringError::BadLength, "malformed netstring length"),
            (
                &NetstringError::TooLong {
                    len: 10001,
                    max: 10000,
                },
                "netstring length 10001 exceeds limit 10000",
            ),
            (
                &NetstringError::MissingComma,
                "netstring not terminated by ','",
            ),
            (
                &RequestError::NoSpace,
                "malformed request (expected \"name key\")",
            ),
            (&RequestError::EmptyName, "empty map name"),
            (&RequestError::EmptyKey, "empty key"),
            (
                &ReplyTooLong { len: 7, max: 6 },
                "socketmap reply of 7 bytes exceeds the 6-byte reply limit",
            ),
        ];
        for (e, s) in cases {
            assert_eq!(e.to_string(), *s);
        }
    }
}
