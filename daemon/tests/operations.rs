//! Running shardlogd as a service: Prometheus metrics over real HTTP, systemd readiness, the host
//! check command, and machine-readable logs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{data_dir, Daemon, DaemonOpts, BIN};
use proto::codec::AppendRecord;
use proto::wire::AckLevel;

/// GET `path` over plain HTTP/1.0; returns (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

fn sample_sum(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_are_served_over_http_in_the_prometheus_format() {
    let dir = data_dir();
    let d = Daemon::start(
        dir.path(),
        &DaemonOpts::shards(2).arg("--metrics-listen").arg("127.0.0.1:0"),
    );
    let metrics = d.stdout_line("shardlogd metrics on http://");
    let host = metrics.trim_end_matches("/metrics").to_string();

    let mut c = d.client();
    let payload = [7u8; 100];
    let records = [AppendRecord {
        payload: &payload,
        timestamp: None,
    }; 3];
    for stream in 0..10u64 {
        c.append_batch(stream, &records, AckLevel::Durable).expect("append");
    }

    let (status, body) = http_get(&host, "/metrics");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    assert_eq!(sample_sum(&scrape, "shardlog_records_total"), 30.0, "{body}");
    assert_eq!(sample_sum(&scrape, "shardlog_appends_total"), 10.0, "{body}");
    assert_eq!(sample_sum(&scrape, "shardlog_poisoned"), 0.0, "{body}");
    assert!(
        sample_sum(&scrape, "shardlog_stream_index_bytes") > 0.0,
        "the stream indexes' memory is reported:\n{body}"
    );
    assert!(sample_sum(&scrape, "shardlog_connections") >= 1.0, "{body}");
    let fsyncs: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "shardlog_fsync_latency_us")
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => 0.0,
        })
        .sum();
    assert!(fsyncs >= 1.0, "the fsync histogram counts the commits:\n{body}");
    let per_shard = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "shardlog_durable_lsn")
        .count();
    assert_eq!(per_shard, 2, "one durable_lsn per shard:\n{body}");

    let (status, _) = http_get(&host, "/nothing-here");
    assert_eq!(status, 404);
    assert!(d.terminate().success());
}

#[test]
fn systemd_hears_ready_once_serving_and_stopping_on_sigterm() {
    let dir = data_dir();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind a notify socket");
    socket.set_read_timeout(Some(common::STARTUP_GUARD)).unwrap();
    let data = dir.path().join("data");
    let d = Daemon::start(
        &data,
        &DaemonOpts::shards(1).env("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 arrives");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // Ready means serving: a request is answered right away.
    d.client().ping().expect("ping after READY=1");
    d.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING=1 arrives");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    assert!(d.wait_exit().success());
}

#[test]
fn check_passes_on_the_test_disk_and_fails_on_tmpfs() {
    let dir = data_dir();
    let out = Command::new(BIN)
        .args(["check", "--json", "--no-measure", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run shardlogd check");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    assert!(out.status.success(), "{report}");
    assert_eq!(report["fit"], true, "{report}");
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for wanted in ["io_uring", "memlock", "O_DIRECT", "file system", "free space"] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }

    let shm = std::path::Path::new("/dev/shm");
    let on_tmpfs = Command::new("stat")
        .args(["-f", "-c", "%T", "/dev/shm"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs")
        .unwrap_or(false);
    if !on_tmpfs {
        eprintln!("skipped the tmpfs half: /dev/shm is not tmpfs here");
        return;
    }
    let target = tempfile::tempdir_in(shm).expect("a dir on tmpfs");
    let out = Command::new(BIN)
        .args(["check", "--no-measure", "--data-dir"])
        .arg(target.path())
        .output()
        .expect("run shardlogd check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("fail  O_DIRECT"), "{text}");
    assert!(text.contains("NOT fit"), "{text}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1).arg("--log-format").arg("json"));
    d.client().ping().unwrap();
    let stderr = d.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the daemon logs at info on start");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
    assert!(d.terminate().success());
}

#[test]
fn the_systemd_unit_verifies() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if !analyze.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/shardlogd.service"))
        .expect("packaging/shardlogd.service");
    assert!(unit.contains("Type=notify") && unit.contains("LimitMEMLOCK="), "{unit}");
    // verify checks that ExecStart names an executable: point it at the binary under test.
    let dir = data_dir();
    let path = dir.path().join("shardlogd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/shardlogd", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    assert!(
        !stderr.contains("shardlogd.service:"),
        "systemd-analyze complains about the unit:\n{stderr}"
    );
}
