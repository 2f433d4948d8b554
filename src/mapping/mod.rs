//! Tables → entities → event types (SPEC §4).
//!
//! A [`Mapping`] is read from TOML (the built-in default is `config/mapping.toml`, compiled in)
//! and checked twice: once on its own when parsed, and once against the database's catalog at
//! startup ([`Mapping::check_columns`]), so a mapping naming a missing table or column fails
//! before anything is captured. Turning a change into events ([`Entity::events`]) is pure.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use crate::model::{Severity, TableName};

mod app;
mod file;
mod rules;

pub use app::{AppEvent, AppEventType, EMIT_PREFIX, Invalid, MAX_KEY_CHARS, is_app_type};

pub const DEFAULT_MAPPING: &str = include_str!("../../config/mapping.toml");

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("reading mapping file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("mapping file is not valid: {0}")]
    Syntax(#[from] toml::de::Error),
    #[error("mapping: {0}")]
    Invalid(String),
    #[error("mapping names table {table}, which does not exist")]
    MissingTable { table: TableName },
    #[error("mapping names column {column:?} of table {table}, which has no such column")]
    MissingColumn { table: TableName, column: String },
}

/// What makes an extra event fire.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// An update where the column's value differs.
    Changed(String),
    /// An insert with the value, or an update from a different value.
    Becomes { column: String, value: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExtraEvent {
    pub action: String,
    pub trigger: Trigger,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub name: String,
    pub table: TableName,
    pub organization: Option<String>,
    pub domain: Option<String>,
    pub redact: Vec<String>,
    /// Shown in the metadata and the page's filter builder.
    pub description: Option<String>,
    pub events: Vec<ExtraEvent>,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    // Shared so a capture source can keep the entity of each relation it has seen.
    entities: Vec<Arc<Entity>>,
    by_table: HashMap<TableName, usize>,
    /// Declared application event types, in declaration order.
    app_events: Vec<AppEventType>,
}

impl Entity {
    /// The event types a change of this entity can produce, with their severities.
    pub fn row_event_types(&self) -> impl Iterator<Item = (String, Severity)> + '_ {
        let plain = ["created", "updated", "deleted", "truncated"].map(|a| (a, Severity::Info));
        let extra = self.events.iter().map(|e| (e.action.as_str(), e.severity));
        plain
            .into_iter()
            .chain(extra)
            .map(|(action, severity)| (format!("{}.{action}", self.name), severity))
    }

    /// Every column the entity names: scopes, redactions, triggers.
    fn columns_used(&self) -> impl Iterator<Item = &str> {
        let extra = self.events.iter().map(|event| match &event.trigger {
            Trigger::Changed(column) | Trigger::Becomes { column, .. } => column.as_str(),
        });
        self.organization
            .iter()
            .chain(&self.domain)
            .chain(&self.redact)
            .map(String::as_str)
            .chain(extra)
    }
}

impl Mapping {
    pub fn builtin() -> Self {
        // The built-in file is tested below; failing here is a build mistake, not bad input.
        Self::from_toml(DEFAULT_MAPPING).unwrap_or_else(|err| panic!("built-in mapping: {err}"))
    }

    pub fn load(path: &Path) -> Result<Self, MappingError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| MappingError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Self, MappingError> {
        let (entities, app_events) = file::parse(text)?;
        Self::new(entities)?.with_app_events(app_events)
    }

    /// Declares application event types: each once, and none that a row change also produces
    /// (two meanings for one type would make filters lie).
    pub fn with_app_events(mut self, app_events: Vec<AppEventType>) -> Result<Self, MappingError> {
        let row_types: BTreeSet<String> =
            self.entities.iter().flat_map(|e| e.row_event_types().map(|(t, _)| t)).collect();
        let mut seen = BTreeSet::new();
        for declared in &app_events {
            let kind = declared.event_type.as_str();
            if row_types.contains(kind) {
                return Err(MappingError::Invalid(format!(
                    "event {kind:?} is also a row event type of an entity"
                )));
            }
            if !seen.insert(kind) {
                return Err(MappingError::Invalid(format!("event {kind:?} is declared twice")));
            }
        }
        self.app_events = app_events;
        Ok(self)
    }

    pub fn new(entities: Vec<Entity>) -> Result<Self, MappingError> {
        if entities.is_empty() {
            return Err(MappingError::Invalid("no [[entity]] is declared".into()));
        }
        let mut by_table = HashMap::new();
        let mut names = BTreeSet::new();
        for (index, entity) in entities.iter().enumerate() {
            if by_table.insert(entity.table.clone(), index).is_some() {
                return Err(MappingError::Invalid(format!(
                    "table {} is mapped twice",
                    entity.table
                )));
            }
            if !names.insert(entity.name.as_str()) {
                return Err(MappingError::Invalid(format!(
                    "entity {:?} is declared twice",
                    entity.name
                )));
            }
        }
        Ok(Self {
            entities: entities.into_iter().map(Arc::new).collect(),
            by_table,
            app_events: Vec::new(),
        })
    }

    /// The declared application event types.
    pub fn app_events(&self) -> &[AppEventType] {
        &self.app_events
    }

    /// The declaration of an application event type, if it is declared.
    pub fn app_event(&self, event_type: &str) -> Option<&AppEventType> {
        self.app_events.iter().find(|declared| declared.event_type == event_type)
    }

    /// Each entity's redacted columns, for refusing `where` on them.
    pub fn redactions(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.entities.iter().map(|e| (e.name.as_str(), e.redact.as_slice()))
    }

    pub fn entities(&self) -> &[Arc<Entity>] {
        &self.entities
    }

    pub fn entity_for(&self, table: &TableName) -> Option<&Arc<Entity>> {
        self.by_table.get(table).and_then(|&index| self.entities.get(index))
    }

    /// Checks every named table and column against the catalog (`table → its columns`).
    pub fn check_columns(
        &self,
        catalog: &HashMap<TableName, Vec<String>>,
    ) -> Result<(), MappingError> {
        for entity in &self.entities {
            let columns = catalog
                .get(&entity.table)
                .ok_or_else(|| MappingError::MissingTable { table: entity.table.clone() })?;
            for column in entity.columns_used() {
                if !columns.iter().any(|c| c == column) {
                    return Err(MappingError::MissingColumn {
                        table: entity.table.clone(),
                        column: column.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::model::{Change, Event, Op, Row, Timestamp};
    use serde_json::json;

    fn row(value: Value) -> Row {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn change(table: &str, op: Op, new: Option<Value>, old: Option<Value>) -> Change {
        Change {
            table: TableName::parse(table).expect("table"),
            op,
            new: new.map(row),
            old: old.map(row),
            timestamp: Timestamp(0),
            lsn: Some(0x10),
            xid: 5,
        }
    }

    fn kinds(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.event_type.as_str()).collect()
    }

    #[test]
    fn builtin_mapping_parses_and_maps_six_tables() {
        let mapping = Mapping::builtin();
        let tables: Vec<String> = mapping.entities().iter().map(|e| e.table.to_string()).collect();
        assert_eq!(
            tables,
            [
                "public.organizations",
                "public.domains",
                "public.agents",
                "public.instances",
                "public.deployments",
                "public.users"
            ]
        );
    }

    #[test]
    fn status_change_adds_an_event_with_the_same_data() {
        let mapping = Mapping::builtin();
        let agents = mapping.entity_for(&TableName::new("public", "agents")).expect("agents");
        let old = json!({"id": "agt-1", "organization_id": "quant", "domain_id": "demo", "status": "active"});
        let new = json!({"id": "agt-1", "organization_id": "quant", "domain_id": "demo", "status": "inactive"});
        let events = agents.events(change("agents", Op::Update, Some(new.clone()), Some(old)));
        assert_eq!(kinds(&events), ["agent.updated", "agent.status_changed"]);
        assert_eq!(events[1].data, Some(row(new)));
        assert_eq!(events[1].changed.as_deref(), Some(&["status".to_string()][..]));
        assert_eq!(events[0].organization_id.as_deref(), Some("quant"));
        assert_eq!(events[0].domain_id.as_deref(), Some("demo"));
        let crate::model::Source::Row { lsn, .. } = &events[0].source else {
            panic!("a row event's source is a row");
        };
        assert_eq!(lsn.as_deref(), Some("0/10"));
    }

    #[test]
    fn becomes_fires_on_insert_and_on_change_only() {
        let mapping = Mapping::builtin();
        let deployments =
            mapping.entity_for(&TableName::new("public", "deployments")).expect("deployments");
        let failed =
            json!({"id": "d1", "organization_id": "o", "domain_id": null, "status": "failed"});
        let running =
            json!({"id": "d1", "organization_id": "o", "domain_id": null, "status": "running"});
        let inserted =
            deployments.events(change("deployments", Op::Insert, Some(running.clone()), None));
        assert_eq!(kinds(&inserted), ["deployment.created", "deployment.started"]);
        assert_eq!(inserted[0].domain_id, None);
        let updated = deployments.events(change(
            "deployments",
            Op::Update,
            Some(failed.clone()),
            Some(running),
        ));
        assert_eq!(kinds(&updated), ["deployment.updated", "deployment.failed"]);
        assert_eq!(updated[1].severity, Severity::Error);
        let unchanged = deployments.events(change(
            "deployments",
            Op::Update,
            Some(failed.clone()),
            Some(failed),
        ));
        assert_eq!(kinds(&unchanged), ["deployment.updated"]);
        assert_eq!(unchanged[0].changed.as_deref(), Some(&[][..]));
    }

    #[test]
    fn delete_and_truncate() {
        let mapping = Mapping::builtin();
        let agents = mapping.entity_for(&TableName::new("public", "agents")).expect("agents");
        let old = json!({"id": "agt-1", "organization_id": "quant", "domain_id": "demo", "status": "active"});
        let deleted = agents.events(change("agents", Op::Delete, None, Some(old.clone())));
        assert_eq!(kinds(&deleted), ["agent.deleted"]);
        assert_eq!(deleted[0].data, Some(row(old.clone())));
        assert_eq!(deleted[0].old, Some(row(old)));
        assert_eq!(deleted[0].changed, None);
        let truncated = agents.events(change("agents", Op::Truncate, None, None));
        assert_eq!(kinds(&truncated), ["agent.truncated"]);
        assert_eq!(
            (truncated[0].data.as_ref(), truncated[0].organization_id.as_ref()),
            (None, None)
        );
    }

    #[test]
    fn redacted_columns_never_appear() {
        let mapping = Mapping::builtin();
        let users = mapping.entity_for(&TableName::new("public", "users")).expect("users");
        let old = json!({"id": "u1", "organization_id": "o", "password_hash": "x", "name": "a"});
        let new = json!({"id": "u1", "organization_id": "o", "password_hash": "y", "name": "b"});
        let events = users.events(change("users", Op::Update, Some(new), Some(old)));
        let text = serde_json::to_string(&events).expect("json");
        assert!(!text.contains("password_hash"), "{text}");
        assert_eq!(events[0].changed.as_deref(), Some(&["name".to_string()][..]));
    }

    #[test]
    fn numbers_and_nulls_as_scope() {
        let mapping = Mapping::from_toml("[[entity]]\nname = \"t\"\ntable = \"app.t\"\norganization = \"org\"\ndomain = \"dom\"\n")
            .expect("mapping");
        let entity = mapping.entity_for(&TableName::new("app", "t")).expect("entity");
        let events =
            entity.events(change("app.t", Op::Insert, Some(json!({"org": 42, "dom": null})), None));
        assert_eq!(events[0].organization_id.as_deref(), Some("42"));
        assert_eq!(events[0].domain_id, None);
    }

    #[test]
    fn bad_mappings_say_what_is_wrong() {
        let cases = [
            ("", "no [[entity]]"),
            ("[[entity]]\nname = \"a\"\n", "missing field `table`"),
            ("[[entity]]\nname = \"a.b\"\ntable = \"t\"\n", "must be non-empty"),
            ("[[entity]]\nname = \"a\"\ntable = \"t\"\ncolour = 1\n", "unknown field `colour`"),
            (
                "[[entity]]\nname = \"a\"\ntable = \"t\"\n[[entity]]\nname = \"b\"\ntable = \"public.t\"\n",
                "mapped twice",
            ),
            (
                "[[entity]]\nname = \"a\"\ntable = \"t\"\n[[entity.event]]\naction = \"x\"\n",
                "exactly one of",
            ),
            (
                "[[entity]]\nname = \"a\"\ntable = \"t\"\n[[entity.event]]\naction = \"x\"\nchanged = \"s\"\nseverity = \"fatal\"\n",
                "unknown severity",
            ),
            ("[[entity]]\nname = \"a\"\ntable = \"x.y.z\"\n", "is not schema.table"),
            (
                "[[event]]\ntype = \"Deploy.log\"\n[[entity]]\nname = \"a\"\ntable = \"t\"\n",
                "each part [a-z][a-z0-9_]*",
            ),
            (
                "[[event]]\ntype = \"a.created\"\n[[entity]]\nname = \"a\"\ntable = \"t\"\n",
                "also a row event type",
            ),
            (
                "[[event]]\ntype = \"a.x\"\n[[event]]\ntype = \"a.x\"\n[[entity]]\nname = \"a\"\ntable = \"t\"\n",
                "declared twice",
            ),
            (
                "[[event]]\ntype = \"a.x\"\nseverity = \"loud\"\n[[entity]]\nname = \"a\"\ntable = \"t\"\n",
                "unknown severity",
            ),
            (
                "[[event]]\ntype = \"a.x\"\ncolour = 1\n[[entity]]\nname = \"a\"\ntable = \"t\"\n",
                "unknown field `colour`",
            ),
            ("[[entity]\n", "not valid"),
        ];
        for (text, expected) in cases {
            let err = Mapping::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn application_events_and_descriptions_are_declared() {
        let mapping = Mapping::from_toml(
            "[[event]]\ntype = \"deployment.log\"\nseverity = \"debug\"\ndescription = \"A build line\"\n\
             [[event]]\ntype = \"cache.miss\"\n\
             [[entity]]\nname = \"deployment\"\ntable = \"deployments\"\ndescription = \"Deploys\"\n",
        )
        .expect("mapping");
        let log = mapping.app_event("deployment.log").expect("declared");
        assert_eq!(
            (log.severity, log.description.as_deref()),
            (Severity::Debug, Some("A build line"))
        );
        let miss = mapping.app_event("cache.miss").expect("declared");
        assert_eq!((miss.severity, miss.description.as_deref()), (Severity::Info, None));
        assert!(mapping.app_event("deployment.created").is_none());
        assert_eq!(mapping.entities()[0].description.as_deref(), Some("Deploys"));
        // Every severity is accepted in the mapping.
        for severity in Severity::ALL {
            let text = format!(
                "[[event]]\ntype = \"a.x\"\nseverity = \"{}\"\n[[entity]]\nname = \"a\"\ntable = \"t\"\n[[entity.event]]\naction = \"y\"\nchanged = \"c\"\nseverity = \"{}\"\n",
                severity.as_str(),
                severity.as_str()
            );
            let mapping = Mapping::from_toml(&text).expect("every severity");
            assert_eq!(mapping.app_event("a.x").map(|d| d.severity), Some(severity));
            assert_eq!(mapping.entities()[0].events[0].severity, severity);
        }
    }

    #[test]
    fn catalog_check_names_the_missing_piece() {
        let mapping = Mapping::builtin();
        let mut catalog: HashMap<TableName, Vec<String>> = HashMap::new();
        let err = mapping.check_columns(&catalog).expect_err("no tables").to_string();
        assert!(err.contains("public.organizations"), "{err}");
        for entity in mapping.entities() {
            catalog.insert(
                entity.table.clone(),
                vec!["id".into(), "organization_id".into(), "domain_id".into(), "status".into()],
            );
        }
        let err = mapping.check_columns(&catalog).expect_err("no password_hash").to_string();
        assert!(err.contains("\"password_hash\"") && err.contains("public.users"), "{err}");
    }
}
