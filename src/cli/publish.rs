//! `oodgate publish --nats URL --subject S INPUT...`: pushes image files into the input stream;
//! files above a size limit go to the NATS Object Store and travel as a claim-check envelope.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, object_store, stream};
use oodgate::model::pipeline::collect_images;
use oodgate::stream::setup::{redact_url, with_url_credentials};
use sha2::{Digest, Sha256};

use super::common::progress;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
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
    /// Subject to publish to (must be captured by a stream).
    #[arg(long, default_value = "images.in")]
    pub subject: String,
    /// Create this stream (capturing --subject) when no stream captures the subject yet.
    #[arg(long, default_value = "IMAGES")]
    pub stream: String,
    /// Files larger than this go to the Object Store (claim check); 0 sends every file that way.
    #[arg(long, default_value_t = 900 * 1024)]
    pub object_store_above: usize,
    /// Object Store bucket for large files.
    #[arg(long, default_value = "oodgate-images")]
    pub bucket: String,
    /// Age after which the bucket expires objects, when this command creates the bucket
    /// (e.g. "7d"); unset: objects never expire. See `input.object_store_ttl`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub object_ttl: Option<Duration>,
    /// Set Nats-Msg-Id to the content's SHA-256, so the stream drops repeated images.
    #[arg(long)]
    pub dedup: bool,
    /// Image files or folders (recursive).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

pub fn run(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(publish(a))
}

async fn publish(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let files = collect_images(&a.inputs)?;
    if files.is_empty() {
        bail!("no image files found in the inputs");
    }
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .custom_inbox_prefix(&a.inbox_prefix);
    if let Some(ca) = &a.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        opts = opts.add_client_certificate(c.clone(), k.clone());
    }
    let client = with_url_credentials(opts, std::slice::from_ref(&a.nats))
        .connect(a.nats.as_str())
        .await
        .with_context(|| format!("connecting to {}", redact_url(&a.nats)))?;
    let js = jetstream::new(client.clone());
    // Make sure a stream captures the subject (the worker would create the same one).
    if js.stream_by_subject(&a.subject).await.is_err() {
        js.get_or_create_stream(stream::Config {
            name: a.stream.clone(),
            subjects: vec![a.subject.clone()],
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {} for {}", a.stream, a.subject))?;
    }
    let mut store: Option<object_store::ObjectStore> = None;
    let pb = progress(files.len(), "publishing");
    let (mut inline, mut claims, mut failed) = (0usize, 0usize, 0usize);
    let mut acks = Vec::new();
    for path in &files {
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipped {}: {e}", path.display());
                failed += 1;
                continue;
            }
        };
        let digest = hex::encode(Sha256::digest(&bytes));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Oodgate-Input", path.display().to_string().as_str());
        if a.dedup {
            headers.insert("Nats-Msg-Id", digest.as_str());
        }
        let payload: bytes::Bytes = if bytes.len() > a.object_store_above {
            if store.is_none() {
                store = Some(match js.get_object_store(&a.bucket).await {
                    Ok(s) => s,
                    Err(_) => js
                        .create_object_store(object_store::Config {
                            bucket: a.bucket.clone(),
                            max_age: a.object_ttl.unwrap_or_default(),
                            ..Default::default()
                        })
                        .await
                        .with_context(|| format!("creating object store bucket {}", a.bucket))?,
                });
            }
            let name = format!(
                "{digest}{}",
                path.extension()
                    .map(|e| format!(".{}", e.to_string_lossy()))
                    .unwrap_or_default()
            );
            // Object names are content hashes: an object already there is this file, and
            // putting it again would need the right to purge the chunks it replaces.
            let stored = match &store {
                Some(s) => s
                    .info(&name)
                    .await
                    .is_ok_and(|i| !i.deleted && i.size == bytes.len()),
                None => false,
            };
            if let (Some(s), false) = (&store, stored) {
                let mut reader = std::io::Cursor::new(bytes);
                s.put(name.as_str(), &mut tokio::io::BufReader::new(&mut reader))
                    .await
                    .with_context(|| {
                        format!("uploading {} to bucket {}", path.display(), a.bucket)
                    })?;
            }
            claims += 1;
            serde_json::to_vec(&serde_json::json!({
                "id": path.display().to_string(),
                "object": { "bucket": a.bucket, "name": name },
                "meta": { "path": path.display().to_string(), "sha256": digest },
            }))?
            .into()
        } else {
            inline += 1;
            bytes.into()
        };
        acks.push(
            js.publish_with_headers(a.subject.clone(), headers, payload)
                .await?,
        );
        // Bounded pipelining of publish acks.
        if acks.len() >= 256 {
            for ack in acks.drain(..) {
                ack.await.context("waiting for the publish ack")?;
            }
        }
        pb.inc(1);
    }
    for ack in acks {
        ack.await.context("waiting for the publish ack")?;
    }
    pb.finish_and_clear();
    client.flush().await?;
    eprintln!(
        "published {} images to {} ({inline} inline, {claims} via object store bucket {}){}",
        inline + claims,
        a.subject,
        a.bucket,
        if failed > 0 {
            format!(", {failed} unreadable")
        } else {
            String::new()
        }
    );
    Ok(if inline + claims > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
