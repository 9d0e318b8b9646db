//! Messages on the cross-executor rings between front executors and shard executors, and the
//! rings themselves.
//!
//! Each (front, shard) pair has two bounded single-producer single-consumer [`channel`]s:
//! requests one way, completions back. A front that finds a request ring full stops reading the
//! connection that wants to send, so a slow shard pushes back on its clients through TCP. The
//! completion side never blocks for long: the front only appends each completion to a
//! connection's outbound buffer, whose size the connection's budget already bounds.
//!
//! Why not glommio's `shared_channel`: its receiver notifies the sender's executor after *every*
//! message it takes, so that a sender waiting for room can proceed. When that executor is asleep
//! (always, at low load) the notification is an eventfd write and a wake-up that finds nothing to
//! do. Traced at one connection with one append in flight, that made three wake-ups per request
//! on each of the front and the shard executor instead of two, and each wake-up of a glommio
//! executor costs several `io_uring_enter` calls and a `membarrier` (an IPI to every CPU of the
//! process). [`channel`] wakes the other side only when it is actually waiting: the receiver
//! when it is parked on an empty ring, the sender only when it is parked on a full one. The
//! wake-up itself is the task's own `Waker`, which glommio delivers across executors through the
//! target executor's foreign-wake queue and eventfd.
//!
//! Every wake-up a [`Parked`] delivers to a task on another executor is counted for the executor
//! it wakes ([`ring_wakeups`], [`ring_wakeups_by_executor`]): each one ends a park of that
//! executor, and on glommio 0.9 each park costs a `membarrier` IPI, so wake-ups per request is the
//! figure to keep low.
//!
//! Messages are small: an append carries its request frame as one `Vec<u8>` (moved, not copied),
//! which the shard reads through the FlatBuffers view and sends back with a later batch of
//! completions, so frame buffers are allocated and freed on the front's thread only.

use std::future::poll_fn;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Poll, Waker};

use crossbeam_queue::ArrayQueue;
use proto::wire::{ErrorCode, ShardStatsT};

/// A front-local connection number; 0 is never used.
pub type ConnId = u64;

/// Front to shard.
#[derive(Debug)]
pub enum ToShard {
    /// `frame` is a request payload whose verification succeeded on the front and whose body is
    /// an `Append` of a stream this shard owns. The shard reads the records straight from it.
    Append {
        conn: ConnId,
        id: u64,
        reserved: usize,
        frame: Vec<u8>,
    },
    Read {
        conn: ConnId,
        id: u64,
        reserved: usize,
        read: ReadArgs,
    },
    Stats {
        token: u64,
    },
    /// Connection `conn` of this front ended, or its client closed its sending side: its reads
    /// still waiting for records (long-polls) answer now with what they have. Sent after the
    /// connection's last request, so it follows all of them on the ring.
    Cancel {
        conn: ConnId,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct ReadArgs {
    pub from_lsn: u64,
    pub max_bytes: usize,
    pub max_wait_ms: u32,
    pub stream: Option<u64>,
}

/// Shard to front.
#[derive(Debug)]
pub enum FromShard {
    /// Answers that became ready together, and the request frames the shard has finished with
    /// (returned so the front can reuse them).
    Replies {
        replies: Vec<Completion>,
        spent_frames: Vec<Vec<u8>>,
    },
    Stats {
        token: u64,
        stats: Box<ShardStatsT>,
    },
}

/// Where a shard on the same executor delivers its answers: the executor's front, called
/// directly instead of through a ring. A trait so that the shard side does not name the front.
pub trait FrontInbox {
    fn deliver(&self, msg: FromShard);
}

/// The answer to one request of connection `conn`; `reserved` budget bytes are returned to the
/// connection once the reply is written to its socket.
#[derive(Debug)]
pub struct Completion {
    pub conn: ConnId,
    pub id: u64,
    pub reserved: usize,
    pub reply: Reply,
}

#[derive(Debug)]
pub enum Reply {
    Appended {
        shard: u16,
        first_lsn: u64,
        count: u32,
    },
    /// A successful append with `AckLevel::None`: nothing is sent, only the budget returns.
    Silent,
    /// A complete response frame, encoded on the shard core (reads).
    Frame(Vec<u8>),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// A read below retention: `Error(Truncated)` with the shard's first retained lsn.
    Truncated {
        first_available_lsn: u64,
        message: String,
    },
}

/// Where an executor's received wake-ups are counted: one counter per thread, created on first
/// use and registered under the thread's name so any thread can read it.
fn wakeup_counter() -> Arc<AtomicU64> {
    thread_local! {
        static COUNTER: Arc<AtomicU64> = {
            let counter = Arc::new(AtomicU64::new(0));
            let name = std::thread::current().name().unwrap_or("unnamed").to_string();
            registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((name, counter.clone()));
            counter
        };
    }
    COUNTER.with(Arc::clone)
}

/// Every thread's wake-up counter, by thread name.
type Registry = Mutex<Vec<(String, Arc<AtomicU64>)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Wake-ups the calling thread (an executor) has received through rings and latches: how often a
/// task of another thread woke one of its parked tasks.
pub fn ring_wakeups() -> u64 {
    wakeup_counter().load(Ordering::Relaxed)
}

/// Wake-ups received by every thread that has parked on a ring or latch, by thread name (glommio
/// names an executor's thread `<executor name>-<id>`, e.g. `shard000-2`).
pub fn ring_wakeups_by_executor() -> Vec<(String, u64)> {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(name, c)| (name.clone(), c.load(Ordering::Relaxed)))
        .collect()
}

/// Tasks of one executor waiting for another executor to act. Several tasks may wait at once:
/// every connection of a front sends on the same request ring, so when it is full each of their
/// readers waits for room.
#[derive(Default)]
struct Parked {
    waiting: AtomicBool,
    /// Each waker with the wake-up counter of the executor it wakes.
    wakers: Mutex<Vec<(Waker, Arc<AtomicU64>)>>,
}

impl Parked {
    /// Registers `waker`. The caller must look at its condition again afterwards (the
    /// `fence(SeqCst)` here orders that), or it may miss an `unpark` that came just before.
    fn park(&self, waker: &Waker) {
        {
            let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            if !wakers.iter().any(|(w, _)| w.will_wake(waker)) {
                wakers.push((waker.clone(), wakeup_counter()));
            }
        }
        self.waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Wakes every parked task, if any. The caller changed the condition first and issued a
    /// `fence(SeqCst)` after it. A task that finds the condition still false parks again.
    fn unpark(&self) {
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::SeqCst) {
            let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
            for (w, woken) in wakers {
                woken.fetch_add(1, Ordering::Relaxed);
                w.wake();
            }
        }
    }
}

struct Shared<T> {
    queue: ArrayQueue<T>,
    /// The receiver waits for a message.
    receiver: Parked,
    /// The sender waits for room.
    sender: Parked,
    sender_closed: AtomicBool,
    receiver_closed: AtomicBool,
}

/// A bounded channel from one executor to another (single producer, single consumer).
pub fn channel<T: Send>(capacity: usize) -> (RingSender<T>, RingReceiver<T>) {
    assert!(capacity > 0);
    let shared = Arc::new(Shared {
        queue: ArrayQueue::new(capacity),
        receiver: Parked::default(),
        sender: Parked::default(),
        sender_closed: AtomicBool::new(false),
        receiver_closed: AtomicBool::new(false),
    });
    (RingSender { shared: shared.clone() }, RingReceiver { shared })
}

/// The sending end; closing or dropping it ends the receiver once the ring is drained.
pub struct RingSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> RingSender<T> {
    /// Sends `item`, waiting while the ring is full. `Err(item)` if the receiver is gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let shared = &*self.shared;
        let mut item = Some(item);
        poll_fn(|cx| {
            let it = item.take().expect("not polled after completion");
            if shared.receiver_closed.load(Ordering::Acquire) {
                return Poll::Ready(Err(it));
            }
            let it = match shared.queue.push(it) {
                Ok(()) => {
                    self.pushed();
                    return Poll::Ready(Ok(()));
                }
                Err(it) => it,
            };
            shared.sender.park(cx.waker());
            // The waker stays registered if the retry succeeds: the next `unpark` wakes this task
            // once for nothing, which is cheaper than finding it in the list again.
            match shared.queue.push(it) {
                Ok(()) => {
                    self.pushed();
                    Poll::Ready(Ok(()))
                }
                Err(it) if shared.receiver_closed.load(Ordering::Acquire) => Poll::Ready(Err(it)),
                Err(it) => {
                    item = Some(it);
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Queues `item` without waking the receiver: a batch of these ends with one [`flush`].
    /// `Err(item)` if the ring is full or the receiver is gone (then use [`send`], which waits,
    /// or reports the receiver gone).
    ///
    /// [`flush`]: RingSender::flush
    /// [`send`]: RingSender::send
    pub fn try_send_quiet(&self, item: T) -> Result<(), T> {
        if self.shared.receiver_closed.load(Ordering::Acquire) {
            return Err(item);
        }
        self.shared.queue.push(item)
    }

    /// Wakes the receiver if it is parked, for items queued with [`RingSender::try_send_quiet`].
    pub fn flush(&self) {
        self.pushed();
    }

    fn pushed(&self) {
        fence(Ordering::SeqCst);
        self.shared.receiver.unpark();
    }

    /// Closes the ring: the receiver gets what is queued, then `None`.
    pub fn close(&self) {
        if !self.shared.sender_closed.swap(true, Ordering::SeqCst) {
            fence(Ordering::SeqCst);
            self.shared.receiver.unpark();
        }
    }
}

impl<T> Drop for RingSender<T> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The receiving end.
pub struct RingReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> RingReceiver<T> {
    /// The next message; `None` once the sender has closed and everything was received.
    pub async fn recv(&self) -> Option<T> {
        let shared = &*self.shared;
        poll_fn(|cx| {
            if let Some(item) = self.try_recv() {
                return Poll::Ready(Some(item));
            }
            if shared.sender_closed.load(Ordering::SeqCst) {
                return Poll::Ready(self.try_recv());
            }
            shared.receiver.park(cx.waker());
            if let Some(item) = self.try_recv() {
                return Poll::Ready(Some(item));
            }
            if shared.sender_closed.load(Ordering::SeqCst) {
                return Poll::Ready(self.try_recv());
            }
            Poll::Pending
        })
        .await
    }

    /// A message, if one is queued.
    pub fn try_recv(&self) -> Option<T> {
        let item = self.shared.queue.pop()?;
        fence(Ordering::SeqCst);
        self.shared.sender.unpark();
        Some(item)
    }
}

impl<T> Drop for RingReceiver<T> {
    fn drop(&mut self) {
        self.shared.receiver_closed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.shared.sender.unpark();
    }
}

/// A one-way flag that tasks on any executor can wait for, set from any thread (shutdown, "all
/// shards are open"). Waiting costs nothing until it is set: no timer polls it.
#[derive(Default)]
pub struct Latch {
    set: AtomicBool,
    waiters: Parked,
}

impl std::fmt::Debug for Latch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latch").field("set", &self.is_set()).finish()
    }
}

impl Latch {
    /// Sets the flag and wakes every waiter. Returns whether it was already set.
    pub fn set(&self) -> bool {
        let was = self.set.swap(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.waiters.unpark();
        was
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Resolves once the flag is set.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.is_set() {
                return Poll::Ready(());
            }
            self.waiters.park(cx.waker());
            if self.is_set() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every executor goes through `shards::executor::spawn` (io_memory, preemption, stall guard).
    fn spawn<G, F, T>(fut_gen: G) -> Result<shards::executor::Executor<T>, shards::executor::ExecutorError>
    where
        G: FnOnce() -> F + Send + 'static,
        F: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        shards::executor::spawn(shards::executor::ExecutorOptions::new("ring-test"), fut_gen)
    }

    #[test]
    fn messages_cross_executors_in_order_and_close_ends_the_receiver() {
        let (tx, rx) = channel::<u64>(4);
        let count = 10_000u64;
        let producer = spawn(move || async move {
            for i in 0..count {
                tx.send(i).await.expect("receiver is alive");
            }
            tx.close();
        })
        .unwrap();
        let consumer = spawn(move || async move {
            let mut next = 0;
            while let Some(i) = rx.recv().await {
                assert_eq!(i, next);
                next += 1;
            }
            next
        })
        .unwrap();
        producer.join().unwrap();
        assert_eq!(consumer.join().unwrap(), count);
    }

    #[test]
    fn many_tasks_waiting_for_room_are_all_woken() {
        let (tx, rx) = channel::<u64>(2);
        let (tasks, each) = (16u64, 1_000u64);
        let producer = spawn(move || async move {
            let tx = std::rc::Rc::new(tx);
            let senders: Vec<_> = (0..tasks)
                .map(|_| {
                    let tx = tx.clone();
                    glommio::spawn_local(async move {
                        for i in 0..each {
                            tx.send(i).await.expect("receiver is alive");
                        }
                    })
                })
                .collect();
            for s in senders {
                s.await;
            }
        })
        .unwrap();
        let consumer = spawn(move || async move {
            let mut received = 0;
            while rx.recv().await.is_some() {
                received += 1;
            }
            received
        })
        .unwrap();
        producer.join().unwrap();
        assert_eq!(consumer.join().unwrap(), tasks * each);
    }

    #[test]
    fn a_parked_receiver_counts_the_wake_up_it_receives() {
        let (tx, rx) = channel::<u8>(1);
        let consumer = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let before = ring_wakeups();
                // Nothing is queued yet, so this parks until the producer's send wakes it (the
                // producer waits for the receiver to register before sending).
                let got = rx.recv().await;
                (got, ring_wakeups() - before)
            })
            .unwrap();
        let producer = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while !tx.shared.receiver.waiting.load(Ordering::SeqCst) {
                    assert!(std::time::Instant::now() < deadline, "the receiver never parked");
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
                tx.send(9).await.expect("receiver is alive");
            })
            .unwrap();
        producer.join().unwrap();
        let (got, woken) = consumer.join().unwrap();
        assert_eq!(got, Some(9));
        assert_eq!(woken, 1, "one send to a parked receiver is one wake-up");
        assert!(ring_wakeups_by_executor().iter().any(|(_, n)| *n >= 1));
    }

    #[test]
    fn send_fails_once_the_receiver_is_gone() {
        let (tx, rx) = channel::<u8>(1);
        drop(rx);
        let ex = spawn(move || async move { tx.send(7).await }).unwrap();
        assert_eq!(ex.join().unwrap(), Err(7));
    }

    #[test]
    fn latch_wakes_a_waiter_on_another_executor() {
        let latch = Arc::new(Latch::default());
        let waiter = {
            let latch = latch.clone();
            spawn(move || async move { latch.wait().await }).unwrap()
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!latch.set());
        waiter.join().unwrap();
        assert!(latch.is_set());
    }
}
