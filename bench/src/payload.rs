//! Self-describing record payloads.
//!
//! Every payload starts with a fixed header naming who wrote it and in what
//! order, so a reader can check per-stream order without any other state:
//!
//! ```text
//! offset  bytes  field
//!      0      4  magic "SLB1"
//!      4      4  run id (u32 LE): random per generator invocation
//!      8      4  writer (u32 LE): the connection index within the run
//!     12      8  stream (u64 LE)
//!     20      8  seq (u64 LE): per (run, writer, stream), from 0, +1 per record
//!     28      -  filler up to the record size
//! ```
//!
//! One writer sends the records of one stream in `seq` order on one
//! connection, and the daemon keeps the order of one connection's appends to
//! one stream, so in the log the `seq` of a `(run, writer, stream)` must rise
//! with the lsn.

use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::rng::Rng;

pub const PAYLOAD_MAGIC: [u8; 4] = *b"SLB1";
pub const PAYLOAD_HEADER_BYTES: usize = 28;

/// Records above this are refused: a frame must stay below the daemon's 4 MiB frame limit.
pub const RECORD_BYTES_MAX: usize = 1 << 20;

const FILLER_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadHeader {
    pub run: u32,
    pub writer: u32,
    pub stream: u64,
    pub seq: u64,
}

impl PayloadHeader {
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= PAYLOAD_HEADER_BYTES);
        out[0..4].copy_from_slice(&PAYLOAD_MAGIC);
        out[4..8].copy_from_slice(&self.run.to_le_bytes());
        out[8..12].copy_from_slice(&self.writer.to_le_bytes());
        out[12..20].copy_from_slice(&self.stream.to_le_bytes());
        out[20..28].copy_from_slice(&self.seq.to_le_bytes());
    }

    /// `None` when the payload was not written by this generator.
    pub fn decode(payload: &[u8]) -> Option<PayloadHeader> {
        if payload.len() < PAYLOAD_HEADER_BYTES || payload[0..4] != PAYLOAD_MAGIC {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        Some(PayloadHeader {
            run: u32_at(4),
            writer: u32_at(8),
            stream: u64_at(12),
            seq: u64_at(20),
        })
    }
}

/// Random-looking filler, so payloads do not compress to nothing anywhere on the path.
fn filler() -> &'static [u8] {
    static FILLER: OnceLock<Vec<u8>> = OnceLock::new();
    FILLER.get_or_init(|| {
        let mut rng = Rng::new(0x5348_4152_444c_4f47);
        let mut bytes = Vec::with_capacity(FILLER_BYTES);
        while bytes.len() < FILLER_BYTES {
            bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        bytes
    })
}

/// Writes a whole payload (header, then filler) into `out`.
pub fn fill_payload(header: &PayloadHeader, out: &mut [u8]) {
    header.encode(out);
    let fill = filler();
    // Start the filler at a seq-dependent offset so consecutive records differ throughout.
    let mut src = (header.seq as usize).wrapping_mul(4099) % FILLER_BYTES;
    let mut at = PAYLOAD_HEADER_BYTES;
    while at < out.len() {
        let n = (out.len() - at).min(FILLER_BYTES - src);
        out[at..at + n].copy_from_slice(&fill[src..src + n]);
        at += n;
        src = 0;
    }
}

/// Record sizes: fixed (`100`) or uniform over an inclusive range (`100..1024`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    pub min: usize,
    pub max: usize,
}

impl SizeRange {
    pub fn fixed(bytes: usize) -> Self {
        SizeRange { min: bytes, max: bytes }
    }

    pub fn range(&self) -> RangeInclusive<usize> {
        self.min..=self.max
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        if self.min == self.max {
            return self.min;
        }
        self.min + rng.below((self.max - self.min + 1) as u64) as usize
    }

    /// Mean record size, for sizing buffers and estimating MB/s.
    pub fn mean(&self) -> f64 {
        (self.min + self.max) as f64 / 2.0
    }
}

impl std::fmt::Display for SizeRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

impl FromStr for SizeRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|e| format!("`{t}` is not a byte count: {e}"))
        };
        let range = match s.split_once("..") {
            Some((lo, hi)) => SizeRange {
                min: parse(lo)?,
                max: parse(hi.trim_start_matches('='))?,
            },
            None => SizeRange::fixed(parse(s)?),
        };
        if range.min > range.max {
            return Err(format!("record size range {s} is empty (min > max)"));
        }
        if range.min < PAYLOAD_HEADER_BYTES {
            return Err(format!(
                "records must be at least {PAYLOAD_HEADER_BYTES} bytes: each carries a header (run, writer, stream, seq) \
                 that `verify` uses to check order"
            ));
        }
        if range.max > RECORD_BYTES_MAX {
            return Err(format!("records above {RECORD_BYTES_MAX} bytes are not supported"));
        }
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips(run: u32, writer: u32, stream: u64, seq: u64, len in PAYLOAD_HEADER_BYTES..5000usize) {
            let header = PayloadHeader { run, writer, stream, seq };
            let mut buf = vec![0u8; len];
            fill_payload(&header, &mut buf);
            prop_assert_eq!(PayloadHeader::decode(&buf), Some(header));
        }
    }

    #[test]
    fn foreign_payloads_are_not_mistaken_for_ours() {
        assert_eq!(PayloadHeader::decode(b"hello"), None);
        assert_eq!(PayloadHeader::decode(&[0u8; 64]), None);
    }

    #[test]
    fn filler_differs_between_consecutive_records() {
        let mut a = vec![0u8; 200];
        let mut b = vec![0u8; 200];
        let h = PayloadHeader {
            run: 1,
            writer: 2,
            stream: 3,
            seq: 4,
        };
        fill_payload(&h, &mut a);
        fill_payload(&PayloadHeader { seq: 5, ..h }, &mut b);
        assert_ne!(a[PAYLOAD_HEADER_BYTES..], b[PAYLOAD_HEADER_BYTES..]);
    }

    #[test]
    fn payload_longer_than_the_filler_is_filled_to_the_end() {
        let mut buf = vec![0u8; FILLER_BYTES * 2 + 100];
        fill_payload(
            &PayloadHeader {
                run: 1,
                writer: 0,
                stream: 0,
                seq: 0,
            },
            &mut buf,
        );
        let tail = &buf[buf.len() - 64..];
        assert!(tail.iter().any(|&b| b != 0));
    }

    #[test]
    fn size_ranges_parse() {
        assert_eq!("100".parse::<SizeRange>(), Ok(SizeRange::fixed(100)));
        assert_eq!("100..1024".parse::<SizeRange>(), Ok(SizeRange { min: 100, max: 1024 }));
        assert_eq!("100..=1024".parse::<SizeRange>(), Ok(SizeRange { min: 100, max: 1024 }));
        assert!("1024..100".parse::<SizeRange>().is_err());
        assert!("10".parse::<SizeRange>().is_err(), "below the header size");
        assert!("abc".parse::<SizeRange>().is_err());
    }

    #[test]
    fn sizes_sample_within_the_range() {
        let range = SizeRange { min: 100, max: 110 };
        let mut rng = Rng::new(9);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let n = range.sample(&mut rng);
            assert!(range.range().contains(&n));
            seen.insert(n);
        }
        assert_eq!(seen.len(), 11, "both ends are reachable");
    }
}
