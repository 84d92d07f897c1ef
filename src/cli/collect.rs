//! `oodgate collect --out DIR`: the end of the worker-pool path. Consumes the output stream
//! (and the shard manifests) with its own durable consumers, spools each output durably
//! before acking it, and writes a shard's id/ood tars, scores and error tables, exactly as
//! `filter` would, once every key of the shard's manifest has arrived.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use oodgate::shards::commit::Layout;
use oodgate::shards::distributed::{CollectError, Manifest, Spool, parse_output};

use super::common::nats::ClientArgs;

#[derive(Debug, clap::Args)]
pub struct CollectArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output folder: id/, ood/, scores/, errors/, _state/ and the spool (_spool/).
    #[arg(long)]
    pub out: PathBuf,
    /// The workers' output stream (output.stream).
    #[arg(long, default_value = "OODGATE_OUT")]
    pub output_stream: String,
    /// The ID subject (output.id_subject).
    #[arg(long, default_value = "oodgate.id")]
    pub id_subject: String,
    /// The OOD subject (output.ood_subject).
    #[arg(long, default_value = "oodgate.ood")]
    pub ood_subject: String,
    /// The dead-letter subject (output.dlq_subject).
    #[arg(long, default_value = "oodgate.dlq")]
    pub dlq_subject: String,
    /// The stream of shard manifests (`publish --shards-stream`).
    #[arg(long, default_value = "OODGATE_SHARDS")]
    pub shards_stream: String,
    /// The subject of shard manifests (`publish --shards-subject`).
    #[arg(long, default_value = "oodgate.shards")]
    pub shards_subject: String,
    /// Name of this collector's durable consumers (on both streams): a restarted collector
    /// carries on where it stopped.
    #[arg(long, default_value = "oodgate-collect")]
    pub durable: String,
    /// Exit once nothing has arrived for this long (e.g. "30s"); without it, run until
    /// interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_exit: Option<Duration>,
}

pub fn run(a: CollectArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(collect(a))
}

async fn durable(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    subject: Option<&str>,
) -> anyhow::Result<consumer::PullConsumer> {
    let s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("stream {stream} (start the workers, or publish, first)"))?;
    s.get_or_create_consumer(
        name,
        consumer::pull::Config {
            durable_name: Some(name.to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            filter_subject: subject.unwrap_or_default().to_string(),
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("consumer {name} on stream {stream}"))
}

async fn collect(a: CollectArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let spool = Spool::new(Layout::new(&a.out));
    let client = a.client.connect().await?;
    let js = jetstream::new(client.clone());
    let outputs = durable(&js, &a.output_stream, &a.durable, None).await?;
    let manifests = durable(
        &js,
        &a.shards_stream,
        &a.durable,
        Some(a.shards_subject.as_str()),
    )
    .await?;
    let mut outputs = outputs.messages().await?;
    let mut manifests = manifests.messages().await?;
    let (mut spooled, mut repeated, mut foreign, mut committed) = (0usize, 0usize, 0usize, 0usize);
    // Without --idle-exit: a century.
    let idle = a
        .idle_exit
        .unwrap_or(Duration::from_secs(100 * 365 * 86_400));
    // Commits a shard if it is complete; says so.
    let try_commit = |shard: &str, committed: &mut usize| -> anyhow::Result<()> {
        if let Some(c) = spool.try_commit(shard)? {
            *committed += 1;
            eprintln!(
                "{shard}: committed: {} read, {} id, {} ood, {} errors",
                c.read, c.id, c.ood, c.errors
            );
            tracing::info!(
                shard,
                read = c.read,
                id = c.id,
                ood = c.ood,
                errors = c.errors,
                "shard committed"
            );
        }
        Ok(())
    };
    loop {
        tokio::select! {
            m = outputs.next() => {
                let Some(m) = m else { break };
                let m = m.map_err(|e| anyhow::anyhow!("reading {}: {e}", a.output_stream))?;
                let subject = m.subject.as_str();
                let decision = if subject == a.id_subject {
                    "id"
                } else if subject == a.ood_subject {
                    "ood"
                } else if subject == a.dlq_subject {
                    "dlq"
                } else {
                    ""
                };
                let get = |k: &str| {
                    m.headers
                        .as_ref()
                        .and_then(|h| h.get(k))
                        .map(|v| v.as_str().to_string())
                };
                match (decision, parse_output(get, decision, &m.payload)) {
                    ("", _) | (_, Err(CollectError::Foreign(_))) => foreign += 1,
                    (_, Err(e)) => {
                        // Cannot be written: left unacked would come back forever; it is
                        // terminated and reported, and the shard stays pending.
                        eprintln!("WARNING: {e}");
                        tracing::error!(error = %e, "output not collectable");
                        m.ack_with(AckKind::Term).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                        continue;
                    }
                    (_, Ok((shard, rec))) => {
                        if spool.committed(&shard) || !spool.put(&shard, &rec)? {
                            repeated += 1;
                        } else {
                            spooled += 1;
                        }
                        // Acked only once the record is on disk (write_atomic syncs it).
                        m.double_ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
                        try_commit(&shard, &mut committed)?;
                        continue;
                    }
                }
                m.ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
            }
            m = manifests.next() => {
                let Some(m) = m else { break };
                let m = m.map_err(|e| anyhow::anyhow!("reading {}: {e}", a.shards_stream))?;
                match serde_json::from_slice::<Manifest>(&m.payload) {
                    Ok(man) => {
                        if !spool.committed(&man.shard) {
                            spool.put_manifest(&man)?;
                        }
                        m.double_ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
                        try_commit(&man.shard, &mut committed)?;
                    }
                    Err(e) => {
                        eprintln!("WARNING: a manifest that does not parse: {e}");
                        m.ack_with(AckKind::Term).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                }
            }
            _ = tokio::time::sleep(idle) => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let pending = spool.pending();
    eprintln!(
        "collected: {committed} shards committed, {spooled} outputs spooled, {repeated} repeated, \
         {foreign} not from `publish --shards`; {} shards pending",
        pending.len()
    );
    for (shard, have, want) in &pending {
        match want {
            Some(w) => eprintln!("pending: {shard}: {have} of {w} samples"),
            None => eprintln!("pending: {shard}: {have} samples, manifest not yet received"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
