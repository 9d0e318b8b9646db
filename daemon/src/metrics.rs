//! `/metrics`: the daemon's counters in the Prometheus text exposition format.
//!
//! The endpoint lives on a thread of its own, far from the commit path: each scrape asks the
//! daemon for its counters over the daemon's own protocol (a `Stats` request on a loopback
//! connection, the same answer `shardlogd stats` prints) and encodes that snapshot with
//! `prometheus-client`. A scrape therefore costs the executors exactly what a `Stats` request
//! costs, and nothing at all between scrapes. The connection is kept between scrapes and
//! reopened when it breaks; while the daemon cannot answer, a scrape gets `503`.
//!
//! Off by default (`--metrics-listen`), so that several daemons on one host (and the test suite)
//! never fight over a fixed port; `127.0.0.1:9464` is the conventional choice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use proto::client::Client;
use proto::wire::{BucketsT, ErrorCode, StatsReplyT};

/// The content type of the OpenMetrics text format, which `prometheus-client` writes and which
/// Prometheus negotiates by default.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a scrape waits for the daemon's answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `/metrics` endpoint; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub reason: String,
}

impl MetricsServer {
    /// Binds `listen` and serves scrapes of the daemon listening on `daemon`.
    pub fn start(listen: SocketAddr, daemon: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let server = tiny_http::Server::http(listen).map_err(|e| MetricsError {
            addr: listen,
            reason: e.to_string(),
        })?;
        let addr = server.server_addr().to_ip().unwrap_or(listen);
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&serving, daemon))
            .map_err(|e| MetricsError {
                addr: listen,
                reason: e.to_string(),
            })?;
        Ok(MetricsServer {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The address actually bound (with port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread to end.
    pub fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, daemon: SocketAddr) {
    let mut client: Option<Client> = None;
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let response = match (request.method(), path) {
            (tiny_http::Method::Get, "/metrics") => match scrape(&mut client, daemon) {
                Ok(body) => text(200, body, CONTENT_TYPE),
                Err(e) => {
                    client = None;
                    text(503, format!("cannot read shardlogd's counters: {e}\n"), "text/plain")
                }
            },
            (tiny_http::Method::Get, "/") => text(200, "shardlogd: metrics at /metrics\n".into(), "text/plain"),
            _ => text(404, "not found; metrics are at /metrics\n".into(), "text/plain"),
        };
        let _ = request.respond(response);
    }
}

fn text(status: u16, body: String, content_type: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()).expect("a static header is valid");
    tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header)
}

fn scrape(client: &mut Option<Client>, daemon: SocketAddr) -> anyhow::Result<String> {
    if client.is_none() {
        let c = Client::connect(daemon)?;
        c.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        *client = Some(c);
    }
    let stats = client.as_mut().expect("connected above").stats()?;
    Ok(render(stats)?)
}

/// Encodes one stats snapshot in the OpenMetrics text format.
pub fn render(stats: StatsReplyT) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("shardlog");
    registry.register_collector(Box::new(Snapshot(stats)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct Snapshot(StatsReplyT);

type Labels = Vec<(&'static str, String)>;

/// One metric family: a name, its help, its type, and (labels, value) samples.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        // An empty label set would print as `name{} v`, which some parsers refuse.
        if labels.is_empty() {
            encode_value(&mut metric, kind, value)?;
        } else {
            encode_value(&mut metric.encode_family(&labels)?, kind, value)?;
        }
    }
    Ok(())
}

fn encode_value(sample: &mut MetricEncoder, kind: MetricType, value: u64) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None),
        _ => sample.encode_gauge(&value),
    }
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, Option<BucketsT>)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, buckets) in samples {
        let Some(b) = buckets else { continue };
        let le = b.le.unwrap_or_default();
        let cumulative = b.cumulative.unwrap_or_default();
        let mut pairs: Vec<(f64, u64)> = Vec::with_capacity(le.len() + 1);
        // prometheus-client takes per-bucket counts and accumulates them itself.
        let mut below = 0;
        for (bound, total) in le.iter().zip(&cumulative) {
            pairs.push((*bound as f64, total.saturating_sub(below)));
            below = *total;
        }
        // prometheus-client writes the bound f64::MAX as `le="+Inf"`.
        pairs.push((f64::MAX, b.count.saturating_sub(below)));
        metric.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            b.sum as f64,
            b.count,
            &pairs,
            None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let s = &self.0;
        let shards = s.shards.as_deref().unwrap_or_default();
        let by_shard = |f: fn(&proto::wire::ShardStatsT) -> u64| {
            shards
                .iter()
                .map(move |sh| (vec![("shard", sh.shard.to_string())], f(sh)))
        };
        let e = &mut encoder;
        family(
            e,
            "appends",
            "Appends accepted by the shard.",
            Counter,
            by_shard(|s| s.appends),
        )?;
        family(
            e,
            "records",
            "Records appended to the shard.",
            Counter,
            by_shard(|s| s.records),
        )?;
        family(
            e,
            "bytes",
            "Payload bytes appended to the shard.",
            Counter,
            by_shard(|s| s.bytes),
        )?;
        family(
            e,
            "commits",
            "Group commits written by the shard.",
            Counter,
            by_shard(|s| s.commits),
        )?;
        family(
            e,
            "queue_depth",
            "Appends queued and not yet handed to the device.",
            Gauge,
            by_shard(|s| s.queue_depth),
        )?;
        family(
            e,
            "durable_lsn",
            "Highest lsn on stable storage.",
            Gauge,
            by_shard(|s| s.durable_lsn),
        )?;
        family(
            e,
            "segments",
            "Segment files of the shard, the spare included.",
            Gauge,
            by_shard(|s| s.segment_count),
        )?;
        family(
            e,
            "segment_bytes",
            "Bytes of the shard's segment files on disk.",
            Gauge,
            by_shard(|s| s.segment_bytes),
        )?;
        family(
            e,
            "stream_index_bytes",
            "Heap bytes of the stream indexes of the shard's segments and of their loaded stream runs tables.",
            Gauge,
            by_shard(|s| s.stream_index_bytes),
        )?;
        family(
            e,
            "stream_tail_bytes",
            "Memory of the stream runs of the shard's active segment (its tail).",
            Gauge,
            by_shard(|s| s.stream_tail_bytes),
        )?;
        family(
            e,
            "stream_runs_written_bytes",
            "Bytes of stream runs files written: records of scattered streams written a second time, side by side.",
            Counter,
            by_shard(|s| s.stream_runs_bytes_written),
        )?;
        family(
            e,
            "scrub_bad_stream_indexes",
            "Stream index files the scrub found missing or wrong (each is rebuilt).",
            Counter,
            by_shard(|s| s.scrub_bad_stream_indexes),
        )?;
        family(
            e,
            "poisoned",
            "1 while the shard refuses writes after a failed write or fdatasync (shardlog_poisoned_info says why).",
            Gauge,
            by_shard(|s| u64::from(s.poisoned.is_some())),
        )?;
        let causes = shards.iter().filter_map(|sh| {
            let cause = sh.poisoned.clone()?;
            Some((vec![("shard", sh.shard.to_string()), ("cause", cause)], 1))
        });
        family(
            e,
            "poisoned_info",
            "Why a poisoned shard refuses writes.",
            Gauge,
            causes,
        )?;
        histogram(
            e,
            "fsync_latency_us",
            "From submitting a commit to it being durable, microseconds.",
            shards.iter().map(|sh| {
                (
                    vec![("shard", sh.shard.to_string())],
                    sh.fsync_latency_us_buckets.as_deref().cloned(),
                )
            }),
        )?;
        histogram(
            e,
            "records_per_commit",
            "Records in each group commit.",
            shards.iter().map(|sh| {
                (
                    vec![("shard", sh.shard.to_string())],
                    sh.records_per_commit_buckets.as_deref().cloned(),
                )
            }),
        )?;

        if let Some(f) = &s.front {
            let one = |v: u64| [(Labels::new(), v)];
            family(e, "connections", "Open client connections.", Gauge, one(f.connections))?;
            family(
                e,
                "connections_accepted",
                "Client connections accepted.",
                Counter,
                one(f.connections_total),
            )?;
            family(e, "frames_in", "Request frames read.", Counter, one(f.frames_in))?;
            family(e, "frames_out", "Response frames written.", Counter, one(f.frames_out))?;
            family(
                e,
                "protocol_errors",
                "Frames refused as malformed.",
                Counter,
                one(f.protocol_errors),
            )?;
            family(
                e,
                "network_bytes_in",
                "Bytes read from clients.",
                Counter,
                one(f.bytes_in),
            )?;
            family(
                e,
                "network_bytes_out",
                "Bytes written to clients.",
                Counter,
                one(f.bytes_out),
            )?;
            let errors = f
                .errors_by_code
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(code, &n)| {
                    let name = u16::try_from(code)
                        .ok()
                        .and_then(|c| ErrorCode(c).variant_name())
                        .unwrap_or("Unknown");
                    (vec![("code", name.to_string())], n)
                });
            family(
                e,
                "error_responses",
                "Error responses sent, refusals included, by error code.",
                Counter,
                errors,
            )?;
        }

        let executors = s.executors.as_deref().unwrap_or_default();
        let by_executor = |f: fn(&proto::wire::ExecutorStatsT) -> u64| {
            executors
                .iter()
                .map(move |x| (vec![("executor", x.name.clone().unwrap_or_default())], f(x)))
        };
        family(
            e,
            "executor_parks",
            "Times the executor slept in the kernel.",
            Counter,
            by_executor(|x| x.parks),
        )?;
        family(
            e,
            "executor_ring_wakeups",
            "Times another executor woke this one through a routing ring.",
            Counter,
            by_executor(|x| x.ring_wakeups),
        )?;
        family(
            e,
            "executor_stalls_broken",
            "Times the stall guard woke the executor out of a park while it had runnable tasks.",
            Counter,
            by_executor(|x| x.stalls_broken),
        )?;
        family(
            e,
            "executor_cpu_us",
            "CPU time of the executor's thread, microseconds.",
            Counter,
            by_executor(|x| x.cpu_us),
        )?;
        family(
            e,
            "process_cpu_us",
            "CPU time of the whole process, microseconds.",
            Counter,
            [(Labels::new(), s.process_cpu_us)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::{FrontStatsT, ShardStatsT};

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let stats = StatsReplyT {
            shards: Some(vec![ShardStatsT {
                shard: 3,
                fsync_latency_us_buckets: Some(Box::new(BucketsT {
                    le: Some(vec![100, 200]),
                    cumulative: Some(vec![2, 5]),
                    count: 6,
                    sum: 900,
                })),
                poisoned: Some("fdatasync failed: EIO".into()),
                ..Default::default()
            }]),
            front: Some(Box::new(FrontStatsT {
                errors_by_code: Some(vec![0, 0, 0, 0, 0, 0, 4]),
                ..Default::default()
            })),
            ..Default::default()
        };
        let text = render(stats).unwrap();
        assert!(
            text.contains("shardlog_fsync_latency_us_bucket{le=\"100.0\",shard=\"3\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("shardlog_fsync_latency_us_bucket{le=\"200.0\",shard=\"3\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("shardlog_fsync_latency_us_bucket{le=\"+Inf\",shard=\"3\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("shardlog_fsync_latency_us_count{shard=\"3\"} 6"),
            "{text}"
        );
        assert!(text.contains("shardlog_poisoned{shard=\"3\"} 1"), "{text}");
        assert!(
            text.contains("shardlog_error_responses_total{code=\"Poisoned\"} 4"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
