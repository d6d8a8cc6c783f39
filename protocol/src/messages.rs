//! The messages of the query protocol: a researcher's [`QueryRequest`] (sent inside a
//! [`SignedEnvelope`]) and a node's [`QueryResponse`]: a signed [`Answer`] or a
//! [`Refusal`] the researcher can read.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{Signature, SignedEnvelope};
use crate::query::Query;

/// Unique id of one signed request, chosen at random by the researcher's client.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    pub fn random() -> Result<Self, crate::keys::KeyError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| crate::keys::KeyError::Randomness(e.to_string()))?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// A rho or epsilon that cannot be represented in millionths.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0} is not a finite, non-negative number below 10^12")]
pub struct BadRho(pub f64);

/// Defines a privacy parameter kept in integer millionths, so that ledgers add and compare
/// exactly. Conversions from a real number round **up** (spend is never under-counted); a
/// number written by a person is taken at its nearest millionth. On the wire it is the
/// integer; in human-readable forms (TOML, JSON) it is the decimal number.
macro_rules! millionths {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
        pub struct $name(pub u64);

        impl $name {
            pub const PER_UNIT: u64 = 1_000_000;

            /// The smallest number of millionths that is at least `value`.
            pub fn from_f64_ceil(value: f64) -> Result<Self, BadRho> {
                if !(0.0..1e12).contains(&value) {
                    return Err(BadRho(value));
                }
                // The range check keeps the product well inside u64.
                Ok(Self((value * Self::PER_UNIT as f64).ceil() as u64))
            }

            /// The nearest millionth to a number written by a person (`0.1 + 0.2` is
            /// 300000, not 300001 because of binary floating point).
            pub fn from_decimal(value: f64) -> Result<Self, BadRho> {
                let exact = Self::from_f64_ceil(value)?;
                let scaled = value * Self::PER_UNIT as f64;
                let nearest = scaled.round();
                if (scaled - nearest).abs() < 1e-6 {
                    Ok(Self(nearest as u64))
                } else {
                    Ok(exact)
                }
            }

            pub fn as_f64(self) -> f64 {
                self.0 as f64 / Self::PER_UNIT as f64
            }

            pub fn saturating_sub(self, other: Self) -> Self {
                Self(self.0.saturating_sub(other.0))
            }

            pub fn checked_add(self, other: Self) -> Option<Self> {
                self.0.checked_add(other.0).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:.6}", self.as_f64())
            }
        }

        impl FromStr for $name {
            type Err = BadRho;

            #[doc = concat!("Parses ", $what, " written as a decimal number, e.g. `0.05`.")]
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                let value: f64 = text.trim().parse().map_err(|_| BadRho(f64::NAN))?;
                Self::from_decimal(value)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.serialize_f64(self.as_f64())
                } else {
                    serializer.serialize_u64(self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let value = f64::deserialize(deserializer)?;
                    Self::from_decimal(value).map_err(serde::de::Error::custom)
                } else {
                    Ok(Self(u64::deserialize(deserializer)?))
                }
            }
        }
    };
}

millionths!(
    /// A zero-concentrated DP cost (zCDP rho) in integer millionths: the unit of every
    /// privacy budget and ledger in renkei.
    MicroRho,
    "a rho"
);

millionths!(
    /// A pure-DP epsilon in integer millionths.
    MicroEpsilon,
    "an epsilon"
);

impl MicroRho {
    /// Millionths per unit rho.
    pub const PER_RHO: u64 = Self::PER_UNIT;

    /// The smallest number of micro-rho that is at least `rho`.
    pub fn from_rho_ceil(rho: f64) -> Result<Self, BadRho> {
        Self::from_f64_ceil(rho)
    }

    /// The nearest micro-rho to a rho written by a person.
    pub fn from_decimal_rho(rho: f64) -> Result<Self, BadRho> {
        Self::from_decimal(rho)
    }

    pub fn as_rho(self) -> f64 {
        self.as_f64()
    }
}

/// The kind of privacy a researcher asks a node to spend on one answer. Whatever is asked,
/// the node charges its ledger in zCDP rho, computed from its own mechanism's privacy map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyRequest {
    /// Discrete Gaussian noise spending `rho` under zero-concentrated DP.
    Zcdp { rho: MicroRho },
    /// Discrete Laplace noise for pure `epsilon`-DP; charged as rho = epsilon² / 2.
    PureDp { epsilon: MicroEpsilon },
}

impl fmt::Display for PrivacyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivacyRequest::Zcdp { rho } => write!(f, "zCDP rho {rho}"),
            PrivacyRequest::PureDp { epsilon } => write!(f, "pure DP epsilon {epsilon}"),
        }
    }
}

/// A researcher's signed question to a node. Sent as the payload of a [`SignedEnvelope`]
/// with purpose [`crate::Purpose::QueryRequest`]; the envelope's signer is the researcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryRequest {
    pub request_id: RequestId,
    /// Random per request; a node refuses a nonce it has seen before (replay).
    pub nonce: [u8; 16],
    /// Unix seconds when the researcher signed the request.
    pub issued_at: u64,
    /// Unix seconds after which no node may answer it.
    pub expires_at: u64,
    /// The approved study this question belongs to; budgets are kept per study.
    pub study: String,
    /// The nodes (by their keys) this request is addressed to; any other node refuses it,
    /// so a node cannot spend the researcher's budget elsewhere by forwarding the request.
    pub audience: Vec<crate::keys::PublicKey>,
    pub query: Query,
    /// The privacy each node is asked to spend on this answer. Nodes compute the actual cost
    /// from their own mechanism's privacy map and never charge less than that.
    pub privacy: PrivacyRequest,
    /// Ask for a secure total: every node in `audience` answers with a noise share under
    /// pairwise masks, and only the sum over all of them can be read.
    pub secure: bool,
    /// For a secure round: how many nodes of the audience may fail to contribute while the
    /// total can still be read. Every node then also hides its numbers under a mask of its
    /// own, sizes its noise share for `dropouts` fewer nodes, and the total is read after an
    /// unmasking step ([`UnmaskRequest`]). 0: a missing node aborts the round.
    pub dropouts: u32,
    /// The policy version the researcher asks under; a node running another version
    /// refuses. Required for secure rounds, whose nodes must all size their noise shares by
    /// the same policy.
    pub policy_version: Option<u64>,
    /// Only ask what the query would cost: the node checks everything it would check and
    /// replies with a [`Quote`], spending nothing and consuming no nonce.
    pub dry_run: bool,
}

/// SHA-256 of the exact signed request payload: binds an answer to the request it answers.
pub fn request_digest(signed_payload: &[u8]) -> [u8; 32] {
    Sha256::digest(signed_payload).into()
}

/// The noise mechanism a node applied. Matched exhaustively everywhere: a new mechanism
/// must be drawn from before it can be named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Discrete Gaussian on integers, accounted under zCDP.
    DiscreteGaussian,
    /// Discrete Laplace (geometric) on integers, pure DP.
    DiscreteLaplace,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::DiscreteGaussian => "discrete_gaussian",
            Mechanism::DiscreteLaplace => "discrete_laplace",
        })
    }
}

/// What a masked contribution adds up to, once every participant's is summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskedShape {
    Scalar,
    SumAndCount,
    Histogram {
        low: i64,
        width: i64,
    },
    Groups {
        labels: Vec<Vec<String>>,
    },
    // New shapes go last: the position is what goes on the wire.
    /// `parts` vectors of one number per cell, in the order of `labels`, part after part.
    Cells {
        labels: Vec<Vec<String>>,
        parts: u32,
    },
    /// `values` numbers of a regression over terms scaled by `terms`.
    Regression {
        terms: Vec<TermScale>,
        values: u32,
    },
}

/// How a regression's term was scaled onto `[-1, 1]` before its products were summed: its
/// declared bounds in stored units (`value / 10^scale`), read as `(2·x − low − high) /
/// (high − low)`. A flag or condition is `0..1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermScale {
    pub low: i64,
    pub high: i64,
    pub scale: u8,
}

impl TermScale {
    /// A flag or condition: 0 or 1.
    pub const FLAG: TermScale = TermScale {
        low: 0,
        high: 1,
        scale: 0,
    };

    /// The bounds' centre and half-width, in the term's units.
    pub fn center_and_half(&self) -> (f64, f64) {
        let unit = 10f64.powi(i32::from(self.scale));
        (
            (self.low as f64 + self.high as f64) / 2.0 / unit,
            (self.high as f64 - self.low as f64) / 2.0 / unit,
        )
    }
}

/// The noisy numbers of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Release {
    /// One noisy count, or a noisy sum in fixed point (see [`Answer::value_scale`]). A count
    /// below the minimum cell size is withheld (`suppressed`, value 0).
    Scalar { value: i64, suppressed: bool },
    /// A noisy sum and a noisy count of the non-missing values, for a mean.
    SumAndCount { sum: i64, count: i64 },
    /// Noisy counts of values in equal bins from `low` (fixed point), each `width` wide.
    Histogram {
        low: i64,
        width: i64,
        counts: Vec<i64>,
    },
    /// Noisy counts per group (GROUP BY), cells in the order of `labels`; a cell below the
    /// minimum cell size is withheld (`suppressed`, count 0).
    Groups {
        labels: Vec<Vec<String>>,
        counts: Vec<i64>,
        suppressed: Vec<bool>,
    },
    /// A secure round's contribution: this node's numbers plus its noise share, under
    /// pairwise masks (mod 2^64). Only the sum over every participant means anything.
    Masked { shape: MaskedShape, words: Vec<u64> },
    // New releases go last: the position is what goes on the wire.
    /// Noisy numbers per GROUP BY cell in parts, each part one number per cell in the order
    /// of `labels` (a sum per cell: the sums; a mean per cell: the sums, then the counts of
    /// non-missing values, whose noise is [`Answer::count_noise_std`]).
    /// A cell is withheld (`suppressed`, every part 0 there) when its count fell below the
    /// minimum cell size; only releases with counts (a mean per cell) withhold.
    Cells {
        labels: Vec<Vec<String>>,
        parts: Vec<Vec<i64>>,
        suppressed: Vec<bool>,
    },
    /// A regression's noisy sums over its patients, in fixed point (2^20 per unit), each
    /// term scaled by `terms` (the outcome's last for a linear fit): a linear fit's
    /// cross-products of the design, or a logistic step's score, information and count.
    Regression {
        terms: Vec<TermScale>,
        values: Vec<i64>,
    },
}

/// A node's differentially private answer. Sent signed by the node's key
/// ([`crate::Purpose::NodeAnswer`]); the signer's peer id names the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub request_id: RequestId,
    /// [`request_digest`] of the request payload this answers.
    pub request_digest: [u8; 32],
    pub release: Release,
    /// Digits after the point of released sums and bins (the column's fixed-point scale).
    pub value_scale: u8,
    /// The minimum cell size applied to counts (0: none).
    pub min_cell_size: u64,
    pub mechanism: Mechanism,
    /// How much one patient can change the released numbers (L2, in released units): of
    /// the sum for [`Release::SumAndCount`].
    pub sensitivity: f64,
    /// The mechanism's scale parameter, as opendp names it (of the sum for a mean).
    pub noise_scale: f64,
    /// The exact standard deviation of each released number's noise (of the sum for a mean).
    pub noise_std: f64,
    /// For a mean, the standard deviation of the count's noise.
    pub count_noise_std: Option<f64>,
    /// Privacy charged for this answer at this node (from the mechanism's privacy map).
    pub rho_spent: MicroRho,
    /// The same release stated as (epsilon, delta)-DP at the policy's delta (delta 0 for
    /// pure DP).
    pub epsilon: f64,
    pub delta: f64,
    /// What the researcher has left in this study at this node after this answer.
    pub budget_remaining: MicroRho,
    /// Unix seconds.
    pub answered_at: u64,
}

/// Why a node did not answer. Each refusal has its own code; scripts match on the code,
/// people read the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusalCode {
    /// The request could not be decoded or breaks a structural limit.
    MalformedRequest,
    /// The researcher's signature does not verify.
    BadSignature,
    /// The signer is not a researcher in the active policy.
    UnknownResearcher,
    /// The researcher is not approved for the requested study.
    StudyNotApproved,
    /// The researcher's key was revoked by the consortium.
    ResearcherRevoked,
    /// The study's approval window has not begun.
    StudyNotYetValid,
    /// The study's approval window has ended.
    StudyExpired,
    /// The study may not query this view.
    ViewNotAllowed,
    /// The study may not use a column the query reads.
    ColumnNotAllowed,
    /// The study (or a sensitive view's rule) does not allow this aggregation.
    AggregationNotAllowed,
    /// The view is sensitive and no sufficiently signed grant covers it.
    SensitiveNotGranted,
    /// All researchers together have spent the study's budget at this node.
    StudyBudgetExhausted,
    /// `expires_at` has passed.
    Expired,
    /// `issued_at` is in the future beyond the tolerated clock skew.
    NotYetValid,
    /// The request claims a lifetime longer than nodes accept.
    LifetimeTooLong,
    /// The request is not addressed to this node.
    NotAddressedToThisNode,
    /// This nonce or request id was already used for a different request.
    Replayed,
    /// The researcher's budget for this study at this node cannot cover the cost.
    BudgetExhausted,
    /// The node's global privacy cap over all researchers cannot cover the cost.
    DatasetBudgetExhausted,
    /// The query does not fit the node's schema (unknown view or column, wrong type).
    InvalidQuery,
    /// The requested rho is zero or above what a single query may spend.
    PrivacyParameterOutOfRange,
    /// The node is at capacity; try again later.
    Overloaded,
    /// The node failed internally; nothing was released.
    Internal,
    /// An offered policy bundle: a signature does not verify.
    PolicyBadSignature,
    /// An offered policy bundle has too few admin signatures.
    PolicyTooFewSignatures,
    /// An offered policy bundle is signed by a key that is no admin.
    PolicyNotAnAdmin,
    /// An offered policy bundle is older than the active one.
    PolicyRollback,
    /// An offered policy bundle does not decode or is inconsistent.
    PolicyInvalid,
    // New codes go last: the position is what goes on the wire and into audit logs.
    /// The study allows only secure totals; ask with a secure round.
    SecureAggregationRequired,
    /// The request names a policy version this node is not running.
    PolicyVersionMismatch,
    /// An unmasking that contradicts one this node already gave for the same round (another
    /// set of survivors), or for a round this node has no contribution to.
    RoundConflict,
    /// A logistic fit's step that is not part of a fit this node accepted from this
    /// researcher (unknown fit, another question, a step past its last or one already
    /// answered for another request).
    FitStepRefused,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::MalformedRequest => "malformed_request",
            RefusalCode::BadSignature => "bad_signature",
            RefusalCode::UnknownResearcher => "unknown_researcher",
            RefusalCode::StudyNotApproved => "study_not_approved",
            RefusalCode::ResearcherRevoked => "researcher_revoked",
            RefusalCode::StudyNotYetValid => "study_not_yet_valid",
            RefusalCode::StudyExpired => "study_expired",
            RefusalCode::ViewNotAllowed => "view_not_allowed",
            RefusalCode::ColumnNotAllowed => "column_not_allowed",
            RefusalCode::AggregationNotAllowed => "aggregation_not_allowed",
            RefusalCode::SensitiveNotGranted => "sensitive_not_granted",
            RefusalCode::StudyBudgetExhausted => "study_budget_exhausted",
            RefusalCode::Expired => "expired",
            RefusalCode::NotYetValid => "not_yet_valid",
            RefusalCode::LifetimeTooLong => "lifetime_too_long",
            RefusalCode::NotAddressedToThisNode => "not_addressed_to_this_node",
            RefusalCode::SecureAggregationRequired => "secure_aggregation_required",
            RefusalCode::PolicyVersionMismatch => "policy_version_mismatch",
            RefusalCode::RoundConflict => "round_conflict",
            RefusalCode::FitStepRefused => "fit_step_refused",
            RefusalCode::Replayed => "replayed",
            RefusalCode::BudgetExhausted => "budget_exhausted",
            RefusalCode::DatasetBudgetExhausted => "dataset_budget_exhausted",
            RefusalCode::InvalidQuery => "invalid_query",
            RefusalCode::PrivacyParameterOutOfRange => "privacy_parameter_out_of_range",
            RefusalCode::Overloaded => "overloaded",
            RefusalCode::Internal => "internal",
            RefusalCode::PolicyBadSignature => "policy_bad_signature",
            RefusalCode::PolicyTooFewSignatures => "policy_too_few_signatures",
            RefusalCode::PolicyNotAnAdmin => "policy_not_an_admin",
            RefusalCode::PolicyRollback => "policy_rollback",
            RefusalCode::PolicyInvalid => "policy_invalid",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal is an answer: the code and a reason the researcher can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// What a query would cost at a node: the reply to a dry run. Nothing was spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    pub request_id: RequestId,
    /// SHA-256 of the signed request payload quoted.
    pub request_digest: [u8; 32],
    /// The zCDP rho the node would charge.
    pub rho: MicroRho,
    /// The same as (epsilon, delta)-DP.
    pub epsilon: f64,
    pub delta: f64,
    pub mechanism: Mechanism,
    /// The noise's standard deviation on the (first) released number.
    pub noise_std: f64,
    /// The researcher's budget for the study at this node, before this query.
    pub budget_remaining: MicroRho,
}

/// A node's reply to a query request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueryResponse {
    /// A signed [`Answer`].
    Answered(SignedEnvelope),
    Refused(Refusal),
    /// The cost of a dry run.
    Quoted(Quote),
    /// A signed [`Unmasking`], the reply to an [`UnmaskRequest`].
    Unmasked(SignedEnvelope),
}

/// The researcher's request that finishes a secure round asked with `dropouts > 0`, in two
/// steps. Sent signed by the researcher who signed the round
/// ([`crate::Purpose::UnmaskRequest`]).
///
/// 1. **Settle** (`commitments` empty): the aggregator names the nodes whose contributions
///    it holds (the survivors). Each survivor settles that set for the round (one set per
///    round, ever), signs a commitment to it and reveals what its pairwise masks with the
///    dropped nodes added.
/// 2. **Reveal** (`commitments` from every survivor): each survivor checks that all of them
///    committed to the same set and reveals its own mask; the survivors' total can be read.
///
/// Together these keep every contribution the aggregator holds hidden unless its node is
/// in the total: a node reveals its own mask only once every survivor has committed to a
/// set containing it, and a committed node never reveals its pairwise masks toward a node
/// of its set. An aggregator that names different sets to different nodes gets no
/// reveals at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// The round's signed request, exactly as it was sent.
    pub round: SignedEnvelope,
    /// The audience members whose contributions are in the total, sorted.
    pub survivors: Vec<crate::keys::PublicKey>,
    /// Empty to settle; to reveal, every survivor's commitment (its key and its
    /// [`Unmasking::commitment`]).
    pub commitments: Vec<(crate::keys::PublicKey, Signature)>,
}

/// A survivor's reply to either step of an [`UnmaskRequest`]. Sent signed by the node
/// ([`crate::Purpose::NodeUnmasking`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmasking {
    pub request_id: RequestId,
    /// [`request_digest`] of the round's request.
    pub request_digest: [u8; 32],
    /// [`survivors_digest`] of the survivors this unmasking is for.
    pub survivors_digest: [u8; 32],
    /// The node's signature over [`commitment_message`] ([`crate::envelope::Purpose::RoundCommitment`]):
    /// it settled these survivors for this round.
    pub commitment: Signature,
    /// Reveal step: the node's own mask, word by word (subtract it from the total). Empty
    /// in the settle step.
    pub own_mask: Vec<u64>,
    /// Settle step: what the node's pairwise masks with the dropped nodes added to its
    /// contribution (subtract it from the total). Empty in the reveal step.
    pub dropped_masks: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bincode stores an enum variant as its position, and refusal codes are kept in signed
    /// audit logs: a code must never move. New ones go last.
    #[test]
    fn refusal_codes_keep_their_positions() {
        let pinned = [
            (RefusalCode::MalformedRequest, 0u32),
            (RefusalCode::StudyBudgetExhausted, 11),
            (RefusalCode::NotAddressedToThisNode, 15),
            (RefusalCode::Replayed, 16),
            (RefusalCode::Internal, 22),
            (RefusalCode::PolicyInvalid, 27),
            (RefusalCode::SecureAggregationRequired, 28),
            (RefusalCode::PolicyVersionMismatch, 29),
            (RefusalCode::RoundConflict, 30),
        ];
        for (code, position) in pinned {
            assert_eq!(
                crate::codec::encode(&code).unwrap(),
                crate::codec::encode(&position).unwrap(),
                "{code:?}"
            );
        }
    }

    #[test]
    fn micro_rho_rounds_up_and_rejects_nonsense() {
        assert_eq!(MicroRho::from_rho_ceil(0.5).unwrap(), MicroRho(500_000));
        assert_eq!(MicroRho::from_rho_ceil(1e-7).unwrap(), MicroRho(1));
        assert_eq!(MicroRho::from_rho_ceil(0.0).unwrap(), MicroRho(0));
        assert_eq!(
            "1.5".parse::<MicroEpsilon>().unwrap(),
            MicroEpsilon(1_500_000)
        );
        assert!(MicroRho::from_rho_ceil(-0.1).is_err());
        assert!(MicroRho::from_rho_ceil(f64::NAN).is_err());
        assert!(MicroRho::from_rho_ceil(f64::INFINITY).is_err());
        assert_eq!("0.05".parse::<MicroRho>().unwrap(), MicroRho(50_000));
        assert!("lots".parse::<MicroRho>().is_err());
        assert_eq!(
            MicroRho::from_decimal_rho(0.1 + 0.2).unwrap(),
            MicroRho(300_000)
        );
        assert_eq!(
            MicroRho::from_rho_ceil(0.1 + 0.2).unwrap(),
            MicroRho(300_001)
        );
        assert_eq!(serde_json::to_string(&MicroRho(250_000)).unwrap(), "0.25");
        let back: MicroRho = serde_json::from_str("0.25").unwrap();
        assert_eq!(back, MicroRho(250_000));
    }

    #[test]
    fn refusal_codes_have_stable_names() {
        assert_eq!(
            serde_json::to_string(&RefusalCode::BudgetExhausted).unwrap(),
            "\"budget_exhausted\""
        );
        assert_eq!(RefusalCode::Replayed.as_str(), "replayed");
    }
}

/// One admin's detached signature over a policy bundle's canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSignature {
    pub admin: crate::keys::PublicKey,
    pub signature: Signature,
}

/// A signed policy bundle as it travels between peers: the canonical bundle bytes exactly
/// as signed, and the admins' signatures. Receivers verify before decoding the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTransfer {
    pub bundle: Vec<u8>,
    pub signatures: Vec<AdminSignature>,
}

/// A request on the policy protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyRequest {
    /// "Here is a signed bundle; activate it if it is valid and newer."
    Offer(PolicyTransfer),
    /// "Send me your active bundle."
    Fetch,
}

/// A node's reply on the policy protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyResponse {
    /// The offered bundle is now active.
    Accepted { version: u64, hash: [u8; 32] },
    /// The offered bundle was already active.
    AlreadyActive { version: u64, hash: [u8; 32] },
    /// The offered bundle was refused, with the reason.
    Refused(Refusal),
    /// The active bundle, in answer to `Fetch` (none before the node has one).
    Active(Option<PolicyTransfer>),
}
