//! `renkei-policy`: the consortium admins' tool to write, sign, verify and inspect policy
//! bundles. A thin clap layer over `renkei_policies`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use renkei_policies::{PolicyBundle, SignedPolicy};
use renkei_protocol::SecretKey;

#[derive(Parser)]
#[command(
    name = "renkei-policy",
    version,
    about = "Write, sign and verify renkei consortium policy bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 key (admin or researcher) and print its public key.
    Keygen {
        /// Where to write the secret key (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a starter policy source (TOML) naming one admin.
    New {
        /// The consortium's name.
        #[arg(long)]
        consortium: String,
        /// The first admin's public key (hex).
        #[arg(long)]
        admin: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a policy: a TOML source starts a new signed file; a signed file gets one more
    /// admin's signature (signatures are collected separately, then combined).
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
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let key = SecretKey::generate()?;
            key.write_file(&out)?;
            println!("{}", key.public_key());
        }
        Command::New {
            consortium,
            admin,
            out,
        } => {
            let bundle = PolicyBundle {
                version: 1,
                consortium,
                admins: vec![admin.parse()?],
                threshold: 1,
                members: vec![],
                researchers: vec![],
                limits: Default::default(),
            };
            if out.exists() {
                bail!("{} exists; not overwriting it", out.display());
            }
            std::fs::write(&out, bundle.to_toml()?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        Command::Sign { key, input, out } => {
            let key = SecretKey::read_file(&key)?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let mut signed = if input.extension().is_some_and(|e| e == "toml") {
                SignedPolicy::unsigned(&PolicyBundle::from_toml(&text)?)?
            } else {
                SignedPolicy::from_json(&text, &input.display().to_string())?
            };
            signed.sign(&key);
            signed.write_file(&out)?;
            println!(
                "signed by {} ({} signature(s)), bundle {}",
                key.public_key(),
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
    }
    Ok(())
}
