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

/// A node initialised in `dir/node` with the patient CSV `patients` loaded.
fn node_with_patients(dir: &std::path::Path, patients: &str) -> std::path::PathBuf {
    let node = dir.join("node");
    let node_dir = node.to_str().unwrap();
    assert!(node_cli(&["init", "--dir", node_dir]).status.success());
    let csv = dir.join("p.csv");
    std::fs::write(&csv, patients).unwrap();
    let loaded = node_cli(&[
        "ingest",
        "--dir",
        node_dir,
        "--patients",
        csv.to_str().unwrap(),
    ]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    node
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

/// Loading into a serving node: `renkei-node ingest` finds the store held, hands the files to
/// the node over its control socket, and the node's next queries see the new patients; a
/// consent withdrawal goes the same way. A bad file is refused by the node with its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_while_serving_goes_through_the_node() {
    use renkei_node::service::default_listen;
    use renkei_node::{NodeHome, NodeService};
    use renkei_policies::{Member, PolicyBundle, QueryLimits, Researcher, SignedPolicy};
    use renkei_protocol::{MicroRho, SecretKey};

    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let (home, peer_id) = NodeHome::init(&node_dir).unwrap();
    let admin = SecretKey::generate().unwrap();
    let bundle = PolicyBundle::development(
        admin.public_key(),
        vec![Member {
            peer_id: peer_id.to_base58(),
            institution: "Hospital Live".into(),
            addresses: vec![],
        }],
        Researcher {
            name: "Dr. Live".into(),
            public_key: SecretKey::generate().unwrap().public_key(),
            affiliation: String::new(),
        },
        "live",
        MicroRho(MicroRho::PER_RHO),
        QueryLimits::default(),
        renkei_protocol::unix_now(),
    );
    let mut signed = SignedPolicy::unsigned(&bundle).unwrap();
    signed.sign(&admin);
    let policy = dir.path().join("policy.json");
    signed.write_file(&policy).unwrap();
    let node = NodeService::start(&home, Some(&policy), default_listen())
        .await
        .unwrap();
    assert_eq!(node.desk().dataset().consented(), 0);

    let csv = dir.path().join("patients.csv");
    let mut rows = String::from(HEADER);
    for i in 0..30 {
        rows.push_str(&format!(
            "P{i},{},male,mild,no,no,no,no,no,no,no,yes\n",
            20 + i
        ));
    }
    std::fs::write(&csv, rows).unwrap();
    let node_path = node_dir.to_str().unwrap().to_string();
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node_cli(&args)
        })
    };
    let loaded = cli(vec![
        "ingest".into(),
        "--dir".into(),
        node_path.clone(),
        "--patients".into(),
        csv.display().to_string(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    assert!(stdout.contains("loading through it"), "{stdout}");
    assert!(stdout.contains("30 added"), "{stdout}");
    assert_eq!(node.desk().dataset().consented(), 30);
    // `status` reads what the serving node wrote after the load.
    let status = cli(vec!["status".into(), "--dir".into(), node_path.clone()])
        .await
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("30 consented, 0 withheld"), "{status}");

    // The node refuses a bad file the way the command would, and keeps its data.
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!("{HEADER}Q1,eighty,male,mild,no,no,no,no,no,no,no,yes\n"),
    )
    .unwrap();
    let refused = cli(vec![
        "ingest".into(),
        "--dir".into(),
        node_path.clone(),
        "--patients".into(),
        bad.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("bad.csv:2 column `age`"), "{stderr}");
    assert_eq!(node.desk().dataset().consented(), 30);

    let withdrawn = cli(vec![
        "consent".into(),
        "withdraw".into(),
        "--dir".into(),
        node_path,
        "--patient".into(),
        "P3".into(),
    ])
    .await
    .unwrap();
    assert!(
        withdrawn.status.success(),
        "{}",
        String::from_utf8_lossy(&withdrawn.stderr)
    );
    assert_eq!(node.desk().dataset().consented(), 29);
    assert_eq!(node.desk().dataset().withheld(), 1);

    node.shutdown().await;
    assert!(
        !node_dir
            .join(renkei_node::net::control::SOCKET_FILE)
            .exists()
    );
}

/// A decimal with more digits than the schema keeps is refused with its file, line and
/// column (nothing rounded in silence); `--round` rounds it and says how many it rounded,
/// and the stored value is the rounded one.
#[test]
fn extra_decimal_digits_are_refused_unless_rounding_is_asked_for() {
    use renkei_protocol::{Aggregate, Filter, Query, Release};

    let dir = tempfile::tempdir().unwrap();
    let node = node_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\nP2,70,1\n",
    );
    let node_dir = node.to_str().unwrap();
    let labs = dir.path().join("labs.csv");
    std::fs::write(
        &labs,
        "patient_id,timepoint,crp\nP1,0,1.25\nP2,0,1.234\nP2,1,2.5\n",
    )
    .unwrap();
    let labs = labs.to_str().unwrap();
    let refused = node_cli(&["ingest", "--dir", node_dir, "--timepoints", labs]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("labs.csv:3 column `crp`"), "{stderr}");
    assert!(stderr.contains("`1.234` has more digits"), "{stderr}");
    assert!(stderr.contains("--round"), "{stderr}");

    let rounded = node_cli(&["ingest", "--dir", node_dir, "--timepoints", labs, "--round"]);
    let stdout = String::from_utf8_lossy(&rounded.stdout);
    assert!(
        rounded.status.success(),
        "{}",
        String::from_utf8_lossy(&rounded.stderr)
    );
    assert!(stdout.contains("1 value(s) rounded"), "{stdout}");

    let home = renkei_node::NodeHome::open(&node).unwrap();
    let store = home.open_store().unwrap();
    let data =
        renkei_node::image::load(&store, std::sync::Arc::new(store.schema().unwrap())).unwrap();
    let sum = Query {
        aggregate: Aggregate::Sum {
            column: "crp".into(),
        },
        ..Query::count_patients("timepoints", Filter::True)
    };
    let compiled = data.compile(&sum).unwrap();
    let Release::Scalar { value, .. } = compiled.unnoised_release(data.evaluate(&compiled)) else {
        panic!("a sum is one number");
    };
    // 1.25 + 1.23 (rounded from 1.234) + 2.50, in hundredths.
    assert_eq!(value, 125 + 123 + 250);
}

/// Outcome dates become days from each patient's own onset date at ingest; the onset date
/// itself is read and never stored. A date with no onset to count from, a malformed onset
/// and a day beyond the schema's bounds are refused with their line and column.
#[test]
fn outcome_dates_become_days_from_onset() {
    use renkei_protocol::{Aggregate, Filter, Query, Release};

    let dir = tempfile::tempdir().unwrap();
    let node = node_with_patients(
        dir.path(),
        "patient_id,age,onset_date,admission_day,death_day,followup_day,consent_secondary_use\n\
         P1,60,2020-03-30,2020-04-02,2020-04-20T08:15:00Z,2020-04-20,1\n\
         P2,70,2021-02-27,3,,2021-03-29,1\n\
         P3,40,,,,12,1\n",
    );
    let node_dir = node.to_str().unwrap();
    let home = renkei_node::NodeHome::open(&node).unwrap();
    {
        let store = home.open_store().unwrap();
        let data =
            renkei_node::image::load(&store, std::sync::Arc::new(store.schema().unwrap())).unwrap();
        let sum = |column: &str| {
            let query = Query {
                aggregate: Aggregate::Sum {
                    column: column.into(),
                },
                ..Query::count_patients("patients", Filter::True)
            };
            let compiled = data.compile(&query).unwrap();
            match compiled.unnoised_release(data.evaluate(&compiled)) {
                Release::Scalar { value, .. } => value,
                other => panic!("{other:?}"),
            }
        };
        // P1: admitted on day 3, died on day 21 (2020 is a leap year); P2: admitted on day 3
        // as given, followed for 30 days (2021 is not); P3: 12 days as given.
        assert_eq!(sum("admission_day"), 3 + 3);
        assert_eq!(sum("death_day"), 21);
        assert_eq!(sum("followup_day"), 21 + 30 + 12);
        drop(data);
        drop(store);
        for entry in std::fs::read_dir(&node).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                assert!(!bytes.windows(10).any(|w| w == b"2020-03-30"));
            }
        }
    }
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "patient_id,age,onset_date,death_day,consent_secondary_use\n\
         P4,50,,2020-05-01,1\n\
         P5,50,2020-02-30,3,1\n\
         P6,50,2019-01-01,2020-06-01,1\n",
    )
    .unwrap();
    let refused = node_cli(&[
        "ingest",
        "--dir",
        node_dir,
        "--patients",
        bad.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("bad.csv:2 column `death_day`"), "{stderr}");
    assert!(
        stderr.contains("no `onset_date` to count days from"),
        "{stderr}"
    );
    assert!(stderr.contains("bad.csv:3 column `onset_date`"), "{stderr}");
    assert!(stderr.contains("`2020-02-30` is not a date"), "{stderr}");
    assert!(stderr.contains("bad.csv:4 column `death_day`"), "{stderr}");
    assert!(stderr.contains("is day 517 from the origin"), "{stderr}");
    // A day column that counts from another event takes no date.
    let course = dir.path().join("course.csv");
    std::fs::write(
        &course,
        "patient_id,timepoint,onset_date,days_since_onset,days_since_admission\n\
         P1,0,2020-03-30,2020-04-02,2020-04-02\n",
    )
    .unwrap();
    let refused = node_cli(&[
        "ingest",
        "--dir",
        node_dir,
        "--timepoints",
        course.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("course.csv:2 column `days_since_admission`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("counts days from another event"),
        "{stderr}"
    );
    assert!(!stderr.contains("column `days_since_onset`"), "{stderr}");
}

/// A patient with more timepoints than the schema's bound (8 in covid19) is reported at
/// ingest and in `status`, and a timepoint answer keeps 8 of its rows spread over its
/// course, not its first 8.
#[test]
fn timepoints_over_the_bound_are_reported_and_spread() {
    use renkei_protocol::{Aggregate, Filter, Query, Release};

    let dir = tempfile::tempdir().unwrap();
    let node = node_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\nP2,70,1\n",
    );
    let node_dir = node.to_str().unwrap();
    let labs = dir.path().join("labs.csv");
    let mut text = String::from("patient_id,timepoint,crp\nP2,0,1\n");
    for day in 0..10 {
        text.push_str(&format!("P1,{day},{}\n", day + 1));
    }
    std::fs::write(&labs, text).unwrap();
    let loaded = node_cli(&[
        "ingest",
        "--dir",
        node_dir,
        "--timepoints",
        labs.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    assert!(
        stdout.contains("1 patient(s) have more than 8 timepoints"),
        "{stdout}"
    );
    let status = node_cli(&["status", "--dir", node_dir]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("bound:     1 patient(s) have more than 8"),
        "{status}"
    );

    let home = renkei_node::NodeHome::open(&node).unwrap();
    let store = home.open_store().unwrap();
    let data =
        renkei_node::image::load(&store, std::sync::Arc::new(store.schema().unwrap())).unwrap();
    assert_eq!(data.patients_over_bound(), 1);
    let sum = Query {
        aggregate: Aggregate::Sum {
            column: "crp".into(),
        },
        ..Query::count_patients("timepoints", Filter::True)
    };
    let compiled = data.compile(&sum).unwrap();
    let Release::Scalar { value, .. } = compiled.unnoised_release(data.evaluate(&compiled)) else {
        panic!("a sum is one number");
    };
    // P1 keeps days 1, 2, 4, 5, 6, 7, 9 and 10 (the first eight would sum to 36); P2 adds 1.
    assert_eq!(value, (44 + 1) * 100);
}

/// Damaged store files: an unfinished snapshot left by a crash or a full disk is removed
/// and the node opens; a truncated log or snapshot is refused by every command alike, with
/// a typed error that names the store and its files and says what to do, never a panic.
#[test]
fn damaged_stores_are_refused_in_words_and_leftovers_removed() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\n",
    );
    let node_dir = node.to_str().unwrap();
    let snapshot = || {
        std::fs::read_dir(node.join("store"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("snap.") && !name.ends_with(".generating")
            })
    };
    let copy = |name: &str| {
        let target = dir.path().join(name);
        let status = Command::new("cp")
            .args(["-r", node_dir, target.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        target
    };

    // An unfinished snapshot (0 bytes, a later sequence number than the real one).
    let leftover = copy("leftover");
    let generating = leftover.join("store/snap.00000000000099999999.generating");
    std::fs::write(&generating, b"").unwrap();
    let status = node_cli(&["status", "--dir", leftover.to_str().unwrap()]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("1 consented"));
    assert!(!generating.exists());

    // A truncated snapshot or log: refused, the same way by every command.
    let real = snapshot().expect("the store has a snapshot");
    for (name, damage) in [
        ("snapshot", real.file_name().unwrap()),
        ("log", "db".as_ref()),
    ] {
        let damaged = copy(name);
        let file = damaged.join("store").join(damage);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(if name == "log" { 0 } else { 10 })
            .unwrap();
        for command in [
            vec!["status", "--dir"],
            vec!["ledger", "--dir"],
            vec!["audit", "verify", "--dir"],
        ] {
            let mut args = command.clone();
            args.push(damaged.to_str().unwrap());
            let out = node_cli(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{name} {command:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{name} {command:?}: {stderr}");
            assert!(
                stderr.contains("is damaged"),
                "{name} {command:?}: {stderr}"
            );
            assert!(stderr.contains("backup"), "{name} {command:?}: {stderr}");
            assert!(
                stderr.contains(&damaged.join("store").display().to_string()),
                "{name} {command:?}: {stderr}"
            );
        }
    }
}

/// A damaged record inside the store (a patient shard that no longer decodes): `serve`
/// refuses it, and so do `status`, `ledger` and `audit verify`, with the same error; none
/// reports the store healthy.
#[test]
fn every_command_opens_the_store_the_way_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_patients(
        dir.path(),
        "patient_id,age,consent_secondary_use\nP1,60,1\n",
    );
    let node_dir = node.to_str().unwrap();
    {
        // Straight through sled, as a damaged disk would.
        let db = sled::open(node.join("store")).unwrap();
        let data = db.open_tree("data").unwrap();
        let (key, _) = data
            .scan_prefix([b'P'])
            .next()
            .expect("a patient shard")
            .unwrap();
        data.insert(key, &b"\x07not a shard"[..]).unwrap();
        db.flush().unwrap();
    }
    let mut errors = Vec::new();
    for command in [
        vec!["status", "--dir"],
        vec!["ledger", "--dir"],
        vec!["audit", "verify", "--dir"],
        vec!["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--dir"],
    ] {
        let mut args = command.clone();
        args.push(node_dir);
        let out = node_cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{command:?}: {stderr}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{command:?}: {stderr}"))
            .to_string();
        assert!(error.contains("patient"), "{command:?}: {error}");
        errors.push(error);
    }
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:#?}");
}
