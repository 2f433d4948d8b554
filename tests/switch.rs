//! Switching the capture source (issue "Reliability in the real world", item 5): `auto`
//! decides once and records it; a switch is explicit, drains the old source, removes it, and
//! every committed change reaches the log exactly once while writers keep writing.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::durability::assert_sequence;
use crate::support::{TestDb, client, free_addr, nudge_slot_creation, rowcast_command};

/// A role that owns the reference tables but may not replicate (yet).
async fn owner_without_replication(db: &TestDb) -> (String, String) {
    let role = format!("{}_owner", db.name);
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; ALTER DATABASE {db} OWNER TO {role};
             GRANT CREATE ON DATABASE {db} TO {role}; ALTER SCHEMA public OWNER TO {role};",
            db = db.name
        ))
        .await
        .expect("role");
    let (_, host) = db.url.split_once('@').expect("a URL with a user");
    let url = format!("postgres://{role}@{host}");
    let client = crate::support::connect(&url).await;
    rowcast::setup::migrate(&client).await.expect("migrate as the owner");
    crate::durability::seed(&client).await;
    (role, url)
}

struct Serve {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Serve {
    /// `rowcast serve` with `source` (None: auto), waited for until ready.
    async fn start(db: &TestDb, url: &str, source: Option<&str>) -> Serve {
        let addr = free_addr();
        let listen = addr.to_string();
        let mut command = rowcast_command(
            url,
            &["serve", "--slot", &db.name, "--listen", &listen, "--status-interval", "1s"],
        );
        command.args(["--poll-interval", "100ms"]).stderr(Stdio::inherit());
        if let Some(source) = source {
            command.args(["--source", source]);
        }
        let child = command.spawn().expect("spawn rowcast serve");
        let mut serve = Serve { child, addr };
        let nudge = tokio::spawn(nudge_slot_creation(db.config()));
        let ready = tokio::time::timeout(Duration::from_secs(90), async {
            while client::get_status(addr, "/readyz").await != Some(200) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        nudge.abort();
        if ready.is_err() {
            serve.stop();
            panic!("rowcast serve --source {source:?} never became ready");
        }
        serve
    }

    async fn source(&self) -> String {
        let (_, stats) = client::get(self.addr, "/api/events/stats").await;
        stats["source"].as_str().unwrap_or_default().to_owned()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().expect("exit");
        assert!(status.success(), "serve exits cleanly: {status:?}");
    }
}

/// Inserts agents `n-1`, `n-2`, ... one transaction each until stopped; returns how many.
fn keep_writing(url: String, stop: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = crate::support::connect(&url).await;
        let mut n = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            n += 1;
            client
                .execute(
                    "INSERT INTO agents (id, organization_id, domain_id, name) VALUES ($1, 'quant', 'demo', $2)",
                    &[&format!("agt-{n}"), &format!("n-{n}")],
                )
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

/// Emits `deployment.log` events numbered 1, 2, ... from SQL, one transaction each, until
/// stopped; returns how many.
fn keep_emitting(url: String, stop: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = crate::support::connect(&url).await;
        let mut n: i64 = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            n += 1;
            client
                .execute(
                    "SELECT rowcast.emit('deployment.log', jsonb_build_object('n', $1::bigint), organization_id => 'quant')",
                    &[&n],
                )
                .await
                .expect("emit");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n as u64
    })
}

fn emitted(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == "deployment.log")
        .filter_map(|e| e["data"]["n"].as_u64())
        .collect()
}

fn created(events: &[Value]) -> Vec<u64> {
    crate::durability::created_sequence(events)
}

async fn wait_for_created(db: &TestDb, total: u64, emits: u64) -> Vec<Value> {
    for _ in 0..600 {
        let events = db.events().await;
        if created(&events).len() as u64 >= total && emitted(&events).len() as u64 >= emits {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.events().await
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_decides_once_and_switches_are_drained_exactly_once() {
    let db = TestDb::new().await;
    let (role, url) = owner_without_replication(&db).await;
    // 1. auto without REPLICATION: triggers, recorded. Writes start once capture exists.
    let mut serve = Serve::start(&db, &url, None).await;
    assert_eq!(serve.source().await, "triggers");
    let stop = Arc::new(AtomicU64::new(0));
    let writer = keep_writing(url.clone(), stop.clone());
    // And an application emitting from SQL: rowcast.emit() follows each switch too.
    let emitter = keep_emitting(url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    serve.stop();

    // 2. The role gains REPLICATION: auto keeps what it recorded.
    db.client()
        .await
        .batch_execute(&format!("ALTER ROLE {role} REPLICATION"))
        .await
        .expect("grant");
    let mut serve = Serve::start(&db, &url, None).await;
    assert_eq!(serve.source().await, "triggers", "auto must not switch on its own");
    serve.stop();

    // 3. An explicit switch to replication while the writer keeps writing.
    let mut serve = Serve::start(&db, &url, Some("replication")).await;
    assert_eq!(serve.source().await, "replication");
    tokio::time::sleep(Duration::from_millis(500)).await;
    serve.stop();
    let triggers = count(
        &db,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rowcast_capture%' AND NOT tgisinternal",
    )
    .await;
    assert_eq!(triggers, 0, "the capture triggers are removed");
    let outbox = count(&db, "SELECT count(*) FROM pg_class WHERE relname = 'outbox'").await;
    assert_eq!(outbox, 0, "the drained outbox is removed");

    // 4. And back to triggers: the slot is drained to the switch, then dropped.
    let mut serve = Serve::start(&db, &url, Some("triggers")).await;
    assert_eq!(serve.source().await, "triggers");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(1, Ordering::Relaxed);
    let total = writer.await.expect("writer");
    let emits = emitter.await.expect("emitter");
    let events = wait_for_created(&db, total, emits).await;
    serve.stop();
    let slots = count(
        &db,
        &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'", db.name),
    )
    .await;
    assert_eq!(slots, 0, "no slot is left holding WAL");
    assert_sequence(&created(&events), total, "across two switches");
    assert_sequence(&emitted(&events), emits, "emits across two switches");
    let ids: Vec<u64> = events.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
    let _ = db
        .client()
        .await
        .batch_execute(&format!("ALTER DATABASE {} OWNER TO postgres", db.name))
        .await;
}
