//! One life of the replication pipeline: prove continuity, stream the slot into the log,
//! acknowledge only what the log holds.
//!
//! ```text
//!   capture (stream.rs) --bounded queue of Captured--> log writer (write_loop)
//!        ^                                                  |
//!        +------------- acked LSN (watch) ------------------+
//! ```

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{PublisherError, Signals, State, catalog, open_log};
use crate::capture::Captured;
use crate::capture::catalog::{Catalog, CatalogError};
use crate::capture::continuity::{self, Observed, Recorded, Verdict};
use crate::capture::replication::{ConnectParams, ReplicationClient, ReplicationStream};
use crate::capture::stream::{Capture, CaptureError, Marker, StreamSettings};
use crate::config::Settings;
use crate::log::{LogWriter, app};
use crate::metrics::Stage;
use crate::model::{Event, Position};
use crate::pg::{Lsn, format_lsn, parse_lsn};
use crate::setup;

/// The name of a slot's cursor in the log.
pub(super) fn source_name(slot: &str) -> String {
    format!("replication:{slot}")
}

/// A pipeline ready to stream.
struct Connected {
    writer: LogWriter,
    catalog: Catalog,
    stream: (ReplicationStream, Duration),
    stream_settings: StreamSettings,
    /// The slot's confirmed position when streaming started.
    slot_confirmed: Lsn,
}

/// Opens the log and the source, and hands the bus whatever the log holds that it has not
/// seen: an append whose commit was in doubt when the last pipeline failed.
async fn connect(
    settings: &Settings,
    params: &ConnectParams,
    signals: &Signals,
    source: &str,
) -> Result<Connected, PublisherError> {
    let mut writer = open_log(settings, signals, source).await?;
    let catalog = catalog(settings).await?;
    setup::check_mapping(&catalog, &settings.mapping).await?;
    setup::check_slot(catalog.client(), &settings.slot).await?;
    let mut client = ReplicationClient::connect(params).await.map_err(CaptureError::from)?;
    let slot_confirmed =
        prove_continuity(&mut writer, &mut client, &catalog, &settings.slot).await?;
    let cursor = writer.cursor();
    let stream_settings = StreamSettings {
        slot: settings.slot.clone(),
        publication: settings.publication.clone(),
        status_interval: settings.status_interval,
    };
    let stream = Capture::start(client, &stream_settings, cursor.progress).await?;
    tracing::info!(slot = %settings.slot, from = %format_lsn(cursor.progress), last_id = writer.last_id(), "streaming");
    Ok(Connected { writer, catalog, stream, stream_settings, slot_confirmed })
}

/// Checks that the slot continues where the log left off (see [`continuity`]); on a first
/// capture creates the slot and records where it starts and which cluster it belongs to.
async fn prove_continuity(
    writer: &mut LogWriter,
    client: &mut ReplicationClient,
    catalog: &Catalog,
    slot: &str,
) -> Result<Lsn, PublisherError> {
    let mut observed = observe(client, catalog, slot).await?;
    let record = match continuity::check(slot, &recorded(writer), &observed) {
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
    let slot_confirmed = observed.slot.flatten().unwrap_or(0);
    if record {
        // The slot's position is where this log's capture of the source begins.
        writer.record_origin(&observed.system_identifier, slot_confirmed).await?;
    }
    Ok(slot_confirmed)
}

/// What the log's writer knows of its source, for the continuity check.
pub(super) fn recorded(writer: &LogWriter) -> Recorded {
    Recorded {
        known: writer.is_known(),
        system_identifier: writer.system_identifier().map(str::to_owned),
        progress: writer.cursor().progress,
    }
}

/// The cluster's identity and WAL end (`IDENTIFY_SYSTEM`) and the slot's confirmed position.
pub(super) async fn observe(
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

/// One life of the pipeline: from the log's cursor until shutdown or the first error, or, with
/// `stop_at`, until the switch marker with that token (the old source of a switch, drained).
pub(super) async fn pipeline(
    settings: &Settings,
    params: &ConnectParams,
    signals: &Signals,
    shutdown: &CancellationToken,
    stop_at: Option<&str>,
) -> Result<(), PublisherError> {
    let source = source_name(&settings.slot);
    // Connecting can hang on an unreachable server: shutdown must not wait for it.
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        connected = connect(settings, params, signals, &source) => connected?,
    };
    let Connected { mut writer, catalog, stream, stream_settings, slot_confirmed } = connected;
    let cursor = writer.cursor();
    signals.state.send_replace(State::Streaming);
    signals.metrics.continuity_broken(false);

    let (queue_tx, queue_rx) = mpsc::channel(settings.queue_capacity);
    // Never report less than the slot already has: Postgres takes a status update's flush
    // position as is.
    let (acked_tx, acked_rx) = watch::channel(cursor.progress.max(slot_confirmed));
    let marker = match stop_at {
        Some(token) => Some(Marker::StopAt(token.to_owned())),
        None => writer.skip_until_marker().map(|token| Marker::SkipUntil(token.to_owned())),
    };
    let mut capture = Capture::new(catalog, settings.mapping.clone()).with_marker(marker);
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

/// Progress that arrives without events (keepalives on an idle database, transactions on
/// unmapped tables) is written at most this often; the slot is acknowledged only up to what is
/// written, so it never gets ahead of what the log can prove.
const PROGRESS_FLUSH: Duration = Duration::from_millis(500);

/// Appends sent and not yet committed at once: the next batch is numbered, serialized and sent
/// while the one before it commits, so the log's connection never waits for rowcast.
const APPENDS_IN_FLIGHT: usize = 2;

/// Appends what capture sends, a batch at a time, and reports durable progress. Ends when
/// capture drops its sender (shutdown) after draining everything it sent.
///
/// Up to [`APPENDS_IN_FLIGHT`] appends are pipelined; each is published and acknowledged
/// once it commits, in order. Everything else the writer does (progress alone, application
/// events, a switch marker) waits until nothing is in flight.
async fn write_loop(
    writer: &mut LogWriter,
    mut queue: mpsc::Receiver<Captured>,
    acked: &watch::Sender<u64>,
    batch_size: usize,
    signals: &Signals,
) -> Result<(), PublisherError> {
    let mut items = Vec::with_capacity(batch_size);
    let mut flushed_at = tokio::time::Instant::now();
    // Application events wait for a transaction boundary: a transaction's events stay contiguous.
    let mut inbox = match &signals.inbox {
        Some(inbox) => Some(inbox.lock().await),
        None => None,
    };
    let mut mid_transaction = false;
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
    // Writes progress that came without events, and acknowledges it.
    let flush = async |writer: &mut LogWriter, flushed_at: &mut tokio::time::Instant| {
        writer.flush_progress().await?;
        *flushed_at = tokio::time::Instant::now();
        report(writer);
        Ok::<(), PublisherError>(())
    };
    // What is received and not yet sent: events, and progress that came after them.
    let mut batch: Vec<(Position, Event)> = Vec::with_capacity(batch_size);
    let mut progress = None;
    loop {
        let idle = writer.in_flight() == 0;
        let room = writer.in_flight() < APPENDS_IN_FLIGHT;
        // A transaction goes in one append when it fits in a batch: pgoutput sends a
        // transaction only once it committed, so the rest of it is already on its way, and
        // sending its first events alone would make its last ones wait for two commits.
        let whole = !mid_transaction || batch.len() >= batch_size;
        if room && whole && (!batch.is_empty() || progress.is_some()) {
            signals
                .metrics
                .stage(Stage::SentToLog, batch.iter().map(|(_, event)| &event.timestamp));
            writer.send(std::mem::take(&mut batch), progress.take())?;
            if writer.in_flight() == 0
                && writer.has_pending_progress()
                && flushed_at.elapsed() >= PROGRESS_FLUSH
            {
                flush(writer, &mut flushed_at).await?;
            }
            continue;
        }
        // Waits for at least one item, then takes what is already queued, up to a batch. With
        // both appends in flight it still gathers the rest of a transaction.
        let want = batch_size.saturating_sub(batch.len()).max(1);
        let received = tokio::select! {
            Some(confirmed) = writer.confirm(), if !idle => {
                let confirmed = confirmed?;
                signals.metrics.stage(Stage::Appended, confirmed.iter().map(|e| &e.timestamp));
                signals.appended(&confirmed);
                report(writer);
                continue;
            }
            received = queue.recv_many(&mut items, want), if batch.len() < batch_size && (room || mid_transaction) => received,
            () = tokio::time::sleep_until(flushed_at + PROGRESS_FLUSH), if idle && writer.has_pending_progress() => {
                flush(writer, &mut flushed_at).await?;
                continue;
            }
            Some(request) = async {
                match inbox.as_mut() {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            }, if idle && !mid_transaction => {
                let stored = app::serve(writer, request).await?;
                signals.appended(&stored);
                continue;
            }
        };
        if received == 0 {
            break;
        }
        signals.metrics.capture_queue(queue.len());
        let events = items.iter().filter_map(|item| match item {
            Captured::Event { event, .. } => Some(&event.timestamp),
            _ => None,
        });
        signals.metrics.stage(Stage::Received, events);
        for item in items.drain(..) {
            match item {
                Captured::Event { position, event } => {
                    mid_transaction = true;
                    batch.push((position, event));
                }
                Captured::Progress(lsn) => {
                    mid_transaction = false;
                    progress = Some(lsn);
                }
                Captured::MarkerPassed(lsn) => {
                    mid_transaction = false;
                    // What came before the marker, then the marker, each durable before what
                    // follows it: a restart must never skip past the hand-over again.
                    let stored = writer.append(std::mem::take(&mut batch), progress.take()).await?;
                    signals.appended(&stored);
                    writer.pass_marker(lsn).await?;
                    tracing::info!(at = %format_lsn(lsn), "capture source switch complete: replication captures from here");
                }
            }
        }
    }
    // Shutdown: capture stopped; what it sent goes in.
    if !batch.is_empty() || progress.is_some() {
        writer.send(batch, progress)?;
    }
    while let Some(confirmed) = writer.confirm().await {
        signals.appended(&confirmed?);
    }
    // Shutdown: what capture sent is in; its progress too, before the last acknowledgement.
    flush(writer, &mut flushed_at).await
}
