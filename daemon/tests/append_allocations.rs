//! Allocations on the daemon's append path on a shard executor, counted by a global allocator:
//! `ShardServer::handle` reads the records out of the verified request frame straight into the
//! shard's commit buffer, and the acker answers a batch of appends with one ring message. Unlike
//! the other tests of this crate it runs in process (a real shard on files, a real ring), since
//! the counting allocator has to be the daemon's own.
//!
//! Only the executor thread's allocations inside the measured window are counted.

#[path = "../../shards/tests/support/counting_alloc.rs"]
mod counting_alloc;

use std::rc::Rc;
use std::time::{Duration, Instant};

use daemon::ring::{self, FromShard, Reply, ToShard};
use daemon::shard_server::{ReplyTo, ShardServer};
use proto::codec::{AppendRecord, Encoder};
use proto::frame::FRAME_HEADER_BYTES;
use proto::wire::AckLevel;
use shards::{Shard, ShardOptions};

/// An allocation at least this large is "large": a commit buffer of these loads (a quarter to a
/// whole MiB) would be one; the acker's per-batch vectors of answers stay below it.
const LARGE_BYTES: usize = 128 << 10;
/// Large allocations allowed in a measured window (the shard's histograms are sized up front and no
/// segment rotates in one, so none are expected; a few are the acker's vectors growing once).
const LARGE_MAX: u64 = 4;

/// Large enough that no measured window rotates a segment (the measured appends total about
/// 23 MiB): preparing the next spare is background work, not a cost of the appends.
const SEGMENT_BYTES: u64 = 64 << 20;
const RECORD_BYTES: usize = 1024;

/// `count` verified append payloads of `records` records each (the frame without its length
/// header, as the front sends them), made before the measured window.
fn frames(first_id: u64, count: usize, records: usize) -> Vec<Vec<u8>> {
    let payload = vec![0xa5u8; RECORD_BYTES];
    let mut encoder = Encoder::new();
    (0..count)
        .map(|i| {
            let mut framed = Vec::new();
            let batch = (0..records).map(|_| AppendRecord::new(&payload));
            encoder.append(first_id + i as u64, 7, batch, AckLevel::Durable, &mut framed);
            let frame = framed.split_off(FRAME_HEADER_BYTES);
            proto::codec::view_request(&frame).expect("a valid append request");
            frame
        })
        .collect()
}

/// Hands `frames` to the shard server and waits for all their answers; returns the records
/// acknowledged.
async fn burst(
    server: &Rc<ShardServer>,
    front: usize,
    rx: &ring::RingReceiver<FromShard>,
    frames: Vec<Vec<u8>>,
) -> u64 {
    let expected = frames.len();
    for frame in frames {
        let id = proto::codec::view_request(&frame).expect("valid").id();
        server.handle(
            ToShard::Append {
                conn: 1,
                id,
                reserved: 0,
                frame,
            },
            front,
        );
    }
    let mut answered = 0;
    let mut records = 0;
    while answered < expected {
        let msg = rx.recv().await.expect("the shard server answers");
        let FromShard::Replies { replies, .. } = msg else {
            panic!("only appends were sent");
        };
        for completion in replies {
            match completion.reply {
                Reply::Appended { count, .. } => records += u64::from(count),
                _ => panic!("append {} failed", completion.id),
            }
            answered += 1;
        }
    }
    records
}

/// What the executor thread allocated over `rounds` bursts of `frames_per_burst` appends of
/// `records_per_frame` records each.
#[derive(Debug, Default)]
struct Counts {
    frames: u64,
    records: u64,
    allocations: u64,
    bytes: u64,
    large: u64,
}

struct Rig {
    server: Rc<ShardServer>,
    front: usize,
    rx: ring::RingReceiver<FromShard>,
    next_id: u64,
}

impl Rig {
    async fn measure(&mut self, rounds: usize, frames_per_burst: usize, records_per_frame: usize) -> Counts {
        let mut counts = Counts::default();
        for _ in 0..rounds {
            let batch = frames(self.next_id, frames_per_burst, records_per_frame);
            self.next_id += frames_per_burst as u64;
            counting_alloc::start(LARGE_BYTES);
            counts.records += burst(&self.server, self.front, &self.rx, batch).await;
            let window = counting_alloc::stop();
            counts.frames += frames_per_burst as u64;
            counts.allocations += window.allocations;
            counts.bytes += window.bytes;
            counts.large += window.large;
        }
        assert_eq!(counts.records, counts.frames * records_per_frame as u64);
        counts
    }
}

#[test]
fn shard_server_appends_allocate_a_small_constant() {
    let ex = shards::executor::spawn(shards::executor::ExecutorOptions::new("append-allocations"), || async {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let opts = ShardOptions {
            segment_bytes: SEGMENT_BYTES,
            ..ShardOptions::default()
        };
        let shard = Shard::open(dir.path(), opts).await.expect("open shard");
        let server = ShardServer::new(0, 1, shard.clone(), shards::READ_MEMORY_BYTES_DEFAULT);
        let (tx, rx) = ring::channel::<FromShard>(1024);
        let front = server.add_front(ReplyTo::Ring(Rc::new(tx)));
        let acker = glommio::spawn_local(server.clone().acker());
        let mut rig = Rig {
            server: server.clone(),
            front,
            rx,
            next_id: 1,
        };
        // Warm-up: pools, queues and outboxes reach their working size; the next segment is
        // prepared before counting, so no zero-fill runs in a measured window.
        rig.measure(2, 256, 1).await;
        rig.measure(2, 32, 64).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while shard.stats().segment_bytes < 2 * SEGMENT_BYTES {
            assert!(
                Instant::now() < deadline,
                "the spare segment was not prepared within 60 s"
            );
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }

        // Many one-record appends (c=256, 1 KiB): what an append costs of its own shows.
        let small = rig.measure(8, 256, 1).await;
        let per_frame = small.allocations as f64 / small.frames as f64;
        eprintln!("1 x 1 KiB per frame: {small:?}: {per_frame:.2} allocations per append");
        assert!(
            per_frame <= 1.0,
            "{per_frame:.2} allocations per one-record append (at most 1 expected: the append \
                 itself allocates nothing, its commit and the acker's batch a few)"
        );
        assert!(small.large <= LARGE_MAX, "{} large allocations", small.large);

        // 64 x 1 KiB per frame: the payload is copied into pooled buffers only.
        let big = rig.measure(8, 32, 64).await;
        let bytes_per_record = big.bytes as f64 / big.records as f64;
        eprintln!("64 x 1 KiB per frame: {big:?}: {bytes_per_record:.0} bytes allocated per record");
        assert!(
            bytes_per_record <= (RECORD_BYTES / 16) as f64,
            "{bytes_per_record:.0} bytes allocated per record of {RECORD_BYTES} bytes"
        );
        assert!(big.large <= LARGE_MAX, "{} large allocations", big.large);

        server.stop_acker();
        acker.await;
        shard.close().await.expect("close");
    })
    .expect("spawn executor");
    ex.join().expect("executor ran");
}
