//! Portable seeded randomness of scoring: SplitMix64 and the uniform tail sample; its own file so
//! that NegLabel grouping, the approximate scorer and the benches share one generator.

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, portable, fixed forever.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by the widening multiply (bias < n / 2⁶⁴, irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// `min(k, n)` distinct indices of `0..n`, uniformly at random (seeded partial Fisher–Yates
/// with SplitMix64, portable across releases), sorted.
pub fn uniform_sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let k = k.min(n);
    let mut rng = SplitMix64(seed);
    // Sparse Fisher–Yates: only the touched positions are stored, so a sample of 4,096 from
    // 10⁶ rows costs 4,096 steps, not an array of 10⁶ indices.
    let mut moved = std::collections::HashMap::<usize, usize>::with_capacity(2 * k);
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let j = i + rng.below(n - i);
        let vj = *moved.get(&j).unwrap_or(&j);
        let vi = *moved.get(&i).unwrap_or(&i);
        moved.insert(j, vi);
        out.push(vj);
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_distinct_sorted_seeded_and_complete_when_k_ge_n() {
        let s = uniform_sample(1000, 100, 7);
        assert_eq!(s.len(), 100);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|&i| i < 1000));
        assert_eq!(s, uniform_sample(1000, 100, 7));
        assert_ne!(s, uniform_sample(1000, 100, 8));
        assert_eq!(uniform_sample(5, 10, 1), vec![0, 1, 2, 3, 4]);
        // Roughly uniform: the mean index of a large sample is near n/2.
        let big = uniform_sample(100_000, 20_000, 3);
        let mean = big.iter().sum::<usize>() as f64 / big.len() as f64;
        assert!((mean - 50_000.0).abs() < 1_500.0, "{mean}");
    }
}
