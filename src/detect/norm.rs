//! The crate's L2 normalisers outside `model/` (which imports nothing from `detect/`); one file
//! so that every bank byte that depends on a normalisation comes from the same few lines.

// Two rounding variants remain on purpose, because bank bytes and version hashes depend on
// both and they differ in the last bit of some rows:
// - **scale by the inverse** (`l2_normalize`, `normalize_rows`): `x · (1/‖x‖)` in f64.
//   `Bank::new` and the `Scorer` re-normalise
//   every bank row this way.
// - **divide by the norm** (`normalized_f64`, `normalize_rows_off_unit`): `x / ‖x‖` in
//   f64. Prototype centroids, hard prototypes and label-embedding ensembles are made this way
//   before the bank re-normalises them, and `oodgate score` fixes float16 `.npy` inputs so.
//
// Every norm is `norm_f64`: squares summed in f64 in index order. (The ONNX encoder in
// `model/` scales its outputs by an f32 inverse; it keeps its own normaliser because `model/`
// imports nothing from the rest of the crate.)

use ndarray::Array2;

/// ‖v‖₂ with the squares accumulated in f64, in order.
#[inline]
pub fn norm_f64<'a>(v: impl IntoIterator<Item = &'a f32>) -> f64 {
    v.into_iter()
        .map(|&a| f64::from(a) * f64::from(a))
        .sum::<f64>()
        .sqrt()
}

/// L2-normalise `v` in place (norm accumulated in f64, each value scaled by the f64 inverse)
/// and return its original norm.
///
/// A vector whose norm is zero or not finite is left unchanged; check the returned norm.
pub fn l2_normalize(v: &mut [f32]) -> f32 {
    let norm = norm_f64(v.iter());
    if norm > 0.0 && norm.is_finite() {
        let inv = 1.0 / norm;
        for a in v.iter_mut() {
            *a = (f64::from(*a) * inv) as f32;
        }
    }
    norm as f32
}

/// L2-normalise every row of `a` in place (see [`l2_normalize`]; zero rows stay zero).
pub fn normalize_rows(a: &mut Array2<f32>) {
    for mut row in a.rows_mut() {
        match row.as_slice_mut() {
            Some(sl) => {
                l2_normalize(sl);
            }
            None => {
                let mut tmp = row.to_vec();
                l2_normalize(&mut tmp);
                for (dst, src) in row.iter_mut().zip(tmp) {
                    *dst = src;
                }
            }
        }
    }
}

/// `v / ‖v‖` of an f64 vector (an f64 sum or mean), divided in f64 and rounded to f32; `None`
/// when the norm is zero or not finite.
pub fn normalized_f64(v: &[f64]) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    Some(v.iter().map(|x| (x / norm) as f32).collect())
}

/// L2-normalises (dividing in f64) every row whose norm is off 1 by more than `tol`, leaving
/// the others bit-for-bit unchanged (so f32 embeddings written by `oodgate embed` score exactly
/// as their images do, while float16 rows are brought back to unit norm). Errors name the
/// first zero or non-finite row.
pub fn normalize_rows_off_unit(m: &mut Array2<f32>, tol: f64) -> Result<(), usize> {
    for (i, mut row) in m.rows_mut().into_iter().enumerate() {
        let norm = norm_f64(row.iter());
        if !(norm.is_finite() && norm > 0.0) {
            return Err(i);
        }
        if (norm - 1.0).abs() > tol {
            row.mapv_inplace(|v| (f64::from(v) / norm) as f32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn normalize_helpers() {
        let mut v = [3.0f32, 4.0];
        assert_eq!(l2_normalize(&mut v), 5.0);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0f32; 3];
        assert_eq!(l2_normalize(&mut z), 0.0);
        assert_eq!(z, [0.0; 3]);
        // Non-contiguous rows (a transposed view made owned keeps F-order).
        let mut a = array![[3.0f32, 0.0], [4.0, 2.0]].reversed_axes();
        normalize_rows(&mut a);
        assert!((a[[0, 0]] - 0.6).abs() < 1e-7 && (a[[0, 1]] - 0.8).abs() < 1e-7);
        assert!((a[[1, 0]] - 0.0).abs() < 1e-7 && (a[[1, 1]] - 1.0).abs() < 1e-7);
    }
    #[test]
    fn divide_variants() {
        assert_eq!(normalized_f64(&[3.0, 4.0]), Some(vec![0.6, 0.8]));
        assert_eq!(normalized_f64(&[0.0, 0.0]), None);
        assert_eq!(normalized_f64(&[f64::NAN, 1.0]), None);
        let mut m = array![[3.0f32, 4.0], [0.6, 0.8], [0.0, 0.0]];
        assert_eq!(normalize_rows_off_unit(&mut m, 1e-6), Err(2));
        assert_eq!(m.row(0).to_vec(), vec![0.6, 0.8]);
        assert_eq!(m.row(1).to_vec(), vec![0.6, 0.8]);
    }

    #[test]
    fn off_unit_rows_only() {
        let m = ndarray::array![[0.5f32, 1.5], [2.5, -3.5]];
        let mut m2 = m.clone();
        normalize_rows_off_unit(&mut m2, 1e-6).unwrap();
        assert!((m2.row(0).dot(&m2.row(0)) - 1.0).abs() < 1e-6);
        let unit = ndarray::array![[0.6f32, 0.8]];
        let mut u2 = unit.clone();
        normalize_rows_off_unit(&mut u2, 1e-6).unwrap();
        assert_eq!(u2, unit, "unit rows are left alone");
        let mut z = Array2::<f32>::zeros((2, 2));
        assert_eq!(normalize_rows_off_unit(&mut z, 1e-6), Err(0));
    }
}
