//! `oodgate config reference` (every key, default and environment variable, as Markdown) and
//! `oodgate config show` (the effective, validated settings with secrets redacted).

use std::path::PathBuf;
use std::process::ExitCode;

use oodgate::config::Settings;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration reference as Markdown (generated from the typed settings).
    Reference,
    /// Print the effective settings (defaults < config/default.toml < --config < OODGATE__* env).
    Show {
        #[arg(long, env = "OODGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

pub fn run(c: ConfigCommand) -> anyhow::Result<ExitCode> {
    match c {
        ConfigCommand::Reference => print!("{}", Settings::reference_markdown()),
        ConfigCommand::Show { config } => {
            let s = Settings::load(config.as_deref())?;
            print!("{}", toml::to_string_pretty(&s)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
