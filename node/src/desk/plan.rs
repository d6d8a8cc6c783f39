//! Planning a verified request: bind the query to the current image (its statistic and
//! the parts it releases), check a secure round's participants, calibrate one mechanism per
//! part and total the cost. Refusals here still spend nothing.

use std::sync::Arc;

use renkei_policies::{Grant, VerifiedPolicy};
use renkei_protocol::{MicroRho, PrivacyRequest, PublicKey, QueryRequest, Refusal, RefusalCode};

use renkei_protocol::query::fit_step_budgets;
use sha2::{Digest, Sha256};

use crate::privacy::dp::Calibration;
use crate::privacy::ledger::FitLink;
use crate::privacy::secure;

use super::{Checked, QueryDesk};

/// A request whose signature, signer, addressing, timing and policy terms are checked.
#[derive(Debug)]
pub(super) struct Verified {
    pub(super) digest: [u8; 32],
    pub(super) researcher: PublicKey,
    pub(super) request: QueryRequest,
    pub(super) grant: Grant,
    pub(super) policy: Arc<VerifiedPolicy>,
}

impl QueryDesk {
    /// Binds a verified request to the data and fixes what it releases: the statistic's
    /// parts, one mechanism each (per site, or a noise share for a secure round among its
    /// checked participants), and their total cost, within the grant's per-query limit.
    pub(super) fn plan(&self, verified: Verified) -> Result<Checked, Refusal> {
        let Verified {
            digest,
            researcher,
            request,
            grant,
            policy,
        } = verified;
        let bundle = policy.bundle();
        let dataset = self.dataset();
        let compiled = dataset
            .compile(&request.query)
            .map_err(|e| Refusal::new(RefusalCode::InvalidQuery, e.to_string()))?;
        let participants = if request.secure {
            let participants = secure_participants(&request, bundle, &grant)?;
            // Agree with every peer now, so a key unusable for masks is refused before any
            // charge (and the round's release only runs the cheap part).
            self.pair_secrets
                .prepare(&self.identity, &participants)
                .map_err(|(key, e)| {
                    Refusal::new(
                        RefusalCode::MalformedRequest,
                        format!("participant {key} cannot take part in a secure round: {e}"),
                    )
                })?;
            Some(participants)
        } else if !grant.per_site_answers {
            return Err(Refusal::new(
                RefusalCode::SecureAggregationRequired,
                format!(
                    "study `{}` allows only secure totals (no hospital's own answer is released); ask for a secure round",
                    request.study
                ),
            ));
        } else {
            None
        };
        if compiled.vector() && matches!(request.privacy, PrivacyRequest::PureDp { .. }) {
            return Err(Refusal::new(
                RefusalCode::PrivacyParameterOutOfRange,
                "histograms, quantiles, GROUP BY, survival curves and regressions are released under zCDP only; ask with a rho",
            ));
        }
        let parts = compiled.parts();
        if parts.is_empty() {
            return Err(Refusal::new(
                RefusalCode::Internal,
                "the query's statistic releases nothing; nothing was spent",
            ));
        }
        let calibrate = |privacy: PrivacyRequest| -> Result<Vec<Calibration>, Refusal> {
            self.calibrate(privacy, &parts, participants.as_deref(), &request, &grant)
        };
        // A fit's step spends its share of the fit's rho; the first is charged for all,
        // within one query's limit, and the later ones nothing.
        let fit_step = |iteration: u8, iterations: u8, opens: bool| {
            let steps: Vec<Vec<Calibration>> = step_privacies(request.privacy, iterations)?
                .into_iter()
                .map(calibrate)
                .collect::<Result<_, _>>()?;
            let whole = MicroRho(steps.iter().flatten().map(|c| c.cost.0).sum());
            grant.check_cost(whole)?;
            let calibrations = steps
                .into_iter()
                .nth(usize::from(iteration))
                .ok_or_else(|| Refusal::new(RefusalCode::MalformedRequest, "no such step"))?;
            Ok::<_, Refusal>((calibrations, if opens { whole } else { MicroRho(0) }))
        };
        let fit = fit_link(&request)?;
        let (calibrations, cost) = match fit {
            FitLink::None => {
                let calibrations = calibrate(request.privacy)?;
                let cost = MicroRho(calibrations.iter().map(|c| c.cost.0).sum());
                grant.check_cost(cost)?;
                (calibrations, cost)
            }
            FitLink::Opens { iterations, .. } => fit_step(0, iterations, true)?,
            FitLink::Continues {
                iteration,
                iterations,
                ..
            } => fit_step(iteration, iterations, false)?,
        };
        Ok(Checked {
            digest,
            researcher,
            request,
            dataset,
            compiled,
            calibrations,
            cost,
            grant,
            participants,
            fit,
        })
    }

    /// One mechanism per part for `privacy`: per site, or a noise share for a secure round
    /// among `participants`.
    fn calibrate(
        &self,
        privacy: PrivacyRequest,
        parts: &[renkei_engine::Part],
        participants: Option<&[PublicKey]>,
        request: &QueryRequest,
        grant: &Grant,
    ) -> Result<Vec<Calibration>, Refusal> {
        let out_of_range = |e: crate::privacy::dp::DpError| {
            Refusal::new(RefusalCode::PrivacyParameterOutOfRange, e.to_string())
        };
        Ok(match participants {
            Some(participants) => {
                let PrivacyRequest::Zcdp { rho } = privacy else {
                    return Err(Refusal::new(
                        RefusalCode::PrivacyParameterOutOfRange,
                        "secure totals add distributed discrete Gaussian noise under zCDP; ask with a rho",
                    ));
                };
                // Each part gets its share of the rho and a noise share sized for the total.
                renkei_engine::statistic::split_budget(rho.0, parts.len())
                    .into_iter()
                    .zip(parts)
                    .map(|(rho, part)| {
                        secure::share_calibration(
                            MicroRho(rho),
                            part.sensitivity,
                            part.len,
                            participants.len(),
                            grant.secure_colluders as usize,
                            request.dropouts as usize,
                            grant.report_delta,
                        )
                        .map_err(out_of_range)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => Calibration::split(
                privacy,
                &parts.iter().map(|p| p.sensitivity).collect::<Vec<_>>(),
                grant.report_delta,
            )
            .map_err(out_of_range)?,
        })
    }
}

/// How `request` belongs to a logistic fit, as the ledger checks it: its identity is the
/// digest of the question with its step cleared and of how it is asked (study, audience,
/// privacy, mode, policy), which every step of one fit shares.
fn fit_link(request: &QueryRequest) -> Result<FitLink, Refusal> {
    let (
        Some(question),
        renkei_protocol::Aggregate::LogisticRegression {
            iterations, step, ..
        },
    ) = (request.query.fit_identity(), &request.query.aggregate)
    else {
        return Ok(FitLink::None);
    };
    let asked = (
        &question,
        &request.study,
        &request.audience,
        &request.privacy,
        request.secure,
        request.dropouts,
        request.policy_version,
    );
    let encoded = renkei_protocol::codec::encode(&asked)
        .map_err(|e| Refusal::new(RefusalCode::MalformedRequest, e.to_string()))?;
    let identity: [u8; 32] = Sha256::digest(&encoded).into();
    Ok(match step.fit {
        None => FitLink::Opens {
            identity,
            iterations: *iterations,
        },
        Some(fit) => FitLink::Continues {
            fit,
            iteration: step.iteration,
            identity,
            issued_at: request.issued_at,
            iterations: *iterations,
        },
    })
}

/// Each step's privacy: its budget of the fit's rho ([`fit_step_budgets`]), so the steps
/// together spend exactly what was asked.
fn step_privacies(privacy: PrivacyRequest, iterations: u8) -> Result<Vec<PrivacyRequest>, Refusal> {
    let PrivacyRequest::Zcdp { rho } = privacy else {
        return Err(Refusal::new(
            RefusalCode::PrivacyParameterOutOfRange,
            "a regression is released under zCDP only; ask with a rho",
        ));
    };
    let rhos = fit_step_budgets(rho.0, iterations);
    if rhos.contains(&0) {
        return Err(Refusal::new(
            RefusalCode::PrivacyParameterOutOfRange,
            format!(
                "rho {rho} is too little to share over {iterations} steps; ask more, or fewer steps"
            ),
        ));
    }
    Ok(rhos
        .into_iter()
        .map(|r| PrivacyRequest::Zcdp { rho: MicroRho(r) })
        .collect())
}
/// The nodes of a secure round: the request's audience, each a member node of the policy
/// (a key outside the consortium could be one whose masks the aggregator knows), and at
/// least two more than the policy's tolerated colluders.
fn secure_participants(
    request: &QueryRequest,
    bundle: &renkei_policies::PolicyBundle,
    grant: &Grant,
) -> Result<Vec<PublicKey>, Refusal> {
    let mut participants = request.audience.clone();
    participants.sort();
    participants.dedup();
    if participants.len() != request.audience.len() {
        return Err(Refusal::new(
            RefusalCode::MalformedRequest,
            "a secure round's audience names a node twice",
        ));
    }
    for key in &participants {
        let member = key
            .to_peer_id()
            .ok()
            .and_then(|peer| bundle.member(&peer).map(|_| ()));
        if member.is_none() {
            return Err(Refusal::new(
                RefusalCode::MalformedRequest,
                format!(
                    "secure round participant {key} is not a member node in policy v{}; only member nodes may share masks",
                    bundle.version
                ),
            ));
        }
    }
    // With one honest node, the colluders and the aggregator could subtract everything
    // else and read that node's own answer: at least two must remain, after the dropouts
    // the round is asked to survive.
    let colluders = grant.secure_colluders as usize;
    let dropouts = request.dropouts as usize;
    let needed = colluders.saturating_add(2).saturating_add(dropouts);
    if participants.len() < needed {
        return Err(Refusal::new(
            RefusalCode::PrivacyParameterOutOfRange,
            format!(
                "a secure total needs at least {needed} nodes (two more than the {colluders} the policy lets collude, plus the {dropouts} dropouts it is to survive); this one names {}",
                participants.len()
            ),
        ));
    }
    Ok(participants)
}
