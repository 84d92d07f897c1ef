//! Folder shards: a directory of loose files, as img2dataset's `files` output writes them
//! (`00000/000000001.jpg` with `.json` and `.txt` beside it). Files group into samples by the
//! webdataset key rule, in name order, so a folder behaves exactly like a tar of its files.

use std::fs::File;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use super::Format;
use super::webdataset::{IMAGE_EXTENSIONS, Member, Sample, TarWriter, group_member, split_name};

/// Whether `dir` directly holds an image file (then it is a folder shard).
pub fn holds_images(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| {
            e.file_type().is_ok_and(|t| t.is_file())
                && e.file_name()
                    .to_str()
                    .and_then(split_name)
                    .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.as_str()))
        })
    })
}

/// Reads the files of `dir` (not its subfolders) in name order and hands each sample to
/// `each`, as [`super::webdataset::read_samples`] does for a tar.
pub fn read_samples(
    dir: &Path,
    each: impl FnMut(Sample) -> ControlFlow<()>,
) -> std::io::Result<super::webdataset::ReadReport> {
    let mut names: Vec<(Vec<u8>, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            use std::os::unix::ffi::OsStrExt;
            names.push((e.file_name().as_bytes().to_vec(), e.path()));
        }
    }
    names.sort();
    let mut entries = Vec::with_capacity(names.len());
    for (name, path) in names {
        let data = std::fs::read(&path)?;
        entries.push((name, data));
    }
    Ok(super::webdataset::group(
        entries.into_iter().map(|(n, d)| group_member(n, d)),
        each,
    ))
}

/// Writes samples as loose files into a folder (created fresh).
pub struct FolderWriter {
    dir: PathBuf,
    pub samples: usize,
}

impl FolderWriter {
    pub fn create(dir: &Path) -> std::io::Result<FolderWriter> {
        std::fs::create_dir_all(dir)?;
        Ok(FolderWriter {
            dir: dir.to_path_buf(),
            samples: 0,
        })
    }

    pub fn append_member(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        if name.contains('/') || name == ".." || name == "." {
            return Err(std::io::Error::other(format!(
                "member name {name:?} is not a plain file name"
            )));
        }
        let mut f = File::create(self.dir.join(name))?;
        f.write_all(data)?;
        f.sync_all()
    }
}

/// Where a shard's kept samples go: a tar (plain or gzip) or a folder.
pub enum SampleWriter {
    Tar(TarWriter),
    Folder(FolderWriter),
}

impl SampleWriter {
    pub fn create(path: &Path, format: Format) -> std::io::Result<SampleWriter> {
        Ok(match format {
            Format::Folder => SampleWriter::Folder(FolderWriter::create(path)?),
            f => SampleWriter::Tar(TarWriter::create(path, f)?),
        })
    }

    pub fn append_member(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        match self {
            SampleWriter::Tar(w) => w.append_member(name, data),
            SampleWriter::Folder(w) => w.append_member(name, data),
        }
    }

    pub fn append(&mut self, sample: &Sample) -> std::io::Result<()> {
        for Member { name, data, .. } in &sample.members {
            self.append_member(name, data)?;
        }
        self.finish_sample();
        Ok(())
    }

    /// Counts a sample whose members were appended one by one.
    pub fn finish_sample(&mut self) {
        match self {
            SampleWriter::Tar(w) => w.samples += 1,
            SampleWriter::Folder(w) => w.samples += 1,
        }
    }

    pub fn samples(&self) -> usize {
        match self {
            SampleWriter::Tar(w) => w.samples,
            SampleWriter::Folder(w) => w.samples,
        }
    }

    /// Closes the tar (its files are synced at the commit) or returns at once (a folder's
    /// files were synced as written).
    pub fn finish(self) -> std::io::Result<()> {
        match self {
            SampleWriter::Tar(w) => w.finish().map(|_| ()),
            SampleWriter::Folder(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_reads_like_a_tar_of_its_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        for (n, d) in [
            ("b.jpg", &b"B"[..]),
            ("a.txt", b"caption"),
            ("a.jpg", b"A"),
            ("notes", b"no extension"),
        ] {
            std::fs::write(dir.path().join(n), d).unwrap();
        }
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/c.jpg"), b"C").unwrap();
        assert!(holds_images(dir.path()));
        assert!(holds_images(&dir.path().join("sub")));
        let mut got = Vec::new();
        let rep = read_samples(dir.path(), |s| {
            got.push((s.key.clone(), s.members.len(), s.problem.is_none()));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(got, [("a".into(), 2, true), ("b".into(), 1, true)]);
        assert_eq!(rep.skipped_entries, 1);
        let out = dir.path().join("out");
        let mut w = SampleWriter::create(&out, Format::Folder).unwrap();
        w.append_member("a.jpg", b"A").unwrap();
        w.finish_sample();
        assert!(w.append_member("../x.jpg", b"X").is_err());
        assert_eq!(w.samples(), 1);
        assert_eq!(std::fs::read(out.join("a.jpg")).unwrap(), b"A");
    }
}
