//! The policy bundle as people write it (TOML): consortium admins and their signature
//! threshold, member nodes, researchers, approved studies with their terms, rules for
//! sensitive data, revoked keys, and per-query limits.
//!
//! A study is the unit of approval: which researchers, which views, columns and
//! aggregations, how much privacy per researcher and in all, the minimum cell size, and the
//! window in which it may be queried. Sensitive views (e.g. host genome) are usable only
//! through a study that names them *and* in a bundle signed by more admins than usual
//! ([`SensitiveRule::signatures_required`]).

use std::collections::BTreeSet;
use std::fmt;

use renkei_protocol::{MicroRho, PublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::PolicyError;

/// Aggregations a study may allow, by name.
pub const AGGREGATIONS: &[&str] = &[
    "count",
    "sum",
    "mean",
    "median",
    "quantile",
    "histogram",
    "kaplan_meier",
    "linear_regression",
    "logistic_regression",
];

/// One version of the consortium's rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBundle {
    /// Increases with every published change; nodes never go back to a lower version.
    pub version: u64,
    /// The consortium's name, e.g. `covid19-japan`.
    pub consortium: String,
    /// Public keys of the consortium admins who may sign this bundle.
    pub admins: Vec<PublicKey>,
    /// How many distinct admins must sign for the bundle to be valid.
    pub threshold: u32,
    /// Hospitals whose nodes belong to the network.
    #[serde(default)]
    pub members: Vec<Member>,
    /// People who may be approved for studies.
    #[serde(default)]
    pub researchers: Vec<Researcher>,
    /// Approved studies and their terms.
    #[serde(default)]
    pub studies: Vec<Study>,
    /// Stricter rules for sensitive views.
    #[serde(default)]
    pub sensitive: Vec<SensitiveRule>,
    /// Researcher keys that may no longer query, whatever a study says.
    #[serde(default)]
    pub revoked: Vec<PublicKey>,
    #[serde(default)]
    pub limits: QueryLimits,
}

/// A member hospital's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The node's libp2p peer id (base58), derived from its ed25519 key.
    pub peer_id: String,
    pub institution: String,
    /// Where the node can be reached (multiaddrs), so peers can fetch policy updates.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A person who may be approved for studies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Researcher {
    pub name: String,
    pub public_key: PublicKey,
    #[serde(default)]
    pub affiliation: String,
}

/// An approved study: who may ask what, how much, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    pub id: String,
    pub title: String,
    pub principal_investigator: String,
    /// Keys of the researchers approved for this study.
    pub researchers: Vec<PublicKey>,
    /// Views the study may query.
    pub views: Vec<String>,
    /// Columns the study may use; empty means every column of the allowed views.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Aggregations the study may use (see [`AGGREGATIONS`]).
    pub aggregations: Vec<String>,
    /// Rho each approved researcher may spend on this study at each node.
    pub budget_rho_per_researcher: MicroRho,
    /// Rho all researchers together may spend on this study at each node.
    #[serde(default)]
    pub budget_rho: Option<MicroRho>,
    /// Raises the consortium's minimum cell size for this study.
    #[serde(default)]
    pub min_cell_size: Option<u64>,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    /// Sensitive views granted to this study (each needs its [`SensitiveRule`]).
    #[serde(default)]
    pub sensitive_views: Vec<String>,
    /// Whether nodes may answer one by one; when false only secure totals (no node's own
    /// answer visible to anyone) are allowed.
    #[serde(default = "yes")]
    pub per_site_answers: bool,
}

fn yes() -> bool {
    true
}

/// Stricter terms for a sensitive view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitiveRule {
    pub view: String,
    /// Aggregations allowed on this view, whatever a study allows.
    pub aggregations: Vec<String>,
    /// Minimum cell size on this view (applies if larger than the study's).
    pub min_cell_size: u64,
    /// Admin signatures the bundle needs for a grant of this view to take effect.
    pub signatures_required: u32,
}

/// Limits that apply to every query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryLimits {
    /// The most rho a single query may cost at a node.
    pub max_rho_per_query: MicroRho,
    /// Noisy counts below this are withheld (reported only as "below the minimum").
    #[serde(default = "default_min_cell_size")]
    pub min_cell_size: u64,
    /// The delta at which each answer's zCDP cost is also stated as (epsilon, delta)-DP.
    #[serde(default = "default_report_delta")]
    pub report_delta: f64,
    /// The most rho each node may spend over all researchers and studies together (the
    /// dataset's global cap); none when absent.
    #[serde(default)]
    pub dataset_budget_rho: Option<MicroRho>,
    /// In secure totals, how many nodes may collude with the aggregator without weakening
    /// the guarantee (each noise share is sized for the others; accuracy costs
    /// `sqrt(n / (n - t))`).
    #[serde(default)]
    pub secure_colluders: u32,
}

fn default_report_delta() -> f64 {
    1e-6
}

fn default_min_cell_size() -> u64 {
    10
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_rho_per_query: MicroRho(MicroRho::PER_RHO),
            min_cell_size: default_min_cell_size(),
            report_delta: default_report_delta(),
            dataset_budget_rho: None,
            secure_colluders: 0,
        }
    }
}

/// A moment in UTC, written as RFC 3339 (`2026-04-01T00:00:00Z`) by people and stored as
/// Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let time = humantime::parse_rfc3339_weak(text.trim()).map_err(|e| {
            PolicyError::Parse(format!(
                "`{text}` is not an RFC 3339 time such as 2026-04-01T00:00:00Z: {e}"
            ))
        })?;
        let secs = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| PolicyError::Parse(format!("`{text}` is before 1970")))?;
        Ok(Self(secs.as_secs()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.0);
        write!(f, "{}", humantime::format_rfc3339_seconds(time))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_string())
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            Timestamp::parse(&text).map_err(serde::de::Error::custom)
        } else {
            Ok(Self(u64::deserialize(deserializer)?))
        }
    }
}

impl PolicyBundle {
    /// Parses the TOML source and checks it is internally consistent.
    pub fn from_toml(source: &str) -> Result<Self, PolicyError> {
        let bundle: Self = toml::from_str(source).map_err(|e| PolicyError::Parse(e.to_string()))?;
        bundle.validate()?;
        Ok(bundle)
    }

    pub fn to_toml(&self) -> Result<String, PolicyError> {
        toml::to_string_pretty(self).map_err(|e| PolicyError::Parse(e.to_string()))
    }

    /// Internal consistency: reachable thresholds, no duplicates, parseable peer ids,
    /// studies that name known researchers, known aggregations and ruled sensitive views.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let invalid = |reason: String| Err(PolicyError::Invalid(reason));
        let distinct_admins: BTreeSet<_> = self.admins.iter().collect();
        if distinct_admins.len() != self.admins.len() {
            return invalid("an admin key is listed twice".into());
        }
        if self.threshold == 0 || self.threshold as usize > self.admins.len() {
            return invalid(format!(
                "threshold {} is not between 1 and the number of admins ({})",
                self.threshold,
                self.admins.len()
            ));
        }
        let mut peers = BTreeSet::new();
        for member in &self.members {
            member
                .peer_id
                .parse::<libp2p_identity::PeerId>()
                .map_err(|e| {
                    PolicyError::Invalid(format!(
                        "member `{}` has peer id `{}` that does not parse: {e}",
                        member.institution, member.peer_id
                    ))
                })?;
            if !peers.insert(&member.peer_id) {
                return invalid(format!("member peer id {} is listed twice", member.peer_id));
            }
        }
        let mut keys = BTreeSet::new();
        for researcher in &self.researchers {
            if !keys.insert(researcher.public_key) {
                return invalid(format!(
                    "researcher key {} is listed twice",
                    researcher.public_key
                ));
            }
        }
        if !(self.limits.report_delta > 0.0 && self.limits.report_delta < 1.0) {
            return invalid(format!(
                "limits.report_delta {} is not strictly between 0 and 1",
                self.limits.report_delta
            ));
        }
        let mut sensitive_views = BTreeSet::new();
        for rule in &self.sensitive {
            if !sensitive_views.insert(rule.view.as_str()) {
                return invalid(format!("sensitive view `{}` has two rules", rule.view));
            }
            if rule.signatures_required < self.threshold
                || rule.signatures_required as usize > self.admins.len()
            {
                return invalid(format!(
                    "sensitive view `{}` requires {} signatures; it must be between the threshold ({}) and the number of admins ({})",
                    rule.view,
                    rule.signatures_required,
                    self.threshold,
                    self.admins.len()
                ));
            }
            check_aggregations(
                &format!("sensitive view `{}`", rule.view),
                &rule.aggregations,
            )?;
        }
        let mut study_ids = BTreeSet::new();
        for study in &self.studies {
            let context = format!("study `{}`", study.id);
            if !study_ids.insert(study.id.as_str()) {
                return invalid(format!("{context} is listed twice"));
            }
            if study.valid_from >= study.valid_until {
                return invalid(format!(
                    "{context} is valid from {} until {}: an empty window",
                    study.valid_from, study.valid_until
                ));
            }
            if let Some(stranger) = study.researchers.iter().find(|k| !keys.contains(*k)) {
                return invalid(format!(
                    "{context} approves {stranger}, who is not in [[researchers]]"
                ));
            }
            if study.views.is_empty() {
                return invalid(format!("{context} allows no view"));
            }
            check_aggregations(&context, &study.aggregations)?;
            if let Some(unruled) = study
                .sensitive_views
                .iter()
                .find(|v| !sensitive_views.contains(v.as_str()))
            {
                return invalid(format!(
                    "{context} grants sensitive view `{unruled}`, which has no [[sensitive]] rule"
                ));
            }
        }
        Ok(())
    }

    pub fn researcher(&self, key: &PublicKey) -> Option<&Researcher> {
        self.researchers.iter().find(|r| &r.public_key == key)
    }

    pub fn study(&self, id: &str) -> Option<&Study> {
        self.studies.iter().find(|s| s.id == id)
    }

    pub fn member(&self, peer_id: &libp2p_identity::PeerId) -> Option<&Member> {
        let text = peer_id.to_base58();
        self.members.iter().find(|m| m.peer_id == text)
    }

    pub fn sensitive_rule(&self, view: &str) -> Option<&SensitiveRule> {
        self.sensitive.iter().find(|r| r.view == view)
    }

    /// Studies `key` is approved for.
    pub fn studies_of(&self, key: &PublicKey) -> Vec<&Study> {
        self.studies
            .iter()
            .filter(|s| s.researchers.contains(key))
            .collect()
    }
}

impl PolicyBundle {
    /// A version-1 bundle with one admin and one study, for development networks and tests:
    /// `researcher` may count anything in the covid19 views under `study_id` (the sensitive
    /// `host_genome` included, under its stricter rule), with `budget` per node, from a day
    /// before `now` for a year.
    pub fn development(
        admin: PublicKey,
        members: Vec<Member>,
        researcher: Researcher,
        study_id: &str,
        budget: MicroRho,
        limits: QueryLimits,
        now: u64,
    ) -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Self {
            version: 1,
            consortium: "renkei-dev".into(),
            admins: vec![admin],
            threshold: 1,
            members,
            studies: vec![Study {
                id: study_id.into(),
                title: "Development study".into(),
                principal_investigator: researcher.name.clone(),
                researchers: vec![researcher.public_key],
                views: [
                    "patients",
                    "timepoints",
                    "ct",
                    "viral_genome",
                    "rna_seq",
                    "immune_repertoire",
                ]
                .map(String::from)
                .to_vec(),
                columns: vec![],
                aggregations: AGGREGATIONS.iter().map(|a| a.to_string()).collect(),
                budget_rho_per_researcher: budget,
                budget_rho: None,
                min_cell_size: None,
                valid_from: Timestamp(now.saturating_sub(DAY)),
                valid_until: Timestamp(now + 365 * DAY),
                sensitive_views: vec!["host_genome".into()],
                per_site_answers: true,
            }],
            researchers: vec![researcher],
            sensitive: vec![SensitiveRule {
                view: "host_genome".into(),
                aggregations: vec!["count".into()],
                min_cell_size: limits.min_cell_size.max(10),
                signatures_required: 1,
            }],
            revoked: vec![],
            limits,
        }
    }
}

fn check_aggregations(context: &str, aggregations: &[String]) -> Result<(), PolicyError> {
    match aggregations
        .iter()
        .find(|a| !AGGREGATIONS.contains(&a.as_str()))
    {
        Some(unknown) => Err(PolicyError::Invalid(format!(
            "{context} names aggregation `{unknown}`; known: {}",
            AGGREGATIONS.join(", ")
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"
version = 3
consortium = "covid19-dev"
admins = [
  "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
  "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c",
]
threshold = 1
revoked = []

[[members]]
peer_id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
institution = "Hospital A"

[[researchers]]
name = "Dr. Sato"
public_key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"

[[studies]]
id = "severity-2026"
title = "Risk factors for severe COVID-19"
principal_investigator = "Dr. Sato"
researchers = ["d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"]
views = ["patients"]
columns = ["age", "sex", "severity", "diabetes"]
aggregations = ["count"]
budget_rho_per_researcher = 2.5
budget_rho = 10.0
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2027-12-31T23:59:59Z"
sensitive_views = ["host_genome"]

[[sensitive]]
view = "host_genome"
aggregations = ["count"]
min_cell_size = 20
signatures_required = 2

[limits]
max_rho_per_query = 0.5
min_cell_size = 5
dataset_budget_rho = 40.0
"#;

    #[test]
    fn parses_the_documented_toml() {
        let bundle = PolicyBundle::from_toml(SAMPLE).unwrap();
        assert_eq!(bundle.version, 3);
        let study = bundle.study("severity-2026").unwrap();
        assert_eq!(study.budget_rho_per_researcher, MicroRho(2_500_000));
        assert_eq!(study.valid_from, Timestamp(1_767_225_600));
        assert_eq!(bundle.limits.max_rho_per_query, MicroRho(500_000));
        assert_eq!(bundle.limits.min_cell_size, 5);
        assert_eq!(bundle.limits.report_delta, 1e-6);
        assert_eq!(
            bundle.sensitive_rule("host_genome").unwrap().min_cell_size,
            20
        );
        let again = PolicyBundle::from_toml(&bundle.to_toml().unwrap()).unwrap();
        assert_eq!(again, bundle);
    }

    #[test]
    fn inconsistent_bundles_are_rejected_with_a_reason() {
        let reason = |source: String| PolicyBundle::from_toml(&source).unwrap_err().to_string();
        assert!(reason(SAMPLE.replace("threshold = 1", "threshold = 3")).contains("threshold 3"));
        assert!(reason(SAMPLE.replace("12D3KooWDpJ7", "nonsense")).contains("does not parse"));
        assert!(
            reason(SAMPLE.replace("threshold = 1", "threshold = 1\nbudget = 9"))
                .contains("unknown field")
        );
        assert!(reason(SAMPLE.replace("2027-12-31", "2025-12-31")).contains("empty window"));
        assert!(
            reason(SAMPLE.replace(
                "aggregations = [\"count\"]\nbudget",
                "aggregations = [\"mode\"]\nbudget"
            ))
            .contains("aggregation `mode`")
        );
        assert!(
            reason(SAMPLE.replace("signatures_required = 2", "signatures_required = 3"))
                .contains("requires 3 signatures")
        );
        assert!(
            reason(SAMPLE.replace("view = \"host_genome\"", "view = \"rna_seq\""))
                .contains("no [[sensitive]] rule")
        );
        assert!(reason(SAMPLE.replace("2026-01-01T00:00:00Z", "next spring")).contains("RFC 3339"));
    }
}
