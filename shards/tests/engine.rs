//! Behaviour of the engine against the in-memory storage double.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::*;
use shards::format::{SegmentHeader, BLOCK_BYTES, COMMIT_HEADER_BYTES, RECORD_HEADER_BYTES};
use shards::storage::mem::{FaultPoint, MemStorage};
use shards::storage::Storage;
use shards::{AckLevel, Durability, Lsn, SegmentPrep, Shard, ShardError, ShardOptions};

fn wal_files(mem: &MemStorage) -> Vec<String> {
    mem.file_names().into_iter().filter(|n| n.ends_with(".wal")).collect()
}

/// Bytes one single-record commit of `payload_len` takes on disk.
fn commit_len(payload_len: usize) -> u64 {
    (COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES + payload_len) as u64
}

async fn append_n(shard: &Shard, from: u64, n: u64, len: usize) {
    for i in from..from + n {
        let p = payload(i, len);
        let r = shard.append(1, &[rec(&p)], AckLevel::Durable).await.expect("append");
        assert_eq!(r.first_lsn, Lsn(i + 1));
    }
}

async fn read_all(shard: &Shard, from: Lsn) -> Vec<shards::ReadRecord> {
    let mut out = Vec::new();
    let mut from = from;
    loop {
        let batch = shard.read(from, 64 << 10, None).await.expect("read");
        if batch.records.is_empty() {
            return out;
        }
        from = batch.next_lsn;
        out.extend(batch.records);
    }
}

#[test]
fn group_commit_batches_many_appenders_into_one_fdatasync() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Linked)).await;
        append_n(&shard, 0, 1, 10).await;
        let before = mem.stats();
        let ps: Vec<Vec<u8>> = (1..101).map(|i| payload(i, 20)).collect();
        // All 100 appends are queued before the committer runs again.
        let futs: Vec<_> = ps
            .iter()
            .map(|p| shard.append(1, &[rec(p)], AckLevel::Durable))
            .collect();
        for f in futs {
            f.await.unwrap();
        }
        let after = mem.stats();
        assert_eq!(after.commit_syncs - before.commit_syncs, 1);
        assert_eq!(after.commits - before.commits, 1);
        assert_eq!(shard.stats().records_per_commit.max(), 100);
        shard.close().await.unwrap();
    });
}

#[test]
fn lone_append_is_not_delayed_by_any_timer() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Linked)).await;
        append_n(&shard, 0, 1, 10).await;
        for i in 1..30u64 {
            let before = mem.stats().commits;
            let p = payload(i, 100);
            let fut = shard.append(1, &[rec(&p)], AckLevel::Durable);
            // Only yields, no time: a commit that waited for a timer would not have started.
            for _ in 0..4 {
                futures_lite::future::yield_now().await;
            }
            assert_eq!(mem.stats().commits, before + 1, "commit started without waiting");
            fut.await.unwrap();
        }
        // One commit per append at concurrency 1: nothing waited to batch.
        assert_eq!(shard.stats().commits, 30);
        shard.close().await.unwrap();
    });
}

#[test]
fn overlapping_tail_block_writes_are_never_in_flight_together() {
    for durability in BOTH {
        run(move || async move {
            let mem = MemStorage::new();
            let shard = open_mem(&mem, small_opts(durability)).await;
            // The first segment is ready before the appends start.
            append_n(&shard, 0, 1, 10).await;
            mem.set_io_yields(6, 6);
            let ps: Vec<Vec<u8>> = (0..400).map(|i| payload(i, 30 + (i as usize % 7) * 11)).collect();
            let mut futs = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                futs.push(shard.append(1, &[rec(p)], AckLevel::Durable));
                // Trickle: a few appends per write, so most commits end mid-block and the next
                // one rewrites that block.
                if i % 3 == 0 {
                    for _ in 0..4 {
                        futures_lite::future::yield_now().await;
                    }
                }
            }
            for f in futs {
                f.await.unwrap();
            }
            let stats = mem.stats();
            assert!(stats.tail_rewrites > 10, "the case was forced: {stats:?}");
            assert_eq!(stats.overlap_violations, 0, "{stats:?}");
            assert_eq!(read_all(&shard, Lsn(1)).await.len(), 401);
            shard.close().await.unwrap();
        });
    }
}

#[test]
fn acks_arrive_in_lsn_order_under_pipelining() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Linked)).await;
        append_n(&shard, 0, 1, 10).await;
        mem.set_io_yields(1, 12);
        mem.set_sync_jitter(7);
        let acks: Rc<RefCell<Vec<(u64, u64)>>> = Rc::default();
        let mut tasks = Vec::new();
        for i in 1..300u64 {
            let shard = shard.clone();
            let acks = acks.clone();
            let p = payload(i, 40);
            let fut = shard.append(1, &[rec(&p)], AckLevel::Durable);
            tasks.push(glommio::spawn_local(async move {
                let r = fut.await.unwrap();
                acks.borrow_mut().push((r.first_lsn.0, shard.durable_lsn().0));
            }));
            if i % 7 == 0 {
                futures_lite::future::yield_now().await;
            }
        }
        for t in tasks {
            t.await;
        }
        let acks = acks.borrow().clone();
        assert_eq!(acks.len(), 299);
        for w in acks.windows(2) {
            assert!(w[0].0 < w[1].0, "acked out of lsn order: {w:?}");
        }
        for &(lsn, durable) in acks.iter() {
            assert!(durable >= lsn, "acked {lsn} with durable {durable}");
        }
        assert!(
            mem.stats().max_commits_in_flight >= 2,
            "pipelining happened: {:?}",
            mem.stats()
        );
        shard.close().await.unwrap();
    });
}

#[test]
fn torn_tail_is_truncated() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            segment_bytes: 1 << 20,
            ..small_opts(Durability::Linked)
        };
        let shard = open_mem(&mem, opts.clone()).await;
        append_n(&shard, 0, 20, 300).await;
        shard.close().await.unwrap();
        // As after a crash: no clean-shutdown checkpoint vouches for the end of the log.
        Storage::remove(&mem, "checkpoint")
            .await
            .expect("a clean close leaves a checkpoint");
        let wal = wal_files(&mem);
        assert_eq!(wal.len(), 1);
        // Damage the last commit (lsn 20) as a torn write would: its second half is zeros.
        let last_start = BLOCK_BYTES + 19 * commit_len(300);
        let end = last_start + commit_len(300);
        mem.overwrite(&wal[0], last_start + 100, &vec![0u8; (end - last_start - 100) as usize]);
        let shard = open_mem(&mem, opts.clone()).await;
        assert_eq!(shard.next_lsn(), Lsn(20));
        assert_eq!(shard.durable_lsn(), Lsn(19));
        let image = mem.live_image(&wal[0]).unwrap();
        let block_end = (last_start / BLOCK_BYTES + 1) * BLOCK_BYTES;
        assert!(
            image[last_start as usize..block_end as usize].iter().all(|&b| b == 0),
            "the rest of the torn block was zeroed"
        );
        append_n(&shard, 19, 3, 10).await;
        let records = read_all(&shard, Lsn(1)).await;
        assert_eq!(records.len(), 22);
        assert_eq!(records[19].payload, payload(19, 10));
        shard.close().await.unwrap();
    });
}

#[test]
fn corruption_in_the_middle_is_reported_not_skipped() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            segment_bytes: 1 << 20,
            ..small_opts(Durability::Dsync)
        };
        let shard = open_mem(&mem, opts.clone()).await;
        append_n(&shard, 0, 20, 300).await;
        shard.close().await.unwrap();
        let wal = wal_files(&mem);
        let bad = BLOCK_BYTES + 5 * commit_len(300);
        mem.flip_bit(&wal[0], bad + 200, 3);
        match Shard::open_with_storage(Rc::new(mem.clone()), opts.clone()).await {
            Err(ShardError::Corruption { segment, offset, .. }) => {
                assert_eq!(segment, 1);
                assert_eq!(offset, bad);
            }
            Ok(_) => panic!("opened over corruption"),
            Err(e) => panic!("wrong error {e}"),
        }
        // repair truncates there.
        let shard = open_mem(&mem, ShardOptions { repair: true, ..opts }).await;
        assert_eq!(shard.next_lsn(), Lsn(6));
        assert_eq!(read_all(&shard, Lsn(1)).await.len(), 5);
        append_n(&shard, 5, 2, 10).await;
        shard.close().await.unwrap();
    });
}

/// Writes 200 commits over several 64 KiB segments, closes, and flips a bit in the last commit of
/// the first (sealed) segment. Returns the offset of that commit, and its lsn.
async fn sealed_segment_with_a_flipped_bit(mem: &MemStorage, opts: &ShardOptions) -> (u64, Lsn) {
    let shard = open_mem(mem, opts.clone()).await;
    append_n(&shard, 0, 200, 1000).await;
    assert!(shard.stats().segment_count >= 3);
    shard.close().await.unwrap();
    let mut wal = wal_files(mem);
    wal.sort();
    // The last commit of the first (sealed) segment: valid commits follow only in later
    // segments, so only the segment chain shows it is missing.
    let per_segment = (64 * 1024 - BLOCK_BYTES) / commit_len(1000);
    let last = BLOCK_BYTES + (per_segment - 1) * commit_len(1000);
    mem.flip_bit(&wal[0], last + 40, 0);
    (last, Lsn(per_segment))
}

#[test]
fn corruption_in_a_sealed_segment_without_a_summary_fails_recovery() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            scrub_bytes_per_sec: 0,
            ..small_opts(Durability::Linked)
        };
        let (last, _) = sealed_segment_with_a_flipped_bit(&mem, &opts).await;
        for name in mem.file_names().into_iter().filter(|n| n.ends_with(".sum")) {
            Storage::remove(&mem, &name).await.unwrap();
        }
        match Shard::open_with_storage(Rc::new(mem.clone()), opts).await {
            Err(ShardError::Corruption { segment, offset, .. }) => {
                assert_eq!(segment, 1);
                assert_eq!(offset, last);
            }
            Ok(_) => panic!("opened over corruption"),
            Err(e) => panic!("wrong error {e}"),
        }
    });
}

/// A sealed segment with a durable summary is accepted without reading its body, so a bit
/// flipped in it is found by reads (a typed `Corruption` for that range, the rest served) and by
/// the scrub (logged and counted in `stats`), never skipped; appends go on.
#[test]
fn corruption_in_a_summarised_segment_is_found_by_reads_and_the_scrub() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            scrub_bytes_per_sec: 1 << 30,
            ..small_opts(Durability::Linked)
        };
        let (_, bad_lsn) = sealed_segment_with_a_flipped_bit(&mem, &opts).await;
        let shard = open_mem(&mem, opts).await;
        let report = shard.stats().recovery;
        assert!(report.trusted >= 2 && report.scanned == 0, "{report:?}");
        assert!(report.checkpoint_used, "{report:?}");
        match shard.read(bad_lsn, 1 << 20, None).await {
            Err(ShardError::Corruption { segment: 1, .. }) => {}
            other => panic!("read of the damaged commit gave {other:?}"),
        }
        let later = shard
            .read(Lsn(bad_lsn.0 + 1), 1 << 20, None)
            .await
            .expect("later range served");
        assert_eq!(later.records[0].lsn, Lsn(bad_lsn.0 + 1));
        let p = payload(200, 1000);
        shard
            .append(1, &[rec(&p)], AckLevel::Durable)
            .await
            .expect("appends go on");
        // The scrub runs in the background at 1 GiB/s: wait for it (bounded generously).
        let mut found = None;
        for _ in 0..2000 {
            let stats = shard.stats();
            if stats.corrupt_segments > 0 {
                found = stats.last_corruption;
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        let found = found.expect("the scrub reports the corrupt segment within 10 s");
        assert!(found.contains("segment 1 "), "{found}");
        assert_eq!(shard.stats().corrupt_segments, 1, "reported once");
        shard.close().await.unwrap();
    });
}

#[test]
fn recycled_segment_leftovers_are_not_revived() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            retention_bytes: Some(3 * (64 << 10)),
            ..small_opts(Durability::Linked)
        };
        let shard = open_mem(&mem, opts.clone()).await;
        append_n(&shard, 0, 400, 1000).await;
        let first = shard.first_available_lsn();
        assert!(first > Lsn(1));
        // Let the background task catch up, then check files were recycled, not only created.
        for _ in 0..100 {
            futures_lite::future::yield_now().await;
        }
        let stats = mem.stats();
        assert!(stats.segment_creates < 10, "segments were recycled: {stats:?}");
        shard.close().await.unwrap();
        let shard = open_mem(&mem, opts.clone()).await;
        assert_eq!(shard.next_lsn(), Lsn(401));
        let records = read_all(&shard, shard.first_available_lsn()).await;
        assert_eq!(records.last().unwrap().lsn, Lsn(400));
        for r in &records {
            assert_eq!(r.payload, payload(r.lsn.0 - 1, 1000));
        }
        // A short commit into the recycled active segment, then reopen: the old commits behind it
        // (another segment sequence) stay dead.
        append_n(&shard, 400, 1, 5).await;
        shard.close().await.unwrap();
        let shard = open_mem(&mem, opts).await;
        assert_eq!(shard.next_lsn(), Lsn(402));
        shard.close().await.unwrap();
    });
}

#[test]
fn failed_fdatasync_poisons_and_nothing_more_is_acked() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Linked)).await;
        append_n(&shard, 0, 3, 10).await;
        mem.inject(FaultPoint::CommitSync, libc::EIO, 0, Some(1));
        let p = payload(3, 10);
        let f1 = shard.append(1, &[rec(&p)], AckLevel::Durable);
        let f2 = shard.append(1, &[rec(&p)], AckLevel::Durable);
        assert!(matches!(f1.await, Err(ShardError::Poisoned { .. })));
        assert!(matches!(f2.await, Err(ShardError::Poisoned { .. })));
        let syncs = mem.stats().commit_syncs;
        // The fault has cleared, but a poisoned shard never retries and never acks.
        let later = shard.append(1, &[rec(&p)], AckLevel::None).await;
        assert!(matches!(later, Err(ShardError::Poisoned { .. })));
        assert!(matches!(
            shard.wait_durable(Lsn(5)).await,
            Err(ShardError::Poisoned { .. })
        ));
        assert_eq!(shard.durable_lsn(), Lsn(3));
        assert_eq!(mem.stats().commit_syncs, syncs);
        assert!(shard.stats().poisoned.is_some());
        // Durable data stays readable.
        assert_eq!(read_all(&shard, Lsn(1)).await.len(), 3);
        assert!(matches!(shard.close().await, Err(ShardError::Poisoned { .. })));
    });
}

#[test]
fn failed_dsync_write_poisons() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Dsync)).await;
        append_n(&shard, 0, 2, 10).await;
        mem.inject(FaultPoint::CommitWrite, libc::EIO, 0, Some(1));
        let p = payload(3, 10);
        let r = shard.append(1, &[rec(&p)], AckLevel::Durable).await;
        assert!(matches!(r, Err(ShardError::Poisoned { .. })));
        assert_eq!(shard.durable_lsn(), Lsn(2));
        assert!(shard.append(1, &[rec(&p)], AckLevel::Durable).await.is_err());
    });
}

#[test]
fn background_work_runs_in_its_own_low_share_queue() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Dsync)).await;
        // 200 commits of about 1 KB rotate 64 KiB segments a few times: each rotation needs a
        // spare segment prepared by the background task.
        append_n(&shard, 0, 200, 1000).await;
        assert!(wal_files(&mem).len() >= 3, "rotated: {:?}", wal_files(&mem));
        let queues = glommio::executor().all_task_queue_stats(Vec::new());
        let default = glommio::executor().current_task_queue();
        let committer = queues.iter().find(|q| q.index() == default).expect("default queue");
        let background: Vec<_> = queues.iter().filter(|q| q.index() != default).collect();
        assert_eq!(background.len(), 1, "one extra queue: {queues:?}");
        let background = background[0];
        assert!(
            background.current_shares() * 10 <= committer.current_shares(),
            "background shares {} vs committer {}",
            background.current_shares(),
            committer.current_shares()
        );
        assert!(
            background.queue_selected() > 0,
            "the background queue ran: {background:?}"
        );
        shard.close().await.unwrap();
    });
}

#[test]
fn retention_and_truncated_reads() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            retention_bytes: Some(2 * (64 << 10)),
            ..small_opts(Durability::Dsync)
        };
        let shard = open_mem(&mem, opts).await;
        append_n(&shard, 0, 300, 1000).await;
        // Retention runs in the background task; give it a bounded number of turns.
        for _ in 0..2000 {
            if shard.stats().segment_count <= 2 {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        let first = shard.first_available_lsn();
        assert!(first > Lsn(100), "old segments retired: {first}");
        assert!(shard.stats().segment_count <= 2);
        match shard.read(Lsn(1), 1 << 20, None).await {
            Err(ShardError::Truncated {
                requested,
                first_available,
            }) => {
                assert_eq!(requested, Lsn(1));
                assert_eq!(first_available, first);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        let records = read_all(&shard, first).await;
        assert_eq!(records.first().unwrap().lsn, first);
        assert_eq!(records.last().unwrap().lsn, Lsn(300));
        shard.close().await.unwrap();
    });
}

#[test]
fn recovery_of_an_empty_dir() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = open_mem(&mem, small_opts(Durability::Dsync)).await;
        assert_eq!(shard.next_lsn(), Lsn(1));
        assert_eq!(shard.durable_lsn(), Lsn(0));
        assert!(shard.read(Lsn(1), 100, None).await.unwrap().records.is_empty());
        shard.close().await.unwrap();
        let shard = open_mem(&mem, small_opts(Durability::Dsync)).await;
        assert_eq!(shard.next_lsn(), Lsn(1));
        append_n(&shard, 0, 2, 10).await;
        shard.close().await.unwrap();
    });
}

#[test]
fn recovery_of_an_empty_segment() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = small_opts(Durability::Linked);
        let shard = open_mem(&mem, opts.clone()).await;
        append_n(&shard, 0, 3, 10).await;
        shard.close().await.unwrap();
        // A segment whose header made it to disk but no commit did.
        let file = mem
            .open("00000000000000000004.wal", true, Durability::Linked)
            .await
            .unwrap();
        let mut buf = mem.alloc(64 << 10);
        SegmentHeader {
            shard_id: 0,
            sequence: 2,
            base_lsn: 4,
        }
        .encode(buf.as_mut_slice());
        file.write(0, buf).await.unwrap();
        file.sync().await.unwrap();
        let shard = open_mem(&mem, opts.clone()).await;
        assert_eq!(shard.next_lsn(), Lsn(4));
        assert_eq!(shard.stats().segment_count, 2);
        append_n(&shard, 3, 2, 10).await;
        assert_eq!(read_all(&shard, Lsn(1)).await.len(), 5);
        shard.close().await.unwrap();
        let shard = open_mem(&mem, opts).await;
        assert_eq!(shard.next_lsn(), Lsn(6));
        shard.close().await.unwrap();
    });
}

#[test]
fn recovery_of_a_segment_ending_exactly_at_a_block_boundary() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = small_opts(Durability::Linked);
        let shard = open_mem(&mem, opts.clone()).await;
        let len = BLOCK_BYTES as usize - COMMIT_HEADER_BYTES - RECORD_HEADER_BYTES;
        append_n(&shard, 0, 2, len).await;
        shard.close().await.unwrap();
        let shard = open_mem(&mem, opts.clone()).await;
        assert_eq!(shard.next_lsn(), Lsn(3));
        append_n(&shard, 2, 2, 10).await;
        shard.close().await.unwrap();
        let shard = open_mem(&mem, opts).await;
        let records = read_all(&shard, Lsn(1)).await;
        assert_eq!(records.len(), 4);
        assert_eq!(records[1].payload, payload(1, len));
        assert_eq!(records[2].payload, payload(2, 10));
        shard.close().await.unwrap();
    });
}

#[test]
fn no_space_preparing_a_segment_does_not_poison() {
    run(|| async {
        let mem = MemStorage::new();
        // The first spare can be created; every later one fails with ENOSPC until cleared.
        mem.inject(FaultPoint::Create, libc::ENOSPC, 1, None);
        let shard = open_mem(&mem, small_opts(Durability::Linked)).await;
        let mut acked = 0u64;
        let mut saw_no_space = false;
        for i in 0..200u64 {
            let p = payload(i, 1000);
            match shard.append(1, &[rec(&p)], AckLevel::Durable).await {
                Ok(r) => {
                    assert_eq!(r.first_lsn, Lsn(acked + 1));
                    acked += 1;
                }
                Err(ShardError::NoSpace) => {
                    saw_no_space = true;
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(saw_no_space);
        assert!(shard.stats().poisoned.is_none());
        assert_eq!(read_all(&shard, Lsn(1)).await.len() as u64, acked);
        mem.clear_faults();
        let p = payload(acked, 1000);
        let mut resumed = None;
        for _ in 0..1000 {
            match shard.append(1, &[rec(&p)], AckLevel::Durable).await {
                Ok(r) => {
                    resumed = Some(r);
                    break;
                }
                Err(ShardError::NoSpace) => glommio::timer::sleep(std::time::Duration::from_millis(20)).await,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        let r = resumed.expect("appends resume once space is back");
        assert_eq!(r.first_lsn, Lsn(acked + 1));
        shard.close().await.unwrap();
    });
}

#[test]
fn power_loss_keeps_every_acked_record() {
    for seed in 0..40u64 {
        run(move || async move {
            let mem = MemStorage::new();
            let opts = small_opts(if seed % 2 == 0 {
                Durability::Linked
            } else {
                Durability::Dsync
            });
            let shard = open_mem(&mem, opts.clone()).await;
            mem.set_io_yields(2, 5);
            mem.set_sync_jitter(seed);
            let acked: Rc<RefCell<u64>> = Rc::default();
            let mut tasks = Vec::new();
            for i in 0..200u64 {
                let p = payload(i, 20 + (i as usize * 31 + seed as usize) % 700);
                let fut = shard.append(1, &[rec(&p)], AckLevel::Durable);
                let acked = acked.clone();
                tasks.push(glommio::spawn_local(async move {
                    if let Ok(r) = fut.await {
                        let mut a = acked.borrow_mut();
                        *a = (*a).max(r.first_lsn.0);
                    }
                }));
                if i % 5 == 0 {
                    futures_lite::future::yield_now().await;
                }
            }
            // Crash somewhere in the middle of the run.
            for _ in 0..(seed * 13 % 200) {
                futures_lite::future::yield_now().await;
            }
            let after = mem.crash(seed);
            let acked_at_crash = *acked.borrow();
            let recovered = open_mem(&after, opts).await;
            assert!(
                recovered.durable_lsn().0 >= acked_at_crash,
                "seed {seed}: acked {acked_at_crash}, recovered {}",
                recovered.durable_lsn()
            );
            let records = read_all(&recovered, Lsn(1)).await;
            assert_eq!(records.len() as u64, recovered.durable_lsn().0, "seed {seed}");
            for r in &records {
                let i = r.lsn.0 - 1;
                assert_eq!(r.payload, payload(i, 20 + (i as usize * 31 + seed as usize) % 700));
            }
            recovered.close().await.unwrap();
            for t in tasks {
                t.await;
            }
            shard.close().await.unwrap();
        });
    }
}

/// Polls `mem`'s stats until `done` holds, for up to 10 s (the background task prepares the
/// next segment file on its own time).
async fn await_stats(mem: &MemStorage, what: &str, done: impl Fn(&shards::storage::mem::MemStats) -> bool) {
    for _ in 0..2000 {
        if done(&mem.stats()) {
            return;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{what} within 10 s: {:?}", mem.stats());
}

#[test]
fn new_segments_are_preallocated_after_large_commits_and_zero_filled_after_small_ones() {
    run(|| async {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            segment_bytes: 2 << 20,
            commit_bytes_max: 512 << 10,
            ..small_opts(Durability::Dsync)
        };
        assert_eq!(opts.segment_prep, SegmentPrep::Auto, "the default");
        let shard = open_mem(&mem, opts.clone()).await;
        // Small commits through the first segment: the file after it is zero-filled too.
        append_n(&shard, 0, 2100, 1000).await;
        await_stats(&mem, "a third segment file", |s| s.segment_creates >= 3).await;
        assert_eq!(mem.stats().allocates, 0, "small commits: zero-filled");
        // 300 KiB commits through a whole segment: the next file is preallocated.
        let big: Vec<Vec<u8>> = (2100..2116).map(|i| payload(i, 300 << 10)).collect();
        for (i, p) in big.iter().enumerate() {
            let r = shard.append(1, &[rec(p)], AckLevel::Durable).await.expect("append");
            assert_eq!(r.first_lsn, Lsn(2101 + i as u64));
        }
        await_stats(&mem, "a preallocated segment file", |s| s.allocates == 1).await;
        let allocated = mem.stats().bytes_allocated;
        assert!(allocated > 0, "{:?}", mem.stats());
        // Small commits again, through the preallocated file and beyond: zero-filled again.
        let creates = mem.stats().segment_creates;
        append_n(&shard, 2116, 6000, 1000).await;
        await_stats(&mem, "two more segment files", |s| s.segment_creates >= creates + 2).await;
        assert_eq!(mem.stats().allocates, 1, "small commits again: zero-filled");
        // Everything reads back, after a clean close and after a power loss, whichever way the
        // file holding it was made ready.
        let expect = |r: &shards::ReadRecord| {
            let i = r.lsn.0 - 1;
            let len = if (2100..2116).contains(&i) { 300 << 10 } else { 1000 };
            assert_eq!(r.payload, payload(i, len), "lsn {}", r.lsn);
        };
        let records = read_all(&shard, Lsn(1)).await;
        assert_eq!(records.len(), 8116);
        records.iter().for_each(expect);
        shard.close().await.unwrap();
        for seed in 0..4 {
            let after = mem.crash(seed);
            let recovered = open_mem(&after, opts.clone()).await;
            assert_eq!(recovered.durable_lsn(), Lsn(8116), "seed {seed}");
            let records = read_all(&recovered, Lsn(1)).await;
            assert_eq!(records.len(), 8116, "seed {seed}");
            records.iter().for_each(expect);
            recovered.close().await.unwrap();
        }
    });
}

#[test]
fn segment_prep_can_be_fixed_either_way() {
    run(|| async {
        for (prep, preallocated) in [(SegmentPrep::ZeroFill, false), (SegmentPrep::Preallocate, true)] {
            let mem = MemStorage::new();
            let opts = ShardOptions {
                segment_bytes: 2 << 20,
                commit_bytes_max: 512 << 10,
                segment_prep: prep,
                ..small_opts(Durability::Linked)
            };
            let shard = open_mem(&mem, opts.clone()).await;
            let big: Vec<Vec<u8>> = (0..16).map(|i| payload(i, 300 << 10)).collect();
            for p in &big {
                shard.append(1, &[rec(p)], AckLevel::Durable).await.expect("append");
            }
            await_stats(&mem, "four segment files", |s| s.segment_creates >= 4).await;
            let stats = mem.stats();
            assert_eq!(stats.allocates > 0, preallocated, "{prep:?}: {stats:?}");
            if preallocated {
                assert_eq!(
                    stats.allocates, stats.segment_creates,
                    "{prep:?}: every file: {stats:?}"
                );
            }
            shard.close().await.unwrap();
            let shard = open_mem(&mem, opts).await;
            let records = read_all(&shard, Lsn(1)).await;
            assert_eq!(records.len(), 16, "{prep:?}");
            for r in &records {
                assert_eq!(r.payload, payload(r.lsn.0 - 1, 300 << 10), "{prep:?}");
            }
            shard.close().await.unwrap();
        }
    });
}
