//! Exports in other shapes: Synthea's CSV output and FHIR R4 bundles are mapped onto the
//! covid19 schema (comorbidities from SNOMED CT, labs from LOINC with unit conversion, drugs
//! from medication names, severity and days since onset from the COVID-19 course), without
//! keeping any identifier; broken exports are refused whole.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use renkei_engine::{Dataset, Exact};
use renkei_node::NodeHome;
use renkei_node::ingest::import;
use renkei_protocol::{CmpOp, Filter, Literal, Query};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path)
}

fn count(data: &Dataset, view: &str, filter: Filter) -> u64 {
    match data.evaluate(&data.compile(&Query::count_patients(view, filter)).unwrap()) {
        Exact(parts) if parts.len() == 1 && parts[0].len() == 1 => parts[0][0] as u64,
        other => panic!("a count should be one number, not {other:?}"),
    }
}

fn flag(column: &str) -> Filter {
    Filter::eq(column, Literal::Bool(true))
}

fn text(column: &str, value: &str) -> Filter {
    Filter::eq(column, Literal::Text(value.into()))
}

#[test]
fn a_synthea_export_is_mapped_onto_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _) = NodeHome::init(dir.path()).unwrap();
    let store = home.open_store().unwrap();
    let export = import::read_synthea(&fixture("synthea")).unwrap();
    let report = import::import(&store, &export, true, false).unwrap();
    assert_eq!((report.added, report.consented), (5, 2)); // 2 patients, 3 encounters
    let data = renkei_node::image::load(&store, Arc::new(store.schema().unwrap())).unwrap();
    assert_eq!((data.consented(), data.timepoints()), (2, 3));
    assert_eq!(count(&data, "patients", flag("hypertension")), 1);
    assert_eq!(count(&data, "patients", flag("obesity")), 1);
    assert_eq!(count(&data, "patients", text("outcome", "died")), 1);
    // Died 19 days after onset: critical at the last encounter, the worst of the course.
    assert_eq!(count(&data, "patients", text("severity", "critical")), 1);
    assert_eq!(
        count(
            &data,
            "patients",
            Filter::cmp("age", CmpOp::Eq, Literal::Integer(80))
        ),
        1
    );
    // CRP 210.4 mg/L is 21.04 mg/dL; remdesivir given at that encounter.
    let crp = Filter::cmp(
        "crp",
        CmpOp::Gt,
        Literal::Decimal(renkei_protocol::Decimal {
            digits: 2100,
            scale: 2,
        }),
    );
    assert_eq!(
        count(
            &data,
            "timepoints",
            Filter::And(vec![crp, flag("remdesivir")])
        ),
        1
    );
    assert_eq!(
        count(
            &data,
            "timepoints",
            Filter::cmp("days_since_onset", CmpOp::Eq, Literal::Integer(4))
        ),
        1
    );
    // Outcome days from the onset (2020-04-01): admitted on day 4, died on day 19 before
    // the stay ended, so never discharged; followed up to death.
    let day = |column: &str, days: i64| Filter::cmp(column, CmpOp::Eq, Literal::Integer(days));
    assert_eq!(count(&data, "patients", day("admission_day", 4)), 1);
    assert_eq!(count(&data, "patients", day("death_day", 19)), 1);
    assert_eq!(count(&data, "patients", day("followup_day", 19)), 1);
    let discharged = Filter::IsNull {
        column: "discharge_day".into(),
        negated: true,
    };
    assert_eq!(count(&data, "patients", discharged), 0);
    // The patient without COVID-19 has no onset, so no outcome days.
    let followed = Filter::IsNull {
        column: "followup_day".into(),
        negated: true,
    };
    assert_eq!(count(&data, "patients", followed), 1);
    // No identifier reached the store.
    drop(data);
    drop(store);
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        for secret in [&b"Ichiro123"[..], b"999-11-1111", b"1 Main St", b"p-a"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{} holds {:?}",
                entry.display(),
                String::from_utf8_lossy(secret)
            );
        }
    }
    // Loading the same export again changes nothing.
    let store = home.open_store().unwrap();
    let again = import::import(&store, &export, true, false).unwrap();
    assert_eq!((again.added, again.updated), (0, 5));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_fhir_bundle_is_mapped_and_consent_is_not_assumed() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _) = NodeHome::init(dir.path()).unwrap();
    let store = home.open_store().unwrap();
    let path = fixture("fhir/covid_patient.json");
    let export = import::read_fhir(&[path.as_path()]).unwrap();
    let report = import::import(&store, &export, false, false).unwrap();
    assert_eq!((report.added, report.consented), (3, 0));
    let data = renkei_node::image::load(&store, Arc::new(store.schema().unwrap())).unwrap();
    // Without consent nothing is counted.
    assert_eq!(data.consented(), 0);
    assert_eq!(data.withheld(), 1);
    drop(data);
    let consent = dir.path().join("consent.csv");
    std::fs::write(
        &consent,
        "patient_id,scope,granted\npat-1,secondary_use,yes\n",
    )
    .unwrap();
    renkei_node::ingest::ingest_consent(&store, &consent, false).unwrap();
    let data = renkei_node::image::load(&store, Arc::new(store.schema().unwrap())).unwrap();
    assert_eq!(count(&data, "patients", flag("diabetes")), 1);
    assert_eq!(count(&data, "patients", text("severity", "severe")), 1);
    let il6 = Filter::cmp(
        "il6",
        CmpOp::Eq,
        Literal::Decimal(renkei_protocol::Decimal {
            digits: 875,
            scale: 1,
        }),
    );
    assert_eq!(
        count(
            &data,
            "timepoints",
            Filter::And(vec![
                il6,
                flag("dexamethasone"),
                text("care_level", "hospitalized")
            ])
        ),
        1
    );
}

#[test]
fn broken_exports_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"resourceType": "Patient", "id": "x"}"#).unwrap();
    let err = import::read_fhir(&[bad.as_path()]).unwrap_err().to_string();
    assert!(err.contains("not a FHIR Bundle"), "{err}");
    std::fs::write(&bad, r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "q", "gender": "female"}}]}"#).unwrap();
    let err = import::read_fhir(&[bad.as_path()]).unwrap_err().to_string();
    assert!(err.contains("Patient/q column `birthDate`"), "{err}");

    let synthea = dir.path().join("synthea");
    std::fs::create_dir_all(&synthea).unwrap();
    std::fs::copy(
        fixture("synthea/patients.csv"),
        synthea.join("patients.csv"),
    )
    .unwrap();
    let err = import::read_synthea(&synthea).unwrap_err().to_string();
    assert!(err.contains("encounters.csv: file is missing"), "{err}");
    std::fs::copy(
        fixture("synthea/encounters.csv"),
        synthea.join("encounters.csv"),
    )
    .unwrap();
    std::fs::write(synthea.join("observations.csv"), "DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n2020-04-05,p-a,e-a2,1988-5,CRP,2.0,g/L,numeric\n").unwrap();
    let export = import::read_synthea(&synthea).unwrap();
    let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
    let store = home.open_store().unwrap();
    let err = import::import(&store, &export, true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unit `g/L` of LOINC 1988-5"), "{err}");
    assert_eq!(store.record_counts().unwrap(), (0, 0, 0));
}

/// A FHIR transaction bundle as exporters write it: Patients without `id`, every entry
/// known by a `urn:uuid:` fullUrl and referred to by it, `request.method = POST`.
fn transaction_bundle(patient: &str, encounter: &str, birth: &str, il6: f64) -> String {
    format!(
        r#"{{
  "resourceType": "Bundle",
  "type": "transaction",
  "entry": [
    {{"fullUrl": "urn:uuid:{patient}",
      "resource": {{"resourceType": "Patient", "gender": "female", "birthDate": "{birth}"}},
      "request": {{"method": "POST", "url": "Patient"}}}},
    {{"fullUrl": "urn:uuid:{encounter}",
      "resource": {{"resourceType": "Encounter", "status": "finished",
        "class": {{"code": "IMP"}},
        "subject": {{"reference": "urn:uuid:{patient}"}},
        "period": {{"start": "2020-04-06T08:00:00Z"}}}},
      "request": {{"method": "POST", "url": "Encounter"}}}},
    {{"fullUrl": "urn:uuid:{encounter}-il6",
      "resource": {{"resourceType": "Observation", "status": "final",
        "code": {{"coding": [{{"system": "http://loinc.org", "code": "26881-3"}}]}},
        "subject": {{"reference": "urn:uuid:{patient}"}},
        "encounter": {{"reference": "urn:uuid:{encounter}"}},
        "valueQuantity": {{"value": {il6}, "unit": "pg/mL"}}}},
      "request": {{"method": "POST", "url": "Observation"}}}}
  ]
}}"#
    )
}

fn il6_is(tenths: i64) -> Filter {
    Filter::cmp(
        "il6",
        CmpOp::Eq,
        Literal::Decimal(renkei_protocol::Decimal {
            digits: tenths,
            scale: 1,
        }),
    )
}

#[test]
fn transaction_bundles_are_one_patient_each_with_their_references_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
    let store = home.open_store().unwrap();
    let mut paths = Vec::new();
    for (n, il6) in [(1, 12.5), (2, 40.0), (3, 12.5)] {
        let path = dir.path().join(format!("bundle-{n}.json"));
        let text = transaction_bundle(
            &format!("6f1c0b7e-0000-4000-8000-00000000000{n}"),
            &format!("0e2d1c3b-0000-4000-8000-00000000000{n}"),
            "1950-01-01",
            il6,
        );
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let export = import::read_fhir(&paths).unwrap();
    assert_eq!(export.patients.len(), 3);
    let report = import::import(&store, &export, true, false).unwrap();
    assert_eq!(report.consented, 3);
    let data = renkei_node::image::load(&store, Arc::new(store.schema().unwrap())).unwrap();
    assert_eq!(
        data.consented(),
        3,
        "one patient per bundle, not one in all"
    );
    assert_eq!(data.timepoints(), 3, "each encounter found its patient");
    assert_eq!(count(&data, "timepoints", il6_is(125)), 2);
    assert_eq!(count(&data, "timepoints", il6_is(400)), 1);
}

#[test]
fn a_bulk_export_in_ndjson_is_read_as_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
    let store = home.open_store().unwrap();
    let export_dir = dir.path().join("export");
    std::fs::create_dir_all(&export_dir).unwrap();
    std::fs::write(
        export_dir.join("Patient.ndjson"),
        concat!(
            r#"{"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1940-05-01"}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"p2","gender":"female","birthDate":"1985-07-09"}"#,
            "\n\n"
        ),
    )
    .unwrap();
    std::fs::write(
        export_dir.join("Encounter.ndjson"),
        concat!(
            r#"{"resourceType":"Encounter","id":"e1","class":{"code":"IMP"},"subject":{"reference":"Patient/p1"},"period":{"start":"2020-04-01"}}"#,
            "\n",
            r#"{"resourceType":"Encounter","id":"e2","class":{"code":"IMP"},"subject":{"reference":"Patient/p2"},"period":{"start":"2020-04-03"}}"#,
            "\n",
            r#"{"resourceType":"Encounter","id":"e3","class":{"code":"IMP"},"subject":{"reference":"Patient/p2"},"period":{"start":"2020-04-05"}}"#,
            "\n"
        ),
    )
    .unwrap();
    std::fs::write(
        export_dir.join("Observation.ndjson"),
        concat!(
            r#"{"resourceType":"Observation","id":"o1","code":{"coding":[{"system":"http://loinc.org","code":"26881-3"}]},"subject":{"reference":"Patient/p2"},"encounter":{"reference":"Encounter/e3"},"valueQuantity":{"value":55.5,"unit":"pg/mL"}}"#,
            "\n"
        ),
    )
    .unwrap();
    let export = import::read_fhir(&[export_dir.as_path()]).unwrap();
    let report = import::import(&store, &export, true, false).unwrap();
    assert_eq!(report.consented, 2);
    let data = renkei_node::image::load(&store, Arc::new(store.schema().unwrap())).unwrap();
    assert_eq!((data.consented(), data.timepoints()), (2, 3));
    assert_eq!(count(&data, "timepoints", il6_is(555)), 1);
    // A line that is not JSON is refused with its file and line.
    std::fs::write(
        export_dir.join("Observation.ndjson"),
        "{\"resourceType\":\n",
    )
    .unwrap();
    let err = import::read_fhir(&[export_dir.as_path()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("Observation.ndjson:1"), "{err}");
    // A directory with nothing to read says what it expected.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = import::read_fhir(&[empty.as_path()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("*.ndjson"), "{err}");
}

/// An import says what it read and what it mapped, by code system, so a hospital sees what
/// was left out: here a condition coded in ICD-10-CM, which the mapping does not know yet,
/// and an observation with an unmapped LOINC code.
#[test]
fn an_import_reports_what_it_did_not_map() {
    let dir = tempfile::tempdir().unwrap();
    let (home, _) = NodeHome::init(&dir.path().join("node")).unwrap();
    let store = home.open_store().unwrap();
    let path = dir.path().join("bundle.json");
    std::fs::write(
        &path,
        r#"{"resourceType": "Bundle", "type": "collection", "entry": [
  {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p", "gender": "male", "birthDate": "1950-02-03"}},
  {"fullUrl": "urn:uuid:e", "resource": {"resourceType": "Encounter", "id": "e", "class": {"code": "IMP"},
    "subject": {"reference": "urn:uuid:p"}, "period": {"start": "2020-05-01"}}},
  {"resource": {"resourceType": "Encounter", "id": "orphan", "class": {"code": "AMB"},
    "subject": {"reference": "Patient/nobody"}, "period": {"start": "2020-05-02"}}},
  {"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "urn:uuid:p"},
    "onsetDateTime": "2015-01-01",
    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]}}},
  {"resource": {"resourceType": "Condition", "id": "c2", "subject": {"reference": "urn:uuid:p"},
    "onsetDateTime": "2020-04-28",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "840539006"}]}}},
  {"resource": {"resourceType": "Observation", "id": "o1", "subject": {"reference": "urn:uuid:p"},
    "encounter": {"reference": "urn:uuid:e"},
    "code": {"coding": [{"system": "http://loinc.org", "code": "26881-3"}]},
    "valueQuantity": {"value": 12.5, "unit": "pg/mL"}}},
  {"resource": {"resourceType": "Observation", "id": "o2", "subject": {"reference": "urn:uuid:p"},
    "encounter": {"reference": "urn:uuid:e"},
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "valueQuantity": {"value": 80, "unit": "/min"}}}
]}"#,
    )
    .unwrap();
    let export = import::read_fhir(&[path.as_path()]).unwrap();
    let report = import::import(&store, &export, true, false).unwrap();
    let notes = report.notes.join("\n");
    assert!(notes.contains("patients: 1 read, 1 mapped"), "{notes}");
    assert!(
        notes.contains("encounters: 2 read, 1 mapped, 1 not mapped (no such patient)"),
        "{notes}"
    );
    assert!(
        notes.contains(
            "conditions: 2 read, 1 mapped, 1 not mapped (read by code system: http://hl7.org/fhir/sid/icd-10-cm 1, http://snomed.info/sct 1)"
        ),
        "{notes}"
    );
    assert!(
        notes.contains("observations: 2 read, 1 mapped, 1 not mapped"),
        "{notes}"
    );
    // The ICD-10 diabetes code is not read as diabetes (the mapping does not know it yet).
    let data = renkei_node::image::load(&store, Arc::new(store.schema().unwrap())).unwrap();
    assert_eq!(count(&data, "patients", flag("diabetes")), 0);
    assert_eq!(count(&data, "timepoints", il6_is(125)), 1);
}
