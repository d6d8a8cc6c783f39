//! Regressions over real nodes. A linear fit whose true coefficients the generator fixes
//! (hypertension's prevalence rises linearly with age from 20), per site and as a secure
//! total; a logistic fit by Newton steps over the network, each step one signed request
//! bound to the first, charged once; and the steps a node refuses (a fit it never accepted,
//! a step past the last, a step answered twice, another question under the fit's name).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use renkei_aggregator::results::Regression;
use renkei_aggregator::{AnswerMode, FederatedAnswer, PreparedQuery, QueryOptions, sql};
use renkei_protocol::{Aggregate, FitStep, MicroRho, PrivacyRequest, RefusalCode, RequestId};
use renkei_testnet::synth::TrueValue;
use renkei_tests::{researcher, start_testnet, within};

const BUDGET: MicroRho = MicroRho(100 * MicroRho::PER_RHO);

/// In the generator, P(hypertension) = 0.25 + 0.008 (age − 50) with no clamp from age 20,
/// independently of diabetes and sex.
const LINEAR: &str = "SELECT LINEAR_REGRESSION(hypertension, age, diabetes, sex = 'male') \
    FROM patients WHERE age >= 20";
const LINEAR_TRUTH: [f64; 4] = [-0.15, 0.008, 0.0, 0.0];

const LOGISTIC: &str = "SELECT LOGISTIC_REGRESSION(severity IN ('severe', 'critical'), \
    age, diabetes, hypertension, sex = 'male', iterations => 10) FROM patients";

/// What the dev researcher has spent on `study` at node `index`.
fn spent(
    testnet: &renkei_testnet::Testnet,
    index: usize,
    session: &renkei_aggregator::ResearcherSession,
    study: &str,
) -> MicroRho {
    testnet
        .running(index)
        .unwrap()
        .desk()
        .ledger()
        .spent(&session.key().public_key(), study)
        .unwrap()
}

fn fit(answer: &FederatedAnswer) -> &Regression {
    answer
        .regression
        .as_ref()
        .unwrap_or_else(|| panic!("no fit: {answer:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regressions_per_site_and_as_secure_totals() {
    let fixture = start_testnet(3, 6_000, BUDGET).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let nodes = testnet.addresses();
    let mut options = QueryOptions {
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(1_000_000),
        },
        deadline: Duration::from_secs(10),
        ..session.default_options().unwrap()
    };

    // Linear, with known coefficients: each within four standard errors of the truth,
    // the noise's share smaller than the whole.
    for secure in [false, true] {
        options.secure = secure;
        let answer = within("a linear fit", session.query(&nodes, LINEAR, &options))
            .await
            .unwrap();
        assert_eq!(answer.answered.len(), 3, "{answer:#?}");
        assert_eq!(answer.aggregate, "linear_regression");
        let linear = fit(&answer);
        assert_eq!(linear.coefficients.len(), 4);
        for (c, truth) in linear.coefficients.iter().zip(LINEAR_TRUTH) {
            assert!(
                (c.estimate - truth).abs() < 4.0 * c.std_error,
                "{c:?} vs {truth} (secure {secure})"
            );
            assert!(c.noise_std_error > 0.0 && c.noise_std_error < c.std_error);
            assert!(c.ci95[0] < c.estimate && c.estimate < c.ci95[1]);
        }
        assert!(linear.coefficients[1].p_value < 1e-6, "age matters");
        for node in &answer.answered {
            assert_eq!(node.rho, MicroRho(1_000_000));
        }
    }

    // Logistic: ten Newton steps, each one request; the first charged for the whole fit.
    let query = sql::compile(LOGISTIC).unwrap();
    let TrueValue::Coefficients(pooled) = testnet.true_value(&query) else {
        panic!("a pooled fit");
    };
    for secure in [false, true] {
        options.secure = secure;
        let answer = within("a logistic fit", session.query(&nodes, LOGISTIC, &options))
            .await
            .unwrap();
        assert_eq!(
            answer.mode,
            if secure {
                AnswerMode::Secure
            } else {
                AnswerMode::PerSite
            }
        );
        let logistic = fit(&answer);
        assert_eq!((logistic.steps, logistic.iterations), (10, 10));
        assert!(logistic.converged, "{logistic:#?}");
        // The network's fit lies within its noise of the pooled fit.
        for (c, truth) in logistic.coefficients.iter().zip(&pooled) {
            assert!(
                (c.estimate - truth).abs() < 4.0 * c.noise_std_error + 1e-9,
                "{c:?} vs pooled {truth} (secure {secure})"
            );
            assert!(c.odds_ratio.is_some() || c.term == "intercept");
        }
        let steps = answer.fit.as_ref().unwrap();
        assert_eq!(steps.requests.len(), 10);
        let total: f64 = steps.rho_per_step.iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(
            (steps.rho_per_step[9] - 0.5).abs() < 1e-4,
            "the last step takes half"
        );
        // Charged at the first step, for the whole fit; the last step's answers cost 0.
        for (_, rho) in &steps.rho_charged {
            assert!((rho - 1.0).abs() < 1e-3, "{steps:?}");
        }
        for node in &answer.answered {
            assert_eq!(node.rho, MicroRho(0), "a later step charges nothing");
        }
    }
    // Two linear fits of 1 and two logistic fits of 1 at every node: nothing more.
    for index in 0..nodes.len() {
        let spent = spent(testnet, index, &session, &options.study);
        assert!(
            (spent.as_rho() - 4.0).abs() < 0.01,
            "node {index} spent {spent}"
        );
    }
    fixture.testnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_steps_of_no_fit_they_accepted() {
    let fixture = start_testnet(2, 600, BUDGET).await;
    let testnet = &fixture.testnet;
    let session = researcher(testnet).await;
    let nodes = testnet.addresses();
    let options = QueryOptions {
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(100_000),
        },
        deadline: Duration::from_secs(10),
        ..session.default_options().unwrap()
    };
    let key = session.key();
    let sign = |query, options: &QueryOptions| {
        PreparedQuery::sign(
            key,
            query,
            options,
            None,
            &nodes,
            renkei_protocol::unix_now(),
        )
        .unwrap()
    };
    let ask = |prepared: PreparedQuery| {
        let session = &session;
        let nodes = &nodes;
        async move {
            // One node, one step: the fit's loop is not run for a later step.
            renkei_aggregator::fan_out(
                session.client(),
                session.policy(),
                &nodes[..1],
                &prepared,
                session.key(),
                Duration::from_secs(10),
            )
            .await
            .unwrap()
        }
    };
    let with_step = |step: FitStep| {
        let mut query = sql::compile(LOGISTIC).unwrap();
        if let Aggregate::LogisticRegression { step: s, .. } = &mut query.aggregate {
            *s = step;
        }
        query
    };
    let refused = |answer: &FederatedAnswer| -> (RefusalCode, String) {
        let r = answer
            .refused
            .first()
            .unwrap_or_else(|| panic!("{answer:#?}"));
        (r.code, r.reason.clone())
    };
    let coefficients = vec![-2_000_000, 0, 0, 0, 0];

    // A step naming a fit no node accepted.
    let forged = with_step(FitStep {
        fit: Some(RequestId([9; 16])),
        iteration: 1,
        coefficients: coefficients.clone(),
    });
    let answer = within("a forged step", ask(sign(forged, &options))).await;
    let (code, reason) = refused(&answer);
    assert_eq!(code, RefusalCode::FitStepRefused, "{reason}");
    assert!(reason.contains("never accepted"), "{reason}");

    // Open a fit at the first node only: its first step, sent alone (the aggregator's
    // fan-out would go on with the later steps itself).
    let opening = sign(with_step(FitStep::default()), &options);
    let encoded = renkei_protocol::EncodedRequest::encode(&opening.envelope).unwrap();
    let opened = within(
        "a fit's first step",
        session.client().ask(
            nodes[0].peer_id,
            nodes[0].address.clone(),
            encoded,
            Duration::from_secs(10),
        ),
    )
    .await
    .unwrap();
    assert!(
        matches!(opened, renkei_protocol::QueryResponse::Answered(_)),
        "{opened:?}"
    );
    assert_eq!(
        spent(testnet, 0, &session, &options.study),
        MicroRho(100_000)
    );
    let step = |iteration| FitStep {
        fit: Some(opening.request.request_id),
        iteration,
        coefficients: coefficients.clone(),
    };
    // Step 1, then step 1 again under another request: refused, a step is released once.
    let first = sign(with_step(step(1)), &options);
    let answer = within("step 1", ask(first.clone())).await;
    assert_eq!(answer.answered.len(), 1, "{answer:#?}");
    assert_eq!(answer.answered[0].rho, MicroRho(0));
    // Its resend is the same answer, not fresh noise.
    let resent = within("step 1 resent", ask(first)).await;
    assert_eq!(resent.answered[0].release, answer.answered[0].release);
    let again = within("step 1 again", ask(sign(with_step(step(1)), &options))).await;
    let (code, reason) = refused(&again);
    assert_eq!(code, RefusalCode::FitStepRefused);
    assert!(reason.contains("already answered"), "{reason}");
    // Another question under the fit's name, and another privacy.
    let mut other = with_step(step(2));
    other.filter = renkei_protocol::Filter::eq("diabetes", renkei_protocol::Literal::Bool(true));
    let answer = within("another question", ask(sign(other, &options))).await;
    let (code, reason) = refused(&answer);
    assert_eq!(code, RefusalCode::FitStepRefused);
    assert!(reason.contains("another question"), "{reason}");
    let cheaper = QueryOptions {
        privacy: PrivacyRequest::Zcdp {
            rho: MicroRho(200_000),
        },
        ..options.clone()
    };
    let answer = within("another privacy", ask(sign(with_step(step(2)), &cheaper))).await;
    assert_eq!(refused(&answer).0, RefusalCode::FitStepRefused);
    // A step past the fit's last is a malformed query (iterations => 10: steps 0 to 9).
    let answer = within("a step too far", ask(sign(with_step(step(10)), &options))).await;
    assert_eq!(
        refused(&answer).0,
        RefusalCode::MalformedRequest,
        "{answer:#?}"
    );
    // Nothing of this was charged beyond the fit's opening.
    assert_eq!(
        spent(testnet, 0, &session, &options.study),
        MicroRho(100_000)
    );
    fixture.testnet.shutdown().await;
}
