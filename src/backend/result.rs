//! What a server's complete reply means for a lookup: found (with the
//! value), not found, or an error answer (fail over to another server; the
//! server is not rested for it). Pure: a parsed head and body in, an
//! [`Outcome`] out, per the map's `result` mode (dict_http header, body text,
//! or a JSON pointer). No sockets, no health, no cache.

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

/// A JSON value as a result: strings and numbers as text, arrays of them
/// joined by `separator`, missing or null as empty (not found).
pub fn json_result(v: Option<&serde_json::Value>, separator: &str) -> Result<Vec<u8>, String> {
    use serde_json::Value;
    fn scalar(v: &Value) -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.trim().to_string()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
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
    fn json_results() {
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
