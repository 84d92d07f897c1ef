//! Webdataset tars: members grouped into samples by key exactly as the Python `webdataset`
//! library groups them, read one entry at a time (only the current sample is held), and
//! written back with normalised headers so a rerun is byte-identical.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use super::Format;
use super::tables::{ErrorKind, Stage};

/// The `uid` and `url` of an img2dataset `.json` sidecar (strings or numbers), when present.
pub fn sidecar_ids(json: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return (None, None);
    };
    let field = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    (field("uid"), field("url"))
}

/// Extensions that hold the image, in priority order. A sample needs exactly one.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "jfif"];

/// One member of a sample, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The full member name, byte for byte.
    pub name: String,
    /// Everything after the first dot of the basename, lower-cased (`seg.png`, `jpg`).
    pub ext: String,
    pub data: Vec<u8>,
}

/// Why a sample cannot be scored (it then goes to neither output).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub stage: Stage,
    pub kind: ErrorKind,
    pub message: String,
    /// The member it concerns, when one does.
    pub member: Option<String>,
}

/// Consecutive members with one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    pub members: Vec<Member>,
    pub problem: Option<Problem>,
}

impl Sample {
    /// The image member, when the sample has exactly one.
    pub fn image(&self) -> Option<&Member> {
        let mut it = self
            .members
            .iter()
            .filter(|m| IMAGE_EXTENSIONS.contains(&m.ext.as_str()));
        match (it.next(), it.next()) {
            (Some(m), None) => Some(m),
            _ => None,
        }
    }

    /// A sidecar's bytes (`json`, `txt`).
    pub fn sidecar(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|m| m.ext == ext)
            .map(|m| m.data.as_slice())
    }

    fn close(&mut self) {
        if self.problem.is_some() {
            return;
        }
        let images: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| IMAGE_EXTENSIONS.contains(&m.ext.as_str()))
            .collect();
        self.problem = match images.len() {
            1 => None,
            0 => Some(Problem {
                stage: Stage::Group,
                kind: ErrorKind::NoImage,
                message: format!(
                    "sample {} has no image member (members: {})",
                    self.key,
                    self.member_names()
                ),
                member: None,
            }),
            _ => Some(Problem {
                stage: Stage::Group,
                kind: ErrorKind::MultipleImages,
                message: format!(
                    "sample {} has {} image members ({}); one is expected",
                    self.key,
                    images.len(),
                    self.member_names()
                ),
                member: None,
            }),
        };
    }

    fn member_names(&self) -> String {
        let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

/// How reading a tar ended.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadReport {
    pub samples: usize,
    /// Entries that are not sample members: directories, links, PAX/GNU meta entries, names
    /// without an extension or shaped `__x__`.
    pub skipped_entries: usize,
    /// The tar ended early or could not be parsed past some point: the cause. Every sample
    /// read before it was delivered.
    pub truncated: Option<String>,
    /// The consumer stopped reading.
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Splits a member name into key and extension by webdataset's rule: the key is the name up
/// to the first dot of its basename (directories included), the extension the rest,
/// lower-cased. `None` for names webdataset ignores (no dot, a leading dot, `__x__`).
pub fn split_name(name: &str) -> Option<(&str, String)> {
    let (dir_len, base) = match name.rfind('/') {
        Some(i) => (i + 1, &name[i + 1..]),
        None => (0, name),
    };
    if dir_len == 0 && base.starts_with("__") && base.ends_with("__") {
        return None;
    }
    let dot = base.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&name[..dir_len + dot], base[dot + 1..].to_ascii_lowercase()))
}

/// Opens a shard for reading, decompressing gzip when the bytes say so (whatever the name).
fn open(path: &Path) -> Result<Box<dyn Read + Send>, TarError> {
    let f = File::open(path).map_err(|source| TarError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let magic = {
        use std::io::BufRead;
        r.fill_buf().map_err(|source| TarError::Open {
            path: path.to_path_buf(),
            source,
        })?
    };
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(MultiGzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// One entry of a tar (or file of a folder) before grouping.
pub enum RawEntry {
    Member {
        name: Vec<u8>,
        data: Vec<u8>,
        /// The member's data ended early: why.
        short: Option<String>,
    },
    /// Not a sample member (a directory, link, PAX or GNU meta entry).
    Skipped,
    /// The container cannot be read past this point.
    Damaged(String),
}

/// A whole member.
pub fn group_member(name: Vec<u8>, data: Vec<u8>) -> RawEntry {
    RawEntry::Member {
        name,
        data,
        short: None,
    }
}

/// Reads the tar at `path` and hands each sample to `each` in order; `each` may stop early.
/// A damaged tar ends the read with [`ReadReport::truncated`]; a member cut short is its
/// sample's problem ([`ErrorKind::TruncatedMember`]).
pub fn read_samples(
    path: &Path,
    each: impl FnMut(Sample) -> ControlFlow<()>,
) -> Result<ReadReport, TarError> {
    let mut archive = tar::Archive::new(open(path)?);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            return Ok(ReadReport {
                truncated: Some(format!("not a readable tar: {e}")),
                ..ReadReport::default()
            });
        }
    };
    let raw = entries.map(|entry| {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return RawEntry::Damaged(format!("the tar is damaged or ends early: {e}")),
        };
        if !entry.header().entry_type().is_file() {
            return RawEntry::Skipped;
        }
        let name = entry.path_bytes().into_owned();
        let size = entry.size();
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 << 20));
        // A member cut short reads Ok with fewer bytes: compare with the header's size.
        let short = match entry.read_to_end(&mut data) {
            Err(e) => Some(e.to_string()),
            Ok(_) if (data.len() as u64) < size => {
                Some(format!("{} of {size} bytes present", data.len()))
            }
            Ok(_) => None,
        };
        RawEntry::Member { name, data, short }
    });
    Ok(group(raw, each))
}

/// Groups entries into samples by webdataset's rule and hands each to `each`.
pub fn group(
    entries: impl Iterator<Item = RawEntry>,
    mut each: impl FnMut(Sample) -> ControlFlow<()>,
) -> ReadReport {
    let mut report = ReadReport::default();
    let mut current: Option<Sample> = None;
    // Keys already delivered: a key that comes back after another (members not adjacent)
    // would make a second sample with the same key, which the outputs cannot tell apart.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut deliver = |s: Option<Sample>, report: &mut ReadReport| -> ControlFlow<()> {
        match s {
            Some(mut s) => {
                if !seen.insert(s.key.clone()) && s.problem.is_none() {
                    s.problem = Some(Problem {
                        stage: Stage::Group,
                        kind: ErrorKind::DuplicateMember,
                        message: format!(
                            "key {} appears again after other keys (its members are not adjacent); \
                             the first sample with this key is kept",
                            s.key
                        ),
                        member: s.members.first().map(|m| m.name.clone()),
                    });
                }
                s.close();
                report.samples += 1;
                each(s)
            }
            None => ControlFlow::Continue(()),
        }
    };
    for entry in entries {
        let (raw_name, data, short) = match entry {
            RawEntry::Skipped => {
                report.skipped_entries += 1;
                continue;
            }
            RawEntry::Damaged(why) => {
                report.truncated = Some(why);
                break;
            }
            RawEntry::Member { name, data, short } => (name, data, short),
        };
        let (name, utf8) = match String::from_utf8(raw_name) {
            Ok(n) => (n, true),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
        };
        let Some((key, ext)) = split_name(&name) else {
            report.skipped_entries += 1;
            continue;
        };
        let key = key.to_string();
        if current.as_ref().is_some_and(|s| s.key != key) {
            let done = current.take();
            if deliver(done, &mut report).is_break() {
                report.stopped = true;
                return report;
            }
        }
        let sample = current.get_or_insert_with(|| Sample {
            key: key.clone(),
            members: Vec::new(),
            problem: None,
        });
        if let Some(why) = short {
            sample.problem = Some(Problem {
                stage: Stage::Read,
                kind: ErrorKind::TruncatedMember,
                message: format!("member {name} is cut short: {why}"),
                member: Some(name.clone()),
            });
            report.truncated = Some(format!("the tar ends inside member {name}"));
            break;
        }
        if sample.problem.is_none() && !utf8 {
            sample.problem = Some(Problem {
                stage: Stage::Group,
                kind: ErrorKind::NonUtf8Name,
                message: format!("member name {name:?} is not UTF-8"),
                member: Some(name.clone()),
            });
        }
        if sample.members.iter().any(|m| m.ext == ext) {
            if sample.problem.is_none() {
                sample.problem = Some(Problem {
                    stage: Stage::Group,
                    kind: ErrorKind::DuplicateMember,
                    message: format!(
                        "sample {key} has two members with extension {ext} ({name} repeated); \
                         the first is kept"
                    ),
                    member: Some(name.clone()),
                });
            }
            continue;
        }
        sample.members.push(Member { name, ext, data });
    }
    if deliver(current.take(), &mut report).is_break() {
        report.stopped = true;
    }
    report
}

/// The file behind a tar being written, plain or gzip.
enum Sink {
    Plain(BufWriter<File>),
    Gz(GzEncoder<BufWriter<File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gz(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gz(w) => w.flush(),
        }
    }
}

impl Sink {
    fn finish(self) -> std::io::Result<File> {
        let buf = match self {
            Sink::Plain(w) => w,
            Sink::Gz(w) => w.finish()?,
        };
        buf.into_inner().map_err(|e| e.into_error())
    }
}

/// Writes samples into a tar, members byte for byte in their order, headers normalised
/// (GNU, mode 0644, uid/gid 0, mtime 0) so that the same samples give the same bytes.
pub struct TarWriter {
    builder: tar::Builder<Sink>,
    pub samples: usize,
}

impl TarWriter {
    pub fn create(path: &Path, format: Format) -> std::io::Result<TarWriter> {
        let f = BufWriter::with_capacity(1 << 20, File::create(path)?);
        let sink = if format == Format::TarGz {
            Sink::Gz(GzEncoder::new(f, Compression::default()))
        } else {
            Sink::Plain(f)
        };
        let mut builder = tar::Builder::new(sink);
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(TarWriter {
            builder,
            samples: 0,
        })
    }

    pub fn append(&mut self, sample: &Sample) -> std::io::Result<()> {
        for m in &sample.members {
            self.append_member(&m.name, &m.data)?;
        }
        self.samples += 1;
        Ok(())
    }

    pub fn append_member(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        self.builder.append_data(&mut h, name, data)
    }

    /// Writes the end blocks and flushes; the file is returned for `sync_all`.
    pub fn finish(self) -> std::io::Result<File> {
        self.builder.into_inner()?.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_like_webdataset() {
        assert_eq!(
            split_name("000010005.jpg"),
            Some(("000010005", "jpg".into()))
        );
        assert_eq!(
            split_name("a/b.c/d.seg.PNG"),
            Some(("a/b.c/d", "seg.png".into()))
        );
        assert_eq!(split_name("22.05.png"), Some(("22", "05.png".into())));
        assert_eq!(split_name("README"), None);
        assert_eq!(split_name("dir/.hidden"), None);
        assert_eq!(split_name("__index__"), None);
    }

    fn member(name: &str, data: &[u8]) -> (String, Vec<u8>) {
        (name.to_string(), data.to_vec())
    }

    fn write_tar(path: &Path, format: Format, members: &[(String, Vec<u8>)]) {
        let mut w = TarWriter::create(path, format).unwrap();
        for (n, d) in members {
            w.append_member(n, d).unwrap();
        }
        w.finish().unwrap();
    }

    fn read_all(path: &Path) -> (Vec<Sample>, ReadReport) {
        let mut out = Vec::new();
        let r = read_samples(path, |s| {
            out.push(s);
            ControlFlow::Continue(())
        })
        .unwrap();
        (out, r)
    }

    #[test]
    fn members_group_by_consecutive_key_with_problems_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tar");
        let members = vec![
            member("a.jpg", b"A"),
            member("a.json", b"{}"),
            member("b.txt", b"no image"),
            member("c.jpg", b"C1"),
            member("c.png", b"C2"),
            member("d.jpg", b"D"),
            member("d.jpg", b"D again"),
            member("e/f.g.jpg", b"E"),
            member("a.png", b"A again, after other keys"),
        ];
        for format in [Format::Tar, Format::TarGz] {
            write_tar(&p, format, &members);
            let (samples, report) = read_all(&p);
            let keys: Vec<&str> = samples.iter().map(|s| s.key.as_str()).collect();
            assert_eq!(keys, ["a", "b", "c", "d", "e/f", "a"]);
            assert_eq!(report.samples, 6);
            assert_eq!(report.truncated, None);
            assert!(samples[0].problem.is_none());
            assert_eq!(samples[0].image().unwrap().data, b"A");
            assert_eq!(samples[0].sidecar("json"), Some(&b"{}"[..]));
            let kinds: Vec<Option<ErrorKind>> = samples
                .iter()
                .map(|s| s.problem.as_ref().map(|p| p.kind))
                .collect();
            assert_eq!(
                kinds,
                [
                    None,
                    Some(ErrorKind::NoImage),
                    Some(ErrorKind::MultipleImages),
                    Some(ErrorKind::DuplicateMember),
                    Some(ErrorKind::NoImage),
                    Some(ErrorKind::DuplicateMember)
                ]
            );
            assert_eq!(
                samples[3].members.len(),
                1,
                "the first of a duplicate is kept"
            );
            assert_eq!(samples[4].members[0].ext, "g.jpg");
        }
    }

    #[test]
    fn a_truncated_tar_names_the_cut_member_and_keeps_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tar");
        let big = vec![7u8; 5000];
        write_tar(
            &p,
            Format::Tar,
            &[
                member("a.jpg", b"A"),
                member("b.jpg", &big),
                member("c.jpg", b"C"),
            ],
        );
        // Cut inside b.jpg's data: header of a (512) + data (512) + header of b (512) + 1000.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..2536]).unwrap();
        let (samples, report) = read_all(&p);
        assert_eq!(samples.len(), 2);
        assert!(samples[0].problem.is_none());
        let pb = samples[1].problem.as_ref().unwrap();
        assert_eq!(pb.kind, ErrorKind::TruncatedMember);
        assert_eq!(pb.member.as_deref(), Some("b.jpg"));
        assert!(report.truncated.unwrap().contains("b.jpg"));
        // Cut inside a header: the samples before it are whole, the tar is reported damaged.
        std::fs::write(&p, &bytes[..1024 + 100]).unwrap();
        let (samples, report) = read_all(&p);
        assert_eq!(samples.len(), 1);
        assert!(samples[0].problem.is_none());
        assert!(report.truncated.is_some());
    }

    #[test]
    fn writing_is_deterministic_and_keeps_names_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{}/k.jpg", "d".repeat(150));
        let members = vec![member(&long, b"L"), member("x.json", b"{\n}")];
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        write_tar(&a, Format::Tar, &members);
        write_tar(&b, Format::Tar, &members);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let (samples, _) = read_all(&a);
        assert_eq!(samples[0].members[0].name, long);
        assert_eq!(samples[1].members[0].data, b"{\n}");
    }
}
