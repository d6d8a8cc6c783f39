//! Marks left by store layouts of earlier renkei versions that still matter.
//!
//! Before sharded tables, a large file was loaded in batches, and the node named in `meta`
//! the files whose ingest had started and not finished. A store moved into shards keeps
//! that mark: it holds part of those files, so the node does not serve until each is loaded
//! again (now in one atomic write) or given up. (The record trees themselves are moved into
//! shards by [`super::tables::migrate_record_trees`].)

use std::path::Path;

use super::db::NodeStore;
use crate::error::NodeError;

/// The `meta` key under which renkei before sharded tables (which wrote a large file in
/// batches) named the files whose ingest had started and not finished. Such a store keeps
/// the mark when it is moved into shards: it holds part of those files, so it does not
/// serve ([`crate::image::load`] refuses) until each is loaded again (now in one
/// atomic write) or given up with [`abandon_unfinished`].
const LEGACY_UNFINISHED: &[u8] = b"ingest/unfinished";

/// The files whose ingest started but did not finish (empty when none).
pub fn unfinished_ingests(store: &NodeStore) -> Result<Vec<String>, NodeError> {
    Ok(match store.meta.get(LEGACY_UNFINISHED)? {
        None => Vec::new(),
        Some(bytes) => serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| vec![String::from_utf8_lossy(&bytes).into_owned()]),
    })
}

pub(crate) fn set_unfinished(store: &NodeStore, files: &[String]) -> Result<(), NodeError> {
    if files.is_empty() {
        store.meta.remove(LEGACY_UNFINISHED)?;
    } else {
        let encoded = serde_json::to_vec(files).map_err(|e| NodeError::CorruptStore {
            what: "unfinished ingest mark".into(),
            reason: e.to_string(),
        })?;
        store.meta.insert(LEGACY_UNFINISHED, encoded)?;
    }
    store.flush()
}

/// Records that `path` has now loaded completely: it is no longer an unfinished ingest.
pub fn completed(store: &NodeStore, path: &Path) -> Result<(), NodeError> {
    let mut files = unfinished_ingests(store)?;
    if files.is_empty() {
        return Ok(());
    }
    let name = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let before = files.len();
    files.retain(|file| *file != name);
    if files.len() == before {
        return Ok(());
    }
    set_unfinished(store, &files)
}

/// Forgets every unfinished ingest, accepting whatever part of those files is stored; for
/// when a file cannot be loaded again (gone, or replaced). Returns the files forgotten.
pub fn abandon_unfinished(store: &NodeStore) -> Result<Vec<String>, NodeError> {
    let files = unfinished_ingests(store)?;
    set_unfinished(store, &[])?;
    Ok(files)
}
