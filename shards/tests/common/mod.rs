#![allow(dead_code)]

use std::future::Future;
use std::rc::Rc;

use shards::storage::mem::MemStorage;
use shards::{Durability, RecordRef, Shard, ShardOptions};

/// Runs `f` on a fresh executor set up as a shard's (`shards::executor::spawn`'s defaults).
pub fn run<G, F>(f: G)
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    shards::executor::run(shards::executor::ExecutorOptions::new("shard-test"), f).expect("executor ran");
}

/// A directory on the target's file system (ext4 here), not a possibly-tmpfs /tmp.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

/// Small segments so that tests rotate often.
pub fn small_opts(durability: Durability) -> ShardOptions {
    ShardOptions {
        segment_bytes: 64 << 10,
        commit_bytes_max: 16 << 10,
        durability,
        ..ShardOptions::default()
    }
}

pub async fn open_mem(mem: &MemStorage, opts: ShardOptions) -> Shard {
    Shard::open_with_storage(Rc::new(mem.clone()), opts)
        .await
        .expect("open shard on mem storage")
}

pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut p = format!("record-{i}-").into_bytes();
    while p.len() < len {
        p.push(b'a' + (i % 26) as u8);
    }
    p.truncate(len.max(1));
    p
}

pub fn rec(p: &[u8]) -> RecordRef<'_> {
    RecordRef {
        payload: p,
        timestamp: None,
    }
}

pub const BOTH: [Durability; 2] = [Durability::Dsync, Durability::Linked];
