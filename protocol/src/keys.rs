//! Key newtypes: researcher, admin and node ed25519 keys.
//!
//! [`PublicKey`] is the 32-byte ed25519 key that names a researcher, a consortium admin or a
//! node (a node's libp2p peer id is derived from the same key). It prints and parses as hex
//! and encodes as raw bytes on the wire. [`SecretKey`] zeroizes on drop and never prints;
//! its file form is a two-line text file read and written only through this module.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// First line of a secret key file; names the format so a wrong file is recognised.
const SECRET_KEY_HEADER: &str = "renkei-ed25519-secret-key-v1";

/// Errors from reading, parsing or generating keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("public key `{text}` is not 64 hex digits: {reason}")]
    BadPublicKey { text: String, reason: String },
    #[error("{path}: not a renkei secret key file ({reason})")]
    BadKeyFile { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the operating system's random source failed: {0}")]
    Randomness(String),
    #[error("peer id {peer_id} is not derived from an ed25519 key")]
    NotEd25519PeerId { peer_id: String },
}

/// An ed25519 public key: a researcher's, an admin's or a node's identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks `signature` over `message` with ed25519 `verify_strict` (rejects weak keys and
    /// malleable signatures).
    pub fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        if key.is_weak() {
            return false;
        }
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &signature).is_ok()
    }

    /// The libp2p peer id of the node whose identity is this key; fails for 32 bytes that are
    /// not a point on the curve.
    pub fn to_peer_id(&self) -> Result<libp2p_identity::PeerId, KeyError> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0).map_err(|e| {
            KeyError::BadPublicKey {
                text: self.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(libp2p_identity::PublicKey::from(key).to_peer_id())
    }

    /// Recovers the ed25519 key inlined in an ed25519 peer id (identity multihash).
    pub fn from_peer_id(peer_id: &libp2p_identity::PeerId) -> Result<Self, KeyError> {
        let not_ed25519 = || KeyError::NotEd25519PeerId {
            peer_id: peer_id.to_string(),
        };
        let multihash = peer_id.as_ref();
        if multihash.code() != 0 {
            return Err(not_ed25519());
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(multihash.digest())
            .map_err(|_| not_ed25519())?;
        let key = key.try_into_ed25519().map_err(|_| not_ed25519())?;
        Ok(Self(key.to_bytes()))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(self.0))
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| KeyError::BadPublicKey {
            text: text.chars().take(80).collect(),
            reason,
        };
        let bytes = hex::decode(text.trim()).map_err(|e| bad(e.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| bad(format!("{} bytes, expected 32", b.len())))?;
        Ok(Self(bytes))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(self.0))
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(Self(<[u8; 32]>::deserialize(deserializer)?))
        }
    }
}

/// An ed25519 signing key. Zeroized on drop; `Debug` shows only the public half.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Randomness(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// The key whose 32-byte seed is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed; handle with care (callers should zeroize their copy).
    pub fn to_seed(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.0.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// The libp2p identity with the same key, so a node's peer id and its answer signatures
    /// name the same key.
    pub fn to_libp2p_keypair(&self) -> Result<libp2p_identity::Keypair, KeyError> {
        let mut seed = self.to_seed();
        let secret =
            libp2p_identity::ed25519::SecretKey::try_from_bytes(seed.as_mut()).map_err(|e| {
                KeyError::BadKeyFile {
                    path: "(in memory)".to_string(),
                    reason: e.to_string(),
                }
            })?;
        Ok(libp2p_identity::ed25519::Keypair::from(secret).into())
    }

    /// Reads a secret key file written by [`SecretKey::write_file`].
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            KeyError::Io {
                path: path.display().to_string(),
                source,
            }
        })?);
        let bad = |reason: &str| KeyError::BadKeyFile {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(SECRET_KEY_HEADER) {
            return Err(bad("missing the renkei-ed25519-secret-key-v1 header line"));
        }
        let encoded = lines.next().map(str::trim).unwrap_or_default();
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(encoded, seed.as_mut())
            .map_err(|_| bad("second line is not a 64-digit hex seed"))?;
        Ok(Self::from_seed(&seed))
    }

    /// Writes the key to `path` (created new, mode 0600 on Unix). Refuses to overwrite.
    pub fn write_file(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        let text = zeroize::Zeroizing::new(format!(
            "{SECRET_KEY_HEADER}\n{}\n",
            hex::encode(self.to_seed().as_ref())
        ));
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_through_hex_and_peer_id() {
        let key = SecretKey::generate().unwrap();
        let public = key.public_key();
        assert_eq!(public.to_string().parse::<PublicKey>().unwrap(), public);
        let peer = public.to_peer_id().unwrap();
        assert_eq!(key.to_libp2p_keypair().unwrap().public().to_peer_id(), peer);
        assert_eq!(PublicKey::from_peer_id(&peer).unwrap(), public);
    }

    #[test]
    fn signature_verifies_only_for_its_message_and_key() {
        let key = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let sig = key.sign(b"count diabetics");
        assert!(key.public_key().verify_strict(b"count diabetics", &sig));
        assert!(!key.public_key().verify_strict(b"count smokers", &sig));
        assert!(!other.public_key().verify_strict(b"count diabetics", &sig));
    }

    #[test]
    fn key_file_round_trips_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("researcher.key");
        let key = SecretKey::generate().unwrap();
        key.write_file(&path).unwrap();
        assert_eq!(
            SecretKey::read_file(&path).unwrap().public_key(),
            key.public_key()
        );
        assert!(matches!(key.write_file(&path), Err(KeyError::Io { .. })));
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            SecretKey::read_file(&path),
            Err(KeyError::BadKeyFile { .. })
        ));
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let key = SecretKey::from_seed(&[7u8; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode([7u8; 32])));
    }
}
