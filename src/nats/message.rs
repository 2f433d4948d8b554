//! An event as a JetStream message and back, and where an arriving id stands (pure).
//!
//! The payload is the stored envelope, byte for byte; the message id (`Nats-Msg-Id`) is the
//! event id, so the stream drops a republished event within its duplicate window. The subject
//! (`<prefix>.<org>.<domain>.<entity>.<action>`) is for NATS consumers other than rowcast;
//! gateways read everything they need from the envelope, and check it against the message id.

use std::borrow::Cow;
use std::ops::RangeInclusive;

use serde::Deserialize;

use crate::log::StoredEvent;
use crate::model::{Severity, Timestamp};

/// The header that carries the event id (JetStream's deduplication id).
pub const MESSAGE_ID: &str = "Nats-Msg-Id";

/// Why a message is not an event; the message is skipped, and the gateway fills its id from
/// the log when the next one shows the gap.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("no {MESSAGE_ID} header with an event id")]
    NoId,
    #[error("the payload is not an event envelope: {0}")]
    Envelope(String),
    #[error("the envelope has id {envelope}, the message id says {header}")]
    IdMismatch { header: u64, envelope: u64 },
    #[error("the envelope's timestamp {0:?} is not RFC 3339")]
    Timestamp(String),
}

/// The subject of `event` under `prefix`: `<prefix>.<org>.<domain>.<entity>.<action>`, `_` for
/// a missing organization or domain, each token escaped (see [`token`]).
pub fn subject(prefix: &str, event: &StoredEvent) -> String {
    let (entity, action) = event.event_type.split_once('.').unwrap_or((&event.event_type, "_"));
    let mut subject = String::with_capacity(prefix.len() + event.event_type.len() + 32);
    subject.push_str(prefix);
    for part in [
        event.organization_id.as_deref().unwrap_or("_"),
        event.domain_id.as_deref().unwrap_or("_"),
        entity,
        action,
    ] {
        subject.push('.');
        token(part, &mut subject);
    }
    subject
}

/// One subject token: what NATS reserves (`.`, `*`, `>`, whitespace, control characters) and
/// `%` itself are percent-encoded, so tokens never split, never act as wildcards and stay
/// readable. An empty value is `%00`: NATS refuses empty tokens.
fn token(value: &str, out: &mut String) {
    if value.is_empty() {
        out.push_str("%00");
        return;
    }
    for c in value.chars() {
        if matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control() {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
}

/// The fields of the envelope the bus needs; the rest stays in the bytes.
#[derive(Deserialize)]
struct Head<'a> {
    id: u64,
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow, default)]
    organization_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    domain_id: Option<Cow<'a, str>>,
    severity: Severity,
}

/// The event a message carries, checked: its id header and its envelope agree.
pub fn parse(message_id: Option<&str>, payload: &[u8]) -> Result<StoredEvent, Malformed> {
    let header = message_id.and_then(|id| id.trim().parse::<u64>().ok()).ok_or(Malformed::NoId)?;
    let json = std::str::from_utf8(payload).map_err(|err| Malformed::Envelope(err.to_string()))?;
    let head: Head<'_> =
        serde_json::from_str(json).map_err(|err| Malformed::Envelope(err.to_string()))?;
    if head.id != header {
        return Err(Malformed::IdMismatch { header, envelope: head.id });
    }
    let timestamp = Timestamp::parse_rfc3339(&head.timestamp)
        .ok_or_else(|| Malformed::Timestamp(head.timestamp.clone().into_owned()))?;
    Ok(StoredEvent {
        id: head.id,
        event_type: head.event_type.into_owned(),
        organization_id: head.organization_id.map(Cow::into_owned),
        domain_id: head.domain_id.map(Cow::into_owned),
        severity: head.severity,
        timestamp,
        json: json.into(),
    })
}

/// Where an arriving id stands against the last id delivered to the bus.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one: deliver it.
    Next,
    /// Delivered already (a republish, or filled from the log): skip it.
    Old,
    /// Ids are missing before it: fill these from the log first.
    Ahead(RangeInclusive<u64>),
}

pub fn arrival(delivered: u64, id: u64) -> Arrival {
    match id {
        id if id <= delivered => Arrival::Old,
        id if id == delivered + 1 => Arrival::Next,
        id => Arrival::Ahead(delivered + 1..=id - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, org: Option<&str>, domain: Option<&str>) -> StoredEvent {
        StoredEvent {
            id: 7,
            event_type: event_type.into(),
            organization_id: org.map(Into::into),
            domain_id: domain.map(Into::into),
            severity: Severity::Info,
            timestamp: Timestamp(0),
            json: "{}".into(),
        }
    }

    #[test]
    fn subjects_name_scope_entity_and_action() {
        let subject = |e: &StoredEvent| super::subject("rowcast.events", e);
        assert_eq!(
            subject(&event("agent.created", Some("quant"), Some("ops"))),
            "rowcast.events.quant.ops.agent.created"
        );
        assert_eq!(
            subject(&event("agent.created", None, None)),
            "rowcast.events._._.agent.created"
        );
        // Reserved characters never split a token nor act as wildcards.
        assert_eq!(
            subject(&event("a.b.c", Some("x.y"), Some("* >%"))),
            "rowcast.events.x%2Ey.%2A%20%3E%25.a.b%2Ec"
        );
        assert_eq!(subject(&event("noaction", Some(""), None)), "rowcast.events.%00._.noaction._");
        assert_eq!(subject(&event("t.é\t", Some("ü"), None)), "rowcast.events.ü._.t.é%09");
        for e in [event("a.b", Some("x.y z"), None), event("..", Some(">"), Some("*"))] {
            let s = subject(&e);
            assert_eq!(s.split('.').count(), 6, "{s}");
            assert!(!s.contains(['*', '>', ' ']), "{s}");
        }
    }

    const ENVELOPE: &str = r#"{"id":42,"type":"agent.updated","timestamp":"2026-01-02T03:04:05.123456Z","organization_id":"quant","domain_id":null,"severity":"warning","data":{"x":1},"source":{"kind":"row","table":"public.agents","op":"update","xid":9}}"#;

    #[test]
    fn parses_what_it_published() {
        let event = parse(Some("42"), ENVELOPE.as_bytes()).expect("parses");
        assert_eq!(event.id, 42);
        assert_eq!(event.event_type, "agent.updated");
        assert_eq!(event.organization_id.as_deref(), Some("quant"));
        assert_eq!(event.domain_id, None);
        assert_eq!(event.severity, Severity::Warning);
        assert_eq!(event.timestamp.to_string(), "2026-01-02T03:04:05.123456Z");
        assert_eq!(&*event.json, ENVELOPE);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert_eq!(parse(None, ENVELOPE.as_bytes()).unwrap_err(), Malformed::NoId);
        assert_eq!(parse(Some("x"), ENVELOPE.as_bytes()).unwrap_err(), Malformed::NoId);
        assert_eq!(parse(Some("-1"), ENVELOPE.as_bytes()).unwrap_err(), Malformed::NoId);
        assert_eq!(
            parse(Some("41"), ENVELOPE.as_bytes()).unwrap_err(),
            Malformed::IdMismatch { header: 41, envelope: 42 }
        );
        for junk in [&b""[..], b"{", b"\xff\xfe", b"[]", b"null", br#"{"id":"42"}"#] {
            assert!(matches!(parse(Some("42"), junk), Err(Malformed::Envelope(_))), "{junk:?}");
        }
        let bad_severity = ENVELOPE.replace("warning", "fatal");
        assert!(matches!(parse(Some("42"), bad_severity.as_bytes()), Err(Malformed::Envelope(_))));
        let bad_time = ENVELOPE.replace("2026-01-02T03:04:05.123456Z", "yesterday");
        assert_eq!(
            parse(Some("42"), bad_time.as_bytes()).unwrap_err(),
            Malformed::Timestamp("yesterday".into())
        );
        let huge = ENVELOPE.replace("\"id\":42", "\"id\":1e400");
        assert!(parse(Some("42"), huge.as_bytes()).is_err());
    }

    #[test]
    fn arrivals() {
        assert_eq!(arrival(10, 11), Arrival::Next);
        assert_eq!(arrival(10, 10), Arrival::Old);
        assert_eq!(arrival(10, 3), Arrival::Old);
        assert_eq!(arrival(10, 14), Arrival::Ahead(11..=13));
        assert_eq!(arrival(0, 1), Arrival::Next);
        assert_eq!(arrival(u64::MAX, u64::MAX), Arrival::Old);
    }
}
