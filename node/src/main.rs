//! `renkei-node`: a hospital's node. A thin clap layer over `renkei_node`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use renkei_node::cohort::Cohort;
use renkei_node::ingest::ingest_patients;
use renkei_node::ledger::PrivacyLedger;
use renkei_node::{NodeHome, NodeService};
use renkei_policies::SignedPolicy;

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
    },
    /// Load patients from a CSV file (all rows or none; see the README for the columns).
    Ingest {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        patients: PathBuf,
        /// Validate and report without writing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Answer signed queries under a signed consortium policy until interrupted.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Signed policy file (JSON, from `renkei-policy sign`).
        #[arg(long)]
        policy: PathBuf,
        /// Listen address, e.g. /ip4/0.0.0.0/tcp/4001.
        #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
        listen: Multiaddr,
    },
    /// Show privacy spent per researcher and study, and what is left under a policy.
    Ledger {
        #[arg(long)]
        dir: PathBuf,
        /// Signed policy, to show each researcher's remaining budget.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Show the node's identity and what it holds.
    Status {
        #[arg(long)]
        dir: PathBuf,
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
        Command::Init { dir } => {
            let (_, peer_id) = NodeHome::init(&dir)?;
            println!("{peer_id}");
        }
        Command::Ingest {
            dir,
            patients,
            dry_run,
        } => {
            let store = NodeHome::open(&dir)?.open_store()?;
            let report = ingest_patients(&store, &patients, dry_run)?;
            println!(
                "{}{} rows ({} consented): {} added, {} replaced",
                if dry_run {
                    "dry run, nothing written: "
                } else {
                    ""
                },
                report.rows,
                report.consented,
                report.added,
                report.replaced
            );
        }
        Command::Serve {
            dir,
            policy,
            listen,
        } => {
            let home = NodeHome::open(&dir)?;
            let node = NodeService::start(&home, &policy, listen).await?;
            println!("{}", node.listen_addr());
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            node.shutdown().await;
        }
        Command::Ledger { dir, policy } => {
            let store = NodeHome::open(&dir)?.open_store()?;
            // Read-only: verified for display, not made the node's active policy.
            let policy = policy
                .map(|p| SignedPolicy::read_file(&p)?.verify_self_anchored())
                .transpose()?;
            let ledger = PrivacyLedger::new(store);
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
                    .and_then(|p| p.bundle().researcher(&entry.researcher))
                    .map(|r| r.budget_rho.saturating_sub(entry.spent).to_string())
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
        Command::Status { dir } => {
            let home = NodeHome::open(&dir)?;
            let peer_id = home.peer_id()?;
            let store = home.open_store()?;
            let cohort = Cohort::load(&store)?;
            println!("peer id:   {peer_id}");
            println!(
                "patients:  {} consented, {} withheld (no consent)",
                cohort.consented(),
                cohort.withheld()
            );
        }
    }
    Ok(())
}
