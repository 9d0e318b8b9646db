//! `shardlog` against a real shardlogd: produced bytes come back exactly (empty and binary
//! payloads too), `--follow` sees another client's append, errors map to the documented exit
//! codes, and a closed stdout ends a run quietly.
//!
//! The daemon binary belongs to another package, so Cargo gives no `CARGO_BIN_EXE_` for it: it
//! is taken from `SHARDLOGD`, or next to this test's profile directory (where
//! `cargo test --workspace` has built it), or built once into a separate target directory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use proto::wire::AckLevel;
use serde_json::Value;

mod common;

use common::{json_lines, ok, run, wait_limited, Daemon, RUN_LIMIT};

const CLI: &str = env!("CARGO_BIN_EXE_shardlog");

impl Daemon {
    /// `shardlog` aimed at this daemon, with no SHARDLOG_* variable from the caller's shell.
    fn cli(&self, args: &[&str]) -> Command {
        cli_at(&self.addr.to_string(), args)
    }
}

fn cli_at(addr: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(CLI);
    for (k, _) in std::env::vars() {
        if k.starts_with("SHARDLOG_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SHARDLOG_ADDR", addr).args(args);
    cmd
}

/// The payload of a `consume --json` line, whichever key carries it.
fn payload_of(v: &Value) -> Vec<u8> {
    match (v.get("payload"), v.get("payload_base64")) {
        (Some(Value::String(s)), None) => s.as_bytes().to_vec(),
        (None, Some(Value::String(b))) => base64::engine::general_purpose::STANDARD.decode(b).expect("base64"),
        other => panic!("record without exactly one payload key: {v} ({other:?})"),
    }
}

#[test]
fn produce_then_consume_round_trips_bytes_exactly() {
    let d = Daemon::start(2, &[]);
    let stream = "42";
    let binary: Vec<u8> = (0..=255u8).collect();

    // From arguments: text, empty, and bytes that are not UTF-8 (argv cannot hold a zero byte).
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = d.cli(&["produce", "--json", stream, "hello", ""]);
    cmd.arg(std::ffi::OsStr::from_bytes(b"\xff\x80\xfe"));
    let produced = json_lines(&ok(run(cmd, b"")));
    assert_eq!(produced.len(), 3);
    let lsns: Vec<u64> = produced.iter().map(|p| p["lsn"].as_u64().unwrap()).collect();
    assert_eq!(lsns, [1, 2, 3], "lsns of a fresh shard, in input order");

    // From stdin lines: an empty line is an empty record; a last line without a newline counts.
    ok(run(d.cli(&["produce", "-q", stream]), b"line one\n\nline \x01three"));

    // From JSON lines: base64 carries any bytes, including newlines and zeros.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&binary);
    let json_in =
        format!("{{\"stream\":{stream},\"payload_base64\":\"{b64}\",\"timestamp\":77}}\n\n{{\"payload\":\"\"}}\n");
    ok(run(
        d.cli(&["produce", "-q", "--input", "json", stream]),
        json_in.as_bytes(),
    ));

    let consumed = json_lines(&ok(run(d.cli(&["consume", "--json", stream]), b"")));
    let payloads: Vec<Vec<u8>> = consumed.iter().map(payload_of).collect();
    let expected: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        vec![],
        b"\xff\x80\xfe".to_vec(),
        b"line one".to_vec(),
        vec![],
        b"line \x01three".to_vec(),
        binary.clone(),
        vec![],
    ];
    assert_eq!(payloads, expected);
    let lsns: Vec<u64> = consumed.iter().map(|v| v["lsn"].as_u64().unwrap()).collect();
    assert_eq!(lsns, (1..=8).collect::<Vec<_>>());
    let shard = proto::shard_for(42, 2);
    for v in &consumed {
        assert_eq!(v["stream"], 42);
        assert_eq!(v["shard"], shard);
    }
    assert_eq!(consumed[6]["timestamp"], 77, "a JSON line's timestamp is kept");
    assert!(
        consumed[0]["timestamp"].as_u64().is_some(),
        "produce stamps records by default"
    );

    // Raw output with no delimiter is the payloads back to back, byte for byte.
    let raw = ok(run(
        d.cli(&["consume", stream, "--from-lsn", "7", "-n", "1", "-D", ""]),
        b"",
    ));
    assert_eq!(raw.stdout, binary);

    // `consume --json` output replays through `produce --input json` into another stream.
    let replay: Vec<u8> = consumed
        .iter()
        .flat_map(|v| {
            let mut line = serde_json::to_vec(v).unwrap();
            line.push(b'\n');
            line
        })
        .collect();
    ok(run(d.cli(&["produce", "-q", "--input", "json", "--json"]), &replay));
    let again = json_lines(&ok(run(
        d.cli(&["consume", "--json", "--shard", &shard.to_string()]),
        b"",
    )));
    let again: Vec<Vec<u8>> = again.iter().map(payload_of).collect();
    assert_eq!(again.len(), 16, "the replay appended to the same stream");
    assert_eq!(again[8..], expected[..]);
}

#[test]
fn follow_sees_a_record_appended_by_another_client() {
    let d = Daemon::start(1, &[]);
    let mut client = d.client();
    client.append(5, b"before", AckLevel::Durable).expect("append");
    let before = client.stats().expect("stats").front.expect("front").connections;

    let mut cmd = d.cli(&[
        "consume",
        "5",
        "--from-lsn",
        "2",
        "--follow",
        "--json",
        "--max-records",
        "1",
    ]);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn consume");
    // Wait until the follower is connected, so the append below lands while it polls.
    let started = Instant::now();
    while client.stats().expect("stats").front.expect("front").connections <= before {
        assert!(started.elapsed() < RUN_LIMIT, "the follower never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let appended = client
        .append(5, b"\x00after", AckLevel::Durable)
        .expect("append")
        .expect("ack");
    let out = ok(wait_limited(child, "consume --follow"));
    let got = json_lines(&out);
    assert_eq!(got.len(), 1, "--max-records 1 ends the follow after one record");
    assert_eq!(got[0]["lsn"], appended.first_lsn);
    assert_eq!(payload_of(&got[0]), b"\x00after");
}

#[test]
fn from_end_without_follow_prints_nothing() {
    let d = Daemon::start(1, &[]);
    ok(run(d.cli(&["produce", "-q", "9", "a", "b"]), b""));
    let out = ok(run(d.cli(&["consume", "9", "--from-end"]), b""));
    assert!(out.stdout.is_empty(), "got {:?}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn errors_exit_with_documented_codes() {
    // Nothing listens on port 1: a connection failure.
    let out = run(cli_at("127.0.0.1:1", &["ping"]), b"");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));

    let d = Daemon::start(1, &["--max-frame-bytes", "4096"]);
    // A usage error: exactly one of STREAM and --shard.
    assert_eq!(run(d.cli(&["consume"]), b"").status.code(), Some(2));
    // Bad input to --input json, with the line number.
    let out = run(
        d.cli(&["produce", "1", "--input", "json"]),
        b"{\"payload\":\"a\"}\nnot json\n",
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("input line 2"));
    // The daemon's own error: a frame above its limit is FrameTooLarge (1), so 10 + 1.
    let big = "x".repeat(8192);
    let out = run(d.cli(&["produce", "1", &big]), b"");
    assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FrameTooLarge (1)"),
        "the error names the wire code: {stderr}"
    );
}

#[test]
fn closed_stdout_ends_quietly() {
    let d = Daemon::start(1, &[]);
    let lines: String = (0..20_000).map(|i| format!("{i:0>100}\n")).collect();
    ok(run(d.cli(&["produce", "-q", "3"]), lines.as_bytes()));
    let mut child = d
        .cli(&["consume", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn consume");
    // Read one line, then close the pipe like `| head -1` does; 2 MB cannot fit a pipe buffer,
    // so the consumer must meet the closed pipe.
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut first)
        .expect("read a line");
    assert_eq!(first.trim_end(), format!("{:0>100}", 0));
    drop(child.stdout.take());
    let out = wait_limited(child, "consume into a closed pipe");
    assert!(out.status.success(), "exit {:?}", out.status);
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shard_of_ping_and_stats_answer() {
    let d = Daemon::start(4, &[]);
    let produced = json_lines(&ok(run(d.cli(&["produce", "--json", "12345", "x"]), b"")));
    let placed = json_lines(&ok(run(d.cli(&["shard-of", "--json", "12345"]), b"")));
    assert_eq!(placed[0]["shard"], produced[0]["shard"]);
    assert_eq!(placed[0]["shard_count"], 4);
    // Offline placement agrees with the daemon's.
    let offline = json_lines(&ok(run(
        cli_at("127.0.0.1:1", &["shard-of", "--json", "--shards", "4", "12345"]),
        b"",
    )));
    assert_eq!(offline[0]["shard"], produced[0]["shard"]);

    let pings = json_lines(&ok(run(
        d.cli(&["ping", "--json", "-c", "2", "--interval-ms", "1"]),
        b"",
    )));
    assert_eq!(pings.len(), 2);
    assert!(pings.iter().all(|p| p["rtt_us"].is_u64()));

    let stats = json_lines(&ok(run(d.cli(&["stats", "--json"]), b"")));
    let shards = stats[0]["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 4);
    let records: u64 = shards.iter().map(|s| s["records"].as_u64().unwrap()).sum();
    assert_eq!(records, 1);
    let text = ok(run(d.cli(&["stats"]), b""));
    assert!(String::from_utf8_lossy(&text.stdout).contains("durable lsn"));
}
