//! The scaled roles (SPEC §10) on this machine: one `--role publisher` over a NATS server with
//! JetStream, and 0, 1 or 3 `--role gateway` processes with WebSocket clients spread over them.
//!
//! `cargo bench --bench scaled [-- ROWS RATE CLIENTS]` (defaults 10000 1000 100): per run, a
//! fresh database and stream; ROWS agent inserts at RATE changes/s (4 writers, one row per
//! transaction); CLIENTS clients subscribed to everything, spread evenly over the gateways (none
//! with 0 gateways). Prints, per run: events delivered/s (all clients, first to last frame),
//! commit-to-client latency p50/p95/p99/max, the publisher's CPU seconds for the run (the same
//! work each time: it must not grow with the gateways, JetStream does the fan-out to them) and
//! each gateway's share of a core. docs/benchmarks.md
//! has the figures and the machine.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rowcast::apps::cluster::Cluster;
use rowcast::apps::nats_cluster::NatsCluster;
use support::{Server, arg, client, now_micros, pace, percentile, spawn_server};
use tokio_tungstenite::tungstenite::Message;

/// `rowcast serve --role ROLE` on slot and stream `name` (its subjects under `name` too).
fn serve(url: &str, role: &str, nats: &str, name: &str) -> Server {
    let prefix = format!("rowcast.{name}");
    let flags = ["--role", role, "--nats-url", nats, "--nats-stream", name, "--slot", name];
    spawn_server(url, &[&flags[..], &["--nats-subject-prefix", &prefix]].concat())
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    frames: AtomicU64,
    first: AtomicI64,
    last: AtomicI64,
    latencies: std::sync::Mutex<Vec<i64>>,
}

/// A client subscribed to everything, reading until the connection ends.
async fn subscriber(addr: SocketAddr, seen: Arc<Seen>) -> tokio::task::JoinHandle<()> {
    let url = format!("ws://{addr}/ws/events?type=*");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    tokio::spawn(async move {
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(text) = message else { continue };
            // The envelope starts with id, type and timestamp.
            let Some(at) = text.find("\"timestamp\":\"") else { continue };
            let Some(stamp) = text.get(at + 13..at + 13 + 27) else { continue };
            let Some(committed) = rowcast::model::Timestamp::parse_rfc3339(stamp) else {
                continue;
            };
            let received = now_micros();
            seen.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(received - committed.0);
            let _ = seen.first.compare_exchange(0, received, Ordering::Relaxed, Ordering::Relaxed);
            seen.last.store(received, Ordering::Relaxed);
            seen.frames.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Inserts `rows` agents, one per transaction, over 4 connections at `rate` changes/s.
async fn write(url: &str, rows: usize, rate: f64, tag: &str) {
    let writers = 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let db = client(url).await;
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..rows / writers {
                db.execute(
                    "INSERT INTO agents (id, organization_id, name, status)
                     VALUES ($1 || '-' || $2::int || '-' || $3::int, 'org0', 'agent', 'active')",
                    &[&tag, &(w as i32), &(i as i32)],
                )
                .await
                .expect("insert");
                pace(started, i + 1, writers, rate).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
}

#[tokio::main]
async fn main() {
    let rows = arg(1, 10_000);
    let rate = arg(2, 1_000) as f64;
    let clients = arg(3, 100);
    println!("rowcast scaled benchmark: rows={rows} rate={rate}/s clients={clients}");
    let postgres = Cluster::start(&[]).expect("a throwaway Postgres");
    let nats = NatsCluster::start(1).expect("a throwaway NATS server");
    let admin = client(&postgres.url("postgres")).await;
    // 0 gateways first and again last: the first run also warms Postgres and NATS up.
    for (run, gateways) in [0usize, 1, 3, 0].into_iter().enumerate() {
        let name = format!("scaled_{run}_{gateways}");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("database");
        let url = postgres.url(&name);
        rowcast::setup::migrate(&client(&url).await).await.expect("reference schema");
        admin.batch_execute("SELECT 1").await.expect("admin");
        let db = client(&url).await;
        db.batch_execute("INSERT INTO organizations (id, name) VALUES ('org0', 'Org')")
            .await
            .expect("org");
        let publisher = serve(&url, "publisher", &nats.url(0), &name);
        publisher.wait_ready(&db).await;
        let fronts: Vec<Server> =
            (0..gateways).map(|_| serve(&url, "gateway", &nats.url(0), &name)).collect();
        for front in &fronts {
            front.wait_ready(&db).await;
        }
        let seen = Arc::new(Seen::default());
        let mut readers = Vec::new();
        if gateways > 0 {
            for i in 0..clients {
                readers.push(subscriber(fronts[i % gateways].addr, seen.clone()).await);
            }
        }
        let cpu_before = publisher.cpu();
        let gateways_before: Vec<f64> = fronts.iter().map(Server::cpu).collect();
        let started = Instant::now();
        write(&url, rows, rate, &name).await;
        let expected = if gateways > 0 { (rows / 4 * 4 * clients) as u64 } else { 0 };
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen.frames.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // What the publisher still had to publish after the last commit.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let elapsed = started.elapsed().as_secs_f64();
        // The same work in every run: CPU seconds, not a share of a run whose length depends
        // on how fast the clients read.
        let publisher_cpu = publisher.cpu() - cpu_before;
        let per_event = publisher_cpu / rows as f64 * 1e6;
        let gateway_cpu: Vec<String> = fronts
            .iter()
            .zip(&gateways_before)
            .map(|(front, before)| format!("{:.0}%", (front.cpu() - before) / elapsed * 100.0))
            .collect();
        let frames = seen.frames.load(Ordering::Relaxed);
        let span = (seen.last.load(Ordering::Relaxed) - seen.first.load(Ordering::Relaxed)).max(1);
        let mut latencies = std::mem::take(&mut *seen.latencies.lock().expect("latencies"));
        latencies.sort_unstable();
        if gateways == 0 {
            println!(
                "0 gateways: {rows} changes at {rate}/s in {elapsed:.1}s; publisher CPU {publisher_cpu:.2}s ({per_event:.0} µs per event)"
            );
        } else {
            println!(
                "{gateways} gateway(s), {clients} clients: {frames} of {expected} frames, {:.0} deliveries/s; \
                 latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms; publisher CPU {publisher_cpu:.2}s ({per_event:.0} µs per event), \
                 gateways CPU {} of one core over {elapsed:.1}s",
                frames as f64 / (span as f64 / 1e6),
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.95),
                percentile(&latencies, 0.99),
                percentile(&latencies, 1.0),
                gateway_cpu.join(" / "),
            );
        }
        drop(fronts);
        drop(publisher);
        for reader in readers {
            reader.abort();
        }
    }
}
