//! A real nats-server with JetStream for the tests: the library's launcher
//! (`oodgate::stream::local_server`, which `oodgate bench` uses too), panicking on failure.

use oodgate::stream::local_server::{self, LocalServer};

pub struct NatsServer {
    inner: LocalServer,
    pub port: u16,
    /// The CA clients must trust, for a server that serves TLS.
    pub ca: Option<std::path::PathBuf>,
}

/// The shipped `deploy/nats/nats-server.conf`, runnable on this machine: TLS files issued by
/// the shipped `deploy/nats/make-certs.sh` into `dir/tls` (the paths under /etc/nats/tls point
/// there) and `store_dir` moved into `dir`. Returns the file and the CA certificate.
#[allow(dead_code)]
pub fn shipped_conf(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let root = super::root();
    let tls = dir.join("tls");
    let out = std::process::Command::new(root.join("deploy/nats/make-certs.sh"))
        .arg(&tls)
        .output()
        .expect("run deploy/nats/make-certs.sh");
    assert!(
        out.status.success(),
        "make-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = std::fs::read_to_string(root.join("deploy/nats/nats-server.conf"))
        .expect("deploy/nats/nats-server.conf");
    // store_dir moved to the temporary folder (--sd would duplicate the file's line).
    let line = conf
        .lines()
        .find(|l| l.trim_start().starts_with("store_dir:"))
        .expect("store_dir line");
    let conf = conf
        .replace(line, &format!("  store_dir: {:?}", dir.to_string_lossy()))
        .replace("\"/etc/nats/tls/", &format!("\"{}/", tls.display()));
    let path = dir.join("nats-server.conf");
    std::fs::write(&path, conf).expect("write nats-server.conf");
    (path, tls.join("ca.pem"))
}

pub fn free_port() -> u16 {
    local_server::free_port().expect("free port")
}

/// The nats-server under test: `OODGATE_TEST_NATS_SERVER` when set (the Makefile runs the
/// stream tests once more with the current release from the venv), else the first found.
pub fn binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("OODGATE_TEST_NATS_SERVER") {
        let p = std::path::PathBuf::from(p);
        return if p.is_absolute() {
            p
        } else {
            super::root().join(p)
        };
    }
    local_server::find_binary(&super::root().join(".venv")).unwrap_or_else(|e| panic!("{e}"))
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let binary = binary();
        let inner = LocalServer::start(&binary).unwrap_or_else(|e| panic!("{e}"));
        NatsServer {
            port: inner.port,
            inner,
            ca: None,
        }
    }

    /// A server started with the shipped `deploy/nats/nats-server.conf` (its users and
    /// permissions), on free loopback ports with its store in a temporary folder; `env` gives
    /// the passwords the file references.
    #[allow(dead_code)]
    pub fn start_shipped(env: &[(&str, &str)]) -> NatsServer {
        let http = free_port();
        let mut ca = None;
        let inner = LocalServer::start_with(&binary(), env, |port, dir| {
            let (path, ca_path) = shipped_conf(dir);
            ca = Some(ca_path);
            Ok(vec![
                "-c".into(),
                path.display().to_string(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-m".into(),
                http.to_string(),
            ])
        })
        .unwrap_or_else(|e| panic!("{e}"));
        NatsServer {
            port: inner.port,
            inner,
            ca,
        }
    }

    /// A server started with the configuration lines `conf` (e.g. `max_payload: 65536`) on
    /// top of the usual flags.
    pub fn start_with_conf(conf: &str) -> NatsServer {
        let binary = binary();
        let inner = LocalServer::start_with(&binary, &[], |port, dir| {
            let path = dir.join("extra.conf");
            std::fs::write(&path, conf)?;
            Ok(vec![
                "-c".into(),
                path.display().to_string(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-js".into(),
                "-sd".into(),
                dir.display().to_string(),
            ])
        })
        .unwrap_or_else(|e| panic!("{e}"));
        NatsServer {
            port: inner.port,
            inner,
            ca: None,
        }
    }

    pub fn url(&self) -> String {
        self.inner.url()
    }

    pub fn dir(&self) -> &std::path::Path {
        self.inner.dir.path()
    }

    pub fn stop(&mut self) {
        self.inner.stop();
    }

    /// Stops and starts the server on the same port and store directory.
    pub fn restart(&mut self) {
        self.inner.restart().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A JetStream cluster of `n` nats-server processes on loopback, routed to each other.
pub struct Cluster {
    pub nodes: Vec<LocalServer>,
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        let binary = binary();
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (0..n)
            .map(|i| {
                let routes = routes.clone();
                let cp = cluster_ports[i];
                LocalServer::start_with(&binary, &[], move |port, dir| {
                    Ok(vec![
                        "-a".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                        "-n".into(),
                        format!("n{i}"),
                        "-js".into(),
                        "-sd".into(),
                        dir.display().to_string(),
                        "--cluster_name".into(),
                        "oodgate-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{cp}"),
                        "--routes".into(),
                        routes,
                    ])
                })
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        Cluster { nodes }
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Every node's URL, comma-separated (`nats.servers`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
