//! The one place where renkei turns values into bytes and back.
//!
//! Everything on the wire, everything signed and everything a node stores is encoded here
//! with bincode 2 (standard configuration: little-endian, variable-length integers). bincode
//! is unmaintained upstream, so no other module names it; replacing it means changing this
//! file only. Decoding is always bounded: the input length is checked against the caller's
//! limit, bincode is given an allocation limit, and trailing bytes are an error (so one value
//! has exactly one encoding that verifies).
//!
//! [`BoundedCodec`] frames renkei's request-response protocols on libp2p streams: one
//! request and one response per stream, each read with `take(limit)` where the limit is the
//! message type's own ([`WireMessage::LIMIT`]). [`QueryCodec`] and [`PolicyCodec`] are its
//! two instances.

use std::io;
use std::marker::PhantomData;

use bincode::config::{Configuration, LittleEndian, Varint};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::limits::{
    MAX_POLICY_MESSAGE_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, POLICY_PROTOCOL,
    QUERY_PROTOCOL,
};
use crate::messages::{PolicyRequest, PolicyResponse, QueryResponse};

/// The largest allocation bincode may make while decoding a message of at most this size
/// (queries, answers, records): a length prefix cannot make it reserve more.
const SMALL_DECODE_LIMIT: usize = 128 * 1024;

/// The largest allocation while decoding a message (policy bundles).
const LARGE_DECODE_LIMIT: usize = MAX_POLICY_MESSAGE_BYTES;

/// The largest allocation while decoding a bulk value a node stores for itself (a shard of
/// its tables): never from the wire, bounded by the caller's size limit times the widest
/// growth of a varint (1 byte) into an `i64` (8 bytes).
const BULK_DECODE_LIMIT: usize = 1 << 30;

type Config<const N: usize> = Configuration<LittleEndian, Varint, bincode::config::Limit<N>>;

fn config() -> Config<LARGE_DECODE_LIMIT> {
    bincode::config::standard().with_limit::<LARGE_DECODE_LIMIT>()
}

fn small_config() -> Config<SMALL_DECODE_LIMIT> {
    bincode::config::standard().with_limit::<SMALL_DECODE_LIMIT>()
}

fn bulk_config() -> Config<BULK_DECODE_LIMIT> {
    bincode::config::standard().with_limit::<BULK_DECODE_LIMIT>()
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("{extra} unexpected bytes after the message")]
    TrailingBytes { extra: usize },
}

impl From<CodecError> for io::Error {
    fn from(e: CodecError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Encodes `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encodes `value`, failing if the result exceeds `limit` bytes.
pub fn encode_limited<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, CodecError> {
    let bytes = encode(value)?;
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Decodes exactly one value from `bytes`, which must be at most `limit` bytes long.
pub fn decode_limited<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    let (value, read) = decode_prefix(bytes, limit)?;
    if read != bytes.len() {
        return Err(CodecError::TrailingBytes {
            extra: bytes.len() - read,
        });
    }
    Ok(value)
}

/// Decodes a value from the start of `bytes` (at most `limit` long) and ignores what follows:
/// for reading the leading fields of a large stored record without decoding the rest.
pub fn decode_leading<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    decode_prefix(bytes, limit).map(|(value, _)| value)
}

/// A value from the start of `bytes` (at most `limit` long) and how many bytes it took, with
/// the decoder's allocation bound chosen by `limit`.
fn decode_prefix<T: DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
) -> Result<(T, usize), CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let decoded = if limit <= SMALL_DECODE_LIMIT {
        bincode::serde::decode_from_slice(bytes, small_config())
    } else if limit <= LARGE_DECODE_LIMIT {
        bincode::serde::decode_from_slice(bytes, config())
    } else {
        bincode::serde::decode_from_slice(bytes, bulk_config())
    };
    decoded.map_err(|e| CodecError::Decode(e.to_string()))
}

/// A query request as it travels: the encoded [`crate::SignedEnvelope`], at most
/// [`MAX_REQUEST_BYTES`] long. The node decodes it itself, so a malformed request still gets
/// a typed refusal instead of a dropped stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest(Vec<u8>);

impl EncodedRequest {
    /// Encodes a signed request envelope, checking the size limit.
    pub fn encode(envelope: &crate::SignedEnvelope) -> Result<Self, CodecError> {
        Ok(Self(encode_limited(envelope, MAX_REQUEST_BYTES)?))
    }

    /// Raw bytes, for tests that need to send something malformed.
    pub fn from_raw(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Decodes the signed envelope (its signature is not checked here).
    pub fn decode(&self) -> Result<crate::SignedEnvelope, CodecError> {
        decode_limited(&self.0, MAX_REQUEST_BYTES)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Reads the rest of the stream, failing once more than `limit` bytes arrive.
async fn read_bounded<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "over it".
    io.take(limit as u64 + 1).read_to_end(&mut bytes).await?;
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        }
        .into());
    }
    Ok(bytes)
}

/// A message with a size limit and an encoding, as carried by [`BoundedCodec`].
pub trait WireMessage: Sized + Send + Sync {
    /// Largest encoded size accepted.
    const LIMIT: usize;
    fn to_wire(&self) -> Result<Vec<u8>, CodecError>;
    fn from_wire(bytes: Vec<u8>) -> Result<Self, CodecError>;
}

impl WireMessage for EncodedRequest {
    const LIMIT: usize = MAX_REQUEST_BYTES;

    fn to_wire(&self) -> Result<Vec<u8>, CodecError> {
        Ok(self.0.clone())
    }

    /// Kept as bytes: the node decodes them itself and refuses malformed ones in words.
    fn from_wire(bytes: Vec<u8>) -> Result<Self, CodecError> {
        Ok(Self(bytes))
    }
}

macro_rules! bincode_wire_message {
    ($type:ty, $limit:expr) => {
        impl WireMessage for $type {
            const LIMIT: usize = $limit;

            fn to_wire(&self) -> Result<Vec<u8>, CodecError> {
                encode_limited(self, Self::LIMIT)
            }

            fn from_wire(bytes: Vec<u8>) -> Result<Self, CodecError> {
                decode_limited(&bytes, Self::LIMIT)
            }
        }
    };
}

bincode_wire_message!(QueryResponse, MAX_RESPONSE_BYTES);
bincode_wire_message!(PolicyRequest, MAX_POLICY_MESSAGE_BYTES);
bincode_wire_message!(PolicyResponse, MAX_POLICY_MESSAGE_BYTES);

/// A libp2p request-response codec: one request and one response per stream, each read
/// with `take(limit)` and written whole, then the stream is closed.
pub struct BoundedCodec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for BoundedCodec<Req, Resp> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req, Resp> Clone for BoundedCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<Req, Resp> std::fmt::Debug for BoundedCodec<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundedCodec")
    }
}

/// The query protocol's codec ([`QUERY_PROTOCOL`]).
pub type QueryCodec = BoundedCodec<EncodedRequest, QueryResponse>;

/// The policy protocol's codec ([`POLICY_PROTOCOL`]).
pub type PolicyCodec = BoundedCodec<PolicyRequest, PolicyResponse>;

impl QueryCodec {
    pub fn protocol() -> StreamProtocol {
        StreamProtocol::new(QUERY_PROTOCOL)
    }
}

impl PolicyCodec {
    pub fn protocol() -> StreamProtocol {
        StreamProtocol::new(POLICY_PROTOCOL)
    }
}

async fn write_message<T, M>(io: &mut T, message: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: WireMessage,
{
    let bytes = message.to_wire()?;
    if bytes.len() > M::LIMIT {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: M::LIMIT,
        }
        .into());
    }
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> libp2p::request_response::Codec for BoundedCodec<Req, Resp>
where
    Req: WireMessage + 'static,
    Resp: WireMessage + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(Req::from_wire(read_bounded(io, Req::LIMIT).await?)?)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(Resp::from_wire(read_bounded(io, Resp::LIMIT).await?)?)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Req,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trailing_bytes_and_oversized_input_are_refused() {
        let mut bytes = encode(&7u32).unwrap();
        assert_eq!(decode_limited::<u32>(&bytes, 16).unwrap(), 7);
        bytes.push(0);
        assert!(matches!(
            decode_limited::<u32>(&bytes, 16),
            Err(CodecError::TrailingBytes { extra: 1 })
        ));
        assert!(matches!(
            decode_limited::<u32>(&bytes, 1),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate() {
        // A Vec<u8> claiming u64::MAX elements in a handful of bytes.
        let bytes = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(decode_limited::<Vec<u8>>(&bytes, 64).is_err());
        // A String claiming 4 MB (just under the large limit) inside a small message is
        // refused by the small message's allocation limit, before any allocation.
        let mut claim = encode(&(4_000_000u64)).unwrap();
        claim.extend_from_slice(b"abc");
        let err = decode_limited::<String>(&claim, 64).unwrap_err();
        assert!(
            err.to_string().contains("limit") || err.to_string().contains("Limit"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_request_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = EncodedRequest::from_raw(bytes).decode();
        }
    }
}
