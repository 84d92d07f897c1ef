//! `oodgate adaptive reset --bank BANK --nats URL`: clears the shared adaptive memory of a
//! bank on every worker (a new epoch on the stream OODGATE_ADAPT, docs/adaptive.md §6).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use oodgate::stream::adaptive_sync;
use oodgate::stream::setup::{redact_url, with_url_credentials};

use super::common::load_bank;

#[derive(Debug, clap::Subcommand)]
pub enum AdaptiveCommand {
    /// Clear the shared adaptive memory of a bank: every worker empties its memory.
    Reset(ResetArgs),
}

#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The bank the workers serve (its version names the memory).
    #[arg(long)]
    pub bank: PathBuf,
    /// NATS server URL (credentials may be given in it; they are never printed).
    #[arg(long, env = "OODGATE_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// output.prefix of the workers.
    #[arg(long, default_value = "oodgate")]
    pub prefix: String,
    /// Prefix of reply subjects.
    #[arg(long, default_value = "_INBOX")]
    pub inbox_prefix: String,
    /// CA certificate (PEM) to verify a TLS server with.
    #[arg(long, env = "OODGATE_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

pub fn run(c: AdaptiveCommand) -> anyhow::Result<ExitCode> {
    let AdaptiveCommand::Reset(a) = c;
    let bank = load_bank(&a.bank)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let epoch = rt.block_on(async {
        let mut opts = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .custom_inbox_prefix(&a.inbox_prefix);
        if let Some(ca) = &a.tls_ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        let client = with_url_credentials(opts, std::slice::from_ref(&a.nats))
            .connect(a.nats.as_str())
            .await
            .with_context(|| format!("connecting to {}", redact_url(&a.nats)))?;
        let js = async_nats::jetstream::new(client);
        anyhow::Ok(adaptive_sync::reset(&js, &a.prefix, bank.version()).await?)
    })?;
    println!(
        "adaptive memory of bank {} reset (epoch {epoch})",
        bank.version()
    );
    Ok(ExitCode::SUCCESS)
}
