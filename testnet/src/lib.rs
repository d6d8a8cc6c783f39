//! renkei's testnet: synthetic hospital data and a local multi-node network of real nodes,
//! for the demo, the integration tests and by-hand experiments.
//!
//! - [`synth`]: deterministic synthetic patients and their true answers.
//! - [`consortium`]: a development consortium (admin, researcher, signed policy).
//! - [`network`]: N real nodes on 127.0.0.1, started, stopped and restarted in-process.
//! - [`demo`]: the `renkei-testnet demo` walk-through.
//! - [`reference`]: DuckDB and lifelines on the pooled exports, the outside reference.
//! - [`bench`]: the figures of BENCHMARKS.md (ingest and query throughput against sqlite3
//!   and DuckDB).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bench;
pub mod consortium;
pub mod demo;
pub mod network;
pub mod reference;
pub mod synth;

pub use consortium::DevConsortium;
pub use network::{Testnet, TestnetConfig};
