//! The wire side of each target: requests as bytes ([`encode_request`]:
//! tcp_table `get KEY`, socketmap netstrings, memcached `get`/`set`, dict_http
//! `GET`) and replies parsed off the front of a connection's read buffer
//! ([`parse_reply`]) into an [`Outcome`]. Pure functions on byte slices; the
//! codecs are the daemon's own (`httpmapd::codec`).

use crate::cli::Proto;
use httpmapd::codec::{hex, http, netstring};

/// What a phase sends: lookups, or memcached `set`s for `--populate`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    Get,
    Set,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
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
pub fn parse_reply(
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

pub fn encode_request(proto: &Proto, op: Op, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(proto: &Proto, buf: &[u8]) -> Result<Option<(usize, Outcome)>, ()> {
        parse_reply(proto, buf, &mut Vec::new())
    }

    #[test]
    fn tcp_table() {
        let p = Proto::TcpTable;
        assert_eq!(parse(&p, b"200 v\n500 x"), Ok(Some((6, Outcome::Found))));
        assert_eq!(
            parse(&p, b"500 not found\n"),
            Ok(Some((14, Outcome::NotFound)))
        );
        assert_eq!(parse(&p, b"400 try again\n"), Ok(Some((14, Outcome::Temp))));
        assert_eq!(parse(&p, b"200 v"), Ok(None));
        assert_eq!(parse(&p, b"OK\n"), Err(()));
        let mut out = Vec::new();
        encode_request(&p, Op::Get, b"a b@x", b"", &mut out);
        assert_eq!(out, b"get a%20b@x\n");
    }

    #[test]
    fn socketmap() {
        let p = Proto::Socketmap {
            name: b"virtual".to_vec(),
        };
        assert_eq!(parse(&p, b"4:OK v,"), Ok(Some((7, Outcome::Found))));
        assert_eq!(parse(&p, b"8:NOTFOUND,"), Ok(Some((11, Outcome::NotFound))));
        assert_eq!(parse(&p, b"7:TIMEOUT,"), Ok(Some((10, Outcome::Temp))));
        assert_eq!(parse(&p, b"6:PERM x,"), Ok(Some((9, Outcome::Perm))));
        assert_eq!(parse(&p, b"4:OK v"), Ok(None));
        assert_eq!(parse(&p, b"3:BAD,"), Err(()));
        let mut out = Vec::new();
        encode_request(&p, Op::Get, b"k@x", b"", &mut out);
        assert_eq!(out, b"11:virtual k@x,");
    }

    #[test]
    fn memcached() {
        let p = Proto::Memcached;
        assert_eq!(parse(&p, b"END\r\n"), Ok(Some((5, Outcome::NotFound))));
        assert_eq!(
            parse(&p, b"VALUE k 0 2\r\nab\r\nEND\r\n"),
            Ok(Some((22, Outcome::Found)))
        );
        assert_eq!(parse(&p, b"VALUE k 0 2\r\nab\r\nEN"), Ok(None));
        assert_eq!(parse(&p, b"STORED\r\n"), Ok(Some((8, Outcome::Stored))));
        assert_eq!(parse(&p, b"ERROR\r\n"), Err(()));
        let mut out = Vec::new();
        encode_request(&p, Op::Set, b"k", b"val", &mut out);
        assert_eq!(out, b"set k 0 0 3\r\nval\r\n");
    }

    #[test]
    fn http() {
        let p = Proto::Http {
            host: "h:1".into(),
            path: b"/v".to_vec(),
        };
        let found = b"HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS: x\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse(&p, found), Ok(Some((found.len(), Outcome::Found))));
        let none = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(parse(&p, none), Ok(Some((none.len(), Outcome::NotFound))));
        assert_eq!(parse(&p, &none[..none.len() - 1]), Ok(None));
        let err = b"HTTP/1.1 503 busy\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse(&p, err), Ok(Some((err.len(), Outcome::Temp))));
        let mut out = Vec::new();
        encode_request(&p, Op::Get, b"k@x", b"", &mut out);
        assert!(out.starts_with(b"GET /v HTTP/1.1\r\nHost: h:1\r\nPOSTFIX-DICT-EMAIL: k@x\r\n"));
    }
}
