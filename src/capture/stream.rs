//! The replication source: pgoutput messages in, mapped events and progress out.
//!
//! ```text
//! slot --XLogData--> decode --Relation--> cache (per connection, overwritten when resent)
//!                           --Begin/changes/Commit--> render rows -> mapping -> Captured::Event
//!                           --Commit--> Captured::Progress(end_lsn)
//!      --keepalive (between transactions)--> Captured::Progress(wal_end)
//! log writer --acked LSN (watch)--> standby status update
//! ```
//!
//! Progress tracking: the slot is confirmed only up to what the log writer reports as
//! durable. A Commit's `end_lsn` is the position a client confirms after a transaction; a
//! keepalive's `wal_end`, received between transactions, says nothing relevant is pending
//! before it, so an idle database or writes to unmapped tables keep the slot moving and it
//! never retains WAL for nothing.
//!
//! Longer than most files on purpose: one transaction state machine, from Begin to Commit,
//! switch markers and application events included, reads best in one place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Captured;
use super::catalog::{Catalog, CatalogError};
use super::pgoutput::{self, Datum, LogicalMessage, Lsn, OldTuple, Tuple};
use super::render::{self, Category};
use super::replication::{
    PG_EPOCH_OFFSET_MICROS, ReplicationClient, ReplicationError, ReplicationMessage,
    ReplicationStream,
};
use crate::mapping::{EMIT_PREFIX, Entity, Mapping};
use crate::model::{Change, Op, Position, Row, Source, TableName, Timestamp, Via};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("decoding pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("pgoutput protocol: {0}")]
    Protocol(String),
    #[error("the log writer stopped")]
    WriterGone,
}

impl CaptureError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Replication(err) => err.is_retryable(),
            Self::Catalog(err) => err.is_retryable(),
            // The same bytes come back after a reconnect: retrying would loop forever while the
            // slot holds WAL. Stopping loudly is the honest failure.
            Self::Decode(_) | Self::Protocol(_) => false,
            Self::WriterGone => true,
        }
    }
}

pub struct StreamSettings {
    pub slot: String,
    pub publication: String,
    /// How often a standby status update is sent even when nothing changed. Each one asks the
    /// server for a reply, so a live connection is never silent for long.
    pub status_interval: Duration,
}

/// Postgres's own default `wal_sender_timeout`, assumed when the server does not say.
const PG_DEFAULT_WAL_SENDER_TIMEOUT: Duration = Duration::from_secs(60);

/// The shortest receive deadline, whatever the settings say.
const MIN_RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the stream may stay silent before the connection is presumed dead. The server
/// answers every status update (each asks for a reply) and sends keepalives on its own at half
/// its `wal_sender_timeout`; nothing for several status intervals or half that timeout means
/// the connection is gone (a blackholed network, a vanished host), however open the socket
/// looks.
pub fn receive_timeout(
    status_interval: Duration,
    wal_sender_timeout: Option<Duration>,
) -> Duration {
    let server =
        wal_sender_timeout.filter(|t| !t.is_zero()).unwrap_or(PG_DEFAULT_WAL_SENDER_TIMEOUT);
    (status_interval * 3).max(server / 2).max(MIN_RECEIVE_TIMEOUT)
}

/// Parses a `SHOW` of a time setting (`60s`, `1min`, `500ms`, `0`).
pub fn parse_pg_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(millis).map(Duration::from_millis)
}

/// A table as the current connection announced it.
struct RelationInfo {
    table: TableName,
    entity: Option<Arc<Entity>>,
    columns: Vec<(String, Category)>,
}

struct Transaction {
    /// It carries the switch marker.
    marked: bool,
    commit_lsn: Lsn,
    timestamp: Timestamp,
    xid: u64,
    /// Index of the next published change (mapped or not) in this transaction.
    next_change: u64,
}

pub struct Capture {
    catalog: Catalog,
    mapping: Arc<Mapping>,
    relations: HashMap<u32, RelationInfo>,
    transaction: Option<Transaction>,
    progress_sent: Lsn,
    marker: Option<Marker>,
    /// The marker's transaction committed and the marker said stop.
    stopped: bool,
}

/// The logical message prefix of a capture-source switch.
pub const SWITCH_PREFIX: &str = "rowcast.switch";

/// A switch between capture sources under way. The switching transaction installs or removes
/// the capture triggers and, in the same transaction, emits a transactional logical message
/// (`SWITCH_PREFIX`, the switch's token): in the WAL, every transaction before it was seen by
/// one source and every one after it by the other, so the stream can hand over exactly there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// Triggers captured everything before the marker: drop those changes, and capture from
    /// the marker's transaction on.
    SkipUntil(String),
    /// Triggers capture everything after the marker: stop once its transaction commits.
    StopAt(String),
}

impl Capture {
    pub fn new(catalog: Catalog, mapping: Arc<Mapping>) -> Self {
        Self {
            catalog,
            mapping,
            relations: HashMap::new(),
            transaction: None,
            progress_sent: 0,
            marker: None,
            stopped: false,
        }
    }

    /// Hands over at a switch marker (see [`Marker`]).
    pub fn with_marker(mut self, marker: Option<Marker>) -> Self {
        self.marker = marker;
        self
    }

    /// Starts streaming the slot from `start` on a connected client (whose continuity with the
    /// log was checked: see [`super::continuity`]).
    /// Also returns how long the stream may stay silent ([`receive_timeout`]).
    pub async fn start(
        mut client: ReplicationClient,
        settings: &StreamSettings,
        start: Lsn,
    ) -> Result<(ReplicationStream, Duration), CaptureError> {
        let shown = client.simple_query("SHOW wal_sender_timeout").await?;
        let server = shown.first().and_then(|row| row.first()).and_then(|value| value.as_deref());
        let timeout = receive_timeout(settings.status_interval, server.and_then(parse_pg_duration));
        let stream = client.start_replication(&settings.slot, &settings.publication, start).await?;
        Ok((stream, timeout))
    }

    /// Streams until `shutdown`, then returns the stream so the caller can send the final
    /// acknowledgement once the log writer has drained.
    pub async fn run(
        &mut self,
        (mut stream, receive_timeout): (ReplicationStream, Duration),
        settings: &StreamSettings,
        out: mpsc::Sender<Captured>,
        mut acked: watch::Receiver<Lsn>,
        shutdown: CancellationToken,
    ) -> Result<ReplicationStream, CaptureError> {
        // No status at once: before the writer reports, we know no more than the slot does.
        let first = tokio::time::Instant::now() + settings.status_interval;
        let mut status = tokio::time::interval_at(first, settings.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence = tokio::time::sleep(receive_timeout);
        tokio::pin!(silence);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(stream),
                changed = acked.changed() => {
                    if changed.is_err() {
                        return Err(CaptureError::WriterGone);
                    }
                    let flushed = *acked.borrow_and_update();
                    stream.send_status(flushed, false).await?;
                }
                _ = status.tick() => {
                    let flushed = *acked.borrow();
                    stream.send_status(flushed, true).await?;
                }
                () = &mut silence => {
                    return Err(CaptureError::Replication(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("nothing from the server for {receive_timeout:?}; the replication connection is presumed dead"),
                    ))));
                }
                message = stream.next() => {
                    silence.as_mut().reset(tokio::time::Instant::now() + receive_timeout);
                    match message? {
                        ReplicationMessage::XLogData { data, .. } => {
                            let message = pgoutput::decode(data)?;
                            self.handle(message, &out).await?;
                            if self.stopped {
                                return Ok(stream);
                            }
                        }
                        ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                            if self.transaction.is_none() && wal_end > self.progress_sent {
                                self.progress_sent = wal_end;
                                send(&out, Captured::Progress(wal_end)).await?;
                            }
                            if reply_requested {
                                let flushed = *acked.borrow();
                                stream.send_status(flushed, false).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        message: LogicalMessage,
        out: &mpsc::Sender<Captured>,
    ) -> Result<(), CaptureError> {
        match message {
            LogicalMessage::Begin { final_lsn, commit_time, xid } => {
                if self.transaction.is_some() {
                    return Err(CaptureError::Protocol("Begin inside a transaction".into()));
                }
                self.transaction = Some(Transaction {
                    marked: false,
                    commit_lsn: final_lsn,
                    timestamp: Timestamp(commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS)),
                    xid: u64::from(xid),
                    next_change: 0,
                });
            }
            LogicalMessage::Commit { commit_lsn, end_lsn, .. } => {
                let marked = match self.transaction.take() {
                    Some(transaction) if transaction.commit_lsn == commit_lsn => transaction.marked,
                    Some(_) => {
                        return Err(CaptureError::Protocol(
                            "Commit LSN differs from Begin's".into(),
                        ));
                    }
                    None => return Err(CaptureError::Protocol("Commit without Begin".into())),
                };
                self.progress_sent = self.progress_sent.max(end_lsn);
                match self.marker.take_if(|_| marked) {
                    Some(Marker::SkipUntil(_)) => {
                        send(out, Captured::MarkerPassed(end_lsn)).await?
                    }
                    Some(Marker::StopAt(_)) => {
                        send(out, Captured::Progress(end_lsn)).await?;
                        self.stopped = true;
                    }
                    None => send(out, Captured::Progress(end_lsn)).await?,
                }
            }
            LogicalMessage::Message { transactional: true, prefix, content, .. }
                if prefix == SWITCH_PREFIX =>
            {
                let token = match &self.marker {
                    Some(Marker::SkipUntil(token) | Marker::StopAt(token)) => token.as_bytes(),
                    None => &[][..],
                };
                if let Some(transaction) = self.transaction.as_mut()
                    && !token.is_empty()
                    && content[..] == *token
                {
                    transaction.marked = true;
                }
            }
            LogicalMessage::Message { transactional: true, prefix, content, .. }
                if prefix == EMIT_PREFIX =>
            {
                self.emitted(out, &content).await?;
            }
            LogicalMessage::Relation(relation) => {
                let table = TableName::new(relation.namespace, relation.name);
                let entity = self.mapping.entity_for(&table).cloned();
                let mut columns = Vec::with_capacity(relation.columns.len());
                for column in relation.columns {
                    // Unmapped tables are never rendered: no catalog lookups for them.
                    let kind = match entity {
                        Some(_) => self.catalog.kind(column.type_oid).await?,
                        None => Category::Text,
                    };
                    columns.push((column.name, kind));
                }
                self.relations.insert(relation.id, RelationInfo { table, entity, columns });
            }
            LogicalMessage::Insert { relation, new } => {
                self.change(out, relation, Op::Insert, Some(new), None).await?;
            }
            LogicalMessage::Update { relation, old, new } => {
                self.change(out, relation, Op::Update, Some(new), old).await?;
            }
            LogicalMessage::Delete { relation, old } => {
                self.change(out, relation, Op::Delete, None, Some(old)).await?;
            }
            LogicalMessage::Truncate { relations, .. } => {
                for relation in relations {
                    self.change(out, relation, Op::Truncate, None, None).await?;
                }
            }
            LogicalMessage::Type { .. }
            | LogicalMessage::Origin { .. }
            | LogicalMessage::Message { .. } => {}
        }
        Ok(())
    }

    /// A `rowcast.emit()` call: an event in its transaction's order. It counts as a change of
    /// the transaction, so every position after it is the same on every replay.
    async fn emitted(
        &mut self,
        out: &mpsc::Sender<Captured>,
        payload: &[u8],
    ) -> Result<(), CaptureError> {
        let transaction = self.transaction.as_mut().ok_or_else(|| {
            CaptureError::Protocol("an emitted event outside a transaction".into())
        })?;
        let change_index = transaction.next_change;
        transaction.next_change += 1;
        if matches!(self.marker, Some(Marker::SkipUntil(_))) {
            // The old source has this event.
            return Ok(());
        }
        let source = Source::App {
            via: Via::Sql,
            lsn: Some(crate::pg::format_lsn(transaction.commit_lsn)),
            xid: Some(transaction.xid),
        };
        let position = Position::of(transaction.commit_lsn, change_index, 0).ok_or_else(|| {
            CaptureError::Protocol("too many changes or events in one transaction".into())
        })?;
        match self.mapping.sql_event(payload, transaction.timestamp, source) {
            Ok(event) => send(out, Captured::Event { position, event }).await,
            Err(err) => {
                // Only something other than rowcast.emit() writes such a message; the
                // transaction committed, so there is nothing to refuse: say so and go on.
                tracing::error!(xid = transaction.xid, error = %err, "a rowcast.emit message that is not an event was skipped");
                Ok(())
            }
        }
    }

    async fn change(
        &mut self,
        out: &mpsc::Sender<Captured>,
        relation: u32,
        op: Op,
        new: Option<Tuple>,
        old: Option<OldTuple>,
    ) -> Result<(), CaptureError> {
        let transaction = self
            .transaction
            .as_mut()
            .ok_or_else(|| CaptureError::Protocol("change outside a transaction".into()))?;
        // Every published change counts, mapped or not, so positions do not depend on the mapping.
        let (change_index, commit_lsn, timestamp, xid) = (
            transaction.next_change,
            transaction.commit_lsn,
            transaction.timestamp,
            transaction.xid,
        );
        transaction.next_change += 1;
        let info = self.relations.get(&relation).ok_or_else(|| {
            CaptureError::Protocol(format!(
                "change for relation {relation} before its Relation message"
            ))
        })?;
        let Some(entity) = info.entity.clone() else { return Ok(()) };
        if matches!(self.marker, Some(Marker::SkipUntil(_))) {
            // The old source has this change.
            return Ok(());
        }
        let old_tuple = match &old {
            Some(OldTuple::Full(tuple)) | Some(OldTuple::Key(tuple)) => Some(tuple),
            None => None,
        };
        let width = info.columns.len();
        if new.iter().chain(old_tuple).any(|tuple| tuple.0.len() != width) {
            return Err(CaptureError::Protocol(format!(
                "a tuple of {} does not have the {width} columns of its Relation message",
                info.table
            )));
        }
        // A key-only old tuple is not the previous row; keep it only for deletes.
        let old_row = match (&old, op) {
            (Some(OldTuple::Key(_)), Op::Update) => None,
            _ => old_tuple.map(|tuple| render_row(info, tuple, None)),
        };
        let new_row = new.as_ref().map(|tuple| render_row(info, tuple, old_row.as_ref()));
        let change = Change {
            table: info.table.clone(),
            op,
            new: new_row,
            old: old_row,
            timestamp,
            lsn: Some(commit_lsn),
            xid,
        };
        for (index, event) in entity.events(change).into_iter().enumerate() {
            let position = Position::of(commit_lsn, change_index, index).ok_or_else(|| {
                CaptureError::Protocol("too many changes or events in one transaction".into())
            })?;
            send(out, Captured::Event { position, event }).await?;
        }
        Ok(())
    }
}

async fn send(out: &mpsc::Sender<Captured>, item: Captured) -> Result<(), CaptureError> {
    out.send(item).await.map_err(|_| CaptureError::WriterGone)
}

/// Renders a tuple as `to_jsonb(row)` would. Unchanged TOASTed values (`u`) are taken from
/// the old row, which `REPLICA IDENTITY FULL` makes complete.
fn render_row(info: &RelationInfo, tuple: &Tuple, old: Option<&Row>) -> Row {
    let mut columns = Vec::with_capacity(info.columns.len());
    for ((name, kind), datum) in info.columns.iter().zip(&tuple.0) {
        let value = match datum {
            Datum::Null => Value::Null,
            Datum::Text(bytes) | Datum::Binary(bytes) => render::render(bytes, kind).unwrap_or_else(|err| {
                tracing::warn!(table = %info.table, column = %name, error = %err, "value not renderable; sent as text");
                Value::String(String::from_utf8_lossy(bytes).into_owned())
            }),
            Datum::UnchangedToast => match old.and_then(|row| row.get(name)) {
                Some(value) => value.clone(),
                None => {
                    // Only possible without REPLICA IDENTITY FULL, which `setup` installs.
                    tracing::warn!(table = %info.table, column = %name, "unchanged TOAST value without old row; column omitted");
                    continue;
                }
            },
        };
        columns.push((name.clone(), value));
    }
    render::row_object(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_durations_parse_as_postgres_prints_them() {
        let ms = Duration::from_millis;
        assert_eq!(parse_pg_duration("60s"), Some(ms(60_000)));
        assert_eq!(parse_pg_duration("1min"), Some(ms(60_000)));
        assert_eq!(parse_pg_duration("500ms"), Some(ms(500)));
        assert_eq!(parse_pg_duration("0"), Some(ms(0)));
        assert_eq!(parse_pg_duration("2h"), Some(ms(7_200_000)));
        for junk in ["", "s", "1 fortnight", "-1s", "99999999999999999999d"] {
            assert_eq!(parse_pg_duration(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_receive_deadline_follows_the_server_and_the_status_interval() {
        let s = Duration::from_secs;
        // Defaults: wal_sender_timeout 60 s, status every 10 s.
        assert_eq!(receive_timeout(s(10), Some(s(60))), s(30));
        assert_eq!(receive_timeout(s(30), Some(s(60))), s(90));
        // A disabled server timeout still leaves a deadline; never shorter than the floor.
        assert_eq!(receive_timeout(s(10), Some(s(0))), s(30));
        assert_eq!(receive_timeout(Duration::from_millis(100), Some(s(2))), MIN_RECEIVE_TIMEOUT);
    }
}
