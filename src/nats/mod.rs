//! Beyond one machine (SPEC §10): publishers write every appended event to a JetStream stream,
//! gateways feed their bus from it.
//!
//! ```text
//!  publisher: log append commits --Signals::appended--> Outlet (never waits)
//!                 relay.rs: in id order, message id = event id, acked ------> JetStream stream
//!                 (what the outlet dropped, or what a dead publisher left unpublished,
//!                  is read back from the log)
//!  gateway:   stream --ordered consumer--> gateway.rs: arrival in id order? --> Bus::publish
//!                                            a gap: fill it from the log first
//!                                            nothing for a while: is the log ahead?
//! ```
//!
//! The stream is a fast path, never the record: the log is. A publisher resumes from the
//! first id the stream lacks (its last message's id), reading the log; a gateway delivers to
//! its bus strictly in id order, filling from the log whatever the stream skipped, lost or has
//! not brought yet. So nothing a gateway's clients see depends on the stream being complete,
//! and every §5 guarantee holds per connection as in one process: the bus and the WebSocket
//! side neither know nor care where their events come from.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use async_nats::jetstream::{self, stream};

use crate::config::NatsSettings;
use crate::log::LogError;
use crate::model::Timestamp;

mod gateway;
pub mod message;
mod relay;

pub use gateway::Gateway;
pub use relay::{Outlet, Relay, relay};

/// How long connecting to one NATS server may take before the next is tried.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Reconnects wait this much longer at each attempt (a server died, another is up)...
const RECONNECT_STEP: std::time::Duration = std::time::Duration::from_millis(100);
/// ...up to this.
const MAX_RECONNECT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a JetStream request may wait for its answer: a server that died is noticed, and
/// the request retried elsewhere.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("NATS: {0}")]
    Connect(String),
    #[error("JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    /// The stream exists for other subjects: someone else's stream, or a changed prefix.
    #[error(
        "JetStream stream {stream} takes subjects {found:?}, not {wanted:?}: choose another --nats-stream or --nats-subject-prefix"
    )]
    Subjects { stream: String, found: Vec<String>, wanted: String },
    /// Another stream takes our subjects.
    #[error(
        "another JetStream stream takes subjects {wanted:?} ({message}): use its name as --nats-stream, or choose another --nats-subject-prefix"
    )]
    Overlap { wanted: String, message: String },
    #[error("publishing to JetStream: {0}")]
    Publish(String),
    #[error("consuming JetStream stream: {0}")]
    Consume(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl NatsError {
    /// Whether trying again may succeed: everything but a stream that is not ours, or a log
    /// that fails for good.
    pub fn is_retryable(&self) -> bool {
        match self {
            NatsError::Subjects { .. } | NatsError::Overlap { .. } => false,
            NatsError::Log(err) => err.is_retryable(),
            _ => true,
        }
    }
}

impl From<tokio_postgres::Error> for NatsError {
    fn from(err: tokio_postgres::Error) -> Self {
        NatsError::Log(err.into())
    }
}

/// A client that connects in the background and reconnects forever, among `--nats-url` and
/// the servers the cluster announces; `status` follows whether it is connected.
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    status: Arc<Status>,
) -> Result<async_nats::Client, NatsError> {
    let addrs = settings
        .urls
        .iter()
        .map(|url| url.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| NatsError::Connect(err.to_string()))?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(CONNECT_TIMEOUT)
        // Reconnects come quickly (a server died; another is up): the default waits grow to 4 s.
        .reconnect_delay_callback(|attempts| {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            RECONNECT_STEP.saturating_mul(attempts).min(MAX_RECONNECT_DELAY)
        })
        .event_callback(move |event| {
            let status = status.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        status.connected.store(true, Ordering::Relaxed);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        status.connected.store(false, Ordering::Relaxed);
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "nats"),
                }
            }
        })
        .connect(addrs)
        .await
        .map_err(|err| NatsError::Connect(err.to_string()))
}

/// The JetStream context rowcast uses: requests answered within a few seconds, so a server
/// that died is noticed and the request retried elsewhere.
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new().timeout(REQUEST_TIMEOUT).build(client)
}

/// The stream, created with `settings` when missing. An existing stream is used as it is
/// configured (an operator may have tuned it), unless it does not take our subjects.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
) -> Result<stream::Stream, NatsError> {
    let wanted = format!("{}.>", settings.subject_prefix);
    let config = stream::Config {
        name: settings.stream.clone(),
        subjects: vec![wanted.clone()],
        max_age: settings.max_age,
        max_bytes: settings.max_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64),
        num_replicas: settings.replicas,
        duplicate_window: settings.duplicate_window,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    };
    let failed = |err: &dyn std::fmt::Display| NatsError::Stream {
        stream: settings.stream.clone(),
        message: err.to_string(),
    };
    let mut stream = js.get_or_create_stream(config).await.map_err(|err| match err.kind() {
        // Another stream takes these subjects: retrying cannot help.
        jetstream::context::CreateStreamErrorKind::JetStream(js_err)
            if js_err.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP =>
        {
            NatsError::Overlap { wanted: wanted.clone(), message: js_err.to_string() }
        }
        _ => failed(&err),
    })?;
    let found = stream.info().await.map_err(|err| failed(&err))?.config.subjects.clone();
    if !found.iter().any(|s| *s == wanted || *s == ">") {
        return Err(NatsError::Subjects { stream: settings.stream.clone(), found, wanted });
    }
    Ok(stream)
}

/// What the stream holds last: the id of its last message (`None` when it is empty or its
/// last message is gone).
pub async fn last_id(stream: &mut stream::Stream) -> Result<Option<u64>, NatsError> {
    let name = stream.cached_info().config.name.clone();
    let failed =
        |err: &dyn std::fmt::Display| NatsError::Stream { stream: name, message: err.to_string() };
    let last = stream.info().await.map_err(|err| failed(&err))?.state.last_sequence;
    if last == 0 {
        return Ok(None);
    }
    match stream.get_raw_message(last).await {
        Ok(message) => Ok(message
            .headers
            .get(message::MESSAGE_ID)
            .and_then(|id| id.as_str().trim().parse().ok())),
        Err(err) => {
            tracing::debug!(error = %err, sequence = last, "the stream's last message is gone");
            Ok(None)
        }
    }
}

/// How a stage is doing, as stats, metrics and readiness read it; kept with atomics by the
/// relay or the gateway.
#[derive(Debug, Default)]
pub struct Status {
    connected: AtomicBool,
    /// The relay or the gateway runs (false while it waits to retry after an error).
    running: AtomicBool,
    /// It ran once: past its start.
    started: AtomicBool,
    error: Mutex<Option<String>>,
    errors: AtomicU64,
    /// Relay: events the stream acknowledged, and the last id.
    published: AtomicU64,
    published_id: AtomicU64,
    /// Gateway: messages taken from the stream, and how many it still holds for us.
    received: AtomicU64,
    pending: AtomicU64,
    /// Gateway: when the stream stored the last message taken (µs since the epoch).
    received_stored_at: AtomicI64,
    /// Gateway: gaps noticed and the events read from the log to fill them.
    gaps: AtomicU64,
    filled: AtomicU64,
    malformed: AtomicU64,
}

impl Status {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connected and running without an error.
    pub fn is_healthy(&self) -> bool {
        self.is_connected() && self.running.load(Ordering::Relaxed)
    }

    /// The last error, while it waits to retry.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether it ran at least once since the process started.
    pub fn has_started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    fn running(&self) {
        self.running.store(true, Ordering::Relaxed);
        self.started.store(true, Ordering::Relaxed);
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn failed(&self, error: &NatsError) {
        self.running.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    /// Seconds the gateway is behind the stream: how long ago the stream stored the last
    /// message taken, while it holds more; 0 when it holds nothing more.
    pub fn lag_seconds(&self) -> f64 {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return 0.0;
        }
        let stored = self.received_stored_at.load(Ordering::Relaxed);
        ((Timestamp::now().0 - stored).max(0)) as f64 / 1e6
    }

    /// The counters for `/metrics`.
    pub fn metrics(&self) -> crate::metrics::Nats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        crate::metrics::Nats {
            connected: self.is_connected(),
            errors: load(&self.errors),
            published: load(&self.published),
            received: load(&self.received),
            pending: load(&self.pending),
            lag_seconds: self.lag_seconds(),
            gaps: load(&self.gaps),
            filled: load(&self.filled),
            malformed: load(&self.malformed),
        }
    }

    /// The `nats` object of stats: the counters of [`Status::metrics`], and what only stats say.
    pub fn stats(&self, settings: &NatsSettings) -> serde_json::Value {
        let counted = self.metrics();
        serde_json::json!({
            "stream": settings.stream,
            "connected": counted.connected,
            "running": self.running.load(Ordering::Relaxed),
            "error": self.error(),
            "errors": counted.errors,
            "published": counted.published,
            "last_published_id": self.published_id.load(Ordering::Relaxed),
            "received": counted.received,
            "stream_pending": counted.pending,
            "stream_lag_seconds": counted.lag_seconds,
            "gaps": counted.gaps,
            "gap_events_filled": counted.filled,
            "malformed": counted.malformed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lag_counts_only_while_the_stream_holds_more() {
        let status = Status::default();
        status.received_stored_at.store(Timestamp::now().0 - 3_000_000, Ordering::Relaxed);
        assert_eq!(status.lag_seconds(), 0.0, "nothing pending: not behind, however old");
        status.pending.store(5, Ordering::Relaxed);
        assert!((2.9..10.0).contains(&status.lag_seconds()), "{}", status.lag_seconds());
        let metrics = status.metrics();
        assert_eq!((metrics.pending, metrics.connected), (5, false));
    }

    #[test]
    fn health_follows_connection_and_failures() {
        let status = Status::default();
        assert!(!status.is_healthy() && !status.has_started());
        status.connected.store(true, Ordering::Relaxed);
        status.running();
        assert!(status.is_healthy() && status.has_started());
        status.failed(&NatsError::Consume("gone".into()));
        assert!(!status.is_healthy() && status.has_started(), "started once stays started");
        assert_eq!(status.error().as_deref(), Some("consuming JetStream stream: gone"));
        let stats = status.stats(&NatsSettings::default());
        assert_eq!((stats["errors"].as_u64(), stats["running"].as_bool()), (Some(1), Some(false)));
        status.running();
        assert_eq!(status.error(), None);
        assert!(
            !NatsError::Subjects { stream: "S".into(), found: vec![], wanted: "x.>".into() }
                .is_retryable()
        );
        assert!(NatsError::Publish("timed out".into()).is_retryable());
    }
}
