//! `SELECT a, [b,] SUM(col) | AVG(col) … GROUP BY a[, b]`: a sum, or a mean, of a numeric
//! column per cell of one or two categorical (or true/false) columns. Every combination of
//! levels is a cell, empty ones included.
//!
//! Released parts: the clamped sums per cell and, for a mean, the counts of non-missing
//! values per cell, each part its own mechanism (a mean's budget is split in two). A
//! patient's `cap` rows may all fall in one cell, so the sums' L2 sensitivity is
//! `cap × max(|low|, |high|)` and the counts' `cap`, as for the ungrouped statistics.
//! Across nodes each cell's sums (and counts) add; a cell's mean and its sd follow as for
//! `AVG` (delta method). A cell whose noisy count is below 1 has no mean, and says so.

use renkei_protocol::{MaskedShape, Query, Release};

use super::shared::{CountPart, add_counts, ratio, saturate};
use super::sum::bind_measure;
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Grouping, Measure, SchemaError};
use crate::cohort::{Cohort, clamped};
use crate::column::NO_CELL;
use crate::estimate::{Combined, Estimate, GroupEstimate, Z_95};
use crate::truth::{PooledCohort, TrueValue};

#[derive(Debug)]
pub(crate) struct GroupedSum {
    /// AVG (sums over counts) rather than SUM.
    pub(crate) mean: bool,
}

#[derive(Debug)]
struct CellSums {
    mean: bool,
    measure: Measure,
    grouping: Grouping,
    labels: Vec<Vec<String>>,
    cap: u32,
}

impl Statistic for GroupedSum {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        let measure = bind_measure(query, binder)?;
        let grouping = binder.grouping(&query.group_by)?;
        Ok(Box::new(CellSums {
            mean: self.mean,
            measure,
            labels: grouping.labels(),
            grouping,
            cap: binder.rows_per_patient(),
        }))
    }

    fn combine(&self, _query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let Some(first) = sites.first() else {
            return Combined::none("no node answered");
        };
        let Release::Cells { labels, .. } = first.release else {
            return Combined::none("the nodes did not release GROUP BY cells");
        };
        let scale = first.value_scale;
        let part = |site: &SiteRelease<'_>, part: usize, cell: usize| {
            let Release::Cells { parts, .. } = site.release else {
                return None;
            };
            parts.get(part)?.get(cell).copied()
        };
        let withheld = |site: &SiteRelease<'_>, cell: usize| {
            let Release::Cells { suppressed, .. } = site.release else {
                return false;
            };
            suppressed.get(cell).copied().unwrap_or(false)
        };
        let groups = labels
            .iter()
            .enumerate()
            .map(|(cell, label)| {
                if !self.mean {
                    let sums: Vec<CountPart> = sites
                        .iter()
                        .filter_map(|s| Some((part(s, 0, cell)?, false, s.noise_std, 0)))
                        .collect();
                    let (estimate, std_dev, ci95) = add_counts(&sums, scale);
                    return GroupEstimate {
                        group: label.clone(),
                        estimate: Estimate::Real(estimate),
                        std_dev,
                        ci95,
                        withheld_by: 0,
                        note: None,
                    };
                }
                // A node that withheld the cell (its count below the minimum cell size)
                // released neither its sum nor its count there: the mean is the others'.
                let withheld_by = sites.iter().filter(|s| withheld(s, cell)).count();
                let (mut sum, mut count, mut var_sum, mut var_count) = (0.0, 0.0, 0.0, 0.0);
                for site in sites.iter().filter(|s| !withheld(s, cell)) {
                    if let (Some(s), Some(c)) = (part(site, 0, cell), part(site, 1, cell)) {
                        sum += s as f64;
                        count += c as f64;
                        var_sum += site.noise_std.powi(2);
                        var_count += site.count_noise_std.unwrap_or(0.0).powi(2);
                    }
                }
                let partial = (withheld_by > 0).then(|| {
                    format!(
                        "{withheld_by} node(s) withheld this cell (fewer values than the minimum cell size); the mean is over the others"
                    )
                });
                match ratio(sum, count, var_sum, var_count, scale) {
                    Some((mean, sd)) => GroupEstimate {
                        group: label.clone(),
                        estimate: Estimate::Real(mean),
                        std_dev: sd,
                        ci95: [mean - Z_95 * sd, mean + Z_95 * sd],
                        withheld_by,
                        note: partial,
                    },
                    None => GroupEstimate {
                        group: label.clone(),
                        estimate: Estimate::Real(f64::NAN),
                        std_dev: f64::NAN,
                        ci95: [f64::NAN, f64::NAN],
                        withheld_by,
                        note: Some(partial.unwrap_or_else(|| {
                            "too few values to estimate a mean (the noisy count is below 1)".into()
                        })),
                    },
                }
            })
            .collect();
        Combined {
            groups,
            ..Combined::default()
        }
    }

    fn pooled(&self, _query: &Query, cohort: &PooledCohort) -> TrueValue {
        let mut cells: std::collections::BTreeMap<Vec<String>, (f64, u64)> = Default::default();
        for row in cohort.patients.iter().flatten() {
            if let (Some(cell), Some(value)) = (&row.cell, row.value) {
                let entry = cells.entry(cell.clone()).or_default();
                entry.0 += value;
                entry.1 += 1;
            }
        }
        TrueValue::Cells(
            cells
                .into_iter()
                .map(|(cell, (sum, count))| {
                    (cell, if self.mean { sum / count as f64 } else { sum })
                })
                .collect(),
        )
    }
}

impl Accumulator for CellSums {
    fn parts(&self) -> Vec<Part> {
        let cap = f64::from(self.cap);
        let sums = Part {
            sensitivity: cap * self.measure.largest(),
            len: self.labels.len(),
            counts: false,
        };
        // The counts are counts: a cell below the minimum cell size is withheld (with its
        // sum), as a GROUP BY count would withhold it.
        let counts = Part {
            sensitivity: cap,
            counts: true,
            ..sums
        };
        if self.mean {
            vec![sums, counts]
        } else {
            vec![sums]
        }
    }

    fn value_scale(&self) -> u8 {
        self.measure.scale
    }

    fn vector(&self) -> bool {
        true
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let (low, high) = (self.measure.low, self.measure.high);
        let cell = cohort.cells(&self.grouping);
        let values = cohort.values(self.measure.source);
        let kept = cohort.capped_rows(self.cap, &|row| {
            cell[row] != NO_CELL && clamped(&values, row, low, high).is_some()
        });
        let mut sums = vec![0i128; self.labels.len()];
        let mut counts = vec![0i64; self.labels.len()];
        for row in kept {
            if let Some(value) = clamped(&values, row, low, high) {
                sums[cell[row] as usize] += i128::from(value);
                counts[cell[row] as usize] += 1;
            }
        }
        let sums = sums.into_iter().map(saturate).collect();
        if self.mean {
            Exact(vec![sums, counts])
        } else {
            Exact(vec![sums])
        }
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        let suppressed = match (self.mean, noisy.get(1)) {
            (true, Some(counts)) => counts.suppressed.clone(),
            (true, None) | (false, _) => vec![false; self.labels.len()],
        };
        let parts = noisy
            .into_iter()
            .map(|part| {
                part.values
                    .iter()
                    .zip(&suppressed)
                    .map(|(v, s)| if *s { 0 } else { *v })
                    .collect()
            })
            .collect();
        Release::Cells {
            labels: self.labels.clone(),
            parts,
            suppressed,
        }
    }

    fn masked_shape(&self) -> MaskedShape {
        MaskedShape::Cells {
            labels: self.labels.clone(),
            parts: if self.mean { 2 } else { 1 },
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{Aggregate, Filter, MaskedShape, Query, Release};

    use crate::release::release_from_total;
    use crate::statistic::fixture::{self, plain, pooled, release, sites};
    use crate::statistic::for_query;
    use crate::truth::TrueValue;

    fn by(view: &str, aggregate: Aggregate, group: &str) -> Query {
        Query {
            aggregate,
            group_by: vec![group.into()],
            ..Query::count_patients(view, Filter::True)
        }
    }

    fn mean(column: &str) -> Aggregate {
        Aggregate::Mean {
            column: column.into(),
        }
    }

    #[test]
    fn means_per_cell_are_sums_and_counts_and_match_the_pooled_truth() {
        let query = by("patients", mean("age"), "sex");
        let Release::Cells { labels, parts, .. } = release(&query) else {
            panic!("a mean per cell releases cells");
        };
        assert_eq!(
            labels,
            vec![vec!["female".to_string()], vec!["male".to_string()]]
        );
        assert_eq!(parts, vec![vec![140, 115], vec![3, 2]]);
        let truth = for_query(&query).pooled(
            &query,
            &pooled(
                false,
                |_| true,
                |r| Some(r[0] as f64),
                |r| Some(vec![["female", "male"][r[1] as usize].to_string()]),
            ),
        );
        assert_eq!(
            truth,
            TrueValue::Cells(vec![
                (vec!["female".into()], 140.0 / 3.0),
                (vec!["male".into()], 57.5)
            ])
        );
    }

    #[test]
    fn sums_per_cell_cap_each_patients_rows_and_skip_missing_values() {
        let query = by(
            "timepoints",
            Aggregate::Sum {
                column: "crp".into(),
            },
            "icu",
        );
        let Release::Cells { parts, .. } = release(&query) else {
            panic!("a sum per cell releases cells");
        };
        // The fourth patient's three rows count twice, spread over its course: its first
        // (0.5, no ICU) and last (3.0, ICU).
        assert_eq!(parts, vec![vec![17, 600]]);
        let truth = for_query(&query).pooled(
            &query,
            &pooled(
                true,
                |_| true,
                |r| (r[3] != crate::NULL).then(|| r[3] as f64 / 10.0),
                |r| Some(vec![(r[4] == 1).to_string()]),
            ),
        );
        let TrueValue::Cells(cells) = truth else {
            panic!("{truth:?}")
        };
        for ((_, truth), engine) in cells.iter().zip(&parts[0]) {
            assert!((truth * 10.0 - *engine as f64).abs() < 1e-9);
        }
        let compiled = fixture::dataset().compile(&query).unwrap();
        assert_eq!(compiled.parts().len(), 1);
        assert_eq!(compiled.parts()[0].sensitivity, 1000.0);
        assert_eq!(compiled.parts()[0].len, 2);
    }

    #[test]
    fn a_secure_total_of_cells_reads_back_as_cells() {
        let query = by("patients", mean("age"), "sex");
        let data = fixture::dataset();
        let compiled = data.compile(&query).unwrap();
        let shape = compiled.statistic().masked_shape();
        assert_eq!(
            shape,
            MaskedShape::Cells {
                labels: vec![vec!["female".into()], vec!["male".into()]],
                parts: 2
            }
        );
        let words: Vec<i64> = data.evaluate(&compiled).0.concat();
        let total = release_from_total(&shape, words, 0);
        assert_eq!(
            total,
            compiled
                .statistic()
                .release(vec![plain(vec![140, 115]), plain(vec![3, 2])])
        );
    }

    /// A node whose cell count fell below the minimum withholds the cell's sum and count;
    /// the cell's mean is the other nodes', and says so.
    #[test]
    fn a_withheld_cell_is_left_to_the_other_nodes() {
        let query = by("patients", mean("age"), "sex");
        let compiled = fixture::dataset().compile(&query).unwrap();
        let noisy = |sums: Vec<i64>, counts: Vec<i64>, min_cell: i64| {
            let suppressed: Vec<bool> = counts.iter().map(|c| *c < min_cell).collect();
            vec![
                plain(sums),
                crate::statistic::NoisyPart {
                    values: counts,
                    suppressed,
                },
            ]
        };
        let small = compiled
            .statistic()
            .release(noisy(vec![140, 115], vec![3, 2], 3));
        let Release::Cells {
            parts, suppressed, ..
        } = &small
        else {
            panic!("{small:?}");
        };
        assert_eq!(suppressed, &vec![false, true]);
        assert_eq!(parts, &vec![vec![140, 0], vec![3, 0]]);
        let other = compiled
            .statistic()
            .release(noisy(vec![600, 500], vec![10, 10], 3));
        let combined = for_query(&query).combine(&query, &sites(&[small, other], 0, 1.0));
        assert_eq!(
            combined.groups[0].estimate,
            crate::Estimate::Real(740.0 / 13.0)
        );
        assert_eq!(combined.groups[1].estimate, crate::Estimate::Real(50.0));
        assert_eq!(combined.groups[1].withheld_by, 1);
        assert!(
            combined.groups[1]
                .note
                .as_deref()
                .unwrap()
                .contains("withheld")
        );
        assert!(compiled.counts(), "a mean per cell releases counts");
    }

    #[test]
    fn a_cell_with_too_few_values_has_no_mean() {
        let query = by("patients", mean("age"), "sex");
        let releases = [Release::Cells {
            labels: vec![vec!["female".into()], vec!["male".into()]],
            parts: vec![vec![400, 7], vec![10, 0]],
            suppressed: vec![false, false],
        }];
        let combined = for_query(&query).combine(&query, &sites(&releases, 0, 1.0));
        assert_eq!(combined.groups[0].estimate, crate::Estimate::Real(40.0));
        assert!(combined.groups[1].estimate.as_f64().is_nan());
        assert!(
            combined.groups[1]
                .note
                .as_deref()
                .unwrap()
                .contains("too few")
        );
    }
}
