//! Medians, spreads and the ratio to the best peer, for one row of a table.
//!
//! The median comes from an HDR histogram (the `hdrhistogram` crate), not a
//! hand-made percentile: its 50th percentile, and for an even number of runs
//! the mean of the two middle runs the histogram names.

use hdrhistogram::Histogram;

/// Values are recorded as thousandths above the smallest value, so fractions
/// and negative values (memory that shrank) keep three significant digits of
/// their distance from the minimum, which is exact.
const SCALE: f64 = 1000.0;
const SIGNIFICANT_DIGITS: u8 = 3;

/// Which way a row improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    pub fn word(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// What several runs of one measurement came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Summary {
    /// `None` when no value is finite.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let min = finite.iter().copied().reduce(f64::min)?;
        let max = finite.iter().copied().reduce(f64::max)?;
        let scaled = |value: f64| ((value - min) * SCALE).round() as u64;
        let mut histogram = Histogram::<u64>::new(SIGNIFICANT_DIGITS).ok()?;
        for &value in &finite {
            // Non-negative by construction (value >= min); an auto-resizing
            // histogram takes any u64.
            histogram.record(scaled(value)).ok()?;
        }
        // A quantile names a bucket; the run recorded in it is the value,
        // exact rather than the bucket's edge. With an even number of runs
        // the median is the mean of the two middle runs: the quantile just
        // past the half names the upper one.
        let run_at = |quantile: f64| {
            let bucket = histogram.value_at_quantile(quantile);
            finite
                .iter()
                .copied()
                .find(|&v| histogram.equivalent(scaled(v), bucket))
                .unwrap_or(min + bucket as f64 / SCALE)
        };
        let runs = finite.len();
        let lower = run_at(0.5);
        let median = if runs % 2 == 0 {
            let upper = run_at((runs / 2) as f64 / runs as f64 + 0.5 / runs as f64);
            (lower + upper) / 2.0
        } else {
            lower
        };
        Some(Summary {
            median,
            min,
            max,
            runs,
        })
    }

    /// (max - min) / |median|, the spread as a fraction of the median.
    pub fn relative_spread(&self) -> Option<f64> {
        (self.median != 0.0).then(|| (self.max - self.min) / self.median.abs())
    }
}

/// The peer with the best median, by `better`; ties go to the first one.
pub fn best_peer<'a>(peers: &[(&'a str, Summary)], better: Better) -> Option<(&'a str, Summary)> {
    peers.iter().copied().reduce(|best, next| {
        let improves = match better {
            Better::Higher => next.1.median > best.1.median,
            Better::Lower => next.1.median < best.1.median,
        };
        if improves {
            next
        } else {
            best
        }
    })
}

/// The subject's median over the best peer's: below 1 is faster for a
/// time, above 1 is faster for a bandwidth. `None` when the best peer's
/// median is 0.
pub fn ratio_to_best_peer(
    subject: Summary,
    peers: &[(&str, Summary)],
    better: Better,
) -> Option<(String, f64)> {
    let (name, best) = best_peer(peers, better)?;
    (best.median != 0.0).then(|| (name.to_string(), subject.median / best.median))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-3 * b.abs().max(1.0)
    }

    #[test]
    fn median_of_an_odd_count_is_the_middle_run() {
        let s = Summary::of(&[3.2, 1.5, 2.25]).unwrap();
        assert!(close(s.median, 2.25), "{s:?}");
        assert_eq!((s.min, s.max, s.runs), (1.5, 3.2, 3));
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_runs() {
        let s = Summary::of(&[10.0, 40.0, 20.0, 30.0]).unwrap();
        assert!(close(s.median, 25.0), "{s:?}");
        let s = Summary::of(&[508.0, 577.0]).unwrap();
        assert!(close(s.median, 542.5), "{s:?}");
        let s = Summary::of(&[7.0, 7.0]).unwrap();
        assert!(close(s.median, 7.0), "{s:?}");
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert!(close(Summary::of(&values).unwrap().median, 5.5));
    }

    #[test]
    fn large_and_negative_values_keep_three_digits() {
        let s = Summary::of(&[1812.0, 1781.0, 1845.0, 1896.0, 1985.0]).unwrap();
        assert!(close(s.median, 1845.0), "{s:?}");
        let s = Summary::of(&[-12.0, 4.0, -3.0]).unwrap();
        assert!(close(s.median, -3.0), "{s:?}");
        assert_eq!((s.min, s.max), (-12.0, 4.0));
    }

    #[test]
    fn no_finite_value_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }

    #[test]
    fn spread_is_relative_to_the_median() {
        let s = Summary::of(&[9.0, 10.0, 12.0]).unwrap();
        assert!(close(s.relative_spread().unwrap(), 0.3));
    }

    #[test]
    fn best_peer_follows_the_direction_of_the_row() {
        let a = Summary::of(&[2.0]).unwrap();
        let b = Summary::of(&[4.0]).unwrap();
        let peers = [("overlay2", a), ("btrfs", b)];
        assert_eq!(best_peer(&peers, Better::Lower).unwrap().0, "overlay2");
        assert_eq!(best_peer(&peers, Better::Higher).unwrap().0, "btrfs");
        let subject = Summary::of(&[3.0]).unwrap();
        let (name, ratio) = ratio_to_best_peer(subject, &peers, Better::Lower).unwrap();
        assert_eq!(name, "overlay2");
        assert!(close(ratio, 1.5));
        let (name, ratio) = ratio_to_best_peer(subject, &peers, Better::Higher).unwrap();
        assert_eq!(name, "btrfs");
        assert!(close(ratio, 0.75));
        assert_eq!(ratio_to_best_peer(subject, &[], Better::Lower), None);
    }
}
