//! The NATS client flags of the commands that talk to a server from outside a worker
//! (`publish`, `collect`), and the one way they connect.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use oodgate::stream::setup::{redact_url, with_url_credentials};

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// NATS server URL (credentials may be given in it, `nats://user:password@host`; they are
    /// never printed).
    #[arg(long, env = "OODGATE_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Prefix of reply subjects; with the shipped server configuration, `_INBOX_publisher`.
    #[arg(long, default_value = "_INBOX")]
    pub inbox_prefix: String,
    /// CA certificate (PEM) to verify a TLS server with (with the shipped server
    /// configuration: deploy/nats/tls/ca.pem).
    #[arg(long, env = "OODGATE_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mutual TLS; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let mut opts = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .custom_inbox_prefix(&self.inbox_prefix);
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            opts = opts.add_client_certificate(c.clone(), k.clone());
        }
        with_url_credentials(opts, std::slice::from_ref(&self.nats))
            .connect(self.nats.as_str())
            .await
            .with_context(|| format!("connecting to {}", redact_url(&self.nats)))
    }
}
