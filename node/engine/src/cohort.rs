//! Cohorts: the rows of a view that a compiled query's filter selects, among patients who
//! consented to every scope the query needs, and what statistics read from them.
//!
//! Each comparison becomes a pair of bitsets over the rows of the layer its column lives in
//! (SQL's three-valued logic: a comparison with a missing value is neither true nor
//! false), and is carried down to the view's rows by gathering through parent indices.
//! Statistics see only a [`Cohort`]: its patients, its rows capped per patient, a column's
//! values and each row's GROUP BY cell.

use std::borrow::Cow;
use std::collections::HashMap;

use renkei_protocol::CmpOp;

use crate::bind::{ColumnComparison, Grouping, Node, Test};
use crate::bitset::Bitset;
use crate::column::{Column, NO_CELL, NULL};
use crate::image::{Dataset, Source, View};

/// The matching rows of one query at this node.
#[derive(Debug)]
pub struct Cohort<'a> {
    dataset: &'a Dataset,
    view: View,
    /// Rows where the filter is true (consenting or not).
    rows: Bitset,
    /// Patients who gave every scope the query needs.
    consenting: Bitset,
}

impl<'a> Cohort<'a> {
    /// Whether the view's rows are patients.
    pub fn patient_view(&self) -> bool {
        self.view == View::Patients
    }

    fn patient_of(&self, row: usize) -> usize {
        self.dataset
            .parent(self.view)
            .map_or(row, |p| p[row] as usize)
    }

    /// The consenting patients with at least one matching row.
    pub fn patients(&self) -> Bitset {
        let mut patients = match self.dataset.parent(self.view) {
            None => self.rows.clone(),
            Some(parent) => self.rows.scatter(parent, self.dataset.patients.len),
        };
        patients.and(&self.consenting);
        patients
    }

    /// On the `patients` view, its matching rows of consenting patients (one per patient).
    pub fn patient_rows(&self) -> Option<Bitset> {
        self.patient_view().then(|| {
            let mut kept = self.rows.clone();
            kept.and(&self.consenting);
            kept
        })
    }

    /// The matching rows of consenting patients for which `keep` holds, at most `cap` per
    /// patient. A patient with more such rows keeps `cap` of them spread evenly over its
    /// course ([`spread`]): the answer does not lean toward the start of a long stay.
    pub fn capped_rows(&self, cap: u32, keep: &dyn Fn(usize) -> bool) -> Vec<usize> {
        if let Some(kept) = self.patient_rows() {
            // One row per patient: the cap cannot bind.
            return kept.iter().filter(|&row| cap > 0 && keep(row)).collect();
        }
        let cap = cap as usize;
        let rows = self
            .rows
            .iter()
            .filter(|&row| self.consenting.contains(self.patient_of(row)) && keep(row));
        let mut kept = Vec::new();
        if self.dataset.grouped_by_patient(self.view) {
            // A patient's rows are consecutive: take each run as it ends.
            let mut run: Vec<usize> = Vec::new();
            for row in rows {
                if run
                    .first()
                    .is_some_and(|first| self.patient_of(*first) != self.patient_of(row))
                {
                    kept.extend(spread(run.len(), cap).map(|i| run[i]));
                    run.clear();
                }
                run.push(row);
            }
            kept.extend(spread(run.len(), cap).map(|i| run[i]));
        } else {
            let mut by_patient: HashMap<usize, Vec<usize>> = HashMap::new();
            for row in rows {
                by_patient
                    .entry(self.patient_of(row))
                    .or_default()
                    .push(row);
            }
            for run in by_patient.values() {
                kept.extend(spread(run.len(), cap).map(|i| run[i]));
            }
            kept.sort_unstable();
        }
        kept
    }

    /// The distinct (cell, patient) pairs among the rows of consenting patients in
    /// `rows` (capped rows: so a patient falls in at most as many cells as it may count
    /// rows).
    pub fn patients_per_cell(&self, rows: &[usize], cells: &[u32]) -> Vec<(usize, usize)> {
        let mut pairs: Vec<(usize, usize)> = rows
            .iter()
            .filter(|&&row| cells[row] != NO_CELL)
            .map(|&row| (cells[row] as usize, self.patient_of(row)))
            .filter(|(_, patient)| self.consenting.contains(*patient))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    }

    /// The view's rows where a bound condition holds (consenting or not).
    pub(crate) fn holds(&self, node: &Node) -> Bitset {
        self.dataset.eval(node, self.view).0
    }

    /// The view's rows where a bound condition is true, and where it is false (a row in
    /// neither is one where it is unknown: a comparison with a missing value).
    pub(crate) fn decides(&self, node: &Node) -> (Bitset, Bitset) {
        self.dataset.eval(node, self.view)
    }

    /// A column's values for every row of the view.
    pub fn values(&self, source: Source) -> Cow<'a, Column> {
        self.dataset.values(source, self.view)
    }

    /// Each row's cell of `grouping`, or [`NO_CELL`] where a grouping value is missing.
    pub fn cells(&self, grouping: &Grouping) -> Vec<u32> {
        // One typed pass per column.
        let mut cell = vec![0u32; self.dataset.rows(self.view)];
        for (source, levels) in &grouping.columns {
            let levels = u32::try_from(levels.len()).unwrap_or(u32::MAX);
            self.values(*source).fold_levels(&mut cell, levels);
        }
        cell
    }
}

/// Which of a patient's `n` rows (in timepoint order) count when at most `cap` may: all of
/// them when `n <= cap`, else the middle row of each of `cap` equal stretches of the course,
/// `⌊(2k + 1)·n / (2·cap)⌋` for `k < cap`. Deterministic, and every part of a long course is
/// represented, so capping does not bias an answer toward the start (or the end).
pub fn spread(n: usize, cap: usize) -> impl Iterator<Item = usize> {
    let take = n.min(cap);
    (0..take).map(move |k| {
        if n <= cap {
            k
        } else {
            (2 * k + 1) * n / (2 * cap)
        }
    })
}

/// A column value clamped to `[low, high]`, or `None` where it is missing.
pub fn clamped(column: &Column, row: usize, low: i64, high: i64) -> Option<i64> {
    let value = column.get(row);
    (value != NULL).then(|| value.clamp(low, high))
}

impl Dataset {
    /// The cohort a bound filter selects on `view`, among patients who gave `consents`.
    pub(crate) fn cohort(&self, view: View, filter: &Node, consents: &[String]) -> Cohort<'_> {
        Cohort {
            dataset: self,
            view,
            rows: self.eval(filter, view).0,
            consenting: self.consenting(consents),
        }
    }

    /// (rows where the filter is true, rows where it is false); rows in neither are unknown.
    pub(crate) fn eval(&self, node: &Node, view: View) -> (Bitset, Bitset) {
        let len = self.rows(view);
        match node {
            Node::True => (Bitset::full(len), Bitset::empty(len)),
            Node::And(children) => {
                let mut t = Bitset::full(len);
                let mut f = Bitset::empty(len);
                for child in children {
                    let (ct, cf) = self.eval(child, view);
                    t.and(&ct);
                    f.or(&cf);
                }
                (t, f)
            }
            Node::Or(children) => {
                let mut t = Bitset::empty(len);
                let mut f = Bitset::full(len);
                for child in children {
                    let (ct, cf) = self.eval(child, view);
                    t.or(&ct);
                    f.and(&cf);
                }
                (t, f)
            }
            Node::Not(inner) => {
                let (t, f) = self.eval(inner, view);
                (f, t)
            }
            Node::Test(source, test) => self.test(*source, test, view),
            Node::Columns(comparison) => self.compare_columns(comparison, view),
        }
    }

    /// (true, false) rows of a comparison between two columns; a missing side is neither.
    fn compare_columns(&self, c: &ColumnComparison, view: View) -> (Bitset, Bitset) {
        let len = self.rows(view);
        let (left, right) = (self.values(c.left, view), self.values(c.right, view));
        let (mut t, mut f) = (Bitset::empty(len), Bitset::empty(len));
        for row in 0..len {
            let (a, b) = (left.get(row), right.get(row));
            if a == NULL || b == NULL {
                continue;
            }
            let lhs = i128::from(a) * i128::from(c.left_factor);
            let rhs = i128::from(b) * i128::from(c.right_factor) + i128::from(c.offset);
            if c.op.holds(lhs.cmp(&rhs)) {
                t.insert(row);
            } else {
                f.insert(row);
            }
        }
        (t, f)
    }

    /// Evaluates a test where its column lives, then carries the result to the view's rows.
    fn test(&self, source: Source, test: &Test, view: View) -> (Bitset, Bitset) {
        let (level, values) = self.stored(source, view);
        let (t, f) = match values {
            Some(values) => column_test(values, test),
            None => match source {
                Source::PatientHas(k) | Source::TimepointHas(k) => {
                    presence_test(self.presence(source, k), test)
                }
                // An item's column outside its own view: unknown everywhere.
                Source::Patient(_)
                | Source::Timepoint(_)
                | Source::TimepointNumber
                | Source::Item(_) => (
                    Bitset::empty(self.rows(view)),
                    Bitset::empty(self.rows(view)),
                ),
            },
        };
        (self.carry(t, level, view), self.carry(f, level, view))
    }
}

/// (true, false) rows of a test on a column; a missing value is neither.
fn column_test(column: &Column, test: &Test) -> (Bitset, Bitset) {
    // Every comparison is a range of values (or, for `<>`, the outside of one).
    let (low, high) = match test {
        Test::IsNull { negated } => {
            let present = column.present();
            let mut missing = Bitset::full(column.len());
            missing.and_not(&present);
            return if *negated {
                (present, missing)
            } else {
                (missing, present)
            };
        }
        Test::In(set) => return column.split_in(set),
        Test::Cmp(CmpOp::Ne, x) => {
            let (equal, other) = column.split_range(*x, *x);
            return (other, equal);
        }
        Test::Cmp(CmpOp::Eq, x) => (*x, *x),
        Test::Cmp(CmpOp::Lt, x) => (i64::MIN, x.saturating_sub(1)),
        Test::Cmp(CmpOp::Le, x) => (i64::MIN, *x),
        // Above i64::MAX there is nothing: an empty range.
        Test::Cmp(CmpOp::Gt, x) => x.checked_add(1).map_or((1, 0), |low| (low, i64::MAX)),
        Test::Cmp(CmpOp::Ge, x) => (*x, i64::MAX),
        Test::Between(low, high) => (*low, *high),
    };
    column.split_range(low, high)
}

/// (true, false) rows of a test on a presence flag (never missing).
fn presence_test(has: Bitset, test: &Test) -> (Bitset, Bitset) {
    let len = has.len();
    let mut hasnt = Bitset::full(len);
    hasnt.and_not(&has);
    let wants = |x: i64| x != 0;
    match test {
        Test::IsNull { negated: false } => (Bitset::empty(len), Bitset::full(len)),
        Test::IsNull { negated: true } => (Bitset::full(len), Bitset::empty(len)),
        Test::Cmp(CmpOp::Eq, x) if wants(*x) => (has, hasnt),
        Test::Cmp(CmpOp::Eq, _) => (hasnt, has),
        Test::Cmp(CmpOp::Ne, x) if wants(*x) => (hasnt, has),
        Test::Cmp(CmpOp::Ne, _) => (has, hasnt),
        Test::Cmp(CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge, _)
        | Test::In(_)
        | Test::Between(..) => column_test(&Column::flags(&has), test),
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn capped_rows_spread_over_the_course() {
        assert_eq!(spread(3, 8).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(
            spread(16, 8).collect::<Vec<_>>(),
            vec![1, 3, 5, 7, 9, 11, 13, 15]
        );
        assert_eq!(spread(10, 4).collect::<Vec<_>>(), vec![1, 3, 6, 8]);
        assert_eq!(spread(9, 1).collect::<Vec<_>>(), vec![4]);
        assert_eq!(spread(0, 4).count(), 0);
        // Always distinct, in order, within the course.
        for n in 0..40 {
            for cap in 1..10 {
                let kept: Vec<usize> = spread(n, cap).collect();
                assert_eq!(kept.len(), n.min(cap));
                assert!(kept.windows(2).all(|w| w[0] < w[1]), "{n} {cap}");
                assert!(kept.iter().all(|i| *i < n));
            }
        }
    }
}
