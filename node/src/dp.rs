//! Differential privacy: calibrating and drawing noise with opendp.
//!
//! Counts are released with opendp's discrete Gaussian mechanism on `i64` under
//! zero-concentrated DP: integer in, integer out, so there is no floating-point noise to
//! attack. The node asks opendp's own privacy map what a mechanism costs and charges that,
//! never a number sent by anyone else. opendp measurements are not `Send`, so they are built
//! where they are used (inside the blocking section that releases the answer).
//!
//! Randomness: opendp draws from `rand` 0.7's `thread_rng` (ChaCha20 reseeded from the
//! operating system) unless built with its `use-openssl` feature.

use opendp::domains::AtomDomain;
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::AbsoluteDistance;
use renkei_protocol::MicroRho;

/// A failure inside the DP layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpError {
    #[error("opendp {variant}: {message}")]
    OpenDp { variant: String, message: String },
    #[error("cannot calibrate noise for rho {rho} at sensitivity {sensitivity}")]
    Calibration { rho: MicroRho, sensitivity: u64 },
}

impl From<opendp::error::Error> for DpError {
    fn from(e: opendp::error::Error) -> Self {
        DpError::OpenDp {
            variant: e.variant.to_string(),
            message: e.message.unwrap_or_default(),
        }
    }
}

/// A calibrated discrete Gaussian mechanism, described by plain numbers (so it can cross
/// threads); [`Calibration::release`] builds the opendp measurement and draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Largest change one patient can make to the true value.
    pub sensitivity: u64,
    /// opendp's `scale` parameter of the discrete Gaussian.
    pub scale: f64,
    /// The cost by opendp's privacy map, rounded up to a whole micro-rho.
    pub cost: MicroRho,
}

type CountMeasurement = opendp::core::Measurement<
    AtomDomain<i64>,
    AbsoluteDistance<i64>,
    ZeroConcentratedDivergence,
    i64,
>;

fn discrete_gaussian(scale: f64) -> Result<CountMeasurement, DpError> {
    Ok(make_gaussian::<_, _, ZeroConcentratedDivergence>(
        AtomDomain::<i64>::default(),
        AbsoluteDistance::<i64>::default(),
        scale,
        None,
    )?)
}

/// How many times calibration widens the scale to absorb floating-point rounding.
const MAX_WIDENINGS: usize = 16;

impl Calibration {
    /// The smallest scale whose cost (by opendp's privacy map, rounded up to micro-rho)
    /// does not exceed `budget`.
    ///
    /// Starts from the closed form `scale = Δ / sqrt(2ρ)` and widens by a relative 1e-12
    /// until the map agrees, so the charge equals what the researcher asked for instead of
    /// one micro-rho more through rounding.
    pub fn for_budget(sensitivity: u64, budget: MicroRho) -> Result<Self, DpError> {
        let failed = || DpError::Calibration {
            rho: budget,
            sensitivity,
        };
        if budget.0 == 0 || sensitivity == 0 {
            return Err(failed());
        }
        let d_in = i64::try_from(sensitivity).map_err(|_| failed())?;
        let mut scale = sensitivity as f64 / (2.0 * budget.as_rho()).sqrt();
        for _ in 0..MAX_WIDENINGS {
            let rho = discrete_gaussian(scale)?.map(&d_in)?;
            let cost = MicroRho::from_rho_ceil(rho).map_err(|_| failed())?;
            if cost <= budget {
                return Ok(Self {
                    sensitivity,
                    scale,
                    cost,
                });
            }
            scale *= 1.0 + 1e-12;
        }
        Err(failed())
    }

    /// Draws the noisy value for `true_value`. Call only after the cost is on disk.
    pub fn release(&self, true_value: i64) -> Result<i64, DpError> {
        Ok(discrete_gaussian(self.scale)?.invoke(&true_value)?)
    }

    /// The standard deviation of the released value's noise (for intervals).
    pub fn standard_deviation(&self) -> f64 {
        self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_matches_the_requested_rho_and_the_closed_form() {
        for micro in [1_000u64, 10_000, 50_000, 123_457, 1_000_000] {
            let c = Calibration::for_budget(1, MicroRho(micro)).unwrap();
            assert_eq!(c.cost, MicroRho(micro));
            // rho = Δ² / (2σ²)
            let rho = 1.0 / (2.0 * c.scale * c.scale);
            assert!((rho - MicroRho(micro).as_rho()).abs() < 1e-9, "{rho}");
        }
        let c = Calibration::for_budget(3, MicroRho(50_000)).unwrap();
        assert!((c.scale - 3.0 / 0.1f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn nonsense_budgets_are_refused() {
        assert!(Calibration::for_budget(1, MicroRho(0)).is_err());
        assert!(Calibration::for_budget(0, MicroRho(10)).is_err());
    }

    #[test]
    fn released_values_are_integers_near_the_truth() {
        let c = Calibration::for_budget(1, MicroRho(500_000)).unwrap();
        assert!((c.scale - 1.0).abs() < 1e-9);
        let draws: Vec<i64> = (0..2000).map(|_| c.release(1000).unwrap()).collect();
        let mean = draws.iter().sum::<i64>() as f64 / draws.len() as f64;
        let var = draws
            .iter()
            .map(|d| (*d as f64 - mean).powi(2))
            .sum::<f64>()
            / (draws.len() - 1) as f64;
        assert!((mean - 1000.0).abs() < 0.2, "mean {mean}");
        // The sample variance of 2000 draws with σ² = 1 lies within ±0.2 with
        // overwhelming probability; σ² = 2 or 0.5 would fail.
        assert!((var - 1.0).abs() < 0.2, "variance {var}");
        assert!(draws.iter().any(|d| *d != 1000), "noise was added");
    }
}
