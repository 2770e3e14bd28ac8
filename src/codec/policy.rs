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

/// One request's attributes, in order.
pub type Attributes = Vec<(Vec<u8>, Vec<u8>)>;

/// Parses one request at the front of `buf`: `Ok(Some((attributes,
/// consumed)))`, `Ok(None)` when the empty line has not come yet.
pub fn parse(buf: &[u8], max_request: usize) -> Result<Option<(Attributes, usize)>, PolicyError> {
    let mut attrs = Vec::new();
    let mut pos = 0;
    loop {
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            if buf.len() - pos > MAX_LINE_BYTES {
                return Err(PolicyError::TooLarge("a line over 8192 bytes"));
            }
            if buf.len() > max_request {
                return Err(PolicyError::TooLarge("the request is over its limit"));
            }
            return Ok(None);
        };
        let mut line = &buf[pos..pos + nl];
        pos += nl + 1;
        if pos > max_request {
            return Err(PolicyError::TooLarge("the request is over its limit"));
        }
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(PolicyError::TooLarge("a line over 8192 bytes"));
        }
        if line.is_empty() {
            if attrs.is_empty() {
                return Err(PolicyError::Malformed("an empty request"));
            }
            return Ok(Some((attrs, pos)));
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            return Err(PolicyError::Malformed("a line without '='"));
        };
        if eq == 0 {
            return Err(PolicyError::Malformed("an attribute without a name"));
        }
        if attrs.len() >= MAX_ATTRIBUTES {
            return Err(PolicyError::TooLarge("too many attributes"));
        }
        attrs.push((line[..eq].to_vec(), line[eq + 1..].to_vec()));
    }
}

/// The value of attribute `name`, if present (the first one).
pub fn get<'a>(attrs: &'a Attributes, name: &[u8]) -> Option<&'a [u8]> {
    attrs
        .iter()
        .find(|(n, _)| n.as_slice() == name)
        .map(|(_, v)| v.as_slice())
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

/// The attributes as a JSON object (strings; bytes that are not UTF-8 are
/// replaced by U+FFFD; a repeated name keeps its last value).
pub fn json_body(attrs: &Attributes, out: &mut Vec<u8>) {
    let mut map = serde_json::Map::new();
    for (n, v) in attrs {
        map.insert(
            String::from_utf8_lossy(n).into_owned(),
            serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
        );
    }
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &serde_json::Value::Object(map));
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
            a,
            vec![
                (b"x".to_vec(), Vec::new()),
                (b"y".to_vec(), b"a=b".to_vec())
            ]
        );
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
