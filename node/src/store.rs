//! The node's store: its sled database ([`db`]) and what is kept in it.
//!
//! One [`NodeStore`] per process opens the database and hands out its trees: `data` (the
//! three layers of the data model: patient and timepoint tables in shards, information items;
//! see [`tables`]; information items in [`records`]), `ledger` (researcher and study → rho spent), `nonces` (seen
//! request nonces, for replay refusal), `requests` (each request's charge and signed answer,
//! for idempotent resends), `rounds` (the survivors each recoverable secure round was
//! unmasked for), `fits` (each logistic fit accepted and the request that answered each
//! of its steps), `audit` (the signed, hash-chained audit log) and `meta` (the
//! pseudonymisation secret, the active policy and its pinned anchor, the audit head). Callers
//! go through the modules that own each tree ([`crate::ingest`] and [`crate::image`] for the
//! tables, [`crate::privacy::ledger`], [`crate::audit`], [`crate::governance`]), never to
//! sled directly. Layouts written by earlier versions are read or migrated by [`legacy`]
//! and [`tables`].

mod db;
pub(crate) mod legacy;
pub mod records;
pub mod tables;

pub(crate) use db::META_SCHEMA;
pub use db::{FlushPromise, GATHER_WAIT, NodeStore};

/// Opens the store at `path` and moves any layout of an earlier renkei into the current one.
pub fn open(path: &std::path::Path) -> Result<NodeStore, crate::error::NodeError> {
    let store = NodeStore::open(path)?;
    tables::migrate_record_trees(&store)?;
    Ok(store)
}
