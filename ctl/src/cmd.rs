//! One module per command group; [`dispatch`] wires the parsed CLI to them.
//!
//! Commands that talk to coordinators get a [`Client`] built from flags, environment and
//! config file (see `config.rs`); `cert` and `demo` need none up front.

use std::collections::HashMap;

use crate::cli::{Cli, Command};
use crate::client::Client;
use crate::config;

pub mod agents;
pub mod approvals;
pub mod approve;
pub mod audit;
pub mod backup;
pub mod cert;
pub mod cluster;
pub mod commands;
pub mod demo;
pub mod drill;
pub mod failover;
pub mod incident;
pub mod isolate;
pub mod operations;
pub mod restore;
pub mod rotate;
pub mod run;
pub mod security;
pub mod status;
pub mod topology;

/// An invocation that cannot work as written (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub async fn dispatch(cli: Cli, env: &HashMap<String, String>) -> anyhow::Result<()> {
    let format = cli.conn.output;
    let connect = || -> anyhow::Result<Client> {
        let cfg = config::resolve(&cli.conn, cli.timeout, env)?;
        Ok(Client::new(cfg)?)
    };
    match cli.command {
        Command::Cert(c) => cert::run(c, format),
        Command::Demo(args) => demo::run(args).await,
        Command::Whoami => status::whoami(&connect()?, format).await,
        Command::Status { linearizable } => status::status(&connect()?, linearizable, format).await,
        Command::Cluster(c) => cluster::run(&connect()?, c, format).await,
        Command::Agents(c) => agents::run(&connect()?, c, format).await,
        Command::Run(args) => run::run(&connect()?, args, format).await,
        Command::Backup(c) => backup::run(&connect()?, c, format).await,
        Command::Apply(a) => topology::apply(&connect()?, a, format).await,
        Command::Topology(c) => topology::run(&connect()?, c, format).await,
        Command::Failover(a) => failover::run(&connect()?, a, format).await,
        Command::Operations(c) => operations::run(&connect()?, c, format).await,
        Command::Restore(a) => restore::run(&connect()?, a, format).await,
        Command::Drill(c) => drill::run(&connect()?, c, format).await,
        Command::Incident(c) => incident::run(&connect()?, c, format).await,
        Command::Approve(a) => approve::run(&connect()?, a, format).await,
        Command::Approvals(c) => approvals::run(&connect()?, c, format).await,
        Command::Audit(c) => audit::run(&connect()?, c, format).await,
        Command::Commands(c) => commands::run(&connect()?, c, format).await,
        Command::Cancel { key, reason } => commands::cancel(&connect()?, key, reason, format).await,
        Command::Isolate(a) => isolate::isolate(&connect()?, a, format).await,
        Command::Unisolate(a) => isolate::unisolate(&connect()?, a, format).await,
        Command::RotateCredentials(a) => rotate::run(&connect()?, a, format).await,
        Command::Security(c) => security::run(&connect()?, c, format).await,
    }
}
