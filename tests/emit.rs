//! Application events from SQL (SPEC §3a): `rowcast.emit()` is transactional, takes its place
//! among its transaction's row changes, and gives identical events in both capture modes.

use rowcast::config::SourceMode;
use serde_json::{Value, json};

use crate::support::{Running, TestDb};
use crate::triggers::{drained_events, trigger_settings};

const SEED: &str = "
    INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
    INSERT INTO domains (id, organization_id, name) VALUES ('demo', 'quant', 'Demo')";

/// What both sources must agree on: everything but the ids, times and where in the WAL.
fn comparable(event: &Value) -> Value {
    let mut event = event.clone();
    if let Some(object) = event.as_object_mut() {
        object.remove("id");
        object.remove("timestamp");
        for row in ["data", "old"] {
            if let Some(Value::Object(row)) = object.get_mut(row) {
                for key in ["created_at", "updated_at"] {
                    row.remove(key);
                }
            }
        }
        if let Some(Value::Object(source)) = object.get_mut("source") {
            source.remove("lsn");
            source.remove("xid");
        }
    }
    event
}

async fn settled(db: &TestDb, source: SourceMode) -> Vec<Value> {
    match source {
        SourceMode::Triggers => drained_events(db).await,
        _ => db.settled_events().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_emits_are_transactional_in_order_and_identical_in_both_modes() {
    let mut logs = Vec::new();
    for source in [SourceMode::Replication, SourceMode::Triggers] {
        let db = TestDb::migrated().await;
        let settings =
            if source == SourceMode::Triggers { trigger_settings(&db) } else { db.settings() };
        let server = Running::start(settings).await;
        let mut client = db.client().await;
        client.batch_execute(SEED).await.expect("seed");

        // Rolled back: neither the row nor the event ever appears.
        let tx = client.transaction().await.expect("begin");
        tx.batch_execute(
            "INSERT INTO agents (id, organization_id, name) VALUES ('ghost', 'quant', 'ghost');
             SELECT rowcast.emit('deployment.log', '{\"line\": \"never\"}', organization_id => 'quant')",
        )
        .await
        .expect("emit in a doomed transaction");
        tx.rollback().await.expect("rollback");

        // Committed, interleaved with row changes: insert, emit, update, emit.
        let tx = client.transaction().await.expect("begin");
        tx.batch_execute(
            "INSERT INTO agents (id, organization_id, domain_id, name, status)
                  VALUES ('agt-1', 'quant', 'demo', 'support', 'active');
             SELECT rowcast.emit('agent.heartbeat', '{\"id\": \"agt-1\", \"load\": 0.50, \"tags\": [\"a\", null]}',
                                 organization_id => 'quant', domain_id => 'demo');
             UPDATE agents SET name = 'helper' WHERE id = 'agt-1';
             SELECT rowcast.emit('deployment.log', '{\"line\": \"step 3/7 ü\"}',
                                 organization_id => 'quant', severity => 'warning')",
        )
        .await
        .expect("emits");
        tx.commit().await.expect("commit");
        // An emit alone in its transaction, with every field left to its default.
        client.batch_execute("SELECT rowcast.emit('cache.miss', '{}')").await.expect("lone emit");

        let events = settled(&db, source).await;
        server.stop().await;
        let text = serde_json::to_string(&events).expect("json");
        assert!(!text.contains("ghost") && !text.contains("never"), "rolled back: {text}");
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        let from = types.iter().position(|t| *t == "agent.created").expect("agent.created");
        assert_eq!(
            types[from..],
            ["agent.created", "agent.heartbeat", "agent.updated", "deployment.log", "cache.miss"],
            "{source:?}: in transaction order, contiguous"
        );
        let ids: Vec<u64> = events[from..].iter().filter_map(|e| e["id"].as_u64()).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "contiguous ids {ids:?}");
        let heartbeat = &events[from + 1];
        // Numbers keep their digits, as jsonb prints them.
        assert_eq!(
            heartbeat["data"].to_string(),
            r#"{"id":"agt-1","load":0.50,"tags":["a",null]}"#
        );
        assert_eq!(
            (&heartbeat["organization_id"], &heartbeat["domain_id"], &heartbeat["severity"]),
            (&json!("quant"), &json!("demo"), &json!("debug")),
            "the declared default severity"
        );
        assert!(heartbeat.get("old").is_none() && heartbeat.get("changed").is_none());
        assert_eq!(heartbeat["source"]["kind"], "app");
        assert_eq!(heartbeat["source"]["via"], "sql");
        assert_eq!(heartbeat["source"]["xid"], events[from]["source"]["xid"], "same transaction");
        match source {
            SourceMode::Triggers => assert!(heartbeat["source"].get("lsn").is_none()),
            _ => assert_eq!(heartbeat["source"]["lsn"], events[from]["source"]["lsn"]),
        }
        assert_eq!(events[from + 3]["severity"], "warning", "the caller's severity wins");
        let lone = &events[from + 4];
        assert_eq!(
            (&lone["data"], &lone["organization_id"], &lone["domain_id"], &lone["severity"]),
            (&json!({}), &Value::Null, &Value::Null, &json!("debug"))
        );
        logs.push(events[from..].iter().map(comparable).collect::<Vec<_>>());
    }
    assert_eq!(logs[0], logs[1], "replication and triggers give identical events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_emit_fails_the_statement_with_a_clear_message() {
    for source in [SourceMode::Replication, SourceMode::Triggers] {
        let db = TestDb::migrated().await;
        let mut settings =
            if source == SourceMode::Triggers { trigger_settings(&db) } else { db.settings() };
        settings.server.max_event_bytes = 64;
        let server = Running::start(settings).await;
        let client = db.client().await;
        let cases = [
            (
                "SELECT rowcast.emit('deployment.log', jsonb_build_object('line', repeat('x', 60)))",
                "bytes as JSON; at most 64 (--max-event-bytes)",
            ),
            ("SELECT rowcast.emit('Deployment.log', '{}')", "is not <entity>.<action>"),
            ("SELECT rowcast.emit('deployment', '{}')", "is not <entity>.<action>"),
            ("SELECT rowcast.emit(NULL, '{}')", "type NULL"),
            ("SELECT rowcast.emit('build.started', '{}')", "is not declared in the mapping"),
            ("SELECT rowcast.emit('deployment.log', '[1]')", "must be a JSON object, not array"),
            ("SELECT rowcast.emit('deployment.log', NULL)", "must be a JSON object, not NULL"),
            (
                "SELECT rowcast.emit('deployment.log', '{}', severity => 'fatal')",
                "is not debug, info, warning, error or critical",
            ),
        ];
        for (call, expected) in cases {
            let err = client.batch_execute(call).await.expect_err(call);
            let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
            assert!(message.contains(expected), "{source:?} {call}: {message}");
            assert!(message.starts_with("rowcast.emit: "), "{message}");
        }
        // Every severity is accepted; a good call after the bad ones is captured alone.
        for severity in ["debug", "info", "warning", "error", "critical"] {
            client
                .execute(
                    "SELECT rowcast.emit('deployment.log', '{}', severity => $1)",
                    &[&severity],
                )
                .await
                .expect(severity);
        }
        let events = settled(&db, source).await;
        server.stop().await;
        let severities: Vec<&str> = events.iter().filter_map(|e| e["severity"].as_str()).collect();
        assert_eq!(severities, ["debug", "info", "warning", "error", "critical"]);
    }
}

/// 16 writers, each committing transactions of one row change and one `rowcast.emit()` (in
/// either order), while the publisher is SIGKILLed again and again.
async fn emit_while_killed(
    db: &TestDb,
    triggers: bool,
    mut child: std::process::Child,
    spawn: impl Fn() -> std::process::Child,
) {
    use crate::durability::kill_while_writing;
    const WRITERS: usize = 16;
    const TOTAL: usize = 5_000;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = db.client().await;
        let share = TOTAL / WRITERS + usize::from(w < TOTAL % WRITERS);
        writers.push(tokio::spawn(async move {
            for i in 0..share {
                let insert = "INSERT INTO agents (id, organization_id, name) VALUES ($1, 'quant', $1)";
                let emit = "SELECT rowcast.emit('agent.heartbeat', jsonb_build_object('id', $1::text), organization_id => 'quant')";
                let id = format!("w{w}-{i}");
                let tx = client.transaction().await.expect("begin");
                let order = if i % 2 == 0 { [insert, emit] } else { [emit, insert] };
                for statement in order {
                    tx.execute(statement, &[&id]).await.expect(statement);
                }
                tx.commit().await.expect("commit");
            }
        }));
    }
    let all = tokio::spawn(async move {
        for writer in writers {
            writer.await.expect("writer");
        }
    });
    let kills = kill_while_writing(&mut child, all, 200..900, &spawn).await;
    let events = if triggers { drained_events(db).await } else { db.settled_events().await };
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent.created" || e["type"] == "agent.heartbeat")
        .collect();
    assert_eq!(ours.len(), 2 * TOTAL, "after {kills} kills: every change and emit exactly once");
    // Per writer, its transactions in commit order, each one's two events adjacent in its order.
    let mut next = [0usize; WRITERS];
    for pair in ours.chunks(2) {
        let [a, b] = pair else { panic!("odd count") };
        let name = |e: &Value| e["data"]["id"].as_str().expect("id").to_owned();
        assert_eq!(name(a), name(b), "a transaction's events are contiguous");
        assert_eq!(b["id"].as_u64(), a["id"].as_u64().map(|id| id + 1));
        let id = name(a);
        let (w, i) = id[1..].split_once('-').expect("w-i");
        let (w, i): (usize, usize) = (w.parse().expect("w"), i.parse().expect("i"));
        assert_eq!(i, next[w], "writer {w} in commit order, nothing lost or repeated");
        next[w] += 1;
        let first = if i % 2 == 0 { "agent.created" } else { "agent.heartbeat" };
        assert_eq!(a["type"], first, "{id}: the order within the transaction");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_emitting_loses_and_repeats_nothing_replication() {
    let db = TestDb::migrated().await;
    crate::durability::seed(&db.client().await).await;
    rowcast::setup::setup_replication(&db.settings()).await.expect("setup");
    let spawn = || crate::durability::spawn_serve(&db);
    let child = spawn();
    // Everything committed from here on is the slot's.
    crate::durability::wait_for_slot(&db).await;
    emit_while_killed(&db, false, child, spawn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_emitting_loses_and_repeats_nothing_triggers() {
    let db = TestDb::migrated().await;
    crate::durability::seed(&db.client().await).await;
    rowcast::setup::setup_triggers(&trigger_settings(&db)).await.expect("setup");
    let spawn = || crate::triggers::spawn_serve(&db);
    emit_while_killed(&db, true, spawn(), spawn).await;
}
