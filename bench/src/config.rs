//! Command-line options of the generator. Every default is a named constant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::payload::SizeRange;
use crate::streams::ZIPF_EXPONENT_DEFAULT;

pub const ADDR_DEFAULT: &str = "127.0.0.1:7070";
pub const DURATION_DEFAULT: &str = "10s";
pub const RESPONSE_TIMEOUT_DEFAULT: &str = "30s";
pub const CONNECT_TIMEOUT_DEFAULT: &str = "10s";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    None,
    Written,
    Durable,
}

impl Ack {
    pub fn wire(self) -> proto::wire::AckLevel {
        match self {
            Ack::None => proto::wire::AckLevel::None,
            Ack::Written => proto::wire::AckLevel::Written,
            Ack::Durable => proto::wire::AckLevel::Durable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamDist {
    Uniform,
    Zipf,
}

/// Parses `10`, `10s`, `250ms`, `2m`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit_secs) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 10, 10s, 250ms, 2m)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{s}` is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(value * unit_secs))
}

/// The load to generate (the top-level command).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Daemon address. Repeated, the daemons form a cluster (in the order given, which is
    /// placement): each connection then reaches every daemon and sends each append to its
    /// stream's home `(daemon_for(stream), shard_for(stream))`, and the report is the aggregate.
    #[arg(long = "addr", default_value = ADDR_DEFAULT)]
    pub addrs: Vec<SocketAddr>,

    /// Threads running connections, each one epoll loop. Unpinned.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Connections in total, spread over the threads. A shard-aware connection (see
    /// `--routed`) holds one TCP socket per shard.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: usize,

    /// Requests in flight per connection. With `--ack none`, where nothing is
    /// awaited, the appends a connection queues before its writer sends them
    /// (up to this many requests per socket write, as a producer batches).
    #[arg(long, short = 'P', default_value_t = 1)]
    pub pipeline: usize,

    /// Records per Append request (one frame).
    #[arg(long, short = 'B', default_value_t = 1)]
    pub records_per_frame: u32,

    /// Record size in bytes: fixed (`100`) or uniform over an inclusive range (`100..1024`).
    /// At least 28 bytes (each record carries a header for `verify`).
    #[arg(long, short = 'S', default_value = "100")]
    pub record_bytes: SizeRange,

    /// Number of streams written to.
    #[arg(long, short = 'K', default_value_t = 64)]
    pub streams: u64,

    /// First stream id; streams are `base..base+K`.
    #[arg(long, default_value_t = 0)]
    pub stream_base: u64,

    /// How streams are picked for each append.
    #[arg(long, value_enum, default_value_t = StreamDist::Uniform)]
    pub stream_dist: StreamDist,

    /// Zipf exponent for `--stream-dist zipf`.
    #[arg(long, default_value_t = ZIPF_EXPONENT_DEFAULT)]
    pub zipf_exponent: f64,

    /// When the daemon answers: `none` (no response), `written`, `durable`.
    #[arg(long, value_enum, default_value_t = Ack::Durable)]
    pub ack: Ack,

    /// How long to send, after the warm-up (`10`, `10s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = DURATION_DEFAULT)]
    pub duration: Duration,

    /// Stop after this many requests in total instead of after `--duration`.
    #[arg(long)]
    pub requests: Option<u64>,

    /// Load sent before measuring starts (not counted).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,

    /// Open loop: requests per second in total, each timed from its intended send time.
    /// Without it the loop is closed (each worker sends as soon as its previous request completes).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Write the final report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write the full latency percentile distribution (HdrHistogram text format, ms) to this file.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,

    /// Append every acknowledged record (stream shard lsn crc32c len) to this file as acks arrive,
    /// for `verify` (needs `--ack durable`). The file is appended to, never truncated.
    #[arg(long)]
    pub verify_log: Option<PathBuf>,

    /// Give up on the daemon (close every connection) when requests are outstanding and no
    /// response at all has arrived for this long, during the run or after its end.
    #[arg(long, value_parser = parse_duration, default_value = RESPONSE_TIMEOUT_DEFAULT)]
    pub response_timeout: Duration,

    /// How long a connection may take to connect and get its `Hello` answered.
    #[arg(long, value_parser = parse_duration, default_value = CONNECT_TIMEOUT_DEFAULT)]
    pub connect_timeout: Duration,

    /// Seed for stream choice and record sizes (printed; default: derived from the clock).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Let each thread poll this long (us) before sleeping, trading CPU for wake-up latency.
    #[arg(long, default_value_t = 0)]
    pub spin_before_park_us: u64,

    /// Send every append to the main address and let the daemon route it. Without it, when
    /// the daemon's `Hello` answer lists shard addresses, each connection opens one socket per
    /// shard and sends each append straight to the shard that owns its stream.
    #[arg(long)]
    pub routed: bool,

    /// A label stored in the JSON report (tables and charts group by it).
    #[arg(long)]
    pub label: Option<String>,

    /// No live progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl RunArgs {
    /// Checks relations clap cannot express; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        for (i, a) in self.addrs.iter().enumerate() {
            if self.addrs[..i].contains(a) {
                return Err(format!("--addr {a} is given twice: a cluster lists each daemon once"));
            }
        }
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.connections < self.threads {
            return Err(format!(
                "--connections {} is below --threads {}: each thread needs at least one connection",
                self.connections, self.threads
            ));
        }
        if self.pipeline == 0 {
            return Err("--pipeline must be at least 1".into());
        }
        if self.pipeline > crate::worker::PIPELINE_MAX {
            return Err(format!("--pipeline must be at most {}", crate::worker::PIPELINE_MAX));
        }
        if self.records_per_frame == 0 {
            return Err("--records-per-frame must be at least 1".into());
        }
        let frame_bytes = self.records_per_frame as usize * (self.record_bytes.max + 16);
        if frame_bytes > proto::frame::FRAME_BYTES_MAX_DEFAULT - 4096 {
            return Err(format!(
                "--records-per-frame {} x --record-bytes {} makes frames of ~{frame_bytes} bytes, above the daemon's \
                 default frame limit of {} bytes",
                self.records_per_frame,
                self.record_bytes,
                proto::frame::FRAME_BYTES_MAX_DEFAULT
            ));
        }
        if self.streams == 0 {
            return Err("--streams must be at least 1".into());
        }
        if self.stream_base.checked_add(self.streams).is_none() {
            return Err("--stream-base + --streams overflows u64".into());
        }
        if self.stream_dist == StreamDist::Zipf {
            if self.streams > crate::streams::ZIPF_STREAMS_MAX {
                return Err(format!(
                    "--stream-dist zipf supports at most {} streams",
                    crate::streams::ZIPF_STREAMS_MAX
                ));
            }
            if !(self.zipf_exponent.is_finite() && self.zipf_exponent > 0.0) {
                return Err("--zipf-exponent must be a positive number".into());
            }
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("--rate must be a positive number of requests per second".into());
            }
        }
        if self.requests == Some(0) {
            return Err("--requests must be at least 1".into());
        }
        if self.response_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err("--response-timeout and --connect-timeout must be above zero".into());
        }
        if self.duration.is_zero() && self.requests.is_none() {
            return Err("--duration is zero: give a duration or --requests".into());
        }
        if self.ack != Ack::Durable && self.verify_log.is_some() {
            // `verify` treats every logged record as durable; a `written` ack may be lost in a
            // crash without any fault, and `none` acks nothing.
            return Err("--verify-log checks durability: use it with --ack durable".into());
        }
        Ok(())
    }

    pub fn mode(&self) -> &'static str {
        if self.rate.is_some() {
            "open"
        } else {
            "closed"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> RunArgs {
        let mut v = vec!["shardlog-bench"];
        v.extend_from_slice(args);
        Wrapper::try_parse_from(v).expect("parse").run
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_are_a_valid_closed_loop() {
        let args = parse(&[]);
        assert_eq!(args.addrs, vec![ADDR_DEFAULT.parse::<SocketAddr>().expect("addr")]);
        assert_eq!(args.ack, Ack::Durable);
        assert_eq!(args.mode(), "closed");
        assert_eq!(args.validate(), Ok(()));
    }

    #[test]
    fn repeated_addr_and_short_flags() {
        let args = parse(&[
            "--addr",
            "127.0.0.1:1",
            "--addr",
            "127.0.0.1:2",
            "-c",
            "4",
            "-P",
            "16",
            "-B",
            "64",
            "-S",
            "100..200",
            "--rate",
            "1000",
        ]);
        assert_eq!(args.addrs.len(), 2);
        assert_eq!((args.connections, args.pipeline, args.records_per_frame), (4, 16, 64));
        assert_eq!(args.record_bytes, SizeRange { min: 100, max: 200 });
        assert_eq!(args.mode(), "open");
        assert_eq!(args.validate(), Ok(()));
    }

    #[test]
    fn invalid_combinations_are_explained() {
        assert!(parse(&["--threads", "4", "-c", "2"])
            .validate()
            .unwrap_err()
            .contains("each thread"));
        assert!(parse(&["-B", "64", "-S", "1048576"])
            .validate()
            .unwrap_err()
            .contains("frame limit"));
        assert!(parse(&["--ack", "none", "--verify-log", "x"]).validate().is_err());
        assert!(parse(&["--ack", "written", "--verify-log", "x"]).validate().is_err());
        assert_eq!(parse(&["--verify-log", "x"]).validate(), Ok(()));
        assert!(parse(&["--rate", "0"]).validate().is_err());
    }
}
