//! Which stream each append goes to: uniform over `K` streams, or Zipf
//! (rank `r` drawn with probability proportional to `1 / r^s`), so a few
//! streams, and therefore a few shards, run hot.

use crate::rng::Rng;

/// Default Zipf exponent: the YCSB default, a strongly skewed but not degenerate load.
pub const ZIPF_EXPONENT_DEFAULT: f64 = 0.99;

/// Stream counts above this are refused for Zipf: the cumulative table costs 8 bytes per stream.
pub const ZIPF_STREAMS_MAX: u64 = 1 << 24;

#[derive(Debug, Clone)]
pub enum StreamChooser {
    Uniform { base: u64, count: u64 },
    Zipf { base: u64, cdf: Vec<f64> },
}

impl StreamChooser {
    pub fn uniform(base: u64, count: u64) -> Self {
        assert!(count > 0);
        StreamChooser::Uniform { base, count }
    }

    /// Builds the cumulative distribution once; each draw is then a binary search.
    pub fn zipf(base: u64, count: u64, exponent: f64) -> Self {
        assert!(count > 0);
        assert!(count <= ZIPF_STREAMS_MAX);
        assert!(exponent.is_finite() && exponent > 0.0);
        let mut cdf = Vec::with_capacity(count as usize);
        let mut sum = 0.0f64;
        for rank in 1..=count {
            sum += 1.0 / (rank as f64).powf(exponent);
            cdf.push(sum);
        }
        for v in &mut cdf {
            *v /= sum;
        }
        StreamChooser::Zipf { base, cdf }
    }

    pub fn base(&self) -> u64 {
        match self {
            StreamChooser::Uniform { base, .. } | StreamChooser::Zipf { base, .. } => *base,
        }
    }

    pub fn count(&self) -> u64 {
        match self {
            StreamChooser::Uniform { count, .. } => *count,
            StreamChooser::Zipf { cdf, .. } => cdf.len() as u64,
        }
    }

    /// The next stream id. Zipf rank 1 (the hottest) is `base`.
    pub fn next(&self, rng: &mut Rng) -> u64 {
        match self {
            StreamChooser::Uniform { base, count } => base + rng.below(*count),
            StreamChooser::Zipf { base, cdf } => {
                let u = rng.unit_f64();
                let idx = cdf.partition_point(|&c| c <= u);
                // Rounding can leave the last entry a hair below 1.0.
                base + idx.min(cdf.len() - 1) as u64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_covers_the_range_evenly() {
        let chooser = StreamChooser::uniform(100, 4);
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            let s = chooser.next(&mut rng);
            assert!((100..104).contains(&s));
            counts[(s - 100) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven: {counts:?}");
        }
    }

    #[test]
    fn zipf_frequencies_follow_the_power_law() {
        let chooser = StreamChooser::zipf(0, 1000, 1.0);
        let mut rng = Rng::new(11);
        let mut counts = vec![0u32; 1000];
        let draws = 200_000;
        for _ in 0..draws {
            counts[chooser.next(&mut rng) as usize] += 1;
        }
        // With s = 1, P(rank 1) / P(rank 2) = 2 and P(rank 1) = 1 / H(1000) ~ 0.1336.
        let p1 = f64::from(counts[0]) / f64::from(draws);
        assert!((0.125..0.142).contains(&p1), "p(rank 1) = {p1}");
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((1.8..2.2).contains(&ratio), "rank1/rank2 = {ratio}");
        // The tail is still reached.
        assert!(counts[500..].iter().any(|&c| c > 0));
    }

    #[test]
    fn zipf_single_stream_always_picks_it() {
        let chooser = StreamChooser::zipf(9, 1, ZIPF_EXPONENT_DEFAULT);
        let mut rng = Rng::new(5);
        for _ in 0..100 {
            assert_eq!(chooser.next(&mut rng), 9);
        }
    }
}
