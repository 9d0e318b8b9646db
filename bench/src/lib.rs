//! shardlog-bench: a load generator and durability checker for shardlogd.
//!
//! - [`run`]: a run (threads, live line, report); [`worker`]: one thread's epoll loop;
//! - [`frames`]: append frames patched from a template, answers read in place;
//! - [`connect`]: connect and `Hello`, shard-aware addresses; [`cpu`]: the generator's CPU;
//! - [`pacing`]: open-loop schedules, latency from the intended send time;
//! - [`payload`]: self-describing payloads (run, writer, stream, seq);
//! - [`verify_log`] and [`verify`]: the log of acknowledged records and the read-back check;
//! - [`report`], [`stats`], [`chart`]: what comes out.

pub mod chart;
pub mod config;
pub mod connect;
pub mod cpu;
pub mod frames;
pub mod pacing;
pub mod payload;
pub mod report;
pub mod rng;
pub mod run;
pub mod stats;
pub mod streams;
pub mod verify;
pub mod verify_log;
pub mod worker;
