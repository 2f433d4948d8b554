//! Application events: how fast they reach the log, beside plain inserts. rowcast's release
//! binary against its own throwaway Postgres (replication capture).
//!
//! `cargo bench --bench app_events [-- COUNT CONNECTIONS]` (defaults 20000 4)
//!
//! Prints, each measured from the first write until the log's head holds the last event:
//! - single-row INSERT transactions per second (the baseline);
//! - `SELECT rowcast.emit(...)` transactions per second (one event each, through the WAL);
//! - `POST /api/events` with batches of 100: events/s, requests/s and request latency p50/p99.
//!
//! See docs/benchmarks.md for the figures and the machine.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rowcast::apps::cluster::Cluster;
use support::{arg, client, start_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}

async fn head(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT last_id FROM rowcast.log_head", &[]).await.expect("head").get(0)
}

async fn wait_for_head(db: &tokio_postgres::Client, target: i64) {
    while head(db).await < target {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `statement` (`$1` = a unique number) `count` times over `connections` connections,
/// one transaction each; returns transactions per second until the log holds all `events`.
async fn sql_rate(
    url: &str,
    db: &tokio_postgres::Client,
    statement: &'static str,
    count: usize,
    connections: usize,
    offset: usize,
) -> f64 {
    let target = head(db).await + count as i64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let writer = client(url).await;
        tasks.push(tokio::spawn(async move {
            let share = count / connections + usize::from(c < count % connections);
            for i in 0..share {
                let n = (offset + c * count + i) as i64;
                writer.execute(statement, &[&n]).await.expect(statement);
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    wait_for_head(db, target).await;
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let count = arg(1, 20_000);
    let connections = arg(2, 4);
    println!("rowcast application events benchmark: count={count} connections={connections}");
    let cluster = Cluster::start(&[("wal_level", "logical")]).expect("cluster");
    let admin = client(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE bench").await.expect("database");
    let url = cluster.url("bench");
    let db = client(&url).await;
    rowcast::setup::migrate(&db).await.expect("schema");
    db.batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Quant')")
        .await
        .expect("org");
    let server = start_server(&url, &[]).await;
    let addr = server.addr;

    let inserts = sql_rate(
        &url,
        &db,
        "INSERT INTO agents (id, organization_id, name) VALUES ('a-' || $1::bigint, 'quant', 'a')",
        count,
        connections,
        0,
    )
    .await;
    println!("sql inserts: {inserts:.0} transactions/s (one row, one event each)");
    let emits = sql_rate(
        &url,
        &db,
        "SELECT rowcast.emit('deployment.log', jsonb_build_object('n', $1::bigint), organization_id => 'quant')",
        count,
        connections,
        count * connections,
    )
    .await;
    println!("sql emits: {emits:.0} transactions/s (one rowcast.emit() each)");

    const BATCH: usize = 100;
    let requests = count / BATCH;
    let target = head(&db).await + (requests * BATCH) as i64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let share = requests / connections + usize::from(c < requests % connections);
            for r in 0..share {
                let events: Vec<String> = (0..BATCH)
                    .map(|i| {
                        format!(
                            r#"{{"type":"deployment.log","organization_id":"quant","key":"b-{c}-{r}-{i}","data":{{"line":"step {i}"}}}}"#
                        )
                    })
                    .collect();
                let body = format!(r#"{{"events":[{}]}}"#, events.join(","));
                let sent = Instant::now();
                let (status, response) = http(addr, "POST", "/api/events", &body).await;
                assert_eq!(status, 201, "{response}");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("poster"));
    }
    wait_for_head(&db, target).await;
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let at = |p: f64| {
        let index = ((latencies.len().max(1) - 1) as f64 * p).round() as usize;
        latencies.get(index).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "http batches of {BATCH}: {:.0} events/s, {:.0} requests/s, latency p50 {:.1} ms p99 {:.1} ms",
        (requests * BATCH) as f64 / elapsed,
        requests as f64 / elapsed,
        at(0.5),
        at(0.99)
    );
    drop(server);
}
