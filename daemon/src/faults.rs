//! Test-only fault injection on one shard's storage, driven by the `SHARDLOG_FAULTS` environment
//! variable. Not a command-line flag on purpose: nobody should find it in `--help` and turn it on
//! in production.
//!
//! Syntax: a comma-separated list of `shard:<id>:<op>:<errno>[:after=<n>]`, where
//! - `op` is `commit` (the write that makes a commit durable: the O_DSYNC write, or the linked
//!   write + fdatasync), `write` (plain writes: segment preparation), or `sync` (fdatasync);
//! - `errno` is `eio` or `enospc`;
//! - `after=n` lets the first n operations of that kind succeed (default 0).
//!
//! Once a fault fires it keeps firing. Example: `SHARDLOG_FAULTS=shard:1:commit:eio:after=10`
//! makes shard 1 fail its eleventh commit, which poisons it; the other shards keep serving.

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::SystemTime;

use shards::storage::{IoBuf, LocalBoxFuture, OnWritten, SegmentFile, Storage};
use shards::Durability;

pub const FAULTS_ENV: &str = "SHARDLOG_FAULTS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Commit,
    Write,
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSpec {
    pub shard: u16,
    pub op: FaultOp,
    pub errno: i32,
    pub after: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad {FAULTS_ENV} entry {entry:?}: {reason}; expected shard:<id>:<commit|write|sync>:<eio|enospc>[:after=<n>]")]
pub struct FaultParseError {
    entry: String,
    reason: &'static str,
}

pub fn parse_faults(spec: &str) -> Result<Vec<FaultSpec>, FaultParseError> {
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |reason| FaultParseError {
            entry: entry.to_string(),
            reason,
        };
        let parts: Vec<&str> = entry.split(':').collect();
        if parts.len() < 4 || parts.len() > 5 || parts[0] != "shard" {
            return Err(bad("wrong shape"));
        }
        let shard = parts[1].parse().map_err(|_| bad("bad shard id"))?;
        let op = match parts[2] {
            "commit" | "fsync" => FaultOp::Commit,
            "write" => FaultOp::Write,
            "sync" => FaultOp::Sync,
            _ => return Err(bad("unknown operation")),
        };
        let errno = match parts[3] {
            "eio" => libc::EIO,
            "enospc" => libc::ENOSPC,
            _ => return Err(bad("unknown errno")),
        };
        let after = match parts.get(4) {
            None => 0,
            Some(a) => a
                .strip_prefix("after=")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| bad("bad after=<n>"))?,
        };
        out.push(FaultSpec {
            shard,
            op,
            errno,
            after,
        });
    }
    Ok(out)
}

struct Armed {
    spec: FaultSpec,
    passed: Cell<u64>,
}

impl Armed {
    fn check(&self, op: FaultOp) -> io::Result<()> {
        if self.spec.op != op {
            return Ok(());
        }
        if self.passed.get() < self.spec.after {
            self.passed.set(self.passed.get() + 1);
            return Ok(());
        }
        tracing::warn!(shard = self.spec.shard, ?op, errno = self.spec.errno, "injected fault");
        Err(io::Error::from_raw_os_error(self.spec.errno))
    }
}

/// A storage that fails chosen operations of the real one.
pub struct FaultyStorage {
    inner: Rc<dyn Storage>,
    faults: Rc<Vec<Armed>>,
}

impl FaultyStorage {
    pub fn new(inner: Rc<dyn Storage>, specs: Vec<FaultSpec>) -> FaultyStorage {
        let faults = specs
            .into_iter()
            .map(|spec| Armed {
                spec,
                passed: Cell::new(0),
            })
            .collect();
        FaultyStorage {
            inner,
            faults: Rc::new(faults),
        }
    }
}

fn check(faults: &[Armed], op: FaultOp) -> io::Result<()> {
    faults.iter().try_for_each(|f| f.check(op))
}

impl Storage for FaultyStorage {
    fn list(&self) -> LocalBoxFuture<io::Result<Vec<String>>> {
        self.inner.list()
    }

    fn open(
        &self,
        name: &str,
        create: bool,
        durability: Durability,
    ) -> LocalBoxFuture<io::Result<Rc<dyn SegmentFile>>> {
        let opened = self.inner.open(name, create, durability);
        let faults = self.faults.clone();
        Box::pin(async move {
            let inner = opened.await?;
            Ok(Rc::new(FaultyFile { inner, faults }) as Rc<dyn SegmentFile>)
        })
    }

    fn rename(&self, from: &str, to: &str) -> LocalBoxFuture<io::Result<()>> {
        self.inner.rename(from, to)
    }

    fn remove(&self, name: &str) -> LocalBoxFuture<io::Result<()>> {
        self.inner.remove(name)
    }

    fn sync_dir(&self) -> LocalBoxFuture<io::Result<()>> {
        self.inner.sync_dir()
    }

    fn alloc(&self, len: usize) -> IoBuf {
        self.inner.alloc(len)
    }

    fn modified(&self, name: &str) -> Option<SystemTime> {
        self.inner.modified(name)
    }

    fn path_of(&self, name: &str) -> std::path::PathBuf {
        self.inner.path_of(name)
    }
}

struct FaultyFile {
    inner: Rc<dyn SegmentFile>,
    faults: Rc<Vec<Armed>>,
}

impl SegmentFile for FaultyFile {
    fn read(&self, offset: u64, len: usize) -> LocalBoxFuture<io::Result<Vec<u8>>> {
        self.inner.read(offset, len)
    }

    fn write(&self, offset: u64, buf: IoBuf) -> LocalBoxFuture<io::Result<()>> {
        if let Err(e) = check(&self.faults, FaultOp::Write) {
            return Box::pin(async move { Err(e) });
        }
        self.inner.write(offset, buf)
    }

    fn sync(&self) -> LocalBoxFuture<io::Result<()>> {
        if let Err(e) = check(&self.faults, FaultOp::Sync) {
            return Box::pin(async move { Err(e) });
        }
        self.inner.sync()
    }

    fn commit(&self, offset: u64, buf: IoBuf, on_written: OnWritten) -> LocalBoxFuture<io::Result<()>> {
        if let Err(e) = check(&self.faults, FaultOp::Commit) {
            // Like a write the device refused: nothing reached it, and it does not count as
            // written either.
            return Box::pin(async move { Err(e) });
        }
        self.inner.commit(offset, buf, on_written)
    }

    fn size(&self) -> LocalBoxFuture<io::Result<u64>> {
        self.inner.size()
    }

    fn allocate(&self, len: u64) -> LocalBoxFuture<io::Result<()>> {
        // Preparing a segment either way writes to the disk: a fault armed for writes (a full
        // disk) refuses this too.
        if let Err(e) = check(&self.faults, FaultOp::Write) {
            return Box::pin(async move { Err(e) });
        }
        self.inner.allocate(len)
    }

    fn close(&self) -> LocalBoxFuture<io::Result<()>> {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let f = parse_faults("shard:1:fsync:eio, shard:0:write:enospc:after=3").unwrap();
        assert_eq!(
            f,
            vec![
                FaultSpec {
                    shard: 1,
                    op: FaultOp::Commit,
                    errno: libc::EIO,
                    after: 0
                },
                FaultSpec {
                    shard: 0,
                    op: FaultOp::Write,
                    errno: libc::ENOSPC,
                    after: 3
                },
            ]
        );
        assert!(parse_faults("shard:x:commit:eio").is_err());
        assert!(parse_faults("disk:1:commit:eio").is_err());
        assert!(parse_faults("shard:1:commit:eperm").is_err());
        assert!(parse_faults("shard:1:commit:eio:later").is_err());
        assert_eq!(parse_faults("").unwrap(), vec![]);
    }
}
