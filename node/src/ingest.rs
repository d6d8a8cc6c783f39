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
//! Tables are read as a stream (a row at a time, typed as it is read) and merged into the
//! stored shards ([`crate::tables`]), which go to the store in one sled batch: a file of a
//! million rows is one atomic write of the few thousand shards it touches.
//! The hospital's patient id is replaced by a keyed hash under the node's secret, so the
//! store holds no raw identifier; other identifying columns are not accepted at all. Errors
//! name the file, line (or record) and column, up to [`MAX_REPORTED_ERRORS`] of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::NodeError;
use crate::formats;
use crate::home::pseudonym_secret;
use crate::records::{self, ItemRecord};
use crate::store::NodeStore;
use crate::tables::{self, Merged, Table, TableWrites};
use renkei_engine::NULL;
use renkei_engine::schema::{
    DatasetSchema, ItemFormat, SECONDARY_USE, TIMEPOINT_COLUMN, parse_flag, trim_cell,
};

/// How many problems one report lists before summarising the rest.
pub const MAX_REPORTED_ERRORS: usize = 20;

/// The `meta` key under which renkei before sharded tables (which wrote a large file in
/// batches) named the files whose ingest had started and not finished. Such a store keeps
/// the mark when it is moved into shards: it holds part of those files, so it does not
/// serve ([`crate::image::load`] refuses) until each is loaded again (now in one
/// atomic write) or given up with [`abandon_unfinished`].
const LEGACY_UNFINISHED: &[u8] = b"ingest/unfinished";

/// The files whose ingest started but did not finish (empty when none).
pub fn unfinished_ingests(store: &NodeStore) -> Result<Vec<String>, NodeError> {
    Ok(match store.meta.get(LEGACY_UNFINISHED)? {
        None => Vec::new(),
        Some(bytes) => serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| vec![String::from_utf8_lossy(&bytes).into_owned()]),
    })
}

fn set_unfinished(store: &NodeStore, files: &[String]) -> Result<(), NodeError> {
    if files.is_empty() {
        store.meta.remove(LEGACY_UNFINISHED)?;
    } else {
        let encoded = serde_json::to_vec(files).map_err(|e| NodeError::CorruptStore {
            what: "unfinished ingest mark".into(),
            reason: e.to_string(),
        })?;
        store.meta.insert(LEGACY_UNFINISHED, encoded)?;
    }
    store.flush()
}

/// Records that `path` has now loaded completely: it is no longer an unfinished ingest.
pub fn completed(store: &NodeStore, path: &Path) -> Result<(), NodeError> {
    let mut files = unfinished_ingests(store)?;
    if files.is_empty() {
        return Ok(());
    }
    let name = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let before = files.len();
    files.retain(|file| *file != name);
    if files.len() == before {
        return Ok(());
    }
    set_unfinished(store, &files)
}

/// Forgets every unfinished ingest, accepting whatever part of those files is stored; for
/// when a file cannot be loaded again (gone, or replaced). Returns the files forgotten.
pub fn abandon_unfinished(store: &NodeStore) -> Result<Vec<String>, NodeError> {
    let files = unfinished_ingests(store)?;
    set_unfinished(store, &[])?;
    Ok(files)
}

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
        Self::named(path.display().to_string())
    }

    fn named(file: String) -> Self {
        Self {
            file,
            errors: Vec::new(),
            more: 0,
        }
    }

    /// An empty collection for the same file.
    fn new_like(other: &Problems) -> Self {
        Self::named(other.file.clone())
    }

    /// Records a problem. Past [`MAX_REPORTED_ERRORS`] only the earliest by line are kept
    /// (checks that run after the rows are read report lines out of order).
    fn push(&mut self, line: Option<u64>, column: Option<&str>, reason: impl Into<String>) {
        let error = IngestError {
            file: self.file.clone(),
            line,
            column: column.map(str::to_string),
            reason: reason.into(),
        };
        self.keep(error);
    }

    fn keep(&mut self, error: IngestError) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(error);
            return;
        }
        self.more += 1;
        if let Some(latest) = self.errors.iter_mut().max_by_key(|e| e.line)
            && error.line < latest.line
        {
            *latest = error;
        }
    }

    fn total(&self) -> usize {
        self.errors.len() + self.more
    }

    /// Takes in the problems another pass over the same file found; the first reported are
    /// the first by line.
    fn absorb(&mut self, other: Problems) {
        self.more += other.more;
        for error in other.errors {
            self.keep(error);
        }
    }

    fn finish<T>(mut self, value: T) -> Result<T, IngestErrors> {
        self.errors.sort_by_key(|e| e.line);
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

/// A CSV file open for reading, its header checked against the columns a table accepts.
struct CsvFile {
    reader: csv::Reader<std::fs::File>,
    /// Header name → position.
    index: HashMap<String, usize>,
}

impl CsvFile {
    /// Opens `path`, checking that the header has every `required` column and no unknown
    /// or duplicate column.
    fn open(
        path: &Path,
        required: &[&str],
        allowed: &dyn Fn(&str) -> bool,
        expected: &str,
        problems: &mut Problems,
    ) -> Option<Self> {
        let mut reader = match csv::ReaderBuilder::new()
            .trim(csv::Trim::Headers)
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
        Some(Self { reader, index })
    }

    /// Reads the next row into `row` (false at the end); a row that does not parse is
    /// reported and skipped.
    fn next(&mut self, row: &mut csv::StringRecord, problems: &mut Problems) -> bool {
        loop {
            match self.reader.read_record(row) {
                Ok(more) => return more,
                Err(e) => {
                    problems.push(e.position().map(|p| p.line()), None, e.to_string());
                    if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                        return false;
                    }
                }
            }
        }
    }

    fn position(&self, column: &str) -> usize {
        self.index.get(column).copied().unwrap_or(usize::MAX)
    }

    /// Calls `each(row, line, pseudonym, problems)` for every row, in file order, with the
    /// pseudonym of its patient id (column `id_at`); a row without an id is reported instead.
    /// The file is read and the ids hashed on a second thread while `each` runs on this one,
    /// so a file takes about as long as the slower of the two halves.
    fn for_each_row(
        mut self,
        id_at: usize,
        ids: &mut Pseudonyms,
        problems: &mut Problems,
        mut each: impl FnMut(&csv::StringRecord, u64, [u8; 32], &mut Problems),
    ) {
        let (full, filled) = mpsc::sync_channel::<RowChunk>(CHUNKS_AHEAD);
        let (spent, empty) = mpsc::sync_channel::<RowChunk>(CHUNKS_AHEAD + 1);
        let mut reading = Problems::new_like(problems);
        let (file, reading_problems) = (&mut self, &mut reading);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                loop {
                    let mut chunk = empty.try_recv().unwrap_or_default();
                    let more = chunk.fill(file, id_at, ids, reading_problems);
                    if full.send(chunk).is_err() || !more {
                        // Hang up (`full` goes with this thread): the loop below ends once
                        // it has every chunk.
                        break;
                    }
                }
            });
            for chunk in filled {
                for (row, pseudonym) in chunk.rows.iter().zip(&chunk.patients).take(chunk.len) {
                    each(row, line_of(row), *pseudonym, problems);
                }
                // A full return queue means enough chunks are in use: drop this one.
                let _ = spent.try_send(chunk);
            }
            if let Err(panic) = reader.join() {
                std::panic::resume_unwind(panic);
            }
        });
        problems.absorb(reading);
    }
}

/// Rows handed from the thread reading a file to the one parsing it: how many at a time,
/// and how many hand-overs may wait.
const CHUNK_ROWS: usize = 4096;
const CHUNKS_AHEAD: usize = 2;

/// A run of rows read from a CSV file, with the pseudonyms of their patients. The buffers
/// are reused from chunk to chunk.
#[derive(Default)]
struct RowChunk {
    rows: Vec<csv::StringRecord>,
    patients: Vec<[u8; 32]>,
    /// Rows in use (the buffers may hold more).
    len: usize,
}

impl RowChunk {
    /// Reads up to [`CHUNK_ROWS`] rows that have a patient id; false once the file is done.
    fn fill(
        &mut self,
        file: &mut CsvFile,
        id_at: usize,
        ids: &mut Pseudonyms,
        problems: &mut Problems,
    ) -> bool {
        self.len = 0;
        while self.len < CHUNK_ROWS {
            if self.rows.len() == self.len {
                self.rows.push(csv::StringRecord::new());
                self.patients.push([0; 32]);
            }
            let row = &mut self.rows[self.len];
            if !file.next(row, problems) {
                return false;
            }
            let line = line_of(row);
            let id = cell(row, id_at);
            if id.is_empty() {
                problems.push(Some(line), Some("patient_id"), "empty patient id");
                continue;
            }
            self.patients[self.len] = ids.of(id, line).0;
            self.len += 1;
        }
        true
    }
}

/// Cell `at` of `row`, without surrounding blanks (empty if the row is short).
fn cell(row: &csv::StringRecord, at: usize) -> &str {
    trim_cell(row.get(at).unwrap_or_default())
}

/// Where a row came from: its line.
fn line_of(row: &csv::StringRecord) -> u64 {
    row.position().map_or(0, |p| p.line())
}

/// A whole (small) CSV file checked against the columns a table accepts.
struct CsvTable {
    rows: Vec<(u64, csv::StringRecord)>,
    file: CsvFile,
}

impl CsvTable {
    fn read(
        path: &Path,
        required: &[&str],
        allowed: &dyn Fn(&str) -> bool,
        expected: &str,
        problems: &mut Problems,
    ) -> Option<Self> {
        let mut file = CsvFile::open(path, required, allowed, expected, problems)?;
        let mut rows = Vec::new();
        let mut row = csv::StringRecord::new();
        while file.next(&mut row, problems) {
            rows.push((line_of(&row), row.clone()));
        }
        Some(Self { rows, file })
    }

    fn cell<'a>(&self, row: &'a csv::StringRecord, column: &str) -> Option<&'a str> {
        self.file
            .index
            .get(column)
            .and_then(|i| row.get(*i))
            .map(trim_cell)
    }
}

/// The stored key of a hospital patient id: HMAC-SHA256 under the node's secret.
pub fn pseudonym(secret: &[u8; 32], patient_id: &str) -> Result<[u8; 32], NodeError> {
    let mut mac = keyed_hmac(secret)?;
    mac.update(patient_id.as_bytes());
    Ok(mac.finalize().into_bytes().into())
}

fn keyed_hmac(secret: &[u8; 32]) -> Result<Hmac<Sha256>, NodeError> {
    <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| NodeError::CorruptStore {
        what: "pseudonymisation secret".into(),
        reason: e.to_string(),
    })
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

/// Hashes hospital patient ids, each once: a patient's rows usually come together.
struct Pseudonyms {
    /// HMAC keyed with the node's secret, cloned per id (keying costs as much as hashing).
    keyed: Hmac<Sha256>,
    known: HashMap<String, usize>,
    /// (pseudonym, first line) per distinct id, in order of first appearance.
    list: Vec<([u8; 32], u64)>,
    last: Option<(String, usize)>,
}

impl Pseudonyms {
    fn new(secret: &[u8; 32]) -> Result<Self, NodeError> {
        Ok(Self {
            keyed: keyed_hmac(secret)?,
            known: HashMap::new(),
            list: Vec::new(),
            last: None,
        })
    }

    /// The pseudonym of `id` and its index among the file's patients.
    fn of(&mut self, id: &str, line: u64) -> ([u8; 32], usize) {
        if let Some((last, index)) = &self.last
            && last == id
        {
            return (self.list[*index].0, *index);
        }
        // Keep the buffer of the last id.
        let mut last = self.last.take().map(|(text, _)| text).unwrap_or_default();
        last.clear();
        last.push_str(id);
        let index = match self.known.get(id) {
            Some(index) => *index,
            None => {
                let mut mac = self.keyed.clone();
                mac.update(id.as_bytes());
                self.list.push((mac.finalize().into_bytes().into(), line));
                self.known.insert(id.to_string(), self.list.len() - 1);
                self.list.len() - 1
            }
        };
        self.last = Some((last, index));
        (self.list[index].0, index)
    }

    /// Reports each patient of the file not on the node, at its first line.
    fn require_stored(&self, store: &NodeStore, problems: &mut Problems) -> Result<(), NodeError> {
        let pseudonyms: Vec<[u8; 32]> = self.list.iter().map(|(p, _)| *p).collect();
        let present = tables::patients_present(store, &pseudonyms)?;
        for ((_, line), present) in self.list.iter().zip(&present) {
            if !present {
                problems.push(
                    Some(*line),
                    Some("patient_id"),
                    "no such patient on this node; load the patient file first",
                );
            }
        }
        Ok(())
    }
}

fn empty_file() -> NodeError {
    NodeError::Ingest(IngestErrors {
        errors: Vec::new(),
        more: 0,
    })
}

fn refused(problems: Problems) -> NodeError {
    problems
        .finish(())
        .err()
        .map(NodeError::from)
        .unwrap_or_else(empty_file)
}

/// Reports rows written twice in one file.
fn report_duplicates(writes: &mut TableWrites, column: &str, what: &str, problems: &mut Problems) {
    if let Err(duplicates) = writes.prepare() {
        for duplicate in duplicates {
            problems.push(
                Some(duplicate.again),
                Some(column),
                format!(
                    "{what} appears more than once in this file (also on line {})",
                    duplicate.first
                ),
            );
        }
    }
}

/// Merges prepared writes into the store in one atomic, durable batch (or, on a dry run,
/// only counts what they would do).
pub(crate) fn write_tables(
    store: &NodeStore,
    writes: &[&TableWrites],
    items: Vec<(Vec<u8>, Vec<u8>)>,
    dry_run: bool,
) -> Result<Merged, NodeError> {
    let mut total = Merged::default();
    let mut batch = sled::Batch::default();
    // Each write reads the shards as stored: two of one table would overwrite each other.
    for (i, write) in writes.iter().enumerate() {
        if writes[..i].iter().any(|w| w.table() == write.table()) {
            return Err(NodeError::CorruptStore {
                what: "rows to write".into(),
                reason: "two writes of one table in one batch".into(),
            });
        }
    }
    for write in writes {
        let merged = if dry_run {
            write.dry_merge(store)?
        } else {
            write.merge_into(store, &mut batch)?
        };
        total.add(merged);
    }
    if !dry_run {
        for (key, value) in items {
            batch.insert(key, value);
        }
        tables::commit(store, batch)?;
    }
    Ok(total)
}

/// The columns of `defs` a file has: (position in the file, position in the table).
fn file_columns(file: &CsvFile, defs: &[renkei_engine::schema::ColumnDef]) -> Vec<(usize, usize)> {
    defs.iter()
        .enumerate()
        .filter_map(|(position, def)| file.index.get(&def.name).map(|at| (*at, position)))
        .collect()
}

/// Parses a row's cells of `columns` into `values`, reporting bad cells.
fn parse_row(
    row: &csv::StringRecord,
    line: u64,
    columns: &[(usize, usize)],
    defs: &[renkei_engine::schema::ColumnDef],
    values: &mut [i64],
    problems: &mut Problems,
) {
    for ((at, position), value) in columns.iter().zip(values.iter_mut()) {
        let def = &defs[*position];
        match def.parse_cell(cell(row, *at)) {
            Ok(parsed) => *value = parsed.unwrap_or(NULL),
            Err(e) => problems.push(Some(line), Some(&def.name), e.0),
        }
    }
}

/// Loads a patient CSV.
pub fn ingest_patients(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
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
    let Some(file) = CsvFile::open(path, &["patient_id"], &allowed, &expected, &mut problems)
    else {
        return Err(refused(problems));
    };
    let columns = file_columns(&file, &schema.patients);
    let consents: Vec<(usize, usize)> = consent_columns
        .iter()
        .enumerate()
        .filter_map(|(bit, name)| file.index.get(name).map(|at| (*at, bit)))
        .collect();
    let id_at = file.position("patient_id");
    let mut writes = TableWrites::new(
        Table::Patients,
        schema.patients.len(),
        columns.iter().map(|(_, position)| *position).collect(),
        scopes,
    );
    let mut ids = Pseudonyms::new(&pseudonym_secret(store)?)?;
    let mut values = vec![NULL; columns.len()];
    file.for_each_row(
        id_at,
        &mut ids,
        &mut problems,
        |row, line, pseudonym, problems| {
            parse_row(row, line, &columns, &schema.patients, &mut values, problems);
            let (mut grant, mut revoke) = (0u64, 0u64);
            for (at, bit) in &consents {
                let given = cell(row, *at);
                match parse_flag(given) {
                    Some(true) => grant |= 1 << bit,
                    Some(false) => revoke |= 1 << bit,
                    None => problems.push(
                        Some(line),
                        Some(&consent_columns[*bit]),
                        format!("`{given}` is not true/false, yes/no or 1/0"),
                    ),
                }
            }
            writes.push(pseudonym, 0, &values, (grant, revoke), line);
        },
    );
    report_duplicates(&mut writes, "patient_id", "this patient id", &mut problems);
    problems.finish(())?;
    let merged = write_tables(store, &[&writes], Vec::new(), dry_run)?;
    Ok(IngestReport {
        rows: writes.len(),
        added: merged.added,
        updated: merged.updated,
        consented: merged.consented,
        dry_run,
    })
}

fn parse_timepoint(cell: &str, line: u64, problems: &mut Problems) -> Option<u16> {
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
    let Some(file) = CsvFile::open(
        path,
        &["patient_id", TIMEPOINT_COLUMN],
        &allowed,
        &expected,
        &mut problems,
    ) else {
        return Err(refused(problems));
    };
    let columns = file_columns(&file, &schema.timepoints);
    let (id_at, number_at) = (file.position("patient_id"), file.position(TIMEPOINT_COLUMN));
    let mut writes = TableWrites::new(
        Table::Timepoints,
        schema.timepoints.len(),
        columns.iter().map(|(_, position)| *position).collect(),
        Vec::new(),
    );
    let mut ids = Pseudonyms::new(&pseudonym_secret(store)?)?;
    let mut values = vec![NULL; columns.len()];
    file.for_each_row(
        id_at,
        &mut ids,
        &mut problems,
        |row, line, pseudonym, problems| {
            let number = parse_timepoint(cell(row, number_at), line, problems);
            parse_row(
                row,
                line,
                &columns,
                &schema.timepoints,
                &mut values,
                problems,
            );
            if let Some(number) = number {
                writes.push(pseudonym, number, &values, (0, 0), line);
            }
        },
    );
    ids.require_stored(store, &mut problems)?;
    report_duplicates(
        &mut writes,
        TIMEPOINT_COLUMN,
        "this patient's timepoint",
        &mut problems,
    );
    problems.finish(())?;
    let merged = write_tables(store, &[&writes], Vec::new(), dry_run)?;
    Ok(IngestReport {
        rows: writes.len(),
        added: merged.added,
        updated: merged.updated,
        consented: 0,
        dry_run,
    })
}

/// Consent changes as (grant, revoke) bits over `scopes`, applied in order.
fn consent_bits(scopes: &[String], changes: &[(String, bool)]) -> (u64, u64) {
    let (mut grant, mut revoke) = (0u64, 0u64);
    for (scope, granted) in changes {
        if let Some(bit) = scopes.iter().position(|s| s == scope) {
            if *granted {
                grant |= 1 << bit;
                revoke &= !(1 << bit);
            } else {
                revoke |= 1 << bit;
                grant &= !(1 << bit);
            }
        }
    }
    (grant, revoke)
}

/// Writes consent changes for patients known to be stored.
fn change_consent(
    store: &NodeStore,
    schema: &DatasetSchema,
    scopes: Vec<String>,
    changes: BTreeMap<[u8; 32], Vec<(String, bool)>>,
    dry_run: bool,
) -> Result<Merged, NodeError> {
    let mut writes = TableWrites::new(
        Table::Patients,
        schema.patients.len(),
        Vec::new(),
        scopes.clone(),
    );
    for (pseudonym, scope_changes) in &changes {
        writes.push(*pseudonym, 0, &[], consent_bits(&scopes, scope_changes), 0);
    }
    // One row per patient (a map's keys): nothing is written twice.
    let _ = writes.prepare();
    write_tables(store, &[&writes], Vec::new(), dry_run)
}

/// Loads a consent CSV (`patient_id, scope, granted`): grants and withdrawals.
pub fn ingest_consent(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
    let scopes = consent_scopes(&schema);
    let mut problems = Problems::new(path);
    let Some(table) = CsvTable::read(
        path,
        &["patient_id", "scope", "granted"],
        &|_| false,
        "patient_id, scope, granted",
        &mut problems,
    ) else {
        return Err(refused(problems));
    };
    let mut ids = Pseudonyms::new(&pseudonym_secret(store)?)?;
    let mut changes: Vec<(usize, String, bool)> = Vec::new();
    for (line, row) in &table.rows {
        let line = *line;
        let id = table.cell(row, "patient_id").unwrap_or_default();
        let (_, patient) = ids.of(id, line);
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
        changes.push((patient, scope.to_string(), granted));
    }
    ids.require_stored(store, &mut problems)?;
    problems.finish(())?;
    let mut by_patient: BTreeMap<[u8; 32], Vec<(String, bool)>> = BTreeMap::new();
    for (patient, scope, granted) in changes {
        by_patient
            .entry(ids.list[patient].0)
            .or_default()
            .push((scope, granted));
    }
    let patients = by_patient.len();
    change_consent(store, &schema, scopes, by_patient, dry_run)?;
    Ok(IngestReport {
        rows: table.rows.len(),
        updated: patients,
        dry_run,
        ..IngestReport::default()
    })
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
    if !tables::patients_present(store, &[pseudonym])?
        .first()
        .copied()
        .unwrap_or(false)
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
        None => scopes.iter().map(|s| (s.clone(), false)).collect(),
    };
    change_consent(
        store,
        &schema,
        scopes,
        BTreeMap::from([(pseudonym, changes)]),
        false,
    )?;
    Ok(())
}

/// Loads a manifest CSV (`path, patient_id, timepoint, kind`), reading every file.
pub fn ingest_manifest(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
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
        return Err(refused(problems));
    };
    let mut ids = Pseudonyms::new(&pseudonym_secret(store)?)?;
    let mut items = Vec::new();
    for (line, row) in &table.rows {
        let line = *line;
        let id = table.cell(row, "patient_id").unwrap_or_default();
        let (pseudonym, _) = ids.of(id, line);
        let timepoint = parse_timepoint(
            table.cell(row, TIMEPOINT_COLUMN).unwrap_or_default(),
            line,
            &mut problems,
        );
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
        if let Some(timepoint) = timepoint {
            items.push((
                pseudonym,
                timepoint,
                ItemRecord {
                    kind: kind.to_string(),
                    values: summary.values,
                    file_digest: Sha256::digest(&bytes).into(),
                    details: summary.details,
                },
            ));
        }
    }
    ids.require_stored(store, &mut problems)?;
    problems.finish(())?;
    let mut report = IngestReport {
        rows: items.len(),
        dry_run,
        ..IngestReport::default()
    };
    // Each item's timepoint is added (with nothing measured) if not stored yet.
    let mut timepoints = TableWrites::new(
        Table::Timepoints,
        schema.timepoints.len(),
        Vec::new(),
        Vec::new(),
    );
    let mut written = HashSet::new();
    let mut writes = Vec::with_capacity(items.len());
    for (pseudonym, timepoint, record) in items {
        timepoints.push(pseudonym, timepoint, &[], (0, 0), 0);
        let key = tables::item_key(&records::item_key(
            &pseudonym,
            timepoint,
            &record.kind,
            &record.file_digest,
        ));
        // The same file listed twice for one patient, timepoint and kind is one item.
        if !written.insert(key.clone()) {
            continue;
        }
        if store.data.contains_key(&key)? {
            report.updated += 1;
        } else {
            report.added += 1;
        }
        writes.push((key, records::encode(&record)?));
    }
    // A timepoint with several items is written once.
    timepoints.prepare_last_wins();
    // Items and the timepoints they belong to, in one batch.
    write_tables(store, &[&timepoints], writes, dry_run)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::NodeHome;
    use renkei_engine::Dataset;
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

    /// A node holding one consenting patient, `P1`.
    fn node_with_p1(dir: &Path) -> NodeStore {
        let store = node(dir);
        let patients = write(
            dir,
            "p.csv",
            "patient_id,age,consent_secondary_use\nP1,70,1\n",
        );
        ingest_patients(&store, &patients, false).unwrap();
        store
    }

    fn dataset(store: &NodeStore) -> Dataset {
        crate::image::load(store, Arc::new(store.schema().unwrap())).unwrap()
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
        assert_eq!(store.record_counts().unwrap().0, 2);
    }

    /// A large file is one write: every row lands, and a bad last row keeps every row
    /// before it out of the store too.
    #[test]
    fn a_large_file_loads_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let rows = 3 * tables::SHARDS + 5;
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
        assert_eq!(store.record_counts().unwrap().0, rows);
        assert_eq!(dataset(&store).consented(), rows);

        let mut more = format!("{PATIENT_CSV_HEADER}\n");
        for i in 0..rows {
            more.push_str(&format!("Q{i},40,male,mild,no,no,0,0,0,0,0,true\n"));
        }
        more.push_str("Q-last,old,female,mild,no,no,0,0,0,0,0,true\n");
        let bad = write(dir.path(), "bad-tail.csv", &more);
        let text = ingest_patients(&store, &bad, false)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains(&format!("bad-tail.csv:{} column `age`", rows + 2)),
            "{text}"
        );
        assert_eq!(store.record_counts().unwrap().0, rows);
    }

    /// A store from before shards may name files whose batched ingest stopped midway: it
    /// does not serve until each is loaded again or given up.
    #[test]
    fn an_unfinished_legacy_ingest_blocks_loading_until_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = node(dir.path());
        let text = format!("{PATIENT_CSV_HEADER}\nP1,50,male,mild,no,no,0,0,0,0,0,true\n");
        let big = write(dir.path(), "big.csv", &text);
        let other = write(dir.path(), "other.csv", &text.replace("P1", "P2"));
        let name = std::fs::canonicalize(&big).unwrap().display().to_string();
        set_unfinished(&store, std::slice::from_ref(&name)).unwrap();
        let refused = crate::image::load(&store, Arc::new(store.schema().unwrap())).unwrap_err();
        assert!(
            matches!(&refused, NodeError::UnfinishedIngest { file } if *file == name),
            "{refused}"
        );
        ingest_patients(&store, &other, false).unwrap();
        completed(&store, &other).unwrap();
        assert_eq!(unfinished_ingests(&store).unwrap(), vec![name.clone()]);
        ingest_patients(&store, &big, false).unwrap();
        completed(&store, &big).unwrap();
        assert!(unfinished_ingests(&store).unwrap().is_empty());
        assert_eq!(dataset(&store).consented(), 2);

        set_unfinished(&store, &["/gone.csv".to_string()]).unwrap();
        assert!(crate::image::load(&store, Arc::new(store.schema().unwrap())).is_err());
        assert_eq!(
            abandon_unfinished(&store).unwrap(),
            vec!["/gone.csv".to_string()]
        );
        assert_eq!(dataset(&store).consented(), 2);
    }

    /// Problems found after the rows are read (unknown patients) still come first when
    /// their line does, even past the report's limit.
    #[test]
    fn the_earliest_problems_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = node_with_p1(dir.path());
        let mut text = String::from("patient_id,timepoint,crp\nP9,0,1.0\n");
        for i in 0..(MAX_REPORTED_ERRORS + 5) {
            text.push_str(&format!("P1,{i},high\n"));
        }
        let labs = write(dir.path(), "labs.csv", &text);
        let NodeError::Ingest(errors) = ingest_timepoints(&store, &labs, false).unwrap_err() else {
            panic!("not an ingest error");
        };
        assert_eq!(errors.errors.len(), MAX_REPORTED_ERRORS);
        assert_eq!(errors.more, 6);
        assert_eq!(errors.errors[0].line, Some(2));
        assert!(errors.errors[0].reason.contains("no such patient"));
        let lines: Vec<_> = errors.errors.iter().map(|e| e.line.unwrap()).collect();
        assert!(lines.windows(2).all(|w| w[0] < w[1]), "{lines:?}");
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
        assert_eq!(store.record_counts().unwrap(), (0, 0, 0));
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
        for entry in store.data.iter() {
            let (key, value) = entry.unwrap();
            assert!(!key.windows(8).any(|w| w == b"MRN-0042"));
            assert!(!value.windows(8).any(|w| w == b"MRN-0042"));
        }
    }

    #[test]
    fn timepoint_files_merge_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let store = node_with_p1(dir.path());
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
        let p1 = pseudonym(&pseudonym_secret(&store).unwrap(), "P1").unwrap();
        let width = schema.timepoints.len();
        let shard = tables::read_shard(
            &store,
            tables::Table::Timepoints,
            tables::shard_of(&p1),
            width,
        )
        .unwrap();
        let row = shard.find(&p1, 1).unwrap();
        let value = |name: &str| {
            let v = shard.columns[schema.timepoint_column(name).unwrap().0][row];
            (v != renkei_engine::NULL).then_some(v)
        };
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
