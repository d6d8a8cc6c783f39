//! Pieces several statistics share: splitting a budget over parts, adding counts and sums
//! across nodes with withheld cells, the delta-method ratio of a mean, saturating sums and
//! the values of pooled rows.

use renkei_protocol::Release;

use super::traits::SiteRelease;
use crate::estimate::Z_95;
use crate::truth::PooledCohort;

/// Splits a budget of `total` millionths over `parts` mechanisms: each gets an equal share,
/// the last the remainder, so together they spend exactly what was asked.
pub fn split_budget(total: u64, parts: usize) -> Vec<u64> {
    let n = parts.max(1) as u64;
    let share = total / n;
    let mut shares = vec![share; parts.max(1)];
    if let Some(last) = shares.last_mut() {
        *last = total - share * (n - 1);
    }
    shares
}

pub(crate) fn unscale(value: f64, scale: u8) -> f64 {
    value / 10f64.powi(i32::from(scale))
}

/// One node's share of a count or sum: (value, withheld, noise sd, minimum cell size).
pub(crate) type CountPart = (i64, bool, f64, u64);

/// The nodes' single numbers (a count or a sum), each with its noise and withholding.
pub(crate) fn scalar_parts(sites: &[SiteRelease<'_>]) -> Vec<CountPart> {
    sites
        .iter()
        .filter_map(|site| {
            let Release::Scalar { value, suppressed } = site.release else {
                return None;
            };
            Some((*value, *suppressed, site.noise_std, site.min_cell_size))
        })
        .collect()
}

/// Counts (or sums) from several nodes: (estimate, sd, interval) in the column's unit. A
/// node whose count fell below the minimum cell size `k` reported only that: it adds the
/// middle of `[0, k-1]` to the estimate and that whole range to the interval.
pub(crate) fn add_counts(parts: &[CountPart], scale: u8) -> (f64, f64, [f64; 2]) {
    let mut reported = 0.0;
    let mut midpoints = 0.0;
    let mut span = 0.0;
    let mut variance = 0.0;
    for (value, suppressed, std, min_cell) in parts {
        variance += std * std;
        if *suppressed {
            let below = min_cell.saturating_sub(1) as f64;
            midpoints += (below / 2.0).floor();
            span += below;
        } else {
            reported += *value as f64;
        }
    }
    let sd = variance.sqrt();
    let estimate = unscale(reported + midpoints, scale);
    let low = unscale(reported - Z_95 * sd, scale);
    let high = unscale(reported + span + Z_95 * sd, scale);
    (estimate, unscale(sd, scale), [low, high])
}

/// A ratio of noisy totals (a mean): the estimate and its sd by the delta method,
/// `sqrt(var_S + mean²·var_C) / C`, in the column's unit; `None` below a count of 1.
pub(crate) fn ratio(
    sum: f64,
    count: f64,
    var_sum: f64,
    var_count: f64,
    scale: u8,
) -> Option<(f64, f64)> {
    if count < 1.0 {
        return None;
    }
    let mean = sum / count;
    let sd = (var_sum + mean * mean * var_count).sqrt() / count;
    Some((unscale(mean, scale), unscale(sd, scale)))
}

/// The sum of `values`, saturating at the ends of `i64` (the
/// schema's bounds make that unreachable).
pub(crate) fn saturating_sum(values: impl Iterator<Item = i64>) -> i64 {
    saturate(values.map(i128::from).sum())
}

/// `sum` in `i64`, saturating at its ends.
pub(crate) fn saturate(sum: i128) -> i64 {
    i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX })
}

/// Every value of the pooled cohort's rows, capped per patient as the cohort is.
pub(crate) fn pooled_values(cohort: &PooledCohort) -> Vec<f64> {
    cohort
        .patients
        .iter()
        .flatten()
        .filter_map(|row| row.value)
        .collect()
}

/// A standard normal draw (Box–Muller), for redrawing noise around a release: intervals by
/// parametric bootstrap are post-processing and need no secure randomness.
pub(crate) fn standard_normal(rng: &mut impl rand::Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_split_exactly() {
        assert_eq!(split_budget(50_001, 2), vec![25_000, 25_001]);
        assert_eq!(split_budget(7, 1), vec![7]);
        assert_eq!(split_budget(10, 3), vec![3, 3, 4]);
        assert_eq!(split_budget(10, 3).iter().sum::<u64>(), 10);
    }

    #[test]
    fn a_withheld_count_widens_the_interval_over_its_range() {
        let (estimate, sd, [low, high]) =
            add_counts(&[(100, false, 2.0, 10), (0, true, 2.0, 10)], 0);
        assert_eq!(estimate, 104.0);
        assert!((sd - 8f64.sqrt()).abs() < 1e-12);
        assert!((low - (100.0 - Z_95 * sd)).abs() < 1e-9);
        assert!((high - (109.0 + Z_95 * sd)).abs() < 1e-9);
    }

    #[test]
    fn a_ratio_needs_a_count_of_one() {
        assert_eq!(ratio(10.0, 0.5, 1.0, 1.0, 0), None);
        let (mean, sd) = ratio(1000.0, 10.0, 4.0, 1.0, 1).unwrap();
        assert!((mean - 10.0).abs() < 1e-12);
        assert!((sd - (4.0f64 + 10_000.0).sqrt() / 100.0).abs() < 1e-12);
    }
}
