#![no_main]
//! `cargo fuzz run --fuzz-dir tests/fuzz chunked_round_trip`: see tests/fuzz/README.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| httpmapd_fuzz::fuzz_chunked_round_trip(data));
