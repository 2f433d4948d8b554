//! Server frames, one at a time: events become lines to print, control frames are logged,
//! and the cursor records how far the server has vouched that tail has got. No I/O, and never
//! panics on any input; its only side effect is logging.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::TailError;

/// The resume point: every matching event with an id at or below it has been printed or
/// never existed. Each connection subscribes with `since=<cursor>`; events at or below it
/// are dropped as duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cursor(pub(super) Option<u64>);

impl Cursor {
    pub(super) fn covers(self, id: u64) -> bool {
        self.0.is_some_and(|cursor| id <= cursor)
    }

    pub(super) fn advance(&mut self, id: u64) {
        self.0 = Some(self.0.map_or(id, |cursor| cursor.max(id)));
    }
}

/// What one connection has seen so far.
#[derive(Debug, Default)]
pub(super) struct Connection {
    /// The subscription asked for `history`: `subscribed.last_id` vouches for nothing until
    /// `caught_up`, the events up to it are still to come.
    pub(super) history: bool,
    pub(super) subscribed: bool,
    pub(super) printed: u64,
}

/// What to do with one text frame.
#[derive(Debug)]
pub(super) enum Step {
    Print { id: u64, line: String },
    Skip,
    Fatal(TailError),
}

/// Reacts to one text frame: events not yet printed become lines, control frames are logged
/// and may move the cursor. Never panics, whatever the server sends.
pub(super) fn handle(text: &str, cursor: &mut Cursor, connection: &mut Connection) -> Step {
    match parse_frame(text) {
        Frame::Event { id, .. } if cursor.covers(id) => {
            tracing::debug!(id, "dropping an event at or below the cursor");
            Step::Skip
        }
        Frame::Event { id, line } => Step::Print { id, line },
        Frame::Control { kind, body } => control(&kind, &body, cursor, connection),
        Frame::Malformed(reason) => {
            tracing::warn!(%reason, bytes = text.len(), "ignoring a malformed frame");
            Step::Skip
        }
    }
}

fn control(
    kind: &str,
    body: &Map<String, Value>,
    cursor: &mut Cursor,
    connection: &mut Connection,
) -> Step {
    let number = |key| body.get(key).and_then(Value::as_u64);
    let text = |key| body.get(key).and_then(Value::as_str).unwrap_or_default();
    match kind {
        "welcome" => tracing::info!(
            connection_id = text("connection_id"),
            last_id = number("last_id"),
            "connected"
        ),
        "subscribed" => {
            connection.subscribed = true;
            // Live mode: the server delivers every matching event after last_id.
            if let (None, Some(last_id), false) = (cursor.0, number("last_id"), connection.history)
            {
                cursor.advance(last_id);
            }
            tracing::info!(
                subscription_id = text("subscription_id"),
                last_id = number("last_id"),
                "subscribed"
            );
        }
        "caught_up" => {
            // Every matching event up to last_id has been delivered, so resume after it.
            if let Some(last_id) = number("last_id") {
                cursor.advance(last_id);
            }
            tracing::info!(last_id = number("last_id"), "caught up; events are live now");
        }
        "reset" => {
            let oldest_id = number("oldest_id");
            tracing::warn!(
                oldest_id,
                reason = text("reason"),
                "the cursor is older than the server's log: events before oldest_id are gone"
            );
            // The gap is reported; later connections need not hit it again.
            if let Some(oldest_id) = oldest_id {
                cursor.advance(oldest_id.saturating_sub(1));
            }
        }
        "error" => {
            let (code, message) = (text("code"), text("message"));
            // Before `subscribed`, an error is about the subscription tail asked for.
            if !connection.subscribed && matches!(code, "bad_request" | "forbidden") {
                return Step::Fatal(TailError::Subscription {
                    code: code.to_owned(),
                    message: message.to_owned(),
                });
            }
            tracing::warn!(code, detail = message, "the server reported an error");
        }
        other => tracing::info!(frame = other, "control frame"),
    }
    Step::Skip
}

/// One text frame, classified.
#[derive(Debug, PartialEq)]
enum Frame {
    /// An event (its `type` has a dot): its id and the line to print.
    Event {
        id: u64,
        line: String,
    },
    /// A control frame (its `type` has no dot).
    Control {
        kind: String,
        body: Map<String, Value>,
    },
    Malformed(String),
}

fn parse_frame(text: &str) -> Frame {
    let fields = match serde_json::from_str::<Fields<'_>>(text) {
        Ok(fields) => fields.0,
        Err(err) => return Frame::Malformed(err.to_string()),
    };
    let get =
        |key: &str| fields.iter().rev().find(|(name, _)| name == key).map(|(_, raw)| raw.get());
    let Some(kind) = get("type").and_then(|raw| serde_json::from_str::<String>(raw).ok()) else {
        return Frame::Malformed("no string `type`".into());
    };
    if !kind.contains('.') {
        return match serde_json::from_str(text) {
            Ok(body) => Frame::Control { kind, body },
            Err(err) => Frame::Malformed(err.to_string()),
        };
    }
    let id = get("id").and_then(|raw| serde_json::from_str::<u64>(raw).ok());
    let Some(id) = id.filter(|id| *id > 0) else {
        return Frame::Malformed(format!("{kind} event without a positive integer `id`"));
    };
    // The envelope rebuilt from its raw values, so data is printed exactly as received.
    let mut line = String::with_capacity(text.len());
    line.push('{');
    for (name, raw) in fields.iter().filter(|(name, _)| name != "subscription_ids") {
        if line.len() > 1 {
            line.push(',');
        }
        match serde_json::to_string(name) {
            Ok(name) => line.push_str(&name),
            Err(err) => return Frame::Malformed(err.to_string()),
        }
        line.push(':');
        let raw = raw.get();
        if raw.contains(['\n', '\r']) {
            // Only whitespace between tokens can hold a raw line break: keep the line whole.
            line.push_str(&raw.replace(['\n', '\r'], " "));
        } else {
            line.push_str(raw);
        }
    }
    line.push('}');
    Frame::Event { id, line }
}

/// A JSON object's members in order, values kept as raw text.
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(16);
                while let Some(name) = map.next_key::<String>()? {
                    fields.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_lose_subscription_ids_and_nothing_else() {
        let text = r#"{"id":7,"type":"agent.created","subscription_ids":["s1","s3"],"organization_id":"quant","data":{"price":1.50,"big":123456789012345678901234567890,"name":"caf\u00e9","nested":{"b":1,"a":2}},"old":null}"#;
        let expected = r#"{"id":7,"type":"agent.created","organization_id":"quant","data":{"price":1.50,"big":123456789012345678901234567890,"name":"caf\u00e9","nested":{"b":1,"a":2}},"old":null}"#;
        assert_eq!(parse_frame(text), Frame::Event { id: 7, line: expected.into() });
    }

    #[test]
    fn events_stay_on_one_line() {
        let text =
            "{ \"type\" : \"agent.created\",\r\n \"id\": 3,\n \"data\": {\n\"a\": [1,\n2]\n}\n}\n";
        let Frame::Event { id: 3, line } = parse_frame(text) else { panic!("not an event") };
        assert!(!line.contains(['\n', '\r']), "{line}");
        let value: Value = serde_json::from_str(&line).expect("still JSON");
        assert_eq!(value["data"]["a"], serde_json::json!([1, 2]));
        assert_eq!(line.find("type"), Some(2), "{line}");
    }

    #[test]
    fn control_frames() {
        let Frame::Control { kind, body } =
            parse_frame(r#"{"type":"caught_up","subscription_id":"s1","last_id":9}"#)
        else {
            panic!("not a control frame")
        };
        assert_eq!((kind.as_str(), body["last_id"].as_u64()), ("caught_up", Some(9)));
    }

    #[test]
    fn malformed_frames() {
        for text in [
            "",
            "not json",
            "[1,2]",
            "42",
            "{\"type\":\"agent.created\"",
            "{\"id\":1}",
            "{\"type\":7,\"id\":1}",
            "{\"type\":\"agent.created\"}",
            "{\"type\":\"agent.created\",\"id\":0}",
            "{\"type\":\"agent.created\",\"id\":-3}",
            "{\"type\":\"agent.created\",\"id\":1.5}",
            "{\"type\":\"agent.created\",\"id\":\"1\"}",
            "{\"type\":\"agent.created\",\"id\":18446744073709551616}",
            "{\"type\":\"agent.created\",\"id\":1,\"data\":\"\u{1}\"}",
        ] {
            assert!(matches!(parse_frame(text), Frame::Malformed(_)), "{text:?}");
        }
        // Deep nesting neither overflows the stack nor is refused in an event's data, which is
        // passed through unparsed; a control frame is parsed, within serde_json's depth limit.
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep = format!(r#"{{"type":"a.b","id":1,"data":{nested}}}"#);
        assert!(matches!(parse_frame(&deep), Frame::Event { id: 1, .. }));
        let deep = format!(r#"{{"type":"pong","data":{nested}}}"#);
        assert!(matches!(parse_frame(&deep), Frame::Malformed(_)));
    }

    fn event(id: u64) -> String {
        format!(r#"{{"id":{id},"type":"agent.updated","subscription_ids":["s1"]}}"#)
    }

    /// Feeds frames through `handle` as a session would; returns the ids printed.
    fn feed(cursor: &mut Cursor, frames: &[String]) -> Vec<u64> {
        feed_on(&mut Connection::default(), cursor, frames)
    }

    fn feed_on(connection: &mut Connection, cursor: &mut Cursor, frames: &[String]) -> Vec<u64> {
        let mut printed = Vec::new();
        for frame in frames {
            if let Step::Print { id, .. } = handle(frame, cursor, connection) {
                cursor.advance(id);
                printed.push(id);
            }
        }
        printed
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut cursor = Cursor(None);
        assert_eq!(
            feed(&mut cursor, &[event(1), event(2), event(2), event(1), event(3)]),
            [1, 2, 3]
        );
        assert_eq!(feed(&mut cursor, &[event(3), event(4), "garbage".into(), event(5)]), [4, 5]);
        assert_eq!(cursor, Cursor(Some(5)));
        let mut cursor = Cursor(Some(10));
        assert_eq!(feed(&mut cursor, &[event(9), event(10), event(11)]), [11]);
    }

    #[test]
    fn control_frames_move_the_cursor_only_when_the_server_vouches() {
        let subscribed = r#"{"type":"subscribed","subscription_id":"s1","last_id":40}"#.to_owned();
        // Live mode: everything after last_id is promised, so that is where to resume.
        let mut cursor = Cursor(None);
        feed(&mut cursor, std::slice::from_ref(&subscribed));
        assert_eq!(cursor, Cursor(Some(40)));
        // Resuming: the backlog after the cursor is still to come.
        let mut cursor = Cursor(Some(12));
        feed(&mut cursor, &[subscribed]);
        assert_eq!(cursor, Cursor(Some(12)));
        feed(&mut cursor, &[r#"{"type":"caught_up","subscription_id":"s1","last_id":40}"#.into()]);
        assert_eq!(cursor, Cursor(Some(40)));
        let reset =
            r#"{"type":"reset","subscription_id":"s1","reason":"cursor_expired","oldest_id":100}"#;
        let mut cursor = Cursor(Some(3));
        feed(&mut cursor, &[reset.into()]);
        assert_eq!(cursor, Cursor(Some(99)));
        feed(
            &mut cursor,
            &[r#"{"type":"caught_up","last_id":"x"}"#.into(), r#"{"type":"pong"}"#.into()],
        );
        assert_eq!(cursor, Cursor(Some(99)));
    }

    #[test]
    fn history_is_printed_before_the_cursor_moves_to_last_id() {
        let mut connection = Connection { history: true, ..Connection::default() };
        let mut cursor = Cursor(None);
        let subscribed = r#"{"type":"subscribed","subscription_id":"s1","last_id":40}"#;
        let caught_up = r#"{"type":"caught_up","subscription_id":"s1","last_id":40}"#;
        let frames = [subscribed.into(), event(31), event(38), caught_up.into(), event(41)];
        assert_eq!(feed_on(&mut connection, &mut cursor, &frames), [31, 38, 41]);
        assert_eq!(cursor, Cursor(Some(41)));
    }

    #[test]
    fn refused_subscriptions_are_definite() {
        let error = r#"{"type":"error","code":"bad_request","message":"bad type pattern"}"#;
        let mut connection = Connection::default();
        let step = handle(error, &mut Cursor(None), &mut connection);
        assert!(matches!(step, Step::Fatal(TailError::Subscription { .. })), "{step:?}");
        connection.subscribed = true;
        assert!(matches!(handle(error, &mut Cursor(None), &mut connection), Step::Skip));
        let mut connection = Connection::default();
        let limited = r#"{"type":"error","code":"rate_limited","message":"slow down"}"#;
        assert!(matches!(handle(limited, &mut Cursor(None), &mut connection), Step::Skip));
    }
}
