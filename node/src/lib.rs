//! A hospital's renkei node: keeps the hospital's patients on site and answers signed,
//! policy-checked queries with differentially private aggregates only.
//!
//! - [`home`]: the node's directory (identity key, store) and `init`.
//! - [`store`]: the one owner of the sled database and its trees.
//! - [`tables`]: the stored patient and timepoint tables, in shards; [`records`]: the
//!   stored information items.
//! - [`ingest`]: loading CSV tables, consent and DICOM/FASTQ items, atomically.
//! - [`import`]: Synthea CSV output and FHIR R4 bundles, mapped onto the schema.
//! - [`formats`]: DICOM and FASTQ readers.
//! - [`image`]: loads the stored tables into the engine's in-memory image
//!   (`renkei-engine`, which owns the schema, the image, cohorts and the statistics).
//! - [`dp`]: noise calibration and release through opendp.
//! - [`ledger`]: the crash-safe per-researcher privacy budget and replay guard.
//! - [`governance`]: the active consortium policy: verified, stored, swapped.
//! - [`audit`]: the signed, hash-chained audit log.
//! - [`desk`]: the desk: verify, authorize, validate, charge, answer; decide policy offers.
//! - [`service`]: the libp2p service that carries requests to the desk.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod audit;
pub mod control;
pub mod desk;
pub mod dp;
pub mod error;
pub mod formats;
pub mod governance;
pub mod home;
pub mod image;
pub mod import;
pub mod ingest;
pub mod ledger;
pub mod records;
pub mod secure;
pub mod service;
pub mod store;
pub mod tables;

pub use error::NodeError;
pub use home::NodeHome;
pub use service::{NodeService, RunningNode};
