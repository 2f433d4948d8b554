use proptest::prelude::*;
use serde_json::json;

use super::condition::parse_time;
use super::*;
use crate::model::{Severity, Timestamp};

fn one(sql: &str) -> Statement {
    let mut statements = parse(sql).unwrap_or_else(|err| panic!("{sql}: {err}"));
    assert_eq!(statements.len(), 1, "{sql}");
    statements.remove(0)
}

fn select(sql: &str) -> Select {
    match one(sql) {
        Statement::Select(select) => select,
        other => panic!("{sql}: {other:?}"),
    }
}

fn refused(sql: &str) -> String {
    match parse(sql) {
        Err(Unsupported(message)) => message,
        Ok(statements) => panic!("{sql} was accepted: {statements:?}"),
    }
}

fn filter(value: serde_json::Value) -> Filter {
    Filter::from_json(Some(&value)).expect("filter")
}

#[test]
fn a_plain_select_reads_every_column_in_id_order() {
    let select = select("SELECT * FROM events");
    assert_eq!(select.columns, Column::ALL.to_vec());
    assert_eq!(select.limit, None);
    assert_eq!(select.conditions.filter, filter(json!({})));
    assert_eq!(select.conditions.after, 0);
    assert!(select.conditions.severities.is_minimum());
}

#[test]
fn section_5_filters_read_as_sql() {
    let select = select(
        "select id, type, data from events
          where type like 'agent.%' and organization_id in ('quant', 'ops')
            and domain_id = 'd1' and severity >= 'warning'
            and data->>'status' = 'failed' and old->>'status' <> 'failed'
            and data->'spec'->>'cpu' > 2 and data->>'env' in ('prod', 'staging')
            and data->>'note' is null and data->>'name' like '%bot%' and changed ? 'status'
          order by id asc limit 50;",
    );
    assert_eq!(select.columns, vec![Column::Id, Column::Type, Column::Data]);
    assert_eq!(select.limit, Some(50));
    assert_eq!(
        select.conditions.filter,
        filter(json!({
            "type": ["agent.*"],
            "organization_id": ["quant", "ops"],
            "domain_id": ["d1"],
            "severity": "warning",
            "where": [
                ["status", "eq", "failed"],
                ["old.status", "neq", "failed"],
                ["spec.cpu", "gt", 2],
                ["env", "in", ["prod", "staging"]],
                ["note", "is_null", true],
                ["name", "contains", "bot"],
                ["status", "changed"],
            ],
        }))
    );
}

#[test]
fn ids_and_times_become_the_range_read() {
    let c = select(
        "SELECT * FROM events WHERE id > 10 AND id <= 20 AND timestamp >= '2026-01-01T00:00:00Z'
            AND timestamp < '2026-01-02 00:00:00+00'",
    )
    .conditions;
    assert_eq!((c.after, c.up_to), (10, Some(20)));
    assert_eq!(
        c.from.map(Timestamp::from_system_time),
        Timestamp::parse_rfc3339("2026-01-01T00:00:00Z")
    );
    assert_eq!(
        c.to.map(Timestamp::from_system_time),
        Timestamp::parse_rfc3339("2026-01-02T00:00:00Z")
    );
    let c = select("SELECT * FROM events WHERE id BETWEEN 5 AND 7 AND id >= 6").conditions;
    assert_eq!((c.after, c.up_to), (5, Some(7)));
    let c = select("SELECT * FROM events WHERE id = 0").conditions;
    assert_eq!((c.after, c.up_to), (0, Some(0)));
    let c = select("SELECT * FROM events WHERE timestamp > TIMESTAMPTZ '2026-01-01T00:00:00Z'")
        .conditions;
    let at = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").map(|t| Timestamp(t.0 + 1));
    assert_eq!(c.from.map(Timestamp::from_system_time), at);
}

#[test]
fn severities_beyond_a_minimum_are_checked_per_row() {
    let c = select("SELECT * FROM events WHERE severity IN ('error', 'info')").conditions;
    assert_eq!(c.filter, filter(json!({"severity": "info"})));
    assert!(!c.severities.is_minimum());
    assert!(c.severities.allows(Severity::Error) && c.severities.allows(Severity::Info));
    assert!(!c.severities.allows(Severity::Warning) && !c.severities.allows(Severity::Critical));
    let c = select("SELECT * FROM events WHERE severity > 'warning'").conditions;
    assert_eq!(c.filter, filter(json!({"severity": "error"})));
    assert!(c.severities.is_minimum());
}

#[test]
fn organizations_named_twice_narrow() {
    let c = select(
        "SELECT * FROM events WHERE organization_id IN ('a', 'b') AND organization_id = 'b'",
    )
    .conditions;
    assert_eq!(c.filter, filter(json!({"organization_id": ["b"]})));
}

#[test]
fn subscribe_reads_its_filter_and_since() {
    let statement = one(
        "COPY (SUBSCRIBE TO events WHERE type = 'agent.created' AND data->>'x' = 1 SINCE 42) TO STDOUT",
    );
    let Statement::Subscribe(subscribe) = statement else { panic!("{statement:?}") };
    assert_eq!(subscribe.since, Some(42));
    assert_eq!(
        subscribe.filter,
        filter(json!({"type": ["agent.created"], "where": [["x", "eq", 1]]}))
    );
    let Statement::Subscribe(plain) = one("copy (subscribe events) to stdout") else { panic!() };
    assert_eq!((plain.since, plain.filter), (None, Filter::all()));
}

#[test]
fn session_commands_are_accepted() {
    let statements = parse("BEGIN; SET extra_float_digits = 3; COMMIT; ROLLBACK").expect("parse");
    assert_eq!(
        statements,
        vec![
            Statement::Session(Session::Begin),
            Statement::Session(Session::Set),
            Statement::Session(Session::Commit),
            Statement::Session(Session::Rollback),
        ]
    );
    assert_eq!(parse(" ; ").expect("empty"), vec![]);
}

#[test]
fn everything_else_is_named_in_the_refusal() {
    let cases = [
        ("SELECT count(*) FROM events", "count"),
        ("SELECT * FROM agents", "agents"),
        ("SELECT * FROM events WHERE type = 'a.b' OR type = 'c.d'", "OR"),
        ("SELECT * FROM events ORDER BY id DESC", "DESC"),
        ("SELECT * FROM events ORDER BY type", "ORDER BY"),
        ("SELECT * FROM events LIMIT 5 OFFSET 2", "OFFSET"),
        ("SELECT * FROM events WHERE colour = 'red'", "colour"),
        ("SELECT * FROM events WHERE data->>'a' ~ 'x'", "~"),
        ("SELECT * FROM events WHERE type LIKE 'ag%'", "ag%"),
        ("SELECT * FROM events WHERE type = 'a.*'", "LIKE"),
        ("SELECT * FROM events WHERE severity = 'loud'", "loud"),
        ("SELECT * FROM events WHERE data->>'a' = NULL", "IS NULL"),
        ("SELECT * FROM events WHERE type = 'a.b' AND type LIKE 'a.%'", "twice"),
        ("DELETE FROM events", "DELETE"),
        ("COPY events TO STDOUT", "COPY"),
        ("COPY (SUBSCRIBE TO events WHERE id > 5) TO STDOUT", "SINCE"),
        ("SUBSCRIBE TO events", "COPY"),
        ("SELECT * FROM events WHERE", "condition"),
        ("SELECT 'unterminated", "could not read"),
    ];
    for (sql, named) in cases {
        let message = refused(sql);
        assert!(message.contains(named), "{sql}: {message}");
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let deep = format!("SELECT * FROM events WHERE {}id = 1{}", "(".repeat(5000), ")".repeat(5000));
    refused(&deep);
    // Past the byte limit: refused before parsing.
    let long = format!("SELECT * FROM events WHERE {}id > 1", "id > 1 AND ".repeat(10_000));
    assert!(long.len() > super::MAX_SQL_BYTES);
    refused(&long);
    // Under it, chains as deep as a tree can be: refused for their length, not overflowed (a
    // 64 KiB AND chain overflowed a 2 MiB stack, a tokio worker's size).
    let chain = format!("SELECT * FROM events WHERE {}id > 1", "id > 1 AND ".repeat(5_900));
    assert!(chain.len() <= super::MAX_SQL_BYTES);
    assert!(refused(&chain).contains("operators"));
    // The longest chains the limit lets through are parsed and compiled on this test thread's
    // 2 MiB stack: conditions, and arithmetic (which sqlparser parses recursively).
    let levels = super::MAX_OPERATORS / 2 - 1;
    let ands = format!("SELECT * FROM events WHERE {}id > 1", "id > 1 AND ".repeat(levels));
    parse(&ands).expect("a long AND chain");
    let sums =
        format!("SELECT * FROM events WHERE id > {}1", "1 + ".repeat(super::MAX_OPERATORS - 1));
    let _ = parse(&sums);
}

proptest! {
    #[test]
    fn no_text_panics_the_parser(sql in "\\PC{0,200}") {
        let _ = parse(&sql);
    }

    #[test]
    fn no_time_text_panics(text in "\\PC{0,40}", tail in "[0-9:+. TZ-]{0,12}") {
        let _ = parse_time(&text);
        let _ = parse_time(&format!("2026-01-01 00:00:{tail}"));
        let _ = parse_time(&format!("2026-01-01T00:00:00{tail}"));
    }

    #[test]
    fn mutated_statements_never_panic(
        cut in 0usize..120,
        insert in "[ ()'\"%;*,<>=!?:.$a-z0-9-]{0,6}",
    ) {
        let base = "SELECT id, data FROM events WHERE type LIKE 'agent.%' AND data->'a'->>'b' IN (1, 'x') AND timestamp BETWEEN '2026-01-01T00:00:00Z' AND '2027-01-01T00:00:00Z' LIMIT 3";
        let cut = base.char_indices().map(|(i, _)| i).nth(cut % base.len()).unwrap_or(0);
        let sql = format!("{}{insert}{}", &base[..cut], &base[cut..]);
        let _ = parse(&sql);
    }
}

#[test]
fn parameters_are_bound_as_literals_never_as_sql() {
    use sqlparser::tokenizer::Token;
    use tokio_postgres::types::Type;
    let prepared = prepare("SELECT id FROM events WHERE id > $1 AND data->>'name' = $2 LIMIT $3")
        .expect("prepare")
        .expect("a statement");
    assert_eq!(prepared.types, vec![Type::INT8, Type::TEXT, Type::INT8]);
    let Statement::Select(shape) = &prepared.shape else { panic!("{:?}", prepared.shape) };
    assert_eq!(shape.columns, vec![Column::Id]);
    let values = [
        Token::Number("5".into(), false),
        Token::SingleQuotedString("x' OR 1=1 --".into()),
        Token::Number("2".into(), false),
    ];
    assert_eq!(
        prepared.bind(&values).expect("bind"),
        one("SELECT id FROM events WHERE id > 5 AND data->>'name' = 'x'' OR 1=1 --' LIMIT 2")
    );
    assert!(prepared.bind(&values[..2]).is_err());
    let plain = prepare("SELECT * FROM events").expect("prepare").expect("a statement");
    assert_eq!(plain.bind(&[]).expect("bind"), one("SELECT * FROM events"));
    assert_eq!(prepare(" ; ").expect("empty"), None);
    assert!(refused("SELECT * FROM events WHERE id > $1").contains("simple query"));
    assert!(prepare("SELECT * FROM events WHERE id > $0").is_err());
    assert!(prepare("SELECT * FROM events WHERE id > $99999999999").is_err());
    assert!(prepare("SELECT 1; SELECT 2").is_err());
}
