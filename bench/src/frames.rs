//! Append frames built for the least CPU per request, and `Appended`
//! responses read in place.
//!
//! **Requests.** With a fixed record size every `Append` of a run has the same
//! FlatBuffers layout; only the request id, the stream and the 28-byte payload
//! headers differ. [`AppendFrames`] therefore encodes one template frame with
//! the `flatbuffers` builder at start-up, finds where those fields live in it,
//! and builds each request by copying the template into the socket's output
//! buffer and patching them. The filler after each payload header is the
//! template's (the same for every record of a connection). With a range of
//! record sizes the layout changes per request, and the builder encodes each
//! frame (reused, so no allocation per request either).
//!
//! **Responses.** [`read_appended`] reads `Response { id, body: Appended }`
//! straight from the received bytes with bounds-checked loads and without the
//! FlatBuffers verifier. Anything else (an `Error`, another body, a layout it
//! does not expect) returns `None`, and the caller decodes the frame with the
//! verifying codec. A run that writes a verify log verifies every response.

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use proto::wire::{
    AckLevel, Append, AppendArgs, Appended, Record, RecordArgs, Request, RequestArgs, RequestBody, Response,
    ResponseBody,
};

use crate::payload::{fill_payload, PayloadHeader, SizeRange, PAYLOAD_HEADER_BYTES};
use crate::rng::Rng;

/// Bytes of the frame's length prefix.
const FRAME_HEADER_BYTES: usize = proto::frame::FRAME_HEADER_BYTES;

/// Who writes the payloads: the payload header fields fixed for one connection.
#[derive(Debug, Clone, Copy)]
pub struct Writer {
    pub run: u32,
    pub writer: u32,
}

/// What one encoded append holds, for the ack and the verify log.
#[derive(Debug, Default)]
pub struct Encoded {
    pub records: u32,
    pub bytes: u64,
    /// Payload lengths and CRC32Cs, filled only when asked for (verify log).
    pub lens: Vec<u32>,
    pub crcs: Vec<u32>,
}

/// A template frame and where its variable fields are.
struct Template {
    frame: Vec<u8>,
    id_at: usize,
    stream_at: usize,
    payload_at: Vec<usize>,
    payload_len: usize,
}

/// Encodes `Append` frames into caller-owned buffers.
pub struct AppendFrames {
    ack: AckLevel,
    records_per_frame: u32,
    sizes: SizeRange,
    template: Option<Template>,
    fbb: FlatBufferBuilder<'static>,
    offsets: Vec<WIPOffset<Record<'static>>>,
    payload: Vec<u8>,
}

impl AppendFrames {
    pub fn new(ack: AckLevel, records_per_frame: u32, sizes: SizeRange, writer: Writer) -> AppendFrames {
        assert!(records_per_frame > 0);
        let mut frames = AppendFrames {
            ack,
            records_per_frame,
            sizes,
            template: None,
            fbb: FlatBufferBuilder::with_capacity(4096),
            offsets: Vec::new(),
            payload: Vec::new(),
        };
        if sizes.min == sizes.max {
            frames.template = Some(frames.build_template(writer));
        }
        frames
    }

    /// Whether frames are patched copies of one template (fixed record size).
    pub fn templated(&self) -> bool {
        self.template.is_some()
    }

    /// Appends one framed `Append` of `records_per_frame` records for `stream` to `out`.
    /// Record `i` carries seq `first_seq + i`. With `checksums`, `enc` receives each
    /// payload's length and CRC32C.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &mut self,
        id: u64,
        stream: u64,
        writer: Writer,
        first_seq: u64,
        rng: &mut Rng,
        checksums: bool,
        out: &mut Vec<u8>,
        enc: &mut Encoded,
    ) {
        enc.lens.clear();
        enc.crcs.clear();
        let start = out.len();
        match &self.template {
            Some(t) => {
                out.extend_from_slice(&t.frame);
                let frame = &mut out[start..];
                frame[t.id_at..t.id_at + 8].copy_from_slice(&id.to_le_bytes());
                frame[t.stream_at..t.stream_at + 8].copy_from_slice(&stream.to_le_bytes());
                for (i, &at) in t.payload_at.iter().enumerate() {
                    let header = PayloadHeader {
                        run: writer.run,
                        writer: writer.writer,
                        stream,
                        seq: first_seq + i as u64,
                    };
                    header.encode(&mut frame[at..at + PAYLOAD_HEADER_BYTES]);
                    if checksums {
                        enc.lens.push(t.payload_len as u32);
                        enc.crcs.push(crc32c::crc32c(&frame[at..at + t.payload_len]));
                    }
                }
                enc.records = self.records_per_frame;
                enc.bytes = t.payload_len as u64 * u64::from(self.records_per_frame);
            }
            None => {
                let bytes = self.build(id, stream, writer, first_seq, rng, checksums, enc);
                let data = self.fbb.finished_data();
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(data);
                self.fbb.reset();
                enc.records = self.records_per_frame;
                enc.bytes = bytes;
            }
        }
    }

    /// Builds one request in `fbb` (finished, not reset); returns the payload bytes.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        id: u64,
        stream: u64,
        writer: Writer,
        first_seq: u64,
        rng: &mut Rng,
        checksums: bool,
        enc: &mut Encoded,
    ) -> u64 {
        self.fbb.reset();
        self.offsets.clear();
        let mut bytes = 0u64;
        for i in 0..self.records_per_frame {
            let len = self.sizes.sample(rng);
            self.payload.resize(len, 0);
            let header = PayloadHeader {
                run: writer.run,
                writer: writer.writer,
                stream,
                seq: first_seq + u64::from(i),
            };
            fill_payload(&header, &mut self.payload);
            if checksums {
                enc.lens.push(len as u32);
                enc.crcs.push(crc32c::crc32c(&self.payload));
            }
            bytes += len as u64;
            let payload = self.fbb.create_vector(&self.payload);
            self.offsets.push(Record::create(
                &mut self.fbb,
                &RecordArgs {
                    payload: Some(payload),
                    timestamp: 0,
                    has_timestamp: false,
                },
            ));
        }
        let records = self.fbb.create_vector(&self.offsets);
        let body = Append::create(
            &mut self.fbb,
            &AppendArgs {
                stream,
                records: Some(records),
                ack: self.ack,
            },
        );
        let root = Request::create(
            &mut self.fbb,
            &RequestArgs {
                id,
                body_type: RequestBody::Append,
                body: Some(body.as_union_value()),
            },
        );
        self.fbb.finish(root, None);
        bytes
    }

    /// Encodes one frame with non-default id and stream (so both are present in the buffer)
    /// and finds the fields to patch.
    fn build_template(&mut self, writer: Writer) -> Template {
        const SENTINEL: u64 = u64::MAX;
        let mut rng = Rng::new(0);
        let mut scratch = Encoded::default();
        let payload_len = self.sizes.min;
        self.build(SENTINEL, SENTINEL, writer, 0, &mut rng, false, &mut scratch);
        let data = self.fbb.finished_data();
        let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + data.len());
        frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
        frame.extend_from_slice(data);
        self.fbb.reset();

        let b = &frame[FRAME_HEADER_BYTES..];
        let at = |pos: usize| pos + FRAME_HEADER_BYTES;
        let root = table_at(b, 0).expect("template: root");
        let id_at = field(b, root, Request::VT_ID).expect("template: id present");
        let body = field(b, root, Request::VT_BODY)
            .and_then(|p| table_at(b, p))
            .expect("template: body");
        let stream_at = field(b, body, Append::VT_STREAM).expect("template: stream present");
        let records = field(b, body, Append::VT_RECORDS)
            .and_then(|p| table_at(b, p))
            .expect("template: records");
        let count = read_u32(b, records).expect("template: record count") as usize;
        assert_eq!(count, self.records_per_frame as usize);
        let mut payload_at = Vec::with_capacity(count);
        for i in 0..count {
            let record = table_at(b, records + 4 + 4 * i).expect("template: record");
            let vector = field(b, record, Record::VT_PAYLOAD)
                .and_then(|p| table_at(b, p))
                .expect("template: payload");
            assert_eq!(read_u32(b, vector), Some(payload_len as u32));
            payload_at.push(at(vector + 4));
        }
        assert_eq!(read_u64(b, id_at), Some(SENTINEL));
        assert_eq!(read_u64(b, stream_at), Some(SENTINEL));
        Template {
            id_at: at(id_at),
            stream_at: at(stream_at),
            payload_at,
            payload_len,
            frame,
        }
    }
}

/// An `Appended` answer, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendedView {
    pub id: u64,
    pub shard: u16,
    pub first_lsn: u64,
    pub count: u32,
}

/// Reads `Response { id, body: Appended { .. } }` from a frame's payload without
/// the verifier. `None` when the payload is anything else or not laid out as
/// expected: decode it with the verifying codec then.
pub fn read_appended(payload: &[u8]) -> Option<AppendedView> {
    let root = table_at(payload, 0)?;
    let tag = field(payload, root, Response::VT_BODY_TYPE).map_or(Some(0), |p| payload.get(p).copied())?;
    if tag != ResponseBody::Appended.0 {
        return None;
    }
    let id = scalar(payload, root, Response::VT_ID, read_u64)?;
    let body = table_at(payload, field(payload, root, Response::VT_BODY)?)?;
    Some(AppendedView {
        id,
        shard: scalar(payload, body, Appended::VT_SHARD, read_u16)?,
        first_lsn: scalar(payload, body, Appended::VT_FIRST_LSN, read_u64)?,
        count: scalar(payload, body, Appended::VT_COUNT, read_u32)?,
    })
}

/// The id of any response, read in place (`None` if it cannot be read).
pub fn read_response_id(payload: &[u8]) -> Option<u64> {
    let root = table_at(payload, 0)?;
    scalar(payload, root, Response::VT_ID, read_u64)
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(*b.get(at..)?.first_chunk()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*b.get(at..)?.first_chunk()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(*b.get(at..)?.first_chunk()?))
}

/// Follows the unsigned offset stored at `at` (to a table or a vector).
fn table_at(b: &[u8], at: usize) -> Option<usize> {
    let target = at.checked_add(read_u32(b, at)? as usize)?;
    (target < b.len()).then_some(target)
}

/// Where field `vt` of the table at `table` is stored; `None` when it is absent.
fn field(b: &[u8], table: usize, vt: u16) -> Option<usize> {
    let soffset = i32::from_le_bytes(*b.get(table..)?.first_chunk()?);
    let vtable = usize::try_from(table as i64 - i64::from(soffset)).ok()?;
    let vtable_len = read_u16(b, vtable)?;
    if vt + 2 > vtable_len {
        return None;
    }
    match read_u16(b, vtable + usize::from(vt))? {
        0 => None,
        off => table.checked_add(usize::from(off)),
    }
}

/// A scalar field, or 0 (every default read here is 0) when absent.
fn scalar<T: Default>(b: &[u8], table: usize, vt: u16, read: fn(&[u8], usize) -> Option<T>) -> Option<T> {
    match field(b, table, vt) {
        Some(at) => read(b, at),
        None => Some(T::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;
    use proto::codec::{view_request, Encoder};
    use proto::frame::{decode_whole_frame, FRAME_BYTES_MAX_DEFAULT};
    use proto::wire::ErrorCode;

    const WRITER: Writer = Writer { run: 7, writer: 3 };

    fn decode(frame: &[u8]) -> proto::wire::RequestT {
        let payload = decode_whole_frame(frame, FRAME_BYTES_MAX_DEFAULT).expect("one whole frame");
        view_request(payload).expect("the verifier accepts it").unpack()
    }

    fn check_frames(sizes: SizeRange, records: u32, ack: AckLevel) {
        let mut frames = AppendFrames::new(ack, records, sizes, WRITER);
        assert_eq!(frames.templated(), sizes.min == sizes.max);
        let mut rng = Rng::new(1);
        let mut enc = Encoded::default();
        for (id, stream, seq) in [(1u64, 0u64, 0u64), (2, 42, 5), (u64::MAX - 1, u64::MAX, 1 << 40)] {
            let mut out = vec![0xAA; 3]; // bytes already queued stay untouched
            frames.encode(id, stream, WRITER, seq, &mut rng, true, &mut out, &mut enc);
            assert_eq!(out[..3], [0xAA; 3]);
            let req = decode(&out[3..]);
            assert_eq!(req.id, id);
            let proto::wire::RequestBodyT::Append(append) = req.body else {
                panic!("not an Append")
            };
            assert_eq!(append.stream, stream);
            assert_eq!(append.ack, ack);
            let recs = append.records.expect("records");
            assert_eq!(recs.len(), records as usize);
            assert_eq!(enc.records, records);
            let mut bytes = 0;
            for (i, r) in recs.iter().enumerate() {
                let payload = r.payload.as_deref().expect("payload");
                assert!(sizes.range().contains(&payload.len()));
                let header = PayloadHeader::decode(payload).expect("our header");
                assert_eq!(
                    header,
                    PayloadHeader {
                        run: WRITER.run,
                        writer: WRITER.writer,
                        stream,
                        seq: seq + i as u64
                    }
                );
                assert_eq!(enc.lens[i] as usize, payload.len());
                assert_eq!(enc.crcs[i], crc32c::crc32c(payload));
                bytes += payload.len() as u64;
            }
            assert_eq!(enc.bytes, bytes);
        }
    }

    #[test]
    fn templated_frames_decode_with_their_id_stream_and_seqs() {
        check_frames(SizeRange::fixed(100), 1, AckLevel::Durable);
        check_frames(SizeRange::fixed(1024), 64, AckLevel::Written);
        check_frames(SizeRange::fixed(28), 3, AckLevel::None);
    }

    #[test]
    fn built_frames_decode_with_their_id_stream_and_seqs() {
        check_frames(SizeRange { min: 28, max: 300 }, 1, AckLevel::Durable);
        check_frames(SizeRange { min: 100, max: 2000 }, 8, AckLevel::None);
    }

    #[test]
    fn appended_is_read_in_place() {
        let mut enc = Encoder::new();
        for (id, shard, lsn, count) in [
            (0u64, 0u16, 0u64, 0u32),
            (9, 3, 17, 64),
            (u64::MAX, u16::MAX, u64::MAX, 1),
        ] {
            let mut out = Vec::new();
            enc.appended(id, shard, lsn, count, &mut out);
            let payload = decode_whole_frame(&out, FRAME_BYTES_MAX_DEFAULT).expect("frame");
            let view = read_appended(payload).expect("an Appended");
            assert_eq!(
                view,
                AppendedView {
                    id,
                    shard,
                    first_lsn: lsn,
                    count
                }
            );
            assert_eq!(read_response_id(payload), Some(id));
        }
    }

    #[test]
    fn other_responses_are_left_to_the_verifying_codec() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.error(5, ErrorCode::Busy, "queue full", &mut out);
        let payload = decode_whole_frame(&out, FRAME_BYTES_MAX_DEFAULT).expect("frame");
        assert_eq!(read_appended(payload), None);
        assert_eq!(read_response_id(payload), Some(5));
    }

    proptest! {
        /// Whatever arrives, the in-place reader returns without panicking.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_appended(&bytes);
            let _ = read_response_id(&bytes);
        }

        /// Truncating or flipping a byte of a real answer is caught or read consistently:
        /// whatever the reader accepts lies within the buffer.
        #[test]
        fn damaged_answers_never_panic(cut in 0usize..64, flip in 0usize..64, bit in 0u8..8) {
            let mut out = Vec::new();
            Encoder::new().appended(77, 2, 1000, 4, &mut out);
            let mut payload = out[FRAME_HEADER_BYTES..].to_vec();
            if flip < payload.len() {
                payload[flip] ^= 1 << bit;
            }
            payload.truncate(payload.len().saturating_sub(cut));
            let _ = read_appended(&payload);
        }
    }
}
