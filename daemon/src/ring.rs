//! Messages on the cross-executor rings between front executors and shard executors.
//!
//! Each (front, shard) pair has two bounded glommio `shared_channel`s: requests one way,
//! completions back. A front that finds a request ring full stops reading the connection that
//! wants to send, so a slow shard pushes back on its clients through TCP. The completion side
//! never blocks for long: the front only appends each completion to a connection's outbound
//! buffer, whose size the connection's budget already bounds.
//!
//! Why `shared_channel` and not `channel_mesh`: the topology is bipartite and one-directional per
//! channel (fronts send requests, shards send completions), which a full mesh of every executor
//! to every other does not express, and a mesh cannot include a front and a shard that share one
//! executor (the single-core layout calls the shard directly instead). Measured on this machine
//! class (shared/FACTS.md), a bounded `shared_channel` moves 3.8-7.3M msgs/s core to core against
//! 2.5-4.0M/s for `channel_mesh`, both far above what the disk commits, so the choice is about
//! shape, not speed. Messages are small: an append carries its request frame as one `Vec<u8>`
//! (moved, not copied), which the shard reads through the FlatBuffers view.

use proto::wire::{ErrorCode, ShardStatsT};

/// A front-local connection number; 0 is never used.
pub type ConnId = u64;

/// Front to shard.
#[derive(Debug)]
pub enum ToShard {
    /// `frame` is a request payload whose verification succeeded on the front and whose body is
    /// an `Append` of a stream this shard owns. The shard reads the records straight from it.
    Append {
        conn: ConnId,
        id: u64,
        reserved: usize,
        frame: Vec<u8>,
    },
    Read {
        conn: ConnId,
        id: u64,
        reserved: usize,
        read: ReadArgs,
    },
    Stats {
        token: u64,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct ReadArgs {
    pub from_lsn: u64,
    pub max_bytes: usize,
    pub max_wait_ms: u32,
    pub stream: Option<u64>,
}

/// Shard to front.
#[derive(Debug)]
pub enum FromShard {
    /// The answer to one request of connection `conn`; `reserved` budget bytes are returned to
    /// the connection once the reply is written to its socket.
    Reply {
        conn: ConnId,
        id: u64,
        reserved: usize,
        reply: Reply,
    },
    Stats {
        token: u64,
        stats: Box<ShardStatsT>,
    },
}

#[derive(Debug)]
pub enum Reply {
    Appended {
        shard: u16,
        first_lsn: u64,
        count: u32,
    },
    /// A successful append with `AckLevel::None`: nothing is sent, only the budget returns.
    Silent,
    /// A complete response frame, encoded on the shard core (reads).
    Frame(Vec<u8>),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// A read below retention: `Error(Truncated)` with the shard's first retained lsn.
    Truncated {
        first_available_lsn: u64,
        message: String,
    },
}
