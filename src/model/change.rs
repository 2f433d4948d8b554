//! A committed row change, as both capture sources produce it, before the mapping turns it
//! into events.

use std::fmt;

use super::Timestamp;
use super::event::{Op, Row};

/// One committed row change, rendered (`to_jsonb` form, nothing redacted yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: TableName,
    pub op: Op,
    pub new: Option<Row>,
    pub old: Option<Row>,
    /// Commit time (replication) or statement time (triggers).
    pub timestamp: Timestamp,
    /// Commit LSN, replication only.
    pub lsn: Option<u64>,
    pub xid: u64,
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self { schema: schema.into(), name: name.into() }
    }

    /// `agents` or `app.agents`; the schema defaults to `public`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (schema, name) = text.split_once('.').unwrap_or(("public", text));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(format!("table name {text:?} is not schema.table or table"));
        }
        Ok(Self::new(schema, name))
    }

    /// Quoted for SQL.
    pub fn sql(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema.replace('"', "\"\""), self.name.replace('"', "\"\""))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}
