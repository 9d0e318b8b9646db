//! The generator against a real shardlogd: closed and open loop, `--ack none`,
//! the JSON report, and `verify` finding every acknowledged record (or
//! counting it as retired once retention deleted it).
//!
//! The daemon binary belongs to another package, so Cargo gives no
//! `CARGO_BIN_EXE_` for it. It is looked for next to this test's profile
//! directory (where `cargo test --workspace` has built it); if it is not
//! there, it is built once into a separate target directory, which cannot
//! contend for the lock the running `cargo test` holds.

#[path = "../../daemon/tests/support/locate_daemon.rs"]
mod locate_daemon;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bench::report::Report;
use locate_daemon::shardlogd;

const BENCH: &str = env!("CARGO_BIN_EXE_shardlog-bench");

/// A daemon on a fresh data directory under the target dir (ext4, O_DIRECT works), killed on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl Daemon {
    fn start(data_dir: &Path, shards: u16) -> Daemon {
        Daemon::start_with(data_dir, shards, &[])
    }

    /// `start` with more daemon options (segment size, retention).
    fn start_with(data_dir: &Path, shards: u16, options: &[&str]) -> Daemon {
        let mut child = Command::new(shardlogd())
            .args(["--listen", "127.0.0.1:0", "--pin", "none", "--log", "warn", "--shards"])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn shardlogd");
        let stdout = child.stdout.take().expect("piped stdout");
        // Read the address line on a thread, so a daemon that never prints it fails the test
        // instead of hanging it; the daemon is killed on every failure path.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let res = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
        });
        let line = match rx.recv_timeout(RUN_LIMIT) {
            Ok(Ok(line)) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("shardlogd did not print its address: {other:?}");
            }
        };
        let addr = match line.trim().strip_prefix("shardlogd listening on ").map(str::parse) {
            Some(Ok(addr)) => addr,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("unexpected first line from shardlogd: {line:?}");
            }
        };
        Daemon {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A guard against hangs, not a performance bound: every run here is a few seconds.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Waits for `child`, killing it (and failing) if it outlives `RUN_LIMIT`.
fn wait_limited(mut child: Child, what: &str) -> Output {
    let started = std::time::Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "{what} still running after {RUN_LIMIT:?}; killed\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collect output")
}

fn bench(args: &[&str]) -> Output {
    let child = Command::new(BENCH)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardlog-bench");
    wait_limited(child, &format!("shardlog-bench {}", args.join(" ")))
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_report(path: &Path) -> Report {
    let text = std::fs::read_to_string(path).expect("read report");
    serde_json::from_str(&text).expect("report is well-formed JSON")
}

fn read_verify(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read verify outcome");
    serde_json::from_str(&text).expect("verify outcome is JSON")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Splits a fixed option string; paths and addresses are passed separately.
fn words(options: &str) -> Vec<&str> {
    options.split_whitespace().collect()
}

#[test]
fn closed_loop_acks_are_all_found_by_verify() {
    let dir = tempdir();
    let daemon = Daemon::start(&dir.path().join("data"), 2);
    let addr = daemon.addr.to_string();
    let (json, log, hgrm, vjson) = (
        dir.path().join("report.json"),
        dir.path().join("acks.log"),
        dir.path().join("latency.hgrm"),
        dir.path().join("verify.json"),
    );
    let mut args = words("--threads 2 -c 4 -P 4 -B 3 -S 100..300 -K 16 --duration 2s -q");
    args.extend([
        "--addr",
        &addr,
        "--json",
        s(&json),
        "--hgrm",
        s(&hgrm),
        "--verify-log",
        s(&log),
    ]);
    let out = bench(&args);
    assert_success(&out, "closed-loop run");
    let report = read_report(&json);
    assert_eq!(report.config.mode, "closed");
    assert_eq!(report.shard_count, Some(2));
    assert!(report.requests > 0, "no request completed");
    assert_eq!(report.records, report.requests * 3, "every request carries 3 records");
    assert!(report.bytes >= report.records * 100 && report.bytes <= report.records * 300);
    assert_eq!(report.errors_total, 0, "errors: {:?}", report.errors);
    let latency = report.latency_us.expect("acked runs report latency");
    assert_eq!(latency.count, report.requests);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    assert!(std::fs::read_to_string(&hgrm).expect("hgrm").contains("Total count"));

    let out = bench(&["verify", "--verify-log", s(&log), "--addr", &addr, "--json", s(&vjson)]);
    assert_success(&out, "verify");
    let v = read_verify(&vjson);
    // Without a warm-up every acked record is counted in the report.
    assert_eq!(v["acked"].as_u64(), Some(report.records));
    assert_eq!(v["acked_found"].as_u64(), Some(report.records));
    assert_eq!(v["problems"].as_object().map(|m| m.len()), Some(0));
    drop(daemon);
}

#[test]
fn open_loop_keeps_to_its_schedule_and_verifies() {
    let dir = tempdir();
    let daemon = Daemon::start(&dir.path().join("data"), 2);
    let addr = daemon.addr.to_string();
    let (json, log, vjson) = (
        dir.path().join("report.json"),
        dir.path().join("acks.log"),
        dir.path().join("verify.json"),
    );
    let rate = 1000u64;
    let mut args = words("-c 4 -P 8 --rate 1000 --duration 2s --warmup 500ms --stream-dist zipf -K 100 -q");
    args.extend(["--addr", &addr, "--json", s(&json), "--verify-log", s(&log)]);
    let out = bench(&args);
    assert_success(&out, "open-loop run");
    let report = read_report(&json);
    assert_eq!(report.config.mode, "open");
    assert_eq!(report.config.rate, Some(1000.0));
    assert!(report.requests > 0);
    // Slots are only taken before the deadline: at most rate x (warm-up + duration) in all,
    // of which the measured ones are those intended after the warm-up.
    assert!(
        report.requests <= rate * 2 + 4,
        "{} requests at {rate}/s for 2 s",
        report.requests
    );
    assert_eq!(report.errors_total, 0, "errors: {:?}", report.errors);
    assert!(report.latency_us.is_some());

    let out = bench(&["verify", "--verify-log", s(&log), "--addr", &addr, "--json", s(&vjson)]);
    assert_success(&out, "verify");
    let v = read_verify(&vjson);
    let acked = v["acked"].as_u64().expect("acked");
    // The log also holds the warm-up's acks.
    assert!(acked >= report.records, "log {acked} < measured {}", report.records);
    assert_eq!(v["acked_found"].as_u64(), Some(acked));
    drop(daemon);
}

#[test]
fn unacked_run_reports_the_drained_rate() {
    let dir = tempdir();
    let daemon = Daemon::start(&dir.path().join("data"), 2);
    let addr = daemon.addr.to_string();
    let json = dir.path().join("report.json");
    // Paced, so that even an unoptimised daemon drains within the response timeout.
    let mut args = words("-c 2 --ack none -B 8 --rate 400 --duration 2s -q");
    args.extend(["--addr", &addr, "--json", s(&json)]);
    let out = bench(&args);
    assert_success(&out, "ack=none run");
    let report = read_report(&json);
    assert!(report.records > 0);
    assert_eq!(report.records, report.requests * 8);
    assert_eq!(report.latency_us, None, "no latency without acks");
    let drain = report.drain.expect("drain measured");
    assert!(drain.elapsed_s >= report.elapsed_s);
    assert!(drain.records_per_s <= report.records_per_s);
    assert_eq!(report.errors_total, 0, "errors: {:?}", report.errors);
    drop(daemon);
}

#[test]
fn daemon_killed_mid_run_stops_the_generator_and_acks_survive_restart() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut daemon = Daemon::start(&data, 2);
    let (json, log, vjson) = (
        dir.path().join("report.json"),
        dir.path().join("acks.log"),
        dir.path().join("verify.json"),
    );
    let gen = Command::new(BENCH)
        .args(words("-c 4 -P 4 --duration 5m -q"))
        .args([
            "--addr",
            &daemon.addr.to_string(),
            "--json",
            s(&json),
            "--verify-log",
            s(&log),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardlog-bench");
    let mut gen = KillOnDrop(Some(gen));
    // Wait until acks are flowing, then SIGKILL the daemon.
    let started = std::time::Instant::now();
    loop {
        assert!(started.elapsed() < RUN_LIMIT, "no acks after {RUN_LIMIT:?}");
        // Acknowledged records, not the log's header line.
        let acks = std::fs::read_to_string(&log)
            .map(|t| t.lines().filter(|l| !l.starts_with('#')).count())
            .unwrap_or(0);
        if acks > 200 {
            break;
        }
        let child = gen.0.as_mut().expect("child");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the generator exited before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill();
    let out = wait_limited(
        gen.0.take().expect("child"),
        "the generator after the daemon was killed",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("stopped early"), "stderr: {stderr}");
    let report = read_report(&json);
    assert_eq!(report.connections_lost, 4);
    assert!(report.stopped_early.is_some());

    let daemon = Daemon::start(&daemon.data_dir, 2);
    let addr = daemon.addr.to_string();
    // Recovery scans the segments before the shards answer; an unoptimised build on a loaded
    // machine can take tens of seconds, so allow for it (a hang guard, not a performance bound).
    let mut args = words("verify --timeout 100s");
    args.extend(["--verify-log", s(&log), "--addr", &addr, "--json", s(&vjson)]);
    let out = bench(&args);
    assert_success(&out, "verify after restart");
    let v = read_verify(&vjson);
    assert!(v["acked"].as_u64().expect("acked") > 200);
    assert_eq!(v["acked_found"], v["acked"]);
}

#[test]
fn verify_counts_records_deleted_by_retention_as_retired_and_checks_the_rest() {
    let dir = tempdir();
    // 64 KiB segments, 256 KiB retained per shard; the run below writes about 1.5 MiB per shard.
    let daemon = Daemon::start_with(
        &dir.path().join("data"),
        2,
        &words("--segment-bytes 65536 --retention-bytes 262144"),
    );
    let addr = daemon.addr.to_string();
    let (log, vjson) = (dir.path().join("acks.log"), dir.path().join("verify.json"));
    let mut args = words("-c 4 -P 4 -B 8 -S 256..1024 -K 32 --requests 600 --duration 2m -q");
    args.extend(["--addr", &addr, "--verify-log", s(&log)]);
    assert_success(&bench(&args), "run past retention");

    let out = bench(&["verify", "--verify-log", s(&log), "--addr", &addr, "--json", s(&vjson)]);
    assert_success(&out, "verify after retention");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("retired by retention"),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = read_verify(&vjson);
    let acked = v["acked"].as_u64().expect("acked");
    let found = v["acked_found"].as_u64().expect("acked_found");
    let retired = v["retired_by_retention"].as_u64().expect("retired_by_retention");
    assert_eq!(acked, 600 * 8);
    assert!(retired > 0, "retention deleted no acknowledged record: {v}");
    assert!(found > 0, "nothing left to check: {v}");
    assert_eq!(found + retired, acked, "{v}");
    assert_eq!(v["problems"].as_object().map(|m| m.len()), Some(0), "{v}");

    // The same check must still fail on a record that is really gone or differs: flip the
    // crc32c of the newest record of shard 0 (retention never reaches it) and add an ack for
    // an lsn past the end of shard 1.
    let text = std::fs::read_to_string(&log).expect("read verify log");
    let fields = |line: &str| -> Vec<u64> {
        let f: Vec<&str> = line.split_whitespace().collect();
        vec![
            f[1].parse().expect("shard"),
            f[2].parse().expect("lsn"),
            u64::from_str_radix(f[3], 16).expect("crc"),
        ]
    };
    let records: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let newest = records
        .iter()
        .filter(|l| fields(l)[0] == 0)
        .max_by_key(|l| fields(l)[1])
        .expect("shard 0 has records");
    let shard1_end = records
        .iter()
        .filter(|l| fields(l)[0] == 1)
        .map(|l| fields(l)[1])
        .max()
        .expect("shard 1 has records");
    let f: Vec<&str> = newest.split_whitespace().collect();
    let flipped = format!("{} {} {} {:08x} {}", f[0], f[1], f[2], fields(newest)[2] ^ 1, f[4]);
    let tampered = text.replacen(newest, &flipped, 1) + &format!("7 1 {} 00000000 100\n", shard1_end + 1000);
    let bad_log = dir.path().join("tampered.log");
    std::fs::write(&bad_log, tampered).expect("write tampered log");
    let bad_json = dir.path().join("tampered.json");
    let out = bench(&[
        "verify",
        "--verify-log",
        s(&bad_log),
        "--addr",
        &addr,
        "--json",
        s(&bad_json),
    ]);
    assert_eq!(out.status.code(), Some(1), "verify must fail on a tampered log");
    let v = read_verify(&bad_json);
    assert_eq!(v["problems"]["corrupted"].as_u64(), Some(1), "{v}");
    assert_eq!(v["problems"]["missing"].as_u64(), Some(1), "{v}");
    assert_eq!(v["retired_by_retention"].as_u64(), Some(retired), "{v}");
    drop(daemon);
}

/// Kills a child process still running when a test fails.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
