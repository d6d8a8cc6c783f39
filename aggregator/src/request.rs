//! Signing a researcher's query: what to ask ([`QueryOptions`]) and the signed request
//! ready to send to every node ([`PreparedQuery`]).

use std::time::Duration;

use renkei_protocol::limits::MAX_REQUEST_LIFETIME_SECS;
use renkei_protocol::messages::request_digest;
use renkei_protocol::{
    PrivacyRequest, PublicKey, Purpose, Query, QueryRequest, RequestId, SecretKey, SignedEnvelope,
};

use crate::client::NodeAddress;
use crate::error::AggregatorError;

/// How to ask.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    pub study: String,
    /// Privacy each node spends on its answer.
    pub privacy: PrivacyRequest,
    /// How long to wait for all nodes.
    pub deadline: Duration,
    /// Ask for a secure total (only the network-wide sum is ever readable) rather than
    /// per-site answers.
    pub secure: bool,
    /// For a secure round: how many nodes may fail to contribute while the total is still
    /// read (each node's noise share is then sized for that many fewer nodes). 0: a missing
    /// node aborts the round.
    pub dropouts: u32,
    /// Only ask what the query would cost at each node; nothing is spent.
    pub dry_run: bool,
}

/// A signed request, ready to send to every node.
#[derive(Debug, Clone)]
pub struct PreparedQuery {
    pub request: QueryRequest,
    pub envelope: SignedEnvelope,
    pub digest: [u8; 32],
}

impl PreparedQuery {
    /// Signs `query` for `options.study` with `options.privacy` (a secure round when
    /// `options.secure`), under `policy_version` when given, addressed to the nodes in
    /// `audience`, with a fresh request id and nonce, valid from `now` for the longest
    /// lifetime nodes accept.
    pub fn sign(
        key: &SecretKey,
        query: Query,
        options: &QueryOptions,
        policy_version: Option<u64>,
        audience: &[NodeAddress],
        now: u64,
    ) -> Result<Self, AggregatorError> {
        let audience = audience
            .iter()
            .map(|node| PublicKey::from_peer_id(&node.peer_id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&RequestId::random()?.0);
        let request = QueryRequest {
            request_id: RequestId::random()?,
            nonce,
            issued_at: now,
            expires_at: now + MAX_REQUEST_LIFETIME_SECS,
            study: options.study.clone(),
            audience,
            query,
            privacy: options.privacy,
            secure: options.secure,
            dropouts: options.dropouts,
            policy_version,
            dry_run: options.dry_run,
        };
        Ok(Self::from_request(key, request)?)
    }

    /// Signs an arbitrary request (tests use this to build expired or odd requests).
    pub fn from_request(
        key: &SecretKey,
        request: QueryRequest,
    ) -> Result<Self, renkei_protocol::CodecError> {
        let envelope = SignedEnvelope::seal(Purpose::QueryRequest, key, &request)?;
        let digest = request_digest(&envelope.payload);
        Ok(Self {
            request,
            envelope,
            digest,
        })
    }
}
