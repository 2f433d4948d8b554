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
    Debug,
    #[default]
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] =
        [Severity::Debug, Severity::Info, Severity::Warning, Severity::Error, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Debug => "debug",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    /// The number stored in the log, so "at least warning" is a range query. `info` is 0 and
    /// the ranks of the first three severities never changed, so older logs need no rewrite.
    pub fn rank(self) -> i16 {
        match self {
            Severity::Debug => -1,
            Severity::Info => 0,
            Severity::Warning => 1,
            Severity::Error => 2,
            Severity::Critical => 3,
        }
    }

    /// The severity a stored rank stands for; out-of-range ranks clamp to the nearest.
    pub fn from_rank(rank: i16) -> Self {
        match rank {
            ..=-1 => Severity::Debug,
            0 => Severity::Info,
            1 => Severity::Warning,
            2 => Severity::Error,
            _ => Severity::Critical,
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL.into_iter().find(|severity| severity.as_str() == s).ok_or_else(|| {
            format!("unknown severity {s:?} (expected debug, info, warning, error or critical)")
        })
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

/// Where an event came from: `{"kind":"row",...}` for row changes (SPEC §3, §3a),
/// `{"kind":"app","via":"sql"|"http",...}` for application events, `{"kind":"rowcast",...}`
/// for what rowcast itself reports (`rowcast.gap`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    Row {
        /// Schema-qualified table name.
        table: String,
        op: Op,
        /// Commit LSN, replication mode only.
        #[serde(skip_serializing_if = "Option::is_none")]
        lsn: Option<String>,
        xid: u64,
    },
    App {
        via: Via,
        /// Commit LSN of the emitting transaction, replication mode only (as for rows).
        #[serde(skip_serializing_if = "Option::is_none")]
        lsn: Option<String>,
        /// The emitting transaction, for `rowcast.emit()` from SQL.
        #[serde(skip_serializing_if = "Option::is_none")]
        xid: Option<u64>,
    },
    Rowcast {
        /// The capture source concerned (`replication:<slot>`).
        capture: String,
    },
}

/// How an application event entered rowcast (SPEC §3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `rowcast.emit()` inside the application's transaction.
    Sql,
    /// `POST /api/events`.
    Http,
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
    pub source: Source,
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
        assert!(Severity::Debug < Severity::Info && Severity::Error < Severity::Critical);
        assert_eq!("error".parse::<Severity>(), Ok(Severity::Error));
        for (i, severity) in Severity::ALL.into_iter().enumerate() {
            assert_eq!(Severity::from_rank(severity.rank()), severity);
            assert_eq!(severity.as_str().parse::<Severity>(), Ok(severity));
            // Ranks order as the severities do: "at least" is a range in SQL too.
            if let Some(next) = Severity::ALL.get(i + 1) {
                assert!(severity.rank() < next.rank() && severity < *next);
            }
        }
        // The ranks of info, warning and error are what older logs hold.
        assert_eq!(
            [Severity::Info, Severity::Warning, Severity::Error].map(Severity::rank),
            [0, 1, 2]
        );
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
            source: Source::Row {
                table: "public.agents".into(),
                op: Op::Insert,
                lsn: None,
                xid: 9,
            },
        };
        let json = serde_json::to_string(&event).expect("serializes");
        assert_eq!(
            json,
            r#"{"id":7,"type":"agent.created","timestamp":"1970-01-01T00:00:00.000000Z","organization_id":"quant","domain_id":null,"severity":"info","data":{},"source":{"kind":"row","table":"public.agents","op":"insert","xid":9}}"#
        );
    }

    #[test]
    fn application_events_say_how_they_came() {
        let source =
            |via, lsn: Option<&str>, xid| Source::App { via, lsn: lsn.map(Into::into), xid };
        let json = |source: Source| serde_json::to_string(&source).expect("serializes");
        assert_eq!(json(source(Via::Http, None, None)), r#"{"kind":"app","via":"http"}"#);
        assert_eq!(
            json(source(Via::Sql, Some("0/16B3748"), Some(7301))),
            r#"{"kind":"app","via":"sql","lsn":"0/16B3748","xid":7301}"#
        );
        assert_eq!(json(source(Via::Sql, None, Some(1))), r#"{"kind":"app","via":"sql","xid":1}"#);
    }
}
