//! Command line and environment: every flag also reads a `SHARDLOG_*` variable.

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Address of the daemon when neither `--addr` nor `SHARDLOG_ADDR` says otherwise; the daemon's
/// own default listening address.
pub const ADDR_DEFAULT: &str = "127.0.0.1:7070";
/// Seconds to wait for any one answer before giving up on the connection.
pub const TIMEOUT_SECS_DEFAULT: u64 = 30;
/// Records per append when reading stdin: large enough that a bulk load amortises the round
/// trip, and an interactive line is still sent at once (a batch never waits for input).
pub const BATCH_DEFAULT: u32 = 64;
/// Appends sent and not yet answered, per run.
pub const IN_FLIGHT_DEFAULT: u32 = 16;
/// How long one long-poll of `consume --follow` waits on the daemon.
pub const POLL_MS_DEFAULT: u32 = 1000;
/// Soft cap on the payload bytes one read returns.
pub const READ_BYTES_DEFAULT: u32 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "shardlog",
    version,
    about = "shardlog client: produce and consume records, ask a daemon for its counters",
    long_about = "shardlog client: produce and consume records, ask a daemon for its counters.\n\n\
        Every option can also be set through the environment variable named in brackets. \
        Exit codes are listed in docs/CLI.md: 0 success, 1 local failure, 2 usage, 3 connection, \
        4 bad input, 5 protocol, 10 + N the daemon's error code N."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Common {
    /// Address of the daemon ("host:port").
    #[arg(long, short = 'a', global = true, env = "SHARDLOG_ADDR", default_value = ADDR_DEFAULT)]
    pub addr: String,

    /// A cluster: daemon addresses in cluster order, comma-separated ("a:7070,b:7070"). Every
    /// client must list the same daemons in the same order: the order is placement. Overrides
    /// --addr.
    #[arg(long, global = true, env = "SHARDLOG_CLUSTER", conflicts_with = "cluster_file")]
    pub cluster: Option<String>,

    /// A cluster read from a file: one daemon address a line, in cluster order (blank lines and
    /// `#` comments skipped). Overrides --addr.
    #[arg(long, global = true, env = "SHARDLOG_CLUSTER_FILE")]
    pub cluster_file: Option<std::path::PathBuf>,

    /// Seconds to wait for an answer before failing with exit code 3.
    #[arg(long, global = true, env = "SHARDLOG_TIMEOUT_SECS", default_value_t = TIMEOUT_SECS_DEFAULT)]
    pub timeout_secs: u64,

    /// Print machine-readable JSON lines instead of text (stable keys; see docs/CLI.md).
    #[arg(long, global = true, env = "SHARDLOG_JSON")]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Append records to a stream: from arguments, or one per line of stdin.
    Produce(ProduceArgs),
    /// Read records of a stream or a shard, optionally following new ones.
    Consume(ConsumeArgs),
    /// Print the daemon's counters.
    Stats,
    /// Measure the round trip to the daemon.
    Ping(PingArgs),
    /// Print the home of a stream: its daemon (in a cluster) and shard.
    ShardOf(ShardOfArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ack {
    /// No answer for a successful append (errors still come back).
    None,
    /// Answered once written, before fdatasync.
    Written,
    /// Answered once on stable storage.
    Durable,
}

impl From<Ack> for proto::wire::AckLevel {
    fn from(a: Ack) -> Self {
        match a {
            Ack::None => proto::wire::AckLevel::None,
            Ack::Written => proto::wire::AckLevel::Written,
            Ack::Durable => proto::wire::AckLevel::Durable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Input {
    /// One record per line; the newline is not part of the record.
    Lines,
    /// One JSON object per line: {"stream": N, "payload": "text"} or "payload_base64": "...",
    /// optional "timestamp"; other keys are ignored (so `consume --json` output replays).
    Json,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Stream id (u64). With `--input json`, the default for lines without a "stream".
    pub stream: Option<u64>,

    /// Payloads, one record each. Without any, records are read from stdin.
    pub payloads: Vec<OsString>,

    /// How stdin is split into records.
    #[arg(long, short = 'i', env = "SHARDLOG_INPUT", value_enum, default_value_t = Input::Lines)]
    pub input: Input,

    /// When the daemon answers an append.
    #[arg(long, env = "SHARDLOG_ACK", value_enum, default_value_t = Ack::Durable)]
    pub ack: Ack,

    /// Most records in one append (one atomic commit). A batch is sent as soon as no more
    /// input is ready, so interactive lines are not held back.
    #[arg(long, short = 'b', env = "SHARDLOG_BATCH", default_value_t = BATCH_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch: u32,

    /// Most appends sent and not yet answered.
    #[arg(long, env = "SHARDLOG_IN_FLIGHT", default_value_t = IN_FLIGHT_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub in_flight: u32,

    /// Do not stamp records with the current time (microseconds since the Unix epoch).
    #[arg(long, env = "SHARDLOG_NO_TIMESTAMP")]
    pub no_timestamp: bool,

    /// Do not print the assigned lsns.
    #[arg(long, short = 'q', env = "SHARDLOG_QUIET")]
    pub quiet: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("start").args(["from_lsn", "from_beginning", "from_end"]))]
#[command(group = clap::ArgGroup::new("what").args(["stream", "shard"]).required(true))]
pub struct ConsumeArgs {
    /// Stream id: read only this stream, from the shard that owns it.
    pub stream: Option<u64>,

    /// Read every stream of this shard instead.
    #[arg(long, short = 's', env = "SHARDLOG_SHARD")]
    pub shard: Option<u16>,

    /// With --shard in a cluster: the daemon (index in the cluster list, from 0) whose shard to read.
    #[arg(long, env = "SHARDLOG_DAEMON", requires = "shard")]
    pub daemon: Option<u32>,

    /// Start at this lsn (fails with the daemon's Truncated if retention deleted it).
    #[arg(long, env = "SHARDLOG_FROM_LSN")]
    pub from_lsn: Option<u64>,

    /// Start at the oldest retained record (the default).
    #[arg(long, env = "SHARDLOG_FROM_BEGINNING")]
    pub from_beginning: bool,

    /// Start after the newest durable record: print only what arrives later (with --follow).
    #[arg(long, env = "SHARDLOG_FROM_END")]
    pub from_end: bool,

    /// Keep waiting for new records (long-polling) until interrupted.
    #[arg(long, short = 'f', env = "SHARDLOG_FOLLOW")]
    pub follow: bool,

    /// Stop after this many records.
    #[arg(long, short = 'n', env = "SHARDLOG_MAX_RECORDS")]
    pub max_records: Option<u64>,

    /// Raw output: written after each payload. Escapes \n, \t, \r, \0, \\ and \xNN are understood;
    /// "" writes payloads back to back.
    #[arg(long, short = 'D', env = "SHARDLOG_DELIMITER", default_value = "\\n")]
    pub delimiter: String,

    /// JSON output: always give the payload as "payload_base64", even when it is UTF-8.
    #[arg(long, env = "SHARDLOG_BASE64")]
    pub base64: bool,

    /// Longest wait of one long-poll, in milliseconds (with --follow).
    #[arg(long, env = "SHARDLOG_POLL_MS", default_value_t = POLL_MS_DEFAULT)]
    pub poll_ms: u32,

    /// Soft cap on the payload bytes of one read.
    #[arg(long, env = "SHARDLOG_READ_BYTES", default_value_t = READ_BYTES_DEFAULT)]
    pub read_bytes: u32,
}

#[derive(Debug, Args)]
pub struct PingArgs {
    /// Pings to send.
    #[arg(long, short = 'c', env = "SHARDLOG_PING_COUNT", default_value_t = 1)]
    pub count: u32,

    /// Pause between pings, in milliseconds.
    #[arg(long, env = "SHARDLOG_PING_INTERVAL_MS", default_value_t = 200)]
    pub interval_ms: u64,

    /// Keep trying to connect for up to this many seconds (for a daemon that is still starting).
    #[arg(long, env = "SHARDLOG_PING_WAIT_SECS", default_value_t = 0)]
    pub wait_secs: u64,
}

#[derive(Debug, Args)]
pub struct ShardOfArgs {
    /// Stream ids.
    #[arg(required = true)]
    pub streams: Vec<u64>,

    /// Compute for this many shards (on every daemon) without asking a daemon.
    #[arg(long, env = "SHARDLOG_SHARDS", value_parser = clap::value_parser!(u16).range(1..))]
    pub shards: Option<u16>,
}
