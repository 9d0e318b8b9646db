//! The final report: printed for people, written as JSON for scripts and charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::{Ack, RunArgs, StreamDist};
use crate::stats::LatencySummary;

/// Bumped when a field changes meaning; fields are only added otherwise.
pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportConfig {
    pub addrs: Vec<String>,
    pub threads: usize,
    pub connections: usize,
    pub pipeline: usize,
    pub records_per_frame: u32,
    pub record_bytes_min: usize,
    pub record_bytes_max: usize,
    pub streams: u64,
    pub stream_dist: StreamDist,
    pub zipf_exponent: f64,
    pub ack: Ack,
    /// `closed` or `open`.
    pub mode: String,
    /// Open loop only: requests per second, in total.
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub requests_limit: Option<u64>,
    pub warmup_s: f64,
    pub seed: u64,
    /// `--routed`: every append went to the main address, even where the daemon offered shard
    /// addresses.
    #[serde(default)]
    pub routed: bool,
}

impl ReportConfig {
    pub fn of(args: &RunArgs, seed: u64) -> ReportConfig {
        ReportConfig {
            addrs: args.addrs.iter().map(|a| a.to_string()).collect(),
            threads: args.threads,
            connections: args.connections,
            pipeline: args.pipeline,
            records_per_frame: args.records_per_frame,
            record_bytes_min: args.record_bytes.min,
            record_bytes_max: args.record_bytes.max,
            streams: args.streams,
            stream_dist: args.stream_dist,
            zipf_exponent: args.zipf_exponent,
            ack: args.ack,
            mode: args.mode().to_string(),
            rate: args.rate,
            duration_s: args.duration.as_secs_f64(),
            requests_limit: args.requests,
            warmup_s: args.warmup.as_secs_f64(),
            seed,
            routed: args.routed,
        }
    }
}

/// With `--ack none`: the send rate says little, so the generator waits for
/// the daemon to make everything durable and reports the rate including that.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    /// From the start of measurement until the last drain append was durable.
    pub elapsed_s: f64,
    /// Records the daemon accepted (refused appends, answered with an error, are not counted),
    /// over `elapsed_s`.
    pub records_per_s: f64,
    pub mb_per_s: f64,
    /// How long the daemon took to drain after the last send.
    pub drain_s: f64,
}

/// What the generator itself cost: its whole process's CPU time over the run (getrusage),
/// against everything it sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    pub user_s: f64,
    pub system_s: f64,
    /// Records acknowledged (or sent, with `--ack none`) over the whole run, warm-up and
    /// drain included.
    pub records: u64,
    /// (user + system) / records, in microseconds.
    pub us_per_record: f64,
}

impl CpuReport {
    pub fn of(user: std::time::Duration, system: std::time::Duration, records: u64) -> CpuReport {
        let total_us = (user + system).as_secs_f64() * 1e6;
        CpuReport {
            user_s: user.as_secs_f64(),
            system_s: system.as_secs_f64(),
            records,
            us_per_record: if records == 0 { 0.0 } else { total_us / records as f64 },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub label: Option<String>,
    pub config: ReportConfig,
    pub server: Option<String>,
    pub shard_count: Option<u16>,
    /// Measured time: from the end of the warm-up to the last completion.
    pub elapsed_s: f64,
    pub requests: u64,
    pub records: u64,
    pub bytes: u64,
    pub requests_per_s: f64,
    pub records_per_s: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Absent with `--ack none`.
    pub latency_us: Option<LatencySummary>,
    pub drain: Option<DrainReport>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub connections_lost: u64,
    /// Why the run ended before its duration or request count, if it did.
    pub stopped_early: Option<String>,
    /// The generator's own CPU (absent from reports of older versions).
    #[serde(default)]
    pub cpu: Option<CpuReport>,
    /// Connections that sent each append straight to its shard's address (the daemon offered
    /// shard addresses and `--routed` was not given); the others went through the main address.
    #[serde(default)]
    pub shard_aware_connections: u64,
}

impl Report {
    /// The human-readable final report.
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let sizes = if c.record_bytes_min == c.record_bytes_max {
            format!("{} B", c.record_bytes_min)
        } else {
            format!("{}..{} B", c.record_bytes_min, c.record_bytes_max)
        };
        let _ = writeln!(
            s,
            "shardlog-bench: {} loop{}, ack={:?}, c={} P={} B={} S={} K={} ({:?}), threads={}",
            c.mode,
            c.rate.map(|r| format!(" at {r:.0} req/s")).unwrap_or_default(),
            c.ack,
            c.connections,
            c.pipeline,
            c.records_per_frame,
            sizes,
            c.streams,
            c.stream_dist,
            c.threads
        );
        if let (Some(server), Some(shards)) = (&self.server, self.shard_count) {
            let routing = if self.shard_aware_connections > 0 {
                format!("{} connections shard-aware", self.shard_aware_connections)
            } else {
                "appends routed by the daemon".to_string()
            };
            let _ = writeln!(s, "  server:    {server}, {shards} shards, {routing}");
        }
        if c.addrs.len() > 1 {
            // Rates below are the cluster's aggregate.
            let _ = writeln!(
                s,
                "  cluster:   {} daemons ({}), appends sent to each stream's home; figures are totals",
                c.addrs.len(),
                c.addrs.join(", ")
            );
        }
        let verb = if c.ack == Ack::None { "sent" } else { "acked" };
        let _ = writeln!(
            s,
            "  {:<11}{} requests, {} records, {:.1} MB in {:.2} s",
            format!("{verb}:"),
            self.requests,
            self.records,
            self.bytes as f64 / 1e6,
            self.elapsed_s
        );
        let _ = writeln!(
            s,
            "  rate:      {:.0} records/s, {:.0} requests/s, {:.1} MB/s",
            self.records_per_s, self.requests_per_s, self.mb_per_s
        );
        if let Some(l) = &self.latency_us {
            let _ = writeln!(
                s,
                "  latency:   p50 {} p90 {} p99 {} p99.9 {} max {} (mean {}){}",
                fmt_us(l.p50),
                fmt_us(l.p90),
                fmt_us(l.p99),
                fmt_us(l.p999),
                fmt_us(l.max),
                fmt_us(l.mean),
                if c.mode == "open" {
                    ", from intended send times"
                } else {
                    ""
                }
            );
        }
        if let Some(d) = &self.drain {
            let _ = writeln!(
                s,
                "  drained:   {:.0} records/s, {:.1} MB/s accepted, including the {:.3} s the daemon took to make everything durable",
                d.records_per_s, d.mb_per_s, d.drain_s
            );
        }
        if let Some(cpu) = &self.cpu {
            let _ = writeln!(
                s,
                "  cpu:       {:.2} us per record (generator: user {:.2} s, system {:.2} s, {} records)",
                cpu.us_per_record, cpu.user_s, cpu.system_s, cpu.records
            );
        }
        if self.errors_total == 0 {
            let _ = writeln!(s, "  errors:    none");
        } else {
            let by_code: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  errors:    {} ({})", self.errors_total, by_code.join(", "));
        }
        if self.connections_lost > 0 {
            let _ = writeln!(s, "  lost:      {} connections", self.connections_lost);
        }
        if let Some(why) = &self.stopped_early {
            let _ = writeln!(s, "  stopped early: {why}");
        }
        s
    }
}

/// Formats microseconds with a unit that keeps 3-4 significant digits.
pub fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 10_000.0 {
        format!("{:.1}ms", us / 1e3)
    } else if us >= 1_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.0}us")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Report {
        Report {
            version: REPORT_VERSION,
            label: Some("durable S=1024 B=1 P=16".into()),
            config: ReportConfig {
                addrs: vec!["127.0.0.1:7070".into()],
                threads: 1,
                connections: 256,
                pipeline: 16,
                records_per_frame: 1,
                record_bytes_min: 1024,
                record_bytes_max: 1024,
                streams: 1024,
                stream_dist: StreamDist::Uniform,
                zipf_exponent: 0.99,
                ack: Ack::Durable,
                mode: "closed".into(),
                rate: None,
                duration_s: 5.0,
                requests_limit: None,
                warmup_s: 1.0,
                seed: 42,
                routed: false,
            },
            server: Some("shardlogd 0.1.0".into()),
            shard_count: Some(1),
            elapsed_s: 5.01,
            requests: 1000,
            records: 1000,
            bytes: 1_024_000,
            requests_per_s: 199.6,
            records_per_s: 199.6,
            mb_per_s: 0.2,
            latency_us: Some(LatencySummary {
                count: 1000,
                mean: 150.0,
                p50: 140.0,
                p90: 180.0,
                p99: 400.0,
                p999: 900.0,
                max: 1200.0,
            }),
            drain: None,
            errors: [("Poisoned".to_string(), 2)].into_iter().collect(),
            errors_total: 2,
            connections_lost: 0,
            stopped_early: None,
            cpu: Some(CpuReport::of(
                std::time::Duration::from_millis(300),
                std::time::Duration::from_millis(100),
                2000,
            )),
            shard_aware_connections: 0,
        }
    }

    #[test]
    fn json_round_trips_with_stable_field_names() {
        let report = sample();
        let text = serde_json::to_string_pretty(&report).expect("serialize");
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        // Scripts read these names; renaming one breaks them.
        assert_eq!(value["records_per_s"], 199.6);
        assert_eq!(value["latency_us"]["p99"], 400.0);
        assert_eq!(value["config"]["ack"], "durable");
        assert_eq!(value["config"]["stream_dist"], "uniform");
        assert_eq!(value["errors"]["Poisoned"], 2);
        assert!(value["drain"].is_null());
        assert_eq!(value["cpu"]["us_per_record"], 200.0);
        let back: Report = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, report);
    }

    #[test]
    fn rendered_report_names_rates_latency_and_errors() {
        let text = sample().render();
        assert!(text.contains("200 records/s"), "{text}");
        assert!(text.contains("p50 140us"), "{text}");
        assert!(text.contains("p99 400us"), "{text}");
        assert!(text.contains("Poisoned=2"), "{text}");
        assert!(text.contains("200.00 us per record"), "{text}");
    }

    #[test]
    fn reports_without_the_newer_fields_still_parse() {
        let mut value = serde_json::to_value(sample()).expect("serialize");
        let obj = value.as_object_mut().expect("object");
        obj.remove("cpu");
        obj.remove("shard_aware_connections");
        let back: Report = serde_json::from_value(value).expect("an older report parses");
        assert_eq!(back.cpu, None);
        assert_eq!(back.shard_aware_connections, 0);
    }

    #[test]
    fn units_scale() {
        assert_eq!(fmt_us(153.4), "153us");
        assert_eq!(fmt_us(1530.0), "1.53ms");
        assert_eq!(fmt_us(23_400.0), "23.4ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50s");
    }
}
