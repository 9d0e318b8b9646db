//! Every glommio executor of shardlog starts here.
//!
//! An executor that runs shards needs three things that glommio's builder leaves to the caller:
//! - a modest `io_memory` (glommio registers it on three rings against `RLIMIT_MEMLOCK`);
//! - a preemption timer that is set on purpose (see [`crate::BACKGROUND_PREEMPT_TIMER`]);
//! - a stall guard from its first instant, because glommio 0.9 can park an executor that still has
//!   runnable tasks at any moment, including before its main task was ever polled (see the
//!   `stall_guard` module, and problems 5, 7 and 11 of docs/RELIABILITY.md).
//!
//! [`spawn`] does all three, so no caller can forget one: it starts the thread itself, creates the
//! executor on it, starts the guard's helper (which knows the thread and can kick it before the
//! executor's first poll), then runs the caller's future.
//!
//! ```no_run
//! use shards::executor::{self, ExecutorOptions};
//!
//! let ex = executor::spawn(ExecutorOptions::new("shard-0").cpu(Some(0)), || async move {
//!     // ... the executor's work ...
//!     42
//! })
//! .unwrap();
//! assert_eq!(ex.join().unwrap(), 42);
//! ```
//!
//! [`stats`] reads the counters of every executor of the process that is still running.

use std::future::Future;
use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::stall_guard::{Shared, StallGuard};
use crate::IO_MEMORY_BYTES_DEFAULT;

pub use crate::stall_guard::{kick_signal, STALL_GUARD_IDLE_INTERVAL, STALL_GUARD_INTERVAL_DEFAULT};

/// Default preemption timer: glommio's own default. Shard executors shorten it only while their
/// background queue has work (`Latency::Matters(BACKGROUND_PREEMPT_TIMER)`), which keeps the
/// park-with-runnable-tasks bug rare; the guard bounds what it costs when it happens.
pub const PREEMPT_TIMER_DEFAULT: Duration = Duration::from_millis(100);
/// The shortest preemption timer [`spawn`] accepts. Below about this glommio 0.9 cannot run a
/// task at all: with a 1 us timer an executor parks at once and every wake re-arms a timer that
/// fires before the first queue runs (measured: 0 turns with the guard kicking it 300 times a
/// second), and at 5 us an executor on a loaded machine can find the timer due on every pass of
/// its loop. 10 us is the longest timer at which glommio still parks a new executor before its
/// first poll often enough for a test to catch a guard that misses it (2 of 100 executors under
/// load without the guard; none at 20 us and above), and `stall_guard`'s first-instant test runs
/// at it. Timers this short only serve such tests; production uses milliseconds.
pub const PREEMPT_TIMER_MIN: Duration = Duration::from_micros(10);

/// How to start an executor. Every default is a named constant.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The thread's name (the kernel keeps 15 bytes of it). Also names it in [`stats`].
    pub name: String,
    /// The CPU to pin the executor to. Default `None` (unbound).
    pub cpu: Option<usize>,
    /// glommio's registered I/O memory, counted three times against `RLIMIT_MEMLOCK`.
    /// Default [`IO_MEMORY_BYTES_DEFAULT`].
    pub io_memory: usize,
    /// glommio's preemption timer, at least [`PREEMPT_TIMER_MIN`]. Default [`PREEMPT_TIMER_DEFAULT`].
    pub preempt_timer: Duration,
    /// Spin this long polling for events before parking (glommio's `spin_before_park`).
    /// Default `None`.
    pub spin_before_park: Option<Duration>,
    /// The stall guard's tick while the executor is busy: the most a wrongly parked executor
    /// loses. Default [`STALL_GUARD_INTERVAL_DEFAULT`].
    pub guard_interval: Duration,
}

impl ExecutorOptions {
    /// The defaults, with the given name.
    pub fn new(name: impl Into<String>) -> ExecutorOptions {
        ExecutorOptions {
            name: name.into(),
            cpu: None,
            io_memory: IO_MEMORY_BYTES_DEFAULT,
            preempt_timer: PREEMPT_TIMER_DEFAULT,
            spin_before_park: None,
            guard_interval: STALL_GUARD_INTERVAL_DEFAULT,
        }
    }

    pub fn cpu(mut self, cpu: Option<usize>) -> ExecutorOptions {
        self.cpu = cpu;
        self
    }

    pub fn io_memory(mut self, bytes: usize) -> ExecutorOptions {
        self.io_memory = bytes;
        self
    }

    pub fn preempt_timer(mut self, timer: Duration) -> ExecutorOptions {
        self.preempt_timer = timer;
        self
    }

    pub fn spin_before_park(mut self, spin: Option<Duration>) -> ExecutorOptions {
        self.spin_before_park = spin;
        self
    }

    fn validate(&self) -> Result<(), ExecutorError> {
        let bad = |reason: String| {
            Err(ExecutorError::InvalidOptions {
                name: self.name.clone(),
                reason,
            })
        };
        if self.preempt_timer < PREEMPT_TIMER_MIN {
            return bad(format!(
                "preempt_timer {:?} is below {PREEMPT_TIMER_MIN:?}: glommio 0.9 would never run a task",
                self.preempt_timer
            ));
        }
        if self.guard_interval.is_zero() {
            return bad("guard_interval must not be zero".into());
        }
        Ok(())
    }

    fn builder(&self) -> glommio::LocalExecutorBuilder {
        let placement = match self.cpu {
            Some(cpu) => glommio::Placement::Fixed(cpu),
            None => glommio::Placement::Unbound,
        };
        let builder = glommio::LocalExecutorBuilder::new(placement)
            .name(&self.name)
            .io_memory(self.io_memory)
            .preempt_timer(self.preempt_timer);
        match self.spin_before_park {
            Some(spin) => builder.spin_before_park(spin),
            None => builder,
        }
    }
}

/// Why an executor could not start or did not finish. Each carries the executor's name; the
/// messages leave it to the caller, who usually says it already.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("invalid executor options: {reason}")]
    InvalidOptions { name: String, reason: String },
    #[error("cannot start the executor's thread: {source}")]
    Thread { name: String, source: io::Error },
    /// glommio could not create the executor (for example `MemLockLimit`: raise `ulimit -l`),
    /// or its stall guard could not start.
    #[error("cannot create the executor: {reason}")]
    Create { name: String, reason: String },
    #[error("the executor panicked: {message}")]
    Panicked { name: String, message: String },
}

/// A running executor; [`Executor::join`] waits for its future's output.
#[derive(Debug)]
#[must_use = "an executor that is not joined runs detached"]
pub struct Executor<T> {
    name: String,
    /// `None` only when the executor could not be created, which [`spawn`] reports itself.
    thread: thread::JoinHandle<Option<T>>,
}

impl<T> Executor<T> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the executor's future to finish and returns its output.
    pub fn join(self) -> Result<T, ExecutorError> {
        let output = self.thread.join().map_err(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a panic payload that is not a string)".into());
            ExecutorError::Panicked {
                name: self.name,
                message,
            }
        })?;
        Ok(output.expect("an executor that was created returns its future's output"))
    }
}

/// Starts an executor on a thread of its own and runs `fut_gen()`'s future on it, guarded from
/// its first instant (see the module docs). Returns once the executor exists, or with the reason
/// it could not be created.
pub fn spawn<G, F, T>(opts: ExecutorOptions, fut_gen: G) -> Result<Executor<T>, ExecutorError>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    opts.validate()?;
    let name = opts.name.clone();
    let (made_tx, made_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let thread = thread::Builder::new()
        .name(opts.name.clone())
        .spawn(move || {
            let ex = match opts.builder().make() {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = made_tx.send(Err(e.to_string()));
                    return None;
                }
            };
            // Dropped in reverse order, also when the future panics: the registry entry, then the
            // guard (which joins its helper), then the executor; so nobody reads this thread's
            // counters or signals it once it moves on.
            let (guard, seed) = match StallGuard::start(opts.guard_interval) {
                Ok(started) => started,
                Err(e) => {
                    let _ = made_tx.send(Err(e.to_string()));
                    return None;
                }
            };
            let _registered = Registered::new(&opts, guard.shared().clone());
            let _ = made_tx.send(Ok(()));
            Some(ex.run(async move {
                let anchor = seed.spawn();
                // Let the anchor take its first poll (and hand its waker to the helper) before
                // the caller's code runs.
                futures_lite::future::yield_now().await;
                let output = fut_gen().await;
                drop(anchor);
                output
            }))
        })
        .map_err(|source| ExecutorError::Thread {
            name: name.clone(),
            source,
        })?;
    let created = made_rx.recv().unwrap_or_else(|_| {
        // The thread ended without a word: it panicked while creating the executor.
        Err("the executor thread ended while creating the executor".into())
    });
    match created {
        Ok(()) => Ok(Executor { name, thread }),
        Err(reason) => {
            let _ = thread.join();
            Err(ExecutorError::Create { name, reason })
        }
    }
}

/// [`spawn`], then [`Executor::join`].
pub fn run<G, F, T>(opts: ExecutorOptions, fut_gen: G) -> Result<T, ExecutorError>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    spawn(opts, fut_gen)?.join()
}

/// Counters of one running executor, read by [`stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorStats {
    pub name: String,
    pub cpu: Option<usize>,
    /// Voluntary context switches of the executor's thread: each is a sleep in the kernel, almost
    /// all of them glommio parks (`voluntary_ctxt_switches` of `/proc/self/task/TID/status`).
    pub parks: u64,
    /// Stalls its guard saw and broke; see the `stall_guard` module for exactly what counts.
    pub stalls_broken: u64,
    /// CPU time of the executor's thread, user and system, in microseconds.
    pub cpu_us: u64,
}

/// One entry per executor that [`spawn`] started and that is still running.
#[derive(Debug)]
struct Entry {
    name: String,
    cpu: Option<usize>,
    guard: Arc<Shared>,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The executor's entry in [`REGISTRY`], removed when dropped, on the executor's thread before the
/// guard stops: a stats reader that holds the lock may use the thread's ids.
struct Registered {
    guard: Arc<Shared>,
}

impl Registered {
    fn new(opts: &ExecutorOptions, guard: Arc<Shared>) -> Registered {
        registry().push(Entry {
            name: opts.name.clone(),
            cpu: opts.cpu,
            guard: guard.clone(),
        });
        Registered { guard }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        registry().retain(|e| !Arc::ptr_eq(&e.guard, &self.guard));
    }
}

fn registry() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // The registry holds plain data; a panic while it was locked leaves it consistent.
    REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The counters of every executor of this process that [`spawn`] started and that is still
/// running, in the order they started. A counter the kernel does not give is 0.
pub fn stats() -> Vec<ExecutorStats> {
    let registry = registry();
    registry
        .iter()
        .map(|e| ExecutorStats {
            name: e.name.clone(),
            cpu: e.cpu,
            parks: voluntary_switches(e.guard.tid).unwrap_or(0),
            stalls_broken: e.guard.stalls_broken(),
            cpu_us: thread_cpu_us(e.guard.pthread).unwrap_or(0),
        })
        .collect()
}

/// CPU time of the whole process, user and system, in microseconds.
pub fn process_cpu_us() -> u64 {
    clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0)
}

fn voluntary_switches(tid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The caller holds the registry lock, so the thread is alive.
fn thread_cpu_us(thread: libc::pthread_t) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live thread of this process (see `Registered`).
    if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
        return None;
    }
    clock_us(clock)
}

fn clock_us(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    let us = u64::try_from(ts.tv_sec).ok()?.checked_mul(1_000_000)? + u64::try_from(ts.tv_nsec).ok()? / 1_000;
    Some(us)
}

/// The guard of the running executor named `name`, for tests.
#[cfg(test)]
pub(crate) fn guard_of(name: &str) -> Arc<Shared> {
    let registry = registry();
    let entry = registry
        .iter()
        .find(|e| e.name == name)
        .expect("a running executor of that name");
    entry.guard.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_list_running_executors_and_forget_finished_ones() {
        const WORK_CPU_US: u64 = 20_000;
        let (worked_tx, worked_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let ex = spawn(ExecutorOptions::new("stats-probe"), move || async move {
            // CPU time of its own (not wall time, which a loaded machine stretches), and a park.
            while clock_us(libc::CLOCK_THREAD_CPUTIME_ID).expect("thread clock") < WORK_CPU_US {
                std::hint::spin_loop();
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
            worked_tx.send(()).expect("test waits");
            let _ = go_rx.recv_timeout(Duration::from_secs(60));
        })
        .expect("spawn");
        // Look while it waits for the word to finish.
        worked_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the executor did its work");
        let mine: Vec<ExecutorStats> = stats().into_iter().filter(|s| s.name == "stats-probe").collect();
        assert_eq!(mine.len(), 1, "{mine:?}");
        assert_eq!(mine[0].cpu, None);
        assert!(mine[0].cpu_us >= WORK_CPU_US, "{mine:?}");
        assert!(mine[0].parks >= 1, "{mine:?}");
        assert!(process_cpu_us() >= mine[0].cpu_us);
        go_tx.send(()).expect("executor waits");
        ex.join().expect("executor ran");
        assert!(stats().iter().all(|s| s.name != "stats-probe"));
    }

    #[test]
    fn a_panic_on_the_executor_is_an_error_with_its_message() {
        let err = run(ExecutorOptions::new("panics"), || async { panic!("on purpose") }).unwrap_err();
        assert!(
            matches!(&err, ExecutorError::Panicked { message, .. } if message.contains("on purpose")),
            "{err}"
        );
    }

    #[test]
    fn a_preempt_timer_glommio_cannot_run_is_refused() {
        let opts = ExecutorOptions::new("too-short").preempt_timer(Duration::from_micros(1));
        let err = run(opts, || async {}).unwrap_err();
        assert!(matches!(err, ExecutorError::InvalidOptions { .. }), "{err}");
    }
}
