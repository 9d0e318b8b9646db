//! `shardlogd stats --addr HOST:PORT`: asks a running daemon for its counters and prints them.

use proto::client::Client;
use proto::wire::ExecutorStatsT;

use crate::config::StatsArgs;

pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let mut client = Client::connect(args.addr.as_str())
        .map_err(|e| anyhow::anyhow!("cannot reach shardlogd at {}: {e}", args.addr))?;
    let stats = client.stats()?;
    print!("{}", proto::report::render_stats(&stats));
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
