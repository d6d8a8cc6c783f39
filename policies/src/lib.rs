//! Consortium policy: what the admins decided, signed, and how a node evaluates a request
//! against it.
//!
//! A [`PolicyBundle`] is written by people as TOML ([`bundle`]), encoded canonically and
//! signed by consortium admins into a [`SignedPolicy`] ([`signed`]); nodes and aggregators
//! load only a signed policy whose signatures verify ([`VerifiedPolicy`]) and ask it whether a
//! researcher may spend privacy on a study ([`evaluate`]). [`error`] says why a bundle was
//! not accepted. Pure, synchronous logic: no
//! sockets, no storage.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod bundle;
pub mod error;
pub mod evaluate;
pub mod signed;

pub use bundle::{
    AGGREGATIONS, Member, PolicyBundle, QueryLimits, Researcher, SensitiveRule, Study, Timestamp,
};
pub use error::PolicyError;
pub use evaluate::{Grant, nearest_name};
pub use signed::{AdminSignature, SignedPolicy, TrustAnchor, VerifiedPolicy};
