//! The shard: append queue, group-commit pipeline, acknowledgements and reads.
//!
//! An append is serialised at call time straight into the commit buffer being built (a
//! [`Batch`]: a pooled, block-aligned buffer), at the place its body will have in the write, so
//! the payload is copied once on its way to the device. The committer task takes everything
//! queued (bounded by `commit_bytes_max` and the end of the segment: a batch is closed when the
//! next append would cross either), seals it as one commit (header, checksum, zeroed padding) and
//! hands the buffer to the storage seam, which returns it to the pool when the I/O is done. While
//! commit k syncs, commit k+1 is built, and its write is submitted once k's write has
//! completed. So at most one write is in flight (two writes never touch the same block at once,
//! which matters because a commit that ends mid-block leaves that block to be rewritten by the
//! next commit) and at most [`PIPELINE_DEPTH`] commits are between submission and durability.
//!
//! Every acknowledged append of a batch holds the batch's one [`BatchSlot`], so a commit's
//! completion answers all of them with one state change, and an append allocates nothing: the
//! buffer, the slot and every queue are reused.

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
use crate::read_pool::{ReadMemory, READ_BATCH_OVERHEAD_BYTES};
use crate::recovery::RecoveryReport;
use crate::segments::{Active, Segment, Segments, Spare, SummaryState, INDEX_INTERVAL_BYTES};
use crate::storage::dma::DmaStorage;
use crate::storage::{BufPool, IoBuf, PooledBuf, SegmentFile, Storage};
use crate::stream_index::{ReadProgress, SegmentRead};
use crate::stream_runs::{Group, RunsRead, RunsState, TailRead, TailState};
use crate::sync::{LsnWaiters, Notify};
use crate::{AckLevel, Lsn, ReadBatch, Receipt, RecordRef, ShardOptions, StreamRuns};

/// At most this many commits are between submission and durability: commit k syncing while commit
/// k+1 is written. Recovery relies on it: a power loss can leave at most this many commits at the
/// end of the log damaged or out of order, so more valid commits behind a bad one mean corruption.
pub(crate) const PIPELINE_DEPTH: usize = 2;
/// Batch slots kept for reuse (see [`BatchSlot`]); beyond this a batch gets a fresh one.
const SLOTS_POOLED_MAX: usize = 64;
/// The largest value the shard's histograms hold exactly (an hour in microseconds; more than any
/// record count or byte count of one commit); larger ones are recorded as this.
const HISTOGRAM_VALUE_MAX: u64 = 3_600_000_000;
/// A read fetches at most this much per I/O, unless one commit is larger.
pub(crate) const READ_CHUNK_BYTES: u64 = 256 << 10;
/// A filtered read stops after scanning this many times `max_bytes` (at least 1 MiB) of log, and
/// returns what it has, so a read for a rare stream cannot run unbounded. With a stream index
/// (`stream_index.rs`) only the commits holding the stream count: the ones in between are
/// skipped unread, and a read that finds none before the durable end returns an empty batch
/// whose `next_lsn` is that end.
const READ_SCAN_FACTOR: usize = 8;
/// How much one disk read fetches for a read that still wants `remaining` payload bytes: those
/// and their framing, rounded up to blocks plus one block for a commit that starts mid-block,
/// and at most [`READ_CHUNK_BYTES`]. A filtered read scans far ahead for its stream and reads
/// whole chunks.
pub(crate) fn chunk_bytes(remaining: usize, filtered: bool) -> u64 {
    if filtered {
        return READ_CHUNK_BYTES;
    }
    let framing = (COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
    (align_up(remaining as u64 + framing) + BLOCK_BYTES).min(READ_CHUNK_BYTES)
}

#[cfg(test)]
mod tests;

/// Why queued or submitted appends failed. Every ticket of a batch makes its own [`ShardError`]
/// from it.
#[derive(Debug, Clone)]
enum Failure {
    Poisoned {
        cause: String,
    },
    NoSpace,
    /// Preparing the next segment failed for another reason.
    Prepare {
        cause: String,
    },
}

impl Failure {
    fn error(&self) -> ShardError {
        match self {
            Failure::Poisoned { cause } => ShardError::Poisoned { cause: cause.clone() },
            Failure::NoSpace => ShardError::NoSpace,
            Failure::Prepare { cause } => ShardError::io("prepare segment", "", io::Error::other(cause.clone())),
        }
    }
}

enum SlotState {
    Queued,
    Written,
    Durable,
    Failed(Failure),
}

/// Where the tickets of one batch (one commit) learn their outcome. One slot is shared by every
/// acknowledged append of the batch, so one state change answers all of them; a slot no ticket
/// holds any more is reused for a later batch, so an append allocates none.
struct BatchSlot {
    state: RefCell<SlotState>,
    /// Tasks waiting on a ticket of this batch. A ticket remembers its entry as (epoch, index).
    wakers: RefCell<Vec<Waker>>,
    /// Bumped whenever `wakers` is emptied, so an entry remembered from before is not reused.
    epoch: Cell<u64>,
}

impl BatchSlot {
    fn new() -> BatchSlot {
        BatchSlot {
            state: RefCell::new(SlotState::Queued),
            wakers: RefCell::new(Vec::new()),
            epoch: Cell::new(0),
        }
    }

    fn set(&self, state: SlotState) {
        *self.state.borrow_mut() = state;
        self.epoch.set(self.epoch.get() + 1);
        // Woken outside the borrow; the emptied vector goes back so its capacity is kept.
        let mut wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers.drain(..) {
            waker.wake();
        }
        let mut current = self.wakers.borrow_mut();
        if current.is_empty() {
            *current = wakers;
        }
    }

    /// Makes the slot ready for a new batch. Only called when no ticket holds it: its remaining
    /// wakers belong to tickets that were dropped.
    fn reset(&self) {
        *self.state.borrow_mut() = SlotState::Queued;
        self.wakers.borrow_mut().clear();
        self.epoch.set(self.epoch.get() + 1);
    }

    /// Registers (or refreshes) the waker of the ticket whose entry is `entry`.
    fn register(&self, entry: &mut Option<(u64, usize)>, waker: &Waker) {
        let mut wakers = self.wakers.borrow_mut();
        let epoch = self.epoch.get();
        match *entry {
            Some((e, i)) if e == epoch => {
                if !wakers[i].will_wake(waker) {
                    wakers[i] = waker.clone();
                }
            }
            _ => {
                wakers.push(waker.clone());
                *entry = Some((epoch, wakers.len() - 1));
            }
        }
    }
}

/// A slot for a new batch: a pooled one that no ticket holds any more, else a fresh one.
fn take_slot(slots: &mut VecDeque<Rc<BatchSlot>>) -> Rc<BatchSlot> {
    for _ in 0..slots.len() {
        let slot = slots.pop_front().expect("within len");
        let free = Rc::strong_count(&slot) == 1;
        slots.push_back(slot);
        if free {
            let slot = slots.back().expect("just pushed");
            slot.reset();
            return slot.clone();
        }
    }
    let slot = Rc::new(BatchSlot::new());
    if slots.len() < SLOTS_POOLED_MAX {
        slots.push_back(slot.clone());
    }
    slot
}

/// Where a commit is expected to start. A batch serialises its appends at the place its body will
/// have in the write, which depends on where the commit starts in its block; when the prediction
/// misses (it can only after a rotation it did not foresee), sealing moves the body once.
#[derive(Debug, Clone, Copy)]
struct Placement {
    /// Segment offset of the commit.
    offset: u64,
    /// Size of that segment.
    capacity: u64,
    /// The segment's first commit: its write starts with the segment header block.
    first: bool,
}

impl Placement {
    fn new_segment(capacity: u64) -> Placement {
        Placement {
            offset: SEGMENT_DATA_OFFSET,
            capacity,
            first: true,
        }
    }

    fn of_active(a: &Active) -> Placement {
        Placement {
            offset: a.offset,
            capacity: a.seg.capacity,
            first: a.header_pending,
        }
    }

    /// Bytes of the write in front of the commit: the header block of a new segment, or the
    /// start of the block the commit begins in.
    fn prefix(&self) -> usize {
        if self.first {
            SEGMENT_DATA_OFFSET as usize
        } else {
            (self.offset - align_down(self.offset)) as usize
        }
    }

    fn fits(&self, commit_bytes: usize) -> bool {
        self.offset + commit_bytes as u64 <= self.capacity
    }

    /// Where the commit after one of `commit_bytes` starts.
    fn after(&self, commit_bytes: usize) -> Placement {
        Placement {
            offset: self.offset + commit_bytes as u64,
            capacity: self.capacity,
            first: false,
        }
    }
}

/// Appends serialised into one pooled buffer; the committer seals it as one commit.
///
/// The buffer is laid out as the write will be: `[0, prefix)` for the bytes in front of the
/// commit (filled when sealing), then the commit header (filled when sealing), then the body,
/// which appends extend. Only the queue's last batch takes new appends.
struct Batch {
    buf: PooledBuf,
    at: Placement,
    first_lsn: u64,
    records: u32,
    appends: usize,
    body_bytes: usize,
    /// [`format::body_crc_append`] over the first `crc_bytes` of the body.
    body_crc: u32,
    crc_bytes: usize,
    /// Shared by the batch's acknowledged appends; `None` while it has none.
    slot: Option<Rc<BatchSlot>>,
    /// [stream_index] The stream of each append, in order, with its records and bytes, appends
    /// of one stream side by side merged: what the stream index and the tail book when the batch
    /// is sealed, noted while the appends' bytes are in the cache rather than read back from the
    /// buffer then.
    streams: Vec<Group>,
}

impl Batch {
    fn commit_bytes(&self) -> usize {
        COMMIT_HEADER_BYTES + self.body_bytes
    }

    fn body_at(&self) -> usize {
        self.at.prefix() + COMMIT_HEADER_BYTES
    }

    /// Whether `body_bytes` more fit in this commit: within `commit_bytes_max` and within the
    /// segment the commit is expected to go to.
    fn takes(&self, body_bytes: usize, commit_bytes_max: usize) -> bool {
        let commit_bytes = self.commit_bytes() + body_bytes;
        commit_bytes <= commit_bytes_max && self.at.fits(commit_bytes)
    }
}

struct InFlight {
    id: u64,
    seg: Rc<Segment>,
    end_lsn: u64,
    end_offset: u64,
    records: u64,
    bytes: u64,
    started: Instant,
    slot: Option<Rc<BatchSlot>>,
    result: Option<io::Result<()>>,
}

pub(crate) struct State {
    /// Batches not yet handed to the device, oldest first; the last one takes new appends.
    pending: VecDeque<Batch>,
    /// Record bytes (commit bodies) in `pending`.
    pending_bytes: usize,
    /// Appends in `pending`.
    pending_appends: usize,
    /// Batch slots for reuse.
    slots: VecDeque<Rc<BatchSlot>>,
    /// [stream_index] Emptied `Batch::streams` lists for reuse (see [`STREAM_LISTS_KEPT`]).
    stream_lists: Vec<Vec<Group>>,
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
    commits_moved: u64,
    records_per_commit: Histogram<u64>,
    bytes_per_commit: Histogram<u64>,
    fsync_latency_us: Histogram<u64>,
}

pub(crate) struct Inner {
    pub opts: ShardOptions,
    pub storage: Rc<dyn Storage>,
    /// Commit buffers; bounded, so it also bounds what can be queued.
    pool: BufPool,
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
    /// Wakes the stream runs task ([`crate::stream_runs`]): a tail to walk, runs to make, or the
    /// shard closing.
    pub runs_wake: Notify,
    /// Corruption findings, scrub progress and how the last open recovered.
    pub health: RefCell<Health>,
    durable_waiters: LsnWaiters,
    counters: RefCell<Counters>,
    tasks: RefCell<Vec<glommio::Task<()>>>,
    /// The clock of [`Segment::streams_used`]: one tick per filtered read of a segment.
    pub index_clock: Cell<u64>,
}

/// What the scrub and recovery found, for `stats`.
pub(crate) struct Health {
    pub corrupt_segments: u64,
    pub last_corruption: Option<String>,
    pub scrub_bytes: u64,
    pub scrub_passes: u64,
    pub scrub_bad_stream_indexes: u64,
    pub recovery: RecoveryReport,
    /// Bytes of stream runs files written since the shard opened.
    pub runs_bytes_written: u64,
    /// Segments that filtered reads read through a stream run since the shard opened.
    pub runs_reads: u64,
    /// Segments that filtered reads read (in part) from a tail since the shard opened.
    pub tail_reads: u64,
}

/// Statistics of one shard.
#[derive(Debug, Clone)]
pub struct ShardStats {
    pub appends: u64,
    pub records: u64,
    /// Payload bytes appended.
    pub bytes: u64,
    pub commits: u64,
    /// Commits whose body was moved inside its buffer when sealed, because the batch expected
    /// another start in the block (a rotation it did not foresee): a second copy of their records.
    /// At most about one per segment.
    pub commits_moved: u64,
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
    /// Sealed segments' stream index files the scrub found missing or untrusted, and had rebuilt
    /// and written again. Not corruption of the log: filtered reads of the segment scan it
    /// meanwhile.
    pub scrub_bad_stream_indexes: u64,
    /// How the last open recovered the log.
    pub recovery: RecoveryReport,
    /// Heap bytes of the stream indexes of all segments (filtered reads read only the commits
    /// holding their stream), and of the loaded tables of their stream runs.
    pub stream_index_bytes: u64,
    /// Sealed segments whose stream runs the background task has yet to write (or whose summary,
    /// after which it writes them), and a segment recovered at open whose tail is not caught up.
    pub stream_runs_pending: u64,
    /// Bytes of stream runs files written since the shard opened: the records that were copied
    /// next to the rest of their stream, a second write of them.
    pub stream_runs_bytes_written: u64,
    /// Segments that filtered reads read through a stream run (not through the stream index)
    /// since the shard opened.
    pub stream_runs_reads: u64,
    /// Segments that filtered reads read (in part) from the in-memory runs of the segment being
    /// written (its tail) since the shard opened.
    pub stream_tail_reads: u64,
    /// Memory of those tails (at most `stream_tail_memory_bytes`).
    pub stream_tail_bytes: u64,
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
        let rec = crate::recovery::recover(&storage, &opts).await?;
        let durable = rec.next_lsn - 1;
        // Sized once for any value a commit can produce (counts, bytes, microseconds up to an
        // hour): an auto-resizing histogram reallocates its counts (hundreds of KiB) on the commit
        // path whenever a larger value than any before comes along.
        let hist = || Histogram::<u64>::new_with_bounds(1, HISTOGRAM_VALUE_MAX, 3).expect("valid bounds");
        let inner = Rc::new(Inner {
            storage,
            pool: commit_pool(&opts),
            st: RefCell::new(State {
                pending: VecDeque::new(),
                pending_bytes: 0,
                pending_appends: 0,
                slots: VecDeque::new(),
                stream_lists: Vec::new(),
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
            runs_wake: Notify::default(),
            health: RefCell::new(Health {
                corrupt_segments: rec.findings.len() as u64,
                last_corruption: rec.findings.last().cloned(),
                scrub_bytes: 0,
                scrub_passes: 0,
                scrub_bad_stream_indexes: 0,
                recovery: rec.report,
                runs_bytes_written: 0,
                runs_reads: 0,
                tail_reads: 0,
            }),
            durable_waiters: LsnWaiters::default(),
            counters: RefCell::new(Counters {
                appends: 0,
                records: 0,
                bytes: 0,
                commits: 0,
                commits_moved: 0,
                records_per_commit: hist(),
                bytes_per_commit: hist(),
                fsync_latency_us: hist(),
            }),
            tasks: RefCell::new(Vec::new()),
            index_clock: Cell::new(0),
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
        // A task of its own, so that its long walks never hold up the next segment's preparation.
        let runs = glommio::spawn_local_into(crate::stream_runs::stream_runs_task(inner.clone()), background_queue())
            .map_err(spawn_err)?;
        inner.tasks.borrow_mut().extend([committer, background, scrub, runs]);
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
        self.enqueue_iter(stream, records.iter().copied(), ack)
    }

    /// [`Shard::enqueue`] from any cloneable iterator of records, e.g. one that reads them
    /// straight out of a request frame: the records are serialised into the commit buffer as
    /// they are read, with no list of them built first. The iterator is walked twice (to size
    /// the append, then to copy it) and must yield the same records both times.
    pub fn enqueue_iter<'r, I>(&self, stream: u64, records: I, ack: AckLevel) -> Result<Ticket, ShardError>
    where
        I: IntoIterator<Item = RecordRef<'r>>,
        I::IntoIter: Clone,
    {
        let (receipt, slot) = self.inner.enqueue(stream, records.into_iter(), ack)?;
        Ok(Ticket {
            receipt,
            slot,
            ack,
            entry: None,
        })
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

    /// Whether the queue holds at least half of `queue_bytes_max`. A caller that can wait (the
    /// daemon's request path) waits while this holds, so appends queue up in its rings and TCP
    /// pushes back on clients; appends fail with `Busy` only when the queue is full, which then
    /// takes a caller that does not wait.
    pub fn queue_half_full(&self) -> bool {
        self.inner.st.borrow().pending_bytes >= self.inner.opts.queue_bytes_max / 2
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
            commits_moved: c.commits_moved,
            records_per_commit: c.records_per_commit.clone(),
            bytes_per_commit: c.bytes_per_commit.clone(),
            fsync_latency_us: c.fsync_latency_us.clone(),
            queue_depth: st.pending_appends,
            durable_lsn: Lsn(self.inner.durable_lsn.get()),
            segment_count: st.segs.len(),
            segment_bytes: st.segs.file_bytes() + spare_bytes,
            poisoned: self.inner.poisoned.borrow().clone(),
            corrupt_segments: health.corrupt_segments,
            last_corruption: health.last_corruption.clone(),
            scrub_bytes: health.scrub_bytes,
            scrub_passes: health.scrub_passes,
            scrub_bad_stream_indexes: health.scrub_bad_stream_indexes,
            recovery: health.recovery.clone(),
            stream_index_bytes: st.segs.stream_index_bytes(),
            stream_runs_pending: st
                .segs
                .iter()
                .filter(|s| {
                    // A segment just sealed gets its runs once its summary is durable.
                    let sealing =
                        s.summary.get() == SummaryState::Pending && self.inner.opts.stream_runs == StreamRuns::Auto;
                    let catching_up = s.tail_state.get() == TailState::CatchingUp;
                    s.runs_state.get() == RunsState::Pending || sealing || catching_up
                })
                .count() as u64,
            stream_runs_bytes_written: health.runs_bytes_written,
            stream_runs_reads: health.runs_reads,
            stream_tail_reads: health.tail_reads,
            stream_tail_bytes: st
                .segs
                .iter()
                .map(|s| s.tail.borrow().as_ref().map_or(0, |t| t.memory_bytes() as u64))
                .sum(),
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
        inner.runs_wake.notify();
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

/// The pool of commit buffers of a shard with `opts`. A buffer holds a whole write: up to a block
/// in front of the commit (the segment header block, or the start of the commit's first block),
/// then at most `commit_bytes_max`. Enough buffers for `queue_bytes_max` of full commits plus the
/// commits in flight and the one being filled; a queue of smaller batches (large appends that
/// leave a batch part empty) meets the bound earlier and gets `Busy` earlier.
fn commit_pool(opts: &ShardOptions) -> BufPool {
    let buffer_bytes = SEGMENT_DATA_OFFSET as usize + opts.commit_bytes_max;
    let buffers_max = opts.queue_bytes_max.div_ceil(opts.commit_bytes_max) + PIPELINE_DEPTH + 1;
    BufPool::new(buffer_bytes, buffers_max)
}

/// [stream_index] Emptied lists of a batch's streams kept for the next batches (a batch is
/// filling while one or two are sealed and written), and the longest one kept (32 KiB): a list
/// grown by a commit of many tiny appends of many streams goes back to the allocator.
const STREAM_LISTS_KEPT: usize = 4;
const STREAM_LIST_KEPT_MAX: usize = 4096;

/// Bytes of a batch's body checksummed together while appends arrive: well inside the L1 cache
/// with the payloads being copied, and large enough that the per-call cost does not show.
const CRC_CHUNK_BYTES: usize = 16 << 10;

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
    /// The batch's slot; `None` for `AckLevel::None`.
    slot: Option<Rc<BatchSlot>>,
    ack: AckLevel,
    /// This ticket's waker entry in the slot: (epoch, index).
    entry: Option<(u64, usize)>,
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
        let Ticket {
            receipt,
            slot,
            ack,
            entry,
        } = self.get_mut();
        let Some(slot) = slot else {
            return Poll::Ready(Ok(*receipt));
        };
        let state = slot.state.borrow();
        match &*state {
            SlotState::Durable => Poll::Ready(Ok(*receipt)),
            SlotState::Written if *ack == AckLevel::Written => Poll::Ready(Ok(*receipt)),
            SlotState::Failed(failure) => Poll::Ready(Err(failure.error())),
            SlotState::Queued | SlotState::Written => {
                drop(state);
                slot.register(entry, cx.waker());
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

    fn enqueue<'r>(
        &self,
        stream: u64,
        records: impl Iterator<Item = RecordRef<'r>> + Clone,
        ack: AckLevel,
    ) -> Result<(Receipt, Option<Rc<BatchSlot>>), ShardError> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        if self.closing.get() {
            return Err(ShardError::Closed);
        }
        let mut count = 0usize;
        let mut body_bytes = 0usize;
        let mut payload_bytes = 0u64;
        for r in records.clone() {
            count += 1;
            body_bytes = body_bytes.saturating_add(format::record_bytes(r.payload.len()));
            payload_bytes += r.payload.len() as u64;
        }
        if count == 0 {
            return Err(ShardError::Empty);
        }
        let commit_bytes = COMMIT_HEADER_BYTES.saturating_add(body_bytes);
        if commit_bytes > self.opts.commit_bytes_max {
            return Err(ShardError::TooLarge {
                bytes: commit_bytes,
                max: self.opts.commit_bytes_max,
            });
        }
        // Bounded by commit_bytes_max, which fits in 32 bits (checked by validate).
        let count = count as u32;
        let mut st = self.st.borrow_mut();
        let busy = |st: &State| ShardError::Busy {
            queued_bytes: st.pending_bytes,
            max: self.opts.queue_bytes_max,
        };
        if st.pending_bytes + body_bytes > self.opts.queue_bytes_max {
            return Err(busy(&st));
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
        let first_lsn = self.next_lsn.get();
        let joins = st
            .pending
            .back()
            .is_some_and(|b| b.takes(body_bytes, self.opts.commit_bytes_max));
        if !joins {
            let at = self.next_placement(&st, body_bytes);
            let Some(buf) = self.pool.take() else {
                return Err(busy(&st));
            };
            let streams = st.stream_lists.pop().unwrap_or_default();
            st.pending.push_back(Batch {
                buf,
                at,
                first_lsn,
                records: 0,
                appends: 0,
                body_bytes: 0,
                body_crc: 0,
                crc_bytes: 0,
                slot: None,
                streams,
            });
        }
        // Nothing can fail from here on.
        self.next_lsn.set(first_lsn + u64::from(count));
        let State { pending, slots, .. } = &mut *st;
        let batch = pending.back_mut().expect("joined or pushed above");
        assert_eq!(
            batch.first_lsn + u64::from(batch.records),
            first_lsn,
            "lsns are contiguous"
        );
        let from = batch.body_at() + batch.body_bytes;
        let out = &mut batch.buf.as_mut_slice()[from..from + body_bytes];
        let mut at = 0;
        for r in records {
            at += format::encode_record_at(&mut out[at..], stream, r.timestamp, r.payload);
        }
        assert_eq!(at, body_bytes, "the records iterator yielded the same records twice");
        batch.body_bytes += body_bytes;
        // Checksummed in chunks as appends arrive, while their bytes are still in the cache,
        // instead of reading the whole body again at the seal (at 64 KiB appends that re-read
        // made the checksum a seventh of the daemon's CPU); chunks, not every append, because a
        // call per 100-byte append costs more than it saves.
        if batch.body_bytes - batch.crc_bytes >= CRC_CHUNK_BYTES {
            let from = batch.body_at() + batch.crc_bytes;
            let to = batch.body_at() + batch.body_bytes;
            batch.body_crc = format::body_crc_append(batch.body_crc, &batch.buf.as_slice()[from..to]);
            batch.crc_bytes = batch.body_bytes;
        }
        batch.records += count;
        batch.appends += 1;
        match batch.streams.last_mut() {
            Some(g) if g.stream == stream => {
                g.records += count;
                g.bytes += body_bytes as u32;
            }
            _ => batch.streams.push(Group {
                stream,
                records: count,
                bytes: body_bytes as u32,
            }),
        }
        let slot = (ack != AckLevel::None).then(|| batch.slot.get_or_insert_with(|| take_slot(slots)).clone());
        st.pending_bytes += body_bytes;
        st.pending_appends += 1;
        drop(st);
        {
            let mut c = self.counters.borrow_mut();
            c.appends += 1;
            c.records += u64::from(count);
            c.bytes += payload_bytes;
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

    /// Where the commit of a new batch whose first append has `body_bytes` is expected to start:
    /// after the last queued batch, or where the active segment's next commit goes; in a new
    /// segment if it does not fit there.
    fn next_placement(&self, st: &State, body_bytes: usize) -> Placement {
        let new_segment = || {
            let capacity = match st.segs.spare() {
                Spare::Ready { capacity, .. } => *capacity,
                _ => self.opts.segment_bytes,
            };
            Placement::new_segment(capacity)
        };
        let at = match (st.pending.back(), &st.segs.active) {
            (Some(b), _) => b.at.after(b.commit_bytes()),
            (None, Some(a)) => Placement::of_active(a),
            (None, None) => return new_segment(),
        };
        if at.fits(COMMIT_HEADER_BYTES + body_bytes) {
            at
        } else {
            new_segment()
        }
    }

    /// Fails every queued append with `failure` and gives their lsns back: none of them has been
    /// handed to the device, and lsns must stay contiguous on disk. Their buffers go back to the
    /// pool.
    fn fail_pending(&self, st: &mut State, failure: Failure) {
        if let Some(front) = st.pending.front() {
            self.next_lsn.set(front.first_lsn);
        }
        for batch in st.pending.drain(..) {
            if let Some(slot) = batch.slot {
                slot.set(SlotState::Failed(failure.clone()));
            }
        }
        st.pending_bytes = 0;
        st.pending_appends = 0;
    }

    /// One step of the committer, without awaiting: submit a commit, rotate, or say why not.
    fn commit_step(self: &Rc<Self>) -> Step {
        let mut st = self.st.borrow_mut();
        if let Some(cause) = self.poisoned.borrow().clone() {
            self.fail_pending(&mut st, Failure::Poisoned { cause });
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
        let first_bytes = st.pending[0].commit_bytes() as u64;
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
                    let failure = if no_space {
                        Failure::NoSpace
                    } else {
                        Failure::Prepare { cause: cause.clone() }
                    };
                    self.fail_pending(&mut st, failure);
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

    /// Seals the batch at the front of the queue as one commit and submits it.
    fn submit(self: &Rc<Self>, mut guard: std::cell::RefMut<'_, State>) {
        let st = &mut *guard;
        let batch = st.pending.pop_front().expect("checked by commit_step");
        st.pending_bytes -= batch.body_bytes;
        st.pending_appends -= batch.appends;
        let staged_body_at = batch.body_at();
        let commit_bytes = batch.commit_bytes();
        let Batch {
            mut buf,
            first_lsn,
            records: count,
            body_bytes,
            mut body_crc,
            crc_bytes,
            slot,
            mut streams,
            ..
        } = batch;
        assert!(count > 0);
        assert!(commit_bytes <= self.opts.commit_bytes_max);
        let active = st.segs.active.as_mut().expect("checked by commit_step");
        assert!(
            active.offset + commit_bytes as u64 <= active.seg.capacity,
            "checked by commit_step"
        );
        assert!(
            first_lsn >= active.seg.base_lsn,
            "a commit never goes below its segment's base"
        );
        let write_start = if active.header_pending {
            0
        } else {
            align_down(active.offset)
        };
        let prefix = (active.offset - write_start) as usize;
        let commit_end = prefix + commit_bytes;
        let buf_len = align_up(commit_end as u64) as usize;
        assert!(buf_len <= buf.capacity());
        let b = buf.as_mut_slice();
        let body_at = prefix + COMMIT_HEADER_BYTES;
        if body_at != staged_body_at {
            // The batch was opened expecting another start (a rotation it did not foresee):
            // move the body once.
            b.copy_within(staged_body_at..staged_body_at + body_bytes, body_at);
            self.counters.borrow_mut().commits_moved += 1;
        }
        // The body's last bytes, not yet in its checksum (see `Inner::enqueue`).
        body_crc = format::body_crc_append(body_crc, &b[body_at + crc_bytes..body_at + body_bytes]);
        if active.header_pending {
            assert_eq!(active.offset, SEGMENT_DATA_OFFSET);
            assert!(active.tail.is_empty());
            let block = &mut b[..BLOCK_BYTES as usize];
            block.fill(0);
            SegmentHeader {
                shard_id: self.opts.shard_id,
                sequence: active.seg.sequence,
                base_lsn: active.seg.base_lsn,
            }
            .encode(block);
        } else {
            assert_eq!(active.tail.len(), prefix);
            b[..prefix].copy_from_slice(&active.tail);
        }
        format::seal_commit_with_body_crc(
            &mut b[prefix..],
            active.seg.sequence,
            first_lsn,
            count,
            body_bytes,
            body_crc,
        );
        // Only the padding is cleared: everything before it was written above or by the appends.
        b[commit_end..buf_len].fill(0);
        buf.set_len(buf_len);
        // Padding must be zero: recovery reads zeros after the last commit as the end of the log.
        assert!(buf.as_slice()[commit_end..].iter().all(|&x| x == 0));
        let commit_offset = active.offset;
        let end_offset = commit_offset + commit_bytes as u64;
        let tail_from = (align_down(end_offset) - write_start) as usize;
        let tail_to = (end_offset - write_start) as usize;
        active.tail.clear();
        active.tail.extend_from_slice(&buf.as_slice()[tail_from..tail_to]);
        active.offset = end_offset;
        active.header_pending = false;
        // [segments] The sparse index and the checksum chain the segment's summary carries.
        active.seg.note_commit(
            first_lsn,
            commit_offset,
            &buf.as_slice()[prefix..prefix + COMMIT_HEADER_BYTES],
        );
        // [stream_index] The streams the commit holds, for filtered reads: those its appends
        // noted, which are the ones its record headers name.
        debug_assert!(
            crate::stream_index::body_runs(&buf.as_slice()[body_at..body_at + body_bytes])
                .map(|(stream, ..)| stream)
                .eq(streams.iter().map(|g| g.stream)),
            "the streams noted at enqueue are the streams of the commit's records"
        );
        active
            .seg
            .note_stream_ids(first_lsn, commit_offset, commit_bytes, &streams);
        // [stream_runs] The commit's groups of records, into the segment's tail.
        if self.opts.stream_runs == StreamRuns::Auto {
            let b = buf.as_slice();
            active.seg.note_tail(
                (commit_offset, first_lsn, commit_bytes),
                &b[prefix..prefix + COMMIT_HEADER_BYTES],
                &b[body_at..body_at + body_bytes],
                &streams,
                self.opts.stream_tail_memory_bytes,
            );
        }
        if st.stream_lists.len() < STREAM_LISTS_KEPT && streams.capacity() <= STREAM_LIST_KEPT_MAX {
            streams.clear();
            st.stream_lists.push(streams);
        }
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
            slot,
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
        let io = seg.file.commit(write_start, IoBuf::Pooled(buf), on_written);
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
        if let Some(slot) = st.inflight.iter().find(|f| f.id == id).and_then(|f| f.slot.as_ref()) {
            let queued = matches!(*slot.state.borrow(), SlotState::Queued);
            if queued {
                slot.set(SlotState::Written);
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
            c.records_per_commit.saturating_record(f.records);
            c.bytes_per_commit.saturating_record(f.bytes);
            c.fsync_latency_us
                .saturating_record(f.started.elapsed().as_micros() as u64);
            if let Some(slot) = f.slot {
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
        let failure = Failure::Poisoned { cause };
        self.fail_pending(&mut st, failure.clone());
        for slot in st.inflight.iter().filter_map(|f| f.slot.as_ref()) {
            slot.set(SlotState::Failed(failure.clone()));
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
        // Where the read stands, for each segment's filtered read path.
        macro_rules! progress {
            () => {
                ReadProgress {
                    batch: &mut batch,
                    cursor: &mut cursor,
                    bytes: &mut bytes,
                    scanned: &mut scanned,
                    held: &mut held,
                    max_bytes,
                    scan_max,
                    memory,
                }
            };
        }
        let start = segments.iter().rposition(|s| s.base_lsn <= cursor).unwrap_or(0);
        'segments: for seg in &segments[start..] {
            let (seg_end_lsn, seg_end_offset) = seg.durable_end.get();
            let limit_lsn = seg_end_lsn.min(durable_end);
            if cursor >= limit_lsn {
                continue;
            }
            // A segment recovered from the manifest reads its index on first use.
            if crate::recovery::load_index(&*self.storage, &self.opts, seg).await? {
                self.bg_wake.notify();
            }
            if let Some(stream) = stream {
                // [stream_runs] A stream whose records this segment's runs file holds together.
                self.load_stream_runs(seg).await;
                let runs = seg.runs.borrow().clone();
                if let Some((runs, run)) = runs.and_then(|r| r.table.run_of(stream).map(|run| (r, run))) {
                    let mut progress = progress!();
                    let in_use = crate::stream_index::IndexInUse::new(self, seg);
                    self.health.borrow_mut().runs_reads += 1;
                    let read = self
                        .read_run(seg, &runs, run, limit_lsn, &mut progress, &truncated)
                        .await;
                    drop(in_use);
                    let read = read?;
                    memory.shrink_to(held);
                    match read {
                        RunsRead::Read(SegmentRead::Next) => continue,
                        RunsRead::Read(SegmentRead::Done) => break 'segments,
                        // The rest of the segment through its stream index.
                        RunsRead::Untrusted(reason) => self.distrust_stream_runs(seg, &reason).await,
                    }
                }
                // [stream_runs] The part of the segment its tail has walked, from memory.
                loop {
                    let mut progress = progress!();
                    match self.read_tail(seg, stream, limit_lsn, &mut progress) {
                        TailRead::Rest => break,
                        TailRead::Done => break 'segments,
                        TailRead::NeedMemory(need) => {
                            memory.shrink_to(0);
                            memory.acquire(need).await;
                        }
                    }
                }
                if cursor >= limit_lsn {
                    continue;
                }
                if seg.streams_on_disk.get()
                    && !self
                        .load_stream_index(seg, memory, held, batch.records.is_empty())
                        .await
                {
                    break 'segments;
                }
            }
            if let Some(stream) = stream.filter(|_| seg.streams.borrow().is_some()) {
                // [stream_index] Only the commits that hold the stream.
                let mut progress = progress!();
                let in_use = crate::stream_index::IndexInUse::new(self, seg);
                let read = self
                    .read_indexed(seg, stream, limit_lsn, &mut progress, &truncated)
                    .await;
                drop(in_use);
                let read = read?;
                memory.shrink_to(held);
                match read {
                    SegmentRead::Next => continue,
                    SegmentRead::Done => break 'segments,
                }
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
                        // Tiny records answer in more bytes than they take on disk: the batch
                        // takes room for each answer, or answers with what it has.
                        if stream.is_none_or(|s| s == record.stream)
                            && !progress!().take(lsn, record, 2 * (read_to - read_from) as usize)
                        {
                            break 'segments;
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
