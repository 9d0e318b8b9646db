//! Counters and latency histograms, per interval and for the whole run.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Histogram bounds, in nanoseconds: 1 us resolution floor up to 2 minutes, 3 significant digits.
pub const LATENCY_NS_LOW: u64 = 1_000;
pub const LATENCY_NS_HIGH: u64 = 120_000_000_000;
pub const LATENCY_SIGFIG: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LATENCY_NS_LOW, LATENCY_NS_HIGH, LATENCY_SIGFIG)
        .expect("constant histogram bounds are valid")
}

pub fn record(hist: &mut Histogram<u64>, latency: Duration) {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    hist.saturating_record(ns.max(1));
}

/// Counts of one interval or one whole run.
#[derive(Debug, Clone)]
pub struct Tally {
    pub requests: u64,
    pub records: u64,
    pub bytes: u64,
    pub errors: BTreeMap<String, u64>,
    pub latency: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            requests: 0,
            records: 0,
            bytes: 0,
            errors: BTreeMap::new(),
            latency: new_histogram(),
        }
    }
}

impl Tally {
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_insert(0) += 1;
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.records += other.records;
        self.bytes += other.bytes;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms share the same bounds");
    }

    /// Returns the tally so far and starts a new one.
    pub fn take(&mut self) -> Tally {
        std::mem::take(self)
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    /// `None` when nothing was recorded.
    pub fn of(hist: &Histogram<u64>) -> Option<LatencySummary> {
        if hist.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(LatencySummary {
            count: hist.len(),
            mean: hist.mean() / 1000.0,
            p50: us(hist.value_at_quantile(0.50)),
            p90: us(hist.value_at_quantile(0.90)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        })
    }
}

/// Writes the full percentile distribution in HdrHistogram's text format
/// (`.hgrm`, as wrk2 and the HdrHistogram plotter read it), values in milliseconds.
pub fn write_hgrm(hist: &Histogram<u64>, out: &mut impl Write) -> std::io::Result<()> {
    const NS_PER_MS: f64 = 1e6;
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    writeln!(out)?;
    for v in hist.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / NS_PER_MS;
        if q < 1.0 {
            writeln!(
                out,
                "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                value,
                q,
                hist.count_between(0, v.value_iterated_to()),
                1.0 / (1.0 - q)
            )?;
        } else {
            writeln!(
                out,
                "{:>12.3} {:>2.12} {:>10}",
                value,
                q,
                hist.count_between(0, v.value_iterated_to())
            )?;
        }
    }
    writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        hist.mean() / NS_PER_MS,
        hist.stdev() / NS_PER_MS
    )?;
    writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        hist.max() as f64 / NS_PER_MS,
        hist.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        hist.buckets(),
        hist.distinct_values()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_microseconds() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let s = LatencySummary::of(&h).expect("not empty");
        assert_eq!(s.count, 1000);
        assert!((499.0..=501.0).contains(&s.p50), "p50 {}", s.p50);
        assert!((989.0..=991.0).contains(&s.p99), "p99 {}", s.p99);
        assert!((999.0..=1001.0).contains(&s.max), "max {}", s.max);
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert_eq!(LatencySummary::of(&new_histogram()), None);
    }

    #[test]
    fn merging_adds_counts_errors_and_latencies() {
        let mut a = Tally {
            requests: 2,
            ..Default::default()
        };
        a.error("Poisoned");
        record(&mut a.latency, Duration::from_micros(100));
        let mut b = Tally {
            requests: 3,
            records: 30,
            ..Default::default()
        };
        b.error("Poisoned");
        b.error("connection_closed");
        record(&mut b.latency, Duration::from_micros(300));
        a.merge(&b);
        assert_eq!(a.requests, 5);
        assert_eq!(a.records, 30);
        assert_eq!(a.errors["Poisoned"], 2);
        assert_eq!(a.errors_total(), 3);
        assert_eq!(a.latency.len(), 2);
        let taken = a.take();
        assert_eq!(taken.requests, 5);
        assert_eq!(a.requests, 0);
        assert!(a.latency.is_empty());
    }

    #[test]
    fn huge_latencies_saturate_instead_of_failing() {
        let mut h = new_histogram();
        record(&mut h, Duration::from_secs(3600));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn hgrm_output_ends_at_the_maximum() {
        let mut h = new_histogram();
        for us in [100u64, 200, 300, 5000] {
            record(&mut h, Duration::from_micros(us));
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).expect("write to a Vec");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("       Value"));
        assert!(text.contains("Total count    =            4"));
        let last_row = text.lines().rfind(|l| !l.starts_with('#') && !l.trim().is_empty());
        let last_row = last_row.expect("rows");
        assert!(last_row.contains("1.000000000000"), "{last_row}");
        assert!(last_row.trim_start().starts_with("5.0"), "{last_row}");
    }
}
