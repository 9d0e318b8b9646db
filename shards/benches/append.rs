//! Durable append throughput and latency on one shard at 1, 16 and 256 concurrent appenders, in
//! both durability modes, with small segments so the background task is always preparing the
//! next one. The baseline, measured in the same run, is a bare 4 KiB O_DSYNC write loop through
//! glommio on a pre-zeroed file: the device floor for one commit at a time.
//!
//! `cargo bench -p shards` (set `SHARDS_BENCH_DIR` to choose the directory; default under the
//! target dir; `SHARDS_BENCH_APPENDS` for the appends per run, default 4000).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::{DmaFile, OpenOptions};
use hdrhistogram::Histogram;
use shards::{AckLevel, Durability, RecordRef, Shard, ShardOptions};

const PAYLOAD_BYTES: usize = 100;
/// Small segments: a rotation every ~2,000 small appends keeps the background task busy.
const SEGMENT_BYTES: u64 = 1 << 20;

fn bench_dir() -> PathBuf {
    std::env::var_os("SHARDS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/shards-bench"))
}

struct Result {
    label: String,
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    records_per_commit: f64,
    fsync_p50_us: u64,
}

async fn baseline(dir: &std::path::Path, n: usize) -> Result {
    // Opened first on this executor with data at offset 0, as the shard's sentinel would be.
    let path = dir.join("baseline.dat");
    let size = 8u64 << 20;
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(&path)
            .await
            .expect("create baseline file");
        let mut off = 0;
        while off < size {
            let mut b = f.alloc_dma_buffer(1 << 20);
            b.as_bytes_mut().fill(1);
            f.write_at(b, off).await.expect("zero-fill");
            off += 1 << 20;
        }
        f.fdatasync().await.expect("sync");
        f.close().await.expect("close");
    }
    let f: DmaFile = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .dma_open(&path)
        .await
        .expect("open dsync");
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    let start = Instant::now();
    for i in 0..n {
        let b = f.alloc_dma_buffer(4096);
        let t = Instant::now();
        f.write_at(b, (i as u64 * 4096) % size).await.expect("write");
        let _ = h.record(t.elapsed().as_micros() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    f.close().await.expect("close");
    Result {
        label: "baseline: 4 KiB O_DSYNC write, c=1".into(),
        per_sec: n as f64 / secs,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        records_per_commit: 1.0,
        fsync_p50_us: h.value_at_quantile(0.5),
    }
}

async fn run_shard(dir: PathBuf, durability: Durability, concurrency: usize, n: usize) -> Result {
    let _ = std::fs::remove_dir_all(&dir);
    let opts = ShardOptions {
        segment_bytes: SEGMENT_BYTES,
        commit_bytes_max: 256 << 10,
        retention_bytes: Some(8 * SEGMENT_BYTES),
        durability,
        ..ShardOptions::default()
    };
    let shard = Shard::open(&dir, opts).await.expect("open shard");
    // Warm up: the first segment is prepared.
    let p = vec![7u8; PAYLOAD_BYTES];
    let one = [RecordRef {
        payload: &p,
        timestamp: None,
    }];
    shard.append(0, &one, AckLevel::Durable).await.expect("warm-up append");
    let commits_before = shard.stats().commits;
    let lat = Rc::new(RefCell::new(Histogram::<u64>::new(3).expect("histogram")));
    let per_task = n / concurrency;
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let shard = shard.clone();
            let lat = lat.clone();
            glommio::spawn_local(async move {
                let p = vec![t as u8; PAYLOAD_BYTES];
                for _ in 0..per_task {
                    let one = [RecordRef {
                        payload: &p,
                        timestamp: None,
                    }];
                    let s = Instant::now();
                    shard.append(t as u64, &one, AckLevel::Durable).await.expect("append");
                    let _ = lat.borrow_mut().record(s.elapsed().as_micros() as u64);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = shard.stats();
    shard.close().await.expect("close");
    let h = lat.borrow();
    let commits = (stats.commits - commits_before).max(1);
    Result {
        label: format!("shard {durability}, c={concurrency}"),
        per_sec: (per_task * concurrency) as f64 / secs,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        records_per_commit: (per_task * concurrency) as f64 / commits as f64,
        fsync_p50_us: stats.fsync_latency_us.value_at_quantile(0.5),
    }
}

fn main() {
    // `cargo test --benches` runs this with no work to do.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("SHARDS_BENCH_APPENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).expect("bench dir");
    let results = shards::executor::spawn(
        shards::executor::ExecutorOptions::new("bench-append"),
        move || async move {
            let mut results = Vec::new();
            // The shard's sentinel must be the first DmaFile of the executor.
            let first = run_shard(dir.join("shard-warm"), Durability::Dsync, 1, 200).await;
            drop(first);
            results.push(baseline(&dir, n).await);
            for durability in [Durability::Dsync, Durability::Linked] {
                for c in [1usize, 16, 256] {
                    let d = dir.join(format!("shard-{durability}-{c}"));
                    results.push(run_shard(d, durability, c, n.max(c)).await);
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
            results
        },
    )
    .expect("spawn executor")
    .join()
    .expect("bench ran");
    let base = results[0].per_sec;
    println!(
        "{:<36} {:>10} {:>8} {:>8} {:>9} {:>10} {:>8}",
        "run", "appends/s", "p50 us", "p99 us", "rec/commit", "commit p50", "x base"
    );
    for r in &results {
        println!(
            "{:<36} {:>10.0} {:>8} {:>8} {:>9.1} {:>10} {:>8.2}",
            r.label,
            r.per_sec,
            r.p50_us,
            r.p99_us,
            r.records_per_commit,
            r.fsync_p50_us,
            r.per_sec / base
        );
    }
}
