//! The `rowcast` command: argument parsing and wiring only.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use rowcast::config::{self, Settings, SourceMode};
use rowcast::demo::{Demo, DemoArgs};
use rowcast::mapping::Mapping;
use rowcast::publisher::Publisher;
use rowcast::{log, setup};

#[derive(Parser)]
#[command(name = "rowcast", version, about = "Postgres change-data-capture event publisher")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture changes into the event log (runs `setup` first unless --no-setup).
    Serve(ServeArgs),
    /// Idempotently install the event log schema, the publication and replica identity.
    Setup(SourceArgs),
    /// Apply the reference six-table application schema (migrations/reference.sql).
    Migrate {
        /// The application database.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// The one-command tour: a throwaway Postgres from this machine's binaries
    /// (/usr/lib/postgresql/*/bin, or ROWCAST_PG_BIN), the reference schema, a simulated
    /// workload, and the page, WebSocket and history served live.
    Demo(DemoArgs),
}

#[derive(Args)]
struct SourceArgs {
    /// The database whose changes are captured (URL or key=value form).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Where the event log lives [default: the source database].
    #[arg(long, env = "ROWCAST_LOG_URL")]
    log_url: Option<String>,
    /// Capture source.
    #[arg(long, env = "ROWCAST_SOURCE", value_enum, default_value = "auto")]
    source: SourceMode,
    /// Mapping file (TOML) replacing the built-in one (config/mapping.toml).
    #[arg(long, env = "ROWCAST_MAPPING")]
    mapping: Option<PathBuf>,
    /// Replication slot name.
    #[arg(long, env = "ROWCAST_SLOT", default_value = "rowcast")]
    slot: String,
    /// Publication name.
    #[arg(long, env = "ROWCAST_PUBLICATION", default_value = "rowcast")]
    publication: String,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Events older than this are trimmed from the log (30s, 15m, 12h, 7d).
    #[arg(long, env = "ROWCAST_RETENTION", default_value = "7d", value_parser = config::parse_duration)]
    retention: Duration,
    /// Most events appended per log transaction; bounds memory for large transactions.
    #[arg(long, env = "ROWCAST_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Captured items buffered between capture and the log writer.
    #[arg(long, env = "ROWCAST_QUEUE_CAPACITY", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    queue_capacity: u32,
    /// How often the slot position is reported to the server when idle.
    #[arg(long, env = "ROWCAST_STATUS_INTERVAL", default_value = "10s", value_parser = config::parse_duration)]
    status_interval: Duration,
    /// Do not run `setup` before serving.
    #[arg(long, env = "ROWCAST_NO_SETUP")]
    no_setup: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // When stderr goes away (a closed pipe, a parent that died), logging must not panic
        // the task that logs: that could be the one handling SIGTERM.
        .log_internal_errors(false)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Setup(args) => {
            let settings = settings(&args).await?;
            setup::setup_replication(&settings).await?;
            println!(
                "rowcast setup done: log schema, publication {:?}, replica identity full",
                settings.publication
            );
            Ok(())
        }
        Command::Migrate { database_url } => {
            let client = log::connect(&parse_url(&database_url)?, "migrate").await?;
            setup::migrate(&client).await?;
            println!("reference schema applied");
            Ok(())
        }
        Command::Demo(args) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            let demo = Demo::start(&args).await?;
            println!("{}", demo.banner());
            demo.run(shutdown).await?;
            Ok(())
        }
    }
}

fn parse_url(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    // Never echo the URL: it may hold a password.
    tokio_postgres::Config::from_str(url).context("the database URL is not valid")
}

async fn settings(args: &SourceArgs) -> anyhow::Result<Settings> {
    config::check_object_name("slot", &args.slot).map_err(anyhow::Error::msg)?;
    config::check_object_name("publication", &args.publication).map_err(anyhow::Error::msg)?;
    let mut settings = Settings::new(parse_url(&args.database_url)?);
    if let Some(log_url) = &args.log_url {
        settings.log = parse_url(log_url)?;
    }
    if let Some(path) = &args.mapping {
        settings.mapping = Arc::new(Mapping::load(path)?);
    }
    settings.slot.clone_from(&args.slot);
    settings.publication.clone_from(&args.publication);
    settings.source = match args.source {
        SourceMode::Auto => {
            let client = log::connect(&settings.database, "probe").await?;
            let (mode, reason) = setup::choose_source(&client).await?;
            tracing::info!(source = ?mode, %reason, "capture source chosen");
            mode
        }
        mode => mode,
    };
    if settings.source == SourceMode::Triggers {
        bail!("trigger capture is not available yet; this server needs logical replication");
    }
    Ok(settings)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = settings(&args.source).await?;
    settings.retention = args.retention;
    settings.batch_size = args.batch_size as usize;
    settings.queue_capacity = args.queue_capacity as usize;
    settings.status_interval = args.status_interval;
    if !args.no_setup {
        setup::setup_replication(&settings).await?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(trim_log(settings.log.clone(), settings.retention, shutdown.clone()));
    Publisher::new(settings).run(shutdown).await?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else { return };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// How often retention is applied.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// Applies retention every `TRIM_INTERVAL`.
async fn trim_log(
    config: tokio_postgres::Config,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let client = log::connect(&config, "retention").await?;
            log::trim(&client, retention).await
        };
        match result.await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "trimmed event log"),
            Err(err) => tracing::warn!(error = %err, "trimming the event log failed"),
        }
    }
}
