//! The worker-pool path: `publish --shards` sends each sample's image as the message payload
//! with its key, shard and sidecars in `Dataset-*` headers (which `serve` carries onto every
//! output, dead letters included), then one manifest per shard; `collect` spools each output
//! durably before acking it and commits a shard, in the input's order, once every key of its
//! manifest is spooled. No NATS client code lives here: only the formats and the files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::commit::{self, Counts, InputStamp, Layout, Marker};
use super::output::ShardOutput;
use super::tables::{ErrorKind, ErrorRow, ScoreRow, Stage};
use super::webdataset::{Sample, sidecar_ids, split_name};
use super::{Format, Shard};

/// The input shard's relative path.
pub const H_SHARD: &str = "Dataset-Shard";
/// The sample's key.
pub const H_KEY: &str = "Dataset-Key";
/// The member names in their order, as a JSON array (the image is one of them).
pub const H_MEMBERS: &str = "Dataset-Members";
/// The name of the member that is the payload.
pub const H_IMAGE: &str = "Dataset-Image";
/// `Dataset-Member-<i>`: member `i` (not the image), base64.
pub const H_MEMBER_PREFIX: &str = "Dataset-Member-";
/// The shard's format (`tar`, `tar_gz`), so `collect` writes the same.
pub const H_FORMAT: &str = "Dataset-Format";

/// The last message of a shard: what `collect` must have before it commits it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub shard: String,
    pub format: Format,
    /// Keys published, in input order.
    pub keys: Vec<String>,
    /// SHA-256 of the keys, one per line.
    pub key_digest: String,
    /// Samples read from the shard (published and not).
    pub read: u64,
    /// Samples that could not be published (no image, a damaged tar, ...), with their cause.
    pub errors: Vec<ErrorRow>,
}

pub fn key_digest(keys: &[String]) -> String {
    let mut h = Sha256::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The `Nats-Msg-Id` of a sample: the stream drops a second publish of it (a publisher that
/// crashed and re-sends its shard) within the duplicate window.
pub fn message_id(shard: &str, key: &str) -> String {
    format!("{shard}:{key}")
}

/// Header (name, value) pairs.
pub type Headers = Vec<(String, String)>;

/// The headers that carry a sample, and the payload (the image).
pub fn sample_headers(shard: &Shard, sample: &Sample) -> Option<(Headers, Vec<u8>)> {
    let image = sample.image()?;
    let names: Vec<&str> = sample.members.iter().map(|m| m.name.as_str()).collect();
    let mut h = vec![
        (H_SHARD.to_string(), shard.rel.clone()),
        (H_KEY.to_string(), sample.key.clone()),
        (
            H_MEMBERS.to_string(),
            serde_json::to_string(&names).unwrap_or_default(),
        ),
        (H_IMAGE.to_string(), image.name.clone()),
        (
            H_FORMAT.to_string(),
            match shard.format {
                Format::TarGz => "tar_gz",
                Format::Tar => "tar",
                Format::Parquet => "parquet",
                Format::Folder => "folder",
            }
            .to_string(),
        ),
    ];
    for (i, m) in sample.members.iter().enumerate() {
        if m.name != image.name {
            h.push((format!("{H_MEMBER_PREFIX}{i}"), B64.encode(&m.data)));
        }
    }
    Some((h, image.data.clone()))
}

/// One routed output, as spooled by `collect`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Spooled {
    pub key: String,
    /// `id`, `ood`, or `dlq` for a dead letter.
    pub decision: String,
    pub score: Option<f64>,
    pub threshold: Option<f64>,
    pub method: String,
    pub top_label: Option<String>,
    pub nearest_outliers: Vec<String>,
    pub bank: String,
    pub model: String,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub image: String,
    pub image_sha256: String,
    pub image_bytes: u64,
    /// Every member in input order: name and base64 data (the image included, from the
    /// payload; a dead letter above the output limit may come without it).
    pub members: Vec<(String, Option<String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("output message without the {0} header (not from `publish --shards`)")]
    Foreign(&'static str),
    #[error("output message for {shard} key {key}: {why}")]
    Bad {
        shard: String,
        key: String,
        why: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("committing {shard}: {why}")]
    Commit { shard: String, why: String },
}

/// Reads a routed output: `get` looks a header up, `subject` is where it was routed, the
/// payload is the image (or empty for a dead letter published without it).
pub fn parse_output(
    get: impl Fn(&str) -> Option<String>,
    decision: &str,
    payload: &[u8],
) -> Result<(String, Spooled), CollectError> {
    let shard = get(H_SHARD).ok_or(CollectError::Foreign(H_SHARD))?;
    let key = get(H_KEY).ok_or(CollectError::Foreign(H_KEY))?;
    let bad = |why: String| CollectError::Bad {
        shard: shard.clone(),
        key: key.clone(),
        why,
    };
    let names: Vec<String> = get(H_MEMBERS)
        .ok_or_else(|| bad(format!("no {H_MEMBERS} header")))
        .and_then(|j| serde_json::from_str(&j).map_err(|e| bad(format!("{H_MEMBERS}: {e}"))))?;
    let image = get(H_IMAGE).ok_or_else(|| bad(format!("no {H_IMAGE} header")))?;
    let mut members = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let data = if name == image {
            (!payload.is_empty()).then(|| B64.encode(payload))
        } else {
            let v = get(&format!("{H_MEMBER_PREFIX}{i}"))
                .ok_or_else(|| bad(format!("member {name}: no {H_MEMBER_PREFIX}{i} header")))?;
            B64.decode(v.as_bytes())
                .map_err(|e| bad(format!("member {name}: {e}")))?;
            Some(v)
        };
        members.push((name, data));
    }
    let num = |h: &str| get(h).and_then(|v| v.trim().parse::<f64>().ok());
    let s = Spooled {
        key,
        decision: decision.to_string(),
        score: num(crate::stream::message::H_SCORE),
        threshold: num(crate::stream::message::H_THRESHOLD),
        method: get(crate::stream::message::H_METHOD).unwrap_or_default(),
        top_label: get(crate::stream::message::H_TOP_LABEL).map(|l| l.trim().to_string()),
        nearest_outliers: get(crate::stream::message::H_NEAREST_OUTLIERS)
            .map(|v| {
                v.split(", ")
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        bank: get(crate::stream::message::H_BANK).unwrap_or_default(),
        model: get(crate::stream::message::H_MODEL).unwrap_or_default(),
        error_kind: get(crate::stream::message::H_ERROR_KIND),
        error: get(crate::stream::message::H_ERROR),
        image,
        image_sha256: hex::encode(Sha256::digest(payload)),
        image_bytes: payload.len() as u64,
        members,
    };
    Ok((shard, s))
}

/// `collect`'s spool: `_spool/<shard>/manifest.json` and one file per spooled key.
pub struct Spool {
    pub layout: Layout,
}

fn key_file(key: &str) -> String {
    format!(
        "{}.json",
        &hex::encode(Sha256::digest(key.as_bytes()))[..32]
    )
}

impl Spool {
    pub fn new(layout: Layout) -> Spool {
        Spool { layout }
    }

    fn dir(&self, shard: &str) -> PathBuf {
        self.layout.root.join("_spool").join(shard)
    }

    fn io(path: &Path) -> impl Fn(std::io::Error) -> CollectError + '_ {
        move |source| CollectError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The shard was committed already (a redelivery after the commit).
    pub fn committed(&self, shard: &str) -> bool {
        self.layout
            .root
            .join(commit::STATE)
            .join(format!("{shard}.json"))
            .exists()
    }

    /// Writes a spooled output durably; false when the key was spooled already (redelivery).
    pub fn put(&self, shard: &str, s: &Spooled) -> Result<bool, CollectError> {
        let dir = self.dir(shard).join("samples");
        let path = dir.join(key_file(&s.key));
        if path.exists() {
            return Ok(false);
        }
        std::fs::create_dir_all(&dir).map_err(Self::io(&dir))?;
        let json = serde_json::to_vec(s).map_err(|e| Self::io(&path)(std::io::Error::other(e)))?;
        commit::write_atomic(&path, &json).map_err(Self::io(&path))?;
        Ok(true)
    }

    pub fn put_manifest(&self, m: &Manifest) -> Result<(), CollectError> {
        let dir = self.dir(&m.shard);
        std::fs::create_dir_all(&dir).map_err(Self::io(&dir))?;
        let path = dir.join("manifest.json");
        let json = serde_json::to_vec(m).map_err(|e| Self::io(&path)(std::io::Error::other(e)))?;
        commit::write_atomic(&path, &json).map_err(Self::io(&path))
    }

    /// Shards with a spool folder, and how many of their keys are spooled out of how many
    /// (`None` while the manifest has not arrived).
    pub fn pending(&self) -> Vec<(String, usize, Option<usize>)> {
        let root = self.layout.root.join("_spool");
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(&root)
            .min_depth(1)
            .into_iter()
            .flatten()
        {
            if e.file_type().is_dir() && e.file_name() == "samples" {
                continue;
            }
            let is_shard = e.file_type().is_dir()
                && (e.path().join("samples").is_dir() || e.path().join("manifest.json").is_file());
            if !is_shard {
                continue;
            }
            let rel = e
                .path()
                .strip_prefix(&root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let n = std::fs::read_dir(e.path().join("samples")).map_or(0, |d| d.count());
            let want = self.manifest(&rel).map(|m| m.keys.len());
            out.push((rel, n, want));
        }
        out
    }

    fn manifest(&self, shard: &str) -> Option<Manifest> {
        let bytes = std::fs::read(self.dir(shard).join("manifest.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Commits `shard` when its manifest and every key it lists are spooled: the same
    /// outputs as `filter` (id/ood tars in input order, stats, scores and errors tables,
    /// marker), then removes its spool. `Ok(None)` while something is missing.
    pub fn try_commit(&self, shard: &str) -> Result<Option<Counts>, CollectError> {
        let Some(m) = self.manifest(shard) else {
            return Ok(None);
        };
        let dir = self.dir(shard).join("samples");
        let mut records: HashMap<String, Spooled> = HashMap::new();
        for k in &m.keys {
            let p = dir.join(key_file(k));
            let Ok(bytes) = std::fs::read(&p) else {
                return Ok(None);
            };
            let s: Spooled = serde_json::from_slice(&bytes).map_err(|e| CollectError::Commit {
                shard: shard.into(),
                why: format!("{}: {e}", p.display()),
            })?;
            records.insert(k.clone(), s);
        }
        let counts = write_shard(&self.layout, &m, &records).map_err(|e| CollectError::Commit {
            shard: shard.into(),
            why: e,
        })?;
        let spool = self.dir(shard);
        std::fs::remove_dir_all(&spool).map_err(Self::io(&spool))?;
        Ok(Some(counts))
    }
}

fn dead_kind(kind: Option<&str>) -> ErrorKind {
    match kind.unwrap_or("") {
        "corrupt" | "empty" | "resize" => ErrorKind::Undecodable,
        "not_image" | "unsupported_format" => ErrorKind::UnsupportedFormat,
        "too_large" | "too_many_pixels" | "too_complex" => ErrorKind::Oversize,
        _ => ErrorKind::DeadLetter,
    }
}

fn write_shard(
    layout: &Layout,
    m: &Manifest,
    records: &HashMap<String, Spooled>,
) -> Result<Counts, String> {
    let shard = Shard {
        path: PathBuf::from(&m.shard),
        rel: m.shard.clone(),
        format: m.format,
    };
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut out = ShardOutput::open(layout, &shard, None, None).map_err(|x| e(&x))?;
    let mut counts = Counts {
        read: m.read,
        errors: m.errors.len() as u64,
        ..Counts::default()
    };
    out.errors = m.errors.clone();
    for k in &m.keys {
        let Some(r) = records.get(k) else {
            return Err(format!("key {k} is not spooled"));
        };
        let kept = match r.decision.as_str() {
            "id" => &mut out.id,
            "ood" => &mut out.ood,
            _ => {
                counts.errors += 1;
                out.errors.push(ErrorRow {
                    key: Some(k.clone()),
                    shard: m.shard.clone(),
                    member: Some(r.image.clone()),
                    row: None,
                    stage: Stage::Decode,
                    kind: dead_kind(r.error_kind.as_deref()),
                    message: r.error.clone().unwrap_or_else(|| "dead-lettered".into()),
                    bytes: Some(r.image_bytes),
                });
                continue;
            }
        };
        let Some(writer) = kept.samples() else {
            return Err(format!("{}: not a tar or folder shard", m.shard));
        };
        for (name, data) in &r.members {
            let Some(data) = data else {
                return Err(format!("key {k}: member {name} came without its bytes"));
            };
            let bytes = B64.decode(data.as_bytes()).map_err(|x| e(&x))?;
            writer.append_member(name, &bytes).map_err(|x| e(&x))?;
        }
        writer.finish_sample();
        if r.decision == "id" {
            counts.id += 1;
        } else {
            counts.ood += 1;
        }
        let (uid, url) = r
            .members
            .iter()
            .find(|(n, _)| split_name(n).is_some_and(|(_, ext)| ext == "json"))
            .and_then(|(_, d)| d.as_ref())
            .and_then(|d| B64.decode(d.as_bytes()).ok())
            .map_or((None, None), |j| sidecar_ids(&j));
        out.scores.push(ScoreRow {
            key: k.clone(),
            shard: m.shard.clone(),
            member: Some(r.image.clone()),
            row: None,
            uid,
            url,
            image_sha256: r.image_sha256.clone(),
            decision: r.decision.clone(),
            score: r.score.unwrap_or(f64::NAN),
            threshold: r.threshold.unwrap_or(f64::NAN),
            method: r.method.clone(),
            top_labels: r.top_label.iter().cloned().collect(),
            top_scores: Vec::new(),
            nearest_outliers: r.nearest_outliers.clone(),
            bank_version: r.bank.clone(),
            model_fingerprint: r.model.clone(),
        });
    }
    let marker = Marker {
        shard: m.shard.clone(),
        input: InputStamp {
            path: m.shard.clone(),
            bytes: 0,
            mtime_ns: 0,
        },
        counts: counts.clone(),
        outputs: Vec::new(),
        config_fingerprint: format!("collect:{}", m.key_digest),
        oodgate_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    out.commit(layout, &shard, marker).map_err(|x| e(&x))?;
    Ok(counts)
}

/// The error rows of samples `publish --shards` could not send.
pub fn publish_error(shard: &Shard, sample: &Sample) -> Option<ErrorRow> {
    let p = sample.problem.as_ref()?;
    Some(ErrorRow {
        key: Some(sample.key.clone()),
        shard: shard.rel.clone(),
        member: p.member.clone(),
        row: None,
        stage: p.stage,
        kind: p.kind,
        message: p.message.clone(),
        bytes: sample.image().map(|m| m.data.len() as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::webdataset::Member;

    #[test]
    fn a_sample_travels_in_headers_and_comes_back_whole() {
        let shard = Shard {
            path: "x/00001.tar".into(),
            rel: "x/00001.tar".into(),
            format: Format::Tar,
        };
        let sample = Sample {
            key: "k1".into(),
            members: vec![
                Member {
                    name: "k1.jpg".into(),
                    ext: "jpg".into(),
                    data: b"JPEG".to_vec(),
                },
                Member {
                    name: "k1.json".into(),
                    ext: "json".into(),
                    data: b"{\n  \"uid\": \"u\"\n}".to_vec(),
                },
            ],
            problem: None,
        };
        let (headers, payload) = sample_headers(&shard, &sample).unwrap();
        assert!(headers.iter().all(|(_, v)| !v.contains('\n')));
        let mut h: HashMap<String, String> = headers.into_iter().collect();
        h.insert("Oodgate-Score".into(), "1.234568e-1".into());
        h.insert("Oodgate-Nearest-Outliers".into(), "cat, car".into());
        let (rel, s) = parse_output(|k| h.get(k).cloned(), "ood", &payload).unwrap();
        assert_eq!(rel, "x/00001.tar");
        assert_eq!(s.score, Some(0.1234568));
        assert_eq!(s.nearest_outliers, ["cat", "car"]);
        let back: Vec<(String, Vec<u8>)> = s
            .members
            .iter()
            .map(|(n, d)| (n.clone(), B64.decode(d.as_ref().unwrap()).unwrap()))
            .collect();
        let want: Vec<(String, Vec<u8>)> = sample
            .members
            .iter()
            .map(|m| (m.name.clone(), m.data.clone()))
            .collect();
        assert_eq!(back, want);
        let e = parse_output(|_| None, "id", b"").unwrap_err();
        assert!(matches!(e, CollectError::Foreign(_)));
    }

    #[test]
    fn a_shard_commits_only_when_its_manifest_and_every_key_are_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(Layout::new(dir.path()));
        let rec = |key: &str, decision: &str| Spooled {
            key: key.into(),
            decision: decision.into(),
            score: Some(0.5),
            threshold: Some(0.4),
            method: "ole".into(),
            top_label: Some("cat".into()),
            nearest_outliers: vec![],
            bank: "b".into(),
            model: "m".into(),
            error_kind: (decision == "dlq").then(|| "corrupt".into()),
            error: None,
            image: format!("{key}.jpg"),
            image_sha256: String::new(),
            image_bytes: 1,
            members: vec![(format!("{key}.jpg"), Some(B64.encode(key)))],
        };
        assert!(spool.put("s.tar", &rec("b", "ood")).unwrap());
        assert!(
            !spool.put("s.tar", &rec("b", "ood")).unwrap(),
            "a redelivery"
        );
        assert_eq!(spool.try_commit("s.tar").unwrap(), None, "no manifest yet");
        let keys = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        spool
            .put_manifest(&Manifest {
                shard: "s.tar".into(),
                format: Format::Tar,
                key_digest: key_digest(&keys),
                keys,
                read: 4,
                errors: vec![],
            })
            .unwrap();
        assert_eq!(spool.pending(), [("s.tar".to_string(), 1, Some(3))]);
        spool.put("s.tar", &rec("a", "id")).unwrap();
        assert_eq!(spool.try_commit("s.tar").unwrap(), None, "c is missing");
        spool.put("s.tar", &rec("c", "dlq")).unwrap();
        let c = spool.try_commit("s.tar").unwrap().unwrap();
        assert_eq!((c.read, c.id, c.ood, c.errors), (4, 1, 1, 1));
        assert!(spool.committed("s.tar"));
        assert!(spool.pending().is_empty());
        let l = Layout::new(dir.path());
        let sh = Shard {
            path: "s.tar".into(),
            rel: "s.tar".into(),
            format: Format::Tar,
        };
        let mut names = Vec::new();
        crate::shards::webdataset::read_samples(&l.filtered(commit::OOD, &sh), |s| {
            names.push(s.key);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(names, ["b"]);
    }
}
