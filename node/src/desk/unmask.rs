//! Finishing a recoverable secure round: the two steps of an [`UnmaskRequest`], verified
//! like a query. Settle: one set of survivors per round, on disk and audited before the
//! pairwise masks toward the dropped nodes leave. Reveal: the node's own mask, only against
//! every survivor's commitment to the set it settled.

use std::sync::Arc;

use renkei_protocol::envelope::Signature;
use renkei_protocol::limits::{MAX_CLOCK_SKEW_SECS, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
use renkei_protocol::masks::{commitment_message, round_context, survivors_digest};
use renkei_protocol::messages::request_digest;
use renkei_protocol::{
    Answer, PublicKey, Purpose, QueryRequest, QueryResponse, Refusal, RefusalCode, Release,
    SignedEnvelope, UnmaskRequest, Unmasking,
};
use tracing::{info, warn};

use crate::audit::{AuditEvent, hex_hash};
use crate::privacy::secure;

use super::{AUDIT, Known, QueryDesk};

impl QueryDesk {
    /// [`QueryDesk::unmask`] on a blocking thread (settling the survivors is a write made
    /// durable before replying).
    pub(super) async fn unmask_blocking(
        self: Arc<Self>,
        envelope: SignedEnvelope,
        now: u64,
    ) -> QueryResponse {
        let desk = Arc::clone(&self);
        match tokio::task::spawn_blocking(move || desk.unmask(&envelope, now)).await {
            Ok(response) => response,
            Err(join) => {
                warn!("unmask task failed: {join}");
                QueryResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "the node failed while unmasking; ask again",
                ))
            }
        }
    }

    /// One step of finishing a recoverable secure round: checks the researcher's
    /// [`UnmaskRequest`] and the round it names; to settle, settles its survivors (one set
    /// per round), audits, makes both durable and replies with this node's commitment and
    /// its pairwise masks with the dropped nodes; to reveal, checks every survivor's
    /// commitment to the set this node settled and replies with its own mask. Blocking.
    fn unmask(&self, envelope: &SignedEnvelope, now: u64) -> QueryResponse {
        let mut known = Known {
            researcher: Some(envelope.signer),
            ..Known::default()
        };
        match self.unmasking(envelope, now, &mut known) {
            Ok(sealed) => QueryResponse::Unmasked(sealed),
            Err(refusal) => {
                self.record_refusal(now, known, &refusal);
                QueryResponse::Refused(refusal)
            }
        }
    }

    fn unmasking(
        &self,
        envelope: &SignedEnvelope,
        now: u64,
        known: &mut Known,
    ) -> Result<SignedEnvelope, Refusal> {
        let malformed = |what: String| Refusal::new(RefusalCode::MalformedRequest, what);
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            warn!("{what}: {e}");
            Refusal::new(
                RefusalCode::Internal,
                format!("{what} failed on the node; no mask was revealed"),
            )
        };
        let researcher = envelope.signer;
        let payload = envelope
            .verify(Purpose::UnmaskRequest)
            .map_err(|e| Refusal::new(RefusalCode::BadSignature, e.to_string()))?;
        let Some(policy) = self.policy.active() else {
            return Err(Refusal::new(
                RefusalCode::Internal,
                "this node has no active policy yet",
            ));
        };
        if policy.bundle().revoked.contains(&researcher) {
            return Err(Refusal::new(
                RefusalCode::ResearcherRevoked,
                format!(
                    "key {researcher} is revoked in policy v{}",
                    policy.bundle().version
                ),
            ));
        }
        if policy.bundle().researcher(&researcher).is_none() {
            return Err(Refusal::new(
                RefusalCode::UnknownResearcher,
                format!(
                    "key {researcher} is not a researcher in policy v{}",
                    policy.bundle().version
                ),
            ));
        }
        let unmask: UnmaskRequest =
            renkei_protocol::codec::decode_limited(payload, MAX_REQUEST_BYTES)
                .map_err(|e| malformed(format!("unmask request: {e}")))?;
        if unmask.round.signer != researcher {
            return Err(Refusal::new(
                RefusalCode::BadSignature,
                "the round was signed by another researcher than its unmasking",
            ));
        }
        let round_payload = unmask
            .round
            .verify(Purpose::QueryRequest)
            .map_err(|e| Refusal::new(RefusalCode::BadSignature, format!("the round: {e}")))?;
        let round: QueryRequest =
            renkei_protocol::codec::decode_limited(round_payload, MAX_REQUEST_BYTES)
                .map_err(|e| malformed(format!("the round's request: {e}")))?;
        let digest = request_digest(round_payload);
        known.study = Some(round.study.clone());
        known.request_id = Some(round.request_id);
        known.digest = Some(digest);
        if !round.secure || round.dropouts == 0 {
            return Err(malformed(
                "only a secure round asked with dropouts > 0 is unmasked".into(),
            ));
        }
        // The researcher must still be allowed what the round asked.
        policy.authorize(&researcher, &round.study, &round.query, now)?;
        if round.expires_at.saturating_add(MAX_CLOCK_SKEW_SECS) <= now {
            return Err(Refusal::new(
                RefusalCode::Expired,
                format!(
                    "the round expired at {} and node time is {now}",
                    round.expires_at
                ),
            ));
        }
        let mut audience = round.audience.clone();
        audience.sort();
        audience.dedup();
        let mut survivors = unmask.survivors.clone();
        survivors.sort();
        survivors.dedup();
        if survivors.len() != unmask.survivors.len()
            || survivors.iter().any(|s| audience.binary_search(s).is_err())
        {
            return Err(malformed(
                "the survivors must be distinct members of the round's audience".into(),
            ));
        }
        if survivors.binary_search(&self.node_key).is_err() {
            return Err(malformed(
                "this node is not among the survivors named; only a survivor is unmasked".into(),
            ));
        }
        let dropped: Vec<PublicKey> = audience
            .iter()
            .filter(|k| survivors.binary_search(k).is_err())
            .copied()
            .collect();
        if dropped.len() > round.dropouts as usize {
            return Err(malformed(format!(
                "{} nodes dropped out of a round that survives at most {}; its total cannot be read",
                dropped.len(),
                round.dropouts
            )));
        }
        // The words of this node's contribution: from its recorded answer to this round.
        let recorded = self
            .ledger
            .recorded_answer(&researcher, &round.request_id, &digest)
            .map_err(|e| internal("ledger", &e))?
            .ok_or_else(|| {
                malformed(format!(
                    "this node has no contribution to round {}; it cannot be a survivor",
                    round.request_id
                ))
            })?;
        // This node's own record: read, not verified again.
        let answer: Answer =
            renkei_protocol::codec::decode_limited::<SignedEnvelope>(&recorded, MAX_RESPONSE_BYTES)
                .and_then(|sealed| {
                    renkei_protocol::codec::decode_limited(&sealed.payload, MAX_RESPONSE_BYTES)
                })
                .map_err(|e| internal("reading the recorded answer", &e))?;
        let Release::Masked { words, .. } = &answer.release else {
            return Err(internal(
                "reading the recorded answer",
                &"it is not a masked contribution",
            ));
        };
        let settled = survivors_digest(&survivors);
        // Masks, the settled set and commitments are the researcher's round's alone.
        let context = round_context(&researcher, &digest);
        let commitment = Signature(self.identity.sign(&commitment_message(&context, &settled)));
        let reveal = !unmask.commitments.is_empty();
        let (own_mask, dropped_masks) = if reveal {
            // Every survivor, and only they, committed to this very set.
            let mut committed: Vec<PublicKey> =
                unmask.commitments.iter().map(|(key, _)| *key).collect();
            committed.sort();
            committed.dedup();
            if committed != survivors || unmask.commitments.len() != survivors.len() {
                return Err(malformed(
                    "the reveal step needs one commitment from each survivor".into(),
                ));
            }
            let message = commitment_message(&context, &settled);
            // This node's own commitment is checked against its settled set below.
            if let Some((key, _)) = unmask
                .commitments
                .iter()
                .filter(|(key, _)| *key != self.node_key)
                .find(|(key, signature)| !key.verify_strict(&message, &signature.0))
            {
                return Err(Refusal::new(
                    RefusalCode::BadSignature,
                    format!("{key}'s commitment does not verify for these survivors of this round"),
                ));
            }
            let settled_here = self
                .ledger
                .settled_survivors(&context)
                .map_err(|e| internal("ledger", &e))?;
            if settled_here != Some(settled) {
                return Err(Refusal::new(
                    RefusalCode::RoundConflict,
                    format!(
                        "this node has not settled these survivors for round {}",
                        round.request_id
                    ),
                ));
            }
            let own = secure::own_mask(&self.identity, &context, words.len())
                .map_err(|e| internal("own mask", &e))?;
            (own, Vec::new())
        } else {
            let dropped_masks = self
                .pair_secrets
                .masks_toward(&self.identity, &dropped, &context, words.len())
                .map_err(|e| internal("pairwise masks", &e))?;
            (Vec::new(), dropped_masks)
        };
        let sealed = SignedEnvelope::seal(
            Purpose::NodeUnmasking,
            &self.identity,
            &Unmasking {
                request_id: round.request_id,
                request_digest: digest,
                survivors_digest: settled,
                commitment,
                own_mask,
                dropped_masks,
            },
        )
        .map_err(|e| internal("signing the unmasking", &e))?;
        let event = |settled: bool| {
            let (request_id, query_hash) = (round.request_id.to_string(), hex_hash(&digest));
            if settled {
                AuditEvent::RoundSettled {
                    researcher,
                    request_id,
                    query_hash,
                    survivors: survivors.len(),
                    dropped: dropped.clone(),
                }
            } else {
                AuditEvent::RoundRevealed {
                    researcher,
                    request_id,
                    query_hash,
                }
            }
        };
        if reveal {
            // Nothing is written: the own mask follows from the settled set, which is on
            // disk; the entry goes out with the log's next flush.
            self.record(now, event(false));
        } else {
            let durable = self.ledger.expect_durable();
            let agreed = self
                .ledger
                .settle_survivors(&context, &settled, round.expires_at)
                .map_err(|e| internal("ledger", &e))?;
            if !agreed {
                return Err(Refusal::new(
                    RefusalCode::RoundConflict,
                    format!(
                        "round {} was already settled for another set of survivors; a node settles one set per round",
                        round.request_id
                    ),
                ));
            }
            // The settled set and its audit entry are on disk before any mask leaves; no
            // entry, no masks.
            self.audit
                .append(now, event(true))
                .map_err(|e| internal("audit log", &e))?;
            durable
                .flush()
                .map_err(|e| internal("recording the settled survivors", &e))?;
        }
        info!(
            target: AUDIT,
            request = %round.request_id,
            researcher = %researcher,
            survivors = survivors.len(),
            dropped = dropped.len(),
            step = if reveal { "reveal" } else { "settle" },
            "unmasked"
        );
        Ok(sealed)
    }
}
