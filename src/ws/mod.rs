//! WebSocket delivery (SPEC §5): `GET /ws/events`.
//!
//! - [`protocol`]: the frames, parsed and rendered (pure);
//! - [`outbound`]: each connection's bounded queue, where slow consumers are detected;
//! - [`session`]: one connection, its subscriptions and their catch-up from the log.

pub mod outbound;
pub mod protocol;
pub mod session;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::response::Response;

use crate::filter::Filter;
use crate::server::Shared;
use protocol::ProtocolError;

/// Upgrades `GET /ws/events`; query parameters create a first subscription.
pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    let initial = initial_subscription(query.as_deref().unwrap_or(""));
    let limits = &shared.settings.server;
    let tracker = shared.sessions.clone();
    upgrade
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| tracker.track_future(session::run(socket, shared, initial)))
}

fn initial_subscription(query: &str) -> session::Initial {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let filter = Filter::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let since = match pairs.iter().rev().find(|(k, _)| k == "since") {
        Some((_, value)) => Some(value.parse::<u64>().map_err(|_| {
            ProtocolError::bad_request(format!(
                "query parameter since={value:?} is not an event id"
            ))
        })?),
        None => None,
    };
    Ok(match (filter, since) {
        (None, None) => None,
        (filter, since) => Some((filter.unwrap_or_else(Filter::all), since)),
    })
}
