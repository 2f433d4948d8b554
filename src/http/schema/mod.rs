//! What the source database's catalog says about the mapped tables: columns in order with their
//! types, comments and known values, each table's key and comment. The metadata and the rows
//! endpoint read it from here.
//!
//! Facts are read for all mapped tables at once (two catalog queries, pipelined on one reader)
//! and kept for [`FRESH_FOR`]; a failed read is remembered for [`RETRY_AFTER_FAILURE`], so an
//! unreachable source costs one bounded wait ([`CATALOG_TIMEOUT`]) every few seconds, not one
//! per request. Concurrent readers wait for one refresh instead of starting their own.
//!
//! Known values: an enum's labels in enum order (a domain over an enum too; arrays of enums
//! have none), or the list of a `CHECK (col IN (...))` on that column alone (`check.rs`), which
//! wins when both exist since it is the narrower. Values are JSON as the column's values appear
//! in an event's `data`: strings, except numbers for numeric columns and booleans for boolean
//! ones.

mod check;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::capture::catalog::{CatalogError, Kinds, builtin};
use crate::capture::render::{self, Category};
use crate::mapping::Mapping;
use crate::model::TableName;
use crate::pg::Pool;

/// How long facts read from the catalog are served before they are read again.
pub const FRESH_FOR: Duration = Duration::from_secs(30);
/// How long a failed read is answered from memory before the catalog is asked again.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The longest one catalog read may take, connecting included.
pub const CATALOG_TIMEOUT: Duration = Duration::from_millis(1500);

pub struct Column {
    pub name: String,
    /// The type as `format_type` prints it (`timestamp with time zone`, `text[]`).
    pub type_name: String,
    pub type_oid: u32,
    /// `COMMENT ON COLUMN`.
    pub description: Option<String>,
    pub values: Option<Vec<Value>>,
}

pub struct Table {
    /// `COMMENT ON TABLE`.
    pub description: Option<String>,
    /// Primary key columns in key order, else the replica identity index's; empty if neither.
    pub key: Vec<String>,
    /// In column order, dropped columns left out.
    pub columns: Vec<Column>,
}

/// The mapped tables that exist.
pub type Tables = HashMap<TableName, Table>;

enum Cached {
    Empty,
    Read { at: Instant, tables: Arc<Tables> },
    Failed { at: Instant, error: String },
}

/// The cached facts, and the render categories of the types readers met since they were read.
pub struct Schema {
    cached: Mutex<Cached>,
    kinds: Mutex<Kinds>,
}

impl Default for Schema {
    fn default() -> Self {
        Self { cached: Mutex::new(Cached::Empty), kinds: Mutex::new(Kinds::default()) }
    }
}

impl Schema {
    /// The facts of `mapping`'s tables, from memory while fresh. The error is a sentence for
    /// clients; the details are logged.
    pub async fn tables(&self, source: &Pool, mapping: &Mapping) -> Result<Arc<Tables>, String> {
        let mut cached = self.cached.lock().await;
        match &*cached {
            Cached::Read { at, tables } if at.elapsed() < FRESH_FOR => return Ok(tables.clone()),
            Cached::Failed { at, error } if at.elapsed() < RETRY_AFTER_FAILURE => {
                return Err(error.clone());
            }
            _ => {}
        }
        let read = source.within(CATALOG_TIMEOUT, async |client| read(client, mapping).await).await;
        let failure = |err: &dyn std::fmt::Display| {
            tracing::warn!(error = %err, "source catalog read failed");
            "the source database's catalog could not be read; try again".to_owned()
        };
        let outcome = match read {
            Some(Ok(Ok(tables))) => Ok(Arc::new(tables)),
            Some(Ok(Err(err))) => Err(failure(&err)),
            Some(Err(err)) => Err(failure(&err)),
            None => Err(failure(&"no answer in time")),
        };
        if outcome.is_ok() {
            // A type altered since (a composite's attributes) is resolved again.
            *self.kinds.lock().await = Kinds::default();
        }
        let at = Instant::now();
        *cached = match &outcome {
            Ok(tables) => Cached::Read { at, tables: tables.clone() },
            Err(error) => Cached::Failed { at, error: error.clone() },
        };
        outcome
    }

    /// The render category of each type, asking `client` about the ones not met before.
    pub async fn kinds(
        &self,
        client: &Client,
        oids: &[u32],
    ) -> Result<Vec<Category>, CatalogError> {
        let mut kinds = self.kinds.lock().await;
        let mut out = Vec::with_capacity(oids.len());
        for &oid in oids {
            out.push(kinds.kind(client, oid).await?);
        }
        Ok(out)
    }
}

const TABLES: &str = "
SELECT w.schema, w.name, obj_description(c.oid, 'pg_class'),
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.n)
                   FROM (SELECT x.indkey FROM pg_index x
                          WHERE x.indrelid = c.oid AND (x.indisprimary OR x.indisreplident)
                          ORDER BY x.indisprimary DESC LIMIT 1) AS i
                  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum),
                '{}')
  FROM unnest($1::text[], $2::text[]) AS w(schema, name)
  JOIN pg_namespace n ON n.nspname = w.schema
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.name AND c.relkind IN ('r', 'p')";

// `base` is the type under any domains, where an enum's labels are.
const COLUMNS: &str = "
SELECT w.schema, w.name, a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
       col_description(c.oid, a.attnum), base.oid,
       (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
          FROM pg_enum e WHERE e.enumtypid = base.oid),
       (SELECT array_agg(pg_get_constraintdef(k.oid) ORDER BY k.conname)
          FROM pg_constraint k
         WHERE k.conrelid = c.oid AND k.contype = 'c' AND k.conkey = ARRAY[a.attnum])
  FROM unnest($1::text[], $2::text[]) AS w(schema, name)
  JOIN pg_namespace n ON n.nspname = w.schema
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.name AND c.relkind IN ('r', 'p')
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 CROSS JOIN LATERAL (
       WITH RECURSIVE chain (oid, typtype, typbasetype, depth) AS (
            SELECT t.oid, t.typtype, t.typbasetype, 0 FROM pg_type t WHERE t.oid = a.atttypid
             UNION ALL
            SELECT t.oid, t.typtype, t.typbasetype, chain.depth + 1
              FROM chain JOIN pg_type t ON t.oid = chain.typbasetype
             WHERE chain.typtype = 'd' AND chain.depth < 16)
       SELECT oid FROM chain ORDER BY depth DESC LIMIT 1) AS base
 ORDER BY w.schema, w.name, a.attnum";

/// One read of the facts of every mapped table.
async fn read(client: &Client, mapping: &Mapping) -> Result<Tables, tokio_postgres::Error> {
    let names: Vec<&TableName> = mapping.entities().iter().map(|e| &e.table).collect();
    let schemas: Vec<&str> = names.iter().map(|t| t.schema.as_str()).collect();
    let tables: Vec<&str> = names.iter().map(|t| t.name.as_str()).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&schemas, &tables];
    let (table_rows, column_rows) =
        tokio::try_join!(client.query(TABLES, &params), client.query(COLUMNS, &params))?;
    let mut out: Tables = HashMap::new();
    for row in table_rows {
        out.insert(
            TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            Table { description: row.get(2), key: row.get(3), columns: Vec::new() },
        );
    }
    for row in column_rows {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let Some(table) = out.get_mut(&name) else { continue };
        let column: String = row.get(2);
        let base: u32 = row.get(6);
        let labels: Option<Vec<String>> = row.get(7);
        let checks: Option<Vec<String>> = row.get(8);
        let listed = checks
            .iter()
            .flatten()
            .find_map(|definition| check::in_list(definition, &column))
            .and_then(|texts| as_values(&texts, base));
        let values = listed.or_else(|| labels.map(|l| l.into_iter().map(Value::String).collect()));
        table.columns.push(Column {
            name: column,
            type_oid: row.get(3),
            type_name: row.get(4),
            description: row.get(5),
            values,
        });
    }
    Ok(out)
}

/// The listed texts as JSON values of a column whose base type is `base`; `None` if one of
/// them is not a value of that type.
fn as_values(texts: &[String], base: u32) -> Option<Vec<Value>> {
    let kind = match builtin(base) {
        Some(kind @ (Category::Number | Category::Bool)) => kind,
        _ => return Some(texts.iter().cloned().map(Value::String).collect()),
    };
    texts.iter().map(|text| render::render(text.as_bytes(), &kind).ok()).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::as_values;

    #[test]
    fn listed_values_take_the_column_type() {
        let texts = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(as_values(&texts(&["a", "1"]), 25), Some(vec![json!("a"), json!("1")]));
        let numbers = as_values(&texts(&["1", "-2.50", "1e+3"]), 1700).expect("numbers");
        assert_eq!(serde_json::to_string(&numbers).expect("json"), "[1,-2.50,1000]");
        assert_eq!(as_values(&texts(&["t", "f"]), 16), Some(vec![json!(true), json!(false)]));
        assert_eq!(as_values(&texts(&["1", "x"]), 23), None);
    }
}
