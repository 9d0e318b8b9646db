//! A guard against glommio 0.9 parking an executor that still has runnable tasks.
//!
//! glommio's run loop arms its preemption timer, then runs task queues. If the timer (or any other
//! waker-less completion on the latency ring) is already due when it checks, it stops before
//! running a single queue and reports "nothing ran", which the loop reads as "nothing to run" and
//! parks. Nothing is coming to wake it: the work is already queued, its wakers have fired. The
//! runnable tasks stay asleep until some unrelated event arrives, or forever. How often this
//! happens grows as the preemption timer shrinks and as the thread gets descheduled between arming
//! the timer and checking it (a loaded VM): three unbound executors looping on 1 ms sleeps hang in
//! about half of the runs at a 500 us timer, and never at 100 ms.
//!
//! The guard is a task that never finishes plus a helper thread that wakes that task through its
//! waker. A wake from another thread is queued on the executor and writes the executor's eventfd
//! if it sleeps, so a parked executor comes out of `io_uring_enter`, arms a fresh timer and runs
//! its queues. While the executor is busy the helper wakes it every `interval`, so a wrongly
//! parked executor loses at most that. Each wake costs the executor a trip through its loop (tens
//! of microseconds on a VM), which adds up for an idle daemon, so the guard backs off: when the
//! anchor task finds that hardly any other task ran since its last poll, it doubles the interval,
//! up to [`STALL_GUARD_IDLE_INTERVAL`]; the first poll that sees real work brings it back to
//! `interval`. The worst case is an executor that parks wrongly on the very first work after an
//! idle spell, which loses at most the idle interval.
//!
//! ```no_run
//! let ex = shards::executor_builder(None).spawn(|| async move {
//!     let _guard = shards::StallGuard::install(shards::STALL_GUARD_INTERVAL_DEFAULT);
//!     // ... the executor's work ...
//! }).unwrap();
//! ex.join().unwrap();
//! ```

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::thread;
use std::time::{Duration, Instant};

/// Default wake interval of a [`StallGuard`] on a busy executor: the most a wrongly parked
/// executor can lose while it has work.
pub const STALL_GUARD_INTERVAL_DEFAULT: Duration = Duration::from_millis(2);
/// The longest interval a [`StallGuard`] backs off to while its executor is idle.
pub const STALL_GUARD_IDLE_INTERVAL: Duration = Duration::from_millis(50);
/// Tasks other than the guard's own per millisecond below which an executor counts as idle. A
/// daemon executor has no periodic housekeeping (shutdown wakes it directly), so an idle one
/// stays below it; steady traffic does not.
const IDLE_TASKS_PER_MS: u64 = 1;

/// Keeps waking the executor it was installed on until it is dropped; see the module docs.
#[derive(Debug)]
#[must_use = "the guard stops when dropped"]
pub struct StallGuard {
    shared: Arc<Shared>,
    task: Option<glommio::task::JoinHandle<()>>,
}

/// State shared by the anchor task and the helper thread.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// The helper's current wake interval in microseconds, set by the anchor.
    interval_us: AtomicU64,
    /// Wakes the helper has sent, for tests.
    wakes: AtomicU64,
}

impl StallGuard {
    /// Starts guarding the current executor. Must be called from a task running on it; drop the
    /// guard before the executor's main future returns.
    ///
    /// # Panics
    ///
    /// If called outside a glommio executor or if the helper thread cannot be started.
    pub fn install(interval: Duration) -> StallGuard {
        let busy_us = duration_us(interval);
        let idle_us = duration_us(STALL_GUARD_IDLE_INTERVAL).max(busy_us);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            interval_us: AtomicU64::new(busy_us),
            wakes: AtomicU64::new(0),
        });
        let (waker_tx, waker_rx) = mpsc::sync_channel(1);
        let mut waker_tx = Some(waker_tx);
        let anchor_shared = shared.clone();
        let mut last = (Instant::now(), tasks_executed());
        // The anchor: pending forever, polled only to hand its waker over and when woken.
        let task = glommio::spawn_local(poll_fn(move |cx| {
            if let Some(tx) = waker_tx.take() {
                let _ = tx.send(cx.waker().clone());
            }
            let now = (Instant::now(), tasks_executed());
            // The anchor's previous poll is among the tasks counted since then.
            let others = now.1.saturating_sub(last.1).saturating_sub(1);
            let elapsed_ms = u64::try_from(now.0.duration_since(last.0).as_millis()).unwrap_or(u64::MAX);
            let current = anchor_shared.interval_us.load(Ordering::Relaxed);
            let next = if others > IDLE_TASKS_PER_MS.saturating_mul(elapsed_ms) + 1 {
                busy_us
            } else {
                current.saturating_mul(2).min(idle_us)
            };
            anchor_shared.interval_us.store(next, Ordering::Relaxed);
            last = now;
            Poll::<()>::Pending
        }))
        .detach();
        let thread_shared = shared.clone();
        thread::Builder::new()
            .name("shardlog-stall-guard".into())
            .spawn(move || {
                let Ok(waker) = waker_rx.recv() else { return };
                // Every wake queues a clone of the waker on the executor, so stop before it is gone.
                while !thread_shared.stop.load(Ordering::Acquire) {
                    thread::sleep(Duration::from_micros(thread_shared.interval_us.load(Ordering::Relaxed)));
                    if thread_shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                    thread_shared.wakes.fetch_add(1, Ordering::Relaxed);
                    waker.wake_by_ref();
                }
            })
            .expect("start the stall guard thread");
        StallGuard {
            shared,
            task: Some(task),
        }
    }

    /// The helper thread's current wake interval.
    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.shared.interval_us.load(Ordering::Relaxed))
    }

    /// How many times the helper thread has woken the executor so far.
    pub fn wakes(&self) -> u64 {
        self.shared.wakes.load(Ordering::Relaxed)
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn tasks_executed() -> u64 {
    glommio::executor().executor_stats().tasks_executed()
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An idle executor is woken far less often than every `interval`, and the interval returns to
    /// `interval` as soon as the executor has work again.
    #[test]
    fn an_idle_executor_is_woken_rarely_and_a_busy_one_often() {
        let handle = crate::executor_builder(None)
            .name("stall-idle")
            .spawn(|| async move {
                let guard = StallGuard::install(STALL_GUARD_INTERVAL_DEFAULT);
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
        let (idle_wakes, idle_interval, busy_interval) = handle.join().unwrap();
        // Every 2 ms for a second would be about 500.
        assert!(idle_wakes < 100, "idle executor woken {idle_wakes} times in a second");
        assert_eq!(idle_interval, STALL_GUARD_IDLE_INTERVAL);
        assert_eq!(busy_interval, STALL_GUARD_INTERVAL_DEFAULT);
    }

    /// Three unbound executors with a short preemption timer, each looping on short sleeps: the
    /// setup that makes glommio park with runnable tasks. Each executor must finish its loop; a
    /// stalled one is caught by the deadline and fails the test instead of hanging.
    #[test]
    fn executors_with_a_short_preempt_timer_keep_running() {
        const ROUNDS: u32 = 300;
        let deadline = Duration::from_secs(30);
        let (done_tx, done_rx) = mpsc::channel();
        let rounds: Arc<[std::sync::atomic::AtomicU32; 3]> = Arc::default();
        let mut handles = Vec::new();
        for i in 0..3 {
            let done_tx = done_tx.clone();
            let rounds = rounds.clone();
            let handle = crate::executor_builder(None)
                .name(&format!("stall-{i}"))
                .preempt_timer(Duration::from_micros(200))
                .spawn(move || async move {
                    let guard = StallGuard::install(STALL_GUARD_INTERVAL_DEFAULT);
                    for _ in 0..ROUNDS {
                        glommio::timer::sleep(Duration::from_micros(300)).await;
                        // A little CPU so that the preemption timer does fire inside the loop.
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(250) {
                            std::hint::spin_loop();
                        }
                        rounds[i].fetch_add(1, Ordering::Relaxed);
                    }
                    drop(guard);
                    let _ = done_tx.send(i);
                })
                .unwrap();
            handles.push(handle);
        }
        let start = Instant::now();
        let mut finished = Vec::new();
        while finished.len() < 3 {
            let left = deadline.saturating_sub(start.elapsed());
            match done_rx.recv_timeout(left) {
                Ok(i) => finished.push(i),
                Err(_) => panic!(
                    "executors {finished:?} of 0..3 finished within {deadline:?}; the others stalled \
                     (rounds done: {rounds:?} of {ROUNDS})"
                ),
            }
        }
        for handle in handles {
            handle.join().unwrap();
        }
    }
}
