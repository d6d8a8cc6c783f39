//! The node's engine against an independent evaluator: for many queries over every view
//! (AND / OR / NOT, IN, BETWEEN, IS NULL, decimals, presence flags, enclosing-layer columns,
//! patient and row counts), the exact count a node computes from its store equals the count
//! computed directly on the synthetic records it was loaded from (CSV, DICOM and FASTQ
//! through the real ingestion path).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_aggregator::sql;
use renkei_protocol::{MicroRho, Release};
use renkei_testnet::synth::{self, TrueValue};
use renkei_tests::start_testnet_with;

const QUERIES: &[&str] = &[
    "SELECT COUNT(*) FROM patients",
    "SELECT COUNT(*) FROM patients WHERE age >= 65 AND (diabetes OR hypertension)",
    "SELECT COUNT(*) FROM patients WHERE NOT obesity AND sex IN ('female', 'other')",
    "SELECT COUNT(*) FROM patients WHERE severity >= 'severe' AND outcome <> 'died'",
    "SELECT COUNT(*) FROM patients WHERE age BETWEEN 20 AND 39 OR age NOT BETWEEN 10 AND 90",
    "SELECT COUNT(*) FROM patients WHERE has_ct",
    "SELECT COUNT(*) FROM patients WHERE has_host_genome AND age > 50",
    "SELECT COUNT(*) FROM patients WHERE NOT has_ct AND severity = 'critical'",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE il6 > 100",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE crp >= 10.5 AND dexamethasone",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE crp IS NULL",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE ferritin IS NOT NULL AND NOT (ldh < 300)",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE NOT crp > 5",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE care_level IN ('icu_ventilation', 'ecmo') AND days_since_admission <= 3",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE severity = 'mild' AND patients.severity = 'critical'",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE timepoint = 0 AND igg > 100.0",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE neutralizing_titer >= 160 AND age < 40",
    "SELECT COUNT(*) FROM timepoints WHERE remdesivir",
    "SELECT COUNT(*) FROM timepoints WHERE il6 BETWEEN 20.5 AND 150 OR tnf_alpha > 30",
    "SELECT COUNT(*) FROM timepoints WHERE has_rna_seq",
    "SELECT COUNT(DISTINCT patient_id) FROM ct WHERE rows = 16 AND slice_thickness = 5",
    "SELECT COUNT(*) FROM ct WHERE patients.age >= 60",
    "SELECT COUNT(DISTINCT patient_id) FROM host_genome WHERE read_count > 12",
    "SELECT COUNT(*) FROM rna_seq WHERE gc_fraction > 0.5 AND timepoints.severity IN ('severe', 'critical')",
    "SELECT COUNT(DISTINCT patient_id) FROM immune_repertoire WHERE mean_quality >= 20",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_agrees_with_an_independent_evaluator() {
    let fixture = start_testnet_with(1, 900, 60, MicroRho(MicroRho::PER_RHO)).await;
    let testnet = &fixture.testnet;
    let node = testnet.running(0).unwrap();
    let dataset = node.desk().dataset();
    assert!(dataset.timepoints() > 900);
    assert!(
        dataset.items().iter().all(|(_, n)| *n > 0),
        "{:?}",
        dataset.items()
    );
    let mut nonzero = 0;
    for text in QUERIES {
        let query = sql::compile(text).unwrap();
        let compiled = dataset
            .compile(&query)
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let Release::Scalar { value: engine, .. } =
            compiled.unnoised_release(dataset.evaluate(&compiled))
        else {
            panic!("{text}: a count should be one number");
        };
        let truth = synth::true_count(&testnet.nodes[0].patients, &query);
        assert_eq!(engine as u64, truth, "{text}");
        nonzero += usize::from(truth > 0);
    }
    // The queries must select something, or the comparison proves little.
    assert!(
        nonzero >= QUERIES.len() - 3,
        "only {nonzero} queries matched anything"
    );

    // Sums, means, histograms and groups, exactly.
    let patients = &testnet.nodes[0].patients;
    let number = |text: &str| match synth::true_value(patients, &sql::compile(text).unwrap()) {
        TrueValue::Number(n) => n,
        other => panic!("{text}: {other:?}"),
    };
    let exact = |text: &str| {
        let compiled = dataset.compile(&sql::compile(text).unwrap()).unwrap();
        compiled.unnoised_release(dataset.evaluate(&compiled))
    };
    let sum = "SELECT SUM(crp) FROM timepoints WHERE severity >= 'severe'";
    let Release::Scalar {
        value: engine_sum, ..
    } = exact(sum)
    else {
        panic!("{sum}")
    };
    assert_eq!(engine_sum, (number(sum) * 100.0).round() as i64, "{sum}");
    let mean = "SELECT AVG(age) FROM patients WHERE diabetes";
    let Release::SumAndCount { sum: s, count: c } = exact(mean) else {
        panic!("{mean}")
    };
    assert!((s as f64 / c as f64 - number(mean)).abs() < 1e-9, "{mean}");
    let median = "SELECT MEDIAN(il6) FROM timepoints";
    let Release::Histogram { low, width, counts } = exact(median) else {
        panic!("{median}")
    };
    let truth = number(median) * 10.0; // il6 keeps one digit
    let values: i64 = counts.iter().sum();
    let with_il6 = sql::compile("SELECT COUNT(*) FROM timepoints WHERE il6 IS NOT NULL").unwrap();
    assert_eq!(values as u64, synth::true_count(patients, &with_il6));
    // The true median lies in the bin where the cumulative count crosses half.
    let mut below = 0;
    let bin = counts
        .iter()
        .position(|c| {
            below += c;
            below * 2 >= values
        })
        .unwrap() as i64;
    assert!(
        (low + bin * width) as f64 <= truth && truth <= (low + (bin + 1) * width) as f64,
        "{median}: {truth} not in bin {bin}"
    );
    for grouped in [
        "SELECT severity, has_ct, COUNT(*) FROM patients WHERE age >= 50 GROUP BY severity, has_ct",
        "SELECT care_level, COUNT(DISTINCT patient_id) FROM timepoints GROUP BY care_level",
        "SELECT care_level, COUNT(*) FROM timepoints WHERE dexamethasone GROUP BY care_level",
    ] {
        let Release::Groups { labels, counts, .. } = exact(grouped) else {
            panic!("{grouped}")
        };
        let TrueValue::Groups(cells) = synth::true_value(patients, &sql::compile(grouped).unwrap())
        else {
            panic!()
        };
        for (label, count) in labels.iter().zip(&counts) {
            let truth = cells
                .iter()
                .find(|(l, _)| l == label)
                .map_or(0, |(_, n)| *n);
            assert_eq!(*count as u64, truth, "{grouped} {label:?}");
        }
        assert!(counts.iter().filter(|c| **c > 0).count() >= 3, "{grouped}");
    }
    fixture.testnet.shutdown().await;
}
