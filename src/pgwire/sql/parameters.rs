//! `$n` parameters of the extended protocol. Pure.
//!
//! A parameter's type is what the driver declared, or else what Postgres would infer from
//! where it stands: `id`, `LIMIT` and `SINCE` take `int8`, `timestamp` `timestamptz`,
//! `data->'k'` `jsonb` (its value compares as the JSON it is), `data->>'k'` and the text
//! columns `text`. A bound value becomes a literal token in place of `$n` before the
//! statement is parsed, so it is never read as SQL.

use sqlparser::tokenizer::Token;
use tokio_postgres::types::Type;

use super::{Unsupported, unsupported};
use crate::model::{PG_EPOCH_OFFSET_MICROS, Timestamp};

/// The number of a placeholder token (`$3` is 3).
pub(super) fn number(token: &Token) -> Option<usize> {
    match token {
        Token::Placeholder(text) => text.strip_prefix('$')?.parse().ok().filter(|n| *n > 0),
        _ => None,
    }
}

/// The most parameters a statement may have.
pub const MAX_PARAMETERS: usize = 256;

/// The type of each parameter, `$1` first, as its place in `tokens` says, and a value of that
/// type valid where it stands (to read the statement before any value is bound).
pub(super) fn infer(tokens: &[Token]) -> Result<Vec<(Type, Token)>, Unsupported> {
    let mut types: Vec<Option<(Type, Token)>> = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        let Token::Placeholder(text) = token else { continue };
        let Some(n) = number(token).filter(|n| *n <= MAX_PARAMETERS) else {
            return unsupported(format!(
                "the parameter {text}: parameters are $1 to ${MAX_PARAMETERS}"
            ));
        };
        if n > types.len() {
            types.resize(n, None);
        }
        types[n - 1].get_or_insert_with(|| inferred(&tokens[..at]));
    }
    Ok(types.into_iter().map(|t| t.unwrap_or_else(text)).collect())
}

fn text() -> (Type, Token) {
    (Type::TEXT, Token::SingleQuotedString("x".into()))
}

/// What the tokens before a parameter say it is: the nearest column, `->`, `->>`, `LIMIT` or
/// `SINCE` before it, past operators, lists and other values.
fn inferred(before: &[Token]) -> (Type, Token) {
    let one = || Token::Number("1".into(), false);
    for token in before.iter().rev() {
        match token {
            Token::Arrow => return (Type::JSONB, one()),
            Token::LongArrow | Token::Question => return text(),
            Token::Word(word) => match word.value.to_ascii_lowercase().as_str() {
                "id" | "limit" | "since" => return (Type::INT8, one()),
                "timestamp" => {
                    let at = Token::SingleQuotedString("2000-01-01T00:00:00Z".into());
                    return (Type::TIMESTAMPTZ, at);
                }
                "type" => return (Type::TEXT, Token::SingleQuotedString("entity.action".into())),
                "severity" => return (Type::TEXT, Token::SingleQuotedString("debug".into())),
                "and" | "not" | "in" | "between" | "like" | "is" => {}
                _ => return text(),
            },
            _ => {}
        }
    }
    text()
}

/// The literal token a bound value stands for: `value` (`None` is NULL) of type `ty`, in the
/// binary or the text format.
pub fn literal(ty: &Type, binary: bool, value: Option<&[u8]>) -> Result<Token, Unsupported> {
    let Some(bytes) = value else { return Ok(Token::make_keyword("NULL")) };
    let text = || {
        std::str::from_utf8(bytes)
            .map_err(|_| Unsupported(format!("a {ty} parameter is not UTF-8")))
    };
    let malformed = || Unsupported(format!("a malformed {ty} parameter"));
    let number = |n: String| Ok(Token::Number(n, false));
    match *ty {
        Type::INT2 | Type::INT4 | Type::INT8 if binary => {
            let n = match bytes.len() {
                2 => i64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
                4 => i64::from(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
                8 => i64::from_be_bytes(bytes.try_into().map_err(|_| malformed())?),
                _ => return Err(malformed()),
            };
            number(n.to_string())
        }
        Type::FLOAT4 | Type::FLOAT8 if binary => {
            let n = match bytes.len() {
                4 => f64::from(f32::from_be_bytes(bytes.try_into().map_err(|_| malformed())?)),
                8 => f64::from_be_bytes(bytes.try_into().map_err(|_| malformed())?),
                _ => return Err(malformed()),
            };
            if !n.is_finite() {
                return Err(malformed());
            }
            number(n.to_string())
        }
        Type::INT2 | Type::INT4 | Type::INT8 | Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC
            if !binary =>
        {
            let text = text()?.trim();
            serde_json::from_str::<serde_json::Number>(text).map_err(|_| malformed())?;
            number(text.to_owned())
        }
        Type::BOOL => {
            let truth = match (binary, bytes) {
                (true, [byte]) => *byte != 0,
                (false, _) => match text()?.trim().to_ascii_lowercase().as_str() {
                    "t" | "true" | "on" | "yes" | "1" => true,
                    "f" | "false" | "off" | "no" | "0" => false,
                    _ => return Err(malformed()),
                },
                _ => return Err(malformed()),
            };
            Ok(Token::make_keyword(if truth { "TRUE" } else { "FALSE" }))
        }
        Type::TIMESTAMPTZ | Type::TIMESTAMP if binary => {
            let micros = i64::from_be_bytes(bytes.try_into().map_err(|_| malformed())?);
            let at = Timestamp(micros.saturating_add(PG_EPOCH_OFFSET_MICROS));
            Ok(Token::SingleQuotedString(at.to_string()))
        }
        Type::JSONB | Type::JSON => {
            let json = match (binary, *ty == Type::JSONB, bytes) {
                (true, true, [1, rest @ ..]) => rest,
                (true, true, _) => return Err(malformed()),
                _ => bytes,
            };
            let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| malformed())?;
            match value {
                serde_json::Value::String(text) => Ok(Token::SingleQuotedString(text)),
                serde_json::Value::Number(n) => number(n.to_string()),
                serde_json::Value::Bool(b) => {
                    Ok(Token::make_keyword(if b { "TRUE" } else { "FALSE" }))
                }
                serde_json::Value::Null => Ok(Token::make_keyword("NULL")),
                _ => unsupported("a JSON parameter that is an object or an array"),
            }
        }
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            Ok(Token::SingleQuotedString(text()?.to_owned()))
        }
        Type::TIMESTAMPTZ | Type::TIMESTAMP => Ok(Token::SingleQuotedString(text()?.to_owned())),
        _ => unsupported(format!(
            "parameters of type {ty} (send text, numbers, booleans, times or JSON)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::tokenizer::Tokenizer;

    use super::*;

    fn types(sql: &str) -> Vec<Type> {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().expect("tokens");
        infer(&tokens).expect("types").into_iter().map(|(ty, _)| ty).collect()
    }

    #[test]
    fn a_parameter_has_the_type_of_where_it_stands() {
        assert_eq!(
            types(
                "SELECT * FROM events WHERE id > $1 AND type IN ('a.b', $2) AND data->>'s' = $3
                   AND data->'n' >= $4 AND timestamp BETWEEN $5 AND $6 AND changed ? $7 LIMIT $8"
            ),
            vec![
                Type::INT8,
                Type::TEXT,
                Type::TEXT,
                Type::JSONB,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::INT8
            ]
        );
        assert_eq!(
            types("COPY (SUBSCRIBE TO events WHERE type LIKE $2 SINCE $1) TO STDOUT"),
            vec![Type::INT8, Type::TEXT]
        );
    }

    #[test]
    fn values_become_literals_of_their_type() {
        let lit = |ty: &Type, binary: bool, bytes: &[u8]| literal(ty, binary, Some(bytes));
        assert_eq!(
            lit(&Type::INT8, true, &7i64.to_be_bytes()),
            Ok(Token::Number("7".into(), false))
        );
        assert_eq!(lit(&Type::INT4, false, b"-3"), Ok(Token::Number("-3".into(), false)));
        assert_eq!(lit(&Type::TEXT, false, b"it's"), Ok(Token::SingleQuotedString("it's".into())));
        assert_eq!(lit(&Type::JSONB, true, b"\x01 2.5"), Ok(Token::Number("2.5".into(), false)));
        assert_eq!(lit(&Type::JSONB, false, b"\"x\""), Ok(Token::SingleQuotedString("x".into())));
        assert_eq!(lit(&Type::BOOL, true, &[1]), Ok(Token::make_keyword("TRUE")));
        assert_eq!(
            lit(&Type::TIMESTAMPTZ, true, &0i64.to_be_bytes()),
            Ok(Token::SingleQuotedString("2000-01-01T00:00:00.000000Z".into()))
        );
        assert_eq!(literal(&Type::INT8, false, None), Ok(Token::make_keyword("NULL")));
        for (ty, binary, bytes) in [
            (Type::INT8, true, &b"\x01"[..]),
            (Type::INT8, false, b"1; DROP"),
            (Type::FLOAT8, true, b"\x7f\xf0\0\0\0\0\0\0"),
            (Type::JSONB, true, b"\x02{}"),
            (Type::JSONB, false, b"{\"a\":1}"),
            (Type::BOOL, false, b"maybe"),
            (Type::TEXT, false, b"\xff"),
            (Type::BYTEA, false, b"x"),
        ] {
            assert!(literal(&ty, binary, Some(bytes)).is_err(), "{ty} {bytes:?}");
        }
    }
}
