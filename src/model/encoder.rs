//! Image and text encoders behind one small synchronous trait, and its ONNX Runtime backend.
//!
//! `Session::run` takes `&mut self`, so an encoder is owned by one thread (the daemon's
//! inference thread, or the command that runs it) rather than shared behind a lock.

use std::path::PathBuf;

use ndarray::{Array2, ArrayView2, ArrayView4, ArrayViewD};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, builder::GraphOptimizationLevel};
use ort::value::{Tensor, TensorRef};

use super::manifest::{ManifestError, ModelManifest};
use super::runtime::{self, Device, RuntimeError};
use super::tokenizer::END_OF_TEXT;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("model {path} has no input named {name:?} (it has: {available})")]
    NoSuchInput {
        path: PathBuf,
        name: String,
        available: String,
    },
    #[error("model {path} has no output named {name:?} (it has: {available})")]
    NoSuchOutput {
        path: PathBuf,
        name: String,
        available: String,
    },
    #[error("this model folder has no text encoder (manifest has no [text] section)")]
    NoTextEncoder,
    #[error("input batch has shape {got:?}, expected {expected}")]
    BadInput { got: Vec<usize>, expected: String },
    #[error("encoder output has shape {got:?}, expected [batch, {dim}] (manifest embed_dim)")]
    BadOutput { got: Vec<usize>, dim: usize },
    #[error("encoder produced a non-finite or zero embedding in row {row}")]
    NonFinite { row: usize },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What an encoder reports about itself (for `oodgate info`, `/info` and metrics).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EncoderInfo {
    pub model: String,
    pub weights: super::Weights,
    pub embed_dim: usize,
    pub image_size: u32,
    /// The execution provider that actually registered: "cpu" or "cuda:N".
    pub provider: String,
    pub device_requested: String,
    pub intra_threads: usize,
    pub ort_library: PathBuf,
    pub ort_version: String,
    pub fingerprint: String,
    /// [`super::manifest::Identity::image_digest`], read with the fingerprint.
    pub image_digest: String,
}

impl EncoderInfo {
    pub fn identity(&self) -> super::manifest::Identity {
        super::manifest::Identity {
            fingerprint: self.fingerprint.clone(),
            image_digest: self.image_digest.clone(),
        }
    }
}

/// Turns preprocessed pixels and token ids into L2-normalised embeddings.
pub trait Encoder: Send {
    /// `[batch, 3, size, size]` → `[batch, dim]`, rows unit-norm.
    fn embed_images(&mut self, batch: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncoderError>;
    /// `[batch, context]` token ids → `[batch, dim]`, rows unit-norm.
    fn embed_texts(&mut self, tokens: ArrayView2<'_, i64>) -> Result<Array2<f32>, EncoderError>;
    fn info(&self) -> &EncoderInfo;
}

/// Options that are not part of the model folder.
#[derive(Debug, Clone, Default)]
pub struct EncoderOptions {
    pub device: Device,
    /// ONNX Runtime intra-op threads; 0 = all cores.
    pub intra_threads: usize,
    pub ort_library: Option<PathBuf>,
    /// Load the text encoder (bank building, `embed --text`); the daemon does not need it.
    pub load_text: bool,
    /// ONNX Runtime session settings that trade CPU and memory against speed.
    pub tuning: SessionTuning,
}

/// ONNX Runtime settings with a measured effect on a busy worker (README "Performance").
/// The defaults are oodgate's (the `model.*` keys' defaults come from here): spinning, the
/// arena and memory patterns off, prepacking on. ONNX Runtime's own defaults are all on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTuning {
    /// Intra-op threads spin while waiting for work (`session.intra_op.allow_spinning`).
    /// Spinning wins when the encoder has the machine to itself; beside decode threads on
    /// few cores it burns CPU they need.
    pub spinning: bool,
    /// The CPU execution provider's arena allocator: keeps freed blocks (peak memory stays
    /// reserved) for faster reuse.
    pub cpu_arena: bool,
    /// Memory-pattern planning: preallocates one block per input shape seen.
    pub memory_pattern: bool,
    /// Weights of matrix products are repacked for the CPU's kernels at load (a second copy
    /// while loading; faster products).
    pub prepacking: bool,
    /// On CPU, the most images per ONNX Runtime run; a larger batch runs in slices of this
    /// size (0: the whole batch in one run). Activations grow with the run's batch and were
    /// the largest memory mass left beside the weights, while the CPU's matrix products are
    /// as fast at 8 images (400 token rows for ViT-B/32) as at 32. CUDA runs the whole batch.
    pub cpu_run_batch: usize,
    /// On CPU, hand the heap's free pages back to the system after each batch (glibc's
    /// `malloc_trim`). ONNX Runtime frees a run's activations, but glibc keeps them resident
    /// for reuse; trimming costs a page fault per reused page on the next batch.
    pub trim_heap: bool,
    /// When the batch reaches the session through ONNX Runtime's I/O binding.
    pub io_binding: IoBindingMode,
}

/// Where [`SessionTuning::io_binding`] applies. With I/O binding the batch is copied once
/// into memory of the session's choosing and the embeddings come back into it; on CUDA that
/// is page-locked host memory, which the device reads and writes directly, where a plain run
/// stages both through pageable buffers. On CPU it only adds a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBindingMode {
    /// On CUDA sessions only (`model.io_binding = true`).
    #[default]
    Cuda,
    /// On every session, CPU included (tests the binding path without a GPU).
    Always,
    /// Never (`model.io_binding = false`).
    Never,
}

impl Default for SessionTuning {
    fn default() -> Self {
        SessionTuning {
            spinning: false,
            cpu_arena: false,
            memory_pattern: false,
            prepacking: true,
            cpu_run_batch: 8,
            trim_heap: true,
            io_binding: IoBindingMode::Cuda,
        }
    }
}

/// The ONNX Runtime backend.
pub struct OrtEncoder {
    manifest: ModelManifest,
    image: Session,
    /// Set when the image session runs through I/O binding.
    binding: Option<BindingMemory>,
    text: Option<Session>,
    info: EncoderInfo,
    opts: EncoderOptions,
}

impl OrtEncoder {
    /// Loads the model folder's encoders on the configured device.
    pub fn load(manifest: ModelManifest, opts: EncoderOptions) -> Result<Self, EncoderError> {
        let rt = runtime::init(opts.ort_library.as_deref())?;
        let threads = if opts.intra_threads == 0 {
            crate::available_cores()
        } else {
            opts.intra_threads
        };
        let image_path = manifest.image_path();
        let (image, provider) =
            build_session(&rt.env, &image_path, opts.device, threads, opts.tuning)?;
        check_names(
            &image,
            &image_path,
            &[&manifest.image.input],
            &manifest.image.output,
        )?;
        let binding = match (opts.tuning.io_binding, provider.as_str()) {
            (IoBindingMode::Never, _) | (IoBindingMode::Cuda, "cpu") => None,
            // The binding is a speed-up, never a reason not to run: without it, plain runs.
            _ => match BindingMemory::new(&image, &provider) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(%provider, error = %e, "I/O binding unavailable; running without it");
                    None
                }
            },
        };
        let super::manifest::Identity {
            fingerprint,
            image_digest,
        } = manifest.identity()?;
        let info = EncoderInfo {
            model: if manifest.name.is_empty() {
                manifest.dir.display().to_string()
            } else {
                manifest.name.clone()
            },
            weights: manifest.weights,
            embed_dim: manifest.embed_dim,
            image_size: manifest.image.size,
            provider,
            device_requested: opts.device.to_string(),
            intra_threads: threads,
            ort_library: rt.library.clone(),
            ort_version: rt.version.clone(),
            fingerprint,
            image_digest,
        };
        let mut enc = OrtEncoder {
            manifest,
            image,
            binding,
            text: None,
            info,
            opts,
        };
        if enc.opts.load_text {
            enc.ensure_text()?;
        }
        Ok(enc)
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// Whether image batches run through I/O binding (see [`IoBindingMode`]); false after a
    /// bound run failed and the encoder fell back to plain runs.
    pub fn io_binding(&self) -> bool {
        self.binding.is_some()
    }

    fn ensure_text(&mut self) -> Result<&mut Session, EncoderError> {
        if self.text.is_none() {
            let spec = self
                .manifest
                .text
                .as_ref()
                .ok_or(EncoderError::NoTextEncoder)?;
            let path = self.manifest.dir.join(&spec.file);
            let rt = runtime::init(self.opts.ort_library.as_deref())?;
            let device = if self.info.provider == "cpu" {
                Device::Cpu
            } else {
                self.opts.device
            };
            let (s, _) = build_session(
                &rt.env,
                &path,
                device,
                self.info.intra_threads,
                self.opts.tuning,
            )?;
            let mut inputs: Vec<&str> = vec![&spec.input];
            if let Some(m) = &spec.attention_mask {
                inputs.push(m);
            }
            check_names(&s, &path, &inputs, &spec.output)?;
            self.text = Some(s);
        }
        self.text.as_mut().ok_or(EncoderError::NoTextEncoder)
    }

    /// One ONNX Runtime run of a standard-layout `[n, 3, s, s]` batch, normalised.
    fn run_images(&mut self, batch: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncoderError> {
        let n = batch.shape()[0];
        if let Some(mem) = &self.binding {
            match run_bound(&mut self.image, mem, &self.manifest, batch) {
                Ok(raw) => return normalized(raw.view(), n, self.manifest.embed_dim),
                // A bound run that ONNX Runtime refuses is retried plain, and binding stays
                // off: a provider that cannot bind must not cost the worker its batches.
                Err(e) => {
                    tracing::warn!(error = %e, "I/O-bound run failed; running without I/O binding from now on");
                    self.binding = None;
                }
            }
        }
        let input = TensorRef::from_array_view(batch)
            .map_err(|e| EncoderError::Inference(e.to_string()))?;
        let outputs = self
            .image
            .run(ort::inputs![self.manifest.image.input.as_str() => input])
            .map_err(|e| EncoderError::Inference(e.to_string()))?;
        let view = outputs[self.manifest.image.output.as_str()]
            .try_extract_array::<f32>()
            .map_err(|e| EncoderError::Inference(e.to_string()))?;
        normalized(view, n, self.manifest.embed_dim)
    }

    /// Runs every batch size once so the first real batch does not pay for memory planning.
    pub fn warm_up(&mut self, batch_sizes: &[usize]) -> Result<(), EncoderError> {
        let s = self.manifest.image.size as usize;
        for &b in batch_sizes {
            let x = ndarray::Array4::<f32>::zeros((b.max(1), 3, s, s));
            self.embed_images(x.view())?;
        }
        Ok(())
    }
}

impl Encoder for OrtEncoder {
    fn embed_images(&mut self, batch: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncoderError> {
        let s = self.manifest.image.size as usize;
        let shape = batch.shape();
        if shape[1] != 3 || shape[2] != s || shape[3] != s {
            return Err(EncoderError::BadInput {
                got: shape.to_vec(),
                expected: format!("[batch, 3, {s}, {s}]"),
            });
        }
        if shape[0] == 0 {
            return Ok(Array2::zeros((0, self.manifest.embed_dim)));
        }
        let contiguous = batch.as_standard_layout();
        let n = shape[0];
        let run = match self.opts.tuning.cpu_run_batch {
            r if r > 0 && self.info.provider == "cpu" => r,
            _ => n,
        };
        let out = if run >= n {
            self.run_images(contiguous.view())
        } else {
            let mut out = Array2::zeros((n, self.manifest.embed_dim));
            for (i, slice) in contiguous
                .axis_chunks_iter(ndarray::Axis(0), run)
                .enumerate()
            {
                let e = self.run_images(slice)?;
                out.slice_mut(ndarray::s![i * run..i * run + e.nrows(), ..])
                    .assign(&e);
            }
            Ok(out)
        };
        if self.opts.tuning.trim_heap && self.info.provider == "cpu" {
            super::heap::release_free();
        }
        out
    }

    fn embed_texts(&mut self, tokens: ArrayView2<'_, i64>) -> Result<Array2<f32>, EncoderError> {
        let spec = self
            .manifest
            .text
            .clone()
            .ok_or(EncoderError::NoTextEncoder)?;
        let dim = self.manifest.embed_dim;
        if tokens.ncols() != spec.context_length {
            return Err(EncoderError::BadInput {
                got: tokens.shape().to_vec(),
                expected: format!("[batch, {}]", spec.context_length),
            });
        }
        let n = tokens.nrows();
        if n == 0 {
            return Ok(Array2::zeros((0, dim)));
        }
        let len = if spec.dynamic_length {
            // Longest text in the batch, up to and including its end-of-text token.
            tokens
                .rows()
                .into_iter()
                .map(|r| {
                    r.iter()
                        .position(|&t| t == END_OF_TEXT)
                        .map_or(r.len(), |p| p + 1)
                })
                .max()
                .unwrap_or(spec.context_length)
        } else {
            spec.context_length
        };
        let ids = tokens
            .slice(ndarray::s![.., ..len])
            .as_standard_layout()
            .into_owned();
        // Hugging Face exports take a 0/1 mask: 1 up to and including the end-of-text token.
        let mask = spec.attention_mask.as_ref().map(|_| {
            let mut m = Array2::<i64>::zeros(ids.raw_dim());
            for (mut mrow, irow) in m.rows_mut().into_iter().zip(ids.rows()) {
                for (mv, &id) in mrow.iter_mut().zip(irow.iter()) {
                    *mv = 1;
                    if id == END_OF_TEXT {
                        break;
                    }
                }
            }
            m
        });
        let session = self.ensure_text()?;
        let err = |e: ort::Error| EncoderError::Inference(e.to_string());
        let ids_t = TensorRef::from_array_view(ids.view()).map_err(err)?;
        let outputs = match (&spec.attention_mask, &mask) {
            (Some(name), Some(m)) => {
                let m_t = TensorRef::from_array_view(m.view()).map_err(err)?;
                session.run(ort::inputs![spec.input.as_str() => ids_t, name.as_str() => m_t])
            }
            _ => session.run(ort::inputs![spec.input.as_str() => ids_t]),
        }
        .map_err(err)?;
        let view = outputs[spec.output.as_str()]
            .try_extract_array::<f32>()
            .map_err(err)?;
        normalized(view, n, dim)
    }

    fn info(&self) -> &EncoderInfo {
        &self.info
    }
}

/// Copies an `[n, dim]` output and L2-normalises its rows.
fn normalized(
    view: ArrayViewD<'_, f32>,
    n: usize,
    dim: usize,
) -> Result<Array2<f32>, EncoderError> {
    if view.ndim() != 2 || view.shape()[0] != n || view.shape()[1] != dim {
        return Err(EncoderError::BadOutput {
            got: view.shape().to_vec(),
            dim,
        });
    }
    let mut out = Array2::<f32>::zeros((n, dim));
    for (i, (mut dst, src)) in out
        .rows_mut()
        .into_iter()
        .zip(view.outer_iter())
        .enumerate()
    {
        let norm = src
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() || norm == 0.0 {
            return Err(EncoderError::NonFinite { row: i });
        }
        let inv = (1.0 / norm) as f32;
        dst.iter_mut()
            .zip(src.iter())
            .for_each(|(d, s)| *d = s * inv);
    }
    Ok(out)
}

fn check_names(
    s: &Session,
    path: &std::path::Path,
    inputs: &[&str],
    output: &str,
) -> Result<(), EncoderError> {
    let ins: Vec<String> = s.inputs().iter().map(|o| o.name().to_string()).collect();
    for name in inputs {
        if !ins.iter().any(|i| i == name) {
            return Err(EncoderError::NoSuchInput {
                path: path.to_path_buf(),
                name: name.to_string(),
                available: ins.join(", "),
            });
        }
    }
    let outs: Vec<String> = s.outputs().iter().map(|o| o.name().to_string()).collect();
    if !outs.iter().any(|o| o == output) {
        return Err(EncoderError::NoSuchOutput {
            path: path.to_path_buf(),
            name: output.to_string(),
            available: outs.join(", "),
        });
    }
    Ok(())
}

/// Builds a session on the requested device and returns it with the provider that registered.
/// `cuda` fails loudly; `auto` falls back to CPU with a WARN that names the reason.
/// The memory an I/O-bound run uses: an allocator for the input and where the output goes.
/// Page-locked host memory on CUDA (the device copies to and from it directly); ONNX
/// Runtime's CPU allocator otherwise.
struct BindingMemory {
    allocator: Allocator,
    output: MemoryInfo<'static>,
}

impl BindingMemory {
    fn new(session: &Session, provider: &str) -> ort::Result<Self> {
        if let Some(id) = provider.strip_prefix("cuda:") {
            let id = id.parse().unwrap_or(0);
            let pinned =
                |t| MemoryInfo::new(AllocationDevice::CUDA_PINNED, id, AllocatorType::Device, t);
            Ok(BindingMemory {
                allocator: Allocator::new(session, pinned(MemoryType::CPUInput)?)?,
                output: pinned(MemoryType::CPUOutput)?,
            })
        } else {
            let allocator = Allocator::default();
            let output = allocator.memory_info().to_owned();
            Ok(BindingMemory { allocator, output })
        }
    }
}

/// [`OrtEncoder::run_images`] through I/O binding: the batch is copied into a tensor from the
/// binding's allocator (page-locked on CUDA) and the output is bound to its memory. Returns
/// the raw output: only ONNX Runtime's errors count as the binding's failures.
fn run_bound(
    session: &mut Session,
    mem: &BindingMemory,
    manifest: &ModelManifest,
    batch: ArrayView4<'_, f32>,
) -> ort::Result<ndarray::ArrayD<f32>> {
    let mut input = Tensor::<f32>::new(&mem.allocator, batch.shape().to_vec())?;
    {
        let (_, dst) = input.extract_tensor_mut();
        match batch.as_slice() {
            Some(src) if src.len() == dst.len() => dst.copy_from_slice(src),
            _ => dst.iter_mut().zip(batch.iter()).for_each(|(d, s)| *d = *s),
        }
    }
    let mut binding = session.create_binding()?;
    binding.bind_input(manifest.image.input.as_str(), &input)?;
    binding.bind_output_to_device(manifest.image.output.as_str(), &mem.output)?;
    let outputs = session.run_binding(&binding)?;
    binding.synchronize_outputs()?;
    Ok(outputs[manifest.image.output.as_str()]
        .try_extract_array::<f32>()?
        .to_owned())
}

fn build_session(
    env: &ort::environment::Environment,
    path: &std::path::Path,
    device: Device,
    threads: usize,
    tuning: SessionTuning,
) -> Result<(Session, String), EncoderError> {
    let load_err = |e: ort::Error| EncoderError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if !path.is_file() {
        return Err(EncoderError::Load {
            path: path.to_path_buf(),
            reason: "file not found".into(),
        });
    }
    let cuda_id = match device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
        Device::Auto => Some(0),
    };
    if let Some(id) = cuda_id {
        let attempt = if runtime::cuda_available() {
            session_with_cuda(env, path, threads, id).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "the ONNX Runtime library at {} was built without the CUDA execution provider (fetch the GPU build with deploy/setup/fetch-ort.sh --gpu)",
                runtime::init(None)
                    .map(|r| r.library.display().to_string())
                    .unwrap_or_default()
            ))
        };
        match attempt {
            Ok(s) => return Ok((s, format!("cuda:{id}"))),
            Err(reason) if device == Device::Auto => {
                tracing::warn!(%reason, "CUDA execution provider unavailable; falling back to CPU");
            }
            Err(reason) => return Err(RuntimeError::Cuda(reason).into()),
        }
    }
    let s = session_cpu(env, path, threads, tuning).map_err(load_err)?;
    Ok((s, "cpu".to_string()))
}

// Builder errors are not Send/Sync, so sessions are built in functions returning ort::Result
// (the `?`s convert `ort::Error<SessionBuilder>` into plain `ort::Error`).
#[allow(clippy::needless_question_mark)]
fn session_cpu(
    env: &ort::environment::Environment,
    path: &std::path::Path,
    threads: usize,
    tuning: SessionTuning,
) -> ort::Result<Session> {
    let cpu = ort::ep::CPU::default()
        .with_arena_allocator(tuning.cpu_arena)
        .build()
        .error_on_failure();
    Ok(Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(threads)?
        .with_intra_op_spinning(tuning.spinning)?
        .with_memory_pattern(tuning.memory_pattern)?
        .with_prepacking(tuning.prepacking)?
        .with_execution_providers([cpu])?
        .commit_from_file(path)?)
}

#[allow(clippy::needless_question_mark)]
fn session_with_cuda(
    env: &ort::environment::Environment,
    path: &std::path::Path,
    threads: usize,
    device_id: i32,
) -> ort::Result<Session> {
    use ort::ep::cuda::ConvAlgorithmSearch;
    let cuda = ort::ep::CUDA::default()
        .with_device_id(device_id)
        // The exhaustive default makes the first run of every new shape slow.
        .with_conv_algorithm_search(ConvAlgorithmSearch::Heuristic)
        .build()
        .error_on_failure();
    Ok(Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(threads)?
        .with_execution_providers([cuda])?
        .commit_from_file(path)?)
}
