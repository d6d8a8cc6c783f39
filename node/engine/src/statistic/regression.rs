//! `LINEAR_REGRESSION(y, x…)` and `LOGISTIC_REGRESSION(condition, x…)`: a fit with an
//! intercept over patient-level rows (`patients` or a `WITH` table), equal to the pooled
//! fit in the noiseless limit.
//!
//! **Design.** Each term is scaled onto `[-1, 1]` by its declared bounds: a numeric column
//! clamped to `[low, high]` is read as `(2x − low − high) / (high − low)`, a flag or a
//! condition (`sex = 'male'`) as −1 or 1. A row whose outcome or any covariate is missing
//! (a missing column, or a condition SQL's logic leaves unknown, as `sex = 'male'` where
//! the sex is missing; `death_day IS NOT NULL` is always known) is left out (complete
//! cases, as statsmodels' `missing='drop'`). So one patient's row
//! `w` (the intercept's 1, the terms, and a linear fit's outcome) has `‖w‖² ≤ terms`, which
//! bounds the sensitivity whatever the data; the scaling is stated in the release
//! ([`TermScale`]) and undone on the final side, so coefficients are in the columns' units.
//!
//! **Linear (one release).** The node releases the upper triangle of `Σ w wᵀ` over its
//! rows: the design's cross-products, its cross-products with the outcome, the outcome's
//! sum of squares and (the intercept's square) the number of rows. The products are summed
//! exactly in integers and rounded once to fixed point ([`FIXED_POINT`] per unit), so one
//! patient moves each number by at most `FIXED_POINT·|wᵢwⱼ| + 1`: L2 sensitivity
//! `FIXED_POINT·terms + √numbers`. The final side solves the normal equations.
//!
//! **Logistic (Newton's method over the network).** Every step is one signed request
//! naming the coefficients to evaluate at (the first at 0); the node releases its rows'
//! count, score `Σ x(y − p)` and information `Σ p(1 − p) x xᵀ` (upper triangle) at them,
//! each row's numbers rounded to fixed point. Since `|y − p| ≤ 1` and `p(1 − p) ≤ ¼`, the
//! L2 sensitivity is `FIXED_POINT·√(1 + d + d²/16) + ½√numbers` for `d` terms. The final
//! side takes the Newton step `β + I⁻¹U` and names it as the next step's coefficients; the
//! last step's is the estimate. Newton's map has zero derivative at the optimum, so the
//! earlier steps' noise leaves the estimate to first order, and the last step's noise is
//! what remains: it takes half of the fit's budget, the step before it a sixth
//! ([`renkei_protocol::query::fit_step_shares`]).
//!
//! **Uncertainty.** The standard errors add the sampling covariance (`s²(XᵀX)⁻¹` for a
//! linear fit, the inverse information for a logistic one) and the noise's (delta method:
//! with `E` the noise on the matrix and `e` on the vector, the error is `A⁻¹(e − Eβ)`, of
//! covariance `A⁻¹ σ²(I + ‖β‖²I + ββᵀ − diag β²) A⁻¹`); the noise's share is also reported
//! alone ([`Coefficient::noise_std_error`]), the interval for how far the estimate may lie
//! from the pooled, noiseless fit. A noisy matrix that is not positive definite (too few
//! patients for the covariates, or a covariate that does not vary) gives no estimate.

use renkei_protocol::query::{COEFFICIENT_SCALE, fit_step_shares};
use renkei_protocol::{Aggregate, Covariate, MaskedShape, Query, Release, TermScale};
use serde::Serialize;

use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Node, SchemaError};
use crate::cohort::Cohort;
use crate::column::NULL;
use crate::estimate::{Combined, Z_95};
use crate::image::Source;
use crate::schema::ColumnType;
use crate::truth::{PooledCohort, TrueValue};

/// Fixed-point units per unit of a released regression number (2^20).
pub const FIXED_POINT: f64 = 1_048_576.0;

/// Largest coefficient magnitude (on the scaled terms) a Newton step may reach: beyond it
/// the fit diverges (a covariate that separates the outcome), and the fit stops.
const DIVERGED: f64 = 30.0;

#[derive(Debug)]
pub(crate) struct LinearRegression;

#[derive(Debug)]
pub(crate) struct LogisticRegression;

/// How a term's value is read on a row.
#[derive(Debug)]
enum TermValue {
    /// A numeric or flag column, clamped to the term's bounds.
    Column(Source),
    /// 1 where the condition holds, 0 where it does not.
    Condition(Node),
}

#[derive(Debug)]
struct Term {
    value: TermValue,
    scale: TermScale,
}

/// The covariates of a fit, and every column and condition a row needs known for it to
/// count.
#[derive(Debug, Default)]
struct Design {
    terms: Vec<Term>,
    present: Vec<Source>,
    /// A logistic fit's outcome, which must be known too.
    outcome: Option<Node>,
}

impl Design {
    fn bind(binder: &mut Binder<'_>, covariates: &[Covariate]) -> Result<Self, SchemaError> {
        let mut design = Design::default();
        for covariate in covariates {
            match covariate {
                Covariate::Column(name) => {
                    let (source, scale) = column_term(binder, name)?;
                    design.present.push(source);
                    design.terms.push(Term {
                        value: TermValue::Column(source),
                        scale,
                    });
                }
                Covariate::Indicator(filter) => {
                    design.terms.push(Term {
                        value: TermValue::Condition(binder.filter(filter)?),
                        scale: TermScale::FLAG,
                    });
                }
            }
        }
        Ok(design)
    }

    /// Each term's column values and condition results over the cohort (each condition
    /// evaluated once: where it holds, and where it is known at all), the outcome's
    /// condition likewise, and which rows have every needed column and condition known.
    fn read<'c>(&self, cohort: &Cohort<'c>) -> Option<ReadDesign<'c>> {
        let rows = cohort.patient_rows()?;
        let present: Vec<_> = self.present.iter().map(|s| cohort.values(*s)).collect();
        let mut known = Vec::new();
        let mut decide = |node: &Node| {
            let (holds, mut decided) = cohort.decides(node);
            decided.or(&holds);
            known.push(decided);
            holds
        };
        let terms: Vec<ReadTerm<'c>> = self
            .terms
            .iter()
            .map(|term| match &term.value {
                TermValue::Column(source) => ReadTerm::Column(cohort.values(*source)),
                TermValue::Condition(node) => ReadTerm::Condition(decide(node)),
            })
            .collect();
        let outcome = self.outcome.as_ref().map(&mut decide);
        let complete = rows
            .iter()
            .filter(|&row| present.iter().all(|column| column.get(row) != NULL))
            .filter(|&row| known.iter().all(|k| k.contains(row)))
            .collect();
        Some(ReadDesign {
            terms,
            outcome,
            complete,
        })
    }
}

enum ReadTerm<'c> {
    Column(std::borrow::Cow<'c, crate::column::Column>),
    Condition(crate::bitset::Bitset),
}

struct ReadDesign<'c> {
    terms: Vec<ReadTerm<'c>>,
    /// Where a logistic fit's outcome holds.
    outcome: Option<crate::bitset::Bitset>,
    /// Rows with every needed column present.
    complete: Vec<usize>,
}

impl ReadDesign<'_> {
    /// A term's value on `row` as the integer `u` of `u / (high − low)` in `[-1, 1]`.
    fn numerator(&self, term: usize, scale: &TermScale, row: usize) -> i64 {
        match &self.terms[term] {
            ReadTerm::Column(values) => numerator(values.get(row), scale),
            ReadTerm::Condition(holds) => {
                if holds.contains(row) {
                    1
                } else {
                    -1
                }
            }
        }
    }
}

/// Widest range a term may span, in stored units: it keeps every product and sum exact
/// (`rows · width² · FIXED_POINT` stays far below 2^127 for any image's 2^32 rows).
const MAX_TERM_WIDTH: i128 = 1 << 32;

/// A value as the integer `u` of `u / (high − low)` in `[-1, 1]`, clamped to the bounds
/// first; exact, as the width is at most [`MAX_TERM_WIDTH`].
fn numerator(value: i64, scale: &TermScale) -> i64 {
    let value = i128::from(value.clamp(scale.low, scale.high));
    let u = 2 * value - i128::from(scale.low) - i128::from(scale.high);
    i64::try_from(u).unwrap_or(0)
}

/// A numeric or flag column as a term: its source and bounds.
fn column_term(binder: &Binder<'_>, name: &str) -> Result<(Source, TermScale), SchemaError> {
    let (source, def) = binder.column(name)?;
    match &def.kind {
        ColumnType::Boolean => Ok((source, TermScale::FLAG)),
        ColumnType::Categorical { .. } => Err(SchemaError::Value(format!(
            "`{name}` is {}; a regression takes it as a condition on one level, e.g. {name} = '…'",
            def.kind
        ))),
        ColumnType::Integer { .. } | ColumnType::Decimal { .. } => {
            let measure = binder.measure(name)?;
            if measure.high <= measure.low {
                return Err(SchemaError::Value(format!(
                    "`{name}` is declared with one value only; it cannot be a regression term"
                )));
            }
            let width = i128::from(measure.high) - i128::from(measure.low);
            if width > MAX_TERM_WIDTH {
                return Err(SchemaError::Value(format!(
                    "`{name}`'s declared range spans {width} stored units; a regression term may span at most 2^32 (narrower bounds or fewer decimal digits)"
                )));
            }
            Ok((
                source,
                TermScale {
                    low: measure.low,
                    high: measure.high,
                    scale: measure.scale,
                },
            ))
        }
    }
}

fn patient_level(binder: &Binder<'_>, query: &Query, what: &str) -> Result<(), SchemaError> {
    if binder.patient_view() {
        Ok(())
    } else {
        Err(SchemaError::Unsupported(format!(
            "{what} needs one row per patient: ask it of `patients` or of a WITH table over `{}`",
            query.view
        )))
    }
}

/// Numbers in the upper triangle of a `size × size` matrix.
fn triangle(size: usize) -> usize {
    size * (size + 1) / 2
}

// ---------------------------------------------------------------------------------------
// Linear regression.

#[derive(Debug)]
struct LinearFit {
    design: Design,
    outcome: Source,
    outcome_scale: TermScale,
}

impl LinearFit {
    /// Terms of `w`: the intercept, the covariates, the outcome.
    fn size(&self) -> usize {
        self.design.terms.len() + 2
    }

    fn scales(&self) -> Vec<TermScale> {
        self.design
            .terms
            .iter()
            .map(|t| t.scale)
            .chain(std::iter::once(self.outcome_scale))
            .collect()
    }
}

impl Statistic for LinearRegression {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        let Aggregate::LinearRegression {
            outcome,
            covariates,
        } = &query.aggregate
        else {
            return Err(SchemaError::Unsupported("not a linear regression".into()));
        };
        patient_level(binder, query, "LINEAR_REGRESSION")?;
        let mut design = Design::bind(binder, covariates)?;
        let (outcome, outcome_scale) = column_term(binder, outcome)?;
        design.present.push(outcome);
        Ok(Box::new(LinearFit {
            design,
            outcome,
            outcome_scale,
        }))
    }

    fn combine(&self, query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let Aggregate::LinearRegression { covariates, .. } = &query.aggregate else {
            return Combined::none("not a linear regression");
        };
        let size = covariates.len() + 2;
        let (scales, totals, variance) =
            match network_totals(sites, covariates.len() + 1, triangle(size)) {
                Ok(read) => read,
                Err(note) => return Combined::none(note),
            };
        let moments = symmetric(&totals, size);
        match fit_linear(&moments, variance, &scales, &term_names(covariates)) {
            // Noise larger than what the model leaves unexplained: say what that means.
            Ok(fit) if fit.residual_std == Some(0.0) && variance > 0.0 => Combined {
                note: Some(
                    "the noisy residual sum of squares fell to 0 or below (the noise outweighs what the model leaves unexplained): the residual sd and the sampling part of the standard errors could not be estimated, so the intervals hold the noise only; ask with more rho or more patients"
                        .into(),
                ),
                ..with_regression(fit)
            },
            Ok(fit) => with_regression(fit),
            Err(note) => Combined::none(note),
        }
    }

    fn pooled(&self, _query: &Query, cohort: &PooledCohort) -> TrueValue {
        let rows = complete_rows(cohort);
        let Some(width) = rows.first().map(|r| r.len()) else {
            return TrueValue::Nothing;
        };
        // Σ w wᵀ in the columns' own units, then the normal equations.
        let size = width + 1;
        let mut moments = vec![vec![0.0; size]; size];
        for row in &rows {
            let w: Vec<f64> = std::iter::once(1.0)
                .chain(row[1..].iter().copied())
                .chain(std::iter::once(row[0]))
                .collect();
            for i in 0..size {
                for j in 0..size {
                    moments[i][j] += w[i] * w[j];
                }
            }
        }
        let p = size - 1;
        let a: Vec<Vec<f64>> = moments[..p].iter().map(|r| r[..p].to_vec()).collect();
        let b: Vec<f64> = moments[..p].iter().map(|r| r[p]).collect();
        match Cholesky::of(&a) {
            Some(chol) => TrueValue::Coefficients(chol.solve(&b)),
            None => TrueValue::Nothing,
        }
    }
}

impl Accumulator for LinearFit {
    fn parts(&self) -> Vec<Part> {
        let size = self.size();
        vec![Part {
            sensitivity: FIXED_POINT * size as f64 + (triangle(size) as f64).sqrt(),
            len: triangle(size),
            counts: false,
        }]
    }

    fn value_scale(&self) -> u8 {
        0
    }

    fn vector(&self) -> bool {
        true
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let size = self.size();
        let mut sums = vec![0i128; triangle(size)];
        let scales = self.scales();
        // Denominators of w: 1 for the intercept, high − low for the others.
        let widths: Vec<i128> = std::iter::once(1)
            .chain(
                scales
                    .iter()
                    .map(|s| i128::from(s.high) - i128::from(s.low)),
            )
            .collect();
        if let Some(read) = self.design.read(cohort) {
            let outcome = cohort.values(self.outcome);
            let k = self.design.terms.len();
            let mut w = vec![0i128; size];
            for &row in &read.complete {
                w[0] = 1;
                for (t, term) in self.design.terms.iter().enumerate() {
                    w[t + 1] = i128::from(read.numerator(t, &term.scale, row));
                }
                let scale = &self.outcome_scale;
                let y = outcome.get(row);
                w[k + 1] = i128::from(numerator(y, scale));
                let mut at = 0;
                for i in 0..size {
                    for j in i..size {
                        sums[at] += w[i] * w[j];
                        at += 1;
                    }
                }
            }
        }
        // Rounded once: Q · Σ uᵢuⱼ / (wᵢwⱼ), to the nearest integer.
        let q = FIXED_POINT as i128;
        let mut values = Vec::with_capacity(sums.len());
        let mut at = 0;
        for i in 0..size {
            for j in i..size {
                values.push(round_ratio(sums[at] * q, widths[i] * widths[j]));
                at += 1;
            }
        }
        Exact(vec![values])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        sums_release(self.scales(), noisy)
    }

    fn masked_shape(&self) -> MaskedShape {
        sums_shape(self.scales(), triangle(self.size()))
    }
}

/// `numerator / denominator` to the nearest integer (halves away from 0), saturating.
fn round_ratio(numerator: i128, denominator: i128) -> i64 {
    let half = denominator / 2;
    let rounded = if numerator >= 0 {
        (numerator + half) / denominator
    } else {
        (numerator - half) / denominator
    };
    i64::try_from(rounded).unwrap_or(if rounded > 0 { i64::MAX } else { i64::MIN })
}

/// The linear fit from the network's noisy `Σ w wᵀ` (last term the outcome) with noise
/// variance `variance` per number.
fn fit_linear(
    moments: &[Vec<f64>],
    variance: f64,
    scales: &[TermScale],
    names: &[String],
) -> Result<Regression, String> {
    let size = moments.len();
    let p = size - 1;
    let a: Vec<Vec<f64>> = moments[..p].iter().map(|r| r[..p].to_vec()).collect();
    let b: Vec<f64> = moments[..p].iter().map(|r| r[p]).collect();
    let c = moments[p][p];
    let n = a[0][0];
    let chol = Cholesky::of(&a).ok_or_else(|| not_definite(n, p - 1, "cross-product"))?;
    let gamma = chol.solve(&b);
    let dof = n - p as f64;
    if dof < 1.0 {
        return Err(not_definite(n, p - 1, "cross-product"));
    }
    let residual = (c - dot(&gamma, &b)).max(0.0);
    let s2 = residual / dof;
    let inverse = chol.inverse();
    let sampling: Vec<Vec<f64>> = inverse
        .iter()
        .map(|r| r.iter().map(|v| v * s2).collect())
        .collect();
    let noise = noise_covariance(&inverse, &gamma, variance);
    let (outcome_center, outcome_half) = scales[p - 1].center_and_half();
    let transform = unscaling(&scales[..p - 1], outcome_half);
    let mut estimate = apply(&transform, &gamma);
    estimate[0] += outcome_center;
    Ok(Regression {
        model: Model::Linear,
        coefficients: coefficients(
            names,
            &estimate,
            &sandwich(&transform, &sampling),
            &sandwich(&transform, &noise),
            false,
        ),
        patients: n,
        residual_std: Some(s2.sqrt() * outcome_half),
        iterations: 1,
        steps: 1,
        converged: true,
        noise_std: variance.sqrt(),
        next_step: None,
    })
}

// ---------------------------------------------------------------------------------------
// Logistic regression.

#[derive(Debug)]
struct LogisticFit {
    /// The covariates, and the outcome's condition (always set here).
    design: Design,
    /// The coefficients this step evaluates at, on the scaled terms, intercept first.
    at: Vec<f64>,
}

impl LogisticFit {
    /// Terms of `x`: the intercept and the covariates.
    fn terms(&self) -> usize {
        self.design.terms.len() + 1
    }

    fn numbers(terms: usize) -> usize {
        1 + terms + triangle(terms)
    }

    fn scales(&self) -> Vec<TermScale> {
        self.design.terms.iter().map(|t| t.scale).collect()
    }
}

/// A step's coefficients as numbers (all 0 when the step names none).
fn step_coefficients(coefficients: &[i64], terms: usize) -> Vec<f64> {
    if coefficients.is_empty() {
        vec![0.0; terms]
    } else {
        coefficients
            .iter()
            .map(|c| *c as f64 / COEFFICIENT_SCALE)
            .collect()
    }
}

impl Statistic for LogisticRegression {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        let Aggregate::LogisticRegression {
            outcome,
            covariates,
            step,
            ..
        } = &query.aggregate
        else {
            return Err(SchemaError::Unsupported("not a logistic regression".into()));
        };
        patient_level(binder, query, "LOGISTIC_REGRESSION")?;
        let mut design = Design::bind(binder, covariates)?;
        design.outcome = Some(binder.filter(outcome)?);
        Ok(Box::new(LogisticFit {
            at: step_coefficients(&step.coefficients, design.terms.len() + 1),
            design,
        }))
    }

    fn combine(&self, query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let Aggregate::LogisticRegression {
            covariates,
            iterations,
            step,
            ..
        } = &query.aggregate
        else {
            return Combined::none("not a logistic regression");
        };
        let terms = covariates.len() + 1;
        let (scales, totals, variance) =
            match network_totals(sites, covariates.len(), LogisticFit::numbers(terms)) {
                Ok(read) => read,
                Err(note) => return Combined::none(note),
            };
        let at = step_coefficients(&step.coefficients, terms);
        let last = step.iteration.saturating_add(1) >= *iterations;
        match newton_step(
            &totals,
            variance,
            &at,
            &scales,
            &term_names(covariates),
            (step.iteration, *iterations, last),
        ) {
            Ok(fit) => with_regression(fit),
            Err(note) => Combined::none(note),
        }
    }

    fn pooled(&self, _query: &Query, cohort: &PooledCohort) -> TrueValue {
        let rows = complete_rows(cohort);
        let Some(width) = rows.first().map(|r| r.len()) else {
            return TrueValue::Nothing;
        };
        // Iteratively reweighted least squares to convergence, in the columns' units.
        let mut beta = vec![0.0; width];
        for _ in 0..100 {
            let mut score = vec![0.0; width];
            let mut information = vec![vec![0.0; width]; width];
            for row in &rows {
                let x: Vec<f64> = std::iter::once(1.0)
                    .chain(row[1..].iter().copied())
                    .collect();
                let p = sigmoid(dot(&beta, &x));
                for i in 0..width {
                    score[i] += x[i] * (row[0] - p);
                    for j in 0..width {
                        information[i][j] += p * (1.0 - p) * x[i] * x[j];
                    }
                }
            }
            let Some(chol) = Cholesky::of(&information) else {
                return TrueValue::Nothing;
            };
            let change = chol.solve(&score);
            for (b, d) in beta.iter_mut().zip(&change) {
                *b += d;
            }
            if change.iter().all(|d| d.abs() < 1e-12) {
                break;
            }
        }
        TrueValue::Coefficients(beta)
    }
}

impl Accumulator for LogisticFit {
    fn parts(&self) -> Vec<Part> {
        let d = self.terms() as f64;
        let numbers = Self::numbers(self.terms());
        vec![Part {
            sensitivity: FIXED_POINT * (1.0 + d + d * d / 16.0).sqrt()
                + 0.5 * (numbers as f64).sqrt(),
            len: numbers,
            counts: false,
        }]
    }

    fn value_scale(&self) -> u8 {
        0
    }

    fn vector(&self) -> bool {
        true
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let d = self.terms();
        let mut values = vec![0i64; Self::numbers(d)];
        let fixed = |v: f64| (v * FIXED_POINT).round() as i64;
        if let Some(read) = self.design.read(cohort) {
            let widths: Vec<f64> = self
                .design
                .terms
                .iter()
                .map(|t| (i128::from(t.scale.high) - i128::from(t.scale.low)) as f64)
                .collect();
            let mut x = vec![0.0; d];
            for &row in &read.complete {
                x[0] = 1.0;
                for (t, term) in self.design.terms.iter().enumerate() {
                    x[t + 1] = read.numerator(t, &term.scale, row) as f64 / widths[t];
                }
                let p = sigmoid(dot(&self.at, &x));
                let y = if read.outcome.as_ref().is_some_and(|o| o.contains(row)) {
                    1.0
                } else {
                    0.0
                };
                let weight = p * (1.0 - p);
                values[0] += fixed(1.0);
                for i in 0..d {
                    values[1 + i] += fixed(x[i] * (y - p));
                }
                let mut at = 1 + d;
                for i in 0..d {
                    for j in i..d {
                        values[at] += fixed(weight * x[i] * x[j]);
                        at += 1;
                    }
                }
            }
        }
        Exact(vec![values])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        sums_release(self.scales(), noisy)
    }

    fn masked_shape(&self) -> MaskedShape {
        sums_shape(self.scales(), Self::numbers(self.terms()))
    }
}

/// One Newton step from the network's noisy count, score and information at `at` (scaled
/// terms); `progress` is (this step, the fit's steps, whether it is the last).
fn newton_step(
    totals: &[f64],
    variance: f64,
    at: &[f64],
    scales: &[TermScale],
    names: &[String],
    progress: (u8, u8, bool),
) -> Result<Regression, String> {
    let (step, iterations, last) = progress;
    let d = at.len();
    let n = totals[0];
    let score = &totals[1..=d];
    let information = symmetric(&totals[1 + d..], d);
    // Before the last step the matrix is guarded (so a noisy one that is not positive
    // definite may still point the way); the last step's must be, as it stands.
    let information = if last {
        information
    } else {
        guarded(&information, variance)
    };
    let chol = Cholesky::of(&information).ok_or_else(|| not_definite(n, d - 1, "information"))?;
    let mut change = chol.solve(score);
    if !last {
        shorten(&mut change);
    }
    let next: Vec<f64> = at.iter().zip(&change).map(|(b, c)| b + c).collect();
    if next.iter().any(|b| !b.is_finite() || b.abs() > DIVERGED) {
        return Err(format!(
            "the fit diverges at step {} of {iterations} (a covariate that separates the outcome, or too few events); nothing is estimated",
            step + 1
        ));
    }
    let inverse = chol.inverse();
    let noise = noise_covariance(&inverse, &change, variance);
    // Converged: the step moved no coefficient further than the noise explains, its own
    // and the previous step's (which the coefficients it started from carry; its share of
    // the budget was smaller, so its variance larger by the ratio of the shares).
    let shares = fit_step_shares(iterations);
    let carried = match usize::from(step) {
        0 => 0.0,
        k => match (shares.get(k), shares.get(k - 1)) {
            (Some(now), Some(before)) if *before > 0 => *now as f64 / *before as f64,
            _ => 0.0,
        },
    };
    // Each row's numbers were rounded to fixed point: a uniform error of variance 1/12 per
    // row and number, which a noiseless fit's last step also moves by.
    let rounding = noise_covariance(&inverse, &change, n.max(1.0) / (12.0 * FIXED_POINT.powi(2)));
    let converged = step > 0
        && change.iter().zip(0..d).all(|(c, i)| {
            let spread = (1.0 + carried) * noise[i][i] + rounding[i][i];
            c.abs() <= 3.0 * spread.sqrt() + 1e-6 * (1.0 + next[i].abs())
        });
    let transform = unscaling(scales, 1.0);
    Ok(Regression {
        model: Model::Logistic,
        coefficients: coefficients(
            names,
            &apply(&transform, &next),
            &sandwich(&transform, &inverse),
            &sandwich(&transform, &noise),
            true,
        ),
        patients: n,
        residual_std: None,
        iterations,
        steps: step.saturating_add(1),
        converged,
        noise_std: variance.sqrt(),
        next_step: (!last).then(|| {
            next.iter()
                .map(|b| (b * COEFFICIENT_SCALE).round() as i64)
                .collect()
        }),
    })
}

/// Largest change a step before the last may make to a coefficient on the scaled terms.
const MAX_STEP: f64 = 2.0;

/// The information matrix of a step before the last, guarded against its noise: plus
/// `2σ√d` on its diagonal (about the spectral norm of the noise a symmetric matrix of `d`
/// rows with noise `σ` per number carries), so a direction the noise nearly flattened, or
/// turned negative, is not taken as one with no curvature. This does not change where the
/// steps stop (where the score is 0); the last step is a plain Newton step, whose noise
/// the standard errors describe.
fn guarded(information: &[Vec<f64>], variance: f64) -> Vec<Vec<f64>> {
    let d = information.len();
    let ridge = 2.0 * variance.sqrt() * (d as f64).sqrt();
    information
        .iter()
        .enumerate()
        .map(|(i, row)| {
            row.iter()
                .enumerate()
                .map(|(j, v)| if i == j { v + ridge } else { *v })
                .collect()
        })
        .collect()
}

/// A step before the last, shortened so no coefficient moves by more than [`MAX_STEP`].
fn shorten(change: &mut [f64]) {
    let longest = change.iter().fold(0f64, |m, c| m.max(c.abs()));
    if longest > MAX_STEP {
        for c in change.iter_mut() {
            *c *= MAX_STEP / longest;
        }
    }
}

fn sigmoid(eta: f64) -> f64 {
    1.0 / (1.0 + (-eta).exp())
}

// ---------------------------------------------------------------------------------------
// Shared by both fits.

/// A fit's one noisy part in its wire form, with the terms' scaling.
fn sums_release(terms: Vec<TermScale>, noisy: Vec<NoisyPart>) -> Release {
    Release::Regression {
        terms,
        values: noisy
            .into_iter()
            .next()
            .map(|p| p.values)
            .unwrap_or_default(),
    }
}

/// What a fit's masked words add up to: `numbers` sums over terms scaled by `terms`.
fn sums_shape(terms: Vec<TermScale>, numbers: usize) -> MaskedShape {
    MaskedShape::Regression {
        terms,
        values: u32::try_from(numbers).unwrap_or(u32::MAX),
    }
}

/// The nodes' releases added up: their terms' scaling (which every node must state
/// alike), the summed numbers and the summed noise variance per number, both out of fixed
/// point.
fn network_totals(
    sites: &[SiteRelease<'_>],
    scaled_terms: usize,
    numbers: usize,
) -> Result<(Vec<TermScale>, Vec<f64>, f64), String> {
    let mut scales: Option<&Vec<TermScale>> = None;
    let mut totals = vec![0.0; numbers];
    let mut variance = 0.0;
    for site in sites {
        let Release::Regression { terms, values } = site.release else {
            return Err("a node released something else than a regression's sums".into());
        };
        if values.len() != numbers || terms.len() != scaled_terms {
            return Err("a node's regression sums do not have the query's shape".into());
        }
        match scales {
            Some(first) if first != terms => {
                return Err(
                    "the nodes scale the terms differently (their schemas declare other bounds)"
                        .into(),
                );
            }
            Some(_) => {}
            None => scales = Some(terms),
        }
        for (total, value) in totals.iter_mut().zip(values) {
            *total += *value as f64 / FIXED_POINT;
        }
        variance += (site.noise_std / FIXED_POINT).powi(2);
    }
    let scales = scales
        .cloned()
        .ok_or_else(|| "no node released a regression".to_string())?;
    Ok((scales, totals, variance))
}

/// The symmetric `size × size` matrix of an upper triangle (row by row).
#[allow(clippy::needless_range_loop)] // (i, j) index both halves of the matrix.
fn symmetric(upper: &[f64], size: usize) -> Vec<Vec<f64>> {
    let mut matrix = vec![vec![0.0; size]; size];
    let mut at = 0;
    for i in 0..size {
        for j in i..size {
            let value = upper.get(at).copied().unwrap_or(0.0);
            matrix[i][j] = value;
            matrix[j][i] = value;
            at += 1;
        }
    }
    matrix
}

fn not_definite(n: f64, covariates: usize, what: &str) -> String {
    format!(
        "the noisy {what} matrix is not positive definite: too few patients (about {}) for {covariates} covariate(s), or a covariate that does not vary among them; nothing is estimated",
        n.round().max(0.0)
    )
}

/// The noise's covariance in the solution `A⁻¹v` of a system whose matrix and vector both
/// carry independent noise of variance `variance` per released number (in the solution's
/// units): `A⁻¹ σ²(I + ‖β‖²I + ββᵀ − diag β²) A⁻¹`.
fn noise_covariance(inverse: &[Vec<f64>], beta: &[f64], variance: f64) -> Vec<Vec<f64>> {
    let d = beta.len();
    let norm = dot(beta, beta);
    let middle: Vec<Vec<f64>> = (0..d)
        .map(|i| {
            (0..d)
                .map(|j| {
                    let diagonal = if i == j { 1.0 + norm } else { 0.0 };
                    let cross = if i == j { 0.0 } else { beta[i] * beta[j] };
                    variance * (diagonal + cross)
                })
                .collect()
        })
        .collect();
    sandwich(inverse, &middle)
}

/// The linear map from coefficients on the scaled terms to the columns' units (the
/// outcome's half-width `outcome_half`; its centre is added to the intercept apart).
fn unscaling(scales: &[TermScale], outcome_half: f64) -> Vec<Vec<f64>> {
    let d = scales.len() + 1;
    let mut map = vec![vec![0.0; d]; d];
    map[0][0] = outcome_half;
    for (i, scale) in scales.iter().enumerate() {
        let (center, half) = scale.center_and_half();
        map[i + 1][i + 1] = outcome_half / half;
        map[0][i + 1] = -outcome_half * center / half;
    }
    map
}

fn apply(matrix: &[Vec<f64>], vector: &[f64]) -> Vec<f64> {
    matrix.iter().map(|row| dot(row, vector)).collect()
}

/// `M C Mᵀ`.
fn sandwich(m: &[Vec<f64>], c: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let d = m.len();
    let mc: Vec<Vec<f64>> = (0..d)
        .map(|i| {
            (0..d)
                .map(|j| (0..d).map(|k| m[i][k] * c[k][j]).sum())
                .collect()
        })
        .collect();
    (0..d)
        .map(|i| {
            (0..d)
                .map(|j| (0..d).map(|k| mc[i][k] * m[j][k]).sum())
                .collect()
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The terms' names, intercept first.
fn term_names(covariates: &[Covariate]) -> Vec<String> {
    std::iter::once("intercept".to_string())
        .chain(covariates.iter().map(ToString::to_string))
        .collect()
}

fn coefficients(
    names: &[String],
    estimate: &[f64],
    sampling: &[Vec<f64>],
    noise: &[Vec<f64>],
    odds: bool,
) -> Vec<Coefficient> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let noise_std_error = noise[i][i].max(0.0).sqrt();
            let std_error = (sampling[i][i].max(0.0) + noise[i][i].max(0.0)).sqrt();
            let ci95 = [
                estimate[i] - Z_95 * std_error,
                estimate[i] + Z_95 * std_error,
            ];
            // No spread (a noiseless fit of data that fit exactly): no test to report.
            let z = if std_error > 0.0 {
                estimate[i] / std_error
            } else {
                f64::NAN
            };
            Coefficient {
                term: name.clone(),
                estimate: estimate[i],
                std_error,
                noise_std_error,
                ci95,
                p_value: if z.is_nan() {
                    f64::NAN
                } else {
                    2.0 * normal_upper_tail(z.abs())
                },
                odds_ratio: (odds && i > 0).then(|| estimate[i].exp()),
                odds_ratio_ci95: (odds && i > 0).then(|| [ci95[0].exp(), ci95[1].exp()]),
            }
        })
        .collect()
}

/// `P(Z > z)` for a standard normal `Z` (W. J. Cody's rational erfc, via Numerical
/// Recipes' `erfcc`: relative error below 1.2e-7).
fn normal_upper_tail(z: f64) -> f64 {
    if !z.is_finite() {
        return if z > 0.0 { 0.0 } else { 1.0 };
    }
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let poly = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    0.5 * if x >= 0.0 { erfc } else { 2.0 - erfc }
}

/// The pooled rows of a fit with every term present: outcome first, then the covariates.
fn complete_rows(cohort: &PooledCohort) -> Vec<Vec<f64>> {
    cohort
        .patients
        .iter()
        .filter_map(|rows| rows.first())
        .filter_map(|row| row.terms.iter().copied().collect::<Option<Vec<f64>>>())
        .filter(|terms| !terms.is_empty())
        .collect()
}

fn with_regression(fit: Regression) -> Combined {
    Combined {
        regression: Some(fit),
        ..Combined::default()
    }
}

/// A Cholesky factor `L` (`A = L Lᵀ`) of a symmetric positive definite matrix.
struct Cholesky(Vec<Vec<f64>>);

impl Cholesky {
    fn of(a: &[Vec<f64>]) -> Option<Self> {
        let d = a.len();
        let mut l = vec![vec![0.0; d]; d];
        for i in 0..d {
            for j in 0..=i {
                let sum: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
                if i == j {
                    let pivot = a[i][i] - sum;
                    // Relative to the diagonal, so rounding in a nearly singular matrix
                    // is not taken for a direction with information.
                    if pivot.is_nan() || pivot <= 1e-10 * a[i][i].abs().max(f64::MIN_POSITIVE) {
                        return None;
                    }
                    l[i][i] = pivot.sqrt();
                } else {
                    l[i][j] = (a[i][j] - sum) / l[j][j];
                }
            }
        }
        Some(Self(l))
    }

    fn solve(&self, b: &[f64]) -> Vec<f64> {
        let l = &self.0;
        let d = l.len();
        let mut y = vec![0.0; d];
        for i in 0..d {
            let sum: f64 = (0..i).map(|k| l[i][k] * y[k]).sum();
            y[i] = (b[i] - sum) / l[i][i];
        }
        let mut x = vec![0.0; d];
        for i in (0..d).rev() {
            let sum: f64 = (i + 1..d).map(|k| l[k][i] * x[k]).sum();
            x[i] = (y[i] - sum) / l[i][i];
        }
        x
    }

    fn inverse(&self) -> Vec<Vec<f64>> {
        let d = self.0.len();
        let columns: Vec<Vec<f64>> = (0..d)
            .map(|j| {
                let unit: Vec<f64> = (0..d).map(|i| f64::from(u8::from(i == j))).collect();
                self.solve(&unit)
            })
            .collect();
        (0..d)
            .map(|i| (0..d).map(|j| columns[j][i]).collect())
            .collect()
    }
}

/// Which fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    Linear,
    Logistic,
}

/// One coefficient of a fit, in its column's units (per unit, per level of a flag or
/// condition).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coefficient {
    /// `intercept`, or the covariate as the query names it.
    pub term: String,
    pub estimate: f64,
    /// Sampling and noise together.
    pub std_error: f64,
    /// The noise's share alone: how far the estimate may lie from the pooled fit.
    pub noise_std_error: f64,
    pub ci95: [f64; 2],
    /// Two-sided, of the hypothesis that the coefficient is 0 (normal approximation).
    pub p_value: f64,
    /// A logistic fit's `exp(estimate)`, with its interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub odds_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub odds_ratio_ci95: Option<[f64; 2]>,
}

/// A fitted regression, or where a logistic fit stands after one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regression {
    pub model: Model,
    pub coefficients: Vec<Coefficient>,
    /// The (noisy) number of patients with every term present.
    pub patients: f64,
    /// A linear fit's residual standard deviation, in the outcome's units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_std: Option<f64>,
    /// Steps the fit declared (and was charged for).
    pub iterations: u8,
    /// Steps run.
    pub steps: u8,
    /// Whether the last step moved no coefficient further than its noise explains.
    pub converged: bool,
    /// Noise standard deviation of each released number (summed over the nodes), in units
    /// of the scaled design.
    pub noise_std: f64,
    /// The coefficients the next step is to be evaluated at (a logistic fit before its last
    /// step), as [`renkei_protocol::FitStep::coefficients`].
    #[serde(skip)]
    pub next_step: Option<Vec<i64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use rand::{Rng, SeedableRng};
    use renkei_protocol::{CmpOp, Filter, FitStep, Literal};

    use super::super::shared::standard_normal;
    use super::super::traits::Statistic;
    use crate::image::{Dataset, ImageBuilder};
    use crate::schema::{DatasetSchema, SECONDARY_USE};
    use crate::truth::PooledRow;

    const SCHEMA: &str = r#"
name = "fit"
version = 1
max_timepoints_per_patient = 1

[[patients]]
name = "age"
type = "integer"
min = 0
max = 100

[[patients]]
name = "sex"
type = "categorical"
levels = ["female", "male"]

[[patients]]
name = "diabetes"
type = "boolean"

[[patients]]
name = "bmi"
type = "decimal"
min = 10.0
max = 60.0
scale = 1

[[patients]]
name = "severe"
type = "boolean"

[[timepoints]]
name = "crp"
type = "integer"
min = 0
max = 10
"#;

    /// True log-odds of `severe`: intercept, per year of age, diabetes, male.
    const TRUE_LOGIT: [f64; 4] = [-4.0, 0.05, 0.8, 0.5];

    /// (age, sex level, diabetes, bmi in tenths or NULL, severe).
    fn cohort(n: usize, seed: u64) -> Vec<[i64; 5]> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let age: i64 = rng.gen_range(18..95);
                let male = i64::from(rng.gen_bool(0.5));
                let diabetes = i64::from(rng.gen_bool(0.1 + 0.003 * age as f64));
                // BMI: 22 + 0.05 per year + 3 with diabetes, noise sd 3; sometimes missing.
                let bmi = if rng.gen_bool(0.05) {
                    NULL
                } else {
                    let value = 22.0
                        + 0.05 * age as f64
                        + 3.0 * diabetes as f64
                        + 3.0 * standard_normal(&mut rng);
                    (value.clamp(10.0, 60.0) * 10.0).round() as i64
                };
                let eta = TRUE_LOGIT[0]
                    + TRUE_LOGIT[1] * age as f64
                    + TRUE_LOGIT[2] * diabetes as f64
                    + TRUE_LOGIT[3] * male as f64;
                let severe = i64::from(rng.gen_bool(sigmoid(eta)));
                [age, male, diabetes, bmi, severe]
            })
            .collect()
    }

    fn image(rows: &[[i64; 5]]) -> Dataset {
        let schema = Arc::new(DatasetSchema::from_toml(SCHEMA).unwrap());
        let mut image = ImageBuilder::new(schema);
        let mut columns = vec![Vec::new(); 5];
        for row in rows {
            image.add_patient([SECONDARY_USE]).unwrap();
            for (column, value) in columns.iter_mut().zip(row) {
                column.push(*value);
            }
        }
        image.extend_patient_columns(&columns);
        image.finish()
    }

    fn male() -> Covariate {
        Covariate::Indicator(Filter::eq("sex", Literal::Text("male".into())))
    }

    fn linear() -> Query {
        Query {
            aggregate: Aggregate::LinearRegression {
                outcome: "bmi".into(),
                covariates: vec![
                    Covariate::Column("age".into()),
                    Covariate::Column("diabetes".into()),
                    male(),
                ],
            },
            ..Query::count_patients("patients", Filter::True)
        }
    }

    fn logistic(step: FitStep) -> Query {
        Query {
            aggregate: Aggregate::LogisticRegression {
                outcome: Filter::eq("severe", Literal::Bool(true)),
                covariates: vec![
                    Covariate::Column("age".into()),
                    Covariate::Column("diabetes".into()),
                    male(),
                ],
                iterations: 8,
                step,
            },
            ..Query::count_patients("patients", Filter::True)
        }
    }

    /// The pooled rows as the truth reads them: outcome, then age, diabetes, male.
    fn pooled_rows(rows: &[[i64; 5]], linear: bool) -> PooledCohort {
        PooledCohort {
            patients: rows
                .iter()
                .map(|r| {
                    let outcome = if linear {
                        (r[3] != NULL).then(|| r[3] as f64 / 10.0)
                    } else {
                        Some(r[4] as f64)
                    };
                    vec![PooledRow {
                        value: None,
                        cell: None,
                        event: false,
                        terms: vec![
                            outcome,
                            Some(r[0] as f64),
                            Some(r[2] as f64),
                            Some(r[1] as f64),
                        ],
                    }]
                })
                .collect(),
        }
    }

    fn exact(data: &Dataset, query: &Query) -> Release {
        let compiled = data.compile(query).unwrap();
        compiled.unnoised_release(data.evaluate(&compiled))
    }

    fn site(release: &Release, sd: f64) -> SiteRelease<'_> {
        SiteRelease {
            release,
            value_scale: 0,
            min_cell_size: 0,
            noise_std: sd,
            count_noise_std: None,
        }
    }

    fn estimates(fit: &Regression) -> Vec<f64> {
        fit.coefficients.iter().map(|c| c.estimate).collect()
    }

    /// Runs a logistic fit to its last step on noiseless releases split over `sites`.
    fn noiseless_logistic(sites: &[Dataset]) -> Regression {
        noiseless_logistic_to(sites, u8::MAX).1
    }

    /// As [`noiseless_logistic`], stopping after `steps` steps: the query of the step that
    /// would come next (or of the last), and the fit so far.
    fn noiseless_logistic_to(sites: &[Dataset], steps: u8) -> (Query, Regression) {
        let mut query = logistic(FitStep::default());
        let mut done = 0;
        loop {
            let releases: Vec<Release> = sites.iter().map(|d| exact(d, &query)).collect();
            let views: Vec<SiteRelease<'_>> = releases.iter().map(|r| site(r, 0.0)).collect();
            let fit = LogisticRegression
                .combine(&query, &views)
                .regression
                .expect("a fit");
            done += 1;
            match fit.next_step.clone() {
                Some(next) => {
                    query.advance_fit(renkei_protocol::RequestId([1; 16]), next);
                    if done == steps {
                        return (query, fit);
                    }
                }
                None => return (query, fit),
            }
        }
    }

    #[test]
    fn a_noiseless_linear_fit_is_the_pooled_least_squares_fit() {
        let rows = cohort(3_000, 1);
        // Three hospitals' shares of one pooled cohort.
        let sites: Vec<Dataset> = rows.chunks(1_000).map(image).collect();
        let releases: Vec<Release> = sites.iter().map(|d| exact(d, &linear())).collect();
        let views: Vec<SiteRelease<'_>> = releases.iter().map(|r| site(r, 0.0)).collect();
        let combined = LinearRegression.combine(&linear(), &views);
        let fit = combined.regression.expect("a fit");
        let TrueValue::Coefficients(truth) =
            LinearRegression.pooled(&linear(), &pooled_rows(&rows, true))
        else {
            panic!("no pooled fit");
        };
        for (ours, theirs) in estimates(&fit).iter().zip(&truth) {
            assert!(
                (ours - theirs).abs() < 1e-6 * (1.0 + theirs.abs()),
                "{ours} vs {theirs}"
            );
        }
        // The generator's slopes: 0.05 per year, 3 with diabetes, nothing for sex.
        assert!((fit.coefficients[1].estimate - 0.05).abs() < 4.0 * fit.coefficients[1].std_error);
        assert!((fit.coefficients[2].estimate - 3.0).abs() < 4.0 * fit.coefficients[2].std_error);
        assert!(fit.coefficients[3].estimate.abs() < 4.0 * fit.coefficients[3].std_error);
        // Patients with a BMI: about 95%, counted exactly without noise.
        let present = rows.iter().filter(|r| r[3] != NULL).count() as f64;
        assert!((fit.patients - present).abs() < 1e-3);
        assert!((fit.residual_std.unwrap() - 3.0).abs() < 0.2);
        assert!(fit.coefficients.iter().all(|c| c.noise_std_error == 0.0));
    }

    #[test]
    fn noiseless_newton_steps_reach_the_pooled_logistic_fit() {
        let rows = cohort(20_000, 2);
        let sites: Vec<Dataset> = rows.chunks(7_000).map(image).collect();
        let fit = noiseless_logistic(&sites);
        assert_eq!((fit.steps, fit.iterations), (8, 8));
        assert!(fit.converged);
        let TrueValue::Coefficients(truth) =
            LogisticRegression.pooled(&logistic(FitStep::default()), &pooled_rows(&rows, false))
        else {
            panic!("no pooled fit");
        };
        for (ours, theirs) in estimates(&fit).iter().zip(&truth) {
            assert!(
                (ours - theirs).abs() < 1e-6 * (1.0 + theirs.abs()),
                "{ours} vs {theirs}"
            );
        }
        // The generator's log-odds (intercept, age, diabetes, male), within 4 standard errors.
        let [intercept, age, diabetes, male] = TRUE_LOGIT;
        for (c, want) in fit
            .coefficients
            .iter()
            .zip([intercept, age, diabetes, male])
        {
            assert!(
                (c.estimate - want).abs() < 4.0 * c.std_error,
                "{c:?} vs {want}"
            );
        }
        let diabetes = &fit.coefficients[2];
        assert_eq!(diabetes.odds_ratio, Some(diabetes.estimate.exp()));
        assert!(fit.coefficients[0].odds_ratio.is_none());
    }

    /// The L2 distance between two releases' numbers.
    fn distance(a: &Release, b: &Release) -> f64 {
        let (Release::Regression { values: a, .. }, Release::Regression { values: b, .. }) = (a, b)
        else {
            panic!("not regressions");
        };
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn one_patient_moves_a_release_by_at_most_its_sensitivity() {
        let rows = cohort(500, 3);
        let step = FitStep {
            fit: Some(renkei_protocol::RequestId([1; 16])),
            iteration: 1,
            coefficients: vec![-2_000_000, 0, 0, 0],
        };
        // Patients at the bounds and beyond them (clamped), each added to the cohort.
        for extreme in [[100, 1, 1, 600, 1], [0, 0, 0, 100, 0], [100, 0, 1, 100, 0]] {
            let mut more = rows.clone();
            more.push(extreme);
            for query in [linear(), logistic(step.clone())] {
                let compiled = image(&rows).compile(&query).unwrap();
                let bound = compiled.parts()[0].sensitivity;
                let moved = distance(&exact(&image(&rows), &query), &exact(&image(&more), &query));
                assert!(moved <= bound, "{moved} > {bound} for {query}");
                assert!(
                    moved > 0.3 * bound,
                    "a patient at the bounds moves it ({moved})"
                );
            }
        }
    }

    /// How often `low ≤ truth ≤ high` over noisy releases of `query`'s exact numbers.
    fn coverage(query: &Query, data: &Dataset, truth: &[f64], sd: f64, seed: u64) -> f64 {
        let Release::Regression { terms, values } = exact(data, query) else {
            panic!("not a regression");
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut covered, mut trials) = (0, 0);
        for _ in 0..1_000 {
            let noisy = Release::Regression {
                terms: terms.clone(),
                values: values
                    .iter()
                    .map(|v| v + (sd * standard_normal(&mut rng)).round() as i64)
                    .collect(),
            };
            let fit = super::super::for_query(query)
                .combine(query, &[site(&noisy, sd)])
                .regression
                .expect("a fit");
            for (c, t) in fit.coefficients.iter().zip(truth) {
                trials += 1;
                if (c.estimate - t).abs() <= Z_95 * c.noise_std_error {
                    covered += 1;
                }
            }
        }
        covered as f64 / trials as f64
    }

    #[test]
    fn the_noise_interval_covers_the_noiseless_fit_95_percent_of_the_time() {
        let rows = cohort(4_000, 4);
        let data = image(&rows);
        let sites = [image(&rows)];
        let linear_truth = estimates(
            &LinearRegression
                .combine(&linear(), &[site(&exact(&data, &linear()), 0.0)])
                .regression
                .unwrap(),
        );
        // A noise of sd 15 per number, as a total rho of about 0.3 gives 6 terms.
        let rate = coverage(&linear(), &data, &linear_truth, 15.0 * FIXED_POINT, 5);
        assert!((0.93..=0.97).contains(&rate), "linear: {rate}");
        // A logistic fit's last step, from the converged coefficients of the step before.
        let converged = noiseless_logistic(&sites);
        // The last step's query, at the coefficients the seven before it reached.
        let (last, _) = noiseless_logistic_to(&sites, 7);
        let rate = coverage(&last, &data, &estimates(&converged), 8.0 * FIXED_POINT, 6);
        assert!((0.93..=0.97).contains(&rate), "logistic: {rate}");
    }

    /// A logistic fit with every step's numbers noised as a node's mechanism would, for a
    /// total `rho` (zCDP) spread over the steps by the protocol's shares.
    fn noisy_logistic(data: &Dataset, rho: f64, rng: &mut impl Rng) -> Option<Regression> {
        let shares = renkei_protocol::query::fit_step_shares(8);
        let mut query = logistic(FitStep::default());
        loop {
            let Aggregate::LogisticRegression { step, .. } = &query.aggregate else {
                panic!("not a logistic fit");
            };
            let share = shares[usize::from(step.iteration)] as f64 / 1e6;
            let compiled = data.compile(&query).unwrap();
            let sensitivity = compiled.parts()[0].sensitivity;
            let sd = sensitivity / (2.0 * rho * share).sqrt();
            let Release::Regression { terms, values } = exact(data, &query) else {
                panic!("not a regression");
            };
            let noisy = Release::Regression {
                terms,
                values: values
                    .iter()
                    .map(|v| v + (sd * standard_normal(rng)).round() as i64)
                    .collect(),
            };
            let fit = LogisticRegression
                .combine(&query, &[site(&noisy, sd)])
                .regression?;
            match fit.next_step.clone() {
                Some(next) => {
                    query.advance_fit(renkei_protocol::RequestId([1; 16]), next);
                }
                None => return Some(fit),
            }
        }
    }

    /// Over noisy fits at rho 1 (every step noised), the noise interval covers the pooled
    /// fit 93–97% of the time, the largest error of a slope stays within 0.05 on the
    /// log-odds scale, and nearly every fit says it converged.
    #[test]
    fn noisy_logistic_fits_cover_the_pooled_fit_and_converge() {
        let rows = cohort(6_000, 9);
        let data = image(&rows);
        let truth = estimates(&noiseless_logistic(&[image(&rows)]));
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let (mut covered, mut trials, mut worst, mut converged) = (0, 0, 0f64, 0);
        for _ in 0..200 {
            let fit = noisy_logistic(&data, 1.0, &mut rng).expect("a fit");
            converged += usize::from(fit.converged);
            for (i, (c, t)) in fit.coefficients.iter().zip(&truth).enumerate() {
                trials += 1;
                covered += usize::from((c.estimate - t).abs() <= Z_95 * c.noise_std_error);
                if i > 0 {
                    worst = worst.max((c.estimate - t).abs());
                }
            }
        }
        let rate = covered as f64 / trials as f64;
        assert!((0.93..=0.97).contains(&rate), "coverage {rate}");
        assert!(worst <= 0.05, "largest slope error {worst}");
        assert!(converged >= 190, "{converged} of 200 converged");
    }

    #[test]
    fn a_covariate_that_does_not_vary_gives_no_estimate_and_says_why() {
        let rows = cohort(1_000, 7);
        let data = image(&rows);
        let mut query = linear();
        query.filter = Filter::eq("diabetes", Literal::Bool(true));
        let combined = LinearRegression.combine(&query, &[site(&exact(&data, &query), 0.0)]);
        assert!(combined.regression.is_none());
        let note = combined.note.unwrap();
        assert!(note.contains("not positive definite"), "{note}");
        // Too few patients for the terms.
        let mut query = logistic(FitStep::default());
        query.filter = Filter::cmp("age", CmpOp::Gt, Literal::Integer(99));
        let combined = LogisticRegression.combine(&query, &[site(&exact(&data, &query), 0.0)]);
        assert!(combined.regression.is_none(), "{combined:?}");
    }

    #[test]
    fn a_release_with_other_terms_than_the_query_gives_a_note_not_a_panic() {
        let data = image(&cohort(200, 11));
        let Release::Regression { mut terms, values } = exact(&data, &linear()) else {
            panic!("not a regression");
        };
        terms.pop();
        let odd = Release::Regression { terms, values };
        let combined = LinearRegression.combine(&linear(), &[site(&odd, 0.0)]);
        assert!(combined.regression.is_none());
        assert!(combined.note.unwrap().contains("shape"));
    }

    #[test]
    fn terms_must_be_numbers_flags_or_conditions_on_patient_rows() {
        let data = image(&cohort(10, 8));
        let mut query = linear();
        query.aggregate = Aggregate::LinearRegression {
            outcome: "bmi".into(),
            covariates: vec![Covariate::Column("sex".into())],
        };
        let error = data.compile(&query).unwrap_err().to_string();
        assert!(error.contains("sex = '"), "{error}");
    }

    #[test]
    fn cholesky_solves_and_inverts() {
        let a = vec![
            vec![4.0, 2.0, 0.6],
            vec![2.0, 5.0, 1.0],
            vec![0.6, 1.0, 3.0],
        ];
        let chol = Cholesky::of(&a).unwrap();
        let x = chol.solve(&[1.0, 2.0, 3.0]);
        let back = apply(&a, &x);
        for (b, want) in back.iter().zip([1.0, 2.0, 3.0]) {
            assert!((b - want).abs() < 1e-12);
        }
        let inverse = chol.inverse();
        let identity = sandwich(&inverse, &a);
        // A⁻¹ A A⁻¹ = A⁻¹.
        for i in 0..3 {
            for j in 0..3 {
                assert!((identity[i][j] - inverse[i][j]).abs() < 1e-12);
            }
        }
        assert!(Cholesky::of(&[vec![1.0, 1.0], vec![1.0, 1.0]]).is_none());
    }

    #[test]
    fn the_normal_tail_matches_known_values() {
        assert!((normal_upper_tail(1.959_963_984_540_054) - 0.025).abs() < 1e-7);
        assert!((normal_upper_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_upper_tail(-1.0) - 0.841_344_746).abs() < 1e-7);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        assert_eq!(round_ratio(5, 2), 3);
        assert_eq!(round_ratio(-5, 2), -3);
        assert_eq!(round_ratio(4, 3), 1);
        assert_eq!(round_ratio(-4, 3), -1);
    }
}
