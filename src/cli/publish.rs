//! `oodgate publish --nats URL --subject S INPUT...`: pushes image files into the input stream;
//! files above a size limit go to the NATS Object Store and travel as a claim-check envelope.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, object_store, stream};
use oodgate::model::pipeline::collect_images;
use sha2::{Digest, Sha256};

use super::common::nats::ClientArgs;
use super::common::progress;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub client: ClientArgs,
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
    /// The inputs are webdataset shards (.tar, .tar.gz, .tgz, or folders of them): each
    /// sample's image is published with its key, shard and sidecars in `Dataset-*` headers,
    /// then a manifest per shard to --shards-subject, for `oodgate collect`.
    #[arg(long)]
    pub shards: bool,
    /// With --shards: the subject of the per-shard manifests.
    #[arg(long, default_value = "oodgate.shards")]
    pub shards_subject: String,
    /// With --shards: the stream that keeps the manifests (created when missing).
    #[arg(long, default_value = "OODGATE_SHARDS")]
    pub shards_stream: String,
    /// With --shards: where the per-shard markers go (a shard whose marker matches its file
    /// is not sent again).
    #[arg(long, default_value = ".oodgate-publish")]
    pub state: PathBuf,
    /// Image files or folders (recursive); with --shards, shards or folders of them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

/// Makes sure a stream captures `subject`: the one there, else a new stream `name` (the
/// worker would create the same one for the input).
async fn ensure_stream(js: &jetstream::Context, name: &str, subject: &str) -> anyhow::Result<()> {
    if js.stream_by_subject(subject).await.is_err() {
        js.get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name} for {subject}"))?;
    }
    Ok(())
}

pub fn run(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(publish(a))
}

async fn publish(a: PublishArgs) -> anyhow::Result<ExitCode> {
    if a.shards {
        return publish_shards(a).await;
    }
    let files = collect_images(&a.inputs)?;
    if files.is_empty() {
        bail!("no image files found in the inputs");
    }
    let client = a.client.connect().await?;
    let js = jetstream::new(client.clone());
    ensure_stream(&js, &a.stream, &a.subject).await?;
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

/// What the shard reader thread sends.
enum Read {
    Sample(oodgate::shards::webdataset::Sample),
    End(Option<String>),
    Failed(String),
}

/// `publish --shards`: every sample of every shard not published before, then the shard's
/// manifest; the shard's marker is written once all of them are acknowledged.
async fn publish_shards(a: PublishArgs) -> anyhow::Result<ExitCode> {
    use oodgate::shards::commit::{InputStamp, write_atomic};
    use oodgate::shards::distributed::{
        H_SHARD, Manifest, key_digest, message_id, publish_error, sample_headers,
    };
    use oodgate::shards::{Format, discover};

    let shards = discover(&a.inputs).context("finding shards")?;
    if let Some(p) = shards.iter().find(|s| s.format == Format::Parquet) {
        bail!(
            "{}: publish --shards takes webdataset tars and folders; filter parquet shards with `oodgate filter`",
            p.path.display()
        );
    }
    if shards.is_empty() {
        bail!("no shards (.tar, .tar.gz, .tgz) found in the inputs");
    }
    let client = a.client.connect().await?;
    let js = jetstream::new(client.clone());
    ensure_stream(&js, &a.stream, &a.subject).await?;
    ensure_stream(&js, &a.shards_stream, &a.shards_subject).await?;
    // Headers and payload share the server's message limit.
    let max_payload = client.server_info().max_payload;
    let (mut sent, mut skipped, mut errors) = (0usize, 0usize, 0usize);
    for shard in &shards {
        let stamp = InputStamp::of(&shard.path)
            .with_context(|| format!("reading {}", shard.path.display()))?;
        let marker = a.state.join(format!("{}.json", shard.rel));
        let done = std::fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<InputStamp>(&b).ok())
            .is_some_and(|m| m == stamp);
        if done {
            eprintln!("{}: published already, skipped", shard.rel);
            skipped += 1;
            continue;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Read>(64);
        let path = shard.path.clone();
        let folder = shard.format == Format::Folder;
        let reader = std::thread::spawn(move || {
            let each = |s| {
                if tx.blocking_send(Read::Sample(s)).is_err() {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            };
            let r = if folder {
                oodgate::shards::folder::read_samples(&path, each).map_err(|e| e.to_string())
            } else {
                oodgate::shards::webdataset::read_samples(&path, each).map_err(|e| e.to_string())
            };
            let _ = tx.blocking_send(match r {
                Ok(rep) => Read::End(rep.truncated),
                Err(e) => Read::Failed(e),
            });
        });
        let mut keys = Vec::new();
        let mut errs = Vec::new();
        let mut read = 0u64;
        let mut acks = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                Read::Sample(sample) => {
                    read += 1;
                    if let Some(e) = publish_error(shard, &sample) {
                        errs.push(e);
                        continue;
                    }
                    let Some((headers, payload)) = sample_headers(shard, &sample) else {
                        continue;
                    };
                    let size: usize = payload.len()
                        + headers
                            .iter()
                            .map(|(k, v)| k.len() + v.len() + 4)
                            .sum::<usize>();
                    if size + 1024 > max_payload {
                        errs.push(oodgate::shards::tables::ErrorRow {
                            key: Some(sample.key.clone()),
                            shard: shard.rel.clone(),
                            member: sample.image().map(|m| m.name.clone()),
                            row: None,
                            stage: oodgate::shards::tables::Stage::Read,
                            kind: oodgate::shards::tables::ErrorKind::Oversize,
                            message: format!(
                                "the sample is {size} bytes with its headers, above the server's max_payload of {max_payload}; filter this shard with `oodgate filter`"
                            ),
                            bytes: Some(payload.len() as u64),
                        });
                        continue;
                    }
                    let mut h = async_nats::HeaderMap::new();
                    for (k, v) in &headers {
                        h.insert(k.as_str(), v.as_str());
                    }
                    h.insert("Nats-Msg-Id", message_id(&shard.rel, &sample.key).as_str());
                    acks.push(
                        js.publish_with_headers(a.subject.clone(), h, payload.into())
                            .await?,
                    );
                    keys.push(sample.key);
                    if acks.len() >= 256 {
                        for ack in acks.drain(..) {
                            ack.await.context("waiting for the publish ack")?;
                        }
                    }
                }
                Read::End(truncated) => {
                    if let Some(why) = truncated {
                        errs.push(oodgate::shards::tables::ErrorRow::truncated_shard(
                            &shard.rel, why,
                        ));
                    }
                }
                Read::Failed(why) => bail!("{}: {why}", shard.rel),
            }
        }
        let _ = reader.join();
        for ack in acks {
            ack.await.context("waiting for the publish ack")?;
        }
        errors += errs.len();
        let manifest = Manifest {
            shard: shard.rel.clone(),
            format: shard.format,
            key_digest: key_digest(&keys),
            keys,
            read,
            errors: errs,
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(H_SHARD, shard.rel.as_str());
        h.insert(
            "Nats-Msg-Id",
            format!("manifest:{}:{}", shard.rel, manifest.key_digest).as_str(),
        );
        js.publish_with_headers(
            a.shards_subject.clone(),
            h,
            serde_json::to_vec(&manifest)?.into(),
        )
        .await?
        .await
        .context("waiting for the manifest's publish ack")?;
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(&marker, &serde_json::to_vec_pretty(&stamp)?)
            .with_context(|| format!("writing {}", marker.display()))?;
        sent += manifest.keys.len();
        eprintln!(
            "{}: {} samples published, {} not publishable (in the manifest's errors)",
            shard.rel,
            manifest.keys.len(),
            manifest.errors.len()
        );
    }
    client.flush().await?;
    eprintln!(
        "published {sent} samples from {} shards ({skipped} skipped as published), {errors} error rows",
        shards.len() - skipped
    );
    Ok(ExitCode::SUCCESS)
}
