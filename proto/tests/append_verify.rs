//! The contract of `proto::append_verify`: it accepts only what FlatBuffers' generic verifier
//! accepts (so reading an accepted payload unchecked is safe), and it accepts every well-formed
//! append our encoder writes (so the daemon's hot path actually takes it).

use proptest::prelude::*;
use proto::append_verify::is_verified_append;
use proto::codec::{self, AppendRecord, Encoder};
use proto::frame::FRAME_HEADER_BYTES;
use proto::wire::{AckLevel, Request};

fn generic_accepts(payload: &[u8]) -> bool {
    flatbuffers::root_with_opts::<Request>(&codec::verifier_options(payload.len()), payload).is_ok()
}

/// The payload (no frame header) of an append of `records`.
fn append_payload(id: u64, stream: u64, records: &[(Vec<u8>, Option<u64>)], ack: AckLevel) -> Vec<u8> {
    let mut frame = Vec::new();
    let records = records.iter().map(|(payload, timestamp)| AppendRecord {
        payload,
        timestamp: *timestamp,
    });
    Encoder::new().append(id, stream, records, ack, &mut frame);
    frame.split_off(FRAME_HEADER_BYTES)
}

fn ack_level() -> impl Strategy<Value = AckLevel> {
    prop_oneof![Just(AckLevel::Durable), Just(AckLevel::Written), Just(AckLevel::None)]
}

fn records() -> impl Strategy<Value = Vec<(Vec<u8>, Option<u64>)>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..300),
            prop::option::of(any::<u64>()),
        ),
        0..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_encoded_append_takes_the_fast_path(
        id in any::<u64>(), stream in any::<u64>(), records in records(), ack in ack_level(),
    ) {
        let payload = append_payload(id, stream, &records, ack);
        prop_assert!(generic_accepts(&payload));
        prop_assert!(is_verified_append(&payload));
    }

    #[test]
    fn record_fields_reads_what_the_generated_accessors_read(
        records in records(), ack in ack_level(),
    ) {
        let payload = append_payload(1, 2, &records, ack);
        let request = codec::view_request(&payload);
        prop_assume!(request.is_ok()); // no records: refused
        let append = request.unwrap().body_as_append().expect("an append");
        for (r, (bytes, timestamp)) in append.records().expect("records").iter().zip(&records) {
            let generated = (r.payload().map(|p| p.bytes()).unwrap_or(&[]), r.has_timestamp().then(|| r.timestamp()));
            prop_assert_eq!(codec::record_fields(&r), generated);
            prop_assert_eq!(codec::record_fields(&r), (&bytes[..], *timestamp));
        }
    }

    #[test]
    fn a_damaged_append_is_accepted_only_if_the_generic_verifier_accepts_it(
        records in records(),
        ack in ack_level(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut payload = append_payload(7, 42, &records, ack);
        for (at, byte) in &damage {
            let i = at.index(payload.len());
            payload[i] = *byte;
        }
        if let Some(cut) = cut {
            payload.truncate(cut.index(payload.len() + 1));
        }
        if is_verified_append(&payload) {
            prop_assert!(generic_accepts(&payload), "fast path accepted what the verifier refuses: {payload:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_are_accepted_only_if_the_generic_verifier_accepts_them(
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        if is_verified_append(&payload) {
            prop_assert!(generic_accepts(&payload));
        }
    }
}

/// Every element of the records vector pointed at the one large record: the generic verifier
/// refuses the blown-up "apparent size", and so must the fast path.
#[test]
fn shared_record_offsets_that_blow_up_the_apparent_size_are_refused() {
    let mut records = vec![(vec![0xAB; 16 << 10], None)];
    records.extend((0..64).map(|_| (Vec::new(), None)));
    let mut payload = append_payload(1, 2, &records, AckLevel::Durable);
    assert!(is_verified_append(&payload));
    // SAFETY: verified just above.
    let request = unsafe { flatbuffers::root_unchecked::<Request>(&payload) };
    let vector = request.body_as_append().expect("an append").records().expect("records");
    let start = vector.bytes().as_ptr() as usize - payload.as_ptr() as usize;
    let len = vector.len();
    let first = u32::from_le_bytes(payload[start..start + 4].try_into().expect("4 bytes")) as usize;
    for i in 1..len {
        let at = start + 4 * i;
        let offset = u32::try_from(start + first - at).expect("records lie after the vector");
        payload[at..at + 4].copy_from_slice(&offset.to_le_bytes());
    }
    assert!(
        !generic_accepts(&payload),
        "the test must build a payload the verifier refuses"
    );
    assert!(!is_verified_append(&payload));
    // The same payload through `view_request` is refused with a typed error.
    assert!(codec::view_request(&payload).is_err());
}

/// Other requests are left to the generic verifier.
#[test]
fn only_appends_take_the_fast_path() {
    let mut frame = Vec::new();
    let ping = proto::wire::RequestT {
        id: 3,
        body: proto::wire::RequestBodyT::Ping(Box::default()),
    };
    Encoder::new().request(&ping, &mut frame);
    let payload = &frame[FRAME_HEADER_BYTES..];
    assert!(generic_accepts(payload));
    assert!(!is_verified_append(payload));
    assert!(!is_verified_append(&[]));
}
