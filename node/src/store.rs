//! The node's sled database, its one owner.
//!
//! One [`NodeStore`] per process opens the database and hands out its trees: `patients`,
//! `timepoints` and `items` (the three layers of the data model, see [`crate::records`]),
//! `ledger` (researcher and study → rho spent), `nonces` (seen
//! request nonces, for replay refusal), `requests` (each request's charge and signed answer,
//! for idempotent resends), `audit` (the signed, hash-chained audit log) and `meta` (the
//! pseudonymisation secret, the active policy and its pinned anchor, the audit head). Callers go through the modules that own each tree
//! ([`crate::cohort`], [`crate::ledger`]), never to sled directly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::NodeError;

/// Meta key of the dataset schema's TOML text.
pub(crate) const META_SCHEMA: &[u8] = b"dataset-schema";

/// How long opening waits for a lock held by a store that is still closing.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// The opened database.
#[derive(Debug, Clone)]
pub struct NodeStore {
    db: sled::Db,
    path: PathBuf,
    pub(crate) patients: sled::Tree,
    pub(crate) timepoints: sled::Tree,
    pub(crate) items: sled::Tree,
    pub(crate) ledger: sled::Tree,
    pub(crate) nonces: sled::Tree,
    pub(crate) requests: sled::Tree,
    pub(crate) audit: sled::Tree,
    pub(crate) meta: sled::Tree,
}

impl NodeStore {
    pub fn open(path: &Path) -> Result<Self, NodeError> {
        // sled finishes background writes on its own threads after a `Db` is dropped, and the
        // file lock goes with the last of them; a reopen right after a close (a node restarted
        // in the same process) waits for that instead of failing.
        let deadline = Instant::now() + LOCK_WAIT;
        let db = loop {
            match sled::Config::new()
                .path(path)
                // Durability comes from explicit flushes at the points that matter (ledger
                // charges, recorded answers, ingests); this only bounds what a crash loses
                // elsewhere.
                .flush_every_ms(Some(500))
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if Instant::now() >= deadline {
                        return Err(NodeError::StoreLocked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(other) => return Err(NodeError::Store(other)),
            }
        };
        Ok(Self {
            patients: db.open_tree("patients")?,
            timepoints: db.open_tree("timepoints")?,
            items: db.open_tree("items")?,
            ledger: db.open_tree("ledger")?,
            nonces: db.open_tree("nonces")?,
            requests: db.open_tree("requests")?,
            audit: db.open_tree("audit")?,
            meta: db.open_tree("meta")?,
            path: path.to_path_buf(),
            db,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dataset schema this node was created with (kept in the store).
    pub fn schema(&self) -> Result<crate::schema::DatasetSchema, NodeError> {
        let bytes = self
            .meta
            .get(META_SCHEMA)?
            .ok_or_else(|| NodeError::CorruptStore {
                what: "dataset schema".into(),
                reason: "missing".into(),
            })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| NodeError::CorruptStore {
            what: "dataset schema".into(),
            reason: e.to_string(),
        })?;
        crate::schema::DatasetSchema::from_toml(text).map_err(|e| NodeError::CorruptStore {
            what: "dataset schema".into(),
            reason: e.to_string(),
        })
    }

    /// How many patient, timepoint and item records are stored.
    pub fn record_counts(&self) -> (usize, usize, usize) {
        (self.patients.len(), self.timepoints.len(), self.items.len())
    }

    /// Writes every dirty buffer to disk and fsyncs.
    pub fn flush(&self) -> Result<(), NodeError> {
        self.db.flush()?;
        Ok(())
    }
}
