//! Dense bitsets over the rows of a table: the representation of cohorts while a query runs.
//!
//! One bit per row in `u64` words; the loops are simple enough for the compiler to
//! vectorise. Bits past `len` in the last word are always zero, so counting needs no mask.

/// A set of row numbers below `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitset {
    words: Vec<u64>,
    len: usize,
}

impl Bitset {
    pub fn empty(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    pub fn full(len: usize) -> Self {
        let mut set = Self {
            words: vec![u64::MAX; len.div_ceil(64)],
            len,
        };
        set.clear_tail();
        set
    }

    /// The rows `i` for which `keep(i)` holds.
    pub fn from_fn(len: usize, mut keep: impl FnMut(usize) -> bool) -> Self {
        let mut words = vec![0u64; len.div_ceil(64)];
        for (w, word) in words.iter_mut().enumerate() {
            let base = w * 64;
            let end = (base + 64).min(len);
            let mut bits = 0u64;
            for i in base..end {
                bits |= u64::from(keep(i)) << (i - base);
            }
            *word = bits;
        }
        Self { words, len }
    }

    /// A set from its words (bit `i % 64` of word `i / 64` is row `i`); bits at or past
    /// `len` are cleared.
    pub fn from_words(mut words: Vec<u64>, len: usize) -> Self {
        words.resize(len.div_ceil(64), 0);
        let mut set = Self { words, len };
        set.clear_tail();
        set
    }

    fn clear_tail(&mut self) {
        let extra = self.words.len() * 64 - self.len;
        if extra > 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= u64::MAX >> extra;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] >> (i % 64) & 1 == 1
    }

    pub fn insert(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn and(&mut self, other: &Bitset) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    pub fn or(&mut self, other: &Bitset) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes every row in `other`.
    pub fn and_not(&mut self, other: &Bitset) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// The rows in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + bit)
            })
        })
    }

    /// This set of parent rows seen from child rows: child `i` is in the result when its
    /// parent `parent[i]` is in `self`.
    pub fn gather(&self, parent: &[u32]) -> Bitset {
        Bitset::from_fn(parent.len(), |i| self.contains(parent[i] as usize))
    }

    /// The parents of the child rows in `self`, as a set over `parents` rows.
    pub fn scatter(&self, parent: &[u32], parents: usize) -> Bitset {
        let mut out = Bitset::empty(parents);
        for i in self.iter() {
            out.insert(parent[i] as usize);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_respect_the_length() {
        let evens = Bitset::from_fn(130, |i| i % 2 == 0);
        assert_eq!(evens.count(), 65);
        let mut all = Bitset::full(130);
        assert_eq!(all.count(), 130);
        all.and_not(&evens);
        assert_eq!(all.count(), 65);
        assert!(all.contains(129) && !all.contains(128) && !all.contains(130));
        let mut both = evens.clone();
        both.and(&all);
        assert_eq!(both.count(), 0);
        assert_eq!(evens.iter().take(3).collect::<Vec<_>>(), vec![0, 2, 4]);
    }

    #[test]
    fn gather_and_scatter_move_between_parents_and_children() {
        let parents = Bitset::from_fn(3, |i| i == 1);
        let parent_of = [0u32, 1, 1, 2, 1];
        let children = parents.gather(&parent_of);
        assert_eq!(children.iter().collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(children.scatter(&parent_of, 3), parents);
    }
}
