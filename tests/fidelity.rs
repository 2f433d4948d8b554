//! Fidelity: every event's `data` and `old` equal Postgres's own `to_jsonb(row)` in a UTC
//! session, for every type SPEC §3 lists, including a large TOASTed value an update left alone.

use std::sync::Arc;
use std::time::Duration;

use rowcast::mapping::Mapping;
use serde_json::Value;
use tokio_postgres::Client;

use crate::support::{Running, TestDb};

/// The first row of many types; `$big$` stands for a TOASTed text value.
pub const FIRST_ROW: &str = r#"INSERT INTO fidelity VALUES (1, 'first', 'plain ünïcödé "quoted" \ back', 'varchar', 'ab',
                1.50, 1234567890123456789012345678901234567890, 3.14159, 0.1, true, -32768, 2147483647,
                -9223372036854775808, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                '{"b": 1.0e2, "a": [1, 2.50, {"z": null}], "a": "dup wins", "é": "\u00e9\ud83d\ude00"}',
                '{"nested": {"k": [1, "two", null, true]}, "emoji": "😀", "num": 12.340}',
                '\x00ff10', '2024-02-29', '23:59:59.999999', '12:00:00+05:30', '2024-01-02 03:04:05.5',
                '2024-06-30 23:59:59.123456+02', '1 year 2 mons 3 days 04:05:06.7',
                '{{1,NULL},{3,4}}', '{"a b","c\"d",NULL,"NULL",""}', '{1.5,NaN,-Infinity}',
                '{"2024-01-01 00:00:00+00",NULL}', ARRAY['{"x": 1}'::jsonb, NULL],
                'happy', '{sad,ok}', 42.42, '192.168.0.1/24', 12.34, '[1,10)', ROW(7, 'seven'), $big$)"#;
/// A row of special values (NaN, infinities, an empty array).
pub const SECOND_ROW: &str =
    "INSERT INTO fidelity (id, f4, f8, n, d, ts, tstz, ia) VALUES (2, 'NaN', 'Infinity', 'NaN',
    '-infinity', 'infinity', '-infinity', '{}')";
/// A row of nulls.
pub const THIRD_ROW: &str = "INSERT INTO fidelity (id) VALUES (3)";

pub const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
CREATE DOMAIN label AS text;
CREATE TYPE pair AS (a int, b text);
CREATE TABLE fidelity (
    id          int PRIMARY KEY,
    label       label,
    t           text,
    vc          varchar(20),
    ch          char(5),
    n           numeric,
    n40         numeric(40, 0),
    f4          real,
    f8          double precision,
    b           boolean,
    i2          smallint,
    i4          integer,
    i8          bigint,
    u           uuid,
    j           json,
    jb          jsonb,
    by          bytea,
    d           date,
    tm          time,
    tmz         timetz,
    ts          timestamp,
    tstz        timestamptz,
    iv          interval,
    ia          int[],
    ta          text[],
    fa          float8[],
    tsa         timestamptz[],
    ja          jsonb[],
    m           mood,
    ma          mood[],
    pos         positive,
    ip          inet,
    mo          money,
    r           int4range,
    p           pair,
    big         text
)"#;

const MAPPING: &str = r#"
[[entity]]
name = "fidelity"
table = "fidelity"
"#;

/// What Postgres itself says the row is: `to_jsonb` in a UTC session with default output
/// settings (the database's own defaults are deliberately hostile, see below).
async fn to_jsonb(client: &Client, id: i32) -> Value {
    let row = client
        .query_one("SELECT to_jsonb(f)::text FROM fidelity f WHERE id = $1", &[&id])
        .await
        .expect("to_jsonb");
    serde_json::from_str(row.get::<_, &str>(0)).expect("jsonb text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_old_equal_postgres_to_jsonb() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute(SCHEMA).await.expect("schema");
    // Sessions of this database default to output settings unlike the ones rowcast expects: the
    // replication session must pin its own.
    db.set_hostile_output_defaults().await;
    let mut settings = db.settings();
    settings.mapping = Arc::new(Mapping::from_toml(MAPPING).expect("mapping"));
    let mut publisher = Running::start(settings).await;

    let client = db.client().await;
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres';
             SET extra_float_digits = 1; SET bytea_output = 'hex';",
        )
        .await
        .expect("comparison session");

    let big: String = client
        .query_one("SELECT string_agg(md5(i::text), '') FROM generate_series(1, 3200) i", &[])
        .await
        .expect("big")
        .get(0);
    assert_eq!(big.len(), 102_400);

    let mut expected: Vec<(String, Value, Option<Value>)> = Vec::new();
    let statements: [(&str, i32); 6] = [
        (FIRST_ROW, 1),
        (SECOND_ROW, 2),
        (THIRD_ROW, 3),
        (
            "UPDATE fidelity SET f8 = '-Infinity', tstz = 'infinity', d = '0044-03-15 BC', f4 = 1e-7 WHERE id = 2",
            2,
        ),
        // The big TOASTed value is left unchanged by this update of another column.
        (
            "UPDATE fidelity SET label = 'second', f8 = 1e100, tstz = '1999-12-31 23:00:00-05' WHERE id = 1",
            1,
        ),
        ("UPDATE fidelity SET label = 'third' WHERE id = 3", 3),
    ];
    let mut snapshots = std::collections::HashMap::new();
    for (statement, id) in statements {
        let before = snapshots.get(&id).cloned();
        let sql = statement.replace("$big$", &format!("'{big}'"));
        client.batch_execute(&sql).await.expect(statement);
        let after = to_jsonb(&client, id).await;
        snapshots.insert(id, after.clone());
        expected.push((statement.chars().take(40).collect(), after, before));
    }
    // Deletes: data and old are the last row.
    for id in [1, 2] {
        client.execute("DELETE FROM fidelity WHERE id = $1", &[&id]).await.expect("delete");
        let last = snapshots[&id].clone();
        expected.push((format!("DELETE {id}"), last.clone(), Some(last)));
    }

    publisher.wait_for_id(expected.len() as u64, Duration::from_secs(30)).await;
    publisher.stop().await;
    let events = db.events().await;
    assert_eq!(events.len(), expected.len());
    for (event, (what, data, old)) in events.iter().zip(&expected) {
        assert_same_row(&event["data"], data, &format!("data of {what}"));
        match old {
            Some(old) => assert_same_row(&event["old"], old, &format!("old of {what}")),
            None => assert!(event.get("old").is_none(), "{what} has no old row"),
        }
    }
    let toasted = &events[4];
    assert_eq!(toasted["data"]["big"].as_str().map(str::len), Some(102_400));
    assert_eq!(toasted["changed"], serde_json::json!(["f8", "label", "tstz"]));
}

/// Equal as JSON values and as text (same keys in the same jsonb order, same digits); on a
/// mismatch, names the differing columns with short excerpts.
pub fn assert_same_row(actual: &Value, expected: &Value, what: &str) {
    if actual == expected
        && serde_json::to_string(actual).ok() == serde_json::to_string(expected).ok()
    {
        return;
    }
    let short = |v: Option<&Value>| v.map(|v| v.to_string().chars().take(80).collect::<String>());
    let (Some(a), Some(e)) = (actual.as_object(), expected.as_object()) else {
        panic!(
            "{what}: {} != {}",
            short(Some(actual)).unwrap_or_default(),
            short(Some(expected)).unwrap_or_default()
        );
    };
    let diffs: Vec<String> = e
        .keys()
        .chain(a.keys())
        .filter(|k| a.get(*k) != e.get(*k))
        .map(|k| format!("{k}: rowcast {:?} postgres {:?}", short(a.get(k)), short(e.get(k))))
        .collect();
    let order = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    panic!(
        "{what} differs:\n  {}\n  key order rowcast {:?}\n  key order postgres {:?}",
        diffs.join("\n  "),
        order(a),
        order(e)
    );
}
