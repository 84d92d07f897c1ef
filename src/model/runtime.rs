//! Loading the ONNX Runtime shared library and choosing the execution provider.
//!
//! ort is built with `load-dynamic`, so the library is opened at run time. Resolution order:
//! an explicit path (config key `model.ort_library`), then `ORT_DYLIB_PATH`, then the project's
//! default locations (the `.ort/lib` folder that `deploy/setup/fetch-ort.sh` fills, found
//! relative to the executable, then `/opt/oodgate/lib`). Never the working directory: a
//! library planted in whatever folder the worker runs in would otherwise be loaded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The ONNX Runtime version oodgate is built against (`api-31`), and the file name it looks for.
pub const ORT_VERSION: &str = "1.31.1";
const LIB_NAMES: [&str; 2] = ["libonnxruntime.so.1.31.1", "libonnxruntime.so"];
const FETCH_HINT: &str = "run `deploy/setup/fetch-ort.sh` (CPU) or `deploy/setup/fetch-ort.sh --gpu` (CUDA) from the project root, or set ORT_DYLIB_PATH / model.ort_library to a libonnxruntime.so >= 1.31";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (looked in: {searched}); {hint}", hint = FETCH_HINT)]
    NotFound { searched: String },
    #[error("ONNX Runtime library {path} does not exist; {hint}", hint = FETCH_HINT)]
    Missing { path: PathBuf },
    #[error("failed to load ONNX Runtime from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error(
        "ONNX Runtime was already loaded from {loaded}; cannot also load {requested} in the same process"
    )]
    AlreadyLoaded { loaded: PathBuf, requested: PathBuf },
    #[error("invalid device {0:?}: expected {forms}", forms = Device::FORMS)]
    BadDevice(String),
    #[error("device \"cuda\" requested but {0}")]
    Cuda(String),
}

/// Where inference runs, as configured (`device = "auto" | "cpu" | "cuda" | "cuda:N"`; `gpu`
/// is accepted as an alias of `cuda`).
///
/// Its `FromStr` is the one device grammar: the `--device` options and the configuration's
/// `model.device` (validation included) all parse with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when it registers, else CPU with a WARN naming the reason.
    #[default]
    Auto,
    Cpu,
    /// CUDA on the given device id; refusing to start if it cannot register.
    Cuda(i32),
}

impl Device {
    /// The accepted forms, as error messages list them. `gpu`, an alias of `cuda` that the
    /// command line has always taken, is accepted too but not listed.
    pub const FORMS: &'static str = "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"";
}

impl std::str::FromStr for Device {
    type Err = RuntimeError;
    /// `auto`, `cpu`, `cuda` (or `gpu`), `cuda:N` with N decimal digits (a device ordinal that
    /// fits an `i32`); surrounding whitespace is ignored, case is not.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<i32>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| RuntimeError::BadDevice(s.to_string())),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The process-wide ONNX Runtime: its library path, version and environment.
pub struct Runtime {
    pub library: PathBuf,
    pub version: String,
    pub env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Candidate library locations in resolution order (explicit, env, project defaults).
pub fn candidate_paths(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
        return out;
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
        return out;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/{release,debug}[/deps]/oodgate -> project root is two or three levels up.
        for up in exe.ancestors().skip(1).take(4) {
            dirs.push(up.join(".ort/lib"));
            dirs.push(up.join("lib"));
        }
    }
    dirs.push(PathBuf::from("/opt/oodgate/lib"));
    for d in dirs {
        for name in LIB_NAMES {
            out.push(d.join(name));
        }
    }
    out
}

/// Finds the library without loading it.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let cands = candidate_paths(explicit);
    if explicit.is_some() || std::env::var_os("ORT_DYLIB_PATH").is_some_and(|p| !p.is_empty()) {
        let p = cands.into_iter().next().unwrap_or_default();
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RuntimeError::Missing { path: p })
        };
    }
    if let Some(p) = cands.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let mut dirs: Vec<String> = cands
        .iter()
        .filter_map(|p| p.parent().map(|d| d.display().to_string()))
        .collect();
    dirs.dedup();
    Err(RuntimeError::NotFound {
        searched: dirs.join(", "),
    })
}

/// Loads ONNX Runtime once per process and returns it. Later calls return the same runtime
/// (an explicit different path is an error: a process can hold one ONNX Runtime).
pub fn init(explicit: Option<&Path>) -> Result<&'static Runtime, RuntimeError> {
    if let Some(rt) = RUNTIME.get() {
        if let Some(p) = explicit
            && p != rt.library
        {
            return Err(RuntimeError::AlreadyLoaded {
                loaded: rt.library.clone(),
                requested: p.to_path_buf(),
            });
        }
        return Ok(rt);
    }
    let library = locate(explicit)?;
    let builder = ort::init_from(&library).map_err(|e| RuntimeError::Load {
        path: library.clone(),
        reason: e.to_string(),
    })?;
    let env = builder
        .with_name("oodgate")
        .build()
        .map_err(|e| RuntimeError::Load {
            path: library.clone(),
            reason: e.to_string(),
        })?;
    let version = parse_version(ort::info()).unwrap_or_else(|| ORT_VERSION.to_string());
    // Another thread may have won the race; either runtime is the same library.
    let _ = RUNTIME.set(Runtime {
        library,
        version,
        env,
    });
    RUNTIME.get().ok_or_else(|| RuntimeError::Load {
        path: PathBuf::new(),
        reason: "runtime vanished".into(),
    })
}

/// Extracts "1.31.1" from ONNX Runtime's build info ("... git-branch=rel-1.31.1, ...").
fn parse_version(info: &str) -> Option<String> {
    let i = info.find("rel-")?;
    let v: String = info[i + 4..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Whether the loaded library was built with the CUDA execution provider.
pub fn cuda_available() -> bool {
    use ort::ep::ExecutionProvider;
    <ort::ep::CUDA as ExecutionProvider>::is_available().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses() {
        assert_eq!("auto".parse::<Device>().ok(), Some(Device::Auto));
        assert_eq!("cpu".parse::<Device>().ok(), Some(Device::Cpu));
        assert_eq!("cuda".parse::<Device>().ok(), Some(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>().ok(), Some(Device::Cuda(3)));
        assert!("cuda:-1".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn device_grammar_edges() {
        assert_eq!("gpu".parse::<Device>().ok(), Some(Device::Cuda(0)));
        assert_eq!(" cpu ".parse::<Device>().ok(), Some(Device::Cpu));
        assert_eq!("cuda:007".parse::<Device>().ok(), Some(Device::Cuda(7)));
        for bad in [
            "", "cuda:", "cuda:+1", "cuda: 1", "cuda:1.0", "CUDA", "gpu:0",
        ] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?}");
        }
        assert!("cuda:2147483648".parse::<Device>().is_err(), "beyond i32");
    }

    #[test]
    fn version_from_build_info() {
        assert_eq!(
            parse_version("ORT Build Info: git-branch=rel-1.31.1, git-commit-id=abc").as_deref(),
            Some("1.31.1")
        );
        assert_eq!(parse_version("no version"), None);
    }

    #[test]
    fn explicit_missing_path_names_the_fetch_command() {
        let err = locate(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
        assert!(msg.contains("deploy/setup/fetch-ort.sh"), "{msg}");
    }
}
