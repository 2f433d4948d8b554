//! The reads of the event log that deliveries make: catch-up pages, where `history` starts,
//! replay pages and replay counts.
//!
//! Sessions (WebSocket and Postgres-protocol alike) read the log through [`History`] rather
//! than the readers' pool so their logic can be driven from memory in unit tests; the server's
//! implementation, [`EventLog`], is [`super::read`] and [`super::count`] on a pooled
//! connection and nothing more. Each call takes a connection from the pool: every page is its
//! own snapshot anyway (the hand-off to live never relies on two pages agreeing), so nothing is
//! gained by holding one.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{LogError, Page, Range};
use crate::filter::Filter;
use crate::pg::Pool;

/// The event log as a session reads it.
pub trait History: Send + Sync + 'static {
    /// Matching events in `range`, in id order, and the oldest id the log still holds.
    fn read(
        &self,
        filter: &Filter,
        range: &Range,
    ) -> impl Future<Output = Result<Page, LogError>> + Send;

    /// The id of the oldest of the last `count` events matching `filter` up to `up_to`;
    /// `None` when none match.
    fn oldest_of_last(
        &self,
        filter: &Filter,
        up_to: u64,
        count: usize,
    ) -> impl Future<Output = Result<Option<u64>, LogError>> + Send;

    /// How many events match `filter` in `[from, to)`.
    fn count(
        &self,
        filter: &Filter,
        from: SystemTime,
        to: SystemTime,
    ) -> impl Future<Output = Result<u64, LogError>> + Send;
}

/// The log in Postgres, read through the server's readers' pool (`AppState::log`).
#[derive(Clone)]
pub struct EventLog(pub Arc<Pool>);

impl EventLog {
    /// A page for a client waiting on it (a history request, a `SELECT`): all within `limit`,
    /// connecting included. A connection that did not answer in time leaves the pool
    /// ([`Pool::within`]), and the caller says "unavailable" instead of hanging.
    pub async fn read_within(
        &self,
        limit: Duration,
        filter: &Filter,
        range: &Range,
    ) -> Result<Page, LogError> {
        match self.0.within(limit, async |client| super::read(client, filter, range).await).await {
            Some(Ok(read)) => read,
            Some(Err(err)) => Err(err.into()),
            None => Err(LogError::TimedOut(limit)),
        }
    }
}

impl History for EventLog {
    async fn read(&self, filter: &Filter, range: &Range) -> Result<Page, LogError> {
        let client = self.0.get().await?;
        super::read(&client, filter, range).await
    }

    async fn oldest_of_last(
        &self,
        filter: &Filter,
        up_to: u64,
        count: usize,
    ) -> Result<Option<u64>, LogError> {
        let client = self.0.get().await?;
        super::oldest_of_last(&client, filter, up_to, count).await
    }

    async fn count(
        &self,
        filter: &Filter,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<u64, LogError> {
        let client = self.0.get().await?;
        super::count(&client, filter, from, to).await
    }
}
