//! Label sets and prompt templates, the text side of the bank (docs/method.md §3–§4, §9); its own
//! file because ID labels, templates, the outlier corpus and its cleaning share the file formats.

// - `IdLabels`: the in-distribution class names, with their WordNet ids where known. Presets
//   `imagenet1k`, `cifar10` and `cifar100` are compiled in from `config/labels/`; any other
//   spec is a file path (`IdLabels::load`).
// - `Templates`: prompt templates with one `{}` each. Named sets are compiled in from
//   `config/templates/`. Lines are kept byte-exact: the OLE set's quotes and trailing commas
//   change the embeddings (docs/method.md §3).
// - `outlier_words`: the outlier-label corpus: WordNet nouns (and adjectives), OLE's
//   reference list, or a file.
// - `clean_outliers`: removes outlier words that name an ID class, a synonym of one, or a
//   hyponym of one (docs/method.md §4), and reports how many words each rule removed.
//
// Errors name the file (or preset) and the 1-based line.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::wordnet::{self, WordNet, WordNetError, lemma_key, parse_wnid};

/// Names of the compiled-in ID label sets.
pub const ID_PRESETS: [&str; 3] = ["imagenet1k", "cifar10", "cifar100"];

/// Names of the compiled-in template sets; the first is the default.
pub const TEMPLATE_SETS: [&str; 5] = [
    "openai-imagenet",
    "ole",
    "mcm",
    "neglabel-noun",
    "neglabel-adj",
];

/// The default template set.
pub const DEFAULT_TEMPLATES: &str = "openai-imagenet";

/// Outlier-corpus spec for WordNet nouns (plus adjectives with [`CorpusOptions::adjectives`]).
pub const CORPUS_WORDNET: &str = "wordnet";

/// Outlier-corpus spec for OLE's shipped reference list (`config/labels/ole-nonus.txt`).
pub const CORPUS_OLE_REFERENCE: &str = "ole-reference";

const IMAGENET1K: &str = include_str!("../../config/labels/imagenet1k.tsv");
const CIFAR10: &str = include_str!("../../config/labels/cifar10.txt");
const CIFAR100: &str = include_str!("../../config/labels/cifar100.txt");
const OLE_NONUS: &str = include_str!("../../config/labels/ole-nonus.txt");

const T_OPENAI: &str = include_str!("../../config/templates/openai-imagenet.txt");
const T_OLE: &str = include_str!("../../config/templates/ole.txt");
const T_MCM: &str = include_str!("../../config/templates/mcm.txt");
const T_NEGLABEL_NOUN: &str = include_str!("../../config/templates/neglabel-noun.txt");
const T_NEGLABEL_ADJ: &str = include_str!("../../config/templates/neglabel-adj.txt");

/// Everything that can go wrong while loading labels, templates or outlier words.
#[derive(Debug, Error)]
pub enum LabelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}{hint}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Extra advice, e.g. the preset names when the spec was probably meant as one.
        hint: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A line that cannot be parsed.
    #[error("{origin}:{line}: {reason}")]
    Line {
        /// The file path or preset name.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A label appears twice.
    #[error(
        "{origin}:{line}: duplicate label {name:?} (same as line {first_line}; names are \
         compared case-insensitively with '_' read as a space)"
    )]
    Duplicate {
        /// The file path or preset name.
        origin: String,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The label.
        name: String,
        /// 1-based line number of the first occurrence.
        first_line: usize,
    },
    /// A template without exactly one `{}`.
    #[error(
        "{origin}:{line}: a template must contain \"{{}}\" exactly once, found {count}: {text:?}"
    )]
    Placeholder {
        /// The file path or template-set name.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// How many `{}` the line has.
        count: usize,
        /// The line.
        text: String,
    },
    /// [`IdLabels::preset`] was given a name it does not know.
    #[error(
        "unknown ID label preset {name:?} (known: {known}); IdLabels::load reads other specs as files"
    )]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The preset names.
        known: String,
    },
    /// A corpus that cannot serve the request, with advice.
    #[error("{0}")]
    Unsupported(String),
    /// A list holds no entries.
    #[error("{origin}: no {what} (only blank or comment lines)")]
    Empty {
        /// The file path or preset name.
        origin: String,
        /// What was expected.
        what: &'static str,
    },
    /// The WordNet corpus was asked for but no dictionary folder exists.
    #[error(
        "no WordNet dictionary found (looked for index.noun in {} and .assets/wordnet-base/...); \
         run deploy/setup/fetch-wordnet.sh or pass the dictionary folder",
        wordnet::SYSTEM_DIR
    )]
    NoWordNet,
    /// WordNet could not be read.
    #[error(transparent)]
    WordNet(#[from] WordNetError),
}

fn read_file(path: &Path, hint: impl FnOnce() -> String) -> Result<String, LabelError> {
    fs::read_to_string(path).map_err(|source| LabelError::Read {
        path: path.to_path_buf(),
        hint: hint(),
        source,
    })
}

/// Lines of a text file with their 1-based numbers: split on `\n`, one trailing `\r` removed,
/// a final empty piece (after the last newline) dropped. Nothing else is changed.
fn raw_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut pieces: Vec<&str> = text.split('\n').collect();
    if pieces.last() == Some(&"") {
        pieces.pop();
    }
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
}

/// Lines of a list file, trimmed, without blank lines and `#` comment lines.
fn list_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    raw_lines(text)
        .map(|(n, l)| (n, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// The comparison key of a label or word: `_` read as a space, lower-case, surrounding
/// whitespace removed.
pub fn label_key(name: &str) -> String {
    lemma_key(name.trim())
}

// ---------------------------------------------------------------------------------------------
// ID labels
// ---------------------------------------------------------------------------------------------

/// The in-distribution class names, in class-index order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdLabels {
    /// Class names as they are embedded ("tench", "Boxer", "toilet paper").
    pub names: Vec<String>,
    /// The WordNet noun id of each class (`n01440764`), where the source gives one.
    pub wnids: Vec<Option<String>>,
}

impl IdLabels {
    /// A compiled-in label set: `imagenet1k` (1000 names with wnids), `cifar10`, `cifar100`.
    pub fn preset(name: &str) -> Result<IdLabels, LabelError> {
        let (text, file) = match name {
            "imagenet1k" => (IMAGENET1K, "imagenet1k.tsv"),
            "cifar10" => (CIFAR10, "cifar10.txt"),
            "cifar100" => (CIFAR100, "cifar100.txt"),
            other => {
                return Err(LabelError::UnknownPreset {
                    name: other.to_string(),
                    known: ID_PRESETS.join(", "),
                });
            }
        };
        Self::parse(&format!("preset {name} (config/labels/{file})"), text)
    }

    /// Reads a label file: one label per line, optionally with its WordNet id (`n` + 8 digits)
    /// in a second column separated by a TAB, in either order. Blank lines and lines starting
    /// with `#` are skipped; names are trimmed. Errors on an empty list, a malformed line or a
    /// duplicate name (case-insensitive, `_` = space) unless the two rows carry different
    /// WordNet ids (ImageNet's CLIP-style names have two such pairs: "missile", "sunglasses").
    pub fn from_file(path: impl AsRef<Path>) -> Result<IdLabels, LabelError> {
        let path = path.as_ref();
        let text = read_file(path, || {
            format!(" (not an ID label preset: {})", ID_PRESETS.join(", "))
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// A preset if `spec` names one, else a file path.
    pub fn load(spec: &str) -> Result<IdLabels, LabelError> {
        if ID_PRESETS.contains(&spec) {
            Self::preset(spec)
        } else {
            Self::from_file(spec)
        }
    }

    /// Parses label-file text; `origin` names the source in errors.
    pub fn parse(origin: &str, text: &str) -> Result<IdLabels, LabelError> {
        let err = |line: usize, reason: String| LabelError::Line {
            origin: origin.to_string(),
            line,
            reason,
        };
        let mut names = Vec::new();
        let mut wnids = Vec::new();
        // key -> (first line, wnid of that line)
        let mut seen: HashMap<String, (usize, Option<String>)> = HashMap::new();
        for (line_no, line) in list_lines(text) {
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            let (name, wnid) = match fields.as_slice() {
                [name] => {
                    if parse_wnid(name).is_some() {
                        return Err(err(
                            line_no,
                            format!("only a WordNet id ({name}), no class name"),
                        ));
                    }
                    (*name, None)
                }
                [a, b] => match (parse_wnid(a).is_some(), parse_wnid(b).is_some()) {
                    (true, false) => (*b, Some(a.to_string())),
                    (false, true) => (*a, Some(b.to_string())),
                    (true, true) => {
                        return Err(err(line_no, "both columns are WordNet ids".to_string()));
                    }
                    (false, false) => {
                        return Err(err(
                            line_no,
                            format!(
                                "two TAB-separated columns {a:?} and {b:?} but neither is a \
                                 WordNet id (n followed by 8 digits)"
                            ),
                        ));
                    }
                },
                more => {
                    return Err(err(
                        line_no,
                        format!(
                            "{} TAB-separated columns; expected a name and at most one WordNet id",
                            more.len()
                        ),
                    ));
                }
            };
            if name.is_empty() {
                return Err(err(line_no, "empty class name".to_string()));
            }
            let key = label_key(name);
            if let Some((first_line, first_wnid)) = seen.get(&key) {
                let distinct_synsets = matches!((first_wnid, &wnid), (Some(x), Some(y)) if x != y);
                if !distinct_synsets {
                    return Err(LabelError::Duplicate {
                        origin: origin.to_string(),
                        line: line_no,
                        name: name.to_string(),
                        first_line: *first_line,
                    });
                }
            } else {
                seen.insert(key, (line_no, wnid.clone()));
            }
            names.push(name.to_string());
            wnids.push(wnid);
        }
        if names.is_empty() {
            return Err(LabelError::Empty {
                origin: origin.to_string(),
                what: "class names",
            });
        }
        Ok(IdLabels { names, wnids })
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True if there are no classes (never for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// True if at least one class has a WordNet id.
    pub fn has_wnids(&self) -> bool {
        self.wnids.iter().any(Option::is_some)
    }
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// A set of prompt templates, each with exactly one `{}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Templates {
    /// The set's name, or the file path it was read from.
    pub name: String,
    /// The templates, byte-exact (only line endings removed).
    pub lines: Vec<String>,
}

/// A named template set (`openai-imagenet`, `ole`, `mcm`, `neglabel-noun`, `neglabel-adj`) or a
/// template file (one template per line, no comment lines).
///
/// Lines are split on `\n`; only a trailing `\r` per line and a final empty line are removed.
/// Lines are never trimmed: `ole` keeps its quotes and trailing commas (docs/method.md §3).
pub fn templates(spec: &str) -> Result<Templates, LabelError> {
    let builtin = match spec {
        "openai-imagenet" => Some(T_OPENAI),
        "ole" => Some(T_OLE),
        "mcm" => Some(T_MCM),
        "neglabel-noun" => Some(T_NEGLABEL_NOUN),
        "neglabel-adj" => Some(T_NEGLABEL_ADJ),
        _ => None,
    };
    match builtin {
        Some(text) => Templates::parse(spec, text),
        None => {
            let text = read_file(Path::new(spec), || {
                format!(" (not a template set: {})", TEMPLATE_SETS.join(", "))
            })?;
            Templates::parse(spec, &text)
        }
    }
}

impl Templates {
    /// Parses template text; `name` names the set in errors and in [`Templates::name`].
    pub fn parse(name: &str, text: &str) -> Result<Templates, LabelError> {
        let mut lines = Vec::new();
        for (line_no, line) in raw_lines(text) {
            let count = line.matches("{}").count();
            if count != 1 {
                return Err(LabelError::Placeholder {
                    origin: name.to_string(),
                    line: line_no,
                    count,
                    text: line.to_string(),
                });
            }
            lines.push(line.to_string());
        }
        if lines.is_empty() {
            return Err(LabelError::Empty {
                origin: name.to_string(),
                what: "templates",
            });
        }
        Ok(Templates {
            name: name.to_string(),
            lines,
        })
    }

    /// Every template with `{}` replaced by `label`, in order.
    pub fn apply(&self, label: &str) -> Vec<String> {
        self.lines
            .iter()
            .map(|t| t.replacen("{}", label, 1))
            .collect()
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True if there are no templates (never for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// sha256 (hex) of the templates joined by `\n`: identifies the set's exact bytes, for
    /// embedding caches.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.lines.join("\n").as_bytes()))
    }
}

// ---------------------------------------------------------------------------------------------
// Outlier words
// ---------------------------------------------------------------------------------------------

/// Which WordNet lemmas form the `wordnet` outlier corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusOptions {
    /// Also take the lemmas of `index.adj` (NegLabel uses nouns and adjectives).
    pub adjectives: bool,
    /// Keep multi-word lemmas ("great white shark"); by default only single words.
    pub multiword: bool,
}

/// The outlier-label corpus named by `spec`:
///
/// - `wordnet`: the lemmas of `index.noun` (plus `index.adj` with `opts.adjectives`), `_` → space,
///   single words only unless `opts.multiword`, deduplicated and sorted (byte order). The
///   dictionary folder is `wordnet_dir`, else [`WordNet::default_dir`].
/// - `ole-reference`: OLE's 10,848 reference words (`config/labels/ole-nonus.txt`), in their
///   original order.
/// - anything else: a file, one word per line (trimmed; blank and `#` lines skipped), in file
///   order with repeats dropped.
///
/// `opts` only affects `wordnet`.
pub fn outlier_words(
    spec: &str,
    wordnet_dir: Option<&Path>,
    opts: &CorpusOptions,
) -> Result<Vec<String>, LabelError> {
    match spec {
        CORPUS_WORDNET => {
            let dir = match wordnet_dir {
                Some(d) => d.to_path_buf(),
                None => WordNet::default_dir().ok_or(LabelError::NoWordNet)?,
            };
            let mut files = vec!["index.noun"];
            if opts.adjectives {
                files.push("index.adj");
            }
            let mut words = Vec::new();
            for file in files {
                let index = wordnet::read_index(&dir.join(file))?;
                words.extend(
                    index
                        .into_iter()
                        .map(|e| e.lemma)
                        .filter(|l| opts.multiword || !l.contains(' ')),
                );
            }
            words.sort_unstable();
            words.dedup();
            Ok(words)
        }
        CORPUS_OLE_REFERENCE => word_list(
            "preset ole-reference (config/labels/ole-nonus.txt)",
            OLE_NONUS,
        ),
        path => {
            let text = read_file(Path::new(path), || {
                format!(" (not an outlier corpus name: {CORPUS_WORDNET}, {CORPUS_OLE_REFERENCE})")
            })?;
            word_list(path, &text)
        }
    }
}

/// The word lines of an outlier list (a file or the `ole-reference` preset), in file order
/// with repeats: the rows of a matrix embedded elsewhere (`--outlier-embeddings`). Blank lines
/// and `#` comments are not words. The WordNet corpus has no file order and is refused.
pub fn outlier_lines(spec: &str) -> Result<Vec<String>, LabelError> {
    let text = match spec {
        CORPUS_WORDNET => {
            return Err(LabelError::Unsupported(format!(
                "precomputed outlier embeddings need their words as a file, one per line in \
                 row order; --outliers {CORPUS_WORDNET} is generated, not a file"
            )));
        }
        CORPUS_OLE_REFERENCE => OLE_NONUS.to_string(),
        path => read_file(Path::new(path), String::new)?,
    };
    Ok(list_lines(&text).map(|(_, w)| w.to_string()).collect())
}

fn word_list(origin: &str, text: &str) -> Result<Vec<String>, LabelError> {
    let mut seen = HashSet::new();
    let words: Vec<String> = list_lines(text)
        .filter(|(_, w)| seen.insert(*w))
        .map(|(_, w)| w.to_string())
        .collect();
    if words.is_empty() {
        return Err(LabelError::Empty {
            origin: origin.to_string(),
            what: "outlier words",
        });
    }
    Ok(words)
}

// ---------------------------------------------------------------------------------------------
// Cleaning against the ID set
// ---------------------------------------------------------------------------------------------

/// Which cleaning rules [`clean_outliers`] applies. All three rules are on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanOptions {
    /// Rule 1: drop words equal to an ID class name (case-insensitive, `_` = space).
    pub exact: bool,
    /// Rule 2: drop every lemma of an ID synset: the class's wnid, or for a class without one
    /// the first noun sense of its name.
    pub synonyms: bool,
    /// Rule 3: drop every lemma of a hyponym (transitive, instance hyponyms included) of the
    /// synset of an ID class that has a wnid.
    pub hyponyms: bool,
    /// Rule 3 also for classes without a wnid, through the first noun sense of the name. Off by
    /// default: the first sense is a guess ("ray" is a beam of light before it is a fish), and a
    /// wrong guess removes a whole subtree of unrelated words.
    pub hyponyms_of_first_sense: bool,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions {
            exact: true,
            synonyms: true,
            hyponyms: true,
            hyponyms_of_first_sense: false,
        }
    }
}

/// How many words each cleaning rule removed; a word counts once, for the first rule that
/// removed it (exact, then synonyms, then hyponyms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanReport {
    /// Removed as an exact ID class name.
    pub exact: usize,
    /// Removed as a lemma of an ID synset.
    pub synonyms: usize,
    /// Removed as a lemma of a hyponym of an ID synset.
    pub hyponyms: usize,
    /// Words left.
    pub kept: usize,
}

impl CleanReport {
    /// Words removed by all rules together.
    pub fn removed(&self) -> usize {
        self.exact + self.synonyms + self.hyponyms
    }
}

/// Removes outlier words that denote an ID class (docs/method.md §4), keeping the input order.
///
/// Words are compared by [`label_key`] (case-insensitive, `_` = space). Rules, in order, each
/// switchable in `opts`:
/// 1. **exact**: the word is an ID class name;
/// 2. **synonyms**: the word is a lemma of an ID synset: the synset of the class's wnid, or, for
///    a class without one, the first noun sense of its name if WordNet lists it;
/// 3. **hyponyms**: the word is a lemma of a synset below an ID synset (hyponyms and instance
///    hyponyms, transitively); see [`CleanOptions::hyponyms_of_first_sense`].
///
/// Matching is by lemma string, so a polysemous word goes if *any* of its senses falls under a
/// rule. Rules 2 and 3 need `wordnet`; without it only rule 1 applies. A wnid that WordNet does
/// not know is skipped with a warning.
pub fn clean_outliers(
    words: Vec<String>,
    id: &IdLabels,
    wordnet: Option<&WordNet>,
    opts: &CleanOptions,
) -> (Vec<String>, CleanReport) {
    let exact: HashSet<String> = id.names.iter().map(|n| label_key(n)).collect();
    let mut synonyms: HashSet<String> = HashSet::new();
    let mut hyponyms: HashSet<String> = HashSet::new();
    if let Some(wn) = wordnet {
        let mut below: HashSet<u32> = HashSet::new();
        for (name, wnid) in id.names.iter().zip(&id.wnids) {
            let (offset, explicit) = match wnid.as_deref() {
                Some(w) => match parse_wnid(w).filter(|o| wn.synset(*o).is_some()) {
                    Some(o) => (o, true),
                    None => {
                        tracing::warn!(class = %name, wnid = %w, "WordNet has no noun synset for this wnid; class skipped by the synonym and hyponym rules");
                        continue;
                    }
                },
                None => match wn.first_noun_sense(name) {
                    Some(o) => (o, false),
                    None => continue,
                },
            };
            if let Some(s) = wn.synset(offset) {
                synonyms.extend(s.lemmas.iter().map(|l| label_key(l)));
            }
            if explicit || opts.hyponyms_of_first_sense {
                below.extend(wn.hyponyms_closure(offset));
            }
        }
        for offset in below {
            if let Some(s) = wn.synset(offset) {
                hyponyms.extend(s.lemmas.iter().map(|l| label_key(l)));
            }
        }
    }

    let mut report = CleanReport::default();
    let mut kept = Vec::with_capacity(words.len());
    for word in words {
        let key = label_key(&word);
        if opts.exact && exact.contains(&key) {
            report.exact += 1;
        } else if opts.synonyms && synonyms.contains(&key) {
            report.synonyms += 1;
        } else if opts.hyponyms && hyponyms.contains(&key) {
            report.hyponyms += 1;
        } else {
            kept.push(word);
        }
    }
    report.kept = kept.len();
    (kept, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse() {
        let inet = IdLabels::preset("imagenet1k").unwrap();
        assert_eq!(inet.len(), 1000);
        assert!(inet.wnids.iter().all(Option::is_some));
        let c10 = IdLabels::preset("cifar10").unwrap();
        assert_eq!(c10.len(), 10);
        assert_eq!(c10.names[0], "airplane");
        assert!(!c10.has_wnids());
        assert_eq!(IdLabels::load("cifar100").unwrap().len(), 100);
        let err = IdLabels::preset("imagenet").unwrap_err().to_string();
        assert!(err.contains("imagenet1k"), "{err}");
    }

    #[test]
    fn label_lines() {
        let l = IdLabels::parse(
            "t",
            "# header\n\ncat\nn02084071\tdog\r\ngreat_white_shark\tn01484850\n  \n# x\n",
        )
        .unwrap();
        assert_eq!(l.names, ["cat", "dog", "great_white_shark"]);
        assert_eq!(
            l.wnids,
            [None, Some("n02084071".into()), Some("n01484850".into())]
        );

        let cases = [
            ("a\nb\tc\n", 2, "neither"),
            ("a\nn01440764\tn01443537\n", 2, "both"),
            ("a\nb\tn01440764\tx\n", 2, "3 TAB-separated"),
            ("a\nn01440764\n", 2, "only a WordNet id"),
            ("a\n\tn01440764\n", 2, "only a WordNet id"),
        ];
        for (text, line, needle) in cases {
            let err = IdLabels::parse("f.txt", text).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, LabelError::Line { line: l, .. } if l == line),
                "{msg}"
            );
            assert!(msg.starts_with(&format!("f.txt:{line}:")), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn duplicates() {
        let err = IdLabels::parse("f", "Cat\ndog\n\ncat\n").unwrap_err();
        assert!(
            matches!(
                err,
                LabelError::Duplicate {
                    line: 4,
                    first_line: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = IdLabels::parse("f", "a_b\na b\tn00000001\n").unwrap_err();
        assert!(
            matches!(err, LabelError::Duplicate { line: 2, .. }),
            "{err}"
        );
        // Same name, different synsets: allowed (ImageNet's "missile", "sunglasses").
        let l = IdLabels::parse("f", "n00000001\tx\nn00000002\tx\n").unwrap();
        assert_eq!(l.len(), 2);
        let err = IdLabels::parse("f", "n00000001\tx\nn00000001\tx\n").unwrap_err();
        assert!(
            matches!(err, LabelError::Duplicate { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn empty_lists() {
        let err = IdLabels::parse("f", "# only\n\n").unwrap_err();
        assert!(matches!(err, LabelError::Empty { .. }), "{err}");
        let err = Templates::parse("t", "").unwrap_err();
        assert!(matches!(err, LabelError::Empty { .. }), "{err}");
        let err = word_list("w", "#x\n").unwrap_err();
        assert!(matches!(err, LabelError::Empty { .. }), "{err}");
    }

    #[test]
    fn template_parsing_is_byte_exact() {
        let t = Templates::parse("t", " 'a {} ', \r\nb{}\n").unwrap();
        assert_eq!(t.lines, [" 'a {} ', ", "b{}"]);
        assert_eq!(t.apply("cat"), [" 'a cat ', ", "bcat"]);
        // No final newline: the last line is kept whole.
        let t = Templates::parse("t", "x {}\ny {}").unwrap();
        assert_eq!(t.lines, ["x {}", "y {}"]);
        // Only one final empty piece is dropped; an empty line in the middle is an error.
        let err = Templates::parse("t", "x {}\n\ny {}\n").unwrap_err();
        assert!(
            matches!(
                err,
                LabelError::Placeholder {
                    line: 2,
                    count: 0,
                    ..
                }
            ),
            "{err}"
        );
        let err = Templates::parse("t", "x {}\n{} {}\n").unwrap_err();
        assert!(err.to_string().starts_with("t:2:"), "{err}");
        // A label containing "{}" is inserted literally, once.
        let t = Templates::parse("t", "a {} b").unwrap();
        assert_eq!(t.apply("{}"), ["a {} b"]);
    }

    #[test]
    fn fingerprint_is_sha256_of_joined_lines() {
        let t = Templates::parse("t", "a {}\nb {}\n").unwrap();
        assert_eq!(t.fingerprint(), hex::encode(Sha256::digest(b"a {}\nb {}")));
        let u = Templates::parse("u", "a {}\nb {}").unwrap();
        assert_eq!(t.fingerprint(), u.fingerprint());
        let v = Templates::parse("v", "a {}\nb {} ").unwrap();
        assert_ne!(t.fingerprint(), v.fingerprint());
    }

    #[test]
    fn builtin_template_sets() {
        for name in TEMPLATE_SETS {
            let t = templates(name).unwrap();
            assert_eq!(t.name, name);
        }
        assert_eq!(templates("mcm").unwrap().lines, ["a photo of a {}"]);
        assert_eq!(templates("neglabel-noun").unwrap().lines, ["the nice {}"]);
        assert_eq!(
            templates("neglabel-adj").unwrap().lines,
            ["This is a {} photo"]
        );
        let err = templates("/nonexistent/t.txt").unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/t.txt") && err.contains("openai-imagenet"),
            "{err}"
        );
    }

    #[test]
    fn word_lists() {
        let w = word_list("w", "# c\nfoo\n bar \n\nfoo\nbaz_qux\n").unwrap();
        assert_eq!(w, ["foo", "bar", "baz_qux"]);
        let ole = outlier_words(CORPUS_OLE_REFERENCE, None, &CorpusOptions::default()).unwrap();
        assert_eq!(ole.len(), 10_848);
        assert_eq!(ole[0], "aardvark");
    }

    #[test]
    fn exact_rule_without_wordnet() {
        let id = IdLabels::parse("id", "Boxer\ngreat white shark\n").unwrap();
        let words: Vec<String> = ["boxer", "great_white_shark", "shark", "BOXER", "dog"]
            .map(String::from)
            .to_vec();
        let (kept, report) = clean_outliers(words.clone(), &id, None, &CleanOptions::default());
        assert_eq!(kept, ["shark", "dog"]);
        assert_eq!(
            report,
            CleanReport {
                exact: 3,
                synonyms: 0,
                hyponyms: 0,
                kept: 2
            }
        );
        let off = CleanOptions {
            exact: false,
            ..CleanOptions::default()
        };
        let (kept, report) = clean_outliers(words, &id, None, &off);
        assert_eq!(kept.len(), 5);
        assert_eq!(report.removed(), 0);
    }
}
