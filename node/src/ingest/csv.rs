//! What every ingest shares: the report of a load, the collected problems (each with its
//! file, line and column), a CSV file read in bounded chunks off the main thread, a table's
//! typed columns, and the writes that go to the store in one batch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;

use crate::error::{IngestError, IngestErrors, NodeError};
use crate::store::NodeStore;
use crate::store::tables::{self, Merged, TableWrites};
use renkei_engine::schema::{DatasetSchema, Digits, SECONDARY_USE, trim_cell};

use super::pseudonym::Pseudonyms;

/// Reports each patient of the file not on the node, at its first line.
pub(crate) fn require_stored(
    ids: &Pseudonyms,
    store: &NodeStore,
    problems: &mut Problems,
) -> Result<(), NodeError> {
    for line in ids.missing_from(store)? {
        problems.push(
            Some(line),
            Some("patient_id"),
            "no such patient on this node; load the patient file first",
        );
    }
    Ok(())
}

/// How many problems one report lists before summarising the rest.
pub const MAX_REPORTED_ERRORS: usize = 20;

/// The header of the documented patient CSV (the walking skeleton's form).
pub const PATIENT_CSV_HEADER: &str = "patient_id,age,sex,severity,diabetes,hypertension,chronic_lung_disease,cardiovascular_disease,kidney_disease,cancer,obesity,consent_secondary_use";

/// What an ingest did (or, on a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct IngestReport {
    pub rows: usize,
    /// Records not in the store before.
    pub added: usize,
    /// Records already in the store, now updated.
    pub updated: usize,
    /// Patients in the file who consented to secondary use (patient files only).
    pub consented: usize,
    pub dry_run: bool,
    /// Decimals rounded to their column's digits (only when asked, or by an import, whose
    /// rule says so).
    pub rounded: usize,
    /// What else the load has to say, a line each (an import: what it read and mapped).
    pub notes: Vec<String>,
}

/// How a file is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOptions {
    /// Check everything, write nothing.
    pub dry_run: bool,
    /// What to do with decimals that have more digits than their column keeps (refused
    /// unless `Round` is asked for).
    pub digits: Digits,
}

/// Collects problems while a whole file is checked.
pub(crate) struct Problems {
    pub(crate) file: String,
    pub(crate) errors: Vec<IngestError>,
    pub(crate) more: usize,
}

impl Problems {
    pub(crate) fn new(path: &Path) -> Self {
        Self::named(path.display().to_string())
    }

    pub(crate) fn named(file: String) -> Self {
        Self {
            file,
            errors: Vec::new(),
            more: 0,
        }
    }

    /// An empty collection for the same file.
    pub(crate) fn new_like(other: &Problems) -> Self {
        Self::named(other.file.clone())
    }

    /// Records a problem. Past [`MAX_REPORTED_ERRORS`] only the earliest by line are kept
    /// (checks that run after the rows are read report lines out of order).
    pub(crate) fn push(
        &mut self,
        line: Option<u64>,
        column: Option<&str>,
        reason: impl Into<String>,
    ) {
        let error = IngestError {
            file: self.file.clone(),
            line,
            column: column.map(str::to_string),
            reason: reason.into(),
        };
        self.keep(error);
    }

    pub(crate) fn keep(&mut self, error: IngestError) {
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

    pub(crate) fn total(&self) -> usize {
        self.errors.len() + self.more
    }

    /// Takes in the problems another pass over the same file found; the first reported are
    /// the first by line.
    pub(crate) fn absorb(&mut self, other: Problems) {
        self.more += other.more;
        for error in other.errors {
            self.keep(error);
        }
    }

    pub(crate) fn finish<T>(mut self, value: T) -> Result<T, IngestErrors> {
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
pub(crate) struct CsvFile {
    pub(crate) reader: csv::Reader<std::fs::File>,
    /// Header name → position.
    pub(crate) index: HashMap<String, usize>,
}

impl CsvFile {
    /// Opens `path`, checking that the header has every `required` column and no unknown
    /// or duplicate column.
    pub(crate) fn open(
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
    pub(crate) fn next(&mut self, row: &mut csv::StringRecord, problems: &mut Problems) -> bool {
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

    pub(crate) fn position(&self, column: &str) -> usize {
        self.index.get(column).copied().unwrap_or(usize::MAX)
    }

    /// Calls `each(row, line, pseudonym, problems)` for every row, in file order, with the
    /// pseudonym of its patient id (column `id_at`); a row without an id is reported instead.
    /// The file is read and the ids hashed on a second thread while `each` runs on this one,
    /// so a file takes about as long as the slower of the two halves.
    pub(crate) fn for_each_row(
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
pub(crate) const CHUNK_ROWS: usize = 4096;
pub(crate) const CHUNKS_AHEAD: usize = 2;

/// A run of rows read from a CSV file, with the pseudonyms of their patients. The buffers
/// are reused from chunk to chunk.
#[derive(Default)]
pub(crate) struct RowChunk {
    pub(crate) rows: Vec<csv::StringRecord>,
    pub(crate) patients: Vec<[u8; 32]>,
    /// Rows in use (the buffers may hold more).
    pub(crate) len: usize,
}

impl RowChunk {
    /// Reads up to [`CHUNK_ROWS`] rows that have a patient id; false once the file is done.
    pub(crate) fn fill(
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
pub(crate) fn cell(row: &csv::StringRecord, at: usize) -> &str {
    trim_cell(row.get(at).unwrap_or_default())
}

/// Where a row came from: its line.
pub(crate) fn line_of(row: &csv::StringRecord) -> u64 {
    row.position().map_or(0, |p| p.line())
}

/// A whole (small) CSV file checked against the columns a table accepts.
pub(crate) struct CsvTable {
    pub(crate) rows: Vec<(u64, csv::StringRecord)>,
    pub(crate) file: CsvFile,
}

impl CsvTable {
    pub(crate) fn read(
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

    pub(crate) fn cell<'a>(&self, row: &'a csv::StringRecord, column: &str) -> Option<&'a str> {
        self.file
            .index
            .get(column)
            .and_then(|i| row.get(*i))
            .map(trim_cell)
    }
}

/// Consent scopes a patient file may set (`consent_<scope>` columns).
pub(crate) fn consent_scopes(schema: &DatasetSchema) -> Vec<String> {
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

pub(crate) fn empty_file() -> NodeError {
    NodeError::Ingest(IngestErrors {
        errors: Vec::new(),
        more: 0,
    })
}

pub(crate) fn refused(problems: Problems) -> NodeError {
    problems
        .finish(())
        .err()
        .map(NodeError::from)
        .unwrap_or_else(empty_file)
}

/// Reports rows written twice in one file.
pub(crate) fn report_duplicates(
    writes: &mut TableWrites,
    column: &str,
    what: &str,
    problems: &mut Problems,
) {
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
