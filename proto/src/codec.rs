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

    /// Appends a framed `Appended` response.
    pub fn appended(&mut self, id: u64, shard: u16, first_lsn: u64, count: u32, out: &mut Vec<u8>) {
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
