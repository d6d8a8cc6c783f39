//! The node's tamper-evident audit log: every query received and every policy change, in
//! order, hash-chained and signed by the node's key.
//!
//! Entry `n` records its sequence number, the time, the SHA-256 of entry `n-1` and the event;
//! its encoding is signed by the node ([`Purpose::AuditEntry`]) and stored in the `audit`
//! tree under `n` (big-endian). The head (last number and hash) is kept in `meta`.
//! [`verify`] walks the log and names the first entry that was edited (its signature fails),
//! removed (a gap in the numbers), reordered (its predecessor's hash does not match) or cut
//! from the end (the head disagrees). Someone who holds the node's key and rewrites the whole
//! log can forge it; the log proves integrity against everyone else. Appends are serialised
//! by one lock; an entry recorded with an answer is flushed with that answer.

use std::sync::Mutex;

use renkei_protocol::envelope::Signature;
use renkei_protocol::{MicroRho, PublicKey, Purpose, RefusalCode, RequestId, SecretKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::NodeError;
use crate::store::NodeStore;

const META_AUDIT_HEAD: &[u8] = b"audit-head";

/// Largest stored entry.
const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    /// The node started serving under a policy.
    NodeStarted {
        policy_version: u64,
        policy_hash: String,
    },
    /// A query was answered (or its recorded answer resent).
    QueryAnswered {
        researcher: PublicKey,
        study: String,
        request_id: String,
        /// SHA-256 of the signed request payload.
        query_hash: String,
        /// What the request costs at this node (charged once, at its first delivery; the
        /// ledger, not this log, is the authority on spend).
        rho: MicroRho,
        /// SHA-256 of the signed answer as recorded (and then sent).
        answer_hash: String,
        /// A delivery of an answer recorded before, which charged nothing new.
        resent: bool,
    },
    /// A query was refused.
    QueryRefused {
        /// Known once the signature verified.
        researcher: Option<PublicKey>,
        study: Option<String>,
        request_id: Option<String>,
        query_hash: Option<String>,
        code: RefusalCode,
    },
    /// A new policy bundle became active.
    PolicyActivated {
        version: u64,
        hash: String,
        previous_version: Option<u64>,
        source: String,
    },
    /// An offered policy bundle was refused.
    PolicyRefused { code: RefusalCode, source: String },
    // New events go last: the position is what the signed log stores.
    /// A dry run was quoted (nothing spent).
    QueryQuoted {
        researcher: PublicKey,
        study: String,
        request_id: String,
        query_hash: String,
        rho: MicroRho,
    },
    /// A recoverable secure round's survivors were settled (for good): this node committed
    /// to them and revealed its pairwise masks with the `dropped` nodes.
    RoundSettled {
        researcher: PublicKey,
        request_id: String,
        query_hash: String,
        survivors: usize,
        dropped: Vec<PublicKey>,
    },
    /// Every survivor of a settled round had committed to it: this node revealed its own
    /// mask.
    RoundRevealed {
        researcher: PublicKey,
        request_id: String,
        query_hash: String,
    },
    /// Requests from no known researcher (undecodable, with a signature that does not
    /// verify, or signed by an unknown key) received between `since` and `until` (Unix
    /// seconds), counted per sending peer rather than audited one by one: anyone can send
    /// them, and they must not flood the log.
    UnauthenticatedRequests {
        since: u64,
        until: u64,
        senders: Vec<NoiseCount>,
        /// Senders beyond the most a summary lists, added up.
        others: u64,
    },
}

/// What one peer sent that no known researcher signed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseCount {
    pub peer: String,
    pub malformed: u64,
    pub bad_signature: u64,
    pub unknown_signer: u64,
}

impl NoiseCount {
    pub fn total(&self) -> u64 {
        self.malformed + self.bad_signature + self.unknown_signer
    }
}

/// One entry as signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// SHA-256 of the previous entry's signed bytes (zero for the first entry).
    pub prev: [u8; 32],
    pub event: AuditEvent,
}

/// An entry as stored: its encoding and the node's signature over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredEntry {
    payload: Vec<u8>,
    signature: Signature,
}

/// The append side of the log.
#[derive(Debug)]
pub struct AuditLog {
    store: NodeStore,
    key: SecretKey,
    /// (next sequence number, hash of the last entry).
    head: Mutex<(u64, [u8; 32])>,
}

/// A problem found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditViolation {
    #[error("entry {seq}: its signature does not verify (the entry was edited)")]
    Edited { seq: u64 },
    #[error("entry {expected} is missing: the next entry is {found} (entries were removed)")]
    Gap { expected: u64, found: u64 },
    #[error("entry {seq}: it does not follow entry {}'s hash (entries were reordered or replaced)", seq.saturating_sub(1))]
    BrokenChain { seq: u64 },
    #[error("entry {seq}: it does not decode")]
    Undecodable { seq: u64 },
    #[error(
        "the log ends at entry {last:?} but the recorded head is entry {head} (entries were cut from the end)"
    )]
    Truncated { last: Option<u64>, head: u64 },
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn read_head(store: &NodeStore) -> Result<Option<(u64, [u8; 32])>, NodeError> {
    match store.meta.get(META_AUDIT_HEAD)? {
        None => Ok(None),
        Some(bytes) => renkei_protocol::codec::decode_limited(&bytes, 64)
            .map(Some)
            .map_err(|e| NodeError::CorruptStore {
                what: "audit head".into(),
                reason: e.to_string(),
            }),
    }
}

impl AuditLog {
    /// Opens the log for appending with the node's key.
    ///
    /// An entry and the head that names it are two writes: a crash between them leaves one
    /// entry past the head. If that entry is this node's, signed, and follows the head's hash,
    /// it is the append that the crash interrupted, and the head moves to it; anything else
    /// is left for [`verify`] to report.
    pub fn open(store: NodeStore, key: SecretKey) -> Result<Self, NodeError> {
        let mut head = match read_head(&store)? {
            Some((last, last_hash)) => (last + 1, last_hash),
            None => (0, [0; 32]),
        };
        if let Some(value) = store.audit.get(head.0.to_be_bytes())?
            && let Some(entry_hash) = interrupted_append(&value, head, &key.public_key())
        {
            store.meta.insert(
                META_AUDIT_HEAD,
                renkei_protocol::codec::encode(&(head.0, entry_hash))?,
            )?;
            store.flush()?;
            head = (head.0 + 1, entry_hash);
        }
        Ok(Self {
            store,
            key,
            head: Mutex::new(head),
        })
    }

    /// Appends an event. Not flushed by itself: the caller's next flush (or sled's periodic
    /// one) makes it durable; entries that record an answer are flushed with the answer.
    pub fn append(&self, at: u64, event: AuditEvent) -> Result<(), NodeError> {
        let mut head = self.head.lock().map_err(|_| NodeError::CorruptStore {
            what: "audit log".into(),
            reason: "a writer panicked while appending".into(),
        })?;
        let (seq, prev) = *head;
        let entry = AuditEntry {
            seq,
            at,
            prev,
            event,
        };
        let payload = renkei_protocol::codec::encode(&entry)?;
        let entry_hash = hash(&payload);
        let signature = Signature(self.key.sign(&Purpose::AuditEntry.signed_bytes(&payload)));
        let stored = renkei_protocol::codec::encode(&StoredEntry { payload, signature })?;
        // A plain insert: sled writes (and syncs) its log buffer for every batch, even of
        // one entry, which cost two disk writes per answer.
        self.store.audit.insert(&seq.to_be_bytes()[..], stored)?;
        self.store.meta.insert(
            META_AUDIT_HEAD,
            renkei_protocol::codec::encode(&(seq, entry_hash))?,
        )?;
        *head = (seq + 1, entry_hash);
        Ok(())
    }
}

/// The hash of `value` if it is entry `next.0`, signed by `node_key`, following hash `next.1`.
fn interrupted_append(
    value: &[u8],
    next: (u64, [u8; 32]),
    node_key: &PublicKey,
) -> Option<[u8; 32]> {
    let stored: StoredEntry =
        renkei_protocol::codec::decode_limited(value, MAX_ENTRY_BYTES).ok()?;
    if !node_key.verify_strict(
        &Purpose::AuditEntry.signed_bytes(&stored.payload),
        &stored.signature.0,
    ) {
        return None;
    }
    let entry: AuditEntry =
        renkei_protocol::codec::decode_limited(&stored.payload, MAX_ENTRY_BYTES).ok()?;
    (entry.seq == next.0 && entry.prev == next.1).then(|| hash(&stored.payload))
}

/// Every entry in order, after checking the whole log against `node_key`.
pub fn verify(
    store: &NodeStore,
    node_key: &PublicKey,
) -> Result<Result<Vec<AuditEntry>, AuditViolation>, NodeError> {
    let mut entries = Vec::new();
    let mut expected = 0u64;
    let mut prev = [0u8; 32];
    for item in store.audit.iter() {
        let (key, value) = item?;
        let seq =
            u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| NodeError::CorruptStore {
                        what: "audit key".into(),
                        reason: "not 8 bytes".into(),
                    })?,
            );
        if seq != expected {
            return Ok(Err(AuditViolation::Gap {
                expected,
                found: seq,
            }));
        }
        let Ok(stored) =
            renkei_protocol::codec::decode_limited::<StoredEntry>(&value, MAX_ENTRY_BYTES)
        else {
            return Ok(Err(AuditViolation::Undecodable { seq }));
        };
        if !node_key.verify_strict(
            &Purpose::AuditEntry.signed_bytes(&stored.payload),
            &stored.signature.0,
        ) {
            return Ok(Err(AuditViolation::Edited { seq }));
        }
        let Ok(entry) =
            renkei_protocol::codec::decode_limited::<AuditEntry>(&stored.payload, MAX_ENTRY_BYTES)
        else {
            return Ok(Err(AuditViolation::Undecodable { seq }));
        };
        if entry.seq != seq || entry.prev != prev {
            return Ok(Err(AuditViolation::BrokenChain { seq }));
        }
        prev = hash(&stored.payload);
        entries.push(entry);
        expected += 1;
    }
    if let Some((head, head_hash)) = read_head(store)? {
        let last = expected.checked_sub(1);
        if last != Some(head) || head_hash != prev {
            return Ok(Err(AuditViolation::Truncated { last, head }));
        }
    }
    Ok(Ok(entries))
}

/// Hex of a hash, for events.
pub fn hex_hash(bytes: &[u8; 32]) -> String {
    hex::encode(bytes)
}

/// The request id as text, for events.
pub fn request_text(id: &RequestId) -> String {
    id.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::NodeHome;

    /// bincode stores an enum variant as its position and the log is signed: an event kind
    /// must never move, or old logs stop verifying. New kinds go last.
    #[test]
    fn event_kinds_keep_their_positions() {
        let refused = AuditEvent::QueryRefused {
            researcher: None,
            study: None,
            request_id: None,
            query_hash: None,
            code: RefusalCode::Replayed,
        };
        let quoted = AuditEvent::QueryQuoted {
            researcher: SecretKey::from_seed(&[1; 32]).public_key(),
            study: String::new(),
            request_id: String::new(),
            query_hash: String::new(),
            rho: MicroRho(0),
        };
        for (event, position) in [(refused, 2u32), (quoted, 5)] {
            let bytes = renkei_protocol::codec::encode(&event).unwrap();
            let prefix = renkei_protocol::codec::encode(&position).unwrap();
            assert!(bytes.starts_with(&prefix), "{event:?}");
        }
    }

    fn refused(n: u64) -> AuditEvent {
        AuditEvent::QueryRefused {
            researcher: None,
            study: Some(format!("study-{n}")),
            request_id: None,
            query_hash: None,
            code: RefusalCode::Expired,
        }
    }

    fn log_with_five() -> (tempfile::TempDir, NodeStore, PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let store = home.open_store().unwrap();
        let key = home.identity().unwrap();
        let public = key.public_key();
        let log = AuditLog::open(store.clone(), key).unwrap();
        for n in 0..5 {
            log.append(1_000 + n, refused(n)).unwrap();
        }
        (dir, store, public)
    }

    #[test]
    fn an_untouched_log_verifies_and_survives_reopen() {
        let (_dir, store, public) = log_with_five();
        let entries = verify(&store, &public).unwrap().unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[3].event, refused(3));
        // Reopening continues the chain.
        let dir_key = SecretKey::generate().unwrap();
        let other = AuditLog::open(store.clone(), dir_key).unwrap();
        other.append(2_000, refused(9)).unwrap();
        // Appended with another key: that entry fails, the others stand.
        assert_eq!(
            verify(&store, &public).unwrap().unwrap_err(),
            AuditViolation::Edited { seq: 5 }
        );
    }

    #[test]
    fn edits_removals_reorderings_and_cuts_are_named() {
        let (_dir, store, public) = log_with_five();
        let entry = |n: u64| store.audit.get(n.to_be_bytes()).unwrap().unwrap();

        // Edit: change one byte inside entry 2's payload.
        let original = entry(2);
        let mut edited = original.to_vec();
        let at = edited.len() / 2;
        edited[at] ^= 1;
        store.audit.insert(2u64.to_be_bytes(), edited).unwrap();
        assert!(matches!(
            verify(&store, &public).unwrap().unwrap_err(),
            AuditViolation::Edited { seq: 2 } | AuditViolation::Undecodable { seq: 2 }
        ));
        store
            .audit
            .insert(2u64.to_be_bytes(), original.clone())
            .unwrap();

        // Reorder: swap entries 1 and 3.
        let (one, three) = (entry(1), entry(3));
        store
            .audit
            .insert(1u64.to_be_bytes(), three.clone())
            .unwrap();
        store.audit.insert(3u64.to_be_bytes(), one.clone()).unwrap();
        assert_eq!(
            verify(&store, &public).unwrap().unwrap_err(),
            AuditViolation::BrokenChain { seq: 1 }
        );
        store.audit.insert(1u64.to_be_bytes(), one).unwrap();
        store.audit.insert(3u64.to_be_bytes(), three).unwrap();
        verify(&store, &public).unwrap().unwrap();

        // Remove entry 2.
        store.audit.remove(2u64.to_be_bytes()).unwrap();
        assert_eq!(
            verify(&store, &public).unwrap().unwrap_err(),
            AuditViolation::Gap {
                expected: 2,
                found: 3
            }
        );
        store.audit.insert(2u64.to_be_bytes(), original).unwrap();

        // Cut the last entry.
        store.audit.remove(4u64.to_be_bytes()).unwrap();
        assert_eq!(
            verify(&store, &public).unwrap().unwrap_err(),
            AuditViolation::Truncated {
                last: Some(3),
                head: 4
            }
        );
    }

    /// A crash between an entry and its head leaves the entry one past the head; reopening
    /// with the node's key takes it in. One not signed by the node is not taken in.
    #[test]
    fn an_append_cut_short_by_a_crash_is_taken_in_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let store = home.open_store().unwrap();
        let key = home.identity().unwrap();
        let public = key.public_key();
        let log = AuditLog::open(store.clone(), SecretKey::from_seed(&key.to_seed())).unwrap();
        for n in 0..5 {
            log.append(1_000 + n, refused(n)).unwrap();
            if n == 3 {
                // The head as it was before entry 4.
                let head = store.meta.get(META_AUDIT_HEAD).unwrap().unwrap();
                store.meta.insert("saved-head", head).unwrap();
            }
        }
        drop(log);
        let saved = store.meta.get("saved-head").unwrap().unwrap();
        store.meta.insert(META_AUDIT_HEAD, saved).unwrap();
        assert_eq!(
            verify(&store, &public).unwrap().unwrap_err(),
            AuditViolation::Truncated {
                last: Some(4),
                head: 3
            }
        );

        // Another key's entry past the head stays a violation.
        let stranger = AuditLog::open(store.clone(), SecretKey::generate().unwrap()).unwrap();
        drop(stranger);
        assert!(verify(&store, &public).unwrap().is_err());

        let log = AuditLog::open(store.clone(), key).unwrap();
        assert_eq!(verify(&store, &public).unwrap().unwrap().len(), 5);
        log.append(2_000, refused(5)).unwrap();
        let entries = verify(&store, &public).unwrap().unwrap();
        assert_eq!(entries.len(), 6);
        assert_eq!(entries[5].event, refused(5));
    }
}
