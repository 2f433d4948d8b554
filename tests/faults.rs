//! Failure modes of the network between rowcast and Postgres, through the fault proxy
//! (`support::proxy`): connections reset at the worst moments must cost a reconnect, never
//! the server, and never an event.

use std::net::SocketAddr;
use std::time::Duration;

use rowcast::publisher::State;

use crate::durability::{assert_sequence, created_sequence, seed, write_numbered};
use crate::support::proxy::FaultProxy;
use crate::support::{Cluster, Running, TestDb, client};

/// How long a recovery may take before a test fails.
const WAIT: Duration = Duration::from_secs(60);

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
    let back = tokio::time::timeout(WAIT, async {
        loop {
            let state = running.watch.state.borrow_and_update().clone();
            match state {
                State::Streaming => return Ok(()),
                State::Stopped => return Err("the publisher stopped"),
                State::Starting | State::Standby | State::Reconnecting { .. } => {}
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
    running.wait_for_id(100, WAIT).await;
    // Caught up and idle when the server stops (the slot has confirmed everything the walsender
    // sent: then it ends the stream with CommandComplete alone), three times over.
    for round in 1..=3 {
        let lsn = db.current_wal_lsn().await;
        db.wait_for_slot_to_confirm(&lsn, WAIT).await;
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
        running.wait_for_id(100 + round, WAIT).await;
        assert_eq!(*running.watch.state.borrow(), State::Streaming);
    }
    running.stop().await;
    assert_sequence(&created_sequence(&log.events().await), 103, "across fast shutdowns");
    drop(db);
    drop(cluster);
}

/// A replication connection that silently stops carrying bytes (a dead network path: no FIN,
/// no RST) is noticed by its receive deadline, readiness says so meanwhile, and capture
/// reconnects and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_replication_connection_is_noticed_and_replaced() {
    // The receive deadline follows the server's wal_sender_timeout: keep it short here.
    let cluster = Cluster::start(&[("wal_sender_timeout", "4s")]).expect("start cluster");
    let db = TestDb::on(&cluster).await;
    db.migrate().await;
    seed(&db.client().await).await;
    let proxy = FaultProxy::start(upstream(&db)).await;
    let mut settings = db.settings();
    settings.database = proxy.route(&settings.database);
    let mut running = Running::start(settings).await;
    write_numbered(db.client().await, 100).await;
    running.wait_for_id(100, WAIT).await;

    proxy.blackhole_open();
    let noticed = tokio::time::timeout(
        Duration::from_secs(20),
        running.watch.state.wait_for(|state| matches!(state, State::Reconnecting { .. })),
    )
    .await
    .is_ok_and(|state| state.is_ok());
    assert!(noticed, "a silent replication connection must be noticed within its deadline");
    assert_eq!(client::get_status(running.addr, "/readyz").await, Some(503));

    let more = db.client().await;
    more.batch_execute(
        "INSERT INTO agents (id, organization_id, domain_id, name)
         SELECT 'agt-' || i, 'quant', 'demo', 'n-' || i FROM generate_series(101, 150) i",
    )
    .await
    .expect("write while reconnecting");
    running.wait_for_id(150, WAIT).await;
    assert_eq!(*running.watch.state.borrow(), State::Streaming);
    running.stop().await;
    assert_sequence(&created_sequence(&db.events().await), 150, "across a dead connection");
    drop(db);
    drop(cluster);
}

/// A log database that does not answer: readiness, stats and history answer at once (503, or
/// stats without the log's figures) instead of hanging for as long as TCP takes to give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stats_and_history_answer_when_the_log_does_not() {
    let db = TestDb::migrated().await;
    seed(&db.client().await).await;
    let proxy = FaultProxy::start(upstream(&db)).await;
    let mut settings = db.settings();
    // The log's readers (history, readiness, stats) go through the proxy.
    settings.log = proxy.route(&settings.log);
    let running = Running::start(settings).await;
    assert_eq!(client::get_status(running.addr, "/readyz").await, Some(200));

    proxy.blackhole_new(true);
    proxy.blackhole_open();
    for (path, expected) in [("/readyz", 503), ("/api/events", 503), ("/api/events/stats", 200)] {
        let started = std::time::Instant::now();
        let status = client::get_status(running.addr, path).await;
        let took = started.elapsed();
        assert_eq!(status, Some(expected), "{path}");
        // Hanging would take tens of seconds; answering takes the probe's deadline.
        assert!(took < Duration::from_secs(8), "{path} took {took:?}");
    }
    let (_, stats) = client::get(running.addr, "/api/events/stats").await;
    assert!(stats["log_size_bytes"].is_null(), "{stats}");

    proxy.blackhole_new(false);
    proxy.reset_all();
    // Ready again once the log answers.
    crate::support::wait_until_ready(&db, running.addr).await;
    running.stop().await;
}

/// `rowcast serve` started before its database is reachable waits for it, saying so, instead
/// of exiting; once the database answers it sets up and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_a_database_that_is_not_there_yet() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let db = TestDb::migrated().await;
    let port = rowcast::apps::cluster::free_port().expect("a free port");
    let listen = crate::support::free_addr();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    let listen_arg = listen.to_string();
    let args = ["serve", "--source", "replication", "--slot", &db.name, "--listen", &listen_arg];
    let mut child = crate::support::rowcast_command(&url, &args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rowcast serve");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let expected = format!("waiting for 127.0.0.1:{port}/{} (source)", db.name);
    let said = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.recv().await {
            if line.contains(&expected) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(said, Ok(true), "serve should say what it waits for: {expected}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(child.try_wait().expect("status").is_none(), "serve must wait, not exit");

    // The database appears at that address.
    let _proxy = FaultProxy::start_on(port, upstream(&db)).await;
    let nudge = tokio::spawn(crate::support::nudge_slot_creation(db.config()));
    let ready = tokio::time::timeout(WAIT, async {
        while client::get_status(listen, "/readyz").await != Some(200) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    nudge.abort();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().expect("exit status");
    assert!(ready.is_ok(), "serve never became ready once the database answered");
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
}

/// After a long outage the reconnect backoff is at its cap; once the database is back,
/// capture resumes within that cap (5 s by default), not half a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_resumes_within_the_backoff_cap_after_a_long_outage() {
    let db = TestDb::migrated().await;
    seed(&db.client().await).await;
    let proxy = FaultProxy::start(upstream(&db)).await;
    let mut settings = db.settings();
    settings.database = proxy.route(&settings.database);
    settings.max_backoff = rowcast::config::Settings::new(db.config()).max_backoff;
    let mut running = Running::start(settings).await;

    // Down for 15 s: every reconnect is refused, the backoff grows to its cap.
    proxy.refuse(true);
    proxy.reset_all();
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(matches!(*running.watch.state.borrow(), State::Reconnecting { .. }));
    proxy.refuse(false);
    let back = std::time::Instant::now();
    let streaming = tokio::time::timeout(
        WAIT,
        running.watch.state.wait_for(|state| *state == State::Streaming),
    )
    .await
    .is_ok_and(|state| state.is_ok());
    let took = back.elapsed();
    assert!(streaming, "capture never resumed");
    // The cap plus a reconnect; a 30 s cap would show here.
    assert!(took < Duration::from_secs(12), "capture resumed {took:?} after the outage ended");
    write_numbered(db.client().await, 20).await;
    running.wait_for_id(20, Duration::from_secs(30)).await;
    running.stop().await;
}
