//! Finishing a secure round asked with `dropouts > 0`: the two signed steps of an
//! [`UnmaskRequest`] (settle, then reveal) that remove the survivors' masks, so that the
//! survivors' total can be read and nothing else.

use std::time::Duration;

use libp2p::PeerId;
use renkei_protocol::envelope::Signature;
use renkei_protocol::limits::MAX_RESPONSE_BYTES;
use renkei_protocol::masks::{commitment_message, round_context, survivors_digest};
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    PublicKey, Purpose, QueryResponse, Release, SecretKey, SignedEnvelope, UnmaskRequest, Unmasking,
};

use crate::client::{NetworkClient, NodeAddress, ask_until};
use crate::request::PreparedQuery;
use crate::results::NodeAnswer;

/// Finishes a secure round asked with `dropouts > 0` in the two steps of an
/// [`UnmaskRequest`] signed by `researcher`: the nodes whose contributions arrived (the
/// survivors) settle that set, commit to it and reveal their pairwise masks with the
/// dropped nodes; then, shown every survivor's commitment, they reveal their own masks.
/// Returns what to subtract from the survivors' words, or why the total cannot be read. A
/// survivor that fails either step leaves its masks in the total: the round is aborted.
pub(crate) async fn unmask_round(
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
