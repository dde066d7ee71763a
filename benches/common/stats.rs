//! Percentile statistics of timings.

use super::*;

#[derive(Debug, Clone)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn stats(samples: &[f64]) -> Stats {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        n: v.len(),
        min: v.first().copied().unwrap_or(f64::NAN),
        p50: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(f64::NAN),
        mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
    }
}

/// Durations in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Stats {
    /// `n=.. p50=.. p90=.. p99=.. max=..` in ms.
    pub fn line_ms(&self) -> String {
        format!(
            "n={} min={:.3} p50={:.3} p90={:.3} p99={:.3} max={:.3} mean={:.3} (ms)",
            self.n, self.min, self.p50, self.p90, self.p99, self.max, self.mean
        )
    }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}
