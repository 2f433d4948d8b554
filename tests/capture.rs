//! Capture into the log: every mapped table, every operation, the right events.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Running, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().expect("type")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_tables_produce_their_events() {
    let db = TestDb::migrated().await;
    let mut publisher = Running::start(db.settings()).await;
    let client = db.client().await;
    let workload = "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
             INSERT INTO domains (id, organization_id, name) VALUES ('demo', 'quant', 'Demo');
             INSERT INTO agents (id, organization_id, domain_id, name, status) VALUES ('agt-001', 'quant', 'demo', 'support', 'active');
             UPDATE agents SET status = 'inactive' WHERE id = 'agt-001';
             UPDATE agents SET name = 'helpdesk' WHERE id = 'agt-001';
             INSERT INTO instances (id, organization_id, domain_id, agent_id) VALUES ('ins-1', 'quant', 'demo', 'agt-001');
             UPDATE instances SET status = 'running' WHERE id = 'ins-1';
             INSERT INTO deployments (id, organization_id, domain_id, version) VALUES ('dep-1', 'quant', 'demo', 'v1');
             UPDATE deployments SET status = 'running' WHERE id = 'dep-1';
             UPDATE deployments SET status = 'completed' WHERE id = 'dep-1';
             INSERT INTO deployments (id, organization_id, domain_id, version, status) VALUES ('dep-2', 'quant', NULL, 'v2', 'failed');
             INSERT INTO users (id, organization_id, email, name, password_hash) VALUES ('usr-1', 'quant', 'a@example.com', 'Ann', 'secret-1');
             UPDATE users SET password_hash = 'secret-2', name = 'Anna' WHERE id = 'usr-1';
             DELETE FROM agents WHERE id = 'agt-001';
             UPDATE organizations SET plan = 'team' WHERE id = 'quant';
             UPDATE domains SET description = 'primary' WHERE id = 'demo';
             DELETE FROM users WHERE id = 'usr-1';
             DELETE FROM deployments WHERE id = 'dep-2';
             DELETE FROM instances WHERE id = 'ins-1';
             INSERT INTO organizations (id, name) VALUES ('gone', 'Gone');
             DELETE FROM organizations WHERE id = 'gone';
             DELETE FROM domains WHERE id = 'demo';
             TRUNCATE organizations, domains, agents, instances, deployments, users;";
    // One transaction per statement, as an application would commit them.
    for statement in workload.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        client.batch_execute(statement).await.expect(statement);
    }
    let expected = [
        "organization.created",
        "domain.created",
        "agent.created",
        "agent.updated",
        "agent.status_changed",
        "agent.updated",
        "instance.created",
        "instance.updated",
        "instance.status_changed",
        "deployment.created",
        "deployment.updated",
        "deployment.started",
        "deployment.updated",
        "deployment.completed",
        "deployment.created",
        "deployment.failed",
        "user.created",
        "user.updated",
        // ON DELETE SET NULL runs as an AFTER trigger: the delete comes first.
        "agent.deleted",
        "instance.updated",
        "organization.updated",
        "domain.updated",
        "user.deleted",
        "deployment.deleted",
        "instance.deleted",
        "organization.created",
        "organization.deleted",
        "domain.deleted",
        // Deleting the domain sets deployments.domain_id to NULL.
        "deployment.updated",
    ];
    publisher.wait_for_id(expected.len() as u64 + 6, WAIT).await;
    publisher.stop().await;
    let events = db.events().await;
    let (changes, truncates) = events.split_at(expected.len());
    assert_eq!(types(changes), expected);
    let mut truncated = types(truncates);
    truncated.sort();
    assert_eq!(
        truncated,
        [
            "agent.truncated",
            "deployment.truncated",
            "domain.truncated",
            "instance.truncated",
            "organization.truncated",
            "user.truncated"
        ]
    );
    for event in truncates {
        assert_eq!(
            (&event["data"], &event["organization_id"]),
            (&Value::Null, &Value::Null),
            "{event}"
        );
    }

    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]) && ids[0] > 0,
        "ids not strictly increasing: {ids:?}"
    );

    let by_type =
        |kind: &str, nth: usize| changes.iter().filter(|e| e["type"] == kind).nth(nth).expect(kind);
    // Scope: organization from organizations.id, domain from domains.id, null domain stays null.
    assert_eq!(
        (
            &by_type("organization.created", 0)["organization_id"],
            &by_type("organization.created", 0)["domain_id"]
        ),
        (&json!("quant"), &Value::Null)
    );
    assert_eq!(
        (
            &by_type("domain.created", 0)["organization_id"],
            &by_type("domain.created", 0)["domain_id"]
        ),
        (&json!("quant"), &json!("demo"))
    );
    assert_eq!(by_type("deployment.failed", 0)["domain_id"], Value::Null);

    // Updates: old row, changed columns, the extra event right after with the same data.
    let updated = by_type("agent.updated", 0);
    let status_changed = by_type("agent.status_changed", 0);
    assert_eq!(updated["old"]["status"], "active");
    assert_eq!(updated["data"]["status"], "inactive");
    assert_eq!(updated["changed"], json!(["status", "updated_at"]));
    assert_eq!(status_changed["data"], updated["data"]);
    assert_eq!(status_changed["id"].as_u64(), updated["id"].as_u64().map(|id| id + 1));
    assert_eq!(by_type("agent.updated", 1)["changed"], json!(["name", "updated_at"]));
    assert_eq!(updated["severity"], "info");
    assert_eq!(by_type("deployment.failed", 0)["severity"], "error");
    assert_eq!(by_type("deployment.completed", 0)["severity"], "info");

    // Inserts carry no old and no changed; deletes carry the row as data and old.
    let created = by_type("agent.created", 0);
    assert!(created.get("old").is_none() && created.get("changed").is_none(), "{created}");
    assert_eq!(created["data"]["config"], json!({}));
    let deleted = by_type("agent.deleted", 0);
    assert_eq!(deleted["data"], deleted["old"]);
    assert_eq!(deleted["data"]["name"], "helpdesk");
    assert_eq!(deleted["domain_id"], "demo");

    // Redaction: the password hash never appears, not even as a changed column.
    for event in
        events.iter().filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("user.")))
    {
        assert!(!event.to_string().contains("password_hash"), "{event}");
        assert!(!event.to_string().contains("secret-"), "{event}");
    }
    assert_eq!(by_type("user.updated", 0)["changed"], json!(["name", "updated_at"]));
    assert_eq!(by_type("user.deleted", 0)["data"]["name"], "Anna");
    assert_eq!(by_type("domain.updated", 0)["changed"], json!(["description", "updated_at"]));
    let cascaded = by_type("deployment.updated", 2);
    assert_eq!(
        (&cascaded["old"]["domain_id"], &cascaded["data"]["domain_id"]),
        (&json!("demo"), &Value::Null)
    );
    assert_eq!(cascaded["domain_id"], Value::Null);
    let gone = by_type("organization.deleted", 0);
    assert_eq!((&gone["organization_id"], &gone["data"]["name"]), (&json!("gone"), &json!("Gone")));

    // Envelope: source and timestamp.
    assert_eq!(created["source"]["table"], "public.agents");
    assert_eq!(created["source"]["op"], "insert");
    assert!(created["source"]["lsn"].as_str().is_some_and(|lsn| lsn.contains('/')), "{created}");
    assert!(created["source"]["xid"].as_u64().is_some());
    let timestamp = created["timestamp"].as_str().expect("timestamp");
    assert!(
        timestamp.len() == 27 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T',
        "{timestamp}"
    );
}

/// `rowcast setup` as a user runs it, with a mapping that does not match the database.
async fn setup_with_mapping(db: &TestDb, mapping: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mapping.toml");
    std::fs::write(&path, mapping).expect("write mapping");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["setup", "--source", "replication", "--mapping"])
        .arg(&path)
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .expect("run rowcast setup");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_names_a_missing_table_or_column() {
    let db = TestDb::migrated().await;
    let (ok, stderr) =
        setup_with_mapping(&db, "[[entity]]\nname = \"gadget\"\ntable = \"gadgets\"\n").await;
    assert!(
        !ok && stderr.contains("public.gadgets") && stderr.contains("does not exist"),
        "{stderr}"
    );
    let (ok, stderr) = setup_with_mapping(
        &db,
        "[[entity]]\nname = \"agent\"\ntable = \"agents\"\ndomain = \"colour\"\n",
    )
    .await;
    assert!(!ok && stderr.contains("\"colour\"") && stderr.contains("public.agents"), "{stderr}");
    let (ok, stderr) = setup_with_mapping(&db, "[[entity]]\nname = \"agent\"\n").await;
    assert!(!ok && stderr.contains("missing field `table`"), "{stderr}");
    // Nothing was installed by the failed attempts.
    let client = db.client().await;
    let publications =
        client.query("SELECT 1 FROM pg_publication", &[]).await.expect("publications");
    assert!(publications.is_empty());
    let (ok, stderr) = setup_with_mapping(&db, rowcast::mapping::DEFAULT_MAPPING).await;
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_old_events_and_ids_never_repeat() {
    let db = TestDb::migrated().await;
    let mut publisher = Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('o1', 'One')")
        .await
        .expect("insert");
    publisher.wait_for_id(1, WAIT).await;
    let trimmed = rowcast::log::trim(&client, Duration::ZERO).await.expect("trim");
    assert_eq!(trimmed, 1);
    assert!(db.events().await.is_empty());
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('o2', 'Two')")
        .await
        .expect("insert");
    publisher.wait_for_id(2, WAIT).await;
    publisher.stop().await;
    let events = db.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0]["id"].as_u64(), &events[0]["data"]["id"]), (Some(2), &json!("o2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_another_database_is_a_definite_error() {
    let first = TestDb::migrated().await;
    let running = Running::start(first.settings()).await;
    let second = TestDb::migrated().await;
    let mut settings = second.settings();
    settings.slot.clone_from(&first.name);
    rowcast::setup::setup_replication(&settings).await.expect("setup");
    let run = rowcast::publisher::Publisher::new(settings)
        .run(tokio_util::sync::CancellationToken::new());
    let err = tokio::time::timeout(WAIT, run)
        .await
        .expect("gave up instead of retrying forever")
        .expect_err("ran");
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains(&format!("belongs to database \"{}\"", first.name)), "{message}");
    running.stop().await;
}

/// In both capture modes, a partitioned table's changes are its root's, whether a statement
/// names the root or a partition (trigger mode keeps row triggers there: a statement trigger
/// on the root would miss statements on a partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_are_captured_as_their_root() {
    for source in [rowcast::config::SourceMode::Replication, rowcast::config::SourceMode::Triggers]
    {
        let db = TestDb::new().await;
        let client = db.client().await;
        client
            .batch_execute(
                "CREATE TABLE metrics (id int, region text, value numeric, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
                 CREATE TABLE metrics_eu PARTITION OF metrics FOR VALUES IN ('eu');
                 CREATE TABLE metrics_us PARTITION OF metrics FOR VALUES IN ('us');",
            )
            .await
            .expect("schema");
        let mut settings = db.settings();
        settings.source = source;
        settings.poll_interval = std::time::Duration::from_millis(200);
        settings.mapping = std::sync::Arc::new(
            rowcast::mapping::Mapping::from_toml(
                "[[entity]]\nname = \"metric\"\ntable = \"metrics\"\norganization = \"region\"\n",
            )
            .expect("mapping"),
        );
        let mut publisher = Running::start(settings).await;
        for statement in [
            "INSERT INTO metrics VALUES (1, 'eu', 1.5), (2, 'us', 2.5)",
            "UPDATE metrics SET value = 3.5 WHERE id = 2",
            "DELETE FROM metrics WHERE id = 1",
            "INSERT INTO metrics_us VALUES (3, 'us', 4.5)",
            "DELETE FROM metrics_us WHERE id = 3",
        ] {
            client.batch_execute(statement).await.expect(statement);
        }
        publisher.wait_for_id(6, WAIT).await;
        publisher.stop().await;
        let events = db.events().await;
        assert_eq!(
            types(&events),
            [
                "metric.created",
                "metric.created",
                "metric.updated",
                "metric.deleted",
                "metric.created",
                "metric.deleted"
            ],
            "{source:?}"
        );
        assert!(events.iter().all(|e| e["source"]["table"] == "public.metrics"), "{events:?}");
        assert_eq!(events[2]["old"]["value"], json!(2.5));
        assert_eq!(events[2]["changed"], json!(["value"]));
        assert_eq!(
            (&events[3]["data"]["value"], &events[3]["organization_id"]),
            (&json!(1.5), &json!("eu"))
        );
        assert_eq!(events[4]["data"]["value"], json!(4.5), "{source:?}: a partition's own insert");
    }
}

/// Commits one organization and one agent `id`, and returns every event once settled.
async fn one_agent(db: &TestDb, client: &tokio_postgres::Client, id: &str) -> Vec<Value> {
    client
        .batch_execute(&format!(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
             INSERT INTO agents (id, organization_id, name) VALUES ('{id}', 'quant', 'a');"
        ))
        .await
        .expect("insert");
    db.settled_events().await
}

/// The first column of every row `sql` returns.
async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Vec<T> {
    client.query(sql, &[]).await.expect(sql).iter().map(|row| row.get(0)).collect()
}

/// Operators find rowcast's backends by name: the log writer as `rowcast log writer`, the
/// replication connection as `rowcast`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rowcasts_connections_are_named_in_pg_stat_activity() {
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let client = db.client().await;
    let events = one_agent(&db, &client, "agt-named").await;
    assert!(types(&events).contains(&"agent.created"), "{events:?}");
    let names: Vec<String> = column(
        &client,
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()",
    )
    .await;
    server.stop().await;
    assert!(names.iter().any(|n| n == "rowcast log writer"), "{names:?}");
    assert!(names.iter().any(|n| n == "rowcast"), "{names:?}");
}

/// A server on the same host can be reached over its Unix-domain socket (`?host=/dir`): the
/// replication client and every SQL connection use it, and capture works as over TCP. (Postgres
/// then spends less CPU per change: docs/benchmarks.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_works_over_the_unix_domain_socket() {
    let cluster = rowcast::apps::cluster::Cluster::start(&[]).expect("start cluster");
    let db = TestDb::on(&cluster).await;
    db.migrate().await;
    let socket: rowcast::pg::Target = cluster.socket_url(&db.name).parse().expect("socket url");
    let mut settings = db.settings();
    settings.database = socket.clone();
    settings.log = socket;
    let server = Running::start(settings).await;
    let client = db.client().await;
    let events = one_agent(&db, &client, "agt-unix").await;
    assert_eq!(types(&events), ["organization.created", "agent.created"], "{events:?}");
    let walsenders: Vec<Option<String>> =
        column(&client, "SELECT client_addr::text FROM pg_stat_replication").await;
    // Every connection the server made (named `rowcast <role>`; this test's own are `rowcast
    // test`), on the socket too.
    let rowcasts: Vec<Option<String>> = column(
        &client,
        "SELECT client_addr::text FROM pg_stat_activity
          WHERE application_name LIKE 'rowcast %' AND application_name <> 'rowcast test'",
    )
    .await;
    server.stop().await;
    assert_eq!(walsenders, [None], "one walsender, on the socket (no client address)");
    assert!(!rowcasts.is_empty() && rowcasts.iter().all(Option::is_none), "{rowcasts:?}");
}
