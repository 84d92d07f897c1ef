//! Test doubles shared by the bank-building tests: a deterministic fake text encoder, made-up
//! words and template sets.

use std::path::PathBuf;

use ndarray::{Array2, ArrayView2, ArrayView4};

use crate::bank_build::labels::Templates;
use crate::detect::norm::l2_normalize;
use crate::model::encoder::EncoderInfo;
use crate::model::{Encoder, EncoderError, Weights};

/// A deterministic fake text encoder: each token id votes into a few dimensions, so texts
/// with shared tokens are similar. Records the batch shapes it saw.
pub struct FakeEncoder {
    pub info: EncoderInfo,
    pub calls: Vec<(usize, usize)>,
}

impl FakeEncoder {
    pub fn new(dim: usize) -> Self {
        FakeEncoder {
            info: EncoderInfo {
                model: "fake".into(),
                weights: Weights::Random,
                embed_dim: dim,
                image_size: 224,
                provider: "cpu".into(),
                device_requested: "cpu".into(),
                intra_threads: 1,
                ort_library: PathBuf::new(),
                ort_version: String::new(),
                fingerprint: "fakefingerprint0123456789".into(),
                image_digest: String::new(),
            },
            calls: Vec::new(),
        }
    }
}

impl Encoder for FakeEncoder {
    fn embed_images(&mut self, _: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncoderError> {
        Err(EncoderError::NoTextEncoder)
    }
    fn embed_texts(&mut self, tokens: ArrayView2<'_, i64>) -> Result<Array2<f32>, EncoderError> {
        self.calls.push(tokens.dim());
        let d = self.info.embed_dim;
        let mut out = Array2::<f32>::zeros((tokens.nrows(), d));
        for (r, mut o) in tokens.rows().into_iter().zip(out.rows_mut()) {
            for (pos, &t) in r.iter().enumerate() {
                if t == 0 {
                    break;
                }
                let h = (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                o[(h % d as u64) as usize] += 1.0;
                o[((h >> 20) % d as u64) as usize] += 0.5 + (pos % 3) as f32 * 0.1;
            }
            l2_normalize(o.as_slice_mut().expect("a row of a standard-layout array"));
        }
        Ok(out)
    }
    fn info(&self) -> &EncoderInfo {
        &self.info
    }
}

pub fn words(n: usize) -> Vec<String> {
    const SYL: [&str; 12] = [
        "ka", "ro", "mi", "tu", "sen", "dor", "pli", "vax", "qu", "ne", "bo", "lis",
    ];
    (0..n)
        .map(|i| {
            let mut w = String::new();
            let mut x = i + 7;
            for _ in 0..3 {
                w.push_str(SYL[x % SYL.len()]);
                x = x / SYL.len() + i * 31 + 3;
            }
            format!("{w}{i}")
        })
        .collect()
}

pub fn tpl(lines: &[&str]) -> Templates {
    Templates {
        name: "t".into(),
        lines: lines.iter().map(|s| s.to_string()).collect(),
    }
}
