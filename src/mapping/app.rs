//! Application events (SPEC §3a): the declared types of the registry, and one event as an
//! application sends it (from `rowcast.emit()` or `POST /api/events`), checked field by field.
//! Pure: the same parser reads the SQL function's payload in both capture modes and an HTTP
//! element, so both give identical events.

use serde_json::{Map, Value};

use crate::model::{Event, Row, Severity, Source, Timestamp};

/// An application event type the mapping declares (`[[event]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AppEventType {
    pub event_type: String,
    /// For events of this type that do not say.
    pub severity: Severity,
    pub description: Option<String>,
}

/// Whether `text` is `<entity>.<action>`, each part `[a-z][a-z0-9_]*`: the same rule as the
/// SQL function's (`triggers/emit.sql`).
pub fn is_app_type(text: &str) -> bool {
    let part = |p: &str| {
        let mut chars = p.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    text.split_once('.').is_some_and(|(entity, action)| part(entity) && part(action))
}

/// One field of an application event that is not as it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {problem}")]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

fn invalid(field: &str, problem: impl Into<String>) -> Invalid {
    Invalid { field: field.to_owned(), problem: problem.into() }
}

/// An application event as sent, before the log numbers it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppEvent {
    pub event_type: String,
    pub data: Row,
    pub organization_id: Option<String>,
    pub domain_id: Option<String>,
    pub severity: Option<Severity>,
    /// The idempotency key (HTTP only).
    pub key: Option<String>,
}

/// The longest idempotency key.
pub const MAX_KEY_CHARS: usize = 200;

impl AppEvent {
    /// Reads one event object; unknown fields are refused so a misspelt one is not lost.
    pub fn parse(value: Value) -> Result<Self, Invalid> {
        let Value::Object(mut fields) = value else {
            return Err(invalid("event", "must be a JSON object"));
        };
        let event_type = match fields.remove("type") {
            Some(Value::String(text)) if is_app_type(&text) => text,
            Some(Value::String(text)) => {
                return Err(invalid(
                    "type",
                    format!("{text:?} is not <entity>.<action> with each part [a-z][a-z0-9_]*"),
                ));
            }
            Some(_) => return Err(invalid("type", "must be a string")),
            None => return Err(invalid("type", "is required")),
        };
        let data = match fields.remove("data") {
            Some(Value::Object(data)) => data,
            Some(_) => return Err(invalid("data", "must be a JSON object")),
            None => return Err(invalid("data", "is required")),
        };
        let organization_id = optional_text(&mut fields, "organization_id")?;
        let domain_id = optional_text(&mut fields, "domain_id")?;
        let severity = optional_text(&mut fields, "severity")?
            .map(|text| text.parse::<Severity>().map_err(|problem| invalid("severity", problem)))
            .transpose()?;
        let key = optional_text(&mut fields, "key")?;
        if let Some(key) = &key
            && (key.is_empty() || key.chars().count() > MAX_KEY_CHARS)
        {
            return Err(invalid("key", format!("must have 1 to {MAX_KEY_CHARS} characters")));
        }
        if let Some(field) = fields.keys().next() {
            return Err(invalid(field, "is not a field of an event"));
        }
        Ok(Self { event_type, data, organization_id, domain_id, severity, key })
    }

    /// The envelope, with the declared type's default severity when the event names none.
    pub fn into_event(
        self,
        declared: Option<&AppEventType>,
        timestamp: Timestamp,
        source: Source,
    ) -> Event {
        let default = declared.map_or(Severity::Info, |declared| declared.severity);
        Event {
            id: 0,
            event_type: self.event_type,
            timestamp,
            organization_id: self.organization_id,
            domain_id: self.domain_id,
            severity: self.severity.unwrap_or(default),
            data: Some(self.data),
            old: None,
            changed: None,
            source,
        }
    }
}

/// The logical decoding message prefix `rowcast.emit()` writes in replication mode.
pub const EMIT_PREFIX: &str = "rowcast.emit";

impl super::Mapping {
    /// The event a committed `rowcast.emit()` call stands for, from its payload (the message
    /// content in replication mode, the outbox row in trigger mode).
    ///
    /// The function refused undeclared types when it was called; a type the mapping no longer
    /// declares by the time its transaction is captured (the mapping changed in between) is
    /// still appended, with a warning: the application's transaction committed, and dropping
    /// the event now would lose it silently. Only a payload that is not an event at all (never
    /// written by the function) is an error.
    pub fn sql_event(
        &self,
        payload: &[u8],
        timestamp: Timestamp,
        source: Source,
    ) -> Result<Event, Invalid> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|err| invalid("event", format!("is not JSON: {err}")))?;
        let event = AppEvent::parse(value)?;
        let declared = self.app_event(&event.event_type);
        if declared.is_none() {
            tracing::warn!(event_type = %event.event_type, "an application event of a type the mapping does not declare was committed; appended as sent");
        }
        Ok(event.into_event(declared, timestamp, source))
    }
}

fn optional_text(fields: &mut Map<String, Value>, field: &str) -> Result<Option<String>, Invalid> {
    match fields.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(invalid(field, "must be a string or null")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Via;

    #[test]
    fn type_syntax() {
        for good in ["deployment.log", "a.b", "cache_2.miss_x"] {
            assert!(is_app_type(good), "{good}");
        }
        for bad in ["", "deployment", "a.b.c", "A.b", "1a.b", "a.", ".b", "a.*", "a-b.c", "é.b"] {
            assert!(!is_app_type(bad), "{bad}");
        }
    }

    #[test]
    fn parses_a_full_event_and_applies_the_declared_severity() {
        let value = json!({"type": "deployment.log", "data": {"line": "ok"}, "organization_id": "quant",
                           "domain_id": null, "key": "k1"});
        let event = AppEvent::parse(value).expect("valid");
        assert_eq!(event.key.as_deref(), Some("k1"));
        let declared = AppEventType {
            event_type: "deployment.log".into(),
            severity: Severity::Debug,
            description: None,
        };
        let source = Source::App { via: Via::Http, lsn: None, xid: None };
        let envelope = event.into_event(Some(&declared), Timestamp(0), source);
        assert_eq!(envelope.severity, Severity::Debug);
        assert_eq!(envelope.organization_id.as_deref(), Some("quant"));
        assert_eq!(envelope.domain_id, None);
        assert_eq!(envelope.old, None);
    }

    #[test]
    fn the_sql_payload_becomes_the_same_event_whatever_carried_it() {
        let mapping = crate::mapping::Mapping::builtin();
        let payload = br#"{"data": {"n": 1.50, "s": "x"}, "type": "deployment.log", "domain_id": null, "severity": null, "organization_id": "quant"}"#;
        let source = || Source::App { via: Via::Sql, lsn: None, xid: Some(3) };
        let event = mapping.sql_event(payload, Timestamp(0), source()).expect("event");
        assert_eq!(event.severity, Severity::Debug, "the declared default");
        assert_eq!(serde_json::to_string(&event.data).expect("json"), r#"{"n":1.50,"s":"x"}"#);
        // Undeclared (the mapping changed since): appended as sent.
        let undeclared = br#"{"type": "gone.away", "data": {}, "severity": "error"}"#;
        let event = mapping.sql_event(undeclared, Timestamp(0), source()).expect("event");
        assert_eq!((event.event_type.as_str(), event.severity), ("gone.away", Severity::Error));
        for junk in [&b"not json"[..], b"[]", b"{\"type\": \"a.b\"}"] {
            assert!(mapping.sql_event(junk, Timestamp(0), source()).is_err());
        }
    }

    #[test]
    fn each_refusal_names_its_field() {
        let cases = [
            (json!([]), "event"),
            (json!({"data": {}}), "type"),
            (json!({"type": "Bad", "data": {}}), "type"),
            (json!({"type": 3, "data": {}}), "type"),
            (json!({"type": "a.b"}), "data"),
            (json!({"type": "a.b", "data": [1]}), "data"),
            (json!({"type": "a.b", "data": {}, "severity": "fatal"}), "severity"),
            (json!({"type": "a.b", "data": {}, "organization_id": 5}), "organization_id"),
            (json!({"type": "a.b", "data": {}, "key": ""}), "key"),
            (json!({"type": "a.b", "data": {}, "key": "k".repeat(201)}), "key"),
            (json!({"type": "a.b", "data": {}, "colour": 1}), "colour"),
        ];
        for (value, field) in cases {
            let err = AppEvent::parse(value.clone()).expect_err("invalid");
            assert_eq!(err.field, field, "{value}: {err}");
        }
        let ok = json!({"type": "a.b", "data": {}, "key": "k".repeat(200), "severity": "critical"});
        assert!(AppEvent::parse(ok).is_ok());
    }
}
