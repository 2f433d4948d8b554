//! Catching up a connection that fell behind (SPEC §5, slow consumers). Its mailbox refused a
//! live event, so the bus stopped offering it live events and made its subscriptions members
//! of a lag, each from the last id it had been handed. This reads the log for all members at
//! once and hands them back to live delivery, with no gap and no duplicate.
//!
//! ```text
//!   bus: offer refused at e ──> members from e-1 (the writer sends `lagging` for each)
//!   LagCatchUp: per member, history.read(its filter) after its position, page by page
//!               merged in id order: one frame per event, listing every member it matches,
//!               pushed paced; `progress` is the merged cursor
//!   bus.lag_go_live(cursor, generation)
//!        Live         buffered matches after the cursor, `caught_up` for each member, live
//!        Behind(head) read up to the head (and for members that joined meanwhile), ask again
//!        Wait(bytes)  the buffered matches do not fit the mailbox yet: wait for room
//! ```
//!
//! Merging keeps the per-connection promises of live delivery: an event matching several
//! members is one frame, and frames go out in id order. Reading per member keeps each read
//! as selective as its filter (the SQL of `filter::sql`). Events count towards the
//! connection's lag (`--max-lag`) by their commit time: unlike `since` history, the client
//! did not ask for them late, it fell behind them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::catch_up::{CATCH_UP_PAGE, Sources, read_page, span};
use super::mailbox::{Frame, Notice, Outbound};
use super::{ConnectionId, GoLive, LagMembers, SubscriptionId};
use crate::filter::Filter;

/// The fewest events a member's read asks for.
const MIN_PAGE: usize = 50;

/// The catch-up of a lagging connection; at most one runs per connection.
pub struct LagCatchUp<S> {
    pub sources: Arc<S>,
    pub connection: ConnectionId,
    pub outbound: Arc<Outbound>,
    /// Every member has been sent every match up to this id. Kept outside the task: one stopped
    /// to unsubscribe a member is started again from here (each frame's push and this update
    /// happen with no await between them, so stopping never loses or repeats one).
    pub progress: Arc<AtomicU64>,
}

/// One member's reads: matches read but not sent yet, up to `read_to`.
struct Reader {
    filter: Arc<Filter>,
    read_to: u64,
    pending: VecDeque<(u64, String, i64)>,
}

impl<S: Sources> LagCatchUp<S> {
    pub async fn run(self) {
        let Some(mut members) = self.sources.bus().lag_members(self.connection) else { return };
        let first = members.members.iter().map(|(_, from, _)| *from).min().unwrap_or(0);
        let mut cursor = first.max(self.progress.load(Ordering::Relaxed));
        self.progress.store(cursor, Ordering::Relaxed);
        let mut readers = HashMap::new();
        sync(&mut readers, &members, cursor);
        let mut target = cursor;
        loop {
            while cursor < target {
                let Some(next) = self.round(&mut readers, cursor, target).await else { return };
                cursor = next;
            }
            let bus = self.sources.bus();
            match bus.lag_go_live(self.connection, cursor, members.generation) {
                GoLive::Live | GoLive::Gone => return,
                GoLive::Behind(head) => {
                    let Some(now) = bus.lag_members(self.connection) else { return };
                    members = now;
                    sync(&mut readers, &members, cursor);
                    target = head;
                }
                GoLive::Wait(bytes) => {
                    if self.outbound.room(bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reads a page for each member that has nothing left to send and sends every match up to
    /// where all members have been read; returns that id, `None` when the connection closes.
    async fn round(
        &self,
        readers: &mut HashMap<SubscriptionId, Reader>,
        cursor: u64,
        target: u64,
    ) -> Option<u64> {
        // Pages shrink with the number of members, so that what is read and not sent yet stays
        // about one page per connection.
        let limit = (CATCH_UP_PAGE / readers.len().max(1)).max(MIN_PAGE);
        for (&subscription, reader) in readers.iter_mut() {
            if !reader.pending.is_empty() || reader.read_to >= target {
                continue;
            }
            let (sources, outbound) = (&*self.sources, &*self.outbound);
            let range = span(reader.read_to, target, limit);
            let page =
                read_page(sources, self.connection, outbound, &reader.filter, &range).await?;
            if page.oldest > reader.read_to + 1 {
                let reason = "cursor_expired";
                let reset = Notice::Reset { subscription, reason, oldest: page.oldest };
                self.outbound.push_paced(Frame::Notice(reset)).await.ok()?;
            }
            let full = page.events.len() == limit;
            let last = page.events.last().map(|(id, _)| *id);
            for ((id, envelope), at) in page.events.into_iter().zip(page.committed_at) {
                let at = crate::model::Timestamp::from_system_time(at).0;
                reader.pending.push_back((id, envelope, at));
            }
            reader.read_to = match (full, last) {
                (true, Some(last)) => last,
                _ => target,
            };
        }
        let bound = readers.values().map(|r| r.read_to).min().unwrap_or(target).max(cursor);
        while let Some(id) = readers
            .values()
            .filter_map(|r| r.pending.front().map(|(id, _, _)| *id))
            .filter(|id| *id <= bound)
            .min()
        {
            let mut subscriptions = Vec::new();
            let mut event = None;
            for (&subscription, reader) in readers.iter_mut() {
                if reader.pending.front().is_some_and(|(next, _, _)| *next == id) {
                    subscriptions.push(subscription);
                    event = reader.pending.pop_front();
                }
            }
            let Some((_, envelope, committed_at)) = event else { break };
            subscriptions.sort_unstable();
            let frame = Frame::Event {
                id,
                envelope: envelope.into(),
                subscriptions: subscriptions.into(),
                history: true,
                committed_at,
                text: None,
            };
            self.outbound.push_paced(frame).await.ok()?;
            self.progress.store(id, Ordering::Relaxed);
        }
        self.progress.store(bound, Ordering::Relaxed);
        Some(bound)
    }
}

/// Makes `readers` the members': new ones read from where they joined (never before
/// `cursor`: what is below it was sent to every member already known, and one that joins
/// does so at the head, past anything read), departed ones go.
fn sync(readers: &mut HashMap<SubscriptionId, Reader>, members: &LagMembers, cursor: u64) {
    readers.retain(|number, _| members.members.iter().any(|(member, _, _)| member == number));
    for (number, from, filter) in &members.members {
        readers.entry(*number).or_insert_with(|| Reader {
            filter: filter.clone(),
            read_to: (*from).max(cursor),
            pending: VecDeque::new(),
        });
    }
}
