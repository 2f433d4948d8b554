//! Events as rows of `events`: the column types a driver is told, each value in the text or
//! binary form it asked for, and a `SUBSCRIBE` line. Pure.
//!
//! `id` is `int8`, `timestamp` `timestamptz`, `data`, `old`, `changed` and `source` `jsonb`,
//! the rest `text`, all taken from the stored envelope, so a row says what the WebSocket
//! frame and the history API say. A `SUBSCRIBE` row is the whole envelope in COPY's text
//! format: one line per event, where a backslash is doubled (JSON escapes are the only
//! backslashes an envelope has, and it has no raw tabs or newlines).

use std::error::Error;

use bytes::{BufMut, BytesMut};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo};
use pgwire::error::PgWireResult;
use pgwire::messages::data::DataRow;
use pgwire::types::ToSqlText;
use pgwire::types::format::FormatOptions;
use serde_json::Value;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::sql::Column;
use crate::model::{PG_EPOCH_OFFSET_MICROS, Timestamp};

pub fn column_type(column: Column) -> Type {
    match column {
        Column::Id => Type::INT8,
        Column::Timestamp => Type::TIMESTAMPTZ,
        Column::Data | Column::Old | Column::Changed | Column::Source => Type::JSONB,
        Column::Type | Column::OrganizationId | Column::DomainId | Column::Severity => Type::TEXT,
    }
}

/// The row description of `columns`, each in the format `format(i)` says.
pub fn fields(columns: &[Column], format: impl Fn(usize) -> FieldFormat) -> Vec<FieldInfo> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| FieldInfo::new(c.name().to_owned(), None, None, column_type(*c), format(i)))
        .collect()
}

/// One row: the `columns` of `envelope` (a parsed stored envelope).
pub fn encode(
    encoder: &mut DataRowEncoder,
    columns: &[Column],
    envelope: &Value,
) -> PgWireResult<DataRow> {
    for column in columns {
        let value = envelope.get(column.name()).filter(|v| !v.is_null());
        match column_type(*column) {
            Type::INT8 => {
                let id = value.and_then(Value::as_u64).and_then(|id| i64::try_from(id).ok());
                encoder.encode_field(&id)?;
            }
            Type::TIMESTAMPTZ => {
                let at = value.and_then(Value::as_str).and_then(Timestamp::parse_rfc3339);
                encoder.encode_field(&at.map(|at| Stamp(at.0)))?;
            }
            Type::JSONB => encoder.encode_field(&value.map(Json))?,
            _ => encoder.encode_field(&value.and_then(Value::as_str))?,
        }
    }
    Ok(encoder.take_row())
}

/// A `SUBSCRIBE` row: the envelope in COPY text format, ending with a newline.
pub fn copy_line(envelope: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(envelope.len() + 8);
    for byte in envelope.trim_end().bytes() {
        match byte {
            b'\\' => line.extend_from_slice(b"\\\\"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            b'\t' => line.extend_from_slice(b"\\t"),
            other => line.push(other),
        }
    }
    line.push(b'\n');
    line
}

/// A `jsonb` value from the envelope.
#[derive(Debug)]
struct Json<'a>(&'a Value);

impl ToSql for Json<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // The binary jsonb format: a version byte, then the text.
            out.put_u8(1);
        }
        serde_json::to_writer(out.writer(), self.0)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }

    to_sql_checked!();
}

impl ToSqlText for Json<'_> {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format: &FormatOptions,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        serde_json::to_writer(out.writer(), self.0)?;
        Ok(IsNull::No)
    }
}

/// A `timestamptz` in µs since the Unix epoch.
#[derive(Debug)]
struct Stamp(i64);

impl ToSql for Stamp {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(self.0.saturating_sub(PG_EPOCH_OFFSET_MICROS));
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMPTZ | Type::TIMESTAMP)
    }

    to_sql_checked!();
}

impl ToSqlText for Stamp {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format: &FormatOptions,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        // Postgres' ISO output in UTC: `2026-11-22 10:15:30.123456+00`.
        let text = Timestamp(self.0).to_string().replacen('T', " ", 1);
        out.put_slice(text.strip_suffix('Z').unwrap_or(&text).as_bytes());
        out.put_slice(b"+00");
        Ok(IsNull::No)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_subscribe_line_is_copy_text() {
        assert_eq!(copy_line(r#"{"a":"x\"y\\z"}"#), b"{\"a\":\"x\\\\\"y\\\\\\\\z\"}\n".to_vec());
        assert_eq!(copy_line("{}\n"), b"{}\n".to_vec());
    }

    #[test]
    fn rows_carry_the_envelope_in_text_and_binary() {
        let envelope: Value = serde_json::from_str(
            r#"{"id":7,"type":"agent.created","timestamp":"2026-01-01T00:00:01.500000Z","organization_id":"quant","domain_id":null,"severity":"info","data":{"a":1},"source":{"kind":"row"}}"#,
        )
        .expect("json");
        let text = Arc::new(fields(&Column::ALL, |_| FieldFormat::Text));
        let mut encoder = DataRowEncoder::new(text);
        let row = encode(&mut encoder, &Column::ALL, &envelope).expect("row");
        let mut bytes = BytesMut::new();
        let expected: &[&[u8]] = &[
            b"7",
            b"agent.created",
            b"2026-01-01 00:00:01.500000+00",
            b"quant",
            b"\xff",
            b"info",
            br#"{"a":1}"#,
            b"\xff",
            b"\xff",
            br#"{"kind":"row"}"#,
        ];
        for value in expected {
            if *value == b"\xff" {
                bytes.put_i32(-1);
            } else {
                bytes.put_i32(value.len() as i32);
                bytes.put_slice(value);
            }
        }
        assert_eq!(row.data, bytes);
        let binary = Arc::new(fields(&[Column::Id, Column::Timestamp, Column::Data], |_| {
            FieldFormat::Binary
        }));
        let mut encoder = DataRowEncoder::new(binary);
        let row = encode(&mut encoder, &[Column::Id, Column::Timestamp, Column::Data], &envelope)
            .expect("row");
        let mut bytes = BytesMut::new();
        bytes.put_i32(8);
        bytes.put_i64(7);
        bytes.put_i32(8);
        bytes.put_i64(1_767_225_601_500_000 - PG_EPOCH_OFFSET_MICROS);
        bytes.put_i32(8);
        bytes.put_slice(b"\x01{\"a\":1}");
        assert_eq!(row.data, bytes);
    }
}
