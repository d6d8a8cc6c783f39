//! Protocol ids and every size and time limit of the wire protocol, in one place.
//!
//! A limit lives here so the encoder, the decoder, the stream reader and the validators
//! cannot disagree about it.

/// The query protocol: `/{prefix}/{protocol}/{version}/{encoding}`. Version 2 added secure
/// rounds, policy versions and dry runs to requests and quotes to responses; version 3 added
/// secure rounds that survive dropouts (`dropouts` in requests, the unmasking step).
pub const QUERY_PROTOCOL: &str = "/renkei/query/5/bincode";

/// The policy protocol: offering and fetching signed bundles.
pub const POLICY_PROTOCOL: &str = "/renkei/policy/1/bincode";

/// Largest encoded policy request or response (a signed bundle and framing).
pub const MAX_POLICY_MESSAGE_BYTES: usize = MAX_POLICY_BYTES + 64 * 1024;

/// The identify protocol version every renkei peer announces.
pub const IDENTIFY_PROTOCOL: &str = "/renkei/id/1";

/// Largest encoded query request accepted on a stream (signature and envelope included).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest encoded query response accepted on a stream.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Largest signed policy bundle payload.
pub const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

/// Most nodes one request may be addressed to.
pub const MAX_AUDIENCE: usize = 256;

/// Most filter terms (nodes of the filter tree) a query may carry.
pub const MAX_PREDICATES: usize = 64;

/// Deepest nesting of AND / OR / NOT in a filter.
pub const MAX_FILTER_DEPTH: usize = 8;

/// Most values in one `IN` list.
pub const MAX_IN_VALUES: usize = 64;

/// Most derived columns one `WITH` clause may define.
pub const MAX_DERIVED_COLUMNS: usize = 16;

/// Longest identifier (column, study, category value) in a query, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 128;

/// Longest lifetime a signed request may claim (`expires_at - issued_at`), in seconds.
/// Nodes keep seen nonces at least this long, so a replay is always recognised.
pub const MAX_REQUEST_LIFETIME_SECS: u64 = 600;

/// Clock skew tolerated between a researcher and a node, in seconds.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
