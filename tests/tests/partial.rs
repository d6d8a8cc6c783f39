//! A node that is down: the aggregator returns a partial answer naming it, within the
//! deadline, instead of hanging.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use renkei_aggregator::sql;
use renkei_protocol::MicroRho;
use renkei_tests::{researcher, start_testnet, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_yields_a_partial_answer_naming_it() {
    let mut fixture = start_testnet(3, 600, MicroRho(10 * MicroRho::PER_RHO)).await;
    let session = researcher(&fixture.testnet).await;
    let mut options = session.default_options().unwrap();
    options.deadline = Duration::from_secs(5);
    let stopped = fixture.testnet.nodes[1].peer_id.to_base58();
    within("stopping a node", fixture.testnet.stop_node(1)).await;

    let sql_text = "SELECT COUNT(*) FROM patients WHERE age < 40";
    let started = Instant::now();
    let answer = within(
        "the query",
        session.query(&fixture.testnet.addresses(), sql_text, &options),
    )
    .await
    .unwrap();
    // The deadline bounds the wait (with slack for a loaded CI machine).
    assert!(started.elapsed() < options.deadline + Duration::from_secs(10));
    assert!(answer.is_partial());
    assert_eq!(answer.answered.len(), 2, "{answer:#?}");
    assert_eq!(answer.missing.len(), 1);
    assert_eq!(answer.missing[0].node, stopped);
    assert!(!answer.missing[0].reason.is_empty());

    // The estimate covers the answering nodes only, and says so through its interval.
    let truth = fixture
        .testnet
        .true_count_on(&[0, 2], &sql::compile(sql_text).unwrap());
    let sd = answer.std_dev.unwrap();
    let estimate = answer.estimate.unwrap().as_f64();
    assert!(
        (estimate - truth as f64).abs() <= 6.0 * sd,
        "{estimate} vs {truth}"
    );

    // Back up: it answers again.
    within("restarting the node", fixture.testnet.restart_node(1))
        .await
        .unwrap();
    let answer = within(
        "the query after restart",
        session.query(&fixture.testnet.addresses(), sql_text, &options),
    )
    .await
    .unwrap();
    assert_eq!(answer.answered.len(), 3, "{answer:#?}");
    fixture.testnet.shutdown().await;
}
