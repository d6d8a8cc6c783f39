//! GROUP BY with a sum or a mean per cell, over real nodes: per site (each node's noisy
//! cells visible) and as a secure total (only the network's cells readable), each cell
//! against the pooled truth, with the interval the statistic reports.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use renkei_aggregator::{AnswerMode, FederatedAnswer, QueryOptions, sql};
use renkei_protocol::{MicroRho, PrivacyRequest, Release};
use renkei_testnet::Testnet;
use renkei_testnet::synth::TrueValue;
use renkei_tests::{researcher, start_testnet, within};

const BUDGET: MicroRho = MicroRho(100 * MicroRho::PER_RHO);

/// Every cell's estimate against the pooled truth: within 6 of its sds (the noise is far
/// smaller than the cells' spread, so a wrong combination would be far off).
fn assert_cells_match(testnet: &Testnet, text: &str, answer: &FederatedAnswer) {
    let TrueValue::Cells(truth) = testnet.true_value(&sql::compile(text).unwrap()) else {
        panic!("{text} has cells");
    };
    assert!(answer.estimate.is_none(), "{answer:#?}");
    assert!(truth.len() >= 3, "{text}: {truth:?}");
    for (label, value) in &truth {
        let cell = answer
            .groups
            .iter()
            .find(|g| &g.group == label)
            .unwrap_or_else(|| panic!("{text}: no cell {label:?} in {answer:#?}"));
        let estimate = cell.estimate.as_f64();
        assert!(
            (estimate - value).abs() <= 6.0 * cell.std_dev,
            "{text} {label:?}: {estimate} vs {value} (sd {})",
            cell.std_dev
        );
        assert!(cell.ci95[0] <= estimate && estimate <= cell.ci95[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_and_means_per_cell_per_site_and_as_a_secure_total() {
    let fixture = start_testnet(3, 1_500, BUDGET).await;
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

    let mean = "SELECT severity, AVG(age) FROM patients GROUP BY severity";
    let per_site = within("a mean per cell", session.query(&nodes, mean, &options))
        .await
        .unwrap();
    assert_eq!(per_site.mode, AnswerMode::PerSite);
    assert_eq!(per_site.aggregate, "mean");
    assert_eq!(per_site.answered.len(), 3, "{per_site:#?}");
    assert_eq!(per_site.groups.len(), 4, "every level is a cell");
    for node in &per_site.answered {
        let Release::Cells { labels, parts, .. } = &node.release else {
            panic!("a mean per cell releases cells: {node:?}");
        };
        assert_eq!(labels.len(), 4);
        assert_eq!(parts.len(), 2, "sums and counts");
        // Half the rho each for the sums and the counts.
        assert_eq!(node.rho, MicroRho(500_000));
        assert!(node.count_noise_std.is_some());
    }
    assert_cells_match(testnet, mean, &per_site);

    let sum = "SELECT care_level, SUM(crp) FROM timepoints WHERE dexamethasone GROUP BY care_level";
    let sums = within("a sum per cell", session.query(&nodes, sum, &options))
        .await
        .unwrap();
    assert_eq!(sums.aggregate, "sum");
    assert_cells_match(testnet, sum, &sums);

    // The same mean as a secure total: only masked words travel, and each cell of the
    // total carries one share of noise per node instead of a full noise per node.
    options.secure = true;
    let secure = within(
        "a secure mean per cell",
        session.query(&nodes, mean, &options),
    )
    .await
    .unwrap();
    assert_eq!(secure.mode, AnswerMode::Secure);
    assert!(!secure.aborted, "{secure:#?}");
    for node in &secure.answered {
        assert!(
            matches!(&node.release, Release::Masked { words, .. } if words.len() == 8),
            "{node:?}"
        );
    }
    assert_cells_match(testnet, mean, &secure);
    for (plain, masked) in per_site.groups.iter().zip(&secure.groups) {
        assert_eq!(plain.group, masked.group);
        assert!(
            masked.std_dev < plain.std_dev,
            "{:?}: secure sd {} vs per-site {}",
            plain.group,
            masked.std_dev,
            plain.std_dev
        );
    }
    fixture.testnet.shutdown().await;
}
