//! A real nats-server with JetStream for the tests: the library's launcher
//! (`oodgate::stream::local_server`, which `oodgate bench` uses too), panicking on failure.

use oodgate::stream::local_server::{self, LocalServer};

pub struct NatsServer {
    inner: LocalServer,
    pub port: u16,
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
