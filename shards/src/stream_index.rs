//! The stream index of a segment: for each stream, the commits of the segment that hold at least
//! one of its records, so that a read filtered to one stream reads only those commits instead of
//! scanning every commit in between (issue #13).
//!
//! Two forms:
//!
//! - [`OpenIndex`], for the active segment (and a sealed one recovery scanned, until the
//!   background task seals it). The committer books each commit with [`StreamIndex::note_commit`]:
//!   one walk over the record headers it has just written, and per *distinct* stream of the
//!   commit one amortised push onto a flat vector (no allocation per record or per commit; a new
//!   stream grows a hash map, amortised too). A stream's commits are chained through that vector.
//! - [`SealedIndex`], built from the open form when the segment is sealed (by the background
//!   task, before it writes the summary): streams sorted, each stream's commits contiguous and
//!   ascending, so a read finds its place with two binary searches. This form is what is
//!   persisted as `<base_lsn:020>.six` (format below and in the README).
//!
//! An entry is a commit's first lsn relative to the segment's base lsn, its offset and its length,
//! all u32 (so a read fetches exactly the commits it needs, several close ones in one I/O):
//! a segment holds fewer than 2^32 bytes when it has an index ([`SEGMENT_BYTES_INDEXED_MAX`]), so
//! fewer than 2^32 records. A segment without an index (`None` on [`crate::segments::Segment`]:
//! a larger segment, or a sealed one whose index file was missing or untrusted at recovery) is
//! read by scanning, as before the index existed; never with a wrong answer.
//!
//! ```text
//! <base_lsn:020>.six, little-endian, zero-padded to a whole block:
//!   [0, 8)    magic "SHLGSIX\x01"
//!   [8, 10)   version (1)
//!   [10, 12)  shard id
//!   [12, 16)  stream count S
//!   [16, 24)  segment sequence
//!   [24, 32)  segment base lsn
//!   [32, 40)  end lsn (one past the last lsn indexed)
//!   [40, 48)  commit count
//!   [48, 56)  end offset (one past the last commit)
//!   [56, 60)  commits crc (the summary's checksum chained over every commit header)
//!   [60, 64)  entry count E
//!   [64, 68)  crc32c of bytes [0, 64) then [72, 72 + 16 S + 12 E)
//!   [68, 72)  zero
//!   S times:  stream u64, entry count of the stream u32, zero u32 (streams strictly ascending)
//!   E times:  first lsn of the commit - base lsn u32, commit offset u32, commit bytes u32
//!             (per stream, ascending)
//! ```
//!
//! Bytes [16, 60) repeat the segment's summary (or the checkpoint); recovery trusts an index file
//! only if its checksum holds, its entries are in order and inside the segment, and those fields
//! equal the summary it accepted: the commits crc covers every commit header, and each header
//! the checksum of its body, so an index that matches describes exactly the commits on disk.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;

use crate::error::ShardError;
use crate::format::{
    self, align_down, align_up, u32_at, u64_at, SegmentSummary, COMMIT_HEADER_BYTES, RECORD_HEADER_BYTES,
    SEGMENT_DATA_OFFSET,
};
use crate::read_pool::{ReadMemory, READ_RECORD_OVERHEAD_BYTES};
use crate::segments::Segment;
use crate::shard::{Inner, READ_CHUNK_BYTES};
use crate::stream_runs::Walk;
use crate::{Lsn, ReadBatch, ReadRecord};

/// Segments at least this large get no stream index: their offsets do not fit in an entry.
pub(crate) const SEGMENT_BYTES_INDEXED_MAX: u64 = 1 << 32;
pub(crate) const STREAM_INDEX_MAGIC: [u8; 8] = *b"SHLGSIX\x01";
pub(crate) const STREAM_INDEX_VERSION: u16 = 1;
pub(crate) const STREAM_INDEX_FIXED_BYTES: usize = 72;
/// stream 8 + entry count 4 + zero 4.
pub(crate) const STREAM_INDEX_STREAM_BYTES: usize = 16;
/// lsn delta 4 + offset 4 + length 4.
pub(crate) const STREAM_INDEX_ENTRY_BYTES: usize = 12;

/// The groups of records of one stream next to each other in a commit's `body` (framed and
/// valid): (stream, index of the first record, records, byte range in the body).
pub(crate) fn body_runs(body: &[u8]) -> impl Iterator<Item = (u64, u32, u32, std::ops::Range<usize>)> + '_ {
    let mut at = 0;
    let mut index = 0u32;
    std::iter::from_fn(move || {
        if at == body.len() {
            return None;
        }
        let (from, first) = (at, index);
        let mut stream = None;
        while at < body.len() {
            assert!(body.len() - at >= RECORD_HEADER_BYTES, "record framing checked");
            let (len, s) = (u32_at(body, at) as usize, u64_at(body, at + 8));
            if stream.is_some_and(|prev| prev != s) {
                break;
            }
            stream = Some(s);
            at += RECORD_HEADER_BYTES + len;
            assert!(at <= body.len(), "record framing checked");
            index += 1;
        }
        Some((stream.expect("one record at least"), first, index - first, from..at))
    })
}

/// Writes the segment `summary` describes where a stream index or runs file keeps it (see
/// [`identity_mismatch`]).
pub(crate) fn encode_identity(summary: &SegmentSummary, out: &mut [u8]) {
    out[10..12].copy_from_slice(&summary.shard_id.to_le_bytes());
    out[16..24].copy_from_slice(&summary.sequence.to_le_bytes());
    out[24..32].copy_from_slice(&summary.base_lsn.to_le_bytes());
    out[32..40].copy_from_slice(&summary.end_lsn.to_le_bytes());
    out[40..48].copy_from_slice(&summary.commits.to_le_bytes());
    out[48..56].copy_from_slice(&summary.end_offset.to_le_bytes());
    out[56..60].copy_from_slice(&summary.commits_crc.to_le_bytes());
}

/// The segment a stream index or runs file describes (shard id at bytes 10..12, the summary's
/// fields at 16..60), if it is not the one `summary` describes: `Some` says both.
pub(crate) fn identity_mismatch(buf: &[u8], summary: &SegmentSummary) -> Option<String> {
    let identity = (
        u16::from_le_bytes([buf[10], buf[11]]),
        u64_at(buf, 16),
        u64_at(buf, 24),
        u64_at(buf, 32),
        u64_at(buf, 40),
        u64_at(buf, 48),
        u32_at(buf, 56),
    );
    let want = (
        summary.shard_id,
        summary.sequence,
        summary.base_lsn,
        summary.end_lsn,
        summary.commits,
        summary.end_offset,
        summary.commits_crc,
    );
    (identity != want).then(|| format!("{identity:?}, the segment is {want:?}"))
}

/// Name of the stream index file of the segment that starts at `base_lsn`.
pub(crate) fn stream_index_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.six")
}

/// One commit holding a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The commit's first lsn minus the segment's base lsn.
    pub lsn_delta: u32,
    /// The commit's offset in the segment.
    pub offset: u32,
    /// The commit's bytes, header included: a read fetches exactly the commits it needs.
    pub len: u32,
}

/// Where a stream's chain of entries starts and ends in an [`OpenIndex`].
#[derive(Debug, Clone, Copy)]
struct Chain {
    first: u32,
    last: u32,
    count: u32,
}

/// No next entry in a chain.
const CHAIN_END: u32 = u32::MAX;

/// The index of a segment still being written: entries in commit order, chained per stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct OpenIndex {
    /// Hashed with foldhash rather than std's SipHash: the committer looks up every stream of
    /// every commit (this index was 4 % of the daemon's CPU at 1 KiB records, c=256 P=16). Stream
    /// ids are the clients' choice; foldhash's per-process random seed keeps them from
    /// precomputing colliding ids (it does not claim to resist an attacker who learns the seed
    /// by timing the daemon).
    chains: HashMap<u64, Chain, foldhash::fast::RandomState>,
    entries: Vec<Entry>,
    /// For each entry, the next entry of its stream ([`CHAIN_END`] for the last).
    next: Vec<u32>,
    /// Each key of `chains` with its first entry, in the order they came: sealing walks them a
    /// slice at a time ([`Sealer`]), which an iterator over the map, borrowed from the segment,
    /// cannot do across the yields in between; and without a lookup in the map per stream.
    order: Vec<(u64, u32)>,
}

/// The index of a sealed segment: streams ascending, each with its entries contiguous and
/// ascending in `entries`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SealedIndex {
    /// (stream, index of its first entry in `entries`), streams ascending.
    streams: Vec<(u64, u32)>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
pub(crate) enum StreamIndex {
    Open(OpenIndex),
    Sealed(SealedIndex),
}

impl StreamIndex {
    pub(crate) fn open() -> StreamIndex {
        StreamIndex::Open(OpenIndex::default())
    }

    /// Books the commit whose first lsn is `base_lsn + lsn_delta`, at `offset`, with records
    /// `body` (the commit's body, already framed and valid): recovery's way, from the bytes.
    pub(crate) fn note_commit(&mut self, lsn_delta: u64, offset: u64, body: &[u8]) {
        let commit_bytes = COMMIT_HEADER_BYTES + body.len();
        self.note_commit_streams(
            lsn_delta,
            offset,
            commit_bytes,
            body_runs(body).map(|(stream, ..)| stream),
        );
    }

    /// Books the commit whose first lsn is `base_lsn + lsn_delta`, at `offset`, of
    /// `commit_bytes`, whose records belong to `streams`, in record order (repeats allowed):
    /// the committer's way, from the streams it noted as the appends joined the commit, since
    /// by the time the commit is sealed most of its record headers have left the cache (reading
    /// them back was 3 % of the daemon's CPU at 1 KiB records).
    pub(crate) fn note_commit_streams(
        &mut self,
        lsn_delta: u64,
        offset: u64,
        commit_bytes: usize,
        streams: impl IntoIterator<Item = u64>,
    ) {
        let StreamIndex::Open(open) = self else {
            panic!("a sealed segment's index takes no more commits");
        };
        let lsn_delta = u32::try_from(lsn_delta).expect("a segment with an index holds fewer than 2^32 records");
        let offset = u32::try_from(offset).expect("a segment with an index is smaller than 4 GiB");
        let commit_len = u32::try_from(commit_bytes).expect("commit_bytes_max fits in 32 bits");
        let mut previous = None;
        for stream in streams {
            // Appends put runs of one stream in a commit: look it up once per run.
            if previous == Some(stream) {
                continue;
            }
            previous = Some(stream);
            open.push(
                stream,
                Entry {
                    lsn_delta,
                    offset,
                    len: commit_len,
                },
            );
        }
    }

    /// Makes the index of a sealed segment out of an open one (no-op when already sealed), in one
    /// go: the shard seals a segment's index in steps instead ([`seal_in_steps`]).
    #[cfg(test)]
    pub(crate) fn seal(&mut self) {
        if let StreamIndex::Open(open) = self {
            *self = StreamIndex::Sealed(open.to_sealed());
        }
    }

    /// The open form, to take more commits (recovery resumes an active segment from a sealed
    /// form read from its checkpoint's index file).
    pub(crate) fn reopen(&mut self) {
        if let StreamIndex::Sealed(sealed) = self {
            *self = StreamIndex::Open(sealed.to_open());
        }
    }

    /// The sealed form, to encode it (an open index is sealed into a copy).
    pub(crate) fn with_sealed<R>(&self, f: impl FnOnce(&SealedIndex) -> R) -> R {
        match self {
            StreamIndex::Open(open) => f(&open.to_sealed()),
            StreamIndex::Sealed(sealed) => f(sealed),
        }
    }

    #[cfg(test)]
    fn sealed(&self) -> SealedIndex {
        self.with_sealed(SealedIndex::clone)
    }

    /// Up to `max` commits holding `stream`, ascending, from the one that may hold `from_delta`
    /// (the last starting at or before it) on, and before `to_delta`.
    pub(crate) fn commits_of(&self, stream: u64, from_delta: u64, to_delta: u64, max: usize, out: &mut Vec<Entry>) {
        out.clear();
        let keep = |e: &Entry| u64::from(e.lsn_delta) < to_delta;
        match self {
            StreamIndex::Sealed(sealed) => {
                let entries = sealed.entries_of(stream);
                let i = entries.partition_point(|e| u64::from(e.lsn_delta) <= from_delta);
                out.extend(entries[i.saturating_sub(1)..].iter().take_while(|e| keep(e)).take(max));
            }
            StreamIndex::Open(open) => {
                let Some(chain) = open.chains.get(&stream) else {
                    return;
                };
                // The chain is walked from its start: the active segment's index is the only
                // open one a read meets, and a stream's commits in one segment are few enough.
                let mut i = chain.first;
                let mut before: Option<Entry> = None;
                while i != CHAIN_END && out.len() < max {
                    let e = open.entries[i as usize];
                    if !keep(&e) {
                        break;
                    }
                    if u64::from(e.lsn_delta) <= from_delta {
                        before = Some(e);
                    } else {
                        if out.is_empty() {
                            out.extend(before.take());
                        }
                        if out.len() < max {
                            out.push(e);
                        }
                    }
                    i = open.next[i as usize];
                }
                if out.is_empty() {
                    out.extend(before);
                }
            }
        }
    }

    /// Heap bytes the index holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        match self {
            StreamIndex::Open(open) => {
                // A hashbrown slot per bucket plus one control byte.
                open.chains.capacity() * (std::mem::size_of::<(u64, Chain)>() + 1)
                    + open.entries.capacity() * std::mem::size_of::<Entry>()
                    + open.next.capacity() * std::mem::size_of::<u32>()
                    + open.order.capacity() * std::mem::size_of::<(u64, u32)>()
            }
            StreamIndex::Sealed(sealed) => {
                sealed.streams.capacity() * std::mem::size_of::<(u64, u32)>()
                    + sealed.entries.capacity() * std::mem::size_of::<Entry>()
            }
        }
    }
}

impl OpenIndex {
    fn push(&mut self, stream: u64, entry: Entry) {
        let index = u32::try_from(self.entries.len()).expect("fewer entries than records");
        assert!(index != CHAIN_END);
        // One hash per lookup, found or not.
        match self.chains.entry(stream) {
            MapEntry::Occupied(mut found) => {
                let chain = found.get_mut();
                let last = self.entries[chain.last as usize];
                if last.offset == entry.offset {
                    // The stream already has a run earlier in this commit.
                    return;
                }
                assert!(last.offset + last.len <= entry.offset && last.lsn_delta < entry.lsn_delta);
                self.next[chain.last as usize] = index;
                chain.last = index;
                chain.count += 1;
            }
            MapEntry::Vacant(new) => {
                new.insert(Chain {
                    first: index,
                    last: index,
                    count: 1,
                });
                self.order.push((stream, index));
            }
        }
        self.entries.push(entry);
        self.next.push(CHAIN_END);
    }

    /// The sealed form, in one go (see [`Sealer`] for the same in steps).
    fn to_sealed(&self) -> SealedIndex {
        let mut sealer = Sealer::new(self);
        let done = sealer.step(self, usize::MAX);
        assert!(done);
        sealer.finish(self)
    }
}

/// Work units (streams sorted or merged, entries copied) of one [`Sealer::step`] of the
/// background task: tens of microseconds even when every entry copied misses the cache (about
/// 50-90 ns each for an index of a million entries here), so that it can yield to the committer
/// in between.
const SEAL_STEP_WORK: usize = 1024;
/// Streams sorted in one step: [`Sealer`] sorts runs of this many, then merges the runs.
const SEAL_RUN_STREAMS: usize = 1024;

/// Builds the sealed form of an [`OpenIndex`] a bounded amount of work at a time, so that sealing
/// a large index (a 64 MiB segment of small records of many streams) does not hold the CPU from
/// the committer on the same executor for milliseconds. The result is the one
/// [`OpenIndex::to_sealed`] gives, which is this run to the end in one step:
///
/// 1. copy the streams with their first entries (in the order they came, [`OpenIndex::order`])
///    and sort them [`SEAL_RUN_STREAMS`] at a time;
/// 2. merge the sorted runs into one list (a heap of each run's next stream);
/// 3. stream by stream, copy its chain of entries into the sealed form, resuming part way
///    through a chain if need be. This walk is the bulk of the work, and bound by the latency
///    of loads that miss the cache: its loop is kept as tight as sealing's was in one go, so
///    that the processor can start on the next chain's loads while the last ones complete.
///
/// Between steps the open index must not change: a sealed segment takes no more commits.
#[derive(Debug)]
pub(crate) struct Sealer {
    /// The open index's entry count when sealing began, to check that it did not change.
    entries: usize,
    /// 1: the streams with their first entries, copied and sorted in runs of
    /// [`SEAL_RUN_STREAMS`].
    runs: Vec<(u64, u32)>,
    /// 2: set up once every run is sorted: each run's next stream as (stream, run), least first.
    heap: Option<BinaryHeap<Reverse<(u64, u32)>>>,
    /// Each run's next position in `runs`.
    run_next: Vec<u32>,
    /// The merged runs: every stream with its first entry, ascending.
    sorted: Vec<(u64, u32)>,
    /// 3: the next stream of `sorted` to copy the chain of.
    walk_next: usize,
    /// The chain being copied: its next entry in the open index ([`CHAIN_END`]: none).
    chain_at: u32,
    sealed: SealedIndex,
}

impl Sealer {
    pub(crate) fn new(open: &OpenIndex) -> Sealer {
        assert_eq!(open.order.len(), open.chains.len(), "each stream is in the order once");
        debug_assert!(open.order.iter().all(|(s, first)| open.chains[s].first == *first));
        Sealer {
            entries: open.entries.len(),
            runs: Vec::with_capacity(open.order.len()),
            heap: None,
            run_next: Vec::new(),
            sorted: Vec::with_capacity(open.order.len()),
            walk_next: 0,
            chain_at: CHAIN_END,
            sealed: SealedIndex {
                streams: Vec::with_capacity(open.order.len()),
                entries: Vec::with_capacity(open.entries.len()),
            },
        }
    }

    /// Does about `work` units (at least one) of sealing `open`, the index [`Sealer::new`] was
    /// given. Returns whether the sealed form is complete.
    pub(crate) fn step(&mut self, open: &OpenIndex, work: usize) -> bool {
        assert!(work > 0, "a step makes progress");
        assert_eq!(
            open.entries.len(),
            self.entries,
            "a sealed segment's index takes no more commits"
        );
        let mut done = 0usize;
        // 1. Sort runs.
        while self.runs.len() < open.order.len() {
            if done >= work {
                return false;
            }
            let from = self.runs.len();
            let to = (from + SEAL_RUN_STREAMS).min(open.order.len());
            self.runs.extend_from_slice(&open.order[from..to]);
            // Streams are distinct: sorting the pairs sorts the streams.
            self.runs[from..].sort_unstable();
            done += to - from;
        }
        // 2. Merge them.
        let heap = self.heap.get_or_insert_with(|| {
            let run_count = self.runs.len().div_ceil(SEAL_RUN_STREAMS);
            self.run_next = (0..run_count).map(|r| (r * SEAL_RUN_STREAMS) as u32).collect();
            (0..run_count)
                .map(|r| Reverse((self.runs[r * SEAL_RUN_STREAMS].0, r as u32)))
                .collect()
        });
        while let Some(Reverse((stream, run))) = heap.pop() {
            let at = &mut self.run_next[run as usize];
            let (found, first) = self.runs[*at as usize];
            assert_eq!(found, stream);
            *at += 1;
            let run_end = ((run as usize + 1) * SEAL_RUN_STREAMS).min(self.runs.len());
            if (*at as usize) < run_end {
                heap.push(Reverse((self.runs[*at as usize].0, run)));
            }
            assert!(
                self.sorted.last().is_none_or(|&(prev, _)| prev < stream),
                "streams ascend"
            );
            self.sorted.push((stream, first));
            done += 1;
            if done >= work {
                return false;
            }
        }
        // 3. Copy each stream's chain. Locals, not fields, in this loop: it is the hot one.
        let (streams, entries) = (&mut self.sealed.streams, &mut self.sealed.entries);
        let (mut at, mut next) = (self.chain_at, self.walk_next);
        loop {
            while at != CHAIN_END && done < work {
                entries.push(open.entries[at as usize]);
                at = open.next[at as usize];
                done += 1;
            }
            if at != CHAIN_END || next == self.sorted.len() {
                break;
            }
            let (stream, first) = self.sorted[next];
            streams.push((stream, entries.len() as u32));
            (at, next) = (first, next + 1);
        }
        (self.chain_at, self.walk_next) = (at, next);
        at == CHAIN_END && next == self.sorted.len()
    }

    /// The sealed form, once [`Sealer::step`] said it is complete.
    pub(crate) fn finish(self, open: &OpenIndex) -> SealedIndex {
        assert!(self.heap.as_ref().is_some_and(BinaryHeap::is_empty));
        assert!(self.chain_at == CHAIN_END && self.walk_next == self.sorted.len());
        assert_eq!(self.sealed.streams.len(), open.chains.len());
        assert_eq!(self.sealed.entries.len(), open.entries.len());
        self.sealed
    }
}

/// Seals the open index in `cell` (a segment's, which takes no more commits) in steps of
/// [`SEAL_STEP_WORK`], letting the committer run in between once the background queue's
/// preemption timer says so; readers meanwhile use the open form. No-op when there is no index
/// or it is sealed already; gives up if it was replaced meanwhile (by a rebuilt or loaded sealed
/// one, which is as good).
pub(crate) async fn seal_in_steps(cell: &RefCell<Option<StreamIndex>>) {
    let mut sealer = match cell.borrow().as_ref() {
        Some(StreamIndex::Open(open)) => Sealer::new(open),
        _ => return,
    };
    loop {
        let done = {
            let index = cell.borrow();
            let Some(StreamIndex::Open(open)) = index.as_ref() else {
                return;
            };
            sealer.step(open, SEAL_STEP_WORK)
        };
        if done {
            break;
        }
        glommio::yield_if_needed().await;
    }
    let mut index = cell.borrow_mut();
    if let Some(StreamIndex::Open(open)) = index.as_ref() {
        let sealed = sealer.finish(open);
        *index = Some(StreamIndex::Sealed(sealed));
    }
}

impl SealedIndex {
    fn entries_of(&self, stream: u64) -> &[Entry] {
        let Ok(i) = self.streams.binary_search_by_key(&stream, |&(s, _)| s) else {
            return &[];
        };
        let from = self.streams[i].1 as usize;
        let to = self
            .streams
            .get(i + 1)
            .map_or(self.entries.len(), |&(_, at)| at as usize);
        &self.entries[from..to]
    }

    /// The open form of the same commits, in commit order.
    fn to_open(&self) -> OpenIndex {
        let mut all: Vec<(Entry, u64)> = Vec::with_capacity(self.entries.len());
        for (i, &(stream, _)) in self.streams.iter().enumerate() {
            let from = self.streams[i].1 as usize;
            let to = self
                .streams
                .get(i + 1)
                .map_or(self.entries.len(), |&(_, at)| at as usize);
            all.extend(self.entries[from..to].iter().map(|&e| (e, stream)));
        }
        // Commit order; within a commit, any order of its streams will do.
        all.sort_unstable_by_key(|&(e, stream)| (e.offset, stream));
        let mut open = OpenIndex::default();
        for (e, stream) in all {
            open.push(stream, e);
        }
        open
    }

    pub(crate) fn encoded_bytes(&self) -> usize {
        align_up(
            (STREAM_INDEX_FIXED_BYTES
                + self.streams.len() * STREAM_INDEX_STREAM_BYTES
                + self.entries.len() * STREAM_INDEX_ENTRY_BYTES) as u64,
        ) as usize
    }

    /// Encodes the index of the segment `summary` describes (see the module's format).
    pub(crate) fn encode(&self, summary: &SegmentSummary, out: &mut [u8]) {
        assert!(out.len() >= self.encoded_bytes());
        let (s, e) = (self.streams.len(), self.entries.len());
        out[..STREAM_INDEX_FIXED_BYTES].fill(0);
        out[0..8].copy_from_slice(&STREAM_INDEX_MAGIC);
        out[8..10].copy_from_slice(&STREAM_INDEX_VERSION.to_le_bytes());
        encode_identity(summary, out);
        out[12..16].copy_from_slice(&(s as u32).to_le_bytes());
        out[60..64].copy_from_slice(&(e as u32).to_le_bytes());
        let mut at = STREAM_INDEX_FIXED_BYTES;
        for (i, &(stream, from)) in self.streams.iter().enumerate() {
            let to = self.streams.get(i + 1).map_or(e as u32, |&(_, at)| at);
            out[at..at + 8].copy_from_slice(&stream.to_le_bytes());
            out[at + 8..at + 12].copy_from_slice(&(to - from).to_le_bytes());
            out[at + 12..at + 16].fill(0);
            at += STREAM_INDEX_STREAM_BYTES;
        }
        for entry in &self.entries {
            out[at..at + 4].copy_from_slice(&entry.lsn_delta.to_le_bytes());
            out[at + 4..at + 8].copy_from_slice(&entry.offset.to_le_bytes());
            out[at + 8..at + 12].copy_from_slice(&entry.len.to_le_bytes());
            at += STREAM_INDEX_ENTRY_BYTES;
        }
        out[at..self.encoded_bytes()].fill(0);
        let crc = index_crc(&out[..at]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes an index file and checks it against `summary`, the segment's accepted summary or
    /// checkpoint: `Err` says why it is not trusted. In one go; [`IndexDecoder`] does the same in
    /// steps.
    pub(crate) fn decode(buf: &[u8], summary: &SegmentSummary) -> Result<SealedIndex, String> {
        let mut decoder = IndexDecoder::new(buf, summary)?;
        let done = decoder.step(usize::MAX)?;
        assert!(done);
        Ok(decoder.finish())
    }
}

/// Work units (streams or entries decoded, [`DECODE_CRC_BYTES_PER_UNIT`] bytes checksummed) of
/// one [`IndexDecoder::step`] of the scrub: tens of microseconds.
const DECODE_STEP_WORK: usize = 4096;
/// Bytes checksummed per unit of a decoder's work, and in one piece.
const DECODE_CRC_BYTES_PER_UNIT: usize = 16;
const DECODE_CRC_CHUNK_BYTES: usize = 16 << 10;

/// Decodes an index file and checks it against a segment's summary a bounded amount of work at a
/// time ([`SealedIndex::decode`] is this in one step): the file of a 64 MiB segment of small
/// records of many streams takes milliseconds to check, which the scrub spreads over steps so
/// that the committer on the same executor runs in between. The checks, in order: the fixed
/// fields, the checksum, the segment's identity, the streams, the entries.
pub(crate) struct IndexDecoder<'a> {
    buf: &'a [u8],
    summary: &'a SegmentSummary,
    /// Stream count, entry count, and the end of the bytes the checksum covers.
    s: usize,
    e: usize,
    end: usize,
    /// The checksum so far, and the next byte it covers.
    crc: u32,
    crc_at: usize,
    /// The checksum, reserved bytes and segment identity passed.
    header_checked: bool,
    /// The entry count of the streams decoded so far.
    total: u64,
    /// Where the entries of the stream of the next entry end, and the index of the stream after
    /// it; the previous entry of that stream.
    stream_end: usize,
    stream_next: usize,
    prev: Option<Entry>,
    sealed: SealedIndex,
}

impl<'a> IndexDecoder<'a> {
    /// Checks the fixed fields that say how large the file is.
    pub(crate) fn new(buf: &'a [u8], summary: &'a SegmentSummary) -> Result<IndexDecoder<'a>, String> {
        if buf.len() < STREAM_INDEX_FIXED_BYTES {
            return Err(format!("stream index is {} bytes", buf.len()));
        }
        if buf[0..8] != STREAM_INDEX_MAGIC {
            return Err("bad stream index magic".into());
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != STREAM_INDEX_VERSION {
            return Err(format!(
                "stream index version {version}, this build reads {STREAM_INDEX_VERSION}"
            ));
        }
        let (s, e) = (u32_at(buf, 12) as usize, u32_at(buf, 60) as usize);
        let end = STREAM_INDEX_FIXED_BYTES as u64
            + s as u64 * STREAM_INDEX_STREAM_BYTES as u64
            + e as u64 * STREAM_INDEX_ENTRY_BYTES as u64;
        if end > buf.len() as u64 {
            return Err(format!(
                "stream index of {s} streams and {e} entries does not fit in {} bytes",
                buf.len()
            ));
        }
        Ok(IndexDecoder {
            buf,
            summary,
            s,
            e,
            end: end as usize,
            crc: crc32c::crc32c(&buf[..64]),
            crc_at: STREAM_INDEX_FIXED_BYTES,
            header_checked: false,
            total: 0,
            stream_end: 0,
            stream_next: 0,
            prev: None,
            sealed: SealedIndex::default(),
        })
    }

    /// Does about `work` units (at least one) of decoding. Returns whether the file is decoded
    /// and every check passed; `Err` says why it is not trusted.
    pub(crate) fn step(&mut self, work: usize) -> Result<bool, String> {
        assert!(work > 0, "a step makes progress");
        let buf = self.buf;
        let mut done = 0usize;
        // 1. The checksum.
        while self.crc_at < self.end {
            if done >= work {
                return Ok(false);
            }
            let to = (self.crc_at + DECODE_CRC_CHUNK_BYTES).min(self.end);
            self.crc = crc32c::crc32c_append(self.crc, &buf[self.crc_at..to]);
            done += (to - self.crc_at).div_ceil(DECODE_CRC_BYTES_PER_UNIT);
            self.crc_at = to;
        }
        if !self.header_checked {
            self.check_header()?;
            self.header_checked = true;
        }
        // 2. The streams.
        while self.sealed.streams.len() < self.s {
            if done >= work {
                return Ok(false);
            }
            let at = STREAM_INDEX_FIXED_BYTES + self.sealed.streams.len() * STREAM_INDEX_STREAM_BYTES;
            let stream = u64_at(buf, at);
            let count = u32_at(buf, at + 8);
            if self.sealed.streams.last().is_some_and(|&(prev, _)| prev >= stream) || count == 0 {
                return Err(format!("stream index entry for stream {stream} out of place"));
            }
            self.sealed.streams.push((stream, self.total as u32));
            self.total += u64::from(count);
            done += 1;
            if self.sealed.streams.len() == self.s && self.total != self.e as u64 {
                return Err(format!(
                    "stream index streams hold {} entries, header says {}",
                    self.total, self.e
                ));
            }
        }
        if self.s == 0 && self.e != 0 {
            return Err(format!("stream index streams hold 0 entries, header says {}", self.e));
        }
        // 3. The entries, each stream's ascending and all inside the segment.
        let records = self.summary.end_lsn - self.summary.base_lsn;
        let end_offset = self.summary.end_offset;
        let entries_at = STREAM_INDEX_FIXED_BYTES + self.s * STREAM_INDEX_STREAM_BYTES;
        let (streams, entries) = (&self.sealed.streams, &mut self.sealed.entries);
        let (mut stream_end, mut stream_next, mut prev) = (self.stream_end, self.stream_next, self.prev);
        let decoded = loop {
            let k = entries.len();
            if k == self.e {
                break Ok(true);
            }
            if done >= work {
                break Ok(false);
            }
            if k == stream_end {
                // The first entry of the next stream.
                stream_next += 1;
                stream_end = streams.get(stream_next).map_or(self.e, |&(_, from)| from as usize);
                prev = None;
            }
            let at = entries_at + k * STREAM_INDEX_ENTRY_BYTES;
            let entry = Entry {
                lsn_delta: u32_at(buf, at),
                offset: u32_at(buf, at + 4),
                len: u32_at(buf, at + 8),
            };
            let inside = u64::from(entry.lsn_delta) < records
                && u64::from(entry.offset) >= SEGMENT_DATA_OFFSET
                && entry.len as usize >= COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES
                && u64::from(entry.offset) + u64::from(entry.len) <= end_offset;
            let ascending = prev.is_none_or(|p| {
                p.lsn_delta < entry.lsn_delta && u64::from(p.offset) + u64::from(p.len) <= u64::from(entry.offset)
            });
            if !inside || !ascending {
                break Err(format!("stream index entry {entry:?} out of place"));
            }
            entries.push(entry);
            prev = Some(entry);
            done += 1;
        };
        (self.stream_end, self.stream_next, self.prev) = (stream_end, stream_next, prev);
        decoded
    }

    /// The checksum, the reserved bytes, and the segment the file describes.
    fn check_header(&mut self) -> Result<(), String> {
        let buf = self.buf;
        if self.crc != u32_at(buf, 64) {
            return Err("stream index checksum mismatch".into());
        }
        if u32_at(buf, 68) != 0 {
            return Err("stream index reserved bytes are not zero".into());
        }
        if let Some(mismatch) = identity_mismatch(buf, self.summary) {
            return Err(format!("stream index describes {mismatch}"));
        }
        // Trusted sizes from here on: the checksum holds.
        self.sealed = SealedIndex {
            streams: Vec::with_capacity(self.s),
            entries: Vec::with_capacity(self.e),
        };
        Ok(())
    }

    /// The decoded index, once [`IndexDecoder::step`] said it is complete.
    pub(crate) fn finish(self) -> SealedIndex {
        assert!(self.header_checked);
        assert_eq!((self.sealed.streams.len(), self.sealed.entries.len()), (self.s, self.e));
        self.sealed
    }
}

/// Checks an index file against a segment's summary in steps of [`DECODE_STEP_WORK`], letting
/// the committer run in between once the background queue's preemption timer says so: `Err`
/// says why it is not trusted.
pub(crate) async fn check_in_steps(buf: &[u8], summary: &SegmentSummary) -> Result<(), String> {
    let mut decoder = IndexDecoder::new(buf, summary)?;
    while !decoder.step(DECODE_STEP_WORK)? {
        glommio::yield_if_needed().await;
    }
    Ok(())
}

/// A filtered read looks up this many of its stream's commits at a time.
const COMMITS_PER_LOOKUP: usize = 64;

/// Where a read stands, shared by its segments: the batch so far, the next lsn to look at, its
/// payload bytes, the commit bytes it has parsed, and what it holds in its [`ReadMemory`].
pub(crate) struct ReadProgress<'a> {
    pub batch: &'a mut ReadBatch,
    pub cursor: &'a mut u64,
    pub bytes: &'a mut usize,
    pub scanned: &'a mut usize,
    pub held: &'a mut usize,
    pub max_bytes: usize,
    pub scan_max: usize,
    pub memory: &'a mut ReadMemory,
}

impl ReadProgress<'_> {
    /// Adds the record at `lsn` to the batch, or says the batch is full (`false`): its payloads
    /// would pass `max_bytes`, or there is no room for the record's answer on top of what the
    /// batch holds and `also_held`, what the caller holds besides (the chunk being parsed: the
    /// batch's charge covers its response, `read_pool`). The first record is always taken: the
    /// caller holds what it was read into, or took room for it.
    pub(crate) fn take(&mut self, lsn: u64, record: format::RecordView<'_>, also_held: usize) -> bool {
        let charge = READ_RECORD_OVERHEAD_BYTES + record.payload.len();
        if !self.batch.records.is_empty()
            && (*self.bytes + record.payload.len() > self.max_bytes
                || !self.memory.try_grow_to(*self.held + charge + also_held))
        {
            return false;
        }
        *self.bytes += record.payload.len();
        *self.held += charge;
        self.batch.records.push(ReadRecord {
            lsn: Lsn(lsn),
            stream: record.stream,
            timestamp: record.timestamp,
            payload: record.payload.to_vec(),
        });
        true
    }
}

/// A filtered read using a segment's stream index: while it lives the index is not dropped
/// ([`Inner::bound_stream_indexes`]), and it marks the index as the most recently used.
pub(crate) struct IndexInUse<'a> {
    seg: &'a Segment,
}

impl<'a> IndexInUse<'a> {
    pub(crate) fn new(inner: &Inner, seg: &'a Segment) -> IndexInUse<'a> {
        let tick = inner.index_clock.get() + 1;
        inner.index_clock.set(tick);
        seg.streams_used.set(tick);
        seg.streams_readers.set(seg.streams_readers.get() + 1);
        IndexInUse { seg }
    }
}

impl Drop for IndexInUse<'_> {
    fn drop(&mut self) {
        self.seg.streams_readers.set(self.seg.streams_readers.get() - 1);
    }
}

/// Why a filtered read of one segment returned.
pub(crate) enum SegmentRead {
    /// Every lsn of the segment below the limit was looked at: go on with the next segment.
    Next,
    /// The batch is full, the scan bound is reached, or there is no room for more.
    Done,
}

impl Inner {
    /// Loads the stream index of a sealed segment from its `.six` file, which recovery left on
    /// disk, if it is valid and describes the segment's summary; otherwise filtered reads scan the
    /// segment until the background task has rebuilt its index ([`Inner::rebuild_stream_index`]).
    /// Tried once per segment. The read holding `held` of `memory` (and no records if `empty`)
    /// is charged for the file while it is read and decoded; `false` if it holds records and
    /// there is no room now (it answers with them, and the next read loads the index).
    pub(crate) async fn load_stream_index(
        &self,
        seg: &Segment,
        memory: &mut ReadMemory,
        held: usize,
        empty: bool,
    ) -> bool {
        if !seg.streams_on_disk.replace(false) {
            return true;
        }
        let name = stream_index_name(seg.base_lsn);
        let summary = seg.summary(self.opts.shard_id);
        let read = async {
            let file = self.storage.open(&name, false, self.opts.durability).await?;
            let read = async {
                let size = align_down(file.size().await?) as usize;
                // The file is read into the read's memory (twice while the storage seam copies
                // it out of its DMA buffer) until it is decoded: a read holding records answers
                // with them rather than wait for room.
                let need = held + 2 * size;
                if !memory.try_grow_to(need) {
                    if !empty {
                        return Ok(None);
                    }
                    memory.shrink_to(0);
                    memory.acquire(need).await;
                }
                file.read(0, size).await.map(Some)
            }
            .await;
            let _ = file.close().await;
            read
        };
        let read = read.await;
        if matches!(read, Ok(None)) {
            seg.streams_on_disk.set(true);
            return false;
        }
        let loaded = match read {
            Ok(data) => SealedIndex::decode(&data.expect("checked above"), &summary),
            Err(e) => Err(e.to_string()),
        };
        memory.shrink_to(held);
        match loaded {
            Ok(index) if !seg.retired.get() => {
                *seg.streams.borrow_mut() = Some(StreamIndex::Sealed(index));
                seg.streams_persisted.set(true);
                self.bound_stream_indexes(Some(seg));
            }
            Ok(_) => {}
            Err(reason) => {
                tracing::warn!(shard = self.opts.shard_id, %name, %reason, "no trusted stream index; rebuilding it");
                seg.streams_rebuild.set(true);
                self.bg_wake.notify();
            }
        }
        true
    }

    /// Drops loaded indexes of sealed segments, least recently read first, while they take more
    /// than `stream_index_memory_bytes` together. Only an index whose file is durable and that no
    /// read is using goes, never `keep`'s; the segment's next filtered read loads it again. So the
    /// indexes that clients' reads loaded, and those the committer built for segments sealed
    /// since, hold at most the bound (plus what reads are using) however long the log grows.
    pub(crate) fn bound_stream_indexes(&self, keep: Option<&Segment>) {
        let st = self.st.borrow();
        let active = st.segs.active.as_ref().map(|a| Rc::as_ptr(&a.seg));
        let sealed = || st.segs.iter().filter(|s| Some(Rc::as_ptr(s)) != active);
        let mut total: usize = sealed().map(|s| s.stream_index_bytes()).sum();
        let budget = self.opts.stream_index_memory_bytes;
        if total <= budget {
            return;
        }
        // An index goes with its segment's runs table (whose file is on disk once loaded).
        let index_droppable = |s: &Segment| s.streams_persisted.get() || s.streams.borrow().is_none();
        let mut droppable: Vec<&Rc<Segment>> = sealed()
            .filter(|s| index_droppable(s) && s.streams_readers.get() == 0 && s.stream_index_bytes() > 0)
            .filter(|s| keep.is_none_or(|k| !std::ptr::eq(Rc::as_ptr(s), k)))
            .collect();
        droppable.sort_by_key(|s| s.streams_used.get());
        for seg in droppable {
            if total <= budget {
                break;
            }
            total -= seg.stream_index_bytes();
            if seg.streams.borrow_mut().take().is_some() {
                seg.streams_persisted.set(false);
                seg.streams_on_disk.set(true);
            }
            if seg.runs.borrow_mut().take().is_some() {
                seg.runs_state.set(crate::stream_runs::RunsState::OnDisk);
            }
        }
    }

    /// Rebuilds the stream index of a sealed segment by reading it, [`REBUILD_CHUNK_BYTES`] at a
    /// time, and installs it (open) if the segment's commits agree with its summary (end lsn, end
    /// offset, commit count, commits checksum); `Ok(None)` if they do not (the scrub reports
    /// that), or if the segment was retired meanwhile. Returns the summary the index describes.
    pub(crate) async fn rebuild_stream_index(&self, seg: &Segment) -> std::io::Result<Option<SegmentSummary>> {
        let summary = seg.summary(self.opts.shard_id);
        let mut index = StreamIndex::open();
        // Not stopped by a close: a rebuild runs to the segment's end.
        let stop = std::cell::Cell::new(false);
        let mut walk = Walk::whole(seg, &stop, &summary);
        loop {
            match walk.next().await {
                Ok(Some(w)) => index.note_commit(w.first_lsn - seg.base_lsn, w.offset, walk.body(&w)),
                Ok(None) if !seg.retired.get() => break,
                Ok(None) => return Ok(None),
                // The segment disagrees with its summary, or was retired.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        // Open: the caller seals it in steps as it writes the file (`write_stream_index`), and
        // reads meanwhile use the open form.
        *seg.streams.borrow_mut() = Some(index);
        Ok(Some(summary))
    }

    /// The part of a read filtered to `stream` that falls in `seg`, which has a stream index:
    /// only the commits holding the stream are read (neighbours close together in one I/O, up
    /// to [`READS_AHEAD`] I/Os in flight), and the cursor skips the commits in between. Reads
    /// lsns below `limit_lsn` (the durable end); `truncated` makes the error of a segment that
    /// retention removed under the read.
    pub(crate) async fn read_indexed(
        &self,
        seg: &Segment,
        stream: u64,
        limit_lsn: u64,
        p: &mut ReadProgress<'_>,
        truncated: &dyn Fn() -> ShardError,
    ) -> Result<SegmentRead, ShardError> {
        let mut targets = Vec::with_capacity(COMMITS_PER_LOOKUP);
        let mut reads = Reads::default();
        loop {
            {
                let streams = seg.streams.borrow();
                let index = streams.as_ref().expect("checked by the caller");
                let from = p.cursor.saturating_sub(seg.base_lsn);
                index.commits_of(stream, from, limit_lsn - seg.base_lsn, COMMITS_PER_LOOKUP, &mut targets);
            }
            reads.plan(&targets);
            let read = self
                .read_targets(seg, stream, limit_lsn, &targets, &mut reads, p, truncated)
                .await;
            // No read outlives the request: the ones still in flight are awaited (their buffers
            // are the storage's until then) and dropped.
            reads.drain().await;
            p.memory.shrink_to(*p.held);
            match read? {
                Some(done) => return Ok(done),
                None if targets.len() < COMMITS_PER_LOOKUP => {
                    // No more commits of the stream below the limit: every lsn below it was seen.
                    *p.cursor = (*p.cursor).max(limit_lsn);
                    return Ok(SegmentRead::Next);
                }
                None => {}
            }
        }
    }

    /// Reads the commits `targets` (planned in `reads`) and takes the stream's records from them.
    /// `Some` when the read is done, `None` when every target was read.
    #[allow(clippy::too_many_arguments)]
    async fn read_targets(
        &self,
        seg: &Segment,
        stream: u64,
        limit_lsn: u64,
        targets: &[Entry],
        reads: &mut Reads,
        p: &mut ReadProgress<'_>,
        truncated: &dyn Fn() -> ShardError,
    ) -> Result<Option<SegmentRead>, ShardError> {
        let corruption = |offset: u64, reason: String| ShardError::Corruption {
            shard: self.opts.shard_id,
            segment: seg.sequence,
            offset,
            reason,
        };
        let io_error = |e: std::io::Error| {
            if seg.retired.get() {
                return truncated();
            }
            ShardError::io("read segment", self.storage.path_of(&seg.name.borrow()), e)
        };
        // Segment bytes [data_from, data_from + data.len()): the read holding the current target.
        let mut data: Vec<u8> = Vec::new();
        let mut data_from = 0u64;
        for (k, target) in targets.iter().enumerate() {
            let offset = u64::from(target.offset);
            let len = u64::from(target.len);
            let first_lsn = seg.base_lsn + u64::from(target.lsn_delta);
            assert!(first_lsn < limit_lsn, "looked up below the limit");
            if offset < data_from || offset + len > data_from + data.len() as u64 {
                drop(std::mem::take(&mut data));
                // What the batch holds plus, twice (the storage seam copies each chunk out of
                // its DMA buffer), the reads in flight and the one about to be issued.
                while reads.can_issue() {
                    let need = *p.held + 2 * (reads.in_flight_bytes() + reads.next_len());
                    if !p.memory.try_grow_to(need) {
                        if reads.in_flight() > 0 {
                            break;
                        }
                        if !p.batch.records.is_empty() {
                            return Ok(Some(SegmentRead::Done));
                        }
                        p.memory.shrink_to(0);
                        p.memory.acquire(need).await;
                    }
                    reads.issue(seg);
                }
                let (from, chunk) = reads.next(k).await;
                data = chunk.map_err(io_error)?;
                data_from = from;
                p.memory.shrink_to(*p.held + 2 * reads.in_flight_bytes() + data.len());
                if offset + len > data_from + data.len() as u64 {
                    return Err(corruption(offset, "segment file ends before its durable end".into()));
                }
            }
            let pos = (offset - data_from) as usize;
            let view = match format::parse_commit(&data[pos..pos + len as usize], seg.sequence) {
                Ok(view) if view.first_lsn == first_lsn && view.total_bytes as u64 == len => view,
                _ if seg.retired.get() => return Err(truncated()),
                Ok(view) => {
                    return Err(corruption(
                        offset,
                        format!(
                            "the stream index says a commit of {len} bytes from lsn {first_lsn} is here, \
                             the commit here has {} bytes from lsn {}",
                            view.total_bytes, view.first_lsn
                        ),
                    ))
                }
                Err(e) => return Err(corruption(offset, format!("reading durable data: {e:?}"))),
            };
            // The commits in between hold none of the stream's records.
            *p.cursor = (*p.cursor).max(first_lsn);
            *p.scanned += view.total_bytes;
            for (i, record) in view.records().enumerate() {
                let lsn = view.first_lsn + i as u64;
                if lsn < *p.cursor {
                    continue;
                }
                if lsn >= limit_lsn {
                    return Ok(Some(SegmentRead::Done));
                }
                let record = record.expect("framing validated by parse_commit");
                // The chunk being parsed is held once only, the reads in flight twice.
                if record.stream == stream && !p.take(lsn, record, 2 * reads.in_flight_bytes() + data.len()) {
                    return Ok(Some(SegmentRead::Done));
                }
                *p.cursor = lsn + 1;
            }
            if *p.bytes >= p.max_bytes || *p.scanned >= p.scan_max {
                return Ok(Some(SegmentRead::Done));
            }
        }
        Ok(None)
    }
}

/// Reads in flight at once for a filtered read: each costs a device round trip, and the commits
/// of a rare stream are far apart, so one at a time would make a read latency-bound.
const READS_AHEAD: usize = 4;
/// Two commits of the stream whose gap is at most this are fetched in one read: reading the gap
/// costs less than another round trip.
const READ_GAP_BYTES: u64 = 64 << 10;

/// A segment read under way.
type ReadTask = glommio::task::JoinHandle<std::io::Result<Vec<u8>>>;

/// The I/Os of a filtered read of one segment: each covers one or more consecutive target commits
/// (block aligned, at most [`READ_CHUNK_BYTES`] unless one commit is larger).
#[derive(Default)]
struct Reads {
    /// (from, to, index of the first target after it), in target order.
    planned: Vec<(u64, u64, usize)>,
    issued: usize,
    in_flight: VecDeque<(u64, u64, ReadTask)>,
}

impl Reads {
    fn plan(&mut self, targets: &[Entry]) {
        assert!(self.in_flight.is_empty());
        self.planned.clear();
        self.issued = 0;
        for (k, t) in targets.iter().enumerate() {
            let from = align_down(u64::from(t.offset));
            let to = align_up(u64::from(t.offset) + u64::from(t.len));
            if let Some(last) = self.planned.last_mut() {
                if from <= last.1 + READ_GAP_BYTES && to - last.0 <= READ_CHUNK_BYTES {
                    last.1 = last.1.max(to);
                    last.2 = k + 1;
                    continue;
                }
            }
            self.planned.push((from, to, k + 1));
        }
    }

    fn can_issue(&self) -> bool {
        self.issued < self.planned.len() && self.in_flight.len() < READS_AHEAD
    }

    fn next_len(&self) -> usize {
        let (from, to, _) = self.planned[self.issued];
        (to - from) as usize
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn in_flight_bytes(&self) -> usize {
        self.in_flight.iter().map(|&(from, to, _)| (to - from) as usize).sum()
    }

    fn issue(&mut self, seg: &Segment) {
        let (from, to, _) = self.planned[self.issued];
        self.issued += 1;
        // A task per read, so that they are all submitted before the first is awaited.
        let read = glommio::spawn_local(seg.file.read(from, (to - from) as usize)).detach();
        self.in_flight.push_back((from, to, read));
    }

    /// The read that holds target `k`: the oldest in flight (reads are consumed in order).
    async fn next(&mut self, k: usize) -> (u64, std::io::Result<Vec<u8>>) {
        let (from, _, read) = self.in_flight.pop_front().expect("the read of the target was issued");
        let i = self.issued - self.in_flight.len() - 1;
        assert!(
            k < self.planned[i].2 && (i == 0 || k >= self.planned[i - 1].2),
            "reads are consumed in order"
        );
        let data = read.await.expect("a read task is never cancelled");
        (from, data)
    }

    async fn drain(&mut self) {
        while let Some((_, _, read)) = self.in_flight.pop_front() {
            let _ = read.await;
        }
    }
}

/// The checksum of a stream index or runs file: its first 64 bytes, then all after its 72-byte
/// fixed part (bytes 64..72 hold the checksum and reserved zeros).
pub(crate) fn index_crc(encoded: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&encoded[..64]);
    crc32c::crc32c_append(crc, &encoded[STREAM_INDEX_FIXED_BYTES..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_record;

    fn body(streams: &[u64]) -> Vec<u8> {
        let mut b = Vec::new();
        for &s in streams {
            encode_record(&mut b, s, None, &[s as u8; 5]);
        }
        b
    }

    /// Commits (offset, lsn delta, streams of their records) of a small segment.
    fn index() -> StreamIndex {
        let mut index = StreamIndex::open();
        let commits: [(u64, u64, &[u64]); 4] = [
            (4096, 0, &[7, 7, 9]),
            (4215, 3, &[9]),
            (4300, 4, &[7, 9, 7]),
            (5000, 7, &[11]),
        ];
        for (offset, lsn, streams) in commits {
            index.note_commit(lsn, offset, &body(streams));
        }
        index
    }

    fn summary() -> SegmentSummary {
        SegmentSummary {
            shard_id: 2,
            sequence: 5,
            base_lsn: 100,
            end_lsn: 108,
            commits: 4,
            end_offset: 5200,
            commits_crc: 0xfeed,
            index: vec![(100, 4096)],
        }
    }

    fn deltas(index: &StreamIndex, stream: u64, from: u64, to: u64, max: usize) -> Vec<u32> {
        let mut out = Vec::new();
        index.commits_of(stream, from, to, max, &mut out);
        out.iter().map(|e| e.lsn_delta).collect()
    }

    #[test]
    fn open_and_sealed_forms_answer_alike() {
        let open = index();
        let mut sealed = open.clone();
        sealed.seal();
        let mut reopened = sealed.clone();
        reopened.reopen();
        for form in [&open, &sealed, &reopened] {
            assert_eq!(deltas(form, 7, 0, 8, 10), vec![0, 4]);
            assert_eq!(deltas(form, 9, 0, 8, 10), vec![0, 3, 4]);
            // From lsn delta 2 the commit at 0 may still hold it.
            assert_eq!(deltas(form, 9, 2, 8, 10), vec![0, 3, 4]);
            assert_eq!(deltas(form, 9, 3, 8, 10), vec![3, 4]);
            assert_eq!(deltas(form, 9, 3, 4, 10), vec![3]);
            assert_eq!(deltas(form, 9, 0, 8, 2), vec![0, 3]);
            assert_eq!(deltas(form, 11, 0, 8, 10), vec![7]);
            assert!(deltas(form, 12, 0, 8, 10).is_empty());
            assert!(form.memory_bytes() > 0);
        }
        assert_eq!(open.sealed(), reopened.sealed());
    }

    #[test]
    fn close_commits_share_a_read_and_far_ones_do_not() {
        let entry = |offset: u32, len: u32| Entry {
            lsn_delta: offset,
            offset,
            len,
        };
        let mut reads = Reads::default();
        let chunk = READ_CHUNK_BYTES as u32;
        reads.plan(&[
            entry(4096, 100),
            // In the same block, and a gap below READ_GAP_BYTES: one read.
            entry(4196, 100),
            entry(40_000, 5000),
            // Too far behind the previous one: a read of its own.
            entry(40_000 + 5000 + READ_GAP_BYTES as u32 + 8192, 100),
            // Close, but the read would exceed READ_CHUNK_BYTES: a read of its own.
            entry(40_000 + 5000 + READ_GAP_BYTES as u32 + 8192 + 200, chunk),
        ]);
        let planned: Vec<(u64, u64, usize)> = reads.planned.clone();
        assert_eq!(planned.len(), 3, "{planned:?}");
        assert_eq!(planned[0], (4096, align_up(45_000), 3));
        assert_eq!(planned[1].2, 4);
        assert_eq!(planned[2].2, 5);
        assert!(
            planned[2].1 - planned[2].0 >= READ_CHUNK_BYTES,
            "a large commit is read whole"
        );
        for &(from, to, _) in &planned {
            assert!(from % 4096 == 0 && to % 4096 == 0, "reads are block aligned");
        }
    }

    /// An open index of `commits` commits, each holding `per_commit` distinct streams drawn
    /// from `streams` (a deterministic pseudo-random walk).
    fn large_open_index(commits: u32, per_commit: u32, streams: u64) -> StreamIndex {
        let mut index = StreamIndex::open();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut picked = Vec::with_capacity(per_commit as usize);
        for c in 0..u64::from(commits) {
            picked.clear();
            while picked.len() < per_commit as usize {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let stream = x % streams;
                if !picked.contains(&stream) {
                    picked.push(stream);
                }
            }
            let offset = SEGMENT_DATA_OFFSET + c * 256;
            index.note_commit_streams(c * u64::from(per_commit), offset, 256, picked.iter().copied());
        }
        index
    }

    /// The sealed form as it was built before sealing went in steps: streams sorted in one go,
    /// then each chain walked. [`Sealer`] must give exactly this.
    fn sealed_in_one_go(open: &OpenIndex) -> SealedIndex {
        let mut streams: Vec<(u64, Chain)> = open.chains.iter().map(|(&s, &c)| (s, c)).collect();
        streams.sort_unstable_by_key(|&(s, _)| s);
        let mut sealed = SealedIndex {
            streams: Vec::with_capacity(streams.len()),
            entries: Vec::with_capacity(open.entries.len()),
        };
        for (stream, chain) in streams {
            sealed.streams.push((stream, sealed.entries.len() as u32));
            let mut i = chain.first;
            while i != CHAIN_END {
                sealed.entries.push(open.entries[i as usize]);
                i = open.next[i as usize];
            }
        }
        sealed
    }

    fn open_of(index: &StreamIndex) -> &OpenIndex {
        match index {
            StreamIndex::Open(open) => open,
            StreamIndex::Sealed(_) => panic!("an open index"),
        }
    }

    /// Seals `open` in steps of `work`, returning the sealed form and the number of steps.
    fn seal_in_steps_of(open: &OpenIndex, work: usize) -> (SealedIndex, usize) {
        let mut sealer = Sealer::new(open);
        let mut steps = 1;
        while !sealer.step(open, work) {
            steps += 1;
        }
        (sealer.finish(open), steps)
    }

    #[test]
    fn sealing_in_steps_gives_the_one_go_form() {
        let cases = [
            (0, 1, 1),
            (1, 1, 1),
            (50, 3, 7),
            // More streams than a run, chains longer than a step.
            (3000, 4, 10_000),
            (2000, 5, 9),
        ];
        for (commits, per_commit, streams) in cases {
            let index = large_open_index(commits, per_commit, streams);
            let open = open_of(&index);
            let want = sealed_in_one_go(open);
            assert_eq!(open.to_sealed(), want, "{commits} commits, {streams} streams");
            for work in [1, 2, 3, 17, 4096, usize::MAX] {
                let (got, steps) = seal_in_steps_of(open, work);
                assert_eq!(got, want, "{commits} commits, {streams} streams, steps of {work}");
                let units = open.order.len() * 2 + open.entries.len();
                assert!(steps <= units / work + 2, "{steps} steps of {work} for {units} units");
            }
        }
        // The small index of the other tests, reopened from its sealed form (the order of its
        // streams is then the sealed one).
        let mut reopened = index();
        reopened.seal();
        let sealed = reopened.sealed();
        reopened.reopen();
        assert_eq!(seal_in_steps_of(open_of(&reopened), 1).0, sealed);
    }

    /// Decodes `buf` in steps of `work`.
    fn decode_in_steps_of(buf: &[u8], summary: &SegmentSummary, work: usize) -> Result<SealedIndex, String> {
        let mut decoder = IndexDecoder::new(buf, summary)?;
        while !decoder.step(work)? {}
        Ok(decoder.finish())
    }

    #[test]
    fn decoding_in_steps_gives_what_decoding_in_one_go_does() {
        let small = (index().sealed(), summary());
        let large = {
            let sealed = large_open_index(3000, 4, 1000).sealed();
            let summary = SegmentSummary {
                end_lsn: 100 + 3000 * 4,
                commits: 3000,
                end_offset: SEGMENT_DATA_OFFSET + 3000 * 256,
                ..summary()
            };
            (sealed, summary)
        };
        for (sealed, summary) in [small, large] {
            let mut buf = vec![0u8; sealed.encoded_bytes()];
            sealed.encode(&summary, &mut buf);
            let used = STREAM_INDEX_FIXED_BYTES
                + sealed.streams.len() * STREAM_INDEX_STREAM_BYTES
                + sealed.entries.len() * STREAM_INDEX_ENTRY_BYTES;
            let mut damaged = vec![buf.clone()];
            for byte in (0..used).step_by(used / 97 + 1) {
                let mut flipped = buf.clone();
                flipped[byte] ^= 0x08;
                damaged.push(flipped);
            }
            for work in [1, 2, 7, 4096] {
                assert_eq!(decode_in_steps_of(&buf, &summary, work), Ok(sealed.clone()));
                for bytes in &damaged {
                    assert_eq!(
                        decode_in_steps_of(bytes, &summary, work),
                        SealedIndex::decode(bytes, &summary),
                        "steps of {work}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_segment_index_is_sealed_in_steps_in_its_cell() {
        let index = large_open_index(3000, 4, 10_000);
        let want = sealed_in_one_go(open_of(&index));
        let got = glommio::LocalExecutor::default().run(async move {
            let cell = RefCell::new(Some(index));
            seal_in_steps(&cell).await;
            // Sealed already: nothing to do.
            seal_in_steps(&cell).await;
            cell.into_inner()
        });
        match got {
            Some(StreamIndex::Sealed(got)) => assert_eq!(got, want),
            other => panic!("sealed, not {other:?}"),
        }
    }

    /// Not a test: prints how long sealing holds the CPU, in one go (as before it went in steps)
    /// and per step (`cargo test -p shards --lib --release -- --ignored --nocapture
    /// sealing_time`).
    #[test]
    #[ignore]
    fn sealing_time() {
        use std::time::{Duration, Instant};
        fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
            v.sort();
            (v[0], v[v.len() / 2])
        }
        for (commits, per_commit, streams) in [(16_384, 4, 10_000), (262_144, 4, 100_000)] {
            let index = large_open_index(commits, per_commit, streams);
            let open = open_of(&index);
            let (mut one_go, mut whole, mut longest_step, mut encode, mut decode) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut longest_decode_step = Vec::new();
            let (mut step_count, mut decode_step_count) = (0, 0);
            for round in 0..8 {
                // Each measured with nothing else held, first and second in turn (the second
                // finds part of the open index in the cache).
                for k in 0..2 {
                    let started = Instant::now();
                    if (round + k) % 2 == 0 {
                        drop(open.to_sealed());
                        whole.push(started.elapsed());
                    } else {
                        drop(sealed_in_one_go(open));
                        one_go.push(started.elapsed());
                    }
                }
                let sealed = open.to_sealed();
                let reference = sealed_in_one_go(open);
                assert_eq!(sealed, reference);
                let mut sealer = Sealer::new(open);
                let mut longest = Duration::ZERO;
                step_count = 0;
                loop {
                    let started = Instant::now();
                    let done = sealer.step(open, SEAL_STEP_WORK);
                    longest = longest.max(started.elapsed());
                    step_count += 1;
                    if done {
                        break;
                    }
                }
                longest_step.push(longest);
                let s = SegmentSummary {
                    end_lsn: 100 + u64::from(commits * per_commit),
                    commits: u64::from(commits),
                    end_offset: SEGMENT_DATA_OFFSET + u64::from(commits) * 256,
                    ..summary()
                };
                let mut buf = vec![0u8; sealed.encoded_bytes()];
                let started = Instant::now();
                sealed.encode(&s, &mut buf);
                encode.push(started.elapsed());
                let started = Instant::now();
                let decoded = SealedIndex::decode(&buf, &s);
                decode.push(started.elapsed());
                assert_eq!(decoded.as_ref(), Ok(&sealed));
                let mut decoder = IndexDecoder::new(&buf, &s).expect("valid");
                let mut longest = Duration::ZERO;
                decode_step_count = 0;
                loop {
                    let started = Instant::now();
                    let done = decoder.step(DECODE_STEP_WORK).expect("valid");
                    longest = longest.max(started.elapsed());
                    decode_step_count += 1;
                    if done {
                        break;
                    }
                }
                longest_decode_step.push(longest);
            }
            println!(
                "{} entries, {streams} streams (min, median): one go {:?}, to_sealed {:?}, \
                 longest of {step_count} steps {:?}; encode {:?}; decode {:?}, longest of \
                 {decode_step_count} steps {:?}",
                commits * per_commit,
                median(one_go),
                median(whole),
                median(longest_step),
                median(encode),
                median(decode),
                median(longest_decode_step),
            );
        }
    }

    #[test]
    fn index_file_round_trips_and_rejects_flips_and_other_segments() {
        let sealed = index().sealed();
        let s = summary();
        let mut buf = vec![0u8; sealed.encoded_bytes()];
        sealed.encode(&s, &mut buf);
        assert_eq!(SealedIndex::decode(&buf, &s), Ok(sealed.clone()));
        let used = STREAM_INDEX_FIXED_BYTES + 3 * STREAM_INDEX_STREAM_BYTES + 6 * STREAM_INDEX_ENTRY_BYTES;
        assert!(used <= buf.len());
        for byte in 0..used {
            let mut flipped = buf.clone();
            flipped[byte] ^= 0x08;
            assert!(SealedIndex::decode(&flipped, &s).is_err(), "flip at {byte}");
        }
        let mut other = s.clone();
        other.commits_crc ^= 1;
        assert!(SealedIndex::decode(&buf, &other).is_err(), "another segment's index");
        assert!(SealedIndex::decode(&buf[..used - 1], &s).is_err(), "cut short");
    }
}
