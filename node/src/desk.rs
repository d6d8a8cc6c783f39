//! The desk: everything between a request's bytes and the node's reply, for queries and for
//! policy offers.
//!
//! The parts, one file per operation: [`verify`] (envelope, signature, signer, addressing,
//! timing, policy terms), [`plan`] (bind to the image, participants, one mechanism per
//! released part, cost), [`release`] (count, noise, charge and record, audit, fsync, reply),
//! [`quote`] (dry runs), [`unmask`] (finishing a recoverable secure round) and [`policy`]
//! (bundles offered and fetched).
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
//! ([`crate::privacy::secure`]), and the numbers leave under pairwise masks; a study that allows only
//! secure totals refuses per-site requests. A round that survives dropouts
//! (`dropouts > 0`) adds the node's own mask too, and is finished by the two steps of an
//! [`renkei_protocol::UnmaskRequest`] ([`unmask`]), verified like a query: settle (one set of
//! survivors per round, on disk and audited before the pairwise masks toward the dropped
//! nodes leave) and reveal (the own mask, against every survivor's commitment).

mod plan;
mod policy;
mod quote;
mod release;
mod unmask;
mod verify;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use renkei_engine::{CompiledQuery, Dataset};
use renkei_policies::{Grant, VerifiedPolicy};
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    MicroRho, PublicKey, Purpose, QueryRequest, QueryResponse, Refusal, RefusalCode, RequestId,
    SecretKey,
};
use tracing::{info, warn};

use crate::audit::{AuditEvent, AuditLog, NoiseCount, hex_hash};
use crate::error::NodeError;
use crate::governance::PolicyKeeper;
use crate::privacy::dp::Calibration;
use crate::privacy::ledger::{ChargeRequest, FitLink, PrivacyLedger, scoped_key};
use crate::privacy::secure;

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
    /// Requests from no known researcher since the last summary, per sender.
    noise: Mutex<NoiseTally>,
}

/// Most senders a summary of unauthenticated requests lists one by one.
const MAX_NOISE_SENDERS: usize = 256;

/// Unauthenticated requests counted since `since`.
#[derive(Debug, Default)]
struct NoiseTally {
    since: Option<u64>,
    senders: std::collections::BTreeMap<String, NoiseCount>,
    others: u64,
}

/// A reply and whether its request came from no known researcher (noise, which the network
/// layer rate-limits per peer).
#[derive(Debug)]
pub struct Handled {
    pub response: QueryResponse,
    pub unauthenticated: bool,
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
    /// How the request belongs to a logistic fit.
    fit: FitLink,
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
            noise: Mutex::new(NoiseTally::default()),
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

    /// Whether `key` is a researcher (or a revoked one) in the active policy.
    fn is_researcher(&self, key: &PublicKey) -> bool {
        self.policy.active().is_some_and(|policy| {
            let bundle = policy.bundle();
            bundle.researcher(key).is_some() || bundle.revoked.contains(key)
        })
    }

    /// Counts a request from no known researcher for the next summary (never one audit
    /// entry each: anyone can send them).
    fn count_noise(&self, sender: &str, code: RefusalCode, now: u64) {
        tracing::debug!(%sender, %code, "unauthenticated request refused");
        let Ok(mut tally) = self.noise.lock() else {
            return;
        };
        tally.since.get_or_insert(now);
        if !tally.senders.contains_key(sender) && tally.senders.len() >= MAX_NOISE_SENDERS {
            tally.others += 1;
            return;
        }
        let count = tally
            .senders
            .entry(sender.to_string())
            .or_insert_with(|| NoiseCount {
                peer: sender.to_string(),
                ..NoiseCount::default()
            });
        // Only these three codes reach here (see `handle`): undecodable requests,
        // signatures that do not verify, unknown signers.
        if code == RefusalCode::BadSignature {
            count.bad_signature += 1;
        } else if code == RefusalCode::UnknownResearcher {
            count.unknown_signer += 1;
        } else {
            count.malformed += 1;
        }
    }

    /// Writes one audit entry summing up the unauthenticated requests counted since the
    /// last one (none when there were none). The network calls it periodically and at
    /// shutdown.
    pub fn audit_noise_summary(&self, now: u64) {
        let tally = match self.noise.lock() {
            Ok(mut tally) => std::mem::take(&mut *tally),
            Err(_) => return,
        };
        let Some(since) = tally.since else {
            return;
        };
        let senders: Vec<NoiseCount> = tally.senders.into_values().collect();
        let total: u64 = senders.iter().map(NoiseCount::total).sum::<u64>() + tally.others;
        info!(target: AUDIT, total, senders = senders.len(), "unauthenticated requests refused");
        self.record(
            now,
            AuditEvent::UnauthenticatedRequests {
                since,
                until: now,
                senders,
                others: tally.others,
            },
        );
    }

    /// Answers one query from `sender` (a peer id, for the noise summary), or finishes a
    /// recoverable secure round, and says whether the request came from no known
    /// researcher. Never panics, never returns without a reply.
    pub async fn handle(
        self: Arc<Self>,
        request: EncodedRequest,
        now: u64,
        sender: &str,
    ) -> Handled {
        let mut known = Known::default();
        let checked = match self.check(&request, now, &mut known) {
            Ok(checked) => checked,
            // Not signed as a query: it may be a step of a recoverable secure round (tried
            // only here, so queries never pay for a second signature check).
            Err(refusal)
                if refusal.code == RefusalCode::BadSignature && known.researcher.is_none() =>
            {
                match request.decode() {
                    Ok(envelope)
                        if envelope.verify(Purpose::UnmaskRequest).is_ok()
                            && self.is_researcher(&envelope.signer) =>
                    {
                        return Handled {
                            response: self.unmask_blocking(envelope, now).await,
                            unauthenticated: false,
                        };
                    }
                    // Signed as an unmasking by a key the policy does not know: noise.
                    Ok(envelope) if envelope.verify(Purpose::UnmaskRequest).is_ok() => {
                        let refusal = Refusal::new(
                            RefusalCode::UnknownResearcher,
                            format!(
                                "key {} is not a researcher in the active policy",
                                envelope.signer
                            ),
                        );
                        self.count_noise(sender, refusal.code, now);
                        return Handled {
                            response: QueryResponse::Refused(refusal),
                            unauthenticated: true,
                        };
                    }
                    _ => {
                        self.count_noise(sender, refusal.code, now);
                        return Handled {
                            response: QueryResponse::Refused(refusal),
                            unauthenticated: true,
                        };
                    }
                }
            }
            // From no known researcher: counted, summarised later.
            Err(refusal)
                if known.researcher.is_none() || refusal.code == RefusalCode::UnknownResearcher =>
            {
                self.count_noise(sender, refusal.code, now);
                return Handled {
                    response: QueryResponse::Refused(refusal),
                    unauthenticated: true,
                };
            }
            Err(refusal) => {
                self.record_refusal(now, known, &refusal);
                return Handled {
                    response: QueryResponse::Refused(refusal),
                    unauthenticated: false,
                };
            }
        };
        if checked.request.dry_run {
            return Handled {
                response: self.quote(checked, now),
                unauthenticated: false,
            };
        }
        let desk = Arc::clone(&self);
        // sled's fsync and opendp's sampler block; opendp measurements are not Send, so the
        // whole release runs on one blocking thread.
        let response = match tokio::task::spawn_blocking(move || {
            desk.charge_and_release(checked, now)
        })
        .await
        {
            Ok(response) => response,
            Err(join) => {
                warn!("release task failed: {join}");
                QueryResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "the node failed while answering; any charge already made stands",
                ))
            }
        };
        Handled {
            response,
            unauthenticated: false,
        }
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
}

/// The ledger's view of a checked request.
fn charge_request<'a>(
    researcher: &'a PublicKey,
    request: &'a QueryRequest,
    digest: &'a [u8; 32],
    cost: MicroRho,
    grant: &Grant,
    fit: FitLink,
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
        fit,
    }
}
