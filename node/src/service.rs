//! The node's libp2p service: one task owns the `Swarm` and carries requests to the
//! [`QueryDesk`] and replies back.
//!
//! Transport is TCP + noise + yamux, with identify and ping; queries use request-response on
//! `/renkei/query/2/bincode`, policy bundles on `/renkei/policy/1/bincode` (offers from
//! admins and peers, fetches by peers). Connections are capped per peer and in all. Queries
//! are answered concurrently in a bounded set of tasks; past [`MAX_IN_FLIGHT`] a request is
//! refused as overloaded instead of queued. A newly activated bundle is offered on to the
//! other members, and at start the node fetches the active bundle of every member it can
//! reach, so one that was offline catches up. Shutdown stops accepting, lets in-flight work
//! finish while still delivering replies, and closes the store. Data loaded while serving
//! arrives through the control socket ([`crate::control`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, connection_limits, identify, noise, ping, tcp, yamux};
use renkei_policies::{SignedPolicy, VerifiedPolicy};
use renkei_protocol::codec::EncodedRequest;
use renkei_protocol::limits::IDENTIFY_PROTOCOL;
use renkei_protocol::{
    PolicyCodec, PolicyRequest, PolicyResponse, QueryCodec, QueryResponse, Refusal, RefusalCode,
    unix_now,
};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::audit::{AuditEvent, AuditLog};
use crate::control::{self, ControlListener};
use crate::desk::QueryDesk;
use crate::error::NodeError;
use crate::governance::PolicyKeeper;
use crate::home::NodeHome;
use crate::ledger::PrivacyLedger;

/// Most queries answered at once; more are refused with [`RefusalCode::Overloaded`].
pub const MAX_IN_FLIGHT: usize = 64;

/// Most policy requests handled at once.
const MAX_POLICY_IN_FLIGHT: usize = 4;

/// How long a request-response exchange may take before libp2p gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an idle connection is kept open.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for the listener to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often nonces and request records of expired requests are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(300);

/// Connection caps: per peer, and established in all.
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
const MAX_CONNECTIONS: u32 = 512;

/// Written into the node directory while serving, for `renkei-node status`.
pub const STATUS_FILE: &str = "status.json";

#[derive(NetworkBehaviour)]
struct NodeBehaviour {
    limits: connection_limits::Behaviour,
    query: request_response::Behaviour<QueryCodec>,
    policy: request_response::Behaviour<PolicyCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

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

        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| NodeError::Network(e.to_string()))?
            .with_behaviour(|key| NodeBehaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                        .with_max_established(Some(MAX_CONNECTIONS)),
                ),
                query: request_response::Behaviour::with_codec(
                    QueryCodec::default(),
                    [(QueryCodec::protocol(), ProtocolSupport::Inbound)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MAX_IN_FLIGHT),
                ),
                policy: request_response::Behaviour::with_codec(
                    PolicyCodec::default(),
                    [(PolicyCodec::protocol(), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MAX_POLICY_IN_FLIGHT),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.to_string(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
            })
            .map_err(|e| NodeError::Network(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
            .build();
        swarm
            .listen_on(listen.clone())
            .map_err(|e| NodeError::Network(format!("cannot listen on {listen}: {e}")))?;
        let bound = tokio::time::timeout(LISTEN_TIMEOUT, async {
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    return address;
                }
            }
        })
        .await
        .map_err(|_| NodeError::Network(format!("listener on {listen} did not come up")))?;
        let listen_addr = bound.with(Protocol::P2p(peer_id));
        info!(address = %listen_addr, "node listening");

        let status = Arc::new(StatusFile {
            path: home.dir().join(STATUS_FILE),
            peer_id,
            listen_addr: listen_addr.clone(),
            started_at: unix_now(),
        });
        let mut node = Node {
            swarm,
            desk: Arc::clone(&desk),
            peer_id,
            status: Arc::clone(&status),
            queries: JoinSet::new(),
            policy_tasks: JoinSet::new(),
            background: JoinSet::new(),
        };
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

/// Opens the store, takes the active policy (offering the file first), checks membership and
/// loads the cohort.
fn open_desk(home: &NodeHome, policy_path: Option<PathBuf>) -> Result<QueryDesk, NodeError> {
    let identity = home.identity()?;
    let peer_id = identity.public_key().to_peer_id()?;
    let store = home.open_store()?;
    let keeper = PolicyKeeper::open(store.clone())?;
    let audit = AuditLog::open(store.clone(), home.identity()?)?;
    let now = unix_now();
    let schema = std::sync::Arc::new(store.schema()?);
    let dataset = crate::image::load(&store, schema)?;
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
        randomness = crate::dp::RANDOMNESS,
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

type QueryReply = (ResponseChannel<QueryResponse>, QueryResponse);
type PolicyReply = (
    ResponseChannel<PolicyResponse>,
    PolicyResponse,
    Option<SignedPolicy>,
);

/// The serving node: the swarm and the work it has started. Owned by one task.
struct Node {
    swarm: libp2p::Swarm<NodeBehaviour>,
    desk: Arc<QueryDesk>,
    peer_id: PeerId,
    status: Arc<StatusFile>,
    queries: JoinSet<QueryReply>,
    /// Offers and fetches being decided; the bundle is kept to forward it when accepted.
    policy_tasks: JoinSet<PolicyReply>,
    /// Store maintenance and bundles fetched from peers.
    background: JoinSet<()>,
}

impl Node {
    async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.tick().await; // the first tick is immediate; pruning already ran at start
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(done) = self.queries.join_next(), if !self.queries.is_empty() => {
                    self.send_query_reply(done);
                }
                Some(done) = self.policy_tasks.join_next(), if !self.policy_tasks.is_empty() => {
                    self.send_policy_reply(done);
                }
                Some(_) = self.background.join_next(), if !self.background.is_empty() => {}
                _ = prune.tick() => {
                    let ledger = self.desk.ledger().clone();
                    self.background.spawn_blocking(move || {
                        if let Err(e) = ledger.prune_expired(unix_now()) {
                            warn!("pruning expired request records failed: {e}");
                        }
                    });
                }
            }
        }
        // Finish what was started (no charge is left without its release) and keep the swarm
        // polled meanwhile, so the replies still reach the researchers.
        while !(self.queries.is_empty()
            && self.policy_tasks.is_empty()
            && self.background.is_empty())
        {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(done) = self.queries.join_next(), if !self.queries.is_empty() => {
                    self.send_query_reply(done);
                }
                Some(done) = self.policy_tasks.join_next(), if !self.policy_tasks.is_empty() => {
                    self.send_policy_reply(done);
                }
                Some(_) = self.background.join_next(), if !self.background.is_empty() => {}
            }
        }
        // Give the last replies a moment to leave.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                let event = self.swarm.select_next_some().await;
                self.on_swarm_event(event);
            }
        })
        .await;
        let _ = std::fs::remove_file(&self.status.path);
        info!("node stopped");
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Query(
                request_response::Event::Message {
                    peer,
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => self.on_query(peer, request, channel),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Policy(
                request_response::Event::Message { peer, message, .. },
            )) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_policy_request(peer, request, channel),
                request_response::Message::Response { response, .. } => {
                    self.on_policy_response(peer, response)
                }
            },
            SwarmEvent::Behaviour(NodeBehaviourEvent::Query(
                request_response::Event::InboundFailure { peer, error, .. },
            )) => debug!(%peer, %error, "inbound query failed"),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Policy(
                request_response::Event::OutboundFailure { peer, error, .. },
            )) => debug!(%peer, %error, "policy exchange with a peer failed"),
            SwarmEvent::IncomingConnectionError { error, .. } => {
                debug!(%error, "incoming connection failed")
            }
            _ => {}
        }
    }

    fn on_query(
        &mut self,
        peer: PeerId,
        request: EncodedRequest,
        channel: ResponseChannel<QueryResponse>,
    ) {
        debug!(%peer, "query request");
        if self.queries.len() >= MAX_IN_FLIGHT {
            let refusal = Refusal::new(
                RefusalCode::Overloaded,
                format!("node is answering {MAX_IN_FLIGHT} queries; retry shortly"),
            );
            let _ = self
                .swarm
                .behaviour_mut()
                .query
                .send_response(channel, QueryResponse::Refused(refusal));
            return;
        }
        let desk = Arc::clone(&self.desk);
        self.queries
            .spawn(async move { (channel, desk.handle(request, unix_now()).await) });
    }

    fn on_policy_request(
        &mut self,
        peer: PeerId,
        request: PolicyRequest,
        channel: ResponseChannel<PolicyResponse>,
    ) {
        if self.policy_tasks.len() >= MAX_POLICY_IN_FLIGHT {
            let refusal = Refusal::new(RefusalCode::Overloaded, "busy with other policy requests");
            let _ = self
                .swarm
                .behaviour_mut()
                .policy
                .send_response(channel, PolicyResponse::Refused(refusal));
            return;
        }
        let desk = Arc::clone(&self.desk);
        self.policy_tasks.spawn_blocking(move || match request {
            PolicyRequest::Fetch => {
                let active = desk.active_policy_transfer().unwrap_or_else(|e| {
                    warn!("reading the active policy failed: {e}");
                    None
                });
                (channel, PolicyResponse::Active(active), None)
            }
            PolicyRequest::Offer(transfer) => {
                let signed = SignedPolicy::from_transfer(transfer);
                let response = desk.offer_policy(&signed, &format!("peer {peer}"), unix_now());
                let forward = matches!(response, PolicyResponse::Accepted { .. }).then_some(signed);
                (channel, response, forward)
            }
        });
    }

    /// A peer answered our fetch (or acknowledged a forwarded bundle).
    fn on_policy_response(&mut self, peer: PeerId, response: PolicyResponse) {
        match response {
            PolicyResponse::Active(Some(transfer)) => {
                let desk = Arc::clone(&self.desk);
                self.background.spawn_blocking(move || {
                    let signed = SignedPolicy::from_transfer(transfer);
                    if let PolicyResponse::Refused(r) =
                        desk.offer_policy(&signed, &format!("peer {peer}"), unix_now())
                        && r.code != RefusalCode::PolicyRollback
                    {
                        warn!(%peer, "a peer's policy was refused: {r}");
                    }
                });
            }
            PolicyResponse::Refused(refusal) => debug!(%peer, %refusal, "peer refused a bundle"),
            other @ (PolicyResponse::Active(None)
            | PolicyResponse::Accepted { .. }
            | PolicyResponse::AlreadyActive { .. }) => {
                debug!(%peer, ?other, "policy response")
            }
        }
    }

    fn send_query_reply(&mut self, done: Result<QueryReply, tokio::task::JoinError>) {
        match done {
            Ok((channel, response)) => {
                if self
                    .swarm
                    .behaviour_mut()
                    .query
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!("researcher went away before the reply was sent");
                }
            }
            // `QueryDesk::handle` does not panic; a join error means the task was cancelled.
            Err(e) => warn!("answer task failed: {e}"),
        }
    }

    fn send_policy_reply(&mut self, done: Result<PolicyReply, tokio::task::JoinError>) {
        match done {
            Ok((channel, response, forward)) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .policy
                    .send_response(channel, response);
                if let Some(signed) = forward {
                    self.forward(&signed);
                    self.status.write(&self.desk);
                }
            }
            Err(e) => warn!("policy task failed: {e}"),
        }
    }

    /// Members of the active policy other than this node, with their addresses.
    fn peers(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let Some(policy) = self.desk.policy() else {
            return Vec::new();
        };
        member_addresses(&policy)
            .into_iter()
            .filter(|(peer, _)| *peer != self.peer_id)
            .collect()
    }

    /// Offers a newly activated bundle to the other members.
    fn forward(&mut self, signed: &SignedPolicy) {
        for (peer, addresses) in self.peers() {
            self.swarm
                .behaviour_mut()
                .policy
                .send_request_with_addresses(
                    &peer,
                    PolicyRequest::Offer(signed.to_transfer()),
                    addresses,
                );
        }
    }

    /// Asks every reachable member for its active bundle; newer valid ones are taken.
    fn catch_up(&mut self) {
        for (peer, addresses) in self.peers() {
            self.swarm
                .behaviour_mut()
                .policy
                .send_request_with_addresses(&peer, PolicyRequest::Fetch, addresses);
        }
    }
}

/// `status.json` in the node directory, for `renkei-node status` while the node serves;
/// rewritten when the policy or the data changes.
#[derive(Debug)]
struct StatusFile {
    path: PathBuf,
    peer_id: PeerId,
    listen_addr: Multiaddr,
    started_at: u64,
}

impl StatusFile {
    fn write(&self, desk: &QueryDesk) {
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
            randomness: crate::dp::RANDOMNESS.to_string(),
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

/// The members of `policy` that list addresses, with those addresses parsed.
fn member_addresses(policy: &VerifiedPolicy) -> Vec<(PeerId, Vec<Multiaddr>)> {
    policy
        .bundle()
        .members
        .iter()
        .filter_map(|m| {
            let peer: PeerId = m.peer_id.parse().ok()?;
            let addresses: Vec<Multiaddr> =
                m.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            (!addresses.is_empty()).then_some((peer, addresses))
        })
        .collect()
}

/// Default listen address of `renkei-node serve`.
pub fn default_listen() -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
        .with(Protocol::Tcp(0))
}
