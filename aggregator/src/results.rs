//! What a federated query yields: every node's verified answer, quote, refusal or absence,
//! and the combined estimate. Plain result types, filled by the fan-out
//! ([`crate::federation`]) and the combination ([`crate::combine`]), read by the printers
//! ([`crate::report`]) and serialised as the `--format json` output.

use renkei_protocol::{Answer, Mechanism, MicroRho, RefusalCode, Release};
use serde::Serialize;

pub use renkei_engine::{
    Coefficient, Estimate, GroupEstimate, LogRank, Model, Regression, Survival, SurvivalCurve, Z_95,
};

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

/// The steps of a logistic fit as they were asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitSteps {
    /// Each step's request id, in order (the first opened the fit).
    pub requests: Vec<String>,
    /// Each step's share of the fit's rho at every node (the last step takes half).
    pub rho_per_step: Vec<f64>,
    /// What each node was charged for the whole fit, at its first step.
    pub rho_charged: Vec<(String, f64)>,
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
    /// A `KAPLAN_MEIER` query's curves (one per stratum, day by day with band and numbers
    /// at risk), median survival and log-rank test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub survival: Option<Survival>,
    /// A regression's coefficients, standard errors, intervals (odds ratios for a logistic
    /// fit), patients, steps and convergence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regression: Option<Regression>,
    /// A logistic fit's steps: one signed request each, the first charged for all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitSteps>,
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

/// A verified answer as reported per node.
pub fn node_answer(node: String, institution: String, answer: Answer) -> NodeAnswer {
    let scale = 10f64.powi(i32::from(answer.value_scale));
    let (value, suppressed, ci95) = match &answer.release {
        Release::Scalar {
            suppressed: true, ..
        } => {
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
        // Not one number: the release itself says what the node sent.
        Release::SumAndCount { .. }
        | Release::Histogram { .. }
        | Release::Groups { .. }
        | Release::Masked { .. }
        | Release::Cells { .. }
        | Release::Regression { .. } => (None, false, None),
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
