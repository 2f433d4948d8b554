//! The event envelope (SPEC §3) and the position that makes appends idempotent.
//!
//! An [`Event`] is built by the mapping from a row change, gets its `id` when the log appends
//! it, and is serialized exactly once, at append time; every reader after that shares the
//! same bytes.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

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

/// Microseconds since the Unix epoch, serialized as RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp(now.as_micros() as i64)
    }

    /// Parses RFC 3339 (`2026-11-22T10:15:30Z`, fractions up to microseconds, `Z` or an
    /// offset; `t`, `z` and a space for `T` are accepted as RFC 3339 allows).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = b.get(range)?;
            part.iter()
                .all(u8::is_ascii_digit)
                .then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
        };
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
        if separators.iter().any(|&(i, c)| b[i] != c) || !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        if !(1..=12).contains(&month) || !(1..=days_in_month(year, month)).contains(&day) {
            return None;
        }
        // 60 is a leap second; Postgres folds it into the next minute, so do we.
        if hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        let mut i = 19;
        let mut micros = 0i64;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return None;
            }
            let fraction = &text[start..i];
            let padded = format!("{:0<6}", &fraction[..fraction.len().min(6)]);
            micros = padded.parse().ok()?;
        }
        let offset = match b.get(i..)? {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && b[i + 3] == b':' => {
                let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
                if h > 23 || m > 59 {
                    return None;
                }
                let minutes = h * 60 + m;
                if *sign == b'+' { minutes } else { -minutes }
            }
            _ => return None,
        };
        let days = days_from_civil(year, month as u32, day as u32);
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset * 60;
        Some(Timestamp(seconds * 1_000_000 + micros))
    }

    pub fn from_system_time(time: std::time::SystemTime) -> Self {
        match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => Timestamp(after.as_micros().min(i64::MAX as u128) as i64),
            Err(before) => Timestamp(-(before.duration().as_micros().min(i64::MAX as u128) as i64)),
        }
    }

    pub fn to_system_time(self) -> std::time::SystemTime {
        let offset = std::time::Duration::from_micros(self.0.unsigned_abs());
        if self.0 >= 0 { std::time::UNIX_EPOCH + offset } else { std::time::UNIX_EPOCH - offset }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let secs_of_day = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            secs_of_day / 3600,
            secs_of_day / 60 % 60,
            secs_of_day % 60
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A proleptic Gregorian date to days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
    pub kind: String,
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
        self.kind.split_once('.').map_or(self.kind.as_str(), |(entity, _)| entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_rfc3339_micros() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(Timestamp(1_795_342_530_123_456).to_string(), "2026-11-22T10:15:30.123456Z");
        assert_eq!(Timestamp(951_782_400_000_001).to_string(), "2000-02-29T00:00:00.000001Z");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn rfc3339_parses_round_trips_and_refuses_junk() {
        for text in [
            "1970-01-01T00:00:00.000000Z",
            "2026-11-22T10:15:30.123456Z",
            "2000-02-29T00:00:00.000001Z",
            "1969-12-31T23:59:59.999999Z",
        ] {
            let parsed = Timestamp::parse_rfc3339(text).expect(text);
            assert_eq!(parsed.to_string(), text);
        }
        let at = |t: &str| Timestamp::parse_rfc3339(t).map(|t| t.to_string());
        assert_eq!(at("2026-11-22T10:15:30Z").as_deref(), Some("2026-11-22T10:15:30.000000Z"));
        assert_eq!(
            at("2026-11-22T12:15:30.5+02:00").as_deref(),
            Some("2026-11-22T10:15:30.500000Z")
        );
        assert_eq!(
            at("2026-11-22 05:15:30.1234567-05:00").as_deref(),
            Some("2026-11-22T10:15:30.123456Z")
        );
        for junk in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T10:15:30",
            "2026-11-22T10:15:30.Z",
            "2026-11-22T10:15:30+0200",
            "yesterday",
            "2026-11-22T10:15:30Zjunk",
            "２026-11-22T10:15:30Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(junk), None, "{junk:?}");
        }
    }

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
            kind: "agent.created".into(),
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
