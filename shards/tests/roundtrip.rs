mod common;

use common::*;
use shards::{AckLevel, Durability, Lsn, RecordRef, Shard};

fn round_trip_across_rotations(durability: Durability) {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let shard = Shard::open(&path, small_opts(durability)).await.unwrap();
        assert_eq!(shard.next_lsn(), Lsn(1));
        let mut futs = Vec::new();
        for i in 0..600u64 {
            let p = payload(i, 50 + (i as usize * 37) % 900);
            let r = RecordRef {
                payload: &p,
                timestamp: Some(1000 + i),
            };
            futs.push(shard.append(i % 3, &[r], AckLevel::Durable));
        }
        for (i, f) in futs.into_iter().enumerate() {
            let receipt = f.await.unwrap();
            assert_eq!(receipt.first_lsn, Lsn(i as u64 + 1));
        }
        assert_eq!(shard.durable_lsn(), Lsn(600));
        let stats = shard.stats();
        assert!(stats.segment_count > 3, "rotated: {} segments", stats.segment_count);
        // Each batch was serialised where its commit landed, across rotations too: one copy.
        assert_eq!(stats.commits_moved, 0, "commits whose body was moved when sealed");
        let check = |shard: Shard| async move {
            let mut from = Lsn(1);
            let mut seen = 0u64;
            while seen < 600 {
                let batch = shard.read(from, 10_000, None).await.unwrap();
                assert!(!batch.records.is_empty());
                for r in &batch.records {
                    let i = r.lsn.0 - 1;
                    assert_eq!(i, seen);
                    assert_eq!(r.payload, payload(i, 50 + (i as usize * 37) % 900));
                    assert_eq!(r.stream, i % 3);
                    assert_eq!(r.timestamp, Some(1000 + i));
                    seen += 1;
                }
                from = batch.next_lsn;
            }
            let only = shard.read(Lsn(1), 1 << 20, Some(2)).await.unwrap();
            assert!(only.records.iter().all(|r| r.stream == 2));
            assert!(!only.records.is_empty());
            let end = shard.read(Lsn(601), 1 << 20, None).await.unwrap();
            assert!(end.records.is_empty());
            shard
        };
        let shard = check(shard).await;
        shard.close().await.unwrap();
        // And again after recovery.
        let shard = Shard::open(&path, small_opts(durability)).await.unwrap();
        assert_eq!(shard.next_lsn(), Lsn(601));
        assert_eq!(shard.durable_lsn(), Lsn(600));
        let shard = check(shard).await;
        let r = shard
            .append(9, &[rec(b"after reopen")], AckLevel::Durable)
            .await
            .unwrap();
        assert_eq!(r.first_lsn, Lsn(601));
        shard.close().await.unwrap();
    });
}

#[test]
fn round_trip_across_rotations_dsync() {
    round_trip_across_rotations(Durability::Dsync);
}

#[test]
fn round_trip_across_rotations_linked() {
    round_trip_across_rotations(Durability::Linked);
}

#[test]
fn no_polled_ring_writes_after_opening_a_fresh_dir() {
    let dir = tempdir();
    let path = dir.path().join("fresh");
    run(move || async move {
        let shard = Shard::open(&path, small_opts(Durability::Dsync)).await.unwrap();
        for i in 0..20u64 {
            let p = payload(i, 100);
            shard.append(1, &[rec(&p)], AckLevel::Durable).await.unwrap();
        }
        let stats = glommio::executor().io_stats();
        assert_eq!(stats.poll_ring.file_writes().0, 0, "writes went to the polled ring");
        // Commits go through the shard's private ring; glommio's writes are the segment's
        // preparation (zero-fill), which the first commit waited for.
        assert!(stats.main_ring.file_writes().0 + stats.latency_ring.file_writes().0 >= 1);
        shard.close().await.unwrap();
    });
}
