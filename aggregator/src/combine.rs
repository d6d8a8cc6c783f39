//! Combining the nodes' noisy releases into one network-wide estimate with its 95% interval.
//!
//! Every node draws its noise independently, so values add and variances add:
//!
//! - **counts and sums**: the estimate is the sum of the nodes' values; the interval is
//!   `estimate ± 1.96·sd` (normal approximation to a sum of discrete noises). A node whose
//!   count fell below the minimum cell size `k` reported only that: it adds the middle of
//!   `[0, k-1]` to the estimate and that whole range to the interval.
//! - **means**: the sum of the nodes' noisy sums over the sum of their noisy counts; its sd by
//!   the delta method, `sqrt(var_S + mean²·var_C) / C`.
//! - **quantiles**: the nodes' noisy histograms are added bin by bin (negative counts read as
//!   zero) and the quantile interpolated within its bin; the interval comes from redrawing the
//!   noise around the combined histogram (it reflects the privacy noise, not sampling).
//! - **groups**: each cell is combined like a count.
//! - **secure totals**: the nodes' masked words are summed (the masks cancel only when every
//!   node asked contributed, else the round is aborted) and the sum is read as one release
//!   whose noise variance is the sum of the shares' variances.
//!
//! Sums, means and quantiles are in the column's unit (fixed point undone).

use rand::{Rng, SeedableRng};
use renkei_protocol::messages::sum_masked;
use renkei_protocol::{Aggregate, MaskedShape, Release};
use serde::Serialize;

use crate::federation::{FederatedAnswer, NodeAnswer};

/// z for a two-sided 95% normal interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// Redraws used for a quantile's interval.
const QUANTILE_REDRAWS: usize = 400;

/// A number in a report: counts stay integers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Estimate {
    Integer(i64),
    Real(f64),
}

impl Estimate {
    pub fn as_f64(self) -> f64 {
        match self {
            Estimate::Integer(n) => n as f64,
            Estimate::Real(x) => x,
        }
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Estimate::Integer(n) => write!(f, "{n}"),
            Estimate::Real(x) => write!(f, "{x:.3}"),
        }
    }
}

/// One cell of a GROUP BY.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupEstimate {
    pub group: Vec<String>,
    pub estimate: Estimate,
    pub std_dev: f64,
    pub ci95: [f64; 2],
    /// Nodes that withheld this cell (their count was below the minimum cell size).
    pub withheld_by: usize,
}

/// The network-wide result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Combined {
    pub estimate: Option<Estimate>,
    pub std_dev: Option<f64>,
    pub ci95: Option<[f64; 2]>,
    pub groups: Vec<GroupEstimate>,
    /// Why no estimate could be made, if so.
    pub note: Option<String>,
    /// A secure round that could not be read (nothing was revealed).
    pub aborted: bool,
}

fn unscale(value: f64, scale: u8) -> f64 {
    value / 10f64.powi(i32::from(scale))
}

/// Counts (or sums) from several nodes: (estimate, sd, interval), with withheld cells.
fn add_counts(parts: &[(i64, bool, f64, u64)], scale: u8) -> (f64, f64, [f64; 2]) {
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

/// Combines the answers to `aggregate`; `None` when no node answered.
pub fn combine(aggregate: &Aggregate, answers: &[NodeAnswer]) -> Option<Combined> {
    let first = answers.first()?;
    let scale = first.value_scale;
    match &first.release {
        Release::Scalar { .. } => {
            let parts: Vec<(i64, bool, f64, u64)> = answers
                .iter()
                .filter_map(|a| match a.release {
                    Release::Scalar { value, suppressed } => {
                        Some((value, suppressed, a.noise_std, a.min_cell_size))
                    }
                    _ => None,
                })
                .collect();
            let (estimate, sd, ci95) = add_counts(&parts, scale);
            let estimate = if scale == 0
                && matches!(aggregate, Aggregate::CountPatients | Aggregate::CountRows)
            {
                Estimate::Integer(estimate.round() as i64)
            } else {
                Estimate::Real(estimate)
            };
            Some(Combined {
                estimate: Some(estimate),
                std_dev: Some(sd),
                ci95: Some(ci95),
                ..Combined::default()
            })
        }
        Release::SumAndCount { .. } => {
            let (mut sum, mut count, mut var_sum, mut var_count) = (0.0, 0.0, 0.0, 0.0);
            for answer in answers {
                if let Release::SumAndCount { sum: s, count: c } = answer.release {
                    sum += s as f64;
                    count += c as f64;
                    var_sum += answer.noise_std.powi(2);
                    var_count += answer.count_noise_std.unwrap_or(0.0).powi(2);
                }
            }
            if count < 1.0 {
                return Some(Combined {
                    note: Some(
                        "too few values to estimate a mean (the noisy count is below 1)".into(),
                    ),
                    ..Combined::default()
                });
            }
            let mean = sum / count;
            let sd = (var_sum + mean * mean * var_count).sqrt() / count;
            let (mean, sd) = (unscale(mean, scale), unscale(sd, scale));
            Some(Combined {
                estimate: Some(Estimate::Real(mean)),
                std_dev: Some(sd),
                ci95: Some([mean - Z_95 * sd, mean + Z_95 * sd]),
                ..Combined::default()
            })
        }
        Release::Histogram { low, width, counts } => {
            let p = match aggregate {
                Aggregate::Quantile { per_mille, .. } => f64::from(*per_mille) / 1000.0,
                _ => 0.5,
            };
            let mut total = vec![0.0f64; counts.len()];
            let mut variance = 0.0;
            for answer in answers {
                if let Release::Histogram { counts, .. } = &answer.release {
                    for (t, c) in total.iter_mut().zip(counts) {
                        *t += *c as f64;
                    }
                    variance += answer.noise_std.powi(2);
                }
            }
            let quantile = |bins: &[f64]| -> Option<f64> {
                let clipped: Vec<f64> = bins.iter().map(|c| c.max(0.0)).collect();
                let mass: f64 = clipped.iter().sum();
                if mass < 1.0 {
                    return None;
                }
                let target = p * mass;
                let mut below = 0.0;
                for (i, c) in clipped.iter().enumerate() {
                    if below + c >= target && *c > 0.0 {
                        let within = (target - below) / c;
                        return Some(*low as f64 + (i as f64 + within) * *width as f64);
                    }
                    below += c;
                }
                Some(*low as f64 + clipped.len() as f64 * *width as f64)
            };
            let Some(point) = quantile(&total) else {
                return Some(Combined {
                    note: Some("too few values to estimate a quantile".into()),
                    ..Combined::default()
                });
            };
            // The noise is redrawn around the combined histogram with a fixed seed, so the
            // same answers always give the same interval.
            let sd = variance.sqrt();
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x0051_7a61);
            let mut draws: Vec<f64> = (0..QUANTILE_REDRAWS)
                .filter_map(|_| {
                    let redrawn: Vec<f64> = total
                        .iter()
                        .map(|c| c + sd * standard_normal(&mut rng))
                        .collect();
                    quantile(&redrawn)
                })
                .collect();
            draws.sort_by(f64::total_cmp);
            let at = |q: f64| {
                draws
                    .get(((draws.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
            };
            let (lo, hi) = (at(0.025).unwrap_or(point), at(0.975).unwrap_or(point));
            let spread = {
                let mean = draws.iter().sum::<f64>() / draws.len().max(1) as f64;
                (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len().max(1) as f64)
                    .sqrt()
            };
            Some(Combined {
                estimate: Some(Estimate::Real(unscale(point, scale))),
                std_dev: Some(unscale(spread, scale)),
                ci95: Some([unscale(lo.min(point), scale), unscale(hi.max(point), scale)]),
                ..Combined::default()
            })
        }
        Release::Masked { .. } => Some(Combined {
            note: Some("masked contributions can only be read as a secure total".into()),
            ..Combined::default()
        }),
        Release::Groups { labels, .. } => {
            let groups = labels
                .iter()
                .enumerate()
                .map(|(cell, label)| {
                    let parts: Vec<(i64, bool, f64, u64)> = answers
                        .iter()
                        .filter_map(|a| match &a.release {
                            Release::Groups {
                                counts, suppressed, ..
                            } => Some((
                                *counts.get(cell)?,
                                *suppressed.get(cell)?,
                                a.noise_std,
                                a.min_cell_size,
                            )),
                            _ => None,
                        })
                        .collect();
                    let (estimate, std_dev, ci95) = add_counts(&parts, 0);
                    GroupEstimate {
                        group: label.clone(),
                        estimate: Estimate::Integer(estimate.round() as i64),
                        std_dev,
                        ci95,
                        withheld_by: parts.iter().filter(|p| p.1).count(),
                    }
                })
                .collect();
            Some(Combined {
                groups,
                ..Combined::default()
            })
        }
    }
}

/// A secure round's total. In a round without dropouts, only when every node asked
/// contributed (a missing node's masks cannot be removed) are the masked words summed. In a
/// round asked with dropouts, `recovery` is the outcome of its unmasking step: the words to
/// subtract (the survivors' own masks and their masks with the dropped nodes), or why it
/// failed. The sum is read like one node's release whose noise has the shares' combined
/// variance, and a count below the minimum cell size is withheld from the total. Otherwise
/// the round is aborted with the reason and nothing is read.
pub fn secure_total(
    aggregate: &Aggregate,
    result: &FederatedAnswer,
    recovery: Option<Result<Vec<u64>, String>>,
) -> Option<Combined> {
    let abort = |why: String| {
        Some(Combined {
            note: Some(format!(
                "secure round aborted: {why}. Nothing was revealed (the masks of the nodes that answered cannot be removed without the others) and the charges they made stand; ask again without the missing node(s)"
            )),
            aborted: true,
            ..Combined::default()
        })
    };
    let correction = match recovery {
        Some(Ok(correction)) => Some(correction),
        Some(Err(why)) => {
            return Some(Combined {
                note: Some(format!(
                    "secure round aborted: {why}. The total cannot be read: the masks of the nodes that did not finish the unmasking stay in it; the charges made stand"
                )),
                aborted: true,
                ..Combined::default()
            });
        }
        None => None,
    };
    let absent: Vec<String> = result
        .missing
        .iter()
        .map(|m| format!("{} did not contribute ({})", m.node, m.reason))
        .chain(
            result
                .refused
                .iter()
                .map(|r| format!("{} ({}) refused: {}", r.institution, r.node, r.code)),
        )
        .collect();
    if !absent.is_empty() && correction.is_none() {
        return abort(absent.join("; "));
    }
    let first = result.answered.first()?;
    let Release::Masked { shape, words } = &first.release else {
        return abort(format!("{} did not send a masked contribution", first.node));
    };
    let expected = match shape {
        MaskedShape::Scalar => 1,
        MaskedShape::SumAndCount => 2,
        MaskedShape::Histogram { .. } => words.len().max(1),
        MaskedShape::Groups { labels } => labels.len(),
    };
    let mut contributions = Vec::with_capacity(result.answered.len());
    let (mut variance, mut count_variance) = (0.0, 0.0);
    for answer in &result.answered {
        match &answer.release {
            Release::Masked { shape: s, words } if s == shape && words.len() == expected => {
                contributions.push(words.as_slice());
                variance += answer.noise_std.powi(2);
                count_variance += answer.count_noise_std.unwrap_or(0.0).powi(2);
            }
            _ => {
                return abort(format!(
                    "{}'s contribution does not match the others' (different schema?)",
                    answer.node
                ));
            }
        }
    }
    // Subtracting the unmasked words is adding their two's complement.
    let undo: Vec<u64> = correction
        .iter()
        .flatten()
        .map(|word| word.wrapping_neg())
        .collect();
    if correction.is_some() {
        contributions.push(undo.as_slice());
    }
    let total = sum_masked(&contributions);
    let min_cell = result
        .answered
        .iter()
        .map(|a| a.min_cell_size)
        .max()
        .unwrap_or(0);
    let withhold = |n: i64| min_cell > 0 && n < i64::try_from(min_cell).unwrap_or(i64::MAX);
    let at = |k: usize| total.get(k).copied().unwrap_or(0);
    let release = match shape {
        MaskedShape::Scalar => {
            let suppressed = withhold(at(0));
            Release::Scalar {
                value: if suppressed { 0 } else { at(0) },
                suppressed,
            }
        }
        MaskedShape::SumAndCount => Release::SumAndCount {
            sum: at(0),
            count: at(1),
        },
        MaskedShape::Histogram { low, width } => Release::Histogram {
            low: *low,
            width: *width,
            counts: total,
        },
        MaskedShape::Groups { labels } => {
            let suppressed: Vec<bool> = total.iter().map(|n| withhold(*n)).collect();
            Release::Groups {
                labels: labels.clone(),
                counts: total
                    .iter()
                    .zip(&suppressed)
                    .map(|(n, s)| if *s { 0 } else { *n })
                    .collect(),
                suppressed,
            }
        }
    };
    let network = NodeAnswer {
        release,
        min_cell_size: min_cell,
        noise_std: variance.sqrt(),
        count_noise_std: first.count_noise_std.map(|_| count_variance.sqrt()),
        ..first.clone()
    };
    combine(aggregate, &[network])
}

/// A standard normal draw (Box–Muller), for the quantile's interval only.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Whether a node's release has the same shape as the first one's (same kind, bins, cells).
pub fn same_shape(a: &Release, b: &Release) -> bool {
    match (a, b) {
        (Release::Scalar { .. }, Release::Scalar { .. }) => true,
        (Release::SumAndCount { .. }, Release::SumAndCount { .. }) => true,
        (
            Release::Histogram {
                low: l1,
                width: w1,
                counts: c1,
            },
            Release::Histogram {
                low: l2,
                width: w2,
                counts: c2,
            },
        ) => l1 == l2 && w1 == w2 && c1.len() == c2.len(),
        (Release::Groups { labels: a, .. }, Release::Groups { labels: b, .. }) => a == b,
        (
            Release::Masked {
                shape: s1,
                words: w1,
            },
            Release::Masked {
                shape: s2,
                words: w2,
            },
        ) => s1 == s2 && w1.len() == w2.len(),
        _ => false,
    }
}
