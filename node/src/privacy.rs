//! Privacy: what a release costs and who has paid for it.
//!
//! - [`dp`]: calibrating and drawing noise through opendp (one mechanism per released part).
//! - [`ledger`]: the crash-safe per-researcher privacy budget, replay guard and recorded
//!   answers, charged in one transaction with the answer it pays for.
//! - [`secure`]: a node's masked contribution to a secure total (pairwise and own masks,
//!   distributed noise shares).

pub mod dp;
pub mod ledger;
pub mod secure;
