//! The `oodgate` command line: one clap parser, one subcommand per file under `cli/`.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    // serve configures logging from its settings (log.level / log.format).
    if !matches!(args.command, cli::Command::Serve(_)) {
        cli::logging::init(&args.log);
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
