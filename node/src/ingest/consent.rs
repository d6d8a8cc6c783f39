//! Consent: a CSV of `patient_id, scope, granted` changes, and one patient's withdrawal.
//! Either changes the consent bits of stored patient rows in one atomic write.

use std::collections::BTreeMap;
use std::path::Path;

use renkei_engine::schema::{DatasetSchema, parse_flag};

use crate::error::{IngestError, IngestErrors, NodeError};
use crate::store::NodeStore;
use crate::store::tables::{self, Merged, Table, TableWrites};

use super::csv::{
    CsvTable, IngestReport, Problems, consent_scopes, refused, require_stored, write_tables,
};
use super::pseudonym::{Pseudonyms, pseudonym, pseudonym_secret};

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
    require_stored(&ids, store, &mut problems)?;
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
