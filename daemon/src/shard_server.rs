//! The shard side of the rings: turns requests into calls on the executor's one [`Shard`] and
//! sends each completion back to the front that owns the connection.
//!
//! Appends do not get a task each. [`ShardServer::handle`] enqueues the records on the shard and
//! queues its [`Ticket`], oldest first, in one queue per ack level; one acker task polls only the
//! oldest ticket of each queue, since tickets of one ack level resolve in lsn order. When a
//! commit completes, the acker takes every ticket that is ready and sends the answers for each
//! front as one ring message, together with the request frames the shard has finished with.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use flatbuffers::FlatBufferBuilder;
use futures_lite::future;
use glommio::sync::Semaphore;
use proto::wire::{self, ErrorCode};
use shards::{AckLevel, Lsn, ReadBatch, ReadMemory, ReadPool, RecordRef, Shard, ShardError, ShardStats, Ticket};

use crate::ring::{Completion, ConnId, FromShard, FrontInbox, ReadArgs, Reply, RingSender, ToShard};

/// How often an append waiting for room in a half-full shard queue looks again: a 1 MiB commit
/// takes about a millisecond on NVMe, so this is well below a commit.
const QUEUE_ROOM_POLL: Duration = Duration::from_micros(200);
/// How often a long-polling read looks at the shutdown flag while it waits.
const LONG_POLL_SLICE: Duration = Duration::from_millis(50);
/// Stretches a filtered read scans before it answers with an empty batch and a later `next_lsn`.
const FILTERED_SCANS_MAX: u32 = 64;
/// Spent request frames kept for one front until they can go back with its next answers; beyond
/// this the shard frees them itself.
const SPENT_FRAMES_MAX: usize = 256;
/// Appends of at most this many records have their records' fields read out of the frame once
/// (see `enqueue_append`).
const RECORDS_READ_ONCE_MAX: usize = 8;

/// The reads of one connection running on this shard, so that the connection's end can stop
/// their long-polls ([`ToShard::Cancel`]).
struct ConnReads {
    running: Cell<usize>,
    has_ended: Cell<bool>,
    /// Never has permits: closed when the connection ends, which wakes every waiting read.
    ended: Semaphore,
}

impl ConnReads {
    fn end(&self) {
        self.has_ended.set(true);
        self.ended.close();
    }

    fn has_ended(&self) -> bool {
        self.has_ended.get()
    }

    async fn ended(&self) {
        // Err once closed; nothing ever signals a permit.
        let _ = self.ended.acquire(1).await;
    }
}

/// Where completions go: through a ring to another executor, or straight to a front on this one.
#[derive(Clone)]
pub enum ReplyTo {
    Ring(Rc<RingSender<FromShard>>),
    /// Weak: the front holds the shard server, and a reply for a front that is gone has nobody
    /// to go to.
    Local(Weak<dyn FrontInbox>),
}

impl ReplyTo {
    pub async fn send(&self, msg: FromShard) {
        match self {
            // Err means the front has gone, which happens only once no connection of it is
            // waiting for a reply.
            ReplyTo::Ring(tx) => {
                let _ = tx.send(msg).await;
            }
            ReplyTo::Local(front) => {
                if let Some(front) = front.upgrade() {
                    front.deliver(msg);
                }
            }
        }
    }
}

/// An append waiting for its ticket.
struct Waiting {
    front: usize,
    conn: u64,
    id: u64,
    reserved: usize,
    /// `AckLevel::None` on the wire: a success is not answered.
    silent: bool,
    ticket: Ticket,
}

/// Answers collected for one front, sent as one ring message.
#[derive(Default)]
struct Outbox {
    replies: Vec<Completion>,
    spent_frames: Vec<Vec<u8>>,
}

/// Index of the queue of appends acknowledged once durable.
const DURABLE: usize = 0;
/// Index of the queue of appends acknowledged once written (and of `AckLevel::None`).
const WRITTEN: usize = 1;

pub struct ShardServer {
    pub id: u16,
    pub shard_count: u16,
    shard: Shard,
    /// Set when the daemon shuts down: long polls then answer with what they have.
    stopping: Cell<bool>,
    fbb: RefCell<FlatBufferBuilder<'static>>,
    /// Where each front's answers go, by the index `add_front` gave it.
    fronts: RefCell<Vec<ReplyTo>>,
    /// Appends waiting for their ticket, oldest first: [`DURABLE`] and [`WRITTEN`].
    waiting: [RefCell<VecDeque<Waiting>>; 2],
    /// Per front: answers ready to go.
    outboxes: RefCell<Vec<Outbox>>,
    acker_waker: Cell<Option<Waker>>,
    /// No more requests will come: the acker exits once nothing is waiting.
    acker_stop: Cell<bool>,
    /// Bounds the memory all reads of this shard hold together, until their responses are handed
    /// to the front.
    read_pool: ReadPool,
    /// By (front index, connection): connections with reads running here.
    conn_reads: RefCell<HashMap<(usize, ConnId), Rc<ConnReads>>>,
}

impl ShardServer {
    /// `read_memory_bytes` bounds what the shard's reads hold together ([`ReadPool`]).
    pub fn new(id: u16, shard_count: u16, shard: Shard, read_memory_bytes: usize) -> Rc<ShardServer> {
        assert!(id < shard_count);
        Rc::new(ShardServer {
            id,
            shard_count,
            shard,
            stopping: Cell::new(false),
            fbb: RefCell::new(FlatBufferBuilder::with_capacity(64 << 10)),
            fronts: RefCell::new(Vec::new()),
            waiting: Default::default(),
            outboxes: RefCell::new(Vec::new()),
            acker_waker: Cell::new(None),
            acker_stop: Cell::new(false),
            read_pool: ReadPool::new(read_memory_bytes),
            conn_reads: RefCell::new(HashMap::new()),
        })
    }

    /// Registers a front's completion path; requests from it are handled with the returned index.
    pub fn add_front(&self, reply_to: ReplyTo) -> usize {
        let mut fronts = self.fronts.borrow_mut();
        fronts.push(reply_to);
        self.outboxes.borrow_mut().push(Outbox::default());
        fronts.len() - 1
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    pub fn read_pool(&self) -> &ReadPool {
        &self.read_pool
    }

    /// Waits while the shard's append queue is half full. The request paths (a ring's receiver,
    /// a shard-aware connection's reader) await this before handing the shard an append, so under
    /// overload appends wait in the ring or the socket and TCP pushes back on the clients, the way
    /// a durable ack already holds a connection's budget; the shard refuses with `Busy` only an
    /// append that would overflow a full queue. This matters for `AckLevel::None`, whose clients
    /// never wait for answers: without it, many of them together outrun the disk and most of what
    /// they send is refused. The queue drains on its own (commits, or failing them when poisoned
    /// or out of space), so the wait ends; it polls because the shard has no room waiters, and it
    /// only ever runs while the disk is the bottleneck.
    pub async fn wait_for_queue_room(&self) {
        while self.shard.queue_half_full() && !self.stopping.get() {
            glommio::timer::sleep(QUEUE_ROOM_POLL).await;
        }
    }

    pub fn begin_stop(&self) {
        self.stopping.set(true);
    }

    /// Handles one request of front `front` (an index from [`ShardServer::add_front`]). An
    /// append is enqueued on the shard before this returns, so requests handled in ring order get
    /// lsns in ring order: the order one connection sent them.
    pub fn handle(self: &Rc<Self>, msg: ToShard, front: usize) {
        match msg {
            ToShard::Append {
                conn,
                id,
                reserved,
                frame,
            } => {
                self.append(front, conn, id, reserved, &frame);
                self.spend_frame(front, frame);
            }
            ToShard::Read {
                conn,
                id,
                reserved,
                read,
            } => {
                let this = self.clone();
                let reply_to = self.fronts.borrow()[front].clone();
                // Registered before the task runs: a `Cancel` handled right after this message
                // must find it.
                let reads = self
                    .conn_reads
                    .borrow_mut()
                    .entry((front, conn))
                    .or_insert_with(|| {
                        Rc::new(ConnReads {
                            running: Cell::new(0),
                            has_ended: Cell::new(false),
                            ended: Semaphore::new(0),
                        })
                    })
                    .clone();
                reads.running.set(reads.running.get() + 1);
                glommio::spawn_local(async move {
                    let mut memory = this.read_pool.memory();
                    let reply = match this.read(read, &mut memory, &reads).await {
                        Ok(batch) => {
                            // The batch's charge covers its response (see `shards::read_pool`),
                            // so encoding it stays within what the read holds.
                            let frame = this.encode_records(id, &batch);
                            debug_assert!(frame.len() <= memory.held(), "a response outgrew its read's charge");
                            drop(batch);
                            // The read is done here. The response now counts against its
                            // connection's budget until it is written (see `front.rs`).
                            drop(memory);
                            Reply::Frame(frame)
                        }
                        Err(e) => error_reply(&e),
                    };
                    reads.running.set(reads.running.get() - 1);
                    if reads.running.get() == 0 {
                        this.conn_reads.borrow_mut().remove(&(front, conn));
                    }
                    let replies = vec![Completion {
                        conn,
                        id,
                        reserved,
                        reply,
                    }];
                    reply_to
                        .send(FromShard::Replies {
                            replies,
                            spent_frames: Vec::new(),
                        })
                        .await;
                })
                .detach();
            }
            ToShard::Cancel { conn } => {
                if let Some(reads) = self.conn_reads.borrow().get(&(front, conn)) {
                    reads.end();
                }
            }
            ToShard::Stats { token } => {
                let stats = Box::new(wire_stats(self.id, &self.shard.stats()));
                let reply_to = self.fronts.borrow()[front].clone();
                glommio::spawn_local(async move { reply_to.send(FromShard::Stats { token, stats }).await }).detach();
            }
        }
    }

    /// Enqueues one verified append request of front `front` (an index from
    /// [`ShardServer::add_front`]) and queues its ticket for the acker. `frame` is the request's
    /// payload, which [`proto::codec::view_request`] verified and found to be an `Append`: a
    /// frame that came through a ring, or, on a shard-aware connection, the front's receive
    /// buffer itself, so the records are copied once, straight from the socket's bytes into the
    /// commit buffer. The shard copies what it keeps before this returns.
    pub fn append(&self, front: usize, conn: ConnId, id: u64, reserved: usize, frame: &[u8]) {
        let (silent, ack, queued) = self.enqueue_append(frame);
        match queued {
            Ok(ticket) => {
                let queue = if ack == AckLevel::Durable { DURABLE } else { WRITTEN };
                let mut waiting = self.waiting[queue].borrow_mut();
                waiting.push_back(Waiting {
                    front,
                    conn,
                    id,
                    reserved,
                    silent,
                    ticket,
                });
                // The acker polls only the oldest ticket of each queue: a new oldest one
                // needs a poll to register.
                if waiting.len() == 1 {
                    drop(waiting);
                    self.wake_acker();
                }
            }
            Err(e) => {
                let reply = error_reply(&e);
                self.outboxes.borrow_mut()[front].replies.push(Completion {
                    conn,
                    id,
                    reserved,
                    reply,
                });
                self.wake_acker();
            }
        }
    }

    /// Keeps a request frame to return to its front with the next answers, so frames are freed
    /// (or reused) on the thread that allocated them.
    fn spend_frame(&self, front: usize, frame: Vec<u8>) {
        let mut outboxes = self.outboxes.borrow_mut();
        let spent = &mut outboxes[front].spent_frames;
        if spent.len() < SPENT_FRAMES_MAX {
            spent.push(frame);
        }
    }

    fn wake_acker(&self) {
        if let Some(w) = self.acker_waker.take() {
            w.wake();
        }
    }

    /// No more requests will arrive (every ring into the shard has ended); the acker finishes
    /// once every queued append is answered.
    pub fn stop_acker(&self) {
        self.acker_stop.set(true);
        self.wake_acker();
    }

    /// Closes the completion rings to fronts on other executors, once the acker has sent
    /// everything: each front's completion task then ends.
    pub fn close_replies(&self) {
        for reply_to in self.fronts.borrow().iter() {
            if let ReplyTo::Ring(tx) = reply_to {
                tx.close();
            }
        }
    }

    /// The acker task: answers appends as their tickets resolve, one ring message per front per
    /// round. Runs until [`ShardServer::stop_acker`] and everything is answered.
    pub async fn acker(self: Rc<Self>) {
        loop {
            let done = poll_fn(|cx| {
                let mut ready = false;
                for queue in &self.waiting {
                    let mut queue = queue.borrow_mut();
                    while let Some(head) = queue.front_mut() {
                        let Poll::Ready(result) = Pin::new(&mut head.ticket).poll(cx) else {
                            break;
                        };
                        let w = queue.pop_front().expect("front exists");
                        let reply = match result {
                            Ok(_) if w.silent => Reply::Silent,
                            Ok(receipt) => Reply::Appended {
                                shard: self.id,
                                first_lsn: receipt.first_lsn.0,
                                count: receipt.count,
                            },
                            Err(e) => error_reply(&e),
                        };
                        self.outboxes.borrow_mut()[w.front].replies.push(Completion {
                            conn: w.conn,
                            id: w.id,
                            reserved: w.reserved,
                            reply,
                        });
                        ready = true;
                    }
                }
                let pending_answers = self.outboxes.borrow().iter().any(|o| !o.replies.is_empty());
                if ready || pending_answers {
                    return Poll::Ready(false);
                }
                if self.acker_stop.get() && self.waiting.iter().all(|q| q.borrow().is_empty()) {
                    return Poll::Ready(true);
                }
                self.acker_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            if done {
                break;
            }
            self.flush_outboxes().await;
        }
        // Give back the frames still held.
        self.flush_outboxes().await;
    }

    async fn flush_outboxes(&self) {
        let fronts = self.fronts.borrow().len();
        for front in 0..fronts {
            let outbox = std::mem::take(&mut self.outboxes.borrow_mut()[front]);
            if outbox.replies.is_empty() && outbox.spent_frames.is_empty() {
                continue;
            }
            // Cloned (an `Rc`), not borrowed: the send may wait for room on the ring.
            let reply_to = self.fronts.borrow()[front].clone();
            reply_to
                .send(FromShard::Replies {
                    replies: outbox.replies,
                    spent_frames: outbox.spent_frames,
                })
                .await;
        }
    }

    /// Reads the records out of the verified frame and enqueues them. Returns whether a success
    /// gets no response (`AckLevel::None`), the level the shard acknowledges at, and the ticket.
    fn enqueue_append(&self, frame: &[u8]) -> (bool, AckLevel, Result<Ticket, ShardError>) {
        // SAFETY: the front ran `proto::codec::view_request` over exactly these bytes, which
        // verified the whole buffer and found an `Append` body, and they have not been changed
        // since: a frame moved through the ring untouched, and a receive buffer is not written
        // while the front's reader waits for its request to be handled (see `Front::dispatch`).
        let request = unsafe { flatbuffers::root_unchecked::<wire::Request>(frame) };
        let append = request
            .body_as_append()
            .expect("the front routes only verified appends");
        let stream = append.stream();
        // The front hashed the stream to pick this shard (its own on a shard-aware connection, or
        // this shard's ring), so hashing it again here would only check the front's routing: the
        // two hashes were 1.4 % of the daemon's CPU at 1 KiB c=256 P=16. Debug builds (and so the
        // tests) still check it.
        debug_assert_eq!(
            proto::shard_for(stream, self.shard_count),
            self.id,
            "stream {stream} routed to the wrong shard"
        );
        let records = append.records().expect("verification requires records");
        let (silent, ack) = match append.ack() {
            // `AckLevel::None` still waits for the write inside the daemon: the connection keeps
            // its budget reserved until then, so a client that never waits for answers is held
            // to the disk's pace instead of filling the shard's queue. Only the reply is skipped.
            wire::AckLevel::None => (true, AckLevel::Written),
            wire::AckLevel::Written => (false, AckLevel::Written),
            _ => (false, AckLevel::Durable),
        };
        // The shard walks the records twice (to size the append, then to copy each payload
        // once, into its commit buffer). A few records are read out of the frame once, onto
        // the stack; more are read straight out of the frame on each walk, so that no list of
        // them is allocated.
        let queued = if records.len() <= RECORDS_READ_ONCE_MAX {
            let mut read = [RecordRef {
                payload: &[],
                timestamp: None,
            }; RECORDS_READ_ONCE_MAX];
            for (slot, r) in read.iter_mut().zip(records.iter()) {
                let (payload, timestamp) = proto::codec::record_fields(&r);
                *slot = RecordRef { payload, timestamp };
            }
            self.shard
                .enqueue_iter(stream, read[..records.len()].iter().copied(), ack)
        } else {
            let records = records.iter().map(|r| {
                let (payload, timestamp) = proto::codec::record_fields(&r);
                RecordRef { payload, timestamp }
            });
            self.shard.enqueue_iter(stream, records, ack)
        };
        (silent, ack, queued)
    }

    /// Reads durable records; with `max_wait_ms`, waits for one to become durable, unless the
    /// connection ends first. What the read holds is charged to `memory`; while it waits it holds
    /// nothing.
    async fn read(&self, args: ReadArgs, memory: &mut ReadMemory, conn: &ConnReads) -> Result<ReadBatch, ShardError> {
        let deadline = Instant::now() + Duration::from_millis(u64::from(args.max_wait_ms));
        // One read's records, plus the largest commit read twice, must fit in the pool (its
        // minimum is sized for that), or the read could not get the room it needs.
        let args = ReadArgs {
            max_bytes: args.max_bytes.min(self.read_pool.capacity() / 4),
            ..args
        };
        let mut from = Lsn(args.from_lsn.max(1));
        let mut scans = 0;
        loop {
            // The previous round's batch is gone.
            memory.shrink_to(0);
            let batch = self.shard.read_in(from, args.max_bytes, args.stream, memory).await?;
            // With a stream filter one read scans a bounded stretch and may find nothing in it;
            // keep scanning durable records (a bounded number of times per request) before
            // answering empty or waiting.
            if batch.records.is_empty()
                && batch.next_lsn > from
                && batch.next_lsn <= self.shard.durable_lsn()
                && scans < FILTERED_SCANS_MAX
            {
                scans += 1;
                from = batch.next_lsn;
                continue;
            }
            let now = Instant::now();
            if !batch.records.is_empty() || now >= deadline || self.stopping.get() || conn.has_ended() {
                return Ok(batch);
            }
            // Nothing durable at or after `from` (or nothing of the wanted stream): wait for the
            // durable lsn to pass what was just scanned, in slices so shutdown is noticed, and
            // not a moment longer than the connection lasts.
            from = from.max(batch.next_lsn);
            drop(batch);
            // Nothing is held while waiting.
            memory.shrink_to(0);
            let slice = (deadline - now).min(LONG_POLL_SLICE);
            let woke = future::or(
                future::or(
                    async {
                        self.shard.wait_durable(from).await.map(|_| ())?;
                        Ok::<bool, ShardError>(true)
                    },
                    async {
                        conn.ended().await;
                        Ok(true)
                    },
                ),
                async {
                    glommio::timer::sleep(slice).await;
                    Ok(false)
                },
            )
            .await?;
            if conn.has_ended() || (!woke && Instant::now() >= deadline) {
                return self.shard.read_in(from, args.max_bytes, args.stream, memory).await;
            }
        }
    }

    /// Encodes a `Records` response frame.
    fn encode_records(&self, id: u64, batch: &ReadBatch) -> Vec<u8> {
        let mut fbb = self.fbb.borrow_mut();
        fbb.reset();
        let mut offsets = Vec::with_capacity(batch.records.len());
        for r in &batch.records {
            let payload = fbb.create_vector(&r.payload);
            offsets.push(wire::ReadRecord::create(
                &mut fbb,
                &wire::ReadRecordArgs {
                    lsn: r.lsn.0,
                    stream: r.stream,
                    payload: Some(payload),
                    timestamp: r.timestamp.unwrap_or(0),
                    has_timestamp: r.timestamp.is_some(),
                },
            ));
        }
        let records = fbb.create_vector(&offsets);
        let body = wire::Records::create(
            &mut fbb,
            &wire::RecordsArgs {
                shard: self.id,
                next_lsn: batch.next_lsn.0,
                records: Some(records),
            },
        );
        let root = wire::Response::create(
            &mut fbb,
            &wire::ResponseArgs {
                id,
                body_type: wire::ResponseBody::Records,
                body: Some(body.as_union_value()),
            },
        );
        fbb.finish(root, None);
        let mut out = Vec::new();
        proto::frame::encode_frame(fbb.finished_data(), &mut out);
        fbb.reset();
        // Keep a builder grown by one huge read from pinning its memory forever.
        if fbb.unfinished_data().len() > (4 << 20) {
            *fbb = FlatBufferBuilder::with_capacity(64 << 10);
        }
        out
    }
}

/// The wire error for a shard error.
pub fn error_reply(e: &ShardError) -> Reply {
    if let ShardError::Truncated { first_available, .. } = e {
        // The reader continues from here, so it travels as a field, not only in the message.
        return Reply::Truncated {
            first_available_lsn: first_available.0,
            message: e.to_string(),
        };
    }
    let code = match e {
        ShardError::Poisoned { .. } => ErrorCode::Poisoned,
        ShardError::NoSpace => ErrorCode::NoSpace,
        // A full device reported as a plain I/O error (e.g. while preparing a segment) is still
        // "no space" to the client: it is not sticky and the client may retry later.
        ShardError::Io { source, .. }
            if source.raw_os_error() == Some(libc::ENOSPC) || source.kind() == std::io::ErrorKind::StorageFull =>
        {
            ErrorCode::NoSpace
        }
        ShardError::Closed => ErrorCode::ShuttingDown,
        ShardError::TooLarge { .. } => ErrorCode::TooLarge,
        ShardError::Corruption { .. } => ErrorCode::Corruption,
        ShardError::Empty => ErrorCode::BadRequest,
        ShardError::Busy { .. } => ErrorCode::Busy,
        _ => ErrorCode::Internal,
    };
    Reply::Error {
        code,
        message: e.to_string(),
    }
}

fn percentiles(h: &hdrhistogram::Histogram<u64>) -> wire::PercentilesT {
    if h.is_empty() {
        return wire::PercentilesT::default();
    }
    wire::PercentilesT {
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

pub fn wire_stats(shard: u16, s: &ShardStats) -> wire::ShardStatsT {
    wire::ShardStatsT {
        shard,
        appends: s.appends,
        records: s.records,
        bytes: s.bytes,
        commits: s.commits,
        records_per_commit: Some(percentiles(&s.records_per_commit)),
        bytes_per_commit: Some(percentiles(&s.bytes_per_commit)),
        fsync_latency_us: Some(percentiles(&s.fsync_latency_us)),
        queue_depth: s.queue_depth as u64,
        durable_lsn: s.durable_lsn.0,
        segment_count: s.segment_count as u64,
        segment_bytes: s.segment_bytes,
        poisoned: s.poisoned.clone(),
        fsync_latency_us_buckets: Some(Box::new(buckets(&s.fsync_latency_us, FSYNC_LATENCY_US_BOUNDS))),
        records_per_commit_buckets: Some(Box::new(buckets(&s.records_per_commit, RECORDS_PER_COMMIT_BOUNDS))),
        corrupt_segments: s.corrupt_segments,
        last_corruption: s.last_corruption.clone(),
        scrub_bytes: s.scrub_bytes,
        scrub_passes: s.scrub_passes,
        recovery_trusted_segments: s.recovery.trusted,
        recovery_scanned_segments: s.recovery.scanned,
        recovery_us: s.recovery.elapsed_us,
        stream_index_bytes: s.stream_index_bytes,
        stream_tail_bytes: s.stream_tail_bytes,
        stream_runs_bytes_written: s.stream_runs_bytes_written,
        scrub_bad_stream_indexes: s.scrub_bad_stream_indexes,
    }
}

/// Upper bounds of the fsync latency buckets, microseconds: from well under an NVMe flush to a
/// stalled device.
const FSYNC_LATENCY_US_BOUNDS: &[u64] = &[
    50, 100, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];
/// Upper bounds of the records-per-commit buckets: how much group commit is batching.
const RECORDS_PER_COMMIT_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384];

/// A histogram as cumulative buckets. hdrhistogram keeps no exact sum, so the sum is the mean
/// times the count (exact to the histogram's precision).
fn buckets(h: &hdrhistogram::Histogram<u64>, bounds: &[u64]) -> wire::BucketsT {
    let count = h.len();
    let cumulative = bounds
        .iter()
        .map(|&le| if count == 0 { 0 } else { h.count_between(0, le) })
        .collect();
    wire::BucketsT {
        le: Some(bounds.to_vec()),
        cumulative: Some(cumulative),
        count,
        sum: (h.mean() * count as f64).round() as u64,
    }
}
