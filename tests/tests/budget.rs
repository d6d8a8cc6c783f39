//! The privacy budget at a real node: queries until it is exhausted, then refusals; the spend
//! is on disk and survives a restart.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_aggregator::QueryOptions;
use renkei_protocol::{MicroRho, PrivacyRequest, RefusalCode};
use renkei_tests::{researcher, start_testnet, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_runs_out_and_stays_spent_across_a_restart() {
    // Budget 0.2 per node, 0.05 per query: exactly four answers.
    let mut fixture = start_testnet(1, 200, MicroRho(200_000)).await;
    let session = researcher(&fixture.testnet).await;
    let mut options = session.default_options().unwrap();
    options.privacy = PrivacyRequest::Zcdp {
        rho: MicroRho(50_000),
    };
    let sql_text = "SELECT COUNT(*) FROM patients WHERE severity = 'severe'";

    // A dry run says what a query would cost and spends nothing (twice, to be sure).
    let dry = QueryOptions {
        dry_run: true,
        ..options.clone()
    };
    for _ in 0..2 {
        let quoted = within(
            "a dry run",
            session.query(&fixture.testnet.addresses(), sql_text, &dry),
        )
        .await
        .unwrap();
        assert!(quoted.dry_run && quoted.answered.is_empty(), "{quoted:#?}");
        assert_eq!(quoted.estimate, None);
        assert_eq!(quoted.quotes.len(), 1, "{quoted:#?}");
        let quote = &quoted.quotes[0];
        assert_eq!(quote.rho, MicroRho(50_000));
        assert_eq!(quote.budget_remaining, MicroRho(200_000));
        assert_eq!(quote.budget_after, MicroRho(150_000));
        assert!(quote.noise_std > 3.0 && quote.noise_std < 3.2, "{quote:?}");
    }

    let mut remaining = Vec::new();
    for _ in 0..4 {
        let nodes = fixture.testnet.addresses();
        let answer = within("a query", session.query(&nodes, sql_text, &options))
            .await
            .unwrap();
        assert_eq!(answer.answered.len(), 1, "{answer:#?}");
        remaining.push(answer.answered[0].budget_remaining);
    }
    assert_eq!(
        remaining,
        vec![
            MicroRho(150_000),
            MicroRho(100_000),
            MicroRho(50_000),
            MicroRho(0)
        ]
    );
    let refused = within(
        "the fifth query",
        session.query(&fixture.testnet.addresses(), sql_text, &options),
    )
    .await
    .unwrap();
    assert!(refused.answered.is_empty());
    assert_eq!(refused.refused.len(), 1);
    assert_eq!(refused.refused[0].code, RefusalCode::BudgetExhausted);
    // A dry run now says so too.
    let quoted = within(
        "a dry run when exhausted",
        session.query(&fixture.testnet.addresses(), sql_text, &dry),
    )
    .await
    .unwrap();
    assert!(quoted.quotes.is_empty());
    assert_eq!(quoted.refused[0].code, RefusalCode::BudgetExhausted);

    // A smaller query still fits nowhere: the budget is spent, not just rounded.
    let mut tiny = options.clone();
    tiny.privacy = PrivacyRequest::Zcdp { rho: MicroRho(1) };
    let still = within(
        "a tiny query",
        session.query(&fixture.testnet.addresses(), sql_text, &tiny),
    )
    .await
    .unwrap();
    assert_eq!(still.refused[0].code, RefusalCode::BudgetExhausted);

    within("restarting the node", fixture.testnet.restart_node(0))
        .await
        .unwrap();
    let spent = fixture
        .testnet
        .running(0)
        .unwrap()
        .desk()
        .ledger()
        .spent(&session.key().public_key(), &options.study)
        .unwrap();
    assert_eq!(spent, MicroRho(200_000));
    let after = within(
        "a query after restart",
        session.query(&fixture.testnet.addresses(), sql_text, &options),
    )
    .await
    .unwrap();
    assert!(after.answered.is_empty(), "{after:#?}");
    assert_eq!(after.refused[0].code, RefusalCode::BudgetExhausted);
    fixture.testnet.shutdown().await;
}
