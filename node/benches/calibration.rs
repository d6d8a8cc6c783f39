//! Criterion benchmarks of the per-query work of a node that does not depend on data size:
//! calibrating a mechanism through opendp (cost and (epsilon, delta) from its privacy maps)
//! and drawing the noise.

use criterion::{Criterion, criterion_group, criterion_main};
use renkei_node::dp::Calibration;
use renkei_protocol::MicroRho;

fn calibration(c: &mut Criterion) {
    c.bench_function("calibrate discrete Gaussian (rho 0.05)", |b| {
        b.iter(|| Calibration::gaussian(1.0, MicroRho(50_000), 1e-6))
    });
    let calibrated = Calibration::gaussian(1.0, MicroRho(50_000), 1e-6).expect("calibrates");
    c.bench_function("draw one discrete Gaussian count", |b| {
        b.iter(|| calibrated.release_one(1234))
    });
}

criterion_group!(benches, calibration);
criterion_main!(benches);
