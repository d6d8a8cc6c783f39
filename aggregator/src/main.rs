//! `renkei-aggregator`: the researcher's command line. A thin clap layer over
//! `renkei_aggregator`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use renkei_aggregator::passphrase::PassphraseSource;
use renkei_aggregator::researcher::{DEFAULT_DEADLINE, DEFAULT_RHO};
use renkei_aggregator::{NodeAddress, Progress, QueryOptions, ResearcherSession};
use renkei_aggregator::{report, sql};
use renkei_protocol::{MicroEpsilon, MicroRho, PrivacyRequest, SecretKey};

#[derive(Parser)]
#[command(
    name = "renkei-aggregator",
    version,
    about = "Ask renkei hospital nodes a question; get a differentially private answer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
enum Command {
    /// Create a researcher key, encrypted at rest under a passphrase (Argon2id +
    /// XChaCha20-Poly1305); prints the public key to give to the consortium.
    Keygen {
        /// Where to write the encrypted key (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Read the passphrase from this file [default: $RENKEI_PASSPHRASE, else a prompt].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Sign a SQL query, ask every node, and print the combined estimate.
    Query {
        /// The researcher's secret key file.
        #[arg(long)]
        key: PathBuf,
        /// Read the key's passphrase from this file [default: $RENKEI_PASSPHRASE, else a
        /// prompt].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Node addresses, comma-separated, each ending in /p2p/<peer id> [default: every
        /// member node the policy lists an address for].
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Signed consortium policy [default: $RENKEI_POLICY, else policy.json beside the key].
        #[arg(long, env = "RENKEI_POLICY")]
        policy: Option<PathBuf>,
        /// Study to charge [default: the only study the researcher is approved for].
        #[arg(long)]
        study: Option<String>,
        /// Privacy (zCDP rho) each node spends on this answer (discrete Gaussian noise).
        #[arg(long, default_value_t = DEFAULT_RHO.to_string())]
        rho: String,
        /// Ask for pure epsilon-DP instead (discrete Laplace noise; charged rho = epsilon²/2).
        #[arg(long, conflicts_with = "rho")]
        epsilon: Option<String>,
        /// Seconds to wait for the slowest node.
        #[arg(long, default_value_t = DEFAULT_DEADLINE.as_secs_f64())]
        timeout: f64,
        /// Ask for a secure total: each node adds a share of the noise and masks its answer,
        /// so only the network-wide total is readable (needs every node to answer). Chosen
        /// automatically for studies that allow only secure totals.
        #[arg(long)]
        secure: bool,
        /// With a secure total: how many nodes may fail to contribute while the total is
        /// still read (from the others; each node's noise share is sized for that many fewer
        /// nodes, so the total's noise grows by sqrt(n / (n - t - dropouts))). Default 0: a
        /// missing node aborts the round.
        #[arg(long, default_value_t = 0)]
        dropouts: u32,
        /// Only show what the query would cost at each node and the budget left there;
        /// nothing is spent.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Read the SQL from a file instead of the command line.
        #[arg(long, conflicts_with = "sql")]
        file: Option<PathBuf>,
        /// SELECT COUNT(*) FROM patients WHERE …
        sql: Option<String>,
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

/// Exit status when the query ran but no node answered.
const EXIT_NO_ANSWER: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen {
            out,
            passphrase_file,
        } => {
            let passphrase = PassphraseSource::from_file(passphrase_file)
                .new_passphrase()
                .map_err(|reason| anyhow::anyhow!("passphrase: {reason}"))?;
            let key = SecretKey::generate()?;
            key.write_encrypted(&out, passphrase.as_bytes())?;
            println!("{}", key.public_key());
        }
        Command::Query {
            key,
            passphrase_file,
            nodes,
            policy,
            study,
            rho,
            epsilon,
            timeout,
            secure,
            dropouts,
            dry_run,
            format,
            file,
            sql: sql_text,
        } => {
            let sql_text = match (file, sql_text) {
                (Some(path), _) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, Some(text)) => text,
                (None, None) => bail!("give the SQL as an argument or with --file"),
            };
            // Compile first: a typo costs nothing and needs no network.
            if let Err(e) = sql::compile(&sql_text) {
                bail!("SQL error: {}", e.render(&sql_text));
            }
            let named = nodes
                .iter()
                .map(|n| n.parse::<NodeAddress>())
                .collect::<Result<Vec<_>, _>>()?;
            let privacy = match epsilon {
                Some(epsilon) => PrivacyRequest::PureDp {
                    epsilon: epsilon
                        .parse::<MicroEpsilon>()
                        .map_err(|e| anyhow::anyhow!("--epsilon {epsilon}: {e}"))?,
                },
                None => PrivacyRequest::Zcdp {
                    rho: rho
                        .parse::<MicroRho>()
                        .map_err(|e| anyhow::anyhow!("--rho {rho}: {e}"))?,
                },
            };
            if !(timeout.is_finite() && timeout > 0.0) {
                bail!("--timeout must be a positive number of seconds");
            }
            let policy = policy.unwrap_or_else(|| default_policy_path(&key));
            let passphrase = PassphraseSource::from_file(passphrase_file);
            let session = ResearcherSession::open(&key, &policy, &passphrase)
                .await
                .with_context(|| {
                    format!(
                        "opening key {} and policy {}",
                        key.display(),
                        policy.display()
                    )
                })?;
            let nodes = if named.is_empty() {
                session.member_nodes()?
            } else {
                named
            };
            let study = session.resolve_study(study.as_deref())?;
            let secure = secure || session.secure_only(&study);
            if dropouts > 0 && !secure {
                bail!("--dropouts applies to secure totals; add --secure");
            }
            let options = QueryOptions {
                secure,
                study,
                privacy,
                deadline: Duration::from_secs_f64(timeout),
                dropouts,
                dry_run,
            };
            // Progress goes to a terminal only, so scripts read clean output.
            let show_progress = std::io::stderr().is_terminal();
            if show_progress {
                eprintln!("asking {} node(s)…", nodes.len());
            }
            let progress = |p: Progress| {
                if show_progress {
                    let waiting = if p.pending.is_empty() {
                        String::new()
                    } else {
                        format!("; waiting for {}", p.pending.join(", "))
                    };
                    eprintln!(
                        "  [{}/{}] {} {}{waiting}",
                        p.done, p.total, p.node, p.outcome
                    );
                }
            };
            let answer = session
                .query_with_progress(&nodes, &sql_text, &options, &progress)
                .await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                Format::Table => report::table(&answer, &mut std::io::stdout().lock())?,
                Format::Csv => report::csv(&answer, &mut std::io::stdout().lock())?,
            }
            if answer.dry_run {
                if answer.quotes.is_empty() {
                    return Ok(ExitCode::from(EXIT_NO_ANSWER));
                }
            } else if answer.answered.is_empty() || answer.aborted {
                return Ok(ExitCode::from(EXIT_NO_ANSWER));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn default_policy_path(key: &Path) -> PathBuf {
    key.parent()
        .unwrap_or_else(|| Path::new("."))
        .join("policy.json")
}
