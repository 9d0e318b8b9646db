//! The `frame_decoder` property: framing and decoding of arbitrary bytes.
//!
//! What is checked, for any input:
//! - Nothing panics: `FrameReader`, `view_*`, `decode_*` and `unpack` return errors, never abort.
//! - Chunking does not matter: feeding the stream to a `FrameReader` in arbitrary pieces (through
//!   `extend` or through `spare`/`filled`) yields exactly the frames, and the error, that
//!   `split_frame` finds over the whole stream at once.
//! - The reader's bookkeeping is exact: `buffered()` is what was fed minus what was returned, and
//!   `pending_frame_bytes()` names exactly the bytes the partial frame still lacks.
//! - The zero-copy view and the owned decode agree on what is valid.
//! - Encode then decode is the identity: a payload that decodes to a `RequestT` (or `ResponseT`)
//!   re-encodes, through `Encoder`, to a frame that decodes to an equal value, and encoding that value
//!   again gives the same bytes.
//!
//! Input layout (see [`Plan`]):
//!
//! ```text
//! byte 0       flags: bits 0-1 frame size limit (see FRAME_MAX_CHOICES), bit 2 feed through
//!              spare()/filled() instead of extend(), bit 7 the rest is one bare payload (no framing)
//! byte 1       k = byte & 7: how many chunk sizes follow
//! bytes 2..2+k chunk sizes, used in a cycle; 0 means "everything that is left"
//! rest         the byte stream (or the bare payload)
//! ```
//!
//! `write_seeds` (fuzz/examples) builds inputs of this layout from real encoded messages.

use proto::codec::{self, Encoder};
use proto::frame::{self, FrameReader, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES};
use proto::DecodeError;

/// The frame size limits a run can choose from. Small limits reach `FrameTooLarge` with short
/// inputs; the default is what the daemon uses.
pub const FRAME_MAX_CHOICES: [usize; 4] = [FRAME_BYTES_MAX_DEFAULT, 16, 300, 4096];

pub const FLAG_SPARE: u8 = 1 << 2;
pub const FLAG_BARE_PAYLOAD: u8 = 1 << 7;

/// Chunk sizes beyond this many bytes in the plan are ignored: eight already reach every mix of
/// header splits.
pub const CHUNK_PLAN_LEN_MAX: usize = 7;

/// How one input is to be fed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    pub max: usize,
    pub spare: bool,
    pub bare_payload: bool,
    pub chunks: &'a [u8],
    pub stream: &'a [u8],
}

impl<'a> Plan<'a> {
    /// Splits an input into its plan; `None` if it is too short to hold one.
    pub fn parse(data: &'a [u8]) -> Option<Plan<'a>> {
        let (&flags, rest) = data.split_first()?;
        let (&k, rest) = rest.split_first()?;
        let k = usize::from(k) & CHUNK_PLAN_LEN_MAX;
        if rest.len() < k {
            return None;
        }
        let (chunks, stream) = rest.split_at(k);
        Some(Plan {
            max: FRAME_MAX_CHOICES[usize::from(flags & 3)],
            spare: flags & FLAG_SPARE != 0,
            bare_payload: flags & FLAG_BARE_PAYLOAD != 0,
            chunks,
            stream,
        })
    }

    /// The pieces the stream is fed in.
    fn pieces(&self) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = self.stream;
        let mut i = 0usize;
        while !rest.is_empty() {
            let size = match self.chunks.get(i % self.chunks.len().max(1)) {
                None | Some(0) => rest.len(),
                Some(&n) => usize::from(n).min(rest.len()),
            };
            let (piece, tail) = rest.split_at(size);
            pieces.push(piece);
            rest = tail;
            i += 1;
        }
        pieces
    }
}

/// Builds an input of the layout above.
pub fn encode_input(flags: u8, chunks: &[u8], stream: &[u8]) -> Vec<u8> {
    assert!(chunks.len() <= CHUNK_PLAN_LEN_MAX);
    let mut out = Vec::with_capacity(2 + chunks.len() + stream.len());
    out.push(flags);
    out.push(chunks.len() as u8);
    out.extend_from_slice(chunks);
    out.extend_from_slice(stream);
    out
}

/// What framing a whole stream at once yields: the frames' payloads, how many bytes they used,
/// and the error that stopped the split, if any.
struct Reference<'a> {
    frames: Vec<&'a [u8]>,
    consumed: usize,
    error: Option<DecodeError>,
}

fn reference(stream: &[u8], max: usize) -> Reference<'_> {
    let mut frames = Vec::new();
    let mut at = 0usize;
    loop {
        match frame::split_frame(&stream[at..], max) {
            Ok(Some((payload, used))) => {
                assert_eq!(used, FRAME_HEADER_BYTES + payload.len());
                assert!(payload.len() <= max);
                assert!(!payload.is_empty());
                frames.push(payload);
                at += used;
            }
            Ok(None) => {
                return Reference {
                    frames,
                    consumed: at,
                    error: None,
                }
            }
            Err(error) => {
                return Reference {
                    frames,
                    consumed: at,
                    error: Some(error),
                }
            }
        }
    }
}

/// Runs every check on one input. Panics (the fuzzer's crash signal) when a property fails.
pub fn check(data: &[u8]) {
    let Some(plan) = Plan::parse(data) else {
        return;
    };
    let mut encoder = Encoder::new();
    if plan.bare_payload {
        check_payload(&mut encoder, plan.stream);
        return;
    }

    let expected = reference(plan.stream, plan.max);
    let mut reader = FrameReader::new(plan.max);
    assert_eq!(reader.max(), plan.max);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut error = None;
    let mut fed = 0usize;
    let mut consumed = 0usize;
    'feed: for piece in plan.pieces() {
        if plan.spare {
            // Ask for more room than the piece needs, as a socket read would.
            let spare = reader.spare(piece.len() + 7);
            assert!(spare.len() >= piece.len() + 7);
            spare[..piece.len()].copy_from_slice(piece);
            reader.filled(piece.len());
        } else {
            reader.extend(piece);
        }
        fed += piece.len();
        assert_eq!(reader.buffered(), fed - consumed);
        loop {
            match reader.next_frame() {
                Ok(Some(payload)) => {
                    consumed += FRAME_HEADER_BYTES + payload.len();
                    frames.push(payload.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
        assert_eq!(reader.buffered(), fed - consumed);
        check_pending(&reader, &plan.stream[consumed..fed], plan.max);
    }

    assert_eq!(
        frames.len(),
        expected.frames.len(),
        "chunking changed the number of frames"
    );
    for (got, want) in frames.iter().zip(&expected.frames) {
        assert_eq!(got.as_slice(), *want, "chunking changed a frame's payload");
    }
    assert_eq!(consumed, expected.consumed);
    assert_eq!(error, expected.error, "chunking changed the framing error");
    if let Some(e) = &error {
        // Only a bad length prefix stops framing, and it leaves the stream unusable.
        assert!(e.is_fatal_to_stream(), "framing stopped on a non-fatal error: {e:?}");
        assert!(matches!(e, DecodeError::EmptyFrame | DecodeError::FrameTooLarge { .. }));
    } else {
        assert_eq!(fed, plan.stream.len());
    }

    for payload in &frames {
        check_payload(&mut encoder, payload);
    }
}

/// After the reader has returned every complete frame, `rest` is what it still holds.
fn check_pending(reader: &FrameReader, rest: &[u8], max: usize) {
    let pending = reader.pending_frame_bytes();
    match rest.first_chunk::<FRAME_HEADER_BYTES>() {
        None => assert_eq!(pending, None),
        Some(header) => match frame::payload_len(*header, max) {
            // The reader stopped at a complete bad header without an error: impossible.
            Err(e) => panic!("bad header left buffered without an error: {e:?}"),
            Ok(len) => {
                let total = FRAME_HEADER_BYTES + len;
                assert!(rest.len() < total, "a complete frame was left buffered");
                assert_eq!(pending, Some(total - rest.len()));
            }
        },
    }
}

/// Decodes one payload every way the codec offers and checks that they agree and round-trip.
pub fn check_payload(encoder: &mut Encoder, payload: &[u8]) {
    let view = codec::view_request(payload);
    let owned = codec::decode_request(payload);
    match (&view, &owned) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!(
            "view_request and decode_request disagree: {:?} vs {:?}",
            view.err(),
            owned.err()
        ),
    }
    if let Ok(req) = owned {
        let mut first = Vec::new();
        encoder.request(&req, &mut first);
        let again = codec::decode_request(whole_frame(&first)).expect("a re-encoded request must decode");
        assert_eq!(again, req, "encode then decode changed a request");
        let mut second = Vec::new();
        encoder.request(&again, &mut second);
        assert_eq!(first, second, "encoding the same request twice gave different bytes");
    }

    let view = codec::view_response(payload);
    let owned = codec::decode_response(payload);
    match (&view, &owned) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!(
            "view_response and decode_response disagree: {:?} vs {:?}",
            view.err(),
            owned.err()
        ),
    }
    if let Ok(resp) = owned {
        let mut first = Vec::new();
        encoder.response(&resp, &mut first);
        let again = codec::decode_response(whole_frame(&first)).expect("a re-encoded response must decode");
        assert_eq!(again, resp, "encode then decode changed a response");
        let mut second = Vec::new();
        encoder.response(&again, &mut second);
        assert_eq!(first, second, "encoding the same response twice gave different bytes");
    }
}

/// The payload of a frame the encoder just wrote. A re-encoded message can be larger than the
/// input it came from (shared offsets in the input are written out once per use), so no size limit
/// below what the header can express applies here.
fn whole_frame(bytes: &[u8]) -> &[u8] {
    frame::decode_whole_frame(bytes, u32::MAX as usize).expect("the encoder writes one whole frame")
}
