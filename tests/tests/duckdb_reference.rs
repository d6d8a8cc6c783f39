//! renkei's exact (pre-noise) engine results against DuckDB running the same SQL on the
//! pooled exports of every hospital: per-patient `WITH` tables (MIN, MAX, COUNT, BOOL_OR,
//! BOOL_AND, ARG_MIN/ARG_MAX, each with FILTER), comparisons between derived columns, and
//! counts, sums, means and groups over them; Kaplan–Meier curves against lifelines on the
//! same pooled patients; and linear and logistic regressions (over `patients` and over
//! `WITH` tables) against statsmodels' OLS and Logit, coefficients and standard errors.
//!
//! The reference is `tests/reference/duckdb_pooled.py` (through
//! `renkei_testnet::reference`), run by the Python that
//! `RENKEI_PYTHON` names (or `python3`). When `RENKEI_REQUIRE_REFERENCES` is set (as CI sets
//! it), a Python without `duckdb` fails the test; otherwise the test says it skipped.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use renkei_aggregator::sql;
use renkei_engine::Regression;
use renkei_engine::SiteRelease;
use renkei_protocol::{MicroRho, Query, Release, RequestId};
use renkei_testnet::reference::{self, CurveSql, FitSql};
use renkei_tests::start_testnet;
use serde_json::Value;

/// Each query is valid SQL for both renkei and DuckDB, and is sent to both unchanged.
///
/// Levels are compared with `IN`, not `>=`: DuckDB compares an ENUM that comes out of an
/// aggregate (`MAX(severity)` in a CTE) with a string literal as text (`'critical' >=
/// 'severe'` is false there), where renkei, like a direct ENUM column in DuckDB, uses the
/// schema's order.
const QUERIES: &[&str] = &[
    // The example, as a researcher writes it.
    "WITH p AS (SELECT patient_id, \
       MIN(days_since_admission) FILTER (WHERE tocilizumab) AS toci_day, \
       MIN(days_since_admission) FILTER (WHERE care_level IN ('icu_ventilation', 'ecmo')) AS icu_day, \
       MAX(crp) AS max_crp, BOOL_OR(dexamethasone) AS dexa \
     FROM timepoints GROUP BY patient_id) \
     SELECT COUNT(*) FROM p WHERE toci_day <= 3 AND icu_day > toci_day",
    "WITH p AS (SELECT patient_id, \
       MIN(days_since_admission) FILTER (WHERE tocilizumab) AS toci_day, \
       MIN(days_since_admission) FILTER (WHERE care_level IN ('icu_ventilation', 'ecmo')) AS icu_day \
     FROM timepoints GROUP BY patient_id) \
     SELECT COUNT(*) FROM p WHERE icu_day BETWEEN toci_day AND toci_day + 4",
    "WITH p AS (SELECT patient_id, MIN(days_since_onset) AS first_day, \
       MAX(days_since_onset) AS last_day FROM timepoints GROUP BY patient_id) \
     SELECT COUNT(*) FROM p WHERE last_day - first_day >= 7",
    "WITH p AS (SELECT patient_id, ARG_MIN(crp, days_since_onset) AS first_crp, \
       ARG_MAX(crp, days_since_onset) AS last_crp FROM timepoints GROUP BY patient_id) \
     SELECT COUNT(*) FROM p WHERE last_crp < first_crp",
    "WITH p AS (SELECT patient_id, ARG_MAX(care_level, days_since_onset) AS last_care, \
       MAX(severity) AS worst FROM timepoints GROUP BY patient_id) \
     SELECT COUNT(*) FROM p WHERE worst IN ('severe', 'critical') AND last_care IN ('outpatient', 'hospitalized')",
    "WITH p AS (SELECT patient_id, COUNT(*) FILTER (WHERE il6 > 100) AS high_il6, \
       COUNT(crp) AS crp_measured FROM timepoints GROUP BY patient_id) \
     SELECT COUNT(*) FROM p WHERE high_il6 >= 2",
    "WITH p AS (SELECT patient_id, COUNT(crp) AS crp_measured FROM timepoints \
       GROUP BY patient_id) SELECT SUM(crp_measured) FROM p",
    "WITH p AS (SELECT patient_id, age, BOOL_AND(NOT dexamethasone) AS never_dexa \
       FROM timepoints GROUP BY patient_id, age) \
     SELECT COUNT(*) FROM p WHERE age >= 65 AND never_dexa",
    "WITH p AS (SELECT patient_id, MIN(igg) FILTER (WHERE days_since_onset >= 14) AS late_igg \
       FROM timepoints GROUP BY patient_id) SELECT COUNT(*) FROM p WHERE late_igg IS NULL",
    "WITH p AS (SELECT patient_id, MAX(neutralizing_titer) AS peak_titer FROM timepoints \
       WHERE age >= 60 GROUP BY patient_id) SELECT COUNT(*) FROM p WHERE peak_titer >= 160",
    "WITH p AS (SELECT patient_id, MAX(crp) AS max_crp, BOOL_OR(dexamethasone) AS dexa \
       FROM timepoints GROUP BY patient_id) SELECT AVG(max_crp) FROM p WHERE dexa",
    "WITH p AS (SELECT patient_id, MAX(il6) AS peak_il6 FROM timepoints \
       WHERE severity = 'critical' GROUP BY patient_id) SELECT SUM(peak_il6) FROM p",
    "WITH p AS (SELECT patient_id, sex, BOOL_OR(remdesivir) AS remdesivir_given \
       FROM timepoints GROUP BY patient_id, sex) \
     SELECT remdesivir_given, COUNT(*) FROM p GROUP BY remdesivir_given",
    "WITH p AS (SELECT patient_id, diabetes, MAX(severity) AS worst FROM timepoints \
       GROUP BY patient_id, diabetes) \
     SELECT diabetes, worst, COUNT(*) FROM p GROUP BY diabetes, worst",
    "WITH p AS (SELECT patient_id, death_day, followup_day, BOOL_OR(dexamethasone) AS dexa, \
       MAX(severity) AS worst FROM timepoints GROUP BY patient_id, death_day, followup_day) \
     SELECT dexa, COUNT(*) FROM p WHERE worst IN ('severe', 'critical') GROUP BY dexa",
];

/// Survival curves: renkei's query, and the DuckDB query that lists each patient's groups,
/// time and event for lifelines to fit, with the horizon.
const CURVES: &[(&str, &str, u16)] = &[
    (
        "SELECT diabetes, KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 60) \
         FROM patients GROUP BY diabetes",
        "SELECT diabetes, COALESCE(death_day, followup_day), death_day IS NOT NULL FROM patients",
        60,
    ),
    (
        "WITH p AS (SELECT patient_id, death_day, followup_day, BOOL_OR(dexamethasone) AS dexa, \
           MAX(severity) AS worst FROM timepoints GROUP BY patient_id, death_day, followup_day) \
         SELECT dexa, KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 30) \
         FROM p WHERE worst IN ('severe', 'critical') GROUP BY dexa",
        "WITH p AS (SELECT patient_id, death_day, followup_day, BOOL_OR(dexamethasone) AS dexa, \
           MAX(severity) AS worst FROM timepoints GROUP BY patient_id, death_day, followup_day) \
         SELECT dexa, COALESCE(death_day, followup_day), death_day IS NOT NULL FROM p \
         WHERE worst IN ('severe', 'critical')",
        30,
    ),
    (
        "WITH p AS (SELECT patient_id, followup_day, MIN(days_since_onset) \
           FILTER (WHERE care_level IN ('icu_ventilation', 'ecmo')) AS icu_day \
           FROM timepoints GROUP BY patient_id, followup_day) \
         SELECT KAPLAN_MEIER(COALESCE(icu_day, followup_day), icu_day IS NOT NULL, 45) FROM p",
        "WITH p AS (SELECT patient_id, followup_day, MIN(days_since_onset) \
           FILTER (WHERE care_level IN ('icu_ventilation', 'ecmo')) AS icu_day \
           FROM timepoints GROUP BY patient_id, followup_day) \
         SELECT COALESCE(icu_day, followup_day), icu_day IS NOT NULL FROM p",
        45,
    ),
];

/// Regressions: renkei's query, the DuckDB query that lists each patient's outcome and
/// covariates for statsmodels, and the model.
const FITS: &[(&str, &str, &str)] = &[
    (
        "SELECT LINEAR_REGRESSION(hypertension, age, diabetes, sex = 'male') FROM patients \
         WHERE age >= 20",
        "SELECT CAST(hypertension AS DOUBLE), age, CAST(diabetes AS DOUBLE), \
         CAST(sex = 'male' AS DOUBLE) FROM patients WHERE age >= 20",
        "ols",
    ),
    (
        "WITH p AS (SELECT patient_id, age, MAX(crp) AS max_crp, BOOL_OR(dexamethasone) AS dexa \
           FROM timepoints GROUP BY patient_id, age) \
         SELECT LINEAR_REGRESSION(max_crp, age, dexa) FROM p",
        "WITH p AS (SELECT patient_id, age, MAX(crp) AS max_crp, BOOL_OR(dexamethasone) AS dexa \
           FROM timepoints GROUP BY patient_id, age) \
         SELECT max_crp, age, CAST(dexa AS DOUBLE) FROM p",
        "ols",
    ),
    (
        "SELECT LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), age, diabetes, \
           hypertension, obesity, sex = 'male', iterations => 15) FROM patients",
        "SELECT CAST(severity IN ('severe', 'critical') AS DOUBLE), age, \
           CAST(diabetes AS DOUBLE), CAST(hypertension AS DOUBLE), CAST(obesity AS DOUBLE), \
           CAST(sex = 'male' AS DOUBLE) FROM patients",
        "logit",
    ),
    (
        "WITH p AS (SELECT patient_id, age, death_day, BOOL_OR(dexamethasone) AS dexa, \
           MAX(severity) AS worst FROM timepoints GROUP BY patient_id, age, death_day) \
         SELECT LOGISTIC_REGRESSION(death_day IS NOT NULL, age, dexa, iterations => 15) FROM p \
         WHERE worst IN ('moderate', 'severe', 'critical')",
        "WITH p AS (SELECT patient_id, age, death_day, BOOL_OR(dexamethasone) AS dexa, \
           MAX(severity) AS worst FROM timepoints GROUP BY patient_id, age, death_day) \
         SELECT CAST(death_day IS NOT NULL AS DOUBLE), age, CAST(dexa AS DOUBLE) FROM p \
         WHERE worst IN ('moderate', 'severe', 'critical')",
        "logit",
    ),
];

/// Every node's exact (unnoised) release of `query`.
fn exact_releases(
    datasets: &[std::sync::Arc<renkei_engine::Dataset>],
    query: &Query,
) -> Vec<Release> {
    datasets
        .iter()
        .map(|dataset| {
            let compiled = dataset
                .compile(query)
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            compiled.unnoised_release(dataset.evaluate(&compiled))
        })
        .collect()
}

/// Releases as the aggregator reads them, without noise.
fn noiseless_sites(releases: &[Release]) -> Vec<SiteRelease<'_>> {
    releases
        .iter()
        .map(|release| SiteRelease {
            release,
            value_scale: 0,
            min_cell_size: 0,
            noise_std: 0.0,
            count_noise_std: None,
        })
        .collect()
}

/// renkei's fit of `query` from the nodes' exact releases, combined as the aggregator
/// combines them (no noise): one release for a linear fit; for a logistic one, each
/// step's coefficients from the step before, to the last.
fn exact_fit(datasets: &[std::sync::Arc<renkei_engine::Dataset>], query: &Query) -> Regression {
    let mut query = query.clone();
    loop {
        let releases = exact_releases(datasets, &query);
        let combined =
            renkei_engine::statistic::combine(&query, &noiseless_sites(&releases)).unwrap();
        let fit = combined
            .regression
            .unwrap_or_else(|| panic!("{query}: {:?}", combined.note));
        match fit.next_step.clone() {
            Some(next) => {
                query.advance_fit(RequestId([1; 16]), next);
            }
            None => return fit,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_patient_tables_agree_with_duckdb_on_the_pooled_data() {
    let Some(python) = python_with_duckdb() else {
        return;
    };
    let fixture = start_testnet(2, 1_200, MicroRho(MicroRho::PER_RHO)).await;
    let testnet = &fixture.testnet;

    let curves: Vec<CurveSql<'_>> = CURVES
        .iter()
        .map(|(_, sql, horizon_days)| CurveSql {
            sql,
            horizon_days: *horizon_days,
        })
        .collect();
    let fits: Vec<FitSql<'_>> = FITS
        .iter()
        .map(|(_, sql, model)| FitSql { sql, model })
        .collect();
    let spec = reference::spec(testnet, QUERIES, &curves, &fits).unwrap();
    let results = reference::run(&python, fixture.dir.path(), &spec).unwrap();
    assert_eq!(results.len(), QUERIES.len() + CURVES.len() + FITS.len());

    let datasets: Vec<_> = (0..testnet.nodes.len())
        .map(|i| testnet.running(i).unwrap().desk().dataset())
        .collect();
    let mut nonzero = 0;
    for (text, reference) in QUERIES.iter().zip(&results) {
        let query = sql::compile(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        // The pooled answer is the sum of every hospital's exact answer.
        let releases: Vec<(Release, u8)> = datasets
            .iter()
            .map(|dataset| {
                let compiled = dataset
                    .compile(&query)
                    .unwrap_or_else(|e| panic!("{text}: {e}"));
                (
                    compiled.unnoised_release(dataset.evaluate(&compiled)),
                    compiled.value_scale(),
                )
            })
            .collect();
        let rows = reference["rows"].as_array().unwrap();
        match &releases[0].0 {
            Release::Scalar { .. } => {
                let scale = 10f64.powi(i32::from(releases[0].1));
                let engine: i64 = releases
                    .iter()
                    .map(|(r, _)| match r {
                        Release::Scalar { value, .. } => *value,
                        other => panic!("{text}: {other:?}"),
                    })
                    .sum();
                let duck = number(&rows[0][0]);
                assert_eq!(engine, (duck * scale).round() as i64, "{text}");
                nonzero += usize::from(engine != 0);
            }
            Release::SumAndCount { .. } => {
                let scale = 10f64.powi(i32::from(releases[0].1));
                let (sum, count) = releases.iter().fold((0, 0), |(s, c), (r, _)| match r {
                    Release::SumAndCount { sum, count } => (s + sum, c + count),
                    other => panic!("{text}: {other:?}"),
                });
                let duck = number(&rows[0][0]);
                let engine = sum as f64 / scale / count as f64;
                assert!(
                    (engine - duck).abs() <= 1e-9 * duck.abs().max(1.0),
                    "{text}: renkei {engine}, DuckDB {duck}"
                );
                nonzero += usize::from(count != 0);
            }
            Release::Groups { labels, .. } => {
                let mut engine = vec![0i64; labels.len()];
                for (release, _) in &releases {
                    let Release::Groups {
                        labels: theirs,
                        counts,
                        ..
                    } = release
                    else {
                        panic!("{text}: {release:?}")
                    };
                    assert_eq!(theirs, labels, "{text}: every node has the same cells");
                    for (total, count) in engine.iter_mut().zip(counts) {
                        *total += count;
                    }
                }
                // DuckDB lists only the groups that occur; renkei lists every cell.
                let mut matched = 0;
                for row in rows {
                    let row = row.as_array().unwrap();
                    let (keys, count) = row.split_at(row.len() - 1);
                    let label: Vec<String> = keys.iter().map(reference::label).collect();
                    let cell = labels
                        .iter()
                        .position(|l| *l == label)
                        .unwrap_or_else(|| panic!("{text}: DuckDB group {label:?} not a cell"));
                    assert_eq!(engine[cell], number(&count[0]) as i64, "{text} {label:?}");
                    matched += engine[cell];
                }
                assert_eq!(
                    matched,
                    engine.iter().sum::<i64>(),
                    "{text}: renkei counts patients in cells DuckDB has none in"
                );
                nonzero += usize::from(rows.len() >= 2);
            }
            other => panic!("{text}: unexpected release {other:?}"),
        }
    }
    // Survival curves: the exact trees of every node, added and read as the aggregator
    // reads them (no noise), equal lifelines' Kaplan–Meier on the pooled patients.
    for ((text, _, horizon), reference) in CURVES.iter().zip(&results[QUERIES.len()..]) {
        let query = sql::compile(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let releases = exact_releases(&datasets, &query);
        let combined =
            renkei_engine::statistic::combine(&query, &noiseless_sites(&releases)).unwrap();
        let survival = combined
            .survival
            .unwrap_or_else(|| panic!("{text}: {:?}", combined.note));
        let expected = reference["curves"].as_array().unwrap();
        let mut compared = 0;
        for stratum in expected {
            let group: Vec<String> = stratum["group"]
                .as_array()
                .unwrap()
                .iter()
                .map(reference::label)
                .collect();
            let curve = survival
                .strata
                .iter()
                .find(|c| c.group == group)
                .unwrap_or_else(|| panic!("{text}: no stratum {group:?}"));
            let truth: Vec<f64> = stratum["survival"]
                .as_array()
                .unwrap()
                .iter()
                .map(number)
                .collect();
            assert_eq!(truth.len(), usize::from(*horizon) + 1);
            assert_eq!(curve.survival.len(), truth.len(), "{text}");
            for (day, (ours, theirs)) in curve.survival.iter().zip(&truth).enumerate() {
                assert!(
                    (ours - theirs).abs() < 1e-9,
                    "{text} {group:?} day {day}: renkei {ours}, lifelines {theirs}"
                );
            }
            assert_eq!(
                curve.patients.map(|n| n as f64),
                Some(number(&stratum["patients"])),
                "{text} {group:?}"
            );
            // The curve must fall, or the comparison proves little.
            assert!(truth[truth.len() - 1] < 0.99, "{text} {group:?}: {truth:?}");
            compared += 1;
        }
        assert_eq!(compared, survival.strata.len(), "{text}");
    }
    // Regressions: the exact fit equals statsmodels' on the pooled rows, coefficients and
    // standard errors (without noise, renkei's are the sampling ones statsmodels reports).
    let fit_results = &results[QUERIES.len() + CURVES.len()..];
    for ((text, _, _), reference) in FITS.iter().zip(fit_results) {
        let query = sql::compile(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let fit = exact_fit(&datasets, &query);
        let (params, bse, n) = reference::fit(reference).unwrap();
        assert_eq!(fit.coefficients.len(), params.len(), "{text}");
        assert!(
            (fit.patients - n as f64).abs() < 1e-3,
            "{text}: {} vs {n}",
            fit.patients
        );
        assert!(n >= 100, "{text}: only {n} rows");
        for (c, (p, se)) in fit.coefficients.iter().zip(params.iter().zip(&bse)) {
            assert!(
                (c.estimate - p).abs() <= 1e-6 * (1.0 + p.abs()),
                "{text} {}: renkei {}, statsmodels {p}",
                c.term,
                c.estimate
            );
            assert!(
                (c.std_error - se).abs() <= 1e-5 * se,
                "{text} {}: renkei se {}, statsmodels {se}",
                c.term,
                c.std_error
            );
        }
        assert!(fit.converged, "{text}");
    }
    // The queries must select something, or the comparison proves little.
    assert!(
        nonzero >= QUERIES.len() - 1,
        "only {nonzero} of {} queries selected anything",
        QUERIES.len()
    );
    fixture.testnet.shutdown().await;
}

fn number(value: &Value) -> f64 {
    match value {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        Value::Null => 0.0,
        other => panic!("not a number: {other}"),
    }
}

/// The Python to run the reference with, if it has DuckDB.
fn python_with_duckdb() -> Option<PathBuf> {
    let python = std::env::var_os("RENKEI_PYTHON").map_or_else(|| "python3".into(), PathBuf::from);
    let has_duckdb = Command::new(&python)
        .args(["-c", "import duckdb, lifelines, statsmodels"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_duckdb {
        return Some(python);
    }
    assert!(
        std::env::var_os("RENKEI_REQUIRE_REFERENCES").is_none(),
        "RENKEI_REQUIRE_REFERENCES is set but {} cannot import duckdb, lifelines and statsmodels",
        python.display()
    );
    eprintln!(
        "skipped: {} cannot import duckdb, lifelines and statsmodels (set RENKEI_PYTHON to a Python that can)",
        python.display()
    );
    None
}
