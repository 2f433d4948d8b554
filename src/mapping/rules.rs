//! The rule that turns one row change into its events: the plain `<entity>.<action>`, then the
//! extra events whose triggers fire, all with the same (redacted) data. Pure.

use std::borrow::Cow;

use serde_json::Value;

use super::{Entity, ExtraEvent, Trigger};
use crate::model::{Change, Event, Op, Row, Severity, Source};

/// A column value as the text a `becomes` value or a scope is taken from.
fn value_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(Cow::Borrowed(s)),
        other => Some(Cow::Owned(other.to_string())),
    }
}

impl Entity {
    /// The events one row change produces: the plain one, then the extra ones in declaration
    /// order, all with the same data. Ids are assigned by the log.
    pub fn events(&self, change: Change) -> Vec<Event> {
        let Change { table, op, new, old, timestamp, lsn, xid } = change;
        let (data, old) = match op {
            Op::Insert => (new, None),
            Op::Update => (new, old),
            // A delete's data is the row it removed.
            Op::Delete => (old.clone(), old),
            Op::Truncate => (None, None),
        };
        let scope = |column: &Option<String>| {
            let value = data.as_ref()?.get(column.as_deref()?)?;
            value_text(value).map(Cow::into_owned)
        };
        let changed = match (op, &data, &old) {
            (Op::Update, Some(new), Some(old)) => Some(self.changed_columns(old, new)),
            _ => None,
        };
        let fired: Vec<&ExtraEvent> = self
            .events
            .iter()
            .filter(|extra| fires(extra, op, data.as_ref(), old.as_ref()))
            .collect();
        let plain = Event {
            id: 0,
            event_type: format!("{}.{}", self.name, op.action()),
            timestamp,
            organization_id: scope(&self.organization),
            domain_id: scope(&self.domain),
            severity: Severity::Info,
            data: data.map(|row| self.redacted(row)),
            old: old.map(|row| self.redacted(row)),
            changed,
            source: Source::Row {
                table: table.to_string(),
                op,
                lsn: lsn.map(crate::pg::format_lsn),
                xid,
            },
        };
        let mut events = Vec::with_capacity(1 + fired.len());
        events.push(plain);
        for extra in fired {
            let mut event = events[0].clone();
            event.event_type = format!("{}.{}", self.name, extra.action);
            event.severity = extra.severity;
            events.push(event);
        }
        events
    }

    /// Sorted names of the visible columns whose values differ.
    fn changed_columns(&self, old: &Row, new: &Row) -> Vec<String> {
        let mut names: Vec<String> = new
            .iter()
            .filter(|(name, value)| !self.redact.contains(name) && old.get(*name) != Some(value))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    fn redacted(&self, mut row: Row) -> Row {
        if !self.redact.is_empty() {
            row.retain(|name, _| !self.redact.contains(name));
        }
        row
    }
}

/// Whether an extra event fires for this change.
fn fires(extra: &ExtraEvent, op: Op, new: Option<&Row>, old: Option<&Row>) -> bool {
    fn get<'a>(row: Option<&'a Row>, column: &str) -> Option<&'a Value> {
        row?.get(column)
    }
    let text = |row, column| get(row, column).and_then(value_text);
    match (&extra.trigger, op) {
        (Trigger::Changed(column), Op::Update) => {
            old.is_some() && get(new, column) != get(old, column)
        }
        (Trigger::Becomes { column, value }, Op::Insert) => {
            text(new, column).as_deref() == Some(value)
        }
        (Trigger::Becomes { column, value }, Op::Update) => {
            old.is_some()
                && text(new, column).as_deref() == Some(value)
                && text(old, column).as_deref() != Some(value)
        }
        _ => false,
    }
}
