//! The frames of SPEC §5: parsing what clients send and rendering what the server says.
//! Pure; nothing here panics on input.

use serde_json::{Map, Value, json};

use crate::filter::{Filter, FilterError};
use crate::model::Timestamp;

/// The `code` of an error frame.
/// The fastest a replay may be played back (SPEC §5: 0 < speed ≤ 100).
pub const MAX_REPLAY_SPEED: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    TooManySubscriptions,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { code: ErrorCode::BadRequest, message: message.into() }
    }
}

impl From<FilterError> for ProtocolError {
    fn from(err: FilterError) -> Self {
        Self::bad_request(err.to_string())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Subscribe {
        filter: Filter,
        start: Start,
    },
    Unsubscribe {
        subscription: String,
    },
    GetMetadata,
    Ping,
    /// A fresh token for this connection.
    Auth {
        token: String,
    },
    /// Historic events in `[from, to)` with their spacing divided by `speed`.
    Replay {
        filter: Filter,
        from: Timestamp,
        to: Timestamp,
        speed: f64,
    },
    StopReplay {
        replay: String,
    },
}

/// Where a new subscription starts (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Every matching event after `subscribed.last_id`.
    Live,
    /// `since`: the matching events after this id first, then `caught_up`, then live.
    Since(u64),
    /// `history`: the last this many matching events up to `last_id` first, then `caught_up`,
    /// then live.
    History(usize),
}

/// The most events `history` may ask for.
pub const MAX_HISTORY: usize = 1000;

impl Start {
    /// From the `since` and `history` values of a subscribe frame or a query string, as given.
    pub fn parse(since: Option<&str>, history: Option<&str>) -> Result<Self, ProtocolError> {
        match (since, history) {
            (None, None) => Ok(Self::Live),
            (Some(_), Some(_)) => {
                Err(ProtocolError::bad_request("since and history exclude each other: use one"))
            }
            (Some(since), None) => since.parse().map(Self::Since).map_err(|_| {
                ProtocolError::bad_request(format!(
                    "since must be a non-negative integer event id, not {since:?}"
                ))
            }),
            (None, Some(history)) => history
                .parse()
                .ok()
                .filter(|n| (1..=MAX_HISTORY).contains(n))
                .map(Self::History)
                .ok_or_else(|| {
                    ProtocolError::bad_request(format!(
                        "history must be a number of events from 1 to {MAX_HISTORY}, not {history:?}"
                    ))
                }),
        }
    }
}

/// A client frame: its `ref` (echoed in the reply) and what it asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub reference: Option<Value>,
    pub action: Result<Action, ProtocolError>,
}

pub fn parse(text: &str) -> Request {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(err) => {
            return Request {
                reference: None,
                action: Err(ProtocolError::bad_request(format!("frame is not valid JSON: {err}"))),
            };
        }
    };
    let Value::Object(mut object) = value else {
        return Request {
            reference: None,
            action: Err(ProtocolError::bad_request("frame must be a JSON object with an action")),
        };
    };
    let reference = object.remove("ref");
    Request { reference, action: action(object) }
}

fn action(mut object: Map<String, Value>) -> Result<Action, ProtocolError> {
    let name = match object.remove("action") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(ProtocolError::bad_request("action must be a string")),
        None => return Err(ProtocolError::bad_request("frame has no action")),
    };
    let allow = |object: &Map<String, Value>, fields: &[&str]| match object
        .keys()
        .find(|key| !fields.contains(&key.as_str()))
    {
        Some(key) => Err(ProtocolError::bad_request(format!("{name}: unknown field {key:?}"))),
        None => Ok(()),
    };
    match name.as_str() {
        "subscribe" => {
            allow(&object, &["filter", "since", "history"])?;
            let filter = Filter::from_json(object.get("filter"))?;
            let number = |field: &str| match object.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(value) => value.as_u64().map(|n| Some(n.to_string())).ok_or_else(|| {
                    ProtocolError::bad_request(format!("{field} must be a non-negative integer"))
                }),
            };
            let start = Start::parse(number("since")?.as_deref(), number("history")?.as_deref())?;
            Ok(Action::Subscribe { filter, start })
        }
        "unsubscribe" => {
            allow(&object, &["subscription_id"])?;
            match object.remove("subscription_id") {
                Some(Value::String(subscription)) => Ok(Action::Unsubscribe { subscription }),
                _ => Err(ProtocolError::bad_request("unsubscribe needs a subscription_id string")),
            }
        }
        "get_metadata" => allow(&object, &[]).map(|()| Action::GetMetadata),
        "ping" => allow(&object, &[]).map(|()| Action::Ping),
        "replay" => {
            allow(&object, &["filter", "from", "to", "speed"])?;
            let filter = Filter::from_json(object.get("filter"))?;
            let time = |field: &str| {
                object
                    .get(field)
                    .and_then(Value::as_str)
                    .and_then(Timestamp::parse_rfc3339)
                    .ok_or_else(|| {
                        ProtocolError::bad_request(format!(
                            "replay needs {field} as an RFC 3339 time like 2026-11-22T10:15:30Z"
                        ))
                    })
            };
            let (from, to) = (time("from")?, time("to")?);
            if from >= to {
                return Err(ProtocolError::bad_request("replay: from must be before to"));
            }
            let speed = match object.get("speed") {
                None | Some(Value::Null) => 1.0,
                Some(value) => value
                    .as_f64()
                    .filter(|s| *s > 0.0 && *s <= MAX_REPLAY_SPEED)
                    .ok_or_else(|| {
                        ProtocolError::bad_request(format!(
                            "replay: speed must be a number in (0, {MAX_REPLAY_SPEED}]"
                        ))
                    })?,
            };
            Ok(Action::Replay { filter, from, to, speed })
        }
        "stop_replay" => {
            allow(&object, &["replay_id"])?;
            match object.remove("replay_id") {
                Some(Value::String(replay)) => Ok(Action::StopReplay { replay }),
                _ => Err(ProtocolError::bad_request("stop_replay needs a replay_id string")),
            }
        }
        "auth" => {
            allow(&object, &["token"])?;
            match object.remove("token") {
                Some(Value::String(token)) => Ok(Action::Auth { token }),
                _ => Err(ProtocolError::bad_request("auth needs a token string")),
            }
        }
        other => Err(ProtocolError::bad_request(format!(
            "unknown action {other:?} (expected subscribe, unsubscribe, get_metadata, ping, auth, replay or stop_replay)"
        ))),
    }
}

/// `s7` → 7.
pub fn subscription_number(id: &str) -> Option<u32> {
    id.strip_prefix('s')?.parse().ok()
}

pub fn subscription_name(number: u32) -> String {
    format!("s{number}")
}

fn render(mut frame: Value, reference: Option<&Value>) -> String {
    if let (Some(reference), Value::Object(object)) = (reference, &mut frame) {
        object.insert("ref".into(), reference.clone());
    }
    frame.to_string()
}

pub fn welcome(connection_id: &str, last_id: u64) -> String {
    render(json!({"type": "welcome", "connection_id": connection_id, "last_id": last_id}), None)
}

pub fn subscribed(subscription: u32, filter: &Filter, last_id: u64, r: Option<&Value>) -> String {
    let id = subscription_name(subscription);
    let frame = json!({"type": "subscribed", "subscription_id": id, "filter": filter.to_json(), "last_id": last_id});
    render(frame, r)
}

pub fn unsubscribed(subscription: &str, reference: Option<&Value>) -> String {
    render(json!({"type": "unsubscribed", "subscription_id": subscription}), reference)
}

pub fn caught_up(subscription: u32, last_id: u64) -> String {
    let id = subscription_name(subscription);
    render(json!({"type": "caught_up", "subscription_id": id, "last_id": last_id}), None)
}

/// A subscription of a connection that fell behind now catches up from the log, after
/// `last_id` (everything matching up to it was sent before this frame); `caught_up` follows.
pub fn lagging(subscription: u32, last_id: u64) -> String {
    let id = subscription_name(subscription);
    render(json!({"type": "lagging", "subscription_id": id, "last_id": last_id}), None)
}

pub fn reset(subscription: u32, reason: &str, oldest_id: u64) -> String {
    let id = subscription_name(subscription);
    let frame =
        json!({"type": "reset", "subscription_id": id, "reason": reason, "oldest_id": oldest_id});
    render(frame, None)
}

pub fn authenticated(expires_at: Option<u64>, reference: Option<&Value>) -> String {
    render(json!({"type": "authenticated", "expires_at": expires_at}), reference)
}

pub fn replay_started(replay: u32, total: u64, reference: Option<&Value>) -> String {
    render(
        json!({"type": "replay_started", "replay_id": replay_name(replay), "total": total}),
        reference,
    )
}

pub fn replay_progress(replay: u32, sent: u64, total: u64) -> String {
    render(
        json!({"type": "replay_progress", "replay_id": replay_name(replay), "sent": sent, "total": total}),
        None,
    )
}

pub fn replay_finished(replay: u32, sent: u64) -> String {
    render(json!({"type": "replay_finished", "replay_id": replay_name(replay), "sent": sent}), None)
}

/// A replay that could not go on (the event log failed): an error naming it.
pub fn replay_failed(replay: u32) -> String {
    let message = "the replay stopped: the event log is unavailable";
    render(
        json!({"type": "error", "code": "unavailable", "message": message, "replay_id": replay_name(replay)}),
        None,
    )
}

pub fn replay_stopped(replay: &str, reference: Option<&Value>) -> String {
    render(json!({"type": "replay_stopped", "replay_id": replay}), reference)
}

/// `r7` → 7.
pub fn replay_number(id: &str) -> Option<u32> {
    id.strip_prefix('r')?.parse().ok()
}

pub fn replay_name(number: u32) -> String {
    format!("r{number}")
}

pub fn pong(reference: Option<&Value>) -> String {
    render(json!({"type": "pong"}), reference)
}

pub fn metadata(data: &Value, reference: Option<&Value>) -> String {
    render(json!({"type": "metadata", "data": data}), reference)
}

pub fn error(err: &ProtocolError, reference: Option<&Value>) -> String {
    render(json!({"type": "error", "code": err.code.as_str(), "message": err.message}), reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(text: &str) -> ProtocolError {
        parse(text).action.expect_err("refused")
    }

    #[test]
    fn subscribe_with_filter_since_and_ref() {
        let request = parse(
            r#"{"action":"subscribe","filter":{"type":"agent.*","organization_id":"quant"},"since":1040,"ref":"r1"}"#,
        );
        assert_eq!(request.reference, Some(json!("r1")));
        let Ok(Action::Subscribe { filter, start }) = request.action else { panic!("subscribe") };
        assert_eq!(start, Start::Since(1040));
        assert_eq!(filter.to_json(), json!({"type": ["agent.*"], "organization_id": ["quant"]}));
    }

    #[test]
    fn history_asks_for_one_to_a_thousand_events_and_excludes_since() {
        let start = |text: &str| match parse(text).action {
            Ok(Action::Subscribe { start, .. }) => Ok(start),
            Ok(other) => panic!("{other:?}"),
            Err(err) => Err(err.message),
        };
        assert_eq!(start(r#"{"action":"subscribe","history":50}"#), Ok(Start::History(50)));
        assert_eq!(start(r#"{"action":"subscribe","history":1000}"#), Ok(Start::History(1000)));
        assert_eq!(start(r#"{"action":"subscribe","history":null}"#), Ok(Start::Live));
        for refused in [r#"0"#, "1001", "-1", "2.5", r#""50""#, "18446744073709551616"] {
            let text = format!(r#"{{"action":"subscribe","history":{refused}}}"#);
            let message = start(&text).expect_err(&text);
            assert!(message.contains("history"), "{text}: {message}");
        }
        let both = start(r#"{"action":"subscribe","since":3,"history":5}"#);
        assert_eq!(both, Err("since and history exclude each other: use one".into()));
        assert_eq!(Start::parse(None, Some("20")).map_err(|e| e.message), Ok(Start::History(20)));
        assert!(Start::parse(Some("x"), None).is_err());
    }

    #[test]
    fn bad_input_is_a_bad_request_with_its_ref() {
        for text in [
            "not json",
            "[1,2]",
            r#"{"no":"action"}"#,
            r#"{"action":5}"#,
            r#"{"action":"dance"}"#,
            r#"{"action":"subscribe","filter":{"type":5}}"#,
            r#"{"action":"subscribe","since":-1}"#,
            r#"{"action":"subscribe","since":"10"}"#,
            r#"{"action":"subscribe","filtre":{}}"#,
            r#"{"action":"unsubscribe"}"#,
            r#"{"action":"ping","extra":1}"#,
        ] {
            assert_eq!(fails(text).code, ErrorCode::BadRequest, "{text}");
        }
        let request = parse(r#"{"action":"dance","ref":{"n":1}}"#);
        let err = request.action.expect_err("refused");
        assert_eq!(
            error(&err, request.reference.as_ref()),
            r#"{"type":"error","code":"bad_request","message":"unknown action \"dance\" (expected subscribe, unsubscribe, get_metadata, ping, auth, replay or stop_replay)","ref":{"n":1}}"#
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(fails(&deep).code, ErrorCode::BadRequest);
    }

    use proptest::prelude::*;

    /// JSON-ish text: fragments of real frames, shuffled, cut and glued.
    fn jsonish() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(
            &[
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                "\"action\"",
                "\"subscribe\"",
                "\"filter\"",
                "\"type\"",
                "\"agent.*\"",
                "\"since\"",
                "\"history\"",
                "1e400",
                "-1",
                "18446744073709551616",
                "null",
                "true",
                "\"ref\"",
                "\"\\ud800\"",
                "\"organization_id\"",
                "[]",
                "{}",
                "\"*\"",
                " ",
                "\u{0}",
            ][..],
        );
        prop::collection::vec(pieces, 0..40).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn the_frame_parser_never_panics(text in ".{0,200}", glued in jsonish()) {
            let _ = parse(&text);
            let _ = parse(&glued);
        }

        #[test]
        fn every_well_formed_subscribe_parses(
            types in prop::collection::vec(prop::sample::select(&["*", "agent.*", "*.deleted", "user.created"][..]), 1..4),
            orgs in prop::collection::vec("\\PC{0,12}", 1..3),
            since in prop::option::of(any::<u64>()),
            reference in any::<i64>(),
        ) {
            let frame = json!({"action": "subscribe", "filter": {"type": types, "organization_id": orgs}, "since": since, "ref": reference});
            let request = parse(&frame.to_string());
            prop_assert_eq!(request.reference, Some(json!(reference)));
            let Ok(Action::Subscribe { filter, start }) = request.action else {
                return Err(TestCaseError::fail("not a subscribe"));
            };
            prop_assert_eq!(start, since.map_or(Start::Live, Start::Since));
            prop_assert!(filter.organizations().is_some_and(|o| o.iter().all(|x| orgs.contains(x))));
        }
    }

    #[test]
    fn subscription_ids() {
        assert_eq!(subscription_number("s12"), Some(12));
        assert_eq!(subscription_number("12"), None);
        assert_eq!(subscription_number("sx"), None);
        assert_eq!(subscription_name(3), "s3");
    }

    #[test]
    fn control_frames_have_no_dot_in_their_type() {
        let filter = Filter::all();
        for frame in [
            welcome("c1", 5),
            subscribed(1, &filter, 5, None),
            unsubscribed("s1", None),
            caught_up(1, 5),
            lagging(1, 5),
            reset(1, "cursor_expired", 3),
            pong(None),
        ] {
            let value: Value = serde_json::from_str(&frame).expect("json");
            assert!(!value["type"].as_str().expect("type").contains('.'), "{frame}");
        }
    }
}
