//! The policy bundle as people write it (TOML): consortium admins, member nodes, researchers
//! with their studies and budgets, and per-query limits.

use std::collections::BTreeSet;

use renkei_protocol::{MicroRho, PublicKey};
use serde::{Deserialize, Serialize};

use crate::signed::PolicyError;

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
    /// Researchers approved to query, with their studies and budgets.
    #[serde(default)]
    pub researchers: Vec<Researcher>,
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
}

/// An approved researcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Researcher {
    pub name: String,
    pub public_key: PublicKey,
    /// zCDP budget (rho) for each study, at each node.
    pub budget_rho: MicroRho,
    /// Studies this researcher may query.
    pub studies: Vec<String>,
}

/// Limits that apply to every query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryLimits {
    /// The most rho a single query may cost at a node.
    pub max_rho_per_query: MicroRho,
    /// Noisy counts below this are withheld (reported only as "below the minimum").
    #[serde(default)]
    pub min_cell_size: u64,
    /// The delta at which each answer's zCDP cost is also stated as (epsilon, delta)-DP.
    #[serde(default = "default_report_delta")]
    pub report_delta: f64,
    /// The most rho each node may spend over all researchers and studies together (the
    /// dataset's global cap); none when absent.
    #[serde(default)]
    pub dataset_budget_rho: Option<MicroRho>,
}

fn default_report_delta() -> f64 {
    1e-6
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_rho_per_query: MicroRho(MicroRho::PER_RHO),
            min_cell_size: 10,
            report_delta: default_report_delta(),
            dataset_budget_rho: None,
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

    /// Internal consistency: a reachable threshold, no duplicate keys or peers, parseable
    /// peer ids.
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
        if !(self.limits.report_delta > 0.0 && self.limits.report_delta < 1.0) {
            return invalid(format!(
                "limits.report_delta {} is not strictly between 0 and 1",
                self.limits.report_delta
            ));
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
        Ok(())
    }

    pub fn researcher(&self, key: &PublicKey) -> Option<&Researcher> {
        self.researchers.iter().find(|r| &r.public_key == key)
    }

    pub fn member(&self, peer_id: &libp2p_identity::PeerId) -> Option<&Member> {
        let text = peer_id.to_base58();
        self.members.iter().find(|m| m.peer_id == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
version = 3
consortium = "covid19-dev"
admins = ["3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"]
threshold = 1

[[members]]
peer_id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
institution = "Hospital A"

[[researchers]]
name = "Dr. Sato"
public_key = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
budget_rho = 2.5
studies = ["severity-2026"]

[limits]
max_rho_per_query = 0.5
min_cell_size = 5
dataset_budget_rho = 40.0
"#;

    #[test]
    fn parses_the_documented_toml() {
        let bundle = PolicyBundle::from_toml(SAMPLE).unwrap();
        assert_eq!(bundle.version, 3);
        assert_eq!(bundle.researchers[0].budget_rho, MicroRho(2_500_000));
        assert_eq!(bundle.limits.max_rho_per_query, MicroRho(500_000));
        assert_eq!(bundle.limits.min_cell_size, 5);
        assert_eq!(bundle.limits.report_delta, 1e-6);
        assert_eq!(
            bundle.limits.dataset_budget_rho,
            Some(MicroRho(40 * MicroRho::PER_RHO))
        );
        let again = PolicyBundle::from_toml(&bundle.to_toml().unwrap()).unwrap();
        assert_eq!(again, bundle);
    }

    #[test]
    fn inconsistent_bundles_are_rejected_with_a_reason() {
        let unreachable = SAMPLE.replace("threshold = 1", "threshold = 2");
        let err = PolicyBundle::from_toml(&unreachable).unwrap_err();
        assert!(err.to_string().contains("threshold 2"), "{err}");
        let bad_peer = SAMPLE.replace("12D3KooWDpJ7", "nonsense");
        assert!(matches!(
            PolicyBundle::from_toml(&bad_peer),
            Err(PolicyError::Invalid(_))
        ));
        let unknown_field = SAMPLE.replace("threshold = 1", "threshold = 1\nbudget = 9");
        assert!(matches!(
            PolicyBundle::from_toml(&unknown_field),
            Err(PolicyError::Parse(_))
        ));
    }
}
