//! Printing a federated answer for people (a table) and for scripts (CSV); `--format json`
//! is the serde form of [`FederatedAnswer`]. Writes to any writer, so the command line and
//! other front ends print the same thing.

use std::io::{self, Write};

use crate::results::{AnswerMode, FederatedAnswer, FitSteps, Model, Regression, Survival};

/// The answer as a table for people.
pub fn table(answer: &FederatedAnswer, out: &mut dyn Write) -> io::Result<()> {
    let asked =
        answer.answered.len() + answer.quotes.len() + answer.missing.len() + answer.refused.len();
    writeln!(out, "query     {}", answer.query)?;
    writeln!(
        out,
        "study     {}   (request {})",
        answer.study, answer.request_id
    )?;
    writeln!(
        out,
        "mode      {}{}",
        answer.mode,
        match answer.mode {
            AnswerMode::Secure => "   (only the network-wide total was readable)",
            AnswerMode::PerSite => "",
        }
    )?;
    let partial = if !answer.recovered_without.is_empty() {
        format!(
            "   (PARTIAL: the total of the nodes that contributed, read without {} that dropped out)",
            answer.recovered_without.len()
        )
    } else if answer.is_partial() {
        "   (PARTIAL: not every node answered)".to_string()
    } else {
        String::new()
    };
    if answer.dry_run {
        writeln!(
            out,
            "dry run   nothing was spent; what the query would cost:"
        )?;
        for q in &answer.quotes {
            writeln!(
                out,
                "  {:<24} {}  rho {} (eps {:.3}, delta {:e})  {} sd {:.2}  budget left {} -> {}",
                q.institution,
                q.node,
                q.rho,
                q.epsilon,
                q.delta,
                q.mechanism,
                q.noise_std,
                q.budget_remaining,
                q.budget_after
            )?;
        }
    }
    match (answer.estimate, answer.ci95, answer.std_dev) {
        _ if answer.dry_run => {}
        (Some(estimate), Some([low, high]), Some(sd)) => writeln!(
            out,
            "estimate  {estimate}   95% CI [{low:.2}, {high:.2}]   sd {sd:.3}{partial}"
        )?,
        _ if answer.survival.is_some() => {
            if let Some(survival) = &answer.survival {
                survival_table(survival, &partial, out)?;
            }
        }
        _ if answer.regression.is_some() => {
            if let Some(fit) = &answer.regression {
                regression_table(fit, answer.fit.as_ref(), &partial, out)?;
            }
            if let Some(note) = &answer.note {
                writeln!(out, "  note: {note}")?;
            }
        }
        _ if !answer.groups.is_empty() => {
            writeln!(out, "groups    {} cells{partial}", answer.groups.len())?;
            for group in &answer.groups {
                writeln!(
                    out,
                    "  {:<32} {:>8}   95% CI [{:.1}, {:.1}]{}",
                    group.group.join(" / "),
                    group.estimate.to_string(),
                    group.ci95[0],
                    group.ci95[1],
                    match (&group.note, group.withheld_by) {
                        (Some(note), _) => format!("   ({note})"),
                        (None, 0) => String::new(),
                        (None, withheld) =>
                            format!("   ({withheld} node(s) below the minimum cell)"),
                    }
                )?;
            }
        }
        _ => match &answer.note {
            Some(note) => writeln!(out, "estimate  none: {note}")?,
            None => writeln!(out, "estimate  none: no node answered")?,
        },
    }
    let spent: u64 = answer.answered.iter().map(|a| a.rho.0).max().unwrap_or(0);
    if answer.dry_run {
        writeln!(
            out,
            "quoted    {} of {asked} node(s); nothing was spent",
            answer.quotes.len()
        )?;
    } else if let Some(fit) = &answer.fit {
        // A fit's later steps are charged nothing: what each node charged was at the first.
        let charged = fit
            .rho_charged
            .iter()
            .map(|(_, rho)| *rho)
            .fold(0.0, f64::max);
        writeln!(
            out,
            "answered  {} of {asked} node(s) at the last of {} step(s); privacy spent at each: rho {charged} (all of it at the fit's first step)",
            answer.answered.len(),
            fit.requests.len()
        )?;
    } else {
        writeln!(
            out,
            "answered  {} of {asked} node(s); privacy spent at each: rho {}",
            answer.answered.len(),
            renkei_protocol::MicroRho(spent)
        )?;
    }
    for a in &answer.answered {
        let value = match (a.suppressed, a.value) {
            (true, _) => format!("<{}", a.min_cell_size),
            (false, Some(value)) => format!("{value}"),
            (false, None) => "-".into(),
        };
        writeln!(
            out,
            "  {:<24} {}  value {:>8}  {} sd {:.2}  rho {} (eps {:.3}, delta {:e})  budget left {}",
            a.institution,
            a.node,
            value,
            a.mechanism,
            a.noise_std,
            a.rho,
            a.epsilon,
            a.delta,
            a.budget_remaining
        )?;
    }
    if !answer.refused.is_empty() {
        writeln!(out, "refused   {}", answer.refused.len())?;
        for r in &answer.refused {
            writeln!(
                out,
                "  {:<24} {}  {}: {}",
                r.institution, r.node, r.code, r.reason
            )?;
        }
    }
    if !answer.missing.is_empty() {
        writeln!(out, "missing   {}", answer.missing.len())?;
        for m in &answer.missing {
            writeln!(out, "  {} {}  {}", m.node, m.address, m.reason)?;
        }
    }
    Ok(())
}

/// A fit as a table: one row per coefficient (estimate, standard error with the noise's
/// share, 95% interval, p-value; odds ratios for a logistic fit), then the patients, the
/// steps and the budget's split over them.
fn regression_table(
    fit: &Regression,
    steps: Option<&FitSteps>,
    partial: &str,
    out: &mut dyn Write,
) -> io::Result<()> {
    let logistic = fit.model == Model::Logistic;
    writeln!(
        out,
        "fit       {} regression over about {:.0} patients{partial}",
        match fit.model {
            Model::Linear => "linear",
            Model::Logistic => "logistic",
        },
        fit.patients
    )?;
    writeln!(
        out,
        "  {:<28} {:>11} {:>10} {:>10}  {:<25} {:>8}{}",
        "term",
        "estimate",
        "std err",
        "(noise)",
        "95% CI",
        "p",
        if logistic {
            "   odds ratio [95% CI]"
        } else {
            ""
        }
    )?;
    for c in &fit.coefficients {
        let interval = format!("[{:.4}, {:.4}]", c.ci95[0], c.ci95[1]);
        let odds = match (c.odds_ratio, c.odds_ratio_ci95) {
            (Some(or), Some([low, high])) => format!("   {or:.3} [{low:.3}, {high:.3}]"),
            _ => String::new(),
        };
        writeln!(
            out,
            "  {:<28} {:>11.5} {:>10.5} {:>10.5}  {:<25} {:>8.4}{odds}",
            c.term, c.estimate, c.std_error, c.noise_std_error, interval, c.p_value
        )?;
    }
    if let Some(residual) = fit.residual_std {
        writeln!(out, "  residual sd {residual:.4}")?;
    }
    writeln!(
        out,
        "  {} of {} step(s){}; noise sd per released number {:.3} (scaled design)",
        fit.steps,
        fit.iterations,
        if fit.converged {
            ", converged"
        } else {
            ", NOT converged (the last step moved further than its noise explains)"
        },
        fit.noise_std
    )?;
    if let Some(steps) = steps {
        writeln!(
            out,
            "  budget per step: {}",
            steps
                .rho_per_step
                .iter()
                .map(|rho| format!("{rho:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    Ok(())
}

/// Days a printed curve shows: every week, and the horizon.
const SURVIVAL_STEP_DAYS: usize = 7;

/// A survival curve per stratum as a table: day, S(t), its 95% band and the numbers at
/// risk (below the minimum cell size shown as withheld), then median survival and the
/// log-rank test.
fn survival_table(survival: &Survival, partial: &str, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "survival  Kaplan–Meier to day {} over {} stratum/strata{partial}   (tree: branching {}, {} levels; node noise sd {:.2})",
        survival.horizon_days,
        survival.strata.len(),
        survival.tree.branching,
        survival.tree.levels,
        survival.node_noise_std
    )?;
    for curve in &survival.strata {
        let name = if curve.group.is_empty() {
            "all patients".to_string()
        } else {
            curve.group.join(" / ")
        };
        let until = match curve.estimated_until {
            Some(day) if day + 1 < curve.day.len() => {
                format!("; estimated to day {day}, too few at risk after it")
            }
            Some(_) => String::new(),
            None => "; too few at risk to estimate".to_string(),
        };
        let patients = curve.patients.map_or_else(
            || "fewer patients than the minimum cell size".to_string(),
            |n| format!("about {n} patients"),
        );
        writeln!(out, "  {name}   ({patients}{until})")?;
        writeln!(
            out,
            "    {:>5}  {:>6}  {:<17}  {:>8}",
            "day", "S(t)", "95% band", "at risk"
        )?;
        for day in (0..curve.day.len())
            .filter(|d| d % SURVIVAL_STEP_DAYS == 0 || *d + 1 == curve.day.len())
        {
            writeln!(
                out,
                "    {:>5}  {:>6.3}  [{:.3}, {:.3}]    {:>8}",
                curve.day[day],
                curve.survival[day],
                curve.ci95_low[day],
                curve.ci95_high[day],
                curve.at_risk[day].map_or_else(|| "withheld".to_string(), |n| n.to_string())
            )?;
        }
        let day = |d: Option<usize>| d.map_or_else(|| "not reached".to_string(), |d| d.to_string());
        writeln!(
            out,
            "    median survival  {}   95% CI [{}, {}]",
            day(curve.median_day),
            day(curve.median_ci95[0]),
            day(curve.median_ci95[1])
        )?;
    }
    if let Some(test) = &survival.log_rank {
        writeln!(
            out,
            "  log-rank  chi2 {:.3}  p {:.4}   (O−E {:.2}; variance {:.2} of which noise {:.2})",
            test.statistic,
            test.p_value,
            test.observed_minus_expected,
            test.variance + test.noise_variance,
            test.noise_variance
        )?;
    }
    Ok(())
}

/// One CSV table for scripts: the estimate rows (one per group, or one; a survival curve:
/// one `survival` row per stratum and day, with `day` and `at_risk`), then one row per
/// node that answered, refused or was missing.
pub fn csv(answer: &FederatedAnswer, out: &mut dyn Write) -> Result<(), csv::Error> {
    let mut out = csv::Writer::from_writer(out);
    // `day` and `at_risk` are columns only when there is a survival curve, and a fit's
    // columns only for a regression, so every other answer's table keeps its columns.
    let extra = match answer.aggregate.as_str() {
        "kaplan_meier" => Extra::Survival,
        "linear_regression" | "logistic_regression" => Extra::Regression,
        _ => Extra::None,
    };
    let mut write = |fields: [&str; 14], fit: [&str; 5]| -> Result<(), csv::Error> {
        let mut row: Vec<&str> = fields[..12].to_vec();
        match extra {
            Extra::Survival => row.extend_from_slice(&fields[12..]),
            Extra::Regression => row.extend_from_slice(&fit),
            Extra::None => {}
        }
        out.write_record(&row)
    };
    write(
        [
            "row",
            "group",
            "node",
            "estimate",
            "ci95_low",
            "ci95_high",
            "std_dev",
            "rho",
            "code",
            "reason",
            "mode",
            "budget_remaining",
            "day",
            "at_risk",
        ],
        [
            "noise_std_error",
            "p_value",
            "odds_ratio",
            "odds_ratio_ci95_low",
            "odds_ratio_ci95_high",
        ],
    )?;
    let mode = answer.mode.to_string();
    let number = |x: Option<f64>| x.map(|x| x.to_string()).unwrap_or_default();
    if let Some(survival) = &answer.survival {
        for curve in &survival.strata {
            for day in 0..curve.day.len() {
                write(
                    [
                        "survival",
                        &curve.group.join("/"),
                        "",
                        &curve.survival[day].to_string(),
                        &curve.ci95_low[day].to_string(),
                        &curve.ci95_high[day].to_string(),
                        "",
                        "",
                        "",
                        "",
                        &mode,
                        "",
                        &curve.day[day].to_string(),
                        &curve.at_risk[day]
                            .map(|n| n.to_string())
                            .unwrap_or_default(),
                    ],
                    NO_FIT,
                )?;
            }
        }
    }
    if (answer.survival.is_none() && answer.regression.is_none() || answer.note.is_some())
        && answer.groups.is_empty()
        && !answer.dry_run
    {
        write(
            [
                "estimate",
                "",
                "",
                &answer.estimate.map(|e| e.to_string()).unwrap_or_default(),
                &number(answer.ci95.map(|c| c[0])),
                &number(answer.ci95.map(|c| c[1])),
                &number(answer.std_dev),
                "",
                "",
                answer.note.as_deref().unwrap_or(""),
                &mode,
                "",
                "",
                "",
            ],
            NO_FIT,
        )?;
    }
    for group in &answer.groups {
        write(
            [
                "estimate",
                &group.group.join("/"),
                "",
                &group.estimate.to_string(),
                &group.ci95[0].to_string(),
                &group.ci95[1].to_string(),
                &group.std_dev.to_string(),
                "",
                "",
                "",
                &mode,
                "",
                "",
                "",
            ],
            NO_FIT,
        )?;
    }
    for a in &answer.answered {
        write(
            [
                "answered",
                "",
                &a.node,
                &number(a.value),
                &number(a.ci95.map(|c| c[0])),
                &number(a.ci95.map(|c| c[1])),
                &a.noise_std.to_string(),
                &a.rho.to_string(),
                "",
                "",
                &mode,
                &a.budget_remaining.to_string(),
                "",
                "",
            ],
            NO_FIT,
        )?;
    }
    for q in &answer.quotes {
        write(
            [
                "quoted",
                "",
                &q.node,
                "",
                "",
                "",
                &q.noise_std.to_string(),
                &q.rho.to_string(),
                "",
                "",
                &mode,
                &q.budget_remaining.to_string(),
                "",
                "",
            ],
            NO_FIT,
        )?;
    }
    for r in &answer.refused {
        write(
            [
                "refused",
                "",
                &r.node,
                "",
                "",
                "",
                "",
                "",
                r.code.as_str(),
                &r.reason,
                &mode,
                "",
                "",
                "",
            ],
            NO_FIT,
        )?;
    }
    for m in &answer.missing {
        write(
            [
                "missing", "", &m.node, "", "", "", "", "", "", &m.reason, &mode, "", "", "",
            ],
            NO_FIT,
        )?;
    }
    if let Some(fit) = &answer.regression {
        for c in &fit.coefficients {
            let or = c.odds_ratio.map(|x| x.to_string()).unwrap_or_default();
            let or_low = number(c.odds_ratio_ci95.map(|c| c[0]));
            let or_high = number(c.odds_ratio_ci95.map(|c| c[1]));
            write(
                [
                    "coefficient",
                    &c.term,
                    "",
                    &c.estimate.to_string(),
                    &c.ci95[0].to_string(),
                    &c.ci95[1].to_string(),
                    &c.std_error.to_string(),
                    "",
                    "",
                    "",
                    &mode,
                    "",
                    "",
                    "",
                ],
                [
                    &c.noise_std_error.to_string(),
                    &c.p_value.to_string(),
                    &or,
                    &or_low,
                    &or_high,
                ],
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The columns a CSV answer has besides the common ones.
#[derive(Debug, Clone, Copy)]
enum Extra {
    None,
    /// `day`, `at_risk`.
    Survival,
    /// A coefficient's `noise_std_error`, `p_value` and odds ratio with its interval.
    Regression,
}

/// A row's empty regression columns.
const NO_FIT: [&str; 5] = ["", "", "", "", ""];
