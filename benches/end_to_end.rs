//! End-to-end benchmark: rowcast's release binary against its own throwaway Postgres, with
//! real WebSocket clients, next to `pg_recvlogical` draining the same WAL (the physical limit).
//!
//! `cargo bench --bench end_to_end [-- ROWS IDLE LATENCY_CLIENTS READERS TXN_ROWS STALLED]
//! [--predicates] [--unix]` (defaults 100000 10000 1000 10 100 0; READERS are the clients subscribed to
//! everything during the throughput run, TXN_ROWS the rows of each of its transactions, STALLED
//! clients subscribed to everything that never read during it; ROWS, IDLE and LATENCY_CLIENTS 0
//! skip those runs). With `--predicates`, the latency run is repeated with a `where` predicate
//! on every client's subscription (see [`Where`]) instead of the run with a slow client. With
//! `--unix`, rowcast and `pg_recvlogical` reach Postgres over its Unix-domain socket (the
//! writers stay on TCP). The server runs with its default settings.
//!
//! First, with ROWS > 0, capture alone: ROWS changes written while rowcast is stopped, then
//! drained into its log from a standing start, beside `pg_recvlogical` draining the same WAL
//! alone (the ratio issue 15 tracks).
//!
//! Prints, per scenario: changes/s sustained, events delivered/s, commit-to-client latency
//! p50/p95/p99/max (commit time from Postgres, receive time on the same clock), server RSS (now and
//! peak), RSS per idle connection and server CPU; for the throughput run, whether every reader
//! got every event in order and stayed connected, and how often readers fell behind. See
//! docs/benchmarks.md for the figures and the machine.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rowcast::apps::cluster::Cluster;
use support::{
    arg, client, clock_ticks, cpu_seconds, cpu_ticks, now_micros, pace, percentile, start_server,
};
use tokio_tungstenite::tungstenite::Message;

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// A `/proc/PID/status` figure in KB (`VmRSS:`, `VmHWM:` the peak RSS).
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU ticks of a Postgres cluster's processes: its postmaster (`None`; with its ended
/// backends) and each live backend by pid.
fn cluster_ticks(cluster: &Cluster) -> HashMap<Option<u32>, u64> {
    let pid_file = cluster.dir().join("data/postmaster.pid");
    let Some(postmaster) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
    else {
        return HashMap::new();
    };
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            .unwrap_or_default();
    let mut ticks: HashMap<Option<u32>, u64> = children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(|c| (Some(c), cpu_ticks(c, false)))
        .collect();
    ticks.insert(None, cpu_ticks(postmaster, true));
    ticks
}

/// The Postgres processes that work for rowcast: the walsender of its slot, and its other
/// connections (named `rowcast <role>`: the log writer, the catalog, readers of the log).
async fn rowcast_backends(db: &tokio_postgres::Client) -> (Vec<u32>, Vec<u32>) {
    let pids =
        |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect();
    let walsender = db
        .query("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'rowcast' AND active_pid IS NOT NULL", &[])
        .await
        .expect("walsender");
    let log = db
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE backend_type = 'client backend' AND application_name LIKE 'rowcast %'",
            &[],
        )
        .await
        .expect("log backends");
    (pids(walsender), pids(log))
}

/// Postgres's CPU from a starting point, in % of one core over `over`: all of it, rowcast's
/// walsender, and rowcast's other connections.
struct PostgresCpu(HashMap<Option<u32>, u64>);

impl PostgresCpu {
    fn start(cluster: &Cluster) -> PostgresCpu {
        PostgresCpu(cluster_ticks(cluster))
    }

    async fn shares(
        &self,
        cluster: &Cluster,
        db: &tokio_postgres::Client,
        over: Duration,
    ) -> (f64, f64, f64) {
        let after = cluster_ticks(cluster);
        let percent = |ticks: u64| ticks as f64 / clock_ticks() / over.as_secs_f64() * 100.0;
        let grew =
            |pid| after.get(&pid).unwrap_or(&0).saturating_sub(*self.0.get(&pid).unwrap_or(&0));
        let used = |pids: &[u32]| percent(pids.iter().map(|&pid| grew(Some(pid))).sum());
        let (walsender, log) = rowcast_backends(db).await;
        // All of it: what every process has now less what every process had then. (A backend
        // that ended in between moved its whole lifetime into the postmaster's reaped time;
        // its share from before the start is taken off here.)
        let total = |ticks: &HashMap<Option<u32>, u64>| ticks.values().sum::<u64>();
        (percent(total(&after).saturating_sub(total(&self.0))), used(&walsender), used(&log))
    }
}

fn micros_of(timestamp: &str) -> i64 {
    rowcast::model::Timestamp::parse_rfc3339(timestamp).map_or(0, |t| t.0)
}

/// The whole response to a GET, or nothing.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut response = String::new();
    if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(request.as_bytes()).await;
        let _ = stream.read_to_string(&mut response).await;
    }
    response
}

/// A counter of the server's `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let text = http_get(addr, "/metrics").await;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The server's commit-to-stage histograms from `/metrics`: each series (the stage, or `sent`
/// for commit to a frame written to a client's socket) with its buckets (`le` in seconds,
/// cumulative count).
async fn stage_histograms(addr: SocketAddr) -> Vec<(String, Vec<(f64, u64)>)> {
    let text = http_get(addr, "/metrics").await;
    let mut series: Vec<(String, Vec<(f64, u64)>)> = Vec::new();
    for line in text.lines() {
        let parsed = if let Some(rest) = line.strip_prefix("rowcast_commit_to_send_seconds_bucket{")
        {
            Some(("sent", rest))
        } else if let Some(rest) = line.strip_prefix("rowcast_pipeline_seconds_bucket{stage=\"") {
            rest.split_once("\",")
        } else {
            None
        };
        let Some((name, rest)) = parsed else { continue };
        let Some((le, count)) = rest.strip_prefix("le=\"").and_then(|r| r.split_once("\"} "))
        else {
            continue;
        };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
        let Ok(count) = count.trim().parse() else { continue };
        match series.iter_mut().find(|(n, _)| n == name) {
            Some((_, buckets)) => buckets.push((le, count)),
            None => series.push((name.to_owned(), vec![(le, count)])),
        }
    }
    series
}

/// For each stage, the p50 and p99 (ms) of what was observed between two readings, read off
/// the buckets (linear within one): rowcast's own share of the latency, without the clients'.
fn stage_quantiles(
    before: &[(String, Vec<(f64, u64)>)],
    after: &[(String, Vec<(f64, u64)>)],
) -> String {
    let quantile = |buckets: &[(f64, u64)], q: f64| {
        let total = buckets.last().map_or(0, |b| b.1);
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0);
        for &(le, count) in buckets {
            if count as f64 >= rank && count > below {
                if le.is_infinite() {
                    return lower * 1000.0;
                }
                let share = (rank - below as f64) / (count - below) as f64;
                return (lower + (le - lower) * share) * 1000.0;
            }
            (lower, below) = (le, count);
        }
        lower * 1000.0
    };
    // In the order an event passes them.
    let order = ["received", "sent_to_log", "appended", "sent"];
    let mut after: Vec<_> = after.iter().collect();
    after.sort_by_key(|(name, _)| order.iter().position(|o| o == name));
    after
        .into_iter()
        .map(|(name, buckets)| {
            let earlier = before.iter().find(|(n, _)| n == name).map(|b| b.1.as_slice());
            let delta: Vec<(f64, u64)> = buckets
                .iter()
                .map(|&(le, count)| {
                    let was = earlier.and_then(|e| e.iter().find(|b| b.0 == le)).map_or(0, |b| b.1);
                    (le, count.saturating_sub(was))
                })
                .collect();
            format!("{name} {:.1}/{:.1}", quantile(&delta, 0.5), quantile(&delta, 0.99))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    frames: AtomicU64,
    latencies: std::sync::Mutex<Vec<i64>>,
    last_frame_micros: AtomicU64,
}

/// What one client saw of the stream itself.
#[derive(Default)]
struct Order {
    /// The id of the last event.
    last: AtomicU64,
    events: AtomicU64,
    /// Events whose id was not above the one before: out of order or repeated.
    disorder: AtomicU64,
    /// `lagging` frames: the server had this client catch up from the log.
    lagging: AtomicU64,
    /// The close code, or 1 for an end without one; 0 while connected.
    closed: AtomicU64,
}

/// A client subscribed with `query`; reads forever unless `reads` is false.
async fn subscriber(
    addr: SocketAddr,
    query: String,
    seen: Arc<Seen>,
    reads: bool,
) -> (tokio::task::JoinHandle<()>, Arc<Order>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/events?{query}"))
        .await
        .expect("ws");
    let order = Arc::new(Order::default());
    let seen_order = order.clone();
    let task = tokio::spawn(async move {
        let order = seen_order;
        if !reads {
            // Never read: the server must close it (4008) without slowing the others.
            std::future::pending::<()>().await;
        }
        while let Some(message) = ws.next().await {
            let message = match message {
                Ok(Message::Close(frame)) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    order.closed.store(u64::from(code), Ordering::Relaxed);
                    return;
                }
                Ok(message) => message,
                Err(_) => break,
            };
            let Message::Text(text) = message else { continue };
            // Events start with their id: `{"id":N,`.
            if let Some(id) = text
                .strip_prefix("{\"id\":")
                .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            {
                if id <= order.last.swap(id, Ordering::Relaxed) {
                    order.disorder.fetch_add(1, Ordering::Relaxed);
                }
                order.events.fetch_add(1, Ordering::Relaxed);
            } else if text.contains("\"type\":\"lagging\"") {
                order.lagging.fetch_add(1, Ordering::Relaxed);
            }
            // Cheap extraction: the envelope starts with id, type and timestamp.
            let Some(at) = text.find("\"timestamp\":\"") else { continue };
            let stamp = &text[at + 13..at + 13 + 27];
            let received = now_micros();
            seen.latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(received - micros_of(stamp));
            seen.frames.fetch_add(1, Ordering::Relaxed);
            seen.last_frame_micros.store(received as u64, Ordering::Relaxed);
        }
        order.closed.store(1, Ordering::Relaxed);
    });
    (task, order)
}

/// The floor under rowcast's latency, measured beside it: how long after its commit time a bare
/// replication reader (no log, no clients) sees each transaction, and how long a synchronous
/// one-row commit takes (what the log append waits for at least). Both run until `stop`.
struct Floor {
    decoded: Arc<std::sync::Mutex<Vec<i64>>>,
    committed: Arc<std::sync::Mutex<Vec<i64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Floor {
    async fn start(url: &str, db: &tokio_postgres::Client) -> Floor {
        use rowcast::capture::pgoutput::{LogicalMessage, decode};
        use rowcast::capture::replication::{
            ConnectParams, PG_EPOCH_OFFSET_MICROS, ReplicationClient, ReplicationMessage,
        };
        let _ = db.batch_execute("SELECT pg_drop_replication_slot('bench_floor')").await;
        db.batch_execute(
            "SELECT pg_create_logical_replication_slot('bench_floor', 'pgoutput');
             CREATE TABLE IF NOT EXISTS bench_commit (at timestamptz)",
        )
        .await
        .expect("floor slot");
        let decoded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let committed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let target: rowcast::pg::Target = url.parse().expect("url");
        let replication = ReplicationClient::connect(&ConnectParams::from_target(&target, 1 << 30))
            .await
            .expect("replication connection");
        let mut stream = replication
            .start_replication("bench_floor", "rowcast", 0)
            .await
            .expect("start replication");
        let seen = decoded.clone();
        let reader = tokio::spawn(async move {
            while let Ok(message) = stream.next().await {
                match message {
                    ReplicationMessage::XLogData { wal_start, data, .. } => {
                        if let Ok(LogicalMessage::Begin { commit_time, .. }) = decode(data) {
                            let lag = now_micros() - (commit_time + PG_EPOCH_OFFSET_MICROS);
                            seen.lock().unwrap_or_else(|p| p.into_inner()).push(lag);
                        }
                        let _ = stream.send_status(wal_start, false).await;
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        if reply_requested {
                            let _ = stream.send_status(wal_end, false).await;
                        }
                    }
                }
            }
        });
        let writer = client(url).await;
        let seen = committed.clone();
        let commits = tokio::spawn(async move {
            loop {
                let started = Instant::now();
                if writer.execute("INSERT INTO bench_commit VALUES (now())", &[]).await.is_err() {
                    return;
                }
                let took = started.elapsed().as_micros() as i64;
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(took);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Floor { decoded, committed, tasks: vec![reader, commits] }
    }

    /// Stops both and prints their percentiles.
    async fn stop(self, db: &tokio_postgres::Client) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = db.batch_execute("SELECT pg_drop_replication_slot('bench_floor')").await;
        let take = |values: &std::sync::Mutex<Vec<i64>>| {
            let mut values = std::mem::take(&mut *values.lock().unwrap_or_else(|p| p.into_inner()));
            values.sort_unstable();
            values
        };
        let (decoded, committed) = (take(&self.decoded), take(&self.committed));
        println!(
            "  floor: a bare replication reader saw {} commits after p50 {:.1} ms, p99 {:.1} ms; \
             a synchronous one-row commit took p50 {:.1} ms, p99 {:.1} ms ({} commits)",
            decoded.len(),
            percentile(&decoded, 0.5),
            percentile(&decoded, 0.99),
            percentile(&committed, 0.5),
            percentile(&committed, 0.99),
            committed.len()
        );
    }
}

/// Statuses the writers give their rows, in turn (the reference schema allows these four).
const STATUSES: [&str; 4] = ["active", "inactive", "paused", "error"];

/// The values of the `i`-th row of a writer spreading over `orgs` organizations, as [`write`]
/// inserts them: (organization, status index, `config.max_tokens`). Within an organization the
/// statuses take turns, and the token counts 0, 256, ..., 1792 every fourth turn: over a long
/// run each status is a quarter of its rows, and tokens above 1000 half, whatever the status.
fn row_values(i: usize, orgs: usize) -> (usize, usize, u64) {
    (i % orgs, i / orgs % 4, (i / (orgs * 4) % 8) as u64 * 256)
}

/// The `where` predicate of a latency client with `--predicates`, by its index: of each
/// organization's ten clients, five want one status (a quarter of the rows), three two statuses
/// (half), two `config.max_tokens` above 1000 (half): 37.5 % of the frames without predicates
/// over a long run. The latency run's 10,000 rows give 35.6 % ([`expected_for`] counts them).
#[derive(Clone, Copy)]
enum Where {
    Eq(usize),
    In(usize, usize),
    TokensAbove(u64),
}

impl Where {
    fn of_client(c: usize) -> Self {
        match c / 100 % 10 {
            j @ 0..5 => Self::Eq(j % 4),
            5..8 => Self::In(0, 2),
            _ => Self::TokensAbove(1000),
        }
    }

    fn query(self) -> String {
        match self {
            Self::Eq(s) => format!("where=status:eq:{}", STATUSES[s]),
            Self::In(a, b) => format!("where=status:in:{},{}", STATUSES[a], STATUSES[b]),
            Self::TokensAbove(n) => format!("where=config.max_tokens:gt:{n}"),
        }
    }

    fn holds(self, status: usize, tokens: u64) -> bool {
        match self {
            Self::Eq(s) => status == s,
            Self::In(a, b) => status == a || status == b,
            Self::TokensAbove(n) => tokens > n,
        }
    }
}

/// The events a client of organization `org` (with `predicate`) receives from `write(rows, ..,
/// orgs)`: each writer inserts the rows `0..rows / 4`.
fn expected_for(org: usize, predicate: Option<Where>, rows: usize, orgs: usize) -> u64 {
    let writers = 4;
    let share = rows / writers;
    let held = (0..share)
        .map(|i| row_values(i, orgs))
        .filter(|&(o, status, tokens)| {
            o == org && predicate.is_none_or(|p| p.holds(status, tokens))
        })
        .count();
    (held * writers) as u64
}

/// Drains `slot` with `pg_recvlogical` up to the current end of WAL, then drops it; returns how
/// long the drain took.
async fn drain(db: &tokio_postgres::Client, url: &str, slot: &str) -> Duration {
    let end_lsn: String =
        db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    let started = Instant::now();
    let status = Command::new(
        rowcast::apps::cluster::find_binaries().expect("binaries").join("pg_recvlogical"),
    )
    .args(["-d", url, "--slot", slot, "--start", "--endpos", &end_lsn, "-f", "/dev/null"])
    .args(["-o", "proto_version=1", "-o", "publication_names=rowcast", "--no-loop"])
    .status()
    .expect("pg_recvlogical");
    let took = started.elapsed();
    assert!(status.success(), "pg_recvlogical failed");
    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.expect("drop slot");
    took
}

async fn log_head(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT last_id FROM rowcast.log_head", &[]).await.expect("head").get(0)
}

/// Inserts `rows` agents over 4 connections in transactions of `per_txn`, spread over `orgs`
/// organizations with the statuses and `config` of [`row_values`], as fast as possible or at
/// `rate` changes per second.
async fn write(url: &str, rows: usize, per_txn: usize, orgs: usize, rate: Option<f64>, tag: &str) {
    let writers = 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let db = client(url).await;
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let share = rows / writers;
            let mut done = 0;
            while done < share {
                let n = per_txn.min(share - done);
                db.execute(
                    "INSERT INTO agents (id, organization_id, name, status, config)
                     SELECT $1 || '-' || $2::int || '-' || i, 'org' || (i % $4::int), 'agent',
                            (ARRAY['active', 'inactive', 'paused', 'error'])[i / $4::int % 4 + 1],
                            jsonb_build_object('max_tokens', i / ($4::int * 4) % 8 * 256)
                       FROM generate_series($3::int, $3::int + $5::int - 1) i",
                    &[&tag, &(w as i32), &(done as i32), &(orgs as i32), &(n as i32)],
                )
                .await
                .expect("insert");
                done += n;
                if let Some(rate) = rate {
                    pace(started, done, writers, rate).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
}

#[tokio::main]
async fn main() {
    let rows = arg(1, 100_000);
    let idle = arg(2, 10_000);
    let latency_clients = arg(3, 1_000);
    let readers_count = arg(4, 10);
    let per_txn = arg(5, 100);
    let stalled_count = arg(6, 0);
    let predicates = std::env::args().any(|a| a == "--predicates");
    let unix = std::env::args().any(|a| a == "--unix");
    println!(
        "rowcast end-to-end benchmark: rows={rows} idle={idle} latency_clients={latency_clients} \
         readers={readers_count} txn_rows={per_txn} stalled={stalled_count} predicates={predicates} unix={unix}"
    );
    let cluster =
        Cluster::start(&[("wal_level", "logical"), ("max_wal_size", "4GB")]).expect("cluster");
    let admin = client(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE bench").await.expect("database");
    let url = cluster.url("bench");
    let db = client(&url).await;
    // rowcast and pg_recvlogical reach Postgres over its Unix-domain socket with --unix (the
    // writers and this benchmark's own queries stay on TCP).
    let replication_url = if unix { cluster.socket_url("bench") } else { url.clone() };
    rowcast::setup::migrate(&db).await.expect("schema");
    db.batch_execute(
        "INSERT INTO organizations (id, name) SELECT 'org' || i, 'o' FROM generate_series(0, 99) i",
    )
    .await
    .expect("orgs");
    let serve = ["--max-connections", "20000"];
    let mut server = start_server(&replication_url, &serve).await;

    // 1a. Capture alone, from a standing start: `rows` changes are written while rowcast is
    // stopped, then drained by rowcast into its log and by pg_recvlogical from a slot made at
    // the same point, each alone on the machine. Capture's rate counts from the process start.
    if rows > 0 {
        drop(server);
        db.batch_execute("SELECT pg_create_logical_replication_slot('bench_drain', 'pgoutput')")
            .await
            .expect("drain slot");
        let head_before = log_head(&db).await;
        write(&url, rows, per_txn, 100, None, "d").await;
        let postgres_before = PostgresCpu::start(&cluster);
        let started = Instant::now();
        server = start_server(&replication_url, &serve).await;
        let ready = started.elapsed();
        while log_head(&db).await < head_before + rows as i64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let captured = started.elapsed();
        let cpu = cpu_seconds(server.child.id()) / captured.as_secs_f64() * 100.0;
        let (postgres_cpu, walsender_cpu, log_cpu) =
            postgres_before.shares(&cluster, &db, captured).await;
        let raw = drain(&db, &replication_url, "bench_drain").await;
        let (rate, raw_rate) =
            (rows as f64 / captured.as_secs_f64(), rows as f64 / raw.as_secs_f64());
        println!(
            "capture alone: rowcast drained {rows} changes into its log in {:.2}s from its start \
             (ready after {:.2}s) = {rate:.0} changes/s; pg_recvlogical drained the same WAL in \
             {:.2}s = {raw_rate:.0} changes/s; rowcast = {:.0}% of it",
            captured.as_secs_f64(),
            ready.as_secs_f64(),
            raw.as_secs_f64(),
            rate / raw_rate * 100.0
        );
        println!(
            "  CPU while capturing (% of one core, of 200): rowcast {cpu:.0}%, Postgres {postgres_cpu:.0}% \
             (rowcast's walsender {walsender_cpu:.0}%, its log {log_cpu:.0}%)"
        );
    }
    let pid = server.child.id();
    let addr = server.addr;

    // 1. Idle connections.
    let rss_before = rss_kb(pid);
    if idle > 0 {
        let mut idle_sockets = Vec::with_capacity(idle);
        for _ in 0..idle {
            match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/events")).await {
                Ok((ws, _)) => idle_sockets.push(ws),
                Err(err) => {
                    println!("idle connection {} failed: {err}", idle_sockets.len());
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_idle = rss_kb(pid);
        let per_idle = (rss_idle.saturating_sub(rss_before)) as f64 * 1024.0
            / idle_sockets.len().max(1) as f64;
        println!(
            "idle: {} connections, server RSS {} KB -> {} KB, {:.1} KB per idle connection",
            idle_sockets.len(),
            rss_before,
            rss_idle,
            per_idle / 1024.0
        );
        drop(idle_sockets);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // 2. Throughput, with pg_recvlogical draining the same WAL afterwards.
    if rows > 0 {
        db.batch_execute("SELECT pg_create_logical_replication_slot('bench_raw', 'pgoutput')")
            .await
            .expect("raw slot");
        let seen = Arc::new(Seen::default());
        let mut readers = Vec::new();
        for _ in 0..readers_count {
            readers.push(subscriber(addr, "type=*".into(), seen.clone(), true).await);
        }
        let mut stalled = Vec::new();
        for _ in 0..stalled_count {
            stalled.push(subscriber(addr, "type=*".into(), seen.clone(), false).await);
        }
        let head_before = log_head(&db).await;
        let cpu_before = cpu_seconds(pid);
        let (postgres_before, bench_before) =
            (PostgresCpu::start(&cluster), cpu_seconds(std::process::id()));
        let started = Instant::now();
        write(&url, rows, per_txn, 100, None, "t").await;
        let written = started.elapsed();
        let target = head_before + rows as i64;
        while log_head(&db).await < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let appended = started.elapsed();
        // Readers that fell behind catch up from the log: give them time.
        while readers_count > 0
            && seen.frames.load(Ordering::Relaxed) < (rows * readers_count) as u64
            && started.elapsed() < appended + Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered = started.elapsed();
        let cpu = (cpu_seconds(pid) - cpu_before) / delivered.as_secs_f64() * 100.0;
        // Postgres's share, split: rowcast's walsender, its log connections, and the rest (the
        // writers, the checkpointer and the like).
        let (postgres_cpu, walsender_cpu, log_cpu) =
            postgres_before.shares(&cluster, &db, delivered).await;
        let bench_cpu =
            (cpu_seconds(std::process::id()) - bench_before) / delivered.as_secs_f64() * 100.0;
        let raw = drain(&db, &replication_url, "bench_raw").await;
        let sustained = rows as f64 / appended.as_secs_f64();
        let raw_rate = rows as f64 / raw.as_secs_f64();
        let frames = seen.frames.load(Ordering::Relaxed);
        let mut latencies =
            std::mem::take(&mut *seen.latencies.lock().unwrap_or_else(|p| p.into_inner()));
        latencies.sort_unstable();
        println!(
            "throughput: {rows} rows by 4 writers in {:.2}s; appended in {:.2}s = {:.0} changes/s; \
         {frames} frames to {readers_count} clients in {:.2}s = {:.0} events/s; server CPU {:.0}% (of one core); RSS {} KB",
            written.as_secs_f64(),
            appended.as_secs_f64(),
            sustained,
            delivered.as_secs_f64(),
            frames as f64 / delivered.as_secs_f64(),
            cpu,
            rss_kb(pid)
        );
        println!(
            "  CPU over the run (% of one core, of 200): rowcast {cpu:.0}%, Postgres {postgres_cpu:.0}% \
             (rowcast's walsender {walsender_cpu:.0}%, its log {log_cpu:.0}%, the writers and \
             the rest {:.0}%), this benchmark's writers and readers {bench_cpu:.0}%",
            postgres_cpu - walsender_cpu - log_cpu
        );
        println!(
            "physical limit: pg_recvlogical (pgoutput) drained the same WAL in {:.2}s = {:.0} changes/s; rowcast = {:.0}% of it \
             (the writers' own pace on these cores caps it at {:.0}%)",
            raw.as_secs_f64(),
            raw_rate,
            sustained / raw_rate * 100.0,
            rows as f64 / written.as_secs_f64() / raw_rate * 100.0
        );
        println!(
            "throughput latency (saturated): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0)
        );
        let orders: Vec<&Order> = readers.iter().map(|(_, order)| &**order).collect();
        let complete = orders.iter().filter(|o| o.events.load(Ordering::Relaxed) == rows as u64);
        let in_order = orders.iter().filter(|o| o.disorder.load(Ordering::Relaxed) == 0);
        let closes: Vec<u64> =
            orders.iter().map(|o| o.closed.load(Ordering::Relaxed)).filter(|c| *c != 0).collect();
        let lagging: u64 = orders.iter().map(|o| o.lagging.load(Ordering::Relaxed)).sum();
        println!(
            "readers: {} of {readers_count} got all {rows} events, {} in order and exactly once, \
         {} disconnected {closes:?}; {lagging} lagging frames, {} lag switches on the server; \
         server RSS {} KB now, {} KB peak (VmHWM)",
            complete.count(),
            in_order.count(),
            closes.len(),
            metric(addr, "rowcast_lagging_switches_total").await.unwrap_or(0),
            rss_kb(pid),
            status_kb(pid, "VmHWM:"),
        );
        for (reader, _) in readers.into_iter().chain(stalled) {
            reader.abort();
        }
    }

    // 3 and 4. Latency at 1,000 changes/s with many subscribed clients (each organization's
    // events go to its 10 clients), then the same with one client that never reads, or (with
    // `--predicates`) with a `where` predicate on every client's subscription.
    let latency_runs: &[(bool, bool)] = match (latency_clients, predicates) {
        (0, _) => &[],
        (_, false) => &[(false, false), (true, false)],
        (_, true) => &[(false, false), (false, true)],
    };
    let changes = 10_000;
    for &(slow, with_where) in latency_runs {
        let seen = Arc::new(Seen::default());
        let mut clients = Vec::new();
        let mut expected = 0;
        for i in 0..latency_clients {
            let org = i % 100;
            let mut query = format!("type=agent.*&organization_id=org{org}");
            let predicate = with_where.then(|| Where::of_client(i));
            if let Some(predicate) = predicate {
                query = format!("{query}&{}", predicate.query());
            }
            expected += expected_for(org, predicate, changes, 100);
            clients.push(subscriber(addr, query, seen.clone(), true).await);
        }
        if slow {
            clients.push(subscriber(addr, "type=*".into(), seen.clone(), false).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let tag = match (slow, with_where) {
            (true, _) => "s",
            (false, true) => "w",
            (false, false) => "l",
        };
        let floor = Floor::start(&url, &db).await;
        let stages_before = stage_histograms(addr).await;
        write(&url, changes, 10, 100, Some(1_000.0), tag).await;
        while seen.frames.load(Ordering::Relaxed) < expected
            && started.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        let cpu = (cpu_seconds(pid) - cpu_before) / elapsed.as_secs_f64() * 100.0;
        let mut latencies =
            std::mem::take(&mut *seen.latencies.lock().unwrap_or_else(|p| p.into_inner()));
        latencies.sort_unstable();
        println!(
            "latency{}: {changes} changes at 1,000/s, {} clients ({} frames of {expected}): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms; server CPU {:.0}%, RSS {} KB",
            match (slow, with_where) {
                (true, _) => " with one slow client",
                (false, true) => " with where predicates",
                (false, false) => "",
            },
            clients.len(),
            seen.frames.load(Ordering::Relaxed),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.95),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
            cpu,
            rss_kb(pid)
        );
        println!(
            "  server, commit to each stage p50/p99 ms (per event, from its histograms): {}",
            stage_quantiles(&stages_before, &stage_histograms(addr).await)
        );
        floor.stop(&db).await;
        for (client, _) in clients {
            client.abort();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
