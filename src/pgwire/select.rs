//! `SELECT ... FROM events`: history pages from the log, streamed as rows.
//!
//! The rows are the log's as of the query's start (ids up to the bus head then), read page by
//! page with the same SQL as the history API (`log::read` through [`History`]), so a query
//! answers what `GET /api/events` answers for the same filter, and a long one holds neither a
//! snapshot nor all of its rows in memory. Severity sets the filter cannot say are checked per
//! row; `LIMIT` counts the rows sent.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};
use pgwire::api::results::{DataRowEncoder, FieldInfo};
use pgwire::error::PgWireResult;
use pgwire::messages::data::DataRow;

use super::rows;
use super::sql::{Column, Conditions};
use super::{Context, error};
use crate::filter::Filter;
use crate::log::Range;
use crate::model::Severity;

/// Events per log read.
const PAGE: usize = 500;
/// The longest one page may take before the query fails (SQLSTATE 58000; try again).
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a history query reads: its confined filter, its range and how many rows at most.
pub struct Query {
    pub filter: Filter,
    pub conditions: Conditions,
    pub columns: Vec<Column>,
    pub limit: Option<u64>,
}

struct Reading {
    context: Arc<Context>,
    query: Query,
    encoder: DataRowEncoder,
    after: u64,
    up_to: u64,
    left: u64,
    done: bool,
}

/// The rows of `query`, in id order, as the driver asked for them (`fields`).
pub fn rows(
    context: Arc<Context>,
    query: Query,
    fields: Arc<Vec<FieldInfo>>,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static {
    let head = context.bus.head();
    let up_to = query.conditions.up_to.map_or(head, |up_to| up_to.min(head));
    let reading = Reading {
        after: query.conditions.after,
        left: query.limit.unwrap_or(u64::MAX),
        done: false,
        up_to,
        encoder: DataRowEncoder::new(fields),
        context,
        query,
    };
    stream::unfold(reading, |mut reading| async move {
        if reading.done || reading.left == 0 || reading.after >= reading.up_to {
            return None;
        }
        let page = reading.page().await;
        if page.is_err() {
            reading.done = true;
        }
        let rows = match page {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(err) => vec![Err(err)],
        };
        Some((stream::iter(rows), reading))
    })
    .flatten()
}

impl Reading {
    /// The rows of the next page.
    async fn page(&mut self) -> PgWireResult<Vec<DataRow>> {
        let conditions = &self.query.conditions;
        let range = Range {
            after: self.after,
            up_to: Some(self.up_to),
            from: conditions.from,
            to: conditions.to,
            limit: PAGE,
        };
        let read = self.context.history.read_within(PAGE_TIMEOUT, &self.query.filter, &range);
        let page = read.await.map_err(|err| {
            tracing::warn!(error = %err, "event log query failed");
            unavailable()
        })?;
        if page.events.len() < PAGE {
            self.done = true;
        }
        let mut rows = Vec::with_capacity(page.events.len());
        for (id, envelope) in page.events {
            self.after = id;
            if self.left == 0 {
                break;
            }
            let Ok(envelope) = serde_json::from_str::<serde_json::Value>(&envelope) else {
                tracing::warn!(id, "an envelope in the log is not JSON; skipped");
                continue;
            };
            let severity = envelope.get("severity").and_then(|s| s.as_str());
            let severity = severity.and_then(|s| s.parse::<Severity>().ok());
            if !severity.is_some_and(|s| conditions.severities.allows(s)) {
                continue;
            }
            rows.push(rows::encode(&mut self.encoder, &self.query.columns, &envelope)?);
            self.left -= 1;
        }
        Ok(rows)
    }
}

fn unavailable() -> pgwire::error::PgWireError {
    error("58000", "the event log is unavailable; try again")
}
