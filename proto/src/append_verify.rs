//! A verifier for the one request the daemon sees most: `Request { body: Append }`.
//!
//! Why: FlatBuffers' generic verifier is correct but costly per field (each check returns a large
//! `Result` and passes through an out-of-line error-trace helper): at 100-byte records it was
//! about a fifth of the daemon's CPU. This walks the same structure with the same checks, in
//! straight-line code, and answers only "yes, the generic verifier accepts this" or "don't know".
//!
//! The contract: [`is_verified_append`] returns true only for a payload that
//! `flatbuffers::root_with_opts::<Request>(&verifier_options(len), payload)` accepts, so the
//! caller may then read it with `root_unchecked`. It makes every check the generic verifier makes
//! on this schema (alignment relative to the buffer start, ranges, signed vtable offsets, the
//! table count and the "apparent size" sum of [`crate::codec::verifier_options`]). Any doubt,
//! including any other request kind, returns false, and the caller runs the generic verifier,
//! which also produces the typed error. `tests/append_verify.rs` checks the contract against the
//! generic verifier on valid and mutated appends.

use flatbuffers::ForwardsUOffset;

use crate::wire::{Append, Record, Request, RequestBody};

const UOFFSET_BYTES: usize = 4;

/// The checks of `flatbuffers::Verifier`, each returning `None` where it would return an error.
struct Walk<'a> {
    buf: &'a [u8],
    /// The verifier's "apparent size": the bytes of every range checked, repeats included.
    apparent: usize,
    tables: usize,
}

impl<'a> Walk<'a> {
    /// `range_in_buffer`.
    #[inline(always)]
    fn range(&mut self, pos: usize, size: usize) -> Option<()> {
        if pos.saturating_add(size) > self.buf.len() {
            return None;
        }
        self.apparent = self.apparent.saturating_add(size);
        Some(())
    }

    /// `in_buffer::<T>`: aligned to `T` (relative to the buffer's start) and inside it.
    #[inline(always)]
    fn scalar<T>(&mut self, pos: usize) -> Option<()> {
        if pos % std::mem::align_of::<T>() != 0 {
            return None;
        }
        self.range(pos, std::mem::size_of::<T>())
    }

    #[inline(always)]
    fn u16_at(&mut self, pos: usize) -> Option<usize> {
        self.scalar::<u16>(pos)?;
        Some(u16::from_le_bytes([self.buf[pos], self.buf[pos + 1]]) as usize)
    }

    #[inline(always)]
    fn u32_at(&mut self, pos: usize) -> Option<u32> {
        self.scalar::<u32>(pos)?;
        let b = self.buf[pos..pos + 4].try_into().ok()?;
        Some(u32::from_le_bytes(b))
    }

    /// `ForwardsUOffset::run_verifier` up to the target: where the offset at `pos` points.
    #[inline(always)]
    fn follow(&mut self, pos: usize) -> Option<usize> {
        Some((self.u32_at(pos)? as usize).saturating_add(pos))
    }

    /// `visit_table`: the table at `pos`, as (table, vtable, vtable length).
    #[inline(always)]
    fn table(&mut self, pos: usize) -> Option<Table> {
        self.scalar::<i32>(pos)?;
        let soffset = i32::from_le_bytes(self.buf[pos..pos + 4].try_into().ok()?);
        let vtable = if soffset > 0 {
            pos.checked_sub(soffset.unsigned_abs() as usize)?
        } else {
            pos.checked_add(soffset.unsigned_abs() as usize)?
        };
        if vtable >= self.buf.len() {
            return None;
        }
        let vtable_len = self.u16_at(vtable)?;
        if vtable.saturating_add(vtable_len) % 2 != 0 {
            return None;
        }
        self.range(vtable, vtable_len)?;
        self.tables += 1;
        Some(Table {
            pos,
            vtable,
            vtable_len,
        })
    }

    /// `TableVerifier::deref`: where field `voffset` of `t` is, if present.
    #[inline(always)]
    fn field(&mut self, t: &Table, voffset: u16) -> Option<Option<usize>> {
        let voffset = voffset as usize;
        if voffset >= t.vtable_len {
            return Some(None);
        }
        let offset = self.u16_at(t.vtable.saturating_add(voffset))?;
        Some((offset > 0).then(|| t.pos.saturating_add(offset)))
    }

    /// `visit_field` of a scalar `T`.
    #[inline(always)]
    fn scalar_field<T>(&mut self, t: &Table, voffset: u16) -> Option<()> {
        if let Some(pos) = self.field(t, voffset)? {
            self.scalar::<T>(pos)?;
        }
        Some(())
    }

    /// `verify_vector_range::<T>` of the vector at `pos`: (start, length).
    #[inline(always)]
    fn vector<T>(&mut self, pos: usize) -> Option<(usize, usize)> {
        let len = self.u32_at(pos)? as usize;
        let start = pos.saturating_add(UOFFSET_BYTES);
        if start % std::mem::align_of::<T>() != 0 {
            return None;
        }
        self.range(start, len.saturating_mul(std::mem::size_of::<T>()))?;
        Some((start, len))
    }

    fn record(&mut self, pos: usize) -> Option<()> {
        let t = self.table(pos)?;
        if let Some(at) = self.field(&t, Record::VT_PAYLOAD)? {
            let vector = self.follow(at)?;
            self.vector::<u8>(vector)?;
        }
        self.scalar_field::<u64>(&t, Record::VT_TIMESTAMP)?;
        self.scalar_field::<bool>(&t, Record::VT_HAS_TIMESTAMP)
    }

    fn append(&mut self, pos: usize) -> Option<()> {
        let t = self.table(pos)?;
        self.scalar_field::<u64>(&t, Append::VT_STREAM)?;
        if let Some(at) = self.field(&t, Append::VT_RECORDS)? {
            let vector = self.follow(at)?;
            let (start, len) = self.vector::<ForwardsUOffset<Record>>(vector)?;
            for i in 0..len {
                let record = self.follow(start + i * std::mem::size_of::<ForwardsUOffset<Record>>())?;
                self.record(record)?;
            }
        }
        self.scalar_field::<u8>(&t, Append::VT_ACK)
    }

    fn request(&mut self) -> Option<()> {
        let root = self.follow(0)?;
        let t = self.table(root)?;
        self.scalar_field::<u64>(&t, Request::VT_ID)?;
        // The union's value is looked up before its key, as the generic verifier does (it makes
        // no difference to the outcome, only to the order of the sums).
        let value = self.field(&t, Request::VT_BODY)?;
        let key = self.field(&t, Request::VT_BODY_TYPE)?;
        let (Some(key), Some(value)) = (key, value) else {
            return None;
        };
        self.scalar::<u8>(key)?;
        if RequestBody(self.buf[key]) != RequestBody::Append {
            return None;
        }
        let append = self.follow(value)?;
        self.append(append)
    }
}

struct Table {
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

/// Whether `payload` is a `Request` with an `Append` body that the generic FlatBuffers verifier,
/// with [`crate::codec::verifier_options`] for its length, accepts. False means "not known": the
/// caller must run the generic verifier. See the module documentation.
pub fn is_verified_append(payload: &[u8]) -> bool {
    let opts = crate::codec::verifier_options(payload.len());
    let mut walk = Walk {
        buf: payload,
        apparent: 0,
        tables: 0,
    };
    // Request > Append > Record: three levels, within any depth limit of ours.
    const _: () = assert!(crate::codec::VERIFY_DEPTH_MAX >= 3);
    walk.request().is_some() && walk.tables <= opts.max_tables && walk.apparent <= opts.max_apparent_size
}
