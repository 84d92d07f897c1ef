//! A bit-for-bit port of CPython's `random` generator (MT19937); its own file because HOPG and
//! k-means++ must draw the reference's exact numbers.

/// State size of MT19937.
const N: usize = 624;
/// Middle word offset of MT19937.
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's `random.Random` generator (MT19937) for integer seeds.
///
/// ```
/// use oodgate::detect::pyrandom::PyRandom;
/// let mut r = PyRandom::new(42);
/// assert_eq!(r.uniform(0.0, 0.5), 0.3197133992289419);
/// ```
///
/// A port of CPython's `random` module generator (MT19937), bit-for-bit (docs/method.md §7).
///
/// HOPG's reference draws its mixing weights with `random.seed(42)` followed by
/// `random.uniform(0.0, 0.5)` once per boundary embedding. [`PyRandom`] reproduces exactly those
/// numbers: it is the Mersenne Twister MT19937 seeded the way CPython's `random.seed(n)` seeds it
/// for an integer `n` (`init_by_array` with the 32-bit little-endian words of `|n|`), with
/// CPython's 53-bit `random()`, `uniform()`, `getrandbits()` and `_randbelow()`.
///
/// The generator is also what the k-means++ initialisation in [`super::kmeans`] draws from:
/// its output is fixed by this specification rather than by a crate version, so a bank built
/// from a given seed stays reproducible across dependency upgrades.
///
/// Not cryptographically secure; never use it for anything but reproducible experiments.
#[derive(Clone, Debug)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// A generator in the state CPython's `random.seed(seed)` leaves it in.
    ///
    /// CPython seeds with `init_by_array(key)` where `key` holds the 32-bit words of the seed's
    /// absolute value, least significant first, with at least one word (`seed = 0` → `[0]`).
    pub fn new(seed: u64) -> Self {
        let lo = seed as u32;
        let hi = (seed >> 32) as u32;
        if hi == 0 {
            Self::from_key(&[lo])
        } else {
            Self::from_key(&[lo, hi])
        }
    }

    /// MT19937 `init_genrand(s)`.
    fn init_genrand(s: u32) -> [u32; N] {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        mt
    }

    /// MT19937 `init_by_array(key)`, as called by CPython's `random_seed`.
    ///
    /// `key` must not be empty (CPython always passes at least one word).
    fn from_key(key: &[u32]) -> Self {
        let mut mt = Self::init_genrand(19_650_218);
        let key_len = key.len().max(1);
        let mut i = 1usize;
        let mut j = 0usize;
        for _ in 0..N.max(key_len) {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            let word = key.get(j).copied().unwrap_or(0);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(word)
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key_len {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000; // MSB is 1, assuring a non-zero initial array
        Self { mt, index: N }
    }

    /// Regenerates the 624-word state block.
    fn twist(&mut self) {
        let mag01 = [0u32, MATRIX_A];
        for kk in 0..N {
            let y = (self.mt[kk] & UPPER_MASK) | (self.mt[(kk + 1) % N] & LOWER_MASK);
            self.mt[kk] = self.mt[(kk + M) % N] ^ (y >> 1) ^ mag01[(y & 1) as usize];
        }
        self.index = 0;
    }

    /// The next 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.random()`: a float in [0, 1) with 53 random bits, `(a·2²⁶ + b) / 2⁵³` with
    /// `a = u32 >> 5` and `b = u32 >> 6`.
    pub fn random(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `random.uniform(a, b)` = `a + (b − a)·random()`.
    pub fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.random()
    }

    /// `random.getrandbits(k)` for `k ≤ 64`; values of `k` above 64 are treated as 64.
    ///
    /// Consumes `⌈k/32⌉` outputs; the first one supplies the least significant word and the last
    /// one is shifted right to keep only its top bits, as CPython does.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        let k = k.min(64);
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let low = u64::from(self.next_u32());
        let high = u64::from(self.next_u32() >> (64 - k));
        low | (high << 32)
    }

    /// CPython's `_randbelow(n)`: a uniform integer in `[0, n)` by rejection sampling on
    /// `getrandbits(n.bit_length())`; `random.randrange(n)` for `n ≥ 1`. Returns 0 for `n = 0`
    /// (where CPython would loop forever).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let k = u64::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The §7 test vector: `random.seed(42); [random.uniform(0.0, 0.5) for _ in range(150)]`.
    #[test]
    fn hopg_lambda_vector_matches_cpython() {
        let mut r = PyRandom::new(42);
        let v: Vec<f64> = (0..150).map(|_| r.uniform(0.0, 0.5)).collect();
        assert!((v[0] - 0.3197133992289419).abs() < 1e-15);
        assert!((v[1] - 0.012505377611333468).abs() < 1e-15);
        assert!((v[2] - 0.13751465918455963).abs() < 1e-15);
        // Computed with CPython 3.11: v[149] and sum(v)/150 (left-to-right sum).
        assert_eq!(v[149], 0.15585814565044748);
        let mean = v.iter().sum::<f64>() / 150.0;
        assert!((mean - 0.24243510629782358).abs() < 1e-12);
        assert!(v.iter().all(|&x| (0.0..0.5).contains(&x)));
    }

    /// Values computed with CPython 3.11:
    /// `random.seed(s); random.random(), random.getrandbits(32), random.getrandbits(40),
    /// random.randrange(1000), random.randrange(10848)`.
    #[test]
    fn seeds_and_integer_draws_match_cpython() {
        let cases: [(u64, f64, u64, u64, u64, u64); 4] = [
            (0, 0.8444218515250481, 3255389356, 463385069186, 41, 4242),
            (1, 0.13436424411240122, 3639700191, 840964324912, 64, 4179),
            (
                (1u64 << 32) + 5,
                0.15727238718789782,
                1213270837,
                665247166058,
                855,
                237,
            ),
            (
                u64::MAX,
                0.021825695401270107,
                1452108352,
                234585750291,
                467,
                10078,
            ),
        ];
        for (seed, f, b32, b40, r1000, r10848) in cases {
            let mut r = PyRandom::new(seed);
            assert_eq!(r.random(), f, "seed {seed}");
            assert_eq!(r.getrandbits(32), b32, "seed {seed}");
            assert_eq!(r.getrandbits(40), b40, "seed {seed}");
            assert_eq!(r.randbelow(1000), r1000, "seed {seed}");
            assert_eq!(r.randbelow(10848), r10848, "seed {seed}");
        }
        // random.seed(7); [random.randrange(5) for _ in range(10)]
        let mut r = PyRandom::new(7);
        let v: Vec<u64> = (0..10).map(|_| r.randbelow(5)).collect();
        assert_eq!(v, [2, 1, 3, 0, 0, 4, 0, 2, 4, 0]);
        assert_eq!(r.randbelow(0), 0);
        assert_eq!(r.getrandbits(0), 0);
    }
}
