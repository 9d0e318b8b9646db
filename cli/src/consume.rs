//! `shardlog consume`: reads a stream (from its home: in a cluster, its daemon; there, the shard
//! that owns it, filtered) or a whole shard of one daemon, from a chosen lsn, until caught up
//! or, with `--follow`, with long-polls until interrupted.

use base64::Engine;
use proto::client::ReadParams;
use proto::wire::{ErrorCode, ReadRecordT};
use proto::ClientError;
use serde::Serialize;

use crate::args::ConsumeArgs;
use crate::cluster::Cluster;
use crate::conn::{Conns, RecordsReader};
use crate::failure::Failure;
use crate::output::{unescape, Out};

/// What `consume --json` prints per record.
#[derive(Serialize)]
struct Consumed<'a> {
    lsn: u64,
    /// The daemon's index in the cluster list; only with a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<u32>,
    shard: u16,
    stream: u64,
    /// `null` when the producer gave none.
    timestamp: Option<u64>,
    /// The payload when it is UTF-8 (and `--base64` was not given)...
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    /// ... otherwise the payload in standard base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Lsn(u64),
    Beginning,
    End,
}

pub fn run(mut cluster: Cluster, args: &ConsumeArgs, json: bool) -> Result<(), Failure> {
    let delimiter = unescape(&args.delimiter).map_err(Failure::Usage)?;
    let (daemon, shard) = match (args.stream, args.shard) {
        (Some(stream), None) => cluster.home_for(stream)?,
        (None, Some(shard)) => {
            let daemon = match args.daemon {
                Some(d) if d < cluster.daemon_count() => d,
                Some(d) => {
                    return Err(Failure::Usage(format!(
                        "--daemon {d}: the cluster has daemons 0..{}",
                        cluster.daemon_count() - 1
                    )))
                }
                None if cluster.is_cluster() => {
                    return Err(Failure::Usage(
                        "--shard in a cluster: say whose with --daemon INDEX (from 0, in cluster order)".into(),
                    ))
                }
                None => 0,
            };
            let shard_count = cluster.with(daemon, |c| Ok(c.shard_count()))?;
            if shard >= shard_count {
                return Err(Failure::Usage(format!(
                    "--shard {shard}: shardlogd at {} has shards 0..{}",
                    cluster.addr(daemon),
                    shard_count - 1
                )));
            }
            (daemon, shard)
        }
        _ => unreachable!("clap requires exactly one of STREAM and --shard"),
    };
    let named = cluster.is_cluster().then_some(daemon);
    cluster.with(daemon, |conns| read(conns, args, json, named, shard, &delimiter))
}

/// Reads `shard` of the daemon behind `conns` (`daemon` is its index, printed in a cluster).
fn read(
    conns: &mut Conns,
    args: &ConsumeArgs,
    json: bool,
    daemon: Option<u32>,
    shard: u16,
    delimiter: &[u8],
) -> Result<(), Failure> {
    let start = match (args.from_lsn, args.from_end) {
        (Some(lsn), _) => Start::Lsn(lsn.max(1)),
        (None, true) => Start::End,
        (None, false) => Start::Beginning,
    };
    let route = conns.route(shard);
    let mut from = match start {
        Start::Lsn(lsn) => lsn,
        Start::Beginning => 1,
        Start::End => durable_lsn(conns, shard)? + 1,
    };
    let client = conns.get(route)?;
    let mut reader = RecordsReader::new();
    let mut out = Out::new();
    let mut printed = 0u64;
    let mut first_read = true;
    loop {
        if args.max_records.is_some_and(|max| printed >= max) {
            break;
        }
        let params = ReadParams {
            shard,
            from_lsn: from,
            max_bytes: args.read_bytes,
            max_wait_ms: if args.follow { args.poll_ms } else { 0 },
            stream: args.stream,
        };
        let batch = match reader.read(client, params) {
            Ok(b) => b,
            // An explicit --from-lsn that retention already deleted is the caller's error; any
            // other start, or a reader that later falls behind, continues where the log begins.
            Err(ClientError::Server(e)) if e.code == ErrorCode::Truncated && start != Start::Lsn(from) => {
                // Retention deleted what was asked for. With --from-beginning that is where the
                // log begins now; later, it means this reader fell behind retention: say so.
                let Some(next) = e.first_available_lsn.filter(|&l| l > from) else {
                    return Err(ClientError::Server(e).into());
                };
                if !(first_read && start == Start::Beginning) {
                    eprintln!(
                        "shardlog: lsns {from}..{} of shard {shard} were deleted by retention; continuing at {next}",
                        next - 1
                    );
                }
                from = next;
                first_read = false;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        first_read = false;
        let records = batch.records.unwrap_or_default();
        let caught_up = records.is_empty() && batch.next_lsn <= from;
        for r in &records {
            if args.max_records.is_some_and(|max| printed >= max) {
                break;
            }
            emit(&mut out, (daemon, shard), r, json, args.base64, delimiter)?;
            printed += 1;
        }
        out.flush()?;
        from = from.max(batch.next_lsn);
        if caught_up && !args.follow {
            break;
        }
    }
    out.flush()
}

/// The shard's newest durable lsn, from the daemon's counters.
fn durable_lsn(conns: &mut Conns, shard: u16) -> Result<u64, Failure> {
    let stats = conns.routed().stats()?;
    stats
        .shards
        .unwrap_or_default()
        .iter()
        .find(|s| s.shard == shard)
        .map(|s| s.durable_lsn)
        .ok_or_else(|| Failure::Protocol(format!("shardlogd's stats have no shard {shard}")))
}

fn emit(
    out: &mut Out,
    (daemon, shard): (Option<u32>, u16),
    r: &ReadRecordT,
    json: bool,
    base64: bool,
    delimiter: &[u8],
) -> Result<(), Failure> {
    let payload: &[u8] = r.payload.as_deref().unwrap_or_default();
    if !json {
        out.bytes(payload)?;
        return out.bytes(delimiter);
    }
    let text = if base64 {
        None
    } else {
        std::str::from_utf8(payload).ok()
    };
    out.json(&Consumed {
        lsn: r.lsn,
        daemon,
        shard,
        stream: r.stream,
        timestamp: r.has_timestamp.then_some(r.timestamp),
        payload: text,
        payload_base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(payload)),
    })
}
