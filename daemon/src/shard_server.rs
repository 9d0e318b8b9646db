//! The shard side of the rings: turns requests into calls on the executor's one [`Shard`] and
//! sends each completion back to the front that owns the connection.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use flatbuffers::FlatBufferBuilder;
use futures_lite::future;
use proto::wire::{self, ErrorCode};
use shards::{AckLevel, Lsn, ReadBatch, Receipt, RecordRef, Shard, ShardError, ShardStats};

use crate::front::Front;
use crate::ring::{FromShard, ReadArgs, Reply, ToShard};

/// How often a long-polling read looks at the shutdown flag while it waits.
const LONG_POLL_SLICE: Duration = Duration::from_millis(50);
/// Stretches a filtered read scans before it answers with an empty batch and a later `next_lsn`.
const FILTERED_SCANS_MAX: u32 = 64;

/// Where completions go: through a ring to another executor, or straight to a front on this one.
#[derive(Clone)]
pub enum ReplyTo {
    Ring(Rc<glommio::channels::shared_channel::ConnectedSender<FromShard>>),
    Local(Rc<Front>),
}

impl ReplyTo {
    pub async fn send(&self, msg: FromShard) {
        match self {
            // Err means the front has gone, which happens only once no connection of it is
            // waiting for a reply.
            ReplyTo::Ring(tx) => {
                let _ = tx.send(msg).await;
            }
            ReplyTo::Local(front) => front.deliver(msg),
        }
    }
}

pub struct ShardServer {
    pub id: u16,
    pub shard_count: u16,
    shard: Shard,
    /// Set when the daemon shuts down: long polls then answer with what they have.
    stopping: Cell<bool>,
    fbb: RefCell<FlatBufferBuilder<'static>>,
}

impl ShardServer {
    pub fn new(id: u16, shard_count: u16, shard: Shard) -> Rc<ShardServer> {
        assert!(id < shard_count);
        Rc::new(ShardServer {
            id,
            shard_count,
            shard,
            stopping: Cell::new(false),
            fbb: RefCell::new(FlatBufferBuilder::with_capacity(64 << 10)),
        })
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    pub fn begin_stop(&self) {
        self.stopping.set(true);
    }

    /// Handles one request. An append is enqueued on the shard before this returns, so requests
    /// handled in ring order get lsns in ring order: the order one connection sent them.
    pub fn handle(self: &Rc<Self>, msg: ToShard, reply_to: ReplyTo) {
        match msg {
            ToShard::Append {
                conn,
                id,
                reserved,
                frame,
            } => {
                let (silent, pending) = self.enqueue_append(&frame);
                drop(frame);
                let shard = self.id;
                glommio::spawn_local(async move {
                    let reply = match pending.await {
                        Ok(_) if silent => Reply::Silent,
                        Ok(receipt) => Reply::Appended {
                            shard,
                            first_lsn: receipt.first_lsn.0,
                            count: receipt.count,
                        },
                        Err(e) => error_reply(&e),
                    };
                    reply_to
                        .send(FromShard::Reply {
                            conn,
                            id,
                            reserved,
                            reply,
                        })
                        .await;
                })
                .detach();
            }
            ToShard::Read {
                conn,
                id,
                reserved,
                read,
            } => {
                let this = self.clone();
                glommio::spawn_local(async move {
                    let reply = match this.read(read).await {
                        Ok(batch) => Reply::Frame(this.encode_records(id, &batch)),
                        Err(e) => error_reply(&e),
                    };
                    reply_to
                        .send(FromShard::Reply {
                            conn,
                            id,
                            reserved,
                            reply,
                        })
                        .await;
                })
                .detach();
            }
            ToShard::Stats { token } => {
                let stats = Box::new(wire_stats(self.id, &self.shard.stats()));
                glommio::spawn_local(async move { reply_to.send(FromShard::Stats { token, stats }).await }).detach();
            }
        }
    }

    /// Reads the records out of the verified frame and enqueues them. Returns whether a success
    /// gets no response (`AckLevel::None`) and the future of the receipt.
    fn enqueue_append(&self, frame: &[u8]) -> (bool, impl Future<Output = Result<Receipt, ShardError>> + 'static) {
        // SAFETY: the front ran `proto::codec::view_request` over exactly these bytes, which
        // verified the whole buffer and found an `Append` body, and the Vec has not been changed
        // since: it moved through the ring untouched.
        let request = unsafe { flatbuffers::root_unchecked::<wire::Request>(frame) };
        let append = request
            .body_as_append()
            .expect("the front routes only verified appends");
        let stream = append.stream();
        assert_eq!(
            proto::shard_for(stream, self.shard_count),
            self.id,
            "stream {stream} routed to the wrong shard"
        );
        let records: Vec<RecordRef<'_>> = append
            .records()
            .expect("verification requires records")
            .iter()
            .map(|r| RecordRef {
                payload: r.payload().map(|p| p.bytes()).unwrap_or(&[]),
                timestamp: r.has_timestamp().then(|| r.timestamp()),
            })
            .collect();
        let (silent, ack) = match append.ack() {
            // `AckLevel::None` still waits for the write inside the daemon: the connection keeps
            // its budget reserved until then, so a client that never waits for answers is held
            // to the disk's pace instead of filling the shard's queue. Only the reply is skipped.
            wire::AckLevel::None => (true, AckLevel::Written),
            wire::AckLevel::Written => (false, AckLevel::Written),
            _ => (false, AckLevel::Durable),
        };
        (silent, self.shard.append(stream, &records, ack))
    }

    /// Reads durable records; with `max_wait_ms`, waits for one to become durable.
    async fn read(&self, args: ReadArgs) -> Result<ReadBatch, ShardError> {
        let deadline = Instant::now() + Duration::from_millis(u64::from(args.max_wait_ms));
        let mut from = Lsn(args.from_lsn.max(1));
        let mut scans = 0;
        loop {
            let batch = self.shard.read(from, args.max_bytes, args.stream).await?;
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
            if !batch.records.is_empty() || now >= deadline || self.stopping.get() {
                return Ok(batch);
            }
            // Nothing durable at or after `from` (or nothing of the wanted stream): wait for the
            // durable lsn to pass what was just scanned, in slices so shutdown is noticed.
            from = from.max(batch.next_lsn);
            let slice = (deadline - now).min(LONG_POLL_SLICE);
            let woke = future::or(
                async {
                    self.shard.wait_durable(from).await.map(|_| ())?;
                    Ok::<bool, ShardError>(true)
                },
                async {
                    glommio::timer::sleep(slice).await;
                    Ok(false)
                },
            )
            .await?;
            if !woke && Instant::now() >= deadline {
                return self.shard.read(from, args.max_bytes, args.stream).await;
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
    }
}
