//! Requests no known researcher signed, sent by any peer: refused with their codes, never
//! audited one by one (the log gets periodic summaries per peer), and a peer that keeps
//! sending them is disconnected and refused for a while, while honest researchers are still
//! answered.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use renkei_aggregator::NetworkClient;
use renkei_node::audit::{self, AuditEvent};
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    MicroRho, Purpose, QueryResponse, RefusalCode, SecretKey, SignedEnvelope, UnmaskRequest,
};
use renkei_tests::{researcher, start_testnet, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_summarised_rate_limited_and_honest_queries_still_answered() {
    let mut fixture = start_testnet(1, 300, MicroRho(10 * MicroRho::PER_RHO)).await;
    let node = fixture.testnet.addresses()[0].clone();
    let mallory = within(
        "a client",
        NetworkClient::start(Some(renkei_node::service::default_listen())),
    )
    .await
    .unwrap();
    let (mut malformed, mut overloaded, mut dropped) = (0u64, 0u64, 0u64);
    for i in 0..130u32 {
        let garbage = EncodedRequest::from_raw(i.to_le_bytes().repeat(9));
        let reply = within(
            "a garbage request",
            mallory.ask(
                node.peer_id,
                node.address.clone(),
                garbage,
                Duration::from_secs(10),
            ),
        )
        .await;
        match reply {
            Ok(QueryResponse::Refused(refusal))
                if refusal.code == RefusalCode::MalformedRequest =>
            {
                malformed += 1
            }
            Ok(QueryResponse::Refused(refusal)) if refusal.code == RefusalCode::Overloaded => {
                assert!(
                    refusal.reason.contains("no known researcher"),
                    "{refusal:?}"
                );
                overloaded += 1
            }
            Ok(other) => panic!("garbage answered with {other:?}"),
            // Disconnected once banned.
            Err(_) => dropped += 1,
        }
    }
    // Refused as malformed up to the limit (the request crossing it may lose its reply to
    // the disconnect), then banned.
    assert!((100..=101).contains(&malformed), "{malformed}");
    assert_eq!(malformed + overloaded + dropped, 130);
    assert!(overloaded + dropped >= 29);

    // Unmaskings signed by a key the policy does not know: noise too, not one entry each.
    let eve = within(
        "a client",
        NetworkClient::start(Some(renkei_node::service::default_listen())),
    )
    .await
    .unwrap();
    let eve_key = SecretKey::generate().unwrap();
    let round = SignedEnvelope::seal(Purpose::QueryRequest, &eve_key, &7u32).unwrap();
    for _ in 0..3 {
        let unmask = UnmaskRequest {
            round: round.clone(),
            survivors: Vec::new(),
            commitments: Vec::new(),
        };
        let sealed = SignedEnvelope::seal(Purpose::UnmaskRequest, &eve_key, &unmask).unwrap();
        let reply = within(
            "an unknown unmasking",
            eve.ask(
                node.peer_id,
                node.address.clone(),
                EncodedRequest::encode(&sealed).unwrap(),
                Duration::from_secs(10),
            ),
        )
        .await
        .unwrap();
        assert!(
            matches!(&reply, QueryResponse::Refused(r) if r.code == RefusalCode::UnknownResearcher),
            "{reply:?}"
        );
    }

    // An honest researcher on another peer is still answered.
    let session = researcher(&fixture.testnet).await;
    let answer = within(
        "an honest query",
        session.query(
            &fixture.testnet.addresses(),
            "SELECT COUNT(*) FROM patients WHERE age >= 65",
            &session.default_options().unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.answered.len(), 1, "{answer:#?}");

    // The audit log: no entry per garbage request, one summary counting them all.
    let home = fixture.testnet.nodes[0].home.clone();
    fixture.testnet.stop_node(0).await;
    let store = home.open_store().unwrap();
    let key = home.identity().unwrap().public_key();
    let entries = audit::verify(&store, &key).unwrap().unwrap();
    let refused = entries
        .iter()
        .filter(|e| matches!(e.event, AuditEvent::QueryRefused { .. }))
        .count();
    assert_eq!(refused, 0, "{entries:#?}");
    let summarised: u64 = entries
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::UnauthenticatedRequests {
                senders, others, ..
            } => Some(senders.iter().map(|s| s.malformed).sum::<u64>() + others),
            _ => None,
        })
        .sum();
    // Every garbage request the node refused is counted (the one crossing the limit may
    // have been refused and counted with its reply lost to the disconnect).
    assert!(
        summarised == malformed || summarised == malformed + 1,
        "{summarised} counted, {malformed} refusals seen"
    );
    let unknown: u64 = entries
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::UnauthenticatedRequests { senders, .. } => {
                Some(senders.iter().map(|s| s.unknown_signer).sum::<u64>())
            }
            _ => None,
        })
        .sum();
    assert_eq!(unknown, 3);
    assert!(entries.len() < 10, "{} entries", entries.len());
}
