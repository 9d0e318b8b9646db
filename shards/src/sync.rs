//! Single-threaded wake-up primitives for the shard's tasks.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A level-triggered wake-up for one waiting task: a `notify` before the `wait` is not lost.
#[derive(Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Tasks waiting for a log position to be reached, woken in position order.
#[derive(Default)]
pub struct LsnWaiters {
    next_id: Cell<u64>,
    map: RefCell<BTreeMap<(u64, u64), Waker>>,
}

impl LsnWaiters {
    /// Registers (or refreshes) a waiter for `lsn`; `key` remembers the registration.
    pub fn register(&self, lsn: u64, key: &mut Option<(u64, u64)>, waker: &Waker) {
        let k = match key {
            Some(k) => *k,
            None => {
                let id = self.next_id.get();
                self.next_id.set(id + 1);
                *key = Some((lsn, id));
                (lsn, id)
            }
        };
        self.map.borrow_mut().insert(k, waker.clone());
    }

    pub fn unregister(&self, key: (u64, u64)) {
        self.map.borrow_mut().remove(&key);
    }

    /// Wakes every waiter for a position `<= lsn`.
    pub fn wake_upto(&self, lsn: u64) {
        let woken = {
            let mut map = self.map.borrow_mut();
            let rest = map.split_off(&(lsn.saturating_add(1), 0));
            std::mem::replace(&mut *map, rest)
        };
        for (_, w) in woken {
            w.wake();
        }
    }

    pub fn wake_all(&self) {
        let woken = std::mem::take(&mut *self.map.borrow_mut());
        for (_, w) in woken {
            w.wake();
        }
    }
}
