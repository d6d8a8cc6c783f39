//! Pseudonyms: a hospital's patient id is stored only as a keyed hash (HMAC-SHA256) under
//! the node's own secret, kept in the store's `meta` tree. The store never holds a raw
//! identifier, and the same id always maps to the same pseudonym at this node only.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::NodeError;
use crate::home::META_PSEUDONYM_SECRET;
use crate::store::NodeStore;
use crate::store::tables;

/// The secret under which patient ids are pseudonymised (keyed hash).
pub(crate) fn pseudonym_secret(store: &NodeStore) -> Result<[u8; 32], NodeError> {
    let value = store
        .meta
        .get(META_PSEUDONYM_SECRET)?
        .ok_or_else(|| NodeError::CorruptStore {
            what: "pseudonymisation secret".into(),
            reason: "missing".into(),
        })?;
    value
        .as_ref()
        .try_into()
        .map_err(|_| NodeError::CorruptStore {
            what: "pseudonymisation secret".into(),
            reason: format!("{} bytes, expected 32", value.len()),
        })
}

/// The stored key of a hospital patient id: HMAC-SHA256 under the node's secret.
pub fn pseudonym(secret: &[u8; 32], patient_id: &str) -> Result<[u8; 32], NodeError> {
    let mut mac = keyed_hmac(secret)?;
    mac.update(patient_id.as_bytes());
    Ok(mac.finalize().into_bytes().into())
}

pub(crate) fn keyed_hmac(secret: &[u8; 32]) -> Result<Hmac<Sha256>, NodeError> {
    <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| NodeError::CorruptStore {
        what: "pseudonymisation secret".into(),
        reason: e.to_string(),
    })
}

/// Hashes hospital patient ids, each once: a patient's rows usually come together.
pub(crate) struct Pseudonyms {
    /// HMAC keyed with the node's secret, cloned per id (keying costs as much as hashing).
    keyed: Hmac<Sha256>,
    known: HashMap<String, usize>,
    /// (pseudonym, first line) per distinct id, in order of first appearance.
    pub(crate) list: Vec<([u8; 32], u64)>,
    last: Option<(String, usize)>,
}

impl Pseudonyms {
    pub(crate) fn new(secret: &[u8; 32]) -> Result<Self, NodeError> {
        Ok(Self {
            keyed: keyed_hmac(secret)?,
            known: HashMap::new(),
            list: Vec::new(),
            last: None,
        })
    }

    /// The pseudonym of `id` and its index among the file's patients.
    pub(crate) fn of(&mut self, id: &str, line: u64) -> ([u8; 32], usize) {
        if let Some((last, index)) = &self.last
            && last == id
        {
            return (self.list[*index].0, *index);
        }
        // Keep the buffer of the last id.
        let mut last = self.last.take().map(|(text, _)| text).unwrap_or_default();
        last.clear();
        last.push_str(id);
        let index = match self.known.get(id) {
            Some(index) => *index,
            None => {
                let mut mac = self.keyed.clone();
                mac.update(id.as_bytes());
                self.list.push((mac.finalize().into_bytes().into(), line));
                self.known.insert(id.to_string(), self.list.len() - 1);
                self.list.len() - 1
            }
        };
        self.last = Some((last, index));
        (self.list[index].0, index)
    }

    /// The first line of each distinct patient of the file who is not on the node.
    pub(crate) fn missing_from(&self, store: &NodeStore) -> Result<Vec<u64>, NodeError> {
        let pseudonyms: Vec<[u8; 32]> = self.list.iter().map(|(p, _)| *p).collect();
        let present = tables::patients_present(store, &pseudonyms)?;
        Ok(self
            .list
            .iter()
            .zip(&present)
            .filter(|(_, present)| !**present)
            .map(|((_, line), _)| *line)
            .collect())
    }
}
