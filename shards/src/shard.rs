//! The shard: append queue, group-commit pipeline, acknowledgements and reads.
//!
//! One committer task per shard takes everything queued (bounded by `commit_bytes_max` and the
//! end of the segment), frames it as one commit in one aligned buffer and hands it to the storage
//! seam. While commit k syncs, commit k+1 is built, and its write is submitted once k's write has
//! completed. So at most one write is in flight (two writes never touch the same block at once,
//! which matters because a commit that ends mid-block leaves that block to be rewritten by the
//! next commit) and at most [`PIPELINE_DEPTH`] commits are between submission and durability.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::path::Path;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::error::ShardError;
use crate::format::{
    self, align_down, align_up, CommitView, ParseError, SegmentHeader, BLOCK_BYTES, COMMIT_HEADER_BYTES,
    RECORD_HEADER_BYTES, SEGMENT_DATA_OFFSET,
};
use crate::read_pool::{ReadMemory, READ_BATCH_OVERHEAD_BYTES, READ_RECORD_OVERHEAD_BYTES};
use crate::recovery::RecoveryReport;
use crate::segments::{Segment, Segments, Spare, INDEX_INTERVAL_BYTES};
use crate::storage::dma::DmaStorage;
use crate::storage::{IoBuf, SegmentFile, Storage};
use crate::sync::{LsnWaiters, Notify};
use crate::{AckLevel, Lsn, ReadBatch, ReadRecord, Receipt, RecordRef, ShardOptions};

/// At most this many commits are between submission and durability: commit k syncing while commit
/// k+1 is written. Recovery relies on it: a power loss can leave at most this many commits at the
/// end of the log damaged or out of order, so more valid commits behind a bad one mean corruption.
pub(crate) const PIPELINE_DEPTH: usize = 2;
/// A read fetches at most this much per I/O, unless one commit is larger.
const READ_CHUNK_BYTES: u64 = 256 << 10;
/// A filtered read stops after scanning this many times `max_bytes` (at least 1 MiB) of log, and
/// returns what it has, so a read for a rare stream cannot run unbounded.
const READ_SCAN_FACTOR: usize = 8;
/// How much one disk read fetches for a read that still wants `remaining` payload bytes: those
/// and their framing, rounded up to blocks plus one block for a commit that starts mid-block,
/// and at most [`READ_CHUNK_BYTES`]. A filtered read scans far ahead for its stream and reads
/// whole chunks.
fn chunk_bytes(remaining: usize, filtered: bool) -> u64 {
    if filtered {
        return READ_CHUNK_BYTES;
    }
    let framing = (COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
    (align_up(remaining as u64 + framing) + BLOCK_BYTES).min(READ_CHUNK_BYTES)
}

enum SlotState {
    Queued,
    Written,
    Durable,
    Failed(ShardError),
    Taken,
}

/// Where the future of one append learns its outcome.
struct Slot {
    state: RefCell<SlotState>,
    waker: RefCell<Option<Waker>>,
}

impl Slot {
    fn set(&self, state: SlotState) {
        *self.state.borrow_mut() = state;
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

struct Pending {
    first_lsn: u64,
    count: u32,
    body: Vec<u8>,
    slot: Option<Rc<Slot>>,
}

struct InFlight {
    id: u64,
    seg: Rc<Segment>,
    end_lsn: u64,
    end_offset: u64,
    records: u64,
    bytes: u64,
    started: Instant,
    slots: Vec<Rc<Slot>>,
    result: Option<io::Result<()>>,
}

pub(crate) struct State {
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// The segments, the active one and the spare: changed only through `Segments`' methods.
    pub segs: Segments,
    inflight: VecDeque<InFlight>,
    write_in_flight: bool,
    next_commit_id: u64,
}

impl State {
    /// The segment state's invariants and the pipeline's: at most one write in flight, at most
    /// `PIPELINE_DEPTH` commits between submission and durability.
    fn assert_invariants(&self) {
        self.segs.assert_invariants();
        assert!(self.inflight.len() <= PIPELINE_DEPTH);
        assert!(!self.write_in_flight || !self.inflight.is_empty());
    }
}

struct Counters {
    appends: u64,
    records: u64,
    bytes: u64,
    commits: u64,
    records_per_commit: Histogram<u64>,
    bytes_per_commit: Histogram<u64>,
    fsync_latency_us: Histogram<u64>,
}

pub(crate) struct Inner {
    pub opts: ShardOptions,
    pub storage: Rc<dyn Storage>,
    pub st: RefCell<State>,
    next_lsn: Cell<u64>,
    durable_lsn: Cell<u64>,
    poisoned: RefCell<Option<String>>,
    closing: Cell<bool>,
    committer_done: Cell<bool>,
    pub bg_stop: Cell<bool>,
    pub committer_wake: Notify,
    pub bg_wake: Notify,
    /// Wakes the scrub from its pacing sleep when the shard closes.
    pub scrub_wake: Notify,
    /// Corruption findings, scrub progress and how the last open recovered.
    pub health: RefCell<Health>,
    durable_waiters: LsnWaiters,
    counters: RefCell<Counters>,
    tasks: RefCell<Vec<glommio::Task<()>>>,
}

/// What the scrub and recovery found, for `stats`.
pub(crate) struct Health {
    pub corrupt_segments: u64,
    pub last_corruption: Option<String>,
    pub scrub_bytes: u64,
    pub scrub_passes: u64,
    pub recovery: RecoveryReport,
}

/// Statistics of one shard.
#[derive(Debug, Clone)]
pub struct ShardStats {
    pub appends: u64,
    pub records: u64,
    /// Payload bytes appended.
    pub bytes: u64,
    pub commits: u64,
    pub records_per_commit: Histogram<u64>,
    pub bytes_per_commit: Histogram<u64>,
    /// From submitting a commit to it being durable.
    pub fsync_latency_us: Histogram<u64>,
    /// Appends queued and not yet handed to the device.
    pub queue_depth: usize,
    pub durable_lsn: Lsn,
    pub segment_count: usize,
    /// Bytes of all segment files, including the prepared spare.
    pub segment_bytes: u64,
    pub poisoned: Option<String>,
    /// Sealed segments found corrupt since the shard opened: by the scrub (a commit that fails
    /// its checksum, or a body that disagrees with its summary) or by recovery (a summary that
    /// disagrees with the log). Reads of a corrupt range fail with `Corruption`.
    pub corrupt_segments: u64,
    /// The latest of those findings.
    pub last_corruption: Option<String>,
    /// Bytes of sealed segments the scrub has read and verified.
    pub scrub_bytes: u64,
    /// Complete scrub passes over every sealed segment.
    pub scrub_passes: u64,
    /// How the last open recovered the log.
    pub recovery: RecoveryReport,
}

/// One shard of the log. Cloning gives another handle to the same shard; it is `!Send` and lives
/// on the executor that opened it.
#[derive(Clone)]
pub struct Shard {
    inner: Rc<Inner>,
}

enum Step {
    Again,
    Wait,
    Exit,
}

impl Shard {
    /// Opens (creating if needed) the shard in `dir` on real files, recovering it first.
    ///
    /// Must be called on a glommio executor; the shard's directory sentinel is opened before any
    /// segment (see [`crate::storage::dma::SENTINEL_FILE`]).
    pub async fn open(dir: impl AsRef<Path>, opts: ShardOptions) -> Result<Shard, ShardError> {
        let dir = dir.as_ref();
        let storage = DmaStorage::open(dir, opts.durability)
            .await
            .map_err(|e| ShardError::io("open shard directory", dir, e))?;
        Shard::open_with_storage(Rc::new(storage), opts).await
    }

    /// Opens the shard on any storage, e.g. [`crate::storage::mem::MemStorage`].
    pub async fn open_with_storage(storage: Rc<dyn Storage>, opts: ShardOptions) -> Result<Shard, ShardError> {
        opts.validate()?;
        let rec = crate::recovery::recover(&*storage, &opts).await?;
        let durable = rec.next_lsn - 1;
        let hist = || Histogram::<u64>::new(3).expect("3 significant figures is valid");
        let inner = Rc::new(Inner {
            storage,
            st: RefCell::new(State {
                pending: VecDeque::new(),
                pending_bytes: 0,
                segs: rec.segs,
                inflight: VecDeque::new(),
                write_in_flight: false,
                next_commit_id: 0,
            }),
            next_lsn: Cell::new(rec.next_lsn),
            durable_lsn: Cell::new(durable),
            poisoned: RefCell::new(None),
            closing: Cell::new(false),
            committer_done: Cell::new(false),
            bg_stop: Cell::new(false),
            committer_wake: Notify::default(),
            bg_wake: Notify::default(),
            scrub_wake: Notify::default(),
            health: RefCell::new(Health {
                corrupt_segments: rec.findings.len() as u64,
                last_corruption: rec.findings.last().cloned(),
                scrub_bytes: 0,
                scrub_passes: 0,
                recovery: rec.report,
            }),
            durable_waiters: LsnWaiters::default(),
            counters: RefCell::new(Counters {
                appends: 0,
                records: 0,
                bytes: 0,
                commits: 0,
                records_per_commit: hist(),
                bytes_per_commit: hist(),
                fsync_latency_us: hist(),
            }),
            tasks: RefCell::new(Vec::new()),
            opts,
        });
        let committer = glommio::spawn_local(committer(inner.clone()));
        // The background task runs in the executor's low-priority queue: it gets a small share of
        // the CPU while appenders keep the committer's queue busy, and the queue's latency
        // requirement (`BACKGROUND_PREEMPT_TIMER`) bounds how long one of its slices can delay a
        // commit.
        let spawn_err = |e: glommio::GlommioError<()>| {
            ShardError::io("spawn the background task", "", io::Error::other(e.to_string()))
        };
        let background = glommio::spawn_local_into(crate::background::background(inner.clone()), background_queue())
            .map_err(spawn_err)?;
        // The scrub is a task of its own in the same queue, so that its pacing sleeps never delay
        // preparing the next segment.
        let scrub = glommio::spawn_local_into(crate::background::scrub(inner.clone()), background_queue())
            .map_err(spawn_err)?;
        inner.tasks.borrow_mut().extend([committer, background, scrub]);
        Ok(Shard { inner })
    }

    /// Appends `records` to `stream` as one atomic unit with consecutive lsns.
    ///
    /// The records are validated, given their lsns and copied into the queue before this returns,
    /// so appends called in order get increasing lsns in that order however their futures are
    /// polled. The future resolves at the requested `ack` level; errors known at call time
    /// (poisoned, closed, too large, no space, busy) come out of it even with `AckLevel::None`.
    pub fn append(
        &self,
        stream: u64,
        records: &[RecordRef<'_>],
        ack: AckLevel,
    ) -> impl Future<Output = Result<Receipt, ShardError>> + 'static {
        let queued = self.enqueue(stream, records, ack);
        async move { queued?.await }
    }

    /// [`Shard::append`] without the `async` wrapper: the append is enqueued (or refused) now and
    /// the returned [`Ticket`] resolves at the requested `ack` level. A ticket is a plain,
    /// nameable future, so one task can hold many of them (e.g. in a queue polled in lsn order)
    /// instead of spawning a task per append.
    pub fn enqueue(&self, stream: u64, records: &[RecordRef<'_>], ack: AckLevel) -> Result<Ticket, ShardError> {
        let (receipt, slot) = self.inner.enqueue(stream, records, ack)?;
        Ok(Ticket { receipt, slot, ack })
    }

    /// Reads durable records from `from` on, across segments, optionally only of `stream`, up to
    /// about `max_bytes` of payload (at least one record if a durable record `>= from` exists and
    /// no stream filter skips it).
    pub async fn read(&self, from: Lsn, max_bytes: usize, stream: Option<u64>) -> Result<ReadBatch, ShardError> {
        self.inner
            .read(from, max_bytes, stream, &mut ReadMemory::unbounded())
            .await
    }

    /// [`Shard::read`], charging what it allocates to `memory`, which must hold nothing yet,
    /// before allocating it (see
    /// [`crate::read_pool`]): each chunk it reads from disk, and the records it collects. When it
    /// returns, `memory` holds the batch's charge ([`READ_BATCH_OVERHEAD_BYTES`], and per record
    /// [`READ_RECORD_OVERHEAD_BYTES`] plus the payload), which also covers the batch's encoded
    /// response. A read that finds no room for its next chunk while it already holds records
    /// returns those (fewer than `max_bytes`); one that holds none waits for room, holding nothing.
    pub async fn read_in(
        &self,
        from: Lsn,
        max_bytes: usize,
        stream: Option<u64>,
        memory: &mut ReadMemory,
    ) -> Result<ReadBatch, ShardError> {
        self.inner.read(from, max_bytes, stream, memory).await
    }

    /// Resolves once every record up to `lsn` is durable, with the durable lsn at that time.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<Lsn, ShardError> {
        let inner = &self.inner;
        let mut key = None;
        let result = poll_fn(|cx| {
            let durable = inner.durable_lsn.get();
            if durable >= lsn.0 {
                return Poll::Ready(Ok(Lsn(durable)));
            }
            if let Some(cause) = inner.poisoned.borrow().clone() {
                return Poll::Ready(Err(ShardError::Poisoned { cause }));
            }
            if inner.committer_done.get() {
                return Poll::Ready(Err(ShardError::Closed));
            }
            inner.durable_waiters.register(lsn.0, &mut key, cx.waker());
            Poll::Pending
        })
        .await;
        if let Some(k) = key {
            inner.durable_waiters.unregister(k);
        }
        result
    }

    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.inner.durable_lsn.get())
    }

    /// The lsn the next appended record will get.
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.inner.next_lsn.get())
    }

    /// The oldest lsn still retained.
    pub fn first_available_lsn(&self) -> Lsn {
        Lsn(self.inner.st.borrow().segs.first_available())
    }

    pub fn stats(&self) -> ShardStats {
        let st = self.inner.st.borrow();
        let c = self.inner.counters.borrow();
        let health = self.inner.health.borrow();
        let spare_bytes = match st.segs.spare() {
            Spare::Ready { capacity, .. } => *capacity,
            _ => 0,
        };
        ShardStats {
            appends: c.appends,
            records: c.records,
            bytes: c.bytes,
            commits: c.commits,
            records_per_commit: c.records_per_commit.clone(),
            bytes_per_commit: c.bytes_per_commit.clone(),
            fsync_latency_us: c.fsync_latency_us.clone(),
            queue_depth: st.pending.len(),
            durable_lsn: Lsn(self.inner.durable_lsn.get()),
            segment_count: st.segs.len(),
            segment_bytes: st.segs.file_bytes() + spare_bytes,
            poisoned: self.inner.poisoned.borrow().clone(),
            corrupt_segments: health.corrupt_segments,
            last_corruption: health.last_corruption.clone(),
            scrub_bytes: health.scrub_bytes,
            scrub_passes: health.scrub_passes,
            recovery: health.recovery.clone(),
        }
    }

    /// Commits everything queued, waits until it is durable, stops the background task and closes
    /// the files. Other handles of the shard see `Closed` afterwards.
    pub async fn close(self) -> Result<(), ShardError> {
        let inner = self.inner;
        inner.closing.set(true);
        inner.committer_wake.notify();
        let mut tasks = std::mem::take(&mut *inner.tasks.borrow_mut()).into_iter();
        // The committer first: committing what is queued may need the next segment, which the
        // background task prepares, so it stops only after the committer has finished.
        if let Some(committer) = tasks.next() {
            committer.await;
        }
        inner.bg_stop.set(true);
        inner.bg_wake.notify();
        inner.scrub_wake.notify();
        for task in tasks {
            task.await;
        }
        inner.durable_waiters.wake_all();
        // Everything is durable and nothing more will be written: record where the active
        // segment ends, so the next open need not scan it.
        if inner.poisoned.borrow().is_none() {
            crate::background::write_checkpoint(&inner).await?;
        }
        let files: Vec<Rc<dyn SegmentFile>> = {
            let mut st = inner.st.borrow_mut();
            let mut files: Vec<_> = st.segs.iter().map(|s| s.file.clone()).collect();
            if let Spare::Ready { file, .. } = st.segs.take_spare() {
                files.push(file);
            }
            files
        };
        for file in files {
            file.close().await.map_err(|e| ShardError::io("close segment", "", e))?;
        }
        if let Some(cause) = inner.poisoned.borrow().clone() {
            return Err(ShardError::Poisoned { cause });
        }
        Ok(())
    }
}

/// Shares of the background task queue, against glommio's default queue's 1000.
const BACKGROUND_SHARES: usize = 50;

thread_local! {
    /// The low-priority queue of the executor on this thread, created by the first shard opened
    /// on it and shared by every shard it runs: (executor id, queue).
    static BACKGROUND_QUEUE: Cell<Option<(usize, glommio::TaskQueueHandle)>> = const { Cell::new(None) };
}

/// The current executor's queue for background work: small static shares, preempted every
/// [`crate::BACKGROUND_PREEMPT_TIMER`].
fn background_queue() -> glommio::TaskQueueHandle {
    let executor = glommio::executor().id();
    BACKGROUND_QUEUE.with(|q| match q.get() {
        Some((id, tq)) if id == executor => tq,
        _ => {
            let tq = glommio::executor().create_task_queue(
                glommio::Shares::Static(BACKGROUND_SHARES),
                glommio::Latency::Matters(crate::BACKGROUND_PREEMPT_TIMER),
                "shard-background",
            );
            q.set(Some((executor, tq)));
            tq
        }
    })
}

/// An enqueued append: resolves with its [`Receipt`] once the records reach the requested
/// [`AckLevel`], or with the error that prevented it (see [`Shard::append`]).
///
/// Tickets of one shard and one ack level resolve in lsn order: commits complete in order, and a
/// failure fails every later append too. So a holder of many tickets only needs to poll the
/// oldest one; it learns about the others when that one is ready.
#[must_use = "a ticket does nothing unless polled; dropping it only gives up the answer"]
pub struct Ticket {
    receipt: Receipt,
    slot: Option<Rc<Slot>>,
    ack: AckLevel,
}

impl Ticket {
    /// The lsns the append was given.
    pub fn receipt(&self) -> Receipt {
        self.receipt
    }
}

impl Future for Ticket {
    type Output = Result<Receipt, ShardError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let Some(slot) = &self.slot else {
            return Poll::Ready(Ok(self.receipt));
        };
        let mut state = slot.state.borrow_mut();
        match &*state {
            SlotState::Durable => Poll::Ready(Ok(self.receipt)),
            SlotState::Written if self.ack == AckLevel::Written => Poll::Ready(Ok(self.receipt)),
            SlotState::Failed(_) => match std::mem::replace(&mut *state, SlotState::Taken) {
                SlotState::Failed(e) => Poll::Ready(Err(e)),
                _ => unreachable!("matched Failed above"),
            },
            SlotState::Taken => Poll::Ready(Err(ShardError::Closed)),
            SlotState::Queued | SlotState::Written => {
                let mut waker = slot.waker.borrow_mut();
                match &*waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

/// The committer task: builds and submits commits until the shard closes.
async fn committer(inner: Rc<Inner>) {
    loop {
        match inner.commit_step() {
            Step::Again => {}
            Step::Wait => inner.committer_wake.wait().await,
            Step::Exit => break,
        }
    }
    inner.committer_done.set(true);
    inner.durable_waiters.wake_all();
}

impl Inner {
    pub(crate) fn poisoned_cause(&self) -> Option<String> {
        self.poisoned.borrow().clone()
    }

    fn poisoned_error(&self) -> Option<ShardError> {
        self.poisoned
            .borrow()
            .clone()
            .map(|cause| ShardError::Poisoned { cause })
    }

    fn enqueue(
        &self,
        stream: u64,
        records: &[RecordRef<'_>],
        ack: AckLevel,
    ) -> Result<(Receipt, Option<Rc<Slot>>), ShardError> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        if self.closing.get() {
            return Err(ShardError::Closed);
        }
        if records.is_empty() {
            return Err(ShardError::Empty);
        }
        let body_bytes: usize = records.iter().map(|r| format::record_bytes(r.payload.len())).sum();
        let commit_bytes = COMMIT_HEADER_BYTES + body_bytes;
        if commit_bytes > self.opts.commit_bytes_max {
            return Err(ShardError::TooLarge {
                bytes: commit_bytes,
                max: self.opts.commit_bytes_max,
            });
        }
        // Bounded by commit_bytes_max, which fits in 32 bits (checked by validate).
        let count = records.len() as u32;
        let mut st = self.st.borrow_mut();
        if st.pending_bytes + body_bytes > self.opts.queue_bytes_max {
            return Err(ShardError::Busy {
                queued_bytes: st.pending_bytes,
                max: self.opts.queue_bytes_max,
            });
        }
        if let Spare::Failed { no_space: true, .. } = st.segs.spare() {
            let fits = st.segs.active.as_ref().is_some_and(|a| {
                a.offset + (st.pending_bytes + COMMIT_HEADER_BYTES + body_bytes) as u64 <= a.seg.capacity
            });
            if !fits {
                self.bg_wake.notify();
                return Err(ShardError::NoSpace);
            }
        }
        let mut body = Vec::with_capacity(body_bytes);
        for r in records {
            format::encode_record(&mut body, stream, r.timestamp, r.payload);
        }
        assert_eq!(body.len(), body_bytes);
        let first_lsn = self.next_lsn.get();
        self.next_lsn.set(first_lsn + u64::from(count));
        let slot = (ack != AckLevel::None).then(|| {
            Rc::new(Slot {
                state: RefCell::new(SlotState::Queued),
                waker: RefCell::new(None),
            })
        });
        st.pending_bytes += body_bytes;
        st.pending.push_back(Pending {
            first_lsn,
            count,
            body,
            slot: slot.clone(),
        });
        drop(st);
        {
            let mut c = self.counters.borrow_mut();
            c.appends += 1;
            c.records += u64::from(count);
            c.bytes += records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        }
        self.committer_wake.notify();
        Ok((
            Receipt {
                first_lsn: Lsn(first_lsn),
                count,
            },
            slot,
        ))
    }

    /// Fails every queued append with `error()` and gives their lsns back: none of them has been
    /// handed to the device, and lsns must stay contiguous on disk.
    fn fail_pending(&self, st: &mut State, error: impl Fn() -> ShardError) {
        if let Some(front) = st.pending.front() {
            self.next_lsn.set(front.first_lsn);
        }
        for p in st.pending.drain(..) {
            if let Some(slot) = p.slot {
                slot.set(SlotState::Failed(error()));
            }
        }
        st.pending_bytes = 0;
    }

    /// One step of the committer, without awaiting: submit a commit, rotate, or say why not.
    fn commit_step(self: &Rc<Self>) -> Step {
        let mut st = self.st.borrow_mut();
        if let Some(cause) = self.poisoned.borrow().clone() {
            self.fail_pending(&mut st, || ShardError::Poisoned { cause: cause.clone() });
            return if self.closing.get() { Step::Exit } else { Step::Wait };
        }
        if st.pending.is_empty() {
            let idle = st.inflight.is_empty() && !st.write_in_flight;
            return if self.closing.get() && idle {
                Step::Exit
            } else {
                Step::Wait
            };
        }
        if st.write_in_flight || st.inflight.len() >= PIPELINE_DEPTH {
            return Step::Wait;
        }
        let first_bytes = (COMMIT_HEADER_BYTES + st.pending[0].body.len()) as u64;
        let fits = st
            .segs
            .active
            .as_ref()
            .is_some_and(|a| a.offset + first_bytes <= a.seg.capacity);
        if !fits {
            // Everything in the old segment must be durable before the new one gets data, so
            // recovery never sees a damaged commit followed by a later segment.
            if !st.inflight.is_empty() {
                return Step::Wait;
            }
            // [segments] the spare goes through the segment state's owner.
            return match st.segs.take_spare() {
                Spare::Ready { name, file, capacity } => {
                    self.activate(&mut st, name, file, capacity);
                    Step::Again
                }
                Spare::Preparing => {
                    self.bg_wake.notify();
                    Step::Wait
                }
                Spare::Failed { no_space, cause } => {
                    let op_cause = cause.clone();
                    self.fail_pending(&mut st, || {
                        if no_space {
                            ShardError::NoSpace
                        } else {
                            ShardError::io("prepare segment", "", io::Error::other(op_cause.clone()))
                        }
                    });
                    st.segs.install_spare(Spare::Failed { no_space, cause });
                    self.bg_wake.notify();
                    Step::Again
                }
            };
        }
        self.submit(st);
        Step::Again
    }

    /// [segments] Seals the active segment and activates the spare; the transition itself is
    /// `Segments::activate`.
    fn activate(&self, st: &mut State, name: String, file: Rc<dyn SegmentFile>, capacity: u64) {
        let base_lsn = st.pending[0].first_lsn;
        st.segs.activate(base_lsn, name, file, capacity);
        st.assert_invariants();
        // The background task renames the file, writes the sealed segment's summary and
        // prepares the next spare.
        self.bg_wake.notify();
    }

    /// Builds one commit from the front of the queue and submits it.
    fn submit(self: &Rc<Self>, mut guard: std::cell::RefMut<'_, State>) {
        let st = &mut *guard;
        let active = st.segs.active.as_mut().expect("checked by commit_step");
        let room = active.seg.capacity - active.offset;
        let limit = (self.opts.commit_bytes_max as u64).min(room) as usize;
        let mut take = 0;
        let mut body_bytes = 0;
        for p in &st.pending {
            if COMMIT_HEADER_BYTES + body_bytes + p.body.len() > limit {
                break;
            }
            take += 1;
            body_bytes += p.body.len();
        }
        assert!(take > 0, "the first append fits: checked by commit_step");
        let write_start = if active.header_pending {
            0
        } else {
            align_down(active.offset)
        };
        let prefix = (active.offset - write_start) as usize;
        let commit_bytes = COMMIT_HEADER_BYTES + body_bytes;
        let buf_len = align_up((prefix + commit_bytes) as u64) as usize;
        let mut buf: IoBuf = self.storage.alloc(buf_len);
        let b = buf.as_mut_slice();
        if active.header_pending {
            assert_eq!(active.offset, SEGMENT_DATA_OFFSET);
            assert!(active.tail.is_empty());
            SegmentHeader {
                shard_id: self.opts.shard_id,
                sequence: active.seg.sequence,
                base_lsn: active.seg.base_lsn,
            }
            .encode(&mut b[..BLOCK_BYTES as usize]);
        } else {
            assert_eq!(active.tail.len(), prefix);
            b[..prefix].copy_from_slice(&active.tail);
        }
        let first_lsn = st.pending[0].first_lsn;
        let mut count: u32 = 0;
        let mut at = prefix + COMMIT_HEADER_BYTES;
        let mut slots = Vec::with_capacity(take);
        for _ in 0..take {
            let p = st.pending.pop_front().expect("take <= len");
            assert_eq!(p.first_lsn, first_lsn + u64::from(count), "lsns are contiguous");
            b[at..at + p.body.len()].copy_from_slice(&p.body);
            at += p.body.len();
            count += p.count;
            st.pending_bytes -= p.body.len();
            slots.extend(p.slot);
        }
        format::seal_commit(&mut b[prefix..], active.seg.sequence, first_lsn, count, body_bytes);
        // Padding must be zero: recovery reads zeros after the last commit as the end of the log.
        assert!(b[prefix + commit_bytes..].iter().all(|&x| x == 0));
        let commit_offset = active.offset;
        let end_offset = commit_offset + commit_bytes as u64;
        let tail_from = (align_down(end_offset) - write_start) as usize;
        let tail_to = (end_offset - write_start) as usize;
        active.tail = b[tail_from..tail_to].to_vec();
        active.offset = end_offset;
        active.header_pending = false;
        // [segments] The sparse index and the checksum chain the segment's summary carries.
        active
            .seg
            .note_commit(first_lsn, commit_offset, &b[prefix..prefix + COMMIT_HEADER_BYTES]);
        let seg = active.seg.clone();
        let id = st.next_commit_id;
        st.next_commit_id += 1;
        st.inflight.push_back(InFlight {
            id,
            seg: seg.clone(),
            end_lsn: first_lsn + u64::from(count),
            end_offset,
            records: u64::from(count),
            bytes: commit_bytes as u64,
            started: Instant::now(),
            slots,
            result: None,
        });
        st.write_in_flight = true;
        // glommio runs a spawned task right away, and the storage may call back into the shard
        // from it: no borrow may be held past this point.
        drop(guard);
        let on_written = {
            let inner = self.clone();
            Box::new(move || inner.on_written(id))
        };
        let io = seg.file.commit(write_start, buf, on_written);
        let inner = self.clone();
        glommio::spawn_local(async move {
            let result = io.await;
            inner.on_commit_done(id, result);
        })
        .detach();
    }

    fn on_written(&self, id: u64) {
        let mut st = self.st.borrow_mut();
        st.write_in_flight = false;
        if let Some(f) = st.inflight.iter().find(|f| f.id == id) {
            for slot in &f.slots {
                let queued = matches!(*slot.state.borrow(), SlotState::Queued);
                if queued {
                    slot.set(SlotState::Written);
                }
            }
        }
        drop(st);
        self.committer_wake.notify();
    }

    fn on_commit_done(&self, id: u64, result: io::Result<()>) {
        let mut failure = None;
        {
            let mut st = self.st.borrow_mut();
            let Some(f) = st.inflight.iter_mut().find(|f| f.id == id) else {
                return;
            };
            if let Err(e) = &result {
                failure = Some(format!(
                    "commit to segment {} ending at offset {}: {e}",
                    f.seg.sequence, f.end_offset
                ));
                // The write may have failed before completing; nothing is in flight any more.
                st.write_in_flight = false;
            }
            let f = st.inflight.iter_mut().find(|f| f.id == id).expect("found above");
            f.result = Some(result);
        }
        if let Some(cause) = failure {
            self.poison(cause);
            return;
        }
        if self.poisoned.borrow().is_some() {
            return;
        }
        let mut st = self.st.borrow_mut();
        let mut c = self.counters.borrow_mut();
        while st.inflight.front().is_some_and(|f| matches!(f.result, Some(Ok(())))) {
            let f = st.inflight.pop_front().expect("front exists");
            assert!(f.end_lsn - 1 > self.durable_lsn.get(), "durability advances");
            self.durable_lsn.set(f.end_lsn - 1);
            f.seg.durable_end.set((f.end_lsn, f.end_offset));
            c.commits += 1;
            let _ = c.records_per_commit.record(f.records);
            let _ = c.bytes_per_commit.record(f.bytes);
            let _ = c.fsync_latency_us.record(f.started.elapsed().as_micros() as u64);
            for slot in f.slots {
                slot.set(SlotState::Durable);
            }
        }
        drop(c);
        drop(st);
        self.durable_waiters.wake_upto(self.durable_lsn.get());
        self.committer_wake.notify();
    }

    /// After a failed write or fdatasync nothing more may be acknowledged: the kernel may have
    /// dropped the dirty pages and a later fdatasync would report success for lost data.
    pub(crate) fn poison(&self, cause: String) {
        tracing::error!(shard = self.opts.shard_id, %cause, "shard poisoned");
        {
            let mut p = self.poisoned.borrow_mut();
            if p.is_none() {
                *p = Some(cause);
            }
        }
        let cause = self.poisoned.borrow().clone().expect("set above");
        let mut st = self.st.borrow_mut();
        self.fail_pending(&mut st, || ShardError::Poisoned { cause: cause.clone() });
        for f in &st.inflight {
            for slot in &f.slots {
                slot.set(SlotState::Failed(ShardError::Poisoned { cause: cause.clone() }));
            }
        }
        drop(st);
        self.durable_waiters.wake_all();
        self.committer_wake.notify();
        self.bg_wake.notify();
    }

    async fn read(
        &self,
        from: Lsn,
        max_bytes: usize,
        stream: Option<u64>,
        memory: &mut ReadMemory,
    ) -> Result<ReadBatch, ShardError> {
        assert_eq!(memory.held(), 0, "a read starts holding nothing");
        // Even an empty batch has a response; a read that holds nothing may wait for room.
        memory.acquire(READ_BATCH_OVERHEAD_BYTES).await;
        let requested = from.0.max(1);
        let (segments, first_available) = {
            let st = self.st.borrow();
            let segs: Vec<Rc<Segment>> = st.segs.iter().cloned().collect();
            (segs, st.segs.first_available())
        };
        let truncated = || ShardError::Truncated {
            requested: Lsn(requested),
            first_available: Lsn(self.st.borrow().segs.first_available()),
        };
        if requested < first_available {
            return Err(truncated());
        }
        // One past the last durable lsn: nothing at or after it is served.
        let durable_end = self.durable_lsn.get() + 1;
        let mut batch = ReadBatch {
            records: Vec::new(),
            next_lsn: Lsn(requested),
        };
        if requested >= durable_end {
            return Ok(batch);
        }
        let scan_max = max_bytes.max(1 << 20).saturating_mul(READ_SCAN_FACTOR);
        let mut cursor = requested;
        let mut bytes = 0usize;
        let mut scanned = 0usize;
        // What the batch costs so far (see `read_pool`): `memory` holds this plus the chunk being
        // parsed.
        let mut held = READ_BATCH_OVERHEAD_BYTES;
        let start = segments.iter().rposition(|s| s.base_lsn <= cursor).unwrap_or(0);
        'segments: for seg in &segments[start..] {
            let (seg_end_lsn, seg_end_offset) = seg.durable_end.get();
            let limit_lsn = seg_end_lsn.min(durable_end);
            if cursor >= limit_lsn {
                continue;
            }
            let (mut offset, skip) = {
                let index = seg.index.borrow();
                let i = index.partition_point(|&(lsn, _)| lsn <= cursor);
                let (lsn, offset) = if i == 0 {
                    (seg.base_lsn, SEGMENT_DATA_OFFSET)
                } else {
                    index[i - 1]
                };
                // Commits between the index entry and `cursor` are read and skipped.
                (offset, if lsn < cursor { INDEX_INTERVAL_BYTES } else { 0 })
            };
            let mut want = skip + chunk_bytes(max_bytes, stream.is_some());
            while offset < seg_end_offset {
                let read_from = align_down(offset);
                let read_to = align_up((offset + want).min(seg_end_offset));
                // The storage seam holds the chunk twice while it copies it out of the DMA buffer.
                let need = held + 2 * (read_to - read_from) as usize;
                if !memory.try_grow_to(need) {
                    if !batch.records.is_empty() {
                        break 'segments;
                    }
                    memory.shrink_to(0);
                    memory.acquire(need).await;
                }
                let data = match seg.file.read(read_from, (read_to - read_from) as usize).await {
                    Ok(d) => d,
                    Err(_) if seg.retired.get() => return Err(truncated()),
                    Err(e) => {
                        return Err(ShardError::io(
                            "read segment",
                            self.storage.path_of(&seg.name.borrow()),
                            e,
                        ))
                    }
                };
                let avail = ((read_from + data.len() as u64).min(seg_end_offset) - read_from) as usize;
                let mut pos = (offset - read_from) as usize;
                // A commit longer than what was read: the next read takes all of it.
                let mut short = 0;
                while offset < seg_end_offset {
                    let view: CommitView<'_> = match format::parse_commit(&data[pos..avail], seg.sequence) {
                        Ok(v) => v,
                        Err(ParseError::Short { needed }) if offset + needed as u64 <= seg_end_offset => {
                            short = needed as u64 + BLOCK_BYTES;
                            break;
                        }
                        Err(e) => {
                            if seg.retired.get() {
                                return Err(truncated());
                            }
                            return Err(ShardError::Corruption {
                                shard: self.opts.shard_id,
                                segment: seg.sequence,
                                offset,
                                reason: format!("reading durable data: {e:?}"),
                            });
                        }
                    };
                    scanned += view.total_bytes;
                    for (i, record) in view.records().enumerate() {
                        let lsn = view.first_lsn + i as u64;
                        if lsn < cursor {
                            continue;
                        }
                        if lsn >= limit_lsn {
                            break 'segments;
                        }
                        let record = record.expect("framing validated by parse_commit");
                        if stream.is_none_or(|s| s == record.stream) {
                            if !batch.records.is_empty() && bytes + record.payload.len() > max_bytes {
                                break 'segments;
                            }
                            bytes += record.payload.len();
                            held += READ_RECORD_OVERHEAD_BYTES + record.payload.len();
                            batch.records.push(ReadRecord {
                                lsn: Lsn(lsn),
                                stream: record.stream,
                                timestamp: record.timestamp,
                                payload: record.payload.to_vec(),
                            });
                        }
                        cursor = lsn + 1;
                    }
                    offset += view.total_bytes as u64;
                    pos += view.total_bytes;
                    if bytes >= max_bytes || scanned >= scan_max {
                        break 'segments;
                    }
                }
                drop(data);
                memory.shrink_to(held);
                want = chunk_bytes(max_bytes.saturating_sub(bytes), stream.is_some()).max(short);
            }
        }
        memory.shrink_to(held);
        batch.next_lsn = Lsn(cursor);
        Ok(batch)
    }
}
