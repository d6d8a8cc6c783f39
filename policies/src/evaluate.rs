//! Evaluating a request against the active policy: is this researcher approved for this
//! study, and may one query spend this much? The budget itself is kept by each node's ledger;
//! the policy only says how large it is.

use renkei_protocol::{MicroRho, PublicKey, Refusal, RefusalCode};

use crate::signed::VerifiedPolicy;

/// What the policy allows a researcher on one study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub researcher: String,
    pub study: String,
    /// Total rho the researcher may spend on this study at each node.
    pub budget: MicroRho,
}

impl VerifiedPolicy {
    /// Decides whether `researcher` may ask for `rho` on `study`; a refusal says why.
    pub fn authorize(
        &self,
        researcher: &PublicKey,
        study: &str,
        rho: MicroRho,
    ) -> Result<Grant, Refusal> {
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
        if rho.0 == 0 || rho > bundle.limits.max_rho_per_query {
            return Err(Refusal::new(
                RefusalCode::PrivacyParameterOutOfRange,
                format!(
                    "rho {rho} per query is outside (0, {}] allowed by policy v{}",
                    bundle.limits.max_rho_per_query, bundle.version
                ),
            ));
        }
        Ok(Grant {
            researcher: entry.name.clone(),
            study: study.to_string(),
            budget: entry.budget_rho,
        })
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
        let grant = policy.authorize(&me, "severity", MicroRho(50_000)).unwrap();
        assert_eq!(grant.budget, MicroRho(1_000_000));

        let stranger = SecretKey::generate().unwrap().public_key();
        let code = |r: Result<Grant, Refusal>| r.unwrap_err().code;
        assert_eq!(
            code(policy.authorize(&stranger, "severity", MicroRho(1))),
            RefusalCode::UnknownResearcher
        );
        assert_eq!(
            code(policy.authorize(&me, "genomes", MicroRho(1))),
            RefusalCode::StudyNotApproved
        );
        assert_eq!(
            code(policy.authorize(&me, "severity", MicroRho(200_001))),
            RefusalCode::PrivacyParameterOutOfRange
        );
        assert_eq!(
            code(policy.authorize(&me, "severity", MicroRho(0))),
            RefusalCode::PrivacyParameterOutOfRange
        );
    }
}
