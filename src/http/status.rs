//! How the server is doing: stats, Prometheus metrics, liveness and readiness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::access::Authorized;
use crate::config::Role;
use crate::publisher::State as PublisherState;

/// The longest readiness, stats and metrics wait for a database before saying it does not
/// answer: a health check that hangs is worse than one that fails.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn stats(State(state): State<Arc<AppState>>, _: Authorized) -> Response {
    let bus = state.bus.stats();
    let role = state.settings.role;
    let publisher = state.publisher.state.borrow().clone();
    let (state_name, error) = match (&publisher, &state.nats) {
        (_, Some(nats)) if role == Role::Gateway => {
            if nats.is_healthy() {
                ("consuming", None)
            } else {
                ("reconnecting", nats.error())
            }
        }
        (PublisherState::Starting, _) => ("starting", None),
        (PublisherState::Streaming, _) => ("streaming", None),
        (PublisherState::Standby, _) => ("standby", None),
        (PublisherState::Reconnecting { error }, _) => ("reconnecting", Some(error.clone())),
        (PublisherState::Broken { reason }, _) => ("broken", Some(reason.clone())),
        (PublisherState::Stopped, _) => ("stopped", None),
    };
    let running = match role {
        Role::Gateway => state.nats.as_ref().is_some_and(|nats| nats.is_healthy()),
        _ => publisher == PublisherState::Streaming,
    };
    let last_id = state.last_id();
    let log_size = async {
        let size = async |client: &tokio_postgres::Client| {
            client.query_one("SELECT pg_total_relation_size('rowcast.events')", &[]).await
        };
        let row = state.log.within(PROBE_TIMEOUT, size).await?.ok()?.ok()?;
        Some(row.get::<_, i64>(0))
    };
    let (log_size, slot_lag) = tokio::join!(log_size, slot_lag(&state));
    axum::Json(json!({
        "running": running,
        "role": role.name(),
        "state": state_name,
        "error": error,
        "source": state.settings.source.name(),
        "source_reason": state.settings.source_reason,
        "connections": bus.connections,
        "subscriptions": bus.subscriptions,
        "events_total": last_id,
        "events_per_second": state.rate.per_second(),
        "last_event_id": last_id,
        "last_event_time": bus.last_event_at.map(|t| t.to_string()),
        "log_size_bytes": log_size,
        "slot": state.settings.slot,
        "slot_lag_bytes": slot_lag,
        "slow_consumer_closes": bus.slow_consumer_closes,
        "nats": state.nats.as_ref().map(|nats| nats.stats(&state.settings.nats)),
    }))
    .into_response()
}

/// Prometheus text format; needs a token like stats when `--auth jwt`.
pub async fn metrics(State(state): State<Arc<AppState>>, _: Authorized) -> Response {
    let bus = state.bus.stats();
    let snapshot = crate::metrics::Snapshot {
        connections: bus.connections,
        subscriptions: bus.subscriptions,
        slow_consumer_closes: bus.slow_consumer_closes,
        outbound_frames: state.bus.outbound_frames(),
        slot_lag_bytes: slot_lag(&state).await,
        source: state.settings.source.name(),
        role: state.settings.role.name(),
        nats: state.nats.as_ref().map(|nats| nats.metrics()),
    };
    let body = state.metrics.render(&snapshot);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// Bytes of WAL the slot has not confirmed (replication only; gateways capture nothing).
async fn slot_lag(state: &AppState) -> Option<i64> {
    if !state.settings.role.captures() {
        return None;
    }
    let lag = async |client: &tokio_postgres::Client| {
        client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&state.settings.slot],
            )
            .await
    };
    let row = state.source.within(PROBE_TIMEOUT, lag).await?.ok()?.ok()??;
    row.get::<_, Option<i64>>(0)
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when this process does its part and the log answers: `all` streams from the source;
/// a publisher streams, or stands by for the active one, and reaches NATS; a gateway has
/// consumed the stream since it started. A gateway that lost NATS later stays ready: it still
/// delivers every event, from the log, about once per `idle_check` (stats, metrics and its
/// log say it is degraded), and pulling every gateway out of a load balancer at once would
/// turn a NATS outage into an outage of the clients.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let publisher = state.publisher.state.borrow().clone();
    let nats = state.nats.as_ref().is_some_and(|nats| nats.is_connected());
    let (working, standby) = match state.settings.role {
        Role::All => (publisher == PublisherState::Streaming, false),
        Role::Publisher => (
            nats && matches!(publisher, PublisherState::Streaming | PublisherState::Standby),
            publisher == PublisherState::Standby,
        ),
        Role::Gateway => (state.nats.as_ref().is_some_and(|nats| nats.has_started()), false),
    };
    let probe = async |client: &tokio_postgres::Client| client.simple_query("SELECT 1").await;
    let log = matches!(state.log.within(PROBE_TIMEOUT, probe).await, Some(Ok(Ok(_))));
    let ready = working && log;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({"ready": ready, "log_reachable": log});
    match state.settings.role {
        Role::Gateway => {
            let consuming = state.nats.as_ref().is_some_and(|nats| nats.is_healthy());
            body["stream_consuming"] = json!(consuming);
        }
        role => {
            body["source_streaming"] = json!(publisher == PublisherState::Streaming);
            if role == Role::Publisher {
                body["standby"] = json!(standby);
                body["nats_connected"] = json!(nats);
            }
        }
    }
    (status, axum::Json(body)).into_response()
}
