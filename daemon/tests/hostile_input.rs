//! Hostile input against the real daemon: random bytes, absurd length prefixes, truncated frames,
//! garbage FlatBuffers, unknown union tags, a slowloris, a thousand idle connections and a client
//! that never reads its responses.
//!
//! In every case the daemon must not panic or exit, must answer `Error` or close only the
//! offending connection, must keep serving a well-behaved client at the same time, and must keep
//! its resident memory bounded (each test prints the daemon's VmRSS; docs/RELIABILITY.md records
//! them).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{data_dir, read_response, Daemon, DaemonOpts};
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use proto::client::{Client, ReadParams};
use proto::codec::Encoder;
use proto::frame::encode_frame;
use proto::wire::{AckLevel, ErrorCode, RequestBodyT, RequestT, ResponseBodyT, ResponseT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// RSS the daemon may reach in these tests. Far above what it needs (tens of MiB), far below
/// what unbounded buffering of the hostile clients' input or output would take.
const RSS_BOUND_KIB: u64 = 512 << 10;
/// How long a raw read waits before concluding the daemon sent nothing more. Only a guard.
const READ_GUARD: Duration = Duration::from_secs(30);

fn opts() -> DaemonOpts {
    DaemonOpts {
        args: vec![
            "--pin".into(),
            "none".into(),
            "--shards".into(),
            "2".into(),
            "--segment-bytes".into(),
            (4u64 << 20).to_string(),
        ],
        envs: Vec::new(),
    }
}

fn seed() -> u64 {
    let seed = std::env::var("SHARDLOG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (replay with SHARDLOG_SEED={seed})");
    seed
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(READ_GUARD)).expect("read timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn request_frame(id: u64, body: RequestBodyT) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().request(&RequestT { id, body }, &mut out);
    out
}

fn ping_frame(id: u64) -> Vec<u8> {
    request_frame(id, RequestBodyT::Ping(Box::default()))
}

fn append_frame(id: u64, stream: u64, payload: &[u8], ack: AckLevel) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().append(id, stream, [proto::codec::AppendRecord::new(payload)], ack, &mut out);
    out
}

fn error_code(r: &ResponseT) -> Option<ErrorCode> {
    match &r.body {
        ResponseBodyT::Error(e) => Some(e.code),
        _ => None,
    }
}

/// Sends a ping with `id` and reads responses until its pong; panics if the connection closes.
fn ping_on(s: &mut TcpStream, id: u64) {
    s.write_all(&ping_frame(id)).expect("send ping");
    loop {
        let r = read_response(s).expect("connection stays open and answers the ping");
        if r.id == id && matches!(r.body, ResponseBodyT::Pong(_)) {
            return;
        }
    }
}

/// Reads until the daemon closes the connection, returning what it said before.
fn read_until_closed(s: &mut TcpStream) -> Vec<ResponseT> {
    let mut out = Vec::new();
    while let Some(r) = read_response(s) {
        out.push(r);
    }
    out
}

fn assert_alive(d: &Daemon) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).expect("daemon is running");
    assert!(!status.contains("State:\tZ"), "daemon exited:\n{}", d.stderr());
    assert!(!d.stderr().contains("panicked"), "daemon panicked:\n{}", d.stderr());
}

/// A well-behaved client on its own thread: appends durably and reads each record back, until
/// stopped. Returns how many round trips it completed.
struct GoodClient {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GoodClient {
    fn start(addr: SocketAddr) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).expect("good client connects");
                c.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let payload = format!("good-{i}").into_bytes();
                    let a = c
                        .append(42, &payload, AckLevel::Durable)
                        .expect("good client's append")
                        .expect("Appended");
                    let mut p = ReadParams::new(a.shard, a.first_lsn);
                    p.max_bytes = 4096;
                    let batch = c.read(p).expect("good client's read");
                    let first = batch.records.unwrap_or_default().into_iter().next();
                    let got = first.and_then(|r| r.payload).expect("the appended record");
                    assert_eq!(got, payload);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        GoodClient {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Waits until the client completes `n` more round trips (it is served while the hostile
    /// client misbehaves).
    fn wait_for_more(&self, n: u64) {
        let target = self.done.load(Ordering::Relaxed) + n;
        while self.done.load(Ordering::Relaxed) < target {
            let finished = self.thread.as_ref().is_some_and(|t| t.is_finished());
            assert!(!finished, "the good client stopped");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the good client never failed");
        self.done.load(Ordering::Relaxed)
    }
}

fn report_rss(d: &Daemon, what: &str) -> u64 {
    let rss = d.rss_kib();
    println!("{what}: daemon VmRSS {rss} KiB");
    assert!(rss < RSS_BOUND_KIB, "{what}: daemon RSS {rss} KiB");
    rss
}

#[test]
fn random_bytes_close_only_the_offending_connection() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    let good = GoodClient::start(d.addr);
    let mut rng = StdRng::seed_from_u64(seed());
    for i in 0..200 {
        let mut s = connect(d.addr);
        let len = rng.gen_range(1..8192);
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // The daemon may close before reading everything; a reset is a fine answer.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        // Whatever comes back must be well-formed frames, and then the connection ends.
        let _ = s.read_to_end(&mut sink);
        if i % 20 == 0 {
            good.wait_for_more(1);
        }
    }
    good.wait_for_more(5);
    assert_alive(&d);
    report_rss(&d, "after 200 connections of random bytes");
    good.finish();
}

#[test]
fn absurd_length_prefixes_are_refused_without_allocating() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    let good = GoodClient::start(d.addr);
    let before = d.rss_kib();
    for header in [u32::MAX, 0, (4 << 20) + 1, 1 << 31] {
        let mut s = connect(d.addr);
        s.write_all(&header.to_le_bytes()).expect("send header");
        // Some payload too, as a client that believes its own length would send.
        let _ = s.write_all(&[0x5a; 1000]);
        let said = read_until_closed(&mut s);
        assert_eq!(said.len(), 1, "one Error, then close, for length {header}: {said:?}");
        assert_eq!(said[0].id, 0);
        assert_eq!(error_code(&said[0]), Some(ErrorCode::FrameTooLarge), "length {header}");
    }
    good.wait_for_more(5);
    assert_alive(&d);
    let after = report_rss(&d, "after 4 GiB, 2 GiB, 4 MiB + 1 and 0 length prefixes");
    assert!(after < before + (64 << 10), "RSS grew from {before} to {after} KiB");
    good.finish();
}

#[test]
fn truncated_frames_do_not_disturb_other_connections() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    let good = GoodClient::start(d.addr);
    let mut rng = StdRng::seed_from_u64(seed());
    let mut held = Vec::new();
    for i in 0..100 {
        let mut frame = append_frame(i, 7, &vec![b'x'; rng.gen_range(1..20_000)], AckLevel::Durable);
        let cut = rng.gen_range(1..frame.len());
        frame.truncate(cut);
        let mut s = connect(d.addr);
        s.write_all(&frame).expect("send part of a frame");
        if i % 2 == 0 {
            // Close mid-frame.
            drop(s);
        } else {
            // Or stay connected with half a frame pending.
            held.push(s);
        }
    }
    good.wait_for_more(10);
    // A connection with a partial frame still completes it and is answered.
    let mut s = connect(d.addr);
    let frame = ping_frame(77);
    s.write_all(&frame[..5]).expect("first half");
    good.wait_for_more(3);
    s.write_all(&frame[5..]).expect("second half");
    let r = read_response(&mut s).expect("pong");
    assert_eq!(r.id, 77);
    assert_alive(&d);
    report_rss(&d, "with 50 connections holding half a frame");
    drop(held);
    good.finish();
}

/// Builds a `Request` table by hand with any union tag and body.
fn raw_request(
    id: u64,
    tag: u8,
    body: impl FnOnce(&mut FlatBufferBuilder<'static>) -> Option<WIPOffset<flatbuffers::UnionWIPOffset>>,
) -> Vec<u8> {
    let mut b = FlatBufferBuilder::new();
    let body = body(&mut b);
    let start = b.start_table();
    b.push_slot::<u64>(4, id, 0);
    if let Some(body) = body {
        b.push_slot_always(8, body);
    }
    b.push_slot::<u8>(6, tag, 0);
    let root = b.end_table(start);
    b.finish_minimal(root);
    let mut out = Vec::new();
    encode_frame(b.finished_data(), &mut out);
    out
}

fn empty_table(b: &mut FlatBufferBuilder<'static>) -> Option<WIPOffset<flatbuffers::UnionWIPOffset>> {
    let start = b.start_table();
    let t = b.end_table(start);
    Some(WIPOffset::new(t.value()))
}

#[test]
fn garbage_flatbuffers_are_answered_and_the_connection_stays_in_sync() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    let good = GoodClient::start(d.addr);
    let mut rng = StdRng::seed_from_u64(seed());
    let mut s = connect(d.addr);

    // Unknown union tags: UnknownMessage, id kept.
    for tag in [6u8, 7, 99, 255] {
        s.write_all(&raw_request(1000 + u64::from(tag), tag, empty_table))
            .expect("send");
        let r = read_response(&mut s).expect("answered");
        assert_eq!(error_code(&r), Some(ErrorCode::UnknownMessage), "tag {tag}: {r:?}");
        assert_eq!(r.id, 1000 + u64::from(tag));
    }
    // A request with no body, and a known tag pointing at nothing.
    s.write_all(&raw_request(5, 0, |_| None)).expect("send");
    assert!(error_code(&read_response(&mut s).expect("answered")).is_some());
    s.write_all(&raw_request(6, 2, |_| None)).expect("send");
    assert!(error_code(&read_response(&mut s).expect("answered")).is_some());
    // An Append whose records vector claims 2^32-1 elements.
    let mut huge = append_frame(8, 1, b"abc", AckLevel::Durable);
    let payload_len = huge.len() - 4;
    for at in 4..huge.len() - 4 {
        // The records vector's length field precedes its one element offset; find any u32 equal
        // to 1 that is followed by a small forward offset and blow it up.
        if u32::from_le_bytes(huge[at..at + 4].try_into().expect("4 bytes")) == 1 && at % 4 == 0 {
            huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        }
    }
    assert_eq!(huge.len() - 4, payload_len);
    s.write_all(&huge).expect("send");
    // Answered with an Error (or, if the blown-up field was another one, anything at all).
    ping_on(&mut s, 9);

    // Random payloads with a correct length prefix, and random mutations of valid requests:
    // each gets at most one response, and the connection keeps answering pings.
    let valid = [
        ping_frame(10),
        append_frame(11, 3, &[7u8; 300], AckLevel::Durable),
        request_frame(
            12,
            RequestBodyT::Read(Box::new(proto::wire::ReadT {
                shard: 1,
                from_lsn: 1,
                max_bytes: 1000,
                ..Default::default()
            })),
        ),
        request_frame(13, RequestBodyT::Stats(Box::default())),
    ];
    for i in 0..2000u64 {
        let frame = if i % 2 == 0 {
            let len = rng.gen_range(1..2000);
            let mut f = Vec::new();
            encode_frame(&(0..len).map(|_| rng.gen()).collect::<Vec<u8>>(), &mut f);
            f
        } else {
            let mut f = valid[rng.gen_range(0..valid.len())].clone();
            for _ in 0..rng.gen_range(1..8) {
                let at = rng.gen_range(4..f.len());
                f[at] = rng.gen();
            }
            f
        };
        s.write_all(&frame).expect("send");
        if i % 50 == 49 {
            ping_on(&mut s, 1_000_000 + i);
        }
    }
    ping_on(&mut s, 2_000_000);
    good.wait_for_more(5);
    assert_alive(&d);
    report_rss(&d, "after 2000 garbage and mutated FlatBuffers");
    good.finish();
}

#[test]
fn slowloris_does_not_hold_up_other_clients() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    let good = GoodClient::start(d.addr);
    let mut s = connect(d.addr);
    let frame = append_frame(1, 5, &[1u8; 64], AckLevel::Durable);
    // One byte per second for a few seconds; the good client is served meanwhile.
    for b in &frame[..4] {
        s.write_all(std::slice::from_ref(b)).expect("one byte");
        good.wait_for_more(1);
        std::thread::sleep(Duration::from_secs(1));
    }
    s.write_all(&frame[4..]).expect("the rest");
    let r = read_response(&mut s).expect("answered");
    assert!(matches!(r.body, ResponseBodyT::Appended(_)), "{r:?}");
    assert_alive(&d);
    report_rss(&d, "after a slowloris");
    good.finish();
}

fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

#[test]
fn a_thousand_idle_connections() {
    // The daemon inherits the limit, so raise it before starting it.
    let limit = raise_nofile(8192);
    if limit < 2100 {
        println!("SKIP a_thousand_idle_connections: RLIMIT_NOFILE is {limit} and cannot be raised");
        return;
    }
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    let before = d.rss_kib();
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut s = connect(d.addr);
        if i % 2 == 0 {
            // Half of them say one thing first, so each has been seen and answered.
            ping_on(&mut s, i);
        }
        idle.push(s);
    }
    let good = GoodClient::start(d.addr);
    good.wait_for_more(20);
    assert_alive(&d);
    let with = report_rss(&d, "with 1000 idle connections");
    println!("1000 idle connections: RSS {before} -> {with} KiB");
    // Every one of them is still served.
    for (i, s) in idle.iter_mut().enumerate().step_by(97) {
        ping_on(s, 10_000 + i as u64);
    }
    drop(idle);
    good.wait_for_more(5);
    good.finish();
}

#[test]
fn a_client_that_never_reads_is_pushed_back_not_buffered() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &opts());
    // Some data worth reading: 4 MiB on each shard.
    {
        let mut c = d.client();
        let big = vec![0xabu8; 64 << 10];
        for stream in 0..128u64 {
            c.append(stream, &big, AckLevel::Durable)
                .expect("fill")
                .expect("Appended");
        }
    }
    let before = d.rss_kib();
    let good = GoodClient::start(d.addr);
    let mut s = connect(d.addr);
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    let read = |id: u64| {
        request_frame(
            id,
            RequestBodyT::Read(Box::new(proto::wire::ReadT {
                shard: (id % 2) as u16,
                from_lsn: 1,
                max_bytes: 1 << 20,
                ..Default::default()
            })),
        )
    };
    // Ask for up to 2 GiB of responses and read none of them. Once the daemon stops reading
    // (its per-connection budget), the socket buffers fill and our writes time out.
    let mut sent = 0u64;
    let mut blocked = false;
    for id in 1..=2048u64 {
        match s.write_all(&read(id)) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                blocked = true;
                break;
            }
            Err(e) => panic!("write failed with {e}, expected push-back"),
        }
        if id % 64 == 0 {
            good.wait_for_more(1);
        }
    }
    println!("never-reading client: {sent} Read requests of 1 MiB accepted before push-back ({blocked})");
    good.wait_for_more(20);
    assert_alive(&d);
    let with = report_rss(&d, "with a client that never reads");
    assert!(with < before + (256 << 10), "RSS grew from {before} to {with} KiB");
    drop(s);
    good.wait_for_more(5);
    good.finish();
}
