//! Row-content predicates (SPEC §5 `where`): parsing, and matching against an event's
//! `data`, `old` and `changed`. Pure.
//!
//! A missing key and a JSON null are the same (absent) and match only `is_null: true`.
//! Numbers compare as numbers and strings as strings (by bytes, as `COLLATE "C"` does in the
//! SQL of [`super::sql`]); a comparison across types is false, so `neq` and `nin` hold for it.

use std::cell::OnceCell;
use std::cmp::Ordering;

use serde_json::{Number, Value, json};

use super::{FilterError, MAX_LIST};

/// Most predicates one filter may hold: each is checked per candidate event.
pub const MAX_PREDICATES: usize = 32;
/// Deepest nested path, in keys.
pub const MAX_DEPTH: usize = 8;

/// Which row of the event a path reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Data,
    Old,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Eq(Value),
    Neq(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Lt(Value),
    Lte(Value),
    Gt(Value),
    Gte(Value),
    IsNull(bool),
    Contains(Value),
    Changed,
}

/// One `[path, op, value]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    /// As written, for the echo.
    text: String,
    side: Side,
    /// The keys below `data` (or `old`), outermost first.
    path: Vec<String>,
    op: Op,
}

/// An event's envelope, parsed at most once and only when a predicate asks for it.
#[derive(Debug)]
pub struct Envelope<'a> {
    text: &'a str,
    parsed: OnceCell<Option<Value>>,
}

impl<'a> Envelope<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text, parsed: OnceCell::new() }
    }

    /// `None` when the envelope is not JSON (then no predicate holds).
    pub fn value(&self) -> Option<&Value> {
        self.parsed.get_or_init(|| serde_json::from_str(self.text).ok()).as_ref()
    }
}

impl Predicate {
    /// Parses `[path, op]` or `[path, op, value]`.
    pub fn from_json(value: &Value) -> Result<Self, FilterError> {
        let shape = || {
            FilterError::new(format!(
                "filter.where entry {value} must be [path, operator] or [path, operator, value]"
            ))
        };
        let items = value.as_array().ok_or_else(shape)?;
        let (path, op, operand) = match items.as_slice() {
            [path, op] => (path, op, None),
            [path, op, operand] => (path, op, Some(operand)),
            _ => return Err(shape()),
        };
        let (path, op) = (path.as_str().ok_or_else(shape)?, op.as_str().ok_or_else(shape)?);
        Self::build(path, op, operand.cloned())
    }

    /// Parses the query form `path:op:value` (`in`/`nin` values comma-separated). A value is a
    /// number when it reads as one, `true`/`false` a boolean, and a string otherwise.
    pub fn from_query(text: &str) -> Result<Self, FilterError> {
        let mut parts = text.splitn(3, ':');
        let path = parts.next().unwrap_or_default();
        let op = parts.next().ok_or_else(|| {
            FilterError::new(format!("where={text:?} is not path:operator[:value]"))
        })?;
        let operand = parts.next().map(|raw| match op {
            "in" | "nin" => Value::Array(raw.split(',').map(query_value).collect()),
            _ => query_value(raw),
        });
        Self::build(path, op, operand)
    }

    fn build(text: &str, op: &str, operand: Option<Value>) -> Result<Self, FilterError> {
        let (side, rest) = match text.strip_prefix("old.") {
            Some(rest) => (Side::Old, rest),
            None => (Side::Data, text),
        };
        let path: Vec<String> = rest.split('.').map(String::from).collect();
        if rest.is_empty() || path.iter().any(|key| key.is_empty()) {
            return Err(FilterError::new(format!(
                "where path {text:?} must be column names joined by dots (old. for the old row)"
            )));
        }
        if path.len() > MAX_DEPTH {
            return Err(FilterError::new(format!(
                "where path {text:?} is deeper than {MAX_DEPTH} keys"
            )));
        }
        let needs =
            |what: &str| FilterError::new(format!("where {text:?} {op}: the value must be {what}"));
        let scalar = |v: Option<Value>| match v {
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => Ok(v),
            _ => Err(needs("a string, a number or a boolean (is_null tests for null)")),
        };
        let ordered = |v: Option<Value>| match v {
            Some(v @ (Value::String(_) | Value::Number(_))) => Ok(v),
            _ => Err(needs("a string or a number")),
        };
        let list = |v: Option<Value>| match v {
            Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_LIST => {
                items.into_iter().map(|item| scalar(Some(item))).collect::<Result<Vec<_>, _>>()
            }
            _ => Err(needs(&format!(
                "a non-empty list (at most {MAX_LIST}) of strings, numbers or booleans"
            ))),
        };
        let op = match op {
            "eq" => Op::Eq(scalar(operand)?),
            "neq" => Op::Neq(scalar(operand)?),
            "in" => Op::In(list(operand)?),
            "nin" => Op::Nin(list(operand)?),
            "lt" => Op::Lt(ordered(operand)?),
            "lte" => Op::Lte(ordered(operand)?),
            "gt" => Op::Gt(ordered(operand)?),
            "gte" => Op::Gte(ordered(operand)?),
            "contains" => Op::Contains(scalar(operand)?),
            "is_null" => match operand {
                Some(Value::Bool(b)) => Op::IsNull(b),
                _ => return Err(needs("true or false")),
            },
            "changed" => {
                if operand.is_some() {
                    return Err(needs("absent"));
                }
                if side == Side::Old || path.len() != 1 {
                    return Err(FilterError::new(format!(
                        "where {text:?} changed: changed takes a column name, without old. or dots"
                    )));
                }
                Op::Changed
            }
            other => {
                return Err(FilterError::new(format!(
                    "where operator {other:?} is not one of eq, neq, in, nin, lt, lte, gt, gte, \
                     is_null, contains or changed"
                )));
            }
        };
        Ok(Self { text: text.to_owned(), side, path, op })
    }

    /// The column this predicate reads (the first key of its path).
    pub fn column(&self) -> &str {
        self.path.first().map_or("", String::as_str)
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn path(&self) -> &[String] {
        &self.path
    }

    pub fn op(&self) -> &Op {
        &self.op
    }

    /// Whether the predicate holds for the event `envelope` (a parsed envelope).
    pub fn matches(&self, envelope: &Value) -> bool {
        if self.op == Op::Changed {
            return envelope
                .get("changed")
                .and_then(Value::as_array)
                .is_some_and(|columns| columns.iter().any(|c| c.as_str() == Some(self.column())));
        }
        let Some(value) = lookup(envelope, self.side, &self.path) else {
            return self.op == Op::IsNull(true);
        };
        match &self.op {
            Op::Eq(x) => equal(value, x),
            Op::Neq(x) => !equal(value, x),
            Op::In(xs) => xs.iter().any(|x| equal(value, x)),
            Op::Nin(xs) => !xs.iter().any(|x| equal(value, x)),
            Op::Lt(x) => compare(value, x) == Some(Ordering::Less),
            Op::Lte(x) => matches!(compare(value, x), Some(Ordering::Less | Ordering::Equal)),
            Op::Gt(x) => compare(value, x) == Some(Ordering::Greater),
            Op::Gte(x) => matches!(compare(value, x), Some(Ordering::Greater | Ordering::Equal)),
            Op::IsNull(null) => !null,
            Op::Contains(x) => match (value, x) {
                (Value::String(s), Value::String(part)) => s.contains(part.as_str()),
                (Value::Array(items), x) => items.iter().any(|item| equal(item, x)),
                _ => false,
            },
            Op::Changed => false,
        }
    }

    /// For `eq` and `in` on a `data` path: the path and the [`equality_key`] of each value it
    /// accepts. An event whose value at that path has none of these keys cannot match, which
    /// is what lets the bus index such predicates (`bus/index.rs`).
    pub fn equality_keys(&self) -> Option<(&[String], Vec<String>)> {
        let values = match (&self.side, &self.op) {
            (Side::Data, Op::Eq(x)) => std::slice::from_ref(x),
            (Side::Data, Op::In(xs)) => xs.as_slice(),
            _ => return None,
        };
        let keys = values.iter().map(equality_key).collect::<Option<Vec<_>>>()?;
        Some((&self.path, keys))
    }

    /// The predicate as it is echoed (and parsed back).
    pub fn to_json(&self) -> Value {
        let (name, operand) = match &self.op {
            Op::Eq(x) => ("eq", Some(x.clone())),
            Op::Neq(x) => ("neq", Some(x.clone())),
            Op::In(xs) => ("in", Some(Value::Array(xs.clone()))),
            Op::Nin(xs) => ("nin", Some(Value::Array(xs.clone()))),
            Op::Lt(x) => ("lt", Some(x.clone())),
            Op::Lte(x) => ("lte", Some(x.clone())),
            Op::Gt(x) => ("gt", Some(x.clone())),
            Op::Gte(x) => ("gte", Some(x.clone())),
            Op::IsNull(b) => ("is_null", Some(Value::Bool(*b))),
            Op::Contains(x) => ("contains", Some(x.clone())),
            Op::Changed => ("changed", None),
        };
        match operand {
            Some(operand) => json!([self.text, name, operand]),
            None => json!([self.text, name]),
        }
    }
}

/// The non-null value at `path` below the envelope's `data` or `old`.
fn lookup<'v>(envelope: &'v Value, side: Side, path: &[String]) -> Option<&'v Value> {
    let row = envelope.get(match side {
        Side::Data => "data",
        Side::Old => "old",
    });
    path.iter().try_fold(row, |at, key| Some(at?.get(key))).flatten().filter(|v| !v.is_null())
}

/// The value at `path` below the envelope's `data`, as [`equality_key`] keys it.
pub fn data_key(envelope: &Value, path: &[String]) -> Option<String> {
    lookup(envelope, Side::Data, path).and_then(equality_key)
}

/// A key that two scalars share exactly when [`equal`] holds for them (numbers by exact
/// value: `1`, `1.0` and `1e0` share one); `None` for arrays, objects and null, which no
/// `eq` holds for.
pub fn equality_key(value: &Value) -> Option<String> {
    Some(match value {
        Value::String(text) => format!("s{text}"),
        Value::Bool(true) => "t".to_owned(),
        Value::Bool(false) => "f".to_owned(),
        Value::Number(number) => {
            let decimal = Decimal::parse(number.as_str())?;
            let sign = if decimal.negative { "-" } else { "" };
            format!("n{sign}{}{}e{}", decimal.int, decimal.frac, decimal.exponent)
        }
        Value::Null | Value::Array(_) | Value::Object(_) => return None,
    })
}

/// A value in the query form: `true`/`false`, a number, or else a string; a JSON string in
/// double quotes (`"404"`, `"true"`) is always a string.
fn query_value(raw: &str) -> Value {
    if raw.starts_with('"')
        && let Ok(Value::String(text)) = serde_json::from_str::<Value>(raw)
    {
        return Value::String(text);
    }
    match raw {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => match raw.parse::<Number>() {
            Ok(n) => Value::Number(n),
            Err(_) => Value::String(raw.to_owned()),
        },
    }
}

/// Equality as `jsonb` has it for scalars: numbers by value, others exactly, across types never.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers(x, y) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        _ => false,
    }
}

/// Order of two numbers or two strings; `None` across types.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers(x, y),
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

/// Order of two JSON numbers by their exact decimal value, as Postgres's `numeric` orders
/// them (`1.0 = 1`, `0.1 < 0.10000000000000001`): numbers keep their text
/// (`arbitrary_precision`), so nothing is rounded through a float. Integers are read in place
/// (`as_i128`), and a decimal's text is borrowed, not copied: this runs per candidate
/// subscription per event.
fn numbers(x: &Number, y: &Number) -> Option<Ordering> {
    if let Some(a) = x.as_i128()
        && let Some(b) = y.as_i128()
    {
        return Some(a.cmp(&b));
    }
    // An exponent past i64 (1e99999999999999999999) compares with nothing, as Postgres's
    // numeric cannot hold it either.
    Some(Decimal::parse(x.as_str())?.cmp(&Decimal::parse(y.as_str())?))
}

/// A finite decimal as `sign × 0.digits × 10^exponent`, read in place from a JSON number's
/// text: `digits` are `int` then `frac`, with no leading or trailing zero digit (zero has no
/// digits and is never negative).
#[derive(Debug)]
pub(super) struct Decimal<'a> {
    negative: bool,
    exponent: i64,
    int: &'a str,
    frac: &'a str,
}

impl<'a> Decimal<'a> {
    /// JSON number text: `-?int(.frac)?([eE][+-]?exp)?`; `None` for anything else.
    pub(super) fn parse(text: &'a str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
            Some((mantissa, exponent)) => {
                let exponent = exponent.strip_prefix('+').unwrap_or(exponent);
                (mantissa, exponent.parse::<i64>().ok()?)
            }
            None => (rest, 0),
        };
        let (int, frac) = match mantissa.split_once('.') {
            Some((_, "")) => return None,
            Some(parts) => parts,
            None => (mantissa, ""),
        };
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        // `places`: where the point sits after the first significant digit's position.
        let int = int.trim_start_matches('0');
        let (int, frac, places) = if int.is_empty() {
            let significant = frac.trim_start_matches('0');
            let skipped = i64::try_from(frac.len() - significant.len()).ok()?;
            ("", significant, -skipped)
        } else {
            (int, frac, i64::try_from(int.len()).ok()?)
        };
        let (int, frac) = match frac.trim_end_matches('0') {
            "" => (int.trim_end_matches('0'), ""),
            frac => (int, frac),
        };
        if int.is_empty() && frac.is_empty() {
            return Some(Self { negative: false, exponent: 0, int, frac });
        }
        Some(Self { negative, exponent: exponent.checked_add(places)?, int, frac })
    }

    fn digits(&self) -> impl Iterator<Item = u8> + '_ {
        self.int.bytes().chain(self.frac.bytes())
    }

    fn is_zero(&self) -> bool {
        self.int.is_empty() && self.frac.is_empty()
    }

    fn magnitude(&self, other: &Self) -> Ordering {
        (!self.is_zero(), self.exponent)
            .cmp(&(!other.is_zero(), other.exponent))
            .then_with(|| self.digits().cmp(other.digits()))
    }
}

impl Ord for Decimal<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.magnitude(other),
            (true, true) => other.magnitude(self),
        }
    }
}

impl PartialOrd for Decimal<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Decimal<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Decimal<'_> {}

#[cfg(test)]
#[path = "predicate_tests.rs"]
mod tests;
