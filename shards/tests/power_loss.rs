//! Simulated power loss and I/O failure against the storage seam.
//!
//! The crash test runs random workloads (appends of random sizes, record counts, streams and ack
//! levels, many in flight at once; small segments so the log rotates; retention for some seeds),
//! cuts the power at a random moment with [`MemStorage::crash`], recovers from the crashed image
//! and checks the durability contract:
//!
//! - recovery succeeds;
//! - every record acknowledged `Durable` before the crash (and every lsn the shard itself counted
//!   as durable) is recovered, byte-identical;
//! - every recovered record is one that was appended at that lsn: nothing unwritten, nothing
//!   from a cut tail, nothing from a recycled segment comes back;
//! - lsns are contiguous from the first retained lsn to the durable end, and appending continues
//!   right after it.
//!
//! A seed runs up to three generations (append, crash, recover, append again on the recovered
//! image, crash again), and some seeds also cut the power while recovery itself is running.
//!
//! The metadata that lets recovery skip reading the log is covered too: segments rotate every
//! few dozen commits, so the power goes while summaries of sealed segments are being written;
//! some generations end with a clean close, and the power goes while (or after) its checkpoint
//! is written, in which case a restart that was not interrupted must scan nothing at all. Some
//! seeds tamper with the crashed image before recovery: a bit flipped in a summary or the
//! checkpoint, a summary re-encoded with a valid checksum but a wrong field (disagreeing with the
//! body), or a checkpoint of an earlier clean shutdown put back (older than the log); the same
//! for the manifest (a flipped bit, an entry misstated under a valid checksum, the manifest of an
//! earlier generation put back, older than the log), which is also written while the power goes,
//! since every seal rewrites it. None of
//! them may cost an acknowledged record; a disagreement may end the seed only as a typed
//! `Corruption` (from recovery, or from a read of the range the lie covers), never as a cut.
//!
//! A third of the seeds preallocate their new segment files instead of zero-filling them
//! (`SegmentPrep::Preallocate`): the power then also goes while a file's allocation is not yet
//! durable.
//!
//! Half of the seeds run on the plain double, where a write reaches the device when it
//! completes. The other half run on [`Tearing`], which puts a write's bytes on the device as soon
//! as it is submitted and keeps it in flight a random while: a crash then tears writes that were
//! still in flight, including `O_DSYNC` writes, which the plain double makes durable atomically.
//!
//! A failing seed is printed; `SHARDLOG_SEED=N cargo test -p shards --test power_loss` replays it
//! (scheduling of the background task queue is not perfectly deterministic, so a replay usually,
//! not always, takes the same path). The long run is
//! `cargo test -p shards --release --test power_loss -- --ignored` (`SHARDLOG_SEEDS` overrides its
//! count of 10,000).

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::run;
use shards::format::{
    Manifest, SegmentSummary, SummaryKind, COMMIT_HEADER_BYTES, MANIFEST_ENTRY_BYTES, MANIFEST_HEADER_BYTES,
    RECORD_HEADER_BYTES, SUMMARY_FIXED_BYTES,
};
use shards::storage::mem::{FaultPoint, MemStorage};
use shards::storage::{IoBuf, LocalBoxFuture, OnWritten, SegmentFile, Storage};
use shards::{AckLevel, Durability, Lsn, RecordRef, SegmentPrep, Shard, ShardError, ShardOptions};

/// Seeds of the default run: enough to cover every workload shape a few times, fast in debug.
const SEEDS_DEFAULT: u64 = 200;
/// Seeds of the `#[ignore]`d long run.
const SEEDS_LONG: u64 = 10_000;
/// The long run starts after the default run's seeds, so the two never repeat each other.
const SEEDS_LONG_FIRST: u64 = 1_000_000;
/// Most generations (run, crash, recover) per seed.
const GENERATIONS_MAX: u32 = 3;

/// The seed being run, for the panic hook: a panic inside the engine must still name its seed.
static CURRENT_SEED: AtomicU64 = AtomicU64::new(u64::MAX);
static HOOK: Once = Once::new();

fn install_seed_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let seed = CURRENT_SEED.load(Ordering::SeqCst);
            if seed != u64::MAX {
                eprintln!(
                    "power_loss: failing seed {seed}; replay with \
                     SHARDLOG_SEED={seed} cargo test -p shards --test power_loss"
                );
            }
            previous(info);
        }));
    });
}

/// With `SHARDLOG_TRACE` set, the crash test says what it is doing (to find where a seed hangs).
fn trace(what: std::fmt::Arguments<'_>) {
    if std::env::var_os("SHARDLOG_TRACE").is_some() {
        eprintln!("power_loss: {what}");
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

async fn yield_times(n: u32) {
    for _ in 0..n {
        futures_lite::future::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------
// A storage whose writes can be torn while in flight.

/// Wraps the in-memory double so that a write's bytes reach the (simulated) device at
/// submission, and the write then stays in flight for a random number of scheduler turns before
/// it completes. A crash in that window tears it at sector granularity, as a real power loss can
/// tear a write the device had started. Files are opened on the double in linked mode (writes
/// are volatile until a sync) and an `O_DSYNC` file is emulated by syncing before a write
/// completes, so that a dsync write in flight is torn too.
#[derive(Clone)]
struct Tearing {
    mem: MemStorage,
    rng: Rc<RefCell<StdRng>>,
    in_flight_yields_max: u32,
}

impl Tearing {
    fn new(mem: MemStorage, seed: u64, in_flight_yields_max: u32) -> Tearing {
        Tearing {
            mem,
            rng: Rc::new(RefCell::new(StdRng::seed_from_u64(seed))),
            in_flight_yields_max,
        }
    }
}

struct TearingFile {
    inner: Rc<dyn SegmentFile>,
    dsync: bool,
    rng: Rc<RefCell<StdRng>>,
    in_flight_yields_max: u32,
}

impl TearingFile {
    fn in_flight_yields(&self) -> u32 {
        self.rng.borrow_mut().gen_range(0..=self.in_flight_yields_max)
    }
}

impl Storage for Tearing {
    fn list(&self) -> LocalBoxFuture<io::Result<Vec<String>>> {
        self.mem.list()
    }

    fn open(
        &self,
        name: &str,
        create: bool,
        durability: Durability,
    ) -> LocalBoxFuture<io::Result<Rc<dyn SegmentFile>>> {
        let opened = self.mem.open(name, create, Durability::Linked);
        let rng = self.rng.clone();
        let in_flight_yields_max = self.in_flight_yields_max;
        Box::pin(async move {
            let inner = opened.await?;
            let file: Rc<dyn SegmentFile> = Rc::new(TearingFile {
                inner,
                dsync: durability == Durability::Dsync,
                rng,
                in_flight_yields_max,
            });
            Ok(file)
        })
    }

    fn rename(&self, from: &str, to: &str) -> LocalBoxFuture<io::Result<()>> {
        self.mem.rename(from, to)
    }

    fn remove(&self, name: &str) -> LocalBoxFuture<io::Result<()>> {
        self.mem.remove(name)
    }

    fn sync_dir(&self) -> LocalBoxFuture<io::Result<()>> {
        self.mem.sync_dir()
    }

    fn alloc(&self, len: usize) -> IoBuf {
        self.mem.alloc(len)
    }

    fn modified(&self, name: &str) -> Option<SystemTime> {
        self.mem.modified(name)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.mem.path_of(name)
    }
}

impl SegmentFile for TearingFile {
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>> {
        self.inner.read(offset, len)
    }

    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>> {
        let inner = self.inner.clone();
        let dsync = self.dsync;
        let yields = self.in_flight_yields();
        Box::pin(async move {
            // On the device, not yet complete: a crash from here on may tear it.
            inner.write(offset, buf).await?;
            yield_times(yields).await;
            if dsync {
                inner.sync().await?;
            }
            Ok(())
        })
    }

    fn sync(&self) -> LocalBoxFuture<io::Result<()>> {
        self.inner.sync()
    }

    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>> {
        let inner = self.inner.clone();
        let dsync = self.dsync;
        let yields = self.in_flight_yields();
        Box::pin(async move {
            inner.write(offset, buf).await?;
            yield_times(yields).await;
            if dsync {
                // One O_DSYNC write: it completes only once durable.
                inner.sync().await?;
                on_written();
            } else {
                on_written();
                inner.sync().await?;
            }
            Ok(())
        })
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

// ---------------------------------------------------------------------------------------------
// The model: what was appended at each lsn, and what was acknowledged.

#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    stream: u64,
    timestamp: Option<u64>,
    payload: Vec<u8>,
    /// Which generation appended it: a record of an earlier generation's cut tail must never
    /// come back in place of a later one.
    generation: u32,
}

#[derive(Default)]
struct Model {
    /// Every record handed to `append`, by lsn. lsns given back after a failure are reassigned,
    /// and the later assignment wins.
    appended: BTreeMap<u64, Expected>,
    /// Highest lsn acknowledged `Durable` (the contract covers every lsn at or below it).
    acked_durable: u64,
    /// Set at the crash: acknowledgements that arrive later are not counted.
    crashed: bool,
    /// Unexpected append errors, reported by the checker.
    errors: Vec<String>,
}

/// What was known at the instant of the crash.
struct AtCrash {
    acked_durable: u64,
    shard_durable: u64,
    first_available: u64,
    /// Segments the shard held, the active one included (it counts from its activation on).
    segments: usize,
    /// Files of the live image and of the crashed image, for failure reports.
    files_live: Vec<String>,
    files_crashed: Vec<String>,
}

/// Shape of one seed's workload.
#[derive(Debug, Clone)]
struct Plan {
    tearing: bool,
    opts: ShardOptions,
    generations: u32,
    /// Cut the power during recovery of the second generation on.
    crash_in_recovery: bool,
    sync_yields_max: u32,
    /// What is done to each crashed image before recovery.
    tamper: Tamper,
}

/// Damage done to the recovery metadata of a crashed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    None,
    /// One bit of a summary or of the checkpoint.
    FlipBit,
    /// A summary re-encoded with a valid checksum and one field changed.
    Misstate,
    /// The checkpoint of an earlier clean shutdown put back.
    StaleCheckpoint,
    /// The manifest of an earlier generation put back (older than the log).
    StaleManifest,
}

fn plan(seed: u64, rng: &mut StdRng) -> Plan {
    let durability = if seed % 2 == 0 {
        Durability::Linked
    } else {
        Durability::Dsync
    };
    let segment_bytes: u64 = [16u64 << 10, 32 << 10, 64 << 10][rng.gen_range(0..3)];
    let commit_bytes_max = *[4usize << 10, 8 << 10, 12 << 10]
        .iter()
        .filter(|&&c| (c as u64) < segment_bytes - 4096)
        .nth(rng.gen_range(0..2))
        .unwrap_or(&(4 << 10));
    let retention_bytes = rng.gen_bool(0.4).then(|| segment_bytes * rng.gen_range(2..5));
    Plan {
        tearing: (seed / 2) % 2 == 1,
        opts: ShardOptions {
            segment_bytes,
            commit_bytes_max,
            retention_bytes,
            durability,
            // Commits here are far below `PREALLOCATE_AFTER_COMMIT_BYTES`: `Auto` zero-fills, and
            // every third seed preallocates its new segment files instead.
            segment_prep: if (seed / 4) % 3 == 0 {
                SegmentPrep::Preallocate
            } else {
                SegmentPrep::Auto
            },
            ..ShardOptions::default()
        },
        generations: rng.gen_range(1..=GENERATIONS_MAX),
        crash_in_recovery: rng.gen_bool(0.3),
        sync_yields_max: rng.gen_range(0..8),
        tamper: [
            Tamper::None,
            Tamper::None,
            Tamper::None,
            Tamper::FlipBit,
            Tamper::Misstate,
            Tamper::StaleCheckpoint,
            Tamper::StaleManifest,
        ][rng.gen_range(0..7)],
    }
}

fn storage_for(plan: &Plan, mem: &MemStorage, seed: u64) -> Rc<dyn Storage> {
    mem.set_io_yields(if plan.tearing { 0 } else { 3 }, plan.sync_yields_max);
    mem.set_sync_jitter(seed);
    if plan.tearing {
        Rc::new(Tearing::new(mem.clone(), seed, 6))
    } else {
        Rc::new(mem.clone())
    }
}

/// Random payload sizes: mostly small, some near the per-append limit.
fn payload_len(rng: &mut StdRng, room: usize) -> usize {
    let len = match rng.gen_range(0..10) {
        0..=5 => rng.gen_range(1..64),
        6..=8 => rng.gen_range(64..1500),
        _ => rng.gen_range(1500..8000),
    };
    len.clamp(1, room.max(1))
}

/// Issues one append with a random shape and spawns a task that records its outcome.
fn issue_append(shard: &Shard, model: &Rc<RefCell<Model>>, rng: &mut StdRng, generation: u32, commit_bytes_max: usize) {
    let count = match rng.gen_range(0..10) {
        0..=6 => 1,
        7..=8 => rng.gen_range(2..8),
        _ => 64,
    };
    let per_record_room = (commit_bytes_max - COMMIT_HEADER_BYTES) / count - RECORD_HEADER_BYTES;
    let stream = rng.gen_range(0..4u64);
    let records: Vec<Expected> = (0..count)
        .map(|_| {
            let len = payload_len(rng, per_record_room);
            Expected {
                stream,
                timestamp: rng.gen_bool(0.5).then(|| rng.gen()),
                payload: (0..len).map(|_| rng.gen()).collect(),
                generation,
            }
        })
        .collect();
    let ack = match rng.gen_range(0..6) {
        0 => AckLevel::None,
        1 => AckLevel::Written,
        _ => AckLevel::Durable,
    };
    let refs: Vec<RecordRef<'_>> = records
        .iter()
        .map(|r| RecordRef {
            payload: &r.payload,
            timestamp: r.timestamp,
        })
        .collect();
    // lsns are assigned at call time, so the model knows them before the future resolves.
    let first = shard.next_lsn().0;
    let fut = shard.append(stream, &refs, ack);
    {
        let mut m = model.borrow_mut();
        for (i, r) in records.into_iter().enumerate() {
            m.appended.insert(first + i as u64, r);
        }
    }
    let model = model.clone();
    glommio::spawn_local(async move {
        let result = fut.await;
        let mut m = model.borrow_mut();
        if m.crashed {
            return;
        }
        match result {
            Ok(receipt) => {
                if receipt.first_lsn != Lsn(first) || receipt.count as usize != count {
                    m.errors.push(format!(
                        "append given lsn {first} x {count} at call time, receipt says {receipt:?}"
                    ));
                }
                if ack == AckLevel::Durable {
                    m.acked_durable = m.acked_durable.max(receipt.last_lsn().0);
                }
            }
            Err(e) => m.errors.push(format!("append at lsn {first} failed: {e}")),
        }
    })
    .detach();
}

/// One generation's workload on `shard`, cut short by a crash at a random step. Returns the
/// crashed image and what was known at the crash.
async fn run_until_crash(
    shard: &Shard,
    mem: &MemStorage,
    model: &Rc<RefCell<Model>>,
    rng: &mut StdRng,
    generation: u32,
    plan: &Plan,
) -> Result<(MemStorage, AtCrash, Closing), String> {
    let steps = rng.gen_range(1..160u32);
    let crash_at = rng.gen_range(0..steps + 20);
    let close_first = match plan.tamper {
        // The first generation closes, so that a later one has an old checkpoint to put back.
        Tamper::StaleCheckpoint if generation == 1 => true,
        Tamper::None => rng.gen_bool(0.25),
        _ => rng.gen_bool(0.5),
    };
    for step in 0..steps + 20 {
        if step == crash_at {
            break;
        }
        if step >= steps {
            // After the last append: let the pipeline drain, retention run, the spare get ready.
            yield_times(rng.gen_range(0..20)).await;
            continue;
        }
        issue_append(shard, model, rng, generation, plan.opts.commit_bytes_max);
        match rng.gen_range(0..10) {
            // Concurrency 1 for a while: wait for this append's durability.
            0 => {
                let last = Lsn(shard.next_lsn().0 - 1);
                trace(format_args!("wait_durable({last})"));
                let waited = async {
                    let _ = shard.wait_durable(last).await;
                };
                guarded(&format!("wait_durable({last})"), waited, shard, mem).await?;
            }
            1..=4 => yield_times(rng.gen_range(1..6)).await,
            _ => {}
        }
    }
    // A clean close (which writes the checkpoint) that the power cuts short, or not.
    let closing = if close_first {
        let shard_probe = shard;
        let shard = shard.clone();
        let done = Rc::new(std::cell::Cell::new(false));
        let task = glommio::spawn_local({
            let done = done.clone();
            async move {
                let _ = shard.close().await;
                done.set(true);
            }
        });
        // Half of the closes (and the first of a seed that puts an old checkpoint back) finish
        // before the power goes; the others are cut short, maybe while the checkpoint is written.
        let finish = rng.gen_bool(0.5) || (plan.tamper == Tamper::StaleCheckpoint && generation == 1);
        if finish {
            let probe = shard_probe.clone();
            guarded("clean close", task, &probe, mem).await?;
            trace(format_args!("closed cleanly before the crash"));
            Closing {
                task: None,
                finished_before_crash: true,
            }
        } else {
            yield_times(rng.gen_range(0..60)).await;
            Closing {
                task: Some(task),
                finished_before_crash: done.get(),
            }
        }
    } else {
        Closing {
            task: None,
            finished_before_crash: false,
        }
    };
    let crash_seed = rng.gen();
    let crashed = mem.crash(crash_seed);
    let at = {
        let mut m = model.borrow_mut();
        m.crashed = true;
        AtCrash {
            acked_durable: m.acked_durable,
            shard_durable: shard.durable_lsn().0,
            first_available: shard.first_available_lsn().0,
            segments: shard.stats().segment_count,
            files_live: mem.file_names(),
            files_crashed: crashed.file_names(),
        }
    };
    Ok((crashed, at, closing))
}

/// A close started before the crash.
struct Closing {
    task: Option<glommio::Task<()>>,
    /// It completed (checkpoint written) before the power went.
    finished_before_crash: bool,
}

async fn read_all(shard: &Shard, from: Lsn) -> Result<Vec<shards::ReadRecord>, String> {
    let mut out = Vec::new();
    let mut from = from;
    loop {
        let batch = shard
            .read(from, 64 << 10, None)
            .await
            .map_err(|e| format!("{}read from {from}: {e}", corruption_mark(&e)))?;
        if batch.records.is_empty() {
            return Ok(out);
        }
        from = batch.next_lsn;
        out.extend(batch.records);
    }
}

/// The records of `stream` from `from` on, read with the stream filter (through the segments'
/// stream indexes) in pages of `max_bytes`, up to the durable end.
async fn read_stream(
    shard: &Shard,
    stream: u64,
    from: Lsn,
    max_bytes: usize,
) -> Result<Vec<shards::ReadRecord>, String> {
    let end = shard.durable_lsn().0;
    let mut out = Vec::new();
    let mut from = from;
    while from.0 <= end {
        let batch = shard
            .read(from, max_bytes, Some(stream))
            .await
            .map_err(|e| format!("{}filtered read from {from}: {e}", corruption_mark(&e)))?;
        if batch.next_lsn <= from && batch.records.is_empty() {
            return Err(format!(
                "a filtered read of stream {stream} from {from} made no progress"
            ));
        }
        from = batch.next_lsn;
        out.extend(batch.records);
    }
    Ok(out)
}

/// Errors that are a typed `Corruption` start with this, so that a seed that tampered with the
/// recovery metadata can tell a reported lie from a silent loss.
const CORRUPTION: &str = "CORRUPTION: ";

fn corruption_mark(e: &ShardError) -> &'static str {
    match e {
        ShardError::Corruption { .. } => CORRUPTION,
        _ => "",
    }
}

/// Tampers with the recovery metadata of a crashed image as `how` says. Returns whether it did
/// anything (there may be no summary or checkpoint to tamper with).
async fn tamper(
    image: &MemStorage,
    how: Tamper,
    rng: &mut StdRng,
    saved_checkpoint: Option<&[u8]>,
    saved_manifest: Option<&[u8]>,
) -> bool {
    let meta: Vec<String> = image
        .file_names()
        .into_iter()
        .filter(|n| {
            n.ends_with(".sum")
                || n == "checkpoint"
                || n == "manifest"
                || (how == Tamper::FlipBit && n.ends_with(".six"))
        })
        .collect();
    let pick = |rng: &mut StdRng| (!meta.is_empty()).then(|| meta[rng.gen_range(0..meta.len())].clone());
    match how {
        Tamper::None => false,
        Tamper::FlipBit => {
            let Some(name) = pick(rng) else { return false };
            let bytes = image.live_image(&name).expect("listed");
            let count = |at: usize| match bytes.get(at..at + 4) {
                Some(b) => u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize,
                None => 0,
            };
            // Within the encoded part: the fixed fields and the entries it counts (for a stream
            // index: 72 fixed bytes, 16 per stream, 12 per entry).
            let used = if name.ends_with(".six") {
                72 + count(12) * 16 + count(60) * 12
            } else if name == "manifest" {
                MANIFEST_HEADER_BYTES + count(12) * MANIFEST_ENTRY_BYTES
            } else {
                SUMMARY_FIXED_BYTES + count(12) * 16
            };
            let used = used.min(bytes.len()).max(1);
            image.flip_bit(&name, rng.gen_range(0..used as u64), rng.gen_range(0..8));
            trace(format_args!("flipped a bit of {name}"));
            true
        }
        Tamper::Misstate => {
            let Some(name) = pick(rng) else { return false };
            if name == "manifest" {
                return misstate_manifest(image, rng);
            }
            let kind = if name == "checkpoint" {
                SummaryKind::Checkpoint
            } else {
                SummaryKind::Sealed
            };
            let bytes = image.live_image(&name).expect("listed");
            let Ok(mut s) = SegmentSummary::decode(kind, &bytes) else {
                return false;
            };
            let what = rng.gen_range(0..6);
            let delta = rng.gen_range(1..4u64);
            match what {
                0 => s.end_lsn += delta,
                1 => s.end_lsn = (s.end_lsn - delta).max(s.base_lsn),
                2 => s.end_offset += delta,
                3 => s.commits += 1,
                4 => s.commits_crc ^= 1 << rng.gen_range(0..32),
                _ => match s.index.len() {
                    0 => s.end_lsn += delta,
                    n => s.index[rng.gen_range(0..n)].1 += delta,
                },
            }
            let mut out = vec![0u8; s.encoded_bytes().max(bytes.len())];
            s.encode(kind, &mut out);
            image.overwrite(&name, 0, &out);
            trace(format_args!("misstated field {what} of {name}: {s:?}"));
            true
        }
        Tamper::StaleManifest => {
            let Some(old) = saved_manifest else { return false };
            put_back(image, "manifest", old).await;
            trace(format_args!("put back an old manifest"));
            true
        }
        Tamper::StaleCheckpoint => {
            let Some(old) = saved_checkpoint else { return false };
            let file = image
                .open("checkpoint", true, Durability::Dsync)
                .await
                .expect("create checkpoint");
            let mut buf = image.alloc(old.len());
            buf.as_mut_slice().copy_from_slice(old);
            file.write(0, buf).await.expect("write checkpoint");
            file.sync().await.expect("sync checkpoint");
            image.sync_dir().await.expect("sync dir");
            trace(format_args!("put back an old checkpoint"));
            true
        }
    }
}

/// Re-encodes the manifest with a valid checksum and one field of one entry changed. Returns
/// whether it did (the change must leave a manifest that could be true).
fn misstate_manifest(image: &MemStorage, rng: &mut StdRng) -> bool {
    let bytes = image.live_image("manifest").expect("listed");
    let Ok(mut m) = Manifest::decode(&bytes) else {
        return false;
    };
    if m.entries.is_empty() {
        return false;
    }
    let n = m.entries.len();
    let e = &mut m.entries[rng.gen_range(0..n)];
    let what = rng.gen_range(0..4);
    let delta = rng.gen_range(1..4u64);
    match what {
        0 => e.end_lsn += delta,
        1 => e.end_offset += delta,
        2 => e.commits += 1,
        _ => e.commits_crc ^= 1 << rng.gen_range(0..32),
    }
    if m.check().is_err() {
        return false;
    }
    let mut out = vec![0u8; m.encoded_bytes().max(bytes.len())];
    m.encode(&mut out);
    image.overwrite("manifest", 0, &out);
    trace(format_args!("misstated field {what} of the manifest: {m:?}"));
    true
}

/// Writes `old` as the whole of file `name` (created if missing), durably.
async fn put_back(image: &MemStorage, name: &str, old: &[u8]) {
    let file = image.open(name, true, Durability::Dsync).await.expect("create file");
    let mut buf = image.alloc(old.len());
    buf.as_mut_slice().copy_from_slice(old);
    file.write(0, buf).await.expect("write file");
    file.sync().await.expect("sync file");
    image.sync_dir().await.expect("sync dir");
}

/// Checks a recovered shard against the model and what was known at the crash, then forgets
/// the model's records that did not survive (their lsns will be reused).
///
/// `opts` are the shard's options, for the retention that a recovered shard may legitimately
/// apply on open (see below).
async fn check_recovered(
    shard: &Shard,
    model: &Rc<RefCell<Model>>,
    at: &AtCrash,
    opts: &ShardOptions,
) -> Result<(), String> {
    let durable = shard.durable_lsn().0;
    let first = shard.first_available_lsn().0;
    if shard.next_lsn().0 != durable + 1 {
        return Err(format!(
            "recovered next_lsn {} but durable_lsn {durable}",
            shard.next_lsn()
        ));
    }
    if durable < at.acked_durable {
        return Err(format!(
            "lost acknowledged records: acked durable up to lsn {}, recovered up to {durable}",
            at.acked_durable
        ));
    }
    if durable < at.shard_durable {
        return Err(format!(
            "the shard counted lsn {} durable, recovery found only {durable}",
            at.shard_durable
        ));
    }
    // Retention is due from the moment the committer activates a segment that takes the log over
    // retention_bytes, but the background task applies it (and moves first_available) only at
    // its next turn. A crash in between leaves a log over the limit on the device (the new
    // segment's header goes out with its first commit), and the recovered shard applies that
    // retention on open, as does a shard whose recovery a second crash interrupted. That is
    // legitimate exactly when the log was over the limit at the crash and one more segment than
    // the recovered shard kept would still be over it; a segment dropped by recovery itself (a
    // lost header, say) fails one of the two.
    let retired_by_restart = opts.retention_bytes.is_some_and(|max| {
        let kept = shard.stats().segment_count as u64;
        at.segments as u64 * opts.segment_bytes > max && (kept + 1) * opts.segment_bytes > max
    });
    if first > at.first_available && !retired_by_restart {
        return Err(format!(
            "recovered first lsn {first} is past the first lsn {} retained at the crash \
             (files live {:?}, after the crash {:?})",
            at.first_available, at.files_live, at.files_crashed
        ));
    }
    let records = read_all(shard, Lsn(first)).await?;
    let expected_count = (durable + 1).saturating_sub(first);
    if records.len() as u64 != expected_count {
        return Err(format!(
            "read {} records from lsn {first}, expected {expected_count} (durable {durable})",
            records.len()
        ));
    }
    {
        let m = model.borrow();
        for (i, r) in records.iter().enumerate() {
            let lsn = first + i as u64;
            if r.lsn.0 != lsn {
                return Err(format!("lsns not contiguous: expected {lsn}, read {}", r.lsn));
            }
            let Some(want) = m.appended.get(&lsn) else {
                return Err(format!("lsn {lsn} was recovered but never appended"));
            };
            if r.stream != want.stream || r.timestamp != want.timestamp || r.payload != want.payload {
                return Err(format!(
                    "lsn {lsn} differs from what was appended (generation {}): stream {} vs {}, \
                 timestamp {:?} vs {:?}, {} vs {} payload bytes",
                    want.generation,
                    r.stream,
                    want.stream,
                    r.timestamp,
                    want.timestamp,
                    r.payload.len(),
                    want.payload.len()
                ));
            }
        }
    }
    // Reads filtered to each stream (through the stream indexes, loaded, rebuilt or ignored as
    // recovery found them) return exactly the records of that stream.
    for stream in 0..4 {
        let got = read_stream(shard, stream, Lsn(first), 3000).await?;
        let want: Vec<&shards::ReadRecord> = records.iter().filter(|r| r.stream == stream).collect();
        if got.iter().collect::<Vec<_>>() != want {
            return Err(format!(
                "a read filtered to stream {stream} returned {} records (lsns {:?}..), the log holds {} \
                 (lsns {:?}..)",
                got.len(),
                got.first().map(|r| r.lsn),
                want.len(),
                want.first().map(|r| r.lsn)
            ));
        }
    }
    let beyond = shard
        .read(Lsn(durable + 1), 1 << 20, None)
        .await
        .map_err(|e| format!("read past the end: {e}"))?;
    if !beyond.records.is_empty() {
        return Err(format!("read past durable lsn {durable} returned records"));
    }
    let mut m = model.borrow_mut();
    m.appended.retain(|&lsn, _| lsn >= first && lsn <= durable);
    m.acked_durable = durable;
    m.crashed = false;
    Ok(())
}

/// Opens a shard on `storage`, and with `crash_seed` cuts the power once recovery has run for a
/// random number of scheduler turns; then recovers the image left by that crash instead.
async fn recover(
    plan: &Plan,
    crashed: MemStorage,
    seed: u64,
    crash_during: Option<(u64, u32)>,
) -> Result<(Shard, MemStorage), String> {
    let mut mem = crashed;
    if let Some((crash_seed, turns)) = crash_during {
        let storage = storage_for(plan, &mem, seed ^ 0x5eed);
        let opts = plan.opts.clone();
        let opening = glommio::spawn_local(async move { Shard::open_with_storage(storage, opts).await });
        yield_times(turns).await;
        let again = mem.crash(crash_seed);
        // Let the interrupted recovery finish on the old image and shut it down.
        match opening.await {
            Ok(shard) => close_guarded(shard, &mem).await?,
            Err(e) => {
                return Err(format!(
                    "{}recovery (before the second crash) failed: {e}",
                    corruption_mark(&e)
                ))
            }
        }
        mem = again;
    }
    let storage = storage_for(plan, &mem, seed);
    match Shard::open_with_storage(storage, plan.opts.clone()).await {
        Ok(shard) => Ok((shard, mem)),
        Err(e) => Err(format!("{}recovery failed: {e}", corruption_mark(&e))),
    }
}

/// A bound on how long closing a shard may take; only a guard against hanging forever, far above
/// any real duration.
const CLOSE_GUARD: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `fut` (whose outcome does not matter here), failing with the shard's and the storage's
/// state if it does not finish within [`CLOSE_GUARD`].
async fn guarded(
    what: &str,
    fut: impl std::future::Future<Output = ()>,
    probe: &Shard,
    mem: &MemStorage,
) -> Result<(), String> {
    let finished = futures_lite::future::or(
        async move {
            fut.await;
            true
        },
        async {
            glommio::timer::sleep(CLOSE_GUARD).await;
            false
        },
    )
    .await;
    if finished {
        return Ok(());
    }
    let st = probe.stats();
    Err(format!(
        "{what} did not finish: queue_depth {}, durable {}, next {}, segments {}, poisoned {:?}, \
         storage {:?}, files {:?}",
        st.queue_depth,
        st.durable_lsn,
        probe.next_lsn(),
        st.segment_count,
        st.poisoned,
        mem.stats(),
        mem.file_names()
    ))
}

/// A bound on one seed of the crash test (it takes milliseconds); only a guard against hangs.
const SEED_GUARD: std::time::Duration = std::time::Duration::from_secs(120);

/// Closes `shard` (a poisoned shard reports it; that does not matter here), guarded.
async fn close_guarded(shard: Shard, mem: &MemStorage) -> Result<(), String> {
    let probe = shard.clone();
    guarded(
        "close",
        async move {
            let _ = shard.close().await;
        },
        &probe,
        mem,
    )
    .await
}

async fn power_loss_seed(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = plan(seed, &mut rng);
    let fail = |generation: u32, e: String| format!("seed {seed}, generation {generation}, {plan:?}: {e}");
    let model: Rc<RefCell<Model>> = Rc::default();
    let mut mem = MemStorage::new();
    let mut shard = Shard::open_with_storage(storage_for(&plan, &mem, seed), plan.opts.clone())
        .await
        .map_err(|e| fail(0, format!("open: {e}")))?;
    // The checkpoint of the latest clean close, to put back later (Tamper::StaleCheckpoint).
    let mut saved_checkpoint: Option<Vec<u8>> = None;
    let mut saved_manifest: Option<Vec<u8>> = None;
    for generation in 1..=plan.generations {
        trace(format_args!("seed {seed} generation {generation}: run"));
        let (crashed, at, closing) = run_until_crash(&shard, &mem, &model, &mut rng, generation, &plan)
            .await
            .map_err(|e| fail(generation, e))?;
        // The process is gone with the power: its shard may finish what it had queued on the
        // old image, which nobody looks at any more.
        trace(format_args!(
            "seed {seed} generation {generation}: close the crashed shard"
        ));
        match closing.task {
            Some(task) => guarded("close (begun before the crash)", task, &shard, &mem)
                .await
                .map_err(|e| fail(generation, e))?,
            None => close_guarded(shard, &mem).await.map_err(|e| fail(generation, e))?,
        }
        let own_checkpoint = crashed.live_image("checkpoint");
        let own_manifest = crashed.live_image("manifest");
        let tampered = tamper(
            &crashed,
            plan.tamper,
            &mut rng,
            saved_checkpoint.as_deref(),
            saved_manifest.as_deref(),
        )
        .await;
        if let Some(c) = own_checkpoint {
            saved_checkpoint = Some(c);
        }
        if saved_manifest.is_none() {
            // The first generation's manifest, so a later one is put back older than the log.
            saved_manifest = own_manifest;
        }
        // Only a lie that a summary or checkpoint tells may end the seed, and only as Corruption.
        let may_be_corruption = |e: &str| tampered && plan.tamper == Tamper::Misstate && e.starts_with(CORRUPTION);
        trace(format_args!("seed {seed} generation {generation}: recover"));
        let errors = std::mem::take(&mut model.borrow_mut().errors);
        if let Some(e) = errors.first() {
            return Err(fail(generation, format!("before the crash: {e}")));
        }
        let crash_during = (generation > 1 && plan.crash_in_recovery).then(|| (rng.gen(), rng.gen_range(0..12)));
        let (recovered, recovered_mem) = match recover(&plan, crashed, seed, crash_during).await {
            Ok(r) => r,
            Err(e) if may_be_corruption(&e) => {
                trace(format_args!("seed {seed}: the misstated metadata was reported: {e}"));
                return Ok(());
            }
            Err(e) => return Err(fail(generation, e)),
        };
        let report = recovered.stats().recovery;
        if closing.finished_before_crash && !tampered && crash_during.is_none() && report.scanned != 0 {
            return Err(fail(
                generation,
                format!("restart after a clean close scanned segments: {report:?}"),
            ));
        }
        match check_recovered(&recovered, &model, &at, &plan.opts).await {
            Ok(()) => {}
            Err(e) if may_be_corruption(&e) => {
                trace(format_args!("seed {seed}: the misstated metadata was reported: {e}"));
                close_guarded(recovered, &recovered_mem)
                    .await
                    .map_err(|e| fail(generation, e))?;
                return Ok(());
            }
            Err(e) => return Err(fail(generation, e)),
        }
        shard = recovered;
        mem = recovered_mem;
    }
    // The last recovered shard still takes appends.
    let p = [7u8; 100];
    let next = shard.next_lsn();
    let receipt = shard
        .append(
            9,
            &[RecordRef {
                payload: &p,
                timestamp: None,
            }],
            AckLevel::Durable,
        )
        .await
        .map_err(|e| fail(plan.generations, format!("append after recovery: {e}")))?;
    if receipt.first_lsn != next {
        return Err(fail(
            plan.generations,
            format!("append after recovery got {receipt:?}, expected lsn {next}"),
        ));
    }
    shard
        .close()
        .await
        .map_err(|e| fail(plan.generations, format!("close: {e}")))
}

fn run_seeds(seeds: impl Iterator<Item = u64> + Send + 'static) {
    install_seed_hook();
    run(move || async move {
        // With SHARDLOG_KEEP_GOING set, every seed runs and the failures are summed up at the
        // end (to survey a bug's reach); by default the first failure stops the run.
        let keep_going = std::env::var_os("SHARDLOG_KEEP_GOING").is_some();
        let mut ran = 0u64;
        let mut failures = Vec::new();
        for seed in seeds {
            CURRENT_SEED.store(seed, Ordering::SeqCst);
            ran += 1;
            // Any hang left unguarded inside becomes a failure of its seed.
            let outcome = futures_lite::future::or(power_loss_seed(seed), async {
                glommio::timer::sleep(SEED_GUARD).await;
                Err(format!("seed {seed} did not finish within {SEED_GUARD:?} (a hang)"))
            })
            .await;
            if let Err(e) = outcome {
                if !keep_going {
                    panic!("{e}");
                }
                eprintln!("power_loss: {e}");
                failures.push(seed);
            }
        }
        CURRENT_SEED.store(u64::MAX, Ordering::SeqCst);
        assert!(
            failures.is_empty(),
            "power_loss: {} of {ran} seeds failed: {failures:?}",
            failures.len()
        );
        println!("power_loss: {ran} seeds passed");
    });
}

#[test]
fn acked_records_survive_power_loss() {
    match env_u64("SHARDLOG_SEED") {
        Some(seed) => run_seeds(seed..seed + 1),
        None => run_seeds(0..SEEDS_DEFAULT),
    }
}

#[test]
#[ignore = "long: 10,000 seeds; run with --release -- --ignored"]
fn acked_records_survive_power_loss_10k_seeds() {
    let count = env_u64("SHARDLOG_SEEDS").unwrap_or(SEEDS_LONG);
    run_seeds(SEEDS_LONG_FIRST..SEEDS_LONG_FIRST + count);
}

// ---------------------------------------------------------------------------------------------
// I/O errors through the seam.

/// Outcome of one append of the fault tests.
struct Outcome {
    first: u64,
    ack: AckLevel,
    /// Issued after the shard was already poisoned.
    after_poison: bool,
    result: Option<Result<Lsn, String>>,
}

/// Runs appends from many tasks while `fault` fires at a random point, then checks that the shard
/// is poisoned, no append got a false acknowledgement, everything later fails `Poisoned`, and
/// that both a process restart and a power loss recover a contiguous, byte-identical prefix that
/// holds every acknowledged record. With `exact`, the recovered log must end exactly at the
/// durable lsn the poisoned shard reported (no write of a failed commit reached the device).
async fn fault_seed(seed: u64, durability: Durability, fault: FaultPoint, exact: bool) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mem = MemStorage::new();
    let opts = ShardOptions {
        segment_bytes: 32 << 10,
        commit_bytes_max: 8 << 10,
        durability,
        ..ShardOptions::default()
    };
    mem.set_io_yields(rng.gen_range(0..4), rng.gen_range(0..6));
    mem.set_sync_jitter(seed);
    let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts.clone())
        .await
        .map_err(|e| format!("open: {e}"))?;
    mem.inject(fault, libc::EIO, rng.gen_range(0..30), None);
    let model: Rc<RefCell<BTreeMap<u64, Vec<u8>>>> = Rc::default();
    let outcomes: Rc<RefCell<Vec<Outcome>>> = Rc::default();
    // The durable lsn when the shard was first seen poisoned; it must never move after that.
    let mut durable_at_poison = None;
    for i in 0..300u64 {
        if durable_at_poison.is_none() && shard.stats().poisoned.is_some() {
            durable_at_poison = Some(shard.durable_lsn().0);
        }
        let count = if rng.gen_bool(0.8) { 1 } else { rng.gen_range(2..20) };
        let payloads: Vec<Vec<u8>> = (0..count)
            .map(|_| {
                let len = rng.gen_range(1..300);
                (0..len).map(|_| rng.gen()).collect()
            })
            .collect();
        let refs: Vec<RecordRef<'_>> = payloads
            .iter()
            .map(|p| RecordRef {
                payload: p,
                timestamp: None,
            })
            .collect();
        let ack = [AckLevel::None, AckLevel::Written, AckLevel::Durable][rng.gen_range(0..3)];
        let first = shard.next_lsn().0;
        let after_poison = shard.stats().poisoned.is_some();
        let fut = shard.append(1, &refs, ack);
        for (k, p) in payloads.into_iter().enumerate() {
            model.borrow_mut().insert(first + k as u64, p);
        }
        let index = outcomes.borrow().len();
        outcomes.borrow_mut().push(Outcome {
            first,
            ack,
            after_poison,
            result: None,
        });
        let outcomes = outcomes.clone();
        glommio::spawn_local(async move {
            let r = fut.await.map(|r| r.last_lsn()).map_err(|e| e.to_string());
            outcomes.borrow_mut()[index].result = Some(r);
        })
        .detach();
        if i % 3 == 0 {
            yield_times(rng.gen_range(1..4)).await;
        }
        // Now and then wait for everything so far, so that the 300 appends take many commits
        // (group commit could otherwise fold them into fewer than the fault's skip count).
        if i % 10 == 9 {
            let _ = shard.wait_durable(Lsn(shard.next_lsn().0 - 1)).await;
        }
    }
    // Everything resolves: durable, or failed by the poison.
    for _ in 0..10_000 {
        if outcomes.borrow().iter().all(|o| o.result.is_some()) {
            break;
        }
        futures_lite::future::yield_now().await;
    }
    let poisoned_durable = shard.durable_lsn().0;
    if shard.stats().poisoned.is_none() {
        return Err(format!("{fault:?} EIO never fired or did not poison the shard"));
    }
    if let Some(d) = durable_at_poison {
        if d != poisoned_durable {
            return Err(format!("durable lsn moved after the poison: {d} -> {poisoned_durable}"));
        }
    }
    for o in outcomes.borrow().iter() {
        let Some(result) = &o.result else {
            return Err(format!("append at lsn {} never resolved", o.first));
        };
        match result {
            Ok(last) if o.after_poison => {
                return Err(format!(
                    "append at lsn {} issued after the poison succeeded ({last})",
                    o.first
                ))
            }
            Ok(last) if o.ack == AckLevel::Durable && last.0 > poisoned_durable => {
                return Err(format!(
                    "false ack: lsn {last} acknowledged durable, shard durable lsn {poisoned_durable}"
                ))
            }
            Ok(_) => {}
            Err(e) if o.ack != AckLevel::None && !e.contains("poisoned") => {
                return Err(format!("append at lsn {} failed with {e}, not Poisoned", o.first))
            }
            Err(_) => {}
        }
    }
    let p = [1u8; 10];
    let one = [RecordRef {
        payload: &p,
        timestamp: None,
    }];
    for ack in [AckLevel::None, AckLevel::Written, AckLevel::Durable] {
        match shard.append(1, &one, ack).await {
            Err(ShardError::Poisoned { .. }) => {}
            other => return Err(format!("append after the poison gave {other:?}")),
        }
    }
    match shard.wait_durable(Lsn(poisoned_durable + 1)).await {
        Err(ShardError::Poisoned { .. }) => {}
        other => return Err(format!("wait_durable past the end after the poison gave {other:?}")),
    }
    match shard.close().await {
        Err(ShardError::Poisoned { .. }) => {}
        other => return Err(format!("close of a poisoned shard gave {other:?}")),
    }
    mem.clear_faults();
    // A power loss right after, then a plain process restart on whatever the device kept.
    for (what, image) in [("power loss", mem.crash(rng.gen())), ("restart", mem.clone())] {
        let shard = Shard::open_with_storage(Rc::new(image), opts.clone())
            .await
            .map_err(|e| format!("{what}: recovery failed: {e}"))?;
        let durable = shard.durable_lsn().0;
        if durable < poisoned_durable {
            return Err(format!(
                "{what}: recovered lsn {durable}, acked durable {poisoned_durable}"
            ));
        }
        if exact && durable != poisoned_durable {
            return Err(format!(
                "{what}: recovered up to lsn {durable}, but only {poisoned_durable} was durable \
                 and the failed write never reached the device"
            ));
        }
        let records = read_all(&shard, Lsn(1)).await?;
        if records.len() as u64 != durable {
            return Err(format!("{what}: read {} records, durable lsn {durable}", records.len()));
        }
        {
            let m = model.borrow();
            for (i, r) in records.iter().enumerate() {
                if r.lsn.0 != i as u64 + 1 || m.get(&r.lsn.0) != Some(&r.payload) {
                    return Err(format!("{what}: lsn {} is not what was appended there", r.lsn));
                }
            }
        }
        let receipt = shard
            .append(1, &one, AckLevel::Durable)
            .await
            .map_err(|e| format!("{what}: append after recovery: {e}"))?;
        if receipt.first_lsn.0 != durable + 1 {
            return Err(format!("{what}: append after recovery got {receipt:?}"));
        }
        shard.close().await.map_err(|e| format!("{what}: close: {e}"))?;
    }
    Ok(())
}

fn run_fault_seeds(durability: Durability, fault: FaultPoint, exact: bool) {
    install_seed_hook();
    let seeds = match env_u64("SHARDLOG_SEED") {
        Some(seed) => seed..seed + 1,
        None => 0..40,
    };
    run(move || async move {
        for seed in seeds {
            CURRENT_SEED.store(seed, Ordering::SeqCst);
            if let Err(e) = fault_seed(seed, durability, fault, exact).await {
                panic!("seed {seed}, {durability} {fault:?}: {e}");
            }
        }
        CURRENT_SEED.store(u64::MAX, Ordering::SeqCst);
    });
}

#[test]
fn eio_on_fdatasync_poisons_and_restart_recovers_the_durable_prefix() {
    run_fault_seeds(Durability::Linked, FaultPoint::CommitSync, false);
}

#[test]
fn eio_on_linked_commit_write_poisons_and_restart_recovers_the_durable_prefix() {
    run_fault_seeds(Durability::Linked, FaultPoint::CommitWrite, false);
}

#[test]
fn eio_on_dsync_write_poisons_and_restart_recovers_exactly_the_durable_prefix() {
    run_fault_seeds(Durability::Dsync, FaultPoint::CommitWrite, true);
}

/// A commit that ends inside a block leaves that block to be written again by the next commit,
/// with the same bytes in front of the new ones. Here three small commits are durable and
/// acknowledged inside the first data block, and the next commit's write covers that block but
/// its fdatasync fails, so the power goes with the block's rewrite not durable. The acknowledged
/// records must survive whatever the crash makes of the rewritten sectors. This pins the device
/// model the engine relies on (sector writes are atomic: an interrupted overwrite leaves the old
/// or the new bytes, never zeros); under a model where an overwritten sector can come back zero,
/// it fails (11 of 32 crash seeds lost lsns 1..=3 before the double adopted sector atomicity).
#[test]
fn unsynced_tail_block_rewrite_never_loses_acked_records() {
    run(|| async {
        let mut lost = Vec::new();
        for crash_seed in 0..32u64 {
            let mem = MemStorage::new();
            let opts = ShardOptions {
                segment_bytes: 64 << 10,
                commit_bytes_max: 4 << 10,
                durability: Durability::Linked,
                ..ShardOptions::default()
            };
            let shard = Shard::open_with_storage(Rc::new(mem.clone()), opts.clone())
                .await
                .expect("open");
            let p = [0xabu8; 100];
            let one = [RecordRef {
                payload: &p,
                timestamp: None,
            }];
            for _ in 0..3 {
                shard.append(1, &one, AckLevel::Durable).await.expect("durable append");
            }
            mem.inject(FaultPoint::CommitSync, libc::EIO, 0, None);
            let failed = shard.append(1, &one, AckLevel::Durable).await;
            assert!(matches!(failed, Err(ShardError::Poisoned { .. })), "{failed:?}");
            let _ = shard.close().await;
            let crashed = mem.crash(crash_seed);
            let recovered = Shard::open_with_storage(Rc::new(crashed), opts)
                .await
                .expect("recovery succeeds");
            if recovered.durable_lsn() < Lsn(3) {
                lost.push((crash_seed, recovered.durable_lsn()));
            }
            recovered.close().await.expect("close");
        }
        assert!(
            lost.is_empty(),
            "acknowledged lsns 1..=3 lost after a power loss during the next commit \
             (crash seed, recovered durable lsn): {lost:?}"
        );
    });
}
