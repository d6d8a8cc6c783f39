//! `renkei-policy`: the consortium admins' command line. Write the policy source (TOML),
//! sign it (each admin separately; signatures are collected in one file), verify, show, and
//! publish it to the member nodes over libp2p. A thin clap layer over `renkei_policies`.
//!
//! Editing commands (`researcher add`, `study add`, `grant`, `revoke`, `member add`) change
//! the TOML source in place and raise its version, so the signed result supersedes the
//! active bundle everywhere. They rewrite the file from the parsed bundle (comments are
//! not kept).

// Command-line enums are parsed once; boxing their big variants would only add noise.
#![allow(clippy::large_enum_variant)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use renkei_aggregator::passphrase::PassphraseSource;
use renkei_aggregator::{NetworkClient, NodeAddress};
use renkei_policies::{
    Member, PolicyBundle, QueryLimits, Researcher, SensitiveRule, SignedPolicy, Study, Timestamp,
};
use renkei_protocol::{MicroRho, PolicyRequest, PolicyResponse, PublicKey, SecretKey};

#[derive(Parser)]
#[command(
    name = "renkei-policy",
    version,
    about = "Write, sign, verify and publish renkei consortium policy bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct PassphraseArgs {
    /// Read the key's passphrase from this file [default: $RENKEI_PASSPHRASE, else a prompt].
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 key (an admin's), encrypted under a passphrase; prints the public
    /// key.
    Keygen {
        /// Where to write the secret key (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Write it unencrypted (development networks only).
        #[arg(long)]
        plain: bool,
        #[command(flatten)]
        passphrase: PassphraseArgs,
    },
    /// Write a starter policy source (TOML) naming its admins (threshold 1; raise it with
    /// `renkei-policy threshold`).
    New {
        /// The consortium's name.
        #[arg(long)]
        consortium: String,
        /// An admin's public key (hex); repeat, or separate keys with commas, for several.
        #[arg(long, required = true, value_delimiter = ',')]
        admin: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// The consortium's admins, whose signatures make a bundle valid.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// How many distinct admin signatures a bundle needs.
    Threshold {
        /// Policy source (TOML), edited in place.
        #[arg(long = "in")]
        input: PathBuf,
        /// Signatures required (at least 1, at most the number of admins).
        #[arg(long)]
        set: u32,
    },
    /// Researchers known to the consortium.
    Researcher {
        #[command(subcommand)]
        command: ResearcherCommand,
    },
    /// Approved studies.
    Study {
        #[command(subcommand)]
        command: StudyCommand,
    },
    /// Member hospitals' nodes.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Approve a researcher for a study.
    Grant {
        /// Policy source (TOML), edited in place.
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        study: String,
        /// The researcher's public key (hex).
        #[arg(long)]
        researcher: String,
    },
    /// Revoke a researcher's key: refused everywhere from the next query after the signed
    /// bundle arrives.
    Revoke {
        #[arg(long = "in")]
        input: PathBuf,
        /// The researcher's public key (hex).
        #[arg(long)]
        researcher: String,
    },
    /// Sign a policy: a TOML source starts a new signed file; a signed file gets one more
    /// admin's signature (admins sign separately; signatures are collected in the file).
    Sign {
        /// Admin secret key file.
        #[arg(long)]
        key: PathBuf,
        /// Policy source (`.toml`) or an already signed policy (`.json`).
        #[arg(long = "in")]
        input: PathBuf,
        /// Signed policy file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        passphrase: PassphraseArgs,
    },
    /// Set consortium-wide limits on every query (only the flags given change).
    Limits {
        #[arg(long = "in")]
        input: PathBuf,
        /// The most rho one query may cost at a node.
        #[arg(long)]
        max_rho_per_query: Option<String>,
        /// Noisy counts below this are withheld.
        #[arg(long)]
        min_cell_size: Option<u64>,
        /// The delta at which zCDP costs are also stated as (epsilon, delta).
        #[arg(long)]
        report_delta: Option<f64>,
        /// Rho all studies together may spend at each node.
        #[arg(long)]
        dataset_budget: Option<String>,
        /// Nodes that may collude with the aggregator in a secure total without weakening
        /// its guarantee (noise sd grows by sqrt(n / (n - t))).
        #[arg(long)]
        secure_colluders: Option<u32>,
    },
    /// Verify a signed policy against the admins and threshold it names.
    Verify {
        #[arg(long)]
        policy: PathBuf,
    },
    /// Print a signed policy's bundle as TOML, after verifying it.
    Show {
        #[arg(long)]
        policy: PathBuf,
    },
    /// Send a signed policy to member nodes; each verifies it and activates it if it is
    /// newer, then passes it on to the other members.
    Publish {
        #[arg(long)]
        policy: PathBuf,
        /// Node addresses ending in /p2p/<peer id>, comma-separated [default: the members'
        /// addresses listed in the bundle].
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Seconds to wait for each node.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Add an admin (by public key, as printed by `renkei-policy keygen`).
    Add {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        key: String,
    },
    /// Remove an admin; refused if fewer admins than the threshold would remain.
    Remove {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        key: String,
    },
}

#[derive(Subcommand)]
enum ResearcherCommand {
    /// Add a researcher (by public key) to the consortium.
    Add {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        name: String,
        /// Public key (hex), as printed by `renkei-aggregator keygen`.
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "")]
        affiliation: String,
    },
}

#[derive(Subcommand)]
enum StudyCommand {
    /// Add an approved study.
    Add {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        title: String,
        /// The principal investigator's name.
        #[arg(long)]
        pi: String,
        /// Views the study may query, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        views: Vec<String>,
        /// Columns the study may use, comma-separated [default: every column].
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
        /// Aggregations allowed, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "count")]
        aggregations: Vec<String>,
        /// Rho each researcher may spend at each node.
        #[arg(long)]
        budget_per_researcher: String,
        /// Rho all researchers together may spend at each node.
        #[arg(long)]
        budget: Option<String>,
        #[arg(long)]
        min_cell_size: Option<u64>,
        /// Start of approval, RFC 3339 (e.g. 2026-04-01T00:00:00Z).
        #[arg(long)]
        from: String,
        /// End of approval, RFC 3339.
        #[arg(long)]
        until: String,
        /// Sensitive views granted (each needs a [[sensitive]] rule and its signatures).
        #[arg(long, value_delimiter = ',')]
        sensitive_views: Vec<String>,
        /// Allow only secure totals: no node's own answer is ever visible.
        #[arg(long)]
        secure_only: bool,
        /// The dataset schema (TOML) the nodes run, to check the study's views and columns
        /// against [default: the covid19 schema renkei ships].
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Add the stricter rule for a sensitive view.
    Sensitive {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        view: String,
        #[arg(long, value_delimiter = ',', default_value = "count")]
        aggregations: Vec<String>,
        #[arg(long)]
        min_cell_size: u64,
        /// Admin signatures a bundle needs for grants of this view to take effect.
        #[arg(long)]
        signatures_required: u32,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Add a hospital's node.
    Add {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        peer_id: String,
        #[arg(long)]
        institution: String,
        /// Where peers can reach it (multiaddrs), comma-separated.
        #[arg(long, value_delimiter = ',')]
        addresses: Vec<String>,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn rho(text: &str, flag: &str) -> anyhow::Result<MicroRho> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("--{flag} {text}: {e}"))
}

fn key(text: &str) -> anyhow::Result<PublicKey> {
    text.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Applies `change` to the TOML source at `path`, raises the version, validates, writes.
fn edit(
    path: &Path,
    change: impl FnOnce(&mut PolicyBundle) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bundle = PolicyBundle::from_toml(&text)?;
    change(&mut bundle)?;
    bundle.version += 1;
    bundle.validate()?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, bundle.to_toml()?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    println!("{} is now version {}", path.display(), bundle.version);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen {
            out,
            plain,
            passphrase,
        } => {
            let key = SecretKey::generate()?;
            if plain {
                key.write_file(&out)?;
            } else {
                let passphrase = PassphraseSource::from_file(passphrase.passphrase_file)
                    .new_passphrase()
                    .map_err(|reason| anyhow::anyhow!("passphrase: {reason}"))?;
                key.write_encrypted(&out, passphrase.as_bytes())?;
            }
            println!("{}", key.public_key());
        }
        Command::New {
            consortium,
            admin,
            out,
        } => {
            let mut admins = Vec::with_capacity(admin.len());
            for text in &admin {
                let admin = key(text)?;
                if admins.contains(&admin) {
                    bail!("--admin {admin} is given twice");
                }
                admins.push(admin);
            }
            let bundle = PolicyBundle {
                version: 1,
                consortium,
                admins,
                threshold: 1,
                members: vec![],
                researchers: vec![],
                studies: vec![],
                sensitive: vec![],
                revoked: vec![],
                limits: QueryLimits::default(),
            };
            if out.exists() {
                bail!("{} exists; not overwriting it", out.display());
            }
            std::fs::write(&out, bundle.to_toml()?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        Command::Admin {
            command: AdminCommand::Add { input, key: public },
        } => edit(&input, |bundle| {
            let admin = key(&public)?;
            if bundle.admins.contains(&admin) {
                bail!("{admin} is already an admin of {}", bundle.consortium);
            }
            bundle.admins.push(admin);
            Ok(())
        })?,
        Command::Admin {
            command: AdminCommand::Remove { input, key: public },
        } => edit(&input, |bundle| {
            let admin = key(&public)?;
            let Some(at) = bundle.admins.iter().position(|a| *a == admin) else {
                bail!("{admin} is not an admin of {}", bundle.consortium);
            };
            if bundle.admins.len() as u64 <= u64::from(bundle.threshold) {
                bail!(
                    "removing {admin} would leave {} admin(s) for a threshold of {}; lower it first with `renkei-policy threshold --set`",
                    bundle.admins.len() - 1,
                    bundle.threshold
                );
            }
            bundle.admins.remove(at);
            Ok(())
        })?,
        Command::Threshold { input, set } => edit(&input, |bundle| {
            if set == 0 || set as usize > bundle.admins.len() {
                bail!(
                    "--set {set}: the threshold must be between 1 and the {} admin(s) of {}",
                    bundle.admins.len(),
                    bundle.consortium
                );
            }
            bundle.threshold = set;
            Ok(())
        })?,
        Command::Researcher {
            command:
                ResearcherCommand::Add {
                    input,
                    name,
                    key: public,
                    affiliation,
                },
        } => edit(&input, |bundle| {
            bundle.researchers.push(Researcher {
                name,
                public_key: key(&public)?,
                affiliation,
            });
            Ok(())
        })?,
        Command::Limits {
            input,
            max_rho_per_query,
            min_cell_size,
            report_delta,
            dataset_budget,
            secure_colluders,
        } => edit(&input, |bundle| {
            let limits = &mut bundle.limits;
            if let Some(max) = max_rho_per_query {
                limits.max_rho_per_query = rho(&max, "max-rho-per-query")?;
            }
            if let Some(min) = min_cell_size {
                limits.min_cell_size = min;
            }
            if let Some(delta) = report_delta {
                anyhow::ensure!(
                    delta > 0.0 && delta < 1.0,
                    "--report-delta must be between 0 and 1, got {delta}"
                );
                limits.report_delta = delta;
            }
            if let Some(budget) = dataset_budget {
                limits.dataset_budget_rho = Some(rho(&budget, "dataset-budget")?);
            }
            if let Some(colluders) = secure_colluders {
                limits.secure_colluders = colluders;
            }
            Ok(())
        })?,
        Command::Study {
            command:
                StudyCommand::Add {
                    input,
                    id,
                    title,
                    pi,
                    views,
                    columns,
                    aggregations,
                    budget_per_researcher,
                    budget,
                    min_cell_size,
                    from,
                    until,
                    sensitive_views,
                    secure_only,
                    schema,
                },
        } => edit(&input, |bundle| {
            check_study_against_schema(schema.as_deref(), &views, &sensitive_views, &columns)?;
            bundle.studies.push(Study {
                id,
                title,
                principal_investigator: pi,
                researchers: vec![],
                views,
                columns,
                aggregations,
                budget_rho_per_researcher: rho(&budget_per_researcher, "budget-per-researcher")?,
                budget_rho: budget.as_deref().map(|b| rho(b, "budget")).transpose()?,
                min_cell_size,
                valid_from: Timestamp::parse(&from)?,
                valid_until: Timestamp::parse(&until)?,
                sensitive_views,
                per_site_answers: !secure_only,
            });
            Ok(())
        })?,
        Command::Study {
            command:
                StudyCommand::Sensitive {
                    input,
                    view,
                    aggregations,
                    min_cell_size,
                    signatures_required,
                },
        } => edit(&input, |bundle| {
            bundle.sensitive.push(SensitiveRule {
                view,
                aggregations,
                min_cell_size,
                signatures_required,
            });
            Ok(())
        })?,
        Command::Member {
            command:
                MemberCommand::Add {
                    input,
                    peer_id,
                    institution,
                    addresses,
                },
        } => edit(&input, |bundle| {
            bundle.members.push(Member {
                peer_id,
                institution,
                addresses,
            });
            Ok(())
        })?,
        Command::Grant {
            input,
            study,
            researcher,
        } => edit(&input, |bundle| {
            let researcher = key(&researcher)?;
            if bundle.researcher(&researcher).is_none() {
                bail!(
                    "{researcher} is not a researcher; add them with `renkei-policy researcher add`"
                );
            }
            let Some(entry) = bundle.studies.iter_mut().find(|s| s.id == study) else {
                bail!("no study `{study}`; add it with `renkei-policy study add`");
            };
            if !entry.researchers.contains(&researcher) {
                entry.researchers.push(researcher);
            }
            Ok(())
        })?,
        Command::Revoke { input, researcher } => edit(&input, |bundle| {
            let researcher = key(&researcher)?;
            if !bundle.revoked.contains(&researcher) {
                bundle.revoked.push(researcher);
            }
            for study in &mut bundle.studies {
                study.researchers.retain(|r| *r != researcher);
            }
            Ok(())
        })?,
        Command::Sign {
            key: key_path,
            input,
            out,
            passphrase,
        } => {
            let source = PassphraseSource::from_file(passphrase.passphrase_file);
            let admin = SecretKey::read_file_with(&key_path, || source.unlock(&key_path))?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let mut signed = if input.extension().is_some_and(|e| e == "toml") {
                SignedPolicy::unsigned(&PolicyBundle::from_toml(&text)?)?
            } else {
                SignedPolicy::from_json(&text, &input.display().to_string())?
            };
            signed.sign(&admin);
            signed.write_file(&out)?;
            println!(
                "signed by {} ({} signature(s)), bundle {}",
                admin.public_key(),
                signed.signatures().len(),
                hex::encode(signed.hash())
            );
        }
        Command::Verify { policy } => {
            let verified = SignedPolicy::read_file(&policy)?.verify_self_anchored()?;
            let bundle = verified.bundle();
            println!(
                "valid: {} v{} signed by {} of {} admin(s) (threshold {}), hash {}",
                bundle.consortium,
                bundle.version,
                verified.signers().len(),
                bundle.admins.len(),
                bundle.threshold,
                verified.hash_hex()
            );
        }
        Command::Show { policy } => {
            let verified = SignedPolicy::read_file(&policy)?.verify_self_anchored()?;
            println!("# hash {}", verified.hash_hex());
            print!("{}", verified.bundle().to_toml()?);
        }
        Command::Publish {
            policy,
            nodes,
            timeout,
        } => {
            if !(timeout.is_finite() && timeout > 0.0) {
                bail!("--timeout must be a positive number of seconds");
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let failed =
                runtime.block_on(publish(&policy, &nodes, Duration::from_secs_f64(timeout)))?;
            if failed > 0 {
                bail!("{failed} node(s) did not take the bundle");
            }
        }
    }
    Ok(())
}

/// Sends the bundle to every node; returns how many did not accept it.
async fn publish(policy: &Path, nodes: &[String], deadline: Duration) -> anyhow::Result<usize> {
    let signed = SignedPolicy::read_file(policy)?;
    let verified = signed.verify_self_anchored()?;
    let targets: Vec<NodeAddress> = if nodes.is_empty() {
        verified
            .bundle()
            .members
            .iter()
            .flat_map(|m| {
                m.addresses.iter().filter_map(move |a| {
                    let address: Multiaddr = a.parse().ok()?;
                    let peer = m.peer_id.parse().ok()?;
                    let address = match address.iter().last() {
                        Some(Protocol::P2p(_)) => address,
                        _ => address.with(Protocol::P2p(peer)),
                    };
                    Some(NodeAddress {
                        peer_id: peer,
                        address,
                    })
                })
            })
            .collect()
    } else {
        nodes
            .iter()
            .map(|n| n.parse::<NodeAddress>())
            .collect::<Result<_, _>>()?
    };
    if targets.is_empty() {
        bail!("no node to publish to: give --nodes, or list members' addresses in the bundle");
    }
    let client = NetworkClient::start(None).await?;
    let transfer = signed.to_transfer();
    let asks = targets.iter().map(|node| {
        let client = client.clone();
        let request = PolicyRequest::Offer(transfer.clone());
        async move {
            let reply = client
                .policy(node.peer_id, node.address.clone(), request, deadline)
                .await;
            (node, reply)
        }
    });
    let mut failed = 0;
    for (node, reply) in futures::future::join_all(asks).await {
        match reply {
            Ok(PolicyResponse::Accepted { version, .. }) => {
                println!("{}  accepted v{version}", node.peer_id)
            }
            Ok(PolicyResponse::AlreadyActive { version, .. }) => {
                println!("{}  already has v{version}", node.peer_id)
            }
            Ok(PolicyResponse::Refused(refusal)) => {
                failed += 1;
                println!(
                    "{}  REFUSED {}: {}",
                    node.peer_id, refusal.code, refusal.reason
                );
            }
            Ok(other) => {
                failed += 1;
                println!("{}  unexpected reply {other:?}", node.peer_id);
            }
            Err(e) => {
                failed += 1;
                println!("{}  unreachable: {e}", node.peer_id);
            }
        }
    }
    Ok(failed)
}

/// Refuses a study naming a view or column the nodes' dataset schema (`schema`, or the
/// shipped covid19 one) does not have, saying which and what it probably meant: a bogus
/// name would otherwise pass in silence and only show as refusals at query time.
fn check_study_against_schema(
    schema: Option<&std::path::Path>,
    views: &[String],
    sensitive_views: &[String],
    columns: &[String],
) -> anyhow::Result<()> {
    let (schema, source) = match schema {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the schema {}", path.display()))?;
            let schema = renkei_engine::DatasetSchema::from_toml(&text)
                .with_context(|| format!("the schema {}", path.display()))?;
            (schema, path.display().to_string())
        }
        None => (
            renkei_engine::DatasetSchema::covid19()?,
            "covid19 (pass --schema for another)".to_string(),
        ),
    };
    let catalogue = renkei_engine::Dataset::empty(std::sync::Arc::new(schema)).catalogue();
    let suggestion = |name: &str, known: &mut dyn Iterator<Item = &str>| {
        renkei_policies::nearest_name(name, known)
            .map(|near| format!(" (did you mean `{near}`?)"))
            .unwrap_or_default()
    };
    for view in views.iter().chain(sensitive_views) {
        if !catalogue.iter().any(|(known, _)| known == view) {
            let near = suggestion(view, &mut catalogue.iter().map(|(v, _)| v.as_str()));
            anyhow::bail!(
                "no view `{view}` in the schema {source}{near}; its views: {}",
                catalogue
                    .iter()
                    .map(|(v, _)| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let known: std::collections::BTreeSet<&str> = catalogue
        .iter()
        .filter(|(view, _)| views.contains(view) || sensitive_views.contains(view))
        .flat_map(|(_, columns)| columns.iter().map(String::as_str))
        .collect();
    for column in columns {
        if !known.contains(column.as_str()) {
            let near = suggestion(column, &mut known.iter().copied());
            anyhow::bail!(
                "no column `{column}` in the study's views ({}) of the schema {source}{near}",
                views.join(", ")
            );
        }
    }
    Ok(())
}
