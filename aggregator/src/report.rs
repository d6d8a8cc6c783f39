//! Printing a federated answer for people (a table) and for scripts (CSV); `--format json`
//! is the serde form of [`FederatedAnswer`]. Writes to any writer, so the command line and
//! other front ends print the same thing.

use std::io::{self, Write};

use crate::results::{AnswerMode, FederatedAnswer, Survival};

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
    // `day` and `at_risk` are columns only when there is a survival curve, so every other
    // answer's table keeps its columns.
    let width = if answer.aggregate == "kaplan_meier" {
        14
    } else {
        12
    };
    out.write_record(
        &[
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
        ][..width],
    )?;
    let mode = answer.mode.to_string();
    let number = |x: Option<f64>| x.map(|x| x.to_string()).unwrap_or_default();
    if let Some(survival) = &answer.survival {
        for curve in &survival.strata {
            for day in 0..curve.day.len() {
                out.write_record(
                    &[
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
                    ][..width],
                )?;
            }
        }
    }
    if (answer.survival.is_none() || answer.note.is_some())
        && answer.groups.is_empty()
        && !answer.dry_run
    {
        out.write_record(
            &[
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
            ][..width],
        )?;
    }
    for group in &answer.groups {
        out.write_record(
            &[
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
            ][..width],
        )?;
    }
    for a in &answer.answered {
        out.write_record(
            &[
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
            ][..width],
        )?;
    }
    for q in &answer.quotes {
        out.write_record(
            &[
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
            ][..width],
        )?;
    }
    for r in &answer.refused {
        out.write_record(
            &[
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
            ][..width],
        )?;
    }
    for m in &answer.missing {
        out.write_record(
            &[
                "missing", "", &m.node, "", "", "", "", "", "", &m.reason, &mode, "", "", "",
            ][..width],
        )?;
    }
    out.flush()?;
    Ok(())
}
