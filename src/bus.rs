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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::event::Timestamp;
use crate::filter::{Filter, Subject};
use crate::log::StoredEvent;
use crate::ws::outbound::{Closing, Frame, Outbound, Rejected};

pub type ConnectionId = u64;
pub type SubscriptionId = u32;
type SubscriptionRef = (ConnectionId, SubscriptionId);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("the connection is closing")]
    Closed,
}

/// Subscriptions that share an index key.
type Bucket = HashMap<SubscriptionRef, Arc<Filter>>;

/// Buckets by entity (`None`: the filter matches any entity).
#[derive(Default)]
struct ByEntity {
    entities: HashMap<String, Bucket>,
    any: Bucket,
}

/// How far the catch-up of a subscription got when it asked to go live.
#[derive(Debug, PartialEq, Eq)]
pub enum GoLive {
    /// The subscription now receives live events after the given cursor.
    Live,
    /// More events were published meanwhile; read up to this id first.
    Behind(u64),
    /// The connection or the subscription is gone.
    Gone,
}

struct Connection {
    outbound: Arc<Outbound>,
    /// Every subscription of the connection; `true` once it is live (in the index).
    subscriptions: HashMap<SubscriptionId, (Arc<Filter>, bool)>,
}

struct Registry {
    /// The id of the last published event.
    head: u64,
    last_event_at: Option<Timestamp>,
    closed: bool,
    next_connection: ConnectionId,
    connections: HashMap<ConnectionId, Connection>,
    by_organization: HashMap<String, ByEntity>,
    any_organization: ByEntity,
    slow_closes: u64,
    /// Organizations and the domains seen with them, for metadata.
    scopes: BTreeMap<String, BTreeSet<String>>,
}

pub struct Bus {
    registry: Mutex<Registry>,
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
    /// A bus whose log ends at `head`.
    pub fn new(head: u64) -> Self {
        Self {
            registry: Mutex::new(Registry {
                head,
                last_event_at: None,
                closed: false,
                next_connection: 1,
                connections: HashMap::new(),
                by_organization: HashMap::new(),
                any_organization: ByEntity::default(),
                slow_closes: 0,
                scopes: BTreeMap::new(),
            }),
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
        registry.connections.insert(id, Connection { outbound, subscriptions: HashMap::new() });
        (id, registry.head)
    }

    pub fn disconnect(&self, connection: ConnectionId) {
        let mut registry = self.lock();
        registry.remove_connection(connection);
    }

    /// Adds a subscription and queues its `subscribed` reply, rendered by `reply` from the
    /// head, in one step. A `live` subscription receives every matching event after the
    /// head; otherwise it waits for [`Bus::go_live`]. Returns the head.
    pub fn subscribe(
        &self,
        connection: ConnectionId,
        subscription: SubscriptionId,
        filter: Arc<Filter>,
        live: bool,
        reply: impl FnOnce(u64) -> String,
    ) -> Result<u64, BusError> {
        let mut registry = self.lock();
        let head = registry.head;
        let outbound = match registry.connections.get(&connection) {
            Some(c) => c.outbound.clone(),
            None => return Err(BusError::Closed),
        };
        if let Err(rejected) = outbound.push(Frame::Control(reply(head))) {
            if rejected == Rejected::Full {
                registry.slow_closes += 1;
            }
            registry.remove_connection(connection);
            return Err(BusError::Closed);
        }
        if let Some(c) = registry.connections.get_mut(&connection) {
            c.subscriptions.insert(subscription, (filter.clone(), live));
        }
        if live {
            registry.index((connection, subscription), &filter);
        }
        Ok(head)
    }

    /// Makes a catching-up subscription live if nothing was published after `cursor`.
    pub fn go_live(
        &self,
        connection: ConnectionId,
        subscription: SubscriptionId,
        cursor: u64,
    ) -> GoLive {
        let mut registry = self.lock();
        if registry.head > cursor {
            return GoLive::Behind(registry.head);
        }
        let Some(entry) = registry
            .connections
            .get_mut(&connection)
            .and_then(|c| c.subscriptions.get_mut(&subscription))
        else {
            return GoLive::Gone;
        };
        if !entry.1 {
            entry.1 = true;
            let filter = entry.0.clone();
            registry.index((connection, subscription), &filter);
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
        let mut slow = Vec::new();
        for event in events {
            registry.head = registry.head.max(event.id);
            registry.last_event_at = Some(event.timestamp);
            registry.note_scope(event);
            let subject = Subject {
                kind: &event.kind,
                organization_id: event.organization_id.as_deref(),
                domain_id: event.domain_id.as_deref(),
                severity: event.severity,
            };
            matches.clear();
            registry.candidates(&subject, &mut matches);
            if matches.is_empty() {
                continue;
            }
            matches.sort_unstable();
            for group in matches.chunk_by(|a, b| a.0 == b.0) {
                let connection = group[0].0;
                let Some(c) = registry.connections.get(&connection) else { continue };
                let frame = Frame::Event {
                    id: event.id,
                    envelope: event.json.clone(),
                    subscriptions: group.iter().map(|m| m.1).collect(),
                };
                if let Err(Rejected::Full) = c.outbound.push(frame) {
                    slow.push(connection);
                }
            }
            for connection in slow.drain(..) {
                registry.slow_closes += 1;
                tracing::info!(connection, "closing slow consumer");
                registry.remove_connection(connection);
            }
        }
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

    /// Organizations with the domains seen with them.
    pub fn scopes(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.lock().scopes.clone()
    }

    /// Adds scopes found in the log at startup.
    pub fn add_scopes(&self, scopes: impl IntoIterator<Item = (String, Option<String>)>) {
        let mut registry = self.lock();
        for (organization, domain) in scopes {
            let domains = registry.scopes.entry(organization).or_default();
            domains.extend(domain);
        }
    }
}

impl Registry {
    fn candidates(&self, subject: &Subject<'_>, out: &mut Vec<SubscriptionRef>) {
        let entity = subject.kind.split_once('.').map_or(subject.kind, |(e, _)| e);
        let mut collect = |by_entity: &ByEntity| {
            let buckets = [by_entity.entities.get(entity), Some(&by_entity.any)];
            for bucket in buckets.into_iter().flatten() {
                for (reference, filter) in bucket {
                    if filter.matches(subject) {
                        out.push(*reference);
                    }
                }
            }
        };
        if let Some(organization) = subject.organization_id
            && let Some(by_entity) = self.by_organization.get(organization)
        {
            collect(by_entity);
        }
        collect(&self.any_organization);
    }

    /// Each live subscription sits in one bucket per (organization, entity) it names.
    fn index(&mut self, reference: SubscriptionRef, filter: &Arc<Filter>) {
        let entities = filter.entities();
        let add = |by_entity: &mut ByEntity| match &entities {
            None => {
                by_entity.any.insert(reference, filter.clone());
            }
            Some(entities) => {
                for entity in entities {
                    let bucket = by_entity.entities.entry((*entity).to_owned()).or_default();
                    bucket.insert(reference, filter.clone());
                }
            }
        };
        match filter.organizations() {
            None => add(&mut self.any_organization),
            Some(organizations) => {
                for organization in organizations {
                    add(self.by_organization.entry(organization.clone()).or_default());
                }
            }
        }
    }

    fn unindex(&mut self, reference: SubscriptionRef, filter: &Filter) {
        let entities = filter.entities();
        let remove = |by_entity: &mut ByEntity| match &entities {
            None => {
                by_entity.any.remove(&reference);
            }
            Some(entities) => {
                for entity in entities {
                    if let Some(bucket) = by_entity.entities.get_mut(*entity) {
                        bucket.remove(&reference);
                        if bucket.is_empty() {
                            by_entity.entities.remove(*entity);
                        }
                    }
                }
            }
        };
        match filter.organizations() {
            None => remove(&mut self.any_organization),
            Some(organizations) => {
                for organization in organizations {
                    if let Some(by_entity) = self.by_organization.get_mut(organization) {
                        remove(by_entity);
                        if by_entity.any.is_empty() && by_entity.entities.is_empty() {
                            self.by_organization.remove(organization);
                        }
                    }
                }
            }
        }
    }

    fn remove_subscription(
        &mut self,
        connection: ConnectionId,
        subscription: SubscriptionId,
    ) -> bool {
        let removed = self
            .connections
            .get_mut(&connection)
            .and_then(|c| c.subscriptions.remove(&subscription));
        match removed {
            Some((filter, live)) => {
                if live {
                    self.unindex((connection, subscription), &filter);
                }
                true
            }
            None => false,
        }
    }

    fn remove_connection(&mut self, connection: ConnectionId) {
        let Some(removed) = self.connections.remove(&connection) else { return };
        for (subscription, (filter, live)) in removed.subscriptions {
            if live {
                self.unindex((connection, subscription), &filter);
            }
        }
    }

    fn note_scope(&mut self, event: &StoredEvent) {
        let Some(organization) = &event.organization_id else { return };
        let known = self.scopes.get(organization).is_some_and(|domains| {
            event.domain_id.as_ref().is_none_or(|domain| domains.contains(domain))
        });
        if !known {
            let domains = self.scopes.entry(organization.clone()).or_default();
            domains.extend(event.domain_id.clone());
        }
    }
}
