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
//!   by its format's reader ([`crate::ingest::formats`]); paths are relative to the manifest.
//!
//! A row updates only the columns its file has; loading the same file again changes nothing.
//! Tables are read as a stream (a row at a time, typed as it is read) and merged into the
//! stored shards ([`crate::store::tables`]), which go to the store in one sled batch: a file of a
//! million rows is one atomic write of the few thousand shards it touches.
//! The hospital's patient id is replaced by a keyed hash under the node's secret, so the
//! store holds no raw identifier; other identifying columns are not accepted at all. Errors
//! name the file, line (or record) and column, up to [`MAX_REPORTED_ERRORS`] of them.

mod consent;
mod csv;
mod csv_tables;
pub mod formats;
pub mod import;
mod manifest;
pub(crate) mod pseudonym;

pub use consent::{ingest_consent, withdraw_consent};
pub use csv::{IngestOptions, IngestReport, MAX_REPORTED_ERRORS, PATIENT_CSV_HEADER};
pub use csv_tables::{
    ingest_patients, ingest_patients_with, ingest_timepoints, ingest_timepoints_with,
};
pub use manifest::ingest_manifest;
pub use pseudonym::pseudonym;

#[cfg(test)]
mod tests {

    use std::path::Path;

    use crate::error::NodeError;
    use crate::store::NodeStore;
    use crate::store::tables::{self};

    use super::csv::*;
    use super::pseudonym::{pseudonym, pseudonym_secret};
    use super::*;
    use crate::home::NodeHome;
    use crate::store::legacy::{abandon_unfinished, completed, set_unfinished, unfinished_ingests};
    use renkei_engine::Dataset;
    use std::path::PathBuf;
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
