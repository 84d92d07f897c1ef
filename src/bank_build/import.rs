//! A bank from matrices computed elsewhere (e.g. the Python reference); its own file because it
//! needs neither the encoder nor the prototype steps.

use std::collections::BTreeMap;

use ndarray::Array2;

use super::BuildError;
use super::labels::IdLabels;
use crate::detect::bank::{BANK_FORMAT, Bank, BankMeta, OutlierRow};

/// Matrices computed elsewhere, to be packed into a bank.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// ID embeddings T (C × D).
    pub id: Array2<f32>,
    /// The ID classes (C names).
    pub id_labels: IdLabels,
    /// CLIPN "no" embeddings T̄ (C × D).
    pub no: Option<Array2<f32>>,
    /// Outlier rows Ô (M × D) with one label each (or none: numbered labels).
    pub outliers: Option<(Array2<f32>, Option<Vec<String>>)>,
    /// The model the matrices belong to.
    pub model_fingerprint: String,
    /// Its name, if known.
    pub model_name: String,
    /// "pretrained", "random" or "unknown".
    pub model_weights: String,
    /// θ, if known.
    pub theta: Option<f64>,
    /// The logit scale to store, if any.
    pub scale: Option<f32>,
    /// Recorded in `BankMeta.build`.
    pub params: serde_json::Value,
}

/// Packs precomputed matrices into a bank (rows are re-normalised by [`Bank::new`]).
pub fn import_bank(req: ImportRequest) -> Result<Bank, BuildError> {
    let d = req.id.ncols();
    if req.id_labels.len() != req.id.nrows() {
        return Err(BuildError::Invalid(format!(
            "{} ID labels for {} ID embedding rows",
            req.id_labels.len(),
            req.id.nrows()
        )));
    }
    let (outliers, rows) = match req.outliers {
        Some((m, labels)) => {
            let labels = match labels {
                Some(l) if l.len() != m.nrows() => {
                    return Err(BuildError::Invalid(format!(
                        "{} outlier labels for {} outlier rows",
                        l.len(),
                        m.nrows()
                    )));
                }
                Some(l) => l,
                None => (0..m.nrows()).map(|i| format!("outlier {i}")).collect(),
            };
            let rows = labels
                .into_iter()
                .map(|l| OutlierRow {
                    kind: "imported".into(),
                    words: vec![l.clone()],
                    label: l,
                    detail: serde_json::Value::Null,
                })
                .collect();
            (m, rows)
        }
        None => (Array2::zeros((0, d)), Vec::new()),
    };
    let meta = BankMeta {
        format: BANK_FORMAT,
        version: String::new(),
        created_by: format!("oodgate {} (import)", env!("CARGO_PKG_VERSION")),
        model_fingerprint: req.model_fingerprint,
        model_name: req.model_name,
        model_weights: req.model_weights,
        dim: d,
        id_labels: req.id_labels.names,
        id_wnids: req.id_labels.wnids,
        scale: req.scale,
        outliers: rows,
        theta: req.theta,
        build: req.params,
        cleaning: serde_json::Value::Null,
        thresholds: BTreeMap::new(),
        index: None,
    };
    Ok(Bank::new(meta, req.id, req.no, outliers)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_checks_lengths() {
        let req = ImportRequest {
            id: ndarray::array![[1.0f32, 0.0], [0.0, 1.0]],
            id_labels: IdLabels {
                names: vec!["a".into(), "b".into()],
                wnids: vec![None, None],
            },
            no: None,
            outliers: Some((ndarray::array![[1.0f32, 1.0]], None)),
            model_fingerprint: "fp".into(),
            model_name: String::new(),
            model_weights: "unknown".into(),
            theta: None,
            scale: Some(30.0),
            params: serde_json::Value::Null,
        };
        let b = import_bank(req.clone()).unwrap();
        assert_eq!(b.meta.outliers[0].label, "outlier 0");
        assert_eq!(b.meta.scale, Some(30.0));
        let mut bad = req.clone();
        bad.outliers = Some((ndarray::array![[1.0f32, 1.0]], Some(vec![])));
        assert!(import_bank(bad).is_err());
        let mut bad = req;
        bad.id_labels.names.pop();
        bad.id_labels.wnids.pop();
        assert!(import_bank(bad).is_err());
    }
}
