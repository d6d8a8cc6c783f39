//! Consortium governance at real nodes over libp2p: bundles published to the network are
//! verified by every node (too few signatures, a wrong signer, a lower version: each refused
//! with its own code), spread from node to node, reach a node that was offline when it
//! restarts, and take effect at the next query (an expired study, a revoked key, a
//! disallowed column, a sensitive view without its stricter grant). The audit log records it
//! all and verifies.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use renkei_aggregator::{NodeAddress, QueryOptions, ResearcherSession};
use renkei_node::audit::{self, AuditEvent};
use renkei_policies::{SensitiveRule, SignedPolicy, Timestamp};
use renkei_protocol::{MicroRho, PolicyResponse, RefusalCode, SecretKey, unix_now};
use renkei_testnet::Testnet;
use renkei_tests::{admin, current, offer, publish_all, researcher, signed, start_testnet, within};

fn refused_code(response: PolicyResponse) -> RefusalCode {
    match response {
        PolicyResponse::Refused(refusal) => refusal.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn query_code(
    session: &ResearcherSession,
    nodes: &[NodeAddress],
    sql: &str,
    options: &QueryOptions,
) -> Option<RefusalCode> {
    let answer = within("a query", session.query(nodes, sql, options))
        .await
        .unwrap();
    answer.refused.first().map(|r| r.code)
}

/// Waits until node `index` runs policy `version` (bundles spread asynchronously).
async fn wait_for_version(testnet: &Testnet, index: usize, version: u64) {
    let what = format!("policy v{version} to reach node {index}");
    within(&what, async {
        loop {
            let active = testnet
                .running(index)
                .and_then(|n| n.desk().policy())
                .map(|p| p.bundle().version);
            if active == Some(version) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_verified_spread_and_enforced() {
    let mut fixture = start_testnet(2, 400, MicroRho(10 * MicroRho::PER_RHO)).await;
    let session = researcher(&fixture.testnet).await;
    let options = session.default_options().unwrap();
    let admin = admin(&fixture.testnet);
    let stranger = SecretKey::generate().unwrap();
    let nodes = fixture.testnet.addresses();
    let count = "SELECT COUNT(*) FROM patients WHERE age >= 18";
    assert_eq!(query_code(&session, &nodes, count, &options).await, None);

    // v2: members now list their addresses, so nodes can reach each other.
    let mut v2 = current(&fixture.testnet);
    v2.version = 2;
    for (member, node) in v2.members.iter_mut().zip(&fixture.testnet.nodes) {
        let mut address = node.address.clone();
        address.pop();
        member.addresses = vec![address.to_string()];
    }
    let v2_signed = signed(&v2, &[&admin]);
    // Published to node 0 only; node 0 passes it on to node 1.
    assert!(matches!(
        offer(&session, &nodes[0], &v2_signed).await,
        PolicyResponse::Accepted { version: 2, .. }
    ));
    wait_for_version(&fixture.testnet, 1, 2).await;
    assert!(matches!(
        offer(&session, &nodes[0], &v2_signed).await,
        PolicyResponse::AlreadyActive { version: 2, .. }
    ));

    // Refused bundles, each with its own code; the active bundle stays v2.
    let mut v3 = v2.clone();
    v3.version = 3;
    assert_eq!(
        refused_code(offer(&session, &nodes[0], &signed(&v3, &[])).await),
        RefusalCode::PolicyTooFewSignatures
    );
    assert_eq!(
        refused_code(offer(&session, &nodes[0], &signed(&v3, &[&stranger])).await),
        RefusalCode::PolicyNotAnAdmin
    );
    let mut coup = v3.clone();
    coup.admins = vec![stranger.public_key()];
    assert_eq!(
        refused_code(offer(&session, &nodes[0], &signed(&coup, &[&stranger])).await),
        RefusalCode::PolicyTooFewSignatures
    );
    let v1 = signed(&current(&fixture.testnet), &[&admin]);
    assert_eq!(
        refused_code(offer(&session, &nodes[0], &v1).await),
        RefusalCode::PolicyRollback
    );
    let mut forged = signed(&v3, &[&admin]).to_transfer();
    forged.signatures[0].signature.0[3] ^= 1;
    let forged = SignedPolicy::from_transfer(forged);
    assert_eq!(
        refused_code(offer(&session, &nodes[0], &forged).await),
        RefusalCode::PolicyBadSignature
    );

    // v3 narrows the study to a few columns and takes back its sensitive grant.
    v3.studies[0].columns = vec!["age".into(), "sex".into()];
    v3.studies[0].sensitive_views.clear();
    v3.sensitive = vec![SensitiveRule {
        view: "host_genome".into(),
        aggregations: vec!["count".into()],
        min_cell_size: 20,
        signatures_required: 1,
    }];
    // Node 1 is offline while v3 is published; it catches up when it returns.
    fixture.testnet.stop_node(1).await;
    assert!(matches!(
        offer(&session, &nodes[0], &signed(&v3, &[&admin])).await,
        PolicyResponse::Accepted { version: 3, .. }
    ));
    within("restarting node 1", fixture.testnet.restart_node(1))
        .await
        .unwrap();
    wait_for_version(&fixture.testnet, 1, 3).await;
    let nodes = fixture.testnet.addresses();
    assert_eq!(query_code(&session, &nodes, count, &options).await, None);
    assert_eq!(
        query_code(
            &session,
            &nodes,
            "SELECT COUNT(*) FROM patients WHERE diabetes",
            &options
        )
        .await,
        Some(RefusalCode::ColumnNotAllowed)
    );
    assert_eq!(
        query_code(
            &session,
            &nodes,
            "SELECT COUNT(*) FROM host_genome",
            &options
        )
        .await,
        Some(RefusalCode::SensitiveNotGranted)
    );

    // v4 ends the study yesterday: refused as expired.
    let mut v4 = v3.clone();
    v4.version = 4;
    let now = unix_now();
    v4.studies[0].valid_from = Timestamp(now - 10 * 24 * 3600);
    v4.studies[0].valid_until = Timestamp(now - 24 * 3600);
    // (Published to every node, like `renkei-policy publish`: node 1 may have come back on
    // another port than the bundles list.)
    publish_all(&session, &nodes, &signed(&v4, &[&admin])).await;
    assert_eq!(
        query_code(&session, &nodes, count, &options).await,
        Some(RefusalCode::StudyExpired)
    );

    // v5 reopens the study but revokes the researcher: refused from the next query on.
    let mut v5 = v3.clone();
    v5.version = 5;
    v5.revoked = vec![session.key().public_key()];
    publish_all(&session, &nodes, &signed(&v5, &[&admin])).await;
    let answer = within("a revoked query", session.query(&nodes, count, &options))
        .await
        .unwrap();
    assert!(answer.answered.is_empty());
    assert_eq!(answer.refused.len(), 2);
    assert!(
        answer
            .refused
            .iter()
            .all(|r| r.code == RefusalCode::ResearcherRevoked)
    );

    // The audit log of node 0 verifies and holds every decision.
    let node0 = fixture.testnet.nodes[0].home.clone();
    fixture.testnet.stop_node(0).await;
    let store = node0.open_store().unwrap();
    let key = node0.identity().unwrap().public_key();
    let entries = audit::verify(&store, &key).unwrap().unwrap();
    let activated: Vec<u64> = entries
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::PolicyActivated { version, .. } => Some(*version),
            _ => None,
        })
        .collect();
    assert_eq!(activated, vec![1, 2, 3, 4, 5]);
    let refused_policies = entries
        .iter()
        .filter(|e| matches!(e.event, AuditEvent::PolicyRefused { .. }))
        .count();
    assert_eq!(refused_policies, 5);
    assert!(entries.iter().any(|e| matches!(
        e.event,
        AuditEvent::QueryRefused {
            code: RefusalCode::ResearcherRevoked,
            ..
        }
    )));
    assert!(
        entries
            .iter()
            .any(|e| matches!(e.event, AuditEvent::QueryAnswered { .. }))
    );
    drop(store);
    fixture.testnet.shutdown().await;
}
