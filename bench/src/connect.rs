//! Opening a connection: a blocking connect and `Hello`, then the socket is
//! handed to the event loop in non-blocking mode.
//!
//! Shard-aware connections: a daemon that fills `HelloOk.shard_addresses`
//! serves a connection to `shard_addresses[s]` on shard `s`'s own core. The
//! generator then opens one socket per shard for each of its connections and
//! sends each append to the socket of `shard_for(stream)`, so no append takes
//! the daemon's routing hop. With an empty list (a daemon that does not offer
//! it), or with `--routed`, every append goes to the main address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proto::codec::{decode_response, Encoder};
use proto::frame::{FrameReader, FRAME_BYTES_MAX_DEFAULT};
use proto::wire::{HelloOkT, HelloT, RequestBodyT, RequestT, ResponseBodyT};

/// The client name sent in `Hello`.
pub const CLIENT_NAME: &str = "shardlog-bench";

/// Connects to `addr` and exchanges `Hello`, all within `timeout`. The returned
/// socket has `TCP_NODELAY` set and is non-blocking.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<(TcpStream, HelloOkT), String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect: {e}"))?;
    let io = |e: std::io::Error| format!("Hello failed: {e}");
    stream.set_nodelay(true).map_err(io)?;
    let mut out = Vec::new();
    let hello = RequestT {
        id: 1,
        body: RequestBodyT::Hello(Box::new(HelloT {
            version: proto::PROTOCOL_VERSION,
            client_name: Some(CLIENT_NAME.to_string()),
            auth_token: None,
        })),
    };
    Encoder::new().request(&hello, &mut out);
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&out).map_err(io)?;
    let mut reader = FrameReader::new(FRAME_BYTES_MAX_DEFAULT);
    let resp = loop {
        if let Some(payload) = reader
            .next_frame()
            .map_err(|e| format!("bad frame in answer to Hello: {e}"))?
        {
            break decode_response(payload).map_err(|e| format!("undecodable answer to Hello: {e}"))?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer to Hello within {timeout:?}"));
        }
        stream.set_read_timeout(Some(left)).map_err(io)?;
        let spare = reader.spare(4096);
        match stream.read(spare) {
            Ok(0) => {
                reader.filled(0);
                return Err("the server closed the connection during Hello".into());
            }
            Ok(n) => reader.filled(n),
            Err(e) => {
                reader.filled(0);
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                    return Err(format!("no answer to Hello within {timeout:?}"));
                }
                return Err(io(e));
            }
        }
    };
    let hello = match resp.body {
        ResponseBodyT::HelloOk(ok) => *ok,
        ResponseBodyT::Error(e) => return Err(format!("Hello refused: {}", proto::ServerError::from(*e))),
        other => return Err(format!("expected HelloOk, got {}", proto::codec::response_kind(&other))),
    };
    if hello.shard_count == 0 {
        return Err("the server reports 0 shards".into());
    }
    stream.set_nonblocking(true).map_err(io)?;
    Ok((stream, hello))
}

/// The shard-aware addresses a `HelloOk` offers, indexed by shard; `Ok(None)` when it offers
/// none (the daemon routes, and connections stay on the main address).
pub fn shard_addresses(hello: &HelloOkT) -> Result<Option<Vec<SocketAddr>>, String> {
    let Some(list) = hello.shard_addresses.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    if list.len() != usize::from(hello.shard_count) {
        return Err(format!(
            "the server offers {} shard addresses for {} shards",
            list.len(),
            hello.shard_count
        ));
    }
    list.iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("shard address `{a}` is not host:port: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(count: u16, addrs: Option<Vec<&str>>) -> HelloOkT {
        HelloOkT {
            shard_count: count,
            shard_addresses: addrs.map(|v| v.into_iter().map(String::from).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn no_shard_addresses_means_the_main_address() {
        assert_eq!(shard_addresses(&hello(2, None)), Ok(None));
        assert_eq!(shard_addresses(&hello(2, Some(vec![]))), Ok(None));
    }

    #[test]
    fn shard_addresses_are_parsed_in_shard_order() {
        let got = shard_addresses(&hello(2, Some(vec!["127.0.0.1:7071", "127.0.0.1:7072"])));
        let want: Vec<SocketAddr> = vec!["127.0.0.1:7071".parse().unwrap(), "127.0.0.1:7072".parse().unwrap()];
        assert_eq!(got, Ok(Some(want)));
    }

    #[test]
    fn a_list_that_does_not_match_the_shards_is_refused() {
        assert!(shard_addresses(&hello(3, Some(vec!["127.0.0.1:1"]))).is_err());
        assert!(shard_addresses(&hello(1, Some(vec!["nowhere"]))).is_err());
    }
}
