//! `shardlog`: the command-line client of shardlogd, in the manner of kcat and `rpk topic`.
//!
//! ```text
//! shardlog produce 42 hello world             # two records to stream 42; prints their lsns
//! seq 1000 | shardlog produce 42 --quiet       # one record per line of stdin
//! shardlog consume 42 --from-beginning         # print stream 42's payloads, one per line
//! shardlog consume 42 --from-end --follow --json | jq .payload
//! shardlog stats | shardlog ping | shardlog shard-of 42
//! shardlog --cluster a:7070,b:7070,c:7070 produce 42 hello   # to stream 42's home daemon
//! ```
//!
//! Output formats and exit codes are a contract for scripts; docs/CLI.md lists them.

mod args;
mod cluster;
mod conn;
mod consume;
mod failure;
mod info;
mod output;
mod produce;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use args::{Cli, Command};
use cluster::Cluster;
use failure::{describe, Failure};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and exit 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.is_broken_pipe() => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("shardlog: error: {}", describe(&f));
            ExitCode::from(f.exit_code() as u8)
        }
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let common = &cli.common;
    let timeout = Duration::from_secs(common.timeout_secs.max(1));
    // Daemons are connected when first needed (a stream's home, or each in turn for stats).
    let cluster = Cluster::new(cluster::addresses(common)?, timeout);
    match &cli.command {
        Command::Produce(a) => produce::run(cluster, a, common.json),
        Command::Consume(a) => {
            // A long-poll must come back before the socket's read timeout fires.
            if a.follow && u64::from(a.poll_ms) >= timeout.as_millis() as u64 {
                return Err(Failure::Usage("--poll-ms must be shorter than --timeout-secs".into()));
            }
            consume::run(cluster, a, common.json)
        }
        Command::Stats => info::stats(cluster, common.json),
        Command::Ping(a) => info::ping(cluster, a, common.json),
        Command::ShardOf(a) => info::shard_of(cluster, a, common.json),
    }
}
