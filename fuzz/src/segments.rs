//! The `segment_scanner` property: what recovery accepts from arbitrary segment bytes.
//!
//! The checks compare the shards crate's parsing against [`spec`], a second implementation of the
//! segment format written from its description (shards/src/format.rs module docs), so a bug has to
//! be made twice, the same way, to go unnoticed. For any segment image:
//! - Nothing panics: `SegmentHeader::decode`, `parse_commit`, `RecordIter`, `find_valid_commits`.
//! - `parse_commit` accepts a commit exactly when the format says it is valid (magic, segment
//!   sequence, CRC32C over header and body, non-zero count and lsn, an lsn range that fits in a
//!   u64, record framing that fills the body and matches the count), and then returns the same
//!   fields and records. In particular it never returns a commit, or a record, whose checksum does
//!   not match.
//! - The chain recovery walks (commits back to back from `SEGMENT_DATA_OFFSET`, lsns contiguous from
//!   the base lsn) ends where the format says, with a stop reason exactly when the log did not end at
//!   zeros or at the end of the data.
//! - `find_valid_commits` over what follows the chain finds exactly the commits the format finds.
//!
//! Valid commits are rare in random bytes (a CRC32C guards each), so the input can ask the harness
//! to seal commits itself; the fuzzer then explores record framing, sequences and lsns behind a good
//! checksum, and a final bit flip models a torn or rotted write.
//!
//! Input layout (see [`Plan`]):
//!
//! ```text
//! byte 0     flags: bit 0 seal commits (see `seal_chain`), bit 1 raw header block (the first
//!            HEADER_RAW_BYTES of the data become the header block as they are), bits 2-3 segment
//!            sequence - 1, bit 4 with bit 1: seal the raw header (its crc made right, so that
//!            any shard id, version, sequence and base lsn can be reached)
//! byte 1     base lsn - 1
//! bytes 2-3  u16 LE: if non-zero, after sealing, byte (n - 1) % len of the data is xored with byte 4
//! byte 4     the xor mask
//! rest       the data region: the segment from SEGMENT_DATA_OFFSET on
//! ```

use shards::format::{
    find_valid_commits, parse_commit, HeaderBlock, ParseError, SegmentHeader, BLOCK_BYTES, SEGMENT_DATA_OFFSET,
};

/// Bytes of the plan before the data region.
pub const PLAN_BYTES: usize = 5;
pub const FLAG_SEAL: u8 = 1;
pub const FLAG_RAW_HEADER: u8 = 1 << 1;
pub const FLAG_SEAL_HEADER: u8 = 1 << 4;
/// With [`FLAG_RAW_HEADER`], this many data bytes are taken as the header block.
pub const HEADER_RAW_BYTES: usize = 40;

/// The segment format, as documented, independently of `shards::format`'s code.
pub mod spec {
    pub const COMMIT_MAGIC: [u8; 4] = *b"SLCM";
    /// magic 4, record count 4, segment sequence 8, first lsn 8, body bytes 4, crc 4.
    pub const COMMIT_HEADER: usize = 32;
    /// payload length 4, flags 4, stream 8, timestamp 8.
    pub const RECORD_HEADER: usize = 24;
    pub const FLAG_TIMESTAMP: u32 = 1;

    fn le32(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
    }

    fn le64(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Record {
        pub stream: u64,
        pub timestamp: Option<u64>,
        pub payload: Vec<u8>,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Commit {
        pub first_lsn: u64,
        pub count: u32,
        pub total_bytes: usize,
        pub records: Vec<Record>,
    }

    /// The CRC32C of a commit: header bytes before the crc field, then the body.
    pub fn crc(header: &[u8], body: &[u8]) -> u32 {
        let mut covered = Vec::with_capacity(28 + body.len());
        covered.extend_from_slice(&header[..28]);
        covered.extend_from_slice(body);
        crc32c::crc32c(&covered)
    }

    /// The records of a commit body, if their framing fills the body exactly.
    pub fn records(mut body: &[u8]) -> Option<Vec<Record>> {
        let mut out = Vec::new();
        while !body.is_empty() {
            if body.len() < RECORD_HEADER {
                return None;
            }
            let len = le32(body) as usize;
            if body.len() - RECORD_HEADER < len {
                return None;
            }
            let flags = le32(&body[4..]);
            out.push(Record {
                stream: le64(&body[8..]),
                timestamp: (flags & FLAG_TIMESTAMP != 0).then(|| le64(&body[16..])),
                payload: body[RECORD_HEADER..RECORD_HEADER + len].to_vec(),
            });
            body = &body[RECORD_HEADER + len..];
        }
        Some(out)
    }

    /// The valid commit of segment `sequence` at the start of `buf`, if there is one.
    pub fn commit(buf: &[u8], sequence: u64) -> Option<Commit> {
        if buf.len() < COMMIT_HEADER || buf[..4] != COMMIT_MAGIC || le64(&buf[8..]) != sequence {
            return None;
        }
        let count = le32(&buf[4..]);
        let first_lsn = le64(&buf[16..]);
        let total_bytes = COMMIT_HEADER.checked_add(le32(&buf[24..]) as usize)?;
        if buf.len() < total_bytes || count == 0 || first_lsn == 0 {
            return None;
        }
        // The lsns of a commit must be representable: lsn `first_lsn + count` comes next.
        first_lsn.checked_add(u64::from(count))?;
        let body = &buf[COMMIT_HEADER..total_bytes];
        if crc(buf, body) != le32(&buf[28..]) {
            return None;
        }
        let records = records(body)?;
        if records.len() != count as usize {
            return None;
        }
        Some(Commit {
            first_lsn,
            count,
            total_bytes,
            records,
        })
    }

    /// Seals the commit header at the start of `buf` over its body: magic and crc.
    pub fn seal(buf: &mut [u8]) {
        let body_bytes = le32(&buf[24..]) as usize;
        let crc = crc(buf, &buf[COMMIT_HEADER..COMMIT_HEADER + body_bytes]);
        buf[..4].copy_from_slice(&COMMIT_MAGIC);
        buf[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    /// Where recovery's walk over a segment image ends.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Chain {
        /// `(offset, commit)` of every commit in the chain.
        pub commits: Vec<(u64, Commit)>,
        pub end_offset: u64,
        pub end_lsn: u64,
        /// The walk ended at zeros or at the end of the data, not at a bad commit.
        pub clean_end: bool,
    }

    /// Commits back to back from `data_offset`, each the next lsn, until one is not.
    pub fn chain(image: &[u8], data_offset: u64, sequence: u64, base_lsn: u64) -> Chain {
        let mut commits = Vec::new();
        let mut offset = data_offset;
        let mut lsn = base_lsn;
        while let Some(rest) = image.get(offset as usize..).filter(|r| !r.is_empty()) {
            match commit(rest, sequence) {
                Some(c) if c.first_lsn == lsn => {
                    lsn += u64::from(c.count);
                    let next = offset + c.total_bytes as u64;
                    commits.push((offset, c));
                    offset = next;
                }
                _ => break,
            }
        }
        let rest = image.get(offset as usize..).unwrap_or(&[]);
        let head = &rest[..rest.len().min(COMMIT_HEADER)];
        Chain {
            commits,
            end_offset: offset,
            end_lsn: lsn,
            clean_end: head.iter().all(|&b| b == 0),
        }
    }

    /// Every valid commit at any byte offset of `buf`, skipping over each one found.
    pub fn find_all(buf: &[u8], base: u64, sequence: u64) -> Vec<(u64, u64)> {
        let mut found = Vec::new();
        let mut at = 0usize;
        while at + COMMIT_HEADER <= buf.len() {
            if let Some(c) = commit(&buf[at..], sequence) {
                found.push((base + at as u64, base + (at + c.total_bytes) as u64));
                at += c.total_bytes;
            } else {
                at += 1;
            }
        }
        found
    }
}

/// How one input becomes a segment image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    pub seal: bool,
    pub raw_header: bool,
    pub seal_header: bool,
    pub sequence: u64,
    pub base_lsn: u64,
    /// `(position, mask)` of the byte flipped after sealing.
    pub flip: Option<(usize, u8)>,
    pub data: &'a [u8],
}

impl<'a> Plan<'a> {
    pub fn parse(input: &'a [u8]) -> Option<Plan<'a>> {
        let (plan, data) = input.split_first_chunk::<PLAN_BYTES>()?;
        let flip_at = u16::from_le_bytes([plan[2], plan[3]]);
        Some(Plan {
            seal: plan[0] & FLAG_SEAL != 0,
            raw_header: plan[0] & FLAG_RAW_HEADER != 0,
            seal_header: plan[0] & FLAG_SEAL_HEADER != 0,
            sequence: 1 + u64::from((plan[0] >> 2) & 3),
            base_lsn: 1 + u64::from(plan[1]),
            flip: (flip_at != 0 && plan[4] != 0).then(|| (usize::from(flip_at - 1), plan[4])),
            data,
        })
    }
}

/// Builds an input of the layout above.
pub fn encode_input(flags: u8, base_lsn: u64, flip: Option<(u16, u8)>, data: &[u8]) -> Vec<u8> {
    assert!((1..=256).contains(&base_lsn));
    assert!(flip.is_none_or(|(at, _)| at < u16::MAX));
    let (at, mask) = flip.map_or((0, 0), |(at, mask)| (at + 1, mask));
    let mut out = vec![flags, (base_lsn - 1) as u8];
    out.extend_from_slice(&at.to_le_bytes());
    out.push(mask);
    out.extend_from_slice(data);
    out
}

/// Seals the commits laid out back to back in `data`: each header whose bytes are not all zero gets
/// the magic and a correct crc, its body length reduced to fit what is left. The first all-zero
/// header, or too little room for one, ends the sealing.
pub fn seal_chain(data: &mut [u8]) {
    let mut at = 0usize;
    while data.len() - at >= spec::COMMIT_HEADER {
        let commit = &mut data[at..];
        if commit[..spec::COMMIT_HEADER].iter().all(|&b| b == 0) {
            return;
        }
        let room = commit.len() - spec::COMMIT_HEADER;
        let asked = u32::from_le_bytes(commit[24..28].try_into().expect("4 bytes")) as usize;
        let body = asked % (room + 1);
        commit[24..28].copy_from_slice(&(body as u32).to_le_bytes());
        spec::seal(commit);
        at += spec::COMMIT_HEADER + body;
    }
}

/// The segment image an input describes, and the header the shard would have read from it (`None`
/// if the header block is not valid, in which case recovery never scans the data).
pub fn image(plan: &Plan<'_>) -> (Vec<u8>, Option<SegmentHeader>) {
    let mut data = plan.data.to_vec();
    let mut image = vec![0u8; SEGMENT_DATA_OFFSET as usize];
    if plan.raw_header {
        let n = data.len().min(HEADER_RAW_BYTES);
        image[..n].copy_from_slice(&data[..n]);
        data.drain(..n);
        if plan.seal_header {
            // magic 8, version 2, shard 2, reserved 4, sequence 8, base lsn 8, then the crc of those 32.
            let crc = crc32c::crc32c(&image[..32]);
            image[32..36].copy_from_slice(&crc.to_le_bytes());
        }
    } else {
        let header = SegmentHeader {
            shard_id: 0,
            sequence: plan.sequence,
            base_lsn: plan.base_lsn,
        };
        header.encode(&mut image);
    }
    if plan.seal {
        seal_chain(&mut data);
    }
    if let Some((at, mask)) = plan.flip {
        if !data.is_empty() {
            let at = at % data.len();
            data[at] ^= mask;
        }
    }
    image.extend_from_slice(&data);
    let header = match SegmentHeader::decode(&image[..BLOCK_BYTES as usize]) {
        HeaderBlock::Valid(h) => Some(h),
        HeaderBlock::Zero => {
            let n = shards::format::SEGMENT_HEADER_BYTES;
            assert!(
                image[..n].iter().all(|&b| b == 0),
                "a non-zero header block decoded as Zero"
            );
            None
        }
        HeaderBlock::Invalid(_) => None,
    };
    if !plan.raw_header {
        assert_eq!(
            header,
            Some(SegmentHeader {
                shard_id: 0,
                sequence: plan.sequence,
                base_lsn: plan.base_lsn
            }),
            "an encoded segment header did not decode to itself"
        );
    }
    (image, header)
}

/// Runs every check on one input. Panics when a property fails.
pub fn check(input: &[u8]) {
    let Some(plan) = Plan::parse(input) else {
        return;
    };
    let (image, header) = image(&plan);
    if let Some(h) = header {
        check_header(&image, h);
    }
    // Recovery scans with the header's sequence; also try the others so that leftovers of a
    // recycled file (another sequence, intact crc) are seen from both sides.
    let base_lsn = header.map_or(plan.base_lsn, |h| h.base_lsn);
    let mut sequences = vec![plan.sequence];
    if let Some(h) = header {
        if h.sequence != plan.sequence {
            sequences.push(h.sequence);
        }
    }
    for sequence in sequences {
        check_scan(&image, sequence, base_lsn);
    }
}

fn check_header(image: &[u8], header: SegmentHeader) {
    assert!(header.sequence > 0 && header.base_lsn > 0);
    let mut again = vec![0u8; BLOCK_BYTES as usize];
    header.encode(&mut again);
    let n = shards::format::SEGMENT_HEADER_BYTES;
    assert_eq!(
        &again[..n],
        &image[..n],
        "a header that decodes must re-encode to the same bytes"
    );
}

/// Checks `parse_commit` at `offset` against the format.
fn check_commit_at(image: &[u8], offset: usize, sequence: u64) -> Option<spec::Commit> {
    let buf = &image[offset..];
    let want = spec::commit(buf, sequence);
    match (parse_commit(buf, sequence), &want) {
        (Ok(view), Some(c)) => {
            assert_eq!(view.first_lsn, c.first_lsn);
            assert_eq!(view.count, c.count);
            assert_eq!(view.total_bytes, c.total_bytes);
            assert_eq!(view.end_lsn(), c.first_lsn + u64::from(c.count));
            assert_eq!(view.body, &buf[spec::COMMIT_HEADER..c.total_bytes]);
            let records: Vec<spec::Record> = view
                .records()
                .map(|r| {
                    let r = r.expect("a record of an accepted commit failed to frame");
                    spec::Record {
                        stream: r.stream,
                        timestamp: r.timestamp,
                        payload: r.payload.to_vec(),
                    }
                })
                .collect();
            assert_eq!(
                &records, &c.records,
                "accepted commit yields other records than its bytes hold"
            );
        }
        (Ok(view), None) => {
            panic!("parse_commit accepted an invalid commit at offset {offset} (sequence {sequence}): {view:?}")
        }
        (Err(e), Some(c)) => panic!("parse_commit rejected a valid commit at offset {offset}: {e:?}, {c:?}"),
        (Err(ParseError::Zero), None) => {
            let head = &buf[..buf.len().min(spec::COMMIT_HEADER)];
            assert!(
                !head.is_empty() && head.iter().all(|&b| b == 0),
                "Zero for a non-zero header"
            );
        }
        (Err(ParseError::Short { needed }), None) => {
            assert!(
                needed > buf.len(),
                "Short {{ needed: {needed} }} with {} bytes present",
                buf.len()
            );
        }
        (Err(ParseError::Invalid(_)), None) => {}
    }
    want
}

fn check_scan(image: &[u8], sequence: u64, base_lsn: u64) {
    let chain = spec::chain(image, SEGMENT_DATA_OFFSET, sequence, base_lsn);

    // Recovery's walk, through the crate's parser: every commit of the chain, and the stop.
    let mut offset = SEGMENT_DATA_OFFSET as usize;
    for (at, c) in &chain.commits {
        assert_eq!(*at as usize, offset);
        let got = check_commit_at(image, offset, sequence).expect("chain commit");
        assert_eq!(&got, c);
        offset += c.total_bytes;
    }
    assert_eq!(offset as u64, chain.end_offset);
    assert!(chain.end_lsn >= base_lsn);
    if offset < image.len() {
        let stop = check_commit_at(image, offset, sequence);
        if let Some(c) = stop {
            assert_ne!(
                c.first_lsn, chain.end_lsn,
                "the chain stopped at a commit that continues it"
            );
        }
        let zero = matches!(parse_commit(&image[offset..], sequence), Err(ParseError::Zero));
        assert_eq!(
            zero, chain.clean_end,
            "the chain's end is zeros exactly when the parser says Zero"
        );
    }

    // What recovery searches behind the end to tell a torn tail from damage in the middle.
    let behind = &image[offset.min(image.len())..];
    let found = find_valid_commits(behind, offset as u64, sequence);
    let want = spec::find_all(behind, offset as u64, sequence);
    assert_eq!(found, want, "find_valid_commits disagrees with the format");
    for &(start, end) in &found {
        let c = check_commit_at(image, start as usize, sequence).expect("found commit is valid");
        assert_eq!(start + c.total_bytes as u64, end);
    }
}
