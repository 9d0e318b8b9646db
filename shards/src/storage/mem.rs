//! An in-memory storage double for tests: a live and a durable image per file, power-loss
//! simulation that tears unsynced writes at sector granularity, named fault points, counters,
//! and a checker that no two writes touching the same block are ever in flight together.
//!
//! ```text
//! live image     what reads see: every completed write
//! durable image  what survives `crash`: writes covered by a completed sync (or O_DSYNC-style
//!                writes when the file was opened with Durability::Dsync)
//! crash(seed)    a new storage whose files hold the durable image plus, for every sector touched
//!                by an unsynced write, a random choice of: any unsynced version, the durable
//!                version, or zeros (zeros only if the durable sector is all zero: sector writes
//!                are atomic, so an overwrite of durable data leaves old or new bytes). Of the namespace operations (create, rename, remove) since
//!                the last sync_dir, a random prefix survives.
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::SystemTime;

use rand::{Rng, SeedableRng};

use super::{AlignedBuf, IoBuf, LocalBoxFuture, OnWritten, SegmentFile, Storage};
use crate::format::BLOCK_BYTES;
use crate::Durability;

/// Granularity at which a crash tears a write.
pub const SECTOR_BYTES: usize = 512;

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Creating a file.
    Create,
    /// A plain (non-commit) write, e.g. zero-filling a new segment.
    Write,
    /// A plain fdatasync.
    Sync,
    /// The write of a commit.
    CommitWrite,
    /// The fdatasync of a commit (linked mode).
    CommitSync,
    Rename,
    Remove,
    SyncDir,
    Read,
}

#[derive(Debug, Clone)]
struct Fault {
    point: FaultPoint,
    errno: i32,
    /// Operations at this point that pass before the fault fires.
    skip: u64,
    /// How many times it fires; `None` = until cleared.
    times: Option<u64>,
}

/// Counters of operations seen by the storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStats {
    pub writes: u64,
    pub commits: u64,
    /// fdatasyncs, including the sync half of linked commits.
    pub syncs: u64,
    /// Commits made durable by a single O_DSYNC-style write.
    pub dsync_commits: u64,
    pub bytes_written: u64,
    pub sync_dirs: u64,
    /// Writes that started while another write touching one of the same blocks was in flight.
    pub overlap_violations: u64,
    /// Writes whose first block is the last, partially filled block of the previous write.
    pub tail_rewrites: u64,
    pub max_writes_in_flight: u64,
    /// fdatasyncs issued as the second half of linked commits.
    pub commit_syncs: u64,
    pub creates: u64,
    /// Of which segment files (`.prep` or `.wal`), not summaries or manifests.
    pub segment_creates: u64,
    /// Most commits between submission and completion at once.
    pub max_commits_in_flight: u64,
    /// Files given blocks with `allocate` (preallocated segments), and the bytes it added.
    pub allocates: u64,
    pub bytes_allocated: u64,
}

struct WriteRecord {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

struct MemFile {
    id: u64,
    durability: Durability,
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Completed writes not yet covered by a sync, oldest first.
    unsynced: Vec<WriteRecord>,
    /// Block range of the previous write, to count tail rewrites.
    last_write_end: Option<u64>,
    modified: SystemTime,
}

enum NsOp {
    Create(String, Rc<RefCell<MemFile>>),
    Rename(String, String),
    Remove(String),
}

#[derive(Default)]
struct MemFs {
    files: BTreeMap<String, Rc<RefCell<MemFile>>>,
    durable_names: BTreeMap<String, Rc<RefCell<MemFile>>>,
    ns_log: Vec<NsOp>,
    faults: Vec<Fault>,
    stats: MemStats,
    next_file_id: u64,
    next_write_seq: u64,
    write_yields: u32,
    sync_yields: u32,
    /// When set, each sync yields a random number of times up to `sync_yields`.
    jitter: Option<rand::rngs::StdRng>,
    commits_in_flight: u64,
    /// (file id, first block, end block) of writes in flight.
    in_flight: Vec<(u64, u64, u64)>,
}

/// The in-memory storage. Cloning shares the same files.
#[derive(Clone, Default)]
pub struct MemStorage {
    fs: Rc<RefCell<MemFs>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl MemFs {
    fn check_fault(&mut self, point: FaultPoint) -> io::Result<()> {
        let mut fire = None;
        for f in self.faults.iter_mut().filter(|f| f.point == point) {
            if f.skip > 0 {
                f.skip -= 1;
                continue;
            }
            if f.times == Some(0) {
                continue;
            }
            if let Some(t) = f.times.as_mut() {
                *t -= 1;
            }
            fire = Some(f.errno);
            break;
        }
        match fire {
            Some(e) => Err(errno(e)),
            None => Ok(()),
        }
    }
}

impl MemFile {
    fn apply(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[offset as usize..end].copy_from_slice(data);
    }

    /// Makes every unsynced write with `seq <= upto` durable.
    fn sync_upto(&mut self, upto: u64) {
        let mut keep = Vec::new();
        for w in self.unsynced.drain(..) {
            if w.seq <= upto {
                Self::apply(&mut self.durable, w.offset, &w.data);
            } else {
                keep.push(w);
            }
        }
        self.unsynced = keep;
    }
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Injects `errno` at `point`, after `skip` operations at that point pass, `times` times
    /// (`None`: until [`MemStorage::clear_faults`]).
    pub fn inject(&self, point: FaultPoint, errno: i32, skip: u64, times: Option<u64>) {
        self.fs.borrow_mut().faults.push(Fault {
            point,
            errno,
            skip,
            times,
        });
    }

    pub fn clear_faults(&self) {
        self.fs.borrow_mut().faults.clear();
    }

    /// Every write and sync yields to the executor this many times before it completes, so that
    /// other tasks run while it is "in flight".
    pub fn set_io_yields(&self, write_yields: u32, sync_yields: u32) {
        let mut fs = self.fs.borrow_mut();
        fs.write_yields = write_yields;
        fs.sync_yields = sync_yields;
    }

    /// Makes each sync yield a random number of times, up to the `sync_yields` given to
    /// [`MemStorage::set_io_yields`], so that syncs complete out of submission order.
    pub fn set_sync_jitter(&self, seed: u64) {
        self.fs.borrow_mut().jitter = Some(rand::rngs::StdRng::seed_from_u64(seed));
    }

    pub fn stats(&self) -> MemStats {
        self.fs.borrow().stats.clone()
    }

    pub fn file_names(&self) -> Vec<String> {
        self.fs.borrow().files.keys().cloned().collect()
    }

    /// The live contents of a file.
    pub fn live_image(&self, name: &str) -> Option<Vec<u8>> {
        self.fs.borrow().files.get(name).map(|f| f.borrow().live.clone())
    }

    /// Flips one bit of a file in both images (simulated media corruption).
    pub fn flip_bit(&self, name: &str, byte: u64, bit: u8) {
        let fs = self.fs.borrow();
        let mut f = fs.files.get(name).expect("file exists").borrow_mut();
        let mask = 1u8 << (bit % 8);
        if let Some(b) = f.live.get_mut(byte as usize) {
            *b ^= mask;
        }
        if let Some(b) = f.durable.get_mut(byte as usize) {
            *b ^= mask;
        }
    }

    /// Overwrites bytes of a file in both images.
    pub fn overwrite(&self, name: &str, offset: u64, data: &[u8]) {
        let fs = self.fs.borrow();
        let mut f = fs.files.get(name).expect("file exists").borrow_mut();
        MemFile::apply(&mut f.live, offset, data);
        MemFile::apply(&mut f.durable, offset, data);
    }

    /// Simulates a power loss: returns a new, independent storage holding what a disk could
    /// contain after it, chosen deterministically from `seed`. This storage is left unchanged.
    pub fn crash(&self, seed: u64) -> MemStorage {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let fs = self.fs.borrow();
        let mut names = fs.durable_names.clone();
        let keep_ops = rng.gen_range(0..=fs.ns_log.len());
        for op in &fs.ns_log[..keep_ops] {
            match op {
                NsOp::Create(name, file) => {
                    names.insert(name.clone(), file.clone());
                }
                NsOp::Rename(from, to) => {
                    if let Some(file) = names.remove(from) {
                        names.insert(to.clone(), file);
                    }
                }
                NsOp::Remove(name) => {
                    names.remove(name);
                }
            }
        }
        let mut out = MemFs::default();
        // Files are torn once each even if several names survive for them.
        let mut torn: BTreeMap<u64, Rc<RefCell<MemFile>>> = BTreeMap::new();
        for (name, file) in names {
            let f = file.borrow();
            let image = torn
                .entry(f.id)
                .or_insert_with(|| {
                    let mut image = f.durable.clone();
                    let end = f
                        .unsynced
                        .iter()
                        .map(|w| w.offset as usize + w.data.len())
                        .max()
                        .unwrap_or(0);
                    if image.len() < end {
                        image.resize(end, 0);
                    }
                    let mut sector = 0usize;
                    while sector * SECTOR_BYTES < end {
                        let lo = sector * SECTOR_BYTES;
                        let hi = lo + SECTOR_BYTES;
                        let versions: Vec<&WriteRecord> = f
                            .unsynced
                            .iter()
                            .filter(|w| (w.offset as usize) <= lo && lo < w.offset as usize + w.data.len())
                            .collect();
                        if !versions.is_empty() {
                            // 0 = keep durable, 1 = zeros, 2.. = one of the unsynced versions.
                            // Zeros only where nothing was durably written: a device writes a
                            // sector atomically, so an interrupted overwrite of durable data
                            // leaves the old or the new sector, while a write into space never
                            // durably written may also come back as zeros (an unwritten extent).
                            let was_written = image[lo..hi.min(image.len())].iter().any(|&b| b != 0);
                            let pick = loop {
                                let pick = rng.gen_range(0..versions.len() + 2);
                                if pick != 1 || !was_written {
                                    break pick;
                                }
                            };
                            if pick == 1 {
                                let n = image.len();
                                image[lo..hi.min(n)].fill(0);
                            } else if pick >= 2 {
                                let w = versions[pick - 2];
                                let from = lo - w.offset as usize;
                                let n = (hi - lo).min(w.data.len() - from);
                                image[lo..lo + n].copy_from_slice(&w.data[from..from + n]);
                            }
                        }
                        sector += 1;
                    }
                    out.next_file_id += 1;
                    Rc::new(RefCell::new(MemFile {
                        id: out.next_file_id,
                        durability: f.durability,
                        live: image.clone(),
                        durable: image,
                        unsynced: Vec::new(),
                        last_write_end: None,
                        modified: f.modified,
                    }))
                })
                .clone();
            out.files.insert(name.clone(), image.clone());
            out.durable_names.insert(name, image);
        }
        MemStorage {
            fs: Rc::new(RefCell::new(out)),
        }
    }
}

async fn yield_times(n: u32) {
    for _ in 0..n {
        futures_lite::future::yield_now().await;
    }
}

impl Storage for MemStorage {
    fn list(&self) -> LocalBoxFuture<io::Result<Vec<String>>> {
        let names = self.file_names();
        Box::pin(async move { Ok(names) })
    }

    fn open(
        &self,
        name: &str,
        create: bool,
        durability: Durability,
    ) -> LocalBoxFuture<io::Result<Rc<dyn SegmentFile>>> {
        let result = (|| {
            let mut fs = self.fs.borrow_mut();
            let existing = fs.files.get(name).cloned();
            let file = match existing {
                Some(f) => {
                    f.borrow_mut().durability = durability;
                    f
                }
                None if create => {
                    fs.check_fault(FaultPoint::Create)?;
                    fs.stats.creates += 1;
                    if name.ends_with(".prep") || name.ends_with(".wal") {
                        fs.stats.segment_creates += 1;
                    }
                    fs.next_file_id += 1;
                    let f = Rc::new(RefCell::new(MemFile {
                        id: fs.next_file_id,
                        durability,
                        live: Vec::new(),
                        durable: Vec::new(),
                        unsynced: Vec::new(),
                        last_write_end: None,
                        modified: SystemTime::now(),
                    }));
                    fs.files.insert(name.to_string(), f.clone());
                    fs.ns_log.push(NsOp::Create(name.to_string(), f.clone()));
                    f
                }
                None => return Err(errno(libc::ENOENT)),
            };
            let seg: Rc<dyn SegmentFile> = Rc::new(MemSegment {
                fs: self.fs.clone(),
                file,
            });
            Ok(seg)
        })();
        Box::pin(async move { result })
    }

    fn rename(&self, from: &str, to: &str) -> LocalBoxFuture<io::Result<()>> {
        let result = (|| {
            let mut fs = self.fs.borrow_mut();
            fs.check_fault(FaultPoint::Rename)?;
            let file = fs.files.remove(from).ok_or_else(|| errno(libc::ENOENT))?;
            fs.files.insert(to.to_string(), file);
            fs.ns_log.push(NsOp::Rename(from.to_string(), to.to_string()));
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn remove(&self, name: &str) -> LocalBoxFuture<io::Result<()>> {
        let result = (|| {
            let mut fs = self.fs.borrow_mut();
            fs.check_fault(FaultPoint::Remove)?;
            fs.files.remove(name).ok_or_else(|| errno(libc::ENOENT))?;
            fs.ns_log.push(NsOp::Remove(name.to_string()));
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn sync_dir(&self) -> LocalBoxFuture<io::Result<()>> {
        let result = (|| {
            let mut fs = self.fs.borrow_mut();
            fs.check_fault(FaultPoint::SyncDir)?;
            fs.stats.sync_dirs += 1;
            fs.durable_names = fs.files.clone();
            fs.ns_log.clear();
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn alloc(&self, len: usize) -> IoBuf {
        IoBuf::Heap(AlignedBuf::new(len))
    }

    fn modified(&self, name: &str) -> Option<SystemTime> {
        self.fs.borrow().files.get(name).map(|f| f.borrow().modified)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from("mem").join(name)
    }
}

struct MemSegment {
    fs: Rc<RefCell<MemFs>>,
    file: Rc<RefCell<MemFile>>,
}

/// Performs one write: checks the fault point, marks its blocks in flight (counting overlaps),
/// yields, applies it to the live image, and returns its sequence number.
async fn do_write(
    fs: &Rc<RefCell<MemFs>>,
    file: &Rc<RefCell<MemFile>>,
    point: FaultPoint,
    offset: u64,
    buf: IoBuf,
) -> io::Result<u64> {
    assert_eq!(offset % BLOCK_BYTES, 0, "write offset must be block aligned");
    assert_eq!(buf.len() as u64 % BLOCK_BYTES, 0, "write length must be whole blocks");
    let id = file.borrow().id;
    let first = offset / BLOCK_BYTES;
    let end = first + buf.len() as u64 / BLOCK_BYTES;
    let yields = {
        let mut fs = fs.borrow_mut();
        fs.check_fault(point)?;
        let overlaps = fs.in_flight.iter().any(|&(f, a, b)| f == id && a < end && first < b);
        if overlaps {
            fs.stats.overlap_violations += 1;
        }
        fs.in_flight.push((id, first, end));
        fs.stats.max_writes_in_flight = fs.stats.max_writes_in_flight.max(fs.in_flight.len() as u64);
        fs.write_yields
    };
    yield_times(yields).await;
    let mut fs = fs.borrow_mut();
    let pos = fs
        .in_flight
        .iter()
        .position(|&e| e == (id, first, end))
        .expect("write registered");
    fs.in_flight.swap_remove(pos);
    fs.next_write_seq += 1;
    let seq = fs.next_write_seq;
    fs.stats.writes += 1;
    fs.stats.bytes_written += buf.len() as u64;
    let mut f = file.borrow_mut();
    // The storage does not know where the data in a write ends, so count a tail rewrite when a
    // write starts at the block the previous write ended in.
    if let Some(prev_last_byte) = f.last_write_end {
        if offset == prev_last_byte - prev_last_byte % BLOCK_BYTES {
            fs.stats.tail_rewrites += 1;
        }
    }
    f.last_write_end = Some(offset + buf.len() as u64 - 1);
    MemFile::apply(&mut f.live, offset, buf.as_slice());
    f.modified = SystemTime::now();
    if f.durability == Durability::Dsync {
        MemFile::apply(&mut f.durable, offset, buf.as_slice());
        // An O_DSYNC write of this file also covers its earlier writes here: in Dsync mode every
        // write of the file is O_DSYNC, so there are none outstanding.
        f.sync_upto(seq);
    } else {
        f.unsynced.push(WriteRecord {
            seq,
            offset,
            data: buf.as_slice().to_vec(),
        });
    }
    Ok(seq)
}

async fn do_sync(fs: &Rc<RefCell<MemFs>>, file: &Rc<RefCell<MemFile>>, point: FaultPoint) -> io::Result<()> {
    let (upto, yields) = {
        let mut fs = fs.borrow_mut();
        fs.check_fault(point)?;
        let max = fs.sync_yields;
        let yields = match fs.jitter.as_mut() {
            Some(rng) => rng.gen_range(0..=max),
            None => max,
        };
        (fs.next_write_seq, yields)
    };
    yield_times(yields).await;
    {
        let mut fs = fs.borrow_mut();
        fs.stats.syncs += 1;
        if point == FaultPoint::CommitSync {
            fs.stats.commit_syncs += 1;
        }
    }
    file.borrow_mut().sync_upto(upto);
    Ok(())
}

impl SegmentFile for MemSegment {
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>> {
        let result = (|| {
            self.fs.borrow_mut().check_fault(FaultPoint::Read)?;
            let f = self.file.borrow();
            let start = (offset as usize).min(f.live.len());
            let end = (offset as usize + len).min(f.live.len());
            Ok(f.live[start..end].to_vec())
        })();
        Box::pin(async move { result })
    }

    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        Box::pin(async move {
            do_write(&fs, &file, FaultPoint::Write, offset, buf).await?;
            Ok(())
        })
    }

    fn sync(&self) -> LocalBoxFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        Box::pin(async move { do_sync(&fs, &file, FaultPoint::Sync).await })
    }

    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        Box::pin(async move {
            {
                let mut fs = fs.borrow_mut();
                fs.stats.commits += 1;
                fs.commits_in_flight += 1;
                fs.stats.max_commits_in_flight = fs.stats.max_commits_in_flight.max(fs.commits_in_flight);
            }
            let result = async {
                do_write(&fs, &file, FaultPoint::CommitWrite, offset, buf).await?;
                on_written();
                if file.borrow().durability == Durability::Dsync {
                    fs.borrow_mut().stats.dsync_commits += 1;
                    return Ok(());
                }
                do_sync(&fs, &file, FaultPoint::CommitSync).await
            }
            .await;
            fs.borrow_mut().commits_in_flight -= 1;
            result
        })
    }

    fn size(&self) -> LocalBoxFuture<io::Result<u64>> {
        let len = self.file.borrow().live.len() as u64;
        Box::pin(async move { Ok(len) })
    }

    fn allocate(&self, len: u64) -> LocalBoxFuture<io::Result<()>> {
        // Modelled as a write of zeros past the current end that is durable once synced (a
        // power loss before that may leave the file short, as it may a real one); it is not
        // counted as written bytes.
        let result = (|| {
            let mut fs = self.fs.borrow_mut();
            fs.check_fault(FaultPoint::Write)?;
            let mut f = self.file.borrow_mut();
            let from = f.live.len() as u64;
            fs.stats.allocates += 1;
            if len > from {
                fs.stats.bytes_allocated += len - from;
                fs.next_write_seq += 1;
                let seq = fs.next_write_seq;
                let zeros = vec![0u8; (len - from) as usize];
                MemFile::apply(&mut f.live, from, &zeros);
                f.unsynced.push(WriteRecord {
                    seq,
                    offset: from,
                    data: zeros,
                });
                f.modified = SystemTime::now();
            }
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn close(&self) -> LocalBoxFuture<io::Result<()>> {
        Box::pin(async move { Ok(()) })
    }
}
