//! Subscription filters (SPEC §5): parsing and matching, both pure.
//!
//! A filter has five optional parts, all of which must match: `type` (patterns `*`,
//! `entity.*`, `*.action`, `entity.action`, one or a list), `organization_id` and `domain_id`
//! (one or a list), `severity` (a minimum) and `where` (row-content predicates, see
//! [`predicate`]). A missing part matches everything. The same
//! filter drives live matching ([`Filter::matches`]), its index keys in the bus and the SQL
//! of history reads ([`Filter::sql`]), so the three cannot drift apart.

use serde_json::{Map, Value, json};

use crate::model::Severity;

/// Most values one list of a filter may hold.
pub const MAX_LIST: usize = 256;

mod pattern;
pub mod predicate;
mod sql;

pub use pattern::Pattern;
pub use predicate::{Envelope, MAX_PREDICATES, Predicate};
pub use sql::{SqlFilter, sql_condition};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

impl FilterError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// What a filter is matched against: the fields of an event that filters can see.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub event_type: &'a str,
    pub organization_id: Option<&'a str>,
    pub domain_id: Option<&'a str>,
    pub severity: Severity,
    /// The event's envelope, for `where` predicates: parsed only if a candidate filter has
    /// some. `None`: no predicate holds.
    pub envelope: Option<&'a Envelope<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Empty: every type.
    types: Vec<Pattern>,
    organizations: Option<Vec<String>>,
    domains: Option<Vec<String>>,
    /// The minimum; without one, the lowest (`debug`): a missing part matches everything.
    severity: Severity,
    /// All must hold; empty: no condition on the row.
    predicates: Vec<Predicate>,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            types: Vec::new(),
            organizations: None,
            domains: None,
            severity: Severity::Debug,
            predicates: Vec::new(),
        }
    }
}

impl Filter {
    /// Matches every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses the JSON `filter` of a `subscribe` (absent or null: everything).
    pub fn from_json(value: Option<&Value>) -> Result<Self, FilterError> {
        let object = match value {
            None | Some(Value::Null) => return Ok(Self::all()),
            Some(Value::Object(object)) => object,
            Some(_) => return Err(FilterError::new("filter must be an object")),
        };
        let mut filter = Self::all();
        for (key, value) in object {
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "type" => {
                    filter.types = strings("type", value)?
                        .iter()
                        .map(|p| Pattern::parse(p))
                        .collect::<Result<_, _>>()?;
                }
                "organization_id" => filter.organizations = Some(strings(key, value)?),
                "domain_id" => filter.domains = Some(strings(key, value)?),
                "severity" => {
                    let text = value
                        .as_str()
                        .ok_or_else(|| FilterError::new("filter.severity must be a string"))?;
                    filter.severity = text.parse().map_err(FilterError)?;
                }
                "where" => {
                    let entries = value.as_array().ok_or_else(|| {
                        FilterError::new("filter.where must be a list of [path, operator, value]")
                    })?;
                    filter.predicates =
                        entries.iter().map(Predicate::from_json).collect::<Result<_, _>>()?;
                }
                other => {
                    return Err(FilterError::new(format!(
                        "unknown filter field {other:?} (expected type, organization_id, domain_id, severity or where)"
                    )));
                }
            }
        }
        filter.check_sizes()?;
        Ok(filter.normalized())
    }

    /// Every list is matched per event; long ones would slow everyone's delivery.
    fn check_sizes(&self) -> Result<(), FilterError> {
        let sizes = [
            ("type", self.types.len()),
            ("organization_id", self.organizations.as_ref().map_or(0, Vec::len)),
            ("domain_id", self.domains.as_ref().map_or(0, Vec::len)),
        ];
        if self.predicates.len() > MAX_PREDICATES {
            return Err(FilterError::new(format!(
                "filter.where holds {} predicates; at most {MAX_PREDICATES} are allowed",
                self.predicates.len()
            )));
        }
        match sizes.iter().find(|(_, n)| *n > MAX_LIST) {
            Some((field, n)) => Err(FilterError::new(format!(
                "filter.{field} lists {n} values; at most {MAX_LIST} are allowed"
            ))),
            None => Ok(()),
        }
    }

    /// Builds a filter from query parameters (`type`, `organization_id`, `domain_id`,
    /// `severity`, and `where=path:op[:value]`, repeated); lists are repeated parameters or comma-separated. Other keys are ignored.
    /// `None` when no filter parameter is present.
    pub fn from_query<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Option<Self>, FilterError> {
        let mut filter = Self::all();
        let mut present = false;
        let split = |v: &'a str| v.split(',').map(str::trim);
        for (key, value) in pairs {
            match key {
                "type" => {
                    for pattern in split(value) {
                        filter.types.push(Pattern::parse(pattern)?);
                    }
                }
                "organization_id" => filter
                    .organizations
                    .get_or_insert_default()
                    .extend(split(value).map(String::from)),
                "domain_id" => {
                    filter.domains.get_or_insert_default().extend(split(value).map(String::from))
                }
                "severity" => filter.severity = value.parse().map_err(FilterError)?,
                "where" => filter.predicates.push(Predicate::from_query(value)?),
                _ => continue,
            }
            present = true;
        }
        filter.check_sizes()?;
        Ok(present.then(|| filter.normalized()))
    }

    /// `*` makes the other patterns moot; duplicates go.
    fn normalized(mut self) -> Self {
        if self.types.contains(&Pattern::Any) {
            self.types.clear();
        }
        dedup(&mut self.types);
        for list in [&mut self.organizations, &mut self.domains].into_iter().flatten() {
            dedup(list);
        }
        self
    }

    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        subject.severity >= self.severity
            && (self.types.is_empty() || self.types.iter().any(|p| p.matches(subject.event_type)))
            && within(&self.organizations, subject.organization_id)
            && within(&self.domains, subject.domain_id)
            && (self.predicates.is_empty()
                || subject
                    .envelope
                    .and_then(Envelope::value)
                    .is_some_and(|envelope| self.predicates.iter().all(|p| p.matches(envelope))))
    }

    /// Refuses a `where` on a column that an entity this filter can reach redacts (SPEC §5):
    /// the column is never in the row, so the predicate could only mislead.
    pub fn check_redactions<'a>(
        &self,
        redacted: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> Result<(), FilterError> {
        if self.predicates.is_empty() {
            return Ok(());
        }
        let reachable = self.entities();
        for (entity, columns) in redacted {
            if reachable.as_ref().is_some_and(|list| !list.contains(&entity)) {
                continue;
            }
            if let Some(p) =
                self.predicates.iter().find(|p| columns.iter().any(|c| c == p.column()))
            {
                return Err(FilterError::new(format!(
                    "where {:?}: column {:?} of {entity} is redacted and cannot be filtered on",
                    p.to_json()[0],
                    p.column()
                )));
            }
        }
        Ok(())
    }

    /// The `where` predicates, all of which must hold.
    pub fn predicates(&self) -> &[Predicate] {
        &self.predicates
    }

    /// Where the bus may index this filter beyond type and scope: the first `eq`/`in`
    /// predicate on a `data` field, as that field's path and the keys of the values it accepts
    /// (see [`Predicate::equality_keys`]).
    pub fn equality_index(&self) -> Option<(&[String], Vec<String>)> {
        self.predicates.iter().find_map(Predicate::equality_keys)
    }

    /// The organizations this filter is confined to; `None`: any.
    pub fn organizations(&self) -> Option<&[String]> {
        self.organizations.as_deref()
    }

    /// The domains this filter is confined to; `None`: any.
    pub fn domains(&self) -> Option<&[String]> {
        self.domains.as_deref()
    }

    /// The same filter with its organizations and domains replaced (see `auth::Scope`).
    pub fn with_scope(
        mut self,
        organizations: Option<Vec<String>>,
        domains: Option<Vec<String>>,
    ) -> Self {
        self.organizations = organizations;
        self.domains = domains;
        self.normalized()
    }

    /// The entities this filter can match; `None`: any (a `*` or `*.action` pattern).
    pub fn entities(&self) -> Option<Vec<&str>> {
        if self.types.is_empty() {
            return None;
        }
        let mut entities = Vec::with_capacity(self.types.len());
        for pattern in &self.types {
            match pattern {
                Pattern::Entity(e) => entities.push(e.as_str()),
                Pattern::Exact(t) => entities.push(t.split_once('.').map_or(t.as_str(), |p| p.0)),
                Pattern::Any | Pattern::Action(_) => return None,
            }
        }
        entities.sort_unstable();
        entities.dedup();
        Some(entities)
    }

    /// The filter as echoed in `subscribed`: only the parts that restrict anything.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        if !self.types.is_empty() {
            object.insert("type".into(), self.types.iter().map(Pattern::text).collect());
        }
        if let Some(orgs) = &self.organizations {
            object.insert("organization_id".into(), json!(orgs));
        }
        if let Some(domains) = &self.domains {
            object.insert("domain_id".into(), json!(domains));
        }
        if self.severity != Severity::Debug {
            object.insert("severity".into(), json!(self.severity.as_str()));
        }
        if !self.predicates.is_empty() {
            object.insert("where".into(), self.predicates.iter().map(Predicate::to_json).collect());
        }
        Value::Object(object)
    }
}

fn within(allowed: &Option<Vec<String>>, value: Option<&str>) -> bool {
    match allowed {
        None => true,
        // A null scope is in no list.
        Some(list) => value.is_some_and(|v| list.iter().any(|a| a == v)),
    }
}

fn dedup<T: Eq + std::hash::Hash + Clone>(list: &mut Vec<T>) {
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    list.retain(|item| seen.insert(item.clone()));
}

/// A string or a non-empty list of strings.
fn strings(field: &str, value: &Value) -> Result<Vec<String>, FilterError> {
    let wrong =
        || FilterError::new(format!("filter.{field} must be a string or a list of strings"));
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => {
            Err(FilterError::new(format!("filter.{field} must not be an empty list")))
        }
        Value::Array(items) => {
            items.iter().map(|item| item.as_str().map(String::from).ok_or_else(wrong)).collect()
        }
        _ => Err(wrong()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(kind: &'a str, org: Option<&'a str>, domain: Option<&'a str>) -> Subject<'a> {
        Subject {
            event_type: kind,
            organization_id: org,
            domain_id: domain,
            severity: Severity::Info,
            envelope: None,
        }
    }

    fn parse(value: Value) -> Result<Filter, FilterError> {
        Filter::from_json(Some(&value))
    }

    #[test]
    fn patterns() {
        assert_eq!(Pattern::parse("*"), Ok(Pattern::Any));
        assert_eq!(Pattern::parse("agent.*"), Ok(Pattern::Entity("agent".into())));
        assert_eq!(Pattern::parse("*.deleted"), Ok(Pattern::Action("deleted".into())));
        assert_eq!(Pattern::parse("agent.created"), Ok(Pattern::Exact("agent.created".into())));
        for bad in ["", "agent", ".", "agent.", ".created", "a.b.c", "ag*nt.created", "a b.c", "**"]
        {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Pattern::Action("deleted".into()).matches("user.deleted"));
        assert!(!Pattern::Action("deleted".into()).matches("user.created"));
        assert!(!Pattern::Entity("agent".into()).matches("agents.created"));
    }

    #[test]
    fn every_part_must_match() {
        let filter = parse(json!({
            "type": ["agent.*", "deployment.failed"],
            "organization_id": "quant",
            "domain_id": ["demo", "prod"],
            "severity": "info"
        }))
        .expect("valid");
        assert!(filter.matches(&subject("agent.created", Some("quant"), Some("demo"))));
        assert!(filter.matches(&subject("deployment.failed", Some("quant"), Some("prod"))));
        assert!(!filter.matches(&subject("deployment.started", Some("quant"), Some("prod"))));
        assert!(!filter.matches(&subject("agent.created", Some("acme"), Some("demo"))));
        assert!(!filter.matches(&subject("agent.created", Some("quant"), None)));
        assert!(!filter.matches(&subject("agent.created", None, Some("demo"))));
    }

    #[test]
    fn missing_parts_match_anything_including_null_scope() {
        let filter = Filter::from_json(None).expect("valid");
        assert!(filter.matches(&subject("user.created", None, None)));
        let filter = parse(json!({"type": "*", "organization_id": null})).expect("valid");
        assert_eq!(filter, Filter::all());
    }

    #[test]
    fn severity_is_a_minimum() {
        let filter = parse(json!({"severity": "warning"})).expect("valid");
        let mut s = subject("deployment.failed", None, None);
        assert!(!filter.matches(&s));
        s.severity = Severity::Error;
        assert!(filter.matches(&s));
    }

    #[test]
    fn wrong_shapes_say_what_is_wrong() {
        let message = |v: Value| parse(v).expect_err("refused").to_string();
        assert!(message(json!({"type": 5})).contains("filter.type"));
        assert!(message(json!({"organization_id": [1]})).contains("filter.organization_id"));
        assert!(message(json!({"domain_id": []})).contains("empty"));
        assert!(message(json!({"severity": "fatal"})).contains("severity"));
        assert!(message(json!({"severity": 2})).contains("severity"));
        assert!(message(json!({"colour": "red"})).contains("colour"));
        assert!(message(json!(["agent.*"])).contains("object"));
        assert!(message(json!({"type": "agent.*.x"})).contains("agent.*.x"));
        let many: Vec<String> = (0..=MAX_LIST).map(|i| format!("org{i}")).collect();
        assert!(message(json!({"organization_id": many})).contains("at most"));
    }

    #[test]
    fn query_parameters_repeat_or_use_commas() {
        let pairs = [
            ("type", "agent.*,*.deleted"),
            ("organization_id", "quant"),
            ("organization_id", "acme"),
            ("since", "5"),
        ];
        let filter = Filter::from_query(pairs).expect("valid").expect("present");
        assert!(filter.matches(&subject("user.deleted", Some("acme"), None)));
        assert!(!filter.matches(&subject("user.created", Some("acme"), None)));
        assert_eq!(Filter::from_query([("since", "5")]), Ok(None));
        assert!(Filter::from_query([("severity", "loud")]).is_err());
    }

    #[test]
    fn entities_for_the_index() {
        let filter = parse(json!({"type": ["agent.*", "agent.created", "user.created"]}));
        assert_eq!(filter.expect("valid").entities(), Some(vec!["agent", "user"]));
        let filter = parse(json!({"type": ["agent.*", "*.deleted"]})).expect("valid");
        assert_eq!(filter.entities(), None);
        assert_eq!(Filter::all().entities(), None);
    }

    use proptest::prelude::*;

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop::sample::select(
                &["*", "agent.*", "*.x", "a.b", "", ".", "**", "info", "error", "ünï"][..]
            )
            .prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            let keys = prop::sample::select(
                &["type", "organization_id", "domain_id", "severity", "x"][..],
            );
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec((keys, inner), 0..4).prop_map(|pairs| {
                    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        /// Any JSON and any query string: a filter or an error, never a panic; and whatever
        /// parses echoes to JSON that parses to the same filter.
        #[test]
        fn the_filter_parsers_never_panic(value in any_json(), pairs in prop::collection::vec(("\\PC{0,10}", "\\PC{0,20}"), 0..6)) {
            if let Ok(filter) = Filter::from_json(Some(&value)) {
                prop_assert_eq!(Filter::from_json(Some(&filter.to_json())), Ok(filter));
            }
            let _ = Filter::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
    }

    #[test]
    fn echo_is_normalized() {
        let filter = parse(json!({"type": ["agent.*", "agent.*"], "severity": "error"}));
        assert_eq!(
            filter.expect("valid").to_json(),
            json!({"type": ["agent.*"], "severity": "error"})
        );
        let filter = parse(json!({"type": ["agent.*", "*"]})).expect("valid");
        assert_eq!(filter.to_json(), json!({}));
    }
}
