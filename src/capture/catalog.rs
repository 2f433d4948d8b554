//! Column types from the catalog: a type OID becomes the [`Category`] its text output is rendered
//! with. Domains resolve to their base type and arrays and composites to their parts, exactly
//! as `to_jsonb` categorizes them. Each OID is looked up once per connection.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::render::Category;
use crate::model::TableName;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("type {0} does not exist")]
    UnknownType(u32),
    #[error("type {0} nests deeper than {MAX_DEPTH} levels")]
    TooDeep(u32),
}

impl CatalogError {
    /// A lost connection passes; a type that does not exist or nests too deep does not.
    pub fn is_retryable(&self) -> bool {
        match self {
            CatalogError::Query(err) => crate::pg::is_transient(err),
            CatalogError::UnknownType(_) | CatalogError::TooDeep(_) => false,
        }
    }
}

const MAX_DEPTH: usize = 16;

const BOOL: u32 = 16;
const NUMBERS: [u32; 6] = [20, 21, 23, 700, 701, 1700];
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const INT2VECTOR: u32 = 22;
const OIDVECTOR: u32 = 30;

/// The kinds `to_jsonb` treats specially, by OID; everything else is resolved from the catalog.
pub fn builtin(oid: u32) -> Option<Category> {
    Some(match oid {
        BOOL => Category::Bool,
        oid if NUMBERS.contains(&oid) => Category::Number,
        JSON => Category::Json,
        JSONB => Category::Jsonb,
        DATE => Category::Date,
        TIMESTAMP => Category::Timestamp,
        TIMESTAMPTZ => Category::TimestampTz,
        // Vectors print as "1 2" but to_jsonb sees arrays (render accepts that form).
        INT2VECTOR => Category::Array { elem: Box::new(Category::Number), delim: b',' },
        OIDVECTOR => Category::Array { elem: Box::new(Category::Text), delim: b',' },
        _ => return None,
    })
}

pub struct Catalog {
    client: Client,
    kinds: Kinds,
}

impl Catalog {
    pub fn new(client: Client) -> Self {
        Self { client, kinds: Kinds::default() }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn kind(&mut self, oid: u32) -> Result<Category, CatalogError> {
        self.kinds.kind(&self.client, oid).await
    }

    /// The column names of each of `tables` that exists.
    pub async fn columns(
        &self,
        tables: &[TableName],
    ) -> Result<HashMap<TableName, Vec<String>>, CatalogError> {
        let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
        let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text, a.attname::text \
                   FROM unnest($1::text[], $2::text[]) AS w(schema, name) \
                   JOIN pg_namespace n ON n.nspname = w.schema \
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.name AND c.relkind IN ('r', 'p') \
                   LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                  ORDER BY a.attnum",
                &[&schemas, &names],
            )
            .await?;
        let mut columns: HashMap<TableName, Vec<String>> = HashMap::new();
        for row in rows {
            let entry = columns
                .entry(TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)))
                .or_default();
            if let Some(column) = row.get::<_, Option<String>>(2) {
                entry.push(column);
            }
        }
        Ok(columns)
    }
}

/// Categories already resolved, by type OID: kept per catalog connection, or shared by readers
/// that bring their own connection.
#[derive(Debug, Default)]
pub struct Kinds(HashMap<u32, Category>);

impl Kinds {
    /// The category of type `oid`, asking `client` about what is neither built in nor known.
    pub async fn kind(&mut self, client: &Client, oid: u32) -> Result<Category, CatalogError> {
        self.resolve(client, oid, 0).await
    }

    async fn resolve(
        &mut self,
        client: &Client,
        oid: u32,
        depth: usize,
    ) -> Result<Category, CatalogError> {
        if let Some(kind) = builtin(oid).or_else(|| self.0.get(&oid).cloned()) {
            return Ok(kind);
        }
        if depth > MAX_DEPTH {
            return Err(CatalogError::TooDeep(oid));
        }
        let row = client
            .query_opt(
                "SELECT t.typtype::text, t.typcategory::text, t.typelem, t.typbasetype, t.typrelid, \
                        coalesce(e.typdelim::text, ',') \
                   FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid = $1",
                &[&oid],
            )
            .await?
            .ok_or(CatalogError::UnknownType(oid))?;
        let typtype: String = row.get(0);
        let category: String = row.get(1);
        let elem: u32 = row.get(2);
        let base: u32 = row.get(3);
        let relid: u32 = row.get(4);
        let delim: String = row.get(5);
        let kind = match typtype.as_str() {
            "d" => Box::pin(self.resolve(client, base, depth + 1)).await?,
            "c" => {
                let attributes = client
                    .query(
                        "SELECT attname::text, atttypid FROM pg_attribute \
                          WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[&relid],
                    )
                    .await?;
                let mut fields = Vec::with_capacity(attributes.len());
                for attribute in attributes {
                    let field_oid: u32 = attribute.get(1);
                    fields.push((
                        attribute.get(0),
                        Box::pin(self.resolve(client, field_oid, depth + 1)).await?,
                    ));
                }
                Category::Composite { fields }
            }
            _ if category == "A" && elem != 0 => Category::Array {
                elem: Box::new(Box::pin(self.resolve(client, elem, depth + 1)).await?),
                delim: delim.bytes().next().unwrap_or(b','),
            },
            _ => Category::Text,
        };
        self.0.insert(oid, kind.clone());
        Ok(kind)
    }
}
