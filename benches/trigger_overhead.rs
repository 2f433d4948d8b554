//! Application write throughput with rowcast's capture triggers installed versus without.
//!
//! `cargo bench --bench trigger_overhead [-- ROWS CLIENTS ROWS_PER_TXN] [--durable]`
//!
//! Starts a throwaway cluster from the machine's Postgres binaries, creates the reference
//! schema in three databases, installs the trigger source in two of them, one with a publisher
//! draining it (as in production), and has CLIENTS connections insert ROWS agents in
//! transactions of ROWS_PER_TXN rows into each. Prints rows per second for each.
//!
//! The throwaway cluster runs with `fsync=off` (CPU is what is measured); `--durable` turns
//! `fsync` and `full_page_writes` back on, as a production server runs, so that commits wait
//! for the disk.

mod support;

use std::time::{Duration, Instant};

use rowcast::apps::cluster::Cluster;
use rowcast::config::{Settings, SourceMode};
use support::{arg, client};
use tokio_util::sync::CancellationToken;

/// Inserts `rows` agents over `clients` connections; returns rows per second.
async fn write(url: &str, rows: usize, clients: usize, per_txn: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client(url).await;
        let share = rows / clients;
        tasks.push(tokio::spawn(async move {
            let statement = client
                .prepare(
                    "INSERT INTO agents (id, organization_id, domain_id, name, config)
                     SELECT 'a-' || $1::int || '-' || i, 'quant', 'demo', 'agent ' || i, '{\"model\": \"m\", \"temperature\": 0.2}'
                       FROM generate_series($2::int, $3::int) i",
                )
                .await
                .expect("prepare");
            let mut next = 0;
            while next < share {
                let last = (next + per_txn).min(share) - 1;
                client.execute(&statement, &[&(c as i32), &(next as i32), &(last as i32)]).await.expect("insert");
                next = last + 1;
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    (rows / clients * clients) as f64 / started.elapsed().as_secs_f64()
}

type Serving = tokio::task::JoinHandle<Result<(), rowcast::server::ServeError>>;

/// Starts the publisher (and its idle HTTP side) on a free port.
async fn serve(settings: &Settings, shutdown: &CancellationToken) -> Serving {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    tokio::spawn(rowcast::server::run(settings.clone(), listener, shutdown.clone()))
}

#[tokio::main]
async fn main() {
    let rows = arg(1, 20_000);
    let clients = arg(2, 4);
    let per_txn = arg(3, 1);
    let durable = std::env::args().any(|a| a == "--durable");
    let mut settings = vec![("wal_level", "logical"), ("synchronous_commit", "on")];
    if durable {
        settings.extend([("fsync", "on"), ("full_page_writes", "on")]);
    }
    let cluster = Cluster::start(&settings).expect("cluster");
    let admin = client(&cluster.url("postgres")).await;
    let mut results = Vec::new();
    // `triggers` measures the triggers alone (the outbox is drained afterwards); `draining`
    // also runs the publisher, competing for the same cores as it would on a small machine.
    for (name, triggers, draining) in
        [("plain", false, false), ("triggers", true, false), ("draining", true, true)]
    {
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("database");
        let url = cluster.url(name);
        let app = client(&url).await;
        rowcast::setup::migrate(&app).await.expect("schema");
        app.batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
             INSERT INTO domains (id, organization_id, name) VALUES ('demo', 'quant', 'Demo')",
        )
        .await
        .expect("seed");
        let shutdown = CancellationToken::new();
        let mut settings = Settings::new(url.parse().expect("url"));
        settings.source = SourceMode::Triggers;
        if triggers {
            rowcast::setup::setup_triggers(&settings).await.expect("setup");
        }
        let mut server = if draining { Some(serve(&settings, &shutdown).await) } else { None };
        // Warm up, then measure.
        write(&url, 1_000.min(rows), clients, per_txn).await;
        app.batch_execute("DELETE FROM agents").await.expect("reset");
        let rate = write(&url, rows, clients, per_txn).await;
        if triggers && server.is_none() {
            server = Some(serve(&settings, &shutdown).await);
        }
        if let Some(server) = server {
            // Let the publisher finish draining before it stops.
            for _ in 0..600 {
                let left: i64 = app
                    .query_one("SELECT count(*) FROM rowcast.outbox", &[])
                    .await
                    .expect("outbox")
                    .get(0);
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            shutdown.cancel();
            server.await.expect("joined").expect("server");
        }
        results.push((name, rate));
    }
    println!("rows={rows} clients={clients} rows_per_transaction={per_txn} durable={durable}");
    println!("{:<10} {:>14}", "schema", "inserts/s");
    for (name, rate) in &results {
        println!("{name:<10} {rate:>14.0}");
    }
    for (name, rate) in &results[1..] {
        println!("{name}: {:.0} % of plain", rate / results[0].1 * 100.0);
    }
}
