//! Why a policy was not accepted: one error type for reading, parsing, checking and
//! verifying bundles. Kept apart so the bundle and its signatures both use it without
//! depending on each other.

use renkei_protocol::PublicKey;
use renkei_protocol::codec::CodecError;

/// Why a policy was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policy does not parse: {0}")]
    Parse(String),
    #[error("policy is inconsistent: {0}")]
    Invalid(String),
    #[error("{path}: not a signed renkei policy ({reason})")]
    Format { path: String, reason: String },
    #[error("the signature attributed to admin {admin} does not verify over this bundle")]
    BadSignature { admin: PublicKey },
    #[error("bundle is signed by {signer}, who is not a trusted consortium admin")]
    NotAnAdmin { signer: PublicKey },
    #[error("bundle has {valid} valid admin signature(s); {threshold} are required")]
    TooFewSignatures { valid: usize, threshold: usize },
    #[error("signed bundle bytes do not decode: {0}")]
    Codec(#[from] CodecError),
}
