//! shardlog-bench: load generator and durability checker for shardlogd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use bench::config::{RunArgs, ADDR_DEFAULT};
use bench::run::EXIT_CONNECTIONS_LOST;
use bench::verify::VerifyOutcome;
use bench::verify_log::read_verify_log;

const AFTER_HELP: &str = "\
Examples:
  shardlog-bench --addr 127.0.0.1:7070 -c 64 -P 16 -S 1024 --duration 10s --json out.json
  shardlog-bench -c 16 --rate 20000 --hgrm latency.hgrm          (open loop, 20K requests/s)
  shardlog-bench -c 8 --verify-log acks.log --duration 30s
  shardlog-bench verify --verify-log acks.log --addr 127.0.0.1:7070
  shardlog-bench --addr 10.0.0.1:7070 --addr 10.0.0.2:7070 -c 8 -P 16   (a cluster: aggregate figures)
  shardlog-bench chart --out chart.svg results/*.json

Exit status: 0 the run completed; 2 every connection was lost before the end
(the report is still printed and written); 1 bad options or nothing could run.
`verify` exits 1 when any acknowledged record is missing, corrupted or out of order;
records that retention deleted are counted as retired, not missing.";

#[derive(Parser)]
#[command(
    name = "shardlog-bench",
    version,
    about = "Load generator and durability checker for shardlogd",
    long_about = "Load generator and durability checker for shardlogd.\n\nWithout a subcommand it generates \
                  load: closed loop by default, open loop with --rate (latency measured from each request's \
                  intended send time, free of coordinated omission).",
    args_conflicts_with_subcommands = true,
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Generate load (the same as giving no subcommand).
    Run(Box<RunArgs>),
    /// Read every shard back and check it against a verify log.
    Verify(VerifyArgs),
    /// Draw an SVG chart (records/s and latency vs connections) from JSON reports.
    Chart(ChartArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// The log written by a run with `--verify-log`.
    #[arg(long)]
    verify_log: PathBuf,
    /// Daemon address; repeated, a cluster in the order the run used: each record is checked on
    /// its home daemon, and every daemon is read back.
    #[arg(long = "addr", default_value = ADDR_DEFAULT)]
    addrs: Vec<SocketAddr>,
    /// Write the outcome as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// How long to wait for each response before declaring the daemon hung.
    #[arg(long, value_parser = bench::config::parse_duration, default_value = bench::config::RESPONSE_TIMEOUT_DEFAULT)]
    timeout: std::time::Duration,
}

#[derive(Args)]
struct ChartArgs {
    /// The SVG file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "shardlog-bench")]
    title: String,
    /// JSON reports written by `--json`.
    #[arg(required = true)]
    reports: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(*args),
        Some(Command::Verify(args)) => verify(args),
        Some(Command::Chart(args)) => chart(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shardlog-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let json = args.json.clone();
    let hgrm = args.hgrm.clone();
    let outcome = bench::run::run(args)?;
    print!("{}", outcome.report.render());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&outcome.report)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = hgrm {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        bench::stats::write_hgrm(&outcome.latency, &mut file)
            .and_then(|()| std::io::Write::flush(&mut file))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if outcome.report.connections_lost as usize >= outcome.report.config.connections {
        eprintln!(
            "shardlog-bench: stopped early: {}",
            outcome
                .report
                .stopped_early
                .as_deref()
                .unwrap_or("all connections were lost")
        );
        return Ok(ExitCode::from(EXIT_CONNECTIONS_LOST as u8));
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let log = read_verify_log(&args.verify_log)?;
    if log.torn_tail {
        eprintln!(
            "shardlog-bench: the last line of {} is incomplete (the writer was killed mid-line); ignored",
            args.verify_log.display()
        );
    }
    let outcome: VerifyOutcome = bench::verify::verify_cluster(&args.addrs, log.records, args.timeout)?;
    println!(
        "verify: {} acked records, {} found, {} retired by retention; {} records read ({} never acked, {} foreign)",
        outcome.acked,
        outcome.acked_found,
        outcome.retired_by_retention,
        outcome.records_read,
        outcome.unacked_present,
        outcome.foreign_payloads
    );
    for (kind, count) in &outcome.problems {
        println!("  {kind:?}: {count}");
        for example in outcome.examples.get(kind).into_iter().flatten() {
            println!("    {example}");
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&outcome)?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if outcome.ok() {
        println!("verify: OK");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verify: FAILED, {} problems", outcome.problems_total());
        Ok(ExitCode::FAILURE)
    }
}

fn chart(args: ChartArgs) -> anyhow::Result<ExitCode> {
    let reports = bench::chart::read_reports(&args.reports)?;
    bench::chart::draw(&reports, &args.title, &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
