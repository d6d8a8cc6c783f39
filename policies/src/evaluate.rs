//! Evaluating a request against the active policy: is the researcher's key revoked, are
//! they approved for this study, is the study within its validity window, do the view,
//! columns and aggregation fall within its terms, and is a sensitive view granted by a
//! bundle with enough admin signatures? The answer is a [`Grant`] carrying the budgets and
//! limits the node then enforces, or a [`Refusal`] with its own code. The budget itself is
//! kept by each node's ledger; the policy only says how large it is.

use renkei_protocol::{MicroRho, PublicKey, Query, Refusal, RefusalCode};

use crate::signed::VerifiedPolicy;

/// What the policy allows one researcher for one query on one study.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub researcher: String,
    pub study: String,
    /// Rho this researcher may spend on this study at each node.
    pub budget_per_researcher: MicroRho,
    /// Rho all researchers together may spend on this study at each node.
    pub study_budget: Option<MicroRho>,
    /// The node's cap over everyone, if any.
    pub dataset_budget: Option<MicroRho>,
    /// The most one query may cost.
    pub max_rho_per_query: MicroRho,
    /// The largest of the consortium's, the study's and a sensitive view's minimum.
    pub min_cell_size: u64,
    pub report_delta: f64,
    /// Whether per-site answers are allowed (else only secure totals).
    pub per_site_answers: bool,
    /// Nodes that may collude with the aggregator in a secure total.
    pub secure_colluders: u32,
    policy_version: u64,
}

impl VerifiedPolicy {
    /// Decides whether `researcher` may ask `query` within `study` at time `now` (Unix
    /// seconds); a refusal says why.
    pub fn authorize(
        &self,
        researcher: &PublicKey,
        study_id: &str,
        query: &Query,
        now: u64,
    ) -> Result<Grant, Refusal> {
        let bundle = self.bundle();
        let v = bundle.version;
        let refuse = |code, reason: String| Err(Refusal::new(code, reason));
        if bundle.revoked.contains(researcher) {
            return refuse(
                RefusalCode::ResearcherRevoked,
                format!("key {researcher} was revoked by the consortium (policy v{v})"),
            );
        }
        let Some(person) = bundle.researcher(researcher) else {
            return refuse(
                RefusalCode::UnknownResearcher,
                format!(
                    "key {researcher} is not an approved researcher in policy v{v} ({})",
                    bundle.consortium
                ),
            );
        };
        let Some(study) = bundle
            .study(study_id)
            .filter(|s| s.researchers.contains(researcher))
        else {
            let approved: Vec<&str> = bundle
                .studies_of(researcher)
                .iter()
                .map(|s| s.id.as_str())
                .collect();
            return refuse(
                RefusalCode::StudyNotApproved,
                format!(
                    "{} is not approved for study `{study_id}` in policy v{v}; approved: {}",
                    person.name,
                    if approved.is_empty() {
                        "none".into()
                    } else {
                        approved.join(", ")
                    }
                ),
            );
        };
        if now < study.valid_from.0 {
            return refuse(
                RefusalCode::StudyNotYetValid,
                format!(
                    "study `{study_id}` may be queried from {}",
                    study.valid_from
                ),
            );
        }
        if now > study.valid_until.0 {
            return refuse(
                RefusalCode::StudyExpired,
                format!(
                    "study `{study_id}` ended at {}; ask the consortium to extend it",
                    study.valid_until
                ),
            );
        }
        let view = query.source_view();
        let aggregations = query.required_aggregations();
        let mut min_cell_size = bundle
            .limits
            .min_cell_size
            .max(study.min_cell_size.unwrap_or(0));
        // A sensitive kind is touched by querying its view or by reading its presence flag
        // (`has_<kind>`) from another view; either needs the stricter grant.
        let mut sensitive: Vec<&str> = vec![view];
        sensitive.extend(
            query
                .columns()
                .into_iter()
                .filter_map(|c| c.strip_prefix("has_")),
        );
        for touched in sensitive {
            let Some(rule) = bundle.sensitive_rule(touched) else {
                continue;
            };
            if !study.sensitive_views.iter().any(|s| s == touched) {
                return refuse(
                    RefusalCode::SensitiveNotGranted,
                    format!("`{touched}` is sensitive and study `{study_id}` has no grant for it"),
                );
            }
            let signed = self.admin_signatures();
            if signed < rule.signatures_required as usize {
                return refuse(
                    RefusalCode::SensitiveNotGranted,
                    format!(
                        "the grant of sensitive `{touched}` needs {} admin signatures; policy v{v} has {signed}",
                        rule.signatures_required
                    ),
                );
            }
            if let Some(aggregation) = aggregations
                .iter()
                .find(|name| !rule.aggregations.iter().any(|a| a == *name))
            {
                return refuse(
                    RefusalCode::AggregationNotAllowed,
                    format!(
                        "on sensitive `{touched}` only {} may be computed, not {aggregation}",
                        rule.aggregations.join(", ")
                    ),
                );
            }
            min_cell_size = min_cell_size.max(rule.min_cell_size);
        }
        let granted_sensitive = bundle.sensitive_rule(view).is_some();
        if !granted_sensitive && !study.views.iter().any(|s| s == view) {
            return refuse(
                RefusalCode::ViewNotAllowed,
                format!(
                    "study `{study_id}` may query {}, not `{view}`",
                    study.views.join(", ")
                ),
            );
        }
        if !study.columns.is_empty()
            && let Some(column) = query
                .columns()
                .into_iter()
                .find(|c| !study.columns.iter().any(|allowed| allowed == c))
        {
            // A misspelling reads as a permission problem; say what was probably meant.
            let nearest = nearest_name(column, study.columns.iter().map(String::as_str))
                .map(|allowed| {
                    format!(" (no column `{column}` in this study: did you mean `{allowed}`?)")
                })
                .unwrap_or_default();
            return refuse(
                RefusalCode::ColumnNotAllowed,
                format!(
                    "study `{study_id}` may use {}, not `{column}`{nearest}",
                    study.columns.join(", ")
                ),
            );
        }
        if let Some(aggregation) = aggregations
            .iter()
            .find(|name| !study.aggregations.iter().any(|a| a == *name))
        {
            return refuse(
                RefusalCode::AggregationNotAllowed,
                format!(
                    "study `{study_id}` may compute {}, not {} ({aggregation})",
                    study.aggregations.join(", "),
                    in_words(query, aggregation)
                ),
            );
        }
        Ok(Grant {
            researcher: person.name.clone(),
            study: study.id.clone(),
            budget_per_researcher: study.budget_rho_per_researcher,
            study_budget: study.budget_rho,
            dataset_budget: bundle.limits.dataset_budget_rho,
            max_rho_per_query: bundle.limits.max_rho_per_query,
            min_cell_size,
            report_delta: bundle.limits.report_delta,
            per_site_answers: study.per_site_answers,
            secure_colluders: bundle.limits.secure_colluders,
            policy_version: v,
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

/// An aggregation as the researcher wrote it: `histogram` is a GROUP BY.
fn in_words(query: &Query, aggregation: &str) -> String {
    match aggregation {
        "histogram" => format!("GROUP BY {}", query.group_by.join(", ")),
        other => other.to_uppercase(),
    }
}

/// Levenshtein distance between two names (short names: the quadratic cost is nothing).
/// Of `candidates`, the one `name` most probably misspells (within two edits, or a
/// quarter of its length), if any.
pub fn nearest_name<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(candidate, name), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4))
        .min()
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Timestamp;
    use crate::{PolicyBundle, SignedPolicy};
    use renkei_protocol::{Filter, Literal, SecretKey};

    const NOW: u64 = 1_780_000_000; // 2026-05-28

    struct Setup {
        admins: Vec<SecretKey>,
        researcher: SecretKey,
        bundle: PolicyBundle,
    }

    fn setup() -> Setup {
        let admins: Vec<SecretKey> = (0..2).map(|_| SecretKey::generate().unwrap()).collect();
        let researcher = SecretKey::generate().unwrap();
        let mut bundle = PolicyBundle::from_toml(crate::bundle::tests::SAMPLE).unwrap();
        bundle.admins = admins.iter().map(|a| a.public_key()).collect();
        bundle.researchers[0].public_key = researcher.public_key();
        bundle.studies[0].researchers = vec![researcher.public_key()];
        Setup {
            admins,
            researcher,
            bundle,
        }
    }

    fn verified(setup: &Setup, signers: usize) -> VerifiedPolicy {
        let mut signed = SignedPolicy::unsigned(&setup.bundle).unwrap();
        for admin in &setup.admins[..signers] {
            signed.sign(admin);
        }
        signed.verify_self_anchored().unwrap()
    }

    fn count(view: &str, columns: &[&str]) -> Query {
        Query::count_patients(
            view,
            Filter::And(
                columns
                    .iter()
                    .map(|c| Filter::eq(*c, Literal::Bool(true)))
                    .collect(),
            ),
        )
    }

    fn code(result: Result<Grant, Refusal>) -> RefusalCode {
        result.unwrap_err().code
    }

    #[test]
    fn a_query_within_the_study_terms_is_granted() {
        let s = setup();
        let policy = verified(&s, 1);
        let me = s.researcher.public_key();
        let grant = policy
            .authorize(&me, "severity-2026", &count("patients", &["diabetes"]), NOW)
            .unwrap();
        assert_eq!(grant.budget_per_researcher, MicroRho(2_500_000));
        assert_eq!(grant.study_budget, Some(MicroRho(10_000_000)));
        assert_eq!(grant.min_cell_size, 5);
        grant.check_cost(MicroRho(500_000)).unwrap();
        assert_eq!(
            grant.check_cost(MicroRho(500_001)).unwrap_err().code,
            RefusalCode::PrivacyParameterOutOfRange
        );
        assert_eq!(
            grant.check_cost(MicroRho(0)).unwrap_err().code,
            RefusalCode::PrivacyParameterOutOfRange
        );
    }

    #[test]
    fn each_refusal_has_its_own_code() {
        let mut s = setup();
        let me = s.researcher.public_key();
        let q = count("patients", &["diabetes"]);
        let policy = verified(&s, 1);
        let stranger = SecretKey::generate().unwrap().public_key();
        assert_eq!(
            code(policy.authorize(&stranger, "severity-2026", &q, NOW)),
            RefusalCode::UnknownResearcher
        );
        assert_eq!(
            code(policy.authorize(&me, "genomes", &q, NOW)),
            RefusalCode::StudyNotApproved
        );
        assert_eq!(
            code(policy.authorize(&me, "severity-2026", &q, 1_700_000_000)),
            RefusalCode::StudyNotYetValid
        );
        let after = Timestamp::parse("2028-01-01T00:00:00Z").unwrap().0;
        assert_eq!(
            code(policy.authorize(&me, "severity-2026", &q, after)),
            RefusalCode::StudyExpired
        );
        assert_eq!(
            code(policy.authorize(&me, "severity-2026", &count("timepoints", &[]), NOW)),
            RefusalCode::ViewNotAllowed
        );
        let err = policy
            .authorize(&me, "severity-2026", &count("patients", &["cancer"]), NOW)
            .unwrap_err();
        assert_eq!(err.code, RefusalCode::ColumnNotAllowed);
        assert!(err.reason.contains("`cancer`"), "{}", err.reason);
        // A misspelled column is told apart from a forbidden one.
        let err = policy
            .authorize(&me, "severity-2026", &count("patients", &["diabetis"]), NOW)
            .unwrap_err();
        assert!(
            err.reason
                .contains("no column `diabetis` in this study: did you mean `diabetes`?"),
            "{}",
            err.reason
        );
        // GROUP BY in a study that allows only counts: named as the researcher wrote it.
        let grouped = Query {
            group_by: vec!["sex".into()],
            ..count("patients", &[])
        };
        let err = policy
            .authorize(&me, "severity-2026", &grouped, NOW)
            .unwrap_err();
        assert_eq!(err.code, RefusalCode::AggregationNotAllowed);
        assert!(
            err.reason.contains("not GROUP BY sex (histogram)"),
            "{}",
            err.reason
        );

        // The sensitive grant needs two admin signatures; one is not enough.
        let genome = count("host_genome", &[]);
        assert_eq!(
            code(policy.authorize(&me, "severity-2026", &genome, NOW)),
            RefusalCode::SensitiveNotGranted
        );
        let grant = verified(&s, 2)
            .authorize(&me, "severity-2026", &genome, NOW)
            .unwrap();
        assert_eq!(grant.min_cell_size, 20);
        // Without the grant in the study, no number of signatures helps.
        s.bundle.studies[0].sensitive_views.clear();
        assert_eq!(
            code(verified(&s, 2).authorize(&me, "severity-2026", &genome, NOW)),
            RefusalCode::SensitiveNotGranted
        );

        // Reading the presence flag of a sensitive kind is touching it.
        assert_eq!(
            code(verified(&s, 1).authorize(
                &me,
                "severity-2026",
                &count("patients", &["has_host_genome"]),
                NOW
            )),
            RefusalCode::SensitiveNotGranted
        );

        s.bundle.revoked.push(me);
        assert_eq!(
            code(verified(&s, 1).authorize(&me, "severity-2026", &q, NOW)),
            RefusalCode::ResearcherRevoked
        );
    }
}
