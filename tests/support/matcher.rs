//! An independent reading of SPEC §5's filters, written from its words and not from
//! `rowcast::filter`: what a subscription, a catch-up, the history API or a replay must pick
//! out of the log. Also the filter's query-parameter form (`type=…&where=path:op:value`).

use serde_json::{Value, json};

/// Whether `event` (an envelope as the log stores it) passes `filter` (the JSON form of §5):
/// every field given must hold; a missing field matches anything.
pub fn matches(filter: &Value, event: &Value) -> bool {
    let kind = event["type"].as_str().expect("type");
    let (entity, action) = kind.split_once('.').expect("event types have a dot");
    let type_ok = match &filter["type"] {
        Value::Null => true,
        Value::Array(patterns) => patterns.iter().any(|p| pattern(p, entity, action)),
        single => pattern(single, entity, action),
    };
    let scope_ok = |field: &str| match &filter[field] {
        Value::Null => true,
        Value::Array(ids) => ids.contains(&event[field]) && !event[field].is_null(),
        one => one == &event[field] && !event[field].is_null(),
    };
    let severity_ok = filter["severity"]
        .as_str()
        .is_none_or(|minimum| rank(event["severity"].as_str().expect("severity")) >= rank(minimum));
    let entries = filter["where"].as_array().map(Vec::as_slice).unwrap_or_default();
    type_ok
        && scope_ok("organization_id")
        && scope_ok("domain_id")
        && severity_ok
        && entries.iter().all(|entry| holds(entry, event))
}

/// `*`, `entity.*`, `*.action` or `entity.action`.
fn pattern(pattern: &Value, entity: &str, action: &str) -> bool {
    let pattern = pattern.as_str().expect("type pattern");
    if pattern == "*" {
        return true;
    }
    let (e, a) = pattern.split_once('.').expect("pattern");
    (e == "*" || e == entity) && (a == "*" || a == action)
}

/// `debug` < `info` < `warning` < `error` < `critical`.
fn rank(severity: &str) -> usize {
    ["debug", "info", "warning", "error", "critical"]
        .iter()
        .position(|s| *s == severity)
        .unwrap_or_else(|| panic!("severity {severity}"))
}

/// One `where` entry: a missing key or null matches only `is_null: true`; numbers compare as
/// numbers, strings as strings (by code point), never across.
pub fn holds(entry: &Value, event: &Value) -> bool {
    let path = entry[0].as_str().expect("path");
    let op = entry[1].as_str().expect("op");
    let operand = &entry[2];
    if op == "changed" {
        return event["changed"].as_array().is_some_and(|c| c.contains(&json!(path)));
    }
    let (row, keys) = match path.strip_prefix("old.") {
        Some(rest) => (&event["old"], rest),
        None => (&event["data"], path),
    };
    // `Value`'s index gives null for a missing key and for a key of a non-object.
    let value = keys.split('.').fold(row, |at, key| match at {
        Value::Object(map) => map.get(key).unwrap_or(&Value::Null),
        _ => &Value::Null,
    });
    if op == "is_null" {
        return operand.as_bool() == Some(value.is_null());
    }
    if value.is_null() {
        return false;
    }
    let same = |a: &Value, b: &Value| match (a, b) {
        (Value::Number(_), Value::Number(_)) => a.as_f64() == b.as_f64(),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        _ => false,
    };
    let order = |a: &Value, b: &Value| match (a, b) {
        (Value::Number(_), Value::Number(_)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.chars().cmp(y.chars())),
        _ => None,
    };
    let listed = || operand.as_array().expect("list").iter().any(|x| same(value, x));
    match op {
        "eq" => same(value, operand),
        "neq" => !same(value, operand),
        "in" => listed(),
        "nin" => !listed(),
        "lt" => order(value, operand).is_some_and(|o| o.is_lt()),
        "lte" => order(value, operand).is_some_and(|o| o.is_le()),
        "gt" => order(value, operand).is_some_and(|o| o.is_gt()),
        "gte" => order(value, operand).is_some_and(|o| o.is_ge()),
        "contains" => match value {
            Value::String(s) => operand.as_str().is_some_and(|p| s.contains(p)),
            Value::Array(items) => items.iter().any(|i| same(i, operand)),
            _ => false,
        },
        other => panic!("test operator {other}"),
    }
}

/// The ids of the events of `log` that `filter` picks, in log order.
pub fn picked(filter: &Value, log: &[Value]) -> Vec<u64> {
    log.iter().filter(|e| matches(filter, e)).map(|e| e["id"].as_u64().expect("id")).collect()
}

/// The filter in query form, URL-encoded: `type=…&organization_id=…&where=path:op:value`
/// (lists comma-separated).
pub fn query(filter: &Value) -> String {
    let mut pairs = form_urlencoded::Serializer::new(String::new());
    for field in ["type", "organization_id", "domain_id", "severity"] {
        match &filter[field] {
            Value::Null => {}
            Value::Array(items) => {
                pairs.append_pair(field, &items.iter().map(text).collect::<Vec<_>>().join(","));
            }
            one => {
                pairs.append_pair(field, &text(one));
            }
        }
    }
    for entry in filter["where"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let mut part = format!("{}:{}", text(&entry[0]), text(&entry[1]));
        match &entry[2] {
            Value::Null => {}
            Value::Array(items) => {
                part += &format!(":{}", items.iter().map(text).collect::<Vec<_>>().join(","));
            }
            value => part += &format!(":{}", text(value)),
        }
        pairs.append_pair("where", &part);
    }
    pairs.finish()
}

/// What `query(filter)` says once read back: a `where` value is text, so one that reads as a
/// number is a number and `true`/`false` are booleans (a string operand like `"10"` cannot be
/// said in the query form).
pub fn as_query_reads(filter: &Value) -> Value {
    let read = |value: &Value| match value {
        Value::String(s) if s == "true" => json!(true),
        Value::String(s) if s == "false" => json!(false),
        Value::String(s) => s.parse::<serde_json::Number>().map_or(value.clone(), Value::Number),
        other => other.clone(),
    };
    let mut filter = filter.clone();
    if let Some(entries) = filter["where"].as_array_mut() {
        for entry in entries {
            match entry.get_mut(2) {
                Some(Value::Array(items)) => items.iter_mut().for_each(|item| *item = read(item)),
                Some(operand) => *operand = read(operand),
                None => {}
            }
        }
    }
    filter
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
