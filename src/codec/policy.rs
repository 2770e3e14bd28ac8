//! Postfix's SMTPD policy delegation protocol (`check_policy_service`,
//! SMTPD_POLICY_README), as pure functions: a request is `name=value` lines
//! ended by an empty line ([`parse`]), the reply `action=TEXT` and an empty
//! line ([`encode_action`]); many requests travel on one connection.
//! Unknown attributes pass through. The attributes become the body of the
//! HTTP request to the policy server: a JSON object ([`json_body`]) or a
//! form ([`form_body`]).
//!
//! Limits: at most [`MAX_ATTRIBUTES`] attributes, lines of at most
//! [`MAX_LINE_BYTES`], a request of at most the caller's `max_request`
//! bytes. A malformed or oversized request is an error: the caller closes
//! that connection (Postfix then applies its own `default_action`).

use std::fmt;

/// Most attributes in one request (Postfix sends about 30).
pub const MAX_ATTRIBUTES: usize = 256;
/// Longest `name=value` line, newline excluded.
pub const MAX_LINE_BYTES: usize = 8192;
/// Default bound on a whole request.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest action a policy server may return (SMTPD_POLICY_README: the
/// reply must fit Postfix's line limits).
pub const MAX_ACTION_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// A line without `=`, or an empty name.
    Malformed(&'static str),
    /// Too many attributes, a line or the request too long.
    TooLarge(&'static str),
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::Malformed(m) => write!(f, "malformed policy request: {m}"),
            PolicyError::TooLarge(m) => write!(f, "policy request too large: {m}"),
        }
    }
}

/// One request's attributes, in order: the request's lines (one copy) and
/// where each name and value lie in them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    text: Vec<u8>,
    /// (name start, `=` position, value end) in `text`.
    spans: Vec<(u32, u32, u32)>,
}

impl Attributes {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The `(name, value)` pairs, in the order Postfix sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.iter().map(|&(s, eq, e)| {
            let (s, eq, e) = (s as usize, eq as usize, e as usize);
            (&self.text[s..eq], &self.text[eq + 1..e])
        })
    }
}

/// Parses one request at the front of `buf`: `Ok(Some((attributes,
/// consumed)))`, `Ok(None)` when the empty line has not come yet.
pub fn parse(buf: &[u8], max_request: usize) -> Result<Option<(Attributes, usize)>, PolicyError> {
    // What is left after each request, most often: no allocation for it.
    if buf.is_empty() {
        return Ok(None);
    }
    let mut spans = Vec::with_capacity(32);
    let mut pos = 0;
    loop {
        let Some(nl) = memchr(b'\n', &buf[pos..]) else {
            // (A line's CR may have come without its newline yet.)
            if buf.len() - pos > MAX_LINE_BYTES + 1 {
                return Err(PolicyError::TooLarge("a line over 8192 bytes"));
            }
            if buf.len() > max_request {
                return Err(PolicyError::TooLarge("the request is over its limit"));
            }
            return Ok(None);
        };
        let start = pos;
        let mut end = pos + nl;
        pos += nl + 1;
        if pos > max_request {
            return Err(PolicyError::TooLarge("the request is over its limit"));
        }
        if end > start && buf[end - 1] == b'\r' {
            end -= 1;
        }
        let line = &buf[start..end];
        if line.len() > MAX_LINE_BYTES {
            return Err(PolicyError::TooLarge("a line over 8192 bytes"));
        }
        if line.is_empty() {
            if spans.is_empty() {
                return Err(PolicyError::Malformed("an empty request"));
            }
            let attrs = Attributes {
                text: buf[..pos].to_vec(),
                spans,
            };
            return Ok(Some((attrs, pos)));
        }
        let Some(eq) = memchr(b'=', line) else {
            return Err(PolicyError::Malformed("a line without '='"));
        };
        if eq == 0 {
            return Err(PolicyError::Malformed("an attribute without a name"));
        }
        if spans.len() >= MAX_ATTRIBUTES {
            return Err(PolicyError::TooLarge("too many attributes"));
        }
        // Offsets fit in u32: a request is bounded by max_request, itself
        // bounded by the configuration (at most a few MiB).
        spans.push((start as u32, (start + eq) as u32, end as u32));
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// The value of attribute `name`, if present (the first one).
pub fn get<'a>(attrs: &'a Attributes, name: &[u8]) -> Option<&'a [u8]> {
    attrs.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// Appends the reply `action=ACTION\n\n`.
pub fn encode_action(action: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"action=");
    out.extend_from_slice(action);
    out.extend_from_slice(b"\n\n");
}

/// Whether a server's answer can be sent as an action: one line of
/// printable text (UTF-8 allowed), at most [`MAX_ACTION_BYTES`].
pub fn valid_action(a: &[u8]) -> bool {
    a.len() <= MAX_ACTION_BYTES
        && std::str::from_utf8(a).is_ok()
        && a.iter().all(|&b| b >= 0x20 && b != 0x7f || b == b'\t')
}

/// The attributes as a JSON object of strings, in the order Postfix sent
/// them (bytes that are not UTF-8 are replaced by U+FFFD; a repeated name
/// keeps its last value).
pub fn json_body(attrs: &Attributes, out: &mut Vec<u8>) {
    out.push(b'{');
    let mut first = true;
    for (i, &(s, eq, e)) in attrs.spans.iter().enumerate() {
        let (s, eq, e) = (s as usize, eq as usize, e as usize);
        let name = &attrs.text[s..eq];
        // A repeated name is rare: names are compared only where their
        // lengths match.
        let repeated = attrs.spans[i + 1..].iter().any(|&(t, teq, _)| {
            let (t, teq) = (t as usize, teq as usize);
            teq - t == name.len() && attrs.text[t..teq] == *name
        });
        if repeated {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        json_string(name, out);
        out.push(b':');
        json_string(&attrs.text[eq + 1..e], out);
    }
    out.push(b'}');
}

/// Appends `s` as a JSON string (RFC 8259: `"`, `\\` and control
/// characters escaped).
fn json_string(s: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let text = String::from_utf8_lossy(s);
    let bytes = text.as_bytes();
    out.push(b'"');
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
        }
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

/// The attributes as `application/x-www-form-urlencoded`.
pub fn form_body(attrs: &Attributes, out: &mut Vec<u8>) {
    for (i, (n, v)) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        form_encode(n, out);
        out.push(b'=');
        form_encode(v, out);
    }
}

fn form_encode(s: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else if b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@b.example\nrecipient=c@d.example\nclient_address=192.0.2.1\n\n";

    #[test]
    fn requests() {
        let (a, n) = parse(REQ, 1024).unwrap().unwrap();
        assert_eq!(n, REQ.len());
        assert_eq!(a.len(), 5);
        assert_eq!(get(&a, b"sender"), Some(&b"a@b.example"[..]));
        assert_eq!(get(&a, b"nope"), None);
        // Cut anywhere: incomplete, never an error.
        for cut in 0..REQ.len() {
            assert_eq!(parse(&REQ[..cut], 1024), Ok(None), "cut at {cut}");
        }
        // Two in a row: one at a time.
        let two = [REQ, REQ].concat();
        let (_, n) = parse(&two, 1024).unwrap().unwrap();
        assert!(parse(&two[n..], 1024).unwrap().is_some());
        // An empty value and '=' in a value.
        let (a, _) = parse(b"x=\ny=a=b\n\n", 1024).unwrap().unwrap();
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            vec![(&b"x"[..], &b""[..]), (&b"y"[..], &b"a=b"[..])]
        );
        // A CR before the newline is not part of the value.
        let (a, _) = parse(b"x=1\r\n\r\n", 1024).unwrap().unwrap();
        assert_eq!(get(&a, b"x"), Some(&b"1"[..]));
    }

    #[test]
    fn bad_requests() {
        assert!(matches!(
            parse(b"novalue\n\n", 1024),
            Err(PolicyError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"=x\n\n", 1024),
            Err(PolicyError::Malformed(_))
        ));
        assert!(matches!(parse(b"\n", 1024), Err(PolicyError::Malformed(_))));
        assert!(matches!(
            parse(&vec![b'a'; 9000], 100_000),
            Err(PolicyError::TooLarge(_))
        ));
        assert!(matches!(parse(REQ, 50), Err(PolicyError::TooLarge(_))));
        let many: Vec<u8> = (0..300)
            .flat_map(|i| format!("a{i}=x\n").into_bytes())
            .collect();
        assert!(matches!(
            parse(&many, 100_000),
            Err(PolicyError::TooLarge(_))
        ));
    }

    #[test]
    fn bodies_and_actions() {
        let (a, _) = parse(b"sender=a b&c@x\nsize=100\n\n", 1024)
            .unwrap()
            .unwrap();
        let mut f = Vec::new();
        form_body(&a, &mut f);
        assert_eq!(f, b"sender=a+b%26c%40x&size=100");
        let mut j = Vec::new();
        json_body(&a, &mut j);
        let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
        assert_eq!(v["sender"], "a b&c@x");
        assert_eq!(v["size"], "100");
        assert_eq!(j, br#"{"sender":"a b&c@x","size":"100"}"#);
        // Escapes, a repeated name (its last value, in its last place),
        // bytes that are not UTF-8, every control character.
        let ctl: Vec<u8> = (1u8..0x20).chain([0x7f]).collect();
        let mut req = b"q=a\"b\\c\tz\nd=1\nbin=\xff\xfe\nd=2\nctl=".to_vec();
        req.extend_from_slice(
            &ctl.iter()
                .copied()
                .filter(|&b| b != b'\n')
                .collect::<Vec<_>>(),
        );
        req.extend_from_slice(b"\nu=caf\xc3\xa9\n\n");
        let (a, _) = parse(&req, 1024).unwrap().unwrap();
        j.clear();
        json_body(&a, &mut j);
        let head = [
            &br#"{"q":"a\"b\\c\tz","bin":""#[..],
            "\u{fffd}\u{fffd}".as_bytes(),
            br#"","d":"2","ctl":"\u0001\u0002"#,
        ]
        .concat();
        assert!(j.starts_with(&head), "{}", String::from_utf8_lossy(&j));
        let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 5);
        assert_eq!(v["q"], "a\"b\\c\tz");
        assert_eq!(v["d"], "2");
        assert_eq!(v["bin"], "\u{fffd}\u{fffd}");
        assert_eq!(v["u"], "café");
        let want: String = ctl
            .iter()
            .filter(|&&b| b != b'\n')
            .map(|&b| b as char)
            .collect();
        assert_eq!(v["ctl"], want.as_str());
        let mut out = Vec::new();
        encode_action(b"REJECT no", &mut out);
        assert_eq!(out, b"action=REJECT no\n\n");
        for (a, ok) in [
            (&b"DUNNO"[..], true),
            (b"REJECT 5.7.1 go \xc3\xa9", true),
            (b"a\nb", false),
            (b"a\0b", false),
            (b"\xff", false),
        ] {
            assert_eq!(valid_action(a), ok, "{a:?}");
        }
        assert!(!valid_action(&vec![b'a'; MAX_ACTION_BYTES + 1]));
    }
}
