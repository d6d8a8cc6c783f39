//! `renkei-node`: a hospital's node. A thin clap layer over `renkei_node`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use renkei_node::audit;
use renkei_node::net::control::{self, ControlRequest, ControlResponse, IngestPlan};
use renkei_node::privacy::ledger::PrivacyLedger;
use renkei_node::service::{NodeStatus, STATUS_FILE, open_node};
use renkei_node::{NodeError, NodeHome, NodeService};

#[derive(Parser)]
#[command(
    name = "renkei-node",
    version,
    about = "A renkei hospital node: data stays on site, only DP aggregates leave"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node: libp2p identity and an empty store. Prints the peer id.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Dataset schema (TOML) [default: the built-in covid19 schema].
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Load data: each file loads completely or not at all (see the README for formats).
    #[command(group(clap::ArgGroup::new("input").required(true).multiple(true)))]
    Ingest {
        #[arg(long)]
        dir: PathBuf,
        /// Patient table (CSV): patient_id, patient columns, consent_<scope> columns.
        #[arg(long, group = "input")]
        patients: Option<PathBuf>,
        /// Timepoint table (CSV): patient_id, timepoint, timepoint columns (course, drugs,
        /// labs, antibodies, cytokines…). May be repeated.
        #[arg(long, group = "input")]
        timepoints: Vec<PathBuf>,
        /// Consent changes (CSV): patient_id, scope, granted.
        #[arg(long, group = "input")]
        consent: Option<PathBuf>,
        /// Information items (CSV): path, patient_id, timepoint, kind (DICOM and FASTQ files).
        #[arg(long, group = "input")]
        manifest: Option<PathBuf>,
        /// A Synthea CSV output directory (patients, encounters, conditions, observations,
        /// medications), mapped onto the schema.
        #[arg(long, group = "input")]
        synthea: Option<PathBuf>,
        /// A FHIR R4 bundle (JSON); may be repeated.
        #[arg(long, group = "input")]
        fhir: Vec<PathBuf>,
        /// Grant secondary-use consent to patients from --synthea / --fhir, which carry none
        /// (synthetic data only).
        #[arg(long)]
        assume_consent: bool,
        /// Validate and report without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Round decimals with more digits after the point than the schema keeps (half away
        /// from zero) and report how many; without it such a value is refused with its
        /// file, line and column.
        #[arg(long)]
        round: bool,
        /// Forget an ingest that did not finish and cannot be run again (its file is gone or
        /// changed), accepting whatever part of it was written.
        #[arg(long, group = "input")]
        abandon_unfinished: bool,
    },
    /// Patients' consent.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// Answer signed queries under the consortium's signed policy until interrupted.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Signed policy file (from `renkei-policy sign`); needed the first time, optional
        /// later (the node keeps its active policy and takes newer ones from the network).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Listen address, e.g. /ip4/0.0.0.0/tcp/4001.
        #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
        listen: Multiaddr,
    },
    /// Show privacy spent per researcher and study, and what is left under the active policy
    /// (the node must be stopped).
    Ledger {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Show the node's identity, active policy and what it holds.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Inspect the tamper-evident audit log (the node must be stopped).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum ConsentCommand {
    /// Withdraw a patient's consent (one scope, or all): effective for every later query.
    Withdraw {
        #[arg(long)]
        dir: PathBuf,
        /// The hospital's patient id.
        #[arg(long)]
        patient: String,
        /// Scope to withdraw (e.g. genome) [default: every scope].
        #[arg(long)]
        scope: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every entry's signature and the hash chain; exit non-zero naming the first
    /// edited, removed, reordered or cut entry.
    Verify {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write the log as JSON lines (after verifying it).
    Export {
        #[arg(long)]
        dir: PathBuf,
        /// File to write [default: standard output].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
        Command::Init { dir, schema } => {
            let (_, peer_id) = match schema {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    NodeHome::init_with_schema(&dir, &text)?
                }
                None => NodeHome::init(&dir)?,
            };
            println!("{peer_id}");
        }
        Command::Ingest {
            dir,
            patients,
            timepoints,
            consent,
            manifest,
            synthea,
            fhir,
            assume_consent,
            dry_run,
            round,
            abandon_unfinished,
        } => {
            let plan = IngestPlan {
                patients,
                timepoints,
                consent,
                manifest,
                synthea,
                fhir,
                assume_consent,
                dry_run,
                round,
            };
            let request = if abandon_unfinished {
                ControlRequest::AbandonUnfinished
            } else {
                ControlRequest::Ingest(plan.absolute()?)
            };
            load_or_hand_over(&dir, request)?;
        }
        Command::Consent {
            command:
                ConsentCommand::Withdraw {
                    dir,
                    patient,
                    scope,
                },
        } => {
            load_or_hand_over(&dir, ControlRequest::WithdrawConsent { patient, scope })?;
        }
        Command::Serve {
            dir,
            policy,
            listen,
        } => {
            let home = NodeHome::open(&dir)?;
            let node = NodeService::start(&home, policy.as_deref(), listen).await?;
            println!("{}", node.listen_addr());
            std::io::stdout().flush().context("writing the address")?;
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            node.shutdown().await;
        }
        Command::Ledger { dir } => {
            let opened = open_node(&NodeHome::open(&dir)?)?;
            let policy = opened.keeper.active();
            let ledger = PrivacyLedger::new(opened.store);
            let cap = policy
                .as_ref()
                .and_then(|p| p.bundle().limits.dataset_budget_rho)
                .map_or_else(|| "no cap".to_string(), |cap| format!("cap {cap}"));
            println!("dataset total spent: {} ({cap})\n", ledger.dataset_spent()?);
            println!(
                "{:<66} {:<24} {:>12} {:>12}",
                "researcher", "study", "spent", "remaining"
            );
            for entry in ledger.entries()? {
                let remaining = policy
                    .as_ref()
                    .and_then(|p| p.bundle().study(&entry.study))
                    .map(|s| {
                        s.budget_rho_per_researcher
                            .saturating_sub(entry.spent)
                            .to_string()
                    })
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<66} {:<24} {:>12} {:>12}",
                    entry.researcher.to_string(),
                    entry.study,
                    entry.spent.to_string(),
                    remaining
                );
            }
        }
        Command::Status { dir } => status(&dir)?,
        Command::Audit { command } => match command {
            AuditCommand::Verify { dir } => {
                let entries = verified_audit(&dir)?;
                println!("audit log intact: {} entries", entries.len());
            }
            AuditCommand::Export { dir, out } => {
                let entries = verified_audit(&dir)?;
                let mut sink: Box<dyn Write> = match &out {
                    Some(path) => Box::new(std::io::BufWriter::new(
                        std::fs::File::create(path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    )),
                    None => Box::new(std::io::stdout().lock()),
                };
                for entry in entries {
                    serde_json::to_writer(&mut sink, &entry)?;
                    sink.write_all(b"\n")?;
                }
                sink.flush()?;
            }
        },
    }
    Ok(())
}

/// Carries out `request` on the node's store, or, when a serving node holds the store, hands
/// it to that node (which then answers from the new data). Prints what was done as it goes.
fn load_or_hand_over(dir: &std::path::Path, request: ControlRequest) -> anyhow::Result<()> {
    match NodeHome::open(dir)?.open_store() {
        Ok(store) => Ok(request.run(&store, &mut |line| println!("{line}"))?),
        Err(NodeError::StoreLocked { .. }) => {
            println!("the node is serving: loading through it");
            match control::send(dir, &request)? {
                ControlResponse::Done { lines } => {
                    lines.iter().for_each(|line| println!("{line}"));
                    Ok(())
                }
                ControlResponse::Failed { lines, error } => {
                    lines.iter().for_each(|line| println!("{line}"));
                    bail!("{error}")
                }
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn verified_audit(dir: &std::path::Path) -> anyhow::Result<Vec<audit::AuditEntry>> {
    let home = NodeHome::open(dir)?;
    let node_key = home.identity()?.public_key();
    let store = open_node(&home)?.store;
    match audit::verify(&store, &node_key)? {
        Ok(entries) => Ok(entries),
        Err(violation) => bail!("audit log of {} is NOT intact: {violation}", dir.display()),
    }
}

fn status(dir: &std::path::Path) -> anyhow::Result<()> {
    let home = NodeHome::open(dir)?;
    println!("peer id:   {}", home.peer_id()?);
    let print_data = |schema: Option<(&str, u32)>,
                      consented: usize,
                      withheld: usize,
                      timepoints: usize,
                      items: &[(String, usize)],
                      orphans: usize,
                      over_bound: Option<(usize, u32)>| {
        if let Some((name, version)) = schema {
            println!("schema:    {name} v{version}");
        }
        println!("patients:  {consented} consented, {withheld} withheld (no consent)");
        println!("timepoints: {timepoints}");
        let items: Vec<String> = items.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("items:     {}", items.join(", "));
        if orphans > 0 {
            println!("orphans:   {orphans} records without their patient (ignored)");
        }
        if let Some((over, bound)) = over_bound.filter(|(over, _)| *over > 0) {
            println!(
                "bound:     {over} patient(s) have more than {bound} timepoints; each counts at most {bound} rows in a timepoint answer, spread over its course"
            );
        }
    };
    match open_node(&home) {
        Ok(opened) => {
            let data = opened.dataset;
            match opened.keeper.active() {
                Some(p) => println!(
                    "policy:    v{} ({}), hash {}",
                    p.bundle().version,
                    p.bundle().consortium,
                    p.hash_hex()
                ),
                None => println!("policy:    none yet"),
            }
            let items: Vec<(String, usize)> = data
                .items()
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect();
            print_data(
                Some((data.schema().name.as_str(), data.schema().version)),
                data.consented(),
                data.withheld(),
                data.timepoints(),
                &items,
                data.orphans(),
                Some((
                    data.patients_over_bound(),
                    data.schema().max_timepoints_per_patient,
                )),
            );
            println!("serving:   no");
        }
        Err(NodeError::StoreLocked { .. }) => {
            let path = dir.join(STATUS_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("the node is running; reading {}", path.display()))?;
            let status: NodeStatus = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a node status", path.display()))?;
            println!(
                "policy:    v{}, hash {}",
                status.policy_version, status.policy_hash
            );
            print_data(
                status.schema.as_ref().map(|(n, v)| (n.as_str(), *v)),
                status.consented,
                status.withheld,
                status.timepoints,
                &status.items,
                status.orphans,
                status.over_bound,
            );
            let since = std::time::UNIX_EPOCH + std::time::Duration::from_secs(status.started_at);
            println!(
                "serving:   yes, at {} (since {})",
                status.listen_addr,
                humantime::format_rfc3339_seconds(since)
            );
            println!("noise rng: {}", status.randomness);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
