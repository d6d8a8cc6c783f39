//! renkei's request-response protocols on libp2p streams.
//!
//! [`BoundedCodec`] frames them: one request and one response per stream, each read with
//! `take(limit)` where the limit is the message type's own ([`WireMessage::LIMIT`]), and
//! decoded through [`crate::codec`]. [`QueryCodec`] and [`PolicyCodec`] are its two
//! instances; a query request stays bytes ([`EncodedRequest`]) until the node decodes it
//! itself, so a malformed one still gets a typed refusal.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

use crate::codec::{CodecError, decode_limited, encode_limited};
use crate::envelope::SignedEnvelope;
use crate::limits::{
    MAX_POLICY_MESSAGE_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, POLICY_PROTOCOL,
    QUERY_PROTOCOL,
};
use crate::messages::{PolicyRequest, PolicyResponse, QueryResponse};

/// A query request as it travels: the encoded [`SignedEnvelope`], at most
/// [`MAX_REQUEST_BYTES`] long. The node decodes it itself, so a malformed request still gets
/// a typed refusal instead of a dropped stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest(Vec<u8>);

impl EncodedRequest {
    /// Encodes a signed request envelope, checking the size limit.
    pub fn encode(envelope: &SignedEnvelope) -> Result<Self, CodecError> {
        Ok(Self(encode_limited(envelope, MAX_REQUEST_BYTES)?))
    }

    /// Raw bytes, for tests that need to send something malformed.
    pub fn from_raw(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Decodes the signed envelope (its signature is not checked here).
    pub fn decode(&self) -> Result<SignedEnvelope, CodecError> {
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

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_request_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = EncodedRequest::from_raw(bytes).decode();
        }
    }
}
