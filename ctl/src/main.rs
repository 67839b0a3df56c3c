//! `drctl` entry point: parse, set up logging, run, map the error to an exit code.
//!
//! Errors are printed once, here, as `error: <message>: <cause>` so every command reports
//! failures the same way (see `lib.rs` for the exit codes).

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = drctl::Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DRCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(drctl::run(cli, env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(drctl::exit_code(&e))
        }
    }
}
