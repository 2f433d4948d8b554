//! `rowcast accept-gap`: the operator's answer to a broken continuity.
//!
//! When the publisher cannot prove that the slot continues where the log left off (see
//! [`crate::capture::continuity`]), it stops capturing and waits. Accepting the gap records it
//! where every consumer will see it, as a `rowcast.gap` event (severity `critical`, the WAL
//! range that may be lost and why), and resets the source's cursor to where the slot now
//! stands, in one transaction. A waiting publisher notices within seconds and resumes.
//! When continuity holds, nothing is written.

use std::time::Duration;

use serde_json::json;

use super::PublisherError;
use super::replication::{observe, recorded as recorded_by, source_name};
use crate::capture::continuity::{self, Break, Recorded, Verdict};
use crate::capture::replication::{ConnectParams, ReplicationClient};
use crate::capture::stream::CaptureError;
use crate::config::Settings;
use crate::log::{LogError, LogWriter, recorded_source};
use crate::model::{Event, Severity, Source, Timestamp};
use crate::pg::{Lsn, format_lsn};

/// How long accepting waits for a running publisher to let go of the log's writer lock (a
/// broken one takes it only briefly, to check again).
const LOCK_PATIENCE: Duration = Duration::from_secs(30);
/// How often the lock is tried again meanwhile.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// What `accept-gap` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// Continuity holds: nothing to accept, nothing written.
    Holds,
    /// The gap is in the log as event `id`; capture resumes from `to`.
    Recorded { id: u64, reason: String, from: Lsn, to: Lsn },
}

pub async fn accept_gap(settings: &Settings) -> Result<Acceptance, PublisherError> {
    let params = ConnectParams::from_target(&settings.database, settings.max_message_bytes);
    let source = source_name(&settings.slot);
    let catalog = super::catalog(settings).await?;
    let mut client = ReplicationClient::connect(&params).await.map_err(CaptureError::from)?;
    // A first look without the writer lock, which a streaming publisher holds.
    let log = crate::pg::connect(&settings.log, "accept-gap").await.map_err(LogError::from)?;
    let recorded = match recorded_source(&log, &source).await? {
        Some((progress, system_identifier)) => {
            Recorded { known: true, system_identifier, progress }
        }
        None => Recorded { known: false, system_identifier: None, progress: 0 },
    };
    let observed = observe(&mut client, &catalog, &settings.slot).await?;
    if !matches!(continuity::check(&settings.slot, &recorded, &observed), Verdict::Broken(_)) {
        return Ok(Acceptance::Holds);
    }
    // Broken: take the lock (a waiting publisher only holds it to check again) and look again.
    let mut writer = open_writer(settings, &source).await?;
    let recorded = recorded_by(&writer);
    let mut observed = observe(&mut client, &catalog, &settings.slot).await?;
    let broken = match continuity::check(&settings.slot, &recorded, &observed) {
        Verdict::Broken(broken) => broken,
        Verdict::FirstCapture | Verdict::Continues { .. } => return Ok(Acceptance::Holds),
    };
    if observed.slot.is_none() {
        client.create_slot(&settings.slot).await.map_err(CaptureError::from)?;
        observed = observe(&mut client, &catalog, &settings.slot).await?;
    }
    let to = observed.slot.flatten().unwrap_or(observed.wal_end);
    let event = gap_event(&source, &settings.slot, &broken, to);
    let stored = writer.append_gap(event, to, &observed.system_identifier).await?;
    tracing::warn!(id = stored.id, reason = %broken.reason, from = %format_lsn(broken.from), to = %format_lsn(to), "gap accepted and recorded");
    Ok(Acceptance::Recorded { id: stored.id, reason: broken.reason, from: broken.from, to })
}

async fn open_writer(settings: &Settings, source: &str) -> Result<LogWriter, PublisherError> {
    let deadline = tokio::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match LogWriter::open(&settings.log, source).await {
            Err(LogError::Locked) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            opened => return Ok(opened?),
        }
    }
}

/// `rowcast.gap`: no organization (every `["*"]` subscriber sees it), severity critical.
fn gap_event(source: &str, slot: &str, broken: &Break, to: Lsn) -> Event {
    let data = serde_json::Map::from_iter([
        ("reason".to_owned(), json!(broken.reason)),
        ("capture".to_owned(), json!(source)),
        ("slot".to_owned(), json!(slot)),
        ("from_lsn".to_owned(), json!(format_lsn(broken.from))),
        ("to_lsn".to_owned(), json!(format_lsn(to))),
    ]);
    Event {
        id: 0,
        event_type: "rowcast.gap".into(),
        timestamp: Timestamp::now(),
        organization_id: None,
        domain_id: None,
        severity: Severity::Critical,
        data: Some(data),
        old: None,
        changed: None,
        source: Source::Rowcast { capture: source.to_owned() },
    }
}
