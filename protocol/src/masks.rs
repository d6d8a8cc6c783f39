//! Secure rounds' arithmetic, shared by the nodes that mask and the aggregator that adds:
//! hiding values under masks and summing masked words (mod 2^64), and the round's context,
//! survivor set digest and commitment message that bind masks and unmaskings to one
//! researcher's round.

use sha2::{Digest, Sha256};

use crate::keys::PublicKey;

/// `values` hidden under `masks`, word by word mod 2^64: the words of a
/// [`Release::Masked`].
pub fn hide_under_masks(values: &[i64], masks: &[u64]) -> Vec<u64> {
    values
        .iter()
        .zip(masks)
        .map(|(value, mask)| (*value as u64).wrapping_add(*mask))
        .collect()
}

/// The word-by-word sum (mod 2^64) of masked contributions, read as signed numbers: once
/// every participant's contribution is in, the masks cancel and this is the sum of their
/// values. Shorter contributions count as zeros.
pub fn sum_masked(contributions: &[&[u64]]) -> Vec<i64> {
    let len = contributions.iter().map(|c| c.len()).max().unwrap_or(0);
    let mut total = vec![0u64; len];
    for words in contributions {
        for (sum, word) in total.iter_mut().zip(words.iter()) {
            *sum = sum.wrapping_add(*word);
        }
    }
    total.into_iter().map(|word| word as i64).collect()
}

/// The context of a secure round's masks, settled survivors and commitments: the request's
/// [`request_digest`] bound to the researcher who signed it, so another researcher who
/// signs the very same request gets masks and commitments unrelated to this round's.
pub fn round_context(researcher: &PublicKey, request_digest: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"renkei/secure-round/v1");
    hash.update(researcher.as_bytes());
    hash.update(request_digest);
    hash.finalize().into()
}

/// What a survivor's commitment signs: the round (its [`round_context`]) and the set of
/// survivors.
pub fn commitment_message(round_context: &[u8; 32], survivors_digest: &[u8; 32]) -> Vec<u8> {
    crate::envelope::Purpose::RoundCommitment
        .signed_bytes(&[&round_context[..], &survivors_digest[..]].concat())
}

/// SHA-256 over a set of survivors (sorted keys), binding an unmasking to it.
pub fn survivors_digest(survivors: &[PublicKey]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for key in survivors {
        hash.update(key.as_bytes());
    }
    hash.finalize().into()
}
