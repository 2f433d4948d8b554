//! What a UI needs to build filters: entities, event types with severities, filterable fields,
//! and the organizations and domains the caller may use (SPEC §4, §7).
//!
//! A table's entity carries its `key` and its `fields` (columns in order: name, type, whether
//! filters may name it, known values, comment) from the source catalog (`schema`). When the
//! catalog cannot be read, the answer still comes, in time: those entities have `"fields": null`
//! and `"key": null` (unknown, unlike the `[]` of an entity that is no table's) and
//! `fields_error` says why.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::access::Authorized;
use super::schema::Table;
use crate::auth::Scope;
use crate::mapping::{Entity, Trigger};
use crate::model::Severity;

/// Entities, event types with severities, filterable fields and the organizations and
/// domains `scope` may use.
pub async fn build(state: &AppState, scope: &Scope) -> Value {
    let mapping = &state.settings.mapping;
    let tables = state.schema.tables(&state.source, mapping).await;
    let mut entities: Vec<serde_json::Map<String, Value>> = Vec::new();
    let mut event_types = Vec::new();
    for entity in mapping.entities() {
        let mut types = Vec::new();
        for (kind, severity) in entity.row_event_types() {
            let action = kind.split_once('.').map_or("", |(_, action)| action).to_owned();
            let description = describe(entity, &action);
            event_types.push(json!({"type": kind, "entity": entity.name, "action": action,
                "severity": severity.as_str(), "kind": "row", "description": description}));
            types.push(json!(kind));
        }
        let table = tables.as_ref().ok().and_then(|tables| tables.get(&entity.table));
        let description =
            entity.description.clone().or_else(|| table.and_then(|t| t.description.clone()));
        let (key, fields) = match table {
            Some(table) => (json!(table.key), fields(entity, table)),
            None => (Value::Null, Value::Null),
        };
        let Value::Object(object) = json!({"name": entity.name, "table": entity.table.to_string(),
            "description": description, "key": key, "fields": fields, "event_types": types})
        else {
            continue;
        };
        entities.push(object);
    }
    // Application events sit beside the row events of their entity; an entity that is no
    // table's gets an entry of its own (with no table).
    for declared in mapping.app_events() {
        let (entity, action) = declared.event_type.split_once('.').unwrap_or_default();
        event_types.push(json!({"type": declared.event_type, "entity": entity, "action": action,
            "severity": declared.severity.as_str(), "kind": "app",
            "description": declared.description}));
        let at =
            entities.iter().position(|e| e.get("name").and_then(Value::as_str) == Some(entity));
        let at = match at {
            Some(at) => at,
            None => {
                let Value::Object(object) = json!({"name": entity, "table": null,
                    "description": null, "key": [], "fields": [], "event_types": []})
                else {
                    continue;
                };
                entities.push(object);
                entities.len() - 1
            }
        };
        if let Some(Value::Array(types)) =
            entities.get_mut(at).and_then(|e| e.get_mut("event_types"))
        {
            types.push(json!(declared.event_type));
        }
    }
    let mut scopes = state.scopes.snapshot();
    scopes.retain(|org, _| scope.allows_organization(org));
    let organizations: Vec<&String> = scopes.keys().collect();
    let domains: Vec<Value> = scopes
        .iter()
        .flat_map(|(org, domains)| {
            domains
                .iter()
                .filter(|d| scope.allows_domain(d))
                .map(move |d| json!({"id": d, "organization_id": org}))
        })
        .collect();
    json!({
        "entities": entities,
        "event_types": event_types,
        "fields": ["type", "organization_id", "domain_id", "severity"],
        "severities": Severity::ALL.map(Severity::as_str),
        "organizations": organizations,
        "domains": domains,
        "fields_error": tables.err(),
    })
}

pub async fn route(State(state): State<Arc<AppState>>, Authorized(scope): Authorized) -> Response {
    axum::Json(build(&state, &scope).await).into_response()
}

/// A table's columns as filterable fields; redacted ones are listed but may not be filtered on,
/// and their values are not told.
fn fields(entity: &Entity, table: &Table) -> Value {
    let fields: Vec<Value> = table
        .columns
        .iter()
        .map(|column| {
            let redacted = entity.redact.contains(&column.name);
            let values = if redacted { None } else { column.values.as_ref() };
            json!({"name": column.name, "type": column.type_name, "filterable": !redacted,
                "values": values, "description": column.description})
        })
        .collect();
    Value::Array(fields)
}

/// A row event type in a few words: "a row of public.agents was inserted".
fn describe(entity: &Entity, action: &str) -> String {
    let table = &entity.table;
    match action {
        "created" => format!("a row of {table} was inserted"),
        "updated" => format!("a row of {table} was updated"),
        "deleted" => format!("a row of {table} was deleted"),
        "truncated" => format!("{table} was truncated"),
        extra => match entity.events.iter().find(|e| e.action == extra).map(|e| &e.trigger) {
            Some(Trigger::Changed(column)) => format!("{column} of a row of {table} changed"),
            Some(Trigger::Becomes { column, value }) => {
                format!("{column} became {value} in a row of {table}")
            }
            None => format!("{action} of a row of {table}"),
        },
    }
}
