//! renkei's query engine: pure, synchronous and free of storage, networking and noise.
//!
//! A hospital node binds each signed query to its own data and computes the exact result
//! here; the node's DP layer adds the noise, and the aggregator uses the same statistics to
//! combine the nodes' noisy releases. Nothing in this crate touches a disk, a socket or a
//! random number that matters for privacy.
//!
//! - [`schema`]: dataset schemas (views, columns, types, bounds, units); `covid19` ships.
//! - [`image`]: the in-memory, columnar image of a node's patients, timepoints and items,
//!   and the [`ImageBuilder`] the node's loader fills; [`column`] holds its columns (each in
//!   the narrowest integer width, [`NULL`] marks a missing value) and [`bitset`] its row sets.
//! - [`bind`]: a query's parts bound to the schema: view, columns, literals, consent scopes,
//!   and what a statistic may ask while it binds ([`bind::Binder`]).
//! - [`cohort`]: the rows a bound filter selects, and what statistics read from them.
//! - `per_patient`: tables derived per patient in a query's `WITH` clause (first and last
//!   days, maxima, flags over a patient's timepoints), on which the outer query runs as on
//!   `patients`.
//! - [`compile`]: a query compiled for this node ([`Dataset::compile`]) and evaluated
//!   ([`Dataset::evaluate`]); the one place that joins binding, cohorts and statistics.
//! - [`statistic`]: one file per statistic, each implementing [`Statistic`] (bind, combine,
//!   pooled truth) and [`Accumulator`] (its released parts, exact evaluation, wire form);
//!   [`statistic::for_query`] is the registry.
//! - [`estimate`]: the combined estimate and its interval; [`release`]: wire shapes shared
//!   by all statistics; [`truth`]: pooled rows and the exact answer tests compare against.
//!
//! # Adding a statistic
//!
//! 1. **Its own file** under `src/statistic/`: a type implementing [`Statistic`] (how it
//!    binds to the schema, how the nodes' releases combine into an estimate with its
//!    interval, its answer over pooled rows) and the [`Accumulator`] it binds to (its
//!    [`Part`]s with their sensitivities, its exact evaluation over a [`Cohort`], its wire
//!    release and masked shape). Unit tests beside it.
//! 2. **One registry line** in [`statistic::for_query`].
//! 3. **One SQL arm** in the aggregator's `sql.rs`, producing the query AST.
//! 4. **One wire variant**, if its release has a new shape: a `Release` (and `MaskedShape`)
//!    variant in `renkei-protocol`, appended last. The compiler then points at every place
//!    that must handle it (no catch-all arms): [`release`] (a secure total read back, shape
//!    checks) and the aggregator's per-node report (`results::node_answer`).
//!
//! `GROUP BY … SUM(col) | AVG(col)` was added this way: `statistic/grouped_sum.rs`, two
//! registry lines (sum and mean per cell), the SQL arm that lets GROUP BY take them, and
//! `Release::Cells` / `MaskedShape::Cells`.
//!
//! A statistic asked over several requests (`statistic/regression.rs`: a logistic fit's
//! Newton steps) names its step in the query itself (`FitStep`, the coefficients to
//! evaluate at), so each step binds and evaluates like any query; its combination names the
//! next step's coefficients. Only the node's charge differs: its ledger charges the first
//! step for all and binds the later ones to it.
//!
//! Noise calibration needs nothing new: the node gives each part its own mechanism (the
//! budget split evenly, [`statistic::split_budget`]), per site or as a secure share.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod bind;
pub mod bitset;
pub mod cohort;
pub mod column;
pub mod compile;
pub mod estimate;
pub mod image;
mod per_patient;
pub mod release;
pub mod schema;
pub mod statistic;
pub mod truth;

pub use bind::{MAX_GROUP_CELLS, SchemaError};
pub use cohort::Cohort;
pub use column::NULL;
pub use compile::CompiledQuery;
pub use estimate::{Combined, Estimate, GroupEstimate, Z_95};
pub use image::{Dataset, ImageBuilder, TooManyRows};
pub use schema::DatasetSchema;
pub use statistic::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
pub use statistic::{Coefficient, LogRank, Model, Regression, Survival, SurvivalCurve};
pub use truth::{PooledCohort, PooledRow, TrueValue};
