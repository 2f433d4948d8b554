//! Trigger capture (SPEC §2): drains the outbox that `triggers/capture.sql` fills into the
//! event log, for databases without logical replication.
//!
//! ```text
//!   app txn --trigger--> rowcast.outbox (+ commit number at COMMIT) --NOTIFY if the drain waits--+
//!                                                                                               v
//!   log <--append + delete, one transaction-- drain (commit order) <------------ LISTEN / poll timer
//! ```
//!
//! Guarantees: every committed change is appended exactly once: the drained outbox rows are
//! deleted in the transaction that appends their events, so a crash at any point leaves them
//! either drained and gone or still there. Transactions are drained in the order they were
//! numbered at commit, each contiguous (a large one continues across batches before anything
//! else), so the changes of one row keep their commit order. Notifications are only a wake-up:
//! the outbox itself is the truth, so a notification lost while the listener was disconnected
//! costs at most one poll interval, and every (re)start drains whatever is waiting. A commit
//! notifies only while the drain waits (holds the wake-up lock): notifications serialize
//! commits, and a busy drain needs none. Rows arrive as `row_to_json` text (cheaper for the
//! application's transaction than `to_jsonb`) and leave as `to_jsonb` would have written them
//! ([`jsonb_row`]).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::render::jsonb_row;
use crate::log::app::{self, AppendRequest};
use crate::log::{LogError, LogWriter, StoredEvent};
use crate::mapping::Mapping;
use crate::model::{Change, Op, Row, Source, TableName, Timestamp, Via};

/// The NOTIFY channel the capture function signals.
pub const CHANNEL: &str = "rowcast";

/// How long the drain keeps looking, without asking for wake-ups, after it last found work;
/// and how often it looks meanwhile. A busy application's commits then rarely notify.
const LINGER: Duration = Duration::from_millis(20);
const LINGER_POLL: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("trigger capture: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the LISTEN connection was lost")]
    ListenerLost,
    #[error("outbox row {id}: {problem}")]
    Row { id: i64, problem: String },
}

impl TriggerError {
    pub fn is_retryable(&self) -> bool {
        match self {
            // An undefined table or function means setup was not run: definite.
            TriggerError::Postgres(err) => crate::pg::is_transient(err),
            TriggerError::Log(err) => err.is_retryable(),
            TriggerError::ListenerLost => true,
            TriggerError::Row { .. } => false,
        }
    }
}

pub struct TriggerSettings {
    /// The database whose outbox is drained (and listened to).
    pub source: crate::pg::Target,
    /// Most outbox rows per log transaction.
    pub batch_size: usize,
    /// How often the outbox is checked without a notification.
    pub poll_interval: Duration,
}

/// Listens and drains until `shutdown`. `appended` sees each batch once it is committed.
pub async fn run(
    writer: &mut LogWriter,
    mut inbox: Option<&mut mpsc::Receiver<AppendRequest>>,
    mapping: &Mapping,
    settings: &TriggerSettings,
    mut appended: impl FnMut(&[StoredEvent]),
    ready: impl FnOnce(),
    shutdown: &CancellationToken,
) -> Result<(), TriggerError> {
    // Held for the whole drain: the LISTEN connection (and the wake-up lock) end with it.
    let (listener, mut wake) = listen_on(&settings.source).await?;
    let mut waiting = WakeLock { listener: &listener, held: false };
    ready();
    let mut drain = Drain::new();
    let mut busy_until = Instant::now();
    loop {
        // Drain first: whatever committed while nobody listened is waiting.
        if drain.batch(writer, mapping, settings.batch_size, &mut appended).await? {
            // Busy: committing transactions need not wake the drain.
            waiting.release().await?;
            busy_until = Instant::now() + LINGER;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Application events between transactions, so a busy outbox does not starve them.
            if drain.current.is_none()
                && let Some(inbox) = inbox.as_deref_mut()
            {
                while let Ok(request) = inbox.try_recv() {
                    appended(&app::serve(writer, request).await?);
                }
            }
            continue;
        }
        if !waiting.held {
            if Instant::now() < busy_until {
                // Empty just after work: more is likely on its way, and asking for wake-ups now
                // would make the next commits notify (and wait for each other).
                tokio::time::sleep(LINGER_POLL).await;
                continue;
            }
            // Empty. Ask for wake-ups, then look once more: every transaction that committed
            // without notifying has finished committing once the lock is ours.
            waiting.acquire().await?;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            woken = wake.recv() => if woken.is_none() {
                return Err(TriggerError::ListenerLost);
            },
            Some(request) = async {
                match inbox.as_deref_mut() {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            } => appended(&app::serve(writer, request).await?),
            _ = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
}

/// Drains everything the outbox holds now, once (a switch away from triggers, after the
/// triggers are gone). Returns how many events were appended.
pub async fn drain_all(
    writer: &mut LogWriter,
    mapping: &Mapping,
    batch_size: usize,
) -> Result<usize, TriggerError> {
    let mut drain = Drain::new();
    let mut appended = 0;
    let mut count = |stored: &[StoredEvent]| appended += stored.len();
    while drain.batch(writer, mapping, batch_size, &mut count).await? {}
    Ok(appended)
}

/// The listener: its own connection, whose notifications arrive on the returned channel; the
/// channel closes when the connection ends. The connection lives as long as the returned
/// client: dropping it ends the LISTEN.
async fn listen_on(
    source: &crate::pg::Target,
) -> Result<(tokio_postgres::Client, mpsc::Receiver<()>), TriggerError> {
    let (client, wake) = crate::pg::connect_notified(source, "listener").await?;
    // How long taking the wake-up lock may wait for a transaction's commit (see `WakeLock`).
    client.batch_execute(&format!("SET lock_timeout = '100ms'; LISTEN {CHANNEL}")).await?;
    Ok((client, wake))
}

/// The wake-up lock (`rowcast.wake_lock()` in `capture.sql`), held on the LISTEN connection
/// while the drain waits: a committing transaction notifies only when it cannot take the lock
/// shared. NOTIFY serializes the commits that send one, so a busy drain does without them.
struct WakeLock<'a> {
    listener: &'a tokio_postgres::Client,
    held: bool,
}

impl WakeLock<'_> {
    /// Takes the lock once every transaction that found it free has committed. A transaction
    /// that holds it longer (one that numbers its commit at its first change) makes this give
    /// up after the listener's `lock_timeout`; the drain then looks again, as a poll would.
    async fn acquire(&mut self) -> Result<(), TriggerError> {
        match self.listener.execute("SELECT pg_advisory_lock(rowcast.wake_lock())", &[]).await {
            Ok(_) => self.held = true,
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
            Err(err) => return Err(err.into()),
        }
        Ok(())
    }

    async fn release(&mut self) -> Result<(), TriggerError> {
        if self.held {
            self.listener.execute("SELECT pg_advisory_unlock(rowcast.wake_lock())", &[]).await?;
            self.held = false;
        }
        Ok(())
    }
}

/// Drain state: the transaction a full batch stopped in, which the next batch finishes first.
struct Drain {
    current: Option<String>,
    /// Whether commit records may be left whose transactions were drained: a transaction a
    /// full batch stopped in is not deleted with it, in case it goes on. (At the start, an
    /// earlier process may have left some.)
    stale_commits: bool,
}

const DRAIN_SQL: &str = "\
    SELECT o.id, c.xid::text, o.at, o.table_schema, o.table_name, o.op, o.new_row::text, o.old_row::text
      FROM rowcast.outbox_commits c JOIN rowcast.outbox o ON o.xid = c.xid
     ORDER BY (c.xid::text = $1) DESC, c.seq, o.id
     LIMIT $2";

impl Drain {
    fn new() -> Drain {
        Drain { current: None, stale_commits: true }
    }

    /// Appends one batch; `false` when the outbox had nothing.
    async fn batch(
        &mut self,
        writer: &mut LogWriter,
        mapping: &Mapping,
        batch_size: usize,
        appended: &mut impl FnMut(&[StoredEvent]),
    ) -> Result<bool, TriggerError> {
        let current = self.current.clone().unwrap_or_default();
        let rows = writer.client().query(DRAIN_SQL, &[&current, &(batch_size as i64)]).await?;
        if rows.is_empty() {
            self.current = None;
            if !std::mem::take(&mut self.stale_commits) {
                return Ok(false);
            }
            // Commit records whose transactions were drained at a batch boundary.
            writer
                .client()
                .execute(
                    "DELETE FROM rowcast.outbox_commits c
                      WHERE NOT EXISTS (SELECT 1 FROM rowcast.outbox o WHERE o.xid = c.xid)",
                    &[],
                )
                .await?;
            return Ok(false);
        }
        let full = rows.len() == batch_size;
        // Each transaction's rows, in id order; (xid, its last id here).
        let mut xids: Vec<(String, i64)> = Vec::new();
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            let xid: String = row.get(1);
            match outbox_row(row, id, &xid)? {
                OutboxRow::Change(change) => {
                    if let Some(entity) = mapping.entity_for(&change.table) {
                        events.extend(entity.events(change));
                    }
                }
                OutboxRow::Emitted { payload, timestamp, xid } => {
                    let source = Source::App { via: Via::Sql, lsn: None, xid: Some(xid) };
                    match mapping.sql_event(payload.as_bytes(), timestamp, source) {
                        Ok(event) => events.push(event),
                        // As in replication mode: committed, so nothing to refuse.
                        Err(err) => {
                            tracing::error!(outbox_id = id, error = %err, "an outbox emit row that is not an event was skipped")
                        }
                    }
                }
            }
            match xids.last_mut() {
                Some((last, through)) if *last == xid => *through = id,
                _ => xids.push((xid, id)),
            }
        }
        // The last transaction of a full batch may go on in the next one: of it, only the rows
        // drained here go.
        let partial = if full { xids.pop() } else { None };
        let finished: Vec<String> = xids.into_iter().map(|(xid, _)| xid).collect();
        let stored = writer.append_drained(events, &finished, partial.as_ref()).await?;
        self.current = partial.map(|(xid, _)| xid);
        self.stale_commits |= self.current.is_some();
        appended(&stored);
        Ok(true)
    }
}

/// What one outbox row holds.
enum OutboxRow {
    Change(Change),
    /// A `rowcast.emit()` call: its payload as the function wrote it.
    Emitted {
        payload: String,
        timestamp: Timestamp,
        xid: u64,
    },
}

fn outbox_row(row: &tokio_postgres::Row, id: i64, xid: &str) -> Result<OutboxRow, TriggerError> {
    let problem = |problem: String| TriggerError::Row { id, problem };
    let parse_row = |text: Option<&str>| -> Result<Option<Row>, TriggerError> {
        text.map(|t| jsonb_row(t).map_err(|e| problem(format!("row is not a JSON object: {e}"))))
            .transpose()
    };
    // The 32-bit transaction id, as replication reports it (xid8 adds the epoch above).
    let xid = xid.parse::<u64>().map_err(|_| problem(format!("bad transaction id {xid:?}")))?
        & 0xffff_ffff;
    let timestamp = Timestamp::from_system_time(row.get(2));
    let op = match row.get::<_, &str>(5) {
        "emit" => {
            let payload = row
                .get::<_, Option<String>>(6)
                .ok_or_else(|| problem("an emitted event without its payload".into()))?;
            return Ok(OutboxRow::Emitted { payload, timestamp, xid });
        }
        "insert" => Op::Insert,
        "update" => Op::Update,
        "delete" => Op::Delete,
        "truncate" => Op::Truncate,
        other => return Err(problem(format!("unknown operation {other:?}"))),
    };
    let (Some(schema), Some(table)) =
        (row.get::<_, Option<String>>(3), row.get::<_, Option<String>>(4))
    else {
        return Err(problem("a row change without its table".into()));
    };
    Ok(OutboxRow::Change(Change {
        table: TableName::new(schema, table),
        op,
        new: parse_row(row.get(6))?,
        old: parse_row(row.get(7))?,
        timestamp,
        lsn: None,
        xid,
    }))
}
