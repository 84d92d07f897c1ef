//! The offline image path shared by `embed`, `score`, `eval` and `calibrate`: files are read
//! and preprocessed in parallel straight into a batch tensor, then encoded batch by batch.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, s};

use super::encoder::{Encoder, EncoderError};
use super::preprocess::{PreprocessError, Preprocessor};

/// File extensions picked up when walking a folder (explicitly named files are always tried;
/// the format is sniffed from the bytes either way).
pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "jfif"];

/// Expands files and folders (recursively, sorted) into a list of image files.
pub fn collect_images(inputs: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(input)
                .follow_links(true)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            found.sort();
            out.extend(found);
        } else if input.exists() {
            out.push(input.clone());
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("input {} does not exist", input.display()),
            ));
        }
    }
    Ok(out)
}

/// Why one file was skipped.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Preprocess {
        path: PathBuf,
        source: PreprocessError,
    },
}

/// Embeddings of the files that could be read, their paths in row order, and the failures.
pub struct Embedded {
    pub embeddings: Array2<f32>,
    pub paths: Vec<PathBuf>,
    pub failures: Vec<FileError>,
}

/// Preprocesses `paths` on `workers` threads and embeds them in batches of `batch`.
/// `progress` is called with the number of files finished after each batch.
pub fn embed_image_files(
    encoder: &mut dyn Encoder,
    pre: &Preprocessor,
    paths: &[PathBuf],
    batch: usize,
    workers: usize,
    mut progress: impl FnMut(usize),
) -> Result<Embedded, EncoderError> {
    let batch = batch.max(1);
    let size = pre.size() as usize;
    let dim = encoder.info().embed_dim;
    let mut rows: Vec<Array2<f32>> = Vec::new();
    let mut ok_paths = Vec::new();
    let mut failures = Vec::new();
    // One tensor reused for every batch.
    let mut tensor = Array4::<f32>::zeros((batch, 3, size, size));
    for chunk in paths.chunks(batch) {
        let results = preprocess_parallel(pre, chunk, &mut tensor, workers);
        // Compact successful rows to the front of the tensor.
        let mut n = 0;
        for (i, (path, r)) in chunk.iter().zip(results).enumerate() {
            match r {
                Ok(()) => {
                    if i != n {
                        let src = tensor.slice(s![i, .., .., ..]).to_owned();
                        tensor.slice_mut(s![n, .., .., ..]).assign(&src);
                    }
                    ok_paths.push(path.clone());
                    n += 1;
                }
                Err(e) => failures.push(e),
            }
        }
        if n > 0 {
            rows.push(encoder.embed_images(tensor.slice(s![..n, .., .., ..]))?);
        }
        progress(chunk.len());
    }
    let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
    let embeddings = if views.is_empty() {
        Array2::zeros((0, dim))
    } else {
        ndarray::concatenate(ndarray::Axis(0), &views)
            .map_err(|e| EncoderError::Inference(e.to_string()))?
    };
    Ok(Embedded {
        embeddings,
        paths: ok_paths,
        failures,
    })
}

/// Reads and preprocesses `chunk[i]` into `tensor[i]`, spreading files over `workers` threads.
fn preprocess_parallel(
    pre: &Preprocessor,
    chunk: &[PathBuf],
    tensor: &mut Array4<f32>,
    workers: usize,
) -> Vec<Result<(), FileError>> {
    let len = pre.tensor_len();
    let Some(buf) = tensor.as_slice_mut() else {
        return chunk
            .iter()
            .map(|p| {
                Err(FileError::Preprocess {
                    path: p.clone(),
                    source: PreprocessError::Resize("non-contiguous batch tensor".into()),
                })
            })
            .collect();
    };
    let one = |path: &Path, out: &mut [f32]| -> Result<(), FileError> {
        let bytes = std::fs::read(path).map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        pre.preprocess_into(&bytes, out)
            .map_err(|source| FileError::Preprocess {
                path: path.to_path_buf(),
                source,
            })
    };
    let slots: Vec<&mut [f32]> = buf.chunks_mut(len).take(chunk.len()).collect();
    let workers = workers.clamp(1, chunk.len().max(1));
    let per = chunk.len().div_ceil(workers);
    let mut results: Vec<Result<(), FileError>> = Vec::with_capacity(chunk.len());
    std::thread::scope(|sc| {
        let mut handles = Vec::new();
        let mut slots = slots.into_iter();
        for paths in chunk.chunks(per) {
            let mine: Vec<&mut [f32]> = slots.by_ref().take(paths.len()).collect();
            handles.push(sc.spawn(move || {
                paths
                    .iter()
                    .zip(mine)
                    .map(|(p, out)| one(p, out))
                    .collect::<Vec<_>>()
            }));
        }
        for h in handles {
            match h.join() {
                Ok(r) => results.extend(r),
                Err(_) => results.push(Err(FileError::Preprocess {
                    path: PathBuf::new(),
                    source: PreprocessError::Resize("preprocessing thread panicked".into()),
                })),
            }
        }
    });
    results
}
