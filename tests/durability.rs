//! Durability: large transactions, publisher crashes, Postgres crashes, slot hygiene.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use rowcast::log::{LogError, LogWriter};
use rowcast::model::{Event, Op, Position, Severity, Source, Timestamp};
use serde_json::Value;
use tokio_postgres::Client;

use crate::support::{Cluster, Running, TestDb, connect};

const WAIT: Duration = Duration::from_secs(60);

pub async fn seed(client: &Client) {
    client
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
             INSERT INTO domains (id, organization_id, name) VALUES ('demo', 'quant', 'Demo');",
        )
        .await
        .expect("seed");
}

/// Asserts `actual` is exactly `1..=total`; on failure says where it first differs and how many
/// are missing or repeated, instead of printing thousands of numbers.
pub fn assert_sequence(actual: &[u64], total: u64, context: &str) {
    if actual.iter().copied().eq(1..=total) {
        return;
    }
    let first = actual
        .iter()
        .zip(1..)
        .position(|(a, e)| *a != e)
        .unwrap_or(actual.len().min(total as usize));
    let distinct: HashSet<&u64> = actual.iter().collect();
    let missing = (1..=total).filter(|n| !distinct.contains(n)).count();
    let window = &actual[first.saturating_sub(2)..(first + 3).min(actual.len())];
    panic!(
        "{context}: {} events, {missing} of 1..={total} missing, {} repeated; first difference at index {first}: {window:?}",
        actual.len(),
        actual.len() - distinct.len()
    );
}

/// The sequence numbers carried in `agent.created` events' names (`n-<seq>`), in log order.
pub fn created_sequence(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == "agent.created")
        .map(|e| {
            e["data"]["name"]
                .as_str()
                .and_then(|n| n.strip_prefix("n-"))
                .and_then(|n| n.parse().ok())
                .expect("name")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transaction_arrives_contiguous_in_bounded_batches() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    seed(&client).await;
    let mut settings = db.settings();
    settings.batch_size = 500;
    settings.queue_capacity = 256;
    let mut publisher = Running::start(settings).await;

    // Small transactions commit all around the big one.
    let noise_db = db.client().await;
    let noise = tokio::spawn(async move {
        for i in 0..200 {
            noise_db
                .execute(
                    "INSERT INTO organizations (id, name) VALUES ($1, 'noise')",
                    &[&format!("org-{i}")],
                )
                .await
                .expect("noise");
        }
    });
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO agents (id, organization_id, domain_id, name)
                  SELECT 'agt-' || i, 'quant', 'demo', 'n-' || i FROM generate_series(1, 10000) i;
             COMMIT;",
        )
        .await
        .expect("big transaction");
    noise.await.expect("noise writer");

    publisher.wait_for_id(10_000 + 200, WAIT).await;
    publisher.stop().await;
    let events = db.events().await;
    assert_eq!(events.len(), 10_000 + 200);
    let positions: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["type"] == "agent.created")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(positions.len(), 10_000);
    assert_eq!(
        positions[9_999] - positions[0],
        9_999,
        "the transaction's events are not contiguous"
    );
    assert_sequence(&created_sequence(&events), 10_000, "large transaction");
    let xid = &events[positions[0]]["source"]["xid"];
    assert!(positions.iter().all(|&i| &events[i]["source"]["xid"] == xid));

    // The writer never held the whole transaction: it was appended in batches of at most 500.
    let appends: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM rowcast.events WHERE type = 'agent.created'",
            &[],
        )
        .await
        .expect("xmin")
        .get(0);
    assert!(appends >= 20, "10,000 events in only {appends} log transactions");
}

/// The `rowcast serve` binary, as a user would run it.
pub fn spawn_serve(db: &TestDb) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["serve", "--source", "replication", "--batch-size", "50", "--status-interval", "1s"])
        .args(["--slot", &db.name])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rowcast serve")
}

/// Waits until the slot is created and consistent: a slot shows up in `pg_replication_slots`
/// while it is still being built, and disappears again if its creator dies then.
pub async fn wait_for_slot(db: &TestDb) {
    let client = db.client().await;
    let nudge = tokio::spawn(crate::support::nudge_slot_creation(db.config()));
    for _ in 0..1800 {
        let query = "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL";
        if !client.query(query, &[&db.name]).await.expect("slots").is_empty() {
            nudge.abort();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rowcast never created its slot");
}

/// SIGKILLs `child` after random pauses (ms in `pauses`) and starts a new one with `spawn`,
/// at least 5 times and until `writer` is done. Returns how many kills there were.
pub async fn kill_while_writing(
    child: &mut Child,
    writer: tokio::task::JoinHandle<()>,
    pauses: std::ops::Range<u64>,
    spawn: impl Fn() -> Child,
) -> usize {
    let mut kills = 0;
    while !writer.is_finished() || kills < 5 {
        let pause = rand::rng().random_range(pauses.clone());
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kills += 1;
        *child = spawn();
    }
    writer.await.expect("writer");
    kills
}

/// Commits numbered agents in transactions of 1 to 120 rows until `total` rows exist.
pub async fn write_numbered(client: Client, total: u64) {
    let mut next = 1;
    while next <= total {
        let size = if next % 7 == 0 { 120 } else { 1 + next % 4 };
        let last = (next + size - 1).min(total);
        client
            .execute(
                "INSERT INTO agents (id, organization_id, domain_id, name)
                 SELECT 'agt-' || i, 'quant', 'demo', 'n-' || i FROM generate_series($1::bigint, $2::bigint) i",
                &[&(next as i64), &(last as i64)],
            )
            .await
            .expect("numbered insert");
        next = last + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_and_duplicates_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    seed(&client).await;
    let mut child = spawn_serve(&db);
    wait_for_slot(&db).await;

    const TOTAL: u64 = 3_000;
    let writer = tokio::spawn(write_numbered(db.client().await, TOTAL));
    let kills = kill_while_writing(&mut child, writer, 200..900, || spawn_serve(&db)).await;
    let written = db.current_wal_lsn().await;
    db.wait_for_slot_to_confirm(&written, WAIT).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let events = db.events().await;
    assert_sequence(&created_sequence(&events), TOTAL, &format!("after {kills} kills"));
    assert_eq!(events.len(), TOTAL as usize);
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "ids have gaps or repeats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_immediate_restart_loses_nothing() {
    let mut cluster = Cluster::start(&[]).expect("start cluster");
    let db = TestDb::on(&cluster).await;
    db.migrate().await;
    seed(&db.client().await).await;
    let mut publisher = Running::start(db.settings()).await;

    // Commit 1..=400, crash the server, commit 401..=800 once it is back.
    write_numbered(db.client().await, 400).await;
    publisher.wait_for_id(100, WAIT).await;
    tokio::task::block_in_place(|| cluster.restart_immediate()).expect("restart cluster");
    let client = connect(&db.url).await;
    let mut next = 401;
    while next <= 800 {
        client
            .execute(
                "INSERT INTO agents (id, organization_id, domain_id, name) VALUES ($1, 'quant', 'demo', $2)",
                &[&format!("agt-{next}"), &format!("n-{next}")],
            )
            .await
            .expect("insert after restart");
        next += 1;
    }
    publisher.wait_for_id(800, WAIT).await;
    publisher.stop().await;
    let events = db.events().await;
    assert_sequence(&created_sequence(&events), 800, "across a Postgres crash");
    let ids: HashSet<u64> = events.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert_eq!(ids.len(), events.len());
    drop(db);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_writes_keep_the_slot_advancing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE scratch (id serial PRIMARY KEY, payload text)")
        .await
        .expect("scratch");
    let publisher = Running::start(db.settings()).await;

    let mut marks = Vec::new();
    for _ in 0..5 {
        client
            .batch_execute("INSERT INTO scratch (payload) SELECT repeat('x', 200) FROM generate_series(1, 500)")
            .await
            .expect("unmapped writes");
        // The slot must catch up with the WAL just written, without any mapped change.
        let written = db.current_wal_lsn().await;
        marks.push(db.wait_for_slot_to_confirm(&written, WAIT).await);
    }
    publisher.stop().await;
    assert!(db.events().await.is_empty());
    assert_eq!(
        marks.iter().collect::<HashSet<_>>().len(),
        marks.len(),
        "slot did not move: {marks:?}"
    );
}

/// Opens the writer, waiting out the lock a just-dropped writer's session may still hold.
async fn open_writer(db: &TestDb) -> LogWriter {
    for _ in 0..100 {
        match LogWriter::open(&db.config(), "test").await {
            Err(LogError::Locked) => tokio::time::sleep(Duration::from_millis(50)).await,
            writer => return writer.expect("open log writer"),
        }
    }
    panic!("the previous writer never released the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_at_or_before_the_cursor_are_dropped() {
    let db = TestDb::new().await;
    rowcast::log::install(&db.client().await).await.expect("log schema");
    let at = |major: u64, change: u64| {
        let event = Event {
            id: 0,
            event_type: "thing.created".into(),
            timestamp: Timestamp(0),
            organization_id: None,
            domain_id: None,
            severity: Severity::Info,
            data: None,
            old: None,
            changed: None,
            source: Source::Row {
                table: "public.things".into(),
                op: Op::Insert,
                lsn: None,
                xid: major,
            },
        };
        (Position::of(major, change, 0).expect("position"), event)
    };
    let ids =
        |stored: Vec<rowcast::log::StoredEvent>| stored.iter().map(|e| e.id).collect::<Vec<_>>();

    let mut writer = open_writer(&db).await;
    assert_eq!(
        ids(writer.append(vec![at(10, 0), at(10, 1)], Some(11)).await.expect("append")),
        [1, 2]
    );
    // A source re-sending what the log has, plus one new event: only the new one is stored.
    assert_eq!(
        ids(writer.append(vec![at(10, 0), at(10, 1), at(20, 0)], None).await.expect("append")),
        [3]
    );
    drop(writer);
    // The same after a restart: the cursor was committed with the events.
    let mut writer = open_writer(&db).await;
    assert_eq!(writer.cursor().position, at(20, 0).0);
    assert_eq!(writer.cursor().progress, 11);
    assert_eq!(
        ids(writer.append(vec![at(20, 0), at(30, 0)], Some(31)).await.expect("append")),
        [4]
    );
    assert_eq!(db.events().await.len(), 4);

    // Pipelined: two appends sent before either commits are numbered and deduplicated
    // against each other, and confirmed in order; the cursor moves only as each commits.
    writer.send(vec![at(40, 0), at(40, 1)], Some(41)).expect("send");
    writer.send(vec![at(40, 1), at(50, 0)], Some(51)).expect("send");
    assert_eq!((writer.in_flight(), writer.cursor().progress), (2, 31));
    assert_eq!(ids(writer.confirm().await.expect("one").expect("commits")), [5, 6]);
    assert_eq!((writer.last_id(), writer.cursor().progress), (6, 41));
    assert_eq!(ids(writer.confirm().await.expect("two").expect("commits")), [7]);
    assert_eq!((writer.last_id(), writer.cursor().progress), (7, 51));
    assert!(writer.confirm().await.is_none());

    // An append whose head moved under it (here by hand; in life, an append before it that
    // failed) stores nothing and moves no cursor: the log never gets a hole.
    db.client()
        .await
        .batch_execute("UPDATE rowcast.log_head SET last_id = 100")
        .await
        .expect("move the head");
    writer.send(vec![at(60, 0)], Some(61)).expect("send");
    writer.send(vec![at(70, 0)], Some(71)).expect("send");
    let refused = writer.confirm().await.expect("one").expect_err("the head moved");
    assert!(matches!(refused, rowcast::log::LogError::HeadMoved(7)), "{refused}");
    assert!(refused.is_retryable());
    drop(writer);
    assert_eq!(db.events().await.len(), 7, "nothing stored after the head moved");
    let mut writer = open_writer(&db).await;
    assert_eq!((writer.last_id(), writer.cursor().progress), (100, 51));

    // 1,000 events of 40 KB (about 40 MB) go as several appends of at most 16 MiB of bodies,
    // numbered on, each moving the cursor to its last event, the progress with the last.
    let big: Vec<_> = (0..1_000)
        .map(|change| {
            let (position, mut event) = at(80, change);
            let pad = serde_json::Value::String("x".repeat(40_000));
            event.data = Some(serde_json::Map::from_iter([("pad".to_owned(), pad)]));
            (position, event)
        })
        .collect();
    let stored = writer.append(big, Some(81)).await.expect("big append");
    assert_eq!(ids(stored), (101..=1_100).collect::<Vec<_>>());
    assert_eq!((writer.last_id(), writer.cursor().progress), (1_100, 81));
    assert_eq!(writer.cursor().position, at(80, 999).0);
    let (appends, biggest): (i64, i64) = db
        .client()
        .await
        .query_one(
            "SELECT count(*), max(bytes)::bigint FROM (
                 SELECT sum(octet_length(body::text)) AS bytes FROM rowcast.events
                  WHERE id > 100 GROUP BY xmin::text) a",
            &[],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .expect("appends");
    assert!(appends >= 3, "40 MB of events went in {appends} statement(s)");
    assert!(biggest <= 16 << 20, "one append carried {biggest} bytes of bodies");
}

/// A log made before bodies were `text` keeps its `json` column: setup leaves it (no rewrite)
/// and swaps only the time index; appends and history work on both, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_with_json_bodies_keep_working_after_the_upgrade() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    rowcast::log::install(&admin).await.expect("log schema");
    // What an earlier rowcast made.
    admin
        .batch_execute(
            "ALTER TABLE rowcast.events ALTER COLUMN body TYPE json USING body::json;
             DROP INDEX rowcast.events_committed_at_brin;
             CREATE INDEX events_committed_at ON rowcast.events (committed_at);",
        )
        .await
        .expect("an old log");
    let event = |xid: u64| {
        let mut data = serde_json::Map::new();
        data.insert("name".into(), Value::from("café \u{1F600} \"q\" 1.50"));
        let event = Event {
            id: 0,
            event_type: "thing.created".into(),
            timestamp: Timestamp(1_767_225_600_123_456),
            organization_id: Some("quant".into()),
            domain_id: None,
            severity: Severity::Info,
            data: Some(data),
            old: None,
            changed: None,
            source: Source::Row { table: "public.things".into(), op: Op::Insert, lsn: None, xid },
        };
        (Position::of(xid, 0, 0).expect("position"), event)
    };
    let mut writer = open_writer(&db).await;
    let before = writer.append(vec![event(10)], Some(11)).await.expect("append to json");
    drop(writer);
    rowcast::log::install(&admin).await.expect("setup again");
    let (body_type, indexes): (String, Vec<String>) = {
        let row = admin
            .query_one(
                "SELECT format_type(atttypid, atttypmod),
                        (SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes
                          WHERE schemaname = 'rowcast' AND tablename = 'events')
                   FROM pg_attribute WHERE attrelid = 'rowcast.events'::regclass AND attname = 'body'",
                &[],
            )
            .await
            .expect("catalog");
        (row.get(0), row.get(1))
    };
    assert_eq!(body_type, "json", "setup must not rewrite an existing log");
    assert!(indexes.contains(&"events_committed_at_brin".to_owned()), "{indexes:?}");
    assert!(!indexes.contains(&"events_committed_at".to_owned()), "{indexes:?}");
    let mut writer = open_writer(&db).await;
    let after = writer.append(vec![event(20)], Some(21)).await.expect("append after setup");
    let stored: Vec<String> = before.iter().chain(&after).map(|e| e.json.to_string()).collect();
    let rows = admin
        .query("SELECT body::text FROM rowcast.events ORDER BY id", &[])
        .await
        .expect("history");
    let read: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(read, stored, "history reads give back exactly what was appended");

    // A new log's body is text, and reads back the same way.
    let fresh = TestDb::new().await;
    rowcast::log::install(&fresh.client().await).await.expect("log schema");
    let mut writer = open_writer(&fresh).await;
    let appended = writer.append(vec![event(30)], Some(31)).await.expect("append to text");
    let row = fresh
        .client()
        .await
        .query_one("SELECT body::text, pg_typeof(body)::text FROM rowcast.events", &[])
        .await
        .expect("read");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        (appended[0].json.to_string(), "text".into())
    );
}
