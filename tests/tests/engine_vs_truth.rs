//! The node's engine against an independent evaluator: for many queries over every view
//! (AND / OR / NOT, IN, BETWEEN, IS NULL, decimals, presence flags, enclosing-layer columns,
//! patient and row counts), the exact count a node computes from its store equals the count
//! computed directly on the synthetic records it was loaded from (CSV, DICOM and FASTQ
//! through the real ingestion path).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_aggregator::sql;
use renkei_protocol::MicroRho;
use renkei_testnet::synth;
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
        let engine = dataset.evaluate(&compiled);
        let truth = synth::true_count(&testnet.nodes[0].patients, &query);
        assert_eq!(engine, truth, "{text}");
        nonzero += usize::from(truth > 0);
    }
    // The queries must select something, or the comparison proves little.
    assert!(
        nonzero >= QUERIES.len() - 3,
        "only {nonzero} queries matched anything"
    );
    fixture.testnet.shutdown().await;
}
