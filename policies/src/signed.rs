//! The signed form of a policy bundle, and its verification.
//!
//! The canonical form of a bundle is its protocol encoding (`renkei_protocol::codec`); admins
//! sign those exact bytes ([`Purpose::PolicyBundle`]) separately, and the detached signatures
//! are collected in one file. Verification checks every signature over the received bytes
//! first, decodes the bundle only then, and accepts it only if at least `threshold` distinct
//! admins of the trusted set signed. A [`VerifiedPolicy`] can only be obtained this way.

use std::collections::BTreeSet;
use std::path::Path;

use renkei_protocol::codec::{self, CodecError};
use renkei_protocol::envelope::Signature;
use renkei_protocol::limits::MAX_POLICY_BYTES;
use renkei_protocol::{PolicyTransfer, PublicKey, Purpose, SecretKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::PolicyBundle;
use crate::error::PolicyError;

/// Names the file format, so another JSON file is recognised as such.
const FORMAT: &str = "renkei-signed-policy-v1";

pub use renkei_protocol::AdminSignature;

/// A bundle in canonical form with the admin signatures collected so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    canonical: Vec<u8>,
    signatures: Vec<AdminSignature>,
}

/// The JSON file form of a [`SignedPolicy`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedPolicyFile {
    format: String,
    /// Hex of the canonical bundle bytes, exactly as signed.
    bundle: String,
    signatures: Vec<AdminSignature>,
}

/// The admins trusted to sign bundles, and how many must sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    pub admins: BTreeSet<PublicKey>,
    pub threshold: usize,
}

/// A policy whose signatures have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedPolicy {
    bundle: PolicyBundle,
    hash: [u8; 32],
    signers: BTreeSet<PublicKey>,
}

impl SignedPolicy {
    /// Encodes `bundle` canonically, with no signatures yet.
    pub fn unsigned(bundle: &PolicyBundle) -> Result<Self, PolicyError> {
        bundle.validate()?;
        Ok(Self {
            canonical: codec::encode_limited(bundle, MAX_POLICY_BYTES)?,
            signatures: Vec::new(),
        })
    }

    /// Adds (or replaces) `key`'s signature over the canonical bytes.
    pub fn sign(&mut self, key: &SecretKey) {
        let admin = key.public_key();
        let signature = Signature(key.sign(&Purpose::PolicyBundle.signed_bytes(&self.canonical)));
        self.signatures.retain(|s| s.admin != admin);
        self.signatures.push(AdminSignature { admin, signature });
    }

    pub fn signatures(&self) -> &[AdminSignature] {
        &self.signatures
    }

    /// SHA-256 of the canonical bundle bytes: the bundle's identity.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(&self.canonical).into()
    }

    /// Verifies against the admins and threshold the bundle itself names. Use this for the
    /// first bundle a node sees; later bundles are verified against the active one's anchor.
    pub fn verify_self_anchored(&self) -> Result<VerifiedPolicy, PolicyError> {
        let signers = self.valid_signers()?;
        let bundle: PolicyBundle = codec::decode_limited(&self.canonical, MAX_POLICY_BYTES)?;
        bundle.validate()?;
        let own = anchor_of(&bundle);
        self.accept(bundle, signers, &own)
    }

    /// Verifies against an anchor the verifier already trusts (the active bundle's admins).
    /// The bundle must carry `anchor.threshold` signatures of those admins **and** its own
    /// threshold of its own admins, so admins can be rotated only with the consent of both
    /// the old and the new set.
    pub fn verify(&self, anchor: &TrustAnchor) -> Result<VerifiedPolicy, PolicyError> {
        let signers = self.valid_signers()?;
        let bundle: PolicyBundle = codec::decode_limited(&self.canonical, MAX_POLICY_BYTES)?;
        bundle.validate()?;
        self.accept(bundle, signers, anchor)
    }

    /// Every signature must verify over the canonical bytes; returns the distinct signers.
    fn valid_signers(&self) -> Result<BTreeSet<PublicKey>, PolicyError> {
        if self.canonical.len() > MAX_POLICY_BYTES {
            return Err(CodecError::TooLarge {
                len: self.canonical.len(),
                limit: MAX_POLICY_BYTES,
            }
            .into());
        }
        let message = Purpose::PolicyBundle.signed_bytes(&self.canonical);
        let mut signers = BTreeSet::new();
        for AdminSignature { admin, signature } in &self.signatures {
            if !admin.verify_strict(&message, &signature.0) {
                return Err(PolicyError::BadSignature { admin: *admin });
            }
            signers.insert(*admin);
        }
        Ok(signers)
    }

    fn accept(
        &self,
        bundle: PolicyBundle,
        signers: BTreeSet<PublicKey>,
        anchor: &TrustAnchor,
    ) -> Result<VerifiedPolicy, PolicyError> {
        let own = anchor_of(&bundle);
        if let Some(stranger) = signers
            .iter()
            .find(|s| !anchor.admins.contains(s) && !own.admins.contains(s))
        {
            return Err(PolicyError::NotAnAdmin { signer: *stranger });
        }
        for required in [anchor, &own] {
            let valid = signers.intersection(&required.admins).count();
            let threshold = required.threshold.max(1);
            if valid < threshold {
                return Err(PolicyError::TooFewSignatures { valid, threshold });
            }
        }
        Ok(VerifiedPolicy {
            bundle,
            hash: self.hash(),
            signers,
        })
    }

    /// The canonical bytes that were signed.
    pub fn canonical_bytes(&self) -> &[u8] {
        &self.canonical
    }

    /// The form in which bundles travel between peers.
    pub fn to_transfer(&self) -> PolicyTransfer {
        PolicyTransfer {
            bundle: self.canonical.clone(),
            signatures: self.signatures.clone(),
        }
    }

    /// A signed policy as received from a peer; nothing is verified yet.
    pub fn from_transfer(transfer: PolicyTransfer) -> Self {
        Self {
            canonical: transfer.bundle,
            signatures: transfer.signatures,
        }
    }

    pub fn to_json(&self) -> Result<String, PolicyError> {
        let file = SignedPolicyFile {
            format: FORMAT.to_string(),
            bundle: hex::encode(&self.canonical),
            signatures: self.signatures.clone(),
        };
        serde_json::to_string_pretty(&file).map_err(|e| PolicyError::Parse(e.to_string()))
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let format_error = |reason: String| PolicyError::Format {
            path: origin.to_string(),
            reason,
        };
        let file: SignedPolicyFile =
            serde_json::from_str(text).map_err(|e| format_error(e.to_string()))?;
        if file.format != FORMAT {
            return Err(format_error(format!(
                "format is `{}`, expected `{FORMAT}`",
                file.format
            )));
        }
        if file.bundle.len() > 2 * MAX_POLICY_BYTES {
            return Err(format_error("bundle exceeds the size limit".into()));
        }
        let canonical = hex::decode(&file.bundle)
            .map_err(|e| format_error(format!("bundle is not hex: {e}")))?;
        Ok(Self {
            canonical,
            signatures: file.signatures,
        })
    }

    pub fn read_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write_file(&self, path: &Path) -> Result<(), PolicyError> {
        let io = |source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, self.to_json()?).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn anchor_of(bundle: &PolicyBundle) -> TrustAnchor {
    TrustAnchor {
        admins: bundle.admins.iter().copied().collect(),
        threshold: bundle.threshold as usize,
    }
}

impl VerifiedPolicy {
    pub fn bundle(&self) -> &PolicyBundle {
        &self.bundle
    }

    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn signers(&self) -> &BTreeSet<PublicKey> {
        &self.signers
    }

    /// The anchor this bundle establishes for verifying its successors.
    pub fn anchor(&self) -> TrustAnchor {
        anchor_of(&self.bundle)
    }

    /// How many of this bundle's own admins signed it.
    pub fn admin_signatures(&self) -> usize {
        self.bundle
            .admins
            .iter()
            .filter(|a| self.signers.contains(a))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::QueryLimits;
    use renkei_protocol::MicroRho;

    fn bundle(admins: &[&SecretKey], threshold: u32) -> PolicyBundle {
        PolicyBundle {
            version: 1,
            consortium: "test".into(),
            admins: admins.iter().map(|k| k.public_key()).collect(),
            threshold,
            members: vec![],
            researchers: vec![],
            studies: vec![],
            sensitive: vec![],
            revoked: vec![],
            limits: QueryLimits {
                max_rho_per_query: MicroRho(100_000),
                ..QueryLimits::default()
            },
        }
    }

    #[test]
    fn a_signed_bundle_round_trips_through_its_file_form() {
        let admin = SecretKey::generate().unwrap();
        let mut signed = SignedPolicy::unsigned(&bundle(&[&admin], 1)).unwrap();
        signed.sign(&admin);
        let back = SignedPolicy::from_json(&signed.to_json().unwrap(), "mem").unwrap();
        let verified = back.verify_self_anchored().unwrap();
        assert_eq!(verified.bundle(), &bundle(&[&admin], 1));
        assert!(verified.signers().contains(&admin.public_key()));
    }

    #[test]
    fn threshold_counts_distinct_admins() {
        let (a, b, c) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let mut signed = SignedPolicy::unsigned(&bundle(&[&a, &b, &c], 2)).unwrap();
        signed.sign(&a);
        signed.sign(&a);
        assert!(matches!(
            signed.verify_self_anchored(),
            Err(PolicyError::TooFewSignatures {
                valid: 1,
                threshold: 2
            })
        ));
        signed.sign(&b);
        signed.verify_self_anchored().unwrap();
    }

    #[test]
    fn tampering_and_strangers_are_refused() {
        let admin = SecretKey::generate().unwrap();
        let stranger = SecretKey::generate().unwrap();
        let mut signed = SignedPolicy::unsigned(&bundle(&[&admin], 1)).unwrap();
        signed.sign(&stranger);
        assert!(matches!(
            signed.verify_self_anchored(),
            Err(PolicyError::NotAnAdmin { .. })
        ));

        let mut signed = SignedPolicy::unsigned(&bundle(&[&admin], 1)).unwrap();
        signed.sign(&admin);
        let last = signed.canonical.len() - 1;
        signed.canonical[last] ^= 1;
        assert!(matches!(
            signed.verify_self_anchored(),
            Err(PolicyError::BadSignature { .. })
        ));
    }

    #[test]
    fn rotating_admins_needs_both_the_old_and_the_new_set() {
        let (old, new) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let anchor = TrustAnchor {
            admins: [old.public_key()].into(),
            threshold: 1,
        };
        let mut rotated = bundle(&[&new], 1);
        rotated.version = 2;
        let mut signed = SignedPolicy::unsigned(&rotated).unwrap();
        signed.sign(&new);
        assert!(matches!(
            signed.verify(&anchor),
            Err(PolicyError::TooFewSignatures { valid: 0, .. })
        ));
        signed.sign(&old);
        let verified = signed.verify(&anchor).unwrap();
        assert_eq!(verified.anchor().admins, [new.public_key()].into());
        assert_eq!(verified.admin_signatures(), 1);
    }

    #[test]
    fn a_self_signed_bundle_is_not_trusted_by_another_anchor() {
        let admin = SecretKey::generate().unwrap();
        let usurper = SecretKey::generate().unwrap();
        let mut forged = SignedPolicy::unsigned(&bundle(&[&usurper], 1)).unwrap();
        forged.sign(&usurper);
        forged.verify_self_anchored().unwrap();
        let anchor = TrustAnchor {
            admins: [admin.public_key()].into(),
            threshold: 1,
        };
        assert!(matches!(
            forged.verify(&anchor),
            Err(PolicyError::TooFewSignatures { valid: 0, .. })
        ));
    }
}
