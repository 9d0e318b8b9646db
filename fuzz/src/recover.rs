//! The `recovery` property: a whole shard opened on arbitrary segment bytes.
//!
//! `segment_scanner` checks the parsing functions one by one; this drives the real path end to end.
//! The segment image of a [`segments::Plan`] is written as the only file of an in-memory storage
//! (`shards::storage::mem::MemStorage`), the shard is opened on it with `Shard::open_with_storage`
//! (which runs recovery), every durable record is read back, and the shard is closed. For any image:
//! - Nothing panics.
//! - If the open succeeds, the records served are exactly the records of the commit chain the
//!   format finds (same lsns, streams, timestamps, payloads), and nothing beyond it: **a record whose
//!   CRC does not match, or that follows a gap, is never served**.
//! - If the open succeeds, no valid commit is left behind the end of the log, so a later append
//!   cannot revive one; and the bytes of the chain are unchanged.
//! - If it fails, the error is `Corruption` and the image gives a reason: a header that is not
//!   valid for shard 0, or valid commits behind the end of the chain (damage in the middle rather
//!   than a torn tail). A torn tail with nothing valid behind it is always cut, never refused.
//!
//! Each input gets a fresh glommio executor on a thread of its own, as a shard core has. Reusing
//! one executor for thousands of shard opens made runs hang now and then (the executor parked
//! with the check's task still runnable); a fresh executor per input costs more but has not hung.

use std::rc::Rc;

use shards::format::{align_up, HeaderBlock, SegmentHeader, BLOCK_BYTES, SEGMENT_DATA_OFFSET};
use shards::storage::mem::MemStorage;
use shards::storage::Storage;
use shards::{Durability, Lsn, Shard, ShardError, ShardOptions};

use crate::segments::{self, spec, Plan};

/// Segment size the shard is opened with: well above the images libFuzzer produces (inputs of at
/// most 4 KiB by default, plus the header block), small so that the segment the background task
/// prepares on open costs little. Larger images are skipped: a file larger than a segment is not
/// what recovery is specified for.
const SEGMENT_BYTES: u64 = 64 << 10;
const COMMIT_BYTES_MAX: usize = 16 << 10;

/// Runs every check on one input. Panics when a property fails.
pub fn check(input: &[u8]) {
    let Some(plan) = Plan::parse(input) else {
        return;
    };
    let (mut image, header) = segments::image(&plan);
    // Storage reads and writes whole blocks; recovery reads a file up to its last whole block.
    image.resize(align_up(image.len() as u64) as usize, 0);
    if image.len() as u64 > SEGMENT_BYTES {
        return;
    }
    let opts = shards::executor::ExecutorOptions::new("fuzz-recovery");
    let ex = shards::executor::spawn(opts, move || check_open(image, header))
        .expect("a glommio executor for the recovery target");
    // A property that fails panics on the executor thread (under libFuzzer that aborts the
    // process); here it shows up as a failed join.
    ex.join().expect("the recovery check panicked on the executor thread");
}

async fn check_open(image: Vec<u8>, header: Option<SegmentHeader>) {
    let name = "00000000000000000001.wal";
    let storage = MemStorage::new();
    write_file(&storage, name, &image).await;

    let opts = ShardOptions {
        shard_id: 0,
        segment_bytes: SEGMENT_BYTES,
        commit_bytes_max: COMMIT_BYTES_MAX,
        durability: Durability::Dsync,
        ..ShardOptions::default()
    };
    let opened = Shard::open_with_storage(Rc::new(storage.clone()), opts).await;

    let header = header.filter(|h| h.shard_id == 0);
    let Some(header) = header else {
        // Not a segment of shard 0: a zero header block is a spare (removed, empty shard); anything
        // else in a `.wal` file is refused.
        let zero = matches!(SegmentHeader::decode(&image[..BLOCK_BYTES as usize]), HeaderBlock::Zero);
        match opened {
            Ok(shard) if zero => {
                assert_eq!(shard.next_lsn(), Lsn(1));
                assert_eq!(shard.durable_lsn(), Lsn(0));
                shard.close().await.expect("close an empty shard");
                assert!(storage.live_image(name).is_none(), "a spare file was not removed");
            }
            Ok(_) => panic!("opened a shard on a segment whose header is not valid for shard 0"),
            Err(ShardError::Corruption { .. }) if !zero => {}
            Err(e) => panic!("unexpected error on a bad header (zero block: {zero}): {e:?}"),
        }
        return;
    };

    let chain = spec::chain(&image, SEGMENT_DATA_OFFSET, header.sequence, header.base_lsn);
    let end = chain.end_offset as usize;
    let behind = spec::find_all(&image[end.min(image.len())..], chain.end_offset, header.sequence);
    let shard = match opened {
        Ok(shard) => shard,
        Err(ShardError::Corruption { offset, .. }) => {
            assert!(
                !behind.is_empty(),
                "refused a segment whose only damage is a torn tail (end {end}, stop at {offset})"
            );
            assert_eq!(
                offset, chain.end_offset,
                "corruption reported away from where the chain ends"
            );
            return;
        }
        Err(e) => panic!("unexpected error opening a valid segment: {e:?}"),
    };

    assert_eq!(shard.next_lsn(), Lsn(chain.end_lsn));
    assert_eq!(shard.durable_lsn(), Lsn(chain.end_lsn - 1));
    let want: Vec<(u64, &spec::Record)> = chain
        .commits
        .iter()
        .flat_map(|(_, c)| (c.first_lsn..).zip(&c.records))
        .collect();
    let mut got = Vec::new();
    let mut from = Lsn(header.base_lsn);
    loop {
        let batch = shard.read(from, 1 << 16, None).await.expect("read recovered records");
        if batch.records.is_empty() {
            break;
        }
        assert!(batch.next_lsn > from, "a read made no progress");
        from = batch.next_lsn;
        got.extend(batch.records);
        assert!(got.len() <= want.len(), "served more records than the log holds");
    }
    assert_eq!(got.len(), want.len(), "served fewer records than the log holds");
    for (got, (lsn, want)) in got.iter().zip(&want) {
        assert_eq!(got.lsn, Lsn(*lsn));
        assert_eq!(got.stream, want.stream);
        assert_eq!(got.timestamp, want.timestamp);
        assert_eq!(
            got.payload, want.payload,
            "record {lsn} served with other bytes than written"
        );
    }
    shard.close().await.expect("close a recovered shard");

    // Recovery names a segment after its base lsn.
    let kept = format!("{:020}.wal", header.base_lsn);
    let live = storage.live_image(&kept).expect("the recovered segment still exists");
    assert_eq!(&live[..end], &image[..end], "recovery changed the log it kept");
    let revivable = spec::find_all(&live[end..], chain.end_offset, header.sequence);
    assert!(
        revivable.is_empty(),
        "valid commits left behind the end of the log: {revivable:?}"
    );
}

async fn write_file(storage: &MemStorage, name: &str, image: &[u8]) {
    assert_eq!(image.len() as u64 % BLOCK_BYTES, 0);
    let file = storage
        .open(name, true, Durability::Dsync)
        .await
        .expect("create a file in memory");
    let mut buf = storage.alloc(image.len());
    buf.as_mut_slice().copy_from_slice(image);
    file.write(0, buf).await.expect("write in memory");
    file.sync().await.expect("sync in memory");
    storage.sync_dir().await.expect("sync_dir in memory");
}
