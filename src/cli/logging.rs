//! Logging setup shared by every subcommand: text or JSON to stderr, level from flags or RUST_LOG.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log level or filter (e.g. "info", "debug,ort=warn"); RUST_LOG wins when set.
    #[arg(long, global = true, env = "OODGATE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, env = "OODGATE_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

pub fn init(args: &LogArgs) {
    init_with(&args.log_level, &args.log_format);
}

/// Installs the global subscriber (a second call is a no-op). ONNX Runtime's graph transformer
/// chatter and hnsw_rs's INFO line per index load and drop are kept at WARN unless asked for.
pub fn init_with(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},ort=warn,hnsw_rs=warn")))
        .unwrap_or_else(|_| EnvFilter::new("info,ort=warn,hnsw_rs=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
