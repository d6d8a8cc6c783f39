//! The admins' workflow through the `renkei-policy` binary: keys, a starter policy, two
//! admins signing separately, verification, and a tampered file refused.

use std::path::Path;
use std::process::{Command, Output};

fn policy_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_renkei-policy"))
        .args(args)
        .output()
        .expect("renkei-policy runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn two_admins_sign_separately_and_tampering_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = stdout(&policy_cli(&["keygen", "--out", &path(d, "alice.key")]));
    let bob = stdout(&policy_cli(&["keygen", "--out", &path(d, "bob.key")]));
    assert_eq!(alice.len(), 64);
    // keygen never overwrites a key.
    assert!(
        !policy_cli(&["keygen", "--out", &path(d, "alice.key")])
            .status
            .success()
    );

    stdout(&policy_cli(&[
        "new",
        "--consortium",
        "covid19-test",
        "--admin",
        &alice,
        "--out",
        &path(d, "policy.toml"),
    ]));
    // Two admins, both must sign.
    let source = std::fs::read_to_string(d.join("policy.toml")).unwrap();
    let source = source
        .replace(
            &format!("admins = [\"{alice}\"]"),
            &format!("admins = [\"{alice}\", \"{bob}\"]"),
        )
        .replace("threshold = 1", "threshold = 2");
    std::fs::write(d.join("policy.toml"), source).unwrap();

    stdout(&policy_cli(&[
        "sign",
        "--key",
        &path(d, "alice.key"),
        "--in",
        &path(d, "policy.toml"),
        "--out",
        &path(d, "policy.json"),
    ]));
    let one = policy_cli(&["verify", "--policy", &path(d, "policy.json")]);
    assert!(!one.status.success());
    assert!(
        String::from_utf8_lossy(&one.stderr).contains("1 valid admin signature(s); 2 are required")
    );

    stdout(&policy_cli(&[
        "sign",
        "--key",
        &path(d, "bob.key"),
        "--in",
        &path(d, "policy.json"),
        "--out",
        &path(d, "policy.json"),
    ]));
    let verified = stdout(&policy_cli(&[
        "verify",
        "--policy",
        &path(d, "policy.json"),
    ]));
    assert!(verified.contains("signed by 2 of 2"), "{verified}");
    let shown = stdout(&policy_cli(&["show", "--policy", &path(d, "policy.json")]));
    assert!(shown.contains("consortium = \"covid19-test\""), "{shown}");

    // Change one byte of the signed bundle: verification fails and names the signer.
    let text = std::fs::read_to_string(d.join("policy.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bundle = json["bundle"].as_str().unwrap().to_string();
    let last = if bundle.ends_with('0') { "1" } else { "0" };
    json["bundle"] = format!("{}{last}", &bundle[..bundle.len() - 1]).into();
    std::fs::write(d.join("tampered.json"), json.to_string()).unwrap();
    let tampered = policy_cli(&["verify", "--policy", &path(d, "tampered.json")]);
    assert!(!tampered.status.success());
    assert!(String::from_utf8_lossy(&tampered.stderr).contains("does not verify"));
}
