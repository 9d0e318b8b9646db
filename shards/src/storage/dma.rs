//! Real files through glommio direct I/O.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::SystemTime;

use std::os::fd::AsRawFd;

use glommio::io::{DmaFile, OpenOptions};

use super::{IoBuf, LocalBoxFuture, OnWritten, SegmentFile, Storage};
use crate::format::BLOCK_BYTES;
use crate::uring::{FixableBuf, LinkedRing};
use crate::Durability;

/// Submission entries of the private ring: two per commit, and at most two commits in flight.
const LINKED_RING_ENTRIES: u32 = 16;

/// Name of the small data-bearing file opened before any segment.
///
/// Why: when glommio opens its first `DmaFile` on an executor it probes polled-I/O support by
/// reading offset 0. On an empty or fallocated file that read never reaches the device, the probe
/// wrongly passes, and every later write of the executor goes to a busy-polling ring at about
/// 4 ms per commit. Opening a file with real data at offset 0 first makes the probe see the device.
pub const SENTINEL_FILE: &str = "sentinel";

pub struct DmaStorage {
    dir: PathBuf,
    /// Kept open for the life of the storage; also the allocator of DMA buffers.
    sentinel: Rc<DmaFile>,
    /// The private ring every commit is submitted on: a write linked to an fdatasync
    /// (`Durability::Linked`) or one `RWF_DSYNC` write to a file opened with `O_DSYNC`
    /// (`Durability::Dsync`). glommio's own writes take only its `DmaBuffer`s, so a commit written
    /// straight from a pooled buffer goes through this ring in both modes.
    ring: Rc<LinkedRing>,
}

impl DmaStorage {
    /// Opens the shard directory, creating it and its sentinel file if needed. Must be the first
    /// `DmaFile` this executor opens for the polled-ring workaround to work. It also sets up the
    /// private commit ring; its completion reaper runs in the caller's task queue, which should be
    /// the latency-sensitive one. Both durability modes commit through the ring, so the mode the
    /// segments will use (given to [`Storage::open`]) does not matter here.
    pub async fn open(dir: impl AsRef<Path>, _durability: Durability) -> io::Result<DmaStorage> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(SENTINEL_FILE);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < BLOCK_BYTES {
            // Written through the page cache with ordinary syscalls, so the data is really at
            // offset 0 before glommio's first direct open probes it.
            let mut block = vec![0u8; BLOCK_BYTES as usize];
            block[..16].copy_from_slice(b"shardlog sentinl");
            std::fs::write(&path, &block)?;
            std::fs::File::open(&path)?.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()?;
        }
        let sentinel = DmaFile::open(&path).await?;
        // Read it so the probe, not a cached verdict, decides, and so a broken sentinel is loud.
        let read = sentinel.read_at_aligned(0, BLOCK_BYTES as usize).await?;
        if read.len() != BLOCK_BYTES as usize {
            return Err(io::Error::other(format!(
                "{} is shorter than one block",
                path.display()
            )));
        }
        let ring = LinkedRing::new(LINKED_RING_ENTRIES)?;
        Ok(DmaStorage {
            dir,
            sentinel: Rc::new(sentinel),
            ring,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Storage for DmaStorage {
    fn list(&self) -> LocalBoxFuture<io::Result<Vec<String>>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
            Ok(names)
        })
    }

    fn open(
        &self,
        name: &str,
        create: bool,
        durability: Durability,
    ) -> LocalBoxFuture<io::Result<Rc<dyn SegmentFile>>> {
        let path = self.dir.join(name);
        let ring = self.ring.clone();
        Box::pin(async move {
            let mut opts = OpenOptions::new();
            opts.read(true).write(true).create(create);
            if durability == Durability::Dsync {
                opts.custom_flags(libc::O_DSYNC);
            }
            let file = opts.dma_open(&path).await?;
            let file: Rc<dyn SegmentFile> = Rc::new(DmaSegment {
                file: Rc::new(file),
                ring,
                durability,
            });
            Ok(file)
        })
    }

    fn rename(&self, from: &str, to: &str) -> LocalBoxFuture<io::Result<()>> {
        let result = std::fs::rename(self.dir.join(from), self.dir.join(to));
        Box::pin(async move { result })
    }

    fn remove(&self, name: &str) -> LocalBoxFuture<io::Result<()>> {
        let result = std::fs::remove_file(self.dir.join(name));
        Box::pin(async move { result })
    }

    fn sync_dir(&self) -> LocalBoxFuture<io::Result<()>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let d = glommio::io::Directory::open(&dir).await?;
            d.sync().await?;
            d.close().await?;
            Ok(())
        })
    }

    fn alloc(&self, len: usize) -> IoBuf {
        assert_eq!(len as u64 % BLOCK_BYTES, 0);
        let mut buf = self.sentinel.alloc_dma_buffer(len);
        buf.as_bytes_mut().fill(0);
        IoBuf::Dma(buf)
    }

    fn modified(&self, name: &str) -> Option<SystemTime> {
        std::fs::metadata(self.dir.join(name)).and_then(|m| m.modified()).ok()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

struct DmaSegment {
    file: Rc<DmaFile>,
    ring: Rc<LinkedRing>,
    /// `Dsync`: the file was opened with `O_DSYNC`.
    durability: Durability,
}

fn into_dma(file: &DmaFile, buf: IoBuf) -> glommio::io::DmaBuffer {
    match buf {
        IoBuf::Dma(b) => b,
        IoBuf::Heap(h) => copy_to_dma(file, h.as_slice()),
        IoBuf::Pooled(p) => copy_to_dma(file, p.as_slice()),
        IoBuf::SharedHeap(h) => copy_to_dma(file, h.as_slice()),
        IoBuf::SharedDma(b) => copy_to_dma(file, b.as_bytes()),
    }
}

fn copy_to_dma(file: &DmaFile, bytes: &[u8]) -> glommio::io::DmaBuffer {
    let mut b = file.alloc_dma_buffer(bytes.len());
    b.as_bytes_mut().copy_from_slice(bytes);
    b
}

async fn write_all(file: &DmaFile, offset: u64, buf: IoBuf) -> io::Result<()> {
    let len = buf.len();
    assert_eq!(offset % BLOCK_BYTES, 0);
    assert_eq!(len as u64 % BLOCK_BYTES, 0);
    let written = match buf {
        // Written as is: glommio keeps its own reference until the write completes.
        IoBuf::SharedDma(b) => file.write_rc_at(b, offset).await?,
        buf => file.write_at(into_dma(file, buf), offset).await?,
    };
    if written != len {
        // A short direct write to preallocated space means something is wrong underneath; the
        // data cannot be assumed to be there.
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write: {written} of {len} bytes at offset {offset}"),
        ));
    }
    Ok(())
}

impl SegmentFile for DmaSegment {
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>> {
        let file = self.file.clone();
        Box::pin(async move {
            assert_eq!(offset % BLOCK_BYTES, 0);
            let read = file.read_at_aligned(offset, len).await?;
            Ok(read.to_vec())
        })
    }

    fn read_into(&self, offset: u64, buf: FixableBuf) -> LocalBoxFuture<(io::Result<usize>, FixableBuf)> {
        let file = self.file.clone();
        let ring = self.ring.clone();
        Box::pin(async move {
            assert_eq!(offset % BLOCK_BYTES, 0);
            assert_eq!(buf.buf().len() as u64 % BLOCK_BYTES, 0);
            // Straight into the caller's buffer on the private ring, registered with it (see
            // `LinkedRing::read_fixed`): glommio's own reads allocate a fresh DMA buffer each,
            // and `read` then copies it into a Vec.
            let mut buf = buf;
            let len = buf.buf().len();
            let mut done = 0;
            while done < len {
                let (result, back) = ring.read_fixed(file.as_raw_fd(), buf, done, offset + done as u64).await;
                buf = back;
                match result {
                    Ok(0) => break,
                    // Direct reads end short only at the end of the file (or on a block boundary
                    // if interrupted); read on from there.
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return (Err(e), buf),
                }
                if done % BLOCK_BYTES as usize != 0 {
                    break;
                }
            }
            (Ok(done), buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>> {
        let file = self.file.clone();
        Box::pin(async move { write_all(&file, offset, buf).await })
    }

    fn sync(&self) -> LocalBoxFuture<io::Result<()>> {
        let file = self.file.clone();
        Box::pin(async move { Ok(file.fdatasync().await?) })
    }

    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>> {
        let file = self.file.clone();
        let ring = self.ring.clone();
        let durability = self.durability;
        Box::pin(async move {
            let len = buf.len();
            assert_eq!(offset % BLOCK_BYTES, 0);
            assert_eq!(len as u64 % BLOCK_BYTES, 0);
            // `file` (and so the fd) lives until every completion is in. The ring owns `buf` until
            // the kernel is done with it, even if this future is dropped first.
            match durability {
                // One write, durable when it completes: `RWF_DSYNC` on a file that is also opened
                // with `O_DSYNC`. The block layer issues the flush (FUA where the device has it).
                Durability::Dsync => {
                    let (result, buf) = ring.write_dsync(file.as_raw_fd(), buf, offset).await;
                    // Back to the pool before the shard learns of the completion.
                    drop(buf);
                    let written = result?;
                    assert_eq!(written, len, "the ring reports a short write as an error");
                    on_written();
                    Ok(())
                }
                // One submission: the write, linked to an fdatasync that the kernel starts only
                // after the write completed in full.
                Durability::Linked => {
                    let mut commit = ring.write_then_sync(file.as_raw_fd(), buf, offset);
                    commit.written().await?;
                    on_written();
                    let (result, buf) = commit.synced().await;
                    drop(buf);
                    result
                }
            }
        })
    }

    fn size(&self) -> LocalBoxFuture<io::Result<u64>> {
        let file = self.file.clone();
        Box::pin(async move { Ok(file.file_size().await?) })
    }

    fn allocate(&self, len: u64) -> LocalBoxFuture<io::Result<()>> {
        let file = self.file.clone();
        Box::pin(async move { Ok(file.pre_allocate(len, false).await?) })
    }

    fn close(&self) -> LocalBoxFuture<io::Result<()>> {
        let file = self.file.clone();
        Box::pin(async move {
            // Other holders (readers) may still have the file; it closes with the last of them.
            let _ = file.close_rc().await?;
            Ok(())
        })
    }
}
