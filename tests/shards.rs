//! `oodgate filter` on generated webdataset and parquet shards: the real binary, the tiny
//! random-weight CLIP and the CC0 image fixtures. Decisions from a random model carry no
//! meaning; these tests check that every sample lands where `score` says it should, that
//! members and columns are kept, and that runs resume and split exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray};
use serde_json::Value;

const WORDS: &str = "rock stone mountain river ocean lake tree flower grass cloud sky sun moon \
star planet galaxy comet volcano desert forest jungle island beach wave sand snow ice glacier \
canyon cliff valley hill meadow swamp marsh pond stream waterfall cave tunnel bridge tower castle";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(args: &[&str]) -> Output {
    common::oodgate().args(args).output().expect("run oodgate")
}

fn ok(args: &[&str]) -> (String, String) {
    let out = run(args);
    assert!(
        out.status.success(),
        "oodgate {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fixture images, sorted by name.
fn images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(common::fixture("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    v.sort();
    v
}

/// A bank from the tiny model and a threshold at the median of the fixtures' scores, so that
/// both folders receive samples.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    bank: PathBuf,
    threshold: String,
    /// `score`'s decision and score per fixture file name.
    reference: BTreeMap<String, (String, f64)>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let model = common::tiny_model();
        let words = dir.path().join("words.txt");
        std::fs::write(
            &words,
            WORDS.split_whitespace().collect::<Vec<_>>().join("\n"),
        )
        .unwrap();
        let bank = dir.path().join("b.oodb");
        ok(&[
            "bank",
            "build",
            "--id",
            "cifar10",
            "--outliers",
            s(&words),
            "--templates",
            "mcm",
            "--k",
            "8",
            "--quantile",
            "0.5",
            "--no-hopg",
            "--cache",
            s(&dir.path().join("cache")),
            "-o",
            s(&bank),
            "--model",
            s(&model),
            "--device",
            "cpu",
        ]);
        let scores = |threshold: &str| -> BTreeMap<String, (String, f64)> {
            let mut args = vec![
                "score",
                "--bank",
                s(&bank),
                "--model",
                s(&model),
                "--device",
                "cpu",
                "--threshold",
                threshold,
            ];
            let imgs = images();
            args.extend(imgs.iter().map(|p| s(p)));
            let (out, _) = ok(&args);
            out.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .map(|v| {
                    let name = Path::new(v["input"].as_str().unwrap())
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    (
                        name,
                        (
                            v["decision"].as_str().unwrap().to_string(),
                            v["score"].as_f64().unwrap(),
                        ),
                    )
                })
                .collect()
        };
        let first = scores("0");
        let mut all: Vec<f64> = first.values().map(|v| v.1).collect();
        all.sort_by(f64::total_cmp);
        // Halfway between two neighbouring scores: no sample sits on the threshold.
        let mid = all.len() / 2;
        let threshold = format!("{:.9}", (all[mid - 1] + all[mid]) / 2.0);
        let reference = scores(&threshold);
        let ids = reference.values().filter(|v| v.0 == "id").count();
        assert!(ids > 0 && ids < reference.len(), "{reference:?}");
        Setup {
            dir,
            model,
            bank,
            threshold,
            reference,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn filter(&self, inputs: &[&Path], out: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "filter",
            "--bank",
            s(&self.bank),
            "--model",
            s(&self.model),
            "--device",
            "cpu",
            "--threshold",
            &self.threshold,
            "--out",
            s(out),
        ];
        args.extend(extra);
        args.extend(inputs.iter().map(|p| s(p)));
        run(&args)
    }
}

fn write_tar(path: &Path, members: &[(String, Vec<u8>)], gz: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let w: Box<dyn std::io::Write> = if gz {
        Box::new(flate2::write::GzEncoder::new(
            f,
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(f)
    };
    let mut b = tar::Builder::new(w);
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o444);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
}

/// img2dataset-style members for fixture image `i`: `{key}.{ext}`, `{key}.json`, `{key}.txt`.
fn sample(key: &str, img: &Path) -> Vec<(String, Vec<u8>)> {
    let ext = img.extension().unwrap().to_str().unwrap();
    let name = img.file_name().unwrap().to_str().unwrap();
    let json = format!(
        "{{\n    \"key\": \"{key}\",\n    \"uid\": \"uid-{key}\",\n    \"url\": \"https://example.org/{name}\",\n    \"status\": \"success\"\n}}"
    );
    vec![
        (format!("{key}.{ext}"), std::fs::read(img).unwrap()),
        (format!("{key}.json"), json.into_bytes()),
        (
            format!("{key}.txt"),
            format!("caption of {name}").into_bytes(),
        ),
    ]
}

/// Members of a tar, in order.
fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = std::fs::File::open(path).unwrap();
    let r: Box<dyn Read> = if path.to_string_lossy().ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut a = tar::Archive::new(r);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mut d = Vec::new();
            e.read_to_end(&mut d).unwrap();
            (name, d)
        })
        .collect()
}

fn table(path: &Path) -> RecordBatch {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = r.map(Result::unwrap).collect();
    if batches.is_empty() {
        return RecordBatch::new_empty(Arc::new(oodgate::shards::tables::scores_schema()));
    }
    arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn strings(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let c = b
        .column_by_name(col)
        .unwrap_or_else(|| panic!("no column {col}"));
    let c = c.as_string::<i32>();
    (0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i).to_string()))
        .collect()
}

/// key → decision from every scores table under `out`.
fn decisions(out: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(out.join("scores")) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let b = table(e.path());
            let keys = strings(&b, "key");
            let shard = strings(&b, "shard");
            for ((k, sh), d) in keys.into_iter().zip(shard).zip(strings(&b, "decision")) {
                let id = format!("{}:{}", sh.unwrap(), k.unwrap());
                assert!(m.insert(id.clone(), d.unwrap()).is_none(), "{id} twice");
            }
        }
    }
    m
}

fn parquet_shard(path: &Path, imgs: &[PathBuf]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes: Vec<Option<Vec<u8>>> = imgs
        .iter()
        .map(|p| Some(std::fs::read(p).unwrap()))
        .collect();
    // A failed download (img2dataset keeps its row with a null image) and an empty cell.
    bytes.push(None);
    bytes.push(Some(Vec::new()));
    let n = bytes.len();
    let keys: Vec<String> = (0..n).map(|i| format!("p{i:03}")).collect();
    let mut status = vec!["success"; n];
    status[n - 2] = "failed_to_download";
    let caption: Vec<String> = (0..n).map(|i| format!("caption {i}")).collect();
    let jpg = BinaryArray::from_iter(bytes.iter().map(|b| b.as_deref()));
    let rb = RecordBatch::try_from_iter(vec![
        ("caption", Arc::new(StringArray::from(caption)) as ArrayRef),
        ("key", Arc::new(StringArray::from(keys)) as ArrayRef),
        ("status", Arc::new(StringArray::from(status)) as ArrayRef),
        ("jpg", Arc::new(jpg) as ArrayRef),
    ])
    .unwrap();
    let f = std::fs::File::create(path).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(5))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, rb.schema(), Some(props)).unwrap();
    w.write(&rb).unwrap();
    w.close().unwrap();
}

/// Shards of every kind: a tar with sidecars, a corrupt member and a sample without an
/// image; the same as .tar.gz in a nested folder; a parquet file; a truncated tar.
fn dataset(root: &Path) -> usize {
    let imgs = images();
    let mut m = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        m.extend(sample(&format!("0000000{i:02}"), img));
    }
    m.extend(sample("000000090", &common::fixture("bad/corrupt.png")));
    m.push((
        "000000091.txt".into(),
        b"a caption without its image".to_vec(),
    ));
    write_tar(&root.join("a/00000.tar"), &m, false);
    let mut m2 = Vec::new();
    for (i, img) in imgs.iter().enumerate().take(6) {
        m2.extend(sample(&format!("0000100{i:02}"), img));
    }
    write_tar(&root.join("a/deep/00001.tar.gz"), &m2, true);
    parquet_shard(&root.join("b/part-0.parquet"), &imgs[..7]);
    // Truncated inside the fourth sample's image.
    let mut m3 = Vec::new();
    for (i, img) in imgs.iter().enumerate().take(5) {
        m3.extend(sample(&format!("0000200{i:02}"), img));
    }
    let t = root.join("c/00002.tar");
    write_tar(&t, &m3, false);
    let full = std::fs::read(&t).unwrap();
    let offset = {
        // Start of the 4th sample's image data + 10 bytes.
        let mut off = 0usize;
        for (_, d) in m3.iter().take(9) {
            off += 512 + d.len().div_ceil(512) * 512;
        }
        off + 512 + 10
    };
    std::fs::write(&t, &full[..offset]).unwrap();
    // img2dataset's `files` output: a folder of loose files.
    let f = root.join("d/00003");
    std::fs::create_dir_all(&f).unwrap();
    for (i, img) in imgs.iter().enumerate().take(8) {
        for (name, data) in sample(&format!("0000300{i:02}"), img) {
            std::fs::write(f.join(name), data).unwrap();
        }
    }
    5
}

#[test]
fn filter_routes_every_sample_as_score_decides_and_keeps_members_and_columns() {
    let st = Setup::new();
    let input = st.path("in");
    let n_shards = dataset(&input);
    // img2dataset's metadata parquet beside a tar (one row per input row, a failed download
    // included) is not a shard of its own; it is split beside the output tars.
    let n_imgs = images().len();
    let mut meta_keys: Vec<String> = (0..n_imgs).map(|i| format!("0000000{i:02}")).collect();
    meta_keys.extend(["000000090", "000000091", "000000099"].map(String::from));
    let mut status = vec!["success"; meta_keys.len()];
    *status.last_mut().unwrap() = "failed_to_download";
    let meta = RecordBatch::try_from_iter(vec![
        (
            "caption",
            Arc::new(StringArray::from_iter_values(
                meta_keys.iter().map(|k| format!("c{k}")),
            )) as ArrayRef,
        ),
        (
            "key",
            Arc::new(StringArray::from(meta_keys.clone())) as ArrayRef,
        ),
        ("status", Arc::new(StringArray::from(status)) as ArrayRef),
    ])
    .unwrap();
    let f = std::fs::File::create(input.join("a/00000.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, meta.schema(), None).unwrap();
    w.write(&meta).unwrap();
    w.close().unwrap();
    let out = st.path("out");
    let o = st.filter(&[&input], &out, &["--batch", "4"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("filter: {n_shards} of {n_shards} shards")),
        "{stderr}"
    );
    let imgs = images();
    let name_of = |i: usize| imgs[i].file_name().unwrap().to_string_lossy().into_owned();

    // The plain tar: every good sample in the folder `score` chose, members byte for byte.
    let id = members(&out.join("id/a/00000.tar"));
    let ood = members(&out.join("ood/a/00000.tar"));
    let mut want_id = Vec::new();
    let mut want_ood = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        let m = sample(&format!("0000000{i:02}"), img);
        if st.reference[&name_of(i)].0 == "id" {
            want_id.extend(m);
        } else {
            want_ood.extend(m);
        }
    }
    assert_eq!(id, want_id);
    assert_eq!(ood, want_ood);
    // The metadata table, split: the rows of the samples in each tar, in the same schema.
    for (top, want) in [("id", &want_id), ("ood", &want_ood)] {
        let m = table(&out.join(top).join("a/00000.parquet"));
        assert_eq!(m.schema(), meta.schema());
        let keys: Vec<String> = strings(&m, "key").into_iter().map(Option::unwrap).collect();
        let in_tar: Vec<String> = want
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".json").map(String::from))
            .collect();
        assert_eq!(keys, in_tar, "{top}");
    }
    let stats: Value =
        serde_json::from_slice(&std::fs::read(out.join("id/a/00000_stats.json")).unwrap()).unwrap();
    assert_eq!(stats["successes"], want_id.len() / 3);

    // Its scores table: one row per good sample with score's score, the sidecar's uid and url.
    let b = table(&out.join("scores/a/00000.parquet"));
    assert_eq!(b.num_rows(), imgs.len());
    let keys = strings(&b, "key");
    let score = b
        .column_by_name("score")
        .unwrap()
        .as_primitive::<Float64Type>();
    for (r, key) in keys.iter().enumerate() {
        let i: usize = key.as_ref().unwrap()[7..].parse().unwrap();
        let (d, sc) = &st.reference[&name_of(i)];
        assert_eq!(strings(&b, "decision")[r].as_ref(), Some(d));
        assert!(
            (score.value(r) - sc).abs() < 1e-4,
            "{key:?}: {} vs {sc}",
            score.value(r)
        );
        assert_eq!(
            strings(&b, "uid")[r],
            Some(format!("uid-{}", key.as_ref().unwrap()))
        );
        let ext = imgs[i].extension().unwrap().to_str().unwrap();
        assert_eq!(
            strings(&b, "member")[r],
            Some(format!("{}.{ext}", key.as_ref().unwrap()))
        );
    }
    assert_eq!(strings(&b, "method")[0].as_deref(), Some("ole"));
    assert_eq!(strings(&b, "shard")[0].as_deref(), Some("a/00000.tar"));

    // Its errors: the corrupt image and the sample without one, with their causes.
    let e = table(&out.join("errors/a/00000.parquet"));
    let kinds: BTreeSet<(Option<String>, Option<String>)> = strings(&e, "key")
        .into_iter()
        .zip(strings(&e, "kind"))
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            (Some("000000090".into()), Some("undecodable".into())),
            (Some("000000091".into()), Some("no_image".into())),
        ])
    );

    // The nested gzip tar comes out gzip-compressed under the same name.
    let gz_id = members(&out.join("id/a/deep/00001.tar.gz"));
    let gz_ood = members(&out.join("ood/a/deep/00001.tar.gz"));
    assert_eq!((gz_id.len() + gz_ood.len()) / 3, 6);

    // The folder comes out as two folders holding the kept samples' files.
    let mut files: Vec<String> = Vec::new();
    for top in ["id", "ood"] {
        for e in std::fs::read_dir(out.join(top).join("d/00003")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert_eq!(
                std::fs::read(e.path()).unwrap(),
                std::fs::read(input.join("d/00003").join(&name)).unwrap()
            );
            if name.ends_with(".json") {
                let i: usize = name[7..9].parse().unwrap();
                assert_eq!(st.reference[&name_of(i)].0, top, "{name}");
            }
            files.push(name);
        }
    }
    assert_eq!(files.len(), 8 * 3);
    assert!(out.join("id/d/00003_stats.json").is_file());

    // Parquet: every column kept in order, the score columns added, the failed download
    // neither scored nor an error, the empty image an error row.
    let pid = table(&out.join("id/b/part-0.parquet"));
    let pood = table(&out.join("ood/b/part-0.parquet"));
    let names: Vec<String> = pid
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "caption",
            "key",
            "status",
            "jpg",
            "ood_score",
            "ood_decision"
        ]
    );
    assert_eq!(pid.num_rows() + pood.num_rows(), 7);
    for (b, want) in [(&pid, "id"), (&pood, "ood")] {
        for (k, d) in strings(b, "key").iter().zip(strings(b, "ood_decision")) {
            let i: usize = k.as_ref().unwrap()[1..].parse().unwrap();
            assert_eq!(d.as_deref(), Some(want));
            assert_eq!(st.reference[&name_of(i)].0, want, "row {k:?}");
            let caption = strings(b, "caption");
            assert!(caption.contains(&Some(format!("caption {i}"))));
        }
    }
    let pe = table(&out.join("errors/b/part-0.parquet"));
    assert_eq!(strings(&pe, "kind"), [Some("null_image".to_string())]);
    assert_eq!(strings(&pe, "key"), [Some("p008".to_string())]);
    let marker: Value =
        serde_json::from_slice(&std::fs::read(out.join("_state/b/part-0.parquet.json")).unwrap())
            .unwrap();
    assert_eq!(marker["counts"]["upstream_failures"], 1);
    assert_eq!(marker["counts"]["read"], 9);

    // The truncated tar: the three whole samples are scored, the cut one and the shard are
    // error rows, and the shard still completes.
    let t = decisions(&out);
    let cut: Vec<&String> = t.keys().filter(|k| k.starts_with("c/")).collect();
    assert_eq!(cut.len(), 3, "{cut:?}");
    let ce = table(&out.join("errors/c/00002.parquet"));
    assert_eq!(
        strings(&ce, "kind"),
        [
            Some("truncated_member".to_string()),
            Some("truncated_shard".to_string())
        ]
    );
    assert_eq!(strings(&ce, "key")[0].as_deref(), Some("000020003"));
    assert!(
        stderr.contains("c/00002.tar: 4 read, ") && stderr.contains("TRUNCATED"),
        "{stderr}"
    );

    // A second run skips every shard and changes nothing.
    let before: Vec<(PathBuf, Vec<u8>)> = walkdir::WalkDir::new(&out)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect();
    let o = st.filter(&[&input], &out, &["--batch", "4"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("complete already, skipped").count(),
        n_shards,
        "{stderr}"
    );
    let after: Vec<(PathBuf, Vec<u8>)> = walkdir::WalkDir::new(&out)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect();
    assert!(before == after, "a rerun changed the outputs");

    // Another threshold in the same folder is refused, and allowed with --overwrite.
    let o = run(&[
        "filter",
        "--bank",
        s(&st.bank),
        "--model",
        s(&st.model),
        "--device",
        "cpu",
        // A negative threshold as its own argument (clap took it for a flag before).
        "--threshold",
        "-1000",
        "--out",
        s(&out),
        s(&input),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--overwrite"), "{err}");
}

fn shard_set(n: usize, per: usize, root: &Path) -> BTreeSet<String> {
    let imgs = images();
    let mut keys = BTreeSet::new();
    for s in 0..n {
        let mut m = Vec::new();
        for i in 0..per {
            let key = format!("{s:05}{i:04}");
            m.extend(sample(&key, &imgs[(s + i) % imgs.len()]));
            keys.insert(format!("{s:05}.tar:{key}"));
        }
        write_tar(&root.join(format!("{s:05}.tar")), &m, false);
    }
    keys
}

fn tar_keys(out: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for top in ["id", "ood"] {
        for e in std::fs::read_dir(out.join(top)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "tar") {
                let shard = p.file_name().unwrap().to_string_lossy().into_owned();
                for (name, _) in members(&p) {
                    if let Some(k) = name.strip_suffix(".json") {
                        v.push(format!("{shard}:{k}"));
                    }
                }
            }
        }
    }
    v.sort();
    v
}

#[test]
fn a_filter_killed_mid_shard_resumes_without_duplicates_or_losses() {
    let st = Setup::new();
    let input = st.path("in");
    let keys = shard_set(6, 24, &input);
    let clean = st.path("clean");
    let o = st.filter(&[&input], &clean, &["--batch", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = decisions(&clean);
    assert_eq!(want.keys().cloned().collect::<BTreeSet<_>>(), keys);

    let out = st.path("out");
    let mut child = common::oodgate()
        .args([
            "filter",
            "--bank",
            s(&st.bank),
            "--model",
            s(&st.model),
            "--device",
            "cpu",
            "--threshold",
            &st.threshold,
            "--batch",
            "4",
            "--decode-workers",
            "1",
            "--out",
            s(&out),
            s(&input),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first shard is committed and the second is being written.
    let first = out.join("_state/00000.tar.json");
    let second_started = || {
        std::fs::read_dir(out.join("id")).is_ok_and(|d| {
            d.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("00001.tar.tmp-")
            })
        })
    };
    let t0 = std::time::Instant::now();
    while !(first.exists() && second_started()) {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the second shard never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let markers = std::fs::read_dir(out.join("_state"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "run.json")
        .count();
    assert!(markers < 6, "the run finished before it was killed");
    let leftovers = walkdir::WalkDir::new(&out)
        .into_iter()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count();
    assert!(leftovers > 0, "the kill left no partial shard");

    let o = st.filter(&[&input], &out, &["--batch", "4"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("complete already, skipped"), "{stderr}");
    assert_eq!(decisions(&out), want);
    let in_tars = tar_keys(&out);
    assert_eq!(
        in_tars.len(),
        keys.len(),
        "a key is missing or repeated in the tars"
    );
    assert_eq!(in_tars.into_iter().collect::<BTreeSet<_>>(), keys);
    let leftovers = walkdir::WalkDir::new(&out)
        .into_iter()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn shard_index_and_count_split_the_shards_exactly() {
    let st = Setup::new();
    let input = st.path("in");
    let keys = shard_set(7, 2, &input);
    let out = st.path("out");
    let mut counts = Vec::new();
    for i in 0..3 {
        let o = st.filter(
            &[&input],
            &out,
            &["--shard-index", &i.to_string(), "--shard-count", "3"],
        );
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        assert!(
            !stderr.contains("complete already"),
            "a shard was given to two workers: {stderr}"
        );
        counts.push(stderr.matches(".tar: ").count());
    }
    assert_eq!(counts, [3, 2, 2]);
    assert_eq!(
        decisions(&out).keys().cloned().collect::<BTreeSet<_>>(),
        keys
    );
    // A worker with another split of the same folder is refused.
    let o = st.filter(
        &[&input],
        &out,
        &["--shard-index", "0", "--shard-count", "2"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--shard-count (3 there, 2 here)"),
        "{err}"
    );
}

#[test]
fn datacomp_uids_of_the_id_samples_load_in_numpy_sorted_and_distinct() {
    let st = Setup::new();
    let input = st.path("in");
    let imgs = images();
    // DataComp sidecars: a 32-hex-digit uid each; two samples share one uid.
    let uid = |i: usize| {
        format!(
            "{:016x}{:016x}",
            0xfeed_u64 * (i as u64 % 7 + 1),
            i as u64 % 7
        )
    };
    let mut m = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        let key = format!("{i:09}");
        let ext = img.extension().unwrap().to_str().unwrap();
        m.push((format!("{key}.{ext}"), std::fs::read(img).unwrap()));
        m.push((
            format!("{key}.json"),
            format!("{{\"uid\": \"{}\"}}", uid(i)).into_bytes(),
        ));
    }
    write_tar(&input.join("00000000.tar"), &m, false);
    let out = st.path("out");
    let o = st.filter(&[&input], &out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let b = table(&out.join("scores/00000000.parquet"));
    let mut want: Vec<String> = strings(&b, "uid")
        .into_iter()
        .zip(strings(&b, "decision"))
        .filter(|(_, d)| d.as_deref() == Some("id"))
        .map(|(u, _)| u.unwrap())
        .collect();
    want.sort();
    want.dedup();
    assert!(!want.is_empty());
    let script = "import numpy as np, sys\n\
        a = np.load(sys.argv[1])\n\
        assert a.dtype == np.dtype('u8,u8'), a.dtype\n\
        assert (np.sort(a) == a).all()\n\
        print('\\n'.join('%016x%016x' % (int(x), int(y)) for x, y in a))\n";
    let py = std::process::Command::new(common::python())
        .args(["-c", script])
        .arg(out.join("id_uids.npy"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let got: Vec<String> = String::from_utf8(py.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
    assert!(
        stderr.contains(&format!("{} uids of ID samples", want.len())),
        "{stderr}"
    );
}
