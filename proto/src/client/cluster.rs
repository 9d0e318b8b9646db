//! A blocking client for a cluster: an ordered list of independent daemons.
//!
//! A stream's home is `home_for(stream, shard_counts)` (docs/PROTOCOL.md, "Cluster placement"):
//! the daemon is `daemon_for(stream, daemon_count)`, which needs no connection, and the shard is
//! `shard_for` over that daemon's shard count, learnt from its `HelloOk`. So a daemon is
//! connected only when a request first needs it, and a daemon that is down fails only the
//! requests for its own streams, with a [`ClusterError`] that names it; the other daemons keep
//! serving. As a Kafka producer does with a broker, a connection that failed is dropped and the
//! next request for that daemon connects again.
//!
//! Ordering and lsns are per shard, as on one daemon; there is no order across daemons.
//!
//! It holds one [`ShardAwareClient`] per daemon: where a daemon offers shard addresses, each of
//! its shards has its own connection, served on that shard's core. [`AsyncClusterClient`] is the
//! pipelined counterpart for glommio executors, over [`AsyncShardAwareClient`]s.

use std::time::Duration;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use super::{AsyncShardAwareClient, Client, ReadParams, ShardAwareClient};
use crate::codec::AppendRecord;
use crate::error::{ClientError, ServerError};
use crate::placement::{daemon_for, shard_for};
use crate::wire::{AckLevel, AppendedT, ErrorCode, RecordsT};

/// Name sent in `Hello` unless [`ClusterClient::with_client_name`] says otherwise.
pub const CLUSTER_CLIENT_NAME_DEFAULT: &str = "shardlog-cluster-client";

/// Why a cluster request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster's address list is empty.
    #[error("a cluster needs at least one daemon address")]
    Empty,
    /// The list has more daemons than placement can index.
    #[error("a cluster has at most {max} daemons, {given} given", max = u32::MAX)]
    TooMany { given: usize },
    /// One daemon failed (could not be reached, closed the connection, or answered an `Error`).
    /// Only that daemon's streams are affected.
    #[error("daemon {daemon} of the cluster ({addr}): {source}")]
    Daemon {
        /// The daemon's index in the cluster's address list.
        daemon: u32,
        addr: String,
        #[source]
        source: ClientError,
    },
}

impl ClusterError {
    /// The index of the daemon that failed, if one did.
    pub fn daemon(&self) -> Option<u32> {
        match self {
            ClusterError::Daemon { daemon, .. } => Some(*daemon),
            _ => None,
        }
    }

    /// The daemon's error code, if it answered with an `Error`.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClusterError::Daemon { source, .. } => source.server_code(),
            _ => None,
        }
    }

    /// The underlying client error, if a daemon failed.
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            ClusterError::Daemon { source, .. } => Some(source),
            _ => None,
        }
    }
}

struct Member {
    addr: String,
    /// `None` until first used, and again after the connection failed.
    conn: Option<ShardAwareClient>,
}

/// A blocking client of a cluster of daemons; see the module documentation.
pub struct ClusterClient {
    members: Vec<Member>,
    read_timeout: Option<Duration>,
    client_name: String,
}

impl ClusterClient {
    /// A client of the daemons at `addrs`, in cluster order. Connects to none of them yet.
    pub fn new<A: Into<String>>(addrs: impl IntoIterator<Item = A>) -> Result<ClusterClient, ClusterError> {
        let members: Vec<Member> = addrs
            .into_iter()
            .map(|a| Member {
                addr: a.into(),
                conn: None,
            })
            .collect();
        if members.is_empty() {
            return Err(ClusterError::Empty);
        }
        if u32::try_from(members.len()).is_err() {
            return Err(ClusterError::TooMany { given: members.len() });
        }
        Ok(ClusterClient {
            members,
            read_timeout: None,
            client_name: CLUSTER_CLIENT_NAME_DEFAULT.to_string(),
        })
    }

    /// Sets the socket read timeout of every connection, now and later.
    pub fn with_read_timeout(mut self, timeout: Option<Duration>) -> ClusterClient {
        self.read_timeout = timeout;
        for m in &mut self.members {
            // A connection whose timeout cannot be set is dropped; the next use reconnects.
            if m.conn.as_ref().is_some_and(|c| c.set_read_timeout(timeout).is_err()) {
                m.conn = None;
            }
        }
        self
    }

    /// The name sent in `Hello` by connections opened from now on.
    pub fn with_client_name(mut self, name: &str) -> ClusterClient {
        self.client_name = name.to_string();
        self
    }

    pub fn daemon_count(&self) -> u32 {
        self.members.len() as u32
    }

    /// The cluster's addresses, in order.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.addr.as_str())
    }

    /// The address of daemon `daemon`.
    ///
    /// # Panics
    /// If `daemon` is not below [`Self::daemon_count`].
    pub fn address(&self, daemon: u32) -> &str {
        &self.members[daemon as usize].addr
    }

    /// The daemon that is home to `stream` (needs no connection).
    pub fn daemon_for(&self, stream: u64) -> u32 {
        daemon_for(stream, self.daemon_count())
    }

    /// `stream`'s home `(daemon, shard)`; connects to the daemon to learn its shard count.
    pub fn home_for(&mut self, stream: u64) -> Result<(u32, u16), ClusterError> {
        let daemon = self.daemon_for(stream);
        let shard_count = self.shard_count(daemon)?;
        Ok((daemon, shard_for(stream, shard_count)))
    }

    /// Daemon `daemon`'s shard count, from its `HelloOk` (connecting if needed).
    pub fn shard_count(&mut self, daemon: u32) -> Result<u16, ClusterError> {
        Ok(self.daemon(daemon)?.shard_count())
    }

    /// The connection to daemon `daemon`, opened (with `Hello`) if it is not open.
    ///
    /// # Panics
    /// If `daemon` is not below [`Self::daemon_count`].
    pub fn daemon(&mut self, daemon: u32) -> Result<&mut ShardAwareClient, ClusterError> {
        assert!(daemon < self.daemon_count(), "daemon {daemon} is not in the cluster");
        let (timeout, name) = (self.read_timeout, self.client_name.clone());
        let member = &mut self.members[daemon as usize];
        if member.conn.is_none() {
            let opened = connect(&member.addr, timeout, &name).map_err(|source| ClusterError::Daemon {
                daemon,
                addr: member.addr.clone(),
                source,
            })?;
            member.conn = Some(opened);
        }
        Ok(member.conn.as_mut().expect("opened above"))
    }

    /// Appends one record to `stream` on its home. Returns `None` for `AckLevel::None`.
    pub fn append(&mut self, stream: u64, payload: &[u8], ack: AckLevel) -> Result<Option<AppendedT>, ClusterError> {
        self.append_batch(stream, &[AppendRecord::new(payload)], ack)
    }

    /// Appends records atomically to `stream` on its home. Returns `None` for `AckLevel::None`.
    ///
    /// If this fails with a connection error, the append may or may not be durable (as on one
    /// daemon); read the stream back to learn which.
    pub fn append_batch(
        &mut self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<Option<AppendedT>, ClusterError> {
        let daemon = self.daemon_for(stream);
        self.on(daemon, |c| c.append_batch(stream, records, ack))
    }

    /// `stream`'s durable records on its home shard from `from_lsn`, up to about `max_bytes` of
    /// payload, without waiting.
    pub fn read_stream(&mut self, stream: u64, from_lsn: u64, max_bytes: u32) -> Result<RecordsT, ClusterError> {
        let (daemon, shard) = self.home_for(stream)?;
        let params = ReadParams {
            max_bytes,
            stream: Some(stream),
            ..ReadParams::new(shard, from_lsn)
        };
        self.read(daemon, params)
    }

    /// A `Read` on daemon `daemon` (for reading a whole shard of one daemon).
    pub fn read(&mut self, daemon: u32, params: ReadParams) -> Result<RecordsT, ClusterError> {
        self.on(daemon, |c| c.read(params))
    }

    /// Errors received for appends sent with `AckLevel::None`, as `(daemon, request id, error)`,
    /// from every open connection.
    pub fn take_errors(&mut self) -> Vec<(u32, u64, ServerError)> {
        let mut errors = Vec::new();
        for (d, m) in self.members.iter_mut().enumerate() {
            if let Some(c) = &mut m.conn {
                errors.extend(c.take_errors().into_iter().map(|(id, e)| (d as u32, id, e)));
            }
        }
        errors
    }

    /// Runs `f` on daemon `daemon`'s connection. A failure other than a daemon's `Error` answer
    /// leaves the connection in an unknown state, so it is dropped; the next request reconnects.
    fn on<T>(
        &mut self,
        daemon: u32,
        f: impl FnOnce(&mut ShardAwareClient) -> Result<T, ClientError>,
    ) -> Result<T, ClusterError> {
        let client = self.daemon(daemon)?;
        match f(client) {
            Ok(v) => Ok(v),
            Err(source) => {
                let member = &mut self.members[daemon as usize];
                if !matches!(source, ClientError::Server(_)) {
                    member.conn = None;
                }
                Err(ClusterError::Daemon {
                    daemon,
                    addr: member.addr.clone(),
                    source,
                })
            }
        }
    }
}

/// One daemon's connections: shard-aware where the daemon offers shard addresses, each with the
/// cluster's read timeout and client name.
fn connect(addr: &str, timeout: Option<Duration>, name: &str) -> Result<ShardAwareClient, ClientError> {
    ShardAwareClient::connect_with(addr, |a| {
        let mut client = Client::connect_raw(a)?;
        client.set_read_timeout(timeout)?;
        client.hello(name)?;
        Ok(client)
    })
}

/// A pipelined client of a cluster, for glommio executors: one [`AsyncShardAwareClient`] per
/// daemon, connected when a request first needs it, each append sent to its stream's home (see
/// the module documentation). Cheap to clone; clones share the connections, so many tasks can
/// keep appends in flight at once. A daemon whose connection failed is connected again by the
/// next request for it.
#[derive(Clone)]
pub struct AsyncClusterClient {
    members: Rc<[AsyncMember]>,
}

struct AsyncMember {
    addr: SocketAddr,
    conn: RefCell<Option<AsyncShardAwareClient>>,
}

impl AsyncClusterClient {
    /// A client of the cluster whose daemons are `addrs`, in the cluster's order. Connects nothing.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Result<AsyncClusterClient, ClusterError> {
        let members: Vec<AsyncMember> = addrs
            .into_iter()
            .map(|addr| AsyncMember {
                addr,
                conn: RefCell::new(None),
            })
            .collect();
        if members.is_empty() {
            return Err(ClusterError::Empty);
        }
        if u32::try_from(members.len()).is_err() {
            return Err(ClusterError::TooMany { given: members.len() });
        }
        Ok(AsyncClusterClient {
            members: Rc::from(members),
        })
    }

    /// The number of daemons.
    pub fn daemon_count(&self) -> u32 {
        self.members.len() as u32
    }

    /// The daemon that is home to `stream`.
    pub fn daemon_for(&self, stream: u64) -> u32 {
        daemon_for(stream, self.daemon_count())
    }

    /// Daemon `daemon`'s connections, opened if needed.
    pub async fn daemon(&self, daemon: u32) -> Result<AsyncShardAwareClient, ClusterError> {
        let member = &self.members[daemon as usize];
        let open = member.conn.borrow().clone().filter(|c| c.closed().is_none());
        if let Some(conn) = open {
            return Ok(conn);
        }
        // No borrow is held across the connect: another task may connect too, and the last one
        // to finish is kept; both work.
        let conn = AsyncShardAwareClient::connect(member.addr)
            .await
            .map_err(|source| self.failed(daemon, source))?;
        *member.conn.borrow_mut() = Some(conn.clone());
        Ok(conn)
    }

    /// Appends records to `stream` on its home daemon and shard. Returns `None` for
    /// `AckLevel::None`.
    pub async fn append(
        &self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<Option<AppendedT>, ClusterError> {
        let daemon = self.daemon_for(stream);
        let conn = self.daemon(daemon).await?;
        conn.append(stream, records, ack)
            .await
            .map_err(|source| self.failed(daemon, source))
    }

    /// Reads records of `stream` from its home (the shard in `params` is replaced by the home's).
    pub async fn read_stream(&self, stream: u64, params: ReadParams) -> Result<RecordsT, ClusterError> {
        let daemon = self.daemon_for(stream);
        let conn = self.daemon(daemon).await?;
        let params = ReadParams {
            shard: shard_for(stream, conn.shard_count()),
            stream: Some(stream),
            ..params
        };
        conn.read(params).await.map_err(|source| self.failed(daemon, source))
    }

    /// Closes every open connection.
    pub fn close(&self) {
        for m in self.members.iter() {
            if let Some(c) = m.conn.borrow_mut().take() {
                c.close();
            }
        }
    }

    /// Wraps a daemon's failure; a connection that failed (not an `Error` answer) is dropped, so
    /// the next request connects again.
    fn failed(&self, daemon: u32, source: ClientError) -> ClusterError {
        let member = &self.members[daemon as usize];
        if !matches!(source, ClientError::Server(_)) {
            if let Some(c) = member.conn.borrow_mut().take() {
                c.close();
            }
        }
        ClusterError::Daemon {
            daemon,
            addr: member.addr.to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_cluster_is_refused() {
        assert!(matches!(
            ClusterClient::new(Vec::<String>::new()),
            Err(ClusterError::Empty)
        ));
    }

    #[test]
    fn placement_needs_no_connection() {
        let c = ClusterClient::new(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]).unwrap();
        for s in 0..100 {
            assert_eq!(c.daemon_for(s), daemon_for(s, 3));
        }
    }

    #[test]
    fn an_unreachable_daemon_is_named_in_the_error() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let mut c = ClusterClient::new(["127.0.0.1:1"]).unwrap();
        let err = c.append(7, b"x", AckLevel::Durable).unwrap_err();
        assert_eq!(err.daemon(), Some(0));
        let text = err.to_string();
        assert!(text.contains("daemon 0") && text.contains("127.0.0.1:1"), "{text}");
    }
}
