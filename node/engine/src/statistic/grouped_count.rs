//! `SELECT a, [b,] COUNT(*) … GROUP BY a[, b]`: a histogram or contingency table over one
//! or two categorical (or true/false) columns, every combination of levels a cell, empty
//! ones included, so nothing is revealed about which cells exist.
//!
//! Patients per cell: if the groups are patient columns (or the view is `patients`), a
//! patient falls in one cell (sensitivity 1); otherwise a patient's rows may fall in up to
//! `min(cells, cap)` cells, one count each (L2 sensitivity `sqrt(min(cells, cap))`). Rows
//! per cell: a patient's `cap` rows may all fall in one cell (sensitivity `cap`). Each cell
//! is withheld at a node below the minimum cell size and combined like a count.

use renkei_protocol::{MaskedShape, Query, Release};

use super::count::counts_rows;
use super::shared::{CountPart, add_counts};
use super::traits::{Accumulator, Exact, NoisyPart, Part, SiteRelease, Statistic};
use crate::bind::{Binder, Grouping, SchemaError};
use crate::cohort::Cohort;
use crate::column::NO_CELL;
use crate::estimate::{Combined, Estimate, GroupEstimate};
use crate::truth::{PooledCohort, TrueValue};

#[derive(Debug)]
pub(crate) struct GroupedCount;

#[derive(Debug)]
struct Table {
    grouping: Grouping,
    labels: Vec<Vec<String>>,
    /// Counting rows (at most `cap` per patient) rather than patients.
    rows: bool,
    cap: u32,
    sensitivity: f64,
}

impl Statistic for GroupedCount {
    fn bind(
        &self,
        query: &Query,
        binder: &mut Binder<'_>,
    ) -> Result<Box<dyn Accumulator>, SchemaError> {
        let grouping = binder.grouping(&query.group_by)?;
        let rows = counts_rows(query, binder.patient_view());
        let cap = binder.rows_per_patient();
        let sensitivity = if rows {
            f64::from(cap)
        } else if grouping.patient_level() || binder.patient_view() {
            1.0
        } else {
            // A patient's rows may fall in different cells, one count each.
            (grouping.cells().min(cap as usize) as f64).sqrt()
        };
        Ok(Box::new(Table {
            labels: grouping.labels(),
            grouping,
            rows,
            cap,
            sensitivity,
        }))
    }

    fn combine(&self, _query: &Query, sites: &[SiteRelease<'_>]) -> Combined {
        let Some(Release::Groups { labels, .. }) = sites.first().map(|s| s.release) else {
            return Combined::none("the nodes did not release GROUP BY cells");
        };
        let groups = labels
            .iter()
            .enumerate()
            .map(|(cell, label)| {
                let parts: Vec<CountPart> = sites
                    .iter()
                    .filter_map(|site| {
                        let Release::Groups {
                            counts, suppressed, ..
                        } = site.release
                        else {
                            return None;
                        };
                        Some((
                            *counts.get(cell)?,
                            *suppressed.get(cell)?,
                            site.noise_std,
                            site.min_cell_size,
                        ))
                    })
                    .collect();
                let (estimate, std_dev, ci95) = add_counts(&parts, 0);
                GroupEstimate {
                    group: label.clone(),
                    estimate: Estimate::Integer(estimate.round() as i64),
                    std_dev,
                    ci95,
                    withheld_by: parts.iter().filter(|p| p.1).count(),
                    note: None,
                }
            })
            .collect();
        Combined {
            groups,
            ..Combined::default()
        }
    }

    fn pooled(&self, query: &Query, cohort: &PooledCohort) -> TrueValue {
        let rows = counts_rows(query, query.view == crate::schema::PATIENTS_VIEW);
        let mut cells: std::collections::BTreeMap<Vec<String>, u64> = Default::default();
        for patient in &cohort.patients {
            let mut seen = std::collections::BTreeSet::new();
            for cell in patient.iter().filter_map(|row| row.cell.as_ref()) {
                if rows || seen.insert(cell) {
                    *cells.entry(cell.clone()).or_default() += 1;
                }
            }
        }
        TrueValue::Groups(cells.into_iter().collect())
    }
}

impl Accumulator for Table {
    fn parts(&self) -> Vec<Part> {
        vec![Part {
            sensitivity: self.sensitivity,
            len: self.labels.len(),
            counts: true,
        }]
    }

    fn value_scale(&self) -> u8 {
        0
    }

    fn vector(&self) -> bool {
        true
    }

    fn evaluate(&self, cohort: &Cohort<'_>) -> Exact {
        let cell = cohort.cells(&self.grouping);
        let mut counts = vec![0i64; self.labels.len()];
        if self.rows {
            for row in cohort.capped_rows(self.cap, &|row| cell[row] != NO_CELL) {
                counts[cell[row] as usize] += 1;
            }
        } else if let Some(patients) = cohort.patient_rows() {
            // Rows are patients: each counts once in its cell.
            for row in patients.iter().filter(|&row| cell[row] != NO_CELL) {
                counts[cell[row] as usize] += 1;
            }
        } else {
            // Distinct patients per cell, over each patient's capped rows: a patient is
            // in at most `min(cells, cap)` cells, as the sensitivity assumes.
            let rows = cohort.capped_rows(self.cap, &|row| cell[row] != NO_CELL);
            for (cell, _) in cohort.patients_per_cell(&rows, &cell) {
                counts[cell] += 1;
            }
        }
        Exact(vec![counts])
    }

    fn release(&self, noisy: Vec<NoisyPart>) -> Release {
        let part = noisy
            .into_iter()
            .next()
            .unwrap_or_else(|| NoisyPart::plain(vec![0; self.labels.len()]));
        Release::Groups {
            labels: self.labels.clone(),
            counts: part.values,
            suppressed: part.suppressed,
        }
    }

    fn masked_shape(&self) -> MaskedShape {
        MaskedShape::Groups {
            labels: self.labels.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{Aggregate, Filter, Query, Release};

    use crate::statistic::fixture::{self, pooled, release, sites};
    use crate::statistic::for_query;
    use crate::truth::TrueValue;

    fn by(view: &str, aggregate: Aggregate, group: &str) -> Query {
        Query {
            aggregate,
            group_by: vec![group.into()],
            ..Query::count_patients(view, Filter::True)
        }
    }

    fn level(on: bool) -> Option<Vec<String>> {
        Some(vec![on.to_string()])
    }

    #[test]
    fn every_cell_is_counted_as_the_pooled_truth() {
        let query = by("patients", Aggregate::CountPatients, "sex");
        let Release::Groups { labels, counts, .. } = release(&query) else {
            panic!("GROUP BY releases cells");
        };
        assert_eq!(
            labels,
            vec![vec!["female".to_string()], vec!["male".to_string()]]
        );
        assert_eq!(counts, vec![3, 2]);
        for (aggregate, expected) in [
            (Aggregate::CountPatients, vec![3, 4]),
            (Aggregate::CountRows, vec![3, 4]),
        ] {
            let query = by("timepoints", aggregate, "icu");
            let Release::Groups { counts, .. } = release(&query) else {
                panic!("GROUP BY releases cells");
            };
            assert_eq!(counts, expected, "{query}");
            let truth = for_query(&query).pooled(
                &query,
                &pooled(true, |_| true, |_| None, |r| level(r[4] == 1)),
            );
            let TrueValue::Groups(cells) = truth else {
                panic!("{truth:?}")
            };
            assert_eq!(
                cells.iter().map(|(_, n)| *n as i64).collect::<Vec<_>>(),
                expected
            );
        }
    }

    /// A patient with more timepoints than the cap counts in at most `cap` cells (its
    /// capped rows'), so the sensitivity `sqrt(min(cells, cap))` holds: the fourth patient's
    /// three timepoints lie in three wards, and with a cap of 2 it counts in two of them.
    #[test]
    fn distinct_patients_per_cell_count_only_capped_rows() {
        let query = by("timepoints", Aggregate::CountPatients, "ward");
        let Release::Groups { counts, .. } = release(&query) else {
            panic!("GROUP BY releases cells");
        };
        // Uncapped, ward b would count three patients.
        assert_eq!(counts, vec![3, 2, 1]);
        assert_eq!(counts.iter().sum::<i64>(), 6);
        let truth = for_query(&query).pooled(
            &query,
            &pooled(
                true,
                |_| true,
                |_| None,
                |r| Some(vec![["a", "b", "c"][r[5] as usize].to_string()]),
            ),
        );
        let TrueValue::Groups(cells) = truth else {
            panic!("{truth:?}")
        };
        assert_eq!(
            cells.iter().map(|(_, n)| *n as i64).collect::<Vec<_>>(),
            counts
        );
    }

    #[test]
    fn a_patients_rows_over_cells_set_the_sensitivity() {
        let data = fixture::dataset();
        let sensitivity = |query: Query| data.compile(&query).unwrap().parts()[0].sensitivity;
        assert_eq!(
            sensitivity(by("patients", Aggregate::CountPatients, "sex")),
            1.0
        );
        assert_eq!(
            sensitivity(by("timepoints", Aggregate::CountPatients, "sex")),
            1.0
        );
        assert_eq!(
            sensitivity(by("timepoints", Aggregate::CountPatients, "icu")),
            2f64.sqrt()
        );
        assert_eq!(
            sensitivity(by("timepoints", Aggregate::CountRows, "icu")),
            2.0
        );
    }

    #[test]
    fn cells_combine_like_counts_and_report_withholding() {
        let query = by("patients", Aggregate::CountPatients, "sex");
        let labels = vec![vec!["female".to_string()], vec!["male".to_string()]];
        let releases = [
            Release::Groups {
                labels: labels.clone(),
                counts: vec![30, 0],
                suppressed: vec![false, true],
            },
            Release::Groups {
                labels,
                counts: vec![12, 40],
                suppressed: vec![false, false],
            },
        ];
        let mut sites = sites(&releases, 0, 1.0);
        sites[0].min_cell_size = 5;
        let combined = for_query(&query).combine(&query, &sites);
        assert_eq!(combined.groups[0].estimate, crate::Estimate::Integer(42));
        assert_eq!(combined.groups[1].withheld_by, 1);
        // The withheld cell adds the middle of [0, 4].
        assert_eq!(combined.groups[1].estimate, crate::Estimate::Integer(42));
    }
}
