//! The HTTP side (SPEC §7): the state every request shares, access control, history, metadata,
//! stats and health, and the page. Transports that ride on HTTP (the WebSocket endpoint) plug
//! their routes in through [`app`]; this module knows none of them.
//!
//! ```text
//! state.rs     AppState: settings, bus, log readers, publisher watch, metrics, scopes
//! access.rs    tokens, origins, loopback hosts; AppError, the one refusal format
//! history.rs   GET /api/events
//! emit.rs      POST /api/events: application events, through the log's single writer
//! metadata.rs  GET /api/events/metadata (and the WebSocket get_metadata action)
//! schema.rs    the source catalog's facts about mapped tables (columns, keys, values), cached
//! rows.rs      GET /api/entities/{name}/rows: a table's current rows, as events render them
//! status.rs    stats, /metrics, /healthz, /readyz
//! ```
//!
//! Errors become `{"type":"error","code":...,"message":...}` with a fitting status; database
//! failures are logged here and answered with a 503 that does not leak their details.

pub mod access;
pub mod emit;
mod history;
pub mod metadata;
mod rows;
mod schema;
mod state;
mod status;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

pub use state::AppState;

/// The whole HTTP application: `transports` (routes of protocols that upgrade from HTTP) next to
/// the page, history, metadata, stats and health, all behind the loopback-host guard.
pub fn app(state: Arc<AppState>, transports: Router<Arc<AppState>>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/client.js", get(|| asset("text/javascript", include_str!("../../web/client.js"))))
        .route("/app.js", get(|| asset("text/javascript", include_str!("../../web/app.js"))))
        .route(
            "/builder.js",
            get(|| asset("text/javascript", include_str!("../../web/builder.js"))),
        )
        .route("/entity.js", get(|| asset("text/javascript", include_str!("../../web/entity.js"))))
        .route("/chart.js", get(|| asset("text/javascript", include_str!("../../web/chart.js"))))
        .route(
            "/favicon.svg",
            get(|| asset("image/svg+xml", include_str!("../../web/favicon.svg"))),
        )
        .route("/style.css", get(|| asset("text/css", include_str!("../../web/style.css"))))
        .route("/api/events", get(history::history).post(emit::route))
        .route("/api/events/metadata", get(metadata::route))
        .route("/api/events/stats", get(status::stats))
        .route("/api/entities/{name}/rows", get(rows::rows))
        .route("/healthz", get(status::healthz))
        .route("/readyz", get(status::readyz))
        .route("/metrics", get(status::metrics))
        .merge(transports)
        .layer(axum::middleware::from_fn_with_state(state.clone(), access::loopback_host))
        .with_state(state)
}

/// The live event page (`web/`).
async fn page() -> Html<&'static str> {
    Html(include_str!("../../web/index.html"))
}

/// A file of the page, compiled in.
async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
        .into_response()
}
