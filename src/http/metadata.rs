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
    let mut entities = Vec::new();
    let mut event_types = Vec::new();
    for entity in state.settings.mapping.entities() {
        let mut types = Vec::new();
        let plain = ["created", "updated", "deleted", "truncated"].map(|a| (a, "info"));
        let extra = entity.events.iter().map(|e| (e.action.as_str(), e.severity.as_str()));
        for (action, severity) in plain.into_iter().chain(extra) {
            let kind = format!("{}.{action}", entity.name);
            types.push(json!(kind));
            event_types.push(json!({"type": kind, "entity": entity.name, "action": action, "severity": severity}));
        }
        entities.push(
            json!({"name": entity.name, "table": entity.table.to_string(), "event_types": types}),
        );
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
