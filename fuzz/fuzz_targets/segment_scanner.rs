//! Arbitrary segment bytes through the shards crate's recovery parsing.
//! The properties are documented in `shardlog_fuzz::segments`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shardlog_fuzz::segments::check(data));
