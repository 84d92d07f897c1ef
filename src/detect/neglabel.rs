//! NegLabel's grouping of the negative rows, precomputed once per scorer; its own file because
//! the exact and approximate scorers both carry it.

use super::method::ScoreError;
use super::rng::SplitMix64;

/// The NegLabel grouping of the negative rows (docs/method.md §9), precomputed once.
///
/// With `n` negatives and `G` requested groups:
/// 1. `G_eff = min(G, n)`: if there are fewer negatives than groups, every negative forms its
///    own group (the natural limit of "split into G groups"; the reference would drop all of
///    them and score every image 1);
/// 2. drop the **last** `n mod G_eff` negatives (in bank order);
/// 3. permute the rest with a seeded Fisher–Yates shuffle driven by SplitMix64;
/// 4. consecutive runs of `n / G_eff` indices of the permutation are the groups.
///
/// SplitMix64 is used instead of `rand::rngs::StdRng` because StdRng is documented as
/// non-portable (its algorithm may change in any `rand` release), and the grouping changes
/// the scores, hence calibrated thresholds. Neither reproduces the reference's
/// `torch.manual_seed(0)` permutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegGrouping {
    requested: usize,
    seed: u64,
    group_len: usize,
    order: Vec<usize>,
}

impl NegGrouping {
    /// Group `n_negatives` rows into (at most) `groups` groups with `seed`.
    pub fn new(n_negatives: usize, groups: usize, seed: u64) -> Result<Self, ScoreError> {
        if groups == 0 {
            return Err(ScoreError::InvalidParam {
                name: "neglabel_groups",
                value: "0".to_owned(),
                reason: "must be >= 1",
            });
        }
        let g_eff = groups.min(n_negatives);
        let group_len = n_negatives.checked_div(g_eff).unwrap_or(0);
        let mut order: Vec<usize> = (0..g_eff * group_len).collect();
        let mut rng = SplitMix64(seed);
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        Ok(Self {
            requested: groups,
            seed,
            group_len,
            order,
        })
    }

    /// Effective number of groups (`min(groups, n)`; 0 when there are no negatives).
    pub fn n_groups(&self) -> usize {
        self.order.len().checked_div(self.group_len).unwrap_or(0)
    }

    /// Number of negatives per group.
    pub fn group_len(&self) -> usize {
        self.group_len
    }

    /// The negative row indices of every group, in order.
    pub fn groups(&self) -> impl Iterator<Item = &[usize]> {
        self.order.chunks_exact(self.group_len.max(1))
    }

    /// Whether this grouping was made for `groups` groups and `seed`.
    pub(crate) fn matches(&self, groups: usize, seed: u64) -> bool {
        self.requested == groups && self.seed == seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_grouping_properties() {
        let g = NegGrouping::new(1050, 100, 0).unwrap();
        assert_eq!((g.n_groups(), g.group_len()), (100, 10));
        let mut seen: Vec<usize> = g.groups().flatten().copied().collect();
        assert_ne!(seen[..10], (0..10).collect::<Vec<_>>()[..], "not shuffled");
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..1000).collect::<Vec<_>>(),
            "the last 50 are dropped"
        );
        assert_eq!(g, NegGrouping::new(1050, 100, 0).unwrap(), "deterministic");
        assert_ne!(g, NegGrouping::new(1050, 100, 1).unwrap(), "seeded");
        let few = NegGrouping::new(7, 100, 0).unwrap();
        assert_eq!((few.n_groups(), few.group_len()), (7, 1));
        let none = NegGrouping::new(0, 100, 0).unwrap();
        assert_eq!((none.n_groups(), none.groups().count()), (0, 0));
        assert!(NegGrouping::new(5, 0, 0).is_err());
        // SplitMix64 reference output for seed 0 (first value of the published generator).
        assert_eq!(SplitMix64(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}
