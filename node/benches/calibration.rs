//! Criterion benchmarks of the per-query work of a node that does not depend on data size:
//! calibrating a mechanism through opendp (cost and (epsilon, delta) from its privacy maps)
//! and drawing the noise; for a secure round, a noise share's calibration and the pairwise
//! masks of one contribution among 8 nodes.

use criterion::{Criterion, criterion_group, criterion_main};
use renkei_node::privacy::dp::Calibration;
use renkei_node::privacy::secure;
use renkei_protocol::{MicroRho, PublicKey, SecretKey};

fn calibration(c: &mut Criterion) {
    c.bench_function("calibrate discrete Gaussian (rho 0.05)", |b| {
        b.iter(|| Calibration::gaussian(1.0, MicroRho(50_000), 1e-6))
    });
    let calibrated = Calibration::gaussian(1.0, MicroRho(50_000), 1e-6).expect("calibrates");
    c.bench_function("draw one discrete Gaussian count", |b| {
        b.iter(|| calibrated.release_one(1234))
    });
    c.bench_function("calibrate a noise share (8 nodes, rho 0.05)", |b| {
        b.iter(|| secure::share_calibration(MicroRho(50_000), 1.0, 1, 8, 0, 0, 1e-6))
    });
    let keys: Vec<SecretKey> = (0..8)
        .map(|_| SecretKey::generate().expect("key"))
        .collect();
    let mut participants: Vec<PublicKey> = keys.iter().map(SecretKey::public_key).collect();
    participants.sort();
    c.bench_function(
        "pairwise masks of one contribution, first round (8 nodes)",
        |b| b.iter(|| secure::masks(&keys[0], &participants, &[7u8; 32], 1)),
    );
    let secrets = secure::PairSecrets::default();
    c.bench_function(
        "pairwise masks of one contribution, agreed peers (8 nodes)",
        |b| b.iter(|| secrets.masks(&keys[0], &participants, &[7u8; 32], 1)),
    );
}

criterion_group!(benches, calibration);
criterion_main!(benches);
