//! `shardlogd`, the shardlog process: command line, startup checks, executors and pinning, front
//! executors with their connections, the rings to the shard executors, and shutdown.
//!
//! The path of one durable append through this crate:
//! 1. `front.rs`: a connection's reader takes a frame off the socket, verifies it
//!    (`proto::codec::view_request`), reserves its bytes from the connection's budget and sends
//!    the raw frame to `proto::shard_for(stream, shard_count)` over that shard's ring.
//! 2. `shard_server.rs`: the shard executor reads the records from the verified frame and calls
//!    `shards::Shard::append`, which enqueues them at once (so a connection's order is kept);
//!    when the append is durable the completion goes back on the front's ring.
//! 3. `front.rs`: the connection's writer sends every completion that is ready in one write,
//!    then returns the budget.
//!
//! On a shard-aware connection (a shard executor's own port, `HelloOk.shard_addresses`) the same
//! `front.rs` code runs on the shard's executor and hands an append for its own shard to
//! `shard_server.rs` by a plain call, and the answer back the same way: no ring, no other core.
//!
//! `server.rs` builds all of this and runs the shutdown; `checks.rs` holds the startup checks.

pub mod checks;
pub mod config;
pub mod faults;
pub mod front;
pub mod host_check;
pub mod metrics;
mod notify;
pub mod plan;
pub mod ring;
pub mod server;
pub mod shard_server;
pub mod stats_cmd;
