//! date, timestamp and timestamptz: ISO text checked, then reshaped into the XSD form
//! `to_jsonb` prints.

use serde_json::Value;

use super::{RenderError, snippet};

fn is_infinity(text: &str) -> bool {
    text == "infinity" || text == "-infinity"
}

fn bad_datetime(kind: &'static str, text: &str) -> RenderError {
    RenderError::BadDateTime { kind, text: snippet(text.as_bytes()) }
}

fn all_digits(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

/// `YYYY-MM-DD`, where the year may have more than four digits.
fn valid_date(d: &str) -> bool {
    let mut parts = d.split('-');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(y), Some(m), Some(day), None)
            if y.len() >= 4 && all_digits(y) && m.len() == 2 && all_digits(m)
                && day.len() == 2 && all_digits(day)
    )
}

/// `HH:MM:SS` with optional fraction digits.
fn valid_time(t: &str) -> bool {
    let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
    let mut parts = hms.split(':');
    let two = |p: Option<&str>| p.is_some_and(|p| p.len() == 2 && all_digits(p));
    two(parts.next())
        && two(parts.next())
        && two(parts.next())
        && parts.next().is_none()
        && !frac.is_empty()
        && all_digits(frac)
}

/// ISO `±hh[:mm[:ss]]` to XSD, which always prints at least `±hh:mm`.
fn xsd_offset(off: &str) -> Option<String> {
    let body = off.strip_prefix(['+', '-'])?;
    let parts: Vec<&str> = body.split(':').collect();
    if parts.len() > 3 || parts.iter().any(|p| p.len() != 2 || !all_digits(p)) {
        return None;
    }
    Some(if parts.len() == 1 { format!("{off}:00") } else { off.to_owned() })
}

pub(super) fn render_date(text: &str) -> Result<Value, RenderError> {
    let body = text.strip_suffix(" BC").unwrap_or(text);
    if is_infinity(text) || valid_date(body) {
        Ok(Value::String(text.to_owned()))
    } else {
        Err(bad_datetime("date", text))
    }
}

pub(super) fn render_timestamp(text: &str, with_tz: bool) -> Result<Value, RenderError> {
    let kind = if with_tz { "timestamptz" } else { "timestamp" };
    if is_infinity(text) {
        return Ok(Value::String(text.to_owned()));
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(body) => (body, " BC"),
        None => (text, ""),
    };
    let (date, rest) = body.split_once(' ').ok_or_else(|| bad_datetime(kind, text))?;
    let (time, offset) = if with_tz {
        let at = rest.find(['+', '-']).ok_or_else(|| bad_datetime(kind, text))?;
        let offset = rest.get(at..).and_then(xsd_offset);
        (rest.get(..at).unwrap_or_default(), offset.ok_or_else(|| bad_datetime(kind, text))?)
    } else {
        (rest, String::new())
    };
    if !valid_date(date) || !valid_time(time) {
        return Err(bad_datetime(kind, text));
    }
    Ok(Value::String(format!("{date}T{time}{offset}{bc}")))
}

#[cfg(test)]
mod tests {
    //! The pairs below were observed on PostgreSQL 15, as described in `render::tests`.
    #![allow(clippy::unwrap_used)]

    use crate::capture::render::Category;
    use crate::capture::render::tests::{check_fails, check_lines};

    #[test]
    fn dates_and_timestamps() {
        check_lines(
            &Category::Date,
            r#"2024-01-02 => "2024-01-02"
            infinity => "infinity"
            -infinity => "-infinity"
            0044-03-15 BC => "0044-03-15 BC"
            12345-06-07 => "12345-06-07""#,
        );
        check_lines(
            &Category::Timestamp,
            r#"2024-01-02 03:04:05.5 => "2024-01-02T03:04:05.5"
            2024-01-02 03:04:05 => "2024-01-02T03:04:05"
            infinity => "infinity"
            -infinity => "-infinity"
            0044-03-15 12:00:00 BC => "0044-03-15T12:00:00 BC"
            4713-01-01 00:00:00 BC => "4713-01-01T00:00:00 BC"
            12345-06-07 01:02:03.000001 => "12345-06-07T01:02:03.000001"
            294276-12-31 23:59:59.999999 => "294276-12-31T23:59:59.999999""#,
        );
        check_lines(
            &Category::TimestampTz,
            r#"2024-01-02 03:04:05.5+00 => "2024-01-02T03:04:05.5+00:00"
            infinity => "infinity"
            -infinity => "-infinity"
            0044-03-15 12:00:00+00 BC => "0044-03-15T12:00:00+00:00 BC"
            12345-06-07 01:02:03.123+00 => "12345-06-07T01:02:03.123+00:00"
            1800-01-01 00:00:00+00 => "1800-01-01T00:00:00+00:00"
            1800-01-01 05:53:28+05:53:28 => "1800-01-01T05:53:28+05:53:28"
            2024-06-01 05:30:00+05:30 => "2024-06-01T05:30:00+05:30"
            2024-05-31 20:00:00-04 => "2024-05-31T20:00:00-04:00"
            0044-03-15 07:03:58-04:56:02 BC => "0044-03-15T07:03:58-04:56:02 BC""#,
        );
        check_fails(
            &Category::Date,
            r#"2024-1-02
            Infinity
            24-01-02
            2024-01-02 AD"#,
        );
        check_fails(
            &Category::Timestamp,
            r#"2024-01-02T03:04:05
            2024-01-02 03:04
            2024-01-02 03:04:05.
            2024-01-02"#,
        );
        check_fails(
            &Category::TimestampTz,
            r#"2024-01-02 03:04:05
            2024-01-02 03:04:05+0
            2024-01-02 03:04:05+00:00:00:00"#,
        );
    }
}
