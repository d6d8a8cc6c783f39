//! Crash safety of the privacy ledger: a real `renkei-node serve` process is killed with
//! SIGKILL at random moments while answering a stream of queries, again and again. After
//! every kill the spend on disk is at least the sum of the answers the researcher received:
//! nothing is ever released uncharged; every charge on disk has its recorded answer and the
//! spend is exactly the recorded charges. Requests whose replies were lost are resent after
//! the restart and answered; requests answered before, resent, come back identical.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use renkei_aggregator::{NetworkClient, NodeAddress, PreparedQuery, QueryOptions};
use renkei_node::NodeHome;
use renkei_node::ingest::ingest_patients;
use renkei_node::privacy::ledger::PrivacyLedger;
use renkei_policies::{Member, PolicyBundle, QueryLimits, Researcher, SignedPolicy};
use renkei_protocol::Release;
use renkei_protocol::limits::MAX_RESPONSE_BYTES;
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    Answer, MicroRho, PrivacyRequest, Purpose, Query, QueryResponse, RequestId, SecretKey, unix_now,
};
use tokio::io::{AsyncBufReadExt, BufReader};

const HEADER: &str = "patient_id,age,sex,severity,diabetes,hypertension,chronic_lung_disease,cardiovascular_disease,kidney_disease,cancer,obesity,consent_secondary_use\n";
const STUDY: &str = "crash";
const COST: MicroRho = MicroRho(10_000);
const CYCLES: usize = 12;
/// Queries kept in flight at once while the node is being killed.
const IN_FLIGHT: usize = 4;

/// Starts `renkei-node serve` and returns the child with the address it printed.
async fn serve(
    dir: &std::path::Path,
    policy: &std::path::Path,
) -> (tokio::process::Child, NodeAddress) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_renkei-node"))
        .args(["serve", "--dir"])
        .arg(dir)
        .arg("--policy")
        .arg(policy)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("renkei-node starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the node prints its address")
        .expect("stdout readable")
        .expect("an address line");
    (child, line.parse().expect("a full node address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_releases_an_uncharged_answer() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let (home, peer_id) = NodeHome::init(&node_dir).unwrap();
    let csv = dir.path().join("patients.csv");
    let mut rows = String::from(HEADER);
    for i in 0..200 {
        rows.push_str(&format!(
            "P{i},{},male,moderate,no,yes,no,no,no,no,no,yes\n",
            20 + i % 70
        ));
    }
    std::fs::write(&csv, rows).unwrap();
    ingest_patients(&home.open_store().unwrap(), &csv, false).unwrap();

    let admin = SecretKey::generate().unwrap();
    let researcher = Arc::new(SecretKey::generate().unwrap());
    let bundle = PolicyBundle::development(
        admin.public_key(),
        vec![Member {
            peer_id: peer_id.to_base58(),
            institution: "Hospital K".into(),
            addresses: vec![],
        }],
        Researcher {
            name: "Dr. Crash".into(),
            public_key: researcher.public_key(),
            affiliation: String::new(),
        },
        STUDY,
        MicroRho(10_000 * MicroRho::PER_RHO),
        QueryLimits {
            min_cell_size: 0,
            ..QueryLimits::default()
        },
        unix_now(),
    );
    let mut signed = SignedPolicy::unsigned(&bundle).unwrap();
    signed.sign(&admin);
    let policy = dir.path().join("policy.json");
    signed.write_file(&policy).unwrap();

    let client = NetworkClient::start(None).await.unwrap();
    // Every answer received, by request: a request answered twice (a resend) must come back
    // with the same value and count once.
    let released: Arc<Mutex<HashMap<RequestId, (Release, MicroRho)>>> = Arc::default();
    // Requests whose reply was lost when the node died; they are resent after the restart.
    let lost: Arc<Mutex<Vec<PreparedQuery>>> = Arc::default();
    // A few requests that were answered; resent after the restart, they must come back
    // identical (from the record, not fresh noise).
    let answered: Arc<Mutex<Vec<PreparedQuery>>> = Arc::default();
    let mut resent_identical = 0usize;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let mut resent_answered = 0usize;
    for cycle in 0..CYCLES {
        let (mut child, node) = serve(&node_dir, &policy).await;
        // Resend some answered before: the very same answer.
        let to_repeat: Vec<PreparedQuery> = std::mem::take(&mut *answered.lock().unwrap());
        for prepared in to_repeat {
            let answer = resend(&client, &node, &prepared).await;
            let released = released.lock().unwrap();
            let (first, _) = &released[&answer.request_id];
            assert_eq!(*first, answer.release, "a resent request drew fresh noise");
            resent_identical += 1;
        }
        // Resend what was lost: the node answers each once, from its record or fresh.
        let to_resend: Vec<PreparedQuery> = std::mem::take(&mut *lost.lock().unwrap());
        for prepared in to_resend {
            let answer = resend(&client, &node, &prepared).await;
            let mut released = released.lock().unwrap();
            if let Some((value, _)) = released.get(&answer.request_id) {
                assert_eq!(*value, answer.release, "a resent request drew fresh noise");
            }
            released.insert(answer.request_id, (answer.release, answer.rho_spent));
            resent_answered += 1;
        }
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (client, node, researcher, released, lost, answered) = (
                client.clone(),
                node.clone(),
                Arc::clone(&researcher),
                Arc::clone(&released),
                Arc::clone(&lost),
                Arc::clone(&answered),
            );
            workers.spawn(async move {
                loop {
                    let query = Query::count_patients("patients", renkei_protocol::Filter::True);
                    let options = QueryOptions {
                        study: STUDY.into(),
                        privacy: PrivacyRequest::Zcdp { rho: COST },
                        deadline: Duration::from_secs(5),
                        secure: false,
                        dropouts: 0,
                        dry_run: false,
                    };
                    let prepared = PreparedQuery::sign(
                        &researcher,
                        query,
                        &options,
                        None,
                        std::slice::from_ref(&node),
                        unix_now(),
                    )
                    .unwrap();
                    let request = EncodedRequest::encode(&prepared.envelope).unwrap();
                    let reply = client
                        .ask(
                            node.peer_id,
                            node.address.clone(),
                            request,
                            Duration::from_secs(5),
                        )
                        .await;
                    match reply {
                        Ok(QueryResponse::Answered(envelope)) => {
                            let answer: Answer = envelope
                                .open(Purpose::NodeAnswer, MAX_RESPONSE_BYTES)
                                .unwrap();
                            assert_eq!(answer.request_id, prepared.request.request_id);
                            released
                                .lock()
                                .unwrap()
                                .insert(answer.request_id, (answer.release, answer.rho_spent));
                            let mut answered = answered.lock().unwrap();
                            if answered.len() < 2 {
                                answered.push(prepared);
                            }
                        }
                        Ok(other) => panic!("not answered: {other:?}"),
                        // The node died under us: resend this one after the restart.
                        Err(_) => {
                            lost.lock().unwrap().push(prepared);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
        }
        let delay = rng.gen_range(5..400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        workers.abort_all();
        while let Some(ended) = workers.join_next().await {
            if let Err(e) = ended
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }

        let store = NodeHome::open(&node_dir).unwrap().open_store().unwrap();
        let ledger = PrivacyLedger::new(store);
        let spent = ledger.spent(&researcher.public_key(), STUDY).unwrap();
        // Every charge on disk has its answer, and the spend is exactly those charges.
        let records = ledger.requests().unwrap();
        assert!(
            records.iter().all(|r| r.answer.is_some()),
            "cycle {cycle}: a charge on disk without its answer"
        );
        assert_eq!(
            spent.0,
            records.len() as u64 * COST.0,
            "cycle {cycle}: the spend is not the sum of the recorded charges"
        );
        let released_now: u64 = released
            .lock()
            .unwrap()
            .values()
            .map(|(_, rho)| rho.0)
            .sum();
        assert!(
            spent.0 >= released_now,
            "cycle {cycle} (killed after {delay} ms): spend on disk {spent} < released {}",
            MicroRho(released_now)
        );
    }
    let answers_seen = released.lock().unwrap().len() as u64;
    // The test must have exercised the node, not just killed it before it answered, and
    // the resend path must have been taken.
    assert!(resent_answered > 0, "no request was lost and resent");
    assert!(resent_identical > 0, "no answered request was resent");
    assert!(
        answers_seen >= CYCLES as u64,
        "only {answers_seen} answers in {CYCLES} cycles"
    );
}

/// Sends `prepared` again to the restarted node; it must be answered.
async fn resend(client: &NetworkClient, node: &NodeAddress, prepared: &PreparedQuery) -> Answer {
    let request = EncodedRequest::encode(&prepared.envelope).unwrap();
    let reply = client
        .ask(
            node.peer_id,
            node.address.clone(),
            request,
            Duration::from_secs(10),
        )
        .await;
    let Ok(QueryResponse::Answered(envelope)) = reply else {
        panic!("a resent request was not answered: {reply:?}");
    };
    envelope
        .open(Purpose::NodeAnswer, MAX_RESPONSE_BYTES)
        .unwrap()
}
