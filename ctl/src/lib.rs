//! drctl: the operator's client of the YesLocker DR control plane.
//!
//! The binary (`main.rs`) only parses arguments and maps errors to exit codes; everything
//! else lives here so tests (and `drctl demo`, which drives a cluster through the same
//! code an operator uses) can call it directly.
//!
//! Exit codes (stable, scripts rely on them): 0 ok, 1 the operation failed, 2 usage or
//! configuration error, 3 cannot reach or authenticate to any coordinator.

use std::collections::HashMap;

pub mod cli;
pub mod client;
pub mod cmd;
pub mod config;
pub mod output;

pub use cli::Cli;

/// Runs one drctl invocation. `env` is the process environment, passed in so that nothing
/// below reads it behind the caller's back.
pub async fn run(cli: Cli, env: HashMap<String, String>) -> anyhow::Result<()> {
    cmd::dispatch(cli, &env).await
}

/// The exit code for an error returned by [`run`] (see the crate docs).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<client::ClientError>() {
            return e.exit_code();
        }
        if cause.downcast_ref::<config::ConfigError>().is_some() {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<cmd::cert::CertError>() {
            return e.exit_code();
        }
        if cause.downcast_ref::<cmd::UsageError>().is_some() {
            return 2;
        }
    }
    1
}
