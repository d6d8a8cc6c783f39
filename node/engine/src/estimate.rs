//! What combining the nodes' releases yields: the network-wide estimate of a statistic with
//! its standard deviation and 95% interval, or one per GROUP BY cell. These are result
//! types only; each statistic fills them in its own `combine`.

use serde::Serialize;

/// z for a two-sided 95% normal interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// A number in a report: counts stay integers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Estimate {
    Integer(i64),
    /// A real number; not a number (`null` in JSON) where none could be estimated.
    Real(f64),
}

impl Estimate {
    pub fn as_f64(self) -> f64 {
        match self {
            Estimate::Integer(n) => n as f64,
            Estimate::Real(x) => x,
        }
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Estimate::Integer(n) => write!(f, "{n}"),
            Estimate::Real(x) if x.is_nan() => f.write_str("none"),
            Estimate::Real(x) => write!(f, "{x:.3}"),
        }
    }
}

/// One cell of a GROUP BY.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupEstimate {
    pub group: Vec<String>,
    pub estimate: Estimate,
    pub std_dev: f64,
    pub ci95: [f64; 2],
    /// Nodes that withheld this cell (their count was below the minimum cell size).
    pub withheld_by: usize,
    /// Why this cell has no estimate, if so (e.g. a mean over a noisy count below 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The network-wide result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Combined {
    pub estimate: Option<Estimate>,
    pub std_dev: Option<f64>,
    pub ci95: Option<[f64; 2]>,
    pub groups: Vec<GroupEstimate>,
    /// A survival curve per stratum (`KAPLAN_MEIER`).
    pub survival: Option<crate::statistic::Survival>,
    /// A fitted regression (`LINEAR_REGRESSION`, `LOGISTIC_REGRESSION`).
    pub regression: Option<crate::statistic::Regression>,
    /// Why no estimate could be made, if so.
    pub note: Option<String>,
    /// A secure round that could not be read (nothing was revealed).
    pub aborted: bool,
}

impl Combined {
    /// A result with no estimate, saying why.
    pub fn none(note: impl Into<String>) -> Self {
        Self {
            note: Some(note.into()),
            ..Self::default()
        }
    }
}
