//! HTTP (SPEC §7): history, metadata, stats, health, and the routes of the whole front.
//!
//! Errors become `{"type":"error","code":...,"message":...}` with a fitting status; database
//! failures are logged here and answered with a 503 that does not leak their details.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::auth::Scope;
use crate::event::Timestamp;
use crate::filter::Filter;
use crate::log::Range;
use crate::publisher::State as PublisherState;
use crate::server::Shared;

/// Events per history page when `limit` is not given.
const DEFAULT_PAGE: usize = 100;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/client.js", get(|| asset("text/javascript", include_str!("../web/client.js"))))
        .route("/app.js", get(|| asset("text/javascript", include_str!("../web/app.js"))))
        .route("/style.css", get(|| asset("text/css", include_str!("../web/style.css"))))
        .route("/ws/events", get(crate::ws::upgrade))
        .route("/api/events", get(history))
        .route("/api/events/metadata", get(metadata_route))
        .route("/api/events/stats", get(stats))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), loopback_host))
        .with_state(shared)
}

/// Without tokens (`--auth none`, loopback only) every request must also name a loopback
/// host: a web page whose domain was rebound to 127.0.0.1 sends its own name and is refused.
async fn loopback_host(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if shared.settings.server.auth.is_required() || is_loopback_host(host) {
        return next.run(request).await;
    }
    AppError::Forbidden("without --auth jwt only loopback host names are served".into())
        .into_response()
}

/// `localhost:8080`, `127.0.0.1`, `[::1]:80`, `app.localhost`.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host }
        }),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every refusal of the HTTP side, WebSocket handshakes included, rendered one way:
/// `{"type":"error","code":...,"message":...}` with the matching status.
pub enum AppError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    Unavailable(String),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            AppError::BadRequest(message) => (StatusCode::BAD_REQUEST, "bad_request", message),
            AppError::Unauthorized(message) => (StatusCode::UNAUTHORIZED, "unauthorized", message),
            AppError::Forbidden(message) => (StatusCode::FORBIDDEN, "forbidden", message),
            AppError::Unavailable(message) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        };
        let body = json!({"type": "error", "code": code, "message": message}).to_string();
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The scope of a request's token (`Authorization: Bearer`, the bearer subprotocol or
/// `?token=`).
pub fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Result<Scope, AppError> {
    let token = crate::auth::token_from(headers, query);
    shared
        .settings
        .server
        .auth
        .verify(token.as_deref())
        .map_err(|err| AppError::Unauthorized(err.to_string()))
}

/// The scope of the request's token, as an extractor: routes that need one take it as an
/// argument and a refusal becomes the 401 response.
pub struct Authorized(pub Scope);

impl axum::extract::FromRequestParts<Arc<Shared>> for Authorized {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let pairs = query_pairs(parts.uri.query());
        authorize(shared, &parts.headers, &pairs).map(Authorized)
    }
}

pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect()
}

fn log_unavailable(err: impl std::fmt::Display) -> AppError {
    tracing::warn!(error = %err, "event log query failed");
    AppError::Unavailable("the event log is unavailable; try again".into())
}

/// `GET /api/events`: history in id order, `{"events":[...],"next":ID}`. `next` is the id to
/// pass as `since` for the following page: the last id returned, or `since` when none was.
async fn history(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let pairs = query_pairs(query.as_deref());
    let scope = authorize(&shared, &headers, &pairs)?;
    let param = |name: &str| pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    for (key, _) in &pairs {
        let known = [
            "type",
            "organization_id",
            "domain_id",
            "severity",
            "since",
            "from",
            "to",
            "limit",
            "token",
        ];
        if !known.contains(&key.as_str()) {
            return Err(AppError::BadRequest(format!("unknown query parameter {key:?}")));
        }
    }
    let filter = Filter::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|err| AppError::BadRequest(err.to_string()))?
        .unwrap_or_else(Filter::all);
    let filter = scope.confine(filter).map_err(AppError::Forbidden)?;
    let number = |name: &str| -> Result<Option<u64>, AppError> {
        param(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    AppError::BadRequest(format!("{name}={v:?} is not a non-negative integer"))
                })
            })
            .transpose()
    };
    let time = |name: &str| -> Result<Option<std::time::SystemTime>, AppError> {
        param(name)
            .map(|v| {
                Timestamp::parse_rfc3339(v).map(Timestamp::to_system_time).ok_or_else(|| {
                    AppError::BadRequest(format!(
                        "{name}={v:?} is not an RFC 3339 time like 2026-11-22T10:15:30Z"
                    ))
                })
            })
            .transpose()
    };
    let max = shared.settings.server.max_history_page;
    let limit = match number("limit")? {
        None => DEFAULT_PAGE.min(max),
        Some(0) => return Err(AppError::BadRequest("limit must be at least 1".into())),
        Some(n) => (n as usize).min(max),
    };
    let since = number("since")?.unwrap_or(0);
    let range = Range { after: since, up_to: None, from: time("from")?, to: time("to")?, limit };
    let client = shared.log.get().await.map_err(log_unavailable)?;
    let page = crate::log::read(&client, &filter, &range).await.map_err(log_unavailable)?;
    let next = page.events.last().map_or(since, |(id, _)| *id);
    let mut body =
        String::with_capacity(page.events.iter().map(|(_, e)| e.len() + 1).sum::<usize>() + 32);
    body.push_str("{\"events\":[");
    for (i, (_, envelope)) in page.events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(envelope);
    }
    body.push_str("],\"next\":");
    body.push_str(&next.to_string());
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Entities, event types with severities, filterable fields and the organizations and
/// domains `scope` may use.
pub fn metadata(shared: &Shared, scope: &Scope) -> Value {
    let mut entities = Vec::new();
    let mut event_types = Vec::new();
    for entity in shared.settings.mapping.entities() {
        let mut types = Vec::new();
        let plain = ["created", "updated", "deleted", "truncated"].map(|a| (a, "info"));
        let extra = entity.events.iter().map(|e| (e.action.as_str(), e.severity.as_str()));
        for (action, severity) in plain.into_iter().chain(extra) {
            let kind = format!("{}.{action}", entity.name);
            types.push(json!(kind));
            event_types.push(json!({"type": kind, "entity": entity.name, "action": action, "severity": severity}));
        }
        entities.push(
            json!({"name": entity.name, "table": entity.table.to_string(), "event_types": types}),
        );
    }
    let mut scopes = shared.bus.scopes();
    scopes.retain(|org, _| scope.allows_organization(org));
    let organizations: Vec<&String> = scopes.keys().collect();
    let domains: Vec<Value> = scopes
        .iter()
        .flat_map(|(org, domains)| {
            domains
                .iter()
                .filter(|d| scope.allows_domain(d))
                .map(move |d| json!({"id": d, "organization_id": org}))
        })
        .collect();
    json!({
        "entities": entities,
        "event_types": event_types,
        "fields": ["type", "organization_id", "domain_id", "severity"],
        "severities": ["info", "warning", "error"],
        "organizations": organizations,
        "domains": domains,
    })
}

async fn metadata_route(
    State(shared): State<Arc<Shared>>,
    Authorized(scope): Authorized,
) -> Response {
    axum::Json(metadata(&shared, &scope)).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>, _: Authorized) -> Response {
    let bus = shared.bus.stats();
    let state = shared.publisher.state.borrow().clone();
    let (state_name, error) = match &state {
        PublisherState::Starting => ("starting", None),
        PublisherState::Streaming => ("streaming", None),
        PublisherState::Reconnecting { error } => ("reconnecting", Some(error.clone())),
        PublisherState::Stopped => ("stopped", None),
    };
    let log_size = async {
        let client = shared.log.get().await.ok()?;
        let row =
            client.query_one("SELECT pg_total_relation_size('rowcast.events')", &[]).await.ok()?;
        Some(row.get::<_, i64>(0))
    };
    let (log_size, slot_lag) = tokio::join!(log_size, slot_lag(&shared));
    axum::Json(json!({
        "running": state == PublisherState::Streaming,
        "state": state_name,
        "error": error,
        "source": shared.settings.source.name(),
        "source_reason": shared.settings.source_reason,
        "connections": bus.connections,
        "subscriptions": bus.subscriptions,
        "events_total": bus.head,
        "events_per_second": shared.rate.per_second(),
        "last_event_id": bus.head,
        "last_event_time": bus.last_event_at.map(|t| t.to_string()),
        "log_size_bytes": log_size,
        "slot": shared.settings.slot,
        "slot_lag_bytes": slot_lag,
        "slow_consumer_closes": bus.slow_consumer_closes,
    }))
    .into_response()
}

/// Prometheus text format; needs a token like stats when `--auth jwt`.
async fn metrics(State(shared): State<Arc<Shared>>, _: Authorized) -> Response {
    let bus = shared.bus.stats();
    let snapshot = crate::metrics::Snapshot {
        connections: bus.connections,
        subscriptions: bus.subscriptions,
        slow_consumer_closes: bus.slow_consumer_closes,
        outbound_frames: shared.bus.outbound_frames(),
        slot_lag_bytes: slot_lag(&shared).await,
        source: shared.settings.source.name(),
    };
    let body = shared.bus.metrics.render(&snapshot);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Bytes of WAL the slot has not confirmed (replication only).
async fn slot_lag(shared: &Shared) -> Option<i64> {
    let client = shared.source.get().await.ok()?;
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&shared.settings.slot],
        )
        .await
        .ok()??;
    row.get::<_, Option<i64>>(0)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the source is streaming and the log answers.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let streaming = *shared.publisher.state.borrow() == PublisherState::Streaming;
    let log = match shared.log.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    let status = if streaming && log { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        axum::Json(
            json!({"ready": streaming && log, "source_streaming": streaming, "log_reachable": log}),
        ),
    )
        .into_response()
}

/// The live event page (`web/`).
async fn page() -> Html<&'static str> {
    Html(include_str!("../web/index.html"))
}

/// A file of the page, compiled in.
async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:80",
            "app.localhost:3000",
        ] {
            assert!(super::is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "[::2]:80",
        ] {
            assert!(!super::is_loopback_host(host), "{host}");
        }
    }
}
