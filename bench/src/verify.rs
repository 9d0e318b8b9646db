//! `shardlog-bench verify`: reads every shard back and checks it against the
//! verify log.
//!
//! Problems found:
//! - **missing**: an acknowledged (shard, lsn) is not in the shard;
//! - **corrupted**: it is there, but its stream, length or crc32c differ from
//!   what was acknowledged, or its payload header names another stream;
//! - **out of order**: within one `(run, writer, stream)` the payload `seq`
//!   does not rise with the lsn (a reordering or a duplicate), or the shard
//!   returned lsns that do not rise;
//! - **conflicting acks**: the log holds two different records acknowledged
//!   at the same (shard, lsn), i.e. the daemon reused an lsn it had acked.
//!
//! Records present but never acknowledged are allowed (the daemon may make
//! a record durable and die before acking it) and only counted.
//!
//! Retention deletes a shard's oldest segments. A read below the shard's
//! first retained lsn fails `Truncated`, and the error names that lsn; the
//! reader continues from it, and acknowledged records below it that were not
//! read are counted as **retired by retention**, not as missing. Everything at
//! or above it is checked as above. (A daemon that reported too high a first
//! retained lsn would hide losses behind it; the counts make that visible.)

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use proto::client::{Client, ReadParams};
use proto::wire::{ErrorCode, ReadRecordT};
use serde::Serialize;

use crate::payload::PayloadHeader;
use crate::verify_log::AckedRecord;

/// Examples kept per kind of problem; the counts are always complete.
pub const EXAMPLES_MAX: usize = 10;

/// Bytes asked for per Read; stays well under the default 4 MiB frame limit.
pub const READ_BYTES_MAX: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    Missing,
    Corrupted,
    OutOfOrder,
    ConflictingAcks,
    ReadFailed,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyOutcome {
    pub acked: u64,
    pub acked_found: u64,
    /// Acknowledged, not read, and below the shard's first retained lsn: deleted by retention.
    pub retired_by_retention: u64,
    pub records_read: u64,
    pub unacked_present: u64,
    pub foreign_payloads: u64,
    pub problems: BTreeMap<ProblemKind, u64>,
    pub examples: BTreeMap<ProblemKind, Vec<String>>,
}

impl VerifyOutcome {
    pub fn problems_total(&self) -> u64 {
        self.problems.values().sum()
    }

    pub fn ok(&self) -> bool {
        self.problems_total() == 0
    }

    /// Adds `other`'s counts (another daemon's check) to these.
    pub fn merge(&mut self, other: VerifyOutcome) {
        self.acked += other.acked;
        self.acked_found += other.acked_found;
        self.retired_by_retention += other.retired_by_retention;
        self.records_read += other.records_read;
        self.unacked_present += other.unacked_present;
        self.foreign_payloads += other.foreign_payloads;
        for (kind, n) in other.problems {
            *self.problems.entry(kind).or_insert(0) += n;
        }
        for (kind, examples) in other.examples {
            let mine = self.examples.entry(kind).or_default();
            let room = EXAMPLES_MAX.saturating_sub(mine.len());
            mine.extend(examples.into_iter().take(room));
        }
    }

    fn problem(&mut self, kind: ProblemKind, example: impl FnOnce() -> String) {
        *self.problems.entry(kind).or_insert(0) += 1;
        let examples = self.examples.entry(kind).or_default();
        if examples.len() < EXAMPLES_MAX {
            examples.push(example());
        }
    }
}

/// The checking logic, fed by whoever reads the shards (pure, so it is unit-tested).
pub struct Checker {
    /// Acknowledged records not yet seen in the read-back.
    expected: HashMap<(u16, u64), AckedRecord>,
    last_lsn: HashMap<u16, u64>,
    /// Per shard, the first lsn retention kept, as the daemon reported it.
    first_retained: HashMap<u16, u64>,
    /// Highest seq seen per (run, writer, stream), and at which lsn.
    last_seq: HashMap<(u32, u32, u64), (u64, u64)>,
    outcome: VerifyOutcome,
}

impl Checker {
    pub fn new(acked: impl IntoIterator<Item = AckedRecord>) -> Checker {
        let mut outcome = VerifyOutcome::default();
        let mut expected: HashMap<(u16, u64), AckedRecord> = HashMap::new();
        for rec in acked {
            match expected.get(&(rec.shard, rec.lsn)) {
                // The same ack logged twice (e.g. two logs concatenated) is harmless.
                Some(prev) if *prev == rec => {}
                Some(prev) => {
                    let prev = *prev;
                    outcome.problem(ProblemKind::ConflictingAcks, || {
                        format!("shard {} lsn {} acked as {prev:?} and as {rec:?}", rec.shard, rec.lsn)
                    });
                }
                None => {
                    outcome.acked += 1;
                    expected.insert((rec.shard, rec.lsn), rec);
                }
            }
        }
        Checker {
            expected,
            last_lsn: HashMap::new(),
            first_retained: HashMap::new(),
            last_seq: HashMap::new(),
            outcome,
        }
    }

    /// Feeds the records of `shard` in the order the daemon returned them.
    pub fn observe(&mut self, shard: u16, lsn: u64, stream: u64, payload: &[u8]) {
        self.outcome.records_read += 1;
        if let Some(&prev) = self.last_lsn.get(&shard) {
            if lsn <= prev {
                self.outcome.problem(ProblemKind::OutOfOrder, || {
                    format!("shard {shard} returned lsn {lsn} after lsn {prev}")
                });
            }
        }
        self.last_lsn.insert(shard, lsn);

        let crc = crc32c::crc32c(payload);
        match self.expected.remove(&(shard, lsn)) {
            Some(acked) => {
                self.outcome.acked_found += 1;
                if acked.stream != stream || acked.len as usize != payload.len() || acked.crc32c != crc {
                    self.outcome.problem(ProblemKind::Corrupted, || {
                        format!(
                            "shard {shard} lsn {lsn}: acked stream {} len {} crc32c {:08x}, read stream {stream} len {} \
                             crc32c {crc:08x}",
                            acked.stream,
                            acked.len,
                            acked.crc32c,
                            payload.len()
                        )
                    });
                }
            }
            None => self.outcome.unacked_present += 1,
        }

        let Some(header) = PayloadHeader::decode(payload) else {
            self.outcome.foreign_payloads += 1;
            return;
        };
        if header.stream != stream {
            self.outcome.problem(ProblemKind::Corrupted, || {
                format!(
                    "shard {shard} lsn {lsn}: record of stream {stream} carries a payload written for stream {}",
                    header.stream
                )
            });
            return;
        }
        let key = (header.run, header.writer, header.stream);
        if let Some(&(prev_seq, prev_lsn)) = self.last_seq.get(&key) {
            if header.seq <= prev_seq {
                self.outcome.problem(ProblemKind::OutOfOrder, || {
                    format!(
                        "stream {stream} (run {:08x} writer {}): seq {} at shard {shard} lsn {lsn} follows seq {prev_seq} \
                         at lsn {prev_lsn}",
                        header.run, header.writer, header.seq
                    )
                });
            }
        }
        self.last_seq.insert(key, (header.seq, lsn));
    }

    pub fn read_failed(&mut self, shard: u16, why: String) {
        self.outcome
            .problem(ProblemKind::ReadFailed, || format!("shard {shard}: {why}"));
    }

    /// The daemon reported that `shard` retains lsns from `first_lsn` on: retention deleted
    /// everything below it.
    pub fn retained_from(&mut self, shard: u16, first_lsn: u64) {
        let first = self.first_retained.entry(shard).or_insert(first_lsn);
        *first = (*first).max(first_lsn);
    }

    /// Every acknowledged record not seen by now is missing, unless retention deleted it.
    pub fn finish(mut self) -> VerifyOutcome {
        let first_retained = &self.first_retained;
        let (retired, mut missing): (Vec<AckedRecord>, Vec<AckedRecord>) = self
            .expected
            .into_values()
            .partition(|r| first_retained.get(&r.shard).is_some_and(|&first| r.lsn < first));
        self.outcome.retired_by_retention = retired.len() as u64;
        missing.sort_by_key(|r| (r.shard, r.lsn));
        for r in missing {
            self.outcome.problem(ProblemKind::Missing, || {
                format!(
                    "shard {} lsn {} (stream {}, {} bytes) was acked but is not there",
                    r.shard, r.lsn, r.stream, r.len
                )
            });
        }
        self.outcome
    }
}

/// Checks a cluster: each acknowledged record on its home daemon (`daemon_for` over `addrs`, in
/// cluster order), every shard of every daemon read back. A record acknowledged on a daemon
/// other than its home is reported missing or corrupted at its home, where a reader following
/// placement looks for it. With one address this is [`verify_against`].
pub fn verify_cluster(
    addrs: &[SocketAddr],
    acked: Vec<AckedRecord>,
    timeout: Duration,
) -> anyhow::Result<VerifyOutcome> {
    let n = u32::try_from(addrs.len()).map_err(|_| anyhow::anyhow!("too many daemons"))?;
    anyhow::ensure!(n > 0, "no --addr given");
    let mut per_daemon: Vec<Vec<AckedRecord>> = vec![Vec::new(); addrs.len()];
    for r in acked {
        per_daemon[proto::daemon_for(r.stream, n) as usize].push(r);
    }
    let mut total = VerifyOutcome::default();
    for (d, (addr, records)) in addrs.iter().zip(per_daemon).enumerate() {
        let outcome = verify_against(*addr, records, timeout)
            .map_err(|e| e.context(format!("daemon {d} of the cluster ({addr})")))?;
        total.merge(outcome);
    }
    Ok(total)
}

/// Reads every shard of the daemon at `addr` from lsn 1 (or, once retention has deleted that,
/// from the first lsn the shard retains) and checks it. Each response must arrive within
/// `timeout`, so a hung daemon fails the check instead of hanging it.
pub fn verify_against(addr: SocketAddr, acked: Vec<AckedRecord>, timeout: Duration) -> anyhow::Result<VerifyOutcome> {
    let mut client = Client::connect_raw(addr).map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
    client
        .set_read_timeout(Some(timeout))
        .map_err(|e| anyhow::anyhow!("cannot set a read timeout: {e}"))?;
    client
        .hello("shardlog-bench-verify")
        .map_err(|e| anyhow::anyhow!("{addr} did not answer Hello: {e}"))?;
    let shard_count = client
        .shard_count()
        .ok_or_else(|| anyhow::anyhow!("{addr} did not report its shard count"))?;
    let mut checker = Checker::new(acked);
    for shard in 0..shard_count {
        let mut from_lsn = 1u64;
        loop {
            let params = ReadParams {
                max_bytes: READ_BYTES_MAX,
                ..ReadParams::new(shard, from_lsn)
            };
            let batch = match client.read(params) {
                Ok(batch) => batch,
                // Retention deleted `from_lsn` (before the read, or while this reader was
                // behind it): continue at the first lsn the shard still has.
                Err(e) if e.server_code() == Some(ErrorCode::Truncated) => match e.first_available_lsn() {
                    Some(first) if first > from_lsn => {
                        checker.retained_from(shard, first);
                        from_lsn = first;
                        continue;
                    }
                    _ => {
                        checker.read_failed(
                            shard,
                            format!("Read from lsn {from_lsn} failed: {e}, with no usable first retained lsn"),
                        );
                        break;
                    }
                },
                Err(e) => {
                    checker.read_failed(shard, format!("Read from lsn {from_lsn} failed: {e}"));
                    if e.server_code().is_none() {
                        // The connection is gone: nothing more can be read.
                        return Ok(checker.finish());
                    }
                    break;
                }
            };
            let records: Vec<ReadRecordT> = batch.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            for r in &records {
                checker.observe(shard, r.lsn, r.stream, r.payload.as_deref().unwrap_or(&[]));
            }
            if batch.next_lsn <= from_lsn {
                checker.read_failed(
                    shard,
                    format!(
                        "Read from lsn {from_lsn} returned records but next_lsn {}",
                        batch.next_lsn
                    ),
                );
                break;
            }
            from_lsn = batch.next_lsn;
        }
    }
    Ok(checker.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::fill_payload;

    fn payload(writer: u32, stream: u64, seq: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        fill_payload(
            &PayloadHeader {
                run: 7,
                writer,
                stream,
                seq,
            },
            &mut buf,
        );
        buf
    }

    fn acked(shard: u16, lsn: u64, stream: u64, payload: &[u8]) -> AckedRecord {
        AckedRecord {
            stream,
            shard,
            lsn,
            crc32c: crc32c::crc32c(payload),
            len: payload.len() as u32,
        }
    }

    #[test]
    fn a_complete_log_verifies() {
        let p: Vec<Vec<u8>> = (0..3).map(|seq| payload(0, 5, seq)).collect();
        let mut c = Checker::new((0..3).map(|i| acked(1, i as u64 + 1, 5, &p[i])));
        for (i, pl) in p.iter().enumerate() {
            c.observe(1, i as u64 + 1, 5, pl);
        }
        // A durable record that was never acked is fine.
        c.observe(1, 4, 5, &payload(0, 5, 3));
        let out = c.finish();
        assert!(out.ok(), "{out:?}");
        assert_eq!(out.acked, 3);
        assert_eq!(out.acked_found, 3);
        assert_eq!(out.unacked_present, 1);
    }

    #[test]
    fn a_lost_ack_is_missing() {
        let p0 = payload(0, 5, 0);
        let p1 = payload(0, 5, 1);
        let mut c = Checker::new([acked(0, 1, 5, &p0), acked(0, 2, 5, &p1)]);
        c.observe(0, 1, 5, &p0);
        let out = c.finish();
        assert_eq!(out.problems.get(&ProblemKind::Missing), Some(&1));
        assert!(out.examples[&ProblemKind::Missing][0].contains("lsn 2"));
    }

    #[test]
    fn a_flipped_byte_is_corruption() {
        let p = payload(0, 5, 0);
        let mut c = Checker::new([acked(0, 1, 5, &p)]);
        let mut bad = p.clone();
        bad[40] ^= 1;
        c.observe(0, 1, 5, &bad);
        let out = c.finish();
        assert_eq!(out.problems.get(&ProblemKind::Corrupted), Some(&1));
        assert_eq!(out.problems.get(&ProblemKind::Missing), None);
    }

    #[test]
    fn seq_going_backwards_within_a_writer_is_out_of_order() {
        let mut c = Checker::new([]);
        c.observe(0, 1, 5, &payload(0, 5, 1));
        c.observe(0, 2, 5, &payload(0, 5, 0));
        // Another writer on the same stream interleaves freely.
        c.observe(0, 3, 5, &payload(1, 5, 0));
        let out = c.finish();
        assert_eq!(out.problems.get(&ProblemKind::OutOfOrder), Some(&1));
    }

    #[test]
    fn duplicated_record_is_out_of_order() {
        let mut c = Checker::new([]);
        c.observe(0, 1, 5, &payload(0, 5, 0));
        c.observe(0, 2, 5, &payload(0, 5, 0));
        assert_eq!(c.finish().problems.get(&ProblemKind::OutOfOrder), Some(&1));
    }

    #[test]
    fn lsns_going_backwards_are_out_of_order() {
        let mut c = Checker::new([]);
        c.observe(0, 2, 5, &payload(0, 5, 0));
        c.observe(0, 2, 5, &payload(0, 5, 1));
        assert_eq!(c.finish().problems.get(&ProblemKind::OutOfOrder), Some(&1));
    }

    #[test]
    fn payload_of_another_stream_is_corruption() {
        let mut c = Checker::new([]);
        c.observe(0, 1, 5, &payload(0, 6, 0));
        assert_eq!(c.finish().problems.get(&ProblemKind::Corrupted), Some(&1));
    }

    #[test]
    fn an_lsn_acked_twice_with_different_records_conflicts() {
        let a = payload(0, 5, 0);
        let b = payload(0, 5, 1);
        let c = Checker::new([acked(0, 1, 5, &a), acked(0, 1, 5, &a), acked(0, 1, 5, &b)]);
        let out = c.finish();
        assert_eq!(out.problems.get(&ProblemKind::ConflictingAcks), Some(&1));
        assert_eq!(out.acked, 1);
    }

    #[test]
    fn acks_below_the_first_retained_lsn_are_retired_not_missing() {
        let p: Vec<Vec<u8>> = (0..6).map(|seq| payload(0, 5, seq)).collect();
        let mut c = Checker::new((0..6).map(|i| acked(2, i as u64 + 1, 5, &p[i])));
        // Read lsn 1, then retention took lsns up to 3; lsn 4 was lost, 5 and 6 are there.
        c.observe(2, 1, 5, &p[0]);
        c.retained_from(2, 4);
        c.observe(2, 5, 5, &p[4]);
        c.observe(2, 6, 5, &p[5]);
        let out = c.finish();
        assert_eq!(out.retired_by_retention, 2, "lsns 2 and 3");
        assert_eq!(out.acked_found, 3);
        assert_eq!(out.problems.get(&ProblemKind::Missing), Some(&1));
        assert!(out.examples[&ProblemKind::Missing][0].contains("lsn 4"));
    }

    #[test]
    fn retention_on_one_shard_retires_nothing_on_another() {
        let p = payload(0, 5, 0);
        let mut c = Checker::new([acked(0, 1, 5, &p), acked(1, 1, 5, &p)]);
        c.retained_from(0, 10);
        // A later, lower report (a stale reply) does not move the floor back.
        c.retained_from(0, 2);
        let out = c.finish();
        assert_eq!(out.retired_by_retention, 1);
        assert_eq!(out.problems.get(&ProblemKind::Missing), Some(&1));
        assert!(out.examples[&ProblemKind::Missing][0].contains("shard 1 lsn 1"));
    }

    #[test]
    fn records_read_before_retention_took_them_are_checked_not_retired() {
        let p: Vec<Vec<u8>> = (0..2).map(|seq| payload(0, 5, seq)).collect();
        let mut c = Checker::new([acked(0, 1, 5, &p[0]), acked(0, 2, 5, &p[1])]);
        c.observe(0, 1, 5, &p[0]);
        c.observe(0, 2, 5, &payload(0, 5, 7));
        c.retained_from(0, 5);
        let out = c.finish();
        assert_eq!((out.acked_found, out.retired_by_retention), (2, 0));
        assert_eq!(out.problems.get(&ProblemKind::Corrupted), Some(&1));
    }

    #[test]
    fn foreign_payloads_are_counted_not_judged() {
        let mut c = Checker::new([]);
        c.observe(0, 1, 5, b"written by someone else");
        let out = c.finish();
        assert!(out.ok());
        assert_eq!(out.foreign_payloads, 1);
    }
}
