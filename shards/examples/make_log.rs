//! Builds a shard directory of many segments in seconds, for restart measurements
//! (`scripts/restart-time.sh`).
//!
//! ```sh
//! cargo run --release -p shards --example make_log -- DIR SEGMENTS [--segment-bytes N]
//!     [--full-active | --active-bytes N] [--shard ID]
//! ```
//!
//! Every segment but the last is *sealed*, crafted with the crate's own `format` module exactly as
//! the engine leaves one: a header block, one real commit (four records of 1000 bytes), zeros up
//! to `--segment-bytes` (default 64 MiB), and its summary sidecar `<base_lsn:020>.sum`. The file is
//! extended with `set_len`, so the zeros are a hole: 1,600 segments of 64 MiB ("100 GB worth")
//! take about 20 MB of disk. The last segment is the *active* one and has no summary: one commit,
//! or with `--full-active` real commits of 1 MiB (records of 1 KiB) up to its end, as a crash
//! leaves a full active segment (`--active-bytes N`: about N bytes of them). No checkpoint is written, so the first open of the directory is
//! a crash recovery that scans the active segment.
//!
//! DIR is one shard's directory (for shardlogd, `<data-dir>/shard-000`); it must not hold
//! segments yet. Nothing is fsynced: run `sync` before measuring a cold start.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use shards::format::{
    chain_commit_crc, encode_record, record_bytes, seal_commit, SegmentHeader, SegmentSummary, SummaryKind,
    BLOCK_BYTES, COMMIT_HEADER_BYTES, SEGMENT_DATA_OFFSET,
};

/// Records in the one commit of a sealed segment.
const SEALED_RECORDS: u32 = 4;
const SEALED_PAYLOAD_BYTES: usize = 1000;
/// Commits of a full active segment: the engine's default bound of one commit ...
const ACTIVE_COMMIT_BYTES_MAX: usize = shards::COMMIT_BYTES_MAX_DEFAULT;
/// ... filled with records of this size.
const ACTIVE_PAYLOAD_BYTES: usize = 1024;
/// Stream id of every record.
const STREAM: u64 = 1;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    dir: PathBuf,
    segments: u64,
    segment_bytes: u64,
    /// Bytes of commits in the active segment; `None`: one small commit.
    active_bytes: Option<u64>,
    shard_id: u16,
}

fn usage() -> ! {
    eprintln!("usage: make_log DIR SEGMENTS [--segment-bytes N] [--full-active | --active-bytes N] [--shard ID]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut rest = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut args = Args {
        dir: PathBuf::new(),
        segments: 0,
        segment_bytes: shards::SEGMENT_BYTES_DEFAULT,
        active_bytes: None,
        shard_id: 0,
    };
    while let Some(a) = rest.next() {
        let mut value = |name: &str| rest.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--segment-bytes" => args.segment_bytes = value(&a).parse().expect("--segment-bytes: a number"),
            "--shard" => args.shard_id = value(&a).parse().expect("--shard: a number"),
            "--full-active" => args.active_bytes = Some(u64::MAX),
            "--active-bytes" => args.active_bytes = Some(value(&a).parse().expect("--active-bytes: a number")),
            "-h" | "--help" => usage(),
            _ if a.starts_with("--") => usage(),
            _ => positional.push(a),
        }
    }
    let [dir, segments] = <[String; 2]>::try_from(positional).unwrap_or_else(|_| usage());
    args.dir = PathBuf::from(dir);
    args.segments = segments.parse().expect("SEGMENTS: a number");
    assert!(args.segments > 0, "SEGMENTS must be at least 1");
    assert!(
        args.segment_bytes % BLOCK_BYTES == 0 && args.segment_bytes >= SEGMENT_DATA_OFFSET + 2 * BLOCK_BYTES,
        "--segment-bytes must be a multiple of {BLOCK_BYTES} and hold a header block and a commit"
    );
    args
}

/// A payload that is not all zeros, different per lsn.
fn payload(lsn: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lsn as usize * 31 + i) as u8 | 1).collect()
}

/// One sealed commit of `payloads.len()` records from `first_lsn`, encoded as the engine does.
fn commit(sequence: u64, first_lsn: u64, payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = vec![0u8; COMMIT_HEADER_BYTES];
    for p in payloads {
        encode_record(&mut buf, STREAM, None, p);
    }
    let body = buf.len() - COMMIT_HEADER_BYTES;
    seal_commit(&mut buf, sequence, first_lsn, payloads.len() as u32, body);
    buf
}

/// The segment file's name: what the engine calls `<base_lsn:020>.wal`.
fn segment_path(dir: &Path, base_lsn: u64) -> PathBuf {
    dir.join(format!("{base_lsn:020}.wal"))
}

/// Writes a segment: its header block, then `commits` back to back, then a hole to `segment_bytes`.
/// Returns the summary the engine would write for it once sealed.
fn write_segment(args: &Args, sequence: u64, base_lsn: u64, commits: &[Vec<u8>]) -> Result<SegmentSummary> {
    let mut header = vec![0u8; BLOCK_BYTES as usize];
    let seg = SegmentHeader {
        shard_id: args.shard_id,
        sequence,
        base_lsn,
    };
    seg.encode(&mut header);
    let mut body = Vec::with_capacity(commits.iter().map(Vec::len).sum());
    let mut summary = SegmentSummary {
        shard_id: args.shard_id,
        sequence,
        base_lsn,
        end_lsn: base_lsn,
        commits: 0,
        end_offset: SEGMENT_DATA_OFFSET,
        commits_crc: 0,
        index: Vec::new(),
    };
    for c in commits {
        let view = shards::format::parse_commit(c, sequence).expect("a commit this tool just sealed parses");
        assert_eq!(view.first_lsn, summary.end_lsn, "commits follow each other");
        // One index entry per 64 KiB, as the engine's sparse index (`INDEX_INTERVAL_BYTES`).
        let offset = SEGMENT_DATA_OFFSET + body.len() as u64;
        if summary.index.last().is_none_or(|&(_, o)| offset - o >= 64 << 10) {
            summary.index.push((view.first_lsn, offset));
        }
        summary.commits += 1;
        summary.commits_crc = chain_commit_crc(summary.commits_crc, c);
        summary.end_lsn = view.end_lsn();
        body.extend_from_slice(c);
    }
    summary.end_offset = SEGMENT_DATA_OFFSET + body.len() as u64;
    assert!(summary.end_offset <= args.segment_bytes, "commits fit in the segment");
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(segment_path(&args.dir, base_lsn))?;
    file.write_all_at(&header, 0)?;
    file.write_all_at(&body, SEGMENT_DATA_OFFSET)?;
    file.set_len(args.segment_bytes)?;
    Ok(summary)
}

fn write_summary(dir: &Path, summary: &SegmentSummary) -> Result<()> {
    let mut buf = vec![0u8; summary.encoded_bytes()];
    summary.encode(SummaryKind::Sealed, &mut buf);
    assert_eq!(
        SegmentSummary::decode(SummaryKind::Sealed, &buf).as_ref(),
        Ok(summary),
        "the summary round-trips"
    );
    let file = File::create(dir.join(format!("{:020}.sum", summary.base_lsn)))?;
    file.write_all_at(&buf, 0)?;
    Ok(())
}

/// Commits of 1 MiB (records of 1 KiB) from `first_lsn` until the next would not fit in
/// `bytes` or in the segment.
fn active_commits(segment_bytes: u64, bytes: u64, sequence: u64, first_lsn: u64) -> Vec<Vec<u8>> {
    let per_commit = (ACTIVE_COMMIT_BYTES_MAX - COMMIT_HEADER_BYTES) / record_bytes(ACTIVE_PAYLOAD_BYTES);
    let mut commits = Vec::new();
    let mut lsn = first_lsn;
    let mut room = (segment_bytes - SEGMENT_DATA_OFFSET).min(bytes);
    loop {
        let fits = (room as usize).saturating_sub(COMMIT_HEADER_BYTES) / record_bytes(ACTIVE_PAYLOAD_BYTES);
        let n = per_commit.min(fits);
        if n == 0 {
            return commits;
        }
        let payloads: Vec<Vec<u8>> = (lsn..lsn + n as u64)
            .map(|l| payload(l, ACTIVE_PAYLOAD_BYTES))
            .collect();
        let c = commit(sequence, lsn, &payloads);
        room -= c.len() as u64;
        lsn += n as u64;
        commits.push(c);
    }
}

fn main() -> Result<()> {
    let args = parse_args();
    std::fs::create_dir_all(&args.dir)?;
    let has_segments = std::fs::read_dir(&args.dir)?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".wal"));
    if has_segments {
        return Err(format!("{} already holds segments; use an empty directory", args.dir.display()).into());
    }
    let mut base_lsn = 1u64;
    for sequence in 1..args.segments {
        let payloads: Vec<Vec<u8>> = (base_lsn..base_lsn + u64::from(SEALED_RECORDS))
            .map(|l| payload(l, SEALED_PAYLOAD_BYTES))
            .collect();
        let summary = write_segment(&args, sequence, base_lsn, &[commit(sequence, base_lsn, &payloads)])?;
        write_summary(&args.dir, &summary)?;
        base_lsn = summary.end_lsn;
    }
    let sequence = args.segments;
    let commits = match args.active_bytes {
        Some(bytes) => active_commits(args.segment_bytes, bytes, sequence, base_lsn),
        None => vec![commit(sequence, base_lsn, &[payload(base_lsn, SEALED_PAYLOAD_BYTES)])],
    };
    let active = write_segment(&args, sequence, base_lsn, &commits)?;
    println!(
        "{}: {} segments of {} bytes ({} sealed with summaries), lsns 1..{}, active segment holds {} bytes \
         of commits",
        args.dir.display(),
        args.segments,
        args.segment_bytes,
        args.segments - 1,
        active.end_lsn,
        active.end_offset - SEGMENT_DATA_OFFSET
    );
    Ok(())
}
