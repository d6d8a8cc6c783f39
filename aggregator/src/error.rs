//! The aggregator library's error type.

/// Errors of the aggregator library. A node that refuses or does not answer is not an
/// error: it is part of the [`crate::FederatedAnswer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregatorError {
    #[error("{}", .0)]
    Sql(#[from] crate::sql::SqlError),
    #[error("node address `{address}`: {reason}")]
    BadNodeAddress { address: String, reason: String },
    #[error("study: {0}")]
    Study(String),
    #[error(transparent)]
    Key(#[from] renkei_protocol::KeyError),
    #[error(transparent)]
    Codec(#[from] renkei_protocol::CodecError),
    #[error(transparent)]
    Policy(#[from] renkei_policies::PolicyError),
    #[error("libp2p: {0}")]
    Network(String),
}
