//! What a server's complete reply means for a lookup: found (with the
//! value), not found, or an error answer (fail over to another server; the
//! server is not rested for it). Pure: a parsed head and body in, an
//! [`Outcome`] out, per the map's `result` mode (dict_http header, body text,
//! or a JSON pointer). No sockets, no health, no cache.
//!
//! A value must reach Postfix whole: a NUL would cut it there (Postfix keeps
//! results as C strings) and other control bytes have no place in a table
//! result, so a body or JSON value holding one (TAB excepted) is an error
//! answer, never a shortened value. (In header mode httparse already refuses
//! them.) JSON numbers are taken as the server wrote them (`1.50` stays
//! `1.50`, big integers keep every digit); `true`/`false` are errors, not
//! values.

use super::Outcome;
use crate::codec::http::Head;
use crate::config::{MapConfig, ResultMode};

/// Reads a whole reply as a lookup result: `Err` = the server answered
/// with an error (fail over, it is not a reason to rest the server).
/// The result header's value is moved out of `head`.
pub fn evaluate(
    map: &MapConfig,
    head: &mut Head,
    body: &[u8],
    url: &str,
) -> Result<Outcome, String> {
    if let crate::config::MapKind::Policy(_) = map.kind {
        return policy_action(map, head, body, url);
    }
    let status_error = || match &head.retmsg {
        Some(m) if !m.is_empty() => String::from_utf8_lossy(m).into_owned(),
        _ => format!("{url}: HTTP status {}", head.status),
    };
    let found_or_not = |v: Vec<u8>| {
        if v.is_empty() {
            Outcome::NotFound
        } else {
            Outcome::Found(v)
        }
    };
    match &map.result {
        ResultMode::Header => {
            if (200..300).contains(&head.status) {
                match head.results.take() {
                    Some(v) if v.len() > map.max_result_bytes => Err(format!(
                        "{url}: result of {} bytes exceeds max_result_bytes ({})",
                        v.len(),
                        map.max_result_bytes
                    )),
                    Some(v) if !v.is_empty() => Ok(Outcome::Found(v)),
                    _ => Ok(Outcome::NotFound),
                }
            } else {
                Err(status_error())
            }
        }
        ResultMode::Body => match head.status {
            200 => {
                let mut v = Vec::new();
                for line in body
                    .split(|&b| b == b'\n')
                    .map(<[u8]>::trim_ascii)
                    .filter(|l| !l.is_empty())
                {
                    check_value(line).map_err(|e| format!("{url}: the reply body {e}"))?;
                    if !v.is_empty() {
                        v.extend_from_slice(map.separator.as_bytes());
                    }
                    v.extend_from_slice(line);
                }
                Ok(found_or_not(v))
            }
            404 => Ok(Outcome::NotFound),
            _ => Err(status_error()),
        },
        ResultMode::Json(pointer) => match head.status {
            200 => {
                let doc: serde_json::Value = serde_json::from_slice(body)
                    .map_err(|e| format!("{url}: reply body is not JSON: {e}"))?;
                json_result(doc.pointer(pointer), &map.separator)
                    .map(found_or_not)
                    .map_err(|e| format!("{url}: {e} at JSON pointer {pointer:?}"))
            }
            404 => Ok(Outcome::NotFound),
            _ => Err(status_error()),
        },
    }
}

/// A policy server's reply: a 200 whose action (the body, or the JSON
/// string at the pointer) is one line of printable text of at most 4096
/// bytes is the action (`Found`); an empty one is `NotFound` (the caller
/// answers `DUNNO`); anything else, a 4xx included, is an error (in the
/// end the policy's `default_action`: an HTTP error is not a reason to
/// reject mail).
fn policy_action(map: &MapConfig, head: &Head, body: &[u8], url: &str) -> Result<Outcome, String> {
    use crate::codec::policy::valid_action;
    if head.status != 200 {
        return Err(format!("{url}: HTTP status {}", head.status));
    }
    let action: Vec<u8> = match &map.result {
        ResultMode::Json(pointer) => {
            let doc: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| format!("{url}: reply body is not JSON: {e}"))?;
            match doc.pointer(pointer) {
                Some(serde_json::Value::String(s)) => s.trim().as_bytes().to_vec(),
                Some(serde_json::Value::Null) | None => {
                    return Err(format!("{url}: no action at JSON pointer {pointer:?}"))
                }
                Some(_) => return Err(format!("{url}: the action at {pointer:?} is not a string")),
            }
        }
        _ => body.trim_ascii().to_vec(),
    };
    if action.is_empty() {
        return Ok(Outcome::NotFound);
    }
    if !valid_action(&action) {
        return Err(format!(
            "{url}: the action is not one line of printable text of at most {} bytes",
            crate::codec::policy::MAX_ACTION_BYTES
        ));
    }
    Ok(Outcome::Found(action))
}

/// Refuses a value from a server holding a byte Postfix cannot carry: NUL
/// (it would cut the value) or another control byte (TAB is allowed). Body
/// lines and JSON strings are checked one by one: the configured separator
/// that joins them is the operator's choice.
fn check_value(v: &[u8]) -> Result<(), String> {
    match v.iter().find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Some(b) => Err(format!(
            "holds the control byte 0x{b:02x}, which Postfix cannot take in a result"
        )),
        None => Ok(()),
    }
}

/// A JSON value as a result: strings and numbers as text (numbers exactly
/// as written), arrays of them joined by `separator`, missing or null as
/// empty (not found). Booleans, objects and nested arrays are errors.
pub fn json_result(v: Option<&serde_json::Value>, separator: &str) -> Result<Vec<u8>, String> {
    use serde_json::Value;
    fn scalar(v: &Value) -> Result<String, String> {
        match v {
            Value::String(s) => {
                check_value(s.as_bytes())?;
                Ok(s.trim().to_string())
            }
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Err(format!("a boolean ({b}), not a result")),
            Value::Null => Ok(String::new()),
            _ => Err("a nested object or array".to_string()),
        }
    }
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            let parts = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
            let parts: Vec<String> = parts.into_iter().filter(|p| !p.is_empty()).collect();
            Ok(parts.join(separator).into_bytes())
        }
        Some(Value::Object(_)) => Err("an object, not a result".to_string()),
        Some(v) => scalar(v).map(String::into_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_bytes_are_refused() {
        assert!(check_value(b"a@x, b@x\tc").is_ok());
        for bad in [
            &b"a\0b"[..],
            b"a\x01",
            b"\x7f",
            b"\x1b[0m",
            b"a\rb",
            b"a\nb",
        ] {
            assert!(check_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_results() {
        let doc: serde_json::Value = serde_json::from_str(
            r#"{"big": 12345678901234567890123, "dec": 1.50, "t": true, "lb": ["a", false]}"#,
        )
        .unwrap();
        assert_eq!(
            json_result(doc.pointer("/big"), ", ").unwrap(),
            b"12345678901234567890123"
        );
        assert_eq!(json_result(doc.pointer("/dec"), ", ").unwrap(), b"1.50");
        assert!(json_result(doc.pointer("/t"), ", ").is_err());
        assert!(json_result(doc.pointer("/lb"), ", ").is_err());
        let doc = json!({"nul": "a\u{0}b", "nl": ["a", "b\nc"]});
        assert!(json_result(doc.pointer("/nul"), ", ").is_err());
        assert!(json_result(doc.pointer("/nl"), ", ").is_err());
        let doc = json!({"r": "a@x", "list": ["a@x", "b@x", ""], "n": 7, "nul": null, "o": {"k": 1}, "e": ""});
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("/r", Ok("a@x")),
            ("/list", Ok("a@x, b@x")),
            ("/n", Ok("7")),
            ("/nul", Ok("")),
            ("/missing", Ok("")),
            ("/e", Ok("")),
            ("/o", Err(())),
        ];
        for (ptr, want) in cases {
            let got = json_result(doc.pointer(ptr), ", ");
            match want {
                Ok(w) => assert_eq!(got.unwrap(), w.as_bytes(), "{ptr}"),
                Err(()) => assert!(got.is_err(), "{ptr}"),
            }
        }
    }
}
