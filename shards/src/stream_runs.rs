//! Stream runs: the records of a sealed segment's sparse streams, copied together by stream, so
//! that a read filtered to such a stream reads about the bytes the stream holds (issue #13).
//!
//! The stream index ([`crate::stream_index`]) takes a filtered read to the commits that hold its
//! stream, but a stream whose records arrive one at a time among other streams' has one record in
//! each of many commits: reading those commits is reading most of the segment, and reading just
//! the records where they lie is a random 4 KiB read per record. The only way to read such a
//! stream at the device's sequential rate is to have its records next to each other.
//!
//! So the records of such streams are copied next to each other, by a task of their own in the
//! background queue, in two steps:
//!
//! - **The tail.** As the committer hands each commit of the active segment to the device, it
//!   appends the groups of records of each stream that the index reads badly so far to that
//!   stream's *run* in memory ([`Tail`]), within `stream_tail_memory_bytes`: beyond it, the runs
//!   of the streams that the index reads best (the fewest commit bytes per byte of the stream)
//!   are dropped first. Filtered reads of the active segment take the durable part from there.
//! - **The runs file.** Once the segment is sealed and its summary durable, each stream whose run
//!   the tail still holds, that lies in at least [`RUNS_COMMITS_MIN`] commits, and for which a
//!   read through the index would fetch more than [`RUNS_AMPLIFICATION`] times its run's bytes
//!   and at least [`RUNS_SAVING_MIN_BYTES`] more (less in small segments), gets its run written contiguously into `<base_lsn:020>.runs`. A
//!   sealed segment without a tail (sealed before the shard was opened, or whose tail was given
//!   up) is walked twice instead: once to plan, once to copy as many runs as
//!   [`RUNS_SWEEP_MEMORY_BYTES`] of buffers allow, the worst-read streams first.
//!
//! Streams that batch their appends, or that fill most of the commits they are in, get no run:
//! the index already reads them at about their size. The cost is a read-back of the log and a
//! second write of the runs' records, in the background, at low priority, bounded per segment by
//! the tail's memory; `--stream-runs off` turns it off for a log nobody reads by stream.
//!
//! The segment stays the log: a runs file is a copy, checked against the segment's summary when
//! loaded and, commit by commit, by the same checksums as the segment's commits when read. A file
//! that is missing, torn, or fails a check is set aside: the read goes on through the index, and
//! the background task writes the file again. So a runs file can make a read faster, never wrong.
//!
//! ```text
//! <base_lsn:020>.runs, little-endian:
//!   [0, 8)    magic "SHLGRUN\x01"
//!   [8, 10)   version (1)
//!   [10, 12)  shard id
//!   [12, 16)  run count S
//!   [16, 24)  segment sequence
//!   [24, 32)  segment base lsn
//!   [32, 40)  end lsn (one past the segment's last lsn)
//!   [40, 48)  commit count of the segment
//!   [48, 56)  end offset of the segment
//!   [56, 60)  commits crc of the segment
//!   [60, 64)  mark count M
//!   [64, 68)  crc32c of bytes [0, 64) then [72, 72 + 40 S + 16 M)
//!   [68, 72)  zero
//!   S times:  stream u64, run offset u64, run bytes u64, record count u64, first mark u32,
//!             mark count u32 (streams strictly ascending; runs block aligned, ascending, after the
//!             table and not overlapping)
//!   M times:  lsn u64, offset u64 (per run, both strictly ascending, the first at the run's start;
//!             one about every RUNS_MARK_INTERVAL_BYTES of the run)
//!   zeros up to a whole block; then the runs, each from a block boundary: commits in the format
//!   of the segment's own (same sequence, lsns and checksums), each holding the records of one
//!   stream that were next to each other in one commit of the segment.
//! ```
//!
//! Bytes [16, 60) repeat the segment's summary, as in the `.six` file: a runs file is trusted only
//! for the segment it was made from. The table is written last, and the file is never synced: a
//! crash can leave it missing, without its table, or with runs that fail their checksums, and
//! each of those sends reads to the index and has the file made again.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

use crate::error::ShardError;
use crate::format::{
    self, align_down, align_up, chain_commit_crc, u32_at, u64_at, CommitView, ParseError, SegmentSummary, BLOCK_BYTES,
    COMMIT_HEADER_BYTES, RECORD_HEADER_BYTES, SEGMENT_DATA_OFFSET,
};
use crate::read_pool::READ_RECORD_OVERHEAD_BYTES;
use crate::segments::Segment;
use crate::shard::{chunk_bytes, Inner};
use crate::storage::{SegmentFile, Storage};
use crate::stream_index::{body_runs, encode_identity, identity_mismatch, index_crc, ReadProgress, SegmentRead};
use crate::Durability;

pub(crate) const RUNS_MAGIC: [u8; 8] = *b"SHLGRUN\x01";
pub(crate) const RUNS_VERSION: u16 = 1;
const RUNS_FIXED_BYTES: usize = 72;
/// stream 8 + offset 8 + bytes 8 + records 8 + first mark 4 + mark count 4.
const RUNS_RUN_BYTES: usize = 40;
/// lsn 8 + offset 8.
const RUNS_MARK_BYTES: usize = 16;
/// A stream gets a run when a read through the index would fetch more than this many times the
/// run's bytes: the most issue #13 allows a filtered read to cost against the stream's own bytes.
pub(crate) const RUNS_AMPLIFICATION: u64 = 2;
/// ... and at least this many bytes more (or a 64th of the segment, if less): below it the
/// index's read costs a few I/Os, and a run would cost a file region and a table entry for little.
pub(crate) const RUNS_SAVING_MIN_BYTES: u64 = 128 << 10;
/// ... and only if it lies in at least this many commits: a stream in fewer is read through the
/// index in about as few device round trips as a run would take (each commit's whole bytes, but
/// at the device's sequential rate), and its run would be a second write for little.
pub(crate) const RUNS_COMMITS_MIN: u64 = 4;
/// A mark about every this many bytes of a run (or a 64th of the segment, if less), so a read
/// that starts inside a long run starts near its first record.
const RUNS_MARK_INTERVAL_BYTES: u64 = 256 << 10;
/// The walks read the segment this much at a time.
const RUNS_WALK_CHUNK_BYTES: u64 = 1 << 20;
/// Each run being copied buffers up to this much before it is written.
const RUNS_BUFFER_BYTES: usize = 128 << 10;
/// A segment without a tail gets as many runs as one walk can copy with this much memory for
/// their buffers, the streams the index reads worst first.
const RUNS_SWEEP_MEMORY_BYTES: usize = 8 << 20;

/// Name of the runs file of the segment that starts at `base_lsn`.
pub(crate) fn stream_runs_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.runs")
}

/// Where a segment's runs stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunsState {
    /// None to make: the active segment, a segment without a stream index, runs turned off, or a
    /// segment the walk found disagreeing with its summary (the scrub reports that).
    None,
    /// Sealed with a durable summary and no runs file yet: the stream runs task makes it.
    Pending,
    /// Its runs file is on disk, not loaded: the next filtered read loads its table.
    OnDisk,
    /// A read is loading the table.
    Loading,
    /// The table is in [`Segment::runs`].
    Loaded,
}

/// One stream's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub stream: u64,
    /// Where it starts in the runs file (block aligned).
    pub offset: u64,
    /// Its bytes (commits, without the padding to the next block).
    pub bytes: u64,
    pub records: u64,
    first_mark: u32,
    marks: u32,
}

/// The table of a runs file: which streams have a run, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RunsTable {
    runs: Vec<Run>,
    /// (first lsn of a commit of the run, its offset), per run ascending.
    marks: Vec<(u64, u64)>,
}

/// A loaded runs table and the file it describes, open for reading.
pub(crate) struct LoadedRuns {
    pub table: RunsTable,
    pub file: Rc<dyn SegmentFile>,
}

impl RunsTable {
    pub(crate) fn run_of(&self, stream: u64) -> Option<Run> {
        let i = self.runs.binary_search_by_key(&stream, |r| r.stream).ok()?;
        Some(self.runs[i])
    }

    /// Places the runs (whose offsets, and their marks', are relative to the run) one after
    /// another from the block after the table, each from a block boundary.
    fn place(&mut self) {
        let mut next = self.data_offset();
        let mut m = 0;
        for run in &mut self.runs {
            run.offset = next;
            for mark in &mut self.marks[m..m + run.marks as usize] {
                mark.1 += next;
            }
            m += run.marks as usize;
            next = align_up(next + run.bytes);
        }
    }

    fn marks_of(&self, run: &Run) -> &[(u64, u64)] {
        &self.marks[run.first_mark as usize..(run.first_mark + run.marks) as usize]
    }

    /// Where a read of `run` from lsn `cursor` starts: the last mark at or before it.
    pub(crate) fn start_of(&self, run: &Run, cursor: u64) -> (u64, u64) {
        let marks = self.marks_of(run);
        let i = marks.partition_point(|&(lsn, _)| lsn <= cursor);
        marks[i.saturating_sub(1)]
    }

    fn table_bytes(&self) -> usize {
        RUNS_FIXED_BYTES + self.runs.len() * RUNS_RUN_BYTES + self.marks.len() * RUNS_MARK_BYTES
    }

    /// Where the first run starts: the block after the table.
    fn data_offset(&self) -> u64 {
        align_up(self.table_bytes() as u64)
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.runs.capacity() * std::mem::size_of::<Run>() + self.marks.capacity() * std::mem::size_of::<(u64, u64)>()
    }

    /// Encodes the table (header included) of the runs of the segment `summary` describes, into
    /// `out` of [`RunsTable::data_offset`] bytes.
    fn encode(&self, summary: &SegmentSummary, out: &mut [u8]) {
        assert_eq!(out.len() as u64, self.data_offset());
        out.fill(0);
        out[0..8].copy_from_slice(&RUNS_MAGIC);
        out[8..10].copy_from_slice(&RUNS_VERSION.to_le_bytes());
        encode_identity(summary, out);
        out[12..16].copy_from_slice(&(self.runs.len() as u32).to_le_bytes());
        out[60..64].copy_from_slice(&(self.marks.len() as u32).to_le_bytes());
        let mut at = RUNS_FIXED_BYTES;
        for run in &self.runs {
            out[at..at + 8].copy_from_slice(&run.stream.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&run.offset.to_le_bytes());
            out[at + 16..at + 24].copy_from_slice(&run.bytes.to_le_bytes());
            out[at + 24..at + 32].copy_from_slice(&run.records.to_le_bytes());
            out[at + 32..at + 36].copy_from_slice(&run.first_mark.to_le_bytes());
            out[at + 36..at + 40].copy_from_slice(&run.marks.to_le_bytes());
            at += RUNS_RUN_BYTES;
        }
        for &(lsn, offset) in &self.marks {
            out[at..at + 8].copy_from_slice(&lsn.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
            at += RUNS_MARK_BYTES;
        }
        let crc = index_crc(&out[..at]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
    }

    /// The bytes of the table of a runs file whose first block is `head`: how much to read to
    /// decode it.
    fn table_bytes_of(head: &[u8]) -> Result<u64, String> {
        if head.len() < RUNS_FIXED_BYTES || head[0..8] != RUNS_MAGIC {
            return Err("bad stream runs magic".into());
        }
        let (s, m) = (u64::from(u32_at(head, 12)), u64::from(u32_at(head, 60)));
        Ok(RUNS_FIXED_BYTES as u64 + s * RUNS_RUN_BYTES as u64 + m * RUNS_MARK_BYTES as u64)
    }

    /// Decodes a runs file's table and checks it against `summary`, the segment's accepted
    /// summary, and against `file_bytes`, the file's size: `Err` says why it is not trusted.
    fn decode(buf: &[u8], summary: &SegmentSummary, file_bytes: u64) -> Result<RunsTable, String> {
        let end = RunsTable::table_bytes_of(buf)?;
        if end > buf.len() as u64 {
            return Err(format!(
                "stream runs table of {end} bytes does not fit in {}",
                buf.len()
            ));
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != RUNS_VERSION {
            return Err(format!(
                "stream runs version {version}, this build reads {RUNS_VERSION}"
            ));
        }
        let end = end as usize;
        if index_crc(&buf[..end]) != u32_at(buf, 64) {
            return Err("stream runs checksum mismatch".into());
        }
        if u32_at(buf, 68) != 0 {
            return Err("stream runs reserved bytes are not zero".into());
        }
        if let Some(mismatch) = identity_mismatch(buf, summary) {
            return Err(format!("stream runs describe {mismatch}"));
        }
        let (s, m) = (u32_at(buf, 12) as usize, u32_at(buf, 60) as usize);
        let mut table = RunsTable {
            runs: Vec::with_capacity(s),
            marks: Vec::with_capacity(m),
        };
        let mut at = RUNS_FIXED_BYTES;
        let mut next_free = align_up(end as u64);
        let mut marks_total = 0u64;
        for _ in 0..s {
            let run = Run {
                stream: u64_at(buf, at),
                offset: u64_at(buf, at + 8),
                bytes: u64_at(buf, at + 16),
                records: u64_at(buf, at + 24),
                first_mark: u32_at(buf, at + 32),
                marks: u32_at(buf, at + 36),
            };
            let placed = run.offset % BLOCK_BYTES == 0
                && run.offset >= next_free
                && run.bytes >= (COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64
                && run.offset.checked_add(run.bytes).is_some_and(|e| e <= file_bytes)
                && run.records > 0
                && u64::from(run.first_mark) == marks_total
                && run.marks > 0;
            if !placed || table.runs.last().is_some_and(|p| p.stream >= run.stream) {
                return Err(format!("stream runs entry {run:?} out of place"));
            }
            next_free = align_up(run.offset + run.bytes);
            marks_total += u64::from(run.marks);
            table.runs.push(run);
            at += RUNS_RUN_BYTES;
        }
        if marks_total != m as u64 {
            return Err(format!("stream runs hold {marks_total} marks, header says {m}"));
        }
        for run in &table.runs {
            let mut prev: Option<(u64, u64)> = None;
            for k in 0..run.marks {
                let mark = (u64_at(buf, at), u64_at(buf, at + 8));
                let inside = mark.0 >= summary.base_lsn
                    && mark.0 < summary.end_lsn
                    && mark.1 >= run.offset
                    && mark.1 < run.offset + run.bytes
                    && (k > 0 || mark.1 == run.offset);
                let ascending = prev.is_none_or(|p| p.0 < mark.0 && p.1 < mark.1);
                if !inside || !ascending {
                    return Err(format!(
                        "stream runs mark {mark:?} of stream {} out of place",
                        run.stream
                    ));
                }
                table.marks.push(mark);
                prev = Some(mark);
                at += RUNS_MARK_BYTES;
            }
        }
        Ok(table)
    }
}

/// A walk over the commits of a segment, [`RUNS_WALK_CHUNK_BYTES`] at a time, from one commit
/// boundary to another, checking that the lsns follow on and (over a whole sealed segment) that
/// the commits agree with its summary.
pub(crate) struct Walk<'a> {
    seg: &'a Segment,
    /// The shard is closing: the walk stops (`Interrupted`).
    stop: &'a Cell<bool>,
    /// Where it ends: one past the last commit, and its lsn.
    end_offset: u64,
    end_lsn: u64,
    /// The commit count and checksum chain the walk must find at its end (a sealed segment's
    /// summary), if any.
    check: Option<(u64, u32)>,
    buf: Vec<u8>,
    /// Segment offset of `buf[0]`, where the next read starts (block aligned), and where it ends.
    buf_start: u64,
    read_at: u64,
    read_end: u64,
    /// The next commit's offset and first lsn; commits so far and their chained checksum (from
    /// the segment's start).
    offset: u64,
    lsn: u64,
    commits: u64,
    crc: u32,
}

/// The next commit of a [`Walk`]: where it is in the walk's buffer ([`Walk::body`]), its offset
/// in the segment, its first lsn and its bytes.
#[derive(Clone, Copy)]
pub(crate) struct Walked {
    at: usize,
    pub offset: u64,
    pub first_lsn: u64,
    pub total: usize,
}

/// Where a walk stands: the next commit's offset and first lsn, and the commits before it with
/// their chained checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalkPoint {
    pub offset: u64,
    pub lsn: u64,
    pub commits: u64,
    pub crc: u32,
}

impl WalkPoint {
    fn start(seg: &Segment) -> WalkPoint {
        WalkPoint {
            offset: SEGMENT_DATA_OFFSET,
            lsn: seg.base_lsn,
            commits: 0,
            crc: 0,
        }
    }

    fn matches(&self, summary: &SegmentSummary) -> bool {
        (self.offset, self.lsn, self.commits, self.crc)
            == (
                summary.end_offset,
                summary.end_lsn,
                summary.commits,
                summary.commits_crc,
            )
    }
}

impl<'a> Walk<'a> {
    /// All of a sealed segment, checked against its summary.
    pub(crate) fn whole(seg: &'a Segment, stop: &'a Cell<bool>, summary: &SegmentSummary) -> Walk<'a> {
        let mut walk = Walk::range(seg, stop, WalkPoint::start(seg), (summary.end_offset, summary.end_lsn));
        walk.check = Some((summary.commits, summary.commits_crc));
        walk
    }

    /// From `from` to the commit boundary `to` (offset, lsn), both durable.
    fn range(seg: &'a Segment, stop: &'a Cell<bool>, from: WalkPoint, to: (u64, u64)) -> Walk<'a> {
        let start = align_down(from.offset);
        Walk {
            seg,
            stop,
            end_offset: to.0,
            end_lsn: to.1,
            check: None,
            buf: Vec::new(),
            buf_start: start,
            read_at: start,
            read_end: align_up(to.0).min(seg.capacity),
            offset: from.offset,
            lsn: from.lsn,
            commits: from.commits,
            crc: from.crc,
        }
    }

    /// The next commit, or `None` at the end. `Ok(None)` only if every commit followed on and
    /// the end is where it should be; a disagreement (or a segment retired meanwhile, whose file
    /// may be recycled) is an `InvalidData` error.
    pub(crate) async fn next(&mut self) -> io::Result<Option<Walked>> {
        let disagree = |why: &str| Err(io::Error::new(io::ErrorKind::InvalidData, why.to_string()));
        loop {
            if self.stop.get() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "shard closing"));
            }
            if self.seg.retired.get() {
                return disagree("the segment was retired");
            }
            if self.offset >= self.end_offset {
                let found = (self.lsn, self.offset, Some((self.commits, self.crc)));
                if found != (self.end_lsn, self.end_offset, self.check.or(found.2)) {
                    return disagree("the segment disagrees with its summary");
                }
                return Ok(None);
            }
            let at = (self.offset - self.buf_start) as usize;
            // Before the first read of a walk that starts inside a block, `at` is past the
            // (empty) buffer.
            let parsed = match format::parse_commit(self.buf.get(at..).unwrap_or(&[]), self.seg.sequence) {
                Ok(view) if view.first_lsn == self.lsn => Some((view.count, view.total_bytes)),
                Err(ParseError::Short { .. }) if self.read_at < self.read_end => None,
                _ => return disagree("the segment disagrees with its summary"),
            };
            if let Some((count, total)) = parsed {
                let walked = Walked {
                    at,
                    offset: self.offset,
                    first_lsn: self.lsn,
                    total,
                };
                self.commits += 1;
                self.crc = chain_commit_crc(self.crc, &self.buf[at..at + COMMIT_HEADER_BYTES]);
                self.lsn += u64::from(count);
                self.offset += total as u64;
                return Ok(Some(walked));
            }
            let len = RUNS_WALK_CHUNK_BYTES.min(self.read_end - self.read_at);
            let chunk = self.seg.file.read(self.read_at, len as usize).await?;
            if chunk.is_empty() {
                return disagree("the segment file ends before its summary");
            }
            if at >= self.buf.len() {
                self.buf = chunk;
                self.buf_start = self.read_at;
            } else {
                self.buf.drain(..at);
                self.buf.extend_from_slice(&chunk);
                self.buf_start = self.offset;
            }
            self.read_at += len;
            glommio::yield_if_needed().await;
        }
    }

    fn header(&self, w: &Walked) -> &[u8] {
        &self.buf[w.at..w.at + COMMIT_HEADER_BYTES]
    }

    pub(crate) fn body(&self, w: &Walked) -> &[u8] {
        &self.buf[w.at + COMMIT_HEADER_BYTES..w.at + w.total]
    }
}

/// What a walk learns of one stream.
#[derive(Debug, Default, Clone)]
struct StreamPlan {
    /// Bytes of the commits holding it: what a read through the index fetches.
    commit_bytes: u64,
    /// The offset of the last commit counted in `commit_bytes`, plus one (0: none yet).
    last_commit: u64,
    /// Commits holding it.
    commits: u64,
    /// Bytes its run would take, records and the commits' headers.
    run_bytes: u64,
    records: u64,
    /// (lsn, offset in the run) of its marks.
    marks: Vec<(u64, u64)>,
}

impl StreamPlan {
    /// Books a group of `count` records of the stream, `body_bytes` long, from lsn `first_lsn`,
    /// in the commit of `commit_bytes` at `commit_offset`.
    fn note(
        &mut self,
        commit_offset: u64,
        commit_bytes: usize,
        first_lsn: u64,
        count: u32,
        body_bytes: usize,
        mark_interval: u64,
    ) {
        if self.last_commit != commit_offset + 1 {
            self.commit_bytes += commit_bytes as u64;
            self.last_commit = commit_offset + 1;
            self.commits += 1;
        }
        let last_mark = self.marks.last().map(|&(_, at)| at);
        if last_mark.is_none_or(|at| self.run_bytes - at >= mark_interval) {
            self.marks.push((first_lsn, self.run_bytes));
        }
        self.run_bytes += (COMMIT_HEADER_BYTES + body_bytes) as u64;
        self.records += u64::from(count);
    }

    /// Whether the stream gets a run (see the module).
    fn wanted(&self, saving_min: u64) -> bool {
        self.commits >= RUNS_COMMITS_MIN && self.commit_bytes >= RUNS_AMPLIFICATION * self.run_bytes + saving_min
    }
}

/// A run gets a mark about every this many bytes in a segment of `capacity`.
pub(crate) fn mark_interval(capacity: u64) -> u64 {
    RUNS_MARK_INTERVAL_BYTES.min(capacity / 64)
}

/// A run must save at least this many bytes in a segment of `capacity`.
fn saving_min(capacity: u64) -> u64 {
    RUNS_SAVING_MIN_BYTES.min(capacity / 64)
}

/// The table of the runs of the streams `plans` says get one, placed after the table. With
/// `memory`, only as many as one walk can copy with that much memory for their buffers: those
/// the index reads worst (the most commit bytes per byte of the stream) first.
fn table_of<'a>(plans: impl Iterator<Item = (u64, &'a StreamPlan)>, capacity: u64, memory: Option<usize>) -> RunsTable {
    let mut chosen: Vec<(u64, &StreamPlan)> = plans.filter(|(_, p)| p.wanted(saving_min(capacity))).collect();
    if let Some(memory) = memory {
        chosen.sort_unstable_by_key(|&(_, p)| std::cmp::Reverse(p.commit_bytes * 16 / p.run_bytes.max(1)));
        let mut used = 0;
        let fits = chosen
            .iter()
            .take_while(|(_, p)| {
                used += copy_buffer_bytes(p.run_bytes);
                used <= memory
            })
            .count();
        chosen.truncate(fits.max(1).min(chosen.len()));
    }
    chosen.sort_unstable_by_key(|&(stream, _)| stream);
    let mut table = RunsTable::default();
    for (stream, p) in &chosen {
        table.runs.push(Run {
            stream: *stream,
            offset: 0,
            bytes: p.run_bytes,
            records: p.records,
            first_mark: table.marks.len() as u32,
            marks: p.marks.len() as u32,
        });
        table.marks.extend(p.marks.iter().copied());
    }
    table.place();
    table
}

/// The buffer a run of `run_bytes` takes while a walk copies it.
fn copy_buffer_bytes(run_bytes: u64) -> usize {
    RUNS_BUFFER_BYTES.min(align_up(run_bytes) as usize)
}

/// Plans the runs of a sealed segment by walking it: which streams get one (as many as one more
/// walk can copy), and where.
async fn plan(seg: &Segment, stop: &Cell<bool>, summary: &SegmentSummary) -> io::Result<RunsTable> {
    let interval = mark_interval(seg.capacity);
    let mut streams: HashMap<u64, StreamPlan, foldhash::fast::RandomState> = HashMap::default();
    let mut walk = Walk::whole(seg, stop, summary);
    while let Some(w) = walk.next().await? {
        for (stream, first, count, bytes) in body_runs(walk.body(&w)) {
            let p = streams.entry(stream).or_default();
            p.note(
                w.offset,
                w.total,
                w.first_lsn + u64::from(first),
                count,
                bytes.len(),
                interval,
            );
        }
    }
    let memory = Some(RUNS_SWEEP_MEMORY_BYTES);
    Ok(table_of(streams.iter().map(|(&s, p)| (s, p)), seg.capacity, memory))
}

/// Records of one stream side by side in a commit: what the committer notes of each append as
/// it joins a batch (consecutive appends of one stream merged), so that booking the commit in
/// the stream index and the tail reads no record header back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Group {
    pub stream: u64,
    pub records: u32,
    /// Bytes of the records in the commit's body.
    pub bytes: u32,
}

/// Where a segment's tail stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailState {
    /// No tail: not started (a segment recovered at open has none), or runs are off.
    NotStarted,
    /// In [`Segment::tail`]: the committer books each commit into it.
    Booking,
    /// A segment recovered at open: the committer books its new commits into the tail, which
    /// has none of the commits before until the runs task has walked them and joined the two
    /// ([`Inner::catch_up_tails`]). Reads and the runs file use the tail only after that.
    CatchingUp,
    /// Given up: its streams' plans alone took more than the memory bound. The runs of the
    /// segment are planned by walking it once it is sealed.
    Abandoned,
    /// The segment's runs file is made (or given up); the tail is gone.
    Done,
}

/// The runs of the segment being written, in memory, made as it grows (and kept once it is
/// sealed until its runs file is made from them): a read filtered to a stream whose records are
/// scattered over the active segment reads them from here, and sealing writes the runs file from
/// here without reading the segment back.
///
/// The committer books each commit it hands to the device (the body is in its buffer, hot in
/// the cache): the groups of records of every stream the index reads badly so far (its commits
/// hold more than [`RUNS_AMPLIFICATION`] times its bytes) are appended to that stream's run, as
/// commits whose checksum is left for the runs file's write to fill in; a stream that fills the
/// commits it is in is never copied. Reads take records below the durable end only. Within
/// `ShardOptions::stream_tail_memory_bytes`: beyond it, the runs of the streams that the index
/// reads best (the fewest commit bytes per byte of the stream) are dropped first, and then only
/// streams it reads worse than those are taken in. Only the runs it holds at the seal go into
/// the runs file, so the file is planned and written without a walk, and its bytes are bounded
/// by the same memory. A segment whose streams alone (an entry each) outgrow the bound gives its
/// tail up.
pub(crate) struct Tail {
    /// Where its booking started: the segment's start, or for a segment recovered at open, its
    /// end then (until the part before is joined in).
    from: WalkPoint,
    /// Booked up to here.
    point: WalkPoint,
    streams: HashMap<u64, TailStream, foldhash::fast::RandomState>,
    /// Memory held: the streams' plans and runs.
    bytes: usize,
    /// A new stream gets a run only if the commits of its first group of records are more than
    /// this many sixteenths of the group (the worst ratio of the runs shed so far, 0 before).
    admit_above: u64,
}

struct TailStream {
    plan: StreamPlan,
    /// The run so far, as it will be in the runs file; `None` once dropped.
    data: Option<RunData>,
}

/// A run in memory: its commits in chunks that never move once written (growing a single
/// buffer copied the run on every doubling, a tenth of the daemon's CPU with 1024 streams),
/// each commit whole in one chunk.
#[derive(Default)]
struct RunData {
    chunks: Vec<Vec<u8>>,
    /// The run offset of each chunk's first byte.
    starts: Vec<u64>,
    len: u64,
}

/// Chunks of a run grow from 4 KiB to 256 KiB (a larger commit gets a chunk of its own size),
/// so a run allocates once per 256 KiB in the long run, and a small one takes little.
const RUN_CHUNK_MIN_BYTES: usize = 4 << 10;
const RUN_CHUNK_MAX_BYTES: usize = 256 << 10;

impl RunData {
    /// Appends a commit (`head`, then `body`); returns the bytes newly allocated.
    fn push(&mut self, head: &[u8], body: &[u8]) -> usize {
        let need = head.len() + body.len();
        let room = self.chunks.last().map_or(0, |c| c.capacity() - c.len());
        let mut allocated = 0;
        if need > room {
            let size = (RUN_CHUNK_MIN_BYTES << self.chunks.len().min(6)).min(RUN_CHUNK_MAX_BYTES);
            self.chunks.push(Vec::with_capacity(size.max(need)));
            self.starts.push(self.len);
            allocated = size.max(need);
        }
        let chunk = self.chunks.last_mut().expect("pushed above");
        chunk.extend_from_slice(head);
        chunk.extend_from_slice(body);
        self.len += need as u64;
        allocated
    }

    fn capacity(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
    }

    /// The commits from run offset `at` (a commit boundary) on.
    fn commits_from(&self, at: u64) -> impl Iterator<Item = &[u8]> + '_ {
        let first = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        let skip = self.starts.get(first).map_or(0, |&s| (at - s) as usize);
        self.chunks[first.min(self.chunks.len())..]
            .iter()
            .enumerate()
            .flat_map(move |(k, chunk)| {
                let mut pos = if k == 0 { skip } else { 0 };
                std::iter::from_fn(move || {
                    if pos >= chunk.len() {
                        return None;
                    }
                    let total = tail_commit(&chunk[pos..]).total_bytes;
                    let commit = &chunk[pos..pos + total];
                    pos += total;
                    Some(commit)
                })
            })
    }
}

impl Tail {
    pub(crate) fn new(seg: &Segment) -> Tail {
        Tail::starting_at(WalkPoint::start(seg))
    }

    fn starting_at(from: WalkPoint) -> Tail {
        Tail {
            from,
            point: from,
            streams: HashMap::default(),
            bytes: 0,
            admit_above: 0,
        }
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.bytes
    }

    /// Books one commit of `commit_bytes` at `offset`, from lsn `first_lsn`, whose header (as
    /// written) and body are given, the body made of `groups`, of segment sequence `sequence`.
    /// Returns whether the tail still fits in `budget` (shedding runs if it must).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn note_commit(
        &mut self,
        (offset, first_lsn, commit_bytes): (u64, u64, usize),
        header: &[u8],
        body: &[u8],
        groups: &[Group],
        sequence: u64,
        (interval, budget): (u64, usize),
    ) -> bool {
        assert_eq!(
            (offset, first_lsn),
            (self.point.offset, self.point.lsn),
            "commits are booked in order"
        );
        let mut count_total = 0u64;
        let mut at = 0usize;
        for g in groups {
            let (stream, count, range) = (g.stream, g.records, at..at + g.bytes as usize);
            at = range.end;
            let lsn = first_lsn + count_total;
            let admit_above = self.admit_above;
            let t = self.streams.entry(stream).or_insert_with(|| {
                self.bytes += std::mem::size_of::<(u64, TailStream)>();
                // Once runs have been shed, only a stream the index reads worse than every
                // stream shed so far gets one: new streams would only push out the ones kept.
                let amplification = commit_bytes as u64 * 16 / (COMMIT_HEADER_BYTES + range.len()) as u64;
                TailStream {
                    plan: StreamPlan::default(),
                    data: (amplification > admit_above).then(RunData::default),
                }
            });
            count_total += u64::from(count);
            if t.data.is_none() {
                // No run for it in this segment: nothing more to book (its entry only keeps it
                // from being admitted again).
                continue;
            }
            let marks = t.plan.marks.capacity();
            t.plan.note(offset, commit_bytes, lsn, count, range.len(), interval);
            self.bytes += (t.plan.marks.capacity() - marks) * std::mem::size_of::<(u64, u64)>();
            if t.plan.commit_bytes < RUNS_AMPLIFICATION * t.plan.run_bytes {
                // The index reads this stream well so far (it fills the commits it is in): no
                // run, and no copy of it on the committer's way (a stream is never copied in
                // part, so it gets none in this segment even if it thins out later).
                self.bytes -= t.data.take().map_or(0, |d| d.capacity());
            }
            if let Some(data) = &mut t.data {
                // A commit header without its checksum: `write_run_from_tail` fills it in.
                let mut head = [0u8; COMMIT_HEADER_BYTES];
                format::write_commit_header(&mut head, sequence, lsn, count, range.len());
                self.bytes += data.push(&head, &body[range.clone()]);
            }
        }
        assert_eq!(at, body.len(), "the groups cover the body");
        self.point = WalkPoint {
            offset: offset + commit_bytes as u64,
            lsn: first_lsn + count_total,
            commits: self.point.commits + 1,
            crc: chain_commit_crc(self.point.crc, header),
        };
        self.bytes <= budget || self.shed(budget)
    }

    /// Drops runs, those the index reads best first, until the tail takes at most three
    /// quarters of `budget`. Returns whether it fits in `budget` (without runs it may not).
    fn shed(&mut self, budget: usize) -> bool {
        let mut holding: Vec<(u64, u64)> = self
            .streams
            .iter()
            .filter(|(_, t)| t.data.is_some())
            .map(|(&stream, t)| (t.plan.commit_bytes * 16 / t.plan.run_bytes.max(1), stream))
            .collect();
        holding.sort_unstable();
        for (amplification, stream) in holding {
            if self.bytes <= budget / 4 * 3 {
                break;
            }
            let t = self.streams.get_mut(&stream).expect("listed above");
            self.bytes -= t.data.take().map_or(0, |d| d.capacity());
            self.admit_above = self.admit_above.max(amplification);
        }
        self.bytes <= budget
    }

    /// Whether it holds every commit of its segment up to where it has booked.
    fn whole(&self, seg: &Segment) -> bool {
        self.from == WalkPoint::start(seg)
    }

    /// Puts `before`, the tail of the commits up to where this one started, in front of it.
    fn join_after(&mut self, before: Tail) {
        assert_eq!(before.point, self.from, "the parts meet");
        let mut joined = before.streams;
        for (stream, later) in self.streams.drain() {
            let Some(first) = joined.get_mut(&stream) else {
                joined.insert(stream, later);
                continue;
            };
            let (Some(a), Some(b)) = (first.data.as_mut(), later.data) else {
                first.data = None;
                continue;
            };
            let shift = first.plan.run_bytes;
            first
                .plan
                .marks
                .extend(later.plan.marks.iter().map(|&(lsn, at)| (lsn, at + shift)));
            first.plan.commit_bytes += later.plan.commit_bytes;
            first.plan.commits += later.plan.commits;
            first.plan.run_bytes += later.plan.run_bytes;
            first.plan.records += later.plan.records;
            first.plan.last_commit = later.plan.last_commit.max(first.plan.last_commit);
            for (chunk, start) in b.chunks.into_iter().zip(b.starts) {
                a.chunks.push(chunk);
                a.starts.push(start + a.len);
            }
            a.len += b.len;
        }
        self.streams = joined;
        self.from = before.from;
        self.bytes += before.bytes;
        self.admit_above = self.admit_above.max(before.admit_above);
    }
}

/// Starts the tail of `seg`, recovered at open as the active segment, at its end: the committer
/// books from there, and the runs task walks the part before ([`Inner::catch_up_tails`]).
pub(crate) fn resume_tail(seg: &Segment) {
    let (lsn, offset) = seg.durable_end.get();
    let from = WalkPoint {
        offset,
        lsn,
        commits: seg.commits.get(),
        crc: seg.commits_crc.get(),
    };
    *seg.tail.borrow_mut() = Some(Tail::starting_at(from));
    seg.tail_state.set(TailState::CatchingUp);
}

/// The commit at the start of `data`, a tail's run (its own bytes: framed, checksum not filled in).
fn tail_commit(data: &[u8]) -> CommitView<'_> {
    let body = u32_at(data, 24) as usize;
    CommitView {
        first_lsn: u64_at(data, 16),
        count: u32_at(data, 4),
        total_bytes: COMMIT_HEADER_BYTES + body,
        body: &data[COMMIT_HEADER_BYTES..COMMIT_HEADER_BYTES + body],
    }
}

/// What a read of a segment's tail did.
pub(crate) enum TailRead {
    /// Every lsn of the stream the tail holds, from the cursor, is in the batch (or there was
    /// nothing for the tail to give): the rest of the segment through the index.
    Rest,
    /// The batch is full.
    Done,
    /// The batch is empty and its first record needs this much memory: acquire it and try again.
    NeedMemory(usize),
}

/// A run being copied: its buffer, and how much of the run is already written.
struct RunWriter {
    run: Run,
    buf: Vec<u8>,
    written: u64,
}

/// Copies `runs` (the second walk): each stream's groups of records, as commits, into its run.
/// Returns the bytes written.
async fn copy(
    seg: &Segment,
    stop: &Cell<bool>,
    summary: &SegmentSummary,
    file: &dyn SegmentFile,
    storage: &dyn Storage,
    runs: &[Run],
) -> io::Result<u64> {
    let mut writers: HashMap<u64, RunWriter, foldhash::fast::RandomState> = runs
        .iter()
        .map(|&run| {
            let cap = RUNS_BUFFER_BYTES.min(align_up(run.bytes) as usize) + COMMIT_HEADER_BYTES;
            (
                run.stream,
                RunWriter {
                    run,
                    buf: Vec::with_capacity(cap),
                    written: 0,
                },
            )
        })
        .collect();
    let mut written = 0u64;
    let mut full: Vec<u64> = Vec::new();
    let mut walk = Walk::whole(seg, stop, summary);
    while let Some(w) = walk.next().await? {
        let body = walk.body(&w);
        for (stream, first, count, bytes) in body_runs(body) {
            let Some(writer) = writers.get_mut(&stream) else {
                continue;
            };
            let at = writer.buf.len();
            writer.buf.resize(at + COMMIT_HEADER_BYTES, 0);
            writer.buf.extend_from_slice(&body[bytes.clone()]);
            format::seal_commit(
                &mut writer.buf[at..],
                seg.sequence,
                w.first_lsn + u64::from(first),
                count,
                bytes.len(),
            );
            if writer.buf.len() >= RUNS_BUFFER_BYTES {
                full.push(stream);
            }
        }
        for stream in full.drain(..) {
            let writer = writers.get_mut(&stream).expect("a run being copied");
            written += flush(file, storage, writer, false).await?;
        }
    }
    for writer in writers.values_mut() {
        written += flush(file, storage, writer, true).await?;
        if writer.written != writer.run.bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the run of stream {} came out {} bytes, planned {}",
                    writer.run.stream, writer.written, writer.run.bytes
                ),
            ));
        }
    }
    Ok(written)
}

/// Writes a run writer's whole blocks (all of its buffer, zero-padded to a block, when `last`)
/// and keeps the rest for the next flush.
async fn flush(file: &dyn SegmentFile, storage: &dyn Storage, writer: &mut RunWriter, last: bool) -> io::Result<u64> {
    let n = if last {
        writer.buf.len()
    } else {
        align_down(writer.buf.len() as u64) as usize
    };
    if n == 0 {
        return Ok(0);
    }
    let len = align_up(n as u64) as usize;
    let mut io = storage.alloc(len);
    let slice = io.as_mut_slice();
    slice[..n].copy_from_slice(&writer.buf[..n]);
    slice[n..].fill(0);
    let offset = writer.run.offset + writer.written;
    if writer.written + n as u64 > writer.run.bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the run of stream {} outgrew its plan", writer.run.stream),
        ));
    }
    file.write(offset, io).await?;
    writer.written += n as u64;
    writer.buf.drain(..n);
    Ok(len as u64)
}

/// Why a read of a run returned.
pub(crate) enum RunsRead {
    Read(SegmentRead),
    /// The runs file failed a check or a read: the read goes on through the stream index.
    Untrusted(String),
}

/// The stream runs task, in the background queue next to the background task and the scrub:
/// makes each sealed segment's runs file, one segment at a time.
pub(crate) async fn stream_runs_task(inner: Rc<Inner>) {
    while !inner.bg_stop.get() {
        if inner.catch_up_tails().await | inner.make_stream_runs().await {
            continue;
        }
        inner.runs_wake.wait().await;
    }
}

impl Inner {
    /// Walks the part before the tail of a segment recovered at open and joins it in front.
    /// Returns whether there was one to walk.
    pub(crate) async fn catch_up_tails(&self) -> bool {
        let seg = {
            let st = self.st.borrow();
            let next = st.segs.iter().find(|s| s.tail_state.get() == TailState::CatchingUp);
            match next {
                Some(seg) => seg.clone(),
                None => return false,
            }
        };
        let Some(to) = seg.tail.borrow().as_ref().map(|t| t.from) else {
            seg.drop_tail(TailState::Abandoned);
            return true;
        };
        let budget = self.opts.stream_tail_memory_bytes;
        let interval = mark_interval(seg.capacity);
        let mut before = Tail::new(&seg);
        let mut walk = Walk::range(&seg, &self.bg_stop, WalkPoint::start(&seg), (to.offset, to.lsn));
        let walked = async {
            let mut groups = Vec::new();
            while let Some(w) = walk.next().await? {
                let body = walk.body(&w);
                groups.clear();
                groups.extend(body_runs(body).map(|(stream, _, records, range)| Group {
                    stream,
                    records,
                    bytes: range.len() as u32,
                }));
                let header = walk.header(&w);
                if !before.note_commit(
                    (w.offset, w.first_lsn, w.total),
                    header,
                    body,
                    &groups,
                    seg.sequence,
                    (interval, budget),
                ) {
                    return Ok(false);
                }
            }
            Ok::<bool, io::Error>(true)
        }
        .await;
        // Nothing was awaited between the last commit walked and here: the tail is as the
        // committer left it.
        match walked {
            Ok(true) if seg.tail_state.get() == TailState::CatchingUp && before.point == to => {
                let fits = {
                    let mut tail = seg.tail.borrow_mut();
                    let tail = tail.as_mut().expect("a tail catching up");
                    tail.join_after(before);
                    tail.bytes <= budget || tail.shed(budget)
                };
                match fits {
                    true => seg.tail_state.set(TailState::Booking),
                    false => seg.drop_tail(TailState::Abandoned),
                }
            }
            Ok(_) => seg.drop_tail(TailState::Abandoned),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return false,
            Err(e) => {
                if !seg.retired.get() {
                    tracing::warn!(shard = self.opts.shard_id, segment = seg.sequence, error = %e, "no tail for the recovered segment");
                }
                seg.drop_tail(TailState::Abandoned);
            }
        }
        true
    }

    /// Makes the runs file of the oldest segment whose runs are pending. Returns whether it did
    /// any work (the caller looks for more before it sleeps).
    pub(crate) async fn make_stream_runs(&self) -> bool {
        let seg = {
            let st = self.st.borrow();
            let next = st
                .segs
                .iter()
                .find(|s| s.runs_state.get() == RunsState::Pending && !s.retired.get());
            match next {
                Some(seg) => seg.clone(),
                None => return false,
            }
        };
        let name = stream_runs_name(seg.base_lsn);
        let summary = seg.summary(self.opts.shard_id);
        match self.write_stream_runs(&seg, &summary, &name).await {
            Ok(loaded) if !seg.retired.get() => {
                let runs = loaded.table.runs.len();
                tracing::debug!(shard = self.opts.shard_id, %name, runs, "stream runs written");
                *seg.runs.borrow_mut() = Some(Rc::new(loaded));
                seg.runs_state.set(RunsState::Loaded);
                seg.drop_tail(TailState::Done);
                self.bound_stream_indexes(None);
            }
            Ok(_) => self.remove_runs_file(&name).await,
            Err(e) => {
                self.remove_runs_file(&name).await;
                if self.bg_stop.get() || seg.retired.get() {
                    // Closing: the next open finds no runs file, and makes it then.
                    return true;
                }
                tracing::warn!(shard = self.opts.shard_id, %name, error = %e, "no stream runs for this segment");
                seg.runs_state.set(RunsState::None);
                seg.drop_tail(TailState::Done);
            }
        }
        true
    }

    /// Removes a runs file, if there is one. Its directory entry is not synced: a runs file that
    /// comes back after a crash is checked like any other (and a retired segment's is removed by
    /// the next open).
    pub(crate) async fn remove_runs_file(&self, name: &str) {
        match self.storage.remove(name).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(%name, error = %e, "removing a stream runs file failed"),
        }
    }

    /// Plans and writes the runs file of `seg`, and returns its table with the file open for
    /// reads.
    async fn write_stream_runs(&self, seg: &Segment, summary: &SegmentSummary, name: &str) -> io::Result<LoadedRuns> {
        // From the tail if it walked the whole segment: the runs it still holds, which need no
        // walk (the streams it shed, those the index reads best, get none).
        let from_tail = {
            let tail = seg.tail.borrow();
            tail.as_ref()
                .filter(|t| t.whole(seg) && t.point.matches(summary))
                .map(|t| {
                    let held = t.streams.iter().filter(|(_, t)| t.data.is_some());
                    table_of(held.map(|(&s, t)| (s, &t.plan)), seg.capacity, None)
                })
        };
        // A sealed segment's tail takes no more commits: what it held for the table, it holds
        // for the writes.
        let in_tail = from_tail.is_some();
        let table = match from_tail {
            Some(table) => table,
            None => plan(seg, &self.bg_stop, summary).await?,
        };
        self.remove_runs_file(name).await;
        // Never synced (nor its directory entry): the file is a copy that every read checks, so
        // a crash that tears it or loses it costs a read through the index and the file made
        // again, while a sync per segment would hold up the commits' own (a new file's sync
        // commits the file system's journal, which every commit's sync then waits behind).
        let file = self.storage.open(name, true, Durability::Linked).await?;
        let written = async {
            let mut bytes = 0;
            if in_tail {
                for run in &table.runs {
                    bytes += self.write_run_from_tail(seg, &*file, run).await?;
                }
            } else if !table.runs.is_empty() {
                // In one walk: `plan` chose no more than fit.
                bytes += copy(seg, &self.bg_stop, summary, &*file, &*self.storage, &table.runs).await?;
            }
            // The table last: a file cut short by a crash has none, or one whose runs fail
            // their checksums.
            let mut head = self.storage.alloc(table.data_offset() as usize);
            table.encode(summary, head.as_mut_slice());
            bytes += head.len() as u64;
            file.write(0, head).await?;
            Ok::<u64, io::Error>(bytes)
        }
        .await;
        let bytes = match written {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = file.close().await;
                return Err(e);
            }
        };
        self.health.borrow_mut().runs_bytes_written += bytes;
        Ok(LoadedRuns { table, file })
    }

    /// Writes `run` from the segment's tail, about [`RUNS_BUFFER_BYTES`] at a time (whole
    /// commits, the tail stays for reads meanwhile), filling in the commits' checksums. Returns
    /// the bytes written.
    async fn write_run_from_tail(&self, seg: &Segment, file: &dyn SegmentFile, run: &Run) -> io::Result<u64> {
        let mut at = 0usize;
        let mut written = 0;
        // The part-filled block a piece ends with, written again at the start of the next.
        let mut carry: Vec<u8> = Vec::new();
        while (at as u64) < run.bytes {
            let (buf, next) = {
                let tail = seg.tail.borrow();
                let data = tail
                    .as_ref()
                    .and_then(|t| t.streams.get(&run.stream))
                    .and_then(|t| t.data.as_ref())
                    .filter(|d| d.len == run.bytes)
                    .ok_or_else(|| io::Error::other("the tail's run changed under its write"))?;
                // Whole commits, at least one.
                let mut commits = Vec::new();
                let mut end = at;
                for commit in data.commits_from(at as u64) {
                    if end > at && end - at >= RUNS_BUFFER_BYTES {
                        break;
                    }
                    commits.push(commit);
                    end += commit.len();
                }
                let n = carry.len() + (end - at);
                let mut buf = self.storage.alloc(align_up(n as u64) as usize);
                let slice = buf.as_mut_slice();
                slice[..carry.len()].copy_from_slice(&carry);
                let mut pos = carry.len();
                for commit in commits {
                    let total = commit.len();
                    slice[pos..pos + total].copy_from_slice(commit);
                    let view = tail_commit(commit);
                    let (first_lsn, count, body) = (view.first_lsn, view.count, view.body.len());
                    format::seal_commit(&mut slice[pos..pos + total], seg.sequence, first_lsn, count, body);
                    pos += total;
                }
                slice[n..].fill(0);
                let block_start = align_down(n as u64) as usize;
                carry = slice[block_start..n].to_vec();
                (buf, end)
            };
            let n = buf.len();
            // The piece starts with the carried block: at the block boundary before `at`.
            file.write(run.offset + align_down(at as u64), buf).await?;
            written += n as u64;
            at = next;
        }
        Ok(written)
    }

    /// The part of a read filtered to `stream` that the tail of `seg` holds: the stream's records
    /// from the cursor up to where the tail has booked (and below `limit_lsn`), from memory. With
    /// [`TailRead::Rest`] the cursor is where the rest of the segment is to be read from.
    pub(crate) fn read_tail(&self, seg: &Segment, stream: u64, limit_lsn: u64, p: &mut ReadProgress<'_>) -> TailRead {
        let tail = seg.tail.borrow();
        let Some(tail) = tail.as_ref().filter(|t| t.whole(seg)) else {
            return TailRead::Rest;
        };
        let covered = tail.point.lsn.min(limit_lsn);
        if *p.cursor >= covered {
            return TailRead::Rest;
        }
        let Some(t) = tail.streams.get(&stream) else {
            // None of the stream's records lie below the covered part.
            *p.cursor = covered;
            return TailRead::Rest;
        };
        let Some(data) = t.data.as_ref() else {
            return TailRead::Rest;
        };
        self.health.borrow_mut().tail_reads += 1;
        let marks = &t.plan.marks;
        let i = marks.partition_point(|&(lsn, _)| lsn <= *p.cursor).saturating_sub(1);
        let from = marks.get(i).map_or(0, |&(_, at)| at);
        for commit in data.commits_from(from) {
            let view = tail_commit(commit);
            for (k, record) in view.records().enumerate() {
                let lsn = view.first_lsn + k as u64;
                if lsn < *p.cursor {
                    continue;
                }
                if lsn >= covered {
                    *p.cursor = covered;
                    return TailRead::Rest;
                }
                let record = record.expect("the tail's own framing");
                *p.cursor = lsn;
                if p.batch.records.is_empty() {
                    // Nothing holds this record's bytes but the tail: room for its answer first.
                    let need = *p.held + READ_RECORD_OVERHEAD_BYTES + record.payload.len();
                    if !p.memory.try_grow_to(need) {
                        return TailRead::NeedMemory(need);
                    }
                }
                if !p.take(lsn, record, 0) {
                    return TailRead::Done;
                }
                *p.cursor = lsn + 1;
            }
            if *p.bytes >= p.max_bytes {
                return TailRead::Done;
            }
        }
        *p.cursor = (*p.cursor).max(covered);
        TailRead::Rest
    }

    /// Loads the table of a sealed segment's runs file, which recovery found on disk, if it is
    /// valid and describes the segment's summary; otherwise removes the file and has the
    /// background task make it again. Tried once per load.
    pub(crate) async fn load_stream_runs(&self, seg: &Segment) {
        if seg.runs_state.get() != RunsState::OnDisk {
            return;
        }
        seg.runs_state.set(RunsState::Loading);
        let name = stream_runs_name(seg.base_lsn);
        let summary = seg.summary(self.opts.shard_id);
        let loaded = async {
            let file = self.storage.open(&name, false, Durability::Linked).await?;
            let read = async {
                let size = file.size().await?;
                let head = file.read(0, BLOCK_BYTES.min(align_down(size)) as usize).await?;
                let table_bytes = match RunsTable::table_bytes_of(&head) {
                    Ok(n) if n <= size => n,
                    Ok(n) => return Ok(Err(format!("stream runs table of {n} bytes, file of {size}"))),
                    Err(reason) => return Ok(Err(reason)),
                };
                let buf = match align_up(table_bytes) <= head.len() as u64 {
                    true => head,
                    false => file.read(0, align_up(table_bytes) as usize).await?,
                };
                Ok::<_, io::Error>(RunsTable::decode(&buf, &summary, size))
            }
            .await;
            match read {
                Ok(Ok(table)) => Ok(Ok(LoadedRuns { table, file })),
                Ok(Err(reason)) => {
                    let _ = file.close().await;
                    Ok(Err(reason))
                }
                Err(e) => {
                    let _ = file.close().await;
                    Err(e)
                }
            }
        }
        .await;
        let reason = match loaded {
            Ok(Ok(runs)) if !seg.retired.get() => {
                *seg.runs.borrow_mut() = Some(Rc::new(runs));
                seg.runs_state.set(RunsState::Loaded);
                self.bound_stream_indexes(Some(seg));
                return;
            }
            Ok(Ok(_)) => return,
            Ok(Err(reason)) => reason,
            Err(e) => e.to_string(),
        };
        self.distrust_stream_runs(seg, &reason).await;
    }

    /// Sets aside a runs file that failed a check: filtered reads use the stream index, and the
    /// background task writes the file again.
    pub(crate) async fn distrust_stream_runs(&self, seg: &Segment, reason: &str) {
        let name = stream_runs_name(seg.base_lsn);
        tracing::warn!(shard = self.opts.shard_id, %name, %reason, "stream runs not trusted; making them again");
        *seg.runs.borrow_mut() = None;
        seg.runs_state.set(RunsState::None);
        self.remove_runs_file(&name).await;
        if !seg.retired.get() && self.opts.stream_runs == crate::StreamRuns::Auto {
            seg.runs_state.set(RunsState::Pending);
            self.runs_wake.notify();
        }
    }

    /// The part of a read filtered to `stream` that falls in `seg`, whose runs file holds the
    /// stream's `run`: the run is read from the mark at or before the cursor, in chunks as an
    /// unfiltered read takes them, and every record of the stream in the segment is in it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_run(
        &self,
        seg: &Segment,
        runs: &LoadedRuns,
        run: Run,
        limit_lsn: u64,
        p: &mut ReadProgress<'_>,
        truncated: &dyn Fn() -> ShardError,
    ) -> Result<RunsRead, ShardError> {
        let (mut lsn_floor, mut offset) = runs.table.start_of(&run, *p.cursor);
        let end = run.offset + run.bytes;
        let seg_end_lsn = seg.durable_end.get().0;
        let mut want = chunk_bytes(p.max_bytes.saturating_sub(*p.bytes), false);
        while offset < end {
            let read_from = align_down(offset);
            let read_to = align_up((offset + want).min(end));
            // The storage seam holds the chunk twice while it copies it out of the DMA buffer.
            let need = *p.held + 2 * (read_to - read_from) as usize;
            if !p.memory.try_grow_to(need) {
                if !p.batch.records.is_empty() {
                    return Ok(RunsRead::Read(SegmentRead::Done));
                }
                p.memory.shrink_to(0);
                p.memory.acquire(need).await;
            }
            let data = match runs.file.read(read_from, (read_to - read_from) as usize).await {
                Ok(d) => d,
                Err(_) if seg.retired.get() => return Err(truncated()),
                Err(e) => {
                    return Ok(RunsRead::Untrusted(format!(
                        "reading the run of stream {}: {e}",
                        run.stream
                    )))
                }
            };
            let avail = ((read_from + data.len() as u64).min(end) - read_from) as usize;
            let mut pos = (offset - read_from) as usize;
            let mut short = 0;
            while offset < end {
                let view: CommitView<'_> = match format::parse_commit(&data[pos..avail], seg.sequence) {
                    Ok(v) => v,
                    Err(ParseError::Short { needed }) if offset + needed as u64 <= end && pos < avail => {
                        short = needed as u64 + BLOCK_BYTES;
                        break;
                    }
                    Err(e) => {
                        return Ok(RunsRead::Untrusted(format!(
                            "the run of stream {} at offset {offset}: {e:?}",
                            run.stream
                        )))
                    }
                };
                if view.first_lsn < lsn_floor || view.end_lsn() > seg_end_lsn {
                    return Ok(RunsRead::Untrusted(format!(
                        "the run of stream {} has lsns {}..{} after {lsn_floor}",
                        run.stream,
                        view.first_lsn,
                        view.end_lsn()
                    )));
                }
                lsn_floor = view.end_lsn();
                *p.scanned += view.total_bytes;
                for (i, record) in view.records().enumerate() {
                    let lsn = view.first_lsn + i as u64;
                    if lsn < *p.cursor {
                        continue;
                    }
                    if lsn >= limit_lsn {
                        return Ok(RunsRead::Read(SegmentRead::Done));
                    }
                    let record = record.expect("framing validated by parse_commit");
                    if record.stream != run.stream {
                        return Ok(RunsRead::Untrusted(format!(
                            "the run of stream {} holds a record of stream {} at lsn {lsn}",
                            run.stream, record.stream
                        )));
                    }
                    // Every record of the stream in this segment is in the run: the lsns in
                    // between are other streams'.
                    *p.cursor = lsn;
                    if !p.take(lsn, record, 2 * data.len()) {
                        return Ok(RunsRead::Read(SegmentRead::Done));
                    }
                    *p.cursor = lsn + 1;
                }
                offset += view.total_bytes as u64;
                pos += view.total_bytes;
                if *p.bytes >= p.max_bytes || *p.scanned >= p.scan_max {
                    return Ok(RunsRead::Read(SegmentRead::Done));
                }
            }
            drop(data);
            p.memory.shrink_to(*p.held);
            want = chunk_bytes(p.max_bytes.saturating_sub(*p.bytes), false).max(short);
        }
        *p.cursor = (*p.cursor).max(limit_lsn);
        Ok(RunsRead::Read(SegmentRead::Next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_record;

    fn summary() -> SegmentSummary {
        SegmentSummary {
            shard_id: 3,
            sequence: 7,
            base_lsn: 1000,
            end_lsn: 5000,
            commits: 40,
            end_offset: 1 << 20,
            commits_crc: 0xbeef,
            index: vec![(1000, 4096)],
        }
    }

    fn table() -> RunsTable {
        let mut t = RunsTable::default();
        t.runs.push(Run {
            stream: 5,
            offset: 0,
            bytes: 300_000,
            records: 290,
            first_mark: 0,
            marks: 2,
        });
        t.runs.push(Run {
            stream: 9,
            offset: 0,
            bytes: 100,
            records: 1,
            first_mark: 2,
            marks: 1,
        });
        t.marks = vec![(1000, 0), (3000, 270_000), (4999, 0)];
        t.place();
        t
    }

    #[test]
    fn runs_table_round_trips_and_rejects_flips_and_other_segments() {
        let t = table();
        let s = summary();
        let mut buf = vec![0u8; t.data_offset() as usize];
        t.encode(&s, &mut buf);
        let size = 1 << 20;
        assert_eq!(RunsTable::decode(&buf, &s, size), Ok(t.clone()));
        let used = t.table_bytes();
        for byte in 0..used {
            let mut flipped = buf.clone();
            flipped[byte] ^= 0x10;
            assert!(RunsTable::decode(&flipped, &s, size).is_err(), "flip at {byte}");
        }
        let mut other = s.clone();
        other.end_lsn += 1;
        assert!(RunsTable::decode(&buf, &other, size).is_err(), "another segment's runs");
        assert!(RunsTable::decode(&buf, &s, 300_000).is_err(), "a file cut short");
        assert!(
            RunsTable::decode(&buf[..used - 1], &s, size).is_err(),
            "a table cut short"
        );
    }

    #[test]
    fn a_read_starts_at_the_mark_before_the_cursor() {
        let t = table();
        let run = t.run_of(5).expect("stream 5 has a run");
        let base = run.offset;
        assert_eq!(t.start_of(&run, 0), (1000, base));
        assert_eq!(t.start_of(&run, 2999), (1000, base));
        assert_eq!(t.start_of(&run, 3000), (3000, base + 270_000));
        assert_eq!(t.start_of(&run, 4500), (3000, base + 270_000));
        assert!(t.run_of(6).is_none());
    }

    #[test]
    fn body_runs_group_neighbours_of_one_stream() {
        let mut body = Vec::new();
        for s in [4u64, 4, 8, 4, 4, 4] {
            encode_record(&mut body, s, None, &[s as u8; 3]);
        }
        let r = RECORD_HEADER_BYTES + 3;
        let got: Vec<_> = body_runs(&body).collect();
        assert_eq!(
            got,
            vec![(4, 0, 2, 0..2 * r), (8, 2, 1, 2 * r..3 * r), (4, 3, 3, 3 * r..6 * r)]
        );
    }
}
