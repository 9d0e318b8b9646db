//! The frame codec on the request path, without the network: encoding an `Append` request,
//! splitting frames out of a read buffer, verifying a request (what the front does with every
//! frame), and encoding the `Appended` answer.
//!
//! `cargo bench -p proto --bench codec`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::codec::{self, AppendRecord, Encoder};
use proto::frame::FrameReader;
use proto::wire::AckLevel;

const MAX_FRAME_BYTES: usize = 16 << 20;

/// (label, records per frame, bytes per record): the benchmark matrix's B=1 100 B and B=64 1 KiB.
const SHAPES: [(&str, usize, usize); 2] = [("1x100B", 1, 100), ("64x1KiB", 64, 1024)];

fn append_frame(records: usize, bytes: usize) -> Vec<u8> {
    let payloads: Vec<Vec<u8>> = (0..records).map(|i| vec![i as u8; bytes]).collect();
    let mut out = Vec::new();
    Encoder::new().append(
        7,
        42,
        payloads.iter().map(|p| AppendRecord::new(p)),
        AckLevel::Durable,
        &mut out,
    );
    out
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_append");
    for (label, records, bytes) in SHAPES {
        let payloads: Vec<Vec<u8>> = (0..records).map(|i| vec![i as u8; bytes]).collect();
        let mut encoder = Encoder::new();
        let mut out = Vec::new();
        group.throughput(Throughput::Elements(records as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                out.clear();
                encoder.append(
                    7,
                    42,
                    payloads.iter().map(|p| AppendRecord::new(p)),
                    AckLevel::Durable,
                    &mut out,
                );
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn split_and_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("split_and_verify");
    for (label, records, bytes) in SHAPES {
        // A read buffer holding 64 frames back to back, as a pipelining client sends them.
        let frame = append_frame(records, bytes);
        let stream: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 64).collect();
        group.throughput(Throughput::Elements(64 * records as u64));
        group.bench_function(label, |b| {
            b.iter_batched_ref(
                || {
                    let mut reader = FrameReader::new(MAX_FRAME_BYTES);
                    reader.extend(&stream);
                    reader
                },
                |reader| {
                    let mut n = 0;
                    while let Some(payload) = reader.next_frame().expect("valid frames") {
                        let request = codec::view_request(payload).expect("valid request");
                        n += request.id();
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn encode_appended(c: &mut Criterion) {
    let mut encoder = Encoder::new();
    let mut out = Vec::new();
    c.bench_function("encode_appended", |b| {
        b.iter(|| {
            out.clear();
            encoder.appended(black_box(7), 1, 1000, 1, &mut out);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, encode, split_and_verify, encode_appended);
criterion_main!(benches);
