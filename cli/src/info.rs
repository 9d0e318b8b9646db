//! `shardlog stats`, `shardlog ping` and `shardlog shard-of`. In a cluster, `stats` and `ping`
//! ask every daemon in turn: one that fails is reported on stderr, the others still answer, and
//! the run then exits with the first failure.

use std::time::{Duration, Instant};

use proto::shard_for;
use proto::wire::{PercentilesT, StatsReplyT};
use serde_json::{json, Value};

use crate::args::{PingArgs, ShardOfArgs};
use crate::cluster::Cluster;
use crate::failure::Failure;
use crate::output::Out;

pub fn stats(mut cluster: Cluster, json: bool) -> Result<(), Failure> {
    let mut out = Out::new();
    let mut first_failure = None;
    for daemon in 0..cluster.daemon_count() {
        let stats = match cluster.with(daemon, |c| Ok(c.routed().stats()?)) {
            Ok(s) => s,
            Err(f) if !cluster.is_cluster() => return Err(f),
            Err(f) => {
                eprintln!("shardlog: error: {}", crate::failure::describe(&f));
                first_failure.get_or_insert(f);
                continue;
            }
        };
        let addr = cluster.addr(daemon).to_string();
        if json {
            let mut v = stats_json(&stats);
            if cluster.is_cluster() {
                v["daemon"] = json!(daemon);
                v["addr"] = json!(addr);
            }
            out.json(&v)?;
        } else {
            if cluster.is_cluster() {
                out.line(&format!("daemon {daemon} ({addr}):"))?;
            }
            out.bytes(proto::report::render_stats(&stats).as_bytes())?;
        }
        out.flush()?;
    }
    first_failure.map_or(Ok(()), Err)
}

fn pct_json(p: &Option<PercentilesT>) -> Value {
    match p {
        Some(p) => json!({ "p50": p.p50, "p99": p.p99, "p999": p.p999, "max": p.max }),
        None => Value::Null,
    }
}

/// The whole `StatsReply` as one JSON object; keys are the schema's field names.
fn stats_json(s: &StatsReplyT) -> Value {
    let front = s.front.as_ref().map(|f| {
        json!({
            "connections": f.connections,
            "connections_total": f.connections_total,
            "frames_in": f.frames_in,
            "frames_out": f.frames_out,
            "protocol_errors": f.protocol_errors,
            "bytes_in": f.bytes_in,
            "bytes_out": f.bytes_out,
        })
    });
    let shards: Vec<Value> = s
        .shards
        .iter()
        .flatten()
        .map(|sh| {
            json!({
                "shard": sh.shard,
                "appends": sh.appends,
                "records": sh.records,
                "bytes": sh.bytes,
                "commits": sh.commits,
                "records_per_commit": pct_json(&sh.records_per_commit),
                "bytes_per_commit": pct_json(&sh.bytes_per_commit),
                "fsync_latency_us": pct_json(&sh.fsync_latency_us),
                "queue_depth": sh.queue_depth,
                "durable_lsn": sh.durable_lsn,
                "segment_count": sh.segment_count,
                "segment_bytes": sh.segment_bytes,
                "stream_index_bytes": sh.stream_index_bytes,
                "stream_tail_bytes": sh.stream_tail_bytes,
                "stream_runs_bytes_written": sh.stream_runs_bytes_written,
                "scrub_bad_stream_indexes": sh.scrub_bad_stream_indexes,
                "poisoned": sh.poisoned,
            })
        })
        .collect();
    let executors: Vec<Value> = s
        .executors
        .iter()
        .flatten()
        .map(|e| {
            json!({
                "name": e.name,
                "cpu": e.cpu,
                "parks": e.parks,
                "ring_wakeups": e.ring_wakeups,
                "stalls_broken": e.stalls_broken,
                "cpu_us": e.cpu_us,
            })
        })
        .collect();
    json!({
        "front": front,
        "shards": shards,
        "executors": executors,
        "process_cpu_us": s.process_cpu_us,
    })
}

pub fn ping(mut cluster: Cluster, args: &PingArgs, json: bool) -> Result<(), Failure> {
    let mut first_failure = None;
    for daemon in 0..cluster.daemon_count() {
        if let Err(f) = ping_one(&mut cluster, daemon, args, json) {
            if f.is_broken_pipe() || !cluster.is_cluster() {
                return Err(f);
            }
            eprintln!("shardlog: error: {}", crate::failure::describe(&f));
            first_failure.get_or_insert(f);
        }
    }
    first_failure.map_or(Ok(()), Err)
}

fn ping_one(cluster: &mut Cluster, daemon: u32, args: &PingArgs, json: bool) -> Result<(), Failure> {
    let addr = cluster.addr(daemon).to_string();
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    // With --wait-secs, keep trying to connect (a daemon that is still starting).
    loop {
        match cluster.with(daemon, |_| Ok(())) {
            Ok(()) => break,
            Err(f) if is_connect(&f) && Instant::now() < deadline => std::thread::sleep(PING_RETRY),
            Err(f) => return Err(f),
        }
    }
    let mut out = Out::new();
    let mut rtts_us = Vec::new();
    for seq in 1..=args.count.max(1) {
        if seq > 1 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let started = Instant::now();
        cluster.with(daemon, |c| Ok(c.routed().ping()?))?;
        let rtt_us = started.elapsed().as_micros() as u64;
        rtts_us.push(rtt_us);
        if json {
            out.json(&json!({ "addr": addr, "seq": seq, "rtt_us": rtt_us }))?;
        } else {
            out.line(&format!(
                "pong from {addr}: seq={seq} time={:.3} ms",
                rtt_us as f64 / 1000.0
            ))?;
        }
        out.flush()?;
    }
    if !json && rtts_us.len() > 1 {
        let min = rtts_us.iter().min().copied().unwrap_or(0);
        let max = rtts_us.iter().max().copied().unwrap_or(0);
        let avg = rtts_us.iter().sum::<u64>() / rtts_us.len() as u64;
        out.line(&format!(
            "{} pings: min/avg/max = {:.3}/{:.3}/{:.3} ms",
            rtts_us.len(),
            min as f64 / 1000.0,
            avg as f64 / 1000.0,
            max as f64 / 1000.0
        ))?;
    }
    out.flush()
}

/// Pause between connection attempts of `ping --wait-secs`.
const PING_RETRY: Duration = Duration::from_millis(100);

/// Whether `f` is a failure to reach a daemon (possibly named as a cluster member's).
fn is_connect(f: &Failure) -> bool {
    match f {
        Failure::Connect { .. } => true,
        Failure::Daemon { source, .. } => is_connect(source),
        _ => false,
    }
}

/// Each stream's home. With `--shards`, every daemon is taken to have that many shards and
/// none is asked; otherwise the home daemon of each stream is asked for its shard count.
pub fn shard_of(mut cluster: Cluster, args: &ShardOfArgs, json: bool) -> Result<(), Failure> {
    let mut out = Out::new();
    for &stream in &args.streams {
        let daemon = cluster.daemon_for(stream);
        let (shard_count, address) = match args.shards {
            Some(n) => (n, None),
            None => cluster.with(daemon, |c| {
                let n = c.shard_count();
                Ok((n, c.shard_address(shard_for(stream, n)).map(str::to_string)))
            })?,
        };
        let shard = shard_for(stream, shard_count);
        let daemon_address = cluster.addr(daemon);
        if json {
            out.json(&json!({
                "stream": stream,
                "daemon": daemon,
                "daemon_address": daemon_address,
                "shard": shard,
                "shard_count": shard_count,
                "address": address,
            }))?;
        } else {
            let on = if cluster.is_cluster() {
                format!("daemon {daemon} ({daemon_address}) ")
            } else {
                String::new()
            };
            let at = address.map(|a| format!(" at {a}")).unwrap_or_default();
            out.line(&format!("stream {stream}: {on}shard {shard} of {shard_count}{at}"))?;
        }
    }
    out.flush()
}
