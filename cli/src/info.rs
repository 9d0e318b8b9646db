//! `shardlog stats`, `shardlog ping` and `shardlog shard-of`.

use std::fmt::Write;
use std::time::{Duration, Instant};

use proto::shard_for;
use proto::wire::{PercentilesT, StatsReplyT};
use serde_json::{json, Value};

use crate::args::{PingArgs, ShardOfArgs};
use crate::conn::Conns;
use crate::failure::Failure;
use crate::output::Out;

pub fn stats(mut conns: Conns, json: bool) -> Result<(), Failure> {
    let stats = conns.routed().stats()?;
    let mut out = Out::new();
    if json {
        out.json(&stats_json(&stats))?;
    } else {
        out.bytes(render(&stats).as_bytes())?;
    }
    out.flush()
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

fn pct(p: &Option<PercentilesT>) -> String {
    match p {
        Some(p) => format!("{}/{}/{}/{}", p.p50, p.p99, p.p999, p.max),
        None => "-".to_string(),
    }
}

/// A readable report: the front's counters, one row per shard, one per executor when the daemon
/// reports them.
fn render(stats: &StatsReplyT) -> String {
    let mut s = String::new();
    if let Some(f) = &stats.front {
        let _ = writeln!(
            s,
            "front: connections {} (total {}), frames in {} out {}, protocol errors {}, bytes in {} out {}",
            f.connections, f.connections_total, f.frames_in, f.frames_out, f.protocol_errors, f.bytes_in, f.bytes_out
        );
    }
    let _ = writeln!(
        s,
        "{:>5} {:>10} {:>10} {:>12} {:>9} {:>16} {:>22} {:>20} {:>6} {:>11} {:>5}  state",
        "shard",
        "appends",
        "records",
        "bytes",
        "commits",
        "rec/commit",
        "bytes/commit",
        "fsync us",
        "queue",
        "durable lsn",
        "segs"
    );
    for sh in stats.shards.iter().flatten() {
        let state = match &sh.poisoned {
            Some(cause) => format!("POISONED: {cause}"),
            None => "ok".to_string(),
        };
        let _ = writeln!(
            s,
            "{:>5} {:>10} {:>10} {:>12} {:>9} {:>16} {:>22} {:>20} {:>6} {:>11} {:>5}  {}",
            sh.shard,
            sh.appends,
            sh.records,
            sh.bytes,
            sh.commits,
            pct(&sh.records_per_commit),
            pct(&sh.bytes_per_commit),
            pct(&sh.fsync_latency_us),
            sh.queue_depth,
            sh.durable_lsn,
            sh.segment_count,
            state
        );
    }
    let _ = writeln!(s, "(percentiles are p50/p99/p999/max)");
    let executors = stats.executors.as_deref().unwrap_or_default();
    if !executors.is_empty() {
        let _ = writeln!(
            s,
            "{:<16} {:>4} {:>10} {:>12} {:>8} {:>12}",
            "executor", "cpu", "parks", "ring wakeups", "stalls", "cpu us"
        );
        for e in executors {
            let cpu = if e.cpu < 0 { "-".to_string() } else { e.cpu.to_string() };
            let _ = writeln!(
                s,
                "{:<16} {:>4} {:>10} {:>12} {:>8} {:>12}",
                e.name.as_deref().unwrap_or("?"),
                cpu,
                e.parks,
                e.ring_wakeups,
                e.stalls_broken,
                e.cpu_us
            );
        }
    }
    if stats.process_cpu_us > 0 {
        let _ = writeln!(s, "process cpu us: {}", stats.process_cpu_us);
    }
    s
}

pub fn ping(mut conns: Conns, args: &PingArgs, json: bool) -> Result<(), Failure> {
    let addr = conns.addr().to_string();
    let mut out = Out::new();
    let mut rtts_us = Vec::new();
    for seq in 1..=args.count.max(1) {
        if seq > 1 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let started = Instant::now();
        conns.routed().ping()?;
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

/// `conns` is `None` when `--shards` makes asking a daemon unnecessary.
pub fn shard_of(conns: Option<Conns>, args: &ShardOfArgs, json: bool) -> Result<(), Failure> {
    let shard_count = match (&conns, args.shards) {
        (_, Some(n)) => n,
        (Some(c), None) => c.shard_count(),
        (None, None) => unreachable!("shard_of without --shards needs a connection"),
    };
    let mut out = Out::new();
    for &stream in &args.streams {
        let shard = shard_for(stream, shard_count);
        let address = conns.as_ref().and_then(|c| c.shard_address(shard));
        if json {
            out.json(&json!({
                "stream": stream,
                "shard": shard,
                "shard_count": shard_count,
                "address": address,
            }))?;
        } else {
            let at = address.map(|a| format!(" at {a}")).unwrap_or_default();
            out.line(&format!("stream {stream}: shard {shard} of {shard_count}{at}"))?;
        }
    }
    out.flush()
}
