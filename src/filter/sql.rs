//! A filter as SQL: the same filter that matches live events selects history, so the two can
//! never drift apart.

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
}

impl SqlFilter {
    /// The parameters of [`sql_condition`], in its order.
    pub fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 7] {
        [
            &self.any_type,
            &self.types,
            &self.entities,
            &self.actions,
            &self.organizations,
            &self.domains,
            &self.severity,
        ]
    }
}

/// The `WHERE` fragment matching [`SqlFilter`] given as parameters `$first..$first+6`, in the
/// order of its fields.
pub fn sql_condition(first: usize) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "({any} OR type = ANY({types}) OR split_part(type, '.', 1) = ANY({entities}) \
         OR split_part(type, '.', 2) = ANY({actions})) \
         AND ({orgs}::text[] IS NULL OR organization_id = ANY({orgs})) \
         AND ({domains}::text[] IS NULL OR domain_id = ANY({domains})) \
         AND severity >= {severity}",
        any = p(0),
        types = p(1),
        entities = p(2),
        actions = p(3),
        orgs = p(4),
        domains = p(5),
        severity = p(6),
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
        };
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
