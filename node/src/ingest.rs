//! Loading a hospital's patient CSV into the node's store: validated whole, then written
//! atomically, or not at all.
//!
//! The patient CSV has a header row with exactly these columns (any order):
//! `patient_id, age, sex, severity, diabetes, hypertension, chronic_lung_disease,
//! cardiovascular_disease, kidney_disease, cancer, obesity, consent_secondary_use`.
//! `age` is an integer 0–120; `sex` and `severity` take the levels in [`crate::cohort`];
//! flags take `true/false`, `yes/no` or `1/0`. The hospital's patient id is replaced by a
//! keyed hash under the node's secret, so the store holds no raw identifier; loading the
//! same file again replaces those patients instead of duplicating them.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cohort::{COMORBIDITIES, MAX_AGE, PatientRecord, SEVERITY_LEVELS, SEX_LEVELS};
use crate::error::NodeError;
use crate::home::pseudonym_secret;
use crate::store::NodeStore;

/// How many problems one report lists before summarising the rest.
const MAX_REPORTED_ERRORS: usize = 20;

/// One problem in an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestError {
    pub file: String,
    /// 1-based line number, when the problem is on a line.
    pub line: Option<u64>,
    pub column: Option<String>,
    pub reason: String,
}

impl fmt::Display for IngestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(column) = &self.column {
            write!(f, " column `{column}`")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every problem found in a file (the first [`MAX_REPORTED_ERRORS`], and how many more).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct IngestErrors {
    pub errors: Vec<IngestError>,
    pub more: usize,
}

impl fmt::Display for IngestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.errors {
            writeln!(f, "  {error}")?;
        }
        if self.more > 0 {
            writeln!(f, "  … and {} more", self.more)?;
        }
        Ok(())
    }
}

/// What an ingest did (or, on a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct IngestReport {
    pub rows: usize,
    pub consented: usize,
    /// Patients not in the store before.
    pub added: usize,
    /// Patients already in the store, now replaced by this file's rows.
    pub replaced: usize,
    pub dry_run: bool,
}

const REQUIRED: &[&str] = &[
    "patient_id",
    "age",
    "sex",
    "severity",
    "consent_secondary_use",
];

fn parse_flag(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "y" | "t" => Some(true),
        "false" | "no" | "0" | "n" | "f" => Some(false),
        _ => None,
    }
}

fn parse_level(text: &str, levels: &[&str]) -> Option<u8> {
    let text = text.trim().to_ascii_lowercase();
    levels.iter().position(|l| *l == text).map(|i| i as u8)
}

struct Collector {
    file: String,
    errors: Vec<IngestError>,
    more: usize,
}

impl Collector {
    fn push(&mut self, line: Option<u64>, column: Option<&str>, reason: String) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(IngestError {
                file: self.file.clone(),
                line,
                column: column.map(str::to_string),
                reason,
            });
        } else {
            self.more += 1;
        }
    }
}

/// Parses and validates a whole patient CSV; returns `(patient id, record)` pairs or every
/// problem found.
pub fn read_patients_csv(path: &Path) -> Result<Vec<(String, PatientRecord)>, IngestErrors> {
    let mut problems = Collector {
        file: path.display().to_string(),
        errors: Vec::new(),
        more: 0,
    };
    let fail = |problems: Collector| IngestErrors {
        errors: problems.errors,
        more: problems.more,
    };
    let mut reader = match csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
    {
        Ok(reader) => reader,
        Err(e) => {
            problems.push(None, None, e.to_string());
            return Err(fail(problems));
        }
    };
    let headers = match reader.headers() {
        Ok(headers) => headers.clone(),
        Err(e) => {
            problems.push(Some(1), None, e.to_string());
            return Err(fail(problems));
        }
    };
    let known: Vec<&str> = REQUIRED.iter().chain(COMORBIDITIES).copied().collect();
    let index_of = |name: &str| headers.iter().position(|h| h == name);
    let mut seen_headers = HashSet::new();
    for header in headers.iter() {
        if !seen_headers.insert(header) {
            problems.push(
                Some(1),
                Some(header),
                "column appears more than once".into(),
            );
        }
        if !known.contains(&header) {
            problems.push(
                Some(1),
                Some(header),
                format!("unknown column; expected: {}", known.join(", ")),
            );
        }
    }
    let mut columns = Vec::with_capacity(known.len());
    for name in &known {
        match index_of(name) {
            Some(i) => columns.push(i),
            None => problems.push(Some(1), Some(name), "required column is missing".into()),
        }
    }
    if !problems.errors.is_empty() {
        return Err(fail(problems));
    }
    let [id_col, age_col, sex_col, severity_col, consent_col] =
        [columns[0], columns[1], columns[2], columns[3], columns[4]];
    let flag_cols = &columns[REQUIRED.len()..];

    let mut seen = HashSet::new();
    let mut patients = Vec::new();
    for row in reader.records() {
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                let line = e.position().map(|p| p.line());
                problems.push(line, None, e.to_string());
                continue;
            }
        };
        let line = row.position().map(|p| p.line());
        let field = |i: usize| row.get(i).unwrap_or("");
        let before = problems.errors.len() + problems.more;

        let id = field(id_col).to_string();
        if id.is_empty() {
            problems.push(line, Some("patient_id"), "empty patient id".into());
        } else if !seen.insert(id.clone()) {
            problems.push(
                line,
                Some("patient_id"),
                "patient id appears more than once in this file".into(),
            );
        }
        let age = match field(age_col).parse::<u8>() {
            Ok(age) if age <= MAX_AGE => age,
            _ => {
                problems.push(
                    line,
                    Some("age"),
                    format!("`{}` is not an integer age 0–{MAX_AGE}", field(age_col)),
                );
                0
            }
        };
        let mut level = |col: usize, name: &str, levels: &[&str]| {
            parse_level(field(col), levels).unwrap_or_else(|| {
                problems.push(
                    line,
                    Some(name),
                    format!("`{}` is not one of: {}", field(col), levels.join(", ")),
                );
                0
            })
        };
        let sex = level(sex_col, "sex", SEX_LEVELS);
        let severity = level(severity_col, "severity", SEVERITY_LEVELS);
        let mut flag = |col: usize, name: &str| {
            parse_flag(field(col)).unwrap_or_else(|| {
                problems.push(
                    line,
                    Some(name),
                    format!("`{}` is not true/false, yes/no or 1/0", field(col)),
                );
                false
            })
        };
        let consent = flag(consent_col, "consent_secondary_use");
        let mut comorbidities = 0u8;
        for (bit, (&col, name)) in flag_cols.iter().zip(COMORBIDITIES).enumerate() {
            if flag(col, name) {
                comorbidities |= 1 << bit;
            }
        }
        if problems.errors.len() + problems.more == before {
            patients.push((
                id,
                PatientRecord {
                    age,
                    sex,
                    severity,
                    comorbidities,
                    consent_secondary_use: consent,
                },
            ));
        }
    }
    if problems.errors.is_empty() {
        Ok(patients)
    } else {
        Err(fail(problems))
    }
}

/// The stored key of a hospital patient id: HMAC-SHA256 under the node's secret.
pub(crate) fn pseudonym(secret: &[u8; 32], patient_id: &str) -> Result<[u8; 32], NodeError> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| NodeError::CorruptStore {
            what: "pseudonymisation secret".into(),
            reason: e.to_string(),
        })?;
    mac.update(patient_id.as_bytes());
    Ok(mac.finalize().into_bytes().into())
}

/// Validates `path` and, unless `dry_run`, writes all its patients in one atomic batch.
pub fn ingest_patients(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let patients = read_patients_csv(path)?;
    let secret = pseudonym_secret(store)?;
    let mut report = IngestReport {
        rows: patients.len(),
        dry_run,
        ..Default::default()
    };
    let mut batch = sled::Batch::default();
    for (id, record) in &patients {
        let key = pseudonym(&secret, id)?;
        if store.patients.contains_key(key)? {
            report.replaced += 1;
        } else {
            report.added += 1;
        }
        report.consented += usize::from(record.consent_secondary_use);
        batch.insert(&key[..], renkei_protocol::codec::encode(record)?);
    }
    if !dry_run {
        store.patients.apply_batch(batch)?;
        store.flush()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cohort::Cohort;
    use crate::home::NodeHome;

    const HEADER: &str = "patient_id,age,sex,severity,diabetes,hypertension,chronic_lung_disease,cardiovascular_disease,kidney_disease,cancer,obesity,consent_secondary_use\n";

    fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("{HEADER}{body}")).unwrap();
        path
    }

    #[test]
    fn loads_atomically_and_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
        let store = home.open_store().unwrap();
        let good = write(
            dir.path(),
            "good.csv",
            "P1,70,female,severe,yes,no,0,0,0,0,1,true\nP2,35,male,mild,no,no,0,0,0,0,0,false\n",
        );
        let report = ingest_patients(&store, &good, false).unwrap();
        assert_eq!((report.rows, report.added, report.consented), (2, 2, 1));
        let again = ingest_patients(&store, &good, false).unwrap();
        assert_eq!((again.added, again.replaced), (0, 2));
        let cohort = Cohort::load(&store).unwrap();
        assert_eq!((cohort.consented(), cohort.withheld()), (1, 1));

        // One bad row anywhere: nothing from the file is written.
        let bad = write(
            dir.path(),
            "bad.csv",
            "P3,50,female,mild,no,no,0,0,0,0,0,true\nP4,eighty,female,mild,no,no,0,0,0,0,0,true\n",
        );
        let err = ingest_patients(&store, &bad, false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bad.csv:3 column `age`"), "{text}");
        assert_eq!(store.patients.len(), 2);
    }

    #[test]
    fn dry_run_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
        let store = home.open_store().unwrap();
        let good = write(dir.path(), "p.csv", "P1,70,female,severe,1,0,0,0,0,0,1,1\n");
        let report = ingest_patients(&store, &good, true).unwrap();
        assert_eq!((report.rows, report.added, report.dry_run), (1, 1, true));
        assert!(store.patients.is_empty());
    }

    #[test]
    fn header_problems_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.csv");
        std::fs::write(&path, "patient_id,age,sexx\nP1,3,female\n").unwrap();
        let errors = read_patients_csv(&path).unwrap_err();
        let text = errors.to_string();
        assert!(text.contains("column `sexx`: unknown column"), "{text}");
        assert!(
            text.contains("column `sex`: required column is missing"),
            "{text}"
        );
        assert!(text.contains("column `obesity`"), "{text}");
        std::fs::write(
            &path,
            format!("{}age\n", HEADER.trim_end().to_owned() + ","),
        )
        .unwrap();
        let text = read_patients_csv(&path).unwrap_err().to_string();
        assert!(
            text.contains("column `age`: column appears more than once"),
            "{text}"
        );
    }

    #[test]
    fn the_store_holds_no_raw_patient_id() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
        let store = home.open_store().unwrap();
        let path = write(
            dir.path(),
            "p.csv",
            "MRN-0042,70,female,severe,1,0,0,0,0,0,1,1\n",
        );
        ingest_patients(&store, &path, false).unwrap();
        for entry in store.patients.iter() {
            let (key, value) = entry.unwrap();
            assert!(!key.windows(8).any(|w| w == b"MRN-0042"));
            assert!(!value.windows(8).any(|w| w == b"MRN-0042"));
        }
    }
}
