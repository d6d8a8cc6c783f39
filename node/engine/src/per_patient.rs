//! Per-patient tables derived in a query's `WITH` clause: bound to the schema at compile
//! time, materialised from the node's rows when the query runs.
//!
//! `WITH p AS (SELECT patient_id, MIN(days_since_admission) FILTER (WHERE tocilizumab) AS
//! toci_day, … FROM timepoints GROUP BY patient_id)` has one row per patient with at least
//! one row of the source view (matching the WITH's WHERE), holding the derived columns and
//! the patient's own columns. The outer query then runs on that table exactly as on
//! `patients`: every statistic, filter and grouping works unchanged, and one patient is one
//! row, so the patient-level sensitivity holds whatever the derivation read.
//!
//! A derived column's type and bounds come from the schema: `MIN`, `MAX` and `ARG_MIN` /
//! `ARG_MAX` keep their column's (the first day of a day offset has the offset's bounds),
//! `COUNT` is bounded by the schema's rows per patient, `BOOL_OR` / `BOOL_AND` are flags.
//! Missing values follow SQL: `MIN` of no values is missing, `COUNT` of none is 0.

use std::borrow::Cow;
use std::sync::Arc;

use renkei_protocol::{PerPatient, Summary};

use crate::bind::{Binder, Node, SchemaError};
use crate::bitset::Bitset;
use crate::column::{Column, NULL};
use crate::image::{Dataset, Items, Patients, Source, Timepoints, View};
use crate::schema::{ColumnDef, ColumnType, DatasetSchema, SECONDARY_USE};

/// A `WITH` table bound to this node's schema.
#[derive(Debug)]
pub(crate) struct BoundTable {
    source: View,
    filter: Node,
    columns: Vec<BoundColumn>,
    /// The table's schema: the patient columns, then the derived ones.
    pub(crate) schema: Arc<DatasetSchema>,
    /// Consent scopes the derivation needs (the source view's, presence flags read).
    pub(crate) consents: Vec<String>,
}

#[derive(Debug)]
struct BoundColumn {
    summary: BoundSummary,
    filter: Node,
}

#[derive(Debug)]
enum BoundSummary {
    Min(Source),
    Max(Source),
    Count(Option<Source>),
    Any(Node),
    Every(Node),
    ValueAtMin { value: Source, by: Source },
    ValueAtMax { value: Source, by: Source },
}

impl Dataset {
    /// Binds a `WITH` table to the schema, or says which part does not fit.
    pub(crate) fn bind_per_patient(&self, table: &PerPatient) -> Result<BoundTable, SchemaError> {
        let source = self.view(&table.source)?;
        let mut consents = vec![SECONDARY_USE.to_string()];
        match source {
            View::Patients => {
                return Err(SchemaError::Unsupported(format!(
                    "WITH {} summarises the rows of `timepoints` or an information kind; `patients` already has one row per patient",
                    table.name
                )));
            }
            View::Items(k) => consents.extend(self.schema.items[k].consent.clone()),
            View::Timepoints => {}
        }
        let mut binder = Binder::new(self, &table.source, source, consents);
        let filter = binder.filter(&table.filter)?;
        for name in &table.patient_columns {
            if self.schema.patient_column(name).is_none() {
                return Err(SchemaError::UnknownColumn {
                    view: crate::schema::PATIENTS_VIEW.into(),
                    column: name.to_string(),
                    known: self
                        .schema
                        .patients
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let taken: Vec<String> = self
            .view_columns(View::Patients)
            .into_iter()
            .map(|(name, _, _)| name)
            .collect();
        let mut defs = Vec::with_capacity(table.columns.len());
        let mut columns = Vec::with_capacity(table.columns.len());
        for derived in &table.columns {
            if taken.contains(&derived.name) {
                return Err(SchemaError::Value(format!(
                    "`{}` is already a column of every patient; name the derived column differently",
                    derived.name
                )));
            }
            let (summary, kind) = match &derived.summary {
                Summary::Min { column } => {
                    let (source, def) = binder.column(column)?;
                    (BoundSummary::Min(source), def.kind.clone())
                }
                Summary::Max { column } => {
                    let (source, def) = binder.column(column)?;
                    (BoundSummary::Max(source), def.kind.clone())
                }
                Summary::Count { column } => {
                    let source = column
                        .as_deref()
                        .map(|c| binder.column(c).map(|(s, _)| s))
                        .transpose()?;
                    let kind = ColumnType::Integer {
                        min: 0,
                        max: i64::from(self.schema.max_timepoints_per_patient),
                    };
                    (BoundSummary::Count(source), kind)
                }
                Summary::Any { condition } => (
                    BoundSummary::Any(binder.filter(condition)?),
                    ColumnType::Boolean,
                ),
                Summary::Every { condition } => (
                    BoundSummary::Every(binder.filter(condition)?),
                    ColumnType::Boolean,
                ),
                Summary::ValueAtMin { value, by } => {
                    let (value, by, kind) = ordered(&binder, value, by)?;
                    (BoundSummary::ValueAtMin { value, by }, kind)
                }
                Summary::ValueAtMax { value, by } => {
                    let (value, by, kind) = ordered(&binder, value, by)?;
                    (BoundSummary::ValueAtMax { value, by }, kind)
                }
            };
            // A minimum, maximum or value at one keeps its column's unit (the minimum of a
            // day column is a day column); counts and flags have none.
            let unit = match &derived.summary {
                Summary::Min { column }
                | Summary::Max { column }
                | Summary::ValueAtMin { value: column, .. }
                | Summary::ValueAtMax { value: column, .. } => {
                    binder.column(column)?.1.unit.clone()
                }
                Summary::Count { .. } | Summary::Any { .. } | Summary::Every { .. } => None,
            };
            let filter = binder.filter(&derived.filter)?;
            defs.push(ColumnDef {
                name: derived.name.clone(),
                description: Some(format!("{} per patient", derived.summary)),
                unit,
                kind,
            });
            columns.push(BoundColumn { summary, filter });
        }
        let mut schema = (*self.schema).clone();
        schema.patients.extend(defs);
        Ok(BoundTable {
            source,
            filter,
            columns,
            schema: Arc::new(schema),
            consents: binder.into_consents(),
        })
    }

    /// The table itself: one row per patient with a matching source row, patient columns
    /// first, then the derived ones; consent scopes and information items carried along.
    pub(crate) fn per_patient(&self, table: &BoundTable) -> Dataset {
        let view = table.source;
        let parent = self.parent(view).unwrap_or(&[]);
        let patient_of = |row: usize| parent.get(row).map_or(usize::MAX, |p| *p as usize);
        let kept = self.eval(&table.filter, view).0;
        // A patient's rows in timepoint order, patient after patient.
        let mut order: Vec<usize> = kept.iter().collect();
        if !self.grouped_by_patient(view) {
            order.sort_by_key(|row| (patient_of(*row), *row));
        }
        // What each derived column reads: its rows, and its values or condition.
        let inputs: Vec<Input> = table
            .columns
            .iter()
            .map(|c| {
                let mut rows = self.eval(&c.filter, view).0;
                rows.and(&kept);
                let values = |s: Source| self.values(s, view);
                let reads = match &c.summary {
                    BoundSummary::Min(s) => Reads::Min(values(*s)),
                    BoundSummary::Max(s) => Reads::Max(values(*s)),
                    BoundSummary::Count(Some(s)) => Reads::CountValues(values(*s)),
                    BoundSummary::Count(None) => Reads::CountRows,
                    BoundSummary::Any(condition) => {
                        let (t, f) = self.eval(condition, view);
                        Reads::Any(t, f)
                    }
                    BoundSummary::Every(condition) => {
                        let (t, f) = self.eval(condition, view);
                        Reads::Every(t, f)
                    }
                    BoundSummary::ValueAtMin { value, by } => {
                        Reads::AtMin(values(*value), values(*by))
                    }
                    BoundSummary::ValueAtMax { value, by } => {
                        Reads::AtMax(values(*value), values(*by))
                    }
                };
                Input { rows, reads }
            })
            .collect();

        let mut included: Vec<u32> = Vec::new();
        let mut derived: Vec<Vec<i64>> = vec![Vec::new(); table.columns.len()];
        let mut start = 0;
        while start < order.len() {
            let patient = patient_of(order[start]);
            let mut end = start + 1;
            while end < order.len() && patient_of(order[end]) == patient {
                end += 1;
            }
            let Ok(index) = u32::try_from(patient) else {
                start = end;
                continue;
            };
            included.push(index);
            let run = &order[start..end];
            for (input, out) in inputs.iter().zip(&mut derived) {
                out.push(input.summarise(run));
            }
            start = end;
        }

        let mut patient_columns: Vec<Column> = self
            .patients
            .columns
            .iter()
            .map(|c| c.gather(&included))
            .collect();
        patient_columns.extend(derived.into_iter().map(Column::narrowest));
        let consents = self
            .patients
            .consents
            .iter()
            .map(|(scope, set)| (scope.clone(), set.gather(&included)))
            .collect();
        // Presence flags (`has_ct`) read the items' patients: carry them, renumbered.
        let mut renumber = vec![u32::MAX; self.patients.len];
        for (new, old) in included.iter().enumerate() {
            renumber[*old as usize] = new as u32;
        }
        let items = self
            .items
            .iter()
            .map(|items| {
                let patient: Vec<u32> = items
                    .patient
                    .iter()
                    .map(|p| renumber.get(*p as usize).copied().unwrap_or(u32::MAX))
                    .filter(|p| *p != u32::MAX)
                    .collect();
                Items {
                    len: patient.len(),
                    timepoint: vec![0; patient.len()],
                    columns: vec![Column::missing(patient.len()); items.defs.len()],
                    defs: items.defs.clone(),
                    grouped: false,
                    patient,
                }
            })
            .collect();
        Dataset {
            timepoints: Timepoints {
                columns: vec![Column::default(); table.schema.timepoints.len()],
                ..Timepoints::default()
            },
            schema: Arc::clone(&table.schema),
            patients: Patients {
                len: included.len(),
                columns: patient_columns,
                consents,
            },
            items,
            orphans: 0,
            over_bound: 0,
        }
    }
}

/// `ARG_MIN(value, by)`'s columns: the value's (and its type), and a numeric `by`.
fn ordered(
    binder: &Binder<'_>,
    value: &str,
    by: &str,
) -> Result<(Source, Source, ColumnType), SchemaError> {
    let (value_source, def) = binder.column(value)?;
    let kind = def.kind.clone();
    let (by_source, by_def) = binder.column(by)?;
    match &by_def.kind {
        ColumnType::Integer { .. } | ColumnType::Decimal { .. } => {
            Ok((value_source, by_source, kind))
        }
        other @ (ColumnType::Categorical { .. } | ColumnType::Boolean) => {
            Err(SchemaError::Value(format!(
                "`{by}` is {other}; ARG_MIN and ARG_MAX order rows by a numeric column such as a day offset"
            )))
        }
    }
}

/// What one derived column reads for every source row (columns of the view's own layer
/// borrowed, others gathered once).
struct Input<'a> {
    rows: Bitset,
    reads: Reads<'a>,
}

enum Reads<'a> {
    Min(Cow<'a, Column>),
    Max(Cow<'a, Column>),
    CountValues(Cow<'a, Column>),
    CountRows,
    /// (true, false) rows of a condition.
    Any(Bitset, Bitset),
    Every(Bitset, Bitset),
    /// (value, by).
    AtMin(Cow<'a, Column>, Cow<'a, Column>),
    AtMax(Cow<'a, Column>, Cow<'a, Column>),
}

impl Input<'_> {
    /// One patient's value over its rows `run` (in timepoint order).
    fn summarise(&self, run: &[usize]) -> i64 {
        let rows = run.iter().copied().filter(|r| self.rows.contains(*r));
        // (whether any known row has the condition true, false; whether any is known)
        let known = |t: &Bitset, f: &Bitset| {
            rows.clone()
                .fold((false, false, false), |(any_t, any_f, known), r| {
                    let (is_t, is_f) = (t.contains(r), f.contains(r));
                    (any_t || is_t, any_f || is_f, known || is_t || is_f)
                })
        };
        match &self.reads {
            Reads::Min(column) => present(rows, column).min().unwrap_or(NULL),
            Reads::Max(column) => present(rows, column).max().unwrap_or(NULL),
            Reads::CountValues(column) => present(rows, column).count() as i64,
            Reads::CountRows => rows.count() as i64,
            Reads::Any(t, f) => match known(t, f) {
                (_, _, false) => NULL,
                (any_true, _, true) => i64::from(any_true),
            },
            Reads::Every(t, f) => match known(t, f) {
                (_, _, false) => NULL,
                (_, any_false, true) => i64::from(!any_false),
            },
            Reads::AtMin(value, by) => pick(rows, value, by, |candidate, best| candidate < best),
            Reads::AtMax(value, by) => pick(rows, value, by, |candidate, best| candidate > best),
        }
    }
}

/// The non-missing values of `column` at `rows`.
fn present<'c>(
    rows: impl Iterator<Item = usize> + 'c,
    column: &'c Column,
) -> impl Iterator<Item = i64> + 'c {
    rows.map(|r| column.get(r)).filter(|v| *v != NULL)
}

/// `value` at the first row whose `by` beats every earlier one (rows missing either are
/// skipped), or missing when there is none.
fn pick(
    rows: impl Iterator<Item = usize>,
    value: &Column,
    by: &Column,
    beats: impl Fn(i64, i64) -> bool,
) -> i64 {
    let mut best: Option<(i64, i64)> = None;
    for row in rows {
        let (v, b) = (value.get(row), by.get(row));
        if v == NULL || b == NULL {
            continue;
        }
        if best.is_none_or(|(_, best_by)| beats(b, best_by)) {
            best = Some((v, b));
        }
    }
    best.map_or(NULL, |(v, _)| v)
}

#[cfg(test)]
mod tests {
    use renkei_protocol::{
        Aggregate, CmpOp, DerivedColumn, Filter, Literal, PerPatient, Query, Release, Summary,
    };

    use crate::SchemaError;
    use crate::statistic::fixture::{dataset, release};

    fn derived(name: &str, summary: Summary, filter: Filter) -> DerivedColumn {
        DerivedColumn {
            name: name.into(),
            summary,
            filter,
        }
    }

    fn table(columns: Vec<DerivedColumn>) -> PerPatient {
        PerPatient {
            name: "p".into(),
            source: "timepoints".into(),
            filter: Filter::True,
            columns,
            patient_columns: vec![],
        }
    }

    fn count(table: PerPatient, filter: Filter) -> i64 {
        let query = Query {
            view: "p".into(),
            aggregate: Aggregate::CountPatients,
            filter,
            group_by: vec![],
            per_patient: Some(table),
        };
        query.check_shape().unwrap();
        match release(&query) {
            Release::Scalar { value, .. } => value,
            other => panic!("{other:?}"),
        }
    }

    fn icu() -> Filter {
        Filter::eq("icu", Literal::Bool(true))
    }

    #[test]
    fn derived_columns_follow_sql_over_each_patients_rows() {
        // The fixture's consenting patients with timepoints: 0 (crp 1.2 then 8.0, ICU at its
        // second), 1 (45.0, ICU), 2 (missing then 4.0, ICU at its second), 4 (0.5, 2.0, 3.0;
        // ICU from its second); patient 3 has none, patient 5 has not consented.
        let columns = vec![
            derived(
                "max_crp",
                Summary::Max {
                    column: "crp".into(),
                },
                Filter::True,
            ),
            derived(
                "first_crp",
                Summary::ValueAtMin {
                    value: "crp".into(),
                    by: "timepoint".into(),
                },
                Filter::True,
            ),
            derived(
                "first_icu",
                Summary::Min {
                    column: "timepoint".into(),
                },
                icu(),
            ),
            derived("ever_icu", Summary::Any { condition: icu() }, Filter::True),
            derived(
                "always_icu",
                Summary::Every { condition: icu() },
                Filter::True,
            ),
            derived("visits", Summary::Count { column: None }, Filter::True),
        ];
        let data = dataset();
        let bound = data.bind_per_patient(&table(columns.clone())).unwrap();
        let built = data.per_patient(&bound);
        assert_eq!(built.patients(), 5, "every patient with a timepoint");
        let base = data.schema().patients.len();
        let column = |i: usize| -> Vec<i64> {
            (0..built.patients())
                .map(|r| built.patients.columns[base + i].get(r))
                .collect()
        };
        // Columns sorted as written here (compile sorts them by name; this is the table).
        assert_eq!(column(0), vec![80, 450, 40, 30, 300]);
        assert_eq!(
            column(1),
            vec![12, 450, 40, 5, 300],
            "missing first value skipped"
        );
        assert_eq!(column(2), vec![1, 0, 1, 1, 0]);
        assert_eq!(column(3), vec![1, 1, 1, 1, 1]);
        assert_eq!(column(4), vec![0, 1, 0, 0, 1]);
        assert_eq!(column(5), vec![2, 1, 2, 3, 1]);
        assert_eq!(built.consented(), 4);

        // Counted through the outer query: patients, consenting ones only.
        assert_eq!(count(table(columns.clone()), Filter::True), 4);
        let high = Filter::cmp(
            "max_crp",
            CmpOp::Ge,
            Literal::Decimal(renkei_protocol::Decimal {
                digits: 40,
                scale: 1,
            }),
        );
        assert_eq!(count(table(columns.clone()), high), 3);
        // "ICU after the first timepoint": a comparison between columns.
        let later = Filter::Columns {
            left: "first_icu".into(),
            op: CmpOp::Gt,
            right: "visits".into(),
            offset: Literal::Integer(-2),
        };
        assert_eq!(count(table(columns.clone()), later), 3);
        // FILTER with no matching row: MIN is missing, so neither side of a comparison.
        let no_icu = Filter::IsNull {
            column: "first_icu".into(),
            negated: false,
        };
        assert_eq!(count(table(columns.clone()), no_icu), 0);
        // The patient's own columns are there too.
        let older = Filter::cmp("age", CmpOp::Ge, Literal::Integer(60));
        assert_eq!(count(table(columns), older), 2);
    }

    #[test]
    fn a_where_in_the_with_clause_drops_patients_without_matching_rows() {
        let mut t = table(vec![derived(
            "n",
            Summary::Count { column: None },
            Filter::True,
        )]);
        t.filter = icu();
        assert_eq!(count(t.clone(), Filter::True), 4);
        t.filter = Filter::eq("ward", Literal::Text("c".into()));
        assert_eq!(
            count(t, Filter::True),
            1,
            "only patient 4 (5 lacks consent)"
        );
    }

    #[test]
    fn sums_and_groups_run_on_the_table_as_on_patients() {
        let t = table(vec![
            derived(
                "max_crp",
                Summary::Max {
                    column: "crp".into(),
                },
                Filter::True,
            ),
            derived("ever_icu", Summary::Any { condition: icu() }, Filter::True),
        ]);
        let sum = Query {
            view: "p".into(),
            aggregate: Aggregate::Sum {
                column: "max_crp".into(),
            },
            filter: Filter::True,
            group_by: vec![],
            per_patient: Some(t.clone()),
        };
        // 8.0 + 45.0 + 4.0 + 3.0, in tenths.
        assert_eq!(
            release(&sum),
            Release::Scalar {
                value: 600,
                suppressed: false
            }
        );
        let grouped = Query {
            aggregate: Aggregate::CountPatients,
            group_by: vec!["sex".into()],
            ..sum
        };
        match release(&grouped) {
            Release::Groups { counts, .. } => assert_eq!(counts, vec![2, 2]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_table_that_does_not_fit_is_refused_naming_the_part() {
        let data = dataset();
        let bad = |t: PerPatient| data.bind_per_patient(&t).unwrap_err();
        let unknown = bad(table(vec![derived(
            "x",
            Summary::Max {
                column: "crpp".into(),
            },
            Filter::True,
        )]));
        assert!(
            matches!(&unknown, SchemaError::UnknownColumn { column, .. } if column == "crpp"),
            "{unknown}"
        );
        let clash = bad(table(vec![derived(
            "age",
            Summary::Count { column: None },
            Filter::True,
        )]));
        assert!(clash.to_string().contains("already a column"), "{clash}");
        let by_level = bad(table(vec![derived(
            "x",
            Summary::ValueAtMin {
                value: "crp".into(),
                by: "ward".into(),
            },
            Filter::True,
        )]));
        assert!(by_level.to_string().contains("numeric"), "{by_level}");
        let mut on_patients = table(vec![]);
        on_patients.source = "patients".into();
        assert!(bad(on_patients).to_string().contains("one row per patient"));
        let level_compare = Filter::Columns {
            left: "ward".into(),
            op: CmpOp::Lt,
            right: "crp".into(),
            offset: Literal::Integer(0),
        };
        let query = Query {
            view: "timepoints".into(),
            aggregate: Aggregate::CountRows,
            filter: level_compare,
            group_by: vec![],
            per_patient: None,
        };
        let err = data.compile(&query).unwrap_err();
        assert!(err.to_string().contains("only numeric columns"), "{err}");
    }
}
