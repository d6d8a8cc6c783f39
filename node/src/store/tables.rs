//! The patient and timepoint tables as they are stored: split by pseudonym into
//! [`SHARDS`] shards, each one sled value holding its rows column by column.
//!
//! A record per row cost a sled read-modify-write per row (about 100,000 rows/s, a tenth of
//! `sqlite3 .import`). A shard holds every row of the patients whose pseudonym starts with
//! its [`SHARD_BITS`]-bit prefix, so loading a file of any size is one read, merge and write
//! per shard it touches, and the whole file goes into the store as one atomic sled batch: it
//! loads completely or not at all. Pseudonyms are keyed hashes, so shards fill evenly (a
//! million patients with five timepoints each make shards of about 1,200 timepoint rows).
//!
//! Layout of the `data` tree, in key order:
//! - `I ‖ item key` → an [`ItemRecord`](crate::store::records::ItemRecord) (see [`crate::store::records`]);
//! - `P ‖ shard (u16, big-endian)` → the patient [`Shard`];
//! - `T ‖ shard` → the timepoint [`Shard`].
//!
//! Rows in a shard are sorted by (pseudonym, timepoint number), so iterating the shards in
//! key order visits every row in one global order. A write ([`TableWrites`]) sets the same
//! columns in each of its rows and leaves the others as stored; rows not stored yet are
//! added with every other column missing. Consent scopes are bits per patient row, named by
//! the shard's `scopes`.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::db::NodeStore;
use crate::error::NodeError;
use renkei_engine::NULL;

/// Bits of the pseudonym prefix that pick a shard.
pub const SHARD_BITS: u32 = 12;

/// Shards per table.
pub const SHARDS: usize = 1 << SHARD_BITS;

/// Largest stored shard.
pub const MAX_SHARD_BYTES: usize = 64 * 1024 * 1024;

/// Most consent scopes a patient table can tell apart.
pub const MAX_SCOPES: usize = renkei_engine::schema::MAX_CONSENT_SCOPES;

/// Key prefix of information items in the `data` tree.
pub const ITEM_PREFIX: u8 = b'I';

/// A table of the data model stored in shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Patients,
    Timepoints,
}

impl Table {
    fn prefix(self) -> u8 {
        match self {
            Table::Patients => b'P',
            Table::Timepoints => b'T',
        }
    }

    fn name(self) -> &'static str {
        match self {
            Table::Patients => "patient",
            Table::Timepoints => "timepoint",
        }
    }
}

/// The shard a patient's rows live in.
pub fn shard_of(pseudonym: &[u8; 32]) -> usize {
    usize::from(u16::from_be_bytes([pseudonym[0], pseudonym[1]]) >> (16 - SHARD_BITS))
}

fn shard_key(table: Table, shard: usize) -> [u8; 3] {
    let [hi, lo] = (shard as u16).to_be_bytes();
    [table.prefix(), hi, lo]
}

/// The stored key of an information item.
pub fn item_key(record_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(record_key.len() + 1);
    key.push(ITEM_PREFIX);
    key.extend_from_slice(record_key);
    key
}

/// The rows of one shard of a table, column by column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shard {
    /// The shard's patients, sorted and distinct.
    pub pseudonyms: Vec<[u8; 32]>,
    /// Per row: its patient, an index into `pseudonyms`. Rows are sorted by (pseudonym,
    /// number).
    pub patient: Vec<u32>,
    /// Per row: the timepoint number (0 in the patient table).
    pub number: Vec<u16>,
    /// Per column of the table (the schema's order), per row; [`NULL`] is missing.
    pub columns: Vec<Vec<i64>>,
    /// Consent scopes the bits of `consents` stand for (patient table).
    pub scopes: Vec<String>,
    /// Per row of the patient table: the scopes given, one bit per entry of `scopes`.
    pub consents: Vec<u64>,
}

impl Shard {
    pub fn rows(&self) -> usize {
        self.patient.len()
    }

    /// The pseudonym of row `row`.
    pub fn pseudonym(&self, row: usize) -> &[u8; 32] {
        &self.pseudonyms[self.patient[row] as usize]
    }

    /// Whether the shard has a row for `pseudonym` (any number).
    pub fn has_patient(&self, pseudonym: &[u8; 32]) -> bool {
        self.pseudonyms.binary_search(pseudonym).is_ok()
    }

    /// The row of (`pseudonym`, `number`), if stored.
    pub fn find(&self, pseudonym: &[u8; 32], number: u16) -> Option<usize> {
        let index = self.pseudonyms.binary_search(pseudonym).ok()? as u32;
        let start = self.patient.partition_point(|p| *p < index);
        let end = self.patient.partition_point(|p| *p <= index);
        (start..end).find(|row| self.number[*row] == number)
    }

    /// Whether row `row` gave consent `scope`.
    pub fn consented(&self, row: usize, scope: &str) -> bool {
        self.scopes
            .iter()
            .position(|s| s == scope)
            .is_some_and(|bit| self.consents.get(row).is_some_and(|m| m & (1 << bit) != 0))
    }

    /// Checks the invariants decoding alone cannot: lengths, order, indices, that every
    /// patient belongs in shard `shard` and has a row, and consent bits name distinct scopes.
    fn check(&self, table: Table, shard: usize, width: usize) -> Result<(), String> {
        let rows = self.rows();
        if self.number.len() != rows {
            return Err(format!("{} numbers for {rows} rows", self.number.len()));
        }
        if self.columns.len() != width {
            return Err(format!(
                "{} columns, the schema has {width}",
                self.columns.len()
            ));
        }
        if let Some(column) = self.columns.iter().find(|c| c.len() != rows) {
            return Err(format!(
                "a column of {} values for {rows} rows",
                column.len()
            ));
        }
        match table {
            Table::Patients if self.consents.len() != rows => {
                return Err(format!(
                    "{} consent sets for {rows} rows",
                    self.consents.len()
                ));
            }
            Table::Patients if self.number.iter().any(|n| *n != 0) => {
                return Err("a patient row with a timepoint number".into());
            }
            Table::Timepoints if !self.consents.is_empty() || !self.scopes.is_empty() => {
                return Err("consent in the timepoint table".into());
            }
            _ => {}
        }
        if self.scopes.len() > MAX_SCOPES {
            return Err(format!("{} consent scopes", self.scopes.len()));
        }
        if let Some((i, scope)) = self
            .scopes
            .iter()
            .enumerate()
            .find(|(i, s)| self.scopes[..*i].contains(s))
        {
            return Err(format!("consent scope `{scope}` named twice (bit {i})"));
        }
        let known = if self.scopes.len() == 64 {
            u64::MAX
        } else {
            (1u64 << self.scopes.len()) - 1
        };
        if self.consents.iter().any(|bits| bits & !known != 0) {
            return Err("a consent bit names no scope".into());
        }
        if self.pseudonyms.windows(2).any(|w| w[0] >= w[1]) {
            return Err("patients out of order".into());
        }
        if let Some(stray) = self.pseudonyms.iter().find(|p| shard_of(p) != shard) {
            return Err(format!(
                "patient {} belongs in shard {}",
                hex::encode(&stray[..4]),
                shard_of(stray)
            ));
        }
        // Rows are sorted by patient, so their patients run 0, 0, 1, 2, 2, … up to the last.
        let mut expected = 0u32;
        for row in 0..rows {
            let patient = self.patient[row];
            match patient.checked_sub(expected) {
                Some(0) => {}
                Some(1) if row > 0 => expected = patient,
                _ => {
                    return Err(format!(
                        "row {row} names patient {patient}, expected {expected} or the next"
                    ));
                }
            }
            if row > 0
                && patient == self.patient[row - 1]
                && self.number[row - 1] >= self.number[row]
            {
                return Err(format!("row {row} out of order"));
            }
        }
        let named = if rows == 0 { 0 } else { expected as usize + 1 };
        if named != self.pseudonyms.len() {
            return Err(format!(
                "{} patients, rows name {named}",
                self.pseudonyms.len()
            ));
        }
        Ok(())
    }
}

/// Reads one stored shard (empty when none is stored).
pub fn read_shard(
    store: &NodeStore,
    table: Table,
    shard: usize,
    width: usize,
) -> Result<Shard, NodeError> {
    match store.data.get(shard_key(table, shard))? {
        Some(bytes) => decode_shard(&bytes, table, shard, width),
        None => Ok(empty_shard(width)),
    }
}

fn empty_shard(width: usize) -> Shard {
    Shard {
        columns: vec![Vec::new(); width],
        ..Shard::default()
    }
}

fn decode_shard(
    bytes: &[u8],
    table: Table,
    shard: usize,
    width: usize,
) -> Result<Shard, NodeError> {
    let corrupt = corrupt_shard(table, shard);
    let stored: StoredShard = renkei_protocol::codec::decode_limited(bytes, MAX_SHARD_BYTES)
        .map_err(|e| corrupt(e.to_string()))?;
    let decoded = stored.into_shard(width).map_err(corrupt)?;
    decoded.check(table, shard, width).map_err(corrupt)?;
    Ok(decoded)
}

/// A shard as encoded: a column with no value in the shard is `None`, and a value `v` is
/// stored as `zigzag(v) + 1`, missing as 0, so that bincode's variable-length integers
/// spend one byte on a missing value (a timepoint file sets a few of the table's columns;
/// `i64::MIN`, the in-memory [`NULL`], would take nine).
#[derive(Serialize, Deserialize)]
struct StoredShard {
    pseudonyms: Vec<[u8; 32]>,
    patient: Vec<u32>,
    number: Vec<u16>,
    columns: Vec<Option<Vec<u64>>>,
    scopes: Vec<String>,
    consents: Vec<u64>,
}

fn store_value(value: i64) -> u64 {
    if value == NULL {
        0
    } else {
        (((value << 1) ^ (value >> 63)) as u64) + 1
    }
}

fn load_value(stored: u64) -> i64 {
    match stored {
        0 => NULL,
        n => {
            let zigzag = n - 1;
            ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64)
        }
    }
}

impl StoredShard {
    fn from_shard(shard: Shard) -> Self {
        let columns = shard
            .columns
            .iter()
            .map(|column| {
                (!column.iter().all(|v| *v == NULL))
                    .then(|| column.iter().map(|v| store_value(*v)).collect())
            })
            .collect();
        StoredShard {
            pseudonyms: shard.pseudonyms,
            patient: shard.patient,
            number: shard.number,
            columns,
            scopes: shard.scopes,
            consents: shard.consents,
        }
    }

    /// The shard in memory, once the lengths are right (checked before any column of
    /// missing values is expanded: a damaged value must not ask for unbounded memory).
    fn into_shard(self, width: usize) -> Result<Shard, String> {
        let rows = self.patient.len();
        if self.columns.len() != width {
            return Err(format!(
                "{} columns, the schema has {width}",
                self.columns.len()
            ));
        }
        if self.number.len() != rows {
            return Err(format!("{} numbers for {rows} rows", self.number.len()));
        }
        let columns = self
            .columns
            .into_iter()
            .map(|column| match column {
                None => Ok(vec![NULL; rows]),
                Some(values) if values.len() == rows => {
                    Ok(values.into_iter().map(load_value).collect())
                }
                Some(values) => Err(format!(
                    "a column of {} values for {rows} rows",
                    values.len()
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Shard {
            pseudonyms: self.pseudonyms,
            patient: self.patient,
            number: self.number,
            columns,
            scopes: self.scopes,
            consents: self.consents,
        })
    }
}

fn encode_shard(shard: Shard) -> Result<Vec<u8>, NodeError> {
    Ok(renkei_protocol::codec::encode_limited(
        &StoredShard::from_shard(shard),
        MAX_SHARD_BYTES,
    )?)
}

/// The error for stored shard `shard` of `table`, with what is wrong with it.
fn corrupt_shard(table: Table, shard: usize) -> impl Fn(String) -> NodeError + Copy {
    move |reason| NodeError::CorruptStore {
        what: format!("{} shard {shard}", table.name()),
        reason,
    }
}

/// Every stored shard of `table` with its number, in key order (so every row in
/// (pseudonym, number) order).
pub fn shards(
    store: &NodeStore,
    table: Table,
    width: usize,
) -> impl Iterator<Item = Result<(usize, Shard), NodeError>> + '_ {
    store.data.scan_prefix([table.prefix()]).map(move |entry| {
        let (key, value) = entry?;
        let shard = key.get(1..3).map_or(usize::MAX, |k| {
            usize::from(u16::from_be_bytes([k[0], k[1]]))
        });
        Ok((shard, decode_shard(&value, table, shard, width)?))
    })
}

/// How many rows `table` holds.
pub fn count_rows(store: &NodeStore, table: Table, width: usize) -> Result<usize, NodeError> {
    shards(store, table, width).try_fold(0, |sum, shard| Ok(sum + shard?.1.rows()))
}

/// How many patients have more than `bound` stored timepoints.
pub fn patients_over(store: &NodeStore, bound: u32, width: usize) -> Result<usize, NodeError> {
    shards(store, Table::Timepoints, width).try_fold(0, |over, shard| {
        let (_, shard) = shard?;
        let mut counts = vec![0u32; shard.pseudonyms.len()];
        for patient in &shard.patient {
            if let Some(count) = counts.get_mut(*patient as usize) {
                *count += 1;
            }
        }
        Ok(over + counts.iter().filter(|n| **n > bound).count())
    })
}

/// Which of `pseudonyms` have a patient row, in their order.
pub fn patients_present(
    store: &NodeStore,
    pseudonyms: &[[u8; 32]],
) -> Result<Vec<bool>, NodeError> {
    let mut order: Vec<usize> = (0..pseudonyms.len()).collect();
    order.sort_unstable_by_key(|i| shard_of(&pseudonyms[*i]));
    let mut present = vec![false; pseudonyms.len()];
    let mut loaded: Option<(usize, Vec<[u8; 32]>)> = None;
    for i in order {
        let shard = shard_of(&pseudonyms[i]);
        if loaded.as_ref().is_none_or(|(s, _)| *s != shard) {
            loaded = Some((shard, shard_patients(store, Table::Patients, shard)?));
        }
        if let Some((_, patients)) = &loaded {
            present[i] = patients.binary_search(&pseudonyms[i]).is_ok();
        }
    }
    Ok(present)
}

/// The patients of one stored shard, sorted, decoding nothing else.
fn shard_patients(
    store: &NodeStore,
    table: Table,
    shard: usize,
) -> Result<Vec<[u8; 32]>, NodeError> {
    /// The leading field of [`StoredShard`].
    #[derive(Deserialize)]
    struct Patients {
        pseudonyms: Vec<[u8; 32]>,
    }
    let Some(bytes) = store.data.get(shard_key(table, shard))? else {
        return Ok(Vec::new());
    };
    let corrupt = corrupt_shard(table, shard);
    let patients: Patients = renkei_protocol::codec::decode_leading(&bytes, MAX_SHARD_BYTES)
        .map_err(|e| corrupt(e.to_string()))?;
    if patients.pseudonyms.windows(2).any(|w| w[0] >= w[1]) {
        return Err(corrupt("patients out of order".into()));
    }
    Ok(patients.pseudonyms)
}

/// Rows to write into a table, each setting the same columns. Consent changes (patient
/// table) are bits over the write's own `scopes`: `grant` sets them, `revoke` clears them.
#[derive(Debug, Clone)]
pub struct TableWrites {
    table: Table,
    width: usize,
    /// The columns every row sets, in the order of its values.
    set: Vec<usize>,
    scopes: Vec<String>,
    /// The patients written, each once; sorted by [`Self::prepare`].
    patients: Vec<[u8; 32]>,
    /// Patient → its index in `patients`.
    interned: HashMap<[u8; 32], u32>,
    /// Per row: (index in `patients`, timepoint number).
    keys: Vec<(u32, u16)>,
    /// Row-major, `set.len()` values per row.
    values: Vec<i64>,
    /// Per row: (grant, revoke).
    consent: Vec<(u64, u64)>,
    /// Per row: where it came from (an input line), for reports.
    origin: Vec<u64>,
    /// Sorted (by pseudonym, number, then order of pushing), with no row twice: ready to
    /// merge.
    prepared: bool,
}

/// Two writes of the same row, by origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate {
    pub first: u64,
    pub again: u64,
}

/// What merging a write into the store did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Merged {
    pub added: usize,
    pub updated: usize,
    /// Rows written to the patient table that consent to secondary use afterwards.
    pub consented: usize,
}

impl Merged {
    pub fn add(&mut self, other: Merged) {
        self.added += other.added;
        self.updated += other.updated;
        self.consented += other.consented;
    }
}

impl TableWrites {
    /// A write of the columns `set` (positions in a table `width` wide); `scopes` names the
    /// consent bits of its rows.
    pub fn new(table: Table, width: usize, set: Vec<usize>, scopes: Vec<String>) -> Self {
        Self {
            table,
            width,
            set,
            scopes,
            patients: Vec::new(),
            interned: HashMap::new(),
            keys: Vec::new(),
            values: Vec::new(),
            consent: Vec::new(),
            origin: Vec::new(),
            prepared: false,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn table(&self) -> Table {
        self.table
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds a row: `values` parallel to the write's columns ([`NULL`] for missing).
    pub fn push(
        &mut self,
        pseudonym: [u8; 32],
        number: u16,
        values: &[i64],
        consent: (u64, u64),
        origin: u64,
    ) {
        debug_assert_eq!(values.len(), self.set.len());
        self.prepared = false;
        // A patient's rows usually come together: check the last one before hashing.
        let last = self.keys.last().map(|(patient, _)| *patient);
        let patient = match last {
            Some(patient) if self.patients[patient as usize] == pseudonym => patient,
            _ => *self.interned.entry(pseudonym).or_insert_with(|| {
                self.patients.push(pseudonym);
                (self.patients.len() - 1) as u32
            }),
        };
        self.keys.push((patient, number));
        self.values.extend_from_slice(values);
        self.consent.push(consent);
        self.origin.push(origin);
    }

    /// Sorts the rows into store order (so grouped by shard); returns every row written
    /// twice, in the order pushed.
    fn sort(&mut self) -> Vec<Duplicate> {
        // Patients by pseudonym, then rows by (patient's rank, number, order pushed): a sort
        // of integers, not of 32-byte keys.
        let mut by_pseudonym: Vec<u32> = (0..self.patients.len() as u32).collect();
        by_pseudonym
            .sort_unstable_by(|a, b| self.patients[*a as usize].cmp(&self.patients[*b as usize]));
        let mut rank = vec![0u32; self.patients.len()];
        for (position, patient) in by_pseudonym.iter().enumerate() {
            rank[*patient as usize] = position as u32;
        }
        self.patients = by_pseudonym
            .iter()
            .map(|patient| self.patients[*patient as usize])
            .collect();
        for index in self.interned.values_mut() {
            *index = rank[*index as usize];
        }
        let mut order: Vec<(u64, u32)> = self
            .keys
            .iter()
            .enumerate()
            .map(|(row, (patient, number))| {
                let key = (u64::from(rank[*patient as usize]) << 16) | u64::from(*number);
                (key, row as u32)
            })
            .collect();
        order.sort_unstable();
        let width = self.set.len();
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut values = Vec::with_capacity(self.values.len());
        let mut consent = Vec::with_capacity(self.consent.len());
        let mut origin = Vec::with_capacity(self.origin.len());
        for (key, row) in order {
            let row = row as usize;
            keys.push(((key >> 16) as u32, key as u16));
            values.extend_from_slice(&self.values[row * width..(row + 1) * width]);
            consent.push(self.consent[row]);
            origin.push(self.origin[row]);
        }
        self.keys = keys;
        self.values = values;
        self.consent = consent;
        self.origin = origin;
        let mut duplicates: Vec<Duplicate> = self
            .keys
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] == w[1])
            .map(|(i, _)| Duplicate {
                first: self.origin[i],
                again: self.origin[i + 1],
            })
            .collect();
        duplicates.sort_unstable_by_key(|d| d.again);
        duplicates
    }

    /// Sorts the rows and checks that none is written twice.
    pub fn prepare(&mut self) -> Result<(), Vec<Duplicate>> {
        let duplicates = self.sort();
        self.prepared = duplicates.is_empty();
        if self.prepared {
            Ok(())
        } else {
            Err(duplicates)
        }
    }

    /// Sorts the rows; of a row written more than once, the last pushed is kept.
    pub fn prepare_last_wins(&mut self) {
        self.sort();
        let rows = self.keys.len();
        let width = self.set.len();
        let mut kept = 0;
        for row in 0..rows {
            // Rows of one key are adjacent, the last pushed last.
            if row + 1 == rows || self.keys[row] != self.keys[row + 1] {
                self.keys[kept] = self.keys[row];
                self.values
                    .copy_within(row * width..(row + 1) * width, kept * width);
                self.consent[kept] = self.consent[row];
                self.origin[kept] = self.origin[row];
                kept += 1;
            }
        }
        self.keys.truncate(kept);
        self.values.truncate(kept * width);
        self.consent.truncate(kept);
        self.origin.truncate(kept);
        self.prepared = true;
    }

    fn require_prepared(&self) -> Result<(), NodeError> {
        if self.prepared {
            Ok(())
        } else {
            Err(NodeError::CorruptStore {
                what: format!("{} rows to write", self.table.name()),
                reason: "not sorted, or a row written twice".into(),
            })
        }
    }

    /// The rows of each shard (after [`Self::prepare`]).
    fn by_shard(&self) -> Vec<(usize, Range<usize>)> {
        let mut groups: Vec<(usize, Range<usize>)> = Vec::new();
        for (row, (patient, _)) in self.keys.iter().enumerate() {
            let shard = shard_of(&self.patients[*patient as usize]);
            match groups.last_mut() {
                Some((s, range)) if *s == shard => range.end = row + 1,
                _ => groups.push((shard, row..row + 1)),
            }
        }
        groups
    }

    /// Merges the rows into the stored shards, adding the new shards to `batch`; writes
    /// nothing to the store itself. Call [`Self::prepare`] first.
    pub fn merge_into(
        &self,
        store: &NodeStore,
        batch: &mut sled::Batch,
    ) -> Result<Merged, NodeError> {
        self.require_prepared()?;
        let mut merged = Merged::default();
        for (shard, rows) in self.by_shard() {
            let old = read_shard(store, self.table, shard, self.width)?;
            let (new, counts) = self.merge_shard(old, rows)?;
            merged.add(counts);
            let bytes = encode_shard(new)?;
            batch.insert(&shard_key(self.table, shard)[..], bytes);
        }
        Ok(merged)
    }

    /// Counts what [`Self::merge_into`] would add and update, writing nothing.
    pub fn dry_merge(&self, store: &NodeStore) -> Result<Merged, NodeError> {
        self.require_prepared()?;
        let mut merged = Merged::default();
        for (shard, rows) in self.by_shard() {
            let old = read_shard(store, self.table, shard, self.width)?;
            merged.add(self.merge_shard(old, rows)?.1);
        }
        Ok(merged)
    }

    /// The stored shard with `rows` of this write merged in.
    fn merge_shard(&self, old: Shard, rows: Range<usize>) -> Result<(Shard, Merged), NodeError> {
        let patients = self.table == Table::Patients;
        let mut scopes = old.scopes.clone();
        let mut bits = Vec::with_capacity(self.scopes.len());
        for scope in &self.scopes {
            let bit = match scopes.iter().position(|s| s == scope) {
                Some(bit) => bit,
                None => {
                    scopes.push(scope.clone());
                    scopes.len() - 1
                }
            };
            if bit >= MAX_SCOPES {
                return Err(NodeError::CorruptStore {
                    what: "consent scopes".into(),
                    reason: format!("more than {MAX_SCOPES}"),
                });
            }
            bits.push(bit);
        }
        let remap = |mask: u64| {
            bits.iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .fold(0u64, |m, (_, bit)| m | (1 << bit))
        };
        let secondary_use = scopes
            .iter()
            .position(|s| s == renkei_engine::schema::SECONDARY_USE);
        let capacity = old.rows() + rows.len();
        let mut new = Shard {
            pseudonyms: Vec::with_capacity(old.pseudonyms.len() + rows.len()),
            patient: Vec::with_capacity(capacity),
            number: Vec::with_capacity(capacity),
            columns: (0..self.width)
                .map(|_| Vec::with_capacity(capacity))
                .collect(),
            scopes,
            consents: Vec::with_capacity(if patients { capacity } else { 0 }),
        };
        let mut merged = Merged::default();
        let set_width = self.set.len();
        let push_key = |new: &mut Shard, pseudonym: &[u8; 32], number: u16| {
            if new.pseudonyms.last() != Some(pseudonym) {
                new.pseudonyms.push(*pseudonym);
            }
            new.patient.push((new.pseudonyms.len() - 1) as u32);
            new.number.push(number);
        };
        let mut o = 0;
        let mut w = rows.start;
        while o < old.rows() || w < rows.end {
            let old_key = (o < old.rows()).then(|| (*old.pseudonym(o), old.number[o]));
            let write_key = (w < rows.end).then(|| {
                let (patient, number) = self.keys[w];
                (self.patients[patient as usize], number)
            });
            let (take_old, take_write) = match (old_key, write_key) {
                (Some(a), Some(b)) => (a <= b, b <= a),
                (Some(_), None) => (true, false),
                _ => (false, true),
            };
            let (pseudonym, number) = if take_old {
                old_key.unwrap_or_default()
            } else {
                write_key.unwrap_or_default()
            };
            push_key(&mut new, &pseudonym, number);
            let mut consent = 0u64;
            for (column, out) in new.columns.iter_mut().enumerate() {
                out.push(if take_old {
                    old.columns[column][o]
                } else {
                    NULL
                });
            }
            if take_old && patients {
                consent = old.consents[o];
            }
            if take_write {
                let row = new.rows() - 1;
                for (i, column) in self.set.iter().enumerate() {
                    new.columns[*column][row] = self.values[w * set_width + i];
                }
                let (grant, revoke) = self.consent[w];
                consent = (consent | remap(grant)) & !remap(revoke);
                if take_old {
                    merged.updated += 1;
                } else {
                    merged.added += 1;
                }
            }
            if patients {
                new.consents.push(consent);
                if take_write && secondary_use.is_some_and(|bit| consent & (1 << bit) != 0) {
                    merged.consented += 1;
                }
            }
            o += usize::from(take_old);
            w += usize::from(take_write);
        }
        Ok((new, merged))
    }
}

/// Applies a batch to the `data` tree and returns once it is on disk.
pub fn commit(store: &NodeStore, batch: sled::Batch) -> Result<(), NodeError> {
    // Shards of very large tables are blobs: a file is loaded only once they are durable.
    store.apply_durably(&store.data, batch)
}

/// Moves a store written in renkei's first layout (one sled record per patient, timepoint
/// and item, in the trees `patients`, `timepoints` and `items`) into the `data` tree, once,
/// when the store is opened. The rows go in one batch and the old trees are dropped only
/// after it is on disk; moving the same records again gives the same rows, so a crash in
/// between is harmless. The move holds the old store in memory once over (about 100 bytes
/// a row), which the stores written in that layout (it loaded about 100,000 rows/s) fit.
/// A mark of a file whose ingest stopped midway is kept (see
/// [`crate::store::legacy::unfinished_ingests`]).
pub(crate) fn migrate_record_trees(store: &NodeStore) -> Result<(), NodeError> {
    use crate::store::records::{PatientRecord, TimepointRecord, decode};
    const OLD_TREES: [&str; 3] = ["patients", "timepoints", "items"];
    let db = store.db();
    let names = db.tree_names();
    let old: Vec<&str> = OLD_TREES
        .into_iter()
        .filter(|name| names.iter().any(|n| n.as_ref() == name.as_bytes()))
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    let [patients, timepoints, items] = OLD_TREES.map(|name| db.open_tree(name));
    let (patients, timepoints, items) = (patients?, timepoints?, items?);
    if !(patients.is_empty() && timepoints.is_empty() && items.is_empty()) {
        let schema = store.schema()?;
        let to_stored = |values: &[Option<i64>], width: usize| -> Vec<i64> {
            (0..width)
                .map(|i| values.get(i).copied().flatten().unwrap_or(NULL))
                .collect()
        };
        let mut records = Vec::new();
        let mut scopes: Vec<String> = Vec::new();
        for entry in patients.iter() {
            let (key, value) = entry?;
            let record: PatientRecord = decode(&value, "patient record", &key)?;
            for scope in &record.consents {
                if !scopes.contains(scope) {
                    scopes.push(scope.clone());
                }
            }
            records.push((key, record));
        }
        if scopes.len() > MAX_SCOPES {
            return Err(NodeError::CorruptStore {
                what: "consent scopes".into(),
                reason: format!("more than {MAX_SCOPES}"),
            });
        }
        let width = schema.patients.len();
        let every_scope = if scopes.len() == 64 {
            u64::MAX
        } else {
            (1u64 << scopes.len()) - 1
        };
        let mut writes =
            TableWrites::new(Table::Patients, width, (0..width).collect(), scopes.clone());
        for (index, (key, record)) in records.into_iter().enumerate() {
            let pseudonym = legacy_pseudonym(&key)?;
            let given = scopes
                .iter()
                .enumerate()
                .filter(|(_, s)| record.consents.contains(*s))
                .fold(0u64, |m, (bit, _)| m | (1 << bit));
            writes.push(
                pseudonym,
                0,
                &to_stored(&record.values, width),
                (given, every_scope & !given),
                index as u64,
            );
        }
        let mut batch = sled::Batch::default();
        let _ = writes.prepare();
        writes.merge_into(store, &mut batch)?;
        let width = schema.timepoints.len();
        let mut writes =
            TableWrites::new(Table::Timepoints, width, (0..width).collect(), Vec::new());
        for (index, entry) in timepoints.iter().enumerate() {
            let (key, value) = entry?;
            let record: TimepointRecord = decode(&value, "timepoint record", &key)?;
            if key.len() != 34 {
                return Err(NodeError::CorruptStore {
                    what: format!("timepoint record {}", hex::encode(&key)),
                    reason: "key is not 34 bytes".into(),
                });
            }
            let pseudonym = legacy_pseudonym(&key[..32])?;
            let number = u16::from_be_bytes([key[32], key[33]]);
            writes.push(
                pseudonym,
                number,
                &to_stored(&record.values, width),
                (0, 0),
                index as u64,
            );
        }
        let _ = writes.prepare();
        writes.merge_into(store, &mut batch)?;
        for entry in items.iter() {
            let (key, value) = entry?;
            batch.insert(item_key(&key), value);
        }
        commit(store, batch)?;
    }
    for name in OLD_TREES {
        db.drop_tree(name)?;
    }
    Ok(())
}

fn legacy_pseudonym(key: &[u8]) -> Result<[u8; 32], NodeError> {
    key.try_into().map_err(|_| NodeError::CorruptStore {
        what: format!("patient record {}", hex::encode(key)),
        reason: "key is not 32 bytes".into(),
    })
}

impl NodeStore {
    /// How many patient, timepoint and item rows are stored.
    pub fn record_counts(&self) -> Result<(usize, usize, usize), NodeError> {
        let schema = self.schema()?;
        Ok((
            count_rows(self, Table::Patients, schema.patients.len())?,
            count_rows(self, Table::Timepoints, schema.timepoints.len())?,
            self.data.scan_prefix([ITEM_PREFIX]).count(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::NodeHome;
    use crate::store::records::{self, PatientRecord, TimepointRecord};
    use renkei_engine::schema::SECONDARY_USE;

    fn store(dir: &std::path::Path) -> NodeStore {
        let (home, _) = NodeHome::init(&dir.join("node")).unwrap();
        home.open_store().unwrap()
    }

    /// A pseudonym in shard `shard`, told apart by `tag`.
    fn pseudonym(shard: usize, tag: u8) -> [u8; 32] {
        let mut p = [tag; 32];
        let prefix = ((shard as u16) << (16 - SHARD_BITS)).to_be_bytes();
        p[..2].copy_from_slice(&prefix);
        assert_eq!(shard_of(&p), shard);
        p
    }

    fn write(store: &NodeStore, writes: &mut TableWrites) -> Merged {
        writes.prepare().unwrap();
        let mut batch = sled::Batch::default();
        let merged = writes.merge_into(store, &mut batch).unwrap();
        commit(store, batch).unwrap();
        merged
    }

    #[test]
    fn a_write_sets_its_columns_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (a, b, c) = (pseudonym(7, 1), pseudonym(7, 2), pseudonym(4000, 3));
        let mut first = TableWrites::new(Table::Timepoints, 3, vec![0, 1], Vec::new());
        first.push(b, 1, &[10, 11], (0, 0), 1);
        first.push(a, 0, &[20, 21], (0, 0), 2);
        first.push(c, 0, &[30, NULL], (0, 0), 3);
        assert_eq!(write(&store, &mut first).added, 3);

        let mut second = TableWrites::new(Table::Timepoints, 3, vec![2, 1], Vec::new());
        second.push(b, 1, &[12, 13], (0, 0), 1);
        second.push(b, 0, &[14, 15], (0, 0), 2);
        let merged = write(&store, &mut second);
        assert_eq!((merged.added, merged.updated), (1, 1));

        let shard = read_shard(&store, Table::Timepoints, 7, 3).unwrap();
        assert_eq!(shard.pseudonyms, vec![a, b]);
        assert_eq!(shard.number, vec![0, 0, 1]);
        let row = |p, n| -> Vec<i64> {
            let r = shard.find(p, n).unwrap();
            shard.columns.iter().map(|c| c[r]).collect()
        };
        assert_eq!(row(&a, 0), vec![20, 21, NULL]);
        assert_eq!(row(&b, 0), vec![NULL, 15, 14]);
        assert_eq!(row(&b, 1), vec![10, 13, 12]);
        assert_eq!(shard.find(&c, 0), None);
        assert_eq!(count_rows(&store, Table::Timepoints, 3).unwrap(), 4);
        assert_eq!(
            shards(&store, Table::Timepoints, 3)
                .map(|s| s.unwrap().0)
                .collect::<Vec<_>>(),
            vec![7, 4000]
        );
        assert_eq!(count_rows(&store, Table::Patients, 0).unwrap(), 0);
    }

    #[test]
    fn consent_bits_follow_scope_names_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (a, b) = (pseudonym(9, 1), pseudonym(9, 2));
        let scopes = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        let mut first = TableWrites::new(Table::Patients, 1, vec![0], scopes(&[SECONDARY_USE]));
        first.push(a, 0, &[1], (1, 0), 1);
        first.push(b, 0, &[2], (0, 1), 2);
        assert_eq!(write(&store, &mut first).consented, 1);

        // Bit 0 of this write is `genome`, bit 1 `secondary_use`.
        let mut second = TableWrites::new(
            Table::Patients,
            1,
            vec![],
            scopes(&["genome", SECONDARY_USE]),
        );
        second.push(a, 0, &[], (0b01, 0b10), 1);
        second.push(b, 0, &[], (0b11, 0), 2);
        let merged = write(&store, &mut second);
        assert_eq!((merged.updated, merged.consented), (2, 1));

        let shard = read_shard(&store, Table::Patients, 9, 1).unwrap();
        let (ra, rb) = (shard.find(&a, 0).unwrap(), shard.find(&b, 0).unwrap());
        assert!(!shard.consented(ra, SECONDARY_USE) && shard.consented(ra, "genome"));
        assert!(shard.consented(rb, SECONDARY_USE) && shard.consented(rb, "genome"));
        assert!(!shard.consented(rb, "marketing"));
        assert_eq!(shard.columns[0], vec![1, 2]);
        assert_eq!(
            patients_present(&store, &[b, pseudonym(9, 3), a]).unwrap(),
            vec![true, false, true]
        );
    }

    #[test]
    fn a_row_written_twice_is_reported_or_the_last_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let a = pseudonym(1, 1);
        let mut writes = TableWrites::new(Table::Timepoints, 1, vec![0], Vec::new());
        writes.push(a, 0, &[1], (0, 0), 10);
        writes.push(pseudonym(2, 1), 0, &[2], (0, 0), 11);
        writes.push(a, 0, &[3], (0, 0), 12);
        let mut batch = sled::Batch::default();
        // Not prepared: refused.
        assert!(writes.merge_into(&store, &mut batch).is_err());
        assert_eq!(
            writes.prepare(),
            Err(vec![Duplicate {
                first: 10,
                again: 12
            }])
        );
        assert!(writes.dry_merge(&store).is_err());
        writes.prepare_last_wins();
        assert_eq!(writes.len(), 2);
        assert_eq!(writes.dry_merge(&store).unwrap().added, 2);
        assert_eq!(count_rows(&store, Table::Timepoints, 1).unwrap(), 0);
        write(&store, &mut writes);
        assert_eq!(
            read_shard(&store, Table::Timepoints, 1, 1).unwrap().columns[0],
            vec![3]
        );
    }

    #[test]
    fn stored_values_round_trip() {
        for v in [NULL, i64::MIN + 1, -1, 0, 1, 725, i64::MAX] {
            assert_eq!(load_value(store_value(v)), v, "{v}");
        }
        assert_eq!(store_value(NULL), 0);
        assert!(store_value(0) < 251 && store_value(-100) < 251);
        let shard = Shard {
            pseudonyms: vec![[1; 32]],
            patient: vec![0, 0],
            number: vec![0, 1],
            columns: vec![vec![NULL, NULL], vec![5, NULL], vec![-3, i64::MAX]],
            scopes: Vec::new(),
            consents: Vec::new(),
        };
        let bytes = encode_shard(shard.clone()).unwrap();
        let back = decode_shard(&bytes, Table::Timepoints, 16, 3).unwrap();
        assert_eq!(back, shard);
        // The wrong width for the schema is refused.
        assert!(decode_shard(&bytes, Table::Timepoints, 16, 4).is_err());
    }

    #[test]
    fn a_damaged_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut writes = TableWrites::new(Table::Timepoints, 1, vec![0], Vec::new());
        writes.push(pseudonym(5, 1), 0, &[1], (0, 0), 1);
        writes.push(pseudonym(5, 2), 0, &[2], (0, 0), 2);
        write(&store, &mut writes);
        let mut shard = read_shard(&store, Table::Timepoints, 5, 1).unwrap();
        shard.pseudonyms.swap(0, 1);
        let bytes = encode_shard(shard).unwrap();
        store
            .data
            .insert(shard_key(Table::Timepoints, 5), bytes)
            .unwrap();
        let error = read_shard(&store, Table::Timepoints, 5, 1)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("timepoint shard 5") && error.contains("out of order"),
            "{error}"
        );
        // Damage that decodes: each is named, none is trusted.
        type Damage = fn(&mut Shard);
        let cases: [(&str, Damage); 4] = [
            ("belongs in shard", |s| s.pseudonyms[1][0] ^= 0x80),
            ("patients, rows name", |s| {
                s.pseudonyms.push(pseudonym(5, 9))
            }),
            ("consent in the timepoint table", |s| {
                s.scopes.push("genome".into())
            }),
            ("row 1 names patient 3", |s| s.patient[1] = 3),
        ];
        for (expected, damage) in cases {
            let mut shard = Shard {
                pseudonyms: vec![pseudonym(5, 1), pseudonym(5, 2)],
                patient: vec![0, 1],
                number: vec![0, 0],
                columns: vec![vec![1, 2]],
                scopes: Vec::new(),
                consents: Vec::new(),
            };
            damage(&mut shard);
            store
                .data
                .insert(
                    shard_key(Table::Timepoints, 5),
                    encode_shard(shard).unwrap(),
                )
                .unwrap();
            let error = read_shard(&store, Table::Timepoints, 5, 1)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
        // Patient shards: consent bits must name distinct scopes.
        let patient = |scopes: &[&str], consent: u64| Shard {
            pseudonyms: vec![pseudonym(6, 1)],
            patient: vec![0],
            number: vec![0],
            columns: vec![vec![1]],
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            consents: vec![consent],
        };
        for (shard, expected) in [
            (patient(&[SECONDARY_USE], 0b10), "names no scope"),
            (
                patient(&[SECONDARY_USE, SECONDARY_USE], 0b01),
                "named twice",
            ),
        ] {
            store
                .data
                .insert(shard_key(Table::Patients, 6), encode_shard(shard).unwrap())
                .unwrap();
            let error = read_shard(&store, Table::Patients, 6, 1)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
        // A value claiming a million rows and many empty columns is refused before any
        // column is expanded.
        let huge = StoredShard {
            pseudonyms: Vec::new(),
            patient: vec![0; 1_000_000],
            number: Vec::new(),
            columns: vec![None; 10_000],
            scopes: Vec::new(),
            consents: Vec::new(),
        };
        let bytes = renkei_protocol::codec::encode_limited(&huge, MAX_SHARD_BYTES).unwrap();
        let error = decode_shard(&bytes, Table::Timepoints, 5, 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("10000 columns"), "{error}");
        // Bytes that are not a shard at all are refused too.
        store
            .data
            .insert(shard_key(Table::Timepoints, 5), &b"\x01\x02"[..])
            .unwrap();
        assert!(count_rows(&store, Table::Timepoints, 1).is_err());
    }

    #[test]
    fn a_store_in_the_first_layout_moves_into_shards() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let schema = store.schema().unwrap();
        let (pw, tw) = (schema.patients.len(), schema.timepoints.len());
        let db = store.db();
        let (patients, timepoints, items) = (
            db.open_tree("patients").unwrap(),
            db.open_tree("timepoints").unwrap(),
            db.open_tree("items").unwrap(),
        );
        let (a, b) = (pseudonym(3, 1), pseudonym(3000, 2));
        let mut record = PatientRecord {
            values: vec![None; pw],
            consents: [SECONDARY_USE.to_string()].into(),
        };
        record.values[0] = Some(70);
        patients
            .insert(a, records::encode(&record).unwrap())
            .unwrap();
        record.consents.clear();
        patients
            .insert(b, records::encode(&record).unwrap())
            .unwrap();
        let mut values = vec![None; tw];
        values[tw - 1] = Some(5);
        let timepoint = TimepointRecord { values };
        timepoints
            .insert(
                records::timepoint_key(&a, 2),
                records::encode(&timepoint).unwrap(),
            )
            .unwrap();
        items.insert(&[1u8; 50][..], &b"item"[..]).unwrap();

        migrate_record_trees(&store).unwrap();
        let names = db.tree_names();
        for old in ["patients", "timepoints", "items"] {
            assert!(
                !names.iter().any(|n| n.as_ref() == old.as_bytes()),
                "{old} kept"
            );
        }
        let shard = read_shard(&store, Table::Patients, 3, pw).unwrap();
        assert_eq!(shard.columns[0], vec![70]);
        assert!(shard.consented(0, SECONDARY_USE));
        let shard = read_shard(&store, Table::Patients, 3000, pw).unwrap();
        assert!(!shard.consented(0, SECONDARY_USE));
        let shard = read_shard(&store, Table::Timepoints, 3, tw).unwrap();
        assert_eq!(shard.columns[tw - 1][shard.find(&a, 2).unwrap()], 5);
        assert_eq!(
            store.data.get(item_key(&[1u8; 50])).unwrap().as_deref(),
            Some(&b"item"[..])
        );
        // Once moved, opening again finds nothing to move.
        migrate_record_trees(&store).unwrap();
        assert_eq!(store.record_counts().unwrap(), (2, 1, 1));
    }
}
