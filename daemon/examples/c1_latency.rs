//! One client, one durable append at a time: the routed path against the shard-aware one.
//!
//! ```text
//! cargo run --release -p daemon --example c1_latency -- ADDR routed|aware SECS [DAEMON_PID]
//! ```
//!
//! Prints appends/s, latency percentiles, and with the daemon's pid its CPU per record (utime +
//! stime from /proc over the run, divided by the records acknowledged) and its voluntary context
//! switches per record, summed over its threads: each is one executor going to sleep, so it
//! counts parks (and the blocking threads' sleeps, which are idle here).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::client::{Client, ShardAwareClient};
use proto::wire::AckLevel;

const PAYLOAD_BYTES: usize = 100;
const WARMUP: Duration = Duration::from_millis(500);

enum Conn {
    Routed(Box<Client>),
    Aware(ShardAwareClient),
}

impl Conn {
    fn append(&mut self, stream: u64, payload: &[u8]) -> anyhow::Result<()> {
        let acked = match self {
            Conn::Routed(c) => c.append(stream, payload, AckLevel::Durable)?,
            Conn::Aware(c) => c.append(stream, payload, AckLevel::Durable)?,
        };
        acked.context("a durable append is answered")?;
        Ok(())
    }
}

/// (CPU microseconds, voluntary context switches) of process `pid` so far.
fn daemon_usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit(") ").next().context("stat")?.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `fields` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        switches += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok((ticks * 1_000_000 / hz, switches))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: c1_latency ADDR routed|aware SECS [DAEMON_PID]");
    }
    let addr = args[0].as_str();
    let secs: f64 = args[2].parse().context("SECS")?;
    let pid: Option<u32> = args.get(3).map(|p| p.parse()).transpose().context("DAEMON_PID")?;
    let mut conn = match args[1].as_str() {
        "routed" => Conn::Routed(Box::new(Client::connect(addr)?)),
        "aware" => {
            let c = ShardAwareClient::connect(addr)?;
            if !c.is_shard_aware() {
                bail!("the server lists no shard addresses");
            }
            Conn::Aware(c)
        }
        other => bail!("mode {other:?}: expected routed or aware"),
    };
    let payload = vec![0x5a; PAYLOAD_BYTES];
    let stream = 1;
    let warm = Instant::now();
    while warm.elapsed() < WARMUP {
        conn.append(stream, &payload)?;
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let before = pid.map(daemon_usage).transpose()?;
    let started = Instant::now();
    let run = Duration::from_secs_f64(secs);
    while started.elapsed() < run {
        let t = Instant::now();
        conn.append(stream, &payload)?;
        hist.record(t.elapsed().as_micros() as u64)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = hist.len();
    print!(
        "mode={} records={n} rate={:.0}/s p50={}us p99={}us p999={}us",
        args[1],
        n as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999)
    );
    if let (Some(pid), Some((cpu0, sw0))) = (pid, before) {
        let (cpu1, sw1) = daemon_usage(pid)?;
        print!(
            " daemon_cpu_per_record={:.0}us daemon_sleeps_per_record={:.2}",
            (cpu1 - cpu0) as f64 / n as f64,
            (sw1 - sw0) as f64 / n as f64
        );
    }
    println!();
    Ok(())
}
