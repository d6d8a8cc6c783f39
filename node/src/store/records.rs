//! What a node stores about its patients' information items, and the record layout of
//! renkei's first store format.
//!
//! An [`ItemRecord`] per information item (a file kept at the hospital: its summary, never its
//! content) is stored under `pseudonym || timepoint (u16, big-endian) || SHA-256(kind || file
//! digest)[..16]` (see [`item_key`]), so one patient's items sit together and no raw
//! identifier is stored. Values are positional, following the node's dataset schema (kept in
//! the store at `init`); `None` is a missing value.
//!
//! Patients and timepoints are stored in shards ([`crate::store::tables`]). [`PatientRecord`] and
//! [`TimepointRecord`] are the one-record-per-row layout stores were first written in; they
//! are read only to move such a store into shards when it is opened.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::NodeError;

/// Largest stored record.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// One patient.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRecord {
    /// Parallel to the schema's patient columns.
    pub values: Vec<Option<i64>>,
    /// Consent scopes given (e.g. `secondary_use`, `genome`); without `secondary_use` the
    /// patient is never counted.
    pub consents: BTreeSet<String>,
}

/// One patient at one timepoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimepointRecord {
    /// Parallel to the schema's timepoint columns.
    pub values: Vec<Option<i64>>,
}

/// One information item: a file's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRecord {
    pub kind: String,
    /// Parallel to the item format's summary columns.
    pub values: Vec<Option<i64>>,
    /// SHA-256 of the file's bytes: the same file loaded twice is one item.
    pub file_digest: [u8; 32],
    /// Descriptive header fields kept on site (e.g. DICOM SOP class, study date); never
    /// identifying ones.
    pub details: Vec<(String, String)>,
}

pub fn patient_key(pseudonym: &[u8; 32]) -> [u8; 32] {
    *pseudonym
}

pub fn timepoint_key(pseudonym: &[u8; 32], timepoint: u16) -> [u8; 34] {
    let mut key = [0u8; 34];
    key[..32].copy_from_slice(pseudonym);
    key[32..].copy_from_slice(&timepoint.to_be_bytes());
    key
}

pub fn item_key(
    pseudonym: &[u8; 32],
    timepoint: u16,
    kind: &str,
    file_digest: &[u8; 32],
) -> [u8; 50] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    hasher.update(file_digest);
    let tag: [u8; 32] = hasher.finalize().into();
    let mut key = [0u8; 50];
    key[..34].copy_from_slice(&timepoint_key(pseudonym, timepoint));
    key[34..].copy_from_slice(&tag[..16]);
    key
}

/// Decodes a stored record, naming the record on failure.
pub fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    key: &[u8],
) -> Result<T, NodeError> {
    renkei_protocol::codec::decode_limited(bytes, MAX_RECORD_BYTES).map_err(|e| {
        NodeError::CorruptStore {
            what: format!("{what} {}", hex::encode(key)),
            reason: e.to_string(),
        }
    })
}

pub fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, NodeError> {
    Ok(renkei_protocol::codec::encode_limited(
        record,
        MAX_RECORD_BYTES,
    )?)
}
