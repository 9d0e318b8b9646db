//! The shard's background work, in the executor's low-priority task queue (see
//! `Shard::open_with_storage`): one task keeps the next segment ready, names activated segments,
//! makes the summaries of sealed segments durable and applies retention; a second task scrubs
//! sealed segments (and their stream index files) against their summaries at a bounded rate.
//! Both stay I/O-bound: the work is large awaited reads and writes, syncs and directory
//! operations, so between two of the committer's turns they hold the CPU for tens of
//! microseconds (the scrub's checksums run over one chunk at a time; sealing a stream index and
//! checking an index file go in steps, `stream_index::Sealer` and `IndexDecoder`).
//!
//! Summaries: when the committer seals a segment (full, and everything in it durable), this task
//! writes `<base_lsn:020>.sum`, syncs it and its directory, and only then marks the summary
//! durable. A crash before that leaves no summary or a torn one, whose checksum fails: recovery
//! then scans the segment, as it would have without summaries, and this task writes it again.
//! The checkpoint of a clean shutdown is written the same way by `Shard::close`.
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

use crate::error::{is_no_space, ShardError};
use crate::format::{
    align_down, align_up, chain_commit_crc, parse_commit, HeaderBlock, Manifest, ParseError, SegmentHeader,
    SegmentSummary, SummaryKind, BLOCK_BYTES, COMMIT_HEADER_BYTES, SEGMENT_DATA_OFFSET,
};
use crate::segments::{
    segment_name, summary_name, Segment, Spare, SummaryState, CHECKPOINT_NAME, MANIFEST_NAME, MANIFEST_TMP_NAME,
};
use crate::shard::Inner;
use crate::storage::{IoBuf, SegmentFile, Storage};
use crate::stream_index::{check_in_steps, seal_in_steps, stream_index_name, STREAM_INDEX_FIXED_BYTES};
use crate::stream_runs::{stream_runs_name, RunsState};
use crate::{Durability, SegmentPrep, StreamRuns, PREALLOCATE_AFTER_COMMIT_BYTES};

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
        let summaries_failed = write_summaries(&inner).await | write_manifest(&inner).await;
        if inner.bg_stop.get() {
            break;
        }
        rebuild_stream_indexes(&inner).await;
        apply_retention(&inner, &mut spare_id).await;
        ensure_spare(&inner, &mut spare_id, &mut retry_at).await;
        let summary_retry_at = summaries_failed.then(|| Instant::now() + PREPARE_RETRY_INTERVAL);
        let wake_at = [retry_at, age_retention_due_at(&inner), summary_retry_at]
            .into_iter()
            .flatten()
            .min();
        match wake_at.map(|at| at.saturating_duration_since(Instant::now())) {
            Some(t) => futures_lite::future::or(inner.bg_wake.wait(), glommio::timer::sleep(t)).await,
            None => inner.bg_wake.wait().await,
        }
    }
}

/// Renames activated segments from their spare name to `<base_lsn:020>.wal`.
async fn name_segments(inner: &Inner) {
    let todo: Vec<(Rc<Segment>, String)> = inner
        .st
        .borrow()
        .segs
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
    let sealed_at = st.segs.oldest_sealed()?.sealed_at.get()?;
    // One millisecond late rather than early: `apply_retention` retires only when the age is
    // strictly exceeded.
    Some(sealed_at + age + Duration::from_millis(1))
}

async fn apply_retention(inner: &Inner, spare_id: &mut u64) {
    loop {
        let victim = {
            let st = inner.st.borrow();
            // Never the active segment.
            let Some(front) = st.segs.oldest_sealed() else {
                return;
            };
            let total = st.segs.file_bytes();
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
            let retired = st.segs.retire_oldest();
            assert!(Rc::ptr_eq(&retired, &victim));
            !matches!(st.segs.spare(), Spare::Ready { .. })
        };
        let summary = summary_name(victim.base_lsn);
        let name = victim.name.borrow().clone();
        if recycle {
            *spare_id += 1;
            let spare = format!("spare-{spare_id:020}.prep");
            match recycle_file(inner, &victim.file, &name, &spare).await {
                Ok(()) => {
                    inner.st.borrow_mut().segs.install_spare(Spare::Ready {
                        name: spare,
                        file: victim.file.clone(),
                        capacity: victim.capacity,
                    });
                    inner.committer_wake.notify();
                    remove_summary(inner, &summary).await;
                    remove_summary(inner, &stream_index_name(victim.base_lsn)).await;
                    inner.remove_runs_file(&stream_runs_name(victim.base_lsn)).await;
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
        remove_summary(inner, &summary).await;
        remove_summary(inner, &stream_index_name(victim.base_lsn)).await;
        inner.remove_runs_file(&stream_runs_name(victim.base_lsn)).await;
    }
}

/// Removes a retired segment's summary (recovery removes one left behind by a crash).
async fn remove_summary(inner: &Inner, name: &str) {
    match inner.storage.remove(name).await {
        Ok(()) => {}
        // Never written: the segment was retired before its summary was.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => tracing::warn!(%name, error = %e, "removing a retired segment's summary failed"),
    }
    if let Err(e) = inner.storage.sync_dir().await {
        tracing::warn!(error = %e, "syncing shard directory failed");
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
    match inner.st.borrow().segs.spare() {
        Spare::Ready { .. } => return,
        Spare::Failed { .. } if retry_at.is_some_and(|at| Instant::now() < at) => return,
        _ => {}
    }
    *spare_id += 1;
    let name = format!("spare-{spare_id:020}.prep");
    match prepare(inner, &name).await {
        Ok(file) => {
            *retry_at = None;
            inner.st.borrow_mut().segs.install_spare(Spare::Ready {
                name,
                file,
                capacity: inner.opts.segment_bytes,
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "preparing the next segment failed; will retry");
            // Free whatever the partial file took.
            let _ = inner.storage.remove(&name).await;
            *retry_at = Some(Instant::now() + PREPARE_RETRY_INTERVAL);
            inner.st.borrow_mut().segs.install_spare(Spare::Failed {
                no_space: is_no_space(&e),
                cause: e.to_string(),
            });
        }
    }
    inner.committer_wake.notify();
}

/// Whether the next new segment file is preallocated rather than zero-filled (see
/// [`SegmentPrep`]).
fn preallocates(inner: &Inner) -> bool {
    match inner.opts.segment_prep {
        SegmentPrep::ZeroFill => false,
        SegmentPrep::Preallocate => true,
        SegmentPrep::Auto => inner
            .st
            .borrow()
            .segs
            .last_sealed_commit_bytes()
            .is_some_and(|bytes| bytes >= PREALLOCATE_AFTER_COMMIT_BYTES),
    }
}

/// Creates a full-size segment file, zero-filled or preallocated, and syncs it and its directory
/// entry. Zero-filled by default: an fdatasync after writing into unwritten (preallocated)
/// extents also has to commit the extent conversion, which costs about three times as much for a
/// small commit. But zero-filling makes the device write every byte twice, which halves the rate
/// of a shard that commits large batches: after such a segment the next file is preallocated.
async fn prepare(inner: &Inner, name: &str) -> io::Result<Rc<dyn SegmentFile>> {
    let storage = &inner.storage;
    let file = storage.open(name, true, inner.opts.durability).await?;
    let size = inner.opts.segment_bytes;
    if preallocates(inner) {
        tracing::debug!(%name, "preallocating the next segment");
        file.allocate(size).await?;
        file.sync().await?;
        storage.sync_dir().await?;
        return Ok(file);
    }
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

/// Writes `summary` as the whole of file `name` and makes it durable, name included. A crash
/// part way leaves a file whose checksum fails (or an older summary of another segment
/// sequence), which recovery does not trust.
pub(crate) async fn write_summary_file(
    storage: &dyn Storage,
    durability: Durability,
    name: &str,
    summary: &SegmentSummary,
    kind: SummaryKind,
) -> io::Result<()> {
    let mut buf = storage.alloc(summary.encoded_bytes());
    summary.encode(kind, buf.as_mut_slice());
    write_file_durably(storage, durability, name, buf).await?;
    storage.sync_dir().await
}

/// Writes `buf` as the whole of the file `name` (created if missing) and syncs its data; the file
/// is closed whether or not that worked. The caller syncs the directory (after renaming it into
/// place, if it was written under a temporary name).
async fn write_file_durably(storage: &dyn Storage, durability: Durability, name: &str, buf: IoBuf) -> io::Result<()> {
    let file = storage.open(name, true, durability).await?;
    let written = async {
        file.write(0, buf).await?;
        file.sync().await
    }
    .await;
    let closed = file.close().await;
    written?;
    closed
}

/// Writes the stream index of `seg` (sealing it first when `seal`: the segment takes no more
/// commits) as `<base_lsn:020>.six`, for the segment `summary` describes, and makes it durable.
/// A segment without an index writes none. Like a summary, a crash part way leaves a file that
/// recovery does not trust (checksum, or a segment description that is not the summary's).
async fn write_stream_index(inner: &Inner, seg: &Segment, summary: &SegmentSummary, seal: bool) -> io::Result<()> {
    let storage = &*inner.storage;
    if seal {
        // In steps: sealing a large index in one go would hold the committer off for
        // milliseconds.
        seal_in_steps(&seg.streams).await;
    }
    let buf = {
        let streams = seg.streams.borrow();
        let Some(index) = streams.as_ref() else {
            return Ok(());
        };
        index.with_sealed(|sealed| {
            let mut buf = storage.alloc(sealed.encoded_bytes());
            sealed.encode(summary, buf.as_mut_slice());
            buf
        })
    };
    write_file_durably(storage, inner.opts.durability, &stream_index_name(seg.base_lsn), buf).await?;
    storage.sync_dir().await
}

/// Rebuilds the stream indexes whose files a filtered read found missing or untrusted, and
/// writes them again. A failure is logged; filtered reads of that segment go on scanning it.
async fn rebuild_stream_indexes(inner: &Inner) {
    let todo: Vec<Rc<Segment>> = inner
        .st
        .borrow()
        .segs
        .iter()
        .filter(|s| s.streams_rebuild.get())
        .cloned()
        .collect();
    for seg in todo {
        seg.streams_rebuild.set(false);
        let name = stream_index_name(seg.base_lsn);
        let rebuilt = match inner.rebuild_stream_index(&seg).await {
            Ok(Some(summary)) => write_stream_index(inner, &seg, &summary, true).await.map(|()| {
                seg.streams_persisted.set(true);
                inner.bound_stream_indexes(None);
            }),
            Ok(None) => {
                tracing::warn!(%name, "the segment disagrees with its summary; no stream index rebuilt");
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = rebuilt {
            tracing::warn!(%name, error = %e, "rebuilding a stream index failed");
        }
        if seg.retired.get() {
            // Retired meanwhile: its index file goes with it.
            remove_summary(inner, &name).await;
        }
        if inner.bg_stop.get() {
            return;
        }
    }
}

/// Whether a sealed segment with a durable summary and no runs file gets one made.
fn wants_stream_runs(inner: &Inner, seg: &Segment) -> bool {
    inner.opts.stream_runs == StreamRuns::Auto
        && seg.runs_state.get() == RunsState::None
        && (seg.streams.borrow().is_some() || seg.streams_on_disk.get())
}

/// Makes the summaries of sealed segments durable. Returns whether one failed (it is retried).
async fn write_summaries(inner: &Inner) -> bool {
    let pending = inner.st.borrow().segs.summaries_pending();
    let mut failed = false;
    for seg in pending {
        if seg.retired.get() || seg.summary.get() != SummaryState::Pending {
            continue;
        }
        let summary = seg.summary(inner.opts.shard_id);
        let name = summary_name(seg.base_lsn);
        let storage = &*inner.storage;
        // [stream_index] The index first: a durable summary then normally has its index.
        if let Err(e) = write_stream_index(inner, &seg, &summary, true).await {
            tracing::warn!(%name, error = %e, "writing a sealed segment's stream index failed; will retry");
            failed = true;
            continue;
        }
        if seg.streams.borrow().is_some() {
            seg.streams_persisted.set(true);
            inner.bound_stream_indexes(None);
        }
        match write_summary_file(storage, inner.opts.durability, &name, &summary, SummaryKind::Sealed).await {
            Ok(()) if !seg.retired.get() => {
                inner.st.borrow().segs.summary_written(&seg);
                // [stream_runs] Its runs are made from the summary it now has for good.
                if wants_stream_runs(inner, &seg) {
                    seg.runs_state.set(RunsState::Pending);
                    inner.runs_wake.notify();
                }
            }
            // Retired while its summary was being written: the summary goes with it.
            Ok(()) => {
                remove_summary(inner, &name).await;
                remove_summary(inner, &stream_index_name(seg.base_lsn)).await;
            }
            Err(e) => {
                tracing::warn!(%name, error = %e, "writing a sealed segment's summary failed; will retry");
                failed = true;
            }
        }
    }
    failed
}

/// Writes `manifest` as the whole of `manifest.tmp`, makes it durable, and renames it over
/// `manifest` (then syncs the directory). A crash before the rename leaves the old manifest,
/// which is older than the log: recovery trusts it for the segments it lists and reads the
/// others' headers and summaries. A crash during the write leaves a torn `manifest.tmp`, which
/// recovery never reads.
pub(crate) async fn write_manifest_file(
    storage: &dyn Storage,
    durability: Durability,
    manifest: &Manifest,
) -> io::Result<()> {
    let mut buf = storage.alloc(manifest.encoded_bytes());
    manifest.encode(buf.as_mut_slice());
    write_file_durably(storage, durability, MANIFEST_TMP_NAME, buf).await?;
    storage.rename(MANIFEST_TMP_NAME, MANIFEST_NAME).await?;
    storage.sync_dir().await
}

/// Writes a new manifest if a summary became durable since the last one. Returns whether that
/// failed (it is retried).
async fn write_manifest(inner: &Inner) -> bool {
    let manifest = {
        let st = inner.st.borrow();
        if !st.segs.manifest_stale() {
            return false;
        }
        // Cleared before the write: a summary made durable meanwhile sets it again.
        st.segs.set_manifest_stale(false);
        st.segs.manifest(inner.opts.shard_id)
    };
    match write_manifest_file(&*inner.storage, inner.opts.durability, &manifest).await {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(error = %e, "writing the manifest failed; will retry");
            inner.st.borrow().segs.set_manifest_stale(true);
            true
        }
    }
}

/// Writes the checkpoint of a clean shutdown: the durable end of the active segment. Called by
/// `Shard::close` once nothing is in flight or queued. A failure only costs the next open a scan
/// of the active segment, so it is reported, not returned.
pub(crate) async fn write_checkpoint(inner: &Inner) -> Result<(), ShardError> {
    let active = {
        let st = inner.st.borrow();
        match &st.segs.active {
            Some(active) if !active.header_pending => {
                assert_eq!(
                    active.offset,
                    active.seg.durable_end.get().1,
                    "everything is durable at close"
                );
                Some((active.seg.clone(), active.seg.summary(inner.opts.shard_id)))
            }
            _ => None,
        }
    };
    let Some((seg, summary)) = active else {
        return Ok(());
    };
    // [stream_index] The active segment's index, so that the next open need not scan it to
    // rebuild it. Without it the next open scans the segment: reported, not returned.
    if let Err(e) = write_stream_index(inner, &seg, &summary, false).await {
        tracing::warn!(error = %e, "writing the active segment's stream index failed; the next open scans it");
    }
    let storage = &*inner.storage;
    if let Err(e) = write_summary_file(
        storage,
        inner.opts.durability,
        CHECKPOINT_NAME,
        &summary,
        SummaryKind::Checkpoint,
    )
    .await
    {
        tracing::warn!(error = %e, "writing the shutdown checkpoint failed; the next open scans the active segment");
    }
    Ok(())
}

/// The scrub reads a sealed segment this much at a time, then sleeps as long as the rate asks.
const SCRUB_CHUNK_BYTES: u64 = 1 << 20;
/// With nothing to scrub (no sealed segment with a durable summary), look again after this long.
const SCRUB_IDLE_INTERVAL: Duration = Duration::from_secs(1);

/// The scrub task: verifies each sealed segment whose summary is durable against it, oldest
/// first, round and round, at most `scrub_bytes_per_sec`. A segment whose body fails (a commit
/// that fails its checksum, lsns that do not follow, or a body that disagrees with the summary)
/// is reported: logged, counted in `stats`, and never scrubbed again. Reads of it verify every
/// commit they return, so its bad range answers `Corruption` while the rest is served. A segment
/// whose body passes has its stream index file checked too ([`scrub_stream_index`]).
pub(crate) async fn scrub(inner: Rc<Inner>) {
    let rate = inner.opts.scrub_bytes_per_sec;
    if rate == 0 {
        return;
    }
    let mut next_sequence = 0;
    let mut verified_this_pass = false;
    while !inner.bg_stop.get() {
        let seg = {
            let st = inner.st.borrow();
            let found = st
                .segs
                .iter()
                .find(|s| {
                    s.sequence >= next_sequence
                        && s.summary.get() == SummaryState::Durable
                        && s.corrupt.borrow().is_none()
                })
                .cloned();
            found
        };
        let Some(seg) = seg else {
            if verified_this_pass {
                inner.health.borrow_mut().scrub_passes += 1;
            }
            verified_this_pass = false;
            next_sequence = 0;
            pace(&inner, SCRUB_IDLE_INTERVAL).await;
            continue;
        };
        next_sequence = seg.sequence + 1;
        match scrub_segment(&inner, &seg, rate).await {
            Ok(None) => verified_this_pass = true,
            Ok(Some((offset, reason))) => {
                if !seg.retired.get() {
                    report_corruption(&inner, &seg, offset, reason);
                }
            }
            Err(e) if seg.retired.get() || inner.bg_stop.get() => {
                tracing::debug!(segment = seg.sequence, error = %e, "scrub of a retired segment stopped")
            }
            Err(e) => tracing::warn!(segment = seg.sequence, error = %e, "scrub could not read a segment"),
        }
    }
}

/// Sleeps `t`, or until the shard closes.
async fn pace(inner: &Inner, t: Duration) {
    if !inner.bg_stop.get() {
        futures_lite::future::or(inner.scrub_wake.wait(), glommio::timer::sleep(t)).await;
    }
}

/// Records what is wrong with a sealed segment: logged, counted, and kept on the segment.
pub(crate) fn report_corruption(inner: &Inner, seg: &Segment, offset: u64, reason: String) {
    let shard = inner.opts.shard_id;
    let message = format!(
        "shard {shard}: segment {} (lsns {}..{}) is corrupt at offset {offset}: {reason}",
        seg.sequence,
        seg.base_lsn,
        seg.durable_end.get().0
    );
    tracing::error!(shard, segment = seg.sequence, offset, %reason, "corrupt sealed segment; reads of it fail with Corruption");
    *seg.corrupt.borrow_mut() = Some(message.clone());
    let mut health = inner.health.borrow_mut();
    health.corrupt_segments += 1;
    health.last_corruption = Some(message);
}

/// Reads one sealed segment and checks it against its summary. `Ok(Some((offset, reason)))`
/// names the first thing found wrong; `Err` is an I/O error or the shard closing.
async fn scrub_segment(inner: &Inner, seg: &Segment, rate: u64) -> io::Result<Option<(u64, String)>> {
    // A segment recovered from the manifest: its index first (its body is checked against the
    // manifest if its `.sum` does not agree).
    match crate::recovery::load_index(&*inner.storage, &inner.opts, seg).await {
        Ok(true) => {
            // Its `.sum` is rewritten first; it is scrubbed once that is durable.
            inner.bg_wake.notify();
            return Ok(None);
        }
        Ok(false) => {}
        Err(ShardError::Corruption { offset, reason, .. }) => return Ok(Some((offset, reason))),
        Err(e) => return Err(io::Error::other(e.to_string())),
    }
    let summary = seg.summary(inner.opts.shard_id);
    // The header block too: a segment recovered from the manifest was never opened at start.
    let block = seg.file.read(0, BLOCK_BYTES as usize).await?;
    let want = SegmentHeader {
        shard_id: inner.opts.shard_id,
        sequence: seg.sequence,
        base_lsn: seg.base_lsn,
    };
    match SegmentHeader::decode(&block) {
        HeaderBlock::Valid(header) if header == want => {}
        other => return Ok(Some((0, format!("header block {other:?}, expected {want:?}")))),
    }
    let read_end = align_up(summary.end_offset).min(seg.capacity);
    let mut buf: Vec<u8> = Vec::new();
    // Segment offset of buf[0], and where the next read starts (always block aligned).
    let mut buf_start = SEGMENT_DATA_OFFSET;
    let mut read_at = SEGMENT_DATA_OFFSET;
    let mut offset = SEGMENT_DATA_OFFSET;
    let mut lsn = seg.base_lsn;
    let mut commits = 0u64;
    let mut crc = 0u32;
    let mut index = summary.index.iter().peekable();
    while offset < summary.end_offset {
        let at = (offset - buf_start) as usize;
        match parse_commit(&buf[at..], seg.sequence) {
            Ok(view) if view.first_lsn != lsn => {
                return Ok(Some((
                    offset,
                    format!("commit starts at lsn {}, expected {lsn}", view.first_lsn),
                )))
            }
            Ok(view) => {
                if let Some(&&(index_lsn, index_offset)) = index.peek() {
                    if index_offset == offset {
                        if index_lsn != lsn {
                            return Ok(Some((
                                offset,
                                format!("summary index says lsn {index_lsn}, the commit holds {lsn}"),
                            )));
                        }
                        index.next();
                    } else if index_offset < offset {
                        return Ok(Some((index_offset, "summary index entry is not at a commit".into())));
                    }
                }
                commits += 1;
                crc = chain_commit_crc(crc, &buf[at..at + COMMIT_HEADER_BYTES]);
                lsn = view.end_lsn();
                offset += view.total_bytes as u64;
            }
            Err(ParseError::Short { .. }) if read_at < read_end => {
                if inner.bg_stop.get() {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "shard closing"));
                }
                buf.drain(..at);
                buf_start = offset;
                let len = SCRUB_CHUNK_BYTES.min(read_end - read_at);
                let chunk = seg.file.read(read_at, len as usize).await?;
                if chunk.is_empty() {
                    return Ok(Some((read_at, "segment file ends before its summary".into())));
                }
                read_at += chunk.len() as u64;
                buf.extend_from_slice(&chunk);
                inner.health.borrow_mut().scrub_bytes += chunk.len() as u64;
                pace(inner, Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
            }
            Err(e) => return Ok(Some((offset, format!("{e:?}")))),
        }
    }
    let found = (lsn, offset, commits, crc, index.next().is_none());
    let want = (
        summary.end_lsn,
        summary.end_offset,
        summary.commits,
        summary.commits_crc,
        true,
    );
    if found != want {
        return Ok(Some((
            offset,
            format!(
                "the body (end lsn, end offset, commits, commits crc, index consumed) = {found:?} \
                 disagrees with the summary {want:?}"
            ),
        )));
    }
    // [stream_index] The body is sound: now the index file that describes it.
    scrub_stream_index(inner, seg, rate).await;
    Ok(None)
}

/// Whether a sealed segment's `.six` file should be on disk and durable: its index is there and
/// not loaded, or loaded and its file durable; and no rebuild of it is pending or under way
/// (`rebuild_stream_indexes` clears `streams_rebuild` when it starts, but sets
/// `streams_persisted` only once the file it writes is durable).
fn has_stream_index_file(seg: &Segment) -> bool {
    !seg.retired.get() && !seg.streams_rebuild.get() && (seg.streams_on_disk.get() || seg.streams_persisted.get())
}

/// Checks the `.six` file of a sealed segment whose body the scrub has just verified against its
/// summary, reading it at the scrub's rate and checking it in steps
/// ([`crate::stream_index::IndexDecoder`]). One that is missing, unreadable or untrusted is
/// rebuilt from the segment by the background task and written again, as when a filtered read
/// finds it so. The log itself is fine, so this is not corruption: it is logged as a warning and
/// counted in `stats` (`scrub_bad_stream_indexes`).
async fn scrub_stream_index(inner: &Inner, seg: &Segment, rate: u64) {
    if !has_stream_index_file(seg) {
        return;
    }
    let name = stream_index_name(seg.base_lsn);
    let summary = seg.summary(inner.opts.shard_id);
    // Each stream of the file has an entry (16 + 12 bytes), and each entry a record of its own in
    // the segment (at least its 24-byte header), so a valid file is smaller than 28 / 24 of the
    // segment: a larger one is not read, only rebuilt.
    let max_bytes = align_up(STREAM_INDEX_FIXED_BYTES as u64 + 2 * seg.capacity);
    let checked = match read_index_file(inner, &name, max_bytes, rate).await {
        Ok(data) => check_in_steps(&data, &summary).await,
        Err(e) => Err(e.to_string()),
    };
    let Err(reason) = checked else {
        return;
    };
    // Closing (the read was cut short), retired, or rebuilt meanwhile: nothing to repair.
    if inner.bg_stop.get() || !has_stream_index_file(seg) {
        return;
    }
    tracing::warn!(
        shard = inner.opts.shard_id,
        segment = seg.sequence,
        %name,
        %reason,
        "the scrub found a stream index file missing or untrusted (the log is intact); rebuilding it"
    );
    // The loaded index, if any, came from the committer or from a file that was valid when it
    // was read; it goes (filtered reads scan the segment until the rebuild) so that the rebuilt
    // one replaces it, unless a read is using it right now. Either way it no longer counts as
    // durable, so the memory bound does not drop it and send the next read to the bad file.
    if seg.streams_readers.get() == 0 {
        *seg.streams.borrow_mut() = None;
    }
    seg.streams_persisted.set(false);
    seg.streams_on_disk.set(false);
    seg.streams_rebuild.set(true);
    inner.health.borrow_mut().scrub_bad_stream_indexes += 1;
    inner.bg_wake.notify();
}

/// Reads a stream index file whole, [`SCRUB_CHUNK_BYTES`] at a time, counting it in the scrub's
/// bytes and pacing it at `rate` like the segments' bytes. A file larger than `max_bytes` is an
/// error.
async fn read_index_file(inner: &Inner, name: &str, max_bytes: u64, rate: u64) -> io::Result<Vec<u8>> {
    let file = inner.storage.open(name, false, inner.opts.durability).await?;
    let read = async {
        let size = align_down(file.size().await?);
        if size > max_bytes {
            return Err(io::Error::other(format!(
                "{size} bytes, more than a stream index of this segment can take ({max_bytes})"
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        while (data.len() as u64) < size {
            if inner.bg_stop.get() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "shard closing"));
            }
            let len = SCRUB_CHUNK_BYTES.min(size - data.len() as u64);
            let chunk = file.read(data.len() as u64, len as usize).await?;
            if chunk.is_empty() {
                break;
            }
            data.extend_from_slice(&chunk);
            inner.health.borrow_mut().scrub_bytes += chunk.len() as u64;
            pace(inner, Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
        }
        Ok(data)
    }
    .await;
    let _ = file.close().await;
    read
}
