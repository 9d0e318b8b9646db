//! A single-waiter wake-up for tasks of one executor.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes one waiting task; a notification sent while nobody waits is kept
/// (one permit) and consumed by the next `wait`.
///
/// Exactly one task may wait at a time: each connection has one reader and
/// one writer, and each owns its own `Notify`. A second waiter would replace
/// the first one's waker, so the type is deliberately not shared more widely.
#[derive(Default)]
pub struct Notify {
    permit: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.permit.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.permit.replace(false) {
                return Poll::Ready(());
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }
}
