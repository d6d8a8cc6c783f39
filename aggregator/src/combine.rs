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
use renkei_protocol::messages::sum_masked;
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
