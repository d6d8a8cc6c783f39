//! The demo, as `renkei-testnet demo` runs it: every question answered by all three
//! hospitals, the last ones as secure totals, and the estimates where the truth is.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use renkei_aggregator::AnswerMode;
use renkei_testnet::demo::{self, DEMO_QUERIES, SECURE_DEMO_QUERIES};
use renkei_testnet::synth::TrueValue;
use renkei_tests::within;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_answers_every_question() {
    let dir = tempfile::tempdir().unwrap();
    let rows = within("the demo", demo::run(dir.path(), 1_500, 7))
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        DEMO_QUERIES.len() + SECURE_DEMO_QUERIES.len() + 1
    );
    let mut outside = 0;
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(
            row.answered.len(),
            3,
            "{}: {:?}",
            row.sql,
            row.missing_or_refused
        );
        let secure = index >= DEMO_QUERIES.len();
        assert_eq!(
            row.mode,
            if secure {
                AnswerMode::Secure
            } else {
                AnswerMode::PerSite
            },
            "{}",
            row.sql
        );
        match (&row.truth, row.ci95) {
            (TrueValue::Number(truth), Some([low, high])) => {
                // Widened 2x: a 95% interval misses now and then; this one should not.
                let half = (high - low) / 2.0;
                let middle = (high + low) / 2.0;
                if (truth - middle).abs() > 2.0 * half {
                    outside += 1;
                }
            }
            (TrueValue::Groups(_), None) => assert!(!row.groups.is_empty(), "{}", row.sql),
            (TrueValue::Curves(truth), None) => {
                let survival = row.survival.as_ref().unwrap();
                assert_eq!(survival.strata.len(), truth.len(), "{}", row.sql);
                for (labels, exact) in truth {
                    let curve = survival.strata.iter().find(|c| &c.group == labels).unwrap();
                    // Widened 2x around the band, at the horizon.
                    let (low, high) = (curve.ci95_low[60], curve.ci95_high[60]);
                    let (middle, half) = ((low + high) / 2.0, (high - low) / 2.0);
                    if (exact[60] - middle).abs() > 2.0 * half {
                        outside += 1;
                    }
                }
            }
            (TrueValue::Coefficients(pooled), None) => {
                let fit = row
                    .regression
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: {:?}", row.sql, row.note));
                assert!(fit.converged, "{}", row.sql);
                for (c, truth) in fit.coefficients.iter().zip(pooled) {
                    // Widened 2x around the interval.
                    let (middle, half) =
                        ((c.ci95[0] + c.ci95[1]) / 2.0, (c.ci95[1] - c.ci95[0]) / 2.0);
                    if (truth - middle).abs() > 2.0 * half {
                        outside += 1;
                    }
                }
            }
            (truth, ci) => panic!("{}: truth {truth:?}, interval {ci:?}", row.sql),
        }
    }
    assert!(outside <= 1, "{outside} estimates far from the truth");
}
