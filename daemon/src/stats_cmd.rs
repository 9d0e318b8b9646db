//! `shardlogd stats --addr HOST:PORT`: asks a running daemon for its counters and prints them.

use std::fmt::Write;

use proto::client::Client;
use proto::wire::{ExecutorStatsT, PercentilesT, StatsReplyT};

use crate::config::StatsArgs;

pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let mut client = Client::connect(args.addr.as_str())
        .map_err(|e| anyhow::anyhow!("cannot reach shardlogd at {}: {e}", args.addr))?;
    let stats = client.stats()?;
    print!("{}", render(&stats));
    Ok(())
}

/// The daemon's side of the report: one entry per executor of this process (all started through
/// `shards::executor::spawn`, which names each thread after its executor, the name under which
/// `ring` counts the wake-ups a thread received).
pub fn executors_wire() -> Vec<ExecutorStatsT> {
    let wakeups = crate::ring::ring_wakeups_by_executor();
    shards::executor::stats()
        .into_iter()
        .map(|e| ExecutorStatsT {
            ring_wakeups: wakeups.iter().filter(|(name, _)| *name == e.name).map(|(_, n)| n).sum(),
            name: Some(e.name),
            cpu: e.cpu.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1),
            parks: e.parks,
            stalls_broken: e.stalls_broken,
            cpu_us: e.cpu_us,
        })
        .collect()
}

fn pct(p: &Option<PercentilesT>) -> String {
    match p {
        Some(p) => format!("{}/{}/{}/{}", p.p50, p.p99, p.p999, p.max),
        None => "-".to_string(),
    }
}

/// Formats a stats reply as a readable report.
pub fn render(stats: &StatsReplyT) -> String {
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
        "{:>5} {:>10} {:>10} {:>12} {:>9} {:>18} {:>22} {:>22} {:>6} {:>10} {:>5} {:>12}  state",
        "shard",
        "appends",
        "records",
        "bytes",
        "commits",
        "rec/commit",
        "bytes/commit",
        "fsync us",
        "queue",
        "durable",
        "segs",
        "seg bytes"
    );
    let _ = writeln!(
        s,
        "{:>5} {:>10} {:>10} {:>12} {:>9} {:>18} {:>22} {:>22} {:>6} {:>10} {:>5} {:>12}",
        "", "", "", "", "", "p50/p99/p999/max", "p50/p99/p999/max", "p50/p99/p999/max", "", "lsn", "", ""
    );
    for sh in stats.shards.iter().flatten() {
        let state = match &sh.poisoned {
            Some(cause) => format!("POISONED: {cause}"),
            None => "ok".to_string(),
        };
        let _ = writeln!(
            s,
            "{:>5} {:>10} {:>10} {:>12} {:>9} {:>18} {:>22} {:>22} {:>6} {:>10} {:>5} {:>12}  {}",
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
            sh.segment_bytes,
            state
        );
    }
    if let Some(executors) = &stats.executors {
        let _ = writeln!(
            s,
            "{:<16} {:>4} {:>10} {:>12} {:>13} {:>12}",
            "executor", "cpu", "parks", "ring wakeups", "stalls broken", "cpu ms"
        );
        for e in executors {
            let cpu = if e.cpu < 0 { "-".to_string() } else { e.cpu.to_string() };
            let _ = writeln!(
                s,
                "{:<16} {:>4} {:>10} {:>12} {:>13} {:>12.1}",
                e.name.as_deref().unwrap_or("?"),
                cpu,
                e.parks,
                e.ring_wakeups,
                e.stalls_broken,
                e.cpu_us as f64 / 1000.0
            );
        }
        let _ = writeln!(s, "process cpu ms: {:.1}", stats.process_cpu_us as f64 / 1000.0);
    }
    s
}
