//! Datasets held as shards: webdataset tars (plain or gzip) and parquet tables with an image
//! column, read sample by sample and written back in the same format. `oodgate filter` runs
//! them through the encoder on one machine ([`filter`]); `publish --shards` and `collect` take
//! the same samples through the worker pool. The conventions (grouping, output layout, commit
//! protocol, partitioning) are specified in docs/shards.md.

pub mod commit;
pub mod datacomp;
pub mod distributed;
pub mod filter;
pub mod folder;
pub mod output;
pub mod parquet_shard;
pub mod tables;
pub mod webdataset;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The shard formats: the input's format is the output's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Tar,
    /// A gzip-compressed tar (`.tar.gz`, `.tgz`), written back compressed.
    TarGz,
    Parquet,
    /// A folder of loose files (img2dataset's `files` output), written back as a folder.
    Folder,
}

impl Format {
    /// The format a file name says; `None` for files that are not shards.
    pub fn from_name(name: &str) -> Option<Format> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            Some(Format::TarGz)
        } else if lower.ends_with(".tar") {
            Some(Format::Tar)
        } else if lower.ends_with(".parquet") {
            Some(Format::Parquet)
        } else {
            None
        }
    }

    pub fn is_tar(self) -> bool {
        matches!(self, Format::Tar | Format::TarGz)
    }

    /// Samples grouped from members by key (tars and folders), as opposed to table rows.
    pub fn is_webdataset(self) -> bool {
        self != Format::Parquet
    }
}

/// One input shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub path: PathBuf,
    /// The path relative to the input it was found under, `/`-separated: outputs mirror it,
    /// and it names the shard in the scores table and in message headers.
    pub rel: String,
    pub format: Format,
}

impl Shard {
    /// The file name without its format's extension (`00000` for `00000.tar`).
    pub fn stem(&self) -> &str {
        let name = self.rel.rsplit('/').next().unwrap_or(&self.rel);
        if self.format == Format::Folder {
            return name;
        }
        let lower = name.to_ascii_lowercase();
        let cut = [".tar.gz", ".tgz", ".tar", ".parquet"]
            .iter()
            .find(|e| lower.ends_with(*e))
            .map_or(0, |e| e.len());
        &name[..name.len() - cut]
    }

    /// img2dataset's metadata table beside a tar or folder (`00000.parquet` beside
    /// `00000.tar` or `00000/`), when there is one.
    pub fn metadata(&self) -> Option<PathBuf> {
        if !self.format.is_webdataset() {
            return None;
        }
        let name = self.path.file_name()?.to_str()?;
        let stem = if self.format == Format::Folder {
            name
        } else {
            let lower = name.to_ascii_lowercase();
            let cut = [".tar.gz", ".tgz", ".tar"]
                .iter()
                .find(|e| lower.ends_with(*e))
                .map_or(0, |e| e.len());
            &name[..name.len() - cut]
        };
        let p = self.path.with_file_name(format!("{stem}.parquet"));
        p.is_file().then_some(p)
    }

    /// The relative folder (`""` at the top).
    pub fn rel_dir(&self) -> &str {
        self.rel.rsplit_once('/').map_or("", |(d, _)| d)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("input {0} does not exist")]
    Missing(PathBuf),
    #[error("input {0} is not a shard (.tar, .tar.gz, .tgz or .parquet) nor a folder")]
    NotAShard(PathBuf),
    #[error("two inputs give the same relative shard path {rel}: {a} and {b}")]
    SameRel { rel: String, a: PathBuf, b: PathBuf },
    #[error("{a} and {b} would write the same outputs (one folder, one name before the extension)")]
    SameStem { a: PathBuf, b: PathBuf },
    #[error("{0}: the name is not UTF-8")]
    NonUtf8(PathBuf),
    #[error("walking {path}: {source}")]
    Walk {
        path: PathBuf,
        source: walkdir::Error,
    },
}

/// Expands files and folders (recursively) into shards, sorted bytewise by relative path: the
/// order every machine must see for `--shard-index/--shard-count` to partition exactly. A
/// named file's relative path is its file name; a folder's shards are relative to it.
pub fn discover(inputs: &[PathBuf]) -> Result<Vec<Shard>, DiscoverError> {
    let mut out: Vec<Shard> = Vec::new();
    for input in inputs {
        if input.is_dir() {
            for e in walkdir::WalkDir::new(input).follow_links(true) {
                let e = e.map_err(|source| DiscoverError::Walk {
                    path: input.clone(),
                    source,
                })?;
                if e.file_type().is_dir() && folder::holds_images(e.path()) {
                    // The input folder itself holds images: it is named as given.
                    let rel = if e.depth() == 0 {
                        input
                            .canonicalize()
                            .ok()
                            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(String::from))
                            .ok_or_else(|| DiscoverError::NonUtf8(input.clone()))?
                    } else {
                        rel_path(input, e.path())?
                    };
                    out.push(Shard {
                        path: e.into_path(),
                        rel,
                        format: Format::Folder,
                    });
                    continue;
                }
                if !e.file_type().is_file() {
                    continue;
                }
                let name = e.file_name().to_string_lossy();
                let Some(format) = Format::from_name(&name) else {
                    continue;
                };
                let rel = rel_path(input, e.path())?;
                out.push(Shard {
                    path: e.into_path(),
                    rel,
                    format,
                });
            }
        } else if input.is_file() {
            let name = input
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| DiscoverError::NonUtf8(input.clone()))?;
            let format =
                Format::from_name(name).ok_or_else(|| DiscoverError::NotAShard(input.clone()))?;
            out.push(Shard {
                path: input.clone(),
                rel: name.to_string(),
                format,
            });
        } else {
            return Err(DiscoverError::Missing(input.clone()));
        }
    }
    // img2dataset writes `00000.parquet` (metadata, no image bytes) beside `00000.tar` or the
    // folder `00000/`: it belongs to them, it is not a shard of its own.
    let tars: std::collections::HashSet<(String, String)> = out
        .iter()
        .filter(|s| s.format.is_webdataset())
        .map(|s| (s.rel_dir().to_string(), s.stem().to_string()))
        .collect();
    out.retain(|s| {
        s.format.is_webdataset() || !tars.contains(&(s.rel_dir().to_string(), s.stem().to_string()))
    });
    out.sort_by(|a, b| a.rel.as_bytes().cmp(b.rel.as_bytes()));
    for w in out.windows(2) {
        if w[0].rel == w[1].rel {
            return Err(DiscoverError::SameRel {
                rel: w[0].rel.clone(),
                a: w[0].path.clone(),
                b: w[1].path.clone(),
            });
        }
    }
    let mut stems = std::collections::HashMap::new();
    for s in &out {
        if let Some(prev) = stems.insert((s.rel_dir(), s.stem()), &s.path) {
            return Err(DiscoverError::SameStem {
                a: prev.clone(),
                b: s.path.clone(),
            });
        }
    }
    Ok(out)
}

fn rel_path(root: &Path, path: &Path) -> Result<String, DiscoverError> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    parts
        .map(|p| p.join("/"))
        .ok_or_else(|| DiscoverError::NonUtf8(path.to_path_buf()))
}

/// The shards of worker `index` of `count`: position `p` in the sorted list with
/// `p mod count == index` (webdataset's `split_by_node` rule), applied before completed
/// shards are skipped so that the split does not depend on progress.
pub fn partition(shards: Vec<Shard>, index: usize, count: usize) -> Vec<Shard> {
    let count = count.max(1);
    shards
        .into_iter()
        .enumerate()
        .filter(|(p, _)| p % count == index)
        .map(|(_, s)| s)
        .collect()
}

/// SHA-256 of the sorted relative paths (one per line): workers that split one dataset
/// compare it, so that none works from a different list.
pub fn list_digest(shards: &[Shard]) -> String {
    let mut h = Sha256::new();
    for s in shards {
        h.update(s.rel.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(rel: &str) -> Shard {
        Shard {
            path: PathBuf::from(rel),
            rel: rel.into(),
            format: Format::from_name(rel).unwrap(),
        }
    }

    #[test]
    fn formats_and_stems_follow_the_name() {
        assert_eq!(Format::from_name("a/00001.TAR"), Some(Format::Tar));
        assert_eq!(Format::from_name("x.tgz"), Some(Format::TarGz));
        assert_eq!(Format::from_name("x.tar.gz"), Some(Format::TarGz));
        assert_eq!(Format::from_name("x.parquet"), Some(Format::Parquet));
        assert_eq!(Format::from_name("x.json"), None);
        assert_eq!(shard("a/b/00001.tar.gz").stem(), "00001");
        assert_eq!(shard("a/b/00001.tar.gz").rel_dir(), "a/b");
        assert_eq!(shard("p.parquet").stem(), "p");
        assert_eq!(shard("p.parquet").rel_dir(), "");
    }

    #[test]
    fn every_shard_goes_to_exactly_one_worker() {
        let all: Vec<Shard> = (0..11).map(|i| shard(&format!("{i:05}.tar"))).collect();
        let mut seen = Vec::new();
        for i in 0..3 {
            let mine = partition(all.clone(), i, 3);
            assert!(mine.len() == 3 || mine.len() == 4);
            seen.extend(mine.into_iter().map(|s| s.rel));
        }
        seen.sort();
        let want: Vec<String> = all.iter().map(|s| s.rel.clone()).collect();
        assert_eq!(seen, want);
        assert_eq!(partition(all.clone(), 1, 3)[0].rel, "00001.tar");
        assert_eq!(partition(all.clone(), 1, 3)[1].rel, "00004.tar");
    }

    #[test]
    fn discovery_sorts_bytewise_and_refuses_a_repeated_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        std::fs::create_dir_all(dir.path().join("c/00000")).unwrap();
        for f in [
            "b/1.tar",
            "b/1.parquet",
            "a.parquet",
            "B.tgz",
            "notes.txt",
            "c/00000/k.jpg",
            "c/00000.parquet",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let found = discover(&[dir.path().to_path_buf()]).unwrap();
        let rels: Vec<&str> = found.iter().map(|s| s.rel.as_str()).collect();
        // b/1.parquet is b/1.tar's metadata (img2dataset), c/00000.parquet the folder's.
        assert_eq!(rels, ["B.tgz", "a.parquet", "b/1.tar", "c/00000"]);
        assert_eq!(found[3].format, Format::Folder);
        assert_eq!(found[3].stem(), "00000");
        assert_eq!(found[0].format, Format::TarGz);
        let twice = discover(&[dir.path().join("a.parquet"), dir.path().join("a.parquet")]);
        assert!(matches!(twice, Err(DiscoverError::SameRel { .. })));
        let bad = discover(&[dir.path().join("notes.txt")]);
        assert!(matches!(bad, Err(DiscoverError::NotAShard(_))));
        assert_ne!(list_digest(&found), list_digest(&found[1..]));
        // A folder given as input that holds images itself is one shard, named as given.
        let own = discover(&[dir.path().join("c/00000")]).unwrap();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].rel, "00000");
    }
}
