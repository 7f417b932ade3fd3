//! The `tollgate` binary: one executable for every role and every operator command.

mod bench;
mod cli;
mod dlq;
mod manage;
mod output;
mod serve;
mod usage;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{BenchCommand, Cli, Command};
use serve::Roles;
use tollgate_shared::connect;

/// glibc's per-thread arenas fragment under the validator's allocation pattern (RSS grew to ~140 MB at 45k
/// verifies/s with 2000 keys; ~17 MB with one arena). mimalloc keeps it compact and is at least as fast.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        // PostgreSQL's notices ("relation … already exists, skipping" at every start) are not news.
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only (a log collector would keep the escape codes around every level and field),
        // and not even there with NO_COLOR set, as the subscriber's own default has it.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { servers, namespace, json, command } = cli;
    match command {
        Command::Migrate => {
            let pool = connect::postgres_migrated(&servers.database_url, 1).await?;
            let newer = connect::newer_migrations(&pool).await?;
            if newer.is_empty() {
                eprintln!("database {} is up to date", servers.database_url);
            } else {
                eprintln!(
                    "database {} has every migration of this release, and {} of a newer release, which this one runs \
                     on but does not know: {}",
                    servers.database_url,
                    newer.len(),
                    newer.join(", ")
                );
            }
            Ok(())
        }
        Command::Up(up) => {
            let roles = Roles { validator: Some(up.validator), worker: Some(up.worker), demo: up.demo };
            serve::serve(&servers, &namespace, &up.metrics, roles).await
        }
        Command::Validator { validator, metrics } => {
            let roles = Roles { validator: Some(validator), worker: None, demo: false };
            serve::serve(&servers, &namespace, &metrics, roles).await
        }
        Command::Worker { worker, metrics } => {
            let roles = Roles { validator: None, worker: Some(worker), demo: false };
            serve::serve(&servers, &namespace, &metrics, roles).await
        }
        Command::Org(command) => manage::org(&connect::postgres(&servers.database_url, 2).await?, json, command).await,
        Command::Key(command) => manage::key(&connect::postgres(&servers.database_url, 2).await?, json, command).await,
        Command::Tier(command) => {
            manage::tier(&connect::postgres(&servers.database_url, 2).await?, json, command).await
        }
        Command::Bench(BenchCommand::Verify(args)) => bench::verify::run(&servers, args, json).await,
        Command::Bench(BenchCommand::TrivialServer { listen, connections }) => {
            bench::trivial_server(listen, connections).await
        }
        Command::Usage(command) => {
            let pool = connect::postgres(&servers.database_url, 2).await?;
            let quota = match connect::redis(&servers.redis_url).await {
                Ok(redis) => Some(tollgate_worker::QuotaCounters::new(redis, namespace.redis_prefix.clone())),
                Err(e @ connect::ConnectError::Unreachable { .. }) => {
                    eprintln!("warning: {e}");
                    None
                }
                Err(e) => return Err(e.into()),
            };
            usage::usage(&pool, quota, json, command).await
        }
        Command::Dlq(command) => {
            let nats = connect::nats(&servers.nats_url).await?;
            dlq::dlq(nats, &tollgate_shared::topology::Topology::new(&namespace), json, command).await
        }
        Command::Bench(BenchCommand::Pipeline(args)) => bench::pipeline::pipeline(&servers, json, args).await,
    }
}
