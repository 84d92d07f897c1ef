//! Deterministic test vectors shared by the benches.

use ndarray::Array2;
use oodgate::detect::norm::l2_normalize;
use oodgate::detect::rng::SplitMix64;

/// SplitMix64 + Box–Muller: deterministic Gaussian vectors without a `rand` API dependency.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64(seed))
    }

    fn uniform(&mut self) -> f64 {
        ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn gauss(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// `n` rows uniform on the unit sphere in `d` dimensions.
    pub fn unit_rows(&mut self, n: usize, d: usize) -> Array2<f32> {
        let mut a = Array2::from_shape_fn((n, d), |_| self.gauss());
        for mut row in a.rows_mut() {
            l2_normalize(row.as_slice_mut().expect("contiguous row"));
        }
        a
    }
}
