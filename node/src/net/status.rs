//! The status file a serving node keeps in its directory for `renkei-node status`: who it
//! is, where it listens, its policy and how many patients it counts. Written atomically
//! (temporary file, then rename) at start and after every policy or data change.

use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use renkei_protocol::unix_now;
use tracing::warn;

use crate::desk::QueryDesk;

/// Written into the node directory while serving, for `renkei-node status`.
pub const STATUS_FILE: &str = "status.json";

/// What `renkei-node status` shows about a serving node.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    pub peer_id: String,
    pub listen_addr: String,
    pub policy_version: u64,
    pub policy_hash: String,
    pub consented: usize,
    pub withheld: usize,
    pub started_at: u64,
    pub randomness: String,
    /// The dataset schema's name and version (absent in files of earlier versions).
    #[serde(default)]
    pub schema: Option<(String, u32)>,
    #[serde(default)]
    pub timepoints: usize,
    /// Items per kind, in schema order.
    #[serde(default)]
    pub items: Vec<(String, usize)>,
    /// Stored records without their patient (ignored).
    #[serde(default)]
    pub orphans: usize,
    /// Patients with more timepoints than the schema's bound (and the bound).
    #[serde(default)]
    pub over_bound: Option<(usize, u32)>,
}

/// The status file of a serving node, rewritten when the policy or the data changes.
#[derive(Debug)]
pub(crate) struct StatusFile {
    pub(crate) path: PathBuf,
    peer_id: PeerId,
    listen_addr: Multiaddr,
    started_at: u64,
}

impl StatusFile {
    pub(crate) fn new(dir: &Path, peer_id: PeerId, listen_addr: Multiaddr) -> Self {
        Self {
            path: dir.join(STATUS_FILE),
            peer_id,
            listen_addr,
            started_at: unix_now(),
        }
    }

    pub(crate) fn write(&self, desk: &QueryDesk) {
        let Some(policy) = desk.policy() else {
            return;
        };
        let image = desk.dataset();
        let status = NodeStatus {
            peer_id: self.peer_id.to_base58(),
            listen_addr: self.listen_addr.to_string(),
            policy_version: policy.bundle().version,
            policy_hash: policy.hash_hex(),
            consented: image.consented(),
            withheld: image.withheld(),
            started_at: self.started_at,
            randomness: crate::privacy::dp::RANDOMNESS.to_string(),
            schema: Some((image.schema().name.clone(), image.schema().version)),
            timepoints: image.timepoints(),
            items: image
                .items()
                .into_iter()
                .map(|(kind, n)| (kind.to_string(), n))
                .collect(),
            orphans: image.orphans(),
            over_bound: Some((
                image.patients_over_bound(),
                image.schema().max_timepoints_per_patient,
            )),
        };
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&status)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            warn!("writing {} failed: {e}", self.path.display());
        }
    }
}
