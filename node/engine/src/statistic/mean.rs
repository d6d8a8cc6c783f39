//! `AVG(col)`: a noisy sum of the clamped values over a noisy count of the non-missing
//! ones, each its own mechanism with half the budget.
//!
//! Sensitivities: the sum's as for `SUM`, `cap × max(|low|, |high|)`; the count's `cap`.
//! Across nodes the sums and the counts add; the mean's sd follows by the delta method,
//! `sqrt(var_S + mean²·var_C) / C`.

use renkei_protocol::{MaskedShape, Query, Release};

use super::shared::{pooled_values, ratio};
use super::sum::{bind_measure, sum_and_count};
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Measure, SchemaError};
use crate::cohort::Cohort;
use crate::estimate::{Combined, Estimate, Z_95};
use crate::truth::{PooledCohort, TrueValue};

#[derive(Debug)]
pub(crate) struct Mean;

#[derive(Debug)]
struct MeanAccumulator {
    measure: Measure,
    cap: u32,
}

impl Statistic for Mean {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        Ok(Box::new(MeanAccumulator {
            measure: bind_measure(query, binder)?,
            cap: binder.rows_per_patient(),
        }))
    }

    fn combine(&self, _query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let scale = sites.first().map_or(0, |s| s.value_scale);
        let (mut sum, mut count, mut var_sum, mut var_count) = (0.0, 0.0, 0.0, 0.0);
        for site in sites {
            if let Release::SumAndCount { sum: s, count: c } = site.release {
                sum += *s as f64;
                count += *c as f64;
                var_sum += site.noise_std.powi(2);
                var_count += site.count_noise_std.unwrap_or(0.0).powi(2);
            }
        }
        match ratio(sum, count, var_sum, var_count, scale) {
            None => {
                Combined::none("too few values to estimate a mean (the noisy count is below 1)")
            }
            Some((mean, sd)) => Combined {
                estimate: Some(Estimate::Real(mean)),
                std_dev: Some(sd),
                ci95: Some([mean - Z_95 * sd, mean + Z_95 * sd]),
                ..Combined::default()
            },
        }
    }

    fn pooled(&self, _query: &Query, cohort: &PooledCohort) -> TrueValue {
        let values = pooled_values(cohort);
        if values.is_empty() {
            return TrueValue::Nothing;
        }
        TrueValue::Number(values.iter().sum::<f64>() / values.len() as f64)
    }
}

impl Accumulator for MeanAccumulator {
    fn parts(&self) -> Vec<Part> {
        let cap = f64::from(self.cap);
        vec![
            Part {
                sensitivity: cap * self.measure.largest(),
                len: 1,
                counts: false,
            },
            Part {
                sensitivity: cap,
                len: 1,
                counts: false,
            },
        ]
    }

    fn value_scale(&self) -> u8 {
        self.measure.scale
    }

    fn vector(&self) -> bool {
        false
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let (sum, count) = sum_and_count(cohort, &self.measure, self.cap);
        Exact(vec![vec![sum], vec![count]])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        let at = |part: usize| {
            noisy
                .get(part)
                .and_then(|p| p.values.first().copied())
                .unwrap_or(0)
        };
        Release::SumAndCount {
            sum: at(0),
            count: at(1),
        }
    }

    fn masked_shape(&self) -> MaskedShape {
        MaskedShape::SumAndCount
    }
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{Aggregate, Filter, Literal, Query, Release};

    use crate::statistic::fixture::{self, pooled, release, sites};
    use crate::statistic::for_query;
    use crate::truth::TrueValue;

    fn mean_age(filter: Filter) -> Query {
        Query {
            aggregate: Aggregate::Mean {
                column: "age".into(),
            },
            ..Query::count_patients("patients", filter)
        }
    }

    #[test]
    fn a_mean_is_a_sum_and_a_count_and_matches_the_pooled_truth() {
        let query = mean_age(Filter::eq("diabetes", Literal::Bool(true)));
        let Release::SumAndCount { sum, count } = release(&query) else {
            panic!("a mean releases a sum and a count");
        };
        assert_eq!((sum, count), (205, 3));
        let truth = for_query(&query).pooled(
            &query,
            &pooled(false, |r| r[2] == 1, |r| Some(r[0] as f64), |_| None),
        );
        assert_eq!(truth, TrueValue::Number(205.0 / 3.0));
        let parts = fixture::dataset().compile(&query).unwrap().parts();
        assert_eq!(
            parts.iter().map(|p| p.sensitivity).collect::<Vec<_>>(),
            vec![100.0, 1.0]
        );
    }

    #[test]
    fn a_mean_of_too_few_values_says_so() {
        let query = mean_age(Filter::True);
        let releases = [Release::SumAndCount { sum: 40, count: 0 }];
        let combined = for_query(&query).combine(&query, &sites(&releases, 0, 1.0));
        assert_eq!(combined.estimate, None);
        assert!(combined.note.unwrap().contains("too few values"));
        let releases = [
            Release::SumAndCount { sum: 300, count: 6 },
            Release::SumAndCount { sum: 100, count: 4 },
        ];
        let combined = for_query(&query).combine(&query, &sites(&releases, 0, 1.0));
        assert_eq!(combined.estimate, Some(crate::Estimate::Real(40.0)));
    }
}
