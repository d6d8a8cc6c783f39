//! renkei's wire vocabulary, shared by every node, aggregator and researcher tool.
//!
//! This crate owns what crosses a process boundary and nothing else: the query AST a
//! researcher signs ([`query`]), the signed envelope that carries it ([`envelope`]), the
//! request, answer and refusal messages ([`messages`]), secure rounds' mask arithmetic
//! ([`masks`]), key newtypes ([`keys`]), the one place where bytes are encoded and decoded
//! ([`codec`], a leaf), the libp2p stream codecs ([`transport`]) and the protocol ids with
//! their size limits ([`limits`]). It is small and pure on purpose: no sockets, no storage, no
//! noise. Networking lives in `renkei-node` / `renkei-aggregator`, policy in `renkei-policies`.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod codec;
pub mod envelope;
pub mod keys;
pub mod limits;
pub mod masks;
pub mod messages;
pub mod query;
pub mod transport;

pub use codec::CodecError;
pub use envelope::{EnvelopeError, Purpose, SignedEnvelope};
pub use keys::{KeyError, PublicKey, SecretKey};
pub use messages::{
    AdminSignature, Answer, MaskedShape, Mechanism, MicroEpsilon, MicroRho, PolicyRequest,
    PolicyResponse, PolicyTransfer, PrivacyRequest, QueryRequest, QueryResponse, Quote, Refusal,
    RefusalCode, Release, RequestId, TermScale, UnmaskRequest, Unmasking,
};
pub use query::{
    Aggregate, CmpOp, Covariate, Decimal, DerivedColumn, Filter, FitStep, Literal, PerPatient,
    Query, Summary,
};
pub use transport::{EncodedRequest, PolicyCodec, QueryCodec};

/// Seconds since the Unix epoch, as used for `issued_at` / `expires_at`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
