//! Process lifecycle: startup checks, executors and their rings, signals, shutdown.
//!
//! Startup: check io_uring, the data directory (O_DIRECT, LOCK, META) and RLIMIT_MEMLOCK; bind
//! the listening sockets (the main address, and each shard's own port); start every executor.
//! Every executor runs a front (front executors on the main address, shard executors on their
//! shard's port), with a ring pair to every shard on another executor. Each shard executor opens
//! (recovers) its shard and reports to the main thread, which prints the listening line only once
//! all shards are open. Fronts connect their rings first, so no request reaches a shard that is not open.
//!
//! Shutdown (first SIGTERM/SIGINT): fronts stop accepting and stop reading requests, answer
//! everything already received, then close their request rings. A shard's ring receivers end
//! once every front has closed; the shard then commits what is queued, fdatasyncs, closes its
//! completion rings and closes. A second signal exits at once.

use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::checks;
use crate::config::{ServeArgs, ShardPorts};
use crate::faults::{self, FaultSpec};
use crate::front::{Front, FrontConfig, FrontCounters, FrontShared, ResponseMemory, ShardLink};
use crate::metrics::MetricsServer;
use crate::plan::{self, Plan};
use crate::ring::{self, FromShard, Latch, RingReceiver, RingSender, ToShard};
use crate::shard_server::{ReplyTo, ShardServer};

/// A failure that stops the daemon, with the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Startup(#[from] checks::StartupError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Faults(#[from] faults::FaultParseError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for shard {shard}'s shard-aware connections: {source}; choose other ports with --shard-ports BASE, or turn them off with --shard-ports off")]
    ShardListen {
        shard: u16,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("shard {shard} ({dir}) failed to open: {reason}")]
    ShardOpen { shard: u16, dir: PathBuf, reason: String },
    #[error("executor {name} failed: {reason}")]
    Executor { name: String, reason: String },
    #[error("{0}")]
    Other(String),
}

/// What a shard executor tells the main thread once its shard is open.
enum Ready {
    Opened { shard: u16 },
    Failed { shard: u16, reason: String },
}

/// Everything one executor needs, moved into its thread.
struct Bundle {
    name: String,
    front: Option<FrontPart>,
    shard: Option<ShardPart>,
    shutdown: Arc<Latch>,
}

struct FrontPart {
    index: usize,
    /// The main address's socket (front executors) and/or the shard's own (shard executors).
    listener_fds: Vec<RawFd>,
    shard_count: u16,
    cfg: FrontConfig,
    shared: Arc<FrontShared>,
    /// Per shard: the request ring's sending end, or `None` if the shard is on this executor.
    to_shards: Vec<Option<RingSender<ToShard>>>,
    /// Completion rings from every shard on another executor.
    from_shards: Vec<RingReceiver<FromShard>>,
}

struct ShardPart {
    id: u16,
    shard_count: u16,
    dir: PathBuf,
    opts: shards::ShardOptions,
    faults: Vec<FaultSpec>,
    read_memory_bytes: usize,
    /// One (requests in, completions out) pair per front on another executor (including the
    /// fronts of other shard executors, which forward what they do not own).
    rings: Vec<(RingReceiver<ToShard>, RingSender<FromShard>)>,
    ready: mpsc::Sender<Ready>,
}

/// Runs the daemon until shutdown. Returns once every executor has finished.
pub fn serve(args: ServeArgs) -> Result<(), ServeError> {
    checks::check_io_uring()?;
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| checks::StartupError::Io {
        path: data_dir.clone(),
        what: "cannot create the data directory",
        source,
    })?;
    // Absolute from here on: shards open files relative to their directory from other threads.
    let data_dir = std::fs::canonicalize(&data_dir).map_err(|source| checks::StartupError::Io {
        path: data_dir.clone(),
        what: "cannot resolve the data directory",
        source,
    })?;
    checks::check_direct_io(&data_dir)?;
    let _lock = checks::lock_data_dir(&data_dir)?;

    let cpus = match &args.cpus {
        Some(spec) => plan::parse_cpu_list(spec)?,
        None => plan::usable_cpus(),
    };
    let default_plan = plan::plan(&cpus, args.front_cpu, args.front_cores, args.shards, args.pin)?;
    let shard_count = checks::settle_shard_count(&data_dir, args.shards, default_plan.shard_count)?;
    let plan = plan::plan(&cpus, args.front_cpu, args.front_cores, Some(shard_count), args.pin)?;
    if plan::oversubscribed(&plan) {
        tracing::warn!(
            shards = shard_count,
            cpus = ?cpus,
            "more pinned executors than CPUs: some share a CPU; consider --pin none or fewer --shards"
        );
    }
    let (io_memory, cut) = checks::io_memory_for(
        checks::memlock_limit(),
        plan.executors.len(),
        shards::IO_MEMORY_BYTES_DEFAULT,
    )?;
    if cut {
        tracing::info!(
            io_memory,
            limit = ?checks::memlock_limit(),
            "RLIMIT_MEMLOCK is low: each executor gets a smaller io_memory; raise it with `ulimit -l` \
             or LimitMEMLOCK= for the default"
        );
    }
    let fault_specs = match std::env::var(faults::FAULTS_ENV) {
        Ok(spec) => faults::parse_faults(&spec)?,
        Err(_) => Vec::new(),
    };
    if !fault_specs.is_empty() {
        tracing::warn!(faults = ?fault_specs, "fault injection is on ({})", faults::FAULTS_ENV);
    }

    let (fds, bound) = bind_listeners(args.listen, plan.front_count)?;
    let (shard_fds, shard_ports) = bind_shard_listeners(args.listen.port(), bound, args.shard_ports, shard_count)?;
    tracing::info!(
        listen = %bound,
        shard_ports = ?shard_ports,
        data_dir = %data_dir.display(),
        shards = shard_count,
        fronts = plan.front_count,
        executors = ?plan.executors,
        durability = ?args.durability,
        io_memory,
        max_frame_bytes = args.max_frame_bytes,
        max_connections = args.max_connections,
        conn_budget_bytes = args.conn_budget_bytes,
        "starting"
    );

    let shutdown = Arc::new(Latch::default());
    install_signal_handler(shutdown.clone())?;

    let fronts = front_executors(&plan, !shard_fds.is_empty()).len();
    let shared = Arc::new(FrontShared {
        counters: (0..fronts).map(|_| FrontCounters::default()).collect(),
        connections: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
        shards_open: Latch::default(),
        shard_ports,
        response_memory: ResponseMemory::new(args.response_memory_bytes),
        // Room for at least one maximal frame.
        frame_memory: shards::ReadPool::new(
            args.frame_memory_bytes
                .max(args.max_frame_bytes + proto::frame::FRAME_HEADER_BYTES),
        ),
    });
    let (ready_tx, ready_rx) = mpsc::channel();
    let listeners = Listeners {
        main: fds,
        shards: shard_fds,
    };
    let bundles = make_bundles(
        &plan,
        &args,
        &data_dir,
        listeners,
        shared.clone(),
        &fault_specs,
        ready_tx,
    );

    let mut handles = Vec::new();
    for (bundle, exec) in bundles.into_iter().zip(&plan.executors) {
        let opts = shards::executor::ExecutorOptions::new(exec.name.clone())
            .cpu(exec.cpu)
            .io_memory(io_memory)
            .spin_before_park((args.spin_us > 0).then(|| Duration::from_micros(args.spin_us)));
        let name = exec.name.clone();
        let handle =
            shards::executor::spawn(opts, move || executor_main(bundle)).map_err(|e| ServeError::Executor {
                name: name.clone(),
                reason: e.to_string(),
            })?;
        handles.push((name, handle));
    }

    for _ in 0..shard_count {
        match ready_rx.recv() {
            Ok(Ready::Opened { shard }) => tracing::debug!(shard, "shard ready"),
            Ok(Ready::Failed { shard, reason }) => {
                return Err(ServeError::ShardOpen {
                    shard,
                    dir: checks::shard_dir(&data_dir, shard),
                    reason,
                })
            }
            Err(_) => {
                // An executor died before reporting: its join error says why.
                for (name, handle) in handles {
                    if let Err(e) = handle.join() {
                        return Err(ServeError::Executor {
                            name,
                            reason: e.to_string(),
                        });
                    }
                }
                return Err(ServeError::Other("an executor exited during startup".into()));
            }
        }
    }
    shared.shards_open.set();
    let metrics = match args.metrics_listen {
        Some(listen) => {
            let m = MetricsServer::start(listen, bound).map_err(|e| ServeError::Other(e.to_string()))?;
            tracing::info!(metrics = %m.local_addr(), "serving Prometheus metrics at /metrics");
            Some(m)
        }
        None => None,
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "shardlogd listening on {bound}");
        if let Some(m) = &metrics {
            let _ = writeln!(out, "shardlogd metrics on http://{}/metrics", m.local_addr());
        }
        let _ = out.flush();
    }
    // systemd (Type=notify): ready once every shard is open and the fronts accept. A no-op
    // without NOTIFY_SOCKET.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that shardlogd is ready");
    }

    let mut failure = None;
    for (name, handle) in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::error!(executor = %name, %reason, "executor failed");
                failure.get_or_insert(ServeError::Executor { name, reason });
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(executor = %name, %reason, "executor failed");
                failure.get_or_insert(ServeError::Executor { name, reason });
            }
        }
    }
    if let Some(m) = metrics {
        m.stop();
    }
    match failure {
        None => {
            tracing::info!("shut down cleanly");
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// Listening sockets: one per main-address front, and one per shard (none when shard ports are
/// off).
struct Listeners {
    main: Vec<RawFd>,
    shards: Vec<RawFd>,
}

/// Capacity of a ring from a shard executor's front to another shard: it carries only requests
/// that came to the wrong shard's port (forwarded) and stats, so it is kept small, which bounds
/// the memory of the shards x shards rings.
const FORWARD_RING_CAPACITY_MAX: usize = 64;

/// Executors that run a front, in front-index order: those accepting on the main address, and
/// with shard ports, every shard executor.
fn front_executors(plan: &Plan, shard_ports: bool) -> Vec<usize> {
    (0..plan.executors.len())
        .filter(|&e| plan.executors[e].front.is_some() || (shard_ports && plan.executors[e].shard.is_some()))
        .collect()
}

fn make_bundles(
    plan: &Plan,
    args: &ServeArgs,
    data_dir: &std::path::Path,
    listeners: Listeners,
    shared: Arc<FrontShared>,
    faults: &[FaultSpec],
    ready: mpsc::Sender<Ready>,
) -> Vec<Bundle> {
    let shutdown = shared.shutdown.clone();
    let cfg = FrontConfig {
        max_frame_bytes: args.max_frame_bytes,
        max_connections: args.max_connections,
        conn_budget_bytes: args.conn_budget_bytes,
        max_wait_ms: args.max_wait_ms,
    };
    let fronts = front_executors(plan, !listeners.shards.is_empty());
    let mut bundles: Vec<Bundle> = plan
        .executors
        .iter()
        .enumerate()
        .map(|(e, exec)| {
            let mut listener_fds: Vec<RawFd> = exec.front.map(|f| listeners.main[f]).into_iter().collect();
            if let (Some(s), false) = (exec.shard, listeners.shards.is_empty()) {
                listener_fds.push(listeners.shards[s as usize]);
            }
            Bundle {
                name: exec.name.clone(),
                front: fronts.iter().position(|&fe| fe == e).map(|index| FrontPart {
                    index,
                    listener_fds,
                    shard_count: plan.shard_count,
                    cfg,
                    shared: shared.clone(),
                    to_shards: Vec::new(),
                    from_shards: Vec::new(),
                }),
                shard: exec.shard.map(|id| ShardPart {
                    id,
                    shard_count: plan.shard_count,
                    dir: checks::shard_dir(data_dir, id),
                    opts: args.shard_options(id),
                    faults: faults.iter().copied().filter(|f| f.shard == id).collect(),
                    read_memory_bytes: args.read_memory_bytes,
                    rings: Vec::new(),
                    ready: ready.clone(),
                }),
                shutdown: shutdown.clone(),
            }
        })
        .collect();
    for &fe in &fronts {
        // A main-address front routes every client's traffic; a shard's own front forwards only
        // what was sent to the wrong port.
        let capacity = if plan.executors[fe].front.is_some() {
            args.ring_capacity
        } else {
            args.ring_capacity.min(FORWARD_RING_CAPACITY_MAX)
        };
        for s in 0..plan.shard_count {
            let se = plan.shard_executor(s);
            if fe == se {
                bundles[fe].front.as_mut().expect("front").to_shards.push(None);
                continue;
            }
            let (req_tx, req_rx) = ring::channel(capacity);
            let (rep_tx, rep_rx) = ring::channel(capacity);
            let front = bundles[fe].front.as_mut().expect("front");
            front.to_shards.push(Some(req_tx));
            front.from_shards.push(rep_rx);
            bundles[se].shard.as_mut().expect("shard").rings.push((req_rx, rep_tx));
        }
    }
    bundles
}

async fn open_shard(part: &ShardPart) -> Result<shards::Shard, shards::ShardError> {
    if part.faults.is_empty() {
        return shards::Shard::open(&part.dir, part.opts.clone()).await;
    }
    let storage = shards::storage::dma::DmaStorage::open(&part.dir, part.opts.durability)
        .await
        .map_err(|e| shards::ShardError::Io {
            op: "open shard directory",
            path: part.dir.clone(),
            source: e,
        })?;
    let storage = faults::FaultyStorage::new(Rc::new(storage), part.faults.clone());
    shards::Shard::open_with_storage(Rc::new(storage), part.opts.clone()).await
}

/// The body of one executor: its shard (if any), its front (if any), and their rings.
async fn executor_main(bundle: Bundle) -> Result<(), String> {
    let Bundle {
        name,
        front,
        shard,
        shutdown,
    } = bundle;
    // 1. Open the shard. Fronts accept connections only once the main thread has heard from
    //    every shard (`FrontShared::shards_open`), so no request arrives before recovery is done.
    let mut shard_rings = Vec::new();
    let server = match shard {
        None => None,
        Some(part) => {
            let opened = open_shard(&part).await;
            let shard = match opened {
                Ok(s) => s,
                Err(e) => {
                    let _ = part.ready.send(Ready::Failed {
                        shard: part.id,
                        reason: e.to_string(),
                    });
                    return Err(e.to_string());
                }
            };
            let st = shard.stats();
            tracing::info!(
                shard = part.id,
                dir = %part.dir.display(),
                next_lsn = shard.next_lsn().0,
                durable_lsn = st.durable_lsn.0,
                first_lsn = shard.first_available_lsn().0,
                segments = st.segment_count,
                segment_bytes = st.segment_bytes,
                "shard recovered"
            );
            let _ = part.ready.send(Ready::Opened { shard: part.id });
            shard_rings = part.rings;
            Some(ShardServer::new(
                part.id,
                part.shard_count,
                shard,
                part.read_memory_bytes,
            ))
        }
    };

    // 2. The shard side: one receiver task per front ring, and the task that answers appends.
    let mut receivers = Vec::new();
    for (rx, tx) in shard_rings {
        let server = server.clone().expect("rings only on shard executors");
        let front = server.add_front(ReplyTo::Ring(Rc::new(tx)));
        receivers.push(glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                if matches!(msg, ToShard::Append { .. }) {
                    server.wait_for_queue_room().await;
                }
                server.handle(msg, front);
            }
        }));
    }
    let acker = server.clone().map(|server| glommio::spawn_local(server.acker()));
    if let Some(server) = &server {
        let server = server.clone();
        let shutdown = shutdown.clone();
        glommio::spawn_local(async move {
            shutdown.wait().await;
            server.begin_stop();
        })
        .detach();
    }

    // 3. The front: run until shutdown has drained every connection.
    let mut front_completions = Vec::new();
    if let Some(part) = front {
        let links = part
            .to_shards
            .into_iter()
            .enumerate()
            .map(|(shard, end)| match end {
                Some(tx) => ShardLink::Ring(Rc::new(tx)),
                None => ShardLink::Local(
                    server
                        .clone()
                        .filter(|s| s.id as usize == shard)
                        .expect("a local shard runs on this executor"),
                ),
            })
            .collect();
        let shared = part.shared.clone();
        let front = Front::new(part.index, part.shard_count, part.cfg, part.shared, links);
        let mut completions = Vec::new();
        for rx in part.from_shards {
            let front = front.clone();
            completions.push(glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    front.deliver(msg);
                }
            }));
        }
        shared.shards_open.wait().await;
        tracing::debug!(executor = %name, "shards open; accepting");
        front.clone().run(part.listener_fds).await;
        front_completions = completions;
    }

    // 4. The shard: once every front has closed its ring (so every request was answered),
    //    stop the acker, close the completion rings, then commit, sync and close. The front's
    //    completion tasks keep running meanwhile: other executors' fronts may still be draining
    //    through this shard, and this one's through theirs.
    for r in receivers {
        r.await;
    }
    if let Some(server) = server {
        server.stop_acker();
        if let Some(acker) = acker {
            acker.await;
        }
        // The front on this executor holds the server (its local link), so dropping the server
        // does not drop its ring senders: close them, so other executors' completion tasks end.
        server.close_replies();
        let id = server.id;
        let shard = server.shard().clone();
        drop(server);
        match shard.close().await {
            Ok(()) => tracing::info!(shard = id, "shard closed"),
            Err(e) => {
                tracing::error!(shard = id, error = %e, "shard close failed");
                return Err(format!("{name}: closing shard {id}: {e}"));
            }
        }
    }
    // 5. Every shard on another executor closes its completion ring once its own receivers have
    //    ended, which needed this front's request rings closed (step 3).
    for c in front_completions {
        c.await;
    }
    Ok(())
}

/// Binds `count` listening sockets to `addr` with SO_REUSEPORT, so each front executor accepts
/// on its own socket and the kernel spreads connections over them. With port 0 the first socket
/// picks the port and the others join it.
fn bind_listeners(addr: SocketAddr, count: usize) -> Result<(Vec<RawFd>, SocketAddr), ServeError> {
    assert!(count > 0);
    let mut fds = Vec::new();
    let mut bound = addr;
    for _ in 0..count {
        let fd = bind_one(bound).map_err(|source| ServeError::Listen { addr, source })?;
        if bound.port() == 0 {
            bound = local_addr(fd).map_err(|source| ServeError::Listen { addr, source })?;
        }
        fds.push(fd);
    }
    Ok((fds, bound))
}

/// Binds each shard's own listening socket on the main address's IP, as `ports` says (given the
/// port asked for the main address). Returns the sockets and the port each got, by shard id (both
/// empty when off).
fn bind_shard_listeners(
    listen_port: u16,
    main: SocketAddr,
    ports: ShardPorts,
    shard_count: u16,
) -> Result<(Vec<RawFd>, Vec<u16>), ServeError> {
    let mut fds = Vec::new();
    let mut bound = Vec::new();
    for shard in 0..shard_count {
        let Some(port) = ports.port(listen_port, shard) else {
            break;
        };
        let port = port.map_err(ServeError::Other)?;
        let addr = SocketAddr::new(main.ip(), port);
        let listen_err = |source| ServeError::ShardListen { shard, addr, source };
        // Not SO_REUSEPORT: one socket per shard port, and a port already taken is not shared
        // with whoever holds it.
        let fd = match bind_one_with(addr, false) {
            Ok(fd) => fd,
            // "next" ports are a convenience (clients learn the real ones from HelloOk): when one
            // is taken, for example by an outgoing connection when the main port lies in the
            // ephemeral range, take any free port instead. A base the operator chose must hold.
            Err(e) if ports == ShardPorts::Next && e.raw_os_error() == Some(libc::EADDRINUSE) => {
                tracing::warn!(shard, %addr, "shard port is taken; using a free port instead (see HelloOk)");
                bind_one_with(SocketAddr::new(main.ip(), 0), false).map_err(listen_err)?
            }
            Err(e) => return Err(listen_err(e)),
        };
        bound.push(local_addr(fd).map_err(listen_err)?.port());
        fds.push(fd);
    }
    Ok((fds, bound))
}

fn bind_one(addr: SocketAddr) -> std::io::Result<RawFd> {
    bind_one_with(addr, true)
}

fn bind_one_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<RawFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on a descriptor this function owns until it returns it.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fail = |fd| {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            Err(e)
        };
        let one: libc::c_int = 1;
        let opts: &[libc::c_int] = if reuse_port {
            &[libc::SO_REUSEADDR, libc::SO_REUSEPORT]
        } else {
            &[libc::SO_REUSEADDR]
        };
        for &opt in opts {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            if rc != 0 {
                return fail(fd);
            }
        }
        let (storage, len) = sockaddr(addr);
        if libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len) != 0 {
            return fail(fd);
        }
        if libc::listen(fd, 1024) != 0 {
            return fail(fd);
        }
        Ok(fd)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, large enough for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn local_addr(fd: RawFd) -> std::io::Result<SocketAddr> {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    // SAFETY: borrow the descriptor as a std listener just to ask its address, then give it back.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let addr = listener.local_addr();
    let _ = listener.into_raw_fd();
    addr
}

/// First SIGTERM/SIGINT: start a graceful shutdown. Second: exit at once.
fn install_signal_handler(shutdown: Arc<Latch>) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| ServeError::Other(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if !shutdown.set() {
                    tracing::info!(signal, "shutting down: finishing requests already received");
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                } else {
                    eprintln!("shardlogd: second signal {signal}: exiting at once");
                    // SAFETY: _exit ends the process without running anything else.
                    unsafe { libc::_exit(130) };
                }
            }
        })
        .map_err(|e| ServeError::Other(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}
