//! WebSocket delivery (SPEC §5): `GET /ws/events`.
//!
//! - [`protocol`]: the frames, parsed and rendered (pure);
//! - [`outbound`]: each connection's bounded queue, where slow consumers are detected;
//! - [`session`]: one connection, its subscriptions and their catch-up from the log.

pub mod outbound;
pub mod protocol;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;

use crate::auth;
use crate::filter::Filter;
use crate::http::{self, AppError};
use crate::server::Shared;
use protocol::ProtocolError;

/// Upgrades `GET /ws/events` once the origin, the token and the connection limit allow it;
/// query parameters create a first subscription, confined to the token's scope.
pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let limits = &shared.settings.server;
    if !origin_allowed(limits.allowed_origins.as_deref(), &headers) {
        return Err(AppError::Forbidden("this origin may not connect".into()));
    }
    let pairs = http::query_pairs(query.as_deref());
    let scope = http::authorize(&shared, &headers, &pairs)?;
    let Some(slot) = Slot::reserve(&shared) else {
        return Err(AppError::Unavailable("too many connections".into()));
    };
    let initial = initial_subscription(&pairs);
    let tracker = shared.sessions.clone();
    let limits = limits.clone();
    let response = upgrade
        .protocols([auth::PROTOCOL])
        // tungstenite's default 128 KiB read buffer would dominate an idle connection's
        // memory; reads are small JSON frames. Writes are batched up to WRITE_BUFFER.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                session::run(socket, shared, scope, initial).await;
                drop(slot);
            })
        });
    Ok(response)
}

/// Initial read buffer of a connection; it grows for bigger frames (up to the frame limit).
const READ_BUFFER: usize = 4 << 10;
/// Bytes of frames gathered before a write to the socket (a flush writes the rest).
const WRITE_BUFFER: usize = 32 << 10;

/// A place among `max_connections`, taken before the upgrade and given back when the
/// connection ends (or the upgrade fails), so concurrent handshakes cannot overshoot.
struct Slot(Arc<Shared>);

impl Slot {
    fn reserve(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.settings.server.max_connections;
        let taken = shared
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        taken.is_ok().then(|| Slot(shared.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Browsers always send `Origin`; other clients may not (and could forge it anyway). With an
/// allow-list, only listed origins pass; without one, only the server's own origin does, so
/// a random web page cannot read the stream of a server on the developer's machine.
fn origin_allowed(allowed: Option<&[String]>, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let origin = normalize_origin(origin.to_str().unwrap_or(""));
    match allowed {
        Some(allowed) => allowed.iter().any(|a| normalize_origin(a) == origin),
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
            !host.is_empty() && origin_host == host.to_ascii_lowercase()
        }
    }
}

/// `HTTPS://App.Example/` → `https://app.example`.
pub fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
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
