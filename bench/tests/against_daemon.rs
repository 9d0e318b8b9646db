//! The generator against a real shardlogd: closed and open loop, `--ack none`,
//! the JSON report, and `verify` finding every acknowledged record.
//!
//! The daemon binary belongs to another package, so Cargo gives no
//! `CARGO_BIN_EXE_` for it. It is looked for next to this test's profile
//! directory (where `cargo test --workspace` has built it); if it is not
//! there, it is built once into a separate target directory, which cannot
//! contend for the lock the running `cargo test` holds.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bench::report::Report;

const BENCH: &str = env!("CARGO_BIN_EXE_shardlog-bench");

fn shardlogd() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("SHARDLOGD") {
            return PathBuf::from(p);
        }
        // .../target/<profile>/deps/<this test> -> .../target/<profile>/shardlogd
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
        let beside = profile_dir.join("shardlogd");
        if beside.exists() {
            return beside;
        }
        let target = profile_dir.parent().expect("target dir").join("bench-test-daemon");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "daemon", "--bin", "shardlogd", "--target-dir"])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p daemon");
        assert!(status.success(), "cargo build -p daemon failed");
        target.join("debug").join("shardlogd")
    })
}

/// A daemon on a fresh data directory under the target dir (ext4, O_DIRECT works), killed on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl Daemon {
    fn start(data_dir: &Path, shards: u16) -> Daemon {
        let mut child = Command::new(shardlogd())
            .args(["--listen", "127.0.0.1:0", "--pin", "none", "--log", "warn", "--shards"])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn shardlogd");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the daemon's first line");
        let addr = line
            .trim()
            .strip_prefix("shardlogd listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from shardlogd: {line:?}"))
            .parse()
            .expect("address");
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

fn bench(args: &[&str]) -> Output {
    Command::new(BENCH).args(args).output().expect("run shardlog-bench")
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
    let out = bench(&[
        "--addr",
        &addr,
        "--threads",
        "2",
        "-c",
        "4",
        "-P",
        "4",
        "-B",
        "3",
        "-S",
        "100..300",
        "-K",
        "16",
        "--duration",
        "2s",
        "--json",
        s(&json),
        "--hgrm",
        s(&hgrm),
        "--verify-log",
        s(&log),
        "-q",
    ]);
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
    let out = bench(&[
        "--addr",
        &addr,
        "-c",
        "4",
        "-P",
        "8",
        "--rate",
        "1000",
        "--duration",
        "2s",
        "--warmup",
        "500ms",
        "--stream-dist",
        "zipf",
        "-K",
        "100",
        "--json",
        s(&json),
        "--verify-log",
        s(&log),
        "-q",
    ]);
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
    let json = dir.path().join("report.json");
    let out = bench(&[
        "--addr",
        &daemon.addr.to_string(),
        "-c",
        "2",
        "--ack",
        "none",
        "-B",
        "8",
        "--duration",
        "2s",
        "--json",
        s(&json),
        "-q",
    ]);
    assert_success(&out, "ack=none run");
    let report = read_report(&json);
    assert!(report.records > 0);
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
    let mut gen = Command::new(BENCH)
        .args([
            "--addr",
            &daemon.addr.to_string(),
            "-c",
            "4",
            "-P",
            "4",
            "--duration",
            "5m",
            "-q",
        ])
        .args(["--json", s(&json), "--verify-log", s(&log)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardlog-bench");
    // Wait until acks are flowing, then SIGKILL the daemon.
    loop {
        let lines = std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
        if lines > 200 {
            break;
        }
        assert!(
            gen.try_wait().expect("try_wait").is_none(),
            "the generator exited before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill();
    let out = gen.wait_with_output().expect("generator exits on its own");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("stopped early"), "stderr: {stderr}");
    let report = read_report(&json);
    assert_eq!(report.connections_lost, 4);
    assert!(report.stopped_early.is_some());

    let daemon = Daemon::start(&daemon.data_dir, 2);
    let out = bench(&[
        "verify",
        "--verify-log",
        s(&log),
        "--addr",
        &daemon.addr.to_string(),
        "--json",
        s(&vjson),
    ]);
    assert_success(&out, "verify after restart");
    let v = read_verify(&vjson);
    assert!(v["acked"].as_u64().expect("acked") > 200);
    assert_eq!(v["acked_found"], v["acked"]);
}
