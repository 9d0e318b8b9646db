//! The CPU side of a commit, without I/O: serialising a batch of records into a commit body and
//! sealing it (header and CRC32C over header and body), then parsing and checking it again as
//! recovery does. The durable path with the disk is `benches/append.rs`.
//!
//! `cargo bench -p shards --bench commit`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shards::format::{self, COMMIT_HEADER_BYTES};

/// (label, records per commit, bytes per record): one lone append, a c=256 batch of 100 B
/// records, and a 1 MiB commit of 1 KiB records.
const SHAPES: [(&str, usize, usize); 3] = [("1x100B", 1, 100), ("256x100B", 256, 100), ("1000x1KiB", 1000, 1024)];

fn commit(records: usize, bytes: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(COMMIT_HEADER_BYTES, 0);
    let payload = vec![0x5a; bytes];
    for i in 0..records {
        format::encode_record(out, i as u64, None, &payload);
    }
    let body = out.len() - COMMIT_HEADER_BYTES;
    format::seal_commit(out, 3, 1000, records as u32, body);
}

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("serialise_and_seal");
    for (label, records, bytes) in SHAPES {
        let mut out = Vec::with_capacity(COMMIT_HEADER_BYTES + records * format::record_bytes(bytes));
        group.throughput(Throughput::Bytes((records * bytes) as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                commit(records, bytes, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_and_check");
    for (label, records, bytes) in SHAPES {
        let mut out = Vec::new();
        commit(records, bytes, &mut out);
        group.throughput(Throughput::Bytes((records * bytes) as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                let view = format::parse_commit(black_box(&out), 3).expect("valid commit");
                black_box(view.records().count())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, seal, parse);
criterion_main!(benches);
