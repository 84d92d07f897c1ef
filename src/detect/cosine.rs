//! The one matrix product of scoring, cosines of a batch against bank rows (`gemm` crate); its
//! own file because the exact and the approximate scorer both call it.

use ndarray::{Array2, ArrayView2};

/// `x · wᵀ`: every row of `x` (B × D) against every row of `w` (N × D), as a B × N matrix in
/// standard (row-major) layout so that each image's cosines are one contiguous slice. Rows
/// are expected unit-norm, which makes the dot products cosines; nothing here depends on it.
///
/// # Panics
/// If the two inputs differ in width (callers check shapes against the bank first).
///
/// The one matrix product of scoring: cosines of a batch of image embeddings against bank rows.
///
/// Uses the `gemm` crate rather than ndarray's `matrixmultiply` backend, from measurement
/// (2-core AMD EPYC, one thread, 1,200 bank rows × 512 dims, best of 1,000): per batch of
/// 1 / 8 / 32 / 64 / 256 images, matrixmultiply took 239 / 289 / 535 / 948 / 3,454 µs and
/// `gemm` on the transposed problem plus the transposing copy 35 / 165 / 375 / 750 / 3,158 µs.
/// matrixmultiply repacks the whole bank on every call; `gemm` does less of that and has a
/// matrix–vector path for the small batches a streaming worker often sees.
pub fn cosines(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>) -> Array2<f32> {
    assert_eq!(x.ncols(), w.ncols(), "cosines: embedding widths differ");
    let (b, n, d) = (x.nrows(), w.nrows(), x.ncols());
    if b == 0 || n == 0 || d == 0 {
        return Array2::zeros((b, n));
    }
    // Computed as cᵀ = w · xᵀ (N × B): `gemm` is fastest with the long bank side as the
    // output's rows (measured above). Small outputs are written N × B and copied back to
    // B × N (~0.7 µs per image, cheaper than gemm's strided stores); large ones (big banks)
    // are written B × N in place, saving a second buffer of the same size and its page faults.
    let direct = n * b > DIRECT_OUTPUT_ABOVE;
    let mut out = if direct {
        Array2::<f32>::zeros((b, n))
    } else {
        Array2::<f32>::zeros((n, b))
    };
    // (column stride, row stride) of cᵀ's element (j, i) in `out`.
    let (dst_cs, dst_rs) = if direct { (n, 1) } else { (1, b) };
    let (ws, xs) = (w.strides(), x.strides());
    // SAFETY: `out` is an owned array in standard layout holding cᵀ's element (j, i) for
    // j < n, i < b at `j·dst_rs + i·dst_cs`, every such offset within it. `w`'s element
    // (j, k) lies at `w.as_ptr() + j·ws[0] + k·ws[1]` for k < d, and `xᵀ`'s element (k, i) =
    // x[i, k] at `x.as_ptr() + i·xs[0] + k·xs[1]`: both views are alive and unaliased with
    // `out` for the whole call. `read_dst` is false, so the zeros in `out` are overwritten,
    // not read; the call runs on this thread only.
    unsafe {
        gemm::gemm(
            n,
            b,
            d,
            out.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            false,
            w.as_ptr(),
            ws[1],
            ws[0],
            x.as_ptr(),
            xs[0],
            xs[1],
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    if direct {
        out
    } else {
        out.t().as_standard_layout().into_owned()
    }
}

/// Outputs with more elements than this (16 MiB of f32) are written in their final layout.
const DIRECT_OUTPUT_ABOVE: usize = 1 << 22;

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut state = seed;
        Array2::from_shape_fn((rows, cols), |_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
    }

    fn naive(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>) -> Array2<f64> {
        Array2::from_shape_fn((x.nrows(), w.nrows()), |(i, j)| {
            x.row(i)
                .iter()
                .zip(w.row(j))
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum()
        })
    }

    fn assert_matches(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>) {
        let got = cosines(x, w);
        let want = naive(x, w);
        assert_eq!(got.dim(), want.dim());
        assert!(got.is_standard_layout());
        for ((i, j), &g) in got.indexed_iter() {
            let e = want[[i, j]];
            assert!(
                (f64::from(g) - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "({i}, {j}): {g} vs {e}"
            );
        }
    }

    #[test]
    fn matches_naive_products_for_every_batch_size() {
        let w = matrix(300, 64, 1);
        for b in [1, 2, 7, 32, 65] {
            assert_matches(matrix(b, 64, 2 + b as u64).view(), w.view());
        }
    }

    #[test]
    fn strided_and_reversed_views() {
        let w = matrix(100, 48, 3);
        let x = matrix(20, 48, 4);
        // Every other bank row, a row-reversed batch, and a transposed (column-major) batch.
        assert_matches(x.view(), w.slice(s![..;2, ..]));
        assert_matches(x.slice(s![..;-1, ..]), w.view());
        let xt = x.t().to_owned();
        assert_matches(xt.t(), w.view());
        // A slice of rows in the middle, as the scorer takes the ID block of a bank.
        assert_matches(x.view(), w.slice(s![10..60, ..]));
    }

    #[test]
    fn large_outputs_written_in_place_match_too() {
        // 3 × (DIRECT_OUTPUT_ABOVE / 3 + 5) outputs: written in place, the other store layout.
        let n = DIRECT_OUTPUT_ABOVE / 3 + 5;
        let w = matrix(n, 4, 7);
        let x = matrix(3, 4, 8);
        assert!(x.nrows() * n > DIRECT_OUTPUT_ABOVE);
        assert_matches(x.view(), w.view());
        assert_matches(x.slice(s![..;-1, ..]), w.slice(s![..;-1, ..]));
    }

    #[test]
    fn empty_sides_give_empty_or_zero_matrices() {
        let w = matrix(5, 8, 5);
        let none = Array2::<f32>::zeros((0, 8));
        assert_eq!(cosines(none.view(), w.view()).dim(), (0, 5));
        assert_eq!(cosines(w.view(), none.view()).dim(), (5, 0));
        // Zero-width embeddings: every product is the empty sum.
        let (x0, w0) = (Array2::<f32>::zeros((3, 0)), Array2::<f32>::zeros((5, 0)));
        assert_eq!(cosines(x0.view(), w0.view()), Array2::<f32>::zeros((3, 5)));
    }
}
