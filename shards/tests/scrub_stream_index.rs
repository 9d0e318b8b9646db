//! The scrub checks each sealed segment's stream index file (`<base_lsn:020>.six`) once the
//! segment's body has passed: a file with a flipped bit, or none at all, is rebuilt from the
//! segment and written again, without any filtered read asking for it, and without counting the
//! segment as corrupt (the log is intact). Filtered reads answer exactly throughout.

mod common;

use std::time::Duration;

use common::{open_mem, payload, rec, run, small_opts};
use shards::storage::mem::MemStorage;
use shards::{AckLevel, Durability, Lsn, ReadRecord, Shard, ShardOptions};

const STREAMS: u64 = 4;

fn opts() -> ShardOptions {
    ShardOptions {
        // Fast, so that a pass over a few small segments takes milliseconds.
        scrub_bytes_per_sec: 1 << 30,
        // Small segments, so that a few hundred appends span several.
        ..small_opts(Durability::Dsync)
    }
}

/// Appends of 2 records of 700 bytes, the streams taking turns, 8 in flight at a time so that
/// commits hold several streams.
async fn append_some(shard: &Shard, appends: u64, seed: u64) {
    let mut tickets = Vec::new();
    for i in 0..appends {
        let payloads: Vec<Vec<u8>> = (0..2).map(|r| payload(seed + i * 2 + r, 700)).collect();
        let records: Vec<_> = payloads.iter().map(|p| rec(p)).collect();
        tickets.push(shard.append(1 + i % STREAMS, &records, AckLevel::Durable));
        if tickets.len() == 8 || i + 1 == appends {
            for t in tickets.drain(..) {
                t.await.expect("durable append");
            }
        }
    }
}

/// Reads filtered to each stream (and to one never written) return what filtering the whole log
/// gives.
async fn check_reads(shard: &Shard, when: &str) {
    let end = shard.durable_lsn().0;
    let mut all: Vec<ReadRecord> = Vec::new();
    let mut at = shard.first_available_lsn().0;
    while at <= end {
        let batch = shard.read(Lsn(at), 1 << 20, None).await.expect("unfiltered read");
        assert!(
            !batch.records.is_empty(),
            "{when}: a read below the durable end returns records"
        );
        at = batch.next_lsn.0;
        all.extend(batch.records);
    }
    for stream in 1..=STREAMS + 1 {
        let want: Vec<&ReadRecord> = all.iter().filter(|r| r.stream == stream).collect();
        let mut got: Vec<ReadRecord> = Vec::new();
        let mut at = shard.first_available_lsn().0;
        while at <= end {
            let batch = shard.read(Lsn(at), 1 << 20, Some(stream)).await.expect("filtered read");
            assert!(batch.next_lsn.0 > at, "{when}: a filtered read advances");
            at = batch.next_lsn.0;
            got.extend(batch.records);
        }
        assert_eq!(got.iter().collect::<Vec<_>>(), want, "{when}: stream {stream}");
    }
}

/// Polls `done` every 5 ms for up to 30 s (generous for a loaded machine).
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if done() {
            return;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what} did not happen within 30 s");
}

/// The `.six` files of sealed segments whose summaries are written, oldest first.
fn sealed_index_files(mem: &MemStorage) -> Vec<String> {
    let names = mem.file_names();
    let mut six: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".six") && names.contains(&n.replace(".six", ".sum")))
        .cloned()
        .collect();
    six.sort();
    six
}

/// Flips a bit of the first stream's id in `name`: its checksum then fails.
fn flip(mem: &MemStorage, name: &str) {
    mem.flip_bit(name, 72, 3);
}

#[test]
fn the_scrub_rewrites_bad_stream_index_files_of_unloaded_indexes() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, opts()).await;
        append_some(&shard, 240, 1).await;
        check_reads(&shard, "before").await;
        shard.close().await.expect("close");
        let six = sealed_index_files(&mem);
        assert!(six.len() >= 4, "several sealed segments have index files: {six:?}");
        let (flipped, missing) = (six[0].clone(), six[2].clone());
        let flipped_image = mem.live_image(&flipped).expect("listed");
        let missing_image = mem.live_image(&missing).expect("listed");
        flip(&mem, &flipped);
        assert_ne!(mem.live_image(&flipped), Some(flipped_image.clone()));
        shards::storage::Storage::remove(&mem, &missing).await.expect("remove");

        // No filtered read until the files are back: the scrub alone finds them.
        let shard = open_mem(&mem, opts()).await;
        wait_until("the scrub's rewrite of the damaged and the missing index files", || {
            mem.live_image(&flipped).as_ref() == Some(&flipped_image)
                && mem.live_image(&missing).as_ref() == Some(&missing_image)
        })
        .await;
        let stats = shard.stats();
        assert_eq!(stats.scrub_bad_stream_indexes, 2, "both found by the scrub");
        assert_eq!(stats.corrupt_segments, 0, "a bad index file is not a corrupt segment");
        check_reads(&shard, "after the scrub's repair").await;
        shard.close().await.expect("close");

        // The rewritten files are trusted by the next open, and the scrub finds nothing more.
        let shard = open_mem(&mem, opts()).await;
        check_reads(&shard, "after reopening").await;
        let passes = shard.stats().scrub_passes;
        wait_until("another full scrub pass", || shard.stats().scrub_passes > passes).await;
        let stats = shard.stats();
        assert_eq!((stats.scrub_bad_stream_indexes, stats.corrupt_segments), (0, 0));
        shard.close().await.expect("close");
    });
}

#[test]
fn the_scrub_rewrites_the_bad_stream_index_file_of_a_loaded_index() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, opts()).await;
        append_some(&shard, 240, 2).await;
        // Every sealed segment's index is the committer's, in memory, and its file durable once
        // the scrub has passed over them all.
        wait_until("a full scrub pass", || shard.stats().scrub_passes > 0).await;
        let six = sealed_index_files(&mem);
        assert!(six.len() >= 4, "several sealed segments have index files: {six:?}");
        let victim = six[1].clone();
        let image = mem.live_image(&victim).expect("listed");
        flip(&mem, &victim);
        wait_until("the scrub's rewrite of the damaged index file", || {
            mem.live_image(&victim).as_ref() == Some(&image)
        })
        .await;
        let stats = shard.stats();
        assert_eq!(stats.scrub_bad_stream_indexes, 1);
        assert_eq!(stats.corrupt_segments, 0, "a bad index file is not a corrupt segment");
        check_reads(&shard, "after the scrub's repair").await;
        // The log goes on, and so do the indexes of the segments sealed from now on.
        append_some(&shard, 60, 3).await;
        check_reads(&shard, "after more appends").await;
        shard.close().await.expect("close");

        let shard = open_mem(&mem, opts()).await;
        assert_eq!(shard.stats().recovery.scanned, 0, "a clean reopen scans nothing");
        check_reads(&shard, "after reopening").await;
        shard.close().await.expect("close");
    });
}
