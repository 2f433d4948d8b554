//! The single writer: numbers events, appends them with the source's cursor in one
//! statement, and drops what a re-sending source already appended.
//!
//! Longer than most files on purpose: every kind of append the single writer makes (capture
//! batches, trigger drains, application events, gaps, hand-overs) side by side, each one statement.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use sync_wrapper::SyncWrapper;
use tokio_postgres::{Client, Statement};

use super::app::{Appended, KeyedEvent};
use super::{Cursor, LogError, Param, StoredEvent};
use crate::model::{Event, Position};

/// The longest one write to the log may take. A write that takes longer is on a connection
/// that stopped answering (a dead path, a hung server): the pipeline is rebuilt on a new one,
/// and the log's cursor makes the in-doubt write harmless.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn bounded<T>(
    write: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, LogError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LogError::TimedOut(WRITE_TIMEOUT)),
    }
}

/// The capture append: a batch of events and the source's cursor, fenced on the head
/// ([`Batch::statement`]); the cursor is `$10..$13`.
fn append_statement(body: &str) -> String {
    format!(
        "{}, moved AS (
        INSERT INTO rowcast.cursors (source, position_major, position_minor, progress)
        SELECT $10, $11, $12, $13 WHERE EXISTS (SELECT FROM fenced)
        ON CONFLICT (source) DO UPDATE SET position_major = excluded.position_major,
            position_minor = excluded.position_minor, progress = excluded.progress, updated_at = now()
    )
    SELECT count(*) FROM appended",
        Batch::statement(body, Keys::None)
    )
}

/// Whether an append stores idempotency keys (application events), and from which parameter.
#[derive(Clone, Copy)]
enum Keys {
    None,
    At(usize),
}

/// An append on its way: the events it stores once it commits.
type Pending = BoxFuture<'static, Result<Vec<StoredEvent>, LogError>>;

/// What an append sent and not yet confirmed commits.
struct Sent {
    last_id: u64,
    cursor: Cursor,
}

/// The most bytes of event bodies one capture append carries; a bigger batch goes as several.
const MAX_APPEND_BYTES: usize = 16 << 20;

/// Advisory lock key held by the single writer of a log ("rowcast" in ASCII).
const WRITER_LOCK: i64 = 0x0072_6f77_6361_7374;

/// What the log records of `source` (its progress and cluster), read without the writer lock;
/// `None` when the source was never captured into this log.
pub async fn recorded_source(
    client: &Client,
    source: &str,
) -> Result<Option<(u64, Option<String>)>, LogError> {
    let row = client
        .query_opt(
            "SELECT progress, system_identifier FROM rowcast.cursors WHERE source = $1",
            &[&source],
        )
        .await?;
    Ok(row.map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
}

/// The single writer of the log.
pub struct LogWriter {
    client: Arc<Client>,
    /// The capture append ([`append_statement`]), prepared once.
    append: Statement,
    /// The body as the appends write it: `body` into a `text` column (today's logs), `body::json`
    /// into the `json` column of logs made before it was `text` (no rewrite on upgrade).
    body: &'static str,
    source: String,
    /// The last id committed.
    last_id: u64,
    /// What the log holds for the source: never ahead of what is committed.
    cursor: Cursor,
    /// Appends sent and not yet confirmed, oldest first (see [`LogWriter::send`]).
    /// (Only ever used through `&mut self`: the wrapper lets the writer stay `Sync`.)
    in_flight: SyncWrapper<FuturesOrdered<Pending>>,
    /// What each of them commits, in the same order.
    sent: VecDeque<Sent>,
    /// Progress that arrived without events and is not written yet (see `flush_progress`).
    pending_progress: Option<u64>,
    /// Whether the source has a cursor row: it appended, or recorded its origin, before.
    known: bool,
    system_identifier: Option<String>,
    /// A switch marker the source must skip to (see `capture::stream::Marker::SkipUntil`).
    skip_until_marker: Option<String>,
}

impl LogWriter {
    /// Takes the writer lock and reads the head and `source`'s cursor.
    pub async fn open(target: &crate::pg::Target, source: &str) -> Result<Self, LogError> {
        let client = crate::pg::connect(target, "log writer").await?;
        // The slot is acknowledged once an append commits: that commit must be on disk.
        client.batch_execute("SET synchronous_commit = on").await?;
        let locked: bool =
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK]).await?.get(0);
        if !locked {
            return Err(LogError::Locked);
        }
        let last_id: i64 =
            client.query_one("SELECT last_id FROM rowcast.log_head", &[]).await?.get(0);
        let row = client
            .query_opt(
                "SELECT position_major, position_minor, progress, system_identifier, skip_until_marker
                   FROM rowcast.cursors WHERE source = $1",
                &[&source],
            )
            .await?;
        let cursor = row.as_ref().map(|row| Cursor {
            position: Position {
                major: row.get::<_, i64>(0) as u64,
                minor: row.get::<_, i64>(1) as u64,
            },
            progress: row.get::<_, i64>(2) as u64,
        });
        let body_type: String = client
            .query_one(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                  WHERE attrelid = 'rowcast.events'::regclass AND attname = 'body'",
                &[],
            )
            .await?
            .get(0);
        let body = if body_type == "text" { "body" } else { "body::json" };
        let append = client.prepare(&append_statement(body)).await?;
        Ok(Self {
            append,
            body,
            in_flight: SyncWrapper::new(FuturesOrdered::new()),
            sent: VecDeque::new(),
            source: source.to_owned(),
            last_id: last_id as u64,
            cursor: cursor.unwrap_or_default(),
            pending_progress: None,
            known: row.is_some(),
            system_identifier: row.as_ref().and_then(|row| row.get(3)),
            skip_until_marker: row.and_then(|row| row.get(4)),
            client: Arc::new(client),
        })
    }

    /// Where the source stands in the log, as committed: the slot may be acknowledged up to
    /// its `progress` and no further, so the slot never gets ahead of what the log can prove.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The switch marker this source skips to, while a switch from triggers is under way.
    pub fn skip_until_marker(&self) -> Option<&str> {
        self.skip_until_marker.as_deref()
    }

    /// Restarts the source's cursor for a switch from triggers: capture begins at `progress`
    /// (where the new slot starts), skipping to the switch marker `token`.
    pub async fn begin_handover(
        &mut self,
        progress: u64,
        system_identifier: &str,
        token: &str,
    ) -> Result<(), LogError> {
        bounded(self.client.execute(
                "INSERT INTO rowcast.cursors (source, position_major, position_minor, progress, system_identifier, skip_until_marker)
                 VALUES ($1, 0, 0, $2, $3, $4)
                 ON CONFLICT (source) DO UPDATE SET position_major = 0, position_minor = 0,
                     progress = excluded.progress, system_identifier = excluded.system_identifier,
                     skip_until_marker = excluded.skip_until_marker, updated_at = now()",
                &[&self.source, &(progress as i64), &system_identifier, &token],
            )).await?;
        self.cursor = Cursor { position: Position::default(), progress };
        self.pending_progress = None;
        self.known = true;
        self.system_identifier = Some(system_identifier.to_owned());
        self.skip_until_marker = Some(token.to_owned());
        Ok(())
    }

    /// The switch marker's transaction committed at `end`: the hand-over is complete.
    pub async fn pass_marker(&mut self, end: u64) -> Result<(), LogError> {
        let progress = self.cursor.progress.max(end).max(self.pending_progress.unwrap_or(0));
        bounded(self.client.execute(
            "UPDATE rowcast.cursors SET skip_until_marker = NULL,
                        progress = greatest(progress, $2), updated_at = now()
                  WHERE source = $1",
            &[&self.source, &(progress as i64)],
        ))
        .await?;
        self.skip_until_marker = None;
        self.pending_progress = None;
        self.cursor.progress = progress;
        Ok(())
    }

    /// Whether this source has been captured into this log before.
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// The cluster the source was captured from, once recorded.
    pub fn system_identifier(&self) -> Option<&str> {
        self.system_identifier.as_deref()
    }

    /// Records the cluster the source is captured from and where its capture starts (on the
    /// first capture, or for a log written before clusters were recorded).
    pub async fn record_origin(
        &mut self,
        system_identifier: &str,
        start: u64,
    ) -> Result<(), LogError> {
        let progress = self.cursor.progress.max(start);
        let (major, minor, _) = self.cursor_params();
        bounded(self.client.execute(
                "INSERT INTO rowcast.cursors (source, position_major, position_minor, progress, system_identifier)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (source) DO UPDATE SET system_identifier = excluded.system_identifier,
                     progress = greatest(rowcast.cursors.progress, excluded.progress), updated_at = now()",
                &[&self.source, &major, &minor, &(progress as i64), &system_identifier],
            )).await?;
        self.known = true;
        self.cursor.progress = progress;
        self.system_identifier = Some(system_identifier.to_owned());
        Ok(())
    }

    /// Writes progress that arrived without events (keepalives, unmapped transactions), so it
    /// may be acknowledged. Returns whether the cursor moved.
    pub async fn flush_progress(&mut self) -> Result<bool, LogError> {
        let Some(progress) = self.pending_progress.filter(|p| *p > self.cursor.progress) else {
            self.pending_progress = None;
            return Ok(false);
        };
        let (major, minor, _) = self.cursor_params();
        bounded(self.client.execute(
                "INSERT INTO rowcast.cursors (source, position_major, position_minor, progress)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (source) DO UPDATE SET progress = greatest(rowcast.cursors.progress, excluded.progress), updated_at = now()",
                &[&self.source, &major, &minor, &(progress as i64)],
            )).await?;
        self.pending_progress = None;
        self.known = true;
        self.cursor.progress = progress;
        Ok(true)
    }

    /// Whether progress waits to be written by [`LogWriter::flush_progress`].
    pub fn has_pending_progress(&self) -> bool {
        self.pending_progress.is_some_and(|p| p > self.cursor.progress)
    }

    fn cursor_params(&self) -> (i64, i64, i64) {
        let Cursor { position, progress } = self.cursor;
        (position.major as i64, position.minor as i64, progress as i64)
    }

    /// Up to `limit` stored events after `after`, in id order, as the bus takes them.
    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        Ok(super::read_stored(&self.client, after, None, limit).await?.1)
    }

    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Appends `events` (those after the cursor's position) and moves the cursor, in one
    /// transaction, and waits for it to commit (and for any append sent before it).
    /// `progress` is the source position the batch completes, if any.
    pub async fn append(
        &mut self,
        events: Vec<(Position, Event)>,
        progress: Option<u64>,
    ) -> Result<Vec<StoredEvent>, LogError> {
        self.send(events, progress)?;
        let mut stored = Vec::new();
        while let Some(confirmed) = self.confirm().await {
            stored.extend(confirmed?);
        }
        Ok(stored)
    }

    /// Sends an append of `events` (those after the position of the last append sent) that
    /// moves the cursor to `progress`, without waiting for it: the next batch can be numbered
    /// and sent while this one commits. [`LogWriter::confirm`] reports the appends in the order
    /// they were sent.
    ///
    /// Each append commits only on the log head it was numbered after ([`Batch::statement`]): when one
    /// fails, those sent behind it store nothing, so the log never has a hole. Progress that
    /// comes without events waits for [`LogWriter::flush_progress`] instead.
    pub fn send(
        &mut self,
        events: Vec<(Position, Event)>,
        progress: Option<u64>,
    ) -> Result<(), LogError> {
        let (last_id, sent_cursor) = self.ahead();
        let mut cursor = sent_cursor;
        // Progress that waited for a write goes with these events: it came before them.
        for progress in progress.into_iter().chain(self.pending_progress) {
            cursor.progress = cursor.progress.max(progress);
        }
        let mut fresh = Vec::with_capacity(events.len());
        let mut positions = Vec::with_capacity(events.len());
        for (position, event) in events {
            if position <= sent_cursor.position {
                continue;
            }
            cursor.position = position;
            positions.push(position);
            fresh.push(event);
        }
        if fresh.is_empty() {
            // Progress alone waits: written in bulk by `flush_progress`, not once per keepalive.
            if cursor.progress > sent_cursor.progress {
                self.pending_progress = Some(cursor.progress);
            }
            return Ok(());
        }
        // Big rows make big statements: past MAX_APPEND_BYTES the batch goes as several appends,
        // each moving the position to its last event; only the last one carries the progress
        // (everything before it in the log), so a crash between them re-sends the rest.
        let chunks = Batch::new(last_id, fresh)?.split(MAX_APPEND_BYTES);
        let count = chunks.len();
        let mut appended = 0;
        for (i, chunk) in chunks.into_iter().enumerate() {
            appended += chunk.stored.len();
            let chunk_cursor = match positions.get(appended - 1) {
                Some(&position) if i + 1 < count => {
                    Cursor { position, progress: sent_cursor.progress }
                }
                _ => cursor,
            };
            self.push(chunk, chunk_cursor);
        }
        self.pending_progress = None;
        Ok(())
    }

    /// Sends the capture append of `batch` moving the source's cursor to `cursor`.
    fn push(&mut self, batch: Batch, cursor: Cursor) {
        let (client, statement, source) =
            (self.client.clone(), self.append.clone(), self.source.clone());
        self.sent.push_back(Sent { last_id: batch.last_id, cursor });
        self.in_flight.get_mut().push_back(Box::pin(async move {
            let (major, minor, progress) = (
                cursor.position.major as i64,
                cursor.position.minor as i64,
                cursor.progress as i64,
            );
            let arrays = batch.arrays();
            let mut params = arrays.params();
            params.extend::<[Param<'_>; 4]>([&source, &major, &minor, &progress]);
            let row = bounded(client.query_one(&statement, &params)).await?;
            batch.check(&row)?;
            Ok(batch.stored)
        }));
    }

    /// Waits for the oldest append sent and not yet confirmed; `None` when there is none.
    /// Cancel-safe: an append whose wait is dropped is confirmed by the next call.
    pub async fn confirm(&mut self) -> Option<Result<Vec<StoredEvent>, LogError>> {
        let result = self.in_flight.get_mut().next().await?;
        let sent = self.sent.pop_front()?;
        Some(result.inspect(|_| {
            self.last_id = sent.last_id;
            self.cursor = sent.cursor;
            self.known = true;
        }))
    }

    /// How many appends are sent and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.sent.len()
    }

    /// The last id and the cursor after every append sent, committed or not.
    fn ahead(&self) -> (u64, Cursor) {
        self.sent.back().map_or((self.last_id, self.cursor), |sent| (sent.last_id, sent.cursor))
    }

    /// Appends a gap the operator accepted and restarts the source's cursor at `progress`
    /// (on `system_identifier`), in one transaction: the gap is on record exactly when capture
    /// may resume past it. Positions start over: the slot sends nothing before `progress`.
    pub async fn append_gap(
        &mut self,
        event: Event,
        progress: u64,
        system_identifier: &str,
    ) -> Result<StoredEvent, LogError> {
        let batch = Batch::new(self.last_id, vec![event])?;
        let statement = format!(
            "{}, moved AS (
                INSERT INTO rowcast.cursors (source, position_major, position_minor, progress, system_identifier)
                SELECT $10, 0, 0, $11, $12 WHERE EXISTS (SELECT FROM fenced)
                ON CONFLICT (source) DO UPDATE SET position_major = 0, position_minor = 0,
                    progress = excluded.progress, system_identifier = excluded.system_identifier,
                    updated_at = now()
            )
            SELECT count(*) FROM appended",
            Batch::statement(self.body, Keys::None)
        );
        let arrays = batch.arrays();
        let mut params = arrays.params();
        let progress_param = progress as i64;
        params.extend::<[Param<'_>; 3]>([&self.source, &progress_param, &system_identifier]);
        batch.check(&bounded(self.client.query_one(&statement, &params)).await?)?;
        self.last_id = batch.last_id;
        self.cursor = Cursor { position: Position::default(), progress };
        self.pending_progress = None;
        self.known = true;
        self.system_identifier = Some(system_identifier.to_owned());
        batch.stored.into_iter().next().ok_or(LogError::Empty)
    }

    /// Appends events drained from the trigger outbox and deletes their outbox rows in the
    /// same transaction, which is what makes trigger capture exactly-once: the rows (and
    /// commit records) of the transactions drained completely, and of a transaction drained
    /// in part (`partial`: its xid and the last outbox id drained), its rows up to that id.
    /// The outbox lives in the log's database.
    pub async fn append_drained(
        &mut self,
        events: Vec<Event>,
        finished_xids: &[String],
        partial: Option<&(String, i64)>,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let batch = Batch::new(self.last_id, events)?;
        let statement = format!(
            "{}, drained AS (
                DELETE FROM rowcast.outbox
                 WHERE (xid = ANY($10::text[]::xid8[]) OR (xid = $11::text::xid8 AND id <= $12))
                   AND EXISTS (SELECT FROM fenced)
            ), finished AS (
                DELETE FROM rowcast.outbox_commits
                 WHERE xid = ANY($10::text[]::xid8[]) AND EXISTS (SELECT FROM fenced)
            )
            SELECT count(*) FROM appended",
            Batch::statement(self.body, Keys::None)
        );
        let arrays = batch.arrays();
        let mut params = arrays.params();
        let (partial_xid, partial_through) = match partial {
            Some((xid, through)) => (Some(xid.as_str()), *through),
            None => (None, 0),
        };
        params.extend::<[Param<'_>; 3]>([&finished_xids, &partial_xid, &partial_through]);
        batch.check(&bounded(self.client.query_one(&statement, &params)).await?)?;
        self.last_id = batch.last_id;
        Ok(batch.stored)
    }

    /// Appends application events (HTTP) in one statement, each with its idempotency key. A key
    /// the log already holds, or one repeated within `events`, appends nothing and answers
    /// with the original id. Does not move any source's cursor.
    pub async fn append_app(
        &mut self,
        events: Vec<KeyedEvent>,
    ) -> Result<(Vec<Appended>, Vec<StoredEvent>), LogError> {
        let keys: Vec<&str> = events.iter().filter_map(|e| e.key.as_deref()).collect();
        let mut known: HashMap<String, u64> = HashMap::new();
        if !keys.is_empty() {
            let rows = bounded(
                self.client
                    .query("SELECT key, id FROM rowcast.events WHERE key = ANY($1)", &[&keys]),
            )
            .await?;
            known.extend(rows.iter().map(|row| (row.get(0), row.get::<_, i64>(1) as u64)));
        }
        let mut answers = Vec::with_capacity(events.len());
        let mut fresh = Vec::new();
        let mut fresh_keys = Vec::new();
        let mut next_id = self.last_id;
        for KeyedEvent { key, event } in events {
            if let Some(&id) = key.as_ref().and_then(|key| known.get(key)) {
                answers.push(Appended { id, key, duplicate: true });
                continue;
            }
            next_id += 1;
            if let Some(key) = &key {
                known.insert(key.clone(), next_id);
            }
            answers.push(Appended { id: next_id, key: key.clone(), duplicate: false });
            fresh.push(event);
            fresh_keys.push(key);
        }
        if fresh.is_empty() {
            return Ok((answers, Vec::new()));
        }
        let batch = Batch::new(self.last_id, fresh)?;
        let statement =
            format!("{} SELECT count(*) FROM appended", Batch::statement(self.body, Keys::At(10)));
        let arrays = batch.arrays();
        let mut params = arrays.params();
        params.push(&fresh_keys);
        batch.check(&bounded(self.client.query_one(&statement, &params)).await?)?;
        self.last_id = batch.last_id;
        Ok((answers, batch.stored))
    }

    /// The writer's connection: the trigger source reads the outbox through it.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Events numbered and serialized for one append.
struct Batch {
    stored: Vec<StoredEvent>,
    times: Vec<std::time::SystemTime>,
    /// The head they were numbered after.
    previous: u64,
    last_id: u64,
}

/// The statement's parameters, borrowing from the batch: each body is serialized once and
/// never copied.
struct Arrays<'a> {
    ids: Vec<i64>,
    kinds: Vec<&'a str>,
    times: &'a [std::time::SystemTime],
    organizations: Vec<Option<&'a str>>,
    domains: Vec<Option<&'a str>>,
    severities: Vec<i16>,
    bodies: Vec<&'a str>,
    last_id: i64,
    previous: i64,
}

impl Batch {
    /// The common head of every append: the events (`$1..$7`), the new log head (`$8`), and
    /// the head they were numbered after (`$9`). The append is fenced on that head: when the
    /// log's head is elsewhere (an append sent before this one failed, or another writer got
    /// in), it stores nothing, and what the statement adds must check `fenced` too. Ends with
    /// `appended`, to be counted by [`Batch::check`]. Application events add their keys
    /// (`keys`).
    fn statement(body: &str, keys: Keys) -> String {
        let (column, array) = match keys {
            Keys::None => (String::new(), String::new()),
            Keys::At(n) => (", key".to_owned(), format!(", ${n}::text[]")),
        };
        format!("\
        WITH fenced AS (
            SELECT FROM rowcast.log_head WHERE last_id = $9
        ), appended AS (
            INSERT INTO rowcast.events (id, type, committed_at, organization_id, domain_id, severity, body{column})
            SELECT id, type, committed_at, organization_id, domain_id, severity, {body}{column}
              FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::smallint[], $7::text[]{array})
                   AS e(id, type, committed_at, organization_id, domain_id, severity, body{column})
             WHERE EXISTS (SELECT FROM fenced)
            RETURNING 1
        ), head AS (
            UPDATE rowcast.log_head SET last_id = $8 WHERE last_id = $9
        )")
    }

    /// The batch as consecutive batches of at most `max_bytes` of bodies each (an event
    /// bigger than that alone).
    fn split(self, max_bytes: usize) -> Vec<Batch> {
        let mut batches = Vec::new();
        let (mut stored, mut times, mut bytes, mut previous) =
            (Vec::new(), Vec::new(), 0, self.previous);
        for (event, time) in self.stored.into_iter().zip(self.times) {
            if !stored.is_empty() && bytes + event.json.len() > max_bytes {
                let last_id = previous + stored.len() as u64;
                let (stored, times) = (std::mem::take(&mut stored), std::mem::take(&mut times));
                batches.push(Batch { stored, times, previous, last_id });
                (previous, bytes) = (last_id, 0);
            }
            bytes += event.json.len();
            stored.push(event);
            times.push(time);
        }
        batches.push(Batch { stored, times, previous, last_id: self.last_id });
        batches
    }

    /// `SELECT count(*) FROM appended` stored the whole batch, or the head had moved.
    fn check(&self, row: &tokio_postgres::Row) -> Result<(), LogError> {
        match row.try_get::<_, i64>(0)? {
            count if count == self.stored.len() as i64 => Ok(()),
            _ => Err(LogError::HeadMoved(self.previous)),
        }
    }

    fn new(last_id: u64, events: Vec<Event>) -> Result<Self, LogError> {
        let mut stored = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        let mut id = last_id;
        for mut event in events {
            id += 1;
            event.id = id;
            let json = serde_json::to_string(&event)?.into();
            times.push(event.timestamp.to_system_time());
            stored.push(StoredEvent {
                id,
                event_type: event.event_type,
                organization_id: event.organization_id,
                domain_id: event.domain_id,
                severity: event.severity,
                timestamp: event.timestamp,
                json,
            });
        }
        Ok(Self { stored, times, previous: last_id, last_id: id })
    }

    fn arrays(&self) -> Arrays<'_> {
        let stored = &self.stored;
        Arrays {
            ids: stored.iter().map(|e| e.id as i64).collect(),
            kinds: stored.iter().map(|e| e.event_type.as_str()).collect(),
            times: &self.times,
            organizations: stored.iter().map(|e| e.organization_id.as_deref()).collect(),
            domains: stored.iter().map(|e| e.domain_id.as_deref()).collect(),
            severities: stored.iter().map(|e| e.severity.rank()).collect(),
            bodies: stored.iter().map(|e| &*e.json).collect(),
            last_id: self.last_id as i64,
            previous: self.previous as i64,
        }
    }
}

impl<'a> Arrays<'a> {
    fn params(&'a self) -> Vec<Param<'a>> {
        vec![
            &self.ids,
            &self.kinds,
            &self.times,
            &self.organizations,
            &self.domains,
            &self.severities,
            &self.bodies,
            &self.last_id,
            &self.previous,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Op, Severity, Source, Timestamp};

    fn events(sizes: &[usize]) -> Vec<Event> {
        sizes
            .iter()
            .map(|size| Event {
                id: 0,
                event_type: "thing.created".into(),
                timestamp: Timestamp(0),
                organization_id: None,
                domain_id: None,
                severity: Severity::Info,
                data: Some(serde_json::Map::from_iter([(
                    "pad".to_owned(),
                    "x".repeat(*size).into(),
                )])),
                old: None,
                changed: None,
                source: Source::Row { table: "t".into(), op: Op::Insert, lsn: None, xid: 1 },
            })
            .collect()
    }

    #[test]
    fn big_batches_split_by_bytes_into_consecutive_ids() {
        let batch = Batch::new(10, events(&[100, 100, 5000, 100, 100, 100])).expect("batch");
        let one = batch.stored[0].json.len();
        let batches = batch.split(3 * one);
        let spans: Vec<(u64, u64, Vec<u64>)> = batches
            .iter()
            .map(|b| (b.previous, b.last_id, b.stored.iter().map(|e| e.id).collect()))
            .collect();
        assert_eq!(
            spans,
            [(10, 12, vec![11, 12]), (12, 13, vec![13]), (13, 16, vec![14, 15, 16]),],
            "the big event goes alone; ids stay consecutive; each batch knows the head before it"
        );
        assert!(batches.iter().all(|b| b.times.len() == b.stored.len()));
        let whole = Batch::new(0, events(&[1, 2, 3])).expect("batch").split(usize::MAX);
        assert_eq!(whole.len(), 1);
        assert_eq!((whole[0].previous, whole[0].last_id), (0, 3));
    }
}
