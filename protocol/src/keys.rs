//! Key newtypes: researcher, admin and node ed25519 keys.
//!
//! [`PublicKey`] is the 32-byte ed25519 key that names a researcher, a consortium admin or a
//! node (a node's libp2p peer id is derived from the same key). It prints and parses as hex
//! and encodes as raw bytes on the wire. [`SecretKey`] zeroizes on drop and never prints.
//!
//! Key files are text, read and written only through this module, in two forms: plain (a
//! header line and the hex seed; for node identities and development keys, protected by
//! file permissions) and encrypted at rest (people's keys: the seed sealed with
//! XChaCha20-Poly1305 under a key derived from a passphrase with Argon2id, so using the key
//! needs both the file and the passphrase).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// First line of a plain secret key file; names the format so a wrong file is recognised.
const SECRET_KEY_HEADER: &str = "renkei-ed25519-secret-key-v1";

/// First line of a passphrase-encrypted secret key file.
const ENCRYPTED_KEY_HEADER: &str = "renkei-ed25519-secret-key-v1-encrypted";

/// Argon2id cost of new encrypted keys: 64 MiB, 3 passes, 1 lane (a fraction of a second).
const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_PASSES: u32 = 3;
const KDF_LANES: u32 = 1;

/// The most expensive stored parameters a file may ask for (a hostile file cannot make us
/// allocate gigabytes).
const KDF_MAX_MEMORY_KIB: u32 = 1024 * 1024;
const KDF_MAX_PASSES: u32 = 64;

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
    #[error("{path}: wrong passphrase (or the file was altered)")]
    WrongPassphrase { path: String },
    #[error("{path}: the key is encrypted and needs a passphrase: {reason}")]
    PassphraseUnavailable { path: String, reason: String },
    #[error("key encryption failed: {0}")]
    Encryption(String),
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
            text: text.chars().take(200).collect(),
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

    /// X25519 agreement with `peer` (its ed25519 key seen as a Montgomery point, this key's
    /// scalar as the X25519 secret): both sides get the same 32 bytes, nobody else can.
    /// Callers must derive keys from it with a KDF and a context naming the purpose.
    pub fn agree(&self, peer: &PublicKey) -> Result<zeroize::Zeroizing<[u8; 32]>, KeyError> {
        let bad = |reason: &str| KeyError::BadPublicKey {
            text: peer.to_string(),
            reason: reason.to_string(),
        };
        let verifying = VerifyingKey::from_bytes(&peer.0).map_err(|e| bad(&e.to_string()))?;
        if verifying.is_weak() {
            return Err(bad("a weak (small-order) key"));
        }
        let scalar = zeroize::Zeroizing::new(self.0.to_scalar_bytes());
        let shared = verifying.to_montgomery().mul_clamped(*scalar).to_bytes();
        if shared == [0u8; 32] {
            return Err(bad("the agreement is degenerate"));
        }
        Ok(zeroize::Zeroizing::new(shared))
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

    /// Reads a plain secret key file written by [`SecretKey::write_file`]. An encrypted
    /// file is refused with [`KeyError::PassphraseUnavailable`]; use
    /// [`SecretKey::read_file_with`] for those.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        Self::read_file_with(path, || Err("no passphrase source was given".into()))
    }

    /// Reads a plain or encrypted key file; for an encrypted one, `passphrase` is called
    /// (once) to obtain the passphrase.
    pub fn read_file_with(
        path: &Path,
        passphrase: impl FnOnce() -> Result<Zeroizing<String>, String>,
    ) -> Result<Self, KeyError> {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| KeyError::Io {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        let shown = path.display().to_string();
        let bad = |reason: &str| KeyError::BadKeyFile {
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let mut lines = text.lines().map(str::trim);
        match lines.next() {
            Some(SECRET_KEY_HEADER) => {
                let encoded = lines.next().unwrap_or_default();
                let mut seed = Zeroizing::new([0u8; 32]);
                hex::decode_to_slice(encoded, seed.as_mut())
                    .map_err(|_| bad("second line is not a 64-digit hex seed"))?;
                Ok(Self::from_seed(&seed))
            }
            Some(ENCRYPTED_KEY_HEADER) => {
                let sealed = SealedKey::parse(lines).map_err(|reason| bad(&reason))?;
                let passphrase =
                    passphrase().map_err(|reason| KeyError::PassphraseUnavailable {
                        path: shown.clone(),
                        reason,
                    })?;
                sealed.open(passphrase.as_bytes(), &shown)
            }
            _ => Err(bad("the first line is not a renkei key header")),
        }
    }

    /// The public key in a key file, without needing the passphrase of an encrypted one.
    pub fn public_key_in_file(path: &Path) -> Result<PublicKey, KeyError> {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| KeyError::Io {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        let mut lines = text.lines().map(str::trim);
        if lines.next() == Some(ENCRYPTED_KEY_HEADER) {
            return SealedKey::parse(lines)
                .map(|sealed| sealed.public)
                .map_err(|reason| KeyError::BadKeyFile {
                    path: path.display().to_string(),
                    reason,
                });
        }
        Ok(Self::read_file(path)?.public_key())
    }

    /// Writes the key encrypted under `passphrase` (Argon2id + XChaCha20-Poly1305), created
    /// new with mode 0600. Refuses to overwrite.
    pub fn write_encrypted(&self, path: &Path, passphrase: &[u8]) -> Result<(), KeyError> {
        let sealed = SealedKey::seal(self, passphrase)?;
        write_new_private_file(path, sealed.to_text().as_bytes())
    }

    /// Writes the key unencrypted to `path` (created new, mode 0600 on Unix), for node
    /// identities and development keys. Refuses to overwrite.
    pub fn write_file(&self, path: &Path) -> Result<(), KeyError> {
        let text = Zeroizing::new(format!(
            "{SECRET_KEY_HEADER}\n{}\n",
            hex::encode(self.to_seed().as_ref())
        ));
        write_new_private_file(path, text.as_bytes())
    }
}

/// Creates `path` (never overwriting), mode 0600 on Unix, writes `bytes` and syncs.
fn write_new_private_file(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
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
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// An encrypted key file's contents.
struct SealedKey {
    memory_kib: u32,
    passes: u32,
    lanes: u32,
    salt: [u8; 16],
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
    public: PublicKey,
}

impl SealedKey {
    fn seal(key: &SecretKey, passphrase: &[u8]) -> Result<Self, KeyError> {
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut salt).map_err(|e| KeyError::Randomness(e.to_string()))?;
        getrandom::fill(&mut nonce).map_err(|e| KeyError::Randomness(e.to_string()))?;
        let mut sealed = Self {
            memory_kib: KDF_MEMORY_KIB,
            passes: KDF_PASSES,
            lanes: KDF_LANES,
            salt,
            nonce,
            ciphertext: Vec::new(),
            public: key.public_key(),
        };
        let cipher = sealed.cipher(passphrase)?;
        let seed = key.to_seed();
        sealed.ciphertext = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: seed.as_ref(),
                    aad: sealed.associated_data().as_bytes(),
                },
            )
            .map_err(|e| KeyError::Encryption(e.to_string()))?;
        Ok(sealed)
    }

    fn open(&self, passphrase: &[u8], path: &str) -> Result<SecretKey, KeyError> {
        let wrong = || KeyError::WrongPassphrase {
            path: path.to_string(),
        };
        let seed = Zeroizing::new(
            self.cipher(passphrase)?
                .decrypt(
                    &XNonce::from(self.nonce),
                    Payload {
                        msg: &self.ciphertext,
                        aad: self.associated_data().as_bytes(),
                    },
                )
                .map_err(|_| wrong())?,
        );
        let seed: &[u8; 32] = seed.as_slice().try_into().map_err(|_| wrong())?;
        let key = SecretKey::from_seed(seed);
        if key.public_key() != self.public {
            return Err(wrong());
        }
        Ok(key)
    }

    /// The derived key-encryption key as a cipher.
    fn cipher(&self, passphrase: &[u8]) -> Result<XChaCha20Poly1305, KeyError> {
        let params = argon2::Params::new(self.memory_kib, self.passes, self.lanes, Some(32))
            .map_err(|e| KeyError::Encryption(e.to_string()))?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = Zeroizing::new([0u8; 32]);
        kdf.hash_password_into(passphrase, &self.salt, kek.as_mut())
            .map_err(|e| KeyError::Encryption(e.to_string()))?;
        XChaCha20Poly1305::new_from_slice(kek.as_ref())
            .map_err(|e| KeyError::Encryption(e.to_string()))
    }

    /// Everything but the ciphertext is bound to it as associated data.
    fn associated_data(&self) -> String {
        format!(
            "{ENCRYPTED_KEY_HEADER}|argon2id m={} t={} p={}|{}|{}",
            self.memory_kib,
            self.passes,
            self.lanes,
            hex::encode(self.salt),
            self.public
        )
    }

    fn to_text(&self) -> String {
        format!(
            "{ENCRYPTED_KEY_HEADER}\nkdf=argon2id m={} t={} p={}\nsalt={}\nnonce={}\nciphertext={}\npublic={}\n",
            self.memory_kib,
            self.passes,
            self.lanes,
            hex::encode(self.salt),
            hex::encode(self.nonce),
            hex::encode(&self.ciphertext),
            self.public
        )
    }

    fn parse<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let mut fields = std::collections::BTreeMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line `{line}` is not name=value"))?;
            fields.insert(name, value);
        }
        let field = |name: &str| {
            fields
                .get(name)
                .copied()
                .ok_or(format!("no `{name}=` line"))
        };
        let kdf = field("kdf")?;
        let cost = |prefix: &str| -> Result<u32, String> {
            kdf.split_whitespace()
                .find_map(|part| part.strip_prefix(prefix))
                .and_then(|v| v.parse().ok())
                .ok_or(format!("kdf line lacks `{prefix}<number>`"))
        };
        if !kdf.starts_with("argon2id ") {
            return Err(format!("unknown kdf `{kdf}`"));
        }
        let (memory_kib, passes, lanes) = (cost("m=")?, cost("t=")?, cost("p=")?);
        if memory_kib > KDF_MAX_MEMORY_KIB || passes > KDF_MAX_PASSES || lanes == 0 || lanes > 16 {
            return Err("kdf parameters are out of range".into());
        }
        let hex_array = |name: &str, out: &mut [u8]| -> Result<(), String> {
            hex::decode_to_slice(field(name)?, out)
                .map_err(|_| format!("`{name}` is not hex of the right length"))
        };
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 24];
        hex_array("salt", &mut salt)?;
        hex_array("nonce", &mut nonce)?;
        let ciphertext =
            hex::decode(field("ciphertext")?).map_err(|_| "`ciphertext` is not hex".to_string())?;
        let public = field("public")?
            .parse()
            .map_err(|e: KeyError| e.to_string())?;
        Ok(Self {
            memory_kib,
            passes,
            lanes,
            salt,
            nonce,
            ciphertext,
            public,
        })
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
    fn encrypted_key_files_need_the_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("researcher.key");
        let key = SecretKey::generate().unwrap();
        key.write_encrypted(&path, b"correct horse battery staple")
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(key.to_seed().as_ref())));
        assert_eq!(
            SecretKey::public_key_in_file(&path).unwrap(),
            key.public_key()
        );

        let with = |pass: &'static str| {
            SecretKey::read_file_with(&path, move || Ok(Zeroizing::new(pass.to_string())))
        };
        assert_eq!(
            with("correct horse battery staple").unwrap().public_key(),
            key.public_key()
        );
        assert!(matches!(
            with("Tr0ub4dor&3"),
            Err(KeyError::WrongPassphrase { .. })
        ));
        assert!(matches!(
            SecretKey::read_file(&path),
            Err(KeyError::PassphraseUnavailable { .. })
        ));
        // Swapping in another public key (to mislead tools) breaks decryption.
        let other = SecretKey::generate().unwrap().public_key().to_string();
        let forged = text.replace(&key.public_key().to_string(), &other);
        std::fs::write(&path, forged).unwrap();
        assert!(matches!(
            with("correct horse battery staple"),
            Err(KeyError::WrongPassphrase { .. })
        ));
    }

    #[test]
    fn agreement_is_symmetric_and_private() {
        let (a, b, c) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let ab = a.agree(&b.public_key()).unwrap();
        assert_eq!(*ab, *b.agree(&a.public_key()).unwrap());
        assert_ne!(*ab, *a.agree(&c.public_key()).unwrap());
        assert_ne!(*ab, *c.agree(&b.public_key()).unwrap());
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let key = SecretKey::from_seed(&[7u8; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode([7u8; 32])));
    }
}
