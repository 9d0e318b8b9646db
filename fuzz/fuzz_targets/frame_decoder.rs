//! Arbitrary bytes, fed in arbitrary chunks, through proto's framing and codec.
//! The properties are documented in `shardlog_fuzz::frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shardlog_fuzz::frames::check(data));
