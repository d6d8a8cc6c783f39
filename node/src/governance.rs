//! The node's active consortium policy: verified, stored, swapped.
//!
//! The first bundle a node accepts pins its trust: it is verified against the admins it
//! names. Every later bundle must carry the threshold of the *active* bundle's admins (and its
//! own), and a higher version; an equal version is accepted only if it is the same bundle.
//! The active bundle is stored (as signed) before it takes effect, so a restart resumes it and
//! a node that was offline can be brought up to date by any peer holding a newer one.
//! Revocations therefore take effect at the first query after the bundle arrives.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use renkei_policies::{PolicyError, SignedPolicy, VerifiedPolicy};
use renkei_protocol::{PolicyTransfer, Refusal, RefusalCode};

use crate::error::NodeError;
use crate::store::NodeStore;

const META_ACTIVE_POLICY: &[u8] = b"policy-active";

/// What happened to an offered bundle.
#[derive(Debug, Clone)]
pub enum Offered {
    /// It is now active; the previous version, if any.
    Accepted {
        policy: Arc<VerifiedPolicy>,
        previous: Option<u64>,
    },
    /// It was already the active bundle.
    AlreadyActive(Arc<VerifiedPolicy>),
}

/// Keeps the active policy.
#[derive(Debug)]
pub struct PolicyKeeper {
    store: NodeStore,
    active: RwLock<Option<Arc<VerifiedPolicy>>>,
    /// Offers are decided one at a time.
    deciding: Mutex<()>,
}

/// The refusal for a bundle that does not verify.
pub fn policy_refusal(error: &PolicyError) -> Refusal {
    let code = match error {
        PolicyError::BadSignature { .. } => RefusalCode::PolicyBadSignature,
        PolicyError::TooFewSignatures { .. } => RefusalCode::PolicyTooFewSignatures,
        PolicyError::NotAnAdmin { .. } => RefusalCode::PolicyNotAnAdmin,
        PolicyError::Io { .. }
        | PolicyError::Parse(_)
        | PolicyError::Invalid(_)
        | PolicyError::Format { .. }
        | PolicyError::Codec(_) => RefusalCode::PolicyInvalid,
    };
    Refusal::new(code, error.to_string())
}

impl PolicyKeeper {
    /// Opens the keeper with the stored active bundle, re-verified.
    pub fn open(store: NodeStore) -> Result<Self, NodeError> {
        let active = match store.meta.get(META_ACTIVE_POLICY)? {
            None => None,
            Some(bytes) => {
                let corrupt = |reason: String| NodeError::CorruptStore {
                    what: "active policy".into(),
                    reason,
                };
                let transfer: PolicyTransfer = renkei_protocol::codec::decode_limited(
                    &bytes,
                    renkei_protocol::limits::MAX_POLICY_MESSAGE_BYTES,
                )
                .map_err(|e| corrupt(e.to_string()))?;
                let verified = SignedPolicy::from_transfer(transfer)
                    .verify_self_anchored()
                    .map_err(|e| corrupt(e.to_string()))?;
                Some(Arc::new(verified))
            }
        };
        Ok(Self {
            store,
            active: RwLock::new(active),
            deciding: Mutex::new(()),
        })
    }

    /// The active policy, if the node has one.
    pub fn active(&self) -> Option<Arc<VerifiedPolicy>> {
        self.active.read().ok().and_then(|a| a.clone())
    }

    /// The active bundle as it travels, for peers that ask.
    pub fn active_transfer(&self) -> Result<Option<PolicyTransfer>, NodeError> {
        match self.store.meta.get(META_ACTIVE_POLICY)? {
            None => Ok(None),
            Some(bytes) => renkei_protocol::codec::decode_limited(
                &bytes,
                renkei_protocol::limits::MAX_POLICY_MESSAGE_BYTES,
            )
            .map(Some)
            .map_err(|e| NodeError::CorruptStore {
                what: "active policy".into(),
                reason: e.to_string(),
            }),
        }
    }

    /// Verifies an offered bundle and activates it if it is newer; stores it first.
    pub fn offer(&self, signed: &SignedPolicy) -> Result<Result<Offered, Refusal>, NodeError> {
        let _deciding = self.deciding.lock().map_err(|_| NodeError::CorruptStore {
            what: "policy keeper".into(),
            reason: "a previous decision panicked".into(),
        })?;
        let current = self.active();
        let verified = match &current {
            None => signed.verify_self_anchored(),
            Some(active) => signed.verify(&active.anchor()),
        };
        let verified = match verified {
            Ok(verified) => verified,
            Err(e) => return Ok(Err(policy_refusal(&e))),
        };
        let offered = verified.bundle().version;
        if let Some(active) = &current {
            let active_version = active.bundle().version;
            if offered < active_version {
                return Ok(Err(Refusal::new(
                    RefusalCode::PolicyRollback,
                    format!(
                        "bundle v{offered} is older than the active v{active_version}; rollbacks are refused"
                    ),
                )));
            }
            if offered == active_version {
                if verified.hash() == active.hash() {
                    return Ok(Ok(Offered::AlreadyActive(Arc::clone(active))));
                }
                return Ok(Err(Refusal::new(
                    RefusalCode::PolicyInvalid,
                    format!(
                        "a different bundle is already active as v{offered}; publish changes under a new version"
                    ),
                )));
            }
        }
        self.store.meta.insert(
            META_ACTIVE_POLICY,
            renkei_protocol::codec::encode(&signed.to_transfer())?,
        )?;
        self.store.flush()?;
        let verified = Arc::new(verified);
        if let Ok(mut active) = self.active.write() {
            *active = Some(Arc::clone(&verified));
        }
        Ok(Ok(Offered::Accepted {
            policy: verified,
            previous: current.map(|c| c.bundle().version),
        }))
    }

    /// Offers the bundle in a file at start-up. A file that does not verify is an error; one
    /// older than the stored active bundle is ignored in favour of the newer.
    pub fn offer_file(&self, path: &Path) -> Result<Result<Offered, Refusal>, NodeError> {
        let signed = SignedPolicy::read_file(path).map_err(|source| NodeError::Policy {
            path: path.to_path_buf(),
            source,
        })?;
        self.offer(&signed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::NodeHome;
    use renkei_policies::{PolicyBundle, QueryLimits};
    use renkei_protocol::SecretKey;

    fn bundle(version: u64, admins: &[&SecretKey]) -> PolicyBundle {
        PolicyBundle {
            version,
            consortium: "keeper".into(),
            admins: admins.iter().map(|a| a.public_key()).collect(),
            threshold: 1,
            members: vec![],
            researchers: vec![],
            studies: vec![],
            sensitive: vec![],
            revoked: vec![],
            limits: QueryLimits::default(),
        }
    }

    fn signed(bundle: &PolicyBundle, by: &[&SecretKey]) -> SignedPolicy {
        let mut signed = SignedPolicy::unsigned(bundle).unwrap();
        for key in by {
            signed.sign(key);
        }
        signed
    }

    #[test]
    fn newer_bundles_replace_older_ones_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let admin = SecretKey::generate().unwrap();
        let usurper = SecretKey::generate().unwrap();
        {
            let keeper = PolicyKeeper::open(home.open_store().unwrap()).unwrap();
            assert!(keeper.active().is_none());
            let v1 = signed(&bundle(1, &[&admin]), &[&admin]);
            assert!(matches!(
                keeper.offer(&v1).unwrap().unwrap(),
                Offered::Accepted { previous: None, .. }
            ));
            assert!(matches!(
                keeper.offer(&v1).unwrap().unwrap(),
                Offered::AlreadyActive(_)
            ));
            let v2 = signed(&bundle(2, &[&admin]), &[&admin]);
            keeper.offer(&v2).unwrap().unwrap();

            let code = |s: &SignedPolicy| keeper.offer(s).unwrap().unwrap_err().code;
            assert_eq!(code(&v1), RefusalCode::PolicyRollback);
            // A self-consistent bundle by strangers is not signed by the active admins.
            let coup = signed(&bundle(3, &[&usurper]), &[&usurper]);
            assert_eq!(code(&coup), RefusalCode::PolicyTooFewSignatures);
            let unsigned = SignedPolicy::unsigned(&bundle(3, &[&admin])).unwrap();
            assert_eq!(code(&unsigned), RefusalCode::PolicyTooFewSignatures);
            let mut other_v2 = bundle(2, &[&admin]);
            other_v2.consortium = "different".into();
            assert_eq!(
                code(&signed(&other_v2, &[&admin])),
                RefusalCode::PolicyInvalid
            );
        }
        let keeper = PolicyKeeper::open(home.open_store().unwrap()).unwrap();
        assert_eq!(keeper.active().unwrap().bundle().version, 2);
    }
}
