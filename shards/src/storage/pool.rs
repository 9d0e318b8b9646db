//! A bounded pool of aligned commit buffers, reused from one commit to the next.
//!
//! Why: a commit buffer is up to `commit_bytes_max` (1 MiB by default) plus a block. Allocating a
//! fresh zeroed one per commit put it above malloc's mmap threshold, so every commit mapped new
//! pages, faulted them in and zeroed them: about a quarter of the daemon's CPU at 64 x 1 KiB
//! appends per frame. A pooled buffer keeps its pages; the engine writes every byte of the part
//! it sends to the device (prefix, commit, and the padding up to the next block, which it zeroes
//! and asserts zero), so a reused buffer needs no clearing.
//!
//! A [`PooledBuf`] goes back to its pool when it is dropped, wherever that happens: in the engine,
//! in a storage double, or in the private io_uring ring, which holds a buffer until the kernel's
//! last completion for it has been reaped (see `uring.rs`, "Buffer ownership"). So a buffer is
//! never reused while the kernel may still read it.
//!
//! The pool is bounded: [`BufPool::take`] returns `None` once `buffers_max` buffers are out, and
//! the engine answers the append with `Busy`. Buffers are allocated lazily, up to the bound, and
//! kept; the free list is last-in first-out, so a light load keeps touching the same few buffers.
//!
//! Since the buffers live as long as the pool, the shard's io_uring ring registers each as a fixed
//! buffer on its first write ([`FixableBuf`]), so later writes from it skip pinning its pages.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::format::BLOCK_BYTES;
use crate::uring::{AlignedBuf, FixableBuf, RingBuf};

struct PoolInner {
    /// Free buffers, most recently returned last. Each keeps its registration with the shard's
    /// io_uring ring from one use to the next (see [`FixableBuf`]).
    free: RefCell<Vec<FixableBuf>>,
    /// Bytes of each buffer, a multiple of [`BLOCK_BYTES`].
    buffer_bytes: usize,
    buffers_max: usize,
    /// Buffers allocated so far (free or out); never more than `buffers_max`.
    allocated: Cell<usize>,
}

/// A bounded pool of [`BLOCK_BYTES`]-aligned buffers of one size. Cloning gives another handle
/// to the same pool. Not `Send`: it lives on the shard's executor.
#[derive(Clone)]
pub struct BufPool {
    inner: Rc<PoolInner>,
}

impl BufPool {
    /// A pool of at most `buffers_max` buffers of `buffer_bytes` each (rounded up to a block).
    pub fn new(buffer_bytes: usize, buffers_max: usize) -> BufPool {
        assert!(buffer_bytes > 0);
        assert!(buffers_max > 0);
        let block = BLOCK_BYTES as usize;
        BufPool {
            inner: Rc::new(PoolInner {
                free: RefCell::new(Vec::with_capacity(buffers_max)),
                buffer_bytes: buffer_bytes.div_ceil(block) * block,
                buffers_max,
                allocated: Cell::new(0),
            }),
        }
    }

    /// A buffer of [`BufPool::buffer_bytes`] bytes (its `len()` is the whole buffer), or `None`
    /// if every buffer the bound allows is out. The contents are whatever the last user left.
    pub fn take(&self) -> Option<PooledBuf> {
        let p = &self.inner;
        let buf = match p.free.borrow_mut().pop() {
            Some(buf) => buf,
            None if p.allocated.get() < p.buffers_max => {
                p.allocated.set(p.allocated.get() + 1);
                FixableBuf::new(AlignedBuf::new(p.buffer_bytes))
            }
            None => return None,
        };
        let mut buf = PooledBuf {
            buf: Some(buf),
            pool: self.inner.clone(),
        };
        buf.set_len(p.buffer_bytes);
        Some(buf)
    }

    pub fn buffer_bytes(&self) -> usize {
        self.inner.buffer_bytes
    }

    pub fn buffers_max(&self) -> usize {
        self.inner.buffers_max
    }

    /// Buffers allocated so far, free or out.
    pub fn allocated(&self) -> usize {
        self.inner.allocated.get()
    }

    /// Buffers in the pool, ready to be taken without allocating.
    pub fn free(&self) -> usize {
        self.inner.free.borrow().len()
    }
}

/// A buffer of a [`BufPool`]; it returns to the pool when dropped.
pub struct PooledBuf {
    /// `Some` until dropped.
    buf: Option<FixableBuf>,
    pool: Rc<PoolInner>,
}

impl PooledBuf {
    fn aligned(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until dropped").buf()
    }

    /// The whole buffer, whatever `len()` is.
    pub fn capacity(&self) -> usize {
        self.pool.buffer_bytes
    }

    /// Sets how much of the buffer is used (written to the device), at most `capacity()`.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.pool.buffer_bytes);
        self.buf.as_mut().expect("present until dropped").buf_mut().set_len(len);
    }

    pub fn len(&self) -> usize {
        self.aligned().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        self.aligned().as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf
            .as_mut()
            .expect("present until dropped")
            .buf_mut()
            .as_mut_slice()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut free = self.pool.free.borrow_mut();
            assert!(
                free.len() < self.pool.buffers_max,
                "more buffers returned than allocated"
            );
            free.push(buf);
        }
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

// SAFETY: the bytes are the heap allocation of the inner `AlignedBuf`, which the value owns until
// it is dropped; moving the value does not move them. `fixable` is that same allocation.
unsafe impl RingBuf for PooledBuf {
    fn as_ptr(&self) -> *const u8 {
        RingBuf::as_ptr(self.aligned())
    }
    fn len(&self) -> usize {
        self.aligned().len()
    }
    fn fixable(&self) -> Option<&FixableBuf> {
        self.buf.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufPool::new(5000, 2);
        assert_eq!(pool.buffer_bytes(), 8192);
        let mut a = pool.take().expect("first");
        assert_eq!(a.len(), 8192);
        assert_eq!(a.as_slice().as_ptr() as usize % BLOCK_BYTES as usize, 0);
        a.as_mut_slice()[0] = 7;
        let a_ptr = a.as_slice().as_ptr();
        let b = pool.take().expect("second");
        assert!(pool.take().is_none(), "the bound holds");
        drop(a);
        assert_eq!(pool.free(), 1);
        let c = pool.take().expect("reused");
        assert_eq!(c.as_slice().as_ptr(), a_ptr, "the same memory comes back");
        assert_eq!(c.len(), 8192, "the length is reset");
        assert_eq!(c.as_slice()[0], 7, "a reused buffer is not cleared");
        assert_eq!(pool.allocated(), 2);
        drop((b, c));
        assert_eq!(pool.free(), 2);
    }
}
