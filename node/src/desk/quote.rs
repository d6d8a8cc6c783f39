//! A dry run's reply: what a checked request would cost at this node and what the budget
//! holds, or the refusal its charge would meet. Spends nothing and consumes no nonce; the
//! quote is audited.

use renkei_protocol::{QueryResponse, Quote, Refusal, RefusalCode};
use tracing::warn;

use crate::audit::{AuditEvent, hex_hash};

use super::{Checked, Known, QueryDesk, charge_request};

impl QueryDesk {
    /// A dry run's reply: what the checked request would cost and what the budget holds,
    /// or the refusal its charge would meet. Spends nothing and consumes no nonce.
    pub(super) fn quote(&self, checked: Checked, now: u64) -> QueryResponse {
        let Checked {
            digest,
            researcher,
            request,
            calibrations,
            cost,
            grant,
            ..
        } = checked;
        let quoted = self.ledger.quote(&charge_request(
            &researcher,
            &request,
            &digest,
            cost,
            &grant,
            // A quote reads the budget only; a fit's steps are checked when admitted.
            crate::privacy::ledger::FitLink::None,
        ));
        let known = Known {
            researcher: Some(researcher),
            study: Some(request.study.clone()),
            request_id: Some(request.request_id),
            digest: Some(digest),
        };
        match quoted {
            Err(e) => {
                warn!("ledger: {e}");
                QueryResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "reading the ledger failed on the node; nothing was spent",
                ))
            }
            Ok(Err(refusal)) => {
                self.record_refusal(now, known, &refusal);
                QueryResponse::Refused(refusal)
            }
            Ok(Ok(budget_remaining)) => {
                self.record(
                    now,
                    AuditEvent::QueryQuoted {
                        researcher,
                        study: request.study.clone(),
                        request_id: request.request_id.to_string(),
                        query_hash: hex_hash(&digest),
                        rho: cost,
                    },
                );
                let main = &calibrations[0];
                QueryResponse::Quoted(Quote {
                    request_id: request.request_id,
                    request_digest: digest,
                    rho: cost,
                    epsilon: calibrations.iter().map(|c| c.epsilon).sum(),
                    delta: calibrations.iter().map(|c| c.delta).sum(),
                    mechanism: main.mechanism,
                    noise_std: main.noise_std,
                    budget_remaining,
                })
            }
        }
    }
}
