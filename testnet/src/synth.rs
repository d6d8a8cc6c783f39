//! Synthetic hospital data in every format a hospital would load, with plausible COVID-19
//! correlations, deterministic under a seed, and an independent evaluator that knows each
//! query's true answer.
//!
//! Patients: age follows a broad adult-skewed mix; comorbidities grow more common with age;
//! the worst severity over the course grows with age and the number of comorbidities; about
//! one patient in twelve has not consented to secondary use, and of those who have, about
//! one in four has not consented to genome use. Each patient has one to four timepoints
//! whose severity never exceeds the worst; care level, drugs and labs follow it (IL-6, CRP,
//! LDH, D-dimer and ferritin higher and lymphocytes lower when severe); antibodies rise with
//! days since onset; some lab values are missing. The first patients of each hospital have
//! full data: a small synthetic CT (DICOM) and FASTQ reads (viral genome, host genome,
//! RNA-seq, immune repertoire) at their timepoints.
//!
//! [`true_count`] evaluates a query directly on these records with SQL's three-valued logic
//! (not through the node's engine), so tests compare the network's answer against a separate
//! implementation.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use renkei_protocol::{Filter, Literal, Query};

pub const SEXES: &[&str] = &["female", "male", "other"];
pub const SEVERITIES: &[&str] = &["mild", "moderate", "severe", "critical"];
pub const CARE_LEVELS: &[&str] = &[
    "outpatient",
    "hospitalized",
    "oxygen",
    "icu_ventilation",
    "ecmo",
];
pub const OUTCOMES: &[&str] = &["recovered", "died", "ongoing"];
pub const COMORBIDITIES: &[&str] = &[
    "diabetes",
    "hypertension",
    "chronic_lung_disease",
    "cardiovascular_disease",
    "kidney_disease",
    "cancer",
    "obesity",
    "admission_day",
    "discharge_day",
    "death_day",
    "followup_day",
];
pub const DRUGS: &[&str] = &[
    "favipiravir",
    "nafamostat",
    "camostat",
    "tocilizumab",
    "remdesivir",
    "dexamethasone",
    "baricitinib",
];
/// Information kinds and whether they are FASTQ (else DICOM).
pub const ITEM_KINDS: &[(&str, bool)] = &[
    ("ct", false),
    ("viral_genome", true),
    ("host_genome", true),
    ("rna_seq", true),
    ("immune_repertoire", true),
];

/// Each patient's timepoint and item rows count up to this (the schema's bound).
pub const MAX_ROWS_PER_PATIENT: usize = 8;

/// A value as the hospital exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Int(i64),
    /// `digits / 10^scale`.
    Fixed(i64, u8),
    Text(&'static str),
    Bool(bool),
}

impl Cell {
    fn csv(self) -> String {
        match self {
            Cell::Int(n) => n.to_string(),
            Cell::Fixed(digits, scale) => renkei_protocol::Decimal { digits, scale }.to_string(),
            Cell::Text(t) => t.to_string(),
            Cell::Bool(b) => if b { "yes" } else { "no" }.to_string(),
        }
    }
}

/// One information item (a file) at a timepoint.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticItem {
    pub kind: &'static str,
    /// The summary values the file has, by column name.
    pub cells: Vec<(&'static str, Cell)>,
}

/// One patient at one timepoint.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticTimepoint {
    pub number: u16,
    /// Timepoint columns by name; a missing column is a missing value.
    pub cells: Vec<(&'static str, Cell)>,
    pub items: Vec<SyntheticItem>,
}

/// One synthetic patient, as the hospital would export it.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticPatient {
    pub patient_id: String,
    /// Patient columns by name.
    pub cells: Vec<(&'static str, Cell)>,
    pub consent_secondary_use: bool,
    pub consent_genome: bool,
    pub timepoints: Vec<SyntheticTimepoint>,
}

impl SyntheticPatient {
    fn get(&self, name: &str) -> Option<Cell> {
        lookup(&self.cells, name)
    }

    /// The patient's age.
    pub fn age(&self) -> i64 {
        match self.get("age") {
            Some(Cell::Int(age)) => age,
            _ => 0,
        }
    }
}

fn lookup(cells: &[(&'static str, Cell)], name: &str) -> Option<Cell> {
    cells.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Base prevalence of each comorbidity at age 50, and its growth per decade.
const PREVALENCE: [(f64, f64); 7] = [
    (0.12, 0.04),
    (0.25, 0.08),
    (0.06, 0.02),
    (0.08, 0.04),
    (0.05, 0.02),
    (0.04, 0.02),
    (0.20, 0.00),
];

fn fixed(rng: &mut ChaCha8Rng, low: f64, high: f64, scale: u8) -> Cell {
    let value = rng.gen_range(low..high);
    Cell::Fixed((value * 10f64.powi(i32::from(scale))).round() as i64, scale)
}

/// Generates `count` patients of hospital `hospital`, the first `full_data` of them with
/// information items; the same inputs give the same output.
pub fn generate(
    hospital: usize,
    count: usize,
    full_data: usize,
    seed: u64,
) -> Vec<SyntheticPatient> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (hospital as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..count)
        .map(|i| patient(&mut rng, hospital, i, i < full_data))
        .collect()
}

fn patient(rng: &mut ChaCha8Rng, hospital: usize, i: usize, full_data: bool) -> SyntheticPatient {
    let age: i64 = if rng.gen_bool(0.15) {
        rng.gen_range(0..20)
    } else {
        rng.gen_range(20..96)
    };
    let decades_over_50 = (age as f64 - 50.0) / 10.0;
    let mut cells: Vec<(&'static str, Cell)> = vec![("age", Cell::Int(age))];
    let mut burden = 0.0;
    let mut comorbid = Vec::new();
    for (name, (base, growth)) in COMORBIDITIES.iter().zip(PREVALENCE) {
        let has = rng.gen_bool((base + growth * decades_over_50).clamp(0.005, 0.9));
        burden += f64::from(u8::from(has));
        comorbid.push((*name, Cell::Bool(has)));
    }
    // A latent risk score: older and more comorbid patients fare worse.
    let risk = 0.035 * age as f64 + 0.45 * burden + rng.gen_range(-1.2..1.2);
    let worst = match risk {
        r if r < 1.6 => 0,
        r if r < 2.6 => 1,
        r if r < 3.6 => 2,
        _ => 3,
    };
    let sex = match rng.gen_range(0..100) {
        0..49 => SEXES[0],
        49..99 => SEXES[1],
        _ => SEXES[2],
    };
    cells.push(("sex", Cell::Text(sex)));
    cells.push(("severity", Cell::Text(SEVERITIES[worst])));
    let consent_secondary_use = rng.gen_bool(0.92);
    let consent_genome = consent_secondary_use && rng.gen_bool(0.75);

    let visits = 1 + worst + usize::from(rng.gen_bool(0.3));
    let visits = visits.min(4);
    let mut days = rng.gen_range(1..4i64);
    let admitted_on = (worst > 0).then(|| days + rng.gen_range(0..3));
    let mut timepoints = Vec::with_capacity(visits);
    for number in 0..visits {
        // Severity climbs to the worst, then eases.
        let level = if number + 1 >= visits {
            worst.saturating_sub(usize::from(visits > 2))
        } else {
            worst.min(number + usize::from(worst > 0))
        };
        let care = match level {
            0 => usize::from(rng.gen_bool(0.2)),
            1 => rng.gen_range(1..3),
            2 => rng.gen_range(2..4),
            _ => rng.gen_range(3..5),
        };
        let mut t: Vec<(&'static str, Cell)> = vec![
            ("days_since_onset", Cell::Int(days)),
            ("care_level", Cell::Text(CARE_LEVELS[care])),
            ("severity", Cell::Text(SEVERITIES[level])),
        ];
        if let Some(admitted) = admitted_on
            && care > 0
        {
            t.push(("days_since_admission", Cell::Int((days - admitted).max(0))));
        }
        let chances = [
            [0.05, 0.02, 0.02, 0.0, 0.02, 0.0, 0.0],
            [0.3, 0.05, 0.05, 0.0, 0.4, 0.2, 0.0],
            [0.3, 0.1, 0.05, 0.15, 0.5, 0.8, 0.2],
            [0.2, 0.1, 0.05, 0.5, 0.5, 0.9, 0.3],
        ][level];
        for (drug, p) in DRUGS.iter().zip(chances) {
            t.push((drug, Cell::Bool(rng.gen_bool(p))));
        }
        // About one lab value in ten is missing.
        let mut lab = |rng: &mut ChaCha8Rng, name: &'static str, cell: Cell| {
            if rng.gen_bool(0.9) {
                t.push((name, cell));
            }
        };
        let (crp, il6, ldh, ddimer, ferritin, lymph) = match level {
            0 => (
                (0.05, 1.0),
                (2.0, 20.0),
                (150.0, 250.0),
                (0.2, 1.0),
                (30.0, 300.0),
                (1200.0, 3000.0),
            ),
            1 => (
                (1.0, 5.0),
                (15.0, 60.0),
                (200.0, 350.0),
                (0.5, 2.0),
                (200.0, 800.0),
                (900.0, 2000.0),
            ),
            2 => (
                (5.0, 15.0),
                (40.0, 200.0),
                (300.0, 600.0),
                (1.0, 5.0),
                (500.0, 2000.0),
                (500.0, 1200.0),
            ),
            _ => (
                (10.0, 30.0),
                (100.0, 800.0),
                (500.0, 1500.0),
                (3.0, 20.0),
                (1000.0, 6000.0),
                (200.0, 800.0),
            ),
        };
        let cell = fixed(rng, crp.0, crp.1, 2);
        lab(rng, "crp", cell);
        let cell = fixed(rng, il6.0, il6.1, 1);
        lab(rng, "il6", cell);
        let cell = fixed(rng, ldh.0, ldh.1, 0);
        lab(rng, "ldh", cell);
        let cell = fixed(rng, ddimer.0, ddimer.1, 2);
        lab(rng, "d_dimer", cell);
        let cell = fixed(rng, ferritin.0, ferritin.1, 0);
        lab(rng, "ferritin", cell);
        let cell = fixed(rng, lymph.0, lymph.1, 0);
        lab(rng, "lymphocyte_count", cell);
        let il10 = fixed(
            rng,
            1.0 + 10.0 * level as f64,
            10.0 + 30.0 * level as f64,
            1,
        );
        lab(rng, "il10", il10);
        let tnf = fixed(rng, 2.0, 10.0 + 15.0 * level as f64, 1);
        lab(rng, "tnf_alpha", tnf);
        let ifn = fixed(rng, 1.0, 5.0 + 20.0 * level as f64, 1);
        lab(rng, "ifn_gamma", ifn);
        // Antibodies rise after the first week.
        let rise = ((days - 5) as f64 / 10.0).clamp(0.0, 1.0);
        let cell = fixed(rng, rise * 50.0, 1.0 + rise * 400.0, 1);
        lab(rng, "igg", cell);
        let cell = fixed(rng, rise * 20.0, 1.0 + rise * 150.0, 1);
        lab(rng, "igm", cell);
        let titer = [10, 20, 40, 80, 160, 320, 640][(rise * 6.0).round() as usize];
        lab(rng, "neutralizing_titer", Cell::Int(titer));

        let mut items = Vec::new();
        if full_data {
            for (kind, fastq) in ITEM_KINDS {
                // The CT at the first timepoint and at the worst; reads at every timepoint.
                if *fastq || number == 0 || level == worst {
                    items.push(SyntheticItem {
                        kind,
                        cells: Vec::new(),
                    });
                }
            }
        }
        timepoints.push(SyntheticTimepoint {
            number: number as u16,
            cells: t,
            items,
        });
        days += rng.gen_range(3..6);
    }
    // The outcome, after the course: older, comorbid patients (a higher `worst`) die more
    // often, and dexamethasone in severe and critical disease lowers the risk (as in the
    // RECOVERY trial). The last timepoint's day is `days` less its last step.
    let last_day = lookup(&timepoints[visits - 1].cells, "days_since_onset")
        .and_then(|c| match c {
            Cell::Int(day) => Some(day),
            _ => None,
        })
        .unwrap_or(days);
    let dexamethasone = timepoints
        .iter()
        .any(|t| lookup(&t.cells, "dexamethasone") == Some(Cell::Bool(true)));
    let treated = if dexamethasone && worst >= 2 {
        0.6
    } else {
        1.0
    };
    let died = [0.0, 0.005, 0.06, 0.3][worst] * treated;
    let (outcome, death_day, discharge_day, followup_day) = if rng.gen_bool(died) {
        let death = last_day + rng.gen_range(0..6);
        (OUTCOMES[1], Some(death), None, death)
    } else if rng.gen_bool(0.05) {
        (OUTCOMES[2], None, None, last_day)
    } else {
        let discharge = admitted_on.map(|_| last_day + rng.gen_range(1..6));
        let followup = (discharge.unwrap_or(last_day) + rng.gen_range(0..40)).min(90);
        (OUTCOMES[0], None, discharge, followup)
    };
    cells.push(("outcome", Cell::Text(outcome)));
    cells.extend(comorbid);
    let days_cell = |day: Option<i64>| day.map(Cell::Int);
    for (name, day) in [
        ("admission_day", days_cell(admitted_on)),
        ("discharge_day", days_cell(discharge_day)),
        ("death_day", days_cell(death_day)),
        ("followup_day", Some(Cell::Int(followup_day))),
    ] {
        if let Some(day) = day {
            cells.push((name, day));
        }
    }
    SyntheticPatient {
        patient_id: format!("H{hospital}-{i:07}"),
        cells,
        consent_secondary_use,
        consent_genome,
        timepoints,
    }
}

/// Files written for one hospital.
#[derive(Debug, Clone)]
pub struct HospitalFiles {
    pub patients: PathBuf,
    /// Course, labs, antibodies, cytokines: one file each, as hospitals export them.
    pub timepoints: Vec<PathBuf>,
    /// The items' manifest, if any patient has full data.
    pub manifest: Option<PathBuf>,
}

const PATIENT_COLUMNS: &[&str] = &[
    "age",
    "sex",
    "severity",
    "outcome",
    "diabetes",
    "hypertension",
    "chronic_lung_disease",
    "cardiovascular_disease",
    "kidney_disease",
    "cancer",
    "obesity",
    "admission_day",
    "discharge_day",
    "death_day",
    "followup_day",
];

/// The timepoint tables a hospital exports (file stem, columns), one CSV each.
pub(crate) const TIMEPOINT_TABLES: &[(&str, &[&str])] = &[
    (
        "course",
        &[
            "days_since_onset",
            "days_since_admission",
            "care_level",
            "severity",
            "favipiravir",
            "nafamostat",
            "camostat",
            "tocilizumab",
            "remdesivir",
            "dexamethasone",
            "baricitinib",
        ],
    ),
    (
        "labs",
        &["crp", "ldh", "d_dimer", "ferritin", "lymphocyte_count"],
    ),
    ("antibodies", &["igg", "igm", "neutralizing_titer"]),
    ("cytokines", &["il6", "il10", "tnf_alpha", "ifn_gamma"]),
];

fn csv_file(path: &Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    Ok(std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// Writes a hospital's export into `dir`: patient and timepoint CSVs, and for patients with
/// full data, DICOM and FASTQ files with their manifest. Fills in the items' summaries.
pub fn write_hospital(
    dir: &Path,
    patients: &mut [SyntheticPatient],
    seed: u64,
) -> anyhow::Result<HospitalFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = HospitalFiles {
        patients: dir.join("patients.csv"),
        timepoints: TIMEPOINT_TABLES
            .iter()
            .map(|(name, _)| dir.join(format!("{name}.csv")))
            .collect(),
        manifest: patients
            .iter()
            .any(|p| p.timepoints.iter().any(|t| !t.items.is_empty()))
            .then(|| dir.join("manifest.csv")),
    };
    let mut out = csv_file(&files.patients)?;
    writeln!(
        out,
        "patient_id,{},consent_secondary_use,consent_genome",
        PATIENT_COLUMNS.join(",")
    )?;
    for p in patients.iter() {
        let cells: Vec<String> = PATIENT_COLUMNS
            .iter()
            .map(|c| p.get(c).map(Cell::csv).unwrap_or_default())
            .collect();
        writeln!(
            out,
            "{},{},{},{}",
            p.patient_id,
            cells.join(","),
            p.consent_secondary_use,
            p.consent_genome
        )?;
    }
    out.flush()?;
    for ((_, columns), path) in TIMEPOINT_TABLES.iter().zip(&files.timepoints) {
        let mut out = csv_file(path)?;
        writeln!(out, "patient_id,timepoint,{}", columns.join(","))?;
        for p in patients.iter() {
            for t in &p.timepoints {
                let cells: Vec<String> = columns
                    .iter()
                    .map(|c| lookup(&t.cells, c).map(Cell::csv).unwrap_or_default())
                    .collect();
                writeln!(out, "{},{},{}", p.patient_id, t.number, cells.join(","))?;
            }
        }
        out.flush()?;
    }
    if let Some(manifest) = &files.manifest {
        let items_dir = dir.join("items");
        std::fs::create_dir_all(&items_dir)?;
        let mut out = csv_file(manifest)?;
        writeln!(out, "path,patient_id,timepoint,kind")?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD1C0_F457);
        for p in patients.iter_mut() {
            for t in &mut p.timepoints {
                for item in &mut t.items {
                    let stem = format!("{}-t{}-{}", p.patient_id, t.number, item.kind);
                    let is_fastq = ITEM_KINDS.iter().any(|(k, f)| *k == item.kind && *f);
                    let name = if is_fastq {
                        item.cells =
                            write_fastq(&items_dir.join(format!("{stem}.fastq")), &mut rng)?;
                        format!("items/{stem}.fastq")
                    } else {
                        item.cells = write_dicom(&items_dir.join(format!("{stem}.dcm")), &stem)?;
                        format!("items/{stem}.dcm")
                    };
                    writeln!(out, "{name},{},{},{}", p.patient_id, t.number, item.kind)?;
                }
            }
        }
        out.flush()?;
    }
    Ok(files)
}

/// A small synthetic CT slice (16 × 16), with a synthetic patient name that must never be
/// stored by the node.
fn write_dicom(path: &Path, stem: &str) -> anyhow::Result<Vec<(&'static str, Cell)>> {
    let instance = format!("2.25.{}", u128::from_be_bytes(sha_prefix(stem.as_bytes()),));
    let pixels: Vec<u16> = (0..256u16).map(|i| (i * 7) % 4096).collect();
    let object = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, instance.as_str()),
        DataElement::new(tags::PATIENT_NAME, VR::PN, "SYNTHETIC^PATIENT"),
        DataElement::new(tags::PATIENT_ID, VR::LO, stem),
        DataElement::new(tags::STUDY_DATE, VR::DA, "20200415"),
        DataElement::new(tags::MODALITY, VR::CS, "CT"),
        DataElement::new(tags::MANUFACTURER, VR::LO, "renkei synthetic"),
        DataElement::new(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
        DataElement::new(tags::SLICE_THICKNESS, VR::DS, "5.0"),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16)),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
    ]);
    let file = object
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| anyhow::anyhow!("building DICOM meta: {e}"))?;
    file.write_to_file(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(vec![
        ("modality", Cell::Text("CT")),
        ("rows", Cell::Int(16)),
        ("columns", Cell::Int(16)),
        ("frames", Cell::Int(1)),
        ("slice_thickness", Cell::Fixed(500, 2)),
    ])
}

fn sha_prefix(bytes: &[u8]) -> [u8; 16] {
    // FNV-1a, twice: a stable id for a file name, nothing secret.
    let mut out = [0u8; 16];
    for (half, chunk) in out.chunks_mut(8).enumerate() {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ half as u64;
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        chunk.copy_from_slice(&hash.to_be_bytes());
    }
    out[0] &= 0x7f;
    out
}

/// A small FASTQ file (Phred+33); returns its summary as the node should compute it.
fn write_fastq(path: &Path, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<(&'static str, Cell)>> {
    let reads = rng.gen_range(8..24u64);
    let length = 60u64;
    let mut out = csv_file(path)?;
    let (mut gc, mut acgt, mut quality_sum) = (0u64, 0u64, 0u64);
    for r in 0..reads {
        let sequence: String = (0..length)
            .map(|_| {
                let alphabet = if rng.gen_bool(0.02) { 5 } else { 4 };
                ['A', 'C', 'G', 'T', 'N'][rng.gen_range(0..alphabet)]
            })
            .collect();
        let quality: String = (0..length)
            .map(|_| char::from(rng.gen_range(b'#'..=b'J')))
            .collect();
        for c in sequence.chars() {
            match c {
                'G' | 'C' => {
                    gc += 1;
                    acgt += 1;
                }
                'A' | 'T' => acgt += 1,
                _ => {}
            }
        }
        quality_sum += quality.bytes().map(|q| u64::from(q - 33)).sum::<u64>();
        writeln!(out, "@read{r} synthetic\n{sequence}\n+\n{quality}")?;
    }
    out.flush()?;
    let bases = reads * length;
    let round = |value: f64, scale: u8| {
        Cell::Fixed((value * 10f64.powi(i32::from(scale))).round() as i64, scale)
    };
    Ok(vec![
        ("read_count", Cell::Int(reads as i64)),
        ("total_bases", Cell::Int(bases as i64)),
        ("mean_read_length", round(length as f64, 1)),
        ("mean_quality", round(quality_sum as f64 / bases as f64, 2)),
        ("gc_fraction", round(gc as f64 / acgt.max(1) as f64, 4)),
    ])
}

/// A row of a view: its cells by name (missing = NULL).
type Row<'a> = Box<dyn Fn(&str) -> Option<Cell> + 'a>;

fn compare(cell: Cell, literal: &Literal) -> Option<std::cmp::Ordering> {
    let as_fraction =
        |digits: i64, scale: u8| (i128::from(digits), i128::from(10i64.pow(u32::from(scale))));
    match (cell, literal) {
        (Cell::Text(a), Literal::Text(b)) => {
            // Categorical levels compare by their order in the schema.
            let lists: [&[&str]; 5] = [SEVERITIES, CARE_LEVELS, SEXES, OUTCOMES, &["CT"]];
            let list = lists.iter().find(|l| l.contains(&a))?;
            let (x, y) = (
                list.iter().position(|l| *l == a)?,
                list.iter().position(|l| l == b)?,
            );
            Some(x.cmp(&y))
        }
        (Cell::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        (Cell::Int(_) | Cell::Fixed(..), Literal::Integer(_) | Literal::Decimal(_)) => {
            let (an, ad) = match cell {
                Cell::Int(n) => (i128::from(n), 1),
                Cell::Fixed(d, s) => as_fraction(d, s),
                _ => return None,
            };
            let (bn, bd) = match literal {
                Literal::Integer(n) => (i128::from(*n), 1),
                Literal::Decimal(d) => as_fraction(d.digits, d.scale),
                _ => return None,
            };
            Some((an * bd).cmp(&(bn * ad)))
        }
        _ => None,
    }
}

/// SQL three-valued evaluation: `None` is unknown.
fn eval(row: &Row<'_>, filter: &Filter) -> Option<bool> {
    match filter {
        Filter::True => Some(true),
        Filter::And(children) => {
            let mut result = Some(true);
            for child in children {
                match eval(row, child) {
                    Some(false) => return Some(false),
                    None => result = None,
                    Some(true) => {}
                }
            }
            result
        }
        Filter::Or(children) => {
            let mut result = Some(false);
            for child in children {
                match eval(row, child) {
                    Some(true) => return Some(true),
                    None => result = None,
                    Some(false) => {}
                }
            }
            result
        }
        Filter::Not(inner) => eval(row, inner).map(|b| !b),
        Filter::Compare { column, op, value } => Some(op.holds(compare(row(column)?, value)?)),
        Filter::In { column, values } => {
            let cell = row(column)?;
            Some(
                values
                    .iter()
                    .any(|v| compare(cell, v).is_some_and(|o| o.is_eq())),
            )
        }
        Filter::Between { column, low, high } => {
            let cell = row(column)?;
            Some(compare(cell, low)?.is_ge() && compare(cell, high)?.is_le())
        }
        Filter::IsNull { column, negated } => Some(row(column).is_none() != *negated),
        Filter::Columns {
            left,
            op,
            right,
            offset,
        } => {
            // left op right + offset, all as exact fractions.
            let fraction = |cell: Cell| match cell {
                Cell::Int(n) => Some((i128::from(n), 1i128)),
                Cell::Fixed(d, s) => Some((i128::from(d), 10i128.pow(u32::from(s)))),
                Cell::Text(_) | Cell::Bool(_) => None,
            };
            let (a, ad) = fraction(row(left)?)?;
            let (b, bd) = fraction(row(right)?)?;
            let (k, kd) = match offset {
                Literal::Integer(n) => (i128::from(*n), 1),
                Literal::Decimal(d) => (i128::from(d.digits), 10i128.pow(u32::from(d.scale))),
                Literal::Text(_) | Literal::Bool(_) => return None,
            };
            let lhs = a * bd * kd;
            let rhs = b * ad * kd + k * ad * bd;
            Some(op.holds(lhs.cmp(&rhs)))
        }
    }
}

fn has_kind(timepoints: &[&SyntheticTimepoint], name: &str) -> Option<Cell> {
    let kind = name.strip_prefix("has_")?;
    ITEM_KINDS.iter().any(|(k, _)| *k == kind).then(|| {
        Cell::Bool(
            timepoints
                .iter()
                .any(|t| t.items.iter().any(|i| i.kind == kind)),
        )
    })
}

/// The rows of `query`'s view for one patient that match its filter, in order.
fn matching_rows<'a>(p: &'a SyntheticPatient, query: &Query) -> Vec<Row<'a>> {
    let patient_cell = move |name: &str| p.get(name);
    let mut rows: Vec<Row<'a>> = Vec::new();
    match query.view.as_str() {
        "patients" => {
            let all: Vec<&SyntheticTimepoint> = p.timepoints.iter().collect();
            rows.push(Box::new(move |n| {
                patient_cell(n).or_else(|| has_kind(&all, n))
            }));
        }
        "timepoints" => {
            for t in &p.timepoints {
                rows.push(Box::new(move |n| {
                    if n == "timepoint" {
                        return Some(Cell::Int(i64::from(t.number)));
                    }
                    if let Some(patient_column) = n.strip_prefix("patients.") {
                        return patient_cell(patient_column);
                    }
                    lookup(&t.cells, n)
                        .or_else(|| has_kind(&[t], n))
                        .or_else(|| patient_cell(n))
                }));
            }
        }
        kind => {
            for t in &p.timepoints {
                for i in t.items.iter().filter(|i| i.kind == kind) {
                    rows.push(Box::new(move |n| {
                        if n == "timepoint" {
                            return Some(Cell::Int(i64::from(t.number)));
                        }
                        if let Some(patient_column) = n.strip_prefix("patients.") {
                            return patient_cell(patient_column);
                        }
                        if let Some(timepoint_column) = n.strip_prefix("timepoints.") {
                            return lookup(&t.cells, timepoint_column);
                        }
                        lookup(&i.cells, n)
                            .or_else(|| lookup(&t.cells, n))
                            .or_else(|| patient_cell(n))
                    }));
                }
            }
        }
    }
    rows.retain(|row| eval(row, &query.filter) == Some(true));
    rows
}

/// The consenting patients a query may count.
fn counted<'a>(
    patients: impl IntoIterator<Item = &'a SyntheticPatient>,
    query: &Query,
) -> impl Iterator<Item = &'a SyntheticPatient> {
    let genome = query.view == "host_genome" || query.columns().contains("has_host_genome");
    patients
        .into_iter()
        .filter(move |p| p.consent_secondary_use && (!genome || p.consent_genome))
}

fn numeric(cell: Option<Cell>) -> Option<f64> {
    match cell? {
        Cell::Int(n) => Some(n as f64),
        Cell::Fixed(d, s) => Some(d as f64 / 10f64.powi(i32::from(s))),
        _ => None,
    }
}

fn label(cell: Option<Cell>) -> Option<String> {
    match cell? {
        Cell::Text(t) => Some(t.to_string()),
        Cell::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub use renkei_engine::TrueValue;

/// A number, or a flag as 1 or 0.
fn number_or_flag(cell: Option<Cell>) -> Option<f64> {
    match cell? {
        Cell::Bool(b) => Some(f64::from(u8::from(b))),
        other => numeric(Some(other)),
    }
}

/// A regression's terms on a row, outcome first (see [`renkei_engine::PooledRow::terms`]).
fn regression_terms(aggregate: &renkei_protocol::Aggregate, row: &Row<'_>) -> Vec<Option<f64>> {
    use renkei_protocol::{Aggregate, Covariate};
    let flag = |holds: Option<bool>| holds.map(|b| f64::from(u8::from(b)));
    let (outcome, covariates) = match aggregate {
        Aggregate::LinearRegression {
            outcome,
            covariates,
        } => (numeric(row(outcome)), covariates),
        Aggregate::LogisticRegression {
            outcome,
            covariates,
            ..
        } => (flag(eval(row, outcome)), covariates),
        Aggregate::CountPatients
        | Aggregate::CountRows
        | Aggregate::Sum { .. }
        | Aggregate::Mean { .. }
        | Aggregate::Quantile { .. }
        | Aggregate::KaplanMeier { .. } => return Vec::new(),
    };
    std::iter::once(outcome)
        .chain(covariates.iter().map(|covariate| match covariate {
            Covariate::Column(column) => number_or_flag(row(column)),
            Covariate::Indicator(condition) => flag(eval(row, condition)),
        }))
        .collect()
}

/// The exact answer of a counting `query` over `patients`.
pub fn true_count<'a>(
    patients: impl IntoIterator<Item = &'a SyntheticPatient>,
    query: &Query,
) -> u64 {
    match true_value(patients, query) {
        TrueValue::Number(n) => n as u64,
        TrueValue::Groups(_)
        | TrueValue::Cells(_)
        | TrueValue::Curves(_)
        | TrueValue::Coefficients(_)
        | TrueValue::Nothing => 0,
    }
}

/// The exact answer of `query` over `patients`: the rows matching its filter are found here,
/// row by row on the synthetic records (independently of the engine's columnar path), and
/// the statistic's own pooled reading of those rows gives the answer (counts, sums, means,
/// quantiles interpolated like PERCENTILE_CONT, GROUP BY cells).
pub fn true_value<'a>(
    patients: impl IntoIterator<Item = &'a SyntheticPatient>,
    query: &Query,
) -> TrueValue {
    let rows_per_patient = if query.view == "patients" {
        1
    } else {
        MAX_ROWS_PER_PATIENT
    };
    let column = query.aggregate.column().map(str::to_string);
    // A survival curve's time is the first present of its time columns.
    let (times, event): (Vec<&str>, Option<&renkei_protocol::Filter>) =
        if let renkei_protocol::Aggregate::KaplanMeier { time, event, .. } = &query.aggregate {
            (time.iter().map(String::as_str).collect(), Some(event))
        } else {
            (Vec::new(), None)
        };
    let mut cohort = renkei_engine::PooledCohort::default();
    for p in counted(patients, query) {
        let rows = matching_rows(p, query);
        if rows.is_empty() {
            continue;
        }
        // At most the schema's bound, spread over the course as nodes keep them.
        cohort.patients.push(
            renkei_engine::cohort::spread(rows.len(), rows_per_patient)
                .map(|i| &rows[i])
                .map(|row| renkei_engine::PooledRow {
                    value: match column.as_deref() {
                        Some(c) => numeric(row(c)),
                        None => times.iter().find_map(|c| numeric(row(c))),
                    },
                    cell: query.group_by.iter().map(|g| label(row(g))).collect(),
                    event: event.is_some_and(|e| eval(row, e) == Some(true)),
                    terms: regression_terms(&query.aggregate, row),
                })
                .collect(),
        );
    }
    renkei_engine::statistic::pooled(query, &cohort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_under_seed_and_distinct_across_hospitals() {
        assert_eq!(generate(0, 50, 5, 7), generate(0, 50, 5, 7));
        assert_ne!(generate(0, 50, 5, 7), generate(1, 50, 5, 7));
        assert_ne!(generate(0, 50, 5, 7), generate(0, 50, 5, 8));
    }

    #[test]
    fn clinical_correlations_hold() {
        let patients = generate(0, 20_000, 0, 1);
        let severe_share = |filter: &dyn Fn(&SyntheticPatient) -> bool| {
            let group: Vec<_> = patients.iter().filter(|p| filter(p)).collect();
            let severe = group
                .iter()
                .filter(|p| matches!(p.get("severity"), Some(Cell::Text("severe" | "critical"))))
                .count();
            severe as f64 / group.len() as f64
        };
        let old = severe_share(&|p| p.age() >= 70);
        let young = severe_share(&|p| p.age() < 40);
        assert!(old > young + 0.2, "old {old} young {young}");
        let consented = patients.iter().filter(|p| p.consent_secondary_use).count();
        assert!((0.89..0.95).contains(&(consented as f64 / 20_000.0)));
        // IL-6 is higher at severe timepoints than at mild ones.
        let mean_il6 = |level: &'static str| {
            let values: Vec<f64> = patients
                .iter()
                .flat_map(|p| &p.timepoints)
                .filter(|t| lookup(&t.cells, "severity") == Some(Cell::Text(level)))
                .filter_map(|t| match lookup(&t.cells, "il6") {
                    Some(Cell::Fixed(d, s)) => Some(d as f64 / 10f64.powi(i32::from(s))),
                    _ => None,
                })
                .collect();
            values.iter().sum::<f64>() / values.len() as f64
        };
        assert!(mean_il6("severe") > 3.0 * mean_il6("mild"));
    }
}
