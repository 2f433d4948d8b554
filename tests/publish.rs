//! Application events over HTTP (SPEC §3a): `POST /api/events` through the log's single writer,
//! with idempotency keys, limits and authorization, seen by real HTTP and WebSocket clients.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use rowcast::auth::Auth;
use rowcast::config::SourceMode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::support::client::{Ws, is_event, post, read_response};
use crate::support::{Running, TestDb};
use crate::triggers::trigger_settings;

const SECRET: &str = "publish-test-secret-of-32-bytes-or-more";
const WAIT: Duration = Duration::from_secs(30);

fn token(claims: Value) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let mut claims = claims;
    claims["exp"] = json!(now + 3600);
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("encode")
}

async fn keyed_counts(db: &TestDb) -> BTreeMap<String, (i64, i64)> {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT key, count(*), min(id) FROM rowcast.events WHERE key IS NOT NULL GROUP BY key",
            &[],
        )
        .await
        .expect("keys");
    rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2)))).collect()
}

/// 50 posters share 200 keys; each posts its keys in batches, twice over, as a client that
/// never knows whether its last attempt landed would. Every key is appended exactly once and
/// every answer for it names the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_retries_with_keys_append_each_key_once_in_both_modes() {
    for source in [SourceMode::Replication, SourceMode::Triggers] {
        let db = TestDb::migrated().await;
        let settings =
            if source == SourceMode::Triggers { trigger_settings(&db) } else { db.settings() };
        let server = Running::start(settings).await;
        let addr = server.addr;
        const POSTERS: usize = 50;
        const KEYS: usize = 200;
        let mut posters = Vec::new();
        for p in 0..POSTERS {
            posters.push(tokio::spawn(async move {
                let mut answers: Vec<(String, u64, bool)> = Vec::new();
                for round in 0..2 {
                    // Overlapping slices: each key is posted by several posters, in batches.
                    let keys: Vec<usize> = (0..8).map(|j| (p * 4 + j + round) % KEYS).collect();
                    let events: Vec<Value> = keys
                        .iter()
                        .map(|k| {
                            json!({"type": "deployment.log", "key": format!("k{k}"),
                                        "organization_id": "quant", "data": {"k": k}})
                        })
                        .collect();
                    let body = json!({ "events": events }).to_string();
                    let (status, reply) = post(addr, "/api/events", None, body.as_bytes()).await;
                    assert_eq!(status, 201, "{reply}");
                    for answer in reply["events"].as_array().expect("events") {
                        answers.push((
                            answer["key"].as_str().expect("key").to_owned(),
                            answer["id"].as_u64().expect("id"),
                            answer["duplicate"].as_bool().expect("duplicate"),
                        ));
                    }
                }
                answers
            }));
        }
        let mut ids: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        let mut originals: BTreeMap<String, usize> = BTreeMap::new();
        for poster in posters {
            for (key, id, duplicate) in poster.await.expect("poster") {
                ids.entry(key.clone()).or_default().insert(id);
                if !duplicate {
                    *originals.entry(key).or_default() += 1;
                }
            }
        }
        let counts = keyed_counts(&db).await;
        server.stop().await;
        assert_eq!(counts.len(), ids.len(), "{source:?}");
        for (key, (count, id)) in &counts {
            assert_eq!(*count, 1, "{source:?}: {key} appended once");
            assert_eq!(ids[key], BTreeSet::from([*id as u64]), "{key}: every answer names it");
            assert_eq!(originals.get(key), Some(&1), "{key}: one answer is not a duplicate");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_append_nothing_and_limits_hold() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth = Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    settings.server.max_request_bytes = 4 << 20;
    let mut server = Running::start(settings).await;
    let addr = server.addr;
    let emitter = token(json!({"sub": "svc", "orgs": ["quant"], "emit": true}));
    let reader = token(json!({"sub": "ui", "orgs": ["quant"]}));
    let event =
        |org: &str| json!({"type": "deployment.log", "organization_id": org, "data": {"n": 1}});
    let send = |token: Option<String>, body: Value| async move {
        post(addr, "/api/events", token.as_deref(), body.to_string().as_bytes()).await
    };

    let (status, reply) = send(None, event("quant")).await;
    assert_eq!(status, 401, "{reply}");
    let (status, reply) = send(Some(reader.clone()), event("quant")).await;
    assert_eq!((status, &reply["code"]), (403, &json!("forbidden")), "{reply}");
    assert!(reply["message"].as_str().expect("message").contains("emit"), "{reply}");
    let foreign = json!({"events": [event("quant"), event("acme")]});
    let (status, reply) = send(Some(emitter.clone()), foreign).await;
    assert_eq!(status, 403, "{reply}");
    assert!(reply["message"].as_str().expect("message").contains("events[1]"), "{reply}");
    let bad = json!({"events": [event("quant"), event("quant"), {"type": "deployment.log", "data": [1]}]});
    let (status, reply) = send(Some(emitter.clone()), bad).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["message"].as_str().expect("message").contains("events[2].data"), "{reply}");
    let undeclared = json!({"type": "build.started", "organization_id": "quant", "data": {}});
    let (status, reply) = send(Some(emitter.clone()), undeclared).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["message"].as_str().expect("message").contains("not declared"), "{reply}");

    // Data of exactly --max-event-bytes (1 MiB as JSON) arrives intact; one byte more is refused.
    let blob = |size: usize| "x".repeat(size - r#"{"blob":""}"#.len());
    let exact = json!({"type": "deployment.log", "organization_id": "quant", "key": "big",
                       "data": {"blob": blob(1 << 20)}});
    let over = json!({"type": "deployment.log", "organization_id": "quant",
                      "data": {"blob": blob((1 << 20) + 1)}});
    let (status, reply) = send(Some(emitter.clone()), over).await;
    assert_eq!(status, 413, "{reply}");
    assert!(reply["message"].as_str().expect("message").contains("events[0].data"), "{reply}");
    // A body over --max-request-bytes is refused from its headers, before it is sent.
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {emitter}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        100 << 20
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let (status, reply) =
        tokio::time::timeout(WAIT, read_response(stream)).await.expect("answered unread");
    assert_eq!((status, &reply["code"]), (413, &json!("too_large")), "{reply}");
    assert!(db.events().await.is_empty(), "no refusal appended anything");

    let (status, reply) = send(Some(emitter.clone()), exact).await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["events"][0]["id"].as_u64().expect("id");
    assert_eq!(reply["events"][0], json!({"id": id, "key": "big", "duplicate": false}));
    server.wait_for_id(id, WAIT).await;
    let events = db.events().await;
    server.stop().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"]["blob"].as_str().map(str::len), Some((1 << 20) - 11));
    assert_eq!(events[0]["source"], json!({"kind": "app", "via": "http"}));
    assert_eq!(events[0]["severity"], "debug");
}

/// One `agent.*` subscriber sees row events and application events (from SQL and HTTP) of
/// agents, interleaved, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_subscribers_get_row_and_app_events_in_id_order() {
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Quant')")
        .await
        .expect("seed");
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    // Heartbeats are declared debug; a filter without severity sees them.
    ws.subscribe(json!({"type": "agent.*"}), None).await;
    let (mut loud, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    loud.subscribe(json!({"type": "agent.*", "severity": "warning"}), None).await;
    client
        .batch_execute(
            "INSERT INTO agents (id, organization_id, name) VALUES ('agt-1', 'quant', 'a')",
        )
        .await
        .expect("insert");
    // The row event is captured asynchronously; once it is delivered, what is posted next
    // comes after it.
    let created = ws.until("agent.created").await;
    let beat =
        json!({"type": "agent.heartbeat", "organization_id": "quant", "data": {"id": "agt-1"}});
    let (status, reply) = post(server.addr, "/api/events", None, beat.to_string().as_bytes()).await;
    assert_eq!(status, 201, "{reply}");
    client
        .batch_execute(
            "BEGIN;
             UPDATE agents SET name = 'b' WHERE id = 'agt-1';
             SELECT rowcast.emit('agent.heartbeat', '{\"id\": \"agt-1\", \"via\": \"sql\"}', organization_id => 'quant');
             SELECT rowcast.emit('deployment.log', '{}', organization_id => 'quant');
             COMMIT",
        )
        .await
        .expect("emit");
    let mut seen = vec![created];
    while seen.len() < 4 {
        let frame = ws.frame().await;
        if is_event(&frame) {
            seen.push(frame);
        }
    }
    // A warning filter saw none of those (info and debug), only what is at least a warning.
    let alarm = json!({"type": "agent.heartbeat", "organization_id": "quant", "severity": "error", "data": {"id": "agt-1"}});
    let (status, reply) =
        post(server.addr, "/api/events", None, alarm.to_string().as_bytes()).await;
    assert_eq!(status, 201, "{reply}");
    let first = loop {
        let frame = loud.frame().await;
        if is_event(&frame) {
            break frame;
        }
    };
    assert_eq!(
        (first["type"].as_str(), first["severity"].as_str()),
        (Some("agent.heartbeat"), Some("error"))
    );
    server.stop().await;
    let kinds: Vec<(&str, &str)> = seen
        .iter()
        .map(|e| (e["type"].as_str().unwrap_or(""), e["source"]["kind"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        kinds,
        [
            ("agent.created", "row"),
            ("agent.heartbeat", "app"),
            ("agent.updated", "row"),
            ("agent.heartbeat", "app")
        ]
    );
    let ids: Vec<u64> = seen.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "id order {ids:?}");
    assert_eq!(seen[1]["source"]["via"], "http");
    assert_eq!(seen[3]["source"]["via"], "sql");
}

/// Runs the rowcast binary with `args` and `env`; returns (success, stdout, stderr).
async fn rowcast(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rowcast"));
    command.args(args).env_remove("ROWCAST_JWT_SECRET").env_remove("ROWCAST_TOKEN");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("rowcast runs");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_emit_from_the_command_line() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth = Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    let mut server = Running::start(settings).await;
    let secret = [("ROWCAST_JWT_SECRET", SECRET)];
    let (ok, emitter, err) =
        rowcast(&["token", "--orgs", "quant", "--emit", "--ttl", "1h"], &secret).await;
    assert!(ok, "{err}");
    let (ok, reader, err) = rowcast(&["token", "--orgs", "quant", "--ttl", "1h"], &secret).await;
    assert!(ok, "{err}");
    let url = format!("http://{}", server.addr);
    let emit = ["emit", "--type", "deployment.log", "--org", "quant", "--data", r#"{"n":1}"#];
    let keyed = [&emit[..], &["--key", "cli-1"]].concat();
    let (emitter, reader) = (emitter.trim(), reader.trim());
    let as_emitter = [("ROWCAST_URL", url.as_str()), ("ROWCAST_TOKEN", emitter)];
    let (ok, first, err) = rowcast(&keyed, &as_emitter).await;
    assert!(ok, "{err}");
    let (ok, again, err) = rowcast(&keyed, &as_emitter).await;
    assert!(ok, "{err}");
    assert_eq!(first.trim(), again.trim(), "a repeated key prints the original id");
    let id: u64 = first.trim().parse().expect("an id");
    let as_reader = [("ROWCAST_URL", url.as_str()), ("ROWCAST_TOKEN", reader)];
    let (ok, _, err) = rowcast(&emit, &as_reader).await;
    assert!(!ok && err.contains("403") && err.contains("emit"), "{err}");
    server.wait_for_id(id, WAIT).await;
    let events = db.events().await;
    server.stop().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"], json!({"n": 1}));
    assert_eq!(events[0]["organization_id"], "quant");
}
