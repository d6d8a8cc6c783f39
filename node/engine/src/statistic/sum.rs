//! `SUM(col)`: the sum of a numeric column over matching rows, each value clamped to the
//! column's declared bounds, at most `max_timepoints_per_patient` rows per patient.
//!
//! Sensitivity: a patient's rows each move the sum by at most the bound of largest
//! magnitude, so `cap × max(|low|, |high|)` in stored (fixed-point) units. One number;
//! per-site sums add, and so do their noise variances.

use renkei_protocol::{Aggregate, MaskedShape, Query, Release};

use super::shared::{add_counts, pooled_values, saturating_sum, scalar_parts};
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Measure, SchemaError};
use crate::cohort::{Cohort, clamped};
use crate::estimate::{Combined, Estimate};
use crate::truth::{PooledCohort, TrueValue};

#[derive(Debug)]
pub(crate) struct Sum;

#[derive(Debug)]
struct SumAccumulator {
    measure: Measure,
    cap: u32,
}

/// The column an aggregate reads, bound as a measure.
pub(crate) fn bind_measure(query: &Query, binder: &Binder<'_>) -> Result<Measure, SchemaError> {
    match &query.aggregate {
        Aggregate::Sum { column }
        | Aggregate::Mean { column }
        | Aggregate::Quantile { column, .. } => binder.measure(column),
        Aggregate::CountPatients | Aggregate::CountRows => {
            Err(SchemaError::Unsupported("a count reads no column".into()))
        }
        Aggregate::KaplanMeier { .. } => Err(SchemaError::Unsupported(
            "a survival curve reads time columns, not one measure".into(),
        )),
        Aggregate::LinearRegression { .. } | Aggregate::LogisticRegression { .. } => Err(
            SchemaError::Unsupported("a regression reads its terms, not one measure".into()),
        ),
    }
}

/// The clamped sum and the number of non-missing values over a cohort's capped rows.
pub(crate) fn sum_and_count(cohort: &Cohort<'_>, measure: &Measure, cap: u32) -> (i64, i64) {
    let values = cohort.values(measure.source);
    let kept = cohort.capped_rows(cap, &|row| {
        clamped(&values, row, measure.low, measure.high).is_some()
    });
    let sum = saturating_sum(
        kept.iter()
            .filter_map(|&row| clamped(&values, row, measure.low, measure.high)),
    );
    (sum, kept.len() as i64)
}

impl Statistic for Sum {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        Ok(Box::new(SumAccumulator {
            measure: bind_measure(query, binder)?,
            cap: binder.rows_per_patient(),
        }))
    }

    fn combine(&self, _query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let scale = sites.first().map_or(0, |s| s.value_scale);
        let parts = scalar_parts(sites);
        let (estimate, sd, ci95) = add_counts(&parts, scale);
        Combined {
            estimate: Some(Estimate::Real(estimate)),
            std_dev: Some(sd),
            ci95: Some(ci95),
            ..Combined::default()
        }
    }

    fn pooled(&self, _query: &Query, cohort: &PooledCohort) -> TrueValue {
        TrueValue::Number(pooled_values(cohort).iter().sum())
    }
}

impl Accumulator for SumAccumulator {
    fn parts(&self) -> Vec<Part> {
        vec![Part {
            sensitivity: f64::from(self.cap) * self.measure.largest(),
            len: 1,
            counts: false,
        }]
    }

    fn value_scale(&self) -> u8 {
        self.measure.scale
    }

    fn vector(&self) -> bool {
        false
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let (sum, _) = sum_and_count(cohort, &self.measure, self.cap);
        Exact(vec![vec![sum]])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        Release::Scalar {
            value: noisy
                .first()
                .and_then(|p| p.values.first().copied())
                .unwrap_or(0),
            suppressed: false,
        }
    }

    fn masked_shape(&self) -> MaskedShape {
        MaskedShape::Scalar
    }
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{Aggregate, Filter, Literal, Query, Release};

    use crate::statistic::fixture::{self, pooled, release, sites};
    use crate::statistic::for_query;
    use crate::truth::TrueValue;

    fn crp_sum(filter: Filter) -> Query {
        Query {
            aggregate: Aggregate::Sum {
                column: "crp".into(),
            },
            ..Query::count_patients("timepoints", filter)
        }
    }

    #[test]
    fn sums_capped_rows_in_fixed_point_as_the_pooled_truth() {
        let query = crp_sum(Filter::eq("icu", Literal::Bool(true)));
        // 8.0 + 45.0 + 4.0 + (2.0 + 3.0), in tenths.
        assert!(matches!(
            release(&query),
            Release::Scalar { value: 620, .. }
        ));
        let truth = for_query(&query).pooled(
            &query,
            &pooled(
                true,
                |r| r[4] == 1,
                |r| (r[3] != crate::NULL).then(|| r[3] as f64 / 10.0),
                |_| None,
            ),
        );
        assert_eq!(truth, TrueValue::Number(62.0));
        let compiled = fixture::dataset().compile(&query).unwrap();
        // Two rows per patient, each up to 50.0 (500 tenths).
        assert_eq!(compiled.parts()[0].sensitivity, 1000.0);
        assert_eq!(compiled.value_scale(), 1);
        assert!(!compiled.counts());
    }

    #[test]
    fn a_sum_refuses_a_non_numeric_column() {
        let query = Query {
            aggregate: Aggregate::Sum {
                column: "sex".into(),
            },
            ..Query::count_patients("patients", Filter::True)
        };
        let error = fixture::dataset().compile(&query).unwrap_err();
        assert!(error.to_string().contains("numeric"), "{error}");
    }

    #[test]
    fn per_site_sums_add_in_the_column_unit() {
        let query = crp_sum(Filter::True);
        let releases = [
            Release::Scalar {
                value: 620,
                suppressed: false,
            },
            Release::Scalar {
                value: 380,
                suppressed: false,
            },
        ];
        let combined = for_query(&query).combine(&query, &sites(&releases, 1, 10.0));
        assert_eq!(combined.estimate, Some(crate::Estimate::Real(100.0)));
        assert!((combined.std_dev.unwrap() - 200f64.sqrt() / 10.0).abs() < 1e-12);
    }
}
