//! Reads filtered to one stream use each segment's stream index (`stream_index.rs`): they must
//! return exactly what filtering the unfiltered read gives, page by page, on random logs that
//! span several sealed segments and the active one, after a clean reopen (index files from the
//! seal and the checkpoint), after a crash (the active segment's index rebuilt by its scan), and
//! with an index file that is torn or has a flipped bit (not trusted: scanned or rebuilt); a
//! missing index file is rebuilt by the background task after the first filtered read. A read
//! for a rare stream skips the commits that do not hold it, so it reaches the end of a log
//! far longer than the scan bound in one call. The same holds with the stream runs of sealed
//! segments (`stream_runs.rs`): made, reopened, damaged (set aside and made again), or off; and
//! with the runs of the active segment kept in memory as it grows (its tail), whole or in part.

mod common;

use std::sync::mpsc;

use common::{open_mem, payload, rec, run, small_opts};
use proptest::prelude::*;
use shards::storage::mem::MemStorage;
use shards::{AckLevel, Durability, Lsn, ReadRecord, Shard};

/// One append: (stream, record count, payload length).
type Append = (u64, usize, usize);

async fn append_all(shard: &Shard, appends: &[Append], seed: u64) {
    let mut tickets = Vec::new();
    for (i, &(stream, count, len)) in appends.iter().enumerate() {
        let payloads: Vec<Vec<u8>> = (0..count).map(|r| payload(seed + (i * 7 + r) as u64, len)).collect();
        let records: Vec<_> = payloads.iter().map(|p| rec(p)).collect();
        // Several in flight, so commits hold appends of several streams.
        tickets.push(shard.append(stream, &records, AckLevel::Durable));
        if tickets.len() == 8 || i + 1 == appends.len() {
            for t in tickets.drain(..) {
                t.await.expect("durable append");
            }
        }
    }
}

/// Every durable record from `from`, read unfiltered in pages of `max_bytes`.
async fn read_unfiltered(shard: &Shard, from: u64, max_bytes: usize) -> Vec<ReadRecord> {
    let end = shard.durable_lsn().0;
    let mut out = Vec::new();
    let mut at = from;
    while at <= end {
        let batch = shard.read(Lsn(at), max_bytes, None).await.expect("unfiltered read");
        assert!(
            !batch.records.is_empty(),
            "an unfiltered read below the durable end returns a record"
        );
        at = batch.next_lsn.0;
        out.extend(batch.records);
    }
    out
}

/// Pages of a read filtered to `stream` from `from`, each checked on its own: records of the
/// stream, ascending, from the page's start, and `next_lsn` past them and never backwards.
async fn read_filtered(shard: &Shard, stream: u64, from: u64, max_bytes: usize) -> Vec<ReadRecord> {
    let end = shard.durable_lsn().0;
    let mut out: Vec<ReadRecord> = Vec::new();
    let mut at = from;
    let mut calls = 0;
    while at <= end {
        calls += 1;
        assert!(calls < 100_000, "a filtered read makes progress");
        let batch = shard
            .read(Lsn(at), max_bytes, Some(stream))
            .await
            .expect("filtered read");
        assert!(batch.next_lsn.0 >= at, "next_lsn never goes backwards");
        assert!(
            batch.next_lsn.0 > at || !batch.records.is_empty(),
            "a read below the durable end advances"
        );
        for r in &batch.records {
            assert_eq!(r.stream, stream);
            assert!(r.lsn.0 >= at && r.lsn.0 < batch.next_lsn.0);
            assert!(out.last().is_none_or(|l| l.lsn < r.lsn));
        }
        at = batch.next_lsn.0;
        out.extend(batch.records);
    }
    out
}

/// Compares filtered reads of each stream (and one that was never written) with the unfiltered
/// read, from the first lsn and from `mid`.
async fn check_reads(shard: &Shard, streams: u64, mid: u64, max_bytes: usize, when: &str) {
    let first = shard.first_available_lsn().0;
    let all = read_unfiltered(shard, first, 1 << 20).await;
    for stream in 1..=streams + 1 {
        for from in [first, mid.max(first)] {
            let want: Vec<&ReadRecord> = all.iter().filter(|r| r.stream == stream && r.lsn.0 >= from).collect();
            let got = read_filtered(shard, stream, from, max_bytes).await;
            let got: Vec<&ReadRecord> = got.iter().collect();
            assert_eq!(
                got, want,
                "{when}: stream {stream} from {from} with pages of {max_bytes} bytes"
            );
        }
    }
}

fn opts() -> shards::ShardOptions {
    // Small segments so that a log of a few hundred appends spans several.
    small_opts(Durability::Dsync)
}

/// Writes `appends`, checks, closes and reopens (checks), writes more and crashes (checks),
/// then flips a bit in or tears each index file (checks). Sealed segments' indexes may keep
/// `index_memory` bytes loaded: a small bound drops and reloads them all the time.
fn write_and_check(
    appends: Vec<Append>,
    streams: u64,
    max_bytes: usize,
    seed: u64,
    index_memory: usize,
    tail_memory: usize,
) {
    let opts = move || shards::ShardOptions {
        stream_index_memory_bytes: index_memory,
        stream_tail_memory_bytes: tail_memory,
        ..opts()
    };
    run(move || async move {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, opts()).await;
        let half = appends.len() / 2;
        append_all(&shard, &appends[..half], seed).await;
        let mid = shard.durable_lsn().0 / 2 + 1;
        check_reads(&shard, streams, mid, max_bytes, "first open").await;
        assert!(shard.stats().stream_index_bytes > 0, "the index's memory is reported");
        // The same once the background task has made the sealed segments' stream runs (above,
        // reads raced with it).
        wait_until("the stream runs", || shard.stats().stream_runs_pending == 0).await;
        check_reads(&shard, streams, mid, max_bytes, "with stream runs").await;
        shard.close().await.expect("close");

        let shard = open_mem(&mem, opts()).await;
        assert_eq!(shard.stats().recovery.scanned, 0, "a clean reopen scans nothing");
        check_reads(&shard, streams, mid, max_bytes, "after a clean reopen").await;
        append_all(&shard, &appends[half..], seed + 1).await;
        check_reads(&shard, streams, mid, max_bytes, "appending after a reopen").await;
        let crashed = mem.crash(seed);
        drop(shard);

        let shard = open_mem(&crashed, opts()).await;
        check_reads(&shard, streams, mid, max_bytes, "after a crash").await;
        shard.close().await.expect("close");

        for name in crashed
            .file_names()
            .iter()
            .filter(|n| n.ends_with(".six") || n.ends_with(".runs"))
        {
            let image = crashed.live_image(name).expect("listed");
            let damaged = crashed.crash(seed);
            if seed % 2 == 0 {
                // In the table or, for a runs file, anywhere in its runs too.
                let reach = if name.ends_with(".runs") {
                    image.len()
                } else {
                    image.len().min(4096)
                };
                let byte = seed % reach as u64;
                damaged.flip_bit(name, byte, (seed % 8) as u8);
            } else {
                damaged.overwrite(name, 64, &[0u8; 16]);
            }
            let shard = open_mem(&damaged, opts()).await;
            check_reads(&shard, streams, mid, max_bytes, &format!("with {name} damaged")).await;
            shard.close().await.expect("close");
        }
    });
}

fn append_strategy(streams: u64) -> impl Strategy<Value = Append> {
    // Stream 1 is common, the others rarer; records of up to a few KiB (segments are 64 KiB).
    (
        prop_oneof![4 => Just(1u64), 1 => 2..=streams],
        1usize..=4,
        prop_oneof![3 => 1usize..200, 1 => 200usize..3000],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn filtered_reads_return_what_the_unfiltered_scan_returns(
        appends in proptest::collection::vec(append_strategy(5), 20..300),
        max_bytes in prop_oneof![Just(1usize), 1usize..5000, Just(1usize << 20)],
        seed in 0u64..1_000_000,
        index_memory in prop_oneof![Just(shards::STREAM_INDEX_MEMORY_BYTES_DEFAULT), 0usize..2048],
        // The active segment's tail: kept whole, shedding runs, or given up.
        tail_memory in prop_oneof![Just(shards::STREAM_TAIL_MEMORY_BYTES_DEFAULT), 4096usize..40_000, 0usize..1024],
    ) {
        write_and_check(appends, 5, max_bytes, seed, index_memory, tail_memory);
    }
}

/// A log of about 12 MiB (beyond the 8 MiB a filtered read may scan) with one record of a rare
/// stream at its very end: the index takes the read straight to it in one call.
#[test]
fn a_rare_stream_is_found_past_the_scan_bound_in_one_read() {
    let (tx, rx) = mpsc::channel();
    run(move || async move {
        let mem = MemStorage::new();
        let opts = shards::ShardOptions {
            segment_bytes: 1 << 20,
            commit_bytes_max: 256 << 10,
            ..opts()
        };
        let shard = open_mem(&mem, opts.clone()).await;
        let p = payload(1, 4000);
        let records: Vec<_> = (0..16).map(|_| rec(&p)).collect();
        for _ in 0..200 {
            shard.append(1, &records, AckLevel::Durable).await.expect("append");
        }
        let rare = shard
            .append(2, &[rec(b"rare")], AckLevel::Durable)
            .await
            .expect("append");
        let batch = shard.read(Lsn(1), 4096, Some(2)).await.expect("read");
        tx.send((
            batch.records.len(),
            batch.records.first().map(|r| r.lsn),
            rare.first_lsn,
        ))
        .unwrap();
        shard.close().await.expect("close");
        // And once more from the index files after a clean reopen.
        let shard = open_mem(&mem, opts).await;
        let batch = shard.read(Lsn(1), 4096, Some(2)).await.expect("read");
        tx.send((
            batch.records.len(),
            batch.records.first().map(|r| r.lsn),
            rare.first_lsn,
        ))
        .unwrap();
        // Nothing of the stream after it: an empty batch that ends at the durable end.
        let after = shard
            .read(Lsn(rare.first_lsn.0 + 1), 4096, Some(2))
            .await
            .expect("read");
        assert!(after.records.is_empty());
        assert_eq!(after.next_lsn.0, shard.durable_lsn().0 + 1);
        let empty = shard.read(Lsn(1), 4096, Some(3)).await.expect("read");
        assert!(empty.records.is_empty());
        assert_eq!(
            empty.next_lsn.0,
            shard.durable_lsn().0 + 1,
            "a stream with no records skips to the end"
        );
        shard.close().await.expect("close");
    });
    for _ in 0..2 {
        let (count, lsn, rare) = rx.recv().unwrap();
        assert_eq!((count, lsn), (1, Some(rare)), "the rare record in one read");
    }
}

/// Polls `done` every 5 ms for up to 30 s (generous for a loaded machine).
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if done() {
            return;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{what} did not happen within 30 s");
}

#[test]
fn a_missing_stream_index_is_rebuilt_after_the_first_filtered_read() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, opts()).await;
        let appends: Vec<Append> = (0..200).map(|i| (1 + i % 3, 2, 700)).collect();
        append_all(&shard, &appends, 9).await;
        check_reads(&shard, 3, 100, 1 << 20, "before").await;
        shard.close().await.expect("close");
        let six: Vec<String> = mem.file_names().into_iter().filter(|n| n.ends_with(".six")).collect();
        assert!(
            six.len() >= 3,
            "sealed segments and the active one have index files: {six:?}"
        );
        // The oldest sealed segment's index is gone (as after an upgrade from a build without one).
        let victim = six[0].clone();
        shards::storage::Storage::remove(&mem, &victim).await.expect("remove");

        let shard = open_mem(&mem, opts()).await;
        let before = shard.stats().stream_index_bytes;
        // Right while it is missing: the segment is scanned.
        check_reads(&shard, 3, 100, 1 << 20, "index file missing").await;
        wait_until("the rebuild of the missing index file", || {
            mem.file_names().contains(&victim)
        })
        .await;
        assert!(
            shard.stats().stream_index_bytes > before,
            "the rebuilt index is in memory"
        );
        check_reads(&shard, 3, 100, 1 << 20, "index rebuilt").await;
        shard.close().await.expect("close");

        // And the rewritten file is trusted by the next open.
        let shard = open_mem(&mem, opts()).await;
        check_reads(&shard, 3, 100, 1 << 20, "after reopening with the rebuilt file").await;
        shard.close().await.expect("close");
    });
}

/// Loaded indexes of sealed segments stay within `stream_index_memory_bytes` (beyond the active
/// segment's), whether the committer built them (sealed since the open) or filtered reads loaded
/// them from their files, and reads still answer exactly, loading dropped ones again.
#[test]
fn sealed_stream_indexes_stay_within_their_memory_bound() {
    run(|| async {
        let mem = MemStorage::new();
        let appends: Vec<Append> = (0..900).map(|i| (1 + i % 7, 2, 700)).collect();
        // Unbounded first: what every sealed segment's index takes.
        let shard = open_mem(&mem, opts()).await;
        append_all(&shard, &appends, 3).await;
        shard.close().await.expect("close");
        let shard = open_mem(&mem, opts()).await;
        let active = shard.stats().stream_index_bytes;
        check_reads(&shard, 7, 500, 1 << 20, "unbounded").await;
        let all_sealed = shard.stats().stream_index_bytes - active;
        let sealed_segments = mem.file_names().iter().filter(|n| n.ends_with(".six")).count() - 1;
        assert!(sealed_segments >= 8, "{sealed_segments} sealed segments");
        shard.close().await.expect("close");

        // A quarter of that: at least one segment's index, far from all of them.
        let bound = all_sealed / 4;
        assert!(bound > 0);
        let bounded = || shards::ShardOptions {
            stream_index_memory_bytes: bound as usize,
            ..opts()
        };
        let shard = open_mem(&mem, bounded()).await;
        let active = shard.stats().stream_index_bytes;
        for round in 0..2 {
            check_reads(&shard, 7, 500, 1 << 20, &format!("bounded, round {round}")).await;
            let held = shard.stats().stream_index_bytes - active;
            assert!(
                held <= bound,
                "round {round}: {held} bytes of sealed indexes, bound {bound}"
            );
            assert!(held > 0, "the last ones read stay loaded");
        }
        // Segments sealed from now on: the committer's indexes are bounded too, once their files
        // are durable.
        append_all(&shard, &appends, 4).await;
        // Unbounded, this many sealed segments' indexes would take twice `all_sealed`; the active
        // segment's own takes far less than half of it (one of 8 or more segments).
        let limit = bound + all_sealed / 2;
        wait_until("the sealed segments' indexes to be written and dropped", || {
            shard.stats().stream_index_bytes <= limit
        })
        .await;
        check_reads(&shard, 7, 500, 1 << 20, "bounded, after more appends").await;
        shard.close().await.expect("close");
    });
}

/// One-record appends, 8 in flight: commits mix the streams, and stream 9's records lie one per
/// commit. (stream, 1 record, payload length)
fn interleaved(appends: usize) -> Vec<Append> {
    (0..appends)
        .map(|i| (if i % 10 == 0 { 9 } else { 1 + i as u64 % 4 }, 1, 300))
        .collect()
}

fn runs_files(mem: &MemStorage) -> Vec<String> {
    mem.file_names().into_iter().filter(|n| n.ends_with(".runs")).collect()
}

/// Sealed segments of an interleaved log get runs files; filtered reads go through them (and
/// answer as the unfiltered read does), after a reopen too without writing them again; a runs
/// file with a flipped bit in a run is set aside, the read answers exactly through the index,
/// and the file is made again.
#[test]
fn interleaved_streams_are_read_from_their_runs() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, opts()).await;
        append_all(&shard, &interleaved(1500), 21).await;
        wait_until("the stream runs", || shard.stats().stream_runs_pending == 0).await;
        let stats = shard.stats();
        assert!(
            stats.segment_count >= 4,
            "several sealed segments: {}",
            stats.segment_count
        );
        assert!(stats.stream_runs_bytes_written > 0, "runs were written");
        let files = runs_files(&mem);
        assert_eq!(
            files.len(),
            stats.segment_count - 1,
            "a runs file per sealed segment: {files:?}"
        );
        check_reads(&shard, 9, 700, 1 << 20, "with runs").await;
        check_reads(&shard, 9, 700, 500, "with runs, small pages").await;
        assert!(shard.stats().stream_runs_reads > 0, "filtered reads went through runs");
        shard.close().await.expect("close");

        let shard = open_mem(&mem, opts()).await;
        check_reads(&shard, 9, 700, 1 << 20, "after a reopen").await;
        let stats = shard.stats();
        assert!(stats.stream_runs_reads > 0, "the runs files were loaded and read");
        assert_eq!(stats.stream_runs_bytes_written, 0, "and not written again");
        shard.close().await.expect("close");

        // A flipped bit in the first run of a runs file (the table takes the first block).
        let victim = runs_files(&mem)[1].clone();
        let image = mem.live_image(&victim).expect("listed");
        assert!(image.len() > 4096, "{victim} holds runs");
        mem.flip_bit(&victim, 4096 + 40, 3);
        let shard = open_mem(&mem, opts()).await;
        check_reads(&shard, 9, 700, 1 << 20, "with a damaged run").await;
        wait_until("the damaged runs file made again", || {
            shard.stats().stream_runs_bytes_written > 0
        })
        .await;
        assert_eq!(
            mem.live_image(&victim).expect("made again"),
            image,
            "the same file again"
        );
        check_reads(&shard, 9, 700, 1 << 20, "with the runs file made again").await;
        shard.close().await.expect("close");
    });
}

#[test]
fn stream_runs_off_writes_none() {
    run(|| async {
        let mem = MemStorage::new();
        let off = || shards::ShardOptions {
            stream_runs: shards::StreamRuns::Off,
            ..opts()
        };
        let shard = open_mem(&mem, off()).await;
        append_all(&shard, &interleaved(600), 22).await;
        check_reads(&shard, 9, 300, 1 << 20, "runs off").await;
        let stats = shard.stats();
        assert!(stats.segment_count >= 2);
        assert_eq!((stats.stream_runs_pending, stats.stream_runs_reads), (0, 0));
        shard.close().await.expect("close");
        assert!(runs_files(&mem).is_empty(), "no runs files: {:?}", runs_files(&mem));
        // Turned on later, the sealed segments get theirs.
        let shard = open_mem(&mem, opts()).await;
        wait_until("the stream runs", || shard.stats().stream_runs_pending == 0).await;
        assert!(!runs_files(&mem).is_empty(), "runs made after turning them on");
        check_reads(&shard, 9, 300, 1 << 20, "runs turned on").await;
        shard.close().await.expect("close");
    });
}

/// A log that stays in its active segment: filtered reads take the part the tail holds from
/// memory (and the rest through the index); a tail bound too small for one stream's run leaves
/// reads to the index; a segment recovered at open gets its tail once the runs task has walked
/// it: reads stay exact in every state.
#[test]
fn the_active_segment_is_read_from_its_tail() {
    run(|| async {
        for tail_memory in [shards::STREAM_TAIL_MEMORY_BYTES_DEFAULT, 2048] {
            let mem = MemStorage::new();
            let big = move || shards::ShardOptions {
                segment_bytes: 4 << 20,
                stream_tail_memory_bytes: tail_memory,
                ..opts()
            };
            let shard = open_mem(&mem, big()).await;
            append_all(&shard, &interleaved(2500), 23).await;
            assert_eq!(shard.stats().segment_count, 1, "one active segment");
            check_reads(&shard, 9, 1200, 1 << 20, "first open").await;
            check_reads(&shard, 9, 1200, 700, "first open, small pages").await;
            let stats = shard.stats();
            if tail_memory == shards::STREAM_TAIL_MEMORY_BYTES_DEFAULT {
                assert!(stats.stream_tail_reads > 0, "reads from the tail");
                assert!(stats.stream_tail_bytes > 0, "its memory is reported");
            } else {
                assert!(stats.stream_tail_bytes <= 2048, "{} bytes", stats.stream_tail_bytes);
            }
            shard.close().await.expect("close");
            // Reopened: reads go through the index until the runs task has walked the recovered
            // part of the segment and joined it to what was booked since.
            let shard = open_mem(&mem, big()).await;
            check_reads(&shard, 9, 1200, 1 << 20, "after a reopen").await;
            append_all(&shard, &interleaved(500), 24).await;
            check_reads(&shard, 9, 1200, 1 << 20, "appending after a reopen").await;
            wait_until("the tail caught up", || shard.stats().stream_runs_pending == 0).await;
            let reads = shard.stats().stream_tail_reads;
            check_reads(&shard, 9, 1200, 1 << 20, "with the tail caught up").await;
            append_all(&shard, &interleaved(300), 26).await;
            check_reads(&shard, 9, 1200, 700, "appending after the catch-up").await;
            if tail_memory == shards::STREAM_TAIL_MEMORY_BYTES_DEFAULT {
                assert!(shard.stats().stream_tail_reads > reads, "reads from the caught-up tail");
            }
            shard.close().await.expect("close");
        }
    });
}

/// Runs longer than one write (128 KiB) come out of the tail byte for byte as a walk of the
/// sealed segment makes them (the tail's runs are written in pieces that carry a part-filled
/// block over, and get their checksums filled in on the way).
#[test]
fn long_runs_from_the_tail_match_those_a_walk_makes() {
    run(|| async {
        let mem = MemStorage::new();
        let seg_opts = || shards::ShardOptions {
            segment_bytes: 1 << 20,
            ..opts()
        };
        let shard = open_mem(&mem, seg_opts()).await;
        // Stream 9 every third record: a run of about a third of each segment.
        let appends: Vec<Append> = (0..4000)
            .map(|i| (if i % 3 == 0 { 9 } else { 1 + i as u64 % 2 }, 1, 300))
            .collect();
        append_all(&shard, &appends, 25).await;
        wait_until("the stream runs", || shard.stats().stream_runs_pending == 0).await;
        shard.close().await.expect("close");
        let name = runs_files(&mem)[0].clone();
        let from_tail = mem.live_image(&name).expect("listed");
        assert!(from_tail.len() > 300 << 10, "a long run: {} bytes", from_tail.len());
        shards::storage::Storage::remove(&mem, &name).await.expect("remove");

        let shard = open_mem(&mem, seg_opts()).await;
        wait_until("the runs file made again", || mem.file_names().contains(&name)).await;
        wait_until("the stream runs", || shard.stats().stream_runs_pending == 0).await;
        assert!(
            mem.live_image(&name).expect("made again") == from_tail,
            "the walk makes the same file"
        );
        check_reads(&shard, 9, 2000, 1 << 20, "with runs from a walk").await;
        shard.close().await.expect("close");
    });
}

/// Loading a sealed segment's index file is charged to the read's memory: with the pool nearly
/// all held elsewhere, a filtered read that must load a large index waits for room (where the
/// commit it then reads would have fitted), and answers once the room is there.
#[test]
fn loading_an_index_file_waits_for_read_memory() {
    run(|| async {
        let mem = MemStorage::new();
        let o = || shards::ShardOptions {
            segment_bytes: 256 << 10,
            stream_runs: shards::StreamRuns::Off,
            ..opts()
        };
        let shard = open_mem(&mem, o()).await;
        // A rare stream first, then 4000 streams of one record each: large index files.
        let mut appends: Vec<Append> = vec![(999_999, 1, 100)];
        appends.extend((0..4000).map(|i| (i as u64, 1, 100)));
        append_all(&shard, &appends, 27).await;
        shard.close().await.expect("close");
        let six = mem.live_image(
            &mem.file_names()
                .into_iter()
                .find(|n| n.ends_with(".six"))
                .expect("an index file"),
        );
        assert!(six.expect("listed").len() >= 32 << 10, "a large index file");

        let shard = open_mem(&mem, o()).await;
        let pool = shards::ReadPool::new(256 << 10);
        let mut hog = pool.memory();
        hog.acquire((256 << 10) - (16 << 10)).await;
        let finished = std::rc::Rc::new(std::cell::Cell::new(false));
        let read = glommio::spawn_local({
            let (shard, pool, finished) = (shard.clone(), pool.clone(), finished.clone());
            async move {
                let mut memory = pool.memory();
                let batch = shard.read_in(Lsn(1), 1 << 20, Some(999_999), &mut memory).await;
                finished.set(true);
                batch
            }
        })
        .detach();
        wait_until("the read waiting for room", || pool.waiting() == 1 || finished.get()).await;
        assert!(!finished.get(), "the read waited for room to load the index");
        hog.shrink_to(0);
        let batch = read.await.expect("not cancelled").expect("read");
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.records[0].lsn, Lsn(1));
        shard.close().await.expect("close");
    });
}
