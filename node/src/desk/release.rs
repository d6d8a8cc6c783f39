//! Releasing an answer: count, draw the noise (per site: each part by its own mechanism,
//! a count below the minimum cell size withheld; secure: a noise share under masks), then
//! charge and record the signed answer in one ledger transaction, audit, make it all
//! durable with one fsync, and only then reply. A request the ledger would refuse, or has
//! answered before, is decided before the data is touched; a resend returns the recorded
//! answer.

use renkei_engine::{CompiledQuery, Exact, NoisyPart};
use renkei_protocol::limits::MAX_RESPONSE_BYTES;
use renkei_protocol::masks::{hide_under_masks, round_context};
use renkei_protocol::{
    Answer, MicroRho, PublicKey, Purpose, QueryRequest, QueryResponse, Refusal, RefusalCode,
    Release, SignedEnvelope,
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::audit::{AuditEvent, hex_hash};
use crate::error::NodeError;
use crate::privacy::dp::Calibration;
use crate::privacy::ledger::{Admission, Charge};
use crate::privacy::secure;
use crate::store::FlushPromise;

use super::{AUDIT, Checked, Known, QueryDesk, charge_request};

impl QueryDesk {
    /// Counts, draws noise and signs, then charges and records the answer in one ledger
    /// transaction, audits and fsyncs; a refusal is audited too. Blocking.
    pub(super) fn charge_and_release(&self, checked: Checked, now: u64) -> QueryResponse {
        let known = Known {
            researcher: Some(checked.researcher),
            study: Some(checked.request.study.clone()),
            request_id: Some(checked.request.request_id),
            digest: Some(checked.digest),
        };
        match self.release(checked, now) {
            Ok(response) => response,
            Err(refusal) => {
                self.record_refusal(now, known, &refusal);
                QueryResponse::Refused(refusal)
            }
        }
    }

    fn release(&self, checked: Checked, now: u64) -> Result<QueryResponse, Refusal> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            warn!("{what}: {e}");
            Refusal::new(
                RefusalCode::Internal,
                format!("{what} failed on the node; nothing was released"),
            )
        };
        let Checked {
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
        } = checked;
        let _guard = self.hold(&researcher, &request.request_id)?;
        let charging = charge_request(&researcher, &request, &digest, cost, &grant, fit);
        // Refused or answered before: decided without touching the data (its scan time
        // would otherwise be a signal nobody pays for).
        let stored = self
            .ledger
            .precheck(&charging)
            .map_err(|e| internal("ledger", &e))??;
        // Answers being computed at the same time share the fsync that makes them durable.
        let durable = self.ledger.expect_durable();
        let send = |encoded, charge, durable| {
            self.send_recorded(
                encoded,
                charge,
                durable,
                cost,
                &researcher,
                &request,
                &digest,
                now,
            )
        };
        if let Some(encoded) = stored {
            return send(encoded, None, durable);
        }
        // The noise is drawn before the charge; nothing leaves the node until the charge and
        // this answer are on disk together.
        let exact = dataset.evaluate(&compiled);
        let main = &calibrations[0];
        let release = match &participants {
            Some(participants) => self
                .masked_release(
                    &compiled,
                    exact,
                    &calibrations,
                    participants,
                    &round_context(&researcher, &digest),
                    request.dropouts > 0,
                )
                .map_err(|e| internal("secure contribution", &e))?,
            None => plain_release(&compiled, exact, &calibrations, grant.min_cell_size)
                .map_err(|e| internal("noise", &e))?,
        };
        let answer_for = |charge: Charge| -> Result<Vec<u8>, NodeError> {
            let answer = Answer {
                request_id: request.request_id,
                request_digest: digest,
                release: release.clone(),
                value_scale: compiled.value_scale(),
                min_cell_size: if compiled.reports_min_cell() {
                    grant.min_cell_size
                } else {
                    0
                },
                mechanism: main.mechanism,
                sensitivity: main.sensitivity,
                noise_scale: main.scale,
                noise_std: main.noise_std,
                count_noise_std: calibrations.get(1).map(|c| c.noise_std),
                rho_spent: cost,
                epsilon: calibrations.iter().map(|c| c.epsilon).sum(),
                delta: calibrations.iter().map(|c| c.delta).sum(),
                budget_remaining: charge.remaining,
                answered_at: now,
            };
            // Runs inside the ledger's transaction: no store access here.
            let sealed = SignedEnvelope::seal(Purpose::NodeAnswer, &self.identity, &answer)?;
            let bytes = renkei_protocol::codec::encode(&sealed)?;
            if bytes.len() > MAX_RESPONSE_BYTES {
                return Err(NodeError::Answer(format!(
                    "{} bytes, more than the {MAX_RESPONSE_BYTES} an answer may take",
                    bytes.len()
                )));
            }
            Ok(bytes)
        };
        let admission = self
            .ledger
            .admit(charging, &answer_for)
            .map_err(|e| internal("ledger", &e))??;
        let (encoded, charge) = match admission {
            // Answered before (a copy raced this one): the same answer, never fresh noise.
            Admission::Answered(bytes) => (bytes, None),
            Admission::Recorded { charge, answer } => (answer, Some(charge)),
        };
        send(encoded, charge, durable)
    }

    /// Audits a recorded answer, makes it durable (with its charge, if `charge` is this
    /// delivery's) and returns it to send. A failure here sends nothing; the charge may
    /// stand, and a resend returns the recorded answer.
    #[allow(clippy::too_many_arguments)]
    fn send_recorded(
        &self,
        encoded: Vec<u8>,
        charge: Option<Charge>,
        durable: FlushPromise,
        cost: MicroRho,
        researcher: &PublicKey,
        request: &QueryRequest,
        digest: &[u8; 32],
        now: u64,
    ) -> Result<QueryResponse, Refusal> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            warn!("{what}: {e}");
            Refusal::new(
                RefusalCode::Internal,
                format!(
                    "{what} failed on the node; nothing was sent (a charge may stand: resend the same request to get its answer)"
                ),
            )
        };
        self.record(
            now,
            AuditEvent::QueryAnswered {
                researcher: *researcher,
                study: request.study.clone(),
                request_id: request.request_id.to_string(),
                query_hash: hex_hash(digest),
                rho: cost,
                answer_hash: hex_hash(&Sha256::digest(&encoded).into()),
                resent: charge.is_none(),
            },
        );
        // One fsync makes the charge, the answer and the audit entry durable before sending.
        durable
            .flush()
            .map_err(|e| failed("recording the answer", &e))?;
        let sealed: SignedEnvelope =
            renkei_protocol::codec::decode_limited(&encoded, MAX_RESPONSE_BYTES)
                .map_err(|e| failed("reading the recorded answer", &e))?;
        if let Some(charge) = charge {
            info!(
                target: AUDIT,
                request = %request.request_id,
                researcher = %researcher,
                study = %request.study,
                query = %request.query,
                rho = %cost,
                spent = %charge.spent,
                "answered"
            );
        }
        Ok(QueryResponse::Answered(sealed))
    }

    /// A secure round's contribution: the exact numbers plus this node's noise share, under
    /// the pairwise masks of `participants` for this round (`context`: its
    /// [`round_context`]), and this node's own mask in a round that survives dropouts.
    fn masked_release(
        &self,
        compiled: &CompiledQuery,
        exact: Exact,
        calibrations: &[Calibration],
        participants: &[PublicKey],
        context: &[u8; 32],
        own_mask: bool,
    ) -> Result<Release, NodeError> {
        // Every part's noisy numbers, in order, as one vector of words.
        let mut noisy = Vec::new();
        for (values, mechanism) in exact.0.into_iter().zip(calibrations) {
            noisy.extend(mechanism.release(values)?);
        }
        let shape = compiled.statistic().masked_shape();
        let mut masks =
            self.pair_secrets
                .masks(&self.identity, participants, context, noisy.len())?;
        if own_mask {
            let own = secure::own_mask(&self.identity, context, noisy.len())?;
            for (mask, own) in masks.iter_mut().zip(own) {
                *mask = mask.wrapping_add(own);
            }
        }
        Ok(Release::Masked {
            shape,
            words: hide_under_masks(&noisy, &masks),
        })
    }
}

/// A per-site release: full noise on each number, each part by its own mechanism; a noisy
/// count below the minimum cell size is withheld (post-processing, free).
fn plain_release(
    compiled: &CompiledQuery,
    exact: Exact,
    calibrations: &[Calibration],
    min_cell_size: u64,
) -> Result<Release, crate::privacy::dp::DpError> {
    let min_cell = i64::try_from(min_cell_size).unwrap_or(i64::MAX);
    let noisy = exact
        .0
        .into_iter()
        .zip(compiled.parts())
        .zip(calibrations)
        .map(|((values, part), mechanism)| {
            let noisy = mechanism.release(values)?;
            let withhold = |n: i64| part.counts && min_cell_size > 0 && n < min_cell;
            let suppressed: Vec<bool> = noisy.iter().map(|n| withhold(*n)).collect();
            Ok(NoisyPart {
                values: noisy
                    .iter()
                    .zip(&suppressed)
                    .map(|(n, s)| if *s { 0 } else { *n })
                    .collect(),
                suppressed,
            })
        })
        .collect::<Result<Vec<_>, crate::privacy::dp::DpError>>()?;
    Ok(compiled.statistic().release(noisy))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use renkei_engine::schema::{DatasetSchema, SECONDARY_USE};
    use renkei_engine::{Dataset, ImageBuilder};
    use renkei_protocol::{Aggregate, Filter, MicroRho, PrivacyRequest, Query};

    use super::*;

    fn dataset() -> Dataset {
        let schema = DatasetSchema::from_toml(
            "name = \"t\"\nversion = 1\nmax_timepoints_per_patient = 2\n\
             [[patients]]\nname = \"age\"\ntype = \"integer\"\nmin = 0\nmax = 100\n\
             [[timepoints]]\nname = \"crp\"\ntype = \"integer\"\nmin = 0\nmax = 10\n",
        )
        .unwrap();
        let mut image = ImageBuilder::new(Arc::new(schema));
        for _ in 0..3 {
            image.add_patient([SECONDARY_USE]).unwrap();
        }
        image.extend_patient_columns(&[vec![30, 40, 50]]);
        image.finish()
    }

    fn mechanisms(compiled: &CompiledQuery) -> Vec<Calibration> {
        let sensitivities: Vec<f64> = compiled.parts().iter().map(|p| p.sensitivity).collect();
        Calibration::split(
            PrivacyRequest::Zcdp {
                rho: MicroRho(1_000_000),
            },
            &sensitivities,
            1e-6,
        )
        .unwrap()
    }

    #[test]
    fn a_count_below_the_minimum_cell_is_withheld_and_reads_zero() {
        let data = dataset();
        let compiled = data
            .compile(&Query::count_patients("patients", Filter::True))
            .unwrap();
        let exact = data.evaluate(&compiled);
        let release =
            plain_release(&compiled, exact.clone(), &mechanisms(&compiled), 1_000).unwrap();
        assert_eq!(
            release,
            Release::Scalar {
                value: 0,
                suppressed: true
            }
        );
        let release = plain_release(&compiled, exact, &mechanisms(&compiled), 0).unwrap();
        assert!(matches!(
            release,
            Release::Scalar {
                suppressed: false,
                ..
            }
        ));
    }

    #[test]
    fn a_mean_is_never_withheld_and_each_part_has_its_mechanism() {
        let data = dataset();
        let mean = Query {
            aggregate: Aggregate::Mean {
                column: "age".into(),
            },
            ..Query::count_patients("patients", Filter::True)
        };
        let compiled = data.compile(&mean).unwrap();
        let calibrations = mechanisms(&compiled);
        assert_eq!(calibrations.len(), 2);
        // The sum's sensitivity is 100 (ages up to 100), the count's 1.
        assert!(calibrations[0].noise_std > 50.0 * calibrations[1].noise_std);
        let exact = data.evaluate(&compiled);
        let release = plain_release(&compiled, exact, &calibrations, 1_000).unwrap();
        let Release::SumAndCount { count, .. } = release else {
            panic!("{release:?}");
        };
        // A count of 3 with noise sd about 0.7: withheld it would read 0.
        assert!((-3..=9).contains(&count), "{count}");
    }
}
