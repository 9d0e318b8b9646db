//! A shard opened (recovered) on arbitrary segment bytes, its records read back.
//! The properties are documented in `shardlog_fuzz::recover`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shardlog_fuzz::recover::check(data));
