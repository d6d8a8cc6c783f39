//! A development consortium: one admin key, one researcher key and a signed policy naming
//! the testnet's nodes, written to a directory the way real admins and researchers would
//! keep them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use libp2p::PeerId;
use renkei_policies::{Member, PolicyBundle, QueryLimits, Researcher, SignedPolicy};
use renkei_protocol::{MicroRho, SecretKey};

/// The study the dev researcher is approved for.
pub const DEV_STUDY: &str = "covid19-severity";

/// The dev researcher's budget per node: enough for the demo and the tests.
pub const DEV_BUDGET: MicroRho = MicroRho(100 * MicroRho::PER_RHO);

/// Files of a development consortium.
#[derive(Debug, Clone)]
pub struct DevConsortium {
    pub admin_key: PathBuf,
    pub researcher_key: PathBuf,
    /// The signed policy (`policy.json`, beside the researcher key, where
    /// `renkei-aggregator` looks by default).
    pub policy: PathBuf,
    pub study: String,
}

impl DevConsortium {
    /// Creates keys and a policy in `dir` admitting `members` (peer id, institution) and one
    /// researcher with `budget` per node, under `limits`.
    pub fn create(
        dir: &Path,
        members: &[(PeerId, String)],
        budget: MicroRho,
        limits: QueryLimits,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let admin = SecretKey::generate()?;
        let researcher = SecretKey::generate()?;
        let consortium = Self {
            admin_key: dir.join("admin.key"),
            researcher_key: dir.join("researcher.key"),
            policy: dir.join("policy.json"),
            study: DEV_STUDY.to_string(),
        };
        admin.write_file(&consortium.admin_key)?;
        researcher.write_file(&consortium.researcher_key)?;
        let bundle = PolicyBundle::development(
            admin.public_key(),
            members
                .iter()
                .map(|(peer_id, institution)| Member {
                    peer_id: peer_id.to_base58(),
                    institution: institution.clone(),
                    addresses: vec![],
                })
                .collect(),
            Researcher {
                name: "Dev Researcher".into(),
                public_key: researcher.public_key(),
                affiliation: "renkei testnet".into(),
            },
            DEV_STUDY,
            budget,
            limits,
            renkei_protocol::unix_now(),
        );
        let mut signed = SignedPolicy::unsigned(&bundle)?;
        signed.sign(&admin);
        signed.write_file(&consortium.policy)?;
        Ok(consortium)
    }
}
