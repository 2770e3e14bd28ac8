//! RESP, the Redis (and Valkey) protocol, as pure functions over byte
//! slices: commands written as arrays of bulk strings ([`write_command`]),
//! replies parsed incrementally ([`parse`]), RESP2 and RESP3 alike (`HELLO
//! 3` turns on RESP3 and its push messages, which carry client-side-caching
//! invalidations).
//!
//! Every length is bounded: a bulk string longer than the caller's
//! `max_bulk`, an aggregate with more than [`MAX_ELEMENTS`] elements or
//! deeper than [`MAX_DEPTH`], or a line longer than [`MAX_LINE_BYTES`] is an
//! error, never an allocation the server chose. `Ok(None)` means incomplete:
//! call again with more bytes. Nothing here owns a socket.

use std::fmt;

/// Longest `+`, `-`, `:`... line, CRLF excluded.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most elements in one array, map, set or push.
pub const MAX_ELEMENTS: usize = 1 << 20;
/// Deepest nesting of aggregates.
pub const MAX_DEPTH: usize = 8;

/// A reply, or a push message.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR ...`, `!...` (blob error)
    Error(Vec<u8>),
    Integer(i64),
    /// `$...`, `=...` (verbatim: the `txt:` prefix removed)
    Bulk(Vec<u8>),
    /// `$-1`, `*-1`, `_`
    Null,
    Boolean(bool),
    /// `,` and `(`: kept as text.
    Number(Vec<u8>),
    Array(Vec<Value>),
    /// `%` (pairs, in order)
    Map(Vec<(Value, Value)>),
    /// `>`: out of band, e.g. `invalidate`.
    Push(Vec<Value>),
}

impl Value {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(b) | Value::Simple(b) => Some(b),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    /// A type byte or framing RESP does not have.
    Malformed(&'static str),
    /// A bulk string over the caller's limit.
    TooLarge { len: u64, max: usize },
    /// Too many elements, too deep, or a line too long.
    Limit(&'static str),
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::Malformed(m) => write!(f, "malformed RESP: {m}"),
            RespError::TooLarge { len, max } => {
                write!(f, "a reply of {len} bytes is over the limit of {max}")
            }
            RespError::Limit(m) => write!(f, "RESP limit: {m}"),
        }
    }
}

/// Appends a command (`args` as bulk strings) to `out`.
pub fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    super::netstring::push_decimal(args.len(), out);
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        super::netstring::push_decimal(a.len(), out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one value at the front of `buf`: `Ok(Some((value, consumed)))`,
/// `Ok(None)` when more bytes are needed. `max_bulk`: the longest bulk
/// string accepted.
pub fn parse(buf: &[u8], max_bulk: usize) -> Result<Option<(Value, usize)>, RespError> {
    let mut pos = 0;
    match value(buf, &mut pos, max_bulk, 0)? {
        Some(v) => Ok(Some((v, pos))),
        None => Ok(None),
    }
}

/// The line at `pos` (without CRLF); advances past it.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Result<Option<&'a [u8]>, RespError> {
    let rest = &buf[*pos..];
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i > MAX_LINE_BYTES => Err(RespError::Limit("line too long")),
        Some(i) => {
            *pos += i + 2;
            Ok(Some(&rest[..i]))
        }
        None if rest.len() > MAX_LINE_BYTES + 1 => Err(RespError::Limit("line too long")),
        None => Ok(None),
    }
}

fn int(s: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::Malformed("not an integer"))
}

/// A length: `-1` is null (`None`), else non-negative.
fn len(s: &[u8]) -> Result<Option<u64>, RespError> {
    match int(s)? {
        -1 => Ok(None),
        n if n >= 0 => Ok(Some(n as u64)),
        _ => Err(RespError::Malformed("negative length")),
    }
}

fn value(
    buf: &[u8],
    pos: &mut usize,
    max_bulk: usize,
    depth: usize,
) -> Result<Option<Value>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Limit("nested too deep"));
    }
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    let start = *pos;
    *pos += 1;
    let Some(head) = line(buf, pos)? else {
        *pos = start;
        return Ok(None);
    };
    let head = head.to_vec();
    let v = match kind {
        b'+' => Value::Simple(head),
        b'-' => Value::Error(head),
        b':' => Value::Integer(int(&head)?),
        b'_' => Value::Null,
        b'#' => match head.as_slice() {
            b"t" => Value::Boolean(true),
            b"f" => Value::Boolean(false),
            _ => return Err(RespError::Malformed("bad boolean")),
        },
        b',' | b'(' => Value::Number(head),
        b'$' | b'=' | b'!' => {
            let Some(n) = len(&head)? else {
                return Ok(Some(Value::Null));
            };
            if n > max_bulk as u64 {
                return Err(RespError::TooLarge {
                    len: n,
                    max: max_bulk,
                });
            }
            let n = n as usize;
            if buf.len() < *pos + n + 2 {
                *pos = start;
                return Ok(None);
            }
            if &buf[*pos + n..*pos + n + 2] != b"\r\n" {
                return Err(RespError::Malformed("bulk string not ended by CRLF"));
            }
            let mut data = buf[*pos..*pos + n].to_vec();
            *pos += n + 2;
            match kind {
                b'!' => Value::Error(data),
                b'=' => {
                    // "txt:" or "mkd:" and the text.
                    if data.len() >= 4 && data[3] == b':' {
                        data.drain(..4);
                    }
                    Value::Bulk(data)
                }
                _ => Value::Bulk(data),
            }
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let Some(n) = len(&head)? else {
                return Ok(Some(Value::Null));
            };
            if n > MAX_ELEMENTS as u64 {
                return Err(RespError::Limit("too many elements"));
            }
            let items = if kind == b'%' || kind == b'|' {
                n * 2
            } else {
                n
            } as usize;
            let mut out = Vec::with_capacity(items.min(64));
            for _ in 0..items {
                match value(buf, pos, max_bulk, depth + 1)? {
                    Some(v) => out.push(v),
                    None => {
                        *pos = start;
                        return Ok(None);
                    }
                }
            }
            match kind {
                b'>' => Value::Push(out),
                b'%' => {
                    let mut pairs = Vec::with_capacity(out.len() / 2);
                    let mut it = out.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Value::Map(pairs)
                }
                // An attribute precedes the value it describes: skip it.
                b'|' => {
                    return match value(buf, pos, max_bulk, depth + 1)? {
                        Some(v) => Ok(Some(v)),
                        None => {
                            *pos = start;
                            Ok(None)
                        }
                    }
                }
                _ => Value::Array(out),
            }
        }
        _ => return Err(RespError::Malformed("unknown type byte")),
    };
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &[u8]) -> Result<Option<(Value, usize)>, RespError> {
        parse(s, 1024)
    }

    #[test]
    fn commands() {
        let mut out = Vec::new();
        write_command(&mut out, &[b"GET", b"k y"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$3\r\nk y\r\n");
        out.clear();
        write_command(&mut out, &[b"SET", b"", b"\r\n"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$2\r\n\r\n\r\n");
    }

    #[test]
    fn values_table() {
        use Value::*;
        let cases: &[(&[u8], Value)] = &[
            (b"+OK\r\n", Simple(b"OK".to_vec())),
            (b"-ERR nope\r\n", Error(b"ERR nope".to_vec())),
            (b":42\r\n", Integer(42)),
            (b":-7\r\n", Integer(-7)),
            (b"$3\r\nabc\r\n", Bulk(b"abc".to_vec())),
            (b"$0\r\n\r\n", Bulk(Vec::new())),
            (b"$5\r\na\r\nb\0\r\n", Bulk(b"a\r\nb\0".to_vec())),
            (b"$-1\r\n", Null),
            (b"*-1\r\n", Null),
            (b"_\r\n", Null),
            (b"#t\r\n", Boolean(true)),
            (b",1.5\r\n", Number(b"1.5".to_vec())),
            (b"=8\r\ntxt:abcd\r\n", Bulk(b"abcd".to_vec())),
            (b"!3\r\nbad\r\n", Error(b"bad".to_vec())),
            (
                b"*2\r\n$1\r\na\r\n:1\r\n",
                Array(vec![Bulk(b"a".to_vec()), Integer(1)]),
            ),
            (
                b"%1\r\n+server\r\n+redis\r\n",
                Map(vec![(
                    Simple(b"server".to_vec()),
                    Simple(b"redis".to_vec()),
                )]),
            ),
            (
                b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
                Push(vec![
                    Bulk(b"invalidate".to_vec()),
                    Array(vec![Bulk(b"k".to_vec())]),
                ]),
            ),
            (b"|1\r\n+a\r\n+b\r\n:5\r\n", Integer(5)),
        ];
        for (bytes, want) in cases {
            let got = one(bytes).unwrap().unwrap();
            assert_eq!(
                got,
                (want.clone(), bytes.len()),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            // Every cut short of the whole is incomplete, never an error.
            for cut in 0..bytes.len() {
                assert_eq!(
                    one(&bytes[..cut]),
                    Ok(None),
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }

    #[test]
    fn limits_and_errors() {
        assert_eq!(
            parse(b"$2000\r\n", 1024),
            Err(RespError::TooLarge {
                len: 2000,
                max: 1024
            })
        );
        assert!(matches!(one(b"?x\r\n"), Err(RespError::Malformed(_))));
        assert!(matches!(
            one(b"$3\r\nabcd\r\n"),
            Err(RespError::Malformed(_))
        ));
        assert!(matches!(one(b":x\r\n"), Err(RespError::Malformed(_))));
        assert!(matches!(one(b"$-2\r\n"), Err(RespError::Malformed(_))));
        assert!(matches!(one(b"*99999999999\r\n"), Err(RespError::Limit(_))));
        let deep = b"*1\r\n".repeat(20);
        assert!(matches!(one(&deep), Err(RespError::Limit(_))));
        let long = vec![b'+'; MAX_LINE_BYTES + 10];
        assert!(matches!(one(&long), Err(RespError::Limit(_))));
        // Two values back to back: one at a time.
        let two = b"+OK\r\n:1\r\n";
        let (v, n) = one(two).unwrap().unwrap();
        assert_eq!((v, n), (Value::Simple(b"OK".to_vec()), 5));
        assert_eq!(one(&two[n..]).unwrap().unwrap().0, Value::Integer(1));
    }
}
