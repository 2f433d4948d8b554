//! Continuity (SPEC §9, issue "Reliability in the real world"): when rowcast cannot prove that
//! the slot continues where the log left off, it stops capturing and says so everywhere,
//! instead of carrying on past a silent gap.

use std::time::Duration;

use rowcast::publisher::{Acceptance, State, Watch};
use serde_json::Value;
use tokio_postgres::Client;

use crate::durability::{created_sequence, seed, write_numbered};
use crate::support::{Running, TestDb, client};

/// Ends the walsender of `slot` and drops the slot, retrying while the publisher reconnects.
async fn drop_slot_under_it(admin: &Client, slot: &str) {
    for _ in 0..200 {
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                  WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await;
        let dropped = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await;
        if matches!(dropped, Ok(1)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("could not drop slot {slot}");
}

/// How long a state change may take to show.
const WAIT: Duration = Duration::from_secs(30);

async fn wait_for_broken(watch: &mut Watch) -> String {
    let broken = tokio::time::timeout(
        WAIT,
        watch.state.wait_for(|state| matches!(state, State::Broken { .. })),
    )
    .await;
    match broken.ok().and_then(|state| state.ok()).map(|state| state.clone()) {
        Some(State::Broken { reason }) => reason,
        other => panic!("the publisher did not report a broken source: {other:?}"),
    }
}

/// The slot dropped externally: rowcast does not recreate it and carry on (the changes made
/// meanwhile would be gone without a trace); it stops capturing, readiness fails, stats say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_capture_loudly() {
    let db = TestDb::migrated().await;
    seed(&db.client().await).await;
    let mut running = Running::start(db.settings()).await;
    write_numbered(db.client().await, 100).await;
    assert_eq!(created_sequence(&db.settled_events().await).len(), 100);

    let admin = db.client().await;
    drop_slot_under_it(&admin, &db.name).await;
    admin
        .batch_execute(
            "INSERT INTO agents (id, organization_id, domain_id, name)
             SELECT 'late-' || i, 'quant', 'demo', 'late' FROM generate_series(1, 50) i",
        )
        .await
        .expect("write after the drop");

    let reason = wait_for_broken(&mut running.watch).await;
    assert!(reason.contains("no longer exists"), "{reason}");
    assert_eq!(client::get_status(running.addr, "/readyz").await, Some(503));
    let (status, stats) = client::get(running.addr, "/api/events/stats").await;
    assert_eq!((status, stats["state"].as_str()), (200, Some("broken")), "{stats}");
    assert!(stats["error"].as_str().is_some_and(|e| e.contains("no longer exists")), "{stats}");
    // Still refusing a while later: no slot recreated, nothing appended past the gap.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(*running.watch.state.borrow(), State::Broken { .. }));
    let slots: i64 = admin
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&db.name])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "the slot must not be recreated silently");
    assert_eq!(created_sequence(&db.events().await).len(), 100);
    let (_, metrics) = client::get(running.addr, "/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(metrics.lines().any(|l| l == "rowcast_continuity_broken 1"), "{metrics}");

    // The operator accepts the gap: it is recorded, and capture resumes on its own.
    let acceptance = rowcast::publisher::accept_gap(&db.settings()).await.expect("accept");
    let Acceptance::Recorded { id, from, to, .. } = acceptance else {
        panic!("expected a recorded gap, got {acceptance:?}");
    };
    assert!(to > from, "the gap runs forward: {from} to {to}");
    let streaming = tokio::time::timeout(
        WAIT,
        running.watch.state.wait_for(|state| *state == State::Streaming),
    )
    .await
    .is_ok_and(|state| state.is_ok());
    assert!(streaming, "capture did not resume after the gap was accepted");
    admin
        .batch_execute(
            "INSERT INTO agents (id, organization_id, domain_id, name) VALUES ('after', 'quant', 'demo', 'after')",
        )
        .await
        .expect("write after accepting");
    let events = db.settled_events().await;
    let gap: Vec<&Value> = events.iter().filter(|e| e["type"] == "rowcast.gap").collect();
    assert_eq!(gap.len(), 1, "one gap event");
    assert_eq!(gap[0]["id"], id);
    assert_eq!(gap[0]["severity"], "critical");
    assert_eq!(gap[0]["source"]["kind"], "rowcast");
    assert!(gap[0]["data"]["reason"].as_str().is_some_and(|r| r.contains("no longer exists")));
    // After the gap: exactly the change made after accepting, once.
    let after: Vec<&str> = events
        .iter()
        .skip_while(|e| e["type"] != "rowcast.gap")
        .filter(|e| e["type"] == "agent.created")
        .filter_map(|e| e["data"]["id"].as_str())
        .collect();
    assert_eq!(after, ["after"]);
    assert_eq!(client::get_status(running.addr, "/readyz").await, Some(200));
    // Accepting again when continuity holds writes nothing.
    let again = rowcast::publisher::accept_gap(&db.settings()).await.expect("accept again");
    assert_eq!(again, Acceptance::Holds);
    running.stop().await;
}

/// A log whose cursor is beyond the source's WAL belongs to another life of the database (a
/// restore, a recreated cluster on the same address): capture refuses instead of skipping
/// everything until the new WAL passes the old cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_beyond_the_servers_wal_stops_capture_loudly() {
    let db = TestDb::migrated().await;
    seed(&db.client().await).await;
    let running = Running::start(db.settings()).await;
    write_numbered(db.client().await, 10).await;
    db.settled_events().await;
    running.stop().await;
    // What a restore to an older backup looks like from the log's side.
    db.client()
        .await
        .execute(
            "UPDATE rowcast.cursors SET progress = progress + (1::bigint << 40) WHERE source = $1",
            &[&format!("replication:{}", db.name)],
        )
        .await
        .expect("move the cursor");
    let mut settings = db.settings();
    settings.server.listen = crate::support::free_addr();
    let server = rowcast::server::Server::new(settings).await.expect("server");
    let mut watch = server.watch();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(listener, shutdown.clone()));
    let reason = wait_for_broken(&mut watch).await;
    assert!(reason.contains("restored or recreated"), "{reason}");
    shutdown.cancel();
    let stopped = tokio::time::timeout(WAIT, task).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "a broken publisher still shuts down cleanly");
}
