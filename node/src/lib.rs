//! A hospital's renkei node: keeps the hospital's patients on site and answers signed,
//! policy-checked queries with differentially private aggregates only.
//!
//! The query engine (schema, in-memory image, cohorts, statistics) is the pure
//! `renkei-engine` crate; this crate owns the I/O around it, by role:
//!
//! - [`home`]: the node's directory (identity key, store) and `init`.
//! - [`store`]: the one owner of the sled database and its trees; the stored patient and
//!   timepoint tables in shards, item records, and layouts of earlier versions.
//! - [`ingest`]: loading CSV tables, consent and DICOM/FASTQ items (and Synthea and FHIR
//!   exports), atomically, under pseudonyms.
//! - [`image`]: loads the stored tables into the engine's in-memory image.
//! - [`privacy`]: noise through opendp, the crash-safe privacy ledger, secure shares.
//! - [`governance`]: the active consortium policy: verified, stored, swapped.
//! - [`audit`]: the signed, hash-chained audit log.
//! - [`desk`]: everything between a request's bytes and the reply: verify, plan, release,
//!   quote, unmask; policy offers.
//! - [`net`]: the libp2p swarm, the control socket and the status file.
//! - [`service`]: the composition root that wires them into a serving node.
//!
//! Layers point one way: the store knows nothing of queries or ingest, the error type
//! nothing of ingest, and the desk nothing of the network.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod audit;
pub mod desk;
pub mod error;
pub mod governance;
pub mod home;
pub mod image;
pub mod ingest;
pub mod net;
pub mod privacy;
pub mod service;
pub mod store;

pub use error::NodeError;
pub use home::NodeHome;
pub use service::{NodeService, RunningNode};
