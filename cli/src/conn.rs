//! Connections to the daemon: the routed address given by `--addr`, and, when the daemon's
//! `HelloOk.shard_addresses` offers them, one shard-aware connection per shard used, opened on
//! first use. A request about shard s goes to s's own address when there is one (it is then
//! served on that shard's core without the routing hop), else to the routed connection, which
//! serves every shard.

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use proto::client::{Client, ReadParams};
use proto::codec::{decode_response, response_kind};
use proto::frame::{FrameReader, READ_CHUNK_BYTES};
use proto::wire::{HelloOkT, ReadT, RecordsT, RequestBodyT, ResponseBodyT};
use proto::{ClientError, ServerError};

use crate::failure::Failure;

/// Name sent in `Hello`, for the daemon's logs.
const CLIENT_NAME: &str = concat!("shardlog-cli/", env!("CARGO_PKG_VERSION"));

/// Key of one connection: the routed one, or shard s's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Routed,
    Shard(u16),
}

pub struct Conns {
    timeout: Duration,
    routed: Client,
    hello: HelloOkT,
    /// Indexed by shard; empty when the daemon offers no shard-aware connections.
    shard_addrs: Vec<String>,
    shard_conns: Vec<Option<Client>>,
}

impl Conns {
    pub fn connect(addr: &str, timeout: Duration) -> Result<Conns, Failure> {
        let (routed, hello) = open(addr, timeout)?;
        if hello.shard_count == 0 {
            return Err(Failure::Usage(format!("shardlogd at {addr} reports zero shards")));
        }
        let peer = routed_peer(addr);
        let shard_addrs: Vec<String> = hello
            .shard_addresses
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|a| usable_address(&a, peer))
            .collect();
        // An address list that does not cover every shard cannot be indexed by shard id; use
        // the routed connection for everything rather than guess.
        let shard_addrs = if shard_addrs.len() == usize::from(hello.shard_count) {
            shard_addrs
        } else {
            Vec::new()
        };
        let shard_conns = (0..shard_addrs.len()).map(|_| None).collect();
        Ok(Conns {
            timeout,
            routed,
            hello,
            shard_addrs,
            shard_conns,
        })
    }

    pub fn shard_count(&self) -> u16 {
        self.hello.shard_count
    }

    /// Shard s's own address, when the daemon offers one.
    pub fn shard_address(&self, shard: u16) -> Option<&str> {
        self.shard_addrs.get(usize::from(shard)).map(String::as_str)
    }

    /// The connection that requests about `shard` go to.
    pub fn route(&self, shard: u16) -> Route {
        if usize::from(shard) < self.shard_addrs.len() {
            Route::Shard(shard)
        } else {
            Route::Routed
        }
    }

    /// The connection for `route`, opened now if it is a shard's and not open yet.
    pub fn get(&mut self, route: Route) -> Result<&mut Client, Failure> {
        match route {
            Route::Routed => Ok(&mut self.routed),
            Route::Shard(s) => {
                let slot = &mut self.shard_conns[usize::from(s)];
                if slot.is_none() {
                    let (client, _) = open(&self.shard_addrs[usize::from(s)], self.timeout)?;
                    *slot = Some(client);
                }
                Ok(slot.as_mut().expect("opened above"))
            }
        }
    }

    /// The routed connection (stats, ping).
    pub fn routed(&mut self) -> &mut Client {
        &mut self.routed
    }

    /// Every open connection with its route.
    pub fn open_routes(&self) -> Vec<Route> {
        let mut routes = vec![Route::Routed];
        for (s, c) in self.shard_conns.iter().enumerate() {
            if c.is_some() {
                routes.push(Route::Shard(s as u16));
            }
        }
        routes
    }
}

fn open(addr: &str, timeout: Duration) -> Result<(Client, HelloOkT), Failure> {
    let connect_err = |source| Failure::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut client = Client::connect_raw(addr).map_err(connect_err)?;
    client.set_read_timeout(Some(timeout)).map_err(connect_err)?;
    let hello = client.hello(CLIENT_NAME).map_err(connect_err)?;
    Ok((client, hello))
}

fn routed_peer(addr: &str) -> Option<SocketAddr> {
    addr.to_socket_addrs().ok().and_then(|mut a| a.next())
}

/// A shard address the daemon reports as its bind address (`0.0.0.0:p`, `[::]:p`) is reached at
/// the host the routed address named.
fn usable_address(reported: &str, routed: Option<SocketAddr>) -> String {
    match (reported.parse::<SocketAddr>(), routed) {
        (Ok(a), Some(r)) if a.ip().is_unspecified() => SocketAddr::new(r.ip(), a.port()).to_string(),
        _ => reported.to_string(),
    }
}

/// Largest `Records` response `consume` accepts, in bytes.
///
/// proto's `Client` refuses response frames above `FRAME_BYTES_MAX_DEFAULT` (4 MiB), but the
/// daemon bounds a read by payload bytes and by on-disk bytes scanned (8 MiB at least), not by
/// the size of its answer: a read over many small records can answer with a frame of 10 MiB or
/// more. Until the daemon caps its answers, `consume` reads them itself with this larger cap.
pub const RECORDS_FRAME_BYTES_MAX: usize = 256 << 20;

/// Sends `Read` requests on a `Client`'s socket and reads the answers with its own frame reader
/// (see [`RECORDS_FRAME_BYTES_MAX`]). The connection must carry nothing else meanwhile: each read
/// waits for its answer, so no other response can be in flight or half-read.
pub struct RecordsReader {
    frames: FrameReader,
}

impl RecordsReader {
    pub fn new() -> RecordsReader {
        RecordsReader {
            frames: FrameReader::new(RECORDS_FRAME_BYTES_MAX),
        }
    }

    pub fn read(&mut self, client: &mut Client, p: ReadParams) -> Result<RecordsT, ClientError> {
        let id = client.send(RequestBodyT::Read(Box::new(ReadT {
            shard: p.shard,
            from_lsn: p.from_lsn,
            max_bytes: p.max_bytes,
            max_wait_ms: p.max_wait_ms,
            stream: p.stream.unwrap_or(0),
            has_stream: p.stream.is_some(),
        })))?;
        loop {
            if let Some(payload) = self.frames.next_frame()? {
                let resp = decode_response(payload)?;
                // Only this read is in flight; an error with id 0 is about the connection.
                if resp.id != id && resp.id != 0 {
                    continue;
                }
                return match resp.body {
                    ResponseBodyT::Records(r) if resp.id == id => Ok(*r),
                    ResponseBodyT::Error(e) => Err(ClientError::Server(ServerError::from(*e))),
                    other => Err(ClientError::UnexpectedResponse {
                        id,
                        expected: "Records",
                        got: response_kind(&other),
                    }),
                };
            }
            let spare = self.frames.spare(READ_CHUNK_BYTES);
            let n = match client.socket().read(spare) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.frames.filled(0);
                    return Err(e.into());
                }
            };
            self.frames.filled(n);
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_shard_address_takes_the_routed_host() {
        let routed: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        assert_eq!(usable_address("0.0.0.0:7071", Some(routed)), "127.0.0.1:7071");
        assert_eq!(usable_address("10.1.2.3:7071", Some(routed)), "10.1.2.3:7071");
        assert_eq!(usable_address("db1:7071", Some(routed)), "db1:7071");
    }
}
