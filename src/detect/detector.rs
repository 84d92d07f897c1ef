//! The one `Detector`: a bank, its scorer (exact or approximate), a method, a threshold and the
//! HNSW explanations, assembled once and used by every command (`serve`, `score`, `eval`,
//! `calibrate`, `bench`). Embeddings in, verdicts out; the threshold is resolved here only.

use std::sync::Arc;

use ndarray::{ArrayView2, s};

use super::approx::ApproxParams;
use super::bank::{Bank, BankError, BankIndex, Explanation};
use super::index::IndexParams;
use super::method::{Method, ScoreError, ScoreParams, ScoreRow};
use super::scorer::Scorer;

/// Rows scored per call into the scorer: bounds the cosine matrix of large inputs.
const SCORE_BLOCK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(transparent)]
    Bank(#[from] BankError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Threshold(#[from] ThresholdError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThresholdError {
    #[error("the threshold must be a finite number, got {0}")]
    NotFinite(f64),
    #[error(
        "the bank has no calibrated threshold for method `{method}` (it has: {available}); \
         calibrate one on held-out ID images with\n  oodgate calibrate --bank BANK --model DIR \
         --method {method} --id ID_IMAGES... --tpr 0.95 --write\nor pass --threshold X \
         (detector.threshold for serve)"
    )]
    Missing { method: Method, available: String },
}

/// Where the routing threshold comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdChoice {
    /// Given explicitly (`--threshold`, `detector.threshold`).
    Given(f64),
    /// The bank's calibrated threshold for the method; an error when it has none.
    FromBank,
    /// The bank's threshold, else this value (benchmarks, where the split does not matter).
    FromBankOr(f64),
    /// No decisions are made (`eval`, `calibrate` only need scores).
    None,
}

/// A resolved threshold and where it came from (`--threshold`, `bank`, `default`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub value: f64,
    pub source: &'static str,
}

/// Resolves the threshold for `method` (the one place that does).
pub fn resolve_threshold(
    bank: &Bank,
    method: Method,
    choice: ThresholdChoice,
) -> Result<Option<Threshold>, ThresholdError> {
    let stored = bank
        .meta
        .thresholds
        .get(method.as_str())
        .map(|t| Threshold {
            value: t.value,
            source: "bank",
        });
    let t = match choice {
        ThresholdChoice::None => return Ok(None),
        ThresholdChoice::Given(v) if !v.is_finite() => return Err(ThresholdError::NotFinite(v)),
        ThresholdChoice::Given(v) => Threshold {
            value: v,
            source: "--threshold",
        },
        ThresholdChoice::FromBankOr(v) => stored.unwrap_or(Threshold {
            value: v,
            source: "default",
        }),
        ThresholdChoice::FromBank => stored.ok_or_else(|| ThresholdError::Missing {
            method,
            available: if bank.meta.thresholds.is_empty() {
                "none".to_string()
            } else {
                bank.meta
                    .thresholds
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?,
    };
    Ok(Some(t))
}

/// How to assemble a detector: from settings (`serve`) or flags (the offline commands).
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorSpec {
    pub method: Method,
    /// Logit scale override (default: the bank's, else the method's).
    pub scale: Option<f32>,
    pub threshold: ThresholdChoice,
    /// Nearest ID labels and outlier words per verdict (0 = no explanations).
    pub top_k: usize,
    pub approx: ApproxParams,
}

impl DetectorSpec {
    pub fn new(method: Method) -> DetectorSpec {
        DetectorSpec {
            method,
            scale: None,
            threshold: ThresholdChoice::FromBank,
            top_k: 3,
            approx: ApproxParams::default(),
        }
    }

    /// Score parameters of the method on `bank`: the scale override, else the bank's stored
    /// scale, else the method's default.
    pub fn params(&self, bank: &Bank) -> ScoreParams {
        let mut p = ScoreParams::for_method(self.method);
        if let Some(s) = self.scale.or(bank.meta.scale) {
            p.scale = s;
        }
        p
    }
}

/// Inside or outside the distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Id,
    Ood,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Id => "id",
            Decision::Ood => "ood",
        }
    }
}

/// One image's answer: its score, the decision at the threshold, and why.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub score: f64,
    pub decision: Decision,
    /// The nearest ID label: from the explanation when there is one, else the argmax class.
    pub top_label: String,
    /// The ID class with the highest cosine (the adaptive memory's bucket).
    pub top_id: usize,
    pub explanation: Option<Explanation>,
    /// What the adaptive detector did (`score` is then its score).
    pub adaptive: Option<super::adaptive::Adapted>,
}

/// A bank ready to score and decide.
pub struct Detector {
    bank: Arc<Bank>,
    scorer: Scorer,
    index: Option<BankIndex>,
    method: Method,
    params: ScoreParams,
    threshold: Option<Threshold>,
    top_k: usize,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("bank", &self.bank.version())
            .field("method", &self.method)
            .field("threshold", &self.threshold)
            .field("top_k", &self.top_k)
            .finish_non_exhaustive()
    }
}

impl Verdict {
    /// Applies the adaptive detector's result: its score decides at `threshold`.
    pub fn adapt(&mut self, a: super::adaptive::Adapted, threshold: f64) {
        self.score = a.score;
        self.decision = if a.score >= threshold {
            Decision::Id
        } else {
            Decision::Ood
        };
        self.adaptive = Some(a);
    }
}

impl Detector {
    /// Builds the scorer (and the HNSW index when explanations or approximate scoring need
    /// it) and resolves the threshold.
    pub fn new(bank: impl Into<Arc<Bank>>, spec: &DetectorSpec) -> Result<Detector, DetectorError> {
        Detector::assemble(bank.into(), None, spec)
    }

    /// The same bank under another spec (`eval` and `calibrate` compare methods): the bank
    /// and a loaded HNSW index are shared, not copied or rebuilt.
    pub fn with_spec(&self, spec: &DetectorSpec) -> Result<Detector, DetectorError> {
        Detector::assemble(self.bank.clone(), self.index.clone(), spec)
    }

    fn assemble(
        bank: Arc<Bank>,
        index: Option<BankIndex>,
        spec: &DetectorSpec,
    ) -> Result<Detector, DetectorError> {
        let params = spec.params(&bank);
        params.validate()?;
        spec.approx.validate()?;
        let threshold = resolve_threshold(&bank, spec.method, spec.threshold)?;
        let approximate = spec.approx.applies_to(bank.outliers.nrows());
        let index = match index {
            Some(ix) => Some(ix),
            None => (spec.top_k > 0 || approximate).then(|| bank.indexes(IndexParams::default())),
        };
        let mut scorer = bank.scorer(&params)?;
        if let (Some(ix), true) = (&index, approximate) {
            scorer = scorer.with_approximation(ix.outliers.clone(), spec.approx)?;
        }
        Ok(Detector {
            bank,
            scorer,
            index,
            method: spec.method,
            params,
            threshold,
            top_k: spec.top_k,
        })
    }

    pub fn bank(&self) -> &Bank {
        &self.bank
    }
    /// The shared bank (to get it back after scoring, e.g. to store a threshold).
    pub fn into_bank(self) -> Arc<Bank> {
        self.bank
    }
    pub fn method(&self) -> Method {
        self.method
    }
    pub fn params(&self) -> &ScoreParams {
        &self.params
    }
    pub fn threshold(&self) -> Option<Threshold> {
        self.threshold
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// The HNSW indexes, when loaded.
    pub fn index(&self) -> Option<&BankIndex> {
        self.index.as_ref()
    }

    /// Replaces the threshold (`bench` routes by whatever the bank has).
    pub fn set_threshold(&mut self, t: Threshold) {
        self.threshold = Some(t);
    }

    /// Scores every row of `x` (unit-norm embeddings), in blocks to bound memory.
    pub fn scores(&self, x: ArrayView2<'_, f32>) -> Result<Vec<ScoreRow>, ScoreError> {
        let mut out = Vec::with_capacity(x.nrows());
        let mut start = 0;
        while start < x.nrows() {
            let end = (start + SCORE_BLOCK).min(x.nrows());
            out.extend(self.scorer.score_batch_detailed(
                x.slice(s![start..end, ..]),
                self.method,
                &self.params,
            )?);
            start = end;
        }
        Ok(out)
    }

    /// The nearest ID labels and outlier words of one embedding (None without an index or
    /// with `top_k` 0).
    pub fn explain(&self, x: &[f32]) -> Option<Explanation> {
        let ix = self.index.as_ref().filter(|_| self.top_k > 0)?;
        Some(ix.explain(&self.bank, x, self.top_k))
    }

    /// Scores, decides and explains every row of `x`. Needs a threshold.
    pub fn verdicts(&self, x: ArrayView2<'_, f32>) -> Result<Vec<Verdict>, DetectorError> {
        let Some(t) = self.threshold else {
            return Err(ThresholdError::Missing {
                method: self.method,
                available: "not resolved for this command".into(),
            }
            .into());
        };
        let rows = self.scores(x)?;
        let mut row = Vec::with_capacity(x.ncols());
        Ok(rows
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                row.clear();
                row.extend(x.row(i).iter().copied());
                let explanation = self.explain(&row);
                let top_label = explanation
                    .as_ref()
                    .and_then(|e| e.top_labels.first())
                    .map(|t| t.0.clone())
                    .unwrap_or_else(|| {
                        self.bank
                            .meta
                            .id_labels
                            .get(r.top_id)
                            .cloned()
                            .unwrap_or_default()
                    });
                Verdict {
                    score: r.score,
                    decision: if r.score >= t.value {
                        Decision::Id
                    } else {
                        Decision::Ood
                    },
                    top_label,
                    top_id: r.top_id,
                    explanation,
                    adaptive: None,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scale: a flag (`--scale`, `detector.scale`) wins over the bank's stored scale, which
    /// wins over the method's default; the scores follow it (MCM's max softmax at s is
    /// e^{s·0.6} / (e^{s·0.6} + e^{s·0.8}) for x = (0.6, 0.8, 0) against the ID rows e0, e1).
    #[test]
    fn flag_then_bank_then_method_scale() {
        let mut bank = crate::detect::bank::tests::toy();
        let x = ndarray::array![[0.6f32, 0.8, 0.0]];
        let score = |bank: &Bank, scale: Option<f32>| {
            let spec = DetectorSpec {
                scale,
                threshold: ThresholdChoice::None,
                top_k: 0,
                ..DetectorSpec::new(Method::Mcm)
            };
            let d = Detector::new(bank.clone(), &spec).unwrap();
            (d.params().scale, d.scores(x.view()).unwrap()[0].score)
        };
        let mcm = |s: f64| 1.0 / (1.0 + (-s * 0.2).exp());
        let (s, v) = score(&bank, None);
        assert_eq!(s, Method::Mcm.default_scale());
        assert!((v - mcm(f64::from(s))).abs() < 1e-5, "{v}");
        bank.meta.scale = Some(10.0);
        let (s, v) = score(&bank, None);
        assert_eq!(s, 10.0);
        assert!((v - mcm(10.0)).abs() < 1e-5, "{v}");
        let (s, v) = score(&bank, Some(5.0));
        assert_eq!(s, 5.0);
        assert!((v - mcm(5.0)).abs() < 1e-5, "{v}");
    }
}
