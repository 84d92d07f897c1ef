//! The model folder contract: a directory with `model.toml` (or `model.json`) naming the image
//! and text encoder files, their tensor names and the preprocessing constants. Our own export
//! layout (`image` → `embedding`, `tokens` → `embedding`) and the Hugging Face CLIP ONNX layout
//! (`pixel_values` → `image_embeds`, `input_ids` [+ `attention_mask`] → `text_embeds`) are both
//! described by the manifest alone.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_FILES: [&str; 2] = ["model.toml", "model.json"];
// The published OpenAI CLIP constants, digit for digit.
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "model folder {0} has no model.toml or model.json (see README, \"Model folder contract\")"
    )]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid manifest {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Whether the weights are real (`pretrained`) or a random-weight fixture (`random`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    Pretrained,
    Random,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub file: PathBuf,
    #[serde(default = "default_image_input")]
    pub input: String,
    #[serde(default = "default_output")]
    pub output: String,
    #[serde(default = "default_size")]
    pub size: u32,
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Files holding the graph's weights as ONNX external data, relative to the folder (a
    /// lower peak memory while ONNX Runtime loads the model, README "Performance"). Part of
    /// the fingerprint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_data: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    pub file: PathBuf,
    #[serde(default = "default_text_input")]
    pub input: String,
    #[serde(default = "default_output")]
    pub output: String,
    /// Name of an optional 0/1 int64 attention-mask input (Hugging Face exports).
    #[serde(default)]
    pub attention_mask: Option<String>,
    #[serde(default = "default_context")]
    pub context_length: usize,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// Padding id: 0 for OpenAI/OpenCLIP, 49407 for Hugging Face exports.
    #[serde(default)]
    pub pad_id: i64,
    /// The graph accepts fewer than `context_length` tokens. The text tower is causal and pools
    /// at the end-of-text token, so a batch can be cut after its longest text: same
    /// embeddings, a fraction of the work for short labels.
    #[serde(default)]
    pub dynamic_length: bool,
}

/// The parsed `model.toml` / `model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelManifest {
    #[serde(default = "default_format")]
    pub format: u32,
    #[serde(default)]
    pub name: String,
    pub weights: Weights,
    pub embed_dim: usize,
    pub image: ImageSpec,
    pub text: Option<TextSpec>,
    /// Free-form provenance (generator, checkpoint, hashes).
    #[serde(default)]
    pub source: Option<toml::Table>,
    /// Set for an encoder variant of another model (`deploy/model/optimize.py`).
    #[serde(default)]
    pub variant: Option<super::variant::VariantSpec>,
    /// The folder the manifest was read from (not part of the file).
    #[serde(skip)]
    pub dir: PathBuf,
}

fn default_format() -> u32 {
    1
}
fn default_image_input() -> String {
    "image".into()
}
fn default_text_input() -> String {
    "tokens".into()
}
fn default_output() -> String {
    "embedding".into()
}
fn default_size() -> u32 {
    224
}
fn default_mean() -> [f32; 3] {
    CLIP_MEAN
}
fn default_std() -> [f32; 3] {
    CLIP_STD
}
fn default_context() -> usize {
    77
}
fn default_tokenizer() -> String {
    "clip-bpe".into()
}

impl ModelManifest {
    /// Reads and validates the manifest of a model folder.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let (path, is_json) = MANIFEST_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .map(|p| {
                let json = p.extension().is_some_and(|e| e == "json");
                (p, json)
            })
            .ok_or_else(|| ManifestError::NotFound(dir.to_path_buf()))?;
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io {
            path: path.clone(),
            source,
        })?;
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.clone(),
            reason,
        };
        let mut m: ModelManifest = if is_json {
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| invalid(e.to_string()))?
        };
        m.dir = dir.to_path_buf();
        m.validate().map_err(invalid)?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != 1 {
            return Err(format!(
                "format = {} is not supported (expected 1)",
                self.format
            ));
        }
        if self.embed_dim == 0 {
            return Err("embed_dim must be > 0".into());
        }
        if !(16..=4096).contains(&self.image.size) {
            return Err(format!(
                "image.size = {} is out of range 16..=4096",
                self.image.size
            ));
        }
        if self.image.std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return Err("image.std values must be positive".into());
        }
        if let Some(t) = &self.text {
            if t.tokenizer != "clip-bpe" {
                return Err(format!(
                    "text.tokenizer = {:?} is not supported (expected \"clip-bpe\")",
                    t.tokenizer
                ));
            }
            if !(2..=1024).contains(&t.context_length) {
                return Err(format!(
                    "text.context_length = {} is out of range",
                    t.context_length
                ));
            }
        }
        Ok(())
    }

    pub fn image_path(&self) -> PathBuf {
        self.dir.join(&self.image.file)
    }

    pub fn text_path(&self) -> Option<PathBuf> {
        self.text.as_ref().map(|t| self.dir.join(&t.file))
    }

    pub fn is_random(&self) -> bool {
        self.weights == Weights::Random
    }

    /// The image tower's weight files stored as external data.
    pub fn image_data_paths(&self) -> Vec<PathBuf> {
        self.image
            .external_data
            .iter()
            .map(|f| self.dir.join(f))
            .collect()
    }

    /// The model's fingerprint and its image tower's digest, from one read of its files.
    pub fn identity(&self) -> Result<Identity, ManifestError> {
        let image = sha256_file(&self.image_path())?;
        let data = self
            .image_data_paths()
            .iter()
            .map(|p| sha256_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        let text = self.text_path().map(|p| sha256_file(&p)).transpose()?;
        let mut fingerprint = Sha256::new();
        let mut tower = Sha256::new();
        for d in std::iter::once(&image).chain(&data) {
            fingerprint.update(d);
            tower.update(d);
        }
        if let Some(t) = text {
            fingerprint.update(t);
        }
        Ok(Identity {
            fingerprint: hex::encode(fingerprint.finalize()),
            image_digest: if data.is_empty() {
                hex::encode(image)
            } else {
                hex::encode(tower.finalize())
            },
        })
    }

    /// [`Identity::fingerprint`].
    pub fn fingerprint(&self) -> Result<String, ManifestError> {
        Ok(self.identity()?.fingerprint)
    }
}

/// Who a model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// SHA-256 over the SHA-256 of each encoder file (image, its external data files, then
    /// text when present), hex. Banks record it and refuse a different model.
    pub fingerprint: String,
    /// SHA-256 of the image tower, hex: of its file, or, with external data, over the
    /// SHA-256 of its file and of each data file (what `[variant] image_sha256` records and
    /// a variant check is tied to).
    pub image_digest: String,
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_layout_by_manifest_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.json"),
            r#"{"weights":"pretrained","embed_dim":512,
                "image":{"file":"vision_model.onnx","input":"pixel_values","output":"image_embeds"},
                "text":{"file":"text_model.onnx","input":"input_ids","output":"text_embeds",
                        "attention_mask":"attention_mask","pad_id":49407}}"#,
        )
        .unwrap();
        let m = ModelManifest::load(dir.path()).unwrap();
        assert_eq!(m.image.input, "pixel_values");
        assert_eq!(m.image.size, 224);
        assert_eq!(m.image.mean, CLIP_MEAN);
        let t = m.text.unwrap();
        assert_eq!(t.attention_mask.as_deref(), Some("attention_mask"));
        assert_eq!(t.pad_id, 49407);
        assert_eq!(t.context_length, 77);
    }

    #[test]
    fn missing_and_invalid_manifests_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = ModelManifest::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.toml"), "{e}");
        std::fs::write(
            dir.path().join("model.toml"),
            "weights = \"random\"\nembed_dim = 0\n[image]\nfile = \"i.onnx\"\n",
        )
        .unwrap();
        let e = ModelManifest::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("embed_dim"), "{e}");
        std::fs::write(
            dir.path().join("model.toml"),
            "weights = \"maybe\"\nembed_dim = 4\n[image]\nfile = \"i.onnx\"\n",
        )
        .unwrap();
        let e = ModelManifest::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("weights"), "{e}");
    }
}
