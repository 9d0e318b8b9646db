//! `shards`: the per-core write-ahead log of shardlog.
//!
//! Each shard core runs one pinned glommio executor that owns one [`Shard`]: a directory of
//! segment files, one committer task, and one low-priority background task that keeps the next
//! segment ready and applies retention.
//!
//! # Durability contract
//!
//! **A `Durable` receipt for lsn L means every record of this shard with lsn <= L is on stable
//! storage.** Commits become durable in lsn order and are acknowledged in lsn order: a later
//! commit is never acknowledged before an earlier one is durable. After a write or fdatasync
//! fails, the shard is poisoned and acknowledges nothing more; it never retries an fdatasync.
//!
//! A `Written` receipt means the records were written to the device (readable through direct
//! I/O) but may not survive a power loss. `AckLevel::None` resolves once the records are queued;
//! with it a later failure (poison, no space) is not reported to the appender and its lsns may be
//! reused by later appends.
//!
//! # The path of one durable append
//!
//! 1. [`Shard::append`] validates, assigns lsns and serialises the records at call time straight
//!    into the tail of the commit being built: a 4 KiB-aligned buffer from the shard's bounded
//!    pool (`shard.rs`, `storage/pool.rs`). The payload is copied once.
//! 2. The committer takes everything queued (up to `commit_bytes_max` and the segment end),
//!    seals it as one checksummed commit (`format.rs`; only the padding to the block boundary is
//!    zeroed), and hands the buffer to the storage seam (`storage/`), which writes it and makes it
//!    durable on the shard's private io_uring ring (`uring.rs`): one `O_DSYNC` write
//!    (`Durability::Dsync`) or a write linked to an fdatasync in one submission
//!    (`Durability::Linked`). The buffer goes back to the pool once the kernel is done with it.
//! 3. Durable commits are acknowledged in lsn order; the next commit is built while the previous
//!    one syncs (`shard.rs`).
//! 4. When a segment is full the committer seals it and swaps in a segment the background task
//!    prepared; the segment state (the list, the active segment, the spare) has one owner,
//!    `segments.rs`. The background task (`background.rs`) then makes the sealed segment's
//!    summary durable, so that a restart accepts it without reading its body; it also applies
//!    retention and, in a task of its own, scrubs sealed segments against their summaries.
//! 5. On open, recovery (`recovery.rs`) accepts sealed segments from their summaries and the
//!    active segment from the clean-shutdown checkpoint, and scans (checking every commit, and
//!    cutting a torn tail) only what neither covers: after a crash, normally the active segment.
//!
//! Reads filtered to one stream go through each segment's stream index (`stream_index.rs`):
//! stream -> the commits that hold it, booked by the committer with each commit, written with the
//! summary when the segment is sealed, so such a read reads only those commits.
//!
//! # Executors
//!
//! The background task runs in its own task queue with small shares and a latency requirement of
//! [`BACKGROUND_PREEMPT_TIMER`]: while it has work, glommio preempts every that often, so a slice
//! of background work delays a commit by at most that much (glommio's default interval of 100 ms
//! would turn it into commit latency). The background task also stays I/O-bound: it awaits every
//! large write, sync and directory operation. A short preemption timer makes glommio 0.9 park
//! executors that still have runnable tasks, and it can happen at any time; every executor of
//! shardlog therefore starts through [`executor::spawn`], which sizes its `io_memory`, sets its
//! preemption timer and guards it against such stalls from its first instant (a stall costs at
//! most [`executor::STALL_GUARD_INTERVAL_DEFAULT`] while the executor is busy, and
//! [`executor::STALL_GUARD_IDLE_INTERVAL`] on its first work after an idle spell).
//!
//! ```no_run
//! use shards::{AckLevel, Lsn, RecordRef, Shard, ShardOptions};
//!
//! let ex = shards::executor::spawn(shards::executor::ExecutorOptions::new("shard-0"), || async move {
//!     let shard = Shard::open("/var/lib/shardlog/shard-0", ShardOptions::default()).await?;
//!     let record = RecordRef { payload: b"hello", timestamp: None };
//!     let receipt = shard.append(7, &[record], AckLevel::Durable).await?;
//!     let batch = shard.read(receipt.first_lsn, 1 << 20, None).await?;
//!     assert_eq!(batch.records[0].payload, b"hello");
//!     shard.close().await?;
//!     Ok::<(), shards::ShardError>(())
//! }).unwrap();
//! ex.join().unwrap().unwrap();
//! ```

mod background;
mod error;
pub mod executor;
pub mod format;
pub mod read_pool;
mod recovery;
mod segments;
mod shard;
mod stall_guard;
pub mod storage;
mod stream_index;
mod stream_runs;
mod sync;
pub mod uring;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use error::ShardError;
pub use read_pool::{ReadMemory, ReadPool, READ_MEMORY_BYTES_DEFAULT};
pub use recovery::RecoveryReport;
pub use shard::{Shard, ShardStats, Ticket};

/// Log sequence number. The lsns of a shard start at 1; `Lsn(0)` means "nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// When the future returned by [`Shard::append`] resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckLevel {
    /// Once queued.
    None,
    /// Once written to the device, not necessarily durable.
    Written,
    /// Once durable (see the crate's durability contract).
    Durable,
}

/// How a commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// One submission on a private io_uring ring: the write linked to an fdatasync.
    Linked,
    /// One write (`RWF_DSYNC`, on the private ring) to a file opened with `O_DSYNC`.
    Dsync,
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linked" => Ok(Durability::Linked),
            "dsync" => Ok(Durability::Dsync),
            other => Err(format!(
                "unknown durability mode {other:?}: use \"linked\" or \"dsync\""
            )),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Durability::Linked => "linked",
            Durability::Dsync => "dsync",
        })
    }
}

/// One record to append.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub payload: &'a [u8],
    /// Client timestamp, stored as given.
    pub timestamp: Option<u64>,
}

/// The lsns given to one append: `first_lsn .. first_lsn + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub first_lsn: Lsn,
    pub count: u32,
}

impl Receipt {
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.first_lsn.0 + u64::from(self.count) - 1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    pub lsn: Lsn,
    pub stream: u64,
    pub timestamp: Option<u64>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBatch {
    pub records: Vec<ReadRecord>,
    /// Where the next read should start.
    pub next_lsn: Lsn,
}

/// Default size of a segment file.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default bound of one commit (header and records).
pub const COMMIT_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default bound of the bytes queued and not yet handed to the device.
pub const QUEUE_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// Preemption interval of a shard executor while its background task queue has work (the queue's
/// `Latency::Matters`): it bounds how long a slice of background work can hold the CPU while a
/// commit is ready to start. Executors keep glommio's default interval otherwise, which keeps
/// glommio's park-with-runnable-tasks bug rare (see [`executor`]).
pub const BACKGROUND_PREEMPT_TIMER: Duration = Duration::from_millis(1);
/// Default glommio `io_memory` for shard executors: counted three times against
/// `RLIMIT_MEMLOCK` (8 MiB for non-root), so 2 MiB leaves room for a private ring.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 2 << 20;
/// Default durability mode: one O_DSYNC write. Measured side by side with the linked write +
/// fdatasync (docs/BENCHMARKS.md, `scripts/bench.sh`), it was as fast or faster at every point
/// on a quiet machine: the kernel hands a linked fdatasync to an io-wq worker, while an O_DSYNC
/// write's flush is issued directly by the block layer. `Linked` remains fully supported.
pub const DURABILITY_DEFAULT: Durability = Durability::Dsync;

/// With [`SegmentPrep::Auto`], a new segment file is preallocated instead of zero-filled after a
/// segment whose commits averaged at least this many bytes. Group commit builds commits this
/// large only while a lot is queued (or appends are this large): the shard is then limited by
/// the device's bandwidth, which zero-filling the next segment while it commits would halve,
/// and the extra cost of a commit into preallocated blocks (the file system converts them to
/// written in the same sync, about 0.1 ms here) is small next to writing 256 KiB or more.
pub const PREALLOCATE_AFTER_COMMIT_BYTES: u64 = 256 << 10;

/// How the background task makes a new segment file ready (a recycled one needs neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SegmentPrep {
    /// Zero-fill, unless the last segment was filled with large commits
    /// ([`PREALLOCATE_AFTER_COMMIT_BYTES`]): then preallocate.
    #[default]
    Auto,
    /// Always write zeros over the whole file first. Each commit's sync then costs the least
    /// (the blocks are already written: nothing for the file system to convert), which is what
    /// small commits, and so latency, need; the device writes every byte twice.
    ZeroFill,
    /// Always `fallocate` the file: the device writes every byte once, and each commit's sync
    /// also converts the blocks it wrote (about 3x the sync of a 4 KiB commit on ext4 here).
    Preallocate,
}

/// Whether sealed segments get stream runs ([`ShardOptions::stream_runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamRuns {
    /// Once a segment is sealed, the background task copies the records of each stream that a
    /// read through the stream index would read at more than twice its size (a stream whose
    /// records arrive one at a time among other streams') next to each other, into the segment's
    /// `.runs` file; filtered reads of those streams read that. It costs those records' bytes
    /// written a second time.
    #[default]
    Auto,
    /// No runs: filtered reads use the stream index only.
    Off,
}

/// Default bound of the memory the runs of a shard's active segment take while they are made
/// ([`ShardOptions::stream_tail_memory_bytes`]).
pub const STREAM_TAIL_MEMORY_BYTES_DEFAULT: usize = 4 << 20;

/// Default bound of the memory the stream indexes of a shard's sealed segments take once loaded
/// (see [`ShardOptions::stream_index_memory_bytes`]).
pub const STREAM_INDEX_MEMORY_BYTES_DEFAULT: usize = 64 << 20;

/// Default rate of the background scrub: modest, so that it never competes with appends and
/// reads for the device (a 64 MiB segment every 8 s; 100 GB in about 3.5 hours).
pub const SCRUB_BYTES_PER_SEC_DEFAULT: u64 = 8 << 20;

/// Options of one shard. Every default is a named constant.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Written into every segment header; a segment of another shard is refused. Default 0.
    pub shard_id: u16,
    /// Size of each segment file, a multiple of 4 KiB. Default [`SEGMENT_BYTES_DEFAULT`].
    pub segment_bytes: u64,
    /// Delete or recycle the oldest sealed segments while all segments together take more than
    /// this. Default `None` (keep everything).
    pub retention_bytes: Option<u64>,
    /// Delete or recycle sealed segments sealed longer ago than this. Default `None`.
    pub retention_age: Option<Duration>,
    /// Upper bound of one commit, and so of one append. Default [`COMMIT_BYTES_MAX_DEFAULT`].
    pub commit_bytes_max: usize,
    /// Appends fail with `Busy` while more than this is queued. Default [`QUEUE_BYTES_MAX_DEFAULT`].
    /// It also sizes the pool of commit buffers: at most `queue_bytes_max / commit_bytes_max`
    /// (rounded up) plus 3 buffers of `commit_bytes_max` + 4 KiB, allocated as needed and kept.
    /// When they are all in use (a queue of part-filled commits) appends also get `Busy`.
    pub queue_bytes_max: usize,
    /// Default [`DURABILITY_DEFAULT`].
    pub durability: Durability,
    /// On corruption, truncate the log at the first bad commit instead of refusing to open.
    /// Default `false`.
    pub repair: bool,
    /// The background scrub reads sealed segments at most this fast and checks them against
    /// their summaries; 0 turns it off. Default [`SCRUB_BYTES_PER_SEC_DEFAULT`].
    pub scrub_bytes_per_sec: u64,
    /// How new segment files are made ready. Default [`SegmentPrep::Auto`].
    pub segment_prep: SegmentPrep,
    /// Memory the stream indexes of sealed segments may keep loaded. Beyond it, the least
    /// recently read ones whose files are durable are dropped (the next filtered read of such a
    /// segment loads its file again). The active segment's index is not bounded by it: it is
    /// what the committer books into. Default [`STREAM_INDEX_MEMORY_BYTES_DEFAULT`].
    pub stream_index_memory_bytes: usize,
    /// Whether sealed segments get stream runs. Default [`StreamRuns::Auto`].
    pub stream_runs: StreamRuns,
    /// Memory the runs of the segment being written may take while they are made (its tail):
    /// beyond it, the runs of the streams the stream index reads best are dropped first. Default
    /// [`STREAM_TAIL_MEMORY_BYTES_DEFAULT`].
    pub stream_tail_memory_bytes: usize,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            shard_id: 0,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            retention_bytes: None,
            retention_age: None,
            commit_bytes_max: COMMIT_BYTES_MAX_DEFAULT,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
            durability: DURABILITY_DEFAULT,
            repair: false,
            scrub_bytes_per_sec: SCRUB_BYTES_PER_SEC_DEFAULT,
            segment_prep: SegmentPrep::Auto,
            stream_index_memory_bytes: STREAM_INDEX_MEMORY_BYTES_DEFAULT,
            stream_runs: StreamRuns::Auto,
            stream_tail_memory_bytes: STREAM_TAIL_MEMORY_BYTES_DEFAULT,
        }
    }
}

impl ShardOptions {
    pub(crate) fn validate(&self) -> Result<(), ShardError> {
        let bad = |reason: String| Err(ShardError::InvalidOptions { reason });
        let block = format::BLOCK_BYTES;
        if self.segment_bytes % block != 0 || self.segment_bytes < 4 * block {
            return bad(format!(
                "segment_bytes {} must be a multiple of {block} and at least {}",
                self.segment_bytes,
                4 * block
            ));
        }
        let min_commit = format::COMMIT_HEADER_BYTES + format::RECORD_HEADER_BYTES + 1;
        if self.commit_bytes_max < min_commit {
            return bad(format!(
                "commit_bytes_max {} is below {min_commit}",
                self.commit_bytes_max
            ));
        }
        if self.commit_bytes_max as u64 > self.segment_bytes - format::SEGMENT_DATA_OFFSET {
            return bad(format!(
                "commit_bytes_max {} does not fit in a segment of {} bytes",
                self.commit_bytes_max, self.segment_bytes
            ));
        }
        if u32::try_from(self.commit_bytes_max).is_err() {
            return bad("commit_bytes_max must fit in 32 bits".into());
        }
        Ok(())
    }
}
