//! Failure modes of the network between rowcast and Postgres, through the fault proxy
//! (`support::proxy`): connections reset at the worst moments must cost a reconnect, never
//! the server, and never an event.

use std::net::SocketAddr;
use std::time::Duration;

use rowcast::publisher::State;

use crate::durability::{assert_sequence, created_sequence, seed, write_numbered};
use crate::support::proxy::FaultProxy;
use crate::support::{Running, TestDb};

/// A piece of the SQL of the mapping check (`Catalog::columns`), which the publisher runs on
/// every (re)connect before it streams.
const MAPPING_CHECK: &str = "AS w(schema, name)";

fn upstream(db: &TestDb) -> SocketAddr {
    let port = db.config().get_ports().first().copied().unwrap_or(5432);
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
