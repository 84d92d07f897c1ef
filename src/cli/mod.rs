//! Subcommands. Only this module knows about terminals, progress bars and exit codes.

pub mod common;
pub mod debug;
pub mod embed;
pub mod info;
pub mod logging;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Filter image streams for out-of-distribution content with CLIP and Outlier Label Exposure.
#[derive(Debug, Parser)]
#[command(name = "oodgate", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub log: logging::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Versions, ONNX Runtime library, active execution provider and model summary.
    Info(info::InfoArgs),
    /// Inspect the tokenizer and the preprocessing.
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Embed image files/folders or texts into an [N, D] float32 .npy.
    Embed(embed::EmbedArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Debug(c) => debug::run(c),
        Command::Embed(a) => embed::run(a),
    }
}
