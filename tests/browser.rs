//! The live page in a real headless Chromium (Debian's; never a downloaded browser), driven by
//! `tests/browser/page.mjs` with playwright-core: the page loads, a subscription shows events
//! from database writes, the server process is killed (SIGKILL) and started again while writes
//! go on, the page shows `reconnecting` and then resumes without losing or repeating events,
//! and a replay plays back. Under `CI=true` a missing Chromium or
//! missing node modules fail the test instead of skipping it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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

async fn ids(client: &tokio_postgres::Client) -> Vec<String> {
    let rows = client.query("SELECT id FROM rowcast.events ORDER BY id", &[]).await.expect("ids");
    rows.iter().map(|r| r.get::<_, i64>(0).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_live_events_survives_a_restart_and_replays() {
    if !browser_available() {
        return;
    }
    let db = TestDb::migrated().await;
    let addr = crate::support::free_addr();
    let server = serve(&db, addr).await;
    let mut node = tokio::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/page.mjs"))
        .arg(format!("http://{addr}/"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut to_node = node.stdin.take().expect("stdin");
    let mut from_node = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let mut expect = async |line: &str| {
        let got =
            tokio::time::timeout(WAIT, from_node.next_line()).await.expect("node answers in time");
        let got = got.expect("read").unwrap_or_default();
        assert_eq!(got, line, "the page check failed");
    };
    expect("ready").await;

    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Quant')")
        .await
        .expect("org");
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
    to_node
        .write_all(format!("expect {}\n", ids(&client).await.join(",")).as_bytes())
        .await
        .expect("write");
    expect("seen").await;

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
    let all = ids(&client).await;
    to_node.write_all(format!("expect {}\n", all.join(",")).as_bytes()).await.expect("write");
    expect("seen").await;
    to_node.write_all(b"states\n").await.expect("write");
    let states = tokio::time::timeout(WAIT, from_node.next_line())
        .await
        .expect("states")
        .expect("read")
        .unwrap_or_default();
    assert!(
        states.contains("\"reconnecting\",\"open\""),
        "the indicator showed reconnecting, then open: {states}"
    );

    to_node.write_all(b"cards\n").await.expect("write");
    let cards =
        tokio::time::timeout(WAIT, from_node.next_line()).await.expect("cards").expect("read");
    let count = all.len();
    assert_eq!(
        cards.unwrap_or_default(),
        format!("cards {count},{count}"),
        "both cards got every event once"
    );

    to_node.write_all(format!("replay {}\n", all.len()).as_bytes()).await.expect("write");
    let mut expect = async |line: &str| {
        let got =
            tokio::time::timeout(WAIT, from_node.next_line()).await.expect("node answers in time");
        assert_eq!(got.expect("read").unwrap_or_default(), line, "the page check failed");
    };
    expect("replayed").await;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("page.png");
    to_node.write_all(format!("screenshot {}\n", shot.display()).as_bytes()).await.expect("write");
    expect("done").await;
    drop(to_node);
    let status =
        tokio::time::timeout(WAIT, node.wait()).await.expect("node exits").expect("status");
    assert!(status.success());
    drop(server);
}
