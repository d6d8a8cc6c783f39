//! The in-memory image of a node's data that queries run on, layer by layer and column by
//! column, and the builder that the node's loader fills from its store.
//!
//! Three layers: patients, their timepoints and the information items at each timepoint.
//! Each layer is columnar (one [`Column`] per schema column, each in the narrowest integer
//! width that holds its values); the lower layers point at their parents by index, and the
//! patients' consent scopes are bitsets. The image knows nothing of storage: the node reads
//! its shards and hands the rows to an [`ImageBuilder`], so this crate stays pure.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bitset::Bitset;
use crate::column::{Column, NULL};
use crate::schema::{ColumnDef, DatasetSchema, SECONDARY_USE};

#[derive(Debug, Default, Clone)]
pub(crate) struct Patients {
    pub(crate) len: usize,
    pub(crate) columns: Vec<Column>,
    /// Patients who gave each consent scope.
    pub(crate) consents: BTreeMap<String, Bitset>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Timepoints {
    pub(crate) len: usize,
    pub(crate) patient: Vec<u32>,
    pub(crate) number: Column,
    pub(crate) columns: Vec<Column>,
    /// Each patient's rows are consecutive.
    pub(crate) grouped: bool,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Items {
    pub(crate) len: usize,
    pub(crate) patient: Vec<u32>,
    pub(crate) timepoint: Vec<u32>,
    pub(crate) columns: Vec<Column>,
    /// The summary columns of this kind's format.
    pub(crate) defs: Vec<ColumnDef>,
    /// Each patient's rows are consecutive.
    pub(crate) grouped: bool,
}

/// The node's data, ready to be queried.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub(crate) schema: Arc<DatasetSchema>,
    pub(crate) patients: Patients,
    pub(crate) timepoints: Timepoints,
    /// Parallel to the schema's item kinds.
    pub(crate) items: Vec<Items>,
    /// Stored records whose patient is missing (reported, never counted).
    pub(crate) orphans: usize,
    /// Patients with more timepoints than the schema's bound on rows per patient.
    pub(crate) over_bound: usize,
}

/// Which rows a query ranges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Patients,
    Timepoints,
    Items(usize),
}

/// Where a column's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Patient(usize),
    Timepoint(usize),
    TimepointNumber,
    Item(usize),
    /// Whether the patient has an item of this kind at any timepoint.
    PatientHas(usize),
    /// Whether the timepoint has an item of this kind.
    TimepointHas(usize),
}

impl Source {
    /// Whether the values live in the patient layer (one per patient).
    pub fn is_patient_level(self) -> bool {
        match self {
            Source::Patient(_) | Source::PatientHas(_) => true,
            Source::Timepoint(_)
            | Source::TimepointNumber
            | Source::Item(_)
            | Source::TimepointHas(_) => false,
        }
    }
}

/// A layer holds more rows than its 32-bit parent indices can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than 4 294 967 295 rows in one table")]
pub struct TooManyRows;

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
            over_bound: 0,
        }
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

    /// Patients with more timepoints than the schema's `max_timepoints_per_patient`: each
    /// contributes at most that many rows to a timepoint answer, spread over its course.
    pub fn patients_over_bound(&self) -> usize {
        self.over_bound
    }

    /// Whether each patient's rows of `view` are consecutive (as the loader writes them).
    pub(crate) fn grouped_by_patient(&self, view: View) -> bool {
        match view {
            View::Patients => true,
            View::Timepoints => self.timepoints.grouped,
            View::Items(k) => self.items[k].grouped,
        }
    }

    pub(crate) fn rows(&self, view: View) -> usize {
        match view {
            View::Patients => self.patients.len,
            View::Timepoints => self.timepoints.len,
            View::Items(k) => self.items[k].len,
        }
    }

    /// Each row's patient, for a view below the patient layer.
    pub(crate) fn parent(&self, view: View) -> Option<&[u32]> {
        match view {
            View::Patients => None,
            View::Timepoints => Some(&self.timepoints.patient),
            View::Items(k) => Some(&self.items[k].patient),
        }
    }

    /// The patients who gave every scope in `scopes`.
    pub(crate) fn consenting(&self, scopes: &[String]) -> Bitset {
        let mut consenting = Bitset::full(self.patients.len);
        for scope in scopes {
            match self.patients.consents.get(scope) {
                Some(set) => consenting.and(set),
                None => consenting = Bitset::empty(self.patients.len),
            }
        }
        consenting
    }

    /// The layer a source lives in and its stored column there, if it is one.
    pub(crate) fn stored(&self, source: Source, view: View) -> (View, Option<&Column>) {
        match source {
            Source::Patient(i) => (View::Patients, Some(&self.patients.columns[i])),
            Source::Timepoint(i) => (View::Timepoints, Some(&self.timepoints.columns[i])),
            Source::TimepointNumber => (View::Timepoints, Some(&self.timepoints.number)),
            Source::Item(i) => match view {
                View::Items(k) => (view, Some(&self.items[k].columns[i])),
                View::Patients | View::Timepoints => (view, None),
            },
            Source::PatientHas(_) => (View::Patients, None),
            Source::TimepointHas(_) => (View::Timepoints, None),
        }
    }

    /// How the rows of `view` find their row in `level`: the same rows, through a parent
    /// index, or not at all (binding never puts a column of a lower layer in a higher view).
    fn link(&self, level: View, view: View) -> Link<'_> {
        match (level, view) {
            (View::Patients, View::Patients) | (View::Timepoints, View::Timepoints) => Link::Same,
            (View::Items(a), View::Items(b)) if a == b => Link::Same,
            (View::Patients, View::Timepoints) => Link::Through(&self.timepoints.patient),
            (View::Patients, View::Items(k)) => Link::Through(&self.items[k].patient),
            (View::Timepoints, View::Items(k)) => Link::Through(&self.items[k].timepoint),
            (View::Items(_), View::Items(_))
            | (View::Timepoints | View::Items(_), View::Patients)
            | (View::Items(_), View::Timepoints) => Link::None,
        }
    }

    /// A column's values for each row of `view` (gathered from the layer it lives in;
    /// borrowed when it lives in the view's own layer).
    pub(crate) fn values(&self, source: Source, view: View) -> Cow<'_, Column> {
        let (level, values): (View, Cow<'_, Column>) = match self.stored(source, view) {
            (level, Some(column)) => (level, Cow::Borrowed(column)),
            (level, None) => match source {
                Source::PatientHas(k) | Source::TimepointHas(k) => {
                    (level, Cow::Owned(Column::flags(&self.presence(source, k))))
                }
                Source::Patient(_)
                | Source::Timepoint(_)
                | Source::TimepointNumber
                | Source::Item(_) => (level, Cow::Owned(Column::missing(self.rows(view)))),
            },
        };
        match self.link(level, view) {
            Link::Same => values,
            Link::Through(parent) => Cow::Owned(values.gather(parent)),
            Link::None => Cow::Owned(Column::missing(self.rows(view))),
        }
    }

    /// Carries a set of rows of `level` to the rows of `view` below it.
    pub(crate) fn carry(&self, set: Bitset, level: View, view: View) -> Bitset {
        match self.link(level, view) {
            Link::Same => set,
            Link::Through(parent) => set.gather(parent),
            Link::None => Bitset::empty(self.rows(view)),
        }
    }

    /// The patients (for `PatientHas`) or timepoints (for `TimepointHas`) with an item of
    /// kind `k`.
    pub(crate) fn presence(&self, source: Source, k: usize) -> Bitset {
        let items = &self.items[k];
        match source {
            Source::TimepointHas(_) => {
                Bitset::full(items.len).scatter(&items.timepoint, self.timepoints.len)
            }
            Source::PatientHas(_)
            | Source::Patient(_)
            | Source::Timepoint(_)
            | Source::TimepointNumber
            | Source::Item(_) => Bitset::full(items.len).scatter(&items.patient, self.patients.len),
        }
    }
}

/// How one layer's rows reach another's.
enum Link<'a> {
    Same,
    Through(&'a [u32]),
    None,
}

/// Fills a [`Dataset`] from stored rows. Values are gathered as `i64` and each column is
/// narrowed once every row is in.
#[derive(Debug)]
pub struct ImageBuilder {
    data: Dataset,
    patient_columns: Vec<Vec<i64>>,
    timepoint_columns: Vec<Vec<i64>>,
    timepoint_numbers: Vec<i64>,
    item_columns: Vec<Vec<Vec<i64>>>,
    consent_rows: BTreeMap<String, Vec<usize>>,
}

impl ImageBuilder {
    pub fn new(schema: Arc<DatasetSchema>) -> Self {
        let data = Dataset::empty(Arc::clone(&schema));
        let item_columns = data
            .items
            .iter()
            .map(|i| vec![Vec::new(); i.defs.len()])
            .collect();
        Self {
            patient_columns: vec![Vec::new(); schema.patients.len()],
            timepoint_columns: vec![Vec::new(); schema.timepoints.len()],
            timepoint_numbers: Vec::new(),
            item_columns,
            consent_rows: BTreeMap::new(),
            data,
        }
    }

    /// Adds one patient with the consent scopes it gave; returns its index.
    pub fn add_patient<'a>(
        &mut self,
        scopes: impl IntoIterator<Item = &'a str>,
    ) -> Result<u32, TooManyRows> {
        let index = self.data.patients.len;
        let number = u32::try_from(index).map_err(|_| TooManyRows)?;
        for scope in scopes {
            match self.consent_rows.get_mut(scope) {
                Some(rows) => rows.push(index),
                None => {
                    self.consent_rows.insert(scope.to_string(), vec![index]);
                }
            }
        }
        self.data.patients.len += 1;
        Ok(number)
    }

    /// Appends patient column values (one slice per schema column, one value per patient
    /// added since the last call, missing as [`NULL`]).
    pub fn extend_patient_columns(&mut self, columns: &[Vec<i64>]) {
        for (column, values) in self.patient_columns.iter_mut().zip(columns) {
            column.extend_from_slice(values);
        }
    }

    /// Adds one timepoint of patient `patient` (an index from [`Self::add_patient`]).
    pub fn add_timepoint(&mut self, patient: u32, number: u16) {
        self.data.timepoints.patient.push(patient);
        self.timepoint_numbers.push(i64::from(number));
    }

    /// Appends timepoint column values for the timepoints added since the last call:
    /// `rows` picks them out of `columns` (all of them when `None`).
    pub fn extend_timepoint_columns(&mut self, columns: &[Vec<i64>], rows: Option<&[usize]>) {
        for (column, values) in self.timepoint_columns.iter_mut().zip(columns) {
            match rows {
                None => column.extend_from_slice(values),
                Some(rows) => column.extend(rows.iter().map(|row| values[*row])),
            }
        }
        self.data.timepoints.len = self.data.timepoints.patient.len();
    }

    /// Timepoints added so far.
    pub fn timepoints(&self) -> usize {
        self.data.timepoints.patient.len()
    }

    /// Adds an item of kind `kind` (schema order) at timepoint `timepoint` of `patient`.
    pub fn add_item(
        &mut self,
        kind: usize,
        patient: u32,
        timepoint: usize,
        values: &[Option<i64>],
    ) -> Result<(), TooManyRows> {
        let (Some(items), Some(columns)) = (
            self.data.items.get_mut(kind),
            self.item_columns.get_mut(kind),
        ) else {
            self.data.orphans += 1;
            return Ok(());
        };
        items.patient.push(patient);
        items
            .timepoint
            .push(u32::try_from(timepoint).map_err(|_| TooManyRows)?);
        for (i, column) in columns.iter_mut().enumerate() {
            column.push(values.get(i).copied().flatten().unwrap_or(NULL));
        }
        items.len += 1;
        Ok(())
    }

    /// Records `count` stored rows that belong to no stored patient or timepoint.
    pub fn add_orphans(&mut self, count: usize) {
        self.data.orphans += count;
    }

    /// The finished image.
    pub fn finish(self) -> Dataset {
        let Self {
            mut data,
            patient_columns,
            timepoint_columns,
            timepoint_numbers,
            item_columns,
            consent_rows,
        } = self;
        for (scope, rows) in consent_rows {
            let mut set = Bitset::empty(data.patients.len);
            rows.into_iter().for_each(|r| set.insert(r));
            data.patients.consents.insert(scope, set);
        }
        let narrowest =
            |columns: Vec<Vec<i64>>| columns.into_iter().map(Column::narrowest).collect();
        data.patients.columns = narrowest(patient_columns);
        data.timepoints.columns = narrowest(timepoint_columns);
        data.timepoints.number = Column::narrowest(timepoint_numbers);
        for (items, columns) in data.items.iter_mut().zip(item_columns) {
            items.columns = narrowest(columns);
        }
        let consecutive = |parent: &[u32]| parent.windows(2).all(|w| w[0] <= w[1]);
        data.timepoints.grouped = consecutive(&data.timepoints.patient);
        for items in &mut data.items {
            items.grouped = consecutive(&items.patient);
        }
        let mut timepoints = vec![0u32; data.patients.len];
        for patient in &data.timepoints.patient {
            if let Some(count) = timepoints.get_mut(*patient as usize) {
                *count += 1;
            }
        }
        let bound = data.schema.max_timepoints_per_patient;
        data.over_bound = timepoints.iter().filter(|n| **n > bound).count();
        data
    }
}
