//! A pipelined client on glommio: many requests in flight on one
//! connection, responses matched by id in whatever order they arrive.
//!
//! One reader task decodes responses and completes the matching waiter; one
//! writer task flushes everything encoded since its last write in a single
//! `write_all`, so concurrent requests coalesce into few syscalls.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;

use super::{expect_appended, expect_hello_ok, expect_records, expect_stats, hello_body, into_result, ReadParams};
use crate::codec::{decode_response, AppendRecord, Encoder};
use crate::error::{ClientError, ServerError};
use crate::frame::{FrameReader, FRAME_BYTES_MAX_DEFAULT, READ_CHUNK_BYTES};
use crate::wire::{
    AckLevel, AppendedT, HelloOkT, RecordsT, RequestBodyT, RequestT, ResponseBodyT, ResponseT, StatsReplyT, StatsT,
};

/// Bytes of encoded requests a writer may hold before `append` with
/// `AckLevel::None` waits for the socket to drain.
pub const OUTBOUND_BYTES_MAX: usize = 4 << 20;

type Slot = Rc<RefCell<SlotState>>;

#[derive(Default)]
struct SlotState {
    result: Option<Result<ResponseT, ClientError>>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Inner {
    encoder: RefCell<Encoder>,
    out: RefCell<Vec<u8>>,
    writer_waker: RefCell<Option<Waker>>,
    /// Tasks waiting for `out` to drain below `OUTBOUND_BYTES_MAX`.
    drain_wakers: RefCell<Vec<Waker>>,
    pending: RefCell<HashMap<u64, Slot>>,
    next_id: Cell<u64>,
    closed: RefCell<Option<String>>,
    orphan_errors: RefCell<Vec<(u64, ServerError)>>,
}

impl Inner {
    fn fail_all(&self, why: String) {
        if self.closed.borrow().is_none() {
            *self.closed.borrow_mut() = Some(why);
        }
        let pending: Vec<Slot> = self.pending.borrow_mut().drain().map(|(_, s)| s).collect();
        for slot in pending {
            let mut st = slot.borrow_mut();
            st.result = Some(Err(ClientError::Closed));
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
        for w in self.drain_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn complete(&self, resp: ResponseT) {
        let slot = self.pending.borrow_mut().remove(&resp.id);
        match slot {
            Some(slot) => {
                let mut st = slot.borrow_mut();
                st.result = Some(Ok(resp));
                if let Some(w) = st.waker.take() {
                    w.wake();
                }
            }
            None => {
                if let ResponseBodyT::Error(e) = resp.body {
                    self.orphan_errors.borrow_mut().push((resp.id, ServerError::from(*e)));
                }
            }
        }
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// A pipelined connection. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Rc<Inner>,
    hello: Rc<HelloOkT>,
}

impl AsyncClient {
    /// Connects, starts the reader and writer tasks on the current
    /// executor, and exchanges `Hello`.
    pub async fn connect(addr: SocketAddr) -> Result<AsyncClient, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(std::io::Error::from)?;
        stream.set_nodelay(true).map_err(std::io::Error::from)?;
        let (rd, wr) = futures_lite::io::split(stream);
        let inner = Rc::new(Inner {
            next_id: Cell::new(1),
            ..Default::default()
        });
        glommio::spawn_local(reader_task(inner.clone(), rd)).detach();
        glommio::spawn_local(writer_task(inner.clone(), wr)).detach();
        let mut client = AsyncClient {
            inner,
            hello: Rc::new(HelloOkT::default()),
        };
        let hello = expect_hello_ok(client.call(hello_body("shardlog-async-client")).await?)?;
        client.hello = Rc::new(hello);
        Ok(client)
    }

    /// The server's `HelloOk`.
    pub fn server_hello(&self) -> &HelloOkT {
        &self.hello
    }

    pub fn shard_count(&self) -> u16 {
        self.hello.shard_count
    }

    /// Requests currently awaiting a response.
    pub fn in_flight(&self) -> usize {
        self.inner.pending.borrow().len()
    }

    /// Sends a request and waits for its response (an `Error` response is returned as a value).
    pub async fn call(&self, body: RequestBodyT) -> Result<ResponseT, ClientError> {
        let (id, slot) = self.register()?;
        {
            let mut enc = self.inner.encoder.borrow_mut();
            enc.request(&RequestT { id, body }, &mut self.inner.out.borrow_mut());
        }
        self.inner.wake_writer();
        ResponseFuture { slot }.await
    }

    /// Appends records to `stream`. With `AckLevel::None` this returns
    /// `Ok(None)` once the request is queued for the socket; errors for it
    /// are collected by [`AsyncClient::take_errors`].
    pub async fn append(
        &self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<Option<AppendedT>, ClientError> {
        if ack == AckLevel::None {
            self.wait_outbound_room().await?;
            let id = self.take_id();
            self.encode_append(id, stream, records, ack);
            return Ok(None);
        }
        let (id, slot) = self.register()?;
        self.encode_append(id, stream, records, ack);
        expect_appended(ResponseFuture { slot }.await?).map(Some)
    }

    pub async fn read(&self, params: ReadParams) -> Result<RecordsT, ClientError> {
        expect_records(self.call(params.body()).await?)
    }

    pub async fn stats(&self) -> Result<StatsReplyT, ClientError> {
        expect_stats(self.call(RequestBodyT::Stats(Box::new(StatsT {}))).await?)
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        into_result(self.call(RequestBodyT::Ping(Box::default())).await?).map(|_| ())
    }

    /// Errors received for requests nobody waited on (appends with `AckLevel::None`).
    pub fn take_errors(&self) -> Vec<(u64, ServerError)> {
        std::mem::take(&mut self.inner.orphan_errors.borrow_mut())
    }

    /// Why the connection closed, if it did.
    pub fn closed(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    /// Fails every waiter and stops the connection's tasks.
    pub fn close(&self) {
        self.inner.fail_all("closed by the client".into());
    }

    fn encode_append(&self, id: u64, stream: u64, records: &[AppendRecord<'_>], ack: AckLevel) {
        let mut enc = self.inner.encoder.borrow_mut();
        enc.append(
            id,
            stream,
            records.iter().copied(),
            ack,
            &mut self.inner.out.borrow_mut(),
        );
        drop(enc);
        self.inner.wake_writer();
    }

    fn take_id(&self) -> u64 {
        let id = self.inner.next_id.get();
        self.inner.next_id.set(id + 1);
        id
    }

    fn register(&self) -> Result<(u64, Slot), ClientError> {
        if self.inner.closed.borrow().is_some() {
            return Err(ClientError::Closed);
        }
        let id = self.take_id();
        let slot = Slot::default();
        self.inner.pending.borrow_mut().insert(id, slot.clone());
        Ok((id, slot))
    }

    async fn wait_outbound_room(&self) -> Result<(), ClientError> {
        futures_lite::future::poll_fn(|cx| {
            if self.inner.closed.borrow().is_some() {
                return Poll::Ready(Err(ClientError::Closed));
            }
            if self.inner.out.borrow().len() < OUTBOUND_BYTES_MAX {
                return Poll::Ready(Ok(()));
            }
            self.inner.drain_wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

struct ResponseFuture {
    slot: Slot,
}

impl Future for ResponseFuture {
    type Output = Result<ResponseT, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.slot.borrow_mut();
        match st.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

async fn reader_task(inner: Rc<Inner>, mut rd: ReadHalf<TcpStream>) {
    let mut reader = FrameReader::new(FRAME_BYTES_MAX_DEFAULT);
    let why = loop {
        if inner.closed.borrow().is_some() {
            return;
        }
        match reader.next_frame() {
            Ok(Some(payload)) => match decode_response(payload) {
                Ok(resp) => {
                    inner.complete(resp);
                    continue;
                }
                Err(e) => break format!("undecodable response: {e}"),
            },
            Ok(None) => {}
            Err(e) => break format!("bad frame from server: {e}"),
        }
        let spare = reader.spare(READ_CHUNK_BYTES);
        match rd.read(spare).await {
            Ok(0) => {
                reader.filled(0);
                break "the server closed the connection".to_string();
            }
            Ok(n) => reader.filled(n),
            Err(e) => {
                reader.filled(0);
                break format!("read failed: {e}");
            }
        }
    };
    inner.fail_all(why);
}

async fn writer_task(inner: Rc<Inner>, mut wr: WriteHalf<TcpStream>) {
    let mut batch = Vec::new();
    loop {
        let ready = futures_lite::future::poll_fn(|cx| {
            if inner.closed.borrow().is_some() {
                return Poll::Ready(false);
            }
            if !inner.out.borrow().is_empty() {
                return Poll::Ready(true);
            }
            *inner.writer_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !ready {
            let _ = wr.close().await;
            return;
        }
        std::mem::swap(&mut batch, &mut *inner.out.borrow_mut());
        for w in inner.drain_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        if let Err(e) = wr.write_all(&batch).await {
            inner.fail_all(format!("write failed: {e}"));
            return;
        }
        batch.clear();
    }
}

/// A shard-aware pipelined client: one [`AsyncClient`] per shard, each connected to the address
/// the server lists for that shard (`HelloOk.shard_addresses`), where the shard's own core serves
/// it. An append goes to the connection of the shard that owns its stream
/// ([`crate::shard_for`]), a read to the connection of the shard it names.
///
/// A server that lists no shard addresses is served through the one routed connection instead
/// ([`AsyncShardAwareClient::is_shard_aware`] is then false). Cheap to clone; clones share the
/// connections. Order is kept per stream, not across streams of different shards.
#[derive(Clone)]
pub struct AsyncShardAwareClient {
    /// One connection per shard, or the single routed connection.
    conns: Rc<[AsyncClient]>,
    shard_count: u16,
    shard_aware: bool,
}

impl AsyncShardAwareClient {
    /// Connects to the main address, reads the shard map from `HelloOk`, and opens one
    /// connection per shard (then closes the first one).
    pub async fn connect(addr: SocketAddr) -> Result<AsyncShardAwareClient, ClientError> {
        let routed = AsyncClient::connect(addr).await?;
        let shard_count = routed.shard_count();
        let addresses = super::shard_addresses(routed.server_hello())?;
        if addresses.is_empty() {
            return Ok(AsyncShardAwareClient {
                conns: Rc::from(vec![routed]),
                shard_count,
                shard_aware: false,
            });
        }
        routed.close();
        let mut conns = Vec::with_capacity(addresses.len());
        for a in &addresses {
            let addr = resolve(a)?;
            conns.push(AsyncClient::connect(addr).await?);
        }
        assert_eq!(conns.len(), shard_count as usize);
        Ok(AsyncShardAwareClient {
            conns: Rc::from(conns),
            shard_count,
            shard_aware: true,
        })
    }

    /// Whether each shard has its own connection (the server offered shard addresses).
    pub fn is_shard_aware(&self) -> bool {
        self.shard_aware
    }

    pub fn shard_count(&self) -> u16 {
        self.shard_count
    }

    /// The server's `HelloOk` (from the first connection).
    pub fn server_hello(&self) -> &HelloOkT {
        self.conns[0].server_hello()
    }

    /// The connection that serves `shard`.
    pub fn connection(&self, shard: u16) -> &AsyncClient {
        assert!(shard < self.shard_count, "shard {shard} of {}", self.shard_count);
        let at = if self.conns.len() == 1 { 0 } else { shard as usize };
        &self.conns[at]
    }

    /// The connection that serves `stream`'s appends.
    pub fn connection_for_stream(&self, stream: u64) -> &AsyncClient {
        self.connection(crate::shard_for(stream, self.shard_count))
    }

    /// Appends records to `stream` on the owning shard's connection (see [`AsyncClient::append`]).
    pub async fn append(
        &self,
        stream: u64,
        records: &[AppendRecord<'_>],
        ack: AckLevel,
    ) -> Result<Option<AppendedT>, ClientError> {
        self.connection_for_stream(stream).append(stream, records, ack).await
    }

    /// Reads on the connection of the shard `params` names.
    pub async fn read(&self, params: ReadParams) -> Result<RecordsT, ClientError> {
        if params.shard >= self.shard_count {
            // Let the server answer NoSuchShard, as on a routed connection.
            return self.conns[0].read(params).await;
        }
        self.connection(params.shard).read(params).await
    }

    pub async fn stats(&self) -> Result<StatsReplyT, ClientError> {
        self.conns[0].stats().await
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.conns[0].ping().await
    }

    /// Requests awaiting a response, over all connections.
    pub fn in_flight(&self) -> usize {
        self.conns.iter().map(AsyncClient::in_flight).sum()
    }

    /// Errors received on any connection for requests nobody waited on.
    pub fn take_errors(&self) -> Vec<(u64, ServerError)> {
        self.conns.iter().flat_map(AsyncClient::take_errors).collect()
    }

    /// Why a connection closed, if one did.
    pub fn closed(&self) -> Option<String> {
        self.conns.iter().find_map(AsyncClient::closed)
    }

    /// Closes every connection.
    pub fn close(&self) {
        for c in self.conns.iter() {
            c.close();
        }
    }
}

/// A "host:port" from `HelloOk.shard_addresses` as a socket address.
fn resolve(address: &str) -> Result<SocketAddr, ClientError> {
    if let Ok(addr) = address.parse() {
        return Ok(addr);
    }
    std::net::ToSocketAddrs::to_socket_addrs(address)?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{address} does not resolve")).into())
}
