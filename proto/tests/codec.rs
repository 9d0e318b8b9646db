//! Round trips for every message, framing across chunk boundaries, and
//! rejection of hostile input.

use proptest::prelude::*;
use proto::codec::{self, AppendRecord, Encoder};
use proto::frame::{self, FrameReader, FRAME_BYTES_MAX_DEFAULT};
use proto::wire::*;
use proto::DecodeError;

fn request_frame(req: &RequestT) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().request(req, &mut out);
    out
}

fn response_frame(resp: &ResponseT) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().response(resp, &mut out);
    out
}

fn roundtrip_request(req: RequestT) {
    let bytes = request_frame(&req);
    let payload = frame::decode_whole_frame(&bytes, FRAME_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(codec::decode_request(payload).unwrap(), req);
}

fn roundtrip_response(resp: ResponseT) {
    let bytes = response_frame(&resp);
    let payload = frame::decode_whole_frame(&bytes, FRAME_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(codec::decode_response(payload).unwrap(), resp);
}

fn percentiles(base: u64) -> Option<PercentilesT> {
    Some(PercentilesT {
        p50: base,
        p99: base * 2,
        p999: base * 3,
        max: base * 4,
    })
}

#[test]
fn every_request_round_trips() {
    let bodies = vec![
        RequestBodyT::Hello(Box::new(HelloT {
            version: 1,
            client_name: Some("test".into()),
            auth_token: Some("reserved".into()),
        })),
        RequestBodyT::Append(Box::new(AppendT {
            stream: u64::MAX,
            records: Some(vec![
                RecordT {
                    payload: Some(b"a".to_vec()),
                    timestamp: 5,
                    has_timestamp: true,
                },
                RecordT {
                    payload: Some(vec![0; 1000]),
                    timestamp: 0,
                    has_timestamp: false,
                },
                RecordT {
                    payload: Some(vec![]),
                    timestamp: 0,
                    has_timestamp: false,
                },
            ]),
            ack: AckLevel::Written,
        })),
        RequestBodyT::Read(Box::new(ReadT {
            shard: 3,
            from_lsn: 99,
            max_bytes: 4096,
            max_wait_ms: 250,
            stream: 7,
            has_stream: true,
        })),
        RequestBodyT::Stats(Box::new(StatsT {})),
        RequestBodyT::Ping(Box::new(PingT {})),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        roundtrip_request(RequestT { id: i as u64 + 1, body });
    }
}

#[test]
fn every_response_round_trips() {
    let bodies = vec![
        ResponseBodyT::HelloOk(Box::new(HelloOkT {
            version: 1,
            server: Some("shardlogd".into()),
            shard_count: 4,
            shard_addresses: Some(vec!["127.0.0.1:7071".into(), "127.0.0.1:7072".into()]),
        })),
        ResponseBodyT::Appended(Box::new(AppendedT {
            shard: 2,
            first_lsn: 10,
            count: 64,
        })),
        ResponseBodyT::Records(Box::new(RecordsT {
            shard: 1,
            next_lsn: 12,
            records: Some(vec![
                ReadRecordT {
                    lsn: 10,
                    stream: 5,
                    payload: Some(b"x".to_vec()),
                    timestamp: 1,
                    has_timestamp: true,
                },
                ReadRecordT {
                    lsn: 11,
                    stream: 6,
                    payload: Some(b"yz".to_vec()),
                    timestamp: 0,
                    has_timestamp: false,
                },
            ]),
        })),
        ResponseBodyT::StatsReply(Box::new(StatsReplyT {
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
                queue_depth: 5,
                durable_lsn: 6,
                segment_count: 7,
                segment_bytes: 8,
                poisoned: Some("fdatasync failed: EIO".into()),
                fsync_latency_us_buckets: Some(Box::new(BucketsT {
                    le: Some(vec![100, 200]),
                    cumulative: Some(vec![1, 3]),
                    count: 4,
                    sum: 700,
                })),
                records_per_commit_buckets: None,
                corrupt_segments: 1,
                last_corruption: Some("segment 3 is corrupt at offset 4096".into()),
                scrub_bytes: 12,
                scrub_passes: 13,
                recovery_trusted_segments: 14,
                recovery_scanned_segments: 15,
                recovery_us: 16,
                stream_index_bytes: 17,
                stream_tail_bytes: 18,
                stream_runs_bytes_written: 19,
                scrub_bad_stream_indexes: 20,
            }]),
            executors: Some(vec![ExecutorStatsT {
                name: Some("shard-0".into()),
                cpu: 1,
                parks: 9,
                ring_wakeups: 10,
                stalls_broken: 11,
                cpu_us: 12,
            }]),
            process_cpu_us: 13,
        })),
        ResponseBodyT::Pong(Box::new(PongT {})),
        ResponseBodyT::Error(Box::new(ErrorT {
            code: ErrorCode::Poisoned,
            message: Some("shard 1 is poisoned".into()),
            first_available_lsn: 0,
        })),
        ResponseBodyT::Error(Box::new(ErrorT {
            code: ErrorCode::Truncated,
            message: Some("lsn 1 is below the oldest retained lsn 77".into()),
            first_available_lsn: 77,
        })),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        roundtrip_response(ResponseT {
            id: i as u64 + 100,
            body,
        });
    }
}

#[test]
fn borrowed_append_encoding_matches_object_api() {
    let mut out = Vec::new();
    let recs = [
        AppendRecord {
            payload: b"one",
            timestamp: Some(9),
        },
        AppendRecord::new(b"two"),
    ];
    Encoder::new().append(5, 77, recs, AckLevel::None, &mut out);
    let req = codec::decode_request(frame::decode_whole_frame(&out, FRAME_BYTES_MAX_DEFAULT).unwrap()).unwrap();
    let expected = RequestT {
        id: 5,
        body: RequestBodyT::Append(Box::new(AppendT {
            stream: 77,
            records: Some(vec![
                RecordT {
                    payload: Some(b"one".to_vec()),
                    timestamp: 9,
                    has_timestamp: true,
                },
                RecordT {
                    payload: Some(b"two".to_vec()),
                    timestamp: 0,
                    has_timestamp: false,
                },
            ]),
            ack: AckLevel::None,
        })),
    };
    assert_eq!(req, expected);
}

#[test]
fn zero_length_frame_is_rejected() {
    let mut r = FrameReader::new(1024);
    r.extend(&[0, 0, 0, 0, 1, 2, 3]);
    assert_eq!(r.next_frame(), Err(DecodeError::EmptyFrame));
}

#[test]
fn oversize_frame_is_rejected_from_its_header_alone() {
    let mut r = FrameReader::new(FRAME_BYTES_MAX_DEFAULT);
    // 4 GiB - 1 announced, nothing else sent: rejected without waiting for (or allocating) the payload.
    r.extend(&u32::MAX.to_le_bytes());
    assert_eq!(
        r.next_frame(),
        Err(DecodeError::FrameTooLarge {
            len: u32::MAX as u64,
            max: FRAME_BYTES_MAX_DEFAULT
        })
    );
    assert_eq!(r.buffered(), 4);
    let just_over = (FRAME_BYTES_MAX_DEFAULT as u32 + 1).to_le_bytes();
    assert!(matches!(
        frame::payload_len(just_over, FRAME_BYTES_MAX_DEFAULT),
        Err(DecodeError::FrameTooLarge { .. })
    ));
    let at_max = (FRAME_BYTES_MAX_DEFAULT as u32).to_le_bytes();
    assert_eq!(
        frame::payload_len(at_max, FRAME_BYTES_MAX_DEFAULT),
        Ok(FRAME_BYTES_MAX_DEFAULT)
    );
}

#[test]
fn truncated_frame_waits_then_reports_truncation() {
    let bytes = request_frame(&RequestT {
        id: 1,
        body: RequestBodyT::Ping(Box::default()),
    });
    let cut = &bytes[..bytes.len() - 1];
    let mut r = FrameReader::new(1024);
    r.extend(cut);
    assert_eq!(r.next_frame(), Ok(None));
    assert_eq!(r.pending_frame_bytes(), Some(1));
    assert!(matches!(
        frame::decode_whole_frame(cut, 1024),
        Err(DecodeError::Truncated { needed, available }) if needed == bytes.len() && available == cut.len()
    ));
    assert!(matches!(
        frame::decode_whole_frame(&bytes[..2], 1024),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn garbage_payload_fails_verification() {
    for garbage in [
        &[0xffu8; 16][..],
        &[1, 2, 3][..],
        &[0u8; 64][..],
        b"not a flatbuffer at all",
    ] {
        let err = codec::decode_request(garbage).unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { .. } | DecodeError::MissingBody),
            "{garbage:?} gave {err:?}"
        );
        assert!(codec::decode_response(garbage).is_err());
    }
}

/// Builds a request whose union tag is `tag`, with a Ping table as the body.
fn request_with_tag(tag: u8) -> Vec<u8> {
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let body = Ping::create(&mut fbb, &PingArgs {});
    let root = Request::create(
        &mut fbb,
        &RequestArgs {
            id: 3,
            body_type: RequestBody(tag),
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(root, None);
    fbb.finished_data().to_vec()
}

#[test]
fn unknown_union_tag_is_rejected() {
    assert_eq!(
        codec::decode_request(&request_with_tag(200)),
        Err(DecodeError::UnknownMessage { tag: 200 })
    );
    // Tag NONE with a body present is an inconsistent union.
    assert!(matches!(
        codec::decode_request(&request_with_tag(0)),
        Err(DecodeError::Invalid { .. })
    ));
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let root = Request::create(
        &mut fbb,
        &RequestArgs {
            id: 4,
            body_type: RequestBody::NONE,
            body: None,
        },
    );
    fbb.finish(root, None);
    assert_eq!(
        codec::decode_request(fbb.finished_data()),
        Err(DecodeError::MissingBody)
    );
    assert_eq!(
        codec::decode_request(&request_with_tag(RequestBody::Ping.0))
            .unwrap()
            .id,
        3
    );
    assert_eq!(
        DecodeError::UnknownMessage { tag: 200 }.code(),
        ErrorCode::UnknownMessage
    );
}

#[test]
fn append_without_records_or_with_unknown_ack_is_rejected() {
    let empty = RequestT {
        id: 1,
        body: RequestBodyT::Append(Box::new(AppendT {
            stream: 1,
            records: Some(vec![]),
            ack: AckLevel::Durable,
        })),
    };
    let bytes = request_frame(&empty);
    assert!(matches!(
        codec::decode_request(&bytes[4..]),
        Err(DecodeError::BadField {
            field: "Append.records",
            ..
        })
    ));
    let bad_ack = RequestT {
        id: 1,
        body: RequestBodyT::Append(Box::new(AppendT {
            stream: 1,
            records: Some(vec![RecordT {
                payload: Some(vec![1]),
                ..Default::default()
            }]),
            ack: AckLevel(9),
        })),
    };
    let bytes = request_frame(&bad_ack);
    assert!(matches!(
        codec::decode_request(&bytes[4..]),
        Err(DecodeError::BadField {
            field: "Append.ack",
            ..
        })
    ));
}

#[test]
fn a_response_is_not_a_request() {
    // Verification is typed: a buffer of the other root type must not decode as garbage values.
    let bytes = response_frame(&ResponseT {
        id: 1,
        body: ResponseBodyT::Records(Box::new(RecordsT {
            shard: 0,
            next_lsn: 1,
            records: Some(vec![]),
        })),
    });
    let r = codec::decode_request(&bytes[4..]);
    assert!(
        r.is_err()
            || !matches!(
                r,
                Ok(RequestT {
                    body: RequestBodyT::Append(_),
                    ..
                })
            )
    );
}

fn arb_request() -> impl Strategy<Value = RequestT> {
    let record = (
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(payload, ts)| RecordT {
            payload: Some(payload),
            timestamp: ts.unwrap_or(0),
            has_timestamp: ts.is_some(),
        });
    let append = (any::<u64>(), proptest::collection::vec(record, 1..8), 0u8..3).prop_map(|(stream, records, ack)| {
        RequestBodyT::Append(Box::new(AppendT {
            stream,
            records: Some(records),
            ack: AckLevel(ack),
        }))
    });
    let read = (
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(shard, from_lsn, max_bytes, max_wait_ms, stream)| {
            RequestBodyT::Read(Box::new(ReadT {
                shard,
                from_lsn,
                max_bytes,
                max_wait_ms,
                stream: stream.unwrap_or(0),
                has_stream: stream.is_some(),
            }))
        });
    let body = prop_oneof![
        append,
        read,
        Just(RequestBodyT::Ping(Box::default())),
        Just(RequestBodyT::Stats(Box::default())),
        "[a-z]{0,12}".prop_map(|name| RequestBodyT::Hello(Box::new(HelloT {
            version: 1,
            client_name: Some(name),
            auth_token: None
        }))),
    ];
    (any::<u64>(), body).prop_map(|(id, body)| RequestT { id, body })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A stream of frames fed in arbitrary chunks (down to one byte at a
    /// time) decodes to the same messages as when fed at once.
    #[test]
    fn framing_is_independent_of_chunk_boundaries(
        reqs in proptest::collection::vec(arb_request(), 1..6),
        chunks in proptest::collection::vec(1usize..64, 1..64),
        one_byte_reads in any::<bool>(),
    ) {
        let mut stream = Vec::new();
        let mut enc = Encoder::new();
        for r in &reqs {
            enc.request(r, &mut stream);
        }
        let mut reader = FrameReader::new(FRAME_BYTES_MAX_DEFAULT);
        let mut got = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < stream.len() {
            let n = if one_byte_reads { 1 } else { chunks[i % chunks.len()] };
            i += 1;
            let end = (at + n).min(stream.len());
            // Alternate between the two feeding paths.
            if i % 2 == 0 {
                reader.extend(&stream[at..end]);
            } else {
                let spare = reader.spare(end - at);
                spare.copy_from_slice(&stream[at..end]);
                reader.filled(end - at);
            }
            at = end;
            while let Some(payload) = reader.next_frame().unwrap() {
                got.push(codec::decode_request(payload).unwrap());
            }
        }
        prop_assert_eq!(got, reqs);
        prop_assert_eq!(reader.buffered(), 0);
    }

    /// Whatever the bytes, decoding returns a value or a typed error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode_request(&bytes);
        let _ = codec::decode_response(&bytes);
        let mut reader = FrameReader::new(1 << 16);
        reader.extend(&bytes);
        while let Ok(Some(p)) = reader.next_frame() {
            let _ = codec::decode_request(p);
        }
    }

    /// Flipping any byte of a valid request yields either a valid message or a typed error.
    #[test]
    fn mutated_requests_never_panic(req in arb_request(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = request_frame(&req);
        let i = at.index(bytes.len() - 4) + 4;
        bytes[i] = byte;
        let _ = codec::decode_request(&bytes[4..]);
    }
}
