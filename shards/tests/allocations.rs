//! Allocations on the append path, counted by a global allocator: an append allocates nothing of
//! its own (its records go straight into a pooled commit buffer, its ticket shares the batch's
//! slot), so what is left is a few allocations per commit, spread over the appends grouped into
//! it. Runs a real shard on files in both durability modes.
//!
//! Only the executor thread's allocations inside the measured window are counted (a
//! thread-local switch), so other tests of this binary running at the same time do not disturb
//! the counts.

mod common;
#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::time::{Duration, Instant};

use counting_alloc::Counts;
use shards::{AckLevel, Durability, RecordRef, Shard, ShardOptions, Ticket};

/// An allocation at least this large is "large": a commit buffer would be one.
const LARGE_BYTES: usize = 4096;

/// Counts this thread's allocations while `f` runs.
async fn count<F: std::future::Future<Output = ()>>(f: F) -> Counts {
    counting_alloc::start(LARGE_BYTES);
    f.await;
    counting_alloc::stop()
}

/// Large allocations allowed in a measured window: the shard's latency histograms grow when they
/// first see a larger value. A commit buffer allocated per commit would be one per commit.
const LARGE_MAX: u64 = 4;

const SEGMENT_BYTES: u64 = 16 << 20;
const PAYLOAD_BYTES: usize = 1024;
/// Appends enqueued before the oldest is awaited, as the daemon's acker holds the tickets of many
/// connections' appends. They make one commit, whose own allocations (a few tens, see
/// `a_lone_append_allocates_a_bounded_few`) are spread over them.
const BURST: usize = 256;
const ROUNDS: usize = 20;

fn opts(durability: Durability) -> ShardOptions {
    ShardOptions {
        segment_bytes: SEGMENT_BYTES,
        durability,
        ..ShardOptions::default()
    }
}

/// Waits until the background task has the next segment ready, so that no segment preparation
/// (large zero-fill writes, file names) runs inside a measured window.
async fn wait_for_spare(shard: &Shard) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while shard.stats().segment_bytes < 2 * SEGMENT_BYTES {
        assert!(
            Instant::now() < deadline,
            "the spare segment was not prepared within 60 s"
        );
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// `rounds` bursts of `BURST` one-record appends, each burst awaited in lsn order.
async fn bursts(shard: &Shard, tickets: &mut Vec<Ticket>, payload: &[u8], rounds: usize) {
    for round in 0..rounds {
        for i in 0..BURST {
            let record = [RecordRef {
                payload,
                timestamp: Some((round * BURST + i) as u64),
            }];
            tickets.push(shard.enqueue(7, &record, AckLevel::Durable).expect("enqueue"));
        }
        for ticket in tickets.drain(..) {
            ticket.await.expect("durable");
        }
    }
}

fn bursts_allocate_a_small_constant_per_append(durability: Durability) {
    common::run(move || async move {
        let dir = common::tempdir();
        let shard = Shard::open(dir.path(), opts(durability)).await.expect("open");
        let payload = vec![0x5au8; PAYLOAD_BYTES];
        let mut tickets = Vec::with_capacity(BURST);
        // Warm-up: the pool, the batch slots and every reused vector reach their working size.
        bursts(&shard, &mut tickets, &payload, 4).await;
        wait_for_spare(&shard).await;
        let before = shard.stats();
        let counts = count(bursts(&shard, &mut tickets, &payload, ROUNDS)).await;
        let after = shard.stats();
        let appends = (ROUNDS * BURST) as f64;
        let commits = after.commits - before.commits;
        let per_append = counts.allocations as f64 / appends;
        eprintln!(
            "{durability}: {appends} appends of {PAYLOAD_BYTES} B in {commits} commits: {counts:?}: \
             {per_append:.2} allocations per append, {:.1} per commit, {:.0} bytes per append",
            counts.allocations as f64 / commits.max(1) as f64,
            counts.bytes as f64 / appends,
        );
        assert_eq!(
            after.durable_lsn.0,
            shard.next_lsn().0 - 1,
            "everything acknowledged is durable"
        );
        assert_eq!(
            after.commits_moved, before.commits_moved,
            "every batch was built in place"
        );
        assert!(
            per_append <= 0.5,
            "{per_append:.2} allocations per append (at most 0.5 expected: nothing per append, \
             a few per commit)"
        );
        assert!(
            counts.large <= LARGE_MAX,
            "{} large allocations in {commits} commits",
            counts.large
        );
        shard.close().await.expect("close");
    });
}

#[test]
fn dsync_bursts_allocate_a_small_constant_per_append() {
    bursts_allocate_a_small_constant_per_append(Durability::Dsync);
}

#[test]
fn linked_bursts_allocate_a_small_constant_per_append() {
    bursts_allocate_a_small_constant_per_append(Durability::Linked);
}

/// One append at a time: every append is its own commit, so this pins the per-commit cost (the
/// buffer comes from the pool; what is left is futures, tasks and the executor's wake-ups).
#[test]
fn a_lone_append_allocates_a_bounded_few() {
    common::run(|| async {
        let dir = common::tempdir();
        let shard = Shard::open(dir.path(), opts(Durability::Dsync)).await.expect("open");
        let payload = vec![0x33u8; 100];
        let one = |i: u64| {
            [RecordRef {
                payload: &payload,
                timestamp: Some(i),
            }]
        };
        for i in 0..64 {
            shard.append(1, &one(i), AckLevel::Durable).await.expect("warm-up");
        }
        wait_for_spare(&shard).await;
        const N: u64 = 500;
        let counts = count(async {
            for i in 0..N {
                shard.append(1, &one(i), AckLevel::Durable).await.expect("append");
            }
        })
        .await;
        let per_append = counts.allocations as f64 / N as f64;
        eprintln!("c=1: {N} appends: {counts:?}: {per_append:.1} allocations per append");
        // Each commit allocates: its boxed storage future, its completion callback and the task
        // awaiting it (the engine's), and the rest in glommio's reactor and the commit ring's
        // reaper (timers, the eventfd read) as the executor parks and wakes for it.
        assert!(per_append <= 32.0, "{per_append:.1} allocations per lone append");
        assert!(
            counts.large <= LARGE_MAX,
            "{} large allocations in {N} commits",
            counts.large
        );
        shard.close().await.expect("close");
    });
}
