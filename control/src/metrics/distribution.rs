//! A distribution of measurements (durations or counts) kept in an hdrhistogram with its
//! exact sum, and the fixed buckets it is exported over: kube-proxy's, with finer ones
//! added below its first.

use std::time::Duration;

use hdrhistogram::Histogram;

/// The largest value a duration distribution keeps apart: one hour, in microseconds.
/// Longer ones are counted as one hour.
const MAX_MICROS: u64 = 3_600_000_000;

/// kube-proxy's `network_programming_duration_seconds` buckets (0, 0.25 s, 0.5 s, 1–59 s
/// by 1, 60–115 s by 5, 2–5 min by 30 s), with 1 ms to 100 ms added below 0.25 s.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets (1 ms doubling to 16.4 s),
/// with 100 µs to 500 µs added below.
pub fn sync_buckets() -> Vec<f64> {
    let mut b = vec![0.0001, 0.00025, 0.0005];
    b.extend((0..15).map(|i| 0.001 * f64::from(1u32 << i)));
    b
}

/// Queue depth buckets: 1 to 1024 batches, doubling.
pub fn queue_depth_buckets() -> Vec<f64> {
    (0..11).map(|i| f64::from(1u32 << i)).collect()
}

/// A distribution of values kept in an hdrhistogram with its exact sum.
#[derive(Clone, Debug)]
pub struct Distribution {
    histogram: Histogram<u64>,
    /// Recorded units per exported unit (10⁶ for durations kept in microseconds).
    scale: f64,
    sum: f64,
}

impl Distribution {
    /// Durations, kept in microseconds up to an hour.
    pub fn durations() -> Distribution {
        Distribution {
            histogram: Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("valid hdrhistogram bounds"),
            scale: 1e6,
            sum: 0.0,
        }
    }

    /// Counts, up to a million.
    pub fn counts() -> Distribution {
        Distribution {
            histogram: Histogram::new_with_bounds(1, 1_000_000, 3)
                .expect("valid hdrhistogram bounds"),
            scale: 1.0,
            sum: 0.0,
        }
    }

    /// Records a duration (a [`Distribution::durations`]).
    pub fn record_duration(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros);
        self.sum += d.as_secs_f64();
    }

    /// Records a count (a [`Distribution::counts`]).
    pub fn record_count(&mut self, n: u64) {
        self.histogram.saturating_record(n);
        self.sum += n as f64;
    }

    /// Values recorded.
    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value at quantile `q` (0..=1), in exported units (seconds for durations).
    pub fn quantile(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / self.scale
    }

    /// The largest value, in exported units.
    pub fn max(&self) -> f64 {
        self.histogram.max() as f64 / self.scale
    }

    /// The sum of the values, in exported units.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// The underlying histogram (microseconds for durations).
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.histogram
    }

    /// Per-bucket counts (not cumulative) for `bounds` (ascending, exported units), then
    /// the `+Inf` bucket, as prometheus-client's encoder takes them.
    pub fn buckets(&self, bounds: &[f64]) -> Vec<(f64, u64)> {
        let mut counts = vec![0u64; bounds.len() + 1];
        for v in self.histogram.iter_recorded() {
            let value = self.histogram.lowest_equivalent(v.value_iterated_to()) as f64 / self.scale;
            let i = bounds.partition_point(|b| *b < value);
            counts[i] += v.count_at_value();
        }
        bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect()
    }
}
