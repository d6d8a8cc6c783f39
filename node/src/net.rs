//! The node's doors: the libp2p swarm that carries queries and policy bundles to the desk
//! ([`swarm`]), the local control socket that hands data loads to a serving node
//! ([`control`]), and the status file it keeps for operators ([`status`]).

pub mod control;
pub(crate) mod status;
pub(crate) mod swarm;

pub use swarm::{MAX_IN_FLIGHT, default_listen};
