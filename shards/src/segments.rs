//! The one owner of a shard's segment state: the list of segments, the active one, the spare.
//!
//! Every transition is a method here, and each ends with [`Segments::assert_invariants`]:
//!
//! ```text
//! recovered ──▶ activate (seals the previous segment) ──▶ activate ──▶ ...
//!                  ▲                                          │
//!   install_spare ─┘ (background task)        retire_oldest ◀─┘ (background task)
//! ```
//!
//! The committer (`shard.rs`) activates the spare when the active segment is full and advances
//! the active segment's offset with each commit; the background task (`background.rs`) installs
//! spares, writes the summaries of sealed segments and retires old ones; recovery
//! (`recovery.rs`) builds the initial state.
//!
//! A segment is *sealed* when the committer moves to the next one: it is full and everything in
//! it is durable (the committer activates only with no commit in flight). From then on its
//! summary ([`crate::format::SegmentSummary`]) can be written, and once that is durable a restart
//! accepts the segment from the summary without reading its body.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use crate::format::{chain_commit_crc, Manifest, ManifestEntry, SegmentSummary, BLOCK_BYTES, SEGMENT_DATA_OFFSET};
use crate::storage::SegmentFile;
use crate::stream_index::{StreamIndex, SEGMENT_BYTES_INDEXED_MAX};
use crate::stream_runs::{Group, LoadedRuns, RunsState, Tail, TailState};

/// `wall` as milliseconds since the Unix epoch (0 if before it).
pub(crate) fn unix_ms(wall: SystemTime) -> u64 {
    wall.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The instant `ms` milliseconds after the Unix epoch (now if that is in the future).
pub(crate) fn instant_of_unix_ms(ms: u64) -> Instant {
    let wall = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    SystemTime::now()
        .duration_since(wall)
        .ok()
        .and_then(|age| Instant::now().checked_sub(age))
        .unwrap_or_else(Instant::now)
}

/// One sparse index entry per this many bytes of a segment, so a read starts close to its lsn.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 64 << 10;

pub(crate) fn segment_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.wal")
}

/// Name of the summary file of the segment that starts at `base_lsn`.
pub(crate) fn summary_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.sum")
}

/// Name of the clean-shutdown checkpoint file.
pub(crate) const CHECKPOINT_NAME: &str = "checkpoint";

/// Name of the manifest: the summaries of all sealed segments, so that a clean restart reads one
/// file instead of a header and a summary per segment.
pub(crate) const MANIFEST_NAME: &str = "manifest";
/// The next manifest is written here, made durable, then renamed over `manifest`.
pub(crate) const MANIFEST_TMP_NAME: &str = "manifest.tmp";

/// Where a segment's summary stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SummaryState {
    /// The segment is active (or recovered as the last one): no summary.
    Open,
    /// Sealed; the background task has yet to write (or rewrite) its summary.
    Pending,
    /// Sealed, and its summary is durable.
    Durable,
}

/// One segment file of the log.
pub(crate) struct Segment {
    pub sequence: u64,
    pub base_lsn: u64,
    /// File size: commits must end at or before it.
    pub capacity: u64,
    pub name: RefCell<String>,
    pub file: Rc<dyn SegmentFile>,
    /// (one past the last durable lsn, offset one past the last durable commit).
    pub durable_end: Cell<(u64, u64)>,
    /// Sparse (first lsn of a commit, its offset), ascending. Empty until `index_loaded`.
    pub index: RefCell<Vec<(u64, u64)>>,
    /// False for a segment recovered from the manifest: its index is still in its `.sum`, and
    /// is read on first use (`recovery::load_index`).
    pub index_loaded: Cell<bool>,
    /// Commits handed to the device, and the checksum chained over their headers
    /// ([`chain_commit_crc`]); the summary carries both.
    pub commits: Cell<u64>,
    pub commits_crc: Cell<u32>,
    pub sealed_at: Cell<Option<Instant>>,
    /// The same moment as wall-clock milliseconds since the Unix epoch, as the manifest keeps it
    /// (kept as read, so that a manifest written again is the same bytes).
    pub sealed_unix_ms: Cell<u64>,
    pub summary: Cell<SummaryState>,
    /// Removed by retention: reads that still hold it report `Truncated`.
    pub retired: Cell<bool>,
    /// What the scrub found wrong with it, if anything.
    pub corrupt: RefCell<Option<String>>,
    /// Stream -> the commits holding it ([`crate::stream_index`]). `None`: filtered reads of
    /// this segment scan it (a segment too large for one, or whose index was not trusted).
    pub streams: RefCell<Option<StreamIndex>>,
    /// The stream index is in this segment's `.six` file, not loaded yet: the first filtered
    /// read loads it (a sealed segment recovery accepted from its summary; loading it then would
    /// cost every restart a file per segment).
    pub streams_on_disk: Cell<bool>,
    /// The stream index file was missing or not trusted: the background task rebuilds the index
    /// by reading the segment, and writes the file again.
    pub streams_rebuild: Cell<bool>,
    /// The index in `streams` is sealed and its `.six` file is durable: it may be dropped from
    /// memory ([`Inner::bound_stream_indexes`](crate::shard::Inner)), and the next filtered read
    /// loads it again.
    pub streams_persisted: Cell<bool>,
    /// When a filtered read last used the index (a tick of the shard's clock): the least recently
    /// used is dropped first.
    pub streams_used: Cell<u64>,
    /// Filtered reads using the index right now: it is not dropped under them.
    pub streams_readers: Cell<u32>,
    /// Where the segment's stream runs stand ([`crate::stream_runs`]).
    pub runs_state: Cell<RunsState>,
    /// The table of its runs file, and the file, while [`RunsState::Loaded`].
    pub runs: RefCell<Option<Rc<LoadedRuns>>>,
    /// Its runs so far, in memory, while it is the active segment and until its runs file is
    /// made ([`crate::stream_runs::Tail`]).
    pub tail: RefCell<Option<Tail>>,
    pub tail_state: Cell<TailState>,
}

impl Segment {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sequence: u64,
        base_lsn: u64,
        capacity: u64,
        name: String,
        file: Rc<dyn SegmentFile>,
        durable_end: (u64, u64),
        index: Vec<(u64, u64)>,
        commits: u64,
        commits_crc: u32,
    ) -> Segment {
        assert!(sequence > 0 && base_lsn > 0);
        assert!(durable_end.0 >= base_lsn);
        assert!(durable_end.1 >= SEGMENT_DATA_OFFSET && durable_end.1 <= capacity);
        Segment {
            sequence,
            base_lsn,
            capacity,
            name: RefCell::new(name),
            file,
            durable_end: Cell::new(durable_end),
            index: RefCell::new(index),
            index_loaded: Cell::new(true),
            commits: Cell::new(commits),
            commits_crc: Cell::new(commits_crc),
            sealed_at: Cell::new(None),
            sealed_unix_ms: Cell::new(0),
            summary: Cell::new(SummaryState::Open),
            retired: Cell::new(false),
            corrupt: RefCell::new(None),
            streams: RefCell::new(None),
            streams_on_disk: Cell::new(false),
            streams_rebuild: Cell::new(false),
            streams_persisted: Cell::new(false),
            streams_used: Cell::new(0),
            streams_readers: Cell::new(0),
            runs_state: Cell::new(RunsState::None),
            runs: RefCell::new(None),
            tail: RefCell::new(None),
            tail_state: Cell::new(TailState::NotStarted),
        }
    }

    /// Books the streams of one commit of `commit_bytes` handed to the device at `offset`,
    /// whose records belong to `streams` in order, in the stream index.
    pub(crate) fn note_stream_ids(&self, first_lsn: u64, offset: u64, commit_bytes: usize, groups: &[Group]) {
        if let Some(index) = self.streams.borrow_mut().as_mut() {
            index.note_commit_streams(
                first_lsn - self.base_lsn,
                offset,
                commit_bytes,
                groups.iter().map(|g| g.stream),
            );
        }
    }

    /// Drops the segment's tail for good: `state` says why.
    pub(crate) fn drop_tail(&self, state: TailState) {
        *self.tail.borrow_mut() = None;
        self.tail_state.set(state);
    }

    /// Books one commit handed to the device in the segment's tail (starting it with the
    /// segment's first commit): `at` is its (offset, first lsn, bytes).
    pub(crate) fn note_tail(&self, at: (u64, u64, usize), header: &[u8], body: &[u8], groups: &[Group], budget: usize) {
        if self.tail_state.get() == TailState::NotStarted
            && at.0 == SEGMENT_DATA_OFFSET
            && self.streams.borrow().is_some()
        {
            *self.tail.borrow_mut() = Some(Tail::new(self));
            self.tail_state.set(TailState::Booking);
        }
        if !matches!(self.tail_state.get(), TailState::Booking | TailState::CatchingUp) {
            return;
        }
        let interval = crate::stream_runs::mark_interval(self.capacity);
        let fits = self.tail.borrow_mut().as_mut().expect("a tail that books").note_commit(
            at,
            header,
            body,
            groups,
            self.sequence,
            (interval, budget),
        );
        if !fits {
            // Too many streams to keep even their plans: this segment's runs are planned by
            // walking it once it is sealed.
            self.drop_tail(TailState::Abandoned);
        }
    }

    /// Heap bytes of the segment's stream index and of its runs table.
    pub(crate) fn stream_index_bytes(&self) -> usize {
        self.streams.borrow().as_ref().map_or(0, StreamIndex::memory_bytes)
            + self.runs.borrow().as_ref().map_or(0, |r| r.table.memory_bytes())
    }

    /// Books one commit handed to the device at `offset`: the sparse index and the checksum
    /// chain. `header` is the commit's header as written.
    pub(crate) fn note_commit(&self, first_lsn: u64, offset: u64, header: &[u8]) {
        assert!(offset >= SEGMENT_DATA_OFFSET && offset < self.capacity);
        let mut index = self.index.borrow_mut();
        if index
            .last()
            .is_none_or(|&(_, off)| offset - off >= INDEX_INTERVAL_BYTES)
        {
            index.push((first_lsn, offset));
        }
        self.commits.set(self.commits.get() + 1);
        self.commits_crc.set(chain_commit_crc(self.commits_crc.get(), header));
    }

    /// The summary of everything durable in this segment.
    pub(crate) fn summary(&self, shard_id: u16) -> SegmentSummary {
        let (end_lsn, end_offset) = self.durable_end.get();
        SegmentSummary {
            shard_id,
            sequence: self.sequence,
            base_lsn: self.base_lsn,
            end_lsn,
            commits: self.commits.get(),
            end_offset,
            commits_crc: self.commits_crc.get(),
            index: self.index.borrow().clone(),
        }
    }

    /// When the segment was sealed, in milliseconds since the Unix epoch.
    pub(crate) fn set_sealed_at(&self, unix_ms: u64) {
        self.sealed_at.set(Some(instant_of_unix_ms(unix_ms)));
        self.sealed_unix_ms.set(unix_ms);
    }

    /// What the manifest says of this segment.
    pub(crate) fn manifest_entry(&self) -> ManifestEntry {
        let (end_lsn, end_offset) = self.durable_end.get();
        ManifestEntry {
            sequence: self.sequence,
            base_lsn: self.base_lsn,
            end_lsn,
            commits: self.commits.get(),
            end_offset,
            file_bytes: self.capacity,
            sealed_unix_ms: self.sealed_unix_ms.get(),
            commits_crc: self.commits_crc.get(),
        }
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.summary.get() != SummaryState::Open
    }
}

pub(crate) enum Spare {
    Preparing,
    Ready {
        name: String,
        file: Rc<dyn SegmentFile>,
        capacity: u64,
    },
    Failed {
        no_space: bool,
        cause: String,
    },
}

pub(crate) struct Active {
    pub seg: Rc<Segment>,
    /// Where the next commit starts.
    pub offset: u64,
    /// The bytes of the block holding `offset`, before `offset`: the next commit rewrites that
    /// block, so they go in front of it. Refilled in place (at most a block), never reallocated.
    pub tail: Vec<u8>,
    /// The segment header block has not been written yet; it goes out with the first commit.
    pub header_pending: bool,
}

/// The segments of one shard. The committer reaches into `active` for each commit's offset and
/// tail; everything else changes through the methods below.
pub(crate) struct Segments {
    /// Oldest first; the last one is the active segment when there is one.
    list: VecDeque<Rc<Segment>>,
    pub active: Option<Active>,
    spare: Spare,
    next_sequence: u64,
    first_available: u64,
    /// The manifest on disk lacks a segment whose summary is durable: the background task
    /// writes a new one.
    manifest_stale: Cell<bool>,
    /// Bytes per commit, on average, of the segment this process sealed last: how the
    /// background task prepares the next file ([`crate::SegmentPrep::Auto`]).
    last_sealed_commit_bytes: Option<u64>,
}

impl Segments {
    /// The state recovery found: `list` oldest first, every segment but the last sealed; the
    /// last one is active (`active` given) or sealed too (the next commit activates a new one).
    pub(crate) fn recovered(list: VecDeque<Rc<Segment>>, active: Option<Active>, first_available: u64) -> Segments {
        let next_sequence = list.back().map_or(1, |s| s.sequence + 1);
        let segs = Segments {
            list,
            active,
            spare: Spare::Preparing,
            next_sequence,
            first_available,
            manifest_stale: Cell::new(false),
            last_sealed_commit_bytes: None,
        };
        segs.assert_invariants();
        segs
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Rc<Segment>> {
        self.list.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn first_available(&self) -> u64 {
        self.first_available
    }

    pub(crate) fn spare(&self) -> &Spare {
        &self.spare
    }

    pub(crate) fn last_sealed_commit_bytes(&self) -> Option<u64> {
        self.last_sealed_commit_bytes
    }

    /// Heap bytes of the stream indexes of all segments.
    pub(crate) fn stream_index_bytes(&self) -> u64 {
        self.list.iter().map(|s| s.stream_index_bytes() as u64).sum()
    }

    /// Bytes of all segment files (not the spare).
    pub(crate) fn file_bytes(&self) -> u64 {
        self.list.iter().map(|s| s.capacity).sum()
    }

    /// Takes the spare out (leaving `Preparing`): the committer activates it, or puts a failure
    /// back with [`Segments::install_spare`].
    pub(crate) fn take_spare(&mut self) -> Spare {
        std::mem::replace(&mut self.spare, Spare::Preparing)
    }

    pub(crate) fn install_spare(&mut self, spare: Spare) {
        self.spare = spare;
        self.assert_invariants();
    }

    /// Seals the active segment (if any) and makes a new one, starting at `base_lsn`, active.
    /// Precondition: nothing is in flight, so everything in the active segment is durable.
    pub(crate) fn activate(&mut self, base_lsn: u64, name: String, file: Rc<dyn SegmentFile>, capacity: u64) {
        if let Some(prev) = self.list.back() {
            assert_eq!(prev.durable_end.get().0, base_lsn, "segments are contiguous");
            if let Some(active) = &self.active {
                assert_eq!(
                    active.offset,
                    prev.durable_end.get().1,
                    "the sealed segment is all durable"
                );
            }
            if !prev.is_sealed() {
                prev.set_sealed_at(unix_ms(SystemTime::now()));
                prev.summary.set(SummaryState::Pending);
                let bytes = prev.durable_end.get().1 - SEGMENT_DATA_OFFSET;
                self.last_sealed_commit_bytes = bytes.checked_div(prev.commits.get());
            }
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let seg = Rc::new(Segment::new(
            sequence,
            base_lsn,
            capacity,
            name,
            file,
            (base_lsn, SEGMENT_DATA_OFFSET),
            Vec::new(),
            0,
            0,
        ));
        if capacity < SEGMENT_BYTES_INDEXED_MAX {
            *seg.streams.borrow_mut() = Some(StreamIndex::open());
        }
        if self.list.is_empty() {
            // The first segment of an empty shard: its lsns start where the shard's do.
            self.first_available = base_lsn;
        }
        self.list.push_back(seg.clone());
        self.active = Some(Active {
            seg,
            offset: SEGMENT_DATA_OFFSET,
            tail: Vec::new(),
            header_pending: true,
        });
        self.assert_invariants();
    }

    /// Sealed segments whose summary is still to be written.
    pub(crate) fn summaries_pending(&self) -> Vec<Rc<Segment>> {
        self.list
            .iter()
            .filter(|s| s.summary.get() == SummaryState::Pending)
            .cloned()
            .collect()
    }

    pub(crate) fn summary_written(&self, seg: &Segment) {
        assert_eq!(seg.summary.get(), SummaryState::Pending);
        seg.summary.set(SummaryState::Durable);
        self.manifest_stale.set(true);
        self.assert_invariants();
    }

    /// Whether the manifest on disk lacks a durable summary (see [`Segments::manifest`]).
    pub(crate) fn manifest_stale(&self) -> bool {
        self.manifest_stale.get()
    }

    pub(crate) fn set_manifest_stale(&self, stale: bool) {
        self.manifest_stale.set(stale);
    }

    /// The manifest of the log as it stands: every sealed segment whose summary is durable.
    /// Segments retired since are left out; a segment whose summary is pending is left out
    /// until it is durable (recovery then reads its header and scans it, as without a manifest).
    pub(crate) fn manifest(&self, shard_id: u16) -> Manifest {
        Manifest {
            shard_id,
            entries: self
                .list
                .iter()
                .filter(|s| s.summary.get() == SummaryState::Durable)
                .map(|s| s.manifest_entry())
                .collect(),
        }
    }

    /// The oldest segment, if it is sealed (never the active one).
    pub(crate) fn oldest_sealed(&self) -> Option<&Rc<Segment>> {
        self.list.front().filter(|s| s.is_sealed() && self.list.len() >= 2)
    }

    /// Removes the oldest sealed segment from the log (retention). Reads still holding it
    /// report `Truncated`.
    pub(crate) fn retire_oldest(&mut self) -> Rc<Segment> {
        assert!(self.oldest_sealed().is_some(), "only a sealed segment is retired");
        let victim = self.list.pop_front().expect("checked above");
        victim.retired.set(true);
        self.first_available = self.list.front().map_or(victim.durable_end.get().0, |s| s.base_lsn);
        self.assert_invariants();
        victim
    }

    /// The executable rules of the segment state.
    pub(crate) fn assert_invariants(&self) {
        assert!(self.first_available >= 1);
        if let Some(front) = self.list.front() {
            assert_eq!(
                self.first_available, front.base_lsn,
                "first_available is the oldest base lsn"
            );
        }
        if let Some(back) = self.list.back() {
            assert_eq!(self.next_sequence, back.sequence + 1);
        }
        for (i, seg) in self.list.iter().enumerate() {
            assert!(!seg.retired.get());
            let (end_lsn, end_offset) = seg.durable_end.get();
            assert!(end_lsn >= seg.base_lsn);
            assert!(end_offset >= SEGMENT_DATA_OFFSET && end_offset <= seg.capacity);
            assert!(
                seg.index_loaded.get() || seg.summary.get() == SummaryState::Durable,
                "only a trusted segment waits for its index"
            );
            if let Some(next) = self.list.get(i + 1) {
                assert!(seg.is_sealed(), "every segment but the last is sealed");
                assert_eq!(next.sequence, seg.sequence + 1, "sequences are contiguous");
                assert_eq!(next.base_lsn, end_lsn, "lsns are contiguous across segments");
            }
        }
        if let Some(active) = &self.active {
            let back = self.list.back().expect("the active segment is in the list");
            assert!(Rc::ptr_eq(&active.seg, back), "the active segment is the last");
            assert!(!back.is_sealed());
            let (_, durable_offset) = back.durable_end.get();
            assert!(
                durable_offset <= active.offset,
                "the durable end is inside the active segment"
            );
            assert!(active.offset <= back.capacity);
            assert_eq!(active.tail.len() as u64, active.offset % BLOCK_BYTES);
        } else if let Some(back) = self.list.back() {
            assert!(back.is_sealed(), "without an active segment the last one is sealed");
        }
    }
}
