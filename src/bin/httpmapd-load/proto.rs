//! The wire side of each target: requests as bytes ([`encode_request`]:
//! tcp_table `get KEY`, socketmap netstrings, memcached `get`/`set`, dict_http
//! `GET`, a Postfix policy request) and replies parsed off the front of a
//! connection's read buffer ([`parse_reply`]) into an [`Outcome`]. Pure
//! functions on byte slices; the codecs are the daemon's own
//! (`httpmapd::codec`).

use crate::cli::Proto;
use httpmapd::codec::{hex, http, netstring};
use httpmapd::metrics::{policy_action_class, POLICY_ACTIONS};
use std::io::Write;

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
    /// 400 / TEMP / TIMEOUT / non-2xx / SERVER_ERROR / NOT_STORED /
    /// policy `DEFER`, `DEFER_IF_PERMIT`, `DEFER_IF_REJECT` and `4xx`.
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
        Proto::Policy => parse_policy_reply(buf),
    }
}

/// Longest policy reply accepted (an action is at most 4096 bytes; a few
/// other attributes may come with it).
const MAX_POLICY_REPLY: usize = 16 * 1024;

/// A policy reply: `name=value` lines ended by an empty line, one of them
/// `action=TEXT`.
fn parse_policy_reply(buf: &[u8]) -> Result<Option<(usize, Outcome)>, ()> {
    let mut pos = 0;
    let mut action = None;
    loop {
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            return if buf.len() > MAX_POLICY_REPLY {
                Err(())
            } else {
                Ok(None)
            };
        };
        let mut line = &buf[pos..pos + nl];
        pos += nl + 1;
        if pos > MAX_POLICY_REPLY {
            return Err(());
        }
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.is_empty() {
            return match action {
                Some(a) => Ok(Some((pos, policy_outcome(a)?))),
                None => Err(()),
            };
        }
        if let Some(a) = line.strip_prefix(b"action=") {
            action = Some(a);
        } else if !line.contains(&b'=') {
            return Err(());
        }
    }
}

/// What an action counts as, by its first word as the daemon's own
/// `/metrics` classes it ([`policy_action_class`]): `DUNNO` not found;
/// exactly `DEFER`, `DEFER_IF_PERMIT`, `DEFER_IF_REJECT`, and `4xx`
/// temporary; anything else (`REJECT`, `5xx`, `OK`, `PREPEND`, `HOLD`,
/// `DEFERRED`, ...) found. Postfix reads action words in any case. An empty
/// action (or one that starts with a space) is an error.
fn policy_outcome(action: &[u8]) -> Result<Outcome, ()> {
    if matches!(action.first(), None | Some(b' ' | b'\t')) {
        return Err(());
    }
    let class = POLICY_ACTIONS[policy_action_class(action)];
    Ok(match class {
        "DUNNO" => Outcome::NotFound,
        "DEFER" | "DEFER_IF_PERMIT" | "DEFER_IF_REJECT" | "4xx" => Outcome::Temp,
        _ => Outcome::Found,
    })
}

/// What a policy request says besides the sender, derived from the key so
/// that a key always comes from the same client: (client address octets
/// 2-4, client port, message size, instance hash).
fn policy_client(key: &[u8]) -> ([u8; 3], u16, u32, u64) {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let ip = [(h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8 | 1];
    let port = 1024 + (h >> 32) as u16 % 64_000;
    let size = 1_000 + (h >> 40) as u32 % 200_000;
    (ip, port, size, h)
}

/// A Postfix smtpd policy request at RCPT, as Postfix 3.8 sends it (every
/// attribute, the empty ones too: 31), from an unauthenticated client over
/// TLS without a client certificate: `sender` is the key, the client
/// (address, names, port, HELO), the size and the instance follow from it.
fn encode_policy(key: &[u8], out: &mut Vec<u8>) {
    let (ip, port, size, h) = policy_client(key);
    let [a, b, c] = ip;
    out.extend_from_slice(
        b"request=smtpd_access_policy\n\
          protocol_state=RCPT\n\
          protocol_name=ESMTP\n",
    );
    let _ = write!(
        out,
        "helo_name=mx-10-{a}-{b}-{c}.example.net\nqueue_id=\nsender="
    );
    out.extend_from_slice(key);
    let _ = writeln!(
        out,
        "\nrecipient=postmaster@example.org\n\
         recipient_count=0\n\
         client_address=10.{a}.{b}.{c}\n\
         client_name=mx-10-{a}-{b}-{c}.example.net\n\
         reverse_client_name=mx-10-{a}-{b}-{c}.example.net\n\
         instance={:x}.{:x}.{:x}.0",
        (h >> 44) & 0xfffff,
        (h >> 12) & 0xffff_ffff,
        h & 0xfff,
    );
    out.extend_from_slice(
        b"sasl_method=\n\
          sasl_username=\n\
          sasl_sender=\n",
    );
    let _ = writeln!(out, "size={size}");
    out.extend_from_slice(
        b"ccert_subject=\n\
          ccert_issuer=\n\
          ccert_fingerprint=\n\
          ccert_pubkey_fingerprint=\n\
          encryption_protocol=TLSv1.3\n\
          encryption_cipher=TLS_AES_256_GCM_SHA384\n\
          encryption_keysize=256\n\
          etrn_domain=\n\
          stress=\n",
    );
    let _ = writeln!(out, "client_port={port}");
    out.extend_from_slice(
        b"policy_context=\n\
          server_address=192.0.2.25\n\
          server_port=25\n\
          compatibility_level=3.6\n\
          mail_version=3.8.6\n\
          \n",
    );
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
        (Proto::Policy, _) => encode_policy(key, out),
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

    #[test]
    fn policy_replies() {
        let p = Proto::Policy;
        let r = |b: &[u8]| parse(&p, b);
        assert_eq!(r(b"action=DUNNO\n\n"), Ok(Some((14, Outcome::NotFound))));
        assert_eq!(
            r(b"action=dunno\n\naction="),
            Ok(Some((14, Outcome::NotFound)))
        );
        assert_eq!(
            r(b"action=REJECT Go away\n\n"),
            Ok(Some((23, Outcome::Found)))
        );
        assert_eq!(
            r(b"action=554 5.7.1 No\n\n"),
            Ok(Some((21, Outcome::Found)))
        );
        assert_eq!(r(b"action=OK\r\n\r\n"), Ok(Some((13, Outcome::Found))));
        assert_eq!(
            r(b"action=PREPEND X-Policy: yes\n\n"),
            Ok(Some((30, Outcome::Found)))
        );
        for temp in [
            &b"action=DEFER_IF_PERMIT Service unavailable\n\n"[..],
            b"action=defer_if_reject x\n\n",
            b"action=DEFER\n\n",
            b"action=450 4.7.1 Try later\n\n",
            b"action=Defer_If_Permit\tx\n\n",
        ] {
            assert_eq!(r(temp), Ok(Some((temp.len(), Outcome::Temp))), "{temp:?}");
        }
        // Only those exact words: others that start with DEFER, or a
        // 4xx that is not three digits, are actions like any other.
        for found in [
            &b"action=DEFERRED x\n\n"[..],
            b"action=DEFER_LATER\n\n",
            b"action=defer_if_permitx\n\n",
            b"action=4501 x\n\n",
            b"action=45x\n\n",
        ] {
            assert_eq!(
                r(found),
                Ok(Some((found.len(), Outcome::Found))),
                "{found:?}"
            );
        }
        // Other attributes may come with the action.
        assert_eq!(
            r(b"x=1\naction=DUNNO\n\n"),
            Ok(Some((18, Outcome::NotFound)))
        );
        // Incomplete.
        assert_eq!(r(b""), Ok(None));
        assert_eq!(r(b"action=DUNNO"), Ok(None));
        assert_eq!(r(b"action=DUNNO\n"), Ok(None));
        // Errors: no action, an empty action, a line without '=', too long.
        assert_eq!(r(b"\n"), Err(()));
        assert_eq!(r(b"x=1\n\n"), Err(()));
        assert_eq!(r(b"action=\n\n"), Err(()));
        assert_eq!(r(b"action= DUNNO\n\n"), Err(()));
        assert_eq!(r(b"DUNNO\n\n"), Err(()));
        assert_eq!(r(&vec![b'a'; MAX_POLICY_REPLY + 1]), Err(()));
    }

    #[test]
    fn policy_requests() {
        let p = Proto::Policy;
        let mut out = Vec::new();
        encode_request(&p, Op::Get, b"user7@example.com", b"", &mut out);
        let first = out.len();
        encode_request(&p, Op::Get, b"user8@example.com", b"", &mut out);
        // Two requests, each read by the daemon's own codec.
        let max = httpmapd::codec::policy::DEFAULT_MAX_REQUEST_BYTES;
        let (a, n) = httpmapd::codec::policy::parse(&out, max).unwrap().unwrap();
        assert_eq!(n, first);
        let (b, m) = httpmapd::codec::policy::parse(&out[n..], max)
            .unwrap()
            .unwrap();
        assert_eq!(n + m, out.len());
        assert_eq!(a.len(), 31);
        let get = |attrs, name: &str| {
            String::from_utf8(
                httpmapd::codec::policy::get(attrs, name.as_bytes())
                    .unwrap()
                    .to_vec(),
            )
            .unwrap()
        };
        assert_eq!(get(&a, "request"), "smtpd_access_policy");
        assert_eq!(get(&a, "protocol_state"), "RCPT");
        assert_eq!(get(&a, "sender"), "user7@example.com");
        assert_eq!(get(&b, "sender"), "user8@example.com");
        assert_eq!(get(&a, "sasl_username"), "");
        let addr = get(&a, "client_address");
        assert!(addr.parse::<std::net::Ipv4Addr>().is_ok(), "{addr}");
        assert_ne!(addr, get(&b, "client_address"));
        assert!(get(&a, "client_name").contains(&addr[3..].replace('.', "-")));
        // The same key, the same client.
        let mut again = Vec::new();
        encode_request(&p, Op::Get, b"user7@example.com", b"", &mut again);
        assert_eq!(again, out[..first]);
        assert!((600..900).contains(&first), "{first} bytes");
    }
}
