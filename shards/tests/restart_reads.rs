//! A clean restart costs the same whatever the length of the log: it scans no segment, opens the
//! same number of files (the manifest, the checkpoint, the first and last sealed segments and
//! their summaries, the active segment) and reads, per sealed segment, only its manifest entry.
//! Pinned by counting the files opened and the bytes that cross the storage seam while the shard
//! opens, for a short log and a long one; no timing. A directory without a manifest (written
//! before there was one) opens from its summaries and gains a manifest. (`scripts/restart-time.sh`
//! measures the time this buys on real files.)

mod common;

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::SystemTime;

use common::{payload, rec, run};
use shards::format::{BLOCK_BYTES, MANIFEST_ENTRY_BYTES};
use shards::storage::mem::MemStorage;
use shards::storage::{IoBuf, LocalBoxFuture, OnWritten, SegmentFile, Storage};
use shards::{AckLevel, Durability, Lsn, RecoveryReport, Shard, ShardOptions};

/// Counts the bytes read through the seam; everything else passes through.
#[derive(Clone)]
struct Counting {
    inner: MemStorage,
    bytes_read: Rc<Cell<u64>>,
    opens: Rc<Cell<u64>>,
    manifests_written: Rc<Cell<u64>>,
}

struct CountingFile {
    inner: Rc<dyn SegmentFile>,
    bytes_read: Rc<Cell<u64>>,
}

impl Storage for Counting {
    fn list(&self) -> LocalBoxFuture<io::Result<Vec<String>>> {
        self.inner.list()
    }

    fn open(
        &self,
        name: &str,
        create: bool,
        durability: Durability,
    ) -> LocalBoxFuture<io::Result<Rc<dyn SegmentFile>>> {
        // A spare (prepared in the background, or not yet at the close) is opened for its
        // header too; it is one file or none whatever the length of the log.
        if !name.starts_with("spare-") {
            self.opens.set(self.opens.get() + 1);
        }
        if name == "manifest.tmp" {
            self.manifests_written.set(self.manifests_written.get() + 1);
        }
        let opened = self.inner.open(name, create, durability);
        let bytes_read = self.bytes_read.clone();
        Box::pin(async move {
            let inner = opened.await?;
            Ok(Rc::new(CountingFile { inner, bytes_read }) as Rc<dyn SegmentFile>)
        })
    }

    fn rename(&self, from: &str, to: &str) -> LocalBoxFuture<io::Result<()>> {
        self.inner.rename(from, to)
    }

    fn remove(&self, name: &str) -> LocalBoxFuture<io::Result<()>> {
        self.inner.remove(name)
    }

    fn sync_dir(&self) -> LocalBoxFuture<io::Result<()>> {
        self.inner.sync_dir()
    }

    fn alloc(&self, len: usize) -> IoBuf {
        self.inner.alloc(len)
    }

    fn modified(&self, name: &str) -> Option<SystemTime> {
        self.inner.modified(name)
    }

    fn path_of(&self, name: &str) -> std::path::PathBuf {
        self.inner.path_of(name)
    }
}

impl SegmentFile for CountingFile {
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>> {
        let read = self.inner.read(offset, len);
        let bytes_read = self.bytes_read.clone();
        Box::pin(async move {
            let data = read.await?;
            bytes_read.set(bytes_read.get() + data.len() as u64);
            Ok(data)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>> {
        self.inner.write(offset, buf)
    }

    fn sync(&self) -> LocalBoxFuture<io::Result<()>> {
        self.inner.sync()
    }

    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>> {
        self.inner.commit(offset, buf, on_written)
    }

    fn size(&self) -> LocalBoxFuture<io::Result<u64>> {
        self.inner.size()
    }

    fn allocate(&self, len: u64) -> LocalBoxFuture<io::Result<()>> {
        self.inner.allocate(len)
    }

    fn close(&self) -> LocalBoxFuture<io::Result<()>> {
        self.inner.close()
    }
}

/// Tiny segments (a header block and three blocks of commits), so a long log builds fast; no
/// scrub, so that nothing but recovery reads while the shard opens.
fn opts() -> ShardOptions {
    ShardOptions {
        segment_bytes: 4 * BLOCK_BYTES,
        commit_bytes_max: BLOCK_BYTES as usize,
        scrub_bytes_per_sec: 0,
        durability: Durability::Dsync,
        ..ShardOptions::default()
    }
}

/// Bound on waiting for the background task to write the summaries: far above what it takes.
const SUMMARY_WAIT_ROUNDS: usize = 6000;

/// What one clean restart of a log of at least `segments` segments read.
struct Restart {
    segments: u64,
    report: RecoveryReport,
    /// Bytes read through the storage seam while the shard opened.
    seam_bytes: u64,
    /// Files opened while the shard opened, spares aside.
    opens: u64,
}

/// Builds a log through the engine until it has `segments` segments (records of 3000 bytes on
/// stream 1, `payload(i)` for lsn i + 1), waits until every sealed one has its summary, and closes
/// the shard cleanly. Returns the storage and one past the last lsn.
async fn build_log(segments: usize) -> (MemStorage, u64) {
    let mem = MemStorage::new();
    let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
        .await
        .expect("open a new shard");
    let mut i = 0u64;
    while shard.stats().segment_count < segments {
        let p = payload(i, 3000);
        shard
            .append(1, &[rec(&p)], AckLevel::Durable)
            .await
            .expect("durable append");
        i += 1;
    }
    let sealed = shard.stats().segment_count - 1;
    let mut rounds = 0;
    while mem.file_names().iter().filter(|n| n.ends_with(".sum")).count() < sealed {
        rounds += 1;
        assert!(
            rounds < SUMMARY_WAIT_ROUNDS,
            "the background task wrote no summary for some of {sealed} sealed segments within 30 s: {:?}",
            mem.file_names()
        );
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    shard.close().await.expect("clean close");
    (mem, i + 1)
}

#[test]
fn a_bad_summary_behind_the_manifest_costs_a_scan_at_first_read_and_is_written_again() {
    run(|| async {
        let (mem, end) = build_log(12).await;
        let mut sums: Vec<String> = mem.file_names().into_iter().filter(|n| n.ends_with(".sum")).collect();
        sums.sort();
        // A segment in the middle: the manifest vouches for it, so recovery does not open it.
        let victim = sums[sums.len() / 2].clone();
        let good = mem.live_image(&victim).expect("listed");
        mem.flip_bit(&victim, 20, 3);
        let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
            .await
            .expect("reopen");
        assert_eq!(shard.stats().recovery.scanned, 0, "{:?}", shard.stats().recovery);
        // Every record reads back, the victim's from a scan of its body.
        let mut from = Lsn(1);
        while from.0 < end {
            let batch = shard.read(from, 1 << 20, None).await.expect("read");
            assert!(!batch.records.is_empty(), "nothing read from {from:?} of {end}");
            for r in &batch.records {
                assert_eq!(r.lsn, from, "records in order");
                assert_eq!(r.payload, payload(from.0 - 1, 3000), "the payload of lsn {}", from.0);
                from = Lsn(from.0 + 1);
            }
        }
        // The background task writes the summary again (bounded wait, far above what it takes).
        let mut rounds = 0;
        while mem.live_image(&victim).as_deref() != Some(&good[..]) {
            rounds += 1;
            assert!(
                rounds < SUMMARY_WAIT_ROUNDS,
                "{victim} was not written again within 30 s"
            );
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        shard.close().await.expect("close");
    });
}

/// Builds a log through the engine until it has `segments` segments, waits until every sealed
/// one has its summary, closes the shard cleanly, opens it again and counts what that read.
/// `without_manifest`: the manifest is removed first, as in a directory from before it existed;
/// that open writes one, and the open counted is the one after it.
async fn clean_restart(segments: usize, without_manifest: bool) -> Restart {
    let (mem, end) = build_log(segments).await;
    let written_to = Lsn(end - 1);
    assert!(
        mem.file_names().iter().any(|n| n == "checkpoint"),
        "a clean close leaves a checkpoint"
    );
    if without_manifest {
        mem.remove("manifest").await.expect("remove the manifest");
        let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts())
            .await
            .expect("open without a manifest");
        let stats = shard.stats();
        assert_eq!(
            stats.recovery.scanned, 0,
            "the summaries are trusted: {:?}",
            stats.recovery
        );
        assert_eq!(shard.durable_lsn(), written_to, "the whole log is back");
        shard.close().await.expect("close");
        assert!(
            mem.file_names().iter().any(|n| n == "manifest"),
            "an open without a manifest writes one"
        );
    }
    let counting = Counting {
        inner: mem,
        bytes_read: Rc::new(Cell::new(0)),
        opens: Rc::new(Cell::new(0)),
        manifests_written: Rc::new(Cell::new(0)),
    };
    let shard = Shard::open_with_storage(Rc::new(counting.clone()), opts())
        .await
        .expect("reopen");
    let seam_bytes = counting.bytes_read.get();
    let opens = counting.opens.get();
    assert_eq!(
        counting.manifests_written.get(),
        0,
        "a clean restart finds the manifest up to date and does not write it again"
    );
    let stats = shard.stats();
    assert_eq!(shard.durable_lsn(), written_to, "the whole log is back");
    shard.close().await.expect("close");
    Restart {
        segments: stats.segment_count as u64,
        report: stats.recovery,
        seam_bytes,
        opens,
    }
}

#[test]
fn clean_restart_reads_the_same_whatever_the_number_of_sealed_segments() {
    run(|| async {
        let short = clean_restart(4, false).await;
        let long = clean_restart(300, false).await;
        for r in [&short, &long] {
            assert_eq!(r.report.scanned, 0, "a clean restart scans no segment: {:?}", r.report);
            assert_eq!(r.report.trusted, r.segments, "every segment is trusted: {:?}", r.report);
            assert!(r.report.checkpoint_used, "{:?}", r.report);
        }
        // Segment bodies read: only the end of the active segment, however long the log.
        assert_eq!(
            short.report.bytes_read, long.report.bytes_read,
            "segment body bytes read by a clean restart grow with the log: {} segments read {}, {} \
             segments read {}",
            short.segments, short.report.bytes_read, long.segments, long.report.bytes_read
        );
        assert_eq!(
            short.opens, long.opens,
            "a clean restart opened {} files for {} segments and {} for {}",
            short.opens, short.segments, long.opens, long.segments
        );
        // Everything else: one manifest entry per segment.
        let extra = long.seam_bytes - short.seam_bytes;
        let more = long.segments - short.segments;
        assert!(
            extra <= more * MANIFEST_ENTRY_BYTES as u64 + BLOCK_BYTES,
            "a clean restart read {extra} more bytes for {more} more sealed segments (a manifest entry \
             is {MANIFEST_ENTRY_BYTES}): {} segments read {} bytes, {} segments read {}",
            short.segments,
            short.seam_bytes,
            long.segments,
            long.seam_bytes
        );
    });
}

#[test]
fn a_directory_without_a_manifest_opens_from_its_summaries_and_gains_one() {
    run(|| async {
        let short = clean_restart(4, true).await;
        let long = clean_restart(40, true).await;
        for r in [&short, &long] {
            assert_eq!(r.report.scanned, 0, "{:?}", r.report);
            assert_eq!(r.report.trusted, r.segments, "{:?}", r.report);
        }
        assert_eq!(short.opens, long.opens, "after the first open, the manifest is used");
    });
}
