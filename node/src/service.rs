//! The node's composition root: opens the store, loads the image, builds the desk and its
//! parts (policy keeper, ledger, audit log), and starts the network ([`crate::net`]): the
//! swarm, the status file and the control socket through which data loaded while serving
//! arrives ([`crate::net::control`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use renkei_policies::SignedPolicy;
use renkei_protocol::{PolicyResponse, RefusalCode, unix_now};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::audit::{AuditEvent, AuditLog};
use crate::desk::QueryDesk;
use crate::error::NodeError;
use crate::governance::PolicyKeeper;
use crate::home::NodeHome;
use crate::net::control::{self, ControlListener};
use crate::net::status::StatusFile;
use crate::net::swarm;
use crate::privacy::ledger::PrivacyLedger;

pub use crate::net::default_listen;
pub use crate::net::status::{NodeStatus, STATUS_FILE};

/// Starts nodes.
#[derive(Debug)]
pub struct NodeService;

/// A node that is serving. Dropping it without [`RunningNode::shutdown`] aborts the service.
#[derive(Debug)]
pub struct RunningNode {
    peer_id: PeerId,
    listen_addr: Multiaddr,
    desk: Arc<QueryDesk>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// Loads handed over by `renkei-node ingest` while serving (socket removed on drop).
    _control: Option<ControlListener>,
}

impl NodeService {
    /// Opens the node in `home`, offers the signed policy at `policy_path` (if any; the stored
    /// active policy is used otherwise), listens on `listen` (port 0 picks a free port) and
    /// serves until shut down.
    pub async fn start(
        home: &NodeHome,
        policy_path: Option<&Path>,
        listen: Multiaddr,
    ) -> Result<RunningNode, NodeError> {
        // Opening the store, verifying the policy and loading the cohort block: do it on a
        // blocking thread so a runtime hosting several nodes stays responsive.
        let (home_owned, policy_owned) = (home.clone(), policy_path.map(Path::to_path_buf));
        let desk = tokio::task::spawn_blocking(move || open_desk(&home_owned, policy_owned))
            .await
            .map_err(|e| NodeError::Startup(format!("opening the node was cancelled: {e}")))??;
        let desk = Arc::new(desk);
        let identity = home.identity()?;
        let peer_id = identity.public_key().to_peer_id()?;
        let keypair = identity.to_libp2p_keypair()?;

        let (swarm, bound) = swarm::bind(keypair, listen).await?;
        let listen_addr = bound.with(Protocol::P2p(peer_id));
        info!(address = %listen_addr, "node listening");

        let status = Arc::new(StatusFile::new(home.dir(), peer_id, listen_addr.clone()));
        let mut node = swarm::Node::new(swarm, Arc::clone(&desk), peer_id, Arc::clone(&status));
        status.write(&desk);
        node.catch_up();
        // Without the socket (e.g. a node path too long for one) the node still serves;
        // loading data then needs it stopped.
        let after_load: control::AfterLoad = {
            let status = Arc::clone(&status);
            Box::new(move |desk| status.write(desk))
        };
        let control = control::listen(home.dir(), Arc::clone(&desk), after_load)
            .map_err(|e| warn!("no control socket, so data can be loaded only while stopped: {e}"))
            .ok();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(node.run(shutdown_rx));
        Ok(RunningNode {
            peer_id,
            listen_addr,
            desk,
            shutdown: Some(shutdown_tx),
            task,
            _control: control,
        })
    }
}

/// A node's store opened and checked as serving opens it: the store, its active policy, its
/// audit log and the data image (every stored shard decoded).
#[derive(Debug)]
pub struct OpenedNode {
    pub store: crate::store::NodeStore,
    pub keeper: PolicyKeeper,
    pub audit: AuditLog,
    pub dataset: renkei_engine::Dataset,
}

/// Opens the node in `home` the one way every command does (`serve`, `status`, `ledger`,
/// `audit`), so that they agree on whether its store is usable: a store `serve` would
/// refuse is refused by all of them, with the same error.
pub fn open_node(home: &NodeHome) -> Result<OpenedNode, NodeError> {
    let store = home.open_store()?;
    let keeper = PolicyKeeper::open(store.clone())?;
    let audit = AuditLog::open(store.clone(), home.identity()?)?;
    let schema = Arc::new(store.schema()?);
    let dataset = crate::image::load(&store, schema)?;
    Ok(OpenedNode {
        store,
        keeper,
        audit,
        dataset,
    })
}

/// Opens the store, takes the active policy (offering the file first), checks membership and
/// loads the cohort.
fn open_desk(home: &NodeHome, policy_path: Option<PathBuf>) -> Result<QueryDesk, NodeError> {
    let identity = home.identity()?;
    let peer_id = identity.public_key().to_peer_id()?;
    let OpenedNode {
        store,
        keeper,
        audit,
        dataset,
    } = open_node(home)?;
    let now = unix_now();
    let ledger = PrivacyLedger::new(store);
    ledger.prune_expired(now)?;
    let desk = QueryDesk::new(identity, keeper, dataset, ledger, audit);
    if let Some(path) = &policy_path {
        let signed = SignedPolicy::read_file(path).map_err(|source| NodeError::Policy {
            path: path.clone(),
            source,
        })?;
        match desk.offer_policy(&signed, &path.display().to_string(), now) {
            PolicyResponse::Refused(refusal) if refusal.code == RefusalCode::PolicyRollback => {
                warn!(
                    "{}: {}; serving the newer active policy",
                    path.display(),
                    refusal.reason
                );
            }
            PolicyResponse::Refused(refusal) => {
                return Err(NodeError::PolicyRefused {
                    path: path.clone(),
                    reason: refusal.to_string(),
                });
            }
            _ => {}
        }
    }
    let policy = desk.policy().ok_or_else(|| NodeError::NoPolicy {
        dir: home.dir().to_path_buf(),
    })?;
    if policy.bundle().member(&peer_id).is_none() {
        return Err(NodeError::NotAMember {
            peer_id: peer_id.to_base58(),
            version: policy.bundle().version,
        });
    }
    desk.audit().append(
        now,
        AuditEvent::NodeStarted {
            policy_version: policy.bundle().version,
            policy_hash: policy.hash_hex(),
        },
    )?;
    info!(
        %peer_id,
        consented = desk.dataset().consented(),
        withheld = desk.dataset().withheld(),
        timepoints = desk.dataset().timepoints(),
        policy_version = policy.bundle().version,
        policy = %policy.hash_hex(),
        randomness = crate::privacy::dp::RANDOMNESS,
        "node opened"
    );
    Ok(desk)
}

impl RunningNode {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The full address, `/ip4/…/tcp/…/p2p/<peer id>`.
    pub fn listen_addr(&self) -> &Multiaddr {
        &self.listen_addr
    }

    pub fn desk(&self) -> &QueryDesk {
        &self.desk
    }

    /// Stops accepting requests, finishes those in flight and closes the store.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Err(e) = (&mut self.task).await {
            warn!("node task ended abnormally: {e}");
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if self.shutdown.is_some() {
            self.task.abort();
        }
    }
}
