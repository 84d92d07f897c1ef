//! Encoder variants: an image tower rewritten for speed (fused fp32, int8, fp16, by
//! `deploy/model/optimize.py`) from a reference model. A bank records the fingerprint of the
//! model whose text tower built it; a variant's image tower has another fingerprint, so a bank
//! of the reference is accepted for a variant only through an explicit, recorded check:
//! `oodgate model check` measures the variant against the reference on the user's images and
//! bank and, when the decisions agree often enough, writes [`COMPATIBILITY_FILE`] into the
//! variant's folder. Nothing is accepted silently.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{Identity, ModelManifest};

/// Written by `oodgate model check` into the variant's folder.
pub const COMPATIBILITY_FILE: &str = "compatibility.json";

/// The manifest's `[variant]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSpec {
    /// `fp32` (fused), `int8` or `fp16`.
    pub precision: String,
    /// The reference model's fingerprint (the one its banks record).
    pub of: String,
    #[serde(default)]
    pub reference_name: String,
    /// What was done, in one line.
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub tool: String,
    /// SHA-256 of the variant's image file as written.
    #[serde(default)]
    pub image_sha256: String,
}

/// The record of one `oodgate model check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compatibility {
    /// The reference's fingerprint.
    pub reference: String,
    /// [`Identity::image_digest`] of the checked image tower: a changed file (or
    /// external data file) needs a new check.
    pub variant_image_sha256: String,
    pub precision: String,
    pub bank_version: String,
    pub method: String,
    pub threshold: f64,
    pub images: usize,
    pub cosine_min: f64,
    pub cosine_median: f64,
    pub score_diff_max: f64,
    pub score_diff_median: f64,
    /// Fraction of images with the same decision under both models.
    pub agreement: f64,
    pub min_agreement: f64,
    pub compatible: bool,
    pub oodgate: String,
    pub checked_at_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VariantError {
    #[error(
        "model {model} is a {precision} variant of the bank's model {reference} but has not passed `oodgate model check` ({why}); run `oodgate model check --reference REFERENCE_DIR --model {model} --bank BANK IMAGES...` on your own images"
    )]
    NotChecked {
        model: PathBuf,
        precision: String,
        reference: String,
        why: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] super::ManifestError),
}

impl Compatibility {
    /// Reads the variant folder's record, if any.
    pub fn load(dir: &Path) -> Result<Option<Compatibility>, String> {
        let path = dir.join(COMPATIBILITY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{} is not a check record: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the record when compatible; removes an older one otherwise (a failed check
    /// revokes a previous pass).
    pub fn store(&self, dir: &Path) -> Result<(), VariantError> {
        let path = dir.join(COMPATIBILITY_FILE);
        let io = |source| VariantError::Write {
            path: path.clone(),
            source,
        };
        if self.compatible {
            let text =
                serde_json::to_string_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
            let tmp = dir.join(format!(".{COMPATIBILITY_FILE}.tmp"));
            std::fs::write(&tmp, text + "\n").map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            }
        }
    }
}

/// The fingerprint a bank must record to be used with `manifest`'s model (whose own
/// fingerprint is `own`): its own, or, for a variant of the bank's model (`bank`) that passed
/// `oodgate model check` for this very image file, the reference's, with the record.
/// A variant of the bank's model without a valid record is an error; any other mismatch is
/// left to the bank's own fingerprint check.
pub fn bank_fingerprint(
    manifest: &ModelManifest,
    own: &Identity,
    bank: &str,
) -> Result<(String, Option<Compatibility>), VariantError> {
    let Identity {
        fingerprint: own,
        image_digest: sha,
    } = own;
    let Some(v) = manifest
        .variant
        .as_ref()
        .filter(|v| v.of == bank && own != bank)
    else {
        return Ok((own.to_string(), None));
    };
    let not_checked = |why: String| VariantError::NotChecked {
        model: manifest.dir.clone(),
        precision: v.precision.clone(),
        reference: bank.to_string(),
        why,
    };
    let record = Compatibility::load(&manifest.dir)
        .map_err(not_checked)?
        .ok_or_else(|| not_checked(format!("no {COMPATIBILITY_FILE}")))?;
    if record.reference != bank {
        return Err(not_checked(format!(
            "the record is for reference {}",
            record.reference
        )));
    }
    if &record.variant_image_sha256 != sha {
        return Err(not_checked(
            "the image tower's files changed since the check".to_string(),
        ));
    }
    if !record.compatible {
        return Err(not_checked(format!(
            "agreement {} < {}",
            record.agreement, record.min_agreement
        )));
    }
    Ok((bank.to_string(), Some(record)))
}
