//! The generator: executors, connections, workers, and the live report.
//!
//! Each executor (thread) owns some connections. A connection runs
//! `--pipeline` workers that each keep one request in flight (closed loop),
//! or that take slots from the connection's schedule (open loop, see
//! [`crate::pacing`]). With `--ack none` one sender per connection queues
//! appends without waiting, `--pipeline` of them before the connection's
//! writer sends them, then proves the daemon drained them with one durable
//! append per shard.
//!
//! Shard-local state is `Rc`/`RefCell`; only the live ticks and the final
//! results cross threads, as owned values.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use proto::client::AsyncClient;
use proto::codec::AppendRecord;
use proto::ClientError;

use crate::config::{Ack, RunArgs, StreamDist};
use crate::pacing::Schedule;
use crate::payload::{fill_payload, PayloadHeader};
use crate::report::{fmt_us, DrainReport, Report, ReportConfig, REPORT_VERSION};
use crate::rng::Rng;
use crate::stats::{record, LatencySummary, Tally};
use crate::streams::StreamChooser;
use crate::verify_log::{AckedRecord, VerifyLogWriter};

/// How often executors send their interval counts to the main thread.
const TICK_INTERVAL: Duration = Duration::from_millis(250);
/// How often the live line is printed.
const PRINT_INTERVAL: Duration = Duration::from_secs(1);
/// Memory glommio registers per ring. The generator does no file I/O, and
/// the amount counts three times against RLIMIT_MEMLOCK.
const IO_MEMORY_BYTES: usize = 512 << 10;
/// With `--ack none`, server errors are collected every this many sends.
const ORPHAN_ERRORS_POLL_EVERY: u64 = 256;
/// Streams scanned to find one per shard for the `--ack none` drain.
const DRAIN_STREAM_SCAN_MAX: u64 = 1 << 16;

/// Exit status when every connection was lost before the run's end.
pub const EXIT_CONNECTIONS_LOST: i32 = 2;

/// When the run starts and stops, fixed once every connection is up.
#[derive(Debug, Clone, Copy)]
struct Timing {
    measure_start: Instant,
    deadline: Option<Instant>,
}

struct Shared {
    timing: OnceLock<Timing>,
    barrier: Barrier,
    requests_left: Option<AtomicU64>,
    stop: AtomicBool,
    stop_reason: Mutex<Option<String>>,
}

impl Shared {
    fn timing(&self) -> Timing {
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

    fn stop(&self, why: String) {
        let mut reason = self.stop_reason.lock().unwrap_or_else(|e| e.into_inner());
        reason.get_or_insert(why);
        self.stop.store(true, Ordering::Relaxed);
    }
}

enum Msg {
    Tick(Box<Tally>),
    Done,
}

/// What one executor hands back.
struct ThreadResult {
    tally: Tally,
    last_done: Option<Instant>,
    drain_done: Option<Instant>,
    connections_lost: u64,
    last_error: Option<String>,
    server: Option<(String, u16)>,
}

struct Ctx {
    args: Arc<RunArgs>,
    shared: Arc<Shared>,
    chooser: Arc<StreamChooser>,
    run_id: u32,
    timing: Cell<Option<Timing>>,
    /// Counts for the report: only requests sent (or intended) after the warm-up.
    tally: RefCell<Tally>,
    /// Counts for the live line: every completion.
    interval: RefCell<Tally>,
    last_done: Cell<Option<Instant>>,
    /// When a response (success or error) last arrived, for the watchdog.
    last_progress: Cell<Instant>,
    drain_done: Cell<Option<Instant>>,
    connections_lost: Cell<u64>,
    last_error: RefCell<Option<String>>,
    log: Option<RefCell<VerifyLogWriter>>,
    finished: Cell<bool>,
    tx: Sender<Msg>,
}

impl Ctx {
    fn timing(&self) -> Timing {
        self.timing.get().expect("timing is set before any worker starts")
    }

    fn should_stop(&self, now: Instant) -> bool {
        self.shared.stop.load(Ordering::Relaxed) || self.timing().deadline.is_some_and(|d| now >= d)
    }

    /// A request completed. `from` is its intended (open loop) or actual send time.
    fn completed(&self, from: Instant, done: Instant, records: u64, bytes: u64, latency: bool) {
        self.last_progress.set(done);
        {
            let mut iv = self.interval.borrow_mut();
            iv.requests += 1;
            iv.records += records;
            iv.bytes += bytes;
            if latency {
                record(&mut iv.latency, done.saturating_duration_since(from));
            }
        }
        if from < self.timing().measure_start {
            return;
        }
        let mut t = self.tally.borrow_mut();
        t.requests += 1;
        t.records += records;
        t.bytes += bytes;
        if latency {
            record(&mut t.latency, done.saturating_duration_since(from));
        }
        drop(t);
        if self.last_done.get().is_none_or(|d| d < done) {
            self.last_done.set(Some(done));
        }
    }

    fn error(&self, kind: &str) {
        self.last_progress.set(Instant::now());
        self.interval.borrow_mut().error(kind);
        self.tally.borrow_mut().error(kind);
    }

    fn log_acked(&self, records: impl IntoIterator<Item = AckedRecord>) {
        let Some(log) = &self.log else { return };
        if let Err(e) = log.borrow_mut().append(records) {
            self.error("verify_log_write");
            self.shared.stop(format!("{e}"));
        }
    }
}

/// Kinds of failure, as counted in the report, and whether the connection is gone.
fn error_kind(e: &ClientError) -> (String, bool) {
    match e {
        ClientError::Server(s) => (s.code.variant_name().unwrap_or("Unknown").to_string(), false),
        ClientError::Closed => ("connection_closed".into(), true),
        ClientError::Io(_) => ("io".into(), true),
        ClientError::Decode(_) => ("decode".into(), true),
        ClientError::UnexpectedResponse { .. } => ("unexpected_response".into(), false),
    }
}

struct Conn {
    writer: u32,
    client: AsyncClient,
    rng: RefCell<Rng>,
    /// Next seq per stream, for the payload headers.
    seqs: RefCell<HashMap<u64, u64>>,
    schedule: Option<Schedule>,
    dead: Cell<bool>,
}

impl Conn {
    fn lost(&self, ctx: &Ctx, why: String) {
        if !self.dead.replace(true) {
            ctx.connections_lost.set(ctx.connections_lost.get() + 1);
            *ctx.last_error.borrow_mut() = Some(why);
        }
    }
}

/// One request's records, built in reusable buffers.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    lens: Vec<usize>,
    crcs: Vec<u32>,
}

impl Batch {
    /// Fills `count` records for `stream`, taking seqs in order. Must not be
    /// separated from the send by an await: the seq order must be the wire order.
    fn build(&mut self, ctx: &Ctx, conn: &Conn, stream: u64, count: u32) {
        let mut rng = conn.rng.borrow_mut();
        self.lens.clear();
        self.crcs.clear();
        for _ in 0..count {
            self.lens.push(ctx.args.record_bytes.sample(&mut rng));
        }
        let total: usize = self.lens.iter().sum();
        self.buf.resize(total, 0);
        let mut seqs = conn.seqs.borrow_mut();
        let seq = seqs.entry(stream).or_insert(0);
        let mut at = 0;
        for &len in &self.lens {
            let header = PayloadHeader {
                run: ctx.run_id,
                writer: conn.writer,
                stream,
                seq: *seq,
            };
            *seq += 1;
            let out = &mut self.buf[at..at + len];
            fill_payload(&header, out);
            if ctx.log.is_some() {
                self.crcs.push(crc32c::crc32c(out));
            }
            at += len;
        }
    }

    fn records(&self) -> Vec<AppendRecord<'_>> {
        let mut at = 0;
        self.lens
            .iter()
            .map(|&len| {
                let r = AppendRecord::new(&self.buf[at..at + len]);
                at += len;
                r
            })
            .collect()
    }

    fn bytes(&self) -> u64 {
        self.buf.len() as u64
    }
}

/// Waits for the connection's next slot (open loop). `None` when the run is over.
async fn next_slot(ctx: &Ctx, conn: &Conn, start: Instant) -> Option<Instant> {
    let schedule = conn.schedule.as_ref()?;
    let at = start + schedule.take();
    if ctx.timing().deadline.is_some_and(|d| at >= d) {
        return None;
    }
    let now = Instant::now();
    if at > now {
        glommio::timer::sleep(at - now).await;
    }
    Some(at)
}

/// One request at a time, acked (`written` or `durable`).
async fn acked_worker(ctx: Rc<Ctx>, conn: Rc<Conn>, start: Instant) {
    let ack = ctx.args.ack.wire();
    let mut batch = Batch::default();
    loop {
        let intended = if conn.schedule.is_some() {
            match next_slot(&ctx, &conn, start).await {
                Some(at) => Some(at),
                None => return,
            }
        } else {
            None
        };
        if conn.dead.get() || ctx.should_stop(Instant::now()) || !ctx.shared.take_request() {
            return;
        }
        let stream = ctx.chooser.next(&mut conn.rng.borrow_mut());
        batch.build(&ctx, &conn, stream, ctx.args.records_per_frame);
        let records = batch.records();
        let sent = Instant::now();
        let res = conn.client.append(stream, &records, ack).await;
        let done = Instant::now();
        match res {
            Ok(Some(appended)) if appended.count as usize == records.len() => {
                ctx.log_acked(
                    batch
                        .lens
                        .iter()
                        .zip(&batch.crcs)
                        .enumerate()
                        .map(|(i, (&len, &crc))| AckedRecord {
                            stream,
                            shard: appended.shard,
                            lsn: appended.first_lsn + i as u64,
                            crc32c: crc,
                            len: len as u32,
                        }),
                );
                ctx.completed(
                    intended.unwrap_or(sent),
                    done,
                    records.len() as u64,
                    batch.bytes(),
                    true,
                );
            }
            Ok(_) => ctx.error("bad_ack"),
            Err(e) => {
                let (kind, fatal) = error_kind(&e);
                ctx.error(&kind);
                if fatal {
                    conn.lost(&ctx, e.to_string());
                    return;
                }
            }
        }
    }
}

/// `--ack none`: queue appends without waiting, then drain.
async fn unacked_sender(ctx: Rc<Ctx>, conn: Rc<Conn>, start: Instant) {
    let mut batch = Batch::default();
    let mut sent_count = 0u64;
    let per_write = ctx.args.pipeline.max(1) as u64;
    loop {
        let intended = if conn.schedule.is_some() {
            match next_slot(&ctx, &conn, start).await {
                Some(at) => Some(at),
                None => break,
            }
        } else {
            None
        };
        if conn.dead.get() || ctx.should_stop(Instant::now()) || !ctx.shared.take_request() {
            break;
        }
        let stream = ctx.chooser.next(&mut conn.rng.borrow_mut());
        batch.build(&ctx, &conn, stream, ctx.args.records_per_frame);
        let records = batch.records();
        let sent = Instant::now();
        // The append waits only while the connection's outbound buffer is full: bound that
        // wait, or a daemon that stops reading would hold the generator forever.
        let timeout = ctx.args.response_timeout;
        let res = futures_lite::future::or(
            async { Some(conn.client.append(stream, &records, proto::wire::AckLevel::None).await) },
            async {
                glommio::timer::sleep(timeout).await;
                None
            },
        )
        .await;
        let Some(res) = res else {
            ctx.error("send_timeout");
            ctx.shared
                .stop(format!("the daemon read nothing from a connection for {timeout:?}"));
            conn.lost(&ctx, format!("outbound buffer not drained for {timeout:?}"));
            conn.client.close();
            return;
        };
        match res {
            Ok(_) => ctx.completed(
                intended.unwrap_or(sent),
                Instant::now(),
                records.len() as u64,
                batch.bytes(),
                false,
            ),
            Err(e) => {
                let (kind, _) = error_kind(&e);
                ctx.error(&kind);
                conn.lost(&ctx, e.to_string());
                return;
            }
        }
        sent_count += 1;
        if sent_count % ORPHAN_ERRORS_POLL_EVERY == 0 {
            count_orphan_errors(&ctx, &conn);
        }
        // Nothing above waits while the outbound buffer has room: after `--pipeline` appends,
        // let the connection's writer send them (one socket write) and the ticker run.
        if sent_count % per_write == 0 {
            futures_lite::future::yield_now().await;
        }
    }
    drain(&ctx, &conn).await;
    count_orphan_errors(&ctx, &conn);
}

fn count_orphan_errors(ctx: &Ctx, conn: &Conn) {
    for (_, e) in conn.client.take_errors() {
        ctx.error(e.code.variant_name().unwrap_or("Unknown"));
    }
}

/// One durable append per shard this run's streams reach. Each shard
/// processes one connection's appends in order, so when the durable one is
/// acked, everything this connection sent to that shard before it is durable.
async fn drain(ctx: &Ctx, conn: &Conn) {
    if conn.dead.get() {
        return;
    }
    let shard_count = conn.client.shard_count();
    let mut by_shard: Vec<Option<u64>> = vec![None; usize::from(shard_count)];
    let scan = ctx.chooser.count().min(DRAIN_STREAM_SCAN_MAX);
    for s in ctx.chooser.base()..ctx.chooser.base() + scan {
        let shard = usize::from(proto::shard_for(s, shard_count));
        by_shard[shard].get_or_insert(s);
    }
    let mut batch = Batch::default();
    for stream in by_shard.into_iter().flatten() {
        batch.build(ctx, conn, stream, 1);
        let records = batch.records();
        match conn
            .client
            .append(stream, &records, proto::wire::AckLevel::Durable)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => ctx.error("bad_ack"),
            Err(e) => {
                let (kind, fatal) = error_kind(&e);
                ctx.error(&kind);
                if fatal {
                    conn.lost(ctx, e.to_string());
                }
                return;
            }
        }
    }
    let now = Instant::now();
    if ctx.drain_done.get().is_none_or(|d| d < now) {
        ctx.drain_done.set(Some(now));
    }
}

async fn run_connection(ctx: Rc<Ctx>, conn: Rc<Conn>, start: Instant) {
    if ctx.args.ack == Ack::None {
        unacked_sender(ctx.clone(), conn.clone(), start).await;
    } else {
        let workers: Vec<_> = (0..ctx.args.pipeline)
            .map(|_| glommio::spawn_local(acked_worker(ctx.clone(), conn.clone(), start)))
            .collect();
        for w in workers {
            w.await;
        }
    }
    conn.client.close();
}

async fn ticker(ctx: Rc<Ctx>) {
    while !ctx.finished.get() {
        glommio::timer::sleep(TICK_INTERVAL).await;
        let tally = ctx.interval.borrow_mut().take();
        if ctx.tx.send(Msg::Tick(Box::new(tally))).is_err() {
            return;
        }
    }
}

/// Gives up on the daemon when requests are outstanding and nothing has come
/// back for `--response-timeout`: a hung daemon must not hang the generator.
async fn watchdog(ctx: Rc<Ctx>, conns: Vec<Rc<Conn>>) {
    let timeout = ctx.args.response_timeout;
    let check_every = (timeout / 4).min(TICK_INTERVAL);
    while !ctx.finished.get() {
        glommio::timer::sleep(check_every).await;
        let outstanding: usize = conns
            .iter()
            .filter(|c| !c.dead.get())
            .map(|c| c.client.in_flight())
            .sum();
        if outstanding == 0 {
            // Idle (open loop between slots, or done): the timeout runs from the next request.
            ctx.last_progress.set(Instant::now());
            continue;
        }
        if ctx.last_progress.get().elapsed() >= timeout {
            ctx.shared.stop(format!(
                "{outstanding} requests outstanding and no response for {timeout:?}; gave up on the daemon"
            ));
            for c in &conns {
                c.client.close();
            }
            return;
        }
    }
}

/// Connects and exchanges `Hello`, or gives up after `timeout`.
async fn connect(
    addr: std::net::SocketAddr,
    timeout: Duration,
    writer: u32,
) -> (u32, std::net::SocketAddr, Result<AsyncClient, String>) {
    let attempt = async { AsyncClient::connect(addr).await.map_err(|e| e.to_string()) };
    let give_up = async {
        glommio::timer::sleep(timeout).await;
        Err(format!("no answer to Hello within {timeout:?}"))
    };
    (writer, addr, futures_lite::future::or(attempt, give_up).await)
}

struct ThreadPlan {
    /// (writer index, address) of each connection this thread owns.
    connections: Vec<(u32, std::net::SocketAddr)>,
    seed: u64,
}

async fn thread_main(ctx: Rc<Ctx>, plan: ThreadPlan) -> ThreadResult {
    // Connect everything before the clock starts.
    let connecting: Vec<_> = plan
        .connections
        .iter()
        .map(|&(writer, addr)| glommio::spawn_local(connect(addr, ctx.args.connect_timeout, writer)))
        .collect();
    let mut conns = Vec::new();
    let mut server = None;
    for task in connecting {
        let (writer, addr, res) = task.await;
        match res {
            Ok(client) => {
                server.get_or_insert_with(|| {
                    let hello = client.server_hello();
                    (hello.server.clone().unwrap_or_default(), hello.shard_count)
                });
                conns.push(Rc::new(Conn {
                    writer,
                    client,
                    rng: RefCell::new(Rng::new(plan.seed ^ proto::placement::mix64(u64::from(writer)))),
                    seqs: RefCell::new(HashMap::new()),
                    schedule: None,
                    dead: Cell::new(false),
                }));
            }
            Err(e) => {
                ctx.error("connect");
                ctx.connections_lost.set(ctx.connections_lost.get() + 1);
                *ctx.last_error.borrow_mut() = Some(format!("cannot connect to {addr}: {e}"));
            }
        }
    }

    // Every executor waits here; one of them then fixes the clock for all.
    if ctx.shared.barrier.wait().is_leader() {
        let start = Instant::now();
        let measure_start = start + ctx.args.warmup;
        let deadline = ctx.args.requests.is_none().then(|| measure_start + ctx.args.duration);
        let _ = ctx.shared.timing.set(Timing {
            measure_start,
            deadline,
        });
    }
    ctx.shared.barrier.wait();
    let timing = ctx.shared.timing();
    ctx.timing.set(Some(timing));
    let start = timing.measure_start - ctx.args.warmup;

    if let Some(rate) = ctx.args.rate {
        let per_conn = rate / ctx.args.connections as f64;
        for conn in &mut conns {
            let conn = Rc::get_mut(conn).expect("no clones before the workers start");
            // Stagger connections so the total is spread evenly over each interval.
            let phase = Duration::from_secs_f64(f64::from(conn.writer) / rate);
            conn.schedule = Some(Schedule::new(per_conn, phase));
        }
    }

    ctx.last_progress.set(Instant::now());
    glommio::spawn_local(ticker(ctx.clone())).detach();
    glommio::spawn_local(watchdog(ctx.clone(), conns.clone())).detach();
    let tasks: Vec<_> = conns
        .iter()
        .map(|c| glommio::spawn_local(run_connection(ctx.clone(), c.clone(), start)))
        .collect();
    for t in tasks {
        t.await;
    }
    ctx.finished.set(true);
    let tail = ctx.interval.borrow_mut().take();
    let _ = ctx.tx.send(Msg::Tick(Box::new(tail)));
    let _ = ctx.tx.send(Msg::Done);
    ThreadResult {
        tally: ctx.tally.borrow_mut().take(),
        last_done: ctx.last_done.get(),
        drain_done: ctx.drain_done.get(),
        connections_lost: ctx.connections_lost.get(),
        last_error: ctx.last_error.borrow().clone(),
        server,
    }
}

/// The result of a run: the report and the merged latency histogram.
pub struct RunOutcome {
    pub report: Report,
    pub latency: hdrhistogram::Histogram<u64>,
}

/// Live output: an indicatif bar on a terminal, plain lines otherwise.
struct Live {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    started: Instant,
}

impl Live {
    fn new(args: &RunArgs) -> Live {
        let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
            let (len, unit) = match args.requests {
                Some(n) => (n, "req"),
                None => ((args.warmup + args.duration).as_secs().max(1), "s"),
            };
            let bar = indicatif::ProgressBar::new(len);
            let template = format!("{{elapsed:>4}} [{{bar:24}}] {{pos}}/{{len}}{unit} {{msg}}");
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Live {
            bar,
            quiet: args.quiet,
            started: Instant::now(),
        }
    }

    fn line(&self, iv: &Tally, secs: f64, requests_done: u64, by_requests: bool) {
        if self.quiet {
            return;
        }
        let lat = LatencySummary::of(&iv.latency)
            .map(|l| format!("p50 {:>7} p99 {:>7}", fmt_us(l.p50), fmt_us(l.p99)))
            .unwrap_or_else(|| "p50       - p99       -".into());
        let msg = format!(
            "{:>9.0} rec/s {:>8.1} MB/s {lat} errors {}",
            iv.records as f64 / secs,
            iv.bytes as f64 / secs / 1e6,
            iv.errors_total()
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(if by_requests {
                    requests_done
                } else {
                    self.started.elapsed().as_secs()
                });
                bar.set_message(msg);
            }
            None => eprintln!("[{:>5.1}s] {msg}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn seed_from_clock() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    proto::placement::mix64(nanos ^ u64::from(std::process::id()))
}

/// Runs the load described by `args` and returns the report.
pub fn run(args: RunArgs) -> anyhow::Result<RunOutcome> {
    args.validate().map_err(anyhow::Error::msg)?;
    let seed = args.seed.unwrap_or_else(seed_from_clock);
    let run_id = proto::placement::mix64(seed) as u32;
    let chooser = Arc::new(match args.stream_dist {
        StreamDist::Uniform => StreamChooser::uniform(args.stream_base, args.streams),
        StreamDist::Zipf => StreamChooser::zipf(args.stream_base, args.streams, args.zipf_exponent),
    });
    let args = Arc::new(args);
    let shared = Arc::new(Shared {
        timing: OnceLock::new(),
        barrier: Barrier::new(args.threads),
        requests_left: args.requests.map(AtomicU64::new),
        stop: AtomicBool::new(false),
        stop_reason: Mutex::new(None),
    });
    if !args.quiet {
        eprintln!(
            "shardlog-bench: seed {seed}, run id {run_id:08x}, {} connections on {} threads",
            args.connections, args.threads
        );
    }

    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for thread in 0..args.threads {
        let plan = ThreadPlan {
            connections: (0..args.connections)
                .filter(|c| c % args.threads == thread)
                .map(|c| (c as u32, args.addrs[c % args.addrs.len()]))
                .collect(),
            seed: seed.wrapping_add(thread as u64),
        };
        let log = match &args.verify_log {
            Some(path) => Some(RefCell::new(VerifyLogWriter::open(path)?)),
            None => None,
        };
        let (args, shared, chooser, tx) = (args.clone(), shared.clone(), chooser.clone(), tx.clone());
        let mut builder = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-{thread}"))
            .io_memory(IO_MEMORY_BYTES);
        if args.spin_before_park_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(args.spin_before_park_us));
        }
        let handle = builder
            .spawn(move || async move {
                let ctx = Rc::new(Ctx {
                    args,
                    shared,
                    chooser,
                    run_id,
                    timing: Cell::new(None),
                    tally: RefCell::new(Tally::default()),
                    interval: RefCell::new(Tally::default()),
                    last_done: Cell::new(None),
                    last_progress: Cell::new(Instant::now()),
                    drain_done: Cell::new(None),
                    connections_lost: Cell::new(0),
                    last_error: RefCell::new(None),
                    log,
                    finished: Cell::new(false),
                    tx,
                });
                thread_main(ctx, plan).await
            })
            .map_err(|e| anyhow::anyhow!("cannot start executor {thread}: {e}"))?;
        handles.push(handle);
    }
    drop(tx);

    let live = Live::new(&args);
    let mut interval = Tally::default();
    let mut requests_done = 0u64;
    let mut done = 0;
    let mut last_print = Instant::now();
    while done < args.threads {
        let wait = (last_print + PRINT_INTERVAL).saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Tick(t)) => {
                requests_done += t.requests;
                interval.merge(&t);
            }
            Ok(Msg::Done) => done += 1,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let since = last_print.elapsed();
        if since >= PRINT_INTERVAL {
            live.line(&interval, since.as_secs_f64(), requests_done, args.requests.is_some());
            interval = Tally::default();
            last_print = Instant::now();
        }
    }
    live.finish();

    let mut results = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        results.push(h.join().map_err(|e| anyhow::anyhow!("executor {i} failed: {e}"))?);
    }
    let timing = shared.timing();
    let mut total = Tally::default();
    let mut last_done = None::<Instant>;
    let mut drain_done = None::<Instant>;
    let mut lost = 0;
    let mut last_error = None;
    let mut server = None;
    for r in &results {
        total.merge(&r.tally);
        last_done = last_done.max(r.last_done);
        drain_done = drain_done.max(r.drain_done);
        lost += r.connections_lost;
        if r.last_error.is_some() {
            last_error.clone_from(&r.last_error);
        }
        if server.is_none() {
            server.clone_from(&r.server);
        }
    }
    if server.is_none() {
        anyhow::bail!(
            "no connection could be opened: {}",
            last_error.unwrap_or_else(|| "unknown error".into())
        );
    }
    let elapsed = last_done
        .map(|d| d.saturating_duration_since(timing.measure_start))
        .unwrap_or_default();
    let secs = elapsed.as_secs_f64();
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };

    let drain = match (args.ack, drain_done) {
        (Ack::None, Some(d)) if lost == 0 => {
            let drain_secs = d.saturating_duration_since(timing.measure_start).as_secs_f64();
            // Appends the daemon refused (an error answer, such as Busy when its queue is full)
            // were not written: count only the accepted share of what was sent.
            let refused = total.errors_total().min(total.requests);
            let accepted = |n: u64| {
                if total.requests == 0 {
                    0.0
                } else {
                    n as f64 * (total.requests - refused) as f64 / total.requests as f64
                }
            };
            Some(DrainReport {
                elapsed_s: drain_secs,
                records_per_s: accepted(total.records) / drain_secs,
                mb_per_s: accepted(total.bytes) / drain_secs / 1e6,
                drain_s: (drain_secs - secs).max(0.0),
            })
        }
        _ => None,
    };
    let mut stopped_early = shared.stop_reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if lost as usize >= args.connections {
        stopped_early.get_or_insert(format!(
            "all {} connections were lost after {secs:.1} s; last error: {}",
            args.connections,
            last_error.as_deref().unwrap_or("unknown")
        ));
    }
    let (server_name, shard_count) = server.map(|(n, c)| (Some(n), Some(c))).unwrap_or((None, None));
    let report = Report {
        version: REPORT_VERSION,
        label: args.label.clone(),
        config: ReportConfig::of(&args, seed),
        server: server_name,
        shard_count,
        elapsed_s: secs,
        requests: total.requests,
        records: total.records,
        bytes: total.bytes,
        requests_per_s: per_s(total.requests),
        records_per_s: per_s(total.records),
        mb_per_s: per_s(total.bytes) / 1e6,
        latency_us: if args.ack == Ack::None {
            None
        } else {
            LatencySummary::of(&total.latency)
        },
        drain,
        errors_total: total.errors_total(),
        errors: total.errors.clone(),
        connections_lost: lost,
        stopped_early,
    };
    Ok(RunOutcome {
        report,
        latency: total.latency,
    })
}
