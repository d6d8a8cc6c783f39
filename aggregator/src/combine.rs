//! Combining the nodes' noisy releases into one network-wide estimate with its 95% interval.
//!
//! Every node draws its noise independently, so values add and variances add; how a
//! statistic's releases combine (counts and sums, a mean's ratio, a quantile's histogram,
//! GROUP BY cells) is that statistic's own, in `renkei-engine`'s `statistic/` files. This
//! module turns verified answers into what those read, and reads a **secure total**: the
//! nodes' masked words are summed (the masks cancel only when every node asked contributed,
//! or once the survivors of a recoverable round have removed theirs, else the round is
//! aborted) and the sum is read as one release whose noise variance is the sum of the
//! shares' variances.
//!
//! Sums, means and quantiles are in the column's unit (fixed point undone).

use renkei_engine::release::{masked_words, release_from_total};
use renkei_engine::{Combined, SiteRelease};
use renkei_protocol::masks::sum_masked;
use renkei_protocol::{Query, Release};

use crate::results::{FederatedAnswer, NodeAnswer};

pub use renkei_engine::release::same_shape;
pub use renkei_engine::{Estimate, GroupEstimate, Z_95};

/// What a statistic's final side reads of a verified answer.
fn site(answer: &NodeAnswer) -> SiteRelease<'_> {
    SiteRelease {
        release: &answer.release,
        value_scale: answer.value_scale,
        min_cell_size: answer.min_cell_size,
        noise_std: answer.noise_std,
        count_noise_std: answer.count_noise_std,
    }
}

/// Combines the per-site answers to `query`; `None` when no node answered.
pub fn combine(query: &Query, answers: &[NodeAnswer]) -> Option<Combined> {
    if answers
        .iter()
        .any(|a| matches!(a.release, Release::Masked { .. }))
    {
        return Some(Combined::none(
            "masked contributions can only be read as a secure total",
        ));
    }
    let sites: Vec<SiteRelease<'_>> = answers.iter().map(site).collect();
    renkei_engine::statistic::combine(query, &sites)
}

/// A secure round's total. In a round without dropouts, only when every node asked
/// contributed (a missing node's masks cannot be removed) are the masked words summed. In a
/// round asked with dropouts, `recovery` is the outcome of its unmasking step: the words to
/// subtract (the survivors' own masks and their masks with the dropped nodes), or why it
/// failed. The sum is read like one node's release whose noise has the shares' combined
/// variance, and a count below the minimum cell size is withheld from the total. Otherwise
/// the round is aborted with the reason and nothing is read.
pub fn secure_total(
    query: &Query,
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
    let expected = masked_words(shape).unwrap_or(words.len().max(1));
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
    let network = NodeAnswer {
        release: release_from_total(shape, total, min_cell),
        min_cell_size: min_cell,
        noise_std: variance.sqrt(),
        count_noise_std: first.count_noise_std.map(|_| count_variance.sqrt()),
        ..first.clone()
    };
    combine(query, &[network])
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{Aggregate, Filter, MaskedShape, Mechanism, MicroRho};

    use super::*;
    use crate::results::{AnswerMode, MissingNode};

    fn node(release: Release, noise_std: f64, count_noise_std: Option<f64>) -> NodeAnswer {
        NodeAnswer {
            node: "n".into(),
            institution: "Hospital".into(),
            value: None,
            suppressed: false,
            min_cell_size: 0,
            release,
            value_scale: 0,
            mechanism: Mechanism::DiscreteGaussian,
            sensitivity: 1.0,
            noise_scale: noise_std,
            noise_std,
            count_noise_std,
            ci95: None,
            rho: MicroRho(1),
            epsilon: 1.0,
            delta: 0.0,
            budget_remaining: MicroRho(0),
        }
    }

    fn round(answered: Vec<NodeAnswer>, missing: Vec<MissingNode>) -> FederatedAnswer {
        FederatedAnswer {
            query: String::new(),
            study: String::new(),
            request_id: String::new(),
            mode: AnswerMode::Secure,
            aggregate: "mean".into(),
            estimate: None,
            std_dev: None,
            ci95: None,
            groups: Vec::new(),
            survival: None,
            regression: None,
            fit: None,
            note: None,
            aborted: false,
            recovered_without: Vec::new(),
            answered,
            missing,
            refused: Vec::new(),
            dry_run: false,
            quotes: Vec::new(),
        }
    }

    /// Two nodes' cells (sums then counts) under masks that cancel in the sum.
    fn masked_cells(values: [[i64; 4]; 2], mask: u64) -> Vec<NodeAnswer> {
        let shape = MaskedShape::Cells {
            labels: vec![vec!["a".into()], vec!["b".into()]],
            parts: 2,
        };
        values
            .iter()
            .zip([mask, mask.wrapping_neg()])
            .map(|(values, mask)| {
                let words = values
                    .iter()
                    .map(|v| (*v as u64).wrapping_add(mask))
                    .collect();
                node(
                    Release::Masked {
                        shape: shape.clone(),
                        words,
                    },
                    2.0,
                    Some(1.0),
                )
            })
            .collect()
    }

    fn mean_by_group() -> Query {
        Query {
            aggregate: Aggregate::Mean {
                column: "age".into(),
            },
            group_by: vec!["g".into()],
            ..Query::count_patients("patients", Filter::True)
        }
    }

    #[test]
    fn a_secure_total_of_cells_is_read_once_the_masks_cancel() {
        let answered = masked_cells([[300, 80, 10, 4], [100, 40, 10, 4]], 0xdead_beef_1234);
        let combined = secure_total(&mean_by_group(), &round(answered, Vec::new()), None).unwrap();
        assert!(!combined.aborted, "{combined:?}");
        assert_eq!(combined.groups.len(), 2);
        assert_eq!(combined.groups[0].estimate, Estimate::Real(20.0));
        assert_eq!(combined.groups[1].estimate, Estimate::Real(15.0));
        // The shares' variances add: sums sd sqrt(8), counts sd sqrt(2), over a count of 20.
        let sd = (8.0f64 + 400.0 * 2.0).sqrt() / 20.0;
        assert!((combined.groups[0].std_dev - sd).abs() < 1e-12);
    }

    #[test]
    fn a_missing_contribution_aborts_a_round_without_recovery() {
        let mut answered = masked_cells([[300, 80, 10, 4], [100, 40, 10, 4]], 99);
        answered.pop();
        let missing = vec![MissingNode {
            node: "down".into(),
            address: String::new(),
            reason: "unreachable".into(),
        }];
        let combined = secure_total(&mean_by_group(), &round(answered, missing), None).unwrap();
        assert!(combined.aborted);
        assert!(combined.groups.is_empty());
        assert!(combined.note.unwrap().contains("down did not contribute"));
    }

    #[test]
    fn masked_words_are_never_read_per_site() {
        let answered = masked_cells([[1, 2, 3, 4], [5, 6, 7, 8]], 5);
        let combined = combine(&mean_by_group(), &answered).unwrap();
        assert!(combined.groups.is_empty());
        assert!(combined.note.unwrap().contains("secure total"));
    }
}
