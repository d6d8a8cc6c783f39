//! The outside reference on pooled data: `tests/reference/duckdb_pooled.py` loads every
//! hospital's exports into DuckDB (consented patients only, typed by the schema) and runs
//! SQL there, fits Kaplan–Meier curves with lifelines and regressions with statsmodels.
//! Tests compare renkei's exact results with it; the survival and regression benches
//! measure noisy answers against it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use renkei_engine::DatasetSchema;
use renkei_engine::schema::{ColumnDef, ColumnType};
use serde_json::{Value, json};

use crate::network::Testnet;
use crate::synth::TIMEPOINT_TABLES;

/// The reference script's path in this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/duckdb_pooled.py")
}

/// A survival curve for lifelines: the SQL that lists each patient's groups, time and
/// event, and the horizon in days.
#[derive(Debug, Clone, Copy)]
pub struct CurveSql<'a> {
    pub sql: &'a str,
    pub horizon_days: u16,
}

/// A regression for statsmodels: the SQL that lists each patient's outcome, then each
/// covariate, and the model (`ols` or `logit`).
#[derive(Debug, Clone, Copy)]
pub struct FitSql<'a> {
    pub sql: &'a str,
    pub model: &'a str,
}

/// The script's input: the testnet's exports, the schema's columns with their types, the
/// queries, the curves and the fits.
pub fn spec(
    testnet: &Testnet,
    queries: &[&str],
    curves: &[CurveSql<'_>],
    fits: &[FitSql<'_>],
) -> anyhow::Result<Value> {
    let exports: Vec<Value> = (0..testnet.nodes.len())
        .map(|i| {
            let dir = testnet.dir.join(format!("node-{i}")).join("export");
            let tables: Vec<String> = TIMEPOINT_TABLES
                .iter()
                .map(|(t, _)| dir.join(format!("{t}.csv")).display().to_string())
                .collect();
            json!({"patients": dir.join("patients.csv").display().to_string(), "timepoints": tables})
        })
        .collect();
    let schema = DatasetSchema::covid19()?;
    Ok(json!({
        "exports": exports,
        "schema": {
            "patients": columns(&schema.patients),
            "timepoints": columns(&schema.timepoints),
        },
        "queries": queries,
        "curves": curves
            .iter()
            .map(|c| json!({"sql": c.sql, "horizon": c.horizon_days}))
            .collect::<Vec<_>>(),
        "fits": fits
            .iter()
            .map(|f| json!({"sql": f.sql, "model": f.model}))
            .collect::<Vec<_>>(),
    }))
}

/// Runs the reference with `python` on `spec` (written into `dir`): one result per query,
/// then one per curve, then one per fit.
pub fn run(python: &Path, dir: &Path, spec: &Value) -> anyhow::Result<Vec<Value>> {
    let path = dir.join("reference-spec.json");
    std::fs::write(&path, spec.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    let output = Command::new(python)
        .arg(script())
        .arg(&path)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the pooled reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// A curve result's strata: (group labels, S(t) for each day to the horizon).
pub fn curves(result: &Value) -> anyhow::Result<Vec<(Vec<String>, Vec<f64>)>> {
    let strata = result["curves"]
        .as_array()
        .context("a curve result lists its strata")?;
    strata
        .iter()
        .map(|stratum| {
            let group = stratum["group"]
                .as_array()
                .context("a stratum has its group")?
                .iter()
                .map(label)
                .collect();
            let survival = stratum["survival"]
                .as_array()
                .context("a stratum has its curve")?
                .iter()
                .map(|v| v.as_f64().context("S(t) is a number"))
                .collect::<anyhow::Result<_>>()?;
            Ok((group, survival))
        })
        .collect()
}

/// A fit result's coefficients and standard errors, intercept first, and its patients.
pub fn fit(result: &Value) -> anyhow::Result<(Vec<f64>, Vec<f64>, usize)> {
    let numbers = |key: &str| -> anyhow::Result<Vec<f64>> {
        result["fit"][key]
            .as_array()
            .with_context(|| format!("a fit result has its {key}"))?
            .iter()
            .map(|v| v.as_f64().context("a coefficient is a number"))
            .collect()
    };
    let n = result["fit"]["n"]
        .as_u64()
        .context("a fit result has its n")?;
    Ok((numbers("params")?, numbers("bse")?, usize::try_from(n)?))
}

/// A DuckDB value as renkei labels a group (`true`, a level).
pub fn label(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// The schema's columns with what DuckDB needs to type them.
fn columns(defs: &[ColumnDef]) -> Vec<Value> {
    defs.iter()
        .map(|c| {
            let kind = match &c.kind {
                ColumnType::Integer { .. } => json!({"type": "integer"}),
                ColumnType::Decimal { scale, .. } => json!({"type": "decimal", "scale": scale}),
                ColumnType::Categorical { levels } => {
                    json!({"type": "categorical", "levels": levels})
                }
                ColumnType::Boolean => json!({"type": "boolean"}),
            };
            json!([c.name, kind])
        })
        .collect()
}
