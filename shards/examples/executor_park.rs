//! Does a glommio executor stop polling a task that is always runnable?
//!
//! One task does nothing but `yield_now` (it wakes itself every turn, like the in-memory
//! storage's simulated I/O) and counts its turns; a thread outside the executor watches the
//! count. glommio 0.9 can park its executor while a task queue is still runnable
//! (`run_task_queues` returns "nothing ran" when the preemption timer has already fired, and the
//! executor then sleeps), so the count stops and the process sits at 0 % CPU. That is how
//! problem 7 of docs/RELIABILITY.md looked. A short preemption timer makes it frequent; at 5 us
//! the executor parks before its first poll in nearly every run (problem 11):
//!
//! ```sh
//! cargo run --release -p shards --example executor_park -- 100 2         # preempt_timer_us seconds
//! cargo run --release -p shards --example executor_park -- 100 2 guard   # through shards::executor::spawn
//! ```
//!
//! Exit status 1 and a "stopped" line when the task was not polled for a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A runnable task not polled for this long counts as stopped.
const STALL: Duration = Duration::from_secs(1);

fn main() {
    let mut args = std::env::args().skip(1);
    let preempt_us: u64 = args
        .next()
        .map_or(100, |s| s.parse().expect("preempt timer in microseconds"));
    let secs: u64 = args.next().map_or(2, |s| s.parse().expect("seconds to run"));
    let guarded = args.next().is_some_and(|a| a == "guard");
    let turns = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (t, d) = (turns.clone(), done.clone());
    let work = move || async move {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            futures_lite::future::yield_now().await;
            t.fetch_add(1, Ordering::Relaxed);
        }
        d.store(true, Ordering::SeqCst);
    };
    let preempt = Duration::from_micros(preempt_us);
    if guarded {
        let opts = shards::executor::ExecutorOptions::new("park-guarded").preempt_timer(preempt);
        // Not joined: a parked executor thread would never return.
        let _executor = shards::executor::spawn(opts, work).expect("spawn executor");
    } else {
        // Deliberately a bare glommio executor, to show the bug.
        let _executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .preempt_timer(preempt)
            .spawn(work)
            .expect("spawn executor");
    }
    let mut seen = 0;
    let mut since = Instant::now();
    let mut stalls = 0;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        // Read while the executor runs: it leaves the list when it ends.
        if let Some(s) = shards::executor::stats().iter().find(|s| s.name == "park-guarded") {
            stalls = s.stalls_broken;
        }
        let now = turns.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() > STALL && !done.load(Ordering::SeqCst) {
            println!(
                "preempt_timer {preempt_us} us, guard {guarded}: stopped: an always-runnable task was not polled for {:?} \
                 after {seen} turns",
                since.elapsed()
            );
            // The executor thread is parked for good; do not join it.
            std::process::exit(1);
        }
    }
    println!(
        "preempt_timer {preempt_us} us, guard {guarded}: {} turns in {secs} s, never stopped; stalls broken (seen so far) {stalls}",
        turns.load(Ordering::Relaxed)
    );
}
