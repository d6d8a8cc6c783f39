//! The swarm: one task owns the libp2p `Swarm` and carries requests to the
//! [`QueryDesk`] and replies back.
//!
//! Transport is TCP + noise + yamux, with identify and ping; queries use request-response on
//! `/renkei/query/5/bincode`, policy bundles on `/renkei/policy/1/bincode` (offers from
//! admins and peers, fetches by peers). Connections are capped per peer and in all. Queries
//! are answered concurrently in a bounded set of tasks; past [`MAX_IN_FLIGHT`] a request is
//! refused as overloaded instead of queued. A newly activated bundle is offered on to the
//! other members, and at start the node fetches the active bundle of every member it can
//! reach, so one that was offline catches up. Shutdown stops accepting, lets in-flight work
//! finish while still delivering replies, and closes the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, connection_limits, identify, noise, ping, tcp, yamux};
use renkei_policies::{SignedPolicy, VerifiedPolicy};
use renkei_protocol::limits::IDENTIFY_PROTOCOL;
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    PolicyCodec, PolicyRequest, PolicyResponse, QueryCodec, QueryResponse, Refusal, RefusalCode,
    unix_now,
};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::desk::{Handled, QueryDesk};
use crate::error::NodeError;
use crate::net::status::StatusFile;

/// Query streams the libp2p behaviour accepts at once per connection: more than are
/// answered at once ([`MAX_IN_FLIGHT`]), so the rest get a typed `overloaded` refusal
/// (bounded: each holds at most one request's bytes).
const MAX_STREAMS: usize = 4 * MAX_IN_FLIGHT;

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

#[derive(NetworkBehaviour)]
pub(crate) struct NodeBehaviour {
    limits: connection_limits::Behaviour,
    query: request_response::Behaviour<QueryCodec>,
    policy: request_response::Behaviour<PolicyCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// A swarm for `keypair` listening on `listen` (port 0 picks a free port), and the address
/// it bound.
pub(crate) async fn bind(
    keypair: libp2p::identity::Keypair,
    listen: Multiaddr,
) -> Result<(libp2p::Swarm<NodeBehaviour>, Multiaddr), NodeError> {
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
                // Streams past MAX_IN_FLIGHT get a typed `overloaded` refusal from
                // `on_query` rather than a reset: the behaviour accepts more.
                request_response::Config::default()
                    .with_request_timeout(REQUEST_TIMEOUT)
                    .with_max_concurrent_streams(MAX_STREAMS),
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
    Ok((swarm, bound))
}

type QueryReply = (PeerId, ResponseChannel<QueryResponse>, Handled);
type PolicyReply = (
    ResponseChannel<PolicyResponse>,
    PolicyResponse,
    Option<SignedPolicy>,
);

/// The serving node: the swarm and the work it has started. Owned by one task.
pub(crate) struct Node {
    swarm: libp2p::Swarm<NodeBehaviour>,
    desk: Arc<QueryDesk>,
    peer_id: PeerId,
    status: Arc<StatusFile>,
    queries: JoinSet<QueryReply>,
    /// Offers and fetches being decided; the bundle is kept to forward it when accepted.
    policy_tasks: JoinSet<PolicyReply>,
    /// Store maintenance and bundles fetched from peers.
    background: JoinSet<()>,
    /// Peers sending requests no known researcher signed.
    noise: NoisyPeers,
}

/// Requests from no known researcher one peer may send in [`NOISE_WINDOW`] before it is
/// disconnected and refused for [`NOISE_BAN`].
const NOISE_LIMIT: u32 = 100;
const NOISE_WINDOW: Duration = Duration::from_secs(60);
const NOISE_BAN: Duration = Duration::from_secs(600);
/// Most peers tracked (a backstop: the oldest window is forgotten first).
const MAX_NOISY_PEERS: usize = 4096;
/// How often the desk audits one summary of the unauthenticated requests it refused.
const NOISE_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Per-peer counts of unauthenticated requests, and the peers banned for them.
#[derive(Debug, Default)]
struct NoisyPeers {
    /// Start of the peer's window and its requests in it.
    windows: HashMap<PeerId, (Instant, u32)>,
    /// Until when a peer is refused.
    banned: HashMap<PeerId, Instant>,
}

impl NoisyPeers {
    /// Counts one unauthenticated request from `peer`; past the limit the peer is banned and
    /// disconnected.
    fn note(&mut self, peer: PeerId, now: Instant, swarm: &mut libp2p::Swarm<NodeBehaviour>) {
        if self.windows.len() >= MAX_NOISY_PEERS
            && !self.windows.contains_key(&peer)
            && let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, (start, _))| *start)
                .map(|(peer, _)| *peer)
        {
            self.windows.remove(&oldest);
        }
        let window = self.windows.entry(peer).or_insert((now, 0));
        if now.duration_since(window.0) > NOISE_WINDOW {
            *window = (now, 0);
        }
        window.1 += 1;
        if window.1 > NOISE_LIMIT {
            self.windows.remove(&peer);
            if self.banned.len() >= MAX_NOISY_PEERS {
                self.banned.retain(|_, until| *until > now);
            }
            // Still full of live bans: the one ending soonest makes room.
            if self.banned.len() >= MAX_NOISY_PEERS
                && let Some(soonest) = self
                    .banned
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(peer, _)| *peer)
            {
                self.banned.remove(&soonest);
            }
            self.banned.insert(peer, now + NOISE_BAN);
            warn!(%peer, "peer banned for {}s: more than {NOISE_LIMIT} unauthenticated requests in {}s", NOISE_BAN.as_secs(), NOISE_WINDOW.as_secs());
            let _ = swarm.disconnect_peer_id(peer);
        }
    }

    /// How much longer `peer` is banned, if it is.
    fn banned(&mut self, peer: &PeerId, now: Instant) -> Option<Duration> {
        match self.banned.get(peer) {
            Some(until) if *until > now => Some(*until - now),
            Some(_) => {
                self.banned.remove(peer);
                None
            }
            None => None,
        }
    }
}

impl Node {
    pub(crate) fn new(
        swarm: libp2p::Swarm<NodeBehaviour>,
        desk: Arc<QueryDesk>,
        peer_id: PeerId,
        status: Arc<StatusFile>,
    ) -> Self {
        Self {
            swarm,
            desk,
            peer_id,
            status,
            queries: JoinSet::new(),
            policy_tasks: JoinSet::new(),
            background: JoinSet::new(),
            noise: NoisyPeers::default(),
        }
    }

    pub(crate) async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.tick().await; // the first tick is immediate; pruning already ran at start
        let mut noise_summary = tokio::time::interval(NOISE_SUMMARY_INTERVAL);
        noise_summary.tick().await;
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
                _ = noise_summary.tick() => {
                    let desk = Arc::clone(&self.desk);
                    self.background
                        .spawn_blocking(move || desk.audit_noise_summary(unix_now()));
                }
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
        // What noise came in since the last summary goes into the log too.
        let desk = Arc::clone(&self.desk);
        let _ = tokio::task::spawn_blocking(move || desk.audit_noise_summary(unix_now())).await;
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
            SwarmEvent::ConnectionEstablished { peer_id, .. }
                if self.noise.banned(&peer_id, Instant::now()).is_some() =>
            {
                debug!(%peer_id, "a banned peer connected; disconnecting it");
                let _ = self.swarm.disconnect_peer_id(peer_id);
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
        if let Some(until) = self.noise.banned(&peer, Instant::now()) {
            let refusal = Refusal::new(
                RefusalCode::Overloaded,
                format!(
                    "this peer sent more than {NOISE_LIMIT} requests no known researcher signed within {}s; it is refused for {}s more",
                    NOISE_WINDOW.as_secs(),
                    until.as_secs()
                ),
            );
            let _ = self
                .swarm
                .behaviour_mut()
                .query
                .send_response(channel, QueryResponse::Refused(refusal));
            return;
        }
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
        self.queries.spawn(async move {
            let handled = desk.handle(request, unix_now(), &peer.to_base58()).await;
            (peer, channel, handled)
        });
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
            Ok((peer, channel, handled)) => {
                if self
                    .swarm
                    .behaviour_mut()
                    .query
                    .send_response(channel, handled.response)
                    .is_err()
                {
                    debug!("researcher went away before the reply was sent");
                }
                // After the reply: the request that crosses the limit is still answered.
                if handled.unauthenticated {
                    self.noise.note(peer, Instant::now(), &mut self.swarm);
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
    pub(crate) fn catch_up(&mut self) {
        for (peer, addresses) in self.peers() {
            self.swarm
                .behaviour_mut()
                .policy
                .send_request_with_addresses(&peer, PolicyRequest::Fetch, addresses);
        }
    }
}

/// `status.json` in the node directory, for `renkei-node status` while the node serves;
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
