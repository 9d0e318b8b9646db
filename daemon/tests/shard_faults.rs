//! I/O errors inside a running daemon, injected with the test-only `SHARDLOG_FAULTS` variable:
//! a failed commit poisons its shard, whose appends then fail `Poisoned` (never a false ack),
//! while the other shards keep serving; a restart without the fault recovers every record that
//! was acknowledged, and the shard takes appends again.

mod common;

use std::collections::BTreeMap;

use common::{data_dir, Daemon, DaemonOpts};
use proto::client::{Client, ReadParams};
use proto::shard_for;
use proto::wire::{AckLevel, ErrorCode};

const SHARDS: u16 = 2;
/// Commits of the faulty shard that succeed before its fault fires.
const COMMITS_BEFORE_FAULT: u64 = 20;

fn opts(faults: Option<&str>) -> DaemonOpts {
    let mut o = DaemonOpts {
        args: vec![
            "--pin".into(),
            "none".into(),
            "--shards".into(),
            SHARDS.to_string(),
            "--segment-bytes".into(),
            (1u64 << 20).to_string(),
        ],
        envs: Vec::new(),
    };
    if let Some(f) = faults {
        o = o.env("SHARDLOG_FAULTS", f);
    }
    o
}

/// A stream that the daemon places on `shard`.
fn stream_on(shard: u16) -> u64 {
    (1..)
        .find(|&s| shard_for(s, SHARDS) == shard)
        .expect("some stream lands on every shard")
}

fn read_shard(c: &mut Client, shard: u16) -> BTreeMap<u64, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut from = 1;
    loop {
        let batch = c.read(ReadParams::new(shard, from)).expect("read");
        let records = batch.records.unwrap_or_default();
        if records.is_empty() {
            return out;
        }
        for r in records {
            out.insert(r.lsn, r.payload.unwrap_or_default());
        }
        from = batch.next_lsn;
    }
}

fn poisoned_shard_is_isolated_and_recovers(fault: &str) {
    let dir = data_dir();
    let bad = 1u16;
    let good = 0u16;
    let (bad_stream, good_stream) = (stream_on(bad), stream_on(good));
    let d = Daemon::start(
        dir.path(),
        &opts(Some(&format!("shard:{bad}:{fault}:eio:after={COMMITS_BEFORE_FAULT}"))),
    );
    let mut c = d.client();
    let mut acked: BTreeMap<(u16, u64), Vec<u8>> = BTreeMap::new();
    let mut poisoned_at = None;
    for i in 0..(COMMITS_BEFORE_FAULT * 3) {
        let payload = format!("bad-shard-{i}").into_bytes();
        match c.append(bad_stream, &payload, AckLevel::Durable) {
            Ok(Some(a)) => {
                assert!(poisoned_at.is_none(), "append {i} acked after the shard was poisoned");
                assert_eq!(a.shard, bad);
                acked.insert((bad, a.first_lsn), payload);
            }
            Ok(None) => unreachable!("Durable appends are answered"),
            Err(e) => {
                assert_eq!(e.server_code(), Some(ErrorCode::Poisoned), "append {i}: {e}");
                poisoned_at.get_or_insert(i);
            }
        }
        // The other shard is unaffected, before and after.
        let payload = format!("good-shard-{i}").into_bytes();
        let a = c
            .append(good_stream, &payload, AckLevel::Durable)
            .expect("the healthy shard keeps serving")
            .expect("Appended");
        acked.insert((good, a.first_lsn), payload);
    }
    let poisoned_at = poisoned_at.expect("the fault fired");
    assert!(poisoned_at <= COMMITS_BEFORE_FAULT, "poisoned at append {poisoned_at}");
    // Every other ack level fails too.
    for ack in [AckLevel::Written, AckLevel::Durable] {
        let e = c.append(bad_stream, b"late", ack).expect_err("poisoned");
        assert_eq!(e.server_code(), Some(ErrorCode::Poisoned), "{e}");
    }
    let stats = c.stats().expect("stats");
    let shards = stats.shards.unwrap_or_default();
    assert!(
        shards.iter().any(|s| s.shard == bad && s.poisoned.is_some()),
        "stats show the poison"
    );
    assert!(shards.iter().any(|s| s.shard == good && s.poisoned.is_none()));
    // Acked data of both shards is readable while poisoned.
    for shard in [good, bad] {
        let stored = read_shard(&mut c, shard);
        for ((s, lsn), p) in acked.iter().filter(|((s, _), _)| *s == shard) {
            assert_eq!(stored.get(lsn), Some(p), "shard {s} lsn {lsn} while poisoned");
        }
    }
    drop(c);
    d.kill();

    // Restart without the fault: everything acknowledged is there, byte-identical, and the
    // poisoned shard appends again right after its recovered end.
    let d = Daemon::start(dir.path(), &opts(None));
    let mut c = d.client();
    for shard in [good, bad] {
        let stored = read_shard(&mut c, shard);
        for ((s, lsn), p) in acked.iter().filter(|((s, _), _)| *s == shard) {
            assert_eq!(stored.get(lsn), Some(p), "shard {s} lsn {lsn} after restart");
        }
        let lsns: Vec<u64> = stored.keys().copied().collect();
        assert!(
            lsns.iter().enumerate().all(|(i, &l)| l == i as u64 + 1),
            "shard {shard}: contiguous lsns"
        );
        let a = c
            .append(
                if shard == bad { bad_stream } else { good_stream },
                b"after restart",
                AckLevel::Durable,
            )
            .expect("append after restart")
            .expect("Appended");
        assert_eq!(
            a.first_lsn,
            lsns.len() as u64 + 1,
            "shard {shard} continues after its last record"
        );
    }
    drop(c);
    d.kill();
}

#[test]
fn eio_on_commit_poisons_one_shard_and_restart_recovers_it() {
    poisoned_shard_is_isolated_and_recovers("commit");
}
