//! Three daemons on loopback, each with its own data directory, used as one cluster through
//! `proto::client::ClusterClient`: records land on their homes (checked by reading every shard
//! of every daemon directly), and a daemon killed with SIGKILL fails only its own streams, with
//! an error naming it, while the others keep serving.

mod common;

use common::{data_dir, Daemon, DaemonOpts};
use proto::client::{ClusterClient, ClusterError, ReadParams};
use proto::wire::AckLevel;
use proto::{daemon_for, shard_for, ClientError};
use std::collections::BTreeMap;
use std::time::Duration;

const DAEMONS: usize = 3;
/// Different shard counts per daemon: a home's shard is computed with its own daemon's count.
const SHARDS: [u16; DAEMONS] = [2, 3, 1];
const STREAMS: u64 = 48;
const RECORDS_PER_STREAM: u64 = 3;

struct Cluster {
    daemons: Vec<Option<Daemon>>,
    _dirs: Vec<tempfile::TempDir>,
    addrs: Vec<String>,
}

fn start_cluster() -> Cluster {
    let dirs: Vec<_> = (0..DAEMONS).map(|_| data_dir()).collect();
    let daemons: Vec<Option<Daemon>> = dirs
        .iter()
        .zip(SHARDS)
        .map(|(dir, shards)| Some(Daemon::start(dir.path(), &DaemonOpts::shards(shards))))
        .collect();
    let addrs = daemons
        .iter()
        .map(|d| d.as_ref().expect("running").addr.to_string())
        .collect();
    Cluster {
        daemons,
        _dirs: dirs,
        addrs,
    }
}

fn cluster_client(addrs: &[String]) -> ClusterClient {
    ClusterClient::new(addrs.iter().cloned())
        .expect("a cluster of three")
        .with_read_timeout(Some(Duration::from_secs(120)))
}

fn payload(stream: u64, i: u64) -> Vec<u8> {
    format!("stream {stream} record {i}").into_bytes()
}

/// Every record of every shard of `daemon`, read directly from it: (stream, shard, payload).
fn read_all(daemon: &Daemon, shards: u16) -> Vec<(u64, u16, Vec<u8>)> {
    let mut client = daemon.client();
    let mut out = Vec::new();
    for shard in 0..shards {
        let mut from = 1;
        loop {
            let batch = client.read(ReadParams::new(shard, from)).expect("read a shard");
            let records = batch.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            for r in records {
                out.push((r.stream, shard, r.payload.unwrap_or_default()));
            }
            from = batch.next_lsn;
        }
    }
    out
}

#[test]
fn records_land_on_their_homes() {
    let cluster = start_cluster();
    let mut c = cluster_client(&cluster.addrs);
    for stream in 0..STREAMS {
        let (daemon, shard) = c.home_for(stream).expect("home");
        assert_eq!(daemon, daemon_for(stream, DAEMONS as u32));
        assert_eq!(shard, shard_for(stream, SHARDS[daemon as usize]));
        for i in 0..RECORDS_PER_STREAM {
            let ack = c
                .append(stream, &payload(stream, i), AckLevel::Durable)
                .expect("append")
                .expect("a durable ack");
            assert_eq!(ack.shard, shard, "stream {stream} acked on shard {}", ack.shard);
        }
    }

    let mut per_daemon = [0u64; DAEMONS];
    let mut seen: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (d, daemon) in cluster.daemons.iter().enumerate() {
        let daemon = daemon.as_ref().expect("running");
        for (stream, shard, body) in read_all(daemon, SHARDS[d]) {
            assert_eq!(
                (daemon_for(stream, DAEMONS as u32), shard_for(stream, SHARDS[d])),
                (d as u32, shard),
                "stream {stream} found on daemon {d} shard {shard}, which is not its home"
            );
            per_daemon[d] += 1;
            seen.entry(stream).or_default().push(body);
        }
    }
    for stream in 0..STREAMS {
        let want: Vec<Vec<u8>> = (0..RECORDS_PER_STREAM).map(|i| payload(stream, i)).collect();
        assert_eq!(seen.get(&stream), Some(&want), "stream {stream}'s records, in order");
    }
    // 48 streams over 3 daemons: each holds some (placement spreads them).
    assert!(per_daemon.iter().all(|&n| n > 0), "records per daemon: {per_daemon:?}");

    // The cluster client reads a stream from its home.
    for stream in [0, 1, STREAMS - 1] {
        let batch = c.read_stream(stream, 1, 1 << 20).expect("read_stream");
        let got: Vec<Vec<u8>> = batch
            .records
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.payload.unwrap_or_default())
            .collect();
        assert_eq!(got, seen[&stream]);
    }
}

#[test]
fn a_killed_daemon_fails_only_its_streams() {
    let mut cluster = start_cluster();
    let mut c = cluster_client(&cluster.addrs);
    // Connect to every daemon first, so the kill breaks an open connection.
    for stream in 0..STREAMS {
        c.append(stream, b"before", AckLevel::Durable)
            .expect("append before the kill");
    }
    const VICTIM: u32 = 1;
    let victim_addr = cluster.addrs[VICTIM as usize].clone();
    cluster.daemons[VICTIM as usize].take().expect("running").kill();

    let (mut failed, mut served) = (0, 0);
    // Twice round: the first request to the victim meets the broken connection, the second a
    // refused reconnection; both must name it.
    for round in 0..2 {
        for stream in 0..STREAMS {
            let result = c.append(stream, format!("after {round}").as_bytes(), AckLevel::Durable);
            if daemon_for(stream, DAEMONS as u32) == VICTIM {
                let err = result.expect_err("an append to the killed daemon's stream");
                match &err {
                    ClusterError::Daemon { daemon, addr, source } => {
                        assert_eq!((*daemon, addr.as_str()), (VICTIM, victim_addr.as_str()));
                        assert!(
                            matches!(source, ClientError::Io(_) | ClientError::Closed),
                            "a connection error, not {source:?}"
                        );
                    }
                    other => panic!("expected a daemon error, got {other:?}"),
                }
                let text = err.to_string();
                assert!(
                    text.contains(&format!("daemon {VICTIM}")) && text.contains(&victim_addr),
                    "the error names the daemon: {text}"
                );
                failed += 1;
            } else {
                result.unwrap_or_else(|e| panic!("stream {stream} on a live daemon: {e}"));
                served += 1;
            }
        }
    }
    assert!(failed > 0 && served > 0, "{failed} failed, {served} served");

    // The live daemons still hold and serve everything of theirs.
    for stream in (0..STREAMS).filter(|&s| daemon_for(s, DAEMONS as u32) != VICTIM) {
        let batch = c.read_stream(stream, 1, 1 << 20).expect("read a live daemon's stream");
        let got: Vec<Vec<u8>> = batch
            .records
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.payload.unwrap_or_default())
            .collect();
        assert_eq!(got, [&b"before"[..], b"after 0", b"after 1"], "stream {stream}");
    }
}

/// The pipelined cluster client: many appends in flight from one glommio task set, each on its
/// stream's home, in order per stream.
#[test]
fn the_pipelined_cluster_client_appends_to_every_home() {
    let cluster = start_cluster();
    let addrs: Vec<std::net::SocketAddr> = cluster.addrs.iter().map(|a| a.parse().expect("addr")).collect();
    shards::executor::run(
        shards::executor::ExecutorOptions::new("async-cluster"),
        move || async move {
            let c = proto::client::AsyncClusterClient::new(addrs).expect("a cluster of three");
            let mut tasks = Vec::new();
            for stream in 0..STREAMS {
                let c = c.clone();
                tasks.push(glommio::spawn_local(async move {
                    for i in 0..RECORDS_PER_STREAM {
                        let body = payload(stream, i);
                        let rec = [proto::codec::AppendRecord::new(&body)];
                        let ack = c
                            .append(stream, &rec, AckLevel::Durable)
                            .await
                            .expect("append")
                            .expect("a durable ack");
                        assert_eq!(ack.shard, shard_for(stream, SHARDS[c.daemon_for(stream) as usize]));
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            c.close();
        },
    )
    .expect("executor ran");

    let mut streams_seen = 0;
    for (d, daemon) in cluster.daemons.iter().enumerate() {
        let daemon = daemon.as_ref().expect("running");
        let mut per_stream: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (stream, shard, body) in read_all(daemon, SHARDS[d]) {
            assert_eq!(
                daemon_for(stream, DAEMONS as u32),
                d as u32,
                "stream {stream} off its home"
            );
            assert_eq!(shard_for(stream, SHARDS[d]), shard);
            per_stream.entry(stream).or_default().push(body);
        }
        for (stream, bodies) in per_stream {
            let want: Vec<Vec<u8>> = (0..RECORDS_PER_STREAM).map(|i| payload(stream, i)).collect();
            assert_eq!(bodies, want, "stream {stream}'s records, in order");
            streams_seen += 1;
        }
    }
    assert_eq!(streams_seen, STREAMS, "every stream landed on one daemon");
}
