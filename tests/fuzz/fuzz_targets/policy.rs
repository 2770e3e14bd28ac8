#![no_main]
//! `cargo fuzz run --fuzz-dir tests/fuzz policy`: see tests/fuzz/README.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| httpmapd_fuzz::fuzz_policy(data));
