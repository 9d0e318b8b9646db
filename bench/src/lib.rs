//! shardlog-bench: a load generator and durability checker for shardlogd.
//!
//! - [`run`]: the generator (closed or open loop, any ack level, several executors);
//! - [`pacing`]: open-loop schedules, latency from the intended send time;
//! - [`payload`]: self-describing payloads (run, writer, stream, seq);
//! - [`verify_log`] and [`verify`]: the log of acknowledged records and the read-back check;
//! - [`report`], [`stats`], [`chart`]: what comes out.

pub mod chart;
pub mod config;
pub mod pacing;
pub mod payload;
pub mod report;
pub mod rng;
pub mod run;
pub mod stats;
pub mod streams;
pub mod verify;
pub mod verify_log;
