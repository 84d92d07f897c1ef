//! `oodgate summary`: what the filter routed — counts per decision and a few examples with
//! their top label and nearest outlier words, read from the output stream.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct SummaryArgs {
    #[arg(long, env = "OODGATE_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The output stream holding the ID, OOD and DLQ subjects.
    #[arg(long, default_value = "OODGATE_OUT")]
    pub stream: String,
    /// Examples shown per decision.
    #[arg(long, default_value_t = 3)]
    pub examples: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SummaryArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(summary(a))
}

async fn summary(a: SummaryArgs) -> anyhow::Result<ExitCode> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(a.nats.as_str())
        .await
        .with_context(|| format!("connecting to {}", a.nats))?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(&a.stream)
        .await
        .with_context(|| format!("output stream {}", a.stream))?;
    let state = stream.info().await?.state.clone();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut examples: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    if state.messages > 0 {
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
            let decision = if h("Oodgate-Error-Kind").is_empty() {
                h("Oodgate-Decision")
            } else {
                "dlq".to_string()
            };
            *counts.entry(decision.clone()).or_default() += 1;
            let ex = examples.entry(decision).or_default();
            if ex.len() < a.examples {
                ex.push(serde_json::json!({
                    "input": h("Oodgate-Input"), "source": h("Oodgate-Source"), "score": h("Oodgate-Score"),
                    "top_label": h("Oodgate-Top-Label"), "nearest_outliers": h("Oodgate-Nearest-Outliers"),
                    "error": h("Oodgate-Error"),
                }));
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "counts": counts, "examples": examples })
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    println!(
        "routed: {} ID, {} OOD, {} DLQ ({} total)",
        get("id"),
        get("ood"),
        get("dlq"),
        counts.values().sum::<usize>()
    );
    for (decision, list) in &examples {
        for e in list {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
            if decision == "dlq" {
                println!("  dlq  {}  error: {}", s("input"), s("error"));
            } else {
                println!(
                    "  {decision:<4} {}  score {}  top label: {}  nearest outliers: {}",
                    s("input"),
                    s("score"),
                    s("top_label"),
                    s("nearest_outliers")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
