//! Encoding and verified decoding of `Request` and `Response` messages.
//!
//! Decoding always runs the FlatBuffers verifier with explicit limits
//! ([`verifier_options`]) and then rejects union tags this version does not
//! know. Two forms are offered: a zero-copy view (`view_*`), which the daemon
//! uses on its hot path, and owned object-API values (`decode_*`), which
//! clients and tests use.

use flatbuffers::{FlatBufferBuilder, VerifierOptions};

use crate::error::DecodeError;
use crate::frame::encode_frame;
use crate::wire::{
    AckLevel, Append, AppendArgs, Appended, AppendedArgs, ErrorCode, Record, RecordArgs, Request, RequestArgs,
    RequestBody, RequestT, Response, ResponseArgs, ResponseBody, ResponseT,
};

/// Maximum table nesting accepted. The schema nests at most five deep
/// (`Response > StatsReply > ShardStats > Percentiles`); anything deeper is hostile.
pub const VERIFY_DEPTH_MAX: usize = 16;

/// Verifier limits for a payload of `payload_len` bytes.
///
/// The table limit scales with the payload (a table needs at least 8 bytes),
/// so a full frame of tiny records verifies while a bomb of shared offsets
/// cannot make the verifier walk more than it read.
pub fn verifier_options(payload_len: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: VERIFY_DEPTH_MAX,
        max_tables: payload_len / 8 + 16,
        max_apparent_size: payload_len.saturating_mul(2).max(1 << 16),
        ignore_missing_null_terminator: false,
    }
}

fn verify<'a, T>(payload: &'a [u8]) -> Result<T::Inner, DecodeError>
where
    T: flatbuffers::Follow<'a> + flatbuffers::Verifiable + 'a,
{
    let opts = verifier_options(payload.len());
    flatbuffers::root_with_opts::<T>(&opts, payload).map_err(|e| DecodeError::Invalid { reason: e.to_string() })
}

fn check_ack(ack: AckLevel) -> Result<(), DecodeError> {
    if ack.variant_name().is_none() {
        return Err(DecodeError::BadField {
            field: "Append.ack",
            reason: format!("unknown ack level {}", ack.0),
        });
    }
    Ok(())
}

/// Verifies a request payload and returns a zero-copy view of it.
pub fn view_request(payload: &[u8]) -> Result<Request<'_>, DecodeError> {
    let req = if crate::append_verify::is_verified_append(payload) {
        // SAFETY: `is_verified_append` is true only for a payload the generic verifier below
        // accepts (see its module documentation).
        unsafe { flatbuffers::root_unchecked::<Request>(payload) }
    } else {
        verify::<Request>(payload)?
    };
    let tag = req.body_type();
    if tag == RequestBody::NONE {
        return Err(DecodeError::MissingBody);
    }
    if tag.variant_name().is_none() {
        return Err(DecodeError::UnknownMessage { tag: tag.0 });
    }
    if req.body().is_none() {
        return Err(DecodeError::MissingBody);
    }
    if let Some(append) = req.body_as_append() {
        check_ack(append.ack())?;
        let records = append.records().map(|r| r.len()).unwrap_or(0);
        if records == 0 {
            return Err(DecodeError::BadField {
                field: "Append.records",
                reason: "an append needs at least one record".into(),
            });
        }
    }
    Ok(req)
}

/// The payload and timestamp of a record of a verified request, as `payload()` and
/// `has_timestamp().then(|| timestamp())` give them, with one vtable lookup instead of three:
/// the daemon reads every record of every append this way (twice: to size it, then to copy it).
pub fn record_fields<'a>(record: &Record<'a>) -> (&'a [u8], Option<u64>) {
    let buf = record._tab.buf();
    let loc = record._tab.loc();
    // Every position below was checked by the verifier, so the slicing cannot fail; it is
    // checked anyway, so a bug would be a panic, never a read out of bounds.
    let u16_at = |p: usize| u16::from_le_bytes([buf[p], buf[p + 1]]) as usize;
    let u32_at = |p: usize| u32::from_le_bytes([buf[p], buf[p + 1], buf[p + 2], buf[p + 3]]) as usize;
    let soffset = i32::from_le_bytes([buf[loc], buf[loc + 1], buf[loc + 2], buf[loc + 3]]);
    let vtable = (loc as i64 - i64::from(soffset)) as usize;
    let vtable_len = u16_at(vtable);
    let field = |voffset: u16| {
        let voffset = voffset as usize;
        if voffset < vtable_len {
            u16_at(vtable + voffset)
        } else {
            0
        }
    };
    let payload = match field(Record::VT_PAYLOAD) {
        0 => &[][..],
        offset => {
            let at = loc + offset;
            let vector = at + u32_at(at);
            let len = u32_at(vector);
            &buf[vector + 4..vector + 4 + len]
        }
    };
    let has_timestamp = match field(Record::VT_HAS_TIMESTAMP) {
        0 => false,
        offset => buf[loc + offset] != 0,
    };
    let timestamp = has_timestamp.then(|| match field(Record::VT_TIMESTAMP) {
        0 => 0,
        offset => {
            let at = loc + offset;
            u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
        }
    });
    (payload, timestamp)
}

/// Verifies and decodes a request into an owned value.
pub fn decode_request(payload: &[u8]) -> Result<RequestT, DecodeError> {
    Ok(view_request(payload)?.unpack())
}

/// Verifies a response payload and returns a zero-copy view of it.
pub fn view_response(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let resp = verify::<Response>(payload)?;
    let tag = resp.body_type();
    if tag == ResponseBody::NONE {
        return Err(DecodeError::MissingBody);
    }
    if tag.variant_name().is_none() {
        return Err(DecodeError::UnknownMessage { tag: tag.0 });
    }
    if resp.body().is_none() {
        return Err(DecodeError::MissingBody);
    }
    Ok(resp)
}

/// Verifies and decodes a response into an owned value.
pub fn decode_response(payload: &[u8]) -> Result<ResponseT, DecodeError> {
    Ok(view_response(payload)?.unpack())
}

/// One record to encode into an `Append`, borrowed from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendRecord<'a> {
    pub payload: &'a [u8],
    pub timestamp: Option<u64>,
}

impl<'a> AppendRecord<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        AppendRecord {
            payload,
            timestamp: None,
        }
    }
}

/// Encodes messages into frames, reusing one builder.
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
    appended: AppendedTemplates,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Encoder {
            fbb: FlatBufferBuilder::with_capacity(1024),
            appended: AppendedTemplates::new(),
        }
    }

    fn finish_frame(&mut self, out: &mut Vec<u8>) {
        encode_frame(self.fbb.finished_data(), out);
        self.fbb.reset();
    }

    /// Appends a framed request to `out`.
    pub fn request(&mut self, req: &RequestT, out: &mut Vec<u8>) {
        let root = req.pack(&mut self.fbb);
        self.fbb.finish(root, None);
        self.finish_frame(out);
    }

    /// Appends a framed response to `out`.
    pub fn response(&mut self, resp: &ResponseT, out: &mut Vec<u8>) {
        let root = resp.pack(&mut self.fbb);
        self.fbb.finish(root, None);
        self.finish_frame(out);
    }

    /// Appends a framed `Append` request built straight from borrowed
    /// records, without an owned intermediate.
    pub fn append<'r>(
        &mut self,
        id: u64,
        stream: u64,
        records: impl IntoIterator<Item = AppendRecord<'r>>,
        ack: AckLevel,
        out: &mut Vec<u8>,
    ) {
        let fbb = &mut self.fbb;
        let mut offsets = Vec::new();
        for r in records {
            let payload = fbb.create_vector(r.payload);
            offsets.push(Record::create(
                fbb,
                &RecordArgs {
                    payload: Some(payload),
                    timestamp: r.timestamp.unwrap_or(0),
                    has_timestamp: r.timestamp.is_some(),
                },
            ));
        }
        let records = fbb.create_vector(&offsets);
        let body = Append::create(
            fbb,
            &AppendArgs {
                stream,
                records: Some(records),
                ack,
            },
        );
        let root = Request::create(
            fbb,
            &RequestArgs {
                id,
                body_type: RequestBody::Append,
                body: Some(body.as_union_value()),
            },
        );
        fbb.finish(root, None);
        self.finish_frame(out);
    }

    /// Appends a framed `Appended` response: the bytes [`Encoder::appended_built`] gives, copied
    /// from a template with the values patched in (see [`AppendedTemplates`]).
    pub fn appended(&mut self, id: u64, shard: u16, first_lsn: u64, count: u32, out: &mut Vec<u8>) {
        if !self.appended.encode(id, shard, first_lsn, count, out) {
            self.appended_built(id, shard, first_lsn, count, out);
        }
    }

    /// Appends a framed `Appended` response made by the FlatBuffers builder: the reference the
    /// templates are made from and tested against.
    pub fn appended_built(&mut self, id: u64, shard: u16, first_lsn: u64, count: u32, out: &mut Vec<u8>) {
        let fbb = &mut self.fbb;
        let body = Appended::create(
            fbb,
            &AppendedArgs {
                shard,
                first_lsn,
                count,
            },
        );
        let root = Response::create(
            fbb,
            &ResponseArgs {
                id,
                body_type: ResponseBody::Appended,
                body: Some(body.as_union_value()),
            },
        );
        fbb.finish(root, None);
        self.finish_frame(out);
    }

    /// Appends a framed `Error` response.
    pub fn error(&mut self, id: u64, code: ErrorCode, message: &str, out: &mut Vec<u8>) {
        self.error_frame(id, code, message, 0, out);
    }

    /// Appends a framed `Error(Truncated)` response naming the shard's first retained lsn, where
    /// the reader continues.
    pub fn truncated(&mut self, id: u64, first_available_lsn: u64, message: &str, out: &mut Vec<u8>) {
        assert!(first_available_lsn > 0, "lsns start at 1; 0 means absent");
        self.error_frame(id, ErrorCode::Truncated, message, first_available_lsn, out);
    }

    fn error_frame(&mut self, id: u64, code: ErrorCode, message: &str, first_available_lsn: u64, out: &mut Vec<u8>) {
        let fbb = &mut self.fbb;
        let message = fbb.create_string(message);
        let body = crate::wire::Error::create(
            fbb,
            &crate::wire::ErrorArgs {
                code,
                message: Some(message),
                first_available_lsn,
            },
        );
        let root = Response::create(
            fbb,
            &ResponseArgs {
                id,
                body_type: ResponseBody::Error,
                body: Some(body.as_union_value()),
            },
        );
        fbb.finish(root, None);
        self.finish_frame(out);
    }
}

/// Where one template's fields are, as offsets into its frame (header included).
#[derive(Debug, Clone)]
struct AppendedTemplate {
    frame: Vec<u8>,
    /// `None` when the template is for a zero value, which the builder leaves out.
    id_at: Option<usize>,
    shard_at: Option<usize>,
    first_lsn_at: usize,
    count_at: usize,
}

/// Framed `Appended` responses to copy and patch instead of running the FlatBuffers builder for
/// each answer, the daemon's most frequent response. The builder's layout depends only on which
/// fields it writes, never on their values (all scalars of a fixed size), and it leaves out a
/// field equal to its default (zero): so there is one template per combination of the fields
/// that may be zero on the hot path, `id` and `shard`. `first_lsn` and `count` are never zero in
/// the answer to an append (lsns start at 1; an append holds at least one record); were they, the
/// builder answers ([`Encoder::appended`]). Each template is made by the builder itself, with
/// non-zero stand-ins for the present fields, whose places are then read back through the
/// generated accessors' vtables, so nothing here restates the schema; a property test checks the
/// patched bytes against the builder's for arbitrary values (the tests below).
#[derive(Debug, Clone)]
struct AppendedTemplates {
    /// Indexed by `(id != 0) as usize * 2 + (shard != 0) as usize`.
    by_presence: [AppendedTemplate; 4],
}

impl AppendedTemplates {
    fn new() -> AppendedTemplates {
        let mut fbb = FlatBufferBuilder::with_capacity(256);
        let by_presence = [(false, false), (false, true), (true, false), (true, true)]
            .map(|(has_id, has_shard)| AppendedTemplate::build(&mut fbb, has_id, has_shard));
        AppendedTemplates { by_presence }
    }

    /// Appends the framed response to `out`; `false` (and nothing appended) when no template
    /// fits, for a zero `first_lsn` or `count`.
    fn encode(&self, id: u64, shard: u16, first_lsn: u64, count: u32, out: &mut Vec<u8>) -> bool {
        if first_lsn == 0 || count == 0 {
            return false;
        }
        let t = &self.by_presence[usize::from(id != 0) * 2 + usize::from(shard != 0)];
        let at = out.len();
        out.extend_from_slice(&t.frame);
        let frame = &mut out[at..];
        if let Some(i) = t.id_at {
            frame[i..i + 8].copy_from_slice(&id.to_le_bytes());
        }
        if let Some(i) = t.shard_at {
            frame[i..i + 2].copy_from_slice(&shard.to_le_bytes());
        }
        frame[t.first_lsn_at..t.first_lsn_at + 8].copy_from_slice(&first_lsn.to_le_bytes());
        frame[t.count_at..t.count_at + 4].copy_from_slice(&count.to_le_bytes());
        true
    }
}

impl AppendedTemplate {
    fn build(fbb: &mut FlatBufferBuilder<'static>, has_id: bool, has_shard: bool) -> AppendedTemplate {
        let body = Appended::create(
            fbb,
            &AppendedArgs {
                shard: u16::from(has_shard),
                first_lsn: 1,
                count: 1,
            },
        );
        let root = Response::create(
            fbb,
            &ResponseArgs {
                id: u64::from(has_id),
                body_type: ResponseBody::Appended,
                body: Some(body.as_union_value()),
            },
        );
        fbb.finish(root, None);
        let mut frame = Vec::new();
        encode_frame(fbb.finished_data(), &mut frame);
        fbb.reset();
        let payload = &frame[crate::frame::FRAME_HEADER_BYTES..];
        let response = flatbuffers::root::<Response>(payload).expect("the builder's own output verifies");
        let appended = response.body_as_appended().expect("built as Appended");
        // A field's place in the frame: its table's place plus the offset its vtable gives
        // (zero when the field was left out).
        let place = |table: &flatbuffers::Table, voffset: flatbuffers::VOffsetT| {
            let offset = table.vtable().get(voffset);
            (offset != 0).then(|| crate::frame::FRAME_HEADER_BYTES + table.loc() + usize::from(offset))
        };
        let t = AppendedTemplate {
            id_at: place(&response._tab, Response::VT_ID),
            shard_at: place(&appended._tab, Appended::VT_SHARD),
            first_lsn_at: place(&appended._tab, Appended::VT_FIRST_LSN).expect("first_lsn is written"),
            count_at: place(&appended._tab, Appended::VT_COUNT).expect("count is written"),
            frame,
        };
        assert_eq!(t.id_at.is_some(), has_id);
        assert_eq!(t.shard_at.is_some(), has_shard);
        t
    }
}

/// The name of a response body, for error messages.
pub fn response_kind(body: &crate::wire::ResponseBodyT) -> &'static str {
    use crate::wire::ResponseBodyT as B;
    match body {
        B::NONE => "nothing",
        B::HelloOk(_) => "HelloOk",
        B::Appended(_) => "Appended",
        B::Records(_) => "Records",
        B::StatsReply(_) => "StatsReply",
        B::Pong(_) => "Pong",
        B::Error(_) => "Error",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::{decode_whole_frame, FRAME_BYTES_MAX_DEFAULT};
    use crate::wire::{AppendedT, ResponseBodyT};

    /// Values with a good share of the zeros and extremes that change the builder's layout.
    fn arb_u64() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), Just(1), Just(u64::MAX), any::<u64>()]
    }

    fn arb_u32() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0), Just(1), Just(u32::MAX), any::<u32>()]
    }

    fn arb_u16() -> impl Strategy<Value = u16> {
        prop_oneof![Just(0), Just(1), Just(u16::MAX), any::<u16>()]
    }

    #[test]
    fn every_template_is_the_builders_output() {
        for id in [0, 1, u64::MAX] {
            for shard in [0, 1, u16::MAX] {
                let mut enc = Encoder::new();
                let (mut patched, mut built) = (Vec::new(), Vec::new());
                enc.appended(id, shard, 1, 1, &mut patched);
                enc.appended_built(id, shard, 1, 1, &mut built);
                assert_eq!(patched, built, "id {id} shard {shard}");
            }
        }
    }

    proptest! {
        /// The patched template is byte for byte what the builder makes, whatever the values
        /// and whatever the encoder encoded before (its builder's state must not matter), and
        /// it decodes to those values.
        #[test]
        fn patched_appended_equals_builder(
            id in arb_u64(),
            shard in arb_u16(),
            first_lsn in arb_u64(),
            count in arb_u32(),
            before in proptest::option::of(0usize..300),
            prefix in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut enc = Encoder::new();
            let mut scratch = Vec::new();
            if let Some(len) = before {
                // Leaves the builder grown and reset, as the daemon's encoder is.
                enc.error(3, ErrorCode::Busy, &"x".repeat(len), &mut scratch);
            }
            let mut patched = prefix.clone();
            enc.appended(id, shard, first_lsn, count, &mut patched);
            let mut built = prefix.clone();
            Encoder::new().appended_built(id, shard, first_lsn, count, &mut built);
            prop_assert_eq!(&patched, &built);

            let payload = decode_whole_frame(&patched[prefix.len()..], FRAME_BYTES_MAX_DEFAULT).unwrap();
            let resp = decode_response(payload).unwrap();
            prop_assert_eq!(
                resp,
                ResponseT {
                    id,
                    body: ResponseBodyT::Appended(Box::new(AppendedT { shard, first_lsn, count })),
                }
            );
        }

        /// Several answers appended to one buffer, as a connection's writer collects them.
        #[test]
        fn patched_appended_concatenate(values in proptest::collection::vec((arb_u64(), arb_u16(), 1..u64::MAX, 1..u32::MAX), 1..20)) {
            let mut enc = Encoder::new();
            let (mut patched, mut built) = (Vec::new(), Vec::new());
            for &(id, shard, first_lsn, count) in &values {
                enc.appended(id, shard, first_lsn, count, &mut patched);
                enc.appended_built(id, shard, first_lsn, count, &mut built);
            }
            prop_assert_eq!(patched, built);
        }
    }
}
