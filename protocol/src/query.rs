//! The query AST: what a researcher asks, in a canonical typed form.
//!
//! The researcher's SQL is compiled to this form by the aggregator; this form (not the SQL
//! text) is what is signed, sent and checked by every node against its own schema and policy.
//! For now a query counts the patients of one view that satisfy a conjunction of predicates:
//! equality on categorical and boolean columns, inclusive integer ranges on numeric ones.
//! [`Query::canonical`] puts a query in one normal form, so equal questions hash equally.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_IDENTIFIER_BYTES, MAX_PREDICATES};

/// What is computed over the matching rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Aggregate {
    /// The number of distinct patients matching the filter (each patient counts at most once).
    CountPatients,
}

impl Aggregate {
    /// The aggregation's name as policies list it.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregate::CountPatients => "count",
        }
    }
}

/// A categorical or boolean value compared for equality.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Category {
    /// A declared level of a categorical column, e.g. `female` or `severe`.
    Level(String),
    /// A yes/no flag such as a comorbidity.
    Flag(bool),
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Category::Level(level) => write!(f, "'{level}'"),
            Category::Flag(flag) => write!(f, "{flag}"),
        }
    }
}

/// One condition on a column of the view.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Predicate {
    /// `column = value` for a categorical or boolean column.
    Is { column: String, value: Category },
    /// `min <= column <= max` for an integer column; a missing end is unbounded.
    InRange {
        column: String,
        min: Option<i64>,
        max: Option<i64>,
    },
}

impl Predicate {
    pub fn column(&self) -> &str {
        match self {
            Predicate::Is { column, .. } | Predicate::InRange { column, .. } => column,
        }
    }
}

impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Predicate::Is { column, value } => write!(f, "{column} = {value}"),
            Predicate::InRange { column, min, max } => match (min, max) {
                (Some(lo), Some(hi)) => write!(f, "{column} BETWEEN {lo} AND {hi}"),
                (Some(lo), None) => write!(f, "{column} >= {lo}"),
                (None, Some(hi)) => write!(f, "{column} <= {hi}"),
                (None, None) => write!(f, "{column} IS ANY"),
            },
        }
    }
}

/// A researcher's question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The view queried, e.g. `patients`.
    pub view: String,
    pub aggregate: Aggregate,
    /// All of these must hold (conjunction). Empty means every patient.
    pub filter: Vec<Predicate>,
}

/// A structural problem with a query, found before any schema is consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryShapeError {
    #[error("query has {count} predicates; at most {max} are allowed")]
    TooManyPredicates { count: usize, max: usize },
    #[error("identifier `{prefix}…` is longer than {max} bytes")]
    IdentifierTooLong { prefix: String, max: usize },
    #[error("range on `{column}` is empty: {min} > {max}")]
    EmptyRange { column: String, min: i64, max: i64 },
    #[error("`{column}` is constrained to both {first} and {second}; no row can match")]
    Contradiction {
        column: String,
        first: Category,
        second: Category,
    },
}

impl Query {
    /// Counts the patients in `view` matching all of `filter`.
    pub fn count_patients(view: impl Into<String>, filter: Vec<Predicate>) -> Self {
        Self {
            view: view.into(),
            aggregate: Aggregate::CountPatients,
            filter,
        }
    }

    /// Every column the query reads.
    pub fn columns(&self) -> std::collections::BTreeSet<&str> {
        self.filter.iter().map(Predicate::column).collect()
    }

    /// Checks limits that need no schema: number of predicates and identifier lengths.
    pub fn check_shape(&self) -> Result<(), QueryShapeError> {
        if self.filter.len() > MAX_PREDICATES {
            return Err(QueryShapeError::TooManyPredicates {
                count: self.filter.len(),
                max: MAX_PREDICATES,
            });
        }
        let too_long = |text: &str| {
            (text.len() > MAX_IDENTIFIER_BYTES).then(|| QueryShapeError::IdentifierTooLong {
                prefix: text.chars().take(16).collect(),
                max: MAX_IDENTIFIER_BYTES,
            })
        };
        if let Some(e) = too_long(&self.view) {
            return Err(e);
        }
        for predicate in &self.filter {
            if let Some(e) = too_long(predicate.column()) {
                return Err(e);
            }
            if let Predicate::Is {
                value: Category::Level(level),
                ..
            } = predicate
                && let Some(e) = too_long(level)
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The normal form: ranges on one column intersected, duplicates removed, predicates
    /// sorted. Fails if the conjunction is unsatisfiable by construction.
    pub fn canonical(mut self) -> Result<Self, QueryShapeError> {
        let mut merged: Vec<Predicate> = Vec::with_capacity(self.filter.len());
        for predicate in std::mem::take(&mut self.filter) {
            let existing = merged.iter_mut().find(|p| p.column() == predicate.column());
            match (existing, predicate) {
                (None, predicate) => merged.push(predicate),
                (
                    Some(Predicate::InRange { min, max, .. }),
                    Predicate::InRange {
                        min: new_min,
                        max: new_max,
                        ..
                    },
                ) => {
                    *min = match (*min, new_min) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                    *max = match (*max, new_max) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                (Some(Predicate::Is { column, value }), Predicate::Is { value: other, .. }) => {
                    if *value != other {
                        return Err(QueryShapeError::Contradiction {
                            column: column.clone(),
                            first: value.clone(),
                            second: other,
                        });
                    }
                }
                // Mixed kinds on one column are kept apart; the node's schema check rejects
                // whichever does not fit the column's type.
                (Some(_), predicate) => merged.push(predicate),
            }
        }
        for predicate in &merged {
            if let Predicate::InRange {
                column,
                min: Some(lo),
                max: Some(hi),
            } = predicate
                && lo > hi
            {
                return Err(QueryShapeError::EmptyRange {
                    column: column.clone(),
                    min: *lo,
                    max: *hi,
                });
            }
        }
        merged.sort_by(|a, b| a.column().cmp(b.column()).then_with(|| a.cmp(b)));
        self.filter = merged;
        Ok(self)
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.aggregate {
            Aggregate::CountPatients => write!(f, "SELECT COUNT(*) FROM {}", self.view)?,
        }
        for (i, predicate) in self.filter.iter().enumerate() {
            let joiner = if i == 0 { " WHERE " } else { " AND " };
            write!(f, "{joiner}{predicate}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(column: &str, min: Option<i64>, max: Option<i64>) -> Predicate {
        Predicate::InRange {
            column: column.into(),
            min,
            max,
        }
    }

    #[test]
    fn canonical_form_merges_ranges_and_sorts() {
        let q = Query::count_patients(
            "patients",
            vec![
                range("age", Some(30), None),
                Predicate::Is {
                    column: "sex".into(),
                    value: Category::Level("female".into()),
                },
                range("age", None, Some(59)),
                range("age", Some(40), None),
            ],
        );
        let canonical = q.canonical().unwrap();
        assert_eq!(
            canonical.filter,
            vec![
                range("age", Some(40), Some(59)),
                Predicate::Is {
                    column: "sex".into(),
                    value: Category::Level("female".into())
                }
            ]
        );
        assert_eq!(
            canonical.to_string(),
            "SELECT COUNT(*) FROM patients WHERE age BETWEEN 40 AND 59 AND sex = 'female'"
        );
    }

    #[test]
    fn contradictions_and_empty_ranges_are_errors() {
        let q = Query::count_patients(
            "patients",
            vec![range("age", Some(60), None), range("age", None, Some(20))],
        );
        assert!(matches!(
            q.canonical(),
            Err(QueryShapeError::EmptyRange { .. })
        ));
        let is = |v: bool| Predicate::Is {
            column: "diabetes".into(),
            value: Category::Flag(v),
        };
        let q = Query::count_patients("patients", vec![is(true), is(false)]);
        assert!(matches!(
            q.canonical(),
            Err(QueryShapeError::Contradiction { .. })
        ));
    }

    #[test]
    fn oversized_queries_fail_the_shape_check() {
        let many = (0..=MAX_PREDICATES)
            .map(|i| range(&format!("c{i}"), Some(0), None))
            .collect();
        assert!(matches!(
            Query::count_patients("patients", many).check_shape(),
            Err(QueryShapeError::TooManyPredicates { .. })
        ));
        let long = "x".repeat(MAX_IDENTIFIER_BYTES + 1);
        assert!(matches!(
            Query::count_patients(long, vec![]).check_shape(),
            Err(QueryShapeError::IdentifierTooLong { .. })
        ));
    }
}
