//! The noise a node releases has the distribution it declares: a chi-square goodness-of-fit
//! test of many draws from the node's own mechanisms (through opendp) against the declared
//! discrete Gaussian / discrete Laplace mass functions. The same test, on the same draws,
//! must reject a scale 15% off, so it can tell a wrong scale from a right one.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_node::privacy::dp::Calibration;
use renkei_protocol::{MicroEpsilon, MicroRho};

const DRAWS: usize = 20_000;

/// z for an upper tail of 1e-6: a correct mechanism fails this test once in a million runs.
const Z_ONE_IN_A_MILLION: f64 = 4.753_424;

/// Upper 1e-6 quantile of chi-square with `df` degrees of freedom (Wilson–Hilferty).
fn chi_square_critical(df: f64) -> f64 {
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + Z_ONE_IN_A_MILLION * a.sqrt()).powi(3)
}

/// Chi-square statistic of `draws` against the mass function `weight` (unnormalised),
/// with cells of expected count below 5 pooled into the two tails.
fn chi_square(draws: &[i64], weight: impl Fn(i64) -> f64) -> (f64, f64) {
    let reach = 200;
    let total: f64 = (-reach..=reach).map(&weight).sum();
    let expected = |x: i64| weight(x) / total * draws.len() as f64;
    // The central cells with enough expected mass; everything beyond is a tail cell.
    let mut edge = 0;
    while expected(edge + 1) >= 5.0 {
        edge += 1;
    }
    let tail: f64 = ((edge + 1)..=reach).map(expected).sum();
    let mut statistic = 0.0;
    let mut cells = 0.0;
    for x in -edge..=edge {
        let observed = draws.iter().filter(|d| **d == x).count() as f64;
        statistic += (observed - expected(x)).powi(2) / expected(x);
        cells += 1.0;
    }
    for side in [-1i64, 1] {
        let observed = draws
            .iter()
            .filter(|d| d.signum() == side && d.abs() > edge)
            .count() as f64;
        statistic += (observed - tail).powi(2) / tail;
        cells += 1.0;
    }
    (statistic, cells - 1.0)
}

#[test]
fn discrete_gaussian_noise_matches_its_declared_scale() {
    let calibration = Calibration::gaussian(1.0, MicroRho(50_000), 1e-6).unwrap();
    // One vector release: DRAWS independent draws.
    let draws: Vec<i64> = calibration.release(vec![0; DRAWS]).unwrap();
    let gaussian = |scale: f64| move |x: i64| (-(x as f64).powi(2) / (2.0 * scale * scale)).exp();

    let (statistic, df) = chi_square(&draws, gaussian(calibration.scale));
    let critical = chi_square_critical(df);
    assert!(
        statistic < critical,
        "declared scale rejected: X² {statistic:.1} ≥ {critical:.1} (df {df})"
    );

    for wrong in [calibration.scale * 1.15, calibration.scale / 1.15] {
        let (statistic, df) = chi_square(&draws, gaussian(wrong));
        assert!(
            statistic > chi_square_critical(df),
            "a scale of {wrong:.3} instead of {:.3} went unnoticed (X² {statistic:.1})",
            calibration.scale
        );
    }
}

#[test]
fn discrete_laplace_noise_matches_its_declared_scale() {
    let calibration = Calibration::laplace(1.0, MicroEpsilon(400_000)).unwrap();
    // One vector release: DRAWS independent draws.
    let draws: Vec<i64> = calibration.release(vec![0; DRAWS]).unwrap();
    let laplace = |scale: f64| move |x: i64| (-(x.abs() as f64) / scale).exp();

    let (statistic, df) = chi_square(&draws, laplace(calibration.scale));
    let critical = chi_square_critical(df);
    assert!(
        statistic < critical,
        "declared scale rejected: X² {statistic:.1} ≥ {critical:.1} (df {df})"
    );
    for wrong in [calibration.scale * 1.15, calibration.scale / 1.15] {
        let (statistic, df) = chi_square(&draws, laplace(wrong));
        assert!(
            statistic > chi_square_critical(df),
            "scale {wrong:.3} went unnoticed"
        );
    }

    // The declared standard deviation is the draws' standard deviation.
    let var = draws.iter().map(|d| (*d as f64).powi(2)).sum::<f64>() / DRAWS as f64;
    let relative = (var.sqrt() - calibration.noise_std).abs() / calibration.noise_std;
    assert!(
        relative < 0.05,
        "sd {} vs declared {}",
        var.sqrt(),
        calibration.noise_std
    );
}
