//! json and jsonb: parsed, then re-shaped the way `jsonb_in` stores the value.

use serde_json::Value;

use super::number::{number_value, numeric_normalize};
use super::{RenderError, row_object};

pub(super) fn render_json(text: &[u8]) -> Result<Value, RenderError> {
    let value: Value =
        serde_json::from_slice(text).map_err(|e| RenderError::BadJson(e.to_string()))?;
    normalize_json(value)
}

/// Re-shapes a parsed json value the way jsonb_in stores it. Recursion depth is bounded by
/// serde_json's parser limit.
fn normalize_json(value: Value) -> Result<Value, RenderError> {
    Ok(match value {
        Value::Number(n) => match numeric_normalize(n.as_str()) {
            Ok(digits) => number_value(&digits)?,
            // Postgres rejects the whole value; keeping the number as written is the least lossy.
            Err(_) => Value::Number(n),
        },
        Value::String(s) => Value::String(reject_nul(s)?),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(normalize_json).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => {
            let mut entries = Vec::with_capacity(map.len());
            for (key, v) in map {
                entries.push((reject_nul(key)?, normalize_json(v)?));
            }
            Value::Object(row_object(entries))
        }
        other => other,
    })
}

/// jsonb cannot store `\u0000` ("unsupported Unicode escape sequence").
fn reject_nul(s: String) -> Result<String, RenderError> {
    if s.contains('\0') {
        return Err(RenderError::BadJson("\\u0000 cannot be converted to text".into()));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    //! The pairs below were observed on PostgreSQL 15, as described in `render::tests`.
    #![allow(clippy::unwrap_used)]

    use crate::capture::render::tests::{check, check_fails, check_lines};
    use crate::capture::render::{Category, render};

    #[test]
    fn json_and_jsonb() {
        check_lines(
            &Category::Json,
            r#"{"b":1.0e2,"a":1E-2,"aa":-0,"a":2,"c":[1.50,-0.0,1e1],"\u00e9":"\u00e9\ud83d\ude00"} => {"a": 2, "b": 100, "c": [1.50, 0.0, 10], "aa": 0, "é": "é😀"}
              {"k": 1 , "k": [1.0E+1, -1.5e-3]}   => {"k": [10, -0.0015]}
            null => null
            "x" => "x"
            12.34e-1 => 1.234
            {"d": {"d": {"d": [1E-1, 0.01e1]}}, "\u00fc": "\ud83d\ude00 \t \n \" \\ \/", "d": 1.0} => {"d": 1.0, "ü": "😀 \t \n \" \\ /"}"#,
        );
        check(&Category::Json, "1e1000", &format!("1{}", "0".repeat(1000)));
        check_fails(
            &Category::Json,
            r#"{"a":"\u0000"}
            [01]
            "\ud800"
            {"#,
        );
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(render(deep.as_bytes(), &Category::Json).is_err());
        for jsonb in [
            r#"{"a": 2, "b": 100, "aa": 0}"#,
            r#"{"": 3, "B": 1, "a": 2, "z": 5, "é": 4}"#,
            r#"{"": true, "a": {"a": null, "b": [{"c": 2, "d": 1}]}, "é": "é"}"#,
        ] {
            check(&Category::Jsonb, jsonb, jsonb);
        }
    }
}
