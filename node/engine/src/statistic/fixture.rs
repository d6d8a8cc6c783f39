//! A small image to test statistics on: six patients (one without consent), their
//! timepoints, and the pooled rows the same data gives the truth.
use std::sync::Arc;

use renkei_protocol::{Query, Release};

use super::traits::{NoisyPart, SiteRelease};
use crate::cohort::spread;
use crate::column::NULL;
use crate::image::{Dataset, ImageBuilder};
use crate::schema::{DatasetSchema, SECONDARY_USE};
use crate::truth::{PooledCohort, PooledRow};

const SCHEMA: &str = r#"
name = "test"
version = 1
max_timepoints_per_patient = 2

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

[[timepoints]]
name = "crp"
type = "decimal"
min = 0.0
max = 50.0
scale = 1

[[timepoints]]
name = "icu"
type = "boolean"

[[timepoints]]
name = "ward"
type = "categorical"
levels = ["a", "b", "c"]
"#;

/// (age, sex level, diabetes, consented, timepoints as (crp in tenths, icu, ward level)).
type Patient = (i64, i64, i64, bool, &'static [(i64, i64, i64)]);

pub(crate) const PATIENTS: &[Patient] = &[
    (30, 0, 0, true, &[(12, 0, 0), (80, 1, 1)]),
    (45, 1, 1, true, &[(450, 1, 0)]),
    (70, 1, 1, true, &[(NULL, 0, 1), (40, 1, 1)]),
    (20, 0, 0, true, &[]),
    // Three timepoints in three wards: only two count, its first and its last.
    (90, 0, 1, true, &[(5, 0, 0), (20, 1, 1), (30, 1, 2)]),
    (99, 1, 1, false, &[(300, 1, 2)]),
];

pub(crate) fn dataset() -> Dataset {
    let schema = Arc::new(DatasetSchema::from_toml(SCHEMA).unwrap());
    let mut image = ImageBuilder::new(schema);
    let mut columns = vec![Vec::new(); 3];
    for (index, (age, sex, diabetes, consented, _)) in PATIENTS.iter().enumerate() {
        let scopes: &[&str] = if *consented { &[SECONDARY_USE] } else { &[] };
        assert_eq!(
            image.add_patient(scopes.iter().copied()).unwrap(),
            index as u32
        );
        columns[0].push(*age);
        columns[1].push(*sex);
        columns[2].push(*diabetes);
    }
    image.extend_patient_columns(&columns);
    let mut timepoint_columns = vec![Vec::new(); 3];
    for (patient, (.., timepoints)) in PATIENTS.iter().enumerate() {
        for (number, (crp, icu, ward)) in timepoints.iter().enumerate() {
            image.add_timepoint(patient as u32, number as u16);
            timepoint_columns[0].push(*crp);
            timepoint_columns[1].push(*icu);
            timepoint_columns[2].push(*ward);
        }
    }
    image.extend_timepoint_columns(&timepoint_columns, None);
    image.finish()
}

/// The pooled rows of the consenting patients with a row matching `keep`, as the
/// testnet's generator would hand them to a statistic's truth: the view's rows as
/// (age, sex, diabetes, crp, icu, ward), the statistic's value and the row's cell read by
/// `value` and `cell`.
pub(crate) fn pooled(
    timepoints: bool,
    keep: impl Fn(&[i64; 6]) -> bool,
    value: impl Fn(&[i64; 6]) -> Option<f64>,
    cell: impl Fn(&[i64; 6]) -> Option<Vec<String>>,
) -> PooledCohort {
    let mut cohort = PooledCohort::default();
    for (age, sex, diabetes, consented, timepoints_of) in PATIENTS {
        if !consented {
            continue;
        }
        let rows: Vec<[i64; 6]> = if timepoints {
            timepoints_of
                .iter()
                .map(|(crp, icu, ward)| [*age, *sex, *diabetes, *crp, *icu, *ward])
                .collect()
        } else {
            vec![[*age, *sex, *diabetes, NULL, NULL, NULL]]
        };
        // The rows a statistic keeps, spread over the course as the engine keeps them.
        let matching: Vec<&[i64; 6]> = rows.iter().filter(|row| keep(row)).collect();
        let rows: Vec<PooledRow> = spread(matching.len(), if timepoints { 2 } else { 1 })
            .map(|i| PooledRow {
                value: value(matching[i]),
                cell: cell(matching[i]),
                event: false,
                terms: Vec::new(),
            })
            .collect();
        if !rows.is_empty() {
            cohort.patients.push(rows);
        }
    }
    cohort
}

/// The unnoised release of `sql`-like `query` at the fixture.
pub(crate) fn release(query: &Query) -> Release {
    let data = dataset();
    let compiled = data.compile(query).unwrap();
    compiled.unnoised_release(data.evaluate(&compiled))
}

/// Releases as the final side reads them, each with noise sd `sd`.
pub(crate) fn sites(releases: &[Release], scale: u8, sd: f64) -> Vec<SiteRelease<'_>> {
    releases
        .iter()
        .map(|release| SiteRelease {
            release,
            value_scale: scale,
            min_cell_size: 0,
            noise_std: sd,
            count_noise_std: Some(sd),
        })
        .collect()
}

pub(crate) fn plain(values: Vec<i64>) -> NoisyPart {
    NoisyPart::plain(values)
}
