//! What a statistic is: the [`Statistic`] trait (bind to a schema, combine the nodes'
//! releases, read pooled rows) and the [`Accumulator`] a bound statistic is (its released
//! [`Part`]s, its exact evaluation over a cohort, its wire form), with the values that pass
//! between them.

use std::fmt;

use renkei_protocol::{MaskedShape, Query, Release};

use crate::bind::{Binder, SchemaError};
use crate::cohort::Cohort;
use crate::estimate::Combined;
use crate::truth::{PooledCohort, TrueValue};

/// One released quantity: `len` numbers that share one mechanism.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Part {
    /// How much one patient can change these numbers together (L2; L1 equals it for one
    /// number), in stored units.
    pub sensitivity: f64,
    /// How many numbers.
    pub len: usize,
    /// Whether they are counts, to which a minimum cell size applies.
    pub counts: bool,
}

/// The exact partial result of a statistic at one node: one vector per [`Part`], in order.
/// Never leaves the node without noise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exact(pub Vec<Vec<i64>>);

/// One part after noise: its values, and which were withheld below the minimum cell size
/// (those read 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoisyPart {
    pub values: Vec<i64>,
    pub suppressed: Vec<bool>,
}

impl NoisyPart {
    /// Values released as they are (nothing withheld).
    pub fn plain(values: Vec<i64>) -> Self {
        Self {
            suppressed: vec![false; values.len()],
            values,
        }
    }
}

/// One node's release as the final side reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteRelease<'a> {
    pub release: &'a Release,
    /// Digits after the point of released sums and bins.
    pub value_scale: u8,
    /// The minimum cell size applied to counts (0: none).
    pub min_cell_size: u64,
    /// Noise standard deviation of the first part's numbers.
    pub noise_std: f64,
    /// Of the second part's, when there is one (a mean's counts).
    pub count_noise_std: Option<f64>,
}

/// A statistic: how it binds to a schema, combines across nodes and reads pooled data.
pub trait Statistic: fmt::Debug + Sync {
    /// Binds the query's statistic to the dataset's schema (its columns, bounds and
    /// levels), or says why it does not fit.
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError>;

    /// The network-wide estimate from the releases of the nodes that answered (at least
    /// one), each with its own noise.
    fn combine(&self, query: &Query, sites: &[SiteRelease<'_>]) -> Combined;

    /// The exact answer over pooled rows.
    fn pooled(&self, query: &Query, cohort: &PooledCohort) -> TrueValue;
}

/// A statistic bound to one node's schema: its partial side.
pub trait Accumulator: fmt::Debug + Send + Sync {
    /// The released quantities, in order.
    fn parts(&self) -> Vec<Part>;

    /// Digits after the point of released sums and bins (0 for counts).
    fn value_scale(&self) -> u8;

    /// Whether the release is a vector (histogram, cells): zCDP only.
    fn vector(&self) -> bool;

    /// The exact result over a cohort, one vector per part.
    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact;

    /// The wire form of the noisy parts.
    fn release(&self, noisy: Vec<NoisyPart>) -> Release;

    /// What a secure round's masked words (every part, in order) add up to.
    fn masked_shape(&self) -> MaskedShape;

    /// Whether the minimum cell size applies to what the aggregator reports from the
    /// release rather than to the released numbers (a survival curve's numbers at risk,
    /// read from tree nodes that are not cells).
    fn withholds_when_combined(&self) -> bool {
        false
    }
}
