//! A front: the connection server that every executor runs. It accepts connections, reads and
//! verifies frames, routes each request to the shard that owns it, and writes the responses back.
//!
//! Two kinds of executor run one: a front executor accepts on the main address (the routed path,
//! for clients that do not know the placement), and each shard executor accepts on its shard's own
//! address (the shard-aware path, `HelloOk.shard_addresses`). The code is the same; only the links
//! differ. A front reaches the shard on its own executor directly ([`ShardLink::Local`]: no ring,
//! no other executor, no wake-up) and every other shard over a ring, so a request for a shard the
//! executor does not own is forwarded rather than refused (see docs/PROTOCOL.md, "Shard-aware
//! connections").
//!
//! Each connection has two tasks. The reader turns bytes into frames and dispatches them; before
//! dispatching it reserves the request's bytes (and, for reads and stats, the response's) from
//! the connection's budget. The writer sends everything that completed since its last write in
//! one `write`, then returns the reservations of what it sent. So a connection holds at most its
//! budget in unanswered requests plus unsent responses: when a client sends faster than the
//! shards commit, or stops reading its responses, the reader stops reading the socket and TCP
//! pushes back on the client.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use proto::codec::{self, Encoder};
use proto::frame::{FrameReader, FRAME_HEADER_BYTES, READ_CHUNK_BYTES};
use proto::wire::{self, ErrorCode, RequestBody};
use proto::DecodeError;
use shards::{ReadMemory, ReadPool};
use std::task::{ready, Poll};

use crate::notify::Notify;
use crate::ring::{Completion, ConnId, FromShard, FrontInbox, Latch, ReadArgs, Reply, RingSender, ToShard};
use crate::shard_server::{ReplyTo, ShardServer};

/// Budget reserved for a small response (Appended, Pong, HelloOk, Error).
const SMALL_RESPONSE_BYTES: usize = 128;
/// Budget a read reserves besides its frame and response: its task on the shard and the state of
/// its future, which live while it waits (for records or for read memory). Without it a
/// connection could have tens of thousands of one-byte reads waiting at once.
const READ_TASK_BYTES: usize = 4 << 10;
/// Budget reserved per shard for a stats response.
const STATS_RESPONSE_BYTES_PER_SHARD: usize = 256;
/// How long a connection closed by the server keeps reading (and dropping) what the client still
/// sends, so the close does not become a reset that destroys the error response before the
/// client reads it.
const LINGER: Duration = Duration::from_millis(200);
const LINGER_BYTES_MAX: usize = 1 << 20;
/// How long shutdown waits for connections to drain before dropping those whose clients do not
/// read their responses.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);
/// How often a reader waiting for budget or frame memory asks the kernel whether its client has
/// closed its sending side (see [`client_hung_up`]): the delay before an abandoned long-poll is
/// noticed, against a timer per waiting connection.
const HANGUP_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// A writer keeps at most this much buffer capacity between writes: enough for a burst of small
/// answers, while a large response's buffer goes back to the allocator once it is written.
const IDLE_BUFFER_BYTES: usize = 4 << 10;
/// One socket read. Every connection of a front reads into the front's one buffer of this size
/// and keeps only the bytes of a frame it has not completed (see [`Front::recv`]), so a waiting
/// connection holds no receive buffer. 32 KiB: a client pipelining 16 appends of 1 KiB sends
/// about 17.6 KiB at once, which 16 KiB (Redis's read) took in two `recv`s, and a `recv` that
/// fills its buffer is always followed by another; a busy connection holds this much while it
/// is being served.
const RECV_CHUNK_BYTES: usize = 32 << 10;
/// A request frame longer than this takes its whole length of the process's frame memory before it
/// is buffered (see [`Front::charge_frame`]). So a connection holds at most this much of a partial
/// frame plus one socket read outside that bound.
const LARGE_FRAME_BYTES: usize = 16 << 10;
/// What a read may answer when the response memory is short: it answers at most this much
/// (and at least one record), outside the response memory, one such read per connection at a
/// time (see [`Front::reserve_read`]).
pub const READ_FLOOR_BYTES: usize = 16 << 10;
/// Request frame buffers kept for reuse (they come back from the shards with the answers).
const FRAME_POOL_MAX: usize = 1024;
/// A frame buffer larger than this is freed instead of kept for reuse. Frames this large are rare
/// and their copy costs more than their allocation; the bound keeps an idle front from holding
/// more than `FRAME_POOL_MAX * FRAME_POOL_BUFFER_BYTES_MAX` after a burst of large frames.
const FRAME_POOL_BUFFER_BYTES_MAX: usize = 16 << 10;
const _: () = assert!(FRAME_POOL_MAX * FRAME_POOL_BUFFER_BYTES_MAX <= 16 << 20);

/// Counters of one front executor; only that executor writes them, anyone may read.
///
/// Aligned to two cache lines (the unit the adjacent-line prefetcher fetches), so that each
/// executor's counters have lines of their own: packed together, the counters of fronts on
/// different cores would share lines, which would bounce between the cores on every frame. They
/// are bumped without a locked add (see [`bump`]).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct FrontCounters {
    pub connections_total: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Error responses sent, by `ErrorCode` value.
    pub errors_by_code: [AtomicU64; ERROR_CODES],
}

/// One past the highest `ErrorCode` value.
pub const ERROR_CODES: usize = ErrorCode::ENUM_MAX as usize + 1;

impl FrontCounters {
    /// Counts an error response; only the owning executor may call it (see [`bump`]).
    pub fn count_error(&self, code: ErrorCode) {
        if let Some(c) = self.errors_by_code.get(usize::from(code.0)) {
            bump(c, 1);
        }
    }
}

/// Adds to a counter of this executor's [`FrontCounters`]. Only the owning executor writes
/// them, so a plain load and store suffice; readers on other threads see each value whole, at
/// most one update late. A locked add would wait for every earlier store to reach the cache, on
/// the append path the payload copies into the commit buffer: at 1 KiB c=256 P=16 the profile
/// put 2.4 % of the daemon's CPU on the locked increment of `frames_out`.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

const _: () = assert!(std::mem::align_of::<FrontCounters>() == 128);

/// The bound on what the reads of all fronts of the process may answer before their responses
/// are written to their sockets (`--response-memory-bytes`). A read takes its share when it is
/// dispatched (its request, its task and the response it may become) and gives it back once its
/// response is written; it never waits for it. When less is free than a read asks for, it asks
/// its shard for less; when even a floor read does not fit, it answers at most
/// [`READ_FLOOR_BYTES`] outside this bound, one such read per connection at a time. So clients
/// that do not read their answers hold at most this bound plus one floor read each, and never
/// make another client's read wait.
#[derive(Debug)]
pub struct ResponseMemory {
    free: AtomicUsize,
    capacity: usize,
}

impl ResponseMemory {
    pub fn new(capacity: usize) -> ResponseMemory {
        ResponseMemory {
            free: AtomicUsize::new(capacity),
            capacity,
        }
    }

    /// Takes `want` bytes, or all that is free if that is less but at least `min`; `None` if
    /// less than `min` is free.
    fn try_take(&self, min: usize, want: usize) -> Option<usize> {
        assert!(min <= want);
        let mut free = self.free.load(Ordering::Relaxed);
        loop {
            if free < min {
                return None;
            }
            let take = want.min(free);
            match self
                .free
                .compare_exchange_weak(free, free - take, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(take),
                Err(now) => free = now,
            }
        }
    }

    fn give(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let before = self.free.fetch_add(bytes, Ordering::Relaxed);
        assert!(
            before + bytes <= self.capacity,
            "more returned to the response memory than taken"
        );
    }

    /// Bytes taken now.
    pub fn held(&self) -> usize {
        self.capacity - self.free.load(Ordering::Relaxed)
    }
}

/// How a read's reservation travels: the front sends `reserved` with each request and the shard
/// hands it back untouched with the answer. For a read its top bits also say whether it holds
/// response memory (as much as its budget units) or its connection's floor read.
/// For a large append, a third says it holds frame memory (listed in `Conn::frame_charges`).
const RESERVED_POOLED: usize = 1 << (usize::BITS - 1);
const RESERVED_FLOOR: usize = 1 << (usize::BITS - 2);
const RESERVED_FRAME: usize = 1 << (usize::BITS - 3);
const RESERVED_UNITS: usize = RESERVED_FRAME - 1;

/// State shared by all front executors of the process.
#[derive(Debug)]
pub struct FrontShared {
    pub counters: Vec<FrontCounters>,
    /// Open connections across all fronts.
    pub connections: AtomicUsize,
    /// Set once on SIGTERM/SIGINT; wakes the fronts directly (nothing polls it).
    pub shutdown: Arc<Latch>,
    /// Set by the main thread once every shard is open: fronts accept only after it, so no
    /// request reaches a shard that is still recovering.
    pub shards_open: Latch,
    /// Each shard's own port, by shard id (`HelloOk.shard_addresses`); empty when shard-aware
    /// connections are off.
    pub shard_ports: Vec<u16>,
    /// What reads of every front may hold in responses not yet written.
    pub response_memory: ResponseMemory,
    /// Room for large request frames, from their first bytes until they are answered (appends)
    /// or dispatched (anything else), across every front (`--frame-memory-bytes`): the same
    /// first-come first-served byte pool the shards bound their reads with, whose charges may be
    /// returned from any executor.
    pub frame_memory: ReadPool,
}

impl FrontShared {
    pub fn wire_stats(&self) -> wire::FrontStatsT {
        let sum = |f: fn(&FrontCounters) -> &AtomicU64| {
            self.counters.iter().map(|c| f(c).load(Ordering::Relaxed)).sum::<u64>()
        };
        wire::FrontStatsT {
            connections: self.connections.load(Ordering::Relaxed) as u64,
            connections_total: sum(|c| &c.connections_total),
            frames_in: sum(|c| &c.frames_in),
            frames_out: sum(|c| &c.frames_out),
            protocol_errors: sum(|c| &c.protocol_errors),
            bytes_in: sum(|c| &c.bytes_in),
            bytes_out: sum(|c| &c.bytes_out),
            errors_by_code: Some(
                (0..ERROR_CODES)
                    .map(|i| {
                        self.counters
                            .iter()
                            .map(|c| c.errors_by_code[i].load(Ordering::Relaxed))
                            .sum()
                    })
                    .collect(),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FrontConfig {
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub conn_budget_bytes: usize,
    /// Ceiling of a read's `max_wait_ms`; longer waits are clamped to it.
    pub max_wait_ms: u32,
}

/// How a front reaches one shard.
#[derive(Clone)]
pub enum ShardLink {
    Ring(Rc<RingSender<ToShard>>),
    /// The shard runs on this executor; the front registers with it in [`Front::new`] and hands
    /// it requests by a plain call.
    Local(Rc<ShardServer>),
}

struct Gather {
    conn: ConnId,
    id: u64,
    reserved: usize,
    remaining: usize,
    shards: Vec<wire::ShardStatsT>,
}

pub struct Front {
    index: usize,
    shard_count: u16,
    cfg: FrontConfig,
    shared: Arc<FrontShared>,
    links: Vec<ShardLink>,
    conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    next_conn: Cell<ConnId>,
    next_token: Cell<u64>,
    gathers: RefCell<HashMap<u64, Gather>>,
    encoder: RefCell<Encoder>,
    /// Buffers to reuse for request frames that cross a ring to another executor's shard.
    frame_pool: RefCell<Vec<Vec<u8>>>,
    /// The one buffer every connection's socket read goes into (see [`Front::recv`]).
    recv_buf: RefCell<Vec<u8>>,
    /// This front's index at the shard on its own executor, if there is one.
    local_index: Cell<usize>,
    /// Shards whose ring got requests that have not woken it yet (see [`Front::flusher`]).
    unflushed: RefCell<Vec<u16>>,
    flusher_wake: Notify,
    flusher_stop: Cell<bool>,
    me: Weak<Front>,
}

struct Conn {
    id: ConnId,
    stream: RefCell<TcpStream>,
    budget: Semaphore,
    /// Requests dispatched and not yet completed.
    in_flight: Cell<usize>,
    /// Encoded responses not yet handed to the socket.
    out: RefCell<Vec<u8>>,
    /// Some read of this connection went to a shard: its end must cancel the ones still waiting.
    sent_reads: Cell<bool>,
    /// The client closed its sending side (or the reader stopped): the shards were told to end
    /// this connection's long-polls, and reads sent after it do not wait.
    hung_up: Cell<bool>,
    /// Budget to return once `out` is written.
    out_release: Cell<usize>,
    /// Response memory to return once `out` is written.
    out_pooled: Cell<usize>,
    /// Floor reads (0 or 1) whose answers are in `out`: the floor goes back once it is written.
    out_floors: Cell<usize>,
    /// One unit: the floor read this connection may have outside the response memory.
    floor: Semaphore,
    /// The frame memory the frame being dispatched holds (none for a small frame). An append takes
    /// it over (see [`Front::hold_frame_charge`]); otherwise the reader returns it after dispatch.
    frame_charge: RefCell<Option<ReadMemory>>,
    /// Frame memory held by large appends until they are answered, by request id: the copy of
    /// the frame and the append it becomes live that long.
    frame_charges: RefCell<Vec<(u64, ReadMemory)>>,
    writer_wake: Notify,
    reader_wake: Notify,
    /// The reader has not finished.
    reading: Cell<bool>,
    /// Stop reading requests (shutdown, protocol error, or the socket broke).
    stop: Cell<bool>,
    /// Writes failed: responses are dropped.
    broken: Cell<bool>,
    /// Close with a linger (the server ended the connection).
    linger: Cell<bool>,
    abort: Notify,
}

impl Front {
    pub fn new(
        index: usize,
        shard_count: u16,
        cfg: FrontConfig,
        shared: Arc<FrontShared>,
        links: Vec<ShardLink>,
    ) -> Rc<Front> {
        assert_eq!(links.len(), shard_count as usize);
        assert!(cfg.conn_budget_bytes >= SMALL_RESPONSE_BYTES + FRAME_HEADER_BYTES);
        assert!(shared.frame_memory.capacity() >= cfg.max_frame_bytes + FRAME_HEADER_BYTES);
        let front = Rc::new_cyclic(|me| Front {
            index,
            shard_count,
            cfg,
            shared,
            links,
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
            next_token: Cell::new(1),
            gathers: RefCell::new(HashMap::new()),
            encoder: RefCell::new(Encoder::new()),
            frame_pool: RefCell::new(Vec::new()),
            recv_buf: RefCell::new(vec![0; RECV_CHUNK_BYTES]),
            local_index: Cell::new(usize::MAX),
            unflushed: RefCell::new(Vec::new()),
            flusher_wake: Notify::default(),
            flusher_stop: Cell::new(false),
            me: me.clone(),
        });
        for link in &front.links {
            if let ShardLink::Local(server) = link {
                let inbox: Weak<dyn FrontInbox> = Rc::downgrade(&front) as Weak<dyn FrontInbox>;
                let index = server.add_front(ReplyTo::Local(inbox));
                front.local_index.set(index);
            }
        }
        front
    }

    fn rc(&self) -> Rc<Front> {
        self.me.upgrade().expect("the front outlives its tasks")
    }

    fn counters(&self) -> &FrontCounters {
        &self.shared.counters[self.index]
    }

    /// Accepts on every one of `listener_fds` until shutdown, then drains every connection.
    pub async fn run(self: Rc<Self>, listener_fds: Vec<i32>) {
        let flusher = glommio::spawn_local(self.clone().flusher());
        let accepting: Vec<_> = listener_fds
            .into_iter()
            .map(|fd| glommio::spawn_local(self.clone().accept(fd)))
            .collect();
        for a in accepting {
            a.await;
        }
        tracing::info!(
            front = self.index,
            connections = self.conns.borrow().len(),
            "front stops accepting; draining"
        );
        self.drain().await;
        self.flusher_stop.set(true);
        self.flusher_wake.notify();
        flusher.await;
        for link in &self.links {
            if let ShardLink::Ring(tx) = link {
                tx.close();
            }
        }
    }

    /// Wakes the shards that were sent requests, once per round of the executor rather than once
    /// per request. Requests go on the rings without waking anyone ([`RingSender::try_send_quiet`]);
    /// the first one marks the shard and notifies this task, which glommio queues behind the tasks
    /// already runnable. So when many connections (or one pipelining connection) have frames
    /// ready at once, every one of them is dispatched before the shard is woken, once: one
    /// cross-executor wake-up for the batch instead of one for each request the shard happened to
    /// finish before the next arrived. Nothing waits on a request left unflushed: the flusher is
    /// runnable whenever the list is not empty.
    async fn flusher(self: Rc<Self>) {
        loop {
            self.flusher_wake.wait().await;
            let shards = std::mem::take(&mut *self.unflushed.borrow_mut());
            for shard in shards {
                if let ShardLink::Ring(tx) = &self.links[shard as usize] {
                    tx.flush();
                }
            }
            if self.flusher_stop.get() {
                break;
            }
        }
    }

    /// The accept loop of one listening socket, until shutdown.
    async fn accept(self: Rc<Self>, listener_fd: i32) {
        // SAFETY: the fd is a bound, listening TCP socket created for this front alone.
        let listener = unsafe { TcpListener::from_raw_fd(listener_fd) };
        tracing::debug!(front = self.index, addr = ?listener.local_addr(), "accepting");
        loop {
            let accepted = future::or(async { Some(listener.accept().await) }, async {
                self.shared.shutdown.wait().await;
                None
            })
            .await;
            match accepted {
                None => break,
                Some(Ok(stream)) => self.admit(stream),
                Some(Err(e)) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(front = self.index, error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Stops every connection's reader, then waits until each has answered what it received.
    async fn drain(&self) {
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for c in &conns {
            c.stop.set(true);
            // The client may still be sending: closing with its bytes unread would reset the
            // connection and discard the last answers before the client reads them.
            c.linger.set(true);
            c.reader_wake.notify();
        }
        drop(conns);
        let started = Instant::now();
        while !self.conns.borrow().is_empty() {
            if started.elapsed() > SHUTDOWN_DRAIN {
                let stuck: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
                tracing::warn!(
                    front = self.index,
                    connections = stuck.len(),
                    "dropping connections whose clients do not read their responses"
                );
                for c in &stuck {
                    c.broken.set(true);
                    c.abort.notify();
                    c.writer_wake.notify();
                }
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    fn admit(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        bump(&self.counters().connections_total, 1);
        let open = self.shared.connections.fetch_add(1, Ordering::Relaxed);
        if open >= self.cfg.max_connections {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            let mut frame = Vec::new();
            self.encoder.borrow_mut().error(
                0,
                ErrorCode::TooManyConnections,
                &format!("the server is at its limit of {} connections", self.cfg.max_connections),
                &mut frame,
            );
            bump(&self.counters().frames_out, 1);
            bump(&self.counters().bytes_out, frame.len() as u64);
            self.counters().count_error(ErrorCode::TooManyConnections);
            glommio::spawn_local(async move {
                let stream = RefCell::new(stream);
                if write_all(&stream, &frame).await.is_ok() {
                    linger_close(&stream).await;
                }
            })
            .detach();
            return;
        }
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let budget = self.cfg.conn_budget_bytes;
        let conn = Rc::new(Conn {
            id,
            stream: RefCell::new(stream),
            budget: Semaphore::new(budget as u64),
            in_flight: Cell::new(0),
            out: RefCell::new(Vec::new()),
            sent_reads: Cell::new(false),
            hung_up: Cell::new(false),
            out_release: Cell::new(0),
            out_pooled: Cell::new(0),
            out_floors: Cell::new(0),
            floor: Semaphore::new(1),
            frame_charge: RefCell::new(None),
            frame_charges: RefCell::new(Vec::new()),
            writer_wake: Notify::default(),
            reader_wake: Notify::default(),
            reading: Cell::new(true),
            stop: Cell::new(false),
            broken: Cell::new(false),
            linger: Cell::new(false),
            abort: Notify::default(),
        });
        self.conns.borrow_mut().insert(id, conn.clone());
        glommio::spawn_local(self.rc().reader(conn.clone())).detach();
        glommio::spawn_local(self.rc().writer(conn)).detach();
    }

    async fn reader(self: Rc<Self>, conn: Rc<Conn>) {
        let mut frames = FrameReader::new(self.cfg.max_frame_bytes);
        // What this connection holds of the process's frame memory (for the frame being received).
        let mut frame_charge = self.shared.frame_memory.memory();
        'read: loop {
            // Requests already received are served even when stopping: shutdown answers
            // everything it has read.
            loop {
                // Borrowed from the receive buffer, which is not touched again until the request
                // is handled: an append for this executor's own shard is committed from it, and
                // only a request that crosses a ring is copied out (see `dispatch`).
                let payload = match frames.next_frame() {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        self.protocol_error(&conn, 0, &e).await;
                        conn.linger.set(true);
                        break 'read;
                    }
                };
                // Only a frame that outgrew one socket read can be this long: the charged frame.
                // Its charge moves to the connection while it is handled (an append that crosses
                // a ring keeps it until answered, see `hold_frame_charge`).
                let charged = payload.len() + FRAME_HEADER_BYTES > LARGE_FRAME_BYTES;
                if charged {
                    let charge = std::mem::replace(&mut frame_charge, self.shared.frame_memory.memory());
                    *conn.frame_charge.borrow_mut() = Some(charge);
                }
                bump(&self.counters().frames_in, 1);
                self.dispatch(&conn, payload).await;
                drop(conn.frame_charge.borrow_mut().take());
                if charged {
                    // The charged frame was read up to its end, so nothing follows it: its
                    // buffer goes with its charge.
                    frames.release_if_empty();
                }
            }
            if conn.stop.get() {
                break;
            }
            // A frame longer than one socket read grows the buffer to its length. It takes that
            // much of the process's frame memory first, all at once, so that the partial frames of
            // many slow or stalled clients together stay within the bound, and no connection
            // holds part of the room while it waits for the rest.
            let pending = frames.pending_frame_bytes();
            let large = pending
                .map(|rest| frames.buffered() + rest)
                .filter(|&len| len > LARGE_FRAME_BYTES)
                .unwrap_or(0);
            if large.min(self.shared.frame_memory.capacity()) != frame_charge.held() {
                frame_charge.shrink_to(0);
                if large > 0 && !self.charge_frame(&conn, &mut frame_charge, large).await {
                    break;
                }
            }
            // A charged frame is read straight into its buffer, up to its end; anything else goes
            // through the front's receive buffer.
            let direct = (large > 0).then(|| pending.unwrap_or(0).clamp(1, READ_CHUNK_BYTES));
            let read = future::or(async { Some(self.recv(&conn, &mut frames, direct).await) }, async {
                conn.reader_wake.wait().await;
                None
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => bump(&self.counters().bytes_in, n as u64),
                Some(Ok(_)) | Some(Err(_)) => {
                    frames.filled(0);
                    break;
                }
                // A `spare` handed out for a direct read was not filled.
                None => frames.filled(0),
            }
        }
        drop(frames);
        drop(frame_charge);
        // No request comes after this one, so nothing may wait for the client any more: a
        // long-poll would otherwise keep the connection (its slot, its budget, the shard's
        // attention) until its deadline, long after its client left.
        self.hang_up(&conn).await;
        conn.reading.set(false);
        conn.writer_wake.notify();
    }

    /// One socket read of `conn` into `frames`: straight into its buffer when `direct` says how
    /// much (the rest of a charged large frame) or when it has a buffer (it is being served),
    /// otherwise into the front's receive buffer, of which only what arrived is appended. The receive buffer is borrowed only inside one poll:
    /// glommio's `poll_read` on a socket is a non-blocking `recv` into the buffer it is given, or
    /// else a readiness wait that keeps no pointer to it, so the connections of a front can share
    /// it, and one waiting for its client holds no buffer at all.
    async fn recv(&self, conn: &Conn, frames: &mut FrameReader, direct: Option<usize>) -> std::io::Result<usize> {
        if let Some(len) = direct {
            let spare = frames.spare(len);
            let n = poll_fn(|cx| Pin::new(&mut *conn.stream.borrow_mut()).poll_read(cx, spare)).await?;
            frames.filled(n);
            return Ok(n);
        }
        poll_fn(|cx| {
            if frames.capacity() > 0 {
                // A connection that is being served reads straight into its own buffer, so a
                // busy one copies nothing extra; once its client has nothing more to send it
                // gives that buffer up (unless it holds part of a frame) and waits holding none.
                let spare = frames.spare(RECV_CHUNK_BYTES);
                let polled = Pin::new(&mut *conn.stream.borrow_mut()).poll_read(cx, spare);
                frames.filled(match polled {
                    Poll::Ready(Ok(n)) => n,
                    _ => 0,
                });
                if polled.is_pending() {
                    frames.release_if_empty();
                }
                return polled;
            }
            let mut buf = self.recv_buf.borrow_mut();
            let n = ready!(Pin::new(&mut *conn.stream.borrow_mut()).poll_read(cx, &mut buf))?;
            frames.extend(&buf[..n]);
            Poll::Ready(Ok(n))
        })
        .await
    }

    /// Takes `bytes` of the process's frame memory for a frame being received; `false` if the
    /// connection stops first. A client that closes meanwhile may have sent the whole frame
    /// before its close, so the wait goes on (its long-polls are ended), until room frees up as
    /// other connections' large frames complete or their clients leave.
    async fn charge_frame(&self, conn: &Conn, charge: &mut ReadMemory, bytes: usize) -> bool {
        let mut acquire = std::pin::pin!(charge.acquire(bytes));
        loop {
            let done = future::or(
                async {
                    acquire.as_mut().await;
                    Ok(())
                },
                async {
                    if conn.hung_up.get() {
                        conn.reader_wake.wait().await;
                        Err(false)
                    } else {
                        future::or(
                            async {
                                conn.reader_wake.wait().await;
                                Err(false)
                            },
                            async {
                                client_hung_up(&conn.stream).await;
                                Err(true)
                            },
                        )
                        .await
                    }
                },
            )
            .await;
            match done {
                Ok(()) => return true,
                Err(_) if conn.stop.get() => return false,
                Err(true) => self.hang_up(conn).await,
                Err(false) => {}
            }
        }
    }

    /// The client closed its sending side (it may or may not still read), or the reader stopped:
    /// tells every shard this connection sent reads to to answer its long-polls now. Requests
    /// already received are still answered.
    async fn hang_up(&self, conn: &Conn) {
        if conn.hung_up.replace(true) || !conn.sent_reads.get() {
            return;
        }
        for shard in 0..self.shard_count {
            // A shard that is gone has no read of this connection left either.
            let _ = self.send_raw(shard, ToShard::Cancel { conn: conn.id }).await;
        }
    }

    /// Reserves budget for a request and counts it in flight. A reservation larger than the
    /// whole budget takes the whole budget, so one maximal frame can always proceed.
    async fn reserve(&self, conn: &Conn, bytes: usize) -> usize {
        let units = bytes.min(self.cfg.conn_budget_bytes);
        self.acquire_watching(conn, &conn.budget, units).await;
        conn.in_flight.set(conn.in_flight.get() + 1);
        assert!(units <= RESERVED_UNITS);
        units
    }

    /// Takes `units` of one of `conn`'s own semaphores (its budget, its floor read), which only
    /// its own answers being written give back.
    async fn acquire_watching(&self, conn: &Conn, sem: &Semaphore, units: usize) {
        // The common case, room at once: no futures to build and drop for every request.
        if sem
            .try_acquire(units as u64)
            .expect("a connection's semaphore is never closed")
        {
            return;
        }
        let mut acquire = std::pin::pin!(sem.acquire(units as u64));
        let mut acquired = None;
        if !conn.hung_up.get() {
            // While it waits the reader does not read the socket, so it would not see the end
            // of the stream; if what it waits for is held by this connection's own long-polls
            // it would wait for their deadlines. Watch for the client's close meanwhile.
            acquired = future::or(async { Some(acquire.as_mut().await) }, async {
                client_hung_up(&conn.stream).await;
                None
            })
            .await;
            if acquired.is_none() {
                self.hang_up(conn).await;
            }
        }
        let acquired = match acquired {
            Some(done) => done,
            None => acquire.await,
        };
        // A connection's semaphores are only closed by dropping the connection, which cannot
        // happen while its reader runs.
        acquired.expect("a connection's semaphore is never closed");
    }

    /// Reserves what a read of up to `want` bytes needs: budget, then response memory (see
    /// [`ResponseMemory`]). Returns the reservation to send with it and the `max_bytes` to ask
    /// the shard for, `want` or less when the response memory is short.
    async fn reserve_read(&self, conn: &Conn, frame_bytes: usize, want: usize) -> (usize, usize) {
        let overhead = frame_bytes + SMALL_RESPONSE_BYTES + READ_TASK_BYTES;
        // The budget first, for all that was asked: waiting for it waits for this connection's
        // own client only, and nothing is held meanwhile that another connection needs.
        let reserved = self.reserve(conn, overhead + want).await;
        let floor_units = (overhead + want.min(READ_FLOOR_BYTES)).min(reserved);
        let (units, max_bytes, kind) = match self.shared.response_memory.try_take(floor_units, reserved) {
            Some(taken) => (taken, want.min(taken.saturating_sub(overhead)), RESERVED_POOLED),
            None => {
                // The response memory is held by answers not yet written, most likely by
                // clients that do not read them. Waiting for it could wait for them forever;
                // this read answers little instead, and waits only for this connection's
                // previous floor read to be written, that is for its own client.
                self.acquire_watching(conn, &conn.floor, 1).await;
                (floor_units, want.min(READ_FLOOR_BYTES), RESERVED_FLOOR)
            }
        };
        assert!(units <= reserved && units <= RESERVED_UNITS);
        // What the read will not answer goes back at once.
        conn.budget.signal((reserved - units) as u64);
        (units | kind, max_bytes.max(1))
    }

    /// An append of a large frame keeps the frame memory its frame was received in until it is
    /// answered: the copy of the frame lives until the shard has taken it, and its records until
    /// they are committed. Otherwise every stalled client could finish a maximal frame at once
    /// and hand it on while the freed room took the next.
    fn hold_frame_charge(&self, conn: &Conn, id: u64, reserved: usize) -> usize {
        let Some(charge) = conn.frame_charge.borrow_mut().take() else {
            return reserved;
        };
        conn.frame_charges.borrow_mut().push((id, charge));
        reserved | RESERVED_FRAME
    }

    async fn protocol_error(&self, conn: &Rc<Conn>, id: u64, e: &DecodeError) {
        bump(&self.counters().protocol_errors, 1);
        let reserved = self.reserve(conn, SMALL_RESPONSE_BYTES).await;
        self.complete(
            conn,
            id,
            reserved,
            Reply::Error {
                code: e.code(),
                message: e.to_string(),
            },
        );
    }

    async fn answer(&self, conn: &Rc<Conn>, id: u64, request_bytes: usize, reply: Reply) {
        let reserved = self.reserve(conn, request_bytes + SMALL_RESPONSE_BYTES).await;
        self.complete(conn, id, reserved, reply);
    }

    async fn dispatch(&self, conn: &Rc<Conn>, payload: &[u8]) {
        let frame_bytes = payload.len() + FRAME_HEADER_BYTES;
        let request = match codec::view_request(payload) {
            Ok(r) => r,
            Err(e) => {
                // The frame boundary is intact, so the stream goes on. Name the request if its
                // id can be read, so the client can match the error.
                let id = readable_id(payload).unwrap_or(0);
                self.protocol_error(conn, id, &e).await;
                return;
            }
        };
        let id = request.id();
        match request.body_type() {
            RequestBody::Append => {
                let stream = request.body_as_append().expect("tag checked").stream();
                let shard = proto::shard_for(stream, self.shard_count);
                let reserved = self.reserve(conn, frame_bytes + SMALL_RESPONSE_BYTES).await;
                match &self.links[shard as usize] {
                    // The shard of this executor: its records go from the receive buffer straight
                    // into the commit buffer, with no copy of the frame in between (the frame's
                    // charge, if any, ends when the reader has handed it over).
                    ShardLink::Local(server) => {
                        server.wait_for_queue_room().await;
                        server.append(self.local_index.get(), conn.id, id, reserved, payload);
                    }
                    // Another core's shard: the frame crosses the ring in a buffer of its own,
                    // which keeps the frame's charge until it is answered.
                    ShardLink::Ring(_) => {
                        let reserved = self.hold_frame_charge(conn, id, reserved);
                        let mut frame = self.frame_pool.borrow_mut().pop().unwrap_or_default();
                        frame.extend_from_slice(payload);
                        let msg = ToShard::Append {
                            conn: conn.id,
                            id,
                            reserved,
                            frame,
                        };
                        self.send(conn, shard, msg).await;
                    }
                }
            }
            RequestBody::Read => {
                let read = request.body_as_read().expect("tag checked");
                let shard = read.shard();
                if shard >= self.shard_count {
                    let message = format!(
                        "shard {shard} does not exist; this server has {} shards",
                        self.shard_count
                    );
                    let reply = Reply::Error {
                        code: ErrorCode::NoSuchShard,
                        message,
                    };
                    self.answer(conn, id, frame_bytes, reply).await;
                    return;
                }
                // A read may not ask for more than half the budget, so it can always be served
                // while other requests of the connection are in flight.
                let max_bytes = (read.max_bytes() as usize).clamp(1, self.cfg.conn_budget_bytes / 2);
                let (reserved, max_bytes) = self.reserve_read(conn, frame_bytes, max_bytes).await;
                // After `reserve`: the client may have closed its side meanwhile, and the shards
                // have then been told to end this connection's waits already.
                let max_wait_ms = if conn.hung_up.get() {
                    0
                } else {
                    read.max_wait_ms().min(self.cfg.max_wait_ms)
                };
                let args = ReadArgs {
                    from_lsn: read.from_lsn(),
                    max_bytes,
                    max_wait_ms,
                    stream: read.has_stream().then(|| read.stream()),
                };
                conn.sent_reads.set(true);
                let msg = ToShard::Read {
                    conn: conn.id,
                    id,
                    reserved,
                    read: args,
                };
                self.send(conn, shard, msg).await;
            }
            RequestBody::Hello => {
                let hello = request.body_as_hello().expect("tag checked");
                let reply = if hello.version() == proto::PROTOCOL_VERSION {
                    let mut frame = Vec::new();
                    let resp = wire::ResponseT {
                        id,
                        body: wire::ResponseBodyT::HelloOk(Box::new(wire::HelloOkT {
                            version: proto::PROTOCOL_VERSION,
                            server: Some(format!("shardlogd {}", env!("CARGO_PKG_VERSION"))),
                            shard_count: self.shard_count,
                            shard_addresses: self.shard_addresses(conn),
                        })),
                    };
                    self.encoder.borrow_mut().response(&resp, &mut frame);
                    Reply::Frame(frame)
                } else {
                    Reply::Error {
                        code: ErrorCode::UnsupportedVersion,
                        message: format!(
                            "protocol version {} is not supported; this server speaks {}",
                            hello.version(),
                            proto::PROTOCOL_VERSION
                        ),
                    }
                };
                self.answer(conn, id, frame_bytes, reply).await;
            }
            RequestBody::Ping => {
                let mut frame = Vec::new();
                let resp = wire::ResponseT {
                    id,
                    body: wire::ResponseBodyT::Pong(Box::default()),
                };
                self.encoder.borrow_mut().response(&resp, &mut frame);
                self.answer(conn, id, frame_bytes, Reply::Frame(frame)).await;
            }
            RequestBody::Stats => {
                let bytes =
                    frame_bytes + SMALL_RESPONSE_BYTES + STATS_RESPONSE_BYTES_PER_SHARD * self.shard_count as usize;
                let reserved = self.reserve(conn, bytes).await;
                let token = self.next_token.get();
                self.next_token.set(token + 1);
                self.gathers.borrow_mut().insert(
                    token,
                    Gather {
                        conn: conn.id,
                        id,
                        reserved,
                        remaining: self.shard_count as usize,
                        shards: Vec::with_capacity(self.shard_count as usize),
                    },
                );
                for shard in 0..self.shard_count {
                    if !self.send_raw(shard, ToShard::Stats { token }).await {
                        self.stats_part(token, None);
                    }
                }
            }
            other => unreachable!("view_request admits only known tags, got {other:?}"),
        }
    }

    /// Where each shard accepts shard-aware connections, as seen by this connection's client: the
    /// address it connected to, with each shard's port. `None` when shard ports are off.
    fn shard_addresses(&self, conn: &Conn) -> Option<Vec<String>> {
        if self.shared.shard_ports.is_empty() {
            return None;
        }
        let ip = conn.stream.borrow().local_addr().ok()?.ip();
        let addrs = self
            .shared
            .shard_ports
            .iter()
            .map(|&port| std::net::SocketAddr::new(ip, port).to_string())
            .collect();
        Some(addrs)
    }

    /// Sends a request to a shard; if the shard is gone, answers it with an error.
    async fn send(&self, conn: &Rc<Conn>, shard: u16, msg: ToShard) {
        let (id, reserved) = match &msg {
            ToShard::Append { id, reserved, .. } | ToShard::Read { id, reserved, .. } => (*id, *reserved),
            ToShard::Stats { .. } | ToShard::Cancel { .. } => unreachable!("these go through send_raw"),
        };
        if !self.send_raw(shard, msg).await {
            let reply = Reply::Error {
                code: ErrorCode::ShuttingDown,
                message: format!("shard {shard} is shutting down"),
            };
            self.complete(conn, id, reserved, reply);
        }
    }

    async fn send_raw(&self, shard: u16, msg: ToShard) -> bool {
        match &self.links[shard as usize] {
            ShardLink::Ring(tx) => match tx.try_send_quiet(msg) {
                Ok(()) => {
                    let mut unflushed = self.unflushed.borrow_mut();
                    if !unflushed.contains(&shard) {
                        unflushed.push(shard);
                    }
                    if unflushed.len() == 1 {
                        self.flusher_wake.notify();
                    }
                    true
                }
                // The ring is full (or the shard gone): wait for room the ordinary way, which
                // wakes the shard itself.
                Err(msg) => tx.send(msg).await.is_ok(),
            },
            ShardLink::Local(server) => {
                // Appends for this executor's own shard are committed from the receive buffer by
                // `dispatch` (`ShardServer::append`, after waiting for queue room), never sent.
                assert!(!matches!(msg, ToShard::Append { .. }), "a local append is not sent");
                server.handle(msg, self.local_index.get());
                true
            }
        }
    }

    /// A completion from a shard (through a ring or directly).
    pub fn deliver(&self, msg: FromShard) {
        match msg {
            FromShard::Replies { replies, spent_frames } => {
                // Answers come in the order their requests were enqueued, so those of one
                // connection's pipelined requests are mostly side by side: look each connection
                // up once per run of them.
                let mut last: Option<Rc<Conn>> = None;
                for Completion {
                    conn,
                    id,
                    reserved,
                    reply,
                } in replies
                {
                    if last.as_ref().is_none_or(|c| c.id != conn) {
                        let Some(c) = self.conns.borrow().get(&conn).cloned() else {
                            // The connection is gone only if it completed everything; a reply
                            // without one is a bug in the in-flight accounting.
                            panic!("reply {id} for connection {conn}, which has nothing in flight");
                        };
                        last = Some(c);
                    }
                    let c = last.as_ref().expect("looked up above");
                    self.complete(c, id, reserved, reply);
                }
                let mut pool = self.frame_pool.borrow_mut();
                for mut frame in spent_frames {
                    if pool.len() >= FRAME_POOL_MAX {
                        break;
                    }
                    if frame.capacity() <= FRAME_POOL_BUFFER_BYTES_MAX {
                        frame.clear();
                        pool.push(frame);
                    }
                }
            }
            FromShard::Stats { token, stats } => self.stats_part(token, Some(*stats)),
        }
    }

    fn stats_part(&self, token: u64, stats: Option<wire::ShardStatsT>) {
        let done = {
            let mut gathers = self.gathers.borrow_mut();
            let g = gathers.get_mut(&token).expect("stats token is pending");
            assert!(g.remaining > 0);
            g.remaining -= 1;
            g.shards.extend(stats);
            if g.remaining == 0 {
                gathers.remove(&token)
            } else {
                None
            }
        };
        let Some(mut g) = done else { return };
        g.shards.sort_by_key(|s| s.shard);
        let resp = wire::ResponseT {
            id: g.id,
            body: wire::ResponseBodyT::StatsReply(Box::new(wire::StatsReplyT {
                front: Some(Box::new(self.shared.wire_stats())),
                shards: Some(g.shards),
                executors: Some(crate::stats_cmd::executors_wire()),
                process_cpu_us: shards::executor::process_cpu_us(),
            })),
        };
        let mut frame = Vec::new();
        self.encoder.borrow_mut().response(&resp, &mut frame);
        let conn = self
            .conns
            .borrow()
            .get(&g.conn)
            .cloned()
            .expect("stats requester is connected");
        self.complete(&conn, g.id, g.reserved, Reply::Frame(frame));
    }

    /// Queues the response of one request for the writer.
    fn complete(&self, conn: &Conn, id: u64, reserved: usize, reply: Reply) {
        assert!(conn.in_flight.get() > 0);
        if reserved & RESERVED_FRAME != 0 {
            let mut charges = conn.frame_charges.borrow_mut();
            // Ids are the client's and may repeat; answers to two charged appends with the same
            // id only trade their (both held) charges.
            let at = charges
                .iter()
                .position(|&(charged, _)| charged == id)
                .expect("a charged append is listed");
            // Dropping the charge returns it.
            charges.swap_remove(at);
        }
        let (pooled, floors) = match reserved & (RESERVED_POOLED | RESERVED_FLOOR) {
            RESERVED_POOLED => (reserved & RESERVED_UNITS, 0),
            RESERVED_FLOOR => (0, 1),
            0 => (0, 0),
            _ => unreachable!("a read holds response memory or its floor, not both"),
        };
        let reserved = reserved & RESERVED_UNITS;
        conn.in_flight.set(conn.in_flight.get() - 1);
        let mut out = conn.out.borrow_mut();
        let before = out.len();
        match reply {
            Reply::Silent => {}
            Reply::Appended {
                shard,
                first_lsn,
                count,
            } => self
                .encoder
                .borrow_mut()
                .appended(id, shard, first_lsn, count, &mut out),
            Reply::Frame(frame) => {
                if out.is_empty() {
                    *out = frame;
                } else {
                    out.extend_from_slice(&frame);
                }
            }
            Reply::Error { code, message } => {
                self.counters().count_error(code);
                self.encoder.borrow_mut().error(id, code, &message, &mut out)
            }
            Reply::Truncated {
                first_available_lsn,
                message,
            } => self
                .encoder
                .borrow_mut()
                .truncated(id, first_available_lsn, &message, &mut out),
        }
        if out.len() > before {
            bump(&self.counters().frames_out, 1);
        }
        let silent = out.len() == before;
        drop(out);
        if silent {
            // Nothing to send (an `AckLevel::None` append): the writer would only return the
            // budget after its next write, which may never come, and the reader would then wait
            // for budget forever. Return it now.
            conn.budget.signal(reserved as u64);
            self.shared.response_memory.give(pooled);
            conn.floor.signal(floors as u64);
            // The writer has nothing to write: wake it only if it may now finish (see `writer`),
            // not once per silent append.
            if conn.in_flight.get() == 0 && !conn.reading.get() {
                conn.writer_wake.notify();
            }
        } else {
            conn.out_release.set(conn.out_release.get() + reserved);
            conn.out_pooled.set(conn.out_pooled.get() + pooled);
            conn.out_floors.set(conn.out_floors.get() + floors);
            conn.writer_wake.notify();
        }
    }

    async fn writer(self: Rc<Self>, conn: Rc<Conn>) {
        let mut buf = Vec::new();
        loop {
            if conn.out.borrow().is_empty() {
                if !conn.reading.get() && conn.in_flight.get() == 0 {
                    break;
                }
                conn.writer_wake.wait().await;
                continue;
            }
            // Everything completed since the last write goes out in one write.
            std::mem::swap(&mut buf, &mut *conn.out.borrow_mut());
            let release = conn.out_release.replace(0);
            let pooled = conn.out_pooled.replace(0);
            let floors = conn.out_floors.replace(0);
            if !conn.broken.get() {
                let wrote = future::or(async { Some(write_all(&conn.stream, &buf).await) }, async {
                    conn.abort.wait().await;
                    None
                })
                .await;
                match wrote {
                    Some(Ok(())) => bump(&self.counters().bytes_out, buf.len() as u64),
                    Some(Err(_)) | None => {
                        conn.broken.set(true);
                        conn.stop.set(true);
                        conn.reader_wake.notify();
                    }
                }
            }
            buf.clear();
            if buf.capacity() > IDLE_BUFFER_BYTES {
                buf = Vec::new();
            }
            conn.budget.signal(release as u64);
            self.shared.response_memory.give(pooled);
            conn.floor.signal(floors as u64);
        }
        assert_eq!(conn.in_flight.get(), 0);
        assert!(conn.frame_charges.borrow().is_empty());
        // Linger before leaving `conns`, so that shutdown's drain waits for it.
        if conn.linger.get() && !conn.broken.get() {
            linger_close(&conn.stream).await;
        }
        self.conns.borrow_mut().remove(&conn.id);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FrontInbox for Front {
    fn deliver(&self, msg: FromShard) {
        Front::deliver(self, msg)
    }
}

/// The id of a request whose body could not be accepted, if the table itself verifies.
fn readable_id(payload: &[u8]) -> Option<u64> {
    let opts = codec::verifier_options(payload.len());
    flatbuffers::root_with_opts::<wire::Request>(&opts, payload)
        .ok()
        .map(|r| r.id())
}

async fn write_all(stream: &RefCell<TcpStream>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Resolves once the client has closed its sending side or the connection failed, without
/// reading what the client sent. glommio has no readiness wait for sockets, so this asks
/// poll(2) every [`HANGUP_CHECK_INTERVAL`]; it runs only while a reader waits for budget or frame
/// memory.
async fn client_hung_up(stream: &RefCell<TcpStream>) {
    let fd = stream.borrow().as_raw_fd();
    loop {
        glommio::timer::sleep(HANGUP_CHECK_INTERVAL).await;
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; the fd stays open while the stream lives, and
        // the stream outlives this future.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        // POLLRDHUP is set once the client's FIN has arrived, even with data still queued before
        // it; POLLHUP/POLLERR after a reset.
        if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}

/// Sends FIN, then reads and drops what the client still sends for a short while, so closing
/// with unread data does not reset the connection before the client reads the last response.
async fn linger_close(stream: &RefCell<TcpStream>) {
    let _ = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_close(cx)).await;
    let mut scratch = vec![0u8; 16 << 10];
    let mut dropped = 0;
    let deadline = Instant::now() + LINGER;
    while dropped < LINGER_BYTES_MAX {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let read = future::or(
            async { Some(poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut scratch)).await) },
            async {
                glommio::timer::sleep(left).await;
                None
            },
        )
        .await;
        match read {
            Some(Ok(n)) if n > 0 => dropped += n,
            _ => break,
        }
    }
}
