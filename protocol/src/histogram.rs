//! A latency histogram with fixed logarithmic buckets, shared by the agent (which records) and
//! the server (which merges and reads percentiles), so bucket edges can never disagree.
//!
//! Bucket `i` holds values in `(2^((i-1)/4), 2^(i/4)]` microseconds: four buckets per doubling,
//! so a percentile read from it is within 19 % of the true value. Bucket 0 holds everything up
//! to 1 µs and the last bucket everything above about an hour.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Number of buckets.
pub const BUCKETS: usize = 128;
const PER_DOUBLING: f64 = 4.0;

/// Upper edge of bucket `i` in microseconds.
pub fn bucket_upper_us(i: usize) -> f64 {
    (i as f64 / PER_DOUBLING).exp2()
}

/// The bucket a value in microseconds falls in.
pub fn bucket_of(us: f64) -> usize {
    if us.is_nan() || us <= 1.0 {
        return 0;
    }
    let i = (us.log2() * PER_DOUBLING).ceil();
    (i as usize).min(BUCKETS - 1)
}

/// Counts per bucket, sparse on the wire (`[[bucket, count], …]`), plus count, sum and max.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    #[serde(with = "sparse")]
    pub buckets: BTreeMap<u16, u64>,
    pub count: u64,
    pub sum_us: f64,
    pub max_us: f64,
}

impl LatencyHistogram {
    pub fn record_us(&mut self, us: f64) {
        let us = if us.is_finite() && us > 0.0 { us } else { 0.0 };
        *self.buckets.entry(bucket_of(us) as u16).or_default() += 1;
        self.count += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
    }

    /// Adds another histogram's counts: merging is exact.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (&bucket, &count) in &other.buckets {
            *self.buckets.entry(bucket).or_default() += count;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The `q` quantile (0..=1) as the upper edge of the bucket that holds it, capped at the
    /// maximum seen; `None` when empty.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (&bucket, &count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return Some(bucket_upper_us(bucket as usize).min(self.max_us.max(1.0)));
            }
        }
        Some(self.max_us)
    }

    pub fn mean_us(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us / self.count as f64)
    }

    /// Bucket indexes in range and counts adding up.
    pub fn validate(&self) -> Result<(), String> {
        if let Some((&bucket, _)) = self.buckets.iter().find(|(&b, _)| b as usize >= BUCKETS) {
            return Err(format!("latency bucket {bucket} is out of range"));
        }
        let total: u128 = self.buckets.values().map(|&c| u128::from(c)).sum();
        if total != u128::from(self.count) {
            return Err(format!(
                "latency buckets add up to {total}, count says {}",
                self.count
            ));
        }
        Ok(())
    }
}

mod sparse {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        map: &BTreeMap<u16, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u16, u64>, D::Error> {
        let pairs = Vec::<(u16, u64)>::deserialize(d)?;
        let mut map = BTreeMap::new();
        for (bucket, count) in pairs {
            let slot: &mut u64 = map.entry(bucket).or_default();
            *slot = slot.saturating_add(count);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        assert_eq!(bucket_of(0.5), 0);
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(2.0), 4);
        assert_eq!(bucket_of(1e12), BUCKETS - 1);
        for us in [3.0, 17.0, 250.0, 9_999.0] {
            let b = bucket_of(us);
            assert!(
                bucket_upper_us(b) >= us && bucket_upper_us(b - 1) < us,
                "{us}"
            );
            assert!(bucket_upper_us(b) / us < 1.19);
        }
    }

    #[test]
    fn quantiles_and_exact_merge() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        for i in 1..=100 {
            a.record_us(f64::from(i) * 10.0);
            b.record_us(5_000.0);
        }
        let p50 = a.quantile_us(0.5).unwrap();
        assert!((500.0..=600.0).contains(&p50), "{p50}");
        assert_eq!(a.quantile_us(1.0), Some(1000.0));
        a.merge(&b);
        assert_eq!(a.count, 200);
        assert!(a.quantile_us(0.95).unwrap() >= 5_000.0);
        a.validate().unwrap();
        assert_eq!(LatencyHistogram::default().quantile_us(0.5), None);
    }
}
