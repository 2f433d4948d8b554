//! Application write throughput with rowcast's capture triggers installed versus without.
//!
//! `cargo bench --bench trigger_overhead [-- ROWS CLIENTS ROWS_PER_TXN ROUNDS] [--durable]`
//!
//! Starts a throwaway cluster from the machine's Postgres binaries, creates the reference
//! schema in three databases, installs the trigger source in two of them, one with a publisher
//! draining it (as in production), and has CLIENTS connections insert ROWS agents in
//! transactions of ROWS_PER_TXN rows into each. Prints rows per second for each. It does so
//! ROUNDS times (default 3), the three alternated in each round, each round in fresh databases,
//! and prints each round's ratios and their median: one run of each is too short to compare on
//! a shared machine.
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
    let rows = arg(1, 100_000);
    let clients = arg(2, 4);
    let per_txn = arg(3, 1);
    let rounds = arg(4, 3).max(1);
    let durable = std::env::args().any(|a| a == "--durable");
    let mut settings = vec![("wal_level", "logical"), ("synchronous_commit", "on")];
    if durable {
        settings.extend([("fsync", "on"), ("full_page_writes", "on")]);
    }
    let cluster = Cluster::start(&settings).expect("cluster");
    let admin = client(&cluster.url("postgres")).await;
    // `triggers` measures the triggers alone (the outbox is drained afterwards); `draining`
    // also runs the publisher, competing for the same cores as it would on a small machine.
    let scenarios = [("plain", false, false), ("triggers", true, false), ("draining", true, true)];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    for (round, (scenario, (name, triggers, draining))) in
        (0..rounds).flat_map(|round| scenarios.iter().enumerate().map(move |s| (round, s)))
    {
        let (triggers, draining) = (*triggers, *draining);
        let database = format!("{name}_{round}");
        admin.batch_execute(&format!("CREATE DATABASE {database}")).await.expect("database");
        let url = cluster.url(&database);
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
        results[scenario].push(rate);
    }
    println!(
        "rows={rows} clients={clients} rows_per_transaction={per_txn} rounds={rounds} durable={durable}"
    );
    println!("{:<10} {:>14}", "schema", "inserts/s, by round");
    for ((name, _, _), rates) in scenarios.iter().zip(&results) {
        let rates: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!("{name:<10} {:>14}", rates.join(", "));
    }
    for ((name, _, _), rates) in scenarios.iter().zip(&results).skip(1) {
        let mut ratios: Vec<f64> =
            rates.iter().zip(&results[0]).map(|(rate, plain)| rate / plain * 100.0).collect();
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.0} %")).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        println!("{name}: {median:.0} % of plain (median; by round {})", each.join(", "));
    }
}
