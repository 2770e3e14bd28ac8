//! Property tests for every codec, through the public API only
//! (`httpmapd::codec::{hex, tcp_table, netstring, http, policy}` and
//! `httpmapd::client::parse_table`).
//!
//! The properties live in `tests/fuzz/src/lib.rs`, shared with the cargo-fuzz
//! targets (which need nightly): here they run on stable in every
//! `cargo test`, once with generated structured arguments and once through
//! the very `fuzz_*` entry points the fuzz targets call, with random bytes.
//! `PROPTEST_CASES=10000 cargo test --release --test proptest_codecs` runs
//! longer.

#[path = "fuzz/src/lib.rs"]
mod checks;

use httpmapd::codec::http::Framing;
use httpmapd::codec::{hex, netstring, policy, tcp_table};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` per property (PROPTEST_CASES overrides the default 256), and no
/// regression files written next to the sources: a failure prints its
/// minimal input; add it to `regression_inputs` below.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Bytes biased towards what the codecs care about: protocol punctuation,
/// digits, hex, CR/LF, NUL, high bytes.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => any::<u8>(),
        3 => prop::sample::select(b"get %:,\r\n\t;0123456789abcdefABCDEF\0\xff\x80 HTTP/1.".to_vec()),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(interesting_byte(), 0..max)
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        Just(Framing::NoBody),
        (0u64..300).prop_map(Framing::ContentLength),
        any::<u64>().prop_map(Framing::ContentLength),
        Just(Framing::Chunked),
        Just(Framing::CloseDelimited),
    ]
}

/// Feed piece sizes: empty (all at once), or a few small sizes (0 = an empty feed).
fn feed_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..40, 0..6)
}

/// A chunked body made of pieces the decoder must recognise, glued at random.
fn chunkish() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"5\r\n".to_vec()),
        Just(b"hello".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"0\r\n".to_vec()),
        Just(b"0\r\n\r\n".to_vec()),
        Just(b"A;ext=\"x\"\r\n".to_vec()),
        Just(b"X-T: 1\r\n".to_vec()),
        Just(b"ffffffffffffffffff\r\n".to_vec()),
        Just(b"\n".to_vec()),
        bytes(8),
    ];
    prop::collection::vec(token, 0..12).prop_map(|v| v.concat())
}

// ---------------------------------------------------------------------------
// hex
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn hex_decode_of_encode_is_identity(x in bytes(300)) {
        checks::hex_round_trip(&x);
    }

    #[test]
    fn hex_decode_never_panics(input in bytes(300)) {
        checks::hex_decode_any(&input);
    }

    #[test]
    fn hex_decode_of_valid_escapes(x in prop::collection::vec(any::<u8>(), 0..100)) {
        // Every byte written as an escape, in random hex case.
        let text: String = x.iter().map(|b| format!("%{b:02x}")).collect();
        let mut out = Vec::new();
        hex::decode(text.as_bytes(), &mut out).unwrap();
        prop_assert_eq!(out, x);
    }
}

// ---------------------------------------------------------------------------
// tcp_table
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tcp_request_round_trips(
        key in bytes(200),
        max_line in prop_oneof![0usize..300, Just(tcp_table::DEFAULT_MAX_REQUEST_BYTES)],
        crlf in any::<bool>(),
        trailing in bytes(40),
    ) {
        checks::tcp_request_round_trip(&key, max_line, crlf, &trailing);
    }

    #[test]
    fn tcp_request_at_the_limit(extra in 0usize..3, crlf in any::<bool>(), max_line in 6usize..5000) {
        // A key whose line is max_line - 1 + extra bytes long.
        let len = (max_line + extra - 1).saturating_sub(5 + usize::from(crlf)).max(1);
        checks::tcp_request_round_trip(&vec![b'k'; len], max_line, crlf, b"get next\n");
    }

    #[test]
    fn tcp_parse_request_never_panics(
        buf in prop_oneof![bytes(400), prop::collection::vec(
            prop_oneof![Just(b"get a\n".to_vec()), Just(b"get %zz\n".to_vec()), Just(b"put x\n".to_vec()), bytes(10)],
            0..20,
        ).prop_map(|v| v.concat())],
        max_line in prop_oneof![0usize..64, Just(tcp_table::DEFAULT_MAX_REQUEST_BYTES)],
    ) {
        checks::tcp_parse_request_any(&buf, max_line);
    }

    #[test]
    fn tcp_found_reply_is_at_most_4096_bytes(
        value in prop_oneof![
            bytes(300),
            (4000usize..4200, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
            (1300usize..1400).prop_map(|n| vec![b' '; n]),
            (0usize..4200, prop::collection::vec(any::<u8>(), 0..10))
                .prop_map(|(n, tail)| [vec![b'a'; n], tail].concat()),
        ]
    ) {
        checks::tcp_reply_found(&value);
    }

    #[test]
    fn tcp_status_replies_are_at_most_4096_bytes(
        text in prop_oneof![
            bytes(300),
            (4080usize..4100, ".{0,4}").prop_map(|(n, s)| [vec![b'a'; n], s.into_bytes()].concat()),
            "\\PC{1300,1400}".prop_map(String::into_bytes),
            (0usize..4200, prop::collection::vec(any::<u8>(), 0..10))
                .prop_map(|(n, tail)| [vec![b'a'; n], tail].concat()),
        ]
    ) {
        checks::tcp_reply_status(&text);
    }
}

// ---------------------------------------------------------------------------
// netstring / socketmap
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn netstring_round_trips(
        parts in prop::collection::vec(bytes(100), 0..4),
        max in prop_oneof![0usize..200, Just(netstring::DEFAULT_MAX_QUERY_BYTES)],
        trailing in bytes(30),
    ) {
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        checks::netstring_round_trip(&parts, max, &trailing);
    }

    #[test]
    fn netstring_parse_never_panics(
        buf in prop_oneof![
            bytes(200),
            ("[0-9]{0,25}", bytes(60)).prop_map(|(d, rest)| [d.into_bytes(), b":".to_vec(), rest].concat()),
        ],
        max in prop_oneof![0usize..100, Just(netstring::DEFAULT_MAX_QUERY_BYTES), Just(usize::MAX)],
    ) {
        checks::netstring_parse_any(&buf, max);
    }

    #[test]
    fn socketmap_split_never_panics(payload in bytes(100)) {
        checks::socketmap_split_any(&payload);
    }

    #[test]
    fn socketmap_replies_fit(value in bytes(300), max_reply in 0usize..400) {
        checks::socketmap_replies(&value, max_reply);
    }
}

// ---------------------------------------------------------------------------
// http
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn http_parse_head_never_panics(
        buf in prop_oneof![
            bytes(300),
            prop::collection::vec(prop_oneof![
                Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
                Just(b"HTTP/1.0 100 Continue\r\n".to_vec()),
                Just(b"Content-Length: 5\r\n".to_vec()),
                Just(b"Content-Length: 99999999999999999999999\r\n".to_vec()),
                Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
                Just(b"Connection: close\r\n".to_vec()),
                Just(b"POSTFIX-DICT-RESULTS: \t a b \r\n".to_vec()),
                Just(b"\r\n".to_vec()),
                bytes(12),
            ], 0..14).prop_map(|v| v.concat()),
        ]
    ) {
        checks::http_parse_head_any(&buf);
    }

    #[test]
    fn http_head_round_trips(
        status in (200u16..600).prop_filter("no body codes", |s| *s != 204 && *s != 304),
        results in bytes(60),
        length in any::<u64>(),
        filler in prop_oneof![0usize..8, 60usize..66],
    ) {
        checks::http_head_round_trip(status, &results, length, filler);
    }

    #[test]
    fn http_body_decoder_never_exceeds_its_limit(
        framing in framing(),
        max_body in prop_oneof![0usize..64, Just(65536usize)],
        input in prop_oneof![bytes(200), chunkish()],
        sizes in feed_sizes(),
        eof in any::<bool>(),
    ) {
        checks::http_body_any(framing, max_body, &input, &sizes, eof);
    }

    #[test]
    fn http_chunked_round_trips(
        body in bytes(300),
        chunk_sizes in prop::collection::vec(0usize..70, 0..5),
        style in any::<u8>(),
        trailers in any::<bool>(),
        sizes in feed_sizes(),
        max_body in prop_oneof![0usize..400, Just(65536usize)],
    ) {
        checks::http_chunked_round_trip(&body, &chunk_sizes, style, trailers, &sizes, max_body);
    }

    #[test]
    fn http_content_length_round_trips(
        body in bytes(300),
        extra in bytes(20),
        sizes in feed_sizes(),
        max_body in prop_oneof![0usize..400, Just(65536usize)],
    ) {
        checks::http_length_round_trip(&body, &extra, &sizes, max_body);
    }

    #[test]
    fn http_request_cannot_be_split_by_a_key(key in bytes(100), extra in bytes(20)) {
        checks::http_write_get(&key, &extra);
        checks::http_percent_encode(&key);
    }
}

// ---------------------------------------------------------------------------
// The query client's table names
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn client_parse_table_never_panics(
        s in prop_oneof![
            ".{0,40}",
            "(tcp|socketmap):(inet|unix)?:?[a-z0-9.:/]{0,20}",
        ]
    ) {
        checks::client_parse_table(&s);
    }
}

// ---------------------------------------------------------------------------
// The fuzz targets' own entry points, with random bytes
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn fuzz_target_hex(data in bytes(400)) { checks::fuzz_hex(&data); }

    #[test]
    fn fuzz_target_tcp_table(data in bytes(400)) { checks::fuzz_tcp_table(&data); }

    #[test]
    fn fuzz_target_netstring(data in bytes(400)) { checks::fuzz_netstring(&data); }

    #[test]
    fn fuzz_target_http_head(data in bytes(400)) { checks::fuzz_http_head(&data); }

    #[test]
    fn fuzz_target_http_body(data in prop_oneof![bytes(400), chunkish()]) {
        checks::fuzz_http_body(&data);
    }

    #[test]
    fn fuzz_target_chunked_round_trip(data in bytes(400)) {
        checks::fuzz_chunked_round_trip(&data);
    }

    #[test]
    fn fuzz_target_http_request(data in bytes(200)) { checks::fuzz_http_request(&data); }

    #[test]
    fn fuzz_target_client_table(data in bytes(60)) { checks::fuzz_client_table(&data); }
}

// ---------------------------------------------------------------------------
// policy delegation
// ---------------------------------------------------------------------------

/// A policy request line: a name (sometimes empty or with odd bytes), `=`,
/// a value with any bytes but a newline, sometimes a CR before the newline;
/// now and then a line without `=` or a very long one.
fn policy_line() -> impl Strategy<Value = Vec<u8>> {
    let text = || {
        prop::collection::vec(
            any::<u8>().prop_filter("no newline", |&b| b != b'\n'),
            0..12,
        )
    };
    prop_oneof![
        8 => ("[a-z_]{1,12}", text(), any::<bool>()).prop_map(|(n, v, cr)| {
            [n.as_bytes(), b"=", &v, if cr { b"\r\n" } else { b"\n" }].concat()
        }),
        1 => (text(), text()).prop_map(|(n, v)| [&n[..], b"=", &v, b"\n"].concat()),
        1 => text().prop_map(|n| [&n[..], b"\n"].concat()),
        1 => (8185usize..8200).prop_map(|n| [&b"x="[..], &vec![b'a'; n], b"\r\n"].concat()),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn policy_requests_parse_the_same_however_they_arrive(
        lines in prop::collection::vec(policy_line(), 0..8),
        end in prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b""[..])],
        trailing in bytes(30),
        max in prop_oneof![Just(policy::DEFAULT_MAX_REQUEST_BYTES), 0usize..300, 8000usize..9000],
    ) {
        let buf = [lines.concat(), end.to_vec(), trailing].concat();
        checks::policy_parse_any(&buf, max);
    }

    #[test]
    fn fuzz_target_policy(data in bytes(300)) { checks::fuzz_policy(&data); }
}

/// Inputs that once mattered, kept as plain regression cases (run the same
/// checks as the fuzz targets).
#[test]
fn regression_inputs() {
    checks::fuzz_http_body(&[]);
    checks::fuzz_tcp_table(&[]);
    checks::fuzz_netstring(&[]);
    checks::http_body_any(Framing::ContentLength(u64::MAX), 4, b"h", &[], true);
    checks::http_body_any(Framing::Chunked, 100, b"ffffffffffffffffff\r\n", &[1], true);
    checks::netstring_parse_any(b"99999999999999999999999", usize::MAX);
    checks::netstring_parse_any(b"00000000000000000003:abc,", 3);
    checks::tcp_parse_request_any(b"", 0);
    checks::tcp_reply_found(&vec![b'a'; 4091]);
    checks::tcp_reply_found(&vec![b'a'; 4092]);
    checks::tcp_reply_status("é".repeat(1000).as_bytes());
    // A line of exactly 8192 bytes with its CR, before its newline came.
    checks::policy_parse_any(&[&b"x="[..], &vec![b'a'; 8190], b"\r\n\n"].concat(), 65536);
}
