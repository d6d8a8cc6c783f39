//! A local renkei network: N real nodes (each with its own directory, sled store and libp2p
//! identity) serving on 127.0.0.1 with random ports, synthetic patients ingested through the
//! node's CSV path, and a development consortium whose policy admits them.
//!
//! Nodes run as tasks of the calling process; each can be stopped and restarted from its
//! directory (its ledger and nonces persist).

use std::path::{Path, PathBuf};

use anyhow::Context;
use libp2p::{Multiaddr, PeerId};
use renkei_aggregator::NodeAddress;
use renkei_node::ingest;
use renkei_node::service::default_listen;
use renkei_node::{NodeHome, NodeService, RunningNode};
use renkei_policies::QueryLimits;
use renkei_protocol::{MicroRho, Query};
use serde::Serialize;

use crate::consortium::{DEV_BUDGET, DevConsortium};
use crate::synth::{self, SyntheticPatient};

/// What to start.
#[derive(Debug, Clone)]
pub struct TestnetConfig {
    pub dir: PathBuf,
    pub nodes: usize,
    /// Patients over all nodes.
    pub patients: usize,
    /// Patients over all nodes with full data (CT and sequencing files at their timepoints).
    pub full_data_patients: usize,
    pub seed: u64,
    /// The dev researcher's budget per node.
    pub budget: MicroRho,
    /// Per-query limits of the dev policy (minimum cell size, dataset cap, …).
    pub limits: QueryLimits,
}

impl TestnetConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            nodes: 3,
            patients: 6_000,
            full_data_patients: 100,
            seed: 2020,
            budget: DEV_BUDGET,
            limits: QueryLimits::default(),
        }
    }
}

/// One hospital of the testnet.
#[derive(Debug)]
pub struct TestNode {
    pub institution: String,
    pub home: NodeHome,
    pub peer_id: PeerId,
    /// The full address while serving (kept across restarts when the port is free).
    pub address: Multiaddr,
    pub patients: Vec<SyntheticPatient>,
    running: Option<RunningNode>,
}

impl TestNode {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    pub fn node_address(&self) -> NodeAddress {
        NodeAddress {
            peer_id: self.peer_id,
            address: self.address.clone(),
        }
    }
}

/// A running local network.
#[derive(Debug)]
pub struct Testnet {
    pub dir: PathBuf,
    pub consortium: DevConsortium,
    pub nodes: Vec<TestNode>,
}

/// `testnet.json`: what scripts need to talk to the testnet.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub nodes: Vec<ManifestNode>,
    pub researcher_key: PathBuf,
    pub admin_key: PathBuf,
    pub policy: PathBuf,
    pub study: String,
}

#[derive(Debug, Serialize)]
pub struct ManifestNode {
    pub institution: String,
    pub peer_id: String,
    pub address: String,
    pub dir: PathBuf,
    pub patients: usize,
}

impl Testnet {
    /// Creates node directories, generates and ingests patients, writes the consortium and
    /// starts every node.
    pub async fn start(config: TestnetConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(config.nodes > 0, "a testnet needs at least one node");
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("creating {}", config.dir.display()))?;
        let mut prepared = Vec::with_capacity(config.nodes);
        for i in 0..config.nodes {
            let institution = format!("Hospital {}", (b'A' + (i % 26) as u8) as char);
            let node_dir = config.dir.join(format!("node-{i}"));
            let (home, peer_id) = NodeHome::init(&node_dir)?;
            let spread =
                |total: usize| total / config.nodes + usize::from(i < total % config.nodes);
            let mut patients = synth::generate(
                i,
                spread(config.patients),
                spread(config.full_data_patients),
                config.seed,
            );
            let files = synth::write_hospital(
                &node_dir.join("export"),
                &mut patients,
                config.seed ^ i as u64,
            )?;
            let store = home.open_store()?;
            ingest::ingest_patients(&store, &files.patients, false)?;
            for table in &files.timepoints {
                ingest::ingest_timepoints(&store, table, false)?;
            }
            if let Some(manifest) = &files.manifest {
                ingest::ingest_manifest(&store, manifest, false)?;
            }
            drop(store);
            prepared.push((institution, home, peer_id, patients));
        }
        let members: Vec<_> = prepared
            .iter()
            .map(|(institution, _, peer_id, _)| (*peer_id, institution.clone()))
            .collect();
        let consortium = DevConsortium::create(
            &config.dir.join("consortium"),
            &members,
            config.budget,
            config.limits,
        )?;
        let mut nodes = Vec::with_capacity(config.nodes);
        for (institution, home, peer_id, patients) in prepared {
            let running =
                NodeService::start(&home, Some(&consortium.policy), default_listen()).await?;
            nodes.push(TestNode {
                institution,
                address: running.listen_addr().clone(),
                home,
                peer_id,
                patients,
                running: Some(running),
            });
        }
        Ok(Self {
            dir: config.dir,
            consortium,
            nodes,
        })
    }

    /// Every node's address, running or not.
    pub fn addresses(&self) -> Vec<NodeAddress> {
        self.nodes.iter().map(TestNode::node_address).collect()
    }

    /// The true answer over the consented patients of all nodes.
    pub fn true_count(&self, query: &Query) -> u64 {
        synth::true_count(self.nodes.iter().flat_map(|n| &n.patients), query)
    }

    /// The true answer of any query (counts, sums, means, quantiles, groups) over all nodes.
    pub fn true_value(&self, query: &Query) -> synth::TrueValue {
        synth::true_value(self.nodes.iter().flat_map(|n| &n.patients), query)
    }

    /// The true answer over the given nodes only.
    pub fn true_count_on(&self, nodes: &[usize], query: &Query) -> u64 {
        synth::true_count(nodes.iter().flat_map(|i| &self.nodes[*i].patients), query)
    }

    /// Stops node `index` (in-flight answers finish, the store closes).
    pub async fn stop_node(&mut self, index: usize) {
        if let Some(running) = self.nodes[index].running.take() {
            running.shutdown().await;
        }
    }

    /// Starts node `index` again from its directory, on its old port if it is free.
    pub async fn restart_node(&mut self, index: usize) -> anyhow::Result<()> {
        self.stop_node(index).await;
        let node = &mut self.nodes[index];
        let mut listen = node.address.clone();
        listen.pop(); // drop /p2p/<id>; the node adds it back
        // The node resumes its stored active policy (which may be newer than the file).
        let running = match NodeService::start(&node.home, None, listen.clone()).await {
            Ok(running) => running,
            // Only a taken port is worth another try, on a fresh one.
            Err(renkei_node::NodeError::Network(reason)) => {
                tracing::debug!("{listen} is not free again ({reason}); taking a new port");
                NodeService::start(&node.home, None, default_listen()).await?
            }
            Err(e) => return Err(e.into()),
        };
        node.address = running.listen_addr().clone();
        node.running = Some(running);
        Ok(())
    }

    /// The node's running service, if it is running.
    pub fn running(&self, index: usize) -> Option<&RunningNode> {
        self.nodes[index].running.as_ref()
    }

    pub fn manifest(&self) -> Manifest {
        Manifest {
            nodes: self
                .nodes
                .iter()
                .map(|n| ManifestNode {
                    institution: n.institution.clone(),
                    peer_id: n.peer_id.to_base58(),
                    address: n.address.to_string(),
                    dir: n.home.dir().to_path_buf(),
                    patients: n.patients.len(),
                })
                .collect(),
            researcher_key: self.consortium.researcher_key.clone(),
            admin_key: self.consortium.admin_key.clone(),
            policy: self.consortium.policy.clone(),
            study: self.consortium.study.clone(),
        }
    }

    /// Writes `testnet.json` into `path`.
    pub fn write_manifest(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&self.manifest())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i).await;
        }
    }
}
