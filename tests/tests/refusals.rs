//! Every refusal a node makes before spending, each with its own code, at a real node over
//! libp2p: forged signature, unknown researcher, expired request, replayed nonce, malformed
//! bytes, a query outside the schema, and a node that refuses to start on a forged policy.

use std::time::Duration;

use renkei_aggregator::PreparedQuery;
use renkei_aggregator::sql;
use renkei_node::{NodeError, NodeService};
use renkei_protocol::codec::EncodedRequest;
use renkei_protocol::limits::MAX_REQUEST_LIFETIME_SECS;
use renkei_protocol::{
    MicroRho, PrivacyRequest, QueryRequest, QueryResponse, RefusalCode, RequestId, SecretKey,
    unix_now,
};
use renkei_tests::{researcher, start_testnet, within};

const DEADLINE: Duration = Duration::from_secs(20);

fn refusal_code(response: QueryResponse) -> RefusalCode {
    match response {
        QueryResponse::Refused(refusal) => refusal.code,
        QueryResponse::Answered(_) => panic!("expected a refusal, got an answer"),
    }
}

fn request(study: &str, issued_at: u64, expires_at: u64) -> QueryRequest {
    QueryRequest {
        request_id: RequestId::random().expect("random request id"),
        nonce: RequestId::random().expect("random nonce").0,
        issued_at,
        expires_at,
        study: study.to_string(),
        query: sql::compile("SELECT COUNT(*) FROM patients WHERE age >= 65").expect("valid SQL"),
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(10_000),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_request_is_refused_with_its_own_code() {
    let fixture = start_testnet(1, 200, MicroRho(10 * MicroRho::PER_RHO)).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let client = session.client();
    let node = &testnet.addresses()[0];
    let study = testnet.consortium.study.clone();
    let now = unix_now();
    let ask = |bytes: EncodedRequest| {
        within(
            "asking the node",
            client.ask(node.peer_id, node.address.clone(), bytes, DEADLINE),
        )
    };
    let spent_before = testnet
        .running(0)
        .unwrap()
        .desk()
        .ledger()
        .entries()
        .unwrap();

    // Forged: a valid request whose signature was altered in transit.
    let honest =
        PreparedQuery::from_request(session.key(), request(&study, now, now + 60)).unwrap();
    let mut forged = honest.envelope.clone();
    forged.signature.0[10] ^= 0x40;
    let code = refusal_code(ask(EncodedRequest::encode(&forged).unwrap()).await.unwrap());
    assert_eq!(code, RefusalCode::BadSignature);

    // Forged: the researcher's key named as signer, but someone else signed.
    let mallory = SecretKey::generate().unwrap();
    let mut impersonation = PreparedQuery::from_request(&mallory, request(&study, now, now + 60))
        .unwrap()
        .envelope;
    impersonation.signer = session.key().public_key();
    let code = refusal_code(
        ask(EncodedRequest::encode(&impersonation).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::BadSignature);

    // Unknown researcher: a valid signature by a key the policy does not list.
    let stranger = PreparedQuery::from_request(&mallory, request(&study, now, now + 60)).unwrap();
    let code = refusal_code(
        ask(EncodedRequest::encode(&stranger.envelope).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::UnknownResearcher);

    // Expired.
    let stale = PreparedQuery::from_request(
        session.key(),
        request(&study, now - 2 * MAX_REQUEST_LIFETIME_SECS, now - 5),
    )
    .unwrap();
    let code = refusal_code(
        ask(EncodedRequest::encode(&stale.envelope).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::Expired);

    // Study the researcher is not approved for.
    let other =
        PreparedQuery::from_request(session.key(), request("genomes", now, now + 60)).unwrap();
    let code = refusal_code(
        ask(EncodedRequest::encode(&other.envelope).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::StudyNotApproved);

    // Malformed bytes.
    let code = refusal_code(
        ask(EncodedRequest::from_raw(vec![0xde, 0xad, 0xbe, 0xef]))
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::MalformedRequest);

    // A column the schema does not have.
    let mut bad_query = request(&study, now, now + 60);
    bad_query.query = sql::compile("SELECT COUNT(*) FROM patients WHERE smoker").unwrap();
    let bad_query = PreparedQuery::from_request(session.key(), bad_query).unwrap();
    let response = ask(EncodedRequest::encode(&bad_query.envelope).unwrap())
        .await
        .unwrap();
    match response {
        QueryResponse::Refused(refusal) => {
            assert_eq!(refusal.code, RefusalCode::InvalidQuery);
            assert!(refusal.reason.contains("smoker"), "{}", refusal.reason);
        }
        QueryResponse::Answered(_) => panic!("an unknown column was answered"),
    }

    // None of the above spent anything.
    let spent_after = testnet
        .running(0)
        .unwrap()
        .desk()
        .ledger()
        .entries()
        .unwrap();
    assert_eq!(spent_before, spent_after);

    // Replay: the honest request is answered once and charged once; sending it again
    // returns the very same signed answer (no fresh noise to average, no second charge).
    let encoded = EncodedRequest::encode(&honest.envelope).unwrap();
    let QueryResponse::Answered(first) = ask(encoded.clone()).await.unwrap() else {
        panic!("the honest request was refused");
    };
    let spent = || {
        testnet
            .running(0)
            .unwrap()
            .desk()
            .ledger()
            .spent(&session.key().public_key(), &study)
            .unwrap()
    };
    assert_eq!(spent(), MicroRho(10_000));
    let QueryResponse::Answered(again) = ask(encoded).await.unwrap() else {
        panic!("the resent request was refused");
    };
    assert_eq!(first, again);
    assert_eq!(spent(), MicroRho(10_000));

    // A new request reusing the nonce is a replay and is refused.
    let mut reuse = request(&study, now, now + 60);
    reuse.nonce = honest.request.nonce;
    let reuse = PreparedQuery::from_request(session.key(), reuse).unwrap();
    let code = refusal_code(
        ask(EncodedRequest::encode(&reuse.envelope).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::Replayed);
    // So is a different request under a used request id.
    let mut reuse_id = request(&study, now, now + 60);
    reuse_id.request_id = honest.request.request_id;
    let reuse_id = PreparedQuery::from_request(session.key(), reuse_id).unwrap();
    let code = refusal_code(
        ask(EncodedRequest::encode(&reuse_id.envelope).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(code, RefusalCode::Replayed);
    assert_eq!(spent(), MicroRho(10_000));

    fixture.testnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_on_a_forged_policy() {
    let mut fixture = start_testnet(1, 50, MicroRho(MicroRho::PER_RHO)).await;
    fixture.testnet.stop_node(0).await;
    let policy_path = fixture.testnet.consortium.policy.clone();
    let text = std::fs::read_to_string(&policy_path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Flip one hex digit of the admin's signature.
    let signature = json["signatures"][0]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    json["signatures"][0]["signature"] = format!("{flipped}{}", &signature[1..]).into();
    let forged = fixture.dir.path().join("forged-policy.json");
    std::fs::write(&forged, serde_json::to_string(&json).unwrap()).unwrap();

    let home = &fixture.testnet.nodes[0].home;
    let err = NodeService::start(home, &forged, renkei_node::service::default_listen())
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Policy { .. }), "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");
}
