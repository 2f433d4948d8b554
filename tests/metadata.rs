//! Registry metadata from the source catalog (SPEC §4, §7) and the entity rows snapshot:
//! fields, types, keys, known values and comments; rows rendered exactly as events render them,
//! confined to the token's scope.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use rowcast::auth::Auth;
use rowcast::mapping::{DEFAULT_MAPPING, Mapping};
use serde_json::{Value, json};

use crate::fidelity::{SCHEMA, assert_same_row};
use crate::support::client::{Ws, get, is_event};
use crate::support::proxy::FaultProxy;
use crate::support::{Running, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "metadata-test-secret-of-32-bytes-or-more";

/// The fidelity table with a domain over an enum, CHECK lists of text and numbers, a dropped
/// column and comments.
const EXTRAS: &str = "
CREATE DOMAIN moody AS mood;
ALTER TABLE fidelity ADD COLUMN md moody, ADD COLUMN gone text,
    ADD COLUMN kind text CHECK (kind IN ('a', 'b')), ADD COLUMN level int CHECK (level IN (1, 2, 3));
ALTER TABLE fidelity DROP COLUMN gone;
COMMENT ON TABLE fidelity IS 'Every type';
COMMENT ON COLUMN fidelity.t IS 'plain text';
COMMENT ON TABLE agents IS 'not shown: the mapping describes agents';
COMMENT ON COLUMN agents.status IS 'what the agent is doing';";

const FIDELITY: &str = r#"
[[entity]]
name = "fidelity"
table = "fidelity"
redact = ["big"]
"#;

/// Three rows of many types: the inserts of the fidelity test, with a short `big`.
fn inserts() -> String {
    use crate::fidelity::{FIRST_ROW, SECOND_ROW, THIRD_ROW};
    format!("{};\n{SECOND_ROW};\n{THIRD_ROW};", FIRST_ROW.replace("$big$", "'big'"))
}

fn mapping(extra: &str) -> Arc<Mapping> {
    Arc::new(Mapping::from_toml(&format!("{DEFAULT_MAPPING}\n{extra}")).expect("mapping"))
}

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|items| items.iter().find(|item| item["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|item| item[key].as_str().expect("a name").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_tells_keys_fields_known_values_and_comments() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client.batch_execute(SCHEMA).await.expect("schema");
    client.batch_execute(EXTRAS).await.expect("extras");
    let mut settings = db.settings();
    settings.mapping = mapping(FIDELITY);
    let server = Running::start(settings).await;

    let (status, metadata) = get(server.addr, "/api/events/metadata").await;
    assert_eq!(status, 200, "{metadata}");
    assert_eq!(metadata["fields_error"], Value::Null);
    let entities = &metadata["entities"];

    let agent = by_name(entities, "agent");
    assert_eq!(agent["key"], json!(["id"]));
    assert_eq!(agent["description"], "AI agents", "the mapping's description wins");
    assert_eq!(
        names(&agent["fields"], "name"),
        [
            "id",
            "organization_id",
            "domain_id",
            "name",
            "status",
            "model",
            "config",
            "last_seen_at",
            "created_at",
            "updated_at"
        ]
    );
    assert_eq!(
        by_name(&agent["fields"], "status"),
        &json!({"name": "status", "type": "text", "filterable": true,
            "values": ["active", "inactive", "paused", "error"],
            "description": "what the agent is doing"})
    );
    assert_eq!(
        by_name(&agent["fields"], "last_seen_at"),
        &json!({"name": "last_seen_at", "type": "timestamp with time zone", "filterable": true,
            "values": null, "description": null})
    );
    assert_eq!(by_name(&agent["fields"], "config")["type"], "jsonb");

    let user = by_name(entities, "user");
    assert_eq!(
        by_name(&user["fields"], "password_hash"),
        &json!({"name": "password_hash", "type": "text", "filterable": false, "values": null,
            "description": null})
    );
    assert_eq!(by_name(&user["fields"], "role")["values"], json!(["owner", "admin", "member"]));

    let fidelity = by_name(entities, "fidelity");
    assert_eq!(fidelity["description"], "Every type", "COMMENT ON TABLE without a mapping one");
    assert_eq!(fidelity["key"], json!(["id"]));
    let fields = &fidelity["fields"];
    let field_names = names(fields, "name");
    assert_eq!(field_names.first().map(String::as_str), Some("id"));
    assert_eq!(&field_names[field_names.len() - 3..], ["md", "kind", "level"], "in column order");
    assert!(!field_names.contains(&"gone".to_owned()), "dropped columns are not fields");
    let field = |name: &str| by_name(fields, name);
    assert_eq!(field("t")["description"], "plain text");
    assert_eq!(field("m")["type"], "mood");
    assert_eq!(field("m")["values"], json!(["sad", "ok", "happy"]), "enum labels in enum order");
    assert_eq!(field("md")["type"], "moody");
    assert_eq!(field("md")["values"], json!(["sad", "ok", "happy"]), "a domain over an enum");
    assert_eq!((&field("ma")["type"], &field("ma")["values"]), (&json!("mood[]"), &Value::Null));
    assert_eq!(field("kind")["values"], json!(["a", "b"]));
    assert_eq!(field("level")["values"], json!([1, 2, 3]), "numbers for a numeric column");
    assert_eq!(field("n40")["type"], "numeric(40,0)");
    assert_eq!(field("ta")["type"], "text[]");
    assert_eq!(field("vc")["type"], "character varying(20)");
    assert_eq!(field("big")["filterable"], false);

    // Row event types are described; application ones keep their declared description, and
    // an entity that is no table's has no key and no fields.
    let types = &metadata["event_types"];
    let of_type = |kind: &str| {
        types
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == kind))
            .unwrap_or_else(|| panic!("no event type {kind}"))
    };
    assert_eq!(of_type("agent.created")["description"], "a row of public.agents was inserted");
    assert_eq!(of_type("fidelity.truncated")["description"], "public.fidelity was truncated");
    assert_eq!(
        of_type("deployment.failed")["description"],
        "status became failed in a row of public.deployments"
    );
    assert_eq!(
        of_type("agent.status_changed")["description"],
        "status of a row of public.agents changed"
    );
    let app = of_type("model.state_changed");
    assert_eq!(
        (&app["kind"], &app["description"]),
        (&json!("app"), &json!("A model was loaded, unloaded or failed"))
    );
    let model = by_name(entities, "model");
    assert_eq!(
        (&model["table"], &model["key"], &model["fields"]),
        (&Value::Null, &json!([]), &json!([]))
    );
    assert!(
        by_name(entities, "agent")["event_types"]
            .as_array()
            .expect("types")
            .contains(&json!("agent.heartbeat")),
        "app event types sit beside row ones"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_render_as_the_created_events_do() {
    let db = TestDb::new().await;
    db.client().await.batch_execute(SCHEMA).await.expect("schema");
    // Readers of this database default to output settings unlike the ones capture uses.
    db.set_hostile_output_defaults().await;
    let mut settings = db.settings();
    settings.mapping = Arc::new(Mapping::from_toml(FIDELITY).expect("mapping"));
    let mut server = Running::start(settings).await;
    db.client().await.batch_execute(&inserts()).await.expect("inserts");
    server.wait_for_id(3, WAIT).await;

    let (status, history) = get(server.addr, "/api/events?type=fidelity.created").await;
    assert_eq!(status, 200, "{history}");
    let (status, snapshot) = get(server.addr, "/api/entities/fidelity/rows").await;
    assert_eq!(status, 200, "{snapshot}");
    assert_eq!(
        (&snapshot["entity"], &snapshot["table"], &snapshot["key"]),
        (&json!("fidelity"), &json!("public.fidelity"), &json!(["id"]))
    );
    assert_eq!(snapshot["last_id"], 3);
    assert_eq!(snapshot["truncated"], false);
    let events = history["events"].as_array().expect("events");
    let rows = snapshot["rows"].as_array().expect("rows");
    assert_eq!((events.len(), rows.len()), (3, 3));
    for (row, event) in rows.iter().zip(events) {
        assert_same_row(row, &event["data"], &format!("row {}", row["id"]));
        assert!(row.get("big").is_none(), "redacted columns are left out");
    }
    server.stop().await;
}

/// The rows at `last_id`, then the events after it applied by key, equal the table at the end,
/// with writes going on while the snapshot is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_the_events_after_it_converge_on_the_table() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('o', 'O')")
        .await
        .expect("organization");
    let mut server = Running::start(db.settings()).await;
    let writer = tokio::spawn(async move {
        for i in 0..150 {
            let statement = format!(
                "INSERT INTO agents (id, organization_id, name) VALUES ('a{}', 'o', 'n{i}')
                     ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,
                        status = CASE WHEN agents.status = 'active' THEN 'paused' ELSE 'active' END;
                 DELETE FROM agents WHERE id = 'a{}' AND {i} % 7 = 0;",
                i % 40,
                (i * 3) % 40
            );
            client.batch_execute(&statement).await.expect("write");
        }
    });
    server.wait_for_id(40, WAIT).await;
    let (status, snapshot) = get(server.addr, "/api/entities/agent/rows").await;
    assert_eq!(status, 200, "{snapshot}");
    let since = snapshot["last_id"].as_u64().expect("last_id");
    let mut rows: std::collections::BTreeMap<String, Value> = snapshot["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| (row["id"].as_str().expect("id").to_owned(), row.clone()))
        .collect();
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    ws.subscribe(json!({"type": "agent.*"}), Some(since)).await;
    writer.await.expect("writer");
    let last = db.settled_events().await.last().expect("events")["id"].as_u64().expect("id");
    assert!(last > since, "the snapshot was taken while writes went on");
    loop {
        let frame = ws.frame().await;
        if !is_event(&frame) {
            continue;
        }
        let id = frame["id"].as_u64().expect("id");
        assert!(id > since, "only events after the snapshot");
        let key = frame["data"]["id"].as_str().expect("key").to_owned();
        if frame["type"] == "agent.deleted" {
            rows.remove(&key);
        } else {
            rows.insert(key, frame["data"].clone());
        }
        if id == last {
            break;
        }
    }
    let (_, table) = get(server.addr, "/api/entities/agent/rows").await;
    let table: Vec<&Value> = table["rows"].as_array().expect("rows").iter().collect();
    assert_eq!(rows.values().collect::<Vec<_>>(), table);
    server.stop().await;
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn token(orgs: &[&str], domains: Option<&[&str]>) -> String {
    let mut claims = json!({"sub": "tester", "exp": now() + 3600, "orgs": orgs});
    if let Some(domains) = domains {
        claims["domains"] = json!(domains);
    }
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("encode")
}

/// The ids of the rows a GET answers with, or the refusal's status and code.
async fn row_ids(addr: std::net::SocketAddr, path: &str) -> Result<Vec<Value>, (u16, Value)> {
    let (status, body) = get(addr, path).await;
    if status != 200 {
        return Err((status, body["code"].clone()));
    }
    Ok(body["rows"].as_array().expect("rows").iter().map(|row| row["id"].clone()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_confined_to_the_token_scope() {
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, org text, body text);
             INSERT INTO organizations (id, name) VALUES ('quant', 'Quant'), ('acme', 'Acme');
             INSERT INTO domains (id, organization_id, name)
                  VALUES ('quant-a', 'quant', 'A'), ('acme-a', 'acme', 'A');
             INSERT INTO agents (id, organization_id, domain_id, name) VALUES
                  ('a1', 'quant', 'quant-a', 'one'), ('a2', 'quant', NULL, 'two'),
                  ('a3', 'acme', 'acme-a', 'three');
             INSERT INTO notes VALUES (1, 'quant', 'x'), (2, NULL, 'y');",
        )
        .await
        .expect("rows");
    let mut settings = db.settings();
    settings.mapping =
        mapping("[[entity]]\nname = \"note\"\ntable = \"notes\"\norganization = \"org\"\n");
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth = Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    let server = Running::start(settings).await;
    let addr = server.addr;
    let rows = |entity: &str, token: &str, query: &str| {
        format!("/api/entities/{entity}/rows?token={token}{query}")
    };

    assert_eq!(row_ids(addr, "/api/entities/agent/rows").await, Err((401, json!("unauthorized"))));
    let quant = token(&["quant"], None);
    assert_eq!(row_ids(addr, &rows("agent", &quant, "")).await, Ok(vec![json!("a1"), json!("a2")]));
    assert_eq!(
        row_ids(addr, &rows("agent", &quant, "&organization_id=acme")).await,
        Err((403, json!("forbidden")))
    );
    // A domain grant: a row without a domain is outside it, as its events are.
    let quant_a = token(&["quant"], Some(&["quant-a"]));
    assert_eq!(row_ids(addr, &rows("agent", &quant_a, "")).await, Ok(vec![json!("a1")]));
    assert_eq!(row_ids(addr, &rows("organization", &quant_a, "")).await, Ok(vec![]));
    // A null organization only for a token that grants them all.
    let all = token(&["*"], None);
    assert_eq!(row_ids(addr, &rows("note", &all, "")).await, Ok(vec![json!(1), json!(2)]));
    assert_eq!(row_ids(addr, &rows("note", &quant, "")).await, Ok(vec![json!(1)]));
    assert_eq!(
        row_ids(addr, &rows("agent", &all, "&organization_id=acme,nobody")).await,
        Ok(vec![json!("a3")])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_limit_and_refusals() {
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('c', 'C'), ('a', 'A'), ('b', 'B')",
        )
        .await
        .expect("rows");
    let mut server = Running::start(db.settings()).await;
    db.client()
        .await
        .batch_execute("UPDATE organizations SET plan = 'team' WHERE id = 'a'")
        .await
        .expect("update");
    server.wait_for_id(1, WAIT).await;
    let addr = server.addr;

    let (status, page) = get(addr, "/api/entities/organization/rows?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(names(&page["rows"], "id"), ["a", "b"], "ordered by key");
    assert_eq!((&page["truncated"], &page["last_id"]), (&json!(true), &json!(1)));
    assert_eq!(page["rows"][0]["plan"], "team");
    let (_, whole) = get(addr, "/api/entities/organization/rows?limit=3").await;
    assert_eq!((names(&whole["rows"], "id").len(), &whole["truncated"]), (3, &json!(false)));
    let (status, clamped) = get(addr, "/api/entities/organization/rows?limit=99999").await;
    assert_eq!((status, &clamped["truncated"]), (200, &json!(false)));

    for (path, status, code) in [
        ("/api/entities/organization/rows?limit=0", 400, "bad_request"),
        ("/api/entities/organization/rows?limit=x", 400, "bad_request"),
        ("/api/entities/organization/rows?limit=-1", 400, "bad_request"),
        ("/api/entities/organization/rows?color=red", 400, "bad_request"),
        ("/api/entities/nothing/rows", 404, "not_found"),
        ("/api/entities/model/rows", 404, "not_found"),
    ] {
        let (got, body) = get(addr, path).await;
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: {body}");
    }
    let (_, body) = get(addr, "/api/entities/model/rows").await;
    assert!(body["message"].as_str().is_some_and(|m| m.contains("application events only")));
    server.stop().await;
}

/// With the source unreachable, metadata still answers, soon, and says what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_answers_in_time_without_the_source() {
    let db = TestDb::migrated().await;
    let port = db.config().config.get_ports().first().copied().unwrap_or(5432);
    let proxy = FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let mut settings = db.settings();
    // The source goes through the proxy; the log (same database) stays direct.
    settings.database = proxy.route(&settings.database);
    let server = Running::start(settings).await;
    proxy.blackhole_new(true);
    proxy.blackhole_open();

    let started = std::time::Instant::now();
    let (status, metadata) = get(server.addr, "/api/events/metadata").await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{metadata}");
    assert!(took < Duration::from_secs(3), "metadata took {took:?}");
    assert!(metadata["fields_error"].as_str().is_some_and(|e| !e.is_empty()), "{metadata}");
    let agent = by_name(&metadata["entities"], "agent");
    assert_eq!((&agent["fields"], &agent["key"]), (&Value::Null, &Value::Null));
    assert_eq!(agent["description"], "AI agents");
    assert!(names(&metadata["event_types"], "type").contains(&"agent.created".to_owned()));
    // The rows endpoint says the source is unavailable, as soon.
    let started = std::time::Instant::now();
    let (status, body) = get(server.addr, "/api/entities/agent/rows").await;
    assert_eq!((status, &body["code"]), (503, &json!("unavailable")), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
