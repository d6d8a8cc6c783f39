//! Policy offers: a signed bundle offered by an admin, a peer or a file at start-up is
//! decided by the policy keeper and audited; peers that fetch get the active bundle.

use renkei_policies::SignedPolicy;
use renkei_protocol::{PolicyResponse, PolicyTransfer, Refusal, RefusalCode};
use tracing::{info, warn};

use crate::audit::AuditEvent;
use crate::error::NodeError;
use crate::governance::Offered;

use super::{AUDIT, QueryDesk};

impl QueryDesk {
    /// Decides a policy bundle offered by `source` (a peer id, or a file at start-up). Blocking.
    pub fn offer_policy(&self, signed: &SignedPolicy, source: &str, now: u64) -> PolicyResponse {
        match self.policy.offer(signed) {
            Ok(Ok(Offered::Accepted { policy, previous })) => {
                let (version, hash) = (policy.bundle().version, policy.hash());
                info!(target: AUDIT, version, hash = %policy.hash_hex(), %source, "policy activated");
                self.record(
                    now,
                    AuditEvent::PolicyActivated {
                        version,
                        hash: policy.hash_hex(),
                        previous_version: previous,
                        source: source.to_string(),
                    },
                );
                PolicyResponse::Accepted { version, hash }
            }
            Ok(Ok(Offered::AlreadyActive(policy))) => PolicyResponse::AlreadyActive {
                version: policy.bundle().version,
                hash: policy.hash(),
            },
            Ok(Err(refusal)) => {
                info!(target: AUDIT, code = %refusal.code, reason = %refusal.reason, %source, "policy refused");
                self.record(
                    now,
                    AuditEvent::PolicyRefused {
                        code: refusal.code,
                        source: source.to_string(),
                    },
                );
                PolicyResponse::Refused(refusal)
            }
            Err(e) => {
                warn!("storing a policy failed: {e}");
                PolicyResponse::Refused(Refusal::new(
                    RefusalCode::Internal,
                    "the node could not store the bundle",
                ))
            }
        }
    }

    /// The active bundle, for peers that fetch it.
    pub fn active_policy_transfer(&self) -> Result<Option<PolicyTransfer>, NodeError> {
        self.policy.active_transfer()
    }
}
