//! A small reader of `.npy` matrices (float16/32/64, C or Fortran order); hand-written because
//! ndarray-npy reads no float16, which clip-retrieval writes.

use std::path::{Path, PathBuf};

use half::f16;
use ndarray::Array2;
use thiserror::Error;

/// Errors of [`read_npy`].
#[derive(Debug, Error)]
#[error("{path}: {reason}")]
pub struct NpyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Reads a 2-D (or 1-D: one row) little-endian float16/float32/float64 `.npy` as f32, C or
/// Fortran order. clip-retrieval writes float16 `[N, D]`.
pub fn read_npy(path: &Path) -> Result<Array2<f32>, NpyError> {
    let err = |reason: String| NpyError {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    parse_npy(&bytes).map_err(err)
}

/// Parses the bytes of a `.npy` file (see [`read_npy`]).
fn parse_npy(bytes: &[u8]) -> Result<Array2<f32>, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let k = format!("'{key}':");
        let p = header.find(&k)? + k.len();
        Some(header[p..].trim_start())
    };
    let descr = field("descr").ok_or("header has no descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("bad descr")?;
    let fortran = field("fortran_order")
        .ok_or("header has no fortran_order")?
        .starts_with("True");
    let shape_txt = field("shape").ok_or("header has no shape")?;
    let shape_txt = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match shape.as_slice() {
        [n, d] => (*n, *d),
        [d] => (1, *d),
        other => return Err(format!("expected a 2-D array, got shape {other:?}")),
    };
    let width = match descr {
        "<f2" => 2,
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "unsupported dtype {other:?} (expected little-endian float16, float32 or float64)"
            ));
        }
    };
    let n = rows.checked_mul(cols).ok_or("shape overflows")?;
    let data = &bytes[start + hlen..];
    if data.len() < n * width {
        return Err(format!(
            "truncated data: {} bytes for shape {shape:?} of {descr}",
            data.len()
        ));
    }
    let vals: Vec<f32> = match width {
        2 => data[..n * 2]
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        4 => data[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => data[..n * 8]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    let arr = if fortran {
        Array2::from_shape_vec((cols, rows), vals)
            .map_err(|e| e.to_string())?
            .reversed_axes()
            .as_standard_layout()
            .into_owned()
    } else {
        Array2::from_shape_vec((rows, cols), vals).map_err(|e| e.to_string())?
    };
    Ok(arr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, fortran: bool, data: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_dtypes_and_orders() {
        let f32s: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(&npy("<f4", "(2, 3)", false, &f32s)).unwrap();
        assert_eq!(a, ndarray::array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let f = parse_npy(&npy("<f4", "(2, 3)", true, &f32s)).unwrap();
        assert_eq!(f, ndarray::array![[1.0f32, 3.0, 5.0], [2.0, 4.0, 6.0]]);
        // float16: 1.0 = 0x3c00, -2.0 = 0xc000, 0.5 = 0x3800, 65504 = 0x7bff, 2^-24 = 0x0001.
        let h: Vec<u8> = [0x3c00u16, 0xc000, 0x3800, 0x7bff, 0x0001, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(&npy("<f2", "(3, 2)", false, &h)).unwrap();
        assert_eq!(
            a.iter().copied().collect::<Vec<_>>(),
            vec![1.0, -2.0, 0.5, 65504.0, 2f32.powi(-24), 0.0]
        );
        let d: Vec<u8> = [0.25f64, -1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            parse_npy(&npy("<f8", "(2,)", false, &d)).unwrap(),
            ndarray::array![[0.25f32, -1.0]]
        );
        assert!(parse_npy(&npy("<i4", "(1, 1)", false, &[0; 4])).is_err());
        assert!(parse_npy(&npy("<f4", "(2, 3)", false, &f32s[..20])).is_err());
        assert!(parse_npy(b"hello world").is_err());
        // What ndarray-npy writes reads back.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.npy");
        let m = ndarray::array![[0.5f32, 1.5], [2.5, -3.5]];
        ndarray_npy::write_npy(&p, &m).unwrap();
        assert_eq!(read_npy(&p).unwrap(), m);
    }
}
