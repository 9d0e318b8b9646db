//! `shardlog-bench chart`: an SVG of records/s and latency against
//! concurrency, from the JSON reports of several runs.
//!
//! Runs are grouped into series by their `label` (or, without one, by ack
//! level, record size, records per frame and pipeline depth); within a series
//! the x axis is the connection count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;

use crate::report::Report;

pub const CHART_WIDTH_PX: u32 = 1400;
pub const CHART_HEIGHT_PX: u32 = 600;

/// The series a report belongs to.
pub fn series_name(r: &Report) -> String {
    if let Some(label) = &r.label {
        return label.clone();
    }
    let c = &r.config;
    let size = if c.record_bytes_min == c.record_bytes_max {
        format!("{}", c.record_bytes_min)
    } else {
        format!("{}..{}", c.record_bytes_min, c.record_bytes_max)
    };
    format!("ack={:?} S={size} B={} P={}", c.ack, c.records_per_frame, c.pipeline).to_lowercase()
}

/// Points of one series, sorted by connections: (connections, records/s, p50 us, p99 us).
pub type SeriesPoints = Vec<(f64, f64, Option<f64>, Option<f64>)>;

/// Runs that stopped early, or `--ack none` runs whose drain was never confirmed, are left
/// out: their rates would be the generator's, not the daemon's.
pub fn group(reports: &[Report]) -> BTreeMap<String, SeriesPoints> {
    let mut series: BTreeMap<String, SeriesPoints> = BTreeMap::new();
    for r in reports {
        let unconfirmed = r.config.ack == crate::config::Ack::None && r.drain.is_none();
        if r.stopped_early.is_some() || unconfirmed {
            continue;
        }
        let lat = r.latency_us.as_ref();
        series.entry(series_name(r)).or_default().push((
            r.config.connections as f64,
            r.drain.as_ref().map_or(r.records_per_s, |d| d.records_per_s),
            lat.map(|l| l.p50),
            lat.map(|l| l.p99),
        ));
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series
}

pub fn read_reports(paths: &[PathBuf]) -> anyhow::Result<Vec<Report>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not a shardlog-bench JSON report", p.display()))
        })
        .collect()
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1.0, 10.0);
    }
    // Pad by a factor so points do not sit on the frame of a log axis.
    (lo / 1.5, hi * 1.5)
}

/// Draws the two panels into an SVG file.
pub fn draw(reports: &[Report], title: &str, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!reports.is_empty(), "no reports to chart");
    let series = group(reports);
    let root = SVGBackend::new(out, (CHART_WIDTH_PX, CHART_HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(CHART_WIDTH_PX / 2);

    let all = || series.values().flatten();
    let (x_lo, x_hi) = bounds(all().map(|p| p.0));
    let (y_lo, y_hi) = bounds(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(&left)
        .caption("records/s vs connections", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("records/s")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|p| Circle::new((p.0, p.1), 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let latencies = || series.values().flatten().flat_map(|p| [p.2, p.3]).flatten();
    let (l_lo, l_hi) = bounds(latencies());
    let mut chart = ChartBuilder::on(&right)
        .caption("latency (us): p50 solid, p99 dashed", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (l_lo..l_hi).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("latency us")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let p50: Vec<(f64, f64)> = points.iter().filter_map(|p| p.2.map(|v| (p.0, v))).collect();
        let p99: Vec<(f64, f64)> = points.iter().filter_map(|p| p.3.map(|v| (p.0, v))).collect();
        if p50.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(p50, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(p99, 6, 4, color.stroke_width(1)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    #[test]
    fn runs_group_by_label_sorted_by_connections_and_failures_are_left_out() {
        let mut a = sample();
        a.config.connections = 64;
        let mut b = sample();
        b.config.connections = 1;
        let mut failed = sample();
        failed.stopped_early = Some("all 16 connections were lost".into());
        let mut unlabeled = sample();
        unlabeled.label = None;
        let series = group(&[a, b, failed, unlabeled]);
        assert_eq!(series.len(), 2);
        let points = &series["durable S=1024 B=1 P=16"];
        assert_eq!(points.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1.0, 64.0]);
        assert_eq!(points[0].2, Some(140.0));
        assert!(series.contains_key("ack=durable s=1024 b=1 p=16"));
    }

    #[test]
    fn draws_an_svg() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("chart.svg");
        let mut a = sample();
        a.config.connections = 16;
        draw(&[sample(), a], "test", &out).expect("draw");
        let svg = std::fs::read_to_string(&out).expect("svg written");
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("durable S=1024 B=1 P=16"));
    }
}
