//! The statistics renkei computes: one file each, one trait, one registry.
//!
//! Like an analytical engine's aggregate functions (DataFusion's `Accumulator`), each
//! statistic splits its work into a partial side and a final side:
//!
//! - **partial, at each node**: [`Statistic::bind`] fixes, from the schema and the query,
//!   which columns it reads and what it releases ([`Part`]s, each a vector of integers with
//!   its sensitivity, given its own mechanism by the node's DP layer); the bound
//!   [`Accumulator`] computes the exact local result ([`Accumulator::evaluate`]) and, once
//!   the node has noised each part, puts it in its wire form ([`Accumulator::release`],
//!   [`Accumulator::masked_shape`] for a secure round's masked words);
//! - **final, at the aggregator**: [`Statistic::combine`] merges the nodes' releases (or one
//!   secure total read as a single release) into the estimate with its 95% interval;
//! - **truth**: [`Statistic::pooled`] is its answer over pooled records, row by row, which
//!   tests compare the engine and the network against.
//!
//! [`for_query`] is the registry: an exhaustive match over the wire's
//! [`Aggregate`](renkei_protocol::Aggregate), so a new aggregate does not compile until it
//! has a statistic.

mod count;
#[cfg(test)]
pub(crate) mod fixture;
mod grouped_count;
mod grouped_sum;
mod mean;
mod quantile;
mod regression;
mod shared;
mod sum;
mod survival;
mod traits;

use renkei_protocol::{Aggregate, Query};

use crate::estimate::Combined;
use crate::truth::{PooledCohort, TrueValue};

pub use quantile::QUANTILE_BINS;
pub use regression::{Coefficient, FIXED_POINT, Model, Regression};
pub use shared::split_budget;
pub use survival::{LogRank, MAX_SURVIVAL_NUMBERS, Survival, SurvivalCurve, TreeShape};
pub use traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};

/// The registry: the statistic that answers `query`.
pub fn for_query(query: &Query) -> &'static dyn Statistic {
    let grouped = !query.group_by.is_empty();
    match &query.aggregate {
        Aggregate::CountPatients | Aggregate::CountRows if grouped => &grouped_count::GroupedCount,
        Aggregate::CountPatients | Aggregate::CountRows => &count::Count,
        Aggregate::Sum { .. } if grouped => &grouped_sum::GroupedSum { mean: false },
        Aggregate::Sum { .. } => &sum::Sum,
        Aggregate::Mean { .. } if grouped => &grouped_sum::GroupedSum { mean: true },
        Aggregate::Mean { .. } => &mean::Mean,
        Aggregate::Quantile { .. } => &quantile::Quantile,
        Aggregate::KaplanMeier { .. } => &survival::KaplanMeier,
        Aggregate::LinearRegression { .. } => &regression::LinearRegression,
        Aggregate::LogisticRegression { .. } => &regression::LogisticRegression,
    }
}

/// Combines the nodes' releases for `query`; `None` when no node answered.
pub fn combine(query: &Query, sites: &[SiteRelease<'_>]) -> Option<Combined> {
    if sites.is_empty() {
        return None;
    }
    Some(for_query(query).combine(query, sites))
}

/// The exact answer of `query` over pooled rows.
pub fn pooled(query: &Query, cohort: &PooledCohort) -> TrueValue {
    for_query(query).pooled(query, cohort)
}
