//! The query AST: what a researcher asks, in a canonical typed form.
//!
//! The researcher's SQL is compiled to this form by the aggregator; this form (not the SQL
//! text) is what is signed, sent and checked by every node against its own dataset schema
//! and the consortium's policy. A query names a view (`patients`, `timepoints`, or an
//! information kind such as `ct`), an aggregate, and a filter: a tree of AND / OR / NOT over
//! comparisons, `IN`, `BETWEEN` and `IS [NOT] NULL` on the view's columns. Literals are exact
//! (decimals as digits and a scale), so no floating point enters a signed query.
//! [`Query::canonical`] puts a query in one normal form, so equal questions hash equally.
//!
//! A query may range over a per-patient table derived from a lower layer ([`PerPatient`],
//! SQL's `WITH p AS (SELECT patient_id, MIN(…) FILTER (WHERE …) AS … FROM timepoints
//! GROUP BY patient_id)`): one row per patient, so the usual patient-level sensitivity holds
//! whatever the derivation. Filters may compare two columns (`icu_day > toci_day + 3`), which
//! is how "A before B within N days" is asked.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{
    MAX_DERIVED_COLUMNS, MAX_FILTER_DEPTH, MAX_IDENTIFIER_BYTES, MAX_IN_VALUES, MAX_PREDICATES,
};

/// What is computed over the matching rows.
///
/// Not `#[non_exhaustive]` on purpose: every crate matches it exhaustively, so a new
/// aggregate does not compile until each place (the engine's registry first) handles it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Aggregate {
    /// The number of distinct patients with at least one matching row (`COUNT(*)` on
    /// `patients`, `COUNT(DISTINCT patient_id)` elsewhere). One patient changes it by one.
    CountPatients,
    /// The number of matching rows of a timepoint or item view; each patient contributes at
    /// most the schema's bound on rows per patient, which is the sensitivity.
    CountRows,
    /// The sum of a numeric column over matching rows, each value clamped to the column's
    /// declared bounds.
    Sum { column: String },
    /// The mean of a numeric column: a noisy sum over a noisy count of non-missing values.
    Mean { column: String },
    /// A quantile (`per_mille` / 1000; 500 is the median) of a numeric column, read from a
    /// noisy histogram over the column's declared bounds.
    Quantile { column: String, per_mille: u16 },
    /// A Kaplan–Meier survival curve over patient-level rows: each patient's time is the
    /// first present of `time` (day columns, as `COALESCE`), clamped to `[0, horizon_days]`,
    /// and the patient had the event then when `event` holds (censored otherwise). Released
    /// as noisy per-day event and censoring counts aggregated in a tree.
    KaplanMeier {
        time: Vec<String>,
        event: Filter,
        horizon_days: u16,
    },
    /// An ordinary least-squares fit of `outcome` (a numeric column) on the covariates, with
    /// an intercept, over patient-level rows: released once as the noisy cross-products of
    /// the design (each column clamped and scaled by its declared bounds).
    LinearRegression {
        outcome: String,
        covariates: Vec<Covariate>,
    },
    /// A logistic fit of `outcome` (a condition: 1 where it holds) on the covariates, with an
    /// intercept, by Newton's method over the network: `iterations` steps, each released as
    /// the noisy score and information at the step's coefficients. Charged in full at the
    /// first step; the others are bound to it by [`FitStep::fit`].
    LogisticRegression {
        outcome: Filter,
        covariates: Vec<Covariate>,
        iterations: u8,
        step: FitStep,
    },
}

/// One covariate of a regression.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Covariate {
    /// A numeric or boolean column, clamped to its declared bounds.
    Column(String),
    /// A condition, 1 where it holds and 0 where it does not (`sex = 'male'`).
    Indicator(Filter),
}

impl Covariate {
    /// The columns it reads.
    pub fn columns(&self) -> BTreeSet<&str> {
        match self {
            Covariate::Column(column) => BTreeSet::from([column.as_str()]),
            Covariate::Indicator(filter) => filter.columns(),
        }
    }
}

impl fmt::Display for Covariate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Covariate::Column(column) => f.write_str(column),
            Covariate::Indicator(filter) => filter.write(f, false),
        }
    }
}

/// Where a Newton fit stands: which step this request is and the coefficients the nodes
/// evaluate the score and information at.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FitStep {
    /// The request that opened the fit (and was charged for all of it); `None` for that
    /// first step itself.
    pub fit: Option<crate::messages::RequestId>,
    /// 0 for the first step.
    pub iteration: u8,
    /// The coefficients, intercept first, in millionths, on the scale the nodes fit on
    /// (each covariate scaled by its declared bounds); empty at the first step (all 0).
    pub coefficients: Vec<i64>,
}

/// Millionths per unit of a [`FitStep`]'s coefficients.
pub const COEFFICIENT_SCALE: f64 = 1e6;
/// Most covariates a regression may name.
pub const MAX_COVARIATES: usize = 16;
/// Most Newton steps a logistic fit may declare.
pub const MAX_FIT_ITERATIONS: u8 = 25;

/// Each step's budget of a fit's `total` (in any unit, e.g. micro-rho), by its weight
/// ([`fit_step_shares`] says which), rounded down, the last step taking what rounding
/// left, so the steps together spend exactly `total`.
pub fn fit_step_budgets(total: u64, iterations: u8) -> Vec<u64> {
    let steps = usize::from(iterations.max(1));
    let weights: Vec<u64> = match steps {
        1 => vec![1],
        2 => vec![1, 2],
        _ => {
            // In 6ths of the whole, scaled by the early steps' count so all are whole.
            let early = steps as u64 - 2;
            let mut weights = vec![2; steps - 2];
            weights.push(early);
            weights.push(3 * early);
            weights
        }
    };
    let sum = u128::from(weights.iter().sum::<u64>());
    let mut budgets: Vec<u64> = weights
        .iter()
        .map(|w| u64::try_from(u128::from(total) * u128::from(*w) / sum).unwrap_or(u64::MAX))
        .collect();
    let early: u64 = budgets.iter().rev().skip(1).sum();
    if let Some(last) = budgets.last_mut() {
        *last = total.saturating_sub(early);
    }
    budgets
}

/// Each step's share of a fit's privacy budget, in millionths of the whole, for a fit of
/// `iterations` steps. The last step's noise is what remains in the estimate: it takes
/// half. The step before it sets where the last one starts, and its error enters the
/// estimate squared: it takes a sixth. The earlier ones, whose errors the next steps
/// correct (their matrices guarded against noise), share the other third equally. Two
/// steps take a third and two thirds; one takes all. (A third for the last step measured a
/// tenth more error at rho 1: BENCHMARKS.md.)
pub fn fit_step_shares(iterations: u8) -> Vec<u64> {
    fit_step_budgets(1_000_000, iterations)
}

impl Aggregate {
    /// The aggregation's name as policies list it.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregate::CountPatients | Aggregate::CountRows => "count",
            Aggregate::Sum { .. } => "sum",
            Aggregate::Mean { .. } => "mean",
            Aggregate::Quantile { per_mille: 500, .. } => "median",
            Aggregate::Quantile { .. } => "quantile",
            Aggregate::KaplanMeier { .. } => "kaplan_meier",
            Aggregate::LinearRegression { .. } => "linear_regression",
            Aggregate::LogisticRegression { .. } => "logistic_regression",
        }
    }

    /// The column it reads, if any.
    pub fn column(&self) -> Option<&str> {
        match self {
            Aggregate::Sum { column }
            | Aggregate::Mean { column }
            | Aggregate::Quantile { column, .. } => Some(column),
            Aggregate::CountPatients
            | Aggregate::CountRows
            | Aggregate::KaplanMeier { .. }
            | Aggregate::LinearRegression { .. }
            | Aggregate::LogisticRegression { .. } => None,
        }
    }

    /// Every column it reads: the measured column, or a survival curve's time columns and
    /// the columns of its event condition.
    pub fn columns(&self) -> BTreeSet<&str> {
        match self {
            Aggregate::KaplanMeier { time, event, .. } => {
                let mut columns = event.columns();
                columns.extend(time.iter().map(String::as_str));
                columns
            }
            Aggregate::LinearRegression {
                outcome,
                covariates,
            } => {
                let mut columns = BTreeSet::from([outcome.as_str()]);
                columns.extend(covariates.iter().flat_map(Covariate::columns));
                columns
            }
            Aggregate::LogisticRegression {
                outcome,
                covariates,
                ..
            } => {
                let mut columns = outcome.columns();
                columns.extend(covariates.iter().flat_map(Covariate::columns));
                columns
            }
            Aggregate::Sum { column }
            | Aggregate::Mean { column }
            | Aggregate::Quantile { column, .. } => BTreeSet::from([column.as_str()]),
            Aggregate::CountPatients | Aggregate::CountRows => BTreeSet::new(),
        }
    }
}

/// The longest survival horizon, in days.
pub const MAX_SURVIVAL_DAYS: u16 = 730;
/// Most time columns a survival curve's `COALESCE` may name.
pub const MAX_SURVIVAL_TIMES: usize = 4;

/// An exact decimal: `digits / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Decimal {
    pub digits: i64,
    pub scale: u8,
}

impl Decimal {
    /// The fraction in thousandths, when it is exact (`0.9` → 900).
    pub fn to_per_mille(&self) -> Option<u16> {
        let scale = u32::from(self.scale);
        let value = if scale <= 3 {
            self.digits.checked_mul(10i64.pow(3 - scale))?
        } else {
            let divisor = 10i64.pow(scale - 3);
            (self.digits % divisor == 0).then_some(self.digits / divisor)?
        };
        u16::try_from(value).ok()
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scale == 0 {
            return write!(f, "{}", self.digits);
        }
        let divisor = 10i128.pow(u32::from(self.scale));
        let digits = i128::from(self.digits);
        let sign = if digits < 0 { "-" } else { "" };
        let (whole, fraction) = (digits.abs() / divisor, digits.abs() % divisor);
        write!(
            f,
            "{sign}{whole}.{fraction:0width$}",
            width = usize::from(self.scale)
        )
    }
}

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Literal {
    Integer(i64),
    Decimal(Decimal),
    /// A level of a categorical column (or a text value).
    Text(String),
    Bool(bool),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Integer(n) => write!(f, "{n}"),
            Literal::Decimal(d) => write!(f, "{d}"),
            Literal::Text(t) => write!(f, "'{}'", t.replace('\'', "''")),
            Literal::Bool(b) => write!(f, "{}", if *b { "TRUE" } else { "FALSE" }),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator with its sides swapped: `a < b` is `b > a`.
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            CmpOp::Eq => CmpOp::Eq,
            CmpOp::Ne => CmpOp::Ne,
        }
    }

    /// Whether `a op b` holds when `a` compares to `b` as `order`.
    pub fn holds(self, order: std::cmp::Ordering) -> bool {
        match self {
            CmpOp::Eq => order.is_eq(),
            CmpOp::Ne => order.is_ne(),
            CmpOp::Lt => order.is_lt(),
            CmpOp::Le => order.is_le(),
            CmpOp::Gt => order.is_gt(),
            CmpOp::Ge => order.is_ge(),
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// Which rows of the view count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Filter {
    /// Every row (no WHERE).
    True,
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Compare {
        column: String,
        op: CmpOp,
        value: Literal,
    },
    In {
        column: String,
        values: Vec<Literal>,
    },
    Between {
        column: String,
        low: Literal,
        high: Literal,
    },
    IsNull {
        column: String,
        negated: bool,
    },
    /// `left op right + offset`: two numeric columns of the same row compared, e.g.
    /// `icu_day > toci_day` or `icu_day <= toci_day + 3` (a missing side is unknown).
    Columns {
        left: String,
        op: CmpOp,
        right: String,
        /// An integer or exact decimal, in the columns' unit.
        offset: Literal,
    },
}

impl Filter {
    /// `column = value`.
    pub fn eq(column: impl Into<String>, value: Literal) -> Self {
        Filter::Compare {
            column: column.into(),
            op: CmpOp::Eq,
            value,
        }
    }

    /// `column op value`.
    pub fn cmp(column: impl Into<String>, op: CmpOp, value: Literal) -> Self {
        Filter::Compare {
            column: column.into(),
            op,
            value,
        }
    }

    /// Every column this filter reads.
    pub fn columns(&self) -> BTreeSet<&str> {
        let mut columns = BTreeSet::new();
        self.visit(&mut |f| match f {
            Filter::Compare { column, .. }
            | Filter::In { column, .. }
            | Filter::Between { column, .. }
            | Filter::IsNull { column, .. } => {
                columns.insert(column.as_str());
            }
            Filter::Columns { left, right, .. } => {
                columns.insert(left.as_str());
                columns.insert(right.as_str());
            }
            Filter::True | Filter::And(_) | Filter::Or(_) | Filter::Not(_) => {}
        });
        columns
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Filter)) {
        f(self);
        match self {
            Filter::And(children) | Filter::Or(children) => {
                children.iter().for_each(|c| c.visit(f));
            }
            Filter::Not(inner) => inner.visit(f),
            Filter::True
            | Filter::Compare { .. }
            | Filter::In { .. }
            | Filter::Between { .. }
            | Filter::IsNull { .. }
            | Filter::Columns { .. } => {}
        }
    }

    fn depth(&self) -> usize {
        match self {
            Filter::And(children) | Filter::Or(children) => {
                1 + children.iter().map(Filter::depth).max().unwrap_or(0)
            }
            Filter::Not(inner) => 1 + inner.depth(),
            Filter::True
            | Filter::Compare { .. }
            | Filter::In { .. }
            | Filter::Between { .. }
            | Filter::IsNull { .. }
            | Filter::Columns { .. } => 1,
        }
    }

    fn nodes(&self) -> usize {
        let mut count = 0;
        self.visit(&mut |_| count += 1);
        count
    }

    /// Flattens nested AND/OR, drops `True` from conjunctions, sorts and deduplicates.
    fn canonical(self) -> Filter {
        match self {
            Filter::And(children) => {
                let mut flat = Vec::new();
                for child in children.into_iter().map(Filter::canonical) {
                    match child {
                        Filter::And(grand) => flat.extend(grand),
                        Filter::True => {}
                        other => flat.push(other),
                    }
                }
                flat.sort();
                flat.dedup();
                match flat.len() {
                    0 => Filter::True,
                    1 => flat.pop().unwrap_or(Filter::True),
                    _ => Filter::And(flat),
                }
            }
            Filter::Or(children) => {
                let mut flat = Vec::new();
                for child in children.into_iter().map(Filter::canonical) {
                    match child {
                        Filter::Or(grand) => flat.extend(grand),
                        Filter::True => return Filter::True,
                        other => flat.push(other),
                    }
                }
                flat.sort();
                flat.dedup();
                match flat.len() {
                    0 => Filter::True,
                    1 => flat.pop().unwrap_or(Filter::True),
                    _ => Filter::Or(flat),
                }
            }
            Filter::Not(inner) => match inner.canonical() {
                Filter::Not(double) => *double,
                other => Filter::Not(Box::new(other)),
            },
            Filter::In { column, mut values } => {
                values.sort();
                values.dedup();
                Filter::In { column, values }
            }
            // `b <= a + 3` and `a >= b - 3` are one question: the columns in name order.
            Filter::Columns {
                left,
                op,
                right,
                offset,
            } if right < left => Filter::Columns {
                left: right,
                op: op.flipped(),
                right: left,
                offset: match offset {
                    Literal::Integer(n) => Literal::Integer(n.saturating_neg()),
                    Literal::Decimal(d) => Literal::Decimal(Decimal {
                        digits: d.digits.saturating_neg(),
                        scale: d.scale,
                    }),
                    other @ (Literal::Text(_) | Literal::Bool(_)) => other,
                },
            },
            other => other,
        }
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, nested: bool) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, children: &[Filter], word: &str| {
            if nested {
                f.write_str("(")?;
            }
            for (i, child) in children.iter().enumerate() {
                if i > 0 {
                    write!(f, " {word} ")?;
                }
                child.write(f, true)?;
            }
            if nested {
                f.write_str(")")?;
            }
            Ok(())
        };
        match self {
            Filter::True => f.write_str("TRUE"),
            Filter::And(children) => join(f, children, "AND"),
            Filter::Or(children) => join(f, children, "OR"),
            Filter::Not(inner) => {
                f.write_str("NOT ")?;
                inner.write(f, true)
            }
            Filter::Compare { column, op, value } => {
                write!(f, "{column} {} {value}", op.symbol())
            }
            Filter::In { column, values } => {
                write!(f, "{column} IN (")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")
            }
            Filter::Between { column, low, high } => {
                write!(f, "{column} BETWEEN {low} AND {high}")
            }
            Filter::IsNull { column, negated } => {
                write!(f, "{column} IS {}NULL", if *negated { "NOT " } else { "" })
            }
            Filter::Columns {
                left,
                op,
                right,
                offset,
            } => {
                write!(f, "{left} {} {right}", op.symbol())?;
                match offset {
                    Literal::Integer(0) => Ok(()),
                    Literal::Integer(n) if *n < 0 => write!(f, " - {}", n.unsigned_abs()),
                    Literal::Decimal(d) if d.digits < 0 => write!(
                        f,
                        " - {}",
                        Decimal {
                            digits: d.digits.saturating_neg(),
                            scale: d.scale
                        }
                    ),
                    Literal::Decimal(d) if d.digits == 0 => Ok(()),
                    other @ (Literal::Integer(_)
                    | Literal::Decimal(_)
                    | Literal::Text(_)
                    | Literal::Bool(_)) => write!(f, " + {other}"),
                }
            }
        }
    }
}

/// What a derived column summarises of one patient's rows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Summary {
    /// `MIN(column)`: the smallest non-missing value (levels in the schema's order).
    Min { column: String },
    /// `MAX(column)`.
    Max { column: String },
    /// `COUNT(*)` (no column) or `COUNT(column)` (its non-missing values): 0 when none.
    Count { column: Option<String> },
    /// `BOOL_OR(condition)`: whether the condition holds at any row where it is known.
    Any { condition: Filter },
    /// `BOOL_AND(condition)`: whether it holds at every row where it is known.
    Every { condition: Filter },
    /// `ARG_MIN(value, by)`: `value` at the row with the smallest `by` (rows where either
    /// is missing are skipped; of tied rows, the first), e.g. the first CRP by onset day.
    ValueAtMin { value: String, by: String },
    /// `ARG_MAX(value, by)`: the last by time.
    ValueAtMax { value: String, by: String },
}

impl Summary {
    /// The condition it tests at each row (`BOOL_OR`, `BOOL_AND`), if any.
    pub fn condition(&self) -> Option<&Filter> {
        match self {
            Summary::Any { condition } | Summary::Every { condition } => Some(condition),
            Summary::Min { .. }
            | Summary::Max { .. }
            | Summary::Count { .. }
            | Summary::ValueAtMin { .. }
            | Summary::ValueAtMax { .. } => None,
        }
    }

    /// The columns of the source view it reads.
    pub fn columns(&self) -> BTreeSet<&str> {
        match self {
            Summary::Min { column } | Summary::Max { column } => BTreeSet::from([column.as_str()]),
            Summary::Count { column } => column.iter().map(String::as_str).collect(),
            Summary::Any { condition } | Summary::Every { condition } => condition.columns(),
            Summary::ValueAtMin { value, by } | Summary::ValueAtMax { value, by } => {
                BTreeSet::from([value.as_str(), by.as_str()])
            }
        }
    }

    fn canonical(self) -> Self {
        match self {
            Summary::Any { condition } => Summary::Any {
                condition: condition.canonical(),
            },
            Summary::Every { condition } => Summary::Every {
                condition: condition.canonical(),
            },
            other @ (Summary::Min { .. }
            | Summary::Max { .. }
            | Summary::Count { .. }
            | Summary::ValueAtMin { .. }
            | Summary::ValueAtMax { .. }) => other,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Summary::Min { column } => write!(f, "MIN({column})"),
            Summary::Max { column } => write!(f, "MAX({column})"),
            Summary::Count { column: None } => f.write_str("COUNT(*)"),
            Summary::Count {
                column: Some(column),
            } => write!(f, "COUNT({column})"),
            Summary::Any { condition } => {
                f.write_str("BOOL_OR(")?;
                condition.write(f, false)?;
                f.write_str(")")
            }
            Summary::Every { condition } => {
                f.write_str("BOOL_AND(")?;
                condition.write(f, false)?;
                f.write_str(")")
            }
            Summary::ValueAtMin { value, by } => write!(f, "ARG_MIN({value}, {by})"),
            Summary::ValueAtMax { value, by } => write!(f, "ARG_MAX({value}, {by})"),
        }
    }
}

/// One column of a per-patient table: `summary FILTER (WHERE filter) AS name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DerivedColumn {
    pub name: String,
    pub summary: Summary,
    /// Which of the patient's rows it summarises (`True`: all of them).
    pub filter: Filter,
}

/// A per-patient table derived from the rows of a lower layer (`WITH p AS (SELECT
/// patient_id, … FROM timepoints [WHERE …] GROUP BY patient_id)`): one row per patient with
/// at least one row of `source` matching `filter`, holding its derived columns and the
/// patient's own columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerPatient {
    /// The name the outer query ranges over (`p`).
    pub name: String,
    /// The view whose rows are summarised: `timepoints` or an information kind.
    pub source: String,
    /// Which rows of `source` count at all (the WITH's WHERE).
    pub filter: Filter,
    pub columns: Vec<DerivedColumn>,
    /// Patient columns the WITH names besides `patient_id` (`SELECT patient_id, age, …
    /// GROUP BY patient_id, age`): each must be one of the patient's own columns.
    pub patient_columns: Vec<String>,
}

impl PerPatient {
    /// The derived column called `name`.
    pub fn derived(&self, name: &str) -> Option<&DerivedColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Every column of the source view it reads.
    pub fn source_columns(&self) -> BTreeSet<&str> {
        let mut columns = self.filter.columns();
        for derived in &self.columns {
            columns.extend(derived.summary.columns());
            columns.extend(derived.filter.columns());
        }
        columns.extend(self.patient_columns.iter().map(String::as_str));
        columns
    }

    fn canonical(mut self) -> Self {
        self.filter = self.filter.canonical();
        self.columns = self
            .columns
            .into_iter()
            .map(|c| DerivedColumn {
                name: c.name,
                summary: c.summary.canonical(),
                filter: c.filter.canonical(),
            })
            .collect();
        self.columns.sort();
        self.patient_columns.sort();
        self.patient_columns.dedup();
        self
    }
}

impl fmt::Display for PerPatient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} AS (SELECT patient_id", self.name)?;
        for column in &self.patient_columns {
            write!(f, ", {column}")?;
        }
        for derived in &self.columns {
            write!(f, ", {}", derived.summary)?;
            if derived.filter != Filter::True {
                f.write_str(" FILTER (WHERE ")?;
                derived.filter.write(f, false)?;
                f.write_str(")")?;
            }
            write!(f, " AS {}", derived.name)?;
        }
        write!(f, " FROM {}", self.source)?;
        if self.filter != Filter::True {
            f.write_str(" WHERE ")?;
            self.filter.write(f, false)?;
        }
        f.write_str(" GROUP BY patient_id")?;
        for column in &self.patient_columns {
            write!(f, ", {column}")?;
        }
        f.write_str(")")
    }
}

/// A researcher's question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The view queried, e.g. `patients`.
    pub view: String,
    pub aggregate: Aggregate,
    pub filter: Filter,
    /// Categorical columns to group by (at most two): a histogram or contingency table for
    /// counts, a sum or mean per cell otherwise.
    pub group_by: Vec<String>,
    /// The per-patient table `view` names, when it names one rather than a stored view.
    pub per_patient: Option<PerPatient>,
}

/// A structural problem with a query, found before any schema is consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryShapeError {
    #[error("query has {count} filter terms; at most {max} are allowed")]
    TooManyPredicates { count: usize, max: usize },
    #[error("filter nests {depth} levels deep; at most {max} are allowed")]
    TooDeep { depth: usize, max: usize },
    #[error("IN lists {count} values; at most {max} are allowed")]
    TooManyValues { count: usize, max: usize },
    #[error("identifier `{prefix}…` is longer than {max} bytes")]
    IdentifierTooLong { prefix: String, max: usize },
    #[error("GROUP BY takes one or two columns and only with COUNT, SUM, AVG or KAPLAN_MEIER")]
    BadGrouping,
    #[error("a quantile must lie strictly between 0 and 1")]
    BadQuantile,
    #[error(
        "KAPLAN_MEIER takes 1 to {MAX_SURVIVAL_TIMES} time columns and a horizon of 1 to {MAX_SURVIVAL_DAYS} days"
    )]
    BadSurvival,
    #[error(
        "a regression takes 1 to {MAX_COVARIATES} covariates, and a logistic fit 1 to {MAX_FIT_ITERATIONS} steps, each naming its place in the fit"
    )]
    BadRegression,
    #[error("the query ranges over `{view}`, but its WITH clause defines `{defined}`")]
    UnknownTable { view: String, defined: String },
    #[error("WITH defines {count} columns; at most {max} are allowed")]
    TooManyDerived { count: usize, max: usize },
    #[error("WITH defines `{0}` twice")]
    DuplicateDerived(String),
}

impl Query {
    /// Counts the patients in `view` with a row matching `filter`.
    pub fn count_patients(view: impl Into<String>, filter: Filter) -> Self {
        Self {
            view: view.into(),
            aggregate: Aggregate::CountPatients,
            filter,
            group_by: Vec::new(),
            per_patient: None,
        }
    }

    /// The columns the outer query names (its filter's, aggregate's and groups'), derived
    /// ones included.
    pub fn named_columns(&self) -> BTreeSet<&str> {
        let mut columns = self.filter.columns();
        columns.extend(self.aggregate.columns());
        columns.extend(self.group_by.iter().map(String::as_str));
        columns
    }

    /// Every stored column the query reads: what policies check. A derived column stands
    /// for the source columns it summarises.
    pub fn columns(&self) -> BTreeSet<&str> {
        let named = self.named_columns();
        match &self.per_patient {
            None => named,
            Some(table) => {
                let mut columns = table.source_columns();
                columns.extend(named.into_iter().filter(|c| table.derived(c).is_none()));
                columns
            }
        }
    }

    /// The stored view whose rows the query reads: the WITH's source, or `view`.
    pub fn source_view(&self) -> &str {
        self.per_patient
            .as_ref()
            .map_or(self.view.as_str(), |table| table.source.as_str())
    }

    /// The aggregation's name as policies list it (`histogram` for grouped counts).
    pub fn aggregation_name(&self) -> &'static str {
        match &self.aggregate {
            Aggregate::CountPatients | Aggregate::CountRows if !self.group_by.is_empty() => {
                "histogram"
            }
            aggregate @ (Aggregate::CountPatients
            | Aggregate::CountRows
            | Aggregate::Sum { .. }
            | Aggregate::Mean { .. }
            | Aggregate::Quantile { .. }
            | Aggregate::KaplanMeier { .. }
            | Aggregate::LinearRegression { .. }
            | Aggregate::LogisticRegression { .. }) => aggregate.name(),
        }
    }

    /// Every aggregation a study must allow for this query: its own, and `histogram` for
    /// any GROUP BY (a sum per cell is a grouping and a sum).
    pub fn required_aggregations(&self) -> Vec<&'static str> {
        let mut names = vec![self.aggregation_name()];
        if !self.group_by.is_empty() && !names.contains(&"histogram") {
            names.insert(0, "histogram");
        }
        names
    }

    /// Checks limits that need no schema: size, depth, list lengths, identifier lengths.
    pub fn check_shape(&self) -> Result<(), QueryShapeError> {
        let nodes = self.filter.nodes();
        if nodes > MAX_PREDICATES {
            return Err(QueryShapeError::TooManyPredicates {
                count: nodes,
                max: MAX_PREDICATES,
            });
        }
        let depth = self.filter.depth();
        if depth > MAX_FILTER_DEPTH {
            return Err(QueryShapeError::TooDeep {
                depth,
                max: MAX_FILTER_DEPTH,
            });
        }
        let too_long = |text: &str| {
            (text.len() > MAX_IDENTIFIER_BYTES).then(|| QueryShapeError::IdentifierTooLong {
                prefix: text.chars().take(16).collect(),
                max: MAX_IDENTIFIER_BYTES,
            })
        };
        if let Some(e) = too_long(&self.view) {
            return Err(e);
        }
        if let Some(table) = &self.per_patient {
            if table.name != self.view {
                return Err(QueryShapeError::UnknownTable {
                    view: self.view.clone(),
                    defined: table.name.clone(),
                });
            }
            if table.columns.len() > MAX_DERIVED_COLUMNS {
                return Err(QueryShapeError::TooManyDerived {
                    count: table.columns.len(),
                    max: MAX_DERIVED_COLUMNS,
                });
            }
            let mut names = BTreeSet::new();
            for derived in &table.columns {
                if !names.insert(derived.name.as_str()) {
                    return Err(QueryShapeError::DuplicateDerived(derived.name.clone()));
                }
            }
            // Every filter of the WITH: its WHERE, each column's FILTER and condition.
            let filters: Vec<&Filter> = std::iter::once(&table.filter)
                .chain(
                    table
                        .columns
                        .iter()
                        .flat_map(|c| std::iter::once(&c.filter).chain(c.summary.condition())),
                )
                .collect();
            // A summary without a condition counts as one term.
            let nodes = filters.iter().map(|f| f.nodes()).sum::<usize>()
                + table
                    .columns
                    .iter()
                    .filter(|c| c.summary.condition().is_none())
                    .count();
            if nodes + self.filter.nodes() > 2 * MAX_PREDICATES {
                return Err(QueryShapeError::TooManyPredicates {
                    count: nodes + self.filter.nodes(),
                    max: 2 * MAX_PREDICATES,
                });
            }
            if let Some(e) = [&table.name, &table.source]
                .into_iter()
                .chain(&table.patient_columns)
                .chain(table.columns.iter().map(|c| &c.name))
                .map(String::as_str)
                .chain(table.source_columns())
                .find_map(&too_long)
            {
                return Err(e);
            }
            for filter in filters {
                if filter.depth() > MAX_FILTER_DEPTH {
                    return Err(QueryShapeError::TooDeep {
                        depth: filter.depth(),
                        max: MAX_FILTER_DEPTH,
                    });
                }
                filter_values_shape(filter, &too_long)?;
            }
        }
        let groupable = match self.aggregate {
            Aggregate::CountPatients
            | Aggregate::CountRows
            | Aggregate::Sum { .. }
            | Aggregate::Mean { .. }
            | Aggregate::KaplanMeier { .. } => true,
            Aggregate::Quantile { .. }
            | Aggregate::LinearRegression { .. }
            | Aggregate::LogisticRegression { .. } => false,
        };
        self.check_regression_shape(&too_long)?;
        if let Aggregate::KaplanMeier {
            time,
            event,
            horizon_days,
        } = &self.aggregate
        {
            if time.is_empty() || time.len() > MAX_SURVIVAL_TIMES || *horizon_days == 0 {
                return Err(QueryShapeError::BadSurvival);
            }
            if *horizon_days > MAX_SURVIVAL_DAYS {
                return Err(QueryShapeError::BadSurvival);
            }
            if event.nodes() + self.filter.nodes() > 2 * MAX_PREDICATES {
                return Err(QueryShapeError::TooManyPredicates {
                    count: event.nodes() + self.filter.nodes(),
                    max: 2 * MAX_PREDICATES,
                });
            }
            if event.depth() > MAX_FILTER_DEPTH {
                return Err(QueryShapeError::TooDeep {
                    depth: event.depth(),
                    max: MAX_FILTER_DEPTH,
                });
            }
            if let Some(e) = time.iter().find_map(|c| too_long(c)) {
                return Err(e);
            }
            filter_values_shape(event, &too_long)?;
        }
        if self.group_by.len() > 2 || !self.group_by.is_empty() && !groupable {
            return Err(QueryShapeError::BadGrouping);
        }
        if let Some(e) = self
            .group_by
            .iter()
            .chain(self.aggregate.column().map(|_| &self.view))
            .find_map(|c| too_long(c))
        {
            return Err(e);
        }
        if let Aggregate::Quantile { per_mille, .. } = self.aggregate
            && !(1..1000).contains(&per_mille)
        {
            return Err(QueryShapeError::BadQuantile);
        }
        filter_values_shape(&self.filter, &too_long)
    }

    /// A regression's limits: 1 to [`MAX_COVARIATES`] covariates, 1 to
    /// [`MAX_FIT_ITERATIONS`] steps, a step's coefficients one per term, and its conditions
    /// within the filter limits.
    fn check_regression_shape(
        &self,
        too_long: &dyn Fn(&str) -> Option<QueryShapeError>,
    ) -> Result<(), QueryShapeError> {
        let (covariates, conditions): (&[Covariate], Vec<&Filter>) = match &self.aggregate {
            Aggregate::LinearRegression {
                outcome,
                covariates,
            } => {
                if let Some(e) = too_long(outcome) {
                    return Err(e);
                }
                (covariates, Vec::new())
            }
            Aggregate::LogisticRegression {
                outcome,
                covariates,
                iterations,
                step,
            } => {
                let terms = covariates.len() + 1;
                if *iterations == 0
                    || *iterations > MAX_FIT_ITERATIONS
                    || step.iteration >= *iterations
                    || step.fit.is_some() != (step.iteration > 0)
                    || !(step.coefficients.is_empty() || step.coefficients.len() == terms)
                {
                    return Err(QueryShapeError::BadRegression);
                }
                (covariates, vec![outcome])
            }
            Aggregate::CountPatients
            | Aggregate::CountRows
            | Aggregate::Sum { .. }
            | Aggregate::Mean { .. }
            | Aggregate::Quantile { .. }
            | Aggregate::KaplanMeier { .. } => return Ok(()),
        };
        if covariates.is_empty() || covariates.len() > MAX_COVARIATES {
            return Err(QueryShapeError::BadRegression);
        }
        let mut conditions = conditions;
        for covariate in covariates {
            match covariate {
                Covariate::Column(column) => {
                    if let Some(e) = too_long(column) {
                        return Err(e);
                    }
                }
                Covariate::Indicator(filter) => conditions.push(filter),
            }
        }
        let nodes = conditions.iter().map(|f| f.nodes()).sum::<usize>() + self.filter.nodes();
        if nodes > 2 * MAX_PREDICATES {
            return Err(QueryShapeError::TooManyPredicates {
                count: nodes,
                max: 2 * MAX_PREDICATES,
            });
        }
        for filter in conditions {
            if filter.depth() > MAX_FILTER_DEPTH {
                return Err(QueryShapeError::TooDeep {
                    depth: filter.depth(),
                    max: MAX_FILTER_DEPTH,
                });
            }
            filter_values_shape(filter, too_long)?;
        }
        Ok(())
    }

    /// The fit a logistic step belongs to, as the nodes compare it: the query with its step
    /// cleared, so every step of one fit has the same one.
    pub fn fit_identity(&self) -> Option<Query> {
        let mut identity = self.clone();
        let Aggregate::LogisticRegression { step, .. } = &mut identity.aggregate else {
            return None;
        };
        *step = FitStep::default();
        Some(identity)
    }

    /// Makes a logistic fit's step the next one: of the fit request `fit` opened, one
    /// step on, evaluated at `coefficients`. Another aggregate is left as it is (`false`).
    pub fn advance_fit(&mut self, fit: crate::messages::RequestId, coefficients: Vec<i64>) -> bool {
        let Aggregate::LogisticRegression { step, .. } = &mut self.aggregate else {
            return false;
        };
        *step = FitStep {
            fit: Some(fit),
            iteration: step.iteration.saturating_add(1),
            coefficients,
        };
        true
    }

    /// The normal form: nested AND/OR flattened, terms sorted and deduplicated (in the WITH
    /// clause too, whose columns are sorted by name).
    pub fn canonical(mut self) -> Self {
        self.filter = self.filter.canonical();
        match &mut self.aggregate {
            Aggregate::KaplanMeier { event, .. } => {
                *event = std::mem::replace(event, Filter::True).canonical();
            }
            Aggregate::LogisticRegression {
                outcome,
                covariates,
                ..
            } => {
                *outcome = std::mem::replace(outcome, Filter::True).canonical();
                canonical_covariates(covariates);
            }
            Aggregate::LinearRegression { covariates, .. } => canonical_covariates(covariates),
            Aggregate::CountPatients
            | Aggregate::CountRows
            | Aggregate::Sum { .. }
            | Aggregate::Mean { .. }
            | Aggregate::Quantile { .. } => {}
        }
        self.per_patient = self.per_patient.map(PerPatient::canonical);
        self
    }
}

/// Each indicator's condition in normal form; the covariates' order is kept (it is the
/// order of the coefficients).
fn canonical_covariates(covariates: &mut [Covariate]) {
    for covariate in covariates {
        if let Covariate::Indicator(filter) = covariate {
            *filter = std::mem::replace(filter, Filter::True).canonical();
        }
    }
}

/// The limits on a filter's lists and identifiers.
fn filter_values_shape(
    filter: &Filter,
    too_long: &dyn Fn(&str) -> Option<QueryShapeError>,
) -> Result<(), QueryShapeError> {
    let mut problem = None;
    filter.visit(&mut |f| {
        if problem.is_some() {
            return;
        }
        match f {
            Filter::In { values, .. } if values.len() > MAX_IN_VALUES => {
                problem = Some(QueryShapeError::TooManyValues {
                    count: values.len(),
                    max: MAX_IN_VALUES,
                });
            }
            Filter::Compare { column, value, .. } => {
                problem = too_long(column).or_else(|| match value {
                    Literal::Text(t) => too_long(t),
                    Literal::Integer(_) | Literal::Decimal(_) | Literal::Bool(_) => None,
                });
            }
            Filter::Columns { left, right, .. } => {
                problem = too_long(left).or_else(|| too_long(right));
            }
            Filter::In { column, .. }
            | Filter::Between { column, .. }
            | Filter::IsNull { column, .. } => problem = too_long(column),
            Filter::True | Filter::And(_) | Filter::Or(_) | Filter::Not(_) => {}
        }
    });
    problem.map_or(Ok(()), Err)
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(table) = &self.per_patient {
            write!(f, "WITH {table} ")?;
        }
        f.write_str("SELECT ")?;
        for group in &self.group_by {
            write!(f, "{group}, ")?;
        }
        match &self.aggregate {
            Aggregate::CountPatients if self.view == "patients" || self.per_patient.is_some() => {
                f.write_str("COUNT(*)")?
            }
            Aggregate::CountPatients => f.write_str("COUNT(DISTINCT patient_id)")?,
            Aggregate::CountRows => f.write_str("COUNT(*)")?,
            Aggregate::Sum { column } => write!(f, "SUM({column})")?,
            Aggregate::Mean { column } => write!(f, "AVG({column})")?,
            Aggregate::Quantile {
                column,
                per_mille: 500,
            } => write!(f, "MEDIAN({column})")?,
            Aggregate::Quantile { column, per_mille } => write!(
                f,
                "PERCENTILE_CONT({}) WITHIN GROUP (ORDER BY {column})",
                Decimal {
                    digits: i64::from(*per_mille),
                    scale: 3
                }
            )?,
            Aggregate::KaplanMeier {
                time,
                event,
                horizon_days,
            } => {
                f.write_str("KAPLAN_MEIER(")?;
                match time.as_slice() {
                    [one] => f.write_str(one)?,
                    many => write!(f, "COALESCE({})", many.join(", "))?,
                }
                f.write_str(", ")?;
                event.write(f, false)?;
                write!(f, ", {horizon_days})")?;
            }
            Aggregate::LinearRegression {
                outcome,
                covariates,
            } => {
                write!(f, "LINEAR_REGRESSION({outcome}")?;
                for covariate in covariates {
                    write!(f, ", {covariate}")?;
                }
                f.write_str(")")?;
            }
            Aggregate::LogisticRegression {
                outcome,
                covariates,
                iterations,
                ..
            } => {
                f.write_str("LOGISTIC_REGRESSION(")?;
                outcome.write(f, false)?;
                for covariate in covariates {
                    write!(f, ", {covariate}")?;
                }
                write!(f, ", iterations => {iterations})")?;
            }
        }
        write!(f, " FROM {}", self.view)?;
        if self.filter != Filter::True {
            f.write_str(" WHERE ")?;
            self.filter.write(f, false)?;
        }
        if !self.group_by.is_empty() {
            write!(f, " GROUP BY {}", self.group_by.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(column: &str, level: &str) -> Filter {
        Filter::eq(column, Literal::Text(level.into()))
    }

    #[test]
    fn canonical_form_flattens_sorts_and_dedups() {
        let a = Query::count_patients(
            "patients",
            Filter::And(vec![
                level("sex", "female"),
                Filter::And(vec![
                    Filter::cmp("age", CmpOp::Ge, Literal::Integer(65)),
                    level("sex", "female"),
                ]),
                Filter::True,
            ]),
        )
        .canonical();
        let b = Query::count_patients(
            "patients",
            Filter::And(vec![
                Filter::cmp("age", CmpOp::Ge, Literal::Integer(65)),
                level("sex", "female"),
            ]),
        )
        .canonical();
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            "SELECT COUNT(*) FROM patients WHERE age >= 65 AND sex = 'female'"
        );
        let not_not = Filter::Not(Box::new(Filter::Not(Box::new(level("sex", "male")))));
        assert_eq!(
            Query::count_patients("patients", not_not)
                .canonical()
                .filter,
            level("sex", "male")
        );
    }

    #[test]
    fn decimals_and_nested_filters_print_as_sql() {
        let q = Query {
            view: "timepoints".into(),
            aggregate: Aggregate::CountPatients,
            group_by: vec![],
            per_patient: None,
            filter: Filter::And(vec![
                Filter::Or(vec![
                    Filter::cmp(
                        "crp",
                        CmpOp::Gt,
                        Literal::Decimal(Decimal {
                            digits: -105,
                            scale: 2,
                        }),
                    ),
                    Filter::IsNull {
                        column: "il6".into(),
                        negated: true,
                    },
                ]),
                Filter::In {
                    column: "care_level".into(),
                    values: vec![
                        Literal::Text("icu_ventilation".into()),
                        Literal::Text("ecmo".into()),
                    ],
                },
            ]),
        };
        assert_eq!(
            q.to_string(),
            "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE (crp > -1.05 OR il6 IS NOT NULL) AND care_level IN ('icu_ventilation', 'ecmo')"
        );
        assert_eq!(
            q.columns().into_iter().collect::<Vec<_>>(),
            vec!["care_level", "crp", "il6"]
        );
    }

    #[test]
    fn oversized_queries_fail_the_shape_check() {
        let many = Filter::And(
            (0..=MAX_PREDICATES)
                .map(|i| Filter::cmp(format!("c{i}"), CmpOp::Ge, Literal::Integer(0)))
                .collect(),
        );
        assert!(matches!(
            Query::count_patients("patients", many).check_shape(),
            Err(QueryShapeError::TooManyPredicates { .. })
        ));
        let mut deep = level("sex", "male");
        for _ in 0..MAX_FILTER_DEPTH {
            deep = Filter::Not(Box::new(deep));
        }
        assert!(matches!(
            Query::count_patients("patients", deep).check_shape(),
            Err(QueryShapeError::TooDeep { .. })
        ));
        let long = "x".repeat(MAX_IDENTIFIER_BYTES + 1);
        assert!(matches!(
            Query::count_patients(long, Filter::True).check_shape(),
            Err(QueryShapeError::IdentifierTooLong { .. })
        ));
    }
}
