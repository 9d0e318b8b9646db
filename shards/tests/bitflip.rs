//! Random bit flips in a segment: damage in the middle of the log is a typed `Corruption` at the
//! damaged commit, damage in the tail is cut off as a torn write, and nothing panics.
//!
//! Without the clean-shutdown checkpoint (as after a crash) the last two commits may be a torn
//! write and are cut; with it, every commit was durable at the shutdown, so damage to any of
//! them is `Corruption` too, never a cut.

mod common;

use std::rc::Rc;

use common::*;
use proptest::prelude::*;
use shards::format::{BLOCK_BYTES, COMMIT_HEADER_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use shards::storage::mem::MemStorage;
use shards::storage::Storage;
use shards::{AckLevel, Durability, Lsn, Shard, ShardError, ShardOptions};

const COMMITS: u64 = 12;

fn len_of(i: u64) -> usize {
    10 + (i as usize * 131) % 600
}

#[derive(Debug)]
enum Outcome {
    Opened {
        next_lsn: Lsn,
        records: usize,
    },
    Corruption {
        offset: u64,
    },
    // Printed through Debug when an assertion fails.
    #[allow(dead_code)]
    Other(String),
}

fn flip_and_open(byte: u64, bit: u8, keep_checkpoint: bool) -> (Vec<u64>, Outcome) {
    let (tx, rx) = std::sync::mpsc::channel();
    run(move || async move {
        let mem = MemStorage::new();
        let opts = ShardOptions {
            segment_bytes: 256 << 10,
            ..small_opts(Durability::Linked)
        };
        let shard = open_mem(&mem, opts.clone()).await;
        let mut offsets = vec![BLOCK_BYTES];
        for i in 0..COMMITS {
            let p = payload(i, len_of(i));
            shard.append(1, &[rec(&p)], AckLevel::Durable).await.unwrap();
            let last = *offsets.last().unwrap();
            offsets.push(last + (COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES + p.len()) as u64);
        }
        shard.close().await.unwrap();
        if !keep_checkpoint {
            Storage::remove(&mem, "checkpoint")
                .await
                .expect("a clean close leaves a checkpoint");
        }
        let wal: Vec<String> = mem.file_names().into_iter().filter(|n| n.ends_with(".wal")).collect();
        assert_eq!(wal.len(), 1);
        let end = *offsets.last().unwrap();
        mem.flip_bit(&wal[0], byte % (end + 64), bit);
        let outcome = match Shard::open_with_storage(Rc::new(mem.clone()), opts).await {
            Ok(shard) => {
                let mut n = 0;
                let mut from = Lsn(1);
                loop {
                    let b = shard.read(from, 1 << 20, None).await.unwrap();
                    if b.records.is_empty() {
                        break;
                    }
                    for r in &b.records {
                        assert_eq!(r.payload, payload(r.lsn.0 - 1, len_of(r.lsn.0 - 1)));
                    }
                    n += b.records.len();
                    from = b.next_lsn;
                }
                let next_lsn = shard.next_lsn();
                shard.close().await.unwrap();
                Outcome::Opened { next_lsn, records: n }
            }
            Err(ShardError::Corruption { offset, .. }) => Outcome::Corruption { offset },
            Err(e) => Outcome::Other(e.to_string()),
        };
        tx.send((offsets, outcome)).unwrap();
    });
    rx.recv().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn bit_flips_are_typed_corruption_in_the_middle_and_truncated_at_the_tail(
        byte in 0u64..1_000_000, bit in 0u8..8, keep_checkpoint: bool
    ) {
        let (offsets, outcome) = flip_and_open(byte, bit, keep_checkpoint);
        let end = *offsets.last().unwrap();
        let at = byte % (end + 64);
        if at < SEGMENT_HEADER_BYTES as u64 {
            prop_assert!(matches!(outcome, Outcome::Corruption { offset: 0 }), "{at}: {outcome:?}");
        } else if at < BLOCK_BYTES || at >= end {
            // Header padding is not read; a flip past the end is cut off as a torn tail.
            prop_assert!(matches!(outcome, Outcome::Opened { next_lsn: Lsn(n), records } if n == COMMITS + 1 && records as u64 == COMMITS), "{at}: {outcome:?}");
        } else {
            let i = offsets.iter().rposition(|&o| o <= at).unwrap() as u64;
            if i + 2 < COMMITS || keep_checkpoint {
                // At least two valid commits follow: more than a torn write can leave.
                prop_assert!(matches!(outcome, Outcome::Corruption { offset } if offset == offsets[i as usize]), "commit {i} at {at}: {outcome:?}");
            } else {
                prop_assert!(matches!(outcome, Outcome::Opened { next_lsn: Lsn(n), records } if n == i + 1 && records as u64 == i), "commit {i} at {at}: {outcome:?}");
            }
        }
    }
}
