//! The patient schema, the records a node stores, and the in-memory cohort image that
//! queries run on.
//!
//! For now the schema is the fixed `patients` view of the walking skeleton: age, sex,
//! severity (worst over the course), seven comorbidity flags and secondary-use consent.
//! Records are stored in the `patients` tree under a keyed hash of the hospital's patient id;
//! [`Cohort`] holds only the consented patients, column by column, so a count is a scan over
//! a few byte arrays and a non-consented patient can never be counted.

use renkei_protocol::{Category, Predicate, Query};
use serde::{Deserialize, Serialize};

use crate::error::NodeError;
use crate::store::NodeStore;

/// The only view in the skeleton schema: one row per patient.
pub const PATIENTS_VIEW: &str = "patients";

/// Oldest age the schema accepts.
pub const MAX_AGE: u8 = 120;

/// Levels of `sex`, in stored order.
pub const SEX_LEVELS: &[&str] = &["female", "male", "other"];

/// Levels of `severity` (worst over the course, WHO-style), in stored order.
pub const SEVERITY_LEVELS: &[&str] = &["mild", "moderate", "severe", "critical"];

/// Comorbidity flags; a flag's position is its bit in [`PatientRecord::comorbidities`].
pub const COMORBIDITIES: &[&str] = &[
    "diabetes",
    "hypertension",
    "chronic_lung_disease",
    "cardiovascular_disease",
    "kidney_disease",
    "cancer",
    "obesity",
];

/// One patient as the node stores it: no identifiers, only research attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRecord {
    pub age: u8,
    /// Index into [`SEX_LEVELS`].
    pub sex: u8,
    /// Index into [`SEVERITY_LEVELS`].
    pub severity: u8,
    /// Bit `i` set when the patient has `COMORBIDITIES[i]`.
    pub comorbidities: u8,
    /// Consent to secondary use for research; without it the patient is never counted.
    pub consent_secondary_use: bool,
}

/// The kind of a column, with what values it takes.
#[derive(Debug, Clone, Copy)]
enum ColumnKind {
    Age,
    Sex,
    Severity,
    Comorbidity(u8),
}

fn column_kind(name: &str) -> Option<ColumnKind> {
    match name {
        "age" => Some(ColumnKind::Age),
        "sex" => Some(ColumnKind::Sex),
        "severity" => Some(ColumnKind::Severity),
        _ => COMORBIDITIES
            .iter()
            .position(|c| *c == name)
            .map(|bit| ColumnKind::Comorbidity(bit as u8)),
    }
}

/// Every column of the `patients` view, for error messages.
pub fn column_names() -> Vec<&'static str> {
    let mut names = vec!["age", "sex", "severity"];
    names.extend_from_slice(COMORBIDITIES);
    names
}

/// A predicate bound to the schema: columns resolved, levels turned into stored codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    AgeBetween {
        min: u8,
        max: u8,
    },
    SexIs(u8),
    SeverityIs(u8),
    Has {
        bit: u8,
        present: bool,
    },
    /// A range that no stored value can satisfy (e.g. `age > 200`).
    Nothing,
}

/// A query the schema accepts, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledQuery {
    conditions: Vec<Condition>,
}

/// Why a query does not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    #[error("unknown view `{view}`; this node has: {PATIENTS_VIEW}")]
    UnknownView { view: String },
    #[error("unknown column `{column}`; the patients view has: {}", column_names().join(", "))]
    UnknownColumn { column: String },
    #[error("`{value}` is not a level of `{column}`; levels: {}", levels.join(", "))]
    UnknownLevel {
        column: String,
        value: String,
        levels: Vec<String>,
    },
    #[error("`{column}` is {kind}; it cannot be compared with {what}")]
    WrongType {
        column: String,
        kind: &'static str,
        what: String,
    },
}

fn level_code(column: &str, levels: &[&str], value: &Category) -> Result<u8, SchemaError> {
    match value {
        Category::Level(level) => levels
            .iter()
            .position(|l| l == level)
            .map(|i| i as u8)
            .ok_or_else(|| SchemaError::UnknownLevel {
                column: column.to_string(),
                value: level.clone(),
                levels: levels.iter().map(|l| l.to_string()).collect(),
            }),
        Category::Flag(flag) => Err(SchemaError::WrongType {
            column: column.to_string(),
            kind: "categorical",
            what: format!("the boolean {flag}"),
        }),
    }
}

/// Binds a query to the schema, or says which part does not fit.
pub fn compile(query: &Query) -> Result<CompiledQuery, SchemaError> {
    if query.view != PATIENTS_VIEW {
        return Err(SchemaError::UnknownView {
            view: query.view.clone(),
        });
    }
    let mut conditions = Vec::with_capacity(query.filter.len());
    for predicate in &query.filter {
        let column = predicate.column();
        let kind = column_kind(column).ok_or_else(|| SchemaError::UnknownColumn {
            column: column.to_string(),
        })?;
        let condition = match (kind, predicate) {
            (ColumnKind::Age, Predicate::InRange { min, max, .. }) => {
                let lo = min.unwrap_or(0).max(0);
                let hi = max.unwrap_or(i64::from(MAX_AGE)).min(i64::from(MAX_AGE));
                if lo > hi {
                    Condition::Nothing
                } else {
                    // Both ends are within 0..=MAX_AGE here.
                    Condition::AgeBetween {
                        min: lo as u8,
                        max: hi as u8,
                    }
                }
            }
            (ColumnKind::Sex, Predicate::Is { value, .. }) => {
                Condition::SexIs(level_code(column, SEX_LEVELS, value)?)
            }
            (ColumnKind::Severity, Predicate::Is { value, .. }) => {
                Condition::SeverityIs(level_code(column, SEVERITY_LEVELS, value)?)
            }
            (ColumnKind::Comorbidity(bit), Predicate::Is { value, .. }) => match value {
                Category::Flag(present) => Condition::Has {
                    bit,
                    present: *present,
                },
                Category::Level(level) => {
                    return Err(SchemaError::WrongType {
                        column: column.to_string(),
                        kind: "a true/false flag",
                        what: format!("'{level}'"),
                    });
                }
            },
            (ColumnKind::Age, Predicate::Is { value, .. }) => {
                return Err(SchemaError::WrongType {
                    column: column.to_string(),
                    kind: "an integer (use a range)",
                    what: value.to_string(),
                });
            }
            (_, Predicate::InRange { .. }) => {
                return Err(SchemaError::WrongType {
                    column: column.to_string(),
                    kind: "categorical",
                    what: "a numeric range".into(),
                });
            }
        };
        conditions.push(condition);
    }
    Ok(CompiledQuery { conditions })
}

/// The consented patients of this node, column by column.
#[derive(Debug, Default, Clone)]
pub struct Cohort {
    age: Vec<u8>,
    sex: Vec<u8>,
    severity: Vec<u8>,
    comorbidities: Vec<u8>,
    /// Stored patients without secondary-use consent (never queried; reported for status).
    withheld: usize,
}

impl Cohort {
    /// Loads every stored patient; only those with consent enter the image.
    pub fn load(store: &NodeStore) -> Result<Self, NodeError> {
        let mut cohort = Self::default();
        for entry in store.patients.iter() {
            let (key, value) = entry?;
            let record: PatientRecord = renkei_protocol::codec::decode_limited(&value, 64)
                .map_err(|e| NodeError::CorruptStore {
                    what: format!("patient record {}", hex::encode(&key)),
                    reason: e.to_string(),
                })?;
            cohort.push(&record);
        }
        Ok(cohort)
    }

    pub fn push(&mut self, record: &PatientRecord) {
        if !record.consent_secondary_use {
            self.withheld += 1;
            return;
        }
        self.age.push(record.age);
        self.sex.push(record.sex);
        self.severity.push(record.severity);
        self.comorbidities.push(record.comorbidities);
    }

    /// Patients that may be counted.
    pub fn consented(&self) -> usize {
        self.age.len()
    }

    /// Stored patients that are withheld for lack of consent.
    pub fn withheld(&self) -> usize {
        self.withheld
    }

    /// The exact number of consented patients matching the query. Never leaves the node
    /// without noise.
    pub fn count(&self, query: &CompiledQuery) -> u64 {
        if query.conditions.contains(&Condition::Nothing) {
            return 0;
        }
        let mut count = 0u64;
        for i in 0..self.age.len() {
            let matches = query.conditions.iter().all(|c| match *c {
                Condition::AgeBetween { min, max } => (min..=max).contains(&self.age[i]),
                Condition::SexIs(code) => self.sex[i] == code,
                Condition::SeverityIs(code) => self.severity[i] == code,
                Condition::Has { bit, present } => {
                    (self.comorbidities[i] >> bit & 1 == 1) == present
                }
                Condition::Nothing => false,
            });
            count += u64::from(matches);
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(age: u8, sex: u8, severity: u8, comorbidities: u8, consent: bool) -> PatientRecord {
        PatientRecord {
            age,
            sex,
            severity,
            comorbidities,
            consent_secondary_use: consent,
        }
    }

    fn is(column: &str, value: Category) -> Predicate {
        Predicate::Is {
            column: column.into(),
            value,
        }
    }

    #[test]
    fn counts_only_consented_matching_patients() {
        let mut cohort = Cohort::default();
        cohort.push(&record(70, 0, 2, 0b1, true));
        cohort.push(&record(71, 0, 2, 0b1, false));
        cohort.push(&record(40, 1, 0, 0b0, true));
        cohort.push(&record(65, 0, 3, 0b11, true));
        assert_eq!(cohort.consented(), 3);
        assert_eq!(cohort.withheld(), 1);
        let q = Query::count_patients(
            "patients",
            vec![
                Predicate::InRange {
                    column: "age".into(),
                    min: Some(65),
                    max: None,
                },
                is("diabetes", Category::Flag(true)),
            ],
        );
        assert_eq!(cohort.count(&compile(&q).unwrap()), 2);
        let q = Query::count_patients(
            "patients",
            vec![is("severity", Category::Level("critical".into()))],
        );
        assert_eq!(cohort.count(&compile(&q).unwrap()), 1);
        let q = Query::count_patients(
            "patients",
            vec![Predicate::InRange {
                column: "age".into(),
                min: Some(500),
                max: None,
            }],
        );
        assert_eq!(cohort.count(&compile(&q).unwrap()), 0);
    }

    #[test]
    fn schema_errors_name_the_column_and_the_levels() {
        let q = Query::count_patients("patients", vec![is("sex", Category::Level("f".into()))]);
        let err = compile(&q).unwrap_err();
        assert!(err.to_string().contains("female, male, other"), "{err}");
        let q = Query::count_patients("patients", vec![is("smoker", Category::Flag(true))]);
        assert!(matches!(
            compile(&q),
            Err(SchemaError::UnknownColumn { .. })
        ));
        let q = Query::count_patients("visits", vec![]);
        assert!(matches!(compile(&q), Err(SchemaError::UnknownView { .. })));
        let q = Query::count_patients("patients", vec![is("age", Category::Flag(true))]);
        assert!(matches!(compile(&q), Err(SchemaError::WrongType { .. })));
    }
}
