//! Loading the node's stored tables into the engine's in-memory image.
//!
//! Reads every stored patient, timepoint and information item (see [`crate::store::tables`],
//! [`crate::store::records`]) shard by shard and hands them to the engine's
//! [`ImageBuilder`]: patients by pseudonym, their timepoints, and each item placed at its
//! timepoint while that timepoint's shard is read. Rows whose patient or timepoint is not
//! stored are counted as orphans, never queried. A store with an unfinished ingest is
//! refused: its image would be a half-loaded file.

use std::collections::HashMap;
use std::sync::Arc;

use renkei_engine::schema::DatasetSchema;
use renkei_engine::{Dataset, ImageBuilder, TooManyRows};

use crate::error::NodeError;
use crate::store::NodeStore;
use crate::store::records::{self, ItemRecord};
use crate::store::tables::{self, Table};

/// Reads every stored row of `store` into a fresh image under `schema`.
pub fn load(store: &NodeStore, schema: Arc<DatasetSchema>) -> Result<Dataset, NodeError> {
    let unfinished = crate::store::legacy::unfinished_ingests(store)?;
    if !unfinished.is_empty() {
        return Err(NodeError::UnfinishedIngest {
            file: unfinished.join(", "),
        });
    }
    let mut image = ImageBuilder::new(Arc::clone(&schema));
    let mut patient_rows: HashMap<[u8; 32], u32> = HashMap::new();
    for shard in tables::shards(store, Table::Patients, schema.patients.len()) {
        let (_, shard) = shard?;
        for row in 0..shard.rows() {
            let scopes = shard
                .scopes
                .iter()
                .enumerate()
                .filter(|(bit, _)| shard.consents[row] & (1 << bit) != 0)
                .map(|(_, scope)| scope.as_str());
            let index = image.add_patient(scopes).map_err(too_many)?;
            patient_rows.insert(*shard.pseudonym(row), index);
        }
        image.extend_patient_columns(&shard.columns);
    }
    // Items, in key order (which is shard order): placed while their shard is read.
    let mut items = Vec::new();
    let mut orphans = 0;
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
            _ => orphans += 1,
        }
    }
    let mut items = items.into_iter().peekable();
    for shard in tables::shards(store, Table::Timepoints, schema.timepoints.len()) {
        let (shard_number, shard) = shard?;
        let base = image.timepoints();
        let mut kept = Vec::with_capacity(shard.rows());
        for (index, pseudonym) in shard.pseudonyms.iter().enumerate() {
            let rows = shard.patient.partition_point(|p| (*p as usize) < index)
                ..shard.patient.partition_point(|p| (*p as usize) <= index);
            match patient_rows.get(pseudonym) {
                Some(&patient) => {
                    for row in rows {
                        kept.push(row);
                        image.add_timepoint(patient, shard.number[row]);
                    }
                }
                None => orphans += rows.len(),
            }
        }
        let all = kept.len() == shard.rows();
        image.extend_timepoint_columns(&shard.columns, (!all).then_some(kept.as_slice()));
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
            match found {
                Some((patient, timepoint)) => image
                    .add_item(kind, patient, timepoint, &record.values)
                    .map_err(too_many)?,
                None => orphans += 1,
            }
        }
    }
    // Items past the last stored timepoint.
    orphans += items.count();
    image.add_orphans(orphans);
    Ok(image.finish())
}

fn too_many(e: TooManyRows) -> NodeError {
    NodeError::CorruptStore {
        what: "dataset".into(),
        reason: e.to_string(),
    }
}
