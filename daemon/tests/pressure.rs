//! Backpressure on clients that do not read, and a failing shard that must not take others down.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{data_dir, Daemon, DaemonOpts};
use proto::codec::{AppendRecord, Encoder};
use proto::shard_for;
use proto::wire::{AckLevel, ErrorCode};

/// Bytes a client that never reads may push before the test gives up waiting for pushback.
const PUSH_BYTES_MAX: usize = 1 << 30;

#[test]
fn a_client_that_never_reads_is_pushed_back_and_memory_stays_bounded() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1));
    // Warm up so allocator pools exist before the baseline.
    let mut other = d.client();
    for i in 0..100u64 {
        other.append(i, &[0u8; 100], AckLevel::Durable).unwrap();
    }
    let rss_before = d.rss_kib();

    let mut hog = std::net::TcpStream::connect(d.addr).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut enc = Encoder::new();
    let mut chunk = Vec::new();
    for i in 0..400u64 {
        enc.append(
            i + 1,
            i % 7,
            [AppendRecord::new(&[1u8; 100])],
            AckLevel::Written,
            &mut chunk,
        );
    }
    let mut pushed = 0usize;
    let blocked = loop {
        if pushed >= PUSH_BYTES_MAX {
            break false;
        }
        match hog.write_all(&chunk) {
            Ok(()) => pushed += chunk.len(),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break true,
            Err(e) => panic!("write: {e}"),
        }
    };
    assert!(
        blocked,
        "the daemon kept reading {pushed} bytes from a client that reads nothing"
    );
    let rss_after = d.rss_kib();
    // The connection may hold its budget (4 MiB) plus buffers; anything near what was pushed
    // would mean the daemon buffered the stream.
    let grown_kib = rss_after.saturating_sub(rss_before);
    eprintln!(
        "pushed {} KiB before pushback; daemon RSS {rss_before} -> {rss_after} KiB",
        pushed >> 10
    );
    assert!(
        grown_kib < 48 << 10,
        "RSS grew by {grown_kib} KiB while a client pushed {} KiB without reading",
        pushed >> 10
    );
    // Everyone else is still served.
    other.ping().unwrap();
    other.append(3, b"still here", AckLevel::Durable).unwrap().unwrap();
    let stats = other.stats().unwrap();
    assert_eq!(stats.front.unwrap().connections, 2);
}

#[test]
fn a_shard_whose_storage_fails_is_poisoned_and_the_others_keep_serving() {
    let dir = data_dir();
    let opts = DaemonOpts::shards(2).env("SHARDLOG_FAULTS", "shard:1:commit:eio:after=3");
    let d = Daemon::start(dir.path(), &opts);
    let mut c = d.client();
    let on = |shard: u16| (0..1000u64).find(|&s| shard_for(s, 2) == shard).unwrap();
    let (s0, s1) = (on(0), on(1));
    // The first three commits of shard 1 succeed, so acked data exists before the failure.
    let mut acked_on_1 = 0;
    let mut poisoned = false;
    for i in 0..10u32 {
        match c.append(s1, &i.to_le_bytes(), AckLevel::Durable) {
            Ok(_) => {
                assert!(!poisoned, "an append was acked after the shard was poisoned");
                acked_on_1 += 1;
            }
            Err(e) => {
                assert_eq!(e.server_code(), Some(ErrorCode::Poisoned), "{e}");
                poisoned = true;
            }
        }
    }
    assert!(poisoned);
    assert!(acked_on_1 >= 1);
    for i in 0..10u32 {
        c.append(s0, &i.to_le_bytes(), AckLevel::Durable).unwrap().unwrap();
    }
    let stats = c.stats().unwrap();
    let shards = stats.shards.unwrap();
    assert!(shards[0].poisoned.is_none());
    let cause = shards[1].poisoned.as_deref().expect("shard 1 reports its poison");
    assert!(!cause.is_empty());
    // Reads of what was durable before the failure still work.
    let mut read = proto::client::ReadParams::new(1, 1);
    read.stream = Some(s1);
    let got = c.read(read).unwrap().records.unwrap_or_default();
    assert_eq!(got.len(), acked_on_1);
}

/// Appends with `AckLevel::None` get no response, so their budget must come back without one:
/// a single fire-and-forget connection that sends more than its whole budget keeps being read.
#[test]
fn fire_and_forget_appends_beyond_the_budget_keep_flowing() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1));
    let mut client = d.client();
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    client
        .socket()
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let payload = [7u8; 1000];
    // 16 MiB of requests: four times the default per-connection budget of 4 MiB.
    let count = 16 * 1024u64;
    for i in 0..count {
        client.append(i % 5, &payload, AckLevel::None).unwrap();
    }
    // A durable append on the same connection is answered after all of them.
    let last = client.append(99, b"last", AckLevel::Durable).unwrap().unwrap();
    assert_eq!(last.first_lsn, count + 1);
    assert!(client.take_errors().is_empty());
}
