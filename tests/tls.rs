//! TLS to Postgres (SPEC §9): a cluster that accepts TLS connections only (`hostssl`), and
//! rowcast's SQL and replication connections honouring `sslmode` and `sslrootcert` as libpq
//! does: capture works through both sources, and a certificate that fails its checks fails
//! fast, definitely, with a message that says so.

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use rowcast::capture::replication::{ConnectParams, ReplicationClient, ReplicationError};
use rowcast::config::SourceMode;
use rowcast::pg::{Target, Transience};
use rowcast::publisher::Publisher;
use tokio_util::sync::CancellationToken;

use crate::support::certs::Certs;
use crate::support::{Cluster, Running, TestDb};

/// Plain TCP connections match no line: the server refuses them.
const HBA: &str = "\
local   all all                     trust
hostssl all tls_scram 127.0.0.1/32  scram-sha-256
hostssl all all       127.0.0.1/32  trust
";

/// How long a refused certificate may take to be reported.
const FAST: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);

struct Server {
    cluster: Cluster,
    certs: Certs,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let certs = Certs::new();
        let settings = certs.server_settings();
        let settings: Vec<(&str, &str)> =
            settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cluster = Cluster::start_with_hba(&settings, Some(HBA)).expect("start a TLS cluster");
        Server { cluster, certs }
    })
}

/// The URL of `db` on `host`, with `params` (`sslmode=...&sslrootcert=...`).
fn url(db: &TestDb, host: &str, params: &str) -> String {
    let port = server().cluster.port();
    format!("postgres://postgres@{host}:{port}/{}?{params}", db.name)
}

fn target(db: &TestDb, host: &str, params: &str) -> Target {
    Target::from_str(&url(db, host, params)).expect("url")
}

fn verify_full(ca: &std::path::Path) -> String {
    format!("sslmode=verify-full&sslrootcert={}", ca.display())
}

/// A fresh database with the reference schema on the TLS-only cluster.
async fn database() -> TestDb {
    let db = TestDb::on(&server().cluster).await;
    db.migrate().await;
    db
}

/// An error and its causes, as `rowcast` prints them (tokio-postgres keeps the why in causes).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        text = format!("{text}: {err}");
        cause = err.source();
    }
    text
}

async fn sql(target: &Target) -> Result<(), tokio_postgres::Error> {
    let client = tokio::time::timeout(FAST, rowcast::pg::connect(target, "test"))
        .await
        .expect("the SQL connection neither succeeded nor failed in time")?;
    client.simple_query("SELECT 1").await.map(drop)
}

async fn replication(target: &Target) -> Result<(), ReplicationError> {
    let params = ConnectParams::from_target(target, 1 << 20);
    let mut client = tokio::time::timeout(FAST, ReplicationClient::connect(&params))
        .await
        .expect("the replication connection neither succeeded nor failed in time")?;
    client.simple_query("IDENTIFY_SYSTEM").await.map(drop)
}

/// Captures one committed insert through `source`, every connection on `target`, and checks
/// that the walsender's connection is encrypted.
async fn captures_through(source: SourceMode, host: &str, params: &str) {
    let db = database().await;
    let mut settings = db.settings();
    settings.source = source;
    settings.database = target(&db, host, params);
    settings.log = settings.database.clone();
    let mut running = Running::start(settings).await;
    db.client()
        .await
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('tls', 'Encrypted')")
        .await
        .expect("insert");
    running.wait_for_id(1, WAIT).await;
    let events = db.events().await;
    assert_eq!(events[0]["type"], "organization.created", "{events:?}");
    assert_eq!(events[0]["data"]["id"], "tls");
    if source == SourceMode::Replication {
        let encrypted: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                  WHERE a.backend_type = 'walsender' AND a.datname = $1 AND s.ssl",
                &[&db.name],
            )
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert_eq!(encrypted, 1, "the replication connection is not encrypted");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_capture_with_sslmode_require() {
    captures_through(SourceMode::Replication, "127.0.0.1", "sslmode=require").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_capture_with_verify_full() {
    let ca = server().certs.ca();
    captures_through(SourceMode::Replication, "localhost", &verify_full(&ca)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_capture_with_sslmode_require() {
    captures_through(SourceMode::Triggers, "127.0.0.1", "sslmode=require").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_capture_with_verify_full() {
    let ca = server().certs.ca();
    captures_through(SourceMode::Triggers, "localhost", &verify_full(&ca)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_fast_and_for_good() {
    let db = database().await;
    let other_ca = server().certs.other_ca();
    let wrong = target(&db, "localhost", &verify_full(&other_ca));

    let err = sql(&wrong).await.expect_err("trusted a certificate of another CA");
    let message = chain(&err);
    assert!(message.contains("certificate of localhost is not trusted"), "{message}");
    assert!(message.contains("other-ca.pem"), "{message}");
    assert_eq!(rowcast::pg::transience(&err), Transience::Definite, "{message}");

    let err = replication(&wrong).await.expect_err("trusted a certificate of another CA");
    let message = err.to_string();
    assert!(message.starts_with("TLS to localhost:"), "{message}");
    assert!(message.contains("is not trusted by sslrootcert"), "{message}");
    assert!(!err.is_retryable(), "{message}");

    // libpq's rule: `require` with a root file checks the chain too.
    let require =
        target(&db, "127.0.0.1", &format!("sslmode=require&sslrootcert={}", other_ca.display()));
    let err = sql(&require).await.expect_err("require with sslrootcert checks the chain");
    assert!(chain(&err).contains("not trusted"), "{err}");
    let err = replication(&require).await.expect_err("require with sslrootcert checks the chain");
    assert!(err.to_string().contains("not trusted"), "{err}");

    // The publisher stops with the error instead of reconnecting forever.
    for source in [SourceMode::Replication, SourceMode::Triggers] {
        let mut settings = db.settings();
        settings.source = source;
        settings.database = wrong.clone();
        settings.log = wrong.clone();
        let run = Publisher::new(settings).run(CancellationToken::new());
        let result = tokio::time::timeout(WAIT, run).await.expect("the publisher kept retrying");
        let err = result.expect_err("the publisher streamed from an untrusted server");
        assert!(chain(&err).contains("not trusted"), "{source:?}: {}", chain(&err));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let db = database().await;
    let ca = server().certs.ca();
    // The certificate names `localhost`, not 127.0.0.1.
    let by_address = target(&db, "127.0.0.1", &verify_full(&ca));
    let err = sql(&by_address).await.expect_err("a certificate for another name");
    let message = chain(&err);
    assert!(message.contains("not valid for the host name 127.0.0.1"), "{message}");
    assert!(message.contains("localhost"), "{message}");
    assert_eq!(rowcast::pg::transience(&err), Transience::Definite);
    let err = replication(&by_address).await.expect_err("a certificate for another name");
    assert!(err.to_string().contains("not valid for the host name 127.0.0.1"), "{err}");
    assert!(!err.is_retryable());

    let chain_only =
        target(&db, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={}", ca.display()));
    sql(&chain_only).await.expect("verify-ca ignores the host name");
    replication(&chain_only).await.expect("verify-ca ignores the host name");
    let by_name = target(&db, "localhost", &verify_full(&ca));
    sql(&by_name).await.expect("verify-full with the right name and CA");
    replication(&by_name).await.expect("verify-full with the right name and CA");
    // prefer, the default, encrypts when the server wants it.
    let default = target(&db, "127.0.0.1", "");
    sql(&default).await.expect("prefer");
    replication(&default).await.expect("prefer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connections_are_refused_by_a_tls_only_server() {
    let db = database().await;
    let plain = target(&db, "127.0.0.1", "sslmode=disable");
    let err = sql(&plain).await.expect_err("a plain connection got in");
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err}");
    assert!(chain(&err).contains("no encryption"), "{}", chain(&err));
    match replication(&plain).await {
        Err(ReplicationError::Server { code, message }) => {
            assert_eq!(code, "28000", "{message}");
            assert!(message.contains("no encryption"), "{message}");
        }
        other => panic!("a plain replication connection: {other:?}"),
    }
}

/// `sslrootcert=system` (and verifying modes without sslrootcert) trust the system's roots,
/// which `SSL_CERT_FILE` replaces: checked through the real binary, whose environment is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_roots_are_the_default_trust() {
    let db = TestDb::on(&server().cluster).await;
    let url = url(&db, "localhost", "sslrootcert=system");
    let migrate = |roots: std::path::PathBuf| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rowcast"));
        command.args(["migrate", "--database-url", &url]).env("SSL_CERT_FILE", roots);
        command.env_remove("SSL_CERT_DIR").env_remove("DATABASE_URL");
        command
    };
    let untrusted = tokio::time::timeout(WAIT, migrate(server().certs.other_ca()).output())
        .await
        .expect("rowcast migrate hung")
        .expect("run rowcast migrate");
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success(), "{stderr}");
    assert!(stderr.contains("not trusted by the system's root certificates"), "{stderr}");
    let trusted = tokio::time::timeout(WAIT, migrate(server().certs.ca()).output())
        .await
        .expect("rowcast migrate hung")
        .expect("run rowcast migrate");
    let stderr = String::from_utf8_lossy(&trusted.stderr);
    assert!(trusted.status.success(), "{stderr}");
}

/// SCRAM over TLS: SQL connections bind it to the certificate (tokio-postgres-rustls gives
/// `tls-server-end-point`, so `channel_binding=require` passes); the replication client
/// authenticates without channel binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_authenticates_over_tls() {
    let db = TestDb::on(&server().cluster).await;
    db.client()
        .await
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE tls_scram LOGIN REPLICATION PASSWORD 's3cret'",
        )
        .await
        .expect("role");
    let port = server().cluster.port();
    let ca = server().certs.ca();
    let url = format!(
        "postgres://tls_scram:s3cret@localhost:{port}/{}?{}&channel_binding=require",
        db.name,
        verify_full(&ca)
    );
    let scram = Target::from_str(&url).expect("url");
    sql(&scram).await.expect("SCRAM with channel binding over TLS");
    replication(&scram).await.expect("SCRAM over TLS, replication connection");
    let wrong = Target::from_str(&url.replace("s3cret", "wrong")).expect("url");
    let err = replication(&wrong).await.expect_err("a wrong password");
    assert!(!err.is_retryable(), "{err}");
}
