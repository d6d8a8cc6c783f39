//! The desk: everything between a request's bytes and the node's reply, for queries and for
//! policy offers.
//!
//! A query, in order: decode the envelope; verify the researcher's signature over the exact
//! received payload; check the signer is a known, unrevoked researcher; decode the request;
//! check it is addressed to this node and within its time window; ask the active policy
//! whether this query is within the study's terms; bind the query to the schema; calibrate the
//! mechanism and compute its cost (checked against the per-query limit); count; add noise;
//! withhold a cell below the minimum; admit it at the ledger, which charges and records the
//! signed answer in one transaction (or returns the answer recorded for this very request
//! before); write the audit entry; make all of it durable with one fsync; reply. A request
//! the ledger would refuse, or has answered before, is decided before the data is touched.
//! A failure before the transaction spends nothing; after it, nothing was sent, the charge
//! may stand, and a resend returns the recorded answer. Every failure becomes a [`Refusal`] with its own code, and every decision an
//! entry in the audit log.
//!
//! A secure round ([`QueryRequest::secure`]) differs only in the release: its participants
//! (the audience, all member nodes) are checked, the noise is a share sized for the total
//! ([`crate::secure`]), and the numbers leave under pairwise masks; a study that allows only
//! secure totals refuses per-site requests. A round that survives dropouts
//! (`dropouts > 0`) adds the node's own mask too, and is finished by the two steps of an
//! [`UnmaskRequest`] ([`QueryDesk::unmask`]), verified like a query: settle (one set of
//! survivors per round, on disk and audited before the pairwise masks toward the dropped
//! nodes leave) and reveal (the own mask, against every survivor's commitment).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use renkei_policies::{Grant, SignedPolicy, VerifiedPolicy};
use renkei_protocol::codec::EncodedRequest;
use renkei_protocol::envelope::Signature;
use renkei_protocol::limits::{
    MAX_AUDIENCE, MAX_CLOCK_SKEW_SECS, MAX_REQUEST_BYTES, MAX_REQUEST_LIFETIME_SECS,
    MAX_RESPONSE_BYTES,
};
use renkei_protocol::messages::{
    commitment_message, hide_under_masks, request_digest, round_context, survivors_digest,
};
use renkei_protocol::{
    Answer, MicroRho, PolicyResponse, PolicyTransfer, PrivacyRequest, PublicKey, Purpose,
    QueryRequest, QueryResponse, Quote, Refusal, RefusalCode, Release, RequestId, SecretKey,
    SignedEnvelope, UnmaskRequest, Unmasking,
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use renkei_engine::{CompiledQuery, Dataset, Exact, NoisyPart};

use crate::audit::{AuditEvent, AuditLog, hex_hash};
use crate::dp::Calibration;
use crate::error::NodeError;
use crate::governance::{Offered, PolicyKeeper};
use crate::ledger::{Admission, Charge, ChargeRequest, PrivacyLedger, scoped_key};
use crate::secure;
use crate::store::FlushPromise;

/// Audit events also go to their own tracing target.
const AUDIT: &str = "renkei::audit";

/// Everything a node needs to answer. Shared by the service's request tasks.
#[derive(Debug)]
pub struct QueryDesk {
    identity: SecretKey,
    node_key: PublicKey,
    policy: PolicyKeeper,
    /// The in-memory image queries run on; replaced whole when data is loaded while serving.
    dataset: RwLock<Arc<Dataset>>,
    /// Set when a load wrote data but no fresh image could be made: answer nothing.
    stale: AtomicBool,
    ledger: PrivacyLedger,
    audit: AuditLog,
    /// Requests (researcher key || request id) being answered right now, so a second copy
    /// arriving meanwhile is turned away instead of doing the work again (the ledger's
    /// transaction is what guarantees one answer per charge).
    answering: Mutex<HashSet<[u8; 48]>>,
    /// Pairwise secrets with other nodes, for secure rounds' masks.
    pair_secrets: secure::PairSecrets,
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

/// What is known about a request when it is refused, for the audit log.
#[derive(Debug, Default)]
struct Known {
    researcher: Option<PublicKey>,
    study: Option<String>,
    request_id: Option<RequestId>,
    digest: Option<[u8; 32]>,
}

/// A request that passed every check that costs nothing.
#[derive(Debug)]
struct Checked {
    digest: [u8; 32],
    researcher: PublicKey,
    request: QueryRequest,
    /// The image the query was compiled against, and is evaluated on.
    dataset: Arc<Dataset>,
    compiled: CompiledQuery,
    /// One mechanism per released quantity (two for a mean: sum and count).
    calibrations: Vec<Calibration>,
    /// Their total cost.
    cost: MicroRho,
    grant: Grant,
    /// For a secure round: every participating node's key, sorted.
    participants: Option<Vec<PublicKey>>,
}

impl QueryDesk {
    pub fn new(
        identity: SecretKey,
        policy: PolicyKeeper,
        dataset: Dataset,
        ledger: PrivacyLedger,
        audit: AuditLog,
    ) -> Self {
        Self {
            node_key: identity.public_key(),
            identity,
            policy,
            dataset: RwLock::new(Arc::new(dataset)),
            stale: AtomicBool::new(false),
            ledger,
            audit,
            answering: Mutex::new(HashSet::new()),
            pair_secrets: secure::PairSecrets::default(),
        }
    }

    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }

    /// The active policy.
    pub fn policy(&self) -> Option<Arc<VerifiedPolicy>> {
        self.policy.active()
    }

    /// The current data image.
    pub fn dataset(&self) -> Arc<Dataset> {
        match self.dataset.read() {
            Ok(image) => Arc::clone(&image),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Carries out a load (or a consent change) on the node's own store; see
    /// [`crate::control`]. Blocking; the image is not refreshed here.
    pub fn load(
        &self,
        request: &crate::control::ControlRequest,
        done: &mut dyn FnMut(String),
    ) -> Result<(), NodeError> {
        request.run(self.ledger.store(), done)
    }

    /// Loads a fresh image from the store and puts it in place of the current one (queries
    /// already running finish on the old image). Blocking.
    /// If it fails, the node refuses every query until an image loads (a withdrawn consent
    /// must never be answered from the old one).
    pub fn refresh_dataset(&self) -> Result<(), NodeError> {
        let store = self.ledger.store();
        let fresh = match store
            .schema()
            .and_then(|schema| crate::image::load(store, Arc::new(schema)))
        {
            Ok(fresh) => Arc::new(fresh),
            Err(e) => {
                self.stale.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        match self.dataset.write() {
            Ok(mut image) => *image = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        self.stale.store(false, Ordering::SeqCst);
        Ok(())
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Appends to the audit log; a failure is logged, never hidden behind the answer.
    fn record(&self, now: u64, event: AuditEvent) {
        if let Err(e) = self.audit.append(now, event) {
            warn!("audit log append failed: {e}");
        }
    }

    fn record_refusal(&self, now: u64, known: Known, refusal: &Refusal) {
        info!(target: AUDIT, code = %refusal.code, reason = %refusal.reason, "refused");
        self.record(
            now,
            AuditEvent::QueryRefused {
                researcher: known.researcher,
                study: known.study,
                request_id: known.request_id.map(|id| id.to_string()),
                query_hash: known.digest.as_ref().map(hex_hash),
                code: refusal.code,
            },
        );
    }

    /// Answers one query (or finishes a recoverable secure round). Never panics, never
    /// returns without a reply.
    pub async fn handle(self: Arc<Self>, request: EncodedRequest, now: u64) -> QueryResponse {
        let mut known = Known::default();
        let checked = match self.check(&request, now, &mut known) {
            Ok(checked) => checked,
            // Not signed as a query: it may be a step of a recoverable secure round (tried
            // only here, so queries never pay for a second signature check).
            Err(refusal)
                if refusal.code == RefusalCode::BadSignature && known.researcher.is_none() =>
            {
                match request.decode() {
                    Ok(envelope) if envelope.verify(Purpose::UnmaskRequest).is_ok() => {
                        return self.unmask_blocking(envelope, now).await;
                    }
                    _ => {
                        self.record_refusal(now, known, &refusal);
                        return QueryResponse::Refused(refusal);
                    }
                }
            }
            Err(refusal) => {
                self.record_refusal(now, known, &refusal);
                return QueryResponse::Refused(refusal);
            }
        };
        if checked.request.dry_run {
            return self.quote(checked, now);
        }
        let desk = Arc::clone(&self);
        // sled's fsync and opendp's sampler block; opendp measurements are not Send, so the
        // whole release runs on one blocking thread.
        match tokio::task::spawn_blocking(move || desk.charge_and_release(checked, now)).await {
            Ok(response) => response,
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
    fn check(
        &self,
        request: &EncodedRequest,
        now: u64,
        known: &mut Known,
    ) -> Result<Checked, Refusal> {
        let envelope = request.decode().map_err(|e| {
            Refusal::new(
                RefusalCode::MalformedRequest,
                format!("request envelope: {e}"),
            )
        })?;
        let payload = envelope
            .verify(Purpose::QueryRequest)
            .map_err(|e| Refusal::new(RefusalCode::BadSignature, e.to_string()))?;
        let researcher = envelope.signer;
        known.researcher = Some(researcher);
        let Some(policy) = self.policy.active() else {
            return Err(Refusal::new(
                RefusalCode::Internal,
                "this node has no active policy yet",
            ));
        };
        // Only a known researcher's payload is decoded.
        let bundle = policy.bundle();
        if bundle.researcher(&researcher).is_none() && !bundle.revoked.contains(&researcher) {
            return Err(Refusal::new(
                RefusalCode::UnknownResearcher,
                format!(
                    "key {researcher} is not a researcher in policy v{} ({})",
                    bundle.version, bundle.consortium
                ),
            ));
        }
        let request: QueryRequest =
            renkei_protocol::codec::decode_limited(payload, MAX_REQUEST_BYTES).map_err(|e| {
                Refusal::new(
                    RefusalCode::MalformedRequest,
                    format!("signed request: {e}"),
                )
            })?;
        let digest = request_digest(payload);
        known.study = Some(request.study.clone());
        known.request_id = Some(request.request_id);
        known.digest = Some(digest);
        match request.policy_version {
            Some(asked) if asked != bundle.version => {
                return Err(Refusal::new(
                    RefusalCode::PolicyVersionMismatch,
                    format!(
                        "the request is made under policy v{asked}; this node runs v{} ({}); ask again under the node's version",
                        bundle.version, bundle.consortium
                    ),
                ));
            }
            None if request.secure => {
                return Err(Refusal::new(
                    RefusalCode::MalformedRequest,
                    "a secure round must name the policy version its nodes share",
                ));
            }
            _ => {}
        }
        if request.dropouts > 0 && !request.secure {
            return Err(Refusal::new(
                RefusalCode::MalformedRequest,
                "dropouts apply to secure rounds only",
            ));
        }
        if request.audience.len() > MAX_AUDIENCE {
            return Err(Refusal::new(
                RefusalCode::MalformedRequest,
                format!("a request may name at most {MAX_AUDIENCE} nodes"),
            ));
        }
        if !request.audience.contains(&self.node_key) {
            return Err(Refusal::new(
                RefusalCode::NotAddressedToThisNode,
                "this request is not addressed to this node; sign one that names it",
            ));
        }
        if request.expires_at.saturating_add(MAX_CLOCK_SKEW_SECS) <= now {
            return Err(Refusal::new(
                RefusalCode::Expired,
                format!(
                    "request expired at {} and node time is {now}; sign a new one (if it was just signed, check your clock)",
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
        request
            .query
            .check_shape()
            .map_err(|e| Refusal::new(RefusalCode::MalformedRequest, e.to_string()))?;
        let grant = policy.authorize(&researcher, &request.study, &request.query, now)?;
        if self.stale.load(Ordering::SeqCst) {
            return Err(Refusal::new(
                RefusalCode::Internal,
                "this node could not reload its data after a load and answers nothing until it is restarted",
            ));
        }
        let dataset = self.dataset();
        let compiled = dataset
            .compile(&request.query)
            .map_err(|e| Refusal::new(RefusalCode::InvalidQuery, e.to_string()))?;
        let out_of_range = |e: crate::dp::DpError| {
            Refusal::new(RefusalCode::PrivacyParameterOutOfRange, e.to_string())
        };
        let participants = if request.secure {
            let participants = secure_participants(&request, bundle, &grant)?;
            // Agree with every peer now, so a key unusable for masks is refused before any
            // charge (and the round's release only runs the cheap part).
            self.pair_secrets
                .prepare(&self.identity, &participants)
                .map_err(|(key, e)| {
                    Refusal::new(
                        RefusalCode::MalformedRequest,
                        format!("participant {key} cannot take part in a secure round: {e}"),
                    )
                })?;
            Some(participants)
        } else if !grant.per_site_answers {
            return Err(Refusal::new(
                RefusalCode::SecureAggregationRequired,
                format!(
                    "study `{}` allows only secure totals (no hospital's own answer is released); ask for a secure round",
                    request.study
                ),
            ));
        } else {
            None
        };
        if compiled.vector() && matches!(request.privacy, PrivacyRequest::PureDp { .. }) {
            return Err(Refusal::new(
                RefusalCode::PrivacyParameterOutOfRange,
                "histograms, quantiles and GROUP BY are released under zCDP only; ask with a rho",
            ));
        }
        let parts = compiled.parts();
        let calibrations = match &participants {
            Some(participants) => {
                let PrivacyRequest::Zcdp { rho } = request.privacy else {
                    return Err(Refusal::new(
                        RefusalCode::PrivacyParameterOutOfRange,
                        "secure totals add distributed discrete Gaussian noise under zCDP; ask with a rho",
                    ));
                };
                // Each part gets its share of the rho and a noise share sized for the total.
                renkei_engine::statistic::split_budget(rho.0, parts.len())
                    .into_iter()
                    .zip(&parts)
                    .map(|(rho, part)| {
                        secure::share_calibration(
                            MicroRho(rho),
                            part.sensitivity,
                            part.len,
                            participants.len(),
                            grant.secure_colluders as usize,
                            request.dropouts as usize,
                            grant.report_delta,
                        )
                        .map_err(out_of_range)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => Calibration::split(
                request.privacy,
                &parts.iter().map(|p| p.sensitivity).collect::<Vec<_>>(),
                grant.report_delta,
            )
            .map_err(out_of_range)?,
        };
        let cost = MicroRho(calibrations.iter().map(|c| c.cost.0).sum());
        grant.check_cost(cost)?;
        Ok(Checked {
            digest,
            researcher,
            request,
            dataset,
            compiled,
            calibrations,
            cost,
            grant,
            participants,
        })
    }

    /// [`QueryDesk::unmask`] on a blocking thread (settling the survivors is a write made
    /// durable before replying).
    async fn unmask_blocking(self: Arc<Self>, envelope: SignedEnvelope, now: u64) -> QueryResponse {
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

    /// Counts, draws noise and signs, then charges and records the answer in one ledger
    /// transaction, audits and fsyncs; a refusal is audited too. Blocking.
    fn charge_and_release(&self, checked: Checked, now: u64) -> QueryResponse {
        let known = Known {
            researcher: Some(checked.researcher),
            study: Some(checked.request.study.clone()),
            request_id: Some(checked.request.request_id),
            digest: Some(checked.digest),
        };
        match self.release(checked, now) {
            Ok(response) => response,
            Err(refusal) => {
                self.record_refusal(now, known, &refusal);
                QueryResponse::Refused(refusal)
            }
        }
    }

    fn release(&self, checked: Checked, now: u64) -> Result<QueryResponse, Refusal> {
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
            dataset,
            compiled,
            calibrations,
            cost,
            grant,
            participants,
        } = checked;
        let _guard = self.hold(&researcher, &request.request_id)?;
        let charging = charge_request(&researcher, &request, &digest, cost, &grant);
        // Refused or answered before: decided without touching the data (its scan time
        // would otherwise be a signal nobody pays for).
        let stored = self
            .ledger
            .precheck(&charging)
            .map_err(|e| internal("ledger", &e))??;
        // Answers being computed at the same time share the fsync that makes them durable.
        let durable = self.ledger.expect_durable();
        let send = |encoded, charge, durable| {
            self.send_recorded(
                encoded,
                charge,
                durable,
                cost,
                &researcher,
                &request,
                &digest,
                now,
            )
        };
        if let Some(encoded) = stored {
            return send(encoded, None, durable);
        }
        // The noise is drawn before the charge; nothing leaves the node until the charge and
        // this answer are on disk together.
        let exact = dataset.evaluate(&compiled);
        let main = &calibrations[0];
        let release = match &participants {
            Some(participants) => self
                .masked_release(
                    &compiled,
                    exact,
                    &calibrations,
                    participants,
                    &round_context(&researcher, &digest),
                    request.dropouts > 0,
                )
                .map_err(|e| internal("secure contribution", &e))?,
            None => plain_release(&compiled, exact, &calibrations, grant.min_cell_size)
                .map_err(|e| internal("noise", &e))?,
        };
        let answer_for = |charge: Charge| -> Result<Vec<u8>, NodeError> {
            let answer = Answer {
                request_id: request.request_id,
                request_digest: digest,
                release: release.clone(),
                value_scale: compiled.value_scale(),
                min_cell_size: if compiled.counts() {
                    grant.min_cell_size
                } else {
                    0
                },
                mechanism: main.mechanism,
                sensitivity: main.sensitivity,
                noise_scale: main.scale,
                noise_std: main.noise_std,
                count_noise_std: calibrations.get(1).map(|c| c.noise_std),
                rho_spent: cost,
                epsilon: calibrations.iter().map(|c| c.epsilon).sum(),
                delta: calibrations.iter().map(|c| c.delta).sum(),
                budget_remaining: charge.remaining,
                answered_at: now,
            };
            // Runs inside the ledger's transaction: no store access here.
            let sealed = SignedEnvelope::seal(Purpose::NodeAnswer, &self.identity, &answer)?;
            let bytes = renkei_protocol::codec::encode(&sealed)?;
            if bytes.len() > MAX_RESPONSE_BYTES {
                return Err(NodeError::Answer(format!(
                    "{} bytes, more than the {MAX_RESPONSE_BYTES} an answer may take",
                    bytes.len()
                )));
            }
            Ok(bytes)
        };
        let admission = self
            .ledger
            .admit(charging, &answer_for)
            .map_err(|e| internal("ledger", &e))??;
        let (encoded, charge) = match admission {
            // Answered before (a copy raced this one): the same answer, never fresh noise.
            Admission::Answered(bytes) => (bytes, None),
            Admission::Recorded { charge, answer } => (answer, Some(charge)),
        };
        send(encoded, charge, durable)
    }

    /// Audits a recorded answer, makes it durable (with its charge, if `charge` is this
    /// delivery's) and returns it to send. A failure here sends nothing; the charge may
    /// stand, and a resend returns the recorded answer.
    #[allow(clippy::too_many_arguments)]
    fn send_recorded(
        &self,
        encoded: Vec<u8>,
        charge: Option<Charge>,
        durable: FlushPromise,
        cost: MicroRho,
        researcher: &PublicKey,
        request: &QueryRequest,
        digest: &[u8; 32],
        now: u64,
    ) -> Result<QueryResponse, Refusal> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            warn!("{what}: {e}");
            Refusal::new(
                RefusalCode::Internal,
                format!(
                    "{what} failed on the node; nothing was sent (a charge may stand: resend the same request to get its answer)"
                ),
            )
        };
        self.record(
            now,
            AuditEvent::QueryAnswered {
                researcher: *researcher,
                study: request.study.clone(),
                request_id: request.request_id.to_string(),
                query_hash: hex_hash(digest),
                rho: cost,
                answer_hash: hex_hash(&Sha256::digest(&encoded).into()),
                resent: charge.is_none(),
            },
        );
        // One fsync makes the charge, the answer and the audit entry durable before sending.
        durable
            .flush()
            .map_err(|e| failed("recording the answer", &e))?;
        let sealed: SignedEnvelope =
            renkei_protocol::codec::decode_limited(&encoded, MAX_RESPONSE_BYTES)
                .map_err(|e| failed("reading the recorded answer", &e))?;
        if let Some(charge) = charge {
            info!(
                target: AUDIT,
                request = %request.request_id,
                researcher = %researcher,
                study = %request.study,
                query = %request.query,
                rho = %cost,
                spent = %charge.spent,
                "answered"
            );
        }
        Ok(QueryResponse::Answered(sealed))
    }

    /// A dry run's reply: what the checked request would cost and what the budget holds,
    /// or the refusal its charge would meet. Spends nothing and consumes no nonce.
    fn quote(&self, checked: Checked, now: u64) -> QueryResponse {
        let Checked {
            digest,
            researcher,
            request,
            calibrations,
            cost,
            grant,
            ..
        } = checked;
        let quoted = self.ledger.quote(&charge_request(
            &researcher,
            &request,
            &digest,
            cost,
            &grant,
        ));
        let known = Known {
            researcher: Some(researcher),
            study: Some(request.study.clone()),
            request_id: Some(request.request_id),
            digest: Some(digest),
        };
        match quoted {
            Err(e) => {
                warn!("ledger: {e}");
                QueryResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "reading the ledger failed on the node; nothing was spent",
                ))
            }
            Ok(Err(refusal)) => {
                self.record_refusal(now, known, &refusal);
                QueryResponse::Refused(refusal)
            }
            Ok(Ok(budget_remaining)) => {
                self.record(
                    now,
                    AuditEvent::QueryQuoted {
                        researcher,
                        study: request.study.clone(),
                        request_id: request.request_id.to_string(),
                        query_hash: hex_hash(&digest),
                        rho: cost,
                    },
                );
                let main = &calibrations[0];
                QueryResponse::Quoted(Quote {
                    request_id: request.request_id,
                    request_digest: digest,
                    rho: cost,
                    epsilon: calibrations.iter().map(|c| c.epsilon).sum(),
                    delta: calibrations.iter().map(|c| c.delta).sum(),
                    mechanism: main.mechanism,
                    noise_std: main.noise_std,
                    budget_remaining,
                })
            }
        }
    }

    /// A secure round's contribution: the exact numbers plus this node's noise share, under
    /// the pairwise masks of `participants` for this round (`context`: its
    /// [`round_context`]), and this node's own mask in a round that survives dropouts.
    fn masked_release(
        &self,
        compiled: &CompiledQuery,
        exact: Exact,
        calibrations: &[Calibration],
        participants: &[PublicKey],
        context: &[u8; 32],
        own_mask: bool,
    ) -> Result<Release, NodeError> {
        // Every part's noisy numbers, in order, as one vector of words.
        let mut noisy = Vec::new();
        for (values, mechanism) in exact.0.into_iter().zip(calibrations) {
            noisy.extend(mechanism.release(values)?);
        }
        let shape = compiled.statistic().masked_shape();
        let mut masks =
            self.pair_secrets
                .masks(&self.identity, participants, context, noisy.len())?;
        if own_mask {
            let own = secure::own_mask(&self.identity, context, noisy.len())?;
            for (mask, own) in masks.iter_mut().zip(own) {
                *mask = mask.wrapping_add(own);
            }
        }
        Ok(Release::Masked {
            shape,
            words: hide_under_masks(&noisy, &masks),
        })
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

    /// Marks a request as being answered; refuses a second copy arriving meanwhile.
    fn hold(
        &self,
        researcher: &PublicKey,
        request_id: &RequestId,
    ) -> Result<AnsweringGuard<'_>, Refusal> {
        let key = scoped_key(researcher, &request_id.0);
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
                    "request {request_id} is being answered right now; resend it to get the same answer"
                ),
            ));
        }
        Ok(AnsweringGuard {
            set: &self.answering,
            key,
        })
    }

    /// Decides a policy bundle offered by `source` (a peer id, or a file at start-up). Blocking.
    pub fn offer_policy(&self, signed: &SignedPolicy, source: &str, now: u64) -> PolicyResponse {
        match self.policy.offer(signed) {
            Ok(Ok(Offered::Accepted { policy, previous })) => {
                let (version, hash) = (policy.bundle().version, policy.hash());
                info!(target: AUDIT, version, hash = %policy.hash_hex(), %source, "policy activated");
                self.record(
                    now,
                    AuditEvent::PolicyActivated {
                        version,
                        hash: policy.hash_hex(),
                        previous_version: previous,
                        source: source.to_string(),
                    },
                );
                PolicyResponse::Accepted { version, hash }
            }
            Ok(Ok(Offered::AlreadyActive(policy))) => PolicyResponse::AlreadyActive {
                version: policy.bundle().version,
                hash: policy.hash(),
            },
            Ok(Err(refusal)) => {
                info!(target: AUDIT, code = %refusal.code, reason = %refusal.reason, %source, "policy refused");
                self.record(
                    now,
                    AuditEvent::PolicyRefused {
                        code: refusal.code,
                        source: source.to_string(),
                    },
                );
                PolicyResponse::Refused(refusal)
            }
            Err(e) => {
                warn!("storing a policy failed: {e}");
                PolicyResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "the node could not store the bundle",
                ))
            }
        }
    }

    /// The active bundle, for peers that fetch it.
    pub fn active_policy_transfer(&self) -> Result<Option<PolicyTransfer>, NodeError> {
        self.policy.active_transfer()
    }
}

/// A per-site release: full noise on each number, each part by its own mechanism; a noisy
/// count below the minimum cell size is withheld (post-processing, free).
fn plain_release(
    compiled: &CompiledQuery,
    exact: Exact,
    calibrations: &[Calibration],
    min_cell_size: u64,
) -> Result<Release, crate::dp::DpError> {
    let min_cell = i64::try_from(min_cell_size).unwrap_or(i64::MAX);
    let noisy = exact
        .0
        .into_iter()
        .zip(compiled.parts())
        .zip(calibrations)
        .map(|((values, part), mechanism)| {
            let noisy = mechanism.release(values)?;
            let withhold = |n: i64| part.counts && min_cell_size > 0 && n < min_cell;
            let suppressed: Vec<bool> = noisy.iter().map(|n| withhold(*n)).collect();
            Ok(NoisyPart {
                values: noisy
                    .iter()
                    .zip(&suppressed)
                    .map(|(n, s)| if *s { 0 } else { *n })
                    .collect(),
                suppressed,
            })
        })
        .collect::<Result<Vec<_>, crate::dp::DpError>>()?;
    Ok(compiled.statistic().release(noisy))
}

/// The nodes of a secure round: the request's audience, each a member node of the policy
/// (a key outside the consortium could be one whose masks the aggregator knows), and at
/// least two more than the policy's tolerated colluders.
fn secure_participants(
    request: &QueryRequest,
    bundle: &renkei_policies::PolicyBundle,
    grant: &Grant,
) -> Result<Vec<PublicKey>, Refusal> {
    let mut participants = request.audience.clone();
    participants.sort();
    participants.dedup();
    if participants.len() != request.audience.len() {
        return Err(Refusal::new(
            RefusalCode::MalformedRequest,
            "a secure round's audience names a node twice",
        ));
    }
    for key in &participants {
        let member = key
            .to_peer_id()
            .ok()
            .and_then(|peer| bundle.member(&peer).map(|_| ()));
        if member.is_none() {
            return Err(Refusal::new(
                RefusalCode::MalformedRequest,
                format!(
                    "secure round participant {key} is not a member node in policy v{}; only member nodes may share masks",
                    bundle.version
                ),
            ));
        }
    }
    // With one honest node, the colluders and the aggregator could subtract everything
    // else and read that node's own answer: at least two must remain, after the dropouts
    // the round is asked to survive.
    let colluders = grant.secure_colluders as usize;
    let dropouts = request.dropouts as usize;
    let needed = colluders.saturating_add(2).saturating_add(dropouts);
    if participants.len() < needed {
        return Err(Refusal::new(
            RefusalCode::PrivacyParameterOutOfRange,
            format!(
                "a secure total needs at least {needed} nodes (two more than the {colluders} the policy lets collude, plus the {dropouts} dropouts it is to survive); this one names {}",
                participants.len()
            ),
        ));
    }
    Ok(participants)
}

/// The ledger's view of a checked request.
fn charge_request<'a>(
    researcher: &'a PublicKey,
    request: &'a QueryRequest,
    digest: &'a [u8; 32],
    cost: MicroRho,
    grant: &Grant,
) -> ChargeRequest<'a> {
    ChargeRequest {
        researcher,
        study: &request.study,
        request_id: &request.request_id,
        nonce: &request.nonce,
        digest,
        expires_at: request.expires_at,
        cost,
        budget: grant.budget_per_researcher,
        study_budget: grant.study_budget,
        dataset_budget: grant.dataset_budget,
    }
}
