use std::process::ExitCode;

use clap::Parser;
use daemon::config::{Cli, Command, LogFormat, ServeArgs};

/// jemalloc rather than glibc's malloc: a shard's reads allocate and free many small disk and
/// record buffers that outlive one another in no order, and glibc's arenas fragmented under that
/// until a shard thread's 64 MiB heap was all resident (30,000 pipelined one-byte reads: a peak
/// of 170-227 MiB with glibc, 77 MiB with jemalloc; docs/RELIABILITY.md, problem 16). The
/// commit path allocates nothing per record either way, and measured the same.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Stats(args)) => match daemon::stats_cmd::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shardlogd stats: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Check(args)) => daemon::host_check::run(&args),
        Some(Command::Serve(args)) => serve(*args),
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("shardlogd: invalid --log filter {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    match daemon::server::serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "shardlogd failed");
            eprintln!("shardlogd: {e}");
            ExitCode::FAILURE
        }
    }
}
