//! The Postgres-protocol endpoint (SPEC §11) with real drivers: tokio-postgres (both query
//! protocols), psql and psycopg answer history as the history API does, stream `SUBSCRIBE`
//! across a server restart exactly once, get the SQLSTATEs of §11 and keep their connection;
//! and malformed protocol bytes never stop the server.
//!
//! psycopg is installed by `.ci/run`; where it cannot be imported the psycopg parts say so on
//! stderr and are skipped (the tokio-postgres and psql parts still run).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use rowcast::auth::Auth;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::support::client::get;
use crate::support::matcher::query;
use crate::support::{Running, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "pgwire-test-secret-of-32-bytes-or-more";

fn token(orgs: &[&str], secret: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let claims = json!({"sub": "tester", "exp": exp, "orgs": orgs});
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("encode")
}

/// A tokio-postgres client of the endpoint at `addr`.
async fn connect(
    addr: SocketAddr,
    password: Option<&str>,
) -> Result<Client, tokio_postgres::Error> {
    connect_owned(addr, password).await.map(|(client, _)| client)
}

/// A client and the task of its connection: aborting the task closes the socket (dropping the
/// client does not while a COPY runs: tokio-postgres waits for it to end).
async fn connect_owned(
    addr: SocketAddr,
    password: Option<&str>,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(addr.port()).user("rowcast").dbname("events");
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, task))
}

fn psql_path() -> String {
    let bundled = "/usr/lib/postgresql/15/bin/psql";
    if std::path::Path::new(bundled).exists() { bundled.to_owned() } else { "psql".to_owned() }
}

/// `psql` on the endpoint, as a user types it (its output line-buffered, as on a terminal:
/// into a pipe, psql's stdio would hold COPY rows back until a buffer fills).
fn psql(addr: SocketAddr, password: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new("stdbuf");
    command
        .args(["-oL", &psql_path()])
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-U",
            "rowcast",
            "-d",
            "events",
        ])
        .args(args)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    command
}

fn have_psycopg() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import psycopg"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "psycopg cannot be imported (pip install 'psycopg[binary]'): its checks are skipped"
        );
    }
    ok
}

fn dsn(addr: SocketAddr) -> String {
    format!("host=127.0.0.1 port={} user=rowcast dbname=events", addr.port())
}

/// Runs a Python script with psycopg; `argv[1]` is the DSN.
fn psycopg(addr: SocketAddr, script: &str, args: &[&str]) -> Command {
    let mut command = Command::new("python3");
    command.arg("-c").arg(script).arg(dsn(addr)).args(args).stdin(Stdio::null());
    command
}

async fn output(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("run")).await.expect("join")
}

async fn workload(client: &tokio_postgres::Client) {
    let statements = "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant'), ('ops', 'Ops');
         INSERT INTO agents (id, organization_id, name, model) VALUES ('a1', 'quant', 'q1', NULL), ('b1', 'ops', 'b1', 'gpt'), ('c1', 'quant', 'back\\slash \"quoted\"', 'x');
         UPDATE agents SET model = 'm', status = 'active' WHERE id = 'a1';
         INSERT INTO instances (id, organization_id, agent_id, region, cpu_millis, metadata) VALUES
             ('i1', 'quant', 'a1', 'eu-west-1', 250, '{\"tier\": \"gold\", \"n\": 3}'),
             ('j1', 'ops', NULL, 'us-east-1', 4000, '{\"tier\": \"silver\", \"n\": 2.5}'),
             ('k1', 'quant', NULL, 'ap-south-1', 1000, '{\"n\": null}');
         UPDATE instances SET status = 'running' WHERE id IN ('i1', 'j1');
         UPDATE instances SET status = 'stopped' WHERE id = 'j1';
         DELETE FROM instances WHERE id IN ('i1', 'k1');
         DELETE FROM agents WHERE id = 'b1'";
    for statement in statements.split(';') {
        client.batch_execute(statement).await.expect(statement);
    }
}

/// `(SQL condition, the same filter as §5 JSON, since)`.
fn cases() -> Vec<(&'static str, Value, u64)> {
    vec![
        ("", json!({}), 0),
        ("type LIKE 'agent.%'", json!({"type": "agent.*"}), 0),
        (
            "type IN ('instance.updated', 'agent.deleted')",
            json!({"type": ["instance.updated", "agent.deleted"]}),
            0,
        ),
        (
            "type LIKE '%.deleted' AND old->>'region' IN ('eu-west-1', 'us-east-1')",
            json!({"type": "*.deleted", "where": [["old.region", "in", ["eu-west-1", "us-east-1"]]]}),
            0,
        ),
        (
            "organization_id = 'ops' AND severity >= 'info'",
            json!({"organization_id": "ops", "severity": "info"}),
            0,
        ),
        (
            "data->>'status' = 'running' AND id > 3",
            json!({"where": [["status", "eq", "running"]]}),
            3,
        ),
        ("data->>'cpu_millis' >= 1000", json!({"where": [["cpu_millis", "gte", 1000]]}), 0),
        (
            "data->'metadata'->>'tier' = 'gold'",
            json!({"where": [["metadata.tier", "eq", "gold"]]}),
            0,
        ),
        ("changed ? 'status'", json!({"where": [["status", "changed"]]}), 0),
        (
            "type LIKE 'agent.%' AND data->>'model' IS NULL",
            json!({"type": "agent.*", "where": [["model", "is_null", true]]}),
            0,
        ),
        ("data->>'name' LIKE '%slash%'", json!({"where": [["name", "contains", "slash"]]}), 0),
    ]
}

fn select(condition: &str, since: u64) -> String {
    match (condition, since) {
        ("", _) => "SELECT * FROM events ORDER BY id".to_owned(),
        (condition, 0) => format!("SELECT * FROM events WHERE {condition} ORDER BY id"),
        (condition, _) => format!("SELECT * FROM events WHERE {condition}"),
    }
}

/// The envelopes `GET /api/events` answers for `filter` after `since`.
async fn history(server: &Running, filter: &Value, since: u64) -> Vec<Value> {
    let (status, body) =
        get(server.addr, &format!("/api/events?limit=1000&since={since}&{}", query(filter))).await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().expect("events").clone()
}

/// The columns of `events`, in `SELECT *` order.
const COLUMNS: [&str; 10] = [
    "id",
    "type",
    "timestamp",
    "organization_id",
    "domain_id",
    "severity",
    "data",
    "old",
    "changed",
    "source",
];

/// A text row of `SELECT *` as the envelope it came from.
fn envelope_of(columns: &[Option<String>]) -> Value {
    let mut envelope = serde_json::Map::new();
    for (name, value) in COLUMNS.iter().zip(columns) {
        let value = match (*name, value) {
            (_, None) => Value::Null,
            ("id", Some(text)) => json!(text.parse::<u64>().expect("id")),
            ("data" | "old" | "changed" | "source", Some(text)) => {
                serde_json::from_str(text).expect("json column")
            }
            ("timestamp", Some(text)) => json!(text.replacen(' ', "T", 1).replace("+00", "Z")),
            (_, Some(text)) => json!(text),
        };
        envelope.insert((*name).to_owned(), value);
    }
    Value::Object(envelope)
}

/// The envelope as `SELECT *` shows it: keys the table has no column for are left out, and an
/// absent `old` or `changed` is NULL.
fn as_row(event: &Value) -> Value {
    let mut row = serde_json::Map::new();
    for name in COLUMNS {
        row.insert(name.to_owned(), event.get(name).cloned().unwrap_or(Value::Null));
    }
    Value::Object(row)
}

async fn simple_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|err| panic!("{sql}: {err}"));
    messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["id"].as_u64().expect("id")).collect()
}

const PSYCOPG_HISTORY: &str = r#"
import json, sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for sql in json.loads(sys.argv[2]):
        print(json.dumps([row[0] for row in conn.execute(sql).fetchall()]))
    try:
        conn.execute("SELECT count(*) FROM events")
    except psycopg.Error as err:
        print(json.dumps([err.sqlstate]))
    print(json.dumps([conn.execute("SELECT id FROM events ORDER BY id LIMIT 1").fetchone()[0]]))
    rows = conn.execute("SELECT id FROM events WHERE type LIKE %s AND id > %s", ("agent.%", 2))
    print(json.dumps([row[0] for row in rows]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_read_the_history_the_history_api_answers() {
    let db = TestDb::migrated().await;
    let mut server = Running::start_with_pg(db.settings(), any_port()).await;
    let pg = server.pg.expect("pg");
    workload(&db.client().await).await;
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;

    let client = connect(pg, None).await.expect("connect");
    let mut statements = Vec::new();
    let mut expected = Vec::new();
    for (condition, filter, since) in cases() {
        let want = history(&server, &filter, since).await;
        let sql = select(condition, since);
        // Simple protocol, text: every column of every row is the envelope's.
        let rows = simple_rows(&client, &sql).await;
        let got: Vec<Value> = rows.iter().map(|row| envelope_of(row)).collect();
        let want_rows: Vec<Value> = want.iter().map(as_row).collect();
        assert_eq!(got, want_rows, "simple protocol: {sql}");
        // Extended protocol, binary.
        let rows = client.query(&sql, &[]).await.unwrap_or_else(|err| panic!("{sql}: {err}"));
        let got: Vec<(i64, String, SystemTime, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        let want_binary: Vec<(i64, String, SystemTime, Option<String>)> = want
            .iter()
            .map(|e| {
                let at =
                    rowcast::model::Timestamp::parse_rfc3339(e["timestamp"].as_str().expect("t"))
                        .expect("timestamp");
                (
                    e["id"].as_i64().expect("id"),
                    e["type"].as_str().expect("type").to_owned(),
                    at.to_system_time(),
                    e["organization_id"].as_str().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(got, want_binary, "extended protocol: {sql}");
        // psql.
        let out = output(psql(pg, None, &["-c", &sql.replace('*', "id")])).await;
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        let printed: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.parse().expect("an id per line"))
            .collect();
        assert_eq!(printed, ids(&want), "psql: {sql}");
        statements.push(sql.replace('*', "id"));
        expected.push(ids(&want));
    }
    assert!(expected.iter().filter(|ids| !ids.is_empty()).count() >= 9, "{expected:?}");
    assert!(expected.iter().skip(1).all(|ids| ids.len() < log.len()));

    // Time ranges are the history API's `from` (inclusive) and `to` (exclusive).
    let (from, to) =
        (log[2]["timestamp"].as_str().expect("t"), log[8]["timestamp"].as_str().expect("t"));
    let (status, body) =
        get(server.addr, &format!("/api/events?limit=1000&from={from}&to={to}")).await;
    assert_eq!(status, 200, "{body}");
    let want = ids(body["events"].as_array().expect("events"));
    assert!(!want.is_empty() && want.len() < log.len(), "{want:?}");
    let sql = format!("SELECT id FROM events WHERE timestamp >= '{from}' AND timestamp < '{to}'");
    let got: Vec<u64> = simple_rows(&client, &sql)
        .await
        .iter()
        .map(|row| row[0].as_deref().expect("id").parse().expect("id"))
        .collect();
    assert_eq!(got, want, "{sql}");

    // Parameters of the extended protocol are values, typed by where they stand.
    let sql = "SELECT id FROM events WHERE type LIKE $1 AND id > $2 AND organization_id = $3
                 AND data->>'name' <> $4 LIMIT $5";
    let rows = client
        .query(sql, &[&"agent.%", &2i64, &"quant", &"x' OR true --", &10i64])
        .await
        .expect("bound");
    let got: Vec<u64> = rows.iter().map(|row| row.get::<_, i64>(0) as u64).collect();
    let filter = json!({"type": "agent.*", "organization_id": "quant", "where": [["name", "neq", "x' OR true --"]]});
    assert_eq!(got, ids(&history(&server, &filter, 2).await));
    assert!(!got.is_empty());
    let err = client
        .query("SELECT id FROM events WHERE id > $1", &[&"two"])
        .await
        .expect_err("a text id");
    // `id > $1` is an int8: the driver refuses a string for it before sending anything.
    assert!(err.to_string().contains("serializing"), "{err}");

    // A LIMIT is the first rows of the same answer.
    let limited =
        simple_rows(&client, "SELECT id FROM events WHERE type LIKE 'instance.%' LIMIT 2").await;
    let instances = history(&server, &json!({"type": "instance.*"}), 0).await;
    let want: Vec<Option<String>> =
        ids(&instances).iter().take(2).map(|id| Some(id.to_string())).collect();
    assert_eq!(limited.into_iter().flatten().collect::<Vec<_>>(), want);

    // What is not understood is named, with 0A000, and the connection goes on.
    for sql in [
        "SELECT count(*) FROM events",
        "SELECT * FROM events WHERE type = 'a' OR id = 1",
        "DELETE FROM events",
    ] {
        let err = client.simple_query(sql).await.expect_err(sql);
        let db_error = err.as_db_error().expect("a server error");
        assert_eq!(db_error.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{sql}");
        assert!(!db_error.message().is_empty());
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{sql}");
        assert_eq!(simple_rows(&client, "SELECT id FROM events LIMIT 1").await.len(), 1);
    }
    // A cancelled subscription ends with 57014; the connection goes on.
    let mut copy = Box::pin(client.copy_out(subscribe_sql(0).as_str()).await.expect("subscribe"));
    let mut first = Vec::new();
    read_rows(&mut copy, &mut first, 1).await;
    client.cancel_token().cancel_query(NoTls).await.expect("cancel");
    let cancelled = loop {
        match tokio::time::timeout(WAIT, copy.next()).await.expect("ends in time") {
            Some(Ok(_)) => continue,
            Some(Err(err)) => break err,
            None => panic!("the subscription ended without an error"),
        }
    };
    assert_eq!(cancelled.code(), Some(&SqlState::QUERY_CANCELED), "{cancelled}");
    assert_eq!(simple_rows(&client, "SELECT id FROM events LIMIT 1").await.len(), 1);

    let out = output(psql(pg, None, &["-c", "SELECT nonsense FROM events"])).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("nonsense"), "{said}");

    // psycopg: the same answers, the same refusal, the same connection after it.
    if have_psycopg() {
        let out = output(psycopg(pg, PSYCOPG_HISTORY, &[&json!(statements).to_string()])).await;
        assert!(out.status.success(), "psycopg: {}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("json line"))
            .collect();
        for (line, want) in lines.iter().zip(&expected) {
            assert_eq!(line, &json!(want));
        }
        assert_eq!(lines[expected.len()], json!(["0A000"]));
        assert_eq!(lines[expected.len() + 1], json!([log[0]["id"]]));
        let agents = history(&server, &json!({"type": "agent.*"}), 2).await;
        assert_eq!(lines[expected.len() + 2], json!(ids(&agents)), "psycopg's parameters");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_confine_what_a_connection_sees() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth = Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    let mut server = Running::start_with_pg(settings, any_port()).await;
    let pg = server.pg.expect("pg");
    workload(&db.client().await).await;
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;

    // A wrong token is 28P01, an empty one too.
    for password in [token(&["quant"], "another-secret-of-at-least-32-bytes!"), String::new()] {
        let err = connect(pg, Some(&password)).await.expect_err("refused");
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    }
    let out = output(psql(pg, Some("not-a-token"), &["-c", "SELECT id FROM events"])).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("password authentication failed"), "{said}");

    let quant = token(&["quant"], SECRET);
    let client = connect(pg, Some(&quant)).await.expect("a quant token");
    // Only quant's events, as the history API shows them to the same token.
    let rows = simple_rows(&client, "SELECT id, organization_id FROM events").await;
    let want: Vec<u64> = log
        .iter()
        .filter(|e| e["organization_id"] == "quant")
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    let got: Vec<u64> =
        rows.iter().map(|r| r[0].as_deref().expect("id").parse().expect("id")).collect();
    assert_eq!(got, want);
    // Another organization is 42501, for history and subscriptions; the connection goes on.
    for sql in [
        "SELECT * FROM events WHERE organization_id = 'ops'",
        "SELECT * FROM events WHERE organization_id IN ('quant', 'ops')",
    ] {
        let err = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
        assert!(err.as_db_error().expect("db").message().contains("ops"));
        assert_eq!(simple_rows(&client, "SELECT id FROM events LIMIT 1").await.len(), 1);
    }
    let copy = client
        .copy_out("COPY (SUBSCRIBE TO events WHERE organization_id = 'ops') TO STDOUT")
        .await
        .err()
        .expect("refused");
    assert_eq!(copy.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{copy}");
    let err = client.simple_query("SELECT * FROM events ORDER BY id DESC").await.expect_err("desc");
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    assert_eq!(simple_rows(&client, "SELECT id FROM events LIMIT 1").await.len(), 1);

    let out = output(psql(
        pg,
        Some(&quant),
        &["-c", "SELECT id FROM events WHERE organization_id = 'ops'"],
    ))
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("outside your token"), "{said}");

    // A subscription ends when its token expires (FATAL 28000), as a WebSocket closes with 4001.
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 2;
    let claims = json!({"sub": "tester", "exp": exp, "orgs": ["quant"]});
    let short = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode");
    let client = connect(pg, Some(&short)).await.expect("a short-lived token");
    let sql = "COPY (SUBSCRIBE TO events WHERE type LIKE 'agent.%') TO STDOUT";
    let mut stream = Box::pin(client.copy_out(sql).await.expect("subscribe"));
    let end = tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("an end");
    let err = end.expect_err("the token expired");
    assert_eq!(err.code(), Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{err}");
    server.stop().await;
}

/// Lines a child process prints, as they come.
struct Printed {
    lines: Arc<Mutex<Vec<String>>>,
    child: Child,
}

impl Printed {
    fn spawn(mut command: Command) -> Printed {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                sink.lock().expect("lines").push(line);
            }
        });
        Printed { lines, child }
    }

    fn count(&self) -> usize {
        self.lines.lock().expect("lines").len()
    }

    /// The ids of the envelopes printed (COPY text: a backslash is doubled).
    fn ids(&self) -> Vec<u64> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .map(|line| {
                let envelope: Value = serde_json::from_str(&line.replace("\\\\", "\\"))
                    .unwrap_or_else(|err| panic!("{line}: {err}"));
                envelope["id"].as_u64().expect("id")
            })
            .collect()
    }

    /// Waits for the process to end by itself.
    async fn ended(&mut self) -> String {
        for _ in 0..400 {
            if let Ok(Some(_)) = self.child.try_wait() {
                let mut said = String::new();
                if let Some(mut stderr) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = stderr.read_to_string(&mut said);
                }
                return said;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the client did not end when the server stopped");
    }
}

impl Drop for Printed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PSYCOPG_SUBSCRIBE: &str = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    with conn.cursor().copy(sys.argv[2]) as copy:
        for row in copy.rows():
            print(row[0], flush=True)
"#;

fn subscribe_sql(since: u64) -> String {
    format!("COPY (SUBSCRIBE TO events WHERE type LIKE 'agent.%' SINCE {since}) TO STDOUT")
}

/// Reads `stream` into `ids` until it holds `count`.
async fn read_rows(
    stream: &mut std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    ids: &mut Vec<u64>,
    count: usize,
) {
    while ids.len() < count {
        let chunk = tokio::time::timeout(WAIT, stream.next()).await.expect("rows in time");
        let chunk = chunk.expect("open").expect("a row");
        for line in String::from_utf8_lossy(&chunk).lines() {
            let envelope: Value = serde_json::from_str(&line.replace("\\\\", "\\")).expect("json");
            ids.push(envelope["id"].as_u64().expect("id"));
        }
    }
}

/// A client whose socket has a small receive buffer, so that not reading is felt at once.
async fn connect_slow_reader(pg: SocketAddr) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let stream = socket.connect(pg).await.expect("connect");
    let mut config = tokio_postgres::Config::new();
    config.user("rowcast").dbname("events");
    let (client, connection) = config.connect_raw(stream, NoTls).await.expect("startup");
    tokio::spawn(connection);
    client
}

/// The ids of the `agent.*` events of `log`.
fn agent_ids(log: &[Value]) -> Vec<u64> {
    log.iter()
        .filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("agent.")))
        .map(|e| e["id"].as_u64().expect("id"))
        .collect()
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..600 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("waited in vain for {what}");
}

async fn agents(client: &Client, range: std::ops::Range<u32>) {
    client
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant') ON CONFLICT DO NOTHING",
        )
        .await
        .expect("org");
    for i in range {
        client
            .execute(
                "INSERT INTO agents (id, organization_id, name) VALUES ($1, 'quant', $2)",
                &[&format!("g{i}"), &format!("agent \"{i}\"")],
            )
            .await
            .expect("agent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_across_a_restart_exactly_once() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    // Quiet subscriptions write every ping interval: what finds a client gone whose socket
    // still holds input (tokio-postgres closes its statement during the COPY).
    settings.server.ping_interval = Duration::from_millis(300);
    let server = Running::start_with_pg(settings.clone(), any_port()).await;
    let pg = server.pg.expect("pg");
    let source = db.client().await;
    let with_psycopg = have_psycopg();

    // Three drivers subscribe from the start; a first batch reaches them all, live.
    let client = connect(pg, None).await.expect("connect");
    let stream = client.copy_out(subscribe_sql(0).as_str()).await.expect("subscribe");
    let mut stream = Box::pin(stream);
    let mut psql_out = Printed::spawn(psql(pg, None, &["-c", &subscribe_sql(0)]));
    let mut py_out =
        with_psycopg.then(|| Printed::spawn(psycopg(pg, PSYCOPG_SUBSCRIBE, &[&subscribe_sql(0)])));
    let mut seen = Vec::new();
    agents(&source, 0..15).await;
    read_rows(&mut stream, &mut seen, 15).await;
    until("psql's 15 rows", || psql_out.count() >= 15).await;
    if let Some(py) = &py_out {
        until("psycopg's 15 rows", || py.count() >= 15).await;
    }

    // The server stops: each subscription ends with 57P01 naming the id to resume from.
    server.stop().await;
    let end = tokio::time::timeout(WAIT, stream.next()).await.expect("an end in time");
    let err = end.expect("an error").expect_err("the subscription ends");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    assert!(err.as_db_error().expect("db").message().contains("SINCE"), "{err}");
    let said = psql_out.ended().await;
    assert!(said.contains("shutting down"), "psql: {said}");
    if let Some(py) = &mut py_out {
        let said = py.ended().await;
        assert!(said.contains("shutting down"), "psycopg: {said}");
    }

    // Agents added meanwhile are captured once the server is back; each driver resumes
    // with the last id it printed.
    agents(&source, 15..30).await;
    let server = Running::start_with_pg(settings, pg).await;
    let (client, connection) = connect_owned(pg, None).await.expect("reconnect");
    let last = *seen.last().expect("rows");
    let mut stream = Box::pin(client.copy_out(subscribe_sql(last).as_str()).await.expect("resume"));
    let psql_last = *psql_out.ids().last().expect("psql rows");
    let psql_again = Printed::spawn(psql(pg, None, &["-c", &subscribe_sql(psql_last)]));
    let py_again = py_out.as_ref().map(|py| {
        let last = *py.ids().last().expect("psycopg rows");
        Printed::spawn(psycopg(pg, PSYCOPG_SUBSCRIBE, &[&subscribe_sql(last)]))
    });
    agents(&source, 30..45).await;
    read_rows(&mut stream, &mut seen, 45).await;
    until("psql's rows", || psql_out.count() + psql_again.count() >= 45).await;
    if let (Some(before), Some(again)) = (&py_out, &py_again) {
        until("psycopg's rows", || before.count() + again.count() >= 45).await;
    }

    let log = db.settled_events().await;
    let want = agent_ids(&log);
    assert_eq!(want.len(), 45);
    assert_eq!(seen, want, "tokio-postgres: every agent event once, in order");
    let psql_seen = [psql_out.ids(), psql_again.ids()].concat();
    assert_eq!(psql_seen, want, "psql: every agent event once, in order");
    if let (Some(before), Some(again)) = (&py_out, &py_again) {
        assert_eq!([before.ids(), again.ids()].concat(), want, "psycopg");
    }

    // A client that goes away ends its subscription: the bus forgets it.
    drop(stream);
    drop(client);
    connection.abort();
    drop(psql_again);
    drop(py_again);
    let mut connections = u64::MAX;
    for _ in 0..200 {
        let (_, stats) = get(server.addr, "/api/events/stats").await;
        connections = stats["connections"].as_u64().expect("connections");
        if connections == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connections, 0, "the bus forgets subscribers that went away");
    server.stop().await;
}

/// Protocol messages: `tag`, then the length (itself included) and `body`.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn startup() -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0rowcast\0database\0events\0\0");
    let mut out = (body.len() as i32 + 4).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn cstr(text: &str) -> Vec<u8> {
    let mut out = text.as_bytes().to_vec();
    out.push(0);
    out
}

/// Valid conversations, which the property test then breaks.
fn conversations() -> Vec<Vec<u8>> {
    let query = |sql: &str| message(b'Q', &cstr(sql));
    let parse =
        [cstr(""), cstr("SELECT * FROM events WHERE type LIKE 'agent.%' LIMIT 2"), vec![0, 0]]
            .concat();
    let bind = [cstr(""), cstr(""), vec![0, 1, 0, 1], vec![0, 0], vec![0, 2, 0, 1, 0, 0]].concat();
    let extended = [
        message(b'P', &parse),
        message(b'D', &[b"S".as_slice(), &cstr("")].concat()),
        message(b'B', &bind),
        message(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()),
        message(b'S', &[]),
    ]
    .concat();
    // With parameters: `$1` an int8 in binary, `$2` undeclared, in text.
    let sql = "SELECT id FROM events WHERE id > $1 AND data->'n' = $2";
    let parse =
        [cstr(""), cstr(sql), vec![0, 2], 20i32.to_be_bytes().to_vec(), vec![0; 4]].concat();
    let values = [vec![0, 2], 8i32.to_be_bytes().to_vec(), 1i64.to_be_bytes().to_vec()].concat();
    let values = [values, 1i32.to_be_bytes().to_vec(), b"2".to_vec()].concat();
    let bind = [cstr(""), cstr(""), vec![0, 2, 0, 1, 0, 0], values, vec![0, 0]].concat();
    let parameters = [
        message(b'P', &parse),
        message(b'B', &bind),
        message(b'D', &[b"P".as_slice(), &cstr("")].concat()),
        message(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()),
        message(b'S', &[]),
    ]
    .concat();
    // An Execute whose row count is huge or negative: the library reserves room for that many
    // rows up front, which once aborted the whole process.
    let execute_rows = |rows: i32| {
        let parse = [cstr(""), cstr("SELECT id FROM events"), vec![0, 0]].concat();
        let bind = [cstr(""), cstr(""), vec![0, 0], vec![0, 0], vec![0, 0]].concat();
        [
            message(b'P', &parse),
            message(b'B', &bind),
            message(b'E', &[cstr(""), rows.to_be_bytes().to_vec()].concat()),
            message(b'E', &[cstr(""), rows.to_be_bytes().to_vec()].concat()),
            message(b'S', &[]),
        ]
        .concat()
    };
    vec![
        [startup(), query("SELECT * FROM events LIMIT 3")].concat(),
        [startup(), execute_rows(i32::MAX)].concat(),
        [startup(), execute_rows(-1)].concat(),
        [startup(), execute_rows(1)].concat(),
        [startup(), extended].concat(),
        [startup(), parameters].concat(),
        [startup(), query("COPY (SUBSCRIBE TO events SINCE 0) TO STDOUT"), message(b'X', &[])]
            .concat(),
        [startup(), query("BEGIN; SELECT id FROM events WHERE data->>'a' IN (1, 'x'); COMMIT")]
            .concat(),
        [8i32.to_be_bytes(), 80877103i32.to_be_bytes()].concat(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    Length(usize, i32),
}

fn mutated(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len().max(1);
        match mutation {
            Mutation::Flip(at, bits) => {
                let at = at % len;
                if let Some(byte) = bytes.get_mut(at) {
                    *byte ^= bits;
                }
            }
            Mutation::Insert(at, more) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, more.iter().copied());
            }
            Mutation::Truncate(at) => bytes.truncate(at % len),
            Mutation::Length(at, value) => {
                let at = at % len;
                let end = (at + 4).min(bytes.len());
                bytes.splice(at..end, value.to_be_bytes());
            }
        }
    }
    bytes
}

/// Throws `bytes` at the endpoint and reads what it answers, briefly.
async fn throw(pg: SocketAddr, bytes: &[u8]) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(pg).await else { return };
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 1 << 16];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
}

/// Panics raised in the endpoint's code or the protocol crate's, counted by a hook on top of
/// the test harness's own.
static PROTOCOL_PANICS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protocol_bytes_never_stop_the_server() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.location().is_some_and(|l| l.file().contains("pgwire")) {
            PROTOCOL_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let db = TestDb::migrated().await;
    let mut server = Running::start_with_pg(db.settings(), any_port()).await;
    let pg = server.pg.expect("pg");
    agents(&db.client().await, 0..3).await;
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;

    let mutation = prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, bits)| Mutation::Flip(at, bits)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<i32>()).prop_map(|(at, v)| Mutation::Length(at, v)),
    ];
    let corpus = conversations();
    let strategy = prop_oneof![
        3 => (0..corpus.len(), proptest::collection::vec(mutation, 1..4))
            .prop_map(move |(i, mutations)| mutated(corpus[i].clone(), &mutations)),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
        1 => proptest::collection::vec(any::<u8>(), 0..256).prop_map(|tail| [startup(), tail].concat()),
    ];
    let cases: u32 =
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256);
    let cases = cases.clamp(64, 1024);
    let mut runner = TestRunner::new(Config::default());
    for case in 0..cases {
        let bytes = strategy.new_tree(&mut runner).expect("a case").current();
        throw(pg, &bytes).await;
        if case % 64 == 63 {
            let client = connect(pg, None).await.unwrap_or_else(|err| {
                panic!("the endpoint stopped answering after {bytes:02x?}: {err}")
            });
            assert_eq!(simple_rows(&client, "SELECT id FROM events").await.len(), log.len());
        }
    }
    for conversation in conversations() {
        throw(pg, &conversation).await;
    }
    let client = connect(pg, None).await.expect("still serving");
    assert_eq!(simple_rows(&client, "SELECT id FROM events").await.len(), log.len());
    assert_eq!(PROTOCOL_PANICS.load(Ordering::SeqCst), 0, "a protocol handler panicked");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_falls_behind_and_catches_up_from_the_log() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    // A small mailbox, so a reader that stops for a moment overflows it.
    settings.server.outbound_bytes = 16 << 10;
    let mut server = Running::start_with_pg(settings, any_port()).await;
    let pg = server.pg.expect("pg");
    let client = connect_slow_reader(pg).await;
    let sql = "COPY (SUBSCRIBE TO events WHERE type LIKE 'agent.%') TO STDOUT";
    let mut stream = Box::pin(client.copy_out(sql).await.expect("subscribe"));

    // 3000 agents of 2 KB each while the client reads nothing: more than any socket holds.
    let source = db.client().await;
    source
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
             INSERT INTO agents (id, organization_id, name)
                  SELECT 'g' || i, 'quant', repeat('x', 2000) FROM generate_series(1, 3000) i",
        )
        .await
        .expect("agents");
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;
    let want = agent_ids(&log);
    assert_eq!(want.len(), 3000);

    // Now it reads: everything, once, in order, and the server did switch it to the log.
    let mut seen = Vec::new();
    read_rows(&mut stream, &mut seen, want.len()).await;
    assert_eq!(seen, want);
    let (_, metrics) = get(server.addr, "/metrics").await;
    let metrics = metrics.as_str().expect("text").to_owned();
    let switches: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("rowcast_lagging_switches_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the lagging counter");
    assert!(switches >= 1, "the reader never fell behind: the test is void");
    // Live again: a new event comes straight through.
    source
        .batch_execute(
            "INSERT INTO agents (id, organization_id, name) VALUES ('last', 'quant', 'l')",
        )
        .await
        .expect("one more");
    read_rows(&mut stream, &mut seen, want.len() + 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_too_far_behind_is_told_where_to_resume() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    settings.server.outbound_bytes = 16 << 10;
    settings.server.max_lag = Duration::from_secs(1);
    let mut server = Running::start_with_pg(settings, any_port()).await;
    let pg = server.pg.expect("pg");
    let client = connect_slow_reader(pg).await;
    let sql = |since: u64| {
        format!("COPY (SUBSCRIBE TO events WHERE type LIKE 'agent.%' SINCE {since}) TO STDOUT")
    };
    let mut stream = Box::pin(client.copy_out(sql(0).as_str()).await.expect("subscribe"));

    // Transactions the reader does not read, then, 1.5 s later, one more event. (The lag is
    // measured by commit time, so the burst is many transactions.)
    let source = db.client().await;
    source
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Quant')")
        .await
        .expect("org");
    for batch in 0..30 {
        source
            .execute(
                "INSERT INTO agents (id, organization_id, name)
                      SELECT 'g' || $1::int || '_' || i, 'quant', repeat('x', 2000)
                        FROM generate_series(1, 100) i",
                &[&batch],
            )
            .await
            .expect("agents");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    source
        .batch_execute(
            "INSERT INTO agents (id, organization_id, name) VALUES ('late', 'quant', 'l')",
        )
        .await
        .expect("late agent");
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;
    let want = agent_ids(&log);

    // Reading now, it gets what was sent, then 53400 naming the id to resume from.
    let mut seen = Vec::new();
    let err = loop {
        let chunk = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("stuck after {} of {} rows", seen.len(), want.len()))
            .expect("open");
        match chunk {
            Ok(chunk) => {
                let line = String::from_utf8_lossy(&chunk);
                let envelope: Value = serde_json::from_str(line.trim_end()).expect("json");
                seen.push(envelope["id"].as_u64().expect("id"));
            }
            Err(err) => break err,
        }
    };
    assert_eq!(err.code(), Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED), "{err}");
    let message = err.as_db_error().expect("db").message().to_owned();
    let resume: u64 = message
        .rsplit("SINCE ")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resume id in {message:?}"));
    assert!(seen.len() < want.len(), "it was ended before the end");
    assert_eq!(Some(&resume), seen.last().or(Some(&0)), "{message}");
    // The connection goes on, and resuming there loses nothing and repeats nothing.
    let mut stream = Box::pin(client.copy_out(sql(resume).as_str()).await.expect("resume"));
    read_rows(&mut stream, &mut seen, want.len()).await;
    assert_eq!(seen, want);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_for_tls_gets_it() {
    let certs = crate::support::certs::Certs::new();
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth = Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    settings.server.pg_tls = Some(
        rowcast::pgwire::tls::server_config(&certs.server_cert(), &certs.server_key())
            .expect("tls"),
    );
    let mut server = Running::start_with_pg(settings, any_port()).await;
    let pg = server.pg.expect("pg");
    agents(&db.client().await, 0..3).await;
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;
    let token = token(&["quant"], SECRET);

    // rowcast's own client, checking the chain and the host name.
    let url = format!(
        "postgres://svc:{token}@localhost:{}/events?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        certs.ca().display()
    );
    let target: rowcast::pg::Target = url.parse().expect("url");
    let client = rowcast::pg::connect(&target, "test").await.expect("a TLS connection");
    assert_eq!(simple_rows(&client, "SELECT id FROM events").await.len(), log.len());

    // psql too; and a client that does not ask still gets in, in the clear.
    let mut command = psql(pg, Some(&token), &["-h", "localhost", "-c", "SELECT id FROM events"]);
    command.env("PGSSLMODE", "verify-full").env("PGSSLROOTCERT", certs.ca());
    let out = output(command).await;
    assert!(out.status.success(), "psql over TLS: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), log.len());
    let plain = connect(pg, Some(&token)).await.expect("a plain connection");
    assert_eq!(simple_rows(&plain, "SELECT id FROM events").await.len(), log.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_limit_is_told_why() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    settings.server.max_connections = 1;
    let server = Running::start_with_pg(settings, any_port()).await;
    let pg = server.pg.expect("pg");
    let first = connect(pg, None).await.expect("the one connection");
    let err = connect(pg, None).await.expect_err("over the limit");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let out = output(psql(pg, None, &["-c", "SELECT id FROM events"])).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("too many connections"), "{said}");
    // The place comes back when the first leaves.
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        if let Ok(client) = connect(pg, None).await {
            again = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = again.expect("a place again");
    assert!(simple_rows(&again, "SELECT id FROM events").await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_log_is_an_error_not_a_gap() {
    let db = TestDb::migrated().await;
    let mut server = Running::start_with_pg(db.settings(), any_port()).await;
    let pg = server.pg.expect("pg");
    agents(&db.client().await, 0..10).await;
    let log = db.settled_events().await;
    server.wait_for_id(log.last().and_then(|e| e["id"].as_u64()).expect("events"), WAIT).await;
    // Retention took the first five events.
    db.client()
        .await
        .batch_execute("DELETE FROM rowcast.events WHERE id <= 5")
        .await
        .expect("trim");

    let client = connect(pg, None).await.expect("connect");
    let sql = |since: u64| format!("COPY (SUBSCRIBE TO events SINCE {since}) TO STDOUT");
    let mut stream = Box::pin(client.copy_out(sql(2).as_str()).await.expect("subscribe"));
    let end = tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("an end");
    let err = end.expect_err("no rows past a gap");
    assert_eq!(err.code(), Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE), "{err}");
    let message = err.as_db_error().expect("db").message().to_owned();
    assert!(message.contains("SINCE 5"), "{message}");
    // From where the log starts, everything it holds, once.
    let mut stream = Box::pin(client.copy_out(sql(5).as_str()).await.expect("resume"));
    let mut seen = Vec::new();
    read_rows(&mut stream, &mut seen, log.len() - 5).await;
    assert_eq!(seen, (6..=log.len() as u64).collect::<Vec<u64>>());
    server.stop().await;
}

/// Port 0: the endpoint takes a free port as it binds (see `Running::pg`).
fn any_port() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}
