//! Recovery on open: find the segments, accept what summaries vouch for, scan the rest, cut a
//! torn tail.
//!
//! Which files are segments: a `.wal` or `.prep` file whose header block is valid. A file whose
//! header block is all zero is a spare (prepared, or recycled by retention) and is removed. A
//! `.prep` file with a valid header is the active segment of a crash that came before the
//! background task renamed it; it is renamed now.
//!
//! A summary (`<base_lsn:020>.sum`) or the checkpoint (`checkpoint`) is *trusted* only if its
//! checksum holds and it names this shard and the segment's sequence and base lsn; anything else
//! (a torn write, a flipped bit, a leftover of an earlier life of that name) is ignored, and the
//! segment is scanned as if it had none. So a crash while one is written costs a scan, never data.
//!
//! - Sealed segment (not the last) with a trusted summary whose end lsn is the next segment's
//!   base lsn: accepted without reading its body. The scrub verifies the body later.
//! - Sealed segment otherwise: scanned from its data offset, commit by commit (magic, segment
//!   sequence, checksum, record framing, lsn continuity); the scan stops at the first commit
//!   that fails. The next segment must start at the lsn the scan ended at, or something is
//!   missing: `Corruption` at the offset the scan stopped. A trusted summary that disagreed with
//!   the next segment while the body agrees is reported as a corruption finding (`stats`), and
//!   the background task writes a correct one.
//! - Last segment with a trusted summary (sealed just before a crash) or checkpoint (clean
//!   shutdown): accepted after reading only its end: the commits from the last index entry must
//!   end exactly where it says, and no valid commit of the segment may lie in the
//!   `PIPELINE_DEPTH` commits' worth of bytes after that (else it is older than the log, and the
//!   segment is scanned). A summary or checkpoint that vouches for more than the scan then
//!   finds is `Corruption`: data it saw durable is gone.
//! - Last segment otherwise: the log may end with a torn write. At most `PIPELINE_DEPTH` commits
//!   were between submission and durability at a power loss, so after the first bad commit at
//!   most `PIPELINE_DEPTH - 1` valid commits may follow (a later write may have reached the
//!   device while an earlier one did not; neither was acknowledged, since acks wait for all
//!   earlier commits). Then the log is cut there. More valid commits behind it mean damage in the
//!   middle of acknowledged data: `Corruption`.
//!
//! Before new writes, the cut is made permanent: the block holding the end and everything up to
//! the last valid-looking commit behind it is zeroed and synced. Otherwise a later commit could
//! end exactly where an unacknowledged one began and revive it. Leftovers of a recycled file
//! need no zeroing: their commits carry another segment sequence, which the checksum covers.
//! The checkpoint is removed before recovery returns, so it does not outlive the log it
//! describes; the directory sync that makes its removal durable may finish after the shard
//! opened (`tidy_directory` says why a checkpoint that a crash brings back is still safe).
//!
//! The manifest (`manifest`, written by the background task after each seal) holds the summary,
//! less its index, of every sealed segment whose `.sum` is durable. It is trusted like a summary
//! (checksum, this shard), and a `.wal` file it lists is accepted from it without being opened,
//! read or stat'ed: its file is opened on first use ([`LazyFile`]) and its index read from its
//! `.sum` then ([`load_index`]). Two exceptions keep a crash from making it lie: the first listed
//! segment is opened and its header read, because retention zeroes the oldest segment's header
//! before it renames the file to a spare; and so is the last, which may end the log. Files it does
//! not list (newer than it) are read as without a manifest; if a segment taken from it does not
//! continue into its neighbour, recovery starts again without it. When the recovered log differs
//! from it (none, older, a repair cut), recovery writes a new one before it removes any file, so a
//! cut segment's name cannot be taken by a new segment while the manifest still describes it. So
//! a clean restart opens the same files whatever the length of the log.
//!
//! Scans read with several large aligned reads in flight ([`RECOVERY_READS_IN_FLIGHT`] of
//! [`RECOVERY_READ_BYTES`]) into buffers that go round, and scan them where the device put them
//! ([`InPlaceScan`]). Segment headers and summaries (without a manifest) are read
//! [`RECOVERY_FILES_IN_FLIGHT`] files at a time, so that an open of thousands of segments costs a
//! few device round trips, not one per file (`scripts/restart-time.sh` measures it).
//!
//! With `repair`, a `Corruption` becomes a cut at that offset; later segments are removed.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use crate::error::ShardError;
use crate::format::{
    align_down, align_up, chain_commit_crc, find_valid_commits, parse_commit, HeaderBlock, Manifest, ManifestEntry,
    ParseError, SegmentHeader, SegmentSummary, SummaryKind, BLOCK_BYTES, COMMIT_HEADER_BYTES, COMMIT_MAGIC,
    SEGMENT_DATA_OFFSET,
};
use crate::segments::{
    segment_name, summary_name, unix_ms, Active, Segment, Segments, SummaryState, CHECKPOINT_NAME,
    INDEX_INTERVAL_BYTES, MANIFEST_NAME,
};
use crate::shard::PIPELINE_DEPTH;
use crate::storage::{AlignedBuf, LazyFile, LocalBoxFuture, SegmentFile, Storage};
use crate::stream_index::{stream_index_name, SealedIndex, StreamIndex, SEGMENT_BYTES_INDEXED_MAX};
use crate::stream_runs::{stream_runs_name, RunsState};
use crate::uring::FixableBuf;
use crate::ShardOptions;

/// Recovery reads a segment in pieces of this size ...
///
/// Why 2 MiB x 4: crash recoveries of a full 64 MiB active segment with a cold cache, two runs
/// of six shapes alternated three times, scan times: 2 MiB x 4 35-42 and 39-46 ms; 4 MiB x 4
/// 43-45 and 41-51; 2 MiB x 8 38-44; 4 MiB x 8 42-50; 8 MiB x 4 43-58; 1 MiB x 16 52-56; 1 MiB
/// x 8 45-57; 2 MiB x 2 42-57. A third run, under load (load average 5-8): 2 MiB x 4 40-42,
/// 4 MiB x 4 38-46, 2 MiB x 8 38-47, 4 MiB x 8 43-49, 2 MiB x 16 42-60. So the shapes from
/// 8 MiB to 32 MiB in flight are within the noise of one another here, and this one takes the
/// least memory: one buffer is one huge page ([`AlignedBuf::new_mapped`]), and five of them (10 MiB) fault in half
/// as fast as five of 4 MiB, before and while the first reads are in flight.
pub(crate) const RECOVERY_READ_BYTES: u64 = 2 << 20;
/// ... with this many reads in flight at once (`scripts/restart-time.sh` gives fio the same
/// shape, and fixed buffers as recovery has, for its baseline).
pub(crate) const RECOVERY_READS_IN_FLIGHT: usize = 4;
/// Segment headers and summaries are read with this many files in flight: each costs a device
/// round trip when the page cache is cold, and a long log has thousands of them, so one at a
/// time would make a clean restart grow with the log.
pub(crate) const RECOVERY_FILES_IN_FLIGHT: usize = 32;

/// How the last open recovered the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments recovered.
    pub segments: u64,
    /// Of which accepted from a summary or the checkpoint, without reading their bodies.
    pub trusted: u64,
    /// Of which scanned commit by commit.
    pub scanned: u64,
    /// Bytes of segment bodies read (scans, and the ends of trusted last segments).
    pub bytes_read: u64,
    /// The clean-shutdown checkpoint was found and used.
    pub checkpoint_used: bool,
    /// Wall time of recovery, microseconds.
    pub elapsed_us: u64,
    /// Of which spent reading and checking segment bodies (the `bytes_read`), microseconds.
    pub scan_us: u64,
}

pub(crate) struct Recovered {
    pub segs: Segments,
    pub next_lsn: u64,
    /// Summaries found to disagree with the log (recovered from the body instead).
    pub findings: Vec<String>,
    pub report: RecoveryReport,
}

struct Found {
    name: String,
    header: SegmentHeader,
    file: Rc<dyn SegmentFile>,
    size: u64,
    /// Accepted from the manifest without opening the file: header, size and summary (less its
    /// index) are the manifest's.
    manifest: Option<ManifestEntry>,
}

impl Found {
    /// Where commits must end: the file's whole blocks.
    fn capacity(&self) -> u64 {
        align_down(self.size)
    }

    /// Whether a summary names this segment and fits in it.
    fn matches(&self, s: &SegmentSummary) -> bool {
        s.shard_id == self.header.shard_id
            && s.sequence == self.header.sequence
            && s.base_lsn == self.header.base_lsn
            && s.end_offset <= self.capacity()
    }
}

struct Scan {
    end_offset: u64,
    end_lsn: u64,
    index: Vec<(u64, u64)>,
    commits: u64,
    commits_crc: u32,
    /// Why the scan stopped, if not at zeros or the end of the data.
    stop: Option<String>,
    /// The stream index of the commits scanned, for a scan from the segment's start.
    streams: Option<StreamIndex>,
}

/// A scan of a segment's commits, fed its bytes piece by piece as they are read (so that no
/// copy of the whole segment is made): commit by commit (magic, segment sequence, checksum,
/// record framing, lsn continuity), stopping at the first that fails, at zeros, or at the end.
struct Scanner {
    sequence: u64,
    offset: u64,
    lsn: u64,
    index: Vec<(u64, u64)>,
    commits: u64,
    commits_crc: u32,
    stop: Option<String>,
    done: bool,
    /// (the segment's base lsn, the index being built), when the scan starts at the segment's
    /// first commit and the segment can have an index.
    streams: Option<(u64, StreamIndex)>,
}

impl Scanner {
    fn new(sequence: u64, offset: u64, lsn: u64) -> Scanner {
        Scanner {
            sequence,
            offset,
            lsn,
            index: Vec::new(),
            commits: 0,
            commits_crc: 0,
            stop: None,
            done: false,
            streams: None,
        }
    }

    /// Scans the commits in `data` (segment bytes from offset `base`, reaching back at least to
    /// where the scan stands). Without `eof` it stops before a commit that `data` does not hold
    /// whole, to go on when fed more; with `eof`, `data` runs to the end of the file, and the
    /// scan ends: fed the whole segment at once, it finds what a single pass would.
    fn feed(&mut self, data: &[u8], base: u64, eof: bool) {
        assert!(!self.done);
        assert!(base <= self.offset);
        while !self.done {
            let at = (self.offset - base) as usize;
            if at >= data.len() {
                self.done = eof;
                return;
            }
            // Parse only whole headers before the end, so a header split between two reads is
            // not taken for zeros or garbage.
            if !eof && data.len() - at < COMMIT_HEADER_BYTES {
                return;
            }
            match parse_commit(&data[at..], self.sequence) {
                Ok(view) if view.first_lsn == self.lsn => {
                    if self
                        .index
                        .last()
                        .is_none_or(|&(_, o)| self.offset - o >= INDEX_INTERVAL_BYTES)
                    {
                        self.index.push((self.lsn, self.offset));
                    }
                    if let Some((base_lsn, streams)) = &mut self.streams {
                        // [stream_index] Rebuilt from the scan.
                        let body = &data[at + COMMIT_HEADER_BYTES..at + view.total_bytes];
                        streams.note_commit(self.lsn - *base_lsn, self.offset, body);
                    }
                    self.commits += 1;
                    self.commits_crc = chain_commit_crc(self.commits_crc, &data[at..at + COMMIT_HEADER_BYTES]);
                    self.lsn = view.end_lsn();
                    self.offset += view.total_bytes as u64;
                }
                Ok(view) => {
                    self.stop = Some(format!(
                        "commit starts at lsn {}, expected {}",
                        view.first_lsn, self.lsn
                    ));
                    self.done = true;
                }
                Err(ParseError::Zero) => self.done = true,
                Err(ParseError::Short { .. }) if !eof => return,
                Err(ParseError::Short { needed }) => {
                    self.stop = Some(format!("commit of {needed} bytes runs past the end of the file"));
                    self.done = true;
                }
                Err(ParseError::Invalid(reason)) => {
                    self.stop = Some(reason);
                    self.done = true;
                }
            }
        }
    }

    fn finish(self) -> Scan {
        assert!(self.done);
        Scan {
            end_offset: self.offset,
            end_lsn: self.lsn,
            index: self.index,
            commits: self.commits,
            commits_crc: self.commits_crc,
            stop: self.stop,
            streams: self.streams.map(|(_, streams)| streams),
        }
    }
}

/// Scans commits in `data` (segment bytes from offset `base`, to the end of what is read) from
/// `offset` at `lsn` on.
fn scan_from(data: &[u8], base: u64, sequence: u64, offset: u64, lsn: u64) -> Scan {
    let mut scanner = Scanner::new(sequence, offset, lsn);
    scanner.feed(data, base, true);
    scanner.finish()
}

fn io_err(storage: &dyn Storage, op: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> ShardError {
    let path = storage.path_of(name);
    move |e| ShardError::io(op, path, e)
}

/// Runs `jobs` with up to `in_flight` of them under way at once; their outputs, in order.
async fn bounded<T: 'static>(in_flight: usize, jobs: impl IntoIterator<Item = LocalBoxFuture<T>>) -> Vec<T> {
    assert!(in_flight > 0);
    let mut jobs = jobs.into_iter();
    let mut queue = VecDeque::new();
    let mut out = Vec::new();
    loop {
        while queue.len() < in_flight {
            let Some(job) = jobs.next() else { break };
            // A task per job, so that they are all submitted before the first is awaited.
            queue.push_back(glommio::spawn_local(job));
        }
        let Some(task) = queue.pop_front() else {
            return out;
        };
        out.push(task.await);
    }
}

/// One read of a [`ChunkReader`]: `len` bytes of `buf` from segment offset `offset`.
struct Chunk {
    offset: u64,
    len: usize,
    buf: FixableBuf,
    /// Nothing of the range follows: the range's end, or the end of the file.
    last: bool,
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        &self.buf.buf().as_slice()[..self.len]
    }
}

type ReadTask = glommio::task::JoinHandle<(io::Result<usize>, FixableBuf)>;

/// Reads `[from, to)` of a segment (block aligned) in order, with up to
/// [`RECOVERY_READS_IN_FLIGHT`] reads of [`RECOVERY_READ_BYTES`] in flight, into a fixed set of
/// aligned buffers that go round: the caller hands each chunk back ([`ChunkReader::give_back`])
/// once it has scanned it, and its buffer takes the next read. The device writes straight into
/// them: after their first use, a read allocates nothing, faults in no page and copies nothing.
/// Stops early at the end of the file.
///
/// The buffers are made as the reads first need them, and are fresh mappings that nothing
/// writes before the device ([`AlignedBuf::new_mapped`]): so the first read goes to the device
/// at once, while the next buffers are made, instead of after all of them have been zeroed (16
/// ms of a 75 ms scan of 64 MiB, when they were five of 4 MiB). Each is registered with the storage's ring on its first read
/// ([`SegmentFile::read_into`]), so its pages are pinned once, not for every read.
struct ChunkReader {
    file: Rc<dyn SegmentFile>,
    free: Vec<FixableBuf>,
    /// Buffers made so far (free or in use); at most `buffers_max`.
    buffers: usize,
    /// One more than in flight: the chunk being scanned (fewer for a short range).
    buffers_max: usize,
    queue: VecDeque<(u64, usize, ReadTask)>,
    next: u64,
    to: u64,
}

impl ChunkReader {
    fn new(file: Rc<dyn SegmentFile>, from: u64, to: u64) -> ChunkReader {
        assert_eq!(from % BLOCK_BYTES, 0);
        let chunks = (to.saturating_sub(from)).div_ceil(RECOVERY_READ_BYTES) as usize;
        ChunkReader {
            file,
            free: Vec::new(),
            buffers: 0,
            buffers_max: chunks.min(RECOVERY_READS_IN_FLIGHT + 1),
            queue: VecDeque::new(),
            next: from,
            to,
        }
    }

    /// A free buffer, or a new one if fewer than `buffers_max` exist.
    fn take_buffer(&mut self) -> Option<FixableBuf> {
        if let Some(buf) = self.free.pop() {
            return Some(buf);
        }
        if self.buffers == self.buffers_max {
            return None;
        }
        self.buffers += 1;
        let len = RECOVERY_READ_BYTES as usize;
        // Out of address space for a mapping: a heap buffer reads the same, only dearer.
        let buf = AlignedBuf::new_mapped(len).unwrap_or_else(|_| AlignedBuf::new(len));
        Some(FixableBuf::new(buf))
    }

    fn give_back(&mut self, chunk: Chunk) {
        let mut buf = chunk.buf;
        let capacity = buf.buf().capacity();
        buf.buf_mut().set_len(capacity);
        self.free.push(buf);
    }

    /// Submits reads until [`RECOVERY_READS_IN_FLIGHT`] are in flight (or no buffer is free).
    fn submit(&mut self) {
        while self.queue.len() < RECOVERY_READS_IN_FLIGHT && self.next < self.to {
            let Some(mut buf) = self.take_buffer() else { break };
            let len = RECOVERY_READ_BYTES.min(self.to - self.next) as usize;
            buf.buf_mut().set_len(align_up(len as u64) as usize);
            // A task per read, so that they are all submitted before the first is awaited.
            let task = glommio::spawn_local(self.file.read_into(self.next, buf)).detach();
            self.queue.push_back((self.next, len, task));
            self.next += len as u64;
        }
    }

    async fn next(&mut self, storage: &dyn Storage, name: &str) -> Result<Option<Chunk>, ShardError> {
        self.submit();
        let Some((offset, len, task)) = self.queue.pop_front() else {
            return Ok(None);
        };
        // The buffer of the chunk scanned last takes the next read now, so that as many reads
        // stay in flight while this chunk is scanned (as fio keeps its queue depth).
        self.submit();
        let (read, buf) = task.await.expect("a read task is never cancelled");
        let got = match read {
            Ok(got) => got.min(len),
            Err(e) => {
                self.free.push(buf);
                return Err(io_err(storage, "read segment", name)(e));
            }
        };
        if got < len {
            // The end of the file: nothing after it.
            for (_, _, task) in self.queue.drain(..) {
                let (_, buf) = task.await.expect("a read task is never cancelled");
                self.free.push(buf);
            }
            self.next = self.to;
        }
        let last = self.queue.is_empty() && self.next >= self.to;
        Ok(Some(Chunk {
            offset,
            len: got,
            buf,
            last,
        }))
    }
}

/// First copy of a commit that runs from one read into the next: this much of the next read,
/// doubled until the commit is whole.
const STRADDLE_COPY_BYTES: usize = 64 << 10;

/// Feeds a [`Scanner`] the reads of a segment in place, copying only what runs across the end of
/// a read: the start of a commit that continues in the next one (kept in `carry`, completed from
/// the next read's first bytes), and, once the scan is done, the bytes from the block holding its
/// end on (for the tail of the last segment).
struct InPlaceScan {
    scanner: Scanner,
    /// Bytes before the current read that are still needed, from `carry.base`; they run up to
    /// the current read's start.
    carry: Window,
}

impl InPlaceScan {
    fn new(scanner: Scanner) -> InPlaceScan {
        InPlaceScan {
            scanner,
            carry: Window::default(),
        }
    }

    /// Scans `data` (segment bytes from `base`, following whatever was fed before); `last`: the
    /// bytes end there. Once the scan is done, `carry` holds the bytes from the block holding
    /// its end to the end of the read it ended in; nothing more may be fed.
    fn feed(&mut self, data: &[u8], base: u64, last: bool) {
        if self.carry.bytes.is_empty() {
            self.carry.base = base;
        }
        assert_eq!(
            self.carry.base + self.carry.bytes.len() as u64,
            base,
            "reads follow each other"
        );
        assert!(!self.scanner.done, "nothing is fed after the scan is done");
        if self.scanner.offset < base {
            // A commit started in an earlier read: complete it from the carried bytes and a
            // copy of as much of this read as it needs.
            let carried = self.carry.bytes.len();
            let mut take = 0;
            while !self.scanner.done && self.scanner.offset < base && take < data.len() {
                let more = (take * 2).max(STRADDLE_COPY_BYTES).min(data.len());
                self.carry.bytes.extend_from_slice(&data[take..more]);
                take = more;
                self.scanner
                    .feed(&self.carry.bytes, self.carry.base, last && take == data.len());
            }
            self.carry.bytes.truncate(carried);
        }
        if !self.scanner.done && self.scanner.offset >= base {
            self.scanner.feed(data, base, last);
        }
        self.keep(data, base, align_down(self.scanner.offset));
    }

    /// Keeps the bytes from `from` (clamped to what is held) to the end of `data`.
    fn keep(&mut self, data: &[u8], base: u64, from: u64) {
        let from = from.clamp(self.carry.base, base + data.len() as u64);
        if from >= base {
            self.carry.bytes.clear();
            self.carry.bytes.extend_from_slice(&data[(from - base) as usize..]);
            self.carry.base = from;
        } else {
            self.carry.bytes.drain(..(from - self.carry.base) as usize);
            self.carry.base = from;
            self.carry.bytes.extend_from_slice(data);
        }
    }
}

/// What [`scan_segment`] found.
struct ScannedSegment {
    scan: Scan,
    /// The segment's bytes from the block holding the scan's end on, at least to the end of that
    /// block (or of the file): what had been read when the scan ended.
    tail: Window,
    /// With `read_rest`: the valid commits of the segment after the scan's end, as
    /// [`find_valid_commits`] finds them in the rest of the file.
    behind: Vec<(u64, u64)>,
}

/// Scans a segment from its data offset while it is read. With `read_rest`, reads on to the end
/// of the file after the scan ends, looking for valid commits behind its end where each read
/// landed ([`BehindScan`]): the rest of a segment is read, never copied, so a crash early in a
/// fresh segment costs the device time of the zeros after its end, not a copy of them too.
async fn scan_segment(
    storage: &dyn Storage,
    f: &Found,
    read_rest: bool,
    report: &mut RecoveryReport,
) -> Result<ScannedSegment, ShardError> {
    let mut reader = ChunkReader::new(f.file.clone(), 0, f.capacity());
    let mut scanner = Scanner::new(f.header.sequence, SEGMENT_DATA_OFFSET, f.header.base_lsn);
    if f.capacity() < SEGMENT_BYTES_INDEXED_MAX {
        scanner.streams = Some((f.header.base_lsn, StreamIndex::open()));
    }
    let mut scan = InPlaceScan::new(scanner);
    let mut behind: Option<BehindScan> = None;
    loop {
        if scan.scanner.done && !read_rest {
            break;
        }
        let Some(chunk) = reader.next(storage, &f.name).await? else {
            if !scan.scanner.done {
                // The file ended inside a commit: what is carried is all there is.
                let rest = std::mem::take(&mut scan.carry);
                scan.feed(&rest.bytes, rest.base, true);
                if read_rest {
                    let mut rest_scan = BehindScan::new(f.header.sequence, scan.scanner.offset, f.capacity());
                    rest_scan.feed(&scan.carry.bytes, scan.carry.base, true);
                    behind = Some(rest_scan);
                }
            }
            break;
        };
        report.bytes_read += chunk.len as u64;
        match &mut behind {
            Some(rest_scan) => rest_scan.feed(chunk.bytes(), chunk.offset, chunk.last),
            None => {
                scan.feed(chunk.bytes(), chunk.offset, chunk.last);
                if scan.scanner.done && read_rest {
                    // The rest of this read, from the end on, is searched where it is kept.
                    let mut rest_scan = BehindScan::new(f.header.sequence, scan.scanner.offset, f.capacity());
                    rest_scan.feed(&scan.carry.bytes, scan.carry.base, chunk.last);
                    behind = Some(rest_scan);
                }
            }
        }
        reader.give_back(chunk);
    }
    let InPlaceScan { scanner, carry } = scan;
    let scan = scanner.finish();
    assert!(carry.base <= align_down(scan.end_offset));
    Ok(ScannedSegment {
        scan,
        tail: carry,
        behind: behind.map(BehindScan::finish).unwrap_or_default(),
    })
}

/// [`find_valid_commits`] over the bytes of a segment from an offset to the end of the file,
/// fed piece by piece as they are read and searched where they are, finding what one call on
/// all of them would: at each commit magic, the commit there if it is valid (and the search goes
/// on after it), else the search goes on from the next byte. A candidate that runs past the end
/// of a piece is completed from copies of the next piece's first bytes (as [`InPlaceScan`]
/// completes a commit), so what is copied is the candidates that straddle two pieces (at most
/// as long as their headers claim, within the file), however long the rest.
struct BehindScan {
    sequence: u64,
    /// Where the search goes on: everything before it has been decided.
    next: u64,
    /// The end of the range: a candidate that needs bytes past it can never be valid.
    to: u64,
    /// Bytes from `next` (or a little before) to the end of what was fed, when they are needed
    /// again: a candidate not yet whole, or the last bytes, which may start a magic.
    carry: Window,
    found: Vec<(u64, u64)>,
    done: bool,
}

impl BehindScan {
    fn new(sequence: u64, from: u64, to: u64) -> BehindScan {
        BehindScan {
            sequence,
            next: from,
            to,
            carry: Window::default(),
            found: Vec::new(),
            done: false,
        }
    }

    /// Searches `data` (bytes from `base`, following what was fed before, reaching back at least
    /// to `next`, or starting there); `last`: nothing follows.
    fn feed(&mut self, data: &[u8], base: u64, last: bool) {
        assert!(!self.done);
        if self.carry.bytes.is_empty() {
            self.carry.base = base;
        }
        assert_eq!(
            self.carry.base + self.carry.bytes.len() as u64,
            base,
            "pieces follow each other"
        );
        assert!(self.next >= self.carry.base);
        if !self.carry.bytes.is_empty() {
            // Decide what starts in the carried bytes, from copies of as much of `data` as that
            // needs.
            let mut carry = std::mem::take(&mut self.carry);
            let mut take = 0;
            while !self.done && self.next < base {
                let more = (take * 2).max(STRADDLE_COPY_BYTES).min(data.len());
                carry.bytes.extend_from_slice(&data[take..more]);
                take = more;
                self.search(&carry.bytes, carry.base, last && take == data.len());
                if take == data.len() {
                    break;
                }
            }
            if take == data.len() {
                // All of `data` is in the copy: keep what is still needed of it where it is, so
                // that a candidate waiting for many pieces costs one copy of each.
                if last {
                    self.done = true;
                    return;
                }
                let end = carry.base + carry.bytes.len() as u64;
                let from = self.next.clamp(carry.base, end);
                carry.bytes.drain(..(from - carry.base) as usize);
                carry.base = from;
                self.carry = carry;
                return;
            }
        }
        if !self.done {
            self.search(data, base, last);
        }
        self.keep(data, base, last);
    }

    /// Searches `buf` (bytes from `base`) from `next` on; `last`: nothing follows. Stops where
    /// it needs bytes after `buf`.
    fn search(&mut self, buf: &[u8], base: u64, last: bool) {
        let magic = COMMIT_MAGIC.to_le_bytes();
        let end = base + buf.len() as u64;
        while !self.done {
            if self.next >= end {
                // Nothing of `buf` is left to search (it may all come before where the search
                // starts).
                self.done = last;
                return;
            }
            let from = (self.next - base) as usize;
            let Some(pos) = memchr::memmem::find(&buf[from..], &magic) else {
                // No magic starts before the last few bytes, which may start one.
                self.next = self.next.max(end.saturating_sub(magic.len() as u64 - 1));
                self.done = last;
                return;
            };
            let at = from + pos;
            let at_offset = base + at as u64;
            if at + COMMIT_HEADER_BYTES > buf.len() {
                // As `find_valid_commits`: a header cut off by the end is not a commit, and
                // neither is any later candidate.
                self.next = at_offset;
                self.done = last;
                return;
            }
            match parse_commit(&buf[at..], self.sequence) {
                Ok(view) => {
                    let commit_end = at_offset + view.total_bytes as u64;
                    self.found.push((at_offset, commit_end));
                    self.next = commit_end;
                }
                Err(ParseError::Short { needed }) if !last && at_offset + needed as u64 <= self.to => {
                    // Whole only with bytes still to come.
                    self.next = at_offset;
                    return;
                }
                Err(_) => self.next = at_offset + 1,
            }
        }
    }

    /// Keeps the bytes of `buf` (from `base`) from `next` on, to be searched with what follows.
    fn keep(&mut self, buf: &[u8], base: u64, last: bool) {
        let end = base + buf.len() as u64;
        self.carry.bytes.clear();
        self.carry.base = end;
        if last {
            self.done = true;
            return;
        }
        let from = self.next.clamp(base, end);
        self.carry.base = from;
        self.carry.bytes.extend_from_slice(&buf[(from - base) as usize..]);
    }

    /// The valid commits found; what is still carried is searched as the end of the range.
    fn finish(mut self) -> Vec<(u64, u64)> {
        if !self.done {
            let carry = std::mem::take(&mut self.carry);
            self.search(&carry.bytes, carry.base, true);
        }
        self.found
    }
}

/// Bytes of a segment held across reads, from `base` on.
#[derive(Default)]
struct Window {
    base: u64,
    bytes: Vec<u8>,
}

/// Reads `[from, to)` of a segment (block aligned), with up to [`RECOVERY_READS_IN_FLIGHT`]
/// reads of [`RECOVERY_READ_BYTES`] in flight. Stops early at the end of the file.
async fn read_range(storage: &dyn Storage, f: &Found, from: u64, to: u64) -> Result<Vec<u8>, ShardError> {
    assert_eq!(from % BLOCK_BYTES, 0);
    let mut data = Vec::with_capacity(to.saturating_sub(from) as usize);
    let mut queue = VecDeque::new();
    let mut next = from;
    loop {
        while queue.len() < RECOVERY_READS_IN_FLIGHT && next < to {
            let len = RECOVERY_READ_BYTES.min(to - next) as usize;
            // A task per read, so that they are all submitted before the first is awaited.
            queue.push_back((len, glommio::spawn_local(f.file.read(next, len))));
            next += len as u64;
        }
        let Some((len, read)) = queue.pop_front() else {
            break;
        };
        let chunk = read.await.map_err(io_err(storage, "read segment", &f.name))?;
        data.extend_from_slice(&chunk);
        if chunk.len() < len {
            break;
        }
    }
    Ok(data)
}

/// Zeroes `[end, zero_to)` (rounded out to blocks, keeping `tail`, the bytes of the block
/// holding `end` before it) and syncs.
async fn zero_after(storage: &dyn Storage, f: &Found, tail: &[u8], end: u64, zero_to: u64) -> Result<(), ShardError> {
    let start = align_down(end);
    assert_eq!(start + tail.len() as u64, end);
    assert!(zero_to >= end);
    let stop = align_up(zero_to);
    let mut buf = storage.alloc((stop - start) as usize);
    buf.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    f.file
        .write(start, buf)
        .await
        .map_err(io_err(storage, "zero torn tail", &f.name))?;
    f.file
        .sync()
        .await
        .map_err(io_err(storage, "sync torn tail", &f.name))?;
    Ok(())
}

/// Reads the whole of a summary or checkpoint file.
fn read_whole(storage: &dyn Storage, opts: &ShardOptions, name: &str) -> impl Future<Output = io::Result<Vec<u8>>> {
    let open = storage.open(name, false, opts.durability);
    async move {
        let file = open.await?;
        let size = file.size().await?;
        let data = file.read(0, align_down(size) as usize).await;
        let _ = file.close().await;
        data
    }
}

/// Decodes a summary or checkpoint file read by [`read_whole`]. Anything that is not a valid one
/// is reported and ignored: recovery then scans, so an unreadable summary costs time, never data.
fn decode_summary(
    opts: &ShardOptions,
    name: &str,
    kind: SummaryKind,
    read: io::Result<Vec<u8>>,
) -> Option<SegmentSummary> {
    match read {
        Ok(data) => match SegmentSummary::decode(kind, &data) {
            Ok(s) => Some(s),
            Err(reason) => {
                tracing::warn!(shard = opts.shard_id, %name, %reason, "ignoring an invalid summary; scanning instead");
                None
            }
        },
        Err(e) => {
            tracing::warn!(shard = opts.shard_id, %name, error = %e, "ignoring an unreadable summary; scanning instead");
            None
        }
    }
}

/// The sealed summary of each found segment that has one, read [`RECOVERY_FILES_IN_FLIGHT`] at
/// a time; `None` where there is none or it is not valid.
async fn read_summaries(
    storage: &dyn Storage,
    opts: &ShardOptions,
    found: &[Found],
    summary_names: &BTreeSet<String>,
) -> Vec<Option<SegmentSummary>> {
    let names: Vec<Option<String>> = found
        .iter()
        .map(|f| match f.manifest {
            Some(_) => None,
            None => Some(summary_name(f.header.base_lsn)).filter(|n| summary_names.contains(n)),
        })
        .collect();
    let jobs = names
        .iter()
        .flatten()
        .map(|name| -> LocalBoxFuture<io::Result<Vec<u8>>> { Box::pin(read_whole(storage, opts, name)) });
    let mut reads = bounded(RECOVERY_FILES_IN_FLIGHT, jobs).await.into_iter();
    names
        .iter()
        .map(|name| {
            let name = name.as_ref()?;
            let read = reads.next().expect("one read per summary name");
            decode_summary(opts, name, SummaryKind::Sealed, read)
        })
        .collect()
}

/// The stream index read for segment `f`, if it is valid and describes the segment `summary`
/// (which recovery trusts) describes. Anything else is reported and ignored.
fn trusted_index(
    opts: &ShardOptions,
    f: &Found,
    summary: &SegmentSummary,
    read: Option<io::Result<Vec<u8>>>,
) -> Option<SealedIndex> {
    let name = stream_index_name(f.header.base_lsn);
    let reason = match read? {
        Ok(data) => match SealedIndex::decode(&data, summary) {
            Ok(index) => return Some(index),
            Err(reason) => reason,
        },
        Err(e) => e.to_string(),
    };
    tracing::warn!(shard = opts.shard_id, %name, %reason, "ignoring a stream index that is not trusted");
    None
}

/// How the last segment was recovered.
struct Last {
    scan: Scan,
    /// Bytes of the block holding the end, before the end.
    tail: Vec<u8>,
    /// Recovered from a summary: the segment is sealed and the next commit starts a new one.
    sealed: bool,
}

/// Checks that a trusted summary or checkpoint of the last segment describes its end: the
/// commits from its last index entry end exactly at its end, and no valid commit of the segment
/// lies in the bytes a torn pipeline could have left behind it. `None`: it does not.
async fn verify_end(
    storage: &dyn Storage,
    opts: &ShardOptions,
    f: &Found,
    s: &SegmentSummary,
    report: &mut RecoveryReport,
) -> Result<Option<Last>, ShardError> {
    let (lsn, offset) = s.index.last().copied().unwrap_or((s.base_lsn, SEGMENT_DATA_OFFSET));
    let from = align_down(offset);
    let behind = (PIPELINE_DEPTH * opts.commit_bytes_max) as u64;
    let to = align_up(s.end_offset + behind).min(f.capacity());
    let data = read_range(storage, f, from, to).await?;
    report.bytes_read += data.len() as u64;
    let end_at = (s.end_offset - from) as usize;
    if data.len() < end_at {
        return Ok(None);
    }
    let scan = scan_from(&data[..end_at], from, f.header.sequence, offset, lsn);
    if scan.end_offset != s.end_offset || scan.end_lsn != s.end_lsn || scan.stop.is_some() {
        return Ok(None);
    }
    if !find_valid_commits(&data[end_at..], s.end_offset, f.header.sequence).is_empty() {
        return Ok(None);
    }
    let tail = data[(align_down(s.end_offset) - from) as usize..end_at].to_vec();
    let scan = Scan {
        end_offset: s.end_offset,
        end_lsn: s.end_lsn,
        index: s.index.clone(),
        commits: s.commits,
        commits_crc: s.commits_crc,
        stop: None,
        streams: None,
    };
    Ok(Some(Last {
        scan,
        tail,
        sealed: false,
    }))
}

/// Recovers the last segment: from its summary or the checkpoint if they check out, by a scan
/// that cuts a torn tail otherwise.
async fn recover_last(
    storage: &dyn Storage,
    opts: &ShardOptions,
    f: &Found,
    summary: Option<SegmentSummary>,
    checkpoint: Option<&SegmentSummary>,
    six: Option<io::Result<Vec<u8>>>,
    report: &mut RecoveryReport,
) -> Result<Last, ShardError> {
    let shard = opts.shard_id;
    let sealed = summary.is_some();
    let trusted = summary.or_else(|| checkpoint.filter(|c| f.matches(c)).cloned());
    if let Some(t) = &trusted {
        let started = Instant::now();
        let mut verified = verify_end(storage, opts, f, t, report).await?;
        report.scan_us += started.elapsed().as_micros() as u64;
        if let Some(last) = &mut verified {
            // [stream_index] The index written with the summary or checkpoint, or a scan
            // rebuilds it: the segment may take more commits, and they go into its index.
            if f.capacity() < SEGMENT_BYTES_INDEXED_MAX {
                last.scan.streams = trusted_index(opts, f, t, six).map(|sealed_index| {
                    let mut index = StreamIndex::Sealed(sealed_index);
                    if !sealed {
                        index.reopen();
                    }
                    index
                });
                if last.scan.streams.is_none() {
                    verified = None;
                }
            }
        }
        if let Some(mut last) = verified {
            last.sealed = sealed;
            report.trusted += 1;
            report.checkpoint_used |= !sealed;
            return Ok(last);
        }
        tracing::warn!(
            shard,
            segment = f.header.sequence,
            "the last segment's summary or checkpoint does not match its end; scanning it"
        );
    }
    report.scanned += 1;
    let started = Instant::now();
    let ScannedSegment { scan: s, tail, behind } = scan_segment(storage, f, true, report).await?;
    if let Some(t) = &trusted {
        if s.end_lsn < t.end_lsn {
            let reason = format!(
                "a summary or checkpoint vouched for lsns up to {} as durable, the segment holds \
                 only up to {}",
                t.end_lsn - 1,
                s.end_lsn.saturating_sub(1)
            );
            if !opts.repair {
                return Err(ShardError::Corruption {
                    shard,
                    segment: f.header.sequence,
                    offset: s.end_offset,
                    reason,
                });
            }
            tracing::warn!(shard, segment = f.header.sequence, %reason, "repair: keeping what the scan found");
        }
    }
    if behind.len() >= PIPELINE_DEPTH && !opts.repair {
        return Err(ShardError::Corruption {
            shard,
            segment: f.header.sequence,
            offset: s.end_offset,
            reason: format!(
                "{}; {} valid commits follow it, more than a torn write can leave",
                s.stop.clone().unwrap_or_else(|| "zeroed commit".into()),
                behind.len()
            ),
        });
    }
    if let Some(reason) = &s.stop {
        tracing::info!(shard, segment = f.header.sequence, offset = s.end_offset, %reason, "cutting torn tail");
    }
    let zero_to = behind
        .last()
        .map_or(align_up(s.end_offset), |&(_, end)| end.max(align_up(s.end_offset)));
    // Something to zero: a valid commit behind the end, or anything but zeros in the rest of
    // the block holding the end (up to the end of the file).
    let block_end = align_up(s.end_offset).min(tail.base + tail.bytes.len() as u64);
    let dirty = !behind.is_empty()
        || tail.bytes[(s.end_offset - tail.base) as usize..(block_end - tail.base) as usize]
            .iter()
            .any(|&b| b != 0);
    let tail =
        tail.bytes[(align_down(s.end_offset) - tail.base) as usize..(s.end_offset - tail.base) as usize].to_vec();
    if dirty {
        zero_after(storage, f, &tail, s.end_offset, zero_to).await?;
    }
    report.scan_us += started.elapsed().as_micros() as u64;
    Ok(Last {
        scan: s,
        tail,
        sealed: false,
    })
}

/// When a segment recovered without the manifest was sealed: its file's modification time.
fn sealed_unix_ms(storage: &dyn Storage, name: &str) -> u64 {
    unix_ms(storage.modified(name).unwrap_or_else(SystemTime::now))
}

fn segment_from(f: &Found, s: &mut Scan) -> Segment {
    let seg = Segment::new(
        f.header.sequence,
        f.header.base_lsn,
        f.capacity(),
        f.name.clone(),
        f.file.clone(),
        (s.end_lsn, s.end_offset),
        s.index.clone(),
        s.commits,
        s.commits_crc,
    );
    *seg.streams.borrow_mut() = s.streams.take();
    seg
}

/// Sorts the `.wal` and `.prep` files into segments (by sequence) and spares. A `.wal` file the
/// manifest lists is taken from it unopened, except the first and the last of those: retention
/// turns the oldest segment into a spare (its header zeroed) before it renames it, and the last
/// one may be the end of the log, so those two are opened and their headers read as every file
/// the manifest does not list is. That is at most two files whatever the length of the log.
async fn find_segments(
    storage: &Rc<dyn Storage>,
    opts: &ShardOptions,
    names: &[String],
    manifest: Option<&Manifest>,
) -> Result<(Vec<Found>, Vec<String>), ShardError> {
    let shard = opts.shard_id;
    let mut found = Vec::new();
    let mut spares = Vec::new();
    let listed: BTreeSet<&String> = names.iter().collect();
    let mut covered: Vec<(String, ManifestEntry)> = manifest
        .map(|m| {
            m.entries
                .iter()
                .map(|e| (segment_name(e.base_lsn), *e))
                .filter(|(name, _)| listed.contains(name))
                .collect()
        })
        .unwrap_or_default();
    // The first and the last are opened.
    if !covered.is_empty() {
        covered.remove(0);
    }
    covered.pop();
    let covered: std::collections::BTreeMap<String, ManifestEntry> = covered.into_iter().collect();
    for (name, e) in &covered {
        found.push(Found {
            name: name.clone(),
            header: SegmentHeader {
                shard_id: shard,
                sequence: e.sequence,
                base_lsn: e.base_lsn,
            },
            file: Rc::new(LazyFile::new(storage.clone(), name, opts.durability)),
            size: e.file_bytes,
            manifest: Some(*e),
        });
    }
    let storage: &dyn Storage = &**storage;
    let candidates: Vec<&String> = names
        .iter()
        .filter(|n| (n.ends_with(".wal") || n.ends_with(".prep")) && !covered.contains_key(*n))
        .collect();
    let jobs = candidates.iter().map(|name| -> LocalBoxFuture<_> {
        let open = storage.open(name, false, opts.durability);
        Box::pin(async move {
            let file = open.await.map_err(|e| ("open segment", e))?;
            let size = file.size().await.map_err(|e| ("stat segment", e))?;
            let block = match size >= BLOCK_BYTES {
                true => file
                    .read(0, BLOCK_BYTES as usize)
                    .await
                    .map_err(|e| ("read segment header", e))?,
                false => Vec::new(),
            };
            Ok::<_, (&'static str, io::Error)>((file, size, block))
        })
    });
    let opened = bounded(RECOVERY_FILES_IN_FLIGHT, jobs).await;
    for (name, opened) in candidates.into_iter().zip(opened) {
        let is_wal = name.ends_with(".wal");
        let (file, size, block) = opened.map_err(|(op, e)| ShardError::io(op, storage.path_of(name), e))?;
        match SegmentHeader::decode(&block) {
            HeaderBlock::Valid(header) => {
                if header.shard_id != shard {
                    return Err(ShardError::Corruption {
                        shard,
                        segment: header.sequence,
                        offset: 0,
                        reason: format!(
                            "{name} belongs to shard {}, not {shard}: wrong directory?",
                            header.shard_id
                        ),
                    });
                }
                found.push(Found {
                    name: name.clone(),
                    header,
                    file,
                    size,
                    manifest: None,
                });
            }
            HeaderBlock::Zero => spares.push(name.clone()),
            HeaderBlock::Invalid(_) if !is_wal || opts.repair => spares.push(name.clone()),
            HeaderBlock::Invalid(reason) => {
                return Err(ShardError::Corruption {
                    shard,
                    segment: 0,
                    offset: 0,
                    reason: format!("{name}: {reason}"),
                })
            }
        }
    }
    found.sort_by_key(|f| f.header.sequence);
    Ok((found, spares))
}

pub(crate) async fn recover(storage: &Rc<dyn Storage>, opts: &ShardOptions) -> Result<Recovered, ShardError> {
    let started = Instant::now();
    let mut names = storage
        .list()
        .await
        .map_err(io_err(&**storage, "list shard directory", ""))?;
    names.sort();
    let manifest = match names.iter().any(|n| n == MANIFEST_NAME) {
        true => read_manifest(&**storage, opts).await,
        false => None,
    };
    let mut rec = match recover_with(storage, opts, &names, manifest.as_ref()).await? {
        Attempt::Done(rec) => *rec,
        Attempt::WithoutManifest(reason) => {
            tracing::warn!(shard = opts.shard_id, %reason, "the manifest does not fit the log; recovering without it");
            match recover_with(storage, opts, &names, None).await? {
                Attempt::Done(rec) => *rec,
                Attempt::WithoutManifest(_) => unreachable!("only a manifest is given up on"),
            }
        }
    };
    rec.report.elapsed_us = started.elapsed().as_micros() as u64;
    tracing::info!(shard = opts.shard_id, report = ?rec.report, "recovered");
    Ok(rec)
}

enum Attempt {
    Done(Box<Recovered>),
    /// A segment taken from the manifest does not continue into the next one (or the next into
    /// it): the manifest is not to be trusted, and recovery starts again without it.
    WithoutManifest(String),
}

/// Reads and checks the manifest; `None` (and a warning) if it is not one of this shard.
async fn read_manifest(storage: &dyn Storage, opts: &ShardOptions) -> Option<Manifest> {
    let read = match read_whole(storage, opts, MANIFEST_NAME).await {
        Ok(read) => read,
        Err(e) => {
            tracing::warn!(shard = opts.shard_id, error = %e, "ignoring an unreadable manifest");
            return None;
        }
    };
    match Manifest::decode(&read) {
        Ok(m) if m.shard_id == opts.shard_id => Some(m),
        Ok(m) => {
            tracing::warn!(
                shard = opts.shard_id,
                manifest_shard = m.shard_id,
                "ignoring the manifest of another shard"
            );
            None
        }
        Err(reason) => {
            tracing::warn!(shard = opts.shard_id, %reason, "ignoring an invalid manifest; reading each segment instead");
            None
        }
    }
}

/// Where the stream runs of a sealed segment recovery accepted from its summary stand: its
/// `.runs` file is loaded by the first filtered read that needs it; without one, the background
/// task makes it if the segment has a stream index file (a segment whose index is missing gets
/// runs once the index is rebuilt and the segment sealed again: never, so a log written without
/// indexes costs a restart no walk of every segment).
fn runs_state_at_open(opts: &ShardOptions, names: &BTreeSet<String>, f: &Found) -> RunsState {
    let base = f.header.base_lsn;
    if f.capacity() >= SEGMENT_BYTES_INDEXED_MAX {
        RunsState::None
    } else if names.contains(&stream_runs_name(base)) {
        RunsState::OnDisk
    } else if opts.stream_runs == crate::StreamRuns::Auto && names.contains(&stream_index_name(base)) {
        RunsState::Pending
    } else {
        RunsState::None
    }
}

async fn recover_with(
    storage_rc: &Rc<dyn Storage>,
    opts: &ShardOptions,
    names: &[String],
    manifest: Option<&Manifest>,
) -> Result<Attempt, ShardError> {
    let storage: &dyn Storage = &**storage_rc;
    let shard = opts.shard_id;
    // Summaries and stream indexes: read for the segments that have them, removed for the others.
    let summary_names: BTreeSet<String> = names
        .iter()
        .filter(|n| n.ends_with(".sum") || n.ends_with(".six") || n.ends_with(".runs"))
        .cloned()
        .collect();
    let has_checkpoint = names.iter().any(|n| n == CHECKPOINT_NAME);
    let (found, spares) = find_segments(storage_rc, opts, names, manifest).await?;
    // Seal times as the manifest keeps them (also of the segments it lists that were opened),
    // else the files' modification times: a manifest written again keeps the same bytes.
    let sealed_ms: std::collections::BTreeMap<(u64, u64), u64> = manifest
        .map(|m| {
            m.entries
                .iter()
                .map(|e| ((e.sequence, e.base_lsn), e.sealed_unix_ms))
                .collect()
        })
        .unwrap_or_default();
    let sealed_at = |f: &Found| match sealed_ms.get(&(f.header.sequence, f.header.base_lsn)) {
        Some(&ms) => ms,
        None => sealed_unix_ms(storage, &f.name),
    };
    let checkpoint = match has_checkpoint {
        true => {
            let read = read_whole(storage, opts, CHECKPOINT_NAME).await;
            decode_summary(opts, CHECKPOINT_NAME, SummaryKind::Checkpoint, read)
        }
        false => None,
    };

    let mut report = RecoveryReport::default();
    let mut findings = Vec::new();
    let first_available = found.first().map_or(1, |f| f.header.base_lsn);
    let mut segments: VecDeque<Rc<Segment>> = VecDeque::new();
    let mut active = None;
    let mut next_lsn = first_available;
    let mut keep = found.len();
    let mut summaries = read_summaries(storage, opts, &found, &summary_names).await;
    assert_eq!(summaries.len(), found.len());
    for i in 0..found.len() {
        let f = &found[i];
        let summary = match f.manifest {
            Some(e) => Some(e.summary(shard)),
            None => summaries[i].take(),
        }
        .filter(|s| f.matches(s));
        let Some(next) = found.get(i + 1) else {
            // [stream_index] The last segment's index, if written with its summary or the checkpoint.
            let six_name = stream_index_name(f.header.base_lsn);
            let six = match summary_names.contains(&six_name) {
                true => Some(read_whole(storage, opts, &six_name).await),
                false => None,
            };
            let mut last = recover_last(storage, opts, f, summary, checkpoint.as_ref(), six, &mut report).await?;
            let seg = Rc::new(segment_from(f, &mut last.scan));
            if last.sealed {
                seg.set_sealed_at(sealed_at(f));
                seg.summary.set(SummaryState::Durable);
                seg.runs_state.set(runs_state_at_open(opts, &summary_names, f));
            } else {
                // [stream_runs] Its tail books the commits from here on; the runs task walks the
                // part before and joins the two.
                if opts.stream_runs == crate::StreamRuns::Auto && seg.streams.borrow().is_some() {
                    crate::stream_runs::resume_tail(&seg);
                }
                active = Some(Active {
                    seg: seg.clone(),
                    offset: last.scan.end_offset,
                    tail: last.tail,
                    header_pending: false,
                });
            }
            next_lsn = last.scan.end_lsn;
            segments.push_back(seg);
            break;
        };
        let continues = |end_lsn: u64| next.header.sequence == f.header.sequence + 1 && next.header.base_lsn == end_lsn;
        let from_manifest = f.manifest.is_some() || next.manifest.is_some();
        if from_manifest && !summary.as_ref().is_some_and(|s| continues(s.end_lsn)) {
            return Ok(Attempt::WithoutManifest(format!(
                "segment {} ({}) does not continue into segment {} ({})",
                f.header.sequence, f.name, next.header.sequence, next.name
            )));
        }
        let seg = match summary {
            Some(s) if continues(s.end_lsn) => {
                report.trusted += 1;
                let seg = Segment::new(
                    f.header.sequence,
                    f.header.base_lsn,
                    f.capacity(),
                    f.name.clone(),
                    f.file.clone(),
                    (s.end_lsn, s.end_offset),
                    s.index,
                    s.commits,
                    s.commits_crc,
                );
                seg.summary.set(SummaryState::Durable);
                // [stream_index] Loaded by the first filtered read of the segment.
                seg.streams_on_disk.set(f.capacity() < SEGMENT_BYTES_INDEXED_MAX);
                seg.runs_state.set(runs_state_at_open(opts, &summary_names, f));
                // From the manifest: the index is read from the `.sum` on first use.
                seg.index_loaded.set(f.manifest.is_none());
                seg
            }
            summary => {
                report.scanned += 1;
                let started = Instant::now();
                let mut s = scan_segment(storage, f, false, &mut report).await?.scan;
                report.scan_us += started.elapsed().as_micros() as u64;
                if !continues(s.end_lsn) {
                    let reason = s.stop.clone().unwrap_or_else(|| {
                        format!(
                            "segment ends at lsn {} but the next segment ({}) is sequence {} from lsn {}",
                            s.end_lsn, next.name, next.header.sequence, next.header.base_lsn
                        )
                    });
                    if !opts.repair {
                        return Err(ShardError::Corruption {
                            shard,
                            segment: f.header.sequence,
                            offset: s.end_offset,
                            reason,
                        });
                    }
                    tracing::warn!(shard, segment = f.header.sequence, offset = s.end_offset, %reason,
                        "repair: truncating the log");
                    keep = i + 1;
                    // The cut segment becomes the last one: its end is cut like a torn tail.
                    let mut last = recover_last(storage, opts, f, None, None, None, &mut report).await?;
                    let seg = Rc::new(segment_from(f, &mut last.scan));
                    active = Some(Active {
                        seg: seg.clone(),
                        offset: last.scan.end_offset,
                        tail: last.tail,
                        header_pending: false,
                    });
                    next_lsn = last.scan.end_lsn;
                    segments.push_back(seg);
                    break;
                }
                if let Some(bad) = summary {
                    let finding = format!(
                        "shard {shard}: the summary of segment {} says it ends at lsn {} (offset {}), \
                         its body and the next segment say lsn {} (offset {}); recovered from the body",
                        f.header.sequence, bad.end_lsn, bad.end_offset, s.end_lsn, s.end_offset
                    );
                    tracing::error!(shard, segment = f.header.sequence, %finding, "summary disagrees with the log");
                    findings.push(finding);
                }
                let seg = segment_from(f, &mut s);
                // The background task writes (or rewrites) its summary.
                seg.summary.set(SummaryState::Pending);
                seg
            }
        };
        // From the manifest without a stat of the file: a stat per segment costs a device read
        // each with a cold cache.
        seg.set_sealed_at(sealed_at(f));
        next_lsn = seg.durable_end.get().0;
        segments.push_back(Rc::new(seg));
    }
    report.segments = segments.len() as u64;

    // The manifest of the log as recovered: written now if it differs from the one on disk
    // (older than the log, a summary read from a `.sum`, or a segment cut by repair), before any
    // file is removed and before new segments can take the names of cut ones.
    let wanted = Manifest {
        shard_id: shard,
        entries: segments
            .iter()
            .filter(|s| s.summary.get() == SummaryState::Durable)
            .map(|s| s.manifest_entry())
            .collect(),
    };
    // (No manifest is needed for a log of no sealed segment.)
    if manifest.map_or(!wanted.entries.is_empty(), |m| *m != wanted) {
        crate::background::write_manifest_file(storage, opts.durability, &wanted)
            .await
            .map_err(io_err(storage, "write manifest", MANIFEST_NAME))?;
    }

    tidy_directory(
        storage_rc,
        &found[keep..],
        &spares,
        &summary_names,
        &segments,
        has_checkpoint,
    )
    .await?;
    let segs = Segments::recovered(segments, active, first_available);
    Ok(Attempt::Done(Box::new(Recovered {
        segs,
        next_lsn,
        findings,
        report,
    })))
}

/// Gives a segment recovered from the manifest its sparse index, on first use (a read, the
/// scrub): from its `.sum` if that is valid and agrees with the manifest, else by a scan of the
/// body, which must then agree with the manifest (else `Corruption`). Returns whether the `.sum`
/// must be written again (the caller wakes the background task, which does it).
pub(crate) async fn load_index(storage: &dyn Storage, opts: &ShardOptions, seg: &Segment) -> Result<bool, ShardError> {
    if seg.index_loaded.get() {
        return Ok(false);
    }
    let shard = opts.shard_id;
    let fixed = seg.summary(shard);
    let name = summary_name(seg.base_lsn);
    let read = read_whole(storage, opts, &name).await;
    if let Some(s) = decode_summary(opts, &name, SummaryKind::Sealed, read) {
        if (SegmentSummary {
            index: Vec::new(),
            ..s.clone()
        }) == fixed
        {
            if !seg.index_loaded.get() {
                *seg.index.borrow_mut() = s.index;
                seg.index_loaded.set(true);
            }
            return Ok(false);
        }
        tracing::warn!(
            shard,
            segment = seg.sequence,
            "the summary disagrees with the manifest; scanning the segment"
        );
    }
    let f = Found {
        name: seg.name.borrow().clone(),
        header: SegmentHeader {
            shard_id: shard,
            sequence: seg.sequence,
            base_lsn: seg.base_lsn,
        },
        file: seg.file.clone(),
        size: seg.capacity,
        manifest: None,
    };
    let scan = scan_segment(storage, &f, false, &mut RecoveryReport::default())
        .await?
        .scan;
    let found = (scan.end_lsn, scan.end_offset, scan.commits, scan.commits_crc);
    let want = (fixed.end_lsn, fixed.end_offset, fixed.commits, fixed.commits_crc);
    if found != want {
        return Err(ShardError::Corruption {
            shard,
            segment: seg.sequence,
            offset: scan.end_offset,
            reason: format!(
                "the body (end lsn, end offset, commits, commits crc) = {found:?} disagrees with the manifest {want:?}{}",
                scan.stop.map(|s| format!(": {s}")).unwrap_or_default()
            ),
        });
    }
    if !seg.index_loaded.get() {
        *seg.index.borrow_mut() = scan.index;
        seg.index_loaded.set(true);
    }
    let rewrite = seg.summary.get() == SummaryState::Durable && !seg.retired.get();
    if rewrite {
        seg.summary.set(SummaryState::Pending);
    }
    Ok(rewrite)
}

/// Removes what recovery left out (segments after a repair cut, spares, summaries of segments
/// that are gone, the checkpoint) and gives activated segments their names, all before the first
/// new write. The directory is synced before this returns if anything but spares and the
/// checkpoint changed; if only those did (a clean restart), the sync is started here and
/// finishes in the background, after the shard is open: a clean restart does not wait for a
/// device flush before listening.
///
/// Why the removal of the checkpoint (and of spares) need not be durable before new writes:
/// - A spare that comes back after a crash is a spare again, and removed again.
/// - A checkpoint that comes back after a crash is only trusted again if nothing was
///   acknowledged after it. New commits go to the checkpoint's segment at exactly its end
///   offset, one after the other, and are acknowledged in order; so if any was acknowledged,
///   the first one, which starts at the checkpoint's end, is durable and valid, and
///   [`verify_end`] refuses a checkpoint with a valid commit in the `PIPELINE_DEPTH` commits'
///   worth of bytes after its end: the segment is scanned, and the scan finds every commit. (If
///   the log moved on to a newer segment, the checkpoint does not name the last segment and is
///   ignored.) Trusting it a second time with nothing acknowledged after it recovers exactly what
///   the first time did; the torn, unacknowledged commits behind its end are then in the bytes
///   `verify_end` reads, and any valid one among them makes the segment be scanned and cut.
/// - Worked case: the restart removes the checkpoint, its removal is not yet durable, one commit
///   is acknowledged, the machine loses power. The next open finds the checkpoint, reads its end,
///   finds the acknowledged commit right behind it, and scans: nothing is lost.
///
/// Segments cut by repair and summaries of segments that are gone are different: a new segment
/// can take the name and base lsn of a cut one, and a stale summary that came back could then
/// describe it. So are activated segments' names, kept as they were. Their changes are synced
/// before the first new write.
async fn tidy_directory(
    storage_rc: &Rc<dyn Storage>,
    cut: &[Found],
    spares: &[String],
    summary_names: &BTreeSet<String>,
    segments: &VecDeque<Rc<Segment>>,
    has_checkpoint: bool,
) -> Result<(), ShardError> {
    let storage: &dyn Storage = &**storage_rc;
    let mut remove: Vec<String> = cut.iter().map(|f| f.name.clone()).collect();
    let kept: BTreeSet<String> = segments
        .iter()
        .flat_map(|s| [summary_name(s.base_lsn), stream_index_name(s.base_lsn)])
        // A runs file is a sealed segment's only (the active one's would describe less of it).
        .chain(
            segments
                .iter()
                .filter(|s| s.summary.get() != SummaryState::Open)
                .map(|s| stream_runs_name(s.base_lsn)),
        )
        .collect();
    remove.extend(summary_names.iter().filter(|n| !kept.contains(*n)).cloned());
    // Changes that must be durable before the first new write.
    let mut must_sync = !remove.is_empty();
    // Changes that may become durable later (see above).
    let mut may_sync = !spares.is_empty() || has_checkpoint;
    remove.extend(spares.iter().cloned());
    if has_checkpoint {
        // The checkpoint describes the log as it was at the shutdown; it goes before the log
        // changes, so that an open after this one does not find it unless its removal was lost
        // to a crash (see above for why that is safe).
        remove.push(CHECKPOINT_NAME.to_string());
    }
    for name in &remove {
        storage
            .remove(name)
            .await
            .map_err(io_err(storage, "remove stale file", name))?;
    }
    for seg in segments {
        let want = segment_name(seg.base_lsn);
        let have = seg.name.borrow().clone();
        if have != want {
            storage
                .rename(&have, &want)
                .await
                .map_err(io_err(storage, "rename segment", &have))?;
            *seg.name.borrow_mut() = want;
            must_sync = true;
        }
    }
    if must_sync {
        storage
            .sync_dir()
            .await
            .map_err(io_err(storage, "sync shard directory", ""))?;
        may_sync = false;
    }
    if may_sync {
        let sync = storage_rc.sync_dir();
        glommio::spawn_local(async move {
            // Nothing depends on it (see above), so a failure is reported, not fatal; the next
            // directory sync (the background task's, or the next open's) covers it.
            if let Err(e) = sync.await {
                tracing::warn!(error = %e, "syncing the shard directory after a restart failed");
            }
        })
        .detach();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_record, seal_commit};

    /// A segment image from offset 0: a header block's worth of zeros, then `commits` commits of
    /// varied sizes of segment `sequence` from lsn 1, then `zeros` zero bytes.
    fn segment(commits: u64, sequence: u64, zeros: usize) -> Vec<u8> {
        let mut data = vec![0u8; SEGMENT_DATA_OFFSET as usize];
        let mut lsn = 1;
        for i in 0..commits {
            let mut commit = vec![0u8; COMMIT_HEADER_BYTES];
            let records = 1 + i % 3;
            for r in 0..records {
                let payload = vec![(i + r) as u8 | 1; ((i * 37 + r * 11) % 3000) as usize];
                encode_record(&mut commit, 9, None, &payload);
            }
            let body = commit.len() - COMMIT_HEADER_BYTES;
            seal_commit(&mut commit, sequence, lsn, records as u32, body);
            data.extend_from_slice(&commit);
            lsn += records;
        }
        data.extend(std::iter::repeat_n(0u8, zeros));
        data
    }

    /// Scans `data` fed in pieces of `piece` bytes, in place, as recovery does.
    fn scan_in_pieces(data: &[u8], piece: usize) -> Scan {
        let mut scan = InPlaceScan::new(Scanner::new(3, SEGMENT_DATA_OFFSET, 1));
        let mut base = 0u64;
        let pieces: Vec<&[u8]> = data.chunks(piece).collect();
        for (i, p) in pieces.iter().enumerate() {
            if scan.scanner.done {
                break;
            }
            scan.feed(p, base, i + 1 == pieces.len());
            base += p.len() as u64;
            assert!(
                scan.carry.bytes.len() <= piece + 64 * 1024,
                "the carry holds at most a piece and one commit"
            );
        }
        if !scan.scanner.done {
            let rest = std::mem::take(&mut scan.carry);
            scan.feed(&rest.bytes, rest.base, true);
        }
        scan.scanner.finish()
    }

    /// A clean restart does not wait for the directory sync that makes the checkpoint's removal
    /// durable; a power loss that brings the checkpoint back after records were acknowledged
    /// must not let it hide them (see `tidy_directory`).
    #[test]
    fn a_checkpoint_brought_back_by_a_crash_never_hides_acknowledged_records() {
        use crate::storage::mem::{FaultPoint, MemStorage};
        use crate::{AckLevel, Lsn, RecordRef, Shard};

        let opts = || ShardOptions {
            segment_bytes: 256 << 10,
            commit_bytes_max: 16 << 10,
            ..ShardOptions::default()
        };
        let mut came_back = 0;
        for seed in 0..16u64 {
            let back = crate::executor::run(
                crate::executor::ExecutorOptions::new("recovery-test"),
                move || async move {
                    let append = |shard: &Shard, i: u64| {
                        let payload = vec![i as u8; 100 + i as usize];
                        let fut = shard.append(
                            1,
                            &[RecordRef {
                                payload: &payload,
                                timestamp: None,
                            }],
                            AckLevel::Durable,
                        );
                        async move { fut.await.expect("append").first_lsn }
                    };
                    let mem = MemStorage::new();
                    let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
                        .await
                        .expect("open");
                    for i in 0..5 {
                        append(&shard, i).await;
                    }
                    shard.close().await.expect("clean close");
                    assert!(mem.file_names().contains(&CHECKPOINT_NAME.to_string()));
                    // Every directory sync fails from here on, so the checkpoint's removal stays
                    // undone for a crash to drop.
                    mem.inject(FaultPoint::SyncDir, libc::EIO, 0, None);
                    let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
                        .await
                        .expect("reopen");
                    assert!(shard.stats().recovery.checkpoint_used);
                    assert!(!mem.file_names().contains(&CHECKPOINT_NAME.to_string()));
                    let mut last = Lsn(0);
                    for i in 5..5 + 1 + seed % 4 {
                        last = append(&shard, i).await;
                    }
                    let crashed = mem.crash(seed);
                    drop(shard);
                    crashed.clear_faults();
                    let back = crashed.file_names().contains(&CHECKPOINT_NAME.to_string());
                    let shard = Shard::open_with_storage(Rc::new(crashed), opts())
                        .await
                        .expect("open after the crash");
                    assert_eq!(
                        shard.next_lsn(),
                        Lsn(last.0 + 1),
                        "seed {seed}: every acknowledged record is recovered (checkpoint back: {back})"
                    );
                    assert!(
                        !shard.stats().recovery.checkpoint_used,
                        "seed {seed}: the stale checkpoint was trusted"
                    );
                    shard.close().await.expect("close");
                    back
                },
            )
            .expect("executor ran");
            came_back += u32::from(back);
        }
        assert!(
            came_back > 0,
            "no crash brought the checkpoint back: the test tests nothing"
        );
    }

    /// Two damaged copies of the segment `whole`, whose log ends at `end`: one bit flipped in
    /// the middle of the log, and the end followed by the commits of another segment.
    fn flipped_and_other_sequence(whole: &[u8], end: usize) -> (Vec<u8>, Vec<u8>) {
        let mut flipped = whole.to_vec();
        flipped[end / 2] ^= 0x40;
        let mut other_sequence = whole[..end].to_vec();
        other_sequence.extend_from_slice(&segment(3, 4, 0)[SEGMENT_DATA_OFFSET as usize..]);
        (flipped, other_sequence)
    }

    #[test]
    fn valid_commits_behind_the_end_fed_in_pieces_are_what_one_search_finds() {
        let whole = segment(60, 3, 10_000);
        let end = whole.len() - 10_000;
        // Commits after a flipped bit (the case recovery must refuse), a torn commit followed by
        // zeros, commits of another segment, magics with garbage behind them, and a commit whose
        // header claims more bytes than the file holds.
        let (flipped, other_sequence) = flipped_and_other_sequence(&whole, end);
        let mut lookalikes = whole.clone();
        for at in [end + 3, end + 100, end + 4090, end + 9_990] {
            lookalikes[at..at + 4].copy_from_slice(&COMMIT_MAGIC.to_le_bytes());
        }
        let mut too_long = segment(5, 3, 0);
        let last_start = too_long.len() - 400;
        too_long.truncate(last_start + 60);
        // A header of this segment claiming 200 KB that fail their checksum, then commits.
        let claim = 200_000usize;
        let mut long_claim = whole[..end].to_vec();
        let mut header =
            whole[SEGMENT_DATA_OFFSET as usize..SEGMENT_DATA_OFFSET as usize + COMMIT_HEADER_BYTES].to_vec();
        header[24..28].copy_from_slice(&(claim as u32).to_le_bytes());
        long_claim.extend_from_slice(&header);
        long_claim.extend(std::iter::repeat_n(0u8, claim + 50_000));
        long_claim.extend_from_slice(&segment(3, 3, 0)[SEGMENT_DATA_OFFSET as usize..]);
        let cases = [
            ("zeros after the end", whole.clone()),
            ("commits after a flipped bit", flipped),
            ("commits of another segment", other_sequence),
            ("magics with garbage behind", lookalikes),
            ("a commit cut short by the end of the file", too_long),
            ("a long claim that fails its checksum, then commits", long_claim),
        ];
        for (name, data) in &cases {
            for from in [
                SEGMENT_DATA_OFFSET as usize,
                data.len() / 3,
                data.len() / 2 + 17,
                data.len() - 5,
            ] {
                let want = find_valid_commits(&data[from..], from as u64, 3);
                let start = align_down(from as u64) as usize;
                for piece in [1, 7, 31, 32, 33, 4096, 5000, 65536, data.len()] {
                    let mut behind = BehindScan::new(3, from as u64, data.len() as u64);
                    let pieces: Vec<&[u8]> = data[start..].chunks(piece).collect();
                    let mut base = start as u64;
                    for (i, p) in pieces.iter().enumerate() {
                        behind.feed(p, base, i + 1 == pieces.len());
                        base += p.len() as u64;
                        assert!(
                            behind.carry.bytes.len() <= piece.max(STRADDLE_COPY_BYTES) + COMMIT_HEADER_BYTES + claim,
                            "{name}: the carry holds at most a piece and a candidate"
                        );
                    }
                    let got = behind.finish();
                    assert_eq!(got, want, "{name}, from {from}, pieces of {piece}");
                }
            }
        }
        let flipped_from = cases[1].1.len() / 2;
        assert!(
            !find_valid_commits(&cases[1].1[flipped_from..], 0, 3).is_empty(),
            "the cases have commits behind"
        );
        assert_eq!(
            find_valid_commits(&cases[5].1[end..], 0, 3).len(),
            3,
            "the commits after a long claim are found"
        );
    }

    #[test]
    fn a_scan_fed_in_pieces_finds_what_one_pass_over_the_segment_finds() {
        let whole = segment(60, 3, 10_000);
        let end = whole.len() - 10_000;
        let (flipped, other_sequence) = flipped_and_other_sequence(&whole, end);
        // A header that starts with zeros is garbage, not the end of the log, once read whole.
        let mut garbage = whole.clone();
        garbage[end + 5..end + 40].fill(0xab);
        let cases = [
            ("zeros after the end", whole.clone()),
            ("garbage after a few zero bytes", garbage),
            ("cut short in the last commit", whole[..end - 5].to_vec()),
            ("a flipped bit in the middle", flipped),
            ("commits of another segment after the end", other_sequence),
        ];
        for (name, data) in &cases {
            let want = scan_from(data, 0, 3, SEGMENT_DATA_OFFSET, 1);
            for piece in [1, 7, 31, 32, 33, 4096, 5000, 65536, data.len()] {
                let got = scan_in_pieces(data, piece);
                let same = (
                    got.end_offset,
                    got.end_lsn,
                    &got.index,
                    got.commits,
                    got.commits_crc,
                    &got.stop,
                ) == (
                    want.end_offset,
                    want.end_lsn,
                    &want.index,
                    want.commits,
                    want.commits_crc,
                    &want.stop,
                );
                assert!(
                    same,
                    "{name}, pieces of {piece}: got end {} lsn {} stop {:?}, want end {} lsn {} stop {:?}",
                    got.end_offset, got.end_lsn, got.stop, want.end_offset, want.end_lsn, want.stop
                );
            }
            assert!(want.commits > 0, "{name}: the segment has commits");
        }
    }
}
