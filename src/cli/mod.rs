//! Subcommands. Only this module knows about terminals, progress bars and exit codes.

pub mod adaptive;
pub mod bank;
pub mod bench;
pub mod calibrate;
pub mod collect;
pub mod common;
pub mod config;
pub mod debug;
pub mod embed;
pub mod eval;
pub mod filter;
pub mod info;
pub mod logging;
pub mod model;
pub mod publish;
pub mod score;
pub mod serve;
pub mod summary;

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
    /// Run the filter: JetStream in, ID/OOD/DLQ subjects out.
    Serve(serve::ServeArgs),
    /// Push image files/folders into the input stream (Object Store above a size limit).
    Publish(publish::PublishArgs),
    /// Build, import and inspect label banks (.oodb).
    #[command(subcommand)]
    Bank(bank::BankCommand),
    /// Score images or embeddings against a bank: one JSON line per input.
    Score(score::ScoreArgs),
    /// AUROC, FPR95 and AUPR of several methods on ID vs OOD sets.
    Eval(eval::EvalArgs),
    /// Filter webdataset/parquet shards: id/ and ood/ shards plus scores and error tables.
    Filter(filter::FilterArgs),
    /// Write the workers' outputs of `publish --shards` as filtered shards and tables.
    Collect(collect::CollectArgs),
    /// Calibrate a decision threshold on held-out ID inputs (optionally store it in the bank).
    Calibrate(calibrate::CalibrateArgs),
    /// Throughput of every stage and end to end through NATS, in one table.
    Bench(bench::BenchArgs),
    /// Counts per decision and examples from the output stream.
    Summary(summary::SummaryArgs),
    /// Configuration reference and effective settings.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// The adaptive detector's shared memory (reset).
    #[command(subcommand)]
    Adaptive(adaptive::AdaptiveCommand),
    /// Encoder variants: the fidelity gate (check).
    #[command(subcommand)]
    Model(model::ModelCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Debug(c) => debug::run(c),
        Command::Embed(a) => embed::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Publish(a) => publish::run(a),
        Command::Bank(c) => bank::run(c),
        Command::Score(a) => score::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Filter(a) => filter::run(a),
        Command::Collect(a) => collect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Summary(a) => summary::run(a),
        Command::Config(c) => config::run(c),
        Command::Adaptive(c) => adaptive::run(c),
        Command::Model(c) => model::run(c),
    }
}
