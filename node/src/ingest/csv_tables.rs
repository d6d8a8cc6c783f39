//! Patient and timepoint tables from CSV: each row typed against the schema as it is read,
//! merged into the stored shards, and written in one atomic batch or not at all.

use std::path::Path;

use renkei_engine::NULL;
use renkei_engine::schema::{
    DatasetSchema, Digits, TIMEPOINT_COLUMN, parse_day, parse_flag, trim_cell,
};

use crate::error::NodeError;
use crate::store::NodeStore;
use crate::store::tables::{Table, TableWrites};

use super::csv::{
    CsvFile, IngestOptions, IngestReport, Problems, cell, consent_scopes, refused,
    report_duplicates, require_stored, write_tables,
};
use super::pseudonym::{Pseudonyms, pseudonym_secret};

/// The columns of `defs` a file has: (position in the file, position in the table).
fn file_columns(file: &CsvFile, defs: &[renkei_engine::schema::ColumnDef]) -> Vec<(usize, usize)> {
    defs.iter()
        .enumerate()
        .filter_map(|(position, def)| file.index.get(&def.name).map(|at| (*at, position)))
        .collect()
}

/// A table's columns as a file has them, and how its decimals are taken.
struct RowParser<'a> {
    columns: &'a [(usize, usize)],
    defs: &'a [renkei_engine::schema::ColumnDef],
    schema: &'a DatasetSchema,
    digits: Digits,
    /// Values rounded so far (with [`Digits::Round`]).
    rounded: usize,
    /// The file's column of each patient's origin date (its position and name), if it has
    /// one: day columns may then be given as dates.
    origin: Option<(usize, &'a str)>,
}

/// The file's column of the schema's origin date, if the schema has one and the file too.
fn origin_column<'a>(file: &CsvFile, schema: &'a DatasetSchema) -> Option<(usize, &'a str)> {
    let name = schema.origin_date_column()?;
    file.index.get(name).map(|at| (*at, name))
}

impl RowParser<'_> {
    /// Parses a row's cells into `values`, reporting bad cells.
    fn parse(
        &mut self,
        row: &csv::StringRecord,
        line: u64,
        values: &mut [i64],
        problems: &mut Problems,
    ) {
        let origin = self.origin.and_then(|(at, name)| {
            let text = trim_cell(cell(row, at));
            if text.is_empty() {
                return None;
            }
            let day = parse_day(text);
            if day.is_none() {
                problems.push(
                    Some(line),
                    Some(name),
                    format!("`{text}` is not a date (YYYY-MM-DD)"),
                );
            }
            day
        });
        for ((at, position), value) in self.columns.iter().zip(values.iter_mut()) {
            let def = &self.defs[*position];
            let text = trim_cell(cell(row, *at));
            if def.is_day()
                && let Some(date) = parse_day(text)
            {
                if !self.schema.counts_from_origin(def) {
                    problems.push(
                        Some(line),
                        Some(&def.name),
                        format!(
                            "`{text}` is a date, but `{}` counts days from another event: give the number of days",
                            def.name
                        ),
                    );
                    *value = NULL;
                    continue;
                }
                // A date in a day column: days from this patient's origin date.
                *value = NULL;
                let Some(origin) = origin else {
                    let reason = match self.origin {
                        Some((_, name)) => format!(
                            "`{text}` is a date, and this row has no `{name}` to count days from"
                        ),
                        None => format!(
                            "`{text}` is a date; give days from the time origin, or the \
                             patient's origin date in its own column"
                        ),
                    };
                    problems.push(Some(line), Some(&def.name), reason);
                    continue;
                };
                match def.parse_cell_with(&(date - origin).to_string(), self.digits) {
                    Ok((parsed, _)) => *value = parsed.unwrap_or(NULL),
                    Err(e) => problems.push(
                        Some(line),
                        Some(&def.name),
                        format!("`{text}` is day {} from the origin: {}", date - origin, e.0),
                    ),
                }
                continue;
            }
            match def.parse_cell_with(text, self.digits) {
                Ok((parsed, rounded)) => {
                    *value = parsed.unwrap_or(NULL);
                    self.rounded += usize::from(rounded);
                }
                Err(e) => problems.push(Some(line), Some(&def.name), e.0),
            }
        }
    }
}

/// Loads a patient CSV; a decimal with more digits than its column keeps is refused.
pub fn ingest_patients(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    ingest_patients_with(
        store,
        path,
        IngestOptions {
            dry_run,
            ..IngestOptions::default()
        },
    )
}

/// Loads a patient CSV as `options` say.
pub fn ingest_patients_with(
    store: &NodeStore,
    path: &Path,
    options: IngestOptions,
) -> Result<IngestReport, NodeError> {
    let dry_run = options.dry_run;
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
    let origin_date = schema.origin_date_column();
    let allowed = |name: &str| {
        schema.patient_column(name).is_some()
            || consent_columns.iter().any(|c| c == name)
            || origin_date == Some(name)
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
    let mut parser = RowParser {
        columns: &columns,
        defs: &schema.patients,
        schema: &schema,
        digits: options.digits,
        rounded: 0,
        origin: origin_column(&file, &schema),
    };
    file.for_each_row(
        id_at,
        &mut ids,
        &mut problems,
        |row, line, pseudonym, problems| {
            parser.parse(row, line, &mut values, problems);
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
        rounded: parser.rounded,
        notes: Vec::new(),
    })
}

pub(super) fn parse_timepoint(cell: &str, line: u64, problems: &mut Problems) -> Option<u16> {
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
/// A decimal with more digits than its column keeps is refused.
pub fn ingest_timepoints(
    store: &NodeStore,
    path: &Path,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    ingest_timepoints_with(
        store,
        path,
        IngestOptions {
            dry_run,
            ..IngestOptions::default()
        },
    )
}

/// Loads a timepoint CSV as `options` say.
pub fn ingest_timepoints_with(
    store: &NodeStore,
    path: &Path,
    options: IngestOptions,
) -> Result<IngestReport, NodeError> {
    let dry_run = options.dry_run;
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
    let origin_date = schema.origin_date_column();
    let allowed = |name: &str| schema.timepoint_column(name).is_some() || origin_date == Some(name);
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
    let mut parser = RowParser {
        columns: &columns,
        defs: &schema.timepoints,
        schema: &schema,
        digits: options.digits,
        rounded: 0,
        origin: origin_column(&file, &schema),
    };
    file.for_each_row(
        id_at,
        &mut ids,
        &mut problems,
        |row, line, pseudonym, problems| {
            let number = parse_timepoint(cell(row, number_at), line, problems);
            parser.parse(row, line, &mut values, problems);
            if let Some(number) = number {
                writes.push(pseudonym, number, &values, (0, 0), line);
            }
        },
    );
    require_stored(&ids, store, &mut problems)?;
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
        rounded: parser.rounded,
        notes: Vec::new(),
    })
}
