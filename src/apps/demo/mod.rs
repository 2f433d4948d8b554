//! `rowcast demo`: the one-command tour.
//!
//! ```text
//! throwaway cluster (cluster.rs) -- database rowcast_demo, reference schema, seed rows
//!      ^ simulated workload (workload.rs, world.rs)
//!      |
//!      +--(slot)--> server::run: capture, log, bus, page, WebSocket, history
//! ```
//!
//! The slot is created before the first row is written, so every change the demo makes is
//! captured, the seed rows included, and the publisher never waits for the workload's
//! transactions to create it. Stopping (the `shutdown` token) stops the workload, then the
//! server, then removes the cluster.

mod flavor;
mod workload;
mod world;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::apps::cluster::{Cluster, ClusterError};
use crate::config::{Settings, SourceMode};

use crate::server::{self, ServeError};
use crate::setup::{self, SetupError};

use workload::Workload;

/// The database the demo creates in its cluster.
pub const DATABASE: &str = "rowcast_demo";

/// The demo keeps an hour of events, so a demo left running all day keeps a small log too.
pub const RETENTION: Duration = Duration::from_secs(3600);

const SEED_SQL: &str = include_str!("seed.sql");

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address of the page, the WebSocket and the HTTP API; loopback only (the demo has no
    /// authentication).
    #[arg(long, env = "ROWCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Changes per second the simulated workload makes (0: none, make your own with psql).
    #[arg(long, env = "ROWCAST_DEMO_RATE", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub rate: u32,
    /// Seed of the simulated workload, to repeat its choices [default: random].
    #[arg(long, env = "ROWCAST_DEMO_SEED")]
    pub seed: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "the demo has no authentication, so it listens on loopback addresses only (127.0.0.1, ::1), not {0}"
    )]
    NotLoopback(SocketAddr),
    #[error(
        "cannot listen on {address}: {source}; is another rowcast running? choose another address with --listen"
    )]
    Listen { address: SocketAddr, source: std::io::Error },
    #[error("throwaway Postgres: {0}")]
    Cluster(#[from] ClusterError),
    #[error("demo database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// A demo ready to serve: its cluster runs, its database is set up and seeded, and its
/// address is bound.
pub struct Demo {
    cluster: Cluster,
    settings: Settings,
    listener: TcpListener,
    address: SocketAddr,
    rate: u32,
    seed: u64,
}

impl Demo {
    /// Binds the address, starts the cluster and prepares the database. Dropping the result
    /// removes the cluster.
    pub async fn start(args: &DemoArgs) -> Result<Demo, DemoError> {
        if !args.listen.ip().is_loopback() {
            return Err(DemoError::NotLoopback(args.listen));
        }
        // Bind first: a taken port should fail in a moment, not after starting Postgres.
        let listen_error = |source| DemoError::Listen { address: args.listen, source };
        let listener = TcpListener::bind(args.listen).await.map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;

        let cluster =
            tokio::task::spawn_blocking(|| Cluster::start(&[])).await.map_err(|err| {
                ClusterError::Io {
                    action: "starting the cluster".into(),
                    source: std::io::Error::other(err),
                }
            })??;
        tracing::info!(port = cluster.port(), dir = %cluster.dir().display(), "throwaway postgres started");

        let admin = crate::pg::connect(&config(&cluster.url("postgres"))?, "demo admin").await?;
        admin.batch_execute(&format!("CREATE DATABASE {DATABASE}")).await?;
        drop(admin);
        let database = config(&cluster.url(DATABASE))?;
        let client = crate::pg::connect(&database, "demo setup").await?;
        setup::migrate(&client).await?;

        let mut settings = Settings::new(database.clone());
        settings.source = SourceMode::Replication;
        settings.retention = RETENTION;
        settings.server.listen = address;
        setup::setup_replication(&settings).await?;
        client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&settings.slot])
            .await?;
        client.batch_execute(SEED_SQL).await?;

        let seed = args.seed.unwrap_or_else(|| rand::random_range(1..100_000));
        Ok(Demo { cluster, settings, listener, address, rate: args.rate, seed })
    }

    /// The address the page, the WebSocket and the HTTP API are served on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The demo database, for psql and friends.
    pub fn database_url(&self) -> String {
        self.cluster.url(DATABASE)
    }

    /// The cluster's directory; removed when the demo ends.
    pub fn cluster_dir(&self) -> &Path {
        self.cluster.dir()
    }

    /// What to open and run, for the terminal.
    pub fn banner(&self) -> String {
        let address = self.address;
        let workload = match self.rate {
            0 => "off (--rate 0): make your own changes with psql".to_owned(),
            rate => format!("{rate} changes/s, seed {} (--rate, --seed)", self.seed),
        };
        format!(
            "rowcast demo: a throwaway Postgres, a simulated workload, every change captured live.\n\
             \n\
             \x20 page       http://{address}/\n\
             \x20 websocket  ws://{address}/ws/events\n\
             \x20 history    http://{address}/api/events?limit=10\n\
             \x20 tail       rowcast tail --url ws://{address} --type 'agent.*'\n\
             \x20 psql       psql {database}\n\
             \x20 cluster    {dir}\n\
             \x20 workload   {workload}\n\
             \n\
             Ctrl-C stops the demo and removes the cluster.",
            database = self.database_url(),
            dir = self.cluster.dir().display(),
        )
    }

    /// Runs the workload and the server until `shutdown`, then removes the cluster.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DemoError> {
        let Demo { cluster, settings, listener, rate, seed, .. } = self;
        let workload = (rate > 0).then(|| {
            let workload = Workload::new(settings.database.clone(), rate, seed);
            tokio::spawn(workload.run(shutdown.clone()))
        });
        let served = server::run(settings, listener, shutdown.clone()).await;
        // The server may also end on its own, with an error: the workload goes with it.
        shutdown.cancel();
        if let Some(workload) = workload
            && let Err(err) = workload.await
        {
            tracing::warn!(error = %err, "demo workload ended abnormally");
        }
        // Stopping Postgres waits for its processes: not on a runtime thread.
        if tokio::task::spawn_blocking(move || drop(cluster)).await.is_err() {
            tracing::warn!("removing the throwaway cluster failed");
        }
        served?;
        Ok(())
    }
}

fn config(url: &str) -> Result<crate::pg::Target, tokio_postgres::Error> {
    Ok(crate::pg::Target::new(url.parse()?))
}
