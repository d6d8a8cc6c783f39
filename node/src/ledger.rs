//! The privacy ledger: how much each researcher has spent on each study at this node, and
//! which request nonces have been seen.
//!
//! A charge is one sled transaction over the `ledger` and `nonces` trees (nonce unseen,
//! budget sufficient, debit, record nonce), followed by an fsync, and it happens **before**
//! any noise is drawn. A crash between the charge and the release loses budget, never leaks
//! it; there are no refunds once a charge is on disk. Ledger keys are `researcher key (32
//! bytes) || study`, values the spent micro-rho as a big-endian u64; nonce keys are
//! `researcher key || nonce`, values the request's expiry. Nonces are kept until their
//! request has expired (plus clock skew), after which the request would be refused anyway.

use renkei_protocol::limits::MAX_CLOCK_SKEW_SECS;
use renkei_protocol::{MicroRho, PublicKey, Refusal, RefusalCode};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::error::NodeError;
use crate::store::NodeStore;

/// A budget debit that is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub spent: MicroRho,
    pub remaining: MicroRho,
}

/// Spend of one researcher on one study.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerEntry {
    pub researcher: PublicKey,
    pub study: String,
    pub spent: MicroRho,
}

/// What one charge is for.
#[derive(Debug, Clone, Copy)]
pub struct ChargeRequest<'a> {
    pub researcher: &'a PublicKey,
    pub study: &'a str,
    pub nonce: &'a [u8; 16],
    /// Unix seconds after which the request is dead (the nonce may then be forgotten).
    pub expires_at: u64,
    pub cost: MicroRho,
    /// The researcher's total budget for the study, from the active policy.
    pub budget: MicroRho,
}

/// The ledger over the node's store.
#[derive(Debug, Clone)]
pub struct PrivacyLedger {
    store: NodeStore,
}

fn account_key(researcher: &PublicKey, study: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(32 + study.len());
    key.extend_from_slice(researcher.as_bytes());
    key.extend_from_slice(study.as_bytes());
    key
}

/// Nonces are kept per researcher, so one researcher can never block another's nonce.
fn nonce_key(researcher: &PublicKey, nonce: &[u8; 16]) -> [u8; 48] {
    let mut key = [0u8; 48];
    key[..32].copy_from_slice(researcher.as_bytes());
    key[32..].copy_from_slice(nonce);
    key
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Why a charge did not happen.
#[derive(Debug)]
enum Refused {
    Replayed,
    Exhausted { spent: u64 },
    Corrupt,
}

impl PrivacyLedger {
    pub fn new(store: NodeStore) -> Self {
        Self { store }
    }

    /// Atomically refuses a seen nonce or an insufficient budget, or debits the cost and
    /// records the nonce, then flushes to disk. Returns only once the charge is durable.
    pub fn charge(&self, request: ChargeRequest<'_>) -> Result<Result<Charge, Refusal>, NodeError> {
        let account = account_key(request.researcher, request.study);
        let nonce = nonce_key(request.researcher, request.nonce);
        let outcome = (&self.store.ledger, &self.store.nonces).transaction(|(ledger, nonces)| {
            if nonces.get(nonce)?.is_some() {
                return Err(ConflictableTransactionError::Abort(Refused::Replayed));
            }
            let spent = match ledger.get(&account)? {
                None => 0,
                Some(bytes) => decode_u64(&bytes)
                    .ok_or(ConflictableTransactionError::Abort(Refused::Corrupt))?,
            };
            let total = spent
                .checked_add(request.cost.0)
                .filter(|total| *total <= request.budget.0)
                .ok_or(ConflictableTransactionError::Abort(Refused::Exhausted {
                    spent,
                }))?;
            ledger.insert(account.as_slice(), &total.to_be_bytes()[..])?;
            nonces.insert(&nonce[..], &request.expires_at.to_be_bytes()[..])?;
            Ok(total)
        });
        let total = match outcome {
            Ok(total) => total,
            Err(TransactionError::Abort(Refused::Replayed)) => {
                return Ok(Err(Refusal::new(
                    RefusalCode::Replayed,
                    "this request's nonce was already used; sign a new request",
                )));
            }
            Err(TransactionError::Abort(Refused::Exhausted { spent })) => {
                let left = request.budget.saturating_sub(MicroRho(spent));
                return Ok(Err(Refusal::new(
                    RefusalCode::BudgetExhausted,
                    format!(
                        "study `{}`: this query costs rho {} but only {} of {} is left at this node",
                        request.study, request.cost, left, request.budget
                    ),
                )));
            }
            Err(TransactionError::Abort(Refused::Corrupt)) => {
                return Err(NodeError::CorruptStore {
                    what: format!("ledger entry for study `{}`", request.study),
                    reason: "not an 8-byte counter".into(),
                });
            }
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.store.flush()?;
        Ok(Ok(Charge {
            spent: MicroRho(total),
            remaining: request.budget.saturating_sub(MicroRho(total)),
        }))
    }

    /// Spend so far of one researcher on one study.
    pub fn spent(&self, researcher: &PublicKey, study: &str) -> Result<MicroRho, NodeError> {
        match self.store.ledger.get(account_key(researcher, study))? {
            None => Ok(MicroRho(0)),
            Some(bytes) => {
                decode_u64(&bytes)
                    .map(MicroRho)
                    .ok_or_else(|| NodeError::CorruptStore {
                        what: format!("ledger entry for study `{study}`"),
                        reason: "not an 8-byte counter".into(),
                    })
            }
        }
    }

    /// Every account with its spend.
    pub fn entries(&self) -> Result<Vec<LedgerEntry>, NodeError> {
        let mut entries = Vec::new();
        for item in self.store.ledger.iter() {
            let (key, value) = item?;
            let corrupt = || NodeError::CorruptStore {
                what: "ledger entry".into(),
                reason: "malformed key or value".into(),
            };
            let researcher: [u8; 32] = key
                .get(..32)
                .and_then(|k| k.try_into().ok())
                .ok_or_else(corrupt)?;
            let study = String::from_utf8(key[32..].to_vec()).map_err(|_| corrupt())?;
            let spent = decode_u64(&value).ok_or_else(corrupt)?;
            entries.push(LedgerEntry {
                researcher: PublicKey::from_bytes(researcher),
                study,
                spent: MicroRho(spent),
            });
        }
        Ok(entries)
    }

    /// Forgets nonces of requests that expired before `now` (minus clock skew): such a
    /// request is refused as expired before its nonce is ever looked at.
    pub fn prune_nonces(&self, now: u64) -> Result<usize, NodeError> {
        let horizon = now.saturating_sub(MAX_CLOCK_SKEW_SECS);
        let mut pruned = 0;
        for item in self.store.nonces.iter() {
            let (nonce, expires) = item?;
            if decode_u64(&expires).is_some_and(|e| e < horizon) {
                self.store.nonces.remove(nonce)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::NodeHome;
    use renkei_protocol::SecretKey;

    fn request<'a>(
        researcher: &'a PublicKey,
        nonce: &'a [u8; 16],
        cost: u64,
        budget: u64,
    ) -> ChargeRequest<'a> {
        ChargeRequest {
            researcher,
            study: "severity",
            nonce,
            expires_at: 1_000,
            cost: MicroRho(cost),
            budget: MicroRho(budget),
        }
    }

    #[test]
    fn charges_until_exhausted_refuses_replays_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let researcher = SecretKey::generate().unwrap().public_key();
        {
            let ledger = PrivacyLedger::new(home.open_store().unwrap());
            let first = ledger
                .charge(request(&researcher, &[1; 16], 40, 100))
                .unwrap()
                .unwrap();
            assert_eq!(first.remaining, MicroRho(60));
            let replay = ledger
                .charge(request(&researcher, &[1; 16], 40, 100))
                .unwrap()
                .unwrap_err();
            assert_eq!(replay.code, RefusalCode::Replayed);
            ledger
                .charge(request(&researcher, &[2; 16], 40, 100))
                .unwrap()
                .unwrap();
            let broke = ledger
                .charge(request(&researcher, &[3; 16], 40, 100))
                .unwrap()
                .unwrap_err();
            assert_eq!(broke.code, RefusalCode::BudgetExhausted);
            assert_eq!(ledger.spent(&researcher, "severity").unwrap(), MicroRho(80));
        }
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        assert_eq!(ledger.spent(&researcher, "severity").unwrap(), MicroRho(80));
        assert_eq!(ledger.entries().unwrap().len(), 1);
        let replay = ledger
            .charge(request(&researcher, &[2; 16], 1, 100))
            .unwrap()
            .unwrap_err();
        assert_eq!(replay.code, RefusalCode::Replayed);
    }

    #[test]
    fn expired_nonces_are_pruned_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (home, _) = NodeHome::init(dir.path()).unwrap();
        let ledger = PrivacyLedger::new(home.open_store().unwrap());
        let researcher = SecretKey::generate().unwrap().public_key();
        ledger
            .charge(request(&researcher, &[9; 16], 1, 100))
            .unwrap()
            .unwrap();
        assert_eq!(ledger.prune_nonces(1_000).unwrap(), 0);
        assert_eq!(
            ledger
                .prune_nonces(1_000 + MAX_CLOCK_SKEW_SECS + 1)
                .unwrap(),
            1
        );
    }
}
