//! The node's libp2p service: one task owns the `Swarm`, carries query requests to the
//! [`QueryDesk`] and their replies back.
//!
//! Transport is TCP + noise + yamux, with identify and ping; queries use request-response
//! with [`QueryCodec`] on `/renkei/query/1/bincode`. Requests are answered concurrently in a
//! bounded set of tasks; past [`MAX_IN_FLIGHT`] a request is refused as overloaded instead of
//! queued without bound. Shutdown stops accepting, lets in-flight answers finish (so no
//! charge is cut in half) and closes the store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, identify, noise, ping, tcp, yamux};
use renkei_protocol::limits::IDENTIFY_PROTOCOL;
use renkei_protocol::{QueryCodec, QueryResponse, Refusal, RefusalCode, unix_now};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::cohort::Cohort;
use crate::desk::QueryDesk;
use crate::error::NodeError;
use crate::home::{NodeHome, load_policy};
use crate::ledger::PrivacyLedger;

/// Most requests answered at once; more are refused with [`RefusalCode::Overloaded`].
pub const MAX_IN_FLIGHT: usize = 64;

/// How long a request-response exchange may take before libp2p gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an idle connection is kept open.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for the listener to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often nonces and request records of expired requests are forgotten.
const NONCE_PRUNE_INTERVAL: Duration = Duration::from_secs(300);

#[derive(NetworkBehaviour)]
struct NodeBehaviour {
    query: request_response::Behaviour<QueryCodec>,
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
}

impl NodeService {
    /// Opens the node in `home`, verifies the policy at `policy_path`, listens on `listen`
    /// (port 0 picks a free port) and serves until shut down.
    pub async fn start(
        home: &NodeHome,
        policy_path: &Path,
        listen: Multiaddr,
    ) -> Result<RunningNode, NodeError> {
        // Opening the store, verifying the policy and loading the cohort block: do it on a
        // blocking thread so a runtime hosting several nodes stays responsive.
        let (home_owned, policy_owned) = (home.clone(), policy_path.to_path_buf());
        let opened = tokio::task::spawn_blocking(move || open_desk(&home_owned, &policy_owned))
            .await
            .map_err(|e| NodeError::Network(format!("opening the node failed: {e}")))??;
        let OpenedNode {
            identity,
            policy,
            cohort,
            ledger,
            peer_id,
        } = opened;
        let keypair = identity.to_libp2p_keypair()?;
        let desk = Arc::new(QueryDesk::new(identity, policy, cohort, ledger));

        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| NodeError::Network(e.to_string()))?
            .with_behaviour(|key| NodeBehaviour {
                query: request_response::Behaviour::with_codec(
                    QueryCodec,
                    [(QueryCodec::protocol(), ProtocolSupport::Inbound)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MAX_IN_FLIGHT),
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
        let listen_addr = bound.with(libp2p::multiaddr::Protocol::P2p(peer_id));
        info!(address = %listen_addr, "node listening");

        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(run(swarm, Arc::clone(&desk), shutdown_rx));
        Ok(RunningNode {
            peer_id,
            listen_addr,
            desk,
            shutdown: Some(shutdown_tx),
            task,
        })
    }
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

/// What a node needs to serve, loaded from its directory.
struct OpenedNode {
    identity: renkei_protocol::SecretKey,
    policy: renkei_policies::VerifiedPolicy,
    cohort: Cohort,
    ledger: PrivacyLedger,
    peer_id: PeerId,
}

/// Opens the store, verifies and pins the policy, checks membership and loads the cohort.
fn open_desk(home: &NodeHome, policy_path: &Path) -> Result<OpenedNode, NodeError> {
    let identity = home.identity()?;
    let store = home.open_store()?;
    let policy = load_policy(&store, policy_path)?;
    let peer_id = identity.public_key().to_peer_id()?;
    if policy.bundle().member(&peer_id).is_none() {
        return Err(NodeError::NotAMember {
            peer_id: peer_id.to_base58(),
            version: policy.bundle().version,
        });
    }
    let cohort = Cohort::load(&store)?;
    let ledger = PrivacyLedger::new(store);
    ledger.prune_expired(unix_now())?;
    info!(
        %peer_id,
        consented = cohort.consented(),
        withheld = cohort.withheld(),
        policy_version = policy.bundle().version,
        policy = %policy.hash_hex(),
        randomness = crate::dp::RANDOMNESS,
        "node opened"
    );
    Ok(OpenedNode {
        identity,
        policy,
        cohort,
        ledger,
        peer_id,
    })
}

type Reply = (ResponseChannel<QueryResponse>, QueryResponse);

async fn run(
    mut swarm: libp2p::Swarm<NodeBehaviour>,
    desk: Arc<QueryDesk>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut in_flight: JoinSet<Reply> = JoinSet::new();
    let mut prune = tokio::time::interval(NONCE_PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = swarm.select_next_some() => {
                on_swarm_event(&mut swarm, &desk, &mut in_flight, event);
            }
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                send_reply(&mut swarm, done);
            }
            _ = prune.tick() => {
                let ledger = desk.ledger().clone();
                // Ignore the handle: pruning is best-effort and finishes on its own.
                drop(tokio::task::spawn_blocking(move || {
                    if let Err(e) = ledger.prune_expired(unix_now()) {
                        warn!("pruning expired request records failed: {e}");
                    }
                }));
            }
        }
    }
    // Let every started answer finish, so no charge is left without its release.
    while let Some(done) = in_flight.join_next().await {
        send_reply(&mut swarm, done);
    }
    info!("node stopped");
}

fn on_swarm_event(
    swarm: &mut libp2p::Swarm<NodeBehaviour>,
    desk: &Arc<QueryDesk>,
    in_flight: &mut JoinSet<Reply>,
    event: SwarmEvent<NodeBehaviourEvent>,
) {
    match event {
        SwarmEvent::Behaviour(NodeBehaviourEvent::Query(request_response::Event::Message {
            peer,
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        })) => {
            debug!(%peer, "query request");
            if in_flight.len() >= MAX_IN_FLIGHT {
                let refusal = Refusal::new(
                    RefusalCode::Overloaded,
                    format!("node is answering {MAX_IN_FLIGHT} queries; retry shortly"),
                );
                let _ = swarm
                    .behaviour_mut()
                    .query
                    .send_response(channel, QueryResponse::Refused(refusal));
                return;
            }
            let desk = Arc::clone(desk);
            in_flight.spawn(async move { (channel, desk.handle(request, unix_now()).await) });
        }
        SwarmEvent::Behaviour(NodeBehaviourEvent::Query(
            request_response::Event::InboundFailure { peer, error, .. },
        )) => debug!(%peer, %error, "inbound query failed"),
        SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
        SwarmEvent::IncomingConnectionError { error, .. } => {
            debug!(%error, "incoming connection failed")
        }
        _ => {}
    }
}

fn send_reply(
    swarm: &mut libp2p::Swarm<NodeBehaviour>,
    done: Result<Reply, tokio::task::JoinError>,
) {
    match done {
        Ok((channel, response)) => {
            if swarm
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

/// Default listen address of `renkei-node serve`.
pub fn default_listen() -> Multiaddr {
    Multiaddr::empty()
        .with(libp2p::multiaddr::Protocol::Ip4(
            std::net::Ipv4Addr::LOCALHOST,
        ))
        .with(libp2p::multiaddr::Protocol::Tcp(0))
}
