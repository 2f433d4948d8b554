//! `POST /api/events` (SPEC §3a): application events over HTTP, through the log's single
//! writer.
//!
//! A request is checked whole before anything is sent to the writer: the body's size (refused
//! with 413 before it is read whole), each element's fields, that its type is declared, its
//! size, and that the token may publish it. The first bad element refuses the request, naming
//! its index and field; nothing is appended. A good request is appended in one transaction
//! by the publisher's writer (see [`crate::log::app`]), which answers once it committed.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::AppState;
use super::access::{AppError, query_pairs, token_from};
use crate::auth::Grant;
use crate::log::app::{AppendRequest, KeyedEvent};
use crate::mapping::{AppEvent, Mapping};
use crate::model::{Source, Timestamp, Via};

/// Most events in one request.
pub const MAX_EVENTS: usize = 1000;

/// How long a request waits for the writer (to take it, then to commit it) before the client
/// is told to retry: the publisher may be reconnecting to the log.
const APPEND_DEADLINE: Duration = Duration::from_secs(30);

pub async fn route(
    State(state): State<Arc<AppState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match publish(&state, &uri, &headers, body).await {
        Ok(reply) => (StatusCode::CREATED, axum::Json(reply)).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn publish(
    state: &AppState,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, AppError> {
    let token = token_from(headers, &query_pairs(uri.query()));
    let grant = state
        .settings
        .server
        .auth
        .grant(token.as_deref())
        .map_err(|err| AppError::Unauthorized(err.to_string()))?;
    let limit = state.settings.server.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(limit));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| too_large(limit))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|err| AppError::BadRequest(format!("the body is not JSON: {err}")))?;
    let events = checked(
        value,
        &state.settings.mapping,
        &grant,
        state.settings.server.max_event_bytes,
        Timestamp::now(),
    )?;
    let Some(outbox) = &state.appends else {
        return Err(AppError::Unavailable("this server does not write the event log".into()));
    };
    if *state.publisher.state.borrow() == crate::publisher::State::Standby {
        // Waiting would only end in the deadline: say at once where the writer is not.
        return Err(AppError::Unavailable(
            "this publisher is a standby: another one writes the event log".into(),
        ));
    }
    let (reply, answer) = oneshot::channel();
    let unavailable = || {
        AppError::Unavailable(
            "the event log's writer did not answer in time; retry (with keys, safely)".into(),
        )
    };
    let request = AppendRequest { events, reply };
    let deadline = tokio::time::Instant::now() + APPEND_DEADLINE;
    tokio::time::timeout_at(deadline, outbox.send(request))
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| AppError::Unavailable("the publisher has stopped".into()))?;
    let appended = tokio::time::timeout_at(deadline, answer)
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| AppError::Unavailable("the publisher dropped the request; retry".into()))?
        .map_err(|err| AppError::Unavailable(err.to_string()))?;
    let events: Vec<Value> = appended
        .into_iter()
        .map(|a| json!({"id": a.id, "key": a.key, "duplicate": a.duplicate}))
        .collect();
    Ok(json!({ "events": events }))
}

fn too_large(limit: usize) -> AppError {
    AppError::TooLarge(format!("the request body is over {limit} bytes"))
}

/// The request's events, each checked and made an envelope, or the refusal of the first bad
/// one, named by index and field. Pure.
pub fn checked(
    body: Value,
    mapping: &Mapping,
    grant: &Grant,
    max_event_bytes: usize,
    now: Timestamp,
) -> Result<Vec<KeyedEvent>, AppError> {
    let elements = match body {
        Value::Object(mut object)
            if !object.contains_key("type") && object.contains_key("events") =>
        {
            match object.remove("events") {
                Some(Value::Array(elements)) if object.is_empty() => elements,
                Some(Value::Array(_)) => {
                    return Err(AppError::BadRequest(
                        "a batch is {\"events\": [...]} and nothing else".into(),
                    ));
                }
                _ => return Err(AppError::BadRequest("`events` must be an array".into())),
            }
        }
        single @ Value::Object(_) => vec![single],
        _ => {
            return Err(AppError::BadRequest(
                "the body must be an event object or {\"events\": [...]}".into(),
            ));
        }
    };
    if elements.is_empty() {
        return Err(AppError::BadRequest("`events` is empty".into()));
    }
    if elements.len() > MAX_EVENTS {
        return Err(AppError::TooLarge(format!(
            "{} events in one request; at most {MAX_EVENTS}",
            elements.len()
        )));
    }
    let mut events = Vec::with_capacity(elements.len());
    for (index, element) in elements.into_iter().enumerate() {
        let at = |field: &str, problem: String| format!("events[{index}].{field} {problem}");
        let event = AppEvent::parse(element)
            .map_err(|err| AppError::BadRequest(at(&err.field, err.problem)))?;
        let Some(declared) = mapping.app_event(&event.event_type) else {
            return Err(AppError::BadRequest(at(
                "type",
                format!("{:?} is not declared in the mapping ([[event]])", event.event_type),
            )));
        };
        // The size of the data as JSON, whatever whitespace the client sent.
        let size = serde_json::to_string(&event.data).map_or(usize::MAX, |text| text.len());
        if size > max_event_bytes {
            return Err(AppError::TooLarge(at(
                "data",
                format!("is {size} bytes as JSON; at most {max_event_bytes} (--max-event-bytes)"),
            )));
        }
        grant
            .may_publish(event.organization_id.as_deref(), event.domain_id.as_deref())
            .map_err(|problem| AppError::Forbidden(format!("events[{index}]: {problem}")))?;
        let key = event.key.clone();
        let source = Source::App { via: Via::Http, lsn: None, xid: None };
        events.push(KeyedEvent { key, event: event.into_event(Some(declared), now, source) });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn grant(orgs: Option<&[&str]>, emit: bool) -> Grant {
        let organizations = orgs.map(|o| o.iter().map(|s| s.to_string()).collect());
        Grant { scope: Scope { organizations, domains: None, expires_at: None }, emit }
    }

    fn refusal(body: Value, grant: &Grant, max: usize) -> (StatusCode, String) {
        let err =
            checked(body, &Mapping::builtin(), grant, max, Timestamp(0)).expect_err("refused");
        let response = err.into_response();
        let status = response.status();
        (status, format!("{status}"))
    }

    #[test]
    fn one_event_or_a_batch() {
        let all = grant(None, true);
        let single = json!({"type": "deployment.log", "data": {"line": "x"}, "key": "k"});
        let events = checked(single, &Mapping::builtin(), &all, 100, Timestamp(0)).expect("ok");
        assert_eq!((events.len(), events[0].key.as_deref()), (1, Some("k")));
        assert_eq!(events[0].event.severity.as_str(), "debug");
        let batch = json!({"events": [
            {"type": "deployment.log", "data": {}},
            {"type": "cache.miss", "data": {}, "severity": "critical"}]});
        let events = checked(batch, &Mapping::builtin(), &all, 100, Timestamp(0)).expect("ok");
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn refusals_name_the_element_and_the_field() {
        let all = grant(None, true);
        let check = |body: Value| {
            checked(body, &Mapping::builtin(), &all, 16, Timestamp(0)).err().map(|err| match err {
                AppError::BadRequest(m) | AppError::TooLarge(m) | AppError::Forbidden(m) => m,
                _ => String::new(),
            })
        };
        let ok = json!({"type": "deployment.log", "data": {}});
        let cases = [
            (json!({"events": [ok, {"type": "deployment.log"}]}), "events[1].data is required"),
            (json!({"events": [ok, {"type": "nope.never", "data": {}}]}), "events[1].type"),
            (json!({"events": [{"type": "a.b.c", "data": {}}]}), "events[0].type \"a.b.c\" is not"),
            (
                json!({"type": "deployment.log", "data": {"line": "seventeen bytes"}}),
                "events[0].data",
            ),
            (json!({"events": []}), "empty"),
            (json!([1]), "must be an event object"),
            (json!({"events": [ok], "extra": 1}), "nothing else"),
        ];
        for (body, expected) in cases {
            let message = check(body.clone()).expect("refused");
            assert!(message.contains(expected), "{body}: {message}");
        }
        let many = json!({"events": vec![ok.clone(); MAX_EVENTS + 1]});
        assert_eq!(refusal(many, &all, 100).0, StatusCode::PAYLOAD_TOO_LARGE);
        let big = json!({"type": "deployment.log", "data": {"line": "seventeen bytes"}});
        assert_eq!(refusal(big, &all, 16).0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn the_token_must_emit_and_cover_every_organization() {
        let event =
            |org: &str| json!({"type": "deployment.log", "data": {}, "organization_id": org});
        let reader = grant(Some(&["quant"]), false);
        assert_eq!(refusal(event("quant"), &reader, 100).0, StatusCode::FORBIDDEN);
        let quant = grant(Some(&["quant"]), true);
        let batch = json!({"events": [event("quant"), event("acme")]});
        assert_eq!(refusal(batch, &quant, 100).0, StatusCode::FORBIDDEN);
        assert!(checked(event("quant"), &Mapping::builtin(), &quant, 100, Timestamp(0)).is_ok());
    }
}
