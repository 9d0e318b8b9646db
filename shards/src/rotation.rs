//! The background task: keeps the next segment ready, names activated segments, applies retention.
//!
//! It runs in the committer's task queue (see `Shard::open_with_storage` for why) and stays
//! I/O-bound: the only work is large awaited writes (zero-fill), syncs and directory operations,
//! so between two of the committer's turns it holds the CPU for tens of microseconds.
//!
//! A spare segment is a full-size file that is either zero-filled or recycled from retention, and
//! whose directory entry is synced. Rotation on the hot path is then a pointer swap: the first
//! commit to the new segment carries its header block. The file is first named `*.prep`; once
//! active, this task renames it to `<base_lsn:020>.wal`. A crash before that rename is harmless:
//! recovery recognises a segment by its header, not its name.
//!
//! Recycling: retention zeroes the header block of the oldest sealed segment and syncs it before
//! renaming the file to a spare, so if the process dies in between, recovery sees a headerless
//! file (a spare) rather than an old segment. The old commits stay in the file; they carry the old
//! segment sequence, which their checksums cover, so they are never read as commits of the new one.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use crate::error::is_no_space;
use crate::format::BLOCK_BYTES;
use crate::shard::{segment_name, Inner, Spare};
use crate::storage::SegmentFile;

/// After a failure to prepare a segment (e.g. no space), try again after this long.
pub(crate) const PREPARE_RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Zero-fill write size: large, so preparation is a few big awaited writes.
const ZERO_FILL_CHUNK_BYTES: u64 = 1 << 20;

pub(crate) async fn background(inner: Rc<Inner>) {
    let mut spare_id = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut retry_at: Option<Instant> = None;
    loop {
        // Also once more after the stop request, so a closed shard leaves its files named.
        name_segments(&inner).await;
        if inner.bg_stop.get() {
            break;
        }
        apply_retention(&inner, &mut spare_id).await;
        ensure_spare(&inner, &mut spare_id, &mut retry_at).await;
        let wake_at = match (retry_at, age_retention_due_at(&inner)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wake_at.map(|at| at.saturating_duration_since(Instant::now())) {
            Some(t) => futures_lite::future::or(inner.bg_wake.wait(), glommio::timer::sleep(t)).await,
            None => inner.bg_wake.wait().await,
        }
    }
}

/// Renames activated segments from their spare name to `<base_lsn:020>.wal`.
async fn name_segments(inner: &Inner) {
    let todo: Vec<(Rc<crate::shard::Segment>, String)> = inner
        .st
        .borrow()
        .segments
        .iter()
        .filter(|s| *s.name.borrow() != segment_name(s.base_lsn))
        .map(|s| (s.clone(), s.name.borrow().clone()))
        .collect();
    if todo.is_empty() {
        return;
    }
    for (seg, from) in todo {
        let to = segment_name(seg.base_lsn);
        match inner.storage.rename(&from, &to).await {
            Ok(()) => *seg.name.borrow_mut() = to,
            Err(e) => tracing::warn!(%from, %to, error = %e, "renaming segment failed; will retry"),
        }
    }
    if let Err(e) = inner.storage.sync_dir().await {
        tracing::warn!(error = %e, "syncing shard directory failed; will retry");
    }
}

/// When the oldest sealed segment becomes older than `retention_age`, if there is one. The
/// active segment is never sealed, so a shard with one segment has nothing to wait for; the
/// committer wakes this task when it seals a segment (`activate`).
fn age_retention_due_at(inner: &Inner) -> Option<Instant> {
    let age = inner.opts.retention_age?;
    let st = inner.st.borrow();
    if st.segments.len() < 2 {
        return None;
    }
    let sealed_at = st.segments.front()?.sealed_at.get()?;
    // One millisecond late rather than early: `apply_retention` retires only when the age is
    // strictly exceeded.
    Some(sealed_at + age + Duration::from_millis(1))
}

async fn apply_retention(inner: &Inner, spare_id: &mut u64) {
    loop {
        let victim = {
            let st = inner.st.borrow();
            // Never the last segment: it is the active one.
            if st.segments.len() < 2 {
                return;
            }
            let total: u64 = st.segments.iter().map(|s| s.capacity).sum();
            let front = &st.segments[0];
            let over_bytes = inner.opts.retention_bytes.is_some_and(|max| total > max);
            let too_old = inner
                .opts
                .retention_age
                .is_some_and(|age| front.sealed_at.get().is_some_and(|t| t.elapsed() > age));
            if !(over_bytes || too_old) {
                return;
            }
            front.clone()
        };
        let recycle = {
            let mut st = inner.st.borrow_mut();
            st.segments.pop_front();
            victim.retired.set(true);
            st.first_available = st.segments.front().map_or(1, |s| s.base_lsn);
            !matches!(st.spare, Spare::Ready { .. })
        };
        let name = victim.name.borrow().clone();
        if recycle {
            *spare_id += 1;
            let spare = format!("spare-{spare_id:020}.prep");
            match recycle_file(inner, &victim.file, &name, &spare).await {
                Ok(()) => {
                    inner.st.borrow_mut().spare = Spare::Ready {
                        name: spare,
                        file: victim.file.clone(),
                        capacity: victim.capacity,
                    };
                    inner.committer_wake.notify();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%name, error = %e, "recycling segment failed; removing it")
                }
            }
        }
        let removed = inner.storage.remove(&name).await;
        let synced = inner.storage.sync_dir().await;
        if let Err(e) = removed.and(synced) {
            tracing::warn!(%name, error = %e, "removing retired segment failed");
        }
    }
}

async fn recycle_file(inner: &Inner, file: &Rc<dyn SegmentFile>, name: &str, spare: &str) -> io::Result<()> {
    // The header block first, durably: if we crash after this, the file is a spare to recovery.
    file.write(0, inner.storage.alloc(BLOCK_BYTES as usize)).await?;
    file.sync().await?;
    inner.storage.rename(name, spare).await?;
    inner.storage.sync_dir().await
}

async fn ensure_spare(inner: &Inner, spare_id: &mut u64, retry_at: &mut Option<Instant>) {
    if inner.poisoned_cause().is_some() {
        return;
    }
    match &inner.st.borrow().spare {
        Spare::Ready { .. } => return,
        Spare::Failed { .. } if retry_at.is_some_and(|at| Instant::now() < at) => return,
        _ => {}
    }
    *spare_id += 1;
    let name = format!("spare-{spare_id:020}.prep");
    match prepare(inner, &name).await {
        Ok(file) => {
            *retry_at = None;
            inner.st.borrow_mut().spare = Spare::Ready {
                name,
                file,
                capacity: inner.opts.segment_bytes,
            };
        }
        Err(e) => {
            tracing::warn!(error = %e, "preparing the next segment failed; will retry");
            // Free whatever the partial file took.
            let _ = inner.storage.remove(&name).await;
            *retry_at = Some(Instant::now() + PREPARE_RETRY_INTERVAL);
            inner.st.borrow_mut().spare = Spare::Failed {
                no_space: is_no_space(&e),
                cause: e.to_string(),
            };
        }
    }
    inner.committer_wake.notify();
}

/// Creates a full-size zero-filled segment file and syncs it and its directory entry. Zero-filled,
/// not just fallocated: an fdatasync after writing into unwritten extents also has to commit the
/// extent conversion, which costs about three times as much.
async fn prepare(inner: &Inner, name: &str) -> io::Result<Rc<dyn SegmentFile>> {
    let storage = &inner.storage;
    let file = storage.open(name, true, inner.opts.durability).await?;
    let size = inner.opts.segment_bytes;
    // One zeroed chunk, written over and over: allocating and zeroing a fresh one per write cost
    // as much CPU as the data that later fills the segment.
    let zeroes = storage.alloc(ZERO_FILL_CHUNK_BYTES.min(size) as usize).into_shared();
    let mut offset = 0;
    while offset < size {
        if inner.bg_stop.get() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "shard closing"));
        }
        let len = ZERO_FILL_CHUNK_BYTES.min(size - offset);
        let chunk = if len as usize == zeroes.len() {
            zeroes.share()
        } else {
            storage.alloc(len as usize)
        };
        file.write(offset, chunk).await?;
        offset += len;
    }
    file.sync().await?;
    storage.sync_dir().await?;
    Ok(file)
}
