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
//! A secure round asked with `dropouts > 0` takes two more steps ([`unmask_round`]): the
//! researcher names the nodes whose contributions arrived, each of them commits to that set
//! and reveals its pairwise masks with the nodes that did not; shown all the commitments,
//! each reveals its own mask, and the survivors' total is read.

use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use renkei_policies::VerifiedPolicy;
use renkei_protocol::codec::EncodedRequest;
use renkei_protocol::envelope::Signature;
use renkei_protocol::limits::{MAX_REQUEST_LIFETIME_SECS, MAX_RESPONSE_BYTES};
use renkei_protocol::messages::{
    commitment_message, request_digest, round_context, survivors_digest,
};
use renkei_protocol::{
    Answer, Mechanism, MicroRho, PrivacyRequest, PublicKey, Purpose, Query, QueryRequest,
    QueryResponse, RefusalCode, Release, RequestId, SecretKey, SignedEnvelope, UnmaskRequest,
    Unmasking,
};
use serde::Serialize;

use crate::client::NetworkClient;
use crate::error::AggregatorError;

pub use crate::combine::Z_95;
use crate::combine::{Estimate, GroupEstimate, combine, same_shape, secure_total};

/// A node to ask: its peer id and a full address ending in `/p2p/<peer id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub peer_id: PeerId,
    pub address: Multiaddr,
}

impl FromStr for NodeAddress {
    type Err = AggregatorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| AggregatorError::BadNodeAddress {
            address: text.to_string(),
            reason: reason.to_string(),
        };
        let address: Multiaddr = text
            .trim()
            .parse()
            .map_err(|e: libp2p::multiaddr::Error| bad(&e.to_string()))?;
        let Some(Protocol::P2p(peer_id)) = address.iter().last() else {
            return Err(bad(
                "must end in /p2p/<peer id> so the node can be authenticated",
            ));
        };
        Ok(Self { peer_id, address })
    }
}

/// How to ask.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    pub study: String,
    /// Privacy each node spends on its answer.
    pub privacy: PrivacyRequest,
    /// How long to wait for all nodes.
    pub deadline: Duration,
    /// Ask for a secure total (only the network-wide sum is ever readable) rather than
    /// per-site answers.
    pub secure: bool,
    /// For a secure round: how many nodes may fail to contribute while the total is still
    /// read (each node's noise share is then sized for that many fewer nodes). 0: a missing
    /// node aborts the round.
    pub dropouts: u32,
    /// Only ask what the query would cost at each node; nothing is spent.
    pub dry_run: bool,
}

/// A signed request, ready to send to every node.
#[derive(Debug, Clone)]
pub struct PreparedQuery {
    pub request: QueryRequest,
    pub envelope: SignedEnvelope,
    pub digest: [u8; 32],
}

impl PreparedQuery {
    /// Signs `query` for `options.study` with `options.privacy` (a secure round when
    /// `options.secure`), under `policy_version` when given, addressed to the nodes in
    /// `audience`, with a fresh request id and nonce, valid from `now` for the longest
    /// lifetime nodes accept.
    pub fn sign(
        key: &SecretKey,
        query: Query,
        options: &QueryOptions,
        policy_version: Option<u64>,
        audience: &[NodeAddress],
        now: u64,
    ) -> Result<Self, AggregatorError> {
        let audience = audience
            .iter()
            .map(|node| PublicKey::from_peer_id(&node.peer_id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&RequestId::random()?.0);
        let request = QueryRequest {
            request_id: RequestId::random()?,
            nonce,
            issued_at: now,
            expires_at: now + MAX_REQUEST_LIFETIME_SECS,
            study: options.study.clone(),
            audience,
            query,
            privacy: options.privacy,
            secure: options.secure,
            dropouts: options.dropouts,
            policy_version,
            dry_run: options.dry_run,
        };
        Ok(Self::from_request(key, request)?)
    }

    /// Signs an arbitrary request (tests use this to build expired or odd requests).
    pub fn from_request(
        key: &SecretKey,
        request: QueryRequest,
    ) -> Result<Self, renkei_protocol::CodecError> {
        let envelope = SignedEnvelope::seal(Purpose::QueryRequest, key, &request)?;
        let digest = request_digest(&envelope.payload);
        Ok(Self {
            request,
            envelope,
            digest,
        })
    }
}

/// One node's accepted answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeAnswer {
    pub node: String,
    pub institution: String,
    /// The node's noisy number in the column's unit (counts and sums; `null` otherwise or
    /// when `suppressed`).
    pub value: Option<f64>,
    /// The node's count fell below the policy's minimum cell size and was withheld.
    pub suppressed: bool,
    pub min_cell_size: u64,
    /// Everything the node released, as it released it.
    pub release: Release,
    /// Digits after the point of the released sums and bins.
    pub value_scale: u8,
    pub mechanism: Mechanism,
    pub sensitivity: f64,
    /// The mechanism's scale parameter, as opendp names it.
    pub noise_scale: f64,
    /// The noise's exact standard deviation (in released units).
    pub noise_std: f64,
    /// For a mean, the count's noise standard deviation.
    pub count_noise_std: Option<f64>,
    /// 95% interval for this node's true value (counts and sums).
    pub ci95: Option<[f64; 2]>,
    /// zCDP rho charged at this node.
    pub rho: MicroRho,
    /// The same release as (epsilon, delta)-DP.
    pub epsilon: f64,
    pub delta: f64,
    pub budget_remaining: MicroRho,
}

/// A node that gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingNode {
    pub node: String,
    pub address: String,
    pub reason: String,
}

/// A node that refused, with its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedNode {
    pub node: String,
    pub institution: String,
    pub code: RefusalCode,
    pub reason: String,
}

/// How the nodes answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerMode {
    /// Each node released its own noisy answer; the estimate is their sum.
    PerSite,
    /// Each node released a masked noise share; only the network-wide total was readable.
    Secure,
}

impl std::fmt::Display for AnswerMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AnswerMode::PerSite => "per_site",
            AnswerMode::Secure => "secure",
        })
    }
}

/// The combined result of one federated query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FederatedAnswer {
    pub query: String,
    pub study: String,
    pub request_id: String,
    /// `per_site` (each node's noisy answer visible) or `secure` (only the total).
    pub mode: AnswerMode,
    /// What was computed: `count`, `sum`, `mean`, `median`, `quantile` or `histogram`.
    pub aggregate: String,
    /// The network-wide estimate (counts: the raw sum of the nodes' noisy counts, which may
    /// be negative for tiny cohorts and so stays unbiased); `null` when no node answered or
    /// for GROUP BY (see `groups`).
    pub estimate: Option<Estimate>,
    /// Standard deviation of the estimate's noise.
    pub std_dev: Option<f64>,
    /// 95% interval `[low, high]` for the true value over the answering nodes.
    pub ci95: Option<[f64; 2]>,
    /// GROUP BY cells, each with its estimate and interval.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupEstimate>,
    /// Why there is no estimate although nodes answered, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// A secure round that could not be completed (a node did not contribute, more nodes
    /// dropped out than the round survives, or the unmasking failed): its total cannot be
    /// read, and `note` says why.
    pub aborted: bool,
    /// A secure round asked with dropouts that was read without these nodes (missing or
    /// refusing): the survivors removed their masks, and the total is over the survivors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovered_without: Vec<String>,
    pub answered: Vec<NodeAnswer>,
    pub missing: Vec<MissingNode>,
    pub refused: Vec<RefusedNode>,
    /// A dry run: nothing was spent; `quotes` says what the query would cost.
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quotes: Vec<NodeQuote>,
}

impl FederatedAnswer {
    /// True when some node asked did not contribute.
    pub fn is_partial(&self) -> bool {
        !self.missing.is_empty() || !self.refused.is_empty()
    }
}

/// What a node said to a dry run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeQuote {
    pub node: String,
    pub institution: String,
    /// The zCDP rho the query would cost at this node.
    pub rho: MicroRho,
    pub epsilon: f64,
    pub delta: f64,
    pub mechanism: Mechanism,
    /// The noise sd the answer would carry (first released number).
    pub noise_std: f64,
    /// The researcher's budget for the study at this node now, and after this query.
    pub budget_remaining: MicroRho,
    pub budget_after: MicroRho,
}

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

/// One node finished (answered, quoted, refused or missing) while a query is out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The node's institution (or peer id when it is not a member).
    pub node: String,
    /// `answered`, `quoted`, `refused` or `missing`.
    pub outcome: &'static str,
    pub done: usize,
    pub total: usize,
    /// Nodes still pending.
    pub pending: Vec<String>,
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

/// As [`fan_out`], telling `progress` as each node finishes.
pub async fn fan_out_with_progress(
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
        secure_total(&prepared.request.query.aggregate, &result, recovery)
    } else {
        combine(&prepared.request.query.aggregate, &result.answered)
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
        result.note = combined.note;
    }
    Ok(result)
}

/// Finishes a secure round asked with `dropouts > 0` in the two steps of an
/// [`UnmaskRequest`] signed by `researcher`: the nodes whose contributions arrived (the
/// survivors) settle that set, commit to it and reveal their pairwise masks with the
/// dropped nodes; then, shown every survivor's commitment, they reveal their own masks.
/// Returns what to subtract from the survivors' words, or why the total cannot be read. A
/// survivor that fails either step leaves its masks in the total: the round is aborted.
async fn unmask_round(
    client: &NetworkClient,
    researcher: &SecretKey,
    nodes: &[NodeAddress],
    prepared: &PreparedQuery,
    answered: &[NodeAnswer],
    deadline: Duration,
) -> Result<Vec<u64>, String> {
    let audience = prepared.request.audience.len();
    let dropouts = prepared.request.dropouts as usize;
    // Nodes refuse to unmask an expired round: no step waits past its expiry.
    let until_expiry = Duration::from_secs(
        prepared
            .request
            .expires_at
            .saturating_sub(renkei_protocol::unix_now()),
    );
    let deadline = deadline.min(until_expiry);
    if answered.len() + dropouts < audience {
        return Err(format!(
            "{} of {audience} nodes contributed and the round survives at most {dropouts} missing",
            answered.len()
        ));
    }
    let survivors: Vec<&NodeAddress> = nodes
        .iter()
        .filter(|n| answered.iter().any(|a| a.node == n.peer_id.to_base58()))
        .collect();
    let mut keys = survivors
        .iter()
        .map(|n| PublicKey::from_peer_id(&n.peer_id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    keys.sort();
    let settled = survivors_digest(&keys);
    let len = match answered.first().map(|a| &a.release) {
        Some(Release::Masked { words, .. }) => words.len(),
        _ => return Err("the contributions are not masked".into()),
    };
    let step = |commitments: Vec<(PublicKey, Signature)>| {
        let request = UnmaskRequest {
            round: prepared.envelope.clone(),
            survivors: keys.clone(),
            commitments,
        };
        SignedEnvelope::seal(Purpose::UnmaskRequest, researcher, &request)
            .and_then(|envelope| EncodedRequest::encode(&envelope))
            .map_err(|e| format!("signing the unmasking: {e}"))
    };
    let ask_all = |encoded: EncodedRequest, reveal: bool| {
        let settled = &settled;
        futures::future::join_all(survivors.iter().map(move |node| {
            let encoded = encoded.clone();
            async move {
                let name = node.peer_id.to_base58();
                let what = if reveal { "reveal" } else { "settle" };
                match ask_until(client, node, encoded, deadline).await {
                    Ok(QueryResponse::Unmasked(envelope)) => {
                        check_unmasking(&envelope, node.peer_id, prepared, settled, len, reveal)
                            .map_err(|e| format!("{name}'s {what} step was rejected: {e}"))
                    }
                    Ok(QueryResponse::Refused(refusal)) => Err(format!(
                        "{name} refused the {what} step ({}: {})",
                        refusal.code, refusal.reason
                    )),
                    Ok(_) => Err(format!("{name} did not reply to the {what} step")),
                    Err(e) => Err(format!("{name} did not take the {what} step ({e})")),
                }
            }
        }))
    };
    let mut correction = vec![0u64; len];
    let mut add = |words: &[u64]| {
        for (sum, word) in correction.iter_mut().zip(words) {
            *sum = sum.wrapping_add(*word);
        }
    };
    let mut commitments = Vec::with_capacity(keys.len());
    for (node, reply) in survivors
        .iter()
        .zip(ask_all(step(Vec::new())?, false).await)
    {
        let unmasking = reply?;
        add(&unmasking.dropped_masks);
        let key = PublicKey::from_peer_id(&node.peer_id).map_err(|e| e.to_string())?;
        commitments.push((key, unmasking.commitment));
    }
    for reply in ask_all(step(commitments)?, true).await {
        add(&reply?.own_mask);
    }
    Ok(correction)
}

/// Verifies a survivor's signed reply to one step of the unmasking against who we asked,
/// the round, the survivors we named and the step: its commitment to them, and the words
/// that step reveals.
fn check_unmasking(
    envelope: &SignedEnvelope,
    asked: PeerId,
    prepared: &PreparedQuery,
    survivors: &[u8; 32],
    len: usize,
    reveal: bool,
) -> Result<Unmasking, String> {
    let unmasking: Unmasking = envelope
        .open(Purpose::NodeUnmasking, MAX_RESPONSE_BYTES)
        .map_err(|e| e.to_string())?;
    let expected = PublicKey::from_peer_id(&asked).map_err(|e| e.to_string())?;
    if envelope.signer != expected {
        return Err(format!("signed by {}, not by {asked}", envelope.signer));
    }
    if unmasking.request_id != prepared.request.request_id
        || unmasking.request_digest != prepared.digest
        || &unmasking.survivors_digest != survivors
    {
        return Err("it unmasks another round or another set of survivors".into());
    }
    // Checked once, in the settle step that hands it over.
    if !reveal
        && !expected.verify_strict(
            &commitment_message(
                &round_context(&prepared.envelope.signer, &prepared.digest),
                survivors,
            ),
            &unmasking.commitment.0,
        )
    {
        return Err("its commitment to the survivors does not verify".into());
    }
    let (revealed, empty) = if reveal {
        (&unmasking.own_mask, &unmasking.dropped_masks)
    } else {
        (&unmasking.dropped_masks, &unmasking.own_mask)
    };
    if revealed.len() != len || !empty.is_empty() {
        return Err(format!(
            "it reveals {} and {} words where this step takes {len} and 0",
            revealed.len(),
            empty.len()
        ));
    }
    Ok(unmasking)
}

/// A verified answer as reported per node.
pub fn node_answer(node: String, institution: String, answer: Answer) -> NodeAnswer {
    let scale = 10f64.powi(i32::from(answer.value_scale));
    let (value, suppressed, ci95) = match &answer.release {
        Release::Scalar {
            value,
            suppressed: true,
        } => {
            let _ = value;
            let below = answer.min_cell_size.saturating_sub(1) as f64;
            (None, true, Some([0.0, below + Z_95 * answer.noise_std]))
        }
        Release::Scalar { value, .. } => {
            let half = Z_95 * answer.noise_std;
            let v = *value as f64;
            (
                Some(v / scale),
                false,
                Some([(v - half) / scale, (v + half) / scale]),
            )
        }
        _ => (None, false, None),
    };
    NodeAnswer {
        node,
        institution,
        value,
        suppressed,
        min_cell_size: answer.min_cell_size,
        release: answer.release,
        value_scale: answer.value_scale,
        mechanism: answer.mechanism,
        sensitivity: answer.sensitivity,
        noise_scale: answer.noise_scale,
        noise_std: answer.noise_std,
        count_noise_std: answer.count_noise_std,
        ci95,
        rho: answer.rho_spent,
        epsilon: answer.epsilon,
        delta: answer.delta,
        budget_remaining: answer.budget_remaining,
    }
}

/// Pause between resends of a request whose reply was lost.
const RESEND_PAUSE: Duration = Duration::from_millis(200);

/// Asks one node, resending the *same* signed request while the reply was lost in transit
/// (the connection closed or the stream failed after sending) or the node was still busy
/// answering it, until `deadline`. Nodes answer a resent request with the answer they
/// recorded, so this never spends twice; a node that cannot be reached at all is not retried.
async fn ask_until(
    client: &NetworkClient,
    node: &NodeAddress,
    request: EncodedRequest,
    deadline: Duration,
) -> Result<QueryResponse, crate::client::AskError> {
    use crate::client::AskError;
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let reply = client
            .ask(node.peer_id, node.address.clone(), request.clone(), left)
            .await;
        let retry = match &reply {
            Err(AskError::ConnectionClosed | AskError::Stream(_)) => true,
            Ok(QueryResponse::Refused(refusal)) => refusal.code == RefusalCode::Overloaded,
            _ => false,
        };
        if !retry || tokio::time::Instant::now() + RESEND_PAUSE >= until {
            return reply;
        }
        tokio::time::sleep(RESEND_PAUSE).await;
    }
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
