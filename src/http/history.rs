//! `GET /api/events`: history pages straight from the log, confined to the token's scope.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::access::{AppError, authorize, query_pairs};
use crate::filter::Filter;
use crate::log::Range;
use crate::model::Timestamp;

/// Events per history page when `limit` is not given.
const DEFAULT_PAGE: usize = 100;
/// The longest a history request waits for the log before answering 503: a page is one
/// query by id range, but `where` predicates are checked on the rows it scans, which on a busy
/// two-core machine took over 2 s for a few thousand events; a client is still better served
/// by "try again" than by a hang.
const HISTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn log_unavailable(err: impl std::fmt::Display) -> AppError {
    tracing::warn!(error = %err, "event log query failed");
    AppError::Unavailable("the event log is unavailable; try again".into())
}

/// `GET /api/events`: history in id order, `{"events":[...],"next":ID}`. `next` is the id to
/// pass as `since` for the following page: the last id returned, or `since` when none was.
pub async fn history(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let pairs = query_pairs(query.as_deref());
    let scope = authorize(&state, &headers, &pairs)?;
    let param = |name: &str| pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    for (key, _) in &pairs {
        let known = [
            "type",
            "organization_id",
            "domain_id",
            "severity",
            "where",
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
    filter
        .check_redactions(state.settings.mapping.redactions())
        .map_err(|err| AppError::BadRequest(err.to_string()))?;
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
    let max = state.settings.server.max_history_page;
    let limit = match number("limit")? {
        None => DEFAULT_PAGE.min(max),
        Some(0) => return Err(AppError::BadRequest("limit must be at least 1".into())),
        Some(n) => (n as usize).min(max),
    };
    let since = number("since")?.unwrap_or(0);
    let range = Range { after: since, up_to: None, from: time("from")?, to: time("to")?, limit };
    let log = crate::log::EventLog(state.log.clone());
    let page = log.read_within(HISTORY_TIMEOUT, &filter, &range).await.map_err(log_unavailable)?;
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
