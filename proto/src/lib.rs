//! The shardlog wire protocol: the one contract between the daemon and
//! every client.
//!
//! - [`wire`]: the FlatBuffers types generated from `schema/shardlog.fbs`
//!   (checked in; `scripts/gen-proto.sh` regenerates them).
//! - [`frame`]: 4-byte little-endian length prefix, checked before any allocation.
//! - [`codec`]: verified decoding (views and owned values) and encoding.
//! - [`placement`]: `shard_for(stream, shard_count)`, which stream lives where.
//! - [`client`]: a blocking client and a pipelined glommio client.
//! - [`report`]: the readable form of a stats reply.
//!
//! The codec does no I/O. A round trip:
//!
//! ```
//! use proto::{codec, frame, wire};
//!
//! let mut enc = codec::Encoder::new();
//! let mut bytes = Vec::new();
//! enc.append(7, 42, [codec::AppendRecord::new(b"hello")], wire::AckLevel::Durable, &mut bytes);
//!
//! let payload = frame::decode_whole_frame(&bytes, frame::FRAME_BYTES_MAX_DEFAULT).unwrap();
//! let req = codec::decode_request(payload).unwrap();
//! assert_eq!(req.id, 7);
//! let wire::RequestBodyT::Append(append) = req.body else { panic!() };
//! assert_eq!(append.stream, 42);
//! assert_eq!(proto::shard_for(42, 4), proto::shard_for(42, 4));
//! ```

// The generated code names `alloc::` paths.
extern crate alloc;

pub mod append_verify;
pub mod client;
pub mod codec;
pub mod error;
pub mod frame;
pub mod placement;
pub mod report;

#[allow(clippy::all, unsafe_op_in_unsafe_fn, mismatched_lifetime_syntaxes, unused_imports, deprecated)]
#[rustfmt::skip]
#[path = "generated/shardlog_generated.rs"]
mod generated;

/// The generated FlatBuffers types (`shardlog.wire`).
pub use generated::shardlog::wire;

pub use error::{ClientError, DecodeError, ServerError};
pub use placement::{daemon_for, home_for, shard_for};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
