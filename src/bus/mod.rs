//! The bus: every event appended to the log is offered here once, in id order, and handed to
//! the connections whose subscriptions match it.
//!
//! Matching is indexed by organization and entity, so an event only meets the subscriptions
//! that could match it: those naming its organization or none, and its entity or none. An
//! event matching several subscriptions of one connection becomes one frame listing all of
//! them. The envelope is serialized once, when it is appended; every frame shares it.
//!
//! The registry lock orders subscribing against publishing: a subscription registered with
//! `last_id = N` is in the index before event N+1 is published, and its `subscribed` reply is
//! queued before any event for it. That is what makes the `subscribed.last_id` guarantee hold.
//!
//! A subscription with `since` catches up from the log first. Meanwhile the bus keeps the
//! events it matches (ids above `N`) in a bounded buffer; when the catch-up has read the log
//! up to `N`, [`Bus::go_live`] queues the buffered events after it and makes it live, all
//! under the lock, so the hand-off has no gap and no duplicate however busy the log is. If the
//! buffer overflows, the catch-up reads further from the log and buffering starts over.
//!
//! A connection that falls behind is handled the same way, as a whole. The bus never waits on
//! a mailbox: when one refuses a live event (its byte budget is spent), the bus stops offering
//! live events to that connection and makes it **lag**: each of its live subscriptions becomes
//! a member of the lag, from the id before the refused event (it was handed everything up to
//! there), matches are buffered for the lag, and the session is told to catch up. Its one
//! catch-up reads the log for all members at once, so an event matching several is still one
//! frame, and hands them all back with [`Bus::lag_go_live`]. While a connection lags, its new
//! subscriptions (and `since` ones that finish) join the lag at the head instead of going live.
//!
//! ```text
//!   live ──offer refused at event e──> Lagging (from e-1; CatchingUp markers, `lagging`)
//!     ^                                  │ buffer matches; session reads the log (paced)
//!     └──── lag_go_live(cursor): buffered matches after the cursor, `caught_up`, Live markers
//! ```
//!
//! The catch-ups that read the log for those hand-offs are [`catch_up`] and [`lag`]; every
//! transport's session runs them over its own mailbox (WebSocket frames, Postgres COPY rows).
//!
//! Longer than most files on purpose: everything done under the registry lock is here, because
//! that one lock is the guarantee (`last_id`, the `since` and lag hand-offs, one frame per event).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::filter::{Envelope, Filter};
use crate::log::StoredEvent;
use crate::metrics::Metrics;
use crate::model::Timestamp;

mod buffer;
pub mod catch_up;
mod index;
pub mod lag;
pub mod mailbox;

use buffer::{Buffer, Buffered};
use index::Index;

use mailbox::{Closing, Frame, Outbound, Rejected};

pub type ConnectionId = u64;
pub type SubscriptionId = u32;
/// A subscription of a connection.
type SubscriptionRef = (ConnectionId, SubscriptionId);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("the connection is closing")]
    Closed,
}

/// How far a catch-up got when it asked to go live.
#[derive(Debug, PartialEq, Eq)]
pub enum GoLive {
    /// Done: the subscriptions receive live events after the cursor (or joined the
    /// connection's lag, which catches them up in turn).
    Live,
    /// The buffer does not cover what was published after the cursor; read up to this id.
    Behind(u64),
    /// The buffered events do not fit the mailbox yet: wait until this many bytes fit.
    Wait(usize),
    /// The connection or the subscription is gone.
    Gone,
}

/// The members of a connection's lag, as its catch-up reads for them.
#[derive(Debug, Clone)]
pub struct LagMembers {
    /// Changes whenever a member joins; [`Bus::lag_go_live`] checks it.
    pub generation: u64,
    /// Each member, the id up to which it had everything when it joined, and its filter.
    pub members: Vec<(SubscriptionId, u64, Arc<Filter>)>,
}

struct Subscription {
    filter: Arc<Filter>,
    delivery: Delivery,
}

enum Delivery {
    /// Offered every matching event as it is published.
    Live,
    /// Catching up from the log after `since`; matches published meanwhile are buffered.
    Since(Buffer),
    /// A member of its connection's lag.
    Lagging,
}

struct Connection {
    outbound: Arc<Outbound>,
    subscriptions: HashMap<SubscriptionId, Subscription>,
    /// How many of them are not live; none is the common, fast case.
    catching_up: usize,
    /// While the connection catches up because it fell behind.
    lag: Option<Lag>,
    /// Bytes held by this connection's buffers; at most its outbound budget.
    buffered: usize,
}

/// A connection that fell behind: none of its subscriptions is live.
struct Lag {
    /// Each member and the id up to which it had been handed everything when it joined.
    members: HashMap<SubscriptionId, u64>,
    generation: u64,
    /// Matches for the members, each event once with the members it matches.
    buffer: Buffer,
    /// Whether the session took the catch-up on.
    claimed: bool,
}

struct Registry {
    /// The id of the last published event.
    head: u64,
    last_event_at: Option<Timestamp>,
    closed: bool,
    next_connection: ConnectionId,
    connections: HashMap<ConnectionId, Connection>,
    index: Index,
}

pub struct Bus {
    registry: Mutex<Registry>,
    /// Commit time (µs) of the newest event published: how far behind a connection is.
    newest_commit: AtomicI64,
    slow_closes: AtomicU64,
    /// Where appended and delivered counts and the source lag go.
    metrics: Arc<Metrics>,
    /// The head, for those who wait for it to reach an id ([`Bus::wait_for_head`]).
    heads: tokio::sync::watch::Sender<u64>,
}

/// Counters for stats.
#[derive(Debug, Clone, Default)]
pub struct BusStats {
    pub head: u64,
    pub last_event_at: Option<Timestamp>,
    pub connections: usize,
    pub subscriptions: usize,
    pub slow_consumer_closes: u64,
}

impl Bus {
    /// A bus whose log ends at `head`, counting what it delivers in `metrics`.
    pub fn new(head: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            registry: Mutex::new(Registry {
                head,
                last_event_at: None,
                closed: false,
                next_connection: 1,
                connections: HashMap::new(),
                index: Index::default(),
            }),
            newest_commit: AtomicI64::new(0),
            slow_closes: AtomicU64::new(0),
            metrics,
            heads: tokio::sync::watch::Sender::new(head),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a connection; returns its id and the current head (the `welcome.last_id`).
    pub fn connect(&self, outbound: Arc<Outbound>) -> (ConnectionId, u64) {
        let mut registry = self.lock();
        let id = registry.next_connection;
        registry.next_connection += 1;
        if registry.closed {
            outbound.close(Closing::Shutdown);
        }
        let connection = Connection {
            outbound,
            subscriptions: HashMap::new(),
            catching_up: 0,
            lag: None,
            buffered: 0,
        };
        registry.connections.insert(id, connection);
        (id, registry.head)
    }

    pub fn disconnect(&self, connection: ConnectionId) {
        self.lock().remove_connection(connection);
    }

    /// Adds a subscription and queues its `subscribed` reply, rendered by `reply` from the
    /// head, in one step. Without `since` it receives every matching event after the head
    /// (through the lag's catch-up if its connection lags); with it, it catches up first and
    /// goes live with [`Bus::go_live`]. Returns the head.
    ///
    /// The reply is queued whatever the mailbox's budget: wait for room before asking.
    pub fn subscribe(
        &self,
        connection: ConnectionId,
        subscription: SubscriptionId,
        filter: Arc<Filter>,
        since: Option<u64>,
        reply: impl FnOnce(u64) -> String,
    ) -> Result<u64, BusError> {
        let mut registry = self.lock();
        let head = registry.head;
        let Some(c) = registry.connections.get_mut(&connection) else {
            return Err(BusError::Closed);
        };
        let mut frames = Vec::with_capacity(2);
        if let Some(since) = since {
            let from = since.min(head);
            frames.push(Frame::CatchingUp { subscription, from, lagging: false });
        }
        frames.push(Frame::Control(reply(head)));
        let delivery = match (since, &mut c.lag) {
            (Some(_), _) => Delivery::Since(Buffer::new(head)),
            (None, Some(lag)) => {
                lag.join(subscription, head);
                frames.push(Frame::CatchingUp { subscription, from: head, lagging: true });
                Delivery::Lagging
            }
            (None, None) => Delivery::Live,
        };
        for frame in frames {
            if c.outbound.push(frame).is_err() {
                registry.remove_connection(connection);
                return Err(BusError::Closed);
            }
        }
        c.catching_up += usize::from(!matches!(delivery, Delivery::Live));
        let added = Subscription { filter: filter.clone(), delivery };
        if let Some(old) = c.subscriptions.insert(subscription, added) {
            // Ids are not reused by sessions; if one ever is, the old one must leave the index.
            c.forget(subscription, old.delivery);
            registry.index.remove((connection, subscription), &old.filter);
        }
        registry.index.add((connection, subscription), &filter);
        Ok(head)
    }

    /// Ends the `since` catch-up of a subscription whose log reads reached `cursor`: if its
    /// buffer holds everything published after `cursor` and it fits the mailbox, that is
    /// queued and the subscription is live (or joins its connection's lag).
    pub fn go_live(
        &self,
        connection: ConnectionId,
        subscription: SubscriptionId,
        cursor: u64,
    ) -> GoLive {
        let mut registry = self.lock();
        let head = registry.head;
        let Some(c) = registry.connections.get_mut(&connection) else { return GoLive::Gone };
        let Some(sub) = c.subscriptions.get_mut(&subscription) else { return GoLive::Gone };
        let Delivery::Since(buffer) = &mut sub.delivery else { return GoLive::Live };
        if !buffer.covers(cursor) {
            // Start over from here; the catch-up reads up to the head meanwhile.
            buffer.restart(head, &mut c.buffered);
            return GoLive::Behind(head);
        }
        let mut frames = buffer.frames_after(cursor, |_| true);
        frames.push(Frame::Live { subscription, caught_up: None });
        if c.lag.is_some() {
            frames.push(Frame::CatchingUp { subscription, from: head, lagging: true });
        }
        if let Err(held) = offer_or_hold(&c.outbound, frames) {
            if held == GoLive::Gone {
                registry.remove_connection(connection);
            }
            return held;
        }
        let delivery = match &mut c.lag {
            Some(lag) => {
                lag.join(subscription, head);
                Delivery::Lagging
            }
            None => {
                c.catching_up -= 1;
                Delivery::Live
            }
        };
        if let Delivery::Since(buffer) = std::mem::replace(&mut sub.delivery, delivery) {
            buffer.release(&mut c.buffered);
        }
        GoLive::Live
    }

    /// Takes on the catch-up of a connection that fell behind: `true` once per lag, for the
    /// session that will run it.
    pub fn claim_lag(&self, connection: ConnectionId) -> bool {
        let mut registry = self.lock();
        let lag = registry.connections.get_mut(&connection).and_then(|c| c.lag.as_mut());
        lag.is_some_and(|lag| !std::mem::replace(&mut lag.claimed, true))
    }

    /// Who a lagging connection's catch-up reads for; `None` once it no longer lags.
    pub fn lag_members(&self, connection: ConnectionId) -> Option<LagMembers> {
        let registry = self.lock();
        let c = registry.connections.get(&connection)?;
        let lag = c.lag.as_ref()?;
        let members = lag
            .members
            .iter()
            .filter_map(|(number, from)| {
                let sub = c.subscriptions.get(number)?;
                Some((*number, *from, sub.filter.clone()))
            })
            .collect();
        Some(LagMembers { generation: lag.generation, members })
    }

    /// Ends the catch-up of a lagging connection whose log reads reached `cursor` for the
    /// members of `generation`: if the lag's buffer holds everything published after `cursor`
    /// and it fits the mailbox, that is queued, each member is told it caught up, and they are
    /// all live again.
    pub fn lag_go_live(&self, connection: ConnectionId, cursor: u64, generation: u64) -> GoLive {
        let mut registry = self.lock();
        let head = registry.head;
        let Some(c) = registry.connections.get_mut(&connection) else { return GoLive::Gone };
        let Some(lag) = &mut c.lag else { return GoLive::Live };
        if lag.generation != generation {
            // A member joined that the catch-up has not read for: it reads again, for all.
            return GoLive::Behind(head);
        }
        if !lag.buffer.covers(cursor) {
            lag.buffer.restart(head, &mut c.buffered);
            return GoLive::Behind(head);
        }
        let mut frames = lag.buffer.frames_after(cursor, |s| lag.members.contains_key(&s));
        let mut members: Vec<SubscriptionId> = lag.members.keys().copied().collect();
        members.sort_unstable();
        frames.extend(
            members.iter().map(|&subscription| Frame::Live { subscription, caught_up: Some(head) }),
        );
        if let Err(held) = offer_or_hold(&c.outbound, frames) {
            if held == GoLive::Gone {
                registry.remove_connection(connection);
            }
            return held;
        }
        for number in &members {
            if let Some(sub) = c.subscriptions.get_mut(number) {
                sub.delivery = Delivery::Live;
                c.catching_up -= 1;
            }
        }
        if let Some(lag) = c.lag.take() {
            lag.buffer.release(&mut c.buffered);
        }
        GoLive::Live
    }

    /// Removes a subscription; `false` if there was none.
    pub fn unsubscribe(&self, connection: ConnectionId, subscription: SubscriptionId) -> bool {
        let mut registry = self.lock();
        let Some(c) = registry.connections.get_mut(&connection) else { return false };
        let Some(removed) = c.subscriptions.remove(&subscription) else { return false };
        c.forget(subscription, removed.delivery);
        registry.index.remove((connection, subscription), &removed.filter);
        true
    }

    /// Hands appended events to the matching connections, in order, without ever waiting: a
    /// connection whose mailbox refuses one falls behind and catches up from the log.
    pub fn publish(&self, events: &[StoredEvent]) {
        let mut registry = self.lock();
        let registry = &mut *registry;
        let mut matches: Vec<SubscriptionRef> = Vec::new();
        let mut closed: Vec<ConnectionId> = Vec::new();
        // One connection's matching subscriptions, and the frames rendered for this event:
        // connections whose matching ids are the same share one rendering and one id list.
        let mut live: Vec<SubscriptionId> = Vec::new();
        let mut rendered: Vec<(Arc<[SubscriptionId]>, Bytes)> = Vec::new();
        // Connections each event was queued for, recorded in the metrics once per batch.
        let mut counts: Vec<(&str, u64)> = Vec::with_capacity(events.len());
        for event in events {
            registry.head = registry.head.max(event.id);
            registry.last_event_at = Some(event.timestamp);
            self.newest_commit.fetch_max(event.timestamp.0, Ordering::Relaxed);
            // Parsed only if a candidate's filter has `where` predicates, once for all of them.
            let envelope = Envelope::new(&event.json);
            let subject = event.subject(&envelope);
            matches.clear();
            registry.index.candidates(&subject, &mut matches);
            let mut queued = 0;
            rendered.clear();
            if matches.is_empty() {
                counts.push((&event.event_type, 0));
                continue;
            }
            matches.sort_unstable();
            for group in matches.chunk_by(|a, b| a.0 == b.0) {
                let connection = group[0].0;
                let Some(c) = registry.connections.get_mut(&connection) else { continue };
                live.clear();
                live.extend(group.iter().map(|m| m.1));
                if c.catching_up > 0 {
                    c.keep_for_catch_ups(event, &mut live);
                    if live.is_empty() {
                        continue;
                    }
                }
                // Connections whose matching ids are the same (typically just `s1`) share one
                // rendered frame: no per-connection copy of the envelope, no allocation.
                let (subscriptions, text) = match rendered.iter().find(|(ids, _)| **ids == *live) {
                    Some((ids, text)) => (ids.clone(), text.clone()),
                    None => {
                        let text = Bytes::from(mailbox::event_text(&event.json, &live));
                        let ids: Arc<[SubscriptionId]> = Arc::from(live.as_slice());
                        rendered.push((ids.clone(), text.clone()));
                        (ids, text)
                    }
                };
                let frame = Frame::Event {
                    id: event.id,
                    envelope: event.json.clone(),
                    subscriptions,
                    history: false,
                    committed_at: event.timestamp.0,
                    text: Some(text),
                };
                match c.outbound.offer(frame) {
                    Ok(()) => queued += 1,
                    Err(Rejected::Full) => {
                        c.fall_behind(event, live.clone());
                        self.metrics.fell_behind();
                        tracing::debug!(connection, id = event.id, "connection fell behind");
                    }
                    Err(Rejected::Closed) => closed.push(connection),
                }
            }
            counts.push((&event.event_type, queued));
            for connection in closed.drain(..) {
                registry.remove_connection(connection);
            }
        }
        self.metrics.published(counts);
        let head = registry.head;
        self.heads.send_if_modified(|known| std::mem::replace(known, head) != head);
        if let Some(last) = events.last() {
            self.metrics.source_lag(Timestamp::now().0 - last.timestamp.0);
        }
    }

    /// Commit time (µs since the epoch) of the newest event published, 0 before any.
    pub fn newest_commit(&self) -> i64 {
        self.newest_commit.load(Ordering::Relaxed)
    }

    /// Counts a connection closed as a slow consumer (4008), for stats.
    pub fn slow_consumer_closed(&self) {
        self.slow_closes.fetch_add(1, Ordering::Relaxed);
    }

    /// Frames queued for all connections now.
    pub fn outbound_frames(&self) -> usize {
        self.lock().connections.values().map(|c| c.outbound.len()).sum()
    }

    /// Stops the bus: every connection writes what it has queued and closes with 1001.
    pub fn close(&self) {
        let mut registry = self.lock();
        registry.closed = true;
        for connection in registry.connections.values() {
            connection.outbound.close(Closing::Shutdown);
        }
    }

    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// Waits, at most `wait`, until the head reaches `id`: a cursor a client brings from a
    /// gateway ahead of this one (SPEC §10; `ServerSettings::cursor_ahead_wait`). Returns at
    /// once when it is reached already or `wait` is zero.
    pub async fn wait_for_head(&self, id: u64, wait: std::time::Duration) {
        let mut heads = self.heads.subscribe();
        let _ = tokio::time::timeout(wait, heads.wait_for(|head| *head >= id)).await;
    }

    pub fn stats(&self) -> BusStats {
        let registry = self.lock();
        BusStats {
            head: registry.head,
            last_event_at: registry.last_event_at,
            connections: registry.connections.len(),
            subscriptions: registry.connections.values().map(|c| c.subscriptions.len()).sum(),
            slow_consumer_closes: self.slow_closes.load(Ordering::Relaxed),
        }
    }
}

/// Offers `frames` to a mailbox all or none. `Err(Wait(size))` when it has no room for them
/// yet: the size is exactly what it must have, so that waiting for it is never satisfied while
/// the offer would still be refused. `Err(Gone)` when it is closing.
fn offer_or_hold(outbound: &Outbound, frames: Vec<Frame>) -> Result<(), GoLive> {
    let size: usize = frames.iter().map(Frame::size).sum();
    match outbound.offer_all(frames) {
        Ok(()) => Ok(()),
        Err(Rejected::Full) => Err(GoLive::Wait(size)),
        Err(Rejected::Closed) => Err(GoLive::Gone),
    }
}

impl Registry {
    fn remove_connection(&mut self, connection: ConnectionId) {
        if let Some(removed) = self.connections.remove(&connection) {
            self.unindex(connection, removed);
        }
    }

    fn unindex(&mut self, connection: ConnectionId, removed: Connection) {
        for (subscription, sub) in removed.subscriptions {
            self.index.remove((connection, subscription), &sub.filter);
        }
    }
}

impl Connection {
    /// Buffers `event` for the subscriptions in `matched` that catch up, leaving the live ones.
    fn keep_for_catch_ups(&mut self, event: &StoredEvent, matched: &mut Vec<SubscriptionId>) {
        let budget = self.outbound.budget();
        let mut lagging = Vec::new();
        matched.retain(|number| {
            let Some(sub) = self.subscriptions.get_mut(number) else { return false };
            match &mut sub.delivery {
                Delivery::Live => true,
                Delivery::Since(buffer) => {
                    buffer.keep(Buffered::new(event, vec![*number]), &mut self.buffered, budget);
                    false
                }
                Delivery::Lagging => {
                    lagging.push(*number);
                    false
                }
            }
        });
        if let (Some(lag), false) = (&mut self.lag, lagging.is_empty()) {
            lag.buffer.keep(Buffered::new(event, lagging), &mut self.buffered, budget);
        }
    }

    /// The mailbox refused `event` (for the live subscriptions `matched`): every live
    /// subscription joins a new lag from the id before it, and the session is told.
    fn fall_behind(&mut self, event: &StoredEvent, matched: Vec<SubscriptionId>) {
        let from = event.id.saturating_sub(1);
        let mut lag = Lag {
            members: HashMap::new(),
            generation: 0,
            buffer: Buffer::new(from),
            claimed: false,
        };
        let mut numbers: Vec<SubscriptionId> = self
            .subscriptions
            .iter()
            .filter(|(_, sub)| matches!(sub.delivery, Delivery::Live))
            .map(|(number, _)| *number)
            .collect();
        numbers.sort_unstable();
        for number in numbers {
            if let Some(sub) = self.subscriptions.get_mut(&number) {
                sub.delivery = Delivery::Lagging;
            }
            self.catching_up += 1;
            lag.members.insert(number, from);
            // Where the stream leaves this subscription: the writer tells the client, and
            // counts it in the resume id of a 4008 from here on.
            let _ =
                self.outbound.push(Frame::CatchingUp { subscription: number, from, lagging: true });
        }
        let budget = self.outbound.budget();
        lag.buffer.keep(Buffered::new(event, matched), &mut self.buffered, budget);
        self.lag = Some(lag);
        self.outbound.fell_behind();
    }

    /// Lets go of what a removed subscription held.
    fn forget(&mut self, subscription: SubscriptionId, delivery: Delivery) {
        match delivery {
            Delivery::Live => return,
            Delivery::Since(buffer) => buffer.release(&mut self.buffered),
            Delivery::Lagging => {
                if let Some(lag) = &mut self.lag {
                    lag.members.remove(&subscription);
                    if lag.members.is_empty()
                        && let Some(lag) = self.lag.take()
                    {
                        lag.buffer.release(&mut self.buffered);
                    }
                }
            }
        }
        self.catching_up -= 1;
    }
}

impl Lag {
    /// A subscription joins at `from`: it had every match up to there.
    fn join(&mut self, subscription: SubscriptionId, from: u64) {
        self.members.insert(subscription, from);
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests;
