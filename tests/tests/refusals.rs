//! Every refusal a node makes before spending, each with its own code, at a real node over
//! libp2p: forged signatures, unknown researcher, expired, not-yet-valid and over-long
//! requests, requests addressed to other nodes, unapproved study, malformed bytes, a query
//! outside the schema, a rho outside the policy's limit, and replays; plus a node that
//! refuses to start on a forged policy.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use renkei_aggregator::PreparedQuery;
use renkei_aggregator::sql;
use renkei_node::{NodeError, NodeService};
use renkei_protocol::limits::{MAX_CLOCK_SKEW_SECS, MAX_REQUEST_LIFETIME_SECS};
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    MicroRho, PrivacyRequest, PublicKey, QueryRequest, QueryResponse, Refusal, RefusalCode,
    RequestId, SecretKey, SignedEnvelope, unix_now,
};
use renkei_tests::{researcher, start_testnet, within};

const DEADLINE: Duration = Duration::from_secs(20);

fn request(audience: PublicKey, study: &str, issued_at: u64, expires_at: u64) -> QueryRequest {
    QueryRequest {
        request_id: RequestId::random().expect("random request id"),
        nonce: RequestId::random().expect("random nonce").0,
        issued_at,
        expires_at,
        study: study.to_string(),
        audience: vec![audience],
        query: sql::compile("SELECT COUNT(*) FROM patients WHERE age >= 65").expect("valid SQL"),
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(10_000),
        },
        secure: false,
        dropouts: 0,
        policy_version: None,
        dry_run: false,
    }
}

fn sign(key: &SecretKey, request: QueryRequest) -> SignedEnvelope {
    PreparedQuery::from_request(key, request)
        .expect("encodes")
        .envelope
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_request_is_refused_with_its_own_code() {
    let fixture = start_testnet(1, 200, MicroRho(10 * MicroRho::PER_RHO)).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let client = session.client();
    let node = &testnet.addresses()[0];
    let node_key = PublicKey::from_peer_id(&node.peer_id).unwrap();
    let study = testnet.consortium.study.clone();
    let me = session.key();
    let now = unix_now();
    let fresh = |study: &str| request(node_key, study, now, now + 60);
    let ask = |bytes: EncodedRequest| {
        within(
            "asking the node",
            client.ask(node.peer_id, node.address.clone(), bytes, DEADLINE),
        )
    };
    let refusal = |envelope: SignedEnvelope| async move {
        match ask(EncodedRequest::encode(&envelope).unwrap())
            .await
            .unwrap()
        {
            QueryResponse::Refused(refusal) => refusal,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let code = |envelope: SignedEnvelope| async move { refusal(envelope).await.code };
    let spent = || {
        testnet
            .running(0)
            .unwrap()
            .desk()
            .ledger()
            .spent(&me.public_key(), &study)
            .unwrap()
    };

    // Forged: a valid request whose signature was altered in transit.
    let honest = PreparedQuery::from_request(me, fresh(&study)).unwrap();
    let mut forged = honest.envelope.clone();
    forged.signature.0[10] ^= 0x40;
    assert_eq!(code(forged).await, RefusalCode::BadSignature);

    // Forged: the researcher's key named as signer, but someone else signed.
    let mallory = SecretKey::generate().unwrap();
    let mut impersonation = sign(&mallory, fresh(&study));
    impersonation.signer = me.public_key();
    assert_eq!(code(impersonation).await, RefusalCode::BadSignature);

    // Unknown researcher: a valid signature by a key the policy does not list.
    assert_eq!(
        code(sign(&mallory, fresh(&study))).await,
        RefusalCode::UnknownResearcher
    );

    // Expired (beyond the tolerated clock skew), issued in the future, living too long.
    let stale = request(
        node_key,
        &study,
        now - 2 * MAX_REQUEST_LIFETIME_SECS,
        now - MAX_CLOCK_SKEW_SECS - 5,
    );
    assert_eq!(code(sign(me, stale)).await, RefusalCode::Expired);
    let early = request(
        node_key,
        &study,
        now + 10 * MAX_CLOCK_SKEW_SECS,
        now + 11 * MAX_CLOCK_SKEW_SECS,
    );
    assert_eq!(code(sign(me, early)).await, RefusalCode::NotYetValid);
    let long = request(node_key, &study, now, now + 2 * MAX_REQUEST_LIFETIME_SECS);
    assert_eq!(code(sign(me, long)).await, RefusalCode::LifetimeTooLong);

    // Addressed to another node: a node cannot spend a request meant for others.
    let elsewhere = request(
        SecretKey::generate().unwrap().public_key(),
        &study,
        now,
        now + 60,
    );
    assert_eq!(
        code(sign(me, elsewhere)).await,
        RefusalCode::NotAddressedToThisNode
    );

    // Study the researcher is not approved for.
    assert_eq!(
        code(sign(me, fresh("genomes"))).await,
        RefusalCode::StudyNotApproved
    );

    // Malformed bytes.
    let junk = ask(EncodedRequest::from_raw(vec![0xde, 0xad, 0xbe, 0xef]))
        .await
        .unwrap();
    assert!(matches!(
        junk,
        QueryResponse::Refused(Refusal {
            code: RefusalCode::MalformedRequest,
            ..
        })
    ));

    // A column the schema does not have: the reason names it.
    let mut bad_query = fresh(&study);
    bad_query.query = sql::compile("SELECT COUNT(*) FROM patients WHERE smoker").unwrap();
    let refused = refusal(sign(me, bad_query)).await;
    assert_eq!(refused.code, RefusalCode::InvalidQuery);
    assert!(refused.reason.contains("smoker"), "{}", refused.reason);

    // More rho than one query may spend under the policy.
    let mut greedy = fresh(&study);
    greedy.privacy = PrivacyRequest::Zcdp {
        rho: MicroRho(2 * MicroRho::PER_RHO),
    };
    assert_eq!(
        code(sign(me, greedy)).await,
        RefusalCode::PrivacyParameterOutOfRange
    );

    // None of the above spent anything.
    assert_eq!(spent(), MicroRho(0));

    // Replay: the honest request is answered once and charged once; sending it again
    // returns the very same signed answer (no fresh noise to average, no second charge).
    let encoded = EncodedRequest::encode(&honest.envelope).unwrap();
    let QueryResponse::Answered(first) = ask(encoded.clone()).await.unwrap() else {
        panic!("the honest request was refused");
    };
    assert_eq!(spent(), MicroRho(10_000));
    let QueryResponse::Answered(again) = ask(encoded).await.unwrap() else {
        panic!("the resent request was refused");
    };
    assert_eq!(first, again);
    assert_eq!(spent(), MicroRho(10_000));

    // A new request reusing the nonce is a replay and is refused.
    let mut reuse = fresh(&study);
    reuse.nonce = honest.request.nonce;
    assert_eq!(code(sign(me, reuse)).await, RefusalCode::Replayed);
    // So is a different request under a used request id.
    let mut reuse_id = fresh(&study);
    reuse_id.request_id = honest.request.request_id;
    assert_eq!(code(sign(me, reuse_id)).await, RefusalCode::Replayed);
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
    let err = NodeService::start(home, Some(&forged), renkei_node::service::default_listen())
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::PolicyRefused { .. }), "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");
}
