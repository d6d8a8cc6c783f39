//! Secure aggregation: a node's contribution to a total that nobody sees piecewise.
//!
//! In a secure round every participating node adds a *share* of the noise to its exact
//! result and hides it under pairwise masks, so the aggregator (and any other node) learns
//! only the network-wide sum:
//!
//! - **Masks** (Bonawitz et al. 2017): nodes `i` and `j` agree on a
//!   32-byte secret by X25519 between their identity keys, expand it with HKDF-SHA256 under
//!   the round's context (the request's digest bound to the researcher who signed it,
//!   `renkei_protocol::masks::round_context`) and the pair, and seed ChaCha20 with it. `i < j` adds the stream,
//!   `j` subtracts it (mod 2^64), so the masks cancel in the sum and nothing has to be
//!   exchanged. Each node's masked words are uniformly random to anyone missing one of its
//!   pairwise secrets.
//! - **Distributed noise** (Kairouz, Liu, Steinke 2021): each of `n` nodes adds a discrete
//!   Gaussian share of scale `σ/√(n−t)` (never below 1), where `t` is the number of nodes the
//!   policy allows to collude with the aggregator. Even if `t` nodes subtract their own
//!   shares, the total keeps variance `σ²`, so the total is as accurate as one central
//!   mechanism when `t = 0`, at a cost of `√(n/(n−t))` in its standard deviation otherwise.
//!   A sum of discrete Gaussians is not exactly one; the charge uses KLS21's bound for such
//!   sums in a conservative form, `ρ ≤ Δ²/(2mσᵢ²) + τ·d` with `m = n−t` honest shares, `d`
//!   numbers released and `τ = 10·Σ_{k=1}^{m−1} e^{−2π²σᵢ²·k/(k+1)}`, and widens `σᵢ` until it
//!   is within the rho asked.
//! - **Participants**: member nodes of the policy only, at least `t + 2 + d` of them for a
//!   round that survives `d` dropouts (with one honest node, the colluders could read its
//!   answer). Masks hide computationally (ChaCha20), so the guarantee against the
//!   aggregator is computational DP. The X25519 secret is the node's ed25519 identity key
//!   seen as a Montgomery scalar; besides signatures, that key is used only through HKDF
//!   with contexts of its own: the pairwise agreement, and the seed of the node's own mask.
//! - **Dropouts**: in a round asked with `dropouts = 0`, a node that does not answer leaves
//!   masks that cannot be removed, so the round aborts with nothing revealed; every node
//!   keeps its charge. A round asked with `dropouts = d > 0` survives up to `d` missing
//!   nodes, as in Bonawitz et al.'s double masking: every node also adds a mask of its own
//!   ([`own_mask`], derived from its identity key and the request), and sizes its noise
//!   share for `n − t − d` honest shares, so a total over at least `n − d` survivors is
//!   still fully noised (nodes refuse to unmask a set missing more than `d`).
//!   Once the aggregator has the contributions it will get, it names the survivors; each
//!   survivor settles that set for good (on disk), commits to it and reveals what its
//!   pairwise masks with the dropped nodes added ([`PairSecrets::masks_toward`]); shown
//!   every survivor's commitment to the same set, each reveals its own mask, and the
//!   survivors' total can be read. A contribution that arrives late, after its node was
//!   declared dropped, stays hidden under that node's own mask, and so does one whose node
//!   the aggregator names a survivor to itself but dropped to the others: they commit to a
//!   set without it, so it never sees the commitments its own mask needs.

use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::sync::Mutex;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use renkei_protocol::{MicroRho, PublicKey, SecretKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::NodeError;
use crate::privacy::dp::{Calibration, DpError};

/// Context string of every mask derivation.
const MASK_INFO: &[u8] = b"renkei/secure-aggregation/mask/v1";

/// Context string of a node's own mask.
const OWN_MASK_INFO: &[u8] = b"renkei/secure-aggregation/own-mask/v1";

/// The smallest share scale: below it a discrete Gaussian is too lumpy to add up well.
pub const MIN_SHARE_SCALE: f64 = 1.0;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Result<[u8; 32], NodeError> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| NodeError::CorruptStore {
            what: "mask derivation".into(),
            reason: e.to_string(),
        })?;
    for part in parts {
        mac.update(part);
    }
    Ok(mac.finalize().into_bytes().into())
}

/// HKDF-SHA256 (RFC 5869) to one 32-byte block: extract with `salt`, expand with `info`.
fn hkdf(secret: &[u8], salt: &[u8], info: &[&[u8]]) -> Result<[u8; 32], NodeError> {
    let prk = hmac(salt, &[secret])?;
    let mut parts: Vec<&[u8]> = info.to_vec();
    parts.push(&[1]);
    hmac(&prk, &parts)
}

/// Most peers whose pairwise secrets are kept (participants are policy members, so this is
/// only a backstop).
const MAX_PAIR_SECRETS: usize = 4_096;

/// This node's pairwise secrets with its peers: the X25519 agreement is the costly part of a
/// mask (~40 µs a peer) and depends only on the two identities, so it is done once per peer
/// and kept for the life of the process. The secrets never leave this struct.
#[derive(Default)]
pub struct PairSecrets {
    known: Mutex<HashMap<PublicKey, Zeroizing<[u8; 32]>>>,
}

impl std::fmt::Debug for PairSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers = self.known.lock().map(|k| k.len()).unwrap_or(0);
        f.debug_struct("PairSecrets")
            .field("peers", &peers)
            .finish()
    }
}

impl PairSecrets {
    fn with_peer(
        &self,
        me: &SecretKey,
        peer: &PublicKey,
    ) -> Result<Zeroizing<[u8; 32]>, NodeError> {
        if let Some(known) = self.known.lock().ok().and_then(|k| k.get(peer).cloned()) {
            return Ok(known);
        }
        let shared = me.agree(peer)?;
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= MAX_PAIR_SECRETS {
                known.clear();
            }
            known.insert(*peer, shared.clone());
        }
        Ok(shared)
    }

    /// Agrees with every other participant ahead of the round (and keeps the secrets);
    /// names the first key that cannot be used.
    pub fn prepare(
        &self,
        me: &SecretKey,
        participants: &[PublicKey],
    ) -> Result<(), (PublicKey, NodeError)> {
        let mine = me.public_key();
        for other in participants.iter().filter(|p| **p != mine) {
            self.with_peer(me, other).map_err(|e| (*other, e))?;
        }
        Ok(())
    }

    /// The mask `me` applies for `participants` (sorted, distinct keys, `me` among them)
    /// under `context` (the signed request's digest), for `len` words.
    pub fn masks(
        &self,
        me: &SecretKey,
        participants: &[PublicKey],
        context: &[u8; 32],
        len: usize,
    ) -> Result<Vec<u64>, NodeError> {
        self.masks_toward(me, participants, context, len)
    }

    /// What `me`'s pairwise masks with `peers` (a subset of a round's participants) add to
    /// its contribution under `context`: all of them is [`Self::masks`]; the dropped nodes
    /// of a round are what a survivor reveals to finish it.
    pub fn masks_toward(
        &self,
        me: &SecretKey,
        peers: &[PublicKey],
        context: &[u8; 32],
        len: usize,
    ) -> Result<Vec<u64>, NodeError> {
        let mine = me.public_key();
        let mut total = vec![0u64; len];
        for other in peers.iter().filter(|p| **p != mine) {
            let shared = self.with_peer(me, other)?;
            let (low, high) = if mine < *other {
                (mine, *other)
            } else {
                (*other, mine)
            };
            let seed = hkdf(
                shared.as_ref(),
                context,
                &[MASK_INFO, low.as_bytes(), high.as_bytes()],
            )?;
            let mut stream = ChaCha20Rng::from_seed(seed);
            let add = mine < *other;
            for word in &mut total {
                let m = stream.next_u64();
                *word = if add {
                    word.wrapping_add(m)
                } else {
                    word.wrapping_sub(m)
                };
            }
        }
        Ok(total)
    }
}

/// `me`'s own mask for the round with context `context`, `len` words: a ChaCha20 stream
/// keyed through HKDF by the node's identity secret, so only the node can make it, and it
/// makes the same one again for the same round (after a restart too).
pub fn own_mask(me: &SecretKey, context: &[u8; 32], len: usize) -> Result<Vec<u64>, NodeError> {
    let secret = me.to_seed();
    let seed = hkdf(
        secret.as_ref(),
        context,
        &[OWN_MASK_INFO, me.public_key().as_bytes()],
    )?;
    let mut stream = ChaCha20Rng::from_seed(seed);
    Ok((0..len).map(|_| stream.next_u64()).collect())
}

/// [`PairSecrets::masks`] without keeping the secrets.
pub fn masks(
    me: &SecretKey,
    participants: &[PublicKey],
    context: &[u8; 32],
    len: usize,
) -> Result<Vec<u64>, NodeError> {
    PairSecrets::default().masks(me, participants, context, len)
}

/// KLS21's excess term (per dimension) for summing `m` discrete Gaussians of scale `sigma`.
fn tau(sigma: f64, m: usize) -> f64 {
    10.0 * (1..m)
        .map(|k| {
            let k = k as f64;
            (-2.0 * std::f64::consts::PI.powi(2) * sigma * sigma * k / (k + 1.0)).exp()
        })
        .sum::<f64>()
}

/// The zCDP cost of a `dimensions`-long total when `m` shares of scale `sigma` on each
/// number protect L2 sensitivity `sensitivity` (KLS21 Theorem 14: `Δ²/(2mσ²) + τ·d`).
pub fn total_rho(sensitivity: f64, sigma: f64, m: usize, dimensions: usize) -> f64 {
    sensitivity * sensitivity / (2.0 * m as f64 * sigma * sigma) + tau(sigma, m) * dimensions as f64
}

/// This node's noise share for a secure total over `participants` nodes of which `colluders`
/// may side with the aggregator and `dropouts` may be missing from the total: a discrete
/// Gaussian (on each of `dimensions` numbers) whose scale makes the total of the
/// `participants − colluders − dropouts` honest shares that are sure to be in it cost at
/// most `rho`. The returned calibration's `cost` is that of the total, as charged.
pub fn share_calibration(
    rho: MicroRho,
    sensitivity: f64,
    dimensions: usize,
    participants: usize,
    colluders: usize,
    dropouts: usize,
    report_delta: f64,
) -> Result<Calibration, DpError> {
    let failed = || DpError::Calibration {
        request: renkei_protocol::PrivacyRequest::Zcdp { rho },
        sensitivity,
    };
    let honest = participants
        .checked_sub(colluders)
        .and_then(|m| m.checked_sub(dropouts))
        .filter(|m| *m >= 1)
        .ok_or_else(failed)?;
    if rho.0 == 0 || !(sensitivity.is_finite() && sensitivity > 0.0) {
        return Err(failed());
    }
    let central = sensitivity / (2.0 * rho.as_rho()).sqrt();
    let fits = |sigma: f64| {
        MicroRho::from_rho_ceil(total_rho(sensitivity, sigma, honest, dimensions.max(1)))
            .ok()
            .filter(|charged| *charged <= rho)
    };
    // The cost falls as sigma grows: widen from the central split until it fits, then
    // bisect back towards the narrowest share that does.
    let mut narrow = (central / (honest as f64).sqrt()).max(MIN_SHARE_SCALE);
    let mut wide = narrow;
    let mut step = 1e-6;
    while fits(wide).is_none() {
        narrow = wide;
        wide *= 1.0 + step;
        step *= 2.0;
        if !wide.is_finite() || step > 1e6 {
            return Err(failed());
        }
    }
    if narrow < wide {
        for _ in 0..48 {
            let middle = 0.5 * (narrow + wide);
            if fits(middle).is_some() {
                wide = middle;
            } else {
                narrow = middle;
            }
        }
    }
    let charged = fits(wide).ok_or_else(failed)?;
    // The share itself is an ordinary discrete Gaussian of scale `wide`; what it costs (and
    // its (epsilon, delta)) is that of the total it adds up to.
    let mut share = Calibration::share(wide, sensitivity, report_delta)?;
    share.cost = charged;
    share.epsilon = Calibration::for_request(
        renkei_protocol::PrivacyRequest::Zcdp { rho: charged },
        sensitivity,
        report_delta,
    )?
    .epsilon;
    Ok(share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use renkei_protocol::masks::{hide_under_masks as masked, sum_masked};

    fn keys(n: usize) -> (Vec<SecretKey>, Vec<PublicKey>) {
        let secrets: Vec<SecretKey> = (0..n).map(|_| SecretKey::generate().unwrap()).collect();
        let mut publics: Vec<PublicKey> = secrets.iter().map(SecretKey::public_key).collect();
        publics.sort();
        (secrets, publics)
    }

    #[test]
    fn masks_cancel_in_the_sum() {
        let (secrets, publics) = keys(5);
        let context = [9u8; 32];
        let values = [[100, -3, 7], [0, 0, 1], [-40, 12, 0], [5, 5, 5], [1, 2, 3]];
        let contributions: Vec<Vec<u64>> = secrets
            .iter()
            .zip(values)
            .map(|(s, v)| masked(&v, &masks(s, &publics, &context, 3).unwrap()))
            .collect();
        let all: Vec<&[u64]> = contributions.iter().map(Vec::as_slice).collect();
        assert_eq!(sum_masked(&all), vec![66, 16, 16]);
        // Without one contribution the rest is noise.
        let partial = sum_masked(&all[1..]);
        assert!(
            partial.iter().all(|v| v.unsigned_abs() > 1 << 40),
            "{partial:?}"
        );
    }

    /// A round that survives dropouts: every node adds its own mask too; with node 2 of 5
    /// missing, the survivors' own masks and their pairwise masks with node 2 remove
    /// everything but the survivors' total. Without the own masks revealed (a late
    /// contribution of a node declared dropped), a contribution stays unreadable.
    #[test]
    fn survivors_reveal_what_removes_a_dropped_nodes_masks() {
        let (secrets, publics) = keys(5);
        let context = [3u8; 32];
        let values: [[i64; 2]; 5] = [[10, 1], [20, 2], [30, 3], [40, 4], [50, 5]];
        // Each node keeps its own secrets (a cache is per node).
        let toward = |i: usize, peers: &[PublicKey]| {
            PairSecrets::default()
                .masks_toward(&secrets[i], peers, &context, 2)
                .unwrap()
        };
        let contribution = |i: usize| {
            let mut mask = masks(&secrets[i], &publics, &context, 2).unwrap();
            let own = own_mask(&secrets[i], &context, 2).unwrap();
            for (m, o) in mask.iter_mut().zip(own) {
                *m = m.wrapping_add(o);
            }
            masked(&values[i], &mask)
        };
        let dropped = 2;
        let survivors: Vec<usize> = (0..5).filter(|i| *i != dropped).collect();
        let mut words: Vec<Vec<u64>> = survivors.iter().map(|i| contribution(*i)).collect();
        for i in &survivors {
            let own = own_mask(&secrets[*i], &context, 2).unwrap();
            let toward = toward(*i, &[secrets[dropped].public_key()]);
            // Subtracting is adding the two's complement.
            let undo: Vec<u64> = own
                .iter()
                .zip(&toward)
                .map(|(o, t)| o.wrapping_add(*t).wrapping_neg())
                .collect();
            words.push(undo);
        }
        let all: Vec<&[u64]> = words.iter().map(Vec::as_slice).collect();
        assert_eq!(sum_masked(&all), vec![10 + 20 + 40 + 50, 1 + 2 + 4 + 5]);
        // The own mask is the node's alone and the same again for the same round.
        assert_eq!(
            own_mask(&secrets[0], &context, 3).unwrap(),
            own_mask(&secrets[0], &context, 3).unwrap()
        );
        assert_ne!(
            own_mask(&secrets[0], &context, 1).unwrap(),
            own_mask(&secrets[1], &context, 1).unwrap()
        );
        // The dropped node's late contribution, with every pairwise mask toward it
        // revealed, is still hidden under its own mask.
        let late = contribution(dropped);
        let pairwise = toward(dropped, &publics);
        let unpaired: Vec<i64> = late
            .iter()
            .zip(&pairwise)
            .map(|(w, m)| w.wrapping_sub(*m) as i64)
            .collect();
        assert!(
            unpaired.iter().all(|v| v.unsigned_abs() > 1 << 40),
            "{unpaired:?}"
        );
    }

    /// The aggregator's view (every node's masked words) has the same distribution for two
    /// splits of the same total between the nodes: a two-sample chi-square test on the joint
    /// top bits of two nodes' words (the third is fixed by the total), and each word alone
    /// is flat.
    #[test]
    fn the_aggregators_view_does_not_depend_on_how_the_total_is_split() {
        let (secrets, publics) = keys(3);
        let trials = 2_048;
        let view = |split: [i64; 3], salt: u8| {
            let mut joint = [0u32; 16];
            let mut alone = [0u32; 16];
            for trial in 0..trials {
                let mut context = [salt; 32];
                context[..8].copy_from_slice(&(trial as u64).to_le_bytes());
                let words: Vec<u64> = secrets
                    .iter()
                    .zip(split)
                    .map(|(s, v)| masked(&[v], &masks(s, &publics, &context, 1).unwrap())[0])
                    .collect();
                assert_eq!(
                    sum_masked(&[&words[..1], &words[1..2], &words[2..]]),
                    vec![15]
                );
                joint[((words[0] >> 62) * 4 + (words[1] >> 62)) as usize] += 1;
                alone[(words[0] >> 60) as usize] += 1;
            }
            (joint, alone)
        };
        let (joint_a, alone_a) = view([10, 0, 5], 1);
        let (joint_b, alone_b) = view([-5, 15, 5], 2);
        // Two samples of equal size: sum (a-b)^2/(a+b) is chi-square with 15 df; 50 is
        // beyond its 1e-6 tail (~48.3).
        let two_sample: f64 = joint_a
            .iter()
            .zip(&joint_b)
            .filter(|(a, b)| **a + **b > 0)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2) / (*a + *b) as f64)
            .sum();
        assert!(two_sample < 50.0, "views differ: chi-square {two_sample}");
        let expected = trials as f64 / 16.0;
        for alone in [alone_a, alone_b] {
            let flat: f64 = alone
                .iter()
                .map(|b| (*b as f64 - expected).powi(2) / expected)
                .sum();
            assert!(
                flat < 50.0,
                "a masked word is not uniform: chi-square {flat}"
            );
        }
    }

    #[test]
    fn distributed_noise_adds_up_to_the_central_scale() {
        let n = 8;
        let share = share_calibration(MicroRho(50_000), 1.0, 1, n, 0, 0, 1e-6).unwrap();
        let central = Calibration::gaussian(1.0, MicroRho(50_000), 1e-6).unwrap();
        let total_sd = (n as f64).sqrt() * share.noise_std;
        assert!(
            total_sd >= central.noise_std * 0.999,
            "{total_sd} < {}",
            central.noise_std
        );
        assert!(
            total_sd <= central.noise_std * 1.01,
            "{total_sd} vs {}",
            central.noise_std
        );
        assert!(share.cost <= MicroRho(50_000));
        // Tolerating colluders costs accuracy: sqrt(n / (n - t)).
        let guarded = share_calibration(MicroRho(50_000), 1.0, 1, n, 2, 0, 1e-6).unwrap();
        let ratio = guarded.noise_std / share.noise_std;
        assert!((ratio - (8.0f64 / 6.0).sqrt()).abs() < 0.01, "{ratio}");
        // Shares never go below scale 1: 64 nodes at rho 0.9 would otherwise get 0.09 each,
        // and then the total costs less than asked.
        let small = share_calibration(MicroRho(900_000), 1.0, 1, 64, 0, 0, 1e-6).unwrap();
        assert_eq!(small.scale, MIN_SHARE_SCALE);
        assert!(small.cost < MicroRho(900_000), "{:?}", small.cost);
        assert!(share_calibration(MicroRho(50_000), 1.0, 1, 2, 2, 0, 1e-6).is_err());
        // Tolerating dropouts is paid the same way: shares sized for n - t - d.
        let robust = share_calibration(MicroRho(50_000), 1.0, 1, n, 0, 2, 1e-6).unwrap();
        let ratio = robust.noise_std / share.noise_std;
        assert!((ratio - (8.0f64 / 6.0).sqrt()).abs() < 0.01, "{ratio}");
        assert!(share_calibration(MicroRho(50_000), 1.0, 1, 3, 1, 2, 1e-6).is_err());
    }
}
