//! Event type patterns: `*`, `entity.*`, `*.action`, `entity.action`.

use super::FilterError;

/// One type pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `*`
    Any,
    /// `entity.*`
    Entity(String),
    /// `*.action`
    Action(String),
    /// `entity.action`
    Exact(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let invalid = || {
            FilterError::new(format!(
                "type pattern {text:?} is not one of *, entity.*, *.action or entity.action"
            ))
        };
        if text == "*" || text == "*.*" {
            return Ok(Pattern::Any);
        }
        let (entity, action) = text.split_once('.').ok_or_else(invalid)?;
        let word =
            |w: &str| !w.is_empty() && !w.contains(['*', '.']) && !w.contains(char::is_whitespace);
        match (entity, action) {
            ("*", action) if word(action) => Ok(Pattern::Action(action.to_owned())),
            (entity, "*") if word(entity) => Ok(Pattern::Entity(entity.to_owned())),
            (entity, action) if word(entity) && word(action) => Ok(Pattern::Exact(text.to_owned())),
            _ => Err(invalid()),
        }
    }

    pub fn matches(&self, kind: &str) -> bool {
        let (entity, action) = kind.split_once('.').unwrap_or((kind, ""));
        match self {
            Pattern::Any => true,
            Pattern::Entity(e) => e == entity,
            Pattern::Action(a) => a == action,
            Pattern::Exact(t) => t == kind,
        }
    }

    pub(super) fn text(&self) -> String {
        match self {
            Pattern::Any => "*".into(),
            Pattern::Entity(e) => format!("{e}.*"),
            Pattern::Action(a) => format!("*.{a}"),
            Pattern::Exact(t) => t.clone(),
        }
    }
}
