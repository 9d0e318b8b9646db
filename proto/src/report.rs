//! The readable form of a [`StatsReplyT`], shared by `shardlogd stats` and `shardlog stats` so
//! both print the same report.

use std::fmt::Write;

use crate::wire::{PercentilesT, StatsReplyT};

fn pct(p: &Option<PercentilesT>) -> String {
    match p {
        Some(p) => format!("{}/{}/{}/{}", p.p50, p.p99, p.p999, p.max),
        None => "-".to_string(),
    }
}

/// The front's counters, one row per shard, and one per executor when the daemon reports them.
pub fn render_stats(stats: &StatsReplyT) -> String {
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
        "{:>5} {:>10} {:>10} {:>12} {:>9} {:>16} {:>22} {:>20} {:>6} {:>11} {:>5} {:>12} {:>11}  state",
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
        "segs",
        "seg bytes",
        "index bytes"
    );
    for sh in stats.shards.iter().flatten() {
        let state = match &sh.poisoned {
            Some(cause) => format!("POISONED: {cause}"),
            None => "ok".to_string(),
        };
        let _ = writeln!(
            s,
            "{:>5} {:>10} {:>10} {:>12} {:>9} {:>16} {:>22} {:>20} {:>6} {:>11} {:>5} {:>12} {:>11}  {}",
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
            sh.stream_index_bytes,
            state
        );
    }
    let _ = writeln!(s, "(percentiles are p50/p99/p999/max)");
    let executors = stats.executors.as_deref().unwrap_or_default();
    if !executors.is_empty() {
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
    }
    if stats.process_cpu_us > 0 {
        let _ = writeln!(s, "process cpu ms: {:.1}", stats.process_cpu_us as f64 / 1000.0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ExecutorStatsT, ShardStatsT};

    #[test]
    fn a_report_names_every_shard_and_executor_and_a_poisoned_shard_says_why() {
        let stats = StatsReplyT {
            shards: Some(vec![
                ShardStatsT {
                    shard: 0,
                    durable_lsn: 41,
                    ..Default::default()
                },
                ShardStatsT {
                    shard: 1,
                    poisoned: Some("fdatasync failed: EIO".into()),
                    ..Default::default()
                },
            ]),
            executors: Some(vec![ExecutorStatsT {
                name: Some("shard-1".into()),
                cpu: -1,
                cpu_us: 2500,
                ..Default::default()
            }]),
            process_cpu_us: 12_345,
            ..Default::default()
        };
        let text = render_stats(&stats);
        let rows: Vec<&str> = text.lines().collect();
        assert!(
            rows[0].contains("durable lsn") && rows[0].contains("seg bytes") && rows[0].contains("index bytes"),
            "{text}"
        );
        assert!(rows[1].trim_start().starts_with('0') && rows[1].contains("41") && rows[1].ends_with("ok"));
        assert!(rows[2].ends_with("POISONED: fdatasync failed: EIO"), "{text}");
        assert!(text.contains("shard-1") && text.contains("2.5"), "{text}");
        assert!(text.ends_with("process cpu ms: 12.3\n"), "{text}");
    }
}
