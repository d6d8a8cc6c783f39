//! The aggregator and researcher client: turns a researcher's SQL into a signed query, fans
//! it out to hospital nodes over libp2p and combines their differentially private answers.
//! It never sees a patient record; only noisy aggregates arrive here.
//!
//! - [`sql`]: SQL → canonical query AST.
//! - [`client`]: the libp2p task and its handle.
//! - [`federation`]: signing, fan-out, answer verification.
//! - [`combine`]: the network-wide estimate and its interval from the nodes' releases.
//! - [`researcher`]: the researcher's session: key, policy, defaults.
//! - [`passphrase`]: where a person's passphrase comes from.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod client;
pub mod combine;
pub mod error;
pub mod federation;
pub mod passphrase;
pub mod researcher;
pub mod sql;

pub use client::{AskError, NetworkClient};
pub use error::AggregatorError;
pub use federation::{
    AnswerMode, FederatedAnswer, NodeAddress, NodeQuote, PreparedQuery, Progress, QueryOptions,
    fan_out, fan_out_with_progress,
};
pub use researcher::ResearcherSession;
