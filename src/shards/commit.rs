//! The output layout and the per-shard commit protocol: every output of a shard is written
//! under a temporary name, synced, renamed into place, and only then is the shard's marker
//! written (the same way, last). A shard is complete exactly when its marker exists and
//! matches the input and the configuration; anything else is redone from scratch.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Shard;

/// The folders under the output root.
pub const ID: &str = "id";
pub const OOD: &str = "ood";
pub const SCORES: &str = "scores";
pub const ERRORS: &str = "errors";
pub const STATE: &str = "_state";

/// Where a shard's outputs go.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    fn dir(&self, top: &str, shard: &Shard) -> PathBuf {
        let mut p = self.root.join(top);
        if !shard.rel_dir().is_empty() {
            p.push(shard.rel_dir());
        }
        p
    }

    /// The shard's filtered copy in `id/` or `ood/`, under the input's own name.
    pub fn filtered(&self, top: &str, shard: &Shard) -> PathBuf {
        let name = shard.rel.rsplit('/').next().unwrap_or(&shard.rel);
        self.dir(top, shard).join(name)
    }

    /// img2dataset's `{shard}_stats.json` beside a filtered tar.
    pub fn stats(&self, top: &str, shard: &Shard) -> PathBuf {
        self.dir(top, shard)
            .join(format!("{}_stats.json", shard.stem()))
    }

    /// img2dataset's metadata table beside a filtered tar or folder, split by decision.
    pub fn metadata(&self, top: &str, shard: &Shard) -> PathBuf {
        self.dir(top, shard)
            .join(format!("{}.parquet", shard.stem()))
    }

    /// The scores or errors table of the shard.
    pub fn table(&self, top: &str, shard: &Shard) -> PathBuf {
        self.dir(top, shard)
            .join(format!("{}.parquet", shard.stem()))
    }

    /// The completion marker.
    pub fn marker(&self, shard: &Shard) -> PathBuf {
        self.root.join(STATE).join(format!("{}.json", shard.rel))
    }

    pub fn run_file(&self) -> PathBuf {
        self.root.join(STATE).join("run.json")
    }

    pub fn relative<'a>(&self, p: &'a Path) -> &'a Path {
        p.strip_prefix(&self.root).unwrap_or(p)
    }
}

/// img2dataset's `{shard}_stats.json` for a filtered tar of `samples` samples, so that
/// DataComp's resharder reads the folder as is.
pub fn stats_json(samples: usize, source: &str, decision: &str) -> Vec<u8> {
    let stats = serde_json::json!({
        "count": samples,
        "successes": samples,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "oodgate": { "source": source, "decision": decision },
    });
    serde_json::to_vec_pretty(&stats).unwrap_or_default()
}

/// The input file as it was when its shard was processed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputStamp {
    pub path: String,
    pub bytes: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u128,
}

impl InputStamp {
    pub fn of(path: &Path) -> std::io::Result<InputStamp> {
        let m = std::fs::metadata(path)?;
        let mtime_ns = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(InputStamp {
            path: path.display().to_string(),
            bytes: m.len(),
            mtime_ns,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Samples (tar) or rows (parquet) read.
    pub read: u64,
    pub id: u64,
    pub ood: u64,
    /// Samples that could not be scored (error rows, not counting shard-level rows).
    pub errors: u64,
    /// Parquet rows whose `status` says the download failed upstream: neither scored nor
    /// listed as errors.
    pub upstream_failures: u64,
    /// The shard itself was damaged (a truncated tar): what came before the damage counts.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputFile {
    /// Relative to the output root.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The commit point of a shard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub shard: String,
    pub input: InputStamp,
    pub counts: Counts,
    pub outputs: Vec<OutputFile>,
    pub config_fingerprint: String,
    pub oodgate_version: String,
}

impl Marker {
    /// Whether this marker says the shard is done for this input and configuration.
    pub fn matches(&self, input: &InputStamp, config_fingerprint: &str) -> bool {
        self.input.bytes == input.bytes
            && self.input.mtime_ns == input.mtime_ns
            && self.config_fingerprint == config_fingerprint
    }
}

/// Reads a marker; a missing or unreadable one means "not done".
pub fn read_marker(path: &Path) -> Option<Marker> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `name.tmp-PID` beside `path`: a crashed run's leftovers are recognisable by the prefix.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Before a shard is (re)done: removes its marker, its final-named outputs and every
/// `name.tmp-*` left by a crashed run, and creates the folders.
pub fn prepare(marker: &Path, outputs: &[PathBuf]) -> std::io::Result<()> {
    remove_if_present(marker)?;
    for p in outputs {
        remove_if_present(p)?;
        let Some(dir) = p.parent() else { continue };
        std::fs::create_dir_all(dir)?;
        let prefix = format!(
            "{}.tmp-",
            p.file_name().unwrap_or_default().to_string_lossy()
        );
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                remove_if_present(&e.path())?;
            }
        }
    }
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(())
}

/// Removes a file, or a folder output (folder shards) with its files.
pub fn remove_if_present(p: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Size and SHA-256 of a file; of a folder, the total size and the SHA-256 of its sorted
/// `name sha256` lines.
fn sha256_file(p: &Path) -> std::io::Result<(u64, String)> {
    if p.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(p)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut h = Sha256::new();
        let mut total = 0u64;
        for f in names {
            let (n, sha) = sha256_file(&f)?;
            total += n;
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(format!(" {sha}\n").as_bytes());
        }
        return Ok((total, hex::encode(h.finalize())));
    }
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    Ok((n, hex::encode(h.finalize())))
}

/// Writes `bytes` to `path` durably: a temporary name, sync, rename, sync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// A file written under its temporary name, waiting for the commit.
pub struct Pending {
    pub temp: PathBuf,
    pub path: PathBuf,
}

impl Pending {
    pub fn new(path: PathBuf) -> Pending {
        Pending {
            temp: temp_path(&path),
            path,
        }
    }
}

/// Syncs the finished files (already closed by their writers), renames them into place,
/// syncs their folders, then writes the marker (with each output's size and SHA-256) last.
pub fn commit(
    layout: &Layout,
    files: Vec<Pending>,
    marker_path: &Path,
    mut marker: Marker,
) -> std::io::Result<Marker> {
    for f in &files {
        File::open(&f.temp)?.sync_all()?;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for f in &files {
        std::fs::rename(&f.temp, &f.path)?;
        if let Some(d) = f.path.parent()
            && !dirs.iter().any(|x| x == d)
        {
            dirs.push(d.to_path_buf());
        }
        let (bytes, sha256) = sha256_file(&f.path)?;
        marker.outputs.push(OutputFile {
            path: layout.relative(&f.path).display().to_string(),
            bytes,
            sha256,
        });
    }
    for d in &dirs {
        sync_dir(d)?;
    }
    let json = serde_json::to_vec_pretty(&marker).map_err(std::io::Error::other)?;
    write_atomic(marker_path, &json)?;
    Ok(marker)
}

/// `_state/run.json`: what every worker sharing an output folder must agree on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub config_fingerprint: String,
    pub shard_count: usize,
    /// SHA-256 of the sorted shard list ([`super::list_digest`]).
    pub list_digest: String,
    pub shards: usize,
    pub oodgate_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunStateError {
    #[error(
        "{path} was written by a run with another {what} ({theirs} there, {ours} here): mixing \
         configurations in one output folder is refused; use another --out, or --overwrite to \
         redo every shard with this configuration"
    )]
    Mismatch {
        path: PathBuf,
        what: &'static str,
        theirs: String,
        ours: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates `run.json`, or checks the one there: the same configuration, shard count and
/// shard list, unless `overwrite` (which replaces it; markers of the old configuration no
/// longer match, so their shards are redone).
pub fn claim_run(layout: &Layout, ours: &RunState, overwrite: bool) -> Result<(), RunStateError> {
    let path = layout.run_file();
    let io = |source| RunStateError::Io {
        path: path.clone(),
        source,
    };
    if let Some(theirs) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<RunState>(&b).ok())
        && !overwrite
    {
        let checks: [(&'static str, String, String); 3] = [
            (
                "configuration (bank, model, method, threshold, preprocessing)",
                theirs.config_fingerprint.clone(),
                ours.config_fingerprint.clone(),
            ),
            (
                "--shard-count",
                theirs.shard_count.to_string(),
                ours.shard_count.to_string(),
            ),
            (
                "shard list (digest of the sorted relative paths)",
                theirs.list_digest.clone(),
                ours.list_digest.clone(),
            ),
        ];
        for (what, t, o) in checks {
            if t != o {
                return Err(RunStateError::Mismatch {
                    path,
                    what,
                    theirs: t,
                    ours: o,
                });
            }
        }
        return Ok(());
    }
    std::fs::create_dir_all(layout.root.join(STATE)).map_err(io)?;
    let json = serde_json::to_vec_pretty(ours).map_err(|e| io(std::io::Error::other(e)))?;
    write_atomic(&path, &json).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::Format;

    fn shard() -> Shard {
        Shard {
            path: "in/a/00001.tar".into(),
            rel: "a/00001.tar".into(),
            format: Format::Tar,
        }
    }

    #[test]
    fn the_layout_mirrors_the_input() {
        let l = Layout::new("/out");
        let s = shard();
        assert_eq!(l.filtered(ID, &s), Path::new("/out/id/a/00001.tar"));
        assert_eq!(l.stats(OOD, &s), Path::new("/out/ood/a/00001_stats.json"));
        assert_eq!(
            l.table(SCORES, &s),
            Path::new("/out/scores/a/00001.parquet")
        );
        assert_eq!(l.marker(&s), Path::new("/out/_state/a/00001.tar.json"));
    }

    #[test]
    fn commit_renames_then_marks_and_prepare_clears_a_crashed_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        let s = shard();
        let outs = vec![l.filtered(ID, &s), l.table(SCORES, &s)];
        prepare(&l.marker(&s), &outs).unwrap();
        // A crashed run's leftovers: a temporary file and a renamed output without a marker.
        std::fs::write(outs[0].with_file_name("00001.tar.tmp-1"), b"old").unwrap();
        std::fs::write(&outs[1], b"old").unwrap();
        prepare(&l.marker(&s), &outs).unwrap();
        assert_eq!(
            std::fs::read_dir(outs[0].parent().unwrap())
                .unwrap()
                .count(),
            0
        );
        assert!(!outs[1].exists());
        let pending: Vec<Pending> = outs.iter().cloned().map(Pending::new).collect();
        for p in &pending {
            std::fs::write(&p.temp, b"new").unwrap();
        }
        let stamp = InputStamp {
            path: "x".into(),
            bytes: 3,
            mtime_ns: 9,
        };
        let m = Marker {
            shard: s.rel.clone(),
            input: stamp.clone(),
            counts: Counts::default(),
            outputs: vec![],
            config_fingerprint: "c".into(),
            oodgate_version: "0".into(),
        };
        commit(&l, pending, &l.marker(&s), m).unwrap();
        let back = read_marker(&l.marker(&s)).unwrap();
        assert_eq!(back.outputs.len(), 2);
        assert_eq!(back.outputs[0].path, "id/a/00001.tar");
        assert_eq!(back.outputs[0].bytes, 3);
        assert!(back.matches(&stamp, "c"));
        assert!(!back.matches(&stamp, "d"));
        assert_eq!(std::fs::read(&outs[1]).unwrap(), b"new");
    }

    #[test]
    fn a_second_run_must_agree_unless_it_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        let ours = RunState {
            config_fingerprint: "c".into(),
            shard_count: 2,
            list_digest: "d".into(),
            shards: 4,
            oodgate_version: "0".into(),
        };
        claim_run(&l, &ours, false).unwrap();
        claim_run(&l, &ours, false).unwrap();
        let other = RunState {
            shard_count: 3,
            ..ours.clone()
        };
        let e = claim_run(&l, &other, false).unwrap_err().to_string();
        assert!(e.contains("--shard-count (2 there, 3 here)"), "{e}");
        claim_run(&l, &other, true).unwrap();
        claim_run(&l, &other, false).unwrap();
    }
}
