//! Real third-party files (see `tests/fixtures/README.md`): DICOM headers and FASTQ
//! statistics are read correctly, and every broken file is refused with a reason, not a
//! panic; a manifest naming a broken file writes nothing.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use renkei_node::NodeHome;
use renkei_node::ingest;
use renkei_node::ingest::formats::{dicom, fastq};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path)
}

fn detail<'a>(details: &'a [(String, String)], name: &str) -> Option<&'a str> {
    details
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_real_ct_header_is_summarised_without_identifiers() {
    let summary = dicom::summarise(&fixture("dicom/CT_small.dcm")).unwrap();
    // modality CT (level 0), rows, columns, frames, slice thickness (mm × 100)
    assert_eq!(
        summary.values,
        vec![Some(0), Some(128), Some(128), Some(1), Some(500)]
    );
    assert_eq!(detail(&summary.details, "study_date"), Some("20040119"));
    assert_eq!(
        detail(&summary.details, "manufacturer"),
        Some("GE MEDICAL SYSTEMS")
    );
    assert_eq!(
        detail(&summary.details, "sop_class_uid"),
        Some("1.2.840.10008.5.1.4.1.1.2")
    );
    let kept: Vec<&str> = summary.details.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        kept.iter()
            .all(|n| !n.contains("patient") && !n.contains("institution")),
        "{kept:?}"
    );

    let mr = dicom::summarise(&fixture("dicom/MR_small.dcm")).unwrap();
    assert_eq!(mr.values[0], Some(1)); // MR
    assert_eq!((mr.values[1], mr.values[2]), (Some(64), Some(64)));
}

#[test]
fn broken_dicom_files_are_refused_with_a_reason() {
    for (name, expected) in [
        ("dicom/MR_truncated.dcm", "(7FE0,0010)"),
        ("dicom/rtplan_truncated.dcm", "(300A,012C)"),
        ("dicom/meta_missing_tsyntax.dcm", "TransferSyntax"),
        ("fastq/d.fq", "not a readable DICOM file"),
    ] {
        let err = dicom::summarise(&fixture(name)).unwrap_err();
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn real_fastq_files_are_summarised() {
    let (old, encoding) = fastq::summarise(&fixture("fastq/Illimina1.5.fq")).unwrap();
    assert_eq!(encoding, fastq::QualityEncoding::Phred64);
    assert_eq!(old.values[0], Some(1)); // reads
    assert_eq!(old.values[1], Some(100)); // bases
    assert_eq!(old.values[3], Some(2270)); // mean Phred quality 22.70
    let (gz, _) = fastq::summarise(&fixture("fastq/sana_ground.fq.gz")).unwrap();
    assert_eq!((gz.values[0], gz.values[1]), (Some(11), Some(6370)));
    let (tiny, _) = fastq::summarise(&fixture("fastq/d.fq")).unwrap();
    assert_eq!(tiny.values[0], Some(1));
}

#[test]
fn every_negative_fastq_case_is_refused() {
    let dir = fixture("fastq/errors");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let outcome = fastq::summarise(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let err = outcome
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"));
        assert!(!err.is_empty(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 22, "the Cock et al. negative set has 22 files");
}

#[test]
fn a_manifest_with_one_broken_file_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
    let store = home.open_store().unwrap();
    let patients = dir.path().join("p.csv");
    std::fs::write(&patients, "patient_id,age,consent_secondary_use\nP1,60,1\n").unwrap();
    ingest::ingest_patients(&store, &patients, false).unwrap();
    for name in [
        "dicom/CT_small.dcm",
        "dicom/MR_truncated.dcm",
        "fastq/sana_ground.fq.gz",
    ] {
        std::fs::copy(
            fixture(name),
            dir.path().join(Path::new(name).file_name().unwrap()),
        )
        .unwrap();
    }
    let manifest = dir.path().join("manifest.csv");
    std::fs::write(
        &manifest,
        "path,patient_id,timepoint,kind\nCT_small.dcm,P1,0,ct\nMR_truncated.dcm,P1,1,ct\nsana_ground.fq.gz,P1,1,host_genome\n",
    )
    .unwrap();
    let err = ingest::ingest_manifest(&store, &manifest, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.csv:3 column `path`: MR_truncated.dcm"),
        "{err}"
    );
    assert_eq!(store.record_counts().unwrap(), (1, 0, 0));

    std::fs::write(
        &manifest,
        "path,patient_id,timepoint,kind\nCT_small.dcm,P1,0,ct\nsana_ground.fq.gz,P1,1,host_genome\n",
    )
    .unwrap();
    let report = ingest::ingest_manifest(&store, &manifest, false).unwrap();
    assert_eq!((report.rows, report.added), (2, 2));
    // Idempotent: the same files are the same items.
    let again = ingest::ingest_manifest(&store, &manifest, false).unwrap();
    assert_eq!((again.added, again.updated), (0, 2));
    assert_eq!(store.record_counts().unwrap(), (1, 2, 2));

    // The same file listed twice for one patient, timepoint and kind is one item.
    std::fs::write(
        &manifest,
        "path,patient_id,timepoint,kind\nCT_small.dcm,P1,2,ct\nCT_small.dcm,P1,2,ct\n",
    )
    .unwrap();
    let twice = ingest::ingest_manifest(&store, &manifest, false).unwrap();
    assert_eq!((twice.added, twice.updated), (1, 0));
    assert_eq!(store.record_counts().unwrap(), (1, 3, 3));
}
