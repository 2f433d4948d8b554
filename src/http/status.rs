//! How the server is doing: stats, Prometheus metrics, liveness and readiness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::access::Authorized;
use crate::publisher::State as PublisherState;

/// The longest readiness, stats and metrics wait for a database before saying it does not
/// answer: a health check that hangs is worse than one that fails.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn stats(State(state): State<Arc<AppState>>, _: Authorized) -> Response {
    let bus = state.bus.stats();
    let publisher = state.publisher.state.borrow().clone();
    let (state_name, error) = match &publisher {
        PublisherState::Starting => ("starting", None),
        PublisherState::Streaming => ("streaming", None),
        PublisherState::Reconnecting { error } => ("reconnecting", Some(error.clone())),
        PublisherState::Broken { reason } => ("broken", Some(reason.clone())),
        PublisherState::Stopped => ("stopped", None),
    };
    let log_size = async {
        let size = async |client: &tokio_postgres::Client| {
            client.query_one("SELECT pg_total_relation_size('rowcast.events')", &[]).await
        };
        let row = state.log.within(PROBE_TIMEOUT, size).await?.ok()?.ok()?;
        Some(row.get::<_, i64>(0))
    };
    let (log_size, slot_lag) = tokio::join!(log_size, slot_lag(&state));
    axum::Json(json!({
        "running": publisher == PublisherState::Streaming,
        "state": state_name,
        "error": error,
        "source": state.settings.source.name(),
        "source_reason": state.settings.source_reason,
        "connections": bus.connections,
        "subscriptions": bus.subscriptions,
        "events_total": bus.head,
        "events_per_second": state.rate.per_second(),
        "last_event_id": bus.head,
        "last_event_time": bus.last_event_at.map(|t| t.to_string()),
        "log_size_bytes": log_size,
        "slot": state.settings.slot,
        "slot_lag_bytes": slot_lag,
        "slow_consumer_closes": bus.slow_consumer_closes,
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
    };
    let body = state.metrics.render(&snapshot);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// Bytes of WAL the slot has not confirmed (replication only).
async fn slot_lag(state: &AppState) -> Option<i64> {
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

/// Ready when the source is streaming and the log answers.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let streaming = *state.publisher.state.borrow() == PublisherState::Streaming;
    let probe = async |client: &tokio_postgres::Client| client.simple_query("SELECT 1").await;
    let log = matches!(state.log.within(PROBE_TIMEOUT, probe).await, Some(Ok(Ok(_))));
    let status = if streaming && log { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        axum::Json(
            json!({"ready": streaming && log, "source_streaming": streaming, "log_reachable": log}),
        ),
    )
        .into_response()
}
