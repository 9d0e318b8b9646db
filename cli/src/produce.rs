//! `shardlog produce`: records from arguments or stdin, batched per stream, pipelined, and the
//! assigned lsns printed in input order.
//!
//! Memory stays bounded whatever the input size: a reader thread parses stdin into a bounded
//! channel, and at most `--in-flight` appends of at most `--batch` records (and
//! `BATCH_BYTES_MAX` bytes) are unanswered at once. A batch takes only the records that are
//! already read, so an interactive line goes out at once; before the run blocks on input it
//! waits for every outstanding answer, so the lsn of a typed line is printed before the next one
//! is read.

use std::collections::VecDeque;
use std::io::{BufRead, IsTerminal, Read};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use proto::client::Client;
use proto::codec::{response_kind, AppendRecord};
use proto::wire::{AckLevel, ResponseBodyT};
use proto::{shard_for, ClientError, ServerError};
use serde::{Deserialize, Serialize};

use crate::args::{Input, ProduceArgs};
use crate::cluster::Cluster;
use crate::conn::Route;
use crate::failure::Failure;
use crate::output::{now_us, Out};

/// Largest payload accepted: what fits one frame of the daemon's default `--max-frame-bytes`
/// with room for the append's own fields.
pub const RECORD_BYTES_MAX: usize = proto::frame::FRAME_BYTES_MAX_DEFAULT - 4096;
/// Largest stdin line read (a JSON line carries base64, 4/3 of the payload, plus its keys).
const LINE_BYTES_MAX: usize = RECORD_BYTES_MAX / 3 * 4 + 4096;
/// A batch closes once its payloads reach this many bytes, so a frame stays far below the
/// daemon's default limit even when a batch holds many records.
const BATCH_BYTES_MAX: usize = 1 << 20;
/// Records parsed ahead of the appends: the reader thread's bound in records...
const READ_AHEAD_RECORDS: usize = 4096;
/// ... and in payload bytes (one record larger than this still goes through, alone).
const READ_AHEAD_BYTES: usize = 16 << 20;
/// With `--ack none`, a ping after this many appends collects the errors sent back so far, so a
/// failing run stops early and unread error responses never pile up.
const ACK_NONE_CHECK_EVERY: u64 = 1024;

const _: () = assert!(BATCH_BYTES_MAX < RECORD_BYTES_MAX);

/// One record to append, with where it came from.
struct InRecord {
    stream: Option<u64>,
    payload: Vec<u8>,
    timestamp: Option<u64>,
    /// 1-based input line (0 for arguments), for error messages.
    line: u64,
    /// Input bytes this record consumed (for the progress bar).
    bytes_in: u64,
}

/// A JSON input line. Keys other than these are ignored, so `consume --json` output replays.
#[derive(Deserialize)]
struct JsonRecord {
    stream: Option<u64>,
    payload: Option<String>,
    payload_base64: Option<String>,
    timestamp: Option<u64>,
}

/// What `produce` prints per record (one JSON line with `--json`).
#[derive(Serialize)]
struct Produced {
    stream: u64,
    /// The home daemon's index in the cluster list; only with a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<u32>,
    shard: u16,
    lsn: u64,
}

enum Source {
    Args(std::vec::IntoIter<InRecord>),
    Stdin(Receiver<Result<InRecord, Failure>>, Arc<Budget>),
}

impl Source {
    fn next_blocking(&mut self) -> Option<Result<InRecord, Failure>> {
        match self {
            Source::Args(it) => it.next().map(Ok),
            Source::Stdin(rx, budget) => rx.recv().ok().inspect(|r| budget.release(r)),
        }
    }

    /// The next record if it is already read; `None` if reading it would block (or at the end).
    fn next_ready(&mut self) -> Option<Result<InRecord, Failure>> {
        match self {
            Source::Args(it) => it.next().map(Ok),
            // Empty (not read yet) and Disconnected (the end) both mean "nothing ready".
            Source::Stdin(rx, budget) => rx.try_recv().ok().inspect(|r| budget.release(r)),
        }
    }
}

/// Payload bytes parsed and not yet taken by the run: the reader waits while they exceed
/// `READ_AHEAD_BYTES`, so large records cannot pile up in the channel.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        // An empty channel always admits one record, however large, so the run cannot stall.
        while *used > 0 && *used + n > READ_AHEAD_BYTES {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    fn release(&self, r: &Result<InRecord, Failure>) {
        if let Ok(r) = r {
            let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            assert!(*used >= r.payload.len(), "released more than was acquired");
            *used -= r.payload.len();
            self.freed.notify_one();
        }
    }
}

struct Pending {
    daemon: u32,
    route: Route,
    id: u64,
    stream: u64,
    count: u32,
    bytes_in: u64,
}

struct Run<'a> {
    cluster: Cluster,
    out: Out,
    args: &'a ProduceArgs,
    json: bool,
    ack: AckLevel,
    pending: VecDeque<Pending>,
    appends_unchecked: u64,
    progress: Option<ProgressBar>,
}

pub fn run(cluster: Cluster, args: &ProduceArgs, json: bool) -> Result<(), Failure> {
    if args.stream.is_none() && args.input == Input::Lines {
        return Err(Failure::Usage(
            "produce: give a STREAM (only --input json lines name their own)".into(),
        ));
    }
    let mut source = if args.payloads.is_empty() {
        let budget = Arc::new(Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
        });
        let rx = spawn_reader(args.input, args.stream, !args.no_timestamp, budget.clone());
        Source::Stdin(rx, budget)
    } else {
        if args.stream.is_none() {
            return Err(Failure::Usage("produce: give a STREAM before the payloads".into()));
        }
        let ts = (!args.no_timestamp).then(now_us);
        let recs: Vec<InRecord> = args
            .payloads
            .iter()
            .map(|p| InRecord {
                stream: args.stream,
                payload: std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec(),
                timestamp: ts,
                line: 0,
                bytes_in: 0,
            })
            .collect();
        if let Some(r) = recs.iter().find(|r| r.payload.len() > RECORD_BYTES_MAX) {
            return Err(too_large(r));
        }
        Source::Args(recs.into_iter())
    };
    let progress = matches!(source, Source::Stdin(..))
        .then(|| progress_bar(args.quiet))
        .flatten();
    let mut run = Run {
        cluster,
        out: Out::new(),
        args,
        json,
        ack: args.ack.into(),
        pending: VecDeque::new(),
        appends_unchecked: 0,
        progress,
    };
    let result = run.drive(&mut source);
    if let Some(pb) = &run.progress {
        pb.finish_and_clear();
    }
    result?;
    run.out.flush()
}

impl Run<'_> {
    fn drive(&mut self, source: &mut Source) -> Result<(), Failure> {
        let mut carried: Option<InRecord> = None;
        loop {
            let first = match carried.take() {
                Some(r) => r,
                None => match source.next_ready() {
                    Some(r) => r?,
                    None => {
                        // About to wait for input: answer what is outstanding first.
                        self.settle_all()?;
                        match source.next_blocking() {
                            Some(r) => r?,
                            None => break,
                        }
                    }
                },
            };
            let stream = first.stream.ok_or_else(|| Failure::Input {
                line: first.line,
                reason: "no \"stream\" in the line and no STREAM argument".into(),
            })?;
            let mut batch_bytes = first.payload.len();
            let mut batch = vec![first];
            while batch.len() < self.args.batch as usize {
                match source.next_ready() {
                    Some(r) => {
                        let r = r?;
                        // Another stream's record, or one that would take the frame past the
                        // batch's byte bound, starts the next batch.
                        if r.stream != Some(stream) || batch_bytes + r.payload.len() > BATCH_BYTES_MAX {
                            carried = Some(r);
                            break;
                        }
                        batch_bytes += r.payload.len();
                        batch.push(r);
                    }
                    None => break,
                }
            }
            self.send(stream, &batch)?;
        }
        self.settle_all()?;
        self.check_fire_and_forget(true)
    }

    fn send(&mut self, stream: u64, batch: &[InRecord]) -> Result<(), Failure> {
        while self.pending.len() >= self.args.in_flight as usize {
            self.settle_one()?;
        }
        let records: Vec<AppendRecord<'_>> = batch
            .iter()
            .map(|r| AppendRecord {
                payload: &r.payload,
                timestamp: r.timestamp,
            })
            .collect();
        let (ack, daemon) = (self.ack, self.cluster.daemon_for(stream));
        let (route, id) = self.cluster.with(daemon, |conns| {
            let route = conns.route(shard_for(stream, conns.shard_count()));
            let id = conns.get(route)?.send_append(stream, &records, ack)?;
            Ok((route, id))
        })?;
        let bytes_in: u64 = batch.iter().map(|r| r.bytes_in).sum();
        if self.ack == AckLevel::None {
            self.advance_progress(batch.len() as u64, bytes_in);
            self.appends_unchecked += 1;
            if self.appends_unchecked >= ACK_NONE_CHECK_EVERY {
                self.check_fire_and_forget(false)?;
            }
        } else {
            self.pending.push_back(Pending {
                daemon,
                route,
                id,
                stream,
                count: batch.len() as u32,
                bytes_in,
            });
        }
        Ok(())
    }

    fn settle_all(&mut self) -> Result<(), Failure> {
        while !self.pending.is_empty() {
            self.settle_one()?;
        }
        self.out.flush()
    }

    /// Waits for the oldest outstanding append and prints its lsns.
    fn settle_one(&mut self) -> Result<(), Failure> {
        let p = self.pending.pop_front().expect("settle_one with nothing pending");
        let appended = self.cluster.with(p.daemon, |conns| {
            let resp = conns.get(p.route)?.wait(p.id)?;
            let appended = match resp.body {
                ResponseBodyT::Appended(a) => *a,
                ResponseBodyT::Error(e) => return Err(ClientError::Server(ServerError::from(*e)).into()),
                other => {
                    return Err(ClientError::UnexpectedResponse {
                        id: p.id,
                        expected: "Appended",
                        got: response_kind(&other),
                    }
                    .into())
                }
            };
            if appended.count != p.count {
                return Err(Failure::Protocol(format!(
                    "shardlogd acknowledged {} records of an append of {}",
                    appended.count, p.count
                )));
            }
            Ok(appended)
        })?;
        let daemon = self.cluster.is_cluster().then_some(p.daemon);
        if !self.args.quiet {
            for lsn in appended.first_lsn..appended.first_lsn + u64::from(appended.count) {
                let rec = Produced {
                    stream: p.stream,
                    daemon,
                    shard: appended.shard,
                    lsn,
                };
                if self.json {
                    self.out.json(&rec)?;
                } else {
                    let at = daemon.map(|d| format!(" daemon={d}")).unwrap_or_default();
                    self.out.line(&format!(
                        "stream={}{at} shard={} lsn={}",
                        rec.stream, rec.shard, rec.lsn
                    ))?;
                }
            }
        }
        self.advance_progress(u64::from(p.count), p.bytes_in);
        Ok(())
    }

    /// With `--ack none`: a ping on each open connection of each daemon brings back any error
    /// the daemon sent before it; the first one fails the run. `last` also runs it when nothing
    /// was sent since.
    fn check_fire_and_forget(&mut self, last: bool) -> Result<(), Failure> {
        if self.ack != AckLevel::None || (!last && self.appends_unchecked == 0) {
            return Ok(());
        }
        self.appends_unchecked = 0;
        for daemon in self.cluster.open_daemons() {
            self.cluster.with(daemon, |conns| {
                for route in conns.open_routes() {
                    let client: &mut Client = conns.get(route)?;
                    client.ping()?;
                    if let Some((_, e)) = client.take_errors().into_iter().next() {
                        return Err(ClientError::Server(e).into());
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn advance_progress(&mut self, records: u64, bytes_in: u64) {
        if let Some(pb) = &self.progress {
            if pb.length().is_some() {
                pb.inc(bytes_in);
            } else {
                pb.inc(records);
            }
        }
    }
}

/// A progress bar on stderr, only when a person watches it: stderr is a terminal, and stdout
/// is not also printing lsns onto that terminal. Sized in bytes when stdin is a regular file.
fn progress_bar(quiet: bool) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || std::io::stdin().is_terminal() {
        return None;
    }
    if !quiet && std::io::stdout().is_terminal() {
        return None;
    }
    let file_len = std::fs::metadata("/dev/stdin")
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let pb = match file_len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} records {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    pb.enable_steady_tick(Duration::from_millis(200));
    Some(pb)
}

fn too_large(r: &InRecord) -> Failure {
    Failure::Input {
        line: r.line,
        reason: format!(
            "a payload of {} bytes exceeds the {RECORD_BYTES_MAX}-byte limit",
            r.payload.len()
        ),
    }
}

/// Starts the thread that reads and parses stdin; it stops at the end of input, at the first
/// error (which it sends), or when the run hangs up.
fn spawn_reader(
    input: Input,
    stream: Option<u64>,
    stamp: bool,
    budget: Arc<Budget>,
) -> Receiver<Result<InRecord, Failure>> {
    let (tx, rx) = mpsc::sync_channel(READ_AHEAD_RECORDS);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_stdin(input, stream, stamp, tx, &budget))
        .expect("spawn the stdin reader thread");
    rx
}

fn read_stdin(
    input: Input,
    stream: Option<u64>,
    stamp: bool,
    tx: SyncSender<Result<InRecord, Failure>>,
    budget: &Budget,
) {
    let stdin = std::io::stdin();
    let mut reader = stdin.lock();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        line_no += 1;
        let n = match reader
            .by_ref()
            .take(LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(Failure::Stdin(e)));
                return;
            }
        };
        let had_newline = buf.last() == Some(&b'\n');
        if had_newline {
            buf.pop();
        } else if buf.len() > LINE_BYTES_MAX {
            let _ = tx.send(Err(Failure::Input {
                line: line_no,
                reason: format!("line longer than {LINE_BYTES_MAX} bytes"),
            }));
            return;
        }
        let parsed = match input {
            Input::Lines => Ok(Some(InRecord {
                stream,
                payload: buf.clone(),
                timestamp: stamp.then(now_us),
                line: line_no,
                bytes_in: n as u64,
            })),
            Input::Json => parse_json_line(&buf, line_no, stream, stamp, n as u64),
        };
        let rec = match parsed {
            Ok(Some(r)) if r.payload.len() > RECORD_BYTES_MAX => Err(too_large(&r)),
            Ok(Some(r)) => Ok(r),
            Ok(None) => continue,
            Err(e) => Err(e),
        };
        let failed = rec.is_err();
        if let Ok(r) = &rec {
            budget.acquire(r.payload.len());
        }
        if tx.send(rec).is_err() || failed {
            return;
        }
    }
}

/// Parses one JSON line; a blank line is skipped (`None`).
fn parse_json_line(
    line: &[u8],
    line_no: u64,
    stream: Option<u64>,
    stamp: bool,
    bytes_in: u64,
) -> Result<Option<InRecord>, Failure> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let bad = |reason: String| Failure::Input { line: line_no, reason };
    let j: JsonRecord = serde_json::from_slice(line).map_err(|e| bad(format!("not a JSON record: {e}")))?;
    let payload = match (j.payload, j.payload_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| bad(format!("\"payload_base64\" is not base64: {e}")))?,
        (Some(_), Some(_)) => return Err(bad("give \"payload\" or \"payload_base64\", not both".into())),
        (None, None) => return Err(bad("no \"payload\" or \"payload_base64\"".into())),
    };
    Ok(Some(InRecord {
        stream: j.stream.or(stream),
        payload,
        timestamp: j.timestamp.or_else(|| stamp.then(now_us)),
        line: line_no,
        bytes_in,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_take_text_or_base64_and_ignore_other_keys() {
        let r = parse_json_line(br#"{"stream":7,"payload":"hi","lsn":3}"#, 1, None, false, 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.stream, r.payload.as_slice(), r.timestamp),
            (Some(7), &b"hi"[..], None)
        );
        let r = parse_json_line(br#"{"payload_base64":"AP8=","timestamp":5}"#, 1, Some(9), true, 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.stream, r.payload.as_slice(), r.timestamp),
            (Some(9), &[0u8, 255][..], Some(5))
        );
        assert!(parse_json_line(b"  ", 1, None, false, 0).unwrap().is_none());
        for bad in [
            &br#"{"payload":"a","payload_base64":"YQ=="}"#[..],
            br#"{"stream":1}"#,
            b"nope",
            br#"{"payload_base64":"!"}"#,
        ] {
            assert!(matches!(
                parse_json_line(bad, 4, None, false, 0),
                Err(Failure::Input { line: 4, .. })
            ));
        }
    }
}
