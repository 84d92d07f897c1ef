//! A small reader of the WordNet 3.0 database files; its own file because the outlier corpus
//! and its cleaning against the ID classes need only this much of it (docs/method.md §4).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The system location of the Debian/Ubuntu package `wordnet-base`.
pub const SYSTEM_DIR: &str = "/usr/share/wordnet";

/// Where `deploy/setup/fetch-wordnet.sh` unpacks `wordnet-base` when it is not installed,
/// relative to the project root.
pub const ASSETS_SUBDIR: &str = ".assets/wordnet-base/usr/share/wordnet";

/// Everything that can go wrong while reading WordNet.
#[derive(Debug, Error)]
pub enum WordNetError {
    /// A database file could not be read.
    #[error("cannot read WordNet file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A line does not follow the `wndb(5WN)` format.
    #[error("{path}:{line}: malformed WordNet line: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The same synset offset appears on two lines of a data file.
    #[error("{path}:{line}: synset {offset:08} appears twice")]
    DuplicateSynset {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The synset offset.
        offset: u32,
    },
}

/// One noun synset of `data.noun`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synset {
    /// Byte offset in `data.noun`, the synset's id (`n{offset:08}` is its wnid).
    pub offset: u32,
    /// Its lemmas in file order, `_` replaced by a space, case kept ("dog", "domestic dog",
    /// "Canis familiaris").
    pub lemmas: Vec<String>,
    /// Offsets of its direct hyponyms: pointers `~` (hyponym) and `~i` (instance hyponym) to
    /// noun synsets, in file order.
    pub hyponyms: Vec<u32>,
}

impl Synset {
    /// The ImageNet-style WordNet id, `n` followed by the 8-digit offset.
    pub fn wnid(&self) -> String {
        format!("n{:08}", self.offset)
    }
}

/// One line of an index file: a lemma and the synsets it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The lemma, `_` replaced by a space (index files are lower-case).
    pub lemma: String,
    /// Synset offsets, in the file's order (most frequent sense first).
    pub offsets: Vec<u32>,
}

/// The parsed noun database plus the noun and adjective indexes.
///
/// A small reader of the WordNet 3.0 database files (`wndb(5WN)` format), just enough for the
/// outlier-label corpus and its cleaning against the ID classes (docs/method.md §4, docs/data.md §2).
///
/// [`WordNet::open`] parses `data.noun` (every noun synset: its lemmas and its hyponym pointers
/// `~` and `~i`), `index.noun` (lemma → synset offsets, most frequent sense first) and
/// `index.adj` (adjective lemmas). An ImageNet wnid such as `n02084071` is the noun synset at
/// byte offset 02084071 of `data.noun`.
///
/// Lemmas are returned in display form: `_` replaced by a space, case as in the file
/// (`data.noun` keeps capitals, "Canis familiaris"; the index files are lower-case). Lemma
/// lookups ([`WordNet::first_noun_sense`], [`WordNet::noun_senses`]) accept either `_` or spaces
/// and any case.
///
/// Licence lines at the top of each file start with two spaces and are skipped. Parsing stops
/// after the pointer list of a data line, so glosses are never read.
#[derive(Debug, Clone)]
pub struct WordNet {
    dir: PathBuf,
    synsets: HashMap<u32, Synset>,
    /// Sorted by lemma (byte order), for binary search.
    noun_index: Vec<IndexEntry>,
    /// Sorted by lemma (byte order).
    adj_index: Vec<IndexEntry>,
}

/// Parses an ImageNet-style WordNet id: `n` followed by exactly 8 ASCII digits, the noun offset.
///
/// ```
/// use oodgate::bank_build::wordnet::parse_wnid;
/// assert_eq!(parse_wnid("n02084071"), Some(2084071));
/// assert_eq!(parse_wnid("n2084071"), None);
/// assert_eq!(parse_wnid("v02084071"), None);
/// ```
pub fn parse_wnid(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('n')?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The lookup key of a lemma: `_` → space, lower-case.
pub fn lemma_key(lemma: &str) -> String {
    lemma.replace('_', " ").to_lowercase()
}

impl WordNet {
    /// Reads `data.noun`, `index.noun` and `index.adj` from `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<WordNet, WordNetError> {
        let dir = dir.as_ref();
        let synsets = parse_data(&dir.join("data.noun"))?;
        let noun_index = read_index(&dir.join("index.noun"))?;
        let adj_index = read_index(&dir.join("index.adj"))?;
        Ok(WordNet {
            dir: dir.to_path_buf(),
            synsets,
            noun_index,
            adj_index,
        })
    }

    /// The first existing WordNet dictionary folder (one holding `index.noun`): [`SYSTEM_DIR`],
    /// then [`ASSETS_SUBDIR`] under the current directory, then under this crate's root
    /// (`CARGO_MANIFEST_DIR` at build time). `None` if there is none.
    pub fn default_dir() -> Option<PathBuf> {
        let mut candidates = vec![PathBuf::from(SYSTEM_DIR)];
        if let Ok(cwd) = std::env::current_dir() {
            candidates.push(cwd.join(ASSETS_SUBDIR));
        }
        candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(ASSETS_SUBDIR));
        candidates
            .into_iter()
            .find(|dir| dir.join("index.noun").is_file())
    }

    /// The folder the database was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of noun synsets.
    pub fn synset_count(&self) -> usize {
        self.synsets.len()
    }

    /// The noun synset at `offset`.
    pub fn synset(&self, offset: u32) -> Option<&Synset> {
        self.synsets.get(&offset)
    }

    /// The noun synset of an ImageNet-style wnid (`n02084071`).
    pub fn synset_by_wnid(&self, wnid: &str) -> Option<&Synset> {
        self.synset(parse_wnid(wnid)?)
    }

    /// The lemmas of the synset with this wnid (`n02084071` → "dog", "domestic dog",
    /// "Canis familiaris"); `None` for a malformed or unknown wnid.
    pub fn lemmas(&self, wnid: &str) -> Option<&[String]> {
        self.synset_by_wnid(wnid).map(|s| s.lemmas.as_slice())
    }

    /// Every synset below `offset` through hyponym and instance-hyponym pointers, transitively.
    /// The synset itself is not included (unless the graph loops back to it). Empty for an
    /// unknown offset.
    pub fn hyponyms_closure(&self, offset: u32) -> BTreeSet<u32> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<u32> = self
            .synset(offset)
            .map(|s| s.hyponyms.clone())
            .unwrap_or_default();
        while let Some(next) = stack.pop() {
            if seen.insert(next)
                && let Some(s) = self.synset(next)
            {
                stack.extend(s.hyponyms.iter().copied().filter(|o| !seen.contains(o)));
            }
        }
        seen
    }

    /// All noun senses of a lemma (`_` or spaces, any case), most frequent first; empty if
    /// `index.noun` does not list it.
    pub fn noun_senses(&self, lemma: &str) -> &[u32] {
        lookup(&self.noun_index, lemma)
    }

    /// The first (most frequent) noun sense of a lemma, from `index.noun`.
    pub fn first_noun_sense(&self, lemma: &str) -> Option<u32> {
        self.noun_senses(lemma).first().copied()
    }

    /// Every lemma of `index.noun` in byte order, `_` replaced by a space.
    pub fn noun_lemmas(&self) -> impl Iterator<Item = &str> {
        self.noun_index.iter().map(|e| e.lemma.as_str())
    }

    /// Every lemma of `index.adj` in byte order, `_` replaced by a space.
    pub fn adj_lemmas(&self) -> impl Iterator<Item = &str> {
        self.adj_index.iter().map(|e| e.lemma.as_str())
    }
}

fn lookup<'a>(index: &'a [IndexEntry], lemma: &str) -> &'a [u32] {
    let key = lemma_key(lemma);
    match index.binary_search_by(|e| e.lemma.as_str().cmp(key.as_str())) {
        Ok(i) => &index[i].offsets,
        Err(_) => &[],
    }
}

/// Reads a whole database file as UTF-8 (WordNet 3.0 is ASCII).
fn read_text(path: &Path) -> Result<String, WordNetError> {
    let bytes = fs::read(path).map_err(|source| WordNetError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        WordNetError::Parse {
            path: path.to_path_buf(),
            line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
            reason: "not valid UTF-8".to_string(),
        }
    })
}

/// Splits a file into (1-based line number, line) pairs, skipping the licence header (lines
/// starting with two spaces) and empty lines.
fn data_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(_, line)| !line.trim_end().is_empty() && !line.starts_with("  "))
}

/// A cursor over the whitespace-separated fields of one line.
struct Fields<'a> {
    path: &'a Path,
    line_no: usize,
    iter: std::str::SplitAsciiWhitespace<'a>,
}

impl<'a> Fields<'a> {
    fn new(path: &'a Path, line_no: usize, line: &'a str) -> Self {
        Fields {
            path,
            line_no,
            iter: line.split_ascii_whitespace(),
        }
    }

    fn error(&self, reason: String) -> WordNetError {
        WordNetError::Parse {
            path: self.path.to_path_buf(),
            line: self.line_no,
            reason,
        }
    }

    fn next(&mut self, what: &str) -> Result<&'a str, WordNetError> {
        self.iter
            .next()
            .ok_or_else(|| self.error(format!("line ends before the {what} field")))
    }

    fn number(&mut self, what: &str, radix: u32) -> Result<u32, WordNetError> {
        let field = self.next(what)?;
        u32::from_str_radix(field, radix)
            .map_err(|_| self.error(format!("{what} {field:?} is not a base-{radix} number")))
    }
}

/// Parses a `data.*` file: per synset, its lemmas and its `~`/`~i` pointers to noun synsets.
fn parse_data(path: &Path) -> Result<HashMap<u32, Synset>, WordNetError> {
    let text = read_text(path)?;
    let mut synsets = HashMap::with_capacity(90_000);
    for (line_no, line) in data_lines(&text) {
        let mut f = Fields::new(path, line_no, line);
        let offset = f.number("synset offset", 10)?;
        f.next("lex_filenum")?;
        f.next("ss_type")?;
        let w_cnt = f.number("w_cnt", 16)?;
        let mut lemmas = Vec::with_capacity(w_cnt as usize);
        for _ in 0..w_cnt {
            lemmas.push(f.next("word")?.replace('_', " "));
            f.next("lex_id")?;
        }
        let p_cnt = f.number("p_cnt", 10)?;
        let mut hyponyms = Vec::new();
        for _ in 0..p_cnt {
            let symbol = f.next("pointer symbol")?;
            let target = f.number("pointer offset", 10)?;
            let pos = f.next("pointer part of speech")?;
            f.next("pointer source/target")?;
            if (symbol == "~" || symbol == "~i") && pos == "n" {
                hyponyms.push(target);
            }
        }
        let synset = Synset {
            offset,
            lemmas,
            hyponyms,
        };
        if synsets.insert(offset, synset).is_some() {
            return Err(WordNetError::DuplicateSynset {
                path: path.to_path_buf(),
                line: line_no,
                offset,
            });
        }
    }
    Ok(synsets)
}

/// Reads an `index.*` file: every lemma (`_` → space) with its synset offsets, sorted by lemma.
///
/// Line format: `lemma pos synset_cnt p_cnt [ptr_symbol…] sense_cnt tagsense_cnt offset…`.
pub fn read_index(path: &Path) -> Result<Vec<IndexEntry>, WordNetError> {
    let text = read_text(path)?;
    let mut entries = Vec::with_capacity(120_000);
    for (line_no, line) in data_lines(&text) {
        let mut f = Fields::new(path, line_no, line);
        let lemma = f.next("lemma")?.replace('_', " ");
        f.next("pos")?;
        let synset_cnt = f.number("synset_cnt", 10)?;
        let p_cnt = f.number("p_cnt", 10)?;
        for _ in 0..p_cnt {
            f.next("pointer symbol")?;
        }
        f.next("sense_cnt")?;
        f.next("tagsense_cnt")?;
        let mut offsets = Vec::with_capacity(synset_cnt as usize);
        for _ in 0..synset_cnt {
            offsets.push(f.number("synset offset", 10)?);
        }
        entries.push(IndexEntry { lemma, offsets });
    }
    entries.sort_by(|a, b| a.lemma.cmp(&b.lemma));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LICENCE: &str = "  1 This software and database is being provided to you, the LICENSEE, by  \n  \
                           2 Princeton University under the following license.  \n";

    fn write(dir: &Path, name: &str, text: &str) {
        let mut f = fs::File::create(dir.join(name)).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// A three-level toy hierarchy: animal > dog > (poodle, ~i Lassie), plus an unrelated cat.
    fn toy() -> (tempfile::TempDir, WordNet) {
        let dir = tempfile::tempdir().unwrap();
        let data = format!(
            "{LICENCE}\
             00000100 05 n 01 animal 0 002 ~ 00000200 n 0000 ~ 00000500 n 0000 | a living thing  \n\
             00000200 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 003 @ 00000100 n 0000 ~ 00000300 n 0000 ~i 00000400 n 0000 | a dog  \n\
             00000300 05 n 02 poodle 0 poodle_dog 0 001 @ 00000200 n 0000 | a breed  \n\
             00000400 18 n 01 Lassie 0 001 @i 00000200 n 0000 | a famous dog  \n\
             00000500 05 n 01 cat 0 002 @ 00000100 n 0000 + 00000600 v 0101 | a cat  \n"
        );
        write(dir.path(), "data.noun", &data);
        let index = format!(
            "{LICENCE}\
             animal n 1 1 ~ 1 0 00000100  \n\
             cat n 2 1 @ 2 0 00000500 00000100  \n\
             dog n 1 2 @ ~ 1 0 00000200  \n\
             domestic_dog n 1 1 @ 1 0 00000200  \n"
        );
        write(dir.path(), "index.noun", &index);
        write(dir.path(), "index.adj", "big a 1 0 1 0 00000900  \n");
        let wn = WordNet::open(dir.path()).unwrap();
        (dir, wn)
    }

    #[test]
    fn parses_toy_database() {
        let (_dir, wn) = toy();
        assert_eq!(wn.synset_count(), 5);
        assert_eq!(
            wn.lemmas("n00000200").unwrap(),
            ["dog", "domestic dog", "Canis familiaris"]
        );
        assert_eq!(wn.synset(200).unwrap().hyponyms, vec![300, 400]);
        // "+" (derivation) and "@" pointers are not hyponyms.
        assert!(wn.synset(500).unwrap().hyponyms.is_empty());
        assert_eq!(wn.synset(200).unwrap().wnid(), "n00000200");
        assert_eq!(
            wn.hyponyms_closure(100),
            BTreeSet::from([200, 300, 400, 500])
        );
        assert_eq!(wn.hyponyms_closure(200), BTreeSet::from([300, 400]));
        assert!(wn.hyponyms_closure(999).is_empty());
        assert_eq!(wn.first_noun_sense("Cat"), Some(500));
        assert_eq!(wn.first_noun_sense("domestic dog"), Some(200));
        assert_eq!(wn.first_noun_sense("domestic_dog"), Some(200));
        assert_eq!(wn.noun_senses("cat"), [500, 100]);
        assert_eq!(wn.first_noun_sense("wolf"), None);
        assert_eq!(
            wn.noun_lemmas().collect::<Vec<_>>(),
            ["animal", "cat", "dog", "domestic dog"]
        );
        assert_eq!(wn.adj_lemmas().collect::<Vec<_>>(), ["big"]);
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let (dir, _) = toy();
        write(
            dir.path(),
            "data.noun",
            &format!("{LICENCE}00000100 05 n 0g animal 0 000 | x\n"),
        );
        let err = WordNet::open(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WordNetError::Parse { line: 3, .. }), "{msg}");
        assert!(
            msg.contains("data.noun:3") && msg.contains("w_cnt"),
            "{msg}"
        );

        write(
            dir.path(),
            "data.noun",
            &format!("{LICENCE}00000100 05 n 01 animal 0 002 ~ 00000200 n 0000\n"),
        );
        let msg = WordNet::open(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("data.noun:3") && msg.contains("pointer"),
            "{msg}"
        );
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = WordNet::open(dir.path()).unwrap_err();
        assert!(matches!(err, WordNetError::Read { .. }));
        assert!(err.to_string().contains("data.noun"));
    }

    #[test]
    fn wnid_parsing() {
        assert_eq!(parse_wnid("n01440764"), Some(1440764));
        assert_eq!(parse_wnid("n00000000"), Some(0));
        for bad in [
            "",
            "n",
            "n0144076",
            "n014407640",
            "N01440764",
            "n0144076x",
            "01440764",
        ] {
            assert_eq!(parse_wnid(bad), None, "{bad}");
        }
    }

    /// The real database: only when a dictionary is installed.
    #[test]
    fn real_wordnet_parses() {
        let Some(dir) = WordNet::default_dir() else {
            eprintln!("skipped: no WordNet dictionary (run deploy/setup/fetch-wordnet.sh)");
            return;
        };
        let start = std::time::Instant::now();
        let wn = WordNet::open(&dir).unwrap();
        let elapsed = start.elapsed();
        eprintln!(
            "WordNet {}: {} noun synsets, {} noun lemmas, {} adjective lemmas, parsed in {:?}",
            dir.display(),
            wn.synset_count(),
            wn.noun_lemmas().count(),
            wn.adj_lemmas().count(),
            elapsed
        );
        assert_eq!(wn.synset_count(), 82_115);
        assert_eq!(wn.noun_lemmas().count(), 117_798);
        assert_eq!(wn.adj_lemmas().count(), 21_479);
        // Parse time is printed, not asserted: speed targets live in benchmarks.
    }
}
