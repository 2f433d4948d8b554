//! What a UI needs to build filters: entities, event types with severities, filterable fields,
//! and the organizations and domains the caller may use (SPEC §4, §7).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::access::Authorized;
use crate::auth::Scope;
use crate::model::Severity;

/// Entities, event types with severities, filterable fields and the organizations and
/// domains `scope` may use.
pub fn build(state: &AppState, scope: &Scope) -> Value {
    let mapping = &state.settings.mapping;
    let mut entities: Vec<serde_json::Map<String, Value>> = Vec::new();
    let mut event_types = Vec::new();
    for entity in mapping.entities() {
        let mut types = Vec::new();
        for (kind, severity) in entity.row_event_types() {
            let action = kind.split_once('.').map_or("", |(_, action)| action).to_owned();
            event_types.push(json!({"type": kind, "entity": entity.name, "action": action,
                "severity": severity.as_str(), "kind": "row"}));
            types.push(json!(kind));
        }
        let Value::Object(object) = json!({"name": entity.name, "table": entity.table.to_string(),
            "description": entity.description, "event_types": types})
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
                    "description": null, "event_types": []})
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
    })
}

pub async fn route(State(state): State<Arc<AppState>>, Authorized(scope): Authorized) -> Response {
    axum::Json(build(&state, &scope)).into_response()
}
