//! Benchmarks, with the figures BENCHMARKS.md reports (timing goals live here, not in tests).
//!
//! - [`ingest`]: a lab CSV of N rows loaded into a node, against `sqlite3 .import` and
//!   DuckDB's `read_csv` on the same file; rows/s and the store's size on disk.
//! - [`queries`]: one node holding all patients (engine latency of a 3-predicate count, a
//!   timepoint-level count and a 2-way GROUP BY), then N nodes on 127.0.0.1 sharing them
//!   (end-to-end p50/p99 through one aggregator, and queries/s with several in flight), and
//!   the same SQL without noise on the pooled data in DuckDB.
//!
//! - [`secure`]: the same count asked of N nodes per site and as a secure total, against one
//!   central mechanism on the pooled true count: root-mean-square errors side by side, and
//!   the latency of both modes; then as secure rounds that survive dropouts, with every
//!   node up and with one node stopped.
//!
//! - [`survival`]: Kaplan–Meier curves asked of N nodes per site and as secure totals,
//!   against lifelines' curves on the pooled patients and one central mechanism.
//!
//! - [`regression`]: a logistic fit asked of N nodes per site and as a secure total, and
//!   fitted from the pooled exact statistics with one central mechanism per step, against
//!   statsmodels' non-private fit on the pooled patients (largest coefficient error,
//!   coverage of the noise intervals, interval width), and the wall time of a fit against
//!   statsmodels' on the pooled data.
//!
//! DuckDB runs through its Python package: the bench installs it into a virtual environment
//! of its own when `python3` lacks it (see [`python`]; set `RENKEI_BENCH_PYTHON` to choose
//! the interpreter). A missing tool is reported, not fatal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use renkei_aggregator::{NetworkClient, NodeAddress, QueryOptions, ResearcherSession};
use renkei_engine::Dataset;
use renkei_node::ingest;
use renkei_node::service::default_listen;
use renkei_node::{NodeHome, NodeService};
use renkei_policies::{QueryLimits, SignedPolicy};
use renkei_protocol::{MicroRho, PrivacyRequest, SecretKey};

use crate::consortium::DevConsortium;

/// The engine's questions, with their DuckDB equivalents on the pooled tables.
pub const COUNT_3: (&str, &str) = (
    "SELECT COUNT(*) FROM patients WHERE age >= 65 AND diabetes AND sex = 'female'",
    "SELECT COUNT(*) FROM patients WHERE age >= 65 AND diabetes AND sex = 'female'",
);
pub const TIMEPOINT_COUNT: (&str, &str) = (
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE crp > 10 AND dexamethasone AND severity = 'critical'",
    "SELECT COUNT(DISTINCT patient_id) FROM timepoints WHERE crp > 10 AND dexamethasone AND severity = 'critical'",
);
pub const GROUP_2: (&str, &str) = (
    "SELECT sex, severity, COUNT(*) FROM patients GROUP BY sex, severity",
    "SELECT sex, severity, COUNT(*) FROM patients GROUP BY sex, severity",
);

/// A Python interpreter that can `import duckdb`, found once per run: `RENKEI_BENCH_PYTHON`
/// if set; else `python3` if it has DuckDB; else a virtual environment under the user's
/// cache directory (`renkei/bench-venv`), created and given DuckDB's package with pip the
/// first time. `None` (DuckDB figures reported as null) when none can be had.
fn python() -> Option<&'static str> {
    static PYTHON: OnceLock<Option<String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let found = python_importing(&["duckdb"]);
            if found.is_none() {
                eprintln!("DuckDB is not available: its figures are reported as null");
            }
            found
        })
        .as_deref()
}

/// A Python that can import every one of `modules`, found as [`python`] finds one: the
/// bench's environment gets what is missing with pip.
fn python_importing(modules: &[&str]) -> Option<String> {
    if let Ok(chosen) = std::env::var("RENKEI_BENCH_PYTHON") {
        return Some(chosen);
    }
    let imports = |python: &str| {
        Command::new(python)
            .args(["-c", &format!("import {}", modules.join(", "))])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports("python3") {
        return Some("python3".into());
    }
    let venv = bench_venv()?;
    let interpreter = venv.join("bin").join("python").display().to_string();
    if imports(&interpreter) {
        return Some(interpreter);
    }
    eprintln!(
        "installing {} into {} for the comparison",
        modules.join(" and "),
        venv.display()
    );
    let installed = (venv.join("bin").join("pip").exists()
        || Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success()))
        && Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet"])
            .args(modules)
            .status()
            .is_ok_and(|s| s.success());
    (installed && imports(&interpreter)).then_some(interpreter)
}

/// Where the benchmark's own Python environment lives.
fn bench_venv() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("renkei").join("bench-venv"))
}

/// Size of everything under `dir`, in bytes.
fn disk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        disk_size(&path)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn csv_writer(path: &Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    Ok(std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// Writes `patients` patient rows (ids from `first`) and `per_patient` timepoints each.
fn write_cohort(
    dir: &Path,
    first: usize,
    patients: usize,
    per_patient: usize,
    seed: u64,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let patient_path = dir.join("patients.csv");
    let timepoint_path = dir.join("timepoints.csv");
    let mut p = csv_writer(&patient_path)?;
    let mut t = csv_writer(&timepoint_path)?;
    writeln!(
        p,
        "patient_id,age,sex,severity,diabetes,hypertension,obesity,consent_secondary_use"
    )?;
    writeln!(
        t,
        "patient_id,timepoint,days_since_onset,severity,care_level,crp,il6,dexamethasone"
    )?;
    let sexes = ["female", "male"];
    let severities = ["mild", "moderate", "severe", "critical"];
    let cares = [
        "outpatient",
        "hospitalized",
        "oxygen",
        "icu_ventilation",
        "ecmo",
    ];
    for i in first..first + patients {
        let age = rng.gen_range(0..100);
        let worst = rng.gen_range(0..4);
        writeln!(
            p,
            "P{i},{age},{},{},{},{},{},true",
            sexes[rng.gen_range(0..2)],
            severities[worst],
            rng.gen_bool(0.15),
            rng.gen_bool(0.3),
            rng.gen_bool(0.2)
        )?;
        for n in 0..per_patient {
            let level = rng.gen_range(0..=worst);
            writeln!(
                t,
                "P{i},{n},{},{},{},{:.2},{:.1},{}",
                2 + 3 * n,
                severities[level],
                cares[level.min(4)],
                rng.gen_range(0.0..30.0),
                rng.gen_range(0.0..500.0),
                rng.gen_bool(0.3)
            )?;
        }
    }
    p.flush()?;
    t.flush()?;
    Ok((patient_path, timepoint_path))
}

/// Results of the ingest benchmark.
#[derive(Debug, serde::Serialize)]
pub struct IngestBench {
    pub rows: usize,
    pub renkei_rows_per_s: f64,
    pub renkei_store_bytes: u64,
    pub sqlite_rows_per_s: Option<f64>,
    pub duckdb_rows_per_s: Option<f64>,
}

/// Loads an N-row lab CSV into a node, and the same file with sqlite3 and DuckDB.
pub fn ingest(dir: &Path, rows: usize) -> anyhow::Result<IngestBench> {
    let per_patient = 5;
    let (patients, labs) = write_cohort(&dir.join("data"), 0, rows / per_patient, per_patient, 42)?;
    let (home, _) = NodeHome::init(&dir.join("node"))?;
    let store = home.open_store()?;
    ingest::ingest_patients(&store, &patients, false)?;
    let start = Instant::now();
    ingest::ingest_timepoints(&store, &labs, false)?;
    let renkei = start.elapsed();
    drop(store);
    let renkei_store_bytes = disk_size(&dir.join("node").join("store"));

    let sqlite = {
        let db = dir.join("bench.sqlite");
        let _ = std::fs::remove_file(&db);
        let start = Instant::now();
        let status = Command::new("sqlite3")
            .arg(&db)
            .arg(".mode csv")
            .arg(format!(".import {} labs", labs.display()))
            .status();
        if status.is_err() {
            eprintln!(
                "the sqlite3 command-line tool is not installed (e.g. `apt-get install sqlite3`): its figure is reported as null"
            );
        }
        status.ok().filter(|s| s.success()).map(|_| start.elapsed())
    };
    let duckdb = duckdb_seconds(&format!(
        "con = duckdb.connect()\nt = time.perf_counter()\ncon.execute(\"CREATE TABLE labs AS SELECT * FROM read_csv('{}')\")\nprint(time.perf_counter() - t)",
        labs.display()
    ));
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    Ok(IngestBench {
        rows,
        renkei_rows_per_s: rate(renkei),
        renkei_store_bytes,
        sqlite_rows_per_s: sqlite.map(rate),
        duckdb_rows_per_s: duckdb.map(|s| rows as f64 / s),
    })
}

/// Runs a Python snippet with duckdb and `time` imported; returns the last number it prints.
fn duckdb_seconds(body: &str) -> Option<f64> {
    let script = format!("import duckdb, time\n{body}\n");
    let output = Command::new(python()?)
        .arg("-c")
        .arg(script)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

/// Percentiles of durations, in milliseconds.
fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples
        .get(index)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// p50 of 31 runs of `sql` on `engine` (compile and evaluate, no noise), in ms.
fn time_engine(engine: &Dataset, sql: &str) -> anyhow::Result<f64> {
    let query = renkei_aggregator::sql::compile(sql)?;
    let mut samples = Vec::new();
    for _ in 0..31 {
        let start = Instant::now();
        let compiled = engine.compile(&query).map_err(|e| anyhow::anyhow!("{e}"))?;
        std::hint::black_box(engine.evaluate(&compiled));
        samples.push(start.elapsed());
    }
    Ok(percentile(&mut samples, 0.5))
}

/// Results of the engine-only benchmark.
#[derive(Debug, serde::Serialize)]
pub struct EngineBench {
    pub patients: usize,
    pub timepoints: usize,
    pub load_s: f64,
    pub engine_count3_p50_ms: f64,
    pub engine_timepoint_count_p50_ms: f64,
    pub engine_group2_p50_ms: f64,
}

/// The engine alone: one node holding every patient, the same three questions as
/// [`queries`], without the network or DuckDB. A `dir` holding a node from an earlier run is
/// reused as it is (so the engine can be timed again without loading again).
pub fn engine(dir: &Path, patients: usize, per_patient: usize) -> anyhow::Result<EngineBench> {
    let home_dir = dir.join("home");
    let store = if home_dir.exists() {
        NodeHome::open(&home_dir)?.open_store()?
    } else {
        let (p, t) = write_cohort(&dir.join("data"), 0, patients, per_patient, 7)?;
        let (home, _) = NodeHome::init(&home_dir)?;
        let store = home.open_store()?;
        ingest::ingest_patients(&store, &p, false)?;
        ingest::ingest_timepoints(&store, &t, false)?;
        store
    };
    let start = Instant::now();
    let engine = renkei_node::image::load(&store, Arc::new(store.schema()?))?;
    let load_s = start.elapsed().as_secs_f64();
    Ok(EngineBench {
        patients: engine.patients(),
        timepoints: engine.timepoints(),
        load_s,
        engine_count3_p50_ms: time_engine(&engine, COUNT_3.0)?,
        engine_timepoint_count_p50_ms: time_engine(&engine, TIMEPOINT_COUNT.0)?,
        engine_group2_p50_ms: time_engine(&engine, GROUP_2.0)?,
    })
}

/// Results of the query benchmark.
#[derive(Debug, serde::Serialize)]
pub struct QueryBench {
    pub patients: usize,
    pub timepoints: usize,
    pub nodes: usize,
    pub engine_count3_p50_ms: f64,
    pub engine_timepoint_count_p50_ms: f64,
    pub engine_group2_p50_ms: f64,
    pub federated_count3_p50_ms: f64,
    pub federated_count3_p99_ms: f64,
    pub federated_queries_per_s: f64,
    pub duckdb_count3_p50_ms: Option<f64>,
    pub duckdb_group2_p50_ms: Option<f64>,
    pub ratio_federated_p50_to_duckdb: Option<f64>,
}

/// The engine, the network and DuckDB on the same synthetic cohort.
pub async fn queries(
    dir: &Path,
    nodes: usize,
    patients: usize,
    per_patient: usize,
    queries: usize,
    concurrency: usize,
) -> anyhow::Result<QueryBench> {
    anyhow::ensure!(
        nodes > 0 && patients >= nodes,
        "need at least one patient per node"
    );
    // Per-node shares of the cohort, written and ingested.
    let mut homes = Vec::with_capacity(nodes);
    let mut files = Vec::with_capacity(nodes);
    let share = patients / nodes;
    for i in 0..nodes {
        let node_dir = dir.join(format!("node-{i}"));
        let count = if i + 1 == nodes {
            patients - share * i
        } else {
            share
        };
        let (p, t) = write_cohort(
            &node_dir.join("data"),
            share * i,
            count,
            per_patient,
            7 + i as u64,
        )?;
        let (home, peer_id) = NodeHome::init(&node_dir.join("home"))?;
        let store = home.open_store()?;
        ingest::ingest_patients(&store, &p, false)?;
        ingest::ingest_timepoints(&store, &t, false)?;
        drop(store);
        homes.push((home, peer_id));
        files.push((p, t));
    }

    // Engine: one node's dataset holding everyone (every share loaded into one image).
    let engine = {
        let (home, _) = NodeHome::init(&dir.join("all"))?;
        let store = home.open_store()?;
        for (p, t) in &files {
            ingest::ingest_patients(&store, p, false)?;
            ingest::ingest_timepoints(&store, t, false)?;
        }
        renkei_node::image::load(&store, Arc::new(store.schema()?))?
    };
    let engine_count3_p50_ms = time_engine(&engine, COUNT_3.0)?;
    let engine_timepoint_count_p50_ms = time_engine(&engine, TIMEPOINT_COUNT.0)?;
    let engine_group2_p50_ms = time_engine(&engine, GROUP_2.0)?;
    let timepoints = engine.timepoints();
    drop(engine);

    // The network: N nodes, one aggregator.
    let members: Vec<_> = homes
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| (*peer, format!("Hospital {i}")))
        .collect();
    let consortium = DevConsortium::create(
        &dir.join("consortium"),
        &members,
        MicroRho(1_000_000 * MicroRho::PER_RHO),
        QueryLimits {
            min_cell_size: 0,
            ..QueryLimits::default()
        },
    )?;
    let mut running = Vec::with_capacity(nodes);
    for (home, _) in &homes {
        running.push(NodeService::start(home, Some(&consortium.policy), default_listen()).await?);
    }
    let addresses: Vec<NodeAddress> = running
        .iter()
        .map(|n| NodeAddress {
            peer_id: n.peer_id(),
            address: n.listen_addr().clone(),
        })
        .collect();
    let key = SecretKey::read_file(&consortium.researcher_key)?;
    let policy = SignedPolicy::read_file(&consortium.policy)?.verify_self_anchored()?;
    let session = Arc::new(ResearcherSession::new(
        key,
        policy,
        NetworkClient::start(None).await?,
    ));
    let options = QueryOptions {
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(1_000),
        },
        ..session.default_options()?
    };
    // Warm up the connections.
    session.query(&addresses, COUNT_3.0, &options).await?;
    let mut latencies = Vec::with_capacity(queries);
    for _ in 0..queries {
        let start = Instant::now();
        let answer = session.query(&addresses, COUNT_3.0, &options).await?;
        anyhow::ensure!(
            answer.answered.len() == nodes,
            "a node did not answer: {answer:?}"
        );
        latencies.push(start.elapsed());
    }
    let federated_count3_p50_ms = percentile(&mut latencies, 0.5);
    let federated_count3_p99_ms = percentile(&mut latencies, 0.99);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (session, addresses, options) =
            (Arc::clone(&session), addresses.clone(), options.clone());
        let each = queries / concurrency.max(1);
        tasks.spawn(async move {
            for _ in 0..each {
                session.query(&addresses, COUNT_3.0, &options).await?;
            }
            anyhow::Ok(each)
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        done += result??;
    }
    let federated_queries_per_s = done as f64 / start.elapsed().as_secs_f64();
    for node in running {
        node.shutdown().await;
    }

    // DuckDB on the pooled CSVs.
    let globs = |which: &str| format!("{}/node-*/data/{which}.csv", dir.display());
    let duck = |sql: &str| {
        duckdb_seconds(&format!(
            "con = duckdb.connect()\ncon.execute(\"CREATE TABLE patients AS SELECT * FROM read_csv('{}')\")\ncon.execute(\"CREATE TABLE timepoints AS SELECT * FROM read_csv('{}')\")\nsamples = []\nfor _ in range(31):\n    t = time.perf_counter()\n    con.execute(\"{sql}\").fetchall()\n    samples.append(time.perf_counter() - t)\nsamples.sort()\nprint(samples[15] * 1000)",
            globs("patients"),
            globs("timepoints")
        ))
    };
    let duckdb_count3_p50_ms = duck(COUNT_3.1);
    let duckdb_group2_p50_ms = duck(GROUP_2.1);
    Ok(QueryBench {
        patients,
        timepoints,
        nodes,
        engine_count3_p50_ms,
        engine_timepoint_count_p50_ms,
        engine_group2_p50_ms,
        federated_count3_p50_ms,
        federated_count3_p99_ms,
        federated_queries_per_s,
        ratio_federated_p50_to_duckdb: duckdb_count3_p50_ms.map(|d| federated_count3_p50_ms / d),
        duckdb_count3_p50_ms,
        duckdb_group2_p50_ms,
    })
}

/// Results of the secure aggregation benchmark.
#[derive(Debug, serde::Serialize)]
pub struct SecureBench {
    pub nodes: usize,
    pub patients: usize,
    pub queries: usize,
    pub rho: f64,
    pub query: String,
    pub true_count: u64,
    /// (a) each node adds full noise and the noisy answers are summed.
    pub rmse_per_site: f64,
    /// (b) each node adds a noise share under masks; only the total is read.
    pub rmse_secure: f64,
    /// (c) one mechanism on the pooled true count (draws from the same opendp calibration).
    pub rmse_central: f64,
    pub ratio_secure_to_central: f64,
    pub ratio_per_site_to_central: f64,
    pub sqrt_nodes: f64,
    /// The sd each mode reports for its estimate, and the central mechanism's.
    pub reported_sd_per_site: f64,
    pub reported_sd_secure: f64,
    pub central_sd: f64,
    pub per_site_p50_ms: f64,
    pub secure_p50_ms: f64,
    pub per_site_p99_ms: f64,
    pub secure_p99_ms: f64,
    pub latency_ratio_p50: f64,
    /// (d) secure rounds asked to survive `dropouts` missing nodes (shares sized for
    /// `nodes - dropouts`, and an unmasking step), every node up.
    pub dropouts: u32,
    pub rmse_recoverable: f64,
    pub reported_sd_recoverable: f64,
    pub recoverable_p50_ms: f64,
    pub recoverable_p99_ms: f64,
    pub latency_ratio_recoverable_p50: f64,
    /// (e) the same rounds with one node stopped: read over the others (RMSE against
    /// their true count).
    pub rmse_one_down: f64,
    pub reported_sd_one_down: f64,
    pub one_down_p50_ms: f64,
}

/// Draws from the central mechanism for the RMSE of (c).
const CENTRAL_DRAWS: usize = 20_000;

/// Per-site, secure and central answers to one count on the same N-node testnet.
pub async fn secure(
    dir: &Path,
    nodes: usize,
    patients: usize,
    queries: usize,
    rho: MicroRho,
    dropouts: u32,
) -> anyhow::Result<SecureBench> {
    anyhow::ensure!(nodes >= 2, "a secure total needs at least two nodes");
    anyhow::ensure!(
        dropouts >= 1 && nodes >= 2 + dropouts as usize,
        "surviving {dropouts} dropouts needs --dropouts of at least 1 and at least {} nodes",
        2 + dropouts
    );
    let config = crate::TestnetConfig {
        nodes,
        patients,
        full_data_patients: 0,
        budget: MicroRho(1_000_000 * MicroRho::PER_RHO),
        limits: QueryLimits {
            min_cell_size: 0,
            ..QueryLimits::default()
        },
        ..crate::TestnetConfig::new(dir)
    };
    let mut testnet = crate::Testnet::start(config).await?;
    let key = SecretKey::read_file(&testnet.consortium.researcher_key)?;
    let policy = SignedPolicy::read_file(&testnet.consortium.policy)?.verify_self_anchored()?;
    let session = ResearcherSession::new(key, policy, NetworkClient::start(None).await?);
    let addresses = testnet.addresses();
    let sql_text = COUNT_3.0;
    let truth = testnet.true_count(&renkei_aggregator::sql::compile(sql_text)?);
    let privacy = PrivacyRequest::Zcdp { rho };
    let per_site_options = QueryOptions {
        privacy,
        secure: false,
        ..session.default_options()?
    };
    let secure_options = QueryOptions {
        secure: true,
        ..per_site_options.clone()
    };
    let recoverable_options = QueryOptions {
        dropouts,
        ..secure_options.clone()
    };
    // Warm up the connections.
    session
        .query(&addresses, sql_text, &per_site_options)
        .await?;

    let (mut per_site_errors, mut secure_errors, mut recoverable_errors) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut per_site_latency, mut secure_latency, mut recoverable_latency) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut per_site_sd, mut secure_sd, mut recoverable_sd) = (0.0, 0.0, 0.0);
    for _ in 0..queries {
        // Alternating, so both modes see the same machine load.
        for (options, errors, latency, sd) in [
            (
                &per_site_options,
                &mut per_site_errors,
                &mut per_site_latency,
                &mut per_site_sd,
            ),
            (
                &secure_options,
                &mut secure_errors,
                &mut secure_latency,
                &mut secure_sd,
            ),
            (
                &recoverable_options,
                &mut recoverable_errors,
                &mut recoverable_latency,
                &mut recoverable_sd,
            ),
        ] {
            let start = Instant::now();
            let answer = session.query(&addresses, sql_text, options).await?;
            latency.push(start.elapsed());
            let (Some(estimate), Some(std_dev)) = (answer.estimate, answer.std_dev) else {
                anyhow::bail!("no estimate: {answer:?}");
            };
            anyhow::ensure!(
                answer.answered.len() == nodes,
                "a node did not answer: {answer:?}"
            );
            errors.push(estimate.as_f64() - truth as f64);
            *sd = std_dev;
        }
    }
    // One node down: the recoverable rounds read the others' total.
    testnet.stop_node(0).await;
    let survivors: Vec<usize> = (1..nodes).collect();
    let survivors_truth =
        testnet.true_count_on(&survivors, &renkei_aggregator::sql::compile(sql_text)?) as f64;
    let (mut one_down_errors, mut one_down_latency, mut one_down_sd) =
        (Vec::new(), Vec::new(), 0.0);
    for _ in 0..queries {
        let start = Instant::now();
        let answer = session
            .query(&addresses, sql_text, &recoverable_options)
            .await?;
        one_down_latency.push(start.elapsed());
        let (Some(estimate), Some(std_dev)) = (answer.estimate, answer.std_dev) else {
            anyhow::bail!("no estimate with one node down: {answer:?}");
        };
        anyhow::ensure!(
            answer.recovered_without.len() == 1,
            "the round was not read without the stopped node: {answer:?}"
        );
        one_down_errors.push(estimate.as_f64() - survivors_truth);
        one_down_sd = std_dev;
    }
    testnet.shutdown().await;

    let central = renkei_node::privacy::dp::Calibration::for_request(privacy, 1.0, 1e-6)?;
    let true_count = i64::try_from(truth)?;
    let central_errors: Vec<f64> = (0..CENTRAL_DRAWS)
        .map(|_| {
            central
                .release_one(true_count)
                .map(|noisy| (noisy - true_count) as f64)
        })
        .collect::<Result<_, _>>()?;
    let rmse = |errors: &[f64]| {
        (errors.iter().map(|e| e * e).sum::<f64>() / errors.len().max(1) as f64).sqrt()
    };
    let (rmse_per_site, rmse_secure, rmse_central) = (
        rmse(&per_site_errors),
        rmse(&secure_errors),
        rmse(&central_errors),
    );
    let per_site_p50_ms = percentile(&mut per_site_latency, 0.5);
    let secure_p50_ms = percentile(&mut secure_latency, 0.5);
    let recoverable_p50_ms = percentile(&mut recoverable_latency, 0.5);
    Ok(SecureBench {
        nodes,
        patients,
        queries,
        rho: rho.as_rho(),
        query: sql_text.to_string(),
        true_count: truth,
        rmse_per_site,
        rmse_secure,
        rmse_central,
        ratio_secure_to_central: rmse_secure / rmse_central,
        ratio_per_site_to_central: rmse_per_site / rmse_central,
        sqrt_nodes: (nodes as f64).sqrt(),
        reported_sd_per_site: per_site_sd,
        reported_sd_secure: secure_sd,
        central_sd: central.noise_std,
        per_site_p50_ms,
        secure_p50_ms,
        per_site_p99_ms: percentile(&mut per_site_latency, 0.99),
        secure_p99_ms: percentile(&mut secure_latency, 0.99),
        latency_ratio_p50: secure_p50_ms / per_site_p50_ms,
        dropouts,
        rmse_recoverable: rmse(&recoverable_errors),
        reported_sd_recoverable: recoverable_sd,
        recoverable_p50_ms,
        recoverable_p99_ms: percentile(&mut recoverable_latency, 0.99),
        latency_ratio_recoverable_p50: recoverable_p50_ms / per_site_p50_ms,
        rmse_one_down: rmse(&one_down_errors),
        reported_sd_one_down: one_down_sd,
        one_down_p50_ms: percentile(&mut one_down_latency, 0.5),
    })
}

/// Survival curves the bench asks: renkei's SQL, the DuckDB SQL listing each patient's
/// groups, time and event for lifelines, and the horizon.
pub const SURVIVAL_CURVES: &[(&str, &str, u16)] = &[
    (
        "SELECT diabetes, KAPLAN_MEIER(COALESCE(death_day, followup_day), death_day IS NOT NULL, 60) FROM patients GROUP BY diabetes",
        "SELECT diabetes, COALESCE(death_day, followup_day), death_day IS NOT NULL FROM patients",
        60,
    ),
    (
        "SELECT KAPLAN_MEIER(COALESCE(discharge_day, followup_day), discharge_day IS NOT NULL, 30) FROM patients WHERE admission_day IS NOT NULL",
        "SELECT COALESCE(discharge_day, followup_day), discharge_day IS NOT NULL FROM patients WHERE admission_day IS NOT NULL",
        30,
    ),
];

/// How close one survival query's curves come to lifelines' on the pooled patients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CurveAccuracy {
    pub query: String,
    pub horizon_days: u16,
    pub strata: usize,
    /// Per repetition, the largest |S(t) − lifelines S(t)| over strata and days; its mean
    /// and worst over repetitions, per site, as a secure total and from one central
    /// mechanism (the same rho on the pooled trees).
    pub per_site_max_error_mean: f64,
    pub per_site_max_error_worst: f64,
    pub secure_max_error_mean: f64,
    pub secure_max_error_worst: f64,
    pub central_max_error_mean: f64,
    pub ratio_secure_to_central: f64,
    /// The same, over the days where at least 10% of the stratum is still at risk.
    pub secure_max_error_mean_while_10pct_at_risk: f64,
    /// Share of (stratum, day) pairs whose 95% band holds lifelines' S(t).
    pub per_site_band_coverage: f64,
    pub secure_band_coverage: f64,
    /// Share of (repetition, stratum) pairs, where lifelines' median is reached, whose
    /// reported median interval holds it (per site and secure together).
    pub median_in_interval: Option<f64>,
    pub per_site_p50_ms: f64,
    pub secure_p50_ms: f64,
}

/// The survival bench's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SurvivalBench {
    pub nodes: usize,
    pub patients: usize,
    pub repetitions: usize,
    pub rho: f64,
    pub curves: Vec<CurveAccuracy>,
}

/// The largest absolute difference between `curve`'s strata and the reference's, over the
/// days where `keep(stratum, day)`.
fn largest_difference(
    survival: &renkei_engine::Survival,
    truth: &[(Vec<String>, Vec<f64>)],
    keep: &dyn Fn(&renkei_engine::SurvivalCurve, usize) -> bool,
) -> f64 {
    let mut largest: f64 = 0.0;
    for (group, exact) in truth {
        if let Some(curve) = survival.strata.iter().find(|c| &c.group == group) {
            for (day, (s, t)) in curve.survival.iter().zip(exact).enumerate() {
                if keep(curve, day) {
                    largest = largest.max((s - t).abs());
                }
            }
        }
    }
    largest
}

/// Kaplan–Meier curves asked `repetitions` times per site and as secure totals (alternating)
/// at `rho` per query, against lifelines' non-private curves on the pooled patients and one
/// central mechanism on the pooled trees.
pub async fn survival(
    dir: &Path,
    nodes: usize,
    patients: usize,
    repetitions: usize,
    rho: MicroRho,
) -> anyhow::Result<SurvivalBench> {
    anyhow::ensure!(nodes >= 2, "a secure total needs at least two nodes");
    let python = python_importing(&["duckdb", "lifelines"]).context(
        "the survival bench needs Python with duckdb and lifelines (set RENKEI_BENCH_PYTHON)",
    )?;
    let config = crate::TestnetConfig {
        nodes,
        patients,
        full_data_patients: 0,
        budget: MicroRho(1_000_000 * MicroRho::PER_RHO),
        ..crate::TestnetConfig::new(dir.join("net"))
    };
    let testnet = crate::Testnet::start(config).await?;
    let curves: Vec<crate::reference::CurveSql<'_>> = SURVIVAL_CURVES
        .iter()
        .map(|(_, sql, horizon_days)| crate::reference::CurveSql {
            sql,
            horizon_days: *horizon_days,
        })
        .collect();
    let spec = crate::reference::spec(&testnet, &[], &curves, &[])?;
    let references = crate::reference::run(Path::new(&python), dir, &spec)?;
    let key = SecretKey::read_file(&testnet.consortium.researcher_key)?;
    let policy = SignedPolicy::read_file(&testnet.consortium.policy)?.verify_self_anchored()?;
    let session = ResearcherSession::new(key, policy, NetworkClient::start(None).await?);
    let addresses = testnet.addresses();
    let privacy = PrivacyRequest::Zcdp { rho };
    let per_site = QueryOptions {
        privacy,
        secure: false,
        ..session.default_options()?
    };
    let secure = QueryOptions {
        secure: true,
        ..per_site.clone()
    };
    let mut report = Vec::new();
    for ((sql_text, _, horizon_days), reference) in SURVIVAL_CURVES.iter().zip(&references) {
        let truth = crate::reference::curves(reference)?;
        let query = renkei_aggregator::sql::compile(sql_text)?;
        // The pooled exact trees, for one central mechanism at the same rho.
        let mut pooled: Option<(renkei_protocol::Release, f64)> = None;
        for i in 0..nodes {
            let dataset = testnet
                .running(i)
                .context("every node runs")?
                .desk()
                .dataset();
            let compiled = dataset.compile(&query)?;
            let sensitivity = compiled.parts()[0].sensitivity;
            let exact = compiled.unnoised_release(dataset.evaluate(&compiled));
            pooled = Some(match (pooled, exact) {
                (None, exact) => (exact, sensitivity),
                (
                    Some((
                        renkei_protocol::Release::Cells {
                            labels,
                            parts,
                            suppressed,
                        },
                        s,
                    )),
                    renkei_protocol::Release::Cells { parts: more, .. },
                ) => {
                    let parts = parts
                        .into_iter()
                        .zip(more)
                        .map(|(a, b)| a.into_iter().zip(b).map(|(x, y)| x + y).collect())
                        .collect();
                    (
                        renkei_protocol::Release::Cells {
                            labels,
                            parts,
                            suppressed,
                        },
                        s,
                    )
                }
                (other, _) => anyhow::bail!("not survival trees: {other:?}"),
            });
        }
        let Some((
            renkei_protocol::Release::Cells {
                labels,
                parts,
                suppressed,
            },
            sensitivity,
        )) = pooled
        else {
            anyhow::bail!("no pooled trees");
        };
        let central =
            renkei_node::privacy::dp::Calibration::for_request(privacy, sensitivity, 1e-6)?;

        let (mut per_site_errors, mut secure_errors, mut central_errors, mut secure_body) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut per_site_latency, mut secure_latency) = (Vec::new(), Vec::new());
        let (mut per_site_cover, mut secure_cover, mut cells) = (0usize, 0usize, 0usize);
        let (mut medians, mut medians_in) = (0usize, 0usize);
        let mut strata = 0;
        for _ in 0..repetitions {
            for (options, errors, latency, cover) in [
                (
                    &per_site,
                    &mut per_site_errors,
                    &mut per_site_latency,
                    &mut per_site_cover,
                ),
                (
                    &secure,
                    &mut secure_errors,
                    &mut secure_latency,
                    &mut secure_cover,
                ),
            ] {
                let start = Instant::now();
                let answer = session.query(&addresses, sql_text, options).await?;
                latency.push(start.elapsed());
                anyhow::ensure!(
                    answer.answered.len() == nodes,
                    "a node did not answer: {answer:?}"
                );
                let survival = answer.survival.context("no survival curve")?;
                strata = survival.strata.len();
                errors.push(largest_difference(&survival, &truth, &|_, _| true));
                if options.secure {
                    secure_body.push(largest_difference(&survival, &truth, &|curve, day| {
                        curve.at_risk[day]
                            .is_some_and(|n| n as f64 >= 0.1 * curve.patients.unwrap_or(0) as f64)
                    }));
                } else {
                    cells += survival.strata.iter().map(|c| c.day.len()).sum::<usize>();
                }
                for (group, exact) in &truth {
                    let Some(curve) = survival.strata.iter().find(|c| &c.group == group) else {
                        continue;
                    };
                    for (day, t) in exact.iter().enumerate() {
                        *cover +=
                            usize::from(curve.ci95_low[day] <= *t && *t <= curve.ci95_high[day]);
                    }
                    if let Some(true_median) = exact.iter().position(|s| *s <= 0.5) {
                        medians += 1;
                        let [low, high] = curve.median_ci95;
                        let inside = low.is_some_and(|l| l <= true_median)
                            && high.is_none_or(|h| true_median <= h);
                        medians_in += usize::from(inside);
                    }
                }
            }
            // One central mechanism on the pooled trees, read the same way.
            let flat: Vec<i64> = parts.iter().flatten().copied().collect();
            let noisy = central.release(flat)?;
            let cells_per_part = labels.len().max(1);
            let release = renkei_protocol::Release::Cells {
                labels: labels.clone(),
                parts: noisy.chunks(cells_per_part).map(<[i64]>::to_vec).collect(),
                suppressed: suppressed.clone(),
            };
            let site = renkei_engine::SiteRelease {
                release: &release,
                value_scale: 0,
                min_cell_size: QueryLimits::default().min_cell_size,
                noise_std: central.noise_std,
                count_noise_std: None,
            };
            let combined = renkei_engine::statistic::combine(&query, &[site])
                .context("the central release combines")?;
            let survival = combined.survival.context("no central curve")?;
            central_errors.push(largest_difference(&survival, &truth, &|_, _| true));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        report.push(CurveAccuracy {
            query: sql_text.to_string(),
            horizon_days: *horizon_days,
            strata,
            per_site_max_error_mean: mean(&per_site_errors),
            per_site_max_error_worst: worst(&per_site_errors),
            secure_max_error_mean: mean(&secure_errors),
            secure_max_error_worst: worst(&secure_errors),
            central_max_error_mean: mean(&central_errors),
            ratio_secure_to_central: mean(&secure_errors) / mean(&central_errors),
            secure_max_error_mean_while_10pct_at_risk: mean(&secure_body),
            per_site_band_coverage: per_site_cover as f64 / cells.max(1) as f64,
            secure_band_coverage: secure_cover as f64 / cells.max(1) as f64,
            median_in_interval: (medians > 0).then(|| medians_in as f64 / medians as f64),
            per_site_p50_ms: percentile(&mut per_site_latency, 0.5),
            secure_p50_ms: percentile(&mut secure_latency, 0.5),
        });
    }
    testnet.shutdown().await;
    Ok(SurvivalBench {
        nodes,
        patients,
        repetitions,
        rho: rho.as_rho(),
        curves: report,
    })
}

/// The regression bench's model: which comorbidities raise the odds of severe COVID-19,
/// adjusted for age and sex (six covariates), with the DuckDB query listing the same terms
/// for statsmodels.
pub const REGRESSION_MODEL: (&str, &str) = (
    "SELECT LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), age, diabetes, \
     hypertension, obesity, cardiovascular_disease, sex = 'male') FROM patients",
    "SELECT CAST(severity IN ('severe', 'critical') AS DOUBLE), age, CAST(diabetes AS DOUBLE), \
     CAST(hypertension AS DOUBLE), CAST(obesity AS DOUBLE), \
     CAST(cardiovascular_disease AS DOUBLE), CAST(sex = 'male' AS DOUBLE) FROM patients",
);

/// Ten covariates, for the speed figure.
pub const REGRESSION_MODEL_10: (&str, &str) = (
    "SELECT LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), age, diabetes, \
     hypertension, obesity, cardiovascular_disease, chronic_lung_disease, kidney_disease, \
     cancer, sex = 'male', age >= 65) FROM patients",
    "SELECT CAST(severity IN ('severe', 'critical') AS DOUBLE), age, CAST(diabetes AS DOUBLE), \
     CAST(hypertension AS DOUBLE), CAST(obesity AS DOUBLE), \
     CAST(cardiovascular_disease AS DOUBLE), CAST(chronic_lung_disease AS DOUBLE), \
     CAST(kidney_disease AS DOUBLE), CAST(cancer AS DOUBLE), CAST(sex = 'male' AS DOUBLE), \
     CAST(age >= 65 AS DOUBLE) FROM patients",
);

/// How close one mode's fits come to statsmodels' on the pooled patients.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FitAccuracy {
    /// Per fit, the largest |β − statsmodels β| over the covariates (log-odds per unit of
    /// each); its mean and worst over the fits.
    pub max_coefficient_error_mean: f64,
    pub max_coefficient_error_worst: f64,
    /// Share of (fit, coefficient) pairs, intercept included, whose noise interval
    /// (`estimate ± 1.96 noise_std_error`) holds statsmodels' coefficient.
    pub noise_interval_coverage: f64,
    /// The same for the reported 95% interval (sampling and noise together).
    pub ci95_coverage: f64,
    /// renkei's 95% interval width over statsmodels' (`2 · 1.96 · bse`), averaged over the
    /// covariates and fits.
    pub width_ratio_to_statsmodels: f64,
    /// Share of fits that said they converged.
    pub converged: f64,
    /// Fits that gave no estimate (a matrix not positive definite, a divergence).
    pub failed: usize,
    /// Wall time of one whole fit (all its steps), median.
    pub p50_ms: f64,
}

/// The regression bench's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegressionBench {
    pub nodes: usize,
    pub patients: usize,
    pub covariates: usize,
    pub repetitions: usize,
    pub rho: f64,
    pub iterations: u8,
    pub per_site: FitAccuracy,
    pub secure: FitAccuracy,
    pub central: FitAccuracy,
    /// Mean largest error, secure over central.
    pub ratio_secure_to_central: f64,
    /// statsmodels' `Logit.fit` on the pooled rows, the fit alone (loading excluded).
    pub statsmodels_fit_ms: f64,
    /// The pooled rows statsmodels fitted.
    pub pooled_patients: usize,
}

/// Tallies fits against the pooled reference.
#[derive(Default)]
struct FitTally {
    errors: Vec<f64>,
    noise_covered: usize,
    ci_covered: usize,
    pairs: usize,
    widths: Vec<f64>,
    converged: usize,
    fits: usize,
    failed: usize,
    latency: Vec<Duration>,
}

impl FitTally {
    fn add(&mut self, fit: Option<&renkei_engine::Regression>, params: &[f64], bse: &[f64]) {
        self.fits += 1;
        let Some(fit) = fit else {
            self.failed += 1;
            return;
        };
        self.converged += usize::from(fit.converged);
        let mut largest: f64 = 0.0;
        for (i, (c, (p, se))) in fit
            .coefficients
            .iter()
            .zip(params.iter().zip(bse))
            .enumerate()
        {
            self.pairs += 1;
            let off = (c.estimate - p).abs();
            self.noise_covered += usize::from(off <= renkei_engine::Z_95 * c.noise_std_error);
            self.ci_covered += usize::from(c.ci95[0] <= *p && *p <= c.ci95[1]);
            if i > 0 {
                largest = largest.max(off);
                self.widths
                    .push((c.ci95[1] - c.ci95[0]) / (2.0 * renkei_engine::Z_95 * se));
            }
        }
        self.errors.push(largest);
    }

    fn report(mut self) -> FitAccuracy {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        FitAccuracy {
            max_coefficient_error_mean: mean(&self.errors),
            max_coefficient_error_worst: self.errors.iter().copied().fold(0.0, f64::max),
            noise_interval_coverage: self.noise_covered as f64 / self.pairs.max(1) as f64,
            ci95_coverage: self.ci_covered as f64 / self.pairs.max(1) as f64,
            width_ratio_to_statsmodels: mean(&self.widths),
            converged: self.converged as f64 / self.fits.max(1) as f64,
            failed: self.failed,
            p50_ms: if self.latency.is_empty() {
                0.0
            } else {
                percentile(&mut self.latency, 0.5)
            },
        }
    }
}

/// One fit from the pooled exact statistics of `datasets`, each step noised once by a
/// central mechanism at its share of `rho`: what a trusted curator holding every
/// hospital's patients would release.
fn central_fit(
    datasets: &[Arc<Dataset>],
    query: &renkei_protocol::Query,
    rho: MicroRho,
) -> anyhow::Result<Option<renkei_engine::Regression>> {
    let renkei_protocol::Aggregate::LogisticRegression { iterations, .. } = &query.aggregate else {
        anyhow::bail!("the bench fits a logistic regression");
    };
    let budgets = renkei_protocol::query::fit_step_budgets(rho.0, *iterations);
    let mut query = query.clone();
    for budget in budgets {
        let mut pooled: Option<(Vec<renkei_protocol::TermScale>, Vec<i64>)> = None;
        let mut sensitivity = 0.0;
        for dataset in datasets {
            let compiled = dataset.compile(&query)?;
            sensitivity = compiled.parts()[0].sensitivity;
            let renkei_protocol::Release::Regression { terms, values } =
                compiled.unnoised_release(dataset.evaluate(&compiled))
            else {
                anyhow::bail!("not a regression's sums");
            };
            pooled = Some(match pooled {
                None => (terms, values),
                Some((terms, sums)) => (
                    terms,
                    sums.iter().zip(&values).map(|(a, b)| a + b).collect(),
                ),
            });
        }
        let (terms, sums) = pooled.context("no node")?;
        let mechanism = renkei_node::privacy::dp::Calibration::for_request(
            PrivacyRequest::Zcdp {
                rho: MicroRho(budget),
            },
            sensitivity,
            1e-6,
        )?;
        let release = renkei_protocol::Release::Regression {
            terms,
            values: mechanism.release(sums)?,
        };
        let site = renkei_engine::SiteRelease {
            release: &release,
            value_scale: 0,
            min_cell_size: 0,
            noise_std: mechanism.noise_std,
            count_noise_std: None,
        };
        let combined =
            renkei_engine::statistic::combine(&query, &[site]).context("the release combines")?;
        let Some(fit) = combined.regression else {
            return Ok(None);
        };
        match fit.next_step.clone() {
            Some(next) => {
                query.advance_fit(renkei_protocol::RequestId([0; 16]), next);
            }
            None => return Ok(Some(fit)),
        }
    }
    Ok(None)
}

/// A logistic fit asked `repetitions` times per site and as a secure total (alternating)
/// at `rho` per fit, and fitted as often from the pooled statistics with central noise,
/// against statsmodels' fit on the pooled patients; with ten covariates when `wide`.
pub async fn regression(
    dir: &Path,
    nodes: usize,
    patients: usize,
    repetitions: usize,
    rho: MicroRho,
    wide: bool,
) -> anyhow::Result<RegressionBench> {
    anyhow::ensure!(nodes >= 2, "a secure total needs at least two nodes");
    let python = python_importing(&["duckdb", "statsmodels"]).context(
        "the regression bench needs Python with duckdb and statsmodels (set RENKEI_BENCH_PYTHON)",
    )?;
    let (renkei_sql, duckdb_sql) = if wide {
        REGRESSION_MODEL_10
    } else {
        REGRESSION_MODEL
    };
    let config = crate::TestnetConfig {
        nodes,
        patients,
        full_data_patients: 0,
        budget: MicroRho(1_000_000 * MicroRho::PER_RHO),
        limits: QueryLimits {
            max_rho_per_query: MicroRho(10 * MicroRho::PER_RHO),
            ..QueryLimits::default()
        },
        ..crate::TestnetConfig::new(dir.join("net"))
    };
    let testnet = crate::Testnet::start(config).await?;
    let fits = [crate::reference::FitSql {
        sql: duckdb_sql,
        model: "logit",
    }];
    let spec = crate::reference::spec(&testnet, &[], &[], &fits)?;
    let references = crate::reference::run(Path::new(&python), dir, &spec)?;
    let reference = references.first().context("no reference fit")?;
    let (params, bse, pooled_patients) = crate::reference::fit(reference)?;
    let statsmodels_fit_ms = reference["fit"]["seconds"].as_f64().unwrap_or(f64::NAN) * 1e3;
    let key = SecretKey::read_file(&testnet.consortium.researcher_key)?;
    let policy = SignedPolicy::read_file(&testnet.consortium.policy)?.verify_self_anchored()?;
    let session = ResearcherSession::new(key, policy, NetworkClient::start(None).await?);
    let addresses = testnet.addresses();
    let per_site = QueryOptions {
        privacy: PrivacyRequest::Zcdp { rho },
        secure: false,
        deadline: Duration::from_secs(600),
        ..session.default_options()?
    };
    let secure = QueryOptions {
        secure: true,
        ..per_site.clone()
    };
    let query = renkei_aggregator::sql::compile(renkei_sql)?;
    let renkei_protocol::Aggregate::LogisticRegression {
        iterations,
        ref covariates,
        ..
    } = query.aggregate
    else {
        anyhow::bail!("the bench fits a logistic regression");
    };
    let covariates = covariates.len();
    let datasets: Vec<Arc<Dataset>> = (0..nodes)
        .map(|i| {
            testnet
                .running(i)
                .map(|node| node.desk().dataset())
                .context("every node runs")
        })
        .collect::<anyhow::Result<_>>()?;
    let (mut per_site_tally, mut secure_tally, mut central_tally) = (
        FitTally::default(),
        FitTally::default(),
        FitTally::default(),
    );
    for _ in 0..repetitions {
        for (options, tally) in [
            (&per_site, &mut per_site_tally),
            (&secure, &mut secure_tally),
        ] {
            let start = Instant::now();
            let answer = session.query(&addresses, renkei_sql, options).await?;
            tally.latency.push(start.elapsed());
            tally.add(answer.regression.as_ref(), &params, &bse);
        }
        let start = Instant::now();
        let central = central_fit(&datasets, &query, rho)?;
        central_tally.latency.push(start.elapsed());
        central_tally.add(central.as_ref(), &params, &bse);
    }
    testnet.shutdown().await;
    let (per_site, secure, central) = (
        per_site_tally.report(),
        secure_tally.report(),
        central_tally.report(),
    );
    Ok(RegressionBench {
        nodes,
        patients,
        covariates,
        repetitions,
        rho: rho.as_rho(),
        iterations,
        ratio_secure_to_central: secure.max_coefficient_error_mean
            / central.max_coefficient_error_mean,
        per_site,
        secure,
        central,
        statsmodels_fit_ms,
        pooled_patients,
    })
}
