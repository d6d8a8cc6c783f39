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

/// A node in `dir/node` with the patient CSV `patients` loaded, and its store.
fn store_with_patients(dir: &Path, patients: &str) -> renkei_node::store::NodeStore {
    let (home, _) = NodeHome::init(&dir.join("node")).unwrap();
    let store = home.open_store().unwrap();
    let csv = dir.join("p.csv");
    std::fs::write(&csv, patients).unwrap();
    ingest::ingest_patients(&store, &csv, false).unwrap();
    store
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
        summary.values[..5],
        vec![Some(0), Some(128), Some(128), Some(1), Some(500)]
    );
    // SOP class `ct` (level 0), no body part recorded, manufacturer GE (level 0)
    assert_eq!(summary.values[5..], vec![Some(0), None, Some(0)]);
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
    // SOP class `mr`, manufacturer TOSHIBA_MEC read as `canon`.
    assert_eq!((mr.values[5], mr.values[7]), (Some(2), Some(3)));
}

/// An Enhanced CT object (written with pydicom, see `tests/fixtures/README.md`) keeps its
/// slice thickness only in the functional groups; it is read from there, and the header's
/// facts are queryable through a manifest.
#[test]
fn an_enhanced_ct_is_read_through_its_functional_groups() {
    use renkei_protocol::{Aggregate, CmpOp, Decimal, Filter, Literal, Query, Release};

    let summary = dicom::summarise(&fixture("dicom/enhanced_ct.dcm")).unwrap();
    // CT, 8 × 8, 3 frames, 1.25 mm, enhanced_ct (level 1), chest (0), siemens (1)
    assert_eq!(
        summary.values,
        vec![
            Some(0),
            Some(8),
            Some(8),
            Some(3),
            Some(125),
            Some(1),
            Some(0),
            Some(1)
        ]
    );

    let dir = tempfile::tempdir().unwrap();
    let store = store_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\nP2,70,1\n",
    );
    for name in ["dicom/enhanced_ct.dcm", "dicom/CT_small.dcm"] {
        let source = fixture(name);
        std::fs::copy(&source, dir.path().join(source.file_name().unwrap())).unwrap();
    }
    let manifest = dir.path().join("manifest.csv");
    std::fs::write(
        &manifest,
        "path,patient_id,timepoint,kind\nenhanced_ct.dcm,P1,0,ct\nCT_small.dcm,P2,0,ct\n",
    )
    .unwrap();
    ingest::ingest_manifest(&store, &manifest, false).unwrap();
    let data =
        renkei_node::image::load(&store, std::sync::Arc::new(store.schema().unwrap())).unwrap();
    let count = |filter: Filter| {
        let compiled = data
            .compile(&Query {
                aggregate: Aggregate::CountRows,
                ..Query::count_patients("ct", filter)
            })
            .unwrap();
        let Release::Scalar { value, .. } = compiled.unnoised_release(data.evaluate(&compiled))
        else {
            panic!("a count is one number");
        };
        value
    };
    let thin = Filter::cmp(
        "slice_thickness",
        CmpOp::Le,
        Literal::Decimal(Decimal {
            digits: 20,
            scale: 1,
        }),
    );
    let enhanced = Filter::eq("sop_class", Literal::Text("enhanced_ct".into()));
    assert_eq!(count(Filter::And(vec![thin.clone(), enhanced])), 1);
    assert_eq!(count(thin), 1, "CT_small is 5 mm");
    assert_eq!(
        count(Filter::eq("body_part", Literal::Text("chest".into()))),
        1
    );
    assert_eq!(
        count(Filter::eq("manufacturer", Literal::Text("ge".into()))),
        1
    );
    assert_eq!(count(Filter::True), 2);
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
        assert!(!err.to_string().is_empty(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 22, "the Cock et al. negative set has 22 files");
}

/// scikit-bio's format tests: what the FASTQ format allows (blank and whitespace-only lines
/// around records, whitespace around lines, wrapped sequence and quality, a quality line
/// that starts with `@`) is read; each file's reads are counted exactly.
#[test]
fn fastq_that_the_format_allows_is_read() {
    let valid = |name: &str| {
        fastq::summarise(&fixture(&format!("fastq/scikit-bio/valid/{name}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .0
    };
    for name in [
        "fastq_5_blanks_start_of_file",
        "fastq_5_ws_lines_start_of_file",
        "fastq_blank_lines",
        "fastq_multi_blank_between_records",
        "fastq_multi_blank_end_of_file",
        "fastq_multi_blank_start_of_file",
        "fastq_multi_seq_sanger",
        "fastq_multi_whitespace_stripping",
        "fastq_multi_ws_lines_between_records",
        "fastq_multi_ws_lines_end_of_file",
        "fastq_multi_ws_lines_start_of_file",
        "fastq_whitespace_only_lines",
    ] {
        let summary = valid(name);
        // Three records of six bases each, whatever the blank lines around them.
        assert_eq!(
            (summary.values[0], summary.values[1]),
            (Some(3), Some(18)),
            "{name}"
        );
        assert_eq!(summary, valid("fastq_multi_seq_sanger"), "{name}");
    }
    // Wrapped records read as the same reads written one line each.
    for (wrapped, flat) in [
        ("wrapping_original_sanger.fastq", "wrapping_as_sanger.fastq"),
        (
            "longreads_original_sanger.fastq",
            "longreads_as_sanger.fastq",
        ),
    ] {
        let (wrapped_summary, flat_summary) = (valid(wrapped), valid(flat));
        assert_eq!(wrapped_summary.values, flat_summary.values, "{wrapped}");
        assert!(wrapped_summary.values[0] >= Some(3), "{wrapped}");
    }
    // Old Illumina (Phred+64) reads as the same qualities as its Sanger conversion.
    let (illumina, encoding) = fastq::summarise(&fixture(
        "fastq/scikit-bio/valid/illumina_full_range_original_illumina.fastq",
    ))
    .unwrap();
    assert_eq!(encoding, fastq::QualityEncoding::Phred64);
    let sanger = valid("illumina_full_range_as_sanger.fastq");
    assert_eq!(illumina.values, sanger.values);
    assert_eq!(illumina.values[3], Some(3100)); // Phred 0..62: mean 31.00
    // RNA (U) is a base too.
    assert!(valid("misc_rna_original_sanger.fastq").values[0] > Some(0));
}

/// Solexa scores (-5 to 62, offset 64) are recognised and converted to Phred, not read as
/// Phred+64.
#[test]
fn solexa_qualities_are_converted() {
    let (summary, encoding) = fastq::summarise(&fixture(
        "fastq/scikit-bio/valid/solexa_full_range_original_solexa.fastq",
    ))
    .unwrap();
    assert_eq!(encoding, fastq::QualityEncoding::Solexa64);
    // Cock et al. 2009: Q_phred = 10 log10(10^(Q_solexa / 10) + 1); both records hold every
    // Solexa score from -5 to 62 once.
    let phred: f64 = (-5..=62)
        .map(|s| 10.0 * (10f64.powf(f64::from(s) / 10.0) + 1.0).log10())
        .sum::<f64>()
        / 68.0;
    assert_eq!(summary.values[3], Some((phred * 100.0).round() as i64));
    // Read as Phred+64 the mean would be 28.5.
    assert_ne!(summary.values[3], Some(2850));
    let details = &summary.details;
    assert!(details.contains(&("quality_encoding".into(), "solexa64".into())));
}

/// scikit-bio's invalid cases are refused at the line that is wrong, in renkei's words.
#[test]
fn fastq_errors_name_the_offending_line() {
    let refused = |name: &str| {
        fastq::summarise(&fixture(&format!("fastq/scikit-bio/invalid/{name}")))
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"))
    };
    for entry in std::fs::read_dir(fixture("fastq/scikit-bio/invalid")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let err = refused(&name);
        assert!(err.line > 0, "{name}: {err}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("line {}", err.line)),
            "{name}: {text}"
        );
        assert!(
            !text.contains('\n') && !text.contains("(line 0)"),
            "{name}: {text}"
        );
    }
    // A blank line after the sequence: the blank line itself (the file's line 3).
    let err = refused("fastq_invalid_blank_after_seq");
    assert_eq!(err.line, 3, "{err}");
    assert!(
        err.message
            .contains("blank line inside record 'foo bar baz'"),
        "{err}"
    );
    let err = refused("fastq_invalid_missing_header");
    assert_eq!(err.line, 1, "{err}");
    assert!(
        err.message.contains("title line starting with '@'"),
        "{err}"
    );
    // The negative set of Cock et al.: a space inside a quality line, at its column.
    let err = fastq::summarise(&fixture("fastq/errors/error_qual_space.fastq")).unwrap_err();
    assert!(err.column.is_some() && err.line > 1, "{err}");
    assert!(
        err.to_string().contains("is not a printable quality"),
        "{err}"
    );
    assert_eq!(
        err.located("reads.fq"),
        format!(
            "reads.fq:{}:{}: {}",
            err.line,
            err.column.unwrap(),
            err.message
        )
    );
}

#[test]
fn a_manifest_with_one_broken_file_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\n",
    );
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

/// A wrapped FASTQ file (which needletail refused) loads through a manifest, and a query
/// over the item view reads its statistics; a broken one is refused at `file:line`.
#[test]
fn a_wrapped_fastq_loads_and_its_reads_are_queryable() {
    use renkei_protocol::{Aggregate, Filter, Query, Release};

    let dir = tempfile::tempdir().unwrap();
    let store = store_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\nP2,70,1\n",
    );
    for name in [
        "scikit-bio/valid/wrapping_original_sanger.fastq",
        "scikit-bio/invalid/fastq_invalid_blank_within_qual",
    ] {
        let source = fixture(&format!("fastq/{name}"));
        std::fs::copy(&source, dir.path().join(source.file_name().unwrap())).unwrap();
    }
    let manifest = dir.path().join("manifest.csv");
    std::fs::write(
        &manifest,
        "path,patient_id,timepoint,kind\nwrapping_original_sanger.fastq,P1,0,rna_seq\nfastq_invalid_blank_within_qual,P2,0,rna_seq\n",
    )
    .unwrap();
    let err = ingest::ingest_manifest(&store, &manifest, false)
        .unwrap_err()
        .to_string();
    let broken = fastq::summarise(&dir.path().join("fastq_invalid_blank_within_qual")).unwrap_err();
    assert!(
        err.contains(&format!("fastq_invalid_blank_within_qual:{}:", broken.line)),
        "{err}"
    );
    std::fs::write(
        &manifest,
        "path,patient_id,timepoint,kind\nwrapping_original_sanger.fastq,P1,0,rna_seq\n",
    )
    .unwrap();
    ingest::ingest_manifest(&store, &manifest, false).unwrap();
    let (expected, _) =
        fastq::summarise(&dir.path().join("wrapping_original_sanger.fastq")).unwrap();
    let data =
        renkei_node::image::load(&store, std::sync::Arc::new(store.schema().unwrap())).unwrap();
    let query = Query {
        aggregate: Aggregate::Sum {
            column: "read_count".into(),
        },
        ..Query::count_patients("rna_seq", Filter::True)
    };
    let compiled = data.compile(&query).unwrap();
    let Release::Scalar { value, .. } = compiled.unnoised_release(data.evaluate(&compiled)) else {
        panic!("a sum is one number");
    };
    assert_eq!(Some(value), expected.values[0]);
    assert_eq!(value, 3);
}
