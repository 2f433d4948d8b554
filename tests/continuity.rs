//! Continuity (SPEC §9, issue "Reliability in the real world"): when rowcast cannot prove that
//! the slot continues where the log left off, it stops capturing and says so everywhere,
//! instead of carrying on past a silent gap.

use std::time::Duration;

use rowcast::publisher::State;
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

async fn wait_for_broken(running: &mut Running) -> String {
    let broken = tokio::time::timeout(
        Duration::from_secs(30),
        running.watch.state.wait_for(|state| matches!(state, State::Broken { .. })),
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

    let reason = wait_for_broken(&mut running).await;
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
    running.stop().await;
}
