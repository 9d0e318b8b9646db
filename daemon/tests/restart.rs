//! Restarting from summaries and the shutdown checkpoint, and the background scrub, against the
//! real daemon.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{data_dir, Daemon, DaemonOpts};
use proto::client::{Client, ReadParams};
use proto::codec::AppendRecord;
use proto::error::ClientError;
use proto::wire::{AckLevel, ErrorCode, ShardStatsT};

/// Small segments, so that a few hundred KB of appends seal several of them.
const SEGMENT_BYTES: u64 = 256 << 10;
/// Bound on waiting for the background task or the scrub; only a guard, far above what they take.
const BACKGROUND_GUARD: Duration = Duration::from_secs(60);

fn opts(scrub_bytes_per_sec: u64) -> DaemonOpts {
    let mut o = DaemonOpts::shards(1);
    let at = o
        .args
        .iter()
        .position(|a| a == "--segment-bytes")
        .expect("harness sets it");
    o.args[at + 1] = SEGMENT_BYTES.to_string();
    o.arg("--scrub-bytes-per-sec").arg(&scrub_bytes_per_sec.to_string())
}

fn shard_dir(data: &Path) -> PathBuf {
    data.join("shard-000")
}

fn files_ending(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list shard directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// Appends `batches` batches of 16 records of 1 KiB, durably. Returns the last lsn.
fn fill(client: &mut Client, batches: usize) -> u64 {
    let payload = vec![0x5au8; 1024];
    let records: Vec<AppendRecord<'_>> = (0..16).map(|_| AppendRecord::new(&payload)).collect();
    let mut last = 0;
    for _ in 0..batches {
        let a = client
            .append_batch(1, &records, AckLevel::Durable)
            .expect("append")
            .expect("Appended");
        last = a.first_lsn + u64::from(a.count) - 1;
    }
    last
}

fn count_records(client: &mut Client) -> u64 {
    let mut from = 1;
    let mut n = 0;
    loop {
        let batch = client.read(ReadParams::new(0, from)).expect("read");
        let records = batch.records.unwrap_or_default();
        if records.is_empty() {
            return n;
        }
        n += records.len() as u64;
        from = batch.next_lsn;
    }
}

fn shard_stats(client: &mut Client) -> ShardStatsT {
    let stats = client.stats().expect("stats");
    stats.shards.expect("shard stats").remove(0)
}

/// Waits until every sealed segment (all but the newest) has its summary on disk.
fn wait_for_summaries(dir: &Path, sealed_at_least: usize) {
    let started = Instant::now();
    loop {
        let wal = files_ending(dir, ".wal");
        let sum = files_ending(dir, ".sum");
        let stem = |n: &String| n.rsplit_once('.').map(|(s, _)| s.to_string()).unwrap_or_default();
        let summarised: Vec<String> = sum.iter().map(stem).collect();
        let stems: Vec<String> = wal.iter().map(stem).collect();
        // Every segment but the newest has its summary, and the newest (the active one, once the
        // background task has named it) has none.
        let done = stems.len() > sealed_at_least
            && stems[..stems.len() - 1].iter().all(|s| summarised.contains(s))
            && !summarised.contains(&stems[stems.len() - 1]);
        if done {
            return;
        }
        assert!(
            started.elapsed() < BACKGROUND_GUARD,
            "summaries not written: segments {wal:?}, summaries {sum:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clean_restart_reads_no_segment_body_and_a_crash_scans_only_the_active_one() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts(0));
    let mut c = d.client();
    let last = fill(&mut c, 80);
    let shard = shard_dir(dir.path());
    wait_for_summaries(&shard, 3);
    drop(c);
    assert!(d.terminate().success(), "clean shutdown");
    assert!(
        shard.join("checkpoint").exists(),
        "a clean shutdown leaves a checkpoint"
    );

    let d = Daemon::start(dir.path(), &opts(0));
    let mut c = d.client();
    let s = shard_stats(&mut c);
    assert_eq!(s.recovery_scanned_segments, 0, "a clean restart scans nothing: {s:?}");
    assert_eq!(s.recovery_trusted_segments, s.segment_count, "{s:?}");
    assert!(!shard.join("checkpoint").exists(), "the checkpoint is consumed on open");
    assert_eq!(count_records(&mut c), last);

    // After kill -9 there is no checkpoint: the active segment is scanned, the sealed ones with a
    // summary are not.
    let last = fill(&mut c, 10);
    wait_for_summaries(&shard, 3);
    drop(c);
    d.kill();
    let d = Daemon::start(dir.path(), &opts(0));
    let mut c = d.client();
    let s = shard_stats(&mut c);
    assert_eq!(
        s.recovery_scanned_segments, 1,
        "only the active segment is scanned: {s:?}"
    );
    assert_eq!(s.recovery_trusted_segments + 1, s.segment_count, "{s:?}");
    assert_eq!(count_records(&mut c), last);
    drop(c);
    assert!(d.terminate().success());
}

#[test]
fn scrub_reports_a_bit_flipped_in_a_sealed_segment_while_serving() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts(64 << 20));
    let mut c = d.client();
    let last = fill(&mut c, 60);
    let shard = shard_dir(dir.path());
    wait_for_summaries(&shard, 3);
    let wal = files_ending(&shard, ".wal");
    // Flip a bit in the first record of the oldest (sealed) segment, under the running daemon.
    // A buffered write: the daemon's direct reads see it once it is written back.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(shard.join(&wal[0]))
        .expect("open segment");
    let at = 4096 + 32 + 24 + 100;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).expect("read byte");
    byte[0] ^= 0x04;
    file.write_all_at(&byte, at).expect("flip bit");
    file.sync_all().expect("sync");
    drop(file);

    let started = Instant::now();
    let s = loop {
        let s = shard_stats(&mut c);
        if s.corrupt_segments > 0 {
            break s;
        }
        assert!(
            started.elapsed() < BACKGROUND_GUARD,
            "the scrub did not report the flipped bit: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s.corrupt_segments, 1);
    let finding = s.last_corruption.expect("the finding is described");
    assert!(finding.contains("segment 1 "), "{finding}");
    assert!(s.scrub_bytes > 0);

    // Reads of the damaged range fail with Corruption; every other range is served.
    match c.read(ReadParams::new(0, 1)) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Corruption, "{e:?}"),
        other => panic!("read of the damaged record gave {other:?}"),
    }
    let second_base: u64 = wal[1].trim_end_matches(".wal").parse().expect("segment name");
    let later = c
        .read(ReadParams::new(0, second_base))
        .expect("a later range is served");
    assert_eq!(later.records.unwrap_or_default()[0].lsn, second_base);
    // Appends go on.
    let more = fill(&mut c, 1);
    assert_eq!(more, last + 16);
    assert_eq!(shard_stats(&mut c).poisoned, None);
    drop(c);
    assert!(d.terminate().success());
}
