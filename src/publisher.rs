//! The publisher: a supervised pipeline from the capture source into the event log.
//!
//! ```text
//!   capture (stream.rs) --bounded queue of Captured--> log writer (log.rs)
//!        ^                                                  |
//!        +------------- acked LSN (watch) ------------------+
//! ```
//!
//! Both halves run in one task; if either fails, both are dropped and the pipeline is rebuilt
//! from what the log says is durable (its cursor), after a backoff. Nothing is lost because
//! the slot is only ever acknowledged up to the log's committed progress, and nothing is
//! duplicated because the log drops what it already has. Errors that retrying cannot fix
//! (bad credentials, a mapping that does not match the database) end the publisher.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::capture::Captured;
use crate::capture::catalog::{Catalog, CatalogError};
use crate::capture::continuity::{self, Break, Observed, Recorded, Verdict};
use crate::capture::replication::{ConnectParams, ReplicationClient, ReplicationStream};
use crate::capture::stream::{Capture, CaptureError, StreamSettings};
use crate::capture::triggers::{self, TriggerError, TriggerSettings};
use crate::config::Settings;
use crate::config::SourceMode;
use crate::log::{LogError, LogWriter, Scopes, StoredEvent};
use crate::metrics::Metrics;
use crate::pg::{format_lsn, parse_lsn};
use crate::setup::{self, SetupError};

#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Triggers(#[from] TriggerError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Continuity(#[from] Break),
}

impl PublisherError {
    /// The `kind` label of `rowcast_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Capture(CaptureError::Decode(_)) => "decode",
            Self::Capture(CaptureError::Protocol(_)) => "protocol",
            Self::Capture(CaptureError::Replication(_)) => "replication",
            Self::Capture(CaptureError::Catalog(_)) => "catalog",
            Self::Capture(CaptureError::WriterGone) | Self::Log(_) => "log",
            Self::Setup(_) => "setup",
            Self::Triggers(_) => "triggers",
            Self::Continuity(_) => "continuity",
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Capture(err) => err.is_retryable(),
            Self::Triggers(err) => err.is_retryable(),
            Self::Log(err) => err.is_retryable(),
            Self::Setup(err) => err.is_retryable(),
            // Not retried blindly: the publisher waits for an operator (see `supervise`).
            Self::Continuity(_) => false,
        }
    }
}

/// What the publisher is doing, for readiness checks, stats and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Starting,
    /// Streaming from the source; everything committed from now on will be captured.
    Streaming,
    /// Waiting to reconnect after a retryable error.
    Reconnecting {
        error: String,
    },
    /// Continuity with the log cannot be proven; capture waits until an operator accepts the
    /// gap (`rowcast accept-gap`), checking again every few seconds.
    Broken {
        reason: String,
    },
    Stopped,
}

/// Handles for watching a running publisher.
#[derive(Clone)]
pub struct Watch {
    pub state: watch::Receiver<State>,
    /// The id of the newest event in the log.
    pub head: watch::Receiver<u64>,
}

pub struct Publisher {
    settings: Settings,
    signals: Signals,
}

struct Signals {
    state: watch::Sender<State>,
    head: watch::Sender<u64>,
    /// Where appended events go next, once committed.
    bus: Option<Arc<Bus>>,
    /// The organizations and domains appended events carry, for metadata.
    scopes: Option<Arc<Scopes>>,
    metrics: Arc<Metrics>,
}

impl Signals {
    /// Events whose append committed: published on the bus, in order, and the head moved.
    fn appended(&self, stored: &[StoredEvent]) {
        if let Some(bus) = &self.bus {
            bus.publish(stored);
        }
        if let Some(scopes) = &self.scopes {
            scopes.note(stored);
        }
        if let Some(last) = stored.last() {
            self.head.send_replace(last.id);
        }
    }
}

/// Events read per query when the bus catches up with the log after an in-doubt append.
const REPUBLISH_PAGE: i64 = 1000;

impl Publisher {
    pub fn new(settings: Settings) -> Self {
        let signals = Signals {
            state: watch::channel(State::Starting).0,
            head: watch::channel(0).0,
            bus: None,
            scopes: None,
            metrics: Arc::default(),
        };
        Self { settings, signals }
    }

    /// Publishes every appended event on `bus`, in id order, after its append commits.
    pub fn with_bus(mut self, bus: Arc<Bus>) -> Self {
        self.signals.bus = Some(bus);
        self
    }

    /// Notes the organizations and domains of appended events in `scopes`.
    pub fn with_scopes(mut self, scopes: Arc<Scopes>) -> Self {
        self.signals.scopes = Some(scopes);
        self
    }

    /// Counts errors and the capture queue's depth in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.signals.metrics = metrics;
        self
    }

    pub fn watch(&self) -> Watch {
        Watch { state: self.signals.state.subscribe(), head: self.signals.head.subscribe() }
    }

    /// Runs until `shutdown`, reconnecting on retryable errors.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PublisherError> {
        let result = supervise(&self.settings, &self.signals, &shutdown).await;
        self.signals.state.send_replace(State::Stopped);
        result
    }
}

/// The first wait before reconnecting (jittered); it doubles up to `Settings::max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A pipeline that ran this long before failing starts again from `FIRST_BACKOFF`.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// How often a broken source is checked again (an operator may have accepted the gap).
const CONTINUITY_RECHECK: Duration = Duration::from_secs(2);

async fn supervise(
    settings: &Settings,
    signals: &Signals,
    shutdown: &CancellationToken,
) -> Result<(), PublisherError> {
    let params = ConnectParams::from_config(&settings.database, settings.max_message_bytes)
        .map_err(CaptureError::from)?;
    let mut backoff = Backoff::new(FIRST_BACKOFF, settings.max_backoff);
    loop {
        let started = tokio::time::Instant::now();
        let life = match settings.source {
            SourceMode::Triggers => trigger_pipeline(settings, signals, shutdown).await,
            _ => pipeline(settings, &params, signals, shutdown).await,
        };
        if let Err(err) = &life {
            signals.metrics.error(err.kind());
        }
        match life {
            Ok(()) => return Ok(()),
            Err(PublisherError::Continuity(broken)) => {
                // Loud once per reason, then quiet: the state, stats and readiness keep saying it.
                let reason = broken.reason.clone();
                let repeated =
                    matches!(&*signals.state.borrow(), State::Broken { reason: r } if *r == reason);
                if !repeated {
                    tracing::error!(
                        reason = %reason,
                        from = %format_lsn(broken.from),
                        "capture stopped: continuity with the event log cannot be proven; \
                         inspect the source, then run `rowcast accept-gap` to record the gap and continue"
                    );
                }
                signals.state.send_replace(State::Broken { reason });
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(CONTINUITY_RECHECK) => {}
                }
            }
            Err(err) if err.is_retryable() => {
                // A pipeline that ran for a while earned a fresh, short backoff.
                if started.elapsed() > HEALTHY_RUN {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "capture interrupted");
                signals.state.send_replace(State::Reconnecting { error: err.to_string() });
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// Opens the log and the source, and hands the bus whatever the log holds that it has not
/// seen: an append whose commit was in doubt when the last pipeline failed.
async fn connect(
    settings: &Settings,
    params: &ConnectParams,
    signals: &Signals,
    source: &str,
) -> Result<(LogWriter, Catalog, ReplicationStream, StreamSettings), PublisherError> {
    let mut writer = open_log(settings, signals, source).await?;
    let catalog =
        crate::pg::connect(&settings.database, "catalog").await.map_err(CatalogError::from);
    let catalog = Catalog::new(catalog.map_err(CaptureError::from)?);
    setup::check_mapping(&catalog, &settings.mapping).await?;
    setup::check_slot(catalog.client(), &settings.slot).await?;
    let mut client = ReplicationClient::connect(params).await.map_err(CaptureError::from)?;
    prove_continuity(&mut writer, &mut client, &catalog, &settings.slot).await?;
    let cursor = writer.cursor();
    let stream_settings = StreamSettings {
        slot: settings.slot.clone(),
        publication: settings.publication.clone(),
        status_interval: settings.status_interval,
    };
    let stream = Capture::start(client, &stream_settings, cursor.progress).await?;
    tracing::info!(slot = %settings.slot, from = %format_lsn(cursor.progress), last_id = writer.last_id(), "streaming");
    Ok((writer, catalog, stream, stream_settings))
}

/// Checks that the slot continues where the log left off (see [`continuity`]); on a first
/// capture creates the slot and records where it starts and which cluster it belongs to.
async fn prove_continuity(
    writer: &mut LogWriter,
    client: &mut ReplicationClient,
    catalog: &Catalog,
    slot: &str,
) -> Result<(), PublisherError> {
    let mut observed = observe(client, catalog, slot).await?;
    let recorded = Recorded {
        known: writer.is_known(),
        system_identifier: writer.system_identifier().map(str::to_owned),
        progress: writer.cursor().progress,
    };
    let record = match continuity::check(slot, &recorded, &observed) {
        Verdict::Broken(broken) => return Err(broken.into()),
        Verdict::Continues { record } => record,
        Verdict::FirstCapture => {
            if client.create_slot(slot).await.map_err(CaptureError::from)? {
                tracing::info!(slot, "created replication slot");
                observed = observe(client, catalog, slot).await?;
            }
            true
        }
    };
    if record {
        // The slot's position is where this log's capture of the source begins.
        let start = observed.slot.flatten().unwrap_or(0);
        writer.record_origin(&observed.system_identifier, start).await?;
    }
    Ok(())
}

/// The cluster's identity and WAL end (`IDENTIFY_SYSTEM`) and the slot's confirmed position.
async fn observe(
    client: &mut ReplicationClient,
    catalog: &Catalog,
    slot: &str,
) -> Result<Observed, PublisherError> {
    let rows = client.simple_query("IDENTIFY_SYSTEM").await.map_err(CaptureError::from)?;
    let row = rows.first().filter(|row| row.len() >= 3);
    let field = |i: usize| row.and_then(|row| row[i].clone());
    let (Some(system_identifier), Some(wal_end)) =
        (field(0), field(2).as_deref().and_then(parse_lsn))
    else {
        let problem = "IDENTIFY_SYSTEM did not return a system identifier and WAL position";
        return Err(CaptureError::Protocol(problem.into()).into());
    };
    let slot = catalog
        .client()
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|err| CaptureError::from(CatalogError::from(err)))?
        .map(|row| row.get::<_, Option<String>>(0).as_deref().and_then(parse_lsn));
    Ok(Observed { system_identifier, wal_end, slot })
}

/// Takes the log's writer lock and brings the bus up to the log's head.
async fn open_log(
    settings: &Settings,
    signals: &Signals,
    source: &str,
) -> Result<LogWriter, PublisherError> {
    let writer = LogWriter::open(&settings.log, source).await?;
    if let Some(bus) = &signals.bus {
        while writer.last_id() > bus.head() {
            let missed = writer.read_after(bus.head(), REPUBLISH_PAGE).await?;
            if missed.is_empty() {
                break;
            }
            signals.appended(&missed);
        }
    }
    signals.head.send_replace(writer.last_id());
    Ok(writer)
}

/// One life of the trigger source: drains the outbox until shutdown or the first error.
async fn trigger_pipeline(
    settings: &Settings,
    signals: &Signals,
    shutdown: &CancellationToken,
) -> Result<(), PublisherError> {
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        opened = async {
            let writer = open_log(settings, signals, "triggers").await?;
            let catalog = crate::pg::connect(&settings.database, "catalog").await.map_err(CatalogError::from);
            let catalog = Catalog::new(catalog.map_err(CaptureError::from)?);
            setup::check_mapping(&catalog, &settings.mapping).await?;
            Ok::<_, PublisherError>(writer)
        } => opened?,
    };
    let mut writer = opened;
    let trigger_settings =
        TriggerSettings { batch_size: settings.batch_size, poll_interval: settings.poll_interval };
    let appended = |stored: &[StoredEvent]| signals.appended(stored);
    let ready = || {
        tracing::info!(last_id = *signals.head.borrow(), "draining the trigger outbox");
        signals.state.send_replace(State::Streaming);
    };
    triggers::run(
        &mut writer,
        &settings.database,
        &settings.mapping,
        &trigger_settings,
        appended,
        ready,
        shutdown,
    )
    .await?;
    tracing::info!("trigger capture stopped");
    Ok(())
}

/// One life of the pipeline: from the log's cursor until shutdown or the first error.
async fn pipeline(
    settings: &Settings,
    params: &ConnectParams,
    signals: &Signals,
    shutdown: &CancellationToken,
) -> Result<(), PublisherError> {
    let source = format!("replication:{}", settings.slot);
    // Connecting can hang on an unreachable server: shutdown must not wait for it.
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        connected = connect(settings, params, signals, &source) => connected?,
    };
    let (mut writer, catalog, stream, stream_settings) = connected;
    let cursor = writer.cursor();
    signals.state.send_replace(State::Streaming);

    let (queue_tx, queue_rx) = mpsc::channel(settings.queue_capacity);
    // Never report less than the slot already has: Postgres takes a status update's flush
    // position as is, and the log only writes progress along with events.
    let slot_confirmed = slot_confirmed_lsn(&catalog, &settings.slot).await?;
    let (acked_tx, acked_rx) = watch::channel(cursor.progress.max(slot_confirmed));
    let mut capture = Capture::new(catalog, settings.mapping.clone());
    let capturing = async {
        let stream =
            capture.run(stream, &stream_settings, queue_tx, acked_rx, shutdown.clone()).await;
        stream.map_err(PublisherError::from)
    };
    let writing = write_loop(&mut writer, queue_rx, &acked_tx, settings.batch_size, signals);
    let (mut stream, ()) = tokio::try_join!(capturing, writing)?;
    // Shutdown: the writer drained the queue; tell the slot how far the log got.
    let acked = *acked_tx.borrow();
    stream.send_status(acked, false).await.map_err(CaptureError::from)?;
    stream.close().await;
    tracing::info!(acked = %format_lsn(acked), "capture stopped");
    Ok(())
}

async fn slot_confirmed_lsn(catalog: &Catalog, slot: &str) -> Result<u64, PublisherError> {
    let row = catalog
        .client()
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|err| CaptureError::from(CatalogError::from(err)))?;
    let text: Option<String> = row.and_then(|row| row.get(0));
    Ok(text.as_deref().and_then(parse_lsn).unwrap_or(0))
}

/// Progress that arrives without events (keepalives on an idle database, transactions on
/// unmapped tables) is written at most this often; the slot is acknowledged only up to what is
/// written, so it never gets ahead of what the log can prove.
const PROGRESS_FLUSH: Duration = Duration::from_millis(500);

/// Appends what capture sends, a batch at a time, and reports durable progress. Ends when
/// capture drops its sender (shutdown) after draining everything it sent.
async fn write_loop(
    writer: &mut LogWriter,
    mut queue: mpsc::Receiver<Captured>,
    acked: &watch::Sender<u64>,
    batch_size: usize,
    signals: &Signals,
) -> Result<(), PublisherError> {
    let mut items = Vec::with_capacity(batch_size);
    let mut flushed_at = tokio::time::Instant::now();
    let report = |writer: &LogWriter| {
        let durable = writer.cursor().progress;
        acked.send_if_modified(|current| {
            let moved = durable > *current;
            if moved {
                *current = durable;
            }
            moved
        });
    };
    loop {
        // Waits for at least one item, then takes what is already queued, up to a batch.
        let received = tokio::select! {
            received = queue.recv_many(&mut items, batch_size) => received,
            () = tokio::time::sleep_until(flushed_at + PROGRESS_FLUSH), if writer.has_pending_progress() => {
                writer.flush_progress().await?;
                flushed_at = tokio::time::Instant::now();
                report(writer);
                continue;
            }
        };
        if received == 0 {
            break;
        }
        signals.metrics.capture_queue(queue.len());
        let mut batch = Vec::with_capacity(items.len());
        let mut progress = None;
        for item in items.drain(..) {
            match item {
                Captured::Event { position, event } => batch.push((position, event)),
                Captured::Progress(lsn) => progress = Some(lsn),
            }
        }
        let stored = writer.append(batch, progress).await?;
        signals.appended(&stored);
        if writer.has_pending_progress() && flushed_at.elapsed() >= PROGRESS_FLUSH {
            writer.flush_progress().await?;
            flushed_at = tokio::time::Instant::now();
        }
        report(writer);
    }
    // Shutdown: what capture sent is in; its progress too, before the last acknowledgement.
    writer.flush_progress().await?;
    report(writer);
    Ok(())
}
