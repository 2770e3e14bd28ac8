//! Postfix's `%XX` quoting, as used by tcp_table keys and values
//! (`hex_quote.c` / `hex_unquote.c`). This module owns the byte classification
//! ([`needs_quoting`]), the encoder ([`encode`], [`encoded_len`]), the
//! decoder ([`decode`]) and its lenient form for URLs ([`decode_lenient`]).
//! It works on byte slices only and touches no IO.

use std::fmt;

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes that must be quoted: '%', ASCII whitespace (space, \t, \n, \v, \f, \r),
/// every control byte (0x00-0x1f, 0x7f), every byte >= 0x80.
pub fn needs_quoting(b: u8) -> bool {
    // Printable ASCII other than space is 0x21..=0x7e; of those only '%' is quoted.
    b == b'%' || !(0x21..=0x7e).contains(&b)
}

/// Appends `input` %XX-encoded (upper-case hex) to `out`.
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(encoded_len(input));
    encode_reserved(input, out);
}

/// [`encode`] without the reservation (the caller reserved
/// [`encoded_len`]): runs of bytes that need no quoting are copied whole.
pub(crate) fn encode_reserved(input: &[u8], out: &mut Vec<u8>) {
    let mut rest = input;
    while let Some(i) = rest.iter().position(|&b| needs_quoting(b)) {
        out.extend_from_slice(&rest[..i]);
        push_encoded(rest[i], out);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Appends the encoded form of one byte (`%XX` or the byte itself).
pub(crate) fn push_encoded(b: u8, out: &mut Vec<u8>) {
    if needs_quoting(b) {
        out.extend_from_slice(&[
            b'%',
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 0x0f)],
        ]);
    } else {
        out.push(b);
    }
}

/// Length of the encoded form of one byte: 3 if quoted, else 1.
pub(crate) fn byte_encoded_len(b: u8) -> usize {
    if needs_quoting(b) {
        3
    } else {
        1
    }
}

/// Length `encode` would produce, without writing.
pub fn encoded_len(input: &[u8]) -> usize {
    input.len() + 2 * input.iter().filter(|&&b| needs_quoting(b)).count()
}

/// A '%' not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedEscape {
    /// Offset of the bad '%' in the decoder's input.
    pub offset: usize,
}

impl fmt::Display for MalformedEscape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed %XX escape at byte {}", self.offset)
    }
}

impl std::error::Error for MalformedEscape {}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends the decoded bytes of `input` to `out`. `%xx` is accepted in either
/// hex case; any other byte is copied as is (the decoder is lenient about bytes
/// the encoder would have quoted). A '%' not followed by two hex digits is an
/// error carrying the offset of that '%' within `input`.
///
/// On `Err`, `out` may already hold the bytes decoded before the bad escape:
/// callers that care truncate `out` back to its previous length.
pub fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), MalformedEscape> {
    out.reserve(input.len());
    // Fast path: most keys hold no escape at all.
    let Some(first) = input.iter().position(|&b| b == b'%') else {
        out.extend_from_slice(input);
        return Ok(());
    };
    out.extend_from_slice(&input[..first]);
    let mut i = first;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex_value);
            let lo = input.get(i + 2).copied().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => {
                    out.push((hi << 4) | lo);
                    i += 3;
                }
                _ => return Err(MalformedEscape { offset: i }),
            }
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(())
}

/// Appends the decoded bytes of `input` to `out`, leniently, as URL parts
/// are read (a path segment, a user or password): `%` and two hex digits
/// (either case) is the byte they spell; any other `%` (`%zz`, `%+1`, a `%`
/// too near the end) is kept as it is, like every other byte. Never fails.
pub fn decode_lenient(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex_value);
            let lo = input.get(i + 2).copied().and_then(hex_value);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi << 4) | lo);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(input, &mut out);
        out
    }

    fn dec(input: &[u8]) -> Result<Vec<u8>, MalformedEscape> {
        let mut out = Vec::new();
        decode(input, &mut out).map(|()| out)
    }

    #[test]
    fn every_byte_round_trips_with_exact_form() {
        for b in 0..=255u8 {
            let printable = (0x21..=0x7e).contains(&b) && b != b'%';
            let expected: Vec<u8> = if printable {
                vec![b]
            } else {
                format!("%{b:02X}").into_bytes()
            };
            assert_eq!(needs_quoting(b), !printable, "byte {b:#04x}");
            let encoded = enc(&[b]);
            assert_eq!(encoded, expected, "byte {b:#04x}");
            assert_eq!(encoded_len(&[b]), expected.len(), "byte {b:#04x}");
            assert_eq!(dec(&encoded), Ok(vec![b]), "byte {b:#04x}");
        }
        let all: Vec<u8> = (0..=255u8).collect();
        let encoded = enc(&all);
        assert_eq!(encoded.len(), encoded_len(&all));
        assert_eq!(dec(&encoded), Ok(all));
    }

    #[test]
    fn quoting_classes() {
        for &b in b" \t\n\x0b\x0c\r%\x00\x1f\x7f\x80\xff" {
            assert!(needs_quoting(b), "byte {b:#04x}");
        }
        for &b in b"!~aZ09@.+-_\"" {
            assert!(!needs_quoting(b), "byte {b:#04x}");
        }
    }

    #[test]
    fn encode_cases() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"alice@example.com", b"alice@example.com"),
            (b"john doe", b"john%20doe"),
            (b"100%", b"100%25"),
            (b"a\r\nb", b"a%0D%0Ab"),
            ("é".as_bytes(), b"%C3%A9"),
            (b"\"john doe\"@x", b"\"john%20doe\"@x"),
        ];
        for &(input, expected) in cases {
            assert_eq!(enc(input), expected, "input {input:?}");
            assert_eq!(encoded_len(input), expected.len(), "input {input:?}");
        }
    }

    #[test]
    fn encode_appends() {
        let mut out = b"200 ".to_vec();
        encode(b"a b", &mut out);
        assert_eq!(out, b"200 a%20b");
    }

    #[test]
    fn decode_cases() {
        type Case = (&'static [u8], Result<&'static [u8], usize>);
        let cases: &[Case] = &[
            (b"", Ok(b"")),
            (b"plain", Ok(b"plain")),
            (b"a%20b", Ok(b"a b")),
            (b"%c3%a9", Ok("é".as_bytes())),
            (b"%C3%A9", Ok("é".as_bytes())),
            (b"%c3%A9", Ok("é".as_bytes())),
            (b"%2a%2A", Ok(b"**")),
            (b"%25", Ok(b"%")),
            (b"%2525", Ok(b"%25")),
            (b"raw space", Ok(b"raw space")),
            (b"%", Err(0)),
            (b"%4", Err(0)),
            (b"%G0", Err(0)),
            (b"%0G", Err(0)),
            (b"a%zz", Err(1)),
            (b"ab%", Err(2)),
            (b"%20%2", Err(3)),
            (b"%%41", Err(0)),
            (b"% 41", Err(0)),
            (b"x%+1", Err(1)),
        ];
        for &(input, expected) in cases {
            let got = dec(input);
            let expected = expected
                .map(|v| v.to_vec())
                .map_err(|offset| MalformedEscape { offset });
            assert_eq!(got, expected, "input {input:?}");
        }
    }

    #[test]
    fn decode_appends_and_leaves_partial_on_error() {
        let mut out = b"k=".to_vec();
        assert_eq!(decode(b"a%20b", &mut out), Ok(()));
        assert_eq!(out, b"k=a b");
        let mut out = Vec::new();
        assert_eq!(
            decode(b"ab%2", &mut out),
            Err(MalformedEscape { offset: 2 })
        );
        assert_eq!(out, b"ab");
    }

    #[test]
    fn decode_lenient_cases() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"plain", b"plain"),
            (b"a%40b", b"a@b"),
            (b"%c3%A9", "\u{e9}".as_bytes()),
            (b"%2525", b"%25"),
            // Not an escape: kept as written.
            (b"%", b"%"),
            (b"%4", b"%4"),
            (b"ab%", b"ab%"),
            (b"%zz%4", b"%zz%4"),
            (b"%+1", b"%+1"),
            (b"%-1", b"%-1"),
            (b"% 41", b"% 41"),
            (b"%%41", b"%A"),
            // A byte past the '%' that is not ASCII (no panic, kept).
            ("%a\u{e9}".as_bytes(), "%a\u{e9}".as_bytes()),
            ("%\u{e9}".as_bytes(), "%\u{e9}".as_bytes()),
        ];
        for &(input, expected) in cases {
            let mut out = b"k=".to_vec();
            decode_lenient(input, &mut out);
            assert_eq!(&out[2..], expected, "input {input:?}");
        }
        // Every two-hex-digit escape decodes as the strict decoder does.
        for b in 0..=255u8 {
            for e in [format!("%{b:02x}"), format!("%{b:02X}")] {
                let mut out = Vec::new();
                decode_lenient(e.as_bytes(), &mut out);
                assert_eq!(out, [b], "{e}");
            }
        }
    }

    #[test]
    fn display() {
        assert_eq!(
            MalformedEscape { offset: 7 }.to_string(),
            "malformed %XX escape at byte 7"
        );
    }
}
