//! The generator's core: one thread runs one epoll loop (mio) over its share
//! of the connections.
//!
//! A connection keeps up to `--pipeline` requests in flight in a fixed table
//! of slots; a request's id names its slot, so an answer finds its request
//! without a map, in whatever order answers come. Requests are encoded
//! straight into the socket's output buffer ([`crate::frames`]), all that one
//! turn of the loop produced goes out in one `write`, and answers are read in
//! place. Nothing is allocated per request once the buffers have grown.
//!
//! Sockets are registered once, edge-triggered, for reading and writing. A
//! read that returns less than it asked for has drained the socket (the next
//! arrival raises a new edge), so the loop does not pay a second `read` to
//! see `EAGAIN`. At one connection with one request in flight a request costs
//! three system calls: `epoll_wait`, `read`, `write`.
//!
//! With `--ack none` a connection queues `--pipeline` appends, writes them,
//! and queues the next batch once the socket took them all; the loop polls
//! without sleeping while any connection can send. After the run it proves
//! the daemon drained the load with one durable append per shard.
//!
//! Timers are timerfds in the same epoll set: a periodic one for the live
//! counts and the watchdog, and in open loop a one-shot one re-armed for the
//! next intended send time, so pacing is as precise as the kernel's timers.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use proto::frame::{FrameReader, FRAME_BYTES_MAX_DEFAULT};
use proto::wire::AckLevel;

use crate::config::{Ack, RunArgs};
use crate::connect::connect;
use crate::frames::{read_appended, AppendFrames, Encoded, Writer};
use crate::pacing::Schedule;
use crate::rng::Rng;
use crate::stats::{record, Tally};
use crate::streams::StreamChooser;
use crate::verify_log::{AckedRecord, VerifyLogWriter};

/// How often threads send their interval counts to the main thread (live line only).
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);
/// Streams scanned to find one per shard for the `--ack none` drain.
const DRAIN_STREAM_SCAN_MAX: u64 = 1 << 16;
/// Bytes asked of the kernel per socket read.
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Low bits of a request id that name its slot.
const SLOT_BITS: u32 = 24;
/// The most requests a connection may have in flight (slots).
pub const PIPELINE_MAX: usize = 1 << 16;
const _: () = assert!(PIPELINE_MAX < 1 << SLOT_BITS);
/// Ids of appends sent with `--ack none` (no slot, no success answer) have this bit set.
const UNACKED_ID_BIT: u64 = 1 << 63;
/// Streams below this count keep their payload seqs in a table rather than a map.
const DENSE_SEQS_MAX: u64 = 1 << 16;

const TICK_TOKEN: Token = Token(usize::MAX);
const SLOT_TOKEN: Token = Token(usize::MAX - 1);

/// When the run starts and stops, fixed once every connection is up.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub measure_start: Instant,
    pub deadline: Option<Instant>,
}

/// What every thread of a run shares.
pub struct Shared {
    pub timing: std::sync::OnceLock<Timing>,
    pub barrier: std::sync::Barrier,
    pub requests_left: Option<std::sync::atomic::AtomicU64>,
    pub stop: std::sync::atomic::AtomicBool,
    pub stop_reason: std::sync::Mutex<Option<String>>,
}

impl Shared {
    pub fn timing(&self) -> Timing {
        *self.timing.get().expect("timing is set before any worker starts")
    }

    /// Takes one request from the `--requests` budget.
    fn take_request(&self) -> bool {
        match &self.requests_left {
            None => true,
            Some(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }

    pub fn stop(&self, why: String) {
        let mut reason = self.stop_reason.lock().unwrap_or_else(|e| e.into_inner());
        reason.get_or_insert(why);
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub enum Msg {
    Tick(Box<Tally>),
    Done,
}

/// What one thread hands back.
pub struct ThreadResult {
    pub tally: Tally,
    /// Records acknowledged (or sent, with `--ack none`) over the whole run, warm-up and drain
    /// included: what the CPU was spent on.
    pub records_all: u64,
    pub last_done: Option<Instant>,
    pub drain_done: Option<Instant>,
    pub connections_lost: u64,
    pub last_error: Option<String>,
    pub server: Option<(String, u16)>,
    /// Connections that went to the shard addresses.
    pub shard_aware: u64,
}

/// The connections one thread owns, by writer index. Each connection reaches every daemon of
/// `--addr` (a cluster when repeated), as a Kafka producer reaches every broker.
pub struct ThreadPlan {
    pub connections: Vec<u32>,
    pub seed: u64,
}

/// Everything a thread needs besides its plan.
pub struct ThreadCtx {
    pub args: Arc<RunArgs>,
    pub shared: Arc<Shared>,
    pub chooser: Arc<StreamChooser>,
    pub run_id: u32,
    pub log: Option<VerifyLogWriter>,
    pub tx: Sender<Msg>,
    /// Shard addresses offered by each main address (`None`: the daemon routes, or `--routed`).
    pub routes: Arc<HashMap<SocketAddr, Option<Vec<SocketAddr>>>>,
}

/// Payload seqs per stream: the next seq of each stream this connection writes.
enum Seqs {
    Dense { base: u64, next: Vec<u64> },
    Sparse(HashMap<u64, u64>),
}

impl Seqs {
    fn new(chooser: &StreamChooser) -> Seqs {
        if chooser.count() <= DENSE_SEQS_MAX {
            Seqs::Dense {
                base: chooser.base(),
                next: vec![0; chooser.count() as usize],
            }
        } else {
            Seqs::Sparse(HashMap::new())
        }
    }

    /// Reserves `n` consecutive seqs of `stream` and returns the first.
    fn take(&mut self, stream: u64, n: u64) -> u64 {
        let seq = match self {
            Seqs::Dense { base, next } => &mut next[(stream - *base) as usize],
            Seqs::Sparse(map) => map.entry(stream).or_insert(0),
        };
        let first = *seq;
        *seq += n;
        first
    }
}

struct Sock {
    stream: mio::net::TcpStream,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    out_at: usize,
    inbuf: FrameReader,
    /// Since when the socket has refused output with no progress (the send timeout).
    stalled_since: Option<Instant>,
}

impl Sock {
    fn flushed(&self) -> bool {
        self.out_at == self.out.len()
    }

    /// Writes what is queued until done or the socket is full.
    fn flush(&mut self, now: Instant) -> std::io::Result<()> {
        while self.out_at < self.out.len() {
            match self.stream.write(&self.out[self.out_at..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_at += n;
                    self.stalled_since = None;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.stalled_since.get_or_insert(now);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_at = 0;
        Ok(())
    }
}

#[derive(Default)]
struct Slot {
    /// 0 when free.
    id: u64,
    /// Intended (open loop) or actual send time.
    from: Option<Instant>,
    drain: bool,
    stream: u64,
    enc: Encoded,
}

/// One daemon of the cluster, as one connection reaches it.
struct Member {
    /// Index in `socks` of the daemon's first socket.
    first_sock: usize,
    shard_count: u16,
    /// One socket per shard (`first_sock + shard`); otherwise one routed socket.
    shard_aware: bool,
}

struct Client {
    writer: u32,
    socks: Vec<Sock>,
    /// The daemons in cluster order: a stream's home daemon is
    /// `members[daemon_for(stream, members.len())]`, and its socket that daemon's routed one or
    /// the one of `shard_for(stream, shard_count)`.
    members: Vec<Member>,
    rng: Rng,
    seqs: Seqs,
    frames: AppendFrames,
    /// Encoding details of unacked appends, which hold no slot.
    scratch: Encoded,
    schedule: Option<Schedule>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    next_id: u64,
    /// May still send load (before the deadline, the request budget, or a stop).
    sending: bool,
    drain_started: bool,
    drain_failed: bool,
    dead: bool,
    /// Counted as finished (see `Worker::update_finished`).
    done: bool,
    touched: bool,
}

impl Client {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn sock_for(&self, stream: u64) -> usize {
        let m = match self.members.len() {
            1 => &self.members[0],
            n => &self.members[proto::daemon_for(stream, n as u32) as usize],
        };
        if m.shard_aware {
            m.first_sock + usize::from(proto::shard_for(stream, m.shard_count))
        } else {
            m.first_sock
        }
    }

    /// The homes `(daemon, shard)` of this cluster, as flat indices: daemon d's shard s is
    /// `home_base(d) + s`.
    fn homes(&self) -> usize {
        self.members.iter().map(|m| usize::from(m.shard_count)).sum()
    }

    fn home_index(&self, stream: u64) -> usize {
        let d = match self.members.len() {
            1 => 0,
            n => proto::daemon_for(stream, n as u32) as usize,
        };
        let base: usize = self.members[..d].iter().map(|m| usize::from(m.shard_count)).sum();
        base + usize::from(proto::shard_for(stream, self.members[d].shard_count))
    }

    fn flushed(&self) -> bool {
        self.socks.iter().all(Sock::flushed)
    }

    fn finished(&self, ack_none: bool) -> bool {
        self.dead || (!self.sending && self.in_flight() == 0 && (!ack_none || self.drain_started))
    }

    /// An id for slot `slot`, never 0 and never with the unacked bit.
    fn slot_id(&mut self, slot: u32) -> u64 {
        let id = (self.next_id << SLOT_BITS) | u64::from(slot);
        self.next_id += 1;
        debug_assert!(id & UNACKED_ID_BIT == 0);
        id
    }
}

/// A response, classified and copied out of the read buffer.
enum Resp {
    Appended {
        id: u64,
        shard: u16,
        first_lsn: u64,
        count: u32,
    },
    Error {
        id: u64,
        code: &'static str,
    },
    Other {
        id: u64,
    },
}

/// Reads an answer: in place when it is a well-formed `Appended` and `verified` is off,
/// through the verifying codec otherwise.
fn classify(payload: &[u8], verified: bool) -> Result<Resp, String> {
    if !verified {
        if let Some(a) = read_appended(payload) {
            return Ok(Resp::Appended {
                id: a.id,
                shard: a.shard,
                first_lsn: a.first_lsn,
                count: a.count,
            });
        }
    }
    let resp = proto::codec::view_response(payload).map_err(|e| format!("undecodable response: {e}"))?;
    let id = resp.id();
    Ok(if let Some(a) = resp.body_as_appended() {
        Resp::Appended {
            id,
            shard: a.shard(),
            first_lsn: a.first_lsn(),
            count: a.count(),
        }
    } else if let Some(e) = resp.body_as_error() {
        Resp::Error {
            id,
            code: e.code().variant_name().unwrap_or("Unknown"),
        }
    } else {
        Resp::Other { id }
    })
}

/// A timerfd in the loop's epoll set.
struct Timer(OwnedFd);

impl Timer {
    fn new() -> std::io::Result<Timer> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        Ok(Timer(timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?))
    }

    /// Fires after `first` (at least 1 ns), then every `interval` (zero: once).
    fn set(&self, first: Duration, interval: Duration) -> std::io::Result<()> {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        let ts = |d: Duration| Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        };
        let spec = Itimerspec {
            it_interval: ts(interval),
            it_value: ts(first.max(Duration::from_nanos(1))),
        };
        timerfd_settime(&self.0, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Consumes the expirations, so the next one raises a new edge.
    fn clear(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut buf);
    }
}

struct Worker {
    args: Arc<RunArgs>,
    shared: Arc<Shared>,
    chooser: Arc<StreamChooser>,
    run_id: u32,
    timing: Timing,
    start: Instant,
    ack_none: bool,
    verified: bool,
    /// A live line is shown: keep interval counts and send them in ticks. Without it (`-q`)
    /// the loop does no per-interval work at all.
    live: bool,
    clients: Vec<Client>,
    /// Token -> (client, socket).
    tokens: Vec<(u32, u16)>,
    tally: Tally,
    interval: Tally,
    records_all: u64,
    last_done: Option<Instant>,
    last_progress: Instant,
    last_tick: Instant,
    drain_done: Option<Instant>,
    connections_lost: u64,
    last_error: Option<String>,
    log: Option<VerifyLogWriter>,
    log_batch: Vec<AckedRecord>,
    tx: Sender<Msg>,
    touched: Vec<u32>,
    slot_timer_at: Option<Instant>,
    /// Clients not yet finished; the loop ends at zero.
    unfinished: usize,
}

/// Connects this thread's connections, waits for every thread, then runs the load.
pub fn thread_main(ctx: ThreadCtx, plan: ThreadPlan) -> anyhow::Result<ThreadResult> {
    let args = ctx.args.clone();
    let ack_none = args.ack == Ack::None;
    let mut clients = Vec::new();
    let mut tally = Tally::default();
    let mut connections_lost = 0;
    let mut last_error = None;
    let mut server = None;
    let mut shard_aware = 0;
    for &writer in &plan.connections {
        let mut socks = Vec::new();
        let mut members = Vec::with_capacity(args.addrs.len());
        let mut failed = None;
        let mut aware = true;
        'daemons: for &addr in &args.addrs {
            let route = ctx.routes.get(&addr).cloned().flatten();
            aware &= route.is_some();
            let targets = route.clone().unwrap_or_else(|| vec![addr]);
            let first_sock = socks.len();
            let mut shard_count = 1;
            for target in targets {
                match connect(target, args.connect_timeout) {
                    Ok((stream, hello)) => {
                        server.get_or_insert_with(|| (hello.server.clone().unwrap_or_default(), hello.shard_count));
                        shard_count = hello.shard_count;
                        socks.push(Sock {
                            stream: mio::net::TcpStream::from_std(stream),
                            out: Vec::new(),
                            out_at: 0,
                            inbuf: FrameReader::new(FRAME_BYTES_MAX_DEFAULT),
                            stalled_since: None,
                        });
                    }
                    Err(e) => {
                        failed = Some(format!("cannot connect to {target}: {e}"));
                        break 'daemons;
                    }
                }
            }
            members.push(Member {
                first_sock,
                shard_count,
                shard_aware: route.is_some(),
            });
        }
        if let Some(why) = failed {
            tally.error("connect");
            connections_lost += 1;
            last_error = Some(why);
            continue;
        }
        if aware {
            shard_aware += 1;
        }
        let homes: usize = members.iter().map(|m| usize::from(m.shard_count)).sum();
        let slots = if ack_none { homes } else { args.pipeline };
        let id = Writer {
            run: ctx.run_id,
            writer,
        };
        clients.push(Client {
            writer,
            socks,
            members,
            rng: Rng::new(plan.seed ^ proto::placement::mix64(u64::from(writer))),
            seqs: Seqs::new(&ctx.chooser),
            frames: AppendFrames::new(args.ack.wire(), args.records_per_frame, args.record_bytes, id),
            scratch: Encoded::default(),
            schedule: None,
            slots: (0..slots).map(|_| Slot::default()).collect(),
            free: (0..slots as u32).rev().collect(),
            next_id: 1,
            sending: true,
            drain_started: false,
            drain_failed: false,
            dead: false,
            done: false,
            touched: false,
        });
    }

    // Every thread waits here; one of them then fixes the clock for all.
    if ctx.shared.barrier.wait().is_leader() {
        let start = Instant::now();
        let measure_start = start + args.warmup;
        let deadline = args.requests.is_none().then(|| measure_start + args.duration);
        let _ = ctx.shared.timing.set(Timing {
            measure_start,
            deadline,
        });
    }
    ctx.shared.barrier.wait();
    let timing = ctx.shared.timing();
    let start = timing.measure_start - args.warmup;
    if let Some(rate) = args.rate {
        let per_conn = rate / args.connections as f64;
        for c in &mut clients {
            // Stagger connections so the total is spread evenly over each interval.
            let phase = Duration::from_secs_f64(f64::from(c.writer) / rate);
            c.schedule = Some(Schedule::new(per_conn, phase));
        }
    }

    let now = Instant::now();
    let mut worker = Worker {
        verified: ctx.log.is_some(),
        live: !args.quiet,
        args,
        shared: ctx.shared,
        chooser: ctx.chooser,
        run_id: ctx.run_id,
        timing,
        start,
        ack_none,
        clients,
        tokens: Vec::new(),
        tally,
        interval: Tally::default(),
        records_all: 0,
        last_done: None,
        last_progress: now,
        last_tick: now,
        drain_done: None,
        connections_lost,
        last_error,
        log: ctx.log,
        log_batch: Vec::new(),
        tx: ctx.tx,
        touched: Vec::new(),
        slot_timer_at: None,
        unfinished: 0,
    };
    worker.unfinished = worker.clients.len();
    worker.run()?;
    let tail = worker.interval.take();
    let _ = worker.tx.send(Msg::Tick(Box::new(tail)));
    let _ = worker.tx.send(Msg::Done);
    Ok(ThreadResult {
        tally: worker.tally.take(),
        records_all: worker.records_all,
        last_done: worker.last_done,
        drain_done: worker.drain_done,
        connections_lost: worker.connections_lost,
        last_error: worker.last_error,
        server,
        shard_aware,
    })
}

impl Worker {
    fn run(&mut self) -> anyhow::Result<()> {
        let mut poll = Poll::new()?;
        for (ci, c) in self.clients.iter_mut().enumerate() {
            for (si, s) in c.socks.iter_mut().enumerate() {
                let token = Token(self.tokens.len());
                self.tokens.push((ci as u32, si as u16));
                poll.registry()
                    .register(&mut s.stream, token, Interest::READABLE | Interest::WRITABLE)?;
            }
        }
        let check_every = (self.args.response_timeout / 4).min(TICK_INTERVAL);
        let tick = Timer::new()?;
        tick.set(check_every, check_every)?;
        poll.registry()
            .register(&mut SourceFd(&tick.0.as_raw_fd()), TICK_TOKEN, Interest::READABLE)?;
        let slot_timer = Timer::new()?;
        poll.registry()
            .register(&mut SourceFd(&slot_timer.0.as_raw_fd()), SLOT_TOKEN, Interest::READABLE)?;
        let spin = Duration::from_micros(self.args.spin_before_park_us);
        let mut events = Events::with_capacity(1024);

        // The first requests.
        let now = Instant::now();
        for ci in 0..self.clients.len() {
            self.refill(ci, now);
        }
        let unacked_closed = self.ack_none && self.args.rate.is_none();
        while self.unfinished > 0 {
            // `--ack none` closed loop: connections whose last batch is written send the next
            // one in this turn, so the loop only polls, without sleeping.
            let runnable = unacked_closed && self.clients.iter().any(|c| c.sending && !c.dead && c.flushed());
            if self.args.rate.is_some() {
                self.arm_slot_timer(&slot_timer, Instant::now())?;
            }
            if runnable {
                wait(&mut poll, &mut events, Some(Duration::ZERO))?;
            } else {
                // Spin before sleeping, if asked: trades CPU for wake-up latency.
                let spun = Instant::now();
                while !spin.is_zero() && events.is_empty() && spun.elapsed() < spin {
                    wait(&mut poll, &mut events, Some(Duration::ZERO))?;
                }
                if events.is_empty() {
                    wait(&mut poll, &mut events, None)?;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    TICK_TOKEN => {
                        tick.clear();
                        self.on_tick(now);
                    }
                    SLOT_TOKEN => {
                        slot_timer.clear();
                        self.slot_timer_at = None;
                        for ci in 0..self.clients.len() {
                            self.touch(ci);
                        }
                    }
                    Token(t) => {
                        let (ci, si) = self.tokens[t];
                        let (ci, si) = (ci as usize, usize::from(si));
                        if self.clients[ci].dead {
                            continue;
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(ci, si);
                        }
                        self.touch(ci);
                    }
                }
            }
            events.clear();
            if runnable {
                for ci in 0..self.clients.len() {
                    self.touch(ci);
                }
            }
            let touched = std::mem::take(&mut self.touched);
            let now = Instant::now();
            for &ci in &touched {
                let ci = ci as usize;
                self.clients[ci].touched = false;
                self.refill(ci, now);
            }
            self.touched = touched;
            self.touched.clear();
        }
        Ok(())
    }

    /// Counts a client as finished once it is.
    fn update_finished(&mut self, ci: usize) {
        let c = &mut self.clients[ci];
        if !c.done && c.finished(self.ack_none) {
            c.done = true;
            self.unfinished -= 1;
        }
    }

    fn touch(&mut self, ci: usize) {
        let c = &mut self.clients[ci];
        if !c.touched {
            c.touched = true;
            self.touched.push(ci as u32);
        }
    }

    /// Arms the open-loop timer for the earliest intended send time of a connection that has
    /// room for it.
    fn arm_slot_timer(&mut self, timer: &Timer, now: Instant) -> std::io::Result<()> {
        let next = self
            .clients
            .iter()
            .filter(|c| !c.dead && c.sending && !c.free.is_empty())
            .filter_map(|c| c.schedule.as_ref().map(|s| self.start + s.slot(s.taken())))
            .min();
        let Some(at) = next else { return Ok(()) };
        if self.slot_timer_at.is_some_and(|armed| armed <= at) {
            return Ok(());
        }
        self.slot_timer_at = Some(at);
        timer.set(at.saturating_duration_since(now), Duration::ZERO)
    }

    fn on_tick(&mut self, now: Instant) {
        if self.live && now.duration_since(self.last_tick) >= TICK_INTERVAL {
            self.last_tick = now;
            let tally = self.interval.take();
            let _ = self.tx.send(Msg::Tick(Box::new(tally)));
        }
        self.watchdog(now);
    }

    /// Gives up on the daemon when requests are outstanding and nothing has come back for
    /// `--response-timeout`, or a socket has taken no output for that long: a hung daemon
    /// must not hang the generator.
    fn watchdog(&mut self, now: Instant) {
        let timeout = self.args.response_timeout;
        for ci in 0..self.clients.len() {
            let stalled = self.clients[ci]
                .socks
                .iter()
                .any(|s| s.stalled_since.is_some_and(|t| now.duration_since(t) >= timeout));
            if stalled && !self.clients[ci].dead {
                self.error("send_timeout");
                self.shared
                    .stop(format!("the daemon read nothing from a connection for {timeout:?}"));
                self.lost(ci, format!("outbound buffer not drained for {timeout:?}"));
            }
        }
        let outstanding: usize = self.clients.iter().filter(|c| !c.dead).map(Client::in_flight).sum();
        if outstanding == 0 {
            // Idle (open loop between slots, or done): the timeout runs from the next request.
            self.last_progress = now;
            return;
        }
        if now.duration_since(self.last_progress) >= timeout {
            self.shared.stop(format!(
                "{outstanding} requests outstanding and no response for {timeout:?}; gave up on the daemon"
            ));
            for ci in 0..self.clients.len() {
                if !self.clients[ci].done {
                    self.lost(ci, format!("no response for {timeout:?}"));
                }
            }
        }
    }

    fn error(&mut self, kind: &str) {
        if self.live {
            self.interval.error(kind);
        }
        self.tally.error(kind);
    }

    /// The connection is gone: its requests in flight fail, and it sends nothing more.
    fn lost(&mut self, ci: usize, why: String) {
        let c = &mut self.clients[ci];
        if c.dead {
            return;
        }
        c.dead = true;
        c.sending = false;
        let in_flight = c.in_flight();
        c.slots.iter_mut().for_each(|s| s.id = 0);
        c.free = (0..c.slots.len() as u32).rev().collect();
        // Closing the sockets removes them from the epoll set.
        c.socks.clear();
        for _ in 0..in_flight {
            self.error("connection_closed");
        }
        self.connections_lost += 1;
        self.last_error = Some(why);
        self.update_finished(ci);
    }

    fn on_readable(&mut self, ci: usize, si: usize) {
        let mut closed = None;
        loop {
            let sock = &mut self.clients[ci].socks[si];
            let spare = sock.inbuf.spare(READ_CHUNK_BYTES);
            let n = match sock.stream.read(spare) {
                Ok(0) => {
                    sock.inbuf.filled(0);
                    closed = Some("the server closed the connection".to_string());
                    0
                }
                Ok(n) => {
                    sock.inbuf.filled(n);
                    n
                }
                Err(e) => {
                    sock.inbuf.filled(0);
                    match e.kind() {
                        ErrorKind::WouldBlock => 0,
                        ErrorKind::Interrupted => continue,
                        _ => {
                            closed = Some(format!("read failed: {e}"));
                            0
                        }
                    }
                }
            };
            // Answers already received count even if the connection then closed.
            let now = Instant::now();
            loop {
                let resp = match self.clients[ci].socks[si].inbuf.next_frame() {
                    Ok(Some(payload)) => classify(payload, self.verified),
                    Ok(None) => break,
                    Err(e) => Err(format!("bad frame from server: {e}")),
                };
                match resp {
                    Ok(resp) => self.on_response(ci, resp, now),
                    Err(why) => {
                        self.error("decode");
                        closed = Some(why);
                        break;
                    }
                }
            }
            if closed.is_some() || n < READ_CHUNK_BYTES {
                break;
            }
        }
        self.flush_log();
        if let Some(why) = closed {
            self.lost(ci, why);
        }
    }

    fn flush_log(&mut self) {
        let Some(log) = &mut self.log else { return };
        if self.log_batch.is_empty() {
            return;
        }
        if let Err(e) = log.append(self.log_batch.drain(..)) {
            self.error("verify_log_write");
            self.shared.stop(format!("{e}"));
        }
    }

    fn on_response(&mut self, ci: usize, resp: Resp, now: Instant) {
        self.last_progress = now;
        let id = match resp {
            Resp::Appended { id, .. } | Resp::Error { id, .. } | Resp::Other { id } => id,
        };
        let c = &mut self.clients[ci];
        let slot_index = (id & ((1 << SLOT_BITS) - 1)) as usize;
        let ours = id & UNACKED_ID_BIT == 0 && c.slots.get(slot_index).is_some_and(|s| s.id == id);
        if !ours {
            match resp {
                // An error for an append nobody waits on (`--ack none`).
                Resp::Error { code, .. } => self.error(code),
                _ => self.error("unexpected_response"),
            }
            return;
        }
        c.slots[slot_index].id = 0;
        c.free.push(slot_index as u32);
        let slot = &c.slots[slot_index];
        if slot.drain {
            match resp {
                Resp::Appended { count, .. } if count == slot.enc.records => self.records_all += u64::from(count),
                Resp::Appended { .. } => {
                    c.drain_failed = true;
                    self.error("bad_ack");
                }
                Resp::Error { code, .. } => {
                    c.drain_failed = true;
                    self.error(code);
                }
                Resp::Other { .. } => {
                    c.drain_failed = true;
                    self.error("unexpected_response");
                }
            }
            let c = &self.clients[ci];
            if c.in_flight() == 0 && !c.drain_failed && self.drain_done.is_none_or(|d| d < now) {
                self.drain_done = Some(now);
            }
            return;
        }
        match resp {
            Resp::Appended {
                shard,
                first_lsn,
                count,
                ..
            } if count == slot.enc.records => {
                let (from, records, bytes) = (slot.from, slot.enc.records, slot.enc.bytes);
                if self.log.is_some() {
                    let stream = slot.stream;
                    self.log_batch
                        .extend(
                            slot.enc
                                .lens
                                .iter()
                                .zip(&slot.enc.crcs)
                                .enumerate()
                                .map(|(i, (&len, &crc))| AckedRecord {
                                    stream,
                                    shard,
                                    lsn: first_lsn + i as u64,
                                    crc32c: crc,
                                    len,
                                }),
                        );
                }
                self.completed(from.unwrap_or(now), now, u64::from(records), bytes, true);
            }
            Resp::Appended { .. } => self.error("bad_ack"),
            Resp::Error { code, .. } => self.error(code),
            Resp::Other { .. } => self.error("unexpected_response"),
        }
    }

    /// A request completed. `from` is its intended (open loop) or actual send time.
    fn completed(&mut self, from: Instant, done: Instant, records: u64, bytes: u64, latency: bool) {
        self.records_all += records;
        if self.live {
            let iv = &mut self.interval;
            iv.requests += 1;
            iv.records += records;
            iv.bytes += bytes;
            if latency {
                record(&mut iv.latency, done.saturating_duration_since(from));
            }
        }
        if from < self.timing.measure_start {
            return;
        }
        let t = &mut self.tally;
        t.requests += 1;
        t.records += records;
        t.bytes += bytes;
        if latency {
            record(&mut t.latency, done.saturating_duration_since(from));
        }
        if self.last_done.is_none_or(|d| d < done) {
            self.last_done = Some(done);
        }
    }

    /// Whether one more request may go out now (and takes it from the budget).
    fn may_send(&self, now: Instant) -> bool {
        !self.shared.stop.load(Ordering::Relaxed)
            && self.timing.deadline.is_none_or(|d| now < d)
            && self.shared.take_request()
    }

    /// Sends what the connection may send now, then writes it out.
    fn refill(&mut self, ci: usize, now: Instant) {
        if self.clients[ci].dead {
            self.update_finished(ci);
            return;
        }
        if self.clients[ci].sending {
            match (self.ack_none, self.clients[ci].schedule.is_some()) {
                (false, false) => {
                    while !self.clients[ci].free.is_empty() {
                        if !self.may_send(now) {
                            self.clients[ci].sending = false;
                            break;
                        }
                        self.send_acked(ci, now, None);
                    }
                }
                (false, true) => {
                    while !self.clients[ci].free.is_empty() {
                        let Some(at) = self.next_slot(ci, now) else { break };
                        self.send_acked(ci, now, Some(at));
                    }
                }
                (true, false) => {
                    // One batch per turn of the loop, once the last one is written.
                    if self.clients[ci].flushed() {
                        for _ in 0..self.args.pipeline {
                            if !self.may_send(now) {
                                self.clients[ci].sending = false;
                                break;
                            }
                            self.send_unacked(ci, now, None);
                        }
                    }
                }
                (true, true) => {
                    while let Some(at) = self.next_slot(ci, now) {
                        self.send_unacked(ci, now, Some(at));
                    }
                }
            }
        }
        if self.ack_none && !self.clients[ci].sending && !self.clients[ci].drain_started {
            self.start_drain(ci, now);
        }
        let c = &mut self.clients[ci];
        let mut failed = None;
        for s in &mut c.socks {
            if let Err(e) = s.flush(now) {
                failed = Some(format!("write failed: {e}"));
                break;
            }
        }
        if let Some(why) = failed {
            self.error("io");
            self.lost(ci, why);
        }
        self.update_finished(ci);
    }

    /// Open loop: takes the connection's next intended send time if it has come (and may
    /// be sent); `None` otherwise. Marks the connection done at the deadline.
    fn next_slot(&mut self, ci: usize, now: Instant) -> Option<Instant> {
        let schedule = self.clients[ci].schedule.as_ref().expect("open loop");
        let at = self.start + schedule.slot(schedule.taken());
        if self.timing.deadline.is_some_and(|d| at >= d) || self.shared.stop.load(Ordering::Relaxed) {
            self.clients[ci].sending = false;
            return None;
        }
        if at > now {
            return None;
        }
        if !self.shared.take_request() {
            self.clients[ci].sending = false;
            return None;
        }
        schedule.take();
        Some(at)
    }

    fn send_acked(&mut self, ci: usize, now: Instant, intended: Option<Instant>) {
        let c = &mut self.clients[ci];
        let slot = c.free.pop().expect("a free slot");
        let id = c.slot_id(slot);
        let stream = self.chooser.next(&mut c.rng);
        self.encode(ci, slot, id, stream, false);
        let s = &mut self.clients[ci].slots[slot as usize];
        s.id = id;
        s.from = Some(intended.unwrap_or(now));
        s.drain = false;
        s.stream = stream;
    }

    fn encode(&mut self, ci: usize, slot: u32, id: u64, stream: u64, drain: bool) {
        let checksums = self.log.is_some();
        let writer = Writer {
            run: self.run_id,
            writer: self.clients[ci].writer,
        };
        let c = &mut self.clients[ci];
        let sock = c.sock_for(stream);
        let records = if drain { 1 } else { self.args.records_per_frame };
        let first_seq = c.seqs.take(stream, u64::from(records));
        let enc = &mut c.slots[slot as usize].enc;
        if drain {
            let mut frames = AppendFrames::new(AckLevel::Durable, 1, self.args.record_bytes, writer);
            frames.encode(
                id,
                stream,
                writer,
                first_seq,
                &mut c.rng,
                checksums,
                &mut c.socks[sock].out,
                enc,
            );
        } else {
            c.frames.encode(
                id,
                stream,
                writer,
                first_seq,
                &mut c.rng,
                checksums,
                &mut c.socks[sock].out,
                enc,
            );
        }
    }

    fn send_unacked(&mut self, ci: usize, now: Instant, intended: Option<Instant>) {
        let c = &mut self.clients[ci];
        let id = UNACKED_ID_BIT | c.next_id;
        c.next_id += 1;
        let stream = self.chooser.next(&mut c.rng);
        let writer = Writer {
            run: self.run_id,
            writer: c.writer,
        };
        let sock = c.sock_for(stream);
        let first_seq = c.seqs.take(stream, u64::from(self.args.records_per_frame));
        c.frames.encode(
            id,
            stream,
            writer,
            first_seq,
            &mut c.rng,
            false,
            &mut c.socks[sock].out,
            &mut c.scratch,
        );
        let (records, bytes) = (u64::from(c.scratch.records), c.scratch.bytes);
        self.completed(intended.unwrap_or(now), now, records, bytes, false);
    }

    /// `--ack none`: one durable append per home (daemon, shard) this run's streams reach.
    /// Each shard processes one connection's appends in order, so when the durable one is
    /// acked, everything this connection sent to that shard before it is durable.
    fn start_drain(&mut self, ci: usize, now: Instant) {
        self.clients[ci].drain_started = true;
        let mut by_shard: Vec<Option<u64>> = vec![None; self.clients[ci].homes()];
        let scan = self.chooser.count().min(DRAIN_STREAM_SCAN_MAX);
        for s in self.chooser.base()..self.chooser.base() + scan {
            let home = self.clients[ci].home_index(s);
            by_shard[home].get_or_insert(s);
        }
        for stream in by_shard.into_iter().flatten() {
            let c = &mut self.clients[ci];
            let slot = c.free.pop().expect("a slot per shard");
            let id = c.slot_id(slot);
            self.encode(ci, slot, id, stream, true);
            let s = &mut self.clients[ci].slots[slot as usize];
            s.id = id;
            s.from = Some(now);
            s.drain = true;
            s.stream = stream;
        }
    }
}

fn wait(poll: &mut Poll, events: &mut Events, timeout: Option<Duration>) -> std::io::Result<()> {
    match poll.poll(events, timeout) {
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::codec::Encoder;
    use proto::frame::decode_whole_frame;
    use proto::wire::ErrorCode;

    #[test]
    fn seqs_count_per_stream_in_both_forms() {
        for chooser in [
            StreamChooser::uniform(100, 4),
            StreamChooser::uniform(0, DENSE_SEQS_MAX + 1),
        ] {
            let mut seqs = Seqs::new(&chooser);
            let base = chooser.base();
            assert_eq!(seqs.take(base, 3), 0);
            assert_eq!(seqs.take(base, 1), 3);
            assert_eq!(seqs.take(base + 1, 2), 0, "streams count apart");
            assert_eq!(seqs.take(base, 1), 4);
        }
        assert!(matches!(Seqs::new(&StreamChooser::uniform(0, 4)), Seqs::Dense { .. }));
        assert!(matches!(
            Seqs::new(&StreamChooser::uniform(0, DENSE_SEQS_MAX + 1)),
            Seqs::Sparse(_)
        ));
    }

    fn payload(frame: &[u8]) -> &[u8] {
        decode_whole_frame(frame, FRAME_BYTES_MAX_DEFAULT).expect("one frame")
    }

    #[test]
    fn answers_classify_the_same_with_and_without_the_verifier() {
        let mut enc = Encoder::new();
        let mut appended = Vec::new();
        enc.appended(5 << SLOT_BITS | 3, 2, 40, 8, &mut appended);
        let mut error = Vec::new();
        enc.error(9, ErrorCode::Poisoned, "fsync failed", &mut error);
        for verified in [false, true] {
            match classify(payload(&appended), verified) {
                Ok(Resp::Appended {
                    id,
                    shard,
                    first_lsn,
                    count,
                }) => assert_eq!((id, shard, first_lsn, count), (5 << SLOT_BITS | 3, 2, 40, 8)),
                _ => panic!("not read as Appended (verified: {verified})"),
            }
            match classify(payload(&error), verified) {
                Ok(Resp::Error { id, code }) => assert_eq!((id, code), (9, "Poisoned")),
                _ => panic!("not read as Error (verified: {verified})"),
            }
            assert!(classify(&[1, 2, 3], verified).is_err(), "garbage is refused");
        }
    }
}
