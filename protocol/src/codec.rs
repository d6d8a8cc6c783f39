//! The one place where renkei turns values into bytes and back.
//!
//! Everything on the wire, everything signed and everything a node stores is encoded here
//! with bincode 2 (standard configuration: little-endian, variable-length integers). bincode
//! is unmaintained upstream, so no other module names it; replacing it means changing this
//! file only. Decoding is always bounded: the input length is checked against the caller's
//! limit, bincode is given an allocation limit, and trailing bytes are an error (so one value
//! has exactly one encoding that verifies).
//!
//! A leaf: it knows values and bytes, not messages or streams (those are
//! [`crate::transport`]'s).

use std::io;

use bincode::config::{Configuration, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::limits::MAX_POLICY_MESSAGE_BYTES;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
