//! `MEDIAN(col)` and `PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY col)`: a quantile read from
//! a noisy histogram of the clamped values in [`QUANTILE_BINS`] equal bins over the
//! column's declared bounds.
//!
//! Sensitivity: a patient's capped rows may all land in one bin, so `cap` (L2 of the bin
//! counts). The nodes' histograms are added bin by bin (negative counts read as zero) and
//! the quantile is interpolated within its bin; the interval comes from redrawing the
//! noise around the combined histogram, widened to the edges of the bins its ends fall in
//! (the histogram cannot tell where in a bin the quantile lies). It reflects the privacy
//! noise and the binning, not sampling.

use rand::SeedableRng;
use renkei_protocol::{Aggregate, MaskedShape, Query, Release};

use super::shared::{pooled_values, standard_normal, unscale};
use super::sum::bind_measure;
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Measure, SchemaError};
use crate::cohort::{Cohort, clamped};
use crate::estimate::{Combined, Estimate};
use crate::truth::{PooledCohort, TrueValue};

/// Bins of the histogram a quantile is read from.
pub const QUANTILE_BINS: usize = 64;

/// Redraws used for a quantile's interval.
const QUANTILE_REDRAWS: usize = 400;

#[derive(Debug)]
pub(crate) struct Quantile;

#[derive(Debug)]
struct Histogram {
    measure: Measure,
    cap: u32,
    width: i64,
    bins: usize,
}

/// The quantile asked, as a fraction.
fn fraction(query: &Query) -> f64 {
    match &query.aggregate {
        Aggregate::Quantile { per_mille, .. } => f64::from(*per_mille) / 1000.0,
        Aggregate::CountPatients
        | Aggregate::CountRows
        | Aggregate::Sum { .. }
        | Aggregate::Mean { .. }
        | Aggregate::KaplanMeier { .. }
        | Aggregate::LinearRegression { .. }
        | Aggregate::LogisticRegression { .. } => 0.5,
    }
}

impl Statistic for Quantile {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        if !query.group_by.is_empty() {
            return Err(SchemaError::Unsupported(
                "GROUP BY takes COUNT, SUM or AVG; a quantile per group is not offered yet".into(),
            ));
        }
        let measure = bind_measure(query, binder)?;
        let span = measure.high - measure.low + 1;
        let width = (span + QUANTILE_BINS as i64 - 1) / QUANTILE_BINS as i64;
        let bins = usize::try_from((span + width - 1) / width).unwrap_or(QUANTILE_BINS);
        Ok(Box::new(Histogram {
            measure,
            cap: binder.rows_per_patient(),
            width,
            bins,
        }))
    }

    fn combine(&self, query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let Some(first) = sites.first() else {
            return Combined::none("no node answered");
        };
        let scale = first.value_scale;
        let Release::Histogram { low, width, counts } = first.release else {
            return Combined::none("the nodes did not release histograms");
        };
        let p = fraction(query);
        let mut total = vec![0.0f64; counts.len()];
        let mut variance = 0.0;
        for site in sites {
            if let Release::Histogram { counts, .. } = site.release {
                for (t, c) in total.iter_mut().zip(counts) {
                    *t += *c as f64;
                }
                variance += site.noise_std.powi(2);
            }
        }
        let quantile = |bins: &[f64]| -> Option<f64> {
            let clipped: Vec<f64> = bins.iter().map(|c| c.max(0.0)).collect();
            let mass: f64 = clipped.iter().sum();
            if mass < 1.0 {
                return None;
            }
            let target = p * mass;
            let mut below = 0.0;
            for (i, c) in clipped.iter().enumerate() {
                if below + c >= target && *c > 0.0 {
                    let within = (target - below) / c;
                    return Some(*low as f64 + (i as f64 + within) * *width as f64);
                }
                below += c;
            }
            Some(*low as f64 + clipped.len() as f64 * *width as f64)
        };
        let Some(point) = quantile(&total) else {
            return Combined::none("too few values to estimate a quantile");
        };
        // The noise is redrawn around the combined histogram with a fixed seed, so the
        // same answers always give the same interval.
        let sd = variance.sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0051_7a61);
        let mut draws: Vec<f64> = (0..QUANTILE_REDRAWS)
            .filter_map(|_| {
                let redrawn: Vec<f64> = total
                    .iter()
                    .map(|c| c + sd * standard_normal(&mut rng))
                    .collect();
                quantile(&redrawn)
            })
            .collect();
        draws.sort_by(f64::total_cmp);
        let at = |q: f64| {
            draws
                .get(((draws.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        let (lo, hi) = (at(0.025).unwrap_or(point), at(0.975).unwrap_or(point));
        let spread = {
            let mean = draws.iter().sum::<f64>() / draws.len().max(1) as f64;
            (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len().max(1) as f64)
                .sqrt()
        };
        // The histogram says only which bin the quantile is in, not where in it: the
        // interval runs from the lower edge of the bin its low end falls in to the upper
        // edge of the bin its high end falls in, and the sd counts a bin's uniform spread.
        let (low, width) = (*low as f64, *width as f64);
        let last = (total.len().max(1) - 1) as f64;
        let bin_below = |x: f64| (((x - low) / width).ceil() - 1.0).clamp(0.0, last);
        let bin_above = |x: f64| ((x - low) / width).floor().clamp(0.0, last);
        let lower = low + bin_below(lo.min(point)) * width;
        let upper = low + (bin_above(hi.max(point)) + 1.0) * width;
        let sd = (spread * spread + width * width / 12.0).sqrt();
        Combined {
            estimate: Some(Estimate::Real(unscale(point, scale))),
            std_dev: Some(unscale(sd, scale)),
            ci95: Some([unscale(lower, scale), unscale(upper, scale)]),
            ..Combined::default()
        }
    }

    /// Interpolated between order statistics, like `PERCENTILE_CONT`.
    fn pooled(&self, query: &Query, cohort: &PooledCohort) -> TrueValue {
        let mut values = pooled_values(cohort);
        if values.is_empty() {
            return TrueValue::Nothing;
        }
        values.sort_by(f64::total_cmp);
        let position = fraction(query) * (values.len() - 1) as f64;
        let (below, above) = (position.floor() as usize, position.ceil() as usize);
        let fraction = position - below as f64;
        TrueValue::Number(values[below] + fraction * (values[above] - values[below]))
    }
}

impl Accumulator for Histogram {
    fn parts(&self) -> Vec<Part> {
        vec![Part {
            sensitivity: f64::from(self.cap),
            len: self.bins,
            counts: false,
        }]
    }

    fn value_scale(&self) -> u8 {
        self.measure.scale
    }

    fn vector(&self) -> bool {
        true
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let (low, high) = (self.measure.low, self.measure.high);
        let values = cohort.values(self.measure.source);
        let mut counts = vec![0i64; self.bins];
        for row in cohort.capped_rows(self.cap, &|row| clamped(&values, row, low, high).is_some()) {
            if let Some(value) = clamped(&values, row, low, high) {
                let bin = usize::try_from((value - low) / self.width).unwrap_or(0);
                counts[bin.min(self.bins - 1)] += 1;
            }
        }
        Exact(vec![counts])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        Release::Histogram {
            low: self.measure.low,
            width: self.width,
            counts: noisy
                .into_iter()
                .next()
                .map(|p| p.values)
                .unwrap_or_default(),
        }
    }

    fn masked_shape(&self) -> MaskedShape {
        MaskedShape::Histogram {
            low: self.measure.low,
            width: self.width,
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{Aggregate, Filter, Query, Release};

    use crate::statistic::fixture::{self, pooled, release, sites};
    use crate::statistic::for_query;
    use crate::statistic::shared::standard_normal;
    use crate::truth::TrueValue;

    fn median_age() -> Query {
        Query {
            aggregate: Aggregate::Quantile {
                column: "age".into(),
                per_mille: 500,
            },
            ..Query::count_patients("patients", Filter::True)
        }
    }

    #[test]
    fn the_histogram_holds_the_pooled_median_where_half_the_mass_is_crossed() {
        let query = median_age();
        let Release::Histogram { low, width, counts } = release(&query) else {
            panic!("a quantile releases a histogram");
        };
        assert_eq!((low, width, counts.len()), (0, 2, 51));
        assert_eq!(counts.iter().sum::<i64>(), 5);
        let truth = for_query(&query).pooled(
            &query,
            &pooled(false, |_| true, |r| Some(r[0] as f64), |_| None),
        );
        assert_eq!(truth, TrueValue::Number(45.0));
        // Noise-free, the combined median interpolates to the middle of the crossing bin.
        let releases = [Release::Histogram { low, width, counts }];
        let combined = for_query(&query).combine(&query, &sites(&releases, 0, 0.0));
        assert_eq!(combined.estimate, Some(crate::Estimate::Real(45.0)));
        let compiled = fixture::dataset().compile(&query).unwrap();
        assert!(compiled.vector());
        assert_eq!(compiled.parts()[0].len, 51);
    }

    /// Without noise the interval still holds the true quantile: the binning is in it.
    /// Two ages, 36 and 37, share the bin [36, 38): their median is 36.5, the histogram's
    /// interpolation says 37.
    #[test]
    fn the_interval_covers_the_binning_error() {
        let query = median_age();
        let mut counts = vec![0i64; 51];
        counts[18] = 2;
        let releases = [Release::Histogram {
            low: 0,
            width: 2,
            counts,
        }];
        let combined = for_query(&query).combine(&query, &sites(&releases, 0, 0.0));
        let [low, high] = combined.ci95.unwrap();
        let cohort = crate::truth::PooledCohort {
            patients: [36.0, 37.0]
                .iter()
                .map(|age| {
                    vec![crate::truth::PooledRow {
                        value: Some(*age),
                        cell: None,
                        event: false,
                        terms: Vec::new(),
                    }]
                })
                .collect(),
        };
        let TrueValue::Number(truth) = for_query(&query).pooled(&query, &cohort) else {
            panic!("a median of two values");
        };
        assert_eq!(truth, 36.5);
        assert!(
            low <= truth && truth <= high,
            "[{low}, {high}] misses {truth}"
        );
        assert_eq!([low, high], [36.0, 38.0]);
        // The sd is at least a bin's uniform spread.
        assert!(combined.std_dev.unwrap() >= 2.0 / 12f64.sqrt() - 1e-12);
    }

    /// Over repeated noisy releases of one cohort's histogram, the reported 95% interval
    /// holds the true median at least 93% of the time.
    #[test]
    fn quantile_intervals_cover_the_truth() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ages: Vec<i64> = (0..600)
            .map(|_| (20.0 + 60.0 * rng.gen_range(0.0f64..1.0).powf(0.7)) as i64)
            .collect();
        let mut sorted: Vec<f64> = ages.iter().map(|a| *a as f64).collect();
        sorted.sort_by(f64::total_cmp);
        let truth = (sorted[299] + sorted[300]) / 2.0;
        let mut exact = vec![0i64; 51];
        for age in &ages {
            exact[(*age / 2) as usize] += 1;
        }
        let query = median_age();
        let (trials, sd) = (300, 3.0);
        let covered = (0..trials)
            .filter(|_| {
                let counts = exact
                    .iter()
                    .map(|c| *c + (sd * standard_normal(&mut rng)).round() as i64)
                    .collect();
                let releases = [Release::Histogram {
                    low: 0,
                    width: 2,
                    counts,
                }];
                let [low, high] = for_query(&query)
                    .combine(&query, &sites(&releases, 0, sd))
                    .ci95
                    .unwrap();
                low <= truth && truth <= high
            })
            .count();
        let coverage = covered as f64 / trials as f64;
        assert!(coverage >= 0.93, "coverage {coverage}");
    }

    #[test]
    fn a_quantile_per_group_is_refused_at_binding() {
        let query = Query {
            group_by: vec!["sex".into()],
            ..median_age()
        };
        assert!(fixture::dataset().compile(&query).is_err());
    }
}
