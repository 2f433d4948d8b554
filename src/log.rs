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

use tokio_postgres::{Client, NoTls};

use crate::event::{Event, Position, Severity, Timestamp};

/// Advisory lock key held by the single writer of a log ("rowcast" in ASCII).
const WRITER_LOCK: i64 = 0x0072_6f77_6361_7374;

/// Most events one retention delete removes, so a large backlog is never one long transaction.
const TRIM_BATCH: i64 = 10_000;

pub const SCHEMA_SQL: &str = include_str!("../migrations/rowcast.sql");

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("another rowcast publisher is writing to this event log")]
    Locked,
    #[error("serializing event: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl LogError {
    pub fn is_retryable(&self) -> bool {
        match self {
            // A lost connection or a restarting server; an undefined table is a setup problem.
            LogError::Postgres(err) => err.code().is_none_or(|code| !code.code().starts_with("42")),
            LogError::Locked => true,
            LogError::Serialize(_) => false,
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
    pub kind: String,
    pub organization_id: Option<String>,
    pub domain_id: Option<String>,
    pub severity: Severity,
    /// Commit time of the source transaction.
    pub timestamp: Timestamp,
    /// The envelope, serialized once and shared by every reader.
    pub json: std::sync::Arc<str>,
}

/// Connects with a background connection task; errors of that task end the client.
pub async fn connect(
    config: &tokio_postgres::Config,
    role: &'static str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(connection = role, error = %err, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Installs the log's schema (idempotent).
pub async fn install(client: &Client) -> Result<(), LogError> {
    client.batch_execute(SCHEMA_SQL).await?;
    Ok(())
}

/// The single writer of the log.
pub struct LogWriter {
    client: Client,
    source: String,
    last_id: u64,
    cursor: Cursor,
}

impl LogWriter {
    /// Takes the writer lock and reads the head and `source`'s cursor.
    pub async fn open(config: &tokio_postgres::Config, source: &str) -> Result<Self, LogError> {
        let client = connect(config, "log writer").await?;
        // The slot is acknowledged once an append commits: that commit must be on disk.
        client.batch_execute("SET synchronous_commit = on").await?;
        let locked: bool =
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK]).await?.get(0);
        if !locked {
            return Err(LogError::Locked);
        }
        let last_id: i64 =
            client.query_one("SELECT last_id FROM rowcast.log_head", &[]).await?.get(0);
        let cursor = client
            .query_opt(
                "SELECT position_major, position_minor, progress FROM rowcast.cursors WHERE source = $1",
                &[&source],
            )
            .await?
            .map(|row| Cursor {
                position: Position { major: row.get::<_, i64>(0) as u64, minor: row.get::<_, i64>(1) as u64 },
                progress: row.get::<_, i64>(2) as u64,
            })
            .unwrap_or_default();
        Ok(Self { client, source: source.to_owned(), last_id: last_id as u64, cursor })
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Up to `limit` stored events after `after`, in id order, as the bus takes them.
    pub async fn read_after(&self, after: u64, limit: i64) -> Result<Vec<StoredEvent>, LogError> {
        let rows = self
            .client
            .query(
                "SELECT id, type, organization_id, domain_id, severity, committed_at, body::text
                   FROM rowcast.events WHERE id > $1 ORDER BY id LIMIT $2",
                &[&(after.min(i64::MAX as u64) as i64), &limit],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| StoredEvent {
                id: row.get::<_, i64>(0) as u64,
                kind: row.get(1),
                organization_id: row.get(2),
                domain_id: row.get(3),
                severity: Severity::from_rank(row.get(4)),
                timestamp: Timestamp::from_system_time(row.get(5)),
                json: row.get::<_, String>(6).into(),
            })
            .collect())
    }

    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Appends `events` (those after the cursor's position) and moves the cursor, in one
    /// transaction. `progress` is the source position the batch completes, if any.
    pub async fn append(
        &mut self,
        events: Vec<(Position, Event)>,
        progress: Option<u64>,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let mut cursor = self.cursor;
        if let Some(progress) = progress {
            cursor.progress = cursor.progress.max(progress);
        }
        let mut fresh = Vec::with_capacity(events.len());
        for (position, event) in events {
            if position <= self.cursor.position {
                continue;
            }
            cursor.position = position;
            fresh.push(event);
        }
        if fresh.is_empty() {
            // Progress alone need not be written: after a restart the source re-sends from the
            // last written progress and everything up to the position is dropped again.
            self.cursor.progress = cursor.progress;
            return Ok(Vec::new());
        }
        let batch = Batch::new(self.last_id, fresh)?;
        let statement = format!(
            "{}, moved AS (
                INSERT INTO rowcast.cursors (source, position_major, position_minor, progress)
                VALUES ($9, $10, $11, $12)
                ON CONFLICT (source) DO UPDATE SET position_major = excluded.position_major,
                    position_minor = excluded.position_minor, progress = excluded.progress, updated_at = now()
            )
            SELECT count(*) FROM appended",
            Batch::STATEMENT
        );
        let arrays = batch.arrays();
        let mut params = arrays.params();
        let (major, minor, progress) =
            (cursor.position.major as i64, cursor.position.minor as i64, cursor.progress as i64);
        params.extend::<[Param<'_>; 4]>([&self.source, &major, &minor, &progress]);
        self.client.query_one(&statement, &params).await?;
        self.last_id = batch.last_id;
        self.cursor = cursor;
        Ok(batch.stored)
    }

    /// Appends events drained from the trigger outbox and deletes their outbox rows (and the
    /// commit records of transactions drained completely) in the same transaction, which is
    /// what makes trigger capture exactly-once. The outbox lives in the log's database.
    pub async fn append_drained(
        &mut self,
        events: Vec<Event>,
        outbox_ids: &[i64],
        finished_xids: &[String],
    ) -> Result<Vec<StoredEvent>, LogError> {
        let batch = Batch::new(self.last_id, events)?;
        let statement = format!(
            "{}, drained AS (
                DELETE FROM rowcast.outbox WHERE id = ANY($9)
            ), finished AS (
                DELETE FROM rowcast.outbox_commits WHERE xid = ANY($10::text[]::xid8[])
            )
            SELECT count(*) FROM appended",
            Batch::STATEMENT
        );
        let arrays = batch.arrays();
        let mut params = arrays.params();
        params.extend::<[Param<'_>; 2]>([&outbox_ids, &finished_xids]);
        self.client.query_one(&statement, &params).await?;
        self.last_id = batch.last_id;
        Ok(batch.stored)
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
}

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

impl Batch {
    /// The common head of every append: the events (`$1..$7`) and the new log head (`$8`).
    const STATEMENT: &'static str = "\
        WITH appended AS (
            INSERT INTO rowcast.events (id, type, committed_at, organization_id, domain_id, severity, body)
            SELECT id, type, committed_at, organization_id, domain_id, severity, body::json
              FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::smallint[], $7::text[])
                   AS e(id, type, committed_at, organization_id, domain_id, severity, body)
            RETURNING 1
        ), head AS (
            UPDATE rowcast.log_head SET last_id = greatest(last_id, $8)
        )";

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
                kind: event.kind,
                organization_id: event.organization_id,
                domain_id: event.domain_id,
                severity: event.severity,
                timestamp: event.timestamp,
                json,
            });
        }
        Ok(Self { stored, times, last_id: id })
    }

    fn arrays(&self) -> Arrays<'_> {
        let stored = &self.stored;
        Arrays {
            ids: stored.iter().map(|e| e.id as i64).collect(),
            kinds: stored.iter().map(|e| e.kind.as_str()).collect(),
            times: &self.times,
            organizations: stored.iter().map(|e| e.organization_id.as_deref()).collect(),
            domains: stored.iter().map(|e| e.domain_id.as_deref()).collect(),
            severities: stored.iter().map(|e| e.severity.rank()).collect(),
            bodies: stored.iter().map(|e| &*e.json).collect(),
            last_id: self.last_id as i64,
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
        ]
    }
}

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

/// What a history read asks for: events after `after` (and up to `up_to`), committed in
/// `[from, to)`, matching `filter`, at most `limit`.
#[derive(Debug, Clone)]
pub struct Range {
    pub after: u64,
    pub up_to: Option<u64>,
    pub from: Option<std::time::SystemTime>,
    pub to: Option<std::time::SystemTime>,
    pub limit: usize,
}

/// A page of history.
#[derive(Debug, Default)]
pub struct Page {
    /// The oldest id the log still holds (the next id to be given when it is empty): a cursor
    /// below `oldest - 1` lost events to retention.
    pub oldest: u64,
    /// `(id, envelope)` in id order.
    pub events: Vec<(u64, String)>,
    /// The commit time of each event, in the same order.
    pub committed_at: Vec<std::time::SystemTime>,
}

/// Reads a page of history; the page and `oldest` come from one snapshot.
pub async fn read(
    client: &Client,
    filter: &crate::filter::Filter,
    range: &Range,
) -> Result<Page, LogError> {
    let statement = format!(
        "SELECT o.oldest, e.id, e.body, e.committed_at
           FROM (SELECT coalesce((SELECT min(id) FROM rowcast.events),
                                 (SELECT last_id + 1 FROM rowcast.log_head)) AS oldest) o
           LEFT JOIN LATERAL (
               SELECT id, body::text AS body, committed_at FROM rowcast.events
                WHERE id > $1 AND ($2::bigint IS NULL OR id <= $2)
                  AND ($3::timestamptz IS NULL OR committed_at >= $3)
                  AND ($4::timestamptz IS NULL OR committed_at < $4)
                  AND {}
                ORDER BY id LIMIT $12) e ON true
          ORDER BY e.id",
        crate::filter::sql_condition(5)
    );
    let sql = filter.sql();
    let (after, up_to) = (
        range.after.min(i64::MAX as u64) as i64,
        range.up_to.map(|id| id.min(i64::MAX as u64) as i64),
    );
    let limit = range.limit.min(i64::MAX as usize) as i64;
    let mut params: Vec<Param<'_>> = vec![&after, &up_to, &range.from, &range.to];
    params.extend(sql.params());
    params.push(&limit);
    let rows = client.query(&statement, &params).await?;
    let mut page = Page::default();
    for row in rows {
        page.oldest = row.get::<_, i64>(0) as u64;
        if let (Some(id), Some(body), Some(at)) = (
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<std::time::SystemTime>>(3),
        ) {
            page.events.push((id as u64, body));
            page.committed_at.push(at);
        }
    }
    Ok(page)
}

/// How many events match `filter` in `[from, to)`.
pub async fn count(
    client: &Client,
    filter: &crate::filter::Filter,
    from: std::time::SystemTime,
    to: std::time::SystemTime,
) -> Result<u64, LogError> {
    let statement = format!(
        "SELECT count(*) FROM rowcast.events
          WHERE committed_at >= $1 AND committed_at < $2 AND {}",
        crate::filter::sql_condition(3)
    );
    let sql = filter.sql();
    let mut params: Vec<Param<'_>> = vec![&from, &to];
    params.extend(sql.params());
    let row = client.query_one(&statement, &params).await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The organizations and domains the log's events carry, for metadata.
pub async fn scopes(client: &Client) -> Result<Vec<(String, Option<String>)>, LogError> {
    let rows = client
        .query(
            "SELECT DISTINCT organization_id, domain_id FROM rowcast.events
              WHERE organization_id IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The last id ever given.
pub async fn head(client: &Client) -> Result<u64, LogError> {
    let row = client.query_one("SELECT last_id FROM rowcast.log_head", &[]).await?;
    Ok(row.get::<_, i64>(0) as u64)
}
