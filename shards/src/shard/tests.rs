//! Tests of the batch machinery that need the shard's internals.

use super::*;
use crate::storage::mem::MemStorage;

fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    crate::executor::run(crate::executor::ExecutorOptions::new("shard-unit-test"), f).expect("executor ran");
}

fn opts() -> ShardOptions {
    ShardOptions {
        segment_bytes: 64 << 10,
        commit_bytes_max: 16 << 10,
        ..ShardOptions::default()
    }
}

fn record(payload: &[u8]) -> [RecordRef<'_>; 1] {
    [RecordRef {
        payload,
        timestamp: Some(payload.len() as u64),
    }]
}

/// A batch staged for another start in the block than its commit gets (what a rotation the batch
/// did not foresee would do) is moved once when sealed, and its records read back intact, also
/// after recovery.
#[test]
fn a_batch_staged_for_another_start_is_moved_when_sealed() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
            .await
            .expect("open");
        shard
            .append(1, &record(b"first"), AckLevel::Durable)
            .await
            .expect("first");
        let ticket = shard
            .enqueue(2, &record(b"second, staged at the wrong place"), AckLevel::Durable)
            .expect("enqueue");
        {
            // The committer has not run yet (this task has not yielded): restage the batch as if it
            // had been opened expecting its commit 100 bytes further on.
            let mut st = shard.inner.st.borrow_mut();
            let batch = st.pending.back_mut().expect("queued");
            let from = batch.body_at();
            batch.at = batch.at.after(100);
            let to = batch.body_at();
            assert_ne!(from, to);
            let body = batch.body_bytes;
            batch.buf.as_mut_slice().copy_within(from..from + body, to);
        }
        let receipt = ticket.await.expect("durable");
        assert_eq!(receipt.first_lsn, Lsn(2));
        assert_eq!(shard.stats().commits_moved, 1);
        let third = shard
            .append(3, &record(b"third"), AckLevel::Durable)
            .await
            .expect("third");
        assert_eq!(third.first_lsn, Lsn(3));
        assert_eq!(
            shard.stats().commits_moved,
            1,
            "the next batch is staged in place again"
        );
        let expect = [
            (1, &b"first"[..]),
            (2, b"second, staged at the wrong place"),
            (3, b"third"),
        ];
        let check = |batch: ReadBatch| {
            assert_eq!(batch.records.len(), expect.len());
            for (r, (stream, payload)) in batch.records.iter().zip(expect) {
                assert_eq!((r.stream, &r.payload[..]), (stream, payload));
                assert_eq!(r.timestamp, Some(payload.len() as u64));
            }
        };
        check(shard.read(Lsn(1), 1 << 20, None).await.expect("read"));
        shard.close().await.expect("close");
        let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
            .await
            .expect("reopen");
        check(shard.read(Lsn(1), 1 << 20, None).await.expect("read after recovery"));
        shard.close().await.expect("close");
    });
}

/// Appends that do not fit the rest of the segment go into a batch staged for the next segment's
/// first commit (behind its header block), so a rotation costs no second copy either.
#[test]
fn batches_are_staged_for_the_segment_they_land_in() {
    run(|| async {
        let mem = MemStorage::new();
        let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
            .await
            .expect("open");
        let payload = vec![0x42u8; 3000];
        // All enqueued before the committer runs: batches are predicted across several segments.
        let tickets: Vec<Ticket> = (0..100)
            .map(|i| shard.enqueue(i, &record(&payload), AckLevel::Durable).expect("enqueue"))
            .collect();
        for (i, ticket) in tickets.into_iter().enumerate() {
            assert_eq!(ticket.await.expect("durable").first_lsn, Lsn(i as u64 + 1));
        }
        let stats = shard.stats();
        assert!(stats.segment_count >= 4, "rotated: {} segments", stats.segment_count);
        assert_eq!(stats.commits_moved, 0);
        let batch = shard.read(Lsn(1), 1 << 20, None).await.expect("read");
        assert_eq!(batch.records.len(), 100);
        assert!(batch.records.iter().all(|r| r.payload == payload));
        shard.close().await.expect("close");
    });
}
