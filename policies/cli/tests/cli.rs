//! The admins' workflow through the `renkei-policy` binary: encrypted keys, a policy source
//! built with the editing commands, two admins signing separately, verification, and a
//! tampered file refused.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

const PASSPHRASE: &str = "two admins, one consortium";

fn policy_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_renkei-policy"))
        .args(args)
        .env("RENKEI_PASSPHRASE", PASSPHRASE)
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

fn stderr(output: &Output) -> String {
    assert!(!output.status.success(), "unexpectedly succeeded");
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn admins_build_sign_and_verify_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = stdout(&policy_cli(&["keygen", "--out", &path(d, "alice.key")]));
    let bob = stdout(&policy_cli(&["keygen", "--out", &path(d, "bob.key")]));
    assert_eq!(alice.len(), 64);
    // The key is encrypted at rest: the seed is not in the file.
    let key_text = std::fs::read_to_string(d.join("alice.key")).unwrap();
    assert!(key_text.contains("encrypted"), "{key_text}");
    // keygen never overwrites a key.
    stderr(&policy_cli(&["keygen", "--out", &path(d, "alice.key")]));

    let source = path(d, "policy.toml");
    stdout(&policy_cli(&[
        "new",
        "--consortium",
        "covid19-test",
        "--admin",
        &alice,
        "--out",
        &source,
    ]));
    // Two admins, both must sign.
    let text = std::fs::read_to_string(&source).unwrap();
    let text = text
        .replace(
            &format!("admins = [\"{alice}\"]"),
            &format!("admins = [\n    \"{alice}\",\n    \"{bob}\",\n]"),
        )
        .replace("threshold = 1", "threshold = 2");
    std::fs::write(&source, text).unwrap();

    let researcher = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    stdout(&policy_cli(&[
        "researcher",
        "add",
        "--in",
        &source,
        "--name",
        "Dr. Sato",
        "--key",
        researcher,
    ]));
    stdout(&policy_cli(&[
        "study",
        "add",
        "--in",
        &source,
        "--id",
        "severity",
        "--title",
        "Risk factors of severe COVID-19",
        "--pi",
        "Dr. Sato",
        "--views",
        "patients",
        "--columns",
        "age,sex,severity",
        "--budget-per-researcher",
        "2.5",
        "--from",
        "2026-01-01T00:00:00Z",
        "--until",
        "2027-12-31T00:00:00Z",
    ]));
    let granted = stdout(&policy_cli(&[
        "grant",
        "--in",
        &source,
        "--study",
        "severity",
        "--researcher",
        researcher,
    ]));
    assert!(granted.contains("version 4"), "{granted}");
    // Granting a study that does not exist is an error that says what to do.
    let missing = stderr(&policy_cli(&[
        "grant",
        "--in",
        &source,
        "--study",
        "genomes",
        "--researcher",
        researcher,
    ]));
    assert!(missing.contains("study add"), "{missing}");

    let signed = path(d, "policy.json");
    stdout(&policy_cli(&[
        "sign",
        "--key",
        &path(d, "alice.key"),
        "--in",
        &source,
        "--out",
        &signed,
    ]));
    let one = stderr(&policy_cli(&["verify", "--policy", &signed]));
    assert!(
        one.contains("1 valid admin signature(s); 2 are required"),
        "{one}"
    );
    stdout(&policy_cli(&[
        "sign",
        "--key",
        &path(d, "bob.key"),
        "--in",
        &signed,
        "--out",
        &signed,
    ]));
    let verified = stdout(&policy_cli(&["verify", "--policy", &signed]));
    assert!(verified.contains("v4 signed by 2 of 2"), "{verified}");
    let shown = stdout(&policy_cli(&["show", "--policy", &signed]));
    assert!(shown.contains("consortium = \"covid19-test\""), "{shown}");
    assert!(shown.contains("id = \"severity\""), "{shown}");

    // A wrong passphrase cannot sign.
    let wrong = Command::new(env!("CARGO_BIN_EXE_renkei-policy"))
        .args([
            "sign",
            "--key",
            &path(d, "alice.key"),
            "--in",
            &source,
            "--out",
            &path(d, "x.json"),
        ])
        .env("RENKEI_PASSPHRASE", "guess")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase"));

    // Revoking takes the researcher out of every study and lists the key as revoked.
    stdout(&policy_cli(&[
        "revoke",
        "--in",
        &source,
        "--researcher",
        researcher,
    ]));
    let after = std::fs::read_to_string(&source).unwrap();
    assert!(after.contains("revoked = [\"d75a98"), "{after}");

    // A study limited to secure totals, and a consortium that tolerates one colluding node.
    stdout(&policy_cli(&[
        "study",
        "add",
        "--in",
        &source,
        "--id",
        "cytokines",
        "--title",
        "Cytokine storms",
        "--pi",
        "Dr. Sato",
        "--views",
        "patients",
        "--budget-per-researcher",
        "1",
        "--from",
        "2026-01-01T00:00:00Z",
        "--until",
        "2027-12-31T00:00:00Z",
        "--secure-only",
    ]));
    stdout(&policy_cli(&[
        "limits",
        "--in",
        &source,
        "--secure-colluders",
        "1",
        "--min-cell-size",
        "11",
    ]));
    let bundle =
        renkei_policies::PolicyBundle::from_toml(&std::fs::read_to_string(&source).unwrap())
            .unwrap();
    assert_eq!(bundle.limits.secure_colluders, 1);
    assert_eq!(bundle.limits.min_cell_size, 11);
    assert!(bundle.study("severity").unwrap().per_site_answers);
    assert!(!bundle.study("cytokines").unwrap().per_site_answers);
    let bad = stderr(&policy_cli(&[
        "limits",
        "--in",
        &source,
        "--report-delta",
        "2",
    ]));
    assert!(bad.contains("--report-delta"), "{bad}");

    // Change one byte of the signed bundle: verification fails and names the signer.
    let text = std::fs::read_to_string(&signed).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bundle = json["bundle"].as_str().unwrap().to_string();
    let last = if bundle.ends_with('0') { "1" } else { "0" };
    json["bundle"] = format!("{}{last}", &bundle[..bundle.len() - 1]).into();
    std::fs::write(d.join("tampered.json"), json.to_string()).unwrap();
    let tampered = stderr(&policy_cli(&[
        "verify",
        "--policy",
        &path(d, "tampered.json"),
    ]));
    assert!(tampered.contains("does not verify"), "{tampered}");
}

#[test]
fn admins_and_the_threshold_are_set_by_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            stdout(&policy_cli(&[
                "keygen",
                "--plain",
                "--out",
                &path(d, &format!("{name}.key")),
            ]))
        })
        .collect();
    let source = path(d, "policy.toml");
    // --admin repeats, and takes comma-separated keys.
    stdout(&policy_cli(&[
        "new",
        "--consortium",
        "c",
        "--admin",
        &format!("{},{}", keys[0], keys[1]),
        "--out",
        &source,
    ]));
    let text = std::fs::read_to_string(&source).unwrap();
    assert!(text.contains(&keys[0]) && text.contains(&keys[1]), "{text}");
    stdout(&policy_cli(&[
        "admin", "add", "--in", &source, "--key", &keys[2],
    ]));
    stdout(&policy_cli(&["threshold", "--in", &source, "--set", "3"]));
    let text = std::fs::read_to_string(&source).unwrap();
    assert!(text.contains("threshold = 3"), "{text}");
    assert!(text.contains(&keys[2]), "{text}");
    // Removing an admin below the threshold is refused, with what to do.
    let refused = stderr(&policy_cli(&[
        "admin", "remove", "--in", &source, "--key", &keys[1],
    ]));
    assert!(refused.contains("lower it first"), "{refused}");
    stdout(&policy_cli(&["threshold", "--in", &source, "--set", "2"]));
    stdout(&policy_cli(&[
        "admin", "remove", "--in", &source, "--key", &keys[1],
    ]));
    let text = std::fs::read_to_string(&source).unwrap();
    assert!(!text.contains(&keys[1]), "{text}");
    let too_high = stderr(&policy_cli(&["threshold", "--in", &source, "--set", "3"]));
    assert!(
        too_high.contains("between 1 and the 2 admin(s)"),
        "{too_high}"
    );
    // A bad key is quoted whole in the error.
    let bad = format!("{}zz", keys[0]);
    let refused = stderr(&policy_cli(&[
        "admin", "add", "--in", &source, "--key", &bad,
    ]));
    assert!(refused.contains(&bad), "{refused}");
    let twice = stderr(&policy_cli(&[
        "admin", "add", "--in", &source, "--key", &keys[0],
    ]));
    assert!(twice.contains("already an admin"), "{twice}");
}

/// `study add` checks the study's views and columns against the nodes' schema: a bogus
/// view or a misspelled column is refused with what was probably meant, and the file is
/// left as it was.
#[test]
fn a_study_naming_what_the_schema_lacks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = stdout(&policy_cli(&["keygen", "--out", &path(d, "admin.key")]));
    let source = path(d, "policy.toml");
    stdout(&policy_cli(&[
        "new",
        "--consortium",
        "covid19-test",
        "--admin",
        &admin,
        "--out",
        &source,
    ]));
    let before = std::fs::read_to_string(&source).unwrap();
    let add = |views: &str, columns: &str| {
        policy_cli(&[
            "study",
            "add",
            "--in",
            &source,
            "--id",
            "severity",
            "--title",
            "Risk factors",
            "--pi",
            "Dr. Sato",
            "--views",
            views,
            "--columns",
            columns,
            "--budget-per-researcher",
            "1",
            "--from",
            "2026-01-01T00:00:00Z",
            "--until",
            "2027-12-31T00:00:00Z",
        ])
    };
    let bogus = stderr(&add("patients,bogusview", "age"));
    assert!(bogus.contains("no view `bogusview`"), "{bogus}");
    assert!(
        bogus.contains("timepoints"),
        "the known views are listed: {bogus}"
    );
    let typo = stderr(&add("patients,timepoints", "age,diabetis"));
    assert!(typo.contains("did you mean `diabetes`?"), "{typo}");
    // A timepoint column on a study of patients only is not one of its views' columns.
    let elsewhere = stderr(&add("patients", "crp"));
    assert!(elsewhere.contains("no column `crp`"), "{elsewhere}");
    assert_eq!(std::fs::read_to_string(&source).unwrap(), before);
    // Another schema file, named with --schema, is checked instead.
    let schema = path(d, "schema.toml");
    std::fs::write(
        &schema,
        "name = \"small\"\nversion = 1\nmax_timepoints_per_patient = 1\n\
         [[patients]]\nname = \"weight\"\ntype = \"integer\"\nmin = 0\nmax = 300\n\
         [[timepoints]]\nname = \"crp\"\ntype = \"integer\"\nmin = 0\nmax = 10\n",
    )
    .unwrap();
    let with_schema = |columns: &str| {
        let mut args = vec![
            "study",
            "add",
            "--in",
            &source,
            "--id",
            "weights",
            "--title",
            "Weights",
            "--pi",
            "Dr. Sato",
            "--views",
            "patients",
            "--budget-per-researcher",
            "1",
            "--from",
            "2026-01-01T00:00:00Z",
            "--until",
            "2027-12-31T00:00:00Z",
            "--schema",
            &schema,
            "--columns",
        ];
        args.push(columns);
        policy_cli(&args)
    };
    let refused = stderr(&with_schema("age"));
    assert!(refused.contains("no column `age`"), "{refused}");
    stdout(&with_schema("weight"));
}
