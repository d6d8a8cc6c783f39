//! The aggregator and researcher client: turns a researcher's SQL into a signed query, fans
//! it out to hospital nodes over libp2p and combines their differentially private answers.
//! It never sees a patient record; only noisy aggregates arrive here.
//!
//! - [`sql`]: SQL → canonical query AST.
//! - [`client`]: the libp2p task and its handle.
//! - [`request`]: what to ask and the signed request.
//! - [`federation`]: fan-out and answer verification; [`unmask`]: finishing a secure round
//!   that survives dropouts.
//! - [`combine`]: the network-wide estimate and its interval from the nodes' releases (each
//!   statistic's own combination lives in `renkei-engine`); a secure round's total.
//! - [`results`]: what a federated query yields; [`report`]: it as a table or CSV.
//! - [`researcher`]: the researcher's session: key, policy, defaults.
//! - [`passphrase`]: where a person's passphrase comes from.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod client;
pub mod combine;
pub mod error;
pub mod federation;
pub mod passphrase;
pub mod report;
pub mod request;
pub mod researcher;
pub mod results;
pub mod sql;
mod unmask;

pub use client::{AskError, NetworkClient};
pub use error::AggregatorError;
pub use federation::{
    AnswerMode, FederatedAnswer, NodeAddress, NodeQuote, PreparedQuery, Progress, QueryOptions,
    fan_out, fan_out_with_progress,
};
pub use researcher::ResearcherSession;
