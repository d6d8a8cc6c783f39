//! One column of the in-memory image, kept in the narrowest signed integer type that holds
//! every value it has.
//!
//! Levels, flags and ages fit one byte, most lab values two: at a million patients a cohort
//! filter is bound by how many bytes it reads, so a scan over one-byte cells reads an eighth
//! of what `i64` cells cost and compares 16 or 32 of them per instruction. The width is
//! chosen from the values when the image is loaded (the image is rebuilt after every
//! ingest), so no value can be truncated.
//!
//! Each width marks a missing value with its own minimum ([`Cell::MISSING`]); a stored value
//! is never that minimum. Outside this module values are plain `i64`, missing as
//! [`NULL`]. A range test is narrowed to the column's type before the scan,
//! so the loop compares cells of one width and needs no conversion.

use crate::bitset::Bitset;

/// The stored value of a missing cell, as every layer outside the columns sees it.
pub const NULL: i64 = i64::MIN;

/// A cell type: a signed integer whose minimum marks a missing value.
trait Cell: Copy + PartialOrd + Into<i64> + TryFrom<i64> {
    const MISSING: Self;
    /// The smallest and largest storable values, as `i64`.
    const LOW: i64;
    const HIGH: i64;
}

macro_rules! cell {
    ($($t:ty),*) => {$(
        impl Cell for $t {
            const MISSING: Self = <$t>::MIN;
            const LOW: i64 = <$t>::MIN as i64 + 1;
            const HIGH: i64 = <$t>::MAX as i64;
        }
    )*};
}
cell!(i8, i16, i32, i64);

/// The group-by cell of a row that falls in none.
pub const NO_CELL: u32 = u32::MAX;

/// The values of one column, one per row, in the narrowest width that holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// Runs `$body` with `$v` bound to the column's cells, whatever their width.
macro_rules! each_width {
    ($column:expr, $v:ident => $body:expr) => {
        match $column {
            Column::I8($v) => $body,
            Column::I16($v) => $body,
            Column::I32($v) => $body,
            Column::I64($v) => $body,
        }
    };
}

impl Default for Column {
    fn default() -> Self {
        Column::I8(Vec::new())
    }
}

impl Column {
    /// `values` (missing as [`NULL`]) in the narrowest width that holds all of them.
    pub fn narrowest(values: Vec<i64>) -> Self {
        let (low, high) = values
            .iter()
            .filter(|v| **v != NULL)
            .fold((0i64, 0i64), |(low, high), v| (low.min(*v), high.max(*v)));
        let fits = |min: i64, max: i64| min <= low && high <= max;
        if fits(i8::LOW, i8::HIGH) {
            Column::I8(narrow(&values))
        } else if fits(i16::LOW, i16::HIGH) {
            Column::I16(narrow(&values))
        } else if fits(i32::LOW, i32::HIGH) {
            Column::I32(narrow(&values))
        } else {
            Column::I64(values)
        }
    }

    /// `len` missing values.
    pub fn missing(len: usize) -> Self {
        Column::I8(vec![i8::MISSING; len])
    }

    /// A 0/1 column from a set: 1 for the rows in `set`.
    pub fn flags(set: &Bitset) -> Self {
        Column::I8((0..set.len()).map(|i| i8::from(set.contains(i))).collect())
    }

    pub fn len(&self) -> usize {
        each_width!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `row`'s value, [`NULL`] when missing (or past the end).
    pub fn get(&self, row: usize) -> i64 {
        each_width!(self, v => v.get(row).map_or(NULL, |c| widen(*c)))
    }

    /// The bytes one cell takes.
    pub fn width(&self) -> usize {
        match self {
            Column::I8(_) => 1,
            Column::I16(_) => 2,
            Column::I32(_) => 4,
            Column::I64(_) => 8,
        }
    }

    /// This column seen from child rows: child `i` takes the value of row `parent[i]`.
    pub fn gather(&self, parent: &[u32]) -> Self {
        fn pick<T: Cell>(values: &[T], parent: &[u32]) -> Vec<T> {
            parent
                .iter()
                .map(|p| values.get(*p as usize).copied().unwrap_or(T::MISSING))
                .collect()
        }
        match self {
            Column::I8(v) => Column::I8(pick(v, parent)),
            Column::I16(v) => Column::I16(pick(v, parent)),
            Column::I32(v) => Column::I32(pick(v, parent)),
            Column::I64(v) => Column::I64(pick(v, parent)),
        }
    }

    /// (rows whose value lies in `low..=high`, rows with a value outside it); missing rows
    /// are in neither.
    pub fn split_range(&self, low: i64, high: i64) -> (Bitset, Bitset) {
        each_width!(self, v => split_range(v, low, high))
    }

    /// (rows whose value is one of `set`, rows with another value); missing rows in neither.
    pub fn split_in(&self, set: &[i64]) -> (Bitset, Bitset) {
        fn split_in<T: Cell>(values: &[T], set: &[i64]) -> (Bitset, Bitset) {
            let set: Vec<T> = set
                .iter()
                .filter(|x| (T::LOW..=T::HIGH).contains(*x))
                .filter_map(|x| T::try_from(*x).ok())
                .collect();
            split(values, |v| set.contains(&v))
        }
        each_width!(self, v => split_in(v, set))
    }

    /// Folds this column's levels into each row's group-by cell: `cell = cell * levels +
    /// level`. A row whose value is missing or not a level below `levels` (or whose cell is
    /// already [`NO_CELL`]) gets [`NO_CELL`].
    pub fn fold_levels(&self, cells: &mut [u32], levels: u32) {
        fn fold<T: Cell>(values: &[T], cells: &mut [u32], levels: u32) {
            for (cell, value) in cells.iter_mut().zip(values) {
                let level = u32::try_from((*value).into()).unwrap_or(u32::MAX);
                *cell = if *cell == NO_CELL || level >= levels {
                    NO_CELL
                } else {
                    *cell * levels + level
                };
            }
        }
        each_width!(self, v => fold(v, cells, levels))
    }

    /// The rows that have a value.
    pub fn present(&self) -> Bitset {
        fn present<T: Cell>(values: &[T]) -> Bitset {
            let (all, _) = split(values, |_| true);
            all
        }
        each_width!(self, v => present(v))
    }
}

fn widen<T: Cell>(cell: T) -> i64 {
    if cell == T::MISSING {
        NULL
    } else {
        cell.into()
    }
}

/// `values` as cells of `T`; the caller has checked that every value fits.
fn narrow<T: Cell>(values: &[i64]) -> Vec<T> {
    values
        .iter()
        .map(|v| match *v {
            NULL => T::MISSING,
            v => T::try_from(v).unwrap_or(T::MISSING),
        })
        .collect()
}

fn split_range<T: Cell>(values: &[T], low: i64, high: i64) -> (Bitset, Bitset) {
    // The part of the range this width can hold; it starts above the missing marker, so
    // the scan needs no separate check for it.
    let (low, high) = (low.max(T::LOW), high.min(T::HIGH));
    match (T::try_from(low), T::try_from(high)) {
        (Ok(low), Ok(high)) if low <= high => split(values, |v| low <= v && v <= high),
        _ => split(values, |_| false),
    }
}

/// (rows whose cell satisfies `hit`, rows whose cell does not), missing cells in neither;
/// one pass, 64 rows to a word.
///
/// The test is written into a byte per row first, a loop the compiler turns into vector
/// compares (16 one-byte cells per SSE2 instruction); the bytes are then packed eight at a
/// time into bits with one multiplication.
fn split<T: Cell>(values: &[T], hit: impl Fn(T) -> bool) -> (Bitset, Bitset) {
    let words = values.len().div_ceil(64);
    let (mut yes, mut no) = (Vec::with_capacity(words), Vec::with_capacity(words));
    let (mut hits, mut present) = ([0u8; 64], [0u8; 64]);
    for chunk in values.chunks(64) {
        for ((cell, hit_byte), present_byte) in chunk.iter().zip(&mut hits).zip(&mut present) {
            *hit_byte = u8::from(hit(*cell));
            *present_byte = u8::from(*cell != T::MISSING);
        }
        if chunk.len() < 64 {
            hits[chunk.len()..].fill(0);
            present[chunk.len()..].fill(0);
        }
        let (hits, present) = (pack(&hits), pack(&present));
        yes.push(hits & present);
        no.push(!hits & present);
    }
    (
        Bitset::from_words(yes, values.len()),
        Bitset::from_words(no, values.len()),
    )
}

/// 64 bytes, each 0 or 1, as the bits of a word (byte `i` is bit `i`).
fn pack(bytes: &[u8; 64]) -> u64 {
    // Multiplying eight 0/1 bytes by this constant moves byte k's bit to bit 56 + k, with no
    // two partial products on the same bit (so no carries).
    const GATHER: u64 = 0x0102_0408_1020_4080;
    let mut word = 0u64;
    for (i, eight) in bytes.chunks_exact(8).enumerate() {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(eight);
        word |= (u64::from_le_bytes(lanes).wrapping_mul(GATHER) >> 56) << (8 * i);
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(set: &Bitset) -> Vec<usize> {
        set.iter().collect()
    }

    #[test]
    fn the_narrowest_width_that_holds_every_value_is_chosen() {
        assert_eq!(Column::narrowest(vec![0, 1, NULL, 127, -127]).width(), 1);
        // -128 is i8's missing marker, so it needs two bytes.
        assert_eq!(Column::narrowest(vec![-128]).width(), 2);
        assert_eq!(Column::narrowest(vec![300, NULL]).width(), 2);
        assert_eq!(Column::narrowest(vec![70_000]).width(), 4);
        assert_eq!(Column::narrowest(vec![i64::MAX, NULL]).width(), 8);
        assert_eq!(Column::narrowest(vec![NULL, NULL]).width(), 1);
        let values = vec![5, NULL, -32_767, 32_767, 0];
        let column = Column::narrowest(values.clone());
        assert_eq!(column.width(), 2);
        assert_eq!((0..5).map(|r| column.get(r)).collect::<Vec<_>>(), values);
        assert_eq!(column.get(5), NULL);
    }

    #[test]
    fn range_tests_agree_with_i64_at_every_width_and_edge() {
        // Values at the edges of each width, with missing cells among them; 150 rows so
        // a word is split across chunks and a remainder is left.
        let bases: [&[i64]; 4] = [
            &[-127, -1, 0, 1, 126, 127],
            &[-32_767, -129, -128, 127, 128, 32_767],
            &[
                i64::from(i32::MIN) + 1,
                -70_000,
                0,
                70_000,
                i64::from(i32::MAX),
            ],
            &[i64::MIN + 1, -5, 0, i64::MAX],
        ];
        for base in bases {
            let values: Vec<i64> = (0..150)
                .map(|i| {
                    if i % 7 == 3 {
                        NULL
                    } else {
                        base[i % base.len()]
                    }
                })
                .collect();
            let column = Column::narrowest(values.clone());
            let probes = [
                i64::MIN,
                i64::MIN + 1,
                -70_000,
                -128,
                -127,
                0,
                127,
                128,
                i64::MAX,
            ];
            for &low in &probes {
                for &high in &probes {
                    let (yes, no) = column.split_range(low, high);
                    let want_yes: Vec<usize> = (0..150)
                        .filter(|&r| values[r] != NULL && low <= values[r] && values[r] <= high)
                        .collect();
                    let want_no: Vec<usize> = (0..150)
                        .filter(|&r| values[r] != NULL && !(low <= values[r] && values[r] <= high))
                        .collect();
                    assert_eq!(rows(&yes), want_yes, "{base:?} in {low}..={high}");
                    assert_eq!(rows(&no), want_no, "{base:?} outside {low}..={high}");
                }
            }
            let set = [0, 127, -128, i64::MAX, NULL];
            let (yes, no) = column.split_in(&set);
            let want: Vec<usize> = (0..150)
                .filter(|&r| values[r] != NULL && set.contains(&values[r]))
                .collect();
            assert_eq!(rows(&yes), want, "{base:?} in {set:?}");
            assert_eq!(yes.count() + no.count(), column.present().count());
            assert_eq!(
                rows(&column.present()),
                (0..150).filter(|&r| values[r] != NULL).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn packing_puts_byte_i_in_bit_i() {
        for pattern in [
            0u64,
            u64::MAX,
            1,
            1 << 63,
            0x8000_0001_F0F0_5A5A,
            0x0123_4567_89AB_CDEF,
        ] {
            let mut bytes = [0u8; 64];
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from(pattern >> i & 1 == 1);
            }
            assert_eq!(pack(&bytes), pattern, "{pattern:#x}");
        }
    }

    #[test]
    fn levels_fold_into_cells_and_strays_into_none() {
        let sex = Column::narrowest(vec![0, 1, 1, NULL, 0]);
        let severity = Column::narrowest(vec![2, 0, 3, 1, -1]);
        let mut cells = vec![0; 5];
        sex.fold_levels(&mut cells, 2);
        severity.fold_levels(&mut cells, 3);
        assert_eq!(cells, vec![2, 3, NO_CELL, NO_CELL, NO_CELL]);
    }

    #[test]
    fn gathering_keeps_values_and_missing_cells() {
        let column = Column::narrowest(vec![3, NULL, 300]);
        let children = column.gather(&[2, 1, 0, 0, 9]);
        assert_eq!(children.width(), 2);
        assert_eq!(
            (0..5).map(|r| children.get(r)).collect::<Vec<_>>(),
            vec![300, NULL, 3, 3, NULL]
        );
        let flags = Column::flags(&Bitset::from_fn(3, |i| i == 1));
        assert_eq!(
            (0..3).map(|r| flags.get(r)).collect::<Vec<_>>(),
            vec![0, 1, 0]
        );
    }
}
