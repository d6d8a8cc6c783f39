//! The node's sled database, its one owner.
//!
//! One [`NodeStore`] per process opens the database and hands out its trees: `data` (the
//! three layers of the data model: patient and timepoint tables in shards, information items;
//! see [`crate::tables`]), `ledger` (researcher and study → rho spent), `nonces` (seen
//! request nonces, for replay refusal), `requests` (each request's charge and signed answer,
//! for idempotent resends), `audit` (the signed, hash-chained audit log) and `meta` (the
//! pseudonymisation secret, the active policy and its pinned anchor, the audit head). Callers
//! go through the modules that own each tree ([`crate::ingest`] and [`crate::dataset`] for the
//! tables, [`crate::ledger`], [`crate::audit`], [`crate::governance`]), never to sled
//! directly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
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
    pub(crate) data: sled::Tree,
    pub(crate) ledger: sled::Tree,
    pub(crate) nonces: sled::Tree,
    pub(crate) requests: sled::Tree,
    pub(crate) audit: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Shared by every clone: concurrent flushes are coalesced into one fsync.
    commits: Arc<GroupCommit>,
}

/// Group commit: a caller whose writes are done asks for durability; if an fsync is already
/// running it waits for the next one, which covers its writes and those of everyone else
/// waiting, so N concurrent callers cost about two fsyncs, not N.
#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct CommitState {
    /// Tickets handed out; a ticket is taken after the caller's writes.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    flushing: bool,
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
        let store = Self {
            data: db.open_tree("data")?,
            ledger: db.open_tree("ledger")?,
            nonces: db.open_tree("nonces")?,
            requests: db.open_tree("requests")?,
            audit: db.open_tree("audit")?,
            meta: db.open_tree("meta")?,
            path: path.to_path_buf(),
            commits: Arc::default(),
            db,
        };
        crate::tables::migrate_record_trees(&store)?;
        Ok(store)
    }

    /// The database itself, for the one-time move of an older layout.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
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

    /// How many patient, timepoint and item rows are stored.
    pub fn record_counts(&self) -> Result<(usize, usize, usize), NodeError> {
        use crate::tables::{Table, count_rows};
        let schema = self.schema()?;
        Ok((
            count_rows(self, Table::Patients, schema.patients.len())?,
            count_rows(self, Table::Timepoints, schema.timepoints.len())?,
            self.data.scan_prefix([crate::tables::ITEM_PREFIX]).count(),
        ))
    }

    /// Returns once every write made before the call is on disk (fsynced), sharing the
    /// fsync with concurrent callers.
    pub fn flush(&self) -> Result<(), NodeError> {
        let poisoned = || NodeError::CorruptStore {
            what: "commit coordinator".into(),
            reason: "a flushing thread panicked".into(),
        };
        let commits = &*self.commits;
        let mut state = commits.state.lock().map_err(|_| poisoned())?;
        state.issued += 1;
        let ticket = state.issued;
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.flushing {
                state = commits.done.wait(state).map_err(|_| poisoned())?;
                continue;
            }
            // This flush covers every ticket issued so far.
            let target = state.issued;
            state.flushing = true;
            drop(state);
            let flushed = self.db.flush();
            state = commits.state.lock().map_err(|_| poisoned())?;
            state.flushing = false;
            if flushed.is_ok() {
                state.durable = state.durable.max(target);
            }
            commits.done.notify_all();
            flushed?;
        }
    }
}
