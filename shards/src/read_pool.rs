//! A bound on the memory one shard's reads hold together.
//!
//! Every read charges a [`ReadMemory`] for what it allocates (the disk buffer of each chunk it
//! reads, the records it collects, the response they become) before allocating it, and the charge
//! goes back to the [`ReadPool`] when the memory is freed: when the `ReadMemory` is shrunk or
//! dropped. The charge may travel to another thread with the response (it is `Send`), so that a
//! response waiting for a slow client's socket stays charged until it is written or dropped.
//!
//! Waiting is first come, first served, and only a read that holds nothing waits
//! ([`ReadMemory::acquire`] asserts it). A read that already holds records and finds no room for
//! its next chunk answers with what it has instead ([`ReadMemory::try_grow_to`]). So no read waits
//! while holding what another waiting read needs, and the pool cannot deadlock on itself; it only
//! waits for reads to finish and for clients to take their answers.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// The bookkeeping of one read and the envelope of its response, charged once per batch.
pub const READ_BATCH_OVERHEAD_BYTES: usize = 256;
/// What one record costs beyond its payload: its `ReadRecord` and its framing in the response
/// (a FlatBuffers table of about 48 bytes).
pub const READ_RECORD_OVERHEAD_BYTES: usize = 64;

/// Default bound of the memory one shard's reads hold together.
pub const READ_MEMORY_BYTES_DEFAULT: usize = 32 << 20;

struct Waiter {
    ticket: u64,
    bytes: usize,
    waker: Option<Waker>,
}

struct State {
    free: usize,
    next_ticket: u64,
    /// Oldest first. The head is granted as soon as `free` covers it; nobody overtakes it.
    waiters: VecDeque<Waiter>,
    /// Tickets granted whose futures have not seen it yet.
    granted: Vec<u64>,
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only integers and wakers behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns `bytes` and grants the waiters that now fit, in order.
    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut wake = Vec::new();
        {
            let mut st = self.lock();
            st.free += bytes;
            assert!(st.free <= self.capacity, "more returned to the read pool than taken");
            Self::grant(&mut st, &mut wake);
        }
        for w in wake {
            w.wake();
        }
    }

    fn grant(st: &mut State, wake: &mut Vec<Waker>) {
        while let Some(head) = st.waiters.front() {
            if head.bytes > st.free {
                break;
            }
            let head = st.waiters.pop_front().expect("head exists");
            st.free -= head.bytes;
            st.granted.push(head.ticket);
            wake.extend(head.waker);
        }
    }
}

/// The memory bound of one shard's reads. Cloning gives another handle to the same pool.
#[derive(Clone)]
pub struct ReadPool {
    shared: Arc<Shared>,
}

impl ReadPool {
    pub fn new(capacity: usize) -> ReadPool {
        assert!(capacity > 0);
        ReadPool {
            shared: Arc::new(Shared {
                capacity,
                state: Mutex::new(State {
                    free: capacity,
                    next_ticket: 0,
                    waiters: VecDeque::new(),
                    granted: Vec::new(),
                }),
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Bytes charged at the moment.
    pub fn held(&self) -> usize {
        self.shared.capacity - self.shared.lock().free
    }

    /// Reads waiting for room.
    pub fn waiting(&self) -> usize {
        self.shared.lock().waiters.len()
    }

    /// A charge that holds nothing yet.
    pub fn memory(&self) -> ReadMemory {
        ReadMemory {
            pool: Some(self.shared.clone()),
            held: 0,
        }
    }
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPool")
            .field("capacity", &self.capacity())
            .field("held", &self.held())
            .finish()
    }
}

/// What one read holds of a [`ReadPool`]; returned when shrunk or dropped.
pub struct ReadMemory {
    /// `None`: not bounded (tools and tests that read outside a server).
    pool: Option<Arc<Shared>>,
    held: usize,
}

impl std::fmt::Debug for ReadMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadMemory")
            .field("held", &self.held)
            .field("bounded", &self.pool.is_some())
            .finish()
    }
}

impl ReadMemory {
    /// A charge against no pool: every request for room succeeds at once.
    pub fn unbounded() -> ReadMemory {
        ReadMemory { pool: None, held: 0 }
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// Waits until this holds `bytes`, behind every read that started waiting earlier. Only a
    /// charge that holds nothing may wait (see the module). A request above the pool's capacity
    /// waits for the whole pool and holds all of it: the pool must be larger than any one read
    /// (the daemon checks that at startup).
    pub async fn acquire(&mut self, bytes: usize) {
        assert_eq!(self.held, 0, "a read waits for room only while it holds nothing");
        let Some(pool) = self.pool.clone() else {
            self.held = bytes;
            return;
        };
        let bytes = bytes.min(pool.capacity);
        let ticket = {
            let mut st = pool.lock();
            if st.waiters.is_empty() && st.free >= bytes {
                st.free -= bytes;
                self.held = bytes;
                return;
            }
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.waiters.push_back(Waiter {
                ticket,
                bytes,
                waker: None,
            });
            ticket
        };
        // If this future is dropped while waiting, the guard takes it out of the queue (or returns
        // what was granted to it), so a cancelled read leaves nothing behind.
        let mut guard = WaitGuard {
            pool: &pool,
            ticket,
            bytes,
            done: false,
        };
        poll_fn(|cx| {
            let mut st = pool.lock();
            if let Some(i) = st.granted.iter().position(|&t| t == ticket) {
                st.granted.swap_remove(i);
                return Poll::Ready(());
            }
            let w = st
                .waiters
                .iter_mut()
                .find(|w| w.ticket == ticket)
                .expect("a ticket not granted is queued");
            w.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        guard.done = true;
        self.held = bytes;
    }

    /// Grows what this holds to `bytes` if the pool has room now and no read is waiting for it
    /// (a read holding records must not overtake those that hold nothing). Never waits.
    pub fn try_grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            return true;
        }
        let Some(pool) = &self.pool else {
            self.held = bytes;
            return true;
        };
        let more = bytes - self.held;
        let mut st = pool.lock();
        if st.waiters.is_empty() && st.free >= more {
            st.free -= more;
            self.held = bytes;
            true
        } else {
            false
        }
    }

    /// Returns what this holds beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes >= self.held {
            return;
        }
        let less = self.held - bytes;
        self.held = bytes;
        if let Some(pool) = &self.pool {
            pool.release(less);
        }
    }
}

impl Drop for ReadMemory {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

struct WaitGuard<'a> {
    pool: &'a Shared,
    ticket: u64,
    bytes: usize,
    done: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut wake = Vec::new();
        let returned = {
            let mut st = self.pool.lock();
            if let Some(i) = st.granted.iter().position(|&t| t == self.ticket) {
                st.granted.swap_remove(i);
                true
            } else {
                st.waiters.retain(|w| w.ticket != self.ticket);
                // Whoever queued behind this waiter may fit now.
                Shared::grant(&mut st, &mut wake);
                false
            }
        };
        for w in wake {
            w.wake();
        }
        if returned {
            self.pool.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F, Fut>(test: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .spawn(test)
            .expect("spawn executor")
            .join()
            .expect("executor ran")
    }

    #[test]
    fn waiters_are_served_in_order_and_never_past_the_bound() {
        run(|| async {
            let pool = ReadPool::new(100);
            let mut a = pool.memory();
            a.acquire(60).await;
            let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let spawn = |name: &'static str, bytes: usize| {
                let pool = pool.clone();
                let order = order.clone();
                glommio::spawn_local(async move {
                    let mut m = pool.memory();
                    m.acquire(bytes).await;
                    order.borrow_mut().push(name);
                    assert!(pool.held() <= pool.capacity());
                    glommio::yield_if_needed().await;
                    m
                })
            };
            let big = spawn("big", 80);
            glommio::yield_if_needed().await;
            let small = spawn("small", 30);
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            // 40 bytes are free, but the small request queued behind the big one waits; then the
            // big one holds 80 of 100, so the small one still waits.
            assert!(order.borrow().is_empty());
            assert!(!a.try_grow_to(70), "no growth past waiting reads");
            drop(a);
            let big = big.await;
            assert_eq!(*order.borrow(), ["big"]);
            drop(big);
            let small = small.await;
            assert_eq!(small.held(), 30);
            drop(small);
            assert_eq!(pool.held(), 0);
        });
    }

    #[test]
    fn a_cancelled_wait_leaves_nothing_behind() {
        run(|| async {
            let pool = ReadPool::new(100);
            let mut a = pool.memory();
            a.acquire(100).await;
            let waiter = {
                let pool = pool.clone();
                glommio::spawn_local(async move {
                    let mut m = pool.memory();
                    m.acquire(50).await;
                    m
                })
            };
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(pool.waiting(), 1);
            drop(waiter);
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(pool.waiting(), 0);
            a.shrink_to(30);
            assert_eq!(pool.held(), 30);
            drop(a);
            assert_eq!(pool.held(), 0);
        });
    }
}
