//! The demo: a three-hospital testnet, a handful of count queries through the real
//! aggregator, and for each the true count (known only because the data is synthetic), the
//! differentially private estimate, its 95% interval and which nodes answered (a survival
//! comparison as curves against the true ones); then some of them again as secure totals,
//! and a logistic regression of severe disease as a secure fit beside the non-private
//! pooled coefficients.

use std::path::Path;

use renkei_aggregator::combine::{Estimate, GroupEstimate};
use renkei_aggregator::results::{Regression, Survival};
use renkei_aggregator::sql;
use renkei_aggregator::{AnswerMode, NetworkClient, QueryOptions, ResearcherSession};
use renkei_policies::SignedPolicy;
use renkei_protocol::SecretKey;

use crate::network::{Testnet, TestnetConfig};
use crate::synth::TrueValue;

/// The questions the demo asks.
pub const DEMO_QUERIES: &[&str] = &[
    "SELECT COUNT(*) FROM patients",
    "SELECT COUNT(*) FROM patients WHERE age >= 65",
    "SELECT COUNT(*) FROM patients WHERE age >= 65 AND diabetes",
    "SELECT COUNT(*) FROM patients WHERE severity = 'critical'",
    "SELECT COUNT(*) FROM patients WHERE sex = 'female' AND severity = 'severe' AND hypertension",
    "SELECT COUNT(*) FROM patients WHERE age BETWEEN 20 AND 39 AND NOT obesity",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE il6 > 100 AND dexamethasone",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE care_level IN ('icu_ventilation', 'ecmo') OR crp >= 20",
    "SELECT COUNT(*) FROM patients WHERE has_ct AND severity >= 'severe'",
    "SELECT AVG(il6) FROM timepoints WHERE severity = 'critical'",
    "SELECT MEDIAN(age) FROM patients WHERE severity >= 'severe'",
    "SELECT sex, severity, COUNT(*) FROM patients WHERE age >= 65 GROUP BY sex, severity",
    SURVIVAL_DEMO_QUERY,
];

/// Time to death by diabetes, censored at the end of follow-up: a Kaplan–Meier comparison.
pub const SURVIVAL_DEMO_QUERY: &str = "SELECT diabetes, \
    KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 60) \
    FROM patients GROUP BY diabetes";

/// Asked again as secure totals: each hospital adds a share of the noise under pairwise
/// masks, so only the sum is readable, with a third of the per-site noise variance.
pub const SECURE_DEMO_QUERIES: &[&str] = &[
    "SELECT COUNT(*) FROM patients WHERE age >= 65 AND diabetes",
    "SELECT MEDIAN(age) FROM patients WHERE severity >= 'severe'",
    SURVIVAL_DEMO_QUERY,
];

/// Which comorbidities raise the odds of severe COVID-19, adjusted for age and sex: a
/// logistic fit by Newton steps over the network, asked as a secure total.
pub const REGRESSION_DEMO_QUERY: &str = "SELECT LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), \
    age, diabetes, hypertension, sex = 'male') FROM patients";

/// The regression's budget per node: a fit of several steps needs more than one count.
pub const REGRESSION_DEMO_RHO: renkei_protocol::MicroRho = renkei_protocol::MicroRho(1_000_000);

/// One line of the demo's report.
#[derive(Debug, Clone)]
pub struct DemoRow {
    pub sql: String,
    /// Known only because the data is synthetic.
    pub truth: TrueValue,
    pub estimate: Option<Estimate>,
    pub ci95: Option<[f64; 2]>,
    pub groups: Vec<GroupEstimate>,
    /// A survival query's curves.
    pub survival: Option<Survival>,
    /// A regression's coefficients.
    pub regression: Option<Regression>,
    /// Why there is no estimate, if so.
    pub note: Option<String>,
    pub answered: Vec<String>,
    pub missing_or_refused: Vec<String>,
    /// Per-site answers added up, or a secure total (no hospital's own answer visible).
    pub mode: AnswerMode,
}

/// Runs the demo in `dir` and returns its report. Everything is shut down afterwards.
pub async fn run(dir: &Path, patients: usize, seed: u64) -> anyhow::Result<Vec<DemoRow>> {
    let mut config = TestnetConfig::new(dir);
    config.patients = patients;
    config.seed = seed;
    let testnet = Testnet::start(config).await?;
    let result = ask_all(&testnet).await;
    testnet.shutdown().await;
    result
}

async fn ask_all(testnet: &Testnet) -> anyhow::Result<Vec<DemoRow>> {
    let key = SecretKey::read_file(&testnet.consortium.researcher_key)?;
    let policy = SignedPolicy::read_file(&testnet.consortium.policy)?.verify_self_anchored()?;
    // The aggregator listens too, on a random port, as a peer of the network.
    let client = NetworkClient::start(Some(renkei_node::service::default_listen())).await?;
    let session = ResearcherSession::new(key, policy, client);
    let options = session.default_options()?;
    let secure = QueryOptions {
        secure: true,
        ..options.clone()
    };
    let fit = QueryOptions {
        privacy: renkei_protocol::PrivacyRequest::Zcdp {
            rho: REGRESSION_DEMO_RHO,
        },
        ..secure.clone()
    };
    let nodes = testnet.addresses();
    let mut rows = Vec::with_capacity(DEMO_QUERIES.len() + SECURE_DEMO_QUERIES.len() + 1);
    let asks = DEMO_QUERIES
        .iter()
        .map(|q| (q, &options))
        .chain(SECURE_DEMO_QUERIES.iter().map(|q| (q, &secure)))
        .chain(std::iter::once((&REGRESSION_DEMO_QUERY, &fit)));
    for (sql_text, options) in asks {
        let truth = testnet.true_value(&sql::compile(sql_text)?);
        let answer = session.query(&nodes, sql_text, options).await?;
        rows.push(DemoRow {
            sql: sql_text.to_string(),
            truth,
            estimate: answer.estimate,
            ci95: answer.ci95,
            groups: answer.groups,
            survival: answer.survival,
            regression: answer.regression,
            note: answer.note,
            answered: answer
                .answered
                .iter()
                .map(|a| a.institution.clone())
                .collect(),
            missing_or_refused: answer
                .missing
                .iter()
                .map(|m| format!("{} ({})", m.address, m.reason))
                .chain(
                    answer
                        .refused
                        .iter()
                        .map(|r| format!("{} ({})", r.institution, r.code)),
                )
                .collect(),
            mode: answer.mode,
        });
    }
    Ok(rows)
}
