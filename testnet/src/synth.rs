//! Synthetic hospital patients with plausible COVID-19 correlations, deterministic under a
//! seed, and an independent evaluator that knows each query's true answer.
//!
//! Age follows a broad adult-skewed mix; comorbidities grow more common with age; the
//! worst severity over the course grows with age and the number of comorbidities; about one
//! patient in twelve has not consented to secondary use. [`true_count`] evaluates a query
//! directly on these records (not through the node's engine), so tests compare the network's
//! answer against a separate implementation.

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use renkei_protocol::{Category, Predicate, Query};

// The schema's level and column names (what a hospital's export must use).
use renkei_node::cohort::{COMORBIDITIES, SEVERITY_LEVELS as SEVERITIES, SEX_LEVELS as SEXES};

/// One synthetic patient, as the hospital would export it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticPatient {
    pub patient_id: String,
    pub age: u8,
    pub sex: &'static str,
    pub severity: &'static str,
    /// Parallel to the schema's comorbidity columns.
    pub comorbidities: [bool; 7],
    pub consent_secondary_use: bool,
}

/// Base prevalence of each comorbidity at age 50, and its growth per decade.
const PREVALENCE: [(f64, f64); 7] = [
    (0.12, 0.04), // diabetes
    (0.25, 0.08), // hypertension
    (0.06, 0.02), // chronic lung disease
    (0.08, 0.04), // cardiovascular
    (0.05, 0.02), // kidney
    (0.04, 0.02), // cancer
    (0.20, 0.00), // obesity
];

/// Generates `count` patients of hospital `hospital`; the same inputs give the same output.
pub fn generate(hospital: usize, count: usize, seed: u64) -> Vec<SyntheticPatient> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (hospital as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..count)
        .map(|i| {
            let age: u8 = if rng.gen_bool(0.15) {
                rng.gen_range(0..20)
            } else {
                rng.gen_range(20..96)
            };
            let decades_over_50 = (f64::from(age) - 50.0) / 10.0;
            let mut comorbidities = [false; 7];
            for (flag, (base, growth)) in comorbidities.iter_mut().zip(PREVALENCE) {
                *flag = rng.gen_bool((base + growth * decades_over_50).clamp(0.005, 0.9));
            }
            let burden = comorbidities.iter().filter(|c| **c).count() as f64;
            // A latent risk score: older and more comorbid patients fare worse.
            let risk = 0.035 * f64::from(age) + 0.45 * burden + rng.gen_range(-1.2..1.2);
            let severity = match risk {
                r if r < 1.6 => SEVERITIES[0],
                r if r < 2.6 => SEVERITIES[1],
                r if r < 3.6 => SEVERITIES[2],
                _ => SEVERITIES[3],
            };
            let sex = match rng.gen_range(0..100) {
                0..49 => SEXES[0],
                49..99 => SEXES[1],
                _ => SEXES[2],
            };
            SyntheticPatient {
                patient_id: format!("H{hospital}-{i:07}"),
                age,
                sex,
                severity,
                comorbidities,
                consent_secondary_use: rng.gen_bool(0.92),
            }
        })
        .collect()
}

/// Writes patients in the node's documented patient CSV format.
pub fn write_csv(path: &Path, patients: &[SyntheticPatient]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    write!(out, "patient_id,age,sex,severity")?;
    for c in COMORBIDITIES {
        write!(out, ",{c}")?;
    }
    writeln!(out, ",consent_secondary_use")?;
    for p in patients {
        write!(out, "{},{},{},{}", p.patient_id, p.age, p.sex, p.severity)?;
        for flag in p.comorbidities {
            write!(out, ",{}", if flag { "yes" } else { "no" })?;
        }
        writeln!(out, ",{}", p.consent_secondary_use)?;
    }
    out.flush()
}

fn matches(patient: &SyntheticPatient, predicate: &Predicate) -> bool {
    match predicate {
        Predicate::InRange { column, min, max } => {
            let value = match column.as_str() {
                "age" => i64::from(patient.age),
                _ => return false,
            };
            min.is_none_or(|lo| value >= lo) && max.is_none_or(|hi| value <= hi)
        }
        Predicate::Is { column, value } => match (column.as_str(), value) {
            ("sex", Category::Level(level)) => patient.sex == level,
            ("severity", Category::Level(level)) => patient.severity == level,
            (name, Category::Flag(flag)) => COMORBIDITIES
                .iter()
                .position(|c| *c == name)
                .is_some_and(|i| patient.comorbidities[i] == *flag),
            _ => false,
        },
    }
}

/// The exact number of consented patients satisfying `query`.
pub fn true_count<'a>(
    patients: impl IntoIterator<Item = &'a SyntheticPatient>,
    query: &Query,
) -> u64 {
    patients
        .into_iter()
        .filter(|p| p.consent_secondary_use && query.filter.iter().all(|f| matches(p, f)))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_under_seed_and_distinct_across_hospitals() {
        assert_eq!(generate(0, 50, 7), generate(0, 50, 7));
        assert_ne!(generate(0, 50, 7), generate(1, 50, 7));
        assert_ne!(generate(0, 50, 7), generate(0, 50, 8));
    }

    #[test]
    fn older_and_comorbid_patients_are_more_often_severe() {
        let patients = generate(0, 20_000, 1);
        let severe_share = |filter: &dyn Fn(&SyntheticPatient) -> bool| {
            let group: Vec<_> = patients.iter().filter(|p| filter(p)).collect();
            let severe = group
                .iter()
                .filter(|p| p.severity == "severe" || p.severity == "critical")
                .count();
            severe as f64 / group.len() as f64
        };
        let old = severe_share(&|p| p.age >= 70);
        let young = severe_share(&|p| p.age < 40);
        assert!(old > young + 0.2, "old {old} young {young}");
        let consented = patients.iter().filter(|p| p.consent_secondary_use).count();
        assert!((0.89..0.95).contains(&(consented as f64 / 20_000.0)));
    }
}
