//! Hospital exports in other shapes, mapped onto the dataset schema: Synthea's CSV output
//! and FHIR R4 bundles (as Synthea and many hospital systems write them).
//!
//! Both are first read into one plain [`ClinicalExport`] (patients, encounters, conditions,
//! observations, medications; each row remembering where it came from, for errors), then
//! mapped once:
//!
//! - **Patient**: age at the reference date (death, else the latest encounter), sex from the
//!   administrative gender, `outcome = died` when a death date is known; comorbidity flags
//!   from SNOMED CT condition codes ([`COMORBIDITY_CODES`]). Names, addresses, national ids and
//!   every other column are never read.
//! - **Timepoint**: one per encounter, in date order. Care level from the encounter class;
//!   `days_since_onset` from the COVID-19 diagnosis (SNOMED 840539006) when there is one, and
//!   then severity from the encounter class (inpatient: severe, emergency: moderate, other:
//!   mild; death within 28 days of onset: critical at the last); drugs from medication names;
//!   labs from LOINC codes with unit conversion ([`LAB_CODES`]).
//! - **Consent**: exports carry none. `assume_consent` grants secondary use (for synthetic
//!   data only); without it the patients are stored but never counted until a consent file is
//!   loaded.
//!
//! The mapped records go through the same checks as CSV input (levels, bounds, digits) and
//! are written together in one transaction, or not at all.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use renkei_engine::schema::parse_day;
use serde_json::Value;

use crate::error::NodeError;
use crate::error::{IngestError, IngestErrors};
use crate::ingest::csv::{IngestReport, MAX_REPORTED_ERRORS, write_tables};
use crate::ingest::pseudonym::pseudonym;
use crate::ingest::pseudonym::pseudonym_secret;
use crate::store::NodeStore;
use crate::store::tables::{Table, TableWrites};
use renkei_engine::NULL;
use renkei_engine::schema::{Digits, SECONDARY_USE};

/// SNOMED CT codes that set each comorbidity flag.
pub const COMORBIDITY_CODES: &[(&str, &[&str])] = &[
    (
        "diabetes",
        &["44054006", "73211009", "46635009", "190331003", "190368000"],
    ),
    ("hypertension", &["59621000", "38341003", "1201005"]),
    (
        "chronic_lung_disease",
        &[
            "13645005",
            "185086009",
            "87433001",
            "195967001",
            "233678006",
            "10692761000119107",
        ],
    ),
    (
        "cardiovascular_disease",
        &[
            "53741008",
            "22298006",
            "49436004",
            "88805009",
            "414545008",
            "84114007",
            "399211009",
        ],
    ),
    (
        "kidney_disease",
        &[
            "431855005",
            "431856006",
            "433144002",
            "431857002",
            "46177005",
            "127013003",
        ],
    ),
    (
        "cancer",
        &[
            "254637007",
            "93761005",
            "254632001",
            "363406005",
            "109838007",
            "126906006",
            "92691004",
        ],
    ),
    ("obesity", &["162864005", "408512008", "414916001"]),
];

/// SNOMED CT code of COVID-19.
pub const COVID19_CODE: &str = "840539006";

/// A lab's LOINC code, its schema column, and (unit, factor) conversions into the schema's
/// unit.
pub type LabCode = (&'static str, &'static str, &'static [(&'static str, f64)]);

/// The labs mapped from LOINC-coded observations.
pub const LAB_CODES: &[LabCode] = &[
    ("1988-5", "crp", &[("mg/L", 0.1), ("mg/dL", 1.0)]),
    ("2532-0", "ldh", &[("U/L", 1.0)]),
    (
        "48065-7",
        "d_dimer",
        &[("ng/mL", 0.001), ("ug/mL", 1.0), ("mg/L", 1.0)],
    ),
    ("2276-4", "ferritin", &[("ng/mL", 1.0), ("ug/L", 1.0)]),
    (
        "731-0",
        "lymphocyte_count",
        &[("10*3/uL", 1000.0), ("/uL", 1.0)],
    ),
    ("26881-3", "il6", &[("pg/mL", 1.0)]),
];

/// Where an exported row came from (`observations.csv:12`, `bundle.json Observation/abc`).
pub type Origin = String;

#[derive(Debug, Clone)]
pub struct ExportPatient {
    pub id: String,
    /// Days since 1970-01-01.
    pub birth: i64,
    pub death: Option<i64>,
    pub gender: String,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct ExportEncounter {
    pub id: String,
    pub patient: String,
    pub start: i64,
    /// The day the encounter ended (Synthea's `STOP`, FHIR's `period.end`), if known.
    pub stop: Option<i64>,
    /// Synthea's lowercase class names (`inpatient`, `emergency`, `ambulatory`, …).
    pub class: String,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct ExportCondition {
    pub patient: String,
    pub start: i64,
    /// The code system as the export names it (`SNOMED CT`, `http://hl7.org/fhir/sid/icd-10`).
    pub system: String,
    pub code: String,
}

#[derive(Debug, Clone)]
pub struct ExportObservation {
    pub patient: String,
    pub encounter: Option<String>,
    pub system: String,
    pub code: String,
    pub value: Option<f64>,
    pub unit: String,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct ExportMedication {
    pub patient: String,
    pub encounter: Option<String>,
    pub description: String,
}

/// The drugs read from medication records, by a name their description contains.
const DRUGS: [&str; 7] = [
    "favipiravir",
    "nafamostat",
    "camostat",
    "tocilizumab",
    "remdesivir",
    "dexamethasone",
    "baricitinib",
];

impl ExportCondition {
    fn is_snomed(&self) -> bool {
        let system = self.system.to_ascii_lowercase();
        system.contains("snomed")
    }
}

impl ExportObservation {
    fn is_loinc(&self) -> bool {
        self.system.to_ascii_lowercase().contains("loinc")
    }
}

/// What an import used of an export, for its report.
#[derive(Debug, Default)]
struct ImportTally {
    encounters_mapped: usize,
    conditions_mapped: usize,
    observations_mapped: usize,
    medications_mapped: usize,
}

impl ImportTally {
    /// One line per kind of record: read, mapped onto the schema, not mapped (by code
    /// system where records carry one), so a hospital sees what was left out.
    fn notes(&self, export: &ClinicalExport) -> Vec<String> {
        let by_system = |systems: &mut dyn Iterator<Item = &str>, mapped: usize| {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for system in systems {
                *counts
                    .entry(if system.is_empty() {
                        "no system"
                    } else {
                        system
                    })
                    .or_default() += 1;
            }
            let read: usize = counts.values().sum();
            let listed: Vec<String> = counts
                .iter()
                .map(|(system, n)| format!("{system} {n}"))
                .collect();
            format!(
                "{read} read, {mapped} mapped, {} not mapped (read by code system: {})",
                read.saturating_sub(mapped),
                listed.join(", ")
            )
        };
        vec![
            format!(
                "patients: {} read, {} mapped",
                export.patients.len(),
                export.patients.len()
            ),
            format!(
                "encounters: {} read, {} mapped, {} not mapped (no such patient)",
                export.encounters.len(),
                self.encounters_mapped,
                export
                    .encounters
                    .len()
                    .saturating_sub(self.encounters_mapped)
            ),
            format!(
                "conditions: {}",
                by_system(
                    &mut export.conditions.iter().map(|c| c.system.as_str()),
                    self.conditions_mapped
                )
            ),
            format!(
                "observations: {}",
                by_system(
                    &mut export.observations.iter().map(|o| o.system.as_str()),
                    self.observations_mapped
                )
            ),
            format!(
                "medications: {} read, {} mapped, {} not mapped",
                export.medications.len(),
                self.medications_mapped,
                export
                    .medications
                    .len()
                    .saturating_sub(self.medications_mapped)
            ),
        ]
    }
}

/// A hospital export in plain rows.
#[derive(Debug, Clone, Default)]
pub struct ClinicalExport {
    pub patients: Vec<ExportPatient>,
    pub encounters: Vec<ExportEncounter>,
    pub conditions: Vec<ExportCondition>,
    pub observations: Vec<ExportObservation>,
    pub medications: Vec<ExportMedication>,
}

struct Problems {
    errors: Vec<IngestError>,
    more: usize,
}

impl Problems {
    fn new() -> Self {
        Self {
            errors: Vec::new(),
            more: 0,
        }
    }

    fn push(&mut self, origin: &str, column: Option<&str>, reason: impl Into<String>) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(IngestError {
                file: origin.to_string(),
                line: None,
                column: column.map(str::to_string),
                reason: reason.into(),
            });
        } else {
            self.more += 1;
        }
    }

    fn finish<T>(self, value: T) -> Result<T, IngestErrors> {
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

/// The patient's outcome days from COVID-19 onset, each kept only inside its column's
/// bounds: admission (the first inpatient stay from two weeks before onset), discharge (the
/// end of the last inpatient stay, if alive at it), death, and the end of follow-up (death,
/// else the last day any encounter shows the patient alive).
fn outcome_days(
    schema: &renkei_engine::DatasetSchema,
    onset: i64,
    death: Option<i64>,
    visits: &[&ExportEncounter],
    cells: &mut Cells,
) {
    let mut put = |column: &'static str, day: Option<i64>| {
        let Some(days) = day.map(|d| d - onset) else {
            return;
        };
        if let Some((_, def)) = schema.patient_column(column)
            && let renkei_engine::schema::ColumnType::Integer { min, max } = def.kind
            && (min..=max).contains(&days)
        {
            cells.insert(column, days.to_string());
        }
    };
    let stays: Vec<&ExportEncounter> = visits
        .iter()
        .copied()
        .filter(|v| v.class == "inpatient" && v.start >= onset - 14)
        .collect();
    put("admission_day", stays.first().map(|v| v.start));
    // The discharge from the COVID-19 stay: the last stay that began within the course's
    // first six weeks (a later, unrelated stay does not hide it).
    let discharge = stays
        .iter()
        .rfind(|v| v.start <= onset + 42)
        .and_then(|v| v.stop)
        .filter(|stop| death.is_none_or(|d| *stop < d));
    put("discharge_day", discharge);
    put("death_day", death);
    // Follow-up past the column's bounds is censored at its end, not dropped: a long
    // survivor must stay in the curve.
    let last_seen = visits
        .iter()
        .map(|v| v.stop.unwrap_or(v.start).max(v.start))
        .max();
    let followed = death.or(last_seen).map(|day| {
        if let Some((_, def)) = schema.patient_column("followup_day")
            && let renkei_engine::schema::ColumnType::Integer { max, .. } = def.kind
        {
            day.min(onset + max)
        } else {
            day
        }
    });
    put("followup_day", followed);
}

/// Reads Synthea's CSV output directory (`patients.csv`, `encounters.csv`, `conditions.csv`,
/// `observations.csv`, `medications.csv`; the last three may be absent).
pub fn read_synthea(dir: &Path) -> Result<ClinicalExport, IngestErrors> {
    let mut problems = Problems::new();
    let mut export = ClinicalExport::default();
    let table = |name: &str,
                 required: bool,
                 problems: &mut Problems|
     -> Vec<(String, HashMap<String, String>)> {
        let path = dir.join(name);
        if !path.exists() {
            if required {
                problems.push(&path.display().to_string(), None, "file is missing");
            }
            return Vec::new();
        }
        let mut reader = match csv::ReaderBuilder::new().from_path(&path) {
            Ok(reader) => reader,
            Err(e) => {
                problems.push(&path.display().to_string(), None, e.to_string());
                return Vec::new();
            }
        };
        let headers = match reader.headers() {
            Ok(h) => h.clone(),
            Err(e) => {
                problems.push(&path.display().to_string(), None, e.to_string());
                return Vec::new();
            }
        };
        let mut rows = Vec::new();
        for record in reader.records() {
            match record {
                Ok(record) => {
                    let origin = format!(
                        "{}:{}",
                        path.display(),
                        record.position().map_or(0, |p| p.line())
                    );
                    // Only the columns the mapping uses are kept; identifiers are not read.
                    let wanted = [
                        "Id",
                        "BIRTHDATE",
                        "DEATHDATE",
                        "GENDER",
                        "START",
                        "DATE",
                        "PATIENT",
                        "ENCOUNTER",
                        "ENCOUNTERCLASS",
                        "CODE",
                        "VALUE",
                        "UNITS",
                        "DESCRIPTION",
                    ];
                    let cells = headers
                        .iter()
                        .zip(record.iter())
                        .filter(|(h, _)| wanted.contains(h))
                        .map(|(h, v)| (h.to_string(), v.to_string()))
                        .collect();
                    rows.push((origin, cells));
                }
                Err(e) => problems.push(
                    &format!(
                        "{}:{}",
                        path.display(),
                        e.position().map_or(0, |p| p.line())
                    ),
                    None,
                    e.to_string(),
                ),
            }
        }
        rows
    };
    let get =
        |cells: &HashMap<String, String>, name: &str| cells.get(name).cloned().unwrap_or_default();
    for (origin, cells) in table("patients.csv", true, &mut problems) {
        let Some(birth) = parse_day(&get(&cells, "BIRTHDATE")) else {
            problems.push(&origin, Some("BIRTHDATE"), "not a date");
            continue;
        };
        let death_text = get(&cells, "DEATHDATE");
        export.patients.push(ExportPatient {
            id: get(&cells, "Id"),
            birth,
            death: parse_day(&death_text),
            gender: get(&cells, "GENDER"),
            origin,
        });
    }
    for (origin, cells) in table("encounters.csv", true, &mut problems) {
        let Some(start) = parse_day(&get(&cells, "START")) else {
            problems.push(&origin, Some("START"), "not a date");
            continue;
        };
        export.encounters.push(ExportEncounter {
            id: get(&cells, "Id"),
            patient: get(&cells, "PATIENT"),
            start,
            stop: parse_day(&get(&cells, "STOP")),
            class: get(&cells, "ENCOUNTERCLASS").to_ascii_lowercase(),
            origin,
        });
    }
    for (origin, cells) in table("conditions.csv", false, &mut problems) {
        let Some(start) = parse_day(&get(&cells, "START")) else {
            problems.push(&origin, Some("START"), "not a date");
            continue;
        };
        export.conditions.push(ExportCondition {
            patient: get(&cells, "PATIENT"),
            start,
            system: "SNOMED CT".into(),
            code: get(&cells, "CODE"),
        });
    }
    for (origin, cells) in table("observations.csv", false, &mut problems) {
        let encounter = get(&cells, "ENCOUNTER");
        export.observations.push(ExportObservation {
            patient: get(&cells, "PATIENT"),
            encounter: (!encounter.is_empty()).then_some(encounter),
            system: "LOINC".into(),
            code: get(&cells, "CODE"),
            value: get(&cells, "VALUE").parse().ok(),
            unit: get(&cells, "UNITS"),
            origin,
        });
    }
    for (_, cells) in table("medications.csv", false, &mut problems) {
        let encounter = get(&cells, "ENCOUNTER");
        export.medications.push(ExportMedication {
            patient: get(&cells, "PATIENT"),
            encounter: (!encounter.is_empty()).then_some(encounter),
            description: get(&cells, "DESCRIPTION"),
        });
    }
    problems.finish(export)
}

/// The id in a FHIR reference (`urn:uuid:ID`, `Patient/ID`).
/// The (system, code) of a concept's coding in the system whose URL contains
/// `system_part`, or else of its first coding (kept, to be reported as not mapped).
fn coding(concept: &Value, system_part: &str) -> Option<(String, String)> {
    let codings = concept.get("coding")?.as_array()?;
    let pair = |c: &Value| {
        Some((
            c.get("system")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            c.get("code")?.as_str()?.to_string(),
        ))
    };
    codings
        .iter()
        .find(|c| {
            c.get("system")
                .and_then(Value::as_str)
                .is_some_and(|s| s.contains(system_part))
        })
        .and_then(pair)
        .or_else(|| codings.iter().find_map(pair))
}

/// Maps FHIR encounter class codes to Synthea's class names.
fn fhir_class(code: &str) -> &'static str {
    match code.to_ascii_uppercase().as_str() {
        "IMP" | "ACUTE" | "NONAC" => "inpatient",
        "EMER" | "OBSENC" => "emergency",
        "HH" => "home",
        "VR" => "virtual",
        _ => "ambulatory",
    }
}

/// How a bundle's or an export's references find their resources: a reference to an entry's
/// `fullUrl` (`urn:uuid:…` in transaction bundles, or an absolute URL) names that entry's
/// resource; `Patient/x` (or `…/Patient/x`) names the resource with id `x`.
#[derive(Debug, Default)]
struct References {
    /// fullUrl → the id its resource is known by.
    full_urls: HashMap<String, String>,
}

impl References {
    /// The id of a resource known only by its `fullUrl` (a Patient without `id`).
    fn identity(&self, full_url: &str) -> String {
        self.full_urls
            .get(full_url)
            .cloned()
            .unwrap_or_else(|| last_segment(full_url).to_string())
    }

    /// The id a reference names.
    fn resolve(&self, reference: &str) -> String {
        match self.full_urls.get(reference) {
            Some(id) => id.clone(),
            None => last_segment(reference).to_string(),
        }
    }
}

/// `x` of `urn:uuid:x`, `Patient/x` or `https://…/Patient/x`.
fn last_segment(text: &str) -> &str {
    text.rsplit(['/', ':']).next().unwrap_or(text)
}

/// Reads FHIR R4 data: bundles (JSON: transaction, batch, collection, searchset, …) and
/// bulk-data exports (NDJSON, one resource per line, as `$export` writes; a directory is
/// read file by file, `*.ndjson` in name order). Patient, Encounter, Condition, Observation
/// and MedicationRequest resources are read; others are skipped. References resolve through
/// `fullUrl`, and a Patient without `id` is known by its `fullUrl`.
pub fn read_fhir(paths: &[&Path]) -> Result<ClinicalExport, IngestErrors> {
    let mut problems = Problems::new();
    let mut export = ClinicalExport::default();
    for path in paths {
        if path.is_dir() {
            let mut files: Vec<std::path::PathBuf> = match std::fs::read_dir(path) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
                    .collect(),
                Err(e) => {
                    problems.push(
                        &path.display().to_string(),
                        None,
                        format!("cannot be read: {e}"),
                    );
                    continue;
                }
            };
            files.sort();
            if files.is_empty() {
                problems.push(
                    &path.display().to_string(),
                    None,
                    "a directory without *.ndjson files (a FHIR bulk export has Patient.ndjson, Encounter.ndjson, …)",
                );
            }
            for file in files {
                read_ndjson(&file, &mut export, &mut problems);
            }
        } else if path.extension().is_some_and(|e| e == "ndjson") {
            read_ndjson(path, &mut export, &mut problems);
        } else {
            read_bundle(path, &mut export, &mut problems);
        }
    }
    problems.finish(export)
}

/// One NDJSON file: each non-blank line one resource, read as a stream.
fn read_ndjson(path: &Path, export: &mut ClinicalExport, problems: &mut Problems) {
    use std::io::BufRead;
    let shown = path.display().to_string();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => {
            problems.push(&shown, None, format!("cannot be read: {e}"));
            return;
        }
    };
    let references = References::default();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = format!("{shown}:{}", number + 1);
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                problems.push(&at, None, format!("cannot be read: {e}"));
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(resource) => read_resource(&resource, None, &at, &references, export, problems),
            Err(e) => problems.push(&at, None, format!("not a JSON FHIR resource: {e}")),
        }
    }
}

/// One JSON bundle.
fn read_bundle(path: &Path, export: &mut ClinicalExport, problems: &mut Problems) {
    let shown = path.display().to_string();
    let bundle: Value = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(value) => value,
        Err(reason) => {
            problems.push(
                &shown,
                None,
                format!("not a JSON FHIR bundle (for a bulk export, give its *.ndjson files or their directory): {reason}"),
            );
            return;
        }
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        problems.push(&shown, Some("resourceType"), "not a FHIR Bundle");
        return;
    }
    let entries: &[Value] = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    // Every entry's fullUrl first: references may point forward.
    let mut references = References::default();
    for entry in entries {
        if let Some(url) = entry.get("fullUrl").and_then(Value::as_str) {
            let id = entry
                .get("resource")
                .and_then(|r| r.get("id"))
                .and_then(Value::as_str)
                .unwrap_or_else(|| last_segment(url));
            references.full_urls.insert(url.to_string(), id.to_string());
        }
    }
    for entry in entries {
        let Some(resource) = entry.get("resource") else {
            continue;
        };
        let full_url = entry.get("fullUrl").and_then(Value::as_str);
        read_resource(resource, full_url, &shown, &references, export, problems);
    }
}

/// One resource of a bundle or an export.
fn read_resource(
    resource: &Value,
    full_url: Option<&str>,
    shown: &str,
    references: &References,
    export: &mut ClinicalExport,
    problems: &mut Problems,
) {
    let kind = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| full_url.map(|url| references.identity(url)))
        .unwrap_or_default();
    let origin = format!("{shown} {kind}/{id}");
    let reference = |field: &str| {
        resource
            .get(field)
            .and_then(|r| r.get("reference"))
            .and_then(Value::as_str)
            .map(|r| references.resolve(r))
    };
    let subject = reference("subject").unwrap_or_default();
    let encounter = reference("encounter");
    let text = |field: &str| resource.get(field).and_then(Value::as_str).unwrap_or("");
    match kind {
        "Patient" => match parse_day(text("birthDate")) {
            Some(birth) => export.patients.push(ExportPatient {
                id,
                birth,
                death: parse_day(text("deceasedDateTime")),
                gender: match text("gender") {
                    "female" => "F".into(),
                    "male" => "M".into(),
                    other => other.into(),
                },
                origin,
            }),
            None => problems.push(&origin, Some("birthDate"), "missing or not a date"),
        },
        "Encounter" => {
            let start = resource
                .get("period")
                .and_then(|p| p.get("start"))
                .and_then(Value::as_str)
                .and_then(parse_day);
            let stop = resource
                .get("period")
                .and_then(|p| p.get("end"))
                .and_then(Value::as_str)
                .and_then(parse_day);
            let class = resource
                .get("class")
                .and_then(|c| {
                    c.get("code")
                        .or_else(|| c.get(0).and_then(|c| c.get("code")))
                })
                .and_then(Value::as_str)
                .unwrap_or("AMB");
            match start {
                Some(start) => export.encounters.push(ExportEncounter {
                    id,
                    patient: subject,
                    start,
                    stop,
                    class: fhir_class(class).to_string(),
                    origin,
                }),
                None => problems.push(&origin, Some("period.start"), "missing or not a date"),
            }
        }
        "Condition" => {
            let start =
                parse_day(text("onsetDateTime")).or_else(|| parse_day(text("recordedDate")));
            if let (Some(start), Some((system, code))) = (
                start,
                resource.get("code").and_then(|c| coding(c, "snomed")),
            ) {
                export.conditions.push(ExportCondition {
                    patient: subject,
                    start,
                    system,
                    code,
                });
            }
        }
        "Observation" => {
            let Some((system, code)) = resource.get("code").and_then(|c| coding(c, "loinc")) else {
                return;
            };
            let quantity = resource.get("valueQuantity");
            export.observations.push(ExportObservation {
                patient: subject,
                encounter,
                system,
                code,
                value: quantity
                    .and_then(|q| q.get("value"))
                    .and_then(Value::as_f64),
                unit: quantity
                    .and_then(|q| q.get("unit").or_else(|| q.get("code")))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                origin,
            });
        }
        "MedicationRequest" => {
            let concept = resource.get("medicationCodeableConcept");
            let description = concept
                .and_then(|c| {
                    c.get("text")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .or_else(|| {
                            c.get("coding")?
                                .as_array()?
                                .iter()
                                .find_map(|c| c.get("display")?.as_str().map(str::to_string))
                        })
                })
                .unwrap_or_default();
            export.medications.push(ExportMedication {
                patient: subject,
                encounter,
                description,
            });
        }
        _ => {}
    }
}

/// A patient's and its timepoints' values, by column name, before they are encoded.
type Cells = BTreeMap<&'static str, String>;

/// Maps an export onto the schema and writes it; everything or nothing.
pub fn import(
    store: &NodeStore,
    export: &ClinicalExport,
    assume_consent: bool,
    dry_run: bool,
) -> Result<IngestReport, NodeError> {
    let schema = store.schema()?;
    let secret = pseudonym_secret(store)?;
    let mut problems = Problems::new();
    let mut encounters: HashMap<&str, Vec<&ExportEncounter>> = HashMap::new();
    for encounter in &export.encounters {
        encounters
            .entry(encounter.patient.as_str())
            .or_default()
            .push(encounter);
    }
    let mut conditions: HashMap<&str, Vec<&ExportCondition>> = HashMap::new();
    for condition in &export.conditions {
        conditions
            .entry(condition.patient.as_str())
            .or_default()
            .push(condition);
    }
    let mut by_encounter: HashMap<&str, (Vec<&ExportObservation>, Vec<&ExportMedication>)> =
        HashMap::new();
    for observation in &export.observations {
        if let Some(e) = &observation.encounter {
            by_encounter
                .entry(e.as_str())
                .or_default()
                .0
                .push(observation);
        }
    }
    for medication in &export.medications {
        if let Some(e) = &medication.encounter {
            by_encounter
                .entry(e.as_str())
                .or_default()
                .1
                .push(medication);
        }
    }
    let mut tally = ImportTally::default();
    let mut patient_rows = Vec::new();
    let mut timepoint_rows = Vec::new();
    for patient in &export.patients {
        let mut visits = encounters
            .get(patient.id.as_str())
            .cloned()
            .unwrap_or_default();
        visits.sort_by_key(|e| (e.start, e.id.clone()));
        let reference = patient
            .death
            .or_else(|| visits.last().map(|e| e.start))
            .unwrap_or(patient.birth);
        let mut cells = Cells::new();
        cells.insert(
            "age",
            ((reference - patient.birth).max(0) * 400 / 146_097).to_string(),
        );
        cells.insert(
            "sex",
            match patient.gender.as_str() {
                "F" => "female",
                "M" => "male",
                _ => "other",
            }
            .to_string(),
        );
        if patient.death.is_some() {
            cells.insert("outcome", "died".into());
        }
        let diagnoses = conditions
            .get(patient.id.as_str())
            .cloned()
            .unwrap_or_default();
        for (column, codes) in COMORBIDITY_CODES {
            let has = diagnoses
                .iter()
                .any(|c| c.is_snomed() && codes.contains(&c.code.as_str()));
            cells.insert(column, has.to_string());
        }
        for condition in &diagnoses {
            if condition.is_snomed()
                && (condition.code == COVID19_CODE
                    || COMORBIDITY_CODES
                        .iter()
                        .any(|(_, codes)| codes.contains(&condition.code.as_str())))
            {
                tally.conditions_mapped += 1;
            }
        }
        tally.encounters_mapped += visits.len();
        let onset = diagnoses
            .iter()
            .filter(|c| c.is_snomed() && c.code == COVID19_CODE)
            .map(|c| c.start)
            .min();
        if let Some(onset) = onset {
            outcome_days(&schema, onset, patient.death, &visits, &mut cells);
        }
        let mut worst: Option<usize> = None;
        let levels = ["mild", "moderate", "severe", "critical"];
        for (number, visit) in visits.iter().enumerate().take(usize::from(u16::MAX)) {
            let mut t = Cells::new();
            let hospital = matches!(
                visit.class.as_str(),
                "inpatient" | "emergency" | "urgentcare"
            );
            t.insert(
                "care_level",
                if hospital {
                    "hospitalized"
                } else {
                    "outpatient"
                }
                .into(),
            );
            if visit.class == "inpatient" {
                t.insert("days_since_admission", "0".into());
            }
            if let Some(onset) = onset {
                let days = visit.start - onset;
                // Encounters far outside the disease course keep no onset-relative day.
                if let Some((_, def)) = schema.timepoint_column("days_since_onset")
                    && let renkei_engine::schema::ColumnType::Integer { min, max } = def.kind
                    && (min..=max).contains(&days)
                {
                    t.insert("days_since_onset", days.to_string());
                }
                if days >= 0 {
                    let mut level = match visit.class.as_str() {
                        "inpatient" => 2,
                        "emergency" | "urgentcare" => 1,
                        _ => 0,
                    };
                    let last = number + 1 == visits.len();
                    if last && patient.death.is_some_and(|d| d - onset <= 28) {
                        level = 3;
                    }
                    t.insert("severity", levels[level].into());
                    worst = Some(worst.map_or(level, |w| w.max(level)));
                }
            }
            let (observations, medications) = by_encounter
                .get(visit.id.as_str())
                .cloned()
                .unwrap_or_default();
            for (code, column, units) in LAB_CODES {
                let Some(observation) = observations
                    .iter()
                    .rev()
                    .find(|o| o.is_loinc() && o.code == *code)
                else {
                    continue;
                };
                let Some(value) = observation.value else {
                    continue;
                };
                match units
                    .iter()
                    .find(|(unit, _)| unit.eq_ignore_ascii_case(&observation.unit))
                {
                    Some((_, factor)) => {
                        t.insert(column, format!("{:.4}", value * factor));
                        tally.observations_mapped += 1;
                    }
                    None => problems.push(
                        &observation.origin,
                        Some(column),
                        format!(
                            "unit `{}` of LOINC {code} is not one of: {}",
                            observation.unit,
                            units.iter().map(|(u, _)| *u).collect::<Vec<_>>().join(", ")
                        ),
                    ),
                }
            }
            for drug in DRUGS {
                if schema.timepoint_column(drug).is_some() {
                    let given = medications
                        .iter()
                        .any(|m| m.description.to_ascii_lowercase().contains(drug));
                    t.insert(drug, given.to_string());
                }
            }
            tally.medications_mapped += medications
                .iter()
                .filter(|m| {
                    let name = m.description.to_ascii_lowercase();
                    DRUGS
                        .iter()
                        .any(|drug| schema.timepoint_column(drug).is_some() && name.contains(drug))
                })
                .count();
            timepoint_rows.push((patient, number as u16, visit.origin.clone(), t));
        }
        if let Some(worst) = worst {
            cells.insert("severity", levels[worst].into());
        }
        patient_rows.push((patient, cells));
    }
    // Encode through the schema, as CSV cells are; exporters write measurements with more
    // digits than a schema keeps, so an import rounds them (half away from zero) and its
    // report says how many it rounded.
    let mut rounded = 0usize;
    let mut encode = |defs: &[renkei_engine::schema::ColumnDef],
                      cells: &Cells,
                      origin: &str,
                      problems: &mut Problems| {
        let mut values = vec![NULL; defs.len()];
        for (name, text) in cells {
            let Some(position) = defs.iter().position(|d| d.name == *name) else {
                continue; // a column this schema does not have
            };
            match defs[position].parse_cell_with(text, Digits::Round) {
                Ok((value, was_rounded)) => {
                    values[position] = value.unwrap_or(NULL);
                    rounded += usize::from(was_rounded);
                }
                Err(e) => problems.push(origin, Some(name), e.0),
            }
        }
        values
    };
    let patient_width = schema.patients.len();
    let scopes = vec![SECONDARY_USE.to_string()];
    // Consents given before are kept: the export carries none.
    let grant = u64::from(assume_consent);
    let mut patients = TableWrites::new(
        Table::Patients,
        patient_width,
        (0..patient_width).collect(),
        scopes,
    );
    for (origin, (patient, cells)) in patient_rows.iter().enumerate() {
        let values = encode(&schema.patients, cells, &patient.origin, &mut problems);
        patients.push(
            pseudonym(&secret, &patient.id)?,
            0,
            &values,
            (grant, 0),
            origin as u64,
        );
    }
    let timepoint_width = schema.timepoints.len();
    let mut timepoints = TableWrites::new(
        Table::Timepoints,
        timepoint_width,
        (0..timepoint_width).collect(),
        Vec::new(),
    );
    for (origin, (patient, number, visit, cells)) in timepoint_rows.iter().enumerate() {
        let values = encode(&schema.timepoints, cells, visit, &mut problems);
        timepoints.push(
            pseudonym(&secret, &patient.id)?,
            *number,
            &values,
            (0, 0),
            origin as u64,
        );
    }
    problems.finish(())?;
    // A patient in two bundles: the later one wins, as when loaded one after the other.
    patients.prepare_last_wins();
    timepoints.prepare_last_wins();
    // Patients and their timepoints, in one atomic write.
    let merged = write_tables(store, &[&patients, &timepoints], Vec::new(), dry_run)?;
    let notes = tally.notes(export);
    Ok(IngestReport {
        rows: patients.len() + timepoints.len(),
        added: merged.added,
        updated: merged.updated,
        consented: if assume_consent { patients.len() } else { 0 },
        dry_run,
        rounded,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_classes_map() {
        let references = References::default();
        assert_eq!(references.resolve("urn:uuid:abc-123"), "abc-123");
        assert_eq!(references.resolve("Patient/p7"), "p7");
        // Through a fullUrl, to the id its resource has.
        let mut references = References::default();
        references
            .full_urls
            .insert("urn:uuid:abc-123".into(), "pat-9".into());
        assert_eq!(references.resolve("urn:uuid:abc-123"), "pat-9");
        assert_eq!(references.identity("urn:uuid:abc-123"), "pat-9");
        assert_eq!(fhir_class("IMP"), "inpatient");
        assert_eq!(fhir_class("EMER"), "emergency");
    }
}
