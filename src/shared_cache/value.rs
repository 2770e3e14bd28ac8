//! What the shared cache holds, as pure functions: the Redis key of a
//! lookup (`PREFIX` `v:` `MAP` `:` `KEY`; the cold-key claim `PREFIX` `l:`
//! ...), and the stored value: a version byte, found or not found, when it
//! stops being fresh (Unix milliseconds, so every node of a fleet reads the
//! same lifetime), the fingerprint of the map's configuration that fetched
//! it ([`crate::config::MapConfig::answers_fingerprint`]: a node whose map
//! asks other servers, or reads their replies otherwise, never takes it),
//! and the value bytes (binary-safe). Anything else under the prefix is not
//! ours and reads as a miss.

/// The first byte of every value we store.
pub const VERSION: u8 = 2;
const HEADER_BYTES: usize = 18;

/// A decoded shared-cache value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `None`: a cached not-found.
    pub value: Option<Vec<u8>>,
    /// Until then (Unix ms) it answers as fresh; after, only as stale.
    pub fresh_until_unix_ms: u64,
    /// The fingerprint of the map configuration that fetched it.
    pub fingerprint: u64,
}

/// Milliseconds since the Unix epoch: the clock of the lifetimes stored
/// (every node of a fleet reads the same).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Appends the stored form of a result to `out`.
pub fn encode(value: Option<&[u8]>, fresh_until_unix_ms: u64, fingerprint: u64, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.push(u8::from(value.is_some()));
    out.extend_from_slice(&fresh_until_unix_ms.to_be_bytes());
    out.extend_from_slice(&fingerprint.to_be_bytes());
    out.extend_from_slice(value.unwrap_or_default());
}

/// Reads a stored value; `None` for anything not written by us.
pub fn decode(b: &[u8]) -> Option<Entry> {
    if b.len() < HEADER_BYTES || b[0] != VERSION || b[1] > 1 {
        return None;
    }
    let fresh = u64::from_be_bytes(b[2..10].try_into().ok()?);
    let fingerprint = u64::from_be_bytes(b[10..18].try_into().ok()?);
    let value = (b[1] == 1).then(|| b[HEADER_BYTES..].to_vec());
    if value.is_none() && b.len() > HEADER_BYTES {
        return None;
    }
    Some(Entry {
        value,
        fresh_until_unix_ms: fresh,
        fingerprint,
    })
}

/// The Redis key of `key` in map `map`.
pub fn value_key(prefix: &str, map: &str, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(b"v:");
    out.extend_from_slice(map.as_bytes());
    out.push(b':');
    out.extend_from_slice(key);
}

/// The Redis key of the claim on a cold key (one node fetches it).
pub fn claim_key(prefix: &str, map: &str, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(b"l:");
    out.extend_from_slice(map.as_bytes());
    out.push(b':');
    out.extend_from_slice(key);
}

/// The map and key a value key names (an invalidation, a dump): the map is
/// the longest of `maps` that fits (map names may hold `:`).
pub fn parse_value_key<'a>(
    prefix: &str,
    redis_key: &'a [u8],
    maps: impl Iterator<Item = &'a str>,
) -> Option<(&'a str, &'a [u8])> {
    let rest = redis_key
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b"v:")?;
    let mut best: Option<(&str, &[u8])> = None;
    for m in maps {
        if let Some(after) = rest
            .strip_prefix(m.as_bytes())
            .and_then(|r| r.strip_prefix(b":"))
        {
            if best.is_none_or(|(b, _)| m.len() > b.len()) {
                best = Some((m, after));
            }
        }
    }
    best
}

/// Escapes `*?[]\` for a `SCAN MATCH` pattern.
pub fn glob_escape(s: &[u8], out: &mut Vec<u8>) {
    for &b in s {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (v, t, f) in [
            (Some(&b"a\0b"[..]), 5u64, 7u64),
            (Some(b""), 0, u64::MAX),
            (None, u64::MAX, 0),
        ] {
            let mut out = Vec::new();
            encode(v, t, f, &mut out);
            assert_eq!(out.len(), HEADER_BYTES + v.map_or(0, <[u8]>::len));
            assert_eq!(
                decode(&out),
                Some(Entry {
                    value: v.map(<[u8]>::to_vec),
                    fresh_until_unix_ms: t,
                    fingerprint: f,
                })
            );
        }
        for junk in [
            &b""[..],
            b"x",
            b"\x03\x0100000000000000000",
            // The first version (no fingerprint): not ours any more.
            b"\x01\x01\0\0\0\0\0\0\0\0value",
            b"\x02\x00\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0extra",
            b"\x02\x05\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            b"\x02\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ] {
            assert_eq!(decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn keys() {
        let mut k = Vec::new();
        value_key("fleet:", "virtual", b"a@b", &mut k);
        assert_eq!(k, b"fleet:v:virtual:a@b");
        let maps = ["virtual", "a", "a:b"];
        assert_eq!(
            parse_value_key("fleet:", &k, maps.iter().copied()),
            Some(("virtual", &b"a@b"[..]))
        );
        assert_eq!(
            parse_value_key("fleet:", b"fleet:v:a:b:k", maps.iter().copied()),
            Some(("a:b", &b"k"[..]))
        );
        assert_eq!(
            parse_value_key("fleet:", b"fleet:l:virtual:k", maps.iter().copied()),
            None
        );
        assert_eq!(
            parse_value_key("fleet:", b"other:v:virtual:k", maps.iter().copied()),
            None
        );
        claim_key("fleet:", "virtual", b"k", &mut k);
        assert_eq!(k, b"fleet:l:virtual:k");
        let mut g = Vec::new();
        glob_escape(b"a*b?[c]\\", &mut g);
        assert_eq!(g, b"a\\*b\\?\\[c\\]\\\\");
    }
}
