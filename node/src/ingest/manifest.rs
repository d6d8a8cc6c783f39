//! Information items: a manifest (`path, patient_id, timepoint, kind`) whose files are
//! each summarised by their format's reader ([`super::formats`]) and stored as item records
//! at their patient's timepoint, all in one atomic write.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use renkei_engine::schema::{ItemFormat, TIMEPOINT_COLUMN};
use sha2::{Digest, Sha256};

use crate::error::NodeError;
use crate::store::NodeStore;
use crate::store::records::{self, ItemRecord};
use crate::store::tables::{self, Table, TableWrites};

use super::csv::{CsvTable, IngestReport, Problems, refused, require_stored, write_tables};
use super::csv_tables::parse_timepoint;
use super::formats;
use super::pseudonym::{Pseudonyms, pseudonym_secret};

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
            ItemFormat::Dicom => {
                formats::dicom::summarise(&file_path).map_err(|reason| format!("{file}: {reason}"))
            }
            ItemFormat::Fastq => formats::fastq::summarise(&file_path)
                .map(|(s, _)| s)
                .map_err(|e| e.located(file)),
        };
        let summary = match summary {
            Ok(summary) => summary,
            Err(reason) => {
                problems.push(Some(line), Some("path"), reason);
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
    require_stored(&ids, store, &mut problems)?;
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
