//! A first start that explains itself: what the database lacks is named with its fix before
//! anything is changed, and the command line says what it needs in plain words.

use std::process::{Command, Output, Stdio};

use rowcast::config::SourceMode;
use rowcast::setup::SetupError;

use crate::support::{TestDb, free_addr, rowcast_command};

/// `rowcast ARGS` with `DATABASE_URL`, to completion.
fn rowcast(args: &[&str], database_url: &str) -> Output {
    // As a user's shell might have it: user errors still come without one.
    rowcast_command(database_url, args).env("RUST_BACKTRACE", "1").output().expect("run rowcast")
}

/// A role that may log in but neither replicate nor own the tables.
async fn unprivileged(db: &TestDb) -> String {
    let role = format!("{}_app", db.name);
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT CREATE, CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE, CREATE ON SCHEMA public TO {role};
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};",
            db = db.name
        ))
        .await
        .expect("role");
    let (_, host) = db.url.split_once('@').expect("a URL with a user");
    format!("postgres://{role}@{host}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_setup_names_what_the_role_lacks_and_changes_nothing() {
    let db = TestDb::migrated().await;
    let url = unprivileged(&db).await;
    let mut settings = db.settings();
    settings.database = url.parse().expect("url");
    settings.log = settings.database.clone();
    settings.source = SourceMode::Replication;
    let err = rowcast::setup::setup_replication(&settings).await.expect_err("must refuse");
    let SetupError::NotReady { problems, .. } = &err else { panic!("unexpected error: {err}") };
    assert!(problems.contains("may not replicate") && problems.contains("REPLICATION"), "{err}");
    assert!(problems.contains("does not own") && problems.contains("public.agents"), "{err}");
    // Checked before anything was changed: no log schema, no publication.
    let client = db.client().await;
    let schema: i64 = client
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'rowcast'", &[])
        .await
        .expect("schema")
        .get(0);
    let publications: i64 =
        client.query_one("SELECT count(*) FROM pg_publication", &[]).await.expect("pubs").get(0);
    assert_eq!((schema, publications), (0, 0));

    // The command line says the same, without a backtrace, and exits non-zero.
    let listen = free_addr().to_string();
    let output = rowcast(
        &["serve", "--source", "replication", "--slot", &db.name, "--listen", &listen],
        &url,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("ALTER ROLE") && stderr.contains("does not own"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    // Roles are cluster-wide: leave none behind.
    let role = format!("{}_app", db.name);
    let _ = client.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_reference_tables_is_told_to_bring_a_mapping() {
    let db = TestDb::new().await;
    let listen = free_addr().to_string();
    let output = rowcast(
        &["serve", "--source", "triggers", "--slot", &db.name, "--listen", &listen],
        &db.url,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("does not exist") && stderr.contains("--mapping"), "{stderr}");
    assert!(stderr.contains("config/mapping.toml"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_refused_before_any_database_is_touched() {
    // Nothing listens there: a flag error must come first, at once.
    let unreachable = format!(
        "postgres://postgres@127.0.0.1:{}/none",
        rowcast::apps::cluster::free_port().expect("port")
    );
    let started = std::time::Instant::now();
    let output = rowcast(&["serve", "--auth", "jwt", "--listen", "127.0.0.1:0"], &unreachable);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--jwt-secret"), "{stderr}");
    assert!(!stderr.contains("waiting for"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let output = rowcast(&["serve", "--retention", "7 parsecs"], &unreachable);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--retention"));
    // A publisher's bus is not fed: Postgres-protocol clients belong on gateways.
    let publisher = ["serve", "--role", "publisher", "--nats-url", "nats://127.0.0.1:1"];
    let output = rowcast(&[&publisher[..], &["--pg-listen", "127.0.0.1:0"]].concat(), &unreachable);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--pg-listen") && stderr.contains("gateway"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_takes_a_host_name() {
    let db = TestDb::migrated().await;
    let port = rowcast::apps::cluster::free_port().expect("port");
    let listen = format!("localhost:{port}");
    let mut child = rowcast_command(&db.url, &["serve", "--slot", &db.name, "--listen", &listen])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let nudge = tokio::spawn(crate::support::nudge_slot_creation(db.config()));
    let healthy = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while crate::support::client::get_status(addr, "/healthz").await != Some(200) {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    nudge.abort();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    assert!(healthy.is_ok(), "serve --listen localhost:PORT never answered");
}
