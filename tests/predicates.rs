//! Row-content predicates (SPEC §5 `where`) against a real server: live frames, `since`
//! catch-up, `GET /api/events` and replay pick exactly what an independent matcher picks
//! from the log, for inserts, updates and deletes (which filter on the old row).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::client::{Ws, get, is_event};
use crate::support::matcher::{matches, query};
use crate::support::{Running, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn filters() -> Vec<Value> {
    vec![
        json!({"type": "instance.*", "where": [["status", "eq", "running"]]}),
        json!({"where": [["old.status", "neq", "running"], ["status", "eq", "running"]]}),
        json!({"type": "*.deleted", "where": [["old.region", "in", ["eu-west-1", "us-east-1"]]]}),
        json!({"where": [["cpu_millis", "gte", 1000]]}),
        json!({"where": [["region", "lt", 5]]}),
        json!({"where": [["metadata.tier", "eq", "gold"]]}),
        json!({"type": "agent.*", "where": [["model", "is_null", true]]}),
        json!({"type": "agent.*", "where": [["model", "is_null", false]]}),
        json!({"where": [["status", "changed"]]}),
        json!({"where": [["metadata.tags", "contains", "x"]]}),
        json!({"type": "agent.*", "where": [["name", "contains", "q"]]}),
        json!({"type": "instance.*", "where": [["region", "nin", ["eu-west-1"]]]}),
        json!({"where": [["metadata.n", "gt", 2.5], ["old.metadata.n", "lte", 3]]}),
        json!({"where": [["cpu_millis", "in", [250, 4000]]]}),
    ]
}

async fn workload(client: &tokio_postgres::Client, round: usize) {
    let r = round;
    let statements = format!(
        "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant') ON CONFLICT DO NOTHING;
         INSERT INTO agents (id, organization_id, name, model) VALUES ('a{r}', 'quant', 'q{r}', NULL), ('b{r}', 'quant', 'b{r}', 'gpt');
         UPDATE agents SET model = 'm', status = 'active' WHERE id = 'a{r}';
         UPDATE agents SET name = 'qq' WHERE id = 'b{r}';
         INSERT INTO instances (id, organization_id, agent_id, region, cpu_millis, metadata) VALUES
             ('i{r}', 'quant', 'a{r}', 'eu-west-1', 250, '{{\"tier\": \"gold\", \"n\": 3, \"tags\": [\"x\", 1]}}'),
             ('j{r}', 'quant', NULL, 'us-east-1', 4000, '{{\"tier\": \"silver\", \"n\": 2.5}}'),
             ('k{r}', 'quant', NULL, 'ap-south-1', 1000, '{{\"n\": null, \"tags\": \"x-y\"}}');
         UPDATE instances SET status = 'running' WHERE id IN ('i{r}', 'j{r}');
         UPDATE instances SET metadata = '{{\"tier\": \"gold\", \"n\": 4}}' WHERE id = 'i{r}';
         UPDATE instances SET status = 'running', cpu_millis = 999 WHERE id = 'k{r}';
         UPDATE instances SET status = 'stopped' WHERE id = 'j{r}';
         DELETE FROM instances WHERE id IN ('i{r}', 'k{r}');
         DELETE FROM agents WHERE id = 'b{r}'"
    );
    for statement in statements.split(';') {
        client.batch_execute(statement).await.expect(statement);
    }
}

fn ids(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter(|f| is_event(f)).map(|f| f["id"].as_u64().expect("id")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_picks_the_same_events_live_on_catch_up_in_history_and_replay() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let filters = filters();
    let mut live = Vec::new();
    for filter in &filters {
        let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
        ws.send(json!({"action": "subscribe", "filter": filter})).await;
        let reply = ws.frame().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["filter"]["where"], filter["where"], "the echo names the predicates");
        live.push(ws);
    }
    // The query form on the upgrade URL is the same subscription.
    let (mut from_url, _) = Ws::connect_welcomed(&server.ws_url(&query(&filters[1]))).await;
    assert_eq!(from_url.frame().await["filter"]["where"], filters[1]["where"]);

    let client = db.client().await;
    for round in 0..2 {
        workload(&client, round).await;
    }
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;
    let expected: Vec<Vec<u64>> = filters
        .iter()
        .map(|filter| {
            log.iter()
                .filter(|e| matches(filter, e))
                .map(|e| e["id"].as_u64().expect("id"))
                .collect()
        })
        .collect();
    // The workload gives most filters something, and none everything.
    assert!(expected.iter().filter(|ids| !ids.is_empty()).count() >= 10, "{expected:?}");
    assert!(expected.iter().all(|ids| ids.len() < log.len()));
    assert!(expected[4].is_empty(), "a string never orders against a number");

    for ((filter, ws), want) in filters.iter().zip(&mut live).zip(&expected) {
        assert_eq!(&ids(&ws.drain().await), want, "live {filter}");
    }
    assert_eq!(ids(&from_url.drain().await), expected[1], "live, subscribed by URL");

    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    for (filter, want) in filters.iter().zip(&expected) {
        ws.send(json!({"action": "subscribe", "filter": filter, "since": 0})).await;
        let frames = ws.through("caught_up").await;
        assert_eq!(&ids(&frames), want, "since catch-up {filter}");

        let (status, body) =
            get(server.addr, &format!("/api/events?limit=1000&{}", query(filter))).await;
        assert_eq!(status, 200, "{body}");
        let events = body["events"].as_array().expect("events");
        let history: Vec<u64> = events.iter().map(|e| e["id"].as_u64().expect("id")).collect();
        assert_eq!(&history, want, "history {}", query(filter));

        let range = ("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z");
        ws.send(json!({"action": "replay", "filter": filter, "from": range.0, "to": range.1, "speed": 100})).await;
        let mut replayed = Vec::new();
        loop {
            let frame = ws.frame().await;
            if frame["type"] == "replay_finished" {
                break;
            }
            if frame.get("replay_id").is_some() && is_event(&frame) {
                replayed.push(frame["id"].as_u64().expect("id"));
            }
        }
        assert_eq!(&replayed, want, "replay {filter}");
    }

    // Refusals say why.
    let (status, body) = get(server.addr, "/api/events?where=status:like:x").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        get(server.addr, "/api/events?type=user.*&where=password_hash:is_null:false").await;
    assert_eq!((status, body.to_string().contains("redacted")), (400, true), "{body}");
    ws.send(json!({"action": "subscribe", "filter": {"where": [["password_hash", "eq", "x"]]}}))
        .await;
    let reply = ws.until("error").await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    server.stop().await;
}

/// A JSON number exactly as written.
fn number(text: &str) -> Value {
    serde_json::from_str(text).expect("a JSON number")
}

/// The SQL of `where` and the live matcher agree on every operator over awkward values
/// (missing, null, numbers beside numeric strings, nesting, arrays), on a real Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_live_matching_agree_on_every_operator() {
    use rowcast::filter::{Envelope, Filter, Subject};
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TEMP TABLE t (id int, type text, organization_id text, domain_id text,
                                  severity smallint, body json)",
        )
        .await
        .expect("table");
    let values = [
        json!(null),
        json!(1),
        json!(2.5),
        json!(10),
        json!("10"),
        json!("a"),
        json!("ab"),
        json!("B"),
        json!(true),
        json!(["a", 1]),
        json!({"k": "a"}),
        // Decimals a float would round (to 0.3), 1 spelled with zeros, an exponent.
        number("0.30000000000000001"),
        number("1.000"),
        number("-2.5e-3"),
    ];
    let mut bodies = Vec::new();
    for (i, v) in values.iter().enumerate() {
        for (j, w) in values.iter().enumerate().step_by(3) {
            let mut body = json!({"data": {"c": v, "n": {"k": w}}, "old": {"c": w}});
            if i % 2 == 0 {
                body["changed"] = json!(["c"]);
            }
            if j == 0 {
                body["data"].as_object_mut().expect("object").remove("c");
            }
            bodies.push(body);
        }
    }
    bodies.push(json!({"data": null, "old": null}));
    for (id, body) in bodies.iter().enumerate() {
        client
            .execute(
                "INSERT INTO t VALUES ($1, 'x.updated', NULL, NULL, 0, $2::text::json)",
                &[&(id as i32), &body.to_string()],
            )
            .await
            .expect("row");
    }
    let operands = [
        json!(1),
        json!(2.5),
        json!(10),
        json!("10"),
        json!("a"),
        json!("B"),
        json!(true),
        number("0.3"),
        number("-0.0025"),
    ];
    let mut entries = vec![
        json!(["c", "changed"]),
        json!(["c", "is_null", true]),
        json!(["n.k", "is_null", false]),
    ];
    for path in ["c", "old.c", "n.k"] {
        for op in ["eq", "neq", "lt", "lte", "gt", "gte", "contains"] {
            for x in &operands {
                if !(op.starts_with('l') || op.starts_with('g')) || !x.is_boolean() {
                    entries.push(json!([path, op, x]));
                }
            }
        }
        entries.push(json!([path, "in", [1, "a", true]]));
        entries.push(json!([path, "nin", [10, "ab"]]));
    }
    let statement =
        format!("SELECT id FROM t WHERE {} ORDER BY id", rowcast::filter::sql_condition(1));
    let mut picking = 0;
    for entry in &entries {
        let filter = Filter::from_json(Some(&json!({"where": [entry]}))).expect("valid");
        let sql = filter.sql();
        let rows = client.query(&statement, &sql.params()).await.expect("query");
        let picked: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
        let texts: Vec<String> = bodies.iter().map(Value::to_string).collect();
        let live: Vec<i32> = texts
            .iter()
            .enumerate()
            .filter(|(_, text)| {
                let envelope = Envelope::new(text);
                let subject = Subject {
                    event_type: "x.updated",
                    organization_id: None,
                    domain_id: None,
                    severity: rowcast::model::Severity::Info,
                    envelope: Some(&envelope),
                };
                filter.matches(&subject)
            })
            .map(|(id, _)| id as i32)
            .collect();
        assert_eq!(picked, live, "{entry}");
        picking += usize::from(!picked.is_empty() && picked.len() < bodies.len());
    }
    assert!(picking * 2 > entries.len(), "most predicates split the rows: {picking}");
}
