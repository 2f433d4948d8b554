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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::filter::{Filter, Subject};
use crate::log::StoredEvent;
use crate::metrics::Metrics;
use crate::model::Timestamp;

mod index;
pub mod mailbox;

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

/// Events buffered for one catching-up subscription before it reads from the log again.
const CATCH_UP_BUFFER: usize = 4096;

/// How far the catch-up of a subscription got when it asked to go live.
#[derive(Debug, PartialEq, Eq)]
pub enum GoLive {
    /// The subscription now receives live events after the given cursor.
    Live,
    /// The buffer does not cover what was published after the cursor; read up to this id.
    Behind(u64),
    /// The connection or the subscription is gone.
    Gone,
}

struct Subscription {
    filter: Arc<Filter>,
    /// `None` once live.
    catch_up: Option<CatchUpBuffer>,
}

/// Events for a catching-up subscription: every match with an id above `from`, unless it
/// overflowed (`events` is `None`).
struct CatchUpBuffer {
    from: u64,
    events: Option<Vec<(u64, Arc<str>)>>,
}

struct Connection {
    outbound: Arc<Outbound>,
    subscriptions: HashMap<SubscriptionId, Subscription>,
    /// How many of them are catching up; none is the common, fast case.
    catching_up: usize,
}

struct Registry {
    /// The id of the last published event.
    head: u64,
    last_event_at: Option<Timestamp>,
    closed: bool,
    next_connection: ConnectionId,
    connections: HashMap<ConnectionId, Connection>,
    index: Index,
    slow_closes: u64,
}

pub struct Bus {
    registry: Mutex<Registry>,
    /// Where appended and delivered counts and the source lag go.
    metrics: Arc<Metrics>,
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
                slow_closes: 0,
            }),
            metrics,
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
        let connection = Connection { outbound, subscriptions: HashMap::new(), catching_up: 0 };
        registry.connections.insert(id, connection);
        (id, registry.head)
    }

    pub fn disconnect(&self, connection: ConnectionId) {
        let mut registry = self.lock();
        registry.remove_connection(connection);
    }

    /// Adds a subscription and queues its `subscribed` reply, rendered by `reply` from the
    /// head, in one step. Without `since` it receives every matching event after the head;
    /// with it, it catches up first and goes live with [`Bus::go_live`]. Returns the head.
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
            frames.push(Frame::CatchingUp { subscription, from: since.min(head) });
        }
        frames.push(Frame::Control(reply(head)));
        for frame in frames {
            if let Err(rejected) = c.outbound.push(frame) {
                registry.drop_connection(connection, rejected);
                return Err(BusError::Closed);
            }
        }
        let catch_up = since.map(|_| CatchUpBuffer { from: head, events: Some(Vec::new()) });
        c.catching_up += usize::from(catch_up.is_some());
        if let Some(old) =
            c.subscriptions.insert(subscription, Subscription { filter: filter.clone(), catch_up })
        {
            // Ids are not reused by sessions; if one ever is, the old one must leave the index.
            registry.index.remove((connection, subscription), &old.filter);
        }
        registry.index.add((connection, subscription), &filter);
        Ok(head)
    }

    /// Ends the catch-up of a subscription whose log reads reached `cursor`: if its buffer
    /// holds everything published after `cursor`, that is queued and the subscription is live.
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
        let Some(buffer) = &mut sub.catch_up else { return GoLive::Live };
        let events = match &mut buffer.events {
            Some(events) if buffer.from <= cursor => std::mem::take(events),
            _ => {
                // Start over from here; the catch-up reads up to the head meanwhile.
                *buffer = CatchUpBuffer { from: head, events: Some(Vec::new()) };
                return GoLive::Behind(head);
            }
        };
        sub.catch_up = None;
        c.catching_up -= 1;
        let frames = events
            .into_iter()
            .filter(|(id, _)| *id > cursor)
            .map(|(id, envelope)| Frame::Event {
                id,
                envelope,
                subscriptions: vec![subscription],
                history: true,
                committed_at: 0,
                text: None,
            })
            .chain([Frame::Live { subscription }]);
        for frame in frames {
            if let Err(rejected) = c.outbound.push(frame) {
                registry.drop_connection(connection, rejected);
                return GoLive::Gone;
            }
        }
        GoLive::Live
    }

    /// Removes a subscription; `false` if there was none.
    pub fn unsubscribe(&self, connection: ConnectionId, subscription: SubscriptionId) -> bool {
        let mut registry = self.lock();
        registry.remove_subscription(connection, subscription)
    }

    /// Hands appended events to the matching connections, in order. Connections that cannot
    /// keep up are closed with 4008 and dropped from the bus.
    pub fn publish(&self, events: &[StoredEvent]) {
        let mut registry = self.lock();
        let mut matches: Vec<SubscriptionRef> = Vec::new();
        let mut slow: Vec<(ConnectionId, Rejected)> = Vec::new();
        // Connections each event was queued for, recorded in the metrics once per batch.
        let mut counts: Vec<(&str, u64)> = Vec::with_capacity(events.len());
        for event in events {
            registry.head = registry.head.max(event.id);
            registry.last_event_at = Some(event.timestamp);
            let subject = Subject {
                event_type: &event.event_type,
                organization_id: event.organization_id.as_deref(),
                domain_id: event.domain_id.as_deref(),
                severity: event.severity,
            };
            matches.clear();
            registry.index.candidates(&subject, &mut matches);
            let mut queued = 0;
            let mut rendered: Vec<(Vec<SubscriptionId>, Bytes)> = Vec::new();
            if matches.is_empty() {
                counts.push((&event.event_type, 0));
                continue;
            }
            matches.sort_unstable();
            for group in matches.chunk_by(|a, b| a.0 == b.0) {
                let connection = group[0].0;
                let Some(c) = registry.connections.get_mut(&connection) else { continue };
                let mut live: Vec<SubscriptionId> = group.iter().map(|m| m.1).collect();
                if c.catching_up > 0 {
                    live.retain(|number| {
                        let Some(sub) = c.subscriptions.get_mut(number) else { return false };
                        let Some(buffer) = &mut sub.catch_up else { return true };
                        if let Some(events) = &mut buffer.events {
                            if events.len() < CATCH_UP_BUFFER {
                                events.push((event.id, event.json.clone()));
                            } else {
                                buffer.events = None;
                            }
                        }
                        false
                    });
                    if live.is_empty() {
                        continue;
                    }
                }
                // Connections whose matching ids are the same (typically just `s1`) share one
                // rendered frame: no per-connection copy of the envelope.
                let text = match rendered.iter().find(|(ids, _)| *ids == live) {
                    Some((_, text)) => text.clone(),
                    None => {
                        let text = Bytes::from(mailbox::event_text(&event.json, &live));
                        rendered.push((live.clone(), text.clone()));
                        text
                    }
                };
                let frame = Frame::Event {
                    id: event.id,
                    envelope: event.json.clone(),
                    subscriptions: live,
                    history: false,
                    committed_at: event.timestamp.0,
                    text: Some(text),
                };
                match c.outbound.push(frame) {
                    Ok(()) => queued += 1,
                    Err(rejected) => slow.push((connection, rejected)),
                }
            }
            counts.push((&event.event_type, queued));
            for (connection, rejected) in slow.drain(..) {
                registry.drop_connection(connection, rejected);
            }
        }
        self.metrics.published(counts);
        if let Some(last) = events.last() {
            self.metrics.source_lag(Timestamp::now().0 - last.timestamp.0);
        }
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

    pub fn stats(&self) -> BusStats {
        let registry = self.lock();
        BusStats {
            head: registry.head,
            last_event_at: registry.last_event_at,
            connections: registry.connections.len(),
            subscriptions: registry.connections.values().map(|c| c.subscriptions.len()).sum(),
            slow_consumer_closes: registry.slow_closes,
        }
    }
}

impl Registry {
    fn remove_subscription(
        &mut self,
        connection: ConnectionId,
        subscription: SubscriptionId,
    ) -> bool {
        let Some(c) = self.connections.get_mut(&connection) else { return false };
        let Some(removed) = c.subscriptions.remove(&subscription) else { return false };
        c.catching_up -= usize::from(removed.catch_up.is_some());
        self.index.remove((connection, subscription), &removed.filter);
        true
    }

    fn remove_connection(&mut self, connection: ConnectionId) {
        let Some(removed) = self.connections.remove(&connection) else { return };
        for (subscription, sub) in removed.subscriptions {
            self.index.remove((connection, subscription), &sub.filter);
        }
    }

    /// Drops a connection whose queue refused a frame.
    fn drop_connection(&mut self, connection: ConnectionId, rejected: Rejected) {
        if rejected == Rejected::Full {
            self.slow_closes += 1;
            tracing::info!(connection, "closing slow consumer");
        }
        self.remove_connection(connection);
    }
}

#[cfg(test)]
mod tests;
