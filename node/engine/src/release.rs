//! Wire forms of releases that do not depend on the statistic: how a secure round's summed
//! words read as one release, and whether two nodes' releases have the same shape.

use renkei_protocol::{MaskedShape, Release};

/// How many masked words a contribution of `shape` has (`None`: as many as it carries, for a
/// histogram, whose bins the shape does not name).
pub fn masked_words(shape: &MaskedShape) -> Option<usize> {
    match shape {
        MaskedShape::Scalar => Some(1),
        MaskedShape::SumAndCount => Some(2),
        MaskedShape::Histogram { .. } => None,
        MaskedShape::Groups { labels } => Some(labels.len()),
        MaskedShape::Cells { labels, parts } => Some(labels.len() * *parts as usize),
        MaskedShape::Regression { values, .. } => Some(*values as usize),
    }
}

/// A secure round's total (the masks removed), read as one release of `shape`; a count
/// below `min_cell_size` is withheld from it.
pub fn release_from_total(shape: &MaskedShape, total: Vec<i64>, min_cell_size: u64) -> Release {
    let withhold =
        |n: i64| min_cell_size > 0 && n < i64::try_from(min_cell_size).unwrap_or(i64::MAX);
    let at = |k: usize| total.get(k).copied().unwrap_or(0);
    match shape {
        MaskedShape::Scalar => {
            let suppressed = withhold(at(0));
            Release::Scalar {
                value: if suppressed { 0 } else { at(0) },
                suppressed,
            }
        }
        MaskedShape::SumAndCount => Release::SumAndCount {
            sum: at(0),
            count: at(1),
        },
        MaskedShape::Histogram { low, width } => Release::Histogram {
            low: *low,
            width: *width,
            counts: total,
        },
        MaskedShape::Groups { labels } => {
            let suppressed: Vec<bool> = total.iter().map(|n| withhold(*n)).collect();
            Release::Groups {
                labels: labels.clone(),
                counts: total
                    .iter()
                    .zip(&suppressed)
                    .map(|(n, s)| if *s { 0 } else { *n })
                    .collect(),
                suppressed,
            }
        }
        MaskedShape::Cells { labels, parts } => {
            let cells = labels.len().max(1);
            let mut split: Vec<Vec<i64>> = total.chunks(cells).map(<[i64]>::to_vec).collect();
            // A mean per cell (sums, then counts): a cell whose total count is below the
            // minimum is withheld, its sum with it.
            let suppressed: Vec<bool> = match (*parts, split.get(1)) {
                (2, Some(counts)) => counts.iter().map(|n| withhold(*n)).collect(),
                _ => vec![false; labels.len()],
            };
            for part in &mut split {
                for (value, withheld) in part.iter_mut().zip(&suppressed) {
                    if *withheld {
                        *value = 0;
                    }
                }
            }
            Release::Cells {
                labels: labels.clone(),
                parts: split,
                suppressed,
            }
        }
        MaskedShape::Regression { terms, .. } => Release::Regression {
            terms: terms.clone(),
            values: total,
        },
    }
}

/// Whether a node's release has the same shape as the first one's (same kind, bins, cells).
pub fn same_shape(a: &Release, b: &Release) -> bool {
    match a {
        Release::Scalar { .. } => matches!(b, Release::Scalar { .. }),
        Release::SumAndCount { .. } => matches!(b, Release::SumAndCount { .. }),
        Release::Histogram {
            low: l1,
            width: w1,
            counts: c1,
        } => matches!(b, Release::Histogram { low: l2, width: w2, counts: c2 }
            if l1 == l2 && w1 == w2 && c1.len() == c2.len()),
        Release::Groups { labels: a, .. } => {
            matches!(b, Release::Groups { labels: b, .. } if a == b)
        }
        Release::Masked {
            shape: s1,
            words: w1,
        } => {
            matches!(b, Release::Masked { shape: s2, words: w2 } if s1 == s2 && w1.len() == w2.len())
        }
        Release::Cells {
            labels: l1,
            parts: p1,
            ..
        } => matches!(b, Release::Cells { labels: l2, parts: p2, .. }
            if l1 == l2 && p1.len() == p2.len() && p1.iter().zip(p2).all(|(x, y)| x.len() == y.len())),
        Release::Regression {
            terms: t1,
            values: v1,
        } => matches!(b, Release::Regression { terms: t2, values: v2 }
            if t1 == t2 && v1.len() == v2.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secure_total_reads_as_one_release() {
        let labels = vec![vec!["a".to_string()], vec!["b".to_string()]];
        assert_eq!(
            release_from_total(
                &MaskedShape::Groups {
                    labels: labels.clone()
                },
                vec![3, 40],
                10
            ),
            Release::Groups {
                labels: labels.clone(),
                counts: vec![0, 40],
                suppressed: vec![true, false],
            }
        );
        assert_eq!(
            release_from_total(
                &MaskedShape::Cells {
                    labels: labels.clone(),
                    parts: 2
                },
                vec![1, 2, 30, 4],
                10
            ),
            // Sums then counts: the second cell's count (4) is below 10, withheld with
            // its sum.
            Release::Cells {
                labels: labels.clone(),
                parts: vec![vec![1, 0], vec![30, 0]],
                suppressed: vec![false, true],
            }
        );
    }

    #[test]
    fn shapes_match_only_with_the_same_cells() {
        let cells = |parts: Vec<Vec<i64>>| Release::Cells {
            labels: vec![vec!["x".into()]],
            suppressed: vec![false],
            parts,
        };
        assert!(same_shape(
            &cells(vec![vec![1], vec![2]]),
            &cells(vec![vec![5], vec![6]])
        ));
        assert!(!same_shape(
            &cells(vec![vec![1]]),
            &cells(vec![vec![5], vec![6]])
        ));
        assert!(!same_shape(
            &cells(vec![vec![1]]),
            &Release::Scalar {
                value: 1,
                suppressed: false
            }
        ));
    }
}
