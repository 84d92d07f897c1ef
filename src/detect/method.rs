//! The score methods and their vocabulary: [`Method`], [`ScoreParams`], [`ScoreRow`],
//! [`ScoreError`]; its own file because config, the CLI and the bank name them without scoring.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How far from 1 the L2 norm of an input embedding may be before [`Scorer`](super::scorer::Scorer) rejects it.
///
/// Loose on purpose: fp16 encoders produce norms a few 1e-4 off. It exists to catch callers
/// that forget to normalise, not to police rounding.
pub const INPUT_NORM_TOLERANCE: f32 = 1e-3;

/// Errors from building a [`Scorer`](super::scorer::Scorer) or scoring a batch.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ScoreError {
    /// The ID bank has no rows or zero columns.
    #[error("the ID bank is empty ({rows} rows × {cols} columns)")]
    EmptyIdBank { rows: usize, cols: usize },
    /// A matrix or an input batch has the wrong embedding dimension / row count.
    #[error("{what}: expected {expected}, got {got}")]
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A bank row contains NaN/inf or has zero norm, so it cannot be normalised.
    #[error("{bank} bank row {row} is not a usable direction (non-finite or zero norm)")]
    BadBankRow { bank: &'static str, row: usize },
    /// An input embedding contains NaN or ±inf.
    #[error("input row {row} contains a non-finite value")]
    NonFiniteInput { row: usize },
    /// An input embedding is not L2-normalised (|‖x‖ − 1| > [`INPUT_NORM_TOLERANCE`]).
    #[error("input row {row} has L2 norm {norm}, expected 1 ± {INPUT_NORM_TOLERANCE}")]
    NotNormalized { row: usize, norm: f32 },
    /// The method needs the CLIPN "no" embeddings T̄ but the scorer has none.
    #[error("method `{method}` needs the CLIPN \"no\" embeddings, which this bank lacks")]
    MissingNoEmbeddings { method: Method },
    /// The method needs outlier / negative rows but the bank has none.
    #[error("method `{method}` needs at least one outlier (negative) row, the bank has none")]
    NoOutliers { method: Method },
    /// A [`ScoreParams`] field is out of range.
    #[error("invalid score parameter {name} = {value}: {reason}")]
    InvalidParam {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Error from parsing a [`Method`] name.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "unknown score method `{0}` (expected one of: ole, ole-max, ole-penalty, clipn-atd, clipn-ctw, mcm, energy, max-logit, neglabel)"
)]
pub struct ParseMethodError(pub String);

/// A score method. Names (serde, [`FromStr`], [`Display`](fmt::Display)) are kebab-case.
/// All scores follow the crate convention **higher = more in-distribution**.
///
/// | method | score | default scale |
/// |---|---|---|
/// | `ole` | Σ_c P_c·σ(l_c − l̄_c) over the (C+M)-way softmax P (§8); without T̄: Σ_c P_c (§8.1a) | 50 |
/// | `ole-max` | max_c P_c (§8.1b) | 50 |
/// | `ole-penalty` | max_c P_c − β·max_k P̃_k (§8.1c) | 50 |
/// | `clipn-atd` | Σ_c softmax_c(l)·σ(l_c − l̄_c), outliers ignored (§9) | 100 |
/// | `clipn-ctw` | σ(l_ĉ − l̄_ĉ), ĉ = argmax_c l_c (§9) | 100 |
/// | `mcm` | max_c softmax_c(s·cos) over ID only (§9) | 1 (T = 1) |
/// | `energy` | (1/s)·LSE_c(s·cos_c) over ID only (§9) | 1 (T = 1) |
/// | `max-logit` | max_c cos_c (scale unused) | 1 |
/// | `neglabel` | mean over groups of Σ_c e^{s·cos_c} / (Σ_c e^{s·cos_c} + Σ_{j∈G} e^{s·cos_j}) (§9) | 100 (τ = 0.01) |
///
/// Here `l = s·cos` with `s` = [`ScoreParams::scale`] (`s = 1/T` for temperature methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// OLE (§8); without T̄ falls back to variant (a), the ID mass of the (C+M)-way softmax.
    #[default]
    Ole,
    /// Variant (b): max_c P_c over the (C+M)-way softmax.
    OleMax,
    /// Variant (c): max_c P_c − β·max_k P̃_k.
    OlePenalty,
    /// CLIPN "agreeing-to-differ": OLE with the outliers ignored.
    ClipnAtd,
    /// CLIPN "competing-to-win": σ(l_ĉ − l̄_ĉ) for the top ID class ĉ.
    ClipnCtw,
    /// Maximum concept matching: max softmax over ID classes.
    Mcm,
    /// Energy: T·log Σ_c exp(cos_c / T) over ID classes.
    Energy,
    /// max_c cos_c.
    MaxLogit,
    /// NegLabel with grouping; the outlier rows are the mined negative labels.
    #[serde(rename = "neglabel")]
    NegLabel,
}

impl Method {
    /// Every method, in documentation order.
    pub const ALL: [Method; 9] = [
        Method::Ole,
        Method::OleMax,
        Method::OlePenalty,
        Method::ClipnAtd,
        Method::ClipnCtw,
        Method::Mcm,
        Method::Energy,
        Method::MaxLogit,
        Method::NegLabel,
    ];

    /// The canonical kebab-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Ole => "ole",
            Method::OleMax => "ole-max",
            Method::OlePenalty => "ole-penalty",
            Method::ClipnAtd => "clipn-atd",
            Method::ClipnCtw => "clipn-ctw",
            Method::Mcm => "mcm",
            Method::Energy => "energy",
            Method::MaxLogit => "max-logit",
            Method::NegLabel => "neglabel",
        }
    }

    /// The default logit scale s (= 1/T) from docs/method.md: OLE 50, CLIPN 100, MCM and Energy 1
    /// (T = 1 on raw cosines), NegLabel 100 (τ = 0.01). Max-logit ignores the scale (1).
    pub const fn default_scale(self) -> f32 {
        match self {
            Method::Ole | Method::OleMax | Method::OlePenalty => 50.0,
            Method::ClipnAtd | Method::ClipnCtw => 100.0,
            Method::Mcm | Method::Energy | Method::MaxLogit => 1.0,
            Method::NegLabel => 100.0,
        }
    }

    /// True for methods that cannot run without the CLIPN "no" embeddings T̄.
    /// (`ole` uses T̄ when present and falls back to variant (a) otherwise.)
    pub const fn requires_no_embeddings(self) -> bool {
        matches!(self, Method::ClipnAtd | Method::ClipnCtw)
    }

    /// True for methods that read the outlier rows Ô (or NegLabel's negatives).
    pub const fn uses_outliers(self) -> bool {
        matches!(
            self,
            Method::Ole | Method::OleMax | Method::OlePenalty | Method::NegLabel
        )
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = ParseMethodError;

    /// Accepts the canonical names, case-insensitively and with `_` for `-`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == norm)
            .ok_or_else(|| ParseMethodError(s.to_owned()))
    }
}

/// Tunables of the score functions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreParams {
    /// Logit scale s = 1/T applied to cosines (finite, > 0). See [`Method::default_scale`].
    pub scale: f32,
    /// β of `ole-penalty` (finite, ≥ 0). Default 0.25.
    pub penalty_beta: f32,
    /// Number of NegLabel groups (≥ 1). Default 100.
    pub neglabel_groups: usize,
    /// Seed of the NegLabel permutation. Default 0.
    pub neglabel_seed: u64,
}

impl Default for ScoreParams {
    fn default() -> Self {
        Self::for_method(Method::Ole)
    }
}

impl ScoreParams {
    /// Defaults with the method's default scale.
    pub fn for_method(method: Method) -> Self {
        Self {
            scale: method.default_scale(),
            penalty_beta: 0.25,
            neglabel_groups: 100,
            neglabel_seed: 0,
        }
    }

    /// Check every field's range.
    pub fn validate(&self) -> Result<(), ScoreError> {
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(ScoreError::InvalidParam {
                name: "scale",
                value: self.scale.to_string(),
                reason: "must be finite and > 0",
            });
        }
        if !(self.penalty_beta.is_finite() && self.penalty_beta >= 0.0) {
            return Err(ScoreError::InvalidParam {
                name: "penalty_beta",
                value: self.penalty_beta.to_string(),
                reason: "must be finite and >= 0",
            });
        }
        if self.neglabel_groups == 0 {
            return Err(ScoreError::InvalidParam {
                name: "neglabel_groups",
                value: "0".to_owned(),
                reason: "must be >= 1",
            });
        }
        Ok(())
    }
}

/// One scored image with the cheap by-products used for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoreRow {
    /// The method's score, higher = more ID.
    pub score: f64,
    /// Index of the ID class with the highest cosine (first one on ties).
    pub top_id: usize,
    /// Cosine of `top_id`.
    pub top_id_cos: f32,
    /// Index of the outlier row with the highest cosine; `None` when the bank has no outliers.
    pub top_outlier: Option<usize>,
    /// Cosine of `top_outlier`.
    pub top_outlier_cos: Option<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        let names = [
            "ole",
            "ole-max",
            "ole-penalty",
            "clipn-atd",
            "clipn-ctw",
            "mcm",
            "energy",
            "max-logit",
            "neglabel",
        ];
        for (m, n) in Method::ALL.into_iter().zip(names) {
            assert_eq!(m.to_string(), n);
            assert_eq!(n.parse::<Method>(), Ok(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{n}\""));
            assert_eq!(
                serde_json::from_str::<Method>(&format!("\"{n}\"")).unwrap(),
                m
            );
        }
        assert_eq!("OLE_MAX".parse::<Method>(), Ok(Method::OleMax));
        assert!("neg-label".parse::<Method>().is_err());
        assert_eq!(Method::Ole.default_scale(), 50.0);
        assert_eq!(Method::ClipnAtd.default_scale(), 100.0);
        assert_eq!(Method::Mcm.default_scale(), 1.0);
        assert_eq!(Method::Energy.default_scale(), 1.0);
        assert_eq!(Method::NegLabel.default_scale(), 100.0);
        assert!(Method::ClipnCtw.requires_no_embeddings());
        assert!(!Method::Ole.requires_no_embeddings());
        let p: ScoreParams = serde_json::from_str(r#"{"scale": 100.0}"#).unwrap();
        assert_eq!(p.penalty_beta, 0.25);
        assert_eq!(p.neglabel_groups, 100);
    }
}
