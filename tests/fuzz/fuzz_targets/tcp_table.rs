#![no_main]
//! `cargo fuzz run --fuzz-dir tests/fuzz tcp_table`: see tests/fuzz/README.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| httpmapd_fuzz::fuzz_tcp_table(data));
