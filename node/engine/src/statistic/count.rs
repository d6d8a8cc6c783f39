//! `COUNT(*)` and `COUNT(DISTINCT patient_id)`: how many patients have a matching row, or
//! how many matching rows there are (each patient's rows bounded by the schema).
//!
//! Patients: one patient changes the count by one (sensitivity 1). Rows: a patient adds at
//! most `max_timepoints_per_patient` rows, which is the sensitivity. The count is one
//! number, withheld at a node below the minimum cell size; per-site counts add, and so do
//! their noise variances.

use renkei_protocol::{Aggregate, MaskedShape, Query, Release};

use super::shared::{add_counts, scalar_parts};
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, SchemaError};
use crate::cohort::Cohort;
use crate::estimate::{Combined, Estimate};
use crate::truth::{PooledCohort, TrueValue};

#[derive(Debug)]
pub(crate) struct Count;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Patients,
    /// Matching rows, at most `cap` per patient.
    Rows {
        cap: u32,
    },
}

#[derive(Debug)]
struct CountAccumulator {
    counted: Counted,
}

/// Whether `query` counts rows rather than patients (`COUNT(*)` on a view below patients).
pub(crate) fn counts_rows(query: &Query, patient_view: bool) -> bool {
    match query.aggregate {
        Aggregate::CountRows => !patient_view,
        Aggregate::CountPatients
        | Aggregate::Sum { .. }
        | Aggregate::Mean { .. }
        | Aggregate::Quantile { .. }
        | Aggregate::KaplanMeier { .. }
        | Aggregate::LinearRegression { .. }
        | Aggregate::LogisticRegression { .. } => false,
    }
}

impl Statistic for Count {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        let counted = if counts_rows(query, binder.patient_view()) {
            Counted::Rows {
                cap: binder.rows_per_patient(),
            }
        } else {
            Counted::Patients
        };
        Ok(Box::new(CountAccumulator { counted }))
    }

    fn combine(&self, _query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let parts = scalar_parts(sites);
        let (estimate, sd, ci95) = add_counts(&parts, 0);
        Combined {
            estimate: Some(Estimate::Integer(estimate.round() as i64)),
            std_dev: Some(sd),
            ci95: Some(ci95),
            ..Combined::default()
        }
    }

    fn pooled(&self, query: &Query, cohort: &PooledCohort) -> TrueValue {
        let rows = counts_rows(query, query.view == crate::schema::PATIENTS_VIEW);
        TrueValue::Number(if rows {
            cohort.patients.iter().map(Vec::len).sum::<usize>() as f64
        } else {
            cohort.patients.len() as f64
        })
    }
}

impl Accumulator for CountAccumulator {
    fn parts(&self) -> Vec<Part> {
        let sensitivity = match self.counted {
            Counted::Patients => 1.0,
            Counted::Rows { cap } => f64::from(cap),
        };
        vec![Part {
            sensitivity,
            len: 1,
            counts: true,
        }]
    }

    fn value_scale(&self) -> u8 {
        0
    }

    fn vector(&self) -> bool {
        false
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let count = match self.counted {
            Counted::Patients => cohort.patients().count() as i64,
            Counted::Rows { cap } => cohort.capped_rows(cap, &|_| true).len() as i64,
        };
        Exact(vec![vec![count]])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        let first = noisy.into_iter().next();
        Release::Scalar {
            value: first
                .as_ref()
                .and_then(|p| p.values.first().copied())
                .unwrap_or(0),
            suppressed: first
                .as_ref()
                .and_then(|p| p.suppressed.first().copied())
                .unwrap_or(false),
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

    fn rows(view: &str, filter: Filter) -> Query {
        Query {
            aggregate: Aggregate::CountRows,
            ..Query::count_patients(view, filter)
        }
    }

    #[test]
    fn counts_consenting_patients_and_capped_rows_as_the_pooled_truth() {
        let diabetic =
            Query::count_patients("patients", Filter::eq("diabetes", Literal::Bool(true)));
        assert!(matches!(
            release(&diabetic),
            Release::Scalar {
                value: 3,
                suppressed: false
            }
        ));
        let truth = for_query(&diabetic)
            .pooled(&diabetic, &pooled(false, |r| r[2] == 1, |_| None, |_| None));
        assert_eq!(truth, TrueValue::Number(3.0));
        // Rows: the fourth patient's three ICU-or-not rows count at most twice.
        let icu_rows = rows("timepoints", Filter::eq("icu", Literal::Bool(true)));
        assert!(matches!(
            release(&icu_rows),
            Release::Scalar { value: 5, .. }
        ));
        let truth = for_query(&icu_rows)
            .pooled(&icu_rows, &pooled(true, |r| r[4] == 1, |_| None, |_| None));
        assert_eq!(truth, TrueValue::Number(5.0));
        let icu_patients =
            Query::count_patients("timepoints", Filter::eq("icu", Literal::Bool(true)));
        assert!(matches!(
            release(&icu_patients),
            Release::Scalar { value: 4, .. }
        ));
    }

    #[test]
    fn sensitivity_is_one_patient_or_the_rows_bound() {
        let data = fixture::dataset();
        let patients = data
            .compile(&Query::count_patients("timepoints", Filter::True))
            .unwrap();
        assert_eq!(patients.parts()[0].sensitivity, 1.0);
        assert!(patients.counts() && !patients.vector());
        let rows = data.compile(&rows("timepoints", Filter::True)).unwrap();
        assert_eq!(rows.parts()[0].sensitivity, 2.0);
    }

    #[test]
    fn per_site_counts_add_with_their_variances() {
        let query = Query::count_patients("patients", Filter::True);
        let releases = [
            Release::Scalar {
                value: 10,
                suppressed: false,
            },
            Release::Scalar {
                value: 21,
                suppressed: false,
            },
        ];
        let combined = for_query(&query).combine(&query, &sites(&releases, 0, 1.0));
        assert_eq!(combined.estimate, Some(crate::Estimate::Integer(31)));
        assert!((combined.std_dev.unwrap() - 2f64.sqrt()).abs() < 1e-12);
    }
}
