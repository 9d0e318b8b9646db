//! Age-based retention (`ShardOptions::retention_age`): segments sealed longer ago than the
//! limit are retired (recycled into the next spare or removed), the active segment never is,
//! reads below the oldest retained lsn get `Truncated`, and everything newer stays readable.
//!
//! The age is short (300 ms) so the test takes about a second; the assertions that depend on
//! how late the scheduler runs us are made only when the clock says they must hold.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shards::storage::mem::MemStorage;
use shards::{AckLevel, Lsn, Shard, ShardError, ShardOptions};

const AGE: Duration = Duration::from_millis(300);
/// Far above the age plus any scheduling delay: only a guard against waiting forever.
const WAIT_MAX: Duration = Duration::from_secs(10);
const PAYLOAD_BYTES: usize = 1000;

/// Appends single durable records until the shard rotates; returns the lsn the new segment
/// starts at (the record that did not fit in the old one), and an instant from before the
/// append that sealed the old segment: the old segment's age is at least its elapsed time.
async fn append_until_rotation(shard: &Shard, next: &mut u64) -> (Lsn, Instant) {
    let segments = shard.stats().segment_count;
    loop {
        let before = Instant::now();
        let p = payload(*next, PAYLOAD_BYTES);
        let receipt = shard.append(1, &[rec(&p)], AckLevel::Durable).await.expect("append");
        assert_eq!(receipt.first_lsn, Lsn(*next));
        *next += 1;
        if shard.stats().segment_count > segments {
            return (receipt.first_lsn, before);
        }
    }
}

/// Waits until the oldest retained lsn reaches `lsn`.
async fn wait_first_available(shard: &Shard, lsn: Lsn) {
    let start = Instant::now();
    while shard.first_available_lsn() < lsn {
        assert!(
            start.elapsed() < WAIT_MAX,
            "age retention did not retire the segments below lsn {lsn} within {WAIT_MAX:?} \
             (oldest retained {}, {} segments)",
            shard.first_available_lsn(),
            shard.stats().segment_count
        );
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

async fn expect_truncated(shard: &Shard, from: Lsn) {
    let first = shard.first_available_lsn();
    let result = shard.read(from, 1 << 20, None).await;
    let Err(e) = result else {
        panic!("read from lsn {from}, below the oldest retained lsn {first}, succeeded: {result:?}");
    };
    assert!(
        matches!(e, ShardError::Truncated { requested, first_available } if requested == from && first_available == first),
        "read from lsn {from}, below the oldest retained lsn {first}: expected Truncated, got {e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("lsn {from} is below the oldest retained lsn {first}"),
        "the error says what was asked and where the log now starts"
    );
}

/// Everything from `from` to the durable end is readable and is what was appended.
async fn expect_readable(shard: &Shard, from: Lsn) {
    let end = shard.durable_lsn();
    let mut at = from;
    while at <= end {
        let batch = shard.read(at, 64 << 10, None).await.expect("read retained records");
        assert!(!batch.records.is_empty(), "no records at lsn {at}, durable end {end}");
        for r in batch.records {
            assert_eq!(r.lsn, at, "lsns are contiguous");
            assert_eq!(r.payload, payload(at.0, PAYLOAD_BYTES), "lsn {at} is what was appended");
            at = Lsn(at.0 + 1);
        }
    }
}

#[test]
fn segments_older_than_the_age_limit_are_retired_and_the_active_one_never_is() {
    for durability in BOTH {
        run(move || async move {
            let mem = MemStorage::new();
            let opts = ShardOptions {
                segment_bytes: 16 << 10,
                commit_bytes_max: 4 << 10,
                retention_age: Some(AGE),
                durability,
                ..ShardOptions::default()
            };
            let shard = open_mem(&mem, opts.clone()).await;
            let mut next = 1;
            // The first append opens segment 1; segment 1 is sealed when segment 2 starts at b2,
            // and so on.
            let (b1, _) = append_until_rotation(&shard, &mut next).await;
            assert_eq!(b1, Lsn(1));
            let (b2, seg1_sealed) = append_until_rotation(&shard, &mut next).await;
            glommio::timer::sleep(AGE / 2).await;
            // Taken before any append to segment 2 could seal it: segment 2 is at most this old.
            let before_seg2_sealed = Instant::now();
            let (b3, seg2_sealed) = append_until_rotation(&shard, &mut next).await;
            if seg1_sealed.elapsed() < AGE {
                assert_eq!(shard.first_available_lsn(), Lsn(1), "nothing is retired before its age");
            }

            // Segment 1 goes once it is older than the age; segment 2, sealed later, stays as
            // long as it is younger.
            wait_first_available(&shard, b2).await;
            assert!(seg1_sealed.elapsed() > AGE, "retired before its age");
            if before_seg2_sealed.elapsed() < AGE {
                assert_eq!(shard.first_available_lsn(), b2, "segment 2 is younger than the age");
                expect_readable(&shard, b2).await;
            }
            expect_truncated(&shard, Lsn(1)).await;
            expect_truncated(&shard, Lsn(b2.0 - 1)).await;

            // Segment 2 goes too; the active segment (from b3) stays however long it is idle.
            wait_first_available(&shard, b3).await;
            assert!(seg2_sealed.elapsed() > AGE, "retired before its age");
            glommio::timer::sleep(AGE * 2).await;
            assert_eq!(shard.first_available_lsn(), b3, "the active segment is never retired");
            assert_eq!(shard.stats().segment_count, 1);
            expect_truncated(&shard, Lsn(b3.0 - 1)).await;
            expect_readable(&shard, b3).await;

            // The retired files are gone: one recycled into the spare, the other removed.
            let files = mem.file_names();
            let wal: Vec<&String> = files.iter().filter(|n| n.ends_with(".wal")).collect();
            assert_eq!(wal, [&format!("{:020}.wal", b3.0)], "files: {files:?}");
            let data_files = files.iter().filter(|n| *n != "manifest").count();
            assert!(
                data_files <= 2,
                "only the active segment and one spare remain (and the manifest): {files:?}"
            );

            // The shard keeps appending, and a restart recovers exactly the retained log.
            let (last, _) = append_until_rotation(&shard, &mut next).await;
            expect_readable(&shard, b3).await;
            shard.close().await.expect("close");
            let reopened = open_mem(&mem, opts).await;
            assert_eq!(reopened.durable_lsn(), Lsn(next - 1));
            let first = reopened.first_available_lsn();
            assert!(first == b3 || first == last, "recovered from {first}");
            expect_readable(&reopened, first).await;
            reopened.close().await.expect("close");
        });
    }
}
