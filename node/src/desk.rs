//! The query desk: everything between a request's bytes and the node's reply.
//!
//! In order: decode the envelope; verify the researcher's signature over the exact received
//! payload; decode the request; check its time window; ask the policy whether this
//! researcher may query this study; bind the query to the schema; calibrate the mechanism
//! and compute its cost (checked against the policy's per-query limit); admit it at the
//! ledger (a durable charge, or the answer recorded for this very request before); count; add
//! noise; withhold a cell below the policy's minimum; sign; record the signed answer; reply.
//! Any failure before the charge spends nothing; any failure after it keeps the charge. Every
//! failure becomes a [`Refusal`] with its own code.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use renkei_policies::VerifiedPolicy;
use renkei_protocol::codec::EncodedRequest;
use renkei_protocol::limits::{
    MAX_CLOCK_SKEW_SECS, MAX_REQUEST_BYTES, MAX_REQUEST_LIFETIME_SECS, MAX_RESPONSE_BYTES,
};
use renkei_protocol::messages::request_digest;
use renkei_protocol::{
    Answer, Purpose, QueryRequest, QueryResponse, Refusal, RefusalCode, SecretKey, SignedEnvelope,
};
use tracing::{info, warn};

use crate::cohort::{self, Cohort};
use crate::dp::Calibration;
use crate::ledger::{Admission, ChargeRequest, PrivacyLedger};

/// One patient changes a patient count by at most one.
const COUNT_SENSITIVITY: u64 = 1;

/// Audit events go to their own tracing target.
const AUDIT: &str = "renkei::audit";

/// Everything a node needs to answer queries. Shared by the service's request tasks.
#[derive(Debug)]
pub struct QueryDesk {
    identity: SecretKey,
    policy: VerifiedPolicy,
    cohort: Cohort,
    ledger: PrivacyLedger,
    /// Requests (researcher key || request id) being answered right now, so two copies of
    /// one request arriving together cannot both draw noise for its single charge.
    answering: Mutex<HashSet<[u8; 48]>>,
}

/// Holds a request's place in [`QueryDesk::answering`] until dropped.
struct AnsweringGuard<'a> {
    set: &'a Mutex<HashSet<[u8; 48]>>,
    key: [u8; 48],
}

impl Drop for AnsweringGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

impl QueryDesk {
    pub fn new(
        identity: SecretKey,
        policy: VerifiedPolicy,
        cohort: Cohort,
        ledger: PrivacyLedger,
    ) -> Self {
        Self {
            identity,
            policy,
            cohort,
            ledger,
            answering: Mutex::new(HashSet::new()),
        }
    }

    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }

    pub fn policy(&self) -> &VerifiedPolicy {
        &self.policy
    }

    pub fn cohort(&self) -> &Cohort {
        &self.cohort
    }

    /// Answers one request. Never panics, never returns without a reply.
    pub async fn handle(self: Arc<Self>, request: EncodedRequest, now: u64) -> QueryResponse {
        let checked = match self.check(&request, now) {
            Ok(checked) => checked,
            Err(refusal) => {
                info!(target: AUDIT, code = %refusal.code, reason = %refusal.reason, "refused before charging");
                return QueryResponse::Refused(refusal);
            }
        };
        let desk = Arc::clone(&self);
        // sled's fsync and opendp's sampler block; opendp measurements are not Send, so the
        // whole release runs on one blocking thread.
        match tokio::task::spawn_blocking(move || desk.charge_and_release(checked, now)).await {
            Ok(Ok(response)) => response,
            Ok(Err(refusal)) => QueryResponse::Refused(refusal),
            Err(join) => {
                warn!("release task failed: {join}");
                QueryResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "the node failed while answering; any charge already made stands",
                ))
            }
        }
    }

    /// Everything that can be decided without spending privacy.
    fn check(&self, request: &EncodedRequest, now: u64) -> Result<Checked, Refusal> {
        let envelope = request.decode().map_err(|e| {
            Refusal::new(
                RefusalCode::MalformedRequest,
                format!("request envelope: {e}"),
            )
        })?;
        let payload = envelope
            .verify(Purpose::QueryRequest)
            .map_err(|e| Refusal::new(RefusalCode::BadSignature, e.to_string()))?;
        let request: QueryRequest =
            renkei_protocol::codec::decode_limited(payload, MAX_REQUEST_BYTES).map_err(|e| {
                Refusal::new(
                    RefusalCode::MalformedRequest,
                    format!("signed request: {e}"),
                )
            })?;
        if request.expires_at <= now {
            return Err(Refusal::new(
                RefusalCode::Expired,
                format!(
                    "request expired at {} (node time {now}); sign a new one",
                    request.expires_at
                ),
            ));
        }
        if request.issued_at > now + MAX_CLOCK_SKEW_SECS {
            return Err(Refusal::new(
                RefusalCode::NotYetValid,
                format!(
                    "request is issued at {}, more than {MAX_CLOCK_SKEW_SECS}s after node time {now}; check your clock",
                    request.issued_at
                ),
            ));
        }
        if request.expires_at.saturating_sub(request.issued_at) > MAX_REQUEST_LIFETIME_SECS {
            return Err(Refusal::new(
                RefusalCode::LifetimeTooLong,
                format!("requests may live at most {MAX_REQUEST_LIFETIME_SECS}s"),
            ));
        }
        let grant = self.policy.authorize(&envelope.signer, &request.study)?;
        request
            .query
            .check_shape()
            .map_err(|e| Refusal::new(RefusalCode::MalformedRequest, e.to_string()))?;
        let compiled = cohort::compile(&request.query)
            .map_err(|e| Refusal::new(RefusalCode::InvalidQuery, e.to_string()))?;
        let calibration =
            Calibration::for_request(request.privacy, COUNT_SENSITIVITY, grant.report_delta)
                .map_err(|e| {
                    Refusal::new(RefusalCode::PrivacyParameterOutOfRange, e.to_string())
                })?;
        grant.check_cost(calibration.cost)?;
        Ok(Checked {
            digest: request_digest(payload),
            researcher: envelope.signer,
            request,
            compiled,
            calibration,
            grant,
        })
    }

    /// Admits the request at the ledger (charging durably), then counts, draws noise, signs
    /// and records the answer. Blocking.
    fn charge_and_release(&self, checked: Checked, now: u64) -> Result<QueryResponse, Refusal> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            warn!("{what}: {e}");
            Refusal::new(
                RefusalCode::Internal,
                format!("{what} failed on the node; nothing was released"),
            )
        };
        let Checked {
            digest,
            researcher,
            request,
            compiled,
            calibration,
            grant,
        } = checked;
        let _guard = self.hold(&researcher, &request)?;
        let admission = self
            .ledger
            .admit(ChargeRequest {
                researcher: &researcher,
                study: &request.study,
                request_id: &request.request_id,
                nonce: &request.nonce,
                digest: &digest,
                expires_at: request.expires_at,
                cost: calibration.cost,
                budget: grant.budget,
                dataset_budget: grant.dataset_budget,
            })
            .map_err(|e| internal("ledger", &e))?
            .inspect_err(|refusal| {
                info!(target: AUDIT, request = %request.request_id, code = %refusal.code, "refused at the ledger");
            })?;
        let charge = match admission {
            Admission::Answered(bytes) => {
                let envelope: SignedEnvelope =
                    renkei_protocol::codec::decode_limited(&bytes, MAX_RESPONSE_BYTES)
                        .map_err(|e| internal("stored answer", &e))?;
                info!(target: AUDIT, request = %request.request_id, "resent the recorded answer");
                return Ok(QueryResponse::Answered(envelope));
            }
            Admission::Charged(charge) | Admission::ChargedUnanswered(charge) => charge,
        };
        let true_count = self.cohort.count(&compiled);
        let noisy = calibration
            .release(i64::try_from(true_count).unwrap_or(i64::MAX))
            .map_err(|e| internal("noise", &e))?;
        // Post-processing of the noisy value: costs no privacy.
        let suppressed = grant.min_cell_size > 0 && noisy < grant.min_cell_size as i64;
        let answer = Answer {
            request_id: request.request_id,
            request_digest: digest,
            value: if suppressed { 0 } else { noisy },
            suppressed,
            min_cell_size: grant.min_cell_size,
            mechanism: calibration.mechanism,
            sensitivity: calibration.sensitivity,
            noise_scale: calibration.scale,
            noise_std: calibration.noise_std,
            rho_spent: calibration.cost,
            epsilon: calibration.epsilon,
            delta: calibration.delta,
            budget_remaining: charge.remaining,
            answered_at: now,
        };
        let sealed = SignedEnvelope::seal(Purpose::NodeAnswer, &self.identity, &answer)
            .map_err(|e| internal("signing", &e))?;
        let encoded =
            renkei_protocol::codec::encode(&sealed).map_err(|e| internal("encoding", &e))?;
        self.ledger
            .record_answer(&researcher, &request.request_id, encoded)
            .map_err(|e| internal("recording the answer", &e))?;
        info!(
            target: AUDIT,
            request = %request.request_id,
            researcher = %researcher,
            study = %request.study,
            query = %request.query,
            rho = %calibration.cost,
            spent = %charge.spent,
            suppressed,
            "answered"
        );
        Ok(QueryResponse::Answered(sealed))
    }

    /// Marks a request as being answered; refuses a second copy arriving meanwhile.
    fn hold(
        &self,
        researcher: &renkei_protocol::PublicKey,
        request: &QueryRequest,
    ) -> Result<AnsweringGuard<'_>, Refusal> {
        let mut key = [0u8; 48];
        key[..32].copy_from_slice(researcher.as_bytes());
        key[32..].copy_from_slice(&request.request_id.0);
        let mut set = self.answering.lock().map_err(|_| {
            Refusal::new(
                RefusalCode::Internal,
                "the node's request table is unusable",
            )
        })?;
        if !set.insert(key) {
            return Err(Refusal::new(
                RefusalCode::Overloaded,
                format!(
                    "request {} is being answered right now; resend it to get the same answer",
                    request.request_id
                ),
            ));
        }
        Ok(AnsweringGuard {
            set: &self.answering,
            key,
        })
    }
}

/// A request that passed every check that costs nothing.
#[derive(Debug)]
struct Checked {
    digest: [u8; 32],
    researcher: renkei_protocol::PublicKey,
    request: QueryRequest,
    compiled: cohort::CompiledQuery,
    calibration: Calibration,
    grant: renkei_policies::Grant,
}
