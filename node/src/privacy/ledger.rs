//! The privacy ledger: how much each researcher has spent on each study at this node, the
//! node's total over everyone (the dataset cap), which nonces have been seen, and the
//! answer released for each request.
//!
//! Admitting a request is one sled transaction over the `ledger`, `nonces` and `requests`
//! trees: a request id seen before returns the answer recorded for it (never a second
//! charge, never fresh noise, so resending cannot be used to average noise away); otherwise
//! the nonce must be unseen and every budget sufficient, and the debit, the nonce and the
//! request record **with its signed answer** are written together. The caller draws the
//! noise before admitting (nothing leaves the node yet) and makes the transaction durable
//! (one fsync, with its audit entry) before it sends anything: an answer is sent only if its
//! charge is on disk, and a charge is never on disk without the answer it paid for. A crash
//! can lose budget, never leak it. There are no refunds.
//!
//! Keys: accounts are `R || researcher key (32 bytes) || study` (one researcher on one
//! study), `S || study` (everyone on one study) and `D` (everyone on everything: the
//! dataset), each → spent micro-rho (big-endian u64); nonces are `researcher key || nonce` →
//! expiry; requests are `researcher key || request id` → an encoded [`RequestRecord`]. Nonces and request records are kept until their request has
//! expired (plus clock skew); after that the request is refused as expired anyway.
//!
//! A logistic fit's steps ([`FitLink`]) are bound in the same transaction: the first step
//! is charged for the whole fit and writes a fit record (`fits`: `researcher key || its
//! request id` → an encoded [`FitRecord`]: what was asked, how many steps, which request
//! answered each); a later step is charged nothing and admitted only if it names a fit of
//! the same researcher, asks the same question in the same way, is within its steps and
//! its window, and its step was not answered for another request. So a fit releases at
//! most the steps it paid for, each once.

use renkei_protocol::limits::MAX_CLOCK_SKEW_SECS;
use renkei_protocol::{MicroRho, PublicKey, Refusal, RefusalCode, RequestId};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::error::NodeError;
use crate::store::NodeStore;

/// Ledger key of the node's total spend over all researchers and studies.
const DATASET_ACCOUNT: &[u8] = b"D";

/// Largest request record stored: the largest answer a node sends, and the record around it.
const MAX_RECORD_BYTES: usize = renkei_protocol::limits::MAX_RESPONSE_BYTES + 1024;

/// A budget debit (written; durable after [`PrivacyLedger::make_durable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The researcher's spend on the study after this charge.
    pub spent: MicroRho,
    pub remaining: MicroRho,
}

/// What the ledger decided about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Charged now, with this answer recorded: make it durable, then send it.
    Recorded { charge: Charge, answer: Vec<u8> },
    /// Answered before: the exact signed answer (an encoded envelope) to send again.
    Answered(Vec<u8>),
}

/// What the node remembers of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub digest: [u8; 32],
    pub expires_at: u64,
    pub spent: MicroRho,
    pub remaining: MicroRho,
    /// The encoded signed answer (`None` only in records from before charges and answers
    /// were written together).
    pub answer: Option<Vec<u8>>,
}

/// Spend of one researcher on one study.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerEntry {
    pub researcher: PublicKey,
    pub study: String,
    pub spent: MicroRho,
}

/// How a request belongs to a logistic fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitLink {
    /// Not a fit's step.
    None,
    /// The first step: charged for all `iterations`.
    Opens { identity: [u8; 32], iterations: u8 },
    /// A later step of the fit opened by request `fit`, charged nothing.
    Continues {
        fit: RequestId,
        iteration: u8,
        identity: [u8; 32],
        issued_at: u64,
        /// The steps this request says the fit has (part of its identity too).
        iterations: u8,
    },
}

/// What the node keeps of a fit it accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FitRecord {
    /// Digest of the question and how it is asked (study, audience, privacy, mode), which
    /// every step must share.
    pub identity: [u8; 32],
    pub iterations: u8,
    /// The opening request's expiry: no step signed later belongs to it.
    pub expires_at: u64,
    /// The request that was answered for each step.
    pub steps: Vec<Option<RequestId>>,
}

/// What one charge is for.
#[derive(Debug, Clone, Copy)]
pub struct ChargeRequest<'a> {
    pub researcher: &'a PublicKey,
    pub study: &'a str,
    pub request_id: &'a RequestId,
    pub nonce: &'a [u8; 16],
    /// Digest of the signed request payload; the same id with another digest is a replay.
    pub digest: &'a [u8; 32],
    /// Unix seconds after which the request is dead (its records may then be forgotten).
    pub expires_at: u64,
    pub cost: MicroRho,
    /// The researcher's budget for the study, from the active policy.
    pub budget: MicroRho,
    /// All researchers' budget for the study, if the policy sets one.
    pub study_budget: Option<MicroRho>,
    /// The node's cap over everyone, from the active policy.
    pub dataset_budget: Option<MicroRho>,
    pub fit: FitLink,
}

/// The ledger over the node's store.
#[derive(Debug, Clone)]
pub struct PrivacyLedger {
    store: NodeStore,
}

fn account_key(researcher: &PublicKey, study: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(33 + study.len());
    key.push(b'R');
    key.extend_from_slice(researcher.as_bytes());
    key.extend_from_slice(study.as_bytes());
    key
}

fn study_key(study: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + study.len());
    key.push(b'S');
    key.extend_from_slice(study.as_bytes());
    key
}

/// Keys scoped by researcher, so one researcher can never collide with another's.
pub(crate) fn scoped_key(researcher: &PublicKey, id: &[u8; 16]) -> [u8; 48] {
    let mut key = [0u8; 48];
    key[..32].copy_from_slice(researcher.as_bytes());
    key[32..].copy_from_slice(id);
    key
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn decode_record(bytes: &[u8]) -> Option<RequestRecord> {
    renkei_protocol::codec::decode_limited(bytes, MAX_RECORD_BYTES).ok()
}

/// The researcher's, the study's and the dataset's spend once `request` is charged, or
/// which of them it would exceed.
fn totals(
    request: &ChargeRequest<'_>,
    spent: u64,
    study_spent: u64,
    dataset_spent: u64,
) -> Result<[u64; 3], Stop> {
    let total = spent
        .checked_add(request.cost.0)
        .filter(|total| *total <= request.budget.0)
        .ok_or(Stop::Exhausted { spent })?;
    let study_total = study_spent.saturating_add(request.cost.0);
    if let Some(cap) = request.study_budget
        && study_total > cap.0
    {
        return Err(Stop::StudyExhausted {
            spent: study_spent,
            cap: cap.0,
        });
    }
    let dataset_total = dataset_spent.saturating_add(request.cost.0);
    if let Some(cap) = request.dataset_budget
        && dataset_total > cap.0
    {
        return Err(Stop::DatasetExhausted {
            spent: dataset_spent,
            cap: cap.0,
        });
    }
    Ok([total, study_total, dataset_total])
}

/// The refusal for a charge that would exceed a budget.
fn exhausted(stop: Stop, request: &ChargeRequest<'_>) -> Refusal {
    match stop {
        Stop::StudyExhausted { spent, cap } => Refusal::new(
            RefusalCode::StudyBudgetExhausted,
            format!(
                "study `{}` has spent rho {} of its {} at this node over all its researchers; this query costs {}",
                request.study,
                MicroRho(spent),
                MicroRho(cap),
                request.cost
            ),
        ),
        Stop::DatasetExhausted { spent, cap } => Refusal::new(
            RefusalCode::DatasetBudgetExhausted,
            format!(
                "this node's dataset has spent rho {} of its {} cap over all researchers; this query costs {}",
                MicroRho(spent),
                MicroRho(cap),
                request.cost
            ),
        ),
        Stop::Exhausted { spent } => {
            let left = request.budget.saturating_sub(MicroRho(spent));
            Refusal::new(
                RefusalCode::BudgetExhausted,
                format!(
                    "study `{}`: this query costs rho {} but only {} of {} is left at this node",
                    request.study, request.cost, left, request.budget
                ),
            )
        }
        Stop::Seen(_)
        | Stop::Answer(_)
        | Stop::ReusedId
        | Stop::Replayed
        | Stop::Fit(_)
        | Stop::Corrupt(_) => Refusal::new(RefusalCode::Internal, "the ledger failed"),
    }
}

/// Why a transaction stopped.
#[derive(Debug)]
enum Stop {
    /// The request was answered before: this answer.
    Seen(Vec<u8>),
    /// Making the answer failed.
    Answer(String),
    ReusedId,
    Replayed,
    Exhausted {
        spent: u64,
    },
    StudyExhausted {
        spent: u64,
        cap: u64,
    },
    DatasetExhausted {
        spent: u64,
        cap: u64,
    },
    /// A fit's step that does not belong to a fit this node accepted.
    Fit(FitProblem),
    Corrupt(&'static str),
}

/// Why a fit's step is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FitProblem {
    #[error(
        "this step names a fit this node never accepted from this researcher (or one long expired); open a new fit"
    )]
    Unknown,
    #[error(
        "this step asks another question, or asks it differently (study, nodes, privacy, mode), than the fit it names"
    )]
    OtherQuestion,
    #[error("the fit this step names has expired; open a new fit")]
    Expired,
    #[error("the fit this step names was charged for {0} step(s); this one is past its last")]
    PastLast(u8),
    #[error(
        "step {0} of this fit was already answered for another request; a step is released once"
    )]
    Answered(u8),
}

/// The record of the fit a later step (of `identity`, signed at `issued_at`, numbered
/// `iteration`) names, from what the `fits` tree holds for it (`stored`), when the step
/// belongs to it; else why not (`None`: the record does not decode). One check for the
/// precheck and the transaction. A step already answered is refused whatever its request
/// id: a resend of the same request is answered from its request record before this is
/// asked, so the same id here means that record was pruned (the step's own expiry, which
/// its researcher chose, came first), and answering again would release the step twice.
fn step_record(
    stored: Option<&[u8]>,
    identity: [u8; 32],
    issued_at: u64,
    iteration: u8,
) -> Result<FitRecord, Option<FitProblem>> {
    let record = decode_fit(stored.ok_or(Some(FitProblem::Unknown))?).ok_or(None)?;
    if record.identity != identity {
        return Err(Some(FitProblem::OtherQuestion));
    }
    if issued_at > record.expires_at {
        return Err(Some(FitProblem::Expired));
    }
    match record.steps.get(usize::from(iteration)) {
        None => Err(Some(FitProblem::PastLast(record.iterations))),
        Some(Some(_)) => Err(Some(FitProblem::Answered(iteration))),
        Some(None) => Ok(record),
    }
}

fn decode_fit(bytes: &[u8]) -> Option<FitRecord> {
    renkei_protocol::codec::decode_limited(bytes, 64 * 1024).ok()
}

type Abort = ConflictableTransactionError<Stop>;

impl PrivacyLedger {
    pub fn new(store: NodeStore) -> Self {
        Self { store }
    }

    /// The node's store (the ledger shares it with the data and the audit log).
    pub(crate) fn store(&self) -> &NodeStore {
        &self.store
    }

    /// Decides a request: the answer recorded for it before, or a refusal, or a charge
    /// written together with the answer `answer` makes for it (called with the charge, so
    /// the answer can state what is left; it may be called more than once if the
    /// transaction is retried). Nothing is durable until [`PrivacyLedger::make_durable`].
    pub fn admit(
        &self,
        request: ChargeRequest<'_>,
        answer: &dyn Fn(Charge) -> Result<Vec<u8>, NodeError>,
    ) -> Result<Result<Admission, Refusal>, NodeError> {
        let account = account_key(request.researcher, request.study);
        let study_account = study_key(request.study);
        let nonce = scoped_key(request.researcher, request.nonce);
        let request_key = scoped_key(request.researcher, &request.request_id.0);
        let trees = (
            &self.store.ledger,
            &self.store.nonces,
            &self.store.requests,
            &self.store.fits,
        );
        let outcome = trees.transaction(|(ledger, nonces, requests, fits)| {
            let answered = |charge: Charge| {
                answer(charge).map_err(|e| Abort::Abort(Stop::Answer(e.to_string())))
            };
            if let Some(bytes) = requests.get(request_key)? {
                let mut record =
                    decode_record(&bytes).ok_or(Abort::Abort(Stop::Corrupt("request record")))?;
                if &record.digest != request.digest {
                    return Err(Abort::Abort(Stop::ReusedId));
                }
                if let Some(sent) = record.answer {
                    return Err(Abort::Abort(Stop::Seen(sent)));
                }
                // Charged but unanswered: only a store written before charges and answers
                // were recorded together holds this. Answer now, without charging again.
                let charge = Charge {
                    spent: record.spent,
                    remaining: record.remaining,
                };
                let bytes = answered(charge)?;
                record.answer = Some(bytes.clone());
                let encoded = renkei_protocol::codec::encode(&record)
                    .map_err(|_| Abort::Abort(Stop::Corrupt("request record")))?;
                requests.insert(&request_key[..], encoded)?;
                return Ok((charge, bytes));
            }
            if nonces.get(nonce)?.is_some() {
                return Err(Abort::Abort(Stop::Replayed));
            }
            // A fit's record: written by its first step, extended by each later one.
            let fit_write = match request.fit {
                FitLink::None => None,
                FitLink::Opens {
                    identity,
                    iterations,
                } => {
                    let mut steps = vec![None; usize::from(iterations.max(1))];
                    steps[0] = Some(*request.request_id);
                    Some((
                        request_key,
                        FitRecord {
                            identity,
                            iterations,
                            expires_at: request.expires_at,
                            steps,
                        },
                    ))
                }
                FitLink::Continues {
                    fit,
                    iteration,
                    identity,
                    issued_at,
                    ..
                } => {
                    let key = scoped_key(request.researcher, &fit.0);
                    let mut record =
                        step_record(fits.get(key)?.as_deref(), identity, issued_at, iteration)
                            .map_err(|problem| {
                                Abort::Abort(problem.map_or(Stop::Corrupt("fit record"), Stop::Fit))
                            })?;
                    record.steps[usize::from(iteration)] = Some(*request.request_id);
                    Some((key, record))
                }
            };
            let read = |bytes: Option<sled::IVec>, what| match bytes {
                None => Ok(0),
                Some(bytes) => decode_u64(&bytes).ok_or(Abort::Abort(Stop::Corrupt(what))),
            };
            let spent = read(ledger.get(&account)?, "ledger account")?;
            let study_spent = read(ledger.get(&study_account)?, "study account")?;
            let dataset_spent = read(ledger.get(DATASET_ACCOUNT)?, "dataset account")?;
            let [total, study_total, dataset_total] =
                totals(&request, spent, study_spent, dataset_spent).map_err(Abort::Abort)?;
            let charge = Charge {
                spent: MicroRho(total),
                remaining: request.budget.saturating_sub(MicroRho(total)),
            };
            let bytes = answered(charge)?;
            let record = RequestRecord {
                digest: *request.digest,
                expires_at: request.expires_at,
                spent: charge.spent,
                remaining: charge.remaining,
                answer: Some(bytes.clone()),
            };
            let encoded = renkei_protocol::codec::encode(&record)
                .map_err(|_| Abort::Abort(Stop::Corrupt("request record")))?;
            ledger.insert(account.as_slice(), &total.to_be_bytes()[..])?;
            ledger.insert(study_account.as_slice(), &study_total.to_be_bytes()[..])?;
            ledger.insert(DATASET_ACCOUNT, &dataset_total.to_be_bytes()[..])?;
            nonces.insert(&nonce[..], &request.expires_at.to_be_bytes()[..])?;
            requests.insert(&request_key[..], encoded)?;
            if let Some((key, record)) = fit_write {
                let encoded = renkei_protocol::codec::encode(&record)
                    .map_err(|_| Abort::Abort(Stop::Corrupt("fit record")))?;
                fits.insert(&key[..], encoded)?;
            }
            Ok((charge, bytes))
        });
        let refusal = |code, reason: String| Ok(Err(Refusal::new(code, reason)));
        match outcome {
            Ok((charge, answer)) => Ok(Ok(Admission::Recorded { charge, answer })),
            Err(TransactionError::Abort(Stop::Seen(answer))) => Ok(Ok(Admission::Answered(answer))),
            Err(TransactionError::Abort(Stop::Answer(reason))) => Err(NodeError::Answer(reason)),
            Err(TransactionError::Abort(Stop::ReusedId)) => refusal(
                RefusalCode::Replayed,
                format!(
                    "request id {} was already used for a different request",
                    request.request_id
                ),
            ),
            Err(TransactionError::Abort(Stop::Replayed)) => refusal(
                RefusalCode::Replayed,
                "this request's nonce was already used; sign a new request".into(),
            ),
            Err(TransactionError::Abort(
                stop @ (Stop::Exhausted { .. }
                | Stop::StudyExhausted { .. }
                | Stop::DatasetExhausted { .. }),
            )) => Ok(Err(exhausted(stop, &request))),
            Err(TransactionError::Abort(Stop::Fit(problem))) => {
                refusal(RefusalCode::FitStepRefused, problem.to_string())
            }
            Err(TransactionError::Abort(Stop::Corrupt(what))) => Err(NodeError::CorruptStore {
                what: what.into(),
                reason: "undecodable value".into(),
            }),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// What `request` would leave of the researcher's budget for its study, before it is
    /// charged, or the refusal a charge would meet. Writes nothing.
    pub fn quote(
        &self,
        request: &ChargeRequest<'_>,
    ) -> Result<Result<MicroRho, Refusal>, NodeError> {
        let spent = self.spent(request.researcher, request.study)?;
        let study_spent = self.study_spent(request.study)?;
        let dataset_spent = self.dataset_spent()?;
        Ok(
            match totals(request, spent.0, study_spent.0, dataset_spent.0) {
                Ok(_) => Ok(request.budget.saturating_sub(spent)),
                Err(stop) => Err(exhausted(stop, request)),
            },
        )
    }

    /// What admitting `request` would meet, read without writing, so that work for a
    /// request that will be refused or answered from its record is not done at all: the
    /// recorded answer of a request seen before, or the refusal, or `None` to go ahead. The
    /// transaction in [`PrivacyLedger::admit`] decides again.
    pub fn precheck(
        &self,
        request: &ChargeRequest<'_>,
    ) -> Result<Result<Option<Vec<u8>>, Refusal>, NodeError> {
        let request_key = scoped_key(request.researcher, &request.request_id.0);
        if let Some(bytes) = self.store.requests.get(request_key)? {
            let record = decode_record(&bytes).ok_or_else(|| NodeError::CorruptStore {
                what: format!("request record {}", request.request_id),
                reason: "undecodable".into(),
            })?;
            if &record.digest != request.digest {
                return Ok(Err(Refusal::new(
                    RefusalCode::Replayed,
                    format!(
                        "request id {} was already used for a different request",
                        request.request_id
                    ),
                )));
            }
            // A record without its answer (older stores) is answered through `admit`.
            return Ok(Ok(record.answer));
        }
        if self
            .store
            .nonces
            .get(scoped_key(request.researcher, request.nonce))?
            .is_some()
        {
            return Ok(Err(Refusal::new(
                RefusalCode::Replayed,
                "this request's nonce was already used; sign a new request",
            )));
        }
        // A fit's later step is charged nothing, so the budget does not stop it: whether
        // it belongs to a fit is decided here too, before the data is scanned.
        if let FitLink::Continues {
            fit,
            iteration,
            identity,
            issued_at,
            ..
        } = request.fit
        {
            let key = scoped_key(request.researcher, &fit.0);
            let stored = self.store.fits.get(key)?;
            match step_record(stored.as_deref(), identity, issued_at, iteration) {
                Ok(_) => {}
                Err(Some(problem)) => {
                    return Ok(Err(Refusal::new(
                        RefusalCode::FitStepRefused,
                        problem.to_string(),
                    )));
                }
                Err(None) => {
                    return Err(NodeError::CorruptStore {
                        what: format!("fit record {fit}"),
                        reason: "undecodable".into(),
                    });
                }
            }
        }
        Ok(self.quote(request)?.map(|_| None))
    }

    /// The signed answer (an encoded envelope) recorded for `researcher`'s request
    /// `request_id`, if it answered the request with this `digest`.
    pub fn recorded_answer(
        &self,
        researcher: &PublicKey,
        request_id: &RequestId,
        digest: &[u8; 32],
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let Some(bytes) = self
            .store
            .requests
            .get(scoped_key(researcher, &request_id.0))?
        else {
            return Ok(None);
        };
        let record = decode_record(&bytes).ok_or_else(|| NodeError::CorruptStore {
            what: format!("request record {request_id}"),
            reason: "undecodable".into(),
        })?;
        Ok(record.answer.filter(|_| &record.digest == digest))
    }

    /// Settles which survivors the recoverable secure round `digest` is unmasked for: the
    /// first set asked is kept (until the round expires) and only that set is ever answered,
    /// so a node never reveals both its own mask and a dropped node's pairwise masks for
    /// one round. True when `survivors` (a [`renkei_protocol::masks::survivors_digest`])
    /// is the settled set. Written, not yet durable: make it durable before replying.
    pub fn settle_survivors(
        &self,
        digest: &[u8; 32],
        survivors: &[u8; 32],
        expires_at: u64,
    ) -> Result<bool, NodeError> {
        let mut value = expires_at.to_be_bytes().to_vec();
        value.extend_from_slice(survivors);
        match self
            .store
            .rounds
            .compare_and_swap(digest, None as Option<&[u8]>, Some(value))?
        {
            Ok(()) => Ok(true),
            Err(existing) => Ok(existing
                .current
                .is_some_and(|settled| settled.get(8..) == Some(&survivors[..]))),
        }
    }

    /// The survivors (digest) settled for round `digest`, if any.
    pub fn settled_survivors(&self, digest: &[u8; 32]) -> Result<Option<[u8; 32]>, NodeError> {
        Ok(self
            .store
            .rounds
            .get(digest)?
            .and_then(|value| value.get(8..).and_then(|s| <[u8; 32]>::try_from(s).ok())))
    }

    /// Every request record (for inspection and tests).
    pub fn requests(&self) -> Result<Vec<RequestRecord>, NodeError> {
        self.store
            .requests
            .iter()
            .map(|entry| {
                let (key, bytes) = entry?;
                decode_record(&bytes).ok_or_else(|| NodeError::CorruptStore {
                    what: format!("request record {}", hex::encode(&key)),
                    reason: "undecodable".into(),
                })
            })
            .collect()
    }

    /// Makes everything admitted so far durable (and whatever else was written, such as
    /// audit entries); call before sending an answer. Concurrent calls share one fsync.
    pub fn make_durable(&self) -> Result<(), NodeError> {
        self.store.flush()
    }

    /// Announces a [`PrivacyLedger::make_durable`] to come (an answer being computed), so
    /// that answers computed side by side share one fsync; see
    /// [`crate::store::NodeStore::expect_flush`].
    pub fn expect_durable(&self) -> crate::store::FlushPromise {
        self.store.expect_flush()
    }

    /// Spend so far of one researcher on one study.
    pub fn spent(&self, researcher: &PublicKey, study: &str) -> Result<MicroRho, NodeError> {
        self.read_account(&account_key(researcher, study), study)
    }

    /// The node's total spend over all researchers and studies.
    pub fn dataset_spent(&self) -> Result<MicroRho, NodeError> {
        self.read_account(DATASET_ACCOUNT, "dataset")
    }

    /// All researchers' spend on one study.
    pub fn study_spent(&self, study: &str) -> Result<MicroRho, NodeError> {
        self.read_account(&study_key(study), study)
    }

    fn read_account(&self, key: &[u8], what: &str) -> Result<MicroRho, NodeError> {
        match self.store.ledger.get(key)? {
            None => Ok(MicroRho(0)),
            Some(bytes) => {
                decode_u64(&bytes)
                    .map(MicroRho)
                    .ok_or_else(|| NodeError::CorruptStore {
                        what: format!("ledger entry for `{what}`"),
                        reason: "not an 8-byte counter".into(),
                    })
            }
        }
    }

    /// Every researcher account with its spend.
    pub fn entries(&self) -> Result<Vec<LedgerEntry>, NodeError> {
        let mut entries = Vec::new();
        for item in self.store.ledger.scan_prefix(b"R") {
            let (key, value) = item?;
            let corrupt = || NodeError::CorruptStore {
                what: "ledger entry".into(),
                reason: "malformed key or value".into(),
            };
            let researcher: [u8; 32] = key
                .get(1..33)
                .and_then(|k| k.try_into().ok())
                .ok_or_else(corrupt)?;
            let study = String::from_utf8(key[33..].to_vec()).map_err(|_| corrupt())?;
            let spent = decode_u64(&value).ok_or_else(corrupt)?;
            entries.push(LedgerEntry {
                researcher: PublicKey::from_bytes(researcher),
                study,
                spent: MicroRho(spent),
            });
        }
        Ok(entries)
    }

    /// Forgets nonces and request records of requests that expired before `now` (minus
    /// clock skew): such a request is refused as expired before they are looked at.
    pub fn prune_expired(&self, now: u64) -> Result<usize, NodeError> {
        let horizon = now.saturating_sub(MAX_CLOCK_SKEW_SECS);
        let mut pruned = 0;
        for item in self.store.nonces.iter() {
            let (key, expires) = item?;
            if decode_u64(&expires).is_some_and(|e| e < horizon) {
                self.store.nonces.remove(key)?;
                pruned += 1;
            }
        }
        for item in self.store.requests.iter() {
            let (key, bytes) = item?;
            if decode_record(&bytes).is_some_and(|r| r.expires_at < horizon) {
                self.store.requests.remove(key)?;
                pruned += 1;
            }
        }
        for item in self.store.fits.iter() {
            let (key, bytes) = item?;
            if decode_fit(&bytes).is_some_and(|r| r.expires_at < horizon) {
                self.store.fits.remove(key)?;
                pruned += 1;
            }
        }
        // A settled round is kept while its request can still be answered or unmasked.
        for item in self.store.rounds.iter() {
            let (key, value) = item?;
            if value
                .get(..8)
                .and_then(decode_u64)
                .is_some_and(|e| e < horizon)
            {
                self.store.rounds.remove(key)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::NodeHome;
    use renkei_protocol::SecretKey;

    struct Fixture {
        researcher: PublicKey,
        ids: Vec<RequestId>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                researcher: SecretKey::generate().unwrap().public_key(),
                ids: (0..16).map(|i| RequestId([i; 16])).collect(),
            }
        }

        fn request(&self, i: usize, cost: u64, budget: u64) -> ChargeRequest<'_> {
            ChargeRequest {
                researcher: &self.researcher,
                study: "severity",
                request_id: &self.ids[i],
                nonce: &self.ids[i].0,
                digest: &[7; 32],
                expires_at: 1_000,
                cost: MicroRho(cost),
                budget: MicroRho(budget),
                study_budget: None,
                dataset_budget: None,
                fit: FitLink::None,
            }
        }
    }

    /// A stand-in for the signed answer: says what it was told is left.
    fn answer(charge: Charge) -> Result<Vec<u8>, NodeError> {
        Ok(format!("answer; {} left", charge.remaining).into_bytes())
    }

    fn refusal(outcome: Result<Admission, Refusal>) -> RefusalCode {
        outcome.unwrap_err().code
    }

    #[test]
    fn charges_until_exhausted_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let f = Fixture::new();
        {
            let ledger = PrivacyLedger::new(home.open_store().unwrap());
            let first = ledger
                .admit(f.request(0, 40, 100), &answer)
                .unwrap()
                .unwrap();
            assert_eq!(
                first,
                Admission::Recorded {
                    charge: Charge {
                        spent: MicroRho(40),
                        remaining: MicroRho(60)
                    },
                    answer: answer(Charge {
                        spent: MicroRho(40),
                        remaining: MicroRho(60)
                    })
                    .unwrap(),
                }
            );
            ledger
                .admit(f.request(1, 40, 100), &answer)
                .unwrap()
                .unwrap();
            let broke = ledger.admit(f.request(2, 40, 100), &answer).unwrap();
            assert_eq!(refusal(broke), RefusalCode::BudgetExhausted);
            assert_eq!(
                ledger.spent(&f.researcher, "severity").unwrap(),
                MicroRho(80)
            );
            assert_eq!(ledger.dataset_spent().unwrap(), MicroRho(80));
        }
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(80)
        );
        assert_eq!(ledger.entries().unwrap().len(), 1);
    }

    #[test]
    fn a_resent_request_is_never_charged_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let f = Fixture::new();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let Admission::Recorded { answer: first, .. } = ledger
            .admit(f.request(0, 30, 100), &answer)
            .unwrap()
            .unwrap()
        else {
            panic!("not charged");
        };
        // Resent: the recorded answer, not a new one, and no second charge.
        let fresh = |_: Charge| -> Result<Vec<u8>, NodeError> { Ok(b"fresh noise".to_vec()) };
        assert_eq!(
            ledger
                .admit(f.request(0, 30, 100), &fresh)
                .unwrap()
                .unwrap(),
            Admission::Answered(first)
        );
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(30)
        );

        // A store from before charges and answers were written together may hold a charge
        // without its answer: it is answered now, without charging again.
        let key = scoped_key(&f.researcher, &f.ids[2].0);
        let unanswered = RequestRecord {
            digest: [7; 32],
            expires_at: 1_000,
            spent: MicroRho(30),
            remaining: MicroRho(70),
            answer: None,
        };
        ledger
            .store
            .requests
            .insert(key, renkei_protocol::codec::encode(&unanswered).unwrap())
            .unwrap();
        assert_eq!(
            ledger
                .admit(f.request(2, 30, 100), &answer)
                .unwrap()
                .unwrap(),
            Admission::Recorded {
                charge: Charge {
                    spent: MicroRho(30),
                    remaining: MicroRho(70)
                },
                answer: b"answer; 0.000070 left".to_vec(),
            }
        );
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(30)
        );

        // The same id for a different request, or an old nonce under a new id: replays.
        let mut other = f.request(0, 30, 100);
        other.digest = &[8; 32];
        assert_eq!(
            refusal(ledger.admit(other, &answer).unwrap()),
            RefusalCode::Replayed
        );
        let mut reused_nonce = f.request(1, 30, 100);
        reused_nonce.nonce = &f.ids[0].0;
        assert_eq!(
            refusal(ledger.admit(reused_nonce, &answer).unwrap()),
            RefusalCode::Replayed
        );
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(30)
        );
    }

    /// If the answer cannot be made, the transaction leaves nothing: no charge, no nonce, no
    /// record.
    #[test]
    fn a_failed_answer_charges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let f = Fixture::new();
        let broken = |_: Charge| -> Result<Vec<u8>, NodeError> {
            Err(NodeError::Answer("too large".into()))
        };
        assert!(matches!(
            ledger.admit(f.request(0, 30, 100), &broken),
            Err(NodeError::Answer(_))
        ));
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(0)
        );
        assert!(ledger.requests().unwrap().is_empty());
        assert_eq!(
            ledger.precheck(&f.request(0, 30, 100)).unwrap().unwrap(),
            None
        );
        ledger
            .admit(f.request(0, 30, 100), &answer)
            .unwrap()
            .unwrap();
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(30)
        );
        // Now the precheck finds the recorded answer, and refuses a reused nonce.
        assert!(
            ledger
                .precheck(&f.request(0, 30, 100))
                .unwrap()
                .unwrap()
                .is_some()
        );
        let mut reused = f.request(1, 30, 100);
        reused.nonce = &f.ids[0].0;
        assert_eq!(
            ledger.precheck(&reused).unwrap().unwrap_err().code,
            RefusalCode::Replayed
        );
    }

    #[test]
    fn the_dataset_cap_binds_across_researchers() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let (a, b) = (Fixture::new(), Fixture::new());
        let capped = |f: &Fixture| {
            let mut r = f.request(0, 60, 1_000);
            r.dataset_budget = Some(MicroRho(100));
            let outcome = ledger.admit(r, &answer).unwrap();
            outcome.map(|_| ())
        };
        capped(&a).unwrap();
        assert_eq!(
            capped(&b).unwrap_err().code,
            RefusalCode::DatasetBudgetExhausted
        );
        assert_eq!(ledger.dataset_spent().unwrap(), MicroRho(60));
        assert_eq!(
            ledger.spent(&b.researcher, "severity").unwrap(),
            MicroRho(0)
        );
    }

    #[test]
    fn the_study_budget_binds_across_its_researchers() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let (a, b) = (Fixture::new(), Fixture::new());
        let charge = |f: &Fixture| {
            let mut r = f.request(0, 60, 1_000);
            r.study_budget = Some(MicroRho(100));
            ledger.admit(r, &answer).unwrap().map(|_| ())
        };
        charge(&a).unwrap();
        assert_eq!(
            charge(&b).unwrap_err().code,
            RefusalCode::StudyBudgetExhausted
        );
        assert_eq!(ledger.study_spent("severity").unwrap(), MicroRho(60));
    }

    #[test]
    fn expired_records_are_pruned_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let f = Fixture::new();
        ledger
            .admit(f.request(0, 1, 100), &answer)
            .unwrap()
            .unwrap();
        assert_eq!(ledger.prune_expired(1_000).unwrap(), 0);
        assert_eq!(
            ledger
                .prune_expired(1_000 + MAX_CLOCK_SKEW_SECS + 1)
                .unwrap(),
            2
        );
        // The spend itself is never pruned.
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(1)
        );
    }

    #[test]
    fn a_fit_is_charged_once_and_each_step_released_once() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let f = Fixture::new();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let identity = [3; 32];
        let fit = f.ids[0];
        let opening = ChargeRequest {
            fit: FitLink::Opens {
                identity,
                iterations: 3,
            },
            ..f.request(0, 60, 100)
        };
        ledger.admit(opening, &answer).unwrap().unwrap();
        let step = |i: usize, iteration: u8, identity: [u8; 32]| ChargeRequest {
            fit: FitLink::Continues {
                fit,
                iteration,
                identity,
                issued_at: 500,
                iterations: 3,
            },
            ..f.request(i, 0, 100)
        };
        // Step 1 is admitted at no charge; its resend returns the same answer.
        let first = ledger
            .admit(step(1, 1, identity), &answer)
            .unwrap()
            .unwrap();
        assert!(
            matches!(first, Admission::Recorded { charge, .. } if charge.spent == MicroRho(60))
        );
        let again = ledger
            .admit(step(1, 1, identity), &answer)
            .unwrap()
            .unwrap();
        assert!(matches!(again, Admission::Answered(_)));
        // Step 1 under another request, another question, a step past the last, a fit
        // never opened: refused, and nothing more is spent.
        for (request, says) in [
            (step(2, 1, identity), "already answered"),
            (step(3, 2, [4; 32]), "another question"),
            (step(4, 3, identity), "past its last"),
        ] {
            let refusal = ledger.admit(request, &answer).unwrap().unwrap_err();
            assert_eq!(refusal.code, RefusalCode::FitStepRefused);
            assert!(refusal.reason.contains(says), "{}", refusal.reason);
        }
        let unknown = ChargeRequest {
            fit: FitLink::Continues {
                fit: f.ids[9],
                iteration: 1,
                identity,
                issued_at: 500,
                iterations: 3,
            },
            ..f.request(5, 0, 100)
        };
        let refusal = ledger.admit(unknown, &answer).unwrap().unwrap_err();
        assert!(
            refusal.reason.contains("never accepted"),
            "{}",
            refusal.reason
        );
        // A step signed after the fit's window closed.
        let late = ChargeRequest {
            fit: FitLink::Continues {
                fit,
                iteration: 2,
                identity,
                issued_at: 2_000,
                iterations: 3,
            },
            ..f.request(6, 0, 100)
        };
        let refusal = ledger.admit(late, &answer).unwrap().unwrap_err();
        assert!(refusal.reason.contains("expired"), "{}", refusal.reason);
        assert_eq!(
            ledger.spent(&f.researcher, "severity").unwrap(),
            MicroRho(60)
        );
        // Refused before any scan too.
        let refusal = ledger.precheck(&step(8, 1, identity)).unwrap().unwrap_err();
        assert!(
            refusal.reason.contains("already answered"),
            "{}",
            refusal.reason
        );
        // A step whose own request record was pruned first (its researcher chose an early
        // expiry) is not released again under the same id.
        let short = |expires_at| ChargeRequest {
            expires_at,
            fit: FitLink::Continues {
                fit,
                iteration: 2,
                identity,
                issued_at: 500,
                iterations: 3,
            },
            ..f.request(10, 0, 100)
        };
        ledger.admit(short(100), &answer).unwrap().unwrap();
        ledger.prune_expired(500).unwrap();
        let renewed = ChargeRequest {
            nonce: &f.ids[11].0,
            ..short(900)
        };
        let refusal = ledger.admit(renewed, &answer).unwrap().unwrap_err();
        assert!(
            refusal.reason.contains("already answered"),
            "{}",
            refusal.reason
        );
        // Pruned with its request once expired.
        ledger.prune_expired(10_000).unwrap();
        let after = ledger
            .admit(step(7, 2, identity), &answer)
            .unwrap()
            .unwrap_err();
        assert!(after.reason.contains("never accepted"), "{}", after.reason);
    }
}
