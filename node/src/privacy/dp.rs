//! Differential privacy: calibrating and drawing noise with opendp.
//!
//! Counts are released with opendp's integer mechanisms: the discrete Gaussian under
//! zero-concentrated DP, or the discrete Laplace when a researcher asks for pure DP. Integer
//! in, integer out, so there is no floating-point noise to attack (Mironov 2012). The node
//! asks opendp's own privacy maps what a mechanism costs and charges that, never a number
//! sent by anyone else: rho from the zCDP map (for the discrete Laplace, through
//! `make_pureDP_to_zCDP`), and the equivalent (epsilon, delta) through
//! `make_zCDP_to_approxDP` and `make_fix_delta`. opendp measurements are not `Send`, so
//! [`Calibration`] keeps plain numbers and builds the measurement where it is used.
//!
//! Randomness: with the default `openssl-rng` feature opendp draws every sample's bits from
//! OpenSSL's `RAND_priv_bytes`; without it, from `rand` 0.7's `thread_rng` (ChaCha20
//! reseeded from the operating system). [`RANDOMNESS`] says which one this build uses.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use opendp::combinators::{make_fix_delta, make_pureDP_to_zCDP, make_zCDP_to_approxDP};
use opendp::core::Measurement;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{L1Distance, L2Distance};
use renkei_protocol::{Mechanism, MicroEpsilon, MicroRho, PrivacyRequest};

/// The source of the noise's random bits in this build.
pub const RANDOMNESS: &str = if cfg!(feature = "openssl-rng") {
    "OpenSSL RAND_priv_bytes (opendp use-openssl)"
} else {
    "rand 0.7 thread_rng (ChaCha20 seeded from the OS)"
};

/// A failure inside the DP layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpError {
    #[error("opendp {variant}: {message}")]
    OpenDp { variant: String, message: String },
    #[error("cannot calibrate noise for {request} at sensitivity {sensitivity}")]
    Calibration {
        request: PrivacyRequest,
        sensitivity: f64,
    },
}

impl From<opendp::error::Error> for DpError {
    fn from(e: opendp::error::Error) -> Self {
        DpError::OpenDp {
            variant: e.variant.to_string(),
            message: e.message.unwrap_or_default(),
        }
    }
}

/// Serialises every call into opendp. opendp 0.16 silences panics by swapping the
/// process-wide panic hook around some arithmetic (`catch_unwind_silent`); two threads doing
/// that at once can leave the silent hook installed for good, and every later panic message
/// in the process would vanish. Calls are microseconds long, so one at a time costs nothing
/// that matters.
static OPENDP: Mutex<()> = Mutex::new(());

fn opendp_lock() -> MutexGuard<'static, ()> {
    // A poisoned lock only means another draw panicked; the guard protects no data.
    OPENDP.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every release is a vector of integers (one number is a vector of one).
type IntVectors = VectorDomain<AtomDomain<i64>>;

fn discrete_gaussian(
    scale: f64,
) -> Result<Measurement<IntVectors, L2Distance<f64>, ZeroConcentratedDivergence, Vec<i64>>, DpError>
{
    Ok(make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::default()),
        L2Distance::default(),
        scale,
        None,
    )?)
}

fn discrete_laplace(
    scale: f64,
) -> Result<Measurement<IntVectors, L1Distance<f64>, MaxDivergence, Vec<i64>>, DpError> {
    Ok(make_laplace::<_, _, MaxDivergence>(
        VectorDomain::new(AtomDomain::default()),
        L1Distance::default(),
        scale,
        None,
    )?)
}

/// Calibrations remembered, by (request, sensitivity bits, delta bits).
type CalibrationKey = (PrivacyRequest, u64, u64);

static CALIBRATIONS: LazyLock<Mutex<HashMap<CalibrationKey, Calibration>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Most calibrations remembered (researchers use few distinct privacy settings).
const CALIBRATION_CACHE: usize = 1024;

/// How many times calibration widens the scale to absorb floating-point rounding.
const MAX_WIDENINGS: usize = 16;

/// Relative widening per step: far below anything a researcher could notice.
const WIDENING: f64 = 1e-12;

/// A calibrated mechanism, described by plain numbers (so it can cross threads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub mechanism: Mechanism,
    /// Largest change one patient can make to the released numbers (L2 for the Gaussian, L1
    /// for the Laplace).
    pub sensitivity: f64,
    /// opendp's `scale` parameter of the mechanism.
    pub scale: f64,
    /// The cost in zCDP rho by opendp's privacy map, rounded up to a whole micro-rho.
    pub cost: MicroRho,
    /// The release as (epsilon, delta)-DP (delta 0 for pure DP).
    pub epsilon: f64,
    pub delta: f64,
    /// The exact standard deviation of the noise.
    pub noise_std: f64,
}

impl Calibration {
    /// Calibrates the mechanism the researcher asked for; `report_delta` is the delta at
    /// which a zCDP cost is also stated as (epsilon, delta). Calibration is a pure function
    /// of its inputs and costs about a millisecond of opendp arithmetic (the (epsilon,
    /// delta) conversion searches), so results are remembered.
    pub fn for_request(
        request: PrivacyRequest,
        sensitivity: f64,
        report_delta: f64,
    ) -> Result<Self, DpError> {
        let key = (request, sensitivity.to_bits(), report_delta.to_bits());
        if let Some(known) = CALIBRATIONS
            .lock()
            .ok()
            .and_then(|cache| cache.get(&key).copied())
        {
            return Ok(known);
        }
        let calibration = Self::calibrate(request, sensitivity, report_delta)?;
        if let Ok(mut cache) = CALIBRATIONS.lock() {
            if cache.len() >= CALIBRATION_CACHE {
                cache.clear();
            }
            cache.insert(key, calibration);
        }
        Ok(calibration)
    }

    fn calibrate(
        request: PrivacyRequest,
        sensitivity: f64,
        report_delta: f64,
    ) -> Result<Self, DpError> {
        match request {
            PrivacyRequest::Zcdp { rho } => Self::gaussian(sensitivity, rho, report_delta),
            PrivacyRequest::PureDp { epsilon } => Self::laplace(sensitivity, epsilon),
        }
    }

    /// The discrete Gaussian with the smallest scale whose cost (by opendp's map, rounded
    /// up to micro-rho) does not exceed `budget`. Starts from `scale = Δ / sqrt(2ρ)` and
    /// widens by a relative 1e-12 until the map agrees, so the charge is what was asked
    /// rather than one micro-rho more through rounding.
    pub fn gaussian(
        sensitivity: f64,
        budget: MicroRho,
        report_delta: f64,
    ) -> Result<Self, DpError> {
        let failed = || DpError::Calibration {
            request: PrivacyRequest::Zcdp { rho: budget },
            sensitivity,
        };
        if budget.0 == 0 || !(sensitivity.is_finite() && sensitivity > 0.0) {
            return Err(failed());
        }
        let d_in = sensitivity;
        let _opendp = opendp_lock();
        let mut scale = sensitivity / (2.0 * budget.as_rho()).sqrt();
        for _ in 0..MAX_WIDENINGS {
            let measurement = discrete_gaussian(scale)?;
            let cost = MicroRho::from_rho_ceil(measurement.map(&d_in)?).map_err(|_| failed())?;
            if cost <= budget {
                let approx = make_fix_delta(&make_zCDP_to_approxDP(measurement)?, report_delta)?;
                let (epsilon, delta) = approx.map(&d_in)?;
                return Ok(Self {
                    mechanism: Mechanism::DiscreteGaussian,
                    sensitivity,
                    scale,
                    cost,
                    epsilon,
                    delta,
                    noise_std: discrete_gaussian_std(scale),
                });
            }
            scale *= 1.0 + WIDENING;
        }
        Err(failed())
    }

    /// The discrete Laplace with the smallest scale that is `epsilon`-DP by opendp's map and
    /// whose zCDP cost by `make_pureDP_to_zCDP` (epsilon² / 2, rounded up to micro-rho) is
    /// that of the epsilon asked; widened like [`Calibration::gaussian`] to absorb rounding.
    pub fn laplace(sensitivity: f64, epsilon: MicroEpsilon) -> Result<Self, DpError> {
        let failed = || DpError::Calibration {
            request: PrivacyRequest::PureDp { epsilon },
            sensitivity,
        };
        if epsilon.0 == 0 || !(sensitivity.is_finite() && sensitivity > 0.0) {
            return Err(failed());
        }
        let d_in = sensitivity;
        // epsilon² / 2 in micro-rho, exactly, rounded up: (ε·10⁶)² / (2·10⁶).
        let per = u128::from(MicroEpsilon::PER_UNIT);
        let target = u64::try_from((u128::from(epsilon.0).pow(2)).div_ceil(2 * per))
            .map(MicroRho)
            .map_err(|_| failed())?;
        let _opendp = opendp_lock();
        let mut scale = sensitivity / epsilon.as_f64();
        for _ in 0..MAX_WIDENINGS {
            let measurement = discrete_laplace(scale)?;
            let spent = measurement.map(&d_in)?;
            let rho = make_pureDP_to_zCDP(measurement)?.map(&d_in)?;
            let cost = MicroRho::from_rho_ceil(rho).map_err(|_| failed())?;
            if MicroEpsilon::from_f64_ceil(spent).map_err(|_| failed())? <= epsilon
                && cost <= target
            {
                return Ok(Self {
                    mechanism: Mechanism::DiscreteLaplace,
                    sensitivity,
                    scale,
                    cost,
                    epsilon: spent,
                    delta: 0.0,
                    noise_std: discrete_laplace_std(scale),
                });
            }
            scale *= 1.0 + WIDENING;
        }
        Err(failed())
    }

    /// A discrete Gaussian of a given `scale` (a node's share of distributed noise); its
    /// `cost` and `epsilon` are those of the total it contributes to, set by the caller.
    pub fn share(scale: f64, sensitivity: f64, report_delta: f64) -> Result<Self, DpError> {
        {
            let _opendp = opendp_lock();
            discrete_gaussian(scale)?;
        }
        Ok(Self {
            mechanism: Mechanism::DiscreteGaussian,
            sensitivity,
            scale,
            cost: MicroRho(0),
            epsilon: f64::INFINITY,
            delta: report_delta,
            noise_std: discrete_gaussian_std(scale),
        })
    }

    /// Draws noisy values for `true_values` (independent noise on each). Call only after
    /// the cost is on disk.
    pub fn release(&self, true_values: Vec<i64>) -> Result<Vec<i64>, DpError> {
        let _opendp = opendp_lock();
        match self.mechanism {
            Mechanism::DiscreteGaussian => Ok(discrete_gaussian(self.scale)?.invoke(&true_values)?),
            Mechanism::DiscreteLaplace => Ok(discrete_laplace(self.scale)?.invoke(&true_values)?),
        }
    }

    /// Draws one noisy value.
    pub fn release_one(&self, true_value: i64) -> Result<i64, DpError> {
        self.release(vec![true_value])?
            .pop()
            .ok_or_else(|| DpError::OpenDp {
                variant: "FailedFunction".into(),
                message: "the mechanism returned nothing".into(),
            })
    }

    /// One mechanism per released part, sharing one request's privacy: each gets an equal
    /// share of the rho (or epsilon), the last the remainder, so together they cost no more
    /// than asked (a mean's sum and count get half each).
    pub fn split(
        request: PrivacyRequest,
        sensitivities: &[f64],
        report_delta: f64,
    ) -> Result<Vec<Self>, DpError> {
        let shares =
            |total: u64| renkei_engine::statistic::split_budget(total, sensitivities.len());
        let requests: Vec<PrivacyRequest> = match request {
            PrivacyRequest::Zcdp { rho } => shares(rho.0)
                .into_iter()
                .map(|r| PrivacyRequest::Zcdp { rho: MicroRho(r) })
                .collect(),
            PrivacyRequest::PureDp { epsilon } => shares(epsilon.0)
                .into_iter()
                .map(|e| PrivacyRequest::PureDp {
                    epsilon: MicroEpsilon(e),
                })
                .collect(),
        };
        requests
            .into_iter()
            .zip(sensitivities)
            .map(|(request, sensitivity)| Self::for_request(request, *sensitivity, report_delta))
            .collect()
    }
}

/// Standard deviation of the discrete Gaussian with parameter `scale` (slightly below
/// `scale` for small scales), by summing its mass function. From scale 10 on it is `scale`
/// to within a relative `e^(−2π²·100)` (Poisson summation: the variance falls short of
/// `scale²` by terms in `e^(−2π²·scale²)`), so the sum, whose length grows with the scale
/// (a regression's fixed-point numbers have scales in the millions), is not needed.
pub fn discrete_gaussian_std(scale: f64) -> f64 {
    if scale <= 0.0 {
        return 0.0;
    }
    if scale >= 10.0 {
        return scale;
    }
    // Beyond 40 sigma the mass is below 1e-340: nothing left to add.
    let reach = (40.0 * scale).ceil() as i64 + 1;
    let (mut mass, mut second_moment) = (1.0, 0.0);
    for x in 1..=reach {
        let weight = (-(x as f64).powi(2) / (2.0 * scale * scale)).exp();
        mass += 2.0 * weight;
        second_moment += 2.0 * (x as f64).powi(2) * weight;
    }
    (second_moment / mass).sqrt()
}

/// Standard deviation of the discrete Laplace with parameter `scale`:
/// variance `2 e^(-1/s) / (1 - e^(-1/s))^2`.
pub fn discrete_laplace_std(scale: f64) -> f64 {
    if scale <= 0.0 {
        return 0.0;
    }
    let p = (-1.0 / scale).exp();
    (2.0 * p).sqrt() / (1.0 - p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_discrete_gaussian_sd_meets_the_scale_where_the_sum_is_skipped() {
        // Just below the threshold the sum and the scale agree to rounding.
        let below = discrete_gaussian_std(9.999_999);
        assert!((below - 9.999_999).abs() < 1e-9, "{below}");
        assert_eq!(discrete_gaussian_std(2.5e7), 2.5e7);
        assert!(discrete_gaussian_std(0.3) < 0.3);
    }

    #[test]
    fn gaussian_cost_matches_the_requested_rho_and_the_closed_form() {
        for micro in [1_000u64, 10_000, 50_000, 123_457, 1_000_000] {
            let c = Calibration::gaussian(1.0, MicroRho(micro), 1e-6).unwrap();
            assert_eq!(c.cost, MicroRho(micro));
            // rho = Δ² / (2σ²)
            let rho = 1.0 / (2.0 * c.scale * c.scale);
            assert!((rho - MicroRho(micro).as_rho()).abs() < 1e-9, "{rho}");
        }
        let c = Calibration::gaussian(3.0, MicroRho(50_000), 1e-6).unwrap();
        assert!((c.scale - 3.0 / 0.1f64.sqrt()).abs() < 1e-6);
    }

    /// Numbers recorded from the opendp Python package 0.16.0 (`scripts/opendp_crosscheck.py`):
    /// `make_gaussian(atom_domain(T=int), absolute_distance(T=int), scale)`, its map at 1, and
    /// `make_fix_delta(make_zCDP_to_approxDP(m), 1e-6).map(1)`.
    #[test]
    fn matches_the_opendp_python_package() {
        let recorded = [
            (50_000u64, 3.162277660168379, 1.4715947505324165),
            (500_000, 1.0, 5.22153444453017),
            (10_000, 7.0710678118654755, 0.6216926545596027),
        ];
        for (micro, scale, epsilon) in recorded {
            let c = Calibration::gaussian(1.0, MicroRho(micro), 1e-6).unwrap();
            assert!(
                (c.scale - scale).abs() / scale < 1e-9,
                "{micro}: {} vs {scale}",
                c.scale
            );
            assert!(
                (c.epsilon - epsilon).abs() < 1e-6,
                "{micro}: {} vs {epsilon}",
                c.epsilon
            );
            assert_eq!(c.delta, 1e-6);
        }
        // make_laplace(atom_domain(T=int), absolute_distance(T=int), 2.0).map(1) == 0.5
        let c = Calibration::laplace(1.0, MicroEpsilon(500_000)).unwrap();
        assert!((c.scale - 2.0).abs() < 1e-9);
        assert!((c.epsilon - 0.5).abs() < 1e-9);
        // pure 0.5-DP is 0.125-zCDP; 0.4 is 0.08 (where floating point rounds up).
        assert_eq!(c.cost, MicroRho(125_000));
        let c = Calibration::laplace(1.0, MicroEpsilon(400_000)).unwrap();
        assert_eq!(c.cost, MicroRho(80_000));
    }

    #[test]
    fn split_mechanisms_together_cost_what_was_asked() {
        for parts in 1..=4 {
            let sensitivities = vec![1.0; parts];
            let split = Calibration::split(
                PrivacyRequest::Zcdp {
                    rho: MicroRho(50_001),
                },
                &sensitivities,
                1e-6,
            )
            .unwrap();
            assert_eq!(split.len(), parts);
            assert_eq!(
                split.iter().map(|c| c.cost.0).sum::<u64>(),
                50_001,
                "{parts}"
            );
            let pure = Calibration::split(
                PrivacyRequest::PureDp {
                    epsilon: MicroEpsilon(1_000_000),
                },
                &sensitivities,
                1e-6,
            )
            .unwrap();
            let epsilon: f64 = pure.iter().map(|c| c.epsilon).sum();
            assert!(epsilon <= 1.0 + 1e-9, "{parts}: {epsilon}");
        }
    }

    #[test]
    fn nonsense_budgets_are_refused() {
        assert!(Calibration::gaussian(1.0, MicroRho(0), 1e-6).is_err());
        assert!(Calibration::gaussian(0.0, MicroRho(10), 1e-6).is_err());
        assert!(Calibration::laplace(1.0, MicroEpsilon(0)).is_err());
    }

    #[test]
    fn noise_standard_deviations() {
        // Large scales: the discrete distributions approach their continuous moments.
        assert!((discrete_gaussian_std(10.0) - 10.0).abs() < 1e-9);
        assert!((discrete_laplace_std(50.0) - 50.0 * 2f64.sqrt()).abs() < 0.01);
        // Small scales: strictly less than the continuous ones.
        assert!(discrete_gaussian_std(0.3) < 0.3);
    }
}
