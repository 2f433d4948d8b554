//! Trigger capture (SPEC §2): the same events as replication, exactly once, in commit order.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rowcast::config::SourceMode;
use rowcast::mapping::{DEFAULT_MAPPING, Mapping};
use serde_json::Value;

use crate::durability::{
    assert_sequence, created_sequence, kill_while_writing, seed, write_numbered,
};
use crate::support::{Cluster, Running, TestDb};

const WAIT: Duration = Duration::from_secs(60);

pub fn trigger_settings(db: &TestDb) -> rowcast::config::Settings {
    let mut settings = db.settings();
    settings.source = SourceMode::Triggers;
    settings.poll_interval = Duration::from_millis(200);
    settings
}

/// Waits until the outbox is empty, commit records included, and returns the log.
pub async fn drained_events(db: &TestDb) -> Vec<Value> {
    let client = db.client().await;
    for _ in 0..1200 {
        let left: i64 = client
            .query_one(
                "SELECT (SELECT count(*) FROM rowcast.outbox) + (SELECT count(*) FROM rowcast.outbox_commits)",
                &[],
            )
            .await
            .expect("outbox")
            .get(0);
        if left == 0 {
            return db.events().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the outbox never drained");
}

/// The parts of an event both sources must agree on. The two databases ran the workload at
/// different times, so the columns `now()` fills are masked (their rendering is covered by the
/// fidelity table's explicit timestamps).
fn comparable(event: &Value) -> Value {
    let mask = |row: &Value| {
        let mut row = row.clone();
        if let Some(object) = row.as_object_mut() {
            for key in ["created_at", "updated_at"] {
                if let Some(value) = object.get_mut(key) {
                    *value = Value::String("<now>".into());
                }
            }
        }
        row
    };
    serde_json::json!({
        "type": event["type"], "organization_id": event["organization_id"],
        "domain_id": event["domain_id"], "severity": event["severity"],
        "data": mask(&event["data"]), "old": mask(&event["old"]), "changed": event["changed"],
        "table": event["source"]["table"], "op": event["source"]["op"],
    })
}

const WORKLOAD: &str = "
    INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
    INSERT INTO domains (id, organization_id, name) VALUES ('demo', 'quant', 'Demo');
    INSERT INTO agents (id, organization_id, domain_id, name, status) VALUES ('agt-001', 'quant', 'demo', 'support', 'active');
    UPDATE agents SET status = 'inactive' WHERE id = 'agt-001';
    INSERT INTO instances (id, organization_id, domain_id, agent_id) VALUES ('ins-1', 'quant', 'demo', 'agt-001');
    UPDATE instances SET status = 'running' WHERE id = 'ins-1';
    INSERT INTO deployments (id, organization_id, domain_id, version) VALUES ('dep-1', 'quant', 'demo', 'v1');
    UPDATE deployments SET status = 'running' WHERE id = 'dep-1';
    UPDATE deployments SET status = 'failed', error = 'boom' WHERE id = 'dep-1';
    INSERT INTO users (id, organization_id, email, name, password_hash) VALUES ('usr-1', 'quant', 'a@example.com', 'Ann', 'secret-1');
    UPDATE users SET password_hash = 'secret-2', name = 'Anna' WHERE id = 'usr-1';
    DELETE FROM agents WHERE id = 'agt-001';
    DELETE FROM users WHERE id = 'usr-1';
    INSERT INTO fidelity VALUES (1, 'first', 'plain ünïcödé \"quoted\" \\ back', 'varchar', 'ab',
        1.50, 1234567890123456789012345678901234567890, 3.14159, 0.1, true, -32768, 2147483647,
        -9223372036854775808, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '{\"b\": 1.0e2, \"a\": [1, 2.50], \"a\": \"dup wins\"}', '{\"nested\": {\"k\": [1, \"two\", null]}, \"num\": 12.340}',
        '\\x00ff10', '2024-02-29', '23:59:59.999999', '12:00:00+05:30', '2024-01-02 03:04:05.5',
        '2024-06-30 23:59:59.123456+02', '1 year 2 mons 3 days 04:05:06.7', '{1,NULL,3}', '{\"a b\",NULL,\"c,d\"}',
        '{NaN,Infinity,-Infinity,1.5e300}', '{\"2024-01-01 00:00:00+00\",infinity}', ARRAY['{\"x\":1}'::jsonb],
        'happy', '{sad,ok}', 42.5, '192.168.0.1/24', 12.34, '[1,10)', ROW(1, 'x'), repeat('big', 40000));
    UPDATE fidelity SET t = 'changed', f8 = 'NaN', tstz = '-infinity', d = '0044-03-15 BC' WHERE id = 1;
    INSERT INTO fidelity (id, big) VALUES (2, repeat('m', 1048576));
    INSERT INTO fidelity (id, j, p) VALUES (3, '{\"z\": [1.0, \"\\u0000\"],  \"a\": {\"y\": 1, \"b\": 2e2}}', ROW(2, '\\u0000'));
    DELETE FROM fidelity WHERE id = 2;
    TRUNCATE users";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_and_replication_produce_identical_events() {
    let mapping = Arc::new(
        Mapping::from_toml(&format!(
            "{DEFAULT_MAPPING}\n[[entity]]\nname = \"fidelity\"\ntable = \"fidelity\"\n"
        ))
        .expect("mapping"),
    );
    let mut logs = Vec::new();
    for source in [SourceMode::Replication, SourceMode::Triggers] {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        client.batch_execute(crate::fidelity::SCHEMA).await.expect("schema");
        // Application sessions with hostile output settings must not change the data.
        db.set_hostile_output_defaults().await;
        let mut settings =
            if source == SourceMode::Triggers { trigger_settings(&db) } else { db.settings() };
        settings.mapping = mapping.clone();
        let server = Running::start(settings).await;
        let client = db.client().await;
        for statement in WORKLOAD.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            client.batch_execute(statement).await.expect(statement);
        }
        let events = if source == SourceMode::Triggers {
            drained_events(&db).await
        } else {
            db.settled_events().await
        };
        server.stop().await;
        logs.push(events);
    }
    let (replication, triggers) = (&logs[0], &logs[1]);
    assert!(replication.len() >= 20, "{} events", replication.len());
    assert_eq!(replication.len(), triggers.len());
    for (r, t) in replication.iter().zip(triggers) {
        // As text too: `Value` equality ignores the order of object keys, the log's bodies do not.
        let (r_text, t_text) = (comparable(r).to_string(), comparable(t).to_string());
        assert_eq!(r_text, t_text, "replication vs triggers");
        assert!(t["source"].get("lsn").is_none(), "no lsn in trigger mode: {}", t["source"]);
    }
    let big = triggers
        .iter()
        .find(|e| e["type"] == "fidelity.created" && e["data"]["id"] == 2)
        .expect("1 MB row");
    assert_eq!(big["data"]["big"].as_str().map(str::len), Some(1_048_576));
    assert!(triggers.iter().all(|e| e["data"].get("password_hash").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writers_committing_out_of_order_lose_and_repeat_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    seed(&client).await;
    client
        .batch_execute(
            "INSERT INTO instances (id, organization_id, cpu_millis) SELECT 'hot-' || i, 'quant', 0 FROM generate_series(0, 7) i",
        )
        .await
        .expect("hot rows");
    let mut settings = trigger_settings(&db);
    // Batches that end inside transactions and at their ends (10 rows each): a transaction a
    // batch ends in is finished, and its commit record removed, later.
    settings.batch_size = 95;
    let server = Running::start(settings).await;
    const WRITERS: usize = 16;
    const TRANSACTIONS: usize = 125;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = db.client().await;
        writers.push(tokio::spawn(async move {
            let mut seq = 0;
            for _ in 0..TRANSACTIONS {
                let tx = client.transaction().await.expect("begin");
                // Nine unique inserts and one bump of a shared row, then a random pause before
                // COMMIT so transactions overlap and commit out of start order.
                for _ in 0..9 {
                    seq += 1;
                    tx.execute(
                        "INSERT INTO agents (id, organization_id, name) VALUES ($1, 'quant', $1)",
                        &[&format!("w{w}-{seq}")],
                    )
                    .await
                    .expect("insert");
                }
                let hot = format!("hot-{}", rand::rng().random_range(0..8));
                tx.execute(
                    "UPDATE instances SET cpu_millis = cpu_millis + 1 WHERE id = $1",
                    &[&hot],
                )
                .await
                .expect("bump");
                let pause = rand::rng().random_range(0..4);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                tx.commit().await.expect("commit");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let events = drained_events(&db).await;
    server.stop().await;
    let total = WRITERS * TRANSACTIONS * 10;
    let changes: Vec<&Value> =
        events.iter().filter(|e| e["type"] != "instance.status_changed").collect();
    assert_eq!(changes.len(), total, "every change exactly once");
    let mut created: Vec<&str> = changes
        .iter()
        .filter(|e| e["type"] == "agent.created")
        .map(|e| e["data"]["id"].as_str().expect("id"))
        .collect();
    created.sort_unstable();
    created.dedup();
    assert_eq!(created.len(), WRITERS * TRANSACTIONS * 9, "no insert lost or repeated");
    // Each shared row's counter must come out 1, 2, 3, ...: its commit order.
    let mut counters: HashMap<&str, i64> = HashMap::new();
    for event in events.iter().filter(|e| e["type"] == "instance.updated") {
        let row = event["data"]["id"].as_str().expect("id");
        let value = event["data"]["cpu_millis"].as_i64().expect("counter");
        let last = counters.entry(row).or_insert(0);
        assert_eq!(value, *last + 1, "{row} out of commit order");
        *last = value;
    }
    assert_eq!(counters.values().sum::<i64>(), (WRITERS * TRANSACTIONS) as i64);
    // A transaction's events are contiguous in the log.
    let mut seen_xids = Vec::new();
    for event in &events {
        let xid = event["source"]["xid"].as_u64().expect("xid");
        if seen_xids.last() != Some(&xid) {
            assert!(!seen_xids.contains(&xid), "transaction {xid} is split in the log");
            seen_xids.push(xid);
        }
    }
}

pub fn spawn_serve(db: &TestDb) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["serve", "--source", "triggers", "--batch-size", "50", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rowcast serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain_loses_and_duplicates_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    seed(&client).await;
    rowcast::setup::setup_triggers(&trigger_settings(&db)).await.expect("setup");
    let mut child = spawn_serve(&db);
    const TOTAL: u64 = 3_000;
    let writer = tokio::spawn(write_numbered(db.client().await, TOTAL));
    let kills = kill_while_writing(&mut child, writer, 100..600, || spawn_serve(&db)).await;
    let events = drained_events(&db).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert_sequence(&created_sequence(&events), TOTAL, &format!("after {kills} kills"));
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "ids have gaps or repeats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_nobody_listened_are_delivered() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    seed(&client).await;
    let mut settings = trigger_settings(&db);
    // Only notifications or a restart can wake the drain now.
    settings.poll_interval = Duration::from_secs(3600);
    let mut server = Running::start(settings.clone()).await;
    // The listener's connection dies; the server reconnects and drains.
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'rowcast listener' AND datname = current_database()",
            &[],
        )
        .await
        .expect("terminate listener")
        .get(0);
    assert_eq!(killed, 1);
    write_numbered(db.client().await, 100).await;
    server.wait_for_id(100, WAIT).await;
    server.stop().await;
    // A stopped server leaves no LISTEN connection behind (nor does the one it replaced).
    let listening = "SELECT count(*) FROM pg_stat_activity
                      WHERE application_name = 'rowcast listener' AND datname = current_database()";
    let mut left = -1;
    for _ in 0..100 {
        left = client.query_one(listening, &[]).await.expect("listeners").get::<_, i64>(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "listener connections outlived the server");
    // Nobody listens at all while these commit.
    client
        .batch_execute(
            "INSERT INTO agents (id, organization_id, name) VALUES ('late', 'quant', 'n-101')",
        )
        .await
        .expect("late");
    let mut server = Running::start(settings).await;
    server.wait_for_id(101, WAIT).await;
    server.stop().await;
    let events = drained_events(&db).await;
    assert_sequence(&created_sequence(&events), 101, "across listener loss and restart");
}

/// Commits notify only while the drain waits. Rounds of simultaneous commits by three writers
/// make the drain switch between draining and waiting over and over, with commits landing in
/// the switch; with polling off, any commit that neither notified nor was seen by the drain's
/// last look would stay in the outbox and stall its round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_commit_misses_its_wake_up_while_the_drain_goes_idle() {
    const WRITERS: u64 = 3;
    const ROUNDS: u64 = 80;
    let db = TestDb::migrated().await;
    seed(&db.client().await).await;
    let mut settings = trigger_settings(&db);
    settings.poll_interval = Duration::from_secs(3600);
    let mut server = Running::start(settings).await;
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        writers.push(db.client().await);
    }
    let writers = Arc::new(writers);
    for round in 0..ROUNDS {
        let mut commits = Vec::new();
        for w in 0..WRITERS {
            let writers = writers.clone();
            commits.push(tokio::spawn(async move {
                // Spread over a few milliseconds: some commit while the drain works, some as it
                // goes idle, some after.
                let delay = rand::rng().random_range(0..4_000);
                tokio::time::sleep(Duration::from_micros(delay)).await;
                let id = format!("agt-{round}-{w}");
                writers[w as usize]
                    .execute(
                        "INSERT INTO agents (id, organization_id, domain_id, name) VALUES ($1, 'quant', 'demo', $1)",
                        &[&id],
                    )
                    .await
                    .expect("insert");
            }));
        }
        for commit in commits {
            commit.await.expect("writer");
        }
        server.wait_for_id((round + 1) * WRITERS, Duration::from_secs(20)).await;
    }
    server.stop().await;
    // The lock goes with the listener's connection.
    let client = db.client().await;
    let held = "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND (classid::bigint << 32) + objid::bigint = rowcast.wake_lock()";
    let mut left = -1;
    for _ in 0..100 {
        left = client.query_one(held, &[]).await.expect("locks").get::<_, i64>(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "the wake-up lock outlived the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_triggers_without_logical_wal_and_replication_with_it() {
    let replica = Cluster::start(&[("wal_level", "replica")]).expect("replica cluster");
    let on_replica = TestDb::on(&replica).await;
    let (mode, reason) =
        rowcast::setup::choose_source(&on_replica.client().await).await.expect("choose");
    assert_eq!(mode, SourceMode::Triggers, "{reason}");
    assert!(reason.contains("wal_level"), "{reason}");
    let logical = TestDb::new().await;
    let (mode, _) = rowcast::setup::choose_source(&logical.client().await).await.expect("choose");
    assert_eq!(mode, SourceMode::Replication);
    drop(on_replica);
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_the_triggers_and_keeps_an_undrained_outbox() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let settings = trigger_settings(&db);
    rowcast::setup::setup_triggers(&settings).await.expect("setup");
    rowcast::setup::setup_triggers(&settings).await.expect("setup is idempotent");
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.expect(sql).get::<_, i64>(0) }
    };
    let triggers = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rowcast_capture%'";
    assert_eq!(count(triggers).await, 24, "four triggers on each of the six tables");
    seed(&client).await;
    assert_eq!(count("SELECT count(*) FROM rowcast.outbox").await, 2);

    // Changes not yet in the log keep the outbox; the triggers go.
    let removed = rowcast::setup::uninstall_triggers(&db.config()).await.expect("uninstall");
    assert_eq!(removed, 6);
    assert_eq!(count(triggers).await, 0);
    assert_eq!(count("SELECT count(*) FROM rowcast.outbox").await, 2);
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('after', 'A')")
        .await
        .expect("plain write");
    assert_eq!(count("SELECT count(*) FROM rowcast.outbox").await, 2, "nothing captured any more");

    // Drained, a second uninstall removes the outbox too.
    client
        .batch_execute("DELETE FROM rowcast.outbox; DELETE FROM rowcast.outbox_commits")
        .await
        .expect("drain");
    rowcast::setup::uninstall_triggers(&db.config()).await.expect("uninstall again");
    assert_eq!(
        count("SELECT count(*) FROM pg_class WHERE relname IN ('outbox', 'outbox_commits')").await,
        0
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('capture', 'stamp_commit', 'wake_lock')"
        )
        .await,
        0
    );
}

/// An outbox made by an earlier rowcast: `jsonb` rows from `to_jsonb`, a primary key on `id`
/// and an index on `xid`.
const OLD_OUTBOX: &str = "
    CREATE SCHEMA IF NOT EXISTS rowcast;
    CREATE TABLE rowcast.outbox (
        id bigserial PRIMARY KEY, xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        at timestamptz NOT NULL DEFAULT statement_timestamp(), table_schema text, table_name text,
        op text NOT NULL, new_row jsonb, old_row jsonb);
    CREATE INDEX outbox_xid ON rowcast.outbox (xid);
    CREATE SEQUENCE rowcast.commit_seq;
    CREATE TABLE rowcast.outbox_commits (xid xid8 PRIMARY KEY, seq bigint NOT NULL)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_of_an_earlier_version_is_converted_and_drained_as_written() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client.batch_execute(OLD_OUTBOX).await.expect("old outbox");
    // Changes the earlier triggers captured and nobody drained yet, one with a json value.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO organizations (id, name, settings)
                  VALUES ('quant', 'Quant', '{\"b\": [1.50, 2e2], \"a\": null}');
             INSERT INTO rowcast.outbox (table_schema, table_name, op, new_row)
                  SELECT 'public', 'organizations', 'insert', to_jsonb(o) FROM organizations o;
             INSERT INTO rowcast.outbox_commits VALUES (pg_current_xact_id(), nextval('rowcast.commit_seq'));
             COMMIT;",
        )
        .await
        .expect("old capture");
    let written: Value = serde_json::from_str(
        client
            .query_one("SELECT to_jsonb(o)::text FROM organizations o", &[])
            .await
            .expect("row")
            .get::<_, &str>(0),
    )
    .expect("json");

    let server = Running::start(trigger_settings(&db)).await;
    // Captured by the new triggers after the conversion.
    client
        .batch_execute("UPDATE organizations SET plan = 'team' WHERE id = 'quant'")
        .await
        .expect("update");
    let events = drained_events(&db).await;
    server.stop().await;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["organization.created", "organization.updated"]);
    assert_eq!(events[0]["data"].to_string(), written.to_string(), "as to_jsonb wrote it");
    assert_eq!(events[1]["old"]["settings"], written["settings"]);
    let shape: Vec<String> = client
        .query(
            "SELECT a.attname || ' ' || format_type(a.atttypid, NULL) FROM pg_attribute a
              WHERE a.attrelid = 'rowcast.outbox'::regclass AND a.attname IN ('new_row', 'old_row')
             UNION ALL
             SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'rowcast.outbox'::regclass
             ORDER BY 1",
            &[],
        )
        .await
        .expect("outbox shape")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(shape, ["new_row json", "old_row json", "rowcast.outbox_xid_id"]);
}
