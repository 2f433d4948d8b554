//! The gateway's side: the stream feeds the local bus, strictly in id order.
//!
//! The bus starts at the log's head (the server reads it before anything is served), and the
//! consumer at the stream's end: what was appended in between is a gap like any other. Each
//! message is classified against the last id the bus has ([`message::arrival`]): the next id
//! goes to the bus, an old one (a republish, or read from the log already) is skipped, and one
//! further ahead makes the gateway read the missing ids from the log first. When the stream
//! brings nothing for `idle_check`, the gateway asks the log for its head, so an event the
//! stream lost, or never got because its publisher died first, is delivered all the same.
//!
//! An id the log does not have yet (`--log-url` is a replica that lags) is waited for, never
//! skipped: only ids that retention removed are passed over, as the log would for `since`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::message::{self, Arrival};
use super::{NatsError, Status, connect, context, ensure_stream};
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::config::NatsSettings;
use crate::log::{self, Scopes, StoredEvent};
use crate::model::Timestamp;
use crate::pg::Pool;

/// Messages taken from the consumer at once when more are ready: one bus lock for all.
const READY_BATCH: usize = 512;
/// Events read from the log per query when filling a gap.
const FILL_PAGE: usize = 1000;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A gap the log cannot fill for this long is reported (the replica behind `--log-url` lags).
const FILL_PATIENCE: Duration = Duration::from_secs(5);

/// Feeds a bus from the stream; see the module doc.
pub struct Gateway {
    settings: NatsSettings,
    bus: Arc<Bus>,
    log: Pool,
    scopes: Arc<Scopes>,
    status: Arc<Status>,
    /// Held while events go to the bus: the consumer and the log poller take turns.
    delivering: tokio::sync::Mutex<()>,
    /// When the stream last brought something.
    last_message: std::sync::Mutex<tokio::time::Instant>,
}

impl Gateway {
    pub fn new(
        settings: NatsSettings,
        bus: Arc<Bus>,
        log: Pool,
        scopes: Arc<Scopes>,
        status: Arc<Status>,
    ) -> Self {
        let last_message = std::sync::Mutex::new(tokio::time::Instant::now());
        Self { settings, bus, log, scopes, status, delivering: Default::default(), last_message }
    }

    /// Consumes until `shutdown`; after a failure, consumes again from the next stream
    /// sequence, filling from the log what passed meanwhile. Meanwhile, and whenever the stream
    /// is quiet, the log is asked for its head every `idle_check`: with NATS gone, events still
    /// arrive, from the log. Ends early only on a stream that is not ours, or a log that fails
    /// for good.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NatsError> {
        tokio::select! {
            consumed = self.consume_until(&shutdown) => consumed,
            () = self.poll_log() => Ok(()),
        }
    }

    /// Asks the log for its head whenever the stream brought nothing for `idle_check`.
    async fn poll_log(&self) {
        let mut tick = tokio::time::interval(self.settings.idle_check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let quiet = self.last_message.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            if quiet < self.settings.idle_check {
                continue;
            }
            match self.catch_up_with_log().await {
                Ok(()) => failing = false,
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(error = %err, "reading the event log's head failed");
                }
                Err(_) => {}
            }
        }
    }

    async fn consume_until(&self, shutdown: &CancellationToken) -> Result<(), NatsError> {
        let client = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            client = connect(&self.settings, "rowcast gateway", self.status.clone()) => client?,
        };
        let js = context(client);
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        // The stream sequence of the last message taken: where a new consumer resumes.
        let mut sequence = None;
        loop {
            let consumed = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                consumed = self.consume(&js, &mut sequence, &mut backoff) => consumed,
            };
            let Err(err) = consumed;
            self.status.failed(&err);
            if !err.is_retryable() {
                tracing::error!(error = %err, "gateway stopped: it cannot consume the stream");
                return Err(err);
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "consuming the NATS stream interrupted");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One consumer, until it fails.
    async fn consume(
        &self,
        js: &async_nats::jetstream::Context,
        sequence: &mut Option<u64>,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, NatsError> {
        let stream = ensure_stream(js, &self.settings).await?;
        let deliver_policy = match *sequence {
            Some(last) => DeliverPolicy::ByStartSequence { start_sequence: last + 1 },
            None => DeliverPolicy::New,
        };
        let config = pull::OrderedConfig {
            filter_subject: format!("{}.>", self.settings.subject_prefix),
            deliver_policy,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|err| NatsError::Consume(err.to_string()))?;
        let messages =
            consumer.messages().await.map_err(|err| NatsError::Consume(err.to_string()))?;
        let mut messages = messages.ready_chunks(READY_BATCH);
        // What was appended before the consumer existed is in the log.
        self.catch_up_with_log().await?;
        self.status.running();
        backoff.reset();
        tracing::info!(stream = %self.settings.stream, after = ?sequence, "consuming the NATS stream");
        loop {
            // A quiet stream is `poll_log`'s business.
            let Some(chunk) = messages.next().await else {
                return Err(NatsError::Consume("the consumer ended".into()));
            };
            *self.last_message.lock().unwrap_or_else(|p| p.into_inner()) =
                tokio::time::Instant::now();
            let mut batch = Vec::with_capacity(chunk.len());
            let mut failure = None;
            for message in chunk {
                match message {
                    Ok(message) => {
                        if let Ok(info) = message.info() {
                            *sequence = Some(info.stream_sequence);
                            self.status.pending.store(info.pending, Ordering::Relaxed);
                            let micros = info.published.unix_timestamp_nanos() / 1000;
                            let micros = i64::try_from(micros).unwrap_or(Timestamp::now().0);
                            self.status.received_stored_at.store(micros, Ordering::Relaxed);
                        }
                        self.status.received.fetch_add(1, Ordering::Relaxed);
                        let id = message.headers.as_ref().and_then(|h| h.get(message::MESSAGE_ID));
                        match message::parse(id.map(|id| id.as_str()), &message.payload) {
                            Ok(event) => batch.push(event),
                            Err(err) => {
                                // Its id is filled from the log when the next one shows the gap.
                                self.status.malformed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(subject = %message.subject, error = %err, "skipping a malformed stream message");
                            }
                        }
                    }
                    Err(err) => {
                        failure = Some(NatsError::Consume(err.to_string()));
                        break;
                    }
                }
            }
            self.deliver(batch).await?;
            if let Some(err) = failure {
                return Err(err);
            }
        }
    }

    /// Hands `events` to the bus in id order: skips what it has, fills gaps from the log.
    async fn deliver(&self, events: Vec<StoredEvent>) -> Result<(), NatsError> {
        let _turn = self.delivering.lock().await;
        let mut run: Vec<StoredEvent> = Vec::with_capacity(events.len());
        let mut head = self.bus.head();
        for event in events {
            match message::arrival(head, event.id) {
                Arrival::Old => continue,
                Arrival::Next => {}
                Arrival::Ahead(missing) => {
                    self.publish(&std::mem::take(&mut run));
                    self.status.gaps.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        from = missing.start(),
                        to = missing.end(),
                        "filling a gap from the log"
                    );
                    self.fill(*missing.end()).await?;
                }
            }
            head = event.id;
            run.push(event);
        }
        self.publish(&run);
        Ok(())
    }

    fn publish(&self, events: &[StoredEvent]) {
        if !events.is_empty() {
            self.bus.publish(events);
            self.scopes.note(events);
        }
    }

    /// Delivers what the log holds beyond the bus's head, when the stream is quiet.
    async fn catch_up_with_log(&self) -> Result<(), NatsError> {
        let _turn = self.delivering.lock().await;
        let client = self.log.get().await?;
        let head = log::head(&client).await?;
        drop(client);
        if head > self.bus.head() {
            self.status.gaps.fetch_add(1, Ordering::Relaxed);
            self.fill(head).await?;
        }
        Ok(())
    }

    /// Delivers every event of the log after the bus's head up to `to`, in order; waits for
    /// ids the log does not have yet, passes over those retention removed.
    async fn fill(&self, to: u64) -> Result<(), NatsError> {
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let started = tokio::time::Instant::now();
        let mut reported = false;
        loop {
            let head = self.bus.head();
            if head >= to {
                return Ok(());
            }
            let client = self.log.get().await?;
            let (oldest, events) = log::read_stored(&client, head, Some(to), FILL_PAGE).await?;
            drop(client);
            let continues = events.first().is_some_and(|e| e.id == head + 1);
            if continues || oldest > head + 1 {
                // In order; ids before `oldest` are gone to retention, as for `since`.
                let last = events.last().map(|e| e.id);
                self.status.filled.fetch_add(events.len() as u64, Ordering::Relaxed);
                self.publish(&events);
                if last.is_none_or(|last| last >= to) {
                    return Ok(());
                }
                continue;
            }
            // The log lacks an id the stream already brought past: a replica behind.
            if !reported && started.elapsed() > FILL_PATIENCE {
                reported = true;
                tracing::warn!(
                    waiting_for = head + 1,
                    "the event log lacks ids the stream already has; waiting for it (is --log-url a lagging replica?)"
                );
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
