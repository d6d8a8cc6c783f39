//! The node's sled database, its one owner.
//!
//! One [`NodeStore`] per process opens the database and hands out its trees: `patients`
//! (pseudonymous id → record), `ledger` (researcher and study → rho spent), `nonces` (seen
//! request nonces, for replay refusal) and `meta` (the pseudonymisation secret, the pinned
//! policy anchor and version). Callers go through the modules that own each tree
//! ([`crate::cohort`], [`crate::ledger`]), never to sled directly.

use std::path::{Path, PathBuf};

use crate::error::NodeError;

/// The opened database.
#[derive(Debug, Clone)]
pub struct NodeStore {
    db: sled::Db,
    path: PathBuf,
    pub(crate) patients: sled::Tree,
    pub(crate) ledger: sled::Tree,
    pub(crate) nonces: sled::Tree,
    pub(crate) meta: sled::Tree,
}

impl NodeStore {
    pub fn open(path: &Path) -> Result<Self, NodeError> {
        let db = sled::Config::new()
            .path(path)
            // Durability comes from explicit flushes at the points that matter (ledger
            // charges, ingests); this only bounds what a crash loses elsewhere.
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    NodeError::StoreLocked {
                        path: path.to_path_buf(),
                    }
                }
                other => NodeError::Store(other),
            })?;
        Ok(Self {
            patients: db.open_tree("patients")?,
            ledger: db.open_tree("ledger")?,
            nonces: db.open_tree("nonces")?,
            meta: db.open_tree("meta")?,
            path: path.to_path_buf(),
            db,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every dirty buffer to disk and fsyncs.
    pub fn flush(&self) -> Result<(), NodeError> {
        self.db.flush()?;
        Ok(())
    }
}
