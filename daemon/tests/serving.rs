//! Appends, reads, tails, pipelining and stats against the real daemon.

mod common;

use std::collections::{HashMap, HashSet};

use common::{data_dir, Daemon, DaemonOpts};
use proto::client::{Client, ReadParams};
use proto::codec::AppendRecord;
use proto::shard_for;
use proto::wire::{AckLevel, ReadT, RequestBodyT, ResponseBodyT};

fn read_body(p: &ReadParams) -> RequestBodyT {
    RequestBodyT::Read(Box::new(ReadT {
        shard: p.shard,
        from_lsn: p.from_lsn,
        max_bytes: p.max_bytes,
        max_wait_ms: p.max_wait_ms,
        stream: p.stream.unwrap_or(0),
        has_stream: p.stream.is_some(),
    }))
}

/// Reads every durable record of `shard`.
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
fn append_is_acked_and_read_back_at_each_ack_level() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1));
    let mut c = d.client();
    assert_eq!(c.shard_count(), Some(1));
    c.ping().unwrap();

    let durable = c.append(7, b"durable", AckLevel::Durable).unwrap().expect("Appended");
    assert_eq!(durable.shard, 0);
    assert_eq!(durable.first_lsn, 1);
    assert_eq!(durable.count, 1);
    let written = c.append(7, b"written", AckLevel::Written).unwrap().expect("Appended");
    assert_eq!(written.first_lsn, 2);
    assert!(c.append(7, b"none", AckLevel::None).unwrap().is_none());
    // Appends are applied in the order sent, so once this one is durable, all are.
    let last = c.append(7, b"last", AckLevel::Durable).unwrap().expect("Appended");
    assert_eq!(last.first_lsn, 4);
    assert!(c.take_errors().is_empty());

    let got = read_all(&mut c, 0);
    let payloads: Vec<&[u8]> = got.iter().map(|(_, _, p)| p.as_slice()).collect();
    assert_eq!(payloads, vec![&b"durable"[..], b"written", b"none", b"last"]);
    assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(got.iter().all(|r| r.1 == 7));

    // A batch gets consecutive lsns, and timestamps come back.
    let recs = [
        AppendRecord {
            payload: b"a",
            timestamp: Some(11),
        },
        AppendRecord::new(b"b"),
    ];
    let batch = c.append_batch(9, &recs, AckLevel::Durable).unwrap().unwrap();
    assert_eq!((batch.first_lsn, batch.count), (5, 2));
    let back = c.read(ReadParams::new(0, 5)).unwrap().records.unwrap();
    assert_eq!(back[0].timestamp, 11);
    assert!(back[0].has_timestamp);
    assert!(!back[1].has_timestamp);
    assert_eq!(back[1].payload.as_deref(), Some(&b"b"[..]));
}

/// A filtered read of many tiny records from one commit: its answer (about 40 bytes of
/// FlatBuffers per record) is larger than the commit on disk (about 20 bytes per record), so the
/// stream index's read path must take room for each record's answer as it adds it, not only for
/// the chunk it parses (a debug build asserts that an answer fits what its read holds).
#[test]
fn a_filtered_read_of_many_tiny_records_from_one_commit_is_answered() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1));
    let mut c = d.client();
    let payloads: Vec<Vec<u8>> = (0..600u32).map(|i| vec![(i % 251) as u8]).collect();
    let recs: Vec<AppendRecord<'_>> = payloads.iter().map(|p| AppendRecord::new(p)).collect();
    let acked = c.append_batch(7, &recs, AckLevel::Durable).unwrap().unwrap();
    assert_eq!((acked.first_lsn, acked.count), (1, 600));
    c.append(8, b"other", AckLevel::Durable).unwrap().unwrap();
    let mut params = ReadParams::new(0, 1);
    params.stream = Some(7);
    let got = c.read(params).unwrap().records.unwrap();
    let back: Vec<Vec<u8>> = got.iter().map(|r| r.payload.clone().unwrap_or_default()).collect();
    assert_eq!(back, payloads, "every record of stream 7, in order");
    assert!(got.iter().all(|r| r.stream == 7));
    // The shard still serves.
    assert_eq!(read_all(&mut c, 0).len(), 601);
}

fn spread_across(shards: u16) {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(shards));
    let mut c = d.client();
    assert_eq!(c.shard_count(), Some(shards));
    let streams: Vec<u64> = (0..64).collect();
    let mut expect: HashMap<u16, Vec<(u64, Vec<u8>)>> = HashMap::new();
    for round in 0..3u8 {
        for &s in &streams {
            let payload = format!("s{s}-r{round}").into_bytes();
            let a = c.append(s, &payload, AckLevel::Durable).unwrap().unwrap();
            assert_eq!(a.shard, shard_for(s, shards), "stream {s} acked by the wrong shard");
            expect.entry(a.shard).or_default().push((s, payload));
        }
    }
    assert_eq!(expect.len(), shards as usize, "64 streams should reach every shard");
    for shard in 0..shards {
        let got: Vec<(u64, Vec<u8>)> = read_all(&mut c, shard).into_iter().map(|(_, s, p)| (s, p)).collect();
        assert_eq!(got, expect[&shard], "shard {shard}");
    }
    // A stream filter returns only that stream.
    let s = 5u64;
    let shard = shard_for(s, shards);
    let mut params = ReadParams::new(shard, 1);
    params.stream = Some(s);
    let only = c.read(params).unwrap().records.unwrap();
    assert_eq!(only.len(), 3);
    assert!(only.iter().all(|r| r.stream == s));
}

#[test]
fn streams_spread_over_two_shards() {
    spread_across(2);
}

#[test]
fn streams_spread_over_four_shards() {
    spread_across(4);
}

#[test]
fn front_and_shard_share_one_pinned_core() {
    let dir = data_dir();
    let opts = DaemonOpts {
        args: vec!["--cpus".into(), "0".into()],
        envs: vec![],
    };
    let d = Daemon::start(dir.path(), &opts);
    let mut c = d.client();
    assert_eq!(c.shard_count(), Some(1));
    for i in 0..20u64 {
        let a = c.append(i, b"x", AckLevel::Durable).unwrap().unwrap();
        assert_eq!(a.first_lsn, i + 1);
    }
    assert_eq!(read_all(&mut c, 0).len(), 20);
    let stats = c.stats().unwrap();
    assert_eq!(stats.shards.unwrap()[0].appends, 20);
}

#[test]
fn several_front_executors_each_route_to_every_shard() {
    let dir = data_dir();
    let opts = DaemonOpts::shards(2).arg("--front-cores").arg("2");
    let d = Daemon::start(dir.path(), &opts);
    let mut clients: Vec<Client> = (0..6).map(|_| d.client()).collect();
    let mut total = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        for s in 0..8u64 {
            c.append(s, format!("{i}").as_bytes(), AckLevel::Durable)
                .unwrap()
                .unwrap();
            total += 1;
        }
    }
    let mut c = d.client();
    let n: usize = (0..2).map(|s| read_all(&mut c, s).len()).sum();
    assert_eq!(n, total);
}

#[test]
fn pipelined_responses_come_back_out_of_order_matched_by_id() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    let mut c = d.client();
    // A long-polling read first: it can only be answered after the append sent after it.
    let stream = 3u64;
    let shard = shard_for(stream, 2);
    let mut params = ReadParams::new(shard, 1);
    params.max_wait_ms = 60_000;
    let read_id = c.send(read_body(&params)).unwrap();
    let append_id = c
        .send_append(stream, &[AppendRecord::new(b"wake")], AckLevel::Durable)
        .unwrap();
    let first = c.recv().unwrap();
    assert_eq!(first.id, append_id, "the append is answered before the earlier read");
    let second = c.recv().unwrap();
    assert_eq!(second.id, read_id);
    let ResponseBodyT::Records(records) = second.body else {
        panic!("expected Records, got {:?}", second.body)
    };
    assert_eq!(records.records.unwrap()[0].payload.as_deref(), Some(&b"wake"[..]));

    // Many requests in flight over several streams and both shards: every id answered once.
    let mut ids = HashSet::new();
    for i in 0..500u64 {
        let id = c
            .send_append(i % 17, &[AppendRecord::new(&i.to_le_bytes())], AckLevel::Durable)
            .unwrap();
        ids.insert(id);
    }
    while !ids.is_empty() {
        let r = c.recv().unwrap();
        assert!(matches!(r.body, ResponseBodyT::Appended(_)), "{:?}", r.body);
        assert!(ids.remove(&r.id), "unexpected or duplicate id {}", r.id);
    }
}

#[test]
fn one_stream_keeps_the_order_it_was_sent_in() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    let mut c = d.client();
    let stream = 42u64;
    let mut sent = Vec::new();
    for i in 0..1000u32 {
        let ack = if i % 3 == 0 {
            AckLevel::Written
        } else {
            AckLevel::Durable
        };
        sent.push(
            c.send_append(stream, &[AppendRecord::new(&i.to_le_bytes())], ack)
                .unwrap(),
        );
    }
    let mut lsn_of = HashMap::new();
    for _ in 0..sent.len() {
        let r = c.recv().unwrap();
        let ResponseBodyT::Appended(a) = r.body else {
            panic!("{:?}", r.body)
        };
        lsn_of.insert(r.id, a.first_lsn);
    }
    let lsns: Vec<u64> = sent.iter().map(|id| lsn_of[id]).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "lsns follow send order");
    let got = read_all(&mut c, shard_for(stream, 2));
    let values: Vec<u32> = got
        .iter()
        .map(|(_, _, p)| u32::from_le_bytes(p.as_slice().try_into().unwrap()))
        .collect();
    assert_eq!(values, (0..1000).collect::<Vec<_>>());
}

#[test]
fn tail_long_poll_wakes_when_a_record_becomes_durable() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    let stream = 77u64;
    let shard = shard_for(stream, 2);
    let mut writer = d.client();
    writer.append(stream, b"before", AckLevel::Durable).unwrap();
    let addr = d.addr;
    let tailer = std::thread::spawn(move || {
        let mut c = Client::connect(addr).unwrap();
        let mut tail = c.tail(shard, 1, Some(stream));
        let mut got = Vec::new();
        while got.len() < 3 {
            let r = tail.next().unwrap().unwrap();
            got.push(r.payload.unwrap());
        }
        got
    });
    // The tailer long-polls once it has "before"; these wake it.
    writer.append(stream, b"one", AckLevel::Durable).unwrap();
    writer.append(stream, b"two", AckLevel::Durable).unwrap();
    let got = tailer.join().unwrap();
    assert_eq!(got, vec![b"before".to_vec(), b"one".to_vec(), b"two".to_vec()]);

    // A long poll with nothing to find answers empty at its deadline.
    let mut c = d.client();
    let mut params = ReadParams::new(shard, 1000);
    params.max_wait_ms = 50;
    let r = c.read(params).unwrap();
    assert!(r.records.unwrap_or_default().is_empty());
}

#[test]
fn stats_count_appends_and_the_cli_prints_them() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    let mut c = d.client();
    let mut per_shard = [0u64; 2];
    for s in 0..10u64 {
        c.append(s, &[0u8; 100], AckLevel::Durable).unwrap();
        per_shard[shard_for(s, 2) as usize] += 1;
    }
    let stats = c.stats().unwrap();
    let front = stats.front.unwrap();
    assert_eq!(front.connections, 1);
    assert!(front.frames_in >= 12, "hello + 10 appends + stats");
    assert!(front.bytes_in > 1000);
    assert!(front.bytes_out > 0);
    assert_eq!(front.protocol_errors, 0);
    let shards = stats.shards.unwrap();
    assert_eq!(shards.len(), 2);
    for s in &shards {
        assert_eq!(s.appends, per_shard[s.shard as usize]);
        assert_eq!(s.records, per_shard[s.shard as usize]);
        assert_eq!(s.durable_lsn, per_shard[s.shard as usize]);
        assert!(s.commits >= 1 && s.commits <= s.appends);
        assert!(s.poisoned.is_none());
        assert!(s.fsync_latency_us.as_ref().unwrap().max > 0);
        assert!(s.segment_count >= 1);
    }
    // Every executor of the daemon, each having run and slept; the process used at least what
    // its executors did.
    let executors = stats.executors.expect("executor stats");
    assert!(executors.len() >= 2, "{executors:?}");
    for e in &executors {
        assert!(e.name.as_deref().is_some_and(|n| !n.is_empty()), "{e:?}");
        assert!(e.cpu_us > 0 && e.parks > 0, "{e:?}");
    }
    // Routed appends crossed to the shard executors over rings, waking them from their parks.
    let ring_wakeups: u64 = executors.iter().map(|e| e.ring_wakeups).sum();
    assert!(ring_wakeups > 0, "{executors:?}");
    let executors_cpu_us: u64 = executors.iter().map(|e| e.cpu_us).sum();
    assert!(
        stats.process_cpu_us >= executors_cpu_us,
        "{} < {executors_cpu_us}",
        stats.process_cpu_us
    );

    let out = std::process::Command::new(common::BIN)
        .args(["stats", "--addr", &d.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("front: connections"), "{text}");
    assert!(text.contains("fsync us"), "{text}");
    assert!(
        text.contains("stalls broken") && text.contains("process cpu ms"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.trim_end().ends_with("ok")).count(),
        2,
        "{text}"
    );
}

#[test]
fn linked_durability_mode_serves_appends_and_reads() {
    let dir = data_dir();
    let opts = DaemonOpts::shards(2).arg("--durability").arg("linked");
    let d = Daemon::start(dir.path(), &opts);
    let mut c = d.client();
    for s in 0..20u64 {
        let a = c
            .append(s, format!("linked {s}").as_bytes(), AckLevel::Durable)
            .unwrap()
            .unwrap();
        assert_eq!(a.shard, shard_for(s, 2));
    }
    let n: usize = (0..2).map(|shard| read_all(&mut c, shard).len()).sum();
    assert_eq!(n, 20);
}
