//! A fixed-size log-linear histogram of microseconds (HDR-style): exact below 256 µs, then 128
//! sub-buckets per power of two (under 0.8% relative error). Recording is an index computation
//! and an increment: no allocation after `new`, so it can sit on the per-packet path.

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are counted exactly.
const LINEAR: u64 = 2 * SUB;
const BUCKETS: usize = (LINEAR + (64 - (SUB_BITS as u64 + 1)) * SUB) as usize;

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
    sum: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) - SUB;
    (LINEAR + u64::from(exp - (SUB_BITS + 1)) * SUB + sub) as usize
}

/// The highest value that lands in bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let exp = (i - LINEAR) / SUB + u64::from(SUB_BITS) + 1;
    let sub = (i - LINEAR) % SUB;
    let shift = exp - u64::from(SUB_BITS);
    ((sub + SUB) << shift) + (1 << shift) - 1
}

impl Hist {
    pub fn record(&mut self, us: u64) {
        self.counts[index(us)] += 1;
        self.n += 1;
        self.sum = self.sum.saturating_add(us);
        self.max = self.max.max(us);
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum as f64 / self.n as f64
        }
    }

    /// The value at quantile `q` (0..=1), reported as its bucket's upper bound (never above
    /// the true maximum). 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_whose_upper_bound_is_close_above_it() {
        for v in (0..5_000_000u64)
            .step_by(997)
            .chain([u64::MAX / 2, 255, 256, 257])
        {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            let u = upper(i);
            assert!(u >= v, "{v} -> {u}");
            assert!(u - v <= v / 100 + 1, "{v} -> {u}");
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Hist::default();
        for v in 1..=1000 {
            h.record(v);
        }
        // 500 shares a two-wide bucket with 501; the bucket's upper bound is reported.
        assert!(
            (500..=501).contains(&h.quantile(0.5)),
            "{}",
            h.quantile(0.5)
        );
        assert_eq!(h.quantile(0.1), 100, "exact below 256");
        let p99 = h.quantile(0.99);
        assert!((990..=998).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1000);
        assert_eq!(h.max(), 1000);
        let mut g = Hist::default();
        g.record(5000);
        h.merge(&g);
        assert_eq!(h.count(), 1001);
        assert_eq!(h.quantile(1.0), 5000);
    }
}
