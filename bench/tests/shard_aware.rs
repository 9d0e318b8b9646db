//! Shard-aware connections, against a stand-in server that offers shard
//! addresses in its `HelloOk` (shardlogd does not fill that field yet): every
//! append must reach the address of the shard that owns its stream, and with
//! `--routed` every append must go to the main address instead.
//!
//! The stand-in speaks the real protocol through the `proto` codec: it
//! answers `Hello` and acknowledges appends, and records which listener each
//! append arrived on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench::report::Report;
use proto::codec::{decode_request, Encoder};
use proto::frame::{FrameReader, FRAME_BYTES_MAX_DEFAULT};
use proto::wire::{AckLevel, HelloOkT, RequestBodyT, ResponseBodyT, ResponseT};

const BENCH: &str = env!("CARGO_BIN_EXE_shardlog-bench");
const SHARDS: u16 = 3;
/// A guard against hangs, not a performance bound.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// (listener index: 0 is the main address, 1 + s is shard s; stream) of every append received.
type Seen = Arc<Mutex<Vec<(usize, u64)>>>;

struct StandIn {
    main: SocketAddr,
    seen: Seen,
}

impl StandIn {
    /// A main listener and one per shard; every `HelloOk` lists the shard listeners.
    fn start() -> StandIn {
        let listeners: Vec<TcpListener> = (0..=SHARDS)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addrs: Vec<String> = listeners[1..]
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        let main = listeners[0].local_addr().expect("addr");
        let seen = Seen::default();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (addrs, seen) = (addrs.clone(), seen.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    let (addrs, seen) = (addrs.clone(), seen.clone());
                    std::thread::spawn(move || serve(conn, index, &addrs, &seen));
                }
            });
        }
        StandIn { main, seen }
    }
}

/// Answers one connection until the client closes it.
fn serve(mut conn: TcpStream, index: usize, addrs: &[String], seen: &Seen) {
    let mut reader = FrameReader::new(FRAME_BYTES_MAX_DEFAULT);
    let mut enc = Encoder::new();
    let mut lsn = 1u64;
    loop {
        let mut out = Vec::new();
        while let Some(payload) = reader.next_frame().expect("well-formed frames") {
            let req = decode_request(payload).expect("a valid request");
            match req.body {
                RequestBodyT::Hello(_) => {
                    let hello = HelloOkT {
                        version: proto::PROTOCOL_VERSION,
                        server: Some("stand-in".into()),
                        shard_count: SHARDS,
                        shard_addresses: Some(addrs.to_vec()),
                    };
                    let resp = ResponseT {
                        id: req.id,
                        body: ResponseBodyT::HelloOk(Box::new(hello)),
                    };
                    enc.response(&resp, &mut out);
                }
                RequestBodyT::Append(append) => {
                    seen.lock().expect("lock").push((index, append.stream));
                    let count = append.records.map_or(0, |r| r.len()) as u32;
                    let shard = proto::shard_for(append.stream, SHARDS);
                    if append.ack != AckLevel::None {
                        enc.appended(req.id, shard, lsn, count, &mut out);
                    }
                    lsn += u64::from(count);
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
        if !out.is_empty() && conn.write_all(&out).is_err() {
            return;
        }
        let spare = reader.spare(64 << 10);
        match conn.read(spare) {
            Ok(0) | Err(_) => {
                reader.filled(0);
                return;
            }
            Ok(n) => reader.filled(n),
        }
    }
}

fn run_bench(args: &[&str], json: &std::path::Path) -> Report {
    let mut child = Command::new(BENCH)
        .args(args)
        .arg("--json")
        .arg(json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardlog-bench");
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("shardlog-bench still running after {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "shardlog-bench failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).expect("report")).expect("JSON report")
}

#[test]
fn appends_go_straight_to_the_shard_that_owns_their_stream() {
    let server = StandIn::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = server.main.to_string();
    let json = dir.path().join("report.json");
    let report = run_bench(
        &[
            "--addr",
            &addr,
            "-c",
            "2",
            "-P",
            "4",
            "-K",
            "64",
            "--requests",
            "300",
            "-q",
        ],
        &json,
    );
    assert_eq!(report.requests, 300);
    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    assert_eq!(report.shard_aware_connections, 2);
    let seen = server.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 300);
    for &(index, stream) in &seen {
        assert_ne!(index, 0, "stream {stream} went to the main address");
        assert_eq!(
            index - 1,
            usize::from(proto::shard_for(stream, SHARDS)),
            "stream {stream} went to the wrong shard"
        );
    }
    // Uniform over 64 streams: every shard got some.
    for shard in 1..=usize::from(SHARDS) {
        assert!(seen.iter().any(|&(i, _)| i == shard), "shard {} got nothing", shard - 1);
    }
}

#[test]
fn routed_sends_everything_to_the_main_address() {
    let server = StandIn::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = server.main.to_string();
    let json = dir.path().join("report.json");
    let report = run_bench(
        &[
            "--addr",
            &addr,
            "--routed",
            "-c",
            "2",
            "-P",
            "4",
            "--requests",
            "100",
            "-q",
        ],
        &json,
    );
    assert_eq!(report.requests, 100);
    assert_eq!(report.shard_aware_connections, 0);
    let seen = server.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 100);
    assert!(seen.iter().all(|&(index, _)| index == 0), "{seen:?}");
}

#[test]
fn unacked_load_and_its_drain_are_routed_too() {
    let server = StandIn::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = server.main.to_string();
    let json = dir.path().join("report.json");
    let report = run_bench(
        &[
            "--addr",
            &addr,
            "--ack",
            "none",
            "-c",
            "1",
            "-P",
            "8",
            "--requests",
            "200",
            "-q",
        ],
        &json,
    );
    assert_eq!(report.requests, 200);
    assert!(report.drain.is_some(), "the drain was acknowledged");
    let seen = server.seen.lock().expect("lock").clone();
    // The load, then one durable append per shard.
    assert_eq!(seen.len(), 200 + usize::from(SHARDS));
    for &(index, stream) in &seen {
        assert_ne!(index, 0, "stream {stream} went to the main address");
        assert_eq!(index - 1, usize::from(proto::shard_for(stream, SHARDS)));
    }
}
