//! The live page in a real headless Chromium (Debian's; never a downloaded browser), driven by
//! `tests/browser/page.mjs` with playwright-core: a fresh visit shows live events without a
//! click; the server process is killed (SIGKILL) and started again while writes go on, the
//! page shows `reconnecting` and then resumes without losing or repeating events; a replay
//! plays back into its own list; the entity view follows an insert, an update and a delete; a
//! field predicate built in the builder narrows the feed, and the page's URL opened afresh
//! restores it; with `--auth jwt` the page asks for a token (`tests/browser/token.mjs`).
//! Under `CI=true` a missing Chromium or missing node modules fail the test instead of
//! skipping it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::support::TestDb;

const WAIT: Duration = Duration::from_secs(60);

fn browser_available() -> bool {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/node_modules/playwright-core");
    let ready = Path::new(&chromium).exists() && modules.exists();
    if !ready {
        let why = "browser tests need /usr/bin/chromium (apt-get install chromium) and \
                   `npm ci` in tests/browser";
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("skipping: {why}");
    }
    ready
}

/// A `rowcast serve` process, killed (SIGKILL) when dropped, however the test ends.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `rowcast serve` for `db` on `addr`, once it is ready (streaming, log reachable).
async fn serve(db: &TestDb, addr: std::net::SocketAddr) -> Serve {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--slot",
            &db.name,
            "--status-interval",
            "1s",
        ])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("rowcast serve");
    let child = Serve(child);
    crate::support::wait_until_ready(db, addr).await;
    child
}

/// `tests/browser/page.mjs` on the page at `url`, spoken to line by line.
struct Page {
    node: Child,
    to: ChildStdin,
    from: Lines<BufReader<ChildStdout>>,
}

impl Page {
    async fn open(url: &str) -> Page {
        let mut node = tokio::process::Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/page.mjs"))
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let to = node.stdin.take().expect("stdin");
        let from = BufReader::new(node.stdout.take().expect("stdout")).lines();
        let mut page = Page { node, to, from };
        page.expect("ready").await;
        page
    }

    async fn send(&mut self, line: &str) {
        self.to.write_all(format!("{line}\n").as_bytes()).await.expect("write to node");
    }

    async fn line(&mut self) -> String {
        let got =
            tokio::time::timeout(WAIT, self.from.next_line()).await.expect("node answers in time");
        got.expect("read").unwrap_or_default()
    }

    async fn expect(&mut self, line: &str) {
        assert_eq!(self.line().await, line, "the page check failed");
    }

    /// Sends `command` and expects `answer`.
    async fn check(&mut self, command: &str, answer: &str) {
        self.send(command).await;
        self.expect(answer).await;
    }

    /// Takes the screenshots into `CARGO_TARGET_TMPDIR/<name>/` and ends the script.
    async fn finish(mut self, name: &str) {
        let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::create_dir_all(&shots).expect("screenshot directory");
        self.check(&format!("screenshot {}", shots.display()), "done").await;
        drop(self.to);
        let status = tokio::time::timeout(WAIT, self.node.wait())
            .await
            .expect("node exits")
            .expect("status");
        assert!(status.success());
    }
}

/// Ids of the events `condition` (SQL on `rowcast.events`, whose `body` is the envelope) picks.
async fn ids_where(client: &tokio_postgres::Client, condition: &str) -> String {
    let sql = format!("SELECT id FROM rowcast.events WHERE {condition} ORDER BY id");
    let rows = client.query(sql.as_str(), &[]).await.expect("ids");
    rows.iter().map(|r| r.get::<_, i64>(0).to_string()).collect::<Vec<_>>().join(",")
}

async fn ids(client: &tokio_postgres::Client) -> String {
    ids_where(client, "true").await
}

async fn head(client: &tokio_postgres::Client) -> i64 {
    let row = client.query_one("SELECT coalesce(max(id), 0) FROM rowcast.events", &[]).await;
    row.expect("head").get(0)
}

async fn sql(client: &tokio_postgres::Client, statements: &str) {
    client.batch_execute(statements).await.expect(statements);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_opens_live_survives_a_restart_and_replays() {
    if !browser_available() {
        return;
    }
    let db = TestDb::migrated().await;
    let addr = crate::support::free_addr();
    let server = serve(&db, addr).await;
    // A fresh visit: no click, and everything the visitor may see.
    let mut page = Page::open(&format!("http://{addr}/")).await;

    let client = db.client().await;
    sql(&client, "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant')").await;
    for i in 0..20 {
        let status = if i % 5 == 0 { "failed" } else { "running" };
        client
            .execute(
                "INSERT INTO deployments (id, organization_id, version, status) VALUES ($1, 'quant', 'v1', $2)",
                &[&format!("dep-{i}"), &status],
            )
            .await
            .expect("deployment");
    }
    db.settled_events().await;
    page.check(&format!("expect {}", ids(&client).await), "seen").await;
    let before_cards = head(&client).await;
    page.check("share", "shared").await;

    // The server is killed; writes go on; a new one comes up on the same address.
    drop(server);
    for i in 0..10 {
        client
            .execute(
                "INSERT INTO agents (id, organization_id, name) VALUES ($1, 'quant', 'down')",
                &[&format!("down-{i}")],
            )
            .await
            .expect("agent");
    }
    let server = serve(&db, addr).await;
    for i in 0..10 {
        client
            .execute(
                "INSERT INTO agents (id, organization_id, name) VALUES ($1, 'quant', 'up')",
                &[&format!("up-{i}")],
            )
            .await
            .expect("agent");
    }
    db.settled_events().await;
    page.check(&format!("expect {}", ids(&client).await), "seen").await;
    page.send("states").await;
    let states = page.line().await;
    assert!(
        states.contains("\"reconnecting\",\"open\""),
        "the indicator showed reconnecting, then open: {states}"
    );

    // The two cards made after the first writes share one subscription; each counted the rest.
    let count = ids_where(&client, &format!("id > {before_cards}")).await.split(',').count();
    page.check("cards", &format!("cards {count},{count}")).await;

    let all = ids(&client).await.split(',').count();
    page.check(&format!("replay {all}"), "replayed").await;
    page.finish("page-live").await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_an_entity_filters_by_field_and_shares_its_view() {
    if !browser_available() {
        return;
    }
    let db = TestDb::migrated().await;
    let addr = crate::support::free_addr();
    let server = serve(&db, addr).await;
    let client = db.client().await;
    sql(&client, "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant')").await;
    sql(
        &client,
        "INSERT INTO agents (id, organization_id, name) VALUES ('old-1', 'quant', 'before')",
    )
    .await;
    db.settled_events().await;
    let mut page = Page::open(&format!("http://{addr}/")).await;

    // The entity view: rows from the server (or its history), then live changes.
    page.check("entity agent", "entity ready").await;
    sql(&client, "INSERT INTO agents (id, organization_id, name) VALUES ('ent-1', 'quant', 'one')")
        .await;
    page.check("row ent-1 name one", "row").await;
    sql(&client, "UPDATE agents SET name = 'uno', status = 'active' WHERE id = 'ent-1'").await;
    page.check("row ent-1 name uno", "row").await;
    page.check("row ent-1 status active", "row").await;
    sql(&client, "DELETE FROM agents WHERE id = 'ent-1'").await;
    page.check("norow ent-1", "gone").await;
    db.settled_events().await;

    // A predicate from the builder: agents whose status is paused, and nothing else.
    page.check("predicate agent status paused", "built").await;
    let start = head(&client).await;
    sql(
        &client,
        "INSERT INTO agents (id, organization_id, name, status) VALUES
            ('p-1', 'quant', 'a', 'paused'), ('p-2', 'quant', 'b', 'active'), ('p-3', 'quant', 'c', 'error');
         INSERT INTO deployments (id, organization_id, version, status) VALUES ('d-1', 'quant', 'v1', 'running');
         UPDATE agents SET name = 'c2' WHERE id = 'p-3';
         UPDATE agents SET status = 'paused' WHERE id = 'p-2';",
    )
    .await;
    db.settled_events().await;
    let paused = format!(
        "id > {start} AND body::jsonb->'data'->>'status' = 'paused' AND type LIKE 'agent.%'"
    );
    let matching = ids_where(&client, &paused).await;
    assert_eq!(matching.split(',').count(), 3, "created p-1, updated and status_changed p-2");
    page.check(&format!("expect-b {matching}"), "seen").await;

    // The page's URL, opened afresh, restores the builder and the subscription.
    page.check("shared", "restored").await;
    let start = head(&client).await;
    sql(
        &client,
        "INSERT INTO agents (id, organization_id, name, status) VALUES ('p-4', 'quant', 'd', 'paused'), ('p-5', 'quant', 'e', 'active');
         UPDATE agents SET status = 'paused' WHERE id = 'p-5';",
    )
    .await;
    db.settled_events().await;
    let paused = format!(
        "id > {start} AND body::jsonb->'data'->>'status' = 'paused' AND type LIKE 'agent.%'"
    );
    page.check(&format!("expect-c {}", ids_where(&client, &paused).await), "seen").await;
    page.finish("page-entity").await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_token_instead_of_reconnecting() {
    if !browser_available() {
        return;
    }
    const SECRET: &str = "browser-test-secret-of-32-bytes-or-more";
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth =
        rowcast::auth::Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    let server = crate::support::Running::start(settings).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": "browser", "exp": exp, "orgs": ["*"]});
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token");
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/token.mjs"))
            .arg(format!("http://{}/", server.addr))
            .arg(&good)
            .arg(Path::new(env!("CARGO_TARGET_TMPDIR")).join("page-token.png"))
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node answers in time")
    .expect("node");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok", "the page check failed");
    server.stop().await;
}
