//! Prometheus text: parsing, sums and histogram quantiles.

use super::*;

/// Samples keyed by `name{labels}` exactly as rendered.
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((key, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                map.insert(key.to_string(), v);
            }
        }
        Metrics(map)
    }

    /// Sum of the samples named `name` whose labels include every `k="v"` in `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                let (n, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
                n == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Cumulative histogram buckets `(le, count)` of `name` for the given labels, sorted by le.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (k, v) in &self.0 {
            let Some((n, rest)) = k.split_once('{') else {
                continue;
            };
            if n != bucket
                || !labels
                    .iter()
                    .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
            {
                continue;
            }
            let Some(le) = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
                continue;
            };
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += v;
        }
        let mut out: Vec<(f64, f64)> = by_le.into_values().collect();
        out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        out
    }
}

/// Bucket-wise difference of two cumulative histograms (after - before).
pub fn bucket_delta(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|x| x.1)
                .unwrap_or(0.0);
            (*le, c - b)
        })
        .collect()
}

/// The upper bound of the bucket holding the `p`-th percentile, and the linear interpolation
/// inside it (Prometheus' histogram_quantile), in seconds.
pub fn histogram_quantile(buckets: &[(f64, f64)], p: f64) -> (f64, f64) {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let rank = p / 100.0 * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            let interp = if le.is_infinite() {
                prev.0
            } else {
                prev.0 + (le - prev.0) * (rank - prev.1) / (c - prev.1).max(1e-9)
            };
            return (le, interp);
        }
        prev = (le, c);
    }
    (f64::INFINITY, f64::INFINITY)
}
