//! Shared helpers for renkei's multi-node tests: start a small testnet of real nodes on
//! 127.0.0.1 in a temporary directory, open the dev researcher's session, and bound every
//! await with a timeout so a hang fails the test instead of stalling CI.

use std::future::Future;
use std::time::Duration;

use renkei_aggregator::{NetworkClient, NodeAddress, ResearcherSession};
use renkei_policies::{PolicyBundle, SignedPolicy};
use renkei_protocol::{MicroRho, PolicyRequest, PolicyResponse, SecretKey};
use renkei_testnet::{Testnet, TestnetConfig};

/// The longest any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(60);

/// Awaits `future`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {STEP:?}"),
    }
}

/// A testnet in its own temporary directory (removed when dropped).
#[derive(Debug)]
pub struct TestnetFixture {
    pub testnet: Testnet,
    pub dir: tempfile::TempDir,
}

/// Starts `nodes` real nodes with `patients` in all and `budget` per node for the dev
/// researcher.
pub async fn start_testnet(nodes: usize, patients: usize, budget: MicroRho) -> TestnetFixture {
    start_testnet_with(nodes, patients, 0, budget).await
}

/// As [`start_testnet`], with `full_data` patients in all who have DICOM and FASTQ items.
pub async fn start_testnet_with(
    nodes: usize,
    patients: usize,
    full_data: usize,
    budget: MicroRho,
) -> TestnetFixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = TestnetConfig {
        nodes,
        patients,
        full_data_patients: full_data,
        budget,
        seed: 7,
        ..TestnetConfig::new(dir.path().join("net"))
    };
    let testnet = within("starting the testnet", Testnet::start(config))
        .await
        .expect("testnet starts");
    TestnetFixture { testnet, dir }
}

/// The dev researcher's session for `testnet`.
pub async fn researcher(testnet: &Testnet) -> ResearcherSession {
    let key = SecretKey::read_file(&testnet.consortium.researcher_key).expect("researcher key");
    let policy = SignedPolicy::read_file(&testnet.consortium.policy)
        .expect("policy file")
        .verify_self_anchored()
        .expect("policy verifies");
    let client = within("starting the client", NetworkClient::start(None))
        .await
        .expect("client starts");
    ResearcherSession::new(key, policy, client)
}

/// The dev consortium's admin key.
pub fn admin(testnet: &Testnet) -> SecretKey {
    SecretKey::read_file(&testnet.consortium.admin_key).expect("admin key")
}

/// The testnet's first bundle, to derive new versions from.
pub fn current(testnet: &Testnet) -> PolicyBundle {
    SignedPolicy::read_file(&testnet.consortium.policy)
        .expect("policy file")
        .verify_self_anchored()
        .expect("policy verifies")
        .bundle()
        .clone()
}

/// `bundle` signed by each of `by`.
pub fn signed(bundle: &PolicyBundle, by: &[&SecretKey]) -> SignedPolicy {
    let mut signed = SignedPolicy::unsigned(bundle).expect("bundle encodes");
    for key in by {
        signed.sign(key);
    }
    signed
}

/// Offers `bundle` to `node` and returns its decision.
pub async fn offer(
    session: &ResearcherSession,
    node: &NodeAddress,
    bundle: &SignedPolicy,
) -> PolicyResponse {
    within(
        "offering a bundle",
        session.client().policy(
            node.peer_id,
            node.address.clone(),
            PolicyRequest::Offer(bundle.to_transfer()),
            Duration::from_secs(20),
        ),
    )
    .await
    .expect("the node answers the offer")
}

/// Offers `bundle` to every node; each must take it (or already have it from a peer).
pub async fn publish_all(
    session: &ResearcherSession,
    nodes: &[NodeAddress],
    bundle: &SignedPolicy,
) {
    for node in nodes {
        let response = offer(session, node, bundle).await;
        assert!(
            matches!(
                response,
                PolicyResponse::Accepted { .. } | PolicyResponse::AlreadyActive { .. }
            ),
            "{response:?}"
        );
    }
}
