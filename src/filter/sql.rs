//! A filter as SQL: the same filter that matches live events selects history, so the two can
//! never drift apart.

use serde_json::{Value, json};

use super::predicate::{Op, Side};
use super::{Filter, Pattern};

/// The filter as SQL parameters: see [`Filter::sql`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlFilter {
    pub any_type: bool,
    pub types: Vec<String>,
    pub entities: Vec<String>,
    pub actions: Vec<String>,
    pub organizations: Option<Vec<String>>,
    pub domains: Option<Vec<String>>,
    pub severity: i16,
    /// The `where` predicates as a JSON list read by [`sql_condition`]; `None` without any.
    pub predicates: Option<String>,
}

impl SqlFilter {
    /// The parameters of [`sql_condition`], in its order.
    pub fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 8] {
        [
            &self.any_type,
            &self.types,
            &self.entities,
            &self.actions,
            &self.organizations,
            &self.domains,
            &self.severity,
            &self.predicates,
        ]
    }
}

/// The `WHERE` fragment matching [`SqlFilter`] given as parameters `$first..$first+7`, in the
/// order of its fields, over the log's `body`.
///
/// Predicates travel as one JSON list (`{path, op, value}` each, `path` starting with `data`
/// or `old`) and are evaluated by one fixed expression, so the statement text never depends on
/// the filter. It mirrors `Predicate::matches`: an absent or null value holds only for
/// `is_null: true`; `=` on `jsonb` is by value for numbers and exact otherwise; ordering is
/// numeric for two numbers, bytewise (`COLLATE "C"`) for two strings, false across types.
pub fn sql_condition(first: usize) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "({any} OR type = ANY({types}) OR split_part(type, '.', 1) = ANY({entities}) \
         OR split_part(type, '.', 2) = ANY({actions})) \
         AND ({orgs}::text[] IS NULL OR organization_id = ANY({orgs})) \
         AND ({domains}::text[] IS NULL OR domain_id = ANY({domains})) \
         AND severity >= {severity} \
         AND ({predicates}::text IS NULL OR NOT EXISTS ( \
             SELECT 1 FROM jsonb_array_elements(({predicates}::text)::jsonb) AS p(x) \
             CROSS JOIN LATERAL (SELECT body::jsonb AS b) r \
             CROSS JOIN LATERAL (SELECT nullif(r.b #> ARRAY(SELECT jsonb_array_elements_text(p.x->'path')), \
                                               'null'::jsonb) AS v, p.x->'value' AS w) a \
             CROSS JOIN LATERAL (SELECT CASE \
                 WHEN jsonb_typeof(a.v) = 'number' AND jsonb_typeof(a.w) = 'number' THEN \
                     CASE WHEN a.v::numeric < a.w::numeric THEN -1 \
                          WHEN a.v::numeric = a.w::numeric THEN 0 ELSE 1 END \
                 WHEN jsonb_typeof(a.v) = 'string' AND jsonb_typeof(a.w) = 'string' THEN \
                     CASE WHEN (a.v #>> '{{}}') COLLATE \"C\" < (a.w #>> '{{}}') COLLATE \"C\" THEN -1 \
                          WHEN (a.v #>> '{{}}') = (a.w #>> '{{}}') THEN 0 ELSE 1 END \
                 END AS ord) o \
             WHERE NOT coalesce(CASE p.x->>'op' \
                 WHEN 'changed' THEN jsonb_typeof(r.b->'changed') = 'array' \
                                     AND (r.b->'changed') ? (p.x->'path'->>1) \
                 WHEN 'is_null' THEN (a.v IS NULL) = (a.w)::boolean \
                 ELSE a.v IS NOT NULL AND CASE p.x->>'op' \
                     WHEN 'eq' THEN a.v = a.w \
                     WHEN 'neq' THEN a.v <> a.w \
                     WHEN 'in' THEN EXISTS (SELECT 1 FROM jsonb_array_elements(a.w) e(y) WHERE e.y = a.v) \
                     WHEN 'nin' THEN NOT EXISTS (SELECT 1 FROM jsonb_array_elements(a.w) e(y) WHERE e.y = a.v) \
                     WHEN 'lt' THEN o.ord < 0 \
                     WHEN 'lte' THEN o.ord <= 0 \
                     WHEN 'gt' THEN o.ord > 0 \
                     WHEN 'gte' THEN o.ord >= 0 \
                     WHEN 'contains' THEN CASE \
                         WHEN jsonb_typeof(a.v) = 'string' AND jsonb_typeof(a.w) = 'string' \
                             THEN strpos(a.v #>> '{{}}', a.w #>> '{{}}') > 0 \
                         WHEN jsonb_typeof(a.v) = 'array' \
                             THEN EXISTS (SELECT 1 FROM jsonb_array_elements(a.v) e(y) WHERE e.y = a.w) \
                         ELSE false END \
                     END \
                 END, false)))",
        any = p(0),
        types = p(1),
        entities = p(2),
        actions = p(3),
        orgs = p(4),
        domains = p(5),
        severity = p(6),
        predicates = p(7),
    )
}

impl Filter {
    /// The filter as the parameters of [`sql_condition`].
    pub fn sql(&self) -> SqlFilter {
        let mut sql = SqlFilter {
            any_type: self.types.is_empty(),
            types: Vec::new(),
            entities: Vec::new(),
            actions: Vec::new(),
            organizations: self.organizations.clone(),
            domains: self.domains.clone(),
            severity: self.severity.rank(),
            predicates: None,
        };
        if !self.predicates.is_empty() {
            let list: Vec<Value> = self
                .predicates
                .iter()
                .map(|predicate| {
                    let side = match predicate.side() {
                        Side::Data => "data",
                        Side::Old => "old",
                    };
                    let path: Vec<&str> = std::iter::once(side)
                        .chain(predicate.path().iter().map(String::as_str))
                        .collect();
                    let (op, value) = match predicate.op() {
                        Op::Eq(x) => ("eq", x.clone()),
                        Op::Neq(x) => ("neq", x.clone()),
                        Op::In(xs) => ("in", Value::Array(xs.clone())),
                        Op::Nin(xs) => ("nin", Value::Array(xs.clone())),
                        Op::Lt(x) => ("lt", x.clone()),
                        Op::Lte(x) => ("lte", x.clone()),
                        Op::Gt(x) => ("gt", x.clone()),
                        Op::Gte(x) => ("gte", x.clone()),
                        Op::IsNull(b) => ("is_null", Value::Bool(*b)),
                        Op::Contains(x) => ("contains", x.clone()),
                        Op::Changed => ("changed", Value::Null),
                    };
                    json!({"path": path, "op": op, "value": value})
                })
                .collect();
            sql.predicates = Some(Value::Array(list).to_string());
        }
        for pattern in &self.types {
            match pattern {
                Pattern::Any => sql.any_type = true,
                Pattern::Entity(e) => sql.entities.push(e.clone()),
                Pattern::Action(a) => sql.actions.push(a.clone()),
                Pattern::Exact(t) => sql.types.push(t.clone()),
            }
        }
        sql
    }
}
