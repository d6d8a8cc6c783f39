//! The 95% interval the aggregator reports covers the truth about 95% of the time, using
//! the node's own mechanism (through opendp) and the aggregator's own combination.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_aggregator::combine::combine;
use renkei_aggregator::federation::NodeAnswer;
use renkei_node::privacy::dp::Calibration;
use renkei_protocol::{Filter, MicroRho, PrivacyRequest, Query, Release};

fn node_answer(calibration: &Calibration, value: i64) -> NodeAnswer {
    NodeAnswer {
        node: "node".into(),
        institution: "Hospital".into(),
        value: Some(value as f64),
        suppressed: false,
        min_cell_size: 0,
        release: Release::Scalar {
            value,
            suppressed: false,
        },
        value_scale: 0,
        mechanism: calibration.mechanism,
        sensitivity: calibration.sensitivity,
        noise_scale: calibration.scale,
        noise_std: calibration.noise_std,
        count_noise_std: None,
        ci95: None,
        rho: calibration.cost,
        epsilon: calibration.epsilon,
        delta: calibration.delta,
        budget_remaining: MicroRho(0),
    }
}

fn coverage(request: PrivacyRequest, truths: &[i64], trials: usize) -> f64 {
    let calibration = Calibration::for_request(request, 1.0, 1e-6).expect("calibrates");
    let total: i64 = truths.iter().sum();
    let mut covered = 0;
    for _ in 0..trials {
        let answers: Vec<NodeAnswer> = truths
            .iter()
            .map(|truth| {
                node_answer(
                    &calibration,
                    calibration.release_one(*truth).expect("draws"),
                )
            })
            .collect();
        let [low, high] = combine(&Query::count_patients("patients", Filter::True), &answers)
            .expect("answers")
            .ci95
            .expect("an interval");
        covered += usize::from(low <= total as f64 && total as f64 <= high);
    }
    covered as f64 / trials as f64
}

#[test]
fn the_interval_covers_the_truth_about_95_percent_of_the_time() {
    // 2000 trials: the binomial sd of the coverage is 0.005, so ±0.02 is four sd.
    let gaussian = coverage(
        PrivacyRequest::Zcdp {
            rho: MicroRho(20_000),
        },
        &[120, 340, 75],
        2_000,
    );
    assert!((0.93..=0.97).contains(&gaussian), "coverage {gaussian}");
    let laplace = coverage(
        PrivacyRequest::PureDp {
            epsilon: renkei_protocol::MicroEpsilon(300_000),
        },
        &[120, 340, 75, 410, 9],
        2_000,
    );
    // A sum of five discrete Laplace draws is close enough to normal for a 95% interval.
    assert!((0.93..=0.97).contains(&laplace), "coverage {laplace}");
}
