//! When `HelloOk.shard_addresses` is filled, `shardlog` sends each request about shard s to s's
//! own address. The daemon does not offer shard addresses yet, so a small fake server speaks the
//! protocol here: one routed listener and one per shard, each recording what reached it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use proto::codec::{decode_request, Encoder};
use proto::frame::{FrameReader, FRAME_BYTES_MAX_DEFAULT, READ_CHUNK_BYTES};
use proto::wire::{AppendedT, HelloOkT, PongT, RequestBodyT, ResponseBodyT, ResponseT};

const CLI: &str = env!("CARGO_BIN_EXE_shardlog");
const SHARDS: u16 = 2;

/// (listener name, stream) of every append received.
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn serve(listener: TcpListener, name: String, shard_addrs: Vec<String>, seen: Seen) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (name, addrs, seen) = (name.clone(), shard_addrs.clone(), seen.clone());
            std::thread::spawn(move || serve_conn(conn, &name, &addrs, &seen));
        }
    });
}

fn serve_conn(mut conn: TcpStream, name: &str, shard_addrs: &[String], seen: &Seen) {
    let mut frames = FrameReader::new(FRAME_BYTES_MAX_DEFAULT);
    let mut enc = Encoder::new();
    let mut lsn = 1u64;
    loop {
        while let Some(payload) = frames.next_frame().expect("good frames from the CLI") {
            let req = decode_request(payload).expect("a valid request");
            let body = match req.body {
                RequestBodyT::Hello(_) => ResponseBodyT::HelloOk(Box::new(HelloOkT {
                    version: 1,
                    server: Some("fake".into()),
                    shard_count: SHARDS,
                    shard_addresses: Some(shard_addrs.to_vec()),
                })),
                RequestBodyT::Append(a) => {
                    seen.lock().unwrap().push((name.to_string(), a.stream));
                    let count = a.records.map_or(0, |r| r.len()) as u32;
                    let first_lsn = lsn;
                    lsn += u64::from(count);
                    ResponseBodyT::Appended(Box::new(AppendedT {
                        shard: proto::shard_for(a.stream, SHARDS),
                        first_lsn,
                        count,
                    }))
                }
                RequestBodyT::Ping(_) => ResponseBodyT::Pong(Box::new(PongT {})),
                other => panic!("unexpected request {other:?}"),
            };
            let mut out = Vec::new();
            enc.response(&ResponseT { id: req.id, body }, &mut out);
            if conn.write_all(&out).is_err() {
                return;
            }
        }
        let spare = frames.spare(READ_CHUNK_BYTES);
        let n = conn.read(spare).unwrap_or(0);
        frames.filled(n);
        if n == 0 {
            return;
        }
    }
}

#[test]
fn requests_go_to_the_shards_own_address_when_offered() {
    let seen: Seen = Arc::default();
    let routed = TcpListener::bind("127.0.0.1:0").unwrap();
    let shard_listeners: Vec<TcpListener> = (0..SHARDS).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let shard_addrs: Vec<String> = shard_listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let routed_addr = routed.local_addr().unwrap().to_string();
    serve(routed, "routed".into(), shard_addrs.clone(), seen.clone());
    for (s, l) in shard_listeners.into_iter().enumerate() {
        serve(l, format!("shard-{s}"), shard_addrs.clone(), seen.clone());
    }

    let streams: Vec<u64> = (0..8).collect();
    let input: String = streams
        .iter()
        .map(|s| format!("{{\"stream\":{s},\"payload\":\"p\"}}\n"))
        .collect();
    let mut child = Command::new(CLI)
        .args([
            "--addr",
            &routed_addr,
            "--timeout-secs",
            "60",
            "produce",
            "--input",
            "json",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardlog");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    // Bounded by --timeout-secs in the CLI itself; the fake server answers at once.
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), streams.len());

    let seen = seen.lock().unwrap().clone();
    let mut streams_seen: Vec<u64> = seen.iter().map(|(_, s)| *s).collect();
    streams_seen.sort_unstable();
    assert_eq!(streams_seen, streams, "every stream appended exactly once");
    for (listener, stream) in &seen {
        let shard = proto::shard_for(*stream, SHARDS);
        assert_eq!(
            listener,
            &format!("shard-{shard}"),
            "stream {stream} went to {listener}"
        );
    }
}
