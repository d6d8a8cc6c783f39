//! Evaluating a request against the active policy: is this researcher approved for this
//! study, and may one query spend this much? The budget itself is kept by each node's ledger;
//! the policy only says how large it is.

use renkei_protocol::{MicroRho, PublicKey, Refusal, RefusalCode};

use crate::signed::VerifiedPolicy;

/// What the policy allows a researcher on one study.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub researcher: String,
    pub study: String,
    /// Total rho the researcher may spend on this study at each node.
    pub budget: MicroRho,
    /// The most one query may cost.
    pub max_rho_per_query: MicroRho,
    /// The node's cap over everyone, if any.
    pub dataset_budget: Option<MicroRho>,
    pub min_cell_size: u64,
    pub report_delta: f64,
    policy_version: u64,
}

impl VerifiedPolicy {
    /// Decides whether `researcher` may query `study` at all; a refusal says why.
    pub fn authorize(&self, researcher: &PublicKey, study: &str) -> Result<Grant, Refusal> {
        let bundle = self.bundle();
        let Some(entry) = bundle.researcher(researcher) else {
            return Err(Refusal::new(
                RefusalCode::UnknownResearcher,
                format!(
                    "key {researcher} is not an approved researcher in policy v{} ({})",
                    bundle.version, bundle.consortium
                ),
            ));
        };
        if !entry.studies.iter().any(|s| s == study) {
            return Err(Refusal::new(
                RefusalCode::StudyNotApproved,
                format!(
                    "{} is not approved for study `{study}`; approved: {}",
                    entry.name,
                    entry.studies.join(", ")
                ),
            ));
        }
        Ok(Grant {
            researcher: entry.name.clone(),
            study: study.to_string(),
            budget: entry.budget_rho,
            max_rho_per_query: bundle.limits.max_rho_per_query,
            dataset_budget: bundle.limits.dataset_budget_rho,
            min_cell_size: bundle.limits.min_cell_size,
            report_delta: bundle.limits.report_delta,
            policy_version: bundle.version,
        })
    }
}

impl Grant {
    /// Checks one query's cost (as the node's mechanism computed it) against the per-query
    /// limit.
    pub fn check_cost(&self, cost: MicroRho) -> Result<(), Refusal> {
        if cost.0 == 0 || cost > self.max_rho_per_query {
            return Err(Refusal::new(
                RefusalCode::PrivacyParameterOutOfRange,
                format!(
                    "this query would cost rho {cost}; policy v{} allows (0, {}] per query",
                    self.policy_version, self.max_rho_per_query
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PolicyBundle, QueryLimits, Researcher, SignedPolicy};
    use renkei_protocol::SecretKey;

    fn policy(researcher: &SecretKey) -> VerifiedPolicy {
        let admin = SecretKey::generate().unwrap();
        let bundle = PolicyBundle {
            version: 1,
            consortium: "test".into(),
            admins: vec![admin.public_key()],
            threshold: 1,
            members: vec![],
            researchers: vec![Researcher {
                name: "Dr. Tanaka".into(),
                public_key: researcher.public_key(),
                budget_rho: MicroRho(1_000_000),
                studies: vec!["severity".into()],
            }],
            limits: QueryLimits {
                max_rho_per_query: MicroRho(200_000),
                ..QueryLimits::default()
            },
        };
        let mut signed = SignedPolicy::unsigned(&bundle).unwrap();
        signed.sign(&admin);
        signed.verify_self_anchored().unwrap()
    }

    #[test]
    fn each_refusal_has_its_own_code() {
        let researcher = SecretKey::generate().unwrap();
        let policy = policy(&researcher);
        let me = researcher.public_key();
        let grant = policy.authorize(&me, "severity").unwrap();
        assert_eq!(grant.budget, MicroRho(1_000_000));
        grant.check_cost(MicroRho(200_000)).unwrap();

        let stranger = SecretKey::generate().unwrap().public_key();
        let code = |r: Result<Grant, Refusal>| r.unwrap_err().code;
        assert_eq!(
            code(policy.authorize(&stranger, "severity")),
            RefusalCode::UnknownResearcher
        );
        assert_eq!(
            code(policy.authorize(&me, "genomes")),
            RefusalCode::StudyNotApproved
        );
        assert_eq!(
            grant.check_cost(MicroRho(200_001)).unwrap_err().code,
            RefusalCode::PrivacyParameterOutOfRange
        );
        assert_eq!(
            grant.check_cost(MicroRho(0)).unwrap_err().code,
            RefusalCode::PrivacyParameterOutOfRange
        );
    }
}
