//! Turns a column's pgoutput text into the JSON value `to_jsonb` would give.
//!
//! pgoutput (protocol 1) sends every value as its type's *output function* text, produced in
//! our replication session with `TimeZone=UTC`, `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `bytea_output=hex`. The event contract is that `data` equals
//! `to_jsonb(row)` evaluated with `TimeZone=UTC` and otherwise default settings, so this module
//! re-creates what `datum_to_jsonb` does for each type category, starting from that text:
//!
//! - **Numbers** (int2/4/8, float4/8, numeric; `number.rs`): Postgres runs the output text
//!   through `numeric_in`, so jsonb shows `numeric_out` of it. Float exponents are expanded
//!   (`1e+100` becomes 1 and 100 zeros, `1.5e-07` becomes `0.00000015`), the display scale is
//!   `max(0, fraction digits - exponent)`, and `-0` loses its sign. `NaN` and `±Infinity` cannot be
//!   jsonb numbers and become strings. Extra float digits do not matter: any setting above 0
//!   (ours is 3, the default is 1) prints the shortest exact form.
//! - **Date/time** (`datetime.rs`): `to_jsonb` uses XSD style. For `date` that is the same text
//!   as ISO. For `timestamp`/`timestamptz` the space between date and time becomes `T`, and XSD
//!   always prints the offset as `±hh:mm` (ISO shortens whole hours to `±hh`). ` BC` stays last,
//!   and `infinity`/`-infinity` pass through. `time`, `timetz` and `interval` keep their text (the
//!   default `IntervalStyle` is `postgres`, the one we ask for).
//! - **json** (`json.rs`) is parsed again the way jsonb parses it: numbers through `numeric_in`,
//!   the last of any duplicate keys wins, keys sorted in jsonb order (shorter first, then
//!   bytewise), and `\u0000` is rejected. **jsonb** text is already in that form; it gets the
//!   same treatment so the result stays in jsonb order.
//! - **Arrays** (`array_out`; `array.rs`) become nested JSON arrays. Bounds decoration is
//!   ignored, as `to_jsonb` ignores it. **Composites** (`record_out`; `composite.rs`) become
//!   objects keyed in jsonb order.
//! - Everything else (text, bpchar with its padding, uuid, bytea `\x..`, money, enums, ranges,
//!   geometric types, oid, ...) is a JSON string of the text exactly as sent.
//!
//! Where Postgres itself would raise an error, there is no `to_jsonb` value to match, so we do this:
//! a number beyond numeric's limits (more than 131072 integer digits or a display scale above
//! 16383) keeps its original text, as a string for a Number column and as a verbatim number
//! inside json. JSON nested deeper than serde_json's limit (128) gives an error. So does
//! malformed text of any kind; the caller then falls back to the raw string. Nothing here panics,
//! and recursion is bounded: 6 array dimensions, 32 levels of array/composite nesting.

mod array;
mod composite;
mod datetime;
mod json;
mod number;

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// How a column's text output becomes JSON; resolved once per column from the catalog
/// (domains are already replaced by their base type by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Category {
    /// `t` / `f` -> true / false.
    Bool,
    /// int2, int4, int8, float4, float8, numeric (not oid: `to_jsonb` makes oid a string).
    Number,
    /// json: parsed, then normalised as jsonb would (numbers via numeric_in, last duplicate wins).
    Json,
    /// jsonb: parsed (already normalised text).
    Jsonb,
    /// date.
    Date,
    /// timestamp without time zone.
    Timestamp,
    /// timestamptz.
    TimestampTz,
    /// Everything else: a JSON string of the text as is.
    Text,
    /// An array of `elem`; `delim` is the element type's typdelim (`b';'` for box, else `b','`).
    /// Also covers int2vector/oidvector, whose output is space separated.
    Array { elem: Box<Category>, delim: u8 },
    /// A composite type's `record_out` text `(a,b,...)`, rendered as an object.
    Composite { fields: Vec<(String, Category)> },
}

/// Why a value's text could not be rendered; the caller falls back to a plain string.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("value is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid boolean text {0:?}")]
    BadBool(String),
    #[error("invalid number text {0:?}")]
    BadNumber(String),
    #[error("invalid {kind} text {text:?}")]
    BadDateTime { kind: &'static str, text: String },
    #[error("invalid json: {0}")]
    BadJson(String),
    #[error("malformed array literal {0:?}")]
    BadArray(String),
    #[error("malformed record literal {0:?}")]
    BadRecord(String),
    #[error("value nests deeper than {0} levels")]
    TooDeep(usize),
}

/// The session settings the text output this module reads must be produced with (see above):
/// the replication session starts with them, the rows endpoint sets them for its read.
pub const OUTPUT_SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// Nesting limit for arrays and composites inside one another. Postgres has no fixed limit, but
/// catalog types this deep do not occur in practice.
const MAX_NESTING: usize = 32;

/// Renders one non-NULL value's text output as to_jsonb would.
pub fn render(text: &[u8], kind: &Category) -> Result<Value, RenderError> {
    render_at(text, kind, 0)
}

/// The order jsonb stores object keys in: shorter keys first, then bytewise.
pub fn jsonb_key_order(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// Builds a row object (as to_jsonb(row) would) from (column name, value) pairs, keys in jsonb
/// order. As in jsonb, the last of duplicate keys wins.
pub fn row_object(columns: impl IntoIterator<Item = (String, Value)>) -> Map<String, Value> {
    let mut columns: Vec<(String, Value)> = columns.into_iter().collect();
    // A stable sort keeps duplicates in input order; inserting a duplicate then replaces the
    // earlier value, so the last one wins, as jsonb does.
    columns.sort_by(|a, b| jsonb_key_order(&a.0, &b.0));
    let mut map = Map::with_capacity(columns.len());
    for (key, value) in columns {
        map.insert(key, value);
    }
    map
}

/// A row as `row_to_json` prints it (trigger capture), re-shaped into what `to_jsonb(row)`
/// gives: keys in jsonb order, every value as [`Category::Json`] renders it (numbers through
/// `numeric_in`, json columns parsed the way jsonb parses them). `row_to_json` prints date/time
/// values as `to_jsonb` does, and every other type as a string or number already. A value
/// jsonb could not hold (a json column with `\u0000`) keeps its text, as a string, which is
/// what replication gives for it.
pub fn jsonb_row(text: &str) -> Result<Map<String, Value>, RenderError> {
    let columns: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_str(text).map_err(|e| RenderError::BadJson(e.to_string()))?;
    Ok(row_object(columns.into_iter().map(|(name, raw)| {
        let text = raw.get();
        let value =
            json::render_json(text.as_bytes()).unwrap_or_else(|_| Value::String(text.to_owned()));
        (name, value)
    })))
}

fn render_at(text: &[u8], kind: &Category, depth: usize) -> Result<Value, RenderError> {
    match kind {
        Category::Text => Ok(Value::String(utf8(text)?.to_owned())),
        Category::Bool => match text {
            b"t" => Ok(Value::Bool(true)),
            b"f" => Ok(Value::Bool(false)),
            _ => Err(RenderError::BadBool(snippet(text))),
        },
        Category::Number => number::render_number(utf8(text)?),
        Category::Json | Category::Jsonb => json::render_json(text),
        Category::Date => datetime::render_date(utf8(text)?),
        Category::Timestamp => datetime::render_timestamp(utf8(text)?, false),
        Category::TimestampTz => datetime::render_timestamp(utf8(text)?, true),
        Category::Array { elem, delim } => {
            let depth = nested(depth)?;
            array::parse_array(text, elem, *delim, depth)
        }
        Category::Composite { fields } => {
            let depth = nested(depth)?;
            composite::parse_record(text, fields, depth)
        }
    }
}

fn nested(depth: usize) -> Result<usize, RenderError> {
    if depth >= MAX_NESTING {
        return Err(RenderError::TooDeep(MAX_NESTING));
    }
    Ok(depth + 1)
}

fn utf8(text: &[u8]) -> Result<&str, RenderError> {
    std::str::from_utf8(text).map_err(|_| RenderError::InvalidUtf8)
}

/// A short, lossy excerpt for error messages, so that huge values do not bloat logs.
fn snippet(text: &[u8]) -> String {
    String::from_utf8_lossy(text).chars().take(64).collect()
}

/// Matches array_isspace/record_in's isspace in the C locale.
fn is_pg_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

#[cfg(test)]
mod tests {
    //! Every `text => json` pair in these tests, and in those of each type family, was observed
    //! on PostgreSQL 15: the text as the value prints in a pgoutput-like session (see the module
    //! doc), the json from `to_jsonb` with `TimeZone=UTC`. The `check` helpers are shared with
    //! the families' tests.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// Compares serialised forms too, because `Value` equality ignores object key order.
    #[track_caller]
    pub(super) fn check(kind: &Category, text: &str, expected: &str) {
        let got = render(text.as_bytes(), kind).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let want: Value = serde_json::from_str(expected).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(serde_json::to_string(&got).unwrap(), serde_json::to_string(&want).unwrap());
    }

    /// `check` for each non-blank `text => json` line; indentation is not part of the text.
    #[track_caller]
    pub(super) fn check_lines(kind: &Category, lines: &str) {
        for line in lines.lines().map(str::trim_start).filter(|l| !l.is_empty()) {
            let (text, json) = line.split_once(" => ").unwrap();
            check(kind, text, json);
        }
    }

    /// Each non-blank line (indentation dropped) must fail to render.
    #[track_caller]
    pub(super) fn check_fails(kind: &Category, lines: &str) {
        for text in lines.lines().map(str::trim_start).filter(|l| !l.is_empty()) {
            assert!(render(text.as_bytes(), kind).is_err(), "{text:?} should fail");
        }
    }

    pub(super) fn array(elem: Category) -> Category {
        Category::Array { elem: Box::new(elem), delim: b',' }
    }

    #[test]
    fn booleans_and_text() {
        check_lines(&Category::Bool, "t => true\nf => false");
        check_fails(
            &Category::Bool,
            r#"true
            T"#,
        );
        assert!(render(b"", &Category::Bool).is_err());
        check_lines(
            &Category::Text,
            r#"1 year 2 mons 3 days 04:05:06.5 => "1 year 2 mons 3 days 04:05:06.5"
            -1 days +02:03:00 => "-1 days +02:03:00"
            \x00ff10 => "\\x00ff10"
            a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 => "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
            03:04:05.5 => "03:04:05.5"
            24:00:00 => "24:00:00"
            03:04:05+05:30 => "03:04:05+05:30"
            $12.50 => "$12.50"
            192.168.0.1/24 => "192.168.0.1/24"
            [1,5) => "[1,5)"
            (1,1),(0,0) => "(1,1),(0,0)"
            so sad => "so sad"
            1 => "1"
            'fat':1 'rat':2 => "'fat':1 'rat':2""#,
        );
        // char(5) keeps its padding (`::text` would strip it, the output function does not).
        check(&Category::Text, "ab   ", r#""ab   ""#);
        assert_eq!(render(b"\xff", &Category::Text), Err(RenderError::InvalidUtf8));
    }

    #[test]
    fn nesting_is_bounded() {
        // Quoting grows exponentially with record depth, so reach the limit through the
        // int2vector form, whose elements need no quoting.
        let mut kind = Category::Number;
        for _ in 0..40 {
            kind = array(kind);
        }
        assert_eq!(render(b"1", &kind), Err(RenderError::TooDeep(MAX_NESTING)));
        let record = Category::Composite { fields: vec![("x".into(), Category::Number)] };
        assert_eq!(render_at(b"(1)", &record, MAX_NESTING), Err(RenderError::TooDeep(MAX_NESTING)));
        assert!(render_at(b"(1)", &record, MAX_NESTING - 1).is_ok());
    }

    #[test]
    fn key_order_and_rows() {
        let mut keys = vec!["é", "z", "aa", "B", "", "a", "ab"];
        keys.sort_by(|a, b| jsonb_key_order(a, b));
        assert_eq!(keys, ["", "B", "a", "z", "aa", "ab", "é"]);
        let row = row_object([
            ("id".to_string(), Value::from(1)),
            ("a".to_string(), Value::from("first")),
            ("name".to_string(), Value::Null),
            ("a".to_string(), Value::from("last")),
        ]);
        assert_eq!(serde_json::to_string(&row).unwrap(), r#"{"a":"last","id":1,"name":null}"#);
    }

    fn any_kind() -> impl Strategy<Value = Category> {
        let leaf = prop_oneof![
            Just(Category::Bool),
            Just(Category::Number),
            Just(Category::Json),
            Just(Category::Jsonb),
            Just(Category::Date),
            Just(Category::Timestamp),
            Just(Category::TimestampTz),
            Just(Category::Text),
        ];
        leaf.prop_recursive(4, 16, 3, |inner| {
            prop_oneof![
                (inner.clone(), prop_oneof![Just(b','), Just(b';')])
                    .prop_map(|(elem, delim)| Category::Array { elem: Box::new(elem), delim }),
                prop::collection::vec(inner, 0..4).prop_map(|kinds| Category::Composite {
                    fields: kinds
                        .into_iter()
                        .enumerate()
                        .map(|(i, k)| (format!("f{i}"), k))
                        .collect(),
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(kind in any_kind(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = render(&bytes, &kind);
        }

        /// Arbitrary bytes rarely get past the first check; these reach the parsers' insides.
        #[test]
        fn never_panics_on_literal_like_text(
            kind in any_kind(),
            text in r#"[\[\]{}()",;\\: =tfNUL0-9.eE+\-BCinfty]{0,48}"#,
        ) {
            let _ = render(text.as_bytes(), &kind);
        }
    }
}
