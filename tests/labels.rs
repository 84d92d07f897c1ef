//! Label sets, templates, the WordNet reader and outlier cleaning, on the shipped data files and
//! (where installed) the real WordNet 3.0 dictionary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use oodgate::bank_build::labels::{
    CleanOptions, CleanReport, CorpusOptions, IdLabels, LabelError, clean_outliers, outlier_words,
    templates,
};
use oodgate::bank_build::wordnet::WordNet;

fn temp_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
    f
}

/// The WordNet dictionary, or `None` (with a message) where it is not installed.
fn wordnet_dir() -> Option<PathBuf> {
    let dir = WordNet::default_dir();
    if dir.is_none() {
        eprintln!(
            "skipped: no WordNet dictionary (/usr/share/wordnet or .assets/wordnet-base); \
             run deploy/setup/fetch-wordnet.sh"
        );
    }
    dir
}

#[test]
fn imagenet1k_preset() {
    let l = IdLabels::preset("imagenet1k").unwrap();
    assert_eq!(l.names.len(), 1000);
    assert_eq!(l.wnids.len(), 1000);
    assert_eq!(l.names[0], "tench");
    assert_eq!(l.wnids[0].as_deref(), Some("n01440764"));
    assert_eq!(l.names[1], "goldfish");
    assert_eq!(l.names[999], "toilet paper");
    assert_eq!(l.wnids[999].as_deref(), Some("n15075141"));
    // The CLIP-style names repeat two names on distinct synsets; both rows stay.
    assert_eq!(l.names.iter().filter(|n| *n == "missile").count(), 2);
    assert_eq!(l.names.iter().filter(|n| *n == "sunglasses").count(), 2);
    assert_eq!(IdLabels::load("imagenet1k").unwrap(), l);
}

#[test]
fn cifar_presets() {
    let c10 = IdLabels::load("cifar10").unwrap();
    assert_eq!(c10.names.len(), 10);
    assert!(c10.wnids.iter().all(Option::is_none));
    let c100 = IdLabels::load("cifar100").unwrap();
    assert_eq!(c100.names.len(), 100);
    assert_eq!(c100.names[1], "aquarium fish");
}

#[test]
fn template_sets() {
    let ole = templates("ole").unwrap();
    assert_eq!(ole.lines.len(), 128);
    assert_eq!(ole.lines[0], "'a bad photo of a {}.'");
    assert_eq!(ole.lines[34], "'a photo of a {}.',");
    assert_eq!(ole.lines[98], "'a photo with a {}.',");
    assert!(ole.lines[35].starts_with("'the "), "{}", ole.lines[35]);
    assert_eq!(ole.lines[127], "'a tattoo with the {}.'");
    assert_eq!(ole.apply("cat")[34], "'a photo of a cat.',");
    // Byte-exact: the fingerprint is the sha256 of the shipped file itself (it has no final
    // newline), as recorded in config/templates/README.md.
    assert_eq!(
        ole.fingerprint(),
        "b6c115442a72f3d7167d201a02149541be98d50d99c3a905632bb177b1f09269"
    );

    let openai = templates("openai-imagenet").unwrap();
    assert_eq!(openai.lines.len(), 80);
    assert_eq!(openai.lines[0], "a bad photo of a {}.");
    assert_eq!(openai.apply("tench").len(), 80);
    assert_ne!(openai.fingerprint(), ole.fingerprint());

    assert_eq!(templates("mcm").unwrap().apply("cat"), ["a photo of a cat"]);
}

#[test]
fn template_file_and_errors() {
    let f = temp_file("a {} photo\r\n'b {}.',\n");
    let t = templates(f.path().to_str().unwrap()).unwrap();
    assert_eq!(t.lines, ["a {} photo", "'b {}.',"]);
    assert_eq!(t.name, f.path().to_str().unwrap());

    let f = temp_file("a {} photo\nno placeholder\n");
    let err = templates(f.path().to_str().unwrap()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        matches!(
            err,
            LabelError::Placeholder {
                line: 2,
                count: 0,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains(&format!("{}:2:", f.path().display())), "{msg}");

    let f = temp_file("{} and {}\n");
    let msg = templates(f.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(msg.contains(":1:") && msg.contains("found 2"), "{msg}");
}

#[test]
fn label_file_both_column_orders() {
    let f = temp_file(
        "# my classes\n\
         n02084071\tdog\n\
         house cat\tn02124075\n\
         \n\
         toaster\n",
    );
    let l = IdLabels::load(f.path().to_str().unwrap()).unwrap();
    assert_eq!(l.names, ["dog", "house cat", "toaster"]);
    assert_eq!(
        l.wnids,
        [
            Some("n02084071".to_string()),
            Some("n02124075".to_string()),
            None
        ]
    );
}

#[test]
fn label_file_errors_name_the_line() {
    let f = temp_file("cat\ndog\tcanine\n");
    let err = IdLabels::from_file(f.path()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.starts_with(&format!("{}:2:", f.path().display())),
        "{msg}"
    );

    let f = temp_file("# header\ncat\ndog\nCat\n");
    let err = IdLabels::from_file(f.path()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        matches!(
            err,
            LabelError::Duplicate {
                line: 4,
                first_line: 2,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains(":4:") && msg.contains("line 2"), "{msg}");

    let f = temp_file("# nothing\n\n");
    let err = IdLabels::from_file(f.path()).unwrap_err();
    assert!(matches!(err, LabelError::Empty { .. }), "{err}");

    let err = IdLabels::load("/nonexistent/labels.txt").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LabelError::Read { .. }), "{msg}");
    assert!(
        msg.contains("/nonexistent/labels.txt") && msg.contains("imagenet1k"),
        "{msg}"
    );
}

#[test]
fn outlier_word_sources() {
    let ole = outlier_words("ole-reference", None, &CorpusOptions::default()).unwrap();
    assert_eq!(ole.len(), 10_848);
    assert_eq!(ole.first().map(String::as_str), Some("aardvark"));
    assert_eq!(ole.last().map(String::as_str), Some("zythum"));

    let f = temp_file("# mine\nfoo\nbar baz\n\nfoo\n");
    let words = outlier_words(f.path().to_str().unwrap(), None, &CorpusOptions::default());
    assert_eq!(words.unwrap(), ["foo", "bar baz"]);
}

#[test]
fn wordnet_dog() {
    let Some(dir) = wordnet_dir() else { return };
    let wn = WordNet::open(&dir).unwrap();
    let lemmas = wn.lemmas("n02084071").unwrap();
    assert!(lemmas.iter().any(|l| l == "dog"), "{lemmas:?}");
    assert!(lemmas.iter().any(|l| l == "domestic dog"), "{lemmas:?}");
    assert!(lemmas.iter().any(|l| l == "Canis familiaris"), "{lemmas:?}");
    assert_eq!(wn.first_noun_sense("dog"), Some(2_084_071));

    let below = wn.hyponyms_closure(2_084_071);
    for breed in ["poodle", "beagle", "basenji"] {
        let sense = wn.first_noun_sense(breed).unwrap();
        assert!(below.contains(&sense), "{breed} ({sense:08}) not below dog");
    }
    // Two levels down: toy poodle < poodle < dog.
    let toy = wn.first_noun_sense("toy poodle").unwrap();
    assert!(below.contains(&toy));
    assert!(!below.contains(&wn.first_noun_sense("cat").unwrap()));
    // Instance hyponyms (~i): Stan Musial is an instance of baseball player (n09835506).
    let musial = wn.first_noun_sense("Musial").unwrap();
    assert!(wn.hyponyms_closure(9_835_506).contains(&musial));
}

#[test]
fn wordnet_corpus_counts() {
    let Some(dir) = wordnet_dir() else { return };
    let nouns = outlier_words("wordnet", Some(&dir), &CorpusOptions::default()).unwrap();
    let multi = CorpusOptions {
        multiword: true,
        ..CorpusOptions::default()
    };
    let all_nouns = outlier_words("wordnet", Some(&dir), &multi).unwrap();
    let with_adj = CorpusOptions {
        adjectives: true,
        ..CorpusOptions::default()
    };
    let nouns_adj = outlier_words("wordnet", Some(&dir), &with_adj).unwrap();
    eprintln!(
        "WordNet corpus: {} single-word nouns, {} nouns incl. multi-word, {} single-word nouns + \
         adjectives",
        nouns.len(),
        all_nouns.len(),
        nouns_adj.len()
    );
    assert_eq!(nouns.len(), 57_506);
    assert_eq!(all_nouns.len(), 117_798);
    assert!(nouns.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    assert!(nouns.iter().all(|w| !w.contains(' ') && !w.contains('_')));
    assert!(all_nouns.iter().any(|w| w == "great white shark"));
    assert!(nouns_adj.len() > nouns.len() && nouns_adj.iter().any(|w| w == "happy"));
}

fn removed_by(words: &[&str], kept: &[String]) -> Vec<String> {
    let kept: HashSet<&str> = kept.iter().map(String::as_str).collect();
    words
        .iter()
        .filter(|w| !kept.contains(**w))
        .map(|w| w.to_string())
        .collect()
}

#[test]
fn clean_imagenet_against_wordnet_nouns() {
    let Some(dir) = wordnet_dir() else { return };
    let wn = WordNet::open(&dir).unwrap();
    let id = IdLabels::preset("imagenet1k").unwrap();
    let words = outlier_words("wordnet", Some(&dir), &CorpusOptions::default()).unwrap();
    let n = words.len();
    let (kept, report) = clean_outliers(words, &id, Some(&wn), &CleanOptions::default());
    eprintln!(
        "imagenet1k x WordNet single-word nouns ({n}): {}",
        serde_json::to_string(&report).unwrap()
    );
    assert_eq!(report.kept, kept.len());
    assert_eq!(report.removed() + report.kept, n);
    assert_eq!(
        report,
        CleanReport {
            exact: 457,
            synonyms: 494,
            hyponyms: 827,
            kept: 55_728
        }
    );
    let probe = [
        "tench",     // exact
        "volcano",   // exact
        "beagle",    // exact
        "man-eater", // synonym: great white shark n01484850
        "toadstool", // hyponym of agaric n13003061
        "musial",    // instance hyponym of baseball player n09835506
        "dog",       // kept: a hypernym of ID classes, not an ID synset
        "democracy",
        "galaxy",
        "carburetor",
    ];
    assert_eq!(
        removed_by(&probe, &kept),
        [
            "tench",
            "volcano",
            "beagle",
            "man-eater",
            "toadstool",
            "musial"
        ]
    );

    // Each rule alone, on probes it owns.
    let only = |exact, synonyms, hyponyms| CleanOptions {
        exact,
        synonyms,
        hyponyms,
        hyponyms_of_first_sense: false,
    };
    let probe_words: Vec<String> = probe.iter().map(|s| s.to_string()).collect();
    let (_, r) = clean_outliers(
        probe_words.clone(),
        &id,
        Some(&wn),
        &only(true, false, false),
    );
    assert_eq!((r.exact, r.synonyms, r.hyponyms), (3, 0, 0));
    // The synonym rule alone also catches exact names (they are lemmas of the ID synsets).
    let (_, r) = clean_outliers(
        probe_words.clone(),
        &id,
        Some(&wn),
        &only(false, true, false),
    );
    assert_eq!((r.exact, r.synonyms, r.hyponyms), (0, 4, 0));
    let (_, r) = clean_outliers(probe_words, &id, Some(&wn), &only(false, false, true));
    assert_eq!((r.exact, r.synonyms, r.hyponyms), (0, 0, 2));
}

#[test]
fn clean_multiword_synonyms_and_breeds() {
    let Some(dir) = wordnet_dir() else { return };
    let wn = WordNet::open(&dir).unwrap();
    let id = IdLabels::preset("imagenet1k").unwrap();
    let multi = CorpusOptions {
        multiword: true,
        ..CorpusOptions::default()
    };
    let words = outlier_words("wordnet", Some(&dir), &multi).unwrap();
    let n = words.len();
    let (kept, report) = clean_outliers(words, &id, Some(&wn), &CleanOptions::default());
    eprintln!(
        "imagenet1k x WordNet nouns incl. multi-word ({n}): {}",
        serde_json::to_string(&report).unwrap()
    );
    let probe = [
        "great white shark",       // exact
        "carassius auratus",       // synonym of goldfish n01443537
        "Carassius_auratus",       // same, in WordNet's own spelling
        "tinca tinca",             // synonym of tench n01440764
        "liver-spotted dalmatian", // a breed below Dalmatian n02110341, not an ImageNet class
        "toy poodle",              // exact ("Toy Poodle")
        "poodle",                  // kept: parent of the ImageNet poodles
        "domestic dog",            // kept
        "mount st. helens",        // an instance of volcano n09472597
    ];
    let mut words: Vec<String> = probe.iter().map(|s| s.to_string()).collect();
    let (k, r) = clean_outliers(words.clone(), &id, Some(&wn), &CleanOptions::default());
    assert_eq!(
        removed_by(&probe, &k),
        [
            "great white shark",
            "carassius auratus",
            "Carassius_auratus",
            "tinca tinca",
            "liver-spotted dalmatian",
            "toy poodle",
            "mount st. helens"
        ]
    );
    assert_eq!((r.exact, r.synonyms, r.hyponyms, r.kept), (2, 3, 2, 2));
    assert!(kept.iter().any(|w| w == "domestic dog"));
    assert!(!kept.iter().any(|w| w == "liver-spotted dalmatian"));

    // Without WordNet only the exact rule can apply.
    words.push("TENCH".to_string());
    let (_, r) = clean_outliers(words, &id, None, &CleanOptions::default());
    assert_eq!((r.exact, r.synonyms, r.hyponyms), (3, 0, 0));
}

#[test]
fn clean_labels_without_wnids_use_first_sense() {
    let Some(dir) = wordnet_dir() else { return };
    let wn = WordNet::open(&dir).unwrap();
    let id = IdLabels::preset("cifar10").unwrap();
    let words: Vec<String> = [
        "dog",
        "domestic dog",
        "poodle",
        "airplane",
        "aeroplane",
        "sky",
    ]
    .map(String::from)
    .to_vec();
    let (kept, r) = clean_outliers(words.clone(), &id, Some(&wn), &CleanOptions::default());
    // "dog", "airplane" exact; "domestic dog", "aeroplane" synonyms via the first noun sense;
    // hyponyms of a guessed sense are off by default.
    assert_eq!(kept, ["poodle", "sky"]);
    assert_eq!((r.exact, r.synonyms, r.hyponyms), (2, 2, 0));
    let guess = CleanOptions {
        hyponyms_of_first_sense: true,
        ..CleanOptions::default()
    };
    let (kept, r) = clean_outliers(words, &id, Some(&wn), &guess);
    assert_eq!(kept, ["sky"]);
    assert_eq!(r.hyponyms, 1);
}

#[test]
fn clean_ole_reference_list() {
    let id = IdLabels::preset("imagenet1k").unwrap();
    let words = outlier_words("ole-reference", None, &CorpusOptions::default()).unwrap();
    // Without WordNet: the reference removed ID names case-sensitively, so only "boxer"
    // ("Boxer") is left for the case-insensitive exact rule (docs/method.md §4).
    let (_, r) = clean_outliers(words.clone(), &id, None, &CleanOptions::default());
    assert_eq!((r.exact, r.synonyms, r.hyponyms, r.kept), (1, 0, 0, 10_847));
    let Some(dir) = wordnet_dir() else { return };
    let wn = WordNet::open(&dir).unwrap();
    let (kept, r) = clean_outliers(words, &id, Some(&wn), &CleanOptions::default());
    eprintln!(
        "imagenet1k x ole-reference (10848): {}",
        serde_json::to_string(&r).unwrap()
    );
    assert_eq!(
        (r.exact, r.synonyms, r.hyponyms, r.kept),
        (1, 155, 169, 10_523)
    );
    assert_eq!(kept.len(), r.kept);
}
