//! The generator's own CPU time, so every report says what the load cost the
//! machine it shares with the daemon.

use std::time::Duration;

/// User and system CPU time of this whole process (every thread, finished ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCpu {
    pub user: Duration,
    pub system: Duration,
}

impl ProcessCpu {
    pub fn now() -> ProcessCpu {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `usage` points to writable memory of the right type; RUSAGE_SELF is always
        // valid, so getrusage cannot fail and fills it.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) cannot fail");
        // SAFETY: zero-initialised and then filled by the kernel: every field is initialised.
        let usage = unsafe { usage.assume_init() };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
        ProcessCpu {
            user: tv(usage.ru_utime),
            system: tv(usage.ru_stime),
        }
    }

    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        let before = ProcessCpu::now();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Busy until the kernel has charged some CPU (its accounting can be tick-based); a
        // generous bound, not a speed check.
        while ProcessCpu::now().total() <= before.total() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no CPU time charged after 30 s of work"
            );
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        assert!(ProcessCpu::now().user + ProcessCpu::now().system >= before.total());
    }
}
