//! Test support: a real Postgres for every test, a fresh database each, and a publisher
//! driven through the library's public interface.
//!
//! By default one throwaway cluster (see `rowcast::apps::cluster`) is shared by the whole test binary and
//! each test gets its own database in it, so tests never see each other's slots or events.
//! With `ROWCAST_TEST_DATABASE_URL` set (a superuser on a server with `wal_level=logical`),
//! databases are created on that server instead, and dropped with their slots afterwards.
//! With `--features testcontainers`, the shared server is a Postgres container (see `docker`).

pub mod certs;
pub mod client;
#[cfg(feature = "testcontainers")]
pub mod docker;
pub mod matcher;
pub mod nats;
pub mod proxy;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rowcast::config::{Settings, SourceMode};
use rowcast::pg::Target;
use rowcast::publisher::{State, Watch};
use rowcast::server::{ServeError, Server};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The same cluster, failing with the reason when there are no local binaries to start it from.
#[cfg(feature = "testcontainers")]
pub use docker::OwnCluster as Cluster;
#[cfg(not(feature = "testcontainers"))]
pub use rowcast::apps::cluster::Cluster;

static SHARED: OnceLock<Cluster> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Gives the URL of a database, by name, on the test server.
type UrlOf = Box<dyn Fn(&str) -> String + Send + Sync>;

/// The server tests create their databases on: `(admin URL, URL of database NAME)`.
fn server() -> (String, UrlOf) {
    if let Ok(url) = std::env::var("ROWCAST_TEST_DATABASE_URL") {
        tokio_postgres::Config::from_str(&url)
            .expect("ROWCAST_TEST_DATABASE_URL is not a valid URL");
        let base = url.clone();
        return (url, Box::new(move |name| with_database(&base, name)));
    }
    #[cfg(feature = "testcontainers")]
    {
        static CONTAINER: OnceLock<docker::Container> = OnceLock::new();
        let container = CONTAINER.get_or_init(docker::Container::start);
        return (container.url("postgres"), Box::new(|name| container.url(name)));
    }
    #[allow(unreachable_code)]
    let cluster = SHARED.get_or_init(|| Cluster::start(&[]).expect("start the test cluster"));
    let port = cluster.port();
    (
        cluster.url("postgres"),
        Box::new(move |name| format!("postgres://postgres@127.0.0.1:{port}/{name}")),
    )
}

/// `url` with its database path replaced by `name` (user, host, port and query kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A connection as rowcast makes them (`sslmode` honoured: the default `prefer` also reaches
/// servers that accept only TLS).
pub async fn connect(url: &str) -> Client {
    let target = Target::from_str(url).expect("url");
    rowcast::pg::connect(&target, "test").await.expect("connect")
}

/// A fresh database, dropped (with its replication slots) when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let (admin_url, url_of) = server();
        Self::create(admin_url, url_of).await
    }

    /// A database on a given cluster (for tests that own their cluster).
    pub async fn on(cluster: &Cluster) -> TestDb {
        let port = cluster.port();
        Self::create(
            cluster.url("postgres"),
            Box::new(move |name| format!("postgres://postgres@127.0.0.1:{port}/{name}")),
        )
        .await
    }

    async fn create(admin_url: String, url_of: UrlOf) -> TestDb {
        let name = format!(
            "rowcast_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        TestDb { url: url_of(&name), name, admin_url }
    }

    /// Where this database is, as rowcast connects to it.
    pub fn config(&self) -> Target {
        Target::from_str(&self.url).expect("url")
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Applies the reference schema.
    pub async fn migrate(&self) {
        rowcast::setup::migrate(&self.client().await).await.expect("migrate");
    }

    /// A fresh database with the reference schema.
    pub async fn migrated() -> TestDb {
        let db = TestDb::new().await;
        db.migrate().await;
        db
    }

    /// The server's WAL position now.
    pub async fn current_wal_lsn(&self) -> String {
        let client = self.client().await;
        client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("wal lsn").get(0)
    }

    /// Waits until this test's slot has confirmed `lsn`, and returns the confirmed position.
    /// The publisher confirms only what its log holds, so everything committed before `lsn` is
    /// in the log by then, and nothing more of it can arrive.
    pub async fn wait_for_slot_to_confirm(&self, lsn: &str, timeout: Duration) -> String {
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row = client
                .query_opt(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots
                      WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::text::pg_lsn",
                    &[&self.name, &lsn],
                )
                .await
                .expect("slot");
            if let Some(row) = row {
                return row.get(0);
            }
            assert!(tokio::time::Instant::now() < deadline, "the slot never confirmed {lsn}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes this database's sessions default to output settings unlike the ones rowcast
    /// expects (time zone, date and interval styles, float digits, bytea): capture must pin its
    /// own and never depend on them.
    pub async fn set_hostile_output_defaults(&self) {
        let client = self.client().await;
        client
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET TimeZone = 'Asia/Kolkata';
                 ALTER DATABASE {name} SET DateStyle = 'SQL, DMY';
                 ALTER DATABASE {name} SET IntervalStyle = 'sql_standard';
                 ALTER DATABASE {name} SET extra_float_digits = 0;
                 ALTER DATABASE {name} SET bytea_output = 'escape';",
                name = self.name
            ))
            .await
            .expect("hostile defaults");
    }

    /// Every event of everything committed so far, in id order, once the publisher has them
    /// all (its slot confirms only what the log holds, after the bus has published it).
    pub async fn settled_events(&self) -> Vec<Value> {
        let lsn = self.current_wal_lsn().await;
        self.wait_for_slot_to_confirm(&lsn, Duration::from_secs(60)).await;
        self.events().await
    }

    /// Every event in the log, in id order.
    pub async fn events(&self) -> Vec<Value> {
        let client = self.client().await;
        let rows = client
            .query("SELECT body::text FROM rowcast.events ORDER BY id", &[])
            .await
            .expect("read log");
        rows.iter()
            .map(|row| serde_json::from_str(row.get::<_, &str>(0)).expect("event json"))
            .collect()
    }

    /// Settings for capturing this database (built-in mapping, fast status updates).
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::new(self.config());
        // Slot names are cluster-wide; databases are not.
        settings.slot.clone_from(&self.name);
        settings.status_interval = Duration::from_millis(500);
        settings.max_backoff = Duration::from_secs(2);
        // Tests drive sessions faster than a person would; the rate limit has its own test.
        settings.server.message_rate = 10_000;
        settings.server.message_burst = 10_000;
        settings
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside async context; clean up on a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let Ok(admin) = Target::from_str(&admin_url) else { return };
                let Ok(client) = rowcast::pg::connect(&admin, "test cleanup").await else {
                    return;
                };
                let _ = client
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                        &[&name],
                    )
                    .await;
                for _ in 0..50 {
                    let _ = client
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                              WHERE database = $1 AND NOT active",
                            &[&name],
                        )
                        .await;
                    if client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The `rowcast` binary with `args`, as a user would run it against `database_url`: warnings
/// on stderr, nothing on stdin or stdout.
pub fn rowcast_command(database_url: &str, args: &[&str]) -> std::process::Command {
    use std::process::Stdio;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rowcast"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// A 127.0.0.1 address on a port nothing listens on now, for a server a test starts.
pub fn free_addr() -> SocketAddr {
    let port = rowcast::apps::cluster::free_port().expect("a free port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How often readiness is asked for while a test waits for it.
const READY_POLL: Duration = Duration::from_millis(50);

/// Whether the server on `addr` answers `/readyz` with 200 within `timeout`.
pub async fn ready_within(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if client::get_status(addr, "/readyz").await == Some(200) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Waits until a `rowcast serve` on `addr` is ready (streaming, log reachable), nudging the
/// slot creation of `db` meanwhile.
pub async fn wait_until_ready(db: &TestDb, addr: SocketAddr) {
    let nudge = tokio::spawn(nudge_slot_creation(db.config()));
    let ready = ready_within(addr, Duration::from_secs(60)).await;
    nudge.abort();
    assert!(ready, "rowcast serve at {addr} never became ready");
}

/// Creating a logical slot waits until every transaction running when it started has ended,
/// as seen in `xl_running_xacts` WAL records; on a cluster other tests keep busy, the bgwriter
/// writes those only every 15 s. A checkpoint writes one at once.
pub async fn nudge_slot_creation(target: Target) {
    let Ok(client) = rowcast::pg::connect(&target, "nudge").await else { return };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = client.batch_execute("CHECKPOINT").await;
    }
}

/// A server (publisher, bus, HTTP/WebSocket) running inside the test process.
pub struct Running {
    pub watch: Watch,
    /// Where its HTTP/WebSocket server listens.
    pub addr: SocketAddr,
    /// Where its Postgres-protocol endpoint listens, when it was started with one.
    pub pg: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Runs `setup`, starts the server on a free port and waits until it streams: every
    /// change committed after this returns is captured.
    pub async fn start(settings: Settings) -> Running {
        Self::start_serving(settings, None).await
    }

    /// As [`Running::start`], with the Postgres-protocol endpoint on `pg`: port 0 for a free one
    /// (`Running::pg` says which), or the address of a server this one restarts.
    pub async fn start_with_pg(settings: Settings, pg: SocketAddr) -> Running {
        Self::start_serving(settings, Some(pg)).await
    }

    async fn start_serving(mut settings: Settings, pg: Option<SocketAddr>) -> Running {
        match settings.source {
            SourceMode::Triggers => rowcast::setup::setup_triggers(&settings).await.expect("setup"),
            _ => rowcast::setup::setup_replication(&settings).await.expect("setup"),
        }
        let url = settings.database.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        settings.server.listen = addr;
        // Port 0 takes a free port as it binds (no window for another test to take it); the
        // address it got is `Running::pg`, for a restart to bind again.
        let pg_listener = match pg {
            Some(pg) => Some(TcpListener::bind(pg).await.expect("bind the postgres-protocol port")),
            None => None,
        };
        let pg = pg_listener.as_ref().map(|l| l.local_addr().expect("postgres-protocol address"));
        settings.server.pg_listen = pg;
        let mut server = Server::new(settings).await.expect("server");
        if let Some(listener) = pg_listener {
            server = server.with_pg_listener(listener);
        }
        let mut watch = server.watch();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(listener, shutdown.clone()));
        let nudge = tokio::spawn(nudge_slot_creation(url));
        let streaming = tokio::time::timeout(
            Duration::from_secs(90),
            watch.state.wait_for(|state| matches!(state, State::Streaming | State::Stopped)),
        )
        .await;
        nudge.abort();
        let state = streaming.ok().and_then(|s| s.ok()).map(|state| state.clone());
        assert_eq!(state, Some(State::Streaming), "publisher did not start streaming");
        Running { watch, addr, pg, shutdown, task }
    }

    /// Starts a gateway (`settings.role` is `Gateway`; nothing to set up: it captures nothing)
    /// on a free port and waits until it consumes the stream.
    pub async fn gateway(mut settings: Settings) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        settings.server.listen = addr;
        let server = Server::new(settings).await.expect("gateway");
        let watch = server.watch();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(listener, shutdown.clone()));
        assert!(
            ready_within(addr, Duration::from_secs(30)).await,
            "gateway at {addr} never became ready"
        );
        Running { watch, addr, pg: None, shutdown, task }
    }

    /// `ws://ADDR/ws/events?QUERY`.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws/events?{query}", self.addr)
    }

    /// Waits until the log's newest id is at least `id`.
    pub async fn wait_for_id(&mut self, id: u64, timeout: Duration) {
        let reached = tokio::time::timeout(timeout, self.watch.head.wait_for(|head| *head >= id))
            .await
            .is_ok();
        assert!(reached, "log head stayed at {} (< {id})", *self.watch.head.borrow());
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        match result {
            Ok(Ok(Ok(()))) => {}
            other => panic!("server did not stop cleanly: {other:?}"),
        }
    }
}

#[test]
fn database_urls_keep_everything_but_the_path() {
    assert_eq!(
        with_database("postgres://postgres@h:5432/postgres", "x"),
        "postgres://postgres@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgresql://postgres@h", "x"), "postgresql://postgres@h/x");
}
