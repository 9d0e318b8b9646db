//! Recovery on open: find the segments, check every commit, cut a torn tail.
//!
//! Which files are segments: a `.wal` or `.prep` file whose header block is valid. A file whose
//! header block is all zero is a spare (prepared, or recycled by retention) and is removed. A
//! `.prep` file with a valid header is the active segment of a crash that came before the
//! background task renamed it; it is renamed now.
//!
//! Each segment is scanned from its data offset, commit by commit: magic, segment sequence,
//! checksum, record framing, and lsn continuity. The scan stops at the first commit that fails.
//!
//! - Sealed segment (not the last): the next segment must start at the lsn the scan ended at, or
//!   something is missing: `Corruption` at the offset the scan stopped.
//! - Last segment: the log may end with a torn write. At most `PIPELINE_DEPTH` commits were
//!   between submission and durability at a power loss, so after the first bad commit at most
//!   `PIPELINE_DEPTH - 1` valid commits may follow (a later write may have reached the device
//!   while an earlier one did not; neither was acknowledged, since acks wait for all earlier
//!   commits). Then the log is cut there. More valid commits behind it mean damage in the
//!   middle of acknowledged data: `Corruption`.
//!
//! Before new writes, the cut is made permanent: the block holding the end and everything up to
//! the last valid-looking commit behind it is zeroed and synced. Otherwise a later commit could
//! end exactly where an unacknowledged one began and revive it. Leftovers of a recycled file
//! need no zeroing: their commits carry another segment sequence, which the checksum covers.
//!
//! With `repair`, a `Corruption` becomes a cut at that offset; later segments are removed.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use crate::error::ShardError;
use crate::format::{
    align_down, align_up, find_valid_commits, parse_commit, HeaderBlock, ParseError, SegmentHeader, BLOCK_BYTES,
    SEGMENT_DATA_OFFSET,
};
use crate::shard::{segment_name, Segment, INDEX_INTERVAL_BYTES, PIPELINE_DEPTH};
use crate::storage::{SegmentFile, Storage};
use crate::ShardOptions;

/// Recovery reads segments in pieces of this size.
const RECOVERY_READ_BYTES: u64 = 1 << 20;

pub(crate) struct Recovered {
    pub segments: VecDeque<Rc<Segment>>,
    pub active_offset: u64,
    pub active_tail: Vec<u8>,
    pub next_lsn: u64,
    pub next_sequence: u64,
    pub first_available: u64,
}

struct Found {
    name: String,
    header: SegmentHeader,
    file: Rc<dyn SegmentFile>,
    size: u64,
}

struct Scan {
    end_offset: u64,
    end_lsn: u64,
    index: Vec<(u64, u64)>,
    /// Why the scan stopped, if not at zeros or the end of the file.
    stop: Option<String>,
}

fn scan(data: &[u8], header: &SegmentHeader) -> Scan {
    let mut offset = SEGMENT_DATA_OFFSET;
    let mut lsn = header.base_lsn;
    let mut index: Vec<(u64, u64)> = Vec::new();
    let mut stop = None;
    while (offset as usize) < data.len() {
        match parse_commit(&data[offset as usize..], header.sequence) {
            Ok(view) if view.first_lsn == lsn => {
                if index.last().is_none_or(|&(_, o)| offset - o >= INDEX_INTERVAL_BYTES) {
                    index.push((lsn, offset));
                }
                lsn = view.end_lsn();
                offset += view.total_bytes as u64;
            }
            Ok(view) => {
                stop = Some(format!("commit starts at lsn {}, expected {lsn}", view.first_lsn));
                break;
            }
            Err(ParseError::Zero) => break,
            Err(ParseError::Short { needed }) => {
                stop = Some(format!("commit of {needed} bytes runs past the end of the file"));
                break;
            }
            Err(ParseError::Invalid(reason)) => {
                stop = Some(reason);
                break;
            }
        }
    }
    Scan {
        end_offset: offset,
        end_lsn: lsn,
        index,
        stop,
    }
}

fn io_err(storage: &dyn Storage, op: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> ShardError {
    let path = storage.path_of(name);
    move |e| ShardError::io(op, path, e)
}

async fn read_all(storage: &dyn Storage, f: &Found) -> Result<Vec<u8>, ShardError> {
    let size = align_down(f.size);
    let mut data = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = RECOVERY_READ_BYTES.min(size - offset);
        let chunk = f
            .file
            .read(offset, len as usize)
            .await
            .map_err(io_err(storage, "read segment", &f.name))?;
        if chunk.is_empty() {
            break;
        }
        offset += chunk.len() as u64;
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// Zeroes `[end, zero_to)` (rounded out to blocks, keeping the bytes before `end`) and syncs.
async fn zero_after(storage: &dyn Storage, f: &Found, data: &[u8], end: u64, zero_to: u64) -> Result<(), ShardError> {
    let zero_to = zero_to.min(data.len() as u64);
    if end >= zero_to || data[end as usize..zero_to as usize].iter().all(|&b| b == 0) {
        return Ok(());
    }
    let start = align_down(end);
    let stop = align_up(zero_to);
    let mut buf = storage.alloc((stop - start) as usize);
    buf.as_mut_slice()[..(end - start) as usize].copy_from_slice(&data[start as usize..end as usize]);
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

pub(crate) async fn recover(storage: &dyn Storage, opts: &ShardOptions) -> Result<Recovered, ShardError> {
    let shard = opts.shard_id;
    let mut names = storage
        .list()
        .await
        .map_err(io_err(storage, "list shard directory", ""))?;
    names.sort();
    let mut found = Vec::new();
    let mut spares = Vec::new();
    for name in names {
        let is_wal = name.ends_with(".wal");
        if !is_wal && !name.ends_with(".prep") {
            continue;
        }
        let file = storage
            .open(&name, false, opts.durability)
            .await
            .map_err(io_err(storage, "open segment", &name))?;
        let size = file.size().await.map_err(io_err(storage, "stat segment", &name))?;
        let block = if size >= BLOCK_BYTES {
            file.read(0, BLOCK_BYTES as usize)
                .await
                .map_err(io_err(storage, "read segment header", &name))?
        } else {
            Vec::new()
        };
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
                    name,
                    header,
                    file,
                    size,
                });
            }
            HeaderBlock::Zero => spares.push(name),
            HeaderBlock::Invalid(_) if !is_wal || opts.repair => spares.push(name),
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

    let first_available = found.first().map_or(1, |f| f.header.base_lsn);
    let mut segments: VecDeque<Rc<Segment>> = VecDeque::new();
    let mut active_offset = SEGMENT_DATA_OFFSET;
    let mut active_tail = Vec::new();
    let mut next_lsn = first_available;
    let mut keep = found.len();
    for i in 0..found.len() {
        let f = &found[i];
        let data = read_all(storage, f).await?;
        let s = scan(&data, &f.header);
        let next = found.get(i + 1);
        let mut ends_log = next.is_none();
        if let Some(next) = next {
            let continues = next.header.sequence == f.header.sequence + 1 && next.header.base_lsn == s.end_lsn;
            if !continues {
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
                ends_log = true;
                keep = i + 1;
            }
        }
        if ends_log {
            let behind = find_valid_commits(&data[s.end_offset as usize..], s.end_offset, f.header.sequence);
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
                tracing::info!(shard, segment = f.header.sequence, offset = s.end_offset,
                    %reason, "cutting torn tail");
            }
            let zero_to = behind
                .last()
                .map_or(align_up(s.end_offset), |&(_, end)| end.max(align_up(s.end_offset)));
            zero_after(storage, f, &data, s.end_offset, zero_to).await?;
            active_offset = s.end_offset;
            active_tail = data[align_down(s.end_offset) as usize..s.end_offset as usize].to_vec();
        }
        let sealed_at = (!ends_log).then(|| {
            storage
                .modified(&f.name)
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .and_then(|age| Instant::now().checked_sub(age))
                .unwrap_or_else(Instant::now)
        });
        segments.push_back(Rc::new(Segment {
            sequence: f.header.sequence,
            base_lsn: f.header.base_lsn,
            capacity: align_down(f.size),
            name: RefCell::new(f.name.clone()),
            file: f.file.clone(),
            durable_end: Cell::new((s.end_lsn, s.end_offset)),
            index: RefCell::new(s.index),
            sealed_at: Cell::new(sealed_at),
            retired: Cell::new(false),
        }));
        next_lsn = s.end_lsn;
        if ends_log {
            break;
        }
    }

    let mut dir_changed = false;
    for f in &found[keep..] {
        storage
            .remove(&f.name)
            .await
            .map_err(io_err(storage, "remove segment after repair cut", &f.name))?;
        dir_changed = true;
    }
    for name in &spares {
        storage
            .remove(name)
            .await
            .map_err(io_err(storage, "remove spare segment", name))?;
        dir_changed = true;
    }
    for seg in &segments {
        let want = segment_name(seg.base_lsn);
        let have = seg.name.borrow().clone();
        if have != want {
            storage
                .rename(&have, &want)
                .await
                .map_err(io_err(storage, "rename segment", &have))?;
            *seg.name.borrow_mut() = want;
            dir_changed = true;
        }
    }
    if dir_changed {
        storage
            .sync_dir()
            .await
            .map_err(io_err(storage, "sync shard directory", ""))?;
    }
    let next_sequence = segments.back().map_or(1, |s| s.sequence + 1);
    Ok(Recovered {
        segments,
        active_offset,
        active_tail,
        next_lsn,
        next_sequence,
        first_available,
    })
}
