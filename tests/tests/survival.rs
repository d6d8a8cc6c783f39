//! Kaplan–Meier curves over real nodes: per site (each node's noisy trees visible) and as a
//! secure total (one masked vector per node; only the network's trees readable), each
//! stratum's curve against the pooled truth, with its band, median and log-rank test, and
//! the budget charged once per query.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use renkei_aggregator::{AnswerMode, FederatedAnswer, QueryOptions, sql};
use renkei_protocol::{MicroRho, PrivacyRequest, Release};
use renkei_testnet::Testnet;
use renkei_testnet::synth::TrueValue;
use renkei_tests::{researcher, start_testnet, within};

const BUDGET: MicroRho = MicroRho(100 * MicroRho::PER_RHO);

const CURVE: &str = "SELECT diabetes, \
    KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 60) \
    FROM patients GROUP BY diabetes";

/// Each stratum's curve is close to the truth while many are at risk, its band covers the
/// truth on most days, the curve never rises, and the numbers at risk fall from the
/// stratum's size.
fn assert_curves_match(testnet: &Testnet, answer: &FederatedAnswer) {
    let TrueValue::Curves(truth) = testnet.true_value(&sql::compile(CURVE).unwrap()) else {
        panic!("a survival query has curves");
    };
    let survival = answer
        .survival
        .as_ref()
        .unwrap_or_else(|| panic!("{answer:#?}"));
    assert_eq!(survival.horizon_days, 60);
    assert_eq!(survival.strata.len(), 2, "diabetes true and false");
    for (label, exact) in &truth {
        let curve = survival
            .strata
            .iter()
            .find(|c| &c.group == label)
            .unwrap_or_else(|| panic!("no stratum {label:?}"));
        assert_eq!(curve.survival.len(), 61);
        assert!(exact[60] < 0.98, "the truth must fall: {exact:?}");
        let mut covered = 0;
        for (day, truth) in exact.iter().enumerate() {
            let (s, low, high) = (
                curve.survival[day],
                curve.ci95_low[day],
                curve.ci95_high[day],
            );
            // Where many are at risk the noise is small against the curve's steps; at the
            // tail, with a handful at risk, only the band speaks for the estimate.
            if curve.at_risk[day].is_some_and(|n| n >= 200) {
                assert!(
                    (s - *truth).abs() <= 0.04,
                    "{label:?} day {day}: {s} vs {}",
                    *truth
                );
            }
            assert!(low <= s && s <= high);
            covered += usize::from(low <= *truth && *truth <= high);
            if day > 0 {
                assert!(s <= curve.survival[day - 1], "{label:?}: the curve rose");
            }
        }
        assert!(
            covered >= 50,
            "{label:?}: the band covered {covered} of 61 days"
        );
        assert!(curve.at_risk[0].unwrap() > 100);
        assert!(curve.at_risk[60].unwrap_or(0) < curve.at_risk[0].unwrap());
    }
    let test = survival.log_rank.as_ref().unwrap();
    assert!(test.statistic >= 0.0 && (0.0..=1.0).contains(&test.p_value));
    assert!(test.noise_variance > 0.0 && test.variance > 0.0, "{test:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survival_curves_per_site_and_as_a_secure_total() {
    let fixture = start_testnet(3, 3_000, BUDGET).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let nodes = testnet.addresses();
    let mut options = QueryOptions {
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(500_000),
        },
        deadline: Duration::from_secs(10),
        ..session.default_options().unwrap()
    };

    let per_site = within("a survival curve", session.query(&nodes, CURVE, &options))
        .await
        .unwrap();
    assert_eq!(per_site.mode, AnswerMode::PerSite);
    assert_eq!(per_site.aggregate, "kaplan_meier");
    assert_eq!(per_site.answered.len(), 3, "{per_site:#?}");
    let nodes_per_tree = per_site.survival.as_ref().unwrap().tree.nodes();
    for node in &per_site.answered {
        let Release::Cells { labels, parts, .. } = &node.release else {
            panic!("a survival curve releases cells: {node:?}");
        };
        assert_eq!(labels.len(), 2);
        assert_eq!(
            parts.len(),
            2 * nodes_per_tree,
            "an event and a censoring tree"
        );
        // One mechanism for the whole vector: the query's rho, charged once.
        assert_eq!(node.rho, MicroRho(500_000));
    }
    assert_curves_match(testnet, &per_site);

    options.secure = true;
    let secure = within(
        "a secure survival curve",
        session.query(&nodes, CURVE, &options),
    )
    .await
    .unwrap();
    assert_eq!(secure.mode, AnswerMode::Secure);
    assert!(!secure.aborted, "{secure:#?}");
    for node in &secure.answered {
        assert!(
            matches!(&node.release, Release::Masked { words, .. } if words.len() == 2 * 2 * nodes_per_tree),
            "{node:?}"
        );
    }
    assert_curves_match(testnet, &secure);
    // The secure total carries one share of noise per node rather than a full noise each.
    let (plain, masked) = (
        per_site.survival.as_ref().unwrap(),
        secure.survival.as_ref().unwrap(),
    );
    assert!(masked.node_noise_std < plain.node_noise_std);

    // On a view with many rows per patient the curve is refused before anything is spent.
    let timepoints = "SELECT KAPLAN_MEIER(days_since_onset, dexamethasone, 30) FROM timepoints";
    let refused = within(
        "a refused curve",
        session.query(&nodes, timepoints, &options),
    )
    .await;
    let text = match refused {
        Ok(answer) => format!("{:?}", answer.refused),
        Err(e) => e.to_string(),
    };
    assert!(text.contains("one row per patient"), "{text}");
    fixture.testnet.shutdown().await;
}
