//! The storage seam: every byte the engine reads or writes goes through [`Storage`] and
//! [`SegmentFile`]. Two implementations: [`dma::DmaStorage`] (glommio direct I/O on real files,
//! plus the private linked ring) and [`mem::MemStorage`] (an in-memory double with a live and a
//! durable image, crash simulation and fault injection).
//!
//! # Contract
//! - Offsets and lengths of `read`, `write` and `commit` are multiples of [`BLOCK_BYTES`].
//! - `write` makes bytes visible to later reads of the same storage, not durable.
//! - `sync` makes every `write` and `commit` that completed before it was called durable
//!   (fdatasync). It does not cover a file's name: that takes `sync_dir`.
//! - `commit` writes and makes that write durable. It calls `on_written` once the write has
//!   completed (the data is readable and the next write may be submitted), and resolves once the
//!   data is durable. An error from either phase means the data may or may not be durable and
//!   must not be acknowledged; the engine then poisons the shard and never retries.
//! - A file's size only grows by writes; files are never truncated.
//! - `create`, `rename` and `remove` become durable at the next `sync_dir`.
//! - All futures are `'static` and must be polled on the executor that owns the storage.
//! - A future that is dropped early may still have its I/O performed.
//! - `write` and `commit` own their buffer until the I/O is done and then drop it. A commit
//!   buffer is usually an [`IoBuf::Pooled`], which goes back to the shard's pool when dropped, so
//!   an implementation must not drop it while the device may still read it.

pub mod dma;
pub mod mem;
pub mod pool;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::time::SystemTime;

use crate::uring::{FixableBuf, RingBuf};
use crate::Durability;
pub use pool::{BufPool, PooledBuf};

pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T> + 'static>>;

/// Callback fired when a commit's write (not yet its sync) has completed.
pub type OnWritten = Box<dyn FnOnce()>;

pub trait Storage {
    /// Names of the files in the shard's directory.
    fn list(&self) -> LocalBoxFuture<io::Result<Vec<String>>>;
    /// Opens (and with `create`, creates) a segment file for reading and writing. `durability`
    /// selects how `commit` makes data durable.
    fn open(&self, name: &str, create: bool, durability: Durability)
        -> LocalBoxFuture<io::Result<Rc<dyn SegmentFile>>>;
    fn rename(&self, from: &str, to: &str) -> LocalBoxFuture<io::Result<()>>;
    fn remove(&self, name: &str) -> LocalBoxFuture<io::Result<()>>;
    fn sync_dir(&self) -> LocalBoxFuture<io::Result<()>>;
    /// An aligned, zeroed buffer suitable for this storage's writes.
    fn alloc(&self, len: usize) -> IoBuf;
    /// Last modification time of a file, for age-based retention of recovered segments.
    fn modified(&self, name: &str) -> Option<SystemTime>;
    /// A path naming the file in error messages.
    fn path_of(&self, name: &str) -> std::path::PathBuf;
}

pub trait SegmentFile {
    /// Reads up to `len` bytes at `offset`; fewer only at the end of the file.
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>>;
    /// Reads `buf.len()` bytes at `offset` into `buf` and hands it back with the number of bytes
    /// read: fewer only at the end of the file. For long sequential reads into buffers the
    /// caller reuses (recovery): no allocation and no copy per read, and a storage with an
    /// io_uring ring registers the buffer with it on its first read, so later reads into it do
    /// not pin its pages again. `offset` and `buf.len()` are multiples of
    /// [`BLOCK_BYTES`](crate::format::BLOCK_BYTES). The default copies from [`SegmentFile::read`].
    fn read_into(&self, offset: u64, mut buf: FixableBuf) -> LocalBoxFuture<(io::Result<usize>, FixableBuf)> {
        let read = self.read(offset, buf.buf().len());
        Box::pin(async move {
            match read.await {
                Ok(data) => {
                    buf.buf_mut().as_mut_slice()[..data.len()].copy_from_slice(&data);
                    (Ok(data.len()), buf)
                }
                Err(e) => (Err(e), buf),
            }
        })
    }
    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>>;
    fn sync(&self) -> LocalBoxFuture<io::Result<()>>;
    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>>;
    fn size(&self) -> LocalBoxFuture<io::Result<u64>>;
    /// Gives the file `len` bytes of allocated blocks that read as zeros, without writing them
    /// (`fallocate`): the device writes each byte of the segment once, by its commit, but making
    /// such a write durable also commits the file system's conversion of those blocks from
    /// unwritten to written. Durable after [`SegmentFile::sync`], like a write.
    fn allocate(&self, len: u64) -> LocalBoxFuture<io::Result<()>>;
    fn close(&self) -> LocalBoxFuture<io::Result<()>>;
}

/// A 4 KiB-aligned, zero-initialised heap buffer (the same type the private ring writes from).
pub use crate::uring::AlignedBuf;

/// A segment file opened on first use. Recovery hands one to every sealed segment it accepts
/// from the manifest, so a clean restart opens no sealed segment at all: a segment file is opened
/// by the first read, scrub or retention that touches it. Opening is serialised, so concurrent
/// first uses open the file once.
pub struct LazyFile {
    state: Rc<LazyState>,
}

struct LazyState {
    storage: Rc<dyn Storage>,
    name: String,
    durability: Durability,
    file: std::cell::RefCell<Option<Rc<dyn SegmentFile>>>,
    opening: glommio::sync::Semaphore,
}

impl LazyFile {
    pub fn new(storage: Rc<dyn Storage>, name: &str, durability: Durability) -> LazyFile {
        LazyFile {
            state: Rc::new(LazyState {
                storage,
                name: name.to_string(),
                durability,
                file: std::cell::RefCell::new(None),
                opening: glommio::sync::Semaphore::new(1),
            }),
        }
    }

    /// Whether the file has been opened yet.
    pub fn is_open(&self) -> bool {
        self.state.file.borrow().is_some()
    }
}

impl LazyState {
    async fn get(self: Rc<Self>) -> io::Result<Rc<dyn SegmentFile>> {
        if let Some(file) = self.file.borrow().clone() {
            return Ok(file);
        }
        let _permit = self
            .opening
            .acquire_permit(1)
            .await
            .map_err(|e| io::Error::other(format!("opening {}: {e}", self.name)))?;
        if let Some(file) = self.file.borrow().clone() {
            return Ok(file);
        }
        let file = self.storage.open(&self.name, false, self.durability).await?;
        *self.file.borrow_mut() = Some(file.clone());
        Ok(file)
    }
}

impl SegmentFile for LazyFile {
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>> {
        let state = self.state.clone();
        Box::pin(async move { state.get().await?.read(offset, len).await })
    }

    fn read_into(&self, offset: u64, buf: FixableBuf) -> LocalBoxFuture<(io::Result<usize>, FixableBuf)> {
        let state = self.state.clone();
        Box::pin(async move {
            match state.get().await {
                Ok(file) => file.read_into(offset, buf).await,
                Err(e) => (Err(e), buf),
            }
        })
    }

    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>> {
        let state = self.state.clone();
        Box::pin(async move { state.get().await?.write(offset, buf).await })
    }

    fn sync(&self) -> LocalBoxFuture<io::Result<()>> {
        let state = self.state.clone();
        Box::pin(async move { state.get().await?.sync().await })
    }

    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>> {
        let state = self.state.clone();
        Box::pin(async move { state.get().await?.commit(offset, buf, on_written).await })
    }

    fn size(&self) -> LocalBoxFuture<io::Result<u64>> {
        let state = self.state.clone();
        Box::pin(async move { state.get().await?.size().await })
    }

    fn allocate(&self, len: u64) -> LocalBoxFuture<io::Result<()>> {
        let state = self.state.clone();
        Box::pin(async move { state.get().await?.allocate(len).await })
    }

    fn close(&self) -> LocalBoxFuture<io::Result<()>> {
        // Never opened: nothing to close.
        let file = self.state.file.borrow().clone();
        Box::pin(async move {
            match file {
                Some(file) => file.close().await,
                None => Ok(()),
            }
        })
    }
}

/// A write buffer: glommio's DMA buffer for real files, a plain aligned buffer otherwise, or a
/// buffer of a [`BufPool`] (commits). The shared variants ([`IoBuf::into_shared`]) are read-only
/// and can be written many times without copying, e.g. one block of zeros for a whole segment.
pub enum IoBuf {
    Dma(glommio::io::DmaBuffer),
    Heap(AlignedBuf),
    Pooled(PooledBuf),
    SharedDma(Rc<glommio::io::DmaBuffer>),
    SharedHeap(Rc<AlignedBuf>),
}

impl IoBuf {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuf::Dma(b) => b.as_bytes(),
            IoBuf::Heap(b) => b.as_slice(),
            IoBuf::Pooled(b) => b.as_slice(),
            IoBuf::SharedDma(b) => b.as_bytes(),
            IoBuf::SharedHeap(b) => b.as_slice(),
        }
    }

    /// The bytes, to fill them. A shared buffer is read-only: fill it before sharing it.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        const SHARED: &str = "a shared buffer is read-only";
        match self {
            IoBuf::Dma(b) => b.as_bytes_mut(),
            IoBuf::Heap(b) => b.as_mut_slice(),
            IoBuf::Pooled(b) => b.as_mut_slice(),
            IoBuf::SharedDma(b) => Rc::get_mut(b).expect(SHARED).as_bytes_mut(),
            IoBuf::SharedHeap(b) => Rc::get_mut(b).expect(SHARED).as_mut_slice(),
        }
    }

    /// Makes the buffer shareable: [`IoBuf::share`] then gives more handles to the same bytes.
    /// A pooled buffer cannot be shared (it returns to its pool when dropped).
    pub fn into_shared(self) -> IoBuf {
        match self {
            IoBuf::Dma(b) => IoBuf::SharedDma(Rc::new(b)),
            IoBuf::Heap(b) => IoBuf::SharedHeap(Rc::new(b)),
            IoBuf::Pooled(_) => panic!("a pooled buffer cannot be shared"),
            shared => shared,
        }
    }

    /// Another handle to the bytes of a shared buffer.
    pub fn share(&self) -> IoBuf {
        match self {
            IoBuf::SharedDma(b) => IoBuf::SharedDma(b.clone()),
            IoBuf::SharedHeap(b) => IoBuf::SharedHeap(b.clone()),
            _ => panic!("only a buffer made shared with `into_shared` can be shared"),
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: every variant keeps its bytes in a heap allocation it owns (see each variant's own
// `RingBuf` implementation); moving the enum does not move them.
unsafe impl RingBuf for IoBuf {
    fn as_ptr(&self) -> *const u8 {
        match self {
            IoBuf::Dma(b) => RingBuf::as_ptr(b),
            IoBuf::Heap(b) => RingBuf::as_ptr(b),
            IoBuf::Pooled(b) => RingBuf::as_ptr(b),
            IoBuf::SharedDma(b) => RingBuf::as_ptr(&**b),
            IoBuf::SharedHeap(b) => RingBuf::as_ptr(&**b),
        }
    }
    fn len(&self) -> usize {
        IoBuf::len(self)
    }
    fn fixable(&self) -> Option<&crate::uring::FixableBuf> {
        match self {
            IoBuf::Pooled(b) => RingBuf::fixable(b),
            _ => None,
        }
    }
}
