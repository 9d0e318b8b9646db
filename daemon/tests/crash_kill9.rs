//! kill -9 against the real daemon: every record acknowledged `Durable` before the kill is there
//! after the restart, byte-identical and in per-stream order, and every restart succeeds.
//!
//! This is the short version (4 cycles) of `scripts/crash-loop.sh`, which runs 100 or more and
//! varies the kill moment over rotation, retention and recovery.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{data_dir, Daemon, DaemonOpts};
use proto::client::{Client, ReadParams};
use proto::codec::AppendRecord;
use proto::wire::{AckLevel, ErrorCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Cycles of run, kill -9, restart, verify.
const CYCLES: u64 = 4;
const WRITERS: u64 = 6;
/// Tiny segments, so that the kill often lands near a rotation.
const SEGMENT_BYTES: u64 = 64 << 10;
const SHARDS: u16 = 3;

/// One acknowledged append.
#[derive(Debug, Clone)]
struct Acked {
    writer: u64,
    stream: u64,
    shard: u16,
    first_lsn: u64,
    payloads: Vec<Vec<u8>>,
}

fn opts(retention_bytes: Option<u64>) -> DaemonOpts {
    let mut o = DaemonOpts {
        args: vec![
            "--pin".into(),
            "none".into(),
            "--shards".into(),
            SHARDS.to_string(),
            "--segment-bytes".into(),
            SEGMENT_BYTES.to_string(),
        ],
        envs: Vec::new(),
    };
    if let Some(bytes) = retention_bytes {
        o = o.arg("--retention-bytes").arg(&bytes.to_string());
    }
    o
}

/// Appends until the connection fails (the daemon was killed). Each writer owns its streams, and
/// sends one request at a time, so its acknowledged appends to one stream must get rising lsns.
fn writer(addr: std::net::SocketAddr, writer: u64, seed: u64, acked: Arc<Mutex<Vec<Acked>>>, stop: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(mut client) = Client::connect(addr) else {
        return;
    };
    if client.set_read_timeout(Some(Duration::from_secs(60))).is_err() {
        return;
    }
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let stream = writer * 1000 + rng.gen_range(0..8);
        let count = if rng.gen_bool(0.7) { 1 } else { 64 };
        let max_len = if count == 1 { 4096 } else { 512 };
        let payloads: Vec<Vec<u8>> = (0..count)
            .map(|_| {
                seq += 1;
                let len = rng.gen_range(16..max_len);
                let mut p = format!("w{writer}-s{seq}-").into_bytes();
                p.extend((p.len()..len).map(|_| rng.gen::<u8>()));
                p
            })
            .collect();
        let records: Vec<AppendRecord<'_>> = payloads.iter().map(|p| AppendRecord::new(p)).collect();
        match client.append_batch(stream, &records, AckLevel::Durable) {
            Ok(Some(a)) => {
                assert_eq!(a.count as usize, count, "ack covers the whole frame");
                acked.lock().expect("acked lock").push(Acked {
                    writer,
                    stream,
                    shard: a.shard,
                    first_lsn: a.first_lsn,
                    payloads,
                });
            }
            Ok(None) => unreachable!("Durable appends are answered"),
            // The daemon was killed: this append's outcome is unknown, which is allowed.
            Err(_) => return,
        }
    }
}

/// Reads every record of every shard: (shard, lsn) -> (stream, payload).
/// The first lsn `shard` still retains: reads below it fail `Truncated`, so bisect on that. The
/// `Truncated` error names it too; the two must agree, since a reader that trusts too high a
/// first lsn would take lost records for retired ones. Retention may still be retiring segments
/// meanwhile (a restarted daemon catches up on it in the background once it serves), so the
/// first lsn only rises while this runs: what reads find lies between what `Truncated` named
/// before the bisection and after it, and equals both when nothing was retired in between.
fn first_retained(client: &mut Client, shard: u16) -> u64 {
    let truncated = |client: &mut Client, lsn: u64| match client.read(ReadParams::new(shard, lsn)) {
        Ok(_) => None,
        Err(e) if e.server_code() == Some(ErrorCode::Truncated) => {
            Some(e.first_available_lsn().expect("Truncated names the first retained lsn"))
        }
        Err(e) => panic!("read of shard {shard} from {lsn}: {e}"),
    };
    let Some(reported) = truncated(client, 1) else {
        return 1;
    };
    // Invariant: lo is truncated, hi is not (past the end reads return nothing, not Truncated).
    let (mut lo, mut hi) = (1u64, 1u64 << 40);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if truncated(client, mid).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let after = truncated(client, 1).unwrap_or(1);
    assert!(
        reported <= hi && hi <= after,
        "shard {shard}: Truncated reports first lsns {reported} (before) and {after} (after), reads find {hi}"
    );
    hi
}

/// (shard, lsn) -> (stream, payload).
type Stored = BTreeMap<(u16, u64), (u64, Vec<u8>)>;

/// Every retained record of every shard: (shard, lsn) -> (stream, payload), and the first
/// retained lsn of each shard.
fn read_everything(d: &Daemon) -> (Stored, Vec<u64>) {
    let mut client = d.client();
    let mut out = BTreeMap::new();
    let mut firsts = Vec::new();
    for shard in 0..SHARDS {
        let mut from = first_retained(&mut client, shard);
        firsts.push(from);
        loop {
            let batch = match client.read(ReadParams::new(shard, from)) {
                Ok(batch) => batch,
                // Retention retired the segment being read (see `first_retained`): what it took
                // counts as retired, and reading goes on from the new first lsn.
                Err(e) if e.server_code() == Some(ErrorCode::Truncated) => {
                    let first = e.first_available_lsn().expect("Truncated names the first retained lsn");
                    assert!(first > from, "shard {shard}: Truncated at {from} names {first}");
                    from = first;
                    firsts[shard as usize] = first;
                    continue;
                }
                Err(e) => panic!("read of shard {shard} from {from} after restart: {e}"),
            };
            let records = batch.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            for r in records {
                assert!(r.lsn >= from, "shard {shard}: lsns rise");
                from = r.lsn + 1;
                out.insert((shard, r.lsn), (r.stream, r.payload.unwrap_or_default()));
            }
            from = from.max(batch.next_lsn);
        }
    }
    (out, firsts)
}

/// Checks every acknowledged record that is still retained; returns how many were checked and
/// how many retention had deleted.
fn verify(d: &Daemon, acked: &[Acked], cycle: u64) -> (usize, usize) {
    let (stored, firsts) = read_everything(d);
    let mut missing = Vec::new();
    let mut checked = 0;
    let mut retired = 0;
    for a in acked {
        for (i, p) in a.payloads.iter().enumerate() {
            let lsn = a.first_lsn + i as u64;
            // Retention deleted it: allowed, and only ever a prefix of the shard.
            if lsn < firsts[a.shard as usize] {
                retired += 1;
                continue;
            }
            checked += 1;
            match stored.get(&(a.shard, lsn)) {
                Some((stream, payload)) if *stream == a.stream && payload == p => {}
                Some((stream, payload)) => missing.push(format!(
                    "shard {} lsn {lsn}: acked stream {} {} bytes, found stream {stream} {} bytes",
                    a.shard,
                    a.stream,
                    p.len(),
                    payload.len()
                )),
                None => missing.push(format!("shard {} lsn {lsn}: acked, not found", a.shard)),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cycle {cycle}: {} acknowledged records lost or changed, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Per-stream order: a writer's acked appends to one stream got rising lsns.
    let mut last: HashMap<(u64, u64), (u16, u64)> = HashMap::new();
    for a in acked {
        if let Some(&(shard, lsn)) = last.get(&(a.writer, a.stream)) {
            assert_eq!(shard, a.shard, "a stream stays on one shard");
            assert!(
                a.first_lsn > lsn,
                "cycle {cycle}: stream {} out of order: {lsn} then {}",
                a.stream,
                a.first_lsn
            );
        }
        last.insert(
            (a.writer, a.stream),
            (a.shard, a.first_lsn + a.payloads.len() as u64 - 1),
        );
    }
    (checked, retired)
}

#[test]
fn acked_records_survive_kill_9() {
    run_cycles("acked_records_survive_kill_9", None);
}

/// The same with retention deleting and recycling segments all the time (512 KiB per shard, 8
/// segments), so kills land during retention too. Records retention removed are not checked;
/// everything acknowledged from the first retained lsn on is.
#[test]
fn acked_records_survive_kill_9_during_retention() {
    run_cycles("acked_records_survive_kill_9_during_retention", Some(8 * SEGMENT_BYTES));
}

fn run_cycles(name: &str, retention_bytes: Option<u64>) {
    let opts = || opts(retention_bytes);
    let dir = data_dir();
    let seed: u64 = std::env::var("SHARDLOG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("{name}: seed {seed} (replay with SHARDLOG_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut retired_total = 0;
    for cycle in 0..CYCLES {
        // New segment files are zero-filled or preallocated, in turn: kills land on both.
        let prep = ["auto", "zero-fill", "preallocate"][cycle as usize % 3];
        let opts = || opts().arg("--segment-prep").arg(prep);
        let d = Daemon::start(dir.path(), &opts());
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (acked, stop, addr) = (acked.clone(), stop.clone(), d.addr);
                let s = rng.gen();
                std::thread::spawn(move || writer(addr, w, s, acked, stop))
            })
            .collect();
        // Wait for some acks (not a duration: the machine may be slow), then a random extra.
        // With retention, the last cycle also waits until twice the shards' retention has been
        // acknowledged over the run, so that retention must have deleted something.
        let before = acked.lock().expect("acked lock").len();
        let bytes_needed = match retention_bytes {
            Some(r) if cycle == CYCLES - 1 => 2 * r * u64::from(SHARDS),
            _ => 0,
        };
        let waiting = || {
            let acked = acked.lock().expect("acked lock");
            let bytes: u64 = acked.iter().flat_map(|a| &a.payloads).map(|p| p.len() as u64).sum();
            acked.len() < before + 20 || bytes < bytes_needed
        };
        while waiting() {
            assert!(
                threads.iter().any(|t| !t.is_finished()),
                "cycle {cycle}: every writer stopped before 20 acks (and {bytes_needed} bytes):\n{}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..600)));
        d.kill();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("writer thread");
        }
        // Every other cycle, kill the restarting daemon again within a few ms, while it is
        // still recovering.
        if cycle % 2 == 1 {
            let mut child = std::process::Command::new(common::BIN)
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path())
                .args(&opts().args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn shardlogd");
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
            let _ = child.kill();
            let _ = child.wait();
        }
        let d = Daemon::start(dir.path(), &opts());
        let snapshot = acked.lock().expect("acked lock").clone();
        let (checked, retired) = verify(&d, &snapshot, cycle);
        println!("cycle {cycle}: {checked} acknowledged records verified, {retired} deleted by retention");
        assert!(
            checked > 0,
            "cycle {cycle}: some acknowledged records are still retained"
        );
        retired_total += retired;
        d.kill();
    }
    if retention_bytes.is_some() {
        assert!(
            retired_total > 0,
            "retention deleted something, so kills could land during it"
        );
    } else {
        assert_eq!(retired_total, 0, "nothing is deleted without retention");
    }
}
