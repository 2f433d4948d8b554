//! The `rowcast` command: argument parsing and wiring only. Long because every flag of every
//! command is declared here with its documentation (what `--help` prints); no logic lives here.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use rowcast::apps::demo::{Demo, DemoArgs};
use rowcast::apps::emit::EmitArgs;
use rowcast::apps::tail::{Tail, TailArgs};
use rowcast::config::{self, NatsSettings, Role, Settings, SourceMode};
use rowcast::mapping::{Mapping, MappingError};
use rowcast::publisher::{Acceptance, Decision, PublisherError};
use rowcast::server::ServeError;
use rowcast::setup::SetupError;
use rowcast::{backoff, pg, server, setup};

#[derive(Parser)]
#[command(name = "rowcast", version, about = "Postgres change-data-capture event publisher")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the biggest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Capture changes into the event log and serve them over WebSocket and HTTP (runs `setup`
    /// first unless --no-setup).
    Serve(ServeArgs),
    /// Idempotently install the event log schema and the capture source: the publication and
    /// replica identity, or the outbox and capture triggers (--source triggers).
    Setup(SetupArgs),
    /// When capture stopped because continuity with the log cannot be proven (the slot was
    /// dropped or recreated, the database restored or replaced): record the gap in the log as a
    /// `rowcast.gap` event and let capture resume from where the slot stands now.
    AcceptGap(SourceArgs),
    /// Apply the reference six-table application schema (migrations/reference.sql).
    Migrate {
        /// The application database.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Print events of a running server as JSON lines, resuming by itself after disconnections.
    Tail(TailArgs),
    /// Publish one application event to a running server (POST /api/events) and print its id.
    Emit(EmitArgs),
    /// Mint a bearer token (JWT) from the server's --jwt-secret (HS256) or the private key of
    /// its --jwt-public-key (RS256/ES256), for services and scripts; prints it.
    Token(TokenArgs),
    /// The one-command tour: a throwaway Postgres from this machine's binaries
    /// (/usr/lib/postgresql/*/bin, or ROWCAST_PG_BIN), the reference schema, a simulated
    /// workload, and the page, WebSocket and history served live.
    Demo(DemoArgs),
}

#[derive(Args)]
struct TokenArgs {
    /// Organizations the token may see (and publish to): comma-separated, `*` for all.
    #[arg(long, value_delimiter = ',', required = true)]
    orgs: Vec<String>,
    /// Domains the token may see (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',')]
    domains: Option<Vec<String>>,
    /// May publish application events (POST /api/events).
    #[arg(long)]
    emit: bool,
    /// How long the token is valid (30d, 12h, 15m).
    #[arg(long, default_value = "30d", value_parser = config::parse_duration)]
    ttl: Duration,
    /// The token's subject (who holds it).
    #[arg(long, default_value = "rowcast-token")]
    sub: String,
    /// The server's HS256 secret.
    #[arg(long, env = "ROWCAST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A PEM private key (RSA: RS256, EC: ES256) whose public half the server has.
    #[arg(long, env = "ROWCAST_JWT_PRIVATE_KEY", conflicts_with = "jwt_secret")]
    jwt_private_key: Option<PathBuf>,
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
struct NatsArgs {
    /// NATS servers for --role publisher|gateway (comma-separated, e.g.
    /// nats://n1:4222,nats://n2:4222); the client fails over among them.
    #[arg(long, env = "ROWCAST_NATS_URL", value_delimiter = ',')]
    nats_url: Vec<String>,
    /// The JetStream stream (created when missing).
    #[arg(long, env = "ROWCAST_NATS_STREAM", default_value = "ROWCAST")]
    nats_stream: String,
    /// Subjects are PREFIX.<org>.<domain>.<entity>.<action>.
    #[arg(long, env = "ROWCAST_NATS_SUBJECT_PREFIX", default_value = "rowcast.events")]
    nats_subject_prefix: String,
    /// Copies of the stream the NATS cluster keeps, when rowcast creates it (3 on a
    /// three-server cluster survives one server's loss).
    #[arg(long, env = "ROWCAST_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    nats_replicas: u8,
    /// Messages older than this leave the stream (gateways read older events from the log).
    #[arg(long, env = "ROWCAST_NATS_MAX_AGE", default_value = "24h", value_parser = config::parse_duration)]
    nats_max_age: Duration,
    /// Bytes the stream may hold, oldest dropped first [default: unlimited].
    #[arg(long, env = "ROWCAST_NATS_MAX_BYTES")]
    nats_max_bytes: Option<u64>,
    /// How long the stream drops a republished event id (a publisher resuming after a crash).
    #[arg(long, env = "ROWCAST_NATS_DUPLICATE_WINDOW", default_value = "2m", value_parser = config::parse_duration)]
    nats_duplicate_window: Duration,
}

impl NatsArgs {
    /// The settings for `role`; checked for the roles that use them.
    fn settings(&self, role: Role) -> anyhow::Result<NatsSettings> {
        let settings = NatsSettings {
            urls: self
                .nats_url
                .iter()
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect(),
            stream: self.nats_stream.clone(),
            subject_prefix: self.nats_subject_prefix.clone(),
            replicas: usize::from(self.nats_replicas),
            max_age: self.nats_max_age,
            max_bytes: self.nats_max_bytes,
            duplicate_window: self.nats_duplicate_window,
            ..NatsSettings::default()
        };
        match role {
            Role::All if !settings.urls.is_empty() => {
                anyhow::bail!("--nats-url is for --role publisher or --role gateway")
            }
            Role::All => {}
            _ => settings.check().map_err(anyhow::Error::msg)?,
        }
        Ok(settings)
    }
}

#[derive(Args)]
struct SetupArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Remove the capture triggers and functions (and the outbox once it is empty) instead.
    #[arg(long)]
    uninstall_triggers: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// What this process does: `all` (capture and serve, with nothing but Postgres),
    /// `publisher` (capture, and publish every event to NATS JetStream; several may run, one
    /// captures) or `gateway` (serve WebSocket/HTTP clients from the stream; no capture).
    #[arg(long, env = "ROWCAST_ROLE", value_enum, default_value = "all")]
    role: Role,
    #[command(flatten)]
    nats: NatsArgs,
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
    /// Trigger capture: how often the outbox is checked when no notification arrives.
    #[arg(long, env = "ROWCAST_POLL_INTERVAL", default_value = "1s", value_parser = config::parse_duration)]
    poll_interval: Duration,
    /// Do not run `setup` before serving.
    #[arg(long, env = "ROWCAST_NO_SETUP")]
    no_setup: bool,
    /// Address of the HTTP/WebSocket server (`host:port`; a name like localhost:8080 is
    /// resolved).
    #[arg(long, env = "ROWCAST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Also serve the event log over the Postgres wire protocol on this address (`host:port`):
    /// `SELECT ... FROM events` and `COPY (SUBSCRIBE TO events ...) TO STDOUT` for any Postgres
    /// driver. Off by default.
    #[arg(long, env = "ROWCAST_PG_LISTEN")]
    pg_listen: Option<String>,
    /// PEM certificate chain for TLS on --pg-listen (with --pg-tls-key); without it, clients
    /// that ask for TLS are told no.
    #[arg(long, env = "ROWCAST_PG_TLS_CERT", requires = "pg_tls_key")]
    pg_tls_cert: Option<PathBuf>,
    /// PEM private key of --pg-tls-cert.
    #[arg(long, env = "ROWCAST_PG_TLS_KEY", requires = "pg_tls_cert")]
    pg_tls_key: Option<PathBuf>,
    /// Largest client WebSocket frame in bytes; bigger ones close the connection with 1009.
    #[arg(long, env = "ROWCAST_MAX_FRAME_BYTES", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(256..))]
    max_frame_bytes: u32,
    /// Largest application event accepted by POST /api/events (its data as JSON, in bytes).
    #[arg(long, env = "ROWCAST_MAX_EVENT_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(2..))]
    max_event_bytes: u32,
    /// Largest POST /api/events body in bytes; a bigger one is refused (413) unread.
    #[arg(long, env = "ROWCAST_MAX_REQUEST_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(1024..))]
    max_request_bytes: u32,
    /// Bytes queued for one WebSocket client; beyond them it catches up from the log instead.
    #[arg(long, env = "ROWCAST_OUTBOUND_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(1024..))]
    outbound_bytes: u32,
    /// A WebSocket client this far behind the newest event (by commit time) is closed (4008).
    #[arg(long, env = "ROWCAST_MAX_LAG", default_value = "5m", value_parser = config::parse_duration)]
    max_lag: Duration,
    /// A WebSocket client whose socket accepts nothing this long is closed (4008).
    #[arg(long, env = "ROWCAST_WRITE_TIMEOUT", default_value = "30s", value_parser = config::parse_duration)]
    write_timeout: Duration,
    /// How often quiet WebSocket connections are pinged.
    #[arg(long, env = "ROWCAST_PING_INTERVAL", default_value = "20s", value_parser = config::parse_duration)]
    ping_interval: Duration,
    /// A WebSocket client silent this long (pongs count) is disconnected.
    #[arg(long, env = "ROWCAST_IDLE_TIMEOUT", default_value = "60s", value_parser = config::parse_duration)]
    idle_timeout: Duration,
    /// Who may connect: `none` (loopback addresses only) or `jwt`.
    #[arg(long, env = "ROWCAST_AUTH", default_value = "none", value_parser = ["none", "jwt"])]
    auth: String,
    /// HS256 secret for --auth jwt.
    #[arg(long, env = "ROWCAST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// RS256 or ES256 public key (PEM file) for --auth jwt.
    #[arg(long, env = "ROWCAST_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// Browser origins allowed to open WebSockets (comma-separated); others get 403.
    #[arg(long, env = "ROWCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Option<Vec<String>>,
    /// Open WebSocket connections at most; more get 503.
    #[arg(long, env = "ROWCAST_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Client frames per second per connection; more get `rate_limited`, a flood 1008.
    #[arg(long, env = "ROWCAST_MESSAGE_RATE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    message_rate: u32,
    /// Client frames per connection allowed in a burst.
    #[arg(long, env = "ROWCAST_MESSAGE_BURST", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
    message_burst: u32,
    /// Time a client has to send its request headers.
    #[arg(long, env = "ROWCAST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    handshake_timeout: Duration,
    /// Subscriptions one WebSocket connection may hold.
    #[arg(long, env = "ROWCAST_MAX_SUBSCRIPTIONS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_subscriptions: u32,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_logging();
    match run(Cli::parse().command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error for a person: what failed, then each cause once, and no backtrace (these are
/// configuration and environment problems, not bugs; RUST_BACKTRACE is for bugs).
fn report(err: &anyhow::Error) {
    let mut said = err.to_string();
    eprintln!("error: {said}");
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        // tokio-postgres repeats itself ("log: db error", "db error", "FATAL: ...").
        if said.ends_with(&cause) {
            continue;
        }
        eprintln!("  because: {cause}");
        said = cause;
    }
}

fn init_logging() {
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    use tracing_subscriber::prelude::*;
    // Postgres NOTICEs (tokio-postgres logs them at info) are noise for an operator.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    // The WebSocket library traces whole messages, which carry `auth` tokens and row data:
    // those events are dropped whatever RUST_LOG says.
    // Keep the level hint: without it every `log` record of every dependency would be built
    // and dispatched before being dropped (it showed up at 5 % of a profile).
    let hint =
        tracing_subscriber::layer::Filter::<tracing_subscriber::Registry>::max_level_hint(&filter);
    let payloads = filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().contains("tungstenite"))
    })
    .with_max_level_hint(hint.unwrap_or(tracing::level_filters::LevelFilter::TRACE));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours for a terminal only: logs collected from a pipe stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // When stderr goes away (a closed pipe, a parent that died), logging must not panic
        // the task that logs: that could be the one handling SIGTERM.
        .log_internal_errors(false)
        .with_filter(filter.and(payloads));
    tracing_subscriber::registry().with(layer).init();
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Setup(args) => {
            if args.uninstall_triggers {
                let tables =
                    setup::uninstall_triggers(&parse_url(&args.source.database_url)?).await?;
                println!("rowcast capture triggers removed from {tables} tables");
                return Ok(());
            }
            let (settings, decision) = settings(&args.source).await?;
            prepare(&settings, &decision, args.source.mapping.is_none()).await?;
            match settings.source {
                SourceMode::Triggers => println!(
                    "rowcast setup done: log schema, outbox and capture triggers on {} tables",
                    settings.mapping.entities().len()
                ),
                _ => println!(
                    "rowcast setup done: log schema, publication {:?}, replica identity full",
                    settings.publication
                ),
            }
            Ok(())
        }
        Command::AcceptGap(args) => {
            let (settings, _) = settings(&args).await?;
            if settings.source == SourceMode::Triggers {
                println!(
                    "trigger capture keeps its outbox beside the log: there is no gap to accept"
                );
                return Ok(());
            }
            match rowcast::publisher::accept_gap(&settings).await? {
                Acceptance::Holds => {
                    println!("continuity holds for slot {:?}: nothing to accept", settings.slot)
                }
                Acceptance::Recorded { id, reason, from, to } => println!(
                    "recorded rowcast.gap as event {id} ({} to {}): {reason}\ncapture resumes from {}",
                    pg::format_lsn(from),
                    pg::format_lsn(to),
                    pg::format_lsn(to)
                ),
            }
            Ok(())
        }
        Command::Migrate { database_url } => {
            let client = pg::connect(&parse_url(&database_url)?, "migrate").await?;
            setup::migrate(&client).await?;
            println!("reference schema applied");
            Ok(())
        }
        Command::Tail(args) => {
            let tail = Tail::new(args)?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            tail.run(tokio::io::stdout(), shutdown).await?;
            // Not a return: the runtime would wait for a write stuck on a stalled stdout.
            std::process::exit(0)
        }
        Command::Emit(args) => {
            let id = rowcast::apps::emit::run(&args).await?;
            println!("{id}");
            Ok(())
        }
        Command::Token(args) => {
            println!("{}", token(&args)?);
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

/// A database URL or key=value string, `sslmode` and `sslrootcert` included.
/// `rowcast token`: the claims from the flags, signed with the secret or the private key.
fn token(args: &TokenArgs) -> anyhow::Result<String> {
    use rowcast::auth::{MintClaims, SigningKey, mint};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let claims = MintClaims {
        sub: args.sub.clone(),
        exp: now.saturating_add(args.ttl).as_secs(),
        orgs: args.orgs.clone(),
        domains: args.domains.clone(),
        emit: args.emit,
    };
    let pem;
    let key = match (&args.jwt_secret, &args.jwt_private_key) {
        (Some(secret), _) => SigningKey::Secret(secret),
        (None, Some(path)) => {
            pem = std::fs::read(path)
                .with_context(|| format!("reading --jwt-private-key {}", path.display()))?;
            SigningKey::PrivatePem(&pem)
        }
        (None, None) => {
            anyhow::bail!("give --jwt-secret (or ROWCAST_JWT_SECRET) or --jwt-private-key")
        }
    };
    Ok(mint(&claims, key)?)
}

fn parse_url(url: &str) -> anyhow::Result<pg::Target> {
    // Never echo the URL: it may hold a password.
    pg::Target::from_str(url).context("the database URL is not valid")
}

/// The settings of the source flags, with the capture source decided against what the log
/// recorded (see `publisher::decide`).
async fn settings(args: &SourceArgs) -> anyhow::Result<(Settings, Decision)> {
    let mut settings = source_settings(args)?;
    let what = format!(
        "{} and {}",
        pg::describe(&settings.database, "source"),
        pg::describe(&settings.log, "log")
    );
    let decision = backoff::patiently(&what, PublisherError::is_retryable, async || {
        rowcast::publisher::decide(&settings, args.source).await
    })
    .await
    .with_context(|| format!("choosing the capture source ({what})"))?;
    tracing::info!(source = decision.source.name(), reason = %decision.reason, "capture source chosen");
    settings.source = decision.source;
    settings.source_reason = Some(decision.reason.clone());
    Ok((settings, decision))
}

/// The settings of the source flags, without deciding anything (what a gateway needs: it
/// captures nothing, and may not even reach the source as a writer).
fn source_settings(args: &SourceArgs) -> anyhow::Result<Settings> {
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
    Ok(settings)
}

/// Makes the databases ready for the decided source: `setup`, or a switch from the recorded
/// source, and records the decision.
async fn prepare(
    settings: &Settings,
    decision: &Decision,
    builtin_mapping: bool,
) -> anyhow::Result<()> {
    if let Some(from) = decision.switch_from {
        let what = pg::describe(&settings.database, "source");
        let drained = backoff::patiently(&what, PublisherError::is_retryable, async || {
            rowcast::publisher::switch(settings, from).await
        })
        .await?;
        tracing::info!(drained, "the old capture source is drained and removed");
        return Ok(());
    }
    install(settings, builtin_mapping).await?;
    if !decision.recorded {
        rowcast::publisher::record(settings, decision).await?;
    }
    Ok(())
}

/// `setup` for the chosen source, waiting for the databases while they do not answer.
/// `builtin_mapping`: no `--mapping` was given, so a missing table most likely means the
/// database is not the reference schema.
async fn install(settings: &Settings, builtin_mapping: bool) -> anyhow::Result<()> {
    let what = pg::describe(&settings.database, "source");
    let installed =
        backoff::patiently(&what, SetupError::is_retryable, async || match settings.source {
            SourceMode::Triggers => setup::setup_triggers(settings).await,
            _ => setup::setup_replication(settings).await,
        })
        .await;
    match installed {
        Err(SetupError::Mapping(
            err @ (MappingError::MissingTable { .. } | MappingError::MissingColumn { .. }),
        )) if builtin_mapping => Err(anyhow::anyhow!(
            "{err}\nThe built-in mapping describes the reference schema (`rowcast migrate` creates it). \
             To capture your own tables, write a mapping (config/mapping.toml is the example) and \
             pass it with --mapping FILE."
        )),
        other => Ok(other.with_context(|| format!("setting up {what}"))?),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Flags first, then the port, then the databases: a mistake in a flag never waits for a
    // database, and a port in use never leaves a database half set up.
    let public_key = match &args.jwt_public_key {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading --jwt-public-key {}", path.display()))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| {
        format!("cannot listen on {} (choose another with --listen)", args.listen)
    })?;
    let listen = listener.local_addr()?;
    let auth = rowcast::auth::Auth::new(
        &args.auth,
        args.jwt_secret.as_deref(),
        public_key.as_deref(),
        listen,
    )?;
    let nats = args.nats.settings(args.role)?;
    let pg_tls = match (&args.pg_tls_cert, &args.pg_tls_key) {
        (Some(cert), Some(key)) => Some(rowcast::pgwire::tls::server_config(cert, key)?),
        _ => None,
    };
    let pg_listener = match &args.pg_listen {
        // A publisher's bus is not fed: its subscriptions would never see a live event.
        Some(_) if !args.role.serves_clients() => anyhow::bail!(
            "--pg-listen serves clients: give it to a gateway (or --role all), not a publisher"
        ),
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address).await.with_context(|| {
                format!("cannot listen on {address} (choose another with --pg-listen)")
            })?;
            auth.check_listen(listener.local_addr()?)?;
            Some(listener)
        }
        None => None,
    };
    // A gateway captures nothing: no source decision, no setup (the publishers do both).
    let (mut settings, decision) = match args.role {
        Role::Gateway => (source_settings(&args.source)?, None),
        _ => settings(&args.source).await.map(|(settings, decision)| (settings, Some(decision)))?,
    };
    settings.role = args.role;
    settings.nats = nats;
    settings.retention = args.retention;
    settings.batch_size = args.batch_size as usize;
    settings.queue_capacity = args.queue_capacity as usize;
    settings.status_interval = args.status_interval;
    let server = &mut settings.server;
    server.listen = listen;
    server.pg_listen = pg_listener.as_ref().and_then(|l| l.local_addr().ok());
    server.pg_tls = pg_tls;
    server.max_frame_bytes = args.max_frame_bytes as usize;
    server.max_event_bytes = args.max_event_bytes as usize;
    // A request can always carry one event of the largest size.
    server.max_request_bytes =
        (args.max_request_bytes as usize).max(server.max_event_bytes + (64 << 10));
    server.outbound_bytes = args.outbound_bytes as usize;
    server.max_lag = args.max_lag.max(Duration::from_secs(1));
    server.write_timeout = args.write_timeout.max(Duration::from_millis(100));
    server.ping_interval = args.ping_interval.max(Duration::from_secs(1));
    server.idle_timeout = args.idle_timeout.max(Duration::from_secs(1));
    server.max_subscriptions = args.max_subscriptions as usize;
    server.max_connections = args.max_connections as usize;
    server.message_rate = args.message_rate;
    server.message_burst = args.message_burst;
    server.handshake_timeout = args.handshake_timeout.max(Duration::from_secs(1));
    server.allowed_origins = args.allowed_origins.clone();
    server.auth = auth;
    settings.poll_interval = args.poll_interval.max(Duration::from_millis(10));
    if let Some(decision) = &decision
        && !args.no_setup
    {
        prepare(&settings, decision, args.source.mapping.is_none()).await?;
    } else if let Some(from) = decision.and_then(|d| d.switch_from) {
        anyhow::bail!(
            "the log is fed by {} capture; switching to {} runs setup: leave out --no-setup",
            from.name(),
            settings.source.name()
        );
    }
    let log = pg::describe(&settings.log, "log");
    let server = backoff::patiently(&log, ServeError::is_retryable, async || {
        server::Server::new(settings.clone()).await
    })
    .await
    .with_context(|| format!("opening the event log ({log})"))?;
    // Until here a signal simply ends the process: nothing is running that needs an orderly stop.
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let server = match pg_listener {
        Some(pg) => server.with_pg_listener(pg),
        None => server,
    };
    server.run(listener, shutdown).await?;
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
