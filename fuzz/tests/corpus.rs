//! Replays every committed corpus file through the fuzz properties, so a regression that a fuzz
//! run once caught fails `cargo test` here without libFuzzer.

use std::fs;
use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    files("corpus", target)
}

/// Minimised inputs of crashes the fuzzers found, kept apart from the seeds so that a fuzz run
/// does not stop on a known crash before the fix lands. Each must replay clean once fixed.
fn regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions").join(target);
    if !dir.exists() {
        return Vec::new();
    }
    files("regressions", target)
}

fn files(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind).join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = fs::read(&path).expect("corpus file");
            (path.display().to_string(), bytes)
        })
        .collect()
}

#[test]
fn frame_decoder_corpus_replays_clean() {
    let files = corpus("frame_decoder");
    assert!(!files.is_empty());
    for (path, bytes) in files {
        eprintln!("{path}");
        shardlog_fuzz::frames::check(&bytes);
    }
}

#[test]
fn frame_decoder_seeds_are_valid_messages() {
    // Each framed seed must hold at least one frame that decodes: otherwise the seeds would not
    // start the fuzzer inside the codec at all.
    for (name, input) in shardlog_fuzz::seeds::frame_decoder() {
        let plan = shardlog_fuzz::frames::Plan::parse(&input).expect("seed has a plan");
        if plan.bare_payload {
            let req = proto::codec::decode_request(plan.stream);
            let resp = proto::codec::decode_response(plan.stream);
            assert!(req.is_ok() || resp.is_ok(), "{name}: bare payload decodes as neither");
            continue;
        }
        if name.starts_with("req-") || name.starts_with("resp-") || name.starts_with("pipelined") {
            let (payload, _) = proto::frame::split_frame(plan.stream, plan.max)
                .expect("seed frame header")
                .expect("seed frame complete");
            let req = proto::codec::decode_request(payload);
            let resp = proto::codec::decode_response(payload);
            assert!(req.is_ok() || resp.is_ok(), "{name}: first frame decodes as neither");
        }
    }
}

#[test]
fn chunk_plan_splits_the_stream_as_documented() {
    let input = shardlog_fuzz::frames::encode_input(0x86, &[2, 0], b"abcdef");
    let plan = shardlog_fuzz::frames::Plan::parse(&input).expect("plan");
    assert_eq!(plan.max, shardlog_fuzz::frames::FRAME_MAX_CHOICES[2]);
    assert!(plan.spare);
    assert!(plan.bare_payload);
    assert_eq!(plan.chunks, &[2, 0]);
    assert_eq!(plan.stream, b"abcdef");
    assert_eq!(shardlog_fuzz::frames::Plan::parse(&[0, 3, 1]), None);
}

#[test]
fn segment_scanner_corpus_replays_clean() {
    let files = corpus("segment_scanner");
    assert!(!files.is_empty());
    for (path, bytes) in files {
        eprintln!("{path}");
        shardlog_fuzz::segments::check(&bytes);
    }
}

#[test]
fn frame_decoder_regressions_replay_clean() {
    for (path, bytes) in regressions("frame_decoder") {
        eprintln!("{path}");
        shardlog_fuzz::frames::check(&bytes);
    }
}

#[test]
fn segment_scanner_regressions_replay_clean() {
    for (path, bytes) in regressions("segment_scanner") {
        eprintln!("{path}");
        shardlog_fuzz::segments::check(&bytes);
    }
}

#[test]
fn segment_seeds_hold_the_cases_they_are_named_for() {
    use shardlog_fuzz::segments::{image, spec, Plan};
    let seeds: std::collections::HashMap<String, Vec<u8>> =
        shardlog_fuzz::seeds::segment_scanner().into_iter().collect();
    let chain = |name: &str| {
        let plan = Plan::parse(&seeds[name]).expect("plan");
        let (image, header) = image(&plan);
        let header = header.expect("seed header is valid");
        let chain = spec::chain(
            &image,
            shards::format::SEGMENT_DATA_OFFSET,
            header.sequence,
            header.base_lsn,
        );
        let behind = spec::find_all(&image[chain.end_offset as usize..], chain.end_offset, header.sequence);
        (chain, behind)
    };
    let (clean, behind) = chain("seg-clean");
    assert_eq!((clean.commits.len(), clean.end_lsn, clean.clean_end), (3, 7, true));
    assert!(behind.is_empty());
    let (sealed, _) = chain("seg-clean-sealed");
    assert_eq!(sealed, clean, "sealing valid commits must not change them");
    let (torn, behind) = chain("seg-torn-tail");
    assert_eq!((torn.commits.len(), torn.clean_end, behind.len()), (2, false, 0));
    let (middle, behind) = chain("seg-middle-damage");
    assert_eq!((middle.commits.len(), middle.clean_end, behind.len()), (0, false, 2));
    let (recycled, behind) = chain("seg-recycled-leftovers");
    assert_eq!(
        (recycled.commits.len(), recycled.clean_end, behind.len()),
        (1, false, 0)
    );
    let (gap, behind) = chain("seg-lsn-gap");
    assert_eq!((gap.commits.len(), gap.end_lsn, behind.len()), (1, 2, 1));
    let (raw, _) = chain("seg-raw-header");
    assert_eq!(raw.commits.len(), 3);
    let (lying, behind) = chain("seg-sealed-count-mismatch");
    assert_eq!((lying.commits.len(), lying.clean_end, behind.len()), (0, false, 0));
}

#[test]
fn spec_rejects_a_commit_with_one_flipped_bit() {
    // The format model itself must be able to fail, or the differential checks prove nothing.
    let input = &shardlog_fuzz::seeds::segment_scanner()[0].1;
    let plan = shardlog_fuzz::segments::Plan::parse(input).expect("plan");
    let (image, _) = shardlog_fuzz::segments::image(&plan);
    let at = shards::format::SEGMENT_DATA_OFFSET as usize;
    let commit = shardlog_fuzz::segments::spec::commit(&image[at..], 1).expect("first commit is valid");
    for bit in 0..commit.total_bytes * 8 {
        let mut bad = image[at..at + commit.total_bytes].to_vec();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(shardlog_fuzz::segments::spec::commit(&bad, 1), None, "bit {bit}");
    }
}

#[test]
fn recovery_corpus_replays_clean() {
    // Same input layout as segment_scanner, so its corpus is replayed here too.
    let mut files = corpus("segment_scanner");
    files.extend(corpus("recovery"));
    files.extend(regressions("recovery"));
    for (path, bytes) in files {
        eprintln!("{path}");
        shardlog_fuzz::recover::check(&bytes);
    }
}
