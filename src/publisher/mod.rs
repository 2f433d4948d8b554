//! The publisher: a supervised pipeline from the capture source into the event log.
//!
//! ```text
//!   supervise (mod.rs) --one life at a time--> replication.rs | triggers.rs
//!        ^ transient: backoff, rebuild from the log's cursor
//!        | broken continuity: wait for an operator, recheck
//!        | definite: stop, loudly
//! ```
//!
//! Both halves run in one task; if either fails, both are dropped and the pipeline is rebuilt
//! from what the log says is durable (its cursor), after a backoff. Nothing is lost because
//! the slot is only ever acknowledged up to the log's committed progress, and nothing is
//! duplicated because the log drops what it already has. Errors that retrying cannot fix
//! (bad credentials, a mapping that does not match the database) end the publisher.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::capture::catalog::{Catalog, CatalogError};
use crate::capture::continuity::Break;
use crate::capture::replication::ConnectParams;
use crate::capture::stream::CaptureError;
use crate::capture::triggers::TriggerError;
use crate::config::{Settings, SourceMode};
use crate::log::app::Inbox;
use crate::log::{LogError, LogWriter, Scopes, StoredEvent};
use crate::metrics::Metrics;
use crate::nats::Outlet;
use crate::pg::format_lsn;
use crate::setup::SetupError;

mod gap;
mod replication;
mod switch;
mod triggers;

pub use gap::{Acceptance, accept_gap};
pub use switch::{Decision, decide, record, switch};

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
    #[error("switching the capture source: {0}")]
    Switch(String),
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
            Self::Switch(_) => "setup",
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
            Self::Switch(_) => false,
        }
    }
}

/// What the publisher is doing, for readiness checks, stats and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Starting,
    /// Streaming from the source; everything committed from now on will be captured.
    Streaming,
    /// Another publisher holds the log's lock; this one checks every [`STANDBY_POLL`] and
    /// takes over as soon as the lock is free (its holder died or stopped).
    Standby,
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

impl Watch {
    /// The watch of a process that runs no publisher (a gateway): stopped, head 0.
    pub fn detached() -> Self {
        Watch { state: watch::channel(State::Stopped).1, head: watch::channel(0).1 }
    }
}

pub struct Publisher {
    settings: Settings,
    signals: Signals,
}

pub(super) struct Signals {
    state: watch::Sender<State>,
    head: watch::Sender<u64>,
    /// Where appended events go next, once committed.
    bus: Option<Arc<Bus>>,
    /// The NATS relay, for `--role publisher`: never waits.
    outlet: Option<Outlet>,
    /// The organizations and domains appended events carry, for metadata.
    scopes: Option<Arc<Scopes>>,
    metrics: Arc<Metrics>,
    /// Application events posted over HTTP, appended by whichever life holds the writer.
    inbox: Option<Inbox>,
}

impl Signals {
    /// Signals nobody watches yet and no bus: what a publisher starts with (`with_bus` and the
    /// others add to it), and what work before serving uses (a switch's drain).
    fn detached() -> Self {
        Signals {
            state: watch::channel(State::Starting).0,
            head: watch::channel(0).0,
            bus: None,
            outlet: None,
            scopes: None,
            metrics: Arc::default(),
            inbox: None,
        }
    }

    /// Events whose append committed: published on the bus, in order, and the head moved.
    pub(super) fn appended(&self, stored: &[StoredEvent]) {
        if let Some(bus) = &self.bus {
            bus.publish(stored);
        }
        // Before the head moves: the relay, following the head, then finds them handed over.
        if let Some(outlet) = &self.outlet {
            outlet.offer(stored);
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
const REPUBLISH_PAGE: usize = 1000;

impl Publisher {
    pub fn new(settings: Settings) -> Self {
        Self { settings, signals: Signals::detached() }
    }

    /// Publishes every appended event on `bus`, in id order, after its append commits.
    pub fn with_bus(mut self, bus: Arc<Bus>) -> Self {
        self.signals.bus = Some(bus);
        self
    }

    /// Hands every appended event to the NATS relay, in id order, after its append commits.
    pub fn with_outlet(mut self, outlet: Outlet) -> Self {
        self.signals.outlet = Some(outlet);
        self
    }

    /// Notes the organizations and domains of appended events in `scopes`.
    pub fn with_scopes(mut self, scopes: Arc<Scopes>) -> Self {
        self.signals.scopes = Some(scopes);
        self
    }

    /// Appends the application events that arrive on `inbox` (see [`crate::log::app`]).
    pub fn with_inbox(mut self, inbox: Inbox) -> Self {
        self.signals.inbox = Some(inbox);
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
/// A pipeline that streamed and ran this long before failing starts again from
/// `FIRST_BACKOFF` (shorter runs are a flapping source: the backoff keeps growing).
const HEALTHY_RUN: Duration = Duration::from_secs(3);
/// How often a standby tries the log's lock: with the active publisher's sessions ended by
/// Postgres as soon as its process dies, a takeover takes about this plus one connection.
pub const STANDBY_POLL: Duration = Duration::from_millis(500);
/// How often a broken source is checked again (an operator may have accepted the gap).
const CONTINUITY_RECHECK: Duration = Duration::from_secs(2);

async fn supervise(
    settings: &Settings,
    signals: &Signals,
    shutdown: &CancellationToken,
) -> Result<(), PublisherError> {
    let params = ConnectParams::from_target(&settings.database, settings.max_message_bytes);
    let mut backoff = Backoff::new(FIRST_BACKOFF, settings.max_backoff);
    loop {
        let started = tokio::time::Instant::now();
        let life = match settings.source {
            SourceMode::Triggers => triggers::pipeline(settings, signals, shutdown).await,
            _ => replication::pipeline(settings, &params, signals, shutdown, None).await,
        };
        if let Err(err) = &life
            && !matches!(err, PublisherError::Log(LogError::Locked))
        {
            signals.metrics.error(err.kind());
        }
        match life {
            Ok(()) => return Ok(()),
            Err(PublisherError::Log(LogError::Locked)) => {
                // Another publisher is active: stand by, trying the lock often, never backing off.
                if *signals.state.borrow() != State::Standby {
                    tracing::info!("another publisher holds the event log's lock; standing by");
                }
                signals.state.send_replace(State::Standby);
                backoff.reset();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(STANDBY_POLL) => {}
                }
            }
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
                signals.metrics.continuity_broken(true);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(CONTINUITY_RECHECK) => {}
                }
            }
            Err(err) if err.is_retryable() => {
                // A pipeline that got to stream for a moment earned a fresh, short backoff: the
                // fault it met is new, not the one the backoff grew on.
                let streamed = *signals.state.borrow() == State::Streaming;
                if streamed && started.elapsed() > HEALTHY_RUN {
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

/// A catalog connection to the source database.
pub(super) async fn catalog(settings: &Settings) -> Result<Catalog, PublisherError> {
    let client =
        crate::pg::connect(&settings.database, "catalog").await.map_err(CatalogError::from);
    Ok(Catalog::new(client.map_err(CaptureError::from)?))
}

/// Takes the log's writer lock and brings the bus up to the log's head.
pub(super) async fn open_log(
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
