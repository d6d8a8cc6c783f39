//! The statistics renkei computes: one file each, one trait, one registry.
//!
//! Like an analytical engine's aggregate functions (DataFusion's `Accumulator`), each
//! statistic splits its work into a partial side and a final side:
//!
//! - **partial, at each node**: [`Statistic::bind`] fixes, from the schema and the query,
//!   which columns it reads and what it releases ([`Part`]s, each a vector of integers with
//!   its sensitivity, given its own mechanism by the node's DP layer); the bound
//!   [`Accumulator`] computes the exact local result ([`Accumulator::evaluate`]) and, once
//!   the node has noised each part, puts it in its wire form ([`Accumulator::release`],
//!   [`Accumulator::masked_shape`] for a secure round's masked words);
//! - **final, at the aggregator**: [`Statistic::combine`] merges the nodes' releases (or one
//!   secure total read as a single release) into the estimate with its 95% interval;
//! - **truth**: [`Statistic::pooled`] is its answer over pooled records, row by row, which
//!   tests compare the engine and the network against.
//!
//! [`for_query`] is the registry: an exhaustive match over the wire's
//! [`Aggregate`](renkei_protocol::Aggregate), so a new aggregate does not compile until it
//! has a statistic.

mod count;
mod grouped_count;
mod grouped_sum;
mod mean;
mod quantile;
mod sum;

use std::fmt;

use renkei_protocol::{Aggregate, MaskedShape, Query, Release};

use crate::bind::{Binder, SchemaError};
use crate::cohort::Cohort;
use crate::estimate::{Combined, Z_95};
use crate::truth::{PooledCohort, TrueValue};

/// One released quantity: `len` numbers that share one mechanism.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Part {
    /// How much one patient can change these numbers together (L2; L1 equals it for one
    /// number), in stored units.
    pub sensitivity: f64,
    /// How many numbers.
    pub len: usize,
    /// Whether they are counts, to which a minimum cell size applies.
    pub counts: bool,
}

/// The exact partial result of a statistic at one node: one vector per [`Part`], in order.
/// Never leaves the node without noise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exact(pub Vec<Vec<i64>>);

/// One part after noise: its values, and which were withheld below the minimum cell size
/// (those read 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoisyPart {
    pub values: Vec<i64>,
    pub suppressed: Vec<bool>,
}

impl NoisyPart {
    /// Values released as they are (nothing withheld).
    pub fn plain(values: Vec<i64>) -> Self {
        Self {
            suppressed: vec![false; values.len()],
            values,
        }
    }
}

/// One node's release as the final side reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteRelease<'a> {
    pub release: &'a Release,
    /// Digits after the point of released sums and bins.
    pub value_scale: u8,
    /// The minimum cell size applied to counts (0: none).
    pub min_cell_size: u64,
    /// Noise standard deviation of the first part's numbers.
    pub noise_std: f64,
    /// Of the second part's, when there is one (a mean's counts).
    pub count_noise_std: Option<f64>,
}

/// A statistic: how it binds to a schema, combines across nodes and reads pooled data.
pub trait Statistic: fmt::Debug + Sync {
    /// Binds the query's statistic to the dataset's schema (its columns, bounds and
    /// levels), or says why it does not fit.
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError>;

    /// The network-wide estimate from the releases of the nodes that answered (at least
    /// one), each with its own noise.
    fn combine(&self, query: &Query, sites: &[SiteRelease<'_>]) -> Combined;

    /// The exact answer over pooled rows.
    fn pooled(&self, query: &Query, cohort: &PooledCohort) -> TrueValue;
}

/// A statistic bound to one node's schema: its partial side.
pub trait Accumulator: fmt::Debug + Send + Sync {
    /// The released quantities, in order.
    fn parts(&self) -> Vec<Part>;

    /// Digits after the point of released sums and bins (0 for counts).
    fn value_scale(&self) -> u8;

    /// Whether the release is a vector (histogram, cells): zCDP only.
    fn vector(&self) -> bool;

    /// The exact result over a cohort, one vector per part.
    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact;

    /// The wire form of the noisy parts.
    fn release(&self, noisy: Vec<NoisyPart>) -> Release;

    /// What a secure round's masked words (every part, in order) add up to.
    fn masked_shape(&self) -> MaskedShape;
}

/// The registry: the statistic that answers `query`.
pub fn for_query(query: &Query) -> &'static dyn Statistic {
    let grouped = !query.group_by.is_empty();
    match &query.aggregate {
        Aggregate::CountPatients | Aggregate::CountRows if grouped => &grouped_count::GroupedCount,
        Aggregate::CountPatients | Aggregate::CountRows => &count::Count,
        Aggregate::Sum { .. } if grouped => &grouped_sum::GroupedSum { mean: false },
        Aggregate::Sum { .. } => &sum::Sum,
        Aggregate::Mean { .. } if grouped => &grouped_sum::GroupedSum { mean: true },
        Aggregate::Mean { .. } => &mean::Mean,
        Aggregate::Quantile { .. } => &quantile::Quantile,
    }
}

/// Combines the nodes' releases for `query`; `None` when no node answered.
pub fn combine(query: &Query, sites: &[SiteRelease<'_>]) -> Option<Combined> {
    if sites.is_empty() {
        return None;
    }
    Some(for_query(query).combine(query, sites))
}

/// The exact answer of `query` over pooled rows.
pub fn pooled(query: &Query, cohort: &PooledCohort) -> TrueValue {
    for_query(query).pooled(query, cohort)
}

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

/// A small image to test statistics on: six patients (one without consent), their
/// timepoints, and the pooled rows the same data gives the truth.
#[cfg(test)]
pub(crate) mod fixture {
    use std::sync::Arc;

    use renkei_protocol::{Query, Release};

    use crate::column::NULL;
    use crate::image::{Dataset, ImageBuilder};
    use crate::schema::{DatasetSchema, SECONDARY_USE};
    use crate::statistic::{NoisyPart, SiteRelease};
    use crate::truth::{PooledCohort, PooledRow};

    const SCHEMA: &str = r#"
name = "test"
version = 1
max_timepoints_per_patient = 2

[[patients]]
name = "age"
type = "integer"
min = 0
max = 100

[[patients]]
name = "sex"
type = "categorical"
levels = ["female", "male"]

[[patients]]
name = "diabetes"
type = "boolean"

[[timepoints]]
name = "crp"
type = "decimal"
min = 0.0
max = 50.0
scale = 1

[[timepoints]]
name = "icu"
type = "boolean"
"#;

    /// (age, sex level, diabetes, consented, timepoints as (crp in tenths, icu)).
    type Patient = (i64, i64, i64, bool, &'static [(i64, i64)]);

    pub(crate) const PATIENTS: &[Patient] = &[
        (30, 0, 0, true, &[(12, 0), (80, 1)]),
        (45, 1, 1, true, &[(450, 1)]),
        (70, 1, 1, true, &[(NULL, 0), (40, 1)]),
        (20, 0, 0, true, &[]),
        // Three timepoints: only two count.
        (90, 0, 1, true, &[(5, 0), (20, 1), (30, 1)]),
        (99, 1, 1, false, &[(300, 1)]),
    ];

    pub(crate) fn dataset() -> Dataset {
        let schema = Arc::new(DatasetSchema::from_toml(SCHEMA).unwrap());
        let mut image = ImageBuilder::new(schema);
        let mut columns = vec![Vec::new(); 3];
        for (index, (age, sex, diabetes, consented, _)) in PATIENTS.iter().enumerate() {
            let scopes: &[&str] = if *consented { &[SECONDARY_USE] } else { &[] };
            assert_eq!(
                image.add_patient(scopes.iter().copied()).unwrap(),
                index as u32
            );
            columns[0].push(*age);
            columns[1].push(*sex);
            columns[2].push(*diabetes);
        }
        image.extend_patient_columns(&columns);
        let mut timepoint_columns = vec![Vec::new(); 2];
        for (patient, (.., timepoints)) in PATIENTS.iter().enumerate() {
            for (number, (crp, icu)) in timepoints.iter().enumerate() {
                image.add_timepoint(patient as u32, number as u16);
                timepoint_columns[0].push(*crp);
                timepoint_columns[1].push(*icu);
            }
        }
        image.extend_timepoint_columns(&timepoint_columns, None);
        image.finish()
    }

    /// The pooled rows of the consenting patients with a row matching `keep`, as the
    /// testnet's generator would hand them to a statistic's truth: the view's rows as
    /// (age, sex, diabetes, crp, icu), the statistic's value and the row's cell read by
    /// `value` and `cell`.
    pub(crate) fn pooled(
        timepoints: bool,
        keep: impl Fn(&[i64; 5]) -> bool,
        value: impl Fn(&[i64; 5]) -> Option<f64>,
        cell: impl Fn(&[i64; 5]) -> Option<Vec<String>>,
    ) -> PooledCohort {
        let mut cohort = PooledCohort::default();
        for (age, sex, diabetes, consented, timepoints_of) in PATIENTS {
            if !consented {
                continue;
            }
            let rows: Vec<[i64; 5]> = if timepoints {
                timepoints_of
                    .iter()
                    .map(|(crp, icu)| [*age, *sex, *diabetes, *crp, *icu])
                    .collect()
            } else {
                vec![[*age, *sex, *diabetes, NULL, NULL]]
            };
            let rows: Vec<PooledRow> = rows
                .iter()
                .filter(|row| keep(row))
                .take(if timepoints { 2 } else { 1 })
                .map(|row| PooledRow {
                    value: value(row),
                    cell: cell(row),
                })
                .collect();
            if !rows.is_empty() {
                cohort.patients.push(rows);
            }
        }
        cohort
    }

    /// The unnoised release of `sql`-like `query` at the fixture.
    pub(crate) fn release(query: &Query) -> Release {
        let data = dataset();
        let compiled = data.compile(query).unwrap();
        compiled.unnoised_release(data.evaluate(&compiled))
    }

    /// Releases as the final side reads them, each with noise sd `sd`.
    pub(crate) fn sites(releases: &[Release], scale: u8, sd: f64) -> Vec<SiteRelease<'_>> {
        releases
            .iter()
            .map(|release| SiteRelease {
                release,
                value_scale: scale,
                min_cell_size: 0,
                noise_std: sd,
                count_noise_std: Some(sd),
            })
            .collect()
    }

    pub(crate) fn plain(values: Vec<i64>) -> NoisyPart {
        NoisyPart::plain(values)
    }
}
