//! What every HTTP handler and WebSocket session shares.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::config::Settings;
use crate::log::Scopes;
use crate::metrics::{Metrics, Rate};
use crate::pg::Pool;
use crate::publisher;

pub struct AppState {
    pub settings: Settings,
    pub bus: Arc<Bus>,
    /// Readers of the event log (history, catch-up, replay, stats).
    pub log: Arc<Pool>,
    /// Readers of the source database (slot lag, catalog facts, entity rows).
    pub source: Pool,
    /// What the source catalog says about the mapped tables, cached.
    pub schema: super::schema::Schema,
    pub publisher: publisher::Watch,
    /// Every WebSocket session, so shutdown can wait for them to close.
    pub sessions: TaskTracker,
    pub rate: Rate,
    /// One permit per WebSocket connection open or being opened (`max_connections`).
    pub connections: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// Organizations and domains in the log, for metadata.
    pub scopes: Arc<Scopes>,
    /// Application events posted over HTTP go to the publisher's writer through here; `None`
    /// where this process does not write the log.
    pub appends: Option<crate::log::app::Outbox>,
    /// The relay (`--role publisher`) or the consumer (`--role gateway`); `None` for `all`.
    pub nats: Option<Arc<crate::nats::Status>>,
}

impl AppState {
    /// The newest event this process knows of: its bus's head, or on a publisher (whose bus is
    /// not fed) the log head it appended.
    pub fn last_id(&self) -> u64 {
        match self.settings.role {
            crate::config::Role::Publisher => *self.publisher.head.borrow(),
            _ => self.bus.head(),
        }
    }
}
