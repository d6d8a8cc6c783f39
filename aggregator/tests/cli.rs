//! The researcher's command line against a real node: `renkei-aggregator query --key …
//! --nodes … --format json "SQL"` prints the fields scripts rely on, finds `policy.json`
//! beside the key, names an unreachable node as missing and exits non-zero when nobody
//! answered.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use renkei_node::ingest::ingest_patients;
use renkei_node::service::default_listen;
use renkei_node::{NodeHome, NodeService};
use renkei_policies::{Member, PolicyBundle, QueryLimits, Researcher, SignedPolicy};
use renkei_protocol::{MicroRho, SecretKey};

const HEADER: &str = "patient_id,age,sex,severity,diabetes,hypertension,chronic_lung_disease,cardiovascular_disease,kidney_disease,cancer,obesity,consent_secondary_use\n";

async fn aggregator_cli(args: Vec<String>) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_renkei-aggregator"))
        .args(args)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("renkei-aggregator finishes")
        .expect("renkei-aggregator runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_carries_the_contract_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (home, peer_id) = NodeHome::init(&dir.path().join("node")).unwrap();
    let csv = dir.path().join("patients.csv");
    let mut rows = String::from(HEADER);
    for i in 0..40 {
        rows.push_str(&format!(
            "P{i},{},female,mild,no,no,no,no,no,no,no,yes\n",
            30 + i
        ));
    }
    std::fs::write(&csv, rows).unwrap();
    ingest_patients(&home.open_store().unwrap(), &csv, false).unwrap();

    let consortium = dir.path().join("consortium");
    std::fs::create_dir_all(&consortium).unwrap();
    let admin = SecretKey::generate().unwrap();
    let researcher = SecretKey::generate().unwrap();
    researcher
        .write_file(&consortium.join("researcher.key"))
        .unwrap();
    let bundle = PolicyBundle::development(
        admin.public_key(),
        vec![Member {
            peer_id: peer_id.to_base58(),
            institution: "Hospital CLI".into(),
            addresses: vec![],
        }],
        Researcher {
            name: "Dr. Script".into(),
            public_key: researcher.public_key(),
            affiliation: String::new(),
        },
        "cli",
        MicroRho(5 * MicroRho::PER_RHO),
        QueryLimits::default(),
        renkei_protocol::unix_now(),
    );
    let mut signed = SignedPolicy::unsigned(&bundle).unwrap();
    signed.sign(&admin);
    let policy = consortium.join("policy.json");
    signed.write_file(&policy).unwrap();
    let node = NodeService::start(&home, Some(&policy), default_listen())
        .await
        .unwrap();

    let key = consortium.join("researcher.key").display().to_string();
    let output = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        key.clone(),
        "--nodes".into(),
        node.listen_addr().to_string(),
        "--rho".into(),
        "0.5".into(),
        "--format".into(),
        "json".into(),
        "SELECT COUNT(*) FROM patients WHERE age >= 50".into(),
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let estimate = json["estimate"].as_i64().unwrap();
    // 20 patients are 50 or older; rho 0.5 gives noise sd 1.
    assert!((estimate - 20).abs() <= 6, "estimate {estimate}");
    let ci = json["ci95"].as_array().unwrap();
    assert_eq!(ci.len(), 2);
    assert!(ci[0].as_f64().unwrap() < ci[1].as_f64().unwrap());
    let answered = json["answered"].as_array().unwrap();
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0]["institution"], "Hospital CLI");
    assert_eq!(answered[0]["mechanism"], "discrete_gaussian");
    assert_eq!(answered[0]["rho"].as_f64().unwrap(), 0.5);
    assert!((answered[0]["noise_scale"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(json["missing"].as_array().unwrap().len(), 0);
    assert_eq!(json["refused"].as_array().unwrap().len(), 0);

    assert_eq!(json["mode"], "per_site");
    assert_eq!(json["dry_run"], false);

    // --dry-run --format csv: the cost and the budget, nothing spent.
    let dry = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        key.clone(),
        "--nodes".into(),
        node.listen_addr().to_string(),
        "--rho".into(),
        "0.5".into(),
        "--dry-run".into(),
        "--format".into(),
        "csv".into(),
        "SELECT COUNT(*) FROM patients WHERE age >= 50".into(),
    ])
    .await;
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let text = String::from_utf8_lossy(&dry.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(header.ends_with(",mode,budget_remaining"), "{header}");
    let quoted: Vec<&str> = lines.collect();
    assert_eq!(quoted.len(), 1, "{text}");
    assert!(quoted[0].starts_with("quoted,,"), "{text}");
    // rho 0.5 already spent of 5: 4.5 left, and still 4.5 after the dry run.
    assert!(quoted[0].contains(",0.500000,"), "{text}");
    assert!(quoted[0].ends_with(",per_site,4.500000"), "{text}");

    // The same dry run as a table ends with what was quoted, not "answered 0 of 0".
    let table = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        key.clone(),
        "--nodes".into(),
        node.listen_addr().to_string(),
        "--dry-run".into(),
        "SELECT COUNT(*) FROM patients WHERE age >= 50".into(),
    ])
    .await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("quoted    1 of 1 node(s); nothing was spent"),
        "{text}"
    );
    assert!(!text.contains("answered  0 of 0"), "{text}");

    // A regression as CSV: one `coefficient` row per term, with the fit's own columns, and
    // every row as wide as the header; as JSON, its coefficients and model.
    let fit = |format: &str| {
        aggregator_cli(vec![
            "query".into(),
            "--key".into(),
            key.clone(),
            "--nodes".into(),
            node.listen_addr().to_string(),
            "--rho".into(),
            "0.5".into(),
            "--format".into(),
            format.into(),
            "SELECT LINEAR_REGRESSION(age, age >= 50) FROM patients".into(),
        ])
    };
    let output = fit("csv").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let header = text.lines().next().unwrap();
    assert!(
        header.ends_with(
            ",noise_std_error,p_value,odds_ratio,odds_ratio_ci95_low,odds_ratio_ci95_high"
        ),
        "{header}"
    );
    let width = header.split(',').count();
    let records: Vec<csv::StringRecord> = csv::Reader::from_reader(text.as_bytes())
        .records()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(records.iter().all(|r| r.len() == width), "{text}");
    let terms: Vec<&str> = records
        .iter()
        .filter(|r| &r[0] == "coefficient")
        .map(|r| r.get(1).unwrap())
        .collect();
    assert_eq!(terms, ["intercept", "age >= 50"], "{text}");
    let output = fit("json").await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["aggregate"], "linear_regression");
    assert_eq!(json["regression"]["model"], "linear");
    let slope = &json["regression"]["coefficients"][1];
    let (estimate, se) = (
        slope["estimate"].as_f64().unwrap(),
        slope["std_error"].as_f64().unwrap(),
    );
    // Ages 30..69: those of 50 and over are 20 years older on average.
    assert!((estimate - 20.0).abs() < 4.0 * se, "{json}");
    // 40 patients at rho 0.5: the noise outweighs the residuals, and the answer says so.
    assert!(
        json["note"].is_null() || json["note"].as_str().unwrap().contains("residual"),
        "{json}"
    );

    // Without --nodes, the members the policy lists addresses for are asked (an address
    // without /p2p gets the member's peer id).
    let mut listed = bundle.clone();
    let bare: String = node
        .listen_addr()
        .to_string()
        .split("/p2p/")
        .next()
        .unwrap()
        .to_string();
    listed.members[0].addresses = vec![bare];
    let mut signed_listed = SignedPolicy::unsigned(&listed).unwrap();
    signed_listed.sign(&admin);
    let listed_path = consortium.join("policy-with-addresses.json");
    signed_listed.write_file(&listed_path).unwrap();
    let defaulted = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        key.clone(),
        "--policy".into(),
        listed_path.display().to_string(),
        "--format".into(),
        "json".into(),
        "SELECT COUNT(*) FROM patients".into(),
    ])
    .await;
    assert!(
        defaulted.status.success(),
        "{}",
        String::from_utf8_lossy(&defaulted.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&defaulted.stdout).unwrap();
    assert_eq!(json["answered"].as_array().unwrap().len(), 1, "{json}");

    // Surviving dropouts is a property of secure totals only.
    let refused = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        key.clone(),
        "--nodes".into(),
        node.listen_addr().to_string(),
        "--dropouts".into(),
        "1".into(),
        "SELECT COUNT(*) FROM patients".into(),
    ])
    .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--dropouts applies to secure totals"),
        "{stderr}"
    );

    // The node goes away: the same command reports it missing and exits 3.
    let address = node.listen_addr().to_string();
    node.shutdown().await;
    let output = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        key,
        "--nodes".into(),
        address,
        "--timeout".into(),
        "3".into(),
        "--format".into(),
        "json".into(),
        "SELECT COUNT(*) FROM patients".into(),
    ])
    .await;
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(json["estimate"].is_null());
    assert_eq!(json["missing"].as_array().unwrap().len(), 1);
    assert_eq!(json["missing"][0]["node"], peer_id.to_base58());
}

#[tokio::test]
async fn a_sql_mistake_costs_nothing_and_points_at_itself() {
    let output = aggregator_cli(vec![
        "query".into(),
        "--key".into(),
        "/nonexistent/researcher.key".into(),
        "--nodes".into(),
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
        "SELECT COUNT(*) FROM patients WHERE age > 60 OR sex LIKE 'm%'".into(),
    ])
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 1, column 49"), "{stderr}");
    assert!(stderr.contains('^'), "{stderr}");
}
