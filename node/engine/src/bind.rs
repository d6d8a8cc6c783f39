//! Binding a query to the dataset's schema: its view and columns resolved, its literals
//! encoded as stored integers, the consent scopes it needs collected, and what statistics
//! may ask while they bind ([`Binder`]: measures, groupings, the bound on rows per patient).
//! Anything that does not fit is refused with a [`SchemaError`] that names it.

use renkei_protocol::{Filter, Literal};

use crate::image::{Dataset, Source, View};
use crate::schema::{
    ColumnDef, ColumnType, DatasetSchema, PATIENTS_VIEW, TIMEPOINT_COLUMN, TIMEPOINTS_VIEW,
};

/// Most cells a GROUP BY may produce.
pub const MAX_GROUP_CELLS: usize = 1024;

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

/// A comparison on stored integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Test {
    Cmp(renkei_protocol::CmpOp, i64),
    In(Vec<i64>),
    Between(i64, i64),
    IsNull { negated: bool },
}

/// Two numeric columns compared: `left · left_factor op right · right_factor + offset`,
/// both sides brought to one fixed-point scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnComparison {
    pub(crate) left: Source,
    pub(crate) left_factor: i64,
    pub(crate) op: renkei_protocol::CmpOp,
    pub(crate) right: Source,
    pub(crate) right_factor: i64,
    pub(crate) offset: i64,
}

/// A filter bound to the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    True,
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Test(Source, Test),
    Columns(ColumnComparison),
}

/// A numeric column read by a statistic: where it lives, its bounds in stored units and
/// its fixed-point scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    pub source: Source,
    pub low: i64,
    pub high: i64,
    /// Digits after the point (the column's fixed-point scale).
    pub scale: u8,
}

impl Measure {
    /// The largest magnitude a clamped value can have: one row's share of a sum's
    /// sensitivity.
    pub fn largest(&self) -> f64 {
        self.low.unsigned_abs().max(self.high.unsigned_abs()) as f64
    }
}

/// The GROUP BY columns of a query, each with its levels, in cell order (the first column
/// varies slowest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouping {
    pub columns: Vec<(Source, Vec<String>)>,
}

impl Grouping {
    /// How many cells the grouping makes (every combination of levels, empty ones too).
    pub fn cells(&self) -> usize {
        self.columns
            .iter()
            .map(|(_, levels)| levels.len())
            .product()
    }

    /// Whether every grouping column is a patient's (so a patient falls in one cell).
    pub fn patient_level(&self) -> bool {
        self.columns
            .iter()
            .all(|(source, _)| source.is_patient_level())
    }

    /// Each cell's labels, in cell order.
    pub fn labels(&self) -> Vec<Vec<String>> {
        let mut labels = vec![Vec::new()];
        for (_, levels) in &self.columns {
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
        labels
    }
}

/// What a statistic may ask of the schema while it is bound: the view, the bound on rows
/// per patient, and the columns it reads.
#[derive(Debug)]
pub struct Binder<'a> {
    dataset: &'a Dataset,
    view_name: &'a str,
    view: View,
    columns: Vec<(String, Source, ColumnDef)>,
    consents: Vec<String>,
}

impl<'a> Binder<'a> {
    /// A binder for the view named `view_name` (resolved to `view`), whose rows need the
    /// consent scopes `consents`.
    pub(crate) fn new(
        dataset: &'a Dataset,
        view_name: &'a str,
        view: View,
        consents: Vec<String>,
    ) -> Self {
        Self {
            columns: dataset.view_columns(view),
            dataset,
            view_name,
            view,
            consents,
        }
    }

    /// The consent scopes the query needs, sorted, each once.
    pub(crate) fn into_consents(self) -> Vec<String> {
        let mut consents = self.consents;
        consents.sort();
        consents.dedup();
        consents
    }

    /// The view the query ranges over.
    pub fn view(&self) -> View {
        self.view
    }

    /// Whether the view's rows are patients.
    pub fn patient_view(&self) -> bool {
        self.view == View::Patients
    }

    /// The most rows one patient contributes to an answer: 1 on `patients`, else the
    /// schema's bound on timepoints per patient.
    pub fn rows_per_patient(&self) -> u32 {
        match self.view {
            View::Patients => 1,
            View::Timepoints | View::Items(_) => self.dataset.schema.max_timepoints_per_patient,
        }
    }

    /// A column of the view, by name.
    pub fn column(&self, name: &str) -> Result<(Source, &ColumnDef), SchemaError> {
        self.columns
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, source, def)| (*source, def))
            .ok_or_else(|| SchemaError::UnknownColumn {
                view: self.view_name.to_string(),
                column: name.to_string(),
                known: self
                    .columns
                    .iter()
                    .map(|(n, _, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A numeric column a statistic reads, with its bounds in stored units.
    pub fn measure(&self, name: &str) -> Result<Measure, SchemaError> {
        let (source, def) = self.column(name)?;
        let (low, high, scale) = match &def.kind {
            ColumnType::Integer { min, max } => (*min, *max, 0),
            ColumnType::Decimal { min, max, scale } => {
                let factor = 10f64.powi(i32::from(*scale));
                (
                    (min * factor).floor() as i64,
                    (max * factor).ceil() as i64,
                    *scale,
                )
            }
            ColumnType::Categorical { .. } | ColumnType::Boolean => {
                return Err(SchemaError::Value(format!(
                    "`{name}` is {}; sums, means and quantiles need a numeric column",
                    def.kind
                )));
            }
        };
        Ok(Measure {
            source,
            low,
            high,
            scale,
        })
    }

    /// The GROUP BY columns, each categorical or true/false, making at most
    /// [`MAX_GROUP_CELLS`] cells.
    pub fn grouping(&mut self, names: &[String]) -> Result<Grouping, SchemaError> {
        let mut columns = Vec::with_capacity(names.len());
        for name in names {
            let (source, def) = self.column(name)?;
            let levels = match &def.kind {
                ColumnType::Categorical { levels } => levels.clone(),
                ColumnType::Boolean => vec!["false".into(), "true".into()],
                other @ (ColumnType::Integer { .. } | ColumnType::Decimal { .. }) => {
                    return Err(SchemaError::Value(format!(
                        "`{name}` is {other}; GROUP BY needs a categorical or true/false column"
                    )));
                }
            };
            self.needs_consent(source);
            columns.push((source, levels));
        }
        let grouping = Grouping { columns };
        let cells = grouping.cells();
        if cells > MAX_GROUP_CELLS {
            return Err(SchemaError::Unsupported(format!(
                "GROUP BY {} makes {cells} groups; at most {MAX_GROUP_CELLS} are allowed",
                names.join(", ")
            )));
        }
        Ok(grouping)
    }

    /// Reading a presence flag of a kind with its own consent scope needs that scope.
    fn needs_consent(&mut self, source: Source) {
        if let Source::PatientHas(k) | Source::TimepointHas(k) = source
            && let Some(scope) = &self.dataset.schema.items[k].consent
        {
            self.consents.push(scope.clone());
        }
    }

    pub(crate) fn filter(&mut self, filter: &Filter) -> Result<Node, SchemaError> {
        let value = |def: &ColumnDef, literal: &Literal| {
            def.encode_literal(literal)
                .map_err(|e| SchemaError::Value(e.0))
        };
        Ok(match filter {
            Filter::True => Node::True,
            Filter::And(children) => Node::And(
                children
                    .iter()
                    .map(|c| self.filter(c))
                    .collect::<Result<_, _>>()?,
            ),
            Filter::Or(children) => Node::Or(
                children
                    .iter()
                    .map(|c| self.filter(c))
                    .collect::<Result<_, _>>()?,
            ),
            Filter::Not(inner) => Node::Not(Box::new(self.filter(inner)?)),
            Filter::Compare {
                column: name,
                op,
                value: literal,
            } => {
                let (source, def) = self.column(name)?;
                let test = Test::Cmp(*op, value(def, literal)?);
                self.needs_consent(source);
                Node::Test(source, test)
            }
            Filter::In {
                column: name,
                values,
            } => {
                let (source, def) = self.column(name)?;
                let test = Test::In(
                    values
                        .iter()
                        .map(|v| value(def, v))
                        .collect::<Result<_, _>>()?,
                );
                self.needs_consent(source);
                Node::Test(source, test)
            }
            Filter::Between {
                column: name,
                low,
                high,
            } => {
                let (source, def) = self.column(name)?;
                let test = Test::Between(value(def, low)?, value(def, high)?);
                self.needs_consent(source);
                Node::Test(source, test)
            }
            Filter::IsNull {
                column: name,
                negated,
            } => {
                let (source, _) = self.column(name)?;
                self.needs_consent(source);
                Node::Test(source, Test::IsNull { negated: *negated })
            }
            Filter::Columns {
                left,
                op,
                right,
                offset,
            } => Node::Columns(self.column_comparison(left, *op, right, offset)?),
        })
    }

    /// `left op right + offset` over two numeric columns, at the finer of their scales
    /// (and the offset's).
    fn column_comparison(
        &mut self,
        left: &str,
        op: renkei_protocol::CmpOp,
        right: &str,
        offset: &Literal,
    ) -> Result<ColumnComparison, SchemaError> {
        let numeric = |binder: &Self, name: &str| -> Result<(Source, u8), SchemaError> {
            let (source, def) = binder.column(name)?;
            match &def.kind {
                ColumnType::Integer { .. } => Ok((source, 0)),
                ColumnType::Decimal { scale, .. } => Ok((source, *scale)),
                other @ (ColumnType::Categorical { .. } | ColumnType::Boolean) => {
                    Err(SchemaError::Value(format!(
                        "`{name}` is {other}; only numeric columns can be compared with each other"
                    )))
                }
            }
        };
        let (left_source, left_scale) = numeric(self, left)?;
        let (right_source, right_scale) = numeric(self, right)?;
        let offset_scale = match offset {
            Literal::Integer(_) => 0,
            Literal::Decimal(d) => d.scale,
            Literal::Text(_) | Literal::Bool(_) => {
                return Err(SchemaError::Value(format!(
                    "`{left} {} {right} + {offset}` needs a number to add",
                    op.symbol()
                )));
            }
        };
        let scale = left_scale.max(right_scale).max(offset_scale);
        let factor = |from: u8| 10i64.checked_pow(u32::from(scale - from));
        let too_fine = || {
            SchemaError::Value(format!(
                "`{left} {} {right}` compares at {scale} digits after the point; too many",
                op.symbol()
            ))
        };
        let offset = match offset {
            Literal::Integer(n) => factor(0).and_then(|f| n.checked_mul(f)),
            Literal::Decimal(d) => factor(d.scale).and_then(|f| d.digits.checked_mul(f)),
            Literal::Text(_) | Literal::Bool(_) => None,
        }
        .ok_or_else(too_fine)?;
        self.needs_consent(left_source);
        self.needs_consent(right_source);
        Ok(ColumnComparison {
            left: left_source,
            left_factor: factor(left_scale).ok_or_else(too_fine)?,
            op,
            right: right_source,
            right_factor: factor(right_scale).ok_or_else(too_fine)?,
            offset,
        })
    }
}

impl Dataset {
    /// Every view of this dataset's schema with the columns a query may name on it (as a
    /// study's policy lists them): what the consortium's tools check a study against.
    pub fn catalogue(&self) -> Vec<(String, Vec<String>)> {
        self.schema
            .views()
            .into_iter()
            .filter_map(|name| {
                let view = self.view(name).ok()?;
                let columns = self
                    .view_columns(view)
                    .into_iter()
                    .map(|(column, _, _)| column)
                    .collect();
                Some((name.to_string(), columns))
            })
            .collect()
    }

    pub(crate) fn view(&self, name: &str) -> Result<View, SchemaError> {
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
    pub(crate) fn view_columns(&self, view: View) -> Vec<(String, Source, ColumnDef)> {
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
}
