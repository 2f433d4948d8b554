//! The durable event log, in Postgres (`--log-url`, by default the source database).
//!
//! Guarantees:
//! - ids are assigned here, strictly increasing, never reused (even when retention empties the
//!   log: `rowcast.log_head` remembers the last one);
//! - one writer at a time: the writer holds a session advisory lock on the log database;
//! - an append is one statement, so one transaction: the events, the new head and the source's
//!   cursor commit together or not at all. Events at or before the cursor's position are
//!   dropped, so a source re-sending after a crash creates no duplicate.

use std::time::Duration;

use tokio_postgres::Client;

use crate::model::{Position, Severity, Timestamp};

pub mod app;
pub mod history;
mod read;
mod scopes;
mod writer;

pub use history::{EventLog, History};
pub use read::{Page, Range, count, oldest_of_last, read, read_stored};
pub use scopes::{Scopes, load_scopes};
pub use writer::{LogWriter, recorded_source};

/// A statement parameter, as the appends and reads bind them.
type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

pub const SCHEMA_SQL: &str = include_str!("../../migrations/rowcast.sql");

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("another rowcast publisher is writing to this event log")]
    Locked,
    #[error("serializing event: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("an append of one event stored none")]
    Empty,
    #[error("event log database: no answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// An append found the log's head elsewhere than where its events were numbered: an
    /// append before it failed, or another writer got in. It stored nothing.
    #[error(
        "the event log's head is no longer at {0}: an earlier append failed or another writer got in"
    )]
    HeadMoved(u64),
}

impl LogError {
    pub fn is_retryable(&self) -> bool {
        match self {
            LogError::Postgres(err) => crate::pg::is_transient(err),
            LogError::Locked | LogError::TimedOut(_) | LogError::HeadMoved(_) => true,
            LogError::Serialize(_) | LogError::Empty => false,
        }
    }
}

/// Where a source stands in the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub position: Position,
    pub progress: u64,
}

/// An event as stored: the envelope serialized once, with the fields filters need.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: u64,
    pub event_type: String,
    pub organization_id: Option<String>,
    pub domain_id: Option<String>,
    pub severity: Severity,
    /// Commit time of the source transaction.
    pub timestamp: Timestamp,
    /// The envelope, serialized once and shared by every reader.
    pub json: std::sync::Arc<str>,
}

impl StoredEvent {
    /// What filters see of this event; `envelope` wraps `self.json` (see [`Envelope`]).
    ///
    /// [`Envelope`]: crate::filter::Envelope
    pub fn subject<'a>(
        &'a self,
        envelope: &'a crate::filter::Envelope<'a>,
    ) -> crate::filter::Subject<'a> {
        crate::filter::Subject {
            event_type: &self.event_type,
            organization_id: self.organization_id.as_deref(),
            domain_id: self.domain_id.as_deref(),
            severity: self.severity,
            envelope: Some(envelope),
        }
    }
}

/// Installs the log's schema (idempotent).
pub async fn install(client: &Client) -> Result<(), LogError> {
    client.batch_execute(SCHEMA_SQL).await?;
    Ok(())
}

/// The capture source a log is fed by, as recorded (see `rowcast.capture`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCapture {
    pub source: String,
    pub reason: Option<String>,
    pub decided_at: Timestamp,
    /// The token of a switch to triggers under way.
    pub switch_marker: Option<String>,
}

/// The recorded capture source; `None` before the first decision (or before `setup`).
pub async fn recorded_capture(client: &Client) -> Result<Option<RecordedCapture>, LogError> {
    let exists: bool =
        client.query_one("SELECT to_regclass('rowcast.capture') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT source, reason, decided_at, switch_marker FROM rowcast.capture", &[])
        .await?;
    Ok(row.map(|row| RecordedCapture {
        source: row.get(0),
        reason: row.get(1),
        decided_at: Timestamp::from_system_time(row.get(2)),
        switch_marker: row.get(3),
    }))
}

/// Records the capture source (a first decision, or a completed switch).
pub async fn record_capture(client: &Client, source: &str, reason: &str) -> Result<(), LogError> {
    client
        .execute(
            "INSERT INTO rowcast.capture (source, reason) VALUES ($1, $2)
             ON CONFLICT (singleton) DO UPDATE SET source = excluded.source,
                 reason = excluded.reason, decided_at = now(), switch_marker = NULL",
            &[&source, &reason],
        )
        .await?;
    Ok(())
}

/// Records the token of a switch to triggers before its marker is emitted, so a switch that
/// is interrupted resumes at the same marker.
pub async fn record_switch_marker(client: &Client, token: &str) -> Result<(), LogError> {
    client.execute("UPDATE rowcast.capture SET switch_marker = $1", &[&token]).await?;
    Ok(())
}

/// The last id ever given.
pub async fn head(client: &Client) -> Result<u64, LogError> {
    let row = client.query_one("SELECT last_id FROM rowcast.log_head", &[]).await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Most events one retention delete removes, so a large backlog is never one long transaction.
const TRIM_BATCH: i64 = 10_000;

/// Deletes events committed more than `retention` ago, in bounded batches so a large backlog
/// never holds one long transaction. Returns how many went.
pub async fn trim(client: &Client, retention: Duration) -> Result<u64, LogError> {
    let seconds = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let deleted = client
            .execute(
                "DELETE FROM rowcast.events WHERE id IN (
                     SELECT id FROM rowcast.events
                      WHERE committed_at < now() - make_interval(secs => $1)
                      ORDER BY id LIMIT $2)",
                &[&seconds, &TRIM_BATCH],
            )
            .await?;
        total += deleted;
        if deleted < TRIM_BATCH as u64 {
            return Ok(total);
        }
    }
}
