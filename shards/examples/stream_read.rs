//! Measures a read filtered to a rare stream against reading just that stream's records, for the
//! stream index (issue #13; `scripts/bench.sh` runs it and writes the table of docs/BENCHMARKS.md).
//!
//! ```sh
//! cargo run --release -p shards --example stream_read -- DIR [--log-mib N] [--rounds N] [--shape NAME]
//! ```
//!
//! For each shape it builds, through the engine on real files under DIR, a shard of about
//! `--log-mib` MiB (default 256) of 1 KiB records in which one stream holds 1% of the records,
//! and a second shard holding only that stream's records, appended the same way. Both are closed
//! and opened again (so the indexes come from their files), then each round times, in this
//! order: (a) reading the rare stream through the filter from lsn 1 to the durable end, (b)
//! reading the second shard unfiltered: the same records' bytes, contiguous, and (c) reading the
//! first shard unfiltered, which is what a filtered read cost before the index (every commit in
//! between). Reads are O_DIRECT (the page cache plays no part; the device's own cache may).
//! The fastest round of each is reported; one JSON object per shape on stdout.
//!
//! Shapes: `batched`: every append is 64 records of one stream, one append in flight, so each
//! commit holds one stream (the rare stream's records come in batches, as a producer that
//! batches sends them). `interleaved`: appends of one record, 64 in flight, so group commit mixes
//! the streams and about half of the commits hold a record of the rare stream: an index of
//! commits cannot make that cheaper than reading those commits, and the row shows what it costs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use shards::{AckLevel, Lsn, RecordRef, Shard, ShardError, ShardOptions};

const RARE: u64 = 1_000;
const PAYLOAD_BYTES: usize = 1024;
/// Every this many records (or appends, batched) one is of the rare stream: 1%.
const RARE_EVERY: u64 = 100;
const READ_MAX_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Batched,
    Interleaved,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Batched => "batched",
            Shape::Interleaved => "interleaved",
        }
    }

    fn records_per_append(self) -> usize {
        match self {
            Shape::Batched => 64,
            Shape::Interleaved => 1,
        }
    }

    fn in_flight(self) -> usize {
        match self {
            Shape::Batched => 1,
            Shape::Interleaved => 64,
        }
    }
}

struct Args {
    dir: PathBuf,
    log_bytes: u64,
    rounds: usize,
    shapes: Vec<Shape>,
}

fn usage() -> ! {
    eprintln!("usage: stream_read DIR [--log-mib N] [--rounds N] [--shape batched|interleaved]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut rest = std::env::args().skip(1);
    let mut args = Args {
        dir: PathBuf::new(),
        log_bytes: 256 << 20,
        rounds: 3,
        shapes: vec![Shape::Batched, Shape::Interleaved],
    };
    let mut dir = None;
    while let Some(a) = rest.next() {
        let mut value = |name: &str| rest.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--log-mib" => args.log_bytes = value(&a).parse::<u64>().expect("--log-mib: a number") << 20,
            "--rounds" => args.rounds = value(&a).parse().expect("--rounds: a number"),
            "--shape" => {
                args.shapes = match value(&a).as_str() {
                    "batched" => vec![Shape::Batched],
                    "interleaved" => vec![Shape::Interleaved],
                    _ => usage(),
                }
            }
            _ if a.starts_with("--") => usage(),
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            _ => usage(),
        }
    }
    args.dir = dir.unwrap_or_else(|| usage());
    args
}

/// Appends records of the shape until `log_bytes` of payload: every `RARE_EVERY`th append (or
/// record) of the rare stream, the others spread over 8 streams; `only_rare` appends just the
/// rare ones. Returns (records, rare records).
async fn build(shard: &Shard, shape: Shape, log_bytes: u64, only_rare: bool) -> Result<(u64, u64), ShardError> {
    let payload = vec![0x5au8; PAYLOAD_BYTES];
    let per = shape.records_per_append();
    let records: Vec<RecordRef<'_>> = (0..per)
        .map(|_| RecordRef {
            payload: &payload,
            timestamp: None,
        })
        .collect();
    let appends = log_bytes / (PAYLOAD_BYTES * per) as u64;
    let mut in_flight = VecDeque::new();
    let (mut total, mut rare) = (0u64, 0u64);
    for i in 0..appends {
        let stream = if i % RARE_EVERY == 0 { RARE } else { 1 + i % 8 };
        if only_rare && stream != RARE {
            continue;
        }
        total += per as u64;
        rare += if stream == RARE { per as u64 } else { 0 };
        in_flight.push_back(shard.append(stream, &records, AckLevel::Durable));
        if in_flight.len() >= shape.in_flight() {
            in_flight.pop_front().expect("not empty").await?;
        }
    }
    for t in in_flight {
        t.await?;
    }
    Ok((total, rare))
}

/// Reads from lsn 1 to the durable end; returns (records, payload bytes, microseconds).
async fn read_all(shard: &Shard, stream: Option<u64>) -> Result<(u64, u64, u64), ShardError> {
    let end = shard.durable_lsn().0;
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut from = 1;
    while from <= end {
        let batch = shard.read(Lsn(from), READ_MAX_BYTES, stream).await?;
        records += batch.records.len() as u64;
        bytes += batch.records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        assert!(
            batch.next_lsn.0 > from || !batch.records.is_empty(),
            "reads make progress"
        );
        from = batch.next_lsn.0;
    }
    Ok((records, bytes, started.elapsed().as_micros() as u64))
}

async fn reopen(dir: &Path, shard: Shard) -> Result<Shard, ShardError> {
    shard.close().await?;
    Shard::open(dir, ShardOptions::default()).await
}

async fn measure(args: &Args, shape: Shape) -> Result<String, ShardError> {
    let all_dir = args.dir.join(format!("{}-all", shape.name()));
    let rare_dir = args.dir.join(format!("{}-rare", shape.name()));
    for d in [&all_dir, &rare_dir] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
    }
    let all = Shard::open(&all_dir, ShardOptions::default()).await?;
    let (records, rare_records) = build(&all, shape, args.log_bytes, false).await?;
    let all = reopen(&all_dir, all).await?;
    let rare = Shard::open(&rare_dir, ShardOptions::default()).await?;
    let (only, _) = build(&rare, shape, args.log_bytes, true).await?;
    assert_eq!(only, rare_records, "the second shard holds the same records");
    let rare = reopen(&rare_dir, rare).await?;
    let index_bytes_at_open = all.stats().stream_index_bytes;
    // The sealed segments' stream runs: the background task makes them as segments are sealed;
    // those it had not finished when the shard closed, it makes after the reopen.
    let runs_wait_us = wait_for_runs(&all).await;
    let runs_file_bytes = file_bytes(&all_dir, ".runs");
    let log_file_bytes = file_bytes(&all_dir, ".wal");
    let (mut filtered_us, mut baseline_us, mut scan_us) = (u64::MAX, u64::MAX, u64::MAX);
    let mut first_filtered_us = None;
    let mut rare_bytes = 0;
    for _ in 0..args.rounds {
        let (n, bytes, us) = read_all(&all, Some(RARE)).await?;
        assert_eq!(n, rare_records, "the filtered read returns every record of the stream");
        rare_bytes = bytes;
        filtered_us = filtered_us.min(us);
        first_filtered_us.get_or_insert(us);
        let (n, _, us) = read_all(&rare, None).await?;
        assert_eq!(n, rare_records);
        baseline_us = baseline_us.min(us);
        let (n, _, us) = read_all(&all, None).await?;
        assert_eq!(n, records);
        scan_us = scan_us.min(us);
    }
    let stats = all.stats();
    all.close().await?;
    rare.close().await?;
    Ok(format!(
        "{{\"shape\": \"{}\", \"log_bytes\": {}, \"segments\": {}, \"records\": {records}, \"rare_records\": {rare_records}, \
         \"rare_bytes\": {rare_bytes}, \"filtered_us\": {filtered_us}, \"baseline_us\": {baseline_us}, \
         \"unfiltered_us\": {scan_us}, \"ratio\": {:.3}, \"index_bytes_at_open\": {index_bytes_at_open}, \
         \"index_bytes\": {}, \"rounds\": {}, \"first_filtered_us\": {}, \"runs_reads\": {}, \
         \"runs_wait_us\": {runs_wait_us}, \"runs_file_bytes\": {runs_file_bytes}, \"log_file_bytes\": {log_file_bytes}}}",
        shape.name(),
        records * PAYLOAD_BYTES as u64,
        stats.segment_count,
        filtered_us as f64 / baseline_us.max(1) as f64,
        stats.stream_index_bytes,
        args.rounds,
        first_filtered_us.unwrap_or(0),
        stats.stream_runs_reads,
    ))
}

/// Waits until the shard has made every sealed segment's stream runs; returns how long that took.
async fn wait_for_runs(shard: &Shard) -> u64 {
    let started = Instant::now();
    while shard.stats().stream_runs_pending > 0 {
        assert!(started.elapsed().as_secs() < 600, "stream runs made within 10 minutes");
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    started.elapsed().as_micros() as u64
}

/// Bytes of the files in `dir` whose names end with `suffix`.
fn file_bytes(dir: &Path, suffix: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

fn main() {
    let args = parse_args();
    let out = shards::executor::run(
        shards::executor::ExecutorOptions::new("stream-read"),
        move || async move {
            for shape in args.shapes.clone() {
                match measure(&args, shape).await {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("stream_read: {}: {e}", shape.name());
                        std::process::exit(1);
                    }
                }
            }
        },
    );
    if let Err(e) = out {
        eprintln!("stream_read: executor: {e:?}");
        std::process::exit(1);
    }
}
