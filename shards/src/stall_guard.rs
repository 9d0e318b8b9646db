//! The guard against glommio 0.9 parking an executor that still has runnable tasks. Only
//! [`crate::executor::spawn`] starts one, so no executor of shardlog runs without it.
//!
//! # The bug
//!
//! glommio's run loop arms its preemption timer (`poll_io`), then runs task queues. If the timer
//! is already due when `run_task_queues` first checks it (the thread was descheduled for longer
//! than the timer in between, as on a loaded VM), it returns "nothing ran" without running
//! anything; the loop reads that as "nothing to run", parks in `io_uring_enter`, and the waker-less
//! timer completion it consumes on the way wakes nobody. The runnable tasks stay asleep until some
//! unrelated event arrives, or forever. It can happen at any instant of an executor's life,
//! including the first, before its main task was ever polled.
//!
//! # The guard
//!
//! A helper thread per executor, started on the executor's thread before the executor runs (so it
//! knows the thread), and an *anchor*: a task on the executor that never finishes and hands its
//! waker to the helper at its first poll. Every tick (`interval`, see below) the helper does one of:
//!
//! - **Routine wake**: if the anchor was polled since the helper last woke it, wake it again
//!   through its waker. A wake from another thread is queued on the executor and writes the
//!   executor's eventfd if it sleeps, so a parked executor comes out of `io_uring_enter`, arms a
//!   fresh timer and runs its queues. The anchor's polls also drive the back-off below.
//! - **Kick**: if a task is certainly runnable (see [`Shared::stalls_broken`]) and the thread is
//!   asleep in `io_uring_enter` waiting for completions (read from
//!   `/proc/self/task/TID/syscall`), send the thread [`kick_signal`]. Its handler does nothing;
//!   the signal makes `io_uring_enter` return `EINTR`, which glommio treats as an empty wait, so
//!   the loop goes round, arms a fresh timer and runs its queues, with no waker needed. That is
//!   what breaks a park at the first instant, before the anchor exists. The handler is installed
//!   with `SA_RESTART`, and a thread is only signalled while it is blocked in that one call.
//! - Otherwise (the anchor is overdue but the thread is running, or blocked elsewhere) nothing:
//!   the executor is busy, not parked.
//!
//! While the executor is busy the helper ticks every `interval`, so a wrongly parked executor loses
//! at most about that much. Each routine wake costs the executor a trip through its loop (tens of
//! microseconds on a VM), which adds up for an idle daemon, so the guard backs off: when the
//! anchor finds that hardly any other task ran since its last poll, it doubles the interval, up to
//! [`STALL_GUARD_IDLE_INTERVAL`]; the first poll that sees real work brings it back to `interval`.
//! Until the anchor's first poll the helper ticks every `interval`.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::task::{Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

/// Default tick of the guard on a busy executor: the most a wrongly parked executor can lose
/// while it has work.
pub const STALL_GUARD_INTERVAL_DEFAULT: Duration = Duration::from_millis(2);
/// The longest interval the guard backs off to while its executor is idle.
pub const STALL_GUARD_IDLE_INTERVAL: Duration = Duration::from_millis(50);
/// Tasks other than the anchor per millisecond below which an executor counts as idle. A daemon
/// executor has no periodic housekeeping (shutdown wakes it directly), so an idle one stays below
/// it; steady traffic does not.
const IDLE_TASKS_PER_MS: u64 = 1;

/// The real-time signal that kicks a parked executor thread: the first one glibc leaves to
/// applications plus an offset, so that it stays clear of signals libraries commonly take
/// (`SIGRTMIN` itself). Nothing else in shardlog uses real-time signals.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// Installs the no-op handler of [`kick_signal`] for the whole process, once.
fn install_kick_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: the action is empty, hence async-signal-safe. signal-hook-registry installs
        // it with SA_RESTART, so a signal that lands outside `io_uring_enter` (the thread moved
        // on between the check and the kill) restarts the interrupted call where the kernel can.
        unsafe { signal_hook_registry::register(kick_signal(), || {}) }
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    result
        .clone()
        .map_err(|e| io::Error::other(format!("cannot install the stall guard's signal handler: {e}")))
}

/// State shared by the executor thread, its anchor task, its helper thread and stats readers.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Kernel id of the executor's thread.
    pub(crate) tid: libc::pid_t,
    /// `pthread_self()` of the executor's thread, valid while the guard lives (stats readers
    /// hold the registry lock, and the guard leaves the registry before the thread ends).
    pub(crate) pthread: libc::pthread_t,
    stop: AtomicBool,
    /// The helper's current tick in microseconds, set by the anchor.
    interval_us: AtomicU64,
    /// Polls of the anchor so far; 0 until its first poll.
    anchor_polls: AtomicU64,
    /// Routine wakes the helper has sent.
    wakes: AtomicU64,
    /// Kick signals the helper has sent.
    kicks: AtomicU64,
    /// The helper saw a stall and kicked; the anchor's next poll counts it as broken.
    stall_pending: AtomicBool,
    /// **Stalls broken**: times the helper found the executor's thread asleep in `io_uring_enter`
    /// waiting for completions while a task was certainly runnable, kicked it, and the anchor was
    /// polled afterwards. "Certainly runnable" means one of:
    /// - the anchor has not had its first poll yet: from the first instant until then the
    ///   executor's main task (not yet polled, or yielding right after spawning the anchor) or
    ///   the anchor itself is runnable, so any park is wrong;
    /// - the anchor was woken by the helper at the previous tick, at least one interval earlier,
    ///   and has still not been polled, both before and after the thread was seen asleep.
    ///
    /// Several kicks of one stall count once. This is a lower bound of the wrong parks the guard
    /// ends: a wrong park while the anchor is not among the runnable tasks is ended by the next
    /// routine wake (its eventfd write) without being seen, as the guard cannot see into glommio's
    /// queues.
    stalls_broken: AtomicU64,
}

impl Shared {
    pub(crate) fn stalls_broken(&self) -> u64 {
        self.stalls_broken.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us.load(Ordering::Relaxed))
    }
}

/// The guard of the current thread's executor: started before the executor runs, stopped when
/// dropped (which joins the helper, so no signal is sent after the thread moves on).
#[derive(Debug)]
pub(crate) struct StallGuard {
    shared: Arc<Shared>,
    helper: Option<thread::JoinHandle<()>>,
}

impl StallGuard {
    /// Starts guarding the executor this thread is about to run. Spawn the anchor with the
    /// returned seed, first thing in the executor's main task.
    pub(crate) fn start(interval: Duration) -> io::Result<(StallGuard, AnchorSeed)> {
        install_kick_handler()?;
        let busy_us = duration_us(interval);
        let shared = Arc::new(Shared {
            // SAFETY: neither call has preconditions.
            tid: unsafe { libc::gettid() },
            pthread: unsafe { libc::pthread_self() },
            stop: AtomicBool::new(false),
            interval_us: AtomicU64::new(busy_us),
            anchor_polls: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
            stall_pending: AtomicBool::new(false),
            stalls_broken: AtomicU64::new(0),
        });
        let (waker_tx, waker_rx) = mpsc::sync_channel(1);
        let helper_shared = shared.clone();
        let helper = thread::Builder::new()
            .name("shardlog-stall-guard".into())
            .spawn(move || helper(&helper_shared, busy_us, &waker_rx))?;
        let seed = AnchorSeed {
            shared: shared.clone(),
            busy_us,
            waker_tx,
        };
        Ok((
            StallGuard {
                shared,
                helper: Some(helper),
            },
            seed,
        ))
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// What the anchor task needs; [`AnchorSeed::spawn`] starts it.
#[derive(Debug)]
pub(crate) struct AnchorSeed {
    shared: Arc<Shared>,
    busy_us: u64,
    waker_tx: mpsc::SyncSender<Waker>,
}

impl AnchorSeed {
    /// Spawns the anchor task on the current executor; it lives until the handle is dropped.
    ///
    /// # Panics
    ///
    /// Outside a glommio executor.
    pub(crate) fn spawn(self) -> Anchor {
        let AnchorSeed {
            shared,
            busy_us,
            waker_tx,
        } = self;
        let mut waker_tx = Some(waker_tx);
        let idle_us = duration_us(STALL_GUARD_IDLE_INTERVAL).max(busy_us);
        let mut last = (Instant::now(), tasks_executed());
        // Pending forever, polled only to hand its waker over and when woken.
        let task = glommio::spawn_local(poll_fn(move |cx| {
            if let Some(tx) = waker_tx.take() {
                let _ = tx.send(cx.waker().clone());
            }
            if shared.stall_pending.swap(false, Ordering::AcqRel) {
                shared.stalls_broken.fetch_add(1, Ordering::Relaxed);
            }
            // After the waker is sent: a helper that sees a poll finds the waker too.
            shared.anchor_polls.fetch_add(1, Ordering::Release);
            let now = (Instant::now(), tasks_executed());
            // The anchor's previous poll is among the tasks counted since then.
            let others = now.1.saturating_sub(last.1).saturating_sub(1);
            let elapsed_ms = u64::try_from(now.0.duration_since(last.0).as_millis()).unwrap_or(u64::MAX);
            let current = shared.interval_us.load(Ordering::Relaxed);
            let next = if others > IDLE_TASKS_PER_MS.saturating_mul(elapsed_ms) + 1 {
                busy_us
            } else {
                current.saturating_mul(2).min(idle_us)
            };
            shared.interval_us.store(next, Ordering::Relaxed);
            last = now;
            Poll::<()>::Pending
        }))
        .detach();
        Anchor { task: Some(task) }
    }
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(helper) = self.helper.take() {
            helper.thread().unpark();
            // The helper only sleeps, reads /proc and sends signals or wakes; it does not panic
            // short of a bug, and a panic there must not hide the executor's own result.
            let _ = helper.join();
        }
    }
}

/// The anchor task; cancelled when dropped.
#[derive(Debug)]
pub(crate) struct Anchor {
    task: Option<glommio::task::JoinHandle<()>>,
}

impl Drop for Anchor {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.cancel();
        }
    }
}

/// The helper thread's loop; see the module docs.
fn helper(shared: &Shared, busy_us: u64, waker_rx: &mpsc::Receiver<Waker>) {
    let mut waker: Option<Waker> = None;
    // The anchor's poll count when the helper last woke it.
    let mut polls_at_wake: Option<u64> = None;
    loop {
        let tick_us = if waker.is_some() {
            shared.interval_us.load(Ordering::Relaxed)
        } else {
            busy_us
        };
        let deadline = Instant::now() + Duration::from_micros(tick_us);
        while !shared.stop.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            thread::park_timeout(left);
        }
        // Every routine wake queues a clone of the waker on the executor, so stop before it is gone.
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let polls = shared.anchor_polls.load(Ordering::Acquire);
        if waker.is_none() && polls > 0 {
            waker = waker_rx.try_recv().ok();
            assert!(
                waker.is_some(),
                "the anchor sends its waker before it counts its first poll"
            );
        }
        let overdue = match polls_at_wake {
            None => polls == 0,
            Some(at_wake) => polls == at_wake,
        };
        if overdue {
            // Read the thread's state, then check that the task was runnable all along.
            let parked = thread_parked(shared.tid);
            let still = shared.anchor_polls.load(Ordering::Acquire) == polls;
            if parked != Some(false) && still {
                if parked == Some(true) {
                    shared.stall_pending.store(true, Ordering::Release);
                }
                // An executor with runnable tasks is busy, whatever the anchor last concluded:
                // retry at the busy tick until it runs.
                shared.interval_us.store(busy_us, Ordering::Relaxed);
                shared.kicks.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the thread is alive: the guard that joins this helper is dropped on it
                // before it ends.
                unsafe { libc::pthread_kill(shared.pthread, kick_signal()) };
            }
            continue;
        }
        if let Some(waker) = &waker {
            polls_at_wake = Some(polls);
            shared.wakes.fetch_add(1, Ordering::Relaxed);
            waker.wake_by_ref();
        }
    }
}

/// Whether thread `tid` of this process is asleep in `io_uring_enter` waiting for completions,
/// where glommio parks. `None` when the kernel does not say (no `/proc/self/task/TID/syscall`);
/// the guard then kicks without counting a stall.
fn thread_parked(tid: libc::pid_t) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    // "NR ARG1 .. ARG6 SP PC" while blocked in a call, "running" while running or runnable.
    let mut fields = text.split_whitespace();
    let Some(Ok(nr)) = fields.next().map(str::parse::<libc::c_long>) else {
        return Some(false);
    };
    if nr != libc::SYS_io_uring_enter {
        return Some(false);
    }
    let hex = |s: Option<&str>| s.and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    let _fd = fields.next();
    let _to_submit = fields.next();
    let min_complete = hex(fields.next()).unwrap_or(0);
    let flags = hex(fields.next()).unwrap_or(0);
    Some(min_complete > 0 && flags & IORING_ENTER_GETEVENTS != 0)
}

/// `IORING_ENTER_GETEVENTS` of `<linux/io_uring.h>` (the `io-uring` crate keeps its copy private).
const IORING_ENTER_GETEVENTS: u64 = 1;

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn tasks_executed() -> u64 {
    glommio::executor().executor_stats().tasks_executed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{self, ExecutorOptions};
    use std::sync::atomic::AtomicU32;

    /// An idle executor is woken far less often than every `interval`, and the interval returns to
    /// `interval` as soon as the executor has work again.
    #[test]
    fn an_idle_executor_is_woken_rarely_and_a_busy_one_often() {
        let (idle_wakes, idle_interval, busy_interval) = executor::run(ExecutorOptions::new("stall-idle"), || async {
            let guard = executor::guard_of("stall-idle");
            glommio::timer::sleep(Duration::from_secs(1)).await;
            let idle_wakes = guard.wakes();
            let idle_interval = guard.interval();
            // Work: many short tasks until the guard's next poll has seen them (bounded, so a
            // guard that never notices fails the assertion below instead of hanging).
            let start = Instant::now();
            while guard.interval() != STALL_GUARD_INTERVAL_DEFAULT && start.elapsed() < Duration::from_secs(5) {
                for _ in 0..64 {
                    glommio::spawn_local(async {}).await;
                }
                glommio::executor().yield_now().await;
            }
            (idle_wakes, idle_interval, guard.interval())
        })
        .unwrap();
        // Every 2 ms for a second would be about 500.
        assert!(idle_wakes < 100, "idle executor woken {idle_wakes} times in a second");
        assert_eq!(idle_interval, STALL_GUARD_IDLE_INTERVAL);
        assert_eq!(busy_interval, STALL_GUARD_INTERVAL_DEFAULT);
    }

    /// Waits for `count` executors to report on `done_rx`; a stalled one is caught by the deadline
    /// and fails the test instead of hanging it.
    fn wait_for(count: usize, done_rx: &mpsc::Receiver<usize>, progress: &[AtomicU32], rounds: u32) {
        let deadline = Duration::from_secs(30);
        let start = Instant::now();
        let mut finished = Vec::new();
        while finished.len() < count {
            let left = deadline.saturating_sub(start.elapsed());
            match done_rx.recv_timeout(left) {
                Ok(i) => finished.push(i),
                Err(_) => panic!(
                    "executors {finished:?} of 0..{count} finished within {deadline:?}; the others stalled \
                     (rounds done: {progress:?} of {rounds})"
                ),
            }
        }
    }

    /// Three unbound executors with a short preemption timer, each looping on short sleeps: the
    /// setup that makes glommio park with runnable tasks. Each executor must finish its loop.
    #[test]
    fn executors_with_a_short_preempt_timer_keep_running() {
        const ROUNDS: u32 = 300;
        let (done_tx, done_rx) = mpsc::channel();
        let rounds: Arc<[AtomicU32; 3]> = Arc::default();
        let mut handles = Vec::new();
        for i in 0..3 {
            let done_tx = done_tx.clone();
            let rounds = rounds.clone();
            let opts = ExecutorOptions::new(format!("stall-{i}")).preempt_timer(Duration::from_micros(200));
            let handle = executor::spawn(opts, move || async move {
                for _ in 0..ROUNDS {
                    glommio::timer::sleep(Duration::from_micros(300)).await;
                    // A little CPU so that the preemption timer does fire inside the loop.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(250) {
                        std::hint::spin_loop();
                    }
                    rounds[i].fetch_add(1, Ordering::Relaxed);
                }
                let _ = done_tx.send(i);
            })
            .unwrap();
            handles.push(handle);
        }
        wait_for(3, &done_rx, &rounds[..], ROUNDS);
        for handle in handles {
            handle.join().unwrap();
        }
    }

    /// At the shortest preemption timer [`executor::spawn`] accepts, glommio 0.9 sometimes parks
    /// a new executor before it ever polls its main task, and without the guard such an executor
    /// never runs it. Measured on the 2-vCPU machine with both CPUs kept busy, executors started
    /// four at a time without the guard (its helper disabled): at 10 us 2 of 100 never ran their
    /// task, at 5 us 34 of 40, at 20, 50 and 100 us none of 100-200. So this test starts
    /// [`FIRST_INSTANT_EXECUTORS`] executors, enough that without the guard it fails in most runs
    /// (see docs/RELIABILITY.md, problem 11); with the guard every one must run its future, which
    /// only says that it ran. (Whether the guard *counted* a stall is not asserted: the count is
    /// a lower bound, and a park just after the anchor's first poll is ended by a routine wake
    /// without being seen.)
    #[test]
    fn an_executor_parked_at_its_first_instant_is_woken() {
        const AT_ONCE: usize = 4;
        for batch in 0..FIRST_INSTANT_EXECUTORS / AT_ONCE {
            let (done_tx, done_rx) = mpsc::channel();
            let ran: Arc<[AtomicU32; AT_ONCE]> = Arc::default();
            let mut handles = Vec::new();
            for i in 0..AT_ONCE {
                let done_tx = done_tx.clone();
                let ran = ran.clone();
                let opts = ExecutorOptions::new(format!("first-instant-{batch}-{i}"))
                    .preempt_timer(executor::PREEMPT_TIMER_MIN);
                let handle = executor::spawn(opts, move || async move {
                    ran[i].fetch_add(1, Ordering::Relaxed);
                    let _ = done_tx.send(i);
                })
                .unwrap();
                handles.push(handle);
            }
            wait_for(AT_ONCE, &done_rx, &ran[..], 1);
            for handle in handles {
                handle.join().unwrap();
            }
        }
    }

    /// Executors [`an_executor_parked_at_its_first_instant_is_woken`] starts.
    const FIRST_INSTANT_EXECUTORS: usize = 96;
}
