//! The in-memory image of a node's data that queries run on, column by column, and the
//! binding of a query to it.
//!
//! [`Dataset::load`] reads every stored patient, timepoint and information item (see
//! [`crate::tables`]) into columnar tables (one [`Column`] per column, each in the narrowest
//! integer width that holds its values; consent scopes as bitsets). A query is compiled against the dataset schema ([`Dataset::compile`]): its
//! view and columns resolved, its literals encoded, the consent scopes it needs and its
//! sensitivity fixed; anything that does not fit is refused with a reason that names it.
//! Evaluation turns each comparison into bitsets over the view's rows (with SQL's
//! three-valued logic: a comparison with a missing value is neither true nor false), moves
//! them between the three layers by gathering through parent indices, and counts only
//! patients who consented to every scope the query needs.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use renkei_protocol::{Aggregate, CmpOp, Filter, Literal, Query};

// `Exact::Scalar` values of counts fit i64; sums saturate (bounds make that unreachable).

use crate::bitset::Bitset;
use crate::column::{Column, NO_CELL};
use crate::error::NodeError;
use crate::records::{self, ItemRecord};
use crate::schema::{
    ColumnDef, ColumnType, DatasetSchema, PATIENTS_VIEW, SECONDARY_USE, TIMEPOINT_COLUMN,
    TIMEPOINTS_VIEW,
};
use crate::store::NodeStore;
use crate::tables::{self, Table};

/// The stored value of a missing cell.
pub const NULL: i64 = i64::MIN;

#[derive(Debug, Default, Clone)]
struct Patients {
    len: usize,
    columns: Vec<Column>,
    /// Patients who gave each consent scope.
    consents: BTreeMap<String, Bitset>,
}

#[derive(Debug, Default, Clone)]
struct Timepoints {
    len: usize,
    patient: Vec<u32>,
    number: Column,
    columns: Vec<Column>,
}

#[derive(Debug, Default, Clone)]
struct Items {
    len: usize,
    patient: Vec<u32>,
    timepoint: Vec<u32>,
    columns: Vec<Column>,
    /// The summary columns of this kind's format.
    defs: Vec<ColumnDef>,
}

/// The node's data, ready to be queried.
#[derive(Debug, Clone)]
pub struct Dataset {
    schema: Arc<DatasetSchema>,
    patients: Patients,
    timepoints: Timepoints,
    /// Parallel to the schema's item kinds.
    items: Vec<Items>,
    /// Stored records whose patient is missing (reported, never counted).
    orphans: usize,
}

/// Which rows a query ranges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Patients,
    Timepoints,
    Items(usize),
}

/// Where a column's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Patient(usize),
    Timepoint(usize),
    TimepointNumber,
    Item(usize),
    /// Whether the patient has an item of this kind at any timepoint.
    PatientHas(usize),
    /// Whether the timepoint has an item of this kind.
    TimepointHas(usize),
}

/// A comparison on stored integers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Cmp(CmpOp, i64),
    In(Vec<i64>),
    Between(i64, i64),
    IsNull { negated: bool },
}

/// A filter bound to the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    True,
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Test(Source, Test),
}

/// A numeric column read by an aggregate: where it lives and its bounds (stored units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Measure {
    source: Source,
    low: i64,
    high: i64,
}

/// What a compiled query computes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Computation {
    CountPatients,
    /// Matching rows, at most `cap` per patient.
    CountRows {
        cap: u32,
    },
    /// Clamped values of matching rows, at most `cap` per patient.
    Sum {
        measure: Measure,
        cap: u32,
    },
    /// Clamped sum and count of non-missing values, at most `cap` rows per patient.
    Mean {
        measure: Measure,
        cap: u32,
    },
    /// Counts of clamped values in `bins` equal bins, at most `cap` rows per patient.
    Histogram {
        measure: Measure,
        cap: u32,
        width: i64,
        bins: usize,
    },
    /// Patients (or rows, `rows`) per combination of the groups' levels.
    Groups {
        columns: Vec<(Source, Vec<String>)>,
        rows: bool,
        cap: u32,
    },
}

/// The exact answer of a query: never leaves the node without noise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exact {
    Scalar(i64),
    SumAndCount {
        sum: i64,
        count: i64,
    },
    Histogram {
        low: i64,
        width: i64,
        counts: Vec<i64>,
    },
    Groups {
        labels: Vec<Vec<String>>,
        counts: Vec<i64>,
    },
}

/// Bins of the histogram a quantile is read from.
pub const QUANTILE_BINS: usize = 64;

/// Most cells a GROUP BY may produce.
pub const MAX_GROUP_CELLS: usize = 1024;

/// A query the dataset accepts, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledQuery {
    view: View,
    filter: Node,
    computation: Computation,
    /// Consent scopes a patient must have given to be counted.
    pub required_consents: Vec<String>,
    /// How much one patient can change the released numbers (L2; of the sum for a mean).
    pub sensitivity: f64,
    /// For a mean, how much one patient can change the count.
    pub count_sensitivity: Option<f64>,
    /// Digits after the point of sums and bins (the measured column's scale).
    pub value_scale: u8,
    /// Whether the release is counts (to which a minimum cell size applies).
    pub counts: bool,
    /// Whether the release is a vector (histogram or groups): zCDP only.
    pub vector: bool,
}

impl CompiledQuery {
    /// How many numbers each released quantity has (bins or cells for a vector, else 1).
    pub fn dimensions(&self) -> usize {
        match &self.computation {
            Computation::Histogram { bins, .. } => *bins,
            Computation::Groups { columns, .. } => {
                columns.iter().map(|(_, levels)| levels.len()).product()
            }
            _ => 1,
        }
    }
}

/// Why a query does not fit the dataset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    #[error("unknown view `{view}`; this node has: {known}")]
    UnknownView { view: String, known: String },
    #[error("view `{view}` has no column `{column}`; it has: {known}")]
    UnknownColumn {
        view: String,
        column: String,
        known: String,
    },
    #[error("{0}")]
    Value(String),
    #[error("{0}")]
    Unsupported(String),
}

impl Dataset {
    /// An empty dataset under `schema`.
    pub fn empty(schema: Arc<DatasetSchema>) -> Self {
        let items = schema
            .items
            .iter()
            .map(|kind| Items {
                defs: kind.format.columns(),
                columns: vec![Column::default(); kind.format.columns().len()],
                ..Items::default()
            })
            .collect();
        Self {
            patients: Patients {
                columns: vec![Column::default(); schema.patients.len()],
                ..Patients::default()
            },
            timepoints: Timepoints {
                columns: vec![Column::default(); schema.timepoints.len()],
                ..Timepoints::default()
            },
            items,
            schema,
            orphans: 0,
        }
    }

    /// Reads every stored row of `store` into memory.
    pub fn load(store: &NodeStore, schema: Arc<DatasetSchema>) -> Result<Self, NodeError> {
        let unfinished = crate::ingest::unfinished_ingests(store)?;
        if !unfinished.is_empty() {
            return Err(NodeError::UnfinishedIngest {
                file: unfinished.join(", "),
            });
        }
        let mut data = Self::empty(Arc::clone(&schema));
        // Values are gathered as `i64` and narrowed once every row is in.
        let mut patient_columns = vec![Vec::new(); schema.patients.len()];
        let mut timepoint_columns = vec![Vec::new(); schema.timepoints.len()];
        let mut timepoint_numbers = Vec::new();
        let mut item_columns: Vec<Vec<Vec<i64>>> = data
            .items
            .iter()
            .map(|i| vec![Vec::new(); i.defs.len()])
            .collect();
        let mut patient_rows: HashMap<[u8; 32], u32> = HashMap::new();
        let mut consent_rows: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for shard in tables::shards(store, Table::Patients, schema.patients.len()) {
            let (_, shard) = shard?;
            for row in 0..shard.rows() {
                let index = data.patients.len;
                patient_rows.insert(
                    *shard.pseudonym(row),
                    u32::try_from(index).map_err(|_| too_many())?,
                );
                for (bit, scope) in shard.scopes.iter().enumerate() {
                    if shard.consents[row] & (1 << bit) != 0 {
                        consent_rows.entry(scope.clone()).or_default().push(index);
                    }
                }
                data.patients.len += 1;
            }
            for (column, values) in patient_columns.iter_mut().zip(&shard.columns) {
                column.extend_from_slice(values);
            }
        }
        for (scope, rows) in consent_rows {
            let mut set = Bitset::empty(data.patients.len);
            rows.into_iter().for_each(|r| set.insert(r));
            data.patients.consents.insert(scope, set);
        }
        // Items, in key order (which is shard order): placed while their shard is read.
        let mut items = Vec::new();
        for entry in store.data.scan_prefix([tables::ITEM_PREFIX]) {
            let (key, value) = entry?;
            let record: ItemRecord = records::decode(&value, "item record", &key)?;
            let located = key.get(1..35).and_then(|k| {
                let pseudonym: [u8; 32] = k[..32].try_into().ok()?;
                Some((pseudonym, u16::from_be_bytes([k[32], k[33]])))
            });
            let kind = schema.items.iter().position(|k| k.kind == record.kind);
            match (located, kind) {
                (Some((pseudonym, number)), Some(kind)) => {
                    items.push((pseudonym, number, kind, record));
                }
                _ => data.orphans += 1,
            }
        }
        let mut items = items.into_iter().peekable();
        for shard in tables::shards(store, Table::Timepoints, schema.timepoints.len()) {
            let (shard_number, shard) = shard?;
            let base = data.timepoints.len;
            let mut kept = Vec::with_capacity(shard.rows());
            for (index, pseudonym) in shard.pseudonyms.iter().enumerate() {
                let rows = shard.patient.partition_point(|p| (*p as usize) < index)
                    ..shard.patient.partition_point(|p| (*p as usize) <= index);
                match patient_rows.get(pseudonym) {
                    Some(&patient) => {
                        for row in rows {
                            kept.push(row);
                            data.timepoints.patient.push(patient);
                            timepoint_numbers.push(i64::from(shard.number[row]));
                        }
                    }
                    None => data.orphans += rows.len(),
                }
            }
            for (column, values) in timepoint_columns.iter_mut().zip(&shard.columns) {
                if kept.len() == shard.rows() {
                    column.extend_from_slice(values);
                } else {
                    column.extend(kept.iter().map(|row| values[*row]));
                }
            }
            data.timepoints.len += kept.len();
            // This shard's items; those of earlier shards (none stored) have no timepoint.
            while let Some((pseudonym, ..)) = items.peek() {
                let item_shard = tables::shard_of(pseudonym);
                if item_shard > shard_number {
                    break;
                }
                let Some((pseudonym, number, kind, record)) = items.next() else {
                    break;
                };
                let found = (item_shard == shard_number)
                    .then(|| shard.find(&pseudonym, number))
                    .flatten()
                    .and_then(|row| kept.binary_search(&row).ok())
                    .and_then(|k| Some((*patient_rows.get(&pseudonym)?, base + k)));
                let Some((patient, timepoint)) = found else {
                    data.orphans += 1;
                    continue;
                };
                let items = &mut data.items[kind];
                items.patient.push(patient);
                items
                    .timepoint
                    .push(u32::try_from(timepoint).map_err(|_| too_many())?);
                push_values(&mut item_columns[kind], &record.values);
                items.len += 1;
            }
        }
        // Items past the last stored timepoint.
        data.orphans += items.count();
        let narrowest =
            |columns: Vec<Vec<i64>>| columns.into_iter().map(Column::narrowest).collect();
        data.patients.columns = narrowest(patient_columns);
        data.timepoints.columns = narrowest(timepoint_columns);
        data.timepoints.number = Column::narrowest(timepoint_numbers);
        for (items, columns) in data.items.iter_mut().zip(item_columns) {
            items.columns = narrowest(columns);
        }
        Ok(data)
    }

    pub fn schema(&self) -> &DatasetSchema {
        &self.schema
    }

    /// Patients stored (with or without consent).
    pub fn patients(&self) -> usize {
        self.patients.len
    }

    /// Patients who consented to secondary use: the only ones ever counted.
    pub fn consented(&self) -> usize {
        self.patients
            .consents
            .get(SECONDARY_USE)
            .map_or(0, |s| s.count() as usize)
    }

    /// Stored patients that are withheld for lack of consent.
    pub fn withheld(&self) -> usize {
        self.patients.len - self.consented()
    }

    pub fn timepoints(&self) -> usize {
        self.timepoints.len
    }

    /// Items per kind, in schema order.
    pub fn items(&self) -> Vec<(&str, usize)> {
        self.schema
            .items
            .iter()
            .zip(&self.items)
            .map(|(k, i)| (k.kind.as_str(), i.len))
            .collect()
    }

    pub fn orphans(&self) -> usize {
        self.orphans
    }

    fn view(&self, name: &str) -> Result<View, SchemaError> {
        match name {
            PATIENTS_VIEW => Ok(View::Patients),
            TIMEPOINTS_VIEW => Ok(View::Timepoints),
            other => self
                .schema
                .items
                .iter()
                .position(|k| k.kind == other)
                .map(View::Items)
                .ok_or_else(|| SchemaError::UnknownView {
                    view: other.to_string(),
                    known: self.schema.views().join(", "),
                }),
        }
    }

    /// The columns a view offers, with where each comes from.
    fn view_columns(&self, view: View) -> Vec<(String, Source, ColumnDef)> {
        let boolean = |name: String| ColumnDef {
            name,
            description: None,
            unit: None,
            kind: ColumnType::Boolean,
        };
        let number = ColumnDef {
            name: TIMEPOINT_COLUMN.into(),
            description: None,
            unit: None,
            kind: ColumnType::Integer {
                min: 0,
                max: i64::from(u16::MAX),
            },
        };
        let qualified = |prefix: &str, columns: &[ColumnDef], source: fn(usize) -> Source| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("{prefix}.{}", c.name), source(i), c.clone()))
                .collect::<Vec<_>>()
        };
        let plain = |columns: &[ColumnDef], source: fn(usize) -> Source| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), source(i), c.clone()))
                .collect::<Vec<_>>()
        };
        let has = |level: fn(usize) -> Source| {
            self.schema.items.iter().enumerate().map(move |(k, kind)| {
                let name = DatasetSchema::presence_column(&kind.kind);
                (name.clone(), level(k), boolean(name))
            })
        };
        let patients = &self.schema.patients;
        let timepoints = &self.schema.timepoints;
        let mut columns: Vec<(String, Source, ColumnDef)> = Vec::new();
        match view {
            View::Patients => {
                columns.extend(plain(patients, Source::Patient));
                columns.extend(has(Source::PatientHas));
            }
            View::Timepoints => {
                columns.extend(plain(timepoints, Source::Timepoint));
                columns.push((TIMEPOINT_COLUMN.into(), Source::TimepointNumber, number));
                columns.extend(has(Source::TimepointHas));
                columns.extend(qualified(PATIENTS_VIEW, patients, Source::Patient));
            }
            View::Items(k) => {
                columns.extend(
                    self.items[k]
                        .defs
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name.clone(), Source::Item(i), c.clone())),
                );
                columns.extend(plain(timepoints, Source::Timepoint));
                columns.extend(qualified(TIMEPOINTS_VIEW, timepoints, Source::Timepoint));
                columns.push((TIMEPOINT_COLUMN.into(), Source::TimepointNumber, number));
                columns.extend(qualified(PATIENTS_VIEW, patients, Source::Patient));
            }
        }
        // Patient columns by their plain name too, unless a closer layer has that name.
        if view != View::Patients {
            for (i, c) in patients.iter().enumerate() {
                if !columns.iter().any(|(name, _, _)| *name == c.name) {
                    columns.push((c.name.clone(), Source::Patient(i), c.clone()));
                }
            }
        }
        columns
    }

    /// Binds `query` to this dataset, or says which part does not fit.
    pub fn compile(&self, query: &Query) -> Result<CompiledQuery, SchemaError> {
        let view = self.view(&query.view)?;
        let columns = self.view_columns(view);
        let mut consents = vec![SECONDARY_USE.to_string()];
        if let View::Items(k) = view
            && let Some(scope) = &self.schema.items[k].consent
        {
            consents.push(scope.clone());
        }
        let filter = self.bind(&query.filter, &query.view, &columns, &mut consents)?;
        let cap = match view {
            View::Patients => 1,
            _ => self.schema.max_timepoints_per_patient,
        };
        let lookup = |name: &str| {
            columns
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, source, def)| (*source, def.clone()))
                .ok_or_else(|| SchemaError::UnknownColumn {
                    view: query.view.clone(),
                    column: name.to_string(),
                    known: columns
                        .iter()
                        .map(|(n, _, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let measure = |name: &str| -> Result<(Measure, u8), SchemaError> {
            let (source, def) = lookup(name)?;
            let (low, high, scale) = match def.kind {
                ColumnType::Integer { min, max } => (min, max, 0),
                ColumnType::Decimal { min, max, scale } => {
                    let factor = 10f64.powi(i32::from(scale));
                    (
                        (min * factor).floor() as i64,
                        (max * factor).ceil() as i64,
                        scale,
                    )
                }
                _ => {
                    return Err(SchemaError::Value(format!(
                        "`{name}` is {}; sums, means and quantiles need a numeric column",
                        def.kind
                    )));
                }
            };
            Ok((Measure { source, low, high }, scale))
        };
        let groups = query
            .group_by
            .iter()
            .map(|name| {
                let (source, def) = lookup(name)?;
                let levels = match def.kind {
                    ColumnType::Categorical { levels } => levels,
                    ColumnType::Boolean => vec!["false".into(), "true".into()],
                    other => {
                        return Err(SchemaError::Value(format!(
                            "`{name}` is {other}; GROUP BY needs a categorical or true/false column"
                        )));
                    }
                };
                if let Source::PatientHas(k) | Source::TimepointHas(k) = source
                    && let Some(scope) = &self.schema.items[k].consent
                {
                    consents.push(scope.clone());
                }
                Ok((source, levels))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cells: usize = groups.iter().map(|(_, levels)| levels.len()).product();
        if cells > MAX_GROUP_CELLS {
            return Err(SchemaError::Unsupported(format!(
                "GROUP BY {} makes {cells} groups; at most {MAX_GROUP_CELLS} are allowed",
                query.group_by.join(", ")
            )));
        }
        let largest = |m: &Measure| m.low.unsigned_abs().max(m.high.unsigned_abs()) as f64;
        let (computation, sensitivity, count_sensitivity, value_scale) = match &query.aggregate {
            Aggregate::CountPatients | Aggregate::CountRows if !groups.is_empty() => {
                let rows =
                    matches!(query.aggregate, Aggregate::CountRows) && view != View::Patients;
                let patient_level = groups.iter().all(|(source, _)| {
                    matches!(source, Source::Patient(_) | Source::PatientHas(_))
                });
                let sensitivity = if rows {
                    f64::from(cap)
                } else if patient_level || view == View::Patients {
                    1.0
                } else {
                    // A patient's rows may fall in different cells, one count each.
                    (cells.min(cap as usize) as f64).sqrt()
                };
                (
                    Computation::Groups {
                        columns: groups,
                        rows,
                        cap,
                    },
                    sensitivity,
                    None,
                    0,
                )
            }
            Aggregate::CountPatients => (Computation::CountPatients, 1.0, None, 0),
            Aggregate::CountRows if view == View::Patients => {
                (Computation::CountPatients, 1.0, None, 0)
            }
            Aggregate::CountRows => (Computation::CountRows { cap }, f64::from(cap), None, 0),
            Aggregate::Sum { column } => {
                let (measure, scale) = measure(column)?;
                let sensitivity = f64::from(cap) * largest(&measure);
                (Computation::Sum { measure, cap }, sensitivity, None, scale)
            }
            Aggregate::Mean { column } => {
                let (measure, scale) = measure(column)?;
                let sensitivity = f64::from(cap) * largest(&measure);
                (
                    Computation::Mean { measure, cap },
                    sensitivity,
                    Some(f64::from(cap)),
                    scale,
                )
            }
            Aggregate::Quantile { column, .. } => {
                let (measure, scale) = measure(column)?;
                let span = measure.high - measure.low + 1;
                let width = (span + QUANTILE_BINS as i64 - 1) / QUANTILE_BINS as i64;
                let bins = usize::try_from((span + width - 1) / width).unwrap_or(QUANTILE_BINS);
                // A patient's capped rows may all land in one bin.
                (
                    Computation::Histogram {
                        measure,
                        cap,
                        width,
                        bins,
                    },
                    f64::from(cap),
                    None,
                    scale,
                )
            }
            other => {
                return Err(SchemaError::Unsupported(format!(
                    "aggregate {other:?} is not supported by this node"
                )));
            }
        };
        consents.sort();
        consents.dedup();
        let counts = matches!(
            computation,
            Computation::CountPatients | Computation::CountRows { .. } | Computation::Groups { .. }
        );
        let vector = matches!(
            computation,
            Computation::Histogram { .. } | Computation::Groups { .. }
        );
        Ok(CompiledQuery {
            view,
            filter,
            computation,
            required_consents: consents,
            sensitivity,
            count_sensitivity,
            value_scale,
            counts,
            vector,
        })
    }

    fn bind(
        &self,
        filter: &Filter,
        view_name: &str,
        columns: &[(String, Source, ColumnDef)],
        consents: &mut Vec<String>,
    ) -> Result<Node, SchemaError> {
        let column = |name: &str| {
            columns
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, source, def)| (*source, def))
                .ok_or_else(|| SchemaError::UnknownColumn {
                    view: view_name.to_string(),
                    column: name.to_string(),
                    known: columns
                        .iter()
                        .map(|(n, _, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let value = |def: &ColumnDef, literal: &Literal| {
            def.encode_literal(literal)
                .map_err(|e| SchemaError::Value(e.0))
        };
        let mut needs_consent = |source: Source| {
            if let Source::PatientHas(k) | Source::TimepointHas(k) = source
                && let Some(scope) = &self.schema.items[k].consent
            {
                consents.push(scope.clone());
            }
        };
        Ok(match filter {
            Filter::True => Node::True,
            Filter::And(children) => Node::And(
                children
                    .iter()
                    .map(|c| self.bind(c, view_name, columns, consents))
                    .collect::<Result<_, _>>()?,
            ),
            Filter::Or(children) => Node::Or(
                children
                    .iter()
                    .map(|c| self.bind(c, view_name, columns, consents))
                    .collect::<Result<_, _>>()?,
            ),
            Filter::Not(inner) => {
                Node::Not(Box::new(self.bind(inner, view_name, columns, consents)?))
            }
            Filter::Compare {
                column: name,
                op,
                value: literal,
            } => {
                let (source, def) = column(name)?;
                needs_consent(source);
                Node::Test(source, Test::Cmp(*op, value(def, literal)?))
            }
            Filter::In {
                column: name,
                values,
            } => {
                let (source, def) = column(name)?;
                needs_consent(source);
                Node::Test(
                    source,
                    Test::In(
                        values
                            .iter()
                            .map(|v| value(def, v))
                            .collect::<Result<_, _>>()?,
                    ),
                )
            }
            Filter::Between {
                column: name,
                low,
                high,
            } => {
                let (source, def) = column(name)?;
                needs_consent(source);
                Node::Test(source, Test::Between(value(def, low)?, value(def, high)?))
            }
            Filter::IsNull {
                column: name,
                negated,
            } => {
                let (source, _) = column(name)?;
                needs_consent(source);
                Node::Test(source, Test::IsNull { negated: *negated })
            }
        })
    }

    /// The exact answer of a compiled query over consenting patients. Never leaves the node
    /// without noise.
    pub fn evaluate(&self, query: &CompiledQuery) -> Exact {
        let mut consenting = Bitset::full(self.patients.len);
        for scope in &query.required_consents {
            match self.patients.consents.get(scope) {
                Some(set) => consenting.and(set),
                None => consenting = Bitset::empty(self.patients.len),
            }
        }
        let rows = self.eval(&query.filter, query.view).0;
        let parent: Option<&[u32]> = match query.view {
            View::Patients => None,
            View::Timepoints => Some(&self.timepoints.patient),
            View::Items(k) => Some(&self.items[k].patient),
        };
        let patient_of = |row: usize| parent.map_or(row, |p| p[row] as usize);
        // The matching rows of consenting patients, at most `cap` per patient.
        let capped = |cap: u32, keep: &dyn Fn(usize) -> bool| -> Vec<usize> {
            let mut taken: HashMap<usize, u32> = HashMap::new();
            rows.iter()
                .filter(|&row| consenting.contains(patient_of(row)) && keep(row))
                .filter(|&row| {
                    let seen = taken.entry(patient_of(row)).or_insert(0);
                    *seen < cap && {
                        *seen += 1;
                        true
                    }
                })
                .collect()
        };
        match &query.computation {
            Computation::CountPatients => {
                let mut patients = match parent {
                    None => rows.clone(),
                    Some(parent) => rows.scatter(parent, self.patients.len),
                };
                patients.and(&consenting);
                Exact::Scalar(patients.count() as i64)
            }
            Computation::CountRows { cap } => Exact::Scalar(capped(*cap, &|_| true).len() as i64),
            Computation::Sum { measure, cap } | Computation::Mean { measure, cap } => {
                let values = self.values(measure.source, query.view);
                let kept = capped(*cap, &|row| values.get(row) != NULL);
                let sum: i128 = kept
                    .iter()
                    .map(|&row| i128::from(values.get(row).clamp(measure.low, measure.high)))
                    .sum();
                let sum = i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX });
                match query.computation {
                    Computation::Mean { .. } => Exact::SumAndCount {
                        sum,
                        count: kept.len() as i64,
                    },
                    _ => Exact::Scalar(sum),
                }
            }
            Computation::Histogram {
                measure,
                cap,
                width,
                bins,
            } => {
                let values = self.values(measure.source, query.view);
                let mut counts = vec![0i64; *bins];
                for row in capped(*cap, &|row| values.get(row) != NULL) {
                    let value = values.get(row).clamp(measure.low, measure.high);
                    let bin = usize::try_from((value - measure.low) / width).unwrap_or(0);
                    counts[bin.min(bins - 1)] += 1;
                }
                Exact::Histogram {
                    low: measure.low,
                    width: *width,
                    counts,
                }
            }
            Computation::Groups {
                columns,
                rows: count_rows,
                cap,
            } => {
                // Each row's cell, one typed pass per column.
                let mut cell = vec![0u32; self.rows(query.view)];
                for (source, levels) in columns {
                    let levels = u32::try_from(levels.len()).unwrap_or(u32::MAX);
                    self.values(*source, query.view)
                        .fold_levels(&mut cell, levels);
                }
                let cell_of = |row: usize| -> Option<usize> {
                    (cell[row] != NO_CELL).then_some(cell[row] as usize)
                };
                let cells: usize = columns.iter().map(|(_, l)| l.len()).product();
                let mut counts = vec![0i64; cells];
                if *count_rows {
                    for row in capped(*cap, &|row| cell_of(row).is_some()) {
                        if let Some(cell) = cell_of(row) {
                            counts[cell] += 1;
                        }
                    }
                } else if parent.is_none() {
                    // Rows are patients: each counts once in its cell.
                    let mut kept = rows.clone();
                    kept.and(&consenting);
                    for row in kept.iter() {
                        if let Some(cell) = cell_of(row) {
                            counts[cell] += 1;
                        }
                    }
                } else {
                    // Distinct patients per cell.
                    let mut pairs: Vec<(usize, usize)> = rows
                        .iter()
                        .filter(|&row| consenting.contains(patient_of(row)))
                        .filter_map(|row| Some((cell_of(row)?, patient_of(row))))
                        .collect();
                    pairs.sort_unstable();
                    pairs.dedup();
                    for (cell, _) in pairs {
                        counts[cell] += 1;
                    }
                }
                let mut labels = vec![Vec::new()];
                for (_, levels) in columns {
                    labels = labels
                        .into_iter()
                        .flat_map(|prefix: Vec<String>| {
                            levels.iter().map(move |level| {
                                let mut label = prefix.clone();
                                label.push(level.clone());
                                label
                            })
                        })
                        .collect();
                }
                Exact::Groups { labels, counts }
            }
        }
    }

    /// A column's values for each row of `view` (gathered from the layer it lives in;
    /// borrowed when it lives in the view's own layer).
    fn values(&self, source: Source, view: View) -> Cow<'_, Column> {
        let (level, values): (View, Cow<'_, Column>) = match source {
            Source::Patient(i) => (View::Patients, Cow::Borrowed(&self.patients.columns[i])),
            Source::Timepoint(i) => (View::Timepoints, Cow::Borrowed(&self.timepoints.columns[i])),
            Source::TimepointNumber => (View::Timepoints, Cow::Borrowed(&self.timepoints.number)),
            Source::Item(i) => match view {
                View::Items(k) => (view, Cow::Borrowed(&self.items[k].columns[i])),
                _ => (view, Cow::Owned(Column::missing(self.rows(view)))),
            },
            Source::PatientHas(k) => (
                View::Patients,
                Cow::Owned(Column::flags(&self.presence(source, k))),
            ),
            Source::TimepointHas(k) => (
                View::Timepoints,
                Cow::Owned(Column::flags(&self.presence(source, k))),
            ),
        };
        match (level, view) {
            (from, to) if from == to => values,
            (View::Patients, View::Timepoints) => {
                Cow::Owned(values.gather(&self.timepoints.patient))
            }
            (View::Patients, View::Items(k)) => Cow::Owned(values.gather(&self.items[k].patient)),
            (View::Timepoints, View::Items(k)) => {
                Cow::Owned(values.gather(&self.items[k].timepoint))
            }
            _ => Cow::Owned(Column::missing(self.rows(view))),
        }
    }

    /// The patients (for `PatientHas`) or timepoints (for `TimepointHas`) with an item of
    /// kind `k`.
    fn presence(&self, source: Source, k: usize) -> Bitset {
        let items = &self.items[k];
        match source {
            Source::TimepointHas(_) => {
                Bitset::full(items.len).scatter(&items.timepoint, self.timepoints.len)
            }
            _ => Bitset::full(items.len).scatter(&items.patient, self.patients.len),
        }
    }

    fn rows(&self, view: View) -> usize {
        match view {
            View::Patients => self.patients.len,
            View::Timepoints => self.timepoints.len,
            View::Items(k) => self.items[k].len,
        }
    }

    /// (rows where the filter is true, rows where it is false); rows in neither are unknown.
    fn eval(&self, node: &Node, view: View) -> (Bitset, Bitset) {
        let len = self.rows(view);
        match node {
            Node::True => (Bitset::full(len), Bitset::empty(len)),
            Node::And(children) => {
                let mut t = Bitset::full(len);
                let mut f = Bitset::empty(len);
                for child in children {
                    let (ct, cf) = self.eval(child, view);
                    t.and(&ct);
                    f.or(&cf);
                }
                (t, f)
            }
            Node::Or(children) => {
                let mut t = Bitset::empty(len);
                let mut f = Bitset::full(len);
                for child in children {
                    let (ct, cf) = self.eval(child, view);
                    t.or(&ct);
                    f.and(&cf);
                }
                (t, f)
            }
            Node::Not(inner) => {
                let (t, f) = self.eval(inner, view);
                (f, t)
            }
            Node::Test(source, test) => self.test(*source, test, view),
        }
    }

    /// Evaluates a test where its column lives, then carries the result to the view's rows.
    fn test(&self, source: Source, test: &Test, view: View) -> (Bitset, Bitset) {
        let (level, values): (View, Option<&Column>) = match source {
            Source::Patient(i) => (View::Patients, Some(&self.patients.columns[i])),
            Source::Timepoint(i) => (View::Timepoints, Some(&self.timepoints.columns[i])),
            Source::TimepointNumber => (View::Timepoints, Some(&self.timepoints.number)),
            Source::Item(i) => match view {
                View::Items(k) => (view, Some(&self.items[k].columns[i])),
                _ => (view, None),
            },
            Source::PatientHas(_) => (View::Patients, None),
            Source::TimepointHas(_) => (View::Timepoints, None),
        };
        let (t, f) = match (source, values) {
            (_, Some(values)) => column_test(values, test),
            (Source::PatientHas(k) | Source::TimepointHas(k), None) => {
                presence_test(self.presence(source, k), test)
            }
            _ => (
                Bitset::empty(self.rows(view)),
                Bitset::empty(self.rows(view)),
            ),
        };
        let carry = |set: Bitset| match (level, view) {
            (from, to) if from == to => set,
            (View::Patients, View::Timepoints) => set.gather(&self.timepoints.patient),
            (View::Patients, View::Items(k)) => set.gather(&self.items[k].patient),
            (View::Timepoints, View::Items(k)) => set.gather(&self.items[k].timepoint),
            // Compilation never binds a column of a lower layer to a higher view.
            _ => Bitset::empty(self.rows(view)),
        };
        (carry(t), carry(f))
    }
}

fn too_many() -> NodeError {
    NodeError::CorruptStore {
        what: "dataset".into(),
        reason: "more than 4 294 967 295 rows in one table".into(),
    }
}

fn push_values(columns: &mut [Vec<i64>], values: &[Option<i64>]) {
    for (i, column) in columns.iter_mut().enumerate() {
        column.push(values.get(i).copied().flatten().unwrap_or(NULL));
    }
}

/// (true, false) rows of a test on a column; a missing value is neither.
fn column_test(column: &Column, test: &Test) -> (Bitset, Bitset) {
    // Every comparison is a range of values (or, for `<>`, the outside of one).
    let (low, high) = match test {
        Test::IsNull { negated } => {
            let present = column.present();
            let mut missing = Bitset::full(column.len());
            missing.and_not(&present);
            return if *negated {
                (present, missing)
            } else {
                (missing, present)
            };
        }
        Test::In(set) => return column.split_in(set),
        Test::Cmp(CmpOp::Ne, x) => {
            let (equal, other) = column.split_range(*x, *x);
            return (other, equal);
        }
        Test::Cmp(CmpOp::Eq, x) => (*x, *x),
        Test::Cmp(CmpOp::Lt, x) => (i64::MIN, x.saturating_sub(1)),
        Test::Cmp(CmpOp::Le, x) => (i64::MIN, *x),
        // Above i64::MAX there is nothing: an empty range.
        Test::Cmp(CmpOp::Gt, x) => x.checked_add(1).map_or((1, 0), |low| (low, i64::MAX)),
        Test::Cmp(CmpOp::Ge, x) => (*x, i64::MAX),
        Test::Between(low, high) => (*low, *high),
    };
    column.split_range(low, high)
}

/// (true, false) rows of a test on a presence flag (never missing).
fn presence_test(has: Bitset, test: &Test) -> (Bitset, Bitset) {
    let len = has.len();
    let mut hasnt = Bitset::full(len);
    hasnt.and_not(&has);
    let wants = |x: i64| x != 0;
    match test {
        Test::IsNull { negated: false } => (Bitset::empty(len), Bitset::full(len)),
        Test::IsNull { negated: true } => (Bitset::full(len), Bitset::empty(len)),
        Test::Cmp(CmpOp::Eq, x) if wants(*x) => (has, hasnt),
        Test::Cmp(CmpOp::Eq, _) => (hasnt, has),
        Test::Cmp(CmpOp::Ne, x) if wants(*x) => (hasnt, has),
        Test::Cmp(CmpOp::Ne, _) => (has, hasnt),
        other => column_test(&Column::flags(&has), other),
    }
}
