//! Command line and environment: every flag also reads a `SHARDLOG_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default address the daemon listens on.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7070";
/// Default data directory.
pub const DATA_DIR_DEFAULT: &str = "./data";
/// Default cap on concurrent client connections, across all front executors.
pub const MAX_CONNECTIONS_DEFAULT: usize = 1024;
/// Default in-flight budget of one connection, in bytes: request frames not yet answered plus
/// responses not yet written. Equal to the default frame limit, so one maximal frame fits.
pub const CONN_BUDGET_BYTES_DEFAULT: usize = proto::frame::FRAME_BYTES_MAX_DEFAULT;
/// Default ceiling of a read's `max_wait_ms`: a long-poll asking for longer waits this long.
pub const MAX_WAIT_MS_DEFAULT: u32 = 60_000;
/// Default bound of the memory one shard's reads hold together.
pub const READ_MEMORY_BYTES_DEFAULT: usize = shards::READ_MEMORY_BYTES_DEFAULT;
/// The smallest read memory accepted: what one read may need at once (a response of half the
/// largest budget, plus the largest commit read twice while it is copied out of the DMA buffer).
pub const READ_MEMORY_BYTES_MIN: usize = 8 << 20;
/// Default bound of the request frames larger than 16 KiB that the connections of all fronts are
/// receiving or have sent on as appends not yet answered: eight maximal frames.
pub const FRAME_MEMORY_BYTES_DEFAULT: usize = 32 << 20;
/// Default bound of the responses the reads of all fronts hold until they are written.
pub const RESPONSE_MEMORY_BYTES_DEFAULT: usize = 32 << 20;
/// Default capacity (messages) of each cross-executor ring, each direction.
pub const RING_CAPACITY_DEFAULT: usize = 1024;

#[derive(Debug, Parser)]
#[command(
    name = "shardlogd",
    version,
    about = "shardlog daemon: a durable, sharded log served over TCP",
    long_about = "shardlog daemon: a durable, sharded log served over TCP.\n\n\
        One pinned executor per shard core owns one shard directory (<data-dir>/shard-NNN/); front \
        executors accept connections and route each append to the shard that owns its stream. \
        Appends are acknowledged once durable (or written, or not at all, as the client asks).\n\n\
        Every option can also be set through the environment variable named in brackets.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Print a running daemon's counters.
    Stats(StatsArgs),
    /// Check whether this host and a data directory are fit to run shardlogd (io_uring, memlock,
    /// O_DIRECT, file system, device settings, free space, a measured commit); exits non-zero
    /// when they are not.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The data directory to check (created if missing).
    #[arg(long, env = "SHARDLOG_DATA_DIR", default_value = DATA_DIR_DEFAULT)]
    pub data_dir: PathBuf,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Skip the measured 4 KiB commit latency and 1 MiB bandwidth (they write about 64 MiB).
    #[arg(long)]
    pub no_measure: bool,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Address of the daemon.
    #[arg(long, env = "SHARDLOG_ADDR", default_value = LISTEN_DEFAULT)]
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pin {
    /// Pin each executor to one CPU (glommio `Placement::Fixed`).
    Fixed,
    /// Let the kernel schedule executors anywhere (for tests, or more shards than cores).
    None,
}

/// Where shard executors accept shard-aware connections (`--shard-ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPorts {
    /// Shard s on the listen port + 1 + s; each on a port the kernel picks when listening on port 0.
    Next,
    /// Shard s on `base + s`; with 0, each on a port the kernel picks.
    Base(u16),
    /// No shard-aware ports: every connection goes through the main address.
    Off,
}

impl std::str::FromStr for ShardPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "next" => Ok(ShardPorts::Next),
            "off" => Ok(ShardPorts::Off),
            n => n
                .parse()
                .map(ShardPorts::Base)
                .map_err(|_| format!("expected \"next\", \"off\" or a port number, got {n:?}")),
        }
    }
}

impl ShardPorts {
    /// The port to bind for shard `shard` (0: any), given the bound main address's port, or
    /// `None` when off. Fails if the port would pass 65535.
    pub fn port(self, listen_port: u16, shard: u16) -> Option<Result<u16, String>> {
        let (base, after) = match self {
            ShardPorts::Off => return None,
            ShardPorts::Next if listen_port == 0 => return Some(Ok(0)),
            ShardPorts::Base(0) => return Some(Ok(0)),
            ShardPorts::Next => (listen_port, 1u32),
            ShardPorts::Base(base) => (base, 0),
        };
        let port = u32::from(base) + after + u32::from(shard);
        Some(
            u16::try_from(port)
                .map_err(|_| format!("shard {shard}'s port {port} is above 65535; pick a lower --shard-ports base")),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// A write linked to an fdatasync in one io_uring submission.
    Linked,
    /// One write through a file opened with O_DSYNC.
    Dsync,
}

impl From<DurabilityArg> for shards::Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Linked => shards::Durability::Linked,
            DurabilityArg::Dsync => shards::Durability::Dsync,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SegmentPrepArg {
    /// Zero-fill while commits are small (lowest commit latency); preallocate after a segment
    /// whose commits averaged 256 KiB or more (a shard limited by the disk's bandwidth).
    Auto,
    /// Always zero-fill: the disk writes every byte twice, each commit syncs fastest.
    ZeroFill,
    /// Always fallocate: the disk writes every byte once, each commit's sync also converts the
    /// blocks it wrote.
    Preallocate,
}

impl From<SegmentPrepArg> for shards::SegmentPrep {
    fn from(p: SegmentPrepArg) -> Self {
        match p {
            SegmentPrepArg::Auto => shards::SegmentPrep::Auto,
            SegmentPrepArg::ZeroFill => shards::SegmentPrep::ZeroFill,
            SegmentPrepArg::Preallocate => shards::SegmentPrep::Preallocate,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamRunsArg {
    /// Once a segment is sealed, copy the records of each stream that a filtered read would
    /// otherwise read at more than twice their size (records that arrived one at a time among
    /// other streams') next to each other: a second write of those records, in the background.
    Auto,
    /// No copies: filtered reads use the stream index only.
    Off,
}

impl From<StreamRunsArg> for shards::StreamRuns {
    fn from(r: StreamRunsArg) -> Self {
        match r {
            StreamRunsArg::Auto => shards::StreamRuns::Auto,
            StreamRunsArg::Off => shards::StreamRuns::Off,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is printed on stdout).
    #[arg(long, env = "SHARDLOG_LISTEN", default_value = LISTEN_DEFAULT)]
    pub listen: SocketAddr,

    /// Directory holding LOCK, META and one shard-NNN/ directory per shard. Must be on a
    /// filesystem with O_DIRECT (ext4, xfs); not tmpfs.
    #[arg(long, env = "SHARDLOG_DATA_DIR", default_value = DATA_DIR_DEFAULT)]
    pub data_dir: PathBuf,

    /// Size of each segment file in bytes, a multiple of 4096 [default: 64 MiB].
    #[arg(long, env = "SHARDLOG_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,

    /// Per shard: delete or recycle the oldest segments while the shard holds more than this
    /// many bytes [default: keep everything].
    #[arg(long, env = "SHARDLOG_RETENTION_BYTES")]
    pub retention_bytes: Option<u64>,

    /// Per shard: delete or recycle segments sealed (filled and closed) more than this many
    /// seconds ago; the segment being written is never removed [default: no age limit].
    #[arg(long, env = "SHARDLOG_RETENTION_AGE_SECS")]
    pub retention_age_secs: Option<u64>,

    /// Per shard: the background scrub reads sealed segments at most this many bytes per
    /// second and checks them against their summaries; 0 turns it off.
    #[arg(long, env = "SHARDLOG_SCRUB_BYTES_PER_SEC", default_value_t = shards::SCRUB_BYTES_PER_SEC_DEFAULT)]
    pub scrub_bytes_per_sec: u64,

    /// Largest request frame accepted, in bytes; a larger length prefix closes the connection.
    #[arg(long, env = "SHARDLOG_MAX_FRAME_BYTES", default_value_t = proto::frame::FRAME_BYTES_MAX_DEFAULT)]
    pub max_frame_bytes: usize,

    /// Connections beyond this are answered TooManyConnections and closed.
    #[arg(long, env = "SHARDLOG_MAX_CONNECTIONS", default_value_t = MAX_CONNECTIONS_DEFAULT)]
    pub max_connections: usize,

    /// Bytes one connection may have in flight (unanswered requests plus unsent responses);
    /// beyond it the daemon stops reading that socket, so TCP pushes back on the client.
    #[arg(long, env = "SHARDLOG_CONN_BUDGET_BYTES", default_value_t = CONN_BUDGET_BYTES_DEFAULT)]
    pub conn_budget_bytes: usize,

    /// Longest a read may wait for records (`max_wait_ms`, a long-poll); a request asking for
    /// longer waits this long and is then answered with what there is.
    #[arg(long, env = "SHARDLOG_MAX_WAIT_MS", default_value_t = MAX_WAIT_MS_DEFAULT)]
    pub max_wait_ms: u32,

    /// Per shard: memory all reads hold together, from the disk buffers to the responses not yet
    /// written to their sockets. A read waits for room; at least 8 MiB [default: 32 MiB].
    #[arg(long, env = "SHARDLOG_READ_MEMORY_BYTES", default_value_t = READ_MEMORY_BYTES_DEFAULT,
          value_parser = read_memory_bytes)]
    pub read_memory_bytes: usize,

    /// Memory for request frames larger than 16 KiB, across all connections: from their first
    /// bytes until they are answered (appends) or handed on. A connection takes a large frame's
    /// whole length before buffering it, and waits (reading nothing more) while there is no room;
    /// at least one maximal frame.
    #[arg(long, env = "SHARDLOG_FRAME_MEMORY_BYTES", default_value_t = FRAME_MEMORY_BYTES_DEFAULT)]
    pub frame_memory_bytes: usize,

    /// Memory the reads of all connections may hold together in responses not yet written to
    /// their sockets. A read takes its share when it is sent to its shard and never waits for
    /// it: when less is free, it asks its shard for less; when even 16 KiB is not free, it answers
    /// at most 16 KiB (at least one record) outside this bound, one such read per connection at
    /// a time. So clients that do not read their answers cannot hold more, nor make other
    /// clients' reads wait.
    #[arg(long, env = "SHARDLOG_RESPONSE_MEMORY_BYTES", default_value_t = RESPONSE_MEMORY_BYTES_DEFAULT)]
    pub response_memory_bytes: usize,

    /// Per shard: memory the stream indexes of sealed segments may keep loaded (filtered reads
    /// load a segment's index file on first use); beyond it the least recently read are dropped
    /// and loaded again when next needed. The segment being written keeps its index regardless.
    #[arg(long, env = "SHARDLOG_STREAM_INDEX_MEMORY_BYTES", default_value_t = shards::STREAM_INDEX_MEMORY_BYTES_DEFAULT)]
    pub stream_index_memory_bytes: usize,

    /// Per shard: whether sealed segments get stream runs (a `.runs` file next to the segment),
    /// so that reading a stream whose records are scattered one per commit costs about its own
    /// bytes.
    #[arg(long, env = "SHARDLOG_STREAM_RUNS", value_enum, default_value_t = StreamRunsArg::Auto)]
    pub stream_runs: StreamRunsArg,

    /// Per shard: memory for the stream runs of the segment being written (kept as it grows, and
    /// written out when it is sealed); beyond it, the runs of the streams the index reads best
    /// are dropped first. It also bounds each runs file.
    #[arg(long, env = "SHARDLOG_STREAM_TAIL_MEMORY_BYTES", default_value_t = shards::STREAM_TAIL_MEMORY_BYTES_DEFAULT)]
    pub stream_tail_memory_bytes: usize,

    /// How a commit is made durable.
    #[arg(long, env = "SHARDLOG_DURABILITY", value_enum, default_value_t = DurabilityArg::Dsync)]
    pub durability: DurabilityArg,

    /// Per shard: how the background task makes each new segment file ready before the shard
    /// writes to it (a segment recycled by retention needs neither).
    #[arg(long, env = "SHARDLOG_SEGMENT_PREP", value_enum, default_value_t = SegmentPrepArg::Auto)]
    pub segment_prep: SegmentPrepArg,

    /// CPUs to use, e.g. "0-3" or "0,2,4" [default: the CPUs this process may run on].
    #[arg(long, env = "SHARDLOG_CPUS")]
    pub cpus: Option<String>,

    /// CPU of the (first) front executor [default: the first of --cpus].
    #[arg(long, env = "SHARDLOG_FRONT_CPU")]
    pub front_cpu: Option<usize>,

    /// Number of dedicated front executors accepting connections on the main address
    /// (SO_REUSEPORT); each routes to all shards. With 0, no executor is dedicated: every shard
    /// executor also accepts on the main address and forwards what it does not own.
    #[arg(long, env = "SHARDLOG_FRONT_CORES", default_value_t = 1)]
    pub front_cores: usize,

    /// Shard-aware addresses, listed to clients in `HelloOk.shard_addresses`: each shard
    /// executor accepts connections on its own port and serves the streams it owns without a
    /// cross-core hop. "next": shard s on the listen port + 1 + s, or any free port when that one
    /// is taken or the listen port is 0; a number N: shard s on N + s (0: any free port); "off":
    /// none.
    #[arg(long, env = "SHARDLOG_SHARD_PORTS", default_value = "next")]
    pub shard_ports: ShardPorts,

    /// Number of shards [default: one per CPU left after the front executors, at least 1]. Fixed
    /// when the data directory is created: a different count would move streams between shards.
    #[arg(long, env = "SHARDLOG_SHARDS")]
    pub shards: Option<u16>,

    /// Executor pinning.
    #[arg(long, env = "SHARDLOG_PIN", value_enum, default_value_t = Pin::Fixed)]
    pub pin: Pin,

    /// Capacity of each cross-executor ring, in messages.
    #[arg(long, env = "SHARDLOG_RING_CAPACITY", default_value_t = RING_CAPACITY_DEFAULT, hide = true)]
    pub ring_capacity: usize,

    /// Busy-poll this many microseconds before an idle executor sleeps (trades CPU for latency).
    #[arg(long, env = "SHARDLOG_SPIN_US", default_value_t = 0)]
    pub spin_us: u64,

    /// On a corrupt commit, truncate the shard's log there instead of refusing to start
    /// (everything after it is lost).
    #[arg(long, env = "SHARDLOG_REPAIR")]
    pub repair: bool,

    /// Log filter in tracing EnvFilter syntax, e.g. "info" or "daemon=debug,shards=info".
    #[arg(long, env = "SHARDLOG_LOG", default_value = "info")]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "SHARDLOG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off by default.
    #[arg(long, env = "SHARDLOG_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

fn read_memory_bytes(s: &str) -> Result<usize, String> {
    let bytes: usize = s.parse().map_err(|e| format!("{e}"))?;
    if bytes < READ_MEMORY_BYTES_MIN {
        return Err(format!(
            "{bytes} is below {READ_MEMORY_BYTES_MIN}, what one read may need at once"
        ));
    }
    Ok(bytes)
}

impl ServeArgs {
    pub fn shard_options(&self, shard_id: u16) -> shards::ShardOptions {
        let mut opts = shards::ShardOptions {
            shard_id,
            durability: self.durability.into(),
            repair: self.repair,
            retention_bytes: self.retention_bytes,
            retention_age: self.retention_age_secs.map(std::time::Duration::from_secs),
            scrub_bytes_per_sec: self.scrub_bytes_per_sec,
            segment_prep: self.segment_prep.into(),
            stream_index_memory_bytes: self.stream_index_memory_bytes,
            stream_runs: self.stream_runs.into(),
            stream_tail_memory_bytes: self.stream_tail_memory_bytes,
            ..shards::ShardOptions::default()
        };
        if let Some(bytes) = self.segment_bytes {
            opts.segment_bytes = bytes;
            // One commit must fit in a segment; small segments (tests) get smaller commits. A
            // segment too small even for that is refused by the shard with a clear message.
            let room = bytes.saturating_sub(shards::format::SEGMENT_DATA_OFFSET);
            opts.commit_bytes_max = opts.commit_bytes_max.min(room as usize);
        }
        opts
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::Cli;

    #[test]
    fn shard_ports_follow_the_listen_port_or_a_base() {
        use super::ShardPorts;
        let next: ShardPorts = "next".parse().unwrap();
        assert_eq!(next.port(7070, 0), Some(Ok(7071)));
        assert_eq!(next.port(7070, 3), Some(Ok(7074)));
        assert_eq!(next.port(0, 3), Some(Ok(0)), "port 0 picks free ports");
        assert_eq!("9000".parse::<ShardPorts>().unwrap().port(7070, 2), Some(Ok(9002)));
        assert_eq!("0".parse::<ShardPorts>().unwrap().port(7070, 2), Some(Ok(0)));
        assert_eq!("off".parse::<ShardPorts>().unwrap().port(7070, 2), None);
        assert!(next.port(65535, 0).unwrap().is_err());
        assert!("x".parse::<ShardPorts>().is_err());
        let cli = Cli::try_parse_from(["shardlogd"]).unwrap();
        assert_eq!(cli.serve.shard_ports, ShardPorts::Next);
    }

    #[test]
    fn retention_flags_reach_the_shard_options() {
        let cli = Cli::try_parse_from([
            "shardlogd",
            "--retention-bytes",
            "1048576",
            "--retention-age-secs",
            "3600",
        ])
        .expect("flags parse");
        let opts = cli.serve.shard_options(3);
        assert_eq!(opts.retention_bytes, Some(1 << 20));
        assert_eq!(opts.retention_age, Some(Duration::from_secs(3600)));
        let cli = Cli::try_parse_from(["shardlogd"]).expect("no flags parse");
        assert_eq!(
            cli.serve.shard_options(0).retention_age,
            None,
            "no age limit by default"
        );
    }

    #[test]
    fn segment_prep_and_index_memory_flags_reach_the_shard_options() {
        let defaults = Cli::try_parse_from(["shardlogd"])
            .expect("no flags parse")
            .serve
            .shard_options(0);
        assert_eq!(defaults.segment_prep, shards::SegmentPrep::Auto);
        assert_eq!(
            defaults.stream_index_memory_bytes,
            shards::STREAM_INDEX_MEMORY_BYTES_DEFAULT
        );
        for (arg, prep) in [
            ("zero-fill", shards::SegmentPrep::ZeroFill),
            ("preallocate", shards::SegmentPrep::Preallocate),
            ("auto", shards::SegmentPrep::Auto),
        ] {
            let cli = Cli::try_parse_from([
                "shardlogd",
                "--segment-prep",
                arg,
                "--stream-index-memory-bytes",
                "4096",
            ])
            .expect("flags parse");
            let opts = cli.serve.shard_options(1);
            assert_eq!(opts.segment_prep, prep, "{arg}");
            assert_eq!(opts.stream_index_memory_bytes, 4096);
        }
        assert!(Cli::try_parse_from(["shardlogd", "--segment-prep", "sparse"]).is_err());
    }

    #[test]
    fn the_stream_runs_flags_reach_the_shard_options() {
        let defaults = Cli::try_parse_from(["shardlogd"])
            .expect("no flags parse")
            .serve
            .shard_options(0);
        assert_eq!(defaults.stream_runs, shards::StreamRuns::Auto);
        assert_eq!(
            defaults.stream_tail_memory_bytes,
            shards::STREAM_TAIL_MEMORY_BYTES_DEFAULT
        );
        let off = Cli::try_parse_from([
            "shardlogd",
            "--stream-runs",
            "off",
            "--stream-tail-memory-bytes",
            "65536",
        ])
        .expect("flags parse");
        assert_eq!(off.serve.shard_options(0).stream_runs, shards::StreamRuns::Off);
        assert_eq!(off.serve.shard_options(0).stream_tail_memory_bytes, 65536);
        assert!(Cli::try_parse_from(["shardlogd", "--stream-runs", "always"]).is_err());
    }
}
