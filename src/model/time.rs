//! Event time: microseconds since the Unix epoch (Postgres' own precision), written as
//! RFC 3339 UTC with exactly six fraction digits.
//!
//! Calendar and offset arithmetic is jiff's. Its parser reads a superset of RFC 3339 (ISO 8601
//! basic format, short or second-precision offsets, `,` fractions, bracketed time zone
//! annotations), so [`Timestamp::parse_rfc3339`] checks RFC 3339's shape first: a timestamp
//! that another RFC 3339 reader would refuse is refused here too.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01), which Postgres's
/// binary timestamps and the replication protocol count from.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Microseconds since the Unix epoch, serialized as RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(jiff::Timestamp::now().as_microsecond())
    }

    /// Parses RFC 3339 (`2026-11-22T10:15:30Z`, any number of fraction digits, kept to
    /// microseconds, `Z` or an offset; `t`, `z` and a space for `T` are accepted as RFC 3339
    /// allows). A leap second (`:60`) folds into the next minute, as Postgres does.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let fraction_digits = rfc3339_fraction_digits(text.as_bytes())?;
        // jiff reads nanoseconds at most; the digits past them would be dropped anyway.
        const FRACTION: usize = "YYYY-MM-DDTHH:MM:SS.".len();
        let text = if fraction_digits > 9 {
            Cow::Owned(format!("{}{}", &text[..FRACTION + 9], &text[FRACTION + fraction_digits..]))
        } else {
            Cow::Borrowed(text)
        };
        let parsed: jiff::Timestamp = text.parse().ok()?;
        // jiff reads second 60 as 59.
        let leap = if &text[17..19] == "60" { 1_000_000 } else { 0 };
        parsed.as_microsecond().checked_add(leap).map(Timestamp)
    }

    pub fn from_system_time(time: SystemTime) -> Self {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Timestamp(after.as_micros().min(i64::MAX as u128) as i64),
            Err(before) => Timestamp(-(before.duration().as_micros().min(i64::MAX as u128) as i64)),
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        let offset = Duration::from_micros(self.0.unsigned_abs());
        if self.0 >= 0 { UNIX_EPOCH + offset } else { UNIX_EPOCH - offset }
    }

    /// As jiff sees it; clamped to jiff's range (years -9999 to 9999), which holds every
    /// timestamp RFC 3339 can write.
    fn to_jiff(self) -> jiff::Timestamp {
        jiff::Timestamp::from_microsecond(self.0).unwrap_or(if self.0 < 0 {
            jiff::Timestamp::MIN
        } else {
            jiff::Timestamp::MAX
        })
    }
}

/// The number of fraction digits when `text` has RFC 3339's `date-time` shape
/// (`YYYY-MM-DD[Tt ]HH:MM:SS[.F+](Z|z|±HH:MM)`, offset hours up to 23), `None` otherwise.
/// Ranges of the date and time fields are left to jiff.
fn rfc3339_fraction_digits(b: &[u8]) -> Option<usize> {
    let head = b.get(..19)?;
    let shape_ok = b"dddd-dd-ddTdd:dd:dd".iter().zip(head).all(|(want, got)| match want {
        b'd' => got.is_ascii_digit(),
        b'T' => matches!(got, b'T' | b't' | b' '),
        separator => got == separator,
    });
    if !shape_ok {
        return None;
    }
    let mut rest = &b[19..];
    let mut fraction = 0;
    if let Some(after_dot) = rest.strip_prefix(b".") {
        fraction = after_dot.iter().take_while(|c| c.is_ascii_digit()).count();
        if fraction == 0 {
            return None;
        }
        rest = &after_dot[fraction..];
    }
    let offset_ok = match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1 @ b'0'..=b'2', h2, b':', b'0'..=b'5', m2] => {
            h2.is_ascii_digit() && m2.is_ascii_digit() && (*h1, *h2) <= (b'2', b'3')
        }
        _ => false,
    };
    offset_ok.then_some(fraction)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}", self.to_jiff())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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
    fn rfc3339_is_all_that_is_accepted() {
        let at = |t: &str| Timestamp::parse_rfc3339(t).map(|t| t.to_string());
        assert_eq!(at("2026-11-22t10:15:30z").as_deref(), Some("2026-11-22T10:15:30.000000Z"));
        assert_eq!(at("2026-11-22T23:59:60Z").as_deref(), Some("2026-11-23T00:00:00.000000Z"));
        assert_eq!(at("2026-11-22T10:15:60.5Z").as_deref(), Some("2026-11-22T10:16:00.500000Z"));
        assert_eq!(
            at("2026-11-22T10:15:30.123456789123+00:00").as_deref(),
            Some("2026-11-22T10:15:30.123456Z")
        );
        assert_eq!(at("2026-11-22T10:15:30-00:00").as_deref(), Some("2026-11-22T10:15:30.000000Z"));
        assert_eq!(at("2026-11-22T10:15:30+23:59").as_deref(), Some("2026-11-21T10:16:30.000000Z"));
        // What jiff reads but RFC 3339 does not allow.
        for other in [
            "20261122T101530Z",
            "2026-11-22T10:15Z",
            "2026-11-22T10Z",
            "+002026-11-22T10:15:30Z",
            "2026-11-22T10:15:30,5Z",
            "2026-11-22T10:15:30+02",
            "2026-11-22T10:15:30+02:00:00",
            "2026-11-22T10:15:30+24:00",
            "2026-11-22T10:15:30+02:60",
            "2026-11-22T10:15:30Z[UTC]",
            "2026-11-22T10:15:30 Z",
            "2026-11-22T10:15:61Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(other), None, "{other:?}");
        }
    }

    #[test]
    fn system_time_round_trips_and_display_never_panics() {
        for micros in [0, 1, -1, 1_795_342_530_123_456, -62_135_596_800_000_000] {
            let t = Timestamp(micros);
            assert_eq!(Timestamp::from_system_time(t.to_system_time()), t);
        }
        assert!(Timestamp(i64::MAX).to_string().starts_with("9999-"));
        assert!(Timestamp(i64::MIN).to_string().starts_with("-009999-"));
    }
}
