//! WebSocket delivery (SPEC §5): `GET /ws/events`.
//!
//! ```text
//!   upgrade (this file): origin, token, connection limit, query → first subscription
//!     └─ session::run(socket halves, Context { limits, bus, history, metrics, metadata })
//!          ├─ read loop: protocol::parse → dispatch, limits (rate), idle and token expiry
//!          ├─ bus::catch_up: `since` history from the log, then bus.go_live
//!          ├─ bus::lag: a connection that fell behind, from the log, then bus.lag_go_live
//!          ├─ replay: a time window from the log, paced
//!          └─ writer: Outbound → socket, batches, pings, close codes
//! ```
//!
//! - [`protocol`]: the frames, parsed and rendered (pure);
//! - [`session`]: one connection, generic over its transport and its log, and its [`Context`];
//! - `writer`, `replay`, `limits`: the parts of a session, one idea each; the session reads
//!   the log through [`crate::log::History`] and runs the transport-free catch-ups of
//!   [`crate::bus::catch_up`] and [`crate::bus::lag`];
//! - `tests`: sessions driven through channels and an in-memory log, with no socket and no
//!   database (the integration tests cover the real socket and the real log).

mod context;
mod limits;
pub mod protocol;
mod replay;
pub mod session;
#[cfg(test)]
mod tests;
mod writer;

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use futures_util::StreamExt;

use crate::auth;
use crate::filter::Filter;
use crate::http::AppState;
use crate::http::access::{self, AppError};
use crate::log::EventLog;
use protocol::ProtocolError;
use session::Context;

/// The WebSocket endpoint, for [`crate::http::app`].
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/ws/events", get(upgrade))
}

/// Upgrades `GET /ws/events` once the origin, the token and the connection limit allow it;
/// query parameters create a first subscription, confined to the token's scope.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let limits = &state.settings.server;
    if !access::origin_allowed(limits.allowed_origins.as_deref(), &headers) {
        return Err(AppError::Forbidden("this origin may not connect".into()));
    }
    let pairs = access::query_pairs(query.as_deref());
    let scope = access::authorize(&state, &headers, &pairs)?;
    // A place among `max_connections`, taken before the upgrade and given back when the
    // connection ends (or the upgrade fails), so concurrent handshakes cannot overshoot.
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return Err(AppError::Unavailable("too many connections".into()));
    };
    let initial = initial_subscription(&pairs);
    let tracker = state.sessions.clone();
    let max_frame_bytes = limits.max_frame_bytes;
    let response = upgrade
        .protocols([auth::PROTOCOL])
        // tungstenite's default 128 KiB read buffer would dominate an idle connection's
        // memory; reads are small JSON frames. Writes are batched up to WRITE_BUFFER.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max_frame_bytes)
        .max_frame_size(max_frame_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                let (sink, stream) = socket.split();
                session::run(sink, stream, context(state), scope, initial).await;
                drop(permit);
            })
        });
    Ok(response)
}

/// Initial read buffer of a connection; it grows for bigger frames (up to the frame limit).
const READ_BUFFER: usize = 4 << 10;
/// Bytes of frames gathered before a write to the socket (a flush writes the rest).
const WRITE_BUFFER: usize = 32 << 10;

/// What a session may use of the server's state, built once the upgrade succeeded: a copy of
/// the server settings (which the session used to take anyway) and shared handles.
fn context(state: Arc<AppState>) -> Arc<Context<EventLog>> {
    let shared = state.clone();
    Arc::new(Context {
        limits: state.settings.server.clone(),
        bus: state.bus.clone(),
        metrics: state.metrics.clone(),
        metadata: Box::new(move |scope| {
            let shared = shared.clone();
            Box::pin(async move { crate::http::metadata::build(&shared, &scope).await })
        }),
        mapping: state.settings.mapping.clone(),
        history: EventLog(state.log.clone()),
    })
}

fn initial_subscription(pairs: &[(String, String)]) -> session::Initial {
    let filter = Filter::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let last = |key: &str| pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let start = protocol::Start::parse(last("since"), last("history"))
        .map_err(|err| ProtocolError::bad_request(format!("query parameter {}", err.message)))?;
    Ok(match (filter, start) {
        (None, protocol::Start::Live) => None,
        (filter, start) => Some((filter.unwrap_or_else(Filter::all), start)),
    })
}
