//! A run: the threads, the live report, and the final one.
//!
//! Each thread runs one event loop over its share of the connections
//! ([`crate::worker`]); the main thread only prints the live line and, at the
//! end, merges the threads' counts into the report. Only the live ticks and
//! the final results cross threads, as owned values.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{Ack, RunArgs, StreamDist};
use crate::cpu::ProcessCpu;
use crate::report::{fmt_us, CpuReport, DrainReport, Report, ReportConfig, REPORT_VERSION};
use crate::stats::{LatencySummary, Tally};
use crate::streams::StreamChooser;
use crate::verify_log::VerifyLogWriter;
use crate::worker::{thread_main, Msg, Shared, ThreadCtx, ThreadPlan};

/// How often the live line is printed.
const PRINT_INTERVAL: Duration = Duration::from_secs(1);

/// Exit status when every connection was lost before the run's end.
pub const EXIT_CONNECTIONS_LOST: i32 = 2;

/// The result of a run: the report and the merged latency histogram.
pub struct RunOutcome {
    pub report: Report,
    pub latency: hdrhistogram::Histogram<u64>,
}

/// Live output: an indicatif bar on a terminal, plain lines otherwise.
struct Live {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    started: Instant,
}

impl Live {
    fn new(args: &RunArgs) -> Live {
        let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
            let (len, unit) = match args.requests {
                Some(n) => (n, "req"),
                None => ((args.warmup + args.duration).as_secs().max(1), "s"),
            };
            let bar = indicatif::ProgressBar::new(len);
            let template = format!("{{elapsed:>4}} [{{bar:24}}] {{pos}}/{{len}}{unit} {{msg}}");
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Live {
            bar,
            quiet: args.quiet,
            started: Instant::now(),
        }
    }

    fn line(&self, iv: &Tally, secs: f64, requests_done: u64, by_requests: bool) {
        if self.quiet {
            return;
        }
        let lat = LatencySummary::of(&iv.latency)
            .map(|l| format!("p50 {:>7} p99 {:>7}", fmt_us(l.p50), fmt_us(l.p99)))
            .unwrap_or_else(|| "p50       - p99       -".into());
        let msg = format!(
            "{:>9.0} rec/s {:>8.1} MB/s {lat} errors {}",
            iv.records as f64 / secs,
            iv.bytes as f64 / secs / 1e6,
            iv.errors_total()
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(if by_requests {
                    requests_done
                } else {
                    self.started.elapsed().as_secs()
                });
                bar.set_message(msg);
            }
            None => eprintln!("[{:>5.1}s] {msg}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn seed_from_clock() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    proto::placement::mix64(nanos ^ u64::from(std::process::id()))
}

/// Asks each main address for its shard addresses (one `Hello` each), unless `--routed`.
/// An address that offers none, or cannot be reached now, keeps its connections on it (the
/// threads then report the failure per connection).
fn probe_routes(args: &RunArgs) -> HashMap<std::net::SocketAddr, Option<Vec<std::net::SocketAddr>>> {
    let mut routes = HashMap::new();
    for &addr in &args.addrs {
        if args.routed || routes.contains_key(&addr) {
            routes.insert(addr, None);
            continue;
        }
        let route = match crate::connect::connect(addr, args.connect_timeout) {
            Ok((_, hello)) => match crate::connect::shard_addresses(&hello) {
                Ok(route) => route,
                Err(e) => {
                    eprintln!("shardlog-bench: {addr}: {e}; sending every append to {addr}");
                    None
                }
            },
            Err(_) => None,
        };
        routes.insert(addr, route);
    }
    routes
}

/// Runs the load described by `args` and returns the report.
pub fn run(args: RunArgs) -> anyhow::Result<RunOutcome> {
    args.validate().map_err(anyhow::Error::msg)?;
    let seed = args.seed.unwrap_or_else(seed_from_clock);
    let run_id = proto::placement::mix64(seed) as u32;
    let chooser = Arc::new(match args.stream_dist {
        StreamDist::Uniform => StreamChooser::uniform(args.stream_base, args.streams),
        StreamDist::Zipf => StreamChooser::zipf(args.stream_base, args.streams, args.zipf_exponent),
    });
    let args = Arc::new(args);
    let shared = Arc::new(Shared {
        timing: OnceLock::new(),
        barrier: Barrier::new(args.threads),
        requests_left: args.requests.map(AtomicU64::new),
        stop: AtomicBool::new(false),
        stop_reason: Mutex::new(None),
    });
    if !args.quiet {
        eprintln!(
            "shardlog-bench: seed {seed}, run id {run_id:08x}, {} connections on {} threads",
            args.connections, args.threads
        );
    }
    let routes = Arc::new(probe_routes(&args));

    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for thread in 0..args.threads {
        let plan = ThreadPlan {
            connections: (0..args.connections)
                .filter(|c| c % args.threads == thread)
                .map(|c| c as u32)
                .collect(),
            seed: seed.wrapping_add(thread as u64),
        };
        let log = match &args.verify_log {
            Some(path) => Some(VerifyLogWriter::open(path)?),
            None => None,
        };
        let ctx = ThreadCtx {
            args: args.clone(),
            shared: shared.clone(),
            chooser: chooser.clone(),
            run_id,
            log,
            tx: tx.clone(),
            routes: routes.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("bench-{thread}"))
            .spawn(move || thread_main(ctx, plan))
            .map_err(|e| anyhow::anyhow!("cannot start thread {thread}: {e}"))?;
        handles.push(handle);
    }
    drop(tx);

    let live = Live::new(&args);
    let mut interval = Tally::default();
    let mut requests_done = 0u64;
    let mut done = 0;
    let mut last_print = Instant::now();
    while done < args.threads {
        let wait = (last_print + PRINT_INTERVAL).saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Tick(t)) => {
                requests_done += t.requests;
                interval.merge(&t);
            }
            Ok(Msg::Done) => done += 1,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let since = last_print.elapsed();
        if since >= PRINT_INTERVAL {
            live.line(&interval, since.as_secs_f64(), requests_done, args.requests.is_some());
            interval = Tally::default();
            last_print = Instant::now();
        }
    }
    live.finish();

    let mut results = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let result = h.join().map_err(|_| anyhow::anyhow!("thread {i} panicked"))?;
        results.push(result.map_err(|e| e.context(format!("thread {i} failed")))?);
    }
    let cpu = ProcessCpu::now();
    let timing = shared.timing();
    let mut total = Tally::default();
    let mut last_done = None::<Instant>;
    let mut drain_done = None::<Instant>;
    let mut lost = 0;
    let mut last_error = None;
    let mut server = None;
    let mut records_all = 0;
    let mut shard_aware = 0;
    for r in &results {
        records_all += r.records_all;
        shard_aware += r.shard_aware;
        total.merge(&r.tally);
        last_done = last_done.max(r.last_done);
        drain_done = drain_done.max(r.drain_done);
        lost += r.connections_lost;
        if r.last_error.is_some() {
            last_error.clone_from(&r.last_error);
        }
        if server.is_none() {
            server.clone_from(&r.server);
        }
    }
    if server.is_none() {
        anyhow::bail!(
            "no connection could be opened: {}",
            last_error.unwrap_or_else(|| "unknown error".into())
        );
    }
    let elapsed = last_done
        .map(|d| d.saturating_duration_since(timing.measure_start))
        .unwrap_or_default();
    let secs = elapsed.as_secs_f64();
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };

    let drain = match (args.ack, drain_done) {
        (Ack::None, Some(d)) if lost == 0 => {
            let drain_secs = d.saturating_duration_since(timing.measure_start).as_secs_f64();
            // Appends the daemon refused (an error answer, such as Busy when its queue is full)
            // were not written: count only the accepted share of what was sent.
            let refused = total.errors_total().min(total.requests);
            let accepted = |n: u64| {
                if total.requests == 0 {
                    0.0
                } else {
                    n as f64 * (total.requests - refused) as f64 / total.requests as f64
                }
            };
            Some(DrainReport {
                elapsed_s: drain_secs,
                records_per_s: accepted(total.records) / drain_secs,
                mb_per_s: accepted(total.bytes) / drain_secs / 1e6,
                drain_s: (drain_secs - secs).max(0.0),
            })
        }
        _ => None,
    };
    let mut stopped_early = shared.stop_reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if lost as usize >= args.connections {
        stopped_early.get_or_insert(format!(
            "all {} connections were lost after {secs:.1} s; last error: {}",
            args.connections,
            last_error.as_deref().unwrap_or("unknown")
        ));
    }
    let (server_name, shard_count) = server.map(|(n, c)| (Some(n), Some(c))).unwrap_or((None, None));
    let report = Report {
        version: REPORT_VERSION,
        label: args.label.clone(),
        config: ReportConfig::of(&args, seed),
        server: server_name,
        shard_count,
        elapsed_s: secs,
        requests: total.requests,
        records: total.records,
        bytes: total.bytes,
        requests_per_s: per_s(total.requests),
        records_per_s: per_s(total.records),
        mb_per_s: per_s(total.bytes) / 1e6,
        latency_us: if args.ack == Ack::None {
            None
        } else {
            LatencySummary::of(&total.latency)
        },
        drain,
        errors_total: total.errors_total(),
        errors: total.errors.clone(),
        connections_lost: lost,
        stopped_early,
        cpu: Some(CpuReport::of(cpu.user, cpu.system, records_all)),
        shard_aware_connections: shard_aware,
    };
    Ok(RunOutcome {
        report,
        latency: total.latency,
    })
}
