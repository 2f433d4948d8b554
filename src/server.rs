//! The whole server: capture into the log, the bus, retention and the HTTP/WebSocket front,
//! wired together and shut down in order.
//!
//! What feeds the bus depends on the role (SPEC §10): the publisher itself (`all`), nothing
//! (`publisher`: its appends go to the NATS relay, and it serves no WebSocket or
//! Postgres-protocol clients), or the stream (`gateway`: no capture, no log writer).
//!
//! Shutdown (SPEC §9): the listeners stop accepting; the publisher finishes in-flight appends,
//! publishes them and acknowledges the slot (then the relay publishes what it has left); then
//! the bus closes every socket with 1001 after writing what was queued for it (a
//! Postgres-protocol `SUBSCRIBE` ends with FATAL 57P01).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::bus::Bus;
use crate::config::{Role, Settings};
use crate::http::AppState;
use crate::log::{self, LogError, Scopes};
use crate::metrics::{Metrics, Rate};
use crate::nats::{self, Gateway, NatsError, Relay};
use crate::pg::Pool;
use crate::publisher::{self, Publisher, PublisherError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Publisher(#[from] PublisherError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// Whether starting again later may succeed (a database that does not answer yet).
    pub fn is_retryable(&self) -> bool {
        match self {
            ServeError::Publisher(err) => err.is_retryable(),
            ServeError::Log(err) => err.is_retryable(),
            ServeError::Nats(err) => err.is_retryable(),
            ServeError::Io(_) => false,
        }
    }
}

/// Connections kept for history, catch-up and stats reads.
const READ_CONNECTIONS: usize = 4;
/// Connections reading the source database (slot lag, catalog facts, entity rows); the rows
/// endpoint's reads are bounded by their deadline, so two keep a slow one from holding up stats.
const SOURCE_CONNECTIONS: usize = 2;
/// How often retention is applied.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);
/// How often `events_per_second` is sampled.
const RATE_SAMPLE: Duration = Duration::from_secs(1);
/// The pause after a failed `accept` (out of file descriptors and the like).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How long a gateway waits to reach a `since` cursor a client brought from another gateway
/// (see `ServerSettings::cursor_ahead_wait`): gateways are milliseconds apart, a NATS failover
/// a few seconds.
const GATEWAY_CURSOR_AHEAD_WAIT: Duration = Duration::from_secs(5);
/// Log connections of a gateway's consumer (gap fills) and of a publisher's relay.
const NATS_LOG_CONNECTIONS: usize = 2;

/// A server ready to run: its state is observable before it starts.
pub struct Server {
    state: Arc<AppState>,
    feed: Feed,
    /// Where the Postgres-protocol endpoint listens, if it is on (`--pg-listen`).
    pg: Option<TcpListener>,
}

/// What feeds the log and the bus, by role. Built once per server: its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Feed {
    /// Capture into the log; with a relay, to the stream instead of the bus.
    Publisher(Publisher, Option<Relay>),
    /// The stream into the bus.
    Gateway(Gateway),
}

impl Server {
    /// Reads the log's head so the first subscribers get a correct `last_id`.
    pub async fn new(mut settings: Settings) -> Result<Self, ServeError> {
        if settings.role == Role::Gateway && settings.server.cursor_ahead_wait.is_zero() {
            settings.server.cursor_ahead_wait = GATEWAY_CURSOR_AHEAD_WAIT;
        }
        let log = Arc::new(Pool::new(settings.log.clone(), "log reader", READ_CONNECTIONS));
        let head = log::head(&*log.get().await.map_err(LogError::from)?).await?;
        let metrics = Arc::new(Metrics::default());
        let scopes = Arc::new(Scopes::default());
        let bus = Arc::new(Bus::new(head, metrics.clone()));
        let status = (settings.role != Role::All).then(Arc::<nats::Status>::default);
        let nats_log = || Pool::new(settings.log.clone(), "nats log reader", NATS_LOG_CONNECTIONS);
        let (feed, watch, appends) = match (settings.role, &status) {
            (Role::Gateway, Some(status)) => {
                let gateway = Gateway::new(
                    settings.nats.clone(),
                    bus.clone(),
                    nats_log(),
                    scopes.clone(),
                    status.clone(),
                );
                (Feed::Gateway(gateway), publisher::Watch::detached(), None)
            }
            (role, status) => {
                let (appends, inbox) = log::app::channel(settings.server.append_queue);
                let mut publisher = Publisher::new(settings.clone())
                    .with_scopes(scopes.clone())
                    .with_metrics(metrics.clone())
                    .with_inbox(inbox);
                let watch = publisher.watch();
                let relay = match status {
                    Some(status) if role == Role::Publisher => {
                        let (outlet, relay) = nats::relay(
                            settings.nats.clone(),
                            nats_log(),
                            watch.head.clone(),
                            status.clone(),
                        );
                        publisher = publisher.with_outlet(outlet);
                        Some(relay)
                    }
                    _ => {
                        publisher = publisher.with_bus(bus.clone());
                        None
                    }
                };
                (Feed::Publisher(publisher, relay), watch, Some(appends))
            }
        };
        let state = Arc::new(AppState {
            source: Pool::new(settings.database.clone(), "source reader", SOURCE_CONNECTIONS),
            schema: Default::default(),
            publisher: watch,
            sessions: TaskTracker::new(),
            rate: Rate::new(head),
            connections: Arc::new(tokio::sync::Semaphore::new(settings.server.max_connections)),
            metrics,
            scopes,
            bus,
            log,
            appends,
            nats: status,
            settings,
        });
        Ok(Self { state, feed, pg: None })
    }

    /// Also serves the Postgres-protocol endpoint (SPEC §11) on `listener`: for a role whose
    /// bus is fed (`Role::serves_clients`; `rowcast serve` refuses it on a publisher).
    pub fn with_pg_listener(mut self, listener: TcpListener) -> Self {
        self.pg = Some(listener);
        self
    }

    pub fn watch(&self) -> publisher::Watch {
        self.state.publisher.clone()
    }

    pub fn bus(&self) -> Arc<Bus> {
        self.state.bus.clone()
    }

    /// Serves on `listener` until `shutdown`, or until the publisher fails for good.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let state = self.state;
        let background = TaskTracker::new();
        background.spawn(load_scopes(state.clone()));
        // Gateways never write the log (theirs may be a read replica).
        if state.settings.role.captures() {
            background.spawn(trim_log(
                state.settings.log.clone(),
                state.settings.retention,
                shutdown.clone(),
            ));
        }
        background.spawn(sample_rate(state.clone(), shutdown.clone()));
        background.close();

        // A publisher's bus is not fed: it serves no WebSocket clients.
        let transports = if state.settings.role.serves_clients() {
            crate::ws::routes()
        } else {
            Default::default()
        };
        let app = crate::http::app(state.clone(), transports);
        let handshake_timeout = state.settings.server.handshake_timeout;
        let http = tokio::spawn(accept(listener, app, handshake_timeout, shutdown.clone()));
        tracing::info!(listen = %state.settings.server.listen, role = state.settings.role.name(), "serving");
        let pg = self.pg.map(|listener| {
            if let Ok(address) = listener.local_addr() {
                tracing::info!(pg_listen = %address, "serving the postgres protocol");
            }
            let context = crate::pgwire::context(&state);
            tokio::spawn(crate::pgwire::serve(listener, context, shutdown.clone()))
        });

        let published = feed(self.feed, &shutdown).await;
        // Whatever ended the publisher ends the server; what it appended is published.
        shutdown.cancel();
        state.bus.close();
        state.sessions.close();
        let limits = &state.settings.server;
        if let Some(pg) = pg {
            let _ = pg.await;
        }
        if tokio::time::timeout(limits.close_timeout * 3, state.sessions.wait()).await.is_err() {
            tracing::warn!("some websocket or postgres-protocol sessions did not close in time");
        }
        let served = match tokio::time::timeout(limits.close_timeout, http).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Ok(()),
        };
        background.wait().await;
        published?;
        served?;
        Ok(())
    }
}

/// Runs what feeds the log and the bus until `shutdown`, or until it fails for good.
async fn feed(feed: Feed, shutdown: &CancellationToken) -> Result<(), ServeError> {
    match feed {
        Feed::Publisher(publisher, None) => Ok(joined(spawn_publisher(publisher, shutdown).await)?),
        Feed::Publisher(publisher, Some(relay)) => {
            // The relay stops after the publisher, so it publishes the last appends too.
            let relay_stop = CancellationToken::new();
            let mut relaying = tokio::spawn(relay.run(relay_stop.clone()));
            let mut publishing = spawn_publisher(publisher, shutdown);
            let (published, relayed) = tokio::select! {
                published = &mut publishing => {
                    relay_stop.cancel();
                    (published, relaying.await)
                }
                relayed = &mut relaying => {
                    // The relay failed for good: stop capturing too, loudly.
                    shutdown.cancel();
                    (publishing.await, relayed)
                }
            };
            joined(published)?;
            match relayed {
                Ok(relayed) => Ok(relayed?),
                Err(panicked) => Err(NatsError::Publish(format!("relay task: {panicked}")).into()),
            }
        }
        Feed::Gateway(gateway) => Ok(gateway.run(shutdown.clone()).await?),
    }
}

/// The publisher as a task of its own rather than on the main thread: the wake-ups along an
/// event's path (the replication socket, the log's connection, the writers of the connections
/// it publishes to) then stay on the runtime's workers instead of crossing to the main thread.
/// Dropping the handle stops it, as dropping the server's future stopped it when it ran inline.
fn spawn_publisher(
    publisher: Publisher,
    shutdown: &CancellationToken,
) -> AbortOnDropHandle<Result<(), PublisherError>> {
    AbortOnDropHandle::new(tokio::spawn(publisher.run(shutdown.clone())))
}

/// The publisher task's result; its panic, if it panicked, goes on as this task's. (It is
/// cancelled only when the runtime shuts down, which ends this task too.)
fn joined(
    joined: Result<Result<(), PublisherError>, tokio::task::JoinError>,
) -> Result<(), PublisherError> {
    match joined {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Ok(()),
    }
}

/// Runs capture, the event log, the bus and the HTTP/WebSocket server on `listener` until
/// `shutdown`. The caller has run `setup` (or chose not to).
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    Server::new(settings).await?.run(listener, shutdown).await
}

/// Accepts HTTP/1.1 connections until `shutdown`, then asks open ones to finish. A client
/// gets `handshake_timeout` to send its request headers, so idle or trickling sockets cannot
/// pile up before they are even counted as connections.
async fn accept(
    listener: TcpListener,
    app: axum::Router,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), std::io::Error> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let connections = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    Ok(())
}

/// The organizations and domains already in the log, for metadata.
async fn load_scopes(state: Arc<AppState>) {
    let result = async {
        let client = state.log.get().await?;
        log::load_scopes(&client).await
    };
    match result.await {
        Ok(scopes) => state.scopes.add(scopes),
        Err(err) => tracing::warn!(error = %err, "reading scopes from the event log failed"),
    }
}

/// Applies retention every `TRIM_INTERVAL`.
async fn trim_log(target: crate::pg::Target, retention: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let client = crate::pg::connect(&target, "retention").await?;
            log::trim(&client, retention).await
        };
        match result.await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "trimmed event log"),
            Err(err) => tracing::warn!(error = %err, "trimming the event log failed"),
        }
    }
}

async fn sample_rate(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RATE_SAMPLE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => state.rate.sample(state.last_id()),
        }
    }
}
