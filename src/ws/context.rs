//! The part of the server a session uses: limits, the bus, the log (through [`History`]),
//! metrics and the metadata answer. Narrower than `AppState`, so a session can be built in a
//! test without a database pool or a publisher, and so catch-up and replay depend on it rather
//! than on the session that spawns them.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::auth::Scope;
use crate::bus::Bus;
use crate::config::ServerSettings;
use crate::metrics::Metrics;

/// The part of the server a session uses.
pub struct Context<H> {
    /// Limits, timeouts and the token verifier (`auth`, for token refreshes).
    pub limits: ServerSettings,
    pub bus: Arc<Bus>,
    /// Where catch-ups and replays read the log.
    pub history: H,
    pub metrics: Arc<Metrics>,
    /// The `get_metadata` answer for a scope, the same as `GET /api/events/metadata`.
    pub metadata: Box<dyn Fn(Scope) -> BoxFuture<'static, serde_json::Value> + Send + Sync>,
    /// The mapping, whose redacted columns `where` may not name.
    pub mapping: Arc<crate::mapping::Mapping>,
}

impl<H: crate::log::History> crate::bus::catch_up::Sources for Context<H> {
    type History = H;

    fn bus(&self) -> &Bus {
        &self.bus
    }

    fn history(&self) -> &H {
        &self.history
    }
}
