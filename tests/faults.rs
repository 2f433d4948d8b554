//! Failure modes of the network between rowcast and Postgres, through the fault proxy
//! (`support::proxy`): connections reset at the worst moments must cost a reconnect, never
//! the server, and never an event.

use std::net::SocketAddr;
use std::time::Duration;

use rowcast::publisher::State;

use crate::durability::{assert_sequence, created_sequence, seed, write_numbered};
use crate::support::proxy::FaultProxy;
use crate::support::{Cluster, Running, TestDb};

/// A piece of the SQL of the mapping check (`Catalog::columns`), which the publisher runs on
/// every (re)connect before it streams.
const MAPPING_CHECK: &str = "AS w(schema, name)";

fn upstream(db: &TestDb) -> SocketAddr {
    let port = db.config().config.get_ports().first().copied().unwrap_or(5432);
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A connection cut while the publisher checks the mapping on reconnect is a lost connection
/// like any other: the publisher reconnects instead of stopping, and every change committed
/// meanwhile reaches the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_during_the_reconnect_mapping_check_is_retried() {
    let db = TestDb::migrated().await;
    seed(&db.client().await).await;
    let proxy = FaultProxy::start(upstream(&db)).await;
    let mut settings = db.settings();
    // The source goes through the proxy; the log (same database) stays direct.
    settings.database = proxy.route(&settings.database);
    let mut running = Running::start(settings).await;

    proxy.cut_on(MAPPING_CHECK);
    proxy.reset_all();
    write_numbered(db.client().await, 300).await;

    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        while proxy.cuts() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(cut.is_ok(), "the reconnecting publisher never ran its mapping check");
    // It must come back to streaming on its own, not stop.
    let back = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let state = running.watch.state.borrow_and_update().clone();
            match state {
                State::Streaming => return Ok(()),
                State::Stopped => return Err("the publisher stopped"),
                State::Starting | State::Reconnecting { .. } => {}
                State::Broken { reason } => panic!("continuity broken: {reason}"),
            }
            if running.watch.state.changed().await.is_err() {
                return Err("the publisher is gone");
            }
        }
    })
    .await;
    assert_eq!(back, Ok(Ok(())), "after a cut mapping check the publisher must stream again");

    let events = db.settled_events().await;
    assert_sequence(&created_sequence(&events), 300, "changes committed around the cut");
    running.stop().await;
}

/// A fast shutdown of Postgres while rowcast is caught up: the walsender ends the stream
/// without CopyDone. That is a server going away, not a protocol violation: rowcast
/// reconnects when the server is back and captures what is committed then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_postgres_shutdown_is_a_reconnect() {
    let mut cluster = Cluster::start(&[]).expect("start cluster");
    let db = TestDb::on(&cluster).await;
    db.migrate().await;
    seed(&db.client().await).await;
    // The log lives elsewhere, so the stream is the first to see the shutdown.
    let log = TestDb::new().await;
    let mut settings = db.settings();
    settings.log = log.config();
    // Confirm promptly, so the walsender sees the slot caught up when it is told to stop.
    settings.status_interval = Duration::from_millis(50);
    let mut running = Running::start(settings).await;
    write_numbered(db.client().await, 100).await;
    running.wait_for_id(100, Duration::from_secs(60)).await;
    // Caught up and idle when the server stops (the slot has confirmed everything the walsender
    // sent: then it ends the stream with CommandComplete alone), three times over.
    for round in 1..=3 {
        let lsn = db.current_wal_lsn().await;
        db.wait_for_slot_to_confirm(&lsn, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| cluster.restart_fast()).expect("restart cluster");
        let client = db.client().await;
        client
            .execute(
                "INSERT INTO agents (id, organization_id, domain_id, name) VALUES ($1, 'quant', 'demo', $2)",
                &[&format!("agt-{}", 100 + round), &format!("n-{}", 100 + round)],
            )
            .await
            .expect("insert after restart");
        running.wait_for_id(100 + round, Duration::from_secs(60)).await;
        assert_eq!(*running.watch.state.borrow(), State::Streaming);
    }
    running.stop().await;
    assert_sequence(&created_sequence(&log.events().await), 103, "across fast shutdowns");
    drop(db);
    drop(cluster);
}
