//! `GET /api/entities/{name}/rows`: the current rows of an entity's table, for a live view.
//!
//! `last_id` is the bus head read *before* the table: every event up to it was captured from a
//! transaction the table read already sees, so a client that subscribes with
//! `since: last_id` and applies what follows (upsert by `key` on `created`, `updated` and extra
//! events, remove on `deleted`, clear on `truncated`) converges on the table. Events after it
//! may repeat what the rows already show; applying them again changes nothing.
//!
//! Rows are rendered as an event's `data` is: each column's text output, produced with the
//! session settings capture uses ([`render::OUTPUT_SETTINGS`], set for this read only), through
//! `capture::render` by the column type's category. Redacted columns are left out. Rows are
//! confined like history: to the token's organizations and domains (the entity's scope
//! columns, compared as text as event scopes are), a row with a NULL scope only for a token
//! that grants every organization (or domain), and naming one outside the token is refused.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use super::AppState;
use super::access::{AppError, authorize, query_pairs};
use super::schema::Column;
use crate::capture::render;
use crate::filter::Filter;
use crate::mapping::Entity;
use crate::pg::quote_ident;

/// Rows when `limit` is not given.
const DEFAULT_LIMIT: usize = 500;
/// The most rows one answer holds; a larger `limit` is cut to it (and `truncated` says so).
const MAX_LIMIT: usize = 5000;
/// The longest the read may take, connecting included; the statement gets the same bound
/// on the server, so an abandoned read does not go on there.
const ROWS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the read gave no rows: the role may not read the table (the operator can fix that), or
/// anything else (logged, answered as unavailable).
enum ReadError {
    Denied,
    Failed(String),
}

fn source_unavailable(err: impl std::fmt::Display) -> AppError {
    tracing::warn!(error = %err, "entity rows read failed");
    AppError::Unavailable("the source database is unavailable; try again".into())
}

pub async fn rows(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let pairs = query_pairs(query.as_deref());
    let scope = authorize(&state, &headers, &pairs)?;
    for (key, _) in &pairs {
        if !["organization_id", "domain_id", "limit", "token"].contains(&key.as_str()) {
            return Err(AppError::BadRequest(format!(
                "unknown query parameter {key:?} (expected organization_id, domain_id or limit)"
            )));
        }
    }
    let mapping = &state.settings.mapping;
    let Some(entity) = mapping.entities().iter().find(|e| e.name == name) else {
        let has_app_events = mapping
            .app_events()
            .iter()
            .any(|d| d.event_type.split_once('.').is_some_and(|(entity, _)| entity == name));
        return Err(AppError::NotFound(if has_app_events {
            format!(
                "entity {name:?} has application events only; it is no table's, so it has no rows"
            )
        } else {
            format!("there is no entity {name:?}")
        }));
    };
    let limit = match pairs.iter().rev().find(|(k, _)| k == "limit") {
        None => DEFAULT_LIMIT,
        Some((_, v)) => match v.parse::<u64>() {
            Ok(0) => return Err(AppError::BadRequest("limit must be at least 1".into())),
            Ok(n) => usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
            Err(_) => {
                return Err(AppError::BadRequest(format!("limit={v:?} is not a positive integer")));
            }
        },
    };
    let scoping = pairs.iter().filter(|(k, _)| k != "limit" && k != "token");
    let filter = Filter::from_query(scoping.map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|err| AppError::BadRequest(err.to_string()))?
        .unwrap_or_else(Filter::all);
    let filter = scope.confine(filter).map_err(AppError::Forbidden)?;

    let tables =
        state.schema.tables(&state.source, mapping).await.map_err(AppError::Unavailable)?;
    let table = tables.get(&entity.table).ok_or_else(|| {
        AppError::Unavailable(format!("table {} is not in the source database", entity.table))
    })?;
    let columns: Vec<&Column> =
        table.columns.iter().filter(|c| !entity.redact.contains(&c.name)).collect();
    let oids: Vec<u32> = columns.iter().map(|c| c.type_oid).collect();
    let sql = select(entity, &columns, &table.key, &filter, limit + 1);
    // Before the table is read: see the module doc.
    let last_id = state.bus.stats().head;
    let read = state
        .source
        .within(ROWS_TIMEOUT, async |client| {
            let kinds = state
                .schema
                .kinds(client, &oids)
                .await
                .map_err(|err| ReadError::Failed(err.to_string()))?;
            let messages = client.simple_query(&sql).await.map_err(|err| {
                if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    ReadError::Denied
                } else {
                    ReadError::Failed(err.to_string())
                }
            })?;
            Ok((kinds, messages))
        })
        .await;
    let (kinds, messages) = match read {
        Some(Ok(Ok(read))) => read,
        Some(Ok(Err(ReadError::Denied))) => {
            return Err(AppError::Unavailable(format!(
                "rowcast's database role may not read {}; grant it SELECT",
                entity.table
            )));
        }
        Some(Ok(Err(ReadError::Failed(err)))) => return Err(source_unavailable(err)),
        Some(Err(err)) => return Err(source_unavailable(err)),
        None => return Err(source_unavailable("no answer in time")),
    };
    let mut rows = Vec::new();
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else { continue };
        let values = columns.iter().zip(&kinds).enumerate().map(|(i, (column, kind))| {
            let value = match row.try_get(i).ok().flatten() {
                None => Value::Null,
                // As capture does: text it cannot render is sent as it is.
                Some(text) => render::render(text.as_bytes(), kind)
                    .unwrap_or_else(|_| Value::String(text.to_owned())),
            };
            (column.name.clone(), value)
        });
        rows.push(Value::Object(render::row_object(values)));
    }
    let truncated = rows.len() > limit;
    rows.truncate(limit);
    Ok(axum::Json(json!({
        "entity": entity.name,
        "table": entity.table.to_string(),
        "key": table.key,
        "last_id": last_id,
        "rows": rows,
        "truncated": truncated,
    }))
    .into_response())
}

/// One simple-protocol query string: its statements run as one implicit transaction, so the
/// `SET LOCAL`s hold for the `SELECT` only and the pooled connection is left as it was. The
/// transaction is read-only and bounded by `statement_timeout`.
fn select(
    entity: &Entity,
    columns: &[&Column],
    key: &[String],
    filter: &Filter,
    limit: usize,
) -> String {
    let mut sql = String::from("SET TRANSACTION READ ONLY; ");
    sql.push_str(&format!("SET LOCAL statement_timeout = {}; ", ROWS_TIMEOUT.as_millis()));
    for (name, value) in render::OUTPUT_SETTINGS {
        sql.push_str(&format!("SET LOCAL {name} = {}; ", literal(value)));
    }
    let list: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    sql.push_str(&format!(
        "SELECT {} FROM {}.{}",
        list.join(", "),
        quote_ident(&entity.table.schema),
        quote_ident(&entity.table.name)
    ));
    let mut conditions = Vec::new();
    for (column, allowed) in
        [(&entity.organization, filter.organizations()), (&entity.domain, filter.domains())]
    {
        let Some(allowed) = allowed else { continue };
        match column {
            // Events of this entity have a null scope here, which a list never admits.
            Some(column) if !allowed.is_empty() => {
                let allowed: Vec<String> = allowed.iter().map(|v| literal(v)).collect();
                conditions.push(format!(
                    "{}::text IN ({})",
                    quote_ident(column),
                    allowed.join(", ")
                ));
            }
            _ => conditions.push("false".to_owned()),
        }
    }
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    if !key.is_empty() {
        let key: Vec<String> = key.iter().map(|c| quote_ident(c)).collect();
        sql.push_str(&format!(" ORDER BY {}", key.join(", ")));
    }
    sql.push_str(&format!(" LIMIT {limit}"));
    sql
}

/// An `E'...'` literal: read the same whatever `standard_conforming_strings` is, which matters
/// because the whole query string is parsed before any of its `SET`s runs.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::literal;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(literal(r"a\'b"), r"E'a\\''b'");
    }
}
