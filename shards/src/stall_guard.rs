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
//! The guard is a task that never finishes plus a helper thread that wakes that task every
//! `interval` through its waker. A wake from another thread is queued on the executor and writes
//! the executor's eventfd if it sleeps, so a parked executor comes out of `io_uring_enter`, arms a
//! fresh timer and runs its queues. A wrongly parked executor thus loses at most `interval`; a
//! running one only polls an idle task once per interval. The cost when idle is one wake-up per
//! interval.
//!
//! ```no_run
//! let ex = shards::executor_builder(None).spawn(|| async move {
//!     let _guard = shards::StallGuard::install(shards::STALL_GUARD_INTERVAL_DEFAULT);
//!     // ... the executor's work ...
//! }).unwrap();
//! ex.join().unwrap();
//! ```

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::thread;
use std::time::Duration;

/// Default wake interval of a [`StallGuard`]: the most a wrongly parked executor can lose.
pub const STALL_GUARD_INTERVAL_DEFAULT: Duration = Duration::from_millis(2);

/// Keeps waking the executor it was installed on until it is dropped; see the module docs.
#[derive(Debug)]
#[must_use = "the guard stops when dropped"]
pub struct StallGuard {
    stop: Arc<AtomicBool>,
    task: Option<glommio::task::JoinHandle<()>>,
}

impl StallGuard {
    /// Starts guarding the current executor. Must be called from a task running on it; drop the
    /// guard before the executor's main future returns.
    ///
    /// # Panics
    ///
    /// If called outside a glommio executor or if the helper thread cannot be started.
    pub fn install(interval: Duration) -> StallGuard {
        let stop = Arc::new(AtomicBool::new(false));
        let (waker_tx, waker_rx) = mpsc::sync_channel(1);
        let mut waker_tx = Some(waker_tx);
        // The anchor: pending forever, polled only to hand its waker over and when woken.
        let task = glommio::spawn_local(poll_fn(move |cx| {
            if let Some(tx) = waker_tx.take() {
                let _ = tx.send(cx.waker().clone());
            }
            Poll::<()>::Pending
        }))
        .detach();
        let thread_stop = stop.clone();
        thread::Builder::new()
            .name("shardlog-stall-guard".into())
            .spawn(move || {
                let Ok(waker) = waker_rx.recv() else { return };
                // Every wake queues a clone of the waker on the executor, so stop before it is gone.
                while !thread_stop.load(Ordering::Acquire) {
                    thread::sleep(interval);
                    if thread_stop.load(Ordering::Acquire) {
                        break;
                    }
                    waker.wake_by_ref();
                }
            })
            .expect("start the stall guard thread");
        StallGuard { stop, task: Some(task) }
    }
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
