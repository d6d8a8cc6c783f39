//! Loading what a hospital has into its node: patient and timepoint tables (CSV), consent
//! (CSV), and information items (DICOM, FASTQ) linked through a manifest. Every input is
//! validated whole first; then it is written in one atomic step, or not at all.
//!
//! - **Patients** (`--patients`): a header with `patient_id` and any of the schema's patient
//!   columns, plus `consent_<scope>` columns (`consent_secondary_use`, `consent_genome`).
//! - **Timepoints** (`--timepoints`): `patient_id`, `timepoint` (0–65535) and any of the
//!   schema's timepoint columns. Clinical course, drugs, labs, antibodies and cytokines may
//!   come in separate files: each sets the columns it has.
//! - **Consent** (`--consent`): `patient_id, scope, granted`.
//! - **Manifest** (`--manifest`): `path, patient_id, timepoint, kind`, each file summarised
//!   by its format's reader ([`crate::formats`]); paths are relative to the manifest.
//!
//! A row updates only the columns its file has; loading the same file again changes nothing.
//! Small inputs are written in one atomic step. A large CSV is written in batches of
//! [`WRITE_BATCH_ROWS`] (one atomic sled batch would hold the whole file in memory several
//! times over): the file is named in the store before the first batch and cleared after the
//! last is durable, and while any file is named the node will not load its data
//! ([`NodeError::UnfinishedIngest`]) — after a crash, running the same ingest again
//! completes it, since loading a file twice changes nothing. Consent files go the same way.
//! The hospital's patient id is replaced by a keyed hash under the node's secret, so the
//! store holds no raw identifier; other identifying columns are not accepted at all. Errors
//! name the file, line (or record) and column, up to [`MAX_REPORTED_ERRORS`] of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use sled::Transactional;

use crate::error::NodeError;
use crate::formats;
use crate::home::pseudonym_secret;
use crate::records::{self, ItemRecord, PatientRecord, TimepointRecord};
use crate::schema::{ColumnDef, DatasetSchema, ItemFormat, SECONDARY_USE, TIMEPOINT_COLUMN};
use crate::store::NodeStore;

/// Rows of a CSV written per sled batch: bounds the memory a large file's write takes.
pub const WRITE_BATCH_ROWS: usize = 20_000;

/// The `meta` key naming a CSV whose rows are being written.
const UNFINISHED_INGEST: &[u8] = b"ingest/unfinished";

/// The files whose ingest started but did not finish (empty when none).
pub fn unfinished_ingests(store: &NodeStore) -> Result<Vec<String>, NodeError> {
    Ok(match store.meta.get(UNFINISHED_INGEST)? {
        None => Vec::new(),
        Some(bytes) => serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| vec![String::from_utf8_lossy(&bytes).into_owned()]),
    })
}

fn set_unfinished(store: &NodeStore, files: &[String]) -> Result<(), NodeError> {
    if files.is_empty() {
        store.meta.remove(UNFINISHED_INGEST)?;
    } else {
        let encoded = serde_json::to_vec(files).map_err(|e| NodeError::CorruptStore {
            what: "unfinished ingest mark".into(),
            reason: e.to_string(),
        })?;
        store.meta.insert(UNFINISHED_INGEST, encoded)?;
    }
    store.flush()?;
    Ok(())
}

/// Forgets every unfinished ingest, accepting whatever part of those files is stored; for
/// when a file cannot be loaded again (gone, or replaced). Returns the files forgotten.
pub fn abandon_unfinished(store: &NodeStore) -> Result<Vec<String>, NodeError> {
    let files = unfinished_ingests(store)?;
    set_unfinished(store, &[])?;
    Ok(files)
}

/// Writes a validated file's rows in bounded batches, with the file named in the store
/// until every batch is durable. Other files' marks are left as they are, so rerunning a
/// plan of several files clears each as it completes.
struct BatchedWrite<'a> {
    store: &'a NodeStore,
    tree: &'a sled::Tree,
    name: String,
    batch: sled::Batch,
    pending: usize,
}

impl<'a> BatchedWrite<'a> {
    fn begin(store: &'a NodeStore, tree: &'a sled::Tree, path: &Path) -> Result<Self, NodeError> {
        let name = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        let mut files = unfinished_ingests(store)?;
        if !files.contains(&name) {
            files.push(name.clone());
            set_unfinished(store, &files)?;
        }
        Ok(Self {
            store,
            tree,
            name,
            batch: sled::Batch::default(),
            pending: 0,
        })
    }

    fn insert(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), NodeError> {
        self.batch.insert(key, value);
        self.pending += 1;
        if self.pending >= WRITE_BATCH_ROWS {
            self.tree.apply_batch(std::mem::take(&mut self.batch))?;
            self.pending = 0;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), NodeError> {
        self.tree.apply_batch(self.batch)?;
        self.store.flush()?;
        let mut files = unfinished_ingests(self.store)?;
        files.retain(|f| *f != self.name);
        set_unfinished(self.store, &files)
    }
}

/// How many problems one report lists before summarising the rest.
pub const MAX_REPORTED_ERRORS: usize = 20;

/// The header of the documented patient CSV (the walking skeleton's form).
pub const PATIENT_CSV_HEADER: &str = "patient_id,age,sex,severity,diabetes,hypertension,chronic_lung_disease,cardiovascular_disease,kidney_disease,cancer,obesity,consent_secondary_use";

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
    /// Records not in the store before.
    pub added: usize,
    /// Records already in the store, now updated.
    pub updated: usize,
    /// Patients in the file who consented to secondary use (patient files only).
    pub consented: usize,
    pub dry_run: bool,
}

/// Collects problems while a whole file is checked.
struct Problems {
    file: String,
    errors: Vec<IngestError>,
    more: usize,
}

impl Problems {
    fn new(path: &Path) -> Self {
        Self {
            file: path.display().to_string(),
            errors: Vec::new(),
            more: 0,
        }
    }

    fn push(&mut self, line: Option<u64>, column: Option<&str>, reason: impl Into<String>) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(IngestError {
                file: self.file.clone(),
                line,
                column: column.map(str::to_string),
                reason: reason.into(),
            });
        } else {
            self.more += 1;
        }
    }

    fn total(&self) -> usize {
        self.errors.len() + self.more
    }

    fn finish<T>(self, value: T) -> Result<T, IngestErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(IngestErrors {
                errors: self.errors,
                more: self.more,
            })
        }
    }
}

/// A CSV file checked against the columns a table accepts.
struct CsvTable {
    rows: Vec<(u64, csv::StringRecord)>,
    /// Header name → position.
    index: HashMap<String, usize>,
}

impl CsvTable {
    /// Reads `path`, checking that the header has every `required` column, no unknown or
    /// duplicate column; rows that fail to parse are reported.
    fn read(
        path: &Path,
        required: &[&str],
        allowed: &dyn Fn(&str) -> bool,
        expected: &str,
        problems: &mut Problems,
    ) -> Option<Self> {
        let mut reader = match csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(path)
        {
            Ok(reader) => reader,
            Err(e) => {
                problems.push(None, None, e.to_string());
                return None;
            }
        };
        let headers = match reader.headers() {
            Ok(headers) => headers.clone(),
            Err(e) => {
                problems.push(Some(1), None, e.to_string());
                return None;
            }
        };
        let mut index = HashMap::new();
        for (i, header) in headers.iter().enumerate() {
            if index.insert(header.to_string(), i).is_some() {
                problems.push(Some(1), Some(header), "column appears more than once");
            }
            if !required.contains(&header) && !allowed(header) {
                problems.push(
                    Some(1),
                    Some(header),
                    format!("unknown column; expected {expected}"),
                );
            }
        }
        for name in required {
            if !index.contains_key(*name) {
                problems.push(Some(1), Some(name), "required column is missing");
            }
        }
        if problems.total() > 0 {
            return None;
        }
        let mut rows = Vec::new();
        for row in reader.records() {
            match row {
                Ok(row) => rows.push((row.position().map_or(0, |p| p.line()), row)),
                Err(e) => problems.push(e.position().map(|p| p.line()), None, e.to_string()),
            }
        }
        Some(Self { rows, index })
    }

    fn cell<'a>(&self, row: &'a csv::StringRecord, column: &str) -> Option<&'a str> {
        self.index.get(column).and_then(|i| row.get(*i))
    }
}

/// The stored key of a hospital patient id: HMAC-SHA256 under the node's secret.
pub fn pseudonym(secret: &[u8; 32], patient_id: &str) -> Result<[u8; 32], NodeError> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| NodeError::CorruptStore {
            what: "pseudonymisation secret".into(),
            reason: e.to_string(),
        })?;
    mac.update(patient_id.as_bytes());
    Ok(mac.finalize().into_bytes().into())
}

/// Consent scopes a patient file may set (`consent_<scope>` columns).
fn consent_scopes(schema: &DatasetSchema) -> Vec<String> {
    let mut scopes = vec![SECONDARY_USE.to_string()];
    for item in &schema.items {
        if let Some(scope) = &item.consent
            && !scopes.contains(scope)
        {
            scopes.push(scope.clone());
        }
    }
    scopes
}

fn parse_flag(cell: &str) -> Option<bool> {
    match cell.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "y" | "t" => Some(true),
        "false" | "no" | "0" | "n" | "f" => Some(false),
        _ => None,
    }
}

/// Reads the named columns of one row into (position, value) updates.
fn parse_columns(
    table: &CsvTable,
    row: &csv::StringRecord,
    line: u64,
    defs: &[ColumnDef],
    problems: &mut Problems,
) -> Vec<(usize, Option<i64>)> {
    let mut updates = Vec::new();
    for (position, def) in defs.iter().enumerate() {
        if let Some(cell) = table.cell(row, &def.name) {
            match def.parse_cell(cell) {
                Ok(value) => updates.push((position, value)),
                Err(e) => problems.push(Some(line), Some(&def.name), e.0),
            }
        }
    }
    updates
}

fn apply(values: &mut Vec<Option<i64>>, width: usize, updates: &[(usize, Option<i64>)]) {
    values.resize(width, None);
    for (position, value) in updates {
        values[*position] = *value;
    }
}

/// One validated patient row.
struct PatientRow {
    pseudonym: [u8; 32],
    updates: Vec<(usize, Option<i64>)>,
    consents: Vec<(String, bool)>,
}

/// Loads a patient CSV.
pub fn ingest_patients(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
    let secret = pseudonym_secret(store)?;
    let scopes = consent_scopes(&schema);
    let consent_columns: Vec<String> = scopes.iter().map(|s| format!("consent_{s}")).collect();
    let mut problems = Problems::new(path);
    let expected = format!(
        "patient_id, {}, {}",
        schema
            .patients
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        consent_columns.join(", ")
    );
    let allowed = |name: &str| {
        schema.patient_column(name).is_some() || consent_columns.iter().any(|c| c == name)
    };
    let Some(table) = CsvTable::read(path, &["patient_id"], &allowed, &expected, &mut problems)
    else {
        return Err(problems
            .finish(())
            .err()
            .map(NodeError::from)
            .unwrap_or_else(empty_file));
    };
    let mut seen = HashSet::new();
    let mut rows = Vec::with_capacity(table.rows.len());
    for (line, row) in &table.rows {
        let line = *line;
        let id = table.cell(row, "patient_id").unwrap_or_default();
        if id.is_empty() {
            problems.push(Some(line), Some("patient_id"), "empty patient id");
            continue;
        }
        if !seen.insert(id.to_string()) {
            problems.push(
                Some(line),
                Some("patient_id"),
                "patient id appears more than once in this file",
            );
        }
        let updates = parse_columns(&table, row, line, &schema.patients, &mut problems);
        let mut consents = Vec::new();
        for (scope, column) in scopes.iter().zip(&consent_columns) {
            if let Some(cell) = table.cell(row, column) {
                match parse_flag(cell) {
                    Some(granted) => consents.push((scope.clone(), granted)),
                    None => problems.push(
                        Some(line),
                        Some(column),
                        format!("`{cell}` is not true/false, yes/no or 1/0"),
                    ),
                }
            }
        }
        rows.push(PatientRow {
            pseudonym: pseudonym(&secret, id)?,
            updates,
            consents,
        });
    }
    let rows = problems.finish(rows)?;
    let mut report = IngestReport {
        rows: rows.len(),
        dry_run,
        ..IngestReport::default()
    };
    let mut write = if dry_run {
        None
    } else {
        Some(BatchedWrite::begin(store, &store.patients, path)?)
    };
    for row in rows {
        let key = records::patient_key(&row.pseudonym);
        let mut record = match store.patients.get(key)? {
            Some(bytes) => {
                report.updated += 1;
                records::decode::<PatientRecord>(&bytes, "patient record", &key)?
            }
            None => {
                report.added += 1;
                PatientRecord::default()
            }
        };
        apply(&mut record.values, schema.patients.len(), &row.updates);
        for (scope, granted) in row.consents {
            if granted {
                record.consents.insert(scope);
            } else {
                record.consents.remove(&scope);
            }
        }
        report.consented += usize::from(record.consents.contains(SECONDARY_USE));
        if let Some(write) = &mut write {
            write.insert(&key[..], records::encode(&record)?)?;
        }
    }
    if let Some(write) = write {
        write.finish()?;
    }
    Ok(report)
}

fn empty_file() -> NodeError {
    NodeError::Ingest(IngestErrors {
        errors: Vec::new(),
        more: 0,
    })
}

/// The pseudonyms of the patients a file names that are not in the store.
fn require_patient(
    store: &NodeStore,
    pseudonym: &[u8; 32],
    line: u64,
    problems: &mut Problems,
) -> Result<bool, NodeError> {
    if store
        .patients
        .contains_key(records::patient_key(pseudonym))?
    {
        Ok(true)
    } else {
        problems.push(
            Some(line),
            Some("patient_id"),
            "no such patient on this node; load the patient file first",
        );
        Ok(false)
    }
}

fn parse_timepoint(cell: Option<&str>, line: u64, problems: &mut Problems) -> Option<u16> {
    let cell = cell.unwrap_or_default();
    match cell.parse::<u16>() {
        Ok(n) => Some(n),
        Err(_) => {
            problems.push(
                Some(line),
                Some(TIMEPOINT_COLUMN),
                format!("`{cell}` is not a timepoint number 0–65535"),
            );
            None
        }
    }
}

/// Loads a timepoint CSV (clinical course, drugs, labs, antibodies, cytokines…).
pub fn ingest_timepoints(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
    let secret = pseudonym_secret(store)?;
    let mut problems = Problems::new(path);
    let expected = format!(
        "patient_id, timepoint, {}",
        schema
            .timepoints
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let allowed = |name: &str| schema.timepoint_column(name).is_some();
    let Some(table) = CsvTable::read(
        path,
        &["patient_id", TIMEPOINT_COLUMN],
        &allowed,
        &expected,
        &mut problems,
    ) else {
        return Err(problems
            .finish(())
            .err()
            .map(NodeError::from)
            .unwrap_or_else(empty_file));
    };
    let mut seen = HashSet::new();
    let mut rows = Vec::with_capacity(table.rows.len());
    // A patient's rows usually come together: hash and look each patient up once.
    let mut patients: HashMap<&str, ([u8; 32], bool)> = HashMap::new();
    for (line, row) in &table.rows {
        let line = *line;
        let id = table.cell(row, "patient_id").unwrap_or_default();
        let (pseudonym, known) = match patients.get(id) {
            Some(&(pseudonym, known)) => {
                if !known {
                    require_patient(store, &pseudonym, line, &mut problems)?;
                }
                (pseudonym, known)
            }
            None => {
                let pseudonym = pseudonym(&secret, id)?;
                let known = require_patient(store, &pseudonym, line, &mut problems)?;
                patients.insert(id, (pseudonym, known));
                (pseudonym, known)
            }
        };
        let timepoint = parse_timepoint(table.cell(row, TIMEPOINT_COLUMN), line, &mut problems);
        let updates = parse_columns(&table, row, line, &schema.timepoints, &mut problems);
        if let (true, Some(timepoint)) = (known, timepoint) {
            if !seen.insert((pseudonym, timepoint)) {
                problems.push(
                    Some(line),
                    Some(TIMEPOINT_COLUMN),
                    "this patient's timepoint appears more than once in this file",
                );
            }
            rows.push((records::timepoint_key(&pseudonym, timepoint), updates));
        }
    }
    let mut rows = problems.finish(rows)?;
    // In key order, the store's reads and writes walk its tree instead of jumping about.
    rows.sort_unstable_by_key(|row| row.0);
    let mut report = IngestReport {
        rows: rows.len(),
        dry_run,
        ..IngestReport::default()
    };
    let mut write = if dry_run {
        None
    } else {
        Some(BatchedWrite::begin(store, &store.timepoints, path)?)
    };
    for (key, updates) in rows {
        let mut record = match store.timepoints.get(key)? {
            Some(bytes) => {
                report.updated += 1;
                records::decode::<TimepointRecord>(&bytes, "timepoint record", &key)?
            }
            None => {
                report.added += 1;
                TimepointRecord::default()
            }
        };
        apply(&mut record.values, schema.timepoints.len(), &updates);
        if let Some(write) = &mut write {
            write.insert(&key[..], records::encode(&record)?)?;
        }
    }
    if let Some(write) = write {
        write.finish()?;
    }
    Ok(report)
}

/// Loads a consent CSV (`patient_id, scope, granted`): grants and withdrawals.
pub fn ingest_consent(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
    let secret = pseudonym_secret(store)?;
    let scopes = consent_scopes(&schema);
    let mut problems = Problems::new(path);
    let Some(table) = CsvTable::read(
        path,
        &["patient_id", "scope", "granted"],
        &|_| false,
        "patient_id, scope, granted",
        &mut problems,
    ) else {
        return Err(problems
            .finish(())
            .err()
            .map(NodeError::from)
            .unwrap_or_else(empty_file));
    };
    let mut changes: BTreeMap<[u8; 32], Vec<(String, bool)>> = BTreeMap::new();
    for (line, row) in &table.rows {
        let line = *line;
        let id = table.cell(row, "patient_id").unwrap_or_default();
        let pseudonym = pseudonym(&secret, id)?;
        let known = require_patient(store, &pseudonym, line, &mut problems)?;
        let scope = table.cell(row, "scope").unwrap_or_default();
        if !scopes.iter().any(|s| s == scope) {
            problems.push(
                Some(line),
                Some("scope"),
                format!("unknown scope `{scope}`; scopes: {}", scopes.join(", ")),
            );
        }
        let granted = table.cell(row, "granted").unwrap_or_default();
        let Some(granted) = parse_flag(granted) else {
            problems.push(
                Some(line),
                Some("granted"),
                format!("`{granted}` is not true/false, yes/no or 1/0"),
            );
            continue;
        };
        if known {
            changes
                .entry(pseudonym)
                .or_default()
                .push((scope.to_string(), granted));
        }
    }
    let changes = problems.finish(changes)?;
    let report = IngestReport {
        rows: table.rows.len(),
        updated: changes.len(),
        dry_run,
        ..IngestReport::default()
    };
    if !dry_run {
        let mut write = BatchedWrite::begin(store, &store.patients, path)?;
        for (pseudonym, scope_changes) in changes {
            let key = records::patient_key(&pseudonym);
            let bytes = store
                .patients
                .get(key)?
                .ok_or_else(|| NodeError::CorruptStore {
                    what: format!("patient record {}", hex::encode(key)),
                    reason: "missing during a consent change".into(),
                })?;
            let mut record: PatientRecord = records::decode(&bytes, "patient record", &key)?;
            for (scope, granted) in scope_changes {
                if granted {
                    record.consents.insert(scope);
                } else {
                    record.consents.remove(&scope);
                }
            }
            write.insert(&key, records::encode(&record)?)?;
        }
        write.finish()?;
    }
    Ok(report)
}

/// Applies consent changes to one stored patient (atomically for that patient).
fn set_consent(
    store: &NodeStore,
    pseudonym: &[u8; 32],
    changes: &[(String, bool)],
) -> Result<(), NodeError> {
    let key = records::patient_key(pseudonym);
    let updated = store.patients.update_and_fetch(key, |old| {
        let mut record: PatientRecord = old.and_then(|bytes| {
            renkei_protocol::codec::decode_limited(bytes, records::MAX_RECORD_BYTES).ok()
        })?;
        for (scope, granted) in changes {
            if *granted {
                record.consents.insert(scope.clone());
            } else {
                record.consents.remove(scope);
            }
        }
        renkei_protocol::codec::encode(&record).ok()
    })?;
    if updated.is_none() {
        return Err(NodeError::CorruptStore {
            what: format!("patient record {}", hex::encode(key)),
            reason: "missing or undecodable during a consent change".into(),
        });
    }
    Ok(())
}

/// Withdraws `scope` (all scopes when `None`) for the patient with the hospital id
/// `patient_id`. Takes effect for every later query.
pub fn withdraw_consent(
    store: &NodeStore,
    patient_id: &str,
    scope: Option<&str>,
) -> Result<(), NodeError> {
    let schema = store.schema()?;
    let secret = pseudonym_secret(store)?;
    let pseudonym = pseudonym(&secret, patient_id)?;
    if !store
        .patients
        .contains_key(records::patient_key(&pseudonym))?
    {
        return Err(NodeError::Ingest(IngestErrors {
            errors: vec![IngestError {
                file: "consent withdraw".into(),
                line: None,
                column: Some("patient".into()),
                reason: format!("no patient `{patient_id}` on this node"),
            }],
            more: 0,
        }));
    }
    let scopes = consent_scopes(&schema);
    let changes: Vec<(String, bool)> = match scope {
        Some(scope) if scopes.iter().any(|s| s == scope) => vec![(scope.to_string(), false)],
        Some(scope) => {
            return Err(NodeError::Ingest(IngestErrors {
                errors: vec![IngestError {
                    file: "consent withdraw".into(),
                    line: None,
                    column: Some("scope".into()),
                    reason: format!("unknown scope `{scope}`; scopes: {}", scopes.join(", ")),
                }],
                more: 0,
            }));
        }
        None => scopes.into_iter().map(|s| (s, false)).collect(),
    };
    set_consent(store, &pseudonym, &changes)?;
    store.flush()
}

/// One validated manifest row.
struct ManifestItem {
    pseudonym: [u8; 32],
    timepoint: u16,
    record: ItemRecord,
}

/// Loads a manifest CSV (`path, patient_id, timepoint, kind`), reading every file.
pub fn ingest_manifest(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
    let secret = pseudonym_secret(store)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut problems = Problems::new(path);
    let kinds: Vec<&str> = schema.items.iter().map(|i| i.kind.as_str()).collect();
    let Some(table) = CsvTable::read(
        path,
        &["path", "patient_id", TIMEPOINT_COLUMN, "kind"],
        &|_| false,
        "path, patient_id, timepoint, kind",
        &mut problems,
    ) else {
        return Err(problems
            .finish(())
            .err()
            .map(NodeError::from)
            .unwrap_or_else(empty_file));
    };
    let mut items = Vec::new();
    for (line, row) in &table.rows {
        let line = *line;
        let id = table.cell(row, "patient_id").unwrap_or_default();
        let pseudonym = pseudonym(&secret, id)?;
        let known = require_patient(store, &pseudonym, line, &mut problems)?;
        let timepoint = parse_timepoint(table.cell(row, TIMEPOINT_COLUMN), line, &mut problems);
        let kind = table.cell(row, "kind").unwrap_or_default();
        let Some(item_kind) = schema.item(kind) else {
            problems.push(
                Some(line),
                Some("kind"),
                format!("unknown kind `{kind}`; kinds: {}", kinds.join(", ")),
            );
            continue;
        };
        let file = table.cell(row, "path").unwrap_or_default();
        let file_path: PathBuf = base.join(file);
        let bytes = match std::fs::read(&file_path) {
            Ok(bytes) => bytes,
            Err(e) => {
                problems.push(
                    Some(line),
                    Some("path"),
                    format!("{}: {e}", file_path.display()),
                );
                continue;
            }
        };
        let summary = match item_kind.format {
            ItemFormat::Dicom => formats::dicom::summarise(&file_path),
            ItemFormat::Fastq => formats::fastq::summarise(&file_path).map(|(s, _)| s),
        };
        let summary = match summary {
            Ok(summary) => summary,
            Err(reason) => {
                problems.push(Some(line), Some("path"), format!("{file}: {reason}"));
                continue;
            }
        };
        if let (true, Some(timepoint)) = (known, timepoint) {
            items.push(ManifestItem {
                pseudonym,
                timepoint,
                record: ItemRecord {
                    kind: kind.to_string(),
                    values: summary.values,
                    file_digest: Sha256::digest(&bytes).into(),
                    details: summary.details,
                },
            });
        }
    }
    let items = problems.finish(items)?;
    let mut report = IngestReport {
        rows: items.len(),
        dry_run,
        ..IngestReport::default()
    };
    let mut writes = Vec::with_capacity(items.len());
    for item in items {
        let key = records::item_key(
            &item.pseudonym,
            item.timepoint,
            &item.record.kind,
            &item.record.file_digest,
        );
        if store.items.contains_key(key)? {
            report.updated += 1;
        } else {
            report.added += 1;
        }
        writes.push((
            records::timepoint_key(&item.pseudonym, item.timepoint),
            key,
            records::encode(&item.record)?,
        ));
    }
    if !dry_run {
        let empty_timepoint = records::encode(&TimepointRecord {
            values: vec![None; schema.timepoints.len()],
        })?;
        // Items and the timepoints they belong to, in one transaction.
        (&store.timepoints, &store.items)
            .transaction(|(timepoints, item_tree)| {
                for (timepoint_key, item_key, record) in &writes {
                    if timepoints.get(timepoint_key)?.is_none() {
                        timepoints.insert(&timepoint_key[..], empty_timepoint.clone())?;
                    }
                    item_tree.insert(&item_key[..], record.clone())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => NodeError::Store(e),
                sled::transaction::TransactionError::Abort(()) => NodeError::CorruptStore {
                    what: "manifest transaction".into(),
                    reason: "aborted".into(),
                },
            })?;
        store.flush()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Dataset;
    use crate::home::NodeHome;
    use std::sync::Arc;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn node(dir: &Path) -> NodeStore {
        let (home, _) = NodeHome::init(&dir.join("node")).unwrap();
        home.open_store().unwrap()
    }

    fn dataset(store: &NodeStore) -> Dataset {
        Dataset::load(store, Arc::new(store.schema().unwrap())).unwrap()
    }

    #[test]
    fn patients_load_atomically_and_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let good = write(
            dir.path(),
            "good.csv",
            &format!(
                "{PATIENT_CSV_HEADER}\nP1,70,female,severe,yes,no,0,0,0,0,1,true\nP2,35,male,mild,no,no,0,0,0,0,0,false\n"
            ),
        );
        let report = ingest_patients(&store, &good, false).unwrap();
        assert_eq!((report.rows, report.added, report.consented), (2, 2, 1));
        let again = ingest_patients(&store, &good, false).unwrap();
        assert_eq!((again.added, again.updated), (0, 2));
        let data = dataset(&store);
        assert_eq!((data.consented(), data.withheld()), (1, 1));

        // One bad row anywhere: nothing from the file is written.
        let bad = write(
            dir.path(),
            "bad.csv",
            &format!(
                "{PATIENT_CSV_HEADER}\nP3,50,female,mild,no,no,0,0,0,0,0,true\nP4,eighty,female,mild,no,no,0,0,0,0,0,true\n"
            ),
        );
        let text = ingest_patients(&store, &bad, false)
            .unwrap_err()
            .to_string();
        assert!(text.contains("bad.csv:3 column `age`"), "{text}");
        assert_eq!(store.patients.len(), 2);
    }

    /// A file larger than one write batch loads whole; an ingest that stopped midway (its
    /// file still named in the store) keeps the node from loading until the same file is
    /// loaded again.
    #[test]
    fn a_large_file_is_written_in_batches_and_an_unfinished_one_blocks_loading() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let rows = WRITE_BATCH_ROWS + 5;
        let mut text = format!("{PATIENT_CSV_HEADER}\n");
        for i in 0..rows {
            text.push_str(&format!(
                "P{i},{},female,mild,no,no,0,0,0,0,0,true\n",
                i % 100
            ));
        }
        let big = write(dir.path(), "big.csv", &text);
        let report = ingest_patients(&store, &big, false).unwrap();
        assert_eq!(report.added, rows);
        assert_eq!(store.patients.len(), rows);
        assert!(unfinished_ingests(&store).unwrap().is_empty());
        assert_eq!(dataset(&store).consented(), rows);

        // As if the process died between two batches of big.csv.
        let name = std::fs::canonicalize(&big).unwrap().display().to_string();
        store
            .meta
            .insert(UNFINISHED_INGEST, name.as_bytes())
            .unwrap();
        let refused = Dataset::load(&store, Arc::new(store.schema().unwrap())).unwrap_err();
        assert!(
            matches!(&refused, NodeError::UnfinishedIngest { file } if file.contains(&name)),
            "{refused}"
        );
        assert!(
            refused
                .to_string()
                .contains("run the same `renkei-node ingest` again")
        );
        let other = write(
            dir.path(),
            "other.csv",
            &format!("{PATIENT_CSV_HEADER}\nQ1,50,male,mild,no,no,0,0,0,0,0,true\n"),
        );
        // Other files still load (a plan of several is rerun whole), but big.csv stays
        // marked and the node still will not load until big.csv is loaded again.
        ingest_patients(&store, &other, false).unwrap();
        assert_eq!(unfinished_ingests(&store).unwrap(), vec![name.clone()]);
        assert!(Dataset::load(&store, Arc::new(store.schema().unwrap())).is_err());
        let again = ingest_patients(&store, &big, false).unwrap();
        assert_eq!((again.added, again.updated), (0, rows));
        assert!(unfinished_ingests(&store).unwrap().is_empty());
        assert_eq!(dataset(&store).consented(), rows + 1);

        // A file that cannot be loaded again can be given up on, explicitly.
        set_unfinished(&store, &["/gone.csv".to_string()]).unwrap();
        assert_eq!(
            abandon_unfinished(&store).unwrap(),
            vec!["/gone.csv".to_string()]
        );
        assert_eq!(dataset(&store).consented(), rows + 1);
    }

    #[test]
    fn dry_run_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let good = write(
            dir.path(),
            "p.csv",
            &format!("{PATIENT_CSV_HEADER}\nP1,70,female,severe,1,0,0,0,0,0,1,1\n"),
        );
        let report = ingest_patients(&store, &good, true).unwrap();
        assert_eq!((report.rows, report.added, report.dry_run), (1, 1, true));
        assert!(store.patients.is_empty());
    }

    #[test]
    fn header_problems_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let path = write(
            dir.path(),
            "h.csv",
            "patient_id,age,sexx,first_name,age\nP1,3,female,Ann,3\n",
        );
        let text = ingest_patients(&store, &path, false)
            .unwrap_err()
            .to_string();
        assert!(text.contains("column `sexx`: unknown column"), "{text}");
        // Identifying columns are not accepted at all.
        assert!(
            text.contains("column `first_name`: unknown column"),
            "{text}"
        );
        assert!(
            text.contains("column `age`: column appears more than once"),
            "{text}"
        );
        let path = write(dir.path(), "n.csv", "age\n3\n");
        let text = ingest_patients(&store, &path, false)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("column `patient_id`: required column is missing"),
            "{text}"
        );
    }

    #[test]
    fn the_store_holds_no_raw_patient_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let path = write(
            dir.path(),
            "p.csv",
            "patient_id,age,consent_secondary_use\nMRN-0042,70,1\n",
        );
        ingest_patients(&store, &path, false).unwrap();
        for entry in store.patients.iter() {
            let (key, value) = entry.unwrap();
            assert!(!key.windows(8).any(|w| w == b"MRN-0042"));
            assert!(!value.windows(8).any(|w| w == b"MRN-0042"));
        }
    }

    #[test]
    fn timepoint_files_merge_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let patients = write(
            dir.path(),
            "p.csv",
            "patient_id,age,consent_secondary_use\nP1,70,1\n",
        );
        ingest_patients(&store, &patients, false).unwrap();
        let course = write(
            dir.path(),
            "course.csv",
            "patient_id,timepoint,days_since_onset,care_level\nP1,0,2,hospitalized\nP1,1,6,oxygen\n",
        );
        let labs = write(
            dir.path(),
            "labs.csv",
            "patient_id,timepoint,crp,il6\nP1,1,7.25,85.5\n",
        );
        assert_eq!(ingest_timepoints(&store, &course, false).unwrap().added, 2);
        let report = ingest_timepoints(&store, &labs, false).unwrap();
        assert_eq!((report.added, report.updated), (0, 1));
        let schema = store.schema().unwrap();
        let key = records::timepoint_key(
            &pseudonym(&pseudonym_secret(&store).unwrap(), "P1").unwrap(),
            1,
        );
        let record: TimepointRecord =
            records::decode(&store.timepoints.get(key).unwrap().unwrap(), "t", &key).unwrap();
        let value = |name: &str| record.values[schema.timepoint_column(name).unwrap().0];
        assert_eq!(value("days_since_onset"), Some(6));
        assert_eq!(value("crp"), Some(725));
        assert_eq!(value("il6"), Some(855));

        let orphan = write(
            dir.path(),
            "o.csv",
            "patient_id,timepoint,crp\nP9,0,1.0\nP1,x,1.0\n",
        );
        let text = ingest_timepoints(&store, &orphan, false)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("o.csv:2 column `patient_id`: no such patient"),
            "{text}"
        );
        assert!(text.contains("o.csv:3 column `timepoint`"), "{text}");
    }

    #[test]
    fn consent_can_be_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let patients = write(
            dir.path(),
            "p.csv",
            "patient_id,consent_secondary_use,consent_genome\nP1,1,1\nP2,1,0\n",
        );
        ingest_patients(&store, &patients, false).unwrap();
        assert_eq!(dataset(&store).consented(), 2);
        withdraw_consent(&store, "P1", None).unwrap();
        assert_eq!(dataset(&store).consented(), 1);
        let consent = write(
            dir.path(),
            "c.csv",
            "patient_id,scope,granted\nP1,secondary_use,true\nP2,genome,yes\n",
        );
        ingest_consent(&store, &consent, false).unwrap();
        assert_eq!(dataset(&store).consented(), 2);
        assert!(withdraw_consent(&store, "P7", None).is_err());
        assert!(withdraw_consent(&store, "P1", Some("marketing")).is_err());
    }
}
