use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::filter::{Filter, Subject};
use crate::model::Severity;

fn parse(value: Value) -> Result<Predicate, FilterError> {
    Predicate::from_json(&value)
}

fn error(value: Value) -> String {
    parse(value).expect_err("refused").to_string()
}

#[test]
fn json_and_query_forms_agree() {
    let pairs = [
        (json!(["status", "eq", "failed"]), "status:eq:failed"),
        (json!(["status", "in", ["failed", "error"]]), "status:in:failed,error"),
        (json!(["status", "changed"]), "status:changed"),
        (json!(["old.status", "neq", "failed"]), "old.status:neq:failed"),
        (json!(["meta.attempts", "gte", 3]), "meta.attempts:gte:3"),
        (json!(["price", "lt", 2.5]), "price:lt:2.5"),
        (json!(["note", "is_null", true]), "note:is_null:true"),
        (json!(["url", "contains", "http://x"]), "url:contains:http://x"),
    ];
    for (from_json, query) in pairs {
        let a = parse(from_json.clone()).expect("valid json form");
        assert_eq!(Predicate::from_query(query), Ok(a.clone()), "{query}");
        assert_eq!(a.to_json(), from_json);
    }
    let p = parse(json!(["old.meta.attempts", "gt", 1])).expect("valid");
    assert_eq!(
        (p.side(), p.path(), p.column()),
        (Side::Old, &["meta".into(), "attempts".into()][..], "meta")
    );
}

#[test]
fn bad_predicates_say_what_is_wrong() {
    assert!(error(json!(["status", "like", "x"])).contains("\"like\" is not one of"));
    assert!(error(json!("status")).contains("[path, operator"));
    assert!(error(json!(["status"])).contains("[path, operator"));
    assert!(error(json!(["status", "eq", 1, 2])).contains("[path, operator"));
    assert!(error(json!([5, "eq", 1])).contains("[path, operator"));
    for path in ["", ".", "a..b", "old.", "a.", ".a"] {
        assert!(error(json!([path, "eq", 1])).contains("column names"), "{path:?}");
    }
    assert!(error(json!(["a.b.c.d.e.f.g.h.i", "eq", 1])).contains("deeper"));
    assert!(error(json!(["status", "eq"])).contains("must be a string, a number"));
    assert!(error(json!(["status", "eq", null])).contains("is_null"));
    assert!(error(json!(["status", "eq", [1]])).contains("must be a string, a number"));
    assert!(error(json!(["status", "lt", true])).contains("a string or a number"));
    assert!(error(json!(["status", "in", []])).contains("non-empty list"));
    assert!(error(json!(["status", "in", "x"])).contains("non-empty list"));
    assert!(error(json!(["status", "in", [{"a": 1}]])).contains("a string, a number"));
    assert!(error(json!(["status", "is_null", "yes"])).contains("true or false"));
    assert!(error(json!(["status", "changed", 1])).contains("absent"));
    assert!(error(json!(["old.status", "changed"])).contains("column name"));
    assert!(error(json!(["a.b", "changed"])).contains("column name"));
    let query = |q: &str| Predicate::from_query(q).expect_err("refused").to_string();
    assert!(query("status").contains("path:operator"));
    assert!(query("status:like:x").contains("\"like\""));
    assert!(query(":eq:x").contains("column names"));
    assert!(query("status:eq").contains("must be"));
    assert!(query("status:is_null:maybe").contains("true or false"));
    // In a filter, the list and its size are checked too.
    let filter =
        |v: Value| Filter::from_json(Some(&json!({"where": v}))).map_err(|e| e.to_string());
    assert!(filter(json!({"status": "x"})).expect_err("refused").contains("filter.where"));
    let many: Vec<Value> = (0..=MAX_PREDICATES).map(|_| json!(["a", "eq", 1])).collect();
    assert!(filter(json!(many)).expect_err("refused").contains("at most"));
    assert!(Filter::from_query([("where", "x:bogus")]).is_err());
}

#[test]
fn query_values_are_typed_by_their_text() {
    let p = Predicate::from_query("n:in:1,two,true,2.5").expect("valid");
    assert_eq!(p.op(), &Op::In(vec![json!(1), json!("two"), json!(true), json!(2.5)]));
    // The value keeps its colons.
    assert_eq!(Predicate::from_query("t:eq:10:15").expect("valid").op(), &Op::Eq(json!("10:15")));
    // Quotes make a string of what would be a number or a boolean.
    assert_eq!(Predicate::from_query(r#"id:eq:"404""#).expect("valid").op(), &Op::Eq(json!("404")));
    let p = Predicate::from_query(r#"n:in:"1",1,"true""#).expect("valid");
    assert_eq!(p.op(), &Op::In(vec![json!("1"), json!(1), json!("true")]));
    // An unbalanced quote is just text.
    assert_eq!(Predicate::from_query(r#"n:eq:"4"#).expect("valid").op(), &Op::Eq(json!("\"4")));
}

#[test]
fn filter_echoes_and_matches_predicates() {
    let filter = Filter::from_json(Some(&json!({
        "type": "job.*",
        "where": [["status", "eq", "failed"], ["old.status", "neq", "failed"]]
    })))
    .expect("valid");
    assert_eq!(
        filter.to_json()["where"],
        json!([["status", "eq", "failed"], ["old.status", "neq", "failed"]])
    );
    assert_eq!(Filter::from_json(Some(&filter.to_json())), Ok(filter.clone()));
    let text = r#"{"type":"job.updated","data":{"status":"failed"},"old":{"status":"running"}}"#;
    let envelope = Envelope::new(text);
    let mut subject = Subject {
        event_type: "job.updated",
        organization_id: None,
        domain_id: None,
        severity: Severity::Info,
        envelope: Some(&envelope),
    };
    assert!(filter.matches(&subject));
    let repeat = Envelope::new(r#"{"data":{"status":"failed"},"old":{"status":"failed"}}"#);
    subject.envelope = Some(&repeat);
    assert!(!filter.matches(&subject));
    // Without the envelope (or with a broken one) no predicate holds.
    subject.envelope = None;
    assert!(!filter.matches(&subject));
    let broken = Envelope::new("{not json");
    subject.envelope = Some(&broken);
    assert!(!filter.matches(&subject));
    // A filter without predicates never parses the envelope.
    let lazy = Envelope::new("{not json");
    subject.envelope = Some(&lazy);
    assert!(Filter::all().matches(&subject));
    assert!(lazy.parsed.get().is_none());
}

#[test]
fn missing_and_null_match_only_is_null_true() {
    let envelope = json!({"data": {"a": null, "n": {"b": 1}}, "old": null});
    for path in ["a", "missing", "n.c", "n.b.c", "old.a"] {
        let holds = |op: &str, value: Option<Value>| {
            let mut entry = vec![json!(path), json!(op)];
            entry.extend(value);
            parse(Value::Array(entry)).expect("valid").matches(&envelope)
        };
        assert!(holds("is_null", Some(json!(true))), "{path}");
        assert!(!holds("is_null", Some(json!(false))), "{path}");
        for (op, value) in [
            ("eq", json!(1)),
            ("neq", json!(1)),
            ("nin", json!([1])),
            ("lt", json!(5)),
            ("contains", json!("x")),
        ] {
            assert!(!holds(op, Some(value)), "{path} {op}");
        }
    }
}

#[test]
fn numbers_compare_as_numbers_and_strings_as_strings() {
    let envelope = json!({"data": {"n": 10, "s": "10", "f": 2.5, "big": 18446744073709551615u64, "tags": ["a", 3]}});
    let holds = |v: Value| parse(v).expect("valid").matches(&envelope);
    assert!(holds(json!(["n", "gt", 9])));
    assert!(holds(json!(["n", "eq", 10.0])));
    assert!(!holds(json!(["n", "eq", "10"])));
    assert!(holds(json!(["n", "neq", "10"])));
    assert!(!holds(json!(["n", "lt", "9"])) && !holds(json!(["n", "gte", "9"])));
    assert!(holds(json!(["s", "lt", "9"])), "strings order by text");
    assert!(holds(json!(["f", "lt", 3])) && holds(json!(["f", "gte", 2.5])));
    assert!(holds(json!(["big", "gt", 18446744073709551614u64])));
    assert!(holds(json!(["tags", "contains", 3])) && holds(json!(["tags", "contains", "a"])));
    assert!(!holds(json!(["tags", "contains", "3"])));
    assert!(holds(json!(["s", "contains", "0"])) && !holds(json!(["n", "contains", 1])));
}

#[test]
fn changed_reads_the_changed_list() {
    let update = json!({"data": {"status": null}, "changed": ["status"]});
    let p = parse(json!(["status", "changed"])).expect("valid");
    assert!(p.matches(&update));
    assert!(!parse(json!(["other", "changed"])).expect("valid").matches(&update));
    assert!(!p.matches(&json!({"data": {"status": "x"}})));
}

// The reference: the SPEC's words, written as plainly as possible.
fn reference(path: &str, op: &str, operand: &Value, envelope: &Value) -> bool {
    if op == "changed" {
        return envelope["changed"].as_array().is_some_and(|c| c.contains(&json!(path)));
    }
    let (row, keys) = match path.strip_prefix("old.") {
        Some(rest) => (&envelope["old"], rest),
        None => (&envelope["data"], path),
    };
    let mut value = Some(row);
    for key in keys.split('.') {
        value = value.and_then(|v| v.as_object()).and_then(|o| o.get(key));
    }
    let value = value.filter(|v| !v.is_null());
    if op == "is_null" {
        return operand.as_bool() == Some(value.is_none());
    }
    let Some(value) = value else { return false };
    let num = |v: &Value| v.as_f64().filter(|_| v.is_number());
    let same = |a: &Value, b: &Value| match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => (a.is_string() || a.is_boolean()) && a == b,
    };
    let order = |a: &Value, b: &Value| match (num(a), num(b), a.as_str(), b.as_str()) {
        (Some(x), Some(y), _, _) => x.partial_cmp(&y),
        (_, _, Some(x), Some(y)) => Some(x.cmp(y)),
        _ => None,
    };
    let list = || operand.as_array().cloned().unwrap_or_default();
    match op {
        "eq" => same(value, operand),
        "neq" => !same(value, operand),
        "in" => list().iter().any(|x| same(value, x)),
        "nin" => !list().iter().any(|x| same(value, x)),
        "lt" => order(value, operand).is_some_and(|o| o.is_lt()),
        "lte" => order(value, operand).is_some_and(|o| o.is_le()),
        "gt" => order(value, operand).is_some_and(|o| o.is_gt()),
        "gte" => order(value, operand).is_some_and(|o| o.is_ge()),
        "contains" => match (value, operand) {
            (Value::String(s), Value::String(p)) => s.contains(p.as_str()),
            (Value::Array(items), x) => items.iter().any(|i| same(i, x)),
            _ => false,
        },
        _ => unreachable!("generated operators only"),
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..4).prop_map(Value::from),
        prop::sample::select(&[0.5, 1.0, -2.5, 3.0][..]).prop_map(Value::from),
        prop::sample::select(&["", "a", "ab", "b", "B", "1", "10", "2", "é"][..])
            .prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
    ]
}

fn cell() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![Just(Value::Null), scalar(), scalar(), scalar()];
    leaf.prop_recursive(2, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::vec((prop::sample::select(&["a", "b"][..]), inner), 0..3).prop_map(
                |kv| { Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()) }
            ),
        ]
    })
}

fn row() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        prop::collection::vec((prop::sample::select(&["a", "b", "c"][..]), cell()), 0..4).prop_map(
            |kv| { Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()) }
        ),
    ]
}

fn envelope() -> impl Strategy<Value = Value> {
    (row(), row(), prop::option::of(prop::sample::subsequence(&["a", "b", "c"][..], 0..3)))
        .prop_map(|(data, old, changed)| {
            let mut envelope = json!({"data": data, "old": old});
            if let Some(changed) = changed {
                envelope["changed"] = json!(changed);
            }
            envelope
        })
}

fn entry() -> impl Strategy<Value = (String, String, Value)> {
    let path = prop::sample::select(
        &["a", "b", "c", "a.a", "a.b", "b.a.b", "old.a", "old.b", "old.a.b"][..],
    );
    let op = prop::sample::select(
        &["eq", "neq", "in", "nin", "lt", "lte", "gt", "gte", "is_null", "contains", "changed"][..],
    );
    (path, op, scalar(), prop::collection::vec(scalar(), 1..4)).prop_map(|(path, op, x, xs)| {
        let operand = match op {
            "in" | "nin" => Value::from(xs),
            "is_null" => Value::Bool(x.as_bool().unwrap_or(x.is_number())),
            "changed" => Value::Null,
            _ => x,
        };
        (path.to_owned(), op.to_owned(), operand)
    })
}

proptest! {
    /// Every operator over random rows (missing keys, nulls, nesting, numbers beside strings)
    /// agrees with the reference, and a filter of several holds exactly when all do.
    #[test]
    fn matching_agrees_with_the_reference(envelope in envelope(), entries in prop::collection::vec(entry(), 1..4)) {
        let mut all = true;
        let mut predicates = Vec::new();
        for (path, op, operand) in &entries {
            let mut form = vec![json!(path), json!(op)];
            if op != "changed" {
                form.push(operand.clone());
            }
            let parsed = parse(Value::Array(form.clone()));
            let predicate = match parsed {
                Ok(p) => p,
                // Only `changed` on old. or nested paths and ordering on booleans are refused.
                Err(_) => {
                    prop_assert!((op == "changed" && path.contains('.')) || op.starts_with('l') || op.starts_with('g'));
                    continue;
                }
            };
            let expected = reference(path, op, operand, &envelope);
            prop_assert_eq!(predicate.matches(&envelope), expected, "{:?} on {}", form, envelope);
            all &= expected;
            predicates.push(Value::Array(form));
        }
        let filter = Filter::from_json(Some(&json!({"where": predicates}))).expect("valid entries");
        let text = envelope.to_string();
        let wrapped = Envelope::new(&text);
        let subject = Subject { event_type: "x.updated", organization_id: None, domain_id: None, severity: Severity::Info, envelope: Some(&wrapped) };
        prop_assert_eq!(filter.matches(&subject), all);
        prop_assert_eq!(Filter::from_json(Some(&filter.to_json())), Ok(filter));
    }

    /// Any query text: a predicate or an error, never a panic.
    #[test]
    fn the_query_parser_never_panics(text in "\\PC{0,24}") {
        let _ = Predicate::from_query(&text);
    }
}

#[test]
fn redacted_columns_cannot_be_filtered_on() {
    let mapping = crate::mapping::Mapping::builtin();
    let check = |filter: Value| {
        Filter::from_json(Some(&filter)).expect("valid").check_redactions(mapping.redactions())
    };
    let refused = check(json!({"where": [["password_hash", "is_null", false]]}));
    assert!(refused.expect_err("refused").to_string().contains("redacted"));
    let refused = check(json!({"type": "user.*", "where": [["old.password_hash.x", "eq", 1]]}));
    assert!(refused.is_err());
    // Entities that do not redact it may still be filtered on it.
    assert!(check(json!({"type": "agent.*", "where": [["password_hash", "eq", "x"]]})).is_ok());
    assert!(check(json!({"where": [["name", "eq", "x"]]})).is_ok());
}

#[test]
fn numbers_compare_by_exact_decimal_value() {
    use super::Decimal;
    let order = |a: &str, b: &str| Decimal::parse(a).expect(a).cmp(&Decimal::parse(b).expect(b));
    for (a, b) in [
        ("1", "1.0"),
        ("0", "-0.000"),
        ("100", "1e2"),
        ("1.5E+3", "1500"),
        ("0.00120", "12e-4"),
        ("-7.10", "-71E-1"),
    ] {
        assert_eq!(order(a, b), Ordering::Equal, "{a} = {b}");
    }
    for (a, b) in [
        ("0.1", "0.10000000000000001"),
        ("0.3", "0.30000000000000004"),
        ("9007199254740992", "9007199254740993"),
        ("-1", "0"),
        ("-2", "-1.99999999999999999999"),
        ("0", "1e-400"),
        ("1e400", "1e401"),
        ("0.99", "1"),
        ("12", "123"),
        ("13", "123"),
    ] {
        assert_eq!(order(a, b), Ordering::Less, "{a} < {b}");
        assert_eq!(order(b, a), Ordering::Greater, "{b} > {a}");
    }
    for junk in ["", "-", "1.", ".5", "1e", "1x", "--1", "1e9999999999999999999999"] {
        assert_eq!(Decimal::parse(junk), None, "{junk:?}");
    }
    // Through the predicates, as a where on a numeric column sees them.
    let envelope: Value =
        serde_json::from_str(r#"{"data":{"price":0.30000000000000001}}"#).expect("json");
    let holds = |entry: Value| Predicate::from_json(&entry).expect("valid").matches(&envelope);
    // As floats both are 0.3.
    let entry = |op: &str, value: &str| {
        serde_json::from_str::<Value>(&format!(r#"["price", "{op}", {value}]"#)).expect("entry")
    };
    assert!(!holds(entry("eq", "0.3")));
    assert!(holds(entry("gt", "0.3")));
    assert!(holds(entry("eq", "0.300000000000000010")));
}

proptest! {
    /// `m1e{x1}` against `m2e{x2}` in any spelling orders as the exact values do.
    #[test]
    fn decimal_order_is_the_order_of_the_values(
        m1 in -99_999i64..99_999, x1 in -6i32..6, m2 in -99_999i64..99_999, x2 in -6i32..6,
        spelling in 0u8..3,
    ) {
        use super::Decimal;
        // Both scaled to 10^-12 exactly: |m| < 1e5, x in [-6, 6) fits i128 easily.
        let exact = |m: i64, x: i32| i128::from(m) * 10i128.pow((x + 12) as u32);
        let spell = |m: i64, x: i32| match spelling {
            0 => format!("{m}e{x}"),
            1 => format!("{m}.000E{x:+}"),
            _ => {
                // Plain decimal notation.
                let scaled = exact(m, x);
                let sign = if scaled < 0 { "-" } else { "" };
                let digits = format!("{:013}", scaled.unsigned_abs());
                let (int, frac) = digits.split_at(digits.len() - 12);
                format!("{sign}{int}.{frac}")
            }
        };
        let (a, b) = (spell(m1, x1), spell(m2, x2));
        let parsed = (Decimal::parse(&a).expect("a"), Decimal::parse(&b).expect("b"));
        prop_assert_eq!(parsed.0.cmp(&parsed.1), exact(m1, x1).cmp(&exact(m2, x2)), "{} vs {}", a, b);
    }
}

#[test]
fn equal_values_share_an_equality_key() {
    let key = |text: &str| equality_key(&serde_json::from_str(text).expect("json"));
    assert_eq!(key("1"), key("1.0"));
    assert_eq!(key("1"), key("10e-1"));
    assert_eq!(key("0"), key("-0.0"));
    assert_eq!(key("-2.50"), key("-25E-1"));
    assert_ne!(key("1"), key(r#""1""#));
    assert_ne!(key("1"), key("-1"));
    assert_ne!(key("0.1"), key("0.10000000000000001"));
    assert_ne!(key("true"), key(r#""true""#));
    for none in ["null", "[1]", r#"{"a":1}"#] {
        assert_eq!(key(none), None, "{none}");
    }
    let keys = |entry: Value| {
        let predicate = Predicate::from_json(&entry).expect("valid");
        predicate.equality_keys().map(|(path, keys)| (path.join("."), keys))
    };
    assert_eq!(keys(json!(["m.k", "eq", "a"])), Some(("m.k".into(), vec!["sa".into()])));
    assert_eq!(keys(json!(["s", "in", ["a", true]])).map(|(_, k)| k.len()), Some(2));
    assert_eq!(keys(json!(["old.s", "eq", "a"])), None, "old rows are not indexed");
    assert_eq!(keys(json!(["s", "neq", "a"])), None);
}
