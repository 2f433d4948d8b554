//! The mapping file (TOML, SPEC §4): parsed strictly (unknown keys are errors) and validated
//! into entities, each error naming the entity and the field.

use serde::Deserialize;

use super::app::{AppEventType, is_app_type};
use super::{Entity, ExtraEvent, MappingError, Trigger};
use crate::model::{Severity, TableName};

/// The entities and application event types a mapping file declares, in order.
pub(super) fn parse(text: &str) -> Result<(Vec<Entity>, Vec<AppEventType>), MappingError> {
    let spec: FileSpec = toml::from_str(text)?;
    let entities = spec.entity.into_iter().map(entity_from_spec).collect::<Result<_, _>>()?;
    let events = spec.event.into_iter().map(app_event_from_spec).collect::<Result<_, _>>()?;
    Ok((entities, events))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    entity: Vec<EntitySpec>,
    #[serde(default)]
    event: Vec<AppEventSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEventSpec {
    #[serde(rename = "type")]
    event_type: String,
    severity: Option<String>,
    description: Option<String>,
}

fn app_event_from_spec(spec: AppEventSpec) -> Result<AppEventType, MappingError> {
    let invalid =
        |what: String| MappingError::Invalid(format!("event {:?}: {what}", spec.event_type));
    if !is_app_type(&spec.event_type) {
        return Err(invalid(
            "the type must be <entity>.<action>, each part [a-z][a-z0-9_]*".into(),
        ));
    }
    let severity = match &spec.severity {
        Some(text) => text.parse().map_err(invalid)?,
        None => Severity::Info,
    };
    Ok(AppEventType { event_type: spec.event_type, severity, description: spec.description })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntitySpec {
    name: String,
    table: String,
    organization: Option<String>,
    domain: Option<String>,
    #[serde(default)]
    redact: Vec<String>,
    description: Option<String>,
    #[serde(default)]
    event: Vec<EventSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec {
    action: String,
    changed: Option<String>,
    becomes: Option<BecomesSpec>,
    severity: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BecomesSpec {
    column: String,
    value: toml::Value,
}

fn entity_from_spec(spec: EntitySpec) -> Result<Entity, MappingError> {
    let invalid = |what: String| MappingError::Invalid(format!("entity {:?}: {what}", spec.name));
    if !is_word(&spec.name) {
        return Err(invalid("the name must be non-empty and contain no '.', '*' or spaces".into()));
    }
    let table = TableName::parse(&spec.table).map_err(MappingError::Invalid)?;
    let mut events = Vec::new();
    for event in spec.event {
        if !is_word(&event.action) {
            return Err(invalid(format!(
                "action {:?} must be non-empty with no '.', '*' or spaces",
                event.action
            )));
        }
        let trigger = match (event.changed, event.becomes) {
            (Some(column), None) => Trigger::Changed(column),
            (None, Some(becomes)) => {
                Trigger::Becomes { column: becomes.column, value: toml_text(&becomes.value)? }
            }
            _ => {
                return Err(invalid(format!(
                    "event {:?} needs exactly one of `changed` or `becomes`",
                    event.action
                )));
            }
        };
        let severity = match event.severity {
            Some(text) => text.parse().map_err(|err: String| invalid(err))?,
            None => Severity::Info,
        };
        events.push(ExtraEvent { action: event.action, trigger, severity });
    }
    Ok(Entity {
        name: spec.name,
        table,
        organization: spec.organization,
        domain: spec.domain,
        redact: spec.redact,
        description: spec.description,
        events,
    })
}

fn is_word(text: &str) -> bool {
    !text.is_empty() && !text.contains(['.', '*', ' ', '\t', '\n'])
}

fn toml_text(value: &toml::Value) -> Result<String, MappingError> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(MappingError::Invalid(format!(
            "`becomes` value {other} must be a string, number or boolean"
        ))),
    }
}
