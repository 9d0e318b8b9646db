//! Shard-aware connections: each shard's own address (`HelloOk.shard_addresses`), appends, reads
//! and long-polls served on the owning shard's core, requests for other shards forwarded, and the
//! routed and shard-aware paths serving the same data.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{data_dir, Daemon, DaemonOpts};
use proto::client::{AsyncShardAwareClient, Client, ReadParams, ShardAwareClient};
use proto::codec::AppendRecord;
use proto::shard_for;
use proto::wire::{AckLevel, ErrorCode};

const SHARDS: u16 = 3;

fn connect(addr: &str) -> Client {
    let c = Client::connect(addr).expect("connect to a shard address");
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    c
}

/// Each shard's address, from a routed connection's `HelloOk`.
fn shard_addresses(d: &Daemon) -> Vec<String> {
    let c = d.client();
    let hello = c.server_hello().expect("hello").clone();
    hello.shard_addresses.expect("shard addresses offered by default")
}

/// A stream owned by `shard`, at least `from`.
fn stream_of(shard: u16, from: u64) -> u64 {
    (from..).find(|&s| shard_for(s, SHARDS) == shard).expect("some stream")
}

/// Every durable record of `shard` as (lsn, stream, payload).
fn read_all(client: &mut Client, shard: u16) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let batch = client.read(ReadParams::new(shard, from)).expect("read");
        let records = batch.records.unwrap_or_default();
        if records.is_empty() {
            return out;
        }
        for r in records {
            out.push((r.lsn, r.stream, r.payload.unwrap_or_default()));
        }
        assert!(batch.next_lsn > from);
        from = batch.next_lsn;
    }
}

#[test]
fn hello_lists_one_reachable_address_per_shard() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let addresses = shard_addresses(&d);
    assert_eq!(addresses.len(), SHARDS as usize);
    let mut ports: Vec<u16> = addresses
        .iter()
        .map(|a| {
            let addr: SocketAddr = a.parse().expect("host:port");
            assert_eq!(addr.ip(), d.addr.ip(), "the address the client connected to");
            addr.port()
        })
        .collect();
    ports.push(d.addr.port());
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), SHARDS as usize + 1, "distinct ports: {addresses:?}");
    for a in &addresses {
        let mut c = connect(a);
        c.ping().expect("a shard's address answers");
        // A shard's connection lists the same map.
        assert_eq!(c.server_hello().unwrap().shard_addresses.as_ref(), Some(&addresses));
    }
}

#[test]
fn appends_on_the_owners_connection_are_read_back_on_both_paths() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let addresses = shard_addresses(&d);
    let mut expected: BTreeMap<u16, Vec<(u64, u64, Vec<u8>)>> = BTreeMap::new();
    for shard in 0..SHARDS {
        let mut c = connect(&addresses[shard as usize]);
        let stream = stream_of(shard, 100);
        for i in 0..5u64 {
            let payload = format!("s{shard}-{i}").into_bytes();
            let ack = c
                .append(stream, &payload, AckLevel::Durable)
                .unwrap()
                .expect("Appended");
            assert_eq!(ack.shard, shard);
            assert_eq!(ack.first_lsn, i + 1, "lsns have no gaps");
            expected
                .entry(shard)
                .or_default()
                .push((ack.first_lsn, stream, payload));
        }
        // Read back on the shard's own connection.
        assert_eq!(read_all(&mut c, shard), expected[&shard]);
    }
    // The routed path serves the same records.
    let mut routed = d.client();
    for shard in 0..SHARDS {
        assert_eq!(read_all(&mut routed, shard), expected[&shard]);
    }
}

#[test]
fn appends_for_another_shard_are_forwarded_in_order() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let addresses = shard_addresses(&d);
    let mut on_zero = connect(&addresses[0]);
    let mine = stream_of(0, 1);
    let theirs = stream_of(1, 1);
    // Pipelined, interleaving the owned stream and a forwarded one on one connection: each
    // stream's appends keep the order sent.
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let stream = if i % 2 == 0 { mine } else { theirs };
        let payload = format!("{stream}-{i}").into_bytes();
        let id = on_zero
            .send_append(stream, &[AppendRecord::new(&payload)], AckLevel::Durable)
            .unwrap();
        ids.push((id, stream, payload));
    }
    for (id, stream, _) in &ids {
        let resp = on_zero.wait(*id).unwrap();
        let proto::wire::ResponseBodyT::Appended(a) = resp.body else {
            panic!("append {id} answered {:?}", resp.body);
        };
        assert_eq!(
            a.shard,
            shard_for(*stream, SHARDS),
            "the owner appends, wherever it arrived"
        );
    }
    let want = |shard: u16| -> Vec<Vec<u8>> {
        ids.iter()
            .filter(|(_, s, _)| shard_for(*s, SHARDS) == shard)
            .map(|(_, _, p)| p.clone())
            .collect()
    };
    let payloads = |recs: Vec<(u64, u64, Vec<u8>)>| recs.into_iter().map(|r| r.2).collect::<Vec<_>>();
    // Shard 1's records, read on shard 0's connection (a forwarded read), on shard 1's own
    // connection, and on the routed one, all agree.
    assert_eq!(payloads(read_all(&mut on_zero, 1)), want(1));
    assert_eq!(payloads(read_all(&mut connect(&addresses[1]), 1)), want(1));
    assert_eq!(payloads(read_all(&mut d.client(), 1)), want(1));
    assert_eq!(payloads(read_all(&mut d.client(), 0)), want(0));
    // Stats on a shard's connection gathers every shard.
    let stats = on_zero.stats().unwrap();
    assert_eq!(stats.shards.unwrap().len(), SHARDS as usize);
    // A read of a shard that does not exist is refused the same way as on the routed path.
    let err = on_zero.read(ReadParams::new(SHARDS, 1)).unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchShard));
}

#[test]
fn a_long_poll_on_a_shards_connection_returns_when_a_record_becomes_durable() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let addresses = shard_addresses(&d);
    let shard = 2;
    let stream = stream_of(shard, 1);
    let mut watcher = d.client();
    let frames_in = |c: &mut Client| c.stats().unwrap().front.unwrap().frames_in;
    let before = frames_in(&mut watcher);
    let poller_addr = addresses[shard as usize].clone();
    let poller = std::thread::spawn(move || {
        let mut c = connect(&poller_addr);
        let params = ReadParams {
            max_wait_ms: 60_000,
            ..ReadParams::new(shard, 1)
        };
        c.read(params).expect("long poll")
    });
    // Append only once the daemon has received the poller's Hello and Read (besides the stats
    // requests of this loop), so the poll finds nothing and must wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for asked in 1.. {
        if frames_in(&mut watcher) >= before + asked + 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the long poll never reached the daemon"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!poller.is_finished(), "nothing was durable, so the poll waits");
    let mut writer = connect(&addresses[shard as usize]);
    writer.append(stream, b"wake", AckLevel::Durable).unwrap();
    let batch = poller.join().expect("poller");
    let records = batch.records.unwrap_or_default();
    assert_eq!(records.len(), 1, "the poll answers with the new record");
    assert_eq!(records[0].payload.as_deref(), Some(&b"wake"[..]));
    assert_eq!(batch.shard, shard);
}

#[test]
fn the_shard_aware_clients_route_by_placement_and_agree_with_the_routed_path() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let mut aware = ShardAwareClient::connect(d.addr).unwrap();
    assert!(aware.is_shard_aware());
    assert_eq!(aware.shard_count(), SHARDS);
    let mut sent: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
    for stream in 0..12u64 {
        let payload = format!("blocking-{stream}").into_bytes();
        let ack = aware.append(stream, &payload, AckLevel::Durable).unwrap().unwrap();
        assert_eq!(ack.shard, shard_for(stream, SHARDS));
        sent.entry(ack.shard).or_default().push(payload);
    }
    // The pipelined client, from a glommio executor.
    let addr = d.addr;
    let async_acks = glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let c = AsyncShardAwareClient::connect(addr).await.expect("connect");
            assert!(c.is_shard_aware());
            let mut acks = Vec::new();
            for stream in 12..24u64 {
                let payload = format!("pipelined-{stream}").into_bytes();
                let ack = c
                    .append(stream, &[AppendRecord::new(&payload)], AckLevel::Durable)
                    .await
                    .expect("append")
                    .expect("Appended");
                acks.push((ack.shard, payload));
            }
            let stats = c.stats().await.expect("stats");
            assert_eq!(stats.shards.map(|s| s.len()), Some(SHARDS as usize));
            c.close();
            acks
        })
        .unwrap()
        .join()
        .unwrap();
    for (shard, payload) in async_acks {
        sent.entry(shard).or_default().push(payload);
    }
    let mut routed = d.client();
    for shard in 0..SHARDS {
        let via_routed: Vec<Vec<u8>> = read_all(&mut routed, shard).into_iter().map(|r| r.2).collect();
        let via_aware: Vec<Vec<u8>> = {
            let mut out = Vec::new();
            let batch = aware.read(ReadParams::new(shard, 1)).unwrap();
            out.extend(
                batch
                    .records
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r.payload.unwrap_or_default()),
            );
            out
        };
        assert_eq!(via_routed, sent[&shard]);
        assert_eq!(via_aware, sent[&shard]);
    }
}

#[test]
fn with_shard_ports_off_hello_lists_none_and_the_client_falls_back_to_routing() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2).arg("--shard-ports").arg("off"));
    assert_eq!(d.client().server_hello().unwrap().shard_addresses, None);
    let mut c = ShardAwareClient::connect(d.addr).unwrap();
    assert!(!c.is_shard_aware());
    for stream in 0..4 {
        let ack = c.append(stream, b"x", AckLevel::Durable).unwrap().unwrap();
        assert_eq!(ack.shard, shard_for(stream, 2));
    }
}

#[test]
fn without_a_dedicated_front_every_shard_accepts_on_the_main_address() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS).arg("--front-cores").arg("0"));
    // Routed connections land on some shard executor and are forwarded as needed.
    let mut routed = d.client();
    let mut aware = ShardAwareClient::connect(d.addr).unwrap();
    assert!(aware.is_shard_aware());
    for stream in 0..9u64 {
        let a = routed.append(stream, b"routed", AckLevel::Durable).unwrap().unwrap();
        let b = aware.append(stream, b"aware", AckLevel::Durable).unwrap().unwrap();
        assert_eq!(a.shard, b.shard);
        assert_eq!(b.first_lsn, a.first_lsn + 1, "one stream, one order, whichever path");
    }
    let total: usize = (0..SHARDS).map(|s| read_all(&mut routed, s).len()).sum();
    assert_eq!(total, 18);
}

#[test]
fn sigterm_with_requests_in_flight_on_shard_connections_exits_cleanly() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let addresses = shard_addresses(&d);
    let mut conns: Vec<Client> = addresses.iter().map(|a| connect(a)).collect();
    // Each connection has owned and forwarded appends in flight, and a long poll.
    let mut pending = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        for stream in 0..6u64 {
            let id = c
                .send_append(stream, &[AppendRecord::new(b"late")], AckLevel::Durable)
                .unwrap();
            pending.push((i, id));
        }
        let params = ReadParams {
            max_wait_ms: 60_000,
            ..ReadParams::new(i as u16, 1_000)
        };
        pending.push((i, c.send(long_poll_body(&params)).unwrap()));
    }
    // Everything sent before the signal that the daemon read is answered; what it had not read
    // may be dropped. Either way the daemon exits 0 and acked records survive.
    let mut acked = 0;
    for (i, id) in pending.iter().take(1) {
        // At least one answer proves the requests reached the daemon before the signal.
        let resp = conns[*i].wait(*id).unwrap();
        assert!(matches!(resp.body, proto::wire::ResponseBodyT::Appended(_)));
        acked += 1;
    }
    d.signal(libc::SIGTERM);
    for (i, id) in pending.iter().skip(1) {
        // An error is a connection the daemon closed after answering all it had read.
        if let Ok(resp) = conns[*i].wait(*id) {
            if matches!(resp.body, proto::wire::ResponseBodyT::Appended(_)) {
                acked += 1;
            }
        }
    }
    wait_for_exit(&d, Duration::from_secs(60));
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(SHARDS));
    let mut c = d.client();
    let total: usize = (0..SHARDS).map(|s| read_all(&mut c, s).len()).sum();
    assert!(total >= acked, "{total} records after restart, {acked} acked");
}

/// Waits until the daemon has exited (a zombie), failing if shutdown hangs.
fn wait_for_exit(d: &Daemon, guard: Duration) {
    let deadline = std::time::Instant::now() + guard;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat.rsplit(") ").next().and_then(|rest| rest.chars().next());
        if state == Some('Z') || stat.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not exit within {guard:?} of SIGTERM:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn long_poll_body(p: &ReadParams) -> proto::wire::RequestBodyT {
    proto::wire::RequestBodyT::Read(Box::new(proto::wire::ReadT {
        shard: p.shard,
        from_lsn: p.from_lsn,
        max_bytes: p.max_bytes,
        max_wait_ms: p.max_wait_ms,
        stream: 0,
        has_stream: false,
    }))
}
