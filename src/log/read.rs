//! Reading the log: history pages (REST, catch-up, replay) and counts, each from one snapshot.

use tokio_postgres::Client;

use super::{LogError, Param, StoredEvent};
use crate::filter::Filter;
use crate::model::{Severity, Timestamp};

/// Events as the bus takes them, from one snapshot: the oldest id the log holds (the next id
/// to be given when it is empty) and up to `limit` events after `after` (and up to `up_to`),
/// in id order.
pub async fn read_stored(
    client: &Client,
    after: u64,
    up_to: Option<u64>,
    limit: usize,
) -> Result<(u64, Vec<StoredEvent>), LogError> {
    let (after, up_to) =
        (after.min(i64::MAX as u64) as i64, up_to.map(|id| id.min(i64::MAX as u64) as i64));
    let limit = limit.min(i64::MAX as usize) as i64;
    let rows = client
        .query(
            "SELECT o.oldest, e.id, e.type, e.organization_id, e.domain_id, e.severity,
                    e.committed_at, e.body
               FROM (SELECT coalesce((SELECT min(id) FROM rowcast.events),
                                     (SELECT last_id + 1 FROM rowcast.log_head)) AS oldest) o
               LEFT JOIN LATERAL (
                   SELECT id, type, organization_id, domain_id, severity, committed_at,
                          body::text AS body
                     FROM rowcast.events
                    WHERE id > $1 AND ($2::bigint IS NULL OR id <= $2)
                    ORDER BY id LIMIT $3) e ON true
              ORDER BY e.id",
            &[&after, &up_to, &limit],
        )
        .await?;
    let mut oldest = 0;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        oldest = row.try_get::<_, i64>(0)? as u64;
        let Some(id) = row.try_get::<_, Option<i64>>(1)? else { continue };
        events.push(StoredEvent {
            id: id as u64,
            event_type: row.try_get(2)?,
            organization_id: row.try_get(3)?,
            domain_id: row.try_get(4)?,
            severity: Severity::from_rank(row.try_get(5)?),
            timestamp: Timestamp::from_system_time(row.try_get(6)?),
            json: row.try_get::<_, String>(7)?.into(),
        });
    }
    Ok((oldest, events))
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
pub async fn read(client: &Client, filter: &Filter, range: &Range) -> Result<Page, LogError> {
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
                ORDER BY id LIMIT $13) e ON true
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

/// The id of the oldest of the last `count` events matching `filter` with ids up to `up_to`
/// (where a `history` subscription starts); `None` when none match.
pub async fn oldest_of_last(
    client: &Client,
    filter: &Filter,
    up_to: u64,
    count: usize,
) -> Result<Option<u64>, LogError> {
    let statement = format!(
        "SELECT min(id) FROM (SELECT id FROM rowcast.events WHERE id <= $1 AND {}
                               ORDER BY id DESC LIMIT $10) last",
        crate::filter::sql_condition(2)
    );
    let sql = filter.sql();
    let up_to = up_to.min(i64::MAX as u64) as i64;
    let count = count.min(i64::MAX as usize) as i64;
    let mut params: Vec<Param<'_>> = vec![&up_to];
    params.extend(sql.params());
    params.push(&count);
    let row = client.query_one(&statement, &params).await?;
    Ok(row.get::<_, Option<i64>>(0).map(|id| id as u64))
}

/// How many events match `filter` in `[from, to)`.
pub async fn count(
    client: &Client,
    filter: &Filter,
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
