//! `renkei-testnet`: synthetic hospitals on one machine. `demo` runs a walk-through and
//! exits; `up` keeps a network running for by-hand use and writes `testnet.json`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use renkei_testnet::demo;
use renkei_testnet::synth::TrueValue;
use renkei_testnet::{Testnet, TestnetConfig};

#[derive(Parser)]
#[command(
    name = "renkei-testnet",
    version,
    about = "A local renkei network with synthetic hospitals"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start 3 hospitals and an aggregator, ask a few count queries, print truth vs estimate.
    Demo {
        /// Patients over all hospitals.
        #[arg(long, default_value_t = 6_000)]
        patients: usize,
        #[arg(long, default_value_t = 2020)]
        seed: u64,
        /// Keep the testnet's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Measure ingestion and query speed (see BENCHMARKS.md); prints JSON.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Start a testnet, write DIR/testnet.json, and run until interrupted.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Patients over all hospitals.
        #[arg(long, default_value_t = 6_000)]
        patients: usize,
        #[arg(long, default_value_t = 2020)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// A lab CSV loaded into a node, against `sqlite3 .import` and DuckDB's read_csv.
    Ingest {
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Work directory [default: a temporary one].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Engine latency on one node with everyone, then N nodes over libp2p, and DuckDB.
    Query {
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        #[arg(long, default_value_t = 1_000_000)]
        patients: usize,
        #[arg(long, default_value_t = 5)]
        timepoints_per_patient: usize,
        /// Federated queries to time.
        #[arg(long, default_value_t = 500)]
        queries: usize,
        /// Queries in flight for the throughput figure.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The query engine alone: one node holding every patient, no network.
    Engine {
        #[arg(long, default_value_t = 1_000_000)]
        patients: usize,
        #[arg(long, default_value_t = 5)]
        timepoints_per_patient: usize,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// One count asked per site, as a secure total and of one central mechanism: RMSE side
    /// by side, and the latency of both modes.
    Secure {
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        #[arg(long, default_value_t = 8_000)]
        patients: usize,
        /// Queries asked in each mode.
        #[arg(long, default_value_t = 500)]
        queries: usize,
        /// zCDP rho of each query.
        #[arg(long, default_value = "0.01")]
        rho: String,
        /// Dropouts the recoverable rounds (d, e) are asked to survive.
        #[arg(long, default_value_t = 1)]
        dropouts: u32,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Kaplan–Meier curves per site and secure, against lifelines on the pooled patients.
    Survival {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 6_000)]
        patients: usize,
        /// Queries asked in each mode, per curve.
        #[arg(long, default_value_t = 50)]
        repetitions: usize,
        /// zCDP rho of each query (the default budget per query).
        #[arg(long, default_value = "0.05")]
        rho: String,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A logistic fit per site, secure and with central noise, against statsmodels on the
    /// pooled patients.
    Regression {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 6_000)]
        patients: usize,
        /// Fits in each mode.
        #[arg(long, default_value_t = 30)]
        repetitions: usize,
        /// zCDP rho of each fit, over all its steps.
        #[arg(long, default_value = "1")]
        rho: String,
        /// Ten covariates instead of six (the speed figure).
        #[arg(long)]
        wide: bool,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo {
            patients,
            seed,
            dir,
        } => {
            let temp;
            let dir = match dir {
                Some(dir) => dir,
                None => {
                    temp = tempfile::tempdir().context("creating a temporary directory")?;
                    temp.path().to_path_buf()
                }
            };
            println!(
                "renkei demo: 3 hospitals, {patients} synthetic patients (100 with CT and sequencing files), seed {seed}"
            );
            println!("(true counts are known only because the data is synthetic)\n");
            let rows = demo::run(&dir, patients, seed).await?;
            for row in &rows {
                println!("{}", row.sql);
                match (&row.truth, row.estimate, row.ci95) {
                    (TrueValue::Number(truth), Some(estimate), Some([low, high])) => println!(
                        "  true {:>9.2}   estimate {:>9}   95% CI [{:.1}, {:.1}]{}",
                        truth,
                        estimate.to_string(),
                        low,
                        high,
                        if (low..=high).contains(truth) {
                            ""
                        } else {
                            "   (truth outside the interval: expected 1 time in 20)"
                        }
                    ),
                    (TrueValue::Groups(cells), _, _) => {
                        for group in &row.groups {
                            let truth = cells
                                .iter()
                                .find(|(labels, _)| *labels == group.group)
                                .map_or(0, |(_, n)| *n);
                            println!(
                                "  {:<24} true {:>5}   estimate {:>5}   95% CI [{:.1}, {:.1}]",
                                group.group.join(" / "),
                                truth,
                                group.estimate.to_string(),
                                group.ci95[0],
                                group.ci95[1]
                            );
                        }
                    }
                    (TrueValue::Curves(curves), _, _) => match &row.survival {
                        Some(survival) => print_curves(curves, survival),
                        None => println!("  no curve"),
                    },
                    (TrueValue::Coefficients(pooled), _, _) => match &row.regression {
                        Some(fit) => print_fit(pooled, fit),
                        None => println!("  no fit"),
                    },
                    (truth, _, _) => println!("  true {truth:?}   no answer"),
                }
                println!(
                    "  answered by: {}{}",
                    row.answered.join(", "),
                    match row.mode {
                        renkei_aggregator::AnswerMode::Secure =>
                            "   (secure total: no hospital's own answer was readable)",
                        renkei_aggregator::AnswerMode::PerSite => "",
                    }
                );
                if !row.missing_or_refused.is_empty() {
                    println!(
                        "  missing or refused: {}",
                        row.missing_or_refused.join("; ")
                    );
                }
                println!();
            }
            if rows.iter().any(|r| r.answered.is_empty()) {
                bail!("some queries got no answer");
            }
        }
        Command::Bench { which } => {
            let temp = tempfile::tempdir().context("creating a temporary directory")?;
            let report = match which {
                BenchCommand::Ingest { rows, dir } => {
                    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
                    serde_json::to_string_pretty(&renkei_testnet::bench::ingest(&dir, rows)?)?
                }
                BenchCommand::Query {
                    nodes,
                    patients,
                    timepoints_per_patient,
                    queries,
                    concurrency,
                    dir,
                } => {
                    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
                    let report = renkei_testnet::bench::queries(
                        &dir,
                        nodes,
                        patients,
                        timepoints_per_patient,
                        queries,
                        concurrency,
                    )
                    .await?;
                    serde_json::to_string_pretty(&report)?
                }
                BenchCommand::Engine {
                    patients,
                    timepoints_per_patient,
                    dir,
                } => {
                    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
                    let report =
                        renkei_testnet::bench::engine(&dir, patients, timepoints_per_patient)?;
                    serde_json::to_string_pretty(&report)?
                }
                BenchCommand::Secure {
                    nodes,
                    patients,
                    queries,
                    rho,
                    dropouts,
                    dir,
                } => {
                    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
                    let rho = rho_arg(&rho)?;
                    let report = renkei_testnet::bench::secure(
                        &dir, nodes, patients, queries, rho, dropouts,
                    )
                    .await?;
                    serde_json::to_string_pretty(&report)?
                }
                BenchCommand::Survival {
                    nodes,
                    patients,
                    repetitions,
                    rho,
                    dir,
                } => {
                    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
                    let rho = rho_arg(&rho)?;
                    let report =
                        renkei_testnet::bench::survival(&dir, nodes, patients, repetitions, rho)
                            .await?;
                    serde_json::to_string_pretty(&report)?
                }
                BenchCommand::Regression {
                    nodes,
                    patients,
                    repetitions,
                    rho,
                    wide,
                    dir,
                } => {
                    let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
                    let rho = rho_arg(&rho)?;
                    let report = renkei_testnet::bench::regression(
                        &dir,
                        nodes,
                        patients,
                        repetitions,
                        rho,
                        wide,
                    )
                    .await?;
                    serde_json::to_string_pretty(&report)?
                }
            };
            println!("{report}");
        }
        Command::Up {
            dir,
            nodes,
            patients,
            seed,
        } => {
            if dir.join("testnet.json").exists() {
                bail!(
                    "{} already holds a testnet; remove it or choose another --dir",
                    dir.display()
                );
            }
            let config = TestnetConfig {
                nodes,
                patients,
                seed,
                ..TestnetConfig::new(&dir)
            };
            let testnet = Testnet::start(config).await?;
            let manifest = dir.join("testnet.json");
            testnet.write_manifest(&manifest)?;
            println!(
                "testnet up: {} nodes; manifest {}",
                testnet.nodes.len(),
                manifest.display()
            );
            for node in &testnet.nodes {
                println!("  {:<12} {}", node.institution, node.address);
            }
            let nodes: Vec<String> = testnet
                .nodes
                .iter()
                .map(|n| n.address.to_string())
                .collect();
            println!(
                "\ntry:\n  renkei-aggregator query --key {} --nodes {} \"SELECT COUNT(*) FROM patients WHERE age >= 65\"",
                testnet.consortium.researcher_key.display(),
                nodes.join(",")
            );
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            testnet.shutdown().await;
        }
    }
    Ok(())
}

/// A demo regression beside the non-private pooled fit: each coefficient (its odds ratio
/// for a logistic fit), its interval, and the pooled coefficient.
fn print_fit(pooled: &[f64], fit: &renkei_aggregator::results::Regression) {
    println!(
        "  {:<20} {:>10} {:>24} {:>10}",
        "term", "estimate", "95% CI", "pooled"
    );
    for (c, truth) in fit.coefficients.iter().zip(pooled) {
        let interval = format!("[{:.3}, {:.3}]", c.ci95[0], c.ci95[1]);
        let odds = match (c.odds_ratio, truth) {
            (Some(or), truth) => format!("   odds ratio {or:.2} (pooled {:.2})", truth.exp()),
            (None, _) => String::new(),
        };
        println!(
            "  {:<20} {:>10.4} {:>24} {:>10.4}{odds}",
            c.term, c.estimate, interval, truth
        );
    }
    println!(
        "  about {:.0} patients, {} of {} Newton steps{}",
        fit.patients,
        fit.steps,
        fit.iterations,
        if fit.converged {
            ", converged"
        } else {
            ", not converged"
        }
    );
}

/// A demo survival answer against the true curves: S(t) every two weeks and at the horizon,
/// the median and the log-rank test.
fn print_curves(
    truth: &[(Vec<String>, Vec<f64>)],
    survival: &renkei_aggregator::results::Survival,
) {
    for curve in &survival.strata {
        let exact = truth
            .iter()
            .find(|(labels, _)| *labels == curve.group)
            .map(|(_, s)| s.as_slice())
            .unwrap_or(&[]);
        println!("  {}", curve.group.join(" / "));
        let last = curve.day.len().saturating_sub(1);
        for day in (0..=last).filter(|d| d % 14 == 0 || *d == last) {
            println!(
                "    day {:>3}   true S {:.3}   estimate {:.3}   95% band [{:.3}, {:.3}]   at risk {}",
                day,
                exact.get(day).copied().unwrap_or(f64::NAN),
                curve.survival[day],
                curve.ci95_low[day],
                curve.ci95_high[day],
                curve.at_risk[day].map_or_else(|| "withheld".to_string(), |n| n.to_string())
            );
        }
    }
    if let Some(test) = &survival.log_rank {
        println!(
            "  log-rank chi2 {:.2}, p {:.4} (noise included in its variance)",
            test.statistic, test.p_value
        );
    }
}

/// A `--rho` argument as micro-rho.
fn rho_arg(text: &str) -> anyhow::Result<renkei_protocol::MicroRho> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("--rho {text}: {e}"))
}
