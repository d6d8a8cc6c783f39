//! Signed envelopes: payload bytes, the signer's public key and an ed25519 signature.
//!
//! Every signature in renkei is made over `DOMAIN || purpose tag || 0x00 || payload`, so a
//! signature made for one purpose (a researcher's query) can never be replayed as another
//! (a node's answer, an admin's policy). Receivers verify with `verify_strict` over the exact
//! payload bytes received, and only then decode the payload.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{self, CodecError};
use crate::keys::{PublicKey, SecretKey};

/// Prefix of every signed message.
const DOMAIN: &[u8] = b"renkei/signed/v1/";

/// What a signature is for; part of the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Purpose {
    /// A researcher's query request.
    QueryRequest,
    /// A node's answer to a query.
    NodeAnswer,
    /// A consortium admin's signature on a policy bundle.
    PolicyBundle,
    /// A node's signature on an entry of its audit log.
    AuditEntry,
    /// A researcher's request to finish a secure round that survives dropouts.
    UnmaskRequest,
    /// A node's masks for that step.
    NodeUnmasking,
    /// A node's commitment to the survivors of a recoverable secure round.
    RoundCommitment,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::QueryRequest => b"query-request",
            Purpose::NodeAnswer => b"node-answer",
            Purpose::PolicyBundle => b"policy-bundle",
            Purpose::AuditEntry => b"audit-entry",
            Purpose::UnmaskRequest => b"unmask-request",
            Purpose::NodeUnmasking => b"node-unmasking",
            Purpose::RoundCommitment => b"round-commitment",
        }
    }

    /// The exact bytes that are signed for `payload` under this purpose.
    pub fn signed_bytes(self, payload: &[u8]) -> Vec<u8> {
        let tag = self.tag();
        let mut message = Vec::with_capacity(DOMAIN.len() + tag.len() + 1 + payload.len());
        message.extend_from_slice(DOMAIN);
        message.extend_from_slice(tag);
        message.push(0);
        message.extend_from_slice(payload);
        message
    }
}

/// Why an envelope was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("signature by {signer} does not verify for a {purpose:?}")]
    BadSignature { signer: PublicKey, purpose: Purpose },
    #[error("signed payload does not decode: {0}")]
    Payload(#[from] CodecError),
}

/// An ed25519 signature, 64 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SignatureVisitor;
        impl<'de> serde::de::Visitor<'de> for SignatureVisitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-byte ed25519 signature")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Signature, E> {
                let bytes: [u8; 64] = bytes
                    .try_into()
                    .map_err(|_| E::invalid_length(bytes.len(), &self))?;
                Ok(Signature(bytes))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Signature, E> {
                let mut bytes = [0u8; 64];
                hex::decode_to_slice(text, &mut bytes).map_err(E::custom)?;
                Ok(Signature(bytes))
            }
        }
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(SignatureVisitor)
        } else {
            deserializer.deserialize_bytes(SignatureVisitor)
        }
    }
}

/// Payload bytes signed by `signer` for a stated purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// The encoded message, exactly as signed.
    pub payload: Vec<u8>,
    /// Who signed it.
    pub signer: PublicKey,
    /// ed25519 signature over [`Purpose::signed_bytes`] of the payload.
    pub signature: Signature,
}

impl SignedEnvelope {
    /// Signs already-encoded payload bytes.
    pub fn seal_bytes(purpose: Purpose, key: &SecretKey, payload: Vec<u8>) -> Self {
        let signature = Signature(key.sign(&purpose.signed_bytes(&payload)));
        Self {
            payload,
            signer: key.public_key(),
            signature,
        }
    }

    /// Encodes `message` with the protocol codec and signs the bytes.
    pub fn seal<T: Serialize>(
        purpose: Purpose,
        key: &SecretKey,
        message: &T,
    ) -> Result<Self, CodecError> {
        Ok(Self::seal_bytes(purpose, key, codec::encode(message)?))
    }

    /// Verifies the signature over the received payload bytes; returns those bytes.
    pub fn verify(&self, purpose: Purpose) -> Result<&[u8], EnvelopeError> {
        if self
            .signer
            .verify_strict(&purpose.signed_bytes(&self.payload), &self.signature.0)
        {
            Ok(&self.payload)
        } else {
            Err(EnvelopeError::BadSignature {
                signer: self.signer,
                purpose,
            })
        }
    }

    /// Verifies, then decodes the payload (never the other way round).
    pub fn open<T: serde::de::DeserializeOwned>(
        &self,
        purpose: Purpose,
        max_bytes: usize,
    ) -> Result<T, EnvelopeError> {
        let bytes = self.verify(purpose)?;
        Ok(codec::decode_limited(bytes, max_bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_for_one_purpose_does_not_verify_for_another() {
        let key = SecretKey::generate().unwrap();
        let sealed = SignedEnvelope::seal(Purpose::QueryRequest, &key, &42u64).unwrap();
        assert_eq!(sealed.open::<u64>(Purpose::QueryRequest, 64).unwrap(), 42);
        assert!(matches!(
            sealed.verify(Purpose::NodeAnswer),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_flipped_payload_bit_is_detected() {
        let key = SecretKey::generate().unwrap();
        let mut sealed = SignedEnvelope::seal(Purpose::QueryRequest, &key, &"cohort").unwrap();
        sealed.payload[1] ^= 1;
        assert!(sealed.verify(Purpose::QueryRequest).is_err());
    }

    #[test]
    fn envelope_survives_the_codec() {
        let key = SecretKey::generate().unwrap();
        let sealed = SignedEnvelope::seal(Purpose::NodeAnswer, &key, &vec![1u8, 2, 3]).unwrap();
        let bytes = codec::encode(&sealed).unwrap();
        let back: SignedEnvelope = codec::decode_limited(&bytes, 1024).unwrap();
        assert_eq!(back, sealed);
        back.verify(Purpose::NodeAnswer).unwrap();
    }
}
