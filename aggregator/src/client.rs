//! The aggregator's libp2p client: one task owns the `Swarm`; callers hold a cheap
//! [`NetworkClient`] and send it commands over a bounded channel, each with a `oneshot` for
//! the reply (the shape of rust-libp2p's file-sharing example). It speaks the query protocol
//! (researchers) and the policy protocol (admins publishing bundles).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, identify, noise, ping, tcp, yamux};
use renkei_protocol::limits::IDENTIFY_PROTOCOL;
use renkei_protocol::transport::EncodedRequest;
use renkei_protocol::{
    PolicyCodec, PolicyRequest, PolicyResponse, QueryCodec, QueryResponse, RefusalCode,
};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::error::AggregatorError;

/// Commands waiting for the swarm task; senders wait when it is full.
const COMMAND_QUEUE: usize = 256;

/// The request-response timeout; callers usually set a shorter overall deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(NetworkBehaviour)]
struct ClientBehaviour {
    query: request_response::Behaviour<QueryCodec>,
    policy: request_response::Behaviour<PolicyCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Why a node's reply did not arrive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AskError {
    #[error("could not connect: {0}")]
    Unreachable(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the reply")]
    ConnectionClosed,
    #[error("the node does not speak the renkei query protocol")]
    UnsupportedProtocol,
    #[error("stream error: {0}")]
    Stream(String),
    #[error("the aggregator's network task has stopped")]
    ClientStopped,
    /// The request reached the node (its connection then dropped, or its reply did not
    /// come) and no answer arrived before the deadline: the node may have charged it.
    #[error(
        "the request reached the node but its answer was lost ({last}); it may have been charged there: the node keeps the answer, and returns it, without a new charge, to this same signed request"
    )]
    AnswerLost { last: String },
}

impl From<OutboundFailure> for AskError {
    fn from(failure: OutboundFailure) -> Self {
        match failure {
            OutboundFailure::DialFailure => AskError::Unreachable("dial failed".into()),
            OutboundFailure::Timeout => AskError::Timeout(REQUEST_TIMEOUT),
            OutboundFailure::ConnectionClosed => AskError::ConnectionClosed,
            OutboundFailure::UnsupportedProtocols => AskError::UnsupportedProtocol,
            OutboundFailure::Io(e) => AskError::Stream(e.to_string()),
        }
    }
}

type Reply = oneshot::Sender<Result<QueryResponse, AskError>>;
type PolicyReply = oneshot::Sender<Result<PolicyResponse, AskError>>;

enum Command {
    Ask {
        peer: PeerId,
        address: Multiaddr,
        request: EncodedRequest,
        reply: Reply,
    },
    Policy {
        peer: PeerId,
        address: Multiaddr,
        request: PolicyRequest,
        reply: PolicyReply,
    },
}

/// A handle on the aggregator's network task. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct NetworkClient {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    listen_addr: Option<Multiaddr>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Ask { peer, .. } => write!(f, "Ask({peer})"),
            Command::Policy { peer, .. } => write!(f, "Policy({peer})"),
        }
    }
}

impl NetworkClient {
    /// Starts the network task with a fresh identity. With `listen`, the aggregator also
    /// accepts connections there (port 0 picks a free port). The task ends when every
    /// handle is dropped.
    pub async fn start(listen: Option<Multiaddr>) -> Result<Self, AggregatorError> {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let peer_id = keypair.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| AggregatorError::Network(e.to_string()))?
            .with_behaviour(|key| ClientBehaviour {
                query: request_response::Behaviour::with_codec(
                    QueryCodec::default(),
                    [(QueryCodec::protocol(), ProtocolSupport::Outbound)],
                    request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
                ),
                policy: request_response::Behaviour::with_codec(
                    PolicyCodec::default(),
                    [(PolicyCodec::protocol(), ProtocolSupport::Outbound)],
                    request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.to_string(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
            })
            .map_err(|e| AggregatorError::Network(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let mut listen_addr = None;
        if let Some(listen) = listen {
            swarm
                .listen_on(listen.clone())
                .map_err(|e| AggregatorError::Network(format!("cannot listen on {listen}: {e}")))?;
            let bound = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let SwarmEvent::NewListenAddr { address, .. } =
                        swarm.select_next_some().await
                    {
                        return address;
                    }
                }
            })
            .await
            .map_err(|_| {
                AggregatorError::Network(format!("listener on {listen} did not come up"))
            })?;
            listen_addr = Some(bound.with(libp2p::multiaddr::Protocol::P2p(peer_id)));
        }
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        tokio::spawn(run(swarm, receiver));
        Ok(Self {
            commands,
            peer_id,
            listen_addr,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn listen_addr(&self) -> Option<&Multiaddr> {
        self.listen_addr.as_ref()
    }

    /// Sends a policy request (offer or fetch) to `peer` and waits at most `deadline`.
    pub async fn policy(
        &self,
        peer: PeerId,
        address: Multiaddr,
        request: PolicyRequest,
        deadline: Duration,
    ) -> Result<PolicyResponse, AskError> {
        let (reply, response) = oneshot::channel();
        let ask = async {
            self.commands
                .send(Command::Policy {
                    peer,
                    address,
                    request,
                    reply,
                })
                .await
                .map_err(|_| AskError::ClientStopped)?;
            response.await.map_err(|_| AskError::ClientStopped)?
        };
        tokio::time::timeout(deadline, ask)
            .await
            .unwrap_or(Err(AskError::Timeout(deadline)))
    }

    /// Sends one request to `peer` at `address` and waits at most `deadline` for the reply.
    pub async fn ask(
        &self,
        peer: PeerId,
        address: Multiaddr,
        request: EncodedRequest,
        deadline: Duration,
    ) -> Result<QueryResponse, AskError> {
        let (reply, response) = oneshot::channel();
        let ask = async {
            self.commands
                .send(Command::Ask {
                    peer,
                    address,
                    request,
                    reply,
                })
                .await
                .map_err(|_| AskError::ClientStopped)?;
            response.await.map_err(|_| AskError::ClientStopped)?
        };
        tokio::time::timeout(deadline, ask)
            .await
            .unwrap_or(Err(AskError::Timeout(deadline)))
    }
}

async fn run(mut swarm: libp2p::Swarm<ClientBehaviour>, mut commands: mpsc::Receiver<Command>) {
    let mut pending: HashMap<OutboundRequestId, Reply> = HashMap::new();
    let mut pending_policy: HashMap<OutboundRequestId, PolicyReply> = HashMap::new();
    // Why the last dial to each peer failed, to explain a `DialFailure` to the caller.
    let mut dial_errors: HashMap<PeerId, String> = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Ask { peer, address, request, reply }) => {
                    let id = swarm
                        .behaviour_mut()
                        .query
                        .send_request_with_addresses(&peer, request, vec![address]);
                    pending.insert(id, reply);
                }
                Some(Command::Policy { peer, address, request, reply }) => {
                    let id = swarm
                        .behaviour_mut()
                        .policy
                        .send_request_with_addresses(&peer, request, vec![address]);
                    pending_policy.insert(id, reply);
                }
                // Every handle is gone: nobody can ask or listen for replies any more.
                None => break,
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(ClientBehaviourEvent::Query(
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    },
                )) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(ClientBehaviourEvent::Query(
                    request_response::Event::OutboundFailure { request_id, error, peer, .. },
                )) => {
                    debug!(%peer, %error, "query failed");
                    if let Some(reply) = pending.remove(&request_id) {
                        let error = match (error, dial_errors.remove(&peer)) {
                            (OutboundFailure::DialFailure, Some(reason)) => AskError::Unreachable(reason),
                            (error, _) => error.into(),
                        };
                        let _ = reply.send(Err(error));
                    }
                }
                SwarmEvent::Behaviour(ClientBehaviourEvent::Policy(
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    },
                )) => {
                    if let Some(reply) = pending_policy.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(ClientBehaviourEvent::Policy(
                    request_response::Event::OutboundFailure { request_id, error, peer, .. },
                )) => {
                    if let Some(reply) = pending_policy.remove(&request_id) {
                        let error = match (error, dial_errors.remove(&peer)) {
                            (OutboundFailure::DialFailure, Some(reason)) => AskError::Unreachable(reason),
                            (error, _) => error.into(),
                        };
                        let _ = reply.send(Err(error));
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    // A stale dial error must not explain a later, different failure.
                    dial_errors.remove(&peer_id);
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                    debug!(%peer, %error, "connection failed");
                    dial_errors.insert(peer, error.to_string());
                }
                _ => {}
            },
        }
        // Callers that gave up (deadline passed) no longer need their slot.
        pending.retain(|_, reply| !reply.is_closed());
        pending_policy.retain(|_, reply| !reply.is_closed());
    }
}

/// A node to ask: its peer id and a full address ending in `/p2p/<peer id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub peer_id: PeerId,
    pub address: Multiaddr,
}

impl FromStr for NodeAddress {
    type Err = AggregatorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| AggregatorError::BadNodeAddress {
            address: text.to_string(),
            reason: reason.to_string(),
        };
        let address: Multiaddr = text
            .trim()
            .parse()
            .map_err(|e: libp2p::multiaddr::Error| bad(&e.to_string()))?;
        let Some(Protocol::P2p(peer_id)) = address.iter().last() else {
            return Err(bad(
                "must end in /p2p/<peer id> so the node can be authenticated",
            ));
        };
        Ok(Self { peer_id, address })
    }
}

/// Pause between resends of a request whose reply was lost.
const RESEND_PAUSE: Duration = Duration::from_millis(200);

/// Asks one node, resending the *same* signed request while the reply was lost in transit
/// (the connection closed or the stream failed after sending) or the node was still busy
/// answering it, until `deadline`. Once the request may have reached the node, a node that
/// cannot be reached for a while (restarting) is asked again too. Nodes answer a resent
/// request with the answer they recorded, so this never spends twice. A node never reached
/// is reported as unreachable; one that may have received the request and sent nothing back
/// as [`AskError::AnswerLost`] (it may have charged).
pub(crate) async fn ask_until(
    client: &NetworkClient,
    node: &NodeAddress,
    request: EncodedRequest,
    deadline: Duration,
) -> Result<QueryResponse, AskError> {
    let until = tokio::time::Instant::now() + deadline;
    let mut delivered = false;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let reply = client
            .ask(node.peer_id, node.address.clone(), request.clone(), left)
            .await;
        let retry = match &reply {
            Err(AskError::ConnectionClosed | AskError::Stream(_) | AskError::Timeout(_)) => {
                delivered = true;
                true
            }
            Err(AskError::Unreachable(_)) => delivered,
            Ok(QueryResponse::Refused(refusal)) => refusal.code == RefusalCode::Overloaded,
            Ok(
                QueryResponse::Answered(_) | QueryResponse::Quoted(_) | QueryResponse::Unmasked(_),
            )
            | Err(
                AskError::UnsupportedProtocol
                | AskError::ClientStopped
                | AskError::AnswerLost { .. },
            ) => false,
        };
        if !retry || tokio::time::Instant::now() + RESEND_PAUSE >= until {
            return match reply {
                Err(e) if delivered => Err(AskError::AnswerLost {
                    last: e.to_string(),
                }),
                // Still being answered when the deadline came: it may well be charged.
                Ok(QueryResponse::Refused(refusal))
                    if delivered && refusal.code == RefusalCode::Overloaded =>
                {
                    Err(AskError::AnswerLost {
                        last: refusal.to_string(),
                    })
                }
                other => other,
            };
        }
        tokio::time::sleep(RESEND_PAUSE).await;
    }
}
