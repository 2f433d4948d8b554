//! Catch-up (SPEC §5, `since` and `history`): history from the log for a new subscription,
//! then the hand-off to live delivery without a gap or a duplicate. Transport-free: the
//! WebSocket session and the Postgres-protocol `SUBSCRIBE` both run it over their mailbox.
//!
//! ```text
//!   bus.subscribe(since)  ── subscribed {last_id: N}; the bus buffers matches above N
//!   (history: M) since := just before the oldest of the last M matches up to N
//!   history.read (since, N], page by page ──> events, oldest first
//!   Notice::CaughtUp {last_id: N}
//!   bus.go_live(cursor) ── Live: buffered matches above the cursor are queued, then live ones
//!                       └─ Behind(head): the buffer overflowed; read (cursor, head] and ask again
//! ```
//!
//! The bus decides when the subscription is live, under its lock, from the cursor the log
//! reads reached: that is what makes the hand-off exact however busy the log is. History is
//! pushed with [`Outbound::push_paced`], so a long catch-up waits for the writer instead of
//! overflowing the queue, and leaves room for the connection's live frames. History counts
//! for nothing in the connection's lag (`--max-lag`): the client asked for it.
//!
//! What the client is told (`caught_up`, `reset`) goes into the mailbox as [`Notice`]s; each
//! transport's writer says it in its own words.
//!
//! A connection that falls behind catches up the same way, for all its subscriptions at
//! once: `lag.rs`, which reads its pages with [`read_page`] too.

use std::sync::Arc;

use super::mailbox::{Frame, Notice, Outbound, Rejected};
use super::{Bus, ConnectionId, GoLive, SubscriptionId};
use crate::backoff::Backoff;
use crate::filter::Filter;
use crate::log::{History, Page, Range};

/// Events per catch-up read.
pub(super) const CATCH_UP_PAGE: usize = 500;
/// The first wait before a failed catch-up read is tried again; it doubles up to the max.
const CATCH_UP_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const CATCH_UP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// What a catch-up reads from and hands over to: the bus and the log. A session's context.
pub trait Sources: Send + Sync + 'static {
    type History: History;
    fn bus(&self) -> &Bus;
    fn history(&self) -> &Self::History;
}

/// Where a catch-up starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this id (`since`).
    Since(u64),
    /// With the last this many matching events up to `last_id` (`history`).
    Last(usize),
}

/// Sends history from the log to a new subscription with `since`, then makes it live.
///
/// Events `since < id <= last_id` (the `subscribed.last_id`) come first, then `caught_up`.
/// Events published while reading are read from the log too, until the bus head equals the
/// cursor under the bus lock: only then does the subscription go live, so the hand-off has
/// no gap and no duplicate.
pub struct CatchUp<S> {
    pub sources: Arc<S>,
    pub connection: ConnectionId,
    pub subscription: SubscriptionId,
    pub filter: Arc<Filter>,
    pub outbound: Arc<Outbound>,
}

impl<S: Sources> CatchUp<S> {
    pub async fn run(self, start: Start, last_id: u64) {
        let since = match start {
            Start::Since(since) => since,
            Start::Last(count) => match self.history_start(last_id, count).await {
                Some(since) => since,
                None => return,
            },
        };
        let mut cursor = since;
        if since > last_id {
            // A cursor from a log this one never had (or a different database).
            let notice = Notice::Reset {
                subscription: self.subscription,
                reason: "cursor_ahead",
                oldest: last_id + 1,
            };
            if self.push(Frame::Notice(notice)).await.is_err() {
                return;
            }
            cursor = last_id;
        }
        let mut target = last_id;
        let mut caught_up = false;
        loop {
            while cursor < target {
                let Some(next) = self.read(cursor, target).await else { return };
                cursor = next;
            }
            if !caught_up {
                caught_up = true;
                let notice = Notice::CaughtUp { subscription: self.subscription, last_id };
                if self.push(Frame::Notice(notice)).await.is_err() {
                    return;
                }
            }
            match self.sources.bus().go_live(self.connection, self.subscription, cursor) {
                GoLive::Live | GoLive::Gone => return,
                GoLive::Behind(head) => target = head,
                GoLive::Wait(bytes) => {
                    if self.outbound.room(bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The cursor just before the oldest of the last `count` matching events up to `last_id`
    /// (`last_id` when none match), retried while the log fails; `None` once the connection
    /// is closing.
    async fn history_start(&self, last_id: u64, count: usize) -> Option<u64> {
        let (history, filter) = (self.sources.history(), &*self.filter);
        let oldest = retrying(self.connection, &self.outbound, || {
            history.oldest_of_last(filter, last_id, count)
        })
        .await?;
        Some(oldest.map_or(last_id, |id| id.saturating_sub(1)))
    }

    /// Sends one page after `cursor`; returns the new cursor, `None` when the connection is
    /// closing.
    async fn read(&self, cursor: u64, target: u64) -> Option<u64> {
        let range = span(cursor, target, CATCH_UP_PAGE);
        let page = read_page(&*self.sources, self.connection, &self.outbound, &self.filter, &range)
            .await?;
        if page.oldest > cursor + 1 {
            let notice = Notice::Reset {
                subscription: self.subscription,
                reason: "cursor_expired",
                oldest: page.oldest,
            };
            self.push(Frame::Notice(notice)).await.ok()?;
        }
        let full = page.events.len() == CATCH_UP_PAGE;
        let mut next = target;
        for (id, envelope) in page.events {
            next = id;
            let frame = Frame::Event {
                id,
                envelope: envelope.into(),
                subscriptions: Arc::from([self.subscription]),
                history: true,
                committed_at: 0,
                text: None,
            };
            self.push(frame).await.ok()?;
        }
        Some(if full { next } else { target })
    }

    async fn push(&self, frame: Frame) -> Result<(), Rejected> {
        self.outbound.push_paced(frame).await
    }
}

/// At most `limit` events after `after`, up to `up_to`.
pub(super) fn span(after: u64, up_to: u64, limit: usize) -> Range {
    Range { after, up_to: Some(up_to), from: None, to: None, limit }
}

/// One page of the log for `filter` in `range`, retried with backoff while the log fails;
/// `None` once the connection is closing.
pub(super) async fn read_page<S: Sources>(
    sources: &S,
    connection: ConnectionId,
    outbound: &Outbound,
    filter: &Filter,
    range: &Range,
) -> Option<Page> {
    retrying(connection, outbound, || sources.history().read(filter, range)).await
}

/// `read` of the log, tried again with backoff while it fails; `None` once the connection is
/// closing.
async fn retrying<T, F>(
    connection: ConnectionId,
    outbound: &Outbound,
    mut read: impl FnMut() -> F,
) -> Option<T>
where
    F: std::future::Future<Output = Result<T, crate::log::LogError>>,
{
    let mut backoff = Backoff::new(CATCH_UP_RETRY_FIRST, CATCH_UP_RETRY_MAX);
    loop {
        match read().await {
            Ok(value) => return Some(value),
            Err(err) => {
                tracing::warn!(connection, error = %err, "catch-up read failed; retrying");
                if outbound.is_closing() {
                    return None;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}
