//! Clients: a blocking one on `std::net` (tests, the CLI, scripts), a
//! pipelined one on glommio (the load generator), and a blocking cluster
//! client that places each stream on its home daemon.
//!
//! Both match responses to requests by id: responses may come back out of
//! order. An `Error` response becomes [`ClientError::Server`]. Errors for
//! appends sent with `AckLevel::None` (which get no success response) are
//! kept and handed out by `take_errors`.

mod blocking;
mod cluster;
mod pipelined;

pub use blocking::{Client, ShardAwareClient, Tail};
pub use cluster::{AsyncClusterClient, ClusterClient, ClusterError, CLUSTER_CLIENT_NAME_DEFAULT};
pub use pipelined::{AsyncClient, AsyncShardAwareClient};

use crate::codec::response_kind;
use crate::error::{ClientError, ServerError};
use crate::wire::{AppendedT, HelloOkT, RecordsT, ResponseBodyT, ResponseT, StatsReplyT};

/// Parameters of a `Read` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadParams {
    pub shard: u16,
    pub from_lsn: u64,
    pub max_bytes: u32,
    pub max_wait_ms: u32,
    pub stream: Option<u64>,
}

impl ReadParams {
    /// Reads shard `shard` from `from_lsn`, up to 1 MiB, without waiting.
    pub fn new(shard: u16, from_lsn: u64) -> Self {
        ReadParams {
            shard,
            from_lsn,
            max_bytes: 1 << 20,
            max_wait_ms: 0,
            stream: None,
        }
    }

    pub(crate) fn body(&self) -> crate::wire::RequestBodyT {
        crate::wire::RequestBodyT::Read(Box::new(crate::wire::ReadT {
            shard: self.shard,
            from_lsn: self.from_lsn,
            max_bytes: self.max_bytes,
            max_wait_ms: self.max_wait_ms,
            stream: self.stream.unwrap_or(0),
            has_stream: self.stream.is_some(),
        }))
    }
}

/// Turns an `Error` response into `Err`, and passes anything else through.
pub(crate) fn into_result(resp: ResponseT) -> Result<ResponseT, ClientError> {
    match resp.body {
        ResponseBodyT::Error(e) => Err(ClientError::Server(ServerError::from(*e))),
        _ => Ok(resp),
    }
}

macro_rules! expect_body {
    ($fn:ident, $variant:ident, $ty:ty) => {
        pub(crate) fn $fn(resp: ResponseT) -> Result<$ty, ClientError> {
            let id = resp.id;
            match into_result(resp)?.body {
                ResponseBodyT::$variant(b) => Ok(*b),
                other => Err(ClientError::UnexpectedResponse {
                    id,
                    expected: stringify!($variant),
                    got: response_kind(&other),
                }),
            }
        }
    };
}

expect_body!(expect_hello_ok, HelloOk, HelloOkT);
expect_body!(expect_appended, Appended, AppendedT);
expect_body!(expect_records, Records, RecordsT);
expect_body!(expect_stats, StatsReply, StatsReplyT);

pub(crate) fn expect_pong(resp: ResponseT) -> Result<(), ClientError> {
    let id = resp.id;
    match into_result(resp)?.body {
        ResponseBodyT::Pong(_) => Ok(()),
        other => Err(ClientError::UnexpectedResponse {
            id,
            expected: "Pong",
            got: response_kind(&other),
        }),
    }
}

/// The shard-aware addresses a `HelloOk` lists: empty if none, else one per shard.
pub(crate) fn shard_addresses(hello: &HelloOkT) -> Result<Vec<String>, ClientError> {
    let addresses = hello.shard_addresses.clone().unwrap_or_default();
    if !addresses.is_empty() && addresses.len() != hello.shard_count as usize {
        // Never guess a route: a map that does not cover every shard is a server bug.
        return Err(ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "HelloOk lists {} shard addresses for {} shards",
                addresses.len(),
                hello.shard_count
            ),
        )));
    }
    Ok(addresses)
}

pub(crate) fn hello_body(client_name: &str) -> crate::wire::RequestBodyT {
    crate::wire::RequestBodyT::Hello(Box::new(crate::wire::HelloT {
        version: crate::PROTOCOL_VERSION,
        client_name: Some(client_name.to_string()),
        auth_token: None,
    }))
}
