//! Shared helpers for renkei's multi-node tests: start a small testnet of real nodes on
//! 127.0.0.1 in a temporary directory, open the dev researcher's session, and bound every
//! await with a timeout so a hang fails the test instead of stalling CI.

use std::future::Future;
use std::time::Duration;

use renkei_aggregator::{NetworkClient, ResearcherSession};
use renkei_policies::SignedPolicy;
use renkei_protocol::{MicroRho, SecretKey};
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
