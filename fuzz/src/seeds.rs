//! Seed inputs built from real encoded messages, so the fuzzer starts from valid frames and mutates
//! them instead of having to discover the FlatBuffers layout. `examples/write_seeds.rs` writes them
//! under `corpus/`.

use proto::codec::{AppendRecord, Encoder};
use proto::frame::FRAME_HEADER_BYTES;
use proto::wire::*;

use crate::frames::{encode_input, FLAG_BARE_PAYLOAD, FLAG_SPARE};

fn requests() -> Vec<(&'static str, RequestT)> {
    let body = |body| RequestT { id: 7, body };
    vec![
        (
            "hello",
            body(RequestBodyT::Hello(Box::new(HelloT {
                version: 1,
                client_name: Some("seed".into()),
                auth_token: Some("t".into()),
            }))),
        ),
        (
            "append",
            body(RequestBodyT::Append(Box::new(AppendT {
                stream: 42,
                records: Some(vec![
                    RecordT {
                        payload: Some(b"abc".to_vec()),
                        timestamp: 5,
                        has_timestamp: true,
                    },
                    RecordT {
                        payload: Some(Vec::new()),
                        timestamp: 0,
                        has_timestamp: false,
                    },
                ]),
                ack: AckLevel::Written,
            }))),
        ),
        (
            "read",
            body(RequestBodyT::Read(Box::new(ReadT {
                shard: 1,
                from_lsn: 9,
                max_bytes: 4096,
                max_wait_ms: 10,
                stream: 42,
                has_stream: true,
            }))),
        ),
        ("stats", body(RequestBodyT::Stats(Box::new(StatsT {})))),
        ("ping", body(RequestBodyT::Ping(Box::new(PingT {})))),
    ]
}

fn percentiles(base: u64) -> Option<PercentilesT> {
    Some(PercentilesT {
        p50: base,
        p99: base + 1,
        p999: base + 2,
        max: base + 3,
    })
}

fn responses() -> Vec<(&'static str, ResponseT)> {
    let body = |body| ResponseT { id: 7, body };
    vec![
        (
            "hello-ok",
            body(ResponseBodyT::HelloOk(Box::new(HelloOkT {
                version: 1,
                server: Some("shardlog".into()),
                shard_count: 2,
                shard_addresses: None,
            }))),
        ),
        (
            "appended",
            body(ResponseBodyT::Appended(Box::new(AppendedT {
                shard: 1,
                first_lsn: 3,
                count: 2,
            }))),
        ),
        (
            "records",
            body(ResponseBodyT::Records(Box::new(RecordsT {
                shard: 0,
                next_lsn: 5,
                records: Some(vec![ReadRecordT {
                    lsn: 4,
                    stream: 42,
                    payload: Some(b"xyz".to_vec()),
                    timestamp: 11,
                    has_timestamp: true,
                }]),
            }))),
        ),
        (
            "stats-reply",
            body(ResponseBodyT::StatsReply(Box::new(StatsReplyT {
                front: Some(Box::new(FrontStatsT {
                    connections: 1,
                    connections_total: 2,
                    frames_in: 3,
                    frames_out: 4,
                    protocol_errors: 5,
                    bytes_in: 6,
                    bytes_out: 7,
                    errors_by_code: Some(vec![0, 1, 2]),
                })),
                shards: Some(vec![ShardStatsT {
                    shard: 0,
                    appends: 1,
                    records: 2,
                    bytes: 3,
                    commits: 4,
                    records_per_commit: percentiles(1),
                    bytes_per_commit: percentiles(100),
                    fsync_latency_us: percentiles(200),
                    queue_depth: 0,
                    durable_lsn: 2,
                    segment_count: 1,
                    segment_bytes: 4096,
                    poisoned: Some("eio".into()),
                    fsync_latency_us_buckets: Some(Box::new(BucketsT {
                        le: Some(vec![100, 200]),
                        cumulative: Some(vec![1, 3]),
                        count: 4,
                        sum: 700,
                    })),
                    records_per_commit_buckets: None,
                    ..Default::default()
                }]),
                executors: None,
                process_cpu_us: 0,
            }))),
        ),
        ("pong", body(ResponseBodyT::Pong(Box::new(PongT {})))),
        (
            "error",
            body(ResponseBodyT::Error(Box::new(ErrorT {
                code: ErrorCode::Poisoned,
                message: Some("no".into()),
                first_available_lsn: 0,
            }))),
        ),
        (
            "error_truncated",
            body(ResponseBodyT::Error(Box::new(ErrorT {
                code: ErrorCode::Truncated,
                message: Some("below retention".into()),
                first_available_lsn: 9,
            }))),
        ),
    ]
}

/// `(file name, input)` pairs for the `frame_decoder` target.
pub fn frame_decoder() -> Vec<(String, Vec<u8>)> {
    let mut encoder = Encoder::new();
    let mut seeds = Vec::new();
    let mut all_requests = Vec::new();

    for (name, req) in requests() {
        let mut frame = Vec::new();
        encoder.request(&req, &mut frame);
        all_requests.extend_from_slice(&frame);
        seeds.push((format!("req-{name}"), encode_input(0, &[], &frame)));
        seeds.push((
            format!("req-{name}-bare"),
            encode_input(FLAG_BARE_PAYLOAD, &[], &frame[FRAME_HEADER_BYTES..]),
        ));
    }
    for (name, resp) in responses() {
        let mut frame = Vec::new();
        encoder.response(&resp, &mut frame);
        seeds.push((format!("resp-{name}"), encode_input(0, &[], &frame)));
        seeds.push((
            format!("resp-{name}-bare"),
            encode_input(FLAG_BARE_PAYLOAD, &[], &frame[FRAME_HEADER_BYTES..]),
        ));
    }

    // The daemon's hot-path encoder for appends and acks, not only the object API.
    let mut frame = Vec::new();
    let records = [
        AppendRecord::new(b"one"),
        AppendRecord {
            payload: b"two",
            timestamp: Some(2),
        },
    ];
    encoder.append(1, 99, records, AckLevel::Durable, &mut frame);
    encoder.appended(1, 0, 1, 2, &mut frame);
    encoder.error(0, ErrorCode::BadRequest, "bad", &mut frame);
    seeds.push(("mixed-hot-path".into(), encode_input(0, &[5], &frame)));

    // Pipelined requests split at every size, through both feeding paths.
    seeds.push((
        "pipelined-extend".into(),
        encode_input(0, &[1, 2, 3, 4, 5, 6, 7], &all_requests),
    ));
    seeds.push((
        "pipelined-spare".into(),
        encode_input(FLAG_SPARE, &[3, 0], &all_requests),
    ));

    // Framing errors: a zero length, a length above a 16-byte limit, a frame cut short.
    seeds.push(("empty-frame".into(), encode_input(0, &[2], &[0, 0, 0, 0, 1, 2])));
    seeds.push(("too-large".into(), encode_input(1, &[1], &[17, 0, 0, 0, 1, 2, 3])));
    seeds.push((
        "truncated".into(),
        encode_input(FLAG_SPARE, &[], &all_requests[..all_requests.len() - 3]),
    ));
    seeds
}

/// One commit of segment `sequence`, as the shard writes it.
fn commit(sequence: u64, first_lsn: u64, records: &[(u64, Option<u64>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for &(stream, timestamp, payload) in records {
        shards::format::encode_record(&mut body, stream, timestamp, payload);
    }
    let mut out = vec![0u8; shards::format::COMMIT_HEADER_BYTES];
    out.extend_from_slice(&body);
    shards::format::seal_commit(&mut out, sequence, first_lsn, records.len() as u32, body.len());
    out
}

/// Three commits of segment `sequence` from lsn `first`: lsns first..first + 6.
fn chain(sequence: u64, first: u64) -> Vec<u8> {
    let mut out = commit(sequence, first, &[(7, Some(1), b"alpha"), (8, None, b"")]);
    out.extend(commit(sequence, first + 2, &[(7, None, b"beta")]));
    out.extend(commit(
        sequence,
        first + 3,
        &[(9, Some(3), b"gamma"), (9, Some(4), &[0xff; 40]), (1, None, b"d")],
    ));
    out
}

/// `(file name, input)` pairs for the `segment_scanner` target.
pub fn segment_scanner() -> Vec<(String, Vec<u8>)> {
    use crate::segments::{encode_input, FLAG_RAW_HEADER, FLAG_SEAL};
    // Flag bits 2-3 hold the segment sequence minus one.
    let seq2 = 1 << 2;
    let zeros = [0u8; 64];
    let clean = [chain(1, 1), zeros.to_vec()].concat();
    let first_len = commit(1, 1, &[(7, Some(1), b"alpha"), (8, None, b"")]).len() as u16;

    let mut seeds = vec![
        ("clean".to_string(), encode_input(0, 1, None, &clean)),
        ("clean-sealed".to_string(), encode_input(FLAG_SEAL, 1, None, &clean)),
        (
            "clean-base-lsn-100".to_string(),
            encode_input(0, 100, None, &[chain(1, 100), zeros.to_vec()].concat()),
        ),
        // A flipped byte in the last commit: a torn tail.
        (
            "torn-tail".to_string(),
            encode_input(0, 1, Some((clean.len() as u16 - 70, 0x10)), &clean),
        ),
        // A flipped byte in the first commit: damage with valid commits behind it.
        (
            "middle-damage".to_string(),
            encode_input(0, 1, Some((40, 0x01)), &clean),
        ),
        // The last commit cut short by the end of the data.
        (
            "short".to_string(),
            encode_input(0, 1, None, &chain(1, 1)[..chain(1, 1).len() - 9]),
        ),
        // Segment 2 written over a recycled segment 1: intact commits of the old sequence follow.
        (
            "recycled-leftovers".to_string(),
            encode_input(
                seq2,
                1,
                None,
                &[commit(2, 1, &[(5, None, b"new")]), chain(1, 1)].concat(),
            ),
        ),
        (
            "lsn-gap".to_string(),
            encode_input(
                0,
                1,
                None,
                &[commit(1, 1, &[(5, None, b"a")]), commit(1, 5, &[(5, None, b"b")])].concat(),
            ),
        ),
    ];

    // The header block taken from the input, so the header decoder is fuzzed too.
    let mut header = vec![0u8; crate::segments::HEADER_RAW_BYTES];
    shards::format::SegmentHeader {
        shard_id: 0,
        sequence: 1,
        base_lsn: 1,
    }
    .encode(&mut header);
    seeds.push((
        "raw-header".into(),
        encode_input(FLAG_RAW_HEADER, 1, None, &[header, clean.clone()].concat()),
    ));

    // Sealed by the harness: a commit whose header claims 3 records over a body framing 2 (a
    // writer bug behind a good checksum), then a zero header that ends the sealing.
    let mut lying = commit(1, 1, &[(1, None, b"x"), (2, None, b"y")]);
    lying[4..8].copy_from_slice(&3u32.to_le_bytes());
    lying.extend_from_slice(&zeros);
    seeds.push(("sealed-count-mismatch".into(), encode_input(FLAG_SEAL, 1, None, &lying)));
    // Sealed: a body length beyond the data, which the sealer reduces to what is left.
    let mut long = commit(1, 1, &[(1, None, b"xyz")]);
    long[24..28].copy_from_slice(&1000u32.to_le_bytes());
    seeds.push((
        "sealed-long-body".into(),
        encode_input(FLAG_SEAL, 1, Some((first_len, 0x80)), &long),
    ));
    seeds
        .into_iter()
        .map(|(name, input)| (format!("seg-{name}"), input))
        .collect()
}
