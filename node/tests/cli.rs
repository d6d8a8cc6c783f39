//! The hospital's workflow through the `renkei-node` binary: init, a bad CSV refused with
//! its line and nothing written, a good CSV loaded, a second init refused.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn node_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_renkei-node"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("renkei-node runs")
}

const HEADER: &str = "patient_id,age,sex,severity,diabetes,hypertension,chronic_lung_disease,cardiovascular_disease,kidney_disease,cancer,obesity,consent_secondary_use\n";

#[test]
fn init_ingest_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    let node = node.to_str().unwrap();
    let init = node_cli(&["init", "--dir", node]);
    assert!(init.status.success());
    let peer_id = String::from_utf8_lossy(&init.stdout).trim().to_string();
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    let again = node_cli(&["init", "--dir", node]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already an initialised node"));

    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!("{HEADER}P1,44,female,mild,no,no,no,no,no,no,no,yes\nP2,51,female,awful,no,no,no,no,no,no,no,yes\n"),
    )
    .unwrap();
    let refused = node_cli(&["ingest", "--dir", node, "--patients", bad.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("bad.csv:3 column `severity`"), "{stderr}");
    assert!(
        stderr.contains("mild, moderate, severe, critical"),
        "{stderr}"
    );
    let status = node_cli(&["status", "--dir", node]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("0 consented, 0 withheld"));

    let good = dir.path().join("good.csv");
    std::fs::write(
        &good,
        format!("{HEADER}P1,44,female,mild,no,no,no,no,no,no,no,yes\nP2,51,male,severe,yes,no,no,no,no,no,no,no\n"),
    )
    .unwrap();
    let loaded = node_cli(&[
        "ingest",
        "--dir",
        node,
        "--patients",
        good.to_str().unwrap(),
    ]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let status = node_cli(&["status", "--dir", node]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&peer_id) && text.contains("1 consented, 1 withheld"),
        "{text}"
    );
}
