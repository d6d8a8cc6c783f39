//! Secure totals over real nodes: every node sends only a masked contribution (its numbers
//! plus a share of the noise), the aggregator can read only the network-wide sum, and that
//! sum carries the noise of one central mechanism, not N of them. A node that does not
//! contribute aborts the round with its reason and nothing revealed, the charges made stay
//! made, and a study the policy limits to secure totals refuses per-site answers.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use renkei_aggregator::{
    AnswerMode, FederatedAnswer, NodeAddress, QueryOptions, ResearcherSession, sql,
};
use renkei_node::privacy::dp::Calibration;
use renkei_protocol::{MicroEpsilon, MicroRho, PrivacyRequest, RefusalCode, Release, SecretKey};
use renkei_testnet::Testnet;
use renkei_testnet::synth::TrueValue;
use renkei_tests::{admin, current, publish_all, researcher, signed, start_testnet, within};

const RHO: MicroRho = MicroRho(20_000);
const BUDGET: MicroRho = MicroRho(100 * MicroRho::PER_RHO);
const COUNT: &str = "SELECT COUNT(*) FROM patients WHERE age >= 65";

fn secure_options(session: &ResearcherSession) -> QueryOptions {
    QueryOptions {
        privacy: PrivacyRequest::Zcdp { rho: RHO },
        secure: true,
        deadline: Duration::from_secs(10),
        ..session.default_options().unwrap()
    }
}

/// The noise sd one trusted party would add for a count at `RHO`.
fn central_sd() -> f64 {
    Calibration::for_request(PrivacyRequest::Zcdp { rho: RHO }, 1.0, 1e-6)
        .unwrap()
        .noise_std
}

/// Every node sent a masked contribution and nothing readable on its own: its words look
/// nothing like counts (a masked word is uniform over 2^64; one within ±2^40 of zero has
/// probability 2^-23).
fn assert_only_masked(answer: &FederatedAnswer) {
    assert_eq!(answer.mode, AnswerMode::Secure);
    for node in &answer.answered {
        let Release::Masked { words, .. } = &node.release else {
            panic!("a clear release in a secure round: {node:?}");
        };
        assert!(!words.is_empty());
        assert!(
            words.iter().all(|w| (*w as i64).unsigned_abs() > 1 << 40),
            "{} sent a readable word: {words:?}",
            node.node
        );
        assert_eq!(node.value, None);
        assert_eq!(node.ci95, None);
    }
}

/// `COUNT` signed as one secure round for `nodes`, under the session's policy version.
fn sign_round(
    session: &ResearcherSession,
    options: &QueryOptions,
    nodes: &[NodeAddress],
) -> renkei_aggregator::PreparedQuery {
    renkei_aggregator::PreparedQuery::sign(
        session.key(),
        sql::compile(COUNT).unwrap(),
        options,
        Some(session.policy().bundle().version),
        nodes,
        renkei_protocol::unix_now(),
    )
    .unwrap()
}

/// Every node asked refused, each with `code`.
fn assert_all_refused(answer: &FederatedAnswer, asked: usize, code: RefusalCode) {
    assert!(answer.estimate.is_none());
    assert_eq!(answer.refused.len(), asked, "{answer:#?}");
    assert!(answer.refused.iter().all(|r| r.code == code), "{answer:#?}");
}

/// What the dev researcher has spent at node `index`.
fn spent_at(testnet: &Testnet, index: usize, session: &ResearcherSession) -> MicroRho {
    testnet
        .running(index)
        .unwrap()
        .desk()
        .ledger()
        .spent(&session.key().public_key(), &testnet.consortium.study)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_total_reveals_only_the_sum_with_central_noise() {
    let fixture = start_testnet(4, 4_000, BUDGET).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let nodes = testnet.addresses();
    let mut options = secure_options(&session);

    let answer = within("a secure count", session.query(&nodes, COUNT, &options))
        .await
        .unwrap();
    assert_eq!(answer.answered.len(), 4, "{answer:#?}");
    assert_only_masked(&answer);
    for node in &answer.answered {
        assert_eq!(node.rho, RHO, "each node charges the total's cost");
        assert_eq!(node.budget_remaining, MicroRho(BUDGET.0 - RHO.0));
    }
    let sd = answer.std_dev.unwrap();
    let central = central_sd();
    assert!(
        sd >= central * 0.999 && sd <= central * 1.05,
        "secure sd {sd} vs central {central}"
    );
    let truth = testnet.true_count(&sql::compile(COUNT).unwrap()) as f64;
    let estimate = answer.estimate.unwrap().as_f64();
    assert!(
        (estimate - truth).abs() <= 6.0 * sd,
        "{estimate} vs {truth} (sd {sd})"
    );

    // The same question per site: four nodes' full noises add up to twice the sd.
    options.secure = false;
    let plain = within("a per-site count", session.query(&nodes, COUNT, &options))
        .await
        .unwrap();
    assert_eq!(plain.mode, AnswerMode::PerSite);
    assert!(plain.answered.iter().all(|a| a.value.is_some()));
    let ratio = plain.std_dev.unwrap() / sd;
    assert!((ratio - 2.0).abs() < 0.1, "per-site / secure sd = {ratio}");
    options.secure = true;

    // Means and medians add up through their sums, counts and histograms.
    for (text, tolerance) in [
        ("SELECT AVG(age) FROM patients", 2.0),
        ("SELECT MEDIAN(age) FROM patients", 6.0),
    ] {
        let answer = within(text, session.query(&nodes, text, &options))
            .await
            .unwrap();
        assert_only_masked(&answer);
        let TrueValue::Number(truth) = testnet.true_value(&sql::compile(text).unwrap()) else {
            panic!("{text} has a true value");
        };
        let estimate = answer.estimate.unwrap().as_f64();
        assert!(
            (estimate - truth).abs() <= tolerance,
            "{text}: {estimate} vs {truth}"
        );
    }

    // GROUP BY: every cell of the total, none of any site's.
    let grouped = "SELECT severity, COUNT(*) FROM patients GROUP BY severity";
    let answer = within(
        "a secure GROUP BY",
        session.query(&nodes, grouped, &options),
    )
    .await
    .unwrap();
    assert_only_masked(&answer);
    let TrueValue::Groups(cells) = testnet.true_value(&sql::compile(grouped).unwrap()) else {
        panic!("GROUP BY has cells");
    };
    assert_eq!(answer.groups.len(), 4, "{answer:#?}");
    for group in &answer.groups {
        let truth = cells
            .iter()
            .find(|(label, _)| *label == group.group)
            .map_or(0, |(_, n)| *n) as f64;
        let estimate = group.estimate.as_f64();
        assert!(
            (estimate - truth).abs() <= 6.0 * group.std_dev,
            "{:?}: {estimate} vs {truth}",
            group.group
        );
        assert!(group.std_dev <= central * 1.05);
    }
    fixture.testnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_aborts_the_round_cleanly_and_the_charges_stay() {
    let mut fixture = start_testnet(3, 1_500, BUDGET).await;
    let session = researcher(&fixture.testnet).await;
    let options = secure_options(&session);
    let down = fixture.testnet.nodes[1].peer_id.to_base58();
    within("stopping a node", fixture.testnet.stop_node(1)).await;

    let nodes = fixture.testnet.addresses();
    let answer = within("a secure count", session.query(&nodes, COUNT, &options))
        .await
        .unwrap();
    assert_only_masked(&answer);
    assert_eq!(answer.answered.len(), 2, "{answer:#?}");
    assert_eq!(answer.missing.len(), 1);
    assert_eq!(answer.missing[0].node, down);
    assert!(answer.aborted);
    assert_eq!(answer.estimate, None);
    assert_eq!(answer.std_dev, None);
    assert_eq!(answer.ci95, None);
    let note = answer.note.as_deref().unwrap();
    assert!(note.starts_with("secure round aborted"), "{note}");
    assert!(note.contains(&down), "{note}");
    // The nodes that answered spent, and their ledgers say so.
    for (index, node) in [0, 2].into_iter().zip(&answer.answered) {
        assert_eq!(node.budget_remaining, MicroRho(BUDGET.0 - RHO.0));
        assert_eq!(
            spent_at(&fixture.testnet, index, &session),
            RHO,
            "node {index}"
        );
    }

    // A new round without the missing node answers (and charges again).
    let present = [nodes[0].clone(), nodes[2].clone()];
    let answer = within(
        "a secure count of two",
        session.query(&present, COUNT, &options),
    )
    .await
    .unwrap();
    assert_only_masked(&answer);
    assert!(!answer.aborted);
    let sd = answer.std_dev.unwrap();
    let truth = fixture
        .testnet
        .true_count_on(&[0, 2], &sql::compile(COUNT).unwrap()) as f64;
    let estimate = answer.estimate.unwrap().as_f64();
    assert!(
        (estimate - truth).abs() <= 6.0 * sd,
        "{estimate} vs {truth}"
    );
    assert!(
        answer
            .answered
            .iter()
            .all(|a| a.budget_remaining == MicroRho(BUDGET.0 - 2 * RHO.0))
    );
    fixture.testnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_only_study_refuses_per_site_answers() {
    let fixture = start_testnet(3, 1_500, BUDGET).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let nodes = testnet.addresses();

    // v2: the study allows only secure totals, and one node may collude with the aggregator.
    let mut v2 = current(testnet);
    v2.version = 2;
    v2.studies[0].per_site_answers = false;
    v2.limits.secure_colluders = 1;
    publish_all(&session, &nodes, &signed(&v2, &[&admin(testnet)])).await;

    let mut options = secure_options(&session);
    options.secure = false;
    let answer = within("a per-site count", session.query(&nodes, COUNT, &options))
        .await
        .unwrap();
    assert!(answer.answered.is_empty(), "{answer:#?}");
    assert_all_refused(&answer, 3, RefusalCode::SecureAggregationRequired);

    // A secure round names its policy version: asked under v1, every node (on v2) refuses.
    options.secure = true;
    let answer = within(
        "a secure count under v1",
        session.query(&nodes, COUNT, &options),
    )
    .await
    .unwrap();
    assert!(answer.aborted);
    assert_all_refused(&answer, 3, RefusalCode::PolicyVersionMismatch);

    // Under v2 it answers; tolerating one colluder costs sqrt(3 / 2) in sd.
    let v2_session = ResearcherSession::new(
        SecretKey::read_file(&testnet.consortium.researcher_key).unwrap(),
        signed(&v2, &[&admin(testnet)])
            .verify_self_anchored()
            .unwrap(),
        session.client().clone(),
    );
    assert!(v2_session.secure_only(&options.study));
    let answer = within("a secure count", v2_session.query(&nodes, COUNT, &options))
        .await
        .unwrap();
    assert_only_masked(&answer);
    assert_eq!(answer.answered.len(), 3, "{answer:#?}");
    let ratio = answer.std_dev.unwrap() / central_sd();
    assert!((ratio - 1.5f64.sqrt()).abs() < 0.06, "{ratio}");

    // With t = 1, two nodes are not enough: the colluder could read the other's answer.
    let answer = within(
        "a secure round of two",
        v2_session.query(&nodes[..2], COUNT, &options),
    )
    .await
    .unwrap();
    assert_all_refused(&answer, 2, RefusalCode::PrivacyParameterOutOfRange);
    // None of the refused rounds spent anything.
    for index in 0..3 {
        assert_eq!(spent_at(testnet, index, &session), RHO, "node {index}");
    }
    fixture.testnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_rounds_outside_the_rules_are_refused_before_any_charge() {
    let fixture = start_testnet(3, 900, BUDGET).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let nodes = testnet.addresses();
    let mut options = secure_options(&session);

    // Pure DP has no distributed form here.
    options.privacy = PrivacyRequest::PureDp {
        epsilon: MicroEpsilon(500_000),
    };
    let answer = within(
        "a pure-DP secure round",
        session.query(&nodes, COUNT, &options),
    )
    .await
    .unwrap();
    assert!(answer.aborted);
    assert_all_refused(&answer, 3, RefusalCode::PrivacyParameterOutOfRange);

    // A participant outside the consortium could be a key whose masks the aggregator knows.
    options.privacy = PrivacyRequest::Zcdp { rho: RHO };
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    let mut with_stranger = nodes.clone();
    with_stranger.push(NodeAddress {
        peer_id: stranger,
        address: format!("/ip4/127.0.0.1/tcp/9/p2p/{stranger}")
            .parse::<Multiaddr>()
            .unwrap(),
    });
    let answer = within(
        "a secure round with a stranger",
        session.query(&with_stranger, COUNT, &options),
    )
    .await
    .unwrap();
    assert!(answer.aborted);
    assert_all_refused(&answer, 3, RefusalCode::MalformedRequest);
    for refusal in &answer.refused {
        assert!(
            refusal.reason.contains("not a member node"),
            "{}",
            refusal.reason
        );
    }

    // A secure round must ask exactly the nodes its request names.
    let prepared = sign_round(&session, &options, &nodes);
    let error = renkei_aggregator::fan_out(
        session.client(),
        session.policy(),
        &nodes[..2],
        &prepared,
        session.key(),
        options.deadline,
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("exactly the nodes"), "{error}");

    for index in 0..3 {
        assert_eq!(
            spent_at(testnet, index, &session),
            MicroRho(0),
            "node {index}"
        );
    }
    fixture.testnet.shutdown().await;
}

/// A round asked with `dropouts = 1` over four nodes: read in full when all contribute
/// (after the unmasking step removes every node's own mask), read over the other three
/// when one is down, and aborted with nothing read when two are. Its noise is never below
/// the central mechanism's: shares are sized for the three nodes sure to be in the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_asked_with_dropouts_survives_a_node_down() {
    let mut fixture = start_testnet(4, 2_000, BUDGET).await;
    let session = researcher(&fixture.testnet).await;
    let options = QueryOptions {
        dropouts: 1,
        ..secure_options(&session)
    };
    let nodes = fixture.testnet.addresses();
    let query = sql::compile(COUNT).unwrap();

    let answer = within(
        "a secure count of four",
        session.query(&nodes, COUNT, &options),
    )
    .await
    .unwrap();
    assert_only_masked(&answer);
    assert!(!answer.aborted, "{answer:#?}");
    assert!(answer.recovered_without.is_empty());
    // Every node's own mask is in its words: without the unmasking, even the sum of all
    // four contributions reads as nothing.
    let words: Vec<&[u64]> = answer
        .answered
        .iter()
        .map(|a| match &a.release {
            Release::Masked { words, .. } => words.as_slice(),
            other => panic!("{other:?}"),
        })
        .collect();
    let raw = renkei_protocol::masks::sum_masked(&words);
    assert!(raw.iter().all(|v| v.unsigned_abs() > 1 << 40), "{raw:?}");
    let sd = answer.std_dev.unwrap();
    // Four shares sized for three: sqrt(4/3) times the central sd.
    let expected = central_sd() * (4.0f64 / 3.0).sqrt();
    assert!((sd / expected - 1.0).abs() < 0.02, "{sd} vs {expected}");
    let truth = fixture.testnet.true_count(&query) as f64;
    let estimate = answer.estimate.unwrap().as_f64();
    assert!(
        (estimate - truth).abs() <= 6.0 * sd,
        "{estimate} vs {truth}"
    );

    let down = fixture.testnet.nodes[1].peer_id.to_base58();
    within("stopping a node", fixture.testnet.stop_node(1)).await;
    let answer = within(
        "a secure count with one node down",
        session.query(&nodes, COUNT, &options),
    )
    .await
    .unwrap();
    assert_only_masked(&answer);
    assert!(!answer.aborted, "{answer:#?}");
    assert_eq!(answer.answered.len(), 3);
    assert_eq!(answer.recovered_without, vec![down.clone()]);
    let sd = answer.std_dev.unwrap();
    assert!(sd >= central_sd() * 0.999, "{sd} < {}", central_sd());
    let truth = fixture.testnet.true_count_on(&[0, 2, 3], &query) as f64;
    let estimate = answer.estimate.unwrap().as_f64();
    assert!(
        (estimate - truth).abs() <= 6.0 * sd,
        "{estimate} vs {truth}"
    );
    // The survivors were charged once for the round; the node that was down, never.
    for index in [0, 2, 3] {
        assert_eq!(
            spent_at(&fixture.testnet, index, &session),
            MicroRho(2 * RHO.0),
            "node {index}"
        );
    }

    within("stopping another node", fixture.testnet.stop_node(2)).await;
    let answer = within(
        "a secure count with two nodes down",
        session.query(&nodes, COUNT, &options),
    )
    .await
    .unwrap();
    assert!(answer.aborted, "{answer:#?}");
    assert_eq!(answer.estimate, None);
    assert!(answer.recovered_without.is_empty());
    let note = answer.note.as_deref().unwrap();
    assert!(note.contains("at most 1 missing"), "{note}");
    fixture.testnet.shutdown().await;
}

/// The unmasking steps as an aggregator that does not follow them would take them: a node
/// settles one set of survivors per round, takes part only as a survivor of a round it
/// contributed to and only for the researcher who signed it, and reveals its own mask only
/// when every survivor has committed to the same set. An aggregator that names node 0 a
/// survivor to node 0 but dropped to the others (to strip node 0's pairwise masks and then
/// its own) gets the others' pairwise masks but never node 0's own mask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasking_cannot_be_played_against_a_node() {
    use renkei_protocol::envelope::Signature;
    use renkei_protocol::transport::EncodedRequest;
    use renkei_protocol::{
        PublicKey, Purpose, QueryResponse, SignedEnvelope, UnmaskRequest, Unmasking,
    };

    let mut fixture = start_testnet(3, 1_000, BUDGET).await;
    let session = researcher(&fixture.testnet).await;
    let options = QueryOptions {
        dropouts: 1,
        ..secure_options(&session)
    };
    let nodes = fixture.testnet.addresses();
    let keys: Vec<PublicKey> = nodes
        .iter()
        .map(|n| PublicKey::from_peer_id(&n.peer_id).unwrap())
        .collect();
    let ask = |node: usize, request: EncodedRequest| {
        session.client().ask(
            nodes[node].peer_id,
            nodes[node].address.clone(),
            request,
            options.deadline,
        )
    };
    let step = |round: &SignedEnvelope,
                signer: &SecretKey,
                survivors: &[usize],
                commitments: Vec<(PublicKey, Signature)>| {
        let mut survivors: Vec<PublicKey> = survivors.iter().map(|i| keys[*i]).collect();
        survivors.sort();
        let request = UnmaskRequest {
            round: round.clone(),
            survivors,
            commitments,
        };
        EncodedRequest::encode(
            &SignedEnvelope::seal(Purpose::UnmaskRequest, signer, &request).unwrap(),
        )
        .unwrap()
    };
    let refused = |reply: QueryResponse| match reply {
        QueryResponse::Refused(refusal) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let unmasked = |reply: QueryResponse| match reply {
        QueryResponse::Unmasked(envelope) => envelope
            .open::<Unmasking>(Purpose::NodeUnmasking, 1 << 20)
            .unwrap(),
        other => panic!("expected an unmasking, got {other:?}"),
    };

    // A round finished by the aggregator as it should be.
    let finished = sign_round(&session, &options, &nodes);
    let answer = within(
        "a recoverable secure count",
        renkei_aggregator::fan_out(
            session.client(),
            session.policy(),
            &nodes,
            &finished,
            session.key(),
            options.deadline,
        ),
    )
    .await
    .unwrap();
    assert!(!answer.aborted, "{answer:#?}");
    let round = &finished.envelope;
    // Settled for all three: claiming node 1 dropped is refused.
    let conflict = refused(
        ask(0, step(round, session.key(), &[0, 2], vec![]))
            .await
            .unwrap(),
    );
    assert_eq!(conflict.code, RefusalCode::RoundConflict, "{conflict:?}");
    assert!(conflict.reason.contains("another set"), "{conflict:?}");
    // The settled set is answered again, the same way.
    let again = || ask(2, step(round, session.key(), &[0, 1, 2], vec![]));
    assert_eq!(
        unmasked(again().await.unwrap()),
        unmasked(again().await.unwrap())
    );
    // Only survivors take part, and only for the round's researcher.
    let outsider = refused(
        ask(1, step(round, session.key(), &[0, 2], vec![]))
            .await
            .unwrap(),
    );
    assert_eq!(outsider.code, RefusalCode::MalformedRequest, "{outsider:?}");
    assert!(
        outsider.reason.contains("not among the survivors"),
        "{outsider:?}"
    );
    let stranger = SecretKey::generate().unwrap();
    let forged = refused(
        ask(2, step(round, &stranger, &[0, 1, 2], vec![]))
            .await
            .unwrap(),
    );
    assert_eq!(forged.code, RefusalCode::UnknownResearcher, "{forged:?}");

    // A fresh round whose steps the aggregator plays itself.
    let played = sign_round(&session, &options, &nodes);
    let query = EncodedRequest::encode(&played.envelope).unwrap();
    for node in 0..3 {
        let reply = ask(node, query.clone()).await.unwrap();
        assert!(matches!(reply, QueryResponse::Answered(_)), "{reply:?}");
    }
    let round = &played.envelope;
    // Node 0 is told it survives; nodes 1 and 2 are told it dropped out.
    let zero = unmasked(
        ask(0, step(round, session.key(), &[0, 1, 2], vec![]))
            .await
            .unwrap(),
    );
    let mut others = Vec::new();
    for node in [1, 2] {
        let settled = unmasked(
            ask(node, step(round, session.key(), &[1, 2], vec![]))
                .await
                .unwrap(),
        );
        assert_eq!(settled.dropped_masks.len(), 1);
        assert!(settled.own_mask.is_empty());
        others.push((keys[node], settled.commitment));
    }
    // Node 0's own mask needs every survivor's commitment to {0, 1, 2}: theirs are to
    // {1, 2}, and they will not commit to another set.
    let mut commitments = vec![(keys[0], zero.commitment)];
    commitments.extend(others.iter().copied());
    let bad = refused(
        ask(0, step(round, session.key(), &[0, 1, 2], commitments))
            .await
            .unwrap(),
    );
    assert_eq!(bad.code, RefusalCode::BadSignature, "{bad:?}");
    let short = refused(
        ask(
            0,
            step(
                round,
                session.key(),
                &[0, 1, 2],
                vec![(keys[0], zero.commitment)],
            ),
        )
        .await
        .unwrap(),
    );
    assert_eq!(short.code, RefusalCode::MalformedRequest, "{short:?}");
    let turned = refused(
        ask(1, step(round, session.key(), &[0, 1, 2], vec![]))
            .await
            .unwrap(),
    );
    assert_eq!(turned.code, RefusalCode::RoundConflict, "{turned:?}");
    // The set nodes 1 and 2 did commit to is revealed in full once both commitments are shown.
    // A round asked without dropouts has nothing to unmask.
    let plain = sign_round(
        &session,
        &QueryOptions {
            dropouts: 0,
            ..options.clone()
        },
        &nodes,
    );
    let nothing = refused(
        ask(0, step(&plain.envelope, session.key(), &[0, 1, 2], vec![]))
            .await
            .unwrap(),
    );
    assert_eq!(nothing.code, RefusalCode::MalformedRequest, "{nothing:?}");
    let revealed = unmasked(
        ask(1, step(round, session.key(), &[1, 2], others.clone()))
            .await
            .unwrap(),
    );
    assert_eq!(revealed.own_mask.len(), 1);
    assert!(revealed.dropped_masks.is_empty());

    // A settled set outlives a restart: node 1 still refuses to turn.
    let played_round = played.envelope.clone();
    within("restarting a node", fixture.testnet.restart_node(1))
        .await
        .unwrap();
    let node = &fixture.testnet.addresses()[1];
    let reply = within(
        "a settle step after a restart",
        session.client().ask(
            node.peer_id,
            node.address.clone(),
            step(&played_round, session.key(), &[0, 1, 2], vec![]),
            options.deadline,
        ),
    )
    .await
    .unwrap();
    let turned = refused(reply);
    assert_eq!(turned.code, RefusalCode::RoundConflict, "{turned:?}");
    fixture.testnet.shutdown().await;
}
