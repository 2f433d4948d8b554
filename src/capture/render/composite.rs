//! Composites: `record_out` text as an object keyed in jsonb order, each field rendered by
//! its own kind.

use serde_json::Value;

use super::{Category, RenderError, is_pg_space, render_at, row_object, snippet};

pub(super) fn parse_record(
    text: &[u8],
    fields: &[(String, Category)],
    depth: usize,
) -> Result<Value, RenderError> {
    let error = || RenderError::BadRecord(snippet(text));
    let mut pos = text.iter().take_while(|&&b| is_pg_space(b)).count();
    if text.get(pos) != Some(&b'(') {
        return Err(error());
    }
    pos += 1;
    let mut columns = Vec::with_capacity(fields.len());
    for (i, (name, kind)) in fields.iter().enumerate() {
        if i > 0 {
            if text.get(pos) != Some(&b',') {
                return Err(error());
            }
            pos += 1;
        }
        let value = match text.get(pos) {
            // Nothing at all between separators is NULL; `""` is the empty string.
            Some(b',' | b')') => Value::Null,
            _ => {
                let raw = read_record_field(text, &mut pos).ok_or_else(error)?;
                render_at(&raw, kind, depth)?
            }
        };
        columns.push((name.clone(), value));
    }
    if text.get(pos) != Some(&b')') {
        return Err(error());
    }
    if !text.iter().skip(pos + 1).all(|&b| is_pg_space(b)) {
        return Err(error());
    }
    Ok(Value::Object(row_object(columns)))
}

/// One field of record_out text: inside quotes `""` is a quote, and a backslash escapes the
/// next byte in or out of quotes. Returns None on unterminated input.
fn read_record_field(text: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut in_quotes = false;
    loop {
        let c = *text.get(*pos)?;
        *pos += 1;
        match c {
            b'\\' => {
                buf.push(*text.get(*pos)?);
                *pos += 1;
            }
            b'"' if in_quotes && text.get(*pos) == Some(&b'"') => {
                buf.push(b'"');
                *pos += 1;
            }
            b'"' => in_quotes = !in_quotes,
            b',' | b')' if !in_quotes => {
                *pos -= 1;
                return Some(buf);
            }
            _ => buf.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The pairs below were observed on PostgreSQL 15, as described in `render::tests`.
    #![allow(clippy::unwrap_used)]

    use crate::capture::render::Category;
    use crate::capture::render::tests::{array, check, check_fails, check_lines};

    fn pair_kind() -> Category {
        let fields = [
            ("zz", Category::Number),
            ("a", Category::Text),
            ("B", Category::Number),
            ("ts", Category::TimestampTz),
            ("j", Category::Json),
            ("arr", array(Category::Number)),
            ("m", Category::Text),
        ];
        Category::Composite {
            fields: fields.into_iter().map(|(n, k)| (n.to_string(), k)).collect(),
        }
    }

    #[test]
    fn composites() {
        let pair = pair_kind();
        check_lines(
            &pair,
            r#"(1,"a b",NaN,"2024-01-02 03:04:05+00","{""y"":1e2,""x"":[]}","{1,NULL}","so sad") => {"B": "NaN", "a": "a b", "j": {"x": [], "y": 100}, "m": "so sad", "ts": "2024-01-02T03:04:05+00:00", "zz": 1, "arr": [1, null]}
            (,"",,,,{},) => {"B": null, "a": "", "j": null, "m": null, "ts": null, "zz": null, "arr": []}
            (2,"x""y\\z(),",-0,infinity,null,"{{1},{2}}",happy) => {"B": 0, "a": "x\"y\\z(),", "j": null, "m": "happy", "ts": "infinity", "zz": 2, "arr": [[1], [2]]}"#,
        );
        let outer = Category::Composite {
            fields: vec![
                ("p".into(), pair.clone()),
                ("ps".into(), array(pair)),
                ("d".into(), Category::Date),
            ],
        };
        check_lines(
            &outer,
            r#"("(1,a,1.5,,1,,)","{""(2,\\""b c\\"",,,,{3},happy)"",NULL}",2024-01-01) => {"d": "2024-01-01", "p": {"B": 1.5, "a": "a", "j": 1, "m": null, "ts": null, "zz": 1, "arr": null}, "ps": [{"B": null, "a": "b c", "j": null, "m": "happy", "ts": null, "zz": 2, "arr": [3]}, null]}"#,
        );
        let record = Category::Composite {
            fields: ["f1", "f2", "f3", "f4"].map(|f| (f.to_string(), Category::Text)).to_vec(),
        };
        check_lines(
            &record,
            r#"(1,"a b",,"x""y") => {"f1": "1", "f2": "a b", "f3": null, "f4": "x\"y"}
            (1,"a\"b",,x\,y) => {"f1": "1", "f2": "a\"b", "f3": null, "f4": "x,y"}"#,
        );
        check(&Category::Composite { fields: vec![] }, "()", "{}");
        check_fails(
            &record,
            r#"(1,2,3)
            (1,2,3,4,5)
            1,2,3,4
            (1,2,3,4
            (1,2,3,"4)
            (1,2,3,4\
            (1,2,3,4)x"#,
        );
    }
}
