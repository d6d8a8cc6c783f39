//! `KAPLAN_MEIER(time, event, horizon) … [GROUP BY strata]`: a survival curve per stratum
//! from noisy per-day event and censoring counts, aggregated in a b-ary tree.
//!
//! **Partial side.** Over patient-level rows (`patients` or a `WITH` table), each patient's
//! time is the first present of the time columns, clamped to `[0, horizon]`; a patient later
//! than the horizon is censored at it, and one with no time is left out. The patient adds
//! one to day `t`'s event count if the event condition holds (true; missing or false is
//! censored), else to its censoring count. Both count vectors (padded to a power of the
//! branching factor) are released as complete b-ary trees, every node the sum of its leaves:
//! a patient changes one leaf and its ancestors, one node per level, so the L2 sensitivity
//! is `sqrt(levels)` whatever the horizon. The numbers at risk are suffix sums, which the
//! tree answers from O(b·log T) nodes rather than T leaves. The trees go out as one vector
//! ([`Release::Cells`], one part per tree node, one number per stratum), so a secure round
//! masks it as one vector and only the network's total tree is ever read.
//!
//! **Final side.** The nodes' trees are added, made consistent by least squares (Hay et
//! al., "Boosting the accuracy of differentially private histograms through consistency",
//! 2010: a weighted bottom-up pass and a top-down pass, exact for equal noise per node),
//! and read as leaves; their running totals are fitted monotone (pool adjacent violators,
//! never below 0) and differenced, so no day has negative events or censorings and no
//! day's positive noise is kept while its negative noise is dropped. The curve is the
//! product-limit estimate over these days, monotone and within `[0, 1]`; a day with fewer at
//! risk than the minimum cell size or ten node noise sds takes no step (the tail, where
//! noise would pass for deaths, stays at the last estimate, its band's lower end 0 there). Its 95% band
//! adds Greenwood's sampling variance to the noise's variance, the latter from a parametric
//! bootstrap of the released trees (post-processing, so it costs no budget). Median
//! survival is the first day with S ≤ ½, its interval the first days the band's lower and
//! upper ends reach ½. Between two strata the log-rank statistic is computed from the
//! consistent counts, its variance the hypergeometric one plus the noise's (bootstrapped).

use std::collections::BTreeMap;

use rand::SeedableRng;
use renkei_protocol::{Aggregate, MaskedShape, Query, Release};
use serde::Serialize;

use super::shared::standard_normal;
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Grouping, Node, SchemaError};
use crate::cohort::Cohort;
use crate::column::{NO_CELL, NULL};
use crate::estimate::{Combined, Z_95};
use crate::image::Source;
use crate::truth::{PooledCohort, TrueValue};

#[derive(Debug)]
pub(crate) struct KaplanMeier;

/// Most numbers one survival release may carry (tree nodes × 2 × strata): a secure round
/// masks each in a 64-bit word, and the masked vector must fit one response message.
pub const MAX_SURVIVAL_NUMBERS: usize = 4_096;

/// Replicates of the parametric bootstrap that sizes the noise's share of the band.
const BOOTSTRAP: usize = 200;

/// The complete b-ary tree over `leaves` days: branching factor and levels, chosen to make
/// a suffix sum's noise variance smallest (about `(b − 1) · levels²` node variances, since
/// the sensitivity is `sqrt(levels)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TreeShape {
    pub branching: usize,
    /// Leaf level included (a tree of one leaf has one level).
    pub levels: usize,
}

impl TreeShape {
    /// The shape for `days` leaves.
    pub fn for_days(days: usize) -> Self {
        [2usize, 3, 4, 8]
            .into_iter()
            .map(|branching| {
                let mut levels = 1;
                let mut width = 1;
                while width < days {
                    width *= branching;
                    levels += 1;
                }
                TreeShape { branching, levels }
            })
            .min_by_key(|shape| (shape.branching - 1) * shape.levels * shape.levels)
            .unwrap_or(TreeShape {
                branching: 2,
                levels: 1,
            })
    }

    /// Leaves of the padded tree.
    pub fn leaves(self) -> usize {
        self.width(0)
    }

    /// Nodes at `level` (0: the leaves).
    fn width(self, level: usize) -> usize {
        self.branching.pow((self.levels - 1 - level) as u32)
    }

    /// Every node, leaves first, level by level.
    pub fn nodes(self) -> usize {
        (0..self.levels).map(|l| self.width(l)).sum()
    }

    /// Where each level starts in the node vector.
    fn offsets(self) -> Vec<usize> {
        let mut offsets = Vec::with_capacity(self.levels);
        let mut at = 0;
        for level in 0..self.levels {
            offsets.push(at);
            at += self.width(level);
        }
        offsets
    }

    /// The tree of `leaves` (padded with zeros): every node the sum of its leaves.
    pub fn build(self, leaves: &[i64]) -> Vec<i64> {
        let mut nodes = vec![0i64; self.nodes()];
        nodes[..leaves.len()].copy_from_slice(leaves);
        let offsets = self.offsets();
        for level in 1..self.levels {
            for i in 0..self.width(level) {
                let children = offsets[level - 1] + i * self.branching;
                nodes[offsets[level] + i] = nodes[children..children + self.branching]
                    .iter()
                    .fold(0i64, |a, b| a.saturating_add(*b));
            }
        }
        nodes
    }

    /// The least-squares consistent leaves of a noisy tree with equal noise at every node
    /// (Hay et al. 2010).
    pub fn consistent_leaves(self, noisy: &[f64]) -> Vec<f64> {
        let b = self.branching as f64;
        let offsets = self.offsets();
        // Bottom-up: each node's estimate from itself and its subtree.
        let mut z = noisy.to_vec();
        for level in 1..self.levels {
            let height = (level + 1) as i32; // leaves have height 1
            let (bh, bh1) = (b.powi(height), b.powi(height - 1));
            for i in 0..self.width(level) {
                let children = offsets[level - 1] + i * self.branching;
                let below: f64 = z[children..children + self.branching].iter().sum();
                let at = offsets[level] + i;
                z[at] = (bh - bh1) / (bh - 1.0) * noisy[at] + (bh1 - 1.0) / (bh - 1.0) * below;
            }
        }
        // Top-down: children share their parent's difference equally.
        let mut h = z.clone();
        for level in (1..self.levels).rev() {
            for i in 0..self.width(level) {
                let children = offsets[level - 1] + i * self.branching;
                let below: f64 = z[children..children + self.branching].iter().sum();
                let share = (h[offsets[level] + i] - below) / b;
                for child in children..children + self.branching {
                    h[child] = z[child] + share;
                }
            }
        }
        h.truncate(self.leaves());
        h
    }
}

/// A bound survival curve.
#[derive(Debug)]
struct Curve {
    /// The time columns, the first present one counts.
    times: Vec<Source>,
    event: Node,
    horizon: usize,
    shape: TreeShape,
    grouping: Grouping,
    labels: Vec<Vec<String>>,
}

impl Curve {
    fn cells(&self) -> usize {
        self.labels.len()
    }
}

/// The query's time columns, event and horizon.
fn survival_of(query: &Query) -> Option<(&[String], &renkei_protocol::Filter, usize)> {
    match &query.aggregate {
        Aggregate::KaplanMeier {
            time,
            event,
            horizon_days,
        } => Some((time, event, usize::from(*horizon_days))),
        Aggregate::CountPatients
        | Aggregate::CountRows
        | Aggregate::Sum { .. }
        | Aggregate::Mean { .. }
        | Aggregate::Quantile { .. }
        | Aggregate::LinearRegression { .. }
        | Aggregate::LogisticRegression { .. } => None,
    }
}

impl Statistic for KaplanMeier {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        let Some((time, event, horizon)) = survival_of(query) else {
            return Err(SchemaError::Unsupported("not a survival curve".into()));
        };
        if !binder.patient_view() {
            return Err(SchemaError::Unsupported(format!(
                "KAPLAN_MEIER needs one row per patient: ask it of `patients` or of a WITH \
                 table over `{}`",
                query.view
            )));
        }
        let mut times = Vec::with_capacity(time.len());
        for name in time {
            let (source, def) = binder.column(name)?;
            if !def.is_day() {
                return Err(SchemaError::Value(format!(
                    "`{name}` is {}; a survival time must be a day column",
                    def.kind
                )));
            }
            times.push(source);
        }
        let event = binder.filter(event)?;
        let grouping = binder.grouping(&query.group_by)?;
        let shape = TreeShape::for_days(horizon + 1);
        let cells = grouping.cells();
        let numbers = cells * 2 * shape.nodes();
        if numbers > MAX_SURVIVAL_NUMBERS {
            return Err(SchemaError::Unsupported(format!(
                "{cells} strata over {horizon} days release {numbers} numbers; at most \
                 {MAX_SURVIVAL_NUMBERS} may be (fewer strata or a shorter horizon)"
            )));
        }
        Ok(Box::new(Curve {
            times,
            event,
            horizon,
            shape,
            labels: grouping.labels(),
            grouping,
        }))
    }

    fn combine(&self, query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let Some((_, _, horizon)) = survival_of(query) else {
            return Combined::none("not a survival curve");
        };
        let Some(Release::Cells { labels, .. }) = sites.first().map(|s| s.release) else {
            return Combined::none("the nodes did not release survival trees");
        };
        let shape = TreeShape::for_days(horizon + 1);
        let nodes = shape.nodes();
        // The network's trees: every node's total over the sites, and its noise variance.
        let mut total = vec![vec![0f64; labels.len()]; 2 * nodes];
        let mut variance = 0.0;
        for site in sites {
            let Release::Cells { parts, .. } = site.release else {
                return Combined::none("a node released something else than survival trees");
            };
            if parts.len() != 2 * nodes || parts.iter().any(|p| p.len() != labels.len()) {
                return Combined::none("the nodes' survival trees do not have the query's shape");
            }
            for (sum, part) in total.iter_mut().zip(parts) {
                for (s, v) in sum.iter_mut().zip(part) {
                    *s += *v as f64;
                }
            }
            variance += site.noise_std.powi(2);
        }
        let min_cell = sites.iter().map(|s| s.min_cell_size).max().unwrap_or(0);
        let trees: Vec<(Vec<f64>, Vec<f64>)> = (0..labels.len())
            .map(|cell| {
                let events: Vec<f64> = (0..nodes).map(|n| total[n][cell]).collect();
                let censored: Vec<f64> = (0..nodes).map(|n| total[nodes + n][cell]).collect();
                (events, censored)
            })
            .collect();
        let estimate = estimate(shape, horizon, &trees, variance.sqrt(), min_cell);
        let strata = labels
            .iter()
            .zip(estimate.curves)
            .map(|(label, curve)| curve.report(label.clone(), min_cell))
            .collect();
        Combined {
            survival: Some(Survival {
                horizon_days: horizon,
                tree: shape,
                node_noise_std: variance.sqrt(),
                strata,
                log_rank: estimate.log_rank,
            }),
            ..Combined::default()
        }
    }

    fn pooled(&self, query: &Query, cohort: &PooledCohort) -> TrueValue {
        let horizon = survival_of(query).map_or(0, |(_, _, h)| h);
        let mut by_cell: BTreeMap<Vec<String>, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for patient in &cohort.patients {
            let Some(row) = patient.first() else {
                continue;
            };
            let (Some(time), Some(cell)) = (row.value, row.cell.clone()) else {
                continue;
            };
            let day = (time.max(0.0) as usize).min(horizon);
            let (events, censored) = by_cell
                .entry(cell)
                .or_insert_with(|| (vec![0.0; horizon + 1], vec![0.0; horizon + 1]));
            if row.event && time <= horizon as f64 {
                events[day] += 1.0;
            } else {
                censored[day] += 1.0;
            }
        }
        TrueValue::Curves(
            by_cell
                .into_iter()
                .map(|(cell, (events, censored))| (cell, product_limit(&events, &censored, 1.0).0))
                .collect(),
        )
    }
}

impl Accumulator for Curve {
    fn parts(&self) -> Vec<Part> {
        vec![Part {
            sensitivity: (self.shape.levels as f64).sqrt(),
            len: 2 * self.shape.nodes() * self.cells(),
            // Tree nodes are not cells: withholding small ones would bias every sum above
            // them. The minimum cell size applies to the numbers at risk reported.
            counts: false,
        }]
    }

    fn value_scale(&self) -> u8 {
        0
    }

    fn vector(&self) -> bool {
        true
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let cells = self.cells();
        let days = self.horizon + 1;
        let mut events = vec![vec![0i64; days]; cells];
        let mut censored = vec![vec![0i64; days]; cells];
        if let Some(patients) = cohort.patient_rows() {
            let cell = cohort.cells(&self.grouping);
            let times: Vec<_> = self.times.iter().map(|s| cohort.values(*s)).collect();
            let had_event = cohort.holds(&self.event);
            for row in patients.iter().filter(|&row| cell[row] != NO_CELL) {
                let Some(time) = times.iter().map(|t| t.get(row)).find(|v| *v != NULL) else {
                    continue;
                };
                let day = usize::try_from(time.max(0)).unwrap_or(0);
                let stratum = cell[row] as usize;
                if day <= self.horizon && had_event.contains(row) {
                    events[stratum][day] += 1;
                } else {
                    censored[stratum][day.min(self.horizon)] += 1;
                }
            }
        }
        // Part-major: tree node after tree node, one number per stratum.
        let nodes = self.shape.nodes();
        let mut out = vec![0i64; 2 * nodes * cells];
        for (stratum, (e, c)) in events.iter().zip(&censored).enumerate() {
            for (tree, leaves) in [e, c].into_iter().enumerate() {
                for (node, value) in self.shape.build(leaves).into_iter().enumerate() {
                    out[(tree * nodes + node) * cells + stratum] = value;
                }
            }
        }
        Exact(vec![out])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        let cells = self.cells().max(1);
        let values = noisy
            .into_iter()
            .next()
            .map_or_else(|| vec![0; 2 * self.shape.nodes() * cells], |p| p.values);
        Release::Cells {
            labels: self.labels.clone(),
            parts: values.chunks(cells).map(<[i64]>::to_vec).collect(),
            suppressed: vec![false; self.labels.len()],
        }
    }

    fn masked_shape(&self) -> MaskedShape {
        MaskedShape::Cells {
            labels: self.labels.clone(),
            parts: u32::try_from(2 * self.shape.nodes()).unwrap_or(u32::MAX),
        }
    }

    fn withholds_when_combined(&self) -> bool {
        true
    }
}

/// The network-wide survival result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Survival {
    pub horizon_days: usize,
    /// The tree the counts were released in.
    pub tree: TreeShape,
    /// Noise standard deviation of each released tree node, summed over the nodes.
    pub node_noise_std: f64,
    pub strata: Vec<SurvivalCurve>,
    /// Between the first two strata, when there are exactly two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_rank: Option<LogRank>,
}

/// One stratum's curve, day by day from 0 to the horizon.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SurvivalCurve {
    pub group: Vec<String>,
    pub day: Vec<usize>,
    /// S(t): the estimated probability of no event by the end of day t.
    pub survival: Vec<f64>,
    /// The 95% band: sampling (Greenwood) and noise variance.
    pub ci95_low: Vec<f64>,
    pub ci95_high: Vec<f64>,
    /// Estimated patients at risk at the start of day t; `null` below the minimum cell size.
    pub at_risk: Vec<Option<i64>>,
    /// Estimated events on day t.
    pub events: Vec<f64>,
    /// The first day with S ≤ ½, if reached by the horizon.
    pub median_day: Option<usize>,
    /// Its 95% interval: the first days the band's lower and upper ends reach ½ (`null`:
    /// not by the horizon).
    pub median_ci95: [Option<usize>; 2],
    /// Estimated patients in the stratum (rounded; `null` below the minimum cell size).
    pub patients: Option<i64>,
    /// The last day with enough at risk for its events to count; after it the curve is not
    /// estimated (it stays at its last value, and the band's lower end is 0: survival can
    /// only have fallen since).
    pub estimated_until: Option<usize>,
}

/// The log-rank test between two strata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogRank {
    /// Chi-square with one degree of freedom.
    pub statistic: f64,
    pub p_value: f64,
    /// Observed minus expected events in the first stratum.
    pub observed_minus_expected: f64,
    /// Its variance: hypergeometric, and the share from the noise (bootstrapped).
    pub variance: f64,
    pub noise_variance: f64,
}

/// One stratum's estimate before reporting.
#[derive(Debug, Clone)]
struct Estimated {
    survival: Vec<f64>,
    sd: Vec<f64>,
    at_risk: Vec<f64>,
    events: Vec<f64>,
    /// Days before this one had enough at risk to be estimated.
    estimated_days: usize,
}

impl Estimated {
    fn report(self, group: Vec<String>, min_cell: u64) -> SurvivalCurve {
        let low: Vec<f64> = self
            .survival
            .iter()
            .zip(&self.sd)
            .enumerate()
            .map(|(day, (s, sd))| {
                if day < self.estimated_days {
                    (s - Z_95 * sd).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let high: Vec<f64> = self
            .survival
            .iter()
            .zip(&self.sd)
            .map(|(s, sd)| (s + Z_95 * sd).clamp(0.0, 1.0))
            .collect();
        let first_half = |curve: &[f64]| curve.iter().position(|s| *s <= 0.5);
        SurvivalCurve {
            group,
            day: (0..self.survival.len()).collect(),
            median_day: first_half(&self.survival),
            median_ci95: [first_half(&low), first_half(&high)],
            ci95_low: low,
            ci95_high: high,
            patients: self
                .at_risk
                .first()
                .map(|n| n.round() as i64)
                .filter(|n| *n >= i64::try_from(min_cell).unwrap_or(i64::MAX)),
            at_risk: self
                .at_risk
                .iter()
                .map(|n| {
                    let n = n.round() as i64;
                    (n >= i64::try_from(min_cell).unwrap_or(i64::MAX)).then_some(n)
                })
                .collect(),
            events: self.events,
            survival: self.survival,
            estimated_until: self.estimated_days.checked_sub(1),
        }
    }
}

/// Every stratum's curve and the log-rank test, from the network's noisy trees.
struct Estimate {
    curves: Vec<Estimated>,
    log_rank: Option<LogRank>,
}

/// Per-day counts of one stratum, (events, censored) from day 0 to the horizon: the
/// consistent leaves' running totals fitted monotone (never falling, never below 0), then
/// differenced. Clamping each day's noisy count at 0 instead would add every day's positive
/// noise and none of its negative, pulling the curve down over a long horizon.
fn leaves(shape: TreeShape, horizon: usize, tree: &(Vec<f64>, Vec<f64>)) -> (Vec<f64>, Vec<f64>) {
    let monotone_days = |noisy: &[f64]| -> Vec<f64> {
        let mut leaves = shape.consistent_leaves(noisy);
        leaves.truncate(horizon + 1);
        let running: Vec<f64> = leaves
            .iter()
            .scan(0.0, |total, v| {
                *total += v;
                Some(*total)
            })
            .collect();
        let fitted: Vec<f64> = isotonic(&running).into_iter().map(|v| v.max(0.0)).collect();
        let mut before = 0.0;
        fitted
            .iter()
            .map(|total| {
                let day = total - before;
                before = *total;
                day
            })
            .collect()
    };
    (monotone_days(&tree.0), monotone_days(&tree.1))
}

/// The least-squares non-decreasing fit to `values` (pool adjacent violators).
fn isotonic(values: &[f64]) -> Vec<f64> {
    // Blocks of (mean, size), merged while a block's mean is below the one before it.
    let mut blocks: Vec<(f64, usize)> = Vec::with_capacity(values.len());
    for value in values {
        let mut block = (*value, 1usize);
        while let Some(&(mean, size)) = blocks.last() {
            if mean <= block.0 {
                break;
            }
            blocks.pop();
            let merged = size + block.1;
            block = (
                (mean * size as f64 + block.0 * block.1 as f64) / merged as f64,
                merged,
            );
        }
        blocks.push(block);
    }
    blocks
        .into_iter()
        .flat_map(|(mean, size)| std::iter::repeat_n(mean, size))
        .collect()
}

/// The product-limit curve over per-day counts (events clamped to the numbers at risk, so
/// it never rises): (S(t), at risk, events used). Days with fewer than `min_at_risk` at
/// risk take no step: where a handful remain, noise would pass for deaths, so the curve
/// stays at its last estimate, as a Kaplan–Meier curve does after its last observation.
fn product_limit(
    events: &[f64],
    censored: &[f64],
    min_at_risk: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let days = events.len();
    let mut at_risk = vec![0.0; days];
    let mut remaining = 0.0;
    for day in (0..days).rev() {
        remaining += events[day].max(0.0) + censored[day].max(0.0);
        at_risk[day] = remaining;
    }
    let mut survival = Vec::with_capacity(days);
    let mut used = Vec::with_capacity(days);
    let mut s = 1.0;
    for day in 0..days {
        let n = at_risk[day];
        let d = if n >= min_at_risk.max(1.0) {
            events[day].clamp(0.0, n)
        } else {
            0.0
        };
        if d > 0.0 {
            s *= 1.0 - d / n;
        }
        survival.push(s);
        used.push(d);
    }
    (survival, at_risk, used)
}

/// Greenwood's variance of S(t), day by day.
fn greenwood(survival: &[f64], at_risk: &[f64], events: &[f64]) -> Vec<f64> {
    let mut sum = 0.0;
    survival
        .iter()
        .zip(at_risk.iter().zip(events))
        .map(|(s, (n, d))| {
            if *n > *d && *n >= 1.0 {
                sum += d / (n * (n - d));
            }
            s * s * sum
        })
        .collect()
}

/// The log-rank observed-minus-expected and hypergeometric variance for two strata.
/// Only days on which both strata are still estimated (at least `min_at_risk` each) count:
/// past a stratum's tail its events are not read, and its expected ones must not be either.
fn log_rank_terms(a: (&[f64], &[f64]), b: (&[f64], &[f64]), min_at_risk: f64) -> (f64, f64) {
    let (mut o_minus_e, mut variance) = (0.0, 0.0);
    for day in 0..a.0.len().min(b.0.len()) {
        let (d1, n1) = (a.0[day], a.1[day]);
        let (d2, n2) = (b.0[day], b.1[day]);
        if n1 < min_at_risk || n2 < min_at_risk {
            break;
        }
        let (d, n) = (d1 + d2, n1 + n2);
        if n < 1.0 || d <= 0.0 {
            continue;
        }
        o_minus_e += d1 - d * n1 / n;
        if n > 1.0 {
            variance += n1 * n2 * d * (n - d) / (n * n * (n - 1.0));
        }
    }
    (o_minus_e, variance)
}

/// How many noise sds of a tree node the numbers at risk must exceed for a day's events to
/// count.
const TAIL_NOISE_SDS: f64 = 10.0;

fn estimate(
    shape: TreeShape,
    horizon: usize,
    trees: &[(Vec<f64>, Vec<f64>)],
    node_sd: f64,
    min_cell: u64,
) -> Estimate {
    let min_at_risk = (min_cell as f64).max(TAIL_NOISE_SDS * node_sd).max(1.0);
    let read = |trees: &[(Vec<f64>, Vec<f64>)]| -> Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        trees
            .iter()
            .map(|tree| {
                let (events, censored) = leaves(shape, horizon, tree);
                product_limit(&events, &censored, min_at_risk)
            })
            .collect()
    };
    let point = read(trees);
    // The noise's share of the variance: re-noise the released trees as the nodes did and
    // read them again. Seeded from the release itself, so one release gives one report.
    let seed = trees
        .iter()
        .flat_map(|(e, c)| e.iter().chain(c))
        .fold(0x5EED_u64, |h, v| {
            (h ^ v.to_bits()).wrapping_mul(0x0100_0000_01b3)
        });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let days = horizon + 1;
    let mut sum = vec![vec![0.0; days]; trees.len()];
    let mut sum_sq = vec![vec![0.0; days]; trees.len()];
    let (mut lr_sum, mut lr_sq) = (0.0, 0.0);
    let replicates = if node_sd > 0.0 { BOOTSTRAP } else { 0 };
    for _ in 0..replicates {
        let noisy: Vec<(Vec<f64>, Vec<f64>)> = trees
            .iter()
            .map(|(e, c)| {
                let mut jitter = |v: &Vec<f64>| -> Vec<f64> {
                    v.iter()
                        .map(|x| x + node_sd * standard_normal(&mut rng))
                        .collect()
                };
                (jitter(e), jitter(c))
            })
            .collect();
        let curves = read(&noisy);
        for (k, (s, _, _)) in curves.iter().enumerate() {
            for (day, value) in s.iter().enumerate() {
                sum[k][day] += value;
                sum_sq[k][day] += value * value;
            }
        }
        if let [a, b] = curves.as_slice() {
            let (ome, _) = log_rank_terms((&a.2, &a.1), (&b.2, &b.1), min_at_risk);
            lr_sum += ome;
            lr_sq += ome * ome;
        }
    }
    let spread = |sum: f64, sq: f64| {
        if replicates < 2 {
            return 0.0;
        }
        let r = replicates as f64;
        ((sq - sum * sum / r) / (r - 1.0)).max(0.0)
    };
    let curves = point
        .iter()
        .enumerate()
        .map(|(k, (survival, at_risk, events))| {
            let sampling = greenwood(survival, at_risk, events);
            Estimated {
                estimated_days: at_risk
                    .iter()
                    .position(|n| *n < min_at_risk)
                    .unwrap_or(at_risk.len()),
                sd: sampling
                    .iter()
                    .enumerate()
                    .map(|(day, v)| (v + spread(sum[k][day], sum_sq[k][day])).sqrt())
                    .collect(),
                survival: survival.clone(),
                at_risk: at_risk.clone(),
                events: events.clone(),
            }
        })
        .collect();
    let log_rank = match point.as_slice() {
        [a, b] => {
            let (o_minus_e, variance) = log_rank_terms((&a.2, &a.1), (&b.2, &b.1), min_at_risk);
            let noise_variance = spread(lr_sum, lr_sq);
            let total = variance + noise_variance;
            let statistic = if total > 0.0 {
                o_minus_e * o_minus_e / total
            } else {
                0.0
            };
            Some(LogRank {
                statistic,
                p_value: erfc((statistic / 2.0).sqrt()),
                observed_minus_expected: o_minus_e,
                variance,
                noise_variance,
            })
        }
        _ => None,
    };
    Estimate { curves, log_rank }
}

/// The complementary error function (W. J. Cody's rational Chebyshev form as in Numerical
/// Recipes' `erfcc`, relative error below 1.2e-7): the chi-square(1) tail is
/// `erfc(sqrt(x / 2))`.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn a_tree_sums_its_leaves_and_noiseless_consistency_returns_them() {
        for days in [1, 2, 5, 31, 91, 366] {
            let shape = TreeShape::for_days(days);
            assert!(shape.leaves() >= days && shape.leaves() < days * shape.branching + 1);
            let leaves: Vec<i64> = (0..days as i64).map(|d| (d * 7 + 3) % 11).collect();
            let tree = shape.build(&leaves);
            assert_eq!(tree.len(), shape.nodes());
            assert_eq!(*tree.last().unwrap(), leaves.iter().sum::<i64>());
            let noisy: Vec<f64> = tree.iter().map(|v| *v as f64).collect();
            let back = shape.consistent_leaves(&noisy);
            for (day, value) in back.iter().enumerate() {
                let truth = leaves.get(day).copied().unwrap_or(0) as f64;
                assert!((value - truth).abs() < 1e-9, "{days} days, day {day}");
            }
        }
    }

    /// Consistency is least squares: for the tree of 2 leaves with noisy root r and leaves
    /// a, b, the estimate of a is a + (r − a − b)/3.
    #[test]
    fn consistency_is_least_squares_on_a_small_tree() {
        let shape = TreeShape {
            branching: 2,
            levels: 2,
        };
        let back = shape.consistent_leaves(&[4.0, 7.0, 14.0]);
        let gap = (14.0 - 4.0 - 7.0) / 3.0;
        assert!((back[0] - (4.0 + gap)).abs() < 1e-12);
        assert!((back[1] - (7.0 + gap)).abs() < 1e-12);
    }

    /// Consistent leaves have a smaller error on suffix sums than summing noisy leaves.
    #[test]
    fn the_tree_beats_adding_noisy_days() {
        let days = 91;
        let shape = TreeShape::for_days(days);
        let leaves: Vec<i64> = (0..days as i64).map(|d| 50 - d / 2).collect();
        let tree = shape.build(&leaves);
        let sd = (shape.levels as f64).sqrt(); // the same privacy for both
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (mut tree_error, mut flat_error) = (0.0, 0.0);
        for _ in 0..200 {
            let noisy: Vec<f64> = tree
                .iter()
                .map(|v| *v as f64 + sd * standard_normal(&mut rng))
                .collect();
            let back = shape.consistent_leaves(&noisy);
            let truth: f64 = leaves.iter().sum::<i64>() as f64;
            tree_error += (back[..days].iter().sum::<f64>() - truth).powi(2);
            // One noisy count per day, at sensitivity 1 (sd 1 at the same rho).
            let flat: f64 = leaves
                .iter()
                .map(|v| *v as f64 + standard_normal(&mut rng))
                .sum();
            flat_error += (flat - truth).powi(2);
        }
        assert!(
            tree_error < flat_error / 3.0,
            "{tree_error} vs {flat_error}"
        );
    }

    /// The product-limit estimate of a textbook example: 6 patients, events on days 1, 3, 3
    /// and censoring on days 2, 4, 5 (S: 5/6, 5/6, 5/6·1/3·… ).
    #[test]
    fn product_limit_matches_the_hand_computation() {
        let events = [0.0, 1.0, 0.0, 2.0, 0.0, 0.0];
        let censored = [0.0, 0.0, 1.0, 0.0, 1.0, 1.0];
        let (s, at_risk, _) = product_limit(&events, &censored, 1.0);
        assert_eq!(at_risk, vec![6.0, 6.0, 5.0, 4.0, 2.0, 1.0]);
        let after_day_1 = 5.0 / 6.0;
        let after_day_3 = after_day_1 * (1.0 - 2.0 / 4.0);
        let expected = [
            1.0,
            after_day_1,
            after_day_1,
            after_day_3,
            after_day_3,
            after_day_3,
        ];
        for (a, b) in s.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn the_monotone_fit_pools_violators_and_keeps_order() {
        assert_eq!(isotonic(&[1.0, 3.0, 2.0, 4.0]), vec![1.0, 2.5, 2.5, 4.0]);
        assert_eq!(isotonic(&[3.0, 2.0, 1.0]), vec![2.0, 2.0, 2.0]);
        assert_eq!(isotonic(&[0.0, 1.0, 1.0, 5.0]), vec![0.0, 1.0, 1.0, 5.0]);
        // Noisy running totals become daily counts that are never negative.
        let shape = TreeShape::for_days(5);
        let mut noisy: Vec<f64> = shape
            .build(&[3, 0, 0, 2, 1])
            .into_iter()
            .map(|v| v as f64)
            .collect();
        noisy[1] -= 1.5; // a negative day after noise
        let (events, _) = leaves(shape, 4, &(noisy.clone(), noisy));
        assert!(events.iter().all(|d| *d >= 0.0), "{events:?}");
        assert!((events.iter().sum::<f64>() - 6.0).abs() < 1.0);
    }

    /// The 95% band covers the true survival 93–97% of the time over repeated cohorts and
    /// noise: patients' times are exponential (S(t) = exp(−λ(t + 1)) by the end of day t),
    /// censored uniformly, released with noise sd 3 per tree node.
    #[test]
    fn the_band_covers_the_truth_95_times_in_100() {
        let (horizon, patients, rate, sd) = (40usize, 1_500, 0.01f64, 3.0f64);
        let shape = TreeShape::for_days(horizon + 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let days = [10usize, 25, 40];
        let mut covered = [0usize; 3];
        let reps = 1_000;
        for _ in 0..reps {
            let mut events = vec![0i64; horizon + 1];
            let mut censored = vec![0i64; horizon + 1];
            for _ in 0..patients {
                let u: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
                let death = (-u.ln() / rate).floor() as usize;
                let end = rng.gen_range(0..60usize);
                if death <= end && death <= horizon {
                    events[death] += 1;
                } else {
                    censored[end.min(death).min(horizon)] += 1;
                }
            }
            let mut noisy = |leaves: &[i64]| -> Vec<f64> {
                shape
                    .build(leaves)
                    .into_iter()
                    .map(|v| v as f64 + sd * standard_normal(&mut rng))
                    .collect()
            };
            let trees = vec![(noisy(&events), noisy(&censored))];
            let estimate = estimate(shape, horizon, &trees, sd, 0);
            let curve = estimate.curves[0].clone().report(Vec::new(), 0);
            for (k, day) in days.iter().enumerate() {
                let truth = (-rate * (*day as f64 + 1.0)).exp();
                covered[k] +=
                    usize::from(curve.ci95_low[*day] <= truth && truth <= curve.ci95_high[*day]);
            }
        }
        for (k, day) in days.iter().enumerate() {
            let rate = covered[k] as f64 / reps as f64;
            assert!((0.93..=0.97).contains(&rate), "day {day}: covered {rate}");
        }
    }

    #[test]
    fn the_chi_square_tail_is_right() {
        // P(chi2_1 > 3.841459) = 0.05.
        assert!((erfc((3.841_459f64 / 2.0).sqrt()) - 0.05).abs() < 1e-6);
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
    }
}
