//! The exact answer of a query on pooled records, as tests and benchmarks take the truth.
//!
//! The caller (the testnet's generator, which keeps its synthetic records) decides which
//! rows match a query's filter, row by row and independently of the columnar engine; each
//! statistic then says what its answer over those rows is ([`crate::Statistic::pooled`]).
//! So the meaning of a statistic lives in its own file, and the engine's columnar path is
//! checked against a row-by-row reading of the same meaning.

/// One matching row of a consenting patient: the value of the column the statistic reads
/// (`None` when missing or when it reads none) and its GROUP BY cell (`None` when a grouping
/// value is missing).
#[derive(Debug, Clone, PartialEq)]
pub struct PooledRow {
    pub value: Option<f64>,
    pub cell: Option<Vec<String>>,
    /// Whether a survival curve's event condition holds on the row (`false` otherwise).
    pub event: bool,
    /// A regression's terms on the row, outcome first (a condition 1 or 0), then each
    /// covariate (a flag or condition 1 or 0); `None` where missing.
    pub terms: Vec<Option<f64>>,
}

/// Every consenting patient with at least one matching row, each with its matching rows in
/// order, at most the schema's bound on rows per patient.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PooledCohort {
    pub patients: Vec<Vec<PooledRow>>,
}

/// The exact answer of a query.
#[derive(Debug, Clone, PartialEq)]
pub enum TrueValue {
    Number(f64),
    /// Cells of a GROUP BY count: labels and counts (only non-empty cells).
    Groups(Vec<(Vec<String>, u64)>),
    /// Cells of a GROUP BY sum or mean: labels and values (only cells with a value).
    Cells(Vec<(Vec<String>, f64)>),
    /// Survival curves per stratum: S(t) for each day from 0 to the horizon.
    Curves(Vec<(Vec<String>, Vec<f64>)>),
    /// A regression's coefficients, intercept first, in the columns' units.
    Coefficients(Vec<f64>),
    /// No value (a mean or quantile of nothing).
    Nothing,
}
