//! The conditions of a `WHERE` (SPEC §11): each compiles into the parts of a §5 [`Filter`],
//! the severities a minimum cannot say, or the ids and commit times history reads. Pure.

use std::time::SystemTime;

use serde_json::{Value, json};
use sqlparser::ast::{BinaryOperator, DataType, Expr, InTarget, UnaryOperator};

use super::{Column, Unsupported, column_list, unsupported};
use crate::filter::Filter;
use crate::model::{Severity, Timestamp};

/// What a `WHERE` says: a §5 filter, what the filter cannot say about severity, and the ids
/// and commit times (`[from, to)`, in µs) of history.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditions {
    pub filter: Filter,
    pub severities: Severities,
    pub after: u64,
    pub up_to: Option<u64>,
    pub from: Option<SystemTime>,
    pub to: Option<SystemTime>,
}

/// The severities a row may have, when that is more than a minimum (`severity = 'error'`):
/// the filter asks for the least of them and this checks each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Severities([bool; 5]);

impl Severities {
    pub fn allows(&self, severity: Severity) -> bool {
        self.0[index(severity)]
    }

    /// Whether every row the filter's minimum lets through is allowed anyway.
    pub fn is_minimum(&self) -> bool {
        self.0.windows(2).all(|pair| pair[1] || !pair[0])
    }
}

fn index(severity: Severity) -> usize {
    Severity::ALL.iter().position(|s| *s == severity).unwrap_or(0)
}

/// The conditions of a `WHERE`, gathered.
pub(super) struct Builder {
    /// Whether ids and commit times may be constrained (SELECT); SUBSCRIBE starts at SINCE.
    history: bool,
    types: Option<Vec<String>>,
    organizations: Option<Vec<String>>,
    domains: Option<Vec<String>>,
    severities: [bool; 5],
    predicates: Vec<Value>,
    after: u64,
    up_to: Option<u64>,
    from: Option<i64>,
    to: Option<i64>,
}

/// A comparison, with the column on the left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
}

impl Compare {
    fn of(op: &BinaryOperator) -> Option<Compare> {
        Some(match op {
            BinaryOperator::Eq => Compare::Eq,
            BinaryOperator::NotEq => Compare::Neq,
            BinaryOperator::Lt => Compare::Lt,
            BinaryOperator::LtEq => Compare::Lte,
            BinaryOperator::Gt => Compare::Gt,
            BinaryOperator::GtEq => Compare::Gte,
            _ => return None,
        })
    }

    fn predicate(self) -> &'static str {
        match self {
            Compare::Eq => "eq",
            Compare::Neq => "neq",
            Compare::Lt => "lt",
            Compare::Lte => "lte",
            Compare::Gt => "gt",
            Compare::Gte => "gte",
        }
    }
}

/// What a condition's left side names.
enum Target {
    Column(Column),
    /// A key of `data` (or of `old`: the path starts with `old`).
    Path(Vec<String>),
}

impl Builder {
    pub(super) fn new(history: bool) -> Self {
        Self {
            history,
            types: None,
            organizations: None,
            domains: None,
            severities: [true; 5],
            predicates: Vec::new(),
            after: 0,
            up_to: None,
            from: None,
            to: None,
        }
    }

    pub(super) fn condition(&mut self, expr: &Expr) -> Result<(), Unsupported> {
        match expr {
            Expr::Nested(inner) => self.condition(inner),
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
                self.condition(left)?;
                self.condition(right)
            }
            Expr::BinaryOp { op: BinaryOperator::Or, .. } => unsupported(format!(
                "OR in `{expr}`: join conditions with AND, alternatives with IN (...)"
            )),
            Expr::BinaryOp { left, op: BinaryOperator::Question, right } => {
                match (target(left)?, string(right)) {
                    (Target::Column(Column::Changed), Some(key)) => {
                        self.predicates.push(json!([key, "changed"]));
                        Ok(())
                    }
                    _ => unsupported(format!("`{expr}`: ? is supported as changed ? 'column'")),
                }
            }
            Expr::BinaryOp { left, op, right } => {
                let Some(compare) = Compare::of(op) else {
                    return unsupported(format!("the operator {op} in `{expr}`"));
                };
                self.compare(expr, target(left)?, compare, right)
            }
            Expr::In { expr: column, target: InTarget::List(list), negated, .. } => {
                self.in_list(expr, target(column)?, list, *negated)
            }
            Expr::Between { expr: column, negated: false, low, high } => {
                self.compare(expr, target(column)?, Compare::Gte, low)?;
                self.compare(expr, target(column)?, Compare::Lte, high)
            }
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => match target(inner)? {
                Target::Path(path) => {
                    let wanted = matches!(expr, Expr::IsNull(_));
                    self.predicates.push(json!([path.join("."), "is_null", wanted]));
                    Ok(())
                }
                Target::Column(_) => unsupported(format!(
                    "`{expr}`: IS NULL applies to data->>'key' and old->>'key'"
                )),
            },
            Expr::Like { negated: false, any: false, expr: column, pattern, escape_char: None } => {
                let Some(pattern) = string(pattern) else {
                    return unsupported(format!("`{expr}`: LIKE takes a string pattern"));
                };
                match target(column)? {
                    Target::Column(Column::Type) => {
                        let pattern = type_like(&pattern)?;
                        self.types(expr, vec![pattern])
                    }
                    Target::Path(path) => {
                        let inner = pattern.strip_prefix('%').and_then(|p| p.strip_suffix('%'));
                        match inner.filter(|text| !text.contains(['%', '_'])) {
                            Some(text) => {
                                self.predicates.push(json!([path.join("."), "contains", text]));
                                Ok(())
                            }
                            None => unsupported(format!(
                                "`{expr}`: LIKE on data takes '%text%' (contains text)"
                            )),
                        }
                    }
                    Target::Column(_) => {
                        unsupported(format!("`{expr}`: LIKE applies to type and data->>'key'"))
                    }
                }
            }
            other => unsupported(format!("the condition `{other}`")),
        }
    }

    fn compare(
        &mut self,
        expr: &Expr,
        target: Target,
        compare: Compare,
        value: &Expr,
    ) -> Result<(), Unsupported> {
        match target {
            Target::Path(path) => {
                let value = literal(value).ok_or_else(|| {
                    Unsupported(format!(
                        "`{expr}`: compare data with a string, number or boolean (IS NULL for null)"
                    ))
                })?;
                self.predicates.push(json!([path.join("."), compare.predicate(), value]));
                Ok(())
            }
            Target::Column(Column::Id) => {
                self.history_only(expr)?;
                let Some(n) = number(value) else {
                    return unsupported(format!("`{expr}`: ids are whole numbers"));
                };
                let (after, up_to) = match compare {
                    Compare::Eq => (Some(n.saturating_sub(1)), Some(n)),
                    Compare::Gt => (Some(n), None),
                    Compare::Gte => (Some(n.saturating_sub(1)), None),
                    Compare::Lt if n == 0 => (None, Some(0)),
                    Compare::Lt => (None, Some(n - 1)),
                    Compare::Lte => (None, Some(n)),
                    Compare::Neq => return unsupported(format!("`{expr}`: <> on id")),
                };
                if let Some(after) = after {
                    self.after = self.after.max(after);
                }
                if let Some(up_to) = up_to {
                    self.up_to = Some(self.up_to.map_or(up_to, |u| u.min(up_to)));
                }
                Ok(())
            }
            Target::Column(Column::Timestamp) => {
                self.history_only(expr)?;
                let Some(at) = time(value) else {
                    return unsupported(format!(
                        "`{expr}`: times are RFC 3339 strings like '2026-11-22T10:15:30Z'"
                    ));
                };
                let (from, to) = match compare {
                    Compare::Eq => (Some(at), Some(at.saturating_add(1))),
                    Compare::Gt => (Some(at.saturating_add(1)), None),
                    Compare::Gte => (Some(at), None),
                    Compare::Lt => (None, Some(at)),
                    Compare::Lte => (None, Some(at.saturating_add(1))),
                    Compare::Neq => return unsupported(format!("`{expr}`: <> on timestamp")),
                };
                if let Some(from) = from {
                    self.from = Some(self.from.map_or(from, |f| f.max(from)));
                }
                if let Some(to) = to {
                    self.to = Some(self.to.map_or(to, |t| t.min(to)));
                }
                Ok(())
            }
            Target::Column(Column::Severity) => {
                let severity = severity(expr, value)?;
                let rank = index(severity);
                for (i, allowed) in self.severities.iter_mut().enumerate() {
                    let keep = match compare {
                        Compare::Eq => i == rank,
                        Compare::Neq => i != rank,
                        Compare::Lt => i < rank,
                        Compare::Lte => i <= rank,
                        Compare::Gt => i > rank,
                        Compare::Gte => i >= rank,
                    };
                    *allowed &= keep;
                }
                Ok(())
            }
            Target::Column(Column::Type) if compare == Compare::Eq => {
                let Some(kind) = string(value) else {
                    return unsupported(format!("`{expr}`: types are strings"));
                };
                self.types(expr, vec![exact_type(&kind)?])
            }
            Target::Column(column @ (Column::OrganizationId | Column::DomainId))
                if compare == Compare::Eq =>
            {
                let Some(name) = string(value) else {
                    return unsupported(format!("`{expr}`: {} is a string", column.name()));
                };
                self.scope(column, vec![name])
            }
            Target::Column(column) => unsupported(format!(
                "`{expr}`: {} takes {}",
                column.name(),
                match column {
                    Column::Type => "=, IN (...) or LIKE",
                    Column::OrganizationId | Column::DomainId => "= or IN (...)",
                    _ => "no conditions (filter on data->>'key' instead)",
                }
            )),
        }
    }

    fn in_list(
        &mut self,
        expr: &Expr,
        target: Target,
        list: &[Expr],
        negated: bool,
    ) -> Result<(), Unsupported> {
        match target {
            Target::Path(path) => {
                let values = list.iter().map(literal).collect::<Option<Vec<Value>>>();
                let Some(values) = values else {
                    return unsupported(format!("`{expr}`: IN lists strings, numbers or booleans"));
                };
                let op = if negated { "nin" } else { "in" };
                self.predicates.push(json!([path.join("."), op, values]));
                Ok(())
            }
            Target::Column(Column::Severity) => {
                let mut listed = [false; 5];
                for value in list {
                    listed[index(severity(expr, value)?)] = true;
                }
                for (allowed, listed) in self.severities.iter_mut().zip(listed) {
                    *allowed &= listed != negated;
                }
                Ok(())
            }
            Target::Column(column) if negated => {
                unsupported(format!("`{expr}`: NOT IN on {}", column.name()))
            }
            Target::Column(Column::Type) => {
                let kinds = list
                    .iter()
                    .map(|value| match string(value) {
                        Some(kind) => exact_type(&kind),
                        None => unsupported(format!("`{expr}`: types are strings")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.types(expr, kinds)
            }
            Target::Column(column @ (Column::OrganizationId | Column::DomainId)) => {
                let names = list.iter().map(string).collect::<Option<Vec<_>>>();
                let Some(names) = names else {
                    return unsupported(format!("`{expr}`: {} is a string", column.name()));
                };
                self.scope(column, names)
            }
            Target::Column(column) => unsupported(format!(
                "`{expr}`: IN on {} (ids and times take ranges)",
                column.name()
            )),
        }
    }

    fn history_only(&self, expr: &Expr) -> Result<(), Unsupported> {
        if self.history {
            Ok(())
        } else {
            unsupported(format!(
                "`{expr}` in SUBSCRIBE: it starts after SINCE n and runs live, so ids and times are not conditions"
            ))
        }
    }

    fn types(&mut self, expr: &Expr, patterns: Vec<String>) -> Result<(), Unsupported> {
        if self.types.is_some() {
            return unsupported(format!(
                "`{expr}`: type is constrained twice; put the alternatives in one IN (...) or LIKE"
            ));
        }
        self.types = Some(patterns);
        Ok(())
    }

    /// Organizations or domains: a second condition narrows the first.
    fn scope(&mut self, column: Column, names: Vec<String>) -> Result<(), Unsupported> {
        let list = if column == Column::OrganizationId {
            &mut self.organizations
        } else {
            &mut self.domains
        };
        *list = Some(match list.take() {
            None => names,
            Some(before) => before.into_iter().filter(|name| names.contains(name)).collect(),
        });
        Ok(())
    }

    pub(super) fn finish(self) -> Result<Conditions, Unsupported> {
        let minimum = self.severities.iter().position(|allowed| *allowed).unwrap_or(4);
        let mut filter = serde_json::Map::new();
        if let Some(types) = self.types {
            filter.insert("type".into(), json!(types));
        }
        if let Some(organizations) = self.organizations {
            filter.insert("organization_id".into(), json!(organizations));
        }
        if let Some(domains) = self.domains {
            filter.insert("domain_id".into(), json!(domains));
        }
        filter.insert("severity".into(), json!(Severity::ALL[minimum].as_str()));
        if !self.predicates.is_empty() {
            filter.insert("where".into(), Value::Array(self.predicates));
        }
        let filter = Filter::from_json(Some(&Value::Object(filter)))
            .map_err(|err| Unsupported(format!("the conditions: {err}")))?;
        let instant = |micros: i64| Timestamp(micros).to_system_time();
        Ok(Conditions {
            filter,
            severities: Severities(self.severities),
            after: self.after,
            up_to: self.up_to,
            from: self.from.map(instant),
            to: self.to.map(instant),
        })
    }
}

/// The column or `data` path a condition is about.
fn target(expr: &Expr) -> Result<Target, Unsupported> {
    match expr {
        Expr::Identifier(ident) => match Column::named(&ident.value) {
            Some(column) => Ok(Target::Column(column)),
            None => unsupported(format!(
                "column {:?}: events has the columns {}",
                ident.value,
                column_list()
            )),
        },
        Expr::Nested(inner) => target(inner),
        Expr::BinaryOp { left, op: BinaryOperator::Arrow | BinaryOperator::LongArrow, right } => {
            let Some(key) = string(right) else {
                return unsupported(format!("`{expr}`: keys of data are strings"));
            };
            if key.is_empty() || key.contains('.') {
                return unsupported(format!("`{expr}`: keys with dots (or empty ones)"));
            }
            let mut path = match target(left)? {
                Target::Column(Column::Data) => Vec::new(),
                Target::Column(Column::Old) => vec!["old".to_owned()],
                Target::Path(path) => path,
                Target::Column(_) => {
                    return unsupported(format!("`{expr}`: -> and ->> apply to data and old"));
                }
            };
            path.push(key);
            Ok(Target::Path(path))
        }
        other => {
            unsupported(format!("`{other}` as a condition's left side (a column or data->>'key')"))
        }
    }
}

fn string(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Nested(inner) => string(inner),
        Expr::Value(value) => match &value.value {
            sqlparser::ast::Value::SingleQuotedString(text)
            | sqlparser::ast::Value::EscapedStringLiteral(text) => Some(text.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// A literal as the JSON value predicates compare with.
fn literal(expr: &Expr) -> Option<Value> {
    match expr {
        Expr::Nested(inner) => literal(inner),
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match literal(expr)? {
            Value::Number(n) => serde_json::from_str(&format!("-{n}")).ok(),
            _ => None,
        },
        Expr::Value(value) => match &value.value {
            sqlparser::ast::Value::Number(text, _) => serde_json::from_str(text).ok(),
            sqlparser::ast::Value::Boolean(b) => Some(Value::Bool(*b)),
            _ => string(expr).map(Value::String),
        },
        _ => None,
    }
}

fn number(expr: &Expr) -> Option<u64> {
    match expr {
        Expr::Nested(inner) => number(inner),
        Expr::Value(value) => match &value.value {
            sqlparser::ast::Value::Number(text, _) => text.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// A time literal in µs: `'…'`, `TIMESTAMP[TZ] '…'` or `'…'::timestamptz`.
fn time(expr: &Expr) -> Option<i64> {
    let timestamp = |t: &DataType| {
        matches!(t, DataType::Timestamp(..) | DataType::TimestampNtz(..))
            || t.to_string().to_ascii_lowercase().starts_with("timestamp")
    };
    let text = match expr {
        Expr::Nested(inner) => return time(inner),
        Expr::TypedString(typed) if timestamp(&typed.data_type) => match &typed.value.value {
            sqlparser::ast::Value::SingleQuotedString(text) => text.clone(),
            _ => return None,
        },
        Expr::Cast { expr, data_type, .. } if timestamp(data_type) => string(expr)?,
        _ => string(expr)?,
    };
    parse_time(&text)
}

/// RFC 3339, or Postgres' own form (`2026-11-22 10:15:30+00`).
pub(super) fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Some(at) = Timestamp::parse_rfc3339(text) {
        return Some(at.0);
    }
    let bytes = text.as_bytes();
    let short_offset = bytes.len() > 3
        && matches!(bytes[bytes.len() - 3], b'+' | b'-')
        && bytes[bytes.len() - 2..].iter().all(u8::is_ascii_digit);
    if short_offset {
        return Timestamp::parse_rfc3339(&format!("{text}:00")).map(|at| at.0);
    }
    None
}

fn severity(expr: &Expr, value: &Expr) -> Result<Severity, Unsupported> {
    let Some(text) = string(value) else {
        return unsupported(format!("`{expr}`: severities are strings like 'warning'"));
    };
    text.parse().map_err(|err| Unsupported(format!("`{expr}`: {err}")))
}

/// A type compared with `=` or listed in `IN`: exact, never a pattern.
fn exact_type(kind: &str) -> Result<String, Unsupported> {
    if kind.contains(['*', '%']) {
        return unsupported(format!("type {kind:?}: use LIKE for patterns ('entity.%')"));
    }
    Ok(kind.to_owned())
}

/// `type LIKE`: `%`, `entity.%`, `%.action` or an exact type (`\_` and `_` are both `_`).
fn type_like(pattern: &str) -> Result<String, Unsupported> {
    let text = pattern.replace("\\_", "_");
    let wildcard = |part: &str| part == "%";
    let plain = |part: &str| !part.is_empty() && !part.contains(['%', '*', '\\']);
    let translated = match text.split_once('.') {
        _ if text == "%" => Some("*".to_owned()),
        Some((entity, action)) if plain(entity) && wildcard(action) => Some(format!("{entity}.*")),
        Some((entity, action)) if wildcard(entity) && plain(action) => Some(format!("*.{action}")),
        Some((entity, action)) if plain(entity) && plain(action) => Some(text.clone()),
        _ => None,
    };
    translated.ok_or_else(|| {
        Unsupported(format!(
            "type LIKE {pattern:?}: patterns are '%', 'entity.%', '%.action' or an exact type"
        ))
    })
}
