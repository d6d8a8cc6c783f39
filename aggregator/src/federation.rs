//! Fan-out and combination: sign one request, ask every node concurrently, check every
//! answer, and combine what came back into one estimate with its uncertainty.
//!
//! An answer counts only if its signature verifies, its signer is the node we asked, that
//! node is a member in the policy, and it answers exactly our signed request (request id
//! and digest). Estimates add; since nodes draw independent noise, variances add too, and
//! the 95% interval is `estimate ± 1.96·sd` (normal approximation to the sum of discrete
//! noises; a withheld small cell widens it, see [`combine`]). A node that is down, slow or sends something
//! invalid is reported as missing with the reason; a refusal is reported with its code.
//! Nothing here waits longer than the caller's deadline (each unmasking step below gets its
//! own, cut short by the round's expiry).
//!
//! A secure round asked with `dropouts > 0` takes two more steps ([`crate::unmask`]): the
//! researcher names the nodes whose contributions arrived, each of them commits to that set
//! and reveals its pairwise masks with the nodes that did not; shown all the commitments,
//! each reveals its own mask, and the survivors' total is read.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use renkei_policies::VerifiedPolicy;
use renkei_protocol::limits::MAX_RESPONSE_BYTES;
use renkei_protocol::query::fit_step_budgets;
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    Aggregate, Answer, MicroRho, PrivacyRequest, PublicKey, Purpose, QueryRequest, QueryResponse,
    Release, RequestId, SecretKey, SignedEnvelope,
};

use crate::client::{NetworkClient, ask_until};
use crate::combine::{combine, same_shape, secure_total};
use crate::error::AggregatorError;
use crate::unmask::unmask_round;

pub use crate::client::NodeAddress;
pub use crate::request::{PreparedQuery, QueryOptions};
pub use crate::results::{
    AnswerMode, FederatedAnswer, FitSteps, MissingNode, NodeAnswer, NodeQuote, Progress,
    RefusedNode, Z_95, node_answer,
};

enum Outcome {
    Answered(NodeAnswer),
    Quoted(NodeQuote),
    Missing(MissingNode),
    Refused(RefusedNode),
}

impl Outcome {
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Answered(_) => "answered",
            Outcome::Quoted(_) => "quoted",
            Outcome::Missing(_) => "missing",
            Outcome::Refused(_) => "refused",
        }
    }
}

/// Asks every node in `nodes` concurrently and combines the answers; `researcher` (who
/// signed `prepared`) signs the unmasking of a secure round asked with dropouts.
pub async fn fan_out(
    client: &NetworkClient,
    policy: &VerifiedPolicy,
    nodes: &[NodeAddress],
    prepared: &PreparedQuery,
    researcher: &SecretKey,
    deadline: Duration,
) -> Result<FederatedAnswer, AggregatorError> {
    fan_out_with_progress(
        client,
        policy,
        nodes,
        prepared,
        researcher,
        deadline,
        &|_| {},
    )
    .await
}

/// As [`fan_out`], telling `progress` as each node finishes. A logistic fit's first step
/// is followed by its later steps ([`fit`]).
pub async fn fan_out_with_progress(
    client: &NetworkClient,
    policy: &VerifiedPolicy,
    nodes: &[NodeAddress],
    prepared: &PreparedQuery,
    researcher: &SecretKey,
    deadline: Duration,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<FederatedAnswer, AggregatorError> {
    let first = ask_once(
        client, policy, nodes, prepared, researcher, deadline, progress,
    )
    .await?;
    match &prepared.request.query.aggregate {
        // Only a fit's first step opens it; a later step asked alone is answered alone.
        Aggregate::LogisticRegression { step, .. }
            if !prepared.request.dry_run && step.fit.is_none() =>
        {
            fit(
                client, policy, nodes, prepared, researcher, deadline, progress, first,
            )
            .await
        }
        Aggregate::CountPatients
        | Aggregate::CountRows
        | Aggregate::Sum { .. }
        | Aggregate::Mean { .. }
        | Aggregate::Quantile { .. }
        | Aggregate::KaplanMeier { .. }
        | Aggregate::LinearRegression { .. }
        | Aggregate::LogisticRegression { .. } => Ok(first),
    }
}

/// A logistic fit by Newton's method over the network, after its first step (`first`,
/// answered for `opening`): each later step is a request signed anew by `researcher`,
/// naming the fit it belongs to and the coefficients the last step's combination gave, and
/// asked of the same nodes; nodes charge nothing more for it. Every node that answered the
/// first step must answer every step (the fit is over one set of patients); otherwise the
/// fit stops with a note, and what was charged stays charged. The answer is the last
/// step's, with the steps' requests and the budget's split.
#[allow(clippy::too_many_arguments)]
async fn fit(
    client: &NetworkClient,
    policy: &VerifiedPolicy,
    nodes: &[NodeAddress],
    opening: &PreparedQuery,
    researcher: &SecretKey,
    deadline: Duration,
    progress: &(dyn Fn(Progress) + Sync),
    first: FederatedAnswer,
) -> Result<FederatedAnswer, AggregatorError> {
    let Aggregate::LogisticRegression { iterations, .. } = &opening.request.query.aggregate else {
        return Ok(first);
    };
    let iterations = *iterations;
    let rho = match opening.request.privacy {
        PrivacyRequest::Zcdp { rho } => rho,
        PrivacyRequest::PureDp { .. } => MicroRho(0),
    };
    let steps = FitSteps {
        requests: vec![opening.request.request_id.to_string()],
        rho_per_step: fit_step_budgets(rho.0, iterations)
            .into_iter()
            .map(|budget| MicroRho(budget).as_rho())
            .collect(),
        rho_charged: first
            .answered
            .iter()
            .map(|a| (a.institution.clone(), a.rho.as_rho()))
            .collect(),
    };
    let contributors = |answer: &FederatedAnswer| -> Vec<String> {
        let mut names: Vec<String> = answer.answered.iter().map(|a| a.node.clone()).collect();
        names.sort();
        names
    };
    let asked = contributors(&first);
    let mut query = opening.request.query.clone();
    let mut current = first;
    current.fit = Some(steps);
    for iteration in 1..iterations {
        let Some(coefficients) = current
            .regression
            .as_ref()
            .and_then(|r| r.next_step.clone())
        else {
            // No estimate (a refusal, a failed node, a matrix that is not positive
            // definite): the fit stops here, its note saying why.
            return Ok(current);
        };
        if current.aborted || current.is_partial() {
            return Ok(stopped(current, iteration, "not every node answered it"));
        }
        query.advance_fit(opening.request.request_id, coefficients);
        let request = QueryRequest {
            request_id: RequestId::random()?,
            nonce: RequestId::random()?.0,
            issued_at: renkei_protocol::unix_now(),
            query: query.clone(),
            ..opening.request.clone()
        };
        let prepared = PreparedQuery::from_request(researcher, request)?;
        let next = ask_once(
            client, policy, nodes, &prepared, researcher, deadline, progress,
        )
        .await?;
        let fit_steps = current.fit.take().map(|mut steps| {
            steps.requests.push(prepared.request.request_id.to_string());
            steps
        });
        current = next;
        current.fit = fit_steps;
        if contributors(&current) != asked && current.regression.is_some() {
            return Ok(stopped(
                current,
                iteration + 1,
                "other nodes answered it than the fit's first step",
            ));
        }
    }
    Ok(current)
}

/// A fit that stopped before its last step: no estimate, and a note saying where and why.
fn stopped(mut answer: FederatedAnswer, step: u8, why: &str) -> FederatedAnswer {
    answer.regression = None;
    answer.note = Some(format!(
        "the fit stopped at step {step}: {why}; nothing is estimated, and what the nodes charged for the fit stays charged"
    ));
    answer
}

/// One signed request asked of every node, its answers checked and combined.
async fn ask_once(
    client: &NetworkClient,
    policy: &VerifiedPolicy,
    nodes: &[NodeAddress],
    prepared: &PreparedQuery,
    researcher: &SecretKey,
    deadline: Duration,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<FederatedAnswer, AggregatorError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = nodes.iter().find(|n| !seen.insert(n.peer_id)) {
        // One signed request is answered once per node; a second ask would be a replay.
        return Err(AggregatorError::BadNodeAddress {
            address: twice.address.to_string(),
            reason: format!("node {} is listed more than once", twice.peer_id),
        });
    }
    if prepared.request.secure {
        // The masks cancel only over the request's whole audience: ask exactly it.
        let asked = nodes
            .iter()
            .map(|n| PublicKey::from_peer_id(&n.peer_id))
            .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
        let audience: std::collections::BTreeSet<_> =
            prepared.request.audience.iter().copied().collect();
        if asked != audience {
            return Err(AggregatorError::BadNodeAddress {
                address: nodes
                    .iter()
                    .map(|n| n.address.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                reason: "a secure round must ask exactly the nodes its request names".into(),
            });
        }
    }
    let encoded = EncodedRequest::encode(&prepared.envelope)?;
    let asks = nodes.iter().enumerate().map(|(index, node)| {
        let encoded = encoded.clone();
        async move {
            let missing = |reason: String| {
                Outcome::Missing(MissingNode {
                    node: node.peer_id.to_base58(),
                    address: node.address.to_string(),
                    reason,
                })
            };
            let Some(member) = policy.bundle().member(&node.peer_id) else {
                return (
                    index,
                    missing(format!(
                        "not asked: not a member node in policy v{}",
                        policy.bundle().version
                    )),
                );
            };
            let outcome = match ask_until(client, node, encoded, deadline).await {
                Err(e) => missing(e.to_string()),
                Ok(QueryResponse::Refused(refusal)) => Outcome::Refused(RefusedNode {
                    node: node.peer_id.to_base58(),
                    institution: member.institution.clone(),
                    code: refusal.code,
                    reason: refusal.reason,
                }),
                Ok(QueryResponse::Quoted(quote)) => {
                    if quote.request_id != prepared.request.request_id
                        || quote.request_digest != prepared.digest
                        || !prepared.request.dry_run
                    {
                        return (
                            index,
                            missing("quote rejected: it quotes a different request".into()),
                        );
                    }
                    Outcome::Quoted(NodeQuote {
                        node: node.peer_id.to_base58(),
                        institution: member.institution.clone(),
                        rho: quote.rho,
                        epsilon: quote.epsilon,
                        delta: quote.delta,
                        mechanism: quote.mechanism,
                        noise_std: quote.noise_std,
                        budget_remaining: quote.budget_remaining,
                        budget_after: quote.budget_remaining.saturating_sub(quote.rho),
                    })
                }
                Ok(QueryResponse::Unmasked(_)) => {
                    missing("it replied to a query with an unmasking".into())
                }
                Ok(QueryResponse::Answered(envelope)) => {
                    match check_answer(&envelope, node.peer_id, prepared) {
                        Ok(answer) => Outcome::Answered(node_answer(
                            node.peer_id.to_base58(),
                            member.institution.clone(),
                            answer,
                        )),
                        Err(reason) => missing(format!("answer rejected: {reason}")),
                    }
                }
            };
            (index, outcome)
        }
    });
    let mut result = FederatedAnswer {
        query: prepared.request.query.to_string(),
        study: prepared.request.study.clone(),
        request_id: prepared.request.request_id.to_string(),
        mode: if prepared.request.secure {
            AnswerMode::Secure
        } else {
            AnswerMode::PerSite
        },
        aggregate: prepared.request.query.aggregation_name().to_string(),
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
        answered: Vec::new(),
        missing: Vec::new(),
        refused: Vec::new(),
        dry_run: prepared.request.dry_run,
        quotes: Vec::new(),
    };
    let name = |node: &NodeAddress| {
        policy
            .bundle()
            .member(&node.peer_id)
            .map_or_else(|| node.peer_id.to_base58(), |m| m.institution.clone())
    };
    let mut outcomes: Vec<Option<Outcome>> = nodes.iter().map(|_| None).collect();
    let mut pending: FuturesUnordered<_> = asks.collect();
    while let Some((index, outcome)) = pending.next().await {
        let kind = outcome.kind();
        if let Some(slot) = outcomes.get_mut(index) {
            *slot = Some(outcome);
        }
        progress(Progress {
            node: nodes.get(index).map(name).unwrap_or_default(),
            outcome: kind,
            done: outcomes.iter().filter(|o| o.is_some()).count(),
            total: nodes.len(),
            pending: nodes
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| o.is_none())
                .map(|(n, _)| name(n))
                .collect(),
        });
    }
    // In the order the nodes were given, whatever order they answered in.
    for outcome in outcomes.into_iter().flatten() {
        match outcome {
            Outcome::Quoted(q) => result.quotes.push(q),
            Outcome::Answered(a) => {
                // Every node must release the same shape (same bins, same cells).
                match result.answered.first() {
                    Some(first) if !same_shape(&first.release, &a.release) => {
                        result.missing.push(MissingNode {
                            node: a.node,
                            address: String::new(),
                            reason: "answer rejected: its release does not match the other nodes' (different schema?)".into(),
                        })
                    }
                    _ => result.answered.push(a),
                }
            }
            Outcome::Missing(m) => result.missing.push(m),
            Outcome::Refused(r) => result.refused.push(r),
        }
    }
    if prepared.request.dry_run {
        return Ok(result);
    }
    let recoverable = prepared.request.secure && prepared.request.dropouts > 0;
    let combined = if prepared.request.secure {
        let recovery = if recoverable && !result.answered.is_empty() {
            let finished = unmask_round(
                client,
                researcher,
                nodes,
                prepared,
                &result.answered,
                deadline,
            )
            .await;
            Some(finished)
        } else {
            None
        };
        secure_total(&prepared.request.query, &result, recovery)
    } else {
        combine(&prepared.request.query, &result.answered)
    };
    result.aborted = prepared.request.secure && result.is_partial() && !recoverable;
    if let Some(combined) = combined {
        result.aborted |= combined.aborted;
        if recoverable && !result.aborted {
            result.recovered_without = result
                .missing
                .iter()
                .map(|m| m.node.clone())
                .chain(result.refused.iter().map(|r| r.node.clone()))
                .collect();
        }
        result.estimate = combined.estimate;
        result.std_dev = combined.std_dev;
        result.ci95 = combined.ci95;
        result.groups = combined.groups;
        result.survival = combined.survival;
        result.regression = combined.regression;
        result.note = combined.note;
    }
    Ok(result)
}

/// Verifies a node's signed answer against who we asked and what we asked.
fn check_answer(
    envelope: &SignedEnvelope,
    asked: PeerId,
    prepared: &PreparedQuery,
) -> Result<Answer, String> {
    let answer: Answer = envelope
        .open(Purpose::NodeAnswer, MAX_RESPONSE_BYTES)
        .map_err(|e| e.to_string())?;
    let expected = PublicKey::from_peer_id(&asked).map_err(|e| e.to_string())?;
    if envelope.signer != expected {
        return Err(format!(
            "signed by {}, not by the node asked ({asked})",
            envelope.signer
        ));
    }
    if answer.request_id != prepared.request.request_id || answer.request_digest != prepared.digest
    {
        return Err("it answers a different request".into());
    }
    if prepared.request.dry_run {
        return Err("it answered a dry run (which must spend nothing)".into());
    }
    if prepared.request.secure != matches!(answer.release, Release::Masked { .. }) {
        return Err(if prepared.request.secure {
            "a secure round was asked for but it answered in the clear".into()
        } else {
            "it sent a masked contribution to a per-site request".into()
        });
    }
    if !answer.noise_scale.is_finite() || answer.noise_scale < 0.0 {
        return Err(format!(
            "noise scale {} is not a valid scale",
            answer.noise_scale
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{
        Filter, Mechanism, MicroRho, PrivacyRequest, Query, QueryRequest, RequestId,
    };

    use super::*;

    fn prepared(researcher: &SecretKey, node: &SecretKey, secure: bool) -> PreparedQuery {
        let request = QueryRequest {
            request_id: RequestId([7; 16]),
            nonce: [1; 16],
            issued_at: 1,
            expires_at: 2,
            study: "s".into(),
            audience: vec![node.public_key()],
            query: Query::count_patients("patients", Filter::True),
            privacy: PrivacyRequest::Zcdp {
                rho: MicroRho(50_000),
            },
            secure,
            dropouts: 0,
            policy_version: Some(1),
            dry_run: false,
        };
        PreparedQuery::from_request(researcher, request).unwrap()
    }

    fn answer(prepared: &PreparedQuery, release: Release) -> Answer {
        Answer {
            request_id: prepared.request.request_id,
            request_digest: prepared.digest,
            release,
            value_scale: 0,
            min_cell_size: 0,
            mechanism: Mechanism::DiscreteGaussian,
            sensitivity: 1.0,
            noise_scale: 3.0,
            noise_std: 3.0,
            count_noise_std: None,
            rho_spent: MicroRho(50_000),
            epsilon: 1.0,
            delta: 1e-6,
            budget_remaining: MicroRho(0),
            answered_at: 1,
        }
    }

    #[test]
    fn an_answer_counts_only_from_the_node_asked_for_the_request_asked() {
        let researcher = SecretKey::generate().unwrap();
        let node = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let asked = node.public_key().to_peer_id().unwrap();
        let plain = prepared(&researcher, &node, false);
        let count = Release::Scalar {
            value: 12,
            suppressed: false,
        };
        let sealed = |key: &SecretKey, answer: &Answer| {
            SignedEnvelope::seal(Purpose::NodeAnswer, key, answer).unwrap()
        };
        let good = answer(&plain, count.clone());
        assert_eq!(
            check_answer(&sealed(&node, &good), asked, &plain).unwrap(),
            good
        );
        let forged = check_answer(&sealed(&other, &good), asked, &plain).unwrap_err();
        assert!(forged.contains("not by the node asked"), "{forged}");
        let mut elsewhere = good.clone();
        elsewhere.request_digest = [0; 32];
        let err = check_answer(&sealed(&node, &elsewhere), asked, &plain).unwrap_err();
        assert!(err.contains("different request"), "{err}");
        let masked = answer(
            &plain,
            Release::Masked {
                shape: renkei_protocol::MaskedShape::Scalar,
                words: vec![1],
            },
        );
        let err = check_answer(&sealed(&node, &masked), asked, &plain).unwrap_err();
        assert!(err.contains("masked contribution"), "{err}");
        let secure = prepared(&researcher, &node, true);
        let err =
            check_answer(&sealed(&node, &answer(&secure, count)), asked, &secure).unwrap_err();
        assert!(err.contains("in the clear"), "{err}");
        let mut bad_scale = good;
        bad_scale.noise_scale = f64::NAN;
        let err = check_answer(&sealed(&node, &bad_scale), asked, &plain).unwrap_err();
        assert!(err.contains("noise scale"), "{err}");
    }
}
