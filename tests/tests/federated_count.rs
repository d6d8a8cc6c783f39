//! Three real nodes over real libp2p: a count query's estimate, its interval, and the JSON a
//! script reads.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_aggregator::sql;
use renkei_protocol::{MicroEpsilon, MicroRho, PrivacyRequest};
use renkei_tests::{researcher, start_testnet, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_answer_a_count_near_the_truth() {
    let fixture = start_testnet(3, 900, MicroRho(10 * MicroRho::PER_RHO)).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let mut options = session.default_options().unwrap();
    let rho = MicroRho(50_000);
    options.privacy = PrivacyRequest::Zcdp { rho };
    let sql_text = "SELECT COUNT(*) FROM patients WHERE age >= 50 AND hypertension";
    let truth = testnet.true_count(&sql::compile(sql_text).unwrap());
    assert!(
        truth > 20,
        "the synthetic cohort should have such patients ({truth})"
    );

    let answer = within(
        "the query",
        session.query(&testnet.addresses(), sql_text, &options),
    )
    .await
    .unwrap();
    assert_eq!(answer.answered.len(), 3, "{answer:#?}");
    assert!(answer.missing.is_empty() && answer.refused.is_empty());

    let estimate = answer.estimate.unwrap().as_f64();
    let sd = answer.std_dev.unwrap();
    // Each node spent the default rho at sensitivity 1: scale = 1/sqrt(2 rho).
    let expected_scale = 1.0 / (2.0 * rho.as_rho()).sqrt();
    for node in &answer.answered {
        assert!((node.noise_scale - expected_scale).abs() < 1e-6, "{node:?}");
        // At this scale the discrete Gaussian's sd equals its scale to many digits.
        assert!((node.noise_std - expected_scale).abs() < 1e-6, "{node:?}");
        assert_eq!(node.rho, rho);
        assert!(node.epsilon > 0.0 && node.delta == 1e-6, "{node:?}");
        assert!(!node.suppressed);
        assert_eq!(node.sensitivity, 1.0);
        assert_eq!(node.mechanism.to_string(), "discrete_gaussian");
    }
    // Independent noise: variances add.
    assert!(
        (sd - (3.0f64).sqrt() * expected_scale).abs() < 1e-6,
        "sd {sd}"
    );
    assert!(
        (estimate - truth as f64).abs() <= 6.0 * sd,
        "estimate {estimate} is more than 6 sd ({sd}) from the truth {truth}"
    );
    let [low, high] = answer.ci95.unwrap();
    assert!(
        (high - low - 2.0 * 1.959_964 * sd).abs() < 1e-3,
        "[{low}, {high}] vs sd {sd}"
    );
    assert!(((low + high) / 2.0 - estimate).abs() < 1e-9);

    // The JSON contract scripts rely on.
    let json = serde_json::to_value(&answer).unwrap();
    assert!(json["estimate"].is_i64());
    assert_eq!(json["ci95"].as_array().unwrap().len(), 2);
    assert!(json["ci95"][0].is_f64() && json["ci95"][1].is_f64());
    assert_eq!(json["answered"].as_array().unwrap().len(), 3);
    for field in [
        "mechanism",
        "sensitivity",
        "noise_scale",
        "rho",
        "epsilon",
        "delta",
    ] {
        assert!(!json["answered"][0][field].is_null(), "answered[0].{field}");
    }
    assert!(json["missing"].as_array().unwrap().is_empty());
    assert!(json["refused"].as_array().unwrap().is_empty());

    // Pure DP on request: discrete Laplace, epsilon as asked, charged epsilon²/2 in rho.
    options.privacy = PrivacyRequest::PureDp {
        epsilon: MicroEpsilon(400_000),
    };
    let pure = within(
        "a pure-DP query",
        session.query(&testnet.addresses(), sql_text, &options),
    )
    .await
    .unwrap();
    assert_eq!(pure.answered.len(), 3, "{pure:#?}");
    for node in &pure.answered {
        assert_eq!(node.mechanism.to_string(), "discrete_laplace");
        assert!((node.epsilon - 0.4).abs() < 1e-9, "{node:?}");
        assert_eq!(node.delta, 0.0);
        assert_eq!(node.rho, MicroRho(80_000));
    }
    let sd = pure.std_dev.unwrap();
    let estimate = pure.estimate.unwrap().as_f64();
    assert!(
        (estimate - truth as f64).abs() <= 6.0 * sd,
        "{estimate} vs {truth} (sd {sd})"
    );

    fixture.testnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_never_counts_patients_without_consent() {
    let fixture = start_testnet(1, 400, MicroRho(10 * MicroRho::PER_RHO)).await;
    let testnet = &fixture.testnet;
    let stored = testnet.nodes[0].patients.len();
    let consented = testnet.nodes[0]
        .patients
        .iter()
        .filter(|p| p.consent_secondary_use)
        .count();
    assert!(
        consented < stored,
        "the synthetic data should include refusals of consent"
    );
    let cohort = testnet.running(0).unwrap().desk().dataset();
    assert_eq!(cohort.consented(), consented);
    assert_eq!(cohort.withheld(), stored - consented);

    // With a generous rho the noise sd is 0.5, so the estimate pins the consented count.
    let session = researcher(testnet).await;
    let mut options = session.default_options().unwrap();
    options.privacy = PrivacyRequest::Zcdp {
        rho: MicroRho(MicroRho::PER_RHO),
    }; // rho 1: scale ~0.71
    let answer = within(
        "the query",
        session.query(
            &testnet.addresses(),
            "SELECT COUNT(*) FROM patients",
            &options,
        ),
    )
    .await
    .unwrap();
    let estimate = answer.estimate.unwrap().as_f64();
    assert!(
        (estimate - consented as f64).abs() <= 6.0,
        "estimate {estimate}, consented {consented}, stored {stored}"
    );
    fixture.testnet.shutdown().await;
}
