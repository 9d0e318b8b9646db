//! Properties checked by shardlog's fuzz targets.
//!
//! The logic lives here rather than in `fuzz_targets/` so that `cargo test` in this crate replays the
//! committed corpora (and any crash reproducer added to them) without libFuzzer or a sanitizer:
//! see `tests/corpus.rs`.

pub mod frames;
pub mod recover;
pub mod seeds;
pub mod segments;
