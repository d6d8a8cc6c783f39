//! The query desk: everything between a request's bytes and the node's reply.
//!
//! In order: decode the envelope; verify the researcher's signature over the exact received
//! payload; decode the request; check its time window; ask the policy whether this
//! researcher may spend this much on this study; bind the query to the schema; calibrate the
//! mechanism and compute its cost; charge the ledger durably; count; add noise; sign. Any
//! failure before the charge spends nothing; any failure after it keeps the charge. Every
//! failure becomes a [`Refusal`] with its own code.

use std::sync::Arc;

use renkei_policies::VerifiedPolicy;
use renkei_protocol::codec::EncodedRequest;
use renkei_protocol::limits::{MAX_CLOCK_SKEW_SECS, MAX_REQUEST_BYTES, MAX_REQUEST_LIFETIME_SECS};
use renkei_protocol::messages::request_digest;
use renkei_protocol::{
    Answer, Mechanism, Purpose, QueryRequest, QueryResponse, Refusal, RefusalCode, SecretKey,
    SignedEnvelope,
};
use tracing::{info, warn};

use crate::cohort::{self, Cohort};
use crate::dp::Calibration;
use crate::ledger::{ChargeRequest, PrivacyLedger};

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
        let grant = self
            .policy
            .authorize(&envelope.signer, &request.study, request.rho)?;
        request
            .query
            .check_shape()
            .map_err(|e| Refusal::new(RefusalCode::MalformedRequest, e.to_string()))?;
        let compiled = cohort::compile(&request.query)
            .map_err(|e| Refusal::new(RefusalCode::InvalidQuery, e.to_string()))?;
        let calibration = Calibration::for_budget(COUNT_SENSITIVITY, request.rho)
            .map_err(|e| Refusal::new(RefusalCode::PrivacyParameterOutOfRange, e.to_string()))?;
        Ok(Checked {
            digest: request_digest(payload),
            researcher: envelope.signer,
            request,
            compiled,
            calibration,
            budget: grant.budget,
        })
    }

    /// Charges durably, then counts and draws noise, then signs. Blocking.
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
            budget,
        } = checked;
        let charge = self
            .ledger
            .charge(ChargeRequest {
                researcher: &researcher,
                study: &request.study,
                nonce: &request.nonce,
                expires_at: request.expires_at,
                cost: calibration.cost,
                budget,
            })
            .map_err(|e| internal("ledger", &e))?
            .inspect_err(|refusal| {
                info!(target: AUDIT, request = %request.request_id, code = %refusal.code, "refused at the ledger");
            })?;
        let true_count = self.cohort.count(&compiled);
        let noisy = calibration
            .release(i64::try_from(true_count).unwrap_or(i64::MAX))
            .map_err(|e| internal("noise", &e))?;
        let answer = Answer {
            request_id: request.request_id,
            request_digest: digest,
            value: noisy,
            mechanism: Mechanism::DiscreteGaussian,
            sensitivity: calibration.sensitivity,
            noise_scale: calibration.scale,
            rho_spent: calibration.cost,
            budget_remaining: charge.remaining,
            answered_at: now,
        };
        let sealed = SignedEnvelope::seal(Purpose::NodeAnswer, &self.identity, &answer)
            .map_err(|e| internal("signing", &e))?;
        info!(
            target: AUDIT,
            request = %request.request_id,
            researcher = %researcher,
            study = %request.study,
            query = %request.query,
            rho = %calibration.cost,
            spent = %charge.spent,
            "answered"
        );
        Ok(QueryResponse::Answered(sealed))
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
    budget: renkei_protocol::MicroRho,
}
