//! A blocking client on `std::net`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{expect_appended, expect_hello_ok, expect_pong, expect_records, expect_stats, hello_body, ReadParams};
use crate::codec::{decode_response, AppendRecord, Encoder};
use crate::error::{ClientError, ServerError};
use crate::frame::{FrameReader, FRAME_BYTES_MAX_DEFAULT, READ_CHUNK_BYTES};
use crate::wire::{
    AckLevel, AppendedT, HelloOkT, ReadRecordT, RecordsT, RequestBodyT, RequestT, ResponseBodyT, ResponseT,
    StatsReplyT, StatsT,
};

/// A blocking connection to shardlogd.
///
/// Simple calls (`append`, `read`, ...) send one request and wait for its
/// response. For pipelining, `send_*` returns the request id at once and
/// `wait(id)` or `recv()` collect responses in any order.
pub struct Client {
    stream: TcpStream,
    encoder: Encoder,
    out: Vec<u8>,
    reader: FrameReader,
    next_id: u64,
    hello: Option<HelloOkT>,
    /// Responses that arrived while waiting for another id.
    stash: HashMap<u64, ResponseT>,
    /// Arrival order of stashed responses, for `recv`.
    stash_order: Vec<u64>,
    /// Errors for requests nobody is waiting on (appends with `AckLevel::None`).
    orphan_errors: Vec<(u64, ServerError)>,
    /// Ids sent with `AckLevel::None`: no success response will come.
    fire_and_forget: std::collections::HashSet<u64>,
}

impl Client {
    /// Connects and exchanges `Hello`.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let mut client = Self::connect_raw(addr)?;
        client.hello("shardlog-client")?;
        Ok(client)
    }

    /// Connects without sending `Hello` (the server then assumes version 1).
    pub fn connect_raw(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            encoder: Encoder::new(),
            out: Vec::new(),
            reader: FrameReader::new(FRAME_BYTES_MAX_DEFAULT),
            next_id: 1,
            hello: None,
            stash: HashMap::new(),
            stash_order: Vec::new(),
            orphan_errors: Vec::new(),
            fire_and_forget: Default::default(),
        })
    }

    /// Sets a timeout on socket reads; a wait that exceeds it fails with `Io(TimedOut/WouldBlock)`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        Ok(self.stream.set_read_timeout(timeout)?)
    }

    /// The underlying socket, for tests that misbehave on purpose.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The server's `HelloOk`, if `hello` was exchanged.
    pub fn server_hello(&self) -> Option<&HelloOkT> {
        self.hello.as_ref()
    }

    /// The server's shard count, learnt from `Hello`.
    pub fn shard_count(&self) -> Option<u16> {
        self.hello.as_ref().map(|h| h.shard_count)
    }

    pub fn hello(&mut self, client_name: &str) -> Result<HelloOkT, ClientError> {
        let id = self.send(hello_body(client_name))?;
        let ok = expect_hello_ok(self.wait(id)?)?;
        self.hello = Some(ok.clone());
        Ok(ok)
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        let id = self.send(RequestBodyT::Ping(Box::default()))?;
        expect_pong(self.wait(id)?)
    }

    /// Appends one record. Returns `None` for `AckLevel::None`.
    pub fn append(&mut self, stream: u64, payload: &[u8], ack: AckLevel) -> Result<Option<AppendedT>, ClientError> {
        self.append_batch(stream, &[AppendRecord::new(payload)], ack)
    }

    /// Appends records atomically to one stream. Returns `None` for `AckLevel::None`.
    pub fn append_batch(
        &mut self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<Option<AppendedT>, ClientError> {
        let id = self.send_append(stream, records, ack)?;
        if ack == AckLevel::None {
            return Ok(None);
        }
        expect_appended(self.wait(id)?).map(Some)
    }

    pub fn read(&mut self, params: ReadParams) -> Result<RecordsT, ClientError> {
        let id = self.send(params.body())?;
        expect_records(self.wait(id)?)
    }

    /// Follows a shard from `from_lsn`, long-polling for new durable records.
    pub fn tail(&mut self, shard: u16, from_lsn: u64, stream: Option<u64>) -> Tail<'_> {
        Tail {
            client: self,
            params: ReadParams {
                shard,
                from_lsn,
                max_bytes: 1 << 20,
                max_wait_ms: 1000,
                stream,
            },
            buffered: std::collections::VecDeque::new(),
        }
    }

    pub fn stats(&mut self) -> Result<StatsReplyT, ClientError> {
        let id = self.send(RequestBodyT::Stats(Box::new(StatsT {})))?;
        expect_stats(self.wait(id)?)
    }

    /// Sends a request without waiting; returns its id.
    pub fn send(&mut self, body: RequestBodyT) -> Result<u64, ClientError> {
        let id = self.take_id();
        self.encoder.request(&RequestT { id, body }, &mut self.out);
        self.flush()?;
        Ok(id)
    }

    /// Sends an append without waiting; returns its id.
    pub fn send_append(
        &mut self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<u64, ClientError> {
        let id = self.take_id();
        if ack == AckLevel::None {
            self.fire_and_forget.insert(id);
        }
        self.encoder
            .append(id, stream, records.iter().copied(), ack, &mut self.out);
        self.flush()?;
        Ok(id)
    }

    /// Writes raw bytes to the socket (for protocol tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Waits for the response to `id`, keeping others for later.
    pub fn wait(&mut self, id: u64) -> Result<ResponseT, ClientError> {
        if let Some(resp) = self.stash.remove(&id) {
            self.stash_order.retain(|&i| i != id);
            return Ok(resp);
        }
        loop {
            let resp = self.read_response()?;
            if resp.id == id {
                return Ok(resp);
            }
            self.keep(resp);
        }
    }

    /// The next response, whatever its id.
    pub fn recv(&mut self) -> Result<ResponseT, ClientError> {
        if !self.stash_order.is_empty() {
            let id = self.stash_order.remove(0);
            if let Some(resp) = self.stash.remove(&id) {
                return Ok(resp);
            }
        }
        loop {
            let resp = self.read_response()?;
            if self.fire_and_forget.remove(&resp.id) {
                self.record_orphan(resp);
                continue;
            }
            return Ok(resp);
        }
    }

    /// Errors received for requests nobody waited on (appends with `AckLevel::None`).
    pub fn take_errors(&mut self) -> Vec<(u64, ServerError)> {
        std::mem::take(&mut self.orphan_errors)
    }

    /// Closes the sending side; the server then finishes and closes.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.stream.shutdown(Shutdown::Write)?;
        Ok(())
    }

    fn keep(&mut self, resp: ResponseT) {
        if self.fire_and_forget.remove(&resp.id) || resp.id == 0 {
            self.record_orphan(resp);
            return;
        }
        self.stash_order.push(resp.id);
        self.stash.insert(resp.id, resp);
    }

    fn record_orphan(&mut self, resp: ResponseT) {
        if let ResponseBodyT::Error(e) = resp.body {
            self.orphan_errors.push((resp.id, ServerError::from(*e)));
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// Reads one response off the socket.
    pub fn read_response(&mut self) -> Result<ResponseT, ClientError> {
        loop {
            if let Some(payload) = self.reader.next_frame()? {
                let resp = decode_response(payload)?;
                if resp.id == 0 {
                    // A connection-level error (bad frame, too many connections).
                    if let ResponseBodyT::Error(_) = &resp.body {
                        return super::into_result(resp);
                    }
                }
                return Ok(resp);
            }
            let spare = self.reader.spare(READ_CHUNK_BYTES);
            let n = match self.stream.read(spare) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.reader.filled(0);
                    return Err(e.into());
                }
            };
            self.reader.filled(n);
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }
}

/// An iterator over a shard's records that long-polls for new ones.
///
/// Ends only on error; each `next` blocks until a record is durable.
pub struct Tail<'c> {
    client: &'c mut Client,
    params: ReadParams,
    buffered: std::collections::VecDeque<ReadRecordT>,
}

impl Tail<'_> {
    /// The lsn the next read will ask for.
    pub fn next_lsn(&self) -> u64 {
        self.params.from_lsn
    }
}

impl Iterator for Tail<'_> {
    type Item = Result<ReadRecordT, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.buffered.pop_front() {
                return Some(Ok(r));
            }
            match self.client.read(self.params) {
                Ok(batch) => {
                    self.params.from_lsn = batch.next_lsn.max(self.params.from_lsn);
                    self.buffered.extend(batch.records.unwrap_or_default());
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A shard-aware blocking client: one connection per shard, each to the address the server lists
/// for that shard (`HelloOk.shard_addresses`), where the shard's own core serves it. An append
/// goes to the connection of the shard that owns its stream ([`crate::shard_for`]), a read to the
/// connection of the shard it names, so neither crosses cores inside the server.
///
/// A server that lists no shard addresses (an older one, or `--shard-ports off`) is served
/// through the one routed connection instead; [`ShardAwareClient::is_shard_aware`] tells which.
/// Both paths serve the same data, so the mode changes latency, never results. Order is kept per
/// stream (a stream's appends all use one connection), not across streams of different shards.
pub struct ShardAwareClient {
    /// One connection per shard, or the single routed connection.
    conns: Vec<Client>,
    shard_count: u16,
    shard_aware: bool,
}

impl ShardAwareClient {
    /// Connects to the main address, reads the shard map from `HelloOk`, and opens one
    /// connection per shard (then closes the first one).
    pub fn connect(addr: impl ToSocketAddrs) -> Result<ShardAwareClient, ClientError> {
        ShardAwareClient::connect_with(addr, |a| Client::connect(a))
    }

    /// As [`ShardAwareClient::connect`], with every connection (the routed one and each shard's)
    /// opened by `open`, which must send `Hello` (to set a client name or a read timeout).
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        open: impl Fn(&[SocketAddr]) -> Result<Client, ClientError>,
    ) -> Result<ShardAwareClient, ClientError> {
        let routed = open(&addr.to_socket_addrs()?.collect::<Vec<_>>())?;
        let hello = routed.server_hello().cloned().expect("open exchanges Hello");
        let addresses = super::shard_addresses(&hello)?;
        if addresses.is_empty() {
            return Ok(ShardAwareClient {
                conns: vec![routed],
                shard_count: hello.shard_count,
                shard_aware: false,
            });
        }
        drop(routed);
        let conns = addresses
            .iter()
            .map(|a| open(&a.as_str().to_socket_addrs()?.collect::<Vec<_>>()))
            .collect::<Result<Vec<_>, _>>()?;
        assert_eq!(conns.len(), hello.shard_count as usize);
        Ok(ShardAwareClient {
            conns,
            shard_count: hello.shard_count,
            shard_aware: true,
        })
    }

    /// Sets the read timeout of every connection.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.conns.iter().try_for_each(|c| c.set_read_timeout(timeout))
    }

    /// Whether each shard has its own connection (the server offered shard addresses).
    pub fn is_shard_aware(&self) -> bool {
        self.shard_aware
    }

    pub fn shard_count(&self) -> u16 {
        self.shard_count
    }

    /// The connection that serves `shard` (for pipelining with `send_*` and `wait`).
    pub fn connection(&mut self, shard: u16) -> &mut Client {
        assert!(shard < self.shard_count, "shard {shard} of {}", self.shard_count);
        let at = if self.conns.len() == 1 { 0 } else { shard as usize };
        &mut self.conns[at]
    }

    /// The connection that serves `stream`'s appends.
    pub fn connection_for_stream(&mut self, stream: u64) -> &mut Client {
        let shard = crate::shard_for(stream, self.shard_count);
        self.connection(shard)
    }

    /// Appends one record on the owning shard's connection. `None` for `AckLevel::None`.
    pub fn append(&mut self, stream: u64, payload: &[u8], ack: AckLevel) -> Result<Option<AppendedT>, ClientError> {
        self.connection_for_stream(stream).append(stream, payload, ack)
    }

    /// Appends records atomically to one stream, on the owning shard's connection.
    pub fn append_batch(
        &mut self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<Option<AppendedT>, ClientError> {
        self.connection_for_stream(stream).append_batch(stream, records, ack)
    }

    /// Reads on the connection of the shard `params` names.
    pub fn read(&mut self, params: ReadParams) -> Result<RecordsT, ClientError> {
        if params.shard >= self.shard_count {
            // Let the server answer NoSuchShard, as on a routed connection.
            return self.conns[0].read(params);
        }
        self.connection(params.shard).read(params)
    }

    pub fn stats(&mut self) -> Result<StatsReplyT, ClientError> {
        self.conns[0].stats()
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.conns[0].ping()
    }

    /// Errors received on any connection for requests nobody waited on.
    pub fn take_errors(&mut self) -> Vec<(u64, ServerError)> {
        self.conns.iter_mut().flat_map(|c| c.take_errors()).collect()
    }
}
