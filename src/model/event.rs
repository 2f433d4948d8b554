//! The event envelope (SPEC §3) and the position that makes appends idempotent.
//!
//! An [`Event`] is built by the mapping from a row change, gets its `id` when the log appends
//! it, and is serialized exactly once, at append time; every reader after that shares the
//! same bytes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::time::Timestamp;

/// A row as `to_jsonb(row)` renders it.
pub type Row = Map<String, Value>;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    /// The number stored in the log, so "at least warning" is a range query.
    pub fn rank(self) -> i16 {
        self as i16
    }

    /// The severity a stored rank stands for; out-of-range ranks clamp to the nearest.
    pub fn from_rank(rank: i16) -> Self {
        match rank {
            ..=0 => Severity::Info,
            1 => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            other => Err(format!("unknown severity {other:?} (expected info, warning or error)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn action(self) -> &'static str {
        match self {
            Op::Insert => "created",
            Op::Update => "updated",
            Op::Delete => "deleted",
            Op::Truncate => "truncated",
        }
    }
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Origin {
    /// Schema-qualified table name.
    pub table: String,
    pub op: Op,
    /// Commit LSN, replication mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    pub xid: u64,
}

/// Where an event sits in its source's own order: the commit LSN (replication) or outbox id
/// (triggers), then the change's index within it shifted left 16 bits plus the event's index
/// among that change's events. Indexing changes, not events, keeps positions stable when the
/// mapping changes between a crash and the replay. The log remembers the last position it
/// appended, and drops anything at or before it, which makes re-delivery after a crash harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub major: u64,
    pub minor: u64,
}

impl Position {
    /// Bits of `minor` that number the events of one change.
    const EVENT_BITS: u32 = 16;
    /// `minor` is stored as a signed bigint: changes get the bits left over.
    const MAX_CHANGES: u64 = 1 << (63 - Self::EVENT_BITS);

    /// The position of the `event`-th event of the `change`-th change under `major`; `None`
    /// when either index does not fit the layout.
    pub fn of(major: u64, change: u64, event: usize) -> Option<Self> {
        let event = u64::try_from(event).ok().filter(|e| *e < 1 << Self::EVENT_BITS)?;
        (change < Self::MAX_CHANGES)
            .then_some(Position { major, minor: (change << Self::EVENT_BITS) | event })
    }
}

/// The envelope of SPEC §3.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub timestamp: Timestamp,
    pub organization_id: Option<String>,
    pub domain_id: Option<String>,
    pub severity: Severity,
    pub data: Option<Row>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<Row>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<Vec<String>>,
    pub source: Origin,
}

impl Event {
    pub fn entity(&self) -> &str {
        self.event_type.split_once('.').map_or(self.event_type.as_str(), |(entity, _)| entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_change_then_event() {
        let at = |change, event| Position::of(7, change, event).expect("fits");
        assert!(at(0, 1) < at(1, 0) && at(1, 0) < at(1, 1));
        assert!(Position::of(7, 0, 1 << 16).is_none());
        assert!(Position::of(7, 1 << 47, 0).is_none());
        assert_eq!(at((1 << 47) - 1, 0).minor, i64::MAX as u64 - 0xffff);
    }

    #[test]
    fn severity_orders_and_parses() {
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Error);
        assert_eq!("error".parse::<Severity>(), Ok(Severity::Error));
        for severity in [Severity::Info, Severity::Warning, Severity::Error] {
            assert_eq!(Severity::from_rank(severity.rank()), severity);
        }
        assert!("fatal".parse::<Severity>().is_err());
    }

    #[test]
    fn envelope_omits_what_does_not_apply() {
        let event = Event {
            id: 7,
            event_type: "agent.created".into(),
            timestamp: Timestamp(0),
            organization_id: Some("quant".into()),
            domain_id: None,
            severity: Severity::Info,
            data: Some(Row::new()),
            old: None,
            changed: None,
            source: Origin { table: "public.agents".into(), op: Op::Insert, lsn: None, xid: 9 },
        };
        let json = serde_json::to_string(&event).expect("serializes");
        assert_eq!(
            json,
            r#"{"id":7,"type":"agent.created","timestamp":"1970-01-01T00:00:00.000000Z","organization_id":"quant","domain_id":null,"severity":"info","data":{},"source":{"table":"public.agents","op":"insert","xid":9}}"#
        );
    }
}
