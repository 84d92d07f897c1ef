//! The ONNX Runtime encoder on the tiny random-weight CLIP (real architecture, real runtime).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use ndarray::{Array4, Axis, s};
use oodgate::model::encoder::{EncoderOptions, IoBindingMode, SessionTuning};
use oodgate::model::preprocess::Limits;
use oodgate::model::{ClipTokenizer, Device, Encoder, ModelManifest, OrtEncoder, Preprocessor};

/// The image encoder on CPU, one thread, with these session settings.
fn load_tuned(dir: &std::path::Path, tuning: impl FnOnce(&mut SessionTuning)) -> OrtEncoder {
    let mut opts = EncoderOptions {
        device: Device::Cpu,
        intra_threads: 1,
        ..Default::default()
    };
    tuning(&mut opts.tuning);
    OrtEncoder::load(ModelManifest::load(dir).unwrap(), opts).unwrap()
}

fn load(dir: &std::path::Path, load_text: bool) -> OrtEncoder {
    let m = ModelManifest::load(dir).unwrap();
    OrtEncoder::load(
        m,
        EncoderOptions {
            device: Device::Cpu,
            intra_threads: 1,
            load_text,
            ..Default::default()
        },
    )
    .unwrap()
}

fn images(pre: &Preprocessor, names: &[&str]) -> Array4<f32> {
    let s = pre.size() as usize;
    let mut t = Array4::zeros((names.len(), 3, s, s));
    for (i, n) in names.iter().enumerate() {
        let bytes = std::fs::read(common::fixture("images").join(n)).unwrap();
        t.slice_mut(s![i, .., .., ..])
            .assign(&pre.preprocess(&bytes).unwrap());
    }
    t
}

#[test]
fn image_embeddings_are_unit_norm_and_batch_independent() {
    let dir = common::tiny_model();
    let mut enc = load(&dir, false);
    assert_eq!(enc.info().provider, "cpu");
    let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default());
    let names = [
        "chelsea.jpg",
        "coffee.jpg",
        "rocket.jpg",
        "palette.png",
        "tiny.png",
    ];
    let batch = images(&pre, &names);
    let all = enc.embed_images(batch.view()).unwrap();
    assert_eq!(all.shape(), &[5, 64]);
    for row in all.rows() {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
    for (i, name) in names.iter().enumerate() {
        let one = enc
            .embed_images(batch.slice(s![i..i + 1, .., .., ..]))
            .unwrap();
        let d = (&one.index_axis(Axis(0), 0) - &all.index_axis(Axis(0), i))
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "{name}: alone vs in batch differ by {d}");
    }
    // Different images give different embeddings; the same image the same one.
    // (Random-weight towers map all images close together, so compare distances, not cosines.)
    let dist: f32 = (&all.row(0) - &all.row(1))
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt();
    assert!(dist > 1e-3, "distinct images collapsed: distance {dist}");
    let again = enc.embed_images(batch.view()).unwrap();
    assert_eq!(again, all);
}

/// `model.cpu_run_batch` runs a batch in slices; every image keeps its own row and the same
/// embedding as in one whole run (slices of 2, 2 and 1 for five distinct images).
#[test]
fn a_batch_run_in_slices_gives_each_image_its_whole_batch_embedding() {
    let dir = common::tiny_model();
    let with_run_batch = |run: usize| load_tuned(&dir, |t| t.cpu_run_batch = run);
    let mut whole = with_run_batch(0);
    let mut sliced = with_run_batch(2);
    let pre = Preprocessor::from_manifest(whole.manifest(), Limits::default());
    let batch = images(
        &pre,
        &[
            "chelsea.jpg",
            "coffee.jpg",
            "rocket.jpg",
            "palette.png",
            "tiny.png",
        ],
    );
    let a = whole.embed_images(batch.view()).unwrap();
    let b = sliced.embed_images(batch.view()).unwrap();
    assert_eq!(b.shape(), &[5, 64]);
    for i in 0..5 {
        let d = (&a.row(i) - &b.row(i))
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "image {i}: sliced vs whole differ by {d}");
        for j in (0..5).filter(|&j| j != i) {
            let other = (&a.row(j) - &b.row(i))
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!(other > d, "image {i}'s sliced row is closer to image {j}'s");
        }
    }
}

/// The I/O binding path (CUDA's by default) forced on a CPU session: the same embeddings as a
/// plain run, for a whole batch and for a batch run in slices.
#[test]
fn io_binding_gives_the_plain_runs_embeddings() {
    let dir = common::tiny_model();
    let load_with = |mode: IoBindingMode, run: usize| {
        load_tuned(&dir, |t| {
            t.io_binding = mode;
            t.cpu_run_batch = run;
        })
    };
    let mut plain = load_with(IoBindingMode::Never, 0);
    let pre = Preprocessor::from_manifest(plain.manifest(), Limits::default());
    let batch = images(&pre, &["chelsea.jpg", "coffee.jpg", "rocket.jpg"]);
    let want = plain.embed_images(batch.view()).unwrap();
    for run in [0, 2] {
        let mut bound = load_with(IoBindingMode::Always, run);
        assert!(bound.io_binding());
        let got = bound.embed_images(batch.view()).unwrap();
        assert_eq!(got.shape(), want.shape());
        let d = (&got - &want).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "run batch {run}: bound vs plain differ by {d}");
    }
    // The default binds on CUDA only: on CPU the plain path runs.
    let mut default = load_with(IoBindingMode::Cuda, 0);
    assert!(!default.io_binding());
    assert_eq!(default.embed_images(batch.view()).unwrap(), want);
}

#[test]
fn text_embeddings_follow_the_tokens() {
    let dir = common::tiny_model();
    let mut enc = load(&dir, true);
    let tok = ClipTokenizer::default();
    let ids = tok.encode_batch(&[
        "a photo of a cat.",
        "a photo of a dog.",
        "a photo of a cat.",
    ]);
    let e = enc.embed_texts(ids.view()).unwrap();
    assert_eq!(e.shape(), &[3, 64]);
    let d: f32 = (&e.row(0) - &e.row(2)).iter().map(|v| v.abs()).sum();
    assert!(d < 1e-5);
    assert!(e.row(0).dot(&e.row(1)) < 0.9999);
    let one = enc.embed_texts(ids.slice(s![1..2, ..])).unwrap();
    let d: f32 = (&one.row(0) - &e.row(1))
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(d < 1e-5, "text alone vs batch differ by {d}");
}

#[test]
fn hugging_face_layout_is_accepted_by_manifest_alone() {
    let tiny = common::tiny_model();
    let dir = tempfile::tempdir().unwrap();
    // Rename the tensors to the Hugging Face CLIP export's names and add an attention mask input.
    let script = r#"
import sys, onnx
src, dst = sys.argv[1], sys.argv[2]
def rename(path, out, names, extra=None):
    m = onnx.load(path)
    for old, new in names.items():
        for n in m.graph.node:
            n.input[:] = [new if i == old else i for i in n.input]
            n.output[:] = [new if o == old else o for o in n.output]
        for io in list(m.graph.input) + list(m.graph.output):
            if io.name == old: io.name = new
    if extra:
        m.graph.input.append(onnx.helper.make_tensor_value_info(extra, onnx.TensorProto.INT64, ["b", 77]))
    onnx.save(m, out)
rename(src + "/image.onnx", dst + "/vision_model.onnx", {"image": "pixel_values", "embedding": "image_embeds"})
rename(src + "/text.onnx", dst + "/text_model.onnx", {"tokens": "input_ids", "embedding": "text_embeds"}, "attention_mask")
"#;
    let st = std::process::Command::new(common::python())
        .args(["-c", script])
        .arg(&tiny)
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(
        dir.path().join("model.json"),
        r#"{"weights":"random","embed_dim":64,
            "image":{"file":"vision_model.onnx","input":"pixel_values","output":"image_embeds"},
            "text":{"file":"text_model.onnx","input":"input_ids","output":"text_embeds","attention_mask":"attention_mask","pad_id":49407}}"#,
    )
    .unwrap();
    let mut ours = load(&tiny, true);
    let mut hf = load(dir.path(), true);
    let pre = Preprocessor::from_manifest(ours.manifest(), Limits::default());
    let x = images(&pre, &["chelsea.jpg", "coffee.jpg"]);
    let a = ours.embed_images(x.view()).unwrap();
    let b = hf.embed_images(x.view()).unwrap();
    assert!((&a - &b).iter().all(|v| v.abs() < 1e-6));
    // HF pads with 49407; the causal model reads the EOT row, so embeddings agree.
    let ids0 = ClipTokenizer::new(77, 0).encode_batch(&["a photo of a cat."]);
    let ids1 = ClipTokenizer::new(77, 49407).encode_batch(&["a photo of a cat."]);
    let ta = ours.embed_texts(ids0.view()).unwrap();
    let tb = hf.embed_texts(ids1.view()).unwrap();
    assert!((&ta - &tb).iter().all(|v| v.abs() < 1e-5));
}

#[test]
fn wrong_tensor_names_are_reported_with_what_exists() {
    let tiny = common::tiny_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny.join("image.onnx"), dir.path().join("image.onnx")).unwrap();
    std::fs::write(
        dir.path().join("model.toml"),
        "weights = \"random\"\nembed_dim = 64\n[image]\nfile = \"image.onnx\"\ninput = \"pixel_values\"\n",
    )
    .unwrap();
    let m = ModelManifest::load(dir.path()).unwrap();
    let err = OrtEncoder::load(
        m,
        EncoderOptions {
            device: Device::Cpu,
            ..Default::default()
        },
    )
    .err()
    .expect("must fail")
    .to_string();
    assert!(
        err.contains("pixel_values") && err.contains("image"),
        "{err}"
    );
}

#[test]
fn cuda_on_a_cpu_library_fails_loudly_and_auto_falls_back() {
    let tiny = common::tiny_model();
    let m = ModelManifest::load(&tiny).unwrap();
    let err = OrtEncoder::load(
        m.clone(),
        EncoderOptions {
            device: Device::Cuda(0),
            ..Default::default()
        },
    )
    .err()
    .expect("cuda must fail on the CPU build")
    .to_string();
    assert!(
        err.contains("cuda") && err.contains("without the CUDA"),
        "{err}"
    );
    let enc = OrtEncoder::load(
        m,
        EncoderOptions {
            device: Device::Auto,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(enc.info().provider, "cpu");
}

/// The ONNX Runtime library is never searched for in the working directory: a library planted
/// in whatever folder the worker runs in (here `.ort/lib` under it) is not loaded.
#[test]
fn a_library_planted_in_the_working_directory_is_never_loaded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A copy of the binary away from the project, so its own ancestors hold no library.
    let bin = tmp.path().join("bin/oodgate");
    std::fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
    std::fs::copy(common::oodgate_bin(), &bin).expect("copy binary");
    let cwd = tmp.path().join("work");
    let planted = cwd.join(".ort/lib/libonnxruntime.so.1.31.1");
    std::fs::create_dir_all(planted.parent().expect("parent")).expect("mkdir");
    std::fs::write(&planted, b"not a library").expect("plant");
    let out = std::process::Command::new(&bin)
        .arg("info")
        .current_dir(&cwd)
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .expect("run oodgate info");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(&*planted.to_string_lossy()), "{text}");
    assert!(!text.contains("/work/.ort"), "{text}");
}
