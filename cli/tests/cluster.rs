//! `shardlog --cluster` against three real daemons on loopback, each with its own data
//! directory: produce sends each record to its home (checked by reading every daemon directly),
//! consume reads a stream from its home, shard-of names the daemon, a cluster file means the
//! same as the flag, and a daemon killed with SIGKILL fails only its streams, with an error
//! naming it.

use std::process::Command;

use proto::client::{Client, ReadParams};
use proto::{daemon_for, shard_for};

mod common;

use common::{json_lines, ok, run, Daemon, RUN_LIMIT};

const CLI: &str = env!("CARGO_BIN_EXE_shardlog");
/// Shards of daemons 0, 1, 2: different on purpose.
const SHARDS: [u16; 3] = [2, 1, 3];
const STREAMS: u64 = 24;

impl Daemon {
    /// Every (stream, shard, payload) this daemon holds, read directly from it.
    fn read_all(&self, shards: u16) -> Vec<(u64, u16, String)> {
        let mut client = Client::connect(self.addr).expect("connect");
        client.set_read_timeout(Some(RUN_LIMIT)).unwrap();
        let mut out = Vec::new();
        for shard in 0..shards {
            let mut from = 1;
            loop {
                let batch = client.read(ReadParams::new(shard, from)).expect("read");
                let records = batch.records.unwrap_or_default();
                if records.is_empty() {
                    break;
                }
                for r in records {
                    let payload = String::from_utf8(r.payload.unwrap_or_default()).expect("UTF-8");
                    out.push((r.stream, shard, payload));
                }
                from = batch.next_lsn;
            }
        }
        out
    }
}

/// `shardlog` with no SHARDLOG_* variable from the caller's shell, and these arguments.
fn cli(args: &[&str]) -> Command {
    let mut cmd = Command::new(CLI);
    for (k, _) in std::env::vars() {
        if k.starts_with("SHARDLOG_") {
            cmd.env_remove(k);
        }
    }
    // Nothing listens on port 1: a test that forgot the cluster fails loudly.
    cmd.env("SHARDLOG_ADDR", "127.0.0.1:1").args(args);
    cmd
}

fn start_cluster() -> (Vec<Daemon>, String) {
    let daemons: Vec<Daemon> = SHARDS.iter().map(|&s| Daemon::start(s, &[])).collect();
    let list = daemons.iter().map(|d| d.addr.to_string()).collect::<Vec<_>>().join(",");
    (daemons, list)
}

fn home(stream: u64) -> (u32, u16) {
    let d = daemon_for(stream, SHARDS.len() as u32);
    (d, shard_for(stream, SHARDS[d as usize]))
}

#[test]
fn produce_and_consume_follow_each_streams_home() {
    let (daemons, list) = start_cluster();
    let input: String = (0..STREAMS)
        .flat_map(|s| (0..2).map(move |i| format!("{{\"stream\":{s},\"payload\":\"s{s} r{i}\"}}\n")))
        .collect();
    let out = ok(run(
        cli(&["--cluster", &list, "produce", "--json", "--input", "json"]),
        input.as_bytes(),
    ));
    let produced = json_lines(&out);
    assert_eq!(produced.len() as u64, STREAMS * 2);
    for p in &produced {
        let stream = p["stream"].as_u64().unwrap();
        let (d, shard) = home(stream);
        assert_eq!(
            (p["daemon"].as_u64(), p["shard"].as_u64()),
            (Some(u64::from(d)), Some(u64::from(shard))),
            "{p}"
        );
    }

    // Every daemon holds exactly the records of the streams whose home it is.
    let mut found = 0;
    for (d, daemon) in daemons.iter().enumerate() {
        for (stream, shard, payload) in daemon.read_all(SHARDS[d]) {
            assert_eq!(
                home(stream),
                (d as u32, shard),
                "{payload:?} on daemon {d} shard {shard}"
            );
            assert!(payload.starts_with(&format!("s{stream} ")), "{payload:?}");
            found += 1;
        }
    }
    assert_eq!(found, STREAMS * 2);

    // consume reads a stream from its home, and a cluster file means the same as the flag.
    let file = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).expect("cluster file");
    std::fs::write(file.path(), format!("# three daemons\n{}\n", list.replace(',', "\n"))).unwrap();
    let file_path = file.path().to_str().unwrap();
    for stream in [0, 5, STREAMS - 1] {
        let want = format!("s{stream} r0\ns{stream} r1\n");
        let out = ok(run(cli(&["--cluster", &list, "consume", &stream.to_string()]), b""));
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        let out = ok(run(
            cli(&["--cluster-file", file_path, "consume", &stream.to_string()]),
            b"",
        ));
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    }

    // shard-of names the home daemon, asking it, or offline with --shards.
    let placed = json_lines(&ok(run(cli(&["--cluster", &list, "shard-of", "--json", "7"]), b"")));
    let (d, shard) = home(7);
    assert_eq!(placed[0]["daemon"].as_u64(), Some(u64::from(d)));
    assert_eq!(placed[0]["shard"].as_u64(), Some(u64::from(shard)));
    assert_eq!(
        placed[0]["daemon_address"].as_str(),
        Some(daemons[d as usize].addr.to_string().as_str())
    );
    let text = ok(run(cli(&["--cluster", &list, "shard-of", "7"]), b""));
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!("daemon {d} (")),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // A whole shard in a cluster needs the daemon said.
    let out = run(cli(&["--cluster", &list, "consume", "--shard", "0"]), b"");
    assert_eq!(out.status.code(), Some(2));
    let out = ok(run(
        cli(&["--cluster", &list, "consume", "--shard", "0", "--daemon", "2", "--json"]),
        b"",
    ));
    assert!(json_lines(&out)
        .iter()
        .all(|r| r["daemon"] == 2 && home(r["stream"].as_u64().unwrap()) == (2, 0)));

    // stats asks every daemon.
    let stats = json_lines(&ok(run(cli(&["--cluster", &list, "stats", "--json"]), b"")));
    let daemons_seen: Vec<u64> = stats.iter().map(|s| s["daemon"].as_u64().unwrap()).collect();
    assert_eq!(daemons_seen, [0, 1, 2]);
}

#[test]
fn a_killed_daemon_fails_only_its_streams() {
    let (mut daemons, list) = start_cluster();
    const VICTIM: u32 = 2;
    let victim_addr = daemons[VICTIM as usize].addr.to_string();
    drop(daemons.remove(VICTIM as usize)); // SIGKILL, then wait for the exit.

    let mut served = 0;
    for stream in 0..8u64 {
        let out = run(cli(&["--cluster", &list, "produce", &stream.to_string(), "x"]), b"");
        if home(stream).0 == VICTIM {
            assert_eq!(out.status.code(), Some(3), "a connection failure for stream {stream}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!("daemon {VICTIM} of the cluster ({victim_addr})")),
                "the error names the daemon: {stderr}"
            );
        } else {
            ok(out);
            served += 1;
        }
    }
    assert!(served > 0 && served < 8, "{served} of 8 streams served");
    // stats still reports the live daemons, and fails (exit 3) for the dead one.
    let out = run(cli(&["--cluster", &list, "stats", "--json"]), b"");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json_lines(&out).len(), 2);
}
