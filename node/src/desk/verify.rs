//! Verifying a query request, in order: decode the envelope; verify the researcher's
//! signature over the exact received payload; check the signer is a known researcher (only
//! then is the payload decoded); check the request is addressed to this node, within its
//! time window and its policy version, of a sound shape; and ask the active policy whether
//! the query is within the study's terms. Nothing here costs privacy.

use std::sync::atomic::Ordering;

use renkei_protocol::limits::{
    MAX_AUDIENCE, MAX_CLOCK_SKEW_SECS, MAX_REQUEST_BYTES, MAX_REQUEST_LIFETIME_SECS,
};
use renkei_protocol::messages::request_digest;
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{Purpose, QueryRequest, Refusal, RefusalCode};

use super::plan::Verified;
use super::{Checked, Known, QueryDesk};

impl QueryDesk {
    /// Everything that can be decided without spending privacy.
    pub(super) fn check(
        &self,
        request: &EncodedRequest,
        now: u64,
        known: &mut Known,
    ) -> Result<Checked, Refusal> {
        let envelope = request.decode().map_err(|e| {
            Refusal::new(
                RefusalCode::MalformedRequest,
                format!("request envelope: {e}"),
            )
        })?;
        let payload = envelope
            .verify(Purpose::QueryRequest)
            .map_err(|e| Refusal::new(RefusalCode::BadSignature, e.to_string()))?;
        let researcher = envelope.signer;
        known.researcher = Some(researcher);
        let Some(policy) = self.policy.active() else {
            return Err(Refusal::new(
                RefusalCode::Internal,
                "this node has no active policy yet",
            ));
        };
        // Only a known researcher's payload is decoded.
        let bundle = policy.bundle();
        if bundle.researcher(&researcher).is_none() && !bundle.revoked.contains(&researcher) {
            return Err(Refusal::new(
                RefusalCode::UnknownResearcher,
                format!(
                    "key {researcher} is not a researcher in policy v{} ({})",
                    bundle.version, bundle.consortium
                ),
            ));
        }
        let request: QueryRequest =
            renkei_protocol::codec::decode_limited(payload, MAX_REQUEST_BYTES).map_err(|e| {
                Refusal::new(
                    RefusalCode::MalformedRequest,
                    format!("signed request: {e}"),
                )
            })?;
        let digest = request_digest(payload);
        known.study = Some(request.study.clone());
        known.request_id = Some(request.request_id);
        known.digest = Some(digest);
        match request.policy_version {
            Some(asked) if asked != bundle.version => {
                return Err(Refusal::new(
                    RefusalCode::PolicyVersionMismatch,
                    format!(
                        "the request is made under policy v{asked}; this node runs v{} ({}); ask again under the node's version",
                        bundle.version, bundle.consortium
                    ),
                ));
            }
            None if request.secure => {
                return Err(Refusal::new(
                    RefusalCode::MalformedRequest,
                    "a secure round must name the policy version its nodes share",
                ));
            }
            _ => {}
        }
        if request.dropouts > 0 && !request.secure {
            return Err(Refusal::new(
                RefusalCode::MalformedRequest,
                "dropouts apply to secure rounds only",
            ));
        }
        if request.audience.len() > MAX_AUDIENCE {
            return Err(Refusal::new(
                RefusalCode::MalformedRequest,
                format!("a request may name at most {MAX_AUDIENCE} nodes"),
            ));
        }
        if !request.audience.contains(&self.node_key) {
            return Err(Refusal::new(
                RefusalCode::NotAddressedToThisNode,
                "this request is not addressed to this node; sign one that names it",
            ));
        }
        if request.expires_at.saturating_add(MAX_CLOCK_SKEW_SECS) <= now {
            return Err(Refusal::new(
                RefusalCode::Expired,
                format!(
                    "request expired at {} and node time is {now}; sign a new one (if it was just signed, check your clock)",
                    request.expires_at
                ),
            ));
        }
        if request.issued_at > now + MAX_CLOCK_SKEW_SECS {
            return Err(Refusal::new(
                RefusalCode::NotYetValid,
                format!(
                    "request is issued at {}, more than {MAX_CLOCK_SKEW_SECS}s after node time {now}; check your clock",
                    request.issued_at
                ),
            ));
        }
        if request.expires_at.saturating_sub(request.issued_at) > MAX_REQUEST_LIFETIME_SECS {
            return Err(Refusal::new(
                RefusalCode::LifetimeTooLong,
                format!("requests may live at most {MAX_REQUEST_LIFETIME_SECS}s"),
            ));
        }
        request
            .query
            .check_shape()
            .map_err(|e| Refusal::new(RefusalCode::MalformedRequest, e.to_string()))?;
        let grant = policy.authorize(&researcher, &request.study, &request.query, now)?;
        if self.stale.load(Ordering::SeqCst) {
            return Err(Refusal::new(
                RefusalCode::Internal,
                "this node could not reload its data after a load and answers nothing until it is restarted",
            ));
        }
        self.plan(Verified {
            digest,
            researcher,
            request,
            grant,
            policy,
        })
    }
}
