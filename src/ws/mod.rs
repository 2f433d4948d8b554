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
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth;
use crate::filter::Filter;
use crate::server::Shared;
use protocol::ProtocolError;

/// Upgrades `GET /ws/events` once the origin, the token and the connection limit allow it;
/// query parameters create a first subscription, confined to the token's scope.
pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let limits = &shared.settings.server;
    if let (Some(allowed), Some(origin)) = (&limits.allowed_origins, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            return refuse(StatusCode::FORBIDDEN, "forbidden", "this origin may not connect");
        }
    }
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()).into_owned().collect();
    let scope = match limits.auth.verify(auth::token_from(&headers, &pairs).as_deref()) {
        Ok(scope) => scope,
        Err(err) => return refuse(StatusCode::UNAUTHORIZED, "unauthorized", &err.to_string()),
    };
    if shared.bus.stats().connections >= limits.max_connections {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "too many connections");
    }
    let initial = initial_subscription(&pairs);
    let tracker = shared.sessions.clone();
    let limits = limits.clone();
    upgrade
        .protocols([auth::PROTOCOL])
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(session::run(socket, shared, scope, initial))
        })
}

/// A refusal before the upgrade, as an error body clients can read.
pub fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"type": "error", "code": code, "message": message}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn initial_subscription(pairs: &[(String, String)]) -> session::Initial {
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
